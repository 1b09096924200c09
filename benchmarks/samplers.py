"""Sampler benchmark: speed, overhead, compile time and accuracy of every sampler at NFE 10, 20, 50.

Two denoisers on the EDM process (alpha = 1, sigma = t), Karras grids (rho = 7):

- the exact denoiser of a Gaussian mixture (16 dimensions, 8 components), batch 256;
- a small random-init MLP (2 hidden layers of 256, EDM preconditioning, sigma_data = 1), batch 256.

For each sampler the number of steps n is chosen so that its NFE is as close as possible to the
target. Measured (float32, median and minimum of repeats, ``block_until_ready``; the minimum,
least disturbed by other jobs on a shared CPU, is used for the ratios):

- ``time``: one call of the compiled sampling program (``jax.jit`` around ``jaxdiff.sample``);
- ``api``: one call of ``jaxdiff.sample`` itself (input checks and dispatch included);
- ``overhead``: time / (NFE x time of one jitted denoiser call), the cost of everything that is
  not the denoiser (target <= 1.1); ``vs loop``: time / time of a bare ``lax.scan`` of NFE
  denoiser calls, which leaves out the dispatch cost included in a single call; ``vs floor``:
  time / time of the cheapest scan of NFE denoiser calls that carries as many arrays like ``x``
  as the sampler's state (``floor_loop``), what the sampler adds beyond its history (target
  <= 1.1);
- ``compile``: tracing + compilation of the sampling program (should not grow with NFE: the
  steps are one ``lax.scan``);
- *sampler rebuilt each call*: a new sampler object every call, as a script or the README's tour
  writes it, passed to one ``jax.jit``-ed function (time against a bare scan of the same NFE,
  target <= 1.1) and to ``jaxdiff.sample`` itself (its eager dispatch included). Samplers are
  hashable pytrees, so after the first call nothing compiles (counted with ``jax.monitoring``);
- ``error``: root-mean-square error per coordinate against the probability-flow ODE solved by
  diffrax (Dopri8, rtol = atol = 1e-10, float64) from t_max to t_min followed by the denoiser at
  t_min, which is what every grid ending with (t_min, 0) approximates. Stochastic samplers have
  no pathwise reference (blank).

Run ``python benchmarks/samplers.py [--quick]``; NFE per step and steps per NFE target are read
off each sampler (``nfe_per_step``, ``steps_for_nfe``). Writes the "samplers" section of
``benchmarks/RESULTS.md`` (other sections are kept) and ``benchmarks/samplers_error.png``.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # the reference is float64; the samplers run in float32

import diffrax as dfx  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

import jaxdiff  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from experiments.common import SAMPLERS as SAMPLER_REGISTRY  # noqa: E402
from experiments.common import compilations, markdown_table  # noqa: E402
from jaxdiff import samplers as S  # noqa: E402
from jaxdiff import schedules  # noqa: E402
from jaxdiff.analytic import GaussianMixture  # noqa: E402

HERE = Path(__file__).resolve().parent
DIM, COMPONENTS, BATCH = 16, 8, 256
PROCESS = jaxdiff.EDM()

# name: factory(process); NFE per step, steps per target NFE and stochasticity come from the sampler
SAMPLERS = {
    "ddim": S.ddim,
    "euler": S.euler,
    "heun": S.heun,
    "dpm_solver_2": functools.partial(S.dpm_solver, order=2),
    "dpm_solver_3": functools.partial(S.dpm_solver, order=3),
    "dpm_solver_pp_2m": functools.partial(S.dpm_solver_pp, order=2),
    "dpm_solver_pp_3m": functools.partial(S.dpm_solver_pp, order=3),
    "ipndm": S.ipndm,
    "unipc_2": functools.partial(S.unipc, order=2),
    "ddpm": S.ddpm,
    "euler_maruyama": S.euler_maruyama,
    "dpm_solver_pp_sde": S.dpm_solver_pp_sde,
    "predictor_corrector": lambda p: S.predictor_corrector(p, S.euler_maruyama(p)),
    "unipc_3": functools.partial(S.unipc, order=3),
    # the samplers of issue 14, as the experiments name them
    **{
        name: SAMPLER_REGISTRY[name]
        for name in (
            "lms",
            "deis",
            "dpm_solver_pp_2s",
            "dpm_solver_pp_3s",
            "euler_ancestral",
            "dpm_solver_pp_3m_sde",
        )
    },  # fmt: skip
}
REBUILT = ("ddim", "heun", "dpm_solver_pp_2m")  # the "sampler rebuilt each call" rows
REBUILT_NFE = 50


# --- denoisers ---------------------------------------------------------------------------------
def mixture(dtype):
    key_m, key_s, key_w = jax.random.split(jax.random.key(0), 3)
    means = 2.0 * jax.random.normal(key_m, (COMPONENTS, DIM), jnp.float64)
    scales = jax.random.uniform(key_s, (COMPONENTS,), jnp.float64, 0.3, 0.7)
    weights = jax.random.uniform(key_w, (COMPONENTS,), jnp.float64, 0.5, 1.5)
    mix = GaussianMixture(means.astype(dtype), scales.astype(dtype), weights.astype(dtype))
    return mix.denoiser(PROCESS)


class MLP(eqx.Module):
    """``F(x, c_noise)``: x and a sinusoidal embedding of c_noise -> 256 -> 256 -> x (SiLU)."""

    layers: list
    freqs: jax.Array

    def __init__(self, key, dim=DIM, width=256, n_freqs=8):
        sizes = [dim + 2 * n_freqs, width, width, dim]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros((b,)))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
        ]
        self.freqs = jnp.exp(jnp.linspace(0.0, np.log(100.0), n_freqs))

    def __call__(self, x, c_noise):
        angle = c_noise[:, None].astype(x.dtype) * self.freqs.astype(x.dtype)
        h = jnp.concatenate([x, jnp.sin(angle), jnp.cos(angle)], axis=-1)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.astype(x.dtype) + b.astype(x.dtype)
            h = jax.nn.silu(h) if i < len(self.layers) - 1 else h
        return h


def mlp(dtype):
    net = jax.tree_util.tree_map(lambda a: a.astype(dtype), MLP(jax.random.key(1)))
    return jaxdiff.denoiser(net, PROCESS, prediction="edm", sigma_data=1.0)


DENOISERS = {"mixture": mixture, "mlp": mlp}


# --- reference, timing -------------------------------------------------------------------------
def reference(denoise, x_T):
    """Probability-flow ODE dx/dt = (x - D(x, t)) / t (EDM) from t_max to t_min, then D."""

    def velocity(t, x, args):
        return (x - denoise(x, t)) / t

    @jax.jit
    def solve(x_T):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(velocity),
            dfx.Dopri8(),
            PROCESS.t_max,
            PROCESS.t_min,
            -1e-2,
            x_T,
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            max_steps=100_000,
        )
        return denoise(sol.ys[-1], PROCESS.t_min)

    return solve(x_T)


def timings(fn, repeats):
    """``(median, min)`` wall time of ``fn()`` (which must block), after one warm-up call.

    The CPU is shared with other jobs: the median is the typical call, the minimum the call least
    disturbed by them (the better estimate of the program's own cost).
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def denoiser_time(denoise, x, repeats):
    """One jitted denoiser call (dispatch included): ``(median, min)``."""
    call = jax.jit(lambda x: denoise(x, jnp.asarray(1.0, x.dtype)))
    return timings(lambda: call(x).block_until_ready(), 20 * repeats)


def baseline_loop(denoise, x, nfe, stochastic, key):
    """A bare ``lax.scan`` of ``nfe`` denoiser calls: a sampler at zero overhead.

    For a stochastic sampler each call also draws one standard normal like ``x`` (the least any
    stochastic sampler draws), so that the ratio isolates the sampler's own work.
    """
    ts = jnp.linspace(PROCESS.t_max, PROCESS.t_min, nfe).astype(x.dtype)

    def body(x, i):
        x = denoise(x, ts[i])
        if stochastic:
            x = x + 1e-3 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x, None

    return jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(nfe))[0])


def history_size(sampler, x, ts) -> int:
    """How many arrays like ``x`` the sampler's state holds (its multistep history)."""
    state = jax.eval_shape(lambda: sampler.init(x, ts))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state)) // x.size


def floor_loop(denoise, x, nfe, stochastic, key, history):
    """The cheapest scan of ``nfe`` denoiser calls that carries ``history`` arrays like ``x``:
    ``x <- a x + b D(x) + sum_j c_j H_j`` with every coefficient computed before the loop, the
    newest output pushed into the history (a sampler's state at zero overhead).

    On a cheap denoiser carrying the history is itself a cost no sampler avoids (XLA:CPU keeps
    the output in a buffer of its own and copies the loop's carry). ``history = 0`` is the bare
    loop plus the one fused update every sampler makes. Stochastic: one normal draw per call.
    """
    ts = jnp.linspace(PROCESS.t_max, PROCESS.t_min, nfe).astype(x.dtype)
    a = jnp.linspace(0.5, 0.9, nfe, dtype=x.dtype)
    c = jnp.linspace(0.01, 0.1, nfe * max(history, 1), dtype=x.dtype).reshape(nfe, -1)

    def body(carry, i):
        x, hist = carry
        d = denoise(x, ts[i])
        x_next = a[i] * x + (1.0 - a[i]) * d
        for j in range(history):
            x_next = x_next + c[i, j] * hist[j]
        if stochastic:
            x_next = x_next + 1e-3 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        if history:
            hist = jnp.concatenate([d[None], hist[:-1]])
        return (x_next, hist), None

    def run(x):
        init = (x, jnp.zeros((history, *x.shape), x.dtype))
        return jax.lax.scan(body, init, jnp.arange(nfe))[0][0]

    return jax.jit(run)


def interleaved_min(fns, repeats):
    """Minimum wall time of each blocking ``fn``, calling them in turn (same load for each)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - start)
    return best


def hand_written_heun(denoise, n):
    """EDM's Heun (Karras et al. 2022, Alg. 1) as a bare scan for EDM (alpha = 1, sigma = t),
    with the coefficients inlined: what jaxdiff's ``heun`` should cost at most."""
    ts = schedules.karras(PROCESS, n, dtype=jnp.float32)

    def body(x, i):
        t, s = ts[i], ts[i + 1]
        d = (x - denoise(x, t)) / t
        x_pred = x + (s - t) * d
        return x + (s - t) * 0.5 * (d + (x_pred - denoise(x_pred, s)) / s), None

    return jax.jit(lambda x: denoise(jax.lax.scan(body, x, jnp.arange(n - 1))[0], ts[n - 1]))


def hand_written_dpm_solver_pp_2m(denoise, n):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) as a bare scan for EDM, its coefficients
    computed before the loop: the floor of a multistep sampler's own arithmetic (n steps, the
    last one the denoiser's output at t_min)."""
    ts = schedules.karras(PROCESS, n, dtype=jnp.float32)
    h = jnp.log(ts[:-2]) - jnp.log(ts[1:-1])  # log-SNR gaps of the n - 1 ordinary steps
    ratio, b = ts[1:-1] / ts[:-2], -jnp.expm1(-h)
    r = jnp.concatenate([jnp.ones(1, h.dtype), h[:-1] / h[1:]])  # h_prev / h
    c = jnp.where(jnp.arange(n - 1) > 0, b / (2.0 * r), 0.0)  # first step: DDIM

    def body(carry, i):
        x, prev = carry
        d = denoise(x, ts[i])
        return (ratio[i] * x + b[i] * d + c[i] * (d - prev), d), None

    def sample(x):
        x, _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(n - 1))[0]
        return denoise(x, ts[n - 1])

    return jax.jit(sample)


def hand_written_predictor_corrector(denoise, n, key, snr=0.16):
    """Song et al.'s PC sampler (2021, Alg. 2 and 5) as a bare scan for EDM (f = 0, g^2 = 2t):
    an Euler-Maruyama step, then one Langevin step whose size comes from the batch-averaged
    norms of the noise and the score. What ``predictor_corrector(p, euler_maruyama(p))`` costs
    at most; the norms sit between the denoiser and the update, so the method itself is slower
    than the floor loop."""
    ts = schedules.karras(PROCESS, n, dtype=jnp.float32)

    def body(x, i):
        t, s = ts[i], ts[i + 1]
        k = jax.random.fold_in(key, i)
        z_p = jax.random.normal(jax.random.fold_in(k, 0), x.shape, x.dtype)
        z_c = jax.random.normal(jax.random.fold_in(k, 1), x.shape, x.dtype)
        x = x + 2.0 * (t - s) * (denoise(x, t) - x) / t + jnp.sqrt(2.0 * t * (t - s)) * z_p
        score = (denoise(x, s) - x) / s**2
        z_norm = jnp.mean(jnp.sqrt(jnp.sum(z_c**2, -1)))
        eps = 2.0 * (snr * z_norm / jnp.mean(jnp.sqrt(jnp.sum(score**2, -1)))) ** 2
        return x + eps * score + jnp.sqrt(2.0 * eps) * z_c, None

    return jax.jit(lambda x: denoise(jax.lax.scan(body, x, jnp.arange(n - 1))[0], ts[n - 1]))


def predictor_corrector_against_hand_written(denoise, x, repeats, n=25):
    """Min times of jaxdiff's PC sampler, the hand-written scan and the floor loop (NFE 2n - 1)."""
    ts = schedules.karras(PROCESS, n, dtype=x.dtype)
    key = jax.random.key(5)
    sampler = S.predictor_corrector(PROCESS, S.euler_maruyama(PROCESS))
    ours = jax.jit(lambda x: jaxdiff.sample(sampler, denoise, x, ts, key=key).x)
    floor = floor_loop(denoise, x, 2 * n - 1, True, key, 0)
    fns = [ours, hand_written_predictor_corrector(denoise, n, key), floor]
    return interleaved_min([lambda f=f: f(x).block_until_ready() for f in fns], repeats)


def dpm_solver_pp_2m_against_hand_written(denoise, x, repeats, n=20):
    """Min times of jaxdiff's DPM-Solver++(2M), the hand-written scan and the bare loop (NFE n)."""
    ts = schedules.karras(PROCESS, n, dtype=x.dtype)
    ours = jax.jit(lambda x: jaxdiff.sample(S.dpm_solver_pp(PROCESS, 2), denoise, x, ts).x)
    fns = [
        ours,
        hand_written_dpm_solver_pp_2m(denoise, n),
        baseline_loop(denoise, x, n, False, None),
    ]
    return interleaved_min([lambda f=f: f(x).block_until_ready() for f in fns], repeats)


def heun_against_hand_written(denoise, x, repeats, n=25):
    """Min times of jaxdiff's heun, the hand-written scan and the bare loop, at NFE 2n - 1."""
    ts = schedules.karras(PROCESS, n, dtype=x.dtype)
    ours = jax.jit(lambda x: jaxdiff.sample(S.heun(PROCESS), denoise, x, ts).x)
    fns = [ours, hand_written_heun(denoise, n), baseline_loop(denoise, x, 2 * n - 1, False, None)]
    return interleaved_min([lambda f=f: f(x).block_until_ready() for f in fns], repeats)


def rebuilt_each_call(factory, denoise, x_T, repeats):
    """A sampler built anew for every call, at NFE ~ ``REBUILT_NFE``, run through
    ``jaxdiff.sample`` itself and as the argument of one ``jax.jit``-ed function: ``(nfe,
    compilations after the first calls, min time of each, min time of the bare loop, of the
    floor loop (:func:`floor_loop`), of building the sampler alone)``."""
    n = factory(PROCESS).steps_for_nfe(REBUILT_NFE)
    nfe = factory(PROCESS).nfe(n)
    ts = schedules.karras(PROCESS, n, dtype=x_T.dtype)
    key = jax.random.key(0)  # a traced hyperparameter (DDIM's eta) is not known to be 0
    program = jax.jit(lambda sampler, x: jaxdiff.sample(sampler, denoise, x, ts, key=key).x)
    loop = baseline_loop(denoise, x_T, nfe, False, None)
    floor = floor_loop(denoise, x_T, nfe, False, None, history_size(factory(PROCESS), x_T, ts))
    fns = [
        lambda: jaxdiff.sample(factory(PROCESS), denoise, x_T, ts).x.block_until_ready(),
        lambda: program(factory(PROCESS), x_T).block_until_ready(),
        lambda: loop(x_T).block_until_ready(),
        lambda: floor(x_T).block_until_ready(),
    ]
    for fn in fns:
        fn()  # the first calls compile
    with compilations() as compiled:
        api_s, jit_s, loop_s, floor_s = interleaved_min(fns, repeats)
    build_s = timings(lambda: factory(PROCESS), 20 * repeats)[1]
    return nfe, len(compiled), api_s, jit_s, loop_s, floor_s, build_s


def bench_one(sampler, denoise, x_T, n, repeats, key):
    """Compile time, run times (median, min), the baseline loop's min, API time, result."""
    ts = schedules.karras(PROCESS, n, dtype=x_T.dtype)
    program = jax.jit(lambda x: jaxdiff.sample(sampler, denoise, x, ts, key=key).x)
    start = time.perf_counter()
    compiled = program.lower(x_T).compile()
    compile_s = time.perf_counter() - start
    run = lambda: compiled(x_T).block_until_ready()
    run_med, _ = timings(run, repeats)
    # repeats for about 0.5 s of each program: on a shared CPU the minimum then settles
    repeats = int(np.clip(0.5 / run_med, repeats, 1000))
    nfe, stochastic = sampler.nfe(n), sampler.stochastic
    loop = baseline_loop(denoise, x_T, nfe, stochastic, key)
    floor = floor_loop(denoise, x_T, nfe, stochastic, key, history_size(sampler, x_T, ts))
    fns = [run, lambda: loop(x_T).block_until_ready(), lambda: floor(x_T).block_until_ready()]
    run_min, loop_min, floor_min = interleaved_min(fns, repeats)
    api = lambda: jaxdiff.sample(sampler, denoise, x_T, ts, key=key).x.block_until_ready()
    api_s = timings(api, repeats)[0]
    result = jaxdiff.sample(sampler, denoise, x_T, ts, key=key)
    return compile_s, run_med, run_min, loop_min, floor_min, api_s, result


def run(quick: bool):
    targets = (10, 20) if quick else (10, 20, 50)
    repeats = 5 if quick else 15
    x_T64 = PROCESS.prior_sample((BATCH, DIM), key=jax.random.key(2), dtype=jnp.float64)
    x_T = x_T64.astype(jnp.float32)
    key = jax.random.key(3)
    rows, rebuilt = [], []
    for den_name, make in DENOISERS.items():
        denoise = make(jnp.float32)
        ref = np.asarray(reference(make(jnp.float64), x_T64))
        t_den_med, t_den = denoiser_time(denoise, x_T, repeats)
        print(f"[{den_name}] one denoiser call: {t_den * 1e6:.0f} us (min)", flush=True)
        heun_ms = [1e3 * v for v in heun_against_hand_written(denoise, x_T, 3 * repeats)]
        print(f"  heun / hand-written / loop at NFE 49: {heun_ms} ms", flush=True)
        dpm_ms = [1e3 * v for v in dpm_solver_pp_2m_against_hand_written(denoise, x_T, 3 * repeats)]
        print(f"  dpm_solver_pp_2m / hand-written / loop at NFE 20: {dpm_ms} ms", flush=True)
        pc_ms = [
            1e3 * v for v in predictor_corrector_against_hand_written(denoise, x_T, 10 * repeats)
        ]
        print(f"  predictor_corrector / hand-written / floor at NFE 49: {pc_ms} ms", flush=True)
        for name in REBUILT:
            nfe, compiled, api_s, jit_s, loop_s, floor_s, build_s = rebuilt_each_call(
                SAMPLERS[name], denoise, x_T, 3 * repeats
            )
            rebuilt.append(
                dict(denoiser=den_name, sampler=name, nfe=nfe, compiles=compiled,
                     calls=2 * (3 * repeats + 1), api_ms=api_s * 1e3, jit_ms=jit_s * 1e3,
                     loop_ms=loop_s * 1e3, vs_loop=jit_s / loop_s, vs_floor=jit_s / floor_s,
                     build_us=build_s * 1e6)
            )  # fmt: skip
            print(
                f"  rebuilt each call: {name:18s} NFE {nfe:3d}  jit {jit_s * 1e3:8.2f} ms (vs loop "
                f"{jit_s / loop_s:.2f}), api {api_s * 1e3:.2f} ms, compilations {compiled}",
                flush=True,
            )
        for name, factory in SAMPLERS.items():
            sampler = factory(PROCESS)
            for target in targets:
                n = sampler.steps_for_nfe(target)
                compile_s, run_med, run_s, loop_s, floor_s, api_s, res = bench_one(
                    sampler, denoise, x_T, n, repeats, key
                )
                nfe = int(res.nfe)
                assert nfe == sampler.nfe(n), (name, nfe, sampler.nfe(n))
                err = None
                if not sampler.stochastic:
                    err = float(np.sqrt(np.mean((np.asarray(res.x, np.float64) - ref) ** 2)))
                rows.append(
                    dict(
                        denoiser=den_name,
                        sampler=name,
                        target=target,
                        steps=n,
                        nfe=nfe,
                        time_ms=run_med * 1e3,
                        min_ms=run_s * 1e3,
                        api_ms=api_s * 1e3,
                        overhead=run_s / (nfe * t_den),
                        vs_loop=run_s / loop_s,
                        vs_floor=run_s / floor_s,
                        history=history_size(sampler, x_T, schedules.karras(PROCESS, n)),
                        compile_s=compile_s,
                        error=err,
                        denoiser_us=t_den * 1e6,
                        denoiser_med_us=t_den_med * 1e6,
                        heun_ms=heun_ms,
                        dpm_ms=dpm_ms,
                        pc_ms=pc_ms,
                    )
                )
                r = rows[-1]
                print(
                    f"  {name:18s} NFE {nfe:3d}  {r['time_ms']:8.2f} ms  overhead "
                    f"{r['overhead']:.2f} (vs loop {r['vs_loop']:.2f}, vs floor "
                    f"{r['vs_floor']:.2f})  compile {compile_s:.2f} s  "
                    f"error "
                    f"{'-' if err is None else f'{err:.2e}'}",
                    flush=True,
                )
    return rows, rebuilt


# --- report ------------------------------------------------------------------------------------
def table(rows, den_name):
    header = ["sampler", "target NFE", "steps", "NFE", "time (ms)", "min (ms)", "api (ms)"]
    header += ["overhead", "vs loop", "history", "vs floor", "compile (s)", "RMSE vs ODE"]
    cells = [
        [r["sampler"], r["target"], r["steps"], r["nfe"], f"{r['time_ms']:.2f}",
         f"{r['min_ms']:.2f}", f"{r['api_ms']:.2f}", f"{r['overhead']:.2f}",
         f"{r['vs_loop']:.2f}", r["history"], f"{r['vs_floor']:.2f}", f"{r['compile_s']:.2f}",
         "" if r["error"] is None else f"{r['error']:.2e}"]
        for r in rows
        if r["denoiser"] == den_name
    ]  # fmt: skip
    return markdown_table(header, cells)


def rebuilt_table(rebuilt, den_name):
    """The "sampler rebuilt each call" rows: compilations after the first calls, times vs loop."""
    header = ["sampler rebuilt each call", "NFE", "compilations", "jit (ms)", "bare scan (ms)"]
    header += ["vs loop", "vs floor", "building it (us)", "`jaxdiff.sample` (ms)"]
    cells = [
        [r["sampler"], r["nfe"], f"{r['compiles']} in {r['calls']} calls", f"{r['jit_ms']:.2f}",
         f"{r['loop_ms']:.2f}", f"{r['vs_loop']:.2f}", f"{r['vs_floor']:.2f}",
         f"{r['build_us']:.0f}", f"{r['api_ms']:.2f}"]
        for r in rebuilt
        if r["denoiser"] == den_name
    ]  # fmt: skip
    return markdown_table(header, cells)


def compile_summary(rows, den_name, targets):
    """Compile time per sampler against NFE."""
    cells = [
        [name]
        + [
            f"{r['compile_s']:.2f} s"
            for t in targets
            for r in rows
            if r["denoiser"] == den_name and r["sampler"] == name and r["target"] == t
        ]
        for name in SAMPLERS
    ]
    return markdown_table(["sampler", *(f"NFE~{t}" for t in targets)], cells)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DENOISERS), figsize=(6 * len(DENOISERS), 4.5), squeeze=False)
    for ax, den_name in zip(axes[0], DENOISERS, strict=True):
        for name in SAMPLERS:
            pts = [
                (r["nfe"], r["error"])
                for r in rows
                if r["denoiser"] == den_name and r["sampler"] == name and r["error"] is not None
            ]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE vs probability-flow ODE")
        ax.set_title(f"{den_name} denoiser (EDM, Karras grid, float32)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heun_note(rows, den_name):
    """Where the overhead of a step comes from: jaxdiff's Heun and DPM-Solver++(2M) against
    hand-written scans of the same methods and a bare scan of their denoiser calls."""
    ours, hand, loop = next(r["heun_ms"] for r in rows if r["denoiser"] == den_name)
    d_ours, d_hand, d_loop = next(r["dpm_ms"] for r in rows if r["denoiser"] == den_name)
    p_ours, p_hand, p_floor = next(r["pc_ms"] for r in rows if r["denoiser"] == den_name)
    return (
        f"Heun at NFE 49 (min): jaxdiff {ours:.2f} ms, the same method as a hand-written scan "
        f"{hand:.2f} ms, a bare loop of 49 denoiser calls {loop:.2f} ms. DPM-Solver++(2M) at "
        f"NFE 20: jaxdiff {d_ours:.3f} ms ({d_ours / d_loop:.2f}x the bare loop), a hand-written "
        f"scan with its coefficients computed before the loop {d_hand:.3f} ms "
        f"({d_hand / d_loop:.2f}x), the bare loop {d_loop:.3f} ms: what a sampler adds to its "
        "calls beyond the hand-written method is the library's cost; the rest is the method's "
        f"own arithmetic. Predictor-corrector (Euler-Maruyama + one Langevin step) at NFE 49: "
        f"jaxdiff {p_ours:.3f} ms, hand-written {p_hand:.3f} ms ({p_hand / p_floor:.2f}x the "
        f"floor loop {p_floor:.3f} ms: the Langevin step size needs two batch norms between the "
        "denoiser and the update)."
    )


def floor_note(rows, den_name):
    """The largest *vs floor* and *vs loop* of the table, with their samplers."""
    mine = [r for r in rows if r["denoiser"] == den_name]
    if not mine:
        return ""
    f = max(mine, key=lambda r: r["vs_floor"])
    lo = max(mine, key=lambda r: r["vs_loop"])
    return (
        f"Largest *vs floor*: {f['vs_floor']:.2f} ({f['sampler']}, NFE {f['nfe']}); largest *vs "
        f"loop*: {lo['vs_loop']:.2f} ({lo['sampler']}, NFE {lo['nfe']})."
    )


def section(rows, rebuilt, quick, elapsed):
    targets = sorted({r["target"] for r in rows})
    den_us = {
        d: next((r["denoiser_us"], r["denoiser_med_us"]) for r in rows if r["denoiser"] == d)
        for d in DENOISERS
    }
    worst = {
        d: max(
            (r for r in rows if r["denoiser"] == d and r["nfe"] >= 20),
            key=lambda r: r["overhead"],
            default=None,
        )
        for d in DENOISERS
    }
    parts = [
        f"`python benchmarks/samplers.py{' --quick' if quick else ''}` ({elapsed:.0f} s; the load "
        "average below is read at the end: on a shared CPU absolute times are noisy, ratios and "
        "compile trends less so).",
        "",
        f"EDM process, Karras grids (rho = 7) ending with (t_min, 0), batch {BATCH}, float32; "
        "times of repeated calls with `block_until_ready`. *time* / *min*: median / minimum of "
        "the compiled sampling program; *api*: median of `jaxdiff.sample` itself (eager grid "
        "checks and dispatch included); *overhead* = min / (NFE x minimum of one jitted "
        "denoiser call, dispatch included); *vs loop* = min / minimum of a bare `lax.scan` of "
        "NFE denoiser calls, timed in turn with the sampler (plus one normal draw per call for "
        "stochastic samplers): the cost of everything a sampler adds to its denoiser calls; "
        "*history*: how many arrays like x the sampler's state carries (multistep outputs); "
        "*vs floor* = min / minimum of the cheapest scan that carries that many arrays (the "
        "same NFE, `x <- a x + b D(x) + sum_j c_j H_j` with every coefficient computed before "
        "the loop: `floor_loop` in the benchmark), the sampler's own overhead; *compile*: "
        "trace + compile of the program; *RMSE vs ODE*: root-mean-square error per coordinate "
        "against the probability-flow ODE solved by diffrax (Dopri8, tol 1e-10, float64), blank "
        "for stochastic samplers. See the docstring of `benchmarks/samplers.py`. Reading the "
        "ratios: *overhead* below 1 (mixture) means a single jitted call is dominated by its "
        "dispatch, which a scan does not pay; *overhead* near 1.2 with *vs loop* near 1 (MLP) "
        "means the denoiser itself runs slower inside a loop than alone, which no sampler can "
        "change. On the mixture (about 12 us a call in a loop) a multistep sampler's *vs loop* "
        "of 1.2-1.4 is its history: the floor loop, which only carries the same number of "
        "arrays, is itself 1.2-1.4x the bare loop there (XLA:CPU keeps the output in a buffer "
        "of its own and copies the loop's carry, a few us a step), and the hand-written "
        "DPM-Solver++(2M) above each table, all coefficients precomputed, is as slow.",
        "",
    ]
    for d in DENOISERS:
        title = {
            "mixture": f"Exact Gaussian-mixture denoiser ({DIM} dims, {COMPONENTS} components)",
            "mlp": f"Random-init MLP denoiser ({DIM} -> 256 -> 256 -> {DIM}, EDM precond.)",
        }[d]
        w = worst[d]
        worst_txt = (
            f" Largest overhead at NFE >= 20: {w['overhead']:.2f} ({w['sampler']}, NFE {w['nfe']})."
            if w
            else ""
        )
        parts += [
            f"### {title}",
            "",
            f"One jitted denoiser call: {den_us[d][0]:.0f} us (min; median "
            f"{den_us[d][1]:.0f} us).{worst_txt} {floor_note(rows, d)} {heun_note(rows, d)}",
            "",
            table(rows, d),
            "",
            "A sampler built anew for every call (minimum times, in turn with a bare scan of the "
            "same NFE, after one first call each): passed to one `jax.jit`-ed function "
            "(*jit*; *vs loop* = jit / bare scan, *vs floor* = jit / floor loop) and to "
            "`jaxdiff.sample` itself (its eager dispatch and grid checks included); "
            "*compilations*: XLA compilations counted with `jax.monitoring` over all those later "
            "calls; *building it*: the Python construction of the sampler alone, which *jit* "
            "includes. With the sampler an argument its noise scale (DDIM's eta, Heun's churn) "
            "is traced, so whether to draw noise is a `lax.cond` in every step: one program for "
            "every value, a few us a step that show on the mixture and not on the MLP.",
            "",
            rebuilt_table(rebuilt, d),
            "",
            "Compile time against NFE:",
            "",
            compile_summary(rows, d, targets),
            "",
        ]
    parts += ["![error vs NFE](samplers_error.png)", ""]
    return "\n".join(parts)


@dataclass(frozen=True)
class Args:
    """Sampler benchmark."""

    quick: bool = False
    """NFE 10 and 20, 5 repeats."""
    out: str = str(HERE)
    """Folder for RESULTS.md and the plot."""
    frontier: bool = True
    """Also run the few-step frontier (``benchmarks/frontier.py``: the best recipe per NFE)."""


def main(argv=None):
    args = tyro.cli(Args, args=argv, description=__doc__.splitlines()[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, rebuilt = run(args.quick)
    plot(rows, out / "samplers_error.png")
    md = section(rows, rebuilt, args.quick, time.perf_counter() - start)
    print(md)
    results = write_section("samplers", md, out / "RESULTS.md")
    print(f"wrote {results} and {out / 'samplers_error.png'}")
    if args.frontier:
        # a fresh process: after the hundreds of programs above, compiling the frontier's in this
        # one ran out of XLA:CPU's code memory ("LLVM ERROR: Unable to allocate section memory")
        command = [sys.executable, str(HERE / "frontier.py"), "--out", str(out)]
        subprocess.run(command + (["--quick"] if args.quick else []), check=True)


if __name__ == "__main__":
    sys.exit(main())
