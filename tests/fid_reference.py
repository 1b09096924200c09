"""Reference outputs of pytorch-fid for checking jaxdiff.inception against it.

The real FID weights (``pt_inception-2015-12-05``) cannot be downloaded where jaxdiff is tested, so
the check is made with the same random weights on both sides: :func:`random_state_dict` writes
every key of the pytorch-fid state dict from a NumPy seed. Run once, in an environment with torch,
torchvision and pytorch-fid (it needs neither jax nor jaxdiff)::

    python tests/fid_reference.py

It builds ``pytorch_fid.inception.InceptionV3([3])`` (the FID network: resize to 299x299,
[0, 1] -> [-1, 1], pool3 features) with those weights in place of the downloaded ones and writes
``tests/data/fid_reference.npz``: the state-dict names and shapes of pytorch-fid's network, the
pool3 features of :func:`reference_images`, and ``calculate_frechet_distance`` of two Gaussians.
``tests/test_inception.py`` compares jaxdiff with these numbers. This module is not a test file
(pytest collects ``test_*.py`` only); the tests import its two generators.
"""

from importlib.metadata import version
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "data" / "fid_reference.npz"
LARGE = (331, 310)  # a size above 299 in both axes


def random_state_dict(shapes, seed=0):
    """Every key of ``shapes`` (name -> PyTorch shape): He-normal kernels, BN scales and variances
    in [0.5, 1.5], small random BN shifts and means; plus the classifier and a BN counter, keys a
    loader must ignore (pytorch-fid's network has a 1008-way ``fc``)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith("conv.weight"):
            std = np.sqrt(2.0 / np.prod(shape[1:]))
            sd[key] = (std * rng.standard_normal(shape)).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    sd["fc.weight"] = (0.01 * rng.standard_normal((1008, 2048))).astype(np.float32)
    sd["fc.bias"] = np.zeros((1008,), np.float32)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
    return sd


def reference_images(h=37, w=52):
    """Three non-square RGB images ``(3, h, w, 3)`` in [-1, 1] (NHWC, jaxdiff's layout): smooth
    gradients plus noise, so the bilinear resize, both image axes and the channel order matter.
    The default size is upsampled to 299x299; ``(331, 310)`` is downsampled (no antialiasing in
    pytorch-fid's ``F.interpolate``)."""
    rng = np.random.default_rng(1)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    base = np.stack([xx, yy, xx * yy], axis=-1)
    imgs = [np.clip(s * base + 0.3 * rng.standard_normal((h, w, 3)), -1, 1) for s in (1, -0.5, 0.8)]
    return np.stack(imgs).astype(np.float32)


def reference_gaussians():
    """Two 16-d Gaussians (mean, covariance) for the Frechet-distance formula."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))
    return rng.standard_normal(16), a @ a.T / 16, 0.5 + rng.standard_normal(16), b @ b.T / 8


def _pytorch_fid_shapes():
    """Names and shapes of pytorch-fid's FID network, read off the network itself."""
    import torch
    from pytorch_fid import inception as pfi

    pfi.load_state_dict_from_url = lambda *a, **k: None  # no download, and no weights to load
    original = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None
    try:
        model = pfi.fid_inception_v3()
    finally:
        torch.nn.Module.load_state_dict = original
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def main():
    import torch
    from pytorch_fid import fid_score
    from pytorch_fid import inception as pfi

    shapes = _pytorch_fid_shapes()
    sd = random_state_dict(shapes)
    pfi.load_state_dict_from_url = lambda *a, **k: {k: torch.from_numpy(v) for k, v in sd.items()}
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    def features(images):
        x = torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2)  # NCHW in [0, 1]
        with torch.no_grad():
            return model(x)[0][:, :, 0, 0].numpy()

    gaussians = reference_gaussians()
    fd = fid_score.calculate_frechet_distance(*gaussians)
    names = sorted(shapes)
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(
        OUT,
        names=np.array(names),
        shapes=np.array([list(shapes[k]) + [0] * (4 - len(shapes[k])) for k in names]),
        features=features(reference_images()),
        features_large=features(reference_images(*LARGE)),
        frechet_distance=np.float64(fd),
        versions=np.array(
            [f"{name} {version(name)}" for name in ("torch", "pytorch-fid", "scipy")]
        ),
    )
    print(f"wrote {OUT}; Frechet distance {fd:.10g}")


if __name__ == "__main__":
    main()
