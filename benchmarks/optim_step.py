"""One jitted optimizer step on a ~10M-parameter pytree: optim vs optax.contrib, and vs memory traffic.

The pytree has many leaves of mixed shapes (matrices, conv kernels, vectors, scalars),
float32. A step is ``update`` + ``apply_updates`` with params and state donated, as in a
training loop. Each of our transforms runs side by side with its optax.contrib
counterpart for the same algorithm (``PRESETS["optax"]`` where optax fixes an option,
e.g. Prodigy's bias correction), calls interleaved (in alternating order) so both see the
same machine load; medians over repeats. The floor is the memory traffic the step cannot avoid: bytes of
gradients, params and state read plus params and changed state written, divided by the
copy bandwidth measured here (``x + 1`` on a 256 MiB buffer: one read, one write).

    python -m benchmarks.optim_step [--quick] [--repeats 30] [--only prodigy,cocob]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim
from benchmarks.common import write_results


def make_params(seed: int = 0) -> dict:
    """~10.3M float32 parameters in 62 leaves: a conv stem, attention-like blocks, a head."""
    rng = np.random.default_rng(seed)
    shapes = {"stem/kernel": (3, 3, 3, 64), "stem/bias": (64,), "stem/scale": ()}
    for i in range(8):
        shapes |= {
            f"block{i}/qkv": (384, 3 * 384), f"block{i}/proj": (384, 384), f"block{i}/mlp_in": (384, 768),
            f"block{i}/mlp_out": (768, 384), f"block{i}/ln_scale": (384,), f"block{i}/ln_bias": (384,),
            f"block{i}/conv": (3, 3, 16, 16),
        }
    shapes |= {"head/kernel": (384, 1000), "head/bias": (1000,), "temperature": ()}
    return {k: jnp.asarray(rng.normal(size=s) * 0.02, jnp.float32) for k, s in shapes.items()}


def pairs() -> list[tuple[str, object, object]]:
    """(name, ours, optax.contrib counterpart or None).

    Schedule-free runs twice: by default ours skips a step with a non-finite gradient, which
    costs one more read of the gradient (optax.contrib has no such check);
    ``skip_nonfinite=False`` is the same algorithm as optax.contrib's.
    """
    c = optax.contrib
    return [
        ("prodigy (bias-corrected)", optim.prodigy(**optim.PRODIGY_PRESETS["optax"]), c.prodigy()),
        ("prodigy (reference defaults)", optim.prodigy(), None),
        ("dadapt_adam (bias-corrected, AdamW)", optim.dadapt_adam(**optim.DADAPT_ADAM_PRESETS["optax"]),
         c.dadapt_adamw()),
        ("dadapt_sgd", optim.dadapt_sgd(momentum=0.9), None),
        ("dadapt_adagrad", optim.dadapt_adagrad(), None),
        ("dadapt_lion", optim.dadapt_lion(), None),
        ("mechanize(adam)", optim.mechanize(optax.adam(1.0)), c.mechanize(optax.adam(1.0))),
        ("cocob", optim.cocob(), c.cocob()),
        ("dog", optim.dog(), c.dog()),
        ("dowg", optim.dowg(), c.dowg()),
        ("ldog", optim.ldog(), optax.chain(optax.scale_by_distance_over_gradients(), optax.scale(-1.0))),
        ("schedule_free_adamw", optim.schedule_free_adamw(learning_rate=2.5e-3),
         c.schedule_free_adamw(learning_rate=2.5e-3)),
        ("schedule_free_adamw (skip_nonfinite=False)", optim.schedule_free_adamw(learning_rate=2.5e-3, skip_nonfinite=False),
         c.schedule_free_adamw(learning_rate=2.5e-3)),
        ("schedule_free_sgd", optim.schedule_free_sgd(), c.schedule_free_sgd(learning_rate=1.0)),
        ("schedule_free_sgd (skip_nonfinite=False)", optim.schedule_free_sgd(skip_nonfinite=False),
         c.schedule_free_sgd(learning_rate=1.0)),
    ]


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of a read + write stream (``x + 1``) on a 256 MiB float32 buffer."""
    x = jnp.zeros((64 * 1024 * 1024,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x = f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times)


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


class Runner:
    """A donated, jitted step of one transform, with its traffic floor in bytes."""

    def __init__(self, tx, params, grads):
        self.grads = grads

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        self.step = jax.jit(step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, params)
        # fresh buffers: optax.contrib inits alias params (x0) and share zero trees across fields
        state = jax.tree.map(jnp.copy, tx.init(params))
        before = jax.tree.map(np.asarray, state)
        self.params, self.state = self.step(params, state, grads)
        # state leaves the step rewrote (x0-style copies are only read)
        changed = [not np.array_equal(a, np.asarray(b))
                   for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(self.state))]
        written = sum(x.nbytes for x, c in zip(jax.tree.leaves(self.state), changed) if c)
        self.traffic = nbytes(grads) + 2 * nbytes(self.params) + nbytes(self.state) + written
        self.state_copies = nbytes(self.state) / nbytes(self.params)
        for _ in range(2):  # warm: compiled and in steady state
            self.params, self.state = jax.block_until_ready(self.step(self.params, self.state, grads))

    def time_one(self) -> float:
        t = time.perf_counter()
        self.params, self.state = jax.block_until_ready(self.step(self.params, self.state, self.grads))
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching transforms")
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w]
    repeats = 5 if args.quick else args.repeats
    load = os.getloadavg()
    params = make_params()
    grads = jax.tree.map(lambda p: 0.01 * jnp.sin(1000.0 * p) + 0.001, params)
    n = sum(x.size for x in jax.tree.leaves(params))
    bandwidth = copy_bandwidth(max(repeats, 10))
    rows, record = [], {"num_params": n, "num_leaves": len(jax.tree.leaves(params)), "repeats": repeats,
                        "copy_bandwidth_GBps": bandwidth / 1e9, "results": []}
    for name, ours, peer in pairs():
        if only and not any(w in name for w in only):
            continue
        runners = {"optim": Runner(ours, params, grads)}
        if peer is not None:
            runners["optax"] = Runner(peer, params, grads)
        times = {k: [] for k in runners}
        for i in range(repeats):  # interleaved, the order flipped every repeat (the second call finds warmer caches)
            for k, r in list(runners.items())[:: 1 if i % 2 else -1]:
                times[k].append(r.time_one())
        med = {k: statistics.median(v) for k, v in times.items()}
        floor = runners["optim"].traffic / bandwidth
        res = {
            "transform": name,
            "optim_ms": 1e3 * med["optim"],
            "optax_ms": 1e3 * med["optax"] if peer is not None else None,
            "ratio": med["optim"] / med["optax"] if peer is not None else None,
            "state_copies": runners["optim"].state_copies,
            "optax_state_copies": runners["optax"].state_copies if peer is not None else None,
            "floor_ms": 1e3 * floor,
            "optim_over_floor": med["optim"] / floor,
            "optax_over_its_floor": (med["optax"] / (runners["optax"].traffic / bandwidth)) if peer is not None
            else None,
        }
        record["results"].append(res)
        rows.append({k: ("-" if v is None else v) for k, v in res.items()})
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}, flush=True)
        del runners
    notes = (f"{n / 1e6:.2f}M float32 parameters in {record['num_leaves']} leaves; one step = update + "
             f"apply_updates, params and state donated; medians of {repeats} interleaved calls. ratio = optim / "
             f"optax.contrib (same algorithm). floor = (grads + params read + params written + state read + "
             f"changed state written) / copy bandwidth ({bandwidth / 1e9:.2f} GB/s, `x + 1` on 256 MiB). "
             "state_copies = state bytes / param bytes. The machine was shared with other jobs (load average "
             f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs): read the ratios of "
             "interleaved peers, not the absolute times.")
    record["load_average"] = {"before": load, "after": os.getloadavg()}
    md = write_results("optim_step", record, rows, "optim: one jitted step, ~10M parameters", notes)
    print(md)


if __name__ == "__main__":
    main()
