"""Test configuration shared by the whole suite.

Eight host CPU devices are requested before jax is imported so that the sharding tests
(`shard_map`/`pmap` over an 8-device mesh) run on any CPU machine; single-device code
just uses the first one. float64 is on: tests that check float32 behaviour say so
with explicit dtypes. Rank promotion raises, so silent broadcasting bugs fail loudly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import importlib.util  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


def _missing(*modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items):
    """`reference` tests skip cleanly when their PyTorch/NumPy reference is not installed."""
    for item in items:
        marker = item.get_closest_marker("reference")
        if marker is None:
            continue
        missing = _missing(*marker.args)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"reference package(s) not installed: {missing}"))
