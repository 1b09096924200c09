"""Train a diffusion model: ``python -m experiments.train --preset toy2d --workdir runs/toy2d --steps 3000``.

Every field of :class:`experiments.configs.Config` can be overridden (``--lr 3e-4``,
``--model.channels 64``, ``--data.name rings``; ``--help`` lists them). The run folder gets
``config.json``, ``data_info.json``, ``metrics.jsonl`` (one JSON object per log interval),
``samples/step_<k>.png`` (scatter plot or image grid from the EMA model) and ``checkpoints/``.
Started again on the same folder, it resumes from the latest checkpoint, data order included, and
ends with the same parameters as an uninterrupted run. A non-finite loss stops training with
``FloatingPointError`` naming the step; no checkpoint is written from it.

Preemption: SIGTERM (what preemptible VMs and Slurm send) or SIGINT (Ctrl-C) lets the current step
finish, writes a checkpoint at that step (data position included; orbax writes it to a temporary
folder and renames it, so a kill during the save leaves the previous checkpoint), waits for it,
prints how to resume and exits with status 128 + the signal number. A second signal stops at once.
On several hosts the stop step is agreed at the next log interval (keep ``--log-every`` steps
shorter than the grace period).

Long runs: ``--grad-accum K`` splits each batch into K micro-batches inside the step (same update,
memory of one micro-batch); power-function EMAs of widths ``--ema-profiles`` are tracked and
snapshotted every ``--ema-snapshot-every`` steps into ``ema_snapshots/``, from which
:func:`jaxdiff.checkpoint.load_posthoc_ema` builds the EMA of any width after training (EDM2);
compiled programs go to JAX's persistent compilation cache (``--compile-cache-dir``, default
``<workdir>/jax_cache``; ``--no-compile-cache`` turns it off), so a resumed run does not compile
again.

Multi-host: set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or run
under Slurm with ``JAX_COORDINATOR_ADDRESS`` set) and start the same command on every host; each
host reads its own shard of the data, ``batch_size`` is the global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments import configs
from experiments import sample as sampling
from jaxdiff import checkpoint, data, training

__all__ = ["train", "parse_args", "main", "Preempted"]

# Fields that define the network, its data and the tracked EMAs: a run folder cannot resume with
# other values (``data.path`` may change: the files may move).
_RUN_IDENTITY = ("data", "model", "process", "prediction", "loss", "compute_dtype", "ema_profiles")


class _RunMismatchError(ValueError):
    pass


class Preempted(Exception):
    """Training stopped by ``signal`` after writing a checkpoint at ``step`` in ``workdir``."""

    def __init__(self, signum: int, step: int, workdir: Path):
        self.signum, self.step, self.workdir = signum, step, workdir
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after step {step} and saved it in {workdir}/checkpoints; "
            "run the same command again to resume from it"
        )


class _StopSignals:
    """SIGTERM and SIGINT set ``received`` (the loop stops after its current step); a second one
    gets the previous handler (Ctrl-C twice stops at once). Only the main thread can do this."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, self._old[signum])
            signal.raise_signal(signum)
            return
        self.received = signum  # no printing here: the handler may interrupt a write to stderr

    def stop_requested(self, step: int, every: int) -> bool:
        """Whether to stop after ``step``; on several hosts all agree, at multiples of ``every``."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        stop = int(np.max(flags))
        self.received = self.received or (stop or None)
        return stop != 0


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"model": {"hidden": 8}}`` -> ``{"model.hidden": 8}`` (the CLI's names)."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_run(workdir: Path, config):
    """Refuse to resume a run folder that was trained with another model, data or process."""
    path = workdir / "config.json"
    if not path.is_file() or not (workdir / "checkpoints").is_dir():
        return
    old = _flat(dataclasses.asdict(configs.from_json(path.read_text())))
    new = _flat(dataclasses.asdict(config))
    changed = [
        f"--{k} {old[k]} -> {new[k]}"
        for k in new
        if k.split(".")[0] in _RUN_IDENTITY and k != "data.path" and old.get(k) != new[k]
    ]
    if changed:
        raise _RunMismatchError(
            f"{workdir} holds a run with another configuration ({'; '.join(changed)}); "
            "resume it with its own settings or pass a new --workdir."
        )


def _write_run_files(workdir: Path, config, dataset, num_classes):
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(configs.to_json(config))
    info = {"shape": list(dataset.shape), "num_classes": num_classes, "num_examples": len(dataset)}
    (workdir / "data_info.json").write_text(json.dumps(info))


def _append_metrics(workdir: Path, record: dict):
    if jax.process_index() == 0:
        with open(workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _sample_png(workdir: Path, run: sampling.Run, step: int):
    """Samples of the EMA model at ``step``: ``samples/step_<k>.png`` (process 0 writes)."""
    c = run.config
    labels = sampling.default_labels(run, c.num_samples, None)
    denoise = sampling.run_denoiser(run, labels=labels)
    x, nfe = sampling.generate(
        run, denoise, num=c.num_samples, sampler=c.sampler, steps=c.sample_steps, seed=c.seed
    )
    if jax.process_index() == 0:
        path = workdir / "samples" / f"step_{step:07d}.png"
        sampling.save_samples(path, x, title=f"step {step}, {c.sampler} NFE {nfe}")
    return x


class _Logger:
    """Averages the loss over a log interval and measures steps/s (one host sync per interval)."""

    def __init__(self, workdir, start_step):
        self.workdir, self.step0, self.t0, self.losses = (
            workdir,
            start_step,
            time.perf_counter(),
            [],
        )

    def add(self, metrics):
        self.losses.append(metrics["loss"])

    def flush(self, step, metrics) -> dict:
        now = time.perf_counter()
        loss = float(np.mean(jax.device_get(self.losses))) if self.losses else float("nan")
        rate = (step - self.step0) / max(now - self.t0, 1e-9)
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(metrics["lr"]),
            "steps_per_sec": rate,
        }
        _append_metrics(self.workdir, record)
        self.step0, self.t0, self.losses = step, now, []
        return record


def _setup(config):
    """Data, mesh, model state, compiled step, checkpointer and data iterator of ``config``."""
    dataset = configs.load_data(config)
    num_classes = dataset.num_classes if config.model.class_conditional else None
    mesh = training.make_mesh()
    model = configs.make_model(config, dataset.shape, num_classes)
    optimizer = configs.make_optimizer(config)
    state, graphdef, rest = training.init_train_state(
        model, optimizer, key=jax.random.key(config.seed), mesh=mesh,
        ema_profiles=config.ema_profiles,
    )  # fmt: skip
    hosts = jax.process_count()
    if config.batch_size % hosts:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by {hosts} hosts.")
    iterator = data.make_iterator(
        dataset, config.batch_size // hosts, seed=config.seed, labels=num_classes is not None
    )
    step_fn = training.make_train_step(
        graphdef, configs.make_loss(config), configs.make_process(config), optimizer, rest=rest,
        ema_decay=config.ema_decay, p_uncond=config.p_uncond if num_classes else 0.0,
        null_class=num_classes, mesh=mesh, grad_accum=config.grad_accum,
    )  # fmt: skip
    return dataset, num_classes, mesh, state, graphdef, rest, iterator, step_fn


def _compile_cache(config, workdir: Path):
    """The persistent compilation cache of the run (``<workdir>/jax_cache`` by default)."""
    if not config.compile_cache:
        return contextlib.nullcontext()
    return training.persistent_compilation_cache(config.compile_cache_dir or workdir / "jax_cache")


def train(config: configs.Config, *, progress: bool | None = None):
    """Train (or resume) the run of ``config``; returns ``(run, history)``.

    Args:
        config: the run (its ``workdir`` is the run folder, default ``runs/<preset>``).
        progress: show the tqdm bar (default: ``config.progress``).

    Returns:
        ``run``: a :class:`experiments.sample.Run` (``config``, ``process``, ``graphdef``,
        ``rest``, the final ``state``, ``num_classes``, example ``shape``), ready for
        :func:`experiments.sample.run_denoiser`; ``history``: the metric records logged by this
        call (also appended to ``metrics.jsonl``; empty when the run was already complete).

    A run folder with checkpoints is resumed from the latest one (an uninterrupted run and a
    resumed one end with bitwise the same parameters on CPU). Raises ``FloatingPointError``
    naming the step when a loss is not finite (no checkpoint is written from it), ``ValueError``
    when the folder holds a run with another model, data or process.

    Example:
        >>> run, history = train(dataclasses.replace(configs.get_preset("toy2d"), steps=500))  # doctest: +SKIP
        >>> denoise = experiments.sample.run_denoiser(run)  # doctest: +SKIP
    """
    workdir = Path(configs.workdir_of(config))
    _check_same_run(workdir, config)
    with _compile_cache(config, workdir):
        return _train(config, workdir, progress)


def _train(config, workdir: Path, progress):
    dataset, num_classes, mesh, state, graphdef, rest, it, step_fn = _setup(config)
    _write_run_files(workdir, config, dataset, num_classes)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints", keep=config.keep_checkpoints, every=config.checkpoint_every
    )
    snaps = checkpoint.EMASnapshots(
        workdir / "ema_snapshots", every=config.ema_snapshot_every or config.checkpoint_every
    )
    restored = ckpt.restore_latest(checkpoint.abstract_state(state), it)
    start = 0 if restored is None else restored[1]
    state = state if restored is None else restored[0]
    run = sampling.Run(
        config, configs.make_process(config), graphdef, rest, state, num_classes, dataset.shape
    )
    show = config.progress if progress is None else progress
    if start and jax.process_index() == 0 and show:
        done = " (nothing to do: raise --steps)" if start >= config.steps else ""
        print(f"resuming {workdir} from step {start}{done}", file=sys.stderr)
    bar = tqdm(total=config.steps, initial=start, disable=not show or jax.process_index() != 0)
    logger, history, pending = _Logger(workdir, start), [], None
    try:
        with _StopSignals() as signals:
            for k in range(start + 1, config.steps + 1):
                state, metrics = step_fn(state, training.shard_batch(mesh, next(it)))
                if pending is not None:  # check the previous step while this one runs
                    training.check_finite(*pending)
                pending = (metrics, k)
                logger.add(metrics)
                if k == start + 1:  # steps/s without the compilation of the first step
                    jax.block_until_ready(metrics["loss"])
                    logger.step0, logger.t0 = k, time.perf_counter()
                bar.update(1)
                if k % config.log_every == 0 or k == config.steps:
                    training.check_finite(metrics, k)
                    history.append(logger.flush(k, metrics))
                    bar.set_postfix(
                        loss=f"{history[-1]['loss']:.4f}",
                        steps_s=f"{history[-1]['steps_per_sec']:.1f}",
                    )
                stop = signals.stop_requested(k, config.log_every)
                if ckpt.should_save(k) or snaps.should_save(k) or k == config.steps or stop:
                    training.check_finite(metrics, k)
                    if ckpt.should_save(k) or k == config.steps or stop:
                        ckpt.save(k, state, it, metrics=metrics, force=True)
                    snaps.save(k, state, force=k == config.steps)
                if stop:
                    raise Preempted(signals.received, k, workdir)
                if k % config.sample_every == 0 or k == config.steps:
                    _sample_png(workdir, run._replace(state=state), k)
            if pending is not None:
                training.check_finite(*pending)
    finally:
        bar.close()
        ckpt.close()
        snaps.close()
    return run._replace(state=state), history


def parse_args(argv=None) -> configs.Config:
    """``--preset NAME`` picks the defaults; every other ``Config`` field is a flag (tyro)."""
    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="toy2d", choices=sorted(configs.PRESETS))
    known, rest = pre.parse_known_args(argv)
    config = tyro.cli(
        configs.Config, default=configs.get_preset(known.preset), args=rest, description=__doc__
    )
    return dataclasses.replace(config, preset=known.preset)


def main(argv=None):
    """The command line; returns ``(run, history)`` of :func:`train`."""
    training.initialize_distributed()
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_args(argv)
    try:
        run, history = train(config)
    except (FileNotFoundError, _RunMismatchError) as e:  # missing data files, wrong run folder
        raise SystemExit(f"experiments.train: {e}") from None
    except Preempted as e:
        if jax.process_index() == 0:
            command = shlex.join(["python", "-m", "experiments.train", *argv])
            print(f"experiments.train: {e}:\n  {command}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    if jax.process_index() == 0:
        workdir = Path(configs.workdir_of(config))
        print(
            f"outputs in {workdir}/: config.json, metrics.jsonl, samples/*.png, checkpoints/ "
            f"(latest step {int(run.state.step)})",
            file=sys.stderr,
        )
        print(json.dumps({"workdir": str(workdir), **(history[-1] if history else {})}))
    return run, history


if __name__ == "__main__":
    main()
