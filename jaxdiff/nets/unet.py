"""A flax U-Net with exactly the architecture, and the parameter names, of diffusers' ``UNet2DModel``.

``UNet2DConfig`` holds ``UNet2DModel.__init__``'s arguments (diffusers' names and defaults), ``UNet2D``
is the network (NHWC), and ``unet_fn`` turns it into the ``fn(x, t_model, args)`` that
``jaxdiff.Denoiser`` wraps. Weights of a diffusers checkpoint load with ``jaxdiff.hub`` (no torch):
the flax tree mirrors the PyTorch state dict, ``down_blocks.0.resnets.1.conv1.weight`` being
``params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]`` (OIHW -> HWIO).

The forward pass follows diffusers' ``unet_2d.py``/``unet_2d_blocks.py``/``resnet.py``/``embeddings.py``/
``attention_processor.py`` operation for operation (Ho et al., 2020, arXiv:2006.11239, for the DDPM
architecture these checkpoints come from). The traps that change outputs silently, and what this
module does about them:

- ``downsample_padding=0`` (the DDPM checkpoints) pads right and bottom only before the stride-2
  conv (TF "SAME"); symmetric padding is wrong.
- ``attention_head_dim=None`` means ONE head of dimension C (the DDPM checkpoints); diffusers' default,
  8, means C // 8 heads.
- SiLU is applied to the time embedding inside every resnet, before ``time_emb_proj``; the
  ``TimestepEmbedding`` output itself is linear.
- GroupNorm uses the two-pass variance E[(x - mean)^2] as PyTorch does (flax's ``use_fast_variance``
  is off), with statistics in at least float32; the attention softmax runs in at least float32
  (diffusers' ``upcast_softmax``). Parameters stay float32 whatever the computation ``dtype``.
- With ``resnet_time_scale_shift="scale_shift"`` and no ``attn_norm_num_groups``, the mid block's
  attention has no GroupNorm (the down/up blocks' attentions always have one).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["UNet2DConfig", "UNet2D", "unet_fn", "timestep_embedding", "SUPPORTED"]

#: Values of the config fields this implementation supports (anything else is a ValueError).
SUPPORTED = {
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
    "mid_block_type": ("UNetMidBlock2D", None),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "time_embedding_type": ("positional", "fourier"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "class_embed_type": (None, "timestep", "identity"),
    "act_fn": ("silu", "swish", "mish", "gelu", "relu"),
}

# diffusers' ACT2CLS: torch's GELU is the exact (erf) one; swish is SiLU.
_ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}

_LAYOUTS = ("NHWC", "NCHW")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """The configuration of a diffusers ``UNet2DModel``: its ``__init__`` arguments, names and defaults.

    Frozen and hashable (sequences are stored as tuples), so it is static configuration for ``jit``.
    Build it from a checkpoint's ``config.json`` with ``from_diffusers`` and write one with
    ``to_diffusers``. Unsupported values (see ``SUPPORTED``) and inconsistent structures (list lengths,
    channel counts not divisible by the norm groups, attention head sizes) raise a ``ValueError`` at
    construction.

    Attributes:
        sample_size: image side (int or (H, W)) the model was trained at; informational, as in diffusers.
        in_channels, out_channels: image channels in and out.
        center_input_sample: map the input x to 2 x - 1 first.
        time_embedding_type: ``"positional"`` (sinusoidal, DDPM) or ``"fourier"`` (Gaussian Fourier
            projection of log t, the NCSN++ conversions; the output is divided by t).
        time_embedding_dim: width of the time embedding (default 4 * block_out_channels[0]).
        freq_shift, flip_sin_to_cos: sinusoidal embedding options (see ``timestep_embedding``).
        down_block_types, up_block_types: ``DownBlock2D``/``AttnDownBlock2D`` and
            ``UpBlock2D``/``AttnUpBlock2D``, one per resolution level.
        mid_block_type: ``"UNetMidBlock2D"`` or None (no mid block).
        block_out_channels: channels of each level.
        layers_per_block: resnets per down block (up blocks have one more).
        mid_block_scale_factor: the mid block's resnet ``output_scale_factor`` and attention
            ``rescale_output_factor``.
        downsample_padding: 0 pads right/bottom by one (TF "SAME"); p > 0 pads p on every side.
        downsample_type, upsample_type: ``"conv"``.
        dropout: dropout rate inside the resnets (active only with ``train=True``).
        act_fn: the resnets' activation (the time embedding MLP and the output head always use SiLU,
            as in diffusers).
        attention_head_dim: channels per attention head; None means one head over all channels.
        norm_num_groups: GroupNorm groups everywhere.
        attn_norm_num_groups: groups of the mid block attention's GroupNorm (None: ``norm_num_groups``
            with ``resnet_time_scale_shift="default"``, no GroupNorm with ``"scale_shift"``).
        norm_eps: GroupNorm epsilon.
        resnet_time_scale_shift: ``"default"`` (h + emb) or ``"scale_shift"`` (norm(h) (1 + s) + b).
        add_attention: whether the mid block has its attention.
        class_embed_type: None (an ``nn.Embed`` of ``num_class_embeds`` labels, if that is set),
            ``"timestep"`` (labels embedded like timesteps) or ``"identity"`` (labels are embeddings).
        num_class_embeds: number of class labels for the default class embedding.
        num_train_timesteps: only used by diffusers' ``"learned"`` time embedding (unsupported here).

    Example:
        >>> cfg = UNet2DConfig(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        >>> UNet2DConfig.from_diffusers(cfg.to_diffusers()) == cfg
        True
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    def __post_init__(self):
        # JSON gives lists; store tuples so the config stays hashable.
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            else:
                default = getattr(type(self), name)
                raise ValueError(f"`{name}` must be a sequence, got {value!r}; pass e.g. {default!r}.")
        if isinstance(self.sample_size, (list, tuple)):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self._check_values()
        self._check_structure()

    # ---------------------------------------------------------------------------------------------
    # diffusers config.json

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "UNet2DConfig":
        """The config of a diffusers ``UNet2DModel`` ``config.json`` dict (keys starting with ``_`` ignored).

        Warns when ``attention_head_dim`` is absent from a config with attention: diffusers then uses 8
        (C // 8 heads), while the DDPM checkpoints were trained with one head (their configs say null).

        Raises:
            ValueError: for a config of another model class, an unknown key, or an unsupported value.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"`UNet2DConfig.from_diffusers` takes the config.json dict, got {type(d).__name__}.")
        class_name = d.get("_class_name", "UNet2DModel")
        if class_name != "UNet2DModel":
            raise ValueError(
                f"This config is a diffusers `{class_name}`; only `UNet2DModel` configs are supported "
                "(UNet2DConditionModel, the Stable Diffusion U-Net, is not)."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(
                f"Unknown UNet2DModel config field(s) {unknown}; the known fields are {sorted(known)}. "
                "Remove them, or check that this is a UNet2DModel config."
            )
        config = cls(**{k: v for k, v in d.items() if not k.startswith("_")})
        if "attention_head_dim" not in d and any(True for _ in config._attentions()):
            warnings.warn(
                "This config.json has no `attention_head_dim`; using diffusers' default 8 (C // 8 attention heads), "
                "as diffusers does. The original DDPM checkpoints (google/ddpm-*) have ONE head per attention: "
                "add `\"attention_head_dim\": null` if the weights are one of those.",
                stacklevel=2,
            )
        return config

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` dict that diffusers' ``UNet2DModel.from_config`` accepts (JSON types)."""
        out: dict[str, Any] = {"_class_name": "UNet2DModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    # ---------------------------------------------------------------------------------------------
    # derived quantities

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding (diffusers: ``time_embedding_dim or 4 * block_out_channels[0]``)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def class_conditional(self) -> bool:
        """Whether the model has a class embedding (and so needs ``class_labels``)."""
        return self.class_embed_type is not None or self.num_class_embeds is not None

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this: 2 ** (number of down blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _mid_attention_groups(self) -> int | None:
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_num_groups if self.resnet_time_scale_shift == "default" else None

    # ---------------------------------------------------------------------------------------------
    # validation

    def _check_values(self):
        def reject(name, value, allowed):
            raise ValueError(f"`{name}={value!r}` is not supported; supported values: {list(allowed)}.")

        for name in ("down_block_types", "up_block_types"):
            for i, value in enumerate(getattr(self, name)):
                if value not in SUPPORTED[name]:
                    raise ValueError(
                        f"`{name}[{i}]={value!r}` is not supported; supported block types: {list(SUPPORTED[name])}."
                    )
        for name in ("mid_block_type", "downsample_type", "upsample_type", "time_embedding_type",
                     "resnet_time_scale_shift", "class_embed_type"):
            value = getattr(self, name)
            if value not in SUPPORTED[name]:
                reject(name, value, SUPPORTED[name])
        if not isinstance(self.act_fn, str) or self.act_fn.lower() not in SUPPORTED["act_fn"]:
            reject("act_fn", self.act_fn, SUPPORTED["act_fn"])

        positive = ["in_channels", "out_channels", "layers_per_block", "norm_num_groups"]
        optional_positive = ["time_embedding_dim", "attention_head_dim", "attn_norm_num_groups", "num_class_embeds",
                             "num_train_timesteps"]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive int{' or None' if name in optional_positive else ''}, "
                                 f"got {value!r}.")
        if not self.block_out_channels or not all(_is_int(c) and c > 0 for c in self.block_out_channels):
            raise ValueError("`block_out_channels` must be a non-empty sequence of positive ints, "
                             f"got {self.block_out_channels!r}.")
        if not _is_int(self.downsample_padding) or self.downsample_padding < 0:
            raise ValueError(f"`downsample_padding` must be an int >= 0, got {self.downsample_padding!r}.")
        if not _is_number(self.norm_eps) or not self.norm_eps > 0:
            raise ValueError(f"`norm_eps` must be a positive number, got {self.norm_eps!r}.")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be a number in [0, 1), got {self.dropout!r}.")
        if not _is_number(self.mid_block_scale_factor) or self.mid_block_scale_factor == 0:
            raise ValueError(f"`mid_block_scale_factor` must be a nonzero number, got {self.mid_block_scale_factor!r}.")
        if not _is_number(self.freq_shift):
            raise ValueError(f"`freq_shift` must be a number, got {self.freq_shift!r}.")
        for name in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        size = self.sample_size
        if size is not None and not (_is_int(size) or (len(size) == 2 and all(_is_int(s) for s in size))):
            raise ValueError(f"`sample_size` must be None, an int or an (H, W) pair, got {size!r}.")

    def _check_structure(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"`down_block_types` ({len(self.down_block_types)}), `up_block_types` ({len(self.up_block_types)}) "
                f"and `block_out_channels` ({n}) must have the same length (one entry per resolution level)."
            )
        if self.time_embedding_type == "positional" and self.block_out_channels[0] < 2:
            raise ValueError("The positional time embedding needs `block_out_channels[0] >= 2`.")
        if self.time_embedding_type == "positional" and self.block_out_channels[0] // 2 == self.freq_shift:
            raise ValueError(
                f"`freq_shift={self.freq_shift}` equals half the embedding width ({self.block_out_channels[0] // 2}): "
                "the frequencies would divide by zero. Use a smaller `freq_shift`."
            )
        for where, channels, groups in self._group_norms():
            if channels % groups:
                raise ValueError(
                    f"{where} normalizes {channels} channels, which `norm_num_groups`/`attn_norm_num_groups`={groups} "
                    "does not divide. Choose a group count that divides every channel count "
                    f"(block_out_channels={list(self.block_out_channels)} and the up blocks' concatenations)."
                )
        for where, channels in self._attentions():
            head = self.attention_head_dim or channels
            if channels // head < 1:
                raise ValueError(
                    f"{where} has {channels} channels, fewer than `attention_head_dim={self.attention_head_dim}`, "
                    "so it would have no head. Use a smaller `attention_head_dim` (or None for one head)."
                )

    def _group_norms(self):
        """(where, channels, groups) of every GroupNorm, read off ``state_dict_shapes``."""
        mid_attention = "mid_block.attentions.0.group_norm"
        for key, shape in self.state_dict_shapes().items():
            where, leaf = key.rsplit(".", 1)
            if leaf == "weight" and where.rsplit(".", 1)[-1] in ("norm1", "norm2", "group_norm", "conv_norm_out"):
                yield where, shape[0], self._mid_attention_groups() if where == mid_attention else self.norm_num_groups

    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """The diffusers state dict of this config: ``{PyTorch name: shape}`` (OIHW convs, (out, in) linears).

        Follows ``UNet2DModel.__init__``'s channel bookkeeping (the up blocks' resnet j takes the block's own
        output channels as its skip for j < layers_per_block and the next level's for the last one). Pure
        Python, no tracing: ``jaxdiff.hub`` checks checkpoints against it, and the tests check it against
        ``jax.eval_shape`` of ``UNet2D.init``.
        """
        boc, layers, ted = self.block_out_channels, self.layers_per_block, self.time_embed_dim
        n = len(boc)
        shapes: dict[str, tuple[int, ...]] = {}

        def linear(name, cin, cout):
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin), (cout,)

        def conv(name, cin, cout, k=3):
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

        def norm(name, c):
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

        def resnet(name, cin, cout):
            norm(f"{name}.norm1", cin)
            conv(f"{name}.conv1", cin, cout)
            linear(f"{name}.time_emb_proj", ted, 2 * cout if self.resnet_time_scale_shift == "scale_shift" else cout)
            norm(f"{name}.norm2", cout)
            conv(f"{name}.conv2", cout, cout)
            if cin != cout:
                conv(f"{name}.conv_shortcut", cin, cout, k=1)

        def attention(name, c, with_norm=True):
            if with_norm:
                norm(f"{name}.group_norm", c)
            inner = (c // (self.attention_head_dim or c)) * (self.attention_head_dim or c)
            for proj in ("to_q", "to_k", "to_v"):
                linear(f"{name}.{proj}", c, inner)
            linear(f"{name}.to_out.0", inner, c)

        conv("conv_in", self.in_channels, boc[0])
        time_in = boc[0]
        if self.time_embedding_type == "fourier":
            shapes["time_proj.weight"] = (boc[0],)
            time_in = 2 * boc[0]
        linear("time_embedding.linear_1", time_in, ted)
        linear("time_embedding.linear_2", ted, ted)
        if self.class_embed_type == "timestep":
            linear("class_embedding.linear_1", time_in, ted)
            linear("class_embedding.linear_2", ted, ted)
        elif self.class_embed_type is None and self.num_class_embeds is not None:
            shapes["class_embedding.weight"] = (self.num_class_embeds, ted)
        out = boc[0]
        for i, kind in enumerate(self.down_block_types):
            cin, out = out, boc[i]
            for j in range(layers):
                resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else out, out)
                if kind == "AttnDownBlock2D":
                    attention(f"down_blocks.{i}.attentions.{j}", out)
            if i < n - 1:
                conv(f"down_blocks.{i}.downsamplers.0.conv", out, out)
        if self.mid_block_type is not None:
            resnet("mid_block.resnets.0", boc[-1], boc[-1])
            if self.add_attention:
                attention("mid_block.attentions.0", boc[-1], with_norm=self._mid_attention_groups() is not None)
            resnet("mid_block.resnets.1", boc[-1], boc[-1])
        rev = boc[::-1]
        prev = rev[0]
        for i, kind in enumerate(self.up_block_types):
            out, skip_last = rev[i], rev[min(i + 1, n - 1)]
            for j in range(layers + 1):
                resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + (skip_last if j == layers else out), out)
                if kind == "AttnUpBlock2D":
                    attention(f"up_blocks.{i}.attentions.{j}", out)
            if i < n - 1:
                conv(f"up_blocks.{i}.upsamplers.0.conv", out, out)
            prev = out
        norm("conv_norm_out", boc[0])
        conv("conv_out", boc[0], self.out_channels)
        return shapes

    def _attentions(self):
        for i, kind in enumerate(self.down_block_types):
            if kind == "AttnDownBlock2D":
                yield f"down_blocks.{i} (AttnDownBlock2D)", self.block_out_channels[i]
        if self.mid_block_type is not None and self.add_attention:
            yield "mid_block", self.block_out_channels[-1]
        for i, kind in enumerate(self.up_block_types):
            if kind == "AttnUpBlock2D":
                yield f"up_blocks.{i} (AttnUpBlock2D)", self.block_out_channels[::-1][i]


# -------------------------------------------------------------------------------------------------
# layers


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: float = 1.0, dtype=jnp.float32):
    """Sinusoidal timestep embedding (diffusers' ``get_timestep_embedding``; DDPM, Fairseq).

    With half = dim // 2 and f_i = exp(-ln(10000) i / (half - freq_shift)), i = 0..half-1:
    e(t) = [sin(t f), cos(t f)] ([cos, sin] with ``flip_sin_to_cos``), zero-padded to ``dim`` if odd.
    DDPM checkpoints use freq_shift = 1, no flip; Stable-Diffusion-style models flip with shift 0.

    Args:
        t: timesteps, shape ``(B,)`` (fractional values allowed).
        dim: embedding width.
        flip_sin_to_cos: put the cosines first.
        freq_shift: diffusers' ``downscale_freq_shift``.
        dtype: computation dtype (diffusers computes in float32).

    Returns:
        Array of shape ``(B, dim)``.

    Example:
        >>> timestep_embedding(jnp.zeros((1,)), 4)  # sin(0) = 0, cos(0) = 1
        Array([[0., 0., 1., 1.]], dtype=float32)
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=dtype) / (half - freq_shift))
    angles = jnp.asarray(t, dtype)[:, None] * freqs[None, :]
    parts = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _stats_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    # use_fast_variance=False: PyTorch's two-pass variance; statistics in at least float32 (flax promotes).
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def _conv(features: int, kernel: int, dtype, name: str, *, strides: int = 1, padding=None) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)) if padding is None else padding,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


class _TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' ``TimestepEmbedding`` as UNet2DModel builds it)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        return _dense(self.features, self.dtype, "linear_2")(nn.silu(_dense(self.features, self.dtype, "linear_1")(x)))


class _FourierProjection(nn.Module):
    """diffusers' ``GaussianFourierProjection(log=True)``: [sin(2 pi w log t), cos(2 pi w log t)].

    ``weight`` (shape (size,)) is a fixed random projection in diffusers (``requires_grad=False``);
    here it is an ordinary parameter loaded from the checkpoint (freeze it when fine-tuning).
    """

    size: int
    dtype: Any

    @nn.compact
    def __call__(self, t):
        w = self.param("weight", nn.initializers.normal(16.0), (self.size,), jnp.float32).astype(self.dtype)
        proj = jnp.log(t.astype(self.dtype))[:, None] * w[None, :] * (2 * np.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class _ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` (pre-norm; conv_shortcut only when the channel count changes)."""

    out_channels: int
    groups: int
    eps: float
    act_fn: str
    time_scale_shift: str
    dropout: float
    output_scale_factor: float
    dtype: Any

    @nn.compact
    def __call__(self, x, temb, train: bool):
        act = _ACTIVATIONS[self.act_fn.lower()]
        h = act(_group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        # the resnet's own activation on the (linear) time embedding, then the projection
        width = 2 * self.out_channels if self.time_scale_shift == "scale_shift" else self.out_channels
        temb = _dense(width, self.dtype, "time_emb_proj")(act(temb))[:, None, None, :]
        norm2 = _group_norm(self.groups, self.eps, self.dtype, "norm2")
        if self.time_scale_shift == "scale_shift":
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + temb)
        h = nn.Dropout(self.dropout, deterministic=not train)(act(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class _Attention(nn.Module):
    """diffusers' ``Attention`` as the U-Net blocks build it (``_from_deprecated_attn_block``).

    r = x; h = GroupNorm(x) (if ``groups``); tokens (B, H W, C); heads of ``dim_head`` channels with
    scale dim_head^-1/2; ``to_out_0``; out = (. + r) / rescale_output_factor.
    """

    heads: int
    dim_head: int
    groups: int | None
    eps: float
    rescale_output_factor: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = x
        if self.groups is not None:
            h = _group_norm(self.groups, self.eps, self.dtype, "group_norm")(h)
        h = h.reshape(b, hh * ww, c)
        inner = self.heads * self.dim_head
        q, k, v = (_dense(inner, self.dtype, name)(h).reshape(b, hh * ww, self.heads, self.dim_head)
                   for name in ("to_q", "to_k", "to_v"))
        # logits and softmax in at least float32 (diffusers' upcast_softmax)
        acc = _stats_dtype(self.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * (self.dim_head**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hh * ww, inner)
        out = _dense(c, self.dtype, "to_out_0")(out).reshape(b, hh, ww, c)
        return (out + x) / self.rescale_output_factor


class _Downsample(nn.Module):
    """diffusers' ``Downsample2D(use_conv=True)``: 3x3 stride-2 conv; padding 0 pads right/bottom by one."""

    channels: int
    padding: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        p = self.padding
        pads = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return _conv(self.channels, 3, self.dtype, "conv", strides=2, padding=pads)(x)


class _Upsample(nn.Module):
    """diffusers' ``Upsample2D(use_conv=True)``: nearest-neighbour x2 (exact as a repeat), then a 3x3 conv."""

    channels: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


def _heads(config: UNet2DConfig, channels: int) -> tuple[int, int]:
    dim_head = config.attention_head_dim or channels
    return channels // dim_head, dim_head


class _DownBlock(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: resnet (-> attention) x layers, then an optional downsampler."""

    config: UNet2DConfig
    index: int
    dtype: Any

    @nn.compact
    def __call__(self, h, temb, train):
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[i]
        attn = cfg.down_block_types[i] == "AttnDownBlock2D"
        skips = []
        for j in range(cfg.layers_per_block):
            h = _ResnetBlock(out, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.resnet_time_scale_shift,
                             cfg.dropout, 1.0, self.dtype, name=f"resnets_{j}")(h, temb, train)
            if attn:
                heads, dim_head = _heads(cfg, out)
                h = _Attention(heads, dim_head, cfg.norm_num_groups, cfg.norm_eps, 1.0, self.dtype,
                               name=f"attentions_{j}")(h)
            skips.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = _Downsample(out, cfg.downsample_padding, self.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class _MidBlock(nn.Module):
    """``UNetMidBlock2D``: resnet -> attention -> resnet, all scaled by ``mid_block_scale_factor``."""

    config: UNet2DConfig
    dtype: Any

    @nn.compact
    def __call__(self, h, temb, train):
        cfg = self.config
        c, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor

        def resnet(j):
            return _ResnetBlock(c, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.resnet_time_scale_shift,
                                cfg.dropout, scale, self.dtype, name=f"resnets_{j}")

        h = resnet(0)(h, temb, train)
        if cfg.add_attention:
            heads, dim_head = _heads(cfg, c)
            h = _Attention(heads, dim_head, cfg._mid_attention_groups(), cfg.norm_eps, scale, self.dtype,
                           name="attentions_0")(h)
        return resnet(1)(h, temb, train)


class _UpBlock(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: layers + 1 resnets on [h, skip] (-> attention), then an upsampler."""

    config: UNet2DConfig
    index: int
    dtype: Any

    @nn.compact
    def __call__(self, h, skips, temb, train):
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[::-1][i]
        attn = cfg.up_block_types[i] == "AttnUpBlock2D"
        for j, skip in enumerate(skips):
            h = jnp.concatenate([h, skip], axis=-1)
            h = _ResnetBlock(out, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.resnet_time_scale_shift,
                             cfg.dropout, 1.0, self.dtype, name=f"resnets_{j}")(h, temb, train)
            if attn:
                heads, dim_head = _heads(cfg, out)
                h = _Attention(heads, dim_head, cfg.norm_num_groups, cfg.norm_eps, 1.0, self.dtype,
                               name=f"attentions_{j}")(h)
        if i < len(cfg.block_out_channels) - 1:
            h = _Upsample(out, self.dtype, name="upsamplers_0")(h)
        return h


# -------------------------------------------------------------------------------------------------
# the network


class UNet2D(nn.Module):
    """diffusers' ``UNet2DModel`` in flax (NHWC), with the PyTorch state dict's parameter names.

    Forward pass (Ho et al., 2020; diffusers ``unet_2d.py``): emb = TimestepEmbedding(embed(t))
    (+ class embedding); h = conv_in(x); down blocks push skips; mid block; up blocks pop
    ``layers_per_block + 1`` skips each; out = conv_out(SiLU(conv_norm_out(h))) (/ t for the
    Fourier embedding).

    Attributes:
        config: the ``UNet2DConfig``.
        dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32, GroupNorm
            statistics, the time embedding and the attention softmax run in at least float32.

    Call:
        ``module.apply(variables, x, t, class_labels=None, train=False)`` with ``x`` of shape
        ``(B, H, W, in_channels)`` (H, W multiples of ``config.size_multiple``), ``t`` a scalar or
        ``(B,)`` (float, fractional allowed; for the Fourier embedding t > 0, e.g. sigma),
        ``class_labels`` ``(B,)`` ints (``num_class_embeds``), ``(B,)`` numbers (``"timestep"``) or
        ``(B, time_embed_dim)`` (``"identity"``) for a class-conditional config. ``train=True`` enables
        dropout (rng ``"dropout"``). Returns ``(B, H, W, out_channels)``.

    Raises:
        ValueError: at trace time, for an input that is not ``(B, H, W, in_channels)``, H or W not a
            multiple of ``config.size_multiple``, a ``t`` that is neither a scalar nor ``(B,)``, and
            class labels missing, superfluous or of the wrong shape.

    Example:
        >>> cfg = UNet2DConfig(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        >>> net = UNet2D(cfg)
        >>> x = jnp.zeros((2, 16, 16, 3))
        >>> variables = net.init(jax.random.key(0), x, 10.0)
        >>> net.apply(variables, x, jnp.array([10.0, 500.5])).shape
        (2, 16, 16, 3)
    """

    config: UNet2DConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, class_labels=None, *, train: bool = False):
        cfg, dtype = self.config, self.dtype
        emb_dtype = _stats_dtype(dtype)
        x, t, class_labels = self._check_inputs(x, t, class_labels)
        batch = x.shape[0]
        x = x.astype(dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        c0 = cfg.block_out_channels[0]
        if cfg.time_embedding_type == "fourier":
            time_proj = _FourierProjection(c0, emb_dtype, name="time_proj")
        else:
            def time_proj(s):
                return timestep_embedding(s, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
                                          dtype=emb_dtype)
        t = jnp.broadcast_to(t, (batch,))
        emb = _TimestepEmbedding(cfg.time_embed_dim, dtype, name="time_embedding")(time_proj(t).astype(dtype))
        if cfg.class_embed_type == "timestep":
            class_emb = _TimestepEmbedding(cfg.time_embed_dim, dtype, name="class_embedding")(
                time_proj(class_labels).astype(dtype))
            emb = emb + class_emb
        elif cfg.class_embed_type == "identity":
            emb = emb + class_labels.astype(dtype)
        elif cfg.num_class_embeds is not None:
            emb = emb + nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=dtype, param_dtype=jnp.float32,
                                 name="class_embedding")(class_labels)

        h = _conv(c0, 3, dtype, "conv_in")(x)
        skips = [h]
        for i in range(len(cfg.down_block_types)):
            h, block_skips = _DownBlock(cfg, i, dtype, name=f"down_blocks_{i}")(h, emb, train)
            skips += block_skips
        if cfg.mid_block_type is not None:
            h = _MidBlock(cfg, dtype, name="mid_block")(h, emb, train)
        for i in range(len(cfg.up_block_types)):
            n = cfg.layers_per_block + 1
            block_skips, skips = skips[-n:][::-1], skips[:-n]
            h = _UpBlock(cfg, i, dtype, name=f"up_blocks_{i}")(h, block_skips, emb, train)

        h = nn.silu(_group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(h))
        h = _conv(cfg.out_channels, 3, dtype, "conv_out")(h)
        if cfg.time_embedding_type == "fourier":
            h = h / t.astype(dtype)[:, None, None, None]
        return h

    def _check_inputs(self, x, t, class_labels):
        cfg = self.config
        x = jnp.asarray(x)
        expected = f"(batch, height, width, {cfg.in_channels}) (NHWC)"
        if x.ndim != 4:
            raise ValueError(f"`x` must have shape {expected}; got shape {x.shape}. Add a batch axis / use NHWC "
                             "(or `unet_fn(module, layout='NCHW')` for PyTorch-layout inputs).")
        if x.shape[-1] != cfg.in_channels:
            raise ValueError(f"`x` must have shape {expected}; got shape {x.shape} ({x.shape[-1]} channels). "
                             "Inputs are channels-last: transpose NCHW inputs, or use "
                             "`unet_fn(module, layout='NCHW')`.")
        m = cfg.size_multiple
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(
                f"`x` has height x width {x.shape[1]} x {x.shape[2]}; both must be multiples of {m} = 2**(number of "
                f"down blocks - 1) for this {len(cfg.block_out_channels)}-level U-Net. Pad or resize the input."
            )
        t = jnp.asarray(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"`t` must be a scalar or of shape ({x.shape[0]},) (one time per batch element); "
                             f"got shape {t.shape}.")
        t = t.reshape(-1) if t.ndim == 1 else t
        if not cfg.class_conditional:
            if class_labels is not None:
                raise ValueError("`class_labels` were given, but this model has no class embedding "
                                 "(`class_embed_type` and `num_class_embeds` are None). Drop them.")
            return x, t, None
        if class_labels is None:
            what = f"({x.shape[0]}, {cfg.time_embed_dim}) embeddings" if cfg.class_embed_type == "identity" \
                else f"({x.shape[0]},) labels"
            raise ValueError(f"This model is class-conditional; pass `class_labels` as {what}.")
        class_labels = jnp.asarray(class_labels)
        want = (x.shape[0], cfg.time_embed_dim) if cfg.class_embed_type == "identity" else (x.shape[0],)
        if class_labels.shape != want:
            raise ValueError(f"`class_labels` must have shape {want} for `x` of shape {x.shape}; "
                             f"got shape {class_labels.shape}.")
        if cfg.class_embed_type is None and not jnp.issubdtype(class_labels.dtype, jnp.integer):
            raise TypeError(f"`class_labels` must be integers in [0, {cfg.num_class_embeds}); got dtype "
                            f"{class_labels.dtype}. Cast them with `.astype(jnp.int32)`.")
        return x, t, class_labels


def unet_fn(module: UNet2D, layout: str = "NHWC") -> Callable:
    """The jaxdiff model function ``fn(x, t_model, args)`` of a ``UNet2D``.

    ``args`` is the flax variables dict ``{"params": ...}`` for an unconditional model, or the pair
    ``(variables, class_labels)`` for a class-conditional one (so ``jd.CFG`` can pass the conditional
    and the null labels as its two branches). ``layout="NCHW"`` takes and returns PyTorch-layout
    ``(B, C, H, W)`` arrays, transposing around the NHWC network.

    Args:
        module: the ``UNet2D``.
        layout: ``"NHWC"`` (default) or ``"NCHW"``.

    Returns:
        ``fn(x, t_model, args) -> prediction`` of the shape of ``x``, for ``jaxdiff.Denoiser``.

    Example:
        >>> den = jd.Denoiser(unet_fn(UNet2D(cfg)), jd.VPDiscrete(betas), "epsilon")  # doctest: +SKIP
        >>> x0 = jd.sample(den, x_T, ts, jd.UniPC(), args=variables)  # doctest: +SKIP
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"Unknown `layout={layout!r}`; expected one of {_LAYOUTS}.")
    if not isinstance(module, UNet2D):
        raise TypeError(f"`module` must be a `UNet2D`, got {type(module).__name__}.")
    conditional = module.config.class_conditional

    def fn(x, t_model, args):
        if conditional:
            if not (isinstance(args, (tuple, list)) and len(args) == 2):
                raise ValueError(
                    "This U-Net is class-conditional: `args` must be the pair `(variables, class_labels)`; "
                    f"got {type(args).__name__}."
                )
            variables, labels = args
        else:
            if not isinstance(args, Mapping):
                raise ValueError(
                    "This U-Net is unconditional: `args` must be the flax variables dict `{'params': ...}`; "
                    f"got {type(args).__name__}."
                )
            variables, labels = args, None
        if layout == "NCHW":
            if jnp.ndim(x) != 4:
                raise ValueError(f"With `layout='NCHW'`, `x` must have shape (batch, {module.config.in_channels}, "
                                 f"height, width); got shape {jnp.shape(x)}.")
            if jnp.shape(x)[1] != module.config.in_channels:
                raise ValueError(f"With `layout='NCHW'`, `x` must have shape (batch, {module.config.in_channels}, "
                                 f"height, width); got shape {jnp.shape(x)}.")
            out = module.apply(variables, jnp.transpose(x, (0, 2, 3, 1)), t_model, labels)
            return jnp.transpose(out, (0, 3, 1, 2))
        return module.apply(variables, x, t_model, labels)

    return fn


def _example_inputs(config: UNet2DConfig, batch: int = 1):
    """Smallest valid (x, t, class_labels) for ``init``/``jax.eval_shape``."""
    m = config.size_multiple
    x = jnp.zeros((batch, m, m, config.in_channels), jnp.float32)
    t = jnp.ones((batch,), jnp.float32)
    labels = None
    if config.class_embed_type == "identity":
        labels = jnp.zeros((batch, config.time_embed_dim), jnp.float32)
    elif config.class_embed_type == "timestep":
        labels = jnp.ones((batch,), jnp.float32)
    elif config.num_class_embeds is not None:
        labels = jnp.zeros((batch,), jnp.int32)
    return x, t, labels
