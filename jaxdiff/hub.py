"""Load and save diffusers ``UNet2DModel`` checkpoints without torch.

A diffusers model folder holds ``config.json`` (the ``UNet2DModel`` arguments) and
``diffusion_pytorch_model.safetensors`` (the PyTorch state dict); a pipeline folder holds it under
``unet/`` with the scheduler's ``scheduler_config.json`` under ``scheduler/``. ``load_diffusers`` reads
both into a ``jaxdiff.Denoiser`` (``jaxdiff.nets.UNet2D`` + the ``VPDiscrete`` table + the prediction
type) and the flax variables; ``save_diffusers`` writes a folder that diffusers' ``UNet2DModel`` and
``DDPMScheduler.from_pretrained`` load.

The conversion is mechanical because ``UNet2D``'s parameter tree mirrors the state dict:

- names: ``down_blocks.0.resnets.1.conv1.weight`` <-> ``down_blocks_0/resnets_1/conv1/kernel``
  (list indices join their module name with ``_``);
- layouts: conv OIHW <-> HWIO, linear (out, in) <-> (in, out), GroupNorm ``weight`` <-> ``scale``,
  Embedding ``weight`` <-> ``embedding``; biases and the Fourier projection's ``weight`` as they are;
- legacy attention names (diffusers <= 0.1 checkpoints, e.g. ``google/ddpm-*``): ``query``/``key``/
  ``value``/``proj_attn`` load as ``to_q``/``to_k``/``to_v``/``to_out.0``.

``.bin`` checkpoints are pickles that only torch can read; convert them once (see ``load_diffusers``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.models import Denoiser
from jaxdiff.nets.unet import UNet2D, UNet2DConfig, unet_fn
from jaxdiff.schedules import Schedule, VPDiscrete

__all__ = ["params_from_state_dict", "state_dict_from_params", "load_diffusers", "save_diffusers",
           "PREDICTION_TYPES"]

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

#: diffusers ``prediction_type`` -> ``jaxdiff.Denoiser`` prediction.
PREDICTION_TYPES = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}

# Modules that diffusers keeps in nn.ModuleLists: "resnets.1" in torch is "resnets_1" in flax.
_LIST_MODULE = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")
_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_MAX_LISTED = 10


# -------------------------------------------------------------------------------------------------
# state dict <-> flax tree


def _torch_key(path: tuple[str, ...]) -> str:
    modules = [f"{m.group(1)}.{m.group(2)}" if (m := _LIST_MODULE.match(p)) else p for p in path[:-1]]
    return ".".join(modules + ["bias" if path[-1] == "bias" else "weight"])


def _to_torch_layout(leaf_name: str, a):
    if leaf_name == "kernel" and a.ndim == 4:  # HWIO -> OIHW
        return np.transpose(a, (3, 2, 0, 1))
    if leaf_name == "kernel" and a.ndim == 2:  # (in, out) -> (out, in)
        return np.transpose(a)
    return a


def _to_flax_layout(leaf_name: str, a):
    if leaf_name == "kernel" and a.ndim == 4:  # OIHW -> HWIO
        return np.transpose(a, (2, 3, 1, 0))
    if leaf_name == "kernel" and a.ndim == 2:
        return np.transpose(a)
    return a


def _torch_shape(leaf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_to_torch_layout(leaf_name, np.empty(shape, np.int8)).shape)


def _flax_path(torch_key: str) -> tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1.weight`` -> ``("down_blocks_0", "resnets_1", "conv1", "kernel")``."""
    parts = torch_key.split(".")
    modules, leaf = [], parts[-1]
    for p in parts[:-1]:
        if p.isdigit():
            modules[-1] = f"{modules[-1]}_{p}"
        else:
            modules.append(p)
    if leaf == "weight":
        last = modules[-1]
        if last == "class_embedding":
            leaf = "embedding"
        elif last == "time_proj":
            leaf = "weight"
        elif last.startswith(("norm", "group_norm", "conv_norm_out")):
            leaf = "scale"
        else:
            leaf = "kernel"
    return tuple(modules) + (leaf,)


def _expected(config: UNet2DConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (flax path, torch-layout shape), from the config's parameter spec (no tracing)."""
    return {key: (_flax_path(key), shape) for key, shape in config.state_dict_shapes().items()}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _normalize_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename legacy attention keys; a parameter given under both names is an error."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"State dict keys must be strings, got {key!r} ({type(key).__name__}).")
        m = _LEGACY_ATTENTION.match(key)
        new = f"{m.group(1)}{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}" if m else key
        if new in out:
            raise ValueError(f"The state dict gives `{new}` twice: as `{origin[new]}` and as `{key}` "
                             "(legacy and current attention names). Keep one of them.")
        out[new], origin[new] = value, key
    return out


def _check_keys(config: UNet2DConfig, given: Mapping[str, Any]):
    """The expected keys of ``config``; a ValueError naming every missing, unexpected or mis-shaped key."""
    expected = _expected(config)
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    misshaped = sorted(
        f"{k} (expected {expected[k][1]}, got {tuple(np.shape(given[k]))})"
        for k in expected if k in given and tuple(np.shape(given[k])) != expected[k][1]
    )
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if misshaped:
            problems.append(f"{len(misshaped)} key(s) with the wrong shape (PyTorch layout): {_listing(misshaped)}")
        raise ValueError(
            "The state dict does not match the UNet2DConfig:\n- " + "\n- ".join(problems)
            + "\nCheck that config.json belongs to these weights (block_out_channels, block types, "
            "layers_per_block, attention_head_dim, class embedding)."
        )
    return expected


def params_from_state_dict(config: UNet2DConfig, state_dict: Mapping[str, Any], *, dtype=jnp.float32) -> dict:
    """The flax variables ``{"params": ...}`` of ``UNet2D(config)`` from a diffusers/PyTorch state dict.

    Conv weights OIHW -> HWIO, linear (out, in) -> (in, out), GroupNorm ``weight`` -> ``scale``,
    Embedding ``weight`` -> ``embedding``. Legacy attention names (``query``/``key``/``value``/
    ``proj_attn``) are accepted. The expected keys and shapes come from ``config.state_dict_shapes()``.

    Args:
        config: the model's ``UNet2DConfig``.
        state_dict: ``{torch name: array}`` (NumPy arrays, e.g. from ``safetensors.numpy.load_file``).
        dtype: dtype of the returned parameters.

    Returns:
        ``{"params": nested dict of jax arrays}``.

    Raises:
        ValueError: naming the missing keys, the unexpected keys and the mis-shaped keys (expected vs
            got, in PyTorch layout), up to 10 of each with their counts.

    Example:
        >>> sd = safetensors.numpy.load_file("unet/diffusion_pytorch_model.safetensors")  # doctest: +SKIP
        >>> variables = params_from_state_dict(UNet2DConfig.from_diffusers(cfg_dict), sd)  # doctest: +SKIP
    """
    if not isinstance(config, UNet2DConfig):
        raise TypeError(f"`config` must be a `UNet2DConfig`, got {type(config).__name__}.")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping from names to arrays, got {type(state_dict).__name__}.")
    given = _normalize_names(state_dict)
    expected = _check_keys(config, given)
    flat = {}
    for key, (path, _) in expected.items():
        flat[path] = jnp.asarray(_to_flax_layout(path[-1], np.asarray(given[key])), dtype=dtype)
    return {"params": traverse_util.unflatten_dict(flat)}


def state_dict_from_params(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The diffusers/PyTorch state dict (NumPy arrays, PyTorch names and layouts) of ``UNet2D`` variables.

    Inverse of ``params_from_state_dict``; the dtype of each leaf is kept.

    Args:
        variables: ``{"params": ...}`` as returned by ``UNet2D.init`` or ``params_from_state_dict``.

    Returns:
        ``{torch name: C-contiguous np.ndarray}``.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = f" with keys {list(variables)}" if isinstance(variables, Mapping) else ""
        raise ValueError("`variables` must be the flax variables dict `{'params': ...}` of a `UNet2D`; got "
                         f"{type(variables).__name__}{keys}.")
    out = {}
    for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
        out[_torch_key(path)] = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(leaf)))
    return out


# -------------------------------------------------------------------------------------------------
# folders


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(str(path))
    except TypeError:
        # NumPy has no bfloat16: read through the flax framework (ml_dtypes arrays), same bytes.
        from safetensors import safe_open

        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


def _variant_name(name: str, variant: str | None) -> str:
    """diffusers' naming: the variant goes before the last extension (``x.safetensors`` -> ``x.fp16.safetensors``)."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _resolve(path) -> Path:
    """A local folder, or (if ``huggingface_hub`` is installed) a Hub repo id downloaded to the cache."""
    name = os.fspath(path)
    p = Path(name).expanduser()
    if p.exists():
        return p
    missing = FileNotFoundError(
        f"`path={name!r}` does not exist. Pass a local diffusers folder (config.json + {WEIGHTS_NAME}, or a "
        "pipeline folder with unet/ and scheduler/), or a Hub repo id ('namespace/name') with huggingface_hub "
        "installed."
    )
    # a Hub id is "name" or "namespace/name"; anything else (absolute, relative with ./, deeper) is a local path
    if p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise missing
    try:
        import huggingface_hub
    except ImportError:
        raise missing from None
    patterns = [f"{d}{name}" for d in ("", "unet/", "scheduler/")
                for name in (CONFIG_NAME, SCHEDULER_CONFIG_NAME, "diffusion_pytorch_model*.safetensors*")]
    return Path(huggingface_hub.snapshot_download(os.fspath(path), allow_patterns=patterns))


def _model_dir(root: Path) -> Path:
    for d in (root, root / "unet"):
        if (d / CONFIG_NAME).is_file():
            return d
    raise FileNotFoundError(
        f"No {CONFIG_NAME} in {root} or {root / 'unet'}: `path` must be a diffusers UNet2DModel folder "
        "(config.json + weights) or a pipeline folder with a unet/ subfolder."
    )


def _load_weights(model_dir: Path, variant: str | None) -> dict[str, np.ndarray]:
    single = model_dir / _variant_name(WEIGHTS_NAME, variant)
    index = model_dir / _variant_name(WEIGHTS_INDEX_NAME, variant)
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():  # sharded: {"weight_map": {name: shard file}}
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(_read_safetensors(model_dir / shard))
        return out
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    if bins:
        raise ValueError(
            f"{model_dir} has only PyTorch pickle weights ({', '.join(bins)}); reading them needs torch to "
            "unpickle. Convert them once to safetensors where torch is installed, e.g.\n"
            "    from diffusers import UNet2DModel\n"
            f"    UNet2DModel.from_pretrained({str(model_dir)!r}).save_pretrained(\n"
            f"        {str(model_dir)!r}, safe_serialization=True)"
        )
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    raise FileNotFoundError(
        f"No {single.name} in {model_dir}" + (f" (found {found}; pass `variant=` to pick one)" if found else "") + "."
    )


def _scheduler_config(model_dir: Path) -> tuple[dict | None, list[Path]]:
    candidates = [model_dir / SCHEDULER_CONFIG_NAME, model_dir.parent / "scheduler" / SCHEDULER_CONFIG_NAME,
                  model_dir / "scheduler" / SCHEDULER_CONFIG_NAME]
    for c in candidates:
        if c.is_file():
            return _read_json(c), candidates
    return None, candidates


def _prediction(name: str) -> str:
    if name not in PREDICTION_TYPES:
        raise ValueError(f"Unsupported scheduler `prediction_type={name!r}`; supported: {list(PREDICTION_TYPES)} "
                         f"(mapped to jaxdiff's {list(PREDICTION_TYPES.values())}).")
    return PREDICTION_TYPES[name]


def load_diffusers(
    path,
    *,
    layout: str = "NHWC",
    dtype=None,
    variant: str | None = None,
    schedule: Schedule | None = None,
    prediction: str | None = None,
) -> tuple[Denoiser, dict]:
    """A diffusers ``UNet2DModel`` checkpoint as a ``jaxdiff.Denoiser`` and its flax variables, without torch.

    Reads ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` (or its sharded index)
    with ``safetensors.numpy``, and the schedule from ``scheduler_config.json`` beside the model, in
    ``../scheduler/`` or in ``scheduler/`` (``VPDiscrete.from_diffusers``). The scheduler's
    ``prediction_type`` maps ``epsilon`` -> ``"epsilon"``, ``sample`` -> ``"x0"``, ``v_prediction`` -> ``"v"``.

    Args:
        path: a model folder, a pipeline folder (``unet/`` + ``scheduler/``), or, when it does not exist
            locally and ``huggingface_hub`` is installed, a Hub repo id (only the json/safetensors files
            are downloaded).
        layout: ``"NHWC"`` (default) or ``"NCHW"``: the layout the returned denoiser takes.
        dtype: computation and parameter dtype (default float32).
        variant: weights variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``
            (the parameters are cast to ``dtype``).
        schedule: use this schedule instead of the scheduler config's (needed when there is none).
        prediction: override the prediction (``"epsilon"``/``"x0"``/``"v"``); default: the scheduler
            config's ``prediction_type``, else diffusers' default ``"epsilon"``.

    Returns:
        ``(denoiser, variables)``: ``jd.Denoiser(unet_fn(UNet2D(config, dtype), layout), schedule,
        prediction)`` and ``{"params": ...}``. Sample with ``jd.sample(denoiser, x_T, ts, solver,
        args=variables)`` (``args=(variables, class_labels)`` for class-conditional models).

    Raises:
        FileNotFoundError: no config.json / weights found.
        ValueError: only ``.bin`` weights (they need torch to unpickle; the message says how to
            convert), no scheduler config and no ``schedule=``, an unsupported prediction type or
            config value, or weights that do not match the config.

    Example:
        >>> den, variables = load_diffusers("ddpm-cifar10-32")  # doctest: +SKIP
        >>> ts = jd.timesteps(den.schedule, 10, "trailing")  # doctest: +SKIP
        >>> x0 = jd.sample(den, x_T, ts, jd.UniPC(), args=variables)  # doctest: +SKIP
    """
    dtype = jnp.float32 if dtype is None else dtype
    model_dir = _model_dir(_resolve(path))
    config = UNet2DConfig.from_diffusers(_read_json(model_dir / CONFIG_NAME))
    variables = params_from_state_dict(config, _load_weights(model_dir, variant), dtype=dtype)
    scheduler_config, searched = _scheduler_config(model_dir)
    if schedule is None:
        if scheduler_config is None:
            raise ValueError(
                f"No {SCHEDULER_CONFIG_NAME} found (looked at {', '.join(str(c) for c in searched)}). Put the "
                "scheduler config beside config.json, or pass `schedule=jd.VPDiscrete(betas)` (and `prediction=`)."
            )
        schedule = VPDiscrete.from_diffusers(scheduler_config)
    if prediction is None:
        prediction = _prediction((scheduler_config or {}).get("prediction_type", "epsilon"))
    return Denoiser(unet_fn(UNet2D(config, dtype), layout), schedule, prediction), variables


def save_diffusers(
    path, config: UNet2DConfig, variables: Mapping[str, Any], scheduler_config: Mapping[str, Any]
) -> Path:
    """Write a folder that diffusers' ``UNet2DModel.from_pretrained`` and ``DDPMScheduler.from_pretrained`` load.

    Files: ``config.json`` (``config.to_diffusers()``), ``diffusion_pytorch_model.safetensors``
    (float32, PyTorch names/layouts) and ``scheduler_config.json`` beside them. ``load_diffusers`` reads
    the folder back bit-exactly (for float32 variables).

    Args:
        path: the folder (created if needed; existing files of these names are overwritten).
        config: the model's ``UNet2DConfig``.
        variables: ``{"params": ...}`` of ``UNet2D(config)``; checked against the config first.
        scheduler_config: a diffusers scheduler config dict (e.g. ``{"_class_name": "DDPMScheduler",
            "beta_schedule": "linear", "prediction_type": "epsilon", ...}``).

    Returns:
        The folder's ``Path``.

    Example:
        >>> save_diffusers("out", cfg, variables, {"_class_name": "DDPMScheduler"})  # doctest: +SKIP
        >>> UNet2DModel.from_pretrained("out")  # with torch and diffusers  # doctest: +SKIP
    """
    import safetensors.numpy

    if not isinstance(config, UNet2DConfig):
        raise TypeError(f"`config` must be a `UNet2DConfig`, got {type(config).__name__}.")
    if not isinstance(scheduler_config, Mapping):
        raise TypeError(f"`scheduler_config` must be a dict (a diffusers scheduler config), got "
                        f"{type(scheduler_config).__name__}.")
    state_dict = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict_from_params(variables).items()}
    _check_keys(config, state_dict)  # the names and shapes the loader will expect
    out = Path(os.fspath(path))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CONFIG_NAME, "w") as f:
        json.dump(config.to_diffusers(), f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(state_dict, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(out / SCHEDULER_CONFIG_NAME, "w") as f:
        json.dump(dict(scheduler_config), f, indent=2, sort_keys=True)
    return out
