"""bccp.find_label_issues against cleanlab: the masks recorded from cleanlab in the repository's
parity fixture (tests/fixtures/cleanlab_parity.json, scripts/cleanlab_fixture.py), and cleanlab
itself run live on new cases; cleanlab's signature and bccp's errors."""

import json
import platform

import numpy as np
import pytest

import bccp
from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "cleanlab_parity.json"
FILTERS = ["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"]


def fixture_cases():
    """(name, dtype, case, masks): the main case as float32 and widened to float64, and the
    case with a class no sample is labelled (float32)."""
    data = json.loads(FIXTURE.read_text())
    return [
        ("main", "float32", data, data["masks"]),
        ("main", "float64", data, data["masks_f64"]),
        ("missing_class", "float32", data["missing_class_case"], data["missing_class_case"]["masks"]),
    ]


def test_fixture_layout_is_known():
    data = json.loads(FIXTURE.read_text())
    assert {"pred_probs", "labels", "masks", "masks_f64", "missing_class_case"} <= set(data)


@pytest.mark.parametrize("name, dtype, case, masks", fixture_cases(), ids=["main-f32", "main-f64", "missing-class-f32"])
def test_masks_equal_cleanlabs_recorded_masks(name, dtype, case, masks):
    probs = np.array(case["pred_probs"], dtype=np.float32)
    if dtype == "float64":
        probs = probs.astype(np.float64)
    labels = np.array(case["labels"], dtype=np.int64)
    for filter_by in FILTERS:
        want = np.array(masks[filter_by], dtype=bool)
        got = bccp.find_label_issues(labels, probs, filter_by=filter_by)
        assert got.dtype == np.bool_ and got.shape == labels.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {dtype} {filter_by}")


def avx512() -> bool:
    try:
        return "avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def noisy_case(seed, n=300, k=6):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 3.0 * np.eye(k)[truth]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = truth.copy()
    flip = rng.random(n) < 0.2
    labels[flip] = (labels[flip] + rng.integers(1, k, flip.sum())) % k
    return labels, probs.astype(np.float32)


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not avx512(),
    reason="numpy orders exactly tied values CPU-dependently; the port follows x86-64 AVX-512",
)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("filter_by", FILTERS)
def test_masks_equal_live_cleanlab(seed, filter_by):
    from cleanlab import filter as cleanlab_filter
    labels, probs = noisy_case(seed)
    for p in (probs, probs.astype(np.float64)):
        want = cleanlab_filter.find_label_issues(labels, p, filter_by=filter_by)
        got = bccp.find_label_issues(labels, p, filter_by=filter_by)
        np.testing.assert_array_equal(got, want)
    assert got.any(), "a 20%-noise case must flag some samples"


def test_cleanlabs_keyword_arguments_at_their_defaults_are_accepted():
    labels, probs = noisy_case(5)
    base = bccp.find_label_issues(labels, probs)
    same = bccp.find_label_issues(
        labels=list(labels), pred_probs=probs, return_indices_ranked_by=None,
        filter_by="prune_by_noise_rate", multi_label=False, frac_noise=1.0,
        num_to_remove_per_class=None, min_examples_per_class=1, confident_joint=None,
        n_jobs=2, verbose=True, low_memory=False,
    )
    np.testing.assert_array_equal(base, same)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(filter_by="nope"), 'unknown filter_by "nope"; valid: prune_by_noise_rate, prune_by_class'),
        (dict(frac_noise=0.5), "frac_noise=0.5 is not supported by bccp's port of cleanlab; valid: 1.0"),
        (dict(return_indices_ranked_by="self_confidence"), "return_indices_ranked_by='self_confidence' is not supported"),
    ],
)
def test_unsupported_arguments_are_refused(kwargs, message):
    labels, probs = noisy_case(5)
    with pytest.raises(bccp.BccpInputError, match=None) as err:
        bccp.find_label_issues(labels, probs, **kwargs)
    assert message in str(err.value)


def test_bad_inputs_name_the_problem():
    labels, probs = noisy_case(5, n=20, k=3)
    with pytest.raises(bccp.BccpInputError, match="label 3 at index 0 is not a class index in 0..3"):
        bccp.find_label_issues(np.r_[3, labels[1:]], probs)
    with pytest.raises(bccp.BccpInputError, match=r"labels has 19 entries but pred_probs has 20 rows"):
        bccp.find_label_issues(labels[1:], probs)
    with pytest.raises(bccp.BccpInputError, match="pred_probs must be a float32 or float64 array"):
        bccp.find_label_issues(labels, probs.astype(np.float16))
    with pytest.raises(bccp.BccpInputError, match="labels must be integer class indices"):
        bccp.find_label_issues(labels.astype(float), probs)
    bad = probs.copy()
    bad[4, 1] = 1.5
    with pytest.raises(bccp.BccpInputError, match=r"pred_probs\[4\]\[1\] = 1.5 is not a probability"):
        bccp.find_label_issues(labels, bad)
