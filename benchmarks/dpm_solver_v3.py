"""DPM-Solver-v3: accuracy at few steps, solver overhead, and parity with the reference code.

(a) Accuracy: a 2-D Gaussian mixture (exact model), EMS from ``jd.compute_ems`` on 2048 data
    samples and 201 lambda points; RMS distance of 256 samples to a 1000-step DPM-Solver++(3M)
    solution, against DPM-Solver++(3M) and UniPC(3) at the same NFE (logSNR grids, VP linear,
    t from 1 to 1e-3).
(b) Overhead: jitted sampling with the flax MLP of ``sampler_speed`` (64 dims, batch 1024), v3
    (per-coordinate coefficients) vs DPM-Solver++(3M), same grid; ratio of wall times.
(c) Parity, with ``--reference path/to/dpm_solver_v3.py`` (thu-ml/DPM-Solver-v3, PyTorch): the
    reference runs on CPU in float64 (``.cuda()`` made a no-op, its float32 ``FloatTensor`` times
    promoted) on the mixture with the same EMS files, for its options at 5 to 20 steps.

    python -m benchmarks.dpm_solver_v3 [--reference /path/to/dpm_solver_v3.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import median_time, write_results
from jaxdiff.nets import MLPDenoiser, as_model
from jaxdiff.testing import GaussianMixture

S = jd.VPLinear()
T_START, T_END = 1.0, 1e-3
GM = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[1.0, -1.0], [-1.5, 0.5]]), jnp.array([0.3, 0.6]))
OPTIONS = [  # the reference's knobs: (order, p_pseudo, use_corrector, c_pseudo, lower_order_final)
    (3, False, True, True, True),
    (3, True, True, True, False),
    (2, False, True, False, True),
    (3, False, False, False, True),
]


def lam_range():
    return float(S.lambda_(T_START)), float(S.lambda_(T_END))


def logsnr_grid(n):
    lo, hi = lam_range()
    return jnp.asarray(S.t_of_lambda(jnp.linspace(lo, hi, n + 1)))


def accuracy(ems) -> list[dict]:
    den = GM.denoiser(S)
    x_T = jax.random.normal(jax.random.key(1), (256, 2))
    ref = jd.sample(den, x_T, logsnr_grid(1000), jd.DPMSolverPP(order=3, solver_type="heun"), args=GM)
    rows = []
    for n in (5, 6, 8, 10, 15, 20):
        ts = logsnr_grid(n)
        row = {"NFE": n}
        for name, solver in (("v3", jd.DPMSolverV3(ems)), ("v3 no corrector", jd.DPMSolverV3(ems, use_corrector=False)),
                             ("DPM++3M", jd.DPMSolverPP(order=3)), ("UniPC-3", jd.UniPC(order=3))):
            x = jd.sample(den, x_T, ts, solver, args=GM)
            row[name] = float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, -1))))
        rows.append(row)
    return rows


def overhead(repeats: int) -> dict:
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    schedule = jd.VPDiscrete(betas)
    module = MLPDenoiser(width=512, depth=4)
    params = module.init(jax.random.key(0), jnp.zeros((1, 64)), 0.0)
    den = jd.Denoiser(as_model(module), schedule, "epsilon")
    x_T = jax.random.normal(jax.random.key(1), (1024, 64), jnp.float32)
    lam = np.linspace(float(schedule.lambda_(schedule.t_max)), float(schedule.lambda_(schedule.t_min)), 201)
    rng = np.random.default_rng(0)
    ems = jd.EMS(lam, 1 + 0.1 * rng.normal(size=(201, 64)), 0.1 * rng.normal(size=(201, 64)),
                 0.1 * rng.normal(size=(201, 64)))
    ts = jd.timesteps(schedule, 10, "logsnr")
    runs = {name: jax.jit(lambda x, p, solver=solver: jd.sample(den, x, ts, solver, args=p))
            for name, solver in (("v3", jd.DPMSolverV3(ems)), ("DPM++3M", jd.DPMSolverPP(order=3)))}
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run(x_T, params).block_until_ready()
    for _ in range(repeats):  # interleaved: both see the same machine load
        for name, run in runs.items():
            times[name].append(median_time(lambda: run(x_T, params).block_until_ready(), repeats=1, warmup=0))
    t = {name: float(np.median(v)) for name, v in times.items()}
    return {"v3_s": t["v3"], "dpmpp3m_s": t["DPM++3M"], "ratio": t["v3"] / t["DPM++3M"]}


def parity(reference: str, ems) -> list[dict]:
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.FloatTensor = lambda x: torch.tensor([float(v) for v in x], dtype=torch.float64)
    torch.set_default_dtype(torch.float64)
    spec = importlib.util.spec_from_file_location("dpm_solver_v3_reference", reference)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    stats = tempfile.mkdtemp()
    np.savez(os.path.join(stats, "l.npz"), l=ems.l.reshape(-1, 2, 1, 1))
    np.savez(os.path.join(stats, "sb.npz"), s=ems.s.reshape(-1, 2, 1, 1), b=ems.b.reshape(-1, 2, 1, 1))
    loaded = jd.EMS.load_reference(stats, S, T_START, T_END)
    ours_ems = jd.EMS(loaded.lam, *(v.reshape(-1, 2) for v in (loaded.l, loaded.s, loaded.b)))
    den = GM.denoiser(S)
    eps = jax.jit(lambda x, t: den.eps(x, t, GM))

    def model_fn(x, t):
        e = eps(jnp.asarray(x.numpy().reshape(-1, 2)), jnp.asarray(float(t[0])))
        return torch.from_numpy(np.array(e).reshape(-1, 2, 1, 1))

    noise_schedule = ref.NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0)
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (64, 2)), np.float64)
    rows = []
    for steps in (5, 6, 10, 20):
        for order, p_pseudo, corrector, c_pseudo, lof in OPTIONS:
            solver = ref.DPM_Solver_v3(stats, noise_schedule, steps=steps, t_start=T_START, t_end=T_END,
                                       skip_type="logSNR", device="cpu")
            theirs = solver.sample(torch.from_numpy(x_T.reshape(-1, 2, 1, 1)), model_fn, order=order, p_pseudo=p_pseudo,
                                   use_corrector=corrector, c_pseudo=c_pseudo, lower_order_final=lof)
            ours = jd.sample(den, jnp.asarray(x_T), jnp.asarray(np.asarray(solver.timesteps)), jd.DPMSolverV3(
                ours_ems, order=order, predictor_pseudo=p_pseudo, use_corrector=corrector, corrector_pseudo=c_pseudo,
                lower_order_final=lof), args=GM)
            theirs = theirs.numpy().reshape(-1, 2)
            rows.append({"steps": steps, "order": order, "p_pseudo": p_pseudo, "corrector": corrector,
                         "c_pseudo": c_pseudo, "lower_order_final": lof,
                         "max rel diff": float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", help="path to thu-ml/DPM-Solver-v3's dpm_solver_v3.py (parity run)")
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    lo, hi = lam_range()
    ems = jd.compute_ems(GM.denoiser(S), GM.sample(jax.random.key(5), 2048), jax.random.key(6),
                         np.linspace(lo, hi, 201), args=GM)
    record = {"accuracy": accuracy(ems)}
    notes = ["RMS distance to a 1000-step solution on the 2-D mixture (lower is better):", ""]
    cols = list(record["accuracy"][0])
    notes += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    notes += ["| " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |" for r in record["accuracy"]]
    jax.config.update("jax_enable_x64", False)
    record["overhead"] = overhead(3 if opts.quick else 15)
    o = record["overhead"]
    notes += ["", f"Overhead, MLP 512x4, batch 1024, 10 steps, float32: v3 {o['v3_s']:.3f} s vs DPM++3M "
              f"{o['dpmpp3m_s']:.3f} s, ratio {o['ratio']:.3f}."]
    rows = []
    if opts.reference:
        jax.config.update("jax_enable_x64", True)
        rows = parity(opts.reference, ems)
        record["parity"] = rows
        notes += ["", "Parity with the reference code (float64 on CPU), max |ours - reference| / max |reference|:"]
    md = write_results("dpm_solver_v3", record, rows, "DPM-Solver-v3", notes="\n".join(notes))
    print(md)


if __name__ == "__main__":
    main()
