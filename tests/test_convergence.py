"""ODE samplers (DDIM, Heun, DPM-Solver, DPM-Solver++ multistep and singlestep, iPNDM, UniPC,
LMS, DEIS): measured orders of convergence against the probability-flow ODE solved by diffrax,
identities from the papers, a NumPy reference loop, the SDE variant's distribution, and every
process (exact Gaussian flow).

Compilation dominates the run time, so every group of runs is one ``jax.jit`` over all samplers
(one compilation per process and grid length), shared by the tests through module-level caches.
The gradient test with respect to the grid (reverse mode through the scan) is the costliest one.
"""

import functools
import math

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdiff import schedules
from jaxdiff.analytic import Gaussian, GaussianMixture
from jaxdiff.processes import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine
from jaxdiff.samplers import (
    ddim,
    deis,
    dpm_solver,
    dpm_solver_pp,
    dpm_solver_pp_sde,
    dpm_solver_pp_singlestep,
    heun,
    ipndm,
    lms,
    sample,
    unipc,
)
from jaxdiff.samplers.dpm_solver import moment_weights, phi
from jaxdiff.samplers.ipndm import adams_bashforth_weights

MIX = GaussianMixture(
    jnp.array([[-1.0, 0.5, 0.0], [1.2, -0.3, 0.4], [0.0, 1.0, -1.0], [0.3, -1.1, 0.8]]),
    jnp.array([0.5, 0.6, 0.45, 0.55]),
    jnp.array([0.3, 0.2, 0.3, 0.2]),
)
BATCH = 64
KEY = jax.random.key(7)
PROCESS = VP()

# Solver steps m of the log-SNR uniform grids (m + 1 grid steps, the last one the engine's final
# denoising). Chosen after measuring 8 ... 256 steps on 4 seeds: below 32 steps the slopes are
# pre-asymptotic (e.g. DPM-Solver++(2M) 1.5 from 8 to 16 steps), and with narrower components
# (scales 0.25-0.5) a single point near a boundary between modes keeps the max error
# pre-asymptotic up to 256 steps. At 256 steps the smallest error (DPM-Solver-3, ~1e-7) is far
# above the reference's accuracy.
#
# The orders are measured on VP only. On a grid uniform in log-SNR every sampler here is
# invariant under a change of process: it only sees x / alpha and lambda (the exponential
# integrators, Lu et al. 2022, Sec. 3.3) or sigma / alpha (Heun, iPNDM; Karras et al. 2022,
# Sec. 3), and the probability-flow ODE in those variables is the same for every process. The
# slopes measured on EDM were equal to VP's to 0.01 (kept in the comments below); every process's
# coefficients are checked by the exact Gaussian flow at the end of this file.
#
# A least-squares slope over 64, 128 and 256 steps (equally spaced in log) is the slope between
# the end points: the middle grid does not change it and is not run (a third of the compilation).
STEPS = (64, 256)

# name: (factory, denoiser calls per solver step, theoretical order, tolerance on the fitted
# slope, measured slopes on VP and EDM over 64-256 steps)
ODE_SAMPLERS = {
    "ddim": (ddim, 1, 1, 0.15, "measured VP 1.00, EDM 0.99"),
    "heun": (heun, 2, 2, 0.2, "measured VP 2.03"),
    "dpm_solver_2": (functools.partial(dpm_solver, order=2), 2, 2, 0.2, "measured 2.02, 2.02"),
    "dpm_solver_3": (functools.partial(dpm_solver, order=3), 3, 3, 0.25, "measured 2.99, 2.99"),
    "dpm_solver_pp_2": (
        functools.partial(dpm_solver_pp, order=2, lower_order_final=False),
        1,
        2,
        0.2,
        "measured 2.02, 2.02",
    ),
    "dpm_solver_pp_3": (
        functools.partial(dpm_solver_pp, order=3, lower_order_final=False),
        1,
        3,
        0.25,
        "measured 2.94, 2.95",
    ),
    # iPNDM's fixed Adams-Bashforth weights on a grid that is not uniform in sigma/alpha: order 2
    "ipndm": (ipndm, 1, 2, 0.2, "order 2 on non-uniform grids; measured 2.01, 2.01"),
    # with the weights of the actual grid, order 4 (asymptotically; 3.7 over 64-256 steps)
    "ipndm_variable": (
        functools.partial(ipndm, variable_step=True),
        1,
        4,
        0.4,
        "measured 3.73, 3.69",
    ),
    # UniP-2 + UniC: order p + 1 = 3 (Zhao et al. 2023, Thm. 3.2)
    "unipc_2": (
        functools.partial(unipc, order=2, lower_order_final=False),
        1,
        3,
        0.25,
        "measured 3.02, 3.02",
    ),
    # issue 14: k-diffusion's LMS with exact coefficients (= ipndm_variable), DEIS's tAB in the
    # process's time (Gauss-Legendre weights), singlestep DPM-Solver++ (2S, 3S)
    "lms": (lms, 1, 4, 0.4, "= ipndm_variable; measured 3.73"),
    "deis_2": (functools.partial(deis, order=2), 1, 2, 0.2, "measured 1.95"),
    "deis_3": (functools.partial(deis, order=3), 1, 3, 0.25, "measured 2.92"),
    "deis_4": (functools.partial(deis, order=4), 1, 4, 0.4, "measured 3.78"),
    "dpm_solver_pp_2s": (
        functools.partial(dpm_solver_pp_singlestep, order=2),
        2,
        2,
        0.2,
        "measured 1.96",
    ),
    "dpm_solver_pp_3s": (
        functools.partial(dpm_solver_pp_singlestep, order=3),
        3,
        3,
        0.25,
        "measured 2.97",
    ),
}


def _pf_ode_reference(process, x_T):
    """Probability-flow ODE dx/dt = f x - g^2/2 score from t_max to t_min (Dopri8, tol 1e-11),
    then the denoiser at t_min: what a grid ending with (t_min, 0) approximates."""
    denoise = MIX.denoiser(process)

    def velocity(t, x, args):
        score = (process.alpha(t) * denoise(x, t) - x) / process.sigma(t) ** 2
        return process.f(t) * x - 0.5 * process.g2(t) * score

    sol = dfx.diffeqsolve(
        dfx.ODETerm(velocity),
        dfx.Dopri8(),
        process.t_max,
        process.t_min,
        -1e-3,
        x_T,
        stepsize_controller=dfx.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=100_000,
    )
    return denoise(sol.ys[-1], process.t_min)


def _run_all(samplers, denoise, x_T, ts, key=None):
    """Every sampler on one concrete grid, compiled as one program."""
    return jax.jit(lambda x: {k: sample(s, denoise, x, ts, key=key) for k, s in samplers.items()})(
        x_T
    )


@functools.cache
def convergence():
    """Errors (max over the batch) and NFEs of every ODE sampler at every grid of ``STEPS``, and
    the outputs on the coarsest grid (DPM-Solver-1 runs there only, to be compared with DDIM)."""
    process = PROCESS
    x_T = process.prior_sample((BATCH, 3), key=jax.random.key(0), dtype=jnp.float64)
    ref = jax.jit(_pf_ode_reference, static_argnums=0)(process, x_T)
    samplers = {name: spec[0](process) for name, spec in ODE_SAMPLERS.items()}
    errors, nfes = {k: [] for k in samplers}, {k: [] for k in samplers}
    for m in STEPS:
        run = dict(samplers, dpm_solver_1=dpm_solver(process, 1)) if m == STEPS[0] else samplers
        res = _run_all(run, MIX.denoiser(process), x_T, schedules.log_snr_uniform(process, m + 1))
        if m == STEPS[0]:
            coarsest = {k: r.x for k, r in res.items()}
        for k in samplers:
            errors[k].append(float(jnp.max(jnp.abs(res[k].x - ref))))
            nfes[k].append(int(res[k].nfe))
    return errors, nfes, coarsest


def _slope(errors):
    """Least-squares slope of log(error) against log(steps), sign flipped (the order)."""
    return -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]


@pytest.mark.parametrize("name", list(ODE_SAMPLERS))
def test_error_falls_at_the_theoretical_order(name):
    errors = convergence()[0][name]
    assert min(errors) > 1e-9, errors  # above the reference's accuracy: the fit is meaningful
    assert np.all(np.diff(errors) < 0), errors  # converges as the steps grow (DDIM included)
    _, _, order, tol, measured = ODE_SAMPLERS[name]
    assert abs(_slope(errors) - order) < tol, (name, order, measured, _slope(errors), errors)


def test_nfe_is_exact():
    nfes = convergence()[1]
    for name, spec in ODE_SAMPLERS.items():  # per solver step, plus 1 for the final denoising
        assert nfes[name] == [spec[1] * m + 1 for m in STEPS], name


def test_ddim_is_dpm_solver_1():
    out = convergence()[2]  # Lu et al. 2022, Sec. 4.1: DPM-Solver-1 is DDIM (eta = 0)
    np.testing.assert_allclose(out["dpm_solver_1"], out["ddim"], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2M) against a NumPy loop written from Lu et al. (2022b), Alg. 2
# --------------------------------------------------------------------------------------------
def _numpy_dpm_solver_pp_2m(denoise, x_T, ts, beta_min, beta_max, lower_order_final):
    """The paper's loop for the VP process; the final step into 0 returns the denoiser output."""
    B = lambda t: beta_min * t + 0.5 * (beta_max - beta_min) * t**2
    alpha = lambda t: np.exp(-0.5 * B(t))
    sigma = lambda t: np.sqrt(-np.expm1(-B(t)))
    lam = lambda t: np.log(alpha(t)) - np.log(sigma(t))  # lambda = log(alpha / sigma)
    x, x0_prev, n = np.asarray(x_T), None, len(ts) - 1
    for i in range(n - 1):  # solver steps into ts[1] ... ts[n - 1] = t_min
        t, s = ts[i], ts[i + 1]
        x0 = np.asarray(denoise(jnp.asarray(x), t))
        h = lam(s) - lam(t)
        last = lower_order_final and i == n - 2
        if x0_prev is None or last:
            D = x0  # first order (first step; last step with lower_order_final)
        else:
            r = (lam(t) - lam(ts[i - 1])) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma(s) / sigma(t) * x - alpha(s) * np.expm1(-h) * D
        x0_prev = x0
    return np.asarray(denoise(jnp.asarray(x), ts[n - 1]))


def test_dpm_solver_pp_2m_matches_numpy_loop_on_karras_grid():
    process = VP()
    x_T = process.prior_sample((BATCH, 3), key=jax.random.key(1), dtype=jnp.float64)
    ts = schedules.karras(process, 10)
    samplers = {flag: dpm_solver_pp(process, 2, lower_order_final=flag) for flag in (False, True)}
    res = _run_all(samplers, MIX.denoiser(process), x_T, ts)
    for flag in (False, True):
        ref = _numpy_dpm_solver_pp_2m(
            MIX.denoiser(process), x_T, np.asarray(ts), process.beta_min, process.beta_max, flag
        )
        np.testing.assert_allclose(res[flag].x, ref, rtol=0, atol=1e-10)
    # the lowered final step changes the result (it is not a no-op on a 10-step grid)
    assert float(jnp.max(jnp.abs(res[True].x - res[False].x))) > 1e-4


# --------------------------------------------------------------------------------------------
# SDE-DPM-Solver++(2M) samples the mixture
# --------------------------------------------------------------------------------------------
def test_dpm_solver_pp_sde_samples_the_mixture():
    process, n = VP(), 4000
    x_T = process.prior_sample((n, 3), key=jax.random.key(2), dtype=jnp.float64)
    ts = schedules.log_snr_uniform(process, 100)
    res = sample(dpm_solver_pp_sde(process), MIX.denoiser(process), x_T, ts, key=jax.random.key(3))
    assert int(res.nfe) == 100
    x = np.asarray(res.x)
    exact = np.asarray(MIX.sample(400_000, key=jax.random.key(4)))
    # mean and second moment per coordinate within 4 standard errors
    for f in (lambda y: y, lambda y: y**2):
        se = np.std(f(exact), axis=0) / np.sqrt(n)
        np.testing.assert_array_less(np.abs(f(x).mean(0) - f(exact).mean(0)), 4 * se)
    # component weights (the component of largest responsibility at t_min) within 4 s.e.
    resp = MIX.responsibilities(process, jnp.asarray(x), jnp.asarray(process.t_min))
    frac = np.bincount(np.asarray(jnp.argmax(resp, -1)), minlength=4) / n
    w = np.asarray(MIX.weights)
    np.testing.assert_array_less(np.abs(frac - w), 4 * np.sqrt(w * (1 - w) / n))
    # Kolmogorov-Smirnov per coordinate against the exact marginal CDF of the mixture
    means, scales = np.asarray(MIX.means), np.asarray(MIX.scales)
    for j in range(3):
        cdf = lambda v, j=j: scipy.stats.norm.cdf((v[:, None] - means[:, j]) / scales[:, j]) @ w
        assert scipy.stats.kstest(x[:, j], cdf).pvalue > 1e-3, j


# --------------------------------------------------------------------------------------------
# Every process: the exact probability-flow map of a Gaussian
# --------------------------------------------------------------------------------------------
GAUSS = Gaussian(jnp.array([0.5, -0.3]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))
SWEEP_STEPS = 100
# name: (factory, max error at 100 log-SNR steps against the exact map), 2-4x the largest error
# measured over the six processes (in brackets); a process mishandled gives errors of order 1.
# One solver per family: DPM-Solver-2, DPM-Solver++(2M) and the fixed iPNDM run the same process
# code as these (the warm-up steps of the 3rd-order solvers are their 2nd-order steps); DDIM,
# Euler and Heun run on every process in tests/test_samplers.py.
SWEEP = {
    "dpm_solver_3": (functools.partial(dpm_solver, order=3), 5e-5),  # [1.3e-5 SubVP]
    "dpm_solver_pp_3": (functools.partial(dpm_solver_pp, order=3), 2e-4),  # [7.2e-5 SubVP]
    "ipndm_variable": (functools.partial(ipndm, variable_step=True), 5e-3),  # [1.8e-3 SubVP]
    "unipc_2": (unipc, 3e-3),  # [1.1e-3 SubVP]
    # tAB-DEIS works in each process's own time: every process's noise_level and quadrature
    "deis_3": (functools.partial(deis, order=3), 6e-3),  # [2.3e-3 EDM]
}


SWEEP_PROCESSES = {
    type(p).__name__: p for p in (VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow())
}


def _gaussian_flow(process, x_T):
    r"""Exact probability-flow map of :math:`\mathcal N(m, C)` from ``t_max`` to ``t_min``, then the
    denoiser. In :math:`\tilde x = x/\alpha`, :math:`\tilde\sigma = \sigma/\alpha` the ODE is
    :math:`d\tilde x/d\tilde\sigma = (\tilde x - D)/\tilde\sigma`, solved in the eigenbasis of C by
    :math:`\tilde x - m \propto \sqrt{c + \tilde\sigma^2}`."""
    t0, t1 = jnp.asarray(process.t_max), jnp.asarray(process.t_min)
    s0, s1 = process.sigma(t0) / process.alpha(t0), process.sigma(t1) / process.alpha(t1)
    y = (x_T / process.alpha(t0) - GAUSS.mean) @ GAUSS.evecs
    y = y * jnp.sqrt((GAUSS.evals + s1**2) / (GAUSS.evals + s0**2))
    x1 = process.alpha(t1) * (GAUSS.mean + y @ GAUSS.evecs.T)
    return GAUSS.denoiser(process)(x1, t1)


@functools.cache
def sweep(process_name):
    process = SWEEP_PROCESSES[process_name]
    x_T = process.prior_sample((BATCH, 2), key=jax.random.key(5), dtype=jnp.float64)
    samplers = {name: spec[0](process) for name, spec in SWEEP.items()}
    ts = schedules.log_snr_uniform(process, SWEEP_STEPS)
    res = _run_all(samplers, GAUSS.denoiser(process), x_T, ts)
    ref = _gaussian_flow(process, x_T)
    return {k: float(jnp.max(jnp.abs(r.x - ref))) for k, r in res.items()}


@pytest.mark.parametrize("process_name", list(SWEEP_PROCESSES))
def test_every_process_follows_the_exact_gaussian_flow(process_name):
    errors = sweep(process_name)
    for name, (_, tol) in SWEEP.items():
        assert errors[name] < tol, (name, errors[name])


# --------------------------------------------------------------------------------------------
# float32, gradients with respect to the grid, helpers, bad input
# --------------------------------------------------------------------------------------------
F32_SAMPLERS = ("dpm_solver_3", "dpm_solver_pp_3", "ipndm_variable", "unipc_2")


def test_float32_in_float32_out_close_to_float64():
    process, m = VP(), STEPS[0]
    samplers = {name: ODE_SAMPLERS[name][0](process) for name in F32_SAMPLERS}
    samplers["dpm_solver_pp_sde"] = dpm_solver_pp_sde(process)
    x_T = process.prior_sample((BATCH, 3), key=jax.random.key(0), dtype=jnp.float64)
    mix32 = GaussianMixture(*(a.astype(jnp.float32) for a in (MIX.means, MIX.scales, MIX.weights)))
    ts = schedules.log_snr_uniform(process, m + 1)  # float64: the engine casts it to float32
    out32 = _run_all(samplers, mix32.denoiser(process), x_T.astype(jnp.float32), ts, KEY)
    out64 = convergence()[2]  # the same grid and x_T in float64
    for name, res in out32.items():
        assert res.x.dtype == jnp.float32, name
        assert bool(jnp.all(jnp.isfinite(res.x))), name
        if name in out64:
            err = float(jnp.max(jnp.abs(res.x - out64[name])))
            assert err < 1e-4, (name, err)


def test_gradients_with_respect_to_the_grid_are_finite():
    # Reverse mode through the whole scan: every jnp.where-guarded branch (phi near 0, warm-up
    # placeholders of the history, UniC's dummy first correction, lowered final orders) must
    # give finite cotangents. DPM-Solver++(3M) and UniPC share every guarded helper; a cheap
    # linear denoiser keeps the (expensive) compilation of the backward scan small.
    process = VP()
    samplers = {"dpm_solver_pp_3": dpm_solver_pp(process, 3), "unipc_2": unipc(process, 2)}
    x_T = process.prior_sample((4, 3), key=jax.random.key(8), dtype=jnp.float64)
    ts = schedules.karras(process, 5)  # < 15 steps: warm-up and lowered final orders both active

    def denoise(x, t):
        return 0.7 * x

    @jax.jit
    def grads(ts):
        loss = lambda ts, s: jnp.sum(sample(s, denoise, x_T, ts).x ** 2)
        return {k: jax.grad(loss)(ts, s) for k, s in samplers.items()}

    for name, g in grads(ts).items():
        assert bool(jnp.all(jnp.isfinite(g))), (name, g)
        assert float(jnp.max(jnp.abs(g[1:-1]))) > 0, name  # interior times matter


def test_phi_series_and_recursion_agree_with_the_definition():
    for k in range(5):
        for z in (0.0, 1e-6, -0.2, 0.249, 0.251, -0.7, -3.0, 2.0):
            exact = math.fsum(z**j / math.factorial(j + k) for j in range(60))
            assert abs(float(phi(k, jnp.float64(z))) / exact - 1) < 1e-13, (k, z)
    assert bool(jnp.all(jnp.isfinite(jax.vmap(jax.grad(lambda z: phi(3, z)))(jnp.zeros(2)))))


def test_fixed_ipndm_weights_are_adams_bashforth():
    nodes, moments = -jnp.arange(4.0), 1.0 / jnp.arange(1.0, 5.0)
    expected = {1: [1, 0, 0, 0], 2: [3 / 2, -1 / 2, 0, 0], 3: [23 / 12, -16 / 12, 5 / 12, 0]}
    expected[4] = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
    sig_prev = jnp.array([2.0, 3.0, 5.0])  # any grid: the fixed weights ignore it
    for q, w in expected.items():
        np.testing.assert_allclose(moment_weights(nodes, moments, q), w, rtol=0, atol=1e-14)
        # iPNDM's table lookup gives the same weights as the moment equations
        fixed = adams_bashforth_weights(jnp.float64(1.0), jnp.float64(0.5), sig_prev, q)
        np.testing.assert_allclose(fixed, w, rtol=0, atol=1e-15)


def test_bad_orders_raise():
    process = VP()
    with pytest.raises(ValueError, match=r"dpm_solver has orders 1, 2, 3; got order=4"):
        dpm_solver(process, order=4)
    with pytest.raises(ValueError, match=r"dpm_solver_pp has orders 2, 3; got order=1"):
        dpm_solver_pp(process, order=1)
    with pytest.raises(ValueError, match=r"ipndm has orders 1, 2, 3, 4; got order=5"):
        ipndm(process, order=5)
    with pytest.raises(ValueError, match=r"unipc has orders 1, 2, 3; got order=0"):
        unipc(process, order=0)
    with pytest.raises(ValueError, match=r"got order=2.5"):
        unipc(process, order=2.5)
    with pytest.raises(ValueError, match=r"got order=True"):
        dpm_solver(process, order=True)
