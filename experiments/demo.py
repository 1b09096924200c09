"""The main job: train a small diffusion model, then compare samplers at several NFE.

``python -m experiments.demo`` (about 2 minutes on a 2-core CPU): trains an MLP on two moons with
a progress bar, samples with DDPM, DDIM (on a uniform and on a GITS grid), Heun, DPM-Solver-3,
DPM-Solver++(2M), iPNDM and the diffrax probability-flow ODE at several numbers of network
evaluations (NFE), and writes into the run folder (default ``runs/demo``):

- ``samples_<sampler>.png``: the data next to the samples at each NFE,
- ``trajectories.png``: sampling trajectories ``x_t`` and denoising trajectories ``D(x_t, t)``,
- ``quality_vs_nfe.png``: sliced Wasserstein distance to held-out data against NFE,
- ``loss.png`` and ``report.md`` (the table), ``results.json`` (the numbers),
- ``model/``: the training run (config, metrics, checkpoints) — rerunning resumes from it.

``--preset digits`` does the same on scikit-learn's 8x8 digits with a class-conditional U-Net
(sampled unconditionally through the null class), sample grids instead of scatter plots, and the
Frechet distance in the features of a digits classifier as the quality measure; on a 2-core CPU
it takes about 10 minutes (2000 U-Net steps at ~5 steps/s, then 31 sampling runs of 256 images).
``JAXDIFF_FAST=1`` (or ``--fast``) shrinks everything for a smoke run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxdiff
from experiments import classifier, common, configs
from experiments import train as training_script
from jaxdiff import fitted_grids, metrics, samplers, schedules, sde

__all__ = ["DemoConfig", "SAMPLERS", "run_demo", "main"]


@dataclass(frozen=True)
class DemoConfig:
    """The demo. ``None`` fields take the preset's default (toy2d / digits)."""

    preset: Literal["toy2d", "digits"] = "toy2d"
    workdir: str | None = None
    steps: int | None = None
    nfes: tuple[int, ...] = (5, 10, 20, 50)
    num_samples: int | None = None
    seed: int = 0
    fast: bool = False


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler of the comparison: its label, its name in :data:`experiments.common.SAMPLERS`
    and its grid ``grid(process, n)``, or, for a grid fitted to the model (``fitted=True``),
    ``grid(process, ns, denoise, warm) -> {n: grid}`` for all step counts ``ns`` at once from the
    warm-up noise ``warm``."""

    label: str
    sampler: str
    grid: Callable
    fitted: bool = False

    def make(self, process) -> samplers.Sampler:
        return common.make_sampler(self.sampler, process)


def _gits(process, ns, denoise, warm):
    """GITS grids for the step counts ``ns`` (one teacher solve and cost matrix for all)."""
    costs = fitted_grids.step_costs(process, denoise, warm)
    return {n: costs.grid(n) for n in ns}


SAMPLERS = (
    SamplerSpec("DDPM", "ddpm", schedules.uniform),
    SamplerSpec("DDIM", "ddim", schedules.uniform),
    SamplerSpec("Heun", "heun", schedules.karras),
    SamplerSpec("DPM-Solver-3", "dpm_solver_3", schedules.log_snr_uniform),
    SamplerSpec("DPM-Solver++(2M)", "dpm_solver_pp_2", schedules.log_snr_uniform),
    SamplerSpec("iPNDM", "ipndm", schedules.karras),
    SamplerSpec("DDIM on GITS", "ddim", _gits, fitted=True),
)
WARMUP = 64  # warm-up samples of the GITS grid (Chen et al. 2024 use a few hundred)
FAST_WARMUP = 16  # in the fast mode (its cost matrix of 120 x 120 DDIM steps dominated the run)
DIFFRAX_RTOLS = (1e-1, 1e-2, 1e-3)


def _train_config(c: DemoConfig) -> configs.Config:
    """The training run of the demo, a tuned version of the ``toy2d`` / ``digits`` preset."""
    workdir = str(Path(_workdir(c)) / "model")
    if c.preset == "toy2d":
        steps = c.steps or (300 if c.fast else 3000)
        base = configs.get_preset("toy2d")
        return dataclasses.replace(
            base, workdir=workdir, steps=steps, batch_size=128 if c.fast else 512, lr=2e-3,
            warmup=min(100, steps // 10), lr_schedule="cosine", loss="v", prediction="v",
            ema_decay=0.995, log_every=100, sample_every=steps, checkpoint_every=steps,
            num_samples=100 if c.fast else 1000, seed=c.seed,
        )  # fmt: skip
    steps = c.steps or (50 if c.fast else 2000)
    base = configs.get_preset("digits")
    model = base.model
    if c.fast:
        model = dataclasses.replace(model, channels=8, channel_mults=(1,), attn_resolutions=())
    return dataclasses.replace(
        base, workdir=workdir, steps=steps, model=model, log_every=50, sample_every=steps,
        checkpoint_every=steps, num_samples=100, seed=c.seed,
    )  # fmt: skip


def _warmup(c: DemoConfig) -> int:
    """The number of warm-up samples of the GITS grid."""
    return FAST_WARMUP if c.fast else WARMUP


def _workdir(c: DemoConfig) -> str:
    return c.workdir or ("runs/demo" if c.preset == "toy2d" else "runs/demo-digits")


# ----------------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------------
class Quality:
    """Sliced Wasserstein (toy 2-D) or classifier Frechet distance (digits) to held-out data."""

    def __init__(self, preset: str, reference: np.ndarray):
        self.preset, self.reference = preset, reference
        self.name = "SW2" if preset == "toy2d" else "FD (classifier features)"
        self.classifier = classifier.digits_classifier() if preset == "digits" else None

    def floor(self, seed: int) -> float:
        """The measure between two independent data sets: the best a sampler can score."""
        if self.classifier is None:
            other = jaxdiff.data.toy_2d("moons", len(self.reference), seed=seed + 999).x
            return self(other)
        x, _ = classifier.digits_data()
        half = len(x) // 2
        return metrics.fd_classifier(x[:half], x[half:], self.classifier)

    def __call__(self, x) -> float:
        x = np.asarray(x, np.float32)
        if not np.all(np.isfinite(x)):
            return float("nan")
        if self.classifier is None:
            n = min(len(x), len(self.reference))
            return float(
                metrics.sliced_wasserstein(x[:n], self.reference[:n], key=jax.random.key(0))
            )
        return metrics.fd_classifier(x.reshape(len(x), -1), self.reference, self.classifier)


def _reference(preset: str, n: int, seed: int) -> np.ndarray:
    """Data the model did not train on (toy) or the whole digits set (classifier reference)."""
    if preset == "toy2d":
        return jaxdiff.data.toy_2d("moons", n, seed=seed + 12345).x
    return classifier.digits_data()[0]


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _fitted_grids(spec: SamplerSpec, process, nfes, warmup) -> dict:
    """``{nfe: grid}`` of a grid fitted to the model, every NFE from one fit."""
    if warmup is None:
        raise ValueError(f"{spec.label} fits its grid to the model: pass warmup=(denoise, x).")
    sampler = spec.make(process)
    steps = {nfe: sampler.steps_for_nfe(nfe) for nfe in nfes}
    grids = spec.grid(process, sorted(set(steps.values())), *warmup)
    return {nfe: grids[n] for nfe, n in steps.items()}


def _scan_sampler(spec: SamplerSpec, process, denoise, x_T, nfe: int, key, ts=None):
    """Samples, NFE and seconds of ``spec`` at the target ``nfe`` (on ``ts`` if given)."""
    sampler = spec.make(process)
    if ts is None:
        ts = spec.grid(process, sampler.steps_for_nfe(nfe))
    run = lambda: jaxdiff.sample(sampler, denoise, x_T, ts, key=key)  # noqa: E731
    _timed(run)  # compile
    result, seconds = _timed(run)
    return np.asarray(result.x), int(result.nfe), seconds


def _diffrax_pf_ode(process, denoise, x_T, rtol: float):
    """Adaptive Tsit5 on the probability-flow ODE, then one denoiser call at ``t_min``.

    NFE = 6 per attempted step (Tsit5 is first-same-as-last) + 1 initial + 1 final denoise.
    """
    import diffrax

    ctrl = diffrax.PIDController(rtol=rtol, atol=rtol)
    run = lambda: sde.solve_ode(process, denoise, x_T, stepsize_controller=ctrl)  # noqa: E731
    _timed(run)
    sol, seconds = _timed(run)
    x = denoise(sol.ys[-1], jnp.full((x_T.shape[0],), process.t_min, x_T.dtype))
    nfe = 6 * int(sol.stats["num_steps"]) + 2
    return np.asarray(x), nfe, seconds


def compare_samplers(
    process,
    denoise,
    x_T,
    nfes,
    quality: Quality,
    *,
    key,
    rtols=DIFFRAX_RTOLS,
    progress=True,
    warmup=None,
):
    """Rows ``{sampler, target, nfe, quality, seconds}`` for every sampler and NFE (and every
    tolerance of the adaptive diffrax solve). ``warmup = (denoise_w, x_w)``: the denoiser of a
    warm-up batch and its noise, drawn apart from ``x_T``, for the grids fitted to the model
    (GITS); its time is not counted in ``seconds``."""
    jobs = [(s, n) for s in SAMPLERS for n in nfes] + [(None, r) for r in rtols]
    fitted = {s.label: _fitted_grids(s, process, nfes, warmup) for s in SAMPLERS if s.fitted}
    rows, samples = [], {}
    for spec, arg in tqdm(jobs, desc="sampling", disable=not progress):
        if spec is None:
            x, nfe, sec = _diffrax_pf_ode(process, denoise, x_T, arg)
            label, target = "PF-ODE (diffrax Tsit5)", f"rtol {arg:g}"
        else:
            ts = fitted[spec.label][arg] if spec.fitted else None
            x, nfe, sec = _scan_sampler(spec, process, denoise, x_T, arg, key, ts)
            label, target = spec.label, arg
        rows.append(dict(sampler=label, target=target, nfe=nfe, quality=quality(x), seconds=sec))
        samples[(label, nfe)] = x
    return rows, samples


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------
def _show(ax, x, preset, title, color="C0"):
    if preset == "toy2d":
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color=color)
        ax.set_xlim(-2.5, 3.5)
        ax.set_ylim(-2.0, 2.5)
        ax.set_aspect("equal")
    else:
        ax.imshow(common.image_grid(np.asarray(x[:64])), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_samples(out: Path, preset, data, samples, rows) -> list[Path]:
    """One PNG per sampler: the data, then the samples at each NFE."""
    plt, paths = common.pyplot(), []
    for label in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == label]
        fig, axes = plt.subplots(1, len(mine) + 1, figsize=(2.6 * (len(mine) + 1), 2.8))
        _show(axes[0], data, preset, "data", color="k")
        for ax, r in zip(axes[1:], mine, strict=True):
            q = f"{r['quality']:.3f}"
            _show(ax, samples[(label, r["nfe"])], preset, f"NFE {r['nfe']}  ({q})")
        fig.suptitle(label)
        fig.tight_layout()
        path = out / f"samples_{_slug(label)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _slug(label: str) -> str:
    """``"DPM-Solver++(2M)"`` -> ``"dpm_solver_2m"``."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def plot_quality(out: Path, rows, quality_name: str, floor: float) -> Path:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(floor, color="k", lw=0.8, ls=":", label="data vs data")
    for label in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == label), key=lambda r: r["nfe"])
        style = "s--" if "diffrax" in label else "o-"
        ax.plot([r["nfe"] for r in mine], [r["quality"] for r in mine], style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel(f"{quality_name} to held-out data")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "quality_vs_nfe.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(out: Path, preset, process, denoise, x_T, data) -> tuple[Path, dict]:
    """Sampling and denoising trajectories of DDIM (50 steps) with their chord deviations."""
    plt = common.pyplot()
    ts = schedules.uniform(process, 50)
    res = jaxdiff.sample(samplers.ddim(process), denoise, x_T, ts, save_trajectory=True)
    xs, den = np.asarray(res.xs[:-1]), np.asarray(res.denoised)
    geo = jaxdiff.geometry.trajectory_stats(res, process, ts)  # in EDM coordinates x / alpha
    stats = {
        "max_relative_chord_deviation": float(geo.max_chord_deviation),
        "worst_relative_chord_deviation": float(geo.worst_chord_deviation),
    }
    if preset == "toy2d":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
        for ax, traj, title in ((axes[0], xs, "sampling x_t"), (axes[1], den, "denoising D(x_t)")):
            ax.scatter(data[:, 0], data[:, 1], s=1, color="0.8")
            for j in range(min(40, traj.shape[1])):
                ax.plot(traj[:, j, 0], traj[:, j, 1], lw=0.7, alpha=0.8)
                ax.plot(traj[-1, j, 0], traj[-1, j, 1], "k.", ms=3)
            ax.set_title(f"{title} (DDIM, 50 steps)")
            ax.set_xlim(-2.5, 3.5)  # early denoiser outputs (alpha_t ~ 0) land far outside
            ax.set_ylim(-2.0, 2.5)
            ax.set_aspect("equal")
    else:
        steps = np.linspace(0, xs.shape[0] - 1, 8).astype(int)
        fig, axes = plt.subplots(2, len(steps), figsize=(1.6 * len(steps), 3.6))
        for k, i in enumerate(steps):
            for row, traj, name in ((0, xs, "x_t"), (1, den, "D(x_t)")):
                ax = axes[row, k]
                ax.imshow(common.image_grid(traj[i, :16]), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{name}, step {i}", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout()
    path = out / "trajectories.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, stats


def plot_loss(out: Path, model_dir: Path) -> Path | None:
    path = model_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return out / "loss.png"


def write_report(out: Path, c: DemoConfig, train_cfg, rows, quality_name, stats, n, seconds):
    lines = [
        f"# jaxdiff demo ({c.preset})",
        "",
        f"Model: {train_cfg.model.kind} on {train_cfg.data.name}, {train_cfg.process} process, "
        f"{train_cfg.prediction} prediction, {train_cfg.steps} training steps "
        f"(batch {train_cfg.batch_size}). Quality: {quality_name} of "
        f"{n} samples to held-out data (lower is better).",
        f"Total wall time {seconds:.0f} s on {os.cpu_count()} CPU cores ({jax.default_backend()}).",
        "",
        common.markdown_table(
            ["sampler", "target", "NFE", quality_name, "time per call (ms)"],
            [
                [
                    r["sampler"],
                    r["target"],
                    r["nfe"],
                    f"{r['quality']:.4f}",
                    f"{1e3 * r['seconds']:.1f}",
                ]
                for r in rows
            ],
            text_columns=2,
        ),  # fmt: skip
    ]
    lines += [
        "",
        "Grids: DDPM and DDIM time-uniform, Heun and iPNDM Karras (rho = 7), DPM-Solvers "
        "log-SNR uniform; every grid ends at t = 0 with the denoiser's output. DDIM on GITS: the "
        f"grid chosen by dynamic programming from {_warmup(c)} other warm-up samples (Chen et al. "
        "2024; `jaxdiff.schedules.gits`, fitting time not counted). The diffrax row "
        "counts 6 evaluations per Tsit5 step plus the first and the final denoiser call. "
        "Heun and DPM-Solver-3 at NFE <= 5 take only 2-3 steps, too few for a high-order "
        "single-step method from t_max (the known instability of few-step high-order solvers).",
        "",
        f"DDIM trajectories in EDM coordinates x_t / alpha_t (Chen et al. 2023): the largest "
        f"distance from the chord x_T -> x_0 is on average "
        f"{stats['max_relative_chord_deviation']:.4f} of the chord's length (worst "
        f"{stats['worst_relative_chord_deviation']:.4f}): the sampling trajectories are "
        "quasi-linear.",
        "",
        f"Floor: two independent data sets score {stats['data_floor']:.4f}.",
        "",
        "![quality](quality_vs_nfe.png)",
        "",
        "![trajectories](trajectories.png)",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def run_demo(c: DemoConfig) -> dict:
    """Train (or resume), compare the samplers, write figures and report; returns the numbers."""
    t0 = time.perf_counter()
    out = Path(_workdir(c))
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = _train_config(c)
    print(f"[demo] training {train_cfg.model.kind} on {train_cfg.data.name} -> {train_cfg.workdir}")
    training_script.train(train_cfg)
    run = common.load_run(train_cfg.workdir)
    n = c.num_samples or (1000 if c.fast else 2000 if c.preset == "toy2d" else 256)
    denoise = common.run_denoiser(run, labels=common.null_labels(run, n))
    key = jax.random.key(c.seed)
    x_T = run.process.prior_sample((n, *run.shape), key=jax.random.fold_in(key, 1))
    reference = _reference(c.preset, n, c.seed)
    quality = Quality(c.preset, reference)
    nfes = (10,) if c.fast else c.nfes
    rtols = (1e-2,) if c.fast else DIFFRAX_RTOLS
    warm = run.process.prior_sample((_warmup(c), *run.shape), key=jax.random.fold_in(key, 3))
    warmup = (common.run_denoiser(run, labels=common.null_labels(run, _warmup(c))), warm)
    rows, samples = compare_samplers(
        run.process, denoise, x_T, nfes, quality, key=jax.random.fold_in(key, 2), rtols=rtols,
        warmup=warmup,
    )  # fmt: skip
    shown = reference if c.preset == "toy2d" else reference.reshape(-1, 8, 8, 1)
    paths = plot_samples(out, c.preset, shown, samples, rows)
    floor = quality.floor(c.seed)
    paths.append(plot_quality(out, rows, quality.name, floor))
    m = min(n, 200)
    denoise_m = common.run_denoiser(run, labels=common.null_labels(run, m))
    traj_path, stats = plot_trajectories(out, c.preset, run.process, denoise_m, x_T[:m], shown)
    paths += [traj_path, plot_loss(out, Path(train_cfg.workdir))]
    seconds = time.perf_counter() - t0
    stats["data_floor"] = floor
    paths.append(write_report(out, c, train_cfg, rows, quality.name, stats, n, seconds))
    result = {"rows": rows, "quality": quality.name, **stats, "seconds": seconds}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _print_summary(out, rows, quality.name, [p for p in paths if p is not None], seconds)
    return result


def _print_summary(out: Path, rows, quality_name: str, paths, seconds: float):
    best = {}
    for r in rows:
        if r["sampler"] not in best or r["quality"] < best[r["sampler"]]["quality"]:
            best[r["sampler"]] = r
    print(f"\n[demo] {quality_name} (lower is better), best NFE per sampler:")
    for label, r in best.items():
        print(f"  {label:24s} NFE {r['nfe']:4d}  {r['quality']:.4f}")
    print(f"[demo] done in {seconds:.0f} s. Outputs in {out.resolve()}:")
    for p in paths:
        print(f"  {p}")


def parse_args(argv=None) -> DemoConfig:
    import tyro

    config = tyro.cli(DemoConfig, args=argv)
    if os.environ.get("JAXDIFF_FAST", "0") == "1":
        config = dataclasses.replace(config, fast=True)
    return config


def main(argv=None):
    return run_demo(parse_args(argv))


if __name__ == "__main__":
    main()
