"""Run configurations: frozen dataclasses, presets, and the factories that turn them into objects.

This is the only place where names (``"vp"``, ``"unet"``, ``"moons"``) become library objects;
the library itself is built by direct construction. Every field is overridable on the command
line (``python -m experiments.train --preset digits --model.channels 64 --lr 1e-3``).

Presets: ``toy2d`` (MLP on two moons), ``digits`` (small class-conditional U-Net on scikit-learn's
8x8 digits), ``digits_hybrid`` (the same U-Net with learned variances, trained with Improved DDPM's
hybrid loss on DDPM's 1000-step linear DiscreteVP), ``mnist`` (U-Net, 28x28, IDX files from
``data.path``), ``cifar10`` (DDPM++-style U-Net with the EDM loss, python batches from
``data.path``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import jax.numpy as jnp
from flax import nnx

import jaxdiff
from jaxdiff import data as jdata
from jaxdiff import discrete, losses, nets, training

__all__ = [
    "ModelConfig",
    "DataConfig",
    "Config",
    "PRESETS",
    "get_preset",
    "to_json",
    "from_json",
    "make_process",
    "make_loss",
    "make_model",
    "make_optimizer",
    "data_levels",
    "load_data",
    "workdir_of",
]

ProcessName = Literal[
    "vp", "vp_cosine", "subvp", "ve", "edm", "rectified_flow", "ddpm", "ddpm_cosine"
]  # ddpm*: DiscreteVP.linear() / .cosine(), 1000 steps
LossName = Literal["eps", "x0", "v", "flow", "edm", "hybrid"]
_PREDICTION_OF_LOSS = {
    "eps": "eps",
    "x0": "x0",
    "v": "v",
    "flow": "flow",
    "edm": "edm",
    "hybrid": "eps",
}


@dataclass(frozen=True)
class ModelConfig:
    """The network. ``kind="mlp"`` uses ``hidden``/``depth``; ``"unet"`` the convolution fields."""

    kind: Literal["mlp", "unet"] = "mlp"
    hidden: int = 128
    depth: int = 3
    channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    embedding: Literal["sinusoidal", "fourier"] = "sinusoidal"
    class_conditional: bool = False


@dataclass(frozen=True)
class DataConfig:
    """The data: a toy set (``moons``, ``swiss_roll``, ``checkerboard``, ``rings``,
    ``gaussian_mixture``), ``digits``, ``mnist``/``cifar10`` (files in ``path``), ``npz`` (file
    ``path``) or ``folder`` (images in ``path``)."""

    name: str = "moons"
    path: str | None = None
    num_examples: int = 20_000
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """One training run; ``workdir`` defaults to ``runs/<preset>``."""

    preset: str = "toy2d"
    workdir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessName = "vp"
    prediction: Literal["eps", "x0", "v", "flow", "edm"] = "eps"
    loss: LossName = "eps"
    sigma_data: float = 0.5
    lr: float = 1e-3
    warmup: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to 0 at `steps`
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    batch_size: int = 256
    grad_accum: int = 1  # micro-batches per step (gradient accumulation inside the jitted step)
    steps: int = 3000
    ema_decay: float = 0.999
    # power-function EMA widths tracked for post-hoc EMA (EDM2); empty: none
    ema_profiles: tuple[float, ...] = (0.05, 0.10)
    ema_snapshot_every: int | None = None  # post-hoc EMA snapshots (default: checkpoint_every)
    p_uncond: float = 0.1
    seed: int = 0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    log_every: int = 100
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sampler: str = "ddim"
    sample_steps: int = 50
    num_samples: int = 1000
    progress: bool = True
    compile_cache: bool = True  # JAX's persistent compilation cache (a rerun does not recompile)
    compile_cache_dir: str | None = None  # default: <workdir>/jax_cache

    def __post_init__(self):
        if _PREDICTION_OF_LOSS[self.loss] != self.prediction:
            raise ValueError(
                f"loss={self.loss!r} trains a network that predicts "
                f"{_PREDICTION_OF_LOSS[self.loss]!r}, but prediction={self.prediction!r}; set "
                f"--prediction {_PREDICTION_OF_LOSS[self.loss]}."
            )
        discrete_process = self.process in ("ddpm", "ddpm_cosine")
        if self.loss == "hybrid" and (not discrete_process or self.model.kind != "unet"):
            raise ValueError(
                "loss='hybrid' (learned variances) needs a discrete process and a U-Net: "
                "--process ddpm (or ddpm_cosine) --model.kind unet."
            )
        for name in (
            "steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}."
            )
        if self.ema_snapshot_every is not None and self.ema_snapshot_every < 1:
            raise ValueError(f"ema_snapshot_every must be >= 1, got {self.ema_snapshot_every}.")
        for s in self.ema_profiles:
            training.sigma_rel_to_gamma(s)  # a clear error for a width out of range


PRESETS: dict[str, Config] = {
    "toy2d": Config(preset="toy2d"),
    "digits": Config(
        preset="digits",
        data=DataConfig(name="digits"),
        model=ModelConfig(
            kind="unet", channels=32, channel_mults=(1, 2), attn_resolutions=(4,),
            class_conditional=True,
        ),
        lr=1e-3, warmup=200, batch_size=128, steps=4000, ema_decay=0.999,
        log_every=100, sample_every=1000, checkpoint_every=1000, num_samples=100,
    ),
    "digits_hybrid": Config(
        preset="digits_hybrid",
        data=DataConfig(name="digits"),
        model=ModelConfig(
            kind="unet", channels=32, channel_mults=(1, 2), attn_resolutions=(4,),
            class_conditional=True,
        ),
        process="ddpm", loss="hybrid",
        lr=1e-3, warmup=200, batch_size=128, steps=4000, ema_decay=0.999,
        log_every=100, sample_every=1000, checkpoint_every=1000, num_samples=100,
    ),
    "mnist": Config(
        preset="mnist",
        data=DataConfig(name="mnist", path="data/mnist"),
        model=ModelConfig(
            kind="unet", channels=32, channel_mults=(1, 2, 2), attn_resolutions=(7,),
            class_conditional=True,
        ),
        lr=5e-4, warmup=500, batch_size=128, steps=30_000, ema_decay=0.9995,
        log_every=200, sample_every=5000, checkpoint_every=2000, num_samples=100,
    ),
    "cifar10": Config(
        preset="cifar10",
        data=DataConfig(name="cifar10", path="data/cifar10"),
        model=ModelConfig(
            kind="unet", channels=64, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
            attn_resolutions=(16,), dropout=0.1, class_conditional=True,
        ),
        process="edm", prediction="edm", loss="edm", sampler="heun", sample_steps=18,
        lr=2e-4, warmup=5000, batch_size=128, steps=400_000, ema_decay=0.9999,
        log_every=500, sample_every=20_000, checkpoint_every=5000, num_samples=64,
    ),
}  # fmt: skip


def get_preset(name: str) -> Config:
    """The preset ``name`` (``toy2d``, ``digits``, ``mnist``, ``cifar10``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def workdir_of(config: Config) -> str:
    return config.workdir or f"runs/{config.preset}"


def to_json(config: Config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)


def from_json(text: str) -> Config:
    """Inverse of :func:`to_json` (tuples restored from JSON lists)."""
    d = json.loads(text)
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("model").items()}
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return Config(model=ModelConfig(**model), data=DataConfig(**d.pop("data")), **d)


# ----------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------
def make_process(config: Config) -> jaxdiff.Process:
    match config.process:
        case "vp":
            return jaxdiff.VP()
        case "vp_cosine":
            return jaxdiff.VPCosine()
        case "subvp":
            return jaxdiff.SubVP()
        case "ve":
            return jaxdiff.VE()
        case "edm":
            return jaxdiff.EDM()
        case "rectified_flow":
            return jaxdiff.RectifiedFlow()
        case "ddpm":
            return jaxdiff.DiscreteVP.linear()
        case "ddpm_cosine":
            return jaxdiff.DiscreteVP.cosine()
    raise ValueError(f"unknown process {config.process!r}.")


def make_loss(config: Config):
    """The per-example loss ``loss(apply_fn, process, x0, *, key)`` of the config."""
    match config.loss:
        case "eps":
            return losses.eps_loss
        case "x0":
            return losses.x0_loss
        case "v":
            return losses.v_loss
        case "flow":
            return losses.flow_loss
        case "hybrid":
            decoder = discrete.DiscretizedGaussianDecoder(levels=data_levels(config))
            return lambda f, p, x0, *, key: discrete.hybrid_loss(f, p, x0, key=key, decoder=decoder)
        case "edm":
            return lambda f, p, x0, *, key: losses.edm_loss(
                f, p, x0, key=key, sigma_data=config.sigma_data
            )
    raise ValueError(f"unknown loss {config.loss!r}.")


def load_data(config: Config) -> jdata.ArrayDataset:
    """The training set named by ``config.data``."""
    d = config.data
    if d.name in jdata.TOY_SETS:
        return jdata.toy_2d(d.name, d.num_examples, seed=d.seed)
    if d.name == "digits":
        return jdata.digits()
    if d.name in ("mnist", "cifar10", "npz", "folder") and d.path is None:
        raise ValueError(f"data.name={d.name!r} needs --data.path (where the files are).")
    try:
        match d.name:
            case "mnist":
                return jdata.load_mnist(d.path)
            case "cifar10":
                return jdata.load_cifar10(d.path)
            case "npz":
                y_key = "y" if config.model.class_conditional else None
                return jdata.load_npz(d.path, y_key=y_key)
            case "folder":
                return jdata.load_image_folder(d.path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Or set --data.path to the folder that holds them.") from e
    raise ValueError(
        f"unknown data.name {d.name!r}; choose one of {', '.join(jdata.TOY_SETS)}, digits, "
        "mnist, cifar10, npz, folder."
    )


def make_model(config: Config, shape: tuple[int, ...], num_classes: int | None) -> nnx.Module:
    """The network for examples of ``shape`` (``(d,)`` for the MLP, ``(H, W, C)`` for the U-Net)."""
    m = config.model
    if m.class_conditional and num_classes is None:
        raise ValueError("model.class_conditional needs a data set with labels.")
    k = num_classes if m.class_conditional else None
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    rngs = nnx.Rngs(config.seed)
    if m.kind == "mlp":
        if len(shape) != 1:
            raise ValueError(f"model.kind='mlp' needs vector data; got examples of shape {shape}.")
        return nets.MLP(
            shape[0], hidden=m.hidden, depth=m.depth, num_classes=k, embedding=m.embedding,
            dropout=m.dropout, dtype=dtype, rngs=rngs,
        )  # fmt: skip
    if len(shape) != 3 or shape[0] != shape[1]:
        raise ValueError(
            f"model.kind='unet' needs square NHWC images; got examples of shape {shape}."
        )
    return nets.UNet(
        shape[2], image_size=shape[0], channels=m.channels, channel_mults=m.channel_mults,
        num_res_blocks=m.num_res_blocks, attn_resolutions=m.attn_resolutions, dropout=m.dropout,
        num_classes=k, embedding=m.embedding, dtype=dtype, rngs=rngs,
        out_channels=2 * shape[2] if config.loss == "hybrid" else None,
    )  # fmt: skip


def data_levels(config: Config) -> int:
    """Number of intensity levels of an image data set (scikit-learn's digits: 0..16)."""
    return 17 if config.data.name == "digits" else 256


def make_optimizer(config: Config):
    decay_steps = config.steps if config.lr_schedule == "cosine" else None
    return training.make_optimizer(
        config.lr,
        config.warmup,
        config.grad_clip,
        weight_decay=config.weight_decay,
        decay_steps=decay_steps,
    )
