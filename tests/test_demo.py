"""The main job in its fast mode: trains, samples with every sampler, writes figures and report."""

import json

import numpy as np

from experiments import demo


def test_demo_fast_writes_outputs_and_numbers(tmp_path):
    out = tmp_path / "demo"
    result = demo.run_demo(demo.DemoConfig(workdir=str(out), fast=True, steps=50, num_samples=128))
    labels = {r["sampler"] for r in result["rows"]}
    assert labels == {s.label for s in demo.SAMPLERS} | {"PF-ODE (diffrax Tsit5)"}
    # exact NFE accounting: DDIM on n steps uses n evaluations, Heun 2n - 1, DPM-Solver-3 3n - 2
    nfe = {(r["sampler"], r["target"]): r["nfe"] for r in result["rows"]}
    assert nfe[("DDIM", 10)] == 10 and nfe[("Heun", 10)] == 9 and nfe[("DPM-Solver-3", 10)] == 10
    # DDPM from an (under)trained model still lands near the data: SW2 well below the prior's
    ddpm = [r["quality"] for r in result["rows"] if r["sampler"] == "DDPM"]
    assert np.all(np.isfinite(ddpm)) and min(ddpm) < 1.0
    for name in ("report.md", "results.json", "quality_vs_nfe.png", "trajectories.png"):
        assert (out / name).stat().st_size > 0
    assert len(list(out.glob("samples_*.png"))) == 8
    # DDIM on the GITS grid fitted to the model is no worse than on the uniform grid at NFE 10
    quality = {(r["sampler"], r["target"]): r["quality"] for r in result["rows"]}
    assert nfe[("DDIM on GITS", 10)] == 10
    assert quality[("DDIM on GITS", 10)] < quality[("DDIM", 10)], quality
    assert json.loads((out / "results.json").read_text())["data_floor"] < 0.2
    assert (out / "model" / "checkpoints").is_dir()
