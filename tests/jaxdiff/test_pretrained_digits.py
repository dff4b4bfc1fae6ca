"""The shipped digits model: quality on held-out data, its diffusers twin, and the training entry point.

Acceptance (issue 11): conditional samples at NFE 10 with CFG scale 3 are classified as their label >= 90 %
of the time by a classifier trained on real digits; the Frechet distance of NFE-10 samples to the held-out
test split is within 2x the real train-vs-test value; training resumes bit for bit from an orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.pretrained import train_digits

NFE = 10
GUIDED_SAMPLES = 500
# the resume test runs the real entry point on a one-level U-Net: the logic is the same, the compile is short
SMALL = dataclasses.replace(train_digits.CONFIG, block_out_channels=(32,), down_block_types=("DownBlock2D",),
                            up_block_types=("UpBlock2D",), mid_block_type=None)


@functools.lru_cache(maxsize=None)
def _samples():
    """UniPC-2 at NFE 10 from one x_T: the plain conditional model with the train split's labels (for the FD,
    at the train split's size), and the first 500 of them with CFG scale 3 (for the accuracy)."""
    den, variables = jd.pretrained.digits()
    _, labels = jd.pretrained.digits_data("train")
    labels = jnp.asarray(labels)
    x_T = jax.random.normal(jax.random.key(0), (labels.shape[0],) + jd.pretrained.DIGITS_SHAPE, jnp.float32)
    ts = jd.timesteps(den.schedule, NFE, "time")
    plain = jax.jit(lambda x, v, y: jd.sample(den, x, ts, jd.UniPC(), args=jd.pretrained.digits_args(v, y)))
    guided_den = dataclasses.replace(den, guidance=jd.CFG(3.0))
    guided = jax.jit(lambda x, v, y: jd.sample(guided_den, x, ts, jd.UniPC(),
                                               args=jd.pretrained.digits_args(v, y, guidance=True)))
    n = GUIDED_SAMPLES
    return plain(x_T, variables, labels), labels, guided(x_T[:n], variables, labels[:n]), labels[:n]


def test_guided_samples_are_classified_as_their_label():
    plain, labels, guided, guided_labels = _samples()
    clf = jd.pretrained.digits_classifier()
    acc = float(jd.metrics.class_accuracy(clf, guided, guided_labels))
    assert acc >= 0.90, f"class accuracy {acc:.3f} of CFG-3 samples at NFE {NFE}"
    # without guidance the classes are less sharp, but the model is conditional: well above chance
    assert float(jd.metrics.class_accuracy(clf, plain, labels)) > 0.5


def test_frechet_distance_within_twice_the_real_floor():
    samples = _samples()[0]
    clf = jd.pretrained.digits_classifier()
    (train, _), (test, _) = jd.pretrained.digits_data("train"), jd.pretrained.digits_data("test")
    test_features = clf.features(test)
    floor = jd.metrics.frechet_distance(clf.features(train), test_features)  # same n as the samples
    fd = jd.metrics.frechet_distance(clf.features(samples), test_features)
    assert fd <= 2.0 * floor, f"FD {fd:.3f} vs real train/test {floor:.3f}"
    assert np.all(np.isfinite(np.asarray(samples))) and float(jnp.max(jnp.abs(samples))) < 1.5


@pytest.mark.reference("torch", "diffusers")
def test_shipped_folder_runs_in_diffusers():
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    den, variables = jd.pretrained.digits()
    unet = UNet2DModel.from_pretrained(jd.pretrained.DIGITS_UNET_DIR).eval().double()
    sched = DDPMScheduler.from_pretrained(jd.pretrained.DIGITS_UNET_DIR)
    np.testing.assert_allclose(np.exp(2 * np.asarray(den.schedule.log_alphas)), sched.alphas_cumprod.numpy(),
                               rtol=0, atol=1e-7)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 1))
    labels = np.array([0, 3, 7, 10])
    for t in (999.0, 412.5, 3.0):
        ours = den.fn(jnp.asarray(x), t, (variables, jnp.asarray(labels)))
        with torch.no_grad():
            theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.tensor(t, dtype=torch.float64),
                          class_labels=torch.from_numpy(labels)).sample.numpy().transpose(0, 2, 3, 1)
        # float64 on both sides, except diffusers' float32 time embedding
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-5 * np.max(np.abs(theirs)))


def test_training_resumes_bit_for_bit(tmp_path):
    steps, batch = 4, 8
    run = functools.partial(train_digits.train, steps, batch_size=batch, progress=False, config=SMALL)
    straight = run()
    first = run(checkpoint_dir=str(tmp_path), checkpoint_every=1, stop_at=2)
    assert int(first.step) == 2
    resumed = run(checkpoint_dir=str(tmp_path))
    assert int(resumed.step) == steps
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), straight, resumed)
    assert all(jax.tree.leaves(same))
    # and the run really moved: the parameters differ from the initial ones
    init = train_digits.init_state(0, steps, SMALL)
    moved = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), init.params, resumed.params)
    assert not all(jax.tree.leaves(moved))


def test_digits_args():
    _, variables = jd.pretrained.digits()
    labels = jnp.arange(3)
    cond, uncond = jd.pretrained.digits_args(variables, labels, guidance=True)
    assert cond[0] is uncond[0] is variables
    np.testing.assert_array_equal(uncond[1], np.full(3, jd.pretrained.NULL_LABEL))
    with pytest.raises(TypeError, match="`labels` must be integer class indices"):
        jd.pretrained.digits_args(variables, jnp.zeros(3))
