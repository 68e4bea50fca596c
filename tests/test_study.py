"""`rslora study`: the properties its report states, checked on the quick mode's results.

The quick study runs once per session (through the command line) into a temporary directory;
determinism and the file handling are checked on a tiny configuration.
"""

import json
import math
import os
import re

import numpy as np
import pytest

import rslora
from rslora import cli, study
from rslora.study import StudyConfig, dynamics, equivalence, lrsearch, mlp, report
from rslora.study import report_training as rt

FIGURES = ["spectra.png", "approximation.png", "lr_map.png", "lr_optimum.png",
           "comparison.png", "mlp_lr.png", "grad_norm.png", "one_step.png"]
TIMING = re.compile(r"This run took \d+ s of wall time; its training runs ran [^\n]*\.\n\n")


def tiny_config(seed=0) -> StudyConfig:
    return StudyConfig(mode="quick", seed=seed, seeds=2, spectrum_dim=48, approx_ranks=(2, 4, 8),
                       train_dim=16, ranks=(2, 4, 8), probe_ranks=(1, 2, 4, 8, 16), steps=10,
                       batch=16, evals=3, probe_inputs=4, lr_points=4, lr_widen=2, mlp_dim=8,
                       mlp_classes=3, mlp_ranks=(2, 4, 8), mlp_pretrain_steps=20, mlp_steps=6,
                       mlp_batch=8, mlp_eval=64)


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    assert cli.main(["study", "--quick", "--out", str(out), "--seed", "0"]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


# --- the files ----------------------------------------------------------------------------------

def test_outputs_exist_and_report_links_every_plot(quick):
    out, res = quick
    report_md = (out / "report.md").read_text()
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({name})" in report_md
    assert [p for p in os.listdir(out) if p.startswith(".")] == [".rslora-output.json"]  # no temp
    assert TIMING.search(report_md)  # the wall time is in the report, not in results.json
    assert TIMING.sub("", report_md) == report.render(res)  # else a function of results.json
    assert not any(k.startswith("_") for k in res)
    for line in report.headline(res):
        assert line in report_md
    for section in ("## 1. The scale table", "## 2. Spectra", "## 3. Approximation",
                    "## 4. Training dynamics", "**The map**", "**Optimal learning rate vs rank**",
                    "**Where each theory line comes from", "**Two comparisons**",
                    "**The rule switch is a learning-rate multiplier on B.**",
                    "**At initialisation**", "## 5. A nonlinear fine-tune", "## 6. Limits",
                    "arXiv:2312.03732", "arXiv:2602.06204", "could NOT be verified"):
        assert section in report_md


def test_headline_never_quotes_r_equal_d(quick):
    _, res = quick
    d = res["config"]["train_dim"]
    i = rt.rmax_index(res)
    assert res["lr_map"]["ranks"][i] < d and res["lr_map"]["eckart_young"][i] > 0.05
    for line in report.headline(res):
        assert f"r = {d}" not in line


# --- 1. scale table -----------------------------------------------------------------------------

def test_scale_table_exact(quick):
    _, res = quick
    rows = res["scale_table"]["rows"]
    assert [row["r"] for row in rows] == [1, 4, 8, 16, 32, 64]
    for row in rows:
        assert row["standard"] == 16 / row["r"]
        assert row["rslora"] == 16 / math.sqrt(row["r"])
        assert row["rslora"] == rslora.scale(16, row["r"])


# --- 2. spectra ---------------------------------------------------------------------------------

def test_spectra_ranks_match_the_models(quick):
    _, res = quick
    sp = res["spectra"]
    for kind in ("style", "facts"):
        assert sp[kind]["rank_90"] == sp[kind]["rank_90_model"]
        assert sp[kind]["rank_99"] == sp[kind]["rank_99_model"]
        assert sp[kind]["svd_vs_model_max_abs"] < 1e-12
        assert sp[kind]["frobenius_norm"] == pytest.approx(1.0, rel=1e-12)
    # style: share(r) = (1 - q^r) / (1 - q^k), q = exp(-2/tau): r90 is the first r with q^r <= 0.1
    k, q = sp["style"]["shape"][0], math.exp(-2 / res["config"]["style_tau"])
    share = lambda r: (1 - q ** r) / (1 - q ** k)  # noqa: E731
    r90 = next(r for r in range(1, k + 1) if share(r) >= 0.9)
    assert sp["style"]["rank_90"] == r90
    # facts (power 1/2): share(r) = H_r / H_k
    H = np.cumsum(1.0 / np.arange(1, k + 1))
    assert sp["facts"]["rank_90"] == int(np.argmax(H / H[-1] >= 0.9)) + 1
    assert sp["facts"]["rank_90"] > 20 * sp["style"]["rank_90"]  # the long tail


# --- 3. approximation ---------------------------------------------------------------------------

def test_rsvd_error_between_optimum_and_1_01_optimum(quick):
    _, res = quick
    for kind, rows in res["approximation"].items():
        assert [row["r"] for row in rows] == [2, 4, 8, 16, 32, 64, 128, 256]
        for row in rows:
            for key in ("rsvd_rslora", "rsvd_standard"):
                if row["optimum"] > 1e-10:  # (1e-12: Delta itself is rounded to float64)
                    assert row["optimum"] - 1e-12 <= row[key] <= 1.01 * row["optimum"] + 1e-12
                else:  # at float64 rounding
                    assert row[key] < 1e-12
            # the rule only moves the scale between s and the factors
            assert row["rsvd_standard"] == pytest.approx(row["rsvd_rslora"], rel=1e-6, abs=1e-13)


def test_writeup_error_is_optimum_plus_scale_mismatch(quick):
    _, res = quick
    for kind, rows in res["approximation"].items():
        for row in rows:
            g = row["writeup_gamma"]
            assert g == 16 / math.sqrt(row["r"])
            assert row["writeup_scaled"] == pytest.approx(row["writeup_predicted"], rel=1e-9,
                                                          abs=1e-13)
            if g > 1:
                assert row["writeup_scaled"] > row["rsvd_rslora"]
        at256 = rows[-1]  # gamma = 1: the write-up's number is the plain error
        assert at256["writeup_scaled"] == pytest.approx(at256["rsvd_rslora"], rel=1e-9, abs=1e-13)


# --- 4. training dynamics: probes at initialisation -----------------------------------------

def test_grad_norm_slopes(quick):
    _, res = quick
    for kind, probe in res["dynamics"]["grad_norm"].items():
        assert probe["standard"]["slope"] == pytest.approx(-0.5, abs=0.08)
        assert probe["rslora"]["slope"] == pytest.approx(0.0, abs=0.08)
        for rule in ("standard", "rslora"):  # each point near its expectation (one batch)
            ratio = np.asarray(probe[rule]["grad_norm"]) / np.asarray(probe[rule]["expected"])
            assert np.all((ratio > 0.6) & (ratio < 1.4)), ratio


def test_one_step_change_slopes(quick):
    _, res = quick
    for kind, probe in res["dynamics"]["one_step"].items():
        for key, theory in (("sgd/standard", -1.0), ("sgd/rslora", 0.0),
                            ("adam/standard", 0.0), ("adam/rslora", 0.5)):
            assert probe[key]["slope_theory"] == theory
            assert probe[key]["slope"] == pytest.approx(theory, abs=0.15), (kind, key)


def test_train_matches_a_numpy_reference():
    """One short run with rslora's kernels equals the same loop written in float64 NumPy."""
    cfg = tiny_config()
    delta, _ = study.spectra.make_delta(cfg, "facts", cfg.train_dim)
    prob = dynamics.Problem(cfg, "facts", delta)
    for opt, lr in (("sgd", 0.03), ("adam", 2e-3)):
        run = dynamics.train(cfg, prob, 8, "standard", opt, lr)
        s = dynamics.rule_scale(cfg, "standard", 8)
        A = prob.A_init[:8].astype(np.float64)
        B = np.zeros((cfg.train_dim, 8))
        D = prob.delta.astype(np.float64)
        m, v = [np.zeros_like(A), np.zeros_like(B)], [np.zeros_like(A), np.zeros_like(B)]
        rng = np.random.default_rng(prob.batch_seed)
        for t in range(cfg.steps):
            x = rng.standard_normal((cfg.batch, cfg.train_dim), dtype=np.float32).astype(float)
            dy = (s * (x @ A.T) @ B.T - x @ D.T) / cfg.batch
            gA, gB = s * (dy @ B).T @ x, s * dy.T @ (x @ A.T)
            for j, (p, g) in enumerate(((A, gA), (B, gB))):
                if opt == "sgd":
                    p -= lr * g
                else:
                    m[j] = 0.9 * m[j] + 0.1 * g
                    v[j] = 0.999 * v[j] + 0.001 * g * g
                    p -= lr * (m[j] / (1 - 0.9 ** (t + 1))) / (
                        np.sqrt(v[j] / (1 - 0.999 ** (t + 1))) + 1e-8)
        ref = np.linalg.norm(s * B @ A - D) ** 2 / np.linalg.norm(D) ** 2
        assert run["final_loss"] == pytest.approx(ref, rel=2e-3)


# --- 4. the learning-rate map -------------------------------------------------------------------

def _cells(section):
    return [(o, rule, section["cells"][f"{o}/{rule}"]) for o in ("sgd", "adam")
            for rule in ("standard", "rslora")]


def test_lr_searches_find_interior_optima(quick):
    """Every search: its best point has the lowest loss, the optimum is interpolated within half
    a lattice step of it, and (as the report says for the quick run) no optimum is at an edge."""
    _, res = quick
    m = res["lr_map"]
    report_md = report.render(res)
    for section in (m, res["mlp"]):
        for o, rule, c in _cells(section):
            assert c["any_at_edge"] is False
            for per_seed in c["searches"]:
                for s in per_seed:
                    finals = [math.inf if f is None else f for f in s["final_loss"]]
                    i = s["k"].index(s["best_k"])
                    assert finals[i] == min(finals) == s["best_loss"]
                    assert 0 < i < len(finals) - 1  # interior
                    assert s["k"] == list(range(s["k"][0], s["k"][-1] + 1))
                    assert abs(s["optimum_k"] - s["best_k"]) <= 0.5 + 1e-12
                    assert s["lr"][i] == pytest.approx(
                        (cfg_lr_min(res, section, o)) * math.sqrt(2) ** s["best_k"], rel=1e-12)
    assert "Every optimum lies inside its grid (after widening)." in report_md


def cfg_lr_min(res, section, o):
    cfg = res["config"]
    if section is res["mlp"]:
        return cfg["mlp_sgd_lr_min"] if o == "sgd" else cfg["mlp_adam_lr_min"]
    return cfg["sgd_lr_min"] if o == "sgd" else cfg["adam_lr_min"]


def test_lr_map_slopes_are_fits_and_follow_the_rules(quick):
    _, res = quick
    for section, ranks in ((res["lr_map"], res["lr_map"]["fit_ranks"]),
                           (res["mlp"], res["mlp"]["ranks"])):
        idx = [section["ranks"].index(r) for r in ranks]
        for o, rule, c in _cells(section):
            for rep, slope in enumerate(c["slope"]["values"]):
                lrs = [c["optimum_lr"][i][rep] for i in idx]
                assert slope == pytest.approx(np.polyfit(np.log(ranks), np.log(lrs), 1)[0],
                                              abs=1e-9)
            v = c["slope"]["values"]
            assert c["slope"]["mean"] == pytest.approx(np.mean(v))
            assert (c["slope"]["min"], c["slope"]["max"]) == (min(v), max(v))
    m = res["lr_map"]
    # What the report states on the quick run: under SGD lr* grows faster with r under alpha/r,
    # in every seed (the rule switch multiplies B's lr by r/r0), in the toy and in the MLP.
    for section in (m, res["mlp"]):
        assert rt.slope_gap_every_seed(section, "sgd")
        assert "the α/r slope is the larger in every seed" in report.render(res)
    # MLP under AdamW: lr* flat under alpha/r, falling under alpha/sqrt(r)
    mc = res["mlp"]["cells"]
    assert abs(mc["adam/standard"]["slope"]["mean"]) < 0.3
    assert mc["adam/rslora"]["slope"]["max"] < 0
    # the measured SGD slopes sit near the lines: +1 (alpha/r) and 0 (alpha/sqrt r) + a gap
    assert 0.8 < m["cells"]["sgd/standard"]["slope"]["mean"] < 1.6
    assert -0.1 < m["cells"]["sgd/rslora"]["slope"]["mean"] < 0.8
    # under Adam both slopes are small: |slope| < 1/2 (the one-step line for alpha/sqrt r: -1/2)
    for rule in ("standard", "rslora"):
        assert abs(m["cells"][f"adam/{rule}"]["slope"]["mean"]) < 0.5


def test_the_two_comparisons(quick):
    _, res = quick
    m, cfg = res["lr_map"], res["config"]
    n = cfg["seeds"]
    for o in ("sgd", "adam"):
        std, rs = m["cells"][f"{o}/standard"], m["cells"][f"{o}/rslora"]
        # at r0 the rules are one run: same searches, same tuned lr
        assert std["searches"][0][0] == rs["searches"][0][0]
        assert std["tuned_at_r0"]["lr"] == rs["tuned_at_r0"]["lr"]
        for rep in range(n):
            assert rs["tuned_at_r0"]["lr"][rep] == rs["searches"][rep][0]["best_lr"]
        for c in (std, rs):
            for i, r in enumerate(m["ranks"]):
                ey = m["eckart_young"][i]
                for proto in ("tuned_at_r0", "own_best"):
                    for x in c[proto]["final_loss"][i]["values"]:
                        assert x is not None and x >= ey * (1 - 1e-5)  # nothing beats the SVD
                for rep in range(n):  # own best <= the one lr where that lr was in the grid
                    s = c["searches"][rep][i]
                    if c["tuned_at_r0"]["lr"][rep] in s["lr"]:
                        assert s["best_loss"] <= c["tuned_at_r0"]["final_loss"][i]["values"][rep]
    assert m["eckart_young"][-1] == 0.0 and m["ranks"][-1] == cfg["train_dim"]
    # the report's statements at the largest rank < d, quick run
    i = rt.rmax_index(res)
    sgd = rt.comparison(m, "sgd", i)
    assert sgd["tuned_at_r0"]["rslora_lower_seeds"] == n  # one lr: rsLoRA wins under SGD
    assert sgd["own_best"]["rslora_lower_seeds"] == 0  # own best lr: the gap reverses
    t = sgd["tuned_at_r0"]
    assert t["standard"]["mean"] > 1.3 * t["rslora"]["mean"]
    b = sgd["own_best"]
    assert b["standard"]["mean"] < b["rslora"]["mean"] < 1.5 * b["standard"]["mean"]
    text = report.render(res)
    assert f"α/√r lower in {n} of {n} seeds" in text and f"α/√r lower in 0 of {n} seeds" in text


def test_equivalence_in_the_report(quick):
    _, res = quick
    e = res["equivalence"]
    cfg = res["config"]
    r0 = cfg["ranks"][0]
    assert e["max_rel_diff"] < 1e-12
    assert {row["rank"] for row in e["rows"]} == {3 * r0, cfg["ranks"][-1]}
    for row in e["rows"]:
        r = row["rank"]
        assert row["multiplier"] == pytest.approx(row["multiplier_theory"], rel=1e-12)
        assert row["multiplier_theory"] == (r / r0 if row["optimizer"] == "sgd"
                                            else math.sqrt(r / r0))
        if row["eps"] == 0:
            assert row["product_max_rel_diff"] < 1e-12 and row["loss_max_rel_diff"] < 1e-12
        else:  # epsilon breaks the equivalence (it acts as eps / s on C = sB), a little
            assert 1e-12 < row["product_max_rel_diff"] < 0.1
        # without the multiplier the two rules do differ at the same lr
        assert abs(row["final_loss"] - row["final_loss_standard_same_lr"]) > 1e-3 * row[
            "final_loss"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rule_switch_is_a_b_lr_multiplier(optimizer):
    """Float64, a few steps: rsLoRA == standard with B's lr times (r/r0) (SGD) or sqrt(r/r0)
    (Adam, eps = 0) to rounding, and the other exponent is far off (the test can fail)."""
    cfg = StudyConfig(mode="quick", train_dim=24, ranks=(2, 6, 18), steps=25, batch=8, evals=5,
                      probe_ranks=(1, 2))
    delta, _ = study.spectra.make_delta(cfg, "facts", cfg.train_dim)
    prob = dynamics.Problem(cfg, "facts", delta, dtype=np.float64)
    lr = 0.05 if optimizer == "sgd" else 3e-3
    for r in (6, 18):
        row = equivalence.compare(cfg, prob, r, optimizer, lr, 0.0)
        assert row["product_max_rel_diff"] < 1e-12, row
        assert row["loss_max_rel_diff"] < 1e-12, row
        s_rs, s_std = dynamics.rule_scale(cfg, "rslora", r), dynamics.rule_scale(cfg, "standard", r)
        wrong = (s_rs / s_std) ** (1 if optimizer == "sgd" else 2)
        a = dynamics.train(cfg, prob, r, "rslora", optimizer, lr, eps=0.0, return_adapter=True)
        b = dynamics.train(cfg, prob, r, "standard", optimizer, lr, lr_b=lr * wrong, eps=0.0,
                           return_adapter=True)
        pa, pb = s_rs * a["B"] @ a["A"], s_std * b["B"] @ b["A"]
        assert np.max(np.abs(pa - pb)) / np.max(np.abs(pa)) > 1e-3


# --- the learning-rate search on a function with a known optimum ---------------------------------

def _search(f, points=7, widen=10):
    s = lrsearch.Search(points, widen)
    lrsearch.drive({"x": s}, lambda todo: [f(k) for _, k in todo])
    return s


@pytest.mark.parametrize("k_true", [3.3, 12.3, -4.6, 0.0, 6.5])
def test_lr_search_finds_a_known_optimum(k_true):
    """log(loss) quadratic in k: the interpolated optimum is exact, also beyond the first grid
    (the search widens at the edge until the optimum is inside)."""
    s = _search(lambda k: math.exp(0.3 * (k - k_true) ** 2 - 2))
    assert s.optimum_k() == pytest.approx(k_true, abs=1e-9)
    assert not s.at_edge()
    assert min(s.losses) < k_true < max(s.losses)
    assert s.summary(0.01)["optimum_lr"] == pytest.approx(0.01 * math.sqrt(2) ** k_true)


def test_lr_search_edges_and_divergence():
    s = _search(lambda k: math.exp(0.3 * (k - 40) ** 2), widen=4)  # beyond the widening limit
    assert s.at_edge() and max(s.losses) == 6 + 4 and s.optimum_k() == 10
    s = _search(lambda k: None if k > 4 else math.exp(-k))  # best next to a diverged point
    assert s.best_k() == 4 and s.optimum_k() == 4.0 and not s.at_edge()
    assert s.summary(1.0)["final_loss"][s.summary(1.0)["k"].index(5)] is None
    s = _search(lambda k: None)  # everything diverges: widen down to the limit, report the edge
    assert min(s.losses) == -10 and s.at_edge()
    with pytest.raises(ValueError, match="points"):
        lrsearch.Search(2, 4)


# --- 5. the nonlinear fine-tune -----------------------------------------------------------------

def test_mlp_backward_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    d, c, r, n, s = 6, 4, 3, 5, 1.7
    W = [rng.standard_normal((d, d)), rng.standard_normal((d, d)), rng.standard_normal((c, d))]
    b = [rng.standard_normal(d), rng.standard_normal(d), rng.standard_normal(c)]
    P = [rng.standard_normal((r, d)), rng.standard_normal((d, r)), rng.standard_normal((r, d)),
         rng.standard_normal((d, r))]
    x, y = rng.standard_normal((n, d)), rng.integers(0, c, n)
    adapters = [(P[0], P[1], s), (P[2], P[3], s)]
    logits, cache = mlp.forward(W, b, x, adapters)
    loss, dlogits = mlp.cross_entropy(logits, y)
    grads = mlp.backward_lora(W, dlogits, cache, adapters)
    T = [torch.tensor(p, requires_grad=True) for p in P]
    h = torch.tensor(x)
    for i in range(2):
        h = torch.relu(h @ torch.tensor(W[i]).T + torch.tensor(b[i])
                       + s * (h @ T[2 * i].T) @ T[2 * i + 1].T)
    ref = torch.nn.functional.cross_entropy(h @ torch.tensor(W[2]).T + torch.tensor(b[2]),
                                            torch.tensor(y))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    for g, t in zip(grads, T):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_mlp_fine_tune_learns_the_shifted_task(quick):
    _, res = quick
    mm = res["mlp"]
    start = mm["start_loss"]["values"]
    assert all(x > 0.3 for x in start)  # the shift makes the pretrained net wrong
    for o, rule, c in _cells(mm):
        for i, _ in enumerate(mm["ranks"]):
            for rep, v in enumerate(c["own_best"]["final_loss"][i]["values"]):
                assert v < 0.8 * start[rep]


# --- determinism and the command line -----------------------------------------------------------

def test_same_seed_same_results_json(tmp_path):
    a = study.run_study(tiny_config(3), tmp_path / "a", progress=False, workers=1)
    study.run_study(tiny_config(3), tmp_path / "b", progress=False, workers=2)
    assert (tmp_path / "a" / "results.json").read_bytes() == (
        tmp_path / "b" / "results.json").read_bytes()  # any number of workers
    ra, rb = ((tmp_path / x / "report.md").read_text() for x in "ab")
    assert TIMING.sub("", ra) == TIMING.sub("", rb)
    c = study.run(tiny_config(4), progress=False, workers=1)
    key = lambda res: res["lr_map"]["cells"]["sgd/rslora"]["searches"][0][1]["final_loss"]  # noqa: E731
    assert key(c) != key(a)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["config"]["seed"] == 3


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err
    return err


def test_cli_unknown_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["study", "--bogus"])
    assert e.value.code == 2
    _one_line_error(capsys, "unrecognized arguments: --bogus")
    with pytest.raises(SystemExit):
        cli.main(["study", "--seed", "abc"])
    _one_line_error(capsys, "--seed", "abc")


def test_cli_negative_seed_or_workers(tmp_path, capsys):
    assert cli.main(["study", "--quick", "--seed", "-1", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--seed")
    assert cli.main(["study", "--quick", "--workers", "0", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--workers")


def test_cli_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["study", "--quick", "--out", str(f)]) == 2
    _one_line_error(capsys, "not a directory", str(f))
    assert f.read_text() == "x"
    assert cli.main(["study", "--quick", "--out", str(f / "sub")]) == 2  # below a file
    _one_line_error(capsys, "cannot create output directory")


def test_cli_unwritable_dir(tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert cli.main(["study", "--quick", "--out", str(d / "new")]) == 2
        _one_line_error(capsys, "cannot create output directory")
    finally:
        d.chmod(0o700)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.md").write_text("keep me")
    assert cli.main(["study", "--quick", "--out", str(out)]) == 2
    _one_line_error(capsys, "already exists", "--force")
    # --force replaces only an earlier rslora output, never a folder of the user's
    assert cli.main(["study", "--quick", "--out", str(out), "--force"]) == 2
    _one_line_error(capsys, "not written by rslora")
    assert (out / "report.md").read_text() == "keep me"
    monkeypatch.setattr(study, "quick_config", tiny_config)  # --force path, at tiny sizes
    out = tmp_path / "o2"
    assert cli.main(["study", "--quick", "--workers", "1", "--out", str(out)]) == 0
    (out / "report.md").write_text("old")
    assert cli.main(["study", "--quick", "--workers", "1", "--force", "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# rsLoRA study")
    assert sorted(p for p in os.listdir(out)) == sorted(["report.md", "results.json",
                                                         ".rslora-output.json"] + FIGURES)
    assert sorted(os.listdir(tmp_path)) == ["o", "o2"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_cli_unwritable_dir_even_for_root(capsys):
    """/proc refuses new files whoever asks: the write probe, not os.access, must catch it."""
    assert cli.main(["study", "--quick", "--out", "/proc/self/fd"]) == 2
    _one_line_error(capsys, "already exists")
    assert cli.main(["study", "--quick", "--out", "/proc/self/fd/rslora-study"]) == 2
    _one_line_error(capsys, "cannot create output directory")
