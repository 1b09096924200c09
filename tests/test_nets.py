"""Networks: shapes, dtypes, exact identities of the blocks at initialisation, equivariance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff import nets
from jaxdiff.nets.embeddings import groups_for

F32 = jnp.float32


def _randn(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F32)


def _numpy_init(factory, scale=0.2, seed=0):
    """Build a network with random NumPy parameters (no XLA compilation of the initialisers,
    which dominates on a small CPU); non-zero everywhere, so zero-initialised layers and dropout
    take effect."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: scale * rng.standard_normal(s.shape).astype(s.dtype), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def unet():
    return _numpy_init(
        lambda: nets.UNet(
            2, image_size=8, channels=8, channel_mults=(1, 2), attn_resolutions=(4,),
            num_classes=3, dropout=0.5, rngs=nnx.Rngs(0),
        )
    )  # fmt: skip


def test_sinusoidal_embedding_values():
    t = jnp.array([0.0, 2.0], F32)
    e = nets.sinusoidal_embedding(t, 6, max_period=100.0)
    freqs = 100.0 ** (-np.arange(3) / 3)
    expected = np.concatenate([np.cos(2.0 * freqs), np.sin(2.0 * freqs)])
    np.testing.assert_allclose(e[0], [1, 1, 1, 0, 0, 0], atol=0)
    np.testing.assert_allclose(e[1], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="even"):
        nets.sinusoidal_embedding(t, 5)


def test_groups_for_divides():
    assert [groups_for(c) for c in (8, 12, 48, 96)] == [8, 12, 24, 32]


@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_mlp_shapes_and_dtypes(embedding):
    net = nets.MLP(3, hidden=16, depth=2, embedding=embedding, rngs=nnx.Rngs(0))
    x = jnp.ones((5, 3), F32)
    out = net(x, jnp.linspace(0.1, 0.9, 5))
    assert out.shape == (5, 3) and out.dtype == F32
    assert net(x, 0.5).shape == (5, 3)  # scalar t broadcasts
    assert net(x.astype(jnp.float64), 0.5).dtype == jnp.float64
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        net(jnp.ones((5, 2), F32), 0.5)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        net(x, jnp.ones(4))


def test_mlp_classifier_head_and_labels():
    net = nets.MLP(2, hidden=16, depth=1, out_dim=7, num_classes=4, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 2), F32)
    assert net(x, 0.3, jnp.array([0, 1, 2])).shape == (3, 7)
    # y=None is the null class, index num_classes
    np.testing.assert_array_equal(net(x, 0.3), net(x, 0.3, jnp.full((3,), 4)))
    with pytest.raises(ValueError, match="integer labels of shape"):
        net(x, 0.3, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        nets.MLP(2, hidden=8, depth=1, rngs=nnx.Rngs(0))(x, 0.3, jnp.array([0, 1, 2]))


def test_unet_shapes_conditioning_and_errors(unet):
    x = _randn((2, 8, 8, 2), 0)
    t = jnp.array([0.2, 0.7], F32)
    out = unet(x, t, jnp.array([0, 2]))
    assert out.shape == x.shape and out.dtype == F32
    np.testing.assert_array_equal(unet(x, t), unet(x, t, jnp.array([3, 3])))  # null class
    with pytest.raises(ValueError, match=r"NHWC images of shape \(batch, \*\(8, 8, 2\)\)"):
        unet(jnp.ones((2, 16, 16, 2), F32), t)
    with pytest.raises(ValueError, match="divisible by"):
        nets.UNet(1, image_size=6, channel_mults=(1, 2, 2), rngs=nnx.Rngs(0))


def test_unet_dropout_only_with_key(unet):
    net = unet
    x = _randn((2, 8, 8, 2), 0)
    a, b = net(x, 0.5), net(x, 0.5)
    np.testing.assert_array_equal(a, b)  # no key: deterministic
    d1, d2 = net(x, 0.5, key=jax.random.key(1)), net(x, 0.5, key=jax.random.key(2))
    assert float(jnp.max(jnp.abs(d1 - d2))) > 1e-3
    np.testing.assert_array_equal(d1, net(x, 0.5, key=jax.random.key(1)))


def test_resblock_and_attention_start_as_scaled_identity():
    # DDPM++ zero-initialises the last layer of each residual branch: out = x / sqrt(2).
    x = _randn((2, 4, 4, 8), 0)
    emb = jnp.ones((2, 32), F32)
    res = nets.ResBlock(8, 8, 32, rngs=nnx.Rngs(0))
    attn = nets.AttentionBlock(8, num_heads=2, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(res(x, emb), x / math.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(attn(x), x / math.sqrt(2), rtol=1e-6)


def test_attention_is_permutation_equivariant():
    # Self-attention with GroupNorm statistics over all positions commutes with any
    # permutation of the positions; a flip of H and W is one.
    attn = _numpy_init(lambda: nets.AttentionBlock(8, num_heads=2, rngs=nnx.Rngs(0)))
    x = _randn((2, 4, 4, 8), 3)
    flip = lambda a: a[:, ::-1, ::-1]  # noqa: E731
    np.testing.assert_allclose(attn(flip(x)), flip(attn(x)), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_output():
    net = nets.MLP(2, hidden=16, depth=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = nnx.state(net, nnx.Param)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(F32)}
    x = jnp.ones((3, 2), F32)
    out = net(x, 0.5)
    ref = nnx.merge(*nnx.split(nets.MLP(2, hidden=16, depth=1, rngs=nnx.Rngs(0))))(x, 0.5)
    assert out.dtype == F32
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05)  # bfloat16 has 8 mantissa bits


def test_classifier_log_prob_is_normalised():
    clf = _numpy_init(
        lambda: nets.Classifier(
            2, 5, image_size=8, channels=8, channel_mults=(1, 2), rngs=nnx.Rngs(0)
        )
    )
    x = _randn((3, 8, 8, 2), 0)
    logits = clf(x, jnp.array([0.1, 0.5, 0.9]))
    assert logits.shape == (3, 5)
    all_lp = jnp.stack([clf.log_prob(x, 0.5, jnp.full((3,), k)) for k in range(5)], axis=1)
    np.testing.assert_allclose(jax.nn.logsumexp(all_lp, axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(all_lp, jax.nn.log_softmax(clf(x, 0.5)), atol=1e-6)
    g = jax.grad(lambda x: clf.log_prob(x, 0.5, jnp.zeros(3, int)).sum())(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))


def test_group_norm_equals_flax_group_norm():
    # one-pass GroupNorm: the numbers, gradients, parameters and key draws of nnx.GroupNorm
    x = 3.0 * _randn((4, 8, 8, 64), 1) + 1.0
    ours = nets.GroupNorm(64, num_groups=32, rngs=nnx.Rngs(0))
    ref = nnx.GroupNorm(64, num_groups=32, rngs=nnx.Rngs(0))
    for m in (ours, ref):
        m.scale[...] = jnp.linspace(0.5, 2.0, 64, dtype=F32)
        m.bias[...] = jnp.linspace(-1.0, 1.0, 64, dtype=F32)
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=2e-6)
    grad = lambda m: jax.grad(lambda x: jnp.sum(jnp.sin(m(x))))(x)  # noqa: E731
    np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-4, atol=1e-5)
    shapes = lambda m: jax.tree.map(jnp.shape, nnx.state(m, nnx.Param))  # noqa: E731
    assert shapes(ours) == shapes(ref)
    r1, r2 = nnx.Rngs(3), nnx.Rngs(3)
    nets.GroupNorm(8, num_groups=4, rngs=r1), nnx.GroupNorm(8, num_groups=4, rngs=r2)
    assert jnp.array_equal(jax.random.key_data(r1.params()), jax.random.key_data(r2.params()))


def test_unet_upsampling_and_attention_formulas():
    from jaxdiff.nets import unet as U

    x = _randn((2, 4, 4, 8), 2)
    np.testing.assert_array_equal(
        U._upsample(x), jax.image.resize(x, (2, 8, 8, 8), method="nearest")
    )
    block = _numpy_init(lambda: nets.AttentionBlock(8, num_heads=2, rngs=nnx.Rngs(0)))
    qkv = block.qkv(block.norm(x)).reshape(2, 16, 3, 2, 4)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    a = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 4, 4, 8)
    np.testing.assert_allclose(block(x), (x + block.out(a)) / np.sqrt(2), rtol=1e-5, atol=1e-6)
