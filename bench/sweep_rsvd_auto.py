"""Sweep of rsvd(n_iter="auto")'s accuracy contract against a float64 SVD of the same matrix.

The contract: ||M - U diag(S) Vt||_F <= (1 + auto_tol) x ||M - M_k||_F (Eckart-Young), up to
the rounding of M's dtype (added in quadrature: 10 u ||M||_F, negligible against any optimum
the contract is meant for). A call that misses it must warn (RuntimeWarning naming the
estimated ratio); a miss with no warning is a *silent* miss, the defect this sweep hunts.

    python bench/sweep_rsvd_auto.py                 # the whole sweep (a few minutes, idle)
    python bench/sweep_rsvd_auto.py --quick         # one seed, fewer k and shapes
    python bench/sweep_rsvd_auto.py --json out.json # every case: ratio, iterations, path, warning
    python bench/sweep_rsvd_auto.py --bench         # iterations on bench_svd.py's spectra

Matrices are U diag(s) V^T with random orthogonal U, V (QR of Gaussians) and the spectra below,
on shapes 600 x 600, 300 x 900, 900 x 300, 80 x 200 (p = short side); k from 2 to 128 (where
2 (k + 10) < p: past that rsvd sketches the whole short side, exactly); per k the defaults
(oversample 10, auto_tol 1e-3) and one change at a time: oversample 0, 5, 30; auto_tol 1e-2,
1e-4; float32 and float64; seeds 0..S-1 (of both the matrix and rsvd).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import defaultdict

import numpy as np
import scipy.linalg

import rslora
from rslora import _core

SHAPES = [(600, 600), (300, 900), (900, 300), (80, 200)]
KS = [2, 3, 8, 16, 32, 64, 96, 128]
SETTINGS = [(10, 1e-3), (0, 1e-3), (5, 1e-3), (30, 1e-3), (10, 1e-2), (10, 1e-4)]


def spectra(p: int, k: int) -> dict[str, np.ndarray]:
    """Singular values (length p, not necessarily sorted) by family/name; None: Gaussian."""
    i = np.arange(p, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for a in (0.25, 0.5, 0.75, 1.0):
        out[f"power/{a}"] = (1 + i) ** -a
    for a in (0.25, 0.5, 1.0):  # a step down by f at index k + d
        for f in (0.3, 0.6):
            for d in (-2, 0, 3):
                if k + d > 0:
                    out[f"step/{a}x{f}@k{d:+d}"] = (1 + i) ** -a * np.where(i < k + d, 1.0, f)
    for r in (3.0, 8.0, 30.0):
        out[f"exp/{r:g}"] = np.exp(-i / r)
    for r_off in (-4, 0, 4):  # rank k + r_off signal over a slowly rising floor
        for fl in (0.01, 0.05):
            out[f"floor/r{r_off:+d}f{fl:g}"] = (np.where(i < max(k + r_off, 1), 1.0, 0.0)
                                               + fl * (1 + i / p))
    out["floor/power-to-0.08"] = np.maximum((1 + i) ** -0.5, 0.08)
    for c in (-2, 0, 4, 15):  # flat to k + c, then 1e-2 (1+i)^-1/2
        if k + c > 0:
            out[f"cliff/k{c:+d}"] = np.where(i < k + c, 1.0, 1e-2 * (1 + i) ** -0.5)
    out["gaussian"] = None  # type: ignore[assignment]
    return out


_UV: dict = {}


def matrix(s, m: int, n: int, dtype, seed: int) -> np.ndarray:
    """U diag(sorted s) V^T; U, V random orthogonal, one pair per shape and seed (cached)."""
    rng = np.random.default_rng([seed, m, n])
    if s is None:
        return rng.standard_normal((m, n)).astype(dtype)
    if (m, n, seed) not in _UV:
        p = min(m, n)
        _UV.clear()
        _UV[(m, n, seed)] = (np.linalg.qr(rng.standard_normal((m, p)))[0],
                             np.linalg.qr(rng.standard_normal((n, p)))[0])
    U, V = _UV[(m, n, seed)]
    return ((U * np.sort(s)[::-1]) @ V.T).astype(dtype)


def run_case(M, M64, sig, normM, k, oversample, tol, seed):
    """(ratio, floor-adjusted ratio, warned, estimated ratio or None, iterations, krylov)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        U, S, Vt = rslora.rsvd(M, k, oversample=oversample, auto_tol=tol, seed=seed)
    warned = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    it, kr = _core.rsvd_last_n_iter(), _core.rsvd_last_krylov()
    opt2 = float(np.sum(sig[k:] ** 2))
    R = M64 - (U.astype(np.float64) * S.astype(np.float64)) @ Vt.astype(np.float64)
    err2 = float(np.einsum("ij,ij->", R, R))
    rnd = 10 * np.finfo(M.dtype).eps / 2 * normM
    ratio = np.sqrt(err2 / opt2) if opt2 > 0 else (1.0 if err2 <= rnd * rnd else np.inf)
    adj = np.sqrt(max(err2 - rnd * rnd, 0.0) / opt2) if opt2 > 0 else 1.0
    return float(ratio), float(adj), bool(warned), (str(warned[0].message) if warned else ""), it, kr


def sweep(seeds: int, ks, shapes, settings, families=None, out=None, verbose=True):
    rows = []
    t0 = time.time()
    for (m, n) in shapes:
        p = min(m, n)
        for seed in range(seeds):
            for k in ks:
                if 2 * (k + 10) >= p:
                    continue
                for name, s in spectra(p, k).items():
                    if families and name.split("/")[0] not in families:
                        continue
                    for dtype in (np.float32, np.float64):
                        M = matrix(s, m, n, dtype, seed)
                        M64 = M.astype(np.float64)
                        sig = scipy.linalg.svd(M64, compute_uv=False, check_finite=False)
                        normM = float(np.sqrt(np.sum(sig ** 2)))
                        for (os_, tol) in settings:
                            r, adj, warned, msg, it, kr = run_case(M, M64, sig, normM, k, os_, tol,
                                                                   seed)
                            rows.append(dict(shape=[m, n], k=k, spec=name,
                                             dtype=np.dtype(dtype).name, seed=seed, oversample=os_,
                                             tol=tol, ratio=r, adj=adj, warned=warned, msg=msg,
                                             iters=it, krylov=kr))
        if verbose:
            print(f"  {m}x{n}: {len(rows)} cases, {time.time() - t0:.0f} s", file=sys.stderr)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f)
    return rows


def report(rows):
    """Worst ratio / (1 + tol) per family; silent misses listed."""
    worst: dict = defaultdict(lambda: (0.0, None))
    silent, warned_ok, warned_miss, cap = [], 0, 0, 0
    for r in rows:
        fam = r["spec"].split("/")[0]
        rel = r["adj"] / (1 + r["tol"])
        if rel > worst[fam][0]:
            worst[fam] = (rel, r)
        miss = rel > 1
        cap += r["iters"] >= 12
        if miss and not r["warned"]:
            silent.append(r)
        elif r["warned"]:
            warned_miss += miss
            warned_ok += not miss
    print(f"{len(rows)} cases; silent misses {len(silent)}; warned {warned_ok + warned_miss} "
          f"(of which real misses {warned_miss}); at the 12-iteration cap {cap}")
    print("worst adj. ratio / (1 + auto_tol) per family:")
    for fam, (rel, r) in sorted(worst.items()):
        print(f"  {fam:10s} {rel:.5f}  {_fmt(r)}")
    silent.sort(key=lambda r: -r["adj"] / (1 + r["tol"]))
    for r in silent[:40]:
        print(f"  SILENT {r['adj'] / (1 + r['tol']):.5f}  {_fmt(r)}")
    return silent


def _fmt(r):
    if r is None:
        return ""
    return (f"{r['spec']} {r['shape'][0]}x{r['shape'][1]} k={r['k']} {r['dtype']} os={r['oversample']} "
            f"tol={r['tol']:g} seed={r['seed']} iters={r['iters']}{' K' if r['krylov'] else ''}"
            f" ratio={r['ratio']:.5f}{' [warned: ' + r['msg'][:60] + ']' if r['warned'] else ''}")


def bench_spectra():
    """rsvd's defaults on bench_svd.py's spectra (k = 64, oversample 10, float32, seed 0): the
    iterations, the path and the ratio, the pass counts a change of the rule must keep."""
    import bench_svd

    probs = bench_svd._Problems()
    for n in bench_svd.SIZES:
        for spec in bench_svd.SPECTRA:
            M, opt, _ = probs.get(n, spec)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                U, S, Vt = rslora.rsvd(M, bench_svd.K, seed=0)
            it, kr = _core.rsvd_last_n_iter(), _core.rsvd_last_krylov()
            print(f"  {spec:6s} {n}: n_iter {it}{' Krylov' if kr else ''}, "
                  f"ratio {bench_svd._ratio(M, U, S, Vt, opt):.6f}"
                  f"{', warned' if caught else ''}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, k in {2, 8, 32, 96}, no 600 x 600")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--families", nargs="*", help="only these spectrum families")
    ap.add_argument("--json", help="write every case here")
    ap.add_argument("--bench", action="store_true", help="only bench_svd.py's spectra")
    a = ap.parse_args(argv)
    if a.bench:
        return bench_spectra()
    seeds, ks, shapes = (1, [2, 8, 32, 96], SHAPES[1:]) if a.quick else (a.seeds, KS, SHAPES)
    silent = report(sweep(seeds, ks, shapes, SETTINGS, a.families, a.json))
    return 1 if silent else 0


if __name__ == "__main__":
    sys.exit(main())
