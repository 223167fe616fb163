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


def test_parts_interoperate_with_the_cli(tmp_path):
    """CLI parts (`closest --candidates-shard`) merge in Python, Python parts merge with
    `bccp merge-topk`, and both equal the unsharded search."""
    from conftest import cli, read_safetensors

    rng = np.random.default_rng(8)
    e = np.round(rng.normal(size=(40, 5)), 1).astype(np.float32)
    t = rng.integers(0, 3, 40)
    # An embedding file as `bccp embed` writes it (the tensors the CLI reads).
    f = tmp_path / "e.safetensors"
    header = {
        "embeddings": {"dtype": "F32", "shape": [40, 5], "data_offsets": [0, e.nbytes]},
        "targets": {"dtype": "I64", "shape": [40], "data_offsets": [e.nbytes, e.nbytes + t.nbytes]},
    }
    import json
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(len(h).to_bytes(8, "little") + h + e.tobytes() + t.astype(np.int64).tobytes())
    want_i, want_v = bccp.closest(e, e, "l1", 4, t, t)
    files = []
    for j in range(3):
        files.append(tmp_path / f"part{j}.safetensors")
        cli("closest", "--queries", f, "--candidates", f, "--metric", "l1", "--k", "4",
            "--other-class", "--candidates-shard", f"{j}/3", "--device", "cpu", "--out", files[-1])
    got_i, got_v = bccp.merge_topk([bccp.load_topk(p) for p in reversed(files)])
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)
    # Python parts, saved, merged by the CLI.
    mine = []
    for j, part in enumerate(parts_of(e, e, "l1", 4, 3, t, t)):
        mine.append(tmp_path / f"py{j}.safetensors")
        bccp.save_topk(part, mine[-1])
    merged = tmp_path / "merged.safetensors"
    cli("merge-topk", "--out", merged, *mine)
    tensors, _ = read_safetensors(merged)
    np.testing.assert_array_equal(tensors["indices"], want_i)
    np.testing.assert_array_equal(tensors["values"], want_v)
    # A Python part has the CLI part's queries fingerprint (same recipe).
    assert bccp.load_topk(mine[0])["context"]["queries_sha256"] == bccp.load_topk(files[0])["context"]["queries_sha256"]
