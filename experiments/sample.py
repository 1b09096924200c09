"""Sample from a trained run: ``python -m experiments.sample DIR --sampler heun --nfe 35 --seed 0``.

Loads ``DIR/config.json`` and the latest checkpoint (EMA parameters), samples with a sampler of
:data:`experiments.common.SAMPLERS` at the number of network evaluations nearest ``--nfe``
(``sampler.steps_for_nfe``), and writes ``DIR/samples/<sampler>_nfe<N>_seed<S>.npy`` and ``.png``
(a scatter plot for 2-D data, an image grid otherwise). The same checkpoint and seed give the
same arrays.

Other scripts get a model from a run folder with :func:`experiments.common.load_denoiser`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

from experiments import common

# Earlier scripts imported these from here; they live in experiments.common.
from experiments.common import (  # noqa: F401
    Run,
    build,
    default_labels,
    generate,
    image_grid,
    load_denoiser,
    load_run,
    make_grid,
    make_sampler,
    run_denoiser,
    save_samples,
)
from jaxdiff import checkpoint

__all__ = ["SampleConfig", "SAMPLER_NAMES", "main"]

#: The sampler names the command line offers (the keys of experiments.common.SAMPLERS).
SAMPLER_NAMES = tuple(common.SAMPLERS)


@dataclass(frozen=True)
class SampleConfig:
    """Which run, which sampler at which NFE, and how many samples."""

    run_dir: Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")] = None
    """Run folder of experiments.train (or --workdir)."""
    workdir: str | None = None
    """Run folder (same as RUN_DIR)."""
    sampler: Annotated[str, tyro.conf.arg(help=f"one of {', '.join(common.SAMPLERS)}")] = "ddim"
    nfe: int = 50
    """Network evaluations (the nearest the sampler can do)."""
    grid: Annotated[str, tyro.conf.arg(help=f"one of {', '.join(common.GRIDS)}")] = "karras"
    seed: int = 0
    num: int = 64
    """Number of samples."""
    label: int | None = None
    """Class of every sample (default: the classes in turn)."""
    guidance: float | None = None
    """Classifier-free guidance scale."""
    raw: bool = False
    """Use the raw parameters instead of the EMA."""
    sigma_rel: float | None = None
    """Post-hoc EMA of this relative width, rebuilt from the run's ema_snapshots/ (EDM2)."""


def parse_args(argv=None) -> SampleConfig:
    return tyro.cli(SampleConfig, args=argv, description=__doc__)


def main(argv=None) -> dict:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = config.workdir or config.run_dir
    if workdir is None:
        raise SystemExit("give the run folder: python -m experiments.sample DIR")
    if config.nfe < 1:
        raise SystemExit(f"--nfe must be >= 1, got {config.nfe}")
    common.choose(common.SAMPLERS, "sampler", config.sampler)
    common.choose(common.GRIDS, "grid", config.grid)
    run = common.load_run(workdir)
    if config.sigma_rel is not None:  # the EMA of that width at the last snapshot, as ema_params
        abstract = checkpoint.abstract_state(run.state).params
        ema = checkpoint.load_posthoc_ema(
            Path(workdir) / "ema_snapshots", abstract, config.sigma_rel
        )
        run = run._replace(state=run.state.replace(ema_params=ema))
    labels = common.default_labels(run, config.num, config.label)
    denoise = common.run_denoiser(
        run, labels=labels, guidance_scale=config.guidance, use_ema=not config.raw
    )
    steps = common.make_sampler(config.sampler, run.process).steps_for_nfe(config.nfe)
    x, nfe = common.generate(
        run, denoise, num=config.num, sampler=config.sampler, steps=steps, seed=config.seed,
        grid=config.grid,
    )  # fmt: skip
    stem = Path(workdir) / "samples" / f"{config.sampler}_nfe{nfe}_seed{config.seed}"
    if config.sigma_rel is not None:
        stem = stem.with_name(f"{stem.name}_ema{config.sigma_rel:g}".replace(".", "_"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.save(stem.with_suffix(".npy"), x)
    common.save_samples(stem.with_suffix(".png"), x, title=f"{config.sampler}, NFE {nfe}")
    info = {"npy": str(stem.with_suffix(".npy")), "png": str(stem.with_suffix(".png")), "nfe": nfe}
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
