"""bccp from Python: the same Rust engine as the ``bccp`` command line (pyo3 + maturin).

- :func:`embed` — a backbone's embeddings of image files or uint8 pixel arrays (:class:`Embedder`
  keeps one backbone loaded across calls);
- :func:`closest` — the exact k-nearest search (L1, L2, cosine), optionally other-class only;
- :func:`cutoff_scores` — the Bayesian MC-dropout cut-off of ``bccp train --method bccp``;
- :func:`find_label_issues` — cleanlab's ``filter.find_label_issues``, same signature and masks;
- :class:`TrainedRun` — a registered run loaded for prediction;
- :func:`load_embeddings` — an embedding file written by ``bccp embed``; :func:`image_list` —
  the images of a folder or manifest in ``bccp embed``'s order;
- :func:`shard_range`, :func:`search_shard`, :func:`merge_topk` — the sharded exact search
  (parts with global ids, merged by distance then id), :func:`load_topk` / :func:`save_topk` —
  parts as the files of ``bccp closest --candidates-shard`` / ``bccp merge-topk``;
  :func:`replay_pairs` — closest-pair
  replay from merged neighbours (``bccp sample --sampling-mode buffer``);
- :mod:`bccp.ray` — the whole pipeline on a Ray cluster.

Arrays go in as numpy arrays (borrowed without a copy when they already are C-contiguous of
the right dtype) and results come back as numpy arrays. Every failure raises a
:class:`BccpError` with the message the command line prints: :class:`BccpInputError` (also a
``ValueError``) for bad input, :class:`BccpRuntimeError` (also a ``RuntimeError``) otherwise.
The GIL is released while the engine computes, so threads (and Ray actors) run in parallel.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import _bccp
from ._bccp import (  # noqa: F401  (re-exported)
    BccpError,
    BccpInputError,
    BccpRuntimeError,
    Embedder,
    __version__,
    buffer_neighbours,
    image_list,
    load_embeddings,
    load_topk,
    merge_topk,
    replay_pairs,
    save_topk,
    search_shard,
    shard_range,
)

__all__ = [
    "BccpError",
    "BccpInputError",
    "BccpRuntimeError",
    "Embedder",
    "TrainedRun",
    "buffer_neighbours",
    "closest",
    "cutoff_scores",
    "embed",
    "find_label_issues",
    "image_list",
    "load_embeddings",
    "load_topk",
    "merge_topk",
    "replay_pairs",
    "save_topk",
    "search_shard",
    "shard_range",
]

PathLike = Union[str, "os.PathLike[str]"]


def _matrix(x: Any, what: str) -> np.ndarray:
    """A 2-D float32 C-contiguous array (no copy when it already is one)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise BccpInputError(f"{what} must hold real numbers, found dtype {a.dtype}")
    if a.ndim != 2:
        raise BccpInputError(f"{what} must be a 2-D array [rows, dim], found shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _labels(x: Any, what: str, rows: Optional[int] = None) -> np.ndarray:
    """A 1-D int64 array of class indices (no copy when it already is one)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise BccpInputError(f"{what} must be integer class indices, found dtype {a.dtype}")
    if a.ndim != 1:
        raise BccpInputError(f"{what} must be a 1-D array, found shape {a.shape}")
    if rows is not None and a.shape[0] != rows:
        raise BccpInputError(f"{what} has {a.shape[0]} entries for {rows} rows; they must match")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise BccpInputError(f"{what} holds a value too large for a class index")
    return np.ascontiguousarray(a, dtype=np.int64)


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def embed(
    images: Union[PathLike, Sequence[PathLike], np.ndarray, Sequence[np.ndarray]],
    backbone: str = "mobilenet_v2",
    *,
    weights: Optional[PathLike] = None,
    image_size: Optional[int] = None,
    batch_size: int = 32,
    device: str = "cpu",
    cache_dir: Optional[PathLike] = None,
    offline: bool = False,
    skip_bad: bool = False,
):
    """Embeddings (float32 [n, D]) of images with a backbone of the zoo (``bccp models``).

    ``images``: image file paths (one or a list; decoded, resized and normalised exactly as
    ``bccp embed`` does, through its embedding cache when ``cache_dir`` is given), or uint8
    pixel arrays — one [H, W] / [H, W, 1] / [H, W, 3] / [H, W, 4] image, a list of them, or a
    batch [n, H, W(, C)] — which give the embeddings their decoded files would.
    ``weights``: a local ``.safetensors`` file instead of the zoo's; ``image_size``: the input
    size (e.g. 64 for 28×28 images); ``device``: ``cpu``, ``cuda[:N]``, ``metal`` or ``auto``.
    With ``skip_bad`` (paths only) unreadable files are skipped and ``(embeddings, kept)`` is
    returned, ``kept`` the int64 positions of the files embedded.
    """
    if _is_path(images):
        images = [images]
    if isinstance(images, np.ndarray):
        arrays = list(images) if images.ndim == 4 else [images]
        paths = None
    else:
        items = list(images)
        paths = [os.fspath(p) for p in items] if items and all(map(_is_path, items)) else None
        arrays = None if paths is not None else [np.asarray(a) for a in items]
    if arrays is not None:
        if not arrays:
            raise BccpInputError("images is empty: give at least one image or path")
        if skip_bad or cache_dir is not None:
            raise BccpInputError("skip_bad and cache_dir apply to image files, not to pixel arrays")
        _check_pixels(arrays)
    embedder = Embedder(
        backbone,
        weights=None if weights is None else os.fspath(weights),
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        offline=offline,
        skip_bad=skip_bad,
    )
    if arrays is not None:
        return embedder.embed_arrays(arrays)
    emb, kept = embedder.embed_paths(paths)
    return (emb, kept) if skip_bad else emb


def _check_pixels(arrays: Sequence[np.ndarray]) -> None:
    for i, a in enumerate(arrays):
        if a.dtype != np.uint8:
            raise BccpInputError(f"images[{i}] must be uint8 pixels, found dtype {a.dtype}")


def closest(
    queries: Any,
    candidates: Any,
    metric: str = "l2",
    k: int = 1,
    query_labels: Any = None,
    candidate_labels: Any = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The k best candidates of every query, as ``bccp closest`` finds them (exact).

    Returns ``(indices, values)``: int64 and float32 arrays [Q, k], best first (smallest
    ``l1`` / ``l2`` distance, largest ``cosine`` similarity), ties to the lower index; values
    are the exact f32 distances. With ``query_labels`` and ``candidate_labels`` (int [Q] and
    [N]) only candidates of another class count; slots left empty hold index -1 and value
    +inf (l1, l2) or -inf (cosine).
    """
    q = _matrix(queries, "queries")
    c = _matrix(candidates, "candidates")
    ql = None if query_labels is None else _labels(query_labels, "query_labels", q.shape[0])
    cl = None if candidate_labels is None else _labels(candidate_labels, "candidate_labels", c.shape[0])
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise BccpInputError(f"k must be a positive integer, found {k!r}")
    return _bccp.closest(q, c, metric, int(k), ql, cl)


def cutoff_scores(
    features: Any,
    labels: Any,
    *,
    classes: Optional[int] = None,
    replayed: Any = None,
    **settings: Any,
) -> Dict[str, Any]:
    """The Bayesian cut-off of ``bccp train --method bccp`` on your own features.

    ``features`` float [n, F] (e.g. from :func:`embed`), ``labels`` int [n] in
    ``0..classes`` (default: the largest label + 1), ``replayed`` bool [n] marking rows
    replayed from the reuse buffer. ``settings`` override ``bccp train``'s defaults, named as
    its flags without dashes: ``cutoff_score``, ``cutoff_percentile`` (a number, ``"auto"``
    or ``"joint"``), ``cutoff_scope``, ``cutoff_folds``, ``cutoff_rounds``, ``cutoff_action``,
    ``relabel_confidence``, ``cutoff_trust_replay``, ``mc_passes``, ``epochs``,
    ``batch_size``, ``lr``, ``lr_decay``, ``seed``.

    Returns a dict: ``scores`` float32 [n] (higher = more likely mislabelled), ``flagged``
    bool [n] (cut), ``kept`` int64 (indices trained on), ``labels`` int64 [n] (after any
    relabelling), ``removed`` and ``relabelled`` counts.
    """
    x = _matrix(features, "features")
    y = _labels(labels, "labels", x.shape[0])
    if classes is None:
        classes = int(y.max()) + 1 if y.size else 0
        classes = max(classes, 2)
    r = None
    if replayed is not None:
        r = np.asarray(replayed)
        if r.dtype != np.bool_ or r.ndim != 1:
            raise BccpInputError(f"replayed must be a 1-D bool array, found {r.dtype} {r.shape}")
        r = np.ascontiguousarray(r)
    return _bccp.cutoff_scores(x, y, int(classes), r, json.dumps(settings))


# cleanlab's defaults for the arguments bccp's port supports only at their default.
_CLEANLAB_DEFAULTS = {
    "return_indices_ranked_by": None,
    "multi_label": False,
    "frac_noise": 1.0,
    "num_to_remove_per_class": None,
    "min_examples_per_class": 1,
    "confident_joint": None,
    "low_memory": False,
}


def find_label_issues(
    labels: Any,
    pred_probs: Any,
    *,
    return_indices_ranked_by: Optional[str] = None,
    filter_by: str = "prune_by_noise_rate",
    multi_label: bool = False,
    frac_noise: float = 1.0,
    num_to_remove_per_class: Optional[Sequence[int]] = None,
    min_examples_per_class: int = 1,
    confident_joint: Any = None,
    n_jobs: Optional[int] = None,
    verbose: bool = False,
    low_memory: bool = False,
) -> np.ndarray:
    """cleanlab's ``cleanlab.filter.find_label_issues``: a bool mask [n], True where the given
    label is likely wrong — the same mask, sample for sample (bccp's port of cleanlab 2.9).

    ``labels`` int [n], ``pred_probs`` float32 or float64 [n, classes] (out-of-sample
    probabilities, computed in their own precision as numpy does). ``filter_by``:
    ``prune_by_noise_rate`` (default), ``prune_by_class``, ``both``, ``confident_learning``,
    ``predicted_neq_given``. The other arguments keep cleanlab's signature; the port supports
    them at their defaults only (``n_jobs`` and ``verbose`` change nothing and are ignored).
    """
    given = dict(
        return_indices_ranked_by=return_indices_ranked_by,
        multi_label=multi_label,
        frac_noise=frac_noise,
        num_to_remove_per_class=num_to_remove_per_class,
        min_examples_per_class=min_examples_per_class,
        confident_joint=confident_joint,
        low_memory=low_memory,
    )
    for name, default in _CLEANLAB_DEFAULTS.items():
        value = given[name]
        if value is default or (value is not None and default is not None and value == default):
            continue
        raise BccpInputError(
            f"find_label_issues: {name}={value!r} is not supported by bccp's port of cleanlab; "
            f"valid: {default!r} (cleanlab's default)"
        )
    y = _labels(labels, "labels")
    p = np.asarray(pred_probs)
    if p.dtype not in (np.float32, np.float64):
        raise BccpInputError(
            f"pred_probs must be a float32 or float64 array [samples, classes], found dtype {p.dtype}"
        )
    if p.ndim != 2:
        raise BccpInputError(f"pred_probs must be 2-D [samples, classes], found shape {p.shape}")
    return _bccp.find_label_issues(y, np.ascontiguousarray(p), filter_by)


class TrainedRun:
    """A registered run (``runs/<name>/<version>/``) loaded for prediction, checked file by
    file as ``bccp predict`` checks it: ``TrainedRun.load("NAME@champion").predict(images)``."""

    def __init__(self, run: "_bccp.Run"):
        self._run = run

    @classmethod
    def load(
        cls,
        spec: str,
        runs_dir: PathLike = "runs",
        *,
        device: str = "cpu",
        cache_dir: Optional[PathLike] = None,
    ) -> "TrainedRun":
        """Loads ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` from the registry ``runs_dir``."""
        return cls(
            _bccp.Run.load(
                spec,
                os.fspath(runs_dir),
                device,
                None if cache_dir is None else os.fspath(cache_dir),
            )
        )

    @property
    def classes(self) -> list:
        """The class names, in the head's order."""
        return self._run.classes

    @property
    def path(self) -> str:
        """The run's folder."""
        return os.fspath(self._run.path)

    def predict(self, images: Any) -> Dict[str, Any]:
        """Predicts image files or uint8 pixel arrays (as :func:`embed` takes them): a dict
        with ``target`` int64 [n], ``class`` (names) and ``probabilities`` float32 [n, C]."""
        if _is_path(images):
            images = [images]
        if isinstance(images, np.ndarray):
            arrays = list(images) if images.ndim == 4 else [images]
        else:
            items = list(images)
            if items and all(_is_path(p) for p in items):
                return self._run.predict(paths=[os.fspath(p) for p in items])
            arrays = [np.asarray(a) for a in items]
        _check_pixels(arrays)
        return self._run.predict(images=arrays)

    def __repr__(self) -> str:
        return f"bccp.TrainedRun({self.path!r})"
