"""Convolutions alone: XLA:CPU against PyTorch on the U-Net's own convolution shapes.

The 6.47M-parameter U-Net of the training comparison (``nets.UNet``, channels 64-128-128, two
residual blocks per level, attention at 8x8; the same numbers of parameters as diffusers'
``UNet2DModel``), batch 64 of 16x16x1: every convolution of its forward pass is read off the
jaxpr (input shape, kernel shape, stride) and timed alone, forward and backward (the input and
the kernel gradients, as in a train step), in JAX (NHWC, HWIO, ``lax.conv_general_dilated``) and
in PyTorch (NCHW, ``F.conv2d``, oneDNN). A table row per distinct shape; the total weighs each by
how often the network uses it, so it is the convolution time of one train step.

PyTorch runs in a worker process (``benchmarks/_torch_worker.py``) started with ``--torch-python``
(a virtual environment with torch:
``python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch``; never a dependency of
jaxdiff) or in this process when torch imports here. The two frameworks are timed alternately, one
shape at a time, so both see the same load on a shared machine; the waiting side is idle.

A second table says where the time of jaxdiff's whole train step of that network goes: two steps
under ``jax.profiler`` (XLA:CPU's per-operation trace events, ``--xla_cpu_enable_xprof_traceme``),
each compiled operation (fusion) classed by the HLO instruction it is built around.

Run ``python benchmarks/convolutions.py --torch-python /tmp/torchenv/bin/python [--quick]``;
writes the "convolutions" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# per-operation trace events of XLA:CPU (read by jax.profiler); set before JAX starts
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()


def _best_of(fn, reps: int, k: int) -> float:
    """Best seconds per call over ``reps`` repeats of ``k`` calls (``fn`` blocks)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        times.append((time.perf_counter() - t0) / k)
    return min(times)


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------
def unet_convolutions(batch: int = 64):
    """``{(x_shape, w_shape, stride): count}`` of the U-Net's forward pass, from its jaxpr."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.nets import UNet

    model = nnx.eval_shape(
        lambda: UNet(
            1, image_size=16, channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
            attn_resolutions=(8,), rngs=nnx.Rngs(0),
        )
    )  # fmt: skip
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(a.size for a in jax.tree.leaves(params))
    x = jax.ShapeDtypeStruct((batch, 16, 16, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    forward = lambda p, r, x, t: nnx.merge(graphdef, p, r)(x, t)  # noqa: E731
    jaxpr = jax.make_jaxpr(forward)(params, rest, x, t)
    counts: dict = {}

    def visit(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                key = (tuple(lhs), tuple(rhs), int(eqn.params["window_strides"][0]))
                counts[key] = counts.get(key, 0) + 1
            for v in eqn.params.values():  # pjit, custom_jvp, ... hold inner jaxprs
                for sub in v if isinstance(v, list | tuple) else [v]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return counts, n_params


def jax_conv_timer(x_shape, w_shape, stride):
    """``run()`` doing one forward and backward (input and kernel gradients) in JAX (NHWC)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(0.05 * rng.standard_normal(w_shape), jnp.float32)

    def conv(x, k):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=dn)

    @jax.jit
    def fwd_bwd(x, k):
        y, vjp = jax.vjp(conv, x, k)
        return vjp(y)

    def run():
        jax.block_until_ready(fwd_bwd(x, k))

    run()  # compile
    return run


_KINDS = ("convolution", "dot", "reduce-window", "reduce", "transpose", "concatenate", "copy")


def _op_kinds(hlo: str) -> dict:
    """``{instruction name: kind}``: what each fusion of the compiled HLO is built around."""
    bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    kinds = {}
    pattern = r"%([\w.\-]+) = \S+ ([\w\-]+)\(([^\n]*)"
    for name, op, rest in re.findall(pattern, hlo):
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else f"] {op}("
        found = [k for k in _KINDS if re.search(r"[\]}] " + re.escape(k) + r"\(", body)]
        kinds[name] = found[0] if found else "elementwise"
    return kinds


def profile_step(batch: int = 64, steps: int = 2) -> dict:
    """Seconds per step spent in each kind of operation of jaxdiff's train step (all threads)."""
    import jax
    from flax import nnx

    import jaxdiff
    from jaxdiff import losses, training
    from jaxdiff.nets import UNet

    model = UNet(
        1, image_size=16, channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
        attn_resolutions=(8,), rngs=nnx.Rngs(0),
    )  # fmt: skip
    mesh = training.make_mesh()
    opt = training.make_optimizer(1e-4, warmup=10, clip=1.0)
    state, graphdef, rest = training.init_train_state(model, opt, key=jax.random.key(0), mesh=mesh)
    step = training.make_train_step(graphdef, losses.eps_loss, jaxdiff.VP(), opt, rest=rest)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, 16, 16, 1)).astype(np.float32)
    data = training.shard_batch(mesh, {"x": x})
    compiled = step.lower(state, data).compile()
    kinds = _op_kinds(compiled.as_text())
    state, _ = compiled(state, data)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                state, _ = compiled(state, data)
            jax.block_until_ready(state)
        trace = next(Path(folder).rglob("*.xplane.pb"))
        profile = jax.profiler.ProfileData.from_file(str(trace))
    totals = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in kinds:
                    totals[kinds[ev.name]] += ev.duration_ns / 1e9 / steps
    return dict(totals)


def conv_flops(x_shape, w_shape, stride) -> float:
    """Forward + input gradient + kernel gradient: three convolutions of the same size."""
    b, h, w, _ = x_shape
    kh, kw, cin, cout = w_shape
    return 3 * 2 * b * (h // stride) * (w // stride) * cout * cin * kh * kw


def markdown_profile(totals: dict) -> str:
    total = sum(totals.values())
    lines = [
        "Where jaxdiff's train step of this network spends its time (operation time summed over "
        "the threads, per step; `transpose` are layout changes, mostly of the activations for "
        "the kernel gradients):",
        "",
        "| operation | s / step | share |",
        "|---|---|---|",
    ]
    for kind, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {t:.3f} | {100 * t / total:.0f}% |")
    return "\n".join(lines)


def markdown(rows, info, quick) -> str:
    head = "| input (NHWC) | kernel (HWIO) | stride | uses | JAX (ms) | torch (ms) | JAX / torch |"
    lines = [
        "Each convolution of the U-Net of the training comparison (6,469,889 parameters, batch 64, "
        f"16x16x1), forward + backward alone, float32{', quick' if quick else ''}. "
        f"JAX {info['jax']} (XLA:CPU) against torch {info['torch']} ({info['threads']} threads, "
        "oneDNN), timed alternately.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    tot_j = tot_t = flops = 0.0
    for r in rows:
        tot_j += r["uses"] * r["jax"]
        tot_t += r["uses"] * r["torch"]
        flops += r["uses"] * r["flops"]
        lines.append(
            f"| {'x'.join(map(str, r['x']))} | {'x'.join(map(str, r['w']))} | {r['stride']} | "
            f"{r['uses']} | {1e3 * r['jax']:.2f} | {1e3 * r['torch']:.2f} | "
            f"{r['jax'] / r['torch']:.2f} |"
        )
    lines += [
        f"| **all convolutions of one step** | | | {sum(r['uses'] for r in rows)} | "
        f"**{1e3 * tot_j:.0f}** | **{1e3 * tot_t:.0f}** | **{tot_j / tot_t:.2f}** |",
        "",
        f"{flops / 1e9:.0f} GFLOP of convolutions per step: JAX {flops / tot_j / 1e9:.0f} GFLOP/s, "
        f"torch {flops / tot_t / 1e9:.0f} GFLOP/s.",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--torch-python", default=None, help="python of an environment with torch")
    args = p.parse_args(argv)

    import jax

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import write_section
    from _torch_worker import Worker

    reps, budget = (3, 0.15) if args.quick else (7, 0.5)
    counts, n_params = unet_convolutions()
    assert n_params == 6_469_889, n_params
    worker = Worker(args.torch_python or sys.executable, "conv")
    info = {**worker.info, "jax": jax.__version__}
    rows = []
    try:
        for (x_shape, w_shape, stride), uses in sorted(counts.items(), key=lambda kv: -kv[1]):
            run = jax_conv_timer(x_shape, w_shape, stride)
            t0 = time.perf_counter()
            run()
            k = int(np.clip(budget / max(time.perf_counter() - t0, 1e-6), 1, 50))
            jt, tt = [], []
            for _ in range(reps):  # alternate: one repeat each
                jt.append(_best_of(run, 1, k))
                tt.append(worker.time(x=x_shape, w=w_shape, stride=stride, k=k))
            row = dict(x=x_shape, w=w_shape, stride=stride, uses=uses, jax=min(jt), torch=min(tt))
            row["flops"] = conv_flops(x_shape, w_shape, stride)
            rows.append(row)
            print(
                f"{x_shape} {w_shape} s{stride} x{uses}: JAX {1e3 * row['jax']:.2f} ms, "
                f"torch {1e3 * row['torch']:.2f} ms, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        worker.close()
    md = markdown(rows, info, args.quick) + "\n\n" + markdown_profile(profile_step())
    print(md)
    print(f"wrote section 'convolutions' of {write_section('convolutions', md)}")
    return rows


if __name__ == "__main__":
    main()
