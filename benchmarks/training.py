"""Training benchmark: the cost of the train step against the network's own forward+backward pass.

Cases (float32 unless ``--dtype bfloat16``):

- MLP on 2-D data (3 hidden layers of 128), batch 256;
- small U-Nets (16 base channels, one residual block per level, self-attention at 8x8): 16x16
  grayscale images with levels (1, 2) and 32x32 colour images with levels (1, 2, 2), batches 64
  and 128.

Measured as the best of repeats of ``k`` chained calls (``block_until_ready`` at the end; ``k``
fills about 0.2 s, quick, or 1 s, at least 2 calls); the repeats of the step and of the network
alternate, so both see the same load on a shared machine:

- ``step``: one call of the compiled ``train_step`` of :func:`jaxdiff.training.make_train_step`
  (eps-prediction loss on the VP process, Adam with warm-up and clipping, EMA, non-finite check,
  donated state, batch sharded over every device);
- ``fwd+bwd``: the gradient of the network's mean squared error on a fixed noisy batch
  (``jax.value_and_grad`` of ``mean((f(x_t, t) - eps)^2)``, jitted), i.e. the network alone;
- ``overhead`` = step / fwd+bwd: what the optimizer, EMA, noise sampling and bookkeeping add
  (target <= 1.1);
- ``steps/s`` and ``examples/s`` of the train step; ``GFLOP/step`` from XLA's cost analysis of
  the compiled step and the achieved ``TFLOP/s`` (with ``MFU`` against ``--peak-tflops``, or the
  bfloat16 dense peak of a known GPU);
- ``memory``: XLA's buffer estimate of the compiled step (arguments + outputs + temporaries -
  aliased), and the device's ``peak_bytes_in_use`` where ``memory_stats()`` exists (GPU), else
  the process's peak resident set size (cumulative over the cases, CPU).

``--compare`` benchmarks the U-Net configured like diffusers' ``UNet2DModel`` (channels 64-128-128, two
residual blocks per level, attention at 8x8; both have 6,469,889 parameters), batch 64 of
16x16x1, and with ``--torch-python PATH`` (an environment with torch and diffusers, never a
dependency of jaxdiff) times diffusers' train step of the same network (MSE on the noise, Adam,
clipping, EMA) alternately with jaxdiff's, in a worker process that waits idle while JAX runs.

``--gpu`` benchmarks CIFAR-10-size U-Nets instead (32x32x3: the cifar10 preset's 64-channel
network and DDPM's 128-channel one, 35.7M parameters, batches 128 and 256); with
``--dtype bfloat16`` the MFU is against the device's bf16 dense peak. ``benchmarks/gpu.sh`` runs
it and the sampler benchmark on a GPU.

Run ``python benchmarks/training.py [--quick] [--dtype bfloat16] [--compare [--torch-python PY]]
[--gpu]``; writes the "training" section of ``benchmarks/RESULTS.md`` (``training (bfloat16)``,
``training (GPU ...)`` for the other modes).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdiff
from jaxdiff import losses, training
from jaxdiff.nets import MLP, UNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402
from _torch_worker import Worker  # noqa: E402

PROCESS = jaxdiff.VP()
# bfloat16 dense peak TFLOP/s of accelerators this project may run on (vendor data sheets)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    batch: int
    mults: tuple[int, ...] = ()
    channels: int = 16
    blocks: int = 1
    attn: tuple[int, ...] = (8,)


CASES = [
    Case("MLP 3x128", (2,), 256),
    Case("UNet 16x16", (16, 16, 1), 64, (1, 2)),
    Case("UNet 16x16", (16, 16, 1), 128, (1, 2)),
    Case("UNet 32x32", (32, 32, 3), 64, (1, 2, 2)),
    Case("UNet 32x32", (32, 32, 3), 128, (1, 2, 2)),
]
# diffusers' UNet2DModel(block_out_channels=(64, 128, 128), layers_per_block=2, attention in the
# middle level): 6,469,889 parameters in both libraries
DIFFUSERS_CASE = Case("UNet 64-128-128", (16, 16, 1), 64, (1, 2, 2), 64, 2)
GPU_CASES = [
    Case("UNet cifar10 preset", (32, 32, 3), 128, (1, 2, 2, 2), 64, 2, (16,)),
    Case("UNet DDPM CIFAR-10", (32, 32, 3), 128, (1, 2, 2, 2), 128, 2, (16,)),
    Case("UNet DDPM CIFAR-10", (32, 32, 3), 256, (1, 2, 2, 2), 128, 2, (16,)),
]


def make_model(case: Case, dtype):
    rngs = nnx.Rngs(0)
    if len(case.shape) == 1:
        return MLP(case.shape[0], hidden=128, depth=3, dtype=dtype, rngs=rngs)
    return UNet(
        case.shape[2], image_size=case.shape[0], channels=case.channels, channel_mults=case.mults,
        num_res_blocks=case.blocks, attn_resolutions=case.attn, dtype=dtype, rngs=rngs,
    )  # fmt: skip


def timed(fns, reps: int, k: int) -> list[float]:
    """Best seconds per call of each ``fn()`` (each runs ``k`` calls and blocks), alternating.

    A ``fn`` that returns a number reports its own seconds per call (a worker process).
    """
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            own = fn()
            ts.append(own if own is not None else (time.perf_counter() - t0) / k)
    return [min(ts) for ts in times]


def xla_memory_mb(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return total / 2**20


def xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan")))


def peak_memory_mb() -> tuple[float, str]:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "process RSS peak"


def peak_tflops(arg: float | None) -> float | None:
    if arg:
        return arg
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def bench(case: Case, dtype, reps: int, budget_s: float, mesh, worker=None) -> dict:
    model = make_model(case, dtype)
    opt = training.make_optimizer(1e-4, warmup=10, clip=1.0)
    state, graphdef, rest = training.init_train_state(model, opt, key=jax.random.key(0), mesh=mesh)
    step_fn = training.make_train_step(
        graphdef, losses.eps_loss, PROCESS, opt, rest=rest, mesh=mesh
    )
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (case.batch, *case.shape)).astype(np.float32)
    batch = training.shard_batch(mesh, {"x": x0})

    # the network alone: gradient of its squared error on a fixed noisy batch
    t = jnp.asarray(rng.uniform(1e-3, 1.0, case.batch), jnp.float32)
    x_t, eps = PROCESS.sample_marginal(jnp.asarray(x0), t, key=jax.random.key(1))
    x_t, t, eps = (jax.device_put(a, batch["x"].sharding) for a in (x_t, t, eps))

    @jax.jit
    def fwd_bwd(params, x_t, t, eps):
        def mse(p):
            out = nnx.merge(graphdef, p, rest, copy=True)(x_t, t)
            return jnp.mean((out.astype(jnp.float32) - eps) ** 2)

        return jax.value_and_grad(mse)(params)

    params = jax.tree.map(jnp.copy, state.params)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()  # called directly: no second compilation
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run_steps():
        s = holder[0]
        for _ in range(k):
            s, _ = compiled(s, batch)
        jax.block_until_ready(s)
        holder[0] = s

    def run_net():
        for _ in range(k):
            out = fwd_bwd(params, x_t, t, eps)
        jax.block_until_ready(out)

    k = 1
    t0 = time.perf_counter()
    run_steps()  # warm-up, and the number of calls that fill the time budget of one repeat
    k = int(np.clip(budget_s / (time.perf_counter() - t0), 2, 100))
    run_net()  # the network's compilation
    fns = [run_steps, run_net] + ([lambda: worker.time(k=k)] if worker else [])
    step_s, net_s, *torch_s = timed(fns, reps, k)
    flops = xla_flops(compiled)
    mem, mem_kind = peak_memory_mb()
    n_params = sum(a.size for a in jax.tree.leaves(state.params))
    return dict(
        case=case, params=n_params, step_ms=1e3 * step_s, net_ms=1e3 * net_s,
        overhead=step_s / net_s, steps_s=1 / step_s, examples_s=case.batch / step_s,
        gflop=flops / 1e9, tflops=flops / step_s / 1e12, xla_mb=xla_memory_mb(compiled),
        peak_mb=mem, peak_kind=mem_kind, compile_s=compile_s,
        torch_ms=1e3 * torch_s[0] if torch_s else None,
    )  # fmt: skip


def markdown(rows, dtype_name: str, peak: float | None, quick: bool) -> str:
    head = (
        "| network | example | batch | params | step (ms) | fwd+bwd (ms) | overhead | steps/s "
        "| examples/s | GFLOP/step | TFLOP/s | MFU | XLA mem (MB) | peak mem (MB) | compile (s) |"
    )
    lines = [
        f"Train step vs. the network's own forward+backward pass ({dtype_name}"
        f"{', quick' if quick else ''}; overhead = step / fwd+bwd, target <= 1.1).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        c = r["case"]
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "-"
        lines.append(
            f"| {c.name} | {'x'.join(map(str, c.shape))} | {c.batch} | {r['params']:,} | "
            f"{r['step_ms']:.2f} | {r['net_ms']:.2f} | {r['overhead']:.2f} | {r['steps_s']:.1f} | "
            f"{r['examples_s']:,.0f} | {r['gflop']:.2f} | {r['tflops']:.3f} | {mfu} | "
            f"{r['xla_mb']:.1f} | {r['peak_mb']:.0f} | {r['compile_s']:.1f} |"
        )
    compared = [r for r in rows if r["torch_ms"] is not None]
    if compared:
        info = compared[0]["torch_info"]
        lines += [
            "",
            f"The same network in diffusers {info['diffusers']} (torch {info['torch']}, "
            f"{info['threads']} threads, {info['params']:,} parameters), its train step timed "
            "alternately with jaxdiff's:",
            "",
            "| network | batch | jaxdiff step (ms) | diffusers step (ms) | jaxdiff / diffusers |",
            "|---|---|---|---|---|",
        ]
        for r in compared:
            lines.append(
                f"| {r['case'].name} | {r['case'].batch} | {r['step_ms']:.0f} | "
                f"{r['torch_ms']:.0f} | {r['step_ms'] / r['torch_ms']:.2f} |"
            )
    kind = rows[0]["peak_kind"] if rows else ""
    lines += [
        "",
        f"Peak memory is the {kind}"
        + (" (cumulative over the rows)." if kind.startswith("process") else " after each row."),
        f"Devices: {jax.device_count()} x {jax.devices()[0].device_kind}; the batch is sharded "
        "over all of them.",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes on CPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU")
    p.add_argument("--compare", action="store_true", help="only the diffusers-sized U-Net")
    p.add_argument("--torch-python", default=None, help="python with torch + diffusers")
    p.add_argument("--gpu", action="store_true", help="CIFAR-10-size U-Nets only")
    args = p.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    reps, budget_s = (3, 0.2) if args.quick else (7, 1.0)
    mesh = training.make_mesh()
    peak = peak_tflops(args.peak_tflops) if jax.default_backend() != "cpu" else args.peak_tflops
    cases = GPU_CASES if args.gpu else [DIFFUSERS_CASE] if args.compare else CASES
    rows = []
    for case in cases:
        worker = None
        if case == DIFFUSERS_CASE and args.torch_python:
            worker = Worker(args.torch_python, "diffusers", str(case.batch))
        try:
            r = bench(case, dtype, reps, budget_s, mesh, worker)
        finally:
            if worker:
                worker.close()
        r["torch_info"] = worker.info if worker else None
        rows.append(r)
        print(
            f"{case.name} batch {case.batch}: step {r['step_ms']:.2f} ms, fwd+bwd "
            f"{r['net_ms']:.2f} ms, overhead {r['overhead']:.2f}"
            + (f", diffusers {r['torch_ms']:.2f} ms" if r["torch_ms"] else ""),
            flush=True,
        )
    md = markdown(rows, args.dtype, peak, args.quick)
    print(md)
    name = "training" if args.dtype == "float32" else f"training ({args.dtype})"
    if args.gpu or args.compare:
        name = f"training ({'GPU' if args.gpu else 'vs diffusers'}, {args.dtype})"
    print(f"wrote section {name!r} of {write_section(name, md)}")
    return rows


if __name__ == "__main__":
    main()
