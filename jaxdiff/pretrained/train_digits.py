"""Train the shipped digits model: ``python -m jaxdiff.pretrained.train_digits``.

A class-conditional diffusers ``UNet2DModel`` (``CONFIG``) learns the "train" split of the 8x8 digits
(``jaxdiff.pretrained.digits_data``) under diffusers' ``squaredcos_cap_v2`` DDPM table with
v-prediction (``SCHEDULER_CONFIG``):

- loss: ``jaxdiff.losses.denoising_loss`` with the v target, min-SNR-5 weighting (Hang et al., 2023)
  and continuous times (fractional DDPM indices, so every sampler grid is in distribution);
- classifier-free guidance training: each label is replaced by the null label ``NULL_LABEL`` with
  probability 0.1 (Ho & Salimans, 2022);
- optimizer: ``optax.chain(optax.clip_by_global_norm(1.0), optim.prodigy(**PRODIGY_PRESETS["diffusion"],
  learning_rate=cosine decay))``: no learning rate to tune;
- an EMA of the parameters (``jaxdiff.losses.ema_update``), which is what ships.

Everything random in step k comes from ``fold_in(key(seed), k)``, and the whole training state (step,
parameters, optimizer state, EMA) is a pytree that orbax checkpoints: stopping at step k and resuming
from the checkpoint gives the uninterrupted run bit for bit (``tests/jaxdiff/test_pretrained_digits.py``).

    python -m jaxdiff.pretrained.train_digits --steps 20000 --checkpoint-dir /tmp/digits_ckpt \
        --out jaxdiff/pretrained/digits_unet
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import optim
from jaxdiff import hub, losses
from jaxdiff.models import Denoiser
from jaxdiff.nets import UNet2D, UNet2DConfig, unet_fn
from jaxdiff.pretrained.data import digits_data
from jaxdiff.pretrained.digits import NULL_LABEL
from jaxdiff.schedules import VPDiscrete

__all__ = ["CONFIG", "SCHEDULER_CONFIG", "TrainState", "init_state", "make_step", "train"]

LABEL_DROPOUT = 0.1

CONFIG = UNet2DConfig(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=32,
    norm_num_groups=32,
    num_class_embeds=NULL_LABEL + 1,
)

SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "timestep_spacing": "trailing",
}


class TrainState(NamedTuple):
    """Everything that changes during training (an orbax-checkpointable pytree)."""

    step: jax.Array  # shape=(), int32
    params: Any  # flax variables {"params": ...}
    opt_state: Any
    ema: losses.EMA


def denoiser(config: UNet2DConfig = CONFIG) -> Denoiser:
    return Denoiser(unet_fn(UNet2D(config)), VPDiscrete.from_diffusers(SCHEDULER_CONFIG), "v")


def optimizer(num_steps: int) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(1.0, num_steps, alpha=0.05)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optim.prodigy(learning_rate=schedule, **optim.PRODIGY_PRESETS["diffusion"]),
    )


@functools.lru_cache(maxsize=None)
def _init_params(seed: int, config: UNet2DConfig):
    x = jnp.zeros((1,) + (config.sample_size, config.sample_size, config.in_channels), jnp.float32)
    return UNet2D(config).init(jax.random.key(seed), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


def init_state(seed: int, num_steps: int, config: UNet2DConfig = CONFIG) -> TrainState:
    """The state before step 0: U-Net initialised from ``seed``, fresh optimizer state, EMA = parameters."""
    params = _init_params(seed, config)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer(num_steps).init(params), losses.ema_init(params))


@functools.lru_cache(maxsize=None)
def make_step(num_steps: int, batch_size: int, ema_decay: float = 0.999, config: UNet2DConfig = CONFIG):
    """The jitted training step ``(state, seed) -> (state, loss)``; its randomness is ``fold_in(seed, step)``."""
    den, tx = denoiser(config), optimizer(num_steps)
    images, labels = (jnp.asarray(a) for a in digits_data("train"))

    def loss_fn(params, x0, y, key):
        k_drop, k_loss = jax.random.split(key)
        y = losses.drop_labels(k_drop, y, LABEL_DROPOUT, NULL_LABEL)
        return losses.denoising_loss(den, (params, y), x0, k_loss, target="v", weighting=losses.MinSNR(5.0),
                                     time_sampling="uniform")

    @jax.jit
    def step(state: TrainState, seed) -> tuple[TrainState, jax.Array]:
        k_batch, k_loss = jax.random.split(jax.random.fold_in(jax.random.key(seed), state.step))
        idx = jax.random.randint(k_batch, (batch_size,), 0, images.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(state.params, images[idx], labels[idx], k_loss)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = losses.ema_update(state.ema, params, ema_decay)
        return TrainState(state.step + 1, params, opt_state, ema), loss

    return step


def checkpoint_manager(directory: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=2))


def train(
    num_steps: int,
    *,
    batch_size: int = 128,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1000,
    stop_at: int | None = None,
    progress: bool = True,
    config: UNet2DConfig = CONFIG,
) -> TrainState:
    """Train for ``num_steps`` (resuming from the newest checkpoint in ``checkpoint_dir`` if there is one).

    Args:
        num_steps: length of the run (the learning-rate schedule's horizon).
        batch_size: images per step, drawn with replacement from the "train" split.
        seed: the initialisation and every step's randomness (``fold_in(key(seed), step)``).
        checkpoint_dir: orbax checkpoints of the whole ``TrainState`` every ``checkpoint_every`` steps and at the
            end; a run resumes from the newest one there.
        stop_at: end the run early (after a checkpoint) without changing the schedule, e.g. to test resuming.
        progress: show a tqdm bar.
        config: the U-Net (default ``CONFIG``, the shipped model's); 8x8x1 images, ``NULL_LABEL + 1`` classes.

    Returns:
        The final ``TrainState``; ``state.ema.params`` are the weights to sample with.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    state = init_state(seed, num_steps, config)
    manager = checkpoint_manager(checkpoint_dir) if checkpoint_dir else None
    if manager is not None and manager.latest_step() is not None:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    step = make_step(num_steps, batch_size, config=config)
    end = num_steps if stop_at is None else min(stop_at, num_steps)
    start = int(state.step)
    with tqdm(total=end, initial=start, disable=not progress, desc="train digits", unit="step") as bar:
        for k in range(start, end):
            state, loss = step(state, seed)
            if manager is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == end):
                manager.save(k + 1, args=ocp.args.StandardSave(state))
            if k % 50 == 0 or k + 1 == end:
                bar.set_postfix(loss=f"{float(loss):.4f}")
            bar.update(1)
    if manager is not None:
        manager.wait_until_finished()
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints; resumes from the newest one")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--out", default=None, help="write the EMA weights as a diffusers folder here")
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    state = train(opts.steps, batch_size=opts.batch_size, seed=opts.seed, checkpoint_dir=opts.checkpoint_dir,
                  checkpoint_every=opts.checkpoint_every)
    print(f"trained {int(state.step)} steps in {time.perf_counter() - start:.0f} s")
    if opts.out:
        hub.save_diffusers(opts.out, CONFIG, state.ema.params, SCHEDULER_CONFIG)
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
