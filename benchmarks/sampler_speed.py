"""Sampler overhead and throughput: jaxdiff DPM-Solver++(2M) vs diffusers' scheduler loop in PyTorch.

A flax MLP denoiser (width 512, 4 hidden layers, 64-dim data, batch 4096) on the 1000-step DDPM
linear-beta table, sampled at 10 and 50 steps. Reported, in one process:

(a) overhead = jitted sample time / (NFE x one jitted model call); target <= 1.10;
(b) samples/s of jaxdiff vs the same network (same weights, copied to torch) driven by
    ``diffusers.DPMSolverMultistepScheduler`` (PyTorch, CPU); target: faster.

    python -m benchmarks.sampler_speed [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import median_time, write_results
from jaxdiff.nets import MLPDenoiser, as_model

DIM, WIDTH, DEPTH, BATCH = 64, 512, 4, 4096


def torch_twin(params, time_features: int):
    """The same MLP in torch, with the flax weights."""
    import torch

    dense = params["params"]
    layers = []
    names = sorted(dense, key=lambda n: int(n.split("_")[1]))
    for i, name in enumerate(names):
        w, b = np.asarray(dense[name]["kernel"]), np.asarray(dense[name]["bias"])
        lin = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        layers += [lin] + ([torch.nn.SiLU()] if i < len(names) - 1 else [])
    net = torch.nn.Sequential(*layers)
    freqs = torch.tensor(2.0 ** np.arange(time_features // 2), dtype=torch.float32)

    def model(x, t):
        angles = torch.log1p(torch.abs(torch.as_tensor(float(t)))) * freqs
        emb = torch.cat([torch.sin(angles), torch.cos(angles)]).expand(x.shape[0], time_features)
        return net(torch.cat([x, emb], dim=1))

    return model


def run_diffusers(model, betas, num_steps, x_T):
    import torch
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=len(betas), trained_betas=betas, solver_order=2,
                                        algorithm_type="dpmsolver++", timestep_spacing="linspace")
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(np.array(x_T))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
    return x


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--name", default="sampler_speed", help="result file name")
    opts = parser.parse_args(argv)
    repeats = 2 if opts.quick else 5

    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    schedule = jd.VPDiscrete(betas)
    module = MLPDenoiser(width=WIDTH, depth=DEPTH)
    params = module.init(jax.random.key(0), jnp.zeros((1, DIM)), 0.0)
    den = jd.Denoiser(as_model(module), schedule, "epsilon")
    x_T = jax.random.normal(jax.random.key(1), (BATCH, DIM), jnp.float32)

    model_call = jax.jit(lambda x, p: module.apply(p, x, 500.0))
    t_model = median_time(lambda: model_call(x_T, params).block_until_ready(), repeats=repeats * 4)

    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError:  # e.g. on an accelerator image without the references: jaxdiff's numbers only
        torch = None
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
        twin = torch_twin(params, module.time_features)
    rows, record = [], {"model_call_s": t_model, "runs": []}
    for n in (10, 50):
        ts = jd.timesteps(schedule, n, "linspace")
        run = jax.jit(lambda x, p: jd.sample(den, x, ts, jd.DPMSolverPP(order=2), args=p))
        start = time.perf_counter()
        run(x_T, params).block_until_ready()
        compile_s = time.perf_counter() - start
        t_jax = median_time(lambda: run(x_T, params).block_until_ready(), repeats=repeats)
        overhead = t_jax / (jd.nfe(jd.DPMSolverPP(order=2), ts) * t_model)
        row = {
            "steps": n,
            "NFE": jd.nfe(jd.DPMSolverPP(order=2), ts),
            "jaxdiff s": t_jax,
            "overhead vs NFE x model": overhead,
            "samples/s jaxdiff": BATCH / t_jax,
            "compile s": compile_s,
        }
        if torch is not None:
            t_torch = median_time(lambda: run_diffusers(twin, betas, n, x_T), repeats=max(1, repeats // 2))
            theirs = run_diffusers(twin, betas, n, x_T).numpy()
            row.update({
                "diffusers+torch s": t_torch,
                "samples/s diffusers": BATCH / t_torch,
                "speedup": t_torch / t_jax,
                "max |ours - diffusers|": float(np.max(np.abs(np.asarray(run(x_T, params)) - theirs))),
            })
        rows.append(row)
        record["runs"].append(row)
    md = write_results(opts.name, record, rows, "Sampler speed: DPM-Solver++(2M), flax MLP 512x4, batch 4096, dim 64",
                       notes=f"One jitted model call: {t_model * 1e3:.2f} ms. Targets: overhead <= 1.10; faster than diffusers.")
    print(md)


if __name__ == "__main__":
    main()
