"""The Python package against the command line on the same real images (Fashion-MNIST,
MobileNetV2 weights): `bccp embed` files read back and recomputed in Python, `bccp closest`
files recomputed in Python, `bccp predict` against TrainedRun.predict — bit for bit."""

import numpy as np
import pytest

import bccp
from conftest import cli, read_safetensors, write_bmp


@pytest.fixture(scope="module")
def cli_embeddings(fmnist_subset, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "emb.safetensors"
    cli("embed", "--data", fmnist_subset, "--weights", weights, "--image-size", "32",
        "--device", "cpu", "--no-cache", "--out", out)
    return out


def test_load_embeddings_reads_the_cli_file(cli_embeddings):
    tensors, meta = read_safetensors(cli_embeddings)
    got = bccp.load_embeddings(cli_embeddings)
    assert got["embeddings"].dtype == np.float32 and got["embeddings"].shape == (48, 1280)
    np.testing.assert_array_equal(got["embeddings"], tensors["embeddings"])
    np.testing.assert_array_equal(got["targets"], tensors["targets"])
    assert got["targets"].dtype == np.int64
    assert got["classes"] == ["bag", "coat", "sandal", "trouser"]
    assert got["model"] == meta["model"] == "mobilenet_v2"
    assert len(got["paths"]) == 48 and got["ids"] is None


def test_embed_paths_equals_bccp_embed(cli_embeddings, fmnist_subset, weights):
    ref = bccp.load_embeddings(cli_embeddings)
    paths = [fmnist_subset / p for p in ref["paths"]]
    emb = bccp.embed(paths, "mobilenet_v2", weights=weights, image_size=32)
    np.testing.assert_array_equal(emb, ref["embeddings"])
    # Through a cache folder: filled once, then read back, equal again.
    cache = fmnist_subset.parent / "cache"
    for _ in range(2):
        again = bccp.embed(paths[:5], weights=weights, image_size=32, cache_dir=cache)
        np.testing.assert_array_equal(again, ref["embeddings"][:5])
    assert any(cache.iterdir())


def test_embed_arrays_equals_their_files(tmp_path, weights):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(3, 40, 50, 3), dtype=np.uint8)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.bmp")
        write_bmp(paths[-1], img)
    from_files = bccp.embed(paths, weights=weights, image_size=32)
    from_batch = bccp.embed(images, weights=weights, image_size=32)
    from_list = bccp.embed(list(images), weights=weights, image_size=32, batch_size=2)
    assert from_batch.shape == (3, 1280) and from_batch.dtype == np.float32
    np.testing.assert_array_equal(from_batch, from_files)
    np.testing.assert_allclose(from_list, from_files, rtol=1e-5, atol=1e-5)
    grey = bccp.embed(images[0, :, :, 0], weights=weights, image_size=32)
    assert grey.shape == (1, 1280)


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_closest_equals_bccp_closest(cli_embeddings, tmp_path, metric):
    out = tmp_path / "nn.safetensors"
    cli("closest", "--queries", cli_embeddings, "--candidates", cli_embeddings,
        "--metric", metric, "--k", "3", "--other-class", "--device", "cpu", "--out", out)
    tensors, _ = read_safetensors(out)
    ref = bccp.load_embeddings(cli_embeddings)
    e, t = ref["embeddings"], ref["targets"]
    idx, val = bccp.closest(e, e, metric, 3, query_labels=t, candidate_labels=t)
    np.testing.assert_array_equal(idx, tensors["indices"])
    np.testing.assert_array_equal(val, tensors["values"])


def test_trained_run_predicts_as_bccp_predict(fmnist_subset, weights, tmp_path):
    days = tmp_path / "days"
    cli("prepare", "--source", fmnist_subset, "--out", days)
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    cli("train", "-d", days, "--image-size", "32", "--epochs", "2", "--weights", weights,
        "--device", "cpu", "--runs-dir", runs, "--cache-dir", cache, "--model-name", "m")
    images = sorted(fmnist_subset.glob("*/*.png"))[::6]
    printed = cli("predict", "--model", "m", "--runs-dir", runs, "--cache-dir", cache,
                  *images).stdout.strip().splitlines()
    run = bccp.TrainedRun.load("m", runs, cache_dir=cache)
    assert run.classes == ["bag", "coat", "sandal", "trouser"]
    got = run.predict(images)
    assert got["target"].dtype == np.int64 and got["probabilities"].shape == (len(images), 4)
    np.testing.assert_allclose(got["probabilities"].sum(1), 1.0, rtol=1e-5)
    for line, cls, target, probs in zip(printed, got["class"], got["target"], got["probabilities"]):
        path, name, p = line.split("\t")
        assert name == cls == run.classes[target]
        assert p == f"{probs[target]:.3f}"
    # The same refusals as the command line, word for word.
    for spec in ["nope", "m@@x", "m:7"]:
        with pytest.raises(bccp.BccpInputError) as err:
            bccp.TrainedRun.load(spec, runs)
        printed = cli("predict", "--model", spec, "--runs-dir", runs, images[0], ok=False)
        assert printed.returncode != 0 and str(err.value) in printed.stderr, (err.value, printed.stderr)
    assert "no registered run named nope in" in str(
        pytest.raises(bccp.BccpInputError, bccp.TrainedRun.load, "nope", runs).value
    )


def test_embed_errors_carry_the_library_messages(tmp_path, weights):
    with pytest.raises(bccp.BccpInputError, match='unknown backbone "nope"; valid:'):
        bccp.embed(np.zeros((8, 8), np.uint8), "nope")
    with pytest.raises(bccp.BccpInputError, match="images\\[0\\] has shape \\[8, 8, 2\\]"):
        bccp.embed(np.zeros((8, 8, 2), np.uint8), weights=weights)
    with pytest.raises(bccp.BccpInputError, match="images\\[0\\] must be uint8 pixels, found dtype float64"):
        bccp.embed(np.zeros((8, 8)), weights=weights)
    with pytest.raises(bccp.BccpInputError, match="image size 8 is too small; 32 or more"):
        bccp.embed(np.zeros((8, 8), np.uint8), weights=weights, image_size=8)
    missing = tmp_path / "missing.png"
    with pytest.raises(bccp.BccpError, match="missing.png"):
        bccp.embed([missing], weights=weights, image_size=32)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = tmp_path / "good.bmp"
    write_bmp(good, np.full((40, 40, 3), 200, np.uint8))
    emb, kept = bccp.embed([bad, good], weights=weights, image_size=32, skip_bad=True)
    assert emb.shape == (1, 1280) and kept.tolist() == [1]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "predicted_neq_given"])
def test_find_label_issues_equals_bccp_label_issues(tmp_path, dtype, filter_by):
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 5, 200)
    logits = rng.normal(size=(200, 5)) + 2.5 * np.eye(5)[truth]
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(dtype)
    labels = np.where(rng.random(200) < 0.2, (truth + 1) % 5, truth)
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "l.npy", labels)
    cli("label-issues", "--pred-probs", tmp_path / "p.npy", "--labels", tmp_path / "l.npy",
        "--filter-by", filter_by, "--out", tmp_path / "issues.npy")
    want = np.load(tmp_path / "issues.npy")
    got = bccp.find_label_issues(labels, probs, filter_by=filter_by)
    assert want.dtype == got.dtype == np.bool_ and want.any()
    np.testing.assert_array_equal(got, want)
