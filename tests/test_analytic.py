"""Exact targets: scores are gradients of the log densities, denoisers satisfy Tweedie's formula,
the empirical denoiser is a mean-shift step, and sampling has the right moments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from jaxdiff.analytic import Empirical, Gaussian, GaussianMixture, mean_shift
from jaxdiff.processes import EDM, VE, VP, DiscreteVP, RectifiedFlow, SubVP, VPCosine

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow(), DiscreteVP.linear()]
IDS = [type(p).__name__ for p in PROCESSES]
parametrize = pytest.mark.parametrize("process", PROCESSES, ids=IDS)

_k = jax.random.split(jax.random.key(0), 4)
_a = jax.random.normal(_k[0], (3, 3))
GAUSSIAN = Gaussian(jnp.array([0.5, -1.0, 2.0]), _a @ _a.T + 0.1 * jnp.eye(3))
MIX_ISO = GaussianMixture(
    jnp.array([[-1.5, 0.0, 1.0], [1.0, 1.0, 0.0], [0.5, -1.5, -0.5]]),
    jnp.array([0.3, 0.5, 0.2]),
    jnp.array([0.5, 0.3, 0.2]),
)
MIX_DIAG = GaussianMixture(
    MIX_ISO.means, jnp.array([[0.3, 0.6, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.7]]), MIX_ISO.weights
)
EMPIRICAL = Empirical(jax.random.normal(_k[1], (40, 3)), chunk=16)
# Every process for the Gaussian and the (diagonal) mixture; the empirical target depends on the
# process only through alpha_t and sigma_t, so VP (alpha != 1) suffices (its scans are costly).
CASES = (
    [("gaussian", GAUSSIAN, p) for p in PROCESSES]
    + [("mixture", MIX_DIAG, p) for p in PROCESSES]
    + [("empirical", EMPIRICAL, VP())]
)


def points(process, n=5):
    """Noisy mixture samples at n times inside the range, and alpha_t, sigma_t (numpy)."""
    t = np.linspace(process.t_min, process.t_max, n + 2)[1:-1]
    x0 = MIX_ISO.sample(n, key=jax.random.key(2))
    x = process.sample_marginal(x0, jnp.asarray(t), key=jax.random.key(3))[0]
    return np.asarray(x), t, np.asarray(process.alpha(t)), np.asarray(process.sigma(t))


@jax.jit
def tweedie_terms(target, process, x, t):
    """Score, denoiser and the autodiff gradient of log p_t: one compilation per case."""
    grad = jax.grad(lambda x: jnp.sum(target.logp(process, x, t)))(x)  # examples independent
    return target.score(process)(x, t), target.denoiser(process)(x, t), grad


@pytest.mark.parametrize(
    "name, target, process", CASES, ids=[f"{n}-{type(p).__name__}" for n, _, p in CASES]
)
def test_score_is_grad_logp_and_denoiser_is_tweedie(name, target, process):
    x, t, a, s = points(process)
    score, x0_hat, grad = tweedie_terms(target, process, x, t)
    scale = np.max(1.0 / s**2)  # size of the score
    np.testing.assert_allclose(score, grad, rtol=1e-8, atol=1e-10 * scale)
    # Tweedie: x0_hat = (x + sigma^2 grad log p_t) / alpha.
    ref = (x + s[:, None] ** 2 * np.asarray(grad)) / a[:, None]
    np.testing.assert_allclose(x0_hat, ref, rtol=1e-7, atol=1e-9)


@parametrize
def test_gaussian_logp_is_closed_form(process):
    # p_t = N(alpha m, alpha^2 C + sigma^2 I).
    x, t, a, s = points(process)
    m, c = np.asarray(GAUSSIAN.mean), np.asarray(GAUSSIAN.cov)
    ref = [
        multivariate_normal.logpdf(x[i], a[i] * m, a[i] ** 2 * c + s[i] ** 2 * np.eye(3))
        for i in range(len(t))
    ]
    np.testing.assert_allclose(GAUSSIAN.logp(process, x, t), ref, rtol=1e-10)


@parametrize
def test_mixture_logp_is_logsumexp_of_components(process):
    x, t, a, s = points(process)
    a, s = a[:, None], s[:, None]
    for mix in (MIX_ISO, MIX_DIAG):
        mu, sc, w = (np.asarray(v) for v in (mix.means, mix.scales, mix.weights))
        comps = [
            np.log(w[k]) + norm.logpdf(x, a * mu[k], np.sqrt(a**2 * sc[k] ** 2 + s**2)).sum(1)
            for k in range(3)
        ]
        np.testing.assert_allclose(mix.logp(process, x, t), logsumexp(comps, axis=0), rtol=1e-10)


def naive_mean_shift(data, x, h):
    """softmax_i(-|x - y_i|^2 / 2h^2) y_i, all pairs at once (numpy, float64)."""
    data, x, h = np.asarray(data), np.asarray(x), np.asarray(h)
    d2 = ((x[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    logit = -d2 / (2 * h[:, None] ** 2)
    w = np.exp(logit - logit.max(1, keepdims=True))
    return (w / w.sum(1, keepdims=True)) @ data


def test_empirical_denoiser_is_chunked_mean_shift():
    # 3000 points x 64 queries x 50 dims with chunks of 512 (the last chunk is padded); VP, so
    # that alpha_t != 1 and the bandwidth sigma_t / alpha_t differs per query.
    process = VP()
    rng = np.random.default_rng(4)
    data = rng.standard_normal((3000, 50))
    x0 = data[:64] + 0.3 * rng.standard_normal((64, 50))
    t = np.linspace(0.05, 0.5, 64)
    a, s = np.asarray(process.alpha(t))[:, None], np.asarray(process.sigma(t))[:, None]
    x = a * x0 + s * rng.standard_normal((64, 50))
    ref = naive_mean_shift(data, x / a, (s / a)[:, 0])  # bandwidth sigma / alpha
    emp = Empirical(jnp.asarray(data), chunk=512)
    np.testing.assert_allclose(emp.denoiser(process)(x, t), ref, rtol=1e-9, atol=1e-11)
    shifted = mean_shift(jnp.asarray(data), x / a, (s / a)[:, 0], chunk=512)
    np.testing.assert_allclose(shifted, ref, rtol=1e-9, atol=1e-11)
    # Its log density: log (1/N) sum_i N(x; alpha y_i, sigma^2 I).
    d2 = ((x[:, None] - a[:, :, None] * data[None]) ** 2).sum(-1)
    ref_logp = (
        logsumexp(-d2 / (2 * s**2), axis=1) - np.log(3000) - 25 * np.log(2 * np.pi * s[:, 0] ** 2)
    )
    np.testing.assert_allclose(emp.logp(process, x, t), ref_logp, rtol=1e-10)


def test_empirical_handles_image_shaped_data():
    rng = np.random.default_rng(6)
    data, x = rng.standard_normal((100, 2, 4, 4)), rng.standard_normal((8, 2, 4, 4))
    out = Empirical(jnp.asarray(data), chunk=32).denoiser(EDM())(jnp.asarray(x), 0.7)
    ref = naive_mean_shift(data.reshape(100, -1), x.reshape(8, -1), np.full(8, 0.7))
    assert out.shape == (8, 2, 4, 4)
    np.testing.assert_allclose(np.asarray(out).reshape(8, -1), ref, rtol=1e-9, atol=1e-12)


def test_mixture_sampling_moments():
    n = 50_000
    for mix in (MIX_ISO, MIX_DIAG):
        x = np.asarray(mix.sample(n, key=jax.random.key(8)))
        w, mu, s2 = np.asarray(mix.weights), np.asarray(mix.means), np.asarray(mix.scales) ** 2
        mean = w @ mu
        cov = np.einsum("k,ki,kj->ij", w, mu, mu) + np.diag(w @ s2) - np.outer(mean, mean)
        assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
        # Standard error of each covariance entry, estimated from the sample itself.
        xc = x - x.mean(0)
        prods = xc[:, :, None] * xc[:, None, :]
        assert np.all(np.abs(prods.mean(0) - cov) < 5 * prods.std(0) / np.sqrt(n))


def test_gaussian_sampling_moments():
    n = 100_000
    x = np.asarray(GAUSSIAN.sample(n, key=jax.random.key(9)))
    m, c = np.asarray(GAUSSIAN.mean), np.asarray(GAUSSIAN.cov)
    assert np.all(np.abs(x.mean(0) - m) < 5 * np.sqrt(np.diag(c) / n))
    # Variance of a sample covariance entry for Gaussian data: (C_ii C_jj + C_ij^2) / n.
    se_cov = np.sqrt((np.outer(np.diag(c), np.diag(c)) + c**2) / n)
    assert np.all(np.abs(np.cov(x.T) - c) < 5 * se_cov)


def test_mixture_responsibilities_and_class_log_prob():
    process = VP()
    x, t, _, _ = points(process)
    resp = np.asarray(MIX_ISO.responsibilities(process, x, t))
    np.testing.assert_allclose(resp.sum(1), 1.0, rtol=1e-12)
    labels = np.array([0, 1, 2, 0, 1])
    log_prob = MIX_ISO.class_log_prob(process, x, t, jnp.asarray(labels))
    np.testing.assert_allclose(log_prob, np.log(resp[np.arange(5), labels]), rtol=1e-10)
    # The mixture's denoiser is the responsibility-weighted mean of its components' denoisers.
    parts = np.stack([MIX_ISO.component(k).denoiser(process)(x, t) for k in range(3)], 1)
    ref = (resp[..., None] * parts).sum(1)
    np.testing.assert_allclose(MIX_ISO.denoiser(process)(x, t), ref, rtol=1e-10)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="cov of shape"):
        Gaussian(jnp.zeros(3), jnp.eye(2))
    with pytest.raises(ValueError, match="scales must have shape"):
        GaussianMixture(jnp.zeros((3, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture(jnp.zeros((3, 2)), jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match="data must have shape"):
        Empirical(jnp.zeros(5))


@pytest.mark.parametrize(
    "target", [GAUSSIAN, MIX_ISO, EMPIRICAL], ids=["gaussian", "mixture", "empirical"]
)
def test_time_of_the_wrong_length_names_t(target):
    process, x = VP(), jnp.zeros((4, 3))
    calls = {
        "denoiser": lambda t: target.denoiser(process)(x, t),
        "score": lambda t: target.score(process)(x, t),
        "logp": lambda t: target.logp(process, x, t),
    }
    for name, call in calls.items():
        assert call(jnp.full((4,), 0.5)).shape[:1] == (4,), name
        for t in (jnp.full((3,), 0.5), jnp.full((4, 1), 0.5), jnp.full((1,), 0.5)):
            with pytest.raises(
                ValueError, match=r"t must be a scalar or have shape \(batch,\) = \(4,\)"
            ):
                call(t)
            with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
                jax.jit(call)(t)
    if isinstance(target, GaussianMixture):
        with pytest.raises(ValueError, match="t must be a scalar"):
            target.class_log_prob(process, x, jnp.full((2,), 0.5), jnp.zeros(4, int))


@parametrize
def test_isotropic_mixture_matmul_path_equals_diagonal_path(process):
    # Isotropic scales (k,) take the x @ means.T path; the same scales given as (k, d) take the
    # per-component-difference path. Equal to float64 rounding, at scalar and batched t.
    diag = GaussianMixture(MIX_ISO.means, MIX_ISO.scales, MIX_ISO.weights)
    assert MIX_ISO.isotropic and not diag.isotropic
    x, t, _, _ = points(process, n=7)
    for tt in [t, *t[[0, 3, 6]]]:
        for method in ("posterior_mean", "logp", "responsibilities"):
            got = getattr(MIX_ISO, method)(process, x, tt)
            ref = getattr(diag, method)(process, x, tt)
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12, err_msg=method)
        np.testing.assert_allclose(
            MIX_ISO.score(process)(x, tt), diag.score(process)(x, tt), rtol=1e-12, atol=1e-12
        )
    assert MIX_ISO.component(1).isotropic
