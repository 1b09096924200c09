"""Exact targets: scores are gradients of the log densities, denoisers satisfy Tweedie's formula,
the empirical denoiser is a mean-shift step, and sampling has the right moments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.analytic import Empirical, Gaussian, GaussianMixture, mean_shift
from jaxdiff.processes import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow()]
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
# process only through alpha_t and sigma_t, so two processes suffice (its scan compiles per call).
CASES = (
    [("gaussian", GAUSSIAN, p) for p in PROCESSES]
    + [("mixture", MIX_DIAG, p) for p in PROCESSES]
    + [("empirical", EMPIRICAL, p) for p in (VP(), EDM())]
)


def points(process, key=2, n=5):
    t = jnp.linspace(process.t_min, process.t_max, n + 2)[1:-1]
    x0 = MIX_ISO.sample(n, key=jax.random.key(key))
    return process.sample_marginal(x0, t, key=jax.random.key(key + 1))[0], t


def col(v):
    return v[:, None]


@pytest.mark.parametrize(
    "name, target, process", CASES, ids=[f"{n}-{type(p).__name__}" for n, _, p in CASES]
)
def test_score_is_grad_logp_and_denoiser_is_tweedie(name, target, process):
    x, t = points(process)
    grad = jax.grad(lambda x: jnp.sum(target.logp(process, x, t)))(x)  # examples independent
    score = target.score(process)(x, t)
    scale = 1.0 / process.sigma(t) ** 2  # size of the score
    np.testing.assert_allclose(score, grad, rtol=1e-8, atol=1e-10 * float(jnp.max(scale)))
    # Tweedie: x0_hat = (x + sigma^2 grad log p_t) / alpha.
    a, s = col(process.alpha(t)), col(process.sigma(t))
    np.testing.assert_allclose(
        target.denoiser(process)(x, t), (x + s**2 * grad) / a, rtol=1e-7, atol=1e-9
    )


@parametrize
def test_gaussian_logp_is_closed_form(process):
    x, t = points(process)
    a, s = process.alpha(t), process.sigma(t)
    ref = [
        jax.scipy.stats.multivariate_normal.logpdf(
            x[i], a[i] * GAUSSIAN.mean, a[i] ** 2 * GAUSSIAN.cov + s[i] ** 2 * jnp.eye(3)
        )
        for i in range(x.shape[0])
    ]
    np.testing.assert_allclose(GAUSSIAN.logp(process, x, t), jnp.stack(ref), rtol=1e-10)


@parametrize
def test_mixture_logp_is_logsumexp_of_components(process):
    x, t = points(process)
    a, s = col(process.alpha(t)), col(process.sigma(t))
    for mix in (MIX_ISO, MIX_DIAG):
        comps = []
        for k in range(3):
            std = jnp.sqrt(a**2 * mix.scales[k] ** 2 + s**2)
            logn = jax.scipy.stats.norm.logpdf(x, a * mix.means[k], std).sum(axis=1)
            comps.append(jnp.log(mix.weights[k]) + logn)
        ref = jax.scipy.special.logsumexp(jnp.stack(comps), axis=0)
        np.testing.assert_allclose(mix.logp(process, x, t), ref, rtol=1e-10)


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
    kd, kx = jax.random.split(jax.random.key(4))
    data = jax.random.normal(kd, (3000, 50))
    x0 = data[:64] + 0.3 * jax.random.normal(kx, (64, 50))
    t = jnp.linspace(0.05, 0.5, 64) * process.t_max
    x = process.marginal(x0, jax.random.normal(jax.random.key(5), x0.shape), t)
    a, s = process.alpha(t), process.sigma(t)
    ref = naive_mean_shift(data, x / col(a), s / a)  # bandwidth sigma / alpha
    emp = Empirical(data, chunk=512)
    np.testing.assert_allclose(emp.denoiser(process)(x, t), ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(
        mean_shift(data, x / col(a), s / a, chunk=512), ref, rtol=1e-9, atol=1e-11
    )
    # Its log density: log mean_i N(x; alpha y_i, sigma^2 I).
    d2 = (
        (np.asarray(x)[:, None] - np.asarray(col(a))[:, :, None] * np.asarray(data)[None]) ** 2
    ).sum(-1)
    s_ = np.asarray(s)
    ref_logp = (
        jax.scipy.special.logsumexp(-d2 / (2 * s_[:, None] ** 2), axis=1)
        - np.log(3000)
        - 25 * np.log(2 * np.pi * s_**2)
    )
    np.testing.assert_allclose(emp.logp(process, x, t), ref_logp, rtol=1e-10)


def test_empirical_handles_image_shaped_data():
    data = jax.random.normal(jax.random.key(6), (100, 2, 4, 4))
    x = jax.random.normal(jax.random.key(7), (8, 2, 4, 4))
    out = Empirical(data, chunk=32).denoiser(EDM())(x, 0.7)
    ref = naive_mean_shift(data.reshape(100, -1), x.reshape(8, -1), np.full(8, 0.7))
    assert out.shape == (8, 2, 4, 4)
    np.testing.assert_allclose(out.reshape(8, -1), ref, rtol=1e-9, atol=1e-12)


def test_mixture_sampling_moments():
    n = 50_000
    for mix in (MIX_ISO, MIX_DIAG):
        x = mix.sample(n, key=jax.random.key(8))
        w, mu, s2 = mix.weights, mix.means, mix.scales**2
        mean = w @ mu
        second = jnp.einsum("k,ki,kj->ij", w, mu, mu) + jnp.diag(w @ s2)
        cov = second - jnp.outer(mean, mean)
        se_mean = jnp.sqrt(jnp.diag(cov) / n)
        assert jnp.all(jnp.abs(jnp.mean(x, 0) - mean) < 5 * se_mean)
        # Variance of the sample covariance entries, estimated from the sample itself.
        xc = x - jnp.mean(x, 0)
        prods = xc[:, :, None] * xc[:, None, :]
        se_cov = jnp.std(prods, axis=0) / np.sqrt(n)
        assert jnp.all(jnp.abs(jnp.mean(prods, 0) - cov) < 5 * se_cov)


def test_gaussian_sampling_moments():
    n = 100_000
    x = GAUSSIAN.sample(n, key=jax.random.key(9))
    cov = GAUSSIAN.cov
    assert jnp.all(jnp.abs(jnp.mean(x, 0) - GAUSSIAN.mean) < 5 * jnp.sqrt(jnp.diag(cov) / n))
    # Var of a sample covariance entry for Gaussian data: (C_ii C_jj + C_ij^2) / n.
    se_cov = jnp.sqrt((jnp.outer(jnp.diag(cov), jnp.diag(cov)) + cov**2) / n)
    assert jnp.all(jnp.abs(jnp.cov(x.T) - cov) < 5 * se_cov)


def test_mixture_responsibilities_and_class_log_prob():
    process = VP()
    x, t = points(process)
    resp = MIX_ISO.responsibilities(process, x, t)
    np.testing.assert_allclose(resp.sum(1), 1.0, rtol=1e-12)
    labels = jnp.array([0, 1, 2, 0, 1])
    np.testing.assert_allclose(
        MIX_ISO.class_log_prob(process, x, t, labels),
        jnp.log(resp[jnp.arange(5), labels]),
        rtol=1e-10,
    )
    # The mixture's denoiser is the responsibility-weighted mean of its components' denoisers.
    parts = jnp.stack([MIX_ISO.component(k).denoiser(process)(x, t) for k in range(3)], 1)
    np.testing.assert_allclose(
        MIX_ISO.denoiser(process)(x, t), jnp.sum(resp[..., None] * parts, 1), rtol=1e-10
    )


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="cov of shape"):
        Gaussian(jnp.zeros(3), jnp.eye(2))
    with pytest.raises(ValueError, match="scales must have shape"):
        GaussianMixture(jnp.zeros((3, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture(jnp.zeros((3, 2)), jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match="data must have shape"):
        Empirical(jnp.zeros(5))
