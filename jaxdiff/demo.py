"""The main job: ``python -m jaxdiff.demo``.

Samples a sharp 2-D Gaussian mixture (component scales 0.3-0.5; VP-linear schedule, t from 1 to
1e-3) with an exact analytic score, using every jaxdiff solver family at NFE 5, 10 and 20 and the adaptive
DPM-Solver-23, beside diffrax (Euler, Heun, Tsit5 fixed step, Tsit5 adaptive in t and in log-SNR) on the same
probability-flow ODE. Prints a table:

- trajectory error: RMS distance to a high-accuracy reference solve of the same ODE from the same
  noise (diffrax Dopri8, rtol = atol = 1e-10);
- SW2: sliced Wasserstein-2 distance to exact mixture samples (the reference solve's own SW2
  shows the Monte-Carlo floor);
- wall time of the jitted run after compilation.

Each solver runs on three time grids (uniform in t, uniform in sqrt(t), uniform in log-SNR) and the
table shows it on the grid with the smallest geometric-mean error over the three NFEs: on a sharp
mixture the grid matters as much as the solver (the comparison is printed too).

Then the real model: the shipped digits U-Net (``jaxdiff.pretrained.digits()``) samples 50 digits
(five of each class) per solver family at NFE 10 with classifier-free guidance scale 3, and the shipped
classifier reports how many are the digit they were asked for.

Writes ``demo.png``: mixture samples per solver at NFE 10, error-vs-NFE curves, and a grid of digits per
solver. Everything is built in or shipped with the package; no downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd

NFES = (5, 10, 20)
GRIDS = ("time", "quadratic", "logsnr")
NUM_PARTICLES = 2000


def mixture() -> jd.testing.GaussianMixture:
    angles = np.linspace(0, 2 * np.pi, 7)[:-1]
    means = np.concatenate([2.5 * np.stack([np.cos(angles), np.sin(angles)], 1), [[0.0, 0.0]]])
    weights = np.array([0.1, 0.2, 0.1, 0.15, 0.1, 0.15, 0.2])
    scales = np.array([0.3, 0.35, 0.4, 0.45, 0.5, 0.3, 0.4])
    return jd.testing.GaussianMixture(jnp.asarray(weights), jnp.asarray(means), jnp.asarray(scales))


def solvers(ems: jd.EMS) -> dict[str, jd.Solver]:
    """Every jaxdiff solver family, at its usual settings (DPM-Solver-v3 with the mixture's EMS)."""
    return {
        "DDIM": jd.DDIM(),
        "DPM-Solver-2M": jd.DPMSolver(order=2),
        "DPM-Solver++ 2M": jd.DPMSolverPP(order=2),
        "DPM-Solver++ 3M": jd.DPMSolverPP(order=3),
        "UniPC-2 bh2": jd.UniPC(order=2),
        "UniPC-3 bh2": jd.UniPC(order=3),
        "DEIS-3 (rhoAB)": jd.DEIS(order=3),
        "iPNDM (PLMS)": jd.PNDM("PLMS"),
        "Heun (EDM)": jd.Heun(),
        "DPM-Solver-v3 (3, EMS)": jd.DPMSolverV3(ems),
    }


DIGIT_SOLVERS = {
    "DDIM": jd.DDIM(),
    "DPM-Solver++ 2M": jd.DPMSolverPP(order=2),
    "DPM-Solver++ 3M": jd.DPMSolverPP(order=3),
    "UniPC-3 bh2": jd.UniPC(order=3),
    "iPNDM (PLMS)": jd.PNDM("PLMS"),
    "DEIS-3 (rhoAB)": jd.DEIS(order=3),
}
DIGITS_PER_CLASS = 5


def progress(items, desc: str, enabled: bool):
    """A tqdm bar over ``items`` on stderr (the table goes to stdout)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, leave=False)


def digits_runs(key, show_progress: bool = False) -> dict:
    """Every solver family at NFE 10 on the shipped digits model (CFG 3): samples, class accuracy, time."""
    den, variables = jd.pretrained.digits()
    guided = dataclasses.replace(den, guidance=jd.CFG(3.0))
    labels = jnp.tile(jnp.arange(jd.pretrained.NUM_CLASSES), DIGITS_PER_CLASS)
    x_T = jax.random.normal(key, (labels.shape[0],) + jd.pretrained.DIGITS_SHAPE, jnp.float32)
    clf = jd.pretrained.digits_classifier()
    out = {}
    for name, solver in progress(DIGIT_SOLVERS.items(), "digits U-Net", show_progress):
        ts = jd.timesteps(den.schedule, steps_for(solver, 10), "time")
        # the guidance pair is built inside jit, so both branches share the parameters (see jd.CFG)
        run = jax.jit(lambda x, v, ts=ts, solver=solver: jd.sample(
            guided, x, ts, solver, args=jd.pretrained.digits_args(v, labels, guidance=True)))
        x, seconds = timed(lambda x: run(x, variables), x_T)
        out[name] = (np.asarray(x), float(jd.metrics.class_accuracy(clf, x, labels)), seconds, jd.nfe(solver, ts))
    return out


def steps_for(solver: jd.Solver, nfe: int) -> int:
    """The most steps whose NFE does not exceed ``nfe``."""
    return max(n for n in range(solver.min_steps(), nfe + 1) if solver.nfe(n) <= nfe)


def sliced_w2(key, a, b, num_projections: int = 256):
    """Sliced Wasserstein-2 between equal-size point clouds."""
    dirs = jax.random.normal(key, (num_projections, a.shape[1]))
    dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = jnp.sort(a @ dirs.T, axis=0), jnp.sort(b @ dirs.T, axis=0)
    return jnp.sqrt(jnp.mean((pa - pb) ** 2))


def pf_ode_field(den, gm):
    """dx/dt = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) eps_hat(x, t)."""
    s = den.schedule

    def field(t, x, args):
        alpha, sigma = s.alpha(t), s.sigma(t)
        d_alpha, d_sigma = jax.jvp(lambda u: (s.alpha(u), s.sigma(u)), (t,), (jnp.ones_like(t),))[1]
        eps = den.eps(x, t, gm)
        return d_alpha / alpha * x + (d_sigma - d_alpha * sigma / alpha) * eps

    return field


def diffrax_runs(den, gm, x_T, t0, t1):
    """diffrax peers (fixed-step Euler/Heun/Tsit5 at matching NFE; adaptive Tsit5 in t and in log-SNR) and the
    adaptive DPM-Solver-23."""
    import diffrax

    term = diffrax.ODETerm(pf_ode_field(den, gm))
    out = {}
    for name, solver, stages in (("diffrax Euler", diffrax.Euler(), 1), ("diffrax Heun", diffrax.Heun(), 2),
                                 ("diffrax Tsit5", diffrax.Tsit5(), 6)):
        for steps in sorted({max(1, nfe // stages) for nfe in NFES}):
            fn = jax.jit(lambda x, solver=solver, steps=steps: diffrax.diffeqsolve(
                term, solver, t0, t1, (t1 - t0) / steps, x, max_steps=steps + 1).ys[-1])
            out[(name, steps * stages)] = (fn, steps * stages, "time")
    for rtol in (1e-2, 1e-3):
        ctrl = diffrax.PIDController(rtol=rtol, atol=rtol)

        def adaptive(x, ctrl=ctrl):
            sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), t0, t1, -0.05, x, stepsize_controller=ctrl, max_steps=4096)
            return sol.ys[-1], sol.stats["num_steps"]

        fn = jax.jit(adaptive)
        steps = int(fn(x_T)[1])
        out[("diffrax Tsit5 adaptive", f"rtol {rtol:g}")] = (lambda x, fn=fn: fn(x)[0], 6 * steps, "adaptive")
        # the same diffrax solver on the ODE in log-SNR (jd.ode: y = x / sigma against lambda)
        fn = jax.jit(lambda x, rtol=rtol: (lambda r: (r.x, r.nfe))(jd.ode.solve(
            den, x, t0, t1, solver=diffrax.Tsit5(), rtol=rtol, atol=rtol, args=gm)))
        nfe = int(fn(x_T)[1])
        out[("diffrax Tsit5 adaptive, log-SNR", f"rtol {rtol:g}")] = (lambda x, fn=fn: fn(x)[0], nfe, "adaptive")
        # DPM-Solver-23 with the official error control (jd.sample_adaptive)
        fn = jax.jit(lambda x, rtol=rtol: jd.sample_adaptive(den, x, t0, t1, order=3, rtol=rtol, atol=rtol, args=gm))
        out[("DPM-Solver-23 adaptive", f"rtol {rtol:g}")] = (lambda x, fn=fn: fn(x)[0], int(fn(x_T)[1].nfe), "adaptive")
    return out


def reference_solve(den, gm, x_T, t0, t1):
    import diffrax

    sol = diffrax.diffeqsolve(diffrax.ODETerm(pf_ode_field(den, gm)), diffrax.Dopri8(), t0, t1, -0.01, x_T,
                              stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10), max_steps=100000)
    return sol.ys[-1]


def timed(fn, x):
    fn(x).block_until_ready()
    start = time.perf_counter()
    out = fn(x).block_until_ready()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo.png", help="figure path")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    opts = parser.parse_args(argv)
    # float64 for the mixture's reference-accuracy comparison; set here, not at import, so importing the module
    # changes nothing (the digits model samples in float32 either way)
    jax.config.update("jax_enable_x64", True)
    start_all = time.perf_counter()

    gm = mixture()
    s = jd.VPLinear()
    den = gm.denoiser(s, "epsilon")
    key = jax.random.key(0)
    x_T = jax.random.normal(key, (NUM_PARTICLES, 2))
    exact = gm.sample(jax.random.key(1), NUM_PARTICLES)
    t0, t1 = s.t_max, s.t_min
    ref = reference_solve(den, gm, x_T, t0, t1)
    sw_key = jax.random.key(2)
    floor = float(sliced_w2(sw_key, ref, exact))

    # DPM-Solver-v3's statistics, estimated once from 2048 exact data samples on 101 lambda points
    lam = np.linspace(float(s.lambda_(t0)), float(s.lambda_(t1)), 101)
    ems = jd.compute_ems(den, gm.sample(jax.random.key(3), 2048), jax.random.key(4), lam, args=gm)
    results, samples, runs = [], {}, {}
    all_solvers = solvers(ems)
    for name, solver in progress(all_solvers.items(), "mixture solvers", not opts.no_progress):
        for nfe in NFES:
            # one compile per (solver, NFE): the grid is an argument; v3 builds its rows in numpy from a constant grid
            run = jax.jit(lambda x, ts, solver=solver: jd.sample(den, x, ts, solver, args=gm))
            for grid in GRIDS:
                ts = jd.timesteps(s, steps_for(solver, nfe), grid)
                if isinstance(solver, jd.DPMSolverV3):
                    call = jax.jit(lambda x, ts=ts, solver=solver: jd.sample(den, x, ts, solver, args=gm))
                else:
                    call = lambda x, ts=ts, run=run: run(x, ts)  # noqa: E731
                x, seconds = timed(call, x_T)
                err = float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, -1))))
                runs[(name, grid, nfe)] = (x, err, seconds, jd.nfe(solver, ts))
        best = min(GRIDS, key=lambda g: sum(np.log(runs[(name, g, n)][1]) for n in NFES))
        for nfe in NFES:
            x, err, seconds, used = runs[(name, best, nfe)]
            results.append((name, best, used, err, float(sliced_w2(sw_key, x, exact)), seconds))
        samples[name] = np.asarray(runs[(name, best, 10)][0])
    for (name, nfe), (fn, used, grid) in diffrax_runs(den, gm, x_T, t0, t1).items():
        x, seconds = timed(fn, x_T)
        err = float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, -1))))
        results.append((name, grid, used, err, float(sliced_w2(sw_key, x, exact)), seconds))
        if nfe == 10 or nfe == "rtol 0.001":
            samples[f"{name} ({used} NFE)"] = np.asarray(x)

    print(f"Sharp 2-D mixture, VP-linear, t {t0:g} -> {t1:g}, {NUM_PARTICLES} particles. "
          f"Reference: diffrax Dopri8 rtol 1e-10; its SW2 to exact samples (Monte-Carlo floor) = {floor:.3f}.\n")
    header = f"{'solver':26s} {'grid':10s} {'NFE':>4s} {'traj RMS err':>12s} {'SW2':>7s} {'time ms':>8s}"
    print(header + "\n" + "-" * len(header))
    for name, grid, nfe, err, sw, seconds in results:
        print(f"{name:26s} {grid:10s} {nfe:4d} {err:12.2e} {sw:7.3f} {seconds * 1e3:8.2f}")
    print("\nGrid comparison (trajectory RMS error at NFE 5 / 10 / 20):")
    for name in all_solvers:
        cells = "   ".join(f"{g}: " + "/".join(f"{runs[(name, g, n)][1]:.1e}" for n in NFES) for g in GRIDS)
        print(f"  {name:24s} {cells}")

    mixture_seconds = time.perf_counter() - start_all
    digits = digits_runs(jax.random.key(5), not opts.no_progress)
    print(f"\nShipped digits U-Net, CFG scale 3, {DIGITS_PER_CLASS} samples per class, time-uniform grid; accuracy by "
          "the shipped classifier (trained on real digits):")
    for name, (_, acc, seconds, used) in digits.items():
        print(f"  {name:20s} NFE {used:3d}   accuracy {acc:6.1%}   {seconds * 1e3:8.1f} ms")
    if not opts.no_figure:
        figure(results, samples, exact, digits, opts.out)
        print(f"\nWrote {opts.out}")
    print(f"Total demo time: {time.perf_counter() - start_all:.1f} s (mixture {mixture_seconds:.1f} s)")


def figure(results, samples, exact, digits, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    cols = 4
    rows = -(-(len(names) + 2) // cols)
    fig = plt.figure(figsize=(4 * cols, 4 * rows + 0.8 * len(digits)))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[4] * rows + [0.8 * len(digits)])
    axes = [fig.add_subplot(grid[r, c]) for r in range(rows) for c in range(cols)]
    axes[0].scatter(*np.asarray(exact).T, s=1, c="k")
    axes[0].set_title("exact mixture samples")
    for ax, name in zip(axes[1:], names):
        ax.scatter(*samples[name].T, s=1)
        ax.set_title(f"{name} (NFE 10)" if "NFE" not in name else name, fontsize=9)
    for ax in axes[: len(names) + 1]:
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
    ax = axes[len(names) + 1]
    by_name = {}
    for name, _, nfe, err, _, _ in results:
        if "adaptive" not in name:
            by_name.setdefault(name, []).append((nfe, err))
    for name, pts in by_name.items():
        pts.sort()
        ax.loglog(*zip(*pts), "o-" if "diffrax" not in name else "s--", label=name, ms=3)
    ax.set_xlabel("NFE")
    ax.set_ylabel("trajectory RMS error")
    ax.legend(fontsize=6)
    ax.set_title("error vs NFE")
    for ax in axes[len(names) + 2:]:
        ax.axis("off")
    # the digits: one row of 2 x 10 samples (two of each class) per solver
    rows_of_digits = [np.concatenate(list(x[: 2 * jd.pretrained.NUM_CLASSES, :, :, 0]), axis=1) for x, *_ in
                      digits.values()]
    ax = fig.add_subplot(grid[rows, :])
    ax.imshow(np.concatenate(rows_of_digits, axis=0), cmap="gray_r", vmin=-1, vmax=1)
    ax.set_yticks(4 + 8 * np.arange(len(digits)))
    ax.set_yticklabels([f"{name} (NFE {used}, acc. {acc:.0%})" for name, (_, acc, _, used) in digits.items()],
                       fontsize=8)
    ax.set_xticks([])
    ax.set_title("shipped digits U-Net, CFG 3, NFE 10: two samples of each class per solver", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
