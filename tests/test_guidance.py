"""Guidance is exact on a Gaussian mixture whose components are the classes.

With the exact classifier :math:`\\log p_t(y\\mid x)` (``GaussianMixture.class_log_prob``), Bayes'
rule makes classifier guidance at scale 1 the class-conditional denoiser; classifier-free guidance
is the affine combination of the exact conditional and unconditional denoisers. Guided sampling
with every available sampler lands in the guided class; the scale is traced (no recompilation).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import guidance, schedules
from jaxdiff.analytic import GaussianMixture
from jaxdiff.processes import EDM, VE, VP, DiscreteVP, RectifiedFlow, SubVP, VPCosine

PROCESSES = [VP(), VPCosine(), SubVP(), VE(), EDM(), RectifiedFlow(), DiscreteVP.linear()]
parametrize = pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)

MIX = GaussianMixture(
    jnp.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 3.0]]),
    jnp.array([[0.5, 0.3], [0.4, 0.6], [0.3, 0.3]]),
    jnp.array([0.5, 0.3, 0.2]),
)
K = MIX.means.shape[0]


class ExactLogProb(eqx.Module):
    """The exact classifier log p_t(y | x) of the mixture (a pytree: traced under jit)."""

    process: jaxdiff.Process
    y: jax.Array
    mix: GaussianMixture = MIX

    def __call__(self, x, t):
        return self.mix.class_log_prob(self.process, x, t, jnp.broadcast_to(self.y, x.shape[:1]))


class LabelDenoiser(eqx.Module):
    """denoise_y(x, t, y): component y's denoiser, the whole mixture for the null label K."""

    process: jaxdiff.Process
    mix: GaussianMixture = MIX

    def __call__(self, x, t, y):
        outs = [self.mix.component(k).denoiser(self.process)(x, t) for k in range(K)]
        outs = jnp.stack(outs + [self.mix.denoiser(self.process)(x, t)])  # (K + 1, batch, d)
        return jnp.take_along_axis(outs, y[None, :, None], axis=0)[0]


def points(process, n=6, key=0):
    t = jnp.linspace(process.t_min, process.t_max, n + 2)[1:-1]
    x0 = MIX.sample(n, key=jax.random.key(key))
    x = process.sample_marginal(x0, t, key=jax.random.key(key + 1))[0]
    return x, t, jnp.arange(n) % K


@eqx.filter_jit
def call(fns, x, t):
    """Evaluate one denoiser or a tuple of them, compiled (one XLA program, not op by op)."""
    return jax.tree.map(lambda f: f(x, t), fns, is_leaf=callable)


def conditional(process, y):
    """The exact class-conditional denoiser E[x0 | x_t, y] (component y of the mixture)."""
    return jax.tree_util.Partial(LabelDenoiser(process), y=y)


# --- exact identities --------------------------------------------------------------------------
SCALES = (0.0, 0.5, 1.0, 2.5)


@pytest.fixture(scope="module", params=PROCESSES, ids=lambda p: type(p).__name__)
def exact(request):
    """Conditional, unconditional and guided denoisers at each scale, in one compiled call."""
    process = request.param
    x, t, y = points(process)
    cond, uncond, lp = conditional(process, y), MIX.denoiser(process), ExactLogProb(process, y)
    fns = {
        "cond": cond,
        "uncond": uncond,
        "cfg": tuple(guidance.classifier_free(cond, uncond, w) for w in SCALES),
        "cg": tuple(guidance.classifier(process, uncond, lp, w) for w in SCALES),
    }
    return call(fns, x, t)


def test_classifier_guidance_scale_one_is_the_conditional_denoiser(exact):
    np.testing.assert_allclose(exact["cg"][SCALES.index(1.0)], exact["cond"], rtol=0, atol=1e-8)


def test_classifier_free_scale_one_conditional_zero_unconditional(exact):
    c, u = exact["cond"], exact["uncond"]
    np.testing.assert_allclose(exact["cfg"][SCALES.index(1.0)], c, rtol=0, atol=1e-12)
    np.testing.assert_allclose(exact["cfg"][SCALES.index(0.0)], u, rtol=0, atol=1e-12)
    for w, g in zip(SCALES, exact["cfg"], strict=True):
        np.testing.assert_allclose(g, u + w * (c - u), rtol=0, atol=1e-12)


def test_classifier_guidance_equals_classifier_free_at_every_scale(exact):
    # With exact models, w * sigma^2/alpha * grad log p(y|x) = w * (x0_cond - x0_uncond).
    for w, cg, cfg in zip(SCALES, exact["cg"], exact["cfg"], strict=True):
        np.testing.assert_allclose(cg, cfg, rtol=0, atol=1e-8, err_msg=f"scale {w}")


def test_classifier_free_is_the_same_combination_in_eps_and_score_space():
    process = VP()
    x, t, y = points(process)
    cond, uncond, w = conditional(process, y), MIX.denoiser(process), 4.0
    guided = guidance.classifier_free(cond, uncond, w)
    for adapter in (jaxdiff.eps, jaxdiff.score):
        g, a_c, a_u = call(tuple(adapter(process, f) for f in (guided, cond, uncond)), x, t)
        np.testing.assert_allclose(g, a_u + w * (a_c - a_u), rtol=1e-9, atol=1e-9)


def test_per_example_scale_and_guidance_interval():
    process = VP()
    x, t, y = points(process, n=6)
    cond, uncond = conditional(process, y), MIX.denoiser(process)
    w, lo, hi = jnp.arange(6.0), float(t[1]), float(t[3])
    per_example = guidance.classifier_free(cond, uncond, w)
    interval = guidance.classifier_free(cond, uncond, 3.0, interval=(lo, hi))
    g, gi, c, u = call((per_example, interval, cond, uncond), x, t)
    np.testing.assert_allclose(g, u + w[:, None] * (c - u), atol=1e-12)
    # Inside [t_lo, t_hi] the scale applies, outside the conditional model (scale 1).
    inside = (t >= lo) & (t <= hi)
    assert int(inside.sum()) == 3
    np.testing.assert_allclose(gi, jnp.where(inside[:, None], u + 3.0 * (c - u), c), atol=1e-12)


def test_classifier_free_labels_is_one_doubled_batch_call():
    process = EDM()
    x, t, y = points(process)
    calls = []

    def denoise_y(x, t, labels):
        calls.append(x.shape)
        return LabelDenoiser(process)(x, t, labels)

    ref = guidance.classifier_free(conditional(process, y), MIX.denoiser(process), 2.0)
    guided = guidance.classifier_free_labels(denoise_y, y, 2.0, null_label=K)
    out, ref = call((guided, ref), x, t)
    assert calls == [(2 * x.shape[0], 2)]  # traced once: one call on the doubled batch
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_log_prob_from_logits_matches_exact_classifier():
    process = VP()
    x, t, y = points(process)
    logits = lambda x, t: jnp.log(MIX.responsibilities(process, x, t)) + 7.0  # shift-invariant
    lp = guidance.log_prob_from_logits(logits, y)
    np.testing.assert_allclose(lp(x, t), MIX.class_log_prob(process, x, t, y), atol=1e-12)


def test_float32_in_float32_out():
    process = VP()
    x, t, y = points(process)
    x32, t32 = x.astype(jnp.float32), t.astype(jnp.float32)
    mix = jax.tree.map(lambda a: a.astype(jnp.float32), MIX)
    cond = jax.tree_util.Partial(LabelDenoiser(process, mix), y=y)
    cg = guidance.classifier(process, mix.denoiser(process), ExactLogProb(process, y, mix), 2.0)
    cfg = guidance.classifier_free(cond, mix.denoiser(process), 2.0, interval=(0.1, 0.5))
    dt = guidance.dynamic_threshold(cfg, 0.9, 2.0)
    outs = call((cg, cfg, dt), x32, t32)  # float32 end to end
    assert [o.dtype for o in outs] == [jnp.float32] * 3
    np.testing.assert_allclose(outs[0], call(cg, x, t), rtol=1e-4, atol=1e-4)


# --- thresholding ------------------------------------------------------------------------------
def test_dynamic_threshold_bounds_and_leaves_in_range_predictions_unchanged():
    big = (
        jax.random.normal(jax.random.key(0), (5, 4, 4))
        * jnp.array([0.2, 1.0, 3.0, 10.0, 0.5])[:, None, None]
    )
    out = call(guidance.dynamic_threshold(lambda x, t: x, percentile=0.9, max_value=1.5), big, 0.3)
    assert float(jnp.max(jnp.abs(out))) <= 1.5 + 1e-12
    in_range = jnp.max(jnp.abs(big), axis=(1, 2)) <= 1.5
    assert int(in_range.sum()) == 2  # scales 0.2 and 0.5 (max |x| 0.6 and 1.4)
    np.testing.assert_array_equal(out[in_range], big[in_range])
    # percentile 1: s = max|x0|, so an out-of-range example is rescaled to max |x0| = m exactly.
    full = call(guidance.dynamic_threshold(lambda x, t: x, percentile=1.0, max_value=1.5), big, 0.3)
    s = jnp.max(jnp.abs(big), axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(full, jnp.where(s > 1.5, big * 1.5 / s, big), rtol=1e-14)


def test_dynamic_threshold_uses_the_percentile_per_example():
    x0 = jnp.array([[0.5, -4.0, 2.0, 1.0, -3.0]])  # |x0| sorted: 0.5 1 2 3 4; quantile 0.5 = 2
    out = guidance.dynamic_threshold(lambda x, t: x, percentile=0.5)(x0, 0.3)
    np.testing.assert_allclose(out, jnp.clip(x0, -2.0, 2.0) / 2.0, rtol=1e-14)
    clipped = guidance.static_threshold(lambda x, t: x, 1.0)(x0, 0.3)
    np.testing.assert_array_equal(clipped, jnp.clip(x0, -1.0, 1.0))


# --- sampling with guidance --------------------------------------------------------------------
SAMPLERS = [
    ("ddim", {}, 20),
    ("euler", {}, 40),
    ("heun", {}, 15),
    ("dpm_solver", {"order": 2}, 10),
    ("dpm_solver_pp", {"order": 2}, 15),
    ("ipndm", {}, 15),
    ("unipc", {}, 15),
    ("ddpm", {}, 60),
    ("euler_maruyama", {}, 100),
    ("predictor_corrector", {"predictor": "ddpm"}, 40),
]


def _factory(name):
    """A sampler factory of jaxdiff.samplers (every sampler of the API)."""
    return getattr(jaxdiff.samplers, name)


def _check_class(x, process, y):
    """Fraction of samples that the mixture assigns to class y, and their mean vs the component's."""
    resp = MIX.responsibilities(process, x, jnp.zeros(()))
    frac = float(jnp.mean(jnp.argmax(resp, axis=-1) == y))
    return frac, float(jnp.max(jnp.abs(x.mean(0) - MIX.means[y])))


@pytest.fixture(scope="module")
def prior():
    return VP().prior_sample((256, 2), key=jax.random.key(3), dtype=jnp.float64)


@pytest.mark.parametrize("name,kwargs,steps", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_classifier_guided_sampling_lands_in_the_class(name, kwargs, steps, prior):
    factory = _factory(name)
    process, y = VP(), 2  # the class of weight 0.2: unguided sampling would give ~20%
    if "predictor" in kwargs:  # a sampler built from another one
        kwargs = {**kwargs, "predictor": _factory(kwargs["predictor"])(process)}
    sampler = factory(process, **kwargs)
    guided = guidance.classifier(process, MIX.denoiser(process), ExactLogProb(process, y), 1.0)
    res = jaxdiff.sample(
        sampler, guided, prior, schedules.uniform(process, steps), key=jax.random.key(1)
    )
    frac, mean_err = _check_class(res.x, process, y)
    assert frac > 0.95, (name, frac)
    assert mean_err < 0.15, (name, mean_err)


@pytest.mark.parametrize("kind", ["ode", "sde"])
def test_guided_sampling_with_diffrax(kind, prior):
    # Classifier guidance through the probability-flow ODE (Tsit5, adaptive), classifier-free
    # guidance (scale 1: the exact conditional) through the reverse SDE (Euler-Maruyama).
    from jaxdiff import sde

    process, y = VP(), 2
    if kind == "ode":
        guided = guidance.classifier(process, MIX.denoiser(process), ExactLogProb(process, y), 1.0)
        x = sde.solve_ode(process, guided, prior).ys[-1]
    else:
        cond = conditional(process, jnp.full(prior.shape[:1], y))
        guided = guidance.classifier_free(cond, MIX.denoiser(process), 1.0)
        x = sde.solve_sde(process, guided, prior, key=jax.random.key(2), dt0=0.01).ys[-1]
    frac, mean_err = _check_class(x, process, y)
    assert frac > 0.95 and mean_err < 0.15, (frac, mean_err)


def test_unguided_sampling_is_not_class_specific(prior):
    # Control for the test above: without guidance class 2 takes about its weight, 20%.
    process = VP()
    res = jaxdiff.sample(
        jaxdiff.samplers.ddim(process), MIX.denoiser(process), prior, schedules.uniform(process, 20)
    )
    frac, _ = _check_class(res.x, process, 2)
    assert 0.1 < frac < 0.3, frac


class TraceCounter:
    """Hashable by identity, so it can sit in a static field."""

    def __init__(self):
        self.n = 0


class Counting(eqx.Module):
    """Counts how often it is traced (a Python side effect runs only while tracing)."""

    inner: eqx.Module
    counter: TraceCounter = eqx.field(static=True)

    def __call__(self, x, t):
        self.counter.n += 1
        return self.inner(x, t)


def test_changing_the_guidance_scale_does_not_recompile(prior):
    process, y = VP(), 1
    sampler, ts = jaxdiff.samplers.ddim(process), schedules.uniform(process, 8)
    counts = {"cfg": TraceCounter(), "classifier": TraceCounter()}
    cond = jax.tree_util.Partial(LabelDenoiser(process), y=jnp.full(prior.shape[:1], y))
    make = {
        "cfg": lambda w: guidance.classifier_free(
            Counting(cond, counts["cfg"]), MIX.denoiser(process), w, interval=(0.1, w / 10 + 0.2)
        ),
        "classifier": lambda w: guidance.classifier(
            process,
            Counting(MIX.denoiser(process), counts["classifier"]),
            ExactLogProb(process, y),
            w,
        ),
    }
    for kind, build in make.items():
        outs = [jaxdiff.sample(sampler, build(w), prior, ts).x for w in (1.0, 2, 3.5)]
        traced = counts[kind].n
        outs.append(jaxdiff.sample(sampler, build(7.0), prior, ts).x)
        assert traced >= 1 and counts[kind].n == traced, (kind, traced, counts[kind].n)
        assert float(jnp.max(jnp.abs(outs[0] - outs[2]))) > 1e-3  # the scale does act


# --- errors ------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    process = VP()
    d = MIX.denoiser(process)
    with pytest.raises(ValueError, match="t_lo < t_hi"):
        guidance.classifier_free(d, d, 2.0, interval=(0.5, 0.2))
    with pytest.raises(ValueError, match="scalar or have shape"):
        guidance.classifier_free(d, d, jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="denoise_uncond"):
        guidance.classifier_free(d, None, 1.0)
    with pytest.raises(TypeError, match="jaxdiff Process"):
        guidance.classifier("VP", d, lambda x, t: x[:, 0], 1.0)
    with pytest.raises(ValueError, match="percentile must lie in"):
        guidance.dynamic_threshold(d, percentile=99.5)
    with pytest.raises(ValueError, match="max_value must be positive"):
        guidance.static_threshold(d, 0.0)
    with pytest.raises(ValueError, match="integer labels"):
        guidance.log_prob_from_logits(lambda x, t: x, jnp.array([0.5]))
    bad = guidance.classifier(process, d, lambda x, t: jnp.sum(x), 1.0)
    with pytest.raises(ValueError, match=r"must return shape \(batch,\)"):
        bad(jnp.zeros((3, 2)), 0.5)


def test_times_and_scales_of_the_wrong_length_name_the_argument():
    process = VP()
    d = MIX.denoiser(process)
    x = jnp.zeros((3, 2))
    lp = ExactLogProb(process, jnp.zeros(3, int))
    transforms = {
        "cfg": guidance.classifier_free(d, d, 2.0),
        "cfg_interval": guidance.classifier_free(d, d, 2.0, interval=(0.1, 0.5)),
        "classifier": guidance.classifier(process, d, lp, 2.0),
        "labels": guidance.classifier_free_labels(
            LabelDenoiser(process), jnp.zeros(3, int), 2.0, null_label=K
        ),
        "logits": guidance.log_prob_from_logits(lambda x, t: x, 0),
    }
    for name, f in transforms.items():
        for t in (jnp.full((4,), 0.5), jnp.full((3, 1), 0.5)):
            with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
                f(x, t)
            with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
                jax.jit(f)(x, t)
        assert f(x, jnp.full((3,), 0.5)).shape == f(x, 0.5).shape, name
    wrong_scale = {
        "cfg": guidance.classifier_free(d, d, jnp.ones(4)),
        "classifier": guidance.classifier(process, d, lp, jnp.ones(4)),
        "labels": guidance.classifier_free_labels(
            LabelDenoiser(process), jnp.zeros(3, int), jnp.ones(4), null_label=K
        ),
    }
    for f in wrong_scale.values():
        with pytest.raises(
            ValueError, match=r"scale must be a scalar or have shape \(batch,\) = \(3,\)"
        ):
            f(x, 0.5)


def test_equal_transforms_compare_and_hash_equal():
    process = VP()
    d, lp = MIX.denoiser(process), ExactLogProb(process, jnp.zeros(3, int))
    builds = {
        "cfg": lambda w: guidance.classifier_free(d, d, w, interval=(0.1, 0.5)),
        "classifier": lambda w: guidance.classifier(process, d, lp, w),
        "labels": lambda w: guidance.classifier_free_labels(
            LabelDenoiser(process), jnp.arange(3), w, null_label=K
        ),
        "dynamic": lambda w: guidance.dynamic_threshold(d, 0.9, w),
        "static": lambda w: guidance.static_threshold(d, w),
    }
    for name, build in builds.items():
        a, b, c = build(2.0), build(jnp.asarray(2.0)), build(3.0)
        assert bool(a == b) and hash(a) == hash(b), name
        assert not bool(a == c) and hash(a) != hash(c), name
    # Built directly, a Python float scale becomes an array leaf too (traced, not static).
    direct = guidance.ClassifierFree(d, d, 2.0, (0.1, 0.5))
    assert isinstance(direct.scale, jax.Array) and isinstance(direct.interval[0], jax.Array)
    assert bool(direct == builds["cfg"](2.0)) and hash(direct) == hash(builds["cfg"](2.0))
    assert isinstance(guidance.ClassifierGuidance(process, d, lp, 1.5).scale, jax.Array)


def test_directly_built_transforms_with_new_scales_compile_once():
    process = VP()
    d = MIX.denoiser(process)
    traces = []

    @eqx.filter_jit
    def run(denoise, x, t):
        traces.append(None)
        return denoise(x, t)

    x = jnp.ones((3, 2))
    outs = [
        run(guidance.ClassifierFree(d, MIX.component(0).denoiser(process), w), x, 0.5)
        for w in (1.0, 2.0, 3)
    ]
    assert len(traces) == 1
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3
