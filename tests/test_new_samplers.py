"""The samplers of issue 14: LMS, ancestral wrappers, singlestep and SDE DPM-Solver++, DEIS, the
adaptive DPM-Solver, annealed Langevin dynamics, and the analytical first step (AFS).

- every factory: equal settings give equal, hashable samplers; one compiled run over all of them
  counts the denoiser's calls (a host callback) and checks the reported NFE and one NaN row;
- identities, in float64: ``eta = 0`` is the base sampler (ancestral, SDE-DPM-Solver++),
  ``deis(order=1)`` is DDIM, DEIS on EDM is LMS, LMS is the variable-step iPNDM;
- LMS against a NumPy loop of k-diffusion's ``sample_lms`` (coefficients by ``scipy.integrate.quad``);
- the stochastic samplers reproduce a Gaussian's mean and covariance for every process;
- the adaptive solver reaches an error consistent with its tolerance against the exact flow;
- new hyperparameter values compile nothing; bad arguments raise clear errors.

The orders of convergence of LMS, DEIS and DPM-Solver++(2S, 3S) are measured with the other ODE
samplers in ``tests/test_convergence.py``. Every group of runs is one ``jax.jit``.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import jaxdiff
from jaxdiff import samplers as S
from jaxdiff import schedules
from jaxdiff.analytic import Gaussian, GaussianMixture
from jaxdiff.processes import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine
from jaxdiff.samplers.dpm_solver import afs_x0

MIX = GaussianMixture(
    jnp.array([[-1.5, 0.5], [1.0, -0.5], [0.5, 1.5]]),
    jnp.array([0.3, 0.5, 0.4]),
    jnp.array([0.3, 0.5, 0.2]),
)
GAUSS = Gaussian(jnp.array([0.5, -0.3]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))
KEY = jax.random.key(0)


def prior(process, n, seed=0, dtype=jnp.float64):
    return process.prior_sample((n, 2), key=jax.random.key(seed), dtype=dtype)


@contextlib.contextmanager
def backend_compilations():
    """The XLA compilations made inside the block (``jax.monitoring`` events)."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------------------------
# Every factory: equality and hashing, exact NFE counted by the denoiser itself, a NaN row
# --------------------------------------------------------------------------------------------
FACTORIES = {
    "lms": S.lms,
    "lms_2_afs": lambda p: S.lms(p, order=2, afs=True),
    "deis_1": lambda p: S.deis(p, order=1),
    "deis_4": S.deis,
    "deis_3_afs": lambda p: S.deis(p, order=3, afs=True),
    "dpm_solver_pp_2s": lambda p: S.dpm_solver_pp_singlestep(p, order=2),
    "dpm_solver_pp_3s": lambda p: S.dpm_solver_pp_singlestep(p, order=3),
    "dpm_solver_pp_sde_3": lambda p: S.dpm_solver_pp_sde(p, 3),
    "dpm_solver_pp_sde_2_eta": lambda p: S.dpm_solver_pp_sde(p, 2, eta=0.5),
    "euler_ancestral": lambda p: S.ancestral(S.euler(p)),
    "dpm_2_ancestral": lambda p: S.ancestral(S.dpm_solver(p, order=2)),
    "dpm_pp_2s_ancestral": lambda p: S.ancestral(S.dpm_solver_pp_singlestep(p, 2), eta=0.7),
    "dpm_solver_pp_3_afs": lambda p: S.dpm_solver_pp(p, 3, afs=True),
    "ipndm_afs": lambda p: S.ipndm(p, afs=True),
    "unipc_afs": lambda p: S.unipc(p, afs=True),
    "adaptive_3": S.dpm_solver_adaptive,
    "adaptive_2": lambda p: S.dpm_solver_adaptive(p, order=2, rtol=0.01, atol=1e-3),
    "annealed_langevin": lambda p: S.annealed_langevin(p, 3),
}
ADAPTIVE = ("adaptive_3", "adaptive_2")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_equal_settings_give_equal_hashable_samplers(name):
    a, b = FACTORIES[name](VP()), FACTORIES[name](VP())
    assert a == b and hash(a) == hash(b) and a is not b
    assert isinstance(a, S.Sampler)
    assert a != FACTORIES[name](EDM())
    assert isinstance(a.name, str) and a.nfe_per_step >= 1


@functools.cache
def counted_runs():
    """Every factory on EDM from 5 rows (row 2 NaN) over a 6-step Karras grid, as one program;
    each sampler's denoiser counts its own calls through a host callback."""
    process, n = EDM(), 6
    x_T = prior(process, 5, seed=3).at[2].set(jnp.nan)
    ts = schedules.karras(process, n)
    counts = {name: [] for name in FACTORIES}
    exact = MIX.denoiser(process)

    def counting(name):
        def denoise(x, t):
            jax.debug.callback(lambda: counts[name].append(1))
            return exact(x, t)

        return denoise

    samplers = {name: f(process) for name, f in FACTORIES.items()}
    run = jax.jit(
        lambda x: {
            k: jaxdiff.sample(s, counting(k), x, ts, key=KEY, save_trajectory=True)
            for k, s in samplers.items()
        }
    )
    results = jax.block_until_ready(run(x_T))
    return samplers, results, {k: len(v) for k, v in counts.items()}, n


@pytest.mark.parametrize("name", list(FACTORIES))
def test_reported_nfe_is_the_number_of_denoiser_calls(name):
    samplers, results, counts, n = counted_runs()
    assert int(results[name].nfe) == counts[name] > 0
    if name not in ADAPTIVE:  # fixed grids: nfe(n) in advance
        assert counts[name] == samplers[name].nfe(n), (counts[name], samplers[name].nfe(n))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_one_nan_row_leaves_the_other_rows_finite(name):
    res = counted_runs()[1][name]
    finite = np.isfinite(np.asarray(res.x)).all(axis=1)
    assert finite.tolist() == [True, True, False, True, True]
    assert res.xs.shape == (7, 5, 2) and res.denoised.shape == (6, 5, 2)


def test_afs_costs_one_evaluation_less_and_its_first_step_is_diff_samplers():
    samplers, results, counts, n = counted_runs()
    assert samplers["ipndm_afs"].nfe(n) == S.ipndm(EDM()).nfe(n) - 1 == n - 1
    assert S.lms(EDM(), afs=True).nfe(1) == 1  # a one-step grid is only the final denoising
    # EDM (alpha = 1, sigma = t): the first step is Euler with slope x_T / sqrt(1 + sigma_0^2)
    res, ts = results["ipndm_afs"], np.asarray(schedules.karras(EDM(), n))
    x_T = np.asarray(res.xs[0])
    x0_afs = x_T - ts[0] * x_T / np.sqrt(1.0 + ts[0] ** 2)
    np.testing.assert_allclose(res.denoised[0], x0_afs, rtol=1e-12, atol=1e-12)
    expected = x_T + (ts[1] - ts[0]) * x_T / np.sqrt(1.0 + ts[0] ** 2)
    np.testing.assert_allclose(res.xs[1], expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Identities in float64
# --------------------------------------------------------------------------------------------
@functools.cache
def identity_runs():
    vp, edm = VP(), EDM()
    pairs = {  # name: (sampler, the sampler it must equal), on (process, grid)
        "sde_2_eta0": (S.dpm_solver_pp_sde(vp, 2, eta=0.0), S.dpm_solver_pp(vp, 2)),
        "sde_3_eta0": (S.dpm_solver_pp_sde(vp, 3, eta=0.0), S.dpm_solver_pp(vp, 3)),
        "euler_anc_eta0": (S.ancestral(S.euler(vp), 0.0), S.euler(vp)),
        "dpm2_anc_eta0": (S.ancestral(S.dpm_solver(vp, 2), 0.0), S.dpm_solver(vp, 2)),
        "pp2s_anc_eta0": (
            S.ancestral(S.dpm_solver_pp_singlestep(vp, 2), 0.0),
            S.dpm_solver_pp_singlestep(vp, 2),
        ),
        "deis1_ddim": (S.deis(vp, 1), S.ddim(vp)),
        "lms_ipndm_variable": (S.lms(vp), S.ipndm(vp, variable_step=True)),
        "deis_edm_lms": (S.deis(edm, 4), S.lms(edm)),
        "deis3_edm_lms3": (S.deis(edm, 3), S.lms(edm, 3)),
    }
    x_vp, x_edm = prior(vp, 16, seed=4), prior(edm, 16, seed=4)
    grids = {vp: schedules.log_snr_uniform(vp, 12), edm: schedules.karras(edm, 12)}

    def run(x_vp, x_edm):
        out = {}
        for name, (a, b) in pairs.items():
            p = a.process
            x = x_vp if p == vp else x_edm
            d = MIX.denoiser(p)
            out[name] = [jaxdiff.sample(s, d, x, grids[p], key=KEY).x for s in (a, b)]
        return out

    return jax.jit(run)(x_vp, x_edm)


@pytest.mark.parametrize(
    "name",
    [
        "sde_2_eta0",
        "sde_3_eta0",
        "euler_anc_eta0",
        "dpm2_anc_eta0",
        "pp2s_anc_eta0",
        "deis1_ddim",
        "lms_ipndm_variable",
        "deis_edm_lms",
        "deis3_edm_lms3",
    ],
)
def test_stated_equalities_hold_exactly(name):
    # eta is traced here (the engine lifts it): the traced 0 takes the same path as any eta
    a, b = identity_runs()[name]
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-12, float(jnp.max(jnp.abs(a - b)))


def test_default_sde_is_2m_with_eta_1():
    assert S.dpm_solver_pp_sde(VP()) == S.dpm_solver_pp_sde(VP(), 2, eta=1.0)
    assert S.dpm_solver_pp_sde(VP()).name == "dpm_solver_pp_sde"
    assert not S.dpm_solver_pp_sde(VP(), eta=0.0).stochastic
    assert not S.ancestral(S.euler(VP()), 0.0).stochastic


# --------------------------------------------------------------------------------------------
# LMS against k-diffusion's formula (NumPy, scipy quadrature)
# --------------------------------------------------------------------------------------------
def _kdiffusion_lms_coeff(order, sigmas, i, j):
    """k-diffusion's ``linear_multistep_coeff``: the integral of the j-th Lagrange basis
    polynomial through sigmas[i], ..., sigmas[i - order + 1] over [sigmas[i], sigmas[i + 1]]."""

    def fn(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    return scipy.integrate.quad(fn, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


def _numpy_lms(process, x_T, ts, order=4):
    """k-diffusion's ``sample_lms`` in (x / alpha, sigma / alpha) on a grid ending at t_min."""
    alpha = lambda t: float(process.alpha(jnp.float64(t)))
    sigmas = np.array([float(process.noise_level(jnp.float64(t))) for t in ts])
    denoise = MIX.denoiser(process)
    x, ds = np.asarray(x_T) / alpha(ts[0]), []
    for i in range(len(ts) - 1):
        x0 = np.asarray(denoise(jnp.asarray(alpha(ts[i]) * x), ts[i]))
        ds = ([(x - x0) / sigmas[i]] + ds)[:order]
        q = min(i + 1, order)
        x = x + sum(_kdiffusion_lms_coeff(q, sigmas, i, j) * ds[j] for j in range(q))
    return alpha(ts[-1]) * x


@pytest.mark.parametrize("process", [EDM(), VP()], ids=["EDM", "VP"])
def test_lms_equals_kdiffusion_sample_lms(process):
    ts = np.asarray(schedules.karras(process, 12))[:-1]  # ends at t_min: every step is LMS
    x_T = prior(process, 8, seed=6)
    res = jax.jit(lambda x: jaxdiff.sample(S.lms(process), MIX.denoiser(process), x, ts).x)(x_T)
    np.testing.assert_allclose(res, _numpy_lms(process, x_T, ts), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Stochastic samplers: a Gaussian's moments for every process (float32, 200 steps)
# --------------------------------------------------------------------------------------------
PROCESSES = {type(p).__name__: p for p in (VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow())}
STOCHASTIC = {
    "euler_ancestral": lambda p: S.ancestral(S.euler(p)),
    "dpm_2_ancestral": lambda p: S.ancestral(S.dpm_solver(p, 2)),
    "dpm_pp_2s_ancestral": lambda p: S.ancestral(S.dpm_solver_pp_singlestep(p, 2)),
    "dpm_solver_pp_sde_3": lambda p: S.dpm_solver_pp_sde(p, 3),
    "dpm_solver_pp_sde_2_eta": lambda p: S.dpm_solver_pp_sde(p, 2, eta=0.5),
}
F32 = jnp.float32
GAUSS32 = Gaussian(GAUSS.mean.astype(F32), GAUSS.cov.astype(F32))
N_SWEEP, SWEEP_STEPS = 4000, 200
# Annealed Langevin: 50 levels from the prior's noise level down to sigma_L = 0.1, 20 steps each
# (NFE 981) with eps = sigma_L^2 (half the stability bound). With 4 steps per level (NFE 197)
# the covariance stays 3-6 standard errors too large (measured): the chain lags behind the
# shrinking levels; at 20 steps every process is within 1-2 standard errors.
LANGEVIN_LEVELS, LANGEVIN_STEPS, LANGEVIN_SIGMA_L = 50, 20, 0.1


def langevin_grid(process):
    sig = jnp.geomspace(
        float(process.noise_level(process.t_max)), LANGEVIN_SIGMA_L, LANGEVIN_LEVELS
    )
    ts = process.t_from_noise_level(sig.astype(F32)).at[0].set(process.t_max)
    return jnp.concatenate([ts, jnp.zeros(1, F32)])


@functools.cache
def stochastic_sweep(process_name):
    process = PROCESSES[process_name]
    k0, k1, k2 = jax.random.split(jax.random.key(21), 3)
    x_T = process.sample_marginal(GAUSS32.sample(N_SWEEP, key=k0), process.t_max, key=k1)[0]
    ts = schedules.log_snr_uniform(process, SWEEP_STEPS, dtype=F32)
    samplers = {name: f(process) for name, f in STOCHASTIC.items()}
    langevin = S.annealed_langevin(process, LANGEVIN_STEPS, eps=LANGEVIN_SIGMA_L**2)
    denoise, grid = GAUSS32.denoiser(process), langevin_grid(process)

    def run(x):
        out = {k: jaxdiff.sample(s, denoise, x, ts, key=k2) for k, s in samplers.items()}
        out["annealed_langevin"] = jaxdiff.sample(langevin, denoise, x, grid, key=k2)
        return out

    return jax.jit(run)(x_T)


@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_stochastic_samplers_reproduce_gaussian_moments(process_name):
    results = stochastic_sweep(process_name)
    mean, cov = np.asarray(GAUSS.mean), np.asarray(GAUSS.cov)
    var = np.diag(cov)
    for name, res in results.items():
        assert res.x.dtype == F32, name
        x = np.asarray(res.x, np.float64)
        # 5 standard errors of the sample mean and of the sample covariance (Gaussian formulas)
        np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / N_SWEEP), name)
        se_cov = np.sqrt((np.outer(var, var) + cov**2) / N_SWEEP)
        np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * se_cov, name)
    assert int(results["annealed_langevin"].nfe) == (LANGEVIN_LEVELS - 1) * LANGEVIN_STEPS + 1
    assert int(results["dpm_2_ancestral"].nfe) == 2 * SWEEP_STEPS - 1


# --------------------------------------------------------------------------------------------
# The adaptive DPM-Solver against the exact probability-flow map of a Gaussian
# --------------------------------------------------------------------------------------------
def _gaussian_flow(process, x_T):
    r"""Exact probability-flow map of GAUSS from t_max to t_min, then the denoiser: in the
    eigenbasis of C, :math:`\tilde x - m \propto \sqrt{c + \tilde\sigma^2}`."""
    t0, t1 = jnp.asarray(process.t_max), jnp.asarray(process.t_min)
    s0, s1 = process.noise_level(t0), process.noise_level(t1)
    y = (x_T / process.alpha(t0) - GAUSS.mean) @ GAUSS.evecs
    y = y * jnp.sqrt((GAUSS.evals + s1**2) / (GAUSS.evals + s0**2))
    x1 = process.alpha(t1) * (GAUSS.mean + y @ GAUSS.evecs.T)
    return GAUSS.denoiser(process)(x1, t1)


TOLERANCES = ((0.05, 0.0078), (1e-3, 1e-4))


@functools.cache
def adaptive_runs(process_name):
    process = PROCESSES[process_name]
    x_T = prior(process, 64, seed=8)
    grid = S.adaptive_grid(process)
    samplers = [
        S.dpm_solver_adaptive(process, order=o, rtol=r, atol=a)
        for o in (2, 3)
        for r, a in TOLERANCES
    ]
    run = jax.jit(lambda x: [jaxdiff.sample(s, GAUSS.denoiser(process), x, grid) for s in samplers])
    return run(x_T), _gaussian_flow(process, x_T)


@pytest.mark.parametrize("process_name", ["VP", "EDM", "RectifiedFlow"])
def test_adaptive_error_follows_the_tolerance(process_name):
    results, ref = adaptive_runs(process_name)
    scale = float(jnp.max(jnp.abs(ref)))
    for o in range(2):
        (loose, tight) = results[2 * o : 2 * o + 2]
        errors = [float(jnp.max(jnp.abs(r.x - ref))) for r in (loose, tight)]
        nfes = [int(r.nfe) for r in (loose, tight)]
        for (rtol, atol), err in zip(TOLERANCES, errors, strict=True):
            assert err < 10 * (atol + rtol * scale), (o + 2, rtol, err, nfes)
        assert errors[1] < errors[0] / 5 and nfes[1] > nfes[0] >= 3, (errors, nfes)


def test_adaptive_nan_row_neither_stalls_nor_changes_the_others():
    process = VP()
    x_T = prior(process, 6, seed=9)
    sampler, grid = S.dpm_solver_adaptive(process), S.adaptive_grid(process)
    run = jax.jit(lambda x: jaxdiff.sample(sampler, MIX.denoiser(process), x, grid))
    clean, with_nan = run(x_T[:5]), run(x_T.at[5].set(jnp.nan))
    assert bool(jnp.all(jnp.isnan(with_nan.x[5])))
    np.testing.assert_allclose(with_nan.x[:5], clean.x, rtol=0, atol=1e-12)
    assert int(with_nan.nfe) == int(clean.nfe)


def test_adaptive_grid_interior_points_are_checkpoints():
    # solving [t_max, t_1, t_min] adaptively equals [t_max, t_min] to the tolerance
    process = EDM()
    x_T = prior(process, 16, seed=10)
    sampler = S.dpm_solver_adaptive(process, rtol=1e-4, atol=1e-5)
    two = jnp.array([process.t_max, 1.0, process.t_min, 0.0])
    run = jax.jit(lambda x, ts: jaxdiff.sample(sampler, GAUSS.denoiser(process), x, ts))
    one, split = run(x_T, S.adaptive_grid(process)), run(x_T, two)
    ref = _gaussian_flow(process, x_T)
    assert float(jnp.max(jnp.abs(split.x - ref))) < 1e-3
    assert float(jnp.max(jnp.abs(one.x - ref))) < 1e-3


# --------------------------------------------------------------------------------------------
# No recompilation for new hyperparameter values; bad arguments
# --------------------------------------------------------------------------------------------
def test_new_hyperparameter_values_compile_nothing():
    process = EDM()
    x_T, ts = prior(process, 3, seed=11, dtype=F32), schedules.karras(process, 6, dtype=F32)
    mix32 = GaussianMixture(MIX.means.astype(F32), MIX.scales.astype(F32), MIX.weights)
    denoise = mix32.denoiser(process)

    def go(sampler, grid=ts):
        return jaxdiff.sample(sampler, denoise, x_T, grid, key=KEY).x

    builders = (
        lambda v: S.ancestral(S.euler(process), v),
        lambda v: S.dpm_solver_pp_sde(process, 3, eta=v),
        lambda v: S.dpm_solver_adaptive(process, rtol=0.05 * (1 + v), atol=0.01),
        lambda v: S.annealed_langevin(process, 2, eps=1e-6 * (1 + v)),
    )
    first = [go(b(1.0)) for b in builders]
    with backend_compilations() as compiled:
        again = [go(b(v)) for b in builders for v in (0.5, 0.0)]
    assert compiled == [], compiled
    assert float(jnp.max(jnp.abs(again[0] - first[0]))) > 1e-3  # eta 1 -> 0.5 changes it


def test_langevin_step_size_beyond_the_stability_bound_is_an_error():
    process = EDM()
    ts = jnp.array([process.t_max, 1.0, 0.5, 0.0])  # sigma_L = 0.5: eps must be below 0.5
    x_T, denoise = prior(process, 4, seed=12), GAUSS.denoiser(process)
    ok = jaxdiff.sample(S.annealed_langevin(process, 2, eps=0.49), denoise, x_T, ts, key=KEY)
    assert bool(jnp.all(jnp.isfinite(ok.x)))
    with pytest.raises(ValueError, match=r"eps=0.5 must be below 2 sigma_L\^2 = 0.5"):
        jaxdiff.sample(S.annealed_langevin(process, 2, eps=0.5), denoise, x_T, ts, key=KEY)


def test_bad_arguments_raise():
    p = VP()
    with pytest.raises(ValueError, match="already draws noise"):
        S.ancestral(S.ddpm(p))
    with pytest.raises(ValueError, match="is multistep"):
        S.ancestral(S.dpm_solver_pp(p))
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        S.ancestral(S.euler(p), eta=1.5)
    with pytest.raises(TypeError, match="wraps a jaxdiff Sampler"):
        S.ancestral(S.euler)
    with pytest.raises(ValueError, match=r"dpm_solver_pp_sde has orders 2, 3; got order=1"):
        S.dpm_solver_pp_sde(p, 1)
    with pytest.raises(ValueError, match="eta must be non-negative"):
        S.dpm_solver_pp_sde(p, eta=-0.1)
    with pytest.raises(ValueError, match=r"dpm_solver_pp_singlestep has orders 2, 3"):
        S.dpm_solver_pp_singlestep(p, order=1)
    with pytest.raises(ValueError, match=r"deis has orders 1, 2, 3, 4; got order=5"):
        S.deis(p, order=5)
    with pytest.raises(ValueError, match=r"lms has orders 1, 2, 3, 4; got order=0"):
        S.lms(p, order=0)
    with pytest.raises(ValueError, match=r"dpm_solver_adaptive has orders 2, 3"):
        S.dpm_solver_adaptive(p, order=1)
    with pytest.raises(ValueError, match="rtol and atol must be non-negative"):
        S.dpm_solver_adaptive(p, rtol=-1.0)
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        S.dpm_solver_adaptive(p, max_steps=0)
    with pytest.raises(ValueError, match="steps_per_level must be a positive int"):
        S.annealed_langevin(p, 0)
    with pytest.raises(ValueError, match="eps must be positive"):
        S.annealed_langevin(p, eps=-1.0)
    for sampler in (S.ancestral(S.euler(p)), S.dpm_solver_pp_sde(p, 3), S.annealed_langevin(p)):
        with pytest.raises(ValueError, match="is stochastic: pass key"):
            jaxdiff.sample(sampler, MIX.denoiser(p), prior(p, 2), schedules.uniform(p, 3))


# --- coefficients computed before the scan -----------------------------------------------------
COEFFICIENT_SAMPLERS = {
    "dpm_solver_pp_2m": lambda p: S.dpm_solver_pp(p, 2),
    "dpm_solver_pp_3m": lambda p: S.dpm_solver_pp(p, 3),
    "sde_3m_eta_half": lambda p: S.dpm_solver_pp_sde(p, 3, eta=0.5),
    "dpm_solver_pp_2s": lambda p: S.dpm_solver_pp_singlestep(p, 2),
    "dpm_solver_pp_3s": lambda p: S.dpm_solver_pp_singlestep(p, 3),
    "unipc_1": lambda p: S.unipc(p, 1),
    "unipc_3": lambda p: S.unipc(p, 3),
    "unipc_2_afs": lambda p: S.unipc(p, 2, afs=True),
}


@pytest.mark.parametrize("name", list(COEFFICIENT_SAMPLERS))
def test_coefficients_before_the_scan_equal_the_step_computing_its_own(name):
    # sample() computes sampler.coefficients for every step in one vectorized pass and hands
    # each step its row; a wrapper calling step() itself (coef=None) gets the same numbers. A
    # Python loop over step() with coef=None is that second path.
    p = VP()
    sampler = COEFFICIENT_SAMPLERS[name](p)
    assert type(sampler).coefficients is not S.Sampler.coefficients
    ts = schedules.log_snr_uniform(p, 7, dtype=jnp.float64)  # 6 steps: warm-up and final order
    x_T, den = prior(p, 16), MIX.denoiser(p)
    engine = jaxdiff.sample(sampler, den, x_T, ts, key=KEY, save_trajectory=True)
    x, state = x_T, sampler.init(x_T, ts)
    for i in range(len(ts) - 2):
        x, state, _, _ = sampler.step(den, x, state, ts, i, jax.random.fold_in(KEY, i))
        np.testing.assert_allclose(x, engine.xs[i + 1], rtol=1e-12, atol=1e-12)
    final = sampler.final(den, x, state, ts, jax.random.fold_in(KEY, len(ts) - 2))
    np.testing.assert_allclose(final, engine.x, rtol=1e-12, atol=1e-12)


def test_samplers_without_coefficients_are_called_without_them():
    # The protocol's default: no table, and step() is called with its six arguments only (a
    # sampler written against the protocol before coefficients existed keeps working).
    class Plain(S.OneCallSampler):
        process: VP

        def update(self, x, x0_hat, t, s, key):
            return S.ddim_step(self.process, x, x0_hat, t, s)

    p = VP()
    assert Plain(p).coefficients(jnp.zeros(3), 0) is None
    ts = schedules.uniform(p, 5, dtype=jnp.float64)
    x_T = prior(p, 8)
    ours = jaxdiff.sample(Plain(p), MIX.denoiser(p), x_T, ts).x
    ref = jaxdiff.sample(S.ddim(p), MIX.denoiser(p), x_T, ts).x
    np.testing.assert_array_equal(ours, ref)


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, scan and cond bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("factory", [S.ipndm, S.unipc], ids=["ipndm", "unipc"])
def test_afs_first_step_runs_once_outside_the_loop(factory):
    # With afs=True the engine runs the first step (analytic x0_hat, no evaluation) before its
    # scan, so no step of the loop tests whether it is the first; the numbers are those of the
    # step that makes that test itself (a Python loop over step()).
    p = EDM()
    sampler = factory(p, afs=True)
    ts = schedules.karras(p, 6, dtype=jnp.float64)
    x_T, den = prior(p, 8), MIX.denoiser(p)
    jaxpr = jax.make_jaxpr(lambda x: jaxdiff.sample(sampler, den, x, ts).x)(x_T).jaxpr
    scans = [e for e in _equations(jaxpr) if e.primitive.name == "scan"]
    assert len(scans) == 1
    assert not any(e.primitive.name == "cond" for e in _equations(scans[0].params["jaxpr"].jaxpr))
    res = jaxdiff.sample(sampler, den, x_T, ts, save_trajectory=True)
    assert res.xs.shape == (len(ts), *x_T.shape) and res.denoised.shape == (len(ts) - 1, *x_T.shape)
    assert int(res.nfe) == sampler.nfe(len(ts) - 1) == len(ts) - 2
    np.testing.assert_allclose(res.denoised[0], afs_x0(p, x_T, ts[0]), rtol=1e-12, atol=1e-12)
    x, state = x_T, sampler.init(x_T, ts)
    for i in range(len(ts) - 2):
        x, state, _, _ = sampler.step(den, x, state, ts, i, KEY)
        np.testing.assert_allclose(x, res.xs[i + 1], rtol=1e-12, atol=1e-12)
