"""What the scripts share: a trained run's model, the sampler and grid tables, sampling, figures.

- :func:`load_run` / :func:`load_denoiser`: a run folder of ``experiments.train`` (its
  ``config.json``, ``data_info.json`` and latest checkpoint) as a network and a denoiser.
- :data:`SAMPLERS`: the one table of named samplers (``name -> factory(process)``) every script
  and its command line choose from; :data:`GRIDS` the named hand-made grids.
- :func:`generate`: seeded samples of a run; :func:`compilations` counts XLA compilations; :func:`save_samples`, :func:`image_grid` and
  :func:`pyplot` for the figures, :func:`markdown_table` for the reports.

Example:
    >>> denoise, process, config = load_denoiser("runs/toy2d")   # doctest: +SKIP
    >>> sampler = make_sampler("heun", process)
    >>> ts = make_grid("karras", process, sampler.steps_for_nfe(35))
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from experiments import configs
from jaxdiff import checkpoint, discrete, guidance, samplers, schedules, training

__all__ = [
    "SAMPLERS",
    "GRIDS",
    "make_sampler",
    "make_grid",
    "choose",
    "Run",
    "load_config",
    "build",
    "data_info",
    "load_run",
    "LabelDenoiser",
    "run_denoiser",
    "load_denoiser",
    "default_labels",
    "null_labels",
    "generate",
    "compilations",
    "markdown_table",
    "pyplot",
    "save_samples",
    "image_grid",
]

#: Named samplers with their settings: ``name -> factory(process)``. The plain names are the
#: factories' defaults (``dpm_solver``: order 2; ``dpm_solver_pp``: 2M; ``unipc``: order 2).
SAMPLERS: dict[str, Callable[[jaxdiff.Process], samplers.Sampler]] = {
    "ddim": samplers.ddim,
    "ddpm": samplers.ddpm,
    "euler": samplers.euler,
    "euler_maruyama": samplers.euler_maruyama,
    "heun": samplers.heun,
    "dpm_solver": samplers.dpm_solver,
    "dpm_solver_pp": samplers.dpm_solver_pp,
    "dpm_solver_pp_sde": samplers.dpm_solver_pp_sde,
    "ipndm": samplers.ipndm,
    "unipc": samplers.unipc,
    "dpm_solver_3": functools.partial(samplers.dpm_solver, order=3),
    "dpm_solver_pp_2": functools.partial(samplers.dpm_solver_pp, order=2),
    # issue 14 (fixed grids; dpm_solver_adaptive and annealed_langevin need grids of their own)
    "lms": samplers.lms,
    "deis": samplers.deis,
    "dpm_solver_pp_2s": functools.partial(samplers.dpm_solver_pp_singlestep, order=2),
    "dpm_solver_pp_3s": functools.partial(samplers.dpm_solver_pp_singlestep, order=3),
    "dpm_solver_pp_3m_sde": functools.partial(samplers.dpm_solver_pp_sde, order=3),
    "euler_ancestral": lambda p: samplers.ancestral(samplers.euler(p)),
    "dpm_2_ancestral": lambda p: samplers.ancestral(samplers.dpm_solver(p, order=2)),
    "dpm_pp_2s_ancestral": lambda p: samplers.ancestral(samplers.dpm_solver_pp_singlestep(p, 2)),
}

#: Named hand-made grids: ``name -> schedule(process, n)``.
GRIDS: dict[str, Callable] = {
    "karras": schedules.karras,
    "uniform": schedules.uniform,
    "log_snr_uniform": schedules.log_snr_uniform,
    "quadratic": schedules.quadratic,
}


def choose(table: dict, kind: str, name: str):
    """``table[name]``, or a ``ValueError`` naming the unknown ``kind`` and the choices."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(table)}.")
    return table[name]


def make_sampler(name: str, process) -> samplers.Sampler:
    """The sampler ``name`` of :data:`SAMPLERS` for ``process``. Samplers are hashable pytrees:
    building one anew reuses ``jaxdiff.sample``'s compilation."""
    return choose(SAMPLERS, "sampler", name)(process)


def make_grid(name: str, process, n: int):
    """The ``n``-step grid ``name`` of :data:`GRIDS` (``n + 1`` times ending with 0)."""
    return choose(GRIDS, "grid", name)(process, n)


# --- a trained run -------------------------------------------------------------------------------
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
    """The ``config.json`` of a run folder."""
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
    learned_variance: bool = eqx.field(static=True, default=False)

    def __call__(self, x, t, y):
        fn = mean_output(eqx.tree_at(lambda f: f.kwargs, self.fn, {"y": y}), self.learned_variance)
        return jaxdiff.denoiser(fn, self.process, self.prediction, sigma_data=self.sigma_data)(x, t)


def mean_output(fn, learned_variance: bool):
    """The mean's half of a learned-variance network's output (``loss="hybrid"``), else ``fn``."""
    return discrete.SplitOutput(fn, 0) if learned_variance else fn


def run_denoiser(run: Run, *, labels=None, guidance_scale=None, use_ema: bool = True):
    """The denoiser of a loaded run; see :func:`load_denoiser`."""
    c = run.config
    params = run.state.ema_params if use_ema else run.state.params
    fn = training.model_fn(run.graphdef, params, run.rest)
    if labels is not None and run.num_classes is None:
        raise ValueError("labels given but the run's network is unconditional.")
    if labels is not None and guidance_scale is not None:
        denoise_y = LabelDenoiser(fn, run.process, c.prediction, c.sigma_data, c.loss == "hybrid")
        return guidance.classifier_free_labels(
            denoise_y, jnp.asarray(labels), guidance_scale, null_label=run.num_classes
        )
    if labels is not None:
        fn = training.model_fn(run.graphdef, params, run.rest, y=jnp.asarray(labels))
    fn = mean_output(fn, c.loss == "hybrid")
    return jaxdiff.denoiser(fn, run.process, c.prediction, sigma_data=c.sigma_data)


def load_denoiser(workdir, *, labels=None, guidance_scale=None, use_ema: bool = True):
    """``(denoise, process, config)`` from a run folder's latest checkpoint.

    Args:
        workdir: the run folder (``config.json`` and ``checkpoints/``).
        labels: class labels ``(batch,)`` for a class-conditional run (default: the null class,
            i.e. the unconditional model).
        guidance_scale: classifier-free guidance weight with ``labels`` (1 = conditional).
        use_ema: use the EMA parameters (default) or the raw ones.
    """
    run = load_run(workdir)
    denoise = run_denoiser(run, labels=labels, guidance_scale=guidance_scale, use_ema=use_ema)
    return denoise, run.process, run.config


def default_labels(run: Run, num: int, label: int | None = None):
    """Labels for ``num`` samples: ``label`` for all, or the classes in turn (None: unconditional)."""
    if run.num_classes is None:
        return None
    return jnp.full((num,), label) if label is not None else jnp.arange(num) % run.num_classes


def null_labels(run: Run, num: int):
    """Unconditional sampling of a class-conditional network: the null class for every sample."""
    return None if run.num_classes is None else jnp.full((num,), run.num_classes)


def generate(run: Run, denoise, *, num: int, sampler: str, steps: int, seed: int, grid="uniform"):
    """``num`` samples as a NumPy array and the exact NFE. Seeded: same seed, same array."""
    key = jax.random.key(seed)
    x_T = run.process.prior_sample((num, *run.shape), key=jax.random.fold_in(key, 0))
    ts = make_grid(grid, run.process, steps)
    s = make_sampler(sampler, run.process)
    result = jaxdiff.sample(s, denoise, x_T, ts, key=jax.random.fold_in(key, 1))
    return np.asarray(result.x), int(result.nfe)


@contextlib.contextmanager
def compilations():
    """The names of the functions XLA compiles inside the block (``jax.monitoring`` events):
    ``with compilations() as compiled: ...`` then ``compiled == []`` when nothing compiled."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --- reports and figures -------------------------------------------------------------------------
def markdown_table(header, rows, *, text_columns: int = 1) -> str:
    """A markdown table: the ``header`` names, then one line per row of cells (``str`` of each);
    the first ``text_columns`` columns are left-aligned, the others (numbers) right-aligned."""
    rule = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_samples(path, x: np.ndarray, *, title: str = ""):
    """A scatter plot (2-D data) or an image grid (NHWC in ``[-1, 1]``) as PNG."""
    plt = pyplot()
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
