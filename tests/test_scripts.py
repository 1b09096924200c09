"""The evaluation, guidance and editing scripts in-process at tiny sizes: their tables hold finite
numbers in the right rows, their figures exist, NFE accounting is exact, inpainting keeps the
known pixels bit for bit."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _toy_run import tiny_toy_args
from flax import nnx

import jaxdiff
from experiments import edit as edit_script
from experiments import evaluate as eval_script
from experiments import geometry as geometry_script
from experiments import guidance_digits as guidance_script
from experiments import train as train_script
from jaxdiff import nets, samplers

# A tiny MLP on 512 moons points, 30 steps.
TINY = [*tiny_toy_args(log_every=30, save_every=30), "--steps", "30"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy_run")
    train_script.main([*TINY, "--workdir", str(workdir)])
    return workdir


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]  # no header


# --- NFE accounting --------------------------------------------------------------------------
def test_nfe_per_step_of_each_sampler():
    vp = jaxdiff.VP()
    per_step = {name: eval_script.make_method(name, vp).per_step for name in eval_script.SAMPLERS}
    assert per_step == {
        "ddpm": 1, "ddim": 1, "heun": 2, "dpm_solver_3": 3, "dpm_solver_pp_2": 1,
        "ipndm": 1, "unipc": 1, "diffrax_heun": 2,
    }  # fmt: skip
    assert samplers.dpm_solver(vp, order=2).nfe_per_step == 2


# samplers with 1, 2 and 3 evaluations per step
BY_PER_STEP = {1: samplers.ddim(jaxdiff.VP()), 2: samplers.heun(jaxdiff.VP())}
BY_PER_STEP[3] = samplers.dpm_solver(jaxdiff.VP(), order=3)


@pytest.mark.parametrize(
    "per_step, target, steps",
    # NFE = (steps - 1) * per_step + 1, nearest to the target, ties to fewer steps, steps >= 2
    [(1, 5, 5), (1, 50, 50), (2, 5, 3), (2, 10, 5), (2, 50, 25), (3, 5, 2), (3, 10, 4),
     (3, 20, 7), (3, 50, 17), (1, 3, 3), (3, 3, 2)],
)  # fmt: skip
def test_steps_for_nfe_is_nearest(per_step, target, steps):
    assert BY_PER_STEP[per_step].nfe_per_step == per_step
    assert BY_PER_STEP[per_step].steps_for_nfe(target) == steps
    best = min(abs((n - 1) * per_step + 1 - target) for n in range(2, 100))
    assert abs((steps - 1) * per_step + 1 - target) == best


# --- evaluate --------------------------------------------------------------------------------
def test_evaluate_writes_a_row_per_sampler_and_nfe(toy_run, tmp_path):
    out = tmp_path / "eval"
    # NFE 3 and 4 both take 2 steps of the samplers with 2 and 3 evaluations per step: their
    # second row reuses the first one's compiled program
    result = eval_script.main(
        [str(toy_run), "--workdir", str(out), "--nfe", "3", "4", "--num-samples", "128",
         "--nll-examples", "8", "--no-progress"]
    )  # fmt: skip
    rows = _table_rows((out / "eval.md").read_text())
    expected = [(s, t) for s in eval_script.SAMPLERS for t in (3, 4)]
    assert [(r[0], int(r[1])) for r in rows[:-1]] == expected
    assert rows[-1][0] == "data (real vs real)"
    per_step = {"heun": 2, "diffrax_heun": 2, "dpm_solver_3": 3}
    for r in rows[:-1]:
        name, target, nfe, steps = r[0], int(r[1]), int(r[2]), int(r[3])
        assert nfe == (steps - 1) * per_step.get(name, 1) + 1  # the NFE the sampler reported
        assert abs(nfe - target) <= 1
        sw, mmd = float(r[4]), float(r[5])
        assert math.isfinite(sw) and sw > 0 and math.isfinite(mmd)
    nll = result["nll"]
    assert nll["examples"] == 8 and math.isfinite(nll["nats_per_dim"])
    assert nll["nats_per_dim"] == pytest.approx(nll["nll_nats"] / 2)
    assert (out / "quality_vs_nfe.png").stat().st_size > 10_000
    saved = json.loads((out / "eval.json").read_text())
    assert len(saved["rows"]) == 16 and saved["primary"] == "sliced_w2"


def test_evaluate_rejects_bad_options(toy_run):
    with pytest.raises(ValueError, match="unknown samplers"):
        eval_script.EvalConfig(str(toy_run), samplers=("ddim", "rk45"))
    with pytest.raises(ValueError, match="nfe targets must be >= 3"):
        eval_script.EvalConfig(str(toy_run), nfe=(2, 10))
    with pytest.raises(ValueError, match="unknown grid 'cosine'"):
        eval_script.EvalConfig(str(toy_run), grid="cosine")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        eval_script.main([str(toy_run / "missing")])


# --- edit --------------------------------------------------------------------------------------
def test_edit_exact_inpainting_keeps_known_pixels(tmp_path):
    files = edit_script.main(
        ["--exact", "--workdir", str(tmp_path), "--steps", "4", "--num", "4", "--pairs", "1",
         "--resample", "2", "--sdedit-starts", "0.3", "1.0"]
    )  # fmt: skip
    assert sorted(files) == ["inpaint", "interpolate", "sdedit"]
    assert all((tmp_path / f"{k}.png").stat().st_size > 1000 for k in files)
    rows = np.load(tmp_path / "inpaint.npz")
    x = rows["00 original"]
    assert x.shape == (4, 8, 8, 1)
    for key in ("02 resample=1", "03 resample=2"):  # left half known
        np.testing.assert_array_equal(rows[key][:, :, :4], x[:, :, :4])
        assert np.all(np.isfinite(rows[key]))
    for key in ("06 resample=1", "07 resample=2"):  # top half known
        np.testing.assert_array_equal(rows[key][:, :4], rows["04 original"][:, :4])
    strips = np.load(tmp_path / "interpolate.npz")
    assert strips["00 pair 0"].shape == (4, 8, 8, 1)
    sd = np.load(tmp_path / "sdedit.npz")
    assert [k.split(" ", 1)[1] for k in sd.files] == ["strokes", "t0=0.30", "t0=1.00"]


def test_edit_refuses_a_non_digits_run(toy_run):
    with pytest.raises(ValueError, match="edits 8x8 digits"):
        edit_script.main([str(toy_run)])


# --- guidance ----------------------------------------------------------------------------------
def test_small_resblock_is_conditioned_on_the_embedding():
    """Guidance needs a network that sees its label: with <= 32 channels each GroupNorm group is
    one channel, which erased a per-channel embedding bias added before the norm (a trained
    digits U-Net's output moved by 5e-7 between labels 0 and 5, so CFG did nothing). Measured:
    the block's output moves by 1.07 between two embeddings, 2e-6 with the bias before the norm."""
    block = nets.ResBlock(8, 8, 16, rngs=nnx.Rngs(0))
    shape = block.conv2.kernel.shape  # non-zero output conv, as after training
    block.conv2.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1), shape, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8), jnp.float32)
    emb = jax.random.normal(jax.random.key(2), (2, 16), jnp.float32)
    out = block(jnp.concatenate([x, x]), emb)
    assert float(jnp.max(jnp.abs(out[1] - out[0]))) > 0.1


def test_guidance_digits_tiny(tmp_path):
    workdir = tmp_path / "guidance"
    summary = guidance_script.main(
        ["--workdir", str(workdir), "--steps", "3", "--channels", "4", "--channel-mults", "1",
         "--batch-size", "16", "--classifier-steps", "0", "--per-class", "2",
         "--sample-steps", "2", "--cfg-scales", "0", "2", "--no-progress"]
    )  # fmt: skip
    # classifier guidance (--classifier-steps > 0) is left out here: its compilations cost ~20 s
    assert [(r["method"], r["scale"]) for r in summary] == [
        ("classifier-free", 0.0), ("classifier-free", 2.0)
    ]  # fmt: skip
    for r in summary:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["fd_classifier"])
        assert r["nfe"] == 2
    assert (workdir / "guidance_grid.png").stat().st_size > 1000
    rows = _table_rows((workdir / "guidance.md").read_text())
    assert [row[:2] for row in rows] == [["classifier-free", "0"], ["classifier-free", "2"]]
    assert json.loads((workdir / "guidance.json").read_text())["train_steps"] == 3


# --- geometry ------------------------------------------------------------------------------------
def test_geometry_script_on_the_mixture_writes_figures_and_summary(tmp_path):
    result = geometry_script.main(
        ["--workdir", str(tmp_path), "--num", "4", "--steps", "8", "--warmup", "8",
         "--held-out", "8", "--teacher-steps", "20", "--nfes", "4", "6", "--opt-nfes", "4",
         "--opt-steps", "2", "--memorize-points", "4", "--reference-points", "64",
         "--no-progress"]
    )  # fmt: skip
    for name in ("deviation", "convergence", "projection", "score_deviation", "schedules"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "## Schedules" in (tmp_path / "summary.md").read_text()
    rows = {(r["sampler"], r["nfe"]): r for r in result["schedules"]}
    assert set(rows) == {("DDIM", 4), ("DDIM", 6), ("DPM-Solver++(2M)", 4), ("iPNDM", 4)}
    assert all(math.isfinite(r["error"]) and r["error"] > 0 for r in rows.values())
    # quasi-linear trajectories even at 8 Heun steps; the memorization check lands on data points
    assert 0 < result["worst_chord_deviation"] < 0.1 and result["explained_2d"] > 0.99
    assert result["memorization"]["max_distance"] < 1e-3
