"""Classifier-free guidance on digits: class accuracy of generated digits against the guidance scale.

``python -m experiments.guidance_digits --workdir runs/guidance_digits --steps 4000``

1. Trains (or resumes) the ``digits`` preset of :mod:`experiments.train`: a class-conditional
   U-Net on scikit-learn's 8x8 digits with label dropout to a null class (``p_uncond``), in the
   run folder ``--workdir``.
2. Samples ``--per-class`` digits of every class at each guidance scale (``--scales``, default
   0 1 2 4) with :func:`jaxdiff.guidance.classifier_free_labels` from the same initial noise. The
   scale is a traced argument: the sampler compiles once for all scales.
3. Judges them with :func:`jaxdiff.metrics.digits_classifier` (an MLP trained on the real digits,
   cached under ``--cache-dir``): class accuracy (fraction classified as the requested digit) and
   the Frechet distance of its features to the real digits (:func:`jaxdiff.metrics.fd_classifier`).
4. Writes ``guidance_grid.png`` (one panel per scale, one row per class), ``guidance.md`` (a
   markdown table) and ``guidance.json`` to the run folder.

Scale 0 is the unconditional model (accuracy near 10%, chance), scale 1 the conditional one;
larger scales trade diversity (Frechet distance) for class fidelity (Ho & Salimans 2022).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from experiments import configs
from experiments import sample as sampling
from experiments import train as training_script
from jaxdiff import metrics

__all__ = ["main", "evaluate_scales", "write_grid", "markdown_table"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="runs/guidance_digits", help="run folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    p.add_argument("--per-class", type=int, default=50, help="samples per class and scale")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="feature classifier cache (~/.cache/jaxdiff)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def train_digits(workdir: str, steps: int | None, *, progress: bool):
    """Train or resume the conditional ``digits`` preset in ``workdir``; return the loaded run."""
    config = configs.get_preset("digits")
    config = dataclasses.replace(
        config,
        workdir=workdir,
        steps=steps or config.steps,
        sample_every=max(steps or config.steps, 1),
        progress=progress,
    )
    training_script.train(config)
    return sampling.load_run(workdir)


def evaluate_scales(run, classifier, real, scales, *, per_class, sampler, steps, seed):
    """Samples, accuracy and feature Frechet distance at each scale (same noise for all).

    The sampler is built once: a new factory call makes new closures, which ``jaxdiff.sample``
    would compile again; with one sampler only the traced scale changes between scales.
    """
    labels = jnp.repeat(jnp.arange(run.num_classes), per_class)
    key = jax.random.key(seed)
    x_T = run.process.prior_sample((labels.shape[0], *run.shape), key=jax.random.fold_in(key, 0))
    ts = sampling.make_grid("uniform", run.process, steps)
    sampler_ = sampling.make_sampler(sampler, run.process)
    rows = []
    for w in scales:
        start = time.perf_counter()
        denoise = sampling.run_denoiser(run, labels=labels, guidance_scale=w)
        res = jaxdiff.sample(sampler_, denoise, x_T, ts, key=jax.random.fold_in(key, 1))
        x = np.asarray(res.x)
        seconds = time.perf_counter() - start
        acc = metrics.classifier_accuracy(classifier, x, labels)
        fd = metrics.fd_classifier(x, real, classifier)
        row = dict(scale=w, accuracy=acc, fd_classifier=fd, nfe=int(res.nfe), seconds=seconds)
        rows.append(row | {"samples": x})
    return rows


def write_grid(path: Path, rows, num_classes: int, per_class: int, columns: int = 10):
    """One panel per scale; in each, row ``k`` shows ``columns`` samples of class ``k``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(columns, per_class)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.8), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        x = row["samples"].reshape(num_classes, per_class, *row["samples"].shape[1:])[:, :cols]
        h, w = x.shape[2:4]
        img = (
            np.clip((x[..., 0] + 1) / 2, 0, 1)
            .transpose(0, 2, 1, 3)
            .reshape(num_classes * h, cols * w)
        )
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"w = {row['scale']:g}, acc {row['accuracy']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks(
            np.arange(num_classes) * h + h / 2 - 0.5, [str(k) for k in range(num_classes)]
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows, *, steps: int, sampler: str, per_class: int) -> str:
    lines = [
        f"# Classifier-free guidance on digits ({steps} training steps)",
        "",
        f"{sampler}, {rows[0]['nfe']} NFE per sample (each NFE evaluates the doubled batch), "
        f"{per_class} samples per class; judged by `jaxdiff.metrics.digits_classifier`.",
        "",
        "| guidance scale | class accuracy | FD (classifier features) | sampling seconds |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']:g} | {r['accuracy']:.3f} | {r['fd_classifier']:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    workdir = Path(args.workdir)
    run = train_digits(str(workdir), args.steps, progress=not args.no_progress)
    classifier = metrics.digits_classifier(cache_dir=args.cache_dir)
    real, real_labels = metrics.digits_data()
    real_acc = metrics.classifier_accuracy(classifier, real, real_labels)
    rows = evaluate_scales(
        run, classifier, real, args.scales, per_class=args.per_class, sampler=args.sampler,
        steps=args.sample_steps, seed=args.seed,
    )  # fmt: skip
    write_grid(workdir / "guidance_grid.png", rows, run.num_classes, args.per_class)
    steps = int(run.state.step)
    table = markdown_table(rows, steps=steps, sampler=args.sampler, per_class=args.per_class)
    table += f"\nClassifier accuracy on the real digits (its training set): {real_acc:.3f}.\n"
    (workdir / "guidance.md").write_text(table)
    summary = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    (workdir / "guidance.json").write_text(
        json.dumps({"train_steps": steps, "rows": summary}, indent=2)
    )
    print(table)
    return summary


if __name__ == "__main__":
    main()
