"""``convert`` and ``resize`` hold one module's factors at a time: the files they write are the
ones the whole-adapter code wrote (tests/rewrite_whole.py, main's code path) byte for byte, for
every dtype, rule, fixed rank, tol and energy, modules of different ranks, and modules finishing
in any order; memory does not grow with the number of modules; a failure or a kill mid-write
leaves the previous output and nothing else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from rewrite_whole import convert_whole, resize_whole
from testutil import CLI_MAIN, KILL_AT_THIRD_WRITE

import rslora
import rslora.cli
import rslora.adapters.parallel as parallel
import rslora.adapters.resize as resize_mod
import rslora.adapters.rewrite as rewrite_mod
from rslora.adapters.checkpoint import save_tensors


def synthetic_adapter(folder, *, code="F32", layers=4, d=24, r=8, alpha=8, use_rslora=True,
                      rank_pattern=None, alpha_pattern=None, seed=0):
    """A PEFT-layout adapter: ``layers`` q_proj (d x d) and down_proj (d x 2d) modules whose
    spectra decay at different speeds (so --tol picks different ranks), one with a zero update,
    an embedding LoRA, a modules_to_save copy, an int64 buffer, a bfloat16 bias, a README."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    tensors = {}

    def rank_of(name):
        return next((v for k, v in rank_pattern.items() if name.endswith(k)), r)

    shapes = {f"model.layers.{i}.{kind}": shape for i in range(layers)
              for kind, shape in (("self_attn.q_proj", (d, d)), ("mlp.down_proj", (d, 2 * d)))}
    for j, (name, (d_out, d_in)) in enumerate(shapes.items()):
        k = rank_of(name)
        A = rng.standard_normal((k, d_in)) / np.sqrt(d_in)
        B = rng.standard_normal((d_out, k)) * np.logspace(0, -(j % 4 + 1), k)
        if j == 1:
            B[:] = 0  # a zero update (PEFT's initial lora_B)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (A.astype(np.float32), code)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B.astype(np.float32), code)
    k = rank_of("model.embed_tokens")
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = (
        rng.standard_normal((k, 50)).astype(np.float32), code)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = (
        (rng.standard_normal((d, k)) * np.logspace(0, -2, k)).astype(np.float32), code)
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = (
        rng.standard_normal((50, d)).astype(np.float32), code)
    tensors["base_model.model.model.rotary.inv_freq_ids"] = (np.arange(5, dtype=np.int64), "I64")
    tensors["base_model.model.model.layers.0.mlp.down_proj.base_layer.bias"] = (
        rng.standard_normal(d).astype(np.float32), "BF16")
    save_tensors(folder / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
           "target_modules": ["q_proj", "down_proj", "embed_tokens"],
           "modules_to_save": ["lm_head"], "rank_pattern": rank_pattern,
           "alpha_pattern": alpha_pattern, "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "README.md").write_text("card\n")
    return folder


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


ADAPTERS = {
    "f32": dict(),
    "f16-standard": dict(code="F16", use_rslora=False, alpha=16),
    "bf16-patterns": dict(code="BF16", rank_pattern={"layers.1.self_attn.q_proj": 4,
                                                     "down_proj": 6, "embed_tokens": 3},
                          alpha_pattern={"q_proj": 5}),
    "f32-standard-patterns": dict(use_rslora=False, alpha=6, rank_pattern={"q_proj": 5},
                                  alpha_pattern={"embed_tokens": 2.5}),
}

CONVERT = [("f32", dict(rule="standard")), ("f32", dict(rule="rslora")),
           ("f32", dict(rule="standard", alpha=3.0)), ("f16-standard", dict(rule="rslora")),
           ("f16-standard", dict(rule="standard", alpha=7.5)),
           ("bf16-patterns", dict(rule="standard")), ("bf16-patterns", dict(rule="rslora")),
           ("f32-standard-patterns", dict(rule="rslora", alpha=2.0)),
           ("f32-standard-patterns", dict(rule="standard"))]

RESIZE = [("f32", dict(rank=3)), ("f32", dict(rank=64)), ("f16-standard", dict(rank=5)),
          ("bf16-patterns", dict(rank=4)),  # modules at 3 and 4 keep their rank
          ("f32-standard-patterns", dict(rank=5)),
          ("f32", dict(tol=0.05)), ("f32", dict(tol=0.0)), ("f16-standard", dict(energy=0.99)),
          ("bf16-patterns", dict(tol=0.1, max_rank=5)),
          ("f32-standard-patterns", dict(energy=0.9))]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: synthetic_adapter(root / name, **kw) for name, kw in ADAPTERS.items()}


def reversed_arrival(monkeypatch):
    run = parallel.run_items

    def reversed_items(client, fn, items, **k):
        yield from reversed(list(run(client, fn, items, **k)))

    monkeypatch.setattr(parallel, "run_items", reversed_items)


@pytest.mark.parametrize("adapter, kw", CONVERT, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in x.items()))
def test_convert_writes_the_bytes_of_the_whole_adapter_writer(tmp_path, adapters, adapter, kw):
    src = adapters[adapter]
    before = files(src)
    res = rslora.convert_adapter(src, tmp_path / "streamed", **kw)
    ref = convert_whole(src, tmp_path / "whole", **kw)
    assert res.config == ref
    assert files(tmp_path / "streamed") == files(tmp_path / "whole")
    assert files(src) == before


@pytest.mark.parametrize("arrival", ["in order", "reversed"])
@pytest.mark.parametrize("adapter, kw", RESIZE, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in x.items()))
def test_resize_writes_the_bytes_of_the_whole_adapter_writer(tmp_path, adapters, monkeypatch,
                                                             adapter, kw, arrival):
    src = adapters[adapter]
    before = files(src)
    if arrival == "reversed":
        reversed_arrival(monkeypatch)
    res = rslora.resize_adapter(src, tmp_path / "streamed", **kw)
    config, reports = resize_whole(src, tmp_path / "whole", **kw)
    assert res.config == config
    assert [(m.module, m.new_rank, m.energy, m.error, m.norm) for m in res.modules] == reports
    assert files(tmp_path / "streamed") == files(tmp_path / "whole")
    assert files(src) == before
    assert sorted(os.listdir(tmp_path)) == ["streamed", "whole"]  # no spill left anywhere
    if "tol" in kw or "energy" in kw:  # the spill path, with ranks that differ
        assert len({m.new_rank for m in res.modules}) >= 2


def test_real_peft_adapter_same_bytes(tmp_path):
    """A PEFT-saved adapter (Conv1D and embedding LoRA, patterns), both commands."""
    pytest.importorskip("peft")
    from lora_models import make_adapter

    src = make_adapter(tmp_path / "in", "gpt2", dtype="bfloat16", r=6, lora_alpha=12,
                       use_rslora=False, fan_in_fan_out=True, rank_pattern={"c_proj": 4},
                       alpha_pattern={"c_attn": 5})
    for i, (ours, whole, kw) in enumerate([
            (rslora.convert_adapter, convert_whole, dict(rule="rslora")),
            (rslora.resize_adapter, resize_whole, dict(rank=3)),
            (rslora.resize_adapter, resize_whole, dict(energy=0.95))]):
        ours(src, tmp_path / f"s{i}", **kw)
        whole(src, tmp_path / f"w{i}", **kw)
        assert files(tmp_path / f"s{i}") == files(tmp_path / f"w{i}"), kw


# -- memory ------------------------------------------------------------------------------------
def peak(fn) -> int:
    fn()  # imports, caches
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


RUNS = {"convert": (lambda s, o: rslora.convert_adapter(s, o, rule="standard", alpha=3.0,
                                                        force=True),
                    lambda s, o: convert_whole(s, o, rule="standard", alpha=3.0, force=True)),
        "resize-rank": (lambda s, o: rslora.resize_adapter(s, o, rank=16, force=True),
                        lambda s, o: resize_whole(s, o, rank=16, force=True)),
        "resize-tol": (lambda s, o: rslora.resize_adapter(s, o, tol=0.3, force=True),
                       lambda s, o: resize_whole(s, o, tol=0.3, force=True))}


@pytest.mark.parametrize("run", list(RUNS))
def test_memory_does_not_grow_with_the_modules(tmp_path, run):
    """Peak traced memory (NumPy's allocations are traced) of rewriting an adapter of 4 and of
    16 layers (2 modules each, d = 256, r = 32: 96 KiB of float32 factors per layer): the same
    within a fraction of one module with the streaming code; growing by the 12 extra layers'
    factors with the whole-adapter code (which shows the measure can tell)."""
    layer = 32 * (256 + 256 + 256 + 512) * 4
    ours, whole = RUNS[run]

    def measure(layers, fn):
        src = synthetic_adapter(tmp_path / f"{layers}-{fn is whole}", layers=layers, d=256,
                                r=32, seed=1)
        return peak(lambda: fn(src, src.parent / f"{src.name}-out"))

    assert measure(16, ours) - measure(4, ours) < layer / 2
    assert measure(16, whole) - measure(4, whole) > 12 * layer


# -- failures ----------------------------------------------------------------------------------
COMMANDS = {"convert": ["convert", "--rule", "standard", "--alpha", "3"],
            "resize-rank": ["resize", "--rank", "3"], "resize-tol": ["resize", "--tol", "0.05"]}


def cli(argv, src, out):
    return [argv[0], str(src), "-o", str(out), "--force", *(["-q"] if argv[0] == "resize" else []),
            *argv[1:]]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_failure_mid_stream_leaves_the_previous_output(tmp_path, adapters, monkeypatch, command):
    src, out = adapters["f32"], tmp_path / "out"
    assert rslora.cli.main(cli(["convert", "--rule", "rslora"], src, out)) == 0
    before = files(out)
    calls, real = [], rewrite_mod.narrow

    def fail_third(*a, **k):  # the third factor rounded to its dtype
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    for mod in (rewrite_mod, resize_mod):
        monkeypatch.setattr(mod, "narrow", fail_third)
    with pytest.raises(RuntimeError, match="boom"):
        rslora.cli.main(cli(COMMANDS[command], src, out))
    assert files(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]




@pytest.mark.parametrize("command", list(COMMANDS))
def test_killed_mid_stream(tmp_path, adapters, command):
    src, out = adapters["f32"], tmp_path / "out"
    assert rslora.cli.main(cli(["convert", "--rule", "rslora"], src, out)) == 0
    before, inputs = files(out), files(src)
    env = {k: v for k, v in os.environ.items() if k != "RSLORA_CRASH_AT"}
    argv = cli(COMMANDS[command], src, out)
    p = subprocess.run([sys.executable, "-c", KILL_AT_THIRD_WRITE + CLI_MAIN, *argv], env=env,
                       capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert files(out) == before and files(src) == inputs
    left = [n for n in os.listdir(tmp_path) if n != "out"]
    assert len(left) == 1 and left[0].startswith(".out.tmp-")  # the killed run's
    assert any(n.startswith((".adapter_model", "adapter_model"))
               for n in os.listdir(tmp_path / left[0]))
    p = subprocess.run([sys.executable, "-c", CLI_MAIN, *argv], env=env, capture_output=True,
                       text=True)  # cleans up, writes the new output
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"] and files(out) != before


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("code, part, bad", [("F32", "B", np.inf), ("BF16", "A", np.nan),
                                             ("F16", "A", -np.inf), ("BF16", "B", np.inf)])
def test_non_finite_factor_is_the_same_one_line_error(tmp_path, capsys, command, code, part, bad):
    """Found as the module is read, after the output was begun: the same message as when the
    whole adapter was read first, and nothing left behind."""
    src = synthetic_adapter(tmp_path / "in", code=code)
    from safetensors.numpy import load_file

    t = load_file(src / "adapter_model.safetensors")
    key = f"base_model.model.model.layers.2.self_attn.q_proj.lora_{part}.weight"
    t[key][1, 1] = bad
    save_tensors(src / "adapter_model.safetensors",
                 {k: (v, "I64" if v.dtype == np.int64 else code if "lora" in k or "lm_head" in k
                      else "BF16") for k, v in t.items()})
    assert rslora.cli.main(cli(COMMANDS[command], src, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and \
        f"module 'model.layers.2.self_attn.q_proj': factor {part} holds NaN or inf" in err, err
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_a_tensor_of_a_dtype_it_cannot_copy_is_named(tmp_path, capsys):
    """An fp8 tensor beside the factors: a one-line error before any work (main's whole-adapter
    code raised an AttributeError from NumPy)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from safetensors.numpy import load_file, save_file

    src = synthetic_adapter(tmp_path / "in")
    t = load_file(src / "adapter_model.safetensors")
    t["base_model.model.scales"] = np.ones(4, ml_dtypes.float8_e4m3fn)
    save_file(t, src / "adapter_model.safetensors", metadata={"format": "pt"})
    for argv in COMMANDS.values():
        assert rslora.cli.main(cli(argv, src, tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'base_model.model.scales' is F8_E4M3, which rslora " \
            "cannot copy" in err, err
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_same_bytes_whatever_the_hash_seed(tmp_path, adapters):
    """rank_pattern / alpha_pattern keys of one length come in module order (they came in the
    order of a set of strings, which changes with PYTHONHASHSEED)."""
    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed / "out"
        p = subprocess.run([sys.executable, "-c", CLI_MAIN, *cli(COMMANDS["resize-tol"],
                                                             adapters["f32"], out)],
                           env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
        outs.append(files(out))
    assert len(json.loads(outs[0]["adapter_config.json"])["rank_pattern"]) >= 4
    assert outs[0] == outs[1] == outs[2]
