r"""Pretrained diffusers models in JAX: a ``UNet2DModel`` folder as a Flax NNX network, its scheduler
as a :class:`~jaxdiff.processes.DiscreteVP`, and both as a denoiser for every jaxdiff sampler.

A diffusers model folder holds ``config.json`` (the constructor arguments of ``UNet2DModel``) and
``diffusion_pytorch_model.safetensors`` (the PyTorch state dict); a pipeline folder holds it under
``unet/`` beside ``scheduler/scheduler_config.json``. The weights are read with the ``safetensors``
package's NumPy API (torch is never needed) and the convolution kernels transposed from PyTorch's
OIHW to HWIO, so the network runs on NHWC images:

.. math:: \mathrm{net}(x_{NHWC}, n) = \mathrm{UNet2DModel}(x_{NCHW}, n)\ \text{transposed},

to float32 rounding, where :math:`n` is the (possibly fractional) training step. With the
scheduler's table as a :class:`~jaxdiff.processes.DiscreteVP` (step ``n`` at
:math:`t_n = (n + 1)/N`), :func:`load_diffusers` calls the network at ``process.timestep(t)``
:math:`= Nt - 1` and converts its prediction (``epsilon`` -> ``"eps"``, ``v_prediction`` ->
``"v"``, ``sample`` -> ``"x0"``) into :math:`\hat x_0`, the denoiser of every jaxdiff sampler.

Nothing is downloaded: download a model yourself (e.g. ``huggingface-cli download
google/ddpm-cifar10-32 --local-dir ddpm-cifar10``) and pass the folder.

Supported ``UNet2DModel`` configurations (those of the public DDPM checkpoints): ``DownBlock2D``,
``AttnDownBlock2D``, ``UpBlock2D``, ``AttnUpBlock2D``, the ``UNetMidBlock2D`` with attention,
``positional`` time embeddings with ``flip_sin_to_cos`` and ``freq_shift``,
``resnet_time_scale_shift`` ``"default"`` or ``"scale_shift"``, ``attention_head_dim``,
``norm_num_groups``, ``norm_eps``, SiLU. Any other value is a ``ValueError`` naming it.

Example:
    >>> import jax, jaxdiff                                               # doctest: +SKIP
    >>> denoise = jaxdiff.pretrained.load_diffusers("ddpm-cifar10")      # doctest: +SKIP
    >>> process = denoise.process                                         # doctest: +SKIP
    >>> x_T = process.prior_sample((16, 32, 32, 3), key=jax.random.key(0))  # doctest: +SKIP
    >>> ts = jaxdiff.schedules.log_snr_uniform(process, 10)              # doctest: +SKIP
    >>> images = jaxdiff.sample(jaxdiff.samplers.dpm_solver_pp(process), denoise, x_T, ts).x
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.parameterization import Denoiser
from jaxdiff.processes import DiscreteVP, Process

__all__ = [
    "load_diffusers_unet",
    "load_diffusers_scheduler",
    "load_diffusers",
    "DiffusersUNet",
    "timestep_embedding",
]

WEIGHTS = "diffusion_pytorch_model.safetensors"
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
# UNet2DModel's arguments and the values this loader supports (None: any value)
_UNET_SUPPORTED = {
    "sample_size": None,
    "in_channels": None,
    "out_channels": None,
    "center_input_sample": None,
    "time_embedding_type": ("positional",),
    "time_embedding_dim": None,
    "freq_shift": None,
    "flip_sin_to_cos": None,
    "down_block_types": None,
    "up_block_types": None,
    "mid_block_type": ("UNetMidBlock2D", None),
    "block_out_channels": None,
    "layers_per_block": None,
    "mid_block_scale_factor": None,
    "downsample_padding": None,
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "dropout": None,  # inference: dropout is the identity
    "act_fn": ("silu", "swish"),
    "attention_head_dim": None,
    "norm_num_groups": None,
    "attn_norm_num_groups": None,
    "norm_eps": None,
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "add_attention": None,
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "num_train_timesteps": None,
}
# old diffusers names of the attention projections (before the Attention class)
_ATTENTION_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


# ----------------------------------------------------------------------------------------------
# Reading the folder
# ----------------------------------------------------------------------------------------------
def _subfolder(folder, name: str, sub: str) -> Path:
    """``folder/name`` or, for a pipeline folder, ``folder/sub/name``; a clear error otherwise."""
    folder = Path(folder)
    for candidate in (folder / name, folder / sub / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{folder / name} not found (nor {folder / sub / name}): pass a diffusers model folder "
        f"holding {name} (saved with save_pretrained) or a pipeline folder with a {sub}/ "
        "subfolder. jaxdiff never downloads weights: download the model to a local folder first."
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


class _StateDict:
    """The safetensors state dict of one file; takes tensors by name and knows what is left."""

    def __init__(self, path: Path):
        from safetensors.numpy import load_file

        self.path, self.tensors, self.used = path, load_file(str(path)), set()

    def take(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(
                f"{self.path} has no tensor {name!r} that its config.json implies; the weights do "
                "not match the config (a different model, or an unsupported variant)."
            )
        self.used.add(name)
        return np.asarray(self.tensors[name], np.float32)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def check_all_used(self):
        left = sorted(set(self.tensors) - self.used)
        if left:
            raise ValueError(
                f"{self.path} has tensors the loaded network does not use: {left[:8]}"
                f"{' ...' if len(left) > 8 else ''}; the config.json does not describe them."
            )


def _check_unet_config(config: dict, path: Path):
    """Every key known and every value supported, or a ``ValueError`` naming it and the file."""
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in _UNET_SUPPORTED:
            raise ValueError(
                f"{path}: unsupported UNet2DModel config key {key!r} = {value!r}; jaxdiff reads "
                f"{', '.join(sorted(_UNET_SUPPORTED))}."
            )
        allowed = _UNET_SUPPORTED[key]
        if allowed is not None and value not in allowed:
            raise ValueError(
                f"{path}: unsupported {key} = {value!r}; jaxdiff supports {list(allowed)}."
            )
    for key, kinds in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for kind in config.get(key, ()):
            if kind not in kinds:
                raise ValueError(
                    f"{path}: unsupported block type {kind!r} in {key}; jaxdiff supports "
                    f"{', '.join(kinds)}."
                )


# ----------------------------------------------------------------------------------------------
# Layers (NHWC), built from the state dict
# ----------------------------------------------------------------------------------------------
def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos=True, freq_shift=0.0,
                       max_period=10_000.0):  # fmt: skip
    r"""diffusers' sinusoidal embedding of (possibly fractional) steps ``(batch,) -> (batch, dim)``:

    .. math:: \omega_k = \exp\Big(-\frac{k\log P}{d/2 - \text{shift}}\Big),\quad
        [\sin(n\omega), \cos(n\omega)]

    (``[cos, sin]`` when ``flip_sin_to_cos``), zero-padded to an odd ``dim``; Ho et al. 2020's
    embedding with DDPM's ``freq_shift = 1``.
    """
    half = dim // 2
    freqs = jnp.exp(
        -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    )
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class _Conv(nnx.Module):
    """A PyTorch ``Conv2d`` on NHWC: kernel OIHW -> HWIO, explicit padding (``(lo, hi)`` per axis)."""

    def __init__(self, sd: _StateDict, name: str, *, stride=1, padding=((1, 1), (1, 1))):
        self.kernel = nnx.Param(jnp.asarray(sd.take(f"{name}.weight").transpose(2, 3, 1, 0)))
        self.bias = nnx.Param(jnp.asarray(sd.take(f"{name}.bias")))
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), (self.stride,) * 2, self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        return y + self.bias[...].astype(x.dtype)


class _Linear(nnx.Module):
    """A PyTorch ``Linear`` (weight ``(out, in)``, or a 1x1 conv's ``(out, in, 1, 1)``)."""

    def __init__(self, sd: _StateDict, name: str):
        w = sd.take(f"{name}.weight")
        self.kernel = nnx.Param(jnp.asarray(w.reshape(w.shape[:2]).T))
        self.bias = nnx.Param(jnp.asarray(sd.take(f"{name}.bias")))

    def __call__(self, x):
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class _GroupNorm(nnx.Module):
    """PyTorch's ``GroupNorm`` on the last axis (groups of consecutive channels), in float32."""

    def __init__(self, sd: _StateDict, name: str, groups: int, eps: float):
        self.scale = nnx.Param(jnp.asarray(sd.take(f"{name}.weight")))
        self.bias = nnx.Param(jnp.asarray(sd.take(f"{name}.bias")))
        self.groups, self.eps = groups, float(eps)

    def __call__(self, x):
        c = x.shape[-1]
        h = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)
        mean = jnp.mean(h, axis=axes, keepdims=True)
        var = jnp.mean((h - mean) ** 2, axis=axes, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (h * self.scale[...] + self.bias[...]).astype(x.dtype)


class _ResnetBlock(nnx.Module):
    """diffusers' ``ResnetBlock2D``: GN-SiLU-conv, + time (``default``: a bias before the second
    norm; ``scale_shift``: :math:`h(1 + s) + b` after it), GN-SiLU-conv, skip, / scale factor."""

    def __init__(self, sd, name, opts, scale_factor=1.0):
        groups, eps, self.scale_shift = opts
        self.norm1 = _GroupNorm(sd, f"{name}.norm1", groups, eps)
        self.conv1 = _Conv(sd, f"{name}.conv1")
        self.time_emb_proj = _Linear(sd, f"{name}.time_emb_proj")
        self.norm2 = _GroupNorm(sd, f"{name}.norm2", groups, eps)
        self.conv2 = _Conv(sd, f"{name}.conv2")
        shortcut = f"{name}.conv_shortcut"
        self.conv_shortcut = (
            _Conv(sd, shortcut, padding=((0, 0), (0, 0))) if sd.has(f"{shortcut}.weight") else None
        )
        self.scale_factor = float(scale_factor)

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        e = self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1.0 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(jax.nn.silu(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.scale_factor


class _Attention(nnx.Module):
    r"""diffusers' spatial self-attention: optional GN, heads of width ``head_dim``,
    :math:`\mathrm{softmax}(QK^\top/\sqrt{d_h})V` in float32, output projection, residual,
    / scale factor. Reads the current names (``to_q`` ...) and the old ones (``query`` ...)."""

    def __init__(self, sd, name, *, head_dim, groups, eps, scale_factor=1.0):
        def proj(key):
            old = f"{name}.{_ATTENTION_ALIASES[key]}"
            return _Linear(sd, old if sd.has(f"{old}.weight") else f"{name}.{key}")

        self.group_norm = (
            None if groups is None else _GroupNorm(sd, f"{name}.group_norm", groups, eps)
        )
        self.to_q, self.to_k, self.to_v, self.to_out = (proj(k) for k in _ATTENTION_ALIASES)
        channels = self.to_q.kernel.shape[1]
        self.heads = max(channels // (head_dim or channels), 1)
        self.scale_factor = float(scale_factor)

    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        h = h.reshape(b, hgt * wid, c)
        split = lambda y: y.reshape(b, hgt * wid, self.heads, -1)
        q, k, v = split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        a = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt * wid, -1)
        return (self.to_out(a).reshape(x.shape) + x) / self.scale_factor


class _Block(nnx.Module):
    """A down or up block: resnets, each followed by attention in the ``Attn`` kinds, and a
    down-sampling (stride-2 conv) or up-sampling (nearest x2, conv) at the end."""

    def __init__(self, sd, name, n_layers, attention, opts, head_dim):
        groups, eps, _ = opts
        self.resnets = nnx.List(
            [_ResnetBlock(sd, f"{name}.resnets.{j}", opts) for j in range(n_layers)]
        )
        self.attentions = nnx.List(
            [
                _Attention(sd, f"{name}.attentions.{j}", head_dim=head_dim, groups=groups, eps=eps)
                for j in range(n_layers if attention else 0)
            ]
        )

    def layer(self, j, h, temb):
        h = self.resnets[j](h, temb)
        return self.attentions[j](h) if len(self.attentions) else h


class _MidBlock(nnx.Module):
    """``UNetMidBlock2D``: resnet, attention (unless ``add_attention`` is false), resnet, with
    ``mid_block_scale_factor``; its attention has a norm only with the ``default`` time shift
    (or ``attn_norm_num_groups``)."""

    def __init__(self, sd, c, opts, head_dim):
        groups, eps, shift = opts
        scale = float(c["mid_block_scale_factor"] or 1.0)
        attn_groups = c["attn_norm_num_groups"]
        if attn_groups is None and not shift:
            attn_groups = groups
        self.resnets = nnx.List(
            [_ResnetBlock(sd, f"mid_block.resnets.{j}", opts, scale) for j in (0, 1)]
        )
        add_attention = c["add_attention"] is None or bool(c["add_attention"])
        self.attention = (
            _Attention(
                sd,
                "mid_block.attentions.0",
                head_dim=head_dim,
                groups=attn_groups,
                eps=eps,
                scale_factor=scale,
            )  # fmt: skip
            if add_attention
            else None
        )

    def __call__(self, h, temb):
        h = self.resnets[0](h, temb)
        h = h if self.attention is None else self.attention(h)
        return self.resnets[1](h, temb)


def _nearest_up(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class DiffusersUNet(nnx.Module):
    """diffusers' ``UNet2DModel`` as an NNX module ``net(x_nhwc, timesteps) -> out_nhwc``.

    Built by :func:`load_diffusers_unet` from a model folder; ``timesteps`` is a scalar or has
    shape ``(batch,)`` (fractional steps are fine: the embedding is sinusoidal). ``dtype`` is the
    computation dtype (parameters stay float32; norms and softmax run in float32).
    """

    def __init__(self, config: dict, sd: _StateDict, *, dtype=jnp.float32):
        c = {**{k: None for k in _UNET_SUPPORTED}, **config}
        channels = list(c["block_out_channels"] or (224, 448, 672, 896))
        groups, eps = c["norm_num_groups"] or 32, float(c["norm_eps"] or 1e-5)
        shift = (c["resnet_time_scale_shift"] or "default") == "scale_shift"
        opts, layers = (groups, eps, shift), c["layers_per_block"] or 2
        head_dim = c["attention_head_dim"] if "attention_head_dim" in config else 8
        self.in_channels, self.out_channels = c["in_channels"] or 3, c["out_channels"] or 3
        self.center_input_sample = bool(c["center_input_sample"])
        self.flip_sin_to_cos = True if c["flip_sin_to_cos"] is None else bool(c["flip_sin_to_cos"])
        self.freq_shift, self.time_features = float(c["freq_shift"] or 0), channels[0]
        self.dtype = dtype
        self.conv_in = _Conv(sd, "conv_in")
        self.time_1 = _Linear(sd, "time_embedding.linear_1")
        self.time_2 = _Linear(sd, "time_embedding.linear_2")
        pad = c["downsample_padding"]
        pad = 1 if pad is None else int(pad)
        down_pad = ((pad, pad),) * 2 if pad else ((0, 1), (0, 1))
        down, self.downsamplers = [], nnx.List([])
        for i, kind in enumerate(c["down_block_types"]):
            name = f"down_blocks.{i}"
            last = i == len(channels) - 1
            down.append(_Block(sd, name, layers, kind.startswith("Attn"), opts, head_dim))
            if not last:
                conv = _Conv(sd, f"{name}.downsamplers.0.conv", stride=2, padding=down_pad)
                self.downsamplers.append(conv)
        self.down_blocks = nnx.List(down)
        has_mid = config.get("mid_block_type", "UNetMidBlock2D") is not None
        self.mid = _MidBlock(sd, c, opts, head_dim) if has_mid else None
        up, self.upsamplers = [], nnx.List([])
        for i, kind in enumerate(c["up_block_types"]):
            name = f"up_blocks.{i}"
            last = i == len(channels) - 1
            up.append(_Block(sd, name, layers + 1, kind.startswith("Attn"), opts, head_dim))
            if not last:
                self.upsamplers.append(_Conv(sd, f"{name}.upsamplers.0.conv"))
        self.up_blocks = nnx.List(up)
        self.norm_out = _GroupNorm(sd, "conv_norm_out", groups, eps)
        self.conv_out = _Conv(sd, "conv_out")

    def __call__(self, x, timesteps):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"DiffusersUNet expects NHWC images with {self.in_channels} channels; got shape "
                f"{x.shape} (transpose NCHW arrays with x.transpose(0, 2, 3, 1))."
            )
        dtype_in = x.dtype
        x = x.astype(self.dtype)
        if self.center_input_sample:
            x = 2.0 * x - 1.0
        n = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), x.shape[:1])
        emb = timestep_embedding(
            n, self.time_features, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        temb = self.time_2(jax.nn.silu(self.time_1(emb.astype(self.dtype))))
        h = self.conv_in(x)
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            for j in range(len(block.resnets)):
                h = block.layer(j, h, temb)
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
                skips.append(h)
        if self.mid is not None:
            h = self.mid(h, temb)
        for i, block in enumerate(self.up_blocks):
            for j in range(len(block.resnets)):
                h = block.layer(j, jnp.concatenate([h, skips.pop()], axis=-1), temb)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](_nearest_up(h))
        out = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return out.astype(dtype_in)


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------
def load_diffusers_unet(folder, *, dtype=jnp.float32) -> DiffusersUNet:
    """A diffusers ``UNet2DModel`` folder as an NNX module ``net(x_nhwc, timesteps)``.

    Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` from ``folder`` (or from
    ``folder/unet`` of a pipeline folder). Unknown config keys, unsupported values or block types,
    and weights that do not match the config are ``ValueError``\\ s naming the file; a missing file is
    a ``FileNotFoundError``. See the module docstring for what is supported.

    Example:
        >>> import jax.numpy as jnp                                     # doctest: +SKIP
        >>> net = load_diffusers_unet("ddpm-cifar10")                   # doctest: +SKIP
        >>> net(jnp.zeros((1, 32, 32, 3)), 999).shape                   # doctest: +SKIP
        (1, 32, 32, 3)
    """
    config_path = _subfolder(folder, "config.json", "unet")
    config = _read_json(config_path)
    _check_unet_config(config, config_path)
    weights = config_path.parent / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: jaxdiff reads the safetensors weights saved by diffusers' "
            "save_pretrained (a .bin checkpoint can be converted with safetensors' torch API)."
        )
    sd = _StateDict(weights)
    for key in ("down_block_types", "up_block_types"):
        if key not in config:
            raise ValueError(f"{config_path}: {key} is required.")
    net = DiffusersUNet(config, sd, dtype=dtype)
    sd.check_all_used()
    return net


_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_TABLES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def load_diffusers_scheduler(folder) -> tuple[DiscreteVP, str]:
    """``(DiscreteVP, prediction)`` from a diffusers ``scheduler_config.json``.

    ``beta_schedule`` ``linear`` -> :meth:`DiscreteVP.linear`, ``scaled_linear`` ->
    :meth:`DiscreteVP.scaled_linear`, ``squaredcos_cap_v2`` -> :meth:`DiscreteVP.cosine` (with
    ``num_train_timesteps``, ``beta_start``, ``beta_end``), or an explicit ``trained_betas`` list;
    ``prediction_type`` ``epsilon`` -> ``"eps"``, ``v_prediction`` -> ``"v"``, ``sample`` ->
    ``"x0"``. Reads ``folder/scheduler_config.json`` or ``folder/scheduler/scheduler_config.json``.
    """
    path = _subfolder(folder, "scheduler_config.json", "scheduler")
    config = _read_json(path)
    n = int(config.get("num_train_timesteps", 1000))
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"{path}: unsupported prediction_type {prediction!r}; jaxdiff supports "
            f"{', '.join(_PREDICTIONS)}."
        )
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(
            f"{path}: rescale_betas_zero_snr = true (a zero terminal SNR, beta = 1) is not "
            "supported: DiscreteVP needs betas in (0, 1)."
        )
    if config.get("trained_betas") is not None:
        return DiscreteVP(np.asarray(config["trained_betas"], np.float64)), _PREDICTIONS[prediction]
    schedule = config.get("beta_schedule", "linear")
    if schedule not in _TABLES:
        raise ValueError(
            f"{path}: unsupported beta_schedule {schedule!r}; jaxdiff supports "
            f"{', '.join(_TABLES)} (or trained_betas)."
        )
    if schedule == "squaredcos_cap_v2":
        process = DiscreteVP.cosine(n)
    else:
        start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
        process = getattr(DiscreteVP, schedule)(n, float(start), float(end))
    return process, _PREDICTIONS[prediction]


class AtTimestep(eqx.Module):
    """``fn(x, t) = net(x, process.timestep(t))``: a step-indexed network in continuous time.

    ``net`` is split NNX state (``graphdef`` static, parameters traced), so a jitted sampler
    reuses its compilation for new weights of the same shapes. ``half`` selects the first half of
    the output channels of a learned-variance network (``None``: the whole output).
    """

    graphdef: object = eqx.field(static=True)
    state: object
    process: Process
    half: bool = eqx.field(static=True, default=False)

    def __call__(self, x, t):
        net = nnx.merge(self.graphdef, self.state, copy=True)
        out = net(x, self.process.timestep(t))
        return out[..., : x.shape[-1]] if self.half else out


def load_diffusers(folder, *, dtype=jnp.float32) -> Denoiser:
    r"""A diffusers folder (network + scheduler) as a jaxdiff denoiser in continuous time.

    The network :func:`load_diffusers_unet` is called at ``process.timestep(t)`` :math:`= Nt - 1`
    of the scheduler's :class:`~jaxdiff.processes.DiscreteVP` (:func:`load_diffusers_scheduler`)
    and its prediction converted to :math:`\hat x_0`:

    .. math:: D(x, t) = \frac{x - \sigma_t\,\epsilon_\theta(x, Nt - 1)}{\alpha_t}
        \quad(\text{for } \texttt{epsilon}).

    The result is a pytree (:class:`~jaxdiff.parameterization.Denoiser`) whose ``.process`` is the
    DiscreteVP: pass both to any sampler. A network with twice the output channels (a learned
    variance) gives its first half. A pipeline folder (``unet/``, ``scheduler/``) or a flat folder
    holding both files works.

    Example:
        >>> import jax, jaxdiff                                           # doctest: +SKIP
        >>> denoise = load_diffusers("ddpm-cifar10")                      # doctest: +SKIP
        >>> p = denoise.process                                           # doctest: +SKIP
        >>> x_T = p.prior_sample((4, 32, 32, 3), key=jax.random.key(0))   # doctest: +SKIP
        >>> x = jaxdiff.sample(jaxdiff.samplers.dpm_solver_pp(p), denoise, x_T,
        ...                    jaxdiff.schedules.log_snr_uniform(p, 10)).x  # doctest: +SKIP
    """
    net = load_diffusers_unet(folder, dtype=dtype)
    process, prediction = load_diffusers_scheduler(folder)
    if net.out_channels not in (net.in_channels, 2 * net.in_channels):
        raise ValueError(
            f"{folder}: the network has {net.out_channels} output channels for "
            f"{net.in_channels} input channels; a denoiser needs as many (or twice as many, for a "
            "learned variance)."
        )
    graphdef, state = nnx.split(net)
    fn = AtTimestep(graphdef, state, process, half=net.out_channels != net.in_channels)
    return Denoiser(fn, process, prediction)
