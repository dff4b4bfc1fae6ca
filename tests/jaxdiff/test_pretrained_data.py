"""The shipped digits data (vs scikit-learn), its split, and the shipped classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.metrics import class_accuracy, frechet_distance
from jaxdiff.pretrained import classifier as clf_module
from jaxdiff.pretrained import data
from jaxdiff.pretrained import train_classifier as tc


def _raw():
    with np.load(data.DATA_FILE) as f:
        return {k: f[k] for k in f.files}


# ---------------------------------------------------------------- data


@pytest.mark.reference("sklearn")
def test_shipped_arrays_equal_sklearn_load_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = _raw()
    assert raw["pixels"].dtype == np.uint8 and raw["pixels"].shape == (1797, 8, 8)
    np.testing.assert_array_equal(raw["pixels"], d.images)
    np.testing.assert_array_equal(raw["labels"], d.target)
    x, y = jd.pretrained.digits_data("all")
    np.testing.assert_array_equal(x[..., 0], (d.images / 8.0 - 1.0).astype(np.float32))
    np.testing.assert_array_equal(y, d.target)


def test_split_is_stratified_thirds_and_follows_the_documented_rule():
    raw = _raw()
    labels, is_test = raw["labels"], raw["is_test"]
    counts = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(labels[is_test], minlength=10), np.round(counts / 3).astype(int))
    assert int(is_test.sum()) == 599
    # the stored split is the documented rule, re-run here
    np.testing.assert_array_equal(data.stratified_split(labels, int(raw["split_seed"])), is_test)
    assert int(raw["split_seed"]) == data.SPLIT_SEED
    # the splits partition the data, each in dataset order
    x_all, y_all = jd.pretrained.digits_data("all")
    x_tr, y_tr = jd.pretrained.digits_data("train")
    x_te, y_te = jd.pretrained.digits_data("test")
    assert (len(y_tr), len(y_te)) == (1198, 599)
    np.testing.assert_array_equal(x_te, x_all[is_test])
    np.testing.assert_array_equal(y_tr, y_all[~is_test])
    np.testing.assert_array_equal(x_tr, x_all[~is_test])


def test_scaling_shapes_and_dtypes():
    x, y = jd.pretrained.digits_data("test")
    assert x.shape == (599,) + jd.pretrained.DIGITS_SHAPE and x.dtype == np.float32
    assert y.shape == (599,) and y.dtype == np.int32
    assert set(np.unique(y)) == set(range(jd.pretrained.NUM_CLASSES))
    # x = p / 8 - 1 for integer pixels p in 0..16: exactly 17 levels from -1 to 1
    levels = np.unique(x)
    assert levels.min() == -1.0 and levels.max() == 1.0
    np.testing.assert_array_equal((levels + 1.0) * 8.0, np.round((levels + 1.0) * 8.0))
    np.testing.assert_array_equal(data.to_pixels(x)[..., 0], _raw()["pixels"][_raw()["is_test"]])


def test_bad_split_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown `split='val'`; expected one of \('train', 'test', 'all'\)"):
        jd.pretrained.digits_data("val")


# ---------------------------------------------------------------- classifier


def test_shipped_classifier_test_accuracy():
    clf = jd.pretrained.digits_classifier()
    x, y = jd.pretrained.digits_data("test")
    acc = float(class_accuracy(clf, x, y))
    assert acc >= 0.97
    # the file records what the training script measured (float32 mean there)
    _, meta = clf_module.load_weights(clf_module.WEIGHTS_FILE)
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-6)
    assert meta["split"] == "train" and meta["recipe"] == tc.RECIPE


def test_shipped_classifier_shapes_jit_and_input_checks():
    clf = jd.pretrained.digits_classifier()
    x, _ = jd.pretrained.digits_data("test")
    logits, feats, pred = clf.logits(x[:5]), clf.features(x[:5]), clf.predict(x[:5])
    assert logits.shape == (5, 10) and feats.shape == (5, 64) and pred.dtype == jnp.int32
    np.testing.assert_array_equal(pred, np.argmax(logits, axis=1))
    jitted = jax.jit(lambda c, x: c.features(x))(clf, x[:5])
    np.testing.assert_allclose(jitted, feats, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 8, 8, 1\) .* got \(5, 8, 8\)"):
        clf.features(x[:5, ..., 0])
    with pytest.raises(TypeError, match=r"Scale raw pixels first \(for the shipped digits: pixels / 8 - 1\)"):
        clf.logits(_raw()["pixels"][:5, ..., None])


def test_frechet_distance_with_shipped_features_separates_degradations_from_the_floor():
    clf = jd.pretrained.digits_classifier()
    x_tr, y_tr = jd.pretrained.digits_data("train")
    x_te, _ = jd.pretrained.digits_data("test")
    f_te = np.asarray(clf.features(x_te))
    sub = np.random.default_rng(0).choice(len(x_tr), len(x_te), replace=False)
    floor = frechet_distance(np.asarray(clf.features(x_tr[sub])), f_te)  # real vs real at equal n
    noise = np.random.default_rng(1).normal(size=x_te.shape).astype(np.float32)
    paired = [frechet_distance(f_te, np.asarray(clf.features(x_te + s * noise))) for s in (0.1, 0.2, 0.4)]
    dropped = frechet_distance(np.asarray(clf.features(x_tr[y_tr < 5][: len(x_te)])), f_te)
    # noise is seen, more of it more (paired: same images, so no sampling floor)
    assert 0.0 < paired[0] < paired[1] < paired[2]
    # dropping half the classes is far above the real-vs-real floor (measured 1.36 vs 23.6)
    assert dropped > 10.0 * floor
    # features do not tell "train" from "test": the floor is that of two disjoint "train" subsets
    perm = np.random.default_rng(2).permutation(len(x_tr))
    f_tr = np.asarray(clf.features(x_tr))
    train_vs_train = frechet_distance(f_tr[perm[:599]], f_tr[perm[599:1198]])
    assert floor < 1.5 * train_vs_train


# ---------------------------------------------------------------- training script


def test_augment_shifts_by_whole_pixels_with_background_fill():
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, size=(64, 8, 8, 1)), jnp.float32)
    out = np.asarray(tc.augment(jax.random.key(0), x, 1))
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    seen = set()
    for i in range(64):
        matches = [(a, b) for a in range(3) for b in range(3) if np.array_equal(out[i], padded[i, a:a + 8, b:b + 8])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 9  # all nine shifts occur


def test_training_is_deterministic_and_learns():
    a = tc.train(200, seed=1)
    b = tc.train(200, seed=1)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    assert jax.tree.leaves(a)[0].dtype == jnp.float32
    assert tc.accuracy_on_test(a) > 0.93  # measured 0.967 after 200 of the recipe's 3000 steps
