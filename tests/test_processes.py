"""Forward processes: the SDE coefficients, the log-SNR inverse, the conditional ODE and the
forward SDE agree with alpha and sigma; float32 is safe over the whole time range."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jaxdiff.processes import EDM, VE, VP, Process, RectifiedFlow, SubVP, VPCosine

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow()]
IDS = [type(p).__name__ for p in PROCESSES]
parametrize = pytest.mark.parametrize("process", PROCESSES, ids=IDS)


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


@pytest.fixture(scope="module")
def ode_endpoints():
    """The six conditional ODEs from t_min to t_max, solved as one system (one compilation).

    Process i runs in normalised time u in [0, 1], t_i(u) = t_min + u (t_max - t_min).
    """
    spans = [(p.t_min, p.t_max - p.t_min) for p in PROCESSES]

    def velocity(u, ys, args):
        return tuple(
            d * p.conditional_velocity(y, X0, t0 + u * d)
            for p, (t0, d), y in zip(PROCESSES, spans, ys, strict=True)
        )

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(velocity),
        diffrax.Tsit5(),
        t0=0.0,
        t1=1.0,
        dt0=None,
        y0=tuple(p.marginal(X0, EPS, p.t_min) for p in PROCESSES),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-14),
        max_steps=100_000,
    )
    return dict(zip(IDS, [y[-1] for y in sol.ys], strict=True))


@parametrize
def test_conditional_ode_follows_gaussian_path(process, ode_endpoints):
    # From alpha(t_min) x0 + sigma(t_min) eps the ODE must reach alpha(t_max) x0 + sigma(t_max) eps.
    t_b = process.t_max
    scale = process.alpha(t_b) + process.sigma(t_b)
    x_b = ode_endpoints[type(process).__name__]
    np.testing.assert_allclose(x_b, process.marginal(X0, EPS, t_b), rtol=0, atol=1e-8 * scale)


@jax.jit
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
