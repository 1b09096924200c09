"""Checkpoints: exact resume (parameters and data order), atomic saves, refusal of non-finite
states, and keeping the last K.

The resume test is the contract of :mod:`jaxdiff.checkpoint`: N steps, save, restore into a fresh
state and iterator, N more steps gives bitwise the parameters of 2N uninterrupted steps on CPU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdiff
from jaxdiff import checkpoint, data, losses, training
from jaxdiff.nets import MLP

N = 6  # steps before and after the save; 200 points / 32 per batch = 6 batches per epoch
DATA = data.toy_2d("moons", 200, seed=3)


def _fresh(seed=0):
    """A new model, state and data iterator, as a restarted process would build them."""
    model = MLP(2, hidden=16, depth=1, dropout=0.1, rngs=nnx.Rngs(seed))
    opt = training.make_optimizer(1e-2, warmup=2)
    # replicated over the mesh like the step's output, so the step compiles once
    state, graphdef, rest = training.init_train_state(
        model, opt, key=jax.random.key(1), mesh=training.make_mesh()
    )
    return state, graphdef, rest, opt, data.make_iterator(DATA, 32, seed=5, labels=False)


@pytest.fixture(scope="module")
def step_fn():
    _, graphdef, rest, opt, _ = _fresh()
    return training.make_train_step(graphdef, losses.eps_loss, jaxdiff.VP(), opt, rest=rest)


def _run(step_fn, state, it, n):
    mesh = training.make_mesh()
    for _ in range(n):
        state, metrics = step_fn(state, training.shard_batch(mesh, next(it)))
        training.check_finite(metrics, int(state.step))
    return state


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def test_resume_is_bitwise_identical_including_data_order(step_fn, tmp_path):
    # Uninterrupted run: N steps, asynchronous save, N more steps (the step donates the buffers
    # and advances the iterator while the save is still being written).
    state, *_, it = _fresh()
    state = _run(step_fn, state, it, N)
    with checkpoint.Checkpointer(tmp_path, keep=2, every=N) as ckpt:
        assert ckpt.save(N, state, it)
        reference = _run(step_fn, state, it, N)
        next_batch = next(it)["x"]

    # Restarted run: fresh state and iterator (at the start of the data), restore the latest.
    fresh, *_, it2 = _fresh(seed=1)  # a different init: everything must come from the checkpoint
    with checkpoint.Checkpointer(tmp_path, keep=2, every=N) as ckpt:
        restored, step = ckpt.restore_latest(checkpoint.abstract_state(fresh), it2)
    assert step == N and int(restored.step) == N
    resumed = _run(step_fn, restored, it2, N)

    assert int(resumed.step) == 2 * N
    for a, b in zip(_leaves(resumed), _leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: params, Adam moments, EMA, key
    np.testing.assert_array_equal(next(it2)["x"], next_batch)  # same data order afterwards


def test_interrupted_save_leaves_previous_checkpoint(step_fn, tmp_path, monkeypatch):
    state, *_, it = _fresh()
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3, every=1)
    ckpt.save(1, state, it)
    ckpt.wait()
    saved = _leaves(state)

    # Cut the next save off halfway: the parameters are written, then the iterator's item fails.
    def killed(self):
        raise OSError("disk full: save cut off halfway")

    monkeypatch.setattr(checkpoint._IteratorSnapshot, "get_state", killed)
    state = _run(step_fn, state, it, 1)
    with pytest.raises(OSError, match="cut off halfway"):
        ckpt.save(2, state, it)
        ckpt.wait()
    monkeypatch.undo()
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("2.orbax-checkpoint-tmp")]
    assert leftovers, "expected the half-written temporary folder of step 2"

    # The folder of a killed process, seen by a new one: step 1 is the latest and restores.
    fresh, *_, it2 = _fresh(seed=1)
    with checkpoint.Checkpointer(tmp_path, keep=3, every=1) as again:
        assert again.latest_step() == 1 and again.all_steps() == [1]
        restored, step = again.restore_latest(checkpoint.abstract_state(fresh), it2)
        for a, b in zip(_leaves(restored), saved, strict=True):
            np.testing.assert_array_equal(a, b)
        assert again.save(2, state, it2)  # the step can be saved again over the leftover
        again.wait()
        assert again.all_steps() == [1, 2]


def test_non_finite_state_is_never_checkpointed(tmp_path):
    state, *_, it = _fresh()
    poisoned = state.replace(params=jax.tree.map(lambda p: p.at[..., 0].set(jnp.nan), state.params))
    with checkpoint.Checkpointer(tmp_path, every=1) as ckpt:
        with pytest.raises(FloatingPointError, match="refusing to checkpoint step 7"):
            ckpt.save(7, poisoned, it)
        # a finite state whose step reported a non-finite loss is refused too
        bad = {"loss": jnp.asarray(jnp.inf), "finite": jnp.asarray(False)}
        with pytest.raises(FloatingPointError, match="step 8: the loss was not finite"):
            ckpt.save(8, state, it, metrics=bad)
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary folder


def test_keeps_the_last_k_and_saves_every_n(tmp_path):
    state, *_, it = _fresh()
    with checkpoint.Checkpointer(tmp_path, keep=2, every=3) as ckpt:
        started = [ckpt.save(k, state, it) for k in range(1, 11)]
        ckpt.save(10, state, it, force=True)  # the final step, off the interval
        ckpt.wait()
        assert started == [k % 3 == 0 for k in range(1, 11)]
        assert ckpt.all_steps() == [9, 10] and ckpt.latest_step() == 10
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="keep and every must be >= 1"):
        checkpoint.Checkpointer(tmp_path, keep=0)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest({"a": jax.ShapeDtypeStruct((2,), jnp.float32)}) is None


def test_iterator_position_is_read_when_save_is_called(tmp_path, monkeypatch):
    # grain's handler reads the iterator inside orbax's background write; delay that write while
    # the loop draws three more batches: the checkpoint must still hold the position at save().
    import time

    import grain

    write = grain.checkpoint.CheckpointHandler.save

    def slow_write(self, *args, **kwargs):
        time.sleep(0.3)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", slow_write)
    state, *_, it = _fresh()
    for _ in range(4):
        next(it)
    with checkpoint.Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(4, state, it)
        expected = next(it)["x"]  # batch 5: the first one after the saved position
        for _ in range(2):
            next(it)
    fresh, *_, it2 = _fresh()
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.restore_latest(checkpoint.abstract_state(fresh), it2)
    np.testing.assert_array_equal(next(it2)["x"], expected)


def test_restore_fills_in_the_tracked_ema_profiles_and_reads_older_checkpoints(tmp_path):
    import orbax.checkpoint as ocp

    model = MLP(2, hidden=16, depth=1, rngs=nnx.Rngs(0))
    opt = training.make_optimizer(1e-2)
    tracked, *_ = training.init_train_state(
        model, opt, key=jax.random.key(1), ema_profiles=(0.05, 0.1)
    )
    plain, *_ = training.init_train_state(model, opt, key=jax.random.key(1))
    with checkpoint.Checkpointer(tmp_path / "new", every=1) as ckpt:
        ckpt.save(3, tracked)
        ckpt.wait()
        # a loader that does not know the run's profiles (as experiments.sample) gets them all
        restored = ckpt.restore(3, checkpoint.abstract_state(plain))
    assert len(restored.power_ema) == 2
    for a, b in zip(_leaves(restored), _leaves(tracked), strict=True):
        np.testing.assert_array_equal(a, b)
    # a checkpoint written before TrainState had power EMAs
    fields = ("step", "params", "opt_state", "ema_params", "key")
    with checkpoint.Checkpointer(tmp_path / "old", every=1) as ckpt:
        old = {f: getattr(plain, f) for f in fields}
        ckpt._manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(old)))
        ckpt.wait()
        restored = ckpt.restore(2, checkpoint.abstract_state(tracked))
    assert isinstance(restored, training.TrainState) and restored.power_ema == ()
    for a, b in zip(_leaves(restored), _leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)
