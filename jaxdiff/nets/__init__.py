"""flax networks: the diffusers-compatible U-Net (``UNet2D``) and a small MLP denoiser.

``UNet2D``/``UNet2DConfig`` reproduce diffusers' ``UNet2DModel`` with its parameter names (load
checkpoints with ``jaxdiff.hub``); ``unet_fn`` and ``as_model`` give the ``fn(x, t_model, args)``
that ``jaxdiff.Denoiser`` wraps.
"""

from jaxdiff.nets.mlp import MLPDenoiser, as_model
from jaxdiff.nets.unet import UNet2D, UNet2DConfig, unet_fn

__all__ = ["MLPDenoiser", "as_model", "UNet2D", "UNet2DConfig", "unet_fn"]
