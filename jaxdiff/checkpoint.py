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

Snapshots of the power-function EMAs for post-hoc EMA (Karras et al. 2024) are kept apart, all
of them, by :class:`EMASnapshots`; :func:`load_posthoc_ema` reads them back and reconstructs the
EMA of any relative width with :func:`jaxdiff.training.posthoc_ema`.

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

from jaxdiff.training import EMASnapshot, TrainState, posthoc_ema

__all__ = [
    "Checkpointer",
    "abstract_state",
    "all_finite",
    "EMASnapshots",
    "load_ema_snapshots",
    "load_posthoc_ema",
]


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


class _Managed:
    """Lifetime of an orbax ``CheckpointManager`` held as ``self._manager`` (a context manager)."""

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


class Checkpointer(_Managed):
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
        handlers = dict(
            state=ocp.StandardCheckpointHandler(), data=grain.checkpoint.CheckpointHandler()
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

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

    def _saved_profiles(self, step: int, abstract):
        """``abstract`` with as many power-function EMAs as the checkpoint holds (a loader that
        only samples does not know how many the run tracked; each has the params' structure).
        A checkpoint written before the power EMAs existed is read as a dict of the other fields.
        """
        if not isinstance(abstract, TrainState):
            return abstract
        saved = self._manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if "power_ema" not in saved:
            return {k: v for k, v in vars(abstract).items() if not k.startswith("power_")}
        n = len(saved["power_ema"] or ())
        if n == len(abstract.power_ema):
            return abstract
        gamma = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=abstract.step.sharding)
        return abstract.replace(
            power_ema=tuple(abstract.params for _ in range(n)), power_gamma=gamma if n else ()
        )

    def restore(self, step: int, abstract, data_iterator=None):
        """Restore the state saved at ``step`` onto ``abstract``'s shardings; move the iterator."""
        target = self._saved_profiles(step, abstract)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        state = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
        return TrainState(**state) if isinstance(target, dict) else state

    def restore_latest(self, abstract, data_iterator=None):
        """``(state, step)`` of the newest complete checkpoint, or ``None`` when there is none.

        ``abstract`` is a state pytree of ``jax.ShapeDtypeStruct`` (see :func:`abstract_state`);
        ``data_iterator`` (when given) is moved to the saved position in place.
        """
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract, data_iterator), step


# ----------------------------------------------------------------------------------------------
# Post-hoc EMA snapshots
# ----------------------------------------------------------------------------------------------
class EMASnapshots(_Managed):
    """Snapshots of a train state's power-function EMAs every ``every`` steps, all kept.

    Snapshot ``k`` is the folder ``<directory>/<k>`` with the EMAs (``ema``, one tree per profile,
    ``ocp.args.StandardSave``) and their exponents (``profile``, JSON ``{"gamma": [...]}``). Saves
    are asynchronous and atomic, as for :class:`Checkpointer`. :func:`load_posthoc_ema` reads them.

    Example:
        >>> snaps = EMASnapshots("/tmp/run/ema_snapshots", every=500)      # doctest: +SKIP
        >>> snaps.save(step, state)                                          # doctest: +SKIP
    """

    def __init__(self, directory, *, every: int = 1000, async_save: bool = True):
        if every < 1:
            raise ValueError(f"every must be >= 1; got {every}.")
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Save ``state.power_ema`` at ``step`` if due (or ``force``); returns whether it started."""
        step = int(step)
        if not state.power_ema or not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        emas = {str(i): e for i, e in enumerate(state.power_ema)}
        gamma = [float(g) for g in jax.device_get(state.power_gamma)]
        items = dict(ema=ocp.args.StandardSave(emas), profile=ocp.args.JsonSave({"gamma": gamma}))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def load(self, abstract_params) -> list[EMASnapshot]:
        """Every snapshot, one :class:`~jaxdiff.training.EMASnapshot` per profile and step.

        ``abstract_params`` gives the structure, shapes and shardings of one parameter tree (e.g.
        ``abstract_state(state).params``).
        """
        snapshots = []
        for step in self.all_steps():
            profile = self._manager.restore(
                step, args=ocp.args.Composite(profile=ocp.args.JsonRestore())
            )["profile"]
            target = {str(i): abstract_params for i in range(len(profile["gamma"]))}
            emas = self._manager.restore(
                step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(target))
            )["ema"]
            snapshots += [
                EMASnapshot(step, g, emas[str(i)]) for i, g in enumerate(profile["gamma"])
            ]
        return snapshots


def load_ema_snapshots(directory, abstract_params) -> list[EMASnapshot]:
    """The snapshots in ``directory`` (written by :class:`EMASnapshots`); see :meth:`EMASnapshots.load`."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"no EMA snapshots in {directory}: train with power-function EMA profiles "
            "(experiments.train --ema-profiles 0.05 0.1) to use post-hoc EMA."
        )
    with EMASnapshots(directory, async_save=False) as snaps:
        return snaps.load(abstract_params)


def load_posthoc_ema(directory, abstract_params, sigma_rel: float, *, step: int | None = None):
    """Parameters of the EMA of relative width ``sigma_rel`` ending at ``step`` (default: the last
    snapshot), reconstructed from the snapshots in ``directory`` by
    :func:`jaxdiff.training.posthoc_ema`, placed like ``abstract_params``.

    Example:
        >>> params = load_posthoc_ema(run / "ema_snapshots", abstract_state(state).params, 0.1)  # doctest: +SKIP
    """
    snapshots = load_ema_snapshots(directory, abstract_params)
    if step is not None:
        snapshots = [s for s in snapshots if s.step <= step]
    if not snapshots:
        raise FileNotFoundError(f"no EMA snapshot at or before step {step} in {directory}.")
    params = posthoc_ema(snapshots, sigma_rel, step=step)
    place = lambda a, like: (  # noqa: E731
        a if getattr(like, "sharding", None) is None else jax.device_put(a, like.sharding)
    )
    return jax.tree.map(place, params, abstract_params)
