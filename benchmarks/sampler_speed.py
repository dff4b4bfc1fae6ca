"""Sampler speed on a real model: jaxdiff against diffusers + PyTorch with the same weights, in one run.

Model: the shipped digits U-Net (``jd.pretrained.digits()``; PyTorch side
``diffusers.UNet2DModel.from_pretrained`` on the same folder), class-conditional, fp32, a batch of B.
Sampler: DPM-Solver++(2M) on the shipped scheduler config's grid (trailing spacing, final sigma = 0), as
``diffusers.DPMSolverMultistepScheduler.from_config`` builds it; both sides start from the same x_T.

Peers, each at its best on the same threads (torch ``set_num_threads`` = XLA's CPU threads = all cores):

- ``jaxdiff``: ``jax.jit`` of the whole ``jd.sample`` loop;
- ``bare scan``: ``jax.jit`` of a ``lax.scan`` of the same NFE model calls (x <- x + c_k * model(x, t_k)),
  the floor any sampler pays; ``overhead = jaxdiff / bare scan`` (target <= 1.03 on CPU);
- ``torch eager``: diffusers' scheduler loop under ``torch.inference_mode``;
- ``torch.compile``: the same loop with ``torch.compile(unet)`` (reported, or the error if it fails).

Steady-state times are medians of >= 10 interleaved repeats (order rotated each round) with the
interquartile range; time to first sample (compilation included) is measured once per peer, separately.
The final samples of jaxdiff and diffusers are compared (max abs difference).

    python -m benchmarks.sampler_speed [--repeats 10] [--batch 64 256] [--nfe 10 20] [--quick] [--no-torch]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import interleaved, spread, write_results


def torch_peers(unet_dir, scheduler_config, x_T, labels, num_steps):
    """diffusers' DPMSolverMultistepScheduler loop, eager and compiled; each returns the final sample."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    sched = DPMSolverMultistepScheduler.from_config(scheduler_config)
    x0 = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))

    def loop(net):
        def run():
            sched.set_timesteps(num_steps)
            x = x0
            with torch.inference_mode():
                for t in sched.timesteps:
                    x = sched.step(net(x, t, class_labels=y).sample, t, x).prev_sample
            return x.numpy().transpose(0, 2, 3, 1)

        return run

    peers = {"torch eager": loop(unet)}
    try:
        peers["torch.compile"] = loop(torch.compile(unet))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        peers["torch.compile"] = e
    return peers


def jax_peers(den, variables, x_T, labels, num_steps):
    solver = jd.DPMSolverPP(order=2)
    ts = jd.timesteps(den.schedule, num_steps, "trailing", final="zero")
    args = jd.pretrained.digits_args(variables, labels)
    sample = jax.jit(lambda x, a: jd.sample(den, x, ts, solver, args=a))
    t_model = den.schedule.model_time(ts[:-1])
    coef = jnp.linspace(-0.1, -0.01, num_steps, dtype=x_T.dtype)

    def bare_body(x, tc):
        t, c = tc
        return x + c * den.fn(x, t, args), None

    bare = jax.jit(lambda x, a: jax.lax.scan(bare_body, x, (t_model, coef))[0])
    return {"jaxdiff": lambda: np.asarray(sample(x_T, args).block_until_ready()),
            "bare scan": lambda: np.asarray(bare(x_T, args).block_until_ready())}


def first_call(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--no-torch", action="store_true", help="jaxdiff and the bare scan only (e.g. on a GPU image)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, batch 64, NFE 10 (a smoke run)")
    parser.add_argument("--name", default="sampler_speed")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.repeats, opts.batch, opts.nfe = 3, [64], [10]

    threads = os.cpu_count() or 1
    torch = None
    if not opts.no_torch:
        import torch

        torch.set_num_threads(threads)
    den, variables = jd.pretrained.digits()
    with open(jd.pretrained.DIGITS_UNET_DIR / "scheduler_config.json") as f:
        scheduler_config = json.load(f)
    rows, record = [], {"threads": threads, "runs": []}
    for batch in opts.batch:
        labels = np.arange(batch) % 10
        x_T = jax.random.normal(jax.random.key(batch), (batch, 8, 8, 1), jnp.float32)
        for nfe in opts.nfe:
            fns = jax_peers(den, variables, x_T, labels, nfe)
            if torch is not None:
                fns |= torch_peers(str(jd.pretrained.DIGITS_UNET_DIR), scheduler_config, x_T, labels, nfe)
            errors = {k: repr(v) for k, v in fns.items() if isinstance(v, Exception)}
            fns = {k: v for k, v in fns.items() if not isinstance(v, Exception)}
            first, outs = {}, {}
            for name, fn in fns.items():
                outs[name], first[name] = first_call(fn)
            try:
                times = interleaved(fns, opts.repeats)
            except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing at run time
                raise RuntimeError(f"timing failed at batch {batch}, NFE {nfe}") from e
            stats = {name: spread(ts) for name, ts in times.items()}
            med = {name: s["median"] for name, s in stats.items()}
            row = {
                "batch": batch,
                "NFE": nfe,
                **{f"{name} ms": 1e3 * med[name] for name in med},
                "overhead (jaxdiff / bare scan)": med["jaxdiff"] / med["bare scan"],
            }
            for peer in ("torch eager", "torch.compile"):
                if peer in med:
                    row[f"{peer} / jaxdiff"] = med[peer] / med["jaxdiff"]
            if "torch eager" in outs:
                row["max |jaxdiff - diffusers|"] = float(np.max(np.abs(outs["jaxdiff"] - outs["torch eager"])))
            rows.append(row)
            record["runs"].append({"batch": batch, "nfe": nfe, "stats_s": stats, "first_call_s": first,
                                   "errors": errors, "row": row})
            print(row, {k: round(v, 2) for k, v in first.items()}, errors, flush=True)
    first_rows = [{"batch": r["batch"], "NFE": r["nfe"], **{f"{k} s": v for k, v in r["first_call_s"].items()}}
                  for r in record["runs"]]
    notes = (f"Threads: {threads} on both sides. Medians of {opts.repeats} interleaved repeats; the JSON has the "
             "quartiles. Time to first sample (compile included):\n\n"
             + "\n".join(f"- batch {r['batch']}, NFE {r['NFE']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()
                                                                               if k.endswith(" s"))
                         for r in first_rows))
    if any(r["errors"] for r in record["runs"]):
        notes += "\n\nErrors: " + "; ".join(f"{k}: {v}" for r in record["runs"] for k, v in r["errors"].items())
    md = write_results(opts.name, record, rows, "Sampler speed on the digits U-Net: jaxdiff vs diffusers + PyTorch",
                       notes=notes)
    print(md)


if __name__ == "__main__":
    main()
