"""The shipped digits diffusion model: the embedded default real model.

A class-conditional diffusers ``UNet2DModel`` (8x8x1, 1.1M parameters) trained on the "train" split of
``digits_data`` by ``python -m jaxdiff.pretrained.train_digits`` (v-prediction on diffusers'
``squaredcos_cap_v2`` 1000-step table, min-SNR-5 weighting, label dropout 0.1 for classifier-free
guidance, Prodigy, EMA 0.999). The weights live beside this file as a diffusers folder
(``DIGITS_UNET_DIR``: ``config.json``, ``diffusion_pytorch_model.safetensors``,
``scheduler_config.json``), so ``diffusers.UNet2DModel.from_pretrained(DIGITS_UNET_DIR)`` loads the
same network in PyTorch.

Labels are 0..9; ``NULL_LABEL`` (10) is the unconditional class used by classifier-free guidance.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp

from jaxdiff.hub import load_diffusers
from jaxdiff.pretrained.data import NUM_CLASSES

__all__ = ["DIGITS_UNET_DIR", "NULL_LABEL", "digits", "digits_args"]

DIGITS_UNET_DIR = Path(__file__).with_name("digits_unet")
NULL_LABEL = NUM_CLASSES
"""The label of the unconditional model (classifier-free guidance)."""


@functools.lru_cache(maxsize=None)
def digits(*, layout: str = "NHWC", dtype=None):
    """The shipped digits model as ``(denoiser, variables)``, offline.

    The model is ``fn(x, t_model, (variables, labels))`` with ``x`` of shape ``(B, 8, 8, 1)`` (NHWC, or
    ``(B, 1, 8, 8)`` with ``layout="NCHW"``) in [-1, 1] and int labels ``(B,)``; ``digits_args`` builds
    the ``args`` with or without classifier-free guidance.

    Args:
        layout: ``"NHWC"`` or ``"NCHW"``.
        dtype: computation dtype of the network (parameters stay float32), e.g. ``jnp.bfloat16``.

    Returns:
        ``(jaxdiff.Denoiser, variables)``; the denoiser has no guidance (add ``guidance=jd.CFG(scale)``
        with ``dataclasses.replace``).

    Example:
        >>> den, variables = jd.pretrained.digits()
        >>> labels = jnp.arange(10)
        >>> x_T = jax.random.normal(jax.random.key(0), (10, 8, 8, 1))
        >>> ts = jd.timesteps(den.schedule, 10, "time")
        >>> x = jd.sample(den, x_T, ts, jd.UniPC(), args=jd.pretrained.digits_args(variables, labels))
        >>> x.shape
        (10, 8, 8, 1)
    """
    return load_diffusers(DIGITS_UNET_DIR, layout=layout, dtype=dtype)


def digits_args(variables, labels, *, guidance: bool = False):
    """The model's ``args``: ``(variables, labels)``, or for ``guidance=jd.CFG(...)`` the pair
    ``((variables, labels), (variables, NULL_LABEL everywhere))``.

    Args:
        variables: the network variables from ``digits()``.
        labels: int class labels 0..9, shape ``(B,)``.
        guidance: whether the denoiser has classifier-free guidance.
    """
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`labels` must be integer class indices 0..{NUM_CLASSES - 1}; got dtype {labels.dtype}.")
    cond = (variables, labels)
    if not guidance:
        return cond
    return cond, (variables, jnp.full_like(labels, NULL_LABEL))
