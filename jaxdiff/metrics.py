r"""Sample-quality metrics: sliced Wasserstein, MMD, and Frechet distances in a feature space.

- :func:`sliced_wasserstein` and :func:`mmd` compare two point sets directly (low-dimensional
  data, e.g. 2-D toy targets).
- :func:`frechet_distance` is the 2-Wasserstein distance between two Gaussians (Dowson & Landau
  1982), the formula of FID (Heusel et al. 2017):

  .. math:: d^2 = \|\mu_1 - \mu_2\|^2 + \mathrm{tr}\big(C_1 + C_2 - 2(C_1^{1/2} C_2
      C_1^{1/2})^{1/2}\big).

- :func:`fd_classifier` is the Frechet distance between Gaussians fitted to the penultimate
  features of a classifier trained on the real data set (an FID-like score for small data sets
  without Inception weights), and :func:`classifier_accuracy` judges class-conditional samples.
  A classifier is any object with ``features(x)`` and ``logits(x)``; the scripts train and
  cache one with :mod:`experiments.classifier`.
- :func:`fid_inception` is the standard FID with the FID Inception-v3 of
  :mod:`jaxdiff.inception` (imported on first use); it needs the weights as a local ``.npz``
  file (see its docstring).

Example:
    >>> import jax, jaxdiff
    >>> from jaxdiff import metrics
    >>> x = jax.random.normal(jax.random.key(0), (500, 2))
    >>> float(metrics.sliced_wasserstein(x, x, key=jax.random.key(1)))
    0.0
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._utils import is_concrete

__all__ = [
    "sliced_wasserstein",
    "mmd",
    "gaussian_stats",
    "frechet_distance",
    "classifier_features",
    "classifier_accuracy",
    "fd_classifier",
    "fid_inception",
    "FID_WEIGHTS_URL",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)


def _flat(x, name):
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape (n, ...) with n >= 2 points; got {x.shape}.")
    return x.reshape(x.shape[0], -1)


def _check_pair(x, y):
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {x.shape} and {y.shape}.")
    dtype = jnp.result_type(x, y, jnp.float32)
    return x.astype(dtype), y.astype(dtype)


# --- sliced Wasserstein ------------------------------------------------------------------------
def _wasserstein_1d(a, b, p):
    r""":math:`W_p^p` between the empirical measures of the columns of ``a (n, P)``, ``b (m, P)``.

    :math:`W_p^p = \int_0^1 |F_a^{-1}(u) - F_b^{-1}(u)|^p du`, exact for step quantile functions:
    the integrand is constant between the merged breakpoints :math:`i/n` and :math:`j/m`.
    """
    a, b = jnp.sort(a, axis=0), jnp.sort(b, axis=0)
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return jnp.mean(jnp.abs(a - b) ** p, axis=0)
    u = jnp.sort(jnp.concatenate([jnp.arange(1, n + 1) / n, jnp.arange(1, m + 1) / m]))
    width = jnp.diff(jnp.concatenate([jnp.zeros(1), u]))
    mid = u - width / 2
    ia = jnp.minimum(jnp.floor(mid * n).astype(int), n - 1)
    ib = jnp.minimum(jnp.floor(mid * m).astype(int), m - 1)
    return jnp.sum(width.astype(a.dtype)[:, None] * jnp.abs(a[ia] - b[ib]) ** p, axis=0)


@eqx.filter_jit
def _sliced(x, y, key, n_projections, p):
    theta = jax.random.normal(key, (n_projections, x.shape[1]), x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=1, keepdims=True)
    return jnp.mean(_wasserstein_1d(x @ theta.T, y @ theta.T, p)) ** (1.0 / p)


def sliced_wasserstein(x, y, *, key, n_projections: int = 128, p: int = 2):
    r"""Sliced :math:`p`-Wasserstein distance between two point sets (Rabin et al. 2011).

    .. math:: SW_p(\mu, \nu) = \Big(E_{\theta\sim U(S^{d-1})} W_p^p(\theta_\#\mu,
        \theta_\#\nu)\Big)^{1/p}

    estimated with ``n_projections`` random directions; each 1-D distance is exact (sorting), and
    the sets may have different sizes. Points of any shape ``(n, ...)`` are flattened.

    Example:
        >>> sliced_wasserstein(x, x + 1.0, key=jax.random.key(0))  # doctest: +SKIP
    """
    x, y = _check_pair(x, y)
    if not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int; got {n_projections!r}.")
    if p < 1:
        raise ValueError(f"p must be >= 1; got {p}.")
    return _sliced(x, y, key, n_projections, p)


# --- maximum mean discrepancy ------------------------------------------------------------------
def _sq_dists(a, b):
    d2 = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2 * a @ b.T
    return jnp.maximum(d2, 0.0)


def _off_diagonal_mean(k):
    n = k.shape[0]
    return (jnp.sum(k) - jnp.trace(k)) / (n * (n - 1))


@jax.jit
def _mmd2(x, y, bandwidths):
    def kernel(d2):
        return jnp.mean(jnp.exp(-d2[..., None] / (2 * bandwidths**2)), axis=-1)

    kxx, kyy, kxy = kernel(_sq_dists(x, x)), kernel(_sq_dists(y, y)), kernel(_sq_dists(x, y))
    return _off_diagonal_mean(kxx) + _off_diagonal_mean(kyy) - 2 * jnp.mean(kxy)


@jax.jit
def _median_bandwidth(x, y):
    """Median pairwise distance of the pooled sets (off-diagonal entries; each pair twice)."""
    z = jnp.concatenate([x, y])
    d2 = jnp.where(jnp.eye(z.shape[0], dtype=bool), jnp.nan, _sq_dists(z, z))
    return jnp.sqrt(jnp.nanmedian(d2))


def mmd(x, y, bandwidths=None):
    r"""Unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012, Eq. 3).

    .. math:: \widehat{\mathrm{MMD}}^2 = \frac{\sum_{i\ne j} k(x_i, x_j)}{n(n-1)} +
        \frac{\sum_{i\ne j} k(y_i, y_j)}{m(m-1)} - \frac{2}{nm}\sum_{i,j} k(x_i, y_j)

    with the RBF kernel averaged over bandwidths :math:`h`,
    :math:`k(a, b) = \frac{1}{H}\sum_h e^{-\|a-b\|^2/2h^2}`. Being unbiased, it can be slightly
    negative (of order :math:`1/n`) when the distributions agree.

    Args:
        x, y: point sets ``(n, ...)`` and ``(m, ...)`` (flattened).
        bandwidths: a scalar or a sequence of kernel widths; ``None`` takes the median pairwise
            distance of the pooled sets times ``(0.5, 1, 2)`` (the median heuristic).
    """
    x, y = _check_pair(x, y)
    if bandwidths is None:
        bandwidths = _median_bandwidth(x, y) * jnp.asarray([0.5, 1.0, 2.0], x.dtype)
    bandwidths = jnp.atleast_1d(jnp.asarray(bandwidths, x.dtype))
    if bandwidths.ndim != 1 or (is_concrete(bandwidths) and not bool(jnp.all(bandwidths > 0))):
        raise ValueError(f"bandwidths must be positive numbers; got {bandwidths}.")
    return _mmd2(x, y, bandwidths)


# --- Frechet distance --------------------------------------------------------------------------
def gaussian_stats(features):
    """Mean ``(d,)`` and covariance ``(d, d)`` (unbiased) of ``features (n, d)``, float64 numpy."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (n, d) with n >= 2; got {f.shape}.")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or inf: check the samples (a diverged sampler?).")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(c):
    """Symmetric square root of a positive semi-definite matrix by ``eigh`` (eigenvalues >= 0)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    r"""Squared Frechet (2-Wasserstein) distance between :math:`\mathcal N(\mu_1, C_1)` and
    :math:`\mathcal N(\mu_2, C_2)` (Dowson & Landau 1982; the formula of FID, Heusel et al. 2017).

    .. math:: \|\mu_1 - \mu_2\|^2 + \mathrm{tr}\,C_1 + \mathrm{tr}\,C_2 -
        2\,\mathrm{tr}\big(C_1^{1/2} C_2 C_1^{1/2}\big)^{1/2}

    The trace term uses the symmetric PSD matrix :math:`C_1^{1/2} C_2 C_1^{1/2}` (same
    eigenvalues as :math:`C_1 C_2`), so both square roots come from ``eigh``: no complex parts and
    no failure on singular covariances. Computed in float64 numpy; returns a Python float.

    Example:
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))  # 2 + 2 * (2-1)^2
        4.0
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"need means of shape (d,) and covariances (d, d) with the same d; got {mu1.shape}, "
            f"{cov1.shape}, {mu2.shape}, {cov2.shape}."
        )
    s1 = _sqrtm_psd(cov1)
    cross = s1 @ cov2 @ s1
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)))
    value = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt
    return float(max(value, 0.0))


# --- metrics in the features of a trained classifier ------------------------------------------
@eqx.filter_jit
def _apply(classifier, x, method):
    return getattr(classifier, method)(x)


def _batched(classifier, method, x, batch_size):
    x = jnp.asarray(x)
    chunks = [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]
    return jnp.concatenate([_apply(classifier, c, method) for c in chunks])


def classifier_features(classifier, x, *, batch_size: int = 4096):
    """Penultimate features ``classifier.features(x)`` for ``x`` of shape ``(n, ...)``, in
    batches (``classifier`` a pytree such as ``experiments.classifier.FeatureClassifier``)."""
    return _batched(classifier, "features", x, batch_size)


def classifier_accuracy(classifier, x, y, *, batch_size: int = 4096) -> float:
    """Fraction of ``x`` whose ``classifier.logits`` pick the labels ``y`` (a scalar or ``(n,)``)."""
    pred = jnp.argmax(_batched(classifier, "logits", x, batch_size), axis=-1)
    return float(jnp.mean(pred == jnp.broadcast_to(jnp.asarray(y), pred.shape)))


def fd_classifier(samples, real, classifier) -> float:
    """Frechet distance between Gaussians fitted to ``classifier``'s features of ``samples`` and
    of ``real`` (an FID-like score for small data sets; not comparable with Inception FID)."""
    f1 = gaussian_stats(classifier_features(classifier, samples))
    f2 = gaussian_stats(classifier_features(classifier, real))
    return frechet_distance(*f1, *f2)


def fid_inception(samples, real, weights_path, *, batch_size: int = 50) -> float:
    r"""Standard FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the
    2048-d pool3 features of the FID Inception-v3 (TensorFlow ``inception-2015-12-05``, as ported
    by pytorch-fid) of ``samples`` and of ``real``.

    .. math:: \mathrm{FID} = \|\mu_s - \mu_r\|^2 + \mathrm{tr}\big(C_s + C_r
        - 2 (C_s^{1/2} C_r C_s^{1/2})^{1/2}\big)

    Images have shape ``(n, h, w, 1 or 3)`` (NHWC) with values in [-1, 1]; grayscale is repeated
    to RGB and every image is resized to 299x299 (bilinear) as in pytorch-fid. Features are
    computed under ``jax.jit`` in batches of ``batch_size``. ``weights_path`` is an ``.npz`` of
    the pytorch-fid state dict (a ``.pth`` only if torch is importable); jaxdiff cannot download
    it. Make it once on a machine with torch (:data:`jaxdiff.inception.NPZ_RECIPE`)::

        import numpy as np, torch
        # pt_inception-2015-12-05-6726825d.pth from FID_WEIGHTS_URL
        sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
        np.savez("pt_inception-2015-12-05.npz", **{k: v.numpy() for k, v in sd.items()})

    Published FIDs use 50k samples; with few samples FID is biased upwards.

    Example:
        >>> fid_inception(samples, real, "pt_inception-2015-12-05.npz")  # doctest: +SKIP
    """
    from jaxdiff import inception

    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-v3 FID weights not found at {str(path)!r}. jaxdiff cannot download them: "
            f"fetch {FID_WEIGHTS_URL} (the pytorch-fid port of the TensorFlow FID Inception, "
            f"inception-2015-12-05) on a machine with internet access and torch, and convert it "
            f"to an .npz file (pass its path as weights_path, e.g. "
            f"'~/.cache/jaxdiff/pt_inception-2015-12-05.npz'):\n"
            f"{inception.NPZ_RECIPE}"
        )
    samples = inception.as_rgb(samples, "samples")
    real = inception.as_rgb(real, "real")
    params = inception.load_params(path)
    f_samples = np.asarray(inception.pool3_features(params, samples, batch_size=batch_size))
    f_real = np.asarray(inception.pool3_features(params, real, batch_size=batch_size))
    if max(len(f_samples), len(f_real)) <= f_samples.shape[1]:
        return _frechet_few_points(f_samples, f_real)
    return frechet_distance(*gaussian_stats(f_samples), *gaussian_stats(f_real))


def _frechet_few_points(f1, f2) -> float:
    r""":func:`frechet_distance` of the Gaussians fitted to ``f1 (n1, d)`` and ``f2 (n2, d)``
    without a ``d x d`` eigendecomposition, for ``n1, n2 <= d``. With centred features
    :math:`A_i`, :math:`C_i = A_i^\top A_i / (n_i - 1)`; the eigenvalues of :math:`C_1 C_2` are
    the squared singular values of :math:`A_1 A_2^\top / \sqrt{(n_1-1)(n_2-1)}`, so the trace
    term is that ``n1 x n2`` matrix's nuclear norm."""
    if not (np.all(np.isfinite(f1)) and np.all(np.isfinite(f2))):
        raise ValueError("features contain NaN or inf: check the samples (a diverged sampler?).")
    a1, a2 = (np.asarray(f, np.float64) - np.mean(f, axis=0) for f in (f1, f2))
    n1, n2 = len(a1) - 1, len(a2) - 1
    tr_sqrt = np.sum(np.linalg.svd(a1 @ a2.T, compute_uv=False)) / np.sqrt(n1 * n2)
    mean_term = np.sum((np.mean(f1, axis=0, dtype=np.float64) - np.mean(f2, 0, np.float64)) ** 2)
    value = mean_term + np.sum(a1**2) / n1 + np.sum(a2**2) / n2 - 2 * tr_sqrt
    return float(max(value, 0.0))


# --- names that moved to experiments.classifier (training, disk cache, data loading) -----------
_MOVED = ("FeatureClassifier", "train_classifier", "feature_classifier", "default_cache_dir")
_MOVED += ("digits_data", "digits_classifier")


def __getattr__(name):
    if name in _MOVED:
        warnings.warn(
            f"jaxdiff.metrics.{name} moved to experiments.classifier.{name} (training a judge "
            "is not a metric); the old name is deprecated.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("experiments.classifier"), name)
    raise AttributeError(f"module 'jaxdiff.metrics' has no attribute {name!r}")
