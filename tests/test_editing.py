"""Editing through the probability-flow ODE, checked against exact targets in float64.

- Round trip ``decode(encode(x0))`` on a 6-d Gaussian mixture with its exact denoiser: the error
  falls at a measured order as the grid is refined. Measured (VP, log-SNR-uniform grid, 64
  points, mean over points of the max-abs error): DDIM 0.150 / 0.0754 / 0.0375 at 50 / 100 / 200
  steps (slope 1.0; at 500 steps mean 0.015, max 0.036); Heun on the Karras grid 6.7e-3 /
  7.9e-4 / 9.6e-5 at 25 / 50 / 100 steps (slope 3.0; the test uses 25 / 50). A round trip of a
  one-step method of order p has order p + 1 when p is even: the leading local errors of the
  step forward and back in time, odd in the step size, cancel. diffrax Tsit5: 2.2e-8 at
  rtol = atol = 1e-8.
- Inpainting a correlated 4-d Gaussian with 2 known coordinates, against the exact conditional
  Gaussian (max abs error of mean / covariance, 2000 samples, DDPM; Monte Carlo noise about
  0.01): steps 20, resample 1: 0.19 / 0.16; steps 100, resample 1: 0.17 / 0.14; steps 20,
  resample 5: 0.04 / 0.06; steps 100, resample 5: 0.04 / 0.02.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdiff import editing, schedules
from jaxdiff.analytic import Gaussian, GaussianMixture
from jaxdiff.processes import EDM, VP
from jaxdiff.samplers import ddim, ddpm, dpm_solver_pp, heun, ipndm

_k = jax.random.split(jax.random.key(0), 4)
MIX = GaussianMixture(
    jax.random.normal(_k[0], (3, 6)), jnp.array([0.5, 0.8, 0.6]), jnp.array([0.3, 0.3, 0.4])
)
VP_ = VP()
EDM_ = EDM()
DDIM_VP = ddim(VP_)
DDPM_VP = ddpm(VP_)
HEUN_VP = heun(VP_)
D_VP = MIX.denoiser(VP_)
X0 = MIX.sample(64, key=_k[1])


def slope(errors):
    """log2 of successive error ratios when the step count doubles."""
    e = np.asarray(errors)
    return np.log2(e[:-1] / e[1:])


def round_trip_error(sampler, ts, method=None):
    z = editing.encode(VP_, D_VP, X0, ts, method=sampler if method is None else method)
    x = editing.decode(sampler, D_VP, z, ts)
    return np.mean(np.max(np.abs(np.asarray(x - X0)), axis=1))


# ---------------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------------


def test_encode_one_step_is_the_ddim_inversion_formula():
    t, s = jnp.array(0.3), jnp.array(0.7)
    z = editing.encode(VP_, D_VP, X0, jnp.array([s, t]))  # sampling grid s -> t, no final 0
    x0_hat = D_VP(X0, t)
    eps_hat = (X0 - VP_.alpha(t) * x0_hat) / VP_.sigma(t)
    np.testing.assert_allclose(z, VP_.alpha(s) * x0_hat + VP_.sigma(s) * eps_hat, rtol=1e-12)


def test_final_denoising_step_is_inverted_exactly():
    ts = jnp.array([VP_.t_min, 0.0])  # one step: decode returns D(z, t_min)
    exact = editing.decode(DDIM_VP, D_VP, editing.encode(VP_, D_VP, X0, ts), ts)
    plain = editing.decode(DDIM_VP, D_VP, editing.encode(VP_, D_VP, X0, ts, final_iters=0), ts)
    assert float(jnp.max(jnp.abs(exact - X0))) < 1e-12
    # alpha(t_min) x0 alone misses by about sigma(t_min)^2 |score| (sigma^2 = 1e-4 here).
    assert 1e-6 < float(jnp.max(jnp.abs(plain - X0))) < 1e-3


def test_ddim_round_trip_is_first_order():
    errors = [round_trip_error(DDIM_VP, schedules.log_snr_uniform(VP_, n)) for n in (50, 100, 200)]
    np.testing.assert_allclose(slope(errors), 1.0, atol=0.1)
    assert errors[-1] < 0.05  # measured 0.0375


def test_heun_round_trip_order():
    errors = [round_trip_error(HEUN_VP, schedules.karras(VP_, n)) for n in (25, 50)]
    np.testing.assert_allclose(slope(errors), 3.0, atol=0.25)  # order 2, round trip p + 1
    assert errors[-1] < 2e-3  # measured 7.9e-4


@pytest.mark.parametrize(
    "sampler, bound",
    [(dpm_solver_pp(VP_, order=2), 1e-2), (ipndm(VP_), 1e-2)],
    ids=["dpm_solver_pp2", "ipndm4"],
)
def test_multistep_samplers_invert(sampler, bound):
    """Multistep samplers run on the reversed grid with their own history (measured 25 steps:
    3.9e-3 and 2.8e-3; at 50 steps slopes 3.0 and 4.2)."""
    assert round_trip_error(sampler, schedules.log_snr_uniform(VP_, 25)) < bound


def test_diffrax_round_trip_below_1e_6():
    ode = editing.DiffraxODE(VP_, rtol=1e-8, atol=1e-8)  # Tsit5
    ts = jnp.array([VP_.t_max, VP_.t_min, 0.0])  # only the end points matter
    z = editing.encode(VP_, D_VP, X0, ts, method=ode)
    x = editing.decode(ode, D_VP, z, ts)
    assert float(jnp.max(jnp.abs(x - X0))) < 1e-6  # measured 2.2e-8 (1.5e-10 at tol 1e-10)
    # The encoding agrees with 200-step DDIM inversion to DDIM's error (measured 0.0099).
    z_ddim = editing.encode(VP_, D_VP, X0, schedules.log_snr_uniform(VP_, 200))
    assert float(jnp.mean(jnp.abs(z_ddim - z))) < 0.02


def test_encode_under_jit_matches_eager():
    ts = schedules.log_snr_uniform(VP_, 8)
    eager = editing.encode(VP_, D_VP, X0[:4], ts)
    traced = jax.jit(lambda ts: editing.encode(VP_, D_VP, X0[:4], ts))(ts)  # lax.cond path
    np.testing.assert_allclose(traced, eager, rtol=1e-12, atol=1e-12)


def test_encode_keeps_float32():
    ts = schedules.log_snr_uniform(VP_, 10, dtype=jnp.float32)
    z = editing.encode(VP_, D_VP, X0[:4].astype(jnp.float32), ts)
    assert z.dtype == jnp.float32 and z.shape == (4, 6)


# ---------------------------------------------------------------------------------------------
# inpainting
# ---------------------------------------------------------------------------------------------

_A = jnp.array([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0.7, -0.3, 0.5, 0], [-0.5, 0.6, 0.2, 0.4]])
GAUSS = Gaussian(jnp.array([0.5, -0.5, 1.0, 0.0]), _A @ _A.T)
KNOWN = jnp.array([1.5, 0.5, 0.0, 0.0])  # the first two coordinates are known
MASK = jnp.array([1.0, 1.0, 0.0, 0.0])


def conditional_gaussian():
    """Exact mean and covariance of coordinates (2, 3) given coordinates (0, 1) = KNOWN[:2]."""
    c, m = GAUSS.cov, GAUSS.mean
    gain = c[2:, :2] @ jnp.linalg.inv(c[:2, :2])
    return m[2:] + gain @ (KNOWN[:2] - m[:2]), c[2:, 2:] - gain @ c[:2, 2:]


@pytest.mark.parametrize(
    "sampler, final_zero, jit",
    [(DDIM_VP, False, False), (HEUN_VP, True, True)],
    ids=["ddim-no-final-zero", "heun-traced-grid"],
)
def test_inpaint_never_changes_known_entries(sampler, final_zero, jit):
    """(DDPM on a grid ending with 0 is checked in the conditional-Gaussian test below.)"""
    ts = schedules.log_snr_uniform(VP_, 5)
    ts = ts if final_zero else ts[:-1]
    x_known = MIX.sample(8, key=_k[2])
    mask = jnp.zeros((1, 6)).at[:, ::2].set(1)

    def run(ts):
        return editing.inpaint(sampler, D_VP, x_known, mask, ts, key=jax.random.key(3), resample=2)

    out = jax.jit(run)(ts) if jit else run(ts)  # under jit the final 0 is decided at run time
    assert out.shape == x_known.shape and out.dtype == x_known.dtype
    np.testing.assert_array_equal(out[:, ::2], x_known[:, ::2])  # exactly
    assert float(jnp.min(jnp.abs(out[:, 1::2] - x_known[:, 1::2]))) > 0  # the rest is filled


def test_inpaint_approaches_the_exact_conditional_gaussian():
    denoise, n = GAUSS.denoiser(VP_), 2000
    mean, cov = conditional_gaussian()
    x_known = jnp.broadcast_to(KNOWN, (n, 4))
    errors = {}
    for steps in (20, 100):
        ts = schedules.log_snr_uniform(VP_, steps)
        for resample in (1, 5):
            key = jax.random.key(steps)
            out = editing.inpaint(DDPM_VP, denoise, x_known, MASK, ts, key=key, resample=resample)
            np.testing.assert_array_equal(out[:, :2], x_known[:, :2])  # known entries, exactly
            fill = np.asarray(out[:, 2:])
            errors[steps, resample] = (
                np.max(np.abs(fill.mean(0) - mean)),
                np.max(np.abs(np.cov(fill.T) - cov)),
            )
    # Replacement alone stays biased (about 0.17 in the mean); resampling removes most of it.
    for steps in (20, 100):
        assert errors[steps, 5][0] < 0.5 * errors[steps, 1][0]
        assert errors[steps, 5][1] < 0.6 * errors[steps, 1][1]
    assert errors[100, 5][0] < 0.06 and errors[100, 5][1] < 0.04
    assert errors[100, 5][1] < errors[20, 5][1]


# ---------------------------------------------------------------------------------------------
# SDEdit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", [VP_, EDM_], ids=["VP", "EDM"])
def test_sdedit_from_t_min_returns_the_input(process):
    ts = jnp.array([process.t_min, 0.0])  # almost no noise, then one denoising step
    out = editing.sdedit(ddim(process), MIX.denoiser(process), X0, ts, key=jax.random.key(4))
    level = float(process.sigma(process.t_min) / process.alpha(process.t_min))
    # out = D(x + level * eps) = x + O(level): within 5 noise levels (level = 0.032 VP, 0.002 EDM).
    assert float(jnp.max(jnp.abs(out - X0))) < 5 * level


def test_sdedit_start_time_trades_faithfulness_for_realism():
    start = [0.05, 0.2, 0.4, 0.7]
    lam_min = float(VP_.log_snr(VP_.t_min))
    x = jnp.full((256, 6), 2.5)  # an unlikely input, far from the mixture
    dist = []
    for t0 in start:  # grids of the same length: one compilation
        lam = jnp.linspace(float(VP_.log_snr(t0)), lam_min, 20)
        ts = schedules.append_zero(jnp.clip(VP_.t_from_log_snr(lam), VP_.t_min, t0))
        out = editing.sdedit(DDIM_VP, D_VP, x, ts, key=jax.random.key(5))
        dist.append(float(jnp.mean(jnp.linalg.norm(out - x, axis=1))))
    assert np.all(np.diff(dist) > 0), dist
    assert dist[0] < 0.5 and dist[-1] > 3.0


def test_sdedit_from_t_max_is_unconditional_sampling():
    """An input far from the data is forgotten: moments and KS against the exact mixture.

    Measured (Heun, 25 Karras steps, 2000 samples): mean error 0.02, covariance error 0.034,
    KS statistics 0.011 and 0.027 (the 5% critical value is 0.030).
    """
    mix2 = GaussianMixture(jnp.array([[-1.5, 0.5], [1.0, -0.5]]), jnp.array([0.4, 0.6]))
    n = 2000
    x = jnp.full((n, 2), 3.0)
    ts = schedules.karras(VP_, 25)
    out = np.asarray(editing.sdedit(HEUN_VP, mix2.denoiser(VP_), x, ts, key=jax.random.key(6)))
    ref = np.asarray(mix2.sample(200_000, key=jax.random.key(7)))
    np.testing.assert_allclose(out.mean(0), ref.mean(0), atol=0.06)
    np.testing.assert_allclose(np.cov(out.T), np.cov(ref.T), atol=0.08)
    for j in range(2):  # marginal CDF of the mixture, exactly

        def cdf(v, j=j):
            z = (v[:, None] - np.asarray(mix2.means[:, j])) / np.asarray(mix2.scales[:, j])
            return scipy.stats.norm.cdf(z) @ np.asarray(mix2.weights)

        assert scipy.stats.kstest(out[:, j], cdf).statistic < 0.04


# ---------------------------------------------------------------------------------------------
# interpolation
# ---------------------------------------------------------------------------------------------


def test_slerp_endpoints_norm_and_midpoint():
    a = jnp.array([[1.0, 0.0, 0.0]])
    b = jnp.array([[0.0, 2.0, 0.0]])
    out = editing.slerp(a, b, jnp.array([0.0, 0.5, 1.0]))
    assert out.shape == (3, 1, 3)
    np.testing.assert_allclose(out[0], a, atol=1e-15)
    np.testing.assert_allclose(out[2], b, atol=1e-15)
    np.testing.assert_allclose(out[1], (a + b) / np.sqrt(2.0), atol=1e-15)
    c = jnp.array([[0.0, 0.0, 1.0]])
    norms = jnp.linalg.norm(editing.slerp(a, c, jnp.linspace(0, 1, 7)), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-14)  # equal norms stay on the sphere
    np.testing.assert_allclose(editing.slerp(a, a, jnp.array([0.3])), a[None], atol=1e-15)


def test_interpolate_shape_and_endpoints():
    ts = schedules.log_snr_uniform(VP_, 50)  # shapes shared with the DDIM round trip: no compile
    out = editing.interpolate(VP_, D_VP, X0[:32], X0[32:], ts, [0.0, 1.0], sampler=DDIM_VP)
    assert out.shape == (2, 32, 6)
    # The end points are round trips at 50 DDIM steps (mean error 0.150, see the module doc).
    np.testing.assert_allclose(
        np.mean(np.max(np.abs(out - X0.reshape(2, 32, 6)), -1)), 0.15, atol=0.05
    )


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def _inpaint(mask=MASK, **kw):
    ts = schedules.log_snr_uniform(VP_, 3)
    kw = {"key": jax.random.key(0), **kw}
    return editing.inpaint(DDPM_VP, GAUSS.denoiser(VP_), KNOWN[None], mask, ts, **kw)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: _inpaint(mask=jnp.ones(3)), ValueError, "mask must broadcast"),
        (lambda: _inpaint(mask=jnp.array([1.0, 0.5, 0, 0])), ValueError, "only 0"),
        (lambda: _inpaint(resample=0), ValueError, "resample"),
        (lambda: _inpaint(key=None), ValueError, "key"),
        (
            lambda: editing.sdedit(DDIM_VP, D_VP, X0, jnp.array([1.5, 0.5, 0.0]), key=_k[3]),
            ValueError,
            "SDEdit start time",
        ),
        (
            lambda: editing.sdedit(DDIM_VP, D_VP, X0, jnp.array([1e-5, 0.0]), key=_k[3]),
            ValueError,
            "SDEdit start time",
        ),
        (
            lambda: editing.encode(VP_, D_VP, X0, schedules.uniform(VP_, 5)[::-1]),
            ValueError,
            "increasing",
        ),
        (
            lambda: editing.encode(VP_, D_VP, X0, schedules.uniform(VP_, 5), method=DDPM_VP),
            ValueError,
            "deterministic",
        ),
        (
            lambda: editing.encode(VP_, D_VP, X0, schedules.uniform(VP_, 5), method="rk4"),
            ValueError,
            "Unknown method",
        ),
        (
            lambda: editing.encode(EDM_, D_VP, X0, schedules.uniform(EDM_, 5), method=DDIM_VP),
            ValueError,
            "same process",
        ),
        (
            lambda: editing.decode(DDPM_VP, D_VP, X0, schedules.uniform(VP_, 5)),
            ValueError,
            "deterministic",
        ),
        (
            lambda: editing.interpolate(
                VP_, D_VP, X0[:2], X0[:3], schedules.uniform(VP_, 5), [0.5]
            ),
            ValueError,
            "same shape",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
