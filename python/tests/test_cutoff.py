"""bccp.cutoff_scores: the Bayesian cut-off of `bccp train --method bccp` on features the caller
brings — it finds flipped labels, is deterministic per seed, honours its settings, and refuses
bad settings with the command line's messages."""

import numpy as np
import pytest

import bccp


def noisy_features(seed=0, n=400, k=4, f=16, noise=0.15):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    centres = rng.normal(scale=3.0, size=(k, f))
    x = (centres[truth] + rng.normal(size=(n, f))).astype(np.float32)
    labels = truth.copy()
    flip = rng.random(n) < noise
    labels[flip] = (labels[flip] + rng.integers(1, k, flip.sum())) % k
    return x, labels, flip


def test_flags_flipped_labels_and_reports_consistently():
    x, labels, flipped = noisy_features()
    out = bccp.cutoff_scores(x, labels, classes=4, seed=3, cutoff_action="drop")
    n = len(labels)
    assert out["scores"].dtype == np.float32 and out["scores"].shape == (n,)
    assert out["flagged"].dtype == np.bool_ and out["flagged"].shape == (n,)
    assert out["kept"].dtype == np.int64 and out["labels"].dtype == np.int64
    assert out["removed"] == int(out["flagged"].sum())
    np.testing.assert_array_equal(np.sort(out["kept"]), np.flatnonzero(~out["flagged"]))
    # Well separated classes, 15% flipped: the cut holds several times the flipped share, and
    # nearly every flip is cut.
    precision = flipped[out["flagged"]].mean()
    recall = out["flagged"][flipped].mean()
    assert precision > 0.5 and recall > 0.9, (precision, recall)


def test_same_seed_same_result_other_seed_other_scores():
    x, labels, _ = noisy_features(1)
    a = bccp.cutoff_scores(x, labels, seed=5, cutoff_score="label_prob_mean", cutoff_folds=1)
    b = bccp.cutoff_scores(x, labels, seed=5, cutoff_score="label_prob_mean", cutoff_folds=1)
    c = bccp.cutoff_scores(x, labels, seed=6, cutoff_score="label_prob_mean", cutoff_folds=1)
    np.testing.assert_array_equal(a["scores"], b["scores"])
    np.testing.assert_array_equal(a["flagged"], b["flagged"])
    assert not np.array_equal(a["scores"], c["scores"])


def test_percentile_and_relabel_settings_apply():
    x, labels, _ = noisy_features(2)
    out = bccp.cutoff_scores(
        x, labels, cutoff_score="logit_sum_var", cutoff_percentile=90, cutoff_scope="global",
        cutoff_folds=1, cutoff_trust_replay=False, cutoff_action="drop",
    )
    assert out["removed"] == round(len(labels) * 0.10)
    relabel = bccp.cutoff_scores(x, labels, seed=1)  # relabel: the default
    assert relabel["relabelled"] > 0 and relabel["removed"] == 0
    # Every cut sample takes the MC-mean prediction (which may equal its label); nothing else
    # changes.
    changed = relabel["labels"] != labels
    assert 0 < changed.sum() <= relabel["relabelled"] == relabel["flagged"].sum()
    assert relabel["flagged"][changed].all()


def test_trusted_replayed_rows_are_never_cut():
    x, labels, _ = noisy_features(3)
    replayed = np.zeros(len(labels), bool)
    replayed[:200] = True
    out = bccp.cutoff_scores(
        x, labels, replayed=replayed, cutoff_trust_replay=True, cutoff_action="drop"
    )
    assert out["removed"] > 0 and not out["flagged"][:200].any()
    # The default relabels what it cuts, and never a trusted row.
    default = bccp.cutoff_scores(x, labels, replayed=replayed)
    assert default["removed"] == 0 and default["relabelled"] == default["flagged"].sum() > 0
    np.testing.assert_array_equal(default["labels"][:200], labels[:200])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(mc_passes=1), "mc_passes 1 must be 2 or more (variances need two passes)"),
        (dict(cutoff_scroe="bald"), 'unknown cut-off setting "cutoff_scroe"; valid: cutoff_score,'),
        (dict(cutoff_score="nope"), "bad cut-off setting: unknown variant `nope`"),
        (dict(cutoff_folds=500), "cutoff_folds 500 is too large; 100 or less"),
        (dict(lr_decay=2.0), "lr_decay 2 must lie in (0, 1]"),
    ],
)
def test_bad_settings_are_refused_with_the_cli_message(settings, message):
    x, labels, _ = noisy_features(4, n=60)
    with pytest.raises(bccp.BccpInputError) as err:
        bccp.cutoff_scores(x, labels, **settings)
    assert message in str(err.value)


def test_bad_arrays_are_refused():
    x, labels, _ = noisy_features(4, n=60)
    with pytest.raises(bccp.BccpInputError, match="labels: label 9 at index 0 is not a class index in 0..4"):
        bccp.cutoff_scores(x, np.r_[9, labels[1:]], classes=4)
    with pytest.raises(bccp.BccpInputError, match="labels has 59 entries for 60 rows"):
        bccp.cutoff_scores(x, labels[1:])
    bad = x.copy()
    bad[7, 2] = np.inf
    with pytest.raises(bccp.BccpInputError, match="features row 7 holds a NaN or infinite value"):
        bccp.cutoff_scores(bad, labels)
    with pytest.raises(bccp.BccpInputError, match="cutoff_folds 80 exceeds the 60 training samples"):
        bccp.cutoff_scores(x, labels, cutoff_folds=80)
