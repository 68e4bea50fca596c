"""`rslora study`: the properties its report states, checked on the quick mode's results.

The quick study runs once per session (through the command line) into a temporary directory;
determinism and the file handling are checked on a tiny configuration.
"""

import json
import math
import os

import numpy as np
import pytest

import rslora
from rslora import cli, study
from rslora.study import StudyConfig, dynamics, report

FIGURES = ["spectra.png", "approximation.png", "loss_curves.png", "final_loss.png",
           "grad_norm.png", "one_step.png"]


def tiny_config(seed=0) -> StudyConfig:
    return StudyConfig(mode="quick", seed=seed, spectrum_dim=48, approx_ranks=(2, 4, 8),
                       train_dim=32, ranks=(4, 8, 16), probe_ranks=(1, 2, 4, 8, 16), steps=12,
                       batch=16, evals=3, probe_inputs=4, sgd_lrs=(0.02, 0.04),
                       adam_lrs=(1e-3, 3e-3))


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    assert cli.main(["study", "--quick", "--out", str(out), "--seed", "0"]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def _final(res, kind, opt, rule):
    return {x["rank"]: x["final_loss"] for x in res["dynamics"]["runs"]
            if x["target"] == kind and x["optimizer"] == opt and x["rule"] == rule}


# --- the files ----------------------------------------------------------------------------------

def test_outputs_exist_and_report_links_every_plot(quick):
    out, res = quick
    report_md = (out / "report.md").read_text()
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({name})" in report_md
    assert [p for p in os.listdir(out) if p.startswith(".")] == [".rslora-output.json"]  # no temp
    assert report_md == report.render(res)  # the report is a function of results.json alone
    for line in report.headline(res):
        assert line in report_md
    for section in ("## 1. The scale table", "## 2. Spectra", "## 3. Approximation",
                    "## 4. Training dynamics", "**Theory.**", "**What we find.**", "**Limits.**"):
        assert section in report_md


# --- 1. scale table -----------------------------------------------------------------------------

def test_scale_table_exact(quick):
    _, res = quick
    rows = res["scale_table"]["rows"]
    assert [row["r"] for row in rows] == [1, 4, 8, 16, 32, 64]
    for row in rows:
        assert row["standard"] == 16 / row["r"]
        assert row["rslora"] == 16 / math.sqrt(row["r"])
        assert row["rslora"] == rslora.scale(16, row["r"])


# --- 2. spectra ---------------------------------------------------------------------------------

def test_spectra_ranks_match_the_models(quick):
    _, res = quick
    sp = res["spectra"]
    for kind in ("style", "facts"):
        assert sp[kind]["rank_90"] == sp[kind]["rank_90_model"]
        assert sp[kind]["rank_99"] == sp[kind]["rank_99_model"]
        assert sp[kind]["svd_vs_model_max_abs"] < 1e-12
        assert sp[kind]["frobenius_norm"] == pytest.approx(1.0, rel=1e-12)
    # style: share(r) = (1 - q^r) / (1 - q^k), q = exp(-2/tau): r90 is the first r with q^r <= 0.1
    k, q = sp["style"]["shape"][0], math.exp(-2 / res["config"]["style_tau"])
    share = lambda r: (1 - q ** r) / (1 - q ** k)  # noqa: E731
    r90 = next(r for r in range(1, k + 1) if share(r) >= 0.9)
    assert sp["style"]["rank_90"] == r90
    # facts (power 1/2): share(r) = H_r / H_k
    H = np.cumsum(1.0 / np.arange(1, k + 1))
    assert sp["facts"]["rank_90"] == int(np.argmax(H / H[-1] >= 0.9)) + 1
    assert sp["facts"]["rank_90"] > 20 * sp["style"]["rank_90"]  # the long tail


# --- 3. approximation ---------------------------------------------------------------------------

def test_rsvd_error_between_optimum_and_1_01_optimum(quick):
    _, res = quick
    for kind, rows in res["approximation"].items():
        assert [row["r"] for row in rows] == [2, 4, 8, 16, 32, 64, 128, 256]
        for row in rows:
            for key in ("rsvd_rslora", "rsvd_standard"):
                if row["optimum"] > 1e-10:  # (1e-12: Delta itself is rounded to float64)
                    assert row["optimum"] - 1e-12 <= row[key] <= 1.01 * row["optimum"] + 1e-12
                else:  # at float64 rounding
                    assert row[key] < 1e-12
            # the rule only moves the scale between s and the factors
            assert row["rsvd_standard"] == pytest.approx(row["rsvd_rslora"], rel=1e-6, abs=1e-13)


def test_writeup_error_is_optimum_plus_scale_mismatch(quick):
    _, res = quick
    for kind, rows in res["approximation"].items():
        for row in rows:
            g = row["writeup_gamma"]
            assert g == 16 / math.sqrt(row["r"])
            assert row["writeup_scaled"] == pytest.approx(row["writeup_predicted"], rel=1e-9,
                                                          abs=1e-13)
            if g > 1:
                assert row["writeup_scaled"] > row["rsvd_rslora"]
        at256 = rows[-1]  # gamma = 1: the write-up's number is the plain error
        assert at256["writeup_scaled"] == pytest.approx(at256["rsvd_rslora"], rel=1e-9, abs=1e-13)


# --- 4. training dynamics -----------------------------------------------------------------------

def test_grad_norm_slopes(quick):
    _, res = quick
    for kind, probe in res["dynamics"]["grad_norm"].items():
        assert probe["standard"]["slope"] == pytest.approx(-0.5, abs=0.08)
        assert probe["rslora"]["slope"] == pytest.approx(0.0, abs=0.08)
        for rule in ("standard", "rslora"):  # each point near its expectation (one batch)
            ratio = np.asarray(probe[rule]["grad_norm"]) / np.asarray(probe[rule]["expected"])
            assert np.all((ratio > 0.6) & (ratio < 1.4)), ratio


def test_one_step_change_slopes(quick):
    _, res = quick
    for kind, probe in res["dynamics"]["one_step"].items():
        for key, theory in (("sgd/standard", -1.0), ("sgd/rslora", 0.0),
                            ("adam/standard", 0.0), ("adam/rslora", 0.5)):
            assert probe[key]["slope_theory"] == theory
            assert probe[key]["slope"] == pytest.approx(theory, abs=0.15), (kind, key)


def test_sgd_rslora_improves_with_rank_and_standard_does_not(quick):
    _, res = quick
    ranks = res["config"]["ranks"]
    rs = _final(res, "facts", "sgd", "rslora")
    assert all(rs[b] < rs[a] for a, b in zip(ranks, ranks[1:]))
    for kind in ("style", "facts"):
        std, rs = _final(res, kind, "sgd", "standard"), _final(res, kind, "sgd", "rslora")
        assert rs[ranks[-1]] < 0.2 * std[ranks[-1]]
        assert std[ranks[-1]] > min(std.values())  # the standard rule's largest rank is not its best


def test_adam_hides_the_standard_rules_slowdown(quick):
    _, res = quick
    ranks = res["config"]["ranks"]
    for kind in ("style", "facts"):
        std = _final(res, kind, "adam", "standard")
        assert all(std[b] < std[a] for a, b in zip(ranks, ranks[1:]))


def test_runs_are_calibrated_and_paired(quick):
    _, res = quick
    cfg = res["config"]
    r0 = cfg["ranks"][0]
    assert cfg["alpha_standard"] / r0 == cfg["alpha"] / math.sqrt(r0)
    for v in res["dynamics"]["learning_rates"].values():  # the argmin of the grid at r0
        finals = [math.inf if f is None else f for f in v["final_loss"]]
        assert v["lr"] == v["grid"][int(np.argmin(finals))]
    runs = res["dynamics"]["runs"]
    assert len(runs) == 2 * 2 * 2 * len(cfg["ranks"])
    for run in runs:
        assert run["diverged_at"] is None and run["final_loss"] is not None
        assert run["loss"][0] == pytest.approx(1.0, abs=1e-6)  # B = 0: the whole delta is left
        assert run["steps"][-1] == cfg["steps"]
        s = dynamics.rule_scale(study.StudyConfig(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()
            if k != "alpha_standard"}), run["rule"], run["rank"])
        assert run["scale"] == s
    for kind in ("style", "facts"):
        for opt in ("sgd", "adam"):
            assert (_final(res, kind, opt, "standard")[r0] == _final(res, kind, opt, "rslora")[r0])


def test_train_matches_a_numpy_reference():
    """One short run with rslora's kernels equals the same loop written in float64 NumPy."""
    cfg = tiny_config()
    delta, _ = study.spectra.make_delta(cfg, "facts", cfg.train_dim)
    prob = dynamics.Problem(cfg, "facts", delta)
    for opt, lr in (("sgd", 0.03), ("adam", 2e-3)):
        run = dynamics.train(cfg, prob, 8, "standard", opt, lr)
        s = dynamics.rule_scale(cfg, "standard", 8)
        A = prob.A_init[:8].astype(np.float64)
        B = np.zeros((cfg.train_dim, 8))
        D = prob.delta.astype(np.float64)
        m, v = [np.zeros_like(A), np.zeros_like(B)], [np.zeros_like(A), np.zeros_like(B)]
        rng = np.random.default_rng(prob.batch_seed)
        for t in range(cfg.steps):
            x = rng.standard_normal((cfg.batch, cfg.train_dim), dtype=np.float32).astype(float)
            dy = (s * (x @ A.T) @ B.T - x @ D.T) / cfg.batch
            gA, gB = s * (dy @ B).T @ x, s * dy.T @ (x @ A.T)
            for j, (p, g) in enumerate(((A, gA), (B, gB))):
                if opt == "sgd":
                    p -= lr * g
                else:
                    m[j] = 0.9 * m[j] + 0.1 * g
                    v[j] = 0.999 * v[j] + 0.001 * g * g
                    p -= lr * (m[j] / (1 - 0.9 ** (t + 1))) / (
                        np.sqrt(v[j] / (1 - 0.999 ** (t + 1))) + 1e-8)
        ref = np.linalg.norm(s * B @ A - D) ** 2 / np.linalg.norm(D) ** 2
        assert run["final_loss"] == pytest.approx(ref, rel=2e-3)


# --- determinism and the command line -----------------------------------------------------------

def test_same_seed_same_results_json(tmp_path):
    a = study.run_study(tiny_config(3), tmp_path / "a", progress=False)
    study.run_study(tiny_config(3), tmp_path / "b", progress=False)
    for name in ("results.json", "report.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = study.run(tiny_config(4), progress=False)
    assert c["dynamics"]["runs"][5]["final_loss"] != a["dynamics"]["runs"][5]["final_loss"]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["config"]["seed"] == 3


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err
    return err


def test_cli_unknown_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["study", "--bogus"])
    assert e.value.code == 2
    _one_line_error(capsys, "unrecognized arguments: --bogus")
    with pytest.raises(SystemExit):
        cli.main(["study", "--seed", "abc"])
    _one_line_error(capsys, "--seed", "abc")


def test_cli_negative_seed(tmp_path, capsys):
    assert cli.main(["study", "--quick", "--seed", "-1", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--seed")


def test_cli_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["study", "--quick", "--out", str(f)]) == 2
    _one_line_error(capsys, "not a directory", str(f))
    assert f.read_text() == "x"
    assert cli.main(["study", "--quick", "--out", str(f / "sub")]) == 2  # below a file
    _one_line_error(capsys, "cannot create output directory")


def test_cli_unwritable_dir(tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert cli.main(["study", "--quick", "--out", str(d / "new")]) == 2
        _one_line_error(capsys, "cannot create output directory")
    finally:
        d.chmod(0o700)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.md").write_text("keep me")
    assert cli.main(["study", "--quick", "--out", str(out)]) == 2
    _one_line_error(capsys, "already exists", "--force")
    # --force replaces only an earlier rslora output, never a folder of the user's
    assert cli.main(["study", "--quick", "--out", str(out), "--force"]) == 2
    _one_line_error(capsys, "not written by rslora")
    assert (out / "report.md").read_text() == "keep me"
    monkeypatch.setattr(study, "quick_config", tiny_config)  # --force path, at tiny sizes
    out = tmp_path / "o2"
    assert cli.main(["study", "--quick", "--out", str(out)]) == 0
    (out / "report.md").write_text("old")
    assert cli.main(["study", "--quick", "--force", "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# rsLoRA study")
    assert sorted(p for p in os.listdir(out)) == sorted(["report.md", "results.json",
                                                         ".rslora-output.json"] + FIGURES)
    assert sorted(os.listdir(tmp_path)) == ["o", "o2"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_cli_unwritable_dir_even_for_root(capsys):
    """/proc refuses new files whoever asks: the write probe, not os.access, must catch it."""
    assert cli.main(["study", "--quick", "--out", "/proc/self/fd"]) == 2
    _one_line_error(capsys, "already exists")
    assert cli.main(["study", "--quick", "--out", "/proc/self/fd/rslora-study"]) == 2
    _one_line_error(capsys, "cannot create output directory")
