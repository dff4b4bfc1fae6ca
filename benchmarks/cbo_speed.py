"""CBO speed and the CBXpy anchor: optim.cbo (jit + vmap over runs) against cbx, side by side.

The anchor (CBXpy's success-evaluation notebook): Rastrigin (A = 10, sum form), d = 20, N = 40,
100 runs, x0 ~ U(-3, 3)^d, anisotropic Euler-Maruyama, sigma = 10.1, lambda = 1, dt = 0.01,
alpha_0 = 30 x1.05 per step up to 1e5, 5000 steps; success when the final consensus is within
0.25 (sup-norm) of the minimizer x* = 0 (and x* = 1). These are ``optim.cbo()``'s defaults: the
success counts are measured with ``optim.cbo()`` called without arguments.

Speed (at equal precision): optim.cbo in float64 against cbx on float64 particles, and in float32
against cbx on float32 particles (cbx keeps ``x`` in the particles' dtype; its noise and energies
are computed in float64 and cast on assignment), cbx's per-step history off
(``track_args={"names": []}``). The timed problem is the anchor with 20 runs x 2000 steps
(``--timing-runs/--timing-steps``); ``--repeats`` (default 10) interleaved rounds, every peer once
per round in a rotated order, so all see the same machine load; medians with the interquartile
range; compile time separately. A smaller problem (20 runs x 1000 steps) compares the PRNG
implementations threefry2x32, rbg and unsafe_rbg (3 rounds).

    python -m benchmarks.cbo_speed [--quick] [--repeats 10] [--successes-only]
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

from benchmarks import common

RESULTS = Path(common.RESULTS)  # JAXDIFF_BENCH_RESULTS redirects it (`make bench` writes bench-quick/)
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


def run_cbx(name, shift, cfg, noise, x0, seed, dtype="float64"):
    """cbx CBO on all runs at once (its M axis), f evaluated on (M, N, d) arrays; returns (runs, d).

    The per-step history (cbx tracks the update norm and energy by default) is off.
    """
    from cbx.dynamics import CBO

    dyn = CBO(cbx_objective(name, shift), f_dim="3D", x=np.array(x0, dtype), noise=noise, sigma=cfg["sigma"],
              lamda=cfg["lambda_"], dt=cfg["dt"], alpha=cfg["alpha"], max_it=cfg["steps"], verbosity=0, seed=seed,
              track_args={"names": []})
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
    parser.add_argument("--quick", action="store_true", help="10 runs x 500 steps timed, 2 repeats, 10 success runs")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--timing-runs", type=int, default=20)
    parser.add_argument("--timing-steps", type=int, default=2000)
    parser.add_argument("--no-cbx", action="store_true", help="skip the cbx peers")
    parser.add_argument("--successes-only", action="store_true",
                        help="only the anchor's success counts (x* = 0 and 1, both schemes), no timing")
    args = parser.parse_args(argv)
    cfg = dict(ANCHOR)
    timing = dict(cfg, runs=args.timing_runs, steps=args.timing_steps)
    if args.quick:
        cfg.update(runs=10)
        timing.update(runs=10, steps=500)
    repeats = args.repeats or (2 if args.quick else 10)

    import jax

    jax.config.update("jax_enable_x64", True)  # for the float64 peer; the float32 peers pass float32 data
    x0 = initial_ensembles(cfg["runs"], cfg["n"], cfg["d"], cfg["box"])
    if args.successes_only:
        return anchor_successes(cfg, x0)
    defaults = default_successes(cfg, x0)
    peers = {"jax f64": dict(impl="threefry2x32", dtype="float64"), "jax f32": dict(impl="threefry2x32",
                                                                                  dtype="float32")}
    anchor = compare(timing, x0[:timing["runs"]], repeats, peers, cbx_dtypes=() if args.no_cbx else
                     ("float64", "float32"))
    # PRNG implementations on a smaller problem (20 runs x 1000 steps): the noise draw is the bottleneck
    small = dict(timing, steps=timing["steps"] // 2)
    prng = compare(small, x0[:small["runs"]], min(repeats, 3),
                   {f"jax {impl} f32": dict(impl=impl, dtype="float32") for impl in ("threefry2x32", "rbg",
                                                                                    "unsafe_rbg")}, cbx_dtypes=())
    out = dict(config=cfg, timing_config=timing, repeats=repeats,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                            device=str(jax.devices()[0])),
               load_average_at_end=os.getloadavg(), default_successes=defaults, peers=anchor, prng_config=small,
               prng_peers=prng)
    write_files(out, "cbo_speed", table(out))
    return out


def default_successes(cfg, x0):
    """Successes of ``optim.cbo()`` with no arguments on the anchor problem (x* = 0 and 1, f32 and f64)."""
    import jax
    import jax.numpy as jnp

    import optim

    rows = []
    for dtype, shift in (("float32", 0.0), ("float64", 0.0), ("float32", 1.0)):
        f = jax_objective("rastrigin", shift)
        tx = optim.cbo()
        batched = jax.jit(jax.vmap(lambda x, k: optim.cbo_minimize(f, x, k, tx, num_steps=cfg["steps"]).consensus))
        keys = jax.vmap(jax.random.key)(jnp.arange(x0.shape[0]) + 77)
        c = np.asarray(batched(jnp.asarray(x0 + shift, dtype), keys))
        rows.append(dict(dtype=dtype, shift=shift, successes=successes(c, shift, cfg["tol"]), runs=x0.shape[0]))
        print("optim.cbo() defaults:", rows[-1], flush=True)
    return rows


def compare(cfg, x0, repeats, peers, cbx_dtypes):
    """Interleaved repeats of the JAX peers and cbx (one peer per dtype); medians, spread, compile times, ratios."""
    runners, record = {}, {}
    for label, spec in peers.items():
        runners[label] = make_jax_runner("rastrigin", 0.0, cfg, "anisotropic", **spec)
        c, first = timed(lambda: runners[label](x0, 0))
        record[label] = dict(first_call_s=first, times_s=[], successes=[successes(c, 0.0, cfg["tol"])], **spec)
        print(f"{label}: first call (compile + run) {first:.2f} s, successes {record[label]['successes'][0]}",
              flush=True)
    for dtype in cbx_dtypes:
        record[f"cbx f{dtype[-2:]}"] = dict(first_call_s=None, times_s=[], successes=[], dtype=dtype)
    labels = list(record)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            rec = record[label]
            if label.startswith("cbx"):
                c, t = timed(lambda: run_cbx("rastrigin", 0.0, cfg, "anisotropic", x0, seed=r, dtype=rec["dtype"]))
            else:
                c, t = timed(lambda: runners[label](x0, r + 1))
            rec["successes"].append(successes(c, 0.0, cfg["tol"]))
            rec["times_s"].append(t)
            print(f"repeat {r}: {label} {t:.2f} s, successes {rec['successes'][-1]}/{cfg['runs']}", flush=True)
    for rec in record.values():
        ts = sorted(rec["times_s"])
        rec["median_s"] = statistics.median(ts)
        rec["q25_s"], rec["q75_s"] = (float(np.percentile(ts, 25)), float(np.percentile(ts, 75)))
        if rec["first_call_s"] is not None:
            rec["compile_s"] = rec["first_call_s"] - rec["median_s"]
    for label, rec in record.items():
        peer = f"cbx f{rec['dtype'][-2:]}"
        if not label.startswith("cbx") and peer in record:
            rec["speedup_vs_cbx_same_dtype"] = record[peer]["median_s"] / rec["median_s"]
            # the spread of the ratio: per-round ratios (the peers of a round share the load)
            rec["speedup_per_round"] = [b / a for a, b in zip(rec["times_s"], record[peer]["times_s"])]
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(out):
    cfg, tc = out["config"], out["timing_config"]
    lines = ["# cbo_speed", "",
             f"Rastrigin d={cfg['d']}, N={cfg['n']}, anisotropic EM, sigma={cfg['sigma']}, dt={cfg['dt']}, alpha "
             f"{cfg['alpha']} x{cfg['alpha_growth']} <= {cfg['alpha_max']:g} (the CBXpy anchor = optim.cbo()'s "
             f"defaults); {out['machine']['device']}, {out['machine']['cpus']} CPUs shared with other jobs (load "
             f"average at the end {out['load_average_at_end'][0]:.1f}).", "",
             f"## optim.cbo() defaults: successes on {cfg['runs']} runs x {cfg['steps']} steps", "",
             "(success: final consensus within 0.25, sup-norm, of x*)", "",
             "| dtype | x* | successes |", "|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['shift']:g} | {r['successes']}/{r['runs']} |" for r in out["default_successes"]]
    lines += ["", f"## Speed at equal precision: {tc['runs']} runs x {tc['steps']} steps, {out['repeats']} "
              "interleaved rounds", "",
              "cbx 1.x with its (M, N, d) layout and per-step history off; float32 cbx keeps the particles in "
              "float32 (its noise and energies are float64, cast on assignment). Ratio: cbx median / ours at the "
              "same dtype; range: the per-round ratios' interquartile range.", "",
              "| peer | median wall (s) | IQR (s) | compile (s) | speedup vs cbx, same dtype | per-round ratio IQR "
              "| successes per repeat |", "|---|---|---|---|---|---|---|"]
    for label, rec in out["peers"].items():
        comp = f"{rec['compile_s']:.2f}" if rec.get("compile_s") is not None else "-"
        speed = f"{rec['speedup_vs_cbx_same_dtype']:.2f}x" if "speedup_vs_cbx_same_dtype" in rec else "-"
        rr = rec.get("speedup_per_round")
        rr = f"{np.percentile(rr, 25):.2f}-{np.percentile(rr, 75):.2f}" if rr else "-"
        lines.append(f"| {label} | {rec['median_s']:.2f} | {rec['q25_s']:.2f}-{rec['q75_s']:.2f} | {comp} | {speed} "
                     f"| {rr} | {rec['successes']} |")
    p = out["prng_config"]
    lines += ["", f"PRNG implementations, {p['runs']} runs x {p['steps']} steps (same settings otherwise):", "",
              "| peer | median wall (s) | compile (s) | successes per repeat |", "|---|---|---|---|"]
    for label, rec in out["prng_peers"].items():
        lines.append(f"| {label} | {rec['median_s']:.2f} | {rec['compile_s']:.2f} | {rec['successes']} |")
    return lines


if __name__ == "__main__":
    main()
