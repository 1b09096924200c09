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

import functools
import os
from collections.abc import Callable
from typing import Any

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
]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; an immutable pytree (checkpointed as is).

    Attributes:
        step: number of updates applied (int32 scalar).
        params: trainable parameters (``nnx.State`` of ``nnx.Param``).
        opt_state: optax state.
        ema_params: exponential moving average of ``params``.
        key: raw PRNG key data (``jax.random.key_data``); step ``k`` draws from
            ``fold_in(key, k)``, so a restored run continues with the same randomness.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    key: jax.Array


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


def init_train_state(model: nnx.Module, optimizer, *, key, mesh=None):
    """Split ``model`` and build the initial :class:`TrainState`.

    Args:
        model: a Flax NNX module.
        optimizer: an optax transformation (e.g. :func:`make_optimizer`).
        key: PRNG key for the training randomness (times, noise, dropout, label dropout).
        mesh: when given, the state is replicated over it.

    Returns:
        ``(state, graphdef, rest)``: the state and the static parts that
        :func:`make_train_step` and :func:`model_fn` need.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = _copy(params)  # the state owns its buffers (donation must not delete the model's)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=_copy(params),
        key=jax.random.key_data(key),
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

    Returns:
        ``train_step``; ``metrics`` holds ``loss``, ``grad_norm`` (before clipping), ``lr`` and
        ``finite``. A non-finite step returns the input state unchanged.
    """
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}.")
    if p_uncond > 0 and null_class is None:
        raise ValueError("p_uncond > 0 needs null_class (the network's num_classes).")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}.")
    bind = _default_bind if bind is None else bind
    rest = nnx.State({}) if rest is None else rest

    def objective(params, batch, key):
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        model = nnx.merge(graphdef, params, rest, copy=True)
        y = batch.get("y")
        if y is not None and p_uncond > 0:
            y = _drop_labels(y, p_uncond, null_class, k_label)
        return jnp.mean(loss_fn(bind(model, y, k_drop), process, batch["x"], key=k_loss))

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        loss, grads = jax.value_and_grad(objective)(state.params, batch, key)
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
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=_learning_rate(opt_state), finite=finite)
        return new, metrics

    mesh = make_mesh() if mesh is None else mesh
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
