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
# # 4. A geometric perspective on diffusion sampling
#
# Chen et al., "A Geometric Perspective on Diffusion Models" (arXiv 2305.19947), write the
# probability-flow ODE in EDM coordinates $\tilde x = x/\alpha_t$, $\tilde\sigma = \sigma_t/\alpha_t$:
# $d\tilde x / d\tilde\sigma = (\tilde x - D(x_t, t))/\tilde\sigma$. They find that
#
# 1. the **sampling trajectory** $\{\tilde x_t\}$ is quasi-linear: it barely leaves the chord from
#    $x_T$ to $x_0$;
# 2. the **denoising trajectory** $\{D(x_t, t)\}$ reaches the final sample much sooner;
# 3. the **optimal denoiser** of a finite data set is one mean-shift step with bandwidth
#    $\tilde\sigma$, so DDIM with it is annealed mean shift, and the ODE then ends on a training
#    point (memorization).
#
# The follow-up, "On the Trajectory Regularity of ODE-based Diffusion Sampling" (GITS, ICML 2024),
# uses this regularity to pick a time grid by dynamic programming. We reproduce each finding on an
# exact target.

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

import jaxdiff
from jaxdiff import analytic, fitted_grids, geometry, samplers, schedules

jax.config.update("jax_enable_x64", True)
FAST = os.environ.get("JAXDIFF_FAST", "0") == "1"
edm = jaxdiff.EDM()
dim = 16
key = jax.random.key(0)
means = 3.0 * jax.random.normal(key, (6, dim))
mix = analytic.GaussianMixture(means, jnp.full((6,), 0.5), jnp.full((6,), 1 / 6))
denoise = mix.denoiser(edm)
x_T = edm.prior_sample((64, dim), key=jax.random.key(1), dtype=jnp.float64)
ts = schedules.karras(edm, 40)
res = jaxdiff.sample(samplers.heun(edm), denoise, x_T, ts, save_trajectory=True)

# %% [markdown]
# ## 1. Sampling trajectories are quasi-linear

# %%
dev = geometry.chord_deviation(res)
stats = geometry.trajectory_stats(res)
print(f"largest distance from the chord, relative to its length: mean over trajectories "
      f"{float(stats.max_chord_deviation):.4f}, worst {float(stats.worst_chord_deviation):.4f}")  # fmt: skip
print(
    f"variance explained by each trajectory's first two directions: {float(stats.explained_2d):.4f}"
)
sig = np.asarray(ts[:-1])
plt.figure(figsize=(5.5, 3.5))
plt.semilogx(sig, np.asarray(dev.relative[:-1]), color="C0", alpha=0.2)
plt.xlabel("noise level sigma")
plt.ylabel("distance to chord / chord length")
plt.gca().invert_xaxis()
plt.show()

# %% [markdown]
# ## 2. The denoising trajectory converges first

# %%
d_sampling = geometry.distance_to_final(res.xs, res.x)
d_denoising = geometry.distance_to_final(res.denoised, res.x)
plt.figure(figsize=(5.5, 3.5))
plt.semilogx(sig, np.asarray(d_sampling[:-1]).mean(1), label="sampling x_t")
plt.semilogx(sig, np.asarray(d_denoising).mean(1), label="denoising D(x_t)")
plt.gca().invert_xaxis()
plt.xlabel("noise level sigma")
plt.ylabel("distance to the final sample")
plt.legend()
plt.show()
half = len(sig) // 2
print(f"halfway (sigma = {sig[half]:.2f}): sampling {float(d_sampling[half].mean()):.2f}, "
      f"denoising {float(d_denoising[half].mean()):.2f}")  # fmt: skip

# %%
proj = geometry.project_2d(res.xs[:, :8], joint=True)
plt.figure(figsize=(4.5, 4.5))
for j in range(8):
    c = np.asarray(proj.coords[:, j])
    plt.plot(c[:, 0], c[:, 1], "-", lw=1)
    plt.plot(c[-1, 0], c[-1, 1], "k.")
plt.title("sampling trajectories, 2-D projection")
plt.show()

# %% [markdown]
# ## 3. The optimal denoiser is mean shift; the ODE then memorizes

# %%
data = jax.random.normal(jax.random.key(2), (40, dim))
optimal = geometry.optimal_denoiser(data, edm)
x = edm.prior_sample((16, dim), key=jax.random.key(3), dtype=jnp.float64)
sigma = 5.0
print("max |D*(x, sigma) - mean_shift(x, bandwidth sigma)|:",
      float(jnp.max(jnp.abs(optimal(x, jnp.full((16,), sigma)) - geometry.mean_shift(data, x, sigma)))))  # fmt: skip
out = jaxdiff.sample(samplers.heun(edm), optimal, x, schedules.karras(edm, 40)).x
nearest = jnp.min(jnp.linalg.norm(out[:, None] - data[None], axis=-1), axis=1)
print("distance of each sample to its nearest training point (max):", float(nearest.max()))

# %% [markdown]
# ## GITS: a time grid from the trajectory's regularity
#
# The cost of a coarse DDIM step is measured against a fine teacher trajectory from a few warm-up
# samples, and dynamic programming picks the cheapest `n`-step path. Errors are measured on fresh
# samples.
#
# By default each local error is weighted by how much of it the flow carries to the final sample,
# $w = s/\sqrt{s^2 + \tilde\sigma^2}$ (exact for Gaussian data of standard deviation $s$,
# `fitted_grids.propagated_error`). The paper's unweighted cost (`error=fitted_grids.local_error`)
# picks nearly the same grids for an accurate denoiser, but for an eps-prediction network on VP,
# whose denoiser error grows like $\tilde\sigma$, it spends its steps at the highest noise levels
# and can lose to a hand-made grid.

# %%
warm = edm.prior_sample((16 if FAST else 64, dim), key=jax.random.key(4), dtype=jnp.float64)
test = edm.prior_sample((128, dim), key=jax.random.key(5), dtype=jnp.float64)
teacher = jaxdiff.sample(samplers.heun(edm), denoise, test, schedules.karras(edm, 200)).x
ddim = samplers.ddim(edm)
nfes = (5, 6) if FAST else (5, 6, 8, 10)
# one teacher solve and cost matrix serve every step count
costs = fitted_grids.step_costs(edm, denoise, warm, fine_steps=60 if FAST else 120)
for n in nfes:
    grids = {
        "uniform": schedules.uniform(edm, n),
        "log-SNR": schedules.log_snr_uniform(edm, n),
        "Karras": schedules.karras(edm, n),
        "GITS": costs.grid(n),
    }
    errs = {k: float(jnp.mean(jnp.linalg.norm(jaxdiff.sample(ddim, denoise, test, g).x - teacher, axis=-1)))
            for k, g in grids.items()}  # fmt: skip
    print(f"NFE {n}: DDIM error " + ", ".join(f"{k} {v:.3f}" for k, v in errs.items()))
