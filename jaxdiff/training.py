r"""Training: an immutable train state, a pure train step, and data parallelism over a device mesh.

One step on a batch :math:`\{x_0^{(i)}, y^{(i)}\}_{i=1}^B` with per-example loss :math:`\ell`:

.. math::
    g = \nabla_\theta \frac1B\sum_i \ell\big(f_\theta(\cdot, \cdot, \tilde y^{(i)}), x_0^{(i)}\big),\qquad
    \theta \leftarrow \theta + \mathrm{Adam}(\mathrm{clip}(g)),\qquad
    \bar\theta \leftarrow \beta\bar\theta + (1 - \beta)\theta,

where :math:`\tilde y` replaces each label by the null class with probability :math:`p_{uncond}`
(classifier-free guidance training, Ho & Salimans 2022) and :math:`\bar\theta` is the exponential
moving average used for sampling (Song & Ermon 2020; Karras et al. 2022). The step is one pure
function ``train_step(state, batch) -> (state, metrics)`` compiled with ``jax.jit`` over a mesh of
every device of every host: the batch is sharded along ``"data"``, parameters are replicated, and
XLA inserts the gradient all-reduce. A step whose loss or gradient is not finite leaves the state
unchanged and reports ``finite = False``; :func:`check_finite` turns that into an error.

The network is a Flax NNX module used in the functional style: ``nnx.split`` once into a static
``graphdef``, the trainable ``params`` and the remaining state ``rest`` (fixed buffers such as
Fourier frequencies), and ``nnx.merge(graphdef, params, rest, copy=True)`` inside the step.

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> from flax import nnx
    >>> from jaxdiff import training, losses
    >>> model = jaxdiff.nets.MLP(2, hidden=16, depth=1, rngs=nnx.Rngs(0))
    >>> opt = training.make_optimizer(1e-3)
    >>> state, graphdef, rest = training.init_train_state(model, opt, key=jax.random.key(0))
    >>> step = training.make_train_step(graphdef, losses.eps_loss, jaxdiff.VP(), opt, rest=rest)
    >>> state, metrics = step(state, {"x": jnp.ones((8, 2), jnp.float32)})
    >>> int(state.step), sorted(metrics)
    (1, ['finite', 'grad_norm', 'loss', 'lr'])
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "TrainState",
    "make_optimizer",
    "make_schedule",
    "init_train_state",
    "make_train_step",
    "make_mesh",
    "shard_batch",
    "replicate",
    "initialize_distributed",
    "check_finite",
    "classifier_loss",
    "ModelFn",
    "model_fn",
    "EMASnapshot",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "posthoc_ema_weights",
    "posthoc_ema",
    "persistent_compilation_cache",
]


@flax.struct.dataclass
class TrainState:
    r"""Everything that changes during training; an immutable pytree (checkpointed as is).

    Attributes:
        step: number of updates applied (int32 scalar).
        params: trainable parameters (``nnx.State`` of ``nnx.Param``).
        opt_state: optax state.
        ema_params: exponential moving average of ``params``.
        key: raw PRNG key data (``jax.random.key_data``); step ``k`` draws from
            ``fold_in(key, k)``, so a restored run continues with the same randomness.
        power_ema: power-function EMAs of ``params`` (Karras et al. 2024), one tree per exponent
            of ``power_gamma``; ``()`` when none are tracked. Snapshots of them feed
            :func:`posthoc_ema`.
        power_gamma: the exponents :math:`\gamma` of ``power_ema`` (float32, shape ``(n,)``).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    key: jax.Array
    power_ema: Any = ()
    power_gamma: Any = ()


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------
def make_schedule(lr: float, warmup: int = 0, decay_steps: int | None = None, end_lr: float = 0.0):
    r"""Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then constant or cosine decay.

    .. math:: \eta_k = \eta\,\min(1, k/\text{warmup}) \quad(\text{then } \tfrac12(1 + \cos(\pi
        (k - w)/(D - w)))\ \text{with cosine decay to step } D).
    """
    if lr <= 0 or warmup < 0:
        raise ValueError(f"need lr > 0 and warmup >= 0; got lr={lr}, warmup={warmup}.")
    if decay_steps is not None and decay_steps <= warmup:
        raise ValueError(
            f"cosine decay needs decay_steps > warmup; got decay_steps={decay_steps}, "
            f"warmup={warmup}. Train for more steps or shorten the warm-up."
        )
    if decay_steps is None:
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, end_lr)


def make_optimizer(
    lr: float = 2e-4,
    warmup: int = 0,
    clip: float | None = 1.0,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_steps: int | None = None,
) -> optax.GradientTransformation:
    """Adam (AdamW when ``weight_decay > 0``) with warm-up and global-norm gradient clipping.

    The learning rate is injected as a hyperparameter (``optax.inject_hyperparams``), so the train
    step can report it.

    Example:
        >>> opt = make_optimizer(1e-3, warmup=100, clip=1.0)
    """
    schedule = make_schedule(lr, warmup, decay_steps)
    adam = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
    )
    if clip is None:
        return adam
    if clip <= 0:
        raise ValueError(f"clip must be positive (or None for no clipping), got {clip}.")
    return optax.chain(optax.clip_by_global_norm(clip), adam)


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------
def initialize_distributed(force: bool = False) -> bool:
    """Call ``jax.distributed.initialize()`` when the environment asks for it (multi-host).

    It runs when ``force`` is true or ``JAX_COORDINATOR_ADDRESS`` is set (with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; on Slurm/TPU pods JAX reads the cluster itself).
    Call it first, before any other JAX operation. Returns whether it initialised.
    """
    if not (force or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return False
    jax.distributed.initialize()
    return True


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``("data",)`` mesh over ``devices`` (default: every device of every host).

    The axis type is ``Auto`` on every JAX version, so ``jax.jit`` propagates shardings itself.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicate(mesh, tree):
    """Place every leaf of ``tree`` on every device of ``mesh`` (``P()``)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(mesh, local_batch):
    """Assemble the global batch from this host's ``local_batch`` (a dict of arrays).

    Each host passes its own slice (leading axis); the result is sharded along ``"data"``
    (``jax.make_array_from_process_local_data``). On one host it is a sharded ``device_put``.
    """
    sharding = NamedSharding(mesh, P("data"))
    n_dev = mesh.devices.size

    def put(a):
        a = np.asarray(a)
        global_b = a.shape[0] * jax.process_count()
        if global_b % n_dev:
            raise ValueError(
                f"the global batch size {global_b} must be divisible by the number of devices "
                f"{n_dev}; change batch_size."
            )
        return jax.make_array_from_process_local_data(sharding, a)

    return jax.tree.map(put, local_batch)


# ----------------------------------------------------------------------------------------------
# State and step
# ----------------------------------------------------------------------------------------------
def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def init_train_state(model: nnx.Module, optimizer, *, key, mesh=None, ema_profiles=()):
    r"""Split ``model`` and build the initial :class:`TrainState`.

    Args:
        model: a Flax NNX module.
        optimizer: an optax transformation (e.g. :func:`make_optimizer`).
        key: PRNG key for the training randomness (times, noise, dropout, label dropout).
        mesh: when given, the state is replicated over it.
        ema_profiles: relative widths :math:`\sigma_{rel}` of power-function EMAs to track for
            :func:`posthoc_ema` (EDM2 tracks ``(0.05, 0.10)``); none by default.

    Returns:
        ``(state, graphdef, rest)``: the state and the static parts that
        :func:`make_train_step` and :func:`model_fn` need.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = _copy(params)  # the state owns its buffers (donation must not delete the model's)
    gammas = [sigma_rel_to_gamma(s) for s in ema_profiles]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=_copy(params),
        key=jax.random.key_data(key),
        power_ema=tuple(_copy(params) for _ in gammas),
        power_gamma=jnp.asarray(gammas, jnp.float32) if gammas else (),
    )
    return (state if mesh is None else replicate(mesh, state)), graphdef, rest


def _drop_labels(y, p_uncond, null_class, key):
    """Replace each label by ``null_class`` with probability ``p_uncond``."""
    drop = jax.random.bernoulli(key, p_uncond, y.shape)
    return jnp.where(drop, jnp.asarray(null_class, y.dtype), y)


def _default_bind(model, y, key):
    """The network as ``apply_fn(x, t)``: labels and the dropout key closed over."""
    return (
        functools.partial(model, key=key) if y is None else functools.partial(model, y=y, key=key)
    )


def _ema(ema, params, decay):
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def _ema_decay(decay, warmup, step):
    if not warmup:
        return decay
    k = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + k) / (10.0 + k))


def _learning_rate(opt_state):
    """The injected learning rate of the last update (NaN when the optimizer does not expose it)."""
    has_hp = lambda s: isinstance(getattr(s, "hyperparams", None), dict)  # noqa: E731
    for s in jax.tree.leaves(opt_state, is_leaf=has_hp):
        if has_hp(s) and "learning_rate" in s.hyperparams:
            return jnp.asarray(s.hyperparams["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


def _micro_batches(batch, k: int, mesh):
    """``(k, B/k, ...)`` micro-batches of a ``(B, ...)`` batch; micro-batch ``i`` holds examples
    ``i, i + k, ...``, so every device keeps its own examples (no resharding)."""
    n_dev = mesh.devices.size

    def split(a):
        b = a.shape[0]
        if b % k or (b // k) % n_dev:
            raise ValueError(
                f"the batch size {b} must be divisible by grad_accum={k}"
                + (f" times the number of devices {n_dev}" if n_dev > 1 else "")
                + "; change batch_size or grad_accum."
            )
        a = jnp.swapaxes(a.reshape(b // k, k, *a.shape[1:]), 0, 1)
        spec = P(None, "data", *([None] * (a.ndim - 2)))
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _mean_grad(loss_and_grad, params, batch, key, k: int, mesh):
    """Mean loss and gradient over ``k`` micro-batches, accumulated by one ``lax.scan``.

    Micro-batch ``i`` draws from ``fold_in(key, i)``; ``k = 1`` is one call with ``key``.
    """
    if k == 1:
        return loss_and_grad(params, batch, key)
    micro = _micro_batches(batch, k, mesh)

    def body(total, i_mb):
        i, mb = i_mb
        out = loss_and_grad(params, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda a: a[0], micro)
    shapes = jax.eval_shape(loss_and_grad, params, first, key)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda a: a / k, total)


def make_train_step(
    graphdef,
    loss_fn: Callable,
    process,
    optimizer,
    *,
    rest=None,
    ema_decay: float = 0.999,
    ema_warmup: bool = True,
    p_uncond: float = 0.0,
    null_class: int | None = None,
    bind: Callable | None = None,
    mesh=None,
    donate: bool = True,
    grad_accum: int = 1,
):
    """Build the compiled, pure ``train_step(state, batch) -> (state, metrics)``.

    Args:
        graphdef, rest: from :func:`init_train_state`.
        loss_fn: per-example loss ``loss_fn(apply_fn, process, x0, *, key) -> (batch,)`` (any of
            :mod:`jaxdiff.losses`; bind extra options with ``functools.partial``).
        process: the forward process.
        optimizer: the optax transformation the state was built with.
        ema_decay: EMA decay :math:`\\beta`.
        ema_warmup: use :math:`\\min(\\beta, (1 + k)/(10 + k))` at step :math:`k`, so that the
            average forgets the initialisation early in training (TensorFlow's
            ``ExponentialMovingAverage(num_updates=k)``).
        p_uncond: probability of replacing a label by ``null_class`` (classifier-free guidance).
        null_class: the null label index (the network's ``num_classes``); needed when ``p_uncond > 0``.
        bind: ``bind(model, y, key) -> apply_fn(x, t)``; the default closes labels ``y`` and the
            dropout ``key`` over ``model``'s call (use ``model.log_prob`` for a classifier).
        mesh: device mesh (default: all devices); the batch is sharded along ``"data"``.
        donate: donate the input state's buffers (do not reuse a state after passing it).
        grad_accum: split the batch into this many micro-batches and average their gradients
            inside the step (one ``lax.scan``; memory of one micro-batch). The update equals the
            one of the whole batch up to float32 rounding; micro-batch ``i`` draws its noise from
            ``fold_in(key, i)``. The batch size must be divisible by ``grad_accum`` (times the
            number of devices).

    Returns:
        ``train_step``; ``metrics`` holds ``loss``, ``grad_norm`` (before clipping), ``lr`` and
        ``finite``. A non-finite step returns the input state unchanged. The power-function EMAs
        of the state (``init_train_state(..., ema_profiles=...)``) are updated too.
    """
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}.")
    if p_uncond > 0 and null_class is None:
        raise ValueError("p_uncond > 0 needs null_class (the network's num_classes).")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}.")
    if int(grad_accum) != grad_accum or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum}.")
    bind = _default_bind if bind is None else bind
    rest = nnx.State({}) if rest is None else rest
    mesh = make_mesh() if mesh is None else mesh

    def objective(params, batch, key):
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        model = nnx.merge(graphdef, params, rest, copy=True)
        y = batch.get("y")
        if y is not None and p_uncond > 0:
            y = _drop_labels(y, p_uncond, null_class, k_label)
        return jnp.mean(loss_fn(bind(model, y, k_drop), process, batch["x"], key=k_loss))

    loss_and_grad = jax.value_and_grad(objective)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        loss, grads = _mean_grad(loss_and_grad, state.params, batch, key, int(grad_accum), mesh)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        new = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=_ema(
                state.ema_params, params, _ema_decay(ema_decay, ema_warmup, state.step)
            ),
            power_ema=_power_emas(state.power_ema, state.power_gamma, params, state.step + 1),
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=_learning_rate(opt_state), finite=finite)
        return new, metrics

    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(
        train_step,
        in_shardings=(rep, data),
        out_shardings=(rep, rep),
        donate_argnums=(0,) if donate else (),
    )


def check_finite(metrics, step: int):
    """Raise ``FloatingPointError`` naming ``step`` when a step reported a non-finite loss."""
    if not bool(metrics["finite"]):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}); the update was skipped and no checkpoint "
            "was written from it. Lower the learning rate, enable clipping, or check the data."
        )


def classifier_loss(log_prob_fn, process, x0, *, key, t_sampler=None):
    r"""Cross-entropy of a noise-conditional classifier on noisy inputs, per example.

    .. math:: \ell = -\log p_\phi(y \mid x_t, t),\quad x_t = \alpha_t x_0 + \sigma_t\epsilon,\
        t \sim \mathcal U[t_{min}, t_{max}]

    ``log_prob_fn(x, t) -> (batch,)`` has the labels closed over; with :func:`make_train_step`
    pass ``bind=lambda model, y, key: functools.partial(model.log_prob, y=y, key=key)``
    (Dhariwal & Nichol 2021, Sec. 4).
    """
    key_t, key_x = jax.random.split(key)
    shape = x0.shape[:1]
    if t_sampler is None:
        t = jax.random.uniform(key_t, shape, x0.dtype, process.t_min, process.t_max)
    else:
        t = t_sampler(key_t, shape, x0.dtype)
    x_t, _ = process.sample_marginal(x0, t, key=key_x)
    return -log_prob_fn(x_t, t)


# ----------------------------------------------------------------------------------------------
# Using trained parameters
# ----------------------------------------------------------------------------------------------
class ModelFn(eqx.Module):
    """A split NNX network as a pytree function ``fn(x, t) -> model.method(x, t, **kwargs)``.

    Its arrays are traced (so ``jaxdiff.sample`` and ``jax.jit`` reuse one compilation for new
    parameters); the graph definition is static. Built by :func:`model_fn`.
    """

    graphdef: Any = eqx.field(static=True)
    params: Any
    rest: Any
    kwargs: dict
    method: str = eqx.field(static=True, default="__call__")

    def __call__(self, x, t):
        model = nnx.merge(self.graphdef, self.params, self.rest, copy=True)
        return getattr(model, self.method)(x, t, **self.kwargs)


def model_fn(graphdef, params, rest=None, *, method: str = "__call__", **kwargs) -> ModelFn:
    """``apply_fn(x, t)`` from split state, e.g. ``model_fn(graphdef, state.ema_params, rest, y=labels)``.

    Pass it to ``jaxdiff.denoiser(fn, process, prediction)``.
    """
    rest = nnx.State({}) if rest is None else rest
    return ModelFn(graphdef, params, rest, kwargs, method)


# ----------------------------------------------------------------------------------------------
# Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
# Models", Sec. 3 and App. C)
# ----------------------------------------------------------------------------------------------
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""Exponent :math:`\gamma` of the power-function EMA profile of relative width ``sigma_rel``.

    The profile :math:`p_t(\tau) \propto \tau^\gamma` on :math:`[0, t]` has standard deviation
    :math:`\sigma_{rel}\,t` with :math:`\sigma_{rel}^2 = (\gamma + 1)/((\gamma + 2)^2(\gamma + 3))`,
    so :math:`\gamma` is the largest real root of
    :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma_{rel}^{-2})\gamma + 12 - \sigma_{rel}^{-2}`.

    Example:
        >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 2)
        (16.97, 6.94)
    """
    if not 0.0 < sigma_rel < gamma_to_sigma_rel(0.0):
        raise ValueError(
            f"sigma_rel must lie in (0, {gamma_to_sigma_rel(0.0):.4f}) (gamma > 0); got {sigma_rel}."
        )
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    r""":math:`\sigma_{rel} = \sqrt{(\gamma + 1)/((\gamma + 2)^2(\gamma + 3))}`, the inverse of
    :func:`sigma_rel_to_gamma`."""
    g = float(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def _power_emas(emas, gammas, params, t):
    r"""One update of each power-function EMA at step count ``t >= 1``:
    :math:`\hat\theta \leftarrow \beta\hat\theta + (1 - \beta)\theta` with
    :math:`\beta = (1 - 1/t)^{\gamma + 1}`, written :math:`1 - \beta = -\mathrm{expm1}((\gamma + 1)
    \mathrm{log1p}(-1/t))` (accurate in float32 for any ``t``). The discrete weights are
    :math:`(\tau^{\gamma+1} - (\tau - 1)^{\gamma+1})/t^{\gamma+1}`: the profile integrated over
    each step, which makes :func:`posthoc_ema`'s continuous inner products exact."""
    if not emas:
        return emas
    t = t.astype(jnp.float32)
    rate = -jnp.expm1((gammas + 1.0) * jnp.log1p(-1.0 / t))
    return tuple(_ema(e, params, 1.0 - rate[i]) for i, e in enumerate(emas))


class EMASnapshot(NamedTuple):
    """A power-function EMA ``params`` with exponent ``gamma`` at training step ``step``."""

    step: int
    gamma: float
    params: Any


def _profile_dots(t_a, g_a, t_b, g_b):
    r""":math:`\int_0^\infty p_a p_b\,d\tau` for :math:`p(\tau) = (\gamma + 1)\tau^\gamma /
    t^{\gamma + 1}` on :math:`[0, t]` (in logs, so large exponents do not overflow)."""
    m = np.minimum(t_a, t_b)
    log = (
        np.log1p(g_a) + np.log1p(g_b) - np.log(g_a + g_b + 1) + (g_a + g_b + 1) * np.log(m)
        - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b)
    )  # fmt: skip
    return np.exp(log)


def posthoc_ema_weights(steps, gammas, sigma_rel: float, step: int | None = None) -> np.ndarray:
    r"""Coefficients :math:`x` with :math:`\sum_i x_i p_i \approx p^*`: snapshot profiles
    :math:`p_i` (``steps[i]``, ``gammas[i]``) combined into the profile of relative width
    ``sigma_rel`` ending at ``step`` (default: the last snapshot).

    Least squares in :math:`L^2`, :math:`\min_x \|\sum_i x_i p_i - p^*\|^2` with the closed-form
    inner products of power functions (Karras et al. 2024, App. C.2), under the constraint
    :math:`\sum_i x_i = 1` so that the result is a weighted average (a constant is reproduced
    exactly). Times are rescaled so that ``step`` is 1.
    """
    t = np.asarray(steps, np.float64)
    g = np.asarray(gammas, np.float64)
    if t.ndim != 1 or t.shape != g.shape or t.size == 0 or np.any(t < 1):
        raise ValueError(f"need matching 1-D steps >= 1 and gammas; got {t} and {g}.")
    step = float(t.max() if step is None else step)
    t, target = t / step, sigma_rel_to_gamma(sigma_rel)
    gram = _profile_dots(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = _profile_dots(t, g, 1.0, target)
    n = t.size
    kkt = np.block([[gram, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    x = np.linalg.lstsq(kkt, np.append(rhs, 1.0), rcond=None)[0]
    return x[:n]


def posthoc_ema(snapshots, sigma_rel: float, *, step: int | None = None):
    r"""The EMA of relative width ``sigma_rel`` at ``step``, reconstructed from snapshots.

    Post-hoc EMA (Karras et al. 2024, Sec. 3): training tracks power-function EMAs of two widths
    and saves them periodically; any other width is a linear combination of the snapshots,
    :math:`\hat\theta^* = \sum_i x_i\hat\theta_i` with :math:`x` from :func:`posthoc_ema_weights`.

    Args:
        snapshots: :class:`EMASnapshot` s (``step``, ``gamma``, ``params``), e.g. from
            :func:`jaxdiff.checkpoint.load_ema_snapshots`.
        sigma_rel: the relative width wanted (EDM2 found 0.05 to 0.15 best for most models).
        step: where the reconstructed average ends (default: the last snapshot's step).

    Returns:
        a parameter tree like the snapshots' (same dtypes), summed in float64.

    Example:
        >>> params = posthoc_ema(load_ema_snapshots(run / "ema_snapshots", abstract), 0.08)  # doctest: +SKIP
    """
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("posthoc_ema needs at least one snapshot.")
    x = posthoc_ema_weights(
        [s.step for s in snapshots], [s.gamma for s in snapshots], sigma_rel, step
    )

    def combine(*leaves):
        total = sum(w * np.asarray(a, np.float64) for w, a in zip(x, leaves, strict=True))
        return jnp.asarray(total.astype(np.asarray(leaves[0]).dtype))

    return jax.tree.map(combine, *[s.params for s in snapshots])


# ----------------------------------------------------------------------------------------------
# Persistent compilation cache
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def persistent_compilation_cache(directory, *, min_compile_time_s: float | None = None):
    """Use JAX's persistent compilation cache (``jax_compilation_cache_dir``) inside the block.

    Compiled programs are written to ``directory`` and loaded from it by any later process with
    the same program, JAX version and flags: a resumed or repeated run skips compilation. The
    previous setting is restored on exit.

    Args:
        directory: the cache folder (created if needed), or ``None`` for no cache in the block.
        min_compile_time_s: cache only programs that took at least this long to compile (JAX's
            default, 1 s, when ``None``).

    Example:
        >>> with persistent_compilation_cache("runs/cache"):   # doctest: +SKIP
        ...     state, metrics = train_step(state, batch)
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    if directory is not None:
        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
    jax.config.update(names[0], None if directory is None else str(directory))
    if min_compile_time_s is not None:
        jax.config.update(names[1], float(min_compile_time_s))
    cc.reset_cache()
    try:
        yield directory
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()
