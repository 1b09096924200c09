"""Losses: exact targets, the equivalences of the papers (noise prediction = DSM with
lambda = sigma^2; explicit and denoising score matching differ by a model-independent constant),
the EDM loss, and the time samplers' distributions and importance weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jaxdiff import losses
from jaxdiff import parameterization as P
from jaxdiff.analytic import GaussianMixture
from jaxdiff.parameterization import denoiser, edm_preconditioning
from jaxdiff.processes import EDM, VE, VP, DiscreteVP, RectifiedFlow, SubVP, VPCosine

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow(), DiscreteVP.linear()]
IDS = [type(p).__name__ for p in PROCESSES]
parametrize = pytest.mark.parametrize("process", PROCESSES, ids=IDS)

X0 = jax.random.normal(jax.random.key(0), (6, 3))
KEY = jax.random.key(1)
MIXTURE = GaussianMixture(
    jnp.array([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]]),
    jnp.array([0.3, 0.5, 0.2]),
    jnp.array([0.5, 0.3, 0.2]),
)


def times(process, n=6):
    return jnp.linspace(process.t_min, process.t_max, n + 2)[1:-1]


def col(v):
    return v[:, None]


def recovered_eps(process, x, t):
    """The noise that produced x from X0 (known in the tests)."""
    return (x - col(process.alpha(t)) * X0) / col(process.sigma(t))


def oracles(process):
    """Networks that predict each loss's target exactly (they close over X0)."""

    def eps(x, t):
        return recovered_eps(process, x, t)

    def flow(x, t):
        da, ds = jax.vmap(jax.grad(process.alpha))(t), jax.vmap(jax.grad(process.sigma))(t)
        return col(da) * X0 + col(ds) * eps(x, t)

    return {
        losses.eps_loss: eps,
        losses.x0_loss: lambda x, t: jnp.broadcast_to(X0, x.shape),
        losses.v_loss: lambda x, t: col(process.alpha(t)) * eps(x, t) - col(process.sigma(t)) * X0,
        losses.flow_loss: flow,
        losses.dsm_loss: lambda x, t: -eps(x, t) / col(process.sigma(t)),
    }


@parametrize
def test_oracle_has_zero_loss_and_shift_costs_its_square(process):
    # loss(oracle) = 0 and loss(oracle + c) = c^2 (mean over dims), times the weighting.
    t, c = times(process), 0.3
    lam = lambda t: 1.0 + t**2  # noqa: E731
    for loss, oracle in oracles(process).items():
        kw = dict(key=KEY, t=t, weighting=lam)
        np.testing.assert_allclose(loss(oracle, process, X0, **kw), 0.0, atol=1e-9)
        shifted = lambda x, t, oracle=oracle: oracle(x, t) + c  # noqa: E731
        out = loss(shifted, process, X0, **kw)
        np.testing.assert_allclose(out, c**2 * lam(t), rtol=1e-7, err_msg=loss.__name__)
        assert out.shape == (6,)


@parametrize
def test_named_weightings(process):
    t, c = times(process), 0.3
    oracle = oracles(process)[losses.dsm_loss]
    shifted = lambda x, t: oracle(x, t) + c  # noqa: E731
    g2, s2 = process.g2(t), process.sigma(t) ** 2
    for weighting, lam in [("sigma2", s2), ("likelihood", g2), (None, 1.0)]:
        out = losses.dsm_loss(shifted, process, X0, key=KEY, t=t, weighting=weighting)
        np.testing.assert_allclose(out, c**2 * lam, rtol=1e-7, err_msg=str(weighting))


def net(x, t):
    """A fixed eps-network (arbitrary weights), float32-safe."""
    w = jnp.array([[0.8, -0.3, 0.1], [0.2, 0.6, -0.5], [0.1, 0.2, 0.7]], x.dtype)
    return jnp.tanh(x @ w) + jnp.cos(2.0 * t).astype(x.dtype)[:, None]


@parametrize
def test_eps_loss_equals_dsm_with_sigma2_weighting(process):
    # Converted model s = -eps_hat / sigma; same key => same t and eps (Ho et al. 2020, Eq. 14;
    # Song et al. 2021, Eq. 7 with lambda = sigma^2).
    score_net = lambda x, t: -net(x, t) / col(process.sigma(t))  # noqa: E731
    a = losses.eps_loss(net, process, X0, key=KEY)
    b = losses.dsm_loss(score_net, process, X0, key=KEY, weighting="sigma2")
    np.testing.assert_allclose(a, b, rtol=1e-12)
    # With likelihood weighting: g^2 / sigma^2 on the eps loss equals g^2 on DSM.
    a = losses.eps_loss(net, process, X0, key=KEY, weighting="likelihood")
    b = losses.dsm_loss(score_net, process, X0, key=KEY, weighting="likelihood")
    np.testing.assert_allclose(a, b, rtol=1e-12)


@parametrize
def test_x0_and_denoising_loss_with_snr_weighting_equal_eps_loss(process):
    denoise = denoiser(net, process, "eps")
    a = losses.eps_loss(net, process, X0, key=KEY)
    np.testing.assert_allclose(
        losses.x0_loss(denoise, process, X0, key=KEY, weighting="snr"), a, rtol=1e-9
    )
    np.testing.assert_allclose(
        losses.denoising_loss(denoise, process, X0, key=KEY, weighting="snr"), a, rtol=1e-9
    )


def random_linear_score(seed, d=2):
    """An arbitrary affine score model s(x, t) = x A + b cos(t)."""
    rng = np.random.default_rng(seed)
    a = 0.5 * rng.standard_normal((d, d)) - np.eye(d)
    b = 0.5 * rng.standard_normal(d)
    return lambda x, t: x @ a + b * jnp.cos(t)[:, None]


def test_explicit_and_denoising_score_matching_differ_by_a_constant():
    # Vincent (2011): E[DSM(s)] = E[ESM(s)] + C with C independent of s. Same samples for all
    # models; per-sample r = DSM - ESM; the mean of r_i - r_j (i, j two models) is zero, checked
    # within 5 standard errors of the paired Monte Carlo mean (float64, 50k samples, VP).
    process, n = VP(), 50_000
    kx, kt, kl = jax.random.split(jax.random.key(7), 3)
    x0 = MIXTURE.sample(n, key=kx)
    t = losses.uniform_time(process)(kt, (n,), jnp.float64)
    seen = {}

    def probe(x, t):  # records the x_t at which the loss evaluates the network
        seen["x"] = x
        return jnp.zeros_like(x)

    losses.dsm_loss(probe, process, x0, key=kl, t=t)
    x_t = seen["x"]
    true_score = np.asarray(MIXTURE.score(process)(x_t, t))
    s2 = np.asarray(process.sigma(t))[:, None] ** 2

    r = []
    for seed in range(3):
        model = random_linear_score(seed)
        dsm = np.asarray(losses.dsm_loss(model, process, x0, key=kl, t=t))  # lambda = sigma^2
        esm = np.mean(s2 * (np.asarray(model(x_t, t)) - true_score) ** 2, axis=1)
        r.append(dsm - esm)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        diff = r[i] - r[j]
        assert abs(diff.mean()) < 5 * diff.std() / np.sqrt(n), (i, j)
    # The constant itself: C = E[lambda (|eps|^2 / sigma^2 - |s*|^2)] / d with lambda = sigma^2.
    eps = (np.asarray(x_t) - np.asarray(process.alpha(t))[:, None] * np.asarray(x0)) / np.sqrt(s2)
    diff = r[0] - np.mean(eps**2 - s2 * true_score**2, axis=1)
    assert abs(diff.mean()) < 5 * diff.std() / np.sqrt(n)


def edm_oracle(process, target, sigma_data):
    """The raw network F whose EDM-preconditioned denoiser is the exact denoiser of ``target``."""
    exact = target.denoiser(process)

    def F(x_in, c_noise):
        t = process.t_from_log_snr(-8.0 * c_noise)  # c_noise = log(sigma_t / alpha_t) / 4
        c_skip, c_out, c_in, _ = (col(c) for c in edm_preconditioning(process, t, sigma_data))
        xs = x_in / c_in  # x / alpha_t
        return (exact(col(process.alpha(t)) * xs, t) - c_skip * xs) / c_out

    return F


@pytest.mark.parametrize("process", [EDM(), VP()], ids=["EDM", "VP"])
def test_edm_loss_of_exact_denoiser_is_smallest(process):
    # With weight 1 / c_out^2, shifting F by delta adds exactly delta^2 in expectation (the cross
    # term has mean zero because the exact denoiser is E[x0 | x_t]); 5 standard errors, 20k samples.
    n, sd, delta = 20_000, 0.5, 0.2
    kx, kl = jax.random.split(jax.random.key(3))
    x0 = MIXTURE.sample(n, key=kx)
    F = edm_oracle(process, MIXTURE, sd)
    exact = np.asarray(losses.edm_loss(F, process, x0, key=kl, sigma_data=sd))
    shifted = losses.edm_loss(lambda x, c: F(x, c) + delta, process, x0, key=kl, sigma_data=sd)
    diff = np.asarray(shifted) - exact
    assert abs(diff.mean() - delta**2) < 5 * diff.std() / np.sqrt(n)
    assert np.mean(shifted) > exact.mean() > 0


def ks_statistic(samples, cdf):
    """Kolmogorov-Smirnov distance between the sample and a continuous CDF (numpy)."""
    x = np.sort(np.asarray(samples, np.float64))
    n, f = x.shape[0], cdf(x)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


KS_CRIT = 1.63  # Kolmogorov distribution, 1% level: D < 1.63 / sqrt(n)
N_T = 20_000


@parametrize
def test_uniform_time_is_uniform_in_range(process):
    t = losses.uniform_time(process)(jax.random.key(4), (N_T,), jnp.float32)
    assert t.dtype == jnp.float32 and t.shape == (N_T,)
    lo, hi = process.t_min, process.t_max
    t = np.asarray(t)
    assert np.all((t >= np.float32(lo)) & (t <= np.float32(hi)))
    assert ks_statistic(t, lambda x: (x - lo) / (hi - lo)) < KS_CRIT / np.sqrt(N_T)


@parametrize
def test_lognormal_time_has_lognormal_noise_level(process):
    p_mean, p_std = -1.2, 1.2
    t = losses.lognormal_time(process, p_mean, p_std)(jax.random.key(5), (N_T,), jnp.float64)
    assert np.all((np.asarray(t) >= process.t_min) & (np.asarray(t) <= process.t_max))
    log_sigma = -0.5 * np.asarray(process.log_snr(t))  # log(sigma_t / alpha_t)
    cdf = lambda x: norm.cdf(x, p_mean, p_std)  # noqa: E731
    # Clipping to [t_min, t_max] moves at most the tail mass beyond the ends (< 0.3% for these).
    lo, hi = (-0.5 * float(process.log_snr(s)) for s in (process.t_min, process.t_max))
    clipped = cdf(lo) + 1 - cdf(hi)
    assert ks_statistic(log_sigma, cdf) < KS_CRIT / np.sqrt(N_T) + clipped


@parametrize
def test_importance_time_samples_log_snr_uniformly(process):
    sampler = losses.importance_time(process)
    t = sampler(jax.random.key(6), (N_T,), jnp.float64)
    assert np.all((np.asarray(t) >= process.t_min) & (np.asarray(t) <= process.t_max))
    lam_lo, lam_hi = (float(process.log_snr(s)) for s in (process.t_max, process.t_min))
    lam = np.asarray(process.log_snr(t))
    assert ks_statistic(lam, lambda x: (x - lam_lo) / (lam_hi - lam_lo)) < KS_CRIT / np.sqrt(N_T)
    # w(t) g^2 / sigma^2 is the constant Z / (t_max - t_min): the likelihood weight cancels.
    w = np.asarray(sampler.weight(t))
    const = (lam_hi - lam_lo) / (process.t_max - process.t_min)
    np.testing.assert_allclose(w * process.g2(t) / process.sigma(t) ** 2, const, rtol=1e-8)
    # E_q[w] = 1.
    assert abs(w.mean() - 1) < 5 * w.std() / np.sqrt(N_T)


@pytest.mark.parametrize(
    "process", [VP(), VPCosine(), RectifiedFlow()], ids=["VP", "VPCosine", "RF"]
)
def test_importance_weighted_dsm_is_unbiased(process):
    # E_{t~q}[w(t) DSM_likelihood] = E_{t~U}[DSM_likelihood], for a fixed model and data.
    n = 50_000
    kx, ku, ki = jax.random.split(jax.random.key(8), 3)
    x0 = MIXTURE.sample(n, key=kx)
    model = random_linear_score(9)
    kw = dict(weighting="likelihood")
    uniform, importance = losses.uniform_time(process), losses.importance_time(process)
    uni = np.asarray(losses.dsm_loss(model, process, x0, key=ku, t_sampler=uniform, **kw))
    imp = np.asarray(losses.dsm_loss(model, process, x0, key=ki, t_sampler=importance, **kw))
    se = np.sqrt(uni.var() / n + imp.var() / n)
    assert abs(uni.mean() - imp.mean()) < 5 * se
    assert imp.var() < uni.var()  # the point of importance sampling


@jax.jit
def jitted_likelihood_dsm(process, x0, key):
    sampler = losses.importance_time(process)
    return losses.dsm_loss(net, process, x0, key=key, t_sampler=sampler, weighting="likelihood")


@pytest.mark.parametrize("process", [VPCosine(), EDM()], ids=["VPCosine", "EDM"])
def test_loss_jits_with_traced_process_and_preserves_float32(process):
    # The process is a jit argument (a pytree of traced leaves): sampler, log-SNR inverse, g^2.
    # (Every process's coefficients are compiled with a traced process in test_processes.py.)
    out = jitted_likelihood_dsm(process, X0.astype(jnp.float32), KEY)
    assert out.dtype == jnp.float32 and out.shape == (6,)
    assert np.all(np.isfinite(out))


def test_every_loss_preserves_float32():
    x0 = X0.astype(jnp.float32)
    every = (losses.eps_loss, losses.x0_loss, losses.v_loss, losses.flow_loss, losses.dsm_loss)
    for loss in every + (losses.denoising_loss, losses.edm_loss):
        out = loss(net, VP(), x0, key=KEY)
        assert out.dtype == jnp.float32 and out.shape == (6,), loss.__name__
    out = losses.eps_loss(net, VP(), x0, key=KEY, t=0.4)  # a Python float time
    assert out.dtype == jnp.float32


def test_class_conditional_model_through_partial():
    process, c = VP(), 0.25
    labels = jnp.arange(6) % 3
    eps_oracle = oracles(process)[losses.eps_loss]

    def cond_net(x, t, y):
        return eps_oracle(x, t) + c * y[:, None]

    out = losses.eps_loss(functools.partial(cond_net, y=labels), process, X0, key=KEY)
    np.testing.assert_allclose(out, (c * labels) ** 2, rtol=1e-9, atol=1e-12)


def test_explicit_time_gives_same_noise_as_sampled_time():
    process = VP()
    t = losses.uniform_time(process)(jax.random.split(KEY)[0], (6,), jnp.float64)
    a = losses.eps_loss(net, process, X0, key=KEY)
    b = losses.eps_loss(net, process, X0, key=KEY, t=t)
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_bad_input_raises():
    process = VP()
    bad = X0.at[2, 1].set(jnp.nan)
    with pytest.raises(ValueError, match="x0 contains NaN"):
        losses.eps_loss(net, process, bad, key=KEY)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
        losses.eps_loss(net, process, X0, key=KEY, t=jnp.full((5,), 0.5))
    with pytest.raises(ValueError, match="t must lie in"):
        losses.eps_loss(net, process, X0, key=KEY, t=2.0)
    with pytest.raises(ValueError, match="Unknown weighting 'snr'"):
        losses.dsm_loss(net, process, X0, key=KEY, weighting="snr")
    with pytest.raises(ValueError, match="apply_fn"):
        losses.eps_loss(lambda x, t: x[:, :2], process, X0, key=KEY)
    with pytest.raises(TypeError, match="x0 must be a floating array"):
        losses.eps_loss(net, process, jnp.ones((6, 3), jnp.int32), key=KEY)


# --- weightings: one object, one objective ----------------------------------------------------
@parametrize
def test_weightings_are_their_formulas(process):
    t = times(process)
    a, s, g2 = process.alpha(t), process.sigma(t), process.g2(t)
    da, ds = jax.vmap(jax.grad(process.alpha))(t), jax.vmap(jax.grad(process.sigma))(t)
    # eps-error scale k_p: |d eps|^2 = k_p |d p|^2 (eps = 1, score = s^2, x0 = a^2/s^2, ...)
    k = {
        "eps": 1.0,
        "score": s**2,
        "x0": a**2 / s**2,
        "v": a**2 / (a**2 + s**2) ** 2,
        "flow": a**2 / (a * ds - s * da) ** 2,
    }
    lik = losses.likelihood_weighting(process)
    simple = losses.simple_weighting(process)
    edm = losses.edm_weighting(process, sigma_data=0.7)
    sig2 = (s / a) ** 2
    np.testing.assert_allclose(lik(t), g2, rtol=1e-12)
    np.testing.assert_allclose(simple(t), 1.0, rtol=0)
    np.testing.assert_allclose(edm(t), (sig2 + 0.49) / (sig2 * 0.49), rtol=1e-10)
    for pred, k_p in k.items():
        np.testing.assert_allclose(
            P.eps_error_scale(process, pred, t), k_p, rtol=1e-9, err_msg=pred
        )
        np.testing.assert_allclose(lik.on(pred, t), g2 * k_p / s**2, rtol=1e-9, err_msg=pred)
        np.testing.assert_allclose(simple.on(pred, t), k_p, rtol=1e-9, err_msg=pred)
        np.testing.assert_allclose(edm.on(pred, t), edm(t) * k_p / k["x0"], rtol=1e-9, err_msg=pred)
    # The likelihood weighting on the eps error is -d lambda/dt (the importance density's shape).
    dlam = jax.vmap(jax.grad(process.log_snr))(t)
    np.testing.assert_allclose(lik.on("eps", t), -dlam, rtol=1e-8)


@parametrize
def test_eps_error_scale_is_the_slope_of_the_conversion(process):
    # Perturb a prediction by delta at fixed (x, t): the eps prediction moves by sqrt(k) |delta|.
    t = times(process)
    x = process.marginal(X0, jax.random.normal(KEY, X0.shape), t)
    delta = 1e-3 * jax.random.normal(jax.random.key(5), X0.shape)
    for pred in P.PREDICTIONS:
        out = P.from_x0(process, pred, x, t, X0)
        eps_a = P.convert(process, x, t, out, source=pred, target="eps")
        eps_b = P.convert(process, x, t, out + delta, source=pred, target="eps")
        ratio = jnp.sum((eps_b - eps_a) ** 2, -1) / jnp.sum(delta**2, -1)
        np.testing.assert_allclose(
            ratio, P.eps_error_scale(process, pred, t), rtol=1e-6, err_msg=pred
        )


@parametrize
def test_one_weighting_is_one_objective_in_every_loss(process):
    # The same network in five parameterizations, the same key (same t and eps): each loss with
    # the same weighting object gives the same numbers.
    eps_net = net
    nets = {
        losses.eps_loss: eps_net,
        losses.dsm_loss: lambda x, t: -eps_net(x, t) / col(process.sigma(t)),
        losses.x0_loss: denoiser(eps_net, process, "eps"),
        losses.v_loss: lambda x, t: P.convert(
            process, x, t, eps_net(x, t), source="eps", target="v"
        ),
        losses.flow_loss: lambda x, t: P.convert(
            process, x, t, eps_net(x, t), source="eps", target="flow"
        ),
    }
    for weighting in (
        losses.likelihood_weighting(process),
        losses.simple_weighting(process),
        losses.edm_weighting(process),
    ):
        ref = losses.eps_loss(eps_net, process, X0, key=KEY, weighting=weighting)
        for loss, model in nets.items():
            out = loss(model, process, X0, key=KEY, weighting=weighting)
            np.testing.assert_allclose(out, ref, rtol=1e-7, err_msg=f"{loss.__name__} {weighting}")


def test_deprecated_strings_are_the_weighting_objects():
    process, t = VP(), times(VP())
    score_net = lambda x, t: -net(x, t) / col(process.sigma(t))  # noqa: E731
    cases = [
        (losses.eps_loss, net, "likelihood", losses.likelihood_weighting),
        (losses.dsm_loss, score_net, "likelihood", losses.likelihood_weighting),
        (losses.dsm_loss, score_net, "sigma2", losses.simple_weighting),
        (losses.x0_loss, denoiser(net, process), "snr", losses.simple_weighting),
        (losses.denoising_loss, denoiser(net, process), "snr", losses.simple_weighting),
    ]
    for loss, model, name, factory in cases:
        with pytest.warns(
            DeprecationWarning, match=f"weighting='{name}' is deprecated.*{factory.__name__}"
        ):
            old = loss(model, process, X0, key=KEY, t=t, weighting=name)
        new = loss(model, process, X0, key=KEY, t=t, weighting=factory(process))
        np.testing.assert_array_equal(old, new)
    # dsm_loss's default is the simple weighting (sigma^2 on the score error), without a warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = losses.dsm_loss(score_net, process, X0, key=KEY, t=t)
    np.testing.assert_array_equal(
        default,
        losses.dsm_loss(
            score_net, process, X0, key=KEY, t=t, weighting=losses.simple_weighting(process)
        ),
    )
    with pytest.raises(TypeError, match="weighting must be"):
        losses.eps_loss(net, process, X0, key=KEY, weighting=2.0)


def test_weightings_compare_and_hash_equal_and_pass_through_jit():
    for make in (losses.likelihood_weighting, losses.simple_weighting, losses.edm_weighting):
        for process in (VP(), DiscreteVP.cosine()):
            a, b = make(process), make(process)
            assert bool(a == b) and hash(a) == hash(b)
    assert losses.edm_weighting(VP(), 0.5) != losses.edm_weighting(VP(), 0.7)
    w = losses.likelihood_weighting(DiscreteVP.linear())
    t = jnp.array([0.1, 0.5])
    np.testing.assert_allclose(
        jax.jit(lambda w, t: w.on("eps", t))(w, t), w.on("eps", t), rtol=1e-12
    )
