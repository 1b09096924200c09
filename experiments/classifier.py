r"""A feature classifier trained on a data set, cached on disk: the judge of the scripts' samples.

:class:`FeatureClassifier` is a small MLP; :func:`train_classifier` fits it with AdamW (one
``jax.lax.scan``); :func:`feature_classifier` caches the result under :func:`default_cache_dir`;
:func:`digits_classifier` is the one for scikit-learn's digits. The metrics that use a trained
classifier (:func:`jaxdiff.metrics.fd_classifier`, ``classifier_accuracy``,
``classifier_features``) take any object with ``features(x)`` and ``logits(x)`` methods.

Example:
    >>> from experiments import classifier                     # doctest: +SKIP
    >>> judge = classifier.digits_classifier()
    >>> x, y = classifier.digits_data()
    >>> jaxdiff.metrics.classifier_accuracy(judge, x, y)
    0.99...
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FeatureClassifier",
    "train_classifier",
    "default_cache_dir",
    "feature_classifier",
    "digits_data",
    "digits_classifier",
]


class FeatureClassifier(eqx.Module):
    r"""A small MLP classifier on flattened data; its last hidden layer gives the features.

    :math:`h_0 = (x - \text{shift})/\text{scale}`, :math:`h_{l+1} = \mathrm{gelu}(W_l h_l + b_l)`,
    logits :math:`= W_L h_L + b_L`. Train with :func:`train_classifier` (or the cached
    :func:`feature_classifier`); ``save``/``load`` write and read an ``.npz`` file.
    """

    weights: tuple[jax.Array, ...]
    biases: tuple[jax.Array, ...]
    shift: jax.Array
    scale: jax.Array

    @property
    def input_dim(self) -> int:
        return int(self.weights[0].shape[0])

    def _inputs(self, x):
        x = jnp.asarray(x)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.input_dim:
            raise ValueError(
                f"this classifier takes {self.input_dim} values per example; got x of shape "
                f"{x.shape}. Pass data shaped like what it was trained on."
            )
        return (flat.astype(self.shift.dtype) - self.shift) / self.scale

    def features(self, x):
        """Penultimate activations ``(batch, width)``."""
        h = self._inputs(x)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = jax.nn.gelu(h @ w + b)
        return h

    def logits(self, x):
        """Class logits ``(batch, n_classes)``."""
        return self.features(x) @ self.weights[-1] + self.biases[-1]

    __call__ = logits

    def save(self, path):
        """Write the parameters to an ``.npz`` file."""
        arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(self.weights)}
        arrays |= {f"b{i}": np.asarray(b) for i, b in enumerate(self.biases)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, shift=np.asarray(self.shift), scale=np.asarray(self.scale), **arrays)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees a partial file

    @classmethod
    def load(cls, path) -> FeatureClassifier:
        """Read parameters written by :meth:`save`."""
        with np.load(path) as f:
            n = sum(1 for k in f.files if k.startswith("w"))
            ws = tuple(jnp.asarray(f[f"w{i}"]) for i in range(n))
            bs = tuple(jnp.asarray(f[f"b{i}"]) for i in range(n))
            return cls(ws, bs, jnp.asarray(f["shift"]), jnp.asarray(f["scale"]))


def _init_mlp(key, sizes, dtype):
    keys = jax.random.split(key, len(sizes) - 1)
    ws = tuple(
        jax.random.normal(k, (a, b), dtype) * np.sqrt(1.0 / a)
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    )
    return ws, tuple(jnp.zeros((b,), dtype) for b in sizes[1:])


def train_classifier(
    x,
    y,
    *,
    key,
    hidden=(256, 128),
    steps: int = 3000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    noise: float = 0.1,
) -> FeatureClassifier:
    r"""Train a :class:`FeatureClassifier` on ``(x, y)`` with AdamW on the cross-entropy.

    Inputs are standardized with the data's mean and standard deviation; Gaussian input noise
    of standard deviation ``noise`` (in standardized units) makes the classifier less brittle on
    generated samples. The whole loop is one ``jax.lax.scan``.
    """
    import optax

    x = np.asarray(x, np.float32).reshape(len(x), -1)
    y = np.asarray(y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},); got {y.shape}.")
    shift, scale = jnp.asarray(x.mean(0)), jnp.asarray(max(float(x.std()), 1e-8), jnp.float32)
    sizes = (x.shape[1], *hidden, int(y.max()) + 1)
    k_init, k_train = jax.random.split(key)
    model = FeatureClassifier(*_init_mlp(k_init, sizes, jnp.float32), shift, scale)
    opt = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)
    params = (model.weights, model.biases)
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def loss(params, xb, yb):
        logits = FeatureClassifier(*params, shift, scale).logits(xb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    def step(carry, i):
        params, state = carry
        k = jax.random.fold_in(k_train, i)
        idx = jax.random.randint(k, (min(batch_size, xs.shape[0]),), 0, xs.shape[0])
        xb = xs[idx] + noise * scale * jax.random.normal(
            jax.random.fold_in(k, 1), xs[idx].shape, xs.dtype
        )
        grads = jax.grad(loss)(params, xb, ys[idx])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), jnp.arange(steps))[0][0])
    return FeatureClassifier(*run(params), shift, scale)


def default_cache_dir() -> Path:
    """``$JAXDIFF_CACHE_DIR`` if set, else ``~/.cache/jaxdiff``."""
    return Path(os.environ.get("JAXDIFF_CACHE_DIR") or Path.home() / ".cache" / "jaxdiff")


def feature_classifier(
    x, y, *, name: str = "data", cache_dir=None, seed: int = 0, **train_kwargs
) -> FeatureClassifier:
    """:func:`train_classifier`, cached on disk.

    The file ``<cache_dir>/classifier-<name>-<digest>.npz`` is keyed by a hash of the data, the
    labels, the seed and the training arguments: the same call loads instead of retraining.
    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    x, y = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y)
    digest = hashlib.sha256(x.tobytes() + y.astype(np.int64).tobytes())
    digest.update(
        json.dumps({"shape": x.shape, "seed": seed, **train_kwargs}, default=str).encode()
    )
    path = (
        Path(cache_dir or default_cache_dir()) / f"classifier-{name}-{digest.hexdigest()[:16]}.npz"
    )
    if path.exists():
        return FeatureClassifier.load(path)
    model = train_classifier(x, y, key=jax.random.key(seed), **train_kwargs)
    model.save(path)
    return model


def digits_data():
    """scikit-learn's 8x8 digits (:func:`jaxdiff.data.digits`) flattened: ``(1797, 64)`` in
    [-1, 1] (pixels 0..16 mapped by :math:`v/8 - 1`) and the labels."""
    from jaxdiff import data

    ds = data.digits()
    return ds.x.reshape(len(ds.x), -1), ds.y


def digits_classifier(*, cache_dir=None, **train_kwargs) -> FeatureClassifier:
    """A :class:`FeatureClassifier` on all of :func:`digits_data`, cached (see
    :func:`feature_classifier`). It takes digits in [-1, 1] of shape ``(n, 64)`` or
    ``(n, 8, 8[, 1])``. Held-out accuracy of the default settings is about 97%."""
    x, y = digits_data()
    return feature_classifier(x, y, name="digits", cache_dir=cache_dir, **train_kwargs)
