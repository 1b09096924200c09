"""Data parallelism: one train step on 8 CPU devices equals the single-device step.

The 8-device half runs in a subprocess (``tests/_multidevice_worker.py``) because
``jax_num_cpu_devices`` must be set before JAX starts; this process keeps one CPU device. Both
halves build the same model, state and batch with :func:`setup`.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdiff
from jaxdiff import data, losses, training
from jaxdiff.nets import MLP

GLOBAL_BATCH = 64  # 8 examples per device


def setup(mesh, grad_accum=1):
    """``(state, train_step, batch)`` on ``mesh``: an MLP, Adam with clipping, a moons batch."""
    model = MLP(2, hidden=32, depth=2, rngs=nnx.Rngs(0))
    opt = training.make_optimizer(1e-2, clip=1.0)
    state, graphdef, rest = training.init_train_state(model, opt, key=jax.random.key(7), mesh=mesh)
    step_fn = training.make_train_step(
        graphdef, losses.eps_loss, jaxdiff.VP(), opt, rest=rest, mesh=mesh, donate=False,
        grad_accum=grad_accum,
    )  # fmt: skip
    batch = {"x": data.toy_2d("moons", GLOBAL_BATCH, seed=2).x}
    return state, step_fn, batch


class _Worker:
    """The 8-device subprocess; started once, its result read once."""

    def __init__(self, out: Path):
        worker = Path(__file__).with_name("_multidevice_worker.py")
        self.out, self.result = out, None
        self.proc = subprocess.Popen(
            [sys.executable, str(worker), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def get(self):
        if self.result is None:
            stdout, stderr = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, stderr[-3000:]
            info = json.loads(stdout.strip().splitlines()[-1])
            with np.load(self.out) as f:
                self.result = info, [f[f"arr_{i}"] for i in range(len(f.files))]
            with np.load(self.out.with_name("accum.npz")) as f:
                self.accum = [f[f"arr_{i}"] for i in range(len(f.files))]
        return self.result


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = _Worker(tmp_path_factory.mktemp("multidevice") / "params.npz")
    yield w
    if w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait()


@pytest.fixture
def eight_devices(worker):
    return worker.get()


def test_eight_device_step_equals_single_device_step(worker):
    # the single-device step runs here while the subprocess computes the 8-device one
    mesh = training.make_mesh()
    assert mesh.devices.size == 1
    state, step_fn, batch = setup(mesh)
    new, metrics = step_fn(state, training.shard_batch(mesh, batch))
    params1 = [np.asarray(a) for a in jax.tree.leaves(new.params)]
    info, params8 = worker.get()
    assert len(params1) == len(params8)
    for a, b in zip(params1, params8, strict=True):
        assert a.dtype == b.dtype == np.float32
        # float32 tolerance: the all-reduce sums 8 partial gradients in another order; measured
        # max |difference| 1.5e-7 (parameters of size ~1) after one Adam step of size 1e-2
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), info["loss"], rtol=1e-5)
    # and the step really moved the parameters (the comparison is not trivially equal)
    pairs = zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    assert moved > 5e-3


def test_batch_is_sharded_over_eight_devices(eight_devices):
    info, _ = eight_devices
    assert info["devices"] == 8
    assert info["batch_spec"] == ["data"]
    assert info["batch_shards"] == list(range(8))
    assert info["shard_shapes"] == [[GLOBAL_BATCH // 8, 2]]  # 8 examples, 2 coordinates each
    assert info["params_replicated"] and info["params_devices"] == 8


def test_indivisible_batch_is_a_clear_error(eight_devices):
    info, _ = eight_devices
    assert info["indivisible_error"] == (
        "the global batch size 60 must be divisible by the number of devices 8; change batch_size."
    )


def test_grad_accumulation_on_eight_devices(worker):
    # 2 micro-batches of 32 (4 examples per device each): same step as on one device
    mesh = training.make_mesh()
    state, step_fn, batch = setup(mesh, grad_accum=2)
    new, _ = step_fn(state, training.shard_batch(mesh, batch))
    worker.get()
    for a, b in zip(jax.tree.leaves(new.params), worker.accum, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch size 64 must be divisible by grad_accum=3"):
        setup(mesh, grad_accum=3)[1](state, training.shard_batch(mesh, batch))
    info, _ = worker.get()
    assert info["accum_error"] == (
        "the batch size 64 must be divisible by grad_accum=16 times the number of devices 8; "
        "change batch_size or grad_accum."
    )
