r"""Exact targets: distributions whose marginal score under any process is known in closed form.

If :math:`x_0 \sim p_0` and :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`, then

- a Gaussian :math:`\mathcal N(m, C)` stays Gaussian: :math:`p_t = \mathcal N(\alpha_t m,
  \alpha_t^2 C + \sigma_t^2 I)`;
- a mixture of Gaussians stays a mixture with the same weights and moved components;
- an empirical distribution :math:`\frac1N\sum_i\delta_{y_i}` becomes a mixture of
  :math:`\mathcal N(\alpha_t y_i, \sigma_t^2 I)`, whose optimal denoiser is a softmax-weighted mean
  of the data, one mean-shift step with bandwidth :math:`\sigma_t/\alpha_t` (Chen et al. 2023, "A
  Geometric Perspective on Diffusion Models", Sec. 4).

The denoiser is :math:`E[x_0 \mid x_t]` and the score follows from Tweedie's formula,
:math:`\nabla\log p_t(x) = (\alpha_t E[x_0\mid x] - x)/\sigma_t^2`.

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> mix = jaxdiff.analytic.GaussianMixture(jnp.array([[-2.0, 0], [2, 0]]), jnp.array([0.3, 0.3]),
    ...                                        jnp.array([0.5, 0.5]))
    >>> denoise = mix.denoiser(jaxdiff.VP())
    >>> denoise(jnp.zeros((3, 2)), 0.5).shape
    (3, 2)
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import as_time, check_batch
from jaxdiff.processes import Process

__all__ = ["Gaussian", "GaussianMixture", "Empirical", "mean_shift"]


def _per_example(process: Process, x, t):
    """``alpha_t`` and ``sigma_t`` as arrays of shape ``(batch,)``.

    Every method of the targets goes through here: a ``t`` that is neither a scalar nor of
    shape ``(batch,)`` is a ``ValueError`` naming ``t`` (never a silent broadcast).
    """
    check_batch(x, t)
    t = jnp.broadcast_to(as_time(t, x), x.shape[:1])
    return process.alpha(t), process.sigma(t)


class _Target(eqx.Module):
    """Shared methods: subclasses give ``posterior_mean`` and ``logp``."""

    def posterior_mean(self, process: Process, x, t):
        raise NotImplementedError

    def logp(self, process: Process, x, t):
        raise NotImplementedError

    def denoiser(self, process: Process):
        r"""The optimal denoiser :math:`D(x, t) = E[x_0 \mid x_t = x]` (a pytree, jit-friendly)."""
        return _Bound(self, process, "posterior_mean")

    def score(self, process: Process):
        r"""The marginal score :math:`\nabla_x\log p_t(x)`, from Tweedie's formula."""
        return _Bound(self, process, "score_at")

    def score_at(self, process: Process, x, t):
        """Tweedie's formula ``process.score_from_x0`` applied to :meth:`posterior_mean`."""
        return process.score_from_x0(x, self.posterior_mean(process, x, t), t)


class _Bound(eqx.Module):
    target: _Target
    process: Process
    method: str = eqx.field(static=True)

    def __call__(self, x, t):
        return getattr(self.target, self.method)(self.process, x, t)


class Gaussian(_Target):
    r"""A Gaussian :math:`\mathcal N(m, C)` on vectors of shape ``(d,)``.

    Under the process, with :math:`C = U\,\mathrm{diag}(c)\,U^\top` and
    :math:`v = \alpha_t^2 c + \sigma_t^2`, :math:`y = U^\top(x - \alpha_t m)`:
    :math:`E[x_0\mid x] = m + U(\alpha_t c\, y / v)`.
    """

    mean: jax.Array
    cov: jax.Array
    evals: jax.Array
    evecs: jax.Array

    def __init__(self, mean, cov):
        mean, cov = jnp.asarray(mean), jnp.asarray(cov)
        if mean.ndim != 1 or cov.shape != mean.shape * 2:
            raise ValueError(
                f"Gaussian needs mean of shape (d,) and cov of shape (d, d); got {mean.shape} "
                f"and {cov.shape}."
            )
        self.mean, self.cov = mean, cov
        self.evals, self.evecs = jnp.linalg.eigh(cov)

    def _project(self, process, x, t):
        a, s = _per_example(process, x, t)
        v = a[:, None] ** 2 * self.evals + s[:, None] ** 2
        y = (x - a[:, None] * self.mean) @ self.evecs
        return a, v, y

    def posterior_mean(self, process, x, t):
        a, v, y = self._project(process, x, t)
        return self.mean + (a[:, None] * self.evals * y / v) @ self.evecs.T

    def logp(self, process, x, t):
        """Log density of :math:`p_t` at ``x``, shape ``(batch,)``."""
        _, v, y = self._project(process, x, t)
        return -0.5 * jnp.sum(y**2 / v + jnp.log(2 * math.pi * v), axis=-1)

    def sample(self, n, *, key, dtype=None):
        z = jax.random.normal(key, (n,) + self.mean.shape, dtype or self.mean.dtype)
        return self.mean + (z * jnp.sqrt(jnp.maximum(self.evals, 0))) @ self.evecs.T


class GaussianMixture(_Target):
    r"""A mixture :math:`\sum_k w_k\,\mathcal N(\mu_k, \mathrm{diag}(s_k^2))`.

    ``means`` has shape ``(k, d)``; ``scales`` (standard deviations) ``(k,)`` for isotropic or
    ``(k, d)`` for diagonal components; ``weights`` ``(k,)`` (normalized here). Component
    :math:`k` of :math:`p_t` is :math:`\mathcal N(\alpha_t\mu_k, \alpha_t^2 s_k^2 + \sigma_t^2)`.

    ``scales`` is stored as ``(k, d)`` either way; isotropic components (``scales`` given as
    ``(k,)``) take a matmul path: :math:`\|x - a\mu_k\|^2 = \|x\|^2 - 2a\,x\cdot\mu_k +
    a^2\|\mu_k\|^2` from one ``x @ means.T``, and the posterior mean
    :math:`\sum_k w_k[\mu_k + c_k(x - a\mu_k)]`, :math:`c_k = a s_k^2/(a^2 s_k^2 + \sigma^2)`,
    as :math:`w\mu + (\sum_k w_k c_k)\,x - a\,(w c)\mu`, never a ``(batch, k, d)`` array.
    """

    means: jax.Array
    scales: jax.Array
    weights: jax.Array
    isotropic: bool = eqx.field(static=True)

    def __init__(self, means, scales, weights=None):
        means = jnp.asarray(means)
        k = means.shape[0]
        scales = jnp.asarray(scales, means.dtype)
        weights = jnp.full((k,), 1.0 / k, means.dtype) if weights is None else jnp.asarray(weights)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (k, d); got {means.shape}.")
        if scales.shape not in ((k,), means.shape):
            raise ValueError(f"scales must have shape ({k},) or {means.shape}; got {scales.shape}.")
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},); got {weights.shape}.")
        self.means = means
        self.scales = jnp.broadcast_to(scales.reshape(k, -1), means.shape)
        self.weights = weights / jnp.sum(weights)
        self.isotropic = scales.ndim == 1

    def _components(self, process, x, t):
        """Per-component log densities ``(batch, k)`` and variances ``(batch, k, d)``."""
        a, s = _per_example(process, x, t)
        v = a[:, None, None] ** 2 * self.scales**2 + s[:, None, None] ** 2
        r = x[:, None, :] - a[:, None, None] * self.means
        logn = -0.5 * jnp.sum(r**2 / v + jnp.log(2 * math.pi * v), axis=-1)
        return logn + jnp.log(self.weights), v, r

    def _isotropic(self, process, x, t):
        """Isotropic components: log densities ``(batch, k)``, ``a`` ``(batch,)`` and
        variances ``(batch, k)``, the distances from one ``x @ means.T``."""
        a, s = _per_example(process, x, t)
        v = a[:, None] ** 2 * self.scales[:, 0] ** 2 + s[:, None] ** 2
        d2 = (
            jnp.sum(x**2, axis=-1, keepdims=True)
            - 2 * a[:, None] * (x @ self.means.T)
            + a[:, None] ** 2 * jnp.sum(self.means**2, axis=-1)
        )
        logn = -0.5 * (d2 / v + x.shape[-1] * jnp.log(2 * math.pi * v))
        return logn + jnp.log(self.weights), a, v

    def _logits(self, process, x, t):
        """``log w_k + log N_k(x)``, shape ``(batch, k)``, by the path that fits the scales."""
        if self.isotropic:
            return self._isotropic(process, x, t)[0]
        return self._components(process, x, t)[0]

    def responsibilities(self, process, x, t):
        r"""Posterior class probabilities :math:`p(k \mid x_t)`, shape ``(batch, k)``."""
        return jax.nn.softmax(self._logits(process, x, t), axis=-1)

    def class_log_prob(self, process, x, t, y):
        r"""Exact classifier :math:`\log p(y \mid x_t)` for integer labels ``y``, shape ``(batch,)``."""
        logits = self._logits(process, x, t)
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], axis=-1)[:, 0]

    def component(self, k: int) -> GaussianMixture:
        """The ``k``-th component alone (the class-conditional target)."""
        scales = self.scales[k : k + 1, 0] if self.isotropic else self.scales[k : k + 1]
        return GaussianMixture(self.means[k : k + 1], scales, self.weights[:1] * 0 + 1)

    def posterior_mean(self, process, x, t):
        if self.isotropic:
            logw, a, v = self._isotropic(process, x, t)
            w = jax.nn.softmax(logw, axis=-1)
            wc = w * (a[:, None] * self.scales[:, 0] ** 2 / v)  # w_k c_k
            return (
                w @ self.means
                + jnp.sum(wc, axis=-1, keepdims=True) * x
                - a[:, None] * (wc @ self.means)
            )
        logw, v, r = self._components(process, x, t)
        a, _ = _per_example(process, x, t)
        resp = jax.nn.softmax(logw, axis=-1)[..., None]
        cond = self.means + a[:, None, None] * self.scales**2 / v * r
        return jnp.sum(resp * cond, axis=1)

    def logp(self, process, x, t):
        """Log density of :math:`p_t` at ``x``, shape ``(batch,)``."""
        return jax.nn.logsumexp(self._logits(process, x, t), axis=-1)

    def sample(self, n, *, key, dtype=None, return_labels=False):
        kc, kz = jax.random.split(key)
        labels = jax.random.choice(kc, self.weights.shape[0], (n,), p=self.weights)
        z = jax.random.normal(kz, (n, self.means.shape[1]), dtype or self.means.dtype)
        x = self.means[labels] + self.scales[labels] * z
        return (x, labels) if return_labels else x


class Empirical(_Target):
    r"""The empirical distribution of a finite data set, and its optimal denoiser.

    .. math:: D(x, t) = \sum_i \mathrm{softmax}_i\!\left(-\frac{\|x - \alpha_t y_i\|^2}
        {2\sigma_t^2}\right) y_i

    computed over the data in chunks of ``chunk`` points with a running log-sum-exp, so that
    10k points x 1k queries x 784 dimensions fit in memory. Data of any shape ``(N, ...)``.
    """

    data: jax.Array
    chunk: int = eqx.field(static=True)

    def __init__(self, data, chunk: int = 1024):
        data = jnp.asarray(data)
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape (N, ...) with N >= 1; got {data.shape}.")
        self.data, self.chunk = data, int(chunk)

    def _logits_scan(self, x, a, s):
        """Running log-sum-exp over chunks; returns (logZ, weighted sum of data) per query."""
        return _chunked_logits(self.data, x, a, s, chunk=self.chunk)

    def posterior_mean(self, process, x, t):
        a, s = _per_example(process, x, t)
        return self._logits_scan(x, a, s)[1].reshape(x.shape)

    def logp(self, process, x, t):
        """Log density of :math:`p_t = \\frac1N\\sum_i\\mathcal N(\\alpha_t y_i, \\sigma_t^2 I)`."""
        a, s = _per_example(process, x, t)
        d = math.prod(x.shape[1:])
        logz = self._logits_scan(x, a, s)[0]
        return logz - math.log(self.data.shape[0]) - 0.5 * d * jnp.log(2 * math.pi * s**2)

    def sample(self, n, *, key):
        return self.data[jax.random.randint(key, (n,), 0, self.data.shape[0])]


@functools.partial(jax.jit, static_argnames="chunk")
def _chunked_logits(data, x, a, s, *, chunk):
    """Running log-sum-exp over ``data`` in chunks: ``(logZ, softmax-weighted mean)`` per query.

    Compiled once per shape (a module-level jit: outside ``jax.jit`` an ``Empirical`` denoiser would
    otherwise re-trace its scan at every call); inlined when called under a trace.
    """
    flat, xq = data.reshape(data.shape[0], -1), x.reshape(x.shape[0], -1)
    n, c = flat.shape[0], min(chunk, flat.shape[0])
    pad = (-n) % c
    ys = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, c, flat.shape[1]).astype(xq.dtype)
    valid = (jnp.arange(n + pad) < n).reshape(-1, c)
    x2 = jnp.sum(xq**2, axis=1, keepdims=True)

    def body(carry, block):
        m, z, acc = carry
        y, ok = block
        d2 = x2 - 2 * a[:, None] * (xq @ y.T) + a[:, None] ** 2 * jnp.sum(y**2, axis=1)
        logit = jnp.where(ok, -d2 / (2 * s[:, None] ** 2), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logit, axis=1))
        scale, p = jnp.exp(m - m_new), jnp.exp(logit - m_new[:, None])
        return (m_new, z * scale + p.sum(1), acc * scale[:, None] + p @ y), None

    q = xq.shape[0]
    init = (jnp.full((q,), -jnp.inf, xq.dtype), jnp.zeros((q,), xq.dtype), jnp.zeros_like(xq))
    (m, z, acc), _ = jax.lax.scan(body, init, (ys, valid))
    return m + jnp.log(z), acc / z[:, None]


def mean_shift(data, x, bandwidth, *, chunk: int = 1024):
    r"""One mean-shift step: :math:`m(x) = \sum_i \mathrm{softmax}_i(-\|x - y_i\|^2/2h^2)\,y_i`.

    The optimal denoiser of ``data`` at ``(x_t, t)`` is ``mean_shift(data, x_t / alpha_t,
    sigma_t / alpha_t)`` (Chen et al. 2023, Eq. 7). ``bandwidth`` is a scalar or ``(batch,)``.
    """
    x = jnp.asarray(x)
    h = jnp.broadcast_to(jnp.asarray(bandwidth, x.dtype), x.shape[:1])
    return Empirical(data, chunk)._logits_scan(x, jnp.ones_like(h), h)[1].reshape(x.shape)
