"""Parameterizations: exact targets, round trips between every pair of predictions, EDM
preconditioning and the denoiser adapters, for every process."""

import itertools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parameterization as P
from jaxdiff.processes import EDM, VE, VP, DiscreteVP, RectifiedFlow, SubVP, VPCosine

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow(), DiscreteVP.linear()]
IDS = [type(p).__name__ for p in PROCESSES]
parametrize = pytest.mark.parametrize("process", PROCESSES, ids=IDS)

X0 = jax.random.normal(jax.random.key(0), (5, 3))
EPS = jax.random.normal(jax.random.key(1), (5, 3))


def times(process):
    return jnp.linspace(process.t_min, process.t_max, 7)[1:-1]  # (5,), one per example


def col(v):
    return v[:, None]


def exact_targets(process, t):
    """Every prediction's target at x = alpha x0 + sigma eps, written out from the definitions."""
    a, s = col(process.alpha(t)), col(process.sigma(t))
    da = col(jax.vmap(jax.grad(process.alpha))(t))
    ds = col(jax.vmap(jax.grad(process.sigma))(t))
    return {
        "x0": X0,
        "eps": EPS,
        "score": -EPS / s,
        "v": a * EPS - s * X0,
        "flow": da * X0 + ds * EPS,
    }


@parametrize
def test_from_x0_gives_exact_targets(process):
    t = times(process)
    x = process.marginal(X0, EPS, t)
    for name, target in exact_targets(process, t).items():
        np.testing.assert_allclose(
            P.from_x0(process, name, x, t, X0), target, rtol=1e-9, err_msg=name
        )
        np.testing.assert_allclose(
            P.to_x0(process, name, x, t, target), X0, rtol=1e-9, err_msg=name
        )


@parametrize
def test_round_trip_every_pair(process):
    t = times(process)
    x = process.marginal(X0, EPS, t)
    targets = exact_targets(process, t)
    for source, target in itertools.product(P.PREDICTIONS, repeat=2):
        out = P.convert(process, x, t, targets[source], source=source, target=target)
        back = P.convert(process, x, t, out, source=target, target=source)
        msg = f"{source} -> {target}"
        np.testing.assert_allclose(out, targets[target], rtol=1e-8, atol=1e-10, err_msg=msg)
        np.testing.assert_allclose(back, targets[source], rtol=1e-8, atol=1e-10, err_msg=msg)


def linear_net(x, t):
    """A fixed network whose output depends on x and t (arbitrary, not a trained model)."""
    w = jnp.array([[0.7, -0.2, 0.1], [0.3, 0.5, -0.4], [0.0, 0.2, 0.9]], x.dtype)
    return x @ w + jnp.sin(3.0 * t)[:, None].astype(x.dtype)


@parametrize
def test_edm_denoiser_is_preconditioned_network(process):
    sd = 0.7
    t = times(process)
    x = process.marginal(X0, EPS, t)
    a, s = process.alpha(t), process.sigma(t)
    sig = s / a  # noise level of x / alpha
    c_skip = sd**2 / (sig**2 + sd**2)
    c_out = sig * sd / jnp.sqrt(sig**2 + sd**2)
    c_in = 1.0 / jnp.sqrt(sig**2 + sd**2)
    c_noise = 0.25 * jnp.log(sig)
    ref = col(c_skip) * x / col(a) + col(c_out) * linear_net(col(c_in) * x / col(a), c_noise)
    denoise = P.denoiser(linear_net, process, "edm", sigma_data=sd)
    np.testing.assert_allclose(denoise(x, t), ref, rtol=1e-10)
    expected = (c_skip, c_out, c_in, c_noise)
    for got, want in zip(P.edm_preconditioning(process, t, sd), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_edm_preconditioning_matches_karras_table_1():
    # For the EDM process sigma(t) = t: c_skip = sd^2 / (t^2 + sd^2), c_noise = ln(t) / 4.
    t = jnp.array([0.002, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = P.edm_preconditioning(EDM(), t, 0.5)
    np.testing.assert_allclose(c_skip, 0.25 / (t**2 + 0.25), rtol=1e-12)
    np.testing.assert_allclose(c_out, 0.5 * t / jnp.sqrt(t**2 + 0.25), rtol=1e-12)
    np.testing.assert_allclose(c_in, 1 / jnp.sqrt(t**2 + 0.25), rtol=1e-12)
    np.testing.assert_allclose(c_noise, jnp.log(t) / 4, rtol=1e-12)


@parametrize
@pytest.mark.parametrize("prediction", P.PREDICTIONS)
def test_denoiser_uses_to_x0(process, prediction):
    t = times(process)
    x = process.marginal(X0, EPS, t)
    denoise = P.denoiser(linear_net, process, prediction)
    ref = P.to_x0(process, prediction, x, t, linear_net(x, t))
    np.testing.assert_allclose(denoise(x, t), ref, rtol=1e-12)


@parametrize
def test_score_and_eps_adapters_satisfy_tweedie(process):
    t = times(process)
    x = process.marginal(X0, EPS, t)
    denoise = P.denoiser(linear_net, process, "x0")
    a, s = col(process.alpha(t)), col(process.sigma(t))
    x0_hat = linear_net(x, t)
    np.testing.assert_allclose(P.score(process, denoise)(x, t), (a * x0_hat - x) / s**2, rtol=1e-9)
    np.testing.assert_allclose(P.eps(process, denoise)(x, t), (x - a * x0_hat) / s, rtol=1e-9)
    # An eps-network survives the trip net -> denoiser -> eps adapter.
    eps_back = P.eps(process, P.denoiser(linear_net, process, "eps"))(x, t)
    np.testing.assert_allclose(eps_back, linear_net(x, t), rtol=1e-8, atol=1e-10)


def test_network_receives_batched_time():
    seen = []

    def net(x, t):
        seen.append(jnp.shape(t))
        return jnp.zeros_like(x)

    P.denoiser(net, VP(), "eps")(X0, 0.5)
    P.denoiser(net, VP(), "edm")(X0, 0.5)
    assert seen == [(5,), (5,)]


def test_float32_preserved():
    x = jnp.ones((2, 3), jnp.float32)
    t = jnp.float32(0.3)
    for prediction in P.PREDICTIONS + ("edm",):
        assert P.denoiser(linear_net, VP(), prediction)(x, t).dtype == jnp.float32, prediction


def test_unknown_prediction_raises():
    with pytest.raises(ValueError, match="Unknown prediction 'epsilon'"):
        P.denoiser(linear_net, VP(), "epsilon")
    with pytest.raises(ValueError, match="Unknown prediction 'noise'"):
        P.to_x0(VP(), "noise", X0, 0.5, X0)
    with pytest.raises(ValueError, match="Unknown prediction 'edm'"):
        P.convert(VP(), X0, 0.5, X0, source="edm", target="eps")


def test_mismatched_time_shape_raises():
    denoise = P.denoiser(linear_net, VP(), "eps")
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
        denoise(X0, jnp.full((4,), 0.5))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
        denoise(X0, jnp.full((5, 1), 0.5))


@pytest.mark.parametrize("prediction", P.PREDICTIONS + ("edm",))
@pytest.mark.parametrize("out_shape", [(5, 1), (3,), (5,), (5, 4)], ids=["B1", "d", "B", "Bd+1"])
def test_denoiser_rejects_network_output_of_another_shape(prediction, out_shape):
    # A (B, 1) output for x of shape (B, 3) would broadcast silently: it must be an error at trace
    # time that names the denoiser and both shapes, eagerly and under jax.jit.
    def net(x, t):
        return jnp.zeros(out_shape, x.dtype)

    denoise = P.denoiser(net, VP(), prediction)
    pattern = rf"denoiser.*{re.escape(str(out_shape))}.*\(5, 3\)"
    with pytest.raises(ValueError, match=pattern):
        denoise(X0, 0.5)
    with pytest.raises(ValueError, match=pattern):
        jax.jit(denoise)(X0, jnp.full((5,), 0.5))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_x_keeps_its_dtype(dtype):
    # Coefficients are computed in float32; what comes back has the dtype of x.
    x = X0.astype(dtype)
    for prediction in P.PREDICTIONS + ("edm",):
        out = P.denoiser(linear_net, VP(), prediction)(x, 0.3)
        assert out.dtype == dtype, prediction
        ref = P.denoiser(linear_net, VP(), prediction)(x.astype(jnp.float32), 0.3)
        np.testing.assert_allclose(
            out.astype(np.float32), ref, rtol=0.05, atol=0.05, err_msg=prediction
        )
        for target in P.PREDICTIONS:
            assert P.from_x0(VP(), target, x, 0.3, x).dtype == dtype, target


def test_denoisers_compare_and_hash_equal_and_sigma_data_is_traced():
    a, b = P.denoiser(linear_net, VP(), "edm"), P.denoiser(linear_net, VP(), "edm", sigma_data=0.5)
    assert bool(a == b) and hash(a) == hash(b)
    assert not bool(a == P.denoiser(linear_net, VP(), "edm", sigma_data=0.7))
    traces = []

    @eqx.filter_jit
    def run(denoise, x):
        traces.append(None)
        return denoise(x, 0.5)

    outs = [run(P.denoiser(linear_net, VP(), "edm", sigma_data=sd), X0) for sd in (0.5, 0.7)]
    assert len(traces) == 1 and float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3
