"""Per-step cost of FKC weights + resampling vs a plain SDE step with the same model (acceptance: <= 1.3x).

Model: ``jaxdiff.nets.MLPDenoiser`` (width 512, 4 hidden layers), 64-dim data, 4096 particles, float32,
VPLinear. Peers, each one jitted ``lax.scan`` over the same grid, run side by side in one process:

- ``fkc``: ``fkc.sample(Anneal(den, 2), ...)`` with log-weights and systematic resampling at every step;
- ``fkc_unweighted``: the same SDE and code path without weights/resampling (``weighted=False``);
- ``jd.sample DDPM``: the core driver's DDPM (ancestral SDE) step, one model call per step.

    python -m benchmarks.fkc_overhead [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxdiff as jd
from benchmarks.common import median_time, write_results
from jaxdiff.nets import MLPDenoiser, as_model
from jaxdiff.smc import fkc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    opts = parser.parse_args()
    steps, repeats = (5, 3) if opts.quick else (20, 7)
    batch, dim = 4096, 64
    s = jd.VPLinear()
    net = MLPDenoiser(width=512, depth=4)
    x = jax.random.normal(jax.random.key(0), (batch, dim), jnp.float32)
    params = net.init(jax.random.key(1), x, jnp.float32(0.5))
    den = jd.Denoiser(as_model(net), s, "epsilon")
    ts = jd.timesteps(s, steps, "time")
    key = jax.random.key(2)
    target = fkc.Anneal(den, 2.0)

    peers = {
        "fkc (weights + systematic resampling every step)": jax.jit(
            lambda x, k, p: fkc.sample(target, x, ts, k, args=p).x),
        "fkc_unweighted (same SDE, no weights)": jax.jit(
            lambda x, k, p: fkc.sample(target, x, ts, k, args=p, weighted=False).x),
        "jd.sample DDPM (core SDE step)": jax.jit(
            lambda x, k, p: jd.sample(den, x, ts, jd.DDPM(), args=p, key=k)),
    }
    per_step = {}
    for name, fn in peers.items():
        per_step[name] = median_time(lambda: fn(x, key, params).block_until_ready(), repeats=repeats) / steps
    base = per_step["fkc_unweighted (same SDE, no weights)"]
    rows = [dict(peer=name, ms_per_step=1e3 * t, ratio_to_plain_sde=t / base,
                 ratio_to_ddpm=t / per_step["jd.sample DDPM (core SDE step)"]) for name, t in per_step.items()]
    notes = (f"{batch} particles x {dim} dims, MLPDenoiser(width=512, depth=4), float32, {steps} steps, "
             f"median of {repeats} repeats. Acceptance: fkc / plain SDE step <= 1.3.")
    md = write_results("fkc_overhead", dict(steps=steps, batch=batch, dim=dim, repeats=repeats, rows=rows), rows,
                       "FKC per-step overhead", notes)
    print(md)


if __name__ == "__main__":
    main()
