"""Check every GPU op of rslora.cuda against a float64 CPU reference, then time it against torch.

    python bench/gpu_check.py [--quick]

Builds nothing: it uses the installed rslora (built with its CUDA module). Part 1 runs each op
on fresh random inputs, with every output (and the allocator's free memory) poisoned with NaN
first, and compares with float64 arithmetic on the same rounded inputs; any mismatch makes the
exit status 1. Part 2 times the ops with CUDA events against torch (F.linear alone, F.linear +
the PEFT LoRA path, addmm_ for merge, a per-adapter loop for multi-LoRA, torch.svd_lowrank at
equal accuracy) and prints one table of medians and ratios. Without a GPU it says so, exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys

FAILS: list[str] = []
ROWS: list[tuple] = []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller timing sizes")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu_check: SKIPPED (torch is not installed)")
        return 0
    from rslora import cuda

    if not torch.cuda.is_available() or not cuda.is_available():
        why = "torch sees no GPU" if not torch.cuda.is_available() else "rslora.cuda unavailable"
        try:
            cuda.info()
        except (ImportError, RuntimeError) as e:
            why += f": {e}"
        print(f"gpu_check: SKIPPED ({why})")
        return 0
    print("devices:", cuda.info()["devices"], "| torch", torch.__version__)
    check_all(torch, cuda)
    time_all(torch, cuda, quick=args.quick)
    if FAILS:
        print(f"\n{len(FAILS)} MISMATCHES:")
        for f in FAILS:
            print("  " + f)
        return 1
    print("\nall checks passed")
    return 0


# --- part 1: correctness -------------------------------------------------------------------------

TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def poison(torch):
    """Fill the caching allocator's free blocks with NaN so a kernel that skips a write shows."""
    free = torch.cuda.mem_get_info()[0]
    t = torch.empty(min(free // 4, 1 << 30) // 4, dtype=torch.float32, device="cuda")
    t.fill_(float("nan"))
    del t


def compare(name, got, want, dtype, scale=None):
    got = got.double().cpu()
    want = want.double()
    scale = float(want.abs().max()) if scale is None else scale
    err = float((got - want).abs().max()) if want.numel() else 0.0
    ok = got.shape == want.shape and math.isfinite(err) and err <= TOL[dtype] * max(scale, 1e-30)
    print(f"  {'ok ' if ok else 'BAD'} {name:<48} {dtype:<9} max err / max |ref| = "
          f"{err / max(scale, 1e-30):.2e}")
    if not ok:
        FAILS.append(f"{name} {dtype}: err {err:.3e} (scale {scale:.3e})")


def check_all(torch, cuda):
    import rslora

    g = torch.Generator().manual_seed(20240607)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    print("\ncorrectness against float64 (inputs rounded to the dtype first):")
    for dtype in ("float32", "bfloat16", "float16"):
        td = getattr(torch, dtype)
        dx = lambda t: t.to(td).cuda()  # noqa: E731
        rd = lambda t: t.to(td).double()  # noqa: E731
        for (n, d_in, d_out, r) in [(129, 257, 191, 8), (1, 64, 32, 1), (300, 96, 40, 0),
                                    (0, 16, 8, 4)]:
            x, W, A, B, b = (rnd(n, d_in), rnd(d_out, d_in, s=d_in ** -0.5),
                             rnd(r, d_in, s=d_in ** -0.5), rnd(d_out, r), rnd(d_out))
            s = 16 / math.sqrt(max(r, 1))
            poison(torch)
            out = torch.full((n, d_out), float("nan"), dtype=td, device="cuda")
            y, xa = cuda.lora_linear(dx(x), dx(W), dx(A), dx(B), s, bias=dx(b), out=out,
                                     return_xa=True)
            want = rd(x) @ rd(W).T + rd(b) + s * (rd(x) @ rd(A).T) @ rd(B).T
            compare(f"lora_linear n={n} d_in={d_in} d_out={d_out} r={r}", y, want, dtype)
            compare(f"  return_xa (x A^T) r={r}", xa, rd(x) @ rd(A).T, dtype)
        # layouts: 3-D x, transposed (Fortran) W, strided x, strided out, top-level dispatch
        x, W, A, B = rnd(4, 33, 80), rnd(64, 80, s=0.1), rnd(8, 80, s=0.1), rnd(64, 8)
        xd = dx(x)
        Wf = dx(W.T.contiguous()).T           # column-major W
        xs = dx(rnd(4, 33, 160))[:, :, ::2]   # no unit stride: copied on the device
        out = torch.full((4, 33, 128), float("nan"), dtype=td, device="cuda")[:, :, ::2]
        poison(torch)
        y = rslora.lora_linear(xd, Wf, dx(A), dx(B), alpha=16)
        want = rd(x) @ rd(W).T + 16 / math.sqrt(8) * (rd(x) @ rd(A).T) @ rd(B).T
        compare("rslora.lora_linear 3-D x, Fortran W (dispatch)", y, want, dtype)
        y = cuda.lora_linear(xs, dx(W), dx(A), dx(B), 0.5, out=out)
        xs64 = xs.double().cpu()
        compare("lora_linear strided x and strided out", y,
                xs64 @ rd(W).T + 0.5 * (xs64 @ rd(A).T) @ rd(B).T, dtype)
        # merge / unmerge in place
        W, A, B = rnd(96, 72), rnd(12, 72), rnd(96, 12)
        Wd = dx(W)
        rslora.merge(Wd, dx(A), dx(B), scale=0.3)
        compare("merge W += s B A", Wd, rd(W) + 0.3 * rd(B) @ rd(A), dtype)
        Wt = dx(W.T.contiguous()).T
        cuda.merge(Wt, dx(A), dx(B), -1.25)
        compare("merge into a column-major W", Wt, rd(W) - 1.25 * rd(B) @ rd(A), dtype)
        # multi-adapter: unsorted ids, -1 rows, an unused adapter, r not a multiple of the tiles
        for (n, d_in, d_out, r, na) in [(203, 136, 150, 12, 5), (17, 40, 300, 70, 2)]:
            x, W, b = rnd(n, d_in), rnd(d_out, d_in, s=d_in ** -0.5), rnd(d_out)
            A_all, B_all = rnd(na, r, d_in, s=d_in ** -0.5), rnd(na, d_out, r)
            ids = torch.randint(-1, na - 1, (n,), generator=g)  # adapter na-1 unused
            sc = [0.5 + i for i in range(na)]
            poison(torch)
            out = torch.full((n, d_out), float("nan"), dtype=td, device="cuda")
            y = cuda.lora_linear_multi(dx(x), dx(W), dx(A_all), dx(B_all), ids.cuda(), scales=sc,
                                       bias=dx(b), out=out)
            want = rd(x) @ rd(W).T + rd(b)
            base = want.clone()
            for a in range(na):
                rows = ids == a
                want[rows] += sc[a] * (rd(x)[rows] @ rd(A_all[a]).T) @ rd(B_all[a]).T
            compare(f"lora_linear_multi n={n} r={r} adapters={na}", y, want, dtype)
            y0 = dx(base)
            cuda.lora_add_multi(y0, dx(x), dx(A_all), dx(B_all), ids.numpy(), scales=sc)
            compare("lora_add_multi (host ids) in place", y0, want, dtype,
                    scale=float(want.abs().max()) * 1.01)
        try:
            cuda.lora_linear_multi(dx(x), dx(W), dx(A_all), dx(B_all),
                                   torch.full((n,), na, device="cuda"), scales=sc)
            FAILS.append("multi: out-of-range device id not rejected")
        except IndexError as e:
            print(f"  ok  out-of-range device id -> IndexError: {e}")

    # rsvd: known singular values; error against the Eckart-Young optimum
    for (m, n, k, decay) in [(500, 300, 20, 0.85), (257, 513, 7, 0.97)]:
        U0, _ = torch.linalg.qr(rnd(m, min(m, n)))
        V0, _ = torch.linalg.qr(rnd(n, min(m, n)))
        sv = decay ** torch.arange(min(m, n), dtype=torch.float64)
        M = (U0 * sv) @ V0.T
        for dtype in ("float32", "bfloat16"):
            td = getattr(torch, dtype)
            Md = M.to(td).cuda()
            poison(torch)
            U, S, Vt = cuda.rsvd(Md, k, seed=7, n_iter=4)
            Mr = M.to(td).double()
            s_true = torch.linalg.svdvals(Mr)
            opt = float(torch.linalg.norm(s_true[k:]))
            err = float(torch.linalg.norm(Mr - (U.double().cpu() * S.double().cpu())
                                          @ Vt.double().cpu()))
            ortho = float((U.double().cpu().T @ U.double().cpu() - torch.eye(k)).abs().max())
            tol = 1e-3 if dtype == "float32" else 2e-2
            s_err = float((S.double().cpu() - s_true[:k]).abs().max()) / float(s_true[0])
            ok = (err <= opt * 1.01 and ortho < 10 * tol and s_err <= tol
                  and bool((S[:-1] >= S[1:]).all()))
            print(f"  {'ok ' if ok else 'BAD'} rsvd m={m} n={n} k={k} {dtype:<9} error / optimum = "
                  f"{err / opt:.6f}, |S - S_true| / S_1 = {s_err:.1e}, |U^T U - I| = {ortho:.1e}")
            if not ok:
                FAILS.append(f"rsvd {dtype} m={m} n={n}: err/opt {err / opt}, S err {s_err}, "
                             f"ortho {ortho}")
    a = cuda.rsvd(M.float().cuda(), 5, seed=11)[1]
    b = cuda.rsvd(M.float().cuda(), 5, seed=11)[1]
    if not torch.equal(a, b):
        FAILS.append("rsvd: the same seed gave different results")


# --- part 2: timing ------------------------------------------------------------------------------

def timed(torch, fn, reps=20):
    """Median milliseconds of fn() over reps, measured with CUDA events after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def row(case, ours, ref_name, ref):
    ROWS.append((case, ours, ref_name, ref))


def time_all(torch, cuda, quick=False):
    import torch.nn.functional as F

    N = 1024 if quick else 4096
    for dtype in ("bfloat16", "float16", "float32"):
        td = getattr(torch, dtype)
        x = torch.randn(N, N, dtype=td, device="cuda")
        W = torch.randn(N, N, dtype=td, device="cuda") / 64
        A = torch.randn(64, N, dtype=td, device="cuda") / 64
        B = torch.randn(N, 64, dtype=td, device="cuda")
        out = torch.empty(N, N, dtype=td, device="cuda")
        s = 2.0
        t_ours = timed(torch, lambda: cuda.lora_linear(x, W, A, B, s, out=out))
        t_base = timed(torch, lambda: F.linear(x, W))
        t_peft = timed(torch, lambda: F.linear(x, W) + F.linear(F.linear(x, A), B) * s)
        case = f"lora_linear n=d_in=d_out={N} r=64 {dtype}"
        row(case, t_ours, "torch F.linear (base alone)", t_base)
        row(case, t_ours, "torch F.linear + LoRA (PEFT)", t_peft)
        Wm = W.clone()
        t_merge = timed(torch, lambda: cuda.merge(Wm, A, B, 1e-3))
        t_addmm = timed(torch, lambda: Wm.addmm_(B, A, alpha=1e-3))
        row(f"merge d={N} r=64 {dtype}", t_merge, "torch addmm_", t_addmm)
        if dtype == "bfloat16":
            na, r = 8, 16
            A_all = torch.randn(na, r, N, dtype=td, device="cuda") / 64
            B_all = torch.randn(na, N, r, dtype=td, device="cuda")
            ids = torch.randint(-1, na, (N,), device="cuda")
            sc = torch.linspace(0.5, 2, na, device="cuda")

            def torch_multi():
                y = F.linear(x, W)
                for a in range(na):
                    rows = (ids == a).nonzero().squeeze(1)
                    xr = x.index_select(0, rows)
                    y.index_add_(0, rows, F.linear(F.linear(xr, A_all[a]), B_all[a]) * sc[a])
                return y

            t_multi = timed(torch, lambda: cuda.lora_linear_multi(x, W, A_all, B_all, ids,
                                                                  scales=sc, out=out))
            row(f"lora_linear_multi n={N} 8 adapters r=16 {dtype}", t_multi,
                "torch per-adapter loop", timed(torch, torch_multi))
            row(f"lora_linear_multi n={N} 8 adapters r=16 {dtype}", t_multi,
                "torch F.linear (base alone)", t_base)
        x = W = A = B = out = None  # frees GPU memory (not del: lambdas name them)

    # rsvd vs torch.svd_lowrank at equal accuracy (float32, known spectrum)
    m = n = 2048 if quick else 4096
    k = 64
    for decay, label in ((0.9, "fast decay"), (0.995, "slow decay")):
        U0, _ = torch.linalg.qr(torch.randn(m, m, device="cuda"))
        V0, _ = torch.linalg.qr(torch.randn(n, n, device="cuda"))
        sv = decay ** torch.arange(min(m, n), dtype=torch.float32, device="cuda")
        M = (U0 * sv) @ V0.T
        del U0, V0
        opt = float(torch.linalg.norm(sv[k:].double()))
        nrm = float(torch.linalg.norm(M.double()))

        def rel_excess(U, S, Vt):
            R = M.double() - (U.double() * S.double()) @ Vt.double()
            return float(torch.linalg.norm(R)) / opt - 1.0

        ours, theirs = {}, {}
        for q in (0, 1, 2, 3, 4, 6):
            U, S, Vt = cuda.rsvd(M, k, n_iter=q, seed=1, check_finite=False)
            ours[q] = (rel_excess(U, S, Vt),
                       timed(torch, lambda: cuda.rsvd(M, k, n_iter=q, seed=1,
                                                      check_finite=False), reps=5))
            U, S, V = torch.svd_lowrank(M, q=k + 10, niter=q)
            theirs[q] = (rel_excess(U[:, :k], S[:k], V[:, :k].T),
                         timed(torch, lambda: torch.svd_lowrank(M, q=k + 10, niter=q), reps=5))
        # the accuracy torch reaches with its default niter=2; each side's fastest setting at it
        target = max(theirs[2][0], 1e-6)
        t_ours = min(t for e, t in ours.values() if e <= target * 1.0001) if any(
            e <= target * 1.0001 for e, _ in ours.values()) else float("nan")
        t_theirs = min(t for e, t in theirs.values() if e <= target * 1.0001)
        row(f"rsvd {m}x{n} k=64 {label} (excess error <= {target:.1e}; |M|/opt={nrm / opt:.1f})",
            t_ours, "torch.svd_lowrank same accuracy", t_theirs)
        M = None

    print("\ntiming (CUDA events, median ms; ratio = torch / rslora, > 1 means rslora is faster):")
    w = max(len(r[0]) for r in ROWS)
    print(f"{'case':<{w}}  {'rslora':>9}  {'reference':<31} {'ref':>9}  {'ratio':>6}")
    for case, ours, name, ref in ROWS:
        print(f"{case:<{w}}  {ours:9.3f}  {name:<31} {ref:9.3f}  {ref / ours:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
