"""bccp.ray on a local Ray cluster (2 CPUs) against the single-process command line on real
images (Fashion-MNIST, MobileNetV2): the same embeddings (`bccp embed`), the same merged
neighbours (`bccp closest`), the same replayed images (`bccp sample --sampling-mode buffer`)
and the same cut-off (the library's, in one process) — bit for bit."""

import json
import shutil

import numpy as np
import pytest

import ray

import bccp
import bccp.ray
from conftest import asset, cli


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    """Another real subset (images 12..23 of each class), three files filed under a wrong class."""
    source = asset("fashion-mnist/train")
    root = tmp_path_factory.mktemp("cand") / "images"
    classes = ["bag", "coat", "sandal", "trouser"]
    for c in classes:
        (root / c).mkdir(parents=True)
    for ci, c in enumerate(classes):
        for j, f in enumerate(sorted((source / c).glob("*.png"))[12:24]):
            wrong = j < 1 and ci < 3
            shutil.copyfile(f, root / (classes[ci + 1] if wrong else c) / f.name)
    return root


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("metric, shards", [("l2", 3), ("cosine", 7)])
def test_ray_pipeline_equals_single_process(cluster, candidates, fmnist_subset, weights, tmp_path, metric, shards):
    out = tmp_path / "ray"
    got = bccp.ray.run(
        candidates, fmnist_subset, out, weights=weights, image_size=32, actors=2,
        batch_size=7, shards=shards, metric=metric, ratio=0.5, cutoff_action="drop",
    )
    # 1. Embeddings: bccp embed, one process.
    files = {}
    for name, data in [("cand", candidates), ("buf", fmnist_subset)]:
        files[name] = tmp_path / f"{name}.safetensors"
        cli("embed", "--data", data, "--weights", weights, "--image-size", "32", "--device", "cpu",
            "--no-cache", "--out", files[name])
    ref_c, ref_b = bccp.load_embeddings(files["cand"]), bccp.load_embeddings(files["buf"])
    npz = np.load(out / "embeddings.npz")
    np.testing.assert_array_equal(npz["candidates"], ref_c["embeddings"])
    np.testing.assert_array_equal(npz["buffer"], ref_b["embeddings"])
    # 2. The merged sharded neighbours: bccp closest over the whole buffer.
    nn = tmp_path / "nn.safetensors"
    cli("closest", "--queries", files["buf"], "--candidates", files["buf"], "--metric", metric,
        "--k", "8", "--other-class", "--device", "cpu", "--out", nn)
    from conftest import read_safetensors
    t, _ = read_safetensors(nn)
    np.testing.assert_array_equal(npz["neighbours"], t["indices"])
    np.testing.assert_array_equal(npz["distances"], t["values"])
    # 3. Replay: bccp sample, line for line.
    sel = tmp_path / "sel.jsonl"
    cli("sample", "--buffer", files["buf"], "--sampling", f"{metric}_similarity" if metric == "cosine" else f"{metric}_norm",
        "--ratio", "0.5", "--sampling-mode", "buffer", "--out", sel)
    want, have = read_lines(sel), read_lines(out / "replayed.jsonl")
    assert len(have) == len(want) == got["replayed"] == 24
    for w, h in zip(want, have):
        assert (w["index"], w["partner"], w["path"], w["target"]) == (h["index"], h["partner"], h["path"], h["target"])
        assert np.float32(w["value"]) == np.float32(h["value"])
    # 4. Cut-off: the library in one process on the same rows.
    index = np.array([w["index"] for w in want])
    one = bccp.cutoff_scores(
        np.concatenate([ref_c["embeddings"], ref_b["embeddings"][index]]),
        np.concatenate([ref_c["targets"], ref_b["targets"][index]]),
        classes=4, replayed=np.r_[np.zeros(48, bool), np.ones(len(index), bool)],
        cutoff_action="drop",
    )
    np.testing.assert_array_equal(got["kept_rows"], one["kept"])
    np.testing.assert_array_equal(got["scores"], one["scores"])
    kept = read_lines(out / "kept.jsonl")
    assert len(kept) == len(one["kept"]) == got["kept"]
    assert got["removed"] == one["removed"] > 0
    assert {k["source"] for k in kept} == {"candidate", "replay"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replayed"] == 24 and summary["shards"] == shards


def test_ray_refuses_mismatched_classes(cluster, fmnist_subset, weights, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fmnist_subset / "bag", other / "bag")
    shutil.copytree(fmnist_subset / "coat", other / "coat")
    with pytest.raises(bccp.BccpInputError, match="candidates and buffer must have the same classes"):
        bccp.ray.run(other, fmnist_subset, tmp_path / "out", weights=weights, image_size=32)
