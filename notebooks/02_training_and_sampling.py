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
# # 2. Training and sampling
#
# We train a small network on two moons with noise prediction, then sample it in two ways that are
# discretizations of the two reverse-time equations of notebook 1:
#
# * **DDPM** (Ho et al. 2020) is a discretization of the **reverse SDE**; it converges in
#   distribution, like Euler-Maruyama on the same SDE.
# * **DDIM** (Song et al. 2021) is the exponential-integrator (first-order) discretization of the
#   **probability-flow ODE**; DPM-Solver (Lu et al. 2022) adds higher orders.
#
# On an exact target (a Gaussian mixture with its closed-form denoiser) we measure each ODE
# sampler's error against a tight diffrax solve, and on the trained model the sample quality
# against the number of network evaluations (NFE).

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
from flax import nnx

import jaxdiff
from jaxdiff import analytic, data, losses, metrics, samplers, schedules, sde, training

FAST = os.environ.get("JAXDIFF_FAST", "0") == "1"
process = jaxdiff.VP()
key = jax.random.key(0)

# %% [markdown]
# ## Train an MLP on two moons
#
# `losses.v_loss` regresses $v = \alpha_t\epsilon - \sigma_t x_0$ (Salimans & Ho 2022), per
# example; `training.make_train_step` wraps it into a pure, jitted step with Adam and an
# exponential moving average (EMA) of the parameters. (Noise prediction trains as well, but its
# denoiser $(x - \sigma_t\hat\epsilon)/\alpha_t$ divides by $\alpha_t \approx 0.007$ at $t_{max}$ of
# VP: the ODE samplers then carry its errors on the prior's tail samples far from the data.)

# %%
steps = 120 if FAST else 3000
model = jaxdiff.nets.MLP(2, hidden=128, depth=3, rngs=nnx.Rngs(0))
opt = training.make_optimizer(2e-3, warmup=steps // 30, decay_steps=steps)
state, graphdef, rest = training.init_train_state(model, opt, key=key)
step = training.make_train_step(graphdef, losses.v_loss, process, opt, rest=rest, ema_decay=0.995)
batch = 256 if FAST else 512
it = data.make_iterator(data.toy_2d("moons", 20_000, seed=0), batch, seed=0, labels=False)
loss_curve = []
for _ in range(steps):
    state, m = step(state, next(it))
    loss_curve.append(m["loss"])
loss_curve = np.asarray(jax.device_get(loss_curve))
plt.figure(figsize=(5, 3))
plt.plot(np.convolve(loss_curve, np.ones(20) / 20, "valid"))
plt.xlabel("step")
plt.ylabel("eps loss (running mean)")
plt.show()
print(f"loss: first 20 steps {loss_curve[:20].mean():.3f}, last 20 {loss_curve[-20:].mean():.3f}")

# %% [markdown]
# The network becomes a denoiser $D(x, t) = \alpha_t x - \sigma_t v_\theta(x, t)$ (for a
# variance-preserving path), the one interface every sampler uses.

# %%
denoise = jaxdiff.denoiser(training.model_fn(graphdef, state.ema_params, rest), process, "v")
num = 256 if FAST else 2000
held_out = data.toy_2d("moons", num, seed=1).x
x_T = process.prior_sample((num, 2), key=jax.random.key(1))


def sw(x):
    return float(metrics.sliced_wasserstein(np.asarray(x), held_out, key=jax.random.key(0)))


# %% [markdown]
# ## DDPM = the discretized reverse SDE; DDIM = the discretized probability-flow ODE

# %%
n = 50
ts = schedules.uniform(process, n)
runs = {
    "DDPM": jaxdiff.sample(samplers.ddpm(process), denoise, x_T, ts, key=jax.random.key(2)),
    "Euler-Maruyama (reverse SDE)": jaxdiff.sample(
        samplers.euler_maruyama(process), denoise, x_T, ts, key=jax.random.key(2)
    ),
    "DDIM": jaxdiff.sample(samplers.ddim(process), denoise, x_T, ts),
    "PF-ODE (diffrax Tsit5)": None,
}
x_ode = sde.solve_ode(process, denoise, x_T).ys[-1]
fig, axes = plt.subplots(1, 5, figsize=(17, 3.4))
axes[0].scatter(held_out[:, 0], held_out[:, 1], s=1, c="k")
axes[0].set_title("data")
for ax, (name, res) in zip(axes[1:], runs.items(), strict=True):
    x = x_ode if res is None else res.x
    ax.scatter(x[:, 0], x[:, 1], s=1)
    ax.set_title(f"{name}\nSW2 {sw(x):.3f}", fontsize=9)
for ax in axes:
    ax.set_xlim(-2.5, 3.5)
    ax.set_ylim(-2, 2.5)
plt.show()

# %% [markdown]
# DDIM with 50 steps and the adaptive diffrax solve follow the same ODE: their samples nearly
# coincide, while the two SDE samplers agree in distribution, not sample by sample.

# %%
ddim_end = runs["DDIM"].x
print(
    "mean |DDIM - diffrax PF-ODE|:",
    float(jnp.mean(jnp.abs(ddim_end - denoise(x_ode, process.t_min)))),
)

# %% [markdown]
# ## Order of accuracy on an exact target
#
# With the closed-form denoiser of a Gaussian mixture, the probability-flow ODE solved by diffrax at
# tight tolerance is the reference. Each sampler's error falls at its order as steps double.

# %%
jax.config.update("jax_enable_x64", True)
mix = analytic.GaussianMixture(
    jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]]), jnp.array([0.4, 0.3, 0.5]),
    jnp.array([0.3, 0.3, 0.4]),
)  # fmt: skip
exact = mix.denoiser(process)
x_T64 = process.prior_sample((256, 2), key=jax.random.key(3), dtype=jnp.float64)
t_end = 1e-2  # stop before the data to avoid the stiff final stretch; compare states at t_end
tol = 1e-8 if FAST else 1e-10
ctrl = diffrax.PIDController(rtol=tol, atol=tol)
reference = sde.solve_ode(process, exact, x_T64, t1=t_end, stepsize_controller=ctrl).ys[-1]


def grid(n):
    lam = jnp.linspace(process.log_snr(process.t_max), process.log_snr(t_end), n + 1)
    return process.t_from_log_snr(lam)


solvers = {
    "DDIM (order 1)": samplers.ddim(process),
    **({} if FAST else {"DPM-Solver-2": samplers.dpm_solver(process, order=2)}),
    **({} if FAST else {"DPM-Solver++(2M)": samplers.dpm_solver_pp(process, order=2)}),
    "DPM-Solver-3": samplers.dpm_solver(process, order=3),
}
steps_list = [4, 8] if FAST else [4, 8, 16, 32, 64]
plt.figure(figsize=(5.5, 4))
for name, s in solvers.items():
    errs, nfes = [], []
    for n_steps in steps_list:
        res = jaxdiff.sample(s, exact, x_T64, grid(n_steps))
        errs.append(float(jnp.max(jnp.abs(res.x - reference))))
        nfes.append(int(res.nfe))
    slope = np.polyfit(np.log(nfes[-3:]), np.log(errs[-3:]), 1)[0]
    plt.loglog(nfes, errs, "o-", label=f"{name}: slope {slope:.2f}")
plt.xlabel("NFE")
plt.ylabel("max error vs diffrax (t = 0.01)")
plt.legend(fontsize=8)
plt.show()
jax.config.update("jax_enable_x64", False)

# %% [markdown]
# ## Quality against NFE on the trained model

# %%
nfes_q = [50] if FAST else [5, 10, 20, 50]  # fast: DDPM and DDIM as compiled above
table = {
    "DDPM": (samplers.ddpm(process), schedules.uniform, 1),
    "DDIM": (samplers.ddim(process), schedules.uniform, 1),
    "DPM-Solver++(2M)": (samplers.dpm_solver_pp(process, order=2), schedules.log_snr_uniform, 1),
    **({} if FAST else {"Heun": (samplers.heun(process), schedules.karras, 2)}),
}
plt.figure(figsize=(5.5, 4))
for name, (s, make_grid, per_step) in table.items():
    q, used = [], []
    for nfe in nfes_q:
        res = jaxdiff.sample(
            s, denoise, x_T, make_grid(process, (nfe - 1) // per_step + 1), key=jax.random.key(4)
        )
        q.append(sw(res.x))
        used.append(int(res.nfe))
    plt.loglog(used, q, "o-", label=name)
plt.axhline(sw(data.toy_2d("moons", num, seed=7).x), color="k", ls=":", label="data vs data")
plt.xlabel("NFE")
plt.ylabel("sliced W2 to held-out data")
plt.legend(fontsize=8)
plt.show()
