"""bccp on a Ray cluster: the cleansing pipeline as a Ray Data job.

:func:`run` does what ``bccp embed`` + ``bccp sample --sampling-mode buffer`` + the Bayesian
cut-off of ``bccp train --method bccp`` do in one process, spread over a cluster:

1. **embed** the candidate images (new, noisy data) and the reuse buffer (yesterday's clean
   data) with a pool of Ray Data actors (``map_batches``), each holding one loaded backbone
   (:class:`bccp.Embedder`; one actor per GPU with ``gpus_per_actor=1``);
2. **closest pairs** over the buffer: every buffer image's nearest other-class neighbours,
   searched shard by shard (``shards`` Ray tasks, each holding one part of the candidates,
   :func:`bccp.search_shard`) and merged exactly (:func:`bccp.merge_topk`: by distance, then
   global id), then the closest disjoint pairs fill the replay budget (:func:`bccp.replay_pairs`);
3. **cut-off**: the MC-dropout scores of the candidates plus the replayed images
   (:func:`bccp.cutoff_scores`, ``bccp train``'s defaults unless overridden);
4. **writes** ``replayed.jsonl`` (the lines ``bccp sample`` writes: index, path, target,
   partner, value), ``kept.jsonl`` (every training sample kept: source, index, path, label),
   ``embeddings.npz`` (both sets, in image-list order) and ``summary.json``.

Results equal the single-process ones bit for bit: embeddings do not depend on how images
are batched, the sharded search merges to the unsharded result exactly, and the rest is the
same library code (tested in ``python/tests/test_ray.py`` on a local cluster).

Needs ``pip install "ray[data]"``; call ``ray.init(...)`` first (or let Ray start a local one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from . import _bccp, Embedder, BccpInputError, cutoff_scores

try:  # Ray is optional: only this module needs it.
    import ray
except ImportError as e:  # pragma: no cover - exercised only without ray installed
    raise ImportError('bccp.ray needs Ray: pip install "ray[data]"') from e


class _EmbedActor:
    """One Ray Data actor: one backbone, loaded once, embedding batch after batch."""

    def __init__(self, options: Dict[str, Any]):
        self.embedder = Embedder(**options)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        emb, kept = self.embedder.embed_paths([str(f) for f in batch["file"]])
        return {"row": batch["row"][kept], "embedding": emb}


def embed_images(
    files,
    *,
    options: Dict[str, Any],
    actors: int = 2,
    gpus_per_actor: float = 0,
    batch_size: int = 32,
    dim: Optional[int] = None,
) -> np.ndarray:
    """Embeddings float32 [n, D] of image ``files`` (in their order) computed by ``actors``
    Ray Data actors in batches of ``batch_size``; ``options`` are :class:`bccp.Embedder`'s
    (``dim``, the embedding width, is looked up from them when not given)."""
    files = [os.fspath(f) for f in files]
    if not files:
        raise BccpInputError("no images to embed")
    if actors < 1:
        raise BccpInputError(f"actors {actors} must be 1 or more")
    if dim is None:
        dim = Embedder(**options).dim
    ds = ray.data.from_items([{"row": i, "file": f} for i, f in enumerate(files)])
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"options": options},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=gpus_per_actor,
    )
    out = np.empty((len(files), dim), dtype=np.float32)
    seen = np.zeros(len(files), dtype=bool)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out[batch["row"]] = batch["embedding"]
        seen[batch["row"]] = True
    if not seen.all():
        missing = [files[i] for i in np.flatnonzero(~seen)[:5]]
        raise BccpInputError(f"{(~seen).sum()} images were not embedded, e.g. {missing}")
    return out


@ray.remote
def _search_part(queries, targets, metric: str, k: int, index: int, count: int, weights_sha256: str):
    """The partial top-k of every query against shard index/count of the candidates (the
    queries themselves, as in the buffer's closest-pair search)."""
    start, stop = _bccp.shard_range(index, count, len(queries))
    return _bccp.search_shard(
        queries, queries[start:stop], metric, k, (index, count), len(queries),
        query_labels=targets, candidate_labels=targets[start:stop],
        weights_sha256=weights_sha256,
    )


def sharded_neighbours(embeddings, targets, metric: str, k: int, shards: int, weights_sha256: str = ""):
    """Every row's k nearest other-class rows of the same matrix, searched in ``shards`` Ray
    tasks (one part of the candidates each) and merged exactly: (indices, values) [n, k]."""
    if shards < 1:
        raise BccpInputError(f"shards {shards} must be 1 or more")
    e = ray.put(np.ascontiguousarray(embeddings, dtype=np.float32))
    t = ray.put(np.ascontiguousarray(targets, dtype=np.int64))
    parts = ray.get(
        [_search_part.remote(e, t, metric, k, i, shards, weights_sha256) for i in range(shards)]
    )
    return _bccp.merge_topk(parts, [f"shard {i}/{shards}" for i in range(shards)])


@ray.remote
def _cutoff(features, labels, classes, replayed, settings):
    return cutoff_scores(features, labels, classes=classes, replayed=replayed, **settings)


def _lines(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def run(
    candidates,
    buffer,
    out,
    *,
    backbone: str = "mobilenet_v2",
    weights=None,
    image_size: Optional[int] = None,
    device: str = "cpu",
    cache_dir=None,
    offline: bool = False,
    batch_size: int = 32,
    actors: int = 2,
    gpus_per_actor: float = 0,
    shards: int = 4,
    metric: str = "l2",
    ratio: float = 0.5,
    **cutoff_settings: Any,
) -> Dict[str, Any]:
    """Cleanses ``candidates`` (an image folder ``ROOT/<class>/<file>`` or a JSON Lines
    manifest) with closest-pair replay from ``buffer`` (the same) on the Ray cluster, and
    writes the outcome to the folder ``out`` (see the module's doc). ``metric``: ``l1``,
    ``l2`` or ``cosine``; ``ratio``: the share of the buffer to replay; ``cutoff_settings``:
    as :func:`bccp.cutoff_scores`. Returns the summary (also in ``out/summary.json``) plus the
    arrays: ``replayed`` (buffer indices), ``kept`` (training rows kept), ``flagged``,
    ``scores``."""
    cand = _bccp.image_list(os.fspath(candidates))
    buf = _bccp.image_list(os.fspath(buffer))
    if cand["classes"] != buf["classes"]:
        raise BccpInputError(
            f"candidates and buffer must have the same classes; found {cand['classes']} and {buf['classes']}"
        )
    options = dict(
        backbone=backbone,
        weights=None if weights is None else os.fspath(weights),
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        offline=offline,
    )
    probe = Embedder(**options)
    weights_sha256 = probe.weights_sha256
    embed = dict(options=options, actors=actors, gpus_per_actor=gpus_per_actor,
                 batch_size=batch_size, dim=probe.dim)
    cand_emb = embed_images(cand["files"], **embed)
    buf_emb = embed_images(buf["files"], **embed)
    k = _bccp.buffer_neighbours(len(buf["files"]))
    nn_idx, nn_val = sharded_neighbours(buf_emb, buf["targets"], metric, k, shards, weights_sha256)
    index, partner, value = _bccp.replay_pairs(nn_idx, nn_val, metric, ratio)
    features = np.concatenate([cand_emb, buf_emb[index]])
    labels = np.concatenate([cand["targets"], buf["targets"][index]])
    replayed_mask = np.r_[np.zeros(len(cand_emb), bool), np.ones(len(index), bool)]
    classes = len(cand["classes"])
    cut = ray.get(_cutoff.remote(features, labels, classes, replayed_mask, cutoff_settings))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _lines(out / "replayed.jsonl", (
        {"index": int(i), "partner": int(p), "path": buf["paths"][i],
         "target": int(buf["targets"][i]), "value": float(v)}
        for i, p, v in zip(index, partner, value)
    ))
    n_cand = len(cand_emb)

    def row(r: int) -> Dict[str, Any]:
        if r < n_cand:
            return {"source": "candidate", "index": r, "path": cand["paths"][r], "label": int(cut["labels"][r])}
        b = int(index[r - n_cand])
        return {"source": "replay", "index": b, "path": buf["paths"][b], "label": int(cut["labels"][r])}

    _lines(out / "kept.jsonl", (row(int(r)) for r in cut["kept"]))
    np.savez(out / "embeddings.npz", candidates=cand_emb, buffer=buf_emb,
             neighbours=nn_idx, distances=nn_val)
    summary = {
        "candidates": n_cand,
        "buffer": len(buf_emb),
        "replayed": int(len(index)),
        "kept": int(len(cut["kept"])),
        "removed": int(cut["removed"]),
        "relabelled": int(cut["relabelled"]),
        "metric": metric,
        "ratio": ratio,
        "shards": shards,
        "actors": actors,
        "backbone": backbone,
        "weights_sha256": weights_sha256,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "replayed_index": index, "kept_rows": cut["kept"],
            "flagged": cut["flagged"], "scores": cut["scores"]}
