"""Compiled temporary memory of gradients through sampling versus the number of steps.

Acceptance 3 of the adjoint issue: ``jax.jit(grad).lower(...).compile().memory_analysis()`` temporary
bytes for AdjointDPM (flat in the number of steps; ``store_trajectory=True`` keeps the N + 1 states),
Backprop() (grows linearly) and Backprop(checkpoint=...) (in between), on a small flax MLP noise
predictor over a batch of points, with a UniPC(order=3) forward pass.

    python -m benchmarks.adjoint_memory [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxdiff as jd
from benchmarks import common
from jaxdiff.adjoint import AdjointDPM, Backprop

RESULTS = pathlib.Path(common.RESULTS)


class MLP(nn.Module):
    width: int = 256

    @nn.compact
    def __call__(self, x, t):
        feats = jnp.broadcast_to(jnp.stack([jnp.sin(t), jnp.cos(t)]), x.shape[:-1] + (2,))
        h = nn.silu(nn.Dense(self.width)(jnp.concatenate([x, feats], -1)))
        h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(x.shape[-1])(h)


def temp_bytes(adjoint, num_steps, batch=512, dim=8):
    s = jd.VPCosine()
    mlp = MLP()
    params = mlp.init(jax.random.key(0), jnp.zeros((1, dim)), 0.5)
    den = jd.Denoiser(lambda x, t, p: mlp.apply(p, x, t), s, "epsilon")
    ts = jd.timesteps(s, num_steps)
    x_T = jnp.zeros((batch, dim), jnp.float32)

    def loss(p, x):
        return jnp.mean(jd.sample(den, x, ts, jd.UniPC(order=3), args=p, adjoint=adjoint) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x_T).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args()
    steps = (10, 50, 100) if opts.quick else (10, 50, 100, 250, 500)
    methods = {
        "AdjointDPM() (order 3 + corrector)": AdjointDPM(),
        "AdjointDPM(order=3, corrector=False)": AdjointDPM(order=3, corrector=False),
        "AdjointDPM(store_trajectory=True)": AdjointDPM(store_trajectory=True),
        "Backprop()": Backprop(),
        "Backprop(checkpoint=10)": Backprop(10),
        "Backprop(checkpoint='sqrt')": Backprop("sqrt"),
        "Backprop(checkpoint='binomial')": Backprop("binomial"),
    }
    table = {name: {n: temp_bytes(adj, n) for n in steps} for name, adj in methods.items()}
    record = {"device": jax.devices()[0].device_kind, "dtype": "float32", "model": "MLP 2x256, batch 512, dim 8",
              "steps": list(steps), "temp_bytes": table,
              "ratio_last_over_first": {k: v[steps[-1]] / v[steps[0]] for k, v in table.items()}}
    RESULTS.mkdir(exist_ok=True)
    name = "adjoint_memory" + ("_quick" if opts.quick else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))
    lines = [f"# Compiled temporary memory of the gradient (MiB), {record['model']}, {record['device']}", "",
             "| method | " + " | ".join(f"{n} steps" for n in steps) + f" | ratio {steps[-1]}/{steps[0]} |",
             "|---|" + "---|" * (len(steps) + 1)]
    for k, v in table.items():
        lines.append(f"| {k} | " + " | ".join(f"{v[n] / 2**20:.2f}" for n in steps) + f" | {record['ratio_last_over_first'][k]:.2f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
