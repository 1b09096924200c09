"""The training and sampling scripts end to end on a tiny toy run: files, resume, seeded samples,
clear errors. Runs ``experiments.train.main`` and ``experiments.sample.main`` in-process."""

import json

import numpy as np
import pytest
from _toy_run import tiny_toy_args

import jaxdiff
from experiments import common, configs
from experiments import sample as sampling
from experiments import train as train_script

# A tiny MLP on 512 moons points: logged every 10 steps, checkpoints and PNGs every 15.
TINY = [*tiny_toy_args(log_every=10, save_every=15), "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy_run")
    run, history = train_script.main([*TINY, "--workdir", str(workdir), "--steps", "30"])
    return workdir, run, history


def test_cli_overrides_every_field():
    config = train_script.parse_args([*TINY, "--steps", "7", "--model.channel-mults", "1", "4"])
    assert config.model.hidden == 16 and config.model.depth == 1 and config.steps == 7
    assert config.model.channel_mults == (1, 4) and config.data.num_examples == 512
    assert config.progress is False and config.preset == "toy2d"
    digits = train_script.parse_args(["--preset", "digits", "--lr", "3e-4"])
    assert digits.model.kind == "unet" and digits.data.name == "digits" and digits.lr == 3e-4


def test_train_writes_run_files(run_dir):
    workdir, run, history = run_dir
    assert [r["step"] for r in history] == [10, 20, 30]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert set(records[0]) == {"step", "loss", "grad_norm", "lr", "steps_per_sec"}
    assert all(np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 for r in records)
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == [
        "step_0000015.png",
        "step_0000030.png",
    ]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["15", "30"]
    assert configs.from_json((workdir / "config.json").read_text()).model.hidden == 16
    assert int(run.state.step) == 30 and run.shape == (2,) and run.num_classes is None


def test_rerun_resumes_from_latest_checkpoint(run_dir, tmp_path):
    workdir, *_ = run_dir
    run, history = train_script.main([*TINY, "--workdir", str(workdir), "--steps", "40"])
    # resumed at 30: one new log record (step 40), not four
    assert [r["step"] for r in history] == [40] and int(run.state.step) == 40
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["30", "40"]  # keep 2
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40]
    # nothing left to do: returns the restored state, no new records
    again, history = train_script.main([*TINY, "--workdir", str(workdir), "--steps", "40"])
    assert history == [] and int(again.state.step) == 40
    # another network in the same folder is refused with a clear message
    with pytest.raises(SystemExit, match=r"another configuration \(--model.hidden 16 -> 32\)"):
        train_script.main([*TINY, "--workdir", str(workdir), "--model.hidden", "32"])


def test_sample_is_seeded(run_dir):
    workdir, *_ = run_dir
    args = [str(workdir), "--sampler", "heun", "--nfe", "7", "--num", "50"]
    first = sampling.main([*args, "--seed", "3"])
    x1 = np.load(first["npy"])
    second = sampling.main([*args, "--seed", "3"])
    x2 = np.load(second["npy"])
    assert first["nfe"] == 7 and x1.shape == (50, 2) and np.all(np.isfinite(x1))
    np.testing.assert_array_equal(x1, x2)  # same checkpoint and seed: identical arrays
    assert first["png"].endswith("heun_nfe7_seed3.png")
    assert (workdir / "samples" / "heun_nfe7_seed3.png").stat().st_size > 1000


def test_sampler_names_and_nfe_on_the_command_line(run_dir):
    workdir, *_ = run_dir
    with pytest.raises(ValueError, match="unknown sampler 'rk4'; available: ddim, ddpm"):
        sampling.main([str(workdir), "--sampler", "rk4"])
    with pytest.raises(SystemExit):
        sampling.main([str(workdir), "--nfe", "0"])
    # every offered name is a sampler of the one table, whose NFE per step it reports itself
    vp = jaxdiff.VP()
    assert sampling.SAMPLER_NAMES == tuple(common.SAMPLERS)
    per_step = {n: common.make_sampler(n, vp).nfe_per_step for n in sampling.SAMPLER_NAMES}
    two = ("heun", "dpm_solver", "dpm_solver_pp_2s", "dpm_2_ancestral", "dpm_pp_2s_ancestral")
    expected = {n: 2 if n in two else 1 for n in sampling.SAMPLER_NAMES}
    assert per_step == expected | {"dpm_solver_3": 3, "dpm_solver_pp_3s": 3}
    # the same settings build an equal, hashable sampler: sampling again compiles nothing new
    assert common.make_sampler("heun", vp) == common.make_sampler("heun", vp)
    assert len({common.make_sampler("unipc", vp), common.make_sampler("unipc", vp)}) == 1
    with pytest.raises(ValueError, match="unknown grid 'cosine'; available: karras"):
        sampling.main([str(workdir), "--grid", "cosine"])


def test_missing_data_files_are_a_clear_error(tmp_path):
    with pytest.raises(
        SystemExit,
        match="MNIST train files not found in .*missing "
        "train-images-idx3-ubyte.*Or set --data.path",
    ):
        train_script.main(
            ["--preset", "mnist", "--data.path", str(tmp_path), "--workdir", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="CIFAR-10 train batches not found"):
        train_script.main(
            ["--preset", "cifar10", "--data.path", str(tmp_path), "--workdir", str(tmp_path)]
        )
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        sampling.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="give the run folder"):
        sampling.main([])


def test_nan_loss_stops_training_without_checkpoint(tmp_path, monkeypatch):
    # A loss that is NaN from step 1: training stops naming the step; no checkpoint exists.
    def nan_loss(apply_fn, process, x0, *, key):
        return np.nan * apply_fn(x0, 0.5 + 0.0 * x0[:, 0]).sum(-1)

    monkeypatch.setattr(configs, "make_loss", lambda config: nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 1"):
        train_script.main([*TINY, "--workdir", str(tmp_path), "--steps", "20"])
    assert list((tmp_path / "checkpoints").iterdir()) == []
