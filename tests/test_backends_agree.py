"""CPU and GPU accept and refuse the same arguments, with the same messages.

Every case runs twice through the public ops: once on NumPy arrays (the CPU core), once on fake
device arrays (objects with a CUDA ``__dlpack_device__`` wrapping NumPy memory) that go through
rslora.cuda to a recording stand-in for the CUDA module (not importable here: no GPU). A refused
call must raise the same exception type with the same message on both; an accepted one must
give the same result (the stand-in computes what the kernels would, in float64) and send the
same scalars (scale, rank, iterations, seed key) down.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import rslora
from rslora import _core, cuda
from rslora.cuda import _device_arrays as dev


class DevArray:
    """A stand-in GPU array: NumPy memory behind a CUDA DLPack device."""

    def __init__(self, a: np.ndarray):
        self.a = a

    @property
    def shape(self) -> tuple[int, ...]:
        return self.a.shape

    @property
    def dtype(self) -> np.dtype:
        return self.a.dtype

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.a[key] = value.a if isinstance(value, DevArray) else value


DevArray.__module__ = "fakegpu"


class FakeFramework(dev.Framework):
    name = "fakegpu"

    def empty(self, shape, dtype, like):
        return DevArray(np.full(tuple(shape), np.nan, dtype=dtype))

    def from_host(self, values, like):
        return DevArray(np.array(values))

    def stream(self, device):
        return 0

    def strides(self, a):
        return tuple(s // a.a.itemsize for s in a.a.strides)

    def data_ptr(self, a):
        return a.a.__array_interface__["data"][0]

    def itemsize(self, a):
        return a.a.itemsize

    def contiguous(self, a):
        return DevArray(np.ascontiguousarray(a.a))

    def astype(self, a, dtype):
        return DevArray(a.a.astype(dtype))

    def reshape(self, a, shape):
        return DevArray(a.a.reshape(tuple(shape)))

    def view(self, a, shape):
        v = a.a.view()
        try:
            v.shape = tuple(shape)
        except AttributeError:
            return None
        return DevArray(v)

    def all_finite(self, a):
        return bool(np.isfinite(a.a).all())

    def capsule(self, a, stream):
        return a


class RecordingCuda:
    """What rslora._cuda would receive; computes the results in float64 (as the kernels would,
    up to rounding), so the GPU path's reshapes, views and copies are checked too."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def lora_linear(self, device, stream, x, W, A, B, s, bias, out, xa):
        self.calls.append(("lora_linear", dict(s=s, r=A.shape[0])))
        xa64 = x.a.astype(np.float64) @ A.a.T
        xa.a[...] = xa64
        y = x.a @ W.a.T.astype(np.float64) + s * xa64 @ B.a.T
        out.a[...] = y + (0 if bias is None else bias.a)

    def merge(self, device, stream, W, A, B, s):
        self.calls.append(("merge", dict(s=s)))
        W.a[...] += s * B.a.astype(np.float64) @ A.a

    def lora_linear_multi(self, device, stream, x, W, A_all, B_all, ids, scales, bias, out):
        self.calls.append(("lora_linear_multi", dict(ids=ids.a.copy(), scales=scales.a.copy())))
        assert ids.a.dtype == np.int64 and scales.a.dtype == np.float32
        y = out.a.astype(np.float64) if W is None else x.a @ W.a.T.astype(np.float64)
        if bias is not None:
            y += bias.a
        for i, a in enumerate(ids.a):
            if a >= 0:
                y[i] += scales.a[a] * (B_all.a[a] @ (A_all.a[a] @ x.a[i].astype(np.float64)))
        out.a[...] = y

    def rsvd(self, device, stream, M, k, oversample, n_iter, seed, U, S, Vt):
        self.calls.append(("rsvd", dict(k=k, oversample=oversample, n_iter=n_iter, seed=seed)))
        u, s, vt = np.linalg.svd(M.a.astype(np.float64), full_matrices=False)
        U.a[...], S.a[...], Vt.a[...] = u[:, :k], s[:k], vt[:k]


@pytest.fixture
def gpu(monkeypatch):
    rec = RecordingCuda()
    monkeypatch.setitem(dev.FRAMEWORKS, "fakegpu", lambda: FakeFramework(None))
    monkeypatch.setattr(cuda, "_module", rec)
    return rec


# --- the suite: (op, arguments) -------------------------------------------------------------------

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


X, W, A, B, BIAS = f32(3, 5, 6), f32(7, 6), f32(4, 6), f32(7, 4), f32(7)
A_ALL, B_ALL = f32(3, 4, 6), f32(3, 7, 4)
IDS = np.array([[0, -1, 2, 1, 0], [2, 2, -1, 0, 1], [1, 1, 1, -1, 0]])
SCALES = [0.5, -1.0, 2.0]
M = f32(9, 6)

# operands that become device arrays on the GPU side (ids and scales stay host values there,
# as callers usually pass them)
DEVICE_ARGS = {"x", "W", "A", "B", "bias", "out", "y", "A_all", "B_all", "M"}


def linear(**over):
    return "lora_linear", {"x": X, "W": W, "A": A, "B": B, "alpha": 8.0, **over}


def merge(**over):
    return "merge", {"W": W.copy(), "A": A, "B": B, "scale": 0.5, **over}


def unmerge(**over):
    return "unmerge", {"W": W.copy(), "A": A, "B": B, "alpha": 4.0, "rule": "standard", **over}


def multi(**over):
    return "lora_linear_multi", {"x": X, "W": W, "A_all": A_ALL, "B_all": B_ALL,
                                 "adapter_ids": IDS, "scales": SCALES, **over}


def add_multi(**over):
    return "lora_add_multi", {"y": f32(3, 5, 7), "x": X, "A_all": A_ALL, "B_all": B_ALL,
                              "adapter_ids": IDS, "scales": SCALES, **over}


def rsvd(**over):
    return "rsvd", {"M": M, "k": 3, "seed": 7, **over}


INT32 = np.zeros((7, 4), np.int32)
CASES = {
    # accepted
    "linear": linear(),
    "linear bias out": linear(bias=BIAS, out=np.zeros((3, 5, 7), np.float32)),
    "linear strided out": linear(out=np.zeros((3, 5, 14), np.float32)[:, :, ::2]),
    "linear scale": linear(alpha=None, scale=-0.25),
    "linear 1-D x": linear(x=X[0, 0]),
    "merge": merge(),
    "unmerge": unmerge(),
    "multi": multi(),
    "multi bias": multi(bias=BIAS, scales=np.array(SCALES)),
    "add_multi": add_multi(),
    "rsvd": rsvd(),
    "rsvd full rank": rsvd(k=6, n_iter=2),
    "rsvd generator": rsvd(seed="generator"),
    # refused: shapes
    "linear W d_in": linear(W=f32(7, 5)),
    "linear A d_in": linear(A=f32(4, 5)),
    "linear B": linear(B=f32(7, 3)),
    "linear B r": linear(B=f32(6, 4)),
    "linear W 3-D": linear(W=f32(7, 6, 1)),
    "linear A 1-D": linear(A=f32(6)),
    "linear x 0-d": linear(x=np.array(1.0, np.float32)),
    "linear bias": linear(bias=f32(6)),
    "merge A": merge(A=f32(4, 5)),
    "merge B": merge(B=f32(7, 3)),
    "multi A_all d_in": multi(A_all=f32(3, 4, 5)),
    "multi A_all 2-D": multi(A_all=f32(4, 6)),
    "multi B_all r": multi(B_all=f32(3, 7, 5)),
    "multi B_all d_out": multi(B_all=f32(3, 6, 4)),
    "multi B_all n": multi(B_all=f32(2, 7, 4)),
    "multi W d_in": multi(W=f32(7, 5)),
    "multi bias shape": multi(bias=f32(3)),
    "add_multi y": add_multi(y=f32(3, 5, 6)),
    "add_multi y batch": add_multi(y=f32(5, 3, 7)),
    "add_multi B_all": add_multi(B_all=f32(3, 7, 2)),
    # refused: dtypes
    "linear mixed": linear(B=INT32),
    "linear out dtype": linear(out=np.zeros((3, 5, 7), np.float64)),
    "linear out shape": linear(out=np.zeros((3, 5, 6), np.float32)),
    # refused: aliasing
    "linear out is x": linear(x=np.zeros((3, 5, 7), np.float32), W=f32(7, 7), A=f32(4, 7),
                              out="x"),
    "merge W is A": merge(W=np.zeros((6, 6), np.float32), A="W[:4]", B=f32(6, 4)),
    "add_multi y is x": add_multi(y=np.zeros((3, 5, 6), np.float32), B_all=f32(3, 6, 4), x="y"),
    # refused: scales, alpha, rule
    "linear scale nan": linear(alpha=None, scale=float("nan")),
    "linear scale bool": linear(alpha=None, scale=True),
    "linear both": linear(scale=1.0),
    "linear neither": linear(alpha=None),
    "linear rule": linear(rule="sqrt"),
    "merge alpha str": merge(scale=None, alpha="8"),
    # refused: ids
    "multi id high": multi(adapter_ids=np.where(IDS == 2, 3, IDS)),
    "multi id low": multi(adapter_ids=np.where(IDS == -1, -2, IDS)),
    "multi ids float": multi(adapter_ids=IDS.astype(float)),
    "multi ids bool": multi(adapter_ids=IDS > 0),
    "multi ids shape": multi(adapter_ids=IDS[:, :4]),
    "multi ids list": multi(adapter_ids=IDS.tolist()),
    "add_multi id high": add_multi(adapter_ids=np.where(IDS == 2, 7, IDS)),
    # refused: per-adapter scales
    "multi scales short": multi(scales=SCALES[:2]),
    "multi scales scalar": multi(scales=1.0),
    "multi scales none": multi(scales=None),
    "multi scales inf": multi(scales=[1.0, np.inf, 2.0]),
    "multi scales str": multi(scales=["a", "b", "c"]),
    "add_multi scales scalar": add_multi(scales=2.0),
    # refused: rsvd options
    "rsvd k 0": rsvd(k=0),
    "rsvd k big": rsvd(k=7),
    "rsvd k float": rsvd(k=2.0),
    "rsvd k bool": rsvd(k=True),
    "rsvd M 1-D": rsvd(M=f32(9)),
    "rsvd oversample": rsvd(oversample=-1),
    "rsvd oversample float": rsvd(oversample=1.5),
    "rsvd n_iter": rsvd(n_iter=-1),
    "rsvd n_iter str": rsvd(n_iter="many"),
    "rsvd n_iter big": rsvd(n_iter=2**31),
    "rsvd method": rsvd(method="basic"),
    "rsvd normalizer": rsvd(normalizer="cholesky"),
    "rsvd krylov lu": rsvd(method="krylov", normalizer="lu"),
    "rsvd seed neg": rsvd(seed=-1),
    "rsvd seed big": rsvd(seed=2**64),
    "rsvd seed float": rsvd(seed=1.0),
    "rsvd auto_tol": rsvd(auto_tol=1.5),
    "rsvd auto_tol str": rsvd(auto_tol="0.1"),
    "rsvd nan": rsvd(M=np.full((9, 6), np.nan, np.float32)),
}
# Refusals of what one backend lacks (float64 and krylov on the GPU, float16 on the CPU) are
# not in this suite: they are the backends' documented differences, tested in test_cuda.py.


def _materialise(args: dict, on_device: bool) -> dict:
    out: dict = {}
    for k, val in args.items():
        if isinstance(val, np.ndarray) and k in DEVICE_ARGS:
            val = val.copy()
            out[k] = DevArray(val) if on_device else val
        else:
            out[k] = val
    for k, val in args.items():  # "x" / "W[:4]": an alias of another operand
        if isinstance(val, str) and k in DEVICE_ARGS:
            name, _, sl = val.partition("[")
            base = out[name].a if on_device else out[name]
            view = base[: int(sl.rstrip("]").lstrip(":"))] if sl else base
            out[k] = DevArray(view) if on_device else view
    if out.get("seed") == "generator":
        out["seed"] = np.random.default_rng(123)
    return out


def _run(op: str, args: dict, on_device: bool):
    kw = _materialise(args, on_device)
    lead = {"lora_linear": "x", "lora_linear_multi": "x", "merge": "W", "unmerge": "W",
            "lora_add_multi": "y", "rsvd": "M"}[op]
    pos = {"lora_linear": ["x", "W", "A", "B"], "merge": ["W", "A", "B"],
           "unmerge": ["W", "A", "B"], "lora_linear_multi": ["x", "W", "A_all", "B_all",
                                                             "adapter_ids"],
           "lora_add_multi": ["y", "x", "A_all", "B_all", "adapter_ids"], "rsvd": ["M", "k"]}[op]
    assert lead in pos
    positional = [kw.pop(p) for p in pos]
    kw = {k: val for k, val in kw.items() if not (k in ("alpha", "scale") and val is None)}
    try:
        return "ok", getattr(rslora, op)(*positional, **kw)
    except Exception as e:  # noqa: BLE001 - compared between the backends
        return "error", e


SUPPORTED = re.compile(r"float32 or float64|float16, bfloat16 or float32")


def _message(e: BaseException) -> str:
    # the dtype sets differ by design (float64 on the CPU, float16/bfloat16 on the GPU)
    return SUPPORTED.sub("<the backend's dtypes>", str(e))


def _host(a):
    return a.a if isinstance(a, DevArray) else a


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_outcome_on_both_backends(case, gpu):
    op, args = CASES[case]
    cpu_kind, cpu = _run(op, args, on_device=False)
    gpu_kind, got = _run(op, args, on_device=True)
    if cpu_kind == "error" or gpu_kind == "error":
        assert (cpu_kind, type(cpu)) == (gpu_kind, type(got)), (cpu, got)
        assert _message(cpu) == _message(got)
        assert not gpu.calls or gpu.calls[-1][0] != op  # refused before any kernel ran
        return
    if op == "rsvd":
        U, S, Vt = (np.asarray(_host(a), np.float64) for a in got)
        Uc, Sc, Vtc = cpu
        np.testing.assert_allclose(S, Sc, rtol=2e-4, atol=2e-4 * Sc[0])
        return
    cpu_t = cpu if isinstance(cpu, tuple) else (cpu,)
    gpu_t = got if isinstance(got, tuple) else (got,)
    for c, g in zip(cpu_t, gpu_t, strict=True):
        g = _host(g)
        assert c.shape == g.shape and c.dtype == g.dtype
        np.testing.assert_allclose(g, c, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(c).max()))


def test_scalars_sent_down_match_the_cpu(gpu):
    _run(*linear(alpha=8.0, rule="standard"), on_device=True)
    assert gpu.calls[-1] == ("lora_linear", {"s": 2.0, "r": 4})
    _run(*unmerge(), on_device=True)
    assert gpu.calls[-1] == ("merge", {"s": -1.0})
    _run(*rsvd(seed=7), on_device=True)
    assert gpu.calls[-1][1] == {"k": 3, "oversample": 10, "seed": 7,
                                "n_iter": _core.rsvd_auto_iters("subspace", 9, 6, 3, 10)}
    # a Generator gives the key the CPU would draw from it
    _run(*rsvd(seed="generator"), on_device=True)
    assert gpu.calls[-1][1]["seed"] == int(np.random.default_rng(123).integers(0, 2**63))
    _run(*rsvd(n_iter=3, oversample=2**40), on_device=True)
    assert gpu.calls[-1][1]["n_iter"] == 3 and gpu.calls[-1][1]["oversample"] == 2**31 - 1


def test_refused_seed_does_not_advance_a_generator(gpu):
    for on_device in (False, True):
        g = np.random.default_rng(5)
        args = rsvd(k=0)[1] | {"seed": g}
        kind, _ = _run("rsvd", args, on_device)
        assert kind == "error"
        assert g.integers(0, 2**63) == np.random.default_rng(5).integers(0, 2**63)


def test_cpu_only_ops_refuse_device_arrays_by_name():
    d = DevArray(np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="lora_linear_backward runs on the CPU only, but x is"):
        rslora.lora_linear_backward(np.zeros((2, 4), np.float32), d, W, A, B, scale=1.0)
    with pytest.raises(TypeError, match="rsvd_tol runs on the CPU only, but M is"):
        rslora.rsvd_tol(d, 0.1)
    with pytest.raises(TypeError, match="spectrum runs on the CPU only"):
        rslora.spectrum(d)
    with pytest.raises(TypeError, match="lora_from_delta runs on the CPU only"):
        rslora.lora_from_delta(d, 2)
    with pytest.raises(TypeError, match="LoRALinear runs on the CPU only, but weight is"):
        rslora.LoRALinear(d, A, B, scale=1.0)


def test_mixed_devices_are_named_from_either_side(gpu):
    with pytest.raises(TypeError, match="W is on the GPU but the call runs on the host"):
        rslora.lora_linear(X, DevArray(W.copy()), A, B, alpha=8.0)
    with pytest.raises(TypeError, match="W is host memory but x is on the GPU"):
        rslora.lora_linear(DevArray(X.copy()), W, A, B, alpha=8.0)
    with pytest.raises(TypeError, match="B_all is on the GPU but the call runs on the host"):
        rslora.lora_add_multi(np.zeros((3, 5, 7), np.float32), X, A_ALL, DevArray(B_ALL),
                              IDS, scales=SCALES)
