"""Checkpoints of the train state and the data iterator, on orbax-checkpoint.

One class, :class:`Checkpointer`, keeps the rest of the code independent of orbax's API. A
checkpoint at step ``k`` is the folder ``<directory>/<k>`` with two items: ``state`` (the
:class:`~jaxdiff.training.TrainState` pytree, ``ocp.args.StandardSave``) and ``data`` (the grain
iterator's position, ``grain.checkpoint.CheckpointSave``; one file per host). Saves are
asynchronous; orbax writes ``<k>.orbax-checkpoint-tmp-*`` and renames it when complete, so an
interrupted save is never listed and the previous checkpoint stays the latest (a later save of the
same step replaces the leftover folder). The last ``keep`` checkpoints are kept. A state with a
non-finite leaf, or a step whose metrics report a non-finite loss, is refused
(``FloatingPointError``), so a diverged run never replaces a good checkpoint.

The iterator position is read when :meth:`Checkpointer.save` is called, not when the background
thread writes it: grain's orbax handler calls ``get_state()`` inside the asynchronous write, by
which time the training loop has already drawn further batches.

Example:
    >>> ckpt = Checkpointer("/tmp/run/checkpoints", keep=3, every=1000)   # doctest: +SKIP
    >>> ckpt.save(step, state, data_iterator)                               # doctest: +SKIP
    >>> restored = ckpt.restore_latest(abstract_state(state), data_iterator)  # doctest: +SKIP
    >>> ckpt.wait()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_state", "all_finite"]


def abstract_state(state):
    """Shapes, dtypes and shardings of ``state`` (what a restore fills in)."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        state,
    )


@jax.jit
def _finite(tree):
    leaves = [
        jnp.all(jnp.isfinite(a))
        for a in jax.tree.leaves(tree)
        if jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree) -> bool:
    """Whether every floating leaf of ``tree`` is finite (one device reduction)."""
    return bool(_finite(tree))


def _step_finite(metrics) -> bool:
    """A step's ``finite`` flag (from :func:`jaxdiff.training.make_train_step`), else its loss."""
    if "finite" in metrics:
        return bool(metrics["finite"])
    return bool(jnp.all(jnp.isfinite(metrics["loss"])))


class _IteratorSnapshot:
    """The position of a data iterator frozen at save time (what grain's handler writes).

    grain's handler writes ``get_state().decode()`` for objects that are not a ``DatasetIterator``;
    restoring into a real ``DatasetIterator`` reads the same JSON back.
    """

    def __init__(self, iterator):
        state = iterator.get_state()
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Save every ``every`` steps (and on demand), keep the last ``keep``, restore the latest.

    Args:
        directory: folder of the checkpoints (created if needed).
        keep: number of most recent checkpoints to keep.
        every: save interval in steps for :meth:`save` (``force=True`` saves regardless).
        async_save: write in a background thread (call :meth:`wait` before reading or exiting).
    """

    def __init__(self, directory, *, keep: int = 3, every: int = 1000, async_save: bool = True):
        if keep < 1 or every < 1:
            raise ValueError(f"keep and every must be >= 1; got keep={keep}, every={every}.")
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (interrupted saves are ignored)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(
        self, step: int, state, data_iterator=None, *, metrics=None, force: bool = False
    ) -> bool:
        """Save ``state`` (and the iterator position) at ``step`` if due or ``force``d.

        Args:
            step: the number of updates ``state`` holds.
            state: the pytree to save (a :class:`~jaxdiff.training.TrainState`).
            data_iterator: a grain iterator; its current position is saved with the state.
            metrics: the step's metrics (``finite`` or ``loss``); a non-finite step is refused.
            force: save even when ``step`` is not a multiple of ``every``.

        Raises ``FloatingPointError`` naming the step for a state with NaN/inf leaves or a
        non-finite loss, before anything is written. Returns whether a save started.
        """
        step = int(step)
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        if metrics is not None and not _step_finite(metrics):
            raise FloatingPointError(
                f"refusing to checkpoint step {step}: the loss was not finite "
                f"(loss={float(metrics.get('loss', float('nan')))})."
            )
        if not all_finite(state):
            raise FloatingPointError(
                f"refusing to checkpoint step {step}: the state has NaN or inf entries."
            )
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def restore(self, step: int, abstract, data_iterator=None):
        """Restore the state saved at ``step`` onto ``abstract``'s shardings; move the iterator."""
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest(self, abstract, data_iterator=None):
        """``(state, step)`` of the newest complete checkpoint, or ``None`` when there is none.

        ``abstract`` is a state pytree of ``jax.ShapeDtypeStruct`` (see :func:`abstract_state`);
        ``data_iterator`` (when given) is moved to the saved position in place.
        """
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract, data_iterator), step

    def wait(self):
        """Block until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self):
        """Finish pending saves and release orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
