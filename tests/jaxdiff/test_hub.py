"""jaxdiff.hub: diffusers UNet2DModel checkpoints without torch, and parity with diffusers' own module.

Parity: random-initialised ``diffusers.UNet2DModel``s (every tensor perturbed, so a wrong transpose or
a dropped bias cannot hide) are saved with ``save_pretrained`` and read by ``jd.load_diffusers``;
both run the same random inputs at three timesteps (one fractional) in float32 and in float64.
diffusers computes the sinusoidal timestep embedding in float32 even in a ``.double()`` model, so the
float64 comparison swaps in the same formula evaluated in float64 on the torch side (the float32
embedding alone would limit the agreement to ~1e-7).
"""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

import jaxdiff as jd
from jaxdiff import hub
from jaxdiff.hub import params_from_state_dict, state_dict_from_params
from jaxdiff.nets import UNet2D, UNet2DConfig
from jaxdiff.nets.unet import _example_inputs
from tests.jaxdiff.test_unet import DDPM_256, DDPM_CIFAR10, TINY, TINY_CLASS, random_variables

reference = pytest.mark.reference("torch", "diffusers")

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction"}

# diffusers UNet2DModel kwargs, tiny channel counts (sample_size is the test image side).
PARITY = {
    # (a) DDPM CIFAR-10: Down, AttnDown, Down, Down; one head; TF-SAME downsampling; shift 1, no flip
    "ddpm_cifar": dict(sample_size=16, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None, downsample_padding=0, freq_shift=1, flip_sin_to_cos=False,
                       norm_eps=1e-6),
    # (b) DDPM LSUN church / CelebA-HQ 256: six levels, attention at the fifth, down to 1 x 1
    "ddpm_church": dict(sample_size=32, block_out_channels=(8, 8, 16, 16, 32, 32), norm_num_groups=4,
                        layers_per_block=1,
                        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                        attention_head_dim=None, downsample_padding=0, freq_shift=1, flip_sin_to_cos=False,
                        norm_eps=1e-6),
    # (c) class embedding with diffusers' defaults otherwise (C // 8 heads, padding 1, flip, shift 0),
    # scale-shift resnets (so the mid attention has no GroupNorm)
    "class_scale_shift": dict(sample_size=16, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
                              layers_per_block=1, num_class_embeds=5, resnet_time_scale_shift="scale_shift"),
    # (d) NCSN++-style conversion options: Fourier embedding of log sigma (output / sigma), centred
    # input, "timestep" class embedding, GELU, mid-block scale, attention GroupNorm groups, a head
    # size that does not divide the channels (inner dim 8 of 12), explicit time embedding width
    "fourier_misc": dict(sample_size=8, in_channels=2, out_channels=3, block_out_channels=(12, 12), norm_num_groups=4,
                         layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D"), time_embedding_type="fourier",
                         center_input_sample=True, class_embed_type="timestep", act_fn="gelu",
                         mid_block_scale_factor=math.sqrt(2), attn_norm_num_groups=2, time_embedding_dim=24,
                         attention_head_dim=8),
    # (e) "identity" class embedding (labels are embeddings), Mish, no mid block
    "identity_no_mid": dict(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                            class_embed_type="identity", act_fn="mish", mid_block_type=None, attention_head_dim=4),
}


def _traced_state_dict_shapes(config):
    shapes = jax.eval_shape(lambda: UNet2D(config).init(jax.random.key(0), *_example_inputs(config)))["params"]
    return {hub._torch_key(path): hub._torch_shape(path[-1], tuple(leaf.shape))
            for path, leaf in traverse_util.flatten_dict(shapes).items()}


@pytest.mark.parametrize("name", ["ddpm-cifar10-32", "ddpm-256", "digits"] + list(PARITY))
def test_state_dict_shapes_match_the_traced_network(name):
    """The pure-Python parameter spec the loader checks against equals what the flax module creates."""
    from jaxdiff.pretrained.train_digits import CONFIG as DIGITS

    published = {"ddpm-cifar10-32": DDPM_CIFAR10, "ddpm-256": DDPM_256}
    config = DIGITS if name == "digits" else UNet2DConfig.from_diffusers(published.get(name) or PARITY[name])
    assert config.state_dict_shapes() == _traced_state_dict_shapes(config)


def _rel(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _perturbed_model(kwargs, seed):
    """A diffusers UNet2DModel with every tensor moved off its init (GroupNorm 1/0, zero biases)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(kwargs, seed):
    """(x NCHW float32, t (3,), class labels or None) for a PARITY config."""
    rng = np.random.default_rng(seed)
    side, channels = kwargs["sample_size"], kwargs.get("in_channels", 3)
    x = rng.standard_normal((3, channels, side, side)).astype(np.float32)
    if kwargs.get("time_embedding_type") == "fourier":
        t = np.array([0.01, 0.7, 50.0], np.float32)  # sigmas
    else:
        t = np.array([0.0, 417.3, 999.0], np.float32)  # DDPM indices, one fractional
    labels = None
    if kwargs.get("num_class_embeds"):
        labels = np.array([0, 4, 2])
    elif kwargs.get("class_embed_type") == "timestep":
        labels = np.array([1.0, 2.0, 7.0], np.float32)
    elif kwargs.get("class_embed_type") == "identity":
        width = kwargs.get("time_embedding_dim") or 4 * kwargs["block_out_channels"][0]
        labels = rng.standard_normal((3, width)).astype(np.float32)
    return x, t, labels


def _float64_timesteps(proj):
    """diffusers' Timesteps formula evaluated in float64 (diffusers always evaluates it in float32)."""
    import torch

    class Timesteps64(torch.nn.Module):
        def forward(self, t):
            half = proj.num_channels // 2
            steps = torch.arange(half, dtype=torch.float64) / (half - proj.downscale_freq_shift)
            freqs = torch.exp(-math.log(10000.0) * steps)
            angles = t.double()[:, None] * freqs[None, :]
            emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
            if proj.flip_sin_to_cos:
                emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
            return torch.nn.functional.pad(emb, (0, proj.num_channels % 2))

    return Timesteps64()


def _torch_forward(model, x, t, labels, dtype):
    import torch

    def cast(a):
        a = torch.from_numpy(a)
        return a.to(dtype) if a.is_floating_point() else a

    with torch.no_grad():
        return model(cast(x), cast(t), None if labels is None else cast(labels)).sample.numpy()


@reference
@pytest.mark.parametrize("name", list(PARITY))
def test_loaded_checkpoint_matches_diffusers(name, tmp_path):
    import torch
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import Timesteps

    kwargs = PARITY[name]
    model = _perturbed_model(kwargs, seed=sorted(PARITY).index(name))
    model.save_pretrained(tmp_path)
    DDPMScheduler(prediction_type="epsilon").save_config(tmp_path)
    x, t, labels = _inputs(kwargs, seed=1)

    den, variables = jd.load_diffusers(tmp_path)  # NHWC, float32
    assert den.prediction == "epsilon"
    assert len(jax.tree.leaves(variables)) == len(model.state_dict())
    args = variables if labels is None else (variables, jnp.asarray(labels))
    ours = jax.jit(den.fn)(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), args)
    assert ours.dtype == jnp.float32
    ref = _torch_forward(model, x, t, labels, torch.float32)
    rel32 = _rel(np.asarray(ours).transpose(0, 3, 1, 2), ref)
    assert rel32 <= 1e-5, rel32  # measured 6e-7 .. 1.3e-6

    den64, variables64 = jd.load_diffusers(tmp_path, dtype=jnp.float64, layout="NCHW")
    model = model.double()
    if isinstance(model.time_proj, Timesteps):
        model.time_proj = _float64_timesteps(model.time_proj)
    args = variables64 if labels is None else (variables64, jnp.asarray(labels))
    ours64 = jax.jit(den64.fn)(jnp.asarray(x, jnp.float64), jnp.asarray(t, jnp.float64), args)
    ref64 = _torch_forward(model, x, t, labels, torch.float64)
    rel64 = _rel(ours64, ref64)
    assert rel64 <= 1e-12, rel64  # measured 1.2e-15 .. 2.3e-15


@reference
def test_saved_folder_loads_in_diffusers(tmp_path):
    """save_diffusers writes what UNet2DModel.from_pretrained and DDPMScheduler.from_pretrained read."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    variables = random_variables(TINY_CLASS, seed=3)
    jd.save_diffusers(tmp_path, TINY_CLASS, variables, SCHEDULER)
    model = UNet2DModel.from_pretrained(tmp_path).eval()
    scheduler = DDPMScheduler.from_pretrained(tmp_path)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "linear"
    assert UNet2DConfig.from_diffusers(dict(model.config)) == TINY_CLASS
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    t, labels = np.array([3.0, 801.5], np.float32), np.array([2, 0])
    ref = _torch_forward(model, x, t, labels, torch.float32)
    den, loaded = jd.load_diffusers(tmp_path, layout="NCHW")
    ours = jax.jit(den.fn)(jnp.asarray(x), jnp.asarray(t), (loaded, jnp.asarray(labels)))
    assert _rel(ours, ref) <= 1e-5  # measured 8.8e-7


@reference
def test_unipc_sampling_matches_diffusers_scheduler_loop(tmp_path):
    """jd.sample with UniPC(2, bh2) on diffusers' default UniPCMultistepScheduler grid (linspace, final
    sigma 0, lower-order final) from the same x_T as diffusers' own loop with the same torch model.

    The model is a v-prediction model with a scaled-down output layer: v ~ 0 is the exact denoiser of
    unit Gaussian data (x0 = alpha x), so the sample stays O(1) instead of growing like x_T / alpha_T as
    with an epsilon model whose random output is uncorrelated with x."""
    import torch
    from diffusers import UniPCMultistepScheduler

    kwargs = dict(sample_size=16, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=None, downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6)
    model = _perturbed_model(kwargs, seed=7)
    with torch.no_grad():
        model.conv_out.weight.mul_(0.1)
        model.conv_out.bias.mul_(0.1)
    scheduler = UniPCMultistepScheduler(prediction_type="v_prediction")  # otherwise diffusers' defaults
    model.save_pretrained(tmp_path)
    scheduler.save_config(tmp_path)
    num_steps = 8
    x_T = np.random.default_rng(8).standard_normal((2, 3, 16, 16)).astype(np.float32)

    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(x_T)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
    ref = x.numpy()

    den, variables = jd.load_diffusers(tmp_path, layout="NCHW")
    assert den.prediction == "v"
    ts = jd.timesteps(den.schedule, num_steps, "linspace", final="zero")
    np.testing.assert_array_equal(np.round(np.asarray(den.schedule.model_time(ts[:-1]))), scheduler.timesteps.numpy())
    solver = jd.UniPC(order=2, variant="bh2", lower_order_final=True)
    ours = jax.jit(lambda x, v: jd.sample(den, x, ts, solver, args=v))(jnp.asarray(x_T), variables)
    assert 0.5 < np.max(np.abs(ref)) < 10  # a sensible sample, not a blow-up
    rel = _rel(ours, ref)
    assert rel <= 1e-5, rel  # measured 6.5e-7


# ---------------------------------------------------------------------------------------------------
# without torch


def _assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path


def test_save_load_round_trip_is_bit_exact(tmp_path):
    variables = random_variables(TINY_CLASS, seed=1)
    jd.save_diffusers(tmp_path, TINY_CLASS, variables, SCHEDULER)
    assert UNet2DConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text())) == TINY_CLASS
    den, loaded = jd.load_diffusers(tmp_path)
    _assert_trees_equal(loaded, variables)
    assert den.prediction == "v"  # v_prediction
    np.testing.assert_array_equal(np.asarray(den.schedule.log_alphas),
                                  np.asarray(jd.VPDiscrete.from_diffusers(SCHEDULER).log_alphas))
    sd = state_dict_from_params(variables)
    assert sd["down_blocks.0.resnets.0.conv1.weight"].shape == (8, 8, 3, 3)  # OIHW
    assert sd["time_embedding.linear_1.weight"].shape == (32, 8)  # (out, in)
    np.testing.assert_array_equal(sd["time_embedding.linear_1.weight"],
                                  np.asarray(variables["params"]["time_embedding"]["linear_1"]["kernel"]).T)
    np.testing.assert_array_equal(sd["class_embedding.weight"],
                                  np.asarray(variables["params"]["class_embedding"]["embedding"]))
    np.testing.assert_array_equal(sd["conv_norm_out.weight"], np.asarray(variables["params"]["conv_norm_out"]["scale"]))


def test_legacy_attention_names_load_to_the_same_params():
    variables = random_variables(TINY, seed=2)
    sd = state_dict_from_params(variables)
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key, value in sd.items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert "mid_block.attentions.0.proj_attn.weight" in legacy and "mid_block.attentions.0.query.bias" in legacy
    assert sum(k != k2 for k, k2 in zip(sorted(sd), sorted(legacy))) > 0
    _assert_trees_equal(params_from_state_dict(TINY, legacy), variables)
    both = dict(legacy, **{"mid_block.attentions.0.to_q.weight": sd["mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(ValueError, match=r"gives `mid_block.attentions.0.to_q.weight` twice: "
                                         r"as `mid_block.attentions.0.(query|to_q).weight`"):
        params_from_state_dict(TINY, both)


def test_pipeline_folder_variants_and_shards(tmp_path):
    """unet/ + scheduler/ layout; fp16 and bf16 variants (cast to float32); a sharded checkpoint."""
    variables = random_variables(TINY, seed=4)
    unet = tmp_path / "pipe" / "unet"
    jd.save_diffusers(unet, TINY, variables, SCHEDULER)
    (tmp_path / "pipe" / "scheduler").mkdir()
    (unet / "scheduler_config.json").rename(tmp_path / "pipe" / "scheduler" / "scheduler_config.json")
    den, loaded = jd.load_diffusers(tmp_path / "pipe")
    _assert_trees_equal(loaded, variables)
    assert den.prediction == "v"

    sd = state_dict_from_params(variables)
    for variant, dtype in (("fp16", np.float16), ("bf16", ml_dtypes.bfloat16)):
        safetensors.numpy.save_file({k: v.astype(dtype) for k, v in sd.items()},
                                    str(unet / f"diffusion_pytorch_model.{variant}.safetensors"))
        _, loaded = jd.load_diffusers(tmp_path / "pipe", variant=variant)
        rounded = jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(dtype).astype(np.float32)), variables)
        _assert_trees_equal(loaded, rounded)

    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        safetensors.numpy.save_file({k: sd[k] for k in names}, str(unet / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _, loaded = jd.load_diffusers(unet)  # the model folder itself: the scheduler is found in ../scheduler
    _assert_trees_equal(loaded, variables)


def test_state_dict_mismatches_are_named():
    variables = random_variables(TINY, seed=5)
    sd = state_dict_from_params(variables)
    bad = dict(sd)
    del bad["mid_block.resnets.1.conv2.bias"]
    bad["mid_block.resnets.1.extra.weight"] = np.zeros(3, np.float32)
    bad["conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as err:
        params_from_state_dict(TINY, bad)
    msg = str(err.value)
    assert "1 missing key(s): mid_block.resnets.1.conv2.bias" in msg
    assert "1 unexpected key(s): mid_block.resnets.1.extra.weight" in msg
    assert ("1 key(s) with the wrong shape (PyTorch layout): "
            "conv_in.weight (expected (8, 3, 3, 3), got (8, 3, 5, 5))") in msg
    # nothing matches: the count, and at most 10 of the names
    with pytest.raises(ValueError, match=rf"{len(sd)} missing key\(s\): ([^,]+, ){{9}}[^,]+, "
                                         rf"\.\.\. \({len(sd) - 10} more\)"):
        params_from_state_dict(TINY, {})


def test_loading_errors_say_what_to_do(tmp_path, monkeypatch):
    variables = random_variables(TINY, seed=6)
    folder = tmp_path / "m"
    jd.save_diffusers(folder, TINY, variables, dict(SCHEDULER, prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match=r"Unsupported scheduler `prediction_type='flow_prediction'`; supported: "
                                         r"\['epsilon', 'sample', 'v_prediction'\]"):
        jd.load_diffusers(folder)
    (folder / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match=r"No scheduler_config.json found .* pass `schedule=jd.VPDiscrete\(betas\)`"):
        jd.load_diffusers(folder)
    schedule = jd.VPDiscrete.from_diffusers(SCHEDULER)
    den, _ = jd.load_diffusers(folder, schedule=schedule)
    assert den.prediction == "epsilon" and den.schedule is schedule  # diffusers' default prediction type
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"(?s)only PyTorch pickle weights \(diffusion_pytorch_model.bin\); "
                                         r"reading them needs torch to unpickle\. "
                                         r"Convert them once to safetensors.*save_pretrained"):
        jd.load_diffusers(folder, schedule=schedule)
    with pytest.raises(FileNotFoundError, match=r"No config.json in .* or .*unet"):
        jd.load_diffusers(tmp_path, schedule=schedule)
    # a local path that does not exist is never sent to the Hub (even with huggingface_hub installed)
    with pytest.raises(FileNotFoundError, match=r"`path='.*does-not-exist'` does not exist.*huggingface_hub installed"):
        jd.load_diffusers(tmp_path / "does-not-exist")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # no Hub fallback: no network in tests
    with pytest.raises(FileNotFoundError, match=r"`path='some-org/some-model'` does not exist"):
        jd.load_diffusers("some-org/some-model")
    with pytest.raises(ValueError, match=r"`variables` must be the flax variables dict "
                                         r"`\{'params': \.\.\.\}` of a `UNet2D`"):
        jd.save_diffusers(tmp_path / "x", TINY, variables["params"], SCHEDULER)
    with pytest.raises(ValueError, match=r"missing key\(s\): class_embedding.weight"):
        jd.save_diffusers(tmp_path / "x", TINY_CLASS, variables, SCHEDULER)
