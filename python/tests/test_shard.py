"""The sharded search from Python (the library's ShardSpec, search_shard, merge_topk): merged
parts equal the unsharded search bit for bit for 1, 3 and 7 shards, every metric, with and
without the other-class constraint, ties included, whatever the order of the parts; bad merges
are refused naming the part."""

import random

import numpy as np
import pytest

import bccp
from bccp import _bccp


def parts_of(q, c, metric, k, shards, ql=None, cl=None):
    out = []
    for i in range(shards):
        start, stop = _bccp.shard_range(i, shards, len(c))
        out.append(_bccp.search_shard(
            q, c[start:stop], metric, k, (i, shards), len(c),
            query_labels=ql, candidate_labels=None if cl is None else cl[start:stop],
        ))
    return out


def data(seed=0, nq=30, nc=50, d=6):
    rng = np.random.default_rng(seed)
    # Rounded values: many exact ties between candidates.
    q = np.round(rng.normal(size=(nq, d)), 1).astype(np.float32)
    c = np.round(rng.normal(size=(nc, d)), 1).astype(np.float32)
    c[10:20] = c[0]  # exact duplicates across shard boundaries
    return q, c, rng.integers(0, 3, nq), rng.integers(0, 3, nc)


def test_shard_ranges_cover_every_row_once():
    for n in (0, 1, 7, 50):
        for count in (1, 3, 7):
            rows = [r for i in range(count) for r in range(*_bccp.shard_range(i, count, n))]
            assert rows == list(range(n))


@pytest.mark.parametrize("shards", [1, 3, 7])
@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
@pytest.mark.parametrize("other_class", [False, True])
def test_merged_equals_unsharded(shards, metric, other_class):
    q, c, ql, cl = data(shards)
    labels = (ql, cl) if other_class else (None, None)
    want_i, want_v = bccp.closest(q, c, metric, 9, *labels)
    parts = parts_of(q, c, metric, 9, shards, *labels)
    random.Random(shards).shuffle(parts)
    got_i, got_v = bccp.merge_topk(parts)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)


def test_small_shards_pad_with_none():
    q, c, _, _ = data(1, nc=5)
    part = parts_of(q, c, "l2", 4, 5)[0]
    assert part["indices"].shape == (30, 4)
    assert (part["indices"][:, 1:] == -1).all() and np.isinf(part["values"][:, 1:]).all()


def test_bad_merges_name_the_part():
    q, c, _, _ = data(2)
    parts = parts_of(q, c, "l2", 3, 3)
    with pytest.raises(bccp.BccpInputError, match=r"shard\(s\) 2 of 3 missing"):
        bccp.merge_topk(parts[:2])
    with pytest.raises(bccp.BccpInputError, match="part 0 and part 2 are both shard 0/3"):
        bccp.merge_topk([parts[0], parts[1], parts[0]])
    other = parts_of(q[:5], c, "l2", 3, 3)
    with pytest.raises(bccp.BccpInputError, match="b has"):
        bccp.merge_topk([parts[0], other[1], parts[2]], names=["a", "b", "c"])
    with pytest.raises(bccp.BccpInputError, match="invalid shard"):
        bccp.shard_range(3, 3, 10)
    with pytest.raises(bccp.BccpInputError, match=r"candidates has 50 rows, but shard 0/3 of 50 rows is rows 0..16"):
        bccp.search_shard(q, c, "l2", 3, (0, 3), 50)
