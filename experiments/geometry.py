"""The geometric perspective on a model: ``python -m experiments.geometry [RUN_DIR]``.

Without ``RUN_DIR``: the exact denoiser of a 6-component Gaussian mixture in 8-d under the EDM
process (float64), and the optimal denoiser of a small sample of it for memorization. With the
run folder of ``python -m experiments.train --preset digits`` (or any run): its EMA network, and
the optimal denoiser of its training data as the reference of the score deviation.

The analyses of Chen et al. (2023, "A Geometric Perspective on Diffusion Models") and of GITS
(Chen et al. 2024), written to ``--workdir`` (default ``runs/geometry``):

- ``deviation.png``: distance of the sampling trajectory from its chord, relative to the chord;
- ``convergence.png``: distance to the final sample of the sampling and of the denoising
  trajectory against the noise level;
- ``projection.png``: sampling and denoising trajectories on their first two principal axes;
- ``score_deviation.png``: the model's score against the optimal denoiser's along its trajectories;
- ``schedules.png``: GITS and ``optimize``d grids next to the hand-made ones, with their errors;
- ``summary.md`` and ``summary.json``: the measured numbers.

On a CPU a U-Net run is slow with the defaults (the teacher trajectories and ``optimize`` call the
network thousands of times); smaller settings finish in a few minutes:
``--teacher-steps 50 --warmup 16 --held-out 32 --opt-steps 20 --nfes 5 8 --opt-nfes 6 --num 16``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm.auto import tqdm

import jaxdiff
from experiments import common
from jaxdiff import fitted_grids, geometry, samplers, schedules
from jaxdiff.analytic import GaussianMixture

__all__ = ["GeometryConfig", "mixture_target", "main"]


@dataclass(frozen=True)
class GeometryConfig:
    """What to analyse, where to write, and how much to compute."""

    run_dir: Annotated[str | None, tyro.conf.Positional] = None
    """Run folder of experiments.train; without it the exact Gaussian mixture is used."""
    workdir: str = "runs/geometry"
    """Output folder."""
    num: int = 32
    """Trajectories drawn (Heun on a Karras grid)."""
    steps: int = 40
    """Heun steps of the trajectories."""
    warmup: int = 64
    """Warm-up samples of GITS and optimize (GITS uses the first half)."""
    held_out: int = 128
    """Other samples on which the schedules' errors are measured."""
    teacher_steps: int = 200
    """Log-SNR steps of the Heun teacher (each refined twice)."""
    nfes: tuple[int, ...] = (5, 6, 8, 10)
    """NFEs of the DDIM / GITS comparison."""
    opt_nfes: tuple[int, ...] = (6, 8)
    """NFEs of the optimize comparison (DPM-Solver++(2M) and iPNDM)."""
    opt_steps: int = 100
    """Adam steps of optimize."""
    memorize_points: int = 24
    """Training points of the memorization check (mixture only)."""
    reference_points: int = 1024
    """Mixture samples whose optimal denoiser is the score-deviation reference (mixture only)."""
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("num", "steps", "warmup", "held_out", "teacher_steps", "memorize_points"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2; got {getattr(self, name)}.")
        if self.opt_steps < 0:
            raise ValueError(f"opt_steps must be >= 0; got {self.opt_steps}.")
        if any(n < 2 for n in self.nfes + self.opt_nfes):
            raise ValueError(f"NFEs must be >= 2; got {self.nfes} and {self.opt_nfes}.")


# --- targets -------------------------------------------------------------------------------------
def mixture_target():
    """The 6-component 8-d mixture of tests/test_geometry.py (standard deviations 0.25..0.75)."""
    means = 1.5 * jax.random.normal(jax.random.key(1), (6, 8), jnp.float64)
    return GaussianMixture(means, 0.5 * jnp.linspace(0.5, 1.5, 6, dtype=jnp.float64))


def load_target(config: GeometryConfig, key):
    """``(title, process, denoise, reference data)``: the data is the score-deviation reference."""
    if config.run_dir is None:
        mix = mixture_target()
        process = jaxdiff.EDM()
        ref = mix.sample(config.reference_points, key=key)
        return "Gaussian mixture (6 components, 8-d), EDM", process, mix.denoiser(process), ref
    from experiments import configs
    from experiments.common import load_denoiser

    denoise, process, cfg = load_denoiser(config.run_dir)
    data = jnp.asarray(configs.load_data(cfg).x)
    return f"run {config.run_dir} ({cfg.preset})", process, denoise, data


# --- analyses ------------------------------------------------------------------------------------
def _sigma(process, ts) -> np.ndarray:
    return np.asarray(schedules.noise_levels(process, ts))


def trajectories(config, process, denoise, reference, shape, dtype, key):
    """Heun trajectories and their statistics (EDM coordinates)."""
    ts = schedules.karras(process, config.steps, dtype=dtype)
    x_T = process.prior_sample((config.num, *shape), key=key, dtype=dtype)
    res = jaxdiff.sample(samplers.heun(process), denoise, x_T, ts, save_trajectory=True)
    xs = geometry.edm_trajectory(process, res.xs, ts)
    dev = geometry.chord_deviation(xs)
    samp = geometry.distance_to_final(xs) / dev.chord
    den = geometry.distance_to_final(res.denoised, res.x) / dev.chord
    score = geometry.score_deviation(process, denoise, reference, res, ts)
    return dict(
        ts=ts,
        res=res,
        stats=geometry.trajectory_stats(res, process, ts),
        relative=np.asarray(dev.relative),
        sampling=np.asarray(samp),
        denoising=np.asarray(den),
        score=np.asarray(score.relative),
        proj=geometry.project_2d(xs),
        proj_den=geometry.project_2d(res.denoised),
    )


def memorization(config, key):
    """Sampling with the optimal denoiser of a few mixture samples ends on training points."""
    process = jaxdiff.EDM()
    ys = mixture_target().sample(config.memorize_points, key=key)
    x_T = process.prior_sample(
        (config.num, ys.shape[1]), key=jax.random.fold_in(key, 1), dtype=ys.dtype
    )
    den = geometry.optimal_denoiser(ys, process)
    x = jaxdiff.sample(samplers.heun(process), den, x_T, schedules.karras(process, 40)).x
    dist = jnp.linalg.norm(x[:, None] - ys[None], axis=-1)
    return dict(
        max_distance=float(dist.min(axis=1).max()),
        distinct=len(set(np.asarray(dist.argmin(axis=1)).tolist())),
        points=config.memorize_points,
    )


def _error(sampler, denoise, x_T, ref, ts):
    x = jaxdiff.sample(sampler, denoise, x_T, ts).x
    return float(jnp.mean(jnp.linalg.norm((x - ref).reshape(x.shape[0], -1), axis=-1)))


def _hand_made(process, n):
    grids = {"uniform": schedules.uniform(process, n)}
    grids["log-SNR"] = schedules.log_snr_uniform(process, n)
    grids |= {f"poly {p}": schedules.polynomial(process, n, p) for p in (1.5, 2.0, 3.0)}
    grids |= {f"Karras {r:g}": schedules.karras(process, n, r) for r in (3.0, 5.0, 7.0)}
    return grids


def schedule_study(config, process, denoise, shape, dtype, key):
    """DDIM on GITS vs hand-made grids; DPM-Solver++(2M) and iPNDM on optimized vs hand-made."""
    noise = process.prior_sample((config.warmup + config.held_out, *shape), key=key, dtype=dtype)
    fine = schedules.log_snr_uniform(process, config.teacher_steps, dtype=dtype)
    ref = fitted_grids.fine_trajectory(process, denoise, noise, fine)[-1]
    warm, warm_ref = noise[: config.warmup], ref[: config.warmup]
    test, test_ref = noise[config.warmup :], ref[config.warmup :]
    rows, grids = [], {}
    ddim = samplers.ddim(process)
    jobs = [("DDIM", ddim, n) for n in config.nfes]
    jobs += [
        (name, s, n)
        for n in config.opt_nfes
        for name, s in (
            ("DPM-Solver++(2M)", samplers.dpm_solver_pp(process, 2)),
            ("iPNDM", samplers.ipndm(process)),
        )
    ]
    # every DDIM grid from one GITS teacher solve and cost matrix
    costs = fitted_grids.step_costs(process, denoise, warm[: config.warmup // 2])
    gits_grids = {n: costs.grid(n) for n in config.nfes}
    for name, sampler, n in tqdm(jobs, desc="schedules", disable=not config.progress):
        if name == "DDIM":
            fitted, label = gits_grids[n], "GITS"
        else:
            fitted = fitted_grids.optimize(
                sampler, denoise, warm, n, teacher=warm_ref, steps=config.opt_steps
            )
            label = "optimized"
        hand = {
            k: _error(sampler, denoise, test, test_ref, g)
            for k, g in _hand_made(process, n).items()
        }
        best = min(hand, key=hand.get)
        ours = _error(sampler, denoise, test, test_ref, fitted)
        rows.append(dict(sampler=name, nfe=n, schedule=label, error=ours, best_hand=best,
                         best_hand_error=hand[best], hand=hand))  # fmt: skip
        grids[(name, n)] = (
            label,
            np.asarray(fitted),
            np.asarray(_hand_made(process, n)[best]),
            best,
        )
    return rows, grids


# --- figures -------------------------------------------------------------------------------------
def plot_trajectories(out: Path, tr, process, title):
    plt = common.pyplot()
    sig = _sigma(process, tr["ts"])
    files = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    rel = tr["relative"]
    ax.plot(np.arange(rel.shape[0]), rel[:, :8], color="tab:blue", alpha=0.3, lw=0.8)
    ax.plot(np.arange(rel.shape[0]), rel.mean(1), color="k", lw=2, label="mean")
    ax.set(xlabel="step", ylabel="deviation / chord length", title=f"Trajectory deviation\n{title}")
    ax.legend()
    files["deviation"] = _save(fig, out / "deviation.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sig[:-1], tr["sampling"][:-1].mean(1), label="sampling trajectory")
    ax.plot(sig[:-1], tr["denoising"].mean(1), label="denoising trajectory")
    ax.set(xscale="log", yscale="log", xlabel=r"noise level $\tilde\sigma$",
           ylabel="distance to final sample / chord", title=f"Convergence\n{title}")  # fmt: skip
    ax.invert_xaxis()
    ax.legend()
    files["convergence"] = _save(fig, out / "convergence.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, proj, name in (
        (axes[0], tr["proj"], "sampling"),
        (axes[1], tr["proj_den"], "denoising"),
    ):
        c = np.asarray(proj.coords)
        for b in range(min(6, c.shape[1])):
            ax.plot(c[:, b, 0], c[:, b, 1], "-o", ms=2, lw=0.8)
        ev = float(np.asarray(proj.explained).sum(1).mean())
        ax.set(title=f"{name} trajectories, 2 PCs explain {ev:.4f}", xlabel="PC 1", ylabel="PC 2")
    fig.suptitle(title)
    files["projection"] = _save(fig, out / "projection.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    sc = tr["score"]
    ax.plot(sig[: sc.shape[0]], np.median(sc, 1), label="median")
    ax.fill_between(sig[: sc.shape[0]], np.quantile(sc, 0.1, 1), np.quantile(sc, 0.9, 1),
                    alpha=0.3, label="10-90%")  # fmt: skip
    ax.set(xscale="log", xlabel=r"noise level $\tilde\sigma$",
           ylabel=r"$\|s - s^*\| / \|s^*\|$", title=f"Score deviation from the optimal denoiser\n{title}")  # fmt: skip
    ax.invert_xaxis()
    ax.legend()
    files["score_deviation"] = _save(fig, out / "score_deviation.png")
    return files


def plot_schedules(out: Path, rows, grids, process, title):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.8), squeeze=False)
    for ax, ((name, n), (label, fitted, hand, best)), row in zip(
        axes[0], grids.items(), rows, strict=True
    ):
        for g, lab in (
            (fitted, f"{label}: {row['error']:.3f}"),
            (hand, f"{best}: {row['best_hand_error']:.3f}"),
        ):
            ts = jnp.asarray(g)
            ax.plot(np.arange(len(g) - 1), _sigma(process, ts)[:-1], "-o", ms=3, label=lab)
        ax.set(yscale="log", title=f"{name}, NFE {n}", xlabel="step", ylabel=r"$\tilde\sigma$")
        ax.legend(fontsize=7)
    fig.suptitle(f"Fitted vs best hand-made grids (error on held-out samples)\n{title}")
    return {"schedules": _save(fig, out / "schedules.png")}


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    common.pyplot().close(fig)
    return str(path)


# --- summary -------------------------------------------------------------------------------------
def summary_markdown(title, tr, mem, rows) -> str:
    st = tr["stats"]
    samp, den = tr["sampling"].mean(1), tr["denoising"].mean(1)
    half = len(den) // 4
    lines = [
        f"# Geometry of sampling: {title}",
        "",
        f"Heun on a Karras grid, {tr['relative'].shape[0] - 1} steps, "
        f"{tr['relative'].shape[1]} trajectories, EDM coordinates.",
        "",
    ]
    quantities = [
        ["largest deviation from the chord / chord length", f"{float(st.worst_chord_deviation):.4f}"],
        ["mean over trajectories of their largest deviation", f"{float(st.max_chord_deviation):.4f}"],
        ["variance explained by 2 principal directions", f"{float(st.explained_2d):.6f}"],
        [f"distance to final / chord after {half} steps: sampling", f"{samp[half]:.4f}"],
        [f"distance to final / chord after {half} steps: denoising", f"{den[half]:.4f}"],
        ["median relative score deviation, largest over steps",
         f"{np.median(tr['score'], 1).max():.4f}"],
    ]  # fmt: skip
    if mem is not None:
        quantities.append(
            [f"memorization: largest distance to a training point ({mem['points']} points)",
             f"{mem['max_distance']:.2e} ({mem['distinct']} distinct points hit)"]
        )  # fmt: skip
    lines.append(common.markdown_table(["quantity", "value"], quantities, text_columns=2))
    lines += ["", "## Schedules (mean error against the teacher on held-out samples)", ""]
    header = ["sampler", "NFE", "fitted", "error", "best hand-made", "its error"]
    cells = [
        [r["sampler"], r["nfe"], r["schedule"], f"{r['error']:.4f}", r["best_hand"],
         f"{r['best_hand_error']:.4f}"]
        for r in rows
    ]  # fmt: skip
    return "\n".join(lines) + "\n" + common.markdown_table(header, cells) + "\n"


def parse_args(argv=None) -> GeometryConfig:
    return tyro.cli(GeometryConfig, args=argv, description=__doc__)


def main(argv=None) -> dict:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    if config.run_dir is None:
        jax.config.update("jax_enable_x64", True)
    elif not (Path(config.run_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{config.run_dir} is not a run folder of experiments.train.")
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(config.seed)
    title, process, denoise, reference = load_target(config, jax.random.fold_in(key, 0))
    dtype = jnp.float64 if config.run_dir is None else jnp.float32
    shape = tuple(reference.shape[1:])
    print("trajectories ...", file=sys.stderr, flush=True)
    tr = trajectories(config, process, denoise, reference, shape, dtype, jax.random.fold_in(key, 1))
    mem = memorization(config, jax.random.fold_in(key, 2)) if config.run_dir is None else None
    rows, grids = schedule_study(config, process, denoise, shape, dtype, jax.random.fold_in(key, 3))
    files = plot_trajectories(out, tr, process, title)
    files |= plot_schedules(out, rows, grids, process, title)
    md = summary_markdown(title, tr, mem, rows)
    (out / "summary.md").write_text(md)
    st = tr["stats"]
    result = dict(
        target=title,
        config=asdict(config),
        worst_chord_deviation=float(st.worst_chord_deviation),
        max_chord_deviation=float(st.max_chord_deviation),
        explained_2d=float(st.explained_2d),
        memorization=mem,
        schedules=rows,
        files=files,
    )
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(md)
    print(json.dumps({"workdir": str(out), **files}))
    return result


if __name__ == "__main__":
    main()
