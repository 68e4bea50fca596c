"""The theory lines drawn next to the measured optimal learning rates, with their sources.

Each line is a predicted exponent p in ``lr* ∝ r^p`` for one optimizer and rule. What each
source assumes, and how much of the reading could be checked against the paper, is stated
with it: the report prints these texts, so they are written once, here.
"""

from __future__ import annotations

SOURCES = {
    "rslora": {
        "short": "rsLoRA paper's SGD argument",
        "cite": "Kalajdzievski 2023, arXiv:2312.03732",
        "assumes": "(stochastic) gradient descent on the adapter, B = 0 at initialisation, rank "
                   "r → ∞ at a fixed learning rate; it asks which scale γ_r keeps learning "
                   "stable and non-vanishing and finds γ_r ∈ Θ(1/√r). Read as a statement about "
                   "lr*, the same computation (this study's one-step derivation) gives "
                   "lr* ∝ r under α/r and lr* ∝ r^0 under α/√r. The paper's experiments use "
                   "AdamW at one learning rate; its theorem is the SGD computation.",
        "checked": "The abstract (read through public excerpts of the arXiv page) says that "
                   "dividing adapters by r 'results in slowed learning and stunted performance' "
                   "and that the paper proves adapters should be divided by √r. The theorem's "
                   "exact statement could not be read here (no access to arXiv); the exponents "
                   "are this study's derivation, not quoted from the paper.",
    },
    "muA": {
        "short": "μA, unverified reading",
        "cite": "Chen, Villar & Hayou 2026, arXiv:2602.06204 (μA)",
        "assumes": "as read by this project's issue 14 from secondary write-ups (not checked "
                   "against the paper): a joint limit of width n and rank r → ∞ in the style of "
                   "μP (a public summary also says so), Adam modelled as sign descent, B = 0 at "
                   "initialisation; lr* ∝ r^0 under α/r and lr* ∝ r^(−1/4) under α/√r.",
        "checked": "The abstract (read through public excerpts) says only that there are two "
                   "regimes, 'one where the optimal learning rate remains roughly invariant "
                   "across ranks, and another where it scales inversely with rank', depending "
                   "on initialisation and scaling factor. Which configuration falls in which "
                   "regime, and the exponent −1/4, could NOT be verified against the paper; "
                   "'inversely with rank' may mean r^(−1) rather than r^(−1/4). Treat these "
                   "lines as unverified.",
    },
    "one_step": {
        "short": "one-step estimate",
        "cite": "this study (the one-step probe below)",
        "assumes": "the first step only (B = 0, so only B moves), Adam's first step = "
                   "lr·sign(gradient); lr* taken as the lr that gives a fixed output change. "
                   "SGD: change ∝ lr·s²·r, so lr* ∝ r (α/r), r^0 (α/√r). Adam: change ∝ lr·s·r, "
                   "so lr* ∝ r^0 (α/r), r^(−1/2) (α/√r). It ignores A's updates and everything "
                   "after step one.",
        "checked": "derived here; the one-step slopes are measured below.",
    },
}

# (optimizer, rule) -> [(exponent, source)]
LINES = {
    ("sgd", "standard"): [(1.0, "rslora")],
    ("sgd", "rslora"): [(0.0, "rslora")],
    ("adam", "standard"): [(0.0, "muA"), (0.0, "one_step")],
    ("adam", "rslora"): [(-0.25, "muA"), (-0.5, "one_step")],
}
