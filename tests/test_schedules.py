"""Time grids: n + 1 decreasing times from t_max to t_min then 0, each spaced by its rule
(uniform in t, polynomial in t, uniform in log-SNR, Karras et al. 2022 Eq. 5 in the noise level);
the interface of the fitted grids (GITS's step costs and program, optimize). Their accuracy
against hand-made grids is checked in tests/test_geometry.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from experiments.common import compilations
from jaxdiff import fitted_grids, samplers, schedules
from jaxdiff.analytic import Gaussian
from jaxdiff.processes import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine
from jaxdiff.samplers import check_grid
from jaxdiff.schedules import karras

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow()]
IDS = [type(p).__name__ for p in PROCESSES]
N = 40  # one grid length for most tests, so that eager ops compile once per shape
GRIDS = {
    "uniform": schedules.uniform,
    "quadratic": schedules.quadratic,
    "polynomial3": lambda p, n, **kw: schedules.polynomial(p, n, 3.0, **kw),
    "log_snr_uniform": schedules.log_snr_uniform,
    "karras": schedules.karras,
}


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("n", [1, 2, N])
def test_grid_shape_ends_and_order(process, name, n):
    ts = np.asarray(GRIDS[name](process, n))
    assert ts.shape == (n + 1,)
    assert ts[0] == pytest.approx(process.t_max, rel=1e-12)
    assert ts[-1] == 0.0
    if n > 1:
        assert ts[-2] == pytest.approx(process.t_min, rel=1e-12)
    assert np.all(np.diff(ts) < 0), ts
    assert np.all(ts[:-1] >= process.t_min) and np.all(ts[:-1] <= process.t_max)
    check_grid(ts, process)  # the engine accepts every grid (raises otherwise)


def k_diffusion_karras(n, sigma_min, sigma_max, rho=7.0):
    """k-diffusion's ``get_sigmas_karras`` (Karras et al. 2022, Eq. 5), written in NumPy."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


@pytest.mark.parametrize("n,rho", [(18, 7.0), (N, 7.0), (N, 3.0)])
def test_karras_edm_equals_k_diffusion(n, rho):
    ref = k_diffusion_karras(n, 0.002, 80.0, rho)
    np.testing.assert_allclose(schedules.karras(EDM(), n, rho), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_karras_is_uniform_in_noise_level_to_one_over_rho(process):
    # sigma~ = exp(-lambda/2); sigma~^(1/rho) is linear in the step index.
    rho, ts = 7.0, schedules.karras(process, N)
    root = np.exp(-0.5 * np.asarray(process.log_snr(ts[:-1]))) ** (1 / rho)
    np.testing.assert_allclose(np.diff(root), np.full(N - 1, np.diff(root).mean()), rtol=1e-8)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_log_snr_uniform_is_uniform_in_log_snr(process):
    ts = schedules.log_snr_uniform(process, N)
    lam = np.asarray(process.log_snr(ts[:-1]))
    step = (lam[-1] - lam[0]) / (N - 1)
    assert step > 0
    np.testing.assert_allclose(np.diff(lam), np.full(N - 1, step), rtol=1e-8)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_uniform_and_polynomial_in_time(process):
    n, lo, hi = N, process.t_min, process.t_max
    u = 1 - np.linspace(0, 1, n)
    np.testing.assert_allclose(schedules.uniform(process, n)[:-1], lo + (hi - lo) * u, rtol=1e-12)
    np.testing.assert_allclose(
        schedules.quadratic(process, n)[:-1], lo + (hi - lo) * u**2, rtol=1e-12
    )
    np.testing.assert_allclose(
        schedules.polynomial(process, n, 1.5)[:-1], lo + (hi - lo) * u**1.5, rtol=1e-12
    )


@pytest.mark.parametrize("name", list(GRIDS))
def test_dtype_follows_request(name):
    assert GRIDS[name](VP(), N, dtype=jnp.float32).dtype == jnp.float32
    assert GRIDS[name](VP(), N).dtype == jnp.float64  # x64 is on in the tests


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("n", [0, -3, 2.5, "4"])
def test_bad_n_raises(name, n):
    with pytest.raises(ValueError, match="number of steps"):
        GRIDS[name](VP(), n)


def test_bad_rho_and_power_raise():
    with pytest.raises(ValueError, match="rho must be positive"):
        schedules.karras(EDM(), 10, rho=0.0)
    with pytest.raises(ValueError, match="power must be positive"):
        schedules.polynomial(VP(), 10, -1.0)


# --- fitted grids (jaxdiff.fitted_grids, reachable from jaxdiff.schedules) ----------------------
GAUSS = Gaussian(jnp.full((4,), 0.5), 0.3**2 * jnp.eye(4))
WARM = EDM().prior_sample((16, 4), key=jax.random.key(0), dtype=jnp.float64)


@pytest.fixture(scope="module")
def edm_costs():
    return fitted_grids.step_costs(EDM(), GAUSS.denoiser(EDM()), WARM, fine_steps=20)


def test_fitted_grids_are_reachable_from_schedules():
    for name in ("gits", "optimize", "fine_trajectory", "step_costs", "propagated_error"):
        assert getattr(schedules, name) is getattr(fitted_grids, name)
    assert schedules._propagation_weights is fitted_grids.propagation_weights  # earlier name
    assert {"gits", "optimize", "fine_trajectory"} <= set(dir(schedules))
    with pytest.raises(AttributeError, match="no attribute 'gitz'"):
        schedules.gitz  # noqa: B018


def test_gits_returns_one_grid_the_program_of_its_step_costs(edm_costs):
    edm, den = EDM(), GAUSS.denoiser(EDM())
    assert edm_costs.times.shape == (21,) and edm_costs.costs.shape == (20, 21)
    for n in (1, 3, 6):
        ts = schedules.gits(edm, den, WARM, n, fine_steps=20)
        assert isinstance(ts, jax.Array) and ts.shape == (n + 1,)
        np.testing.assert_array_equal(ts, edm_costs.grid(n))
        assert float(ts[0]) == edm.t_max and float(ts[-1]) == 0.0
        assert bool(jnp.all(jnp.diff(ts) < 0))
    # the grid's times are fine-grid times, and its cost is the least over all 3-step paths
    path = [int(jnp.argmin(jnp.abs(edm_costs.times - t))) for t in edm_costs.grid(3)]
    cost = sum(float(edm_costs.costs[i, j]) for i, j in zip(path, path[1:], strict=False))
    brute = min(
        float(edm_costs.costs[0, i] + edm_costs.costs[i, j] + edm_costs.costs[j, 20])
        for i in range(1, 20)
        for j in range(i + 1, 20)
    )
    assert cost == pytest.approx(brute, rel=1e-12)
    assert float(edm_costs.grid(4, pin_t_min=True)[-2]) == pytest.approx(edm.t_min)
    with pytest.raises(ValueError, match="finer grid"):
        edm_costs.grid(21)


def test_gits_error_weights_are_functions_and_strings_are_deprecated(edm_costs):
    edm, den = EDM(), GAUSS.denoiser(EDM())
    ts = edm_costs.times
    np.testing.assert_array_equal(fitted_grids.local_error(edm, ts, None), np.ones(21))
    traj = jnp.zeros((21, 16, 4)).at[-1].set(WARM)  # samples of standard deviation ~ s
    s = float(jnp.std(WARM))
    weights = fitted_grids.propagated_error(edm, ts, traj)
    np.testing.assert_allclose(weights, s / np.sqrt(s**2 + np.append(ts[:-1], 0.0) ** 2))
    local = fitted_grids.step_costs(edm, den, WARM, fine_steps=20, error=fitted_grids.local_error)
    # propagated = local x the weight of the landing time, s the std of the teacher's samples
    s_teacher = jnp.std(fitted_grids.fine_trajectory(edm, den, WARM, ts)[-1])
    weights = fitted_grids.propagation_weights(edm, ts, s_teacher)
    np.testing.assert_allclose(edm_costs.costs[:3] / local.costs[:3], weights[None].repeat(3, 0))
    with pytest.warns(DeprecationWarning, match="error=jaxdiff.fitted_grids.local_error"):
        old = schedules.gits(edm, den, WARM, 4, fine_steps=20, error="local")
    np.testing.assert_array_equal(old, local.grid(4))
    with pytest.raises(ValueError, match="error must be 'propagated' or 'local'"):
        schedules.gits(edm, den, WARM, 4, error="global")


def test_gits_sequence_form_is_deprecated(edm_costs):
    edm, den = EDM(), GAUSS.denoiser(EDM())
    with pytest.warns(DeprecationWarning, match="step_costs"):
        many = schedules.gits(edm, den, WARM, [2, 5], fine_steps=20)
    assert isinstance(many, tuple)
    np.testing.assert_array_equal(many[1], edm_costs.grid(5))


def test_optimize_compiles_once_for_repeated_calls():
    edm, den = EDM(), GAUSS.denoiser(EDM())
    sampler = samplers.dpm_solver_pp(edm, 2)
    targets = jaxdiff.sample(samplers.heun(edm), den, WARM, karras(edm, 40)).x
    kwargs = dict(teacher=targets, steps=3, init=karras, lr=0.1)
    first = schedules.optimize(sampler, den, WARM, 4, **kwargs)
    with compilations() as compiled:
        again = schedules.optimize(sampler, den, WARM, 4, **kwargs | {"steps": 5, "lr": 0.2})
    assert compiled == [], compiled  # new step count and learning rate: traced, no recompile
    # init: a list mixing a grid and a schedule function (both are starts)
    mixed = schedules.optimize(sampler, den, WARM, 4, **kwargs | {"init": [first, karras]})
    assert mixed.shape == (5,) and bool(jnp.all(jnp.diff(mixed) < 0))
    assert first.shape == again.shape == (5,) and bool(jnp.all(jnp.diff(again) < 0))
