"""Long runs of ``experiments.train``: a real SIGTERM to the training process saves the step it
was on and a rerun ends bitwise equal to an uninterrupted run; SIGINT does the same; a rerun loads
its compiled programs from the persistent compilation cache; post-hoc EMA from the run's
snapshots and sampling from it; gradient accumulation from the command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _toy_run import tiny_toy_args

from experiments import sample as sampling
from experiments import train as train_script
from jaxdiff import checkpoint, training

ROOT = Path(__file__).resolve().parents[1]
# A tiny MLP on 512 moons points, logged every 5 steps; no periodic checkpoints or samples.
TINY = tiny_toy_args(log_every=5, save_every=100_000)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _latest_step(workdir: Path) -> int:
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        return ckpt.latest_step()


def _start_training(workdir: Path) -> subprocess.Popen:
    """``python -m experiments.train`` in a subprocess (float64 enabled, as in this process)."""
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    cmd = [sys.executable, "-m", "experiments.train", *TINY]
    cmd += ["--steps", "1000000", "--workdir", str(workdir)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_training(proc, workdir: Path, timeout=240.0):
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def test_sigterm_saves_the_current_step_and_the_rerun_is_bitwise_identical(tmp_path):
    preempted, reference = tmp_path / "preempted", tmp_path / "reference"
    proc = _start_training(preempted)
    try:
        _wait_for_training(proc, preempted)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert exit_s < 30, exit_s  # a few seconds: one step and one small checkpoint
    k = _latest_step(preempted)
    assert k >= 10  # it trained past the first two log records before the signal
    assert f"SIGTERM received: stopped after step {k} and saved it in" in stderr
    assert "run the same command again to resume" in stderr
    assert "python -m experiments.train --preset toy2d" in stderr

    # rerun with a nearer end; the reference never stops
    args = [*TINY, "--steps", str(k + 7), "--ema-snapshot-every", "5"]
    resumed, history = train_script.main([*args, "--workdir", str(preempted)])
    assert [r["step"] for r in history][-1] == k + 7 and history[0]["step"] > k
    uninterrupted, _ = train_script.main([*args, "--workdir", str(reference)])
    assert int(resumed.state.step) == int(uninterrupted.state.step) == k + 7
    for a, b in zip(_leaves(resumed.state), _leaves(uninterrupted.state), strict=True):
        np.testing.assert_array_equal(a, b)  # params, Adam, both EMAs, key: bitwise

    # post-hoc EMA from the run's snapshots: the tracked width 0.10 comes back at the last step
    assert len(uninterrupted.state.power_ema) == 2
    abstract = checkpoint.abstract_state(uninterrupted.state).params
    params = checkpoint.load_posthoc_ema(reference / "ema_snapshots", abstract, 0.10)
    for a, b in zip(_leaves(params), _leaves(uninterrupted.state.power_ema[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and experiments.sample samples from a reconstructed width
    args = [str(reference), "--sampler", "ddim", "--nfe", "5", "--num", "16"]
    info = sampling.main([*args, "--sigma-rel", "0.08"])
    x = np.load(info["npy"])
    assert info["npy"].endswith("ddim_nfe5_seed0_ema0_08.npy") and x.shape == (16, 2)
    assert np.all(np.isfinite(x))
    assert not np.array_equal(x, np.load(sampling.main(args)["npy"]))  # not the plain EMA


def test_sigint_stops_after_the_current_step(tmp_path, monkeypatch, capsys):
    # Ctrl-C arrives while step 8's batch is prepared: step 8 finishes and is saved.
    calls, shard = [], training.shard_batch

    def shard_and_interrupt(mesh, batch):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return shard(mesh, batch)

    monkeypatch.setattr(training, "shard_batch", shard_and_interrupt)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        train_script.main([*TINY, "--steps", "50", "--workdir", str(tmp_path)])
    assert stop.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back
    assert _latest_step(tmp_path) == 8 and len(calls) == 8
    assert "SIGINT received: stopped after step 8" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5]


_EVENTS = []
jax.monitoring.register_event_listener(lambda name, **kw: _EVENTS.append(name))


def _count(name, since=0):
    return _EVENTS[since:].count(f"/jax/compilation_cache/{name}")


def test_rerun_loads_its_programs_from_the_compilation_cache(tmp_path):
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    args = [*TINY, "--workdir", str(workdir), "--compile-cache-dir", str(cache)]
    old = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache tiny programs
    try:
        jax.clear_caches()  # programs compiled by earlier tests are compiled (and cached) anew
        train_script.main([*args, "--steps", "5"])
        written = sorted(p.name for p in cache.iterdir())
        jax.clear_caches()  # as a new process: nothing compiled in memory
        since = len(_EVENTS)
        run, _ = train_script.main([*args, "--steps", "10"])  # resumes at 5
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old)
    assert int(run.state.step) == 10 and written
    assert _count("cache_hits", since) >= 3, _EVENTS[since:]
    assert _count("cache_misses", since) == 0, _EVENTS[since:]  # nothing compiled again
    assert sorted(p.name for p in cache.iterdir()) == written
    assert jax.config.jax_compilation_cache_dir is None  # the setting is given back


def test_grad_accum_flag(tmp_path):
    config = train_script.parse_args([*TINY, "--grad-accum", "4", "--ema-profiles", "0.08"])
    assert config.grad_accum == 4 and config.ema_profiles == (0.08,)
    with pytest.raises(SystemExit):  # tyro reports the config's ValueError
        train_script.parse_args([*TINY, "--batch-size", "60", "--grad-accum", "8"])
    run, history = train_script.main(
        [*TINY, "--grad-accum", "4", "--steps", "5", "--workdir", str(tmp_path)]
    )
    assert int(run.state.step) == 5 and np.isfinite(history[-1]["loss"])
