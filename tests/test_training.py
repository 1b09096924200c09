"""Training: Adam's first step, EMA, warm-up, label dropout, skipped non-finite steps, and a short
run on two moons that lowers the loss and improves the sliced Wasserstein distance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _xla import OPTIMIZED
from flax import nnx

import jaxdiff
from jaxdiff import data, losses, training
from jaxdiff.nets import MLP
from jaxdiff.samplers import ddim
from jaxdiff.schedules import uniform

F32 = jnp.float32
VP = jaxdiff.VP()


def _sliced_wasserstein(a, b, n_proj=128, seed=0):
    r"""Sliced 2-Wasserstein distance between equal-size point clouds (Rabin et al. 2011):
    :math:`\sqrt{E_\theta W_2^2(\theta^\top a, \theta^\top b)}`, 1-D W2 by sorting."""
    theta = np.random.default_rng(seed).standard_normal((a.shape[1], n_proj))
    theta /= np.linalg.norm(theta, axis=0)
    pa, pb = np.sort(a @ theta, axis=0), np.sort(b @ theta, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def _setup(lr=1e-3, warmup=0, hidden=32, num_classes=None, decay_steps=None, clip=None, **step_kw):
    model = MLP(2, hidden=hidden, depth=2, num_classes=num_classes, rngs=nnx.Rngs(0))
    opt = training.make_optimizer(lr, warmup=warmup, clip=clip, decay_steps=decay_steps)
    state, graphdef, rest = training.init_train_state(model, opt, key=jax.random.key(1))
    step = training.make_train_step(graphdef, losses.eps_loss, VP, opt, rest=rest, **step_kw)
    return state, graphdef, rest, step


def _batch(n=64, seed=0):
    return {"x": jnp.asarray(data.toy_2d("moons", n, seed=seed).x)}


def test_first_adam_step_moves_every_parameter_by_lr():
    # Adam's first update is -lr * g / (|g| + eps): every parameter with a gradient moves by lr.
    state, *_, step = _setup(lr=1e-3, donate=False)
    new, metrics = step(state, _batch())
    deltas = np.concatenate(
        [
            np.abs(np.ravel(a - b))
            for a, b in zip(
                jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=False
            )
        ]
    )
    # float32 round-off of p - lr with |p| <= 4 is below 4 * 2**-23 ~ 5e-7 absolute
    assert np.max(deltas) <= 1e-3 + 5e-7
    assert np.median(deltas) == pytest.approx(1e-3, rel=1e-3)
    assert int(new.step) == 1 and bool(metrics["finite"])
    assert float(metrics["lr"]) == pytest.approx(1e-3)


def test_ema_update_and_warmup():
    beta = 0.9
    for warmup, decay in ((False, beta), (True, 0.1)):  # warm-up: min(beta, 1/10) at step 0
        state, *_, step = _setup(ema_decay=beta, ema_warmup=warmup, donate=False)
        new, _ = step(state, _batch())
        for e, p0, p1 in zip(
            *(jax.tree.leaves(t) for t in (new.ema_params, state.params, new.params)), strict=False
        ):
            np.testing.assert_allclose(e, decay * p0 + (1 - decay) * p1, rtol=1e-6, atol=1e-7)


def test_learning_rate_warmup_is_linear():
    state, *_, step = _setup(lr=1e-2, warmup=4)
    lrs = []
    for _ in range(6):
        state, m = step(state, _batch())
        lrs.append(float(m["lr"]))
    np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2], rtol=1e-6)


def test_label_dropout_rate():
    # A "loss" equal to the indicator of the null label measures the dropout probability:
    # mean over 4096 labels is p_uncond within 4 standard errors.
    p, k, n = 0.25, 5, 4096
    bind = lambda model, y, key: y  # noqa: E731
    null_fraction = lambda y, process, x0, *, key: (y == k).astype(F32)  # noqa: E731
    model = MLP(2, hidden=8, depth=1, num_classes=k, rngs=nnx.Rngs(0))
    opt = training.make_optimizer(1e-3)
    state, graphdef, rest = training.init_train_state(model, opt, key=jax.random.key(0))
    step = training.make_train_step(
        graphdef, null_fraction, VP, opt, rest=rest, p_uncond=p, null_class=k, bind=bind
    )
    batch = {"x": jnp.zeros((n, 2), F32), "y": jnp.zeros((n,), jnp.int32)}
    _, m = step(state, batch)
    assert float(m["loss"]) == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / n))
    with pytest.raises(ValueError, match="needs null_class"):
        training.make_train_step(graphdef, null_fraction, VP, opt, p_uncond=0.1)


def test_non_finite_step_is_skipped_and_reported():
    state, *_, step = _setup(donate=False)
    bad = {"x": _batch()["x"].at[0, 0].set(jnp.nan)}
    new, m = step(state, bad)
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=False):
        np.testing.assert_array_equal(a, b)  # state unchanged, step counter included
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 7"):
        training.check_finite(m, 7)


def test_shard_batch_checks_divisibility():
    mesh = training.make_mesh()
    out = training.shard_batch(mesh, {"x": np.ones((4, 2), np.float32)})
    assert out["x"].shape == (4, 2) and out["x"].sharding.mesh.shape == {"data": 1}
    assert training.initialize_distributed() is False  # no coordinator in the environment


def test_classifier_loss_is_cross_entropy():
    # With a classifier that ignores its input and returns fixed logits, the loss is the exact
    # cross-entropy -log softmax(logits)_y.
    logits = jnp.array([0.0, 1.0, 2.0], F32)
    y = jnp.array([0, 2])
    log_prob = lambda x, t: jax.nn.log_softmax(logits)[y]  # noqa: E731
    loss = training.classifier_loss(log_prob, VP, jnp.zeros((2, 4), F32), key=jax.random.key(0))
    np.testing.assert_allclose(loss, -jax.nn.log_softmax(logits)[y], rtol=1e-6)


def test_short_training_on_moons_beats_untrained():
    # 1500 cosine-decayed steps: measured sliced W2 0.13 (EMA) against a data floor of 0.07;
    # 400 constant-rate steps halve the loss but still leave SW2 ~ 1.2.
    steps = 1500
    state, graphdef, rest, step = _setup(
        lr=3e-3, warmup=20, hidden=64, decay_steps=steps, clip=1.0, ema_decay=0.99
    )
    step = jax.jit(step, compiler_options=OPTIMIZED)  # 1500 steps run for seconds: tests/_xla.py
    untrained = state.params
    untrained = jax.tree.map(jnp.copy, untrained)
    it = data.make_iterator(data.toy_2d("moons", 8192, seed=0), 256, seed=0, labels=False)
    loss_curve = []
    for _ in range(steps):
        state, m = step(state, next(it))
        loss_curve.append(m["loss"])
    loss_curve = np.asarray(jax.device_get(loss_curve))
    first, last = loss_curve[:20].mean(), loss_curve[-50:].mean()
    assert last < 0.5 * first, (first, last)

    held_out = data.toy_2d("moons", 1000, seed=123).x
    x_T = VP.prior_sample((1000, 2), key=jax.random.key(7))
    sampler, ts = ddim(VP), uniform(VP, 30)

    def samples(params):
        denoise = jaxdiff.denoiser(training.model_fn(graphdef, params, rest), VP, "eps")
        return np.asarray(jaxdiff.sample(sampler, denoise, x_T, ts).x)

    sw_trained = _sliced_wasserstein(samples(state.ema_params), held_out)
    sw_untrained = _sliced_wasserstein(samples(untrained), held_out)
    data_floor = _sliced_wasserstein(data.toy_2d("moons", 1000, seed=5).x, held_out)
    assert sw_trained < 0.25 * sw_untrained, (sw_trained, sw_untrained)
    assert sw_trained < 0.3, (sw_trained, data_floor)


def test_model_fn_is_a_pytree_denoiser():
    # The same compiled sampler runs new parameters without retracing.
    state, graphdef, rest, _ = _setup()
    fn = training.model_fn(graphdef, state.params, rest)
    x = jnp.ones((3, 2), F32)
    ref = nnx.merge(graphdef, state.params, rest)(x, 0.5)
    np.testing.assert_allclose(fn(x, jnp.full((3,), 0.5)), ref, rtol=1e-6)
    leaves = jax.tree.leaves(fn)
    assert len(leaves) == len(jax.tree.leaves(state.params)) + len(jax.tree.leaves(rest))
    jitted = jax.jit(lambda f, x: f(x, jnp.full((3,), 0.5)))
    jitted(fn, x)
    fn2 = training.model_fn(graphdef, jax.tree.map(lambda a: a * 2, state.params), rest)
    jitted(fn2, x)
    assert jitted._cache_size() == 1


def test_bind_for_classifier_training():
    # The classifier trains through bind = model.log_prob; its cross-entropy starts near log K.
    from jaxdiff.nets import Classifier

    clf = Classifier(
        1, 4, image_size=4, channels=8, channel_mults=(1,), attn_resolutions=(), rngs=nnx.Rngs(0)
    )
    opt = training.make_optimizer(1e-3)
    state, graphdef, rest = training.init_train_state(clf, opt, key=jax.random.key(0))
    bind = lambda model, y, key: functools.partial(model.log_prob, y=y, key=key)  # noqa: E731
    step = training.make_train_step(
        graphdef, training.classifier_loss, VP, opt, rest=rest, bind=bind
    )
    batch = {"x": jnp.zeros((8, 4, 4, 1), F32), "y": jnp.arange(8) % 4}
    _, m = step(state, batch)
    assert float(m["loss"]) == pytest.approx(np.log(4), rel=0.2)


def test_cosine_decay_needs_more_steps_than_warmup():
    with pytest.raises(ValueError, match="decay_steps > warmup"):
        training.make_optimizer(1e-3, warmup=100, decay_steps=100)
    schedule = training.make_schedule(1e-3, warmup=10, decay_steps=110)
    assert float(schedule(10)) == pytest.approx(1e-3) and float(schedule(110)) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------
def _fixed_noise_loss(apply_fn, process, x0, *, key):
    """A loss with no randomness (fixed times and noise per example), so a split batch sees the
    same per-example terms as the whole batch."""
    t = 0.2 + 0.6 * jnp.abs(jnp.sin(3.0 * x0[:, 0]))
    eps = jnp.cos(5.0 * x0)
    x_t = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    return jnp.sum((apply_fn(x_t, t) - eps) ** 2, axis=-1)


def test_grad_accumulation_equals_the_unsplit_step():
    model = MLP(2, hidden=32, depth=2, rngs=nnx.Rngs(0))
    opt = training.make_optimizer(1e-2, warmup=0, clip=1.0)
    state, graphdef, rest = training.init_train_state(
        model, opt, key=jax.random.key(1), mesh=training.make_mesh()
    )  # replicated like the step's output: one compilation per step function
    batch = {"x": jnp.asarray(data.toy_2d("moons", 48, seed=4).x)}
    results = {}
    for k in (1, 4):
        step = training.make_train_step(
            graphdef, _fixed_noise_loss, VP, opt, rest=rest, donate=False, grad_accum=k
        )
        s = state
        for _ in range(2):  # two steps: Adam's moments and the EMA accumulate the same way
            s, m = step(s, batch)
        results[k] = s, m
    ref, m_ref = results[1]
    for k in (4,):
        new, m = results[k]
        assert float(m["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-6)
        assert float(m["grad_norm"]) == pytest.approx(float(m_ref["grad_norm"]), rel=1e-5)
        # float32 rounding: mean of 4 micro-batch means vs one mean, then two Adam steps
        # of size 1e-2; Adam divides by |g|, so the rounding of tiny gradient entries grows
        # (measured max |difference| 6.6e-7 on parameters of size ~0.1)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params), strict=True)
    )
    assert moved > 1e-2  # the comparison is not trivially equal


def test_grad_accumulation_needs_a_divisible_batch():
    state, graphdef, rest, _ = _setup()
    opt = training.make_optimizer(1e-3, clip=None)  # as in _setup
    step = training.make_train_step(graphdef, losses.eps_loss, VP, opt, rest=rest, grad_accum=4)
    with pytest.raises(ValueError, match="batch size 10 must be divisible by grad_accum=4"):
        step(state, {"x": jnp.ones((10, 2), F32)})
    with pytest.raises(ValueError, match="grad_accum must be a positive integer, got 0"):
        training.make_train_step(graphdef, losses.eps_loss, VP, opt, grad_accum=0)
    # the random losses run too: micro-batch i draws from fold_in(key, i)
    new, m = step(state, _batch(64))
    assert int(new.step) == 1 and bool(m["finite"])


# ----------------------------------------------------------------------------------------------
# Post-hoc EMA
# ----------------------------------------------------------------------------------------------
def test_sigma_rel_and_gamma_are_inverse():
    # EDM2's two tracked profiles (Karras et al. 2024, Sec. 3.1): sigma_rel 0.05 and 0.10
    assert training.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert training.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.07, 0.2, 0.28):
        assert training.gamma_to_sigma_rel(training.sigma_rel_to_gamma(s)) == pytest.approx(s)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        training.sigma_rel_to_gamma(0.3)


def test_power_ema_recursion_matches_its_profile():
    # After T steps on parameters theta_tau = tau, the power EMA is sum_tau w_tau * tau with the
    # profile's weights w_tau = (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1).
    g, T = training.sigma_rel_to_gamma(0.1), 50
    ema, theta = jnp.zeros((), F32), None
    for tau in range(1, T + 1):
        theta = jnp.asarray(float(tau), F32)
        (ema,) = training._power_emas((ema,), jnp.asarray([g], F32), theta, jnp.asarray(tau))
    tau = np.arange(1, T + 1, dtype=np.float64)
    w = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / T ** (g + 1)
    assert float(ema) == pytest.approx(float(np.sum(w * tau)), rel=1e-5)


@pytest.fixture(scope="module")
def posthoc_run():
    """400 steps on moons tracking three profiles (0.05, 0.07, 0.10); snapshots every 10 steps."""
    profiles, every, steps = (0.05, 0.07, 0.10), 10, 400
    model = MLP(2, hidden=32, depth=2, rngs=nnx.Rngs(0))
    opt = training.make_optimizer(3e-3, clip=1.0)
    state, graphdef, rest = training.init_train_state(
        model, opt, key=jax.random.key(3), ema_profiles=profiles, mesh=training.make_mesh()
    )
    step = training.make_train_step(graphdef, losses.eps_loss, VP, opt, rest=rest)
    it = data.make_iterator(data.toy_2d("moons", 4096, seed=0), 128, seed=0, labels=False)
    snapshots = []
    for k in range(1, steps + 1):
        state, _ = step(state, next(it))
        if k % every == 0:
            gammas = np.asarray(state.power_gamma)
            snapshots += [
                training.EMASnapshot(
                    k, float(gammas[i]), jax.tree.map(np.asarray, state.power_ema[i])
                )
                for i in (0, 2)  # the two profiles EDM2 tracks; 0.07 is the reference
            ]
    return state, snapshots


def _rel_err(a, b):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_posthoc_ema_reproduces_a_tracked_profile(posthoc_run):
    state, snapshots = posthoc_run
    rebuilt = training.posthoc_ema(snapshots, 0.05)  # the last snapshot of profile 0.05
    assert _rel_err(rebuilt, state.power_ema[0]) < 1e-6
    weights = training.posthoc_ema_weights(
        [s.step for s in snapshots], [s.gamma for s in snapshots], 0.05
    )
    np.testing.assert_allclose(weights, np.eye(len(snapshots))[-2], atol=1e-6)


def test_posthoc_ema_matches_a_directly_tracked_length(posthoc_run):
    state, snapshots = posthoc_run
    tracked, rebuilt = state.power_ema[1], training.posthoc_ema(snapshots, 0.07)
    err = _rel_err(rebuilt, tracked)
    spread = _rel_err(state.power_ema[0], state.power_ema[2])  # how far apart the profiles are
    assert err < 1e-3 and err < 0.05 * spread, (err, spread)
    # a reconstruction at an earlier step uses only the snapshots up to it
    early = [s for s in snapshots if s.step <= 200]
    assert _rel_err(training.posthoc_ema(snapshots, 0.05, step=200), early[-2].params) < 1e-6
