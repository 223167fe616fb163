"""Type stubs of the native module (python/src); the documented API is bccp/__init__.py."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__version__: str

class BccpError(Exception): ...
class BccpInputError(BccpError, ValueError): ...
class BccpRuntimeError(BccpError, RuntimeError): ...

class Embedder:
    name: str
    dim: int
    weights_sha256: str
    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        weights: Optional[str] = None,
        image_size: Optional[int] = None,
        batch_size: int = 32,
        device: str = "cpu",
        cache_dir: Optional[str] = None,
        offline: bool = False,
        skip_bad: bool = False,
    ) -> None: ...
    def embed_paths(self, paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]: ...
    def embed_arrays(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

class Run:
    classes: List[str]
    path: str
    @staticmethod
    def load(spec: str, runs_dir: str = "runs", device: str = "cpu", cache_dir: Optional[str] = None) -> "Run": ...
    def predict(
        self, paths: Optional[Sequence[str]] = None, images: Optional[Sequence[np.ndarray]] = None
    ) -> Dict[str, Any]: ...

def closest(
    queries: np.ndarray,
    candidates: np.ndarray,
    metric: str,
    k: int,
    query_labels: Optional[np.ndarray] = None,
    candidate_labels: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]: ...
def find_label_issues(labels: np.ndarray, pred_probs: np.ndarray, filter_by: str = ...) -> np.ndarray: ...
def cutoff_scores(
    features: np.ndarray,
    labels: np.ndarray,
    classes: int,
    replayed: Optional[np.ndarray] = None,
    settings_json: str = "{}",
) -> Dict[str, Any]: ...
def load_embeddings(path: str) -> Dict[str, Any]: ...
def image_list(path: str) -> Dict[str, Any]: ...
def replay_pairs(
    indices: np.ndarray, values: np.ndarray, metric: str, ratio: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def buffer_neighbours(n: int) -> int: ...
def shard_range(index: int, count: int, n: int) -> Tuple[int, int]: ...
def search_shard(
    queries: np.ndarray,
    candidates: np.ndarray,
    metric: str,
    k: int,
    shard: Tuple[int, int],
    candidate_rows: int,
    query_labels: Optional[np.ndarray] = None,
    candidate_labels: Optional[np.ndarray] = None,
    weights_sha256: str = "",
    candidates_list_sha256: str = "",
) -> Dict[str, Any]: ...
def merge_topk(parts: Sequence[Dict[str, Any]], names: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]: ...
def load_topk(path: str) -> Dict[str, Any]: ...
def save_topk(part: Dict[str, Any], path: str) -> None: ...
