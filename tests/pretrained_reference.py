"""Reference outputs of diffusers' ``UNet2DModel`` and schedulers for checking jaxdiff.pretrained.

No real checkpoint can be downloaded where jaxdiff is tested, so tiny random-weight models of each
supported kind are saved with ``save_pretrained`` and run on fixed inputs. Run once, in a separate
environment with torch and diffusers (it needs neither jax nor jaxdiff)::

    python3 -m venv /tmp/dfenv && /tmp/dfenv/bin/pip install torch diffusers safetensors
    /tmp/dfenv/bin/python tests/pretrained_reference.py

It writes, under ``tests/data/``:

- ``tiny_ddpm/`` a pipeline folder (``unet/``, ``scheduler/``): DownBlock2D + AttnDownBlock2D,
  AttnUpBlock2D + UpBlock2D, the mid block with attention, ``resnet_time_scale_shift="default"``,
  ``flip_sin_to_cos``, heads of width 8; a linear table with ``epsilon`` prediction;
- ``tiny_unet_v/`` a flat folder (``config.json``, weights and ``scheduler_config.json``):
  ``scale_shift``, ``freq_shift=1`` without the flip, one head per attention
  (``attention_head_dim=None``), ``downsample_padding=0``, a mid-block scale factor,
  ``center_input_sample``, two layers per block, 1 -> 2 channels (a learned variance); a cosine
  table with ``v_prediction``;
- ``schedulers/<name>/scheduler_config.json`` for each table and prediction type;
- ``tiny_unet_reference.npz``: inputs (NHWC), timesteps, outputs of each network (NHWC), x0 from
  each model's scheduler (``alphas_cumprod`` of diffusers) and every scheduler's table.

Weights are random (PyTorch's init, then every tensor perturbed, norms included), rounded to
float16 and saved in float16 (half the size; the loader reads them as float32), so the float32
reference is computed with exactly the weights the files hold. ``tests/test_pretrained.py``
compares jaxdiff with these numbers. This module is not a test file.
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
OUT = DATA / "tiny_unet_reference.npz"

DDPM_CONFIG = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
V_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=2,
    block_out_channels=(8, 16),
    layers_per_block=2,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    norm_num_groups=4,
    norm_eps=1e-6,
    attention_head_dim=None,
    resnet_time_scale_shift="scale_shift",
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    mid_block_scale_factor=2**0.5,
    center_input_sample=True,
)
SCHEDULERS = {
    "linear_epsilon": dict(beta_schedule="linear", prediction_type="epsilon"),
    "scaled_linear_sample": dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample"
    ),
    "cosine_v": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    "linear_short": dict(
        beta_schedule="linear", beta_start=1e-3, beta_end=0.05, num_train_timesteps=200
    ),
}
TIMESTEPS = np.array([3.0, 917.0])
FRACTIONAL = np.array([0.5, 500.25])


def perturbed(model, seed):
    """Every parameter plus noise (so norms, biases and transposes all matter), float16-exact."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.05
            p.add_(scale * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())
    return model.eval()


def run(model, x_nhwc, timesteps):
    import torch

    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = model(x, torch.from_numpy(timesteps)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def x0_from(prediction, x, out, abar):
    a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]
    if prediction == "epsilon":
        return (x - s * out) / a
    return a * x - s * out  # v_prediction


def save(model, folder):
    import torch

    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)


def main():
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ref = {"diffusers_version": np.array(version("diffusers"))}
    models = {
        "ddpm": (DDPM_CONFIG, DATA / "tiny_ddpm" / "unet", SCHEDULERS["linear_epsilon"]),
        "v": (V_CONFIG, DATA / "tiny_unet_v", SCHEDULERS["cosine_v"]),
    }
    for i, (name, (config, folder, sched)) in enumerate(models.items()):
        model = perturbed(UNet2DModel(**config), seed=i)
        save(model, folder)
        scheduler = DDPMScheduler(**sched)
        sched_folder = folder.parent / "scheduler" if name == "ddpm" else folder
        scheduler.save_pretrained(sched_folder)
        c = config["in_channels"]
        x = rng.standard_normal((2, 8, 8, c)).astype(np.float32)
        ref[f"{name}_x"] = x
        ref[f"{name}_out"] = run(model, x, TIMESTEPS.astype(np.int64))
        ref[f"{name}_out_fractional"] = run(model, x, FRACTIONAL.astype(np.float32))
        abar = scheduler.alphas_cumprod.numpy().astype(np.float64)[TIMESTEPS.astype(int)]
        ref[f"{name}_x0"] = x0_from(sched["prediction_type"], x, ref[f"{name}_out"][..., :c], abar)
    ref["timesteps"], ref["fractional"] = TIMESTEPS, FRACTIONAL
    for name, sched in SCHEDULERS.items():
        scheduler = DDPMScheduler(**sched)
        scheduler.save_pretrained(DATA / "schedulers" / name)
        ref[f"alphas_cumprod_{name}"] = scheduler.alphas_cumprod.numpy()
    np.savez_compressed(OUT, **ref)
    sizes = {p.relative_to(DATA): p.stat().st_size for p in DATA.rglob("*") if p.is_file()}
    print(json.dumps({str(k): v for k, v in sizes.items() if "fid" not in str(k)}, indent=1))


if __name__ == "__main__":
    main()
