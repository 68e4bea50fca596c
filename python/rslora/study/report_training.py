"""report.md's training sections (4: the linear toy, 5: the nonlinear fine-tune), from the
results dict alone. Every sentence that states a finding is built from the numbers it states;
:mod:`tests.test_study` checks each of those properties on the quick run.
"""

from __future__ import annotations


from .theory import LINES, SOURCES

OPT_NAME = {"sgd": "SGD", "adam": "Adam"}
MLP_OPT = {"sgd": "SGD", "adam": "AdamW"}
RULE_NAME = {"standard": "α/r", "rslora": "α/√r"}


def g(x, digits: int = 3) -> str:
    if x is None:
        return "diverged"
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e5:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def table(head: list, rows: list, left: int = 1) -> str:
    """A markdown table; the first ``left`` columns (labels) left-aligned, numbers right."""
    align = [":---" if i < left else "---:" for i in range(len(head))]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def spread(s: dict, fmt=g) -> str:
    """mean [min, max] of a seed spread."""
    if s["mean"] is None:
        return "diverged"
    return f"{fmt(s['mean'])} [{fmt(s['min'])}, {fmt(s['max'])}]"


def slope_fmt(x) -> str:
    return f"{x:+.2f}"


# --- the facts the text states (each also asserted by the tests) -------------------------------

def rmax_index(res) -> int:
    """Index of the largest rank below train_dim in lr_map['ranks']."""
    m = res["lr_map"]
    return m["ranks"].index(m["fit_ranks"][-1])


def slope_gap_seeds(section: dict, opt: str) -> int:
    """In how many seeds lr*'s slope is larger under α/r than under α/√r."""
    a = section["cells"][f"{opt}/standard"]["slope"]["values"]
    b = section["cells"][f"{opt}/rslora"]["slope"]["values"]
    return sum(1 for x, y in zip(a, b) if x > y)


def slope_gap_every_seed(section: dict, opt: str) -> bool:
    return slope_gap_seeds(section, opt) == len(section["cells"][f"{opt}/standard"]["slope"]
                                                ["values"])


def seeds_text(k: int, n: int) -> str:
    return "in every seed" if k == n else f"in {k} of {n} seeds"


def comparison(section: dict, opt: str, i: int) -> dict:
    """At rank index i: means of both rules under both protocols, and per-seed orderings."""
    out = {}
    for proto in ("tuned_at_r0", "own_best"):
        std = section["cells"][f"{opt}/standard"][proto]["final_loss"][i]
        rs = section["cells"][f"{opt}/rslora"][proto]["final_loss"][i]
        out[proto] = {"standard": std, "rslora": rs,
                      "rslora_lower_seeds": sum(1 for a, b in zip(std["values"], rs["values"])
                                                if b is not None and (a is None or b < a))}
    return out


def ratio_text(std, rs) -> str:
    if std is None or rs is None:
        return "n/a"
    return f"{std / rs:.3g}×"


# --- section 4 ---------------------------------------------------------------------------------

def _setup(res) -> str:
    cfg, m = res["config"], res["lr_map"]
    r0 = cfg["ranks"][0]
    return (
        "## 4. Training dynamics: the learning-rate map\n\n"
        f"**Task.** Learn the facts update Δ ({cfg['train_dim']} × {cfg['train_dim']}, "
        "||Δ||_F = 1, float32; long-tailed, so below r = d the best rank-r loss stays well "
        f"above zero) from fresh batches of {cfg['batch']} inputs x ~ N(0, I) with targets Δx, "
        f"loss L = 1/(2n) Σ ||sBAx − Δx||², for {cfg['steps']} steps. PEFT's initialisation "
        "(A Kaiming-uniform, B = 0). Every step runs rslora's fused kernels: "
        "`lora_linear(..., return_xa=True)` forward, `lora_linear_backward(..., need=(\"A\", "
        "\"B\"), xa=xa)` backward (the base passed is −Δ, so the forward output is the residual "
        "itself). The loss reported is the exact population loss ||sBA − Δ||_F² / ||Δ||_F², "
        f"formed with `rslora.merge`. {cfg['seeds']} seeds: each draws its own Δ (same "
        "spectrum, new singular vectors), A and batches; within a seed all runs share them.\n\n"
        f"**Rules.** Calibrated to agree at r = {r0}: rsLoRA α = {cfg['alpha']:g} (γ = α/√r), "
        f"standard α = {cfg['alpha_standard']:g} (γ = α/r). At r = {r0} the two are the same "
        "run.\n\n"
        f"**Learning rates.** Per optimizer, rule, rank and seed: a grid of {cfg['lr_points']} "
        "learning rates spaced by √2 (SGD from "
        f"{cfg['sgd_lr_min']:g}, Adam from {cfg['adam_lr_min']:g}), widened by two points "
        "beyond an edge whenever the lowest final loss sits at that edge (at most "
        f"{cfg['lr_widen']} per side). The optimum lr* is interpolated on the log grid (a "
        "parabola through log-loss at the best point and its neighbours); where a neighbour "
        "diverged it is the best grid point itself, so an optimum next to the divergence edge "
        "(typical of SGD) has a resolution of √2. SGD is plain SGD; "
        f"Adam has β = ({cfg['adam_betas'][0]:g}, {cfg['adam_betas'][1]:g}), "
        f"ε = {cfg['adam_eps']:g}, bias correction, no weight decay. Slopes of log lr* vs log r "
        f"are fitted over r = {', '.join(map(str, m['fit_ranks']))}"
        + (f"; r = {cfg['train_dim']} = d is trained too and reported apart (the target is "
           "exactly representable there and the loss can reach 0, so its optimum measures "
           "only the step budget)" if cfg["degenerate"] else "") + ".\n")


def _map_table(res) -> str:
    m = res["lr_map"]
    rows = []
    for o, rule in ((o, rule) for o in ("sgd", "adam") for rule in ("standard", "rslora")):
        c = m["cells"][f"{o}/{rule}"]
        for i, r in enumerate(m["ranks"]):
            lrs = c["optimum_lr"][i]
            rows.append([OPT_NAME[o], RULE_NAME[rule], r,
                         f"{g(sum(lrs) / len(lrs))} [{g(min(lrs))}, {g(max(lrs))}]",
                         spread(c["own_best"]["final_loss"][i]),
                         "yes" if any(s[i]["at_edge"] for s in c["searches"]) else "no"])
    edge = any(c["any_at_edge"] for c in m["cells"].values())
    return ("\n**The map** (mean over seeds [min, max]; loss = final population loss at the "
            "best grid lr):\n\n"
            + table(["optimizer", "rule", "r", "lr*", "loss at lr*", "optimum at grid edge"],
                    rows, left=2)
            + "\n\n![loss vs learning rate](lr_map.png)\n\n"
            + ("Some optimum stays at the edge of the widened grid (see the last column): that "
               "lr* is a bound, not an optimum.\n" if edge else
               "Every optimum lies inside its grid (after widening).\n"))


def theory_rows(section: dict, names=OPT_NAME) -> list:
    rows = []
    for o in ("sgd", "adam"):
        for rule in ("standard", "rslora"):
            sl = section["cells"][f"{o}/{rule}"]["slope"]
            th = "; ".join(f"{p:+g} ({SOURCES[src]['short']})" for p, src in LINES[o, rule])
            rows.append([names[o], RULE_NAME[rule], spread(sl, slope_fmt), th])
    return rows


def _theory_text() -> str:
    parts = ["**Where each theory line comes from, and what it assumes.**\n"]
    for src in SOURCES.values():
        parts.append(f"* *{src['cite']}*: {src['assumes']} *Checked:* {src['checked']}")
    return "\n".join(parts) + "\n"


def _slopes(res) -> str:
    m = res["lr_map"]
    says = []
    for o in ("sgd", "adam"):
        std = m["cells"][f"{o}/standard"]["slope"]
        rs = m["cells"][f"{o}/rslora"]["slope"]
        k, n = slope_gap_seeds(m, o), len(std["values"])
        says.append(f"{OPT_NAME[o]}: lr* grows as r^{slope_fmt(std['mean'])} under α/r and "
                    f"r^{slope_fmt(rs['mean'])} under α/√r; the α/r slope is the larger "
                    f"{seeds_text(k, n)}.")
    return ("\n**Optimal learning rate vs rank** (slope of log lr* vs log r, mean over seeds "
            "[min, max], next to the theory lines):\n\n"
            + table(["optimizer", "rule", "measured slope", "theory (source)"],
                    theory_rows(m), left=2)
            + "\n\n![optimal learning rate vs rank](lr_optimum.png)\n\n"
            + " ".join(says) + "\n\n" + _theory_text())


def _comparison(res) -> str:
    m, cfg = res["lr_map"], res["config"]
    r0, n = cfg["ranks"][0], cfg["seeds"]
    rows = []
    for o in ("sgd", "adam"):
        for i, r in enumerate(m["ranks"]):
            c = comparison(m, o, i)
            rows.append([OPT_NAME[o], r, spread(c["tuned_at_r0"]["standard"]),
                         spread(c["tuned_at_r0"]["rslora"]), spread(c["own_best"]["standard"]),
                         spread(c["own_best"]["rslora"]), g(m["eckart_young"][i])])
    i = rmax_index(res)
    r = m["ranks"][i]
    lines = []
    for o in ("sgd", "adam"):
        c = comparison(m, o, i)
        t, b = c["tuned_at_r0"], c["own_best"]
        lines.append(
            f"* {OPT_NAME[o]}, r = {r}: with the lr tuned at r = {r0}, α/r ends at "
            f"{g(t['standard']['mean'])} and α/√r at {g(t['rslora']['mean'])} (α/r / α/√r = "
            f"{ratio_text(t['standard']['mean'], t['rslora']['mean'])}; α/√r lower in "
            f"{t['rslora_lower_seeds']} of {n} seeds). Each at its own best lr: "
            f"{g(b['standard']['mean'])} vs {g(b['rslora']['mean'])} "
            f"({ratio_text(b['standard']['mean'], b['rslora']['mean'])}; α/√r lower in "
            f"{b['rslora_lower_seeds']} of {n} seeds). Eckart–Young: {g(m['eckart_young'][i])}.")
    return ("\n**Two comparisons** (final loss, mean [min, max] over seeds): *one lr* = the "
            f"lr with the lowest loss at r = {r0} (the same run for both rules), held for all "
            "ranks — the rsLoRA paper's setting; *own best* = each rule at its best grid lr "
            "at each rank. The last column is the least loss any rank-r adapter can reach.\n\n"
            + table(["optimizer", "r", "one lr: α/r", "one lr: α/√r", "own best: α/r",
                     "own best: α/√r", "Eckart–Young"], rows, left=2)
            + "\n\n![the two comparisons](comparison.png)\n\n" + "\n".join(lines) + "\n")


def _equivalence(res) -> str:
    e = res["equivalence"]
    cfg = res["config"]
    r0 = cfg["ranks"][0]
    rows = [[OPT_NAME[x["optimizer"]], x["rank"], f"{x['lr']:g}", f"{x['eps']:g}",
             f"{x['multiplier']:.6g}", g(x["product_max_rel_diff"]), g(x["loss_max_rel_diff"]),
             g(x["final_loss"]), g(x["final_loss_standard_same_lr"])] for x in e["rows"]]
    eps_row = next(x for x in e["rows"] if x["eps"] > 0)
    return (
        "\n**The rule switch is a learning-rate multiplier on B.** Write the adapter as sBA "
        "and let C = sB, G = ∂L/∂(sBA). Then ∂L/∂A = CᵀG does not involve s, and ∂L/∂B = "
        "s·GAᵀ = s·(∂L/∂C). In the variables (A, C), an SGD step moves A by −lr·∂L/∂A and C by "
        "−lr·s²·∂L/∂C; an Adam step (without ε) is unchanged by a constant factor on a "
        "gradient, so it moves C by −lr·s·(m̂/√v̂ of ∂L/∂C). With B = 0, C starts at 0 under "
        "either rule and A starts equal. So rsLoRA at rank r is exactly the standard rule "
        "(equal to it at r₀) with B's learning rate multiplied by (s_rs/s_std)² = "
        f"r/r₀ under SGD and s_rs/s_std = √(r/r₀) under Adam (r₀ = {r0}). Adam's ε breaks "
        "it slightly: on C it acts as ε/s. Checked by running both in float64 (same data; "
        "differences of sBA and of the loss curve, relative):\n\n"
        + table(["optimizer", "r", "lr", "Adam ε", "B-lr multiplier", "max rel. diff of sBA",
                 "max rel. diff of loss", "final loss", "α/r at the same lr, no multiplier"],
                rows)
        + f"\n\nThe largest difference without ε is {g(e['max_rel_diff'])} (float64 rounding; "
        "exactly 0 where both scales are powers of two: the two runs then do the same "
        "arithmetic); "
        f"with ε = {eps_row['eps']:g} it is {g(eps_row['product_max_rel_diff'])}. What follows: "
        "the rule changes no capacity (the same adapters are reachable), only the ratio of "
        "B's to A's learning rate, as in LoRA+. Everything measured above is therefore a "
        "statement about learning rates: at one shared lr, α/√r raises B's lr by r/r₀ (SGD) "
        "or √(r/r₀) (Adam) relative to α/r, which helps where the shared lr was too small for "
        "B at rank r; each rule at its own best lr compares two fixed B/A ratios, and neither "
        "rule is the best ratio in general.\n")


def _probes(res) -> str:
    cfg, dyn = res["config"], res["dynamics"]
    gn_rows, os_rows = [], []
    for kind in ("style", "facts"):
        gr = dyn["grad_norm"][kind]
        gn_rows.append([kind, f"{gr['standard']['slope']:+.3f}", "-0.5",
                        f"{gr['rslora']['slope']:+.3f}", "0"])
        o = dyn["one_step"][kind]
        os_rows.append([kind] + [f"{o[k]['slope']:+.3f} ({o[k]['slope_theory']:+g})"
                                 for k in ("sgd/standard", "sgd/rslora", "adam/standard",
                                           "adam/rslora")])
    return (
        "\n**At initialisation** (seed 0; log-log least-squares slopes over ranks "
        f"{', '.join(map(str, cfg['probe_ranks']))}). With B = 0 only B moves on the first "
        "step; ∂L/∂B = s·mean(residual (Ax)ᵀ), so ||∂L/∂B|| ∝ s√r — for Gaussian x exactly "
        "E||∂L/∂B||² = s²||Δ||² (r/3)((1 + 1/n)/d + 1/n): slope −1/2 under α/r, 0 under α/√r. "
        "One SGD step changes the output on its input by ∝ lr·s²·r (slopes −1, 0); Adam's first "
        "step is lr·sign(∂L/∂B), so the change is ∝ lr·s·r (slopes 0, +1/2). Measured:\n\n"
        + table(["target", "slope of ‖∂L/∂B‖, α/r", "theory", "slope, α/√r", "theory"],
                gn_rows)
        + "\n\n![gradient norm at init](grad_norm.png)\n\n"
        f"Output change after one step on one input (mean over {cfg['probe_inputs']} inputs, "
        "lr tuned at the smallest rank), slope vs rank (theory in brackets):\n\n"
        + table(["target", "SGD, α/r", "SGD, α/√r", "Adam, α/r", "Adam, α/√r"], os_rows)
        + "\n\n![output change after one step](one_step.png)\n")


def _degenerate(res) -> str:
    cfg, m = res["config"], res["lr_map"]
    if not cfg["degenerate"]:
        return ""
    i = m["ranks"].index(cfg["train_dim"])
    parts = []
    for o in ("sgd", "adam"):
        c = comparison(m, o, i)
        parts.append(f"{OPT_NAME[o]}: own best {g(c['own_best']['standard']['mean'])} (α/r) vs "
                     f"{g(c['own_best']['rslora']['mean'])} (α/√r); one lr "
                     f"{g(c['tuned_at_r0']['standard']['mean'])} vs "
                     f"{g(c['tuned_at_r0']['rslora']['mean'])}")
    return (f"\n**r = d = {cfg['train_dim']}, the degenerate case.** The target is exactly "
            "representable, so both losses head to 0 and their ratio measures only how far each "
            "run is from its own best lr within the step budget; no headline uses it. "
            + "; ".join(parts) + ".\n")


def section_toy(res) -> str:
    return (_setup(res) + _map_table(res) + _slopes(res) + _comparison(res) + _degenerate(res)
            + _equivalence(res) + _probes(res))


# --- section 5 ---------------------------------------------------------------------------------

def section_mlp(res) -> str:
    cfg, mm = res["config"], res["mlp"]
    r0 = mm["ranks"][0]
    rows = []
    for o in ("sgd", "adam"):
        for i, r in enumerate(mm["ranks"]):
            c = comparison(mm, o, i)
            rows.append([MLP_OPT[o], r, spread(c["tuned_at_r0"]["standard"]),
                         spread(c["tuned_at_r0"]["rslora"]), spread(c["own_best"]["standard"]),
                         spread(c["own_best"]["rslora"])])
    says = []
    for o in ("sgd", "adam"):
        std = mm["cells"][f"{o}/standard"]["slope"]
        rs = mm["cells"][f"{o}/rslora"]["slope"]
        k, n = slope_gap_seeds(mm, o), len(std["values"])
        says.append(f"{MLP_OPT[o]}: r^{slope_fmt(std['mean'])} (α/r) vs "
                    f"r^{slope_fmt(rs['mean'])} (α/√r); the α/r slope is the larger "
                    f"{seeds_text(k, n)} (in the linear toy: "
                    f"{seeds_text(slope_gap_seeds(res['lr_map'], o), n)}).")
    return (
        "## 5. A nonlinear fine-tune\n\n"
        f"A teacher MLP (x ∈ R^{cfg['mlp_dim']} → ReLU → ReLU → {cfg['mlp_classes']} classes, "
        f"width {cfg['mlp_dim']}) labels Gaussian inputs. A student of the same shape is "
        f"pretrained on those labels ({cfg['mlp_pretrain_steps']} Adam steps, all weights, "
        "cross-entropy). The task then shifts: a second teacher whose two hidden weights carry "
        f"a full-rank Gaussian change of relative size {cfg['mlp_shift']:g}. LoRA adapters on "
        "both hidden layers (PEFT initialisation, everything else frozen) learn the new labels "
        f"with cross-entropy for {cfg['mlp_steps']} steps of {cfg['mlp_batch']} fresh inputs, "
        f"under AdamW (weight decay {cfg['mlp_weight_decay']:g}) or plain SGD, forward and "
        "backward through `lora_linear` / `lora_linear_backward`. Metric: cross-entropy on "
        f"{cfg['mlp_eval']} held-out inputs (before fine-tuning: {spread(mm['start_loss'])}; "
        f"the pretrained student on its own task: {spread(mm['old_task_loss'])}). Same "
        f"learning-rate protocol as the toy, {cfg['seeds']} seeds, rules equal at r = {r0}, "
        f"slopes fitted over r = {', '.join(map(str, mm['ranks']))} (up to the width).\n\n"
        + table(["optimizer", "rule", "measured slope", "theory (source)"], theory_rows(mm, MLP_OPT),
                left=2)
        + "\n\n![MLP: optimal learning rate vs rank](mlp_lr.png)\n\n" + " ".join(says) + "\n\n"
        + table(["optimizer", "r", "one lr: α/r", "one lr: α/√r", "own best: α/r",
                 "own best: α/√r"], rows, left=2)
        + "\n\n(held-out cross-entropy, mean [min, max] over seeds.)\n")


def limits(res) -> str:
    return ("## 6. Limits\n\n"
            "A linear-regression toy with isotropic Gaussian inputs and fresh batches, and one "
            "small MLP; fixed step budgets, constant learning rates, no schedules; "
            f"{res['config']['seeds']} seeds. LLM fine-tuning has correlated features, long "
            "schedules and many layers. The exponents at initialisation and the equivalence are "
            "exact statements; the fitted lr* slopes depend on the budget and the grid, which "
            "the tables document, and the μA lines are an unverified reading.\n")
