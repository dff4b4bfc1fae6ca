"""A small convolutional classifier on the shipped 8x8 digits (minibatches of 64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from benchmarks.workloads.base import Workload

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


def digits_cnn(scale: str = "cpu", target: float = 0.1594) -> Workload:
    """conv 3x3 (c1) - ReLU - conv 3x3 stride 2 (c2) - ReLU - dense 10, He initialisation.

    CPU scale: c1 = 8, c2 = 16 (~4k parameters), batches of 32 from the 1198 training images, 200
    steps; GPU scale: c1 = 64, c2 = 128, batches of 256. The metric is the test cross-entropy on the
    599 held-out images.
    """
    from jaxdiff.pretrained import digits_data

    c1, c2, batch = (8, 16, 32) if scale == "cpu" else (64, 128, 256)
    (xtr, ytr), (xte, yte) = digits_data("train"), digits_data("test")
    xtr, xte = jnp.asarray(xtr, jnp.float32), jnp.asarray(xte, jnp.float32)  # float32 also under jax_enable_x64
    ytr, yte = jnp.asarray(ytr), jnp.asarray(yte)

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        he = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) * (2.0 / fan_in) ** 0.5  # noqa: E731
        z = lambda n: jnp.zeros(n, jnp.float32)  # noqa: E731
        return {"c1": he(k1, (3, 3, 1, c1), 9), "b1": z(c1), "c2": he(k2, (3, 3, c1, c2), 9 * c1),
                "b2": z(c2), "w": he(k3, (16 * c2, 10), 16 * c2) / 2.0 ** 0.5, "b": z(10)}

    def logits(p, x):
        h = jax.nn.relu(_conv(x, p["c1"], 1) + p["b1"][None, None, None])
        h = jax.nn.relu(_conv(h, p["c2"], 2) + p["b2"][None, None, None])
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"][None]

    def ce(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y))

    def get_batch(key, step):
        idx = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, xtr.shape[0])
        return xtr[idx], ytr[idx]

    return Workload(
        name="digits_cnn", init=init, loss=lambda p, b: ce(p, *b), batch=get_batch,
        evaluate=lambda p: ce(p, xte, yte), metric="test cross-entropy", target=target,
        steps=200 if scale == "cpu" else 2000, eval_every=10, vectorize=False,
        notes=f"conv{c1}-conv{c2}/2-dense10, batch {batch}, test CE on 599 held-out digits.")
