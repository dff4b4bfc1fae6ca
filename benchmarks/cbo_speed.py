"""CBO speed and the CBXpy anchor: optim.cbo (jit + vmap over runs) against cbx, side by side.

The anchor (CBXpy's success-evaluation notebook): Rastrigin (A = 10, sum form), d = 20, N = 40,
100 runs, x0 ~ U(-3, 3)^d, anisotropic Euler-Maruyama, sigma = 10.1, lambda = 1, dt = 0.01,
alpha_0 = 30 x1.05 per step up to 1e5, 5000 steps; success when the final consensus is within
0.25 (sup-norm) of the minimizer x* = 0 (and x* = 1).

Timings are wall-clock medians over repeats after compilation; compile time is reported
separately. Repeats interleave the peers so they see the same machine load. The anchor compares
threefry2x32 in float32 and float64 (cbx computes in float64) with cbx; a smaller problem (20 runs x
1000 steps) compares the PRNG implementations threefry2x32, rbg and unsafe_rbg. ``--successes-only``
records the anchor's success counts for x* = 0 and 1 with both time-stepping schemes.

    python -m benchmarks.cbo_speed [--quick] [--repeats 3] [--successes-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ANCHOR = dict(d=20, n=40, runs=100, steps=5000, sigma=10.1, lambda_=1.0, dt=0.01, alpha=30.0, alpha_growth=1.05,
              alpha_max=1e5, box=3.0, tol=0.25)


def initial_ensembles(runs, n, d, box, seed=0):
    return np.random.default_rng(seed).uniform(-box, box, size=(runs, n, d))


def jax_objective(name, shift):
    import jax.numpy as jnp

    if name == "rastrigin":
        def f(x):
            y = x - shift
            return 10.0 * y.size + jnp.sum(y**2 - 10.0 * jnp.cos(2 * jnp.pi * y))
    else:
        def f(x):
            y = x - shift
            return (-20.0 * jnp.exp(-0.2 * jnp.sqrt(jnp.mean(y**2))) - jnp.exp(jnp.mean(jnp.cos(2 * jnp.pi * y)))
                    + 20.0 + jnp.e)
    return f


def cbx_objective(name, shift):
    from cbx.objectives import Ackley, Rastrigin

    return Rastrigin(b=shift) if name == "rastrigin" else Ackley(minimum=shift)


def make_jax_runner(name, shift, cfg, noise, dtype="float32", impl="threefry2x32", scheme="euler_maruyama"):
    """Returns run(x0, seed) -> final consensus (runs, d) as NumPy; jitted once per config."""
    import jax
    import jax.numpy as jnp

    import optim

    f = jax_objective(name, shift)
    tx = optim.cbo(noise=noise, sigma=cfg["sigma"], lambda_=cfg["lambda_"], dt=cfg["dt"], alpha=cfg["alpha"],
                   alpha_growth=cfg["alpha_growth"], alpha_max=cfg["alpha_max"], scheme=scheme)
    steps = cfg["steps"]

    @jax.jit
    def batched(x0, keys):
        return jax.vmap(lambda x, k: optim.cbo_minimize(f, x, k, tx, num_steps=steps).consensus)(x0, keys)

    def run(x0, seed):
        keys = jax.vmap(lambda s: jax.random.key(s, impl=impl))(jnp.arange(x0.shape[0]) + 1000 * seed)
        return np.asarray(jax.block_until_ready(batched(jnp.asarray(x0, dtype), keys)))

    return run


def run_cbx(name, shift, cfg, noise, x0, seed):
    """cbx CBO on all runs at once (its M axis), f evaluated on (M, N, d) arrays; returns (runs, d)."""
    from cbx.dynamics import CBO

    dyn = CBO(cbx_objective(name, shift), f_dim="3D", x=np.array(x0), noise=noise, sigma=cfg["sigma"],
              lamda=cfg["lambda_"], dt=cfg["dt"], alpha=cfg["alpha"], max_it=cfg["steps"], verbosity=0, seed=seed)
    from cbx.scheduler import multiply, scheduler

    dyn.optimize(sched=scheduler([multiply(name="alpha", factor=cfg["alpha_growth"], maximum=cfg["alpha_max"])]))
    return np.asarray(dyn.consensus)[:, 0, :]


def successes(consensus, shift, tol):
    return int(np.sum(np.max(np.abs(consensus - shift), axis=1) < tol))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 runs x 2000 steps, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-cbx", action="store_true", help="skip the cbx peer")
    parser.add_argument("--successes-only", action="store_true",
                        help="only the anchor's success counts (x* = 0 and 1, both schemes), no timing")
    args = parser.parse_args(argv)
    cfg = dict(ANCHOR)
    if args.quick:
        cfg.update(runs=20, steps=2000)
    repeats = args.repeats or (2 if args.quick else 3)

    import jax

    jax.config.update("jax_enable_x64", True)  # for the float64 peer; the float32 peers pass float32 data
    x0 = initial_ensembles(cfg["runs"], cfg["n"], cfg["d"], cfg["box"])
    if args.successes_only:
        return anchor_successes(cfg, x0)
    anchor = compare(cfg, x0, repeats, {"jax threefry2x32 f32": dict(impl="threefry2x32", dtype="float32"),
                                        "jax threefry2x32 f64": dict(impl="threefry2x32", dtype="float64")},
                     with_cbx=not args.no_cbx)
    # PRNG implementations on a smaller problem (20 runs x 1000 steps): the noise draw is the bottleneck
    small = dict(cfg, runs=20, steps=1000)
    prng = compare(small, x0[:20], repeats, {f"jax {impl} f32": dict(impl=impl, dtype="float32")
                                             for impl in ("threefry2x32", "rbg", "unsafe_rbg")}, with_cbx=False)
    # the anchor with the minimizer shifted to x* = 1, and with the exact-drift scheme (success only)
    shifted = successes(make_jax_runner("rastrigin", 1.0, cfg, "anisotropic")(x0 + 1.0, 7), 1.0, cfg["tol"])
    exact = successes(make_jax_runner("rastrigin", 0.0, cfg, "anisotropic", scheme="exact_drift")(x0, 8), 0.0,
                      cfg["tol"])
    out = dict(config=cfg, repeats=repeats, machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                                          jax=jax.__version__, device=str(jax.devices()[0])),
               load_average_at_end=os.getloadavg(), peers=anchor, prng_config=small, prng_peers=prng,
               jax_shifted_anchor_successes=shifted, jax_exact_drift_anchor_successes=exact)
    write_files(out, "cbo_speed", table(out))
    return out


def compare(cfg, x0, repeats, peers, with_cbx):
    """Interleaved repeats of the JAX peers (and cbx); medians, compile times and speedups."""
    runners, record = {}, {}
    for label, spec in peers.items():
        runners[label] = make_jax_runner("rastrigin", 0.0, cfg, "anisotropic", **spec)
        c, first = timed(lambda: runners[label](x0, 0))
        record[label] = dict(first_call_s=first, times_s=[], successes=[successes(c, 0.0, cfg["tol"])], **spec)
        print(f"{label}: first call (compile + run) {first:.2f} s, successes {record[label]['successes'][0]}",
              flush=True)
    if with_cbx:
        record["cbx"] = dict(first_call_s=None, times_s=[], successes=[])
    for r in range(repeats):
        for label in record:
            if label == "cbx":
                c, t = timed(lambda: run_cbx("rastrigin", 0.0, cfg, "anisotropic", x0, seed=r))
            else:
                c, t = timed(lambda: runners[label](x0, r + 1))
            record[label]["successes"].append(successes(c, 0.0, cfg["tol"]))
            record[label]["times_s"].append(t)
            print(f"repeat {r}: {label} {t:.2f} s, successes {record[label]['successes'][-1]}/{cfg['runs']}",
                  flush=True)
    for rec in record.values():
        rec["median_s"] = statistics.median(rec["times_s"])
        if rec["first_call_s"] is not None:
            rec["compile_s"] = rec["first_call_s"] - rec["median_s"]
    if with_cbx:
        for rec in record.values():
            rec["speedup_vs_cbx"] = record["cbx"]["median_s"] / rec["median_s"]
    return record


def anchor_successes(cfg, x0):
    """Success counts of the anchor for x* in {0, 1} and both schemes (jax threefry2x32 float32)."""
    rows = []
    for scheme in ("euler_maruyama", "exact_drift"):
        for shift in (0.0, 1.0):
            c = make_jax_runner("rastrigin", shift, cfg, "anisotropic", scheme=scheme)(x0 + shift, 11)
            rows.append(dict(scheme=scheme, shift=shift, successes=successes(c, shift, cfg["tol"]), runs=cfg["runs"]))
            print(rows[-1], flush=True)
    lines = ["# cbo_anchor_successes", "",
             f"CBXpy anchor, optim.cbo (threefry2x32, float32): Rastrigin d={cfg['d']}, N={cfg['n']}, "
             f"{cfg['runs']} runs, {cfg['steps']} steps, anisotropic, sigma={cfg['sigma']}, dt={cfg['dt']}, alpha "
             f"{cfg['alpha']} x{cfg['alpha_growth']} <= {cfg['alpha_max']:g}; success = final consensus within "
             f"{cfg['tol']} (sup-norm) of x*.", "", "| scheme | x* | successes |", "|---|---|---|"]
    lines += [f"| {r['scheme']} | {r['shift']:g} | {r['successes']}/{r['runs']} |" for r in rows]
    out = dict(config=cfg, rows=rows)
    write_files(out, "cbo_anchor_successes", lines)
    return out


def write_files(out, name, lines):
    """benchmarks/results/<name>.json (the record) and <name>.md (the table), and print the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(out):
    cfg = out["config"]
    lines = ["# cbo_speed", "",
             f"Rastrigin d={cfg['d']}, N={cfg['n']}, {cfg['runs']} runs, {cfg['steps']} steps, anisotropic EM, "
             f"sigma={cfg['sigma']}, dt={cfg['dt']}, alpha {cfg['alpha']} x{cfg['alpha_growth']} <= "
             f"{cfg['alpha_max']:g}; {out['repeats']} interleaved repeats on {out['machine']['device']} "
             f"({out['machine']['cpus']} CPUs, load average at end {out['load_average_at_end'][0]:.1f}).", "",
             "| peer | median wall (s) | compile (s) | speedup vs cbx | successes per repeat |",
             "|---|---|---|---|---|"]
    for label, rec in out["peers"].items():
        comp = f"{rec['compile_s']:.2f}" if rec.get("compile_s") is not None else "-"
        speed = f"{rec['speedup_vs_cbx']:.2f}x" if "speedup_vs_cbx" in rec else "-"
        lines.append(f"| {label} | {rec['median_s']:.2f} | {comp} | {speed} | {rec['successes']} |")
    p = out["prng_config"]
    lines += ["", f"PRNG implementations, {p['runs']} runs x {p['steps']} steps (same settings otherwise):", "",
              "| peer | median wall (s) | compile (s) | successes per repeat |", "|---|---|---|---|"]
    for label, rec in out["prng_peers"].items():
        lines.append(f"| {label} | {rec['median_s']:.2f} | {rec['compile_s']:.2f} | {rec['successes']} |")
    lines += ["", f"Shifted anchor (x* = 1), jax threefry2x32 float32: {out['jax_shifted_anchor_successes']}/"
              f"{cfg['runs']} successes.",
              f"Anchor with scheme='exact_drift' (same parameters), jax threefry2x32 float32: "
              f"{out['jax_exact_drift_anchor_successes']}/{cfg['runs']} successes."]
    return lines


if __name__ == "__main__":
    main()
