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
# # 1. Diffusion models as differential equations
#
# A diffusion model is a Gaussian path $x_t = \alpha_t x_0 + \sigma_t \epsilon$ from data ($t=0$) to
# noise ($t_{max}$). This notebook shows, with an exact target (a Gaussian mixture whose score is known
# in closed form), the four equations behind it:
#
# 1. the **conditional** path as an ODE and as an SDE (one data point $x_0$);
# 2. the **marginal** forward SDE/ODE carrying the whole data distribution to the Gaussian prior;
# 3. the **reverse SDE** and the **probability-flow ODE**, both driven by the marginal score;
# 4. **noise prediction = denoising score matching = explicit score matching up to constants**.
#
# References: Song et al. 2021 (*Score-Based Generative Modeling through SDEs*), Karras et al. 2022
# (*Elucidating the Design Space*), Vincent 2011 (*A connection between score matching and denoising
# autoencoders*).

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

import diffrax
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxdiff
from jaxdiff import analytic, losses, samplers, schedules, sde

jax.config.update("jax_enable_x64", True)
FAST = os.environ.get("JAXDIFF_FAST", "0") == "1"
N = 500 if FAST else 2000
key = jax.random.key(0)

# %% [markdown]
# ## The target and the process
# A 2-D mixture of four Gaussians; the VP process (DDPM's linear $\beta$).

# %%
process = jaxdiff.VP()
means = jnp.array([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
target = analytic.GaussianMixture(means, jnp.full((4,), 0.35), jnp.array([0.1, 0.2, 0.3, 0.4]))
data = target.sample(N, key=key)
print("alpha, sigma at t=0.5:", float(process.alpha(0.5)), float(process.sigma(0.5)))
print("f, g^2 at t=0.5:", float(process.f(0.5)), float(process.g2(0.5)))

# %% [markdown]
# ## 1. The conditional path: ODE and SDE
# For one data point the path is Gaussian. The **conditional ODE**
# $\dot x = \dot\alpha_t x_0 + \frac{\dot\sigma_t}{\sigma_t}(x - \alpha_t x_0)$ moves a sample along
# $x_t = \alpha_t x_0 + \sigma_t\epsilon$ with a *fixed* $\epsilon$; the **forward SDE**
# $dx = f(t) x\,dt + g(t)\,dW$ has the same marginals $\mathcal N(\alpha_t x_0, \sigma_t^2 I)$.

# %%
x0 = jnp.array([[2.0, 2.0]])
eps = jax.random.normal(jax.random.key(1), (16, 2))
t_a, t_b = 0.05, process.t_max
term = diffrax.ODETerm(lambda t, x, _: process.conditional_velocity(x, x0, t))
x_a = process.marginal(jnp.repeat(x0, 16, 0), eps, t_a)
ts_plot = jnp.linspace(t_a, t_b, 60)
sol = diffrax.diffeqsolve(
    term,
    diffrax.Tsit5(),
    t_a,
    t_b,
    0.01,
    x_a,
    saveat=diffrax.SaveAt(ts=ts_plot),
    stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
)
exact_end = process.marginal(jnp.repeat(x0, 16, 0), eps, t_b)
print(
    "conditional ODE end vs alpha x0 + sigma eps:", float(jnp.max(jnp.abs(sol.ys[-1] - exact_end)))
)


def forward_sde_paths(x_start, t_grid, key):
    """Euler-Maruyama for dx = f x dt + g dW on a grid (a plain scan)."""

    def step(x, inp):
        (t, t_next), k = inp
        dt = t_next - t
        dw = jnp.sqrt(dt) * jax.random.normal(k, x.shape)
        x = x + process.drift(x, t) * dt + process.diffusion(t) * dw
        return x, x

    pairs = (t_grid[:-1], t_grid[1:])
    keys = jax.random.split(key, t_grid.shape[0] - 1)
    return jax.lax.scan(step, x_start, (pairs, keys))[1]


sde_paths = forward_sde_paths(x_a, ts_plot, jax.random.key(2))
fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, paths, name in [(axes[0], sol.ys, "conditional ODE"), (axes[1], sde_paths, "forward SDE")]:
    ax.plot(ts_plot[: paths.shape[0]], paths[:, :, 0], lw=0.8)
    ax.plot(ts_plot, process.alpha(ts_plot) * 2.0, "k--", label=r"$\alpha_t x_0$")
    ax.set_title(name)
    ax.set_xlabel("t")
axes[0].legend()
plt.show()

# %% [markdown]
# ## 2. The marginal forward SDE takes the data to the prior
# Averaged over the data, the same SDE carries the whole mixture to $\mathcal N(0, I)$; its marginal
# $p_t$ is again a mixture (`target.logp(process, x, t)`) and we compare histograms with it.

# %%
t_grid = jnp.linspace(0.0, process.t_max, 200)
paths = forward_sde_paths(data, t_grid, jax.random.key(3))
fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
for ax, idx in zip(axes, [0, 20, 60, 198], strict=True):
    t = float(t_grid[idx + 1])
    ax.hist(np.asarray(paths[idx, :, 0]), bins=50, density=True, alpha=0.5, label="SDE samples")
    grid = jnp.linspace(-5, 5, 201)
    # marginal density of the first coordinate: integrate the 2-D density over the second
    xx, yy = jnp.meshgrid(grid, grid, indexing="ij")
    pts = jnp.stack([xx.ravel(), yy.ravel()], -1)
    dens = jnp.exp(target.logp(process, pts, t)).reshape(201, 201).sum(1) * (grid[1] - grid[0])
    ax.plot(grid, dens, "k", label="exact $p_t$")
    ax.set_title(f"t = {t:.2f}")
axes[0].legend()
plt.show()
print("sample mean/var at t_max:", np.asarray(paths[-1].mean(0)), np.asarray(paths[-1].var(0)))

# %% [markdown]
# ## 3. Reverse SDE and probability-flow ODE
# Both run from the prior back to the data with the marginal score
# $\nabla\log p_t = (\alpha_t D(x,t) - x)/\sigma_t^2$, here exact:
#
# - reverse SDE: $dx = [f x - g^2 \nabla\log p_t]\,dt + g\,d\bar W$ (DDPM discretizes it),
# - probability-flow ODE: $dx = [f x - \tfrac12 g^2 \nabla\log p_t]\,dt$ (DDIM discretizes it).

# %%
denoise = target.denoiser(process)
x_T = process.prior_sample((N, 2), key=jax.random.key(4), dtype=jnp.float64)
ts = schedules.log_snr_uniform(process, 100)
ode = jaxdiff.sample(samplers.ddim(process), denoise, x_T, ts, save_trajectory=True)
rsde = jaxdiff.sample(
    samplers.ddpm(process), denoise, x_T, ts, key=jax.random.key(5), save_trajectory=True
)
ode_diffrax = sde.solve_ode(process, denoise, x_T)

fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
axes[0].scatter(*np.asarray(data).T, s=2, alpha=0.5)
axes[0].set_title("data")
for ax, res, name in [(axes[1], rsde, "reverse SDE (DDPM)"), (axes[2], ode, "PF-ODE (DDIM)")]:
    ax.scatter(*np.asarray(res.x).T, s=2, alpha=0.5)
    for j in range(12):
        ax.plot(*np.asarray(res.xs[:, j]).T, lw=0.6, color="k", alpha=0.6)
    ax.set_title(name)
for ax in axes:
    ax.set_xlim(-4.5, 4.5)
    ax.set_ylim(-4.5, 4.5)
plt.show()
print(
    "DDIM (100 steps) vs diffrax PF-ODE end points, max |diff| at t_min:",
    float(jnp.max(jnp.abs(ode.xs[-2] - ode_diffrax.ys[-1]))),
)
print(
    "means: data",
    np.asarray(data.mean(0)),
    "SDE",
    np.asarray(rsde.x.mean(0)),
    "ODE",
    np.asarray(ode.x.mean(0)),
)

# %% [markdown]
# ## 4. Noise prediction = score matching up to a constant
# For a network $\hat\epsilon_\theta$ with score $s_\theta = -\hat\epsilon_\theta/\sigma_t$:
#
# $$\sigma_t^2\,\mathbb E\|s_\theta(x_t) + \epsilon/\sigma_t\|^2 = \mathbb E\|\hat\epsilon_\theta - \epsilon\|^2$$
#
# (denoising score matching with $\lambda = \sigma^2$ *is* noise prediction), and explicit score matching
# with the true score differs from DSM by a constant independent of $\theta$ (Vincent 2011). We check it
# for several "models" (random linear maps of $x$) with the same Monte Carlo noise.

# %%
score_true = target.score(process)
x0s = target.sample(20000 if not FAST else 5000, key=jax.random.key(6))
mc_key = jax.random.key(7)


def model(w):
    return lambda x, t: x @ w  # an eps-predicting "network"


t = losses.uniform_time(process)(jax.random.key(8), (x0s.shape[0],), x0s.dtype)
noise = jax.random.normal(jax.random.key(9), x0s.shape, x0s.dtype)
x_t = process.marginal(x0s, noise, t)
sig = process.sigma(t)[:, None]
for j in range(4):
    w = 0.5 * jax.random.normal(jax.random.key(10 + j), (2, 2))
    net = model(w)
    score_net = lambda x, t, net=net: -net(x, t) / process.sigma(t)[:, None]
    l_eps = losses.eps_loss(net, process, x0s, key=mc_key, t=t).mean()
    l_dsm = losses.dsm_loss(score_net, process, x0s, key=mc_key, t=t, weighting="sigma2").mean()
    s_hat = score_net(x_t, t)
    dsm = jnp.mean(jnp.sum((sig * s_hat + noise) ** 2, -1))
    esm = jnp.mean(jnp.sum(sig**2 * (s_hat - score_true(x_t, t)) ** 2, -1))
    print(f"model {j}: eps {l_eps:.5f} = DSM {l_dsm:.5f};  DSM - ESM = {dsm - esm:.4f}")
