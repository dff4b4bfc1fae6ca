"""The shipped digits classifier: a small CNN whose penultimate layer is the feature space for FD.

``digits_classifier()`` loads ``digits_classifier.safetensors`` (beside this file; 154 KB of float32
weights) into a ``jaxdiff.metrics.Classifier``. The network (``DigitsCNN``) on 8x8x1 images in [-1, 1]:

    conv 3x3, 16 ch, SiLU -> conv 3x3 stride 2, 32 ch, SiLU (4x4x32) -> dense 64, SiLU (= features)
    -> dense 10 (= logits)

It was trained on the "train" split only by ``python -m jaxdiff.pretrained.train_classifier`` (see
that module for the recipe and the measured numbers); the weights file's metadata records the
recipe and the test-split accuracy.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.metrics import Classifier
from jaxdiff.pretrained.data import DIGITS_SHAPE, NUM_CLASSES

__all__ = ["DigitsCNN", "WEIGHTS_FILE", "digits_classifier", "save_weights", "load_weights"]

WEIGHTS_FILE = Path(__file__).with_name("digits_classifier.safetensors")


class DigitsCNN(nn.Module):
    """Small CNN returning ``(logits, features)`` for NHWC images.

    Attributes:
        channels: output channels of the two 3x3 convolutions (the second has stride 2).
        feature_dim: width of the penultimate layer (the features).
        num_classes: number of logits.
    """

    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 64
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.Conv(self.channels[0], (3, 3), padding="SAME", name="conv1")(x))
        h = nn.silu(nn.Conv(self.channels[1], (3, 3), strides=2, padding="SAME", name="conv2")(h))
        features = nn.silu(nn.Dense(self.feature_dim, name="dense")(h.reshape(h.shape[0], -1)))
        return nn.Dense(self.num_classes, name="head")(features), features


def save_weights(path, params, metadata: dict) -> Path:
    """Write flax ``params`` as safetensors ("/"-joined names) with JSON-encoded ``metadata``."""
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(params, sep="/")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in metadata.items()})
    return Path(path)


def load_weights(path):
    """Read what ``save_weights`` wrote: ``(params, metadata)`` with NumPy leaves."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        flat = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return traverse_util.unflatten_dict(flat, sep="/"), metadata


def make_classifier(params, config: dict | None = None) -> Classifier:
    """A ``Classifier`` for ``DigitsCNN(**config)`` with ``params`` (the flax ``"params"`` collection)."""
    module = DigitsCNN(**{k: tuple(v) if isinstance(v, list) else v for k, v in (config or {}).items()})
    params = {"params": params} if "params" not in params else params
    return Classifier(_apply_fn(module), params, DIGITS_SHAPE)


@functools.lru_cache(maxsize=None)
def _apply_fn(module: DigitsCNN):
    # one function object per architecture, so jit caches keyed on the static ``apply_fn`` are reused
    def apply(params, x):
        return module.apply(params, x)

    return apply


@functools.lru_cache(maxsize=1)
def _shipped():
    params, metadata = load_weights(WEIGHTS_FILE)
    return make_classifier(jax_tree(params), metadata.get("config")), metadata


def jax_tree(params):
    return {k: jax_tree(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in params.items()}


def digits_classifier() -> Classifier:
    """The shipped digits classifier (test-split accuracy 0.997; 64-d SiLU features).

    Inputs are images of shape ``(n, 8, 8, 1)`` in [-1, 1], as returned by ``digits_data``. Use
    ``features`` for ``jaxdiff.metrics.frechet_distance`` and ``predict``/``class_accuracy`` for labels.
    The recipe and the measured accuracy are in the weights' metadata
    (``load_weights(WEIGHTS_FILE)[1]``) and in ``jaxdiff.pretrained.train_classifier``.

    Returns:
        A ``jaxdiff.metrics.Classifier`` (a pytree: pass it through ``jax.jit``).

    Example:
        >>> clf = digits_classifier()
        >>> x, y = jd.pretrained.digits_data("test")
        >>> clf.logits(x).shape, clf.features(x).shape
        ((599, 10), (599, 64))
    """
    return _shipped()[0]
