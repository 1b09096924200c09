"""Samplers and the scan engine, checked against exact targets.

- plain NumPy loops written from the papers' formulas agree with the scan samplers (x64, 1e-10);
- identities: Euler in (x/alpha, sigma/alpha) is DDIM; DDPM is DDIM with eta = 1;
- (the orders of convergence of every ODE sampler, DDIM, Euler's twin, and Heun included, are
  measured in tests/test_convergence.py);
- the SDE samplers produce the target distribution (moments, KS test per coordinate);
- the engine: trajectories, exact NFE, dtype, one compilation per grid length, clear errors;
- every sampler x every process reproduces a Gaussian's mean and covariance.

Samplers and targets are built once per module, so each (sampler, process, shape) compiles once.
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxdiff
from jaxdiff import samplers as S
from jaxdiff import schedules
from jaxdiff.analytic import Gaussian, GaussianMixture
from jaxdiff.processes import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine

# A 2-D mixture with unequal weights and scales: curved probability-flow trajectories.
MEANS = np.array([[-1.5, 0.5], [1.0, -0.5], [0.5, 1.5]])
SCALES = np.array([0.3, 0.5, 0.4])
WEIGHTS = np.array([0.3, 0.5, 0.2])
MIX = GaussianMixture(jnp.asarray(MEANS), jnp.asarray(SCALES), jnp.asarray(WEIGHTS))
VP_ = VP()
EDM_ = EDM()
KEY = jax.random.key(0)


def prior(process, n, seed=0, dtype=jnp.float64):
    return process.prior_sample((n, 2), key=jax.random.key(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# NumPy references, written from the papers
# --------------------------------------------------------------------------------------------
def np_vp(t):
    """VP with beta in [0.1, 20] (Song et al. 2021): alpha = exp(-B/2), sigma^2 = 1 - alpha^2."""
    B = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2
    return np.exp(-0.5 * B), np.sqrt(-np.expm1(-B))


def np_mixture_denoiser(x, alpha, sigma):
    """E[x0 | x_t = x] for the mixture: responsibilities times per-component posterior means."""
    var = alpha**2 * SCALES**2 + sigma**2  # (k,)
    r = x[:, None, :] - alpha * MEANS  # (b, k, d)
    logp = -0.5 * np.sum(r**2, -1) / var - np.log(var) + np.log(WEIGHTS)  # d = 2
    w = np.exp(logp - logp.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    cond = MEANS + (alpha * SCALES**2 / var)[:, None] * r
    return np.einsum("bk,bkd->bd", w, cond)


def np_edm_process(t):
    """EDM (Karras et al. 2022): alpha = 1, sigma = t."""
    return np.ones_like(t), t


def np_ddim(x, ts, coeffs=np_vp):
    """Song, Meng & Ermon (2021), Eq. 12 with sigma_t = 0: x_s = a_s x0 + s_s eps."""
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        (a_t, s_t), (a_s, s_s) = coeffs(t), coeffs(s)
        x0 = np_mixture_denoiser(x, a_t, s_t)
        x = a_s * x0 + s_s * (x - a_t * x0) / s_t
    return x


def np_edm(x, ts, heun, coeffs=np_vp, churn=0.0, s_tmin=0.0, s_tmax=np.inf, s_noise=1.0, z=None):
    """Karras et al. (2022), Algorithm 2 on the scaled variable x~ = x / alpha with noise level
    sigma~ = sigma / alpha. The mixture denoiser depends on (x~, sigma~) only:
    D(alpha x~, t) = D(x~ at alpha = 1, sigma = sigma~), so D~ is evaluated that way."""
    n = len(ts) - 1
    for i in range(n):
        (a_t, s_t), (a_s, s_s) = coeffs(ts[i]), coeffs(ts[i + 1])
        sig, sig_next, xs = s_t / a_t, s_s / a_s, x / a_t
        gamma = min(churn / n, np.sqrt(2) - 1) if s_tmin <= sig <= s_tmax else 0.0
        sig_hat = sig * (1 + gamma)
        if gamma > 0:
            xs = xs + np.sqrt(sig_hat**2 - sig**2) * s_noise * z[i]
        d = (xs - np_mixture_denoiser(xs, 1.0, sig_hat)) / sig_hat
        x_next = xs + (sig_next - sig_hat) * d
        if heun and sig_next != 0:
            d2 = (x_next - np_mixture_denoiser(x_next, 1.0, sig_next)) / sig_next
            x_next = xs + (sig_next - sig_hat) * (0.5 * d + 0.5 * d2)
        x = a_s * x_next
    return x


NP_N = 12
NP_TS = schedules.karras(VP_, NP_N)
NP_X = prior(VP_, 8, seed=3)
VP_DDIM, VP_EULER, VP_HEUN = S.ddim(VP_), S.euler(VP_), S.heun(VP_)


@pytest.fixture(scope="module")
def vp_karras_runs():
    d = MIX.denoiser(VP_)
    return {s.name: jaxdiff.sample(s, d, NP_X, NP_TS) for s in (VP_DDIM, VP_EULER, VP_HEUN)}


def test_ddim_matches_numpy_reference(vp_karras_runs):
    ref = np_ddim(np.asarray(NP_X), np.asarray(NP_TS))
    np.testing.assert_allclose(vp_karras_runs[VP_DDIM.name].x, ref, rtol=0, atol=1e-10)


def test_euler_matches_numpy_reference(vp_karras_runs):
    ref = np_edm(np.asarray(NP_X), np.asarray(NP_TS), heun=False)
    np.testing.assert_allclose(vp_karras_runs["euler"].x, ref, rtol=0, atol=1e-10)


def test_heun_matches_numpy_reference(vp_karras_runs):
    ref = np_edm(np.asarray(NP_X), np.asarray(NP_TS), heun=True)
    np.testing.assert_allclose(vp_karras_runs["heun"].x, ref, rtol=0, atol=1e-10)


def test_euler_is_ddim(vp_karras_runs):
    # Karras et al. 2022, Sec. 3: DDIM is Euler's method in (x / alpha, sigma / alpha).
    a, b = vp_karras_runs["euler"].x, vp_karras_runs[VP_DDIM.name].x
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_heun_churn_matches_algorithm_2():
    # EDM with churn settings like Karras's ImageNet ones; noise drawn as the engine draws it
    # (the step key is fold_in(key, i)).
    kw = dict(churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    ts, x, key = schedules.karras(EDM_, NP_N), prior(EDM_, 8, seed=4), jax.random.key(7)
    res = jaxdiff.sample(S.heun(EDM_, **kw), MIX.denoiser(EDM_), x, ts, key=key)
    z = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape)) for i in range(NP_N)]
    ref = np_edm(np.asarray(x), np.asarray(ts), heun=True, coeffs=np_edm_process, z=z, **kw)
    np.testing.assert_allclose(res.x, ref, rtol=0, atol=1e-10)
    assert int(res.nfe) == 2 * NP_N - 1


# --------------------------------------------------------------------------------------------
# Distribution of the SDE samplers (4000 samples in 2-D; KS test per coordinate)
# --------------------------------------------------------------------------------------------
N_DIST, DIST_STEPS = 4000, 200
EXACT = np.asarray(MIX.sample(40_000, key=jax.random.key(11)))


def assert_same_distribution(x, exact, n_se=4.0, std_rtol=0.05, p_min=1e-3):
    x = np.asarray(x)
    se = exact.std(0) / np.sqrt(len(x))
    np.testing.assert_array_less(np.abs(x.mean(0) - exact.mean(0)), n_se * se)
    np.testing.assert_allclose(x.std(0), exact.std(0), rtol=std_rtol)
    for j in range(x.shape[1]):
        p = scipy.stats.ks_2samp(x[:, j], exact[:, j]).pvalue
        assert p > p_min, (j, p)


@pytest.mark.parametrize(
    "sampler",
    [S.ddpm(VP_), S.euler_maruyama(VP_), S.predictor_corrector(VP_, S.euler_maruyama(VP_))],
    ids=["ddpm", "euler_maruyama", "predictor_corrector"],
)
def test_sde_samplers_sample_the_mixture(sampler):
    ts = schedules.log_snr_uniform(VP_, DIST_STEPS)
    res = jaxdiff.sample(sampler, MIX.denoiser(VP_), prior(VP_, N_DIST, 5), ts, key=KEY)
    assert_same_distribution(res.x, EXACT)


def test_ddpm_is_ddim_with_eta_one():
    # Kingma et al. 2021, Eq. 23: the DDPM posterior variance is DDIM's c^2 at eta = 1.
    ts, x, d = schedules.karras(VP_, NP_N), NP_X, MIX.denoiser(VP_)
    a = jaxdiff.sample(S.ddpm(VP_), d, x, ts, key=KEY).x
    b = jaxdiff.sample(S.ddim(VP_, eta=1.0), d, x, ts, key=KEY).x
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The engine: trajectories, NFE, dtype, compilation, errors
# --------------------------------------------------------------------------------------------
EDM_HEUN = S.heun(EDM_)


def test_trajectories_shapes_and_ends():
    n, x_T, denoise = 6, prior(EDM_, 5, seed=2), MIX.denoiser(EDM_)
    ts = schedules.karras(EDM_, n)
    res = jaxdiff.sample(EDM_HEUN, denoise, x_T, ts, save_trajectory=True)
    assert res.xs.shape == (n + 1, 5, 2) and res.denoised.shape == (n, 5, 2)
    np.testing.assert_array_equal(res.xs[0], x_T)
    np.testing.assert_array_equal(res.xs[-1], res.x)
    np.testing.assert_array_equal(res.denoised[-1], res.x)  # a grid ending in 0 ends with x0_hat
    # The denoising trajectory is D(xs[i], ts[i]).
    ref = jax.jit(jax.vmap(denoise))(res.xs[:-1], ts[:-1])
    np.testing.assert_allclose(res.denoised, ref, rtol=0, atol=1e-12)
    assert int(res.nfe) == 2 * n - 1
    # Without the final 0 every step is a Heun step, and the result is no x0_hat.
    res = jaxdiff.sample(EDM_HEUN, denoise, x_T, ts[:-1], save_trajectory=True)
    assert res.xs.shape == (n, 5, 2) and res.denoised.shape == (n - 1, 5, 2)
    np.testing.assert_array_equal(res.xs[-1], res.x)
    assert float(jnp.max(jnp.abs(res.denoised[-1] - res.x))) > 1e-4
    assert int(res.nfe) == 2 * (n - 1)
    assert res.xs[:-1] is not None and jaxdiff.sample(EDM_HEUN, denoise, x_T, ts).xs is None


def test_traced_grid_matches_concrete_grid():
    # Inside jit the grid is traced: its final 0 is found at run time (lax.cond).
    x_T, denoise, ts = prior(EDM_, 4, seed=6), MIX.denoiser(EDM_), schedules.karras(EDM_, 7)
    run = jax.jit(lambda ts: jaxdiff.sample(EDM_HEUN, denoise, x_T, ts))
    eager, traced = jaxdiff.sample(EDM_HEUN, denoise, x_T, ts), run(ts)
    np.testing.assert_allclose(traced.x, eager.x, rtol=0, atol=1e-12)
    assert int(traced.nfe) == int(eager.nfe) == 13
    assert int(run(ts.at[-1].set(1e-3)).nfe) == 14  # no final 0: an ordinary last step


@contextlib.contextmanager
def backend_compilations():
    """Collect the duration of every XLA compilation made inside the block (jax.monitoring)."""
    durations = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            durations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield durations
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_same_grid_length_compiles_once_and_traces_do_not_grow_with_steps():
    traces = []
    exact = MIX.denoiser(EDM_)

    def denoise(x, t):  # a plain function is static: it runs only when the engine traces
        traces.append(1)
        return exact(x, t)

    x_T = prior(EDM_, 4, seed=8)
    jaxdiff.sample(EDM_HEUN, denoise, x_T, schedules.karras(EDM_, 5))
    # 2 calls in the scan body, 2 in the peeled last step, 1 in its final step into 0
    assert len(traces) == 5
    # Other grid values, same length and dtype: no new trace, no new XLA compilation.
    grids = [schedules.log_snr_uniform(EDM_, 5), schedules.uniform(EDM_, 5)]
    with backend_compilations() as compiled:
        for ts in grids:
            jaxdiff.sample(EDM_HEUN, denoise, x_T, ts)
    assert len(traces) == 5 and compiled == [], compiled
    for ts in (schedules.karras(EDM_, 50), schedules.uniform(EDM_, 50)):
        jaxdiff.sample(EDM_HEUN, denoise, x_T, ts)
    assert len(traces) == 10  # 50 steps trace the denoiser as often as 5 steps (one new program)


def test_program_size_does_not_grow_with_steps():
    # The steps are one lax.scan: the lowered program of 16 and of 500 steps has the same
    # operations (only the loop's trip count and the grid's shape differ), so compile time does
    # not grow with the number of steps. Measured with backend_compilations on this CPU (shared,
    # loaded): 0.90 s at 16 steps and 0.89 s at 500 (wall-clock is not asserted).
    program = jax.jit(
        lambda x, ts: jaxdiff.sample(S.dpm_solver_pp(EDM_, 3), MIX.denoiser(EDM_), x, ts).x
    )
    x_T = prior(EDM_, 4, seed=8)
    texts = [program.lower(x_T, schedules.karras(EDM_, n)).as_text() for n in (16, 500)]
    ops = [sorted(re.findall(r"(?:stablehlo|mhlo|chlo|func)\.[a-z_]+", t)) for t in texts]
    assert len(ops[0]) > 50 and ops[0] == ops[1], (len(ops[0]), len(ops[1]))
    assert len(texts[1]) < 1.01 * len(texts[0])  # no unrolled steps hiding in constants


def test_bad_grids_raise():
    x_T, d = prior(VP_, 2), MIX.denoiser(VP_)
    with pytest.raises(ValueError, match="strictly decreasing"):
        jaxdiff.sample(VP_EULER, d, x_T, schedules.uniform(VP_, 4)[::-1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        jaxdiff.sample(VP_EULER, d, x_T, jnp.array([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="at least 2 times"):
        jaxdiff.sample(VP_EULER, d, x_T, jnp.array([1.0]))
    with pytest.raises(ValueError, match="1-D grid"):
        jaxdiff.sample(VP_EULER, d, x_T, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN or inf"):
        jaxdiff.sample(VP_EULER, d, x_T, jnp.array([1.0, jnp.nan, 0.0]))
    with pytest.raises(ValueError, match=r"must lie in \[t_min, t_max\]"):
        jaxdiff.sample(VP_EULER, d, x_T, jnp.array([1.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"must lie in \[t_min, t_max\]"):
        jaxdiff.sample(VP_EULER, d, x_T, jnp.array([1.0, 0.5, 1e-5, 0.0]))


def test_stochastic_samplers_need_a_key():
    x_T, d, ts = prior(VP_, 2), MIX.denoiser(VP_), schedules.uniform(VP_, 4)
    stochastic = [
        S.ddpm(VP_),
        S.euler_maruyama(VP_),
        S.heun(VP_, churn=1.0),
        S.predictor_corrector(VP_, VP_HEUN),
    ]
    for sampler in stochastic:
        assert sampler.stochastic
        with pytest.raises(ValueError, match="is stochastic: pass key"):
            jaxdiff.sample(sampler, d, x_T, ts)
    assert not (VP_EULER.stochastic or VP_HEUN.stochastic)


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="eta must be non-negative"):
        S.ddim(VP_, eta=-0.1)
    with pytest.raises(ValueError, match="churn .* must be non-negative"):
        S.heun(EDM_, churn=-1.0)
    with pytest.raises(ValueError, match="s_noise .* must be non-negative"):
        S.heun(EDM_, churn=1.0, s_noise=-1.0)
    with pytest.raises(ValueError, match="s_tmin must not exceed s_tmax"):
        S.heun(EDM_, churn=1.0, s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(TypeError, match="predictor must be a jaxdiff Sampler"):
        S.predictor_corrector(VP_, S.ddpm)
    with pytest.raises(ValueError, match="snr must be positive"):
        S.predictor_corrector(VP_, VP_HEUN, snr=0.0)
    with pytest.raises(ValueError, match="n_corrector must be a non-negative int"):
        S.predictor_corrector(VP_, VP_HEUN, n_corrector=-1)
    with pytest.raises(TypeError, match="sampler must be a jaxdiff Sampler"):
        jaxdiff.sample(S.ddpm, MIX.denoiser(VP_), prior(VP_, 2), schedules.uniform(VP_, 3))


# --------------------------------------------------------------------------------------------
# Every sampler x every process: a 2-D Gaussian's mean and covariance at 200 steps, in float32
# (float32 in, float32 out, along the whole trajectory; x64 accuracy is checked above). Every
# factory of jaxdiff.samplers appears here or in tests/test_convergence.py's exact-flow sweep
# (dpm_solver, dpm_solver_pp, ipndm, unipc there, pathwise). Heun runs here with churn, which
# takes every step of the deterministic Heun plus the churn (one compilation less per process).
# --------------------------------------------------------------------------------------------
PROCESSES = {type(p).__name__: p for p in (VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow())}
SWEEP_SAMPLERS = {
    "ddpm": (S.ddpm, lambda n: n),
    "ddim_eta": (lambda p: S.ddim(p, eta=0.5), lambda n: n),
    "euler": (S.euler, lambda n: n),
    "heun_churn": (lambda p: S.heun(p, churn=20.0), lambda n: 2 * n - 1),
    "euler_maruyama": (S.euler_maruyama, lambda n: n),
    "dpm_solver_pp_sde": (S.dpm_solver_pp_sde, lambda n: n),
    "pc_ddpm": (lambda p: S.predictor_corrector(p, S.ddpm(p)), lambda n: 2 * n - 1),
}
F32 = jnp.float32
GAUSS = Gaussian(jnp.array([0.5, -0.3], F32), jnp.array([[1.0, 0.3], [0.3, 0.5]], F32))
N_SWEEP, SWEEP_STEPS = 4000, 200


@functools.cache
def sweep(process_name):
    """Every sampler of SWEEP_SAMPLERS on one process, compiled as one program."""
    process = PROCESSES[process_name]
    k0, k1, k2 = jax.random.split(jax.random.key(12), 3)
    x_T = process.sample_marginal(GAUSS.sample(N_SWEEP, key=k0), process.t_max, key=k1)[0]
    ts = schedules.log_snr_uniform(process, SWEEP_STEPS)  # float64; the engine casts it
    samplers = {name: spec[0](process) for name, spec in SWEEP_SAMPLERS.items()}
    denoise = GAUSS.denoiser(process)
    run = jax.jit(
        lambda x: {k: jaxdiff.sample(s, denoise, x, ts, key=k2) for k, s in samplers.items()}
    )
    return x_T, run(x_T)


@pytest.mark.parametrize("sampler_name", list(SWEEP_SAMPLERS))
@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_every_sampler_every_process_gaussian_moments(process_name, sampler_name):
    x_T, results = sweep(process_name)
    res = results[sampler_name]
    assert x_T.dtype == res.x.dtype == F32
    assert int(res.nfe) == SWEEP_SAMPLERS[sampler_name][1](SWEEP_STEPS)
    x, mean, cov = np.asarray(res.x, np.float64), np.asarray(GAUSS.mean), np.asarray(GAUSS.cov)
    var = np.diag(cov)
    # 5 standard errors of the sample mean and of the sample covariance (Gaussian formulas).
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / N_SWEEP))
    se_cov = np.sqrt((np.outer(var, var) + cov**2) / N_SWEEP)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * se_cov)


def test_float32_trajectories_stay_float32():
    mix32 = GaussianMixture(MIX.means.astype(F32), SCALES.astype(np.float32))
    sampler = S.predictor_corrector(VP_, S.heun(VP_, churn=5.0), n_corrector=2)
    x_T, ts = prior(VP_, 6, seed=9, dtype=F32), schedules.log_snr_uniform(VP_, 8)
    res = jaxdiff.sample(sampler, mix32.denoiser(VP_), x_T, ts, key=KEY, save_trajectory=True)
    assert res.x.dtype == res.xs.dtype == res.denoised.dtype == F32
    assert bool(jnp.all(jnp.isfinite(res.xs)))
    assert int(res.nfe) == 4 * 7 + 1  # (2 Heun + 2 Langevin) per step, 1 for the final x0_hat


def test_float64_denoiser_does_not_widen_float32_samples():
    # MIX is float64: its output would promote x; the engine keeps x_T's dtype, also when the
    # grid is traced and the final 0 is decided by lax.cond.
    x_T, ts, d = (
        prior(VP_, 6, seed=9, dtype=F32),
        schedules.log_snr_uniform(VP_, 8),
        MIX.denoiser(VP_),
    )
    res = jaxdiff.sample(VP_EULER, d, x_T, ts, save_trajectory=True)
    assert res.x.dtype == res.xs.dtype == res.denoised.dtype == F32
    traced = jax.jit(lambda ts: jaxdiff.sample(VP_EULER, d, x_T, ts).x)(ts)
    assert traced.dtype == F32
    np.testing.assert_allclose(traced, res.x, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Samplers as pytrees: equality, hashing, jit arguments, no recompilation (issue 12)
# --------------------------------------------------------------------------------------------
FACTORIES = {
    "ddim": S.ddim,
    "ddim_eta": lambda p: S.ddim(p, eta=0.5),
    "ddpm": S.ddpm,
    "euler": S.euler,
    "heun": S.heun,
    "heun_churn": lambda p: S.heun(p, churn=10.0, s_tmin=0.05, s_noise=1.003),
    "dpm_solver_1": lambda p: S.dpm_solver(p, order=1),
    "dpm_solver_2": lambda p: S.dpm_solver(p, order=2),
    "dpm_solver_3": lambda p: S.dpm_solver(p, order=3),
    "dpm_solver_pp_2": lambda p: S.dpm_solver_pp(p, order=2),
    "dpm_solver_pp_3": lambda p: S.dpm_solver_pp(p, order=3),
    "dpm_solver_pp_sde": S.dpm_solver_pp_sde,
    "ipndm": S.ipndm,
    "ipndm_variable": lambda p: S.ipndm(p, order=3, variable_step=True),
    "unipc_2": S.unipc,
    "unipc_3": lambda p: S.unipc(p, order=3),
    "euler_maruyama": S.euler_maruyama,
    "pc": lambda p: S.predictor_corrector(p, S.ddpm(p), snr=0.1),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_equal_settings_give_equal_hashable_samplers(name):
    a, b = FACTORIES[name](VP()), FACTORIES[name](VP())
    assert a == b and hash(a) == hash(b) and a is not b
    assert isinstance(a, S.Sampler)
    assert a != FACTORIES[name](EDM())  # another process is another sampler
    assert a.nfe(5) == 4 * a.nfe_per_step + 1
    n = a.steps_for_nfe(10)
    assert n >= 2 and all(abs(a.nfe(n) - 10) <= abs(a.nfe(m) - 10) for m in range(2, 12))


def test_hyperparameters_are_leaves_and_orders_static():
    assert jax.tree_util.tree_leaves(S.ddim(EDM_, eta=0.3)) == [0.002, 80.0, 0.3]
    assert S.ddim(EDM_, eta=0.3) != S.ddim(EDM_, eta=0.4)
    assert S.dpm_solver_pp(EDM_, 2) != S.dpm_solver_pp(EDM_, 3)
    assert jax.tree_util.tree_structure(S.dpm_solver_pp(EDM_, 2)) != jax.tree_util.tree_structure(
        S.dpm_solver_pp(EDM_, 3)
    )
    assert S.heun(EDM_, churn=0.0).nfe_per_step == 2 and S.dpm_solver(EDM_, 3).nfe_per_step == 3
    assert S.predictor_corrector(EDM_, S.heun(EDM_), n_corrector=2).nfe_per_step == 4
    assert S.dpm_solver(EDM_, order=3).steps_for_nfe(10) == 4
    assert S.dpm_solver(EDM_, order=3).steps_for_nfe(5) == 2


@pytest.fixture(scope="module")
def f32_setup():
    x_T = prior(EDM_, 3, seed=31, dtype=jnp.float32)
    mix32 = GaussianMixture(MIX.means.astype(F32), SCALES.astype(np.float32), MIX.weights)
    return x_T, mix32.denoiser(EDM_), schedules.karras(EDM_, 6, dtype=jnp.float32)


def test_a_sampler_is_a_jit_argument(f32_setup):
    x_T, denoise, ts = f32_setup
    # Deterministic samplers need no key, even with eta / churn traced by the outer jit.
    plain = jax.jit(lambda s, x: jaxdiff.sample(s, denoise, x, ts).x)
    for sampler in (S.ddim(EDM_), S.heun(EDM_)):
        eager = jaxdiff.sample(sampler, denoise, x_T, ts).x
        np.testing.assert_allclose(plain(sampler, x_T), eager, rtol=1e-5, atol=1e-5)
    run = jax.jit(lambda s, x: jaxdiff.sample(s, denoise, x, ts, key=KEY).x)
    for name in ("heun_churn", "dpm_solver_pp_3"):
        sampler = FACTORIES[name](EDM_)
        eager = jaxdiff.sample(sampler, denoise, x_T, ts, key=KEY).x
        np.testing.assert_allclose(run(sampler, x_T), eager, rtol=1e-5, atol=1e-5)


def test_rebuilding_a_sampler_or_changing_numbers_compiles_nothing(f32_setup):
    x_T, denoise, ts = f32_setup

    def go(sampler, ts=ts):
        return jaxdiff.sample(sampler, denoise, x_T, ts, key=KEY).x

    go(S.ddim(EDM_, eta=0.0))
    go(S.heun(EDM_, churn=0.0))
    other_values = schedules.log_snr_uniform(EDM_, 6, dtype=F32)
    ends_at_t_min = ts.at[-2].set(0.01).at[-1].set(EDM_.t_min)
    with backend_compilations() as compiled:
        outs = [go(S.ddim(EDM_, eta=0.0)) for _ in range(3)]  # built anew each call
        stochastic = go(S.ddim(EDM_, eta=1.0))  # eta 0 -> 1: traced, the same program
        churned = go(S.heun(EDM_, churn=30.0, s_noise=1.01))
        go(S.ddim(EDM_, eta=0.0), other_values)
        t_min_end = go(S.ddim(EDM_, eta=0.0), ends_at_t_min)  # no final 0
    assert compiled == [], compiled
    assert all(bool(jnp.all(o == outs[0])) for o in outs)
    assert float(jnp.max(jnp.abs(stochastic - outs[0]))) > 1e-3
    assert float(jnp.max(jnp.abs(churned - go(S.heun(EDM_))))) > 1e-3
    assert float(jnp.max(jnp.abs(t_min_end - outs[0]))) > 0  # an ordinary last step
    # eta = 0 through the traced program is the deterministic DDIM step (= Euler, rounding aside).
    np.testing.assert_allclose(outs[0], go(S.euler(EDM_)), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------
# dtype policy, shape checks and non-finite rows (issue 12)
# --------------------------------------------------------------------------------------------
LOW_SAMPLERS = {
    "heun": S.heun,
    "dpm_solver_pp_2": lambda p: S.dpm_solver_pp(p, 2),
    "unipc": S.unipc,
    "ddpm": S.ddpm,
    "ipndm": S.ipndm,
}
UNIT = Gaussian(jnp.zeros(2, F32), jnp.eye(2, dtype=F32))


@functools.cache
def low_precision_runs(process_name):
    """Every LOW_SAMPLERS sampler in float32, bfloat16 and float16, one program per process."""
    process = PROCESSES[process_name]
    x_T = process.prior_sample((64, 2), key=jax.random.key(5), dtype=F32)
    ts = schedules.log_snr_uniform(process, 20, dtype=F32)
    denoise = UNIT.denoiser(process)

    def run(x):
        return {
            f"{name}/{jnp.dtype(dt).name}": jaxdiff.sample(
                f(process), denoise, x.astype(dt), ts, key=KEY
            ).x
            for name, f in LOW_SAMPLERS.items()
            for dt in (jnp.float32, jnp.bfloat16, jnp.float16)
        }

    return jax.jit(run)(x_T)


@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_bf16_and_f16_keep_their_dtype_and_stay_close_to_float32(process_name):
    runs = low_precision_runs(process_name)
    for name in LOW_SAMPLERS:
        ref = np.asarray(runs[f"{name}/float32"], np.float64)
        for dt in (jnp.bfloat16, jnp.float16):
            x = runs[f"{name}/{jnp.dtype(dt).name}"]
            assert x.dtype == dt, (name, dt)
            x = np.asarray(x.astype(F32), np.float64)
            assert np.all(np.isfinite(x)), (name, dt)
            assert np.max(np.abs(x - ref)) <= 0.1, (name, dt, np.max(np.abs(x - ref)))


def test_integer_x_T_is_a_type_error():
    with pytest.raises(TypeError, match=r"x_T must be a floating-point array.*int32"):
        jaxdiff.sample(VP_EULER, MIX.denoiser(VP_), jnp.ones((2, 2), jnp.int32), NP_TS)
    with pytest.raises(TypeError, match=r"x_T.*bool"):
        jaxdiff.sample(VP_EULER, MIX.denoiser(VP_), jnp.ones((2, 2), bool), NP_TS)


@pytest.mark.parametrize("out_shape", [(4, 1), (2,), (4,), (4, 3)], ids=["B1", "d", "B", "Bd+1"])
def test_a_denoiser_of_the_wrong_shape_is_named(out_shape):
    def bad(x, t):
        return jnp.zeros(out_shape, x.dtype)

    x_T = prior(VP_, 4)
    msg = rf"denoiser .*returned shape {re.escape(str(out_shape))} for x of shape \(4, 2\)"
    with pytest.raises(ValueError, match=msg):
        jaxdiff.sample(VP_EULER, bad, x_T, NP_TS)


@functools.cache
def nan_row_runs():
    """Every factory from an x_T whose row 2 is NaN, compiled as one program."""
    x_T = prior(VP_, 5, seed=3).at[2].set(jnp.nan)
    samplers = {name: f(VP_) for name, f in FACTORIES.items()}
    denoise = MIX.denoiser(VP_)
    run = jax.jit(
        lambda x: {k: jaxdiff.sample(s, denoise, x, NP_TS, key=KEY).x for k, s in samplers.items()}
    )
    return run(x_T)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_one_nan_row_leaves_the_other_rows_finite(name):
    finite = np.isfinite(np.asarray(nan_row_runs()[name])).all(axis=1)
    assert finite.tolist() == [True, True, False, True, True]


def test_ddim_is_differentiable_in_its_grid_at_eta_zero(f32_setup):
    # The stochastic term's coefficient is eta * sigma_s * sqrt(r), never sqrt(0): finite gradients.
    x_T, denoise, ts = f32_setup

    def total(ts, sampler):
        return jnp.sum(jaxdiff.sample(sampler, denoise, x_T, ts, key=KEY).x)

    for sampler in (S.ddim(EDM_), S.ddim(EDM_, eta=0.5)):
        g = np.asarray(jax.grad(total)(ts, sampler))
        assert np.all(np.isfinite(g)) and np.any(g != 0), g
