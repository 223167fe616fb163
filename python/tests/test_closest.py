"""bccp.closest against a float64 brute force, its numpy dtypes/shapes, its errors (the
library's messages) and the GIL being released while it searches."""

import threading
import time

import numpy as np
import pytest

import bccp


def brute(q, c, metric, k, ql=None, cl=None):
    q64, c64 = q.astype(np.float64), c.astype(np.float64)
    if metric == "l1":
        d = np.abs(q64[:, None, :] - c64[None, :, :]).sum(-1)
    elif metric == "l2":
        d = np.sqrt(((q64[:, None, :] - c64[None, :, :]) ** 2).sum(-1))
    else:
        qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        cn = c64 / np.linalg.norm(c64, axis=1, keepdims=True)
        d = -(qn @ cn.T)
    if ql is not None:
        d = np.where(ql[:, None] == cl[None, :], np.inf, d)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, 1)


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
@pytest.mark.parametrize("other_class", [False, True])
def test_matches_brute_force(metric, other_class):
    rng = np.random.default_rng(7)
    q = rng.normal(size=(37, 24)).astype(np.float32)
    c = rng.normal(size=(150, 24)).astype(np.float32)
    ql = rng.integers(0, 4, 37) if other_class else None
    cl = rng.integers(0, 4, 150) if other_class else None
    idx, val = bccp.closest(q, c, metric, 5, ql, cl)
    assert idx.dtype == np.int64 and val.dtype == np.float32
    assert idx.shape == (37, 5) and val.shape == (37, 5)
    want, dist = brute(q, c, metric, 5, ql, cl)
    np.testing.assert_array_equal(idx, want)
    expect = -dist if metric == "cosine" else dist
    np.testing.assert_allclose(val, expect, rtol=1e-5, atol=1e-5)
    if other_class:
        assert (ql[:, None] != cl[idx]).all()


def test_ties_go_to_the_lower_index_and_empty_slots_are_marked():
    c = np.array([[1, 0], [0, 1], [1, 0], [5, 5]], dtype=np.float32)
    q = np.array([[1, 0]], dtype=np.float32)
    idx, val = bccp.closest(q, c, "l2", 2)
    assert idx.tolist() == [[0, 2]] and val.tolist() == [[0.0, 0.0]]
    # Only one candidate of another class: the second slot is empty.
    idx, val = bccp.closest(q, c, "l1", 2, [0], [0, 1, 0, 0])
    assert idx.tolist() == [[1, -1]]
    assert val[0, 1] == np.inf
    idx, val = bccp.closest(q, c, "cosine", 2, [0], [0, 1, 0, 0])
    assert val[0, 1] == -np.inf


def test_inputs_are_converted_or_borrowed():
    rng = np.random.default_rng(1)
    c64 = rng.normal(size=(40, 8))
    q = np.asfortranarray(rng.normal(size=(6, 8)))
    idx64, _ = bccp.closest(q, c64, "l2", 3)
    idx32, _ = bccp.closest(
        np.ascontiguousarray(q, dtype=np.float32), c64.astype(np.float32), "l2", 3
    )
    np.testing.assert_array_equal(idx64, idx32)
    # Integer embeddings and list inputs work too.
    idx, _ = bccp.closest([[0, 0]], [[3, 4], [1, 1]], "l2", 1)
    assert idx.tolist() == [[1]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bccp.closest(np.zeros((2, 3)), np.zeros((4, 4)), "l2", 1),
         "queries have dimension 3 but candidates have 4; they must match"),
        (lambda: bccp.closest(np.zeros((2, 3)), np.zeros((4, 3)), "l2", 5),
         "k = 5 is larger than the number of candidates N = 4"),
        (lambda: bccp.closest(np.zeros((2, 3)), np.zeros((4, 3)), "l2", 0), "k must be 1 or more"),
        (lambda: bccp.closest(np.zeros((2, 3)), np.zeros((0, 3)), "l2", 1),
         "there are no candidates (N = 0)"),
        (lambda: bccp.closest(np.array([[np.nan, 0, 0]]), np.zeros((4, 3)), "l2", 1),
         "queries row 0 holds a NaN or infinite value"),
        (lambda: bccp.closest(np.ones((2, 3)), np.zeros((4, 3)), "cosine", 1),
         "candidates row 0 is all zeros: cosine similarity is undefined for it"),
        (lambda: bccp.closest(np.zeros((2, 3)), np.zeros((4, 3)), "l3", 1),
         'unknown metric "l3"; valid: l1, l2, cosine'),
        (lambda: bccp.closest(np.zeros((2, 3)), np.zeros((4, 3)), "l2", 1, [0, 1]),
         "give both query_labels and candidate_labels"),
        (lambda: bccp.closest(np.zeros((2, 3)), np.zeros((4, 3)), "l2", 1, [0, 1], [0, 1]),
         "candidate_labels has 2 entries for 4 rows; they must match"),
        (lambda: bccp.closest(np.zeros(3), np.zeros((4, 3)), "l2", 1),
         "queries must be a 2-D array [rows, dim], found shape (3,)"),
        (lambda: bccp.closest(np.array([["a"]]), np.zeros((4, 1)), "l2", 1),
         "queries must hold real numbers"),
    ],
)
def test_errors_are_bccp_input_errors_with_the_library_message(call, message):
    with pytest.raises(bccp.BccpInputError) as err:
        call()
    assert message in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, bccp.BccpError)


def ticks_during_search(rows: int):
    """(ticks this thread counted, seconds) while another thread runs one L1 search."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(rows, 256)).astype(np.float32)
    c = rng.normal(size=(20000, 256)).astype(np.float32)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (bccp.closest(q, c, "l1", 4), done.set()))
    ticks = 0
    started = time.perf_counter()
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    return ticks, time.perf_counter() - started


def test_the_gil_is_released_while_searching():
    # Grow the search until it lasts long enough to tell (fast machines finish small ones).
    for rows in (3000, 12000, 48000):
        ticks, elapsed = ticks_during_search(rows)
        if elapsed > 0.3:
            break
    assert elapsed > 0.3, f"the search took {elapsed:.3f}s, too short to tell"
    # A search that held the GIL would let this thread tick about once; at 1 ms per tick a
    # released GIL gives hundreds.
    assert ticks > 50, f"only {ticks} ticks in {elapsed:.2f}s: the GIL was held"
