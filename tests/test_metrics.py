"""Metrics against closed forms: sliced Wasserstein under a translation, MMD between Gaussians,
the Frechet distance of diagonal Gaussians, and the classifier metrics with the feature
classifier of experiments.classifier trained on digits; ``import jaxdiff`` stays light."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import classifier as judges
from jaxdiff import metrics

KEY = jax.random.key(0)


def gaussian(n, d=2, key=0):
    return jax.random.normal(jax.random.key(key), (n, d))


# --- sliced Wasserstein ------------------------------------------------------------------------
def test_sliced_wasserstein_is_zero_for_the_same_measure():
    x = gaussian(300)
    perm = jax.random.permutation(jax.random.key(5), 300)
    assert float(metrics.sliced_wasserstein(x, x[perm], key=KEY)) == 0.0
    # x repeated three times is the same empirical measure (different set sizes).
    x3 = jnp.concatenate([x, x, x])
    assert float(metrics.sliced_wasserstein(x, x3, key=KEY)) < 1e-7


def test_sliced_wasserstein_of_a_translation_is_the_projected_shift():
    # W_2(theta#mu, theta#(mu + m)) = |theta . m|, and E_theta (theta . m)^2 = |m|^2 / d.
    x, m = gaussian(50), jnp.array([1.0, 2.0])  # exact for any n: only the projections are random
    sw = metrics.sliced_wasserstein(x, x + m, key=KEY, n_projections=4000)
    np.testing.assert_allclose(float(sw) ** 2, float(m @ m) / 2, rtol=0.05)
    y = gaussian(50, key=1)
    shifts = [float(metrics.sliced_wasserstein(x, y + a * m, key=KEY)) for a in (0.0, 0.5, 1.0)]
    assert shifts[0] < shifts[1] < shifts[2]


def test_sliced_wasserstein_exact_in_one_dimension_with_unequal_sizes():
    # Quantile functions: {0, 1} vs {0, 1/2, 1} differ by 1/2 on (1/3, 2/3): W_2^2 = 1/12.
    x, y = jnp.array([[0.0], [1.0]]), jnp.array([[0.0], [0.5], [1.0]])
    sw = metrics.sliced_wasserstein(x, y, key=KEY, n_projections=3)
    np.testing.assert_allclose(float(sw), np.sqrt(1 / 12), rtol=1e-12)
    sw1 = metrics.sliced_wasserstein(x, y, key=KEY, n_projections=3, p=1)
    np.testing.assert_allclose(float(sw1), 1 / 6, rtol=1e-12)


# --- MMD ---------------------------------------------------------------------------------------
def _mmd2_gaussians(delta2, d, h):
    """MMD^2 between N(0, I) and N(delta, I) under exp(-|a-b|^2 / 2h^2), in closed form."""
    c = (h**2 / (h**2 + 2.0)) ** (d / 2)
    return 2 * c * (1 - np.exp(-delta2 / (2 * (h**2 + 2.0))))


def test_mmd_matches_the_closed_form_between_gaussians():
    n, d, h = 1500, 2, 1.0
    x, y = gaussian(n, d, key=1), gaussian(n, d, key=2)
    delta = jnp.array([1.0, 0.0])
    # The unbiased estimate's standard deviation is about 0.008 at this n (20 seeds).
    np.testing.assert_allclose(
        float(metrics.mmd(x, y + delta, h)), _mmd2_gaussians(1.0, d, h), atol=0.03
    )
    assert abs(float(metrics.mmd(x, y, h))) < 0.005  # same distribution: mean 0, std ~ 6e-4
    # Identical sets: exactly -2 (k(0) - mean off-diagonal k) / n, of order 1/n.
    assert abs(float(metrics.mmd(x, x, h))) < 2.0 / n


def test_mmd_grows_with_a_mean_shift():
    x, y = gaussian(400, key=1), gaussian(400, key=2)
    m = jnp.array([1.0, 1.0])
    for bw in ((0.5, 1.0, 2.0), None):
        vals = [float(metrics.mmd(x, y + a * m, bw)) for a in (0.0, 0.5, 1.0, 2.0)]
        assert vals[0] < vals[1] < vals[2] < vals[3], vals


# --- Frechet distance --------------------------------------------------------------------------
def test_frechet_distance_of_identical_gaussians_is_zero():
    a = np.random.default_rng(0).normal(size=(5, 5))
    cov = a @ a.T + 0.1 * np.eye(5)
    assert metrics.frechet_distance(np.ones(5), cov, np.ones(5), cov) < 1e-10


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    ref = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    fd = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(fd, ref, rtol=1e-12)


def test_frechet_distance_full_covariances_against_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = a @ a.T, b @ b.T + 0.5 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    np.testing.assert_allclose(metrics.frechet_distance(mu1, c1, mu2, c2), ref, rtol=1e-9)
    np.testing.assert_allclose(
        metrics.frechet_distance(mu2, c2, mu1, c1), ref, rtol=1e-9
    )  # symmetric
    # A singular covariance (rank 1) is fine: eigh square roots, no complex parts.
    u = rng.normal(size=(4, 1))
    fd = metrics.frechet_distance(mu1, u @ u.T, mu1, u @ u.T)
    assert fd < 1e-10


def test_gaussian_stats_and_bad_shapes():
    f = np.random.default_rng(3).normal(size=(4000, 3)) * [1.0, 2.0, 3.0] + [0.0, 1.0, 2.0]
    mu, cov = metrics.gaussian_stats(f)
    np.testing.assert_allclose(mu, [0.0, 1.0, 2.0], atol=0.15)
    np.testing.assert_allclose(np.diag(cov), [1.0, 4.0, 9.0], rtol=0.08)
    with pytest.raises(ValueError, match=r"shape \(d,\)"):
        metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.gaussian_stats(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="same dimension"):
        metrics.mmd(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="n_projections"):
        metrics.sliced_wasserstein(np.zeros((5, 2)), np.zeros((5, 2)), key=KEY, n_projections=0)


# --- the feature classifier --------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_split():
    x, y = judges.digits_data()
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


@pytest.fixture(scope="module")
def classifier(digits_split, tmp_path_factory):
    x, y, _, _ = digits_split
    cache = tmp_path_factory.mktemp("cache")
    clf = judges.feature_classifier(
        x, y, name="digits-test", cache_dir=cache, steps=400, batch_size=128
    )
    return clf, cache


def test_feature_classifier_accuracy_on_held_out_digits(digits_split, classifier):
    _, _, x_te, y_te = digits_split
    clf, _ = classifier
    assert metrics.classifier_accuracy(clf, x_te, y_te) > 0.93
    # Same images as (n, 8, 8, 1) arrays: the classifier flattens.
    assert metrics.classifier_accuracy(clf, x_te.reshape(-1, 8, 8, 1), y_te) > 0.93
    assert metrics.classifier_features(clf, x_te).shape == (x_te.shape[0], 128)


def test_feature_classifier_is_cached_on_disk(digits_split, classifier):
    x, y, x_te, _ = digits_split
    clf, cache = classifier
    files = list(cache.glob("classifier-digits-test-*.npz"))
    assert len(files) == 1
    again = judges.feature_classifier(
        x, y, name="digits-test", cache_dir=cache, steps=400, batch_size=128
    )
    np.testing.assert_array_equal(again.logits(x_te), clf.logits(x_te))
    assert len(list(cache.glob("*.npz"))) == 1  # loaded, not retrained under a new name


def test_fd_classifier_separates_real_from_noise(digits_split, classifier):
    x, _, x_te, _ = digits_split
    clf, _ = classifier
    real = metrics.fd_classifier(x_te, x, clf)
    noise = np.random.default_rng(0).uniform(-1, 1, x_te.shape).astype(np.float32)
    fake = metrics.fd_classifier(noise, x, clf)
    assert real < 0.1 * fake, (real, fake)
    with pytest.raises(ValueError, match="64 values per example"):
        clf.logits(np.zeros((3, 10)))


def test_fid_inception_needs_local_weights(tmp_path):
    x = np.zeros((4, 8))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        metrics.fid_inception(x, x, tmp_path / "missing.pth")
    weights = tmp_path / "pt_inception.npz"
    weights.write_bytes(b"0")
    with pytest.raises(ValueError, match="n >= 2"):  # images are checked before weights load
        metrics.fid_inception(x, x, weights)


# --- what ``import jaxdiff`` loads -------------------------------------------------------------
def test_import_jaxdiff_leaves_heavy_modules_unloaded():
    # the FID network, sklearn, torch and the training stack load on first use only
    heavy = ["jaxdiff.inception", "sklearn", "torch", "flax", "optax", "orbax", "experiments"]
    code = (
        "import sys, jaxdiff\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "jaxdiff.inception\n"
        "print('jaxdiff.inception' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"], out.stdout + out.stderr


def test_moved_classifier_names_still_resolve_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="experiments.classifier.digits_data"):
        digits_data = metrics.digits_data
    assert digits_data is judges.digits_data
    with pytest.warns(DeprecationWarning, match="moved to experiments.classifier"):
        assert metrics.FeatureClassifier is judges.FeatureClassifier
    with pytest.raises(AttributeError, match="no attribute 'train'"):
        metrics.train  # noqa: B018


def test_digits_data_is_the_data_module_digits_flattened():
    x, y = judges.digits_data()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.shape == (1797,)
    assert set(np.unique(x)) == {k / 8 - 1 for k in range(17)}
    assert sorted(set(y.tolist())) == list(range(10))
