r"""Evaluate a trained run: ``python -m experiments.evaluate RUN_DIR [--nfe 5 10 20 50]``.

Loads the latest checkpoint of ``RUN_DIR`` (EMA parameters, :func:`experiments.common.load_run`)
and measures

- **likelihood** through the probability-flow ODE (:mod:`jaxdiff.likelihood`): for vector data
  (the ``toy2d`` preset) the negative log-likelihood in nats per example and per dimension with the
  exact divergence; for images, bits per dimension with uniform dequantization
  (:func:`jaxdiff.likelihood.bits_per_dim`). Images with ``B`` levels mapped to
  :math:`x = -1 + 2k/(B-1)` (8-bit data: ``B = 256``; scikit-learn's digits: ``B = 17``) are
  dequantized in bins of width :math:`2/(B-1)` centred on those values, so the bound reads

  .. math:: \mathrm{bpd} = -\frac{E_u \log p(x + u) + D\log\frac{2}{B-1}}{D\log 2}
      \le \log_2 B

  (Theis et al. 2016; Ho et al. 2020). A class-conditional network is evaluated with the null
  class, i.e. as the unconditional model :math:`p(x)`.
- **variational bound** of a run with learned variances (``loss="hybrid"``, the ``digits_hybrid``
  preset): Ho et al.'s bound in bits/dim with the discretized Gaussian decoder on the data's levels
  (:func:`jaxdiff.discrete.bits_per_dim`), beside the probability-flow likelihood.
- **sample quality** of every sampler at every target NFE: the sliced 2-Wasserstein distance and
  the MMD to fresh data for vector data; for labelled images, the Frechet distance in the feature
  space of a classifier trained on the data set (:func:`jaxdiff.metrics.fd_classifier`; the
  digits classifier of :func:`experiments.classifier.digits_classifier`), with samples of every class in
  turn from a class-conditional network. A ``data`` row gives the metric between two sets of real
  data of the same sizes: the floor set by the finite sample.

**NFE accounting.** Samplers differ in network evaluations per step (Heun and the diffrax Heun
PF-ODE 2, DPM-Solver-3 3; the final step into ``t = 0`` costs one). Each sampler gets the number of
grid steps whose NFE is nearest to the target (``sampler.steps_for_nfe``; ties go to the cheaper
grid), and the table reports
the NFE the sampler actually used (``SampleResult.nfe``; for diffrax, twice its accepted steps
plus the final denoising).

Outputs in ``RUN_DIR/eval/`` (or ``--workdir``): ``eval.md`` (markdown table), ``eval.json`` and
``quality_vs_nfe.png``. A 2-D toy run takes about 1.5 CPU-minutes with the defaults (mostly
compiling 32 samplers); ``--nfe``, ``--samplers``, ``--num-samples`` and ``--nll-examples`` trim it.

Example:
    python -m experiments.train --preset toy2d --workdir runs/toy2d --steps 2000
    python -m experiments.evaluate runs/toy2d
    python -m experiments.evaluate runs/digits --num-samples 500 --nll-examples 64
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm.auto import tqdm

import jaxdiff
from experiments import classifier, common, configs
from jaxdiff import data as jdata
from jaxdiff import discrete, likelihood, metrics, samplers, training

__all__ = ["EvalConfig", "SAMPLERS", "Method", "make_method", "evaluate", "markdown_table", "main"]

SAMPLERS = (
    "ddpm",
    "ddim",
    "heun",
    "dpm_solver_3",
    "dpm_solver_pp_2",
    "ipndm",
    "unipc",
    "diffrax_heun",
)  # names of experiments.common.SAMPLERS, and the diffrax probability-flow ODE


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how much of it (sizes set the run time)."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run folder written by experiments.train."""
    workdir: str | None = None
    """Output folder (default RUN_DIR/eval)."""
    samplers: tuple[str, ...] = SAMPLERS
    """Samplers to compare (see SAMPLERS)."""
    nfe: tuple[int, ...] = (5, 10, 20, 50)
    """Target numbers of network evaluations."""
    num_samples: int = 1000
    """Samples per sampler and NFE."""
    nll_examples: int = 200
    """Data examples for the likelihood (0 skips it)."""
    nll_batch: int = 100
    """Examples per likelihood solve."""
    rtol: float = 1e-4
    atol: float = 1e-4
    """Tolerances of the likelihood ODE solve."""
    grid: str = "karras"
    """Time grid: karras, uniform, log_snr_uniform, quadratic."""
    seed: int = 0
    cache_dir: str | None = None
    """Feature-classifier cache (default ~/.cache/jaxdiff)."""
    progress: bool = True

    def __post_init__(self):
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown:
            raise ValueError(f"unknown samplers {unknown}; choose from {', '.join(SAMPLERS)}.")
        if not self.nfe or min(self.nfe) < 3:
            raise ValueError(f"nfe targets must be >= 3 (two steps); got {self.nfe}.")
        for name in ("num_samples", "nll_batch"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2; got {getattr(self, name)}.")
        if self.nll_examples < 0:
            raise ValueError(f"nll_examples must be >= 0; got {self.nll_examples}.")
        common.choose(common.GRIDS, "grid", self.grid)


# ----------------------------------------------------------------------------------------------
# Samplers with their NFE accounting
# ----------------------------------------------------------------------------------------------
class Method(NamedTuple):
    """A way to sample: ``run(denoise, x_T, ts, key) -> (x, nfe)``; ``sampler`` is the scan sampler
    whose NFE accounting it shares (``nfe_per_step``, ``steps_for_nfe``)."""

    name: str
    run: Callable
    sampler: samplers.Sampler

    @property
    def per_step(self) -> int:
        return self.sampler.nfe_per_step


def _scan_method(name: str, sampler: samplers.Sampler) -> Method:
    def run(denoise, x_T, ts, key):
        res = jaxdiff.sample(sampler, denoise, x_T, ts, key=key)
        return res.x, int(res.nfe)

    return Method(name, run, sampler)


@eqx.filter_jit
def _pf_ode_heun(process, denoise, x_T, ts):
    """Probability-flow ODE with diffrax's Heun on the grid ``ts[:-1]``, then ``D(x, ts[-2])``."""
    sol = jaxdiff.sde.solve_ode(
        process, denoise, x_T, t0=ts[0], t1=ts[-2], solver=diffrax.Heun(),
        stepsize_controller=diffrax.StepTo(ts=ts[:-1]),
    )  # fmt: skip
    x = sol.ys[-1]
    return denoise(x, ts[-2]).astype(x.dtype), sol.stats["num_steps"]


def _diffrax_method(process) -> Method:
    def run(denoise, x_T, ts, key):
        x, steps = _pf_ode_heun(process, denoise, x_T, ts)
        return x, 2 * int(steps) + 1  # Heun: 2 evaluations per step (no FSAL), + final D

    return Method("diffrax_heun", run, samplers.heun(process))  # the same NFE accounting


def make_method(name: str, process) -> Method:
    """The sampler ``name`` of :data:`SAMPLERS` for ``process``."""
    if name == "diffrax_heun":
        return _diffrax_method(process)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}.")
    return _scan_method(name, common.make_sampler(name, process))


# ----------------------------------------------------------------------------------------------
# Data, metrics and likelihood
# ----------------------------------------------------------------------------------------------
def _is_image(run) -> bool:
    return len(run.shape) == 3


def _levels(config) -> int:
    """Number of intensity levels of an image data set (scikit-learn's digits: 0..16)."""
    return configs.data_levels(config)


def reference_data(run, n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Real examples ``(n, ...)`` and labels: fresh draws of a toy set, else training data."""
    d = run.config.data
    if d.name in jdata.TOY_SETS:
        ds = jdata.toy_2d(d.name, n, seed=d.seed + 1 + seed)
        return np.asarray(ds.x), None
    ds = configs.load_data(run.config)
    idx = np.random.default_rng(seed).permutation(len(ds))[: min(n, len(ds))]
    return np.asarray(ds.x)[idx], None if ds.y is None else np.asarray(ds.y)[idx]


class Quality(NamedTuple):
    """``score(samples) -> {metric: value}``; ``primary`` is the metric plotted against NFE."""

    score: Callable
    primary: str
    floor: dict


def make_quality(run, config: EvalConfig) -> Quality:
    """Sliced Wasserstein and MMD (vector data) or the classifier Frechet distance (images)."""
    n = config.num_samples
    if not _is_image(run):
        ref, _ = reference_data(run, n, seed=config.seed)
        twin, _ = reference_data(run, n, seed=config.seed + 1)
        key = jax.random.key(config.seed)

        def score(x):
            sw = float(metrics.sliced_wasserstein(x, ref, key=key))
            return {"sliced_w2": sw, "mmd": float(metrics.mmd(x, ref))}

        return Quality(score, "sliced_w2", score(twin))
    ds = configs.load_data(run.config)
    if ds.y is None:
        raise ValueError(
            f"data set {run.config.data.name!r} has no labels: the Frechet distance needs a "
            "classifier trained on labelled data."
        )
    real = np.asarray(ds.x)
    if run.config.data.name == "digits":
        clf = classifier.digits_classifier(cache_dir=config.cache_dir)
    else:
        clf = classifier.feature_classifier(
            real, ds.y, name=run.config.data.name, cache_dir=config.cache_dir
        )
    half = np.random.default_rng(config.seed).permutation(len(real))
    a, b = real[half[: min(n, len(real) // 2)]], real[half[len(real) // 2 :]]
    floor = {"fd_classifier": metrics.fd_classifier(a, b, clf)}

    def score(x):
        return {"fd_classifier": metrics.fd_classifier(x, real, clf)}

    return Quality(score, "fd_classifier", floor)


def _chunks(x, size):
    """Equal-sized chunks (the last padded by repetition, so one compilation) and the count."""
    n = x.shape[0]
    pad = (-n) % size
    x = np.concatenate([x, x[:pad]]) if pad else x
    return [x[i : i + size] for i in range(0, x.shape[0], size)], n


def nll(run, denoise, config: EvalConfig) -> dict:
    """Likelihood of ``nll_examples`` real examples: nats (vector data) or bits/dim (images)."""
    x, _ = reference_data(run, config.nll_examples, seed=config.seed + 2)
    dim = math.prod(run.shape)
    key = jax.random.key(config.seed + 3)
    chunks, n = _chunks(x, min(config.nll_batch, x.shape[0]))
    tol = dict(rtol=config.rtol, atol=config.atol)
    values = []
    for i, c in enumerate(chunks):
        k = jax.random.fold_in(key, i)
        if _is_image(run):
            b = _levels(run.config)
            levels = np.rint((c + 1) * (b - 1) / 2).astype(np.int32).clip(0, b - 1)
            half = 1 + 1 / (b - 1)  # bins of width 2/(b-1) centred on the data values
            v = likelihood.bits_per_dim(
                run.process, denoise, levels, key=k, data_range=(-half, half), num_bins=b, **tol
            )
        else:
            v = -likelihood.log_likelihood(run.process, denoise, jnp.asarray(c), key=k, **tol)
        values.append(np.asarray(v))
    v = np.concatenate(values)[:n]
    mean, se = float(np.mean(v)), float(np.std(v) / math.sqrt(max(n - 1, 1)))
    if _is_image(run):
        return {"bits_per_dim": mean, "se": se, "examples": n, "levels": _levels(run.config)}
    return {"nll_nats": mean, "nats_per_dim": mean / dim, "se": se, "examples": n}


def vlb(run, denoise, config: EvalConfig) -> dict:
    """The variational bound in bits/dim of a run with learned variances (``loss="hybrid"``): the
    sum of its N + 1 terms, the discretized Gaussian decoder on the data's levels
    (:func:`jaxdiff.discrete.bits_per_dim`, Improved DDPM's L_vlb)."""
    x, _ = reference_data(run, config.nll_examples, seed=config.seed + 2)
    fn = training.model_fn(run.graphdef, run.state.ema_params, run.rest)
    variance = discrete.Learned(discrete.SplitOutput(fn, 1))
    decoder = discrete.DiscretizedGaussianDecoder(levels=_levels(run.config))
    key = jax.random.key(config.seed + 4)
    chunks, n = _chunks(x, min(config.nll_batch, x.shape[0]))
    values = [
        discrete.bits_per_dim(run.process, denoise, variance, jnp.asarray(c), decoder=decoder,
                              key=jax.random.fold_in(key, i))
        for i, c in enumerate(chunks)
    ]  # fmt: skip
    v = np.concatenate([np.asarray(b) for b in values])[:n]
    se = float(np.std(v) / math.sqrt(max(n - 1, 1)))
    return {"bits_per_dim": float(np.mean(v)), "se": se, "examples": n}


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
def evaluate(run, config: EvalConfig) -> dict:
    """NLL and the quality of every sampler at every target NFE; a JSON-ready dict."""
    labels = common.default_labels(run, config.num_samples)
    denoise = common.run_denoiser(run, labels=labels)  # conditional: every class in turn
    key = jax.random.key(config.seed)
    x_T = run.process.prior_sample((config.num_samples, *run.shape), key=jax.random.fold_in(key, 0))
    quality = make_quality(run, config)
    rows = []
    jobs = [(s, t) for s in config.samplers for t in config.nfe]
    methods = {s: make_method(s, run.process) for s in config.samplers}
    for name, target in tqdm(jobs, desc="samplers", disable=not config.progress):
        m = methods[name]
        n = m.sampler.steps_for_nfe(target)
        ts = common.make_grid(config.grid, run.process, n)
        start = time.perf_counter()
        x, nfe = m.run(denoise, x_T, ts, jax.random.fold_in(key, 1))
        x = np.asarray(x)
        seconds = time.perf_counter() - start
        finite = bool(np.all(np.isfinite(x)))
        scores = quality.score(x) if finite else {quality.primary: float("nan")}
        row = dict(sampler=name, target_nfe=target, nfe=nfe, steps=n, seconds=seconds)
        rows.append(row | scores)
    result = {
        "run_dir": str(config.run_dir),
        "train_step": int(run.state.step),
        "grid": config.grid,
        "num_samples": config.num_samples,
        "primary": quality.primary,
        "data_floor": quality.floor,
        "rows": rows,
    }
    if config.nll_examples:
        uncond = common.run_denoiser(run)  # a conditional network with the null class: p(x)
        result["nll"] = nll(run, uncond, config)
        if run.config.loss == "hybrid":
            result["vlb"] = vlb(run, uncond, config)
    return result


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def markdown_table(result: dict) -> str:
    """The sweep as markdown: the likelihood line, then one row per sampler and target NFE."""
    metric_names = [k for k in result["data_floor"]]
    lines = [f"# Evaluation of {result['run_dir']} (step {result['train_step']})", ""]
    if "nll" in result:
        r = result["nll"]
        if "bits_per_dim" in r:
            lines.append(
                f"**NLL**: {r['bits_per_dim']:.4f} ± {r['se']:.4f} bits/dim ({r['examples']} "
                f"examples, {r['levels']} levels dequantized; at most log2({r['levels']}) = "
                f"{math.log2(r['levels']):.2f})."
            )
        else:
            lines.append(
                f"**NLL**: {r['nll_nats']:.4f} ± {r['se']:.4f} nats per example, "
                f"{r['nats_per_dim']:.4f} nats/dim ({r['examples']} examples, exact divergence)."
            )
        lines.append("")
    if "vlb" in result:
        r = result["vlb"]
        lines += [
            f"**Variational bound** (learned variances, discretized decoder): "
            f"{r['bits_per_dim']:.4f} ± {r['se']:.4f} bits/dim ({r['examples']} examples).",
            "",
        ]
    lines += [
        f"Sample quality of {result['num_samples']} samples on the `{result['grid']}` grid "
        "(lower is better); NFE is what the sampler used, nearest to the target.",
        "",
    ]
    header = ["sampler", "target NFE", "NFE", "steps", *metric_names, "seconds"]
    cells = []
    for row in result["rows"]:
        cells.append([row["sampler"], row["target_nfe"], row["nfe"], row["steps"]])
        cells[-1] += [row.get(k, float("nan")) for k in metric_names] + [round(row["seconds"], 2)]
    floor = result["data_floor"]
    cells.append(["data (real vs real)", "", "", "", *(floor[k] for k in metric_names), ""])
    table = common.markdown_table(header, [[_fmt(c) for c in row] for row in cells])
    return "\n".join(lines) + "\n" + table + "\n"


def plot(path: Path, result: dict):
    """Primary quality metric against the NFE actually used, one line per sampler (log-log)."""
    import matplotlib.ticker

    plt = common.pyplot()
    key = result["primary"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in dict.fromkeys(r["sampler"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["sampler"] == name]
        ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], "o-", label=name, ms=4)
    ax.axhline(result["data_floor"][key], color="gray", ls="--", lw=1, label="data vs data")
    ax.set_xscale("log")
    ax.set_yscale("log")
    targets = sorted({r["target_nfe"] for r in result["rows"]})
    ax.set_xticks(targets, [str(t) for t in targets])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("NFE")
    ax.set_ylabel(key)
    ax.set_title(f"{Path(result['run_dir']).name}: {key} vs NFE ({result['grid']} grid)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> EvalConfig:
    return tyro.cli(EvalConfig, args=argv, description=__doc__)


def main(argv=None) -> dict:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    run = common.load_run(config.run_dir)
    out = Path(config.workdir or Path(config.run_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(run, config)
    table = markdown_table(result)
    files = {"md": out / "eval.md", "json": out / "eval.json", "png": out / "quality_vs_nfe.png"}
    files["md"].write_text(table)
    files["json"].write_text(json.dumps(result, indent=2))
    plot(files["png"], result)
    print(table)
    print(json.dumps({k: str(v) for k, v in files.items()}))
    return result


if __name__ == "__main__":
    main()
