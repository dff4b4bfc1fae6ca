"""A small character-level transformer language model on a text that ships with Python.

The text is the standard library's ``pydoc_data.topics`` (the help topics of the Python reference
manual that ``help("assert")`` prints: 465k characters for CPython 3.11), joined in sorted key order,
mapped to ASCII (anything else becomes ``?``). The first 90 % train, the last 10 % validate. Nothing
is downloaded; the text is the one of the running interpreter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.workloads.base import Workload

VOCAB = 128


def corpus() -> np.ndarray:
    """The characters of ``pydoc_data.topics`` as uint8 codes < 128."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    codes = np.frombuffer(text.encode("ascii", errors="replace"), np.uint8)
    return np.minimum(codes, VOCAB - 1)


def _layer_norm(x, g):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * g[None, None]


def text_lm(scale: str = "cpu", target: float = 2.813) -> Workload:
    """A pre-LayerNorm decoder (causal attention + GELU MLP), tied embeddings, next-character loss.

    CPU scale: width 32, 2 layers, 4 heads, context 32, batches of 8 windows, 200 steps (~30k
    parameters); GPU scale: width 256, 4 layers, 8 heads, context 128, batches of 64. The metric is
    the mean cross-entropy (nats per character) on 64 fixed windows of the validation text.
    """
    width, layers, heads, ctx, batch = (32, 2, 4, 32, 8) if scale == "cpu" else (256, 4, 8, 128, 64)
    codes = corpus()
    split = int(0.9 * len(codes))
    train_text, val_text = jnp.asarray(codes[:split], jnp.int32), jnp.asarray(codes[split:], jnp.int32)
    starts = np.linspace(0, len(val_text) - ctx - 2, 64).astype(np.int32)
    val_windows = jnp.stack([val_text[s:s + ctx + 1] for s in starts])

    def init(key):
        ks = iter(jax.random.split(key, 2 + 4 * layers))
        normal = lambda shape, scale: scale * jax.random.normal(next(ks), shape, jnp.float32)  # noqa: E731
        ones = lambda: jnp.ones(width, jnp.float32)  # noqa: E731
        p = {"embed": normal((VOCAB, width), 0.02), "pos": normal((ctx, width), 0.02), "ln_f": ones()}
        for i in range(layers):
            p[f"l{i}"] = {"ln1": ones(), "qkv": normal((width, 3 * width), width**-0.5),
                          "proj": normal((width, width), (2 * layers * width) ** -0.5), "ln2": ones(),
                          "up": normal((width, 4 * width), width**-0.5),
                          "down": normal((4 * width, width), (2 * layers * 4 * width) ** -0.5)}
        return p

    mask = jnp.tril(jnp.ones((ctx, ctx), bool))

    def forward(p, tokens):  # tokens (B, ctx) -> logits (B, ctx, VOCAB)
        h = p["embed"][tokens] + p["pos"][None]
        b = tokens.shape[0]
        for i in range(layers):
            q = p[f"l{i}"]
            qkv = (_layer_norm(h, q["ln1"]) @ q["qkv"]).reshape(b, ctx, 3, heads, width // heads)
            att = jnp.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) / jnp.sqrt(width // heads)
            att = jax.nn.softmax(jnp.where(mask[None, None], att, -1e9), axis=-1)
            h = h + jnp.einsum("bhqk,bkhd->bqhd", att, qkv[:, :, 2]).reshape(b, ctx, width) @ q["proj"]
            h = h + jax.nn.gelu(_layer_norm(h, q["ln2"]) @ q["up"]) @ q["down"]
        return _layer_norm(h, p["ln_f"]) @ p["embed"].T

    def ce(p, windows):
        logits = forward(p, windows[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]))

    def get_batch(key, step):
        s = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, len(train_text) - ctx - 1)
        return jax.vmap(lambda i: jax.lax.dynamic_slice(train_text, (i,), (ctx + 1,)))(s)

    return Workload(
        name="text_lm", init=init, loss=ce, batch=get_batch, evaluate=lambda p: ce(p, val_windows),
        metric="validation cross-entropy (nats/char)", target=target, steps=200 if scale == "cpu" else 3000,
        eval_every=10, vectorize=True,
        notes=f"char transformer width {width}, {layers} layers, {heads} heads, context {ctx}, batch {batch}; "
              "text: the standard library's pydoc_data.topics.")
