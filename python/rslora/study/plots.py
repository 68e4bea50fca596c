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


OPT_NAME = {"sgd": "SGD", "adam": "Adam"}


def _rank_colors(ranks):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {r: cmap(i / max(len(ranks) - 1, 1) * 0.9) for i, r in enumerate(ranks)}


def lr_map(res: dict):
    """Final loss relative to its own optimum vs learning rate, one panel per optimizer x rule
    (ranks below d): each curve touches 1 at its lr*, so the panel shows lr* moving with r."""
    from matplotlib.ticker import NullFormatter

    m = res["lr_map"]
    ranks = m["fit_ranks"]
    col = _rank_colors(ranks)
    fig, ax = _figure(2, 2, width=5.0, height=3.7)
    for i, o in enumerate(("sgd", "adam")):
        for j, rule in enumerate(("standard", "rslora")):
            a = ax[i, j]
            cell = m["cells"][f"{o}/{rule}"]
            for r in ranks:
                k = m["ranks"].index(r)
                for rep, searches in enumerate(cell["searches"]):
                    s = searches[k]
                    rel = [np.nan if v is None else v / s["best_loss"] for v in s["final_loss"]]
                    a.plot(s["lr"], rel, "-o" if rep == 0 else ":", color=col[r], ms=2.5,
                           lw=1.4 if rep == 0 else 0.9, alpha=1 if rep == 0 else 0.6,
                           label=f"r = {r}" if rep == 0 else None)
                    a.axvline(s["optimum_lr"], color=col[r], lw=0.6, alpha=0.5)
            a.set(xscale="log", yscale="log", xlabel="learning rate", ylim=(0.97, 2.5),
                  ylabel="final loss / its minimum over lr",
                  title=f"{OPT_NAME[o]}, {LABELS[rule]}")
            a.xaxis.set_minor_formatter(NullFormatter())
            _log_labels(a)
            a.grid(alpha=0.3)
            a.legend(fontsize=7, title="seed 0 solid, others dotted;\nthin lines: lr*",
                     title_fontsize=6.5)
    return fig


def _lr_optimum_panel(a, section, o, fit_ranks, title):
    from .theory import LINES, SOURCES

    ranks = section["ranks"]
    fit = [ranks.index(r) for r in fit_ranks]
    styles = {"rslora": "--", "muA": ":", "one_step": "-."}
    for rule in ("standard", "rslora"):
        cell = section["cells"][f"{o}/{rule}"]
        lrs = np.asarray(cell["optimum_lr"])  # (ranks, seeds)
        for i, r in enumerate(ranks):
            a.plot([r] * lrs.shape[1], lrs[i], "o" if i in fit else "x", color=COLORS[rule],
                   ms=4, alpha=0.5)
        mean = np.exp(np.mean(np.log(lrs[fit]), axis=1))
        sl = cell["slope"]
        a.plot(fit_ranks, mean, "-", color=COLORS[rule], lw=1.5,
               label=f"{LABELS[rule]}: slope {sl['mean']:+.2f} [{sl['min']:+.2f}, "
                     f"{sl['max']:+.2f}]")
        r = np.asarray(fit_ranks, dtype=float)
        for p, src in LINES[o, rule]:
            a.plot(r, mean[0] * (r / r[0]) ** p, styles[src], color=COLORS[rule], alpha=0.6,
                   lw=1.2, label=f"   theory {p:+g}: {SOURCES[src]['short']}")
    a.set(yscale="log", xlabel="rank r" + (" (×: r = d, not fitted)" if len(fit) < len(ranks)
                                          else ""),
          ylabel="optimal learning rate lr*", title=title)
    _log_labels(a)
    _rank_axis(a, ranks)
    a.grid(alpha=0.3)
    a.legend(fontsize=6.5)


def lr_optimum(res: dict):
    m = res["lr_map"]
    fig, ax = _figure(2, width=5.6, height=4.2)
    for j, o in enumerate(("sgd", "adam")):
        _lr_optimum_panel(ax[0, j], m, o, m["fit_ranks"],
                          f"linear toy, {OPT_NAME[o]}: lr* vs r (dots: seeds)")
    return fig


def mlp_lr(res: dict):
    mm = res["mlp"]
    fig, ax = _figure(2, width=5.6, height=4.2)
    for j, o in enumerate(("sgd", "adam")):
        _lr_optimum_panel(ax[0, j], mm, o, mm["ranks"],
                          f"MLP fine-tune, {'SGD' if o == 'sgd' else 'AdamW'}: lr* vs r")
    return fig


def comparison(res: dict):
    m = res["lr_map"]
    fig, ax = _figure(2, width=5.4, height=4.0)
    ranks = m["ranks"]
    for j, o in enumerate(("sgd", "adam")):
        a = ax[0, j]
        for rule in ("standard", "rslora"):
            cell = m["cells"][f"{o}/{rule}"]
            for proto, ls, name in (("tuned_at_r0", "--", "one lr (tuned at r₀)"),
                                    ("own_best", "-", "own best lr")):
                f = cell[proto]["final_loss"]
                mean = np.array([np.nan if x["mean"] is None else max(x["mean"], FLOOR)
                                 for x in f])
                lo = np.array([np.nan if x["min"] is None else max(x["min"], FLOOR) for x in f])
                hi = np.array([np.nan if x["max"] is None else max(x["max"], FLOOR) for x in f])
                a.errorbar(ranks, mean, yerr=[mean - lo, hi - mean], fmt="o" + ls,
                           color=COLORS[rule], capsize=3, ms=4,
                           mfc="none" if proto == "tuned_at_r0" else COLORS[rule],
                           label=f"{LABELS[rule]}, {name}")
        ey = [max(v, FLOOR) for v in m["eckart_young"]]
        a.plot(ranks, ey, "k:", label="Eckart–Young (best rank-r)")
        a.axvspan(m["fit_ranks"][-1] * 1.4, ranks[-1] * 1.3, color="0.9", zorder=0)
        a.set(yscale="log", xlabel="rank r (shaded: r = d, degenerate)",
              ylabel="final population loss",
              title=f"{OPT_NAME[o]}: one lr vs own best (mean, seed range)")
        lows = [x["min"] for c in m["cells"].values() if c is not None
                for proto in ("tuned_at_r0", "own_best") for x in c[proto]["final_loss"]
                if x["min"]]
        a.set_ylim(max(min(lows) / 3, FLOOR), 1.5)
        _rank_axis(a, ranks)
        a.grid(alpha=0.3)
        a.legend(fontsize=6.5)
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
    "lr_map.png": lr_map,
    "lr_optimum.png": lr_optimum,
    "comparison.png": comparison,
    "mlp_lr.png": mlp_lr,
    "grad_norm.png": grad_norm,
    "one_step.png": one_step,
}


def write_all(res: dict, out_dir: str) -> list:
    for name, draw in FIGURES.items():
        _save(draw(res), os.path.join(out_dir, name))
    return list(FIGURES)
