r"""The geometric perspective on diffusion sampling (Chen et al. 2023; Chen et al. 2024).

Written in the EDM coordinates of any process, :math:`\tilde x = x/\alpha_t` and
:math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-\lambda_t/2}`, the probability-flow ODE reads
:math:`d\tilde x/d\tilde\sigma = (\tilde x - D(x_t, t))/\tilde\sigma`. Its solution from noise to
data is the *sampling trajectory* :math:`\{\tilde x_t\}`; the denoiser outputs along it form the
*denoising trajectory* :math:`\{D(x_t, t)\}`. "A Geometric Perspective on Diffusion Models"
(Chen et al. 2023, arXiv 2305.19947) finds that

- the sampling trajectory is quasi-linear: it barely leaves the chord from :math:`x_T` to
  :math:`x_0` (:func:`chord_deviation`, :func:`step_angles`, :func:`project_2d`);
- the denoising trajectory reaches the final sample much sooner (:func:`distance_to_final`);
- a DDIM (Euler) step is a convex combination of :math:`\tilde x_t` and :math:`D`, and the
  second-order samplers replace :math:`D` by a finite difference of the denoising trajectory
  (:func:`heun_from_denoised`, :func:`dpm_solver_2_from_denoised`,
  :func:`multistep_from_denoised`);
- the optimal denoiser of a finite data set is one mean-shift step with bandwidth
  :math:`\tilde\sigma` (:func:`mean_shift`, :func:`optimal_denoiser`), so DDIM with it is annealed
  mean shift, and a trained model deviates from it along its own trajectories
  (:func:`score_deviation`).

Trajectories are arrays ``(steps, batch, *example)`` such as ``SampleResult.xs`` and
``SampleResult.denoised``; every function here also takes the ``SampleResult`` itself.

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> edm = jaxdiff.EDM()
    >>> data = jax.random.normal(jax.random.key(0), (16, 2))
    >>> denoise = jaxdiff.geometry.optimal_denoiser(data, edm)
    >>> x_T = edm.prior_sample((4, 2), key=jax.random.key(1), dtype=data.dtype)
    >>> res = jaxdiff.sample(jaxdiff.samplers.ddim(edm), denoise, x_T,
    ...                      jaxdiff.schedules.karras(edm, 32), save_trajectory=True)
    >>> jaxdiff.geometry.chord_deviation(res).relative.shape
    (33, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._utils import as_time, bcast
from jaxdiff.analytic import Empirical, mean_shift
from jaxdiff.processes import Process
from jaxdiff.samplers import SampleResult

__all__ = [
    "ChordDeviation",
    "StepAngles",
    "Projection",
    "ScoreDeviation",
    "TrajectoryStats",
    "edm_trajectory",
    "chord_deviation",
    "step_angles",
    "distance_to_final",
    "project",
    "project_2d",
    "project_3d",
    "trajectory_stats",
    "mean_shift",
    "optimal_denoiser",
    "score_deviation",
    "euler_from_denoised",
    "heun_from_denoised",
    "dpm_solver_2_from_denoised",
    "multistep_from_denoised",
    "log_snr_midpoint",
]


# --- inputs --------------------------------------------------------------------------------------
def _trajectory(xs, name="xs"):
    """The sampling trajectory of a ``SampleResult`` (or the array itself), checked."""
    if isinstance(xs, SampleResult):
        if xs.xs is None:
            raise ValueError(
                "This SampleResult has no trajectory: run jaxdiff.sample(..., "
                "save_trajectory=True)."
            )
        xs = xs.xs
    xs = jnp.asarray(xs)
    if xs.ndim < 3 or xs.shape[0] < 2:
        raise ValueError(
            f"{name} must have shape (steps, batch, *example) with steps >= 2 (e.g. "
            f"SampleResult.xs); got {xs.shape}."
        )
    return xs


def _trajectory_and_times(xs, ts):
    """A checked trajectory and its grid, one time per point."""
    xs = _trajectory(xs)
    ts = as_time(ts, xs)
    if ts.shape != xs.shape[:1]:
        raise ValueError(f"ts must have one time per point, shape {xs.shape[:1]}; got {ts.shape}.")
    return xs, ts


def _flat(traj):
    """``(steps, batch, *example) -> (steps, batch, d)``."""
    return traj.reshape(traj.shape[0], traj.shape[1], -1)


def _norm(v):
    return jnp.sqrt(jnp.sum(v**2, axis=-1))


def _safe_div(a, b):
    """``a / b`` with 0 where ``b == 0`` (and finite gradients there)."""
    ok = b > 0
    return jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)


def edm_trajectory(process: Process, xs, ts):
    r"""A trajectory in EDM coordinates, :math:`\tilde x_{t_i} = x_{t_i}/\alpha_{t_i}`.

    For VE and EDM processes (:math:`\alpha = 1`) this is the trajectory itself; for VP-like
    processes it undoes the shrinking by :math:`\alpha_t`, in which coordinates the paper's
    quasi-linearity holds for every process. ``ts`` has one time per point (``len(ts) ==
    xs.shape[0]``; :math:`\alpha_0 = 1` for a final 0).
    """
    xs, ts = _trajectory_and_times(xs, ts)
    return xs / bcast(process.alpha(ts), xs)


# --- shape of a trajectory -----------------------------------------------------------------------
class ChordDeviation(NamedTuple):
    """Distance of each point from the chord through the end points (see :func:`chord_deviation`).

    Attributes:
        absolute: ``(steps, batch)`` distance of each point from the chord's line.
        relative: ``(steps, batch)`` the same divided by the chord's length.
        chord: ``(batch,)`` the chord's length :math:`\\|x_0 - x_T\\|`.
    """

    absolute: jax.Array
    relative: jax.Array
    chord: jax.Array


def chord_deviation(xs) -> ChordDeviation:
    r"""Deviation of each point of a trajectory from the straight chord between its end points.

    .. math:: \delta_i = \left\|(x_i - x_T) - \langle x_i - x_T, e\rangle e\right\|,\qquad
        e = \frac{x_0 - x_T}{\|x_0 - x_T\|},

    the distance of :math:`x_i` to the line through :math:`x_T` and :math:`x_0` (Chen et al. 2023,
    Sec. 3, "trajectory deviation"). A quasi-linear trajectory has
    :math:`\max_i\delta_i \ll \|x_0 - x_T\|`.

    Example:
        >>> dev = chord_deviation(result)           # doctest: +SKIP
        >>> dev.relative.max(axis=0)  # worst point of each trajectory  # doctest: +SKIP
    """
    v = _flat(_trajectory(xs))
    chord = v[-1] - v[0]
    length = _norm(chord)
    e = chord * _safe_div(1.0, length)[:, None]
    w = v - v[0]
    perp = w - jnp.sum(w * e, axis=-1, keepdims=True) * e
    absolute = _norm(perp)
    return ChordDeviation(absolute, _safe_div(absolute, length), length)


class StepAngles(NamedTuple):
    """Turning of a trajectory (see :func:`step_angles`).

    Attributes:
        angle: ``(steps - 2, batch)`` angle in radians between step ``i`` and step ``i + 1``.
        curvature: ``(steps - 2, batch)`` the angle per unit length (discrete curvature).
        chord_angle: ``(steps - 1, batch)`` angle between each step and the chord.
    """

    angle: jax.Array
    curvature: jax.Array
    chord_angle: jax.Array


def _angle(u, v):
    cos = _safe_div(jnp.sum(u * v, axis=-1), _norm(u) * _norm(v))
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


def step_angles(xs) -> StepAngles:
    r"""Angles between successive steps :math:`d_i = x_{i+1} - x_i` and the discrete curvature.

    .. math:: \theta_i = \arccos\frac{\langle d_i, d_{i+1}\rangle}{\|d_i\|\|d_{i+1}\|},\qquad
        \kappa_i = \frac{2\theta_i}{\|d_i\| + \|d_{i+1}\|}

    (turning angle per unit arc length); ``chord_angle`` is the angle of each :math:`d_i` with
    the chord :math:`x_0 - x_T`. A straight line has :math:`\theta = \kappa = 0`.
    """
    v = _flat(_trajectory(xs))
    if v.shape[0] < 3:
        raise ValueError(f"step_angles needs at least 3 points per trajectory; got {v.shape[0]}.")
    d = jnp.diff(v, axis=0)
    angle = _angle(d[:-1], d[1:])
    curvature = _safe_div(2.0 * angle, _norm(d[:-1]) + _norm(d[1:]))
    return StepAngles(angle, curvature, _angle(d, (v[-1] - v[0])[None]))


def distance_to_final(traj, final=None):
    r"""Distance :math:`\|x_i - x_{final}\|` of every point of ``traj`` to ``final``.

    ``traj`` is ``(steps, batch, *example)`` (a sampling or a denoising trajectory, or a
    ``SampleResult``, whose sampling trajectory is used); ``final`` defaults to its last point.
    For the denoising trajectory pass ``(result.denoised, result.x)``: it approaches the final
    sample much sooner than the sampling trajectory (Chen et al. 2023, Sec. 3.2). Returns
    ``(steps, batch)``.
    """
    traj = _trajectory(traj, "traj")
    final = traj[-1] if final is None else jnp.asarray(final)
    if final.shape != traj.shape[1:]:
        raise ValueError(
            f"final must be one point per trajectory, shape {traj.shape[1:]}; got {final.shape}."
        )
    return _norm(_flat(traj - final[None]))


class Projection(NamedTuple):
    """A trajectory projected on its principal components (see :func:`project`).

    Attributes:
        coords: ``(steps, batch, k)`` coordinates along the first ``k`` principal directions.
        explained: ``(batch, k)`` fraction of the variance each direction explains.
    """

    coords: jax.Array
    explained: jax.Array


def _pca(points, k):
    """Coordinates of ``points (m, d)`` on their first ``k`` principal axes, and explained var."""
    centered = points - points.mean(axis=0)
    _, s, vt = jnp.linalg.svd(centered, full_matrices=False)
    axes = vt[:k]
    coords = centered @ axes.T
    # fix signs: the trajectory moves forward along every axis (first point to last)
    sign = jnp.where(coords[-1] - coords[0] < 0, -1.0, 1.0)
    var = s**2
    explained = var[:k] / jnp.maximum(var.sum(), jnp.finfo(var.dtype).tiny)
    return coords * sign, explained


def project(xs, k: int = 2, *, joint: bool = False) -> Projection:
    r"""Project trajectories on their ``k`` principal directions (PCA), for plots.

    With ``joint=False`` each trajectory gets its own axes: ``explained`` then measures how
    low-dimensional each trajectory is (the paper finds two directions explain almost all of a
    sampling trajectory). With ``joint=True`` all trajectories share the axes of their pooled
    points, so they can be drawn in one picture.
    """
    v = _flat(_trajectory(xs))
    steps, batch, d = v.shape
    if not 1 <= k <= min(d, steps):
        raise ValueError(f"k must lie in [1, min(dim, steps)] = [1, {min(d, steps)}]; got {k}.")
    if joint:
        coords, explained = _pca(v.reshape(steps * batch, d), k)
        return Projection(coords.reshape(steps, batch, k), jnp.broadcast_to(explained, (batch, k)))
    coords, explained = jax.vmap(lambda p: _pca(p, k), in_axes=1, out_axes=(1, 0))(v)
    return Projection(coords, explained)


def project_2d(xs, *, joint: bool = False) -> Projection:
    """:func:`project` on two directions."""
    return project(xs, 2, joint=joint)


def project_3d(xs, *, joint: bool = False) -> Projection:
    """:func:`project` on three directions."""
    return project(xs, 3, joint=joint)


class TrajectoryStats(NamedTuple):
    """Summary of sampling trajectories (see :func:`trajectory_stats`); averages over the batch.

    Attributes:
        chord_deviation: ``(steps,)`` mean relative deviation from the chord at each point.
        max_chord_deviation: mean over trajectories of their largest relative deviation.
        worst_chord_deviation: the largest relative deviation of any point of any trajectory.
        angle: ``(steps - 2,)`` mean angle (radians) between successive steps.
        curvature: ``(steps - 2,)`` mean discrete curvature.
        explained_2d: mean variance fraction explained by each trajectory's first two directions.
        sampling_distance: ``(steps,)`` mean distance of the sampling trajectory to the final
            sample, relative to the chord's length.
        denoising_distance: ``(steps - 1,)`` the same for the denoising trajectory (``nan`` when
            the result has none).
    """

    chord_deviation: jax.Array
    max_chord_deviation: jax.Array
    worst_chord_deviation: jax.Array
    angle: jax.Array
    curvature: jax.Array
    explained_2d: jax.Array
    sampling_distance: jax.Array
    denoising_distance: jax.Array


def trajectory_stats(result: SampleResult, process: Process | None = None, ts=None):
    """Summarize a ``SampleResult`` with trajectories: deviation, angles, convergence.

    Pass ``process`` and ``ts`` (the grid of the run) to measure in EDM coordinates
    (:func:`edm_trajectory`); otherwise the trajectory is used as stored (right for VE/EDM).
    """
    if not isinstance(result, SampleResult) or result.xs is None:
        raise ValueError(
            "trajectory_stats needs a SampleResult from jaxdiff.sample(..., save_trajectory=True)."
        )
    if (process is None) != (ts is None):
        raise ValueError("Pass both process and ts (to use EDM coordinates), or neither.")
    xs = result.xs if process is None else edm_trajectory(process, result.xs, ts)
    dev = chord_deviation(xs)
    ang = step_angles(xs) if xs.shape[0] >= 3 else None
    per = dev.chord[None]
    if result.denoised is None:
        den = jnp.full((xs.shape[0] - 1,), jnp.nan, xs.dtype)
    else:
        den = jnp.mean(_safe_div(distance_to_final(result.denoised, xs[-1]), per), axis=1)
    return TrajectoryStats(
        chord_deviation=dev.relative.mean(axis=1),
        max_chord_deviation=dev.relative.max(axis=0).mean(),
        worst_chord_deviation=dev.relative.max(),
        angle=ang.angle.mean(axis=1) if ang is not None else jnp.zeros((0,), xs.dtype),
        curvature=ang.curvature.mean(axis=1) if ang is not None else jnp.zeros((0,), xs.dtype),
        explained_2d=project(xs, min(2, xs.shape[0])).explained.sum(axis=1).mean(),
        sampling_distance=jnp.mean(_safe_div(distance_to_final(xs), per), axis=1),
        denoising_distance=den,
    )


# --- the optimal denoiser and the score deviation ------------------------------------------------
def optimal_denoiser(data, process: Process, *, chunk: int = 1024):
    r"""The optimal denoiser of the empirical distribution of ``data`` under ``process``.

    .. math:: D^*(x, t) = \sum_i \mathrm{softmax}_i\!\left(-\frac{\|x/\alpha_t - y_i\|^2}
        {2\tilde\sigma_t^2}\right) y_i = m\!\left(\frac{x}{\alpha_t};\ \tilde\sigma_t\right),

    one mean-shift step with bandwidth :math:`\tilde\sigma_t = \sigma_t/\alpha_t` (Chen et al.
    2023, Eq. 7); ``Empirical(data).denoiser(process)``. Sampling with it ends on a training point.
    """
    return Empirical(data, chunk).denoiser(process)


class ScoreDeviation(NamedTuple):
    """Deviation of a model from a reference along trajectories (see :func:`score_deviation`).

    Attributes:
        denoiser: ``(steps, batch)`` :math:`\\|D(x_t, t) - D^*(x_t, t)\\|`.
        score: ``(steps, batch)`` :math:`\\|s(x_t, t) - s^*(x_t, t)\\| =
            \\alpha_t\\|D - D^*\\|/\\sigma_t^2`.
        relative: ``(steps, batch)`` the score deviation relative to :math:`\\|s^*\\|`.
    """

    denoiser: jax.Array
    score: jax.Array
    relative: jax.Array


def score_deviation(process: Process, denoise: Callable, reference, xs, ts) -> ScoreDeviation:
    r"""How far a model's score is from the optimal one along its own sampling trajectories.

    At each point :math:`(x_{t_i}, t_i)` of the trajectory with :math:`t_i > 0`, compares the
    model's denoiser :math:`D` with the reference :math:`D^*` (the optimal denoiser of the
    training data, i.e. mean shift, when ``reference`` is an array of data; or any denoiser):

    .. math:: \|s - s^*\| = \frac{\alpha_t}{\sigma_t^2}\|D(x_t, t) - D^*(x_t, t)\|

    by Tweedie's formula. Chen et al. (2023, Sec. 5) find the deviation small at both ends and
    largest at intermediate noise, where a trained model generalizes instead of reproducing
    the training set.

    Args:
        process: the process of the model.
        denoise: the model's denoiser.
        reference: training data ``(N, *example)`` or a reference denoiser.
        xs: a ``SampleResult`` with trajectory or an array ``(len(ts), batch, *example)``.
        ts: the grid the trajectory was sampled on; points at ``t = 0`` are skipped.
    """
    xs, ts = _trajectory_and_times(xs, ts)
    ref = reference if callable(reference) else optimal_denoiser(reference, process)
    keep = ts.shape[0] - 1 if (ts.shape[0] > 1 and _ends_at_zero(ts)) else ts.shape[0]
    xs, ts = xs[:keep], ts[:keep]

    def one(args):
        x, t = args
        return denoise(x, t), ref(x, t)

    d_model, d_ref = jax.lax.map(one, (xs, ts))
    tweedie = jax.vmap(process.score_from_x0)  # one time per step
    s_model, s_ref = tweedie(xs, d_model, ts), tweedie(xs, d_ref, ts)
    score, score_ref = _norm(_flat(s_model - s_ref)), _norm(_flat(s_ref))
    return ScoreDeviation(_norm(_flat(d_model - d_ref)), score, _safe_div(score, score_ref))


def _ends_at_zero(ts):
    try:
        return bool(ts[-1] == 0)
    except jax.errors.ConcretizationTypeError as err:
        raise ValueError("score_deviation needs a concrete grid ts (not traced).") from err


# --- second-order samplers as finite differences of the denoising trajectory --------------------
def _edm(process, t, x):
    """:math:`\\alpha_t` and the noise level :math:`\\tilde\\sigma_t`, broadcast against x."""
    t = as_time(t, x)
    return bcast(process.alpha(t), x), bcast(process.noise_level(t), x)


def euler_from_denoised(process: Process, x, x0_hat, t, s):
    r"""The DDIM (Euler) step from ``t`` to ``s`` as a convex combination, given :math:`D`.

    .. math:: \tilde x_s = \frac{\tilde\sigma_s}{\tilde\sigma_t}\tilde x_t
        + \Big(1 - \frac{\tilde\sigma_s}{\tilde\sigma_t}\Big) D,\qquad x_s = \alpha_s\tilde x_s.

    With the optimal denoiser this is one step of annealed mean shift; ``s = 0`` gives ``D``.
    """
    a_t, sig_t = _edm(process, t, x)
    a_s, sig_s = _edm(process, s, x)
    r = sig_s / sig_t
    return a_s * (r * x / a_t + (1.0 - r) * x0_hat)


def heun_from_denoised(process: Process, x, x0_t, x0_s, t, s):
    r"""Heun's step (EDM's second-order sampler) as a finite difference of denoiser outputs.

    ``x0_t = D(x_t, t)`` and ``x0_s = D(\bar x_s, s)`` at the Euler prediction
    :math:`\bar x_s` (:func:`euler_from_denoised`). Heun's step in :math:`(\tilde x,
    \tilde\sigma)` equals the Euler step with :math:`D` replaced by

    .. math:: D_t + \frac{\tilde\sigma_t}{2\tilde\sigma_s}\,(D_s - D_t)

    (Chen et al. 2023, Sec. 3.3). Needs ``s > 0``.
    """
    _, sig_t = _edm(process, t, x)
    _, sig_s = _edm(process, s, x)
    return euler_from_denoised(process, x, x0_t + sig_t / (2.0 * sig_s) * (x0_s - x0_t), t, s)


def log_snr_midpoint(process: Process, t, s):
    r"""The time :math:`u` with :math:`\lambda_u = (\lambda_t + \lambda_s)/2`, i.e.
    :math:`\tilde\sigma_u = \sqrt{\tilde\sigma_t\tilde\sigma_s}` (DPM-Solver-2's intermediate time)."""
    t, s = as_time(t), as_time(s)
    return process.t_from_log_snr(0.5 * (process.log_snr(t) + process.log_snr(s)))


def dpm_solver_2_from_denoised(process: Process, x, x0_t, x0_u, t, s):
    r"""DPM-Solver-2 (Lu et al. 2022, Alg. 1 with :math:`r_1 = 1/2`) from denoiser outputs.

    ``x0_u = D(\bar x_u, u)`` at the DDIM prediction :math:`\bar x_u` at the log-SNR midpoint
    ``u = log_snr_midpoint(process, t, s)``. The step equals the Euler step with :math:`D`
    replaced by

    .. math:: D_t + \frac{\tilde\sigma_t}{\tilde\sigma_u}\,(D_u - D_t),\qquad
        \tilde\sigma_u = \sqrt{\tilde\sigma_t\tilde\sigma_s}

    (Chen et al. 2023, Sec. 3.3; the noise-prediction form of DPM-Solver-2 rewritten with
    :math:`\hat\epsilon = (\tilde x - D)/\tilde\sigma`).
    """
    _, sig_t = _edm(process, t, x)
    _, sig_s = _edm(process, s, x)
    sig_u = jnp.sqrt(sig_t * sig_s)
    return euler_from_denoised(process, x, x0_t + sig_t / sig_u * (x0_u - x0_t), t, s)


def multistep_from_denoised(process: Process, x, x0_t, x0_prev, t_prev, t, s):
    r"""DPM-Solver++(2M) (Lu et al. 2022b) from the current and the previous denoiser outputs.

    With :math:`h = \lambda_s - \lambda_t`, :math:`r = (\lambda_t - \lambda_{prev}) / h` (in the
    log-SNR :math:`\lambda/2 = -\log\tilde\sigma` of DPM-Solver), the step equals the Euler step
    with :math:`D` replaced by the extrapolation

    .. math:: D_t + \frac{1}{2r}\,(D_t - D_{prev}).
    """
    lam = lambda u: -jnp.log(_edm(process, u, x)[1])
    h = lam(s) - lam(t)
    r = (lam(t) - lam(t_prev)) / h
    return euler_from_denoised(process, x, x0_t + (x0_t - x0_prev) / (2.0 * r), t, s)
