r"""What a network predicts, and the denoiser that everything downstream uses.

With :math:`x = \alpha_t x_0 + \sigma_t\epsilon` the targets are related by

.. math::
    \hat x_0 = \frac{x - \sigma_t\hat\epsilon}{\alpha_t},\qquad
    \nabla\log p_t(x) \approx -\frac{\hat\epsilon}{\sigma_t},\qquad
    v = \alpha_t\epsilon - \sigma_t x_0 \;\Rightarrow\; \hat x_0 = \frac{\alpha_t x - \sigma_t v}
    {\alpha_t^2 + \sigma_t^2},

and the flow velocity :math:`u = \dot\alpha_t x_0 + \dot\sigma_t\epsilon` (flow matching; for
rectified flow :math:`u = \epsilon - x_0`). EDM preconditioning (Karras et al. 2022, Table 1)
applies to any process through the scaled variable :math:`x/\alpha_t = x_0 + (\sigma_t/\alpha_t)
\epsilon`, whose noise level is :math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-\lambda/2}`.

Example:
    >>> import jax.numpy as jnp, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> net = lambda x, t: jnp.zeros_like(x)          # predicts eps = 0
    >>> denoise = jaxdiff.denoiser(net, vp, prediction="eps")
    >>> denoise(jnp.ones((2, 3)), 0.5).shape
    (2, 3)
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import as_time, bcast, check_batch, check_like_x, in_dtype_of, tree_hash
from jaxdiff.processes import Process, time_derivative

__all__ = [
    "PREDICTIONS",
    "to_x0",
    "from_x0",
    "convert",
    "eps_error_scale",
    "edm_preconditioning",
    "Denoiser",
    "denoiser",
    "score",
    "eps",
]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def _check_prediction(prediction: str, allowed=PREDICTIONS):
    if prediction not in allowed:
        raise ValueError(
            f"Unknown prediction {prediction!r}; choose one of {', '.join(map(repr, allowed))}."
        )


def _coeffs(process: Process, x, t):
    r""":math:`\alpha_t, \sigma_t` and their time derivatives, broadcast against ``x``."""
    t = as_time(t, x)
    coeffs = (process.alpha(t), process.sigma(t))
    coeffs += tuple(time_derivative(fn, t) for fn in (process.alpha, process.sigma))
    return tuple(bcast(c, x) for c in coeffs)


def to_x0(process: Process, prediction: str, x, t, out):
    r"""Convert a network output of kind ``prediction`` at ``(x, t)`` into :math:`\hat x_0`.

    ``"eps"`` and ``"score"`` are the process's own conversions (``process.x0_from_eps``,
    ``process.x0_from_score``); ``"v"`` and ``"flow"`` solve the 2x2 system
    :math:`x = \alpha_t x_0 + \sigma_t\epsilon`, ``out`` = its combination.
    """
    _check_prediction(prediction)
    if prediction == "x0":
        return out
    if prediction == "eps":
        return process.x0_from_eps(x, out, t)
    if prediction == "score":
        return process.x0_from_score(x, out, t)
    a, s, da, ds = _coeffs(process, x, t)
    if prediction == "v":
        return in_dtype_of((a * x - s * out) / (a**2 + s**2), x, out)
    return in_dtype_of((ds * x - s * out) / (a * ds - s * da), x, out)  # u = a' x0 + s' e


def from_x0(process: Process, prediction: str, x, t, x0):
    r"""Convert :math:`\hat x_0` at ``(x, t)`` into the target of kind ``prediction``.

    ``"eps"`` and ``"score"`` are ``process.eps_from_x0`` and ``process.score_from_x0``;
    ``"v"`` = :math:`\alpha_t\hat\epsilon - \sigma_t\hat x_0`, ``"flow"`` =
    :math:`\dot\alpha_t\hat x_0 + \dot\sigma_t\hat\epsilon`.
    """
    _check_prediction(prediction)
    if prediction == "x0":
        return x0
    if prediction == "score":
        return process.score_from_x0(x, x0, t)
    e = process.eps_from_x0(x, x0, t)
    if prediction == "eps":
        return e
    a, s, da, ds = _coeffs(process, x, t)
    target = a * e - s * x0 if prediction == "v" else da * x0 + ds * e
    return in_dtype_of(target, x, x0)


def convert(process: Process, x, t, out, *, source: str, target: str):
    """Convert a prediction of kind ``source`` into kind ``target`` (through :math:`\\hat x_0`)."""
    return from_x0(process, target, x, t, to_x0(process, source, x, t, out))


def eps_error_scale(process: Process, prediction: str, t):
    r"""How an error in ``prediction`` shows in the noise prediction: :math:`k(t)` with
    :math:`\|\Delta\hat\epsilon\|^2 = k(t)\,\|\Delta\,\mathrm{prediction}\|^2` at fixed :math:`(x, t)`.

    Every conversion of this module is affine in the prediction with a scalar slope, so one
    number per time carries a weighted squared error from one prediction to another:

    .. math:: k_\epsilon = 1,\quad k_{score} = \sigma_t^2,\quad k_{x_0} = \frac{\alpha_t^2}
        {\sigma_t^2},\quad k_v = \frac{\alpha_t^2}{(\alpha_t^2 + \sigma_t^2)^2},\quad
        k_{flow} = \frac{\alpha_t^2}{(\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t)^2}.

    Used by the loss weightings of :mod:`jaxdiff.losses` (Kingma & Gao 2023, "Understanding
    Diffusion Objectives", express every weighting on the eps error in the same way).

    Example:
        >>> import jaxdiff
        >>> vp = jaxdiff.VP()
        >>> k = eps_error_scale(vp, "x0", 0.5)     # alpha^2 / sigma^2, the SNR
        >>> bool(abs(k - (vp.alpha(0.5) / vp.sigma(0.5)) ** 2) < 1e-6)
        True
    """
    _check_prediction(prediction)
    t = as_time(t)
    if prediction == "eps":
        return jnp.ones_like(t)
    a, s = process.alpha(t), process.sigma(t)
    if prediction == "score":
        return s**2
    if prediction == "x0":
        return (a / s) ** 2
    if prediction == "v":
        return (a / (a**2 + s**2)) ** 2
    da, ds = time_derivative(process.alpha, t), time_derivative(process.sigma, t)
    return (a / (a * ds - s * da)) ** 2


def edm_preconditioning(process: Process, t, sigma_data=0.5):
    r"""EDM's ``(c_skip, c_out, c_in, c_noise)`` for any process (Karras et al. 2022, Table 1).

    With :math:`\tilde\sigma = \sigma_t/\alpha_t`: :math:`c_{skip} = \sigma_d^2/(\tilde\sigma^2 +
    \sigma_d^2)`, :math:`c_{out} = \tilde\sigma\sigma_d/\sqrt{\tilde\sigma^2 + \sigma_d^2}`,
    :math:`c_{in} = 1/\sqrt{\tilde\sigma^2 + \sigma_d^2}`, :math:`c_{noise} = \tfrac14\log\tilde\sigma`.
    The denoiser is :math:`c_{skip}\,x/\alpha_t + c_{out} F(c_{in}\,x/\alpha_t, c_{noise})`.
    """
    sig = process.noise_level(t)
    norm = jnp.sqrt(sig**2 + sigma_data**2)
    return sigma_data**2 / norm**2, sig * sigma_data / norm, 1.0 / norm, 0.25 * jnp.log(sig)


class Denoiser(eqx.Module):
    """A network turned into a denoiser ``denoise(x, t) -> x0_hat``; an immutable pytree.

    Built by :func:`denoiser`. The network always receives a time of shape ``(batch,)``: ``t``
    itself, or EDM's ``c_noise`` when ``prediction="edm"`` (times and coefficients in at least
    float32), and an input in the dtype of ``x``; ``x0_hat`` comes back in the dtype of ``x``.
    A network output not shaped like ``x`` is a ``ValueError`` at trace time that names the
    denoiser and both shapes (a ``(batch, 1)`` output never broadcasts silently). ``sigma_data``
    is an array leaf, so a new value does not recompile ``jaxdiff.sample``.
    """

    apply_fn: Callable
    process: Process
    prediction: str = eqx.field(static=True, default="eps")
    sigma_data: jax.Array = eqx.field(converter=jnp.asarray, default=0.5)

    __hash__ = tree_hash  # equal settings hash equal (sigma_data is an array leaf: traced)

    def __call__(self, x, t):
        check_batch(x, t)
        t = jnp.broadcast_to(as_time(t, x), x.shape[:1])
        if self.prediction != "edm":
            return in_dtype_of(to_x0(self.process, self.prediction, x, t, self._net(x, t)), x)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(self.process, t, self.sigma_data)
        xs = x / bcast(self.process.alpha(t), x)
        out = self._net(in_dtype_of(bcast(c_in, x) * xs, x), c_noise)
        return in_dtype_of(bcast(c_skip, x) * xs + bcast(c_out, x) * out, x)

    def _net(self, x, t):
        """The network's output, checked at trace time to be shaped like its input."""
        name = getattr(self.apply_fn, "__qualname__", type(self.apply_fn).__name__)
        return check_like_x(
            self.apply_fn(x, t),
            x,
            f"denoiser: the network {name} (prediction={self.prediction!r})",
            " Check the network's output channels (an output of shape (batch, 1) would "
            "broadcast silently).",
        )


def denoiser(apply_fn: Callable, process: Process, prediction: str = "eps", *, sigma_data=0.5):
    """Turn a network ``apply_fn(x, t) -> output`` into ``denoise(x, t) -> x0_hat``.

    Args:
        apply_fn: the network; ``t`` arrives with shape ``(batch,)``.
        process: the forward process the network was trained with.
        prediction: one of ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"flow"``, ``"edm"``.
        sigma_data: data standard deviation for ``"edm"`` preconditioning.
    """
    _check_prediction(prediction, PREDICTIONS + ("edm",))
    return Denoiser(apply_fn, process, prediction, sigma_data)


class _Adapter(eqx.Module):
    process: Process
    denoise: Callable
    kind: str = eqx.field(static=True)

    def __call__(self, x, t):
        return from_x0(self.process, self.kind, x, t, self.denoise(x, t))


def score(process: Process, denoise: Callable):
    r"""Score from a denoiser (Tweedie): :math:`\nabla\log p_t(x) = (\alpha_t\hat x_0 - x)/\sigma_t^2`."""
    return _Adapter(process, denoise, "score")


def eps(process: Process, denoise: Callable):
    r"""Noise prediction from a denoiser: :math:`\hat\epsilon = (x - \alpha_t\hat x_0)/\sigma_t`."""
    return _Adapter(process, denoise, "eps")
