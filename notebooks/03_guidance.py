# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Guidance
#
# Both kinds of guidance are transformations of a denoiser, so they work with every sampler.
#
# * **Classifier guidance** (Dhariwal & Nichol 2021) adds $w\nabla_x\log p_t(y\mid x_t)$ to the
#   score: $\hat x_0^w = \hat x_0 + w\,\tfrac{\sigma_t^2}{\alpha_t}\nabla_x\log p_t(y\mid x_t)$.
# * **Classifier-free guidance** (Ho & Salimans 2022) mixes a conditional and an unconditional
#   denoiser: $\hat x_0^w = \hat x_0^u + w(\hat x_0^c - \hat x_0^u)$, the two coming from one network
#   trained with labels dropped to a null class.
#
# On a Gaussian mixture whose components are the classes, everything is exact: $p_t(y\mid x_t)$ is
# the component's responsibility, so classifier guidance with $w = 1$ must give the exact
# class-conditional denoiser. Then we train a small class-conditional network and guide it.

# %% Colab: install the package (skipped outside Colab)
# Where pip gets jaxdiff: the package name, your fork ("git+https://github.com/<you>/jaxdiff") or a
# wheel uploaded to the runtime ("/content/jaxdiff-0.1.0-py3-none-any.whl"); see the README.
JAXDIFF_SOURCE = "jaxdiff"

import importlib.util
import shlex
import sys

if "google.colab" in sys.modules and importlib.util.find_spec("jaxdiff") is None:
    get_ipython().run_line_magic("pip", f"install -q {shlex.quote(JAXDIFF_SOURCE)}")  # noqa: F821
    print("Installed jaxdiff and a new jax: restart the runtime (Runtime > Restart) and run again.")

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import jaxdiff
from jaxdiff import analytic, data, guidance, losses, samplers, schedules, training

FAST = os.environ.get("JAXDIFF_FAST", "0") == "1"
process = jaxdiff.VP()

# %% [markdown]
# ## Exact guidance on a mixture

# %%
angles = 2 * np.pi * np.arange(4) / 4
mix = analytic.GaussianMixture(
    jnp.asarray(2.0 * np.stack([np.cos(angles), np.sin(angles)], 1), jnp.float32),
    jnp.full((4,), 0.35),
    jnp.full((4,), 0.25),
)
y = jnp.zeros((512,), jnp.int32)  # ask for class 0 everywhere
log_prob = lambda x, t: mix.class_log_prob(process, x, t, y)  # noqa: E731
x = process.prior_sample((512, 2), key=jax.random.key(0))
t = jnp.full((512,), 0.5)
guided = guidance.classifier(process, mix.denoiser(process), log_prob, 1.0)
conditional = mix.component(0).denoiser(process)
print("max |classifier guidance (w=1) - exact conditional denoiser|:",
      float(jnp.max(jnp.abs(guided(x, t) - conditional(x, t)))))  # fmt: skip

# %%
ts = schedules.karras(process, 20)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.5))
for ax, w in zip(axes, [0.0, 1.0, 3.0, 10.0], strict=True):
    d = guidance.classifier(process, mix.denoiser(process), log_prob, w)
    res = jaxdiff.sample(samplers.heun(process), d, x, ts)
    frac = float(jnp.mean(jnp.argmax(mix.responsibilities(process, res.x, 1e-3), -1) == 0))
    ax.scatter(res.x[:, 0], res.x[:, 1], s=2)
    ax.set_title(f"classifier guidance w = {w}: {100 * frac:.0f}% class 0", fontsize=9)
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
plt.show()

# %% [markdown]
# ## Classifier-free guidance of a trained class-conditional network
#
# A network trained on the 8-component toy mixture with labels, 10% of them replaced by the null
# class (index 8), is both the conditional and the unconditional model.
# `guidance.classifier_free_labels` evaluates it once on the doubled batch $[x, x]$ with labels
# $[y, \varnothing]$ per step.

# %%
train_set = data.toy_2d("gaussian_mixture", 20_000, seed=0)
steps = 100 if FAST else 3000
model = jaxdiff.nets.MLP(2, hidden=128, depth=3, num_classes=8, rngs=nnx.Rngs(0))
opt = training.make_optimizer(2e-3, warmup=steps // 30, decay_steps=steps)
state, graphdef, rest = training.init_train_state(model, opt, key=jax.random.key(1))
step = training.make_train_step(
    graphdef, losses.eps_loss, process, opt, rest=rest, ema_decay=0.995, p_uncond=0.1, null_class=8
)
batch = 256 if FAST else 512
it = data.make_iterator(train_set, batch, seed=0, labels=True)
for _ in range(steps):
    state, m = step(state, next(it))
print("final loss", float(m["loss"]))


def denoise_y(x, t, labels):
    fn = training.model_fn(graphdef, state.ema_params, rest, y=labels)
    return jaxdiff.denoiser(fn, process, "eps")(x, t)


# %%
labels = jnp.arange(800) % 8
x_T = process.prior_sample((800, 2), key=jax.random.key(2))
fig, axes = plt.subplots(1, 4, figsize=(14, 3.5))
for ax, w in zip(axes, [0.0, 1.0, 2.0, 4.0], strict=True):
    d = guidance.classifier_free_labels(denoise_y, labels, w, null_label=8)
    res = jaxdiff.sample(
        samplers.dpm_solver_pp(process), d, x_T, schedules.log_snr_uniform(process, 20)
    )
    # accuracy: is each sample nearest to the mean of its requested class?
    means = 2.0 * np.stack(
        [np.cos(2 * np.pi * np.arange(8) / 8), np.sin(2 * np.pi * np.arange(8) / 8)], 1
    )
    nearest = np.argmin(((np.asarray(res.x)[:, None] - means[None]) ** 2).sum(-1), 1)
    acc = float(np.mean(nearest == np.asarray(labels)))
    ax.scatter(res.x[:, 0], res.x[:, 1], s=2, c=np.asarray(labels), cmap="tab10")
    ax.set_title(f"CFG w = {w}: {100 * acc:.0f}% in the requested class", fontsize=9)
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
plt.show()

# %% [markdown]
# Larger scales push samples towards their class and shrink the spread within it. With large
# scales, multistep solvers can overshoot; `guidance.dynamic_threshold(denoise)` clips the
# denoiser's output to a percentile of its magnitude (Saharia et al. 2022). The scale is a traced
# value: changing it does not recompile the sampler.
