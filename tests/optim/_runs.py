"""The learning-rate-free transforms under test and small jitted runs of them, shared by
``test_bad_input.py`` and ``test_properties.py`` (one compile per transform, dtype and length)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import optim

# name -> factory(**kwargs); factories taking a learning rate accept learning_rate=...
LR = {
    "prodigy": optim.prodigy,
    "dadapt_adam": optim.dadapt_adam,
    "dadapt_sgd": functools.partial(optim.dadapt_sgd, momentum=0.9),
    "dadapt_adagrad": optim.dadapt_adagrad,
    "dadapt_lion": optim.dadapt_lion,
    "dog": optim.dog,
    "ldog": optim.ldog,
    "dowg": optim.dowg,
    "schedule_free_sgd": lambda learning_rate=0.1, **kw: optim.schedule_free_sgd(learning_rate, **kw),
    "schedule_free_adamw": lambda learning_rate=0.05, **kw: optim.schedule_free_adamw(learning_rate, **kw),
    "schedule_free_radam": lambda learning_rate=0.05, **kw: optim.schedule_free_radam(learning_rate, **kw),
    "schedule_free(adam)": lambda learning_rate=0.05, **kw: optim.schedule_free(
        optax.adam(0.05, b1=0.0), learning_rate, **kw),
}
#: the constant learning rate of each factory above (1.0 where not listed)
LR_BASE = {"schedule_free_sgd": 0.1, "schedule_free_adamw": 0.05, "schedule_free_radam": 0.05,
           "schedule_free(adam)": 0.05}
ALL = {**LR, "mechanize": lambda **kw: optim.mechanize(optax.adam(1.0), **kw), "cocob": optim.cocob,
       "dadapt_sgd+clip": lambda **kw: optax.chain(optax.clip_by_global_norm(1.0), optim.dadapt_sgd(**kw))}


def counters(state):
    """(count, num_nonfinite) of the optim state inside ``state`` (a chain's included), or None."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "num_nonfinite"))
             if hasattr(s, "num_nonfinite")]
    return (int(found[0].count), int(found[0].num_nonfinite)) if found else None


@functools.lru_cache(maxsize=None)
def quadratic_run(name: str, dtype: str, steps: int):
    """Jitted ``run(p0, target, scale) -> (params after each step, final state)``: ``steps`` updates
    of ``ALL[name]()`` on ``scale/2 ||p - target||^2`` with params and gradients in ``dtype``."""
    tx = ALL[name]()

    @jax.jit
    def run(p0, target, scale):
        def body(carry, _):
            p, s = carry
            g = (scale * (p.astype(target.dtype) - target)).astype(dtype)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        (_, s), traj = jax.lax.scan(body, (p0.astype(dtype), tx.init(p0.astype(dtype))), None, length=steps)
        return traj, s

    return run


@functools.lru_cache(maxsize=None)
def injected_run(name: str, steps: int, **kw):
    """Jitted ``run(inject) -> (params after each step, final state)``: float32 updates on
    ``0.5 ||p - TARGET||^2`` from 0, gradient k plus ``inject[k]``; ``kw`` go to the factory."""
    tx = ALL[name](**kw)

    @jax.jit
    def run(inject):
        p0 = jnp.zeros(inject.shape[1:], jnp.float32)

        def body(carry, add):
            p, s = carry
            u, s = tx.update((p - TARGET) + add, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        (_, s), traj = jax.lax.scan(body, (p0, tx.init(p0)), inject)
        return traj, s

    return run


TARGET = jnp.array([1.0, -2.0, 0.5, 3.0], jnp.float32)
QUAD_STEPS = 300  # one length for every quadratic run, so the dtype and property tests share compiles
