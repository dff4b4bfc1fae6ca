"""Quality versus NFE on a learned model: every solver family x time grid, with and without CFG.

Model: the shipped digits U-Net (``jd.pretrained.digits()``), class-conditional, balanced labels, one fixed
x_T, sampled from t_max (the table's last entry) to t_min (its first) on four grids (uniform in t, in sqrt t,
in log-SNR, Karras rho = 7). Two sweeps:

- solver error at NFE 3, 4, 5, 6, 8, 10, 15, 20 without guidance (the plain conditional model) and with
  classifier-free guidance scales 2 and 5: RMS (over pixels and 64 samples) distance to the reference solve of
  the same (guided) ODE from 16 x_T (``jd.metrics.reference_solve``: Dopri8 in log-SNR, rtol = atol = 1e-5, which is 1.2e-5 from
  the rtol = 1e-6 solve on this model; the discrete table's piecewise-linear log alpha makes the ODE only
  piecewise smooth, so the adaptive solve takes ~2300 model calls, and even UniPC-3 at 200 steps is 3e-4 off);
- sample quality at NFE 5 and 10 without guidance: Frechet distance in the shipped classifier's features of
  ``--samples`` samples against the held-out "test" split, next to the floor at the same n (a random "train"
  subset of n real images against the same test split), and the class accuracy.

DPM-Solver-v3 uses EMS computed on this model (``jd.compute_ems`` from 256 training images and their
labels, per guidance scale, on 61 log-SNR points). Every run is one jitted program per (solver, steps, batch),
compiled once for all grids and scales (the denoiser, with its guidance scale, is an argument); v3 compiles
per grid, as its coefficient rows are built in NumPy from a constant grid.

    python -m benchmarks.digits_quality [--samples 300] [--quick]
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
FD_NFES = (5, 10)
GRIDS = ("time", "quadratic", "logsnr", "karras")
SCALES = (1.0, 2.0, 5.0)  # 1: the conditional model without guidance
ERROR_SAMPLES = 16  # the solver error is an average over samples and pixels (1024 numbers): enough to rank


def solvers(ems=None) -> dict[str, jd.Solver]:
    out = {
        "DDIM": jd.DDIM(),
        "DPM-Solver++ 2M": jd.DPMSolverPP(order=2),
        "DPM-Solver++ 3M": jd.DPMSolverPP(order=3),
        "DPM-Solver++ 3M (diffusers form)": jd.DPMSolverPP(order=3, third_order="reference"),
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
    parser.add_argument("--samples", type=int, default=300, help="samples for the Frechet distance")
    parser.add_argument("--quick", action="store_true",
                        help="NFE 5 and 10, scale 1 only, 64 FD samples, reference at rtol 1e-3, EMS on 64 images")
    parser.add_argument("--solvers", nargs="+", help="only these solvers (names as in the table)")
    parser.add_argument("--name", default="digits_quality")
    opts = parser.parse_args(argv)
    nfes, scales = ((5, 10), (1.0,)) if opts.quick else (NFES, SCALES)
    n = 64 if opts.quick else opts.samples
    ref_tol = 1e-3 if opts.quick else 1e-5
    start_all = time.perf_counter()

    den0, variables = jd.pretrained.digits()
    s = den0.schedule
    t_max, t_min = float(s.t_max), float(s.t_min)
    clf = jd.pretrained.digits_classifier()
    feats = jax.jit(clf.features)
    test_x, _ = jd.pretrained.digits_data("test")
    train_x, train_y = jd.pretrained.digits_data("train")
    test_feats = np.asarray(feats(test_x))
    subset = np.random.default_rng(0).choice(train_x.shape[0], n, replace=False)
    floor = jd.metrics.frechet_distance(np.asarray(feats(train_x[subset])), test_feats)
    print(f"FD floor (train subset of {n} vs test): {floor:.3f}", flush=True)
    lam = np.linspace(float(s.lambda_(t_max)), float(s.lambda_(t_min)), 61)
    ems_idx = np.random.default_rng(1).choice(train_x.shape[0], 64 if opts.quick else 256, replace=False)
    compiled = {}

    def run(solver, den, x_T, ts, labels):
        """One sampling run; the guidance pair is built inside jit, so both branches share the parameters."""
        guided = den.guidance is not None
        if isinstance(solver, jd.DPMSolverV3):  # v3 builds its rows in NumPy: the grid is a constant
            # and the schedule too, so the denoiser is closed over rather than passed
            fn = jax.jit(lambda x, v, y: jd.sample(den, x, ts, solver, args=jd.pretrained.digits_args(v, y, guidance=guided)))
            return fn(x_T, variables, labels)
        fn = compiled.setdefault((solver, ts.shape[0], x_T.shape[0], guided), jax.jit(
            lambda d, x, ts, v, y: jd.sample(d, x, ts, solver, args=jd.pretrained.digits_args(v, y, guidance=guided))))
        return fn(den, x_T, ts, variables, labels)

    def ems_for(den):
        args = jd.pretrained.digits_args(variables, jnp.asarray(train_y[ems_idx]), guidance=den.guidance is not None)
        return jd.compute_ems(den, jnp.asarray(train_x[ems_idx], jnp.float64), jax.random.key(2), lam, args=args,
                              batch_size=ems_idx.shape[0])

    def chosen(den):
        return {k: v for k, v in solvers(ems_for(den)).items() if not opts.solvers or k in opts.solvers}

    # sweep 1: solver error against the reference solve, 64 samples, every NFE, CFG 1 and 3
    labels = jnp.arange(ERROR_SAMPLES) % jd.pretrained.NUM_CLASSES
    x_T = jax.random.normal(jax.random.key(0), (ERROR_SAMPLES, 8, 8, 1), jnp.float64)
    errors = []
    for scale in scales:  # scale 1 through jd.CFG too: one compile per (solver, steps) serves every scale
        den = dataclasses.replace(den0, guidance=jd.CFG(jnp.asarray(scale)))
        start = time.perf_counter()
        ref = jd.metrics.reference_solve(den, x_T, t_max, t_min, args=jd.pretrained.digits_args(
            variables, labels, guidance=True), rtol=ref_tol, atol=ref_tol)
        print(f"scale {scale}: reference solve with {int(ref.nfe)} model calls in {time.perf_counter() - start:.0f} s",
              flush=True)
        for name, solver in chosen(den).items():
            for nfe in nfes:
                steps = steps_for(solver, nfe)
                if steps is None:
                    continue
                for grid in GRIDS:
                    ts = jd.timesteps(s, steps, grid)
                    x = run(solver, den, x_T, ts, labels)
                    errors.append(dict(scale=scale, solver=name, grid=grid, nfe=jd.nfe(solver, ts), steps=steps,
                                       error=float(jd.metrics.solver_error(x, ref.x))))
                print(f"scale {scale} {name} NFE {nfe}: " + ", ".join(
                    f"{r['grid']} {r['error']:.2e}" for r in errors[-len(GRIDS):]), flush=True)
        write_results(opts.name, {"errors": errors, "partial": True}, error_rows(errors),  # kept if a later part fails
                      "Digits U-Net: solver error (partial run)")

    # sweep 2: Frechet distance and accuracy of n samples without guidance at FD_NFES
    labels = jnp.arange(n) % jd.pretrained.NUM_CLASSES
    x_T = jax.random.normal(jax.random.key(3), (n, 8, 8, 1), jnp.float64)
    quality = []
    for name, solver in chosen(den0).items():
        for nfe in FD_NFES:
            steps = steps_for(solver, nfe)
            for grid in GRIDS:
                ts = jd.timesteps(s, steps, grid)
                x = run(solver, den0, x_T, ts, labels).astype(jnp.float32)
                quality.append(dict(solver=name, grid=grid, nfe=jd.nfe(solver, ts),
                                    fd=jd.metrics.frechet_distance(np.asarray(feats(x)), test_feats),
                                    accuracy=float(jd.metrics.class_accuracy(clf, x, labels))))
            print(f"FD {name} NFE {nfe}: " + ", ".join(f"{r['grid']} {r['fd']:.2f}" for r in quality[-len(GRIDS):]),
                  flush=True)

    rows = error_rows(errors) + quality_rows(quality)
    best = best_grids(errors)
    mean_fd = {g: float(np.mean([r["fd"] for r in quality if r["grid"] == g])) for g in GRIDS}
    notes = (f"Solver error: RMS distance over {ERROR_SAMPLES} samples to the Dopri8 reference solve (rtol {ref_tol:g}) at "
             f"t_min, CFG scales {', '.join(f'{c:g}' for c in scales)}. FD: {n} samples without guidance (labels "
             f"balanced) against the {test_x.shape[0]} test images; floor (train subset of {n} vs test) = "
             f"{floor:.3f}. Total time {time.perf_counter() - start_all:.0f} s.\n\n"
             "Best grid per solver (geometric-mean error over NFE and scales): "
             + ", ".join(f"{k}: {v}" for k, v in best.items())
             + ".\n\nMean FD over solvers and NFE " + "/".join(map(str, FD_NFES)) + ": "
             + ", ".join(f"{g} {v:.2f}" for g, v in mean_fd.items()) + ".")
    md = write_results(opts.name, {"fd_samples": n, "fd_floor": floor, "errors": errors, "quality": quality,
                                   "best_grid": best, "mean_fd_by_grid": mean_fd}, rows,
                       "Digits U-Net: solver error vs NFE per grid and CFG scale; Frechet distance at NFE 5 and 10",
                       notes=notes)
    print(md)


def error_rows(errors) -> list[dict]:
    """One row per (scale, solver, grid): the error at each NFE."""
    by_key = {}
    for r in errors:
        by_key.setdefault((r["scale"], r["solver"], r["grid"]), {})[r["nfe"]] = f"{r['error']:.2e}"
    return [{"measure": f"error, CFG {scale:g}", "solver": name, "grid": grid} | {f"@{k}": v for k, v in sorted(per.items())}
            for (scale, name, grid), per in by_key.items()]


def quality_rows(quality) -> list[dict]:
    """One row per (solver, grid): FD (accuracy) at each NFE, in the error rows' NFE columns where they exist."""
    by_key = {}
    for r in quality:
        by_key.setdefault((r["solver"], r["grid"]), {})[r["nfe"]] = f"{r['fd']:.2f} ({r['accuracy']:.0%})"
    return [{"measure": "FD (accuracy), CFG 1", "solver": name, "grid": grid} | {f"@{k}": v for k, v in sorted(per.items())}
            for (name, grid), per in by_key.items()]


def best_grids(errors) -> dict:
    """Per solver, the grid with the smallest geometric-mean solver error over all NFEs and scales."""
    out = {}
    for name in dict.fromkeys(r["solver"] for r in errors):
        score = {g: np.mean([np.log(r["error"]) for r in errors if r["solver"] == name and r["grid"] == g])
                 for g in GRIDS}
        out[name] = min(score, key=score.get)
    return out


if __name__ == "__main__":
    main()
