"""Parity fixture for bccp's confident-learning port (src/baselines/confident.rs).

Builds a realistic noisy 10-class case (Fashion-MNIST-like confusable groups: t-shirt /
pullover / coat / shirt and sandal / sneaker / ankle boot), runs cleanlab's
``cleanlab.filter.find_label_issues`` for every ``filter_by`` on exactly the float32 values it
saves (and on the same values widened to float64), plus a small case with a class that has no
label, and writes ``tests/fixtures/cleanlab_parity.json``, which ``tests/cleanlab_parity.rs``
compares bccp against.

numpy's ``argsort`` is not stable: on x86-64 with AVX-512 it is Intel's x86-simd-sort, whose
sorting networks put exactly tied values in their own order, and cleanlab's cut-offs often fall
among ties (equal counts in a row of the confident joint give equal rounding residues). bccp
emulates that order (``numpy_argsort``), so the fixture must come from such a CPU; the script
checks it, records how many flags depend on the tie order (cleanlab rerun with a stable
``argsort``), and saves a few tie-heavy ``np.argsort`` results as well. ``--scan N`` reports how
often the masks depend on the tie order over N seeds.

Run from the repository root with the project's venv (``pip install cleanlab`` in it):

    assets/torch-venv/bin/python scripts/cleanlab_fixture.py

``--stress N [--seed S] --out FILE`` writes N varied cases instead (up to 3000 samples x 300
classes, saturated probabilities, missing classes; large, keep them out of the tree) for the
ignored Rust test:

    CLEANLAB_PARITY_STRESS=FILE cargo test --release --test cleanlab_parity -- --ignored
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

import cleanlab
from cleanlab.count import compute_confident_joint, get_confident_thresholds
from cleanlab.filter import find_label_issues

FILTERS = [
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
]
# Fashion-MNIST: 0 t-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt,
# 7 sneaker, 8 bag, 9 ankle boot.
GROUPS = [[0, 2, 4, 6], [5, 7, 9], [1], [3], [8]]


def group_of(c):
    return next(g for g in GROUPS if c in g)


def noisy_case(rng, n, k, noise=0.3, missing=None, sharpness=(0.7, 2.0)):
    """Softmax probabilities of noisy logits (float32 rows summing to 1) and noisy labels."""
    true = rng.integers(0, k, n)
    logits = rng.normal(0.0, 1.0, (n, k))
    for i, t in enumerate(true):
        logits[i, t] += rng.normal(3.5, 1.0)
        for c in group_of(t) if k == 10 else []:
            if c != t:
                logits[i, c] += rng.uniform(0.5, 2.5)
    labels = true.copy()
    flipped = rng.random(n) < noise
    for i in np.flatnonzero(flipped):
        group = [c for c in group_of(true[i]) if c != true[i]] if k == 10 else []
        if group and rng.random() < 0.6:
            labels[i] = rng.choice(group)  # asymmetric: a confusable class
        else:
            labels[i] = rng.choice([c for c in range(k) if c != true[i]])  # uniform
        if rng.random() < 0.5:  # the model partly memorised the wrong label
            logits[i, labels[i]] += rng.uniform(0.0, 2.0)
    if missing is not None:
        keep = labels != missing
        labels[~keep] = (missing + 1) % k
    logits *= rng.uniform(*sharpness, (n, 1))  # per-sample over/under-confidence
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    p = p / p.sum(axis=1, keepdims=True)  # float32 renormalisation
    assert p.dtype == np.float32
    return p, labels.astype(np.int64)


def masks(labels, p):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {f: find_label_issues(labels, p, filter_by=f, n_jobs=1) for f in FILTERS}


def stable_masks(labels, p):
    """cleanlab's masks with numpy's argsort made stable (ties by index, as bccp)."""
    original = np.argsort

    def stable(a, axis=-1, kind=None, order=None, **kw):
        return original(a, axis=axis, kind="stable", order=order, **kw)

    np.argsort = stable
    try:
        return masks(labels, p)
    finally:
        np.argsort = original


def tie_sensitive(labels, p):
    """{filter_by: samples whose flag depends on numpy's argsort tie order}."""
    a, b = masks(labels, p), stable_masks(labels, p)
    return {f: int(np.sum(a[f] != b[f])) for f in FILTERS if not np.array_equal(a[f], b[f])}


def argsort_cases(rng):
    """Tie-heavy integer-valued arrays and numpy's argsort of them (network, partition, and
    libstdc++ std::sort fallback paths; an already sorted array)."""
    arrays = []
    for dtype, lengths in (("f64", [4, 10, 37, 200, 300, 700]), ("f32", [10, 37, 300])):
        for n in lengths:
            arrays.append((dtype, rng.integers(0, max(2, n // 8), n)))
        arrays.append((dtype, np.r_[1, np.zeros(299, dtype=int)]))  # std::sort fallback
    arrays.append(("f64", np.repeat(np.arange(4), 80)))  # already sorted
    out = []
    for dtype, values in arrays:
        typed = values.astype(np.float64 if dtype == "f64" else np.float32)
        out.append(
            {
                "dtype": dtype,
                "values": [int(v) for v in values],
                "order": [int(i) for i in np.argsort(typed)],
            }
        )
    return out


def exact(x):
    """A float32 as the shortest decimal that reads back as the same float32, even through a
    float64 parse that is off by one unit in the last place (serde_json's default parser)."""
    x = np.float32(x)
    v = float(str(x))
    for w in (v, np.nextafter(v, -np.inf), np.nextafter(v, np.inf)):
        if np.float32(w) != x:
            v = float(x)  # the float32's exact value, always safe
            break
    return v


def case_json(labels, p, with_f64=False, diagnostics=False):
    out = {
        "n": int(p.shape[0]),
        "k": int(p.shape[1]),
        "pred_probs": [[exact(v) for v in row] for row in p],
        "labels": [int(v) for v in labels],
        "masks": {f: [bool(v) for v in m] for f, m in masks(labels, p).items()},
    }
    if with_f64:
        wide = masks(labels, p.astype(np.float64))
        out["masks_f64"] = {f: [bool(v) for v in m] for f, m in wide.items()}
    if diagnostics:
        out["thresholds"] = [float(v) for v in get_confident_thresholds(labels, p)]
        cj, off = compute_confident_joint(labels, p, return_indices_of_off_diagonals=True)
        out["confident_joint"] = cj.tolist()
        out["off_diagonal"] = [int(i) for i in off]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="tests/fixtures/cleanlab_parity.json")
    ap.add_argument("--scan", type=int, default=0, help="only report tie sensitivity over N seeds")
    ap.add_argument(
        "--stress",
        type=int,
        default=0,
        help="write N varied cases to --out instead (for the ignored test stress_cases)",
    )
    args = ap.parse_args()

    if args.stress:
        cases = []
        for seed in range(args.stress):
            seed = 10_000 * args.seed + seed  # --seed picks another batch
            rng = np.random.default_rng(seed)
            shape = [(400, 10), (2000, 3), (3000, 300), (150, 6), (60, 4), (1000, 40)][seed % 6]
            missing = shape[1] - 1 if seed % 7 == 3 else None
            sharp = (5.0, 30.0) if seed % 3 == 2 else (0.7, 2.0)  # saturated softmax: exact ties
            p, labels = noisy_case(rng, *shape, missing=missing, sharpness=sharp)
            c = case_json(labels, p, with_f64=True)
            c["seed"] = seed
            c["tie_order_dependent_flags"] = tie_sensitive(labels, p)
            cases.append(c)
        Path(args.out).write_text(json.dumps({"cases": cases}, separators=(",", ":")) + "\n")
        dependent = sum(bool(c["tie_order_dependent_flags"]) for c in cases)
        print(f"wrote {len(cases)} cases to {args.out}; {dependent} depend on the tie order")
        return

    if args.scan:
        hits = 0
        for seed in range(args.scan):
            p, labels = noisy_case(np.random.default_rng(seed), 400, 10)
            f32, f64 = tie_sensitive(labels, p), tie_sensitive(labels, p.astype(np.float64))
            hits += bool(f32 or f64)
            if f32 or f64:
                print(f"seed {seed}: samples that depend on the tie order: f32 {f32}, f64 {f64}")
        print(f"{hits} of {args.scan} seeds depend on numpy's argsort tie order")
        return

    features = np._core._multiarray_umath.__cpu_features__
    if not features.get("AVX512_SKX"):
        sys.exit("numpy sorts ties differently without AVX-512; run this on an AVX-512 x86-64 CPU")

    rng = np.random.default_rng(args.seed)
    p, labels = noisy_case(rng, 400, 10)
    p2, labels2 = noisy_case(rng, 120, 6, missing=5)
    assert 5 not in set(labels2.tolist())
    ties = {
        "main_f32": tie_sensitive(labels, p),
        "main_f64": tie_sensitive(labels, p.astype(np.float64)),
        "missing_class": tie_sensitive(labels2, p2),
    }

    fixture = {
        "cleanlab_version": cleanlab.__version__,
        "numpy_version": np.__version__,
        "seed": args.seed,
        **case_json(labels, p, with_f64=True, diagnostics=True),
        "missing_class_case": case_json(labels2, p2),
        "tie_order_dependent_flags": ties,
        "argsort_cases": argsort_cases(np.random.default_rng(args.seed + 1000)),
    }
    text = json.dumps(fixture, separators=(",", ":"))
    # The saved values are exactly the float32 values cleanlab saw.
    back = json.loads(text)
    assert np.array_equal(np.array(back["pred_probs"], dtype=np.float32), p)
    assert all(np.float32(v) == np.float32(np.nextafter(v, d)) for row in back["pred_probs"]
               for v in row for d in (-np.inf, np.inf))
    Path(args.out).write_text(text + "\n")
    counts = {f: int(sum(m)) for f, m in fixture["masks"].items()}
    print(f"wrote {args.out} ({len(text) / 1024:.1f} KiB), cleanlab {cleanlab.__version__}")
    print(f"flags per filter_by: {counts}")
    print(f"flags that depend on numpy's tie order: {ties}")


if __name__ == "__main__":
    main()
