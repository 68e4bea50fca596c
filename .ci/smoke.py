"""Smoke test of an installed rslora wheel in a bare venv (.ci/wheel): it imports, says which BLAS
it bound, computes right against NumPy, and its commands name the extra they are missing."""

import os
import subprocess
import sys

import numpy as np

import rslora

assert "site-packages" in rslora.__file__, f"not the installed wheel: {rslora.__file__}"
cfg = rslora.show_config()
assert cfg["blas"]["path"], cfg

rng = np.random.default_rng(0)
x, W = rng.standard_normal((7, 33)), rng.standard_normal((19, 33))
A, B = rng.standard_normal((4, 33)), rng.standard_normal((19, 4))
for dt, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
    ref = x @ W.T + 2.0 * (x @ A.T) @ B.T  # float64 reference
    y = rslora.lora_linear(x.astype(dt), W.astype(dt), A.astype(dt), B.astype(dt), alpha=4.0)
    assert y.dtype == dt and y.shape == ref.shape
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err < tol, (dt, err)

# A 60 x 40 matrix of exact rank 5: rsvd's factors match NumPy's SVD.
M = rng.standard_normal((60, 5)) @ np.diag([10.0, 5.0, 2.0, 1.0, 0.5]) @ rng.standard_normal((5, 40))
U, S, Vt = rslora.rsvd(M, 5, seed=0)
S_ref = np.linalg.svd(M, compute_uv=False)[:5]
assert np.allclose(S, S_ref, rtol=1e-10, atol=0), (S, S_ref)
assert np.linalg.norm(U * S @ Vt - M) < 1e-10 * np.linalg.norm(M)

# The command line: `config` runs; `study` without the [cli] extra says so at once (exit 2).
exe = os.path.join(os.path.dirname(sys.executable), "rslora")
subprocess.run([exe, "config"], check=True, capture_output=True)
p = subprocess.run([exe, "study", "--out", os.devnull + "-never"], capture_output=True, text=True)
try:
    import matplotlib  # noqa: F401
except ImportError:
    assert p.returncode == 2 and "pip install 'rslora[cli]'" in p.stderr, p.stderr
print(f"smoke: OK (rslora {rslora.__version__}, lora_linear and rsvd agree with NumPy)")
