"""Small data and models shipped inside jaxdiff (nothing is downloaded).

- ``digits_data(split)``: the 8x8 handwritten digits (1797 images, 10 classes) with a fixed
  stratified train/test split, as float32 NHWC images in [-1, 1] (``jaxdiff.pretrained.data``).
- ``digits()``: the shipped class-conditional diffusion U-Net as ``(denoiser, variables)``, a diffusers
  folder that PyTorch diffusers loads too (``jaxdiff.pretrained.digits``); ``digits_args`` builds its
  ``args`` with or without classifier-free guidance.
- ``digits_classifier()``: a small CNN trained on the "train" split, a ``jaxdiff.metrics.Classifier``
  whose 64-d features serve the Frechet distance (``jaxdiff.pretrained.classifier``).

Example:
    >>> x, y = jd.pretrained.digits_data("test")
    >>> float(jd.metrics.class_accuracy(jd.pretrained.digits_classifier(), x, y)) >= 0.97
    True
"""

from jaxdiff.pretrained.classifier import DigitsCNN, digits_classifier
from jaxdiff.pretrained.data import DIGITS_SHAPE, NUM_CLASSES, digits_data
from jaxdiff.pretrained.digits import DIGITS_UNET_DIR, NULL_LABEL, digits, digits_args

__all__ = [
    "DIGITS_SHAPE", "NUM_CLASSES", "NULL_LABEL", "DIGITS_UNET_DIR", "digits", "digits_args", "digits_data",
    "digits_classifier", "DigitsCNN",
]
