"""Log-likelihood through the probability-flow ODE, against exact log densities.

With the exact denoiser of a Gaussian or a mixture, log_likelihood computes log p_{t_min}(x),
which `target.logp(process, x, t_min)` gives in closed form. Replacing the prior by the exact
p_{t_max} isolates the solver error (stated tolerances below); with the default prior the result
differs by exactly prior_logp(x_T) - log p_{t_max}(x_T) at the ODE's end point x_T, which is known
in closed form for a Gaussian. Hutchinson's estimator is unbiased: its mean over independent
probes matches the exact divergence within 3 standard errors.
"""

import math

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.analytic import Gaussian, GaussianMixture
from jaxdiff.likelihood import (
    bits_per_dim,
    dequantize,
    divergence,
    log_likelihood,
    sample_probes,
)
from jaxdiff.processes import EDM, VP

VP_ = VP()
GAUSS = Gaussian(jnp.array([0.2, -0.3]), jnp.array([[0.2, 0.05], [0.05, 0.1]]))
MIX = GaussianMixture(
    jnp.array([[-0.5, 0.3], [0.4, -0.4], [0.2, 0.6]]),
    jnp.array([[0.2, 0.1], [0.15, 0.25], [0.1, 0.1]]),
    jnp.array([0.3, 0.5, 0.2]),
)
B = 16


def exact_prior(target, process):
    return lambda x: target.logp(process, x, process.t_max)


def gaussian_flow(process, x, t0, t1):
    """Exact probability-flow map of GAUSS from t0 to t1."""
    a0, s0, a1, s1 = process.alpha(t0), process.sigma(t0), process.alpha(t1), process.sigma(t1)
    v0, v1 = a0**2 * GAUSS.evals + s0**2, a1**2 * GAUSS.evals + s1**2
    y = (x - a0 * GAUSS.mean) @ GAUSS.evecs
    return a1 * GAUSS.mean + (y * jnp.sqrt(v1 / v0)) @ GAUSS.evecs.T


# --------------------------------------------------------------------------------------------
# Exact divergence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", [VP_, EDM()], ids=["VP", "EDM"])
def test_gaussian_log_likelihood_is_exact(process):
    x = GAUSS.sample(B, key=jax.random.key(0))
    den, true = GAUSS.denoiser(process), GAUSS.logp(process, x, process.t_min)
    prior = exact_prior(GAUSS, process)
    # Default tolerances (rtol = atol = 1e-5): within 1e-4 nats; at 1e-9: within 1e-6.
    ll = log_likelihood(process, den, x, prior_logp=prior)
    np.testing.assert_allclose(ll, true, atol=1e-4)
    ll_tight = log_likelihood(process, den, x, prior_logp=prior, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ll_tight, true, atol=1e-6)
    # With the default N(0, sigma_T^2) prior the answer moves by exactly the prior mismatch at
    # the ODE's end point.
    x_T = gaussian_flow(process, x, process.t_min, process.t_max)
    shift = process.prior_logp(x_T) - GAUSS.logp(process, x_T, process.t_max)
    ll_default = log_likelihood(process, den, x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ll_default - ll_tight, shift, atol=1e-6)


def test_mixture_log_likelihood_is_exact():
    x = MIX.sample(B, key=jax.random.key(1))
    ll = log_likelihood(VP_, MIX.denoiser(VP_), x, prior_logp=exact_prior(MIX, VP_))
    np.testing.assert_allclose(ll, MIX.logp(VP_, x, VP_.t_min), atol=1e-4)


def test_log_likelihood_at_another_t_min():
    # log p_{t} at t = 0.1 (treating x as x_t); shares the compiled solve (times are traced).
    x = GAUSS.sample(B, key=jax.random.key(2))
    ll = log_likelihood(VP_, GAUSS.denoiser(VP_), x, t_min=0.1, prior_logp=exact_prior(GAUSS, VP_))
    np.testing.assert_allclose(ll, GAUSS.logp(VP_, x, 0.1), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Divergence estimators
# --------------------------------------------------------------------------------------------


def _field(x):
    """A nonlinear map with a dense Jacobian, applied per example."""
    a = jnp.reshape(jnp.arange(25.0), (5, 5)) / 25.0 - 0.4
    return jnp.tanh(x @ a) * x[:, ::-1]


def test_exact_divergence_is_the_jacobian_trace_per_example():
    x = jax.random.normal(jax.random.key(3), (3, 5))
    out, div = jax.jit(divergence, static_argnums=0)(_field, x)
    np.testing.assert_allclose(out, _field(x), rtol=1e-12)
    # The Jacobian of the whole batch is block diagonal; its blocks' traces are the divergences.
    jac = jax.jacfwd(_field)(x)  # (3, 5, 3, 5)
    blocks = jnp.einsum("iaib->iab", jac)
    np.testing.assert_allclose(div, jnp.trace(blocks, axis1=1, axis2=2), rtol=1e-12)


@jax.jit
def _single_probe_estimates(x, probes):
    """``(batch, n)`` one-probe Hutchinson estimates."""
    one = lambda xi, e: divergence(_field, xi[None], e[None, None])[1][0]
    return jax.vmap(lambda xi, ps: jax.vmap(lambda e: one(xi, e))(ps))(x, probes)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    # 4000 probes per example: the mean is within 3 standard errors of the exact trace.
    x = jax.random.normal(jax.random.key(4), (3, 5))
    _, exact = divergence(_field, x)
    probes = sample_probes(jax.random.key(5), x, 4000, probe)
    assert probes.shape == (3, 4000, 5)
    est = _single_probe_estimates(x, probes)
    mean, se = est.mean(1), est.std(1) / math.sqrt(est.shape[1])
    assert np.all(np.abs(mean - exact) < 3 * se), (mean, exact, se)
    # The n-probe average is the mean of the single-probe estimates.
    _, avg = divergence(_field, x, probes)
    np.testing.assert_allclose(avg, mean, rtol=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_log_likelihood_matches_exact_within_standard_error(probe):
    # 2 points, 128 copies each: each copy draws its own probes (fixed along its solve), so the
    # copies are independent unbiased estimates of the same log-likelihood.
    pts = MIX.sample(2, key=jax.random.key(6))
    x = jnp.repeat(pts, 128, axis=0)
    ll = log_likelihood(
        VP_,
        MIX.denoiser(VP_),
        x,
        key=jax.random.key(7),
        exact_divergence=False,
        probe=probe,
        prior_logp=exact_prior(MIX, VP_),
    ).reshape(2, 128)
    mean, se = ll.mean(1), ll.std(1) / math.sqrt(128)
    true = MIX.logp(VP_, pts, VP_.t_min)
    assert np.all(np.abs(mean - true) < 3 * se + 1e-4), (mean, true, se)
    assert np.all(se > 0)  # the estimates do vary


def test_probes_are_distributions_and_names_are_deprecated_aliases():
    # A probe is a function (key, shape, dtype); the old names give the very same probes.
    x, key = jnp.zeros((3, 5)), jax.random.key(11)
    for name, fn in [("rademacher", jax.random.rademacher), ("gaussian", jax.random.normal)]:
        probes = sample_probes(key, x, 4, fn)
        assert probes.shape == (3, 4, 5) and probes.dtype == x.dtype
        with pytest.warns(DeprecationWarning, match=f"probe='{name}' is deprecated"):
            np.testing.assert_array_equal(sample_probes(key, x, 4, name), probes)
    np.testing.assert_array_equal(
        sample_probes(key, x, 4), sample_probes(key, x, 4, jax.random.rademacher)
    )
    with pytest.raises(TypeError, match="probe must be a function"):
        sample_probes(key, x, 4, 3)


# --------------------------------------------------------------------------------------------
# Bits per dimension
# --------------------------------------------------------------------------------------------


def test_bits_per_dim_of_8_bit_data():
    # 8-bit levels -> z = -1 + 2 (k + u) / 256; bpd = -(log p(z) + D log(2/256)) / (D log 2).
    k = jnp.clip(jnp.round((GAUSS.sample(B, key=jax.random.key(8)) + 1) * 128), 0, 255)
    k = k.astype(jnp.uint8)
    key = jax.random.key(9)
    prior = exact_prior(GAUSS, VP_)
    bpd = bits_per_dim(VP_, GAUSS.denoiser(VP_), k, key=key, prior_logp=prior)
    z = dequantize(k, key=jax.random.split(key)[0])
    assert float(z.min()) >= -1 and float(z.max()) < 1
    np.testing.assert_array_equal(jnp.floor((z + 1) * 128), k)  # each z stays in its bin
    true = -(GAUSS.logp(VP_, z, VP_.t_min) - 2 * math.log(128)) / (2 * math.log(2))
    np.testing.assert_allclose(bpd, true, atol=1e-4 / (2 * math.log(2)))
    # Float input is taken as already dequantized: the same formula with log_likelihood.
    ll = log_likelihood(VP_, GAUSS.denoiser(VP_), z, prior_logp=prior)
    bpd_z = bits_per_dim(VP_, GAUSS.denoiser(VP_), z, prior_logp=prior)
    np.testing.assert_allclose(bpd_z, -ll / (2 * math.log(2)) + 7.0, rtol=1e-12)


def test_dequantize_without_key_uses_bin_centres():
    k = jnp.array([[0, 255], [128, 7]], dtype=jnp.uint8)
    z = dequantize(k)
    np.testing.assert_allclose(z, -1 + 2 * (np.asarray(k, float) + 0.5) / 256)


# --------------------------------------------------------------------------------------------
# dtypes and non-finite input
# --------------------------------------------------------------------------------------------


def test_bfloat16_data_is_integrated_in_float32():
    # The bf16 values, integrated in float32: the same numbers as their float32 copy, float32
    # log-likelihoods (with the default prior), within the float32 solve's error of the exact
    # density of those values (with the exact prior; one compiled solve for all three).
    x = GAUSS.sample(B, key=jax.random.key(12)).astype(jnp.bfloat16)
    den = GAUSS.denoiser(VP_)
    ll = log_likelihood(VP_, den, x)
    assert ll.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(ll)))
    np.testing.assert_array_equal(ll, log_likelihood(VP_, den, x.astype(jnp.float32)))
    exact = log_likelihood(VP_, den, x, prior_logp=exact_prior(GAUSS, VP_))
    np.testing.assert_allclose(exact, GAUSS.logp(VP_, x.astype(jnp.float64), VP_.t_min), atol=1e-3)


def test_integer_and_boolean_data_are_type_errors():
    den = GAUSS.denoiser(VP_)
    with pytest.raises(TypeError, match=r"x0 must be a floating-point.*int32"):
        log_likelihood(VP_, den, jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(TypeError, match=r"x must be a floating-point.*bool"):
        bits_per_dim(VP_, den, jnp.zeros((4, 2), bool))


def test_non_finite_rows_are_named_eagerly_and_isolated_under_jit():
    den, prior = GAUSS.denoiser(VP_), exact_prior(GAUSS, VP_)
    x = GAUSS.sample(4, key=jax.random.key(13)).at[2, 1].set(jnp.nan)
    with pytest.raises(
        ValueError, match=r"x0 is not finite \(NaN or inf\) in 1 row\(s\): \[2\]"
    ) as e:
        log_likelihood(VP_, den, x)
    assert "max_steps" not in str(e.value)
    with pytest.raises(ValueError, match=r"x is not finite .* \[2\]"):
        bits_per_dim(VP_, den, x)
    # Under jit: NaN for that row, the exact log-density for the others.
    tight = dict(prior_logp=prior, rtol=1e-9, atol=1e-9)
    ll = jax.jit(lambda x: log_likelihood(VP_, den, x, **tight))(x)
    assert bool(jnp.isnan(ll[2]))
    good = jnp.array([0, 1, 3])
    np.testing.assert_allclose(ll[good], GAUSS.logp(VP_, x[good], VP_.t_min), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input and failure
# --------------------------------------------------------------------------------------------


def test_running_out_of_steps_is_a_clear_error():
    x = GAUSS.sample(B, key=jax.random.key(10))
    with pytest.raises(RuntimeError, match="max_steps=3: raise max_steps or loosen rtol/atol"):
        log_likelihood(VP_, GAUSS.denoiser(VP_), x, max_steps=3)


def test_a_denoiser_failing_midway_is_not_blamed_on_max_steps():
    # NaN from the denoiser beyond t = 0.5 stalls the step-size control there: the message says
    # where the solve stopped and that more steps will not help then.
    den = GAUSS.denoiser(VP_)
    failing = lambda x, t: jnp.where(t > 0.5, jnp.nan, den(x, t))
    x = GAUSS.sample(4, key=jax.random.key(14))
    with pytest.raises(RuntimeError, match=r"stopped at t=0\.5\d*; if the denoiser returns NaN"):
        log_likelihood(VP_, failing, x, max_steps=200)


def test_bad_input_is_refused():
    den = GAUSS.denoiser(VP_)
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"t_min must lie in \[t_min, t_max\]"):
        log_likelihood(VP_, den, x, t_min=0.0)
    with pytest.raises(ValueError, match="t_min must be below t_max"):
        log_likelihood(VP_, den, x, t_min=0.5, t_max=0.2)
    with pytest.raises(TypeError, match="SRA1 is not an ODE solver"):
        log_likelihood(VP_, den, x, solver=dfx.SRA1())
    with pytest.raises(ValueError, match="needs key"):
        log_likelihood(VP_, den, jnp.zeros((4, 20)))  # 20 dims: Hutchinson by default
    with pytest.raises(ValueError, match="probe must be one of"):
        log_likelihood(VP_, den, x, key=jax.random.key(0), exact_divergence=False, probe="x")
    with pytest.raises(ValueError, match="n_probes must be a positive integer"):
        sample_probes(jax.random.key(0), x, 0)
    with pytest.raises(ValueError, match="x0 must be batched"):
        log_likelihood(VP_, den, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"levels in \[0, 255\]"):
        dequantize(jnp.array([[0, 300]]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="pass key"):
        bits_per_dim(VP_, den, jnp.zeros((4, 2), jnp.uint8))
