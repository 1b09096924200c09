"""Data: toy sets match their definitions, loaders read what was written, the iterator visits each
epoch as a permutation, splits it across hosts, and resumes exactly; bad inputs give clear errors."""

import gzip
import pickle

import numpy as np
import pytest
from PIL import Image

from jaxdiff import data


# --- toy sets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", data.TOY_SETS)
def test_toy_sets_are_seeded(name):
    a, b, c = (
        data.toy_2d(name, 500, seed=0),
        data.toy_2d(name, 500, seed=0),
        data.toy_2d(name, 500, seed=1),
    )
    assert a.x.shape == (500, 2) and a.x.dtype == np.float32 and a.y.shape == (500,)
    np.testing.assert_array_equal(a.x, b.x)
    assert np.abs(a.x - c.x).max() > 0.1
    assert 0 <= a.y.min() and a.y.max() < a.num_classes


def test_gaussian_mixture_and_rings_statistics():
    # Mixture: component k has mean 2 (cos 2 pi k / 8, sin 2 pi k / 8) and std 0.2; with ~1000
    # points per component the sample mean is within 5 standard errors (0.2/sqrt(1000) = 0.0063).
    d = data.toy_2d("gaussian_mixture", 8000, seed=0)
    for k in range(8):
        pts = d.x[d.y == k]
        mean = 2 * np.array([np.cos(2 * np.pi * k / 8), np.sin(2 * np.pi * k / 8)])
        np.testing.assert_allclose(pts.mean(0), mean, atol=5 * 0.2 / np.sqrt(len(pts)))
        np.testing.assert_allclose(pts.std(0), 0.2, rtol=0.15)
    r = data.toy_2d("rings", 4000, seed=0)
    radius = np.linalg.norm(r.x, axis=1)
    for k in range(4):
        np.testing.assert_allclose(radius[r.y == k].mean(), 0.5 * (k + 1), atol=0.01)


def test_checkerboard_lies_on_black_squares():
    d = data.toy_2d("checkerboard", 2000, seed=0)
    assert np.all(np.abs(d.x) <= 2)
    # FFJORD's board: floor(x1) + floor(x2) is even on every occupied square.
    assert np.all((np.floor(d.x[:, 0]) + np.floor(d.x[:, 1])) % 2 == 0)


def test_unknown_toy_set():
    with pytest.raises(ValueError, match="unknown toy set 'spiral'; choose one of moons"):
        data.toy_2d("spiral", 10)


def test_digits():
    d = data.digits()
    assert d.x.shape == (1797, 8, 8, 1) and d.num_classes == 10
    assert d.x.min() == -1.0 and d.x.max() == 1.0


def test_array_dataset_validation():
    with pytest.raises(ValueError, match="finite"):
        data.ArrayDataset(np.array([[0.0], [np.nan]], np.float32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\)"):
        data.ArrayDataset(np.zeros((3, 1), np.float32), np.array([0, 1, 2]), 2)


# --- iterator -----------------------------------------------------------------------------------
def _indexed(n):
    """Data whose value is its index, so batches reveal the order."""
    return data.ArrayDataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n) % 3, 3)


def test_each_epoch_is_a_permutation():
    it = data.make_iterator(_indexed(40), 8, seed=3)
    epochs = [np.concatenate([next(it)["x"][:, 0] for _ in range(5)]) for _ in range(2)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(40))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_iterator_is_deterministic_and_resumable():
    a = data.make_iterator(_indexed(50), 8, seed=1)
    b = data.make_iterator(_indexed(50), 8, seed=1)
    for _ in range(4):
        next(a)
    state = a.get_state()
    rest_a = [next(a)["x"] for _ in range(10)]  # crosses an epoch boundary (6 batches / epoch)
    b.set_state(state)
    for x, batch in zip(rest_a, (next(b) for _ in range(10)), strict=True):
        np.testing.assert_array_equal(x, batch["x"])


def test_hosts_get_disjoint_shards():
    d = _indexed(48)
    shards = [data.make_iterator(d, 6, seed=5, process_index=h, process_count=2) for h in range(2)]
    seen = [np.concatenate([next(it)["x"][:, 0] for _ in range(4)]) for it in shards]
    assert len(np.intersect1d(seen[0], seen[1])) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(48))


def test_labels_follow_examples_and_can_be_dropped():
    batch = next(data.make_iterator(_indexed(30), 10, seed=0))
    np.testing.assert_array_equal(batch["y"], batch["x"][:, 0].astype(int) % 3)
    assert "y" not in next(data.make_iterator(_indexed(30), 10, labels=False))


def test_batch_larger_than_data():
    with pytest.raises(
        ValueError, match=r"batch_size=64 must be between 1 and the examples per host \(30"
    ):
        data.make_iterator(_indexed(30), 64)


# --- files --------------------------------------------------------------------------------------
def test_npz_roundtrip(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    d = data.load_npz(tmp_path / "a.npz", y_key="y")
    np.testing.assert_array_equal(d.x, x)
    assert d.num_classes == 3
    with pytest.raises(KeyError, match=r"has no array 'images'; it holds \['x', 'y'\]"):
        data.load_npz(tmp_path / "a.npz", x_key="images")
    with pytest.raises(FileNotFoundError, match="no .npz file"):
        data.load_npz(tmp_path / "missing.npz")


def _png(path, array):
    Image.fromarray(array).save(path)


def test_image_folder_flat_and_by_class(tmp_path):
    img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    for i in range(3):
        _png(tmp_path / f"{i}.png", img)
    d = data.load_image_folder(tmp_path)
    assert d.x.shape == (3, 4, 4, 3) and d.y is None
    np.testing.assert_allclose(d.x[0], img / 127.5 - 1, atol=1e-6)
    classes = tmp_path / "classes"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        _png(classes / name / "a.png", np.zeros((4, 4), np.uint8))
    d = data.load_image_folder(classes)
    assert d.x.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(d.y, [0, 1])


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        data.load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(tmp_path / "nope")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _png(mixed / "a.png", np.zeros((4, 4, 3), np.uint8))
    _png(mixed / "b.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4, 3\).*b.png is \(5, 4, 3\)"):
        data.load_image_folder(mixed)


def _idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_idx(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    suffix = ".gz" if compress else ""
    _idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    _idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    d = data.load_mnist(tmp_path)
    assert d.x.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(d.x[..., 0], images / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(d.y, labels)


def test_mnist_missing(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="missing train-images-idx3-ubyte, train-labels-idx1"
    ):
        data.load_mnist(tmp_path / "mnist")


def test_cifar10_from_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    first = None
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), b"labels": [i, 9 - i]}
        first = batch if first is None else first
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    d = data.load_cifar10(tmp_path)
    assert d.x.shape == (10, 32, 32, 3) and d.num_classes == 10
    row = first[b"data"][0]  # 1024 red, 1024 green, 1024 blue values, row-major
    np.testing.assert_allclose(d.x[0, 0, 1], row[[1, 1025, 2049]] / 127.5 - 1, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing test_batch"):
        data.load_cifar10(tmp_path, split="test")
