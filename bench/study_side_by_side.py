"""The study's training runs on Dask against the fork process pool they replaced, side by side.

Runs ``rslora.study.run`` (full config unless ``--quick``) once per mode, each in a fresh
process, one after another, and prints wall time, CPU (this process and its children: the
workers), minor page faults and the load average; then checks that every mode gave the same
results.json bytes.

- ``dask``: the default of ``rslora study``, a LocalCluster of 2 workers (``workers=2``);
- ``pool``: the ``concurrent.futures`` fork pool of 2 workers that the study used before it ran
  on Dask (commit b625fb9^, kept here only to compare: one task per run, one BLAS thread);
- ``one``: this process (``workers=1``).

    python bench/study_side_by_side.py dask pool          # the full study, about 2 x 1 min idle
    python bench/study_side_by_side.py --quick dask pool one
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

MODES = ("dask", "pool", "one")


class _PoolRunner:
    """The study's runner before Dask (b625fb9^): a fork ProcessPoolExecutor, a task per run."""

    def __init__(self, workers: int, advance):
        self.workers, self.advance, self._pool = workers, advance, None

    def map(self, fn, cfg, jobs, cost=lambda job: 1.0):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if len(jobs) < 2:
            return [fn(cfg, job) for job in jobs]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("fork"),
                                             initializer=_one_blas_thread)
        futures = {self._pool.submit(fn, cfg, job): i for i, job in enumerate(jobs)}
        out = [None] * len(jobs)
        for f in as_completed(futures):
            out[futures[f]] = f.result()
            self.advance(cost(jobs[futures[f]]))
        return out


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    global _LIMIT  # the limit lasts as long as this object
    _LIMIT = threadpool_limits(limits=1)


def _run(mode: str, quick: bool, out: str) -> None:
    import distributed  # noqa: F401

    from rslora import study
    from rslora.study import parallel

    if mode == "pool":
        parallel.Runner = lambda client, advance: _PoolRunner(2, advance)  # type: ignore
    cfg = study.quick_config() if quick else study.full_config()
    t = time.perf_counter()
    res = study.run(cfg, progress=False, workers=2 if mode == "dask" else 1)
    wall = time.perf_counter() - t
    with open(out, "w") as f:
        f.write(study.output.dumps({k: v for k, v in res.items() if not k.startswith("_")}))
    print(f"{wall:.1f}")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    modes = [a for a in argv if a != "--quick"] or ["dask", "pool"]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"modes must be among {MODES}, got {bad}", file=sys.stderr)
        return 2
    texts = {}
    for mode in modes:
        out = f"/tmp/rslora-study-{mode}-{os.getpid()}.json"
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = subprocess.run([sys.executable, __file__, "--child", mode, str(quick), out],
                              check=True, capture_output=True, text=True).stdout.split()[-1]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        print(f"{mode:5} wall {float(wall):7.1f} s  CPU {cpu:7.1f} s (system "
              f"{after.ru_stime - before.ru_stime:.1f})  minor faults "
              f"{after.ru_minflt - before.ru_minflt:,}  load {load:.1f} -> {os.getloadavg()[0]:.1f}",
              flush=True)
        with open(out) as f:
            texts[mode] = f.read()
        os.unlink(out)
    same = len(set(texts.values())) == 1
    print("results.json: " + ("identical" if same else "DIFFERENT") + " across " + ", ".join(modes))
    return 0 if same else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _run(sys.argv[2], sys.argv[3] == "True", sys.argv[4])
    else:
        sys.exit(main(sys.argv[1:]))
