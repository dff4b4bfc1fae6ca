"""Statistical parity of optim.cbo with CBXpy (cbx) on a success-rate grid, side by side.

Grid: Rastrigin and Ackley with minimizer x* = 0, N in {20, 50, 100}, anisotropic (sigma = 10.1)
and isotropic (sigma = 0.3) Euler-Maruyama noise, lambda = 1, dt = 0.01, alpha_0 = 30 x1.05 per
step up to 1e5, x0 ~ U(-3, 3)^d. The reference notes' grid is d = 20 with 3000 steps
(``--d 20 --steps 3000``, about 1.5 h of cbx time on a loaded 2-core CPU); the default d = 10 with
1500 steps keeps the same structure, has more cells away from rates 0 and 1, and runs in ~20 min;
success when the final consensus is within 0.25 (sup-norm) of x*. Both implementations start
from the same initial ensembles; their noise streams differ, so rates agree only statistically:
the target is |rate_jax - rate_cbx| <= 0.1 with 100 runs per cell (binomial standard error of a
difference ~0.07 at rate 0.5, 0 at rates 0 or 1).

    python -m benchmarks.cbo_parity [--quick] [--runs 100] [--d 10] [--steps 1500]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from benchmarks.cbo_speed import initial_ensembles, make_jax_runner, run_cbx, successes, write_files

GRID = [(fn, noise, sigma, n) for fn in ("rastrigin", "ackley")
        for noise, sigma in (("anisotropic", 10.1), ("isotropic", 0.3)) for n in (20, 50, 100)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 runs, N in {20, 50}")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--d", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    runs = args.runs or (30 if args.quick else 100)
    base = dict(d=args.d, steps=args.steps, lambda_=1.0, dt=0.01, alpha=30.0, alpha_growth=1.05, alpha_max=1e5,
                box=3.0, tol=0.25, runs=runs)
    grid = [g for g in GRID if not (args.quick and g[3] == 100)]

    import jax

    cells = []
    for k, (fn, noise, sigma, n) in enumerate(grid):
        cfg = dict(base, sigma=sigma, n=n)
        x0 = initial_ensembles(runs, n, cfg["d"], cfg["box"], seed=k)
        t = time.perf_counter()
        jax_rate = successes(make_jax_runner(fn, 0.0, cfg, noise)(x0, k), 0.0, cfg["tol"]) / runs
        t_jax = time.perf_counter() - t
        t = time.perf_counter()
        cbx_rate = successes(run_cbx(fn, 0.0, cfg, noise, x0, seed=k), 0.0, cfg["tol"]) / runs
        t_cbx = time.perf_counter() - t
        cell = dict(function=fn, noise=noise, sigma=sigma, n=n, jax_rate=jax_rate, cbx_rate=cbx_rate,
                    diff=jax_rate - cbx_rate, within_0_1=abs(jax_rate - cbx_rate) <= 0.1 + 1e-12,
                    jax_s_incl_compile=t_jax, cbx_s=t_cbx)
        cells.append(cell)
        print(cell, flush=True)
        report(base, runs, cells, jax.__version__, done=len(cells) == len(grid))


def report(base, runs, cells, jax_version, done):
    """Writes the record after every cell, so a long run leaves its finished cells behind."""
    out = dict(config=base, cells=cells, all_within_0_1=all(c["within_0_1"] for c in cells),
               max_abs_diff=max(abs(c["diff"]) for c in cells),
               complete=done, machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax_version),
               load_average_at_end=os.getloadavg())
    lines = ["# cbo_parity", "",
             f"Success rates of optim.cbo (jax, threefry2x32, float32) and cbx 1.0.4 (float64), {runs} runs per "
             f"cell, d={base['d']}, {base['steps']} steps, dt={base['dt']}, alpha 30 x1.05 <= 1e5, x*=0, "
             "same initial ensembles.", "",
             "| function | noise | sigma | N | jax | cbx | diff | within 0.1 |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['function']} | {c['noise']} | {c['sigma']} | {c['n']} | {c['jax_rate']:.2f} | "
                     f"{c['cbx_rate']:.2f} | {c['diff']:+.2f} | {'yes' if c['within_0_1'] else 'NO'} |")
    lines += ["", f"All {len(cells)} cells within 0.1: {out['all_within_0_1']} (max |diff| {out['max_abs_diff']:.2f})"
              + ("." if done else "; run still in progress when written.")]
    write_files(out, "cbo_parity", lines)


if __name__ == "__main__":
    main()
