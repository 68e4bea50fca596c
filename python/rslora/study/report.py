"""report.md, written from the results dict alone (so every number in it is in results.json).

Statements about the findings are computed from the numbers (which rule is lower, whether the
loss falls with rank), not written in advance.
"""

from __future__ import annotations


from . import report_training as rt


_g, _table = rt.g, rt.table


def _approx_worst(res) -> tuple:
    """(largest rsvd error / optimum where the optimum is above 1e-10, largest rsvd error where
    it is not: there float64 rounding sets the error)."""
    worst, floor = 1.0, 0.0
    for rows in res["approximation"].values():
        for row in rows:
            for key in ("rsvd_rslora", "rsvd_standard"):
                if row["optimum"] > 1e-10:
                    worst = max(worst, row[key] / row["optimum"])
                else:
                    floor = max(floor, row[key])
    return worst, floor


def headline(res: dict) -> list:
    """The few sentences a README quotes, computed from the results (never from r = d)."""
    cfg, m, mm = res["config"], res["lr_map"], res["mlp"]
    sl = lambda sec, o, rule: rt.slope_fmt(sec["cells"][f"{o}/{rule}"]["slope"]["mean"])  # noqa: E731
    i = rt.rmax_index(res)
    r, r0 = m["ranks"][i], cfg["ranks"][0]
    comp = {o: rt.comparison(m, o, i) for o in ("sgd", "adam")}
    e = res["equivalence"]
    gn = res["dynamics"]["grad_norm"]["facts"]
    mean = lambda c, proto, rule: _g(c[proto][rule]["mean"])  # noqa: E731
    return [
        f"Optimal learning rate vs rank (linear toy, d = {cfg['train_dim']}, "
        f"{cfg['seeds']} seeds): lr* ∝ r^{sl(m, 'sgd', 'standard')} under α/r and "
        f"r^{sl(m, 'sgd', 'rslora')} under α/√r with SGD (the rsLoRA computation: +1 and 0); "
        f"r^{sl(m, 'adam', 'standard')} and r^{sl(m, 'adam', 'rslora')} with Adam (μA as read "
        "from secondary sources, unverified: 0 and −1/4; the one-step sign-descent estimate: "
        "0 and −1/2).",
        f"At r = {r} (< d) with one lr tuned at r = {r0}, the final loss is "
        f"{mean(comp['sgd'], 'tuned_at_r0', 'standard')} (α/r) vs "
        f"{mean(comp['sgd'], 'tuned_at_r0', 'rslora')} (α/√r) under SGD and "
        f"{mean(comp['adam'], 'tuned_at_r0', 'standard')} vs "
        f"{mean(comp['adam'], 'tuned_at_r0', 'rslora')} under Adam; each rule at its own best "
        f"lr: {mean(comp['sgd'], 'own_best', 'standard')} vs "
        f"{mean(comp['sgd'], 'own_best', 'rslora')} (SGD), "
        f"{mean(comp['adam'], 'own_best', 'standard')} vs "
        f"{mean(comp['adam'], 'own_best', 'rslora')} (Adam); Eckart–Young "
        f"{_g(m['eckart_young'][i])}.",
        "Switching α/r to α/√r is the standard rule with B's learning rate multiplied by "
        "r/r₀ (SGD) or √(r/r₀) (Adam without ε): float64 runs agree to "
        f"{_g(e['max_rel_diff'])} (largest relative difference).",
        f"Nonlinear fine-tune (MLP, cross-entropy): lr* ∝ r^{sl(mm, 'sgd', 'standard')} / "
        f"r^{sl(mm, 'sgd', 'rslora')} (SGD) and r^{sl(mm, 'adam', 'standard')} / "
        f"r^{sl(mm, 'adam', 'rslora')} (AdamW), α/r / α/√r.",
        f"||∂L/∂B|| at initialisation scales as r^{gn['standard']['slope']:+.2f} under α/r "
        f"and r^{gn['rslora']['slope']:+.2f} under α/√r (theory: −1/2 and 0).",
        "Approximation error is fixed by the SVD: lora_from_delta stays within a factor "
        f"{_approx_worst(res)[0]:.4f} of the Eckart–Young optimum under either rule.",
    ]


def _section_scales(res) -> str:
    t = res["scale_table"]
    rows = [[x["r"], repr(x["standard"]), repr(x["rslora"]), _g(x["ratio"], 4)] for x in t["rows"]]
    return (f"## 1. The scale table (α = {t['alpha']:g})\n\n"
            "PEFT multiplies the adapter by γ_r: α/r by default (`use_rslora=False`), α/√r with "
            "rsLoRA (`use_rslora=True`). The rsLoRA factor is √r times larger, and the gap grows "
            "with the rank (values as `rslora.scale` computes them, like PEFT, in float64):\n\n"
            + _table(["r", "α/r", "α/√r", "ratio (= √r)"], rows, left=0) + "\n")


def _section_spectra(res) -> str:
    cfg = res["config"]
    sp = res["spectra"]
    rows = []
    for kind in ("style", "facts"):
        s = sp[kind]
        shares = ", ".join(f"{_g(s['top_share'][r])} (r={r})"
                           for r in sorted(s["top_share"], key=int))
        rows.append([kind, f"`{s['model']}`", s["rank_90"], s["rank_99"], shares])
    d = cfg["spectrum_dim"]
    dev = max(s["svd_vs_model_max_abs"] for s in sp.values())
    return (f"## 2. Spectra: a \"style\" update and a \"facts\" update\n\n"
            f"Two {d} × {d} updates Δ = U diag(S) Vᵀ from `rslora.synthetic` (Haar-random "
            f"orthonormal U, V; ||Δ||_F = 1): **style** puts its energy in a few directions "
            f"(τ = {cfg['style_tau']:g}), **facts** has a long tail (power {cfg['facts_power']:g}: "
            f"the energy S_i² ∝ 1/(1+i) is a harmonic series). The ranks below come from "
            f"`rslora.spectrum` (all singular values by LAPACK); they agree with the model's "
            f"spectrum, whose values the SVD reproduces to {_g(dev)}.\n\n"
            + _table(["update", "model", "rank for 90% energy", "rank for 99%",
                      "energy share of the top r"], rows, left=2)
            + "\n\n![spectra](spectra.png)\n\n"
            f"A rank-{sp['style']['rank_99']} adapter holds 99% of the style update; the facts "
            f"update needs rank {sp['facts']['rank_90']} for 90% and {sp['facts']['rank_99']} "
            f"for 99%: only there can a larger rank keep paying off.\n")


def _section_approx(res) -> str:
    cfg = res["config"]
    a = cfg["approx_alpha"]
    parts = [f"## 3. Approximation error vs rank\n\n"
             "Relative Frobenius error ||Δ − approximation||_F / ||Δ||_F of a rank-r adapter:\n\n"
             "* **optimum**: Eckart–Young, √(Σ_{i≥r} S_i²) from the known spectrum: no rank-r "
             "matrix does better.\n"
             f"* **rsvd, rsLoRA / standard**: `A, B = rslora.lora_from_delta(Δ, r, alpha={a:g}, "
             "rule=...)` (randomized SVD), error of s·B@A with s = α/√r or α/r. The scale is put "
             "*inside* the factors (B@A = approximation / s), so the rule cannot change the "
             "error.\n"
             f"* **write-up**: the popular write-up's number, the rank-r SVD approximation "
             f"multiplied by γ = α/√r (`delta_approx = scaling * (B @ A)`).\n"]
    worst, floor = _approx_worst(res)
    pred_dev = 0.0
    for kind in ("style", "facts"):
        rows = res["approximation"][kind]
        t = []
        for row in rows:
            pred_dev = max(pred_dev, abs(row["writeup_scaled"] - row["writeup_predicted"])
                           / max(row["writeup_scaled"], 1e-300))
            t.append([row["r"], _g(row["optimum"], 4), _g(row["rsvd_rslora"], 4),
                      _g(row["rsvd_standard"], 4), _g(row["writeup_gamma"], 4),
                      _g(row["writeup_scaled"], 4)])
        parts.append(f"**{kind}**\n\n" + _table(
            ["r", "optimum", "rsvd, rsLoRA", "rsvd, standard", "γ = α/√r", "write-up: γ × approx"],
            t) + "\n")
    parts.append("![approximation error](approximation.png)\n\n"
                 f"The adapters from `lora_from_delta` are within a factor {worst:.4f} of the "
                 "optimum at every rank, with either rule"
                 + (f" (where the optimum is below 1e-10 they sit at float64 rounding, "
                    f"{_g(floor)})" if floor else "")
                 + ": the best rank-r approximation is "
                 "fixed by the SVD, and a LoRA scale only decides how its size is split between "
                 "s and the factors.\n\n"
                 "The write-up's column conflates the two. Because Δ − M_r is orthogonal to the "
                 "rank-r approximation M_r, ||Δ − γM_r||² = ||Δ − M_r||² + (1 − γ)²||M_r||²: the "
                 "optimum plus a term that only measures how far γ is from 1 (this identity "
                 f"matches the measured column to a relative {_g(pred_dev)}). Its error is large "
                 "at small r because γ is large there, and it meets the optimum only at "
                 f"r = α² = {a * a:g}, where γ = 1: a statement about γ, not about how well a "
                 "rank-r adapter can represent the update. A LoRA adapter trained or extracted "
                 "under rsLoRA stores B@A = approximation/γ, and its forward pass multiplies by γ "
                 "once.\n")
    return "\n".join(parts)


def render(res: dict, run_info: dict | None = None) -> str:
    """report.md. ``run_info`` (wall time, where it ran) is not in results.json: it varies."""
    cfg = res["config"]
    cmd = "rslora study" + (" --quick" if cfg["mode"] == "quick" else "") + f" --seed {cfg['seed']}"
    timing = ""
    if run_info:
        timing = (f"This run took {run_info['wall_s']:.0f} s of wall time; its training runs "
                  f"ran {run_info['where']}.\n\n")
    head = (
        f"# rsLoRA study ({cfg['mode']} mode, seed {cfg['seed']})\n\n"
        "What rank-stabilized LoRA (Kalajdzievski 2023, arXiv:2312.03732) changes, measured on "
        "synthetic updates with rslora's own kernels, and how the optimal learning rate moves "
        "with the rank (next to μA, Chen, Villar & Hayou 2026, arXiv:2602.06204). Reproduce "
        f"with `{cmd}`: the same seed gives the same numbers (on the same machine and BLAS). "
        "Every number below is in `results.json`.\n\n" + timing
        + "**Headline**\n\n" + "\n".join(f"* {line}" for line in headline(res)) + "\n")
    return "\n".join([head, _section_scales(res), _section_spectra(res), _section_approx(res),
                      rt.section_toy(res), rt.section_mlp(res), rt.limits(res)])
