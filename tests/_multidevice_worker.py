"""One train step on 8 CPU devices (run by tests/test_multidevice.py in a subprocess).

``jax_num_cpu_devices`` must be set before JAX creates its backend, so this runs in its own
process: ``python tests/_multidevice_worker.py OUT.npz``. It writes the parameters after one step
on the sharded global batch, and a JSON line on stdout describing the shardings and the error of
an indivisible batch.
"""

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)  # as in the parent test process

import numpy as np  # noqa: E402

from jaxdiff import training  # noqa: E402


def main(out_path, setup):
    mesh = training.make_mesh()
    state, step_fn, batch = setup(mesh)
    global_batch = training.shard_batch(mesh, batch)
    new, metrics = step_fn(state, global_batch)
    x = global_batch["x"]
    leaf = jax.tree.leaves(new.params)[0]
    try:
        training.shard_batch(mesh, {"x": np.ones((60, 2), np.float32)})
        error = None
    except ValueError as e:
        error = str(e)
    np.savez(out_path, *[np.asarray(a) for a in jax.tree.leaves(new.params)])
    state, accum_fn, _ = setup(mesh, grad_accum=2)
    accum, _ = accum_fn(state, global_batch)
    accum_path = Path(out_path).with_name("accum.npz")
    np.savez(accum_path, *[np.asarray(a) for a in jax.tree.leaves(accum.params)])
    try:
        setup(mesh, grad_accum=16)[1](state, global_batch)
        accum_error = None
    except ValueError as e:
        accum_error = str(e)
    info = {
        "devices": jax.device_count(),
        "batch_spec": list(x.sharding.spec),
        "batch_shards": sorted({s.device.id for s in x.addressable_shards}),
        "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
        "params_replicated": bool(leaf.sharding.is_fully_replicated),
        "params_devices": len(leaf.sharding.device_set),
        "loss": float(metrics["loss"]),
        "indivisible_error": error,
        "accum_error": accum_error,
    }
    print(json.dumps(info))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from test_multidevice import setup

    main(sys.argv[1], setup)
