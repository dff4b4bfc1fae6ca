"""jaxdiff.nets.UNet2D: diffusers' UNet2DModel architecture in flax.

Parity with diffusers' own module (random weights, several configurations) is in test_hub.py, where
the weights travel through a diffusers folder. Here: the config (diffusers' names and defaults,
validation), parameter counts of the published DDPM configs, the timestep embedding's closed form,
the layers against hand-written NumPy formulas, call-time errors and jit/vmap/dtype behaviour.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.nets import UNet2D, UNet2DConfig, unet_fn
from jaxdiff.nets.unet import (
    SUPPORTED,
    _Attention,
    _Downsample,
    _example_inputs,
    _group_norm,
    _Upsample,
    timestep_embedding,
)

# google/ddpm-cifar10-32's config.json and the DDPM 256-px one (reference notes, part A §1.1).
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_256 = dict(
    DDPM_CIFAR10,
    sample_size=256,
    block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
)

# A tiny DDPM-like network for the analytic and error tests.
TINY = UNet2DConfig(
    sample_size=8,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=None,
    norm_num_groups=4,
    downsample_padding=0,
    freq_shift=1,
    flip_sin_to_cos=False,
    norm_eps=1e-6,
)
TINY_CLASS = dataclasses.replace(TINY, num_class_embeds=3)


def random_variables(config: UNet2DConfig, seed: int = 0, dtype=np.float32):
    """Random flax variables for ``config`` without running ``init`` (shapes from ``jax.eval_shape``):
    kernels N(0, 1/fan_in), GroupNorm scales 1 + N(0, 0.2^2), everything else N(0, 0.2^2)."""
    shapes = jax.eval_shape(lambda: UNet2D(config).init(jax.random.key(0), *_example_inputs(config)))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        z = rng.standard_normal(s.shape)
        if name == "kernel":
            z = z / math.sqrt(np.prod(s.shape[:-1]))
        elif name == "scale":
            z = 1.0 + 0.2 * z
        else:
            z = 0.2 * z
        return jnp.asarray(z.astype(dtype))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _count(config_dict):
    config = UNet2DConfig.from_diffusers(config_dict)
    shapes = jax.eval_shape(lambda: UNet2D(config).init(jax.random.key(0), *_example_inputs(config)))
    leaves = jax.tree.leaves(shapes)
    return len(leaves), sum(int(np.prod(leaf.shape)) for leaf in leaves)


@pytest.mark.parametrize("config, tensors, params", [(DDPM_CIFAR10, 328, 35_746_307), (DDPM_256, 450, 113_673_219)],
                         ids=["ddpm-cifar10-32", "ddpm-256"])
def test_published_ddpm_configs_have_the_published_parameter_counts(config, tensors, params):
    """Counted by jax.eval_shape: no weights materialized (DDPM paper: 35.7M and 114M)."""
    assert _count(config) == (tensors, params)


def test_ddpm_attention_is_one_head_and_the_default_is_heads_of_eight():
    cfg = UNet2DConfig.from_diffusers(DDPM_CIFAR10)
    x, t, _ = _example_inputs(cfg)
    heads = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, _Attention) and context.method_name == "__call__":
            heads.append((context.module.heads, context.module.dim_head))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: UNet2D(cfg).init(jax.random.key(0), x, t))
    assert set(heads) == {(1, 256)} and len(heads) == 2 + 1 + 3  # down 1 (x2), mid, up 2 (x3)
    heads.clear()
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: UNet2D(dataclasses.replace(cfg, attention_head_dim=8)).init(jax.random.key(0), x, t))
    assert set(heads) == {(32, 8)}


def test_timestep_embedding_closed_form():
    """Reference notes §1.9 item 4: t = 0 gives sin = 0, cos = 1; for D = 128, shift 1, column j < 64 is
    sin(t exp(-ln(1e4) j / 63)) and column 64 + j the cosine; flip puts the cosines first."""
    t = jnp.array([0.0, 1.0, 17.25, 999.0], jnp.float64)
    emb = np.asarray(timestep_embedding(t, 128, flip_sin_to_cos=False, freq_shift=1, dtype=jnp.float64))
    np.testing.assert_array_equal(emb[0], np.r_[np.zeros(64), np.ones(64)])
    j = np.arange(64)
    angles = np.asarray(t)[:, None] * np.exp(-np.log(1e4) * j / 63.0)[None, :]
    np.testing.assert_allclose(emb[:, :64], np.sin(angles), rtol=0, atol=1e-12)
    np.testing.assert_allclose(emb[:, 64:], np.cos(angles), rtol=0, atol=1e-12)
    assert emb[1, 63] == pytest.approx(math.sin(1e-4), abs=1e-15)  # lowest frequency: 1e-4 exactly for shift 1
    flipped = np.asarray(timestep_embedding(t, 128, flip_sin_to_cos=True, freq_shift=0, dtype=jnp.float64))
    angles0 = np.asarray(t)[:, None] * np.exp(-np.log(1e4) * j / 64.0)[None, :]
    np.testing.assert_allclose(flipped, np.c_[np.cos(angles0), np.sin(angles0)], rtol=0, atol=1e-12)
    odd = np.asarray(timestep_embedding(t, 7, dtype=jnp.float64))
    assert odd.shape == (4, 7) and np.all(odd[:, -1] == 0)


@pytest.mark.reference("torch", "diffusers")
def test_config_fields_are_diffusers_init_arguments_with_their_defaults():
    from diffusers import UNet2DModel

    params = inspect.signature(UNet2DModel.__init__).parameters
    ours = {f.name: f.default for f in dataclasses.fields(UNet2DConfig)}
    theirs = {k: p.default for k, p in params.items() if k != "self"}
    assert list(ours) == list(theirs)
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in theirs.items()} == ours


def test_config_round_trips_through_the_diffusers_dict():
    cfg = UNet2DConfig.from_diffusers(DDPM_CIFAR10)
    assert cfg.block_out_channels == (128, 256, 256, 256) and cfg.attention_head_dim is None
    assert cfg.mid_block_type == "UNetMidBlock2D" and cfg.downsample_padding == 0  # absent keys: diffusers' defaults
    d = cfg.to_diffusers()
    assert d["_class_name"] == "UNet2DModel" and d["block_out_channels"] == [128, 256, 256, 256]
    assert UNet2DConfig.from_diffusers(d) == cfg and hash(UNet2DConfig.from_diffusers(d)) == hash(cfg)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")),
         r"`down_block_types\[1\]='CrossAttnDownBlock2D'` is not supported; supported block types: "
         r"\['DownBlock2D', 'AttnDownBlock2D'\]"),
        (dict(up_block_types=("AttnSkipUpBlock2D", "UpBlock2D")),
         r"`up_block_types\[0\]='AttnSkipUpBlock2D'` is not supported; "
         r"supported block types: \['UpBlock2D', 'AttnUpBlock2D'\]"),
        (dict(mid_block_type="UNetMidBlock2DCrossAttn"),
         r"`mid_block_type='UNetMidBlock2DCrossAttn'` is not supported; supported values: \['UNetMidBlock2D', None\]"),
        (dict(downsample_type="resnet"), r"`downsample_type='resnet'` is not supported; supported values: \['conv'\]"),
        (dict(time_embedding_type="learned"),
         r"`time_embedding_type='learned'` is not supported; supported values: \['positional', 'fourier'\]"),
        (dict(resnet_time_scale_shift="spatial"),
         r"`resnet_time_scale_shift='spatial'` is not supported; supported values: \['default', 'scale_shift'\]"),
        (dict(class_embed_type="projection"),
         r"`class_embed_type='projection'` is not supported; supported values: \[None, 'timestep', 'identity'\]"),
        (dict(act_fn="tanh"), r"`act_fn='tanh'` is not supported; supported values: \['silu', 'swish', 'mish'"),
        (dict(up_block_types=("UpBlock2D",)),
         r"`down_block_types` \(2\), `up_block_types` \(1\) and `block_out_channels` \(2\) must have the same length"),
        (dict(norm_num_groups=3),
         r"down_blocks.0.resnets.0.norm1 normalizes 8 channels, "
         r"which `norm_num_groups`/`attn_norm_num_groups`=3 does not divide"),
        (dict(block_out_channels=(8, 12), norm_num_groups=8),
         r"down_blocks.1.resnets.0.norm2 normalizes 12 channels, which .*=8 does not divide"),
        (dict(attention_head_dim=32),
         r"down_blocks.1 \(AttnDownBlock2D\) has 16 channels, fewer than `attention_head_dim=32`"),
        (dict(layers_per_block=0), r"`layers_per_block` must be a positive int, got 0"),
        (dict(block_out_channels=[8, "16"]), r"`block_out_channels` must be a non-empty sequence of positive ints"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_clear_errors(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


def test_a_config_without_attention_head_dim_warns_that_ddpm_checkpoints_need_one_head():
    legacy = {k: v for k, v in DDPM_CIFAR10.items() if k != "attention_head_dim"}
    msg = r"no `attention_head_dim`; using diffusers' default 8 \(C // 8 attention heads\)"
    with pytest.warns(UserWarning, match=msg):
        assert UNet2DConfig.from_diffusers(legacy).attention_head_dim == 8


def test_from_diffusers_rejects_unknown_fields_and_other_model_classes():
    msg = r"Unknown UNet2DModel config field\(s\) \['cross_attention_dim'\]; the known fields are"
    with pytest.raises(ValueError, match=msg):
        UNet2DConfig.from_diffusers(dict(DDPM_CIFAR10, cross_attention_dim=768))
    with pytest.raises(ValueError, match=r"This config is a diffusers `UNet2DConditionModel`; only `UNet2DModel`"):
        UNet2DConfig.from_diffusers(dict(DDPM_CIFAR10, _class_name="UNet2DConditionModel"))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'not_a_field'"):
        UNet2DConfig(not_a_field=1)
    assert set(SUPPORTED["down_block_types"]) == {"DownBlock2D", "AttnDownBlock2D"}


# ---------------------------------------------------------------------------------------------------
# layers against hand-written formulas (float64)


def test_downsample_with_padding_zero_is_tf_same_padding_right_and_bottom():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 2))
    w, b = rng.standard_normal((3, 3, 2, 3)), rng.standard_normal(3)
    variables = {"params": {"conv": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}}
    for padding, pad_lo in ((0, 0), (1, 1)):
        out = np.asarray(_Downsample(3, padding, jnp.float64).apply(variables, jnp.asarray(x)))
        h_out = (4 + (1 if padding == 0 else 2) - 3) // 2 + 1
        xp = np.zeros((1, 4 + 2, 6 + 2, 2))
        xp[:, pad_lo:pad_lo + 4, pad_lo:pad_lo + 6] = x
        ref = np.zeros((1, h_out, 3, 3))
        for i in range(ref.shape[1]):
            for j in range(ref.shape[2]):
                patch = xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
                ref[0, i, j] = np.einsum("hwc,hwco->o", patch, w) + b
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_upsample_is_nearest_neighbour_then_conv():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 2, 2))
    w = np.zeros((3, 3, 2, 2))
    w[1, 1] = np.eye(2)  # identity centre tap: the conv passes the upsampled image through
    variables = {"params": {"conv": {"kernel": jnp.asarray(w), "bias": jnp.zeros(2)}}}
    out = np.asarray(_Upsample(2, jnp.float64).apply(variables, jnp.asarray(x)))
    i, j = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(out, x[:, i // 2, j // 2])


def test_group_norm_is_two_pass_in_float32():
    """A large common offset: the one-pass E[x^2] - E[x]^2 loses every digit in float32, PyTorch's
    two-pass variance does not."""
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((2, 4, 4, 8))).astype(np.float32)
    scale, bias = rng.standard_normal(8), rng.standard_normal(8)
    gn = _group_norm(2, 1e-6, jnp.float32, "gn")
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    out = np.asarray(gn.apply({"params": params}, jnp.asarray(x)))
    xg = x.astype(np.float64).reshape(2, 16, 2, 4)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    ref = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(2, 4, 4, 8) * scale + bias
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 2e-3  # float32 inputs near 1e4: ~1e-3 absolute


def test_attention_matches_a_hand_written_softmax():
    rng = np.random.default_rng(3)
    b, h, w, c, heads = 2, 3, 2, 8, 2
    x = rng.standard_normal((b, h, w, c))
    p = {name: {"kernel": jnp.asarray(rng.standard_normal((c, c)) / 3), "bias": jnp.asarray(rng.standard_normal(c))}
         for name in ("to_q", "to_k", "to_v", "to_out_0")}
    p["group_norm"] = {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(c)),
                       "bias": jnp.asarray(0.1 * rng.standard_normal(c))}
    out = np.asarray(_Attention(heads, c // heads, 4, 1e-6, 2.0, jnp.float64).apply({"params": p}, jnp.asarray(x)))
    xg = x.reshape(b, h * w, 4, 2)
    normed = (xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-6)
    normed = normed.reshape(b, h * w, c)
    normed = normed * np.asarray(p["group_norm"]["scale"]) + np.asarray(p["group_norm"]["bias"])
    q, k, v = (normed @ np.asarray(p[n]["kernel"]) + np.asarray(p[n]["bias"]) for n in ("to_q", "to_k", "to_v"))
    ref = np.zeros((b, h * w, c))
    for head in range(heads):
        sl = slice(head * 4, head * 4 + 4)
        logits = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / 2.0  # dim_head 4: scale 1/2
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        ref[..., sl] = (weights / weights.sum(-1, keepdims=True)) @ v[..., sl]
    ref = ref @ np.asarray(p["to_out_0"]["kernel"]) + np.asarray(p["to_out_0"]["bias"])
    ref = (ref.reshape(b, h, w, c) + x) / 2.0  # residual, then rescale_output_factor
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


# One compiled forward pass of TINY for (2, 8, 8, 3) float32 inputs and (2,) times, shared by the tests
# below: on a 2-core CPU a U-Net compile costs seconds, executing it milliseconds.
_apply_tiny = jax.jit(UNet2D(TINY).apply)


@pytest.fixture(scope="module")
def tiny():
    """(module, variables, x NHWC float32, t) shared by the call tests."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8, 8, 3)), jnp.float32)
    return UNet2D(TINY), random_variables(TINY), x, jnp.array([10.0, 654.25], jnp.float32)


def test_zero_output_conv_gives_exactly_zero(tiny):
    _, v, x, t = tiny
    v = {"params": dict(v["params"], conv_out=jax.tree.map(jnp.zeros_like, v["params"]["conv_out"]))}
    out = _apply_tiny(v, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32 and np.all(np.asarray(out) == 0)
    assert np.max(np.abs(np.asarray(_apply_tiny(tiny[1], x, t)))) > 0.1


def test_bfloat16_computation_keeps_float32_parameters(tiny):
    _, v, x, t = tiny
    ref = np.asarray(_apply_tiny(v, x, t))
    out = jax.jit(UNet2D(TINY, dtype=jnp.bfloat16).apply)(v, x, t)
    assert out.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref)) < 5e-2
    shapes = jax.eval_shape(lambda: UNet2D(TINY, dtype=jnp.bfloat16).init(jax.random.key(0), *_example_inputs(TINY)))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_dropout_only_with_train_and_a_dropout_rng(tiny):
    _, v, x, t = tiny
    net = UNet2D(dataclasses.replace(TINY, dropout=0.5))
    apply = jax.jit(net.apply, static_argnames="train")
    base = np.asarray(_apply_tiny(v, x, t))
    np.testing.assert_array_equal(np.asarray(apply(v, x, t, train=False)), base)
    a, b, c = (np.asarray(apply(v, x, t, train=True, rngs={"dropout": jax.random.key(k)})) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - base)) > 1e-2 and np.max(np.abs(a - c)) > 1e-2


def test_class_labels_enter_through_the_embedding_table():
    """Label 2 whose embedding row is replaced by label 0's gives label 0's output, through unet_fn's
    (variables, class_labels) args."""
    v = random_variables(TINY_CLASS)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8, 8, 3)), jnp.float32)
    fn, t = jax.jit(unet_fn(UNet2D(TINY_CLASS))), jnp.array([5.0, 5.0], jnp.float32)
    out = np.asarray(fn(x, t, (v, jnp.array([0, 2]))))
    emb = v["params"]["class_embedding"]["embedding"]
    v2 = {"params": dict(v["params"], class_embedding={"embedding": emb.at[2].set(emb[0])})}
    same = np.asarray(fn(x, t, (v2, jnp.array([0, 0]))))
    np.testing.assert_array_equal(np.asarray(fn(x, t, (v2, jnp.array([0, 2])))), same)
    np.testing.assert_array_equal(np.asarray(fn(x, t, (v2, jnp.array([0, 0]))))[0], out[0])
    assert np.max(np.abs(out[1] - np.asarray(fn(x, t, (v2, jnp.array([0, 2]))))[1])) > 1e-3


def test_classifier_free_guidance_over_the_labels():
    """jd.CFG runs the (variables, labels) and (variables, null labels) branches as one vmapped call."""
    v = random_variables(TINY_CLASS, seed=1)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 8, 8, 3)), jnp.float32)
    schedule = jd.VPDiscrete(jnp.linspace(1e-4, 0.02, 1000))
    fn = unet_fn(UNet2D(TINY_CLASS))
    den = jd.Denoiser(fn, schedule, "epsilon", guidance=jd.CFG(3.0))
    labels, null = jnp.array([1, 0]), jnp.array([2, 2])
    t = jnp.asarray(0.4)
    guided = jax.jit(lambda x, v: den.raw(x, t, ((v, labels), (v, null))))(x, v)
    direct = jax.jit(lambda x, v, y: fn(x, schedule.model_time(t), (v, y)))
    cond, uncond = direct(x, v, labels), direct(x, v, null)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(uncond + 3.0 * (cond - uncond)), rtol=1e-5, atol=1e-5)


def test_call_time_errors_name_the_expected_shape(tiny):
    net, v, x, t = tiny
    with pytest.raises(ValueError, match=r"`x` must have shape \(batch, height, width, 3\) \(NHWC\); "
                                         r"got shape \(8, 8, 3\)"):
        net.apply(v, x[0], t[0])
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 8\) \(8 channels\)\. Inputs are channels-last"):
        net.apply(v, jnp.transpose(x, (0, 3, 1, 2)), t)
    with pytest.raises(ValueError, match=r"`x` has height x width 7 x 8; both must be multiples of 2 = "
                                         r"2\*\*\(number of down blocks - 1\)"):
        net.apply(v, jnp.zeros((2, 7, 8, 3)), t)
    with pytest.raises(ValueError, match=r"must be a scalar or of shape \(2,\) \(one time per batch element\); "
                                         r"got shape \(3,\)"):
        net.apply(v, x, jnp.ones(3))
    with pytest.raises(ValueError, match=r"`class_labels` were given, but this model has no class embedding"):
        net.apply(v, x, t, jnp.array([0, 1]))
    vc = random_variables(TINY_CLASS)
    with pytest.raises(ValueError, match=r"This model is class-conditional; pass `class_labels` as \(2,\) labels"):
        UNet2D(TINY_CLASS).apply(vc, x, t)
    with pytest.raises(ValueError, match=r"`class_labels` must have shape \(2,\) for `x` of shape \(2, 8, 8, 3\); "
                                         r"got shape \(2, 1\)"):
        UNet2D(TINY_CLASS).apply(vc, x, t, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(TypeError, match=r"`class_labels` must be integers in \[0, 3\); got dtype float"):
        UNet2D(TINY_CLASS).apply(vc, x, t, jnp.zeros((2,)))
    with pytest.raises(ValueError, match=r"class-conditional: `args` must be the pair "
                                         r"`\(variables, class_labels\)`; got dict"):
        unet_fn(UNet2D(TINY_CLASS))(x, t, vc)
    with pytest.raises(ValueError, match=r"unconditional: `args` must be the flax variables dict "
                                         r"`\{'params': \.\.\.\}`; got tuple"):
        unet_fn(net)(x, t, (v, jnp.array([0, 1])))
    with pytest.raises(ValueError, match=r"With `layout='NCHW'`, `x` must have shape \(batch, 3, height, width\); "
                                         r"got shape \(2, 8, 8, 3\)"):
        unet_fn(net, "NCHW")(x, t, v)
    with pytest.raises(ValueError, match=r"Unknown `layout='HWC'`; expected one of \('NHWC', 'NCHW'\)"):
        unet_fn(net, "HWC")


def test_denoiser_samples_with_the_unet(tiny):
    """The U-Net plugs into jd.Denoiser/jd.sample (which passes a scalar model time): one DDIM step from t
    to 0 returns the x0 prediction (x - sigma eps) / alpha of the batched network call."""
    _, v, x, _ = tiny
    schedule = jd.VPDiscrete(jnp.linspace(1e-4, 0.02, 1000))
    den = jd.Denoiser(unet_fn(UNet2D(TINY)), schedule, "epsilon")
    t = 0.3
    out = jax.jit(lambda x, v: jd.sample(den, x, jnp.array([t, 0.0]), jd.DDIM(), args=v))(x, v)
    t_model = schedule.model_time(jnp.asarray(t))
    eps = _apply_tiny(v, x, jnp.full((2,), t_model, jnp.float32))
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    np.testing.assert_allclose(np.asarray(out), np.asarray((x - sigma * eps) / alpha), rtol=1e-6, atol=1e-6)
