"""Calibrated presets for the learning-rate-free transforms, and steps to target against tuned baselines.

The procedure of Kasimbeg et al. (2025, "How far away are truly hyperparameter-free learning
algorithms?"), at laptop scale: every transform has a small grid of candidate settings (its
published default among them); each candidate trains on every workload of ``benchmarks.workloads``
(two seeds); the candidate with the best score *across all workloads* becomes
``PRESETS[name]["calibrated"]`` -- one setting per transform, not one per workload.

* **Targets** (AlgoPerf time-to-target): per workload, NadamW with a warmup-cosine schedule at the
  best learning rate of a 7-point grid; the target is its median validation value at half the
  step budget. The baselines (AdamW and NadamW, same grid and schedule, weight decay 1e-4, 5 %
  warmup) are scored like everything else.
* **Cost** of a run on a workload: ``steps_to_target / budget`` (in (0, 1]) if it reaches the target;
  otherwise ``1 + gap`` with ``gap = (best_val - target) / (val0 - target)`` clipped to [0, 1] (2 for a
  non-finite run). The **score** of a candidate is the mean over workloads of the median over seeds.
* **Leave-one-workload-out**: for each workload, calibrate on the other four and score the chosen
  candidate on the held-out one, against the published default there.
* **Failures**: every miss is labelled ``diverged`` (non-finite, or ends above its start),
  ``stalled`` (closed < 10 % of the gap), ``slow`` (still improving over the last quarter) or
  ``plateau`` (not).

Each workload is one compiled program (``workloads.train_many``): the model is traced once for all
runs of all optimizers, hyperparameters are traced, runs are ``vmap``-ed (dense workloads) or
``lax.map``-ped (convolutions). Wall time to target = steps to target x (the program's mean time per
run-step, evaluations amortised, minus the mean optimizer update time, plus this optimizer's update
time measured alone on the workload's parameters, interleaved repeats).

    python -m benchmarks.optim_calibration [--quick] [--seeds 2] [--workloads quadratic,...]
    python -m benchmarks.optim_calibration --report   # tables again from the JSON

Writes ``optim_calibration.{json,md}`` under ``benchmarks.common.RESULTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim
from benchmarks import common
from benchmarks import workloads as W

LR_GRID = tuple(float(v) for v in np.logspace(-3.5, -0.5, 7))  # 3.2e-4 ... 0.32, half a decade apart
WARMUP = 0.05


class Method(NamedTuple):
    """A transform: ``kwargs(hp)`` maps knob values to factory arguments; ``grid[0]`` is the default."""

    kwargs: Callable[[dict], dict]
    make: Callable[..., optax.GradientTransformation]
    eval_fn: Callable | None
    grid: tuple


def _sf_eval(state, params):
    return optim.schedule_free_eval_params(state, params)


def _avg_eval(state, params):
    return optim.averaged_params(state)


def _grid(**axes) -> tuple:
    """The product of the knob values, the first value of every knob first (the default)."""
    names = list(axes)
    out = [{}]
    for n in names:
        out = [dict(c, **{n: v}) for c in out for v in axes[n]]
    return tuple(out)


def _plain(fn: Callable, kwargs: Callable) -> Callable:
    return lambda **hp: fn(**kwargs(hp))


def _averaged(fn: Callable, kwargs: Callable) -> Callable:
    # DoG's authors: "DoG/L-DoG must be combined with iterate averaging" (polynomial decay, gamma 8)
    return lambda **hp: optax.chain(fn(**kwargs(hp)), optim.polynomial_decay_averaging())


def methods() -> dict[str, Method]:
    """Every learning-rate-free transform with its calibration grid (knob values; defaults first)."""
    lr_b2 = lambda hp: {"learning_rate": hp["learning_rate"], "betas": (0.9, hp["b2"])}  # noqa: E731
    lr_m = lambda hp: {"learning_rate": hp["learning_rate"], "momentum": hp["momentum"]}  # noqa: E731
    lr_reps = lambda hp: {"learning_rate": hp["learning_rate"], "reps_rel": hp["reps_rel"]}  # noqa: E731
    table = {
        "prodigy": (optim.prodigy, lr_b2, None, _grid(learning_rate=(1.0, 0.5), b2=(0.999, 0.99))),
        "dadapt_adam": (optim.dadapt_adam, lr_b2, None, _grid(learning_rate=(1.0, 0.5), b2=(0.999, 0.99))),
        "dadapt_sgd": (optim.dadapt_sgd, lr_m, None, _grid(learning_rate=(1.0, 0.5), momentum=(0.0, 0.9))),
        "dadapt_adagrad": (optim.dadapt_adagrad, lr_m, None, _grid(learning_rate=(1.0, 0.5), momentum=(0.0, 0.9))),
        "dadapt_lion": (optim.dadapt_lion, lambda hp: {"learning_rate": hp["learning_rate"], "betas": (hp["b1"], 0.99)},
                        None, _grid(learning_rate=(1.0, 0.5), b1=(0.9, 0.95))),
        "dog": (optim.dog, lr_reps, _avg_eval, _grid(learning_rate=(1.0, 0.5), reps_rel=(1e-6, 1e-4))),
        "ldog": (optim.ldog, lr_reps, _avg_eval, _grid(learning_rate=(1.0, 0.5), reps_rel=(1e-6, 1e-4))),
        "dowg": (optim.dowg, lr_reps, None, _grid(learning_rate=(1.0, 0.5), reps_rel=(1e-6, 1e-4))),
        "cocob": (optim.cocob, lambda hp: dict(hp), None, _grid(learning_rate=(1.0, 0.5), alpha=(100.0, 10.0))),
        # the Mechanic README: keep the base optimizer's schedule "with base learning rate set to 1.0"
        "mechanize": (lambda **kw: optim.mechanize(optax.adam(1.0), **kw), lambda hp: dict(hp), None,
                      _grid(weight_decay=(0.01, 0.0), s_init=(1e-8, 1e-6))),
        "schedule_free_sgd": (optim.schedule_free_sgd, lambda hp: dict(hp), _sf_eval,
                              _grid(learning_rate=(1.0, 0.5), b1=(0.9, 0.95))),
        "schedule_free_adamw": (optim.schedule_free_adamw, lambda hp: dict(hp), _sf_eval,
                                _grid(learning_rate=(0.0025, 0.01), b2=(0.999, 0.995))),
        "schedule_free_radam": (optim.schedule_free_radam, lambda hp: dict(hp), _sf_eval,
                                _grid(learning_rate=(0.0025, 0.01), b2=(0.999, 0.995))),
    }
    out = {}
    for name, (fn, kwargs, eval_fn, grid) in table.items():
        make = (_averaged if eval_fn is _avg_eval else _plain)(fn, kwargs)
        out[name] = Method(kwargs, make, eval_fn, grid)
    return out


def baseline(name: str, steps: int) -> Callable[..., optax.GradientTransformation]:
    """AdamW / NadamW at a traced peak learning rate, linear warmup (5 %) then cosine decay to 0."""
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, int(WARMUP * steps)), steps)
    opt = {"adamw": optax.adamw, "nadamw": optax.nadamw}[name]
    return lambda learning_rate: opt(lambda c: learning_rate * shape(c), weight_decay=1e-4)


# ----------------------------------------------------------------------------------------------- scoring


def run_costs(val: np.ndarray, val0: np.ndarray, target: float, eval_every: int, steps: int) -> np.ndarray:
    """The cost of each run (module docstring): ``val`` (R, E) validation values, ``val0`` (R,)."""
    stt = W.steps_to_target(val, target, eval_every)
    finite = np.all(np.isfinite(val), axis=-1)
    best = np.nanmin(np.where(np.isfinite(val), val, np.inf), axis=-1)
    gap = np.clip((best - target) / np.maximum(val0 - target, 1e-12), 0.0, 1.0)
    miss = np.where(finite, 1.0 + gap, 2.0)
    return np.where(np.isfinite(stt), stt / steps, miss)


def failure(val: np.ndarray, val0: float, target: float) -> str:
    """Why one run missed the target (module docstring), or "ok"."""
    if np.any(val <= target):
        return "ok"
    if not np.all(np.isfinite(val)) or val[-1] > val0:
        return "diverged"
    if np.min(val) > val0 - 0.1 * (val0 - target):
        return "stalled"
    q = max(1, len(val) // 4)
    return "slow" if val[-1] < np.min(val[:-q]) - 0.01 * abs(val0 - target) else "plateau"


def choose(costs: dict, names: list) -> int:
    """The candidate index with the lowest mean cost over ``names``: ``costs[w]`` is (candidates,)."""
    return int(np.argmin(np.mean([costs[w] for w in names], axis=0)))


# ----------------------------------------------------------------------------------------------- runs


def _hparams(grid: list, seeds: int) -> dict:
    return {k: jnp.asarray([c[k] for c in grid for _ in range(seeds)], jnp.float32) for k in grid[0]}


def update_seconds(w, groups: dict, repeats: int = 5, n: int = 20) -> dict:
    """Seconds per ``tx.update`` of each optimizer alone on one run's parameters (interleaved repeats)."""
    params = w.init(jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    fns = {}
    for name, (make, grid) in groups.items():
        hp = {k: jnp.asarray(v, jnp.float32) for k, v in grid[0].items()}

        @jax.jit
        def run(hp, make=make):
            tx = make(**hp)

            def body(carry, _):
                p, s = carry
                u, s = tx.update(grads, s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(body, (params, tx.init(params)), None, length=n)[0][0]

        jax.block_until_ready(run(hp))
        fns[name] = lambda run=run, hp=hp: jax.block_until_ready(run(hp))
    times = common.interleaved(fns, repeats)
    return {name: t[len(t) // 2] / n for name, t in times.items()}


def run_workload(wname: str, mlist: dict, seeds: int, steps: int | None, log=print) -> dict:
    """Baselines (which set the target) and every transform's grid on one workload, in one program."""
    w = W.make(wname)
    if steps is not None:
        w = w._replace(steps=steps, eval_every=max(1, steps // 10))
    keys = jax.random.split(jax.random.key(0), seeds)
    rec = {"steps": w.steps, "eval_every": w.eval_every, "metric": w.metric, "notes": w.notes, "methods": {}}
    lr_grid = [{"learning_rate": v} for v in LR_GRID]
    spec = {b: (baseline(b, w.steps), lr_grid, None) for b in ("nadamw", "adamw")}
    spec.update({name: (m.make, list(m.grid), m.eval_fn) for name, m in mlist.items()})
    groups = [W.Group(make, _hparams(grid, seeds), jnp.concatenate([keys] * len(grid)), ev)
              for make, grid, ev in spec.values()]
    out = W.train_many(w, groups)
    total_runs = sum(len(g.keys) for g in groups)
    log(f"{wname}: {total_runs} runs x {w.steps} steps, compile {out['compile_seconds']:.0f} s, "
        f"run {out['seconds']:.0f} s")
    upd = update_seconds(w, {name: (make, grid) for name, (make, grid, _) in spec.items()})
    mean_upd = sum(upd[n] * len(g.keys) for n, g in zip(spec, groups)) / total_runs
    per_step = out["seconds"] / (total_runs * w.steps)  # one run's step, evaluations amortised
    res = {name: {k: v.reshape(len(spec[name][1]), seeds, *v.shape[1:]) for k, v in r.items()}
           for name, r in zip(spec, out["groups"])}
    half = w.steps // (2 * w.eval_every) - 1
    med_half = np.median(res["nadamw"]["val"][:, :, half], axis=1)
    med_half = np.where(np.isfinite(med_half), med_half, np.inf)
    best_lr = int(np.argmin(med_half))
    target = float(med_half[best_lr])
    rec.update(target=target, target_from=f"nadamw lr={LR_GRID[best_lr]:.3g} at step {(half + 1) * w.eval_every}",
               compile_seconds=out["compile_seconds"], program_seconds=out["seconds"], runs=total_runs,
               mean_step_seconds=per_step, mean_update_seconds=mean_upd)
    log(f"{wname}: target {target:.4g} ({rec['target_from']})")
    for name, (_, grid, _) in spec.items():
        step_s = max(per_step - mean_upd + upd[name], 0.0)
        rec["methods"][name] = _summarise(res[name], grid, target, w, step_s, upd[name])
        log(f"{wname}: {name} costs {np.round(rec['methods'][name]['cost'], 3).tolist()}")
    return rec


def _summarise(res: dict, grid: list, target: float, w, step_seconds: float, update_seconds: float) -> dict:
    costs = [run_costs(res["val"][i], res["val0"][i], target, w.eval_every, w.steps) for i in range(len(grid))]
    stt = W.steps_to_target(res["val"], target, w.eval_every)  # (cands, seeds)
    return {
        "grid": grid,
        "cost": [float(np.median(c)) for c in costs],
        "steps_to_target": np.median(stt, axis=1).tolist(),
        "per_seed_steps": stt.tolist(),
        "final_val": np.median(res["val"][:, :, -1], axis=1).tolist(),
        "best_val": np.median(np.nanmin(np.where(np.isfinite(res["val"]), res["val"], np.inf), -1), axis=1).tolist(),
        "val0": float(np.median(res["val0"])),
        "skipped": np.median(res["skipped"], axis=1).tolist(),
        "failure": [[failure(v, v0, target) for v, v0 in zip(res["val"][i], res["val0"][i])] for i in range(len(grid))],
        "step_seconds": step_seconds, "update_seconds": update_seconds,
    }


# ----------------------------------------------------------------------------------------------- report


def calibrate(record: dict) -> dict:
    """Calibrated choices on all workloads, and the leave-one-workload-out evaluation."""
    wnames = list(record["workloads"])
    result = {}
    for name in record["method_names"]:
        costs = {w: np.asarray(record["workloads"][w]["methods"][name]["cost"]) for w in wnames}
        pick = choose(costs, wnames)
        loo = {}
        for held in wnames:
            rest = [w for w in wnames if w != held]
            i = choose(costs, rest)
            loo[held] = {"choice": i, "cost": float(costs[held][i]), "default_cost": float(costs[held][0])}
        result[name] = {"choice": pick, "setting": record["grids"][name][pick],
                        "score": float(np.mean([costs[w][pick] for w in wnames])),
                        "default_score": float(np.mean([costs[w][0] for w in wnames])), "loo": loo}
    return result


def markdown(record: dict) -> str:
    cal = calibrate(record)
    wnames = list(record["workloads"])
    lines = ["# optim_calibration: calibrated presets and steps to target", "",
             f"Machine: {record['machine']['platform']}, {record['machine']['cpu_count']} CPUs, jax "
             f"{record['machine']['jax']}; {record['seeds']} seeds unless the workload table says otherwise; load "
             f"average at the end {record['load_average_at_end'][0]:.1f} (the machine was shared with other "
             "jobs: wall times are noisy, steps are not)."
             f" Total wall time {record['total_seconds'] / 60:.1f} min.", "",
             "Cost of a run: steps to target / budget if reached, else 1 + the fraction of the gap from the "
             "start to the target left at the best evaluation (2: non-finite). Score: mean cost over "
             "workloads (median over seeds). `miss (c)` is a run that never reached the target, with its cost.",
             "", "## Workloads", "",
             "| workload | budget (steps) | eval every | seeds | target | target from | metric |",
             "|---|---|---|---|---|---|---|"]
    for w in wnames:
        r = record["workloads"][w]
        lines.append(f"| {w} | {r['steps']} | {r['eval_every']} | {r.get('seeds', record['seeds'])} | "
                     f"{r['target']:.4g} | {r['target_from']} | {r['metric']} |")
    lines += ["", "## Calibrated presets (one setting per transform, across all workloads)", "",
              "| transform | calibrated setting | score | default score |", "|---|---|---|---|"]
    ms = methods()
    for name, c in cal.items():
        kw = ms[name].kwargs(c["setting"]) if name in ms else c["setting"]
        lines.append(f"| {name} | `{kw}` | {c['score']:.3f} | {c['default_score']:.3f} |")
    lines += ["", f"## Leave-one-workload-out (calibrate on {len(wnames) - 1}, score on the held-out one)", "",
              "Cost on the held-out workload of the setting calibrated without it, vs the published default.", "",
              "| transform | " + " | ".join(wnames) + " | mean LOO | mean default |", "|---" * (len(wnames) + 3) + "|"]
    wins = ties = losses = 0
    tot_loo, tot_def = [], []
    for name, c in cal.items():
        cells = []
        for w in wnames:
            lo = c["loo"][w]
            cells.append(f"{lo['cost']:.2f} vs {lo['default_cost']:.2f}")
            wins += lo["cost"] < lo["default_cost"] - 1e-9
            losses += lo["cost"] > lo["default_cost"] + 1e-9
            ties += abs(lo["cost"] - lo["default_cost"]) <= 1e-9
        m_loo = np.mean([c["loo"][w]["cost"] for w in wnames])
        m_def = np.mean([c["loo"][w]["default_cost"] for w in wnames])
        tot_loo.append(m_loo)
        tot_def.append(m_def)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m_loo:.3f} | {m_def:.3f} |")
    reached_loo = sum(c["loo"][w]["cost"] <= 1 for c in cal.values() for w in wnames)
    reached_def = sum(c["loo"][w]["default_cost"] <= 1 for c in cal.values() for w in wnames)
    lines += ["", f"Held-out (transform, workload) pairs: calibrated better in {wins}, equal in {ties}, worse in "
              f"{losses}; mean held-out cost {np.mean(tot_loo):.3f} calibrated vs {np.mean(tot_def):.3f} default; "
              f"targets reached on the held-out workload: {reached_loo} calibrated vs {reached_def} default "
              f"(of {len(cal) * len(wnames)}).", "",
              "## Steps to target (median over seeds), wall time to target", "",
              "Baselines at their best learning rate per workload (tuned on the 7-point grid); transforms with the "
              "default (= the published/reference preset) and the calibrated setting. Wall time = steps to "
              "target x measured time per step (ms per step in brackets); `k/n seeds (s)`: only k seeds reached it, "
              "the first at step s; `miss (c)`: no seed did, median cost c; reached: workloads where every seed "
              "reached the target. The targets are where the tuned NadamW is at half the budget, so it reaches "
              "them at about half the budget by construction.", "",
              "| optimizer | " + " | ".join(wnames) + " | reached (all seeds) |", "|---" * (len(wnames) + 2) + "|"]

    def row(label, picks):
        cells, hits = [], 0
        for w in wnames:
            m = record["workloads"][w]["methods"][picks[0]]
            i = picks[1](w, m)
            s, cost, per_seed = m["steps_to_target"][i], m["cost"][i], np.asarray(m["per_seed_steps"][i])
            ms = 1e3 * m["step_seconds"]
            if np.all(np.isfinite(per_seed)):
                cell = f"{s:.0f}, {s * m['step_seconds']:.3g} s"
            elif np.any(np.isfinite(per_seed)):
                cell = f"{np.isfinite(per_seed).sum()}/{per_seed.size} seeds ({np.min(per_seed):.0f})"
            else:
                cell = f"miss ({cost:.2f})"
            cells.append(f"{cell} [{ms:.3g} ms]")
            hits += bool(np.all(np.isfinite(per_seed)))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {hits}/{len(wnames)} |")

    for b in ("nadamw", "adamw"):
        row(f"{b} (lr tuned per workload)", (b, lambda w, m: int(np.argmin(m["cost"]))))
    for name, c in cal.items():
        row(f"{name} default", (name, lambda w, m: 0))
        if c["choice"] != 0:
            row(f"{name} calibrated", (name, lambda w, m, i=c["choice"]: i))
    for b in ("nadamw", "adamw"):
        lr = [f"{w}: {LR_GRID[int(np.argmin(record['workloads'][w]['methods'][b]['cost']))]:.2g}" for w in wnames]
        lines.append(f"\nBest {b} learning rate: " + ", ".join(lr) + ".")
    lines += ["", "## Failures of the defaults and why", "",
              "diverged: non-finite or ended above its start; stalled: closed < 10 % of the gap; slow: still "
              "improving over the last quarter of the budget; plateau: stopped improving above the target.", "",
              "| transform | " + " | ".join(wnames) + " |", "|---" * (len(wnames) + 1) + "|"]
    for name in cal:
        cells = []
        for w in wnames:
            m = record["workloads"][w]["methods"][name]
            f = m["failure"][0]
            skipped = m["skipped"][0]
            why = ", ".join(sorted(set(f)))
            cells.append(why + (f" ({skipped:.0f} skipped steps)" if skipped else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def presets_source(record: dict) -> str:
    """The ``_CALIBRATED`` dict literal for ``optim/presets.py``."""
    cal = calibrate(record)
    ms = methods()
    items = []
    for name, c in cal.items():
        kw = ms[name].kwargs({k: float(v) for k, v in c["setting"].items()})
        items.append(f"    {name!r}: {kw!r},")
    return "_CALIBRATED: dict[str, dict[str, Any]] = {\n" + "\n".join(items) + "\n}\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 40 steps, two small workloads")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--methods", default=None, help="comma-separated transforms (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="override the step budget (evaluations every tenth)")
    ap.add_argument("--merge", action="store_true", help="add the workloads run now to the existing JSON")
    ap.add_argument("--report", action="store_true", help="rewrite the markdown from the JSON")
    args = ap.parse_args(argv)
    path = os.path.join(common.RESULTS, "optim_calibration")
    if args.report:
        with open(path + ".json") as f:
            record = json.load(f)
        with open(path + ".md", "w") as f:
            f.write(markdown(record))
        print(presets_source(record))
        return record
    seeds = args.seeds or (1 if args.quick else 2)
    wnames = args.workloads.split(",") if args.workloads else (
        ["quadratic", "digits_logreg"] if args.quick else list(W.WORKLOADS))
    all_methods = methods()
    mlist = {k: all_methods[k] for k in (args.methods.split(",") if args.methods else all_methods)}
    record = {"seeds": seeds, "lr_grid": LR_GRID, "method_names": list(mlist),
              "grids": {k: list(m.grid) for k, m in mlist.items()}, "workloads": {}, "machine": common.machine()}
    start = time.perf_counter()
    if args.merge:  # e.g. a workload too slow for the main run, at fewer seeds or steps (recorded per workload)
        with open(path + ".json") as f:
            record = json.load(f)
        start -= record["total_seconds"]
    os.makedirs(common.RESULTS, exist_ok=True)
    for wname in wnames:
        record["workloads"][wname] = run_workload(wname, mlist, seeds, 40 if args.quick else args.steps,
                                                  log=lambda s: print(s, flush=True))
        record["workloads"][wname]["seeds"] = seeds
        record["total_seconds"] = time.perf_counter() - start
        record["load_average_at_end"] = os.getloadavg()
        with open(path + ".json", "w") as f:  # after every workload: a partial run is not lost
            json.dump(record, f, indent=1, default=float)
    with open(path + ".md", "w") as f:
        f.write(markdown(record))
    print(presets_source(record))
    return record


if __name__ == "__main__":
    main()
