"""Sample from a trained run: ``python -m experiments.sample DIR --sampler heun --nfe 35 --seed 0``.

Loads ``DIR/config.json`` and the latest checkpoint (EMA parameters), samples with any sampler of
:mod:`jaxdiff.samplers` at a given number of network evaluations, and writes
``DIR/samples/<sampler>_nfe<N>_seed<S>.npy`` and ``.png`` (a scatter plot for 2-D data, an image
grid otherwise). The same checkpoint and seed give the same arrays.

Other scripts get a model from a run folder with :func:`load_denoiser` (or :func:`load_run`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from experiments import configs
from jaxdiff import checkpoint, guidance, samplers, schedules, training

__all__ = [
    "Run",
    "load_run",
    "load_denoiser",
    "SAMPLER_NAMES",
    "nfe_per_step",
    "steps_for_nfe",
    "make_sampler",
    "generate",
    "save_samples",
    "main",
]

# The samplers of jaxdiff.samplers the command line offers, with their default settings.
SAMPLER_NAMES = (
    "ddim", "ddpm", "euler", "euler_maruyama", "heun", "dpm_solver", "dpm_solver_pp",
    "dpm_solver_pp_sde", "ipndm", "unipc",
)  # fmt: skip


class Run(NamedTuple):
    """A trained run: its config, process, split network and restored train state."""

    config: configs.Config
    process: jaxdiff.Process
    graphdef: Any
    rest: Any
    state: training.TrainState
    num_classes: int | None
    shape: tuple[int, ...]


def load_config(workdir) -> configs.Config:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: is {workdir} a run folder of experiments.train?"
        )
    return configs.from_json(path.read_text())


def build(config: configs.Config, shape: tuple[int, ...], num_classes: int | None, *, mesh=None):
    """Model, optimizer and initial ``(state, graphdef, rest)`` of ``config`` (shared with training)."""
    model = configs.make_model(config, shape, num_classes)
    optimizer = configs.make_optimizer(config)
    key = jax.random.key(config.seed)
    return (optimizer, *training.init_train_state(model, optimizer, key=key, mesh=mesh))


def data_info(workdir) -> tuple[tuple[int, ...], int | None]:
    """Example shape and number of classes of the network, as ``experiments.train`` recorded them."""
    info = json.loads((Path(workdir) / "data_info.json").read_text())
    return tuple(info["shape"]), info["num_classes"]


def load_run(workdir, *, step: int | None = None) -> Run:
    """Restore the latest (or ``step``'s) checkpoint of a run folder written by experiments.train."""
    config = load_config(workdir)
    shape, num_classes = data_info(workdir)
    _, state, graphdef, rest = build(config, shape, num_classes)
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints", async_save=False)
    if step is None:
        step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train the run first.")
    state = ckpt.restore(step, checkpoint.abstract_state(state))
    ckpt.close()
    return Run(config, configs.make_process(config), graphdef, rest, state, num_classes, shape)


class LabelDenoiser(eqx.Module):
    """``denoise_y(x, t, y)`` of a class-conditional network (for classifier-free guidance)."""

    fn: training.ModelFn
    process: jaxdiff.Process
    prediction: str = eqx.field(static=True)
    sigma_data: float

    def __call__(self, x, t, y):
        fn = eqx.tree_at(lambda f: f.kwargs, self.fn, {"y": y})
        return jaxdiff.denoiser(fn, self.process, self.prediction, sigma_data=self.sigma_data)(x, t)


def run_denoiser(run: Run, *, labels=None, guidance_scale=None, use_ema: bool = True):
    """The denoiser of a loaded run; see :func:`load_denoiser`."""
    c = run.config
    params = run.state.ema_params if use_ema else run.state.params
    fn = training.model_fn(run.graphdef, params, run.rest)
    if labels is not None and run.num_classes is None:
        raise ValueError("labels given but the run's network is unconditional.")
    if labels is not None and guidance_scale is not None:
        denoise_y = LabelDenoiser(fn, run.process, c.prediction, c.sigma_data)
        return guidance.classifier_free_labels(
            denoise_y, jnp.asarray(labels), guidance_scale, null_label=run.num_classes
        )
    if labels is not None:
        fn = training.model_fn(run.graphdef, params, run.rest, y=jnp.asarray(labels))
    return jaxdiff.denoiser(fn, run.process, c.prediction, sigma_data=c.sigma_data)


def load_denoiser(workdir, *, labels=None, guidance_scale=None, use_ema: bool = True):
    """``(denoise, process, config)`` from a run folder's latest checkpoint.

    Args:
        workdir: the run folder (``config.json`` and ``checkpoints/``).
        labels: class labels ``(batch,)`` for a class-conditional run (default: the null class,
            i.e. the unconditional model).
        guidance_scale: classifier-free guidance weight with ``labels`` (1 = conditional).
        use_ema: use the EMA parameters (default) or the raw ones.

    Example:
        >>> denoise, process, config = load_denoiser("runs/toy2d")   # doctest: +SKIP
    """
    run = load_run(workdir)
    denoise = run_denoiser(run, labels=labels, guidance_scale=guidance_scale, use_ema=use_ema)
    return denoise, run.process, run.config


def nfe_per_step(sampler: samplers.Sampler, process) -> int:
    """Network evaluations of one (non-final) step, read off the step's Python-int ``nfe``.

    The step is traced abstractly (``jax.eval_shape``) on a dummy state: nothing is computed.
    """
    counts = []

    def one_step(x):
        ts = schedules.uniform(process, 2, dtype=x.dtype)
        state = sampler.init(x, ts)
        counts.append(sampler.step(lambda y, t: y, x, state, ts, 0, jax.random.key(0))[3])
        return x

    jax.eval_shape(one_step, jax.ShapeDtypeStruct((1, 1), jnp.float32))
    return int(counts[0])


def steps_for_nfe(per_step: int, target: int) -> int:
    """Grid steps ``n >= 2`` whose NFE ``(n - 1) * per_step + 1`` is nearest to ``target``.

    Ties go to the smaller ``n``. Example: DPM-Solver-3 (3 per step) at target 10 gets ``n = 4``
    (NFE 10), at target 5 ``n = 2`` (NFE 4, not 7).
    """
    lo = max(2, (target - 1) // per_step + 1)
    candidates = (max(2, lo - 1), lo, lo + 1)
    return min(candidates, key=lambda n: (abs((n - 1) * per_step + 1 - target), n))


@functools.lru_cache(maxsize=32)
def make_sampler(name: str, process):
    """The sampler ``name`` of ``process``; cached, so repeated sampling reuses one compilation
    (a sampler is a closure, and ``jaxdiff.sample`` compiles once per sampler object)."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(SAMPLER_NAMES)}.")
    return getattr(samplers, name)(process)


def make_grid(name: str, process, n: int):
    match name:
        case "karras":
            return schedules.karras(process, n)
        case "uniform":
            return schedules.uniform(process, n)
        case "log_snr_uniform":
            return schedules.log_snr_uniform(process, n)
        case "quadratic":
            return schedules.quadratic(process, n)
    raise ValueError(f"unknown grid {name!r}; choose karras, uniform, log_snr_uniform, quadratic.")


def generate(run: Run, denoise, *, num: int, sampler: str, steps: int, seed: int, grid="uniform"):
    """``num`` samples as a NumPy array and the exact NFE. Seeded: same seed, same array."""
    key = jax.random.key(seed)
    x_T = run.process.prior_sample((num, *run.shape), key=jax.random.fold_in(key, 0))
    ts = make_grid(grid, run.process, steps)
    result = jaxdiff.sample(
        make_sampler(sampler, run.process), denoise, x_T, ts, key=jax.random.fold_in(key, 1)
    )
    return np.asarray(result.x), int(result.nfe)


def save_samples(path, x: np.ndarray, *, title: str = ""):
    """A scatter plot (2-D data) or an image grid (NHWC in ``[-1, 1]``) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        lo, hi = np.percentile(x, [0.5, 99.5], axis=0)
        margin = 0.1 * (hi - lo).max() + 1e-6
        ax.set_xlim(lo[0] - margin, hi[0] + margin)
        ax.set_ylim(lo[1] - margin, hi[1] + margin)
        ax.set_aspect("equal")
        ax.set_title(title)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    plt.imsave(path, image_grid(x), cmap="gray" if x.shape[-1] == 1 else None, vmin=0, vmax=1)


def image_grid(x: np.ndarray, pad: int = 1) -> np.ndarray:
    """Tile NHWC images in ``[-1, 1]`` into one ``[0, 1]`` image (square-ish grid)."""
    n, h, w, c = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    img = np.clip((np.asarray(x, np.float32) + 1) / 2, 0, 1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = img[i]
    return grid[..., 0] if c == 1 else grid


def default_labels(run: Run, num: int, label: int | None = None):
    """Labels for ``num`` samples: ``label`` for all, or the classes in turn (None: unconditional)."""
    if run.num_classes is None:
        return None
    return jnp.full((num,), label) if label is not None else jnp.arange(num) % run.num_classes


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("workdir", nargs="?", help="run folder (or --workdir)")
    p.add_argument("--workdir", dest="workdir_opt", default=None)
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLER_NAMES)}")
    p.add_argument("--nfe", type=int, default=50, help="network evaluations")
    p.add_argument("--grid", default="karras", help="karras, uniform, log_snr_uniform, quadratic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--label", type=int, default=None, help="class (default: cycle through classes)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--raw", action="store_true", help="use raw parameters instead of the EMA")
    args = p.parse_args(argv)
    workdir = args.workdir_opt or args.workdir
    if workdir is None:
        p.error("give the run folder: python -m experiments.sample DIR")
    run = load_run(workdir)
    labels = default_labels(run, args.num, args.label)
    denoise = run_denoiser(run, labels=labels, guidance_scale=args.guidance, use_ema=not args.raw)
    if args.nfe < 1:
        p.error(f"--nfe must be >= 1, got {args.nfe}")
    sampler = make_sampler(args.sampler, run.process)
    steps = steps_for_nfe(nfe_per_step(sampler, run.process), args.nfe)
    x, nfe = generate(
        run,
        denoise,
        num=args.num,
        sampler=args.sampler,
        steps=steps,
        seed=args.seed,
        grid=args.grid,
    )
    stem = Path(workdir) / "samples" / f"{args.sampler}_nfe{nfe}_seed{args.seed}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.save(stem.with_suffix(".npy"), x)
    save_samples(stem.with_suffix(".png"), x, title=f"{args.sampler}, NFE {nfe}")
    info = {"npy": str(stem.with_suffix(".npy")), "png": str(stem.with_suffix(".png")), "nfe": nfe}
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
