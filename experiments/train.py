"""Train a diffusion model: ``python -m experiments.train --preset toy2d --workdir runs/toy2d --steps 3000``.

Every field of :class:`experiments.configs.Config` can be overridden (``--lr 3e-4``,
``--model.channels 64``, ``--data.name rings``; ``--help`` lists them). The run folder gets
``config.json``, ``data_info.json``, ``metrics.jsonl`` (one JSON object per log interval),
``samples/step_<k>.png`` (scatter plot or image grid from the EMA model) and ``checkpoints/``.
Started again on the same folder, it resumes from the latest checkpoint, data order included, and
ends with the same parameters as an uninterrupted run. A non-finite loss stops training with
``FloatingPointError`` naming the step; no checkpoint is written from it.

Multi-host: set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or run
under Slurm with ``JAX_COORDINATOR_ADDRESS`` set) and start the same command on every host; each
host reads its own shard of the data, ``batch_size`` is the global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments import configs
from experiments import sample as sampling
from jaxdiff import checkpoint, data, training

__all__ = ["train", "parse_args", "main"]


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
    optimizer, state, graphdef, rest = sampling.build(config, dataset.shape, num_classes, mesh=mesh)
    hosts = jax.process_count()
    if config.batch_size % hosts:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by {hosts} hosts.")
    iterator = data.make_iterator(
        dataset, config.batch_size // hosts, seed=config.seed, labels=num_classes is not None
    )
    step_fn = training.make_train_step(
        graphdef, configs.make_loss(config), configs.make_process(config), optimizer, rest=rest,
        ema_decay=config.ema_decay, p_uncond=config.p_uncond if num_classes else 0.0,
        null_class=num_classes, mesh=mesh,
    )  # fmt: skip
    return dataset, num_classes, mesh, state, graphdef, rest, iterator, step_fn


def train(config: configs.Config, *, progress: bool | None = None):
    """Train (or resume) the run of ``config``; returns ``(state, history)``.

    ``history`` is the list of metric records logged by this call (also appended to
    ``metrics.jsonl``). Raises ``FloatingPointError`` naming the step when a loss is not finite.
    """
    workdir = Path(configs.workdir_of(config))
    dataset, num_classes, mesh, state, graphdef, rest, it, step_fn = _setup(config)
    _write_run_files(workdir, config, dataset, num_classes)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints", keep=config.keep_checkpoints, every=config.checkpoint_every
    )
    restored = ckpt.restore_latest(checkpoint.abstract_state(state), it)
    start = 0 if restored is None else restored[1]
    state = state if restored is None else restored[0]
    run = sampling.Run(
        config, configs.make_process(config), graphdef, rest, state, num_classes, dataset.shape
    )
    show = config.progress if progress is None else progress
    bar = tqdm(total=config.steps, initial=start, disable=not show or jax.process_index() != 0)
    logger, history, pending = _Logger(workdir, start), [], None
    try:
        for k in range(start + 1, config.steps + 1):
            state, metrics = step_fn(state, training.shard_batch(mesh, next(it)))
            if pending is not None:  # check the previous step while this one runs
                training.check_finite(*pending)
            pending = (metrics, k)
            logger.add(metrics)
            bar.update(1)
            if k % config.log_every == 0 or k == config.steps:
                training.check_finite(metrics, k)
                history.append(logger.flush(k, metrics))
                bar.set_postfix(
                    loss=f"{history[-1]['loss']:.4f}", steps_s=f"{history[-1]['steps_per_sec']:.1f}"
                )
            if ckpt.should_save(k) or k == config.steps:
                training.check_finite(metrics, k)
                ckpt.save(k, state, it, force=True)
            if k % config.sample_every == 0 or k == config.steps:
                _sample_png(workdir, run._replace(state=state), k)
        if pending is not None:
            training.check_finite(*pending)
    finally:
        bar.close()
        ckpt.close()
    return state, history


def parse_args(argv=None) -> configs.Config:
    """``--preset NAME`` picks the defaults; every other ``Config`` field is a flag (tyro)."""
    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="toy2d", choices=sorted(configs.PRESETS))
    known, rest = pre.parse_known_args(argv)
    config = tyro.cli(configs.Config, default=configs.get_preset(known.preset), args=rest)
    return dataclasses.replace(config, preset=known.preset)


def main(argv=None):
    training.initialize_distributed()
    config = parse_args(sys.argv[1:] if argv is None else argv)
    state, history = train(config)
    if history and jax.process_index() == 0:
        print(json.dumps({"workdir": configs.workdir_of(config), **history[-1]}))
    return state


if __name__ == "__main__":
    main()
