"""Time grids: n + 1 decreasing times from t_max to t_min then 0, each spaced by its rule
(uniform in t, polynomial in t, uniform in log-SNR, Karras et al. 2022 Eq. 5 in the noise level)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff.processes import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine
from jaxdiff.samplers import check_grid

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
