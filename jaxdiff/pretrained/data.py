"""The 8x8 handwritten digits, shipped inside the package, with a fixed train/test split.

The images are the "Optical Recognition of Handwritten Digits" test set (E. Alpaydin and C. Kaynak,
UCI Machine Learning Repository, 1998) as redistributed by scikit-learn (``sklearn.datasets.load_digits``,
BSD-3-Clause): 1797 grey-scale 8x8 images with integer pixels 0..16 (counts of "on" pixels in 4x4
blocks of a 32x32 bitmap) and labels 0..9. ``digits.npz`` beside this file holds them as uint8, so
nothing at run time needs scikit-learn or a download.

The split is fixed and stored in the file (``is_test``); it was made by ``build_npz`` with this rule:

- for each class c = 0, 1, ..., 9 in that order, take the indices i with label c in dataset order;
- permute them with ``numpy.random.default_rng(SPLIT_SEED).permutation`` (one generator, drawn from
  class after class);
- the first ``round(n_c / 3)`` permuted indices are "test", the rest "train".

That holds out 599 images (59-61 per class) as "test" and leaves 1198 for "train". Within a split
images keep their dataset order. Diffusion models and the metric classifier are trained on "train"
only; sample quality is measured against "test".

The npz was made once with ``python -m jaxdiff.pretrained.data`` (scikit-learn installed).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

__all__ = [
    "DIGITS_SHAPE", "NUM_CLASSES", "SPLITS", "SPLIT_SEED", "DATA_FILE", "digits_data", "to_pixels", "stratified_split", "build_npz",
]

DIGITS_SHAPE = (8, 8, 1)
"""Shape of one image, NHWC without the batch axis."""
NUM_CLASSES = 10
SPLITS = ("train", "test", "all")
SPLIT_SEED = 0
"""Seed of the stratified split (see the module docstring for the rule)."""
DATA_FILE = Path(__file__).with_name("digits.npz")
PIXEL_MAX = 16
"""Raw pixels are integers 0..PIXEL_MAX; images in [-1, 1] are pixels / 8 - 1."""


@functools.lru_cache(maxsize=1)
def _raw():
    with np.load(DATA_FILE) as f:
        out = {k: f[k] for k in ("pixels", "labels", "is_test")}
    for v in out.values():
        v.setflags(write=False)  # cached and shared between calls
    return out


def digits_data(split: str = "train"):
    """The shipped digits as model-ready arrays.

    Pixels p in 0..16 become x = p / 8 - 1 in [-1, 1] (0 -> -1 is the background, 16 -> 1).

    Args:
        split: ``"train"`` (1198 images), ``"test"`` (599) or ``"all"`` (1797, dataset order);
            see the module docstring for the split rule.

    Returns:
        ``(images, labels)``: NumPy float32 of shape ``(n, 8, 8, 1)`` (NHWC) in [-1, 1], and
        NumPy int32 of shape ``(n,)`` in 0..9.

    Raises:
        ValueError: for an unknown ``split``.

    Example:
        >>> x, y = digits_data("test")
        >>> x.shape, x.dtype, y.shape
        ((599, 8, 8, 1), dtype('float32'), (599,))
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown `split={split!r}`; expected one of {SPLITS}.")
    raw = _raw()
    if split == "all":
        keep = np.ones(raw["labels"].shape, bool)
    else:
        keep = raw["is_test"] if split == "test" else ~raw["is_test"]
    pixels = raw["pixels"][keep]
    images = (pixels.astype(np.float32) / np.float32(PIXEL_MAX / 2) - np.float32(1.0))[..., None]
    return images, raw["labels"][keep].astype(np.int32)


def to_pixels(images):
    """Inverse of the scaling: x in [-1, 1] -> (x + 1) * 8, clipped to [0, 16] (float, not rounded)."""
    return np.clip((np.asarray(images, np.float64) + 1.0) * (PIXEL_MAX / 2), 0.0, PIXEL_MAX)


def stratified_split(labels, seed: int = SPLIT_SEED, fraction: float = 1.0 / 3.0):
    """The split rule of the module docstring: a boolean ``is_test`` mask of ``labels``' shape."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(labels.shape, bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_test[idx[: int(round(len(idx) * fraction))]] = True
    return is_test


def build_npz(path=DATA_FILE, seed: int = SPLIT_SEED):
    """(Re)build ``digits.npz`` from scikit-learn's copy; how the shipped file was made.

    Stores ``pixels`` (uint8, (1797, 8, 8)), ``labels`` (uint8, (1797,)), ``is_test`` (bool,
    (1797,), from ``stratified_split(labels, seed)``) and ``split_seed``, compressed.
    Needs scikit-learn (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Rebuilding the digits file needs scikit-learn: `pip install scikit-learn`.") from e
    d = load_digits()
    pixels = np.asarray(d.images)
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= PIXEL_MAX):
        raise ValueError("scikit-learn's digits are no longer integers in 0..16; the uint8 format does not fit.")
    labels = np.asarray(d.target)
    np.savez_compressed(
        path,
        pixels=pixels.astype(np.uint8),
        labels=labels.astype(np.uint8),
        is_test=stratified_split(labels, seed),
        split_seed=np.int64(seed),
    )
    _raw.cache_clear()
    return Path(path)


if __name__ == "__main__":
    out = build_npz()
    x, y = digits_data("all")
    print(f"wrote {out} ({out.stat().st_size} bytes): {len(y)} images, "
          f"train {len(digits_data('train')[1])}, test {len(digits_data('test')[1])}")
