"""Quality versus NFE on a learned model: every solver family x time grid, with and without CFG.

Model: the shipped digits U-Net (``jd.pretrained.digits()``), class-conditional, N samples with balanced
labels from one fixed x_T, sampled from t_max (the table's last entry) to t_min (its first) at
NFE 3, 4, 5, 6, 8, 10, 15, 20 on four grids (uniform in t, in sqrt t, in log-SNR, Karras rho = 7) at
classifier-free guidance scales 1 (the plain conditional model), 2 and 5. Two measures:

- solver error: RMS (over pixels and the first 64 samples) distance to the reference solve of the same
  guided ODE from the same x_T (``jd.metrics.reference_solve``: Dopri8 in log-SNR, rtol = atol = 1e-5, which is 1.2e-5 from
  the rtol = 1e-6 solve on this model; the discrete table's piecewise-linear log alpha makes the ODE only
  piecewise smooth, so the adaptive solve takes ~2400 model calls, and even UniPC-3 at 200 steps is 3e-4 off);
- Frechet distance in the shipped classifier's features against the held-out "test" split, next to the
  floor at the same n (a random "train" subset of N real images against the same test split).

DPM-Solver-v3 uses EMS computed on this model (``jd.compute_ems`` from 256 training images and their
labels, per guidance scale, on 61 log-SNR points). Every run is one jitted program per (solver, steps),
compiled once for all grids and scales (the denoiser, with its guidance scale, is an argument); v3 compiles
per grid, as its coefficient rows are built in NumPy from a constant grid.

    python -m benchmarks.digits_quality [--samples 600] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import write_results

jax.config.update("jax_enable_x64", True)

NFES = (3, 4, 5, 6, 8, 10, 15, 20)
GRIDS = ("time", "quadratic", "logsnr", "karras")
SCALES = (1.0, 2.0, 5.0)
ERROR_SAMPLES = 64  # the solver error is an average: 64 samples pin it; the FD uses all of them


def solvers(ems=None) -> dict[str, jd.Solver]:
    out = {
        "DDIM": jd.DDIM(),
        "DPM-Solver++ 2M": jd.DPMSolverPP(order=2),
        "DPM-Solver++ 3M": jd.DPMSolverPP(order=3),
        "DPM-Solver++ 3M (diffusers form)": jd.DPMSolverPP(order=3, third_order="reference"),
        "UniPC-2 bh2": jd.UniPC(order=2, variant="bh2"),
        "UniPC-3 bh1": jd.UniPC(order=3, variant="bh1"),
        "UniPC-3 bh2": jd.UniPC(order=3, variant="bh2"),
        "iPNDM": jd.PNDM("PLMS"),
        "DEIS-3": jd.DEIS(order=3),
    }
    if ems is not None:
        out["DPM-Solver-v3"] = jd.DPMSolverV3(ems)
    return out


def steps_for(solver: jd.Solver, nfe: int) -> int | None:
    fits = [n for n in range(solver.min_steps(), nfe + 1) if solver.nfe(n) <= nfe]
    return max(fits) if fits else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="NFE 5 and 10, scale 1 only, no v3")
    parser.add_argument("--name", default="digits_quality")
    opts = parser.parse_args(argv)
    nfes, scales = ((5, 10), (1.0,)) if opts.quick else (NFES, SCALES)
    start_all = time.perf_counter()

    den0, variables = jd.pretrained.digits()
    s = den0.schedule
    t_max, t_min = float(s.t_max), float(s.t_min)
    n = opts.samples
    labels = jnp.arange(n) % jd.pretrained.NUM_CLASSES
    x_T = jax.random.normal(jax.random.key(0), (n, 8, 8, 1), jnp.float64)
    clf = jd.pretrained.digits_classifier()
    test_x, _ = jd.pretrained.digits_data("test")
    train_x, train_y = jd.pretrained.digits_data("train")
    test_feats = np.asarray(clf.features(test_x))
    feats = jax.jit(clf.features)
    subset = np.random.default_rng(0).choice(train_x.shape[0], n, replace=False)
    floor = jd.metrics.frechet_distance(np.asarray(feats(train_x[subset])), test_feats)
    print(f"FD floor (train subset of {n} vs test): {floor:.3f}", flush=True)

    lam = np.linspace(float(s.lambda_(t_max)), float(s.lambda_(t_min)), 61)
    ems_idx = np.random.default_rng(1).choice(train_x.shape[0], 256, replace=False)
    records, rows, compiled = [], [], {}

    def guided(v):  # built inside jit, so the (cond, uncond) pair shares the parameters (see jd.CFG)
        return jd.pretrained.digits_args(v, labels, guidance=True)

    for scale in scales:
        den = dataclasses.replace(den0, guidance=jd.CFG(jnp.asarray(scale)))
        args = jd.pretrained.digits_args(variables, labels[:ERROR_SAMPLES], guidance=True)
        ref = jd.metrics.reference_solve(den, x_T[:ERROR_SAMPLES], t_max, t_min, args=args, rtol=1e-5, atol=1e-5)
        print(f"scale {scale}: reference solve with {int(ref.nfe)} model calls", flush=True)
        ems = None
        if not opts.quick:
            ems_args = jd.pretrained.digits_args(variables, jnp.asarray(train_y[ems_idx]), guidance=True)
            ems = jd.compute_ems(den, jnp.asarray(train_x[ems_idx], jnp.float64), jax.random.key(2), lam,
                                 args=ems_args, batch_size=256)
        for name, solver in solvers(ems).items():
            for nfe in nfes:
                steps = steps_for(solver, nfe)
                if steps is None:
                    continue
                run = compiled.setdefault((name, steps), jax.jit(
                    lambda d, x, ts, v, solver=solver: jd.sample(d, x, ts, solver, args=guided(v))))
                for grid in GRIDS:
                    ts = jd.timesteps(s, steps, grid)
                    if isinstance(solver, jd.DPMSolverV3):  # v3 builds its rows in NumPy: the grid is a constant
                        x = jax.jit(lambda d, x, v, ts=ts, solver=solver: jd.sample(d, x, ts, solver, args=guided(v)))(
                            den, x_T, variables)
                    else:
                        x = run(den, x_T, ts, variables)
                    err = float(jd.metrics.solver_error(x[:ERROR_SAMPLES], ref.x))
                    fd = jd.metrics.frechet_distance(np.asarray(feats(x.astype(jnp.float32))), test_feats)
                    acc = float(jd.metrics.class_accuracy(clf, x.astype(jnp.float32), labels))
                    records.append(dict(scale=scale, solver=name, grid=grid, nfe=jd.nfe(solver, ts), steps=steps,
                                        error=err, fd=fd, accuracy=acc))
                print(f"scale {scale} {name} NFE {nfe}: " + ", ".join(
                    f"{r['grid']} {r['error']:.2e}/{r['fd']:.2f}" for r in records[-len(GRIDS):]), flush=True)

    # one row per (scale, solver, grid); the markdown tables are built from the records
    by_key = {}
    for r in records:
        by_key.setdefault((r["scale"], r["solver"], r["grid"]), {})[r["nfe"]] = r
    for (scale, name, grid), per_nfe in by_key.items():
        row = {"CFG": scale, "solver": name, "grid": grid}
        row |= {f"err@{k}": per_nfe[k]["error"] for k in sorted(per_nfe)}
        row |= {f"FD@{k}": per_nfe[k]["fd"] for k in sorted(per_nfe)}
        rows.append(row)
    best = best_grids(records)
    notes = (f"{n} samples (labels balanced), x_T fixed; FD floor (train subset of {n} vs the {test_x.shape[0]} test "
             f"images) = {floor:.3f}. Error = RMS distance to the Dopri8 reference solve (rtol 1e-5) at t_min. "
             f"Total time {time.perf_counter() - start_all:.0f} s.\n\nBest grid per solver (geometric-mean error over "
             "NFE and scales): " + ", ".join(f"{k}: {v}" for k, v in best.items()))
    md = write_results(opts.name, {"samples": n, "fd_floor": floor, "records": records, "best_grid": best}, rows,
                       "Digits U-Net: solver error and Frechet distance vs NFE, per grid and CFG scale", notes=notes)
    print(md)


def best_grids(records) -> dict:
    """Per solver, the grid with the smallest geometric-mean solver error over all NFEs and scales."""
    out = {}
    for name in dict.fromkeys(r["solver"] for r in records):
        score = {g: np.mean([np.log(r["error"]) for r in records if r["solver"] == name and r["grid"] == g])
                 for g in GRIDS}
        out[name] = min(score, key=score.get)
    return out


if __name__ == "__main__":
    main()
