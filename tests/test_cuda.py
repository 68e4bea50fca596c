"""rslora.cuda: what runs without a GPU (routing, validation, loading, build options) and the GPU
ops against float64 references (skipped without a GPU; bench/gpu_check.py is the fuller check)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import rslora
from rslora.cuda import _device_arrays as dev
from rslora import cuda

ROOT = Path(__file__).resolve().parents[1]


def _module_or_none():
    try:
        return cuda._load()
    except ImportError:
        return None


def _torch_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and cuda.is_available()


needs_module = pytest.mark.skipif(_module_or_none() is None, reason="rslora._cuda not built here")
needs_gpu = pytest.mark.skipif(not _torch_gpu(), reason="needs a CUDA GPU, torch CUDA and rslora._cuda")


class FakeDeviceArray:
    """Stands for a GPU array: shape, dtype name and a CUDA __dlpack_device__, nothing else."""

    def __init__(self, shape, dtype="float32", device=0, dl_type=2):
        self.shape = tuple(shape)
        self.dtype = dtype
        self._dev = (dl_type, device)

    def __dlpack_device__(self):
        return self._dev


F = FakeDeviceArray


# --- routing -----------------------------------------------------------------------------------

def test_import_rslora_does_not_load_cuda():
    code = "import sys, rslora; print('rslora._cuda' in sys.modules, 'rslora.cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_on_gpu_detection():
    assert dev.on_gpu(F((2, 3)))
    assert not dev.on_gpu(np.zeros((2, 3)))
    assert not dev.on_gpu(F((2, 3), dl_type=1))  # DLPack CPU
    assert not dev.on_gpu([1.0, 2.0])
    torch = pytest.importorskip("torch")
    assert not dev.on_gpu(torch.zeros(2))


def test_lora_linear_routes_device_arrays_with_resolved_scale(monkeypatch):
    seen = {}

    def fake(x, W, A, B, s, *, bias=None, out=None, return_xa=False):
        seen.update(x=x, s=s, bias=bias, out=out, return_xa=return_xa)
        return "gpu-result"

    monkeypatch.setattr(cuda, "lora_linear", fake)
    x, W, A, B = F((5, 6)), F((7, 6)), F((4, 6)), F((7, 4))
    assert rslora.lora_linear(x, W, A, B, alpha=16, return_xa=True) == "gpu-result"
    assert seen["x"] is x and seen["s"] == 16 / 2 and seen["return_xa"] is True
    rslora.lora_linear(x, W, A, B, alpha=16, rule="standard", bias="b")
    assert seen["s"] == 4.0 and seen["bias"] == "b"


def test_merge_and_unmerge_route_with_sign(monkeypatch):
    calls = []
    monkeypatch.setattr(cuda, "merge", lambda W, A, B, s: calls.append(s) or W)
    W, A, B = F((7, 6)), F((4, 6)), F((7, 4))
    assert rslora.merge(W, A, B, scale=0.5) is W
    assert rslora.unmerge(W, A, B, alpha=8) is W
    assert calls == [0.5, -4.0]


# --- validation before any GPU work ---------------------------------------------------------------

def _linear_args(**over):
    args = dict(x=F((3, 5, 6)), W=F((7, 6)), A=F((4, 6)), B=F((7, 4)), s=1.0)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, words", [
    (dict(W=F((7, 5))), ValueError, "W has shape (7, 5) but x has d_in=6"),
    (dict(A=F((4, 5))), ValueError, "A has shape (4, 5) but x has d_in=6"),
    (dict(B=F((7, 3))), ValueError, "B has shape (7, 3) but W and A need (7, 4)"),
    (dict(W=F((7, 6, 1))), ValueError, "W must be 2-D"),
    (dict(A=F((4, 6), "bfloat16")), TypeError, "A is bfloat16 but x is float32"),
    (dict(x=F((3, 6), "float64")), TypeError, "x must be float16, bfloat16 or float32, got float64"),
    (dict(B=F((7, 4), "int32")), TypeError, "B must be float16, bfloat16 or float32, got int32"),
    (dict(W=np.zeros((7, 6), np.float32)), TypeError, "W is host memory"),
    (dict(A=F((4, 6), device=1)), ValueError, "A is on cuda:1 but x is on cuda:0"),
    (dict(s=float("nan")), ValueError, "s must be finite"),
    (dict(s=True), TypeError, "s must be a real number"),
])
def test_lora_linear_argument_errors(over, exc, words):
    a = _linear_args(**over)
    with pytest.raises(exc) as e:
        cuda.lora_linear(a["x"], a["W"], a["A"], a["B"], a["s"])
    assert words in str(e.value)


def test_lora_linear_bias_and_framework_errors():
    a = _linear_args()
    with pytest.raises(ValueError, match=r"bias has shape \(6,\) but W has d_out=7"):
        cuda.lora_linear(a["x"], a["W"], a["A"], a["B"], 1.0, bias=F((6,)))
    with pytest.raises(TypeError, match="PyTorch tensors and CuPy arrays"):
        cuda.lora_linear(a["x"], a["W"], a["A"], a["B"], 1.0)  # a device array of no framework


def test_merge_argument_errors():
    with pytest.raises(ValueError, match=r"A has shape \(4, 5\) but W has d_in=6"):
        cuda.merge(F((7, 6)), F((4, 5)), F((7, 4)), 1.0)
    with pytest.raises(ValueError, match=r"B has shape \(7, 3\) but W and A need \(7, 4\)"):
        cuda.merge(F((7, 6)), F((4, 6)), F((7, 3)), 1.0)
    with pytest.raises(TypeError, match="B is float16 but W is float32"):
        cuda.merge(F((7, 6)), F((4, 6)), F((7, 4), "float16"), 1.0)


class FakeTorchDeviceArray(FakeDeviceArray):
    """A device array that claims to be PyTorch's (validation runs up to the first allocation)."""


FakeTorchDeviceArray.__module__ = "torch"
T = FakeTorchDeviceArray


def test_multi_argument_errors():
    x, W = T((5, 6)), T((7, 6))
    A_all, B_all = T((3, 4, 6)), T((3, 7, 4))
    with pytest.raises(ValueError, match=r"A_all has shape \(3, 4, 5\) but x has d_in=6"):
        cuda.lora_linear_multi(x, W, T((3, 4, 5)), B_all, [0] * 5, scales=1.0)
    with pytest.raises(ValueError, match=r"B_all has shape \(3, 7, 5\) but A_all and W need"):
        cuda.lora_linear_multi(x, W, A_all, T((3, 7, 5)), [0] * 5, scales=1.0)
    with pytest.raises(IndexError, match=r"adapter_ids\[2\] = 3 is out of range for 3 adapters"):
        cuda.lora_linear_multi(x, W, A_all, B_all, [0, -1, 3, 0, 1], scales=1.0)
    with pytest.raises(IndexError, match=r"adapter_ids\[0\] = -2"):
        cuda.lora_linear_multi(x, W, A_all, B_all, [-2, 0, 0, 0, 0], scales=1.0)
    with pytest.raises(TypeError, match="adapter_ids must be integers"):
        cuda.lora_linear_multi(x, W, A_all, B_all, [0.5] * 5, scales=1.0)
    with pytest.raises(ValueError, match=r"scales has shape \(2,\) but there are 3 adapters"):
        cuda.lora_linear_multi(x, W, A_all, B_all, [0] * 5, scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="scales must be finite"):
        cuda.lora_linear_multi(x, W, A_all, B_all, [0] * 5, scales=[1.0, np.inf, 2.0])
    with pytest.raises(ValueError, match=r"y has shape \(4, 7\) but x has shape \(5, 6\)"):
        cuda.lora_add_multi(T((4, 7)), x, A_all, B_all, [0] * 5, scales=1.0)


@pytest.mark.parametrize("kw, exc, words", [
    (dict(k=5), ValueError, "k must be in [1, min(m, n)] = [1, 4] for M of shape (9, 4), got 5"),
    (dict(k=0), ValueError, "k must be in [1, min(m, n)]"),  # as on the CPU (was [0, ...] here)
    (dict(k=-1), ValueError, "got -1"),
    (dict(k=2.0), TypeError, "k must be an integer"),
    (dict(k=2, method="krylov"), ValueError, "'subspace' only"),
    (dict(k=2, method="basic"), ValueError, "method must be one of"),
    (dict(k=2, normalizer="lu"), ValueError, "'qr' only"),
    (dict(k=2, n_iter="many"), ValueError, "n_iter must be"),
    (dict(k=2, n_iter=-1), ValueError, "n_iter must be"),
    (dict(k=2, oversample=-3), ValueError, "oversample must be"),
    (dict(k=2, seed=-1), ValueError, "seed must be"),
])
def test_rsvd_argument_errors(kw, exc, words):
    with pytest.raises(exc) as e:
        cuda.rsvd(T((9, 4)), **kw)
    assert words in str(e.value)


def test_rsvd_rejects_float64_with_advice():
    with pytest.raises(TypeError, match="float32"):
        cuda.rsvd(T((9, 4), "float64"), 2)


def test_n_iter_auto_rule():
    # "auto" on the GPU is the CPU's fixed-count rule (the GPU has no adaptive stop)
    from rslora import _core
    from rslora._validation import AUTO

    for k, m, n in ((5, 1000, 800), (100, 1000, 800), (64, 2048, 2048), (3, 20, 10)):
        assert cuda._n_iter(AUTO, k, m, n) == _core.rsvd_auto_iters("subspace", m, n, k, 10)
    assert cuda._n_iter(2, 100, 1000, 800) == 2


# --- helpers that run on the host ----------------------------------------------------------------

@pytest.mark.parametrize("shape, strides, ok", [
    ((3, 4), (4, 1), True),      # C order
    ((3, 4), (1, 3), True),      # Fortran order
    ((3, 4), (8, 1), True),      # row slice of a wider matrix
    ((3, 4), (1, 5), True),      # column-major with padding
    ((3, 4), (8, 2), False),     # every other column: no unit stride
    ((3, 4), (2, 1), False),     # rows overlap: not a valid leading dimension
    ((1, 4), (123, 1), True),    # one row: its stride is irrelevant
    ((3, 1), (7, 99), True),     # one column
    ((0, 4), (4, 1), True),
])
def test_blas_ok(shape, strides, ok):
    assert dev.blas_ok(shape, strides) is ok


def test_overlap_checks_with_torch_views():
    torch = pytest.importorskip("torch")
    fw = dev.Torch(torch)
    base = torch.zeros(10, 8)
    cuda._check_no_alias(fw, base[:5], "out", x=base[5:])  # disjoint halves
    with pytest.raises(ValueError, match="out overlaps W"):
        cuda._check_no_alias(fw, base[:5], "out", W=base[4:6])
    with pytest.raises(ValueError, match="out overlaps x"):
        cuda._check_no_alias(fw, base.T[2:4], "out", x=base[:, 3])
    assert fw.span(base[2:4, 1:3]) == (base.data_ptr() + 4 * 17, base.data_ptr() + 4 * 27)
    assert fw.view(base.T, (80,)) is None and fw.view(base, (80,)).shape == (80,)


def test_dtype_names():
    torch = pytest.importorskip("torch")
    assert dev.dtype_name(torch.zeros(1, dtype=torch.bfloat16)) == "bfloat16"
    assert dev.dtype_name(np.zeros(1, np.float16)) == "float16"


def test_is_available_never_raises():
    assert cuda.is_available() in (True, False)


@needs_module
def test_philox_known_answers():
    m = cuda._load()
    assert m.philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert m.philox4x32_10([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert m.philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
                           [0xA4093822, 0x299F31D0]) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                         0x24126EA1]


@needs_module
def test_no_gpu_is_a_clear_error_not_a_crash():
    if cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA error in cudaGetDeviceCount"):
        cuda.info()


# --- build options ------------------------------------------------------------------------------

def _configure(tmp_path, mode):
    """Configure cpp/src/cuda alone with cuBLAS out of reach; returns (returncode, output)."""
    src = tmp_path / "src"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(textwrap.dedent(f"""
        cmake_minimum_required(VERSION 3.18)
        project(probe LANGUAGES CXX)
        set(RSLORA_CUDA {mode})
        set(Python_EXECUTABLE /bin/false)  # no nvidia wheels to find
        add_subdirectory({ROOT / 'cpp/src/cuda'} cuda)
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("RSLORA_CUDA_LIBS", "CUDA_PATH")}
    p = subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "b")],
                       capture_output=True, text=True, env=env)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_build_option_auto_skips_and_on_fails(tmp_path):
    if os.path.exists("/usr/local/cuda/include/cublas_v2.h") or os.path.exists(
            "/usr/include/cublas_v2.h"):
        pytest.skip("this machine has cuBLAS in a system location")
    rc, out = _configure(tmp_path / "auto", "AUTO")
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if "rslora:" in ln]
    assert len(lines) == 1 and "CUDA module not built" in lines[0], out
    rc, out = _configure(tmp_path / "on", "ON")
    assert rc != 0 and "RSLORA_CUDA=ON but" in out, out


# --- on a GPU: the ops against float64 references --------------------------------------------------

@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2), ("float16", 4e-3)])
def test_gpu_ops_match_float64(dtype, tol):
    import torch

    g = torch.Generator().manual_seed(0)
    td = getattr(torch, dtype)
    n, d_in, d_out, r, na = 37, 70, 50, 6, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, W, A, B, bias = rnd(n, d_in), rnd(d_out, d_in) / 8, rnd(r, d_in) / 8, rnd(d_out, r), rnd(d_out)
    dx = lambda t: t.to(td).cuda()  # noqa: E731
    ref = lambda t: t.to(td).double()  # noqa: E731  the rounded inputs, in float64
    s = 0.7
    y, xa = cuda.lora_linear(dx(x), dx(W), dx(A), dx(B), s, bias=dx(bias), return_xa=True)
    want = ref(x) @ ref(W).T + ref(bias) + s * (ref(x) @ ref(A).T) @ ref(B).T
    scale = want.abs().max()
    assert (y.double().cpu() - want).abs().max() <= tol * scale
    assert (xa.double().cpu() - ref(x) @ ref(A).T).abs().max() <= tol * (ref(x) @ ref(A).T).abs().max()

    Wd = dx(W)
    cuda.merge(Wd, dx(A), dx(B), s)
    wm = ref(W) + s * ref(B) @ ref(A)
    assert (Wd.double().cpu() - wm).abs().max() <= tol * wm.abs().max() * 2

    A_all, B_all = rnd(na, r, d_in) / 8, rnd(na, d_out, r)
    ids = torch.randint(-1, na, (n,), generator=g)
    scales = [0.5, 1.0, 2.0]
    y = cuda.lora_linear_multi(dx(x), dx(W), dx(A_all), dx(B_all), ids.cuda(), scales=scales)
    want = ref(x) @ ref(W).T
    for i in range(n):
        a = int(ids[i])
        if a >= 0:
            want[i] += scales[a] * ref(B_all[a]) @ (ref(A_all[a]) @ ref(x[i]))
    assert (y.double().cpu() - want).abs().max() <= tol * want.abs().max()

    if dtype == "float32":
        M = rnd(120, 80) @ torch.diag(0.7 ** torch.arange(80.0, dtype=torch.float64)) @ rnd(80, 80)
        U, S, Vt = cuda.rsvd(M.float().cuda(), 10, seed=3)
        S_true = torch.linalg.svdvals(M)[:10]
        assert torch.allclose(S.double().cpu(), S_true, rtol=1e-4, atol=1e-6 * S_true[0])
        err = torch.linalg.norm(M - (U.double().cpu() * S.double().cpu()) @ Vt.double().cpu())
        opt = torch.linalg.norm(torch.linalg.svdvals(M)[10:])
        assert err <= opt * (1 + 1e-3) + 1e-5 * torch.linalg.norm(M)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_scale_zero_keeps_nan_and_inf(dtype):
    """scale = 0 on the GPU: NaN/Inf of the factors reach y and W as in NumPy's expression
    (0 * Inf = NaN), where cuBLAS, given alpha = 0, may skip the product."""
    import torch

    td = getattr(torch, dtype)
    x, W = torch.ones(3, 4, dtype=td).cuda(), torch.zeros(5, 4, dtype=td).cuda()
    A, B = torch.ones(2, 4, dtype=td), torch.ones(5, 2, dtype=td)
    A[1, 2], B[3, 0] = float("nan"), float("inf")
    y = cuda.lora_linear(x, W, A.cuda(), B.cuda(), 0.0).float().cpu()
    want = x.float().cpu() @ W.float().cpu().T + 0.0 * (x.float().cpu() @ A.float().T) @ B.float().T
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.isnan(y).any()
    Wd = W.clone()
    cuda.merge(Wd, A.cuda(), B.cuda(), 0.0)
    assert torch.equal(torch.isnan(Wd.float().cpu()), torch.isnan(0.0 * B.float() @ A.float()))
