"""jaxdiff.pretrained against diffusers' own numbers (written by tests/pretrained_reference.py).

- each tiny random UNet2DModel (tests/data/tiny_ddpm, tests/data/tiny_unet_v) reproduces
  diffusers' output on fixed inputs at integer and fractional steps, to 1e-4 relative;
- every scheduler table equals diffusers' alphas_cumprod, and the prediction types map;
- load_diffusers equals the hand-assembled eps -> x0 (and v -> x0) with diffusers' alphas_cumprod
  and with the DiscreteVP's own conversion; it samples with DPM-Solver++;
- missing files, unsupported config values and block types, mismatched weights: clear errors.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxdiff
from jaxdiff import pretrained as P

DATA = Path(__file__).parent / "data"
REF = np.load(DATA / "tiny_unet_reference.npz")
FOLDERS = {"ddpm": DATA / "tiny_ddpm", "v": DATA / "tiny_unet_v"}
PREDICTIONS = {
    "linear_epsilon": "eps",
    "scaled_linear_sample": "x0",
    "cosine_v": "v",
    "linear_short": "eps",
}


def assert_close(got, expected, rel=1e-4):
    """Entrywise within ``rel`` of the reference's largest magnitude (float32 rounding)."""
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def nets():
    return {name: P.load_diffusers_unet(folder) for name, folder in FOLDERS.items()}


@pytest.mark.parametrize("name", ["ddpm", "v"])
@pytest.mark.parametrize("steps", ["timesteps", "fractional"])
def test_unet_reproduces_diffusers(nets, name, steps):
    x = jnp.asarray(REF[f"{name}_x"], jnp.float32)
    out = nets[name](x, jnp.asarray(REF[steps]))
    assert out.dtype == jnp.float32 and out.shape[:3] == x.shape[:3]
    key = f"{name}_out" if steps == "timesteps" else f"{name}_out_fractional"
    assert_close(out, REF[key])


def test_unet_scalar_step_pipeline_folder_and_jit(nets):
    x = jnp.asarray(REF["ddpm_x"], jnp.float32)
    flat = P.load_diffusers_unet(FOLDERS["ddpm"] / "unet")  # the unet/ subfolder itself
    np.testing.assert_array_equal(flat(x, 917.0), nets["ddpm"](x, jnp.array([917.0, 917.0])))
    np.testing.assert_allclose(jax.jit(flat)(x, 917.0), flat(x, 917.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="NHWC"):
        flat(x.transpose(0, 3, 1, 2), 3.0)


@pytest.mark.parametrize("name", list(PREDICTIONS))
def test_scheduler_tables_equal_diffusers(name):
    process, prediction = P.load_diffusers_scheduler(DATA / "schedulers" / name)
    assert isinstance(process, jaxdiff.DiscreteVP) and prediction == PREDICTIONS[name]
    expected = REF[f"alphas_cumprod_{name}"]  # diffusers computes it in float32
    assert process.n_steps == len(expected)
    np.testing.assert_allclose(process.alphas_cumprod, expected, rtol=5e-5)


@pytest.mark.parametrize("name", ["ddpm", "v"])
def test_load_diffusers_is_the_hand_assembled_denoiser(nets, name):
    denoise = P.load_diffusers(FOLDERS[name])
    process = denoise.process
    c = REF[f"{name}_x"].shape[-1]
    x = jnp.asarray(REF[f"{name}_x"], jnp.float32)
    t = jnp.asarray((REF["timesteps"] + 1) / process.n_steps)
    np.testing.assert_allclose(process.timestep(t), REF["timesteps"], atol=1e-9)
    x0 = denoise(x, t)
    assert x0.shape == x.shape and x0.dtype == jnp.float32
    assert_close(x0, REF[f"{name}_x0"])  # diffusers' alphas_cumprod
    out = nets[name](x, jnp.asarray(REF["timesteps"]))[..., :c]
    pred = {"ddpm": "eps", "v": "v"}[name]
    by_hand = jaxdiff.parameterization.to_x0(process, pred, x, t, out)
    np.testing.assert_allclose(x0, by_hand, rtol=1e-5, atol=1e-5)


def test_load_diffusers_samples_with_dpm_solver_pp():
    denoise = P.load_diffusers(FOLDERS["ddpm"])
    process = denoise.process
    x_T = process.prior_sample((2, 8, 8, 3), key=jax.random.key(0))
    ts = jaxdiff.schedules.log_snr_uniform(process, 4)
    res = jaxdiff.sample(jaxdiff.samplers.dpm_solver_pp(process), denoise, x_T, ts)
    assert res.x.shape == x_T.shape and int(res.nfe) == 4
    assert bool(jnp.all(jnp.isfinite(res.x)))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def copy_model(tmp_path, edit=None):
    folder = tmp_path / "model"
    shutil.copytree(FOLDERS["ddpm"] / "unet", folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*never downloads"):
        P.load_diffusers_unet(tmp_path)
    folder = copy_model(tmp_path)
    (folder / P.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=P.WEIGHTS):
        P.load_diffusers_unet(folder)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        P.load_diffusers_scheduler(tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]),
         "CrossAttnDownBlock2D.*DownBlock2D, AttnDownBlock2D"),
        (lambda c: c.update(up_block_types=["UpBlock2D", "SkipUpBlock2D"]), "SkipUpBlock2D"),
        (lambda c: c.update(time_embedding_type="fourier"), "time_embedding_type.*positional"),
        (lambda c: c.update(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
        (lambda c: c.update(act_fn="gelu"), "act_fn"),
        (lambda c: c.update(class_embed_type="timestep"), "class_embed_type"),
        (lambda c: c.update(cross_attention_dim=64), "unsupported UNet2DModel config key"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_named(tmp_path, edit, match):
    folder = copy_model(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as info:
        P.load_diffusers_unet(folder)
    assert "config.json" in str(info.value)


def test_weights_that_do_not_match_the_config(tmp_path):
    folder = copy_model(tmp_path)
    tensors = load_file(folder / P.WEIGHTS)
    missing = dict(tensors)
    del missing["mid_block.attentions.0.to_q.weight"]
    save_file(missing, folder / P.WEIGHTS)
    with pytest.raises(ValueError, match="to_q.weight.*do\n?.*not match"):
        P.load_diffusers_unet(folder)
    save_file({**tensors, "extra.weight": np.zeros(3, np.float16)}, folder / P.WEIGHTS)
    with pytest.raises(ValueError, match="extra.weight"):
        P.load_diffusers_unet(folder)


def test_old_attention_names_load_the_same(tmp_path, nets):
    """Checkpoints saved before diffusers' Attention class name the projections query/key/value/
    proj_attn: the same network."""
    folder = copy_model(tmp_path)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(folder / P.WEIGHTS).items():
        for new, was in old.items():
            k = k.replace(f".{new}.", f".{was}.")
        renamed[k] = v
    save_file(renamed, folder / P.WEIGHTS)
    x = jnp.asarray(REF["ddpm_x"], jnp.float32)
    np.testing.assert_array_equal(P.load_diffusers_unet(folder)(x, 3.0), nets["ddpm"](x, 3.0))


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule.*linear, scaled_linear, squaredcos_cap_v2"),
        ({"prediction_type": "flow"}, "prediction_type.*epsilon, v_prediction, sample"),
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
    ],
)
def test_unsupported_schedulers_are_named(tmp_path, edit, match):
    config = json.loads(
        (DATA / "schedulers" / "linear_epsilon" / "scheduler_config.json").read_text()
    )
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match) as info:
        P.load_diffusers_scheduler(tmp_path)
    assert "scheduler_config.json" in str(info.value)


def test_trained_betas(tmp_path):
    betas = np.linspace(1e-3, 0.3, 20)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"trained_betas": betas.tolist()}))
    process, prediction = P.load_diffusers_scheduler(tmp_path)
    np.testing.assert_allclose(process.betas, betas, rtol=1e-12)
    assert prediction == "eps"
