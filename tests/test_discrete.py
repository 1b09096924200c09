"""The discrete DDPM chain (jaxdiff.discrete, samplers.discrete_ddpm), checked in closed form.

- the chain's coefficients equal Ho et al.'s beta-table formulas (x64, 1e-12); the posterior mean
  through x0_hat equals Eq. 11 through eps_hat; q(x_n | x_0) is the composition of the steps;
- respacing: the respaced table keeps the kept alphas_cumprod, and sampling it equals sampling
  the original chain on the sub-grid; FixedSmall is samplers.ddpm;
- the law of the chain on a Gaussian target after ancestral sampling with the exact denoiser
  equals a closed-form linear-Gaussian recursion written here in NumPy (moments, MC tolerance);
- many steps: the chain approaches the reverse SDE (Euler-Maruyama on the same grid, and the
  closed-form law's distance to the data shrinks with N);
- Analytic-DPM's variance equals its closed form on a Gaussian target;
- the variational bound: KL and decoder terms in closed form, the bound exceeds the model's exact
  NLL, the optimal learned variance, importance sampling and the hybrid loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from _xla import OPTIMIZED

import jaxdiff
from jaxdiff import discrete as D
from jaxdiff.analytic import Gaussian

KEY = jax.random.key(0)
SMALL = jaxdiff.DiscreteVP.linear(n=50, beta_start=1e-3, beta_end=0.2)
MEAN = np.array([0.5, -0.3])
COV = np.array([[0.6, 0.25], [0.25, 0.3]])
TARGET = Gaussian(jnp.asarray(MEAN), jnp.asarray(COV))


def np_abar(process):
    return np.cumprod(1.0 - np.asarray(process.betas, np.float64))


def ho_coefficients(abar_t, abar_s):
    """Ho et al. Eq. 7 written with the (respaced) beta = 1 - abar_t / abar_s."""
    beta = 1.0 - abar_t / abar_s
    c0 = np.sqrt(abar_s) * beta / (1.0 - abar_t)
    ct = np.sqrt(1.0 - beta) * (1.0 - abar_s) / (1.0 - abar_t)
    return beta, (1.0 - abar_s) / (1.0 - abar_t) * beta, c0, ct


# --------------------------------------------------------------------------------------------
# The chain's coefficients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", ["linear", "scaled_linear", "cosine"])
def test_transition_between_knots_is_the_beta_table(builder):
    ddpm = getattr(jaxdiff.DiscreteVP, builder)(n=200)
    abar = np_abar(ddpm)
    n = np.arange(1, 200)
    tr = D.transition(ddpm, D.step_times(ddpm, n), D.step_times(ddpm, n - 1))
    beta, beta_tilde, c0, ct = ho_coefficients(abar[1:], abar[:-1])
    np.testing.assert_allclose(tr.beta, np.asarray(ddpm.betas)[1:], rtol=1e-11)
    np.testing.assert_allclose(tr.beta_tilde, beta_tilde, rtol=1e-11)
    np.testing.assert_allclose(tr.coef_x0, c0, rtol=1e-11)
    np.testing.assert_allclose(tr.coef_xt, ct, rtol=1e-11)
    np.testing.assert_allclose(tr.alpha**2, 1.0 - beta, rtol=1e-12)
    # the first step comes from the data: beta_tilde = 0, the mean is x0
    tr0 = D.transition(ddpm, D.step_times(ddpm, 0), 0.0)
    assert float(tr0.beta_tilde) == 0.0 and abs(float(tr0.coef_x0) - 1.0) < 1e-12
    np.testing.assert_allclose(tr0.beta, np.asarray(ddpm.betas)[0], rtol=1e-12)


def test_posterior_mean_through_x0_hat_is_eq_11_through_eps_hat():
    """Ho et al. Eq. 11: mu = (x_t - beta / sqrt(1 - abar_t) eps_hat) / sqrt(1 - beta), also for
    respaced pairs of steps."""
    ddpm = jaxdiff.DiscreteVP.cosine(n=100)
    abar = np_abar(ddpm)
    x = jax.random.normal(KEY, (6, 3))
    eps_hat = jax.random.normal(jax.random.key(1), (6, 3))
    for n, m in [(1, 0), (50, 49), (99, 98), (99, 60), (30, 3)]:
        t, s = D.step_times(ddpm, n), D.step_times(ddpm, m)
        x0_hat = ddpm.x0_from_eps(x, eps_hat, t)
        mean, var = D.posterior(ddpm, x, x0_hat, t, s)
        beta = 1.0 - abar[n] / abar[m]
        eq11 = (np.asarray(x) - beta / np.sqrt(1 - abar[n]) * np.asarray(eps_hat)) / np.sqrt(
            1 - beta
        )
        np.testing.assert_allclose(mean, eq11, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var, (1 - abar[m]) / (1 - abar[n]) * beta, rtol=1e-11)


def test_forward_steps_compose_to_the_marginal():
    """Iterating q(x_n | x_{n-1}) from x0 gives q(x_n | x0) = N(sqrt(abar_n) x0, 1 - abar_n)."""
    ddpm = jaxdiff.DiscreteVP.linear(n=300)
    x0 = jnp.array([[1.5, -2.0]])
    step = jax.jit(lambda m, n: D.forward_step(ddpm, m, D.step_times(ddpm, n), n / 300))
    mean, var = x0, 0.0
    for n in range(300):
        mean, beta = step(mean, n)
        var = (1.0 - beta) * var + beta
    abar = np_abar(ddpm)[-1]
    np.testing.assert_allclose(mean, np.sqrt(abar) * np.asarray(x0), rtol=1e-11)
    np.testing.assert_allclose(var, 1.0 - abar, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Respacing and the sampler
# --------------------------------------------------------------------------------------------
def test_respace_keeps_alphas_cumprod_and_grid():
    ddpm = jaxdiff.DiscreteVP.linear()
    steps = D.respaced_steps(1000, 25)
    assert steps[0] == 0 and steps[-1] == 999 and len(set(steps)) == 25
    short = D.respace(ddpm, steps)
    np.testing.assert_allclose(short.alphas_cumprod, np_abar(ddpm)[steps], rtol=1e-12)
    ts = np.asarray(D.grid(ddpm, steps))
    np.testing.assert_allclose(ts[:-1], (steps[::-1] + 1) / 1000, rtol=1e-15)
    assert ts[-1] == 0.0
    for bad in ([3, 2], [0, 1000], [-1, 5], [[0, 1]]):
        with pytest.raises(ValueError, match="steps"):
            D.grid(ddpm, np.array(bad))
    with pytest.raises(ValueError, match="count"):
        D.respaced_steps(10, 11)


@pytest.mark.parametrize("variance", [D.FixedLarge(), D.FixedSmall()], ids=["large", "small"])
def test_sampling_the_respaced_chain_equals_sampling_the_sub_grid(variance):
    ddpm = jaxdiff.DiscreteVP.linear()
    steps = D.respaced_steps(1000, 12)
    short = D.respace(ddpm, steps)
    x_T = jax.random.normal(KEY, (64, 2))
    run = lambda p, ts: (
        jaxdiff.sample(
            jaxdiff.samplers.discrete_ddpm(p, variance), TARGET.denoiser(p), x_T, ts, key=KEY
        ).x
    )
    a, b = run(ddpm, D.grid(ddpm, steps)), run(short, D.grid(short))
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_fixed_small_is_the_ddpm_sampler_and_learned_v_interpolates():
    ddpm = SMALL
    ts = D.grid(ddpm, D.respaced_steps(50, 20))
    x_T = jax.random.normal(KEY, (32, 2))
    denoise = TARGET.denoiser(ddpm)

    def run(sampler):
        return jaxdiff.sample(sampler, denoise, x_T, ts, key=KEY).x

    small = run(jaxdiff.samplers.discrete_ddpm(ddpm))
    np.testing.assert_allclose(small, run(jaxdiff.samplers.ddpm(ddpm)), rtol=1e-10, atol=1e-12)
    large = run(jaxdiff.samplers.discrete_ddpm(ddpm, D.FixedLarge()))
    for v, expected in [(0.0, small), (1.0, large)]:
        learned = D.Learned(lambda x, t, v=v: jnp.full_like(x, v))
        out = run(jaxdiff.samplers.discrete_ddpm(ddpm, learned))
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_learned_variance_model_splits_a_doubled_network():
    ddpm = SMALL

    def net(x, t):  # eps = 0 (so x0_hat = x / alpha), v = 0.25
        return jnp.concatenate([jnp.zeros_like(x), jnp.full_like(x, 0.25)], axis=-1)

    denoise, variance = D.learned_variance_model(net, ddpm)
    x, t, s = jnp.ones((3, 2)), D.step_times(ddpm, 20), D.step_times(ddpm, 10)
    np.testing.assert_allclose(denoise(x, t), x / ddpm.alpha(t), rtol=1e-12)
    tr = D.transition(ddpm, t, s)
    expected = 0.25 * np.log(tr.beta) + 0.75 * np.log(tr.beta_tilde)
    np.testing.assert_allclose(variance.log_variance(ddpm, x, t, tr), expected + 0 * x, rtol=1e-12)
    with pytest.raises(ValueError, match="twice the channels"):
        D.learned_variance_model(lambda x, t: x, ddpm)[0](x, t)


# --------------------------------------------------------------------------------------------
# The law of the chain on a Gaussian target, in closed form
# --------------------------------------------------------------------------------------------
def np_chain_law(abar_grid, variance, mean0, cov0, m=MEAN, c=COV):
    """Mean and covariance of DDPM ancestral sampling with the exact denoiser of N(m, c), from
    x_T ~ N(mean0, cov0) over the steps with cumulative products ``abar_grid`` (decreasing noise
    order: abar_grid[0] is the first step), returning x0_hat at the last step.

    Every step is linear-Gaussian: x0_hat = m + K (x - a m), K = a c (a^2 c + (1 - a^2) I)^-1, and
    x_s = c0 x0_hat + ct x + sqrt(var) z (Ho et al. Eq. 6-7 with the respaced beta)."""
    d = len(m)
    mu, cov = np.asarray(mean0, float), np.asarray(cov0, float)
    for k in range(len(abar_grid)):
        ab = abar_grid[k]
        a = np.sqrt(ab)
        K = a * c @ np.linalg.inv(ab * c + (1 - ab) * np.eye(d))
        b = m - K @ (a * m)
        if k == len(abar_grid) - 1:  # last step: x0_hat
            return K @ mu + b, K @ cov @ K.T
        beta, beta_tilde, c0, ct = ho_coefficients(ab, abar_grid[k + 1])
        A = c0 * K + ct * np.eye(d)
        var = {"large": beta, "small": beta_tilde}[variance]
        mu, cov = A @ mu + c0 * b, A @ cov @ A.T + var * np.eye(d)


@pytest.mark.parametrize("variance", ["large", "small"])
def test_law_of_the_chain_on_a_gaussian_is_the_closed_form_recursion(variance):
    ddpm = SMALL
    steps = D.respaced_steps(50, 10)
    n = 40_000
    x_T = jax.random.normal(KEY, (n, 2))
    var = {"large": D.FixedLarge(), "small": D.FixedSmall()}[variance]
    sampler = jaxdiff.samplers.discrete_ddpm(ddpm, var)
    x = np.asarray(
        jaxdiff.sample(sampler, TARGET.denoiser(ddpm), x_T, D.grid(ddpm, steps), key=KEY).x
    )
    mu, cov = np_chain_law(np_abar(ddpm)[steps[::-1]], variance, np.zeros(2), np.eye(2))
    se = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mu), 5 * se)
    # covariance entries: standard error of a sample covariance ~ sqrt((c_ii c_jj + c_ij^2)/n)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * se_cov)
    # the two variances give laws that differ by much more than the tolerance
    other = np_chain_law(np_abar(ddpm)[steps[::-1]], {"large": "small", "small": "large"}[variance],
                         np.zeros(2), np.eye(2))[1]  # fmt: skip
    assert np.max(np.abs(other - cov)) > 20 * np.max(se_cov)


def test_many_steps_approach_the_reverse_sde():
    """DDPM over 1000 steps and Euler-Maruyama of the reverse SDE of the same DiscreteVP on the
    same grid give the same law (the data's, up to O(1/N)); in closed form the chain's law moves
    to the data as N grows."""
    ddpm = jaxdiff.DiscreteVP.linear()
    n = 20_000
    x_T = jax.random.normal(KEY, (n, 2))
    ts = D.grid(ddpm)
    denoise = TARGET.denoiser(ddpm)
    # 2 x 1000 steps on 20,000 points: running dominates, not compiling (see tests/_xla.py)
    outs = [
        np.asarray(jax.jit(lambda k, s=s: jaxdiff.sample(s, denoise, x_T, ts, key=k).x,
                           compiler_options=OPTIMIZED)(jax.random.key(i)))
        for i, s in enumerate(
            [
                jaxdiff.samplers.discrete_ddpm(ddpm, D.FixedLarge()),
                jaxdiff.samplers.euler_maruyama(ddpm),
            ]
        )
    ]  # fmt: skip
    se = np.sqrt(np.diag(COV) / n)
    se_cov = np.sqrt((np.outer(np.diag(COV), np.diag(COV)) + COV**2) / n)
    for x in outs:
        np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), 5 * se)
        np.testing.assert_array_less(np.abs(np.cov(x.T) - COV), 5 * se_cov)
    np.testing.assert_array_less(np.abs(outs[0].mean(0) - outs[1].mean(0)), 7 * se)
    np.testing.assert_array_less(np.abs(np.cov(outs[0].T) - np.cov(outs[1].T)), 7 * se_cov)
    # closed form: the distance of the chain's law to the data shrinks like 1/N
    errs = []
    for N in (10, 100, 1000):
        p = jaxdiff.DiscreteVP.linear(n=N, beta_start=0.1 / N, beta_end=5.0 / N)
        ab = np_abar(p)[::-1]  # start from the exact marginal q(x_T)
        start = np.sqrt(ab[0]) * MEAN, ab[0] * COV + (1 - ab[0]) * np.eye(2)
        mu, cov = np_chain_law(ab, "large", *start)
        errs.append(np.abs(cov - COV).max() + np.abs(mu - MEAN).max())
    assert errs[0] > 7 * errs[1] and errs[1] > 7 * errs[2], errs  # measured ratios ~10


# --------------------------------------------------------------------------------------------
# Analytic-DPM
# --------------------------------------------------------------------------------------------
def test_analytic_dpm_variance_is_the_closed_form_on_a_gaussian():
    """Sigma* = beta_tilde + c0^2 tr Cov[x0 | x_t] / d, with Cov[x0 | x_t] = C - a^2 C (a^2 C +
    s^2 I)^-1 C for the Gaussian; Gamma estimated by Monte Carlo with the exact denoiser."""
    ddpm = jaxdiff.DiscreteVP.linear(n=100)
    cov = np.diag([0.05, 0.5, 2.0])
    target = Gaussian(jnp.asarray([0.3, -1.0, 0.0]), jnp.asarray(cov))
    steps = D.respaced_steps(100, 8)
    n = 20_000
    x0 = target.sample(n, key=KEY)
    variance = D.analytic_dpm(ddpm, target.denoiser(ddpm), x0, key=jax.random.key(1), steps=steps)
    abar = np_abar(ddpm)
    for k in range(1, len(steps)):
        t, s = D.step_times(ddpm, steps[k]), D.step_times(ddpm, steps[k - 1])
        ab = abar[steps[k]]
        beta, beta_tilde, c0, _ = ho_coefficients(ab, abar[steps[k - 1]])
        post = cov - ab * cov @ np.linalg.inv(ab * cov + (1 - ab) * np.eye(3)) @ cov
        exact = beta_tilde + c0**2 * np.trace(post) / 3
        got = np.exp(variance.log_variance(ddpm, x0[:1], t, D.transition(ddpm, t, s)))
        # Monte Carlo error of Gamma (mean of |eps_hat|^2 / d over n draws), carried to Sigma*
        eps_var = 2 * np.sum((1 - np.diag(post) * ab / (1 - ab)) ** 2) / 9  # Var |eps_hat|^2/d
        tol = 5 * c0**2 * (1 - ab) / ab * np.sqrt(eps_var / n)
        assert abs(float(got.ravel()[0]) - exact) < tol + 1e-12, (k, got, exact, tol)
        assert beta_tilde <= exact <= beta_tilde + c0**2 * (1 - ab) / ab


# --------------------------------------------------------------------------------------------
# The variational bound
# --------------------------------------------------------------------------------------------
def test_normal_kl_is_the_closed_form_and_the_monte_carlo_mean():
    m1, l1, m2, l2 = 0.3, np.log(0.5), -0.4, np.log(2.0)
    closed = 0.5 * (l2 - l1 + np.exp(l1 - l2) + (m1 - m2) ** 2 / np.exp(l2) - 1)
    np.testing.assert_allclose(D.normal_kl(m1, l1, m2, l2), closed, rtol=1e-14)
    assert float(D.normal_kl(m1, l1, m1, l1)) == 0.0
    z = np.asarray(jax.random.normal(KEY, (400_000,)))
    x = m1 + np.exp(0.5 * l1) * z
    logq = -0.5 * (l1 + (x - m1) ** 2 / np.exp(l1))
    logp = -0.5 * (l2 + (x - m2) ** 2 / np.exp(l2))
    diff = logq - logp
    assert abs(diff.mean() - closed) < 4 * diff.std() / np.sqrt(len(z))


def test_discretized_decoder_is_a_distribution_over_the_bins():
    bins = np.linspace(-1.0, 1.0, 256)
    dec = D.DiscretizedGaussianDecoder()
    for mean, std in [(0.0, 0.3), (0.9, 0.05), (-1.3, 0.01), (5.0, 0.1), (0.2, 1e-4)]:
        nll = dec.nll(jnp.asarray(bins), mean, 2 * np.log(std))
        assert bool(jnp.all(jnp.isfinite(nll))), (mean, std)
        np.testing.assert_allclose(np.sum(np.exp(-np.asarray(nll))), 1.0, rtol=1e-9)
        digits = D.DiscretizedGaussianDecoder(levels=17)  # scikit-learn's digits: 0..16
        nll17 = digits.nll(jnp.linspace(-1.0, 1.0, 17), mean, 2 * np.log(std))
        np.testing.assert_allclose(np.sum(np.exp(-np.asarray(nll17))), 1.0, rtol=1e-9)
    # a wide Gaussian: the bin's mass is the density times the bin width (2/255)
    x = bins[20:236]
    nll = np.asarray(dec.nll(jnp.asarray(x), 0.1, 2 * np.log(0.4)))
    density = -0.5 * np.log(2 * np.pi * 0.16) - (x - 0.1) ** 2 / 0.32
    np.testing.assert_allclose(-nll, density + np.log(2 / 255), atol=2e-4)
    # far in a tail the mass is still resolved (the bin on the far side of the mean)
    x = -bins[128]
    far = float(dec.nll(jnp.asarray(x), 0.9, 2 * np.log(0.01)))
    u, lo = (x + 1 / 255 - 0.9) / 0.01, (x - 1 / 255 - 0.9) / 0.01  # about -90 and -91
    log_u, log_lo = scipy.special.log_ndtr(u), scipy.special.log_ndtr(lo)
    np.testing.assert_allclose(far, -(log_u + np.log1p(-np.exp(log_lo - log_u))), rtol=1e-12)


def posterior_cov(ab, cov):
    """Cov[x0 | x_t] for x0 ~ N(m, cov) and x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    d = len(cov)
    return cov - ab * cov @ np.linalg.inv(ab * cov + (1 - ab) * np.eye(d)) @ cov


def np_expected_terms(process, variance, m=MEAN, c=COV):
    """E[L_n] over x0 ~ N(m, c) and x_n ~ q(x_n | x0) for the exact denoiser, in closed form:
    0.5 sum_i [log(S/bt) + bt/S - 1 + c0^2 P_ii/S] (n >= 1), the Gaussian decoder's
    0.5 sum_i [log(2 pi S) + P_ii/S] (n = 0), and the prior's a^2 E|x0|^2 / (2 s^2)."""
    abar = np_abar(process)
    n_steps, d = len(abar), len(m)
    terms = []
    for n in range(n_steps):
        P = np.diag(posterior_cov(abar[n], c))
        prev = abar[n - 1] if n else 1.0
        beta, beta_tilde, c0, _ = ho_coefficients(abar[n], prev)
        clipped = ho_coefficients(abar[1], abar[0])[1]
        S = {"large": beta, "small": beta_tilde if n else clipped}[variance]
        if n == 0:
            terms.append(0.5 * np.sum(np.log(2 * np.pi * S) + P / S))
        else:
            terms.append(0.5 * np.sum(np.log(S / beta_tilde) + beta_tilde / S - 1 + c0**2 * P / S))
    a2, s2 = abar[-1], 1 - abar[-1]
    terms.append(a2 * (m @ m + np.trace(c)) / (2 * s2))
    return np.array(terms), d


@pytest.mark.parametrize("variance", ["large", "small"])
def test_bound_terms_are_their_closed_forms_and_exceed_the_exact_nll(variance):
    ddpm = SMALL
    var = {"large": D.FixedLarge(), "small": D.FixedSmall()}[variance]
    n = 4000
    x0 = TARGET.sample(n, key=KEY)
    terms = np.asarray(D.vlb_terms(ddpm, TARGET.denoiser(ddpm), var, x0, key=jax.random.key(1)))
    expected, d = np_expected_terms(ddpm, variance)
    assert terms.shape == (n, 51) and np.all(terms[:, 1:] >= -1e-12)  # KLs are >= 0
    se = terms.std(0) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(terms.mean(0) - expected), 5 * se + 1e-12)
    bpd = D.bits_per_dim(ddpm, TARGET.denoiser(ddpm), var, x0, key=jax.random.key(1))
    np.testing.assert_allclose(bpd, terms.sum(1) / (d * np.log(2)), rtol=1e-12, atol=1e-12)
    # the model's exact law: the chain from the prior, then the decoder's Gaussian
    abar = np_abar(ddpm)
    mu, cov = np_chain_law(abar[::-1], variance, np.zeros(2), (1 - abar[-1]) * np.eye(2))
    dec = {"large": ddpm.betas[0], "small": ho_coefficients(abar[1], abar[0])[1]}[variance]
    cov = cov + float(dec) * np.eye(2)
    inv = np.linalg.inv(cov)
    cross_entropy = 0.5 * (np.trace(inv @ COV) + (MEAN - mu) @ inv @ (MEAN - mu)
                           + np.log(np.linalg.det(2 * np.pi * cov)))  # fmt: skip
    entropy = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * COV))
    bound = expected.sum()
    assert bound > cross_entropy > entropy, (bound, cross_entropy, entropy)
    if variance == "large":  # measured: bound 1.797 nats over d = 2, a tight bound here
        assert bound - cross_entropy < 0.5
    else:  # beta_tilde is too small at the first steps: a looser bound (Nichol & Dhariwal, Fig. 2)
        assert bound > np_expected_terms(ddpm, "large")[0].sum() + 1.0


def test_optimal_learned_variance_is_beta_tilde_plus_the_posterior_variance():
    """min over v of E[L_n] with the exact mean: Sigma* = beta_tilde + c0^2 Var[x0 | x_n] per
    dimension, v* = log(Sigma*/beta_tilde) / log(beta/beta_tilde) (Improved DDPM Sec. 3.1)."""
    ddpm = SMALL
    cov = np.diag([0.05, 0.8])
    target = Gaussian(jnp.zeros(2), jnp.asarray(cov))
    n_samples, step = 20_000, 10
    x0 = target.sample(n_samples, key=KEY)
    t = D.step_times(ddpm, step)
    x_t, _ = ddpm.sample_marginal(x0, t, key=jax.random.key(1))
    x0_hat = target.denoiser(ddpm)(x_t, t)
    tr = D.transition(ddpm, t, D.step_times(ddpm, step - 1))

    def expected_term(v):
        logvar = D.Learned(lambda x, t: jnp.broadcast_to(v, x.shape)).log_variance(ddpm, x_t, t, tr)
        dec = D.GaussianDecoder()
        return jnp.mean(D.vlb_term(ddpm, x0, x_t, x0_hat, logvar, step, dec))

    grad, hess = jax.grad(expected_term), jax.hessian(expected_term)
    newton = jax.jit(lambda v: v - jnp.linalg.solve(hess(v), grad(v)))
    v = jnp.full((2,), 0.5)
    for _ in range(20):  # the term is smooth and convex in v here
        v = newton(v)
    abar = np_abar(ddpm)
    beta, beta_tilde, c0, _ = ho_coefficients(abar[step], abar[step - 1])
    sigma_star = beta_tilde + c0**2 * np.diag(posterior_cov(abar[step], cov))
    v_star = np.log(sigma_star / beta_tilde) / np.log(beta / beta_tilde)
    assert np.all((0 < v_star) & (v_star < 1))
    np.testing.assert_allclose(v, v_star, atol=0.01)


def test_importance_steps_warm_up_then_follow_the_terms():
    steps = D.ImportanceSteps(5, history=3, uniform=0.0)
    np.testing.assert_allclose(steps.probs(), 0.2)
    for _ in range(3):
        steps = steps.update(jnp.arange(5), jnp.arange(1.0, 6.0))
    assert steps.counts.tolist() == [3] * 5
    np.testing.assert_allclose(steps.probs(), np.arange(1, 6) / 15, rtol=1e-12)
    n, w = steps.sample(KEY, (200_000,))
    freq = np.bincount(np.asarray(n), minlength=5) / 200_000
    np.testing.assert_allclose(freq, np.arange(1, 6) / 15, atol=0.005)
    terms = np.arange(1.0, 6.0)
    # importance weights 1/p_n: E[w L_n] = sum_n L_n, here with zero variance (p ~ L)
    np.testing.assert_allclose(np.asarray(w) * terms[np.asarray(n)], terms.sum(), rtol=1e-12)
    newest = steps.update(jnp.array([2]), jnp.array([10.0]))
    assert newest.values[2].tolist() == [3.0, 3.0, 10.0]
    mixed = D.ImportanceSteps(5, history=3, uniform=0.5)
    mixed = eqx_tree_at_values(mixed, steps)
    np.testing.assert_allclose(mixed.probs(), 0.5 * np.arange(1, 6) / 15 + 0.1, rtol=1e-12)


def eqx_tree_at_values(target, source):
    import equinox as eqx

    return eqx.tree_at(lambda s: (s.values, s.counts), target, (source.values, source.counts))


def test_hybrid_loss_stops_the_mean_gradient_inside_the_bound():
    ddpm = jaxdiff.DiscreteVP.cosine(n=100)
    x0 = jnp.round(jax.random.uniform(KEY, (8, 4, 4, 1), minval=-1, maxval=1) * 127.5) / 127.5

    def net(params):
        a, b = params
        return lambda x, t: jnp.concatenate([a * x, jnp.full_like(x, b)], axis=-1)

    params = (jnp.asarray(0.7), jnp.asarray(0.3))
    key = jax.random.key(3)
    loss = lambda p: jnp.mean(D.hybrid_loss(net(p), ddpm, x0, key=key))
    n, w = D.UniformSteps(100).sample(jax.random.split(key)[0], (8,))
    assert np.all(np.asarray(w) == 100.0)

    def parts(p, stop=True):
        k = jax.random.split(key)[1]
        return D.hybrid_terms(net(p), ddpm, x0, n, key=k, stop_mean_gradient=stop)

    simple, vlb = parts(params)
    np.testing.assert_allclose(loss(params), jnp.mean(simple + 0.001 * 100 * vlb), rtol=1e-12)
    g = jax.jit(jax.grad(loss))(params)
    g_simple = jax.jit(jax.grad(lambda p: jnp.mean(parts(p)[0])))(params)
    g_vlb = jax.jit(jax.grad(lambda p: jnp.mean(parts(p)[1])))(params)
    np.testing.assert_allclose(g[0], g_simple[0], rtol=1e-12)  # the mean: L_simple only
    np.testing.assert_allclose(g[1], 0.1 * g_vlb[1], rtol=1e-12)  # v: lambda N L_vlb only
    assert float(g_simple[1]) == 0.0 and float(g_vlb[0]) == 0.0
    g_full = jax.jit(jax.grad(lambda p: jnp.mean(parts(p, stop=False)[1])))(params)
    assert abs(float(g_full[0])) > 0  # without the stop-gradient the bound trains the mean
    vlb_only = D.vlb_loss(net(params), ddpm, x0, key=key)
    np.testing.assert_allclose(vlb_only, 100 * vlb, rtol=1e-12)


def test_digits_hybrid_preset_trains_a_learned_variance_network():
    from experiments import common, configs

    config = configs.get_preset("digits_hybrid")
    process = configs.make_process(config)
    assert isinstance(process, jaxdiff.DiscreteVP) and configs.data_levels(config) == 17
    assert config.loss == "hybrid"
    small = dataclasses.replace(config.model, channels=8, channel_mults=(1,), attn_resolutions=())
    model = configs.make_model(dataclasses.replace(config, model=small), (8, 8, 1), 10)
    levels = jnp.linspace(-1.0, 1.0, 17, dtype=jnp.float32)
    x0 = levels[jax.random.randint(KEY, (4, 8, 8, 1), 0, 17)]
    apply = lambda x, t: model(x, t)
    loss_fn, mean_half = configs.make_loss(config), common.mean_output(apply, True)

    @jax.jit
    def outputs(x0):
        t = jnp.full((4,), 0.5)
        return apply(x0, t), loss_fn(apply, process, x0, key=KEY), mean_half(x0, t)

    out, loss, mean = outputs(x0)
    assert out.shape == (4, 8, 8, 2) and mean.shape == x0.shape  # eps, then v
    np.testing.assert_array_equal(mean, out[..., :1])
    assert loss.shape == (4,) and bool(jnp.all(jnp.isfinite(loss)))
    with pytest.raises(ValueError, match="hybrid.*discrete process"):
        configs.Config(loss="hybrid")


def np_dpm_solver_pp_2m(betas, ts, x, mean, cov):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in float64 NumPy on DPM-Solver's discrete
    schedule, with the exact Gaussian denoiser; returns the trajectory (len(ts), *x.shape).

    log alpha is piecewise linear in t through (0, 0) and (t_n = (n + 1)/N, 0.5 sum_{i<=n}
    log(1 - beta_i)); sigma = sqrt(1 - alpha^2), lambda = log(alpha / sigma). Multistep: the
    first step is first order; on a grid of fewer than 15 steps the last solver step too (lower
    order final); a final step into t = 0 returns the denoiser output.
    """
    n = len(betas)
    knots = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
    log_alpha = lambda t: np.interp(t, np.arange(n + 1) / n, knots)  # noqa: E731
    alpha = lambda t: np.exp(log_alpha(t))  # noqa: E731
    sigma = lambda t: np.sqrt(-np.expm1(2 * log_alpha(t)))  # noqa: E731
    lam = lambda t: np.log(alpha(t) / sigma(t))  # noqa: E731

    def denoise(x, t):  # E[x0 | x_t = x] = m + a C (a^2 C + s^2 I)^{-1} (x - a m)
        a, s = alpha(t), sigma(t)
        gain = np.linalg.solve(a**2 * cov + s**2 * np.eye(len(mean)), a * cov)  # = (a C V^-1)^T
        return mean + (x - a * mean) @ gain

    steps = len(ts) - 1
    solver_steps = steps - (ts[-1] == 0)
    xs, x0_prev, h_prev = [x], None, None
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        x0 = denoise(x, t)
        if s == 0:
            x = x0
        else:
            h = lam(s) - lam(t)
            q = min(2, i + 1, solver_steps - i) if steps < 15 else min(2, i + 1)
            if q == 1:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = sigma(s) / sigma(t) * x - alpha(s) * np.expm1(-h) * d
            x0_prev, h_prev = x0, h
        xs.append(x)
    return np.stack(xs)


def test_dpm_solver_pp_2m_on_the_discrete_schedule_is_the_numpy_algorithm():
    # Issue 13: the engine's DPM-Solver++(2M) on DDPM's linear table equals Alg. 2 of Lu et al.
    # 2022b written here in NumPy, alpha(t) computed from the beta table by DPM-Solver's own
    # discrete convention (not through the process), on the same 10-step log-SNR grid.
    process = jaxdiff.DiscreteVP.linear()
    ts = jaxdiff.schedules.log_snr_uniform(process, 10)
    x_T = np.random.default_rng(13).standard_normal((4, 2))
    sampler = jaxdiff.samplers.dpm_solver_pp(process, order=2)
    res = jaxdiff.sample(
        sampler, TARGET.denoiser(process), jnp.asarray(x_T), ts, save_trajectory=True
    )
    ref = np_dpm_solver_pp_2m(np.asarray(process.betas), np.asarray(ts), x_T, MEAN, COV)
    assert int(res.nfe) == 10
    np.testing.assert_allclose(res.xs, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.x, ref[-1], rtol=1e-9, atol=1e-12)
