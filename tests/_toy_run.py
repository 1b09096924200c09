"""The tiny training run shared by the script tests (not a test module)."""


def tiny_toy_args(*, log_every: int, save_every: int) -> list[str]:
    """Command-line arguments of ``experiments.train`` for a tiny MLP on 512 moons points,
    logging every ``log_every`` steps and writing sample PNGs and checkpoints every
    ``save_every``; add ``--steps`` and ``--workdir``."""
    return [
        "--preset", "toy2d", "--model.hidden", "16", "--model.depth", "1",
        "--data.num-examples", "512", "--batch-size", "64", "--warmup", "5",
        "--log-every", str(log_every), "--sample-every", str(save_every),
        "--checkpoint-every", str(save_every), "--num-samples", "64", "--sample-steps", "5",
        "--no-progress",
    ]  # fmt: skip
