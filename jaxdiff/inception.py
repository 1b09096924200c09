r"""The FID Inception-v3 network in plain JAX: 2048-d pool3 features for the standard FID.

The network is Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for
Computer Vision", figures 5-7 and table 1) as frozen in TensorFlow's FID graph
``inception-2015-12-05`` (Heusel et al. 2017) and ported to PyTorch by pytorch-fid. Every layer is
a unit :math:`\mathrm{relu}(\mathrm{BN}_{\epsilon=10^{-3}}(W * x))`; the stem (five units, two
max pools) is followed by the blocks ``Mixed_5b..5d`` (A), ``Mixed_6a`` (B, grid reduction),
``Mixed_6b..6e`` (C, factorised 7x7), ``Mixed_7a`` (D, grid reduction), ``Mixed_7b..7c`` (E,
expanded 3x3), and a global average pool gives the 2048 features. The FID graph differs from the
classification Inception-v3 in two places, both kept here: the 3x3 average pools of the A, C and
E blocks exclude the padding from the mean (``count_include_pad=False``), and the pool branch of
the last block (``Mixed_7c``) is a 3x3 max pool. Images are resized to 299x299 (bilinear,
half-pixel centres, no antialiasing) and expected in [-1, 1].

Weights: :func:`load_params` reads an ``.npz`` file whose keys are the pytorch-fid state-dict names
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...) with PyTorch (OIHW)
layouts; it converts the kernels to HWIO and folds batch norm into a scale and shift. jaxdiff does
not download and does not depend on torch; make the file once on a machine with torch::

    import numpy as np, torch
    # https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
    #     pt_inception-2015-12-05-6726825d.pth
    sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
    np.savez("pt_inception-2015-12-05.npz", **{k: v.numpy() for k, v in sd.items()})

A ``.pth`` path is also accepted when ``torch`` happens to be importable.

Checked against pytorch-fid 0.3.0 (``tests/test_inception.py``, reference made by
``tests/fid_reference.py``): with the same random weights in both, the state-dict names and shapes
are equal and the pool3 features agree to 2e-5 for features up to 27 (float32 rounding), for
images up- and downsampled to 299x299; counting the padding in the average pools, an average pool
in ``Mixed_7c`` or an antialiased resize each changes them by more than 1.

Example:
    >>> params = load_params("pt_inception-2015-12-05.npz")  # doctest: +SKIP
    >>> inception_features(params, images).shape  # images (n, h, w, 3) in [-1, 1]  # doctest: +SKIP
    (n, 2048)
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NPZ_RECIPE",
    "BN_EPS",
    "MIN_SIZE",
    "unit_shapes",
    "state_dict_shapes",
    "params_from_state_dict",
    "load_params",
    "inception_features",
    "as_rgb",
    "pool3_features",
]

BN_EPS = 1e-3
MIN_SIZE = 75  # the smallest input side the stride-2 layers accept (1x1 after Mixed_7a)

NPZ_RECIPE = (
    "import numpy as np, torch\n"
    "# pt_inception-2015-12-05-6726825d.pth from "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/\n"
    'sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")\n'
    'np.savez("pt_inception-2015-12-05.npz", **{k: v.numpy() for k, v in sd.items()})'
)


# --- the layer table: unit name -> (kh, kw, c_in, c_out, stride, padding) ----------------------
def _same(kh, kw):
    return ((kh // 2, kh // 2), (kw // 2, kw // 2))


_VALID = ((0, 0), (0, 0))


def _conv(kh, kw, cin, cout, stride=1, padding=None):
    pad = padding if padding is not None else (_same(kh, kw) if stride == 1 else _VALID)
    return (kh, kw, cin, cout, stride, pad)


def _block_a(cin, pool):
    return {
        "branch1x1": _conv(1, 1, cin, 64),
        "branch5x5_1": _conv(1, 1, cin, 48),
        "branch5x5_2": _conv(5, 5, 48, 64),
        "branch3x3dbl_1": _conv(1, 1, cin, 64),
        "branch3x3dbl_2": _conv(3, 3, 64, 96),
        "branch3x3dbl_3": _conv(3, 3, 96, 96),
        "branch_pool": _conv(1, 1, cin, pool),
    }


def _block_b(cin):
    return {
        "branch3x3": _conv(3, 3, cin, 384, stride=2),
        "branch3x3dbl_1": _conv(1, 1, cin, 64),
        "branch3x3dbl_2": _conv(3, 3, 64, 96),
        "branch3x3dbl_3": _conv(3, 3, 96, 96, stride=2),
    }


def _block_c(cin, c7):
    return {
        "branch1x1": _conv(1, 1, cin, 192),
        "branch7x7_1": _conv(1, 1, cin, c7),
        "branch7x7_2": _conv(1, 7, c7, c7),
        "branch7x7_3": _conv(7, 1, c7, 192),
        "branch7x7dbl_1": _conv(1, 1, cin, c7),
        "branch7x7dbl_2": _conv(7, 1, c7, c7),
        "branch7x7dbl_3": _conv(1, 7, c7, c7),
        "branch7x7dbl_4": _conv(7, 1, c7, c7),
        "branch7x7dbl_5": _conv(1, 7, c7, 192),
        "branch_pool": _conv(1, 1, cin, 192),
    }


def _block_d(cin):
    return {
        "branch3x3_1": _conv(1, 1, cin, 192),
        "branch3x3_2": _conv(3, 3, 192, 320, stride=2),
        "branch7x7x3_1": _conv(1, 1, cin, 192),
        "branch7x7x3_2": _conv(1, 7, 192, 192),
        "branch7x7x3_3": _conv(7, 1, 192, 192),
        "branch7x7x3_4": _conv(3, 3, 192, 192, stride=2),
    }


def _block_e(cin):
    return {
        "branch1x1": _conv(1, 1, cin, 320),
        "branch3x3_1": _conv(1, 1, cin, 384),
        "branch3x3_2a": _conv(1, 3, 384, 384),
        "branch3x3_2b": _conv(3, 1, 384, 384),
        "branch3x3dbl_1": _conv(1, 1, cin, 448),
        "branch3x3dbl_2": _conv(3, 3, 448, 384),
        "branch3x3dbl_3a": _conv(1, 3, 384, 384),
        "branch3x3dbl_3b": _conv(3, 1, 384, 384),
        "branch_pool": _conv(1, 1, cin, 192),
    }


_STEM = {
    "Conv2d_1a_3x3": _conv(3, 3, 3, 32, stride=2),
    "Conv2d_2a_3x3": _conv(3, 3, 32, 32, padding=_VALID),
    "Conv2d_2b_3x3": _conv(3, 3, 32, 64),
    "Conv2d_3b_1x1": _conv(1, 1, 64, 80),
    "Conv2d_4a_3x3": _conv(3, 3, 80, 192, padding=_VALID),
}

_BLOCKS = {
    "Mixed_5b": _block_a(192, 32),
    "Mixed_5c": _block_a(256, 64),
    "Mixed_5d": _block_a(288, 64),
    "Mixed_6a": _block_b(288),
    "Mixed_6b": _block_c(768, 128),
    "Mixed_6c": _block_c(768, 160),
    "Mixed_6d": _block_c(768, 160),
    "Mixed_6e": _block_c(768, 192),
    "Mixed_7a": _block_d(768),
    "Mixed_7b": _block_e(1280),
    "Mixed_7c": _block_e(2048),
}

_UNITS = {
    **_STEM,
    **{f"{block}.{b}": spec for block, branches in _BLOCKS.items() for b, spec in branches.items()},
}


def unit_shapes() -> dict[str, tuple[int, int, int, int]]:
    """HWIO kernel shape ``(kh, kw, c_in, c_out)`` of each of the 94 conv-BN-ReLU units."""
    return {name: spec[:4] for name, spec in _UNITS.items()}


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state-dict names this module reads and their PyTorch shapes (kernels OIHW,
    BN vectors ``(c_out,)``). Other keys of the file (``fc.*``, ``num_batches_tracked``) are
    ignored."""
    shapes = {}
    for name, (kh, kw, cin, cout) in unit_shapes().items():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{field}"] = (cout,)
    return shapes


# --- weights -----------------------------------------------------------------------------------
def _fold_unit(sd, name):
    """HWIO kernel and folded BN: ``BN(z) = scale * z + shift`` with
    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``."""
    g = lambda f: np.asarray(sd[f"{name}.bn.{f}"], np.float64)  # noqa: E731
    scale = g("weight") / np.sqrt(g("running_var") + BN_EPS)
    kernel = np.transpose(np.asarray(sd[f"{name}.conv.weight"]), (2, 3, 1, 0))
    return {
        "kernel": jnp.asarray(kernel, jnp.float32),
        "scale": jnp.asarray(scale, jnp.float32),
        "shift": jnp.asarray(g("bias") - g("running_mean") * scale, jnp.float32),
    }


def _check_state_dict(sd, source):
    for key, shape in state_dict_shapes().items():
        if key not in sd:
            raise KeyError(
                f"{source} has no key {key!r}: expected the pytorch-fid FID Inception state dict "
                f"(keys like 'Conv2d_1a_3x3.conv.weight'). Make the file with:\n{NPZ_RECIPE}"
            )
        if tuple(np.shape(sd[key])) != shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(np.shape(sd[key]))}, expected {shape} "
                "(PyTorch OIHW layout of the FID Inception-v3)."
            )


def params_from_state_dict(state_dict, *, source: str = "state dict") -> dict:
    """Params pytree ``{unit name: {"kernel" (HWIO), "scale", "shift"}}`` (float32) from a mapping
    of pytorch-fid names to arrays in PyTorch layout; raises ``KeyError`` naming a missing key and
    ``ValueError`` for a wrong shape."""
    _check_state_dict(state_dict, source)
    return {name: _fold_unit(state_dict, name) for name in _UNITS}


def _read_pth(path):
    try:
        import torch
    except ImportError as err:
        raise ValueError(
            f"{str(path)!r} is a PyTorch file and torch is not installed; convert it once on a "
            f"machine with torch to an .npz file:\n{NPZ_RECIPE}"
        ) from err
    sd = torch.load(path, map_location="cpu")
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def load_params(path) -> dict:
    """Read the FID Inception weights from ``path`` (``.npz`` with pytorch-fid names; ``.pth``
    only if torch is importable) into the params pytree of :func:`inception_features`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {str(path)!r}. Make the .npz once on a "
            f"machine with torch and internet access:\n{NPZ_RECIPE}"
        )
    if path.suffix == ".pth":
        return params_from_state_dict(_read_pth(path), source=str(path))
    with np.load(path) as f:
        return params_from_state_dict({k: f[k] for k in f.files}, source=str(path))


# --- the network -------------------------------------------------------------------------------
def _unit(params, name, x):
    """relu(BN(conv(x))) with the stride and padding of the layer table."""
    stride, padding = _UNITS[name][4:]
    p = params[name]
    z = jax.lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(z * p["scale"] + p["shift"])


def _pool(x, op, init, window, stride, pad):
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    dims = (1, window, window, 1)
    return jax.lax.reduce_window(x, init, op, dims, (1, stride, stride, 1), padding)


def _max_pool(x, window=3, stride=2, pad=0):
    return _pool(x, jax.lax.max, -jnp.inf, window, stride, pad)


def _avg_pool(x):
    """3x3, stride 1, padding 1, mean over the window's pixels inside the image
    (``count_include_pad=False``)."""
    total = _pool(x, jax.lax.add, 0.0, 3, 1, 1)
    count = _pool(jnp.ones((1, *x.shape[1:3], 1), x.dtype), jax.lax.add, 0.0, 3, 1, 1)
    return total / count


def _chain(params, block, names, x):
    for name in names:
        x = _unit(params, f"{block}.{name}", x)
    return x


def _mixed_a(params, block, x):
    return jnp.concatenate(
        [
            _unit(params, f"{block}.branch1x1", x),
            _chain(params, block, ("branch5x5_1", "branch5x5_2"), x),
            _chain(params, block, ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), x),
            _unit(params, f"{block}.branch_pool", _avg_pool(x)),
        ],
        axis=-1,
    )


def _mixed_b(params, block, x):
    return jnp.concatenate(
        [
            _unit(params, f"{block}.branch3x3", x),
            _chain(params, block, ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), x),
            _max_pool(x),
        ],
        axis=-1,
    )


def _mixed_c(params, block, x):
    dbl = tuple(f"branch7x7dbl_{i}" for i in range(1, 6))
    return jnp.concatenate(
        [
            _unit(params, f"{block}.branch1x1", x),
            _chain(params, block, ("branch7x7_1", "branch7x7_2", "branch7x7_3"), x),
            _chain(params, block, dbl, x),
            _unit(params, f"{block}.branch_pool", _avg_pool(x)),
        ],
        axis=-1,
    )


def _mixed_d(params, block, x):
    seven = tuple(f"branch7x7x3_{i}" for i in range(1, 5))
    return jnp.concatenate(
        [
            _chain(params, block, ("branch3x3_1", "branch3x3_2"), x),
            _chain(params, block, seven, x),
            _max_pool(x),
        ],
        axis=-1,
    )


def _split_3x3(params, block, prefix, x):
    """The expanded 1x3 and 3x1 pair of an E block, concatenated."""
    return jnp.concatenate(
        [_unit(params, f"{block}.{prefix}a", x), _unit(params, f"{block}.{prefix}b", x)], axis=-1
    )


def _mixed_e(params, block, x, pool):
    """E block; ``pool`` is the 3x3 average pool (Mixed_7b) or the 3x3 max pool (Mixed_7c)."""
    dbl = ("branch3x3dbl_1", "branch3x3dbl_2")
    return jnp.concatenate(
        [
            _unit(params, f"{block}.branch1x1", x),
            _split_3x3(params, block, "branch3x3_2", _unit(params, f"{block}.branch3x3_1", x)),
            _split_3x3(params, block, "branch3x3dbl_3", _chain(params, block, dbl, x)),
            _unit(params, f"{block}.branch_pool", pool(x)),
        ],
        axis=-1,
    )


def _stem(params, x):
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _unit(params, name, x)
    x = _max_pool(x)
    for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3"):
        x = _unit(params, name, x)
    return _max_pool(x)


def _resize(images, size):
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, size, size, c), "bilinear", antialias=False)


def inception_features(params, images, *, resize_to: int = 299):
    r"""Pool3 features ``(n, 2048)`` of the FID Inception-v3 for ``images (n, h, w, 3)`` in [-1, 1].

    Images are resized to ``resize_to`` x ``resize_to`` (bilinear; 299 is the standard FID input,
    smaller values, down to :data:`MIN_SIZE` = 75, only for tests), run through the stem and the
    blocks ``Mixed_5b..7c``, and averaged over space. Runs in float32; jit it with
    ``static_argnames="resize_to"``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (n, h, w, 3); got {images.shape}.")
    if resize_to < MIN_SIZE:
        raise ValueError(f"resize_to must be at least {MIN_SIZE}; got {resize_to}.")
    x = _stem(params, _resize(images.astype(jnp.float32), resize_to))
    for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _mixed_a(params, block, x)
    x = _mixed_b(params, "Mixed_6a", x)
    for block in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _mixed_c(params, block, x)
    x = _mixed_d(params, "Mixed_7a", x)
    x = _mixed_e(params, "Mixed_7b", x, _avg_pool)
    x = _mixed_e(params, "Mixed_7c", x, lambda y: _max_pool(y, stride=1, pad=1))
    return jnp.mean(x, axis=(1, 2))


_features_jit = jax.jit(inception_features, static_argnames="resize_to")


def as_rgb(images, name: str = "images"):
    """``images (n, h, w, 1 or 3)`` as float32 RGB (grayscale repeated over three channels);
    ``ValueError`` for any other shape or ``n < 2``."""
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] < 2:
        raise ValueError(
            f"{name} must be images of shape (n, h, w, 1 or 3) in [-1, 1] with n >= 2; "
            f"got {x.shape}."
        )
    return jnp.broadcast_to(x, (*x.shape[:3], 3))


def pool3_features(params, images, *, batch_size: int = 50, resize_to: int = 299):
    """:func:`inception_features` of ``images (n, h, w, 1 or 3)`` in [-1, 1], in jitted batches of
    ``batch_size``; the last batch is zero-padded, so one compilation serves every batch."""
    x = as_rgb(images)
    n = x.shape[0]
    x = jnp.concatenate([x, jnp.zeros((-n % batch_size, *x.shape[1:]), x.dtype)])
    chunks = [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]
    return jnp.concatenate([_features_jit(params, c, resize_to=resize_to) for c in chunks])[:n]
