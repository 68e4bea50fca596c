"""The study's figures (matplotlib, drawn off-screen with the Agg canvas: no pyplot state)."""

from __future__ import annotations

import io
import os

import numpy as np

from .output import write_atomic

COLORS = {"standard": "#d62728", "rslora": "#1f77b4"}
LABELS = {"standard": "standard  α/r", "rslora": "rsLoRA  α/√r"}
KIND_COLORS = {"style": "#9467bd", "facts": "#2ca02c"}
FLOOR = 1e-16  # log axes cannot show an exact zero


def _figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 3.9):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def _log_labels(ax) -> None:
    """Label minor ticks too when a log axis spans only a decade or two."""
    from matplotlib.ticker import LogFormatterSciNotation

    ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False,
                                                         minor_thresholds=(2.5, 1.0)))


def _rank_axis(ax, ranks) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.minorticks_off()


def spectra(res: dict):
    fig, ax = _figure(2)
    for kind in ("style", "facts"):
        sp = res["spectra"][kind]
        S = np.asarray(sp["singular_values"])
        i = np.arange(1, len(S) + 1)
        c = KIND_COLORS[kind]
        ax[0, 0].loglog(i, np.maximum(S, 1e-300), color=c, label=f"{kind}: {sp['model']}")
        ax[0, 1].semilogx(i, sp["energy"], color=c, label=kind)
        for share, key, m in ((0.9, "rank_90", "o"), (0.99, "rank_99", "s")):
            r = sp[key]
            ax[0, 1].plot([r], [sp["energy"][r - 1]], m, color=c, mfc="none", ms=8)
            ax[0, 1].annotate(f"{r}", (r, sp["energy"][r - 1]), textcoords="offset points",
                              xytext=(4, -12), color=c, fontsize=8)
    for share in (0.9, 0.99):
        ax[0, 1].axhline(share, color="0.6", lw=0.8, ls=":")
    ax[0, 0].set(title="singular values (||Δ||_F = 1)", xlabel="index i + 1", ylabel="S_i",
                 ylim=(1e-6, 1.5))
    ax[0, 1].set(title="cumulative energy; ranks for 90% (○) and 99% (□)", xlabel="rank r",
                 ylabel="share of ||Δ||_F²", ylim=(0, 1.02))
    for a in ax[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return fig


def approximation(res: dict):
    fig, ax = _figure(2)
    for j, kind in enumerate(("style", "facts")):
        rows = res["approximation"][kind]
        a = ax[0, j]
        r = [row["r"] for row in rows]
        clip = lambda key: np.maximum([row[key] for row in rows], FLOOR)  # noqa: E731
        a.plot(r, clip("optimum"), "k-", lw=2, label="Eckart–Young optimum")
        a.plot(r, clip("rsvd_rslora"), "o", color=COLORS["rslora"], ms=7, mfc="none",
               label="lora_from_delta, rsLoRA scale inside factors")
        a.plot(r, clip("rsvd_standard"), "x", color=COLORS["standard"], ms=6,
               label="lora_from_delta, standard scale inside factors")
        a.plot(r, clip("writeup_scaled"), "--", color="#ff7f0e", marker="^",
               label="write-up: (α/√r) × rank-r approximation")
        vals = np.concatenate([clip("optimum"), clip("writeup_scaled")])
        if vals.max() / vals.min() > 100:  # style: many decades; facts: linear reads better
            a.set_yscale("log")
        else:
            a.set_ylim(0, None)
        _rank_axis(a, r)
        a.set(title=f"{kind}: relative error ||Δ − approx||_F / ||Δ||_F", xlabel="rank r")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    return fig


def _runs(res, kind, optimizer, rule):
    return sorted((x for x in res["dynamics"]["runs"] if x["target"] == kind
                   and x["optimizer"] == optimizer and x["rule"] == rule),
                  key=lambda x: x["rank"])


def loss_curves(res: dict):
    from matplotlib import colormaps

    dyn = res["dynamics"]
    kinds, opts = ("style", "facts"), ("sgd", "adam")
    ranks = res["config"]["ranks"]
    cmap = colormaps["viridis"]
    col = {r: cmap(i / max(len(ranks) - 1, 1) * 0.9) for i, r in enumerate(ranks)}
    fig, ax = _figure(2, 2, width=5.4, height=3.8)
    for i, kind in enumerate(kinds):
        for j, opt in enumerate(opts):
            a = ax[i, j]
            for rule, ls in (("rslora", "-"), ("standard", "--")):
                for run in _runs(res, kind, opt, rule):
                    loss = [np.nan if v is None else max(v, FLOOR) for v in run["loss"]]
                    a.plot(run["steps"], loss, ls, color=col[run["rank"]], lw=1.4)
            lr = dyn["learning_rates"][f"{opt}/{kind}"]["lr"]
            a.set(yscale="log", xlabel="step", ylabel="population loss ||sBA − Δ||²/||Δ||²",
                  title=f"{kind}, {opt.upper() if opt == 'sgd' else 'Adam'} (lr {lr:g})")
            a.grid(alpha=0.3)
    handles = [ax[0, 0].plot([], [], "-", color=col[r])[0] for r in ranks]
    handles += [ax[0, 0].plot([], [], ls, color="0.3")[0] for ls in ("-", "--")]
    fig.legend(handles, [f"r = {r}" for r in ranks] + ["rsLoRA α/√r", "standard α/r"],
               loc="outside right center", fontsize=8)
    return fig


def final_loss(res: dict):
    dyn = res["dynamics"]
    fig, ax = _figure(2, 2, width=5.0, height=3.6)
    for i, kind in enumerate(("style", "facts")):
        for j, opt in enumerate(("sgd", "adam")):
            a = ax[i, j]
            for rule in ("standard", "rslora"):
                runs = _runs(res, kind, opt, rule)
                r = [x["rank"] for x in runs]
                f = [np.nan if x["final_loss"] is None else max(x["final_loss"], FLOOR)
                     for x in runs]
                a.plot(r, f, "o-", color=COLORS[rule], label=LABELS[rule])
            opt_r = res["config"]["ranks"]
            lows = [x["final_loss"] for x in res["dynamics"]["runs"] if x["target"] == kind
                    and x["optimizer"] == opt and x["final_loss"] is not None]
            bottom = min(lows) / 10
            best = [max(v, bottom / 10) for v in dyn["optimum"][kind]]
            a.plot(opt_r, best, ":", color="k", label="best rank-r fit (Eckart–Young)")
            a.set_ylim(bottom, 2)
            a.set(yscale="log", xlabel="rank r", ylabel="final population loss",
                  title=f"{kind}, {'SGD' if opt == 'sgd' else 'Adam'}: "
                        f"{res['config']['steps']} steps")
            _rank_axis(a, opt_r)
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    return fig


def grad_norm(res: dict):
    fig, ax = _figure(2)
    for j, kind in enumerate(("style", "facts")):
        probe = res["dynamics"]["grad_norm"][kind]
        a = ax[0, j]
        for rule in ("standard", "rslora"):
            p = probe[rule]
            a.plot(p["ranks"], p["grad_norm"], "o", color=COLORS[rule],
                   label=f"{LABELS[rule]}: measured slope {p['slope']:+.3f}")
            a.plot(p["ranks"], p["expected"], "-", color=COLORS[rule], alpha=0.6,
                   label=f"expected, slope {p['slope_theory']:+g}")
        a.set(yscale="log", xlabel="rank r", ylabel="||∂L/∂B||_F at initialisation",
              title=f"{kind}: gradient of B at init (B = 0)")
        _log_labels(a)
        _rank_axis(a, probe["standard"]["ranks"])
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    return fig


def one_step(res: dict):
    fig, ax = _figure(2)
    probe = res["dynamics"]["one_step"]["facts"]
    for j, opt in enumerate(("sgd", "adam")):
        a = ax[0, j]
        for rule in ("standard", "rslora"):
            p = probe[f"{opt}/{rule}"]
            r = np.asarray(p["ranks"], dtype=float)
            a.plot(r, p["change"], "o", color=COLORS[rule],
                   label=f"{LABELS[rule]}: measured slope {p['slope']:+.3f}")
            ref = p["change"][0] * (r / r[0]) ** p["slope_theory"]
            a.plot(r, ref, "-", color=COLORS[rule], alpha=0.5,
                   label=f"slope {p['slope_theory']:+g}")
        a.set(yscale="log", xlabel="rank r", ylabel="||Δf(x)|| / ||Δx|| after one step",
              title=f"facts, {'SGD' if opt == 'sgd' else 'Adam'} (lr {p['lr']:g}): "
                    "output change after one step")
        _log_labels(a)
        _rank_axis(a, probe["sgd/standard"]["ranks"])
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    return fig


FIGURES = {
    "spectra.png": spectra,
    "approximation.png": approximation,
    "loss_curves.png": loss_curves,
    "final_loss.png": final_loss,
    "grad_norm.png": grad_norm,
    "one_step.png": one_step,
}


def write_all(res: dict, out_dir: str) -> list:
    for name, draw in FIGURES.items():
        _save(draw(res), os.path.join(out_dir, name))
    return list(FIGURES)
