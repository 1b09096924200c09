"""Forward processes: the SDE coefficients, the log-SNR inverse, the conditional ODE and the
forward SDE agree with alpha and sigma; float32 is safe over the whole time range."""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _xla import OPTIMIZED
from scipy.stats import norm

import jaxdiff
from jaxdiff.processes import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow, SubVP, VPCosine

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow(), DiscreteVP.linear()]
IDS = [type(p).__name__ for p in PROCESSES]
parametrize = pytest.mark.parametrize("process", PROCESSES, ids=IDS)
# log alpha of DiscreteVP is piecewise linear: its conditional ODE has a kink at every table
# point, so it is solved apart, with the solver told where the kinks are (see ode_endpoints).
SMOOTH = [p for p in PROCESSES if not isinstance(p, DiscreteVP)]


N_GRID = 400  # dense time grid; the SDE test uses as many steps, so one compilation serves all


def grid(process, n=N_GRID, dtype=jnp.float64):
    return jnp.linspace(process.t_min, process.t_max, n, dtype=dtype)


@jax.jit
def path(process, t):
    """Every coefficient and its autodiff reference on a grid: one compilation per process/dtype."""

    def d(fn):
        return jax.vmap(jax.grad(fn))(t)

    lam = process.log_snr(t)
    return dict(
        alpha=process.alpha(t),
        sigma=process.sigma(t),
        log_snr=lam,
        f=process.f(t),
        g2=process.g2(t),
        diffusion=process.diffusion(t),
        t_from_log_snr=process.t_from_log_snr(lam),
        bisection=Process.t_from_log_snr(process, lam),  # the base class's numerical inverse
        dlog_alpha=d(lambda s: jnp.log(process.alpha(s))),
        dsigma2=d(lambda s: process.sigma(s) ** 2),
    )


@parametrize
def test_f_is_derivative_of_log_alpha(process):
    q = path(process, grid(process))
    np.testing.assert_allclose(q["f"], q["dlog_alpha"], rtol=1e-9, atol=1e-12)


@parametrize
def test_g2_from_alpha_and_sigma(process):
    # g^2 = d(sigma^2)/dt - 2 f sigma^2, with both derivatives by autodiff of alpha and sigma.
    q = path(process, grid(process))
    ref = q["dsigma2"] - 2 * q["dlog_alpha"] * q["sigma"] ** 2
    np.testing.assert_allclose(q["g2"], ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(q["diffusion"] ** 2, ref, rtol=1e-8, atol=1e-12)


@parametrize
def test_log_snr_matches_alpha_sigma(process):
    q = path(process, grid(process))
    ref = jnp.log(q["alpha"] ** 2 / q["sigma"] ** 2)
    np.testing.assert_allclose(q["log_snr"], ref, rtol=1e-10, atol=1e-10)


@parametrize
def test_t_from_log_snr_inverts_log_snr(process):
    t = grid(process)
    q = path(process, t)
    np.testing.assert_allclose(q["t_from_log_snr"], t, rtol=1e-10, atol=1e-13)
    # The base-class numerical inverse (bisection) agrees with the closed form.
    np.testing.assert_allclose(q["bisection"], t, rtol=1e-9, atol=1e-12 * process.t_max)


_rng = np.random.default_rng(0)
X0, EPS = jnp.asarray(_rng.standard_normal((4, 3))), jnp.asarray(_rng.standard_normal((4, 3)))
KEY = jax.random.key(1)


def _solve_conditional_odes(processes, jump_ts=None):
    """Conditional ODEs of ``processes`` from t_min to t_max, solved as one system.

    Process i runs in normalised time u in [0, 1], t_i(u) = t_min + u (t_max - t_min).
    """
    spans = [(p.t_min, p.t_max - p.t_min) for p in processes]

    def velocity(u, ys, args):
        return tuple(
            d * p.conditional_velocity(y, X0, t0 + u * d)
            for p, (t0, d), y in zip(processes, spans, ys, strict=True)
        )

    controller = diffrax.PIDController(rtol=1e-12, atol=1e-14)
    if jump_ts is not None:
        controller = diffrax.ClipStepSizeController(controller, jump_ts=jump_ts)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(velocity),
        diffrax.Tsit5(),
        t0=0.0,
        t1=1.0,
        dt0=None,
        y0=tuple(p.marginal(X0, EPS, p.t_min) for p in processes),
        stepsize_controller=controller,
        max_steps=100_000,
    )
    return {type(p).__name__: y[-1] for p, y in zip(processes, sol.ys, strict=True)}


@pytest.fixture(scope="module")
def ode_endpoints():
    """Every process's conditional ODE: the smooth ones as one system (one compilation), the
    DiscreteVP apart with a step ending on each table point (in normalised time)."""
    ends = _solve_conditional_odes(SMOOTH)
    discrete = [p for p in PROCESSES if isinstance(p, DiscreteVP)]
    for p in discrete:
        knots = (np.arange(1, p.n_steps) / p.n_steps - p.t_min) / (p.t_max - p.t_min)
        ends.update(_solve_conditional_odes([p], jump_ts=jnp.asarray(knots)))
    return ends


@parametrize
def test_conditional_ode_follows_gaussian_path(process, ode_endpoints):
    # From alpha(t_min) x0 + sigma(t_min) eps the ODE must reach alpha(t_max) x0 + sigma(t_max) eps.
    t_b = process.t_max
    scale = process.alpha(t_b) + process.sigma(t_b)
    x_b = ode_endpoints[type(process).__name__]
    np.testing.assert_allclose(x_b, process.marginal(X0, EPS, t_b), rtol=0, atol=1e-8 * scale)


@functools.partial(jax.jit, compiler_options=OPTIMIZED)  # runs for seconds: see tests/_xla.py
def euler_maruyama(x, f, g, dt, key):
    """Forward SDE dx = f x dt + g dW with coefficient arrays ``f``, ``g`` given per step."""

    def step(x, inputs):
        i, f_i, g_i = inputs
        dw = jnp.sqrt(dt) * jax.random.normal(jax.random.fold_in(key, i), x.shape)
        return x + f_i * x * dt + g_i * dw, None

    return jax.lax.scan(step, x, (jnp.arange(f.shape[0]), f, g))[0]


@parametrize
def test_forward_sde_matches_marginal_moments(process):
    # Gaussian data N(m, s^2), started from its exact marginal at t_min, simulated to t_b with
    # 400 Euler-Maruyama steps (coefficients at each step's midpoint) on 20k paths; the time
    # discretisation bias (measured below 1 standard error at this size) is inside 5 standard errors.
    m, s, n, n_steps = 1.5, 0.5, 20_000, N_GRID
    t_a = process.t_min
    t_b = process.t_min + 0.8 * (process.t_max - process.t_min)
    dt = (t_b - t_a) / n_steps
    t_mid = jnp.asarray(t_a + (np.arange(n_steps) + 0.5) * dt)
    rng = np.random.default_rng(2)
    x0, eps = m + s * rng.standard_normal(n), rng.standard_normal(n)
    a_a, s_a = float(process.alpha(t_a)), float(process.sigma(t_a))
    q = path(process, t_mid)
    x = np.asarray(euler_maruyama(a_a * x0 + s_a * eps, q["f"], q["diffusion"], dt, KEY))

    a_b, s_b = float(process.alpha(t_b)), float(process.sigma(t_b))
    mean, var = a_b * m, a_b**2 * s**2 + s_b**2
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(x.var() - var) < 5 * var * np.sqrt(2.0 / n)


@parametrize
def test_float32_dense_grid_is_finite(process):
    t = grid(process, n=4001, dtype=jnp.float32)
    q = path(process, t)
    for name in ("alpha", "sigma", "log_snr", "f", "g2", "diffusion", "t_from_log_snr"):
        assert q[name].dtype == jnp.float32, name
        assert np.all(np.isfinite(q[name])), name
    # float32 round trip: error within 1e-3 relative, or 1e-5 t_max where lambda(t) is flat.
    back, t = np.asarray(q["t_from_log_snr"], np.float64), np.asarray(t, np.float64)
    assert np.all(np.abs(back - t) <= 1e-3 * t + 1e-5 * process.t_max)
    # Extreme log-SNR values map to finite times.
    lam = jnp.array([-60.0, -20.0, 0.0, 20.0, 60.0], jnp.float32)
    assert np.all(np.isfinite(process.t_from_log_snr(lam)))


@parametrize
def test_float32_preserved(process):
    x0 = jnp.ones((3, 2), jnp.float32)
    t = jnp.full((3,), 0.5 * process.t_max, jnp.float32)
    xt, eps = process.sample_marginal(x0, t, key=KEY)
    outs = [xt, eps, process.drift(x0, t), process.conditional_velocity(xt, x0, t)]
    outs += [process.prior_sample((3, 2), key=KEY), process.prior_logp(x0)]
    for out in outs:
        assert out.dtype == jnp.float32


@parametrize
def test_sample_marginal_is_alpha_x0_plus_sigma_eps(process):
    x0 = X0
    t = np.linspace(process.t_min, process.t_max, 4)
    xt, eps = process.sample_marginal(x0, t, key=KEY)
    a, s = np.asarray(process.alpha(t))[:, None], np.asarray(process.sigma(t))[:, None]
    ref = a * np.asarray(x0) + s * np.asarray(eps)
    np.testing.assert_allclose(xt, ref, rtol=1e-14)
    assert xt.shape == (4, 3)


@parametrize
def test_prior_logp_is_gaussian_log_density(process):
    x = 3.0 * np.random.default_rng(5).standard_normal((6, 2, 3))
    s = float(process.sigma(process.t_max))
    ref = norm.logpdf(x, 0.0, s).sum(axis=(1, 2))
    np.testing.assert_allclose(process.prior_logp(x), ref, rtol=1e-12)
    assert process.prior_logp(x).shape == (6,)


@parametrize
def test_prior_sample_has_prior_std(process):
    n = 20_000
    x = np.asarray(process.prior_sample((n,), key=KEY, dtype=jnp.float64))
    s = float(process.sigma(process.t_max))
    assert abs(x.std() / s - 1) < 5 * np.sqrt(0.5 / n)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: VE(sigma_min=0.0), "sigma_min"),
        (lambda: VE(sigma_min=-1.0), "sigma_min"),
        (lambda: EDM(sigma_min=0.0), "sigma_min"),
        (lambda: VP(beta_min=0.0), "beta_min"),
        (lambda: SubVP(beta_min=-0.1), "beta_min"),
        (lambda: VP(t_min=0.5, t_max=0.1), "t_max"),
        (lambda: VE(t_min=0.0), "t_min"),
        (lambda: RectifiedFlow(t_max=1.0), "t_max"),
        (lambda: VPCosine(t_max=1.0), "t_max"),
        (lambda: DiscreteVP(np.full((4, 2), 0.1)), "betas"),
        (lambda: DiscreteVP([0.1]), "betas"),
        (lambda: DiscreteVP([0.1, 0.0, 0.2]), "betas"),
        (lambda: DiscreteVP([0.1, 1.0]), "betas"),
        (lambda: DiscreteVP([0.1, -0.2]), "betas"),
        (lambda: DiscreteVP([0.1, np.nan]), "betas"),
        (lambda: DiscreteVP([0.1, np.inf]), "betas"),
    ],
)
def test_bad_construction_names_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@parametrize
def test_check_t_rejects_times_outside_range(process):
    process.check_t(jnp.array([process.t_min, process.t_max]))  # the ends are allowed
    with pytest.raises(ValueError, match="t must lie in"):
        process.check_t(jnp.array([0.5 * process.t_max, 2 * process.t_max]))
    with pytest.raises(ValueError, match="t must lie in"):
        process.check_t(0.1 * process.t_min)
    with pytest.raises(ValueError, match="NaN"):
        process.check_t(jnp.array([jnp.nan]))
    with pytest.raises(ValueError, match="t must lie in"):
        process.sample_marginal(jnp.ones((1, 2)), 2 * process.t_max, key=jax.random.key(0))


# --- DiscreteVP: the process of a beta table -----------------------------------------------------
BUILDERS = {
    "linear": DiscreteVP.linear(),
    "scaled_linear": DiscreteVP.scaled_linear(),
    "cosine": DiscreteVP.cosine(),
    "short": DiscreteVP(np.array([0.1, 0.3, 0.2, 0.6])),
}
parametrize_table = pytest.mark.parametrize("process", BUILDERS.values(), ids=BUILDERS.keys())


def _alphas_cumprod(betas):
    """The product of (1 - beta_i) for i <= n, as a plain loop in Python floats."""
    out, acc = [], 1.0
    for b in np.asarray(betas, np.float64):
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


@parametrize_table
def test_discrete_alpha_squared_at_table_points_is_cumprod(process):
    n = process.n_steps
    t_n = (np.arange(n) + 1) / n
    abar = _alphas_cumprod(process.betas)
    np.testing.assert_allclose(process.alpha(t_n) ** 2, abar, rtol=1e-12, atol=0)
    np.testing.assert_allclose(process.sigma(t_n) ** 2, 1 - abar, rtol=1e-12, atol=0)
    np.testing.assert_allclose(process.alphas_cumprod, abar, rtol=1e-12, atol=0)
    assert process.t_min == 1 / n and process.t_max == 1.0


@parametrize_table
def test_discrete_log_alpha_is_dpm_solvers_interpolation(process):
    # NoiseScheduleVP('discrete') of DPM-Solver: log alpha = 0.5 log(alphas_cumprod) on
    # t_n = (n + 1)/N, linearly interpolated in t. Between t = 0 and t_min: the knot (0, 0).
    n = process.n_steps
    knots_t = np.arange(n + 1) / n
    knots = np.concatenate([[0.0], 0.5 * np.log(_alphas_cumprod(process.betas))])
    t = np.random.default_rng(3).uniform(0, 1, 500)
    np.testing.assert_allclose(
        process.log_alpha(t), np.interp(t, knots_t, knots), rtol=1e-12, atol=1e-15
    )
    assert float(process.alpha(0.0)) == 1.0 and float(process.sigma(0.0)) == 0.0


@parametrize_table
def test_discrete_t_from_log_snr_roundtrip(process):
    # Dense in [1/N, 1], between and on the table points.
    t = np.concatenate(
        [np.linspace(process.t_min, 1.0, 3001), (np.arange(process.n_steps) + 1) / process.n_steps]
    )
    np.testing.assert_allclose(
        process.t_from_log_snr(process.log_snr(t)), t, rtol=1e-11, atol=1e-13
    )
    t32 = jnp.asarray(t, jnp.float32)
    back = process.t_from_log_snr(process.log_snr(t32))
    assert back.dtype == jnp.float32 and np.all(np.isfinite(back))
    np.testing.assert_allclose(back, t, rtol=1e-4, atol=1e-6)


@parametrize_table
def test_discrete_g2_consistent_away_from_the_kinks(process):
    # At the middle of each segment (no kink), by central finite differences of alpha and sigma:
    # g^2 = d sigma^2/dt - 2 f sigma^2 and f = d log alpha/dt; also g^2 = -2 f (VP: alpha^2 + sigma^2 = 1).
    n = process.n_steps
    t = (np.arange(n) + 0.5) / n
    h = 1e-3 / n
    dsig2 = (process.sigma(t + h) ** 2 - process.sigma(t - h) ** 2) / (2 * h)
    dlog_alpha = (jnp.log(process.alpha(t + h)) - jnp.log(process.alpha(t - h))) / (2 * h)
    f, g2 = process.f(t), process.g2(t)
    np.testing.assert_allclose(f, dlog_alpha, rtol=1e-7)
    np.testing.assert_allclose(g2, dsig2 - 2 * f * process.sigma(t) ** 2, rtol=1e-6)
    np.testing.assert_allclose(g2, -2 * f, rtol=1e-14)
    # f is the segment's slope: N (log alpha_{n} - log alpha_{n-1}) = (N/2) log(1 - beta_n).
    np.testing.assert_allclose(f, 0.5 * n * np.log1p(-np.asarray(process.betas)), rtol=1e-9)


def test_discrete_scaled_linear_and_cosine_tables_are_their_formulas():
    b = np.asarray(DiscreteVP.scaled_linear(n=10, beta_start=0.001, beta_end=0.04).betas)
    ref = [(0.001**0.5 + i / 9 * (0.04**0.5 - 0.001**0.5)) ** 2 for i in range(10)]
    np.testing.assert_allclose(b, ref, rtol=1e-14)

    def abar(u, s=0.008):
        return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2

    b = np.asarray(DiscreteVP.cosine(n=50).betas)
    ref = [min(1 - abar((i + 1) / 50) / abar(i / 50), 0.999) for i in range(50)]
    np.testing.assert_allclose(b, ref, rtol=1e-14)
    assert b[-1] == 0.999  # the cap binds at the last step
    b = np.asarray(DiscreteVP.linear(n=5, beta_start=0.1, beta_end=0.5).betas)
    np.testing.assert_allclose(b, [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-14)


def test_discrete_timestep_is_the_table_index():
    p = DiscreteVP.linear()
    n = np.arange(1000)
    np.testing.assert_allclose(p.timestep((n + 1) / 1000), n, atol=1e-9)
    np.testing.assert_allclose(p.timestep(1.0), 999.0)
    np.testing.assert_allclose(p.timestep(0.0005), -0.5)


def test_discrete_equal_tables_compare_and_hash_equal_and_never_recompile():
    a, b = DiscreteVP.linear(), DiscreteVP.linear()
    assert bool(a == b) and hash(a) == hash(b)
    assert not bool(a == DiscreteVP.scaled_linear()) and hash(a) != hash(DiscreteVP.cosine())
    assert isinstance(jaxdiff.DiscreteVP.linear(), jaxdiff.processes.DiscreteVP)
    traces = []

    @eqx.filter_jit
    def alpha(process, t):
        traces.append(None)
        return process.alpha(t)

    for p in (a, b, DiscreteVP.cosine()):  # an array leaf: a new table of equal length is traced
        np.testing.assert_allclose(alpha(p, 0.5), p.alpha(0.5), rtol=1e-14)
    assert len(traces) == 1
    # and it passes through jax.jit as an argument
    np.testing.assert_allclose(jax.jit(lambda p, t: p.sigma(t))(a, 0.3), a.sigma(0.3), rtol=1e-14)


@parametrize
def test_conversions_written_once_on_the_process(process):
    # At x = alpha x0 + sigma eps: each conversion recovers what it should, from its definition.
    t = jnp.linspace(process.t_min, process.t_max, 6)[1:-1]
    x0, eps = X0, EPS
    x = process.marginal(x0, eps, t)
    s = np.asarray(process.sigma(t))[:, None]
    np.testing.assert_allclose(process.eps_from_x0(x, x0, t), eps, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(process.x0_from_eps(x, eps, t), x0, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(process.score_from_x0(x, x0, t), -eps / s, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(process.x0_from_score(x, -eps / s, t), x0, rtol=1e-8, atol=1e-10)
    sig = process.noise_level(t)
    np.testing.assert_allclose(sig, process.sigma(t) / process.alpha(t), rtol=1e-14)
    np.testing.assert_allclose(sig, np.exp(-0.5 * process.log_snr(t)), rtol=1e-10)
    np.testing.assert_allclose(process.t_from_noise_level(sig), t, rtol=1e-10)
    # A scalar t serves the whole batch.
    np.testing.assert_allclose(
        process.eps_from_x0(x, x0, t[1]), (x - process.alpha(t[1]) * x0) / process.sigma(t[1])
    )


@parametrize
def test_conversions_keep_the_dtype_of_x(process):
    t = 0.5 * process.t_max
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        x, x0 = X0.astype(dtype), (0.5 * X0).astype(dtype)
        outs = [process.eps_from_x0(x, x0, t), process.x0_from_eps(x, x0, t)]
        outs += [process.score_from_x0(x, x0, t), process.x0_from_score(x, x0, t)]
        outs += [process.marginal(x0, x, t), process.conditional_velocity(x, x0, t)]
        assert all(o.dtype == dtype for o in outs), dtype
        assert all(np.all(np.isfinite(np.asarray(o, np.float32))) for o in outs), dtype


def test_process_is_abstract():
    with pytest.raises(TypeError):
        Process()
