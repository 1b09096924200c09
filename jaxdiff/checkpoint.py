"""Checkpoints of the train state and the data iterator, on orbax-checkpoint.

One class, :class:`Checkpointer`, keeps the rest of the code independent of orbax's API. A
checkpoint at step ``k`` is the folder ``<directory>/<k>`` with two items: ``state`` (the
:class:`~jaxdiff.training.TrainState` pytree, ``ocp.args.StandardSave``) and ``data`` (the grain
iterator's position, ``grain.checkpoint.CheckpointSave``; one file per host). Saves are
asynchronous; orbax writes ``<k>.orbax-checkpoint-tmp-*`` and renames it when complete, so an
interrupted save is never listed and the previous checkpoint stays the latest. The last ``keep``
checkpoints are kept. A state with a non-finite parameter is refused (``FloatingPointError``).

Example:
    >>> ckpt = Checkpointer("/tmp/run/checkpoints", keep=3, every=1000)   # doctest: +SKIP
    >>> ckpt.save(step, state, data_iterator)                               # doctest: +SKIP
    >>> restored = ckpt.restore_latest(abstract_state(state), data_iterator)  # doctest: +SKIP
    >>> ckpt.wait()                                                          # doctest: +SKIP
"""

from __future__ import annotations

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

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Save ``state`` (and the iterator position) at ``step`` if due or ``force``d.

        Raises ``FloatingPointError`` for a state with NaN/inf parameters, so a diverged run
        never overwrites a good checkpoint. Returns whether a save started.
        """
        step = int(step)
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        if not all_finite(state):
            raise FloatingPointError(
                f"refusing to checkpoint step {step}: the state is not finite."
            )
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
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
