"""rslora.synthetic: the style/facts generative models, regression data and PEFT's init."""

import math

import numpy as np
import pytest

from rslora import synthetic


@pytest.mark.parametrize("tau", [1.0, 6.0, 20.0])
def test_style_spectrum_is_exponential_with_unit_norm(tau):
    S = synthetic.style_spectrum(50, tau=tau, norm=2.5)
    assert S.dtype == np.float64 and S.shape == (50,)
    np.testing.assert_allclose(np.linalg.norm(S), 2.5, rtol=1e-14)
    np.testing.assert_allclose(S[1:] / S[:-1], math.exp(-1 / tau), rtol=1e-13)


@pytest.mark.parametrize("power", [0.25, 0.5, 1.0])
def test_facts_spectrum_is_a_power_law(power):
    S = synthetic.facts_spectrum(40, power=power)
    np.testing.assert_allclose(np.linalg.norm(S), 1.0, rtol=1e-14)
    i = np.arange(40)
    np.testing.assert_allclose(S / S[0], (1.0 + i) ** -power, rtol=1e-13)


@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (32, 32)])
@pytest.mark.parametrize("kind", ["style", "facts"])
def test_delta_has_the_model_spectrum(kind, shape):
    make = synthetic.style_delta if kind == "style" else synthetic.facts_delta
    delta, U, S, Vt = make(*shape, norm=3.0, seed=7, return_svd=True)
    k = min(shape)
    assert delta.shape == shape and delta.dtype == np.float64
    assert U.shape == (shape[0], k) and Vt.shape == (k, shape[1])
    np.testing.assert_allclose(np.linalg.svd(delta, compute_uv=False), S, atol=1e-13)
    np.testing.assert_allclose(np.linalg.norm(delta), 3.0, rtol=1e-13)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-13)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(k), atol=1e-13)
    np.testing.assert_allclose((U * S) @ Vt, delta, atol=1e-14)


def test_energy_shares_match_the_documented_formulas():
    k = 300
    S = synthetic.style_spectrum(k, tau=6.0)
    q = math.exp(-2 / 6.0)
    share = np.cumsum(S * S)
    r = np.arange(1, k + 1)
    np.testing.assert_allclose(share, (1 - q ** r) / (1 - q ** k), rtol=1e-12)
    S = synthetic.facts_spectrum(k)
    H = np.cumsum(1.0 / r)
    np.testing.assert_allclose(np.cumsum(S * S), H / H[-1], rtol=1e-12)


def test_seeded_and_float32():
    a = synthetic.facts_delta(30, 20, seed=3, dtype=np.float32)
    b = synthetic.facts_delta(30, 20, seed=3, dtype=np.float32)
    c = synthetic.facts_delta(30, 20, seed=4, dtype=np.float32)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ref = synthetic.facts_delta(30, 20, seed=3)  # the float32 delta is the float64 one, rounded
    np.testing.assert_array_equal(a, ref.astype(np.float32))
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(synthetic.style_delta(8, 8, seed=g1),
                                  synthetic.style_delta(8, 8, seed=g2))


def test_random_orthonormal_is_haar_signed():
    Q = synthetic.random_orthonormal(20, 6, seed=1)
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-14)
    # Haar: the diagonal of Q's R factor convention must not bias signs; over many draws the
    # first entry of the first column is symmetric around 0.
    firsts = [synthetic.random_orthonormal(5, 1, seed=s)[0, 0] for s in range(400)]
    assert abs(np.mean(np.sign(firsts))) < 0.2


def test_delta_from_spectrum_rank_deficient_and_zero():
    S = np.array([2.0, 1.0, 0.0])
    delta = synthetic.delta_from_spectrum(S, 6, 5, seed=0)
    np.testing.assert_allclose(np.linalg.svd(delta, compute_uv=False)[:3], S, atol=1e-14)
    assert np.linalg.matrix_rank(delta) == 2
    empty = synthetic.delta_from_spectrum(np.zeros(0), 4, 3, seed=0)
    np.testing.assert_array_equal(empty, np.zeros((4, 3)))


def test_regression_batch_population_loss():
    delta = synthetic.style_delta(12, 9, seed=2)
    x, y = synthetic.regression_batch(delta, 5, seed=1)
    assert x.shape == (5, 9) and y.shape == (5, 12)
    np.testing.assert_allclose(y, x @ delta.T, rtol=1e-15)
    # E||x M^T - y||^2 = ||M - delta||_F^2 for x ~ N(0, I)
    M = synthetic.facts_delta(12, 9, seed=3)
    x, y = synthetic.regression_batch(delta, 200_000, seed=4)
    emp = np.mean(np.sum((x @ M.T - y) ** 2, axis=1))
    np.testing.assert_allclose(emp, np.linalg.norm(M - delta) ** 2, rtol=0.02)
    x32, y32 = synthetic.regression_batch(delta.astype(np.float32), 3, seed=0)
    assert x32.dtype == y32.dtype == np.float32


def test_lora_init_matches_torch_kaiming_uniform():
    torch = pytest.importorskip("torch")
    d_in, d_out, r = 400, 30, 64
    A, B = synthetic.lora_init(d_out, d_in, r, seed=0, dtype=np.float32)
    assert A.shape == (r, d_in) and B.shape == (d_out, r)
    assert A.dtype == B.dtype == np.float32 and not B.any()
    t = torch.empty(r, d_in)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # what PEFT does to lora_A
    t = t.numpy()
    bound = 1 / math.sqrt(d_in)
    for M in (A, t):
        assert np.abs(M).max() <= bound
        assert np.abs(M).max() > 0.99 * bound
        np.testing.assert_allclose(M.var(), bound ** 2 / 3, rtol=0.02)
    A2, _ = synthetic.lora_init(d_out, d_in, r, seed=0, dtype=np.float32)
    np.testing.assert_array_equal(A, A2)
    A0, B0 = synthetic.lora_init(3, 4, 0)
    assert A0.shape == (0, 4) and B0.shape == (3, 0)


@pytest.mark.parametrize("call, exc, word", [
    (lambda: synthetic.style_delta(0, 4), ValueError, "d_out"),
    (lambda: synthetic.facts_delta(4, -1), ValueError, "d_in"),
    (lambda: synthetic.style_delta(4, 4.0), TypeError, "d_in"),
    (lambda: synthetic.style_delta(4, 4, tau=0), ValueError, "tau"),
    (lambda: synthetic.style_delta(4, 4, tau=float("nan")), ValueError, "tau"),
    (lambda: synthetic.facts_delta(4, 4, power=-1), ValueError, "power"),
    (lambda: synthetic.facts_delta(4, 4, norm=0), ValueError, "norm"),
    (lambda: synthetic.style_delta(4, 4, dtype=np.int64), TypeError, "dtype"),
    (lambda: synthetic.style_delta(4, 4, dtype=np.float16), TypeError, "dtype"),
    (lambda: synthetic.delta_from_spectrum([1, 2, 3], 2, 5), ValueError, "S has 3"),
    (lambda: synthetic.delta_from_spectrum([[1.0]], 2, 5), ValueError, "S must be 1-D"),
    (lambda: synthetic.delta_from_spectrum([-1.0], 2, 5), ValueError, "non-negative"),
    (lambda: synthetic.random_orthonormal(3, 4), ValueError, "k must be <= m"),
    (lambda: synthetic.regression_batch(np.ones(3), 2), ValueError, "delta must be 2-D"),
    (lambda: synthetic.regression_batch(np.ones((2, 2), dtype=int), 2), TypeError, "dtype"),
    (lambda: synthetic.regression_batch(np.ones((2, 2)), -1), ValueError, "n must be"),
    (lambda: synthetic.lora_init(4, 4, -1), ValueError, "r must be"),
])
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
