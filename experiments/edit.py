"""Edit digits through the probability-flow ODE: ``python -m experiments.edit RUN_DIR``.

Writes three figures to ``RUN_DIR/edit/`` (or ``--workdir``), each with a ``.npz`` of its rows
(arrays in ``[-1, 1]``, keyed ``"<row> <label>"``):

- ``inpaint.png``: digits with their right (or bottom) half masked, filled by replacement
  (``resample=1``) and with RePaint resampling (``--resample``), next to the originals;
- ``sdedit.png``: rough stroke drawings (blocky versions of digits, hand-drawn glyphs) edited by
  SDEdit from several start times: near ``t_min`` the strokes stay, near ``t_max`` they are
  forgotten;
- ``interpolate.png``: strips between pairs of digits, by spherical interpolation of their DDIM
  encodings.

``--exact`` needs no trained run: it uses the optimal denoiser of the digits data itself
(:class:`analytic.Empirical`, a softmax-weighted mean of the 1797 training digits) under a
VP process; its samples are training digits, which makes the edits easy to read.

Example:
    python -m experiments.train --preset digits --workdir runs/digits --steps 2000
    python -m experiments.edit runs/digits
    python -m experiments.edit --exact --workdir runs/digits_exact
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxdiff
from experiments import common
from jaxdiff import analytic, editing, samplers, schedules
from jaxdiff import data as jdata

__all__ = ["EditConfig", "main", "strokes", "half_mask", "start_grid"]


def load_model(args):
    """``(denoise, process, data)``: a trained run, or the exact denoiser of the digits."""
    digits = np.asarray(jdata.digits().x)
    if args.exact:
        process = jaxdiff.VP()
        return analytic.Empirical(jnp.asarray(digits)).denoiser(process), process, digits
    from experiments.common import load_denoiser

    denoise, process, config = load_denoiser(args.model_dir)
    if config.data.name != "digits":
        raise ValueError(
            f"{args.model_dir} is a run on {config.data.name!r}; experiments.edit edits 8x8 "
            "digits: give a run of the digits preset (or --exact)."
        )
    return denoise, process, digits


def half_mask(shape, side: str):
    """1 on the known half of ``(H, W, C)`` images (left or top), 0 on the half to fill."""
    h, w, c = shape
    mask = np.zeros((1, h, w, c), np.float32)
    if side == "left":
        mask[:, :, : w // 2] = 1
    else:
        mask[:, : h // 2] = 1
    return mask


_GLYPHS = {
    "zero": "..####.. .#....#. .#....#. .#....#. .#....#. .#....#. ..####.. ........",
    "one": "....#... ...##... ....#... ....#... ....#... ....#... ...###.. ........",
    "seven": ".######. ......#. .....#.. ....#... ...#.... ...#.... ...#.... ........",
    "four": ".#...#.. .#...#.. .#...#.. .######. .....#.. .....#.. .....#.. ........",
}


def strokes(digits: np.ndarray, num_blocky: int, *, seed: int):
    """Rough drawings in ``[-1, 1]``: hand-drawn glyphs and digits pooled to 4x4, thresholded."""
    glyphs = np.array(
        [
            [[1.0 if ch == "#" else -1.0 for ch in row] for row in g.split()]
            for g in _GLYPHS.values()
        ]
    )
    idx = np.random.default_rng(seed).choice(len(digits), num_blocky, replace=False)
    x = digits[idx, :, :, 0]
    pooled = x.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    blocky = np.where(pooled > -0.3, 1.0, -1.0).repeat(2, axis=1).repeat(2, axis=2)
    return np.concatenate([glyphs, blocky])[..., None].astype(np.float32)


def start_grid(process, t0: float, n: int):
    """``n`` log-SNR-uniform steps from ``t0`` down to ``t_min``, then 0 (an SDEdit grid)."""
    lam = jnp.linspace(
        process.log_snr(jnp.asarray(t0)), process.log_snr(jnp.asarray(process.t_min)), n
    )
    ts = jnp.clip(process.t_from_log_snr(lam), process.t_min, t0)
    return schedules.append_zero(ts.at[0].set(t0).at[-1].set(process.t_min))


def save_rows(path: Path, rows: list[tuple[str, np.ndarray]], title: str):
    """One figure, one labelled row of images per entry (NHWC in ``[-1, 1]``)."""
    plt = common.pyplot()
    cols = max(len(r) for _, r in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.75 * cols + 1.6, 0.8 * len(rows) + 0.6))
    for ax, (label, imgs) in zip(np.atleast_1d(axes), rows, strict=True):
        n, h, w, _ = imgs.shape
        strip = np.ones((h, cols * (w + 1)), np.float32)
        for i in range(n):
            strip[:, i * (w + 1) : i * (w + 1) + w] = np.clip((imgs[i, ..., 0] + 1) / 2, 0, 1)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_inpaint(args, denoise, process, digits, key):
    idx = np.random.default_rng(args.seed).choice(len(digits), args.num, replace=False)
    x = jnp.asarray(digits[idx])
    ts = schedules.log_snr_uniform(process, args.steps)
    sampler = samplers.ddpm(process)
    rows = []
    for side in ("left", "top"):
        mask = jnp.asarray(half_mask(x.shape[1:], side))
        shown = jnp.where(mask == 1, x, 0.0)  # the unknown half drawn gray
        rows += [("original", np.asarray(x)), (f"known ({side})", np.asarray(shown))]
        for r in (1, args.resample):
            out = editing.inpaint(
                sampler, denoise, x, mask, ts, key=jax.random.fold_in(key, r), resample=r
            )
            rows.append((f"resample={r}", np.asarray(out)))
    return rows


def run_sdedit(args, denoise, process, digits, key):
    x = jnp.asarray(strokes(digits, args.num - len(_GLYPHS), seed=args.seed + 1))
    sampler = samplers.ddpm(process)
    rows = [("strokes", np.asarray(x))]
    for frac in args.sdedit_starts:
        t0 = process.t_min + frac * (process.t_max - process.t_min)
        ts = start_grid(process, t0, args.steps)
        out = editing.sdedit(sampler, denoise, x, ts, key=jax.random.fold_in(key, int(1000 * frac)))
        rows.append((f"t0={t0:.2f}", np.asarray(out)))
    return rows


def run_interpolate(args, denoise, process, digits, key):
    rng = np.random.default_rng(args.seed + 2)
    pairs = rng.choice(len(digits), (2, args.pairs), replace=False)
    x_a, x_b = jnp.asarray(digits[pairs[0]]), jnp.asarray(digits[pairs[1]])
    ts = schedules.log_snr_uniform(process, args.steps)
    lambdas = jnp.linspace(0.0, 1.0, args.num)
    strips = editing.interpolate(process, denoise, x_a, x_b, ts, lambdas)  # (L, pairs, ...)
    return [(f"pair {p}", np.asarray(strips[:, p])) for p in range(args.pairs)]


@dataclass(frozen=True)
class EditConfig:
    """Which model, where to write, and how much to compute."""

    run_dir: Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")] = None
    """Run folder of experiments.train (a digits run; default runs/digits)."""
    workdir: str | None = None
    """Output folder (default RUN_DIR/edit)."""
    exact: bool = False
    """Use the exact denoiser of the digits data (no trained run needed)."""
    steps: int = 50
    """Sampler steps."""
    resample: int = 5
    """RePaint resampling (besides 1)."""
    num: int = 10
    """Images per row."""
    pairs: int = 4
    """Interpolation strips."""
    sdedit_starts: tuple[float, ...] = (0.2, 0.35, 0.5, 0.7, 1.0)
    """SDEdit start times as fractions of [t_min, t_max]."""
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "resample", "pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.num < len(_GLYPHS):
            raise ValueError(
                f"num must be >= {len(_GLYPHS)} (the hand-drawn glyphs); got {self.num}."
            )
        bad = [f for f in self.sdedit_starts if not 0.0 <= f <= 1.0]
        if bad:
            raise ValueError(f"sdedit_starts are fractions of [t_min, t_max] in [0, 1]; got {bad}.")

    @property
    def model_dir(self) -> str:
        return self.run_dir or ("runs/digits_exact" if self.exact else "runs/digits")

    @property
    def out_dir(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(self.model_dir) / "edit"


def parse_args(argv=None) -> EditConfig:
    return tyro.cli(EditConfig, args=argv, description=__doc__)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    denoise, process, digits = load_model(args)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(args.seed)
    model = "exact denoiser of the digits" if args.exact else f"run {args.model_dir}"
    files = {}
    for name, fn, title in (
        ("inpaint", run_inpaint, f"Inpainting (DDPM, {args.steps} steps, replacement / RePaint)"),
        ("sdedit", run_sdedit, f"SDEdit from strokes (DDPM, {args.steps} steps from t0)"),
        ("interpolate", run_interpolate, f"Slerp of DDIM encodings ({args.steps} steps)"),
    ):
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows = fn(args, denoise, process, digits, jax.random.fold_in(key, len(files)))
        files[name] = str(out / f"{name}.png")
        save_rows(Path(files[name]), rows, f"{title}; {model}")
        np.savez(
            out / f"{name}.npz", **{f"{i:02d} {label}": x for i, (label, x) in enumerate(rows)}
        )
    print(json.dumps(files))
    return files


if __name__ == "__main__":
    main()
