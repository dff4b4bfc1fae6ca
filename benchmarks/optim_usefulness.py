"""Are the learning-rate-free optimizers useful with their defaults? Small real workloads.

Every learning-rate-free transform in ``optim`` runs with its default settings for 1000
steps on four workloads, next to Adam at the best learning rate of a 7-point grid
(chosen per workload by final train loss):

* ``digits_logreg``: multinomial logistic regression on scikit-learn's digits (64 -> 10), full batch.
* ``digits_mlp``: a 64-128-10 tanh MLP on digits, minibatches of 64.
* ``cancer_logreg``: binary logistic regression on scikit-learn's breast cancer data, full batch.
* ``quadratic``: ``0.5 (x - x*)^T A (x - x*)`` in d=100, eigenvalues log-spaced in [1, 1e4].

Features are standardised with the training split's statistics; 25% of each data set is
held out for test accuracy. Schedule-free methods are evaluated at their ``x`` iterate and
``+avg`` rows at DoG's polynomial-decay average. Each (method, workload) runs for several
seeds (initialisation and minibatch order) vmapped in one program; the tables report
medians over seeds. ``status`` flags a failure automatically: ``diverged`` (non-finite or
higher final loss than at the start), ``stalled`` (loss down by < 5%), ``behind`` (final
loss > 10x Adam's best); ``eff_lr`` = ||last update|| / ||last gradient|| and
``skipped`` (steps dropped for a non-finite gradient) help say why.

Run: ``python -m benchmarks.optim_usefulness [--quick]``; writes
``benchmarks/results/optim_usefulness.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim
from benchmarks import common

ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
RESULTS = Path(common.RESULTS)  # JAXDIFF_BENCH_RESULTS redirects it (`make bench` writes bench-quick/)


class Workload(NamedTuple):
    name: str
    init: Callable  # key -> params
    loss: Callable  # (params, batch_index) -> scalar training loss on the batch
    train_loss: Callable  # params -> full training loss
    test_acc: Callable | None  # params -> accuracy on the held-out split
    batches: Callable  # (key, steps) -> per-step batch indices (or None for full batch)


def _split(x, y, seed=0):
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    return (jnp.asarray((xtr - mu) / sd, jnp.float32), jnp.asarray(ytr), jnp.asarray((xte - mu) / sd, jnp.float32),
            jnp.asarray(yte))


def _full_batch(key, steps):
    return jnp.zeros((steps,), jnp.int32)


def digits_logreg() -> Workload:
    from sklearn.datasets import load_digits

    xtr, ytr, xte, yte = _split(*load_digits(return_X_y=True))

    def logits(p, x):
        return x @ p["w"] + p["b"][None, :]

    def train_loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(p, xtr), ytr))

    def init(key):
        return {"w": 0.01 * jax.random.normal(key, (64, 10)), "b": jnp.zeros(10)}

    return Workload("digits_logreg", init, lambda p, _: train_loss(p), train_loss,
                    lambda p: jnp.mean(jnp.argmax(logits(p, xte), 1) == yte), _full_batch)


def digits_mlp(batch: int = 64) -> Workload:
    from sklearn.datasets import load_digits

    xtr, ytr, xte, yte = _split(*load_digits(return_X_y=True))
    n = xtr.shape[0]

    def logits(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]

    def ce(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y))

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (64, 128)) / 8.0, "b1": jnp.zeros(128),
                "w2": jax.random.normal(k2, (128, 10)) / jnp.sqrt(128.0), "b2": jnp.zeros(10)}

    def batches(key, steps):
        return jax.random.randint(key, (steps, batch), 0, n)

    return Workload("digits_mlp", init, lambda p, idx: ce(p, xtr[idx], ytr[idx]), lambda p: ce(p, xtr, ytr),
                    lambda p: jnp.mean(jnp.argmax(logits(p, xte), 1) == yte), batches)


def cancer_logreg() -> Workload:
    from sklearn.datasets import load_breast_cancer

    xtr, ytr, xte, yte = _split(*load_breast_cancer(return_X_y=True))

    def train_loss(p):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(xtr @ p["w"] + p["b"], ytr.astype(jnp.float32)))

    def init(key):
        return {"w": 0.01 * jax.random.normal(key, (30,)), "b": jnp.zeros(())}

    return Workload("cancer_logreg", init, lambda p, _: train_loss(p), train_loss,
                    lambda p: jnp.mean(((xte @ p["w"] + p["b"]) > 0) == (yte == 1)), _full_batch)


def quadratic(d: int = 100, cond: float = 1e4) -> Workload:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = jnp.asarray((q * np.logspace(0, np.log10(cond), d)) @ q.T, jnp.float32)
    xstar = jnp.asarray(rng.normal(size=d), jnp.float32)

    def f(p):
        e = p["x"] - xstar
        return 0.5 * e @ (a @ e)

    return Workload("quadratic", lambda key: {"x": 0.1 * jax.random.normal(key, (d,))}, lambda p, _: f(p), f, None,
                    _full_batch)


WORKLOADS = {w.__name__: w for w in (digits_logreg, digits_mlp, cancer_logreg, quadratic)}

_SF_EVAL = optim.schedule_free_eval_params


def _avg_eval(state, params):
    return optim.averaged_params(state)


def methods() -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (factory with default settings, eval-params function or None for the params)."""
    table = {}
    for name in ("prodigy", "dadapt_adam", "dadapt_sgd", "dadapt_adagrad", "dadapt_lion", "cocob", "dog", "ldog",
                 "dowg"):
        if hasattr(optim, name):  # import whatever has landed
            table[name] = (getattr(optim, name), None)
    if hasattr(optim, "mechanize"):
        # the Mechanic README: keep the base schedule "with base learning rate set to 1.0"
        table["mechanize(adam(1.0))"] = (lambda: optim.mechanize(optax.adam(1.0)), None)
    for name in ("dog", "ldog"):
        table[f"{name}+avg"] = (lambda n=name: optax.chain(getattr(optim, n)(), optim.polynomial_decay_averaging()),
                                _avg_eval)
    for name in ("schedule_free_sgd", "schedule_free_adamw", "schedule_free_radam"):
        table[name] = (getattr(optim, name), _SF_EVAL)
    return table


def _run(workload: Workload, make_tx: Callable, eval_fn, steps: int, seeds: int, hps=(0.0,)):
    """Train ``len(hps) x seeds`` copies (vmapped, one compile) for ``steps``; per-run metrics as numpy.

    ``make_tx(hp)`` builds the transform; ``hp`` is traced, so an Adam learning-rate grid
    costs one compilation (defaults ignore it).
    """
    grad = jax.grad(workload.loss)

    def one(key, hp):
        tx = make_tx(hp)
        kinit, kbatch = jax.random.split(key)
        params = workload.init(kinit)
        state = tx.init(params)
        loss0 = workload.train_loss(params)

        def body(carry, idx):
            p, s, _, _ = carry
            g = grad(p, idx)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s, optax.tree.norm(u), optax.tree.norm(g)), None

        zero = jnp.zeros((), jnp.float32)
        (p, s, unorm, gnorm), _ = jax.lax.scan(body, (params, state, zero, zero), workload.batches(kbatch, steps))
        pe = p if eval_fn is None else eval_fn(s, p)
        skipped = sum(jnp.sum(v) for _, v in optax.tree_utils.tree_get_all_with_path(s, "num_nonfinite"))
        acc = workload.test_acc(pe) if workload.test_acc is not None else jnp.nan
        return {"loss0": loss0, "loss": workload.train_loss(pe), "acc": acc, "eff_lr": unorm / gnorm,
                "skipped": jnp.asarray(skipped, jnp.float32)}

    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    t = time.perf_counter()
    out = jax.jit(jax.vmap(jax.vmap(one, (0, None)), (None, 0)))(keys, jnp.asarray(hps, jnp.float32))
    out = jax.tree.map(np.asarray, jax.block_until_ready(out))
    secs = time.perf_counter() - t
    return [{**{k: v[i] for k, v in out.items()}, "seconds": secs} for i in range(len(hps))]


def _summary(res):
    loss = np.median(res["loss"])
    return {"final_train_loss": float(loss), "test_acc": float(np.median(res["acc"])),
            "initial_loss": float(np.median(res["loss0"])), "eff_lr": float(np.median(res["eff_lr"])),
            "skipped_steps": float(np.median(res["skipped"])), "per_seed_loss": res["loss"].tolist(),
            "seconds_incl_compile": res["seconds"]}


def _status(s, adam_best):
    if not np.isfinite(s["final_train_loss"]) or s["final_train_loss"] > s["initial_loss"]:
        return "diverged"
    if s["final_train_loss"] > 0.95 * s["initial_loss"]:
        return "stalled"
    if s["final_train_loss"] > 10 * adam_best:
        return "behind"
    return "ok"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 steps, 1 seed, for a smoke run")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--md-only", action="store_true", help="rebuild the markdown from the saved JSON")
    args = ap.parse_args(argv)
    if args.md_only:
        md = _markdown(json.loads((RESULTS / "optim_usefulness.json").read_text()))
        (RESULTS / "optim_usefulness.md").write_text(md)
        print(md)
        return
    steps = args.steps or (200 if args.quick else 1000)
    seeds = args.seeds or (1 if args.quick else 3)
    record = {"steps": steps, "seeds": seeds, "adam_grid": list(ADAM_GRID), "dtype": "float32",
              "jax": jax.__version__, "optax": optax.__version__, "machine": platform.platform(),
              "device": str(jax.devices()[0]), "workloads": {}}
    table = methods()
    for wname, make in WORKLOADS.items():
        w = make()
        runs = _run(w, optax.adam, None, steps, seeds, hps=ADAM_GRID)
        grid = {lr: _summary(r) for lr, r in zip(ADAM_GRID, runs)}
        best_lr = min(grid, key=lambda lr: np.nan_to_num(grid[lr]["final_train_loss"], nan=np.inf))
        best = grid[best_lr]["final_train_loss"]
        rows = {f"adam(best lr={best_lr:g})": {**grid[best_lr], "status": "baseline"}}
        for mname, (factory, eval_fn) in table.items():
            s = _summary(_run(w, lambda _, f=factory: f(), eval_fn, steps, seeds)[0])
            s["status"] = _status(s, best)
            rows[mname] = s
            print(f"{wname:14s} {mname:22s} loss {s['final_train_loss']:.4g} acc {s['test_acc']:.3f} "
                  f"{s['status']}", flush=True)
        record["workloads"][wname] = {"adam_grid": {str(k): v for k, v in grid.items()}, "adam_best_lr": best_lr,
                                      "methods": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optim_usefulness.json").write_text(json.dumps(record, indent=1))
    (RESULTS / "optim_usefulness.md").write_text(_markdown(record))
    print(_markdown(record))


def _markdown(rec):
    wl = list(rec["workloads"])
    names = list(rec["workloads"][wl[0]]["methods"])
    best_lrs = ", ".join(f"{w}: {rec['workloads'][w]['adam_best_lr']:g}" for w in wl)
    lines = [
        f"# optim usefulness: default settings, {rec['steps']} steps, median of {rec['seeds']} seed(s)",
        "",
        f"float32 on {rec['device']} ({rec['machine']}), jax {rec['jax']}, optax {rec['optax']}. "
        f"Cells: final train loss / test accuracy / status. Adam's learning rate is the best of "
        f"{rec['adam_grid']} per workload ({best_lrs}).",
        "",
        "| method | " + " | ".join(wl) + " |",
        "|---|" + "---|" * len(wl),
    ]
    for i, n in enumerate(names):
        cells = []
        for w in wl:
            rows = rec["workloads"][w]["methods"]
            s = rows[list(rows)[i]]
            acc = "" if not np.isfinite(s["test_acc"]) else f" / {s['test_acc']:.3f}"
            cells.append(f"{s['final_train_loss']:.3g}{acc} / {s['status']}")
        label = "adam (best lr)" if i == 0 else n
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Diagnostics for every non-ok cell (eff_lr = ||last update|| / ||last gradient||):", ""]
    for w in wl:
        for n, s in rec["workloads"][w]["methods"].items():
            if s["status"] not in ("ok", "baseline"):
                lines.append(f"- {w} / {n}: {s['status']}: loss {s['initial_loss']:.3g} -> "
                             f"{s['final_train_loss']:.3g}, eff_lr {s['eff_lr']:.3g}, skipped steps "
                             f"{s['skipped_steps']:g}")
    lines += ["", *_REASONS]
    return "\n".join(lines) + "\n"


# Mechanisms behind the failures, each checked against the diagnostics above or a source.
_REASONS = [
    "Why methods fall behind or fail (mechanisms; the numbers above are the evidence):",
    "",
    "- `behind` with accuracy at Adam's level is mostly a loss-scale artefact: on the separable",
    "  full-batch logistic problems tuned Adam drives the train loss towards 0 (overfitting the",
    "  margin), and anything 10x above that counts as behind although test accuracy is equal.",
    "- DoG/LDoG/DoWG are SGD with one global (or per-tensor) step size and no preconditioning: on",
    "  the quadratic with condition number 1e4 the step is limited by the largest curvature, so the",
    "  small-eigenvalue directions barely move in 1000 steps (the Adam-type methods rescale per",
    "  coordinate). Their step also starts from `reps_rel * (1 + ||x0||)` and must first grow",
    "  geometrically, which costs steps on short runs. Iterate averaging (`+avg`) smooths the",
    "  minibatch noise on the MLP but lags on deterministic problems.",
    "- Schedule-free methods are not learning-rate-free: with their published default learning",
    "  rates (SGD 1.0, AdamW/RAdam 0.0025) they are under- or over-tuned for a given problem;",
    "  the reference README says the method does require tuning. RAdam's first steps are silent.",
    "  Schedule-free SGD at its default lr=1.0 exceeds 2/L = 2e-4 on the quadratic and blows up;",
    "  once the float32 gradient overflows, every later step is skipped (the non-finite rule), which",
    "  is what `skipped steps` counts.",
    "- D-Adapted AdaGrad adapts d slowly (users report the same: facebookresearch/dadaptation#29).",
    "  D-Adapted Lion (flagged experimental in the reference; dadaptation#35) diverges on the three",
    "  data sets: its sign updates have norm ~sqrt(n) whatever the gradient, d keeps growing, the",
    "  parameters reach ~1e19 and the gradients overflow (then steps are skipped). D-Adapted SGD has",
    "  no curvature safeguard: on the quadratic d overshoots 2/L and it diverges the same way.",
]


if __name__ == "__main__":
    main()
