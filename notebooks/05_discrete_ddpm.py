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
# # 5. Discrete-time DDPM: the chain, its variances, its bound, and pretrained models
#
# Ho et al. (2020) define diffusion as a Markov chain over a table $\beta_0, \dots, \beta_{N-1}$:
#
# $$q(x_n \mid x_{n-1}) = \mathcal N\big(\sqrt{1-\beta_n}\,x_{n-1}, \beta_n I\big),\qquad
# q(x_n \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_n}\,x_0, (1-\bar\alpha_n) I\big),\quad
# \bar\alpha_n = \prod_{i\le n}(1-\beta_i).$$
#
# `jaxdiff.DiscreteVP` is the process of such a table (step $n$ sits at time $t_n = (n+1)/N$, as in
# DPM-Solver's discrete noise schedule), so the same object is both a discrete chain
# (`jaxdiff.discrete`) and a continuous VP process whose reverse SDE and probability-flow ODE every
# sampler solves. This notebook covers:
#
# 1. the chain and its posterior $q(x_{n-1}\mid x_n, x_0)$;
# 2. DDPM ancestral sampling as a discretized reverse SDE;
# 3. the reverse variance: $\beta$, $\tilde\beta$, learned (Nichol & Dhariwal 2021) and
#    Analytic-DPM (Bao et al. 2022), measured by the variational bound on Gaussian data;
# 4. respacing 1000 steps to 50 (Improved DDPM, Sec. 4);
# 5. sampling a pretrained diffusers `UNet2DModel` with DPM-Solver++ in 10 steps.

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
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxdiff
from jaxdiff import analytic, discrete, samplers, schedules

jax.config.update("jax_enable_x64", True)
FAST = os.environ.get("JAXDIFF_FAST", "0") == "1"
BATCH = 500 if FAST else 10000
key = jax.random.key(0)

# %% [markdown]
# ## 1. The chain and the posterior
# DDPM's linear table ($\beta$ from $10^{-4}$ to $0.02$ over 1000 steps). Given $x_0$, the
# posterior of one step back is Gaussian (Ho et al. Eq. 6-7):
#
# $$q(x_{n-1}\mid x_n, x_0) = \mathcal N(\tilde\mu_n, \tilde\beta_n I),\quad
# \tilde\mu_n = \frac{\sqrt{\bar\alpha_{n-1}}\beta_n}{1-\bar\alpha_n}x_0
# + \frac{\sqrt{1-\beta_n}(1-\bar\alpha_{n-1})}{1-\bar\alpha_n}x_n,\quad
# \tilde\beta_n = \frac{1-\bar\alpha_{n-1}}{1-\bar\alpha_n}\beta_n.$$
#
# Writing $x_0$ through the noise, $x_0 = (x_n - \sqrt{1-\bar\alpha_n}\,\epsilon)/\sqrt{\bar\alpha_n}$,
# gives Ho et al.'s Eq. 11, $\tilde\mu_n = \frac{1}{\sqrt{1-\beta_n}}\big(x_n -
# \frac{\beta_n}{\sqrt{1-\bar\alpha_n}}\epsilon\big)$: we check both forms agree.

# %%
ddpm = jaxdiff.DiscreteVP.linear()
N = ddpm.n_steps
betas, abar = ddpm.betas, ddpm.alphas_cumprod
print("N =", N, " alpha_bar at the last step:", float(abar[-1]))
print("alpha(t_n)^2 == alpha_bar_n:", bool(jnp.allclose(ddpm.alpha(discrete.step_times(ddpm, jnp.arange(N))) ** 2, abar, rtol=1e-10)))  # fmt: skip

# n + 1 noising steps from x0 compose to q(x_n | x0): the product of the one-step means and the
# recursion var <- (1 - beta) var + beta of the variances
n = 300
x0 = jnp.array([[1.5, -0.5]])
m = np.arange(n + 1)
one_step = discrete.transition(ddpm, discrete.step_times(ddpm, m), discrete.step_times(ddpm, m - 1))  # fmt: skip
mean, var = np.prod(np.asarray(one_step.alpha)) * np.asarray(x0[0]), 0.0
for beta in np.asarray(one_step.beta):
    var = (1 - beta) * var + beta
print(f"after {n + 1} steps: mean {mean.round(6)} vs sqrt(abar) x0 "
      f"{np.asarray(jnp.sqrt(abar[n]) * x0[0]).round(6)}; var {var:.6f} vs 1 - abar "
      f"{float(1 - abar[n]):.6f}")  # fmt: skip

# the posterior mean through x0 equals Ho et al.'s Eq. 11 through eps
eps = jax.random.normal(key, (4, 2))
x_n = jnp.sqrt(abar[n]) * x0 + jnp.sqrt(1 - abar[n]) * eps
mu, beta_tilde = discrete.posterior(ddpm, x_n, x0, discrete.step_times(ddpm, n), discrete.step_times(ddpm, n - 1))  # fmt: skip
mu_eq11 = (x_n - betas[n] / jnp.sqrt(1 - abar[n]) * eps) / jnp.sqrt(1 - betas[n])
print("max |mu_tilde - Eq. 11|:", float(jnp.max(jnp.abs(mu - mu_eq11))))
print(f"step {n}: beta = {float(betas[n]):.3e}, beta_tilde = {float(beta_tilde):.3e}")

# %% [markdown]
# $\tilde\beta_n \le \beta_n$, and the two agree except in the first few steps: Ho et al. found
# either choice gives similar samples with 1000 steps. The difference matters with few steps and for
# the likelihood (Sections 3-4).

# %%
steps = np.arange(1, N)
tr = discrete.transition(ddpm, discrete.step_times(ddpm, steps), discrete.step_times(ddpm, steps - 1))  # fmt: skip
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].plot(steps, np.asarray(tr.beta), label=r"$\beta_n$")
ax[0].plot(steps, np.asarray(tr.beta_tilde), "--", label=r"$\tilde\beta_n$")
ax[0].set_xlabel("step n")
ax[0].legend()
ax[1].semilogx(steps, np.asarray(tr.beta_tilde / tr.beta))
ax[1].set_xlabel("step n")
ax[1].set_ylabel(r"$\tilde\beta_n / \beta_n$")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Ancestral sampling is a discretization of the reverse SDE
# The reverse step $p(x_{n-1}\mid x_n) = \mathcal N(\tilde\mu_n(x_n, \hat x_0), \Sigma_n)$ with
# $\hat x_0$ the denoiser's output is DDPM's sampler (`samplers.discrete_ddpm`). Song et al. (2021)
# show it is a discretization of the reverse SDE
# $dx = [f(t)x - g^2(t)\nabla\log p_t(x)]\,dt + g(t)\,d\bar W$ of the same `DiscreteVP`, which
# Euler-Maruyama solves on the same 1000-step grid. Both should reproduce a 2-D Gaussian mixture
# whose denoiser is exact. Started from the same $x_T$ with the same noise draws, the two paths
# nearly coincide.

# %%
means = jnp.array([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
scales, weights = jnp.full((4,), 0.35), jnp.array([0.1, 0.2, 0.3, 0.4])
mix = analytic.GaussianMixture(means, scales, weights)
true_mean = weights @ means
true_cov = (weights[:, None, None] * (means[:, :, None] * means[:, None, :])).sum(0) + jnp.sum(weights * scales**2) * jnp.eye(2) - jnp.outer(true_mean, true_mean)  # fmt: skip
denoise = mix.denoiser(ddpm)
x_T = ddpm.prior_sample((BATCH, 2), key=jax.random.key(1), dtype=jnp.float64)
ts = discrete.grid(ddpm)  # the 1000 steps, then t = 0
out = {
    "DDPM chain (beta_tilde)": jaxdiff.sample(
        samplers.discrete_ddpm(ddpm), denoise, x_T, ts, key=jax.random.key(2)
    ).x,  # fmt: skip
    "Euler-Maruyama (reverse SDE)": jaxdiff.sample(
        samplers.euler_maruyama(ddpm), denoise, x_T, ts, key=jax.random.key(2)
    ).x,  # fmt: skip
}


def moment_error(x):
    """Distance of the sample mean and covariance to the target's."""
    m, c = jnp.mean(x, 0), jnp.cov(x.T)
    return float(jnp.linalg.norm(m - true_mean)), float(jnp.linalg.norm(c - true_cov))


print("target mean", np.asarray(true_mean).round(3), " cov", np.asarray(true_cov).round(3).tolist())
for name, x in out.items():
    print(f"{name:30s} mean {np.asarray(x.mean(0)).round(3)}  cov {np.asarray(jnp.cov(x.T)).round(3).tolist()}")  # fmt: skip
print(f"difference between the two samplers' means: {float(jnp.linalg.norm(out['DDPM chain (beta_tilde)'].mean(0) - out['Euler-Maruyama (reverse SDE)'].mean(0))):.3f} "
      f"(Monte Carlo error ~ {float(jnp.sqrt(jnp.trace(true_cov) / BATCH)):.3f})")  # fmt: skip

fig, ax = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
for a, (name, x) in zip(ax, out.items(), strict=True):
    a.scatter(*np.asarray(x[:1000]).T, s=2, alpha=0.5)
    a.set_title(name, fontsize=9)
plt.show()

# %% [markdown]
# ## 3. Which reverse variance? beta, beta_tilde, learned, Analytic-DPM
# The reverse step's variance $\Sigma_n$ is free. Ho et al. used $\beta_n$ (`FixedLarge`, optimal
# when $x_0 \sim \mathcal N(0, I)$) or $\tilde\beta_n$ (`FixedSmall`, optimal for a single point
# $x_0$). Improved DDPM learns an interpolation in the log domain,
# $\Sigma_\theta = \exp(v\log\beta_n + (1-v)\log\tilde\beta_n)$ (`Learned`), and Analytic-DPM
# computes the optimum from the denoiser itself:
# $\Sigma_n^* = \tilde\beta_n + c_0^2\frac{\sigma_t^2}{\alpha_t^2}(1 - \Gamma_n)$ with
# $\Gamma_n = \frac1d\mathbb E\|\hat\epsilon(x_n, n)\|^2$, estimated by Monte Carlo (`AnalyticDPM`).
#
# The variance is invisible with 1000 steps but decides sample quality with few: sample the
# mixture with 10 respaced steps and measure the moments.

# %%
few = discrete.respaced_steps(N, 10)
ts_few = discrete.grid(ddpm, few)
data = mix.sample(BATCH, key=jax.random.key(3))
variances = {
    "FixedLarge (beta)": discrete.FixedLarge(),
    "FixedSmall (beta_tilde)": discrete.FixedSmall(),
    "AnalyticDPM": discrete.analytic_dpm(ddpm, denoise, data, key=jax.random.key(4), steps=few),
}
print(f"{'10 steps':26s} |mean err|  |cov err|")
for name, var in variances.items():
    x = jaxdiff.sample(samplers.discrete_ddpm(ddpm, var), denoise, x_T, ts_few, key=jax.random.key(5)).x  # fmt: skip
    print(f"{name:26s} {moment_error(x)[0]:9.3f}  {moment_error(x)[1]:9.3f}")

# %% [markdown]
# ## 4. The variational bound on Gaussian data
# The negative log-likelihood is bounded by a sum of per-step terms (Ho et al. Eq. 5):
#
# $$-\log p_\theta(x_0) \le \underbrace{\mathrm{KL}(q(x_N\mid x_0)\,\|\,p(x_N))}_{L_N}
# + \sum_{n\ge1}\underbrace{\mathrm{KL}(q(x_{n-1}\mid x_n,x_0)\,\|\,p_\theta(x_{n-1}\mid x_n))}_{L_n}
# \underbrace{-\log p_\theta(x_0\mid x_1)}_{L_0}.$$
#
# On Gaussian data the denoiser is exact, so the only slack is the variance choice and the number
# of steps. `discrete.bits_per_dim` sums the terms (one Monte Carlo draw of $x_n$ per term); the
# exact NLL comes from the Gaussian's density. A respaced chain (`discrete.respace`) has its own
# $\beta'$ table, so the same functions give its bound. The learned variance is shown with a constant
# $v$; a trained network picks $v$ per step and per dimension, and the best choice is Analytic-DPM's
# variance. With few steps $\tilde\beta$ is far too small for data that is not a point mass, and
# the bound explodes.

# %%
gauss = analytic.Gaussian(jnp.zeros(2), jnp.diag(jnp.array([0.05, 0.5])))
x0 = gauss.sample(256 if FAST else 2048, key=jax.random.key(6))
nll = -jnp.mean(gauss.logp(ddpm, x0, jnp.zeros(())) / (2 * np.log(2.0)))
print(f"exact NLL: {float(nll):.4f} bits/dim")
counts = (10,) if FAST else (10, 50, 200, 1000)
vs = (0.5,) if FAST else (0.25, 0.5, 0.75)
names = ["beta", "beta~"] + [f"v={v}" for v in vs] + ["analytic"]
print(f"{'steps':>5s} " + " ".join(f"{k:>9s}" for k in names))
for count in counts:
    chain = discrete.respace(ddpm, discrete.respaced_steps(N, count)) if count < N else ddpm
    d = gauss.denoiser(chain)
    var = {
        "beta": discrete.FixedLarge(),
        "beta~": discrete.FixedSmall(),
        **{
            f"v={v}": discrete.Learned(lambda x, t, v=v: jnp.full_like(x, v)) for v in vs
        },  # fmt: skip
        "analytic": discrete.analytic_dpm(chain, d, x0, key=jax.random.key(7)),
    }
    bpd = {k: float(jnp.mean(discrete.bits_per_dim(chain, d, v, x0, key=jax.random.key(8)))) for k, v in var.items()}  # fmt: skip
    print(f"{count:5d} " + " ".join(f"{b:9.4f}" for b in bpd.values()))

# %% [markdown]
# ## 5. Respacing: 1000 steps to 50
# Improved DDPM samples a subset $s_0 < \dots < s_{K-1}$ of the steps with the betas recomputed
# from the kept $\bar\alpha$: $\beta'_k = 1 - \bar\alpha_{s_k}/\bar\alpha_{s_{k-1}}$. In jaxdiff
# this is either a new table (`discrete.respace`) or the original process on the sub-grid
# (`discrete.grid(process, steps)`): the two give the same samples.

# %%
kept = discrete.respaced_steps(N, 50)
short = discrete.respace(ddpm, kept)
print("kept steps:", kept[:5], "...", kept[-3:])
print("alpha_bar of the respaced table == kept alpha_bar:", bool(jnp.allclose(short.alphas_cumprod, abar[kept], rtol=1e-10)))  # fmt: skip
a = jaxdiff.sample(samplers.discrete_ddpm(short), mix.denoiser(short), x_T, discrete.grid(short), key=jax.random.key(9)).x  # fmt: skip
b = jaxdiff.sample(samplers.discrete_ddpm(ddpm), denoise, x_T, discrete.grid(ddpm, kept), key=jax.random.key(9)).x  # fmt: skip
print("max |respaced table - sub-grid| over the samples:", float(jnp.max(jnp.abs(a - b))))
print("50-step moment error (mean, cov):", tuple(round(e, 3) for e in moment_error(b)))

# %% [markdown]
# Every other sampler runs on the same `DiscreteVP`: DPM-Solver++ on a log-SNR-uniform grid of the
# discrete schedule reaches the mixture in 10 steps without any noise.

# %%
x = jaxdiff.sample(samplers.dpm_solver_pp(ddpm), denoise, x_T, schedules.log_snr_uniform(ddpm, 10)).x  # fmt: skip
print("DPM-Solver++ 10 steps, moment error (mean, cov):", tuple(round(e, 3) for e in moment_error(x)))  # fmt: skip

# %% [markdown]
# ## 6. A pretrained diffusers model
# `jaxdiff.pretrained.load_diffusers(folder)` reads a diffusers `UNet2DModel` folder (weights with
# `safetensors`, no torch) and its `scheduler_config.json` (the beta table as a `DiscreteVP`) into a
# denoiser for every sampler. jaxdiff never downloads weights: fetch a model yourself, e.g.
# `huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10`, and set
# `MODEL_FOLDER` below. With `None` the notebook uses the tiny random test model of the repository
# (`tests/data/tiny_ddpm`, 8x8 images of noise: it shows the mechanics, not a picture); on Colab
# without the repository the section is skipped. The tiny model's weights are random, so its
# "images" lie far outside $[-1, 1]$.

# %%
MODEL_FOLDER = None  # e.g. "ddpm-cifar10"

if MODEL_FOLDER is None:
    candidates = [Path(p) / "tests/data/tiny_ddpm" for p in (".", "..")]
    folder = next((p for p in candidates if p.is_dir()), None)
else:
    folder = Path(MODEL_FOLDER)
if folder is None or not folder.is_dir():
    print("No model folder found (tests/data/tiny_ddpm is in the repository): skipping this section.")  # fmt: skip
else:
    model = jaxdiff.pretrained.load_diffusers(folder)
    p = model.process
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads((cfg_path if cfg_path.is_file() else folder / "config.json").read_text())
    res_px, ch = int(cfg["sample_size"]), int(cfg["in_channels"])
    n_images = 4
    x_T_img = p.prior_sample((n_images, res_px, res_px, ch), key=jax.random.key(10), dtype=jnp.float32)  # fmt: skip
    images = jaxdiff.sample(samplers.dpm_solver_pp(p), model, x_T_img, schedules.log_snr_uniform(p, 10)).x  # fmt: skip
    print(f"{folder}: {p.n_steps}-step table, {n_images} images of shape {images.shape[1:]}, "
          f"range [{float(images.min()):.2f}, {float(images.max()):.2f}], finite: {bool(jnp.all(jnp.isfinite(images)))}")  # fmt: skip
    if MODEL_FOLDER is not None:
        fig, ax = plt.subplots(1, n_images, figsize=(2 * n_images, 2))
        for a, im in zip(ax, np.asarray(images), strict=True):
            a.imshow(np.clip((im + 1) / 2, 0, 1).squeeze())
            a.axis("off")
        plt.show()
