"""rslora's GEMMs run on NumPy's own BLAS (one thread pool), governed by threadpoolctl."""

import os
import subprocess
import sys

import numpy as np
import pytest

import rslora


def test_bound_to_numpys_blas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    cfg = rslora.show_config(print_=False)["blas"]
    numpy_libs = [i["filepath"] for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"]
    assert cfg["path"] in numpy_libs
    if "numpy.libs" in numpy_libs[0] or "numpy" in os.path.dirname(numpy_libs[0]):
        assert cfg["source"] == "numpy"
    # NumPy's wheels vendor scipy-openblas64: prefixed, suffixed, 64-bit integers.
    if "scipy_openblas64" in cfg["path"]:
        assert cfg["symbol_prefix"] == "scipy_" and cfg["symbol_suffix"] == "64_" and cfg["int64"]


def test_threadpoolctl_governs_rslora_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = rslora.show_config(print_=False)["blas"]["num_threads"]
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert rslora.show_config(print_=False)["blas"]["num_threads"] == 1
        x = np.ones((8, 8))
        y = rslora.lora_linear(x, np.eye(8), np.ones((1, 8)), np.ones((8, 1)), scale=1.0)
        np.testing.assert_allclose(y, 1 + 8 * np.ones((8, 8)))
    assert rslora.show_config(print_=False)["blas"]["num_threads"] == before


def test_show_config_prints(capsys):
    cfg = rslora.show_config()
    out = capsys.readouterr().out
    assert cfg["blas"]["path"] in out and "threads" in out


def _run(code: str, **env) -> str:
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          check=True).stdout


def test_bundled_fallback_works_and_says_so():
    code = ("import numpy as np, rslora; c = rslora.show_config(print_=False)['blas'];"
            "print(c['source']); print(c['path']);"
            "x = np.random.default_rng(0).standard_normal((7, 9)).astype(np.float32);"
            "W = np.random.default_rng(1).standard_normal((5, 9)).astype(np.float32);"
            "A = np.ones((2, 9), np.float32); B = np.ones((5, 2), np.float32);"
            "y = rslora.lora_linear(x, W, A, B, scale=0.5);"
            "ref = x.astype(float) @ W.T.astype(float) + 0.5 * (x.astype(float) @ A.T) @ B.T;"
            "print(float(abs(y - ref).max()))")
    out = _run(code, RSLORA_BLAS="bundled").split("\n")
    assert out[0] == "bundled"
    assert "scipy_openblas" in out[1] and "openblas64" not in out[1]
    assert float(out[2]) < 1e-4


def test_import_needs_no_environment():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RSLORA", "OPENBLAS"))}
    out = subprocess.run([sys.executable, "-c", "import rslora; print(rslora.scale(16, 4))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "8.0"
