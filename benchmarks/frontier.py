"""The few-step frontier: the best jaxdiff recipe per NFE on an exact target (issue 14, item 2).

A recipe is a sampler (DDIM, DPM-Solver++(2M)/(3M), iPNDM, UniPC-2/3, DEIS-3, the multistep
ones with and without diff-sampler's analytical first step, AFS) on a grid: hand-made (Karras
rho 7, log-SNR, polynomial 3), GITS (step costs of DDIM steps from 64 warm-up samples, the
grid used with every sampler) or :func:`jaxdiff.schedules.optimize` fitted to that sampler,
started from the GITS grid and the eight hand-made grids of its default ``init``. Every recipe
is measured on the benchmarks' 16-d, 8-component Gaussian mixture (EDM process, sigma 80 ->
0.002, float64) as the root-mean-square error per coordinate against the exact
probability-flow endpoint (diffrax Dopri8, tol 1e-10, then the denoiser at t_min) of 256
samples; the fitted grids see only 256 other warm-up samples, whose exact endpoints are the
teacher. *fit (s)*: the wall time of fitting the grid, the teacher's share (solving the
warm-up endpoints once) and GITS's step costs included.

Run as part of ``python benchmarks/samplers.py`` (section "frontier" of RESULTS.md) or alone:
``python benchmarks/frontier.py [--quick]``.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxdiff  # noqa: E402
from jaxdiff import samplers as S  # noqa: E402
from jaxdiff import schedules  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from experiments.common import markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
NFES = (3, 4, 5, 6, 8, 10)
TARGETS = {5: 0.25, 10: 0.03}  # the RMS targets

# name: factory(process, afs) ; the AFS variants save one denoiser call
SAMPLERS = {
    "ddim": lambda p, afs: S.ddim(p),
    "dpm_solver_pp_2m": lambda p, afs: S.dpm_solver_pp(p, 2, afs=afs),
    "dpm_solver_pp_3m": lambda p, afs: S.dpm_solver_pp(p, 3, afs=afs),
    "ipndm": lambda p, afs: S.ipndm(p, afs=afs),
    "unipc_2": lambda p, afs: S.unipc(p, 2, afs=afs),
    "unipc_3": lambda p, afs: S.unipc(p, 3, afs=afs),
    "deis_3": lambda p, afs: S.deis(p, 3, afs=afs),
}
MULTISTEP = ("dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "unipc_2", "unipc_3", "deis_3")
FITTED = ("dpm_solver_pp_2m", "ipndm", "unipc_2", "unipc_3")  # optimize is run for these
HAND = {
    "karras7": schedules.karras,
    "log_snr": schedules.log_snr_uniform,
    "poly3": functools.partial(schedules.polynomial, power=3.0),
}

# optimize's default starts (uniform, log-SNR, polynomial, Karras), to which GITS is added
OPTIMIZE_STARTS = [schedules.uniform, schedules.log_snr_uniform]
OPTIMIZE_STARTS += [functools.partial(schedules.polynomial, power=p) for p in (1.5, 2.0, 3.0)]
OPTIMIZE_STARTS += [functools.partial(schedules.karras, rho=r) for r in (3.0, 5.0, 7.0)]


def steps_for(sampler, nfe):
    """Steps whose NFE is exactly ``nfe`` (None if there are none)."""
    n = sampler.steps_for_nfe(nfe)
    return n if n >= 1 and sampler.nfe(n) == nfe else None


def search(process, denoise, reference, x_T, warm, nfes=NFES, fit=True, opt_steps=200):
    """Every recipe at every NFE: a list of rows (sampler, afs, grid, nfe, rmse, fit_s)."""
    start = time.perf_counter()
    ref = np.asarray(reference(denoise, x_T))
    warm_ref = jnp.asarray(reference(denoise, warm))
    teacher_s = time.perf_counter() - start  # the warm-up share of it is what fitting pays
    teacher_s /= 2
    start = time.perf_counter()
    costs = schedules.step_costs(process, denoise, warm[:64])  # GITS: one DDIM step per pair
    gits_s = time.perf_counter() - start
    rows = []

    def measure(sampler, ts):
        x = jaxdiff.sample(sampler, denoise, x_T, ts).x
        return float(np.sqrt(np.mean((np.asarray(x) - ref) ** 2)))

    todo = [
        (name, afs)
        for name in SAMPLERS
        for afs in ((False, True) if name in MULTISTEP else (False,))
    ]
    for name, afs in tqdm(todo, desc="frontier", leave=False):
        sampler = SAMPLERS[name](process, afs)
        for nfe in nfes:
            n = steps_for(sampler, nfe)
            if n is None:
                continue
            row = dict(sampler=sampler.name, nfe=nfe, steps=n)
            for grid, make in HAND.items():
                rows.append(
                    row | dict(grid=grid, rmse=measure(sampler, make(process, n)), fit_s=0.0)
                )
            start = time.perf_counter()
            ts = costs.grid(n)
            rows.append(
                row
                | dict(
                    grid="gits",
                    rmse=measure(sampler, ts),
                    fit_s=gits_s + time.perf_counter() - start,
                )
            )
            if fit and name in FITTED:
                start = time.perf_counter()
                init = [costs.grid(n), *OPTIMIZE_STARTS]
                ts = schedules.optimize(
                    sampler, denoise, warm, n, teacher=warm_ref, steps=opt_steps, init=init
                )
                fit_s = time.perf_counter() - start + teacher_s + gits_s
                rows.append(row | dict(grid="optimize", rmse=measure(sampler, ts), fit_s=fit_s))
    return rows


def best_table(rows, nfes=NFES):
    """The best recipe per NFE, and the best on a hand-made grid for comparison."""
    cells = []
    for nfe in nfes:
        at = [r for r in rows if r["nfe"] == nfe]
        if not at:
            continue
        best = min(at, key=lambda r: r["rmse"])
        hand = min((r for r in at if r["grid"] in HAND), key=lambda r: r["rmse"])
        target = TARGETS.get(nfe)
        met = "" if target is None else f"{'yes' if best['rmse'] <= target else 'NO'} (<= {target})"
        cells.append([
            nfe, best["sampler"], best["grid"], f"{best['rmse']:.3f}", f"{best['fit_s']:.1f}",
            f"{hand['sampler']} / {hand['grid']}", f"{hand['rmse']:.3f}", met,
        ])  # fmt: skip
    header = ["NFE", "best recipe: sampler", "grid", "RMSE", "fit (s)"]
    header += ["best on a hand-made grid", "its RMSE", "target"]
    return markdown_table(header, cells)


def section(rows, elapsed, quick):
    lines = [
        f"`python benchmarks/frontier.py{' --quick' if quick else ''}` ({elapsed:.0f} s). "
        + __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        best_table(rows),
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Args:
    """The best recipe per NFE on the exact mixture."""

    quick: bool = False
    """NFE 5 and 10 only, 100 Adam steps."""
    out: str = str(HERE)
    """Folder for RESULTS.md."""


def run(quick: bool):
    sys.path.insert(0, str(HERE))
    import samplers as bench  # the benchmarks' mixture and exact reference

    process = bench.PROCESS
    denoise = bench.mixture(jnp.float64)
    x_T = process.prior_sample((bench.BATCH, bench.DIM), key=jax.random.key(2), dtype=jnp.float64)
    warm = process.prior_sample((256, bench.DIM), key=jax.random.key(5), dtype=jnp.float64)
    nfes = (5, 10) if quick else NFES
    return search(
        process, denoise, bench.reference, x_T, warm, nfes, opt_steps=100 if quick else 200
    )


def main(argv=None):
    args = tyro.cli(Args, args=argv, description=__doc__.splitlines()[0])
    start = time.perf_counter()
    rows = run(args.quick)
    md = section(rows, time.perf_counter() - start, args.quick)
    print(md)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_section('frontier', md, Path(args.out) / 'RESULTS.md')}")


if __name__ == "__main__":
    sys.exit(main())
