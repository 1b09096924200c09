"""The FID Inception-v3 in plain JAX (jaxdiff.inception) and jaxdiff.metrics.fid_inception.

The real weights cannot be downloaded here, so the network runs on seeded random weights written
to an ``.npz`` with the full pytorch-fid key set (this also tests the loader: OIHW -> HWIO, BN
folding), and is compared with pytorch-fid run on the same weights (tests/data/fid_reference.npz).
The layer table is checked against the documented size of Inception-v3 without its classifier
(Keras ``InceptionV3(include_top=False)``: 21,802,784 parameters of which 34,432 are the BN
moving statistics, i.e. 17,216 BN channels and 21,751,136 conv weights).
"""

import fid_reference  # tests/fid_reference.py: the pytorch-fid reference generator
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _xla import OPTIMIZED

from jaxdiff import inception, metrics


@pytest.fixture(autouse=True, scope="module")
def optimized_inception():
    """Running the 299x299 network, not compiling it, dominates this file (three times faster
    with LLVM's optimizations, see tests/_xla.py)."""
    fast = jax.jit(
        inception.inception_features, static_argnames="resize_to", compiler_options=OPTIMIZED
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "_features_jit", fast)
        yield


def random_state_dict(seed=0):
    """Every key of the pytorch-fid state dict with its PyTorch shape (He-normal kernels, random BN
    statistics), plus keys the loader must ignore; the same generator as the pytorch-fid reference."""
    return fid_reference.random_state_dict(inception.state_dict_shapes(), seed)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    sd = random_state_dict()
    path = tmp_path_factory.mktemp("inception") / "fid_inception.npz"
    np.savez(path, **sd)
    return path, sd


@pytest.fixture(scope="module")
def params(weights):
    return inception.load_params(weights[0])


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return rng.uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)


def test_layer_table_matches_documented_inception_size():
    shapes = inception.unit_shapes()
    assert len(shapes) == 94
    assert sum(int(np.prod(s)) for s in shapes.values()) == 21_751_136
    assert sum(s[3] for s in shapes.values()) == 17_216
    assert len(inception.state_dict_shapes()) == 5 * 94


def test_loader_converts_layout_and_folds_batch_norm(weights, params):
    _, sd = weights
    name = "Mixed_6b.branch7x7_2"  # a (1, 7) kernel: OIHW (128, 128, 1, 7) -> HWIO (1, 7, 128, 128)
    p = params[name]
    assert p["kernel"].shape == (1, 7, 128, 128) and p["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(p["kernel"][0, 3, 5, 9], sd[f"{name}.conv.weight"][9, 5, 0, 3])
    scale = sd[f"{name}.bn.weight"] / np.sqrt(sd[f"{name}.bn.running_var"] + 1e-3)
    shift = sd[f"{name}.bn.bias"] - sd[f"{name}.bn.running_mean"] * scale
    np.testing.assert_allclose(p["scale"], scale, rtol=1e-6)
    np.testing.assert_allclose(p["shift"], shift, rtol=1e-6, atol=1e-7)
    assert set(params) == set(inception.unit_shapes())


def test_avg_pool_excludes_padding():
    # count_include_pad=False: the mean of a constant image is the constant, corners included
    x = jnp.full((1, 5, 4, 2), 3.0)
    np.testing.assert_allclose(inception._avg_pool(x), 3.0, rtol=1e-12)


def test_features_shape_finite_and_batch_independent(params, images):
    # n = 6 in batches of 4 (last batch zero-padded) equals one batch of 6: inference-mode BN
    f = inception.pool3_features(params, images, batch_size=4)
    assert f.shape == (6, 2048) and f.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(f))) and float(jnp.std(f)) > 1e-3
    np.testing.assert_allclose(f, inception.pool3_features(params, images, batch_size=6), atol=1e-5)


def test_grayscale_is_repeated_to_rgb(params):
    gray = np.random.default_rng(2).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    f = inception.pool3_features(params, gray, batch_size=3)
    assert f.shape == (3, 2048) and bool(jnp.all(jnp.isfinite(f)))
    rgb = np.repeat(gray, 3, axis=-1)
    np.testing.assert_allclose(f, inception.pool3_features(params, rgb, batch_size=3), atol=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(weights, images):
    path, _ = weights
    other = np.random.default_rng(3).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
    other = np.clip(other + 0.5, -1, 1)
    same = metrics.fid_inception(images, images, path, batch_size=6)
    ab = metrics.fid_inception(images, other, path, batch_size=6)
    ba = metrics.fid_inception(other, images, path, batch_size=6)
    # measured: same = 5.7e-14, ab = ba = 1351.85 (equal to the last digit)
    assert same < 1e-9 * ab, (same, ab)
    assert abs(ab - ba) < 1e-9 * ab, (ab, ba)


def test_few_point_frechet_equals_frechet_distance():
    # fid_inception's path for n <= d (no 2048 x 2048 eigh): same value as the d x d formula;
    # measured relative difference 1.2e-8 (the eigh path's clipped null eigenvalues)
    rng = np.random.default_rng(4)
    f1, f2 = rng.standard_normal((8, 40)), 0.5 + 2 * rng.standard_normal((12, 40))
    ref = metrics.frechet_distance(*metrics.gaussian_stats(f1), *metrics.gaussian_stats(f2))
    np.testing.assert_allclose(metrics._frechet_few_points(f1, f2), ref, rtol=1e-7)
    np.testing.assert_allclose(metrics._frechet_few_points(f2, f1), ref, rtol=1e-7)


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    sd = random_state_dict()
    del sd["Mixed_7c.branch_pool.bn.running_var"]
    path = tmp_path / "broken.npz"
    np.savez(path, **sd)
    with pytest.raises(KeyError, match="Mixed_7c.branch_pool.bn.running_var"):
        inception.load_params(path)
    sd = random_state_dict()
    sd["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
    np.savez(path, **sd)
    with pytest.raises(ValueError, match=r"Mixed_5b.branch1x1.conv.weight.*\(64, 192, 1, 1\)"):
        metrics.fid_inception(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)), path)


def test_missing_file_and_bad_images(weights, tmp_path):
    x = np.zeros((4, 8, 8, 3))
    with pytest.raises(FileNotFoundError, match="(?s)pt_inception-2015-12-05.*np.savez"):
        metrics.fid_inception(x, x, tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"samples must be images of shape.*\(4, 8, 8, 2\)"):
        metrics.fid_inception(np.zeros((4, 8, 8, 2)), x, weights[0])
    with pytest.raises(ValueError, match=r"real must be images of shape.*\(4, 64\)"):
        metrics.fid_inception(x, np.zeros((4, 64)), weights[0])
    with pytest.raises(ValueError, match="resize_to must be at least 75"):
        inception.inception_features({}, jnp.zeros((1, 8, 8, 3)), resize_to=74)


# --- against pytorch-fid (tests/data/fid_reference.npz, made by tests/fid_reference.py) ---------
@pytest.fixture(scope="module")
def reference():
    with np.load(fid_reference.OUT) as f:
        return {k: f[k] for k in f.files}


def test_state_dict_names_and_shapes_are_pytorch_fids(reference):
    theirs = {
        str(k): tuple(int(d) for d in s if d)
        for k, s in zip(reference["names"], reference["shapes"], strict=True)
    }
    assert inception.state_dict_shapes() == theirs


@pytest.mark.parametrize("size", ["small", "large"])
def test_features_equal_pytorch_fid_with_the_same_weights(params, reference, size):
    # Same random weights on both sides. pytorch-fid resizes [0, 1] images to 299x299 and maps
    # them to [-1, 1]; jaxdiff takes [-1, 1] images, so the two differ only by float rounding.
    # Measured (37x52 upsampled): max |difference| 1.9e-5 with max |feature| 24.6. The test
    # catches each FID quirk: average pools counting the padding give 1.5, an average pool in
    # Mixed_7c 7.1, an antialiased resize of the 331x310 images 1.4.
    hw = () if size == "small" else fid_reference.LARGE
    ours = np.asarray(inception.pool3_features(params, fid_reference.reference_images(*hw)))
    theirs = reference["features" if size == "small" else "features_large"]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def test_frechet_distance_equals_pytorch_fid(reference):
    value = metrics.frechet_distance(*fid_reference.reference_gaussians())
    np.testing.assert_allclose(value, float(reference["frechet_distance"]), rtol=1e-9)
