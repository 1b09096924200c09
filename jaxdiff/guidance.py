r"""Guidance: denoiser transforms that return denoisers.

Every transform here takes denoisers ``denoise(x, t) -> x0_hat`` and returns one, so a guided
model runs through every sampler of :mod:`jaxdiff.samplers` and every solver of :mod:`jaxdiff.sde`
unchanged. The transforms are ``equinox`` modules whose guidance scale is an array leaf: under
``jaxdiff.sample`` (an ``eqx.filter_jit``) it is traced, so changing the scale never recompiles.

**Classifier-free guidance** (Ho & Salimans 2022, Eq. 6) extrapolates from the unconditional to
the conditional prediction,

.. math:: \hat x_0^w = \hat x_0^{u} + w\,(\hat x_0^{c} - \hat x_0^{u}),

``w = 1`` being the conditional model and ``w = 0`` the unconditional one. Since
:math:`\hat\epsilon`, :math:`\hat x_0` and the score are affine in each other with coefficients
that depend only on :math:`(x, t)`, the same combination written in eps, x0 or score space gives
the same guided model. An optional guidance interval (Kynkäänniemi et al. 2024, "Applying
Guidance in a Limited Interval Improves Sample and Distribution Quality") applies ``w`` only for
:math:`t \in [t_{lo}, t_{hi}]` and the conditional model (``w = 1``) elsewhere.

**Classifier guidance** (Dhariwal & Nichol 2021; Song et al. 2021, Sec. 5) adds the gradient of
a noise-conditional classifier to the score, :math:`\nabla\log p_t(x) + w\nabla\log p_t(y\mid x)`;
through Tweedie's formula :math:`\hat x_0 = (x + \sigma_t^2\nabla\log p_t(x))/\alpha_t` this is

.. math:: \hat x_0^w = \hat x_0 + w\,\frac{\sigma_t^2}{\alpha_t}\,\nabla_x\log p_t(y \mid x).

With ``w = 1`` and the exact classifier, Bayes' rule makes this the exact class-conditional
denoiser :math:`E[x_0 \mid x_t, y]`.

**Thresholding** (Saharia et al. 2022, "Imagen", Sec. 2.3) keeps :math:`\hat x_0` in the data
range at large guidance scales.

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> from jaxdiff import guidance
    >>> vp = jaxdiff.VP()
    >>> mix = jaxdiff.analytic.GaussianMixture(jnp.array([[-2.0, 0], [2, 0]]), jnp.array([0.5, 0.5]))
    >>> y = jnp.zeros(4, int)
    >>> log_prob = lambda x, t: mix.class_log_prob(vp, x, t, y)
    >>> guided = guidance.classifier(vp, mix.denoiser(vp), log_prob, scale=2.0)
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> jaxdiff.sample(jaxdiff.samplers.ddim(vp), guided, x_T, jaxdiff.schedules.uniform(vp, 20)).x.shape
    (4, 2)
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import as_time, bcast, check_batch, is_concrete, tree_hash
from jaxdiff.processes import Process

__all__ = [
    "ClassifierFree",
    "ClassifierFreeLabels",
    "ClassifierGuidance",
    "LogitsLogProb",
    "DynamicThreshold",
    "StaticThreshold",
    "classifier_free",
    "classifier_free_labels",
    "classifier",
    "log_prob_from_logits",
    "dynamic_threshold",
    "static_threshold",
]


# --- input checks ------------------------------------------------------------------------------
def _check_callable(fn, name):
    if not callable(fn):
        raise TypeError(f"{name} must be a denoiser-like callable (x, t) -> array; got {type(fn)}.")


def _as_array(value, name):
    """A real scalar or vector as a strongly typed float array (one jit cache key per shape)."""
    arr = jnp.asarray(value)
    if arr.dtype == bool or not jnp.issubdtype(arr.dtype, jnp.number):
        raise ValueError(f"{name} must be real; got dtype {arr.dtype}.")
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise ValueError(f"{name} must be real; got dtype {arr.dtype}.")
    return jnp.asarray(arr, dtype=jnp.result_type(float))


def _as_scale(scale, name="scale"):
    """The guidance scale as an array leaf (traced under jit); a scalar or shape ``(batch,)``."""
    scale = _as_array(scale, name)
    if scale.ndim > 1:
        raise ValueError(
            f"{name} must be a scalar or have shape (batch,); got shape {scale.shape}."
        )
    return scale


def _as_interval(interval):
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"interval must be a pair (t_lo, t_hi); got {interval!r}.")
    lo, hi = (_as_array(v, "interval") for v in interval)
    if lo.ndim or hi.ndim:
        raise ValueError(f"interval ends must be scalars; got shapes {lo.shape} and {hi.shape}.")
    if is_concrete(lo, hi) and not float(lo) < float(hi):
        raise ValueError(f"interval must satisfy t_lo < t_hi; got ({float(lo)}, {float(hi)}).")
    return lo, hi


def _times(x, t):
    """``t`` as an array of shape ``(batch,)`` in the dtype of ``x``."""
    check_batch(x, t)
    return jnp.broadcast_to(as_time(t, x), x.shape[:1])


def _scale_at(scale, interval, x, t):
    """Per-example guidance weight: ``scale`` inside the interval, 1 (conditional) outside.

    Checks at trace time that ``t`` and a per-example ``scale`` match the batch of ``x``.
    """
    t = _times(x, t)
    if scale.ndim == 1 and scale.shape[0] != x.shape[0]:
        raise ValueError(
            f"scale must be a scalar or have shape (batch,) = ({x.shape[0]},) matching "
            f"x.shape={x.shape}; got scale.shape={scale.shape}."
        )
    w = jnp.broadcast_to(scale.astype(x.dtype), x.shape[:1])
    if interval is None:
        return w
    inside = (t >= interval[0].astype(t.dtype)) & (t <= interval[1].astype(t.dtype))
    return jnp.where(inside, w, jnp.ones_like(w))


class _Transform(eqx.Module):
    """Base of the denoiser transforms: equal settings compare and hash equal.

    Numbers (scales, interval ends, thresholds) are array leaves, converted on construction, so
    ``eqx.filter_jit`` (``jaxdiff.sample``) traces them: a new value never recompiles.
    """

    __hash__ = tree_hash


# --- classifier-free guidance ------------------------------------------------------------------
class ClassifierFree(_Transform):
    r"""Classifier-free guided denoiser :math:`\hat x_0^u + w(\hat x_0^c - \hat x_0^u)`.

    Built by :func:`classifier_free`; ``scale`` is an array leaf (traced, no recompilation).
    """

    denoise_cond: Callable
    denoise_uncond: Callable
    scale: jax.Array = eqx.field(converter=_as_scale)
    interval: tuple[jax.Array, jax.Array] | None = eqx.field(converter=_as_interval, default=None)

    def __call__(self, x, t):
        w = _scale_at(self.scale, self.interval, x, t)
        return _combine(self.denoise_cond(x, t), self.denoise_uncond(x, t), w)


def _combine(x0_c, x0_u, w):
    r""":math:`\hat x_0^u + w(\hat x_0^c - \hat x_0^u)` with a per-example ``w``."""
    return x0_u + bcast(w, x0_u) * (x0_c - x0_u)


def classifier_free(
    denoise_cond: Callable, denoise_uncond: Callable, scale, *, interval=None
) -> ClassifierFree:
    r"""Classifier-free guidance (Ho & Salimans 2022): :math:`\hat x_0^u + w(\hat x_0^c - \hat x_0^u)`.

    The combination is affine in the prediction, so guiding in eps, x0 or score space is the same.

    Args:
        denoise_cond: the conditional denoiser (condition closed over, e.g. a
            ``jax.tree_util.Partial`` of the network with labels ``y``).
        denoise_uncond: the unconditional one (the same network with the null label).
        scale: guidance weight ``w``: 1 is conditional, 0 unconditional, > 1 guided. A scalar or
            shape ``(batch,)``; traced, so a new value does not recompile a sampler.
        interval: optional ``(t_lo, t_hi)`` in the process's time (the noise level for ``EDM``):
            guidance applies for ``t_lo <= t <= t_hi`` only, the conditional model elsewhere
            (Kynkäänniemi et al. 2024).

    Example:
        >>> guided = classifier_free(cond, uncond, 3.0, interval=(0.3, 5.0))  # doctest: +SKIP
        >>> jaxdiff.sample(jaxdiff.samplers.heun(jaxdiff.EDM()), guided, x_T, ts)  # doctest: +SKIP
    """
    _check_callable(denoise_cond, "denoise_cond")
    _check_callable(denoise_uncond, "denoise_uncond")
    return ClassifierFree(denoise_cond, denoise_uncond, scale, interval)


class ClassifierFreeLabels(_Transform):
    r"""Classifier-free guidance of a label-conditional denoiser, one batched call per step.

    Built by :func:`classifier_free_labels`: evaluates ``denoise_y`` once on the doubled batch
    ``[x, x]`` with labels ``[y, null]``, then combines as :class:`ClassifierFree`.
    """

    denoise_y: Callable
    y: jax.Array = eqx.field(converter=jnp.asarray)
    null_label: jax.Array = eqx.field(converter=jnp.asarray)
    scale: jax.Array = eqx.field(converter=_as_scale)
    interval: tuple[jax.Array, jax.Array] | None = eqx.field(converter=_as_interval, default=None)

    def __call__(self, x, t):
        b = x.shape[0]
        w = _scale_at(self.scale, self.interval, x, t)
        t2 = jnp.concatenate([_times(x, t)] * 2)
        y = jnp.broadcast_to(self.y, (b,) + self.y.shape[1:])
        labels = jnp.concatenate([y, jnp.broadcast_to(self.null_label, y.shape).astype(y.dtype)])
        x0 = self.denoise_y(jnp.concatenate([x, x]), t2, labels)
        return _combine(x0[:b], x0[b:], w)


def classifier_free_labels(
    denoise_y: Callable, y, scale, *, null_label, interval=None
) -> ClassifierFreeLabels:
    r"""Classifier-free guidance for a network trained with label dropout to a null class.

    ``denoise_y(x, t, y) -> x0_hat`` is a label-conditional denoiser (``t`` arrives with shape
    ``(batch,)``); the conditional and unconditional predictions come from one call on a doubled
    batch. ``y``: labels of shape ``(batch,)`` (or a scalar for all); ``null_label``: the label
    the network saw when the condition was dropped. Other arguments as :func:`classifier_free`.

    Example:
        >>> denoise_y = lambda x, t, y: jaxdiff.denoiser(partial(net, y=y), vp)(x, t)  # doctest: +SKIP
        >>> guided = classifier_free_labels(denoise_y, labels, 2.0, null_label=10)  # doctest: +SKIP
    """
    _check_callable(denoise_y, "denoise_y")
    y = jnp.asarray(y)
    if y.ndim > 1:
        raise ValueError(f"y must be a scalar label or have shape (batch,); got shape {y.shape}.")
    null = jnp.asarray(null_label, y.dtype)
    return ClassifierFreeLabels(denoise_y, y, null, scale, interval)


# --- classifier guidance -----------------------------------------------------------------------
class ClassifierGuidance(_Transform):
    r"""Classifier-guided denoiser :math:`\hat x_0 + w\,\sigma_t^2/\alpha_t\,\nabla_x\log p_t(y\mid x)`.

    Built by :func:`classifier`; ``scale`` is an array leaf (traced, no recompilation).
    """

    process: Process
    denoise: Callable
    log_prob: Callable
    scale: jax.Array = eqx.field(converter=_as_scale)

    def grad_log_prob(self, x, t):
        r""":math:`\nabla_x\log p_t(y\mid x)` per example (the gradient of the batch sum)."""

        def total(z):
            lp = self.log_prob(z, t)
            if jnp.shape(lp) != z.shape[:1]:
                raise ValueError(
                    f"log_prob(x, t) must return shape (batch,) = {z.shape[:1]}; got "
                    f"{jnp.shape(lp)}. Select the log-probability of the target class per example."
                )
            return jnp.sum(lp)

        return jax.grad(total)(x)

    def __call__(self, x, t):
        # the guided score s + w grad log p(y|x), turned back into a denoiser by Tweedie's formula
        w = bcast(_scale_at(self.scale, None, x, t), x)
        x0 = self.denoise(x, t)
        score = self.process.score_from_x0(x, x0, t) + w * self.grad_log_prob(x, t)
        return self.process.x0_from_score(x, score, t).astype(x0.dtype)


def classifier(
    process: Process, denoise: Callable, log_prob: Callable, scale
) -> ClassifierGuidance:
    r"""Classifier guidance (Dhariwal & Nichol 2021): guided score :math:`\nabla\log p_t(x) +
    w\nabla\log p_t(y\mid x)`, returned as a denoiser.

    .. math:: \hat x_0^w(x, t) = \hat x_0(x, t) + w\,\frac{\sigma_t^2}{\alpha_t}\,
        \nabla_x\log p_t(y\mid x)

    Args:
        process: the forward process of ``denoise``.
        denoise: the (unconditional) denoiser.
        log_prob: ``log_prob(x, t) -> (batch,)``, a noise-conditional classifier's
            :math:`\log p_t(y\mid x)` for the target labels (closed over; see
            :func:`log_prob_from_logits`). Its gradient is taken with ``jax.grad`` of the batch
            sum, which is the per-example gradient since examples are independent.
        scale: guidance weight ``w`` (scalar or ``(batch,)``; traced). ``w = 1`` with the exact
            classifier gives the exact class-conditional denoiser.

    Example:
        >>> log_prob = lambda x, t: mix.class_log_prob(vp, x, t, y)  # doctest: +SKIP
        >>> guided = classifier(vp, mix.denoiser(vp), log_prob, 1.0)  # doctest: +SKIP
    """
    if not isinstance(process, Process):
        raise TypeError(f"process must be a jaxdiff Process (e.g. jaxdiff.VP()); got {process!r}.")
    _check_callable(denoise, "denoise")
    _check_callable(log_prob, "log_prob")
    return ClassifierGuidance(process, denoise, log_prob, scale)


class LogitsLogProb(_Transform):
    r""":math:`\log p_t(y\mid x) = \mathrm{log\_softmax}(\mathrm{logits}(x, t))_y` per example."""

    logits_fn: Callable
    y: jax.Array

    def __call__(self, x, t):
        logp = jax.nn.log_softmax(self.logits_fn(x, _times(x, t)), axis=-1)
        y = jnp.broadcast_to(self.y, x.shape[:1])
        return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def log_prob_from_logits(logits_fn: Callable, y) -> LogitsLogProb:
    """The ``log_prob`` of :func:`classifier` from a noise-conditional classifier.

    ``logits_fn(x, t) -> (batch, n_classes)`` (``t`` arrives with shape ``(batch,)``); ``y``
    integer labels, a scalar or shape ``(batch,)``.
    """
    _check_callable(logits_fn, "logits_fn")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim > 1:
        raise ValueError(
            f"y must be integer labels of shape () or (batch,); got {y.dtype}{y.shape}."
        )
    return LogitsLogProb(logits_fn, y)


# --- thresholding ------------------------------------------------------------------------------
def _flat_abs(x):
    return jnp.abs(x).reshape(x.shape[0], -1)


def _as_percentile(value):
    if is_concrete(value) and not 0.0 < float(value) <= 1.0:
        raise ValueError(f"percentile must lie in (0, 1] (a quantile, 0.995); got {value}.")
    return _as_array(value, "percentile")


def _as_max_value(value):
    if is_concrete(value) and not float(value) > 0:
        raise ValueError(f"max_value must be positive (the data range bound); got {value}.")
    return _as_array(value, "max_value")


class DynamicThreshold(_Transform):
    r"""Dynamic thresholding of :math:`\hat x_0` (Imagen); built by :func:`dynamic_threshold`."""

    denoise: Callable
    percentile: jax.Array = eqx.field(converter=_as_percentile)
    max_value: jax.Array = eqx.field(converter=_as_max_value)

    def __call__(self, x, t):
        x0 = self.denoise(x, t)
        m = self.max_value.astype(x0.dtype)
        s = jnp.quantile(_flat_abs(x0), self.percentile.astype(x0.dtype), axis=1)
        s = bcast(jnp.maximum(s, m), x0)
        return jnp.clip(x0, -s, s) * (m / s)


def dynamic_threshold(denoise: Callable, percentile=0.995, max_value=1.0) -> DynamicThreshold:
    r"""Dynamic thresholding (Saharia et al. 2022, "Imagen", Sec. 2.3), per example:

    .. math:: s = \max\big(\mathrm{quantile}_p(|\hat x_0|),\, m\big),\qquad
        \hat x_0 \leftarrow \mathrm{clip}(\hat x_0, -s, s)\,\frac{m}{s}

    with :math:`m` = ``max_value`` (1 for data in [-1, 1], Imagen's setting). The output lies in
    :math:`[-m, m]`; a prediction already inside it is unchanged. Compose it around a guided
    denoiser: ``dynamic_threshold(classifier_free(cond, uncond, 7.0))``.
    """
    _check_callable(denoise, "denoise")
    return DynamicThreshold(denoise, percentile, max_value)


class StaticThreshold(_Transform):
    r"""Static thresholding :math:`\mathrm{clip}(\hat x_0, -m, m)`; built by :func:`static_threshold`."""

    denoise: Callable
    max_value: jax.Array = eqx.field(converter=_as_max_value)

    def __call__(self, x, t):
        x0 = self.denoise(x, t)
        m = self.max_value.astype(x0.dtype)
        return jnp.clip(x0, -m, m)


def static_threshold(denoise: Callable, max_value=1.0) -> StaticThreshold:
    r"""Static thresholding (Ho et al. 2020; Saharia et al. 2022): clip :math:`\hat x_0` to
    :math:`[-m, m]`, ``m = max_value``."""
    _check_callable(denoise, "denoise")
    return StaticThreshold(denoise, max_value)
