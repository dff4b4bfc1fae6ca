"""The digits diffusion model of ``jaxdiff.pretrained.train_digits`` as an optimizer workload.

The training loss is the shipped model's: a class-conditional diffusers ``UNet2DModel`` under
``squaredcos_cap_v2`` with v-prediction, min-SNR-5 weighting, uniform continuous times and label
dropout 0.1 (``train_digits.denoiser``, ``LABEL_DROPOUT``, ``NULL_LABEL``). Only the optimizer is
ours to choose. The validation metric is cheap and deterministic: the denoising loss on 128 held-out
test digits at fixed times and noise (``jaxdiff.losses.denoising_loss(..., t=, noise=)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.workloads.base import Workload


def config(scale: str = "cpu"):
    """CPU scale: a two-level U-Net with 8/16 channels and one attention level (~25k parameters);
    GPU scale: the shipped model's ``train_digits.CONFIG`` (1.1M parameters)."""
    from jaxdiff.nets import UNet2DConfig
    from jaxdiff.pretrained import train_digits
    from jaxdiff.pretrained.digits import NULL_LABEL

    if scale != "cpu":
        return train_digits.CONFIG
    return UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=8,
                        norm_num_groups=4, num_class_embeds=NULL_LABEL + 1)


def digits_unet(scale: str = "cpu", target: float = 0.295) -> Workload:
    """Denoising-loss training of the digits U-Net; batches of 16 (GPU scale: 128), 100 steps (4000)."""
    from jaxdiff import losses
    from jaxdiff.nets import UNet2D
    from jaxdiff.pretrained import digits_data, train_digits
    from jaxdiff.pretrained.digits import NULL_LABEL

    cfg = config(scale)
    batch = 16 if scale == "cpu" else 128
    den = train_digits.denoiser(cfg)
    net = UNet2D(cfg)
    (xtr, ytr), (xte, yte) = digits_data("train"), digits_data("test")
    xtr, ytr = jnp.asarray(xtr, jnp.float32), jnp.asarray(ytr)  # float32 also under jax_enable_x64
    xte, yte = jnp.asarray(xte[:128], jnp.float32), jnp.asarray(yte[:128])
    k_t, k_noise = jax.random.split(jax.random.key(1234))
    t_val = jax.random.uniform(k_t, (xte.shape[0],), jnp.float32, minval=float(den.schedule.t_min),
                               maxval=float(den.schedule.t_max))
    noise_val = jax.random.normal(k_noise, xte.shape, jnp.float32)
    weighting = losses.MinSNR(5.0)

    def init(key):
        x = jnp.zeros((1, 8, 8, 1), jnp.float32)
        return net.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))

    def loss(params, b):
        x0, y, key = b
        k_drop, k_loss = jax.random.split(key)
        y = losses.drop_labels(k_drop, y, train_digits.LABEL_DROPOUT, NULL_LABEL)
        return losses.denoising_loss(den, (params, y), x0, k_loss, target="v", weighting=weighting,
                                     time_sampling="uniform")

    def get_batch(key, step):
        k_idx, k_loss = jax.random.split(jax.random.fold_in(key, step))
        idx = jax.random.randint(k_idx, (batch,), 0, xtr.shape[0])
        return xtr[idx], ytr[idx], k_loss

    def evaluate(params):
        return losses.denoising_loss(den, (params, yte), xte, jax.random.key(0), target="v", weighting=weighting,
                                     t=t_val, noise=noise_val)

    return Workload(
        name="digits_unet", init=init, loss=loss, batch=get_batch, evaluate=evaluate,
        metric="held-out v-prediction loss (min-SNR-5) at fixed t, noise", target=target,
        steps=100 if scale == "cpu" else 4000, eval_every=10, vectorize=False,
        notes=f"class-conditional U-Net {cfg.block_out_channels}, batch {batch}, the shipped model's loss; "
              "validation on 128 test digits at fixed (t, noise).")
