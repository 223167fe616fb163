"""Compare CPU nearest-neighbour (top-1) search throughput of bccp with numpy, PyTorch, SciPy and
faiss, at the same sizes and thread count, in one run.

Workloads: float32 queries Q x D and candidates N x D drawn from a standard normal (fixed seed);
for each query, the index of the best candidate (k = 1):
  l2      Q = 2048, N = 65536, D in {512, 1280}: smallest squared Euclidean distance
  cosine  Q = 2048, N = 65536, D in {512, 1280}: largest cosine similarity
  l1      Q =  256, N = 65536, D in {512, 1280}: smallest sum of absolute differences
(--quick divides N by 8 for the Python references; the Rust bench always runs the full sizes.)

References (each: one warm-up call, then the median of timed calls, about --seconds per case):
  numpy   GEMM + argmin/argmax over candidate chunks (l2: |x|^2 - 2 q.x^T; cosine: normalised
          rows, q.x^T), the block bounded by --block-mb
  torch   torch.cdist(p=2) / torch.cdist(p=1) + argmin over candidate chunks; normalised
          matmul + argmax for cosine
  scipy   scipy.spatial.distance.cdist 'sqeuclidean' / 'cityblock' + argmin. cdist holds the GIL
          and computes in float64, so it runs in --threads forked worker processes on a subset
          of --scipy-queries queries, and pairs/s is scaled from that subset (said in the table)
  faiss   IndexFlatL2 (l2), IndexFlatIP on normalised vectors (cosine), IndexFlat METRIC_L1 (l1)
(--references picks a subset; numpy is always measured.)
Candidate-side preparation (row norms, normalised copy, float64 copy, faiss add) is done once,
outside the timing, like building an index; query-side work is timed. Thread count: --threads
sets OMP/OPENBLAS/MKL_NUM_THREADS before numpy is imported, torch.set_num_threads,
faiss.omp_set_num_threads and the number of scipy worker processes.
The first --check queries' answers of every implementation are compared with a float64 exact
search; a disagreement prints a warning (with the distance gap, to tell a float32 near-tie).

bccp side: `cargo bench --bench distance -- --output-format bencher distance/` (criterion ids
distance/{l2,cosine,l1}/d{512,1280}, one iteration = the whole top-1 search of the workload at
full size), run with RAYON_NUM_THREADS=--threads; ns/iter is converted to pairs/s = Q*N / s.
With AVX512-BF16, the bench also runs distance/{l2,cosine}_bf16/d{512,1280}: the bf16
pre-selection (the same exact result); its pairs/s and ratios are the "bccp bf16" row and column.
--cargo-features passes --features to cargo (e.g. the features the checkout was built with).

Prints a markdown table per metric and D (implementation, pairs/s in millions, GFLOP/s counting
2*D flops per pair for l2/cosine and 3*D for l1, bccp / this) and, with --json FILE, writes the
same as JSON.

Usage (from the repository root):
  scripts/setup-torch-venv.sh
  assets/torch-venv/bin/python scripts/compare_distance.py [--threads N] [--quick] [--seconds S]
      [--json FILE] [--skip-rust] [--references numpy,torch,scipy,faiss] [--cargo-features F]
"""

import argparse
import multiprocessing
import os
import re
import statistics
import sys
import time
from pathlib import Path

# numpy, torch, scipy and faiss are imported by load_libraries(), after --threads has been put
# into the environment: OpenBLAS reads OPENBLAS_NUM_THREADS only when it is loaded.
np = torch = scipy = cdist = faiss = None

from benchlib import bench_ns, cpu_model, run_cargo_bench, write_json
N_FULL = 65536
Q_FULL = {"l2": 2048, "cosine": 2048, "l1": 256}
DIMS = [512, 1280]
METRICS = ["l2", "cosine", "l1"]
FLOPS_PER_DIM = {"l2": 2, "cosine": 2, "l1": 3}
SEED = 20240611
RUST_CMD = ["cargo", "bench", "--bench", "distance", "--", "--output-format", "bencher", "distance/"]
BF16 = {"l2": "l2_bf16", "cosine": "cosine_bf16"}
REFERENCES = ["numpy", "torch", "scipy", "faiss"]
BENCH_LINE = re.compile(r"^test\s+distance/(\w+)/d(\d+)\s+\.\.\.\s+bench:\s+([\d,._]+)\s+ns/iter")
BCCP = "bccp"
BCCP_BF16 = "bccp bf16 pre-selection (exact)"


def die(msg):
    sys.exit(f"compare_distance: error: {msg}")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_libraries(threads, references):
    global np, torch, scipy, cdist, faiss
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "numpy" in sys.modules:
        die("numpy was imported before the thread count was set")
    try:
        import numpy as np_
        np = np_
        if "scipy" in references:
            import scipy as scipy_
            from scipy.spatial.distance import cdist as cdist_
            scipy, cdist = scipy_, cdist_
        if "torch" in references:
            import torch as torch_
            torch = torch_
            torch.set_num_threads(threads)
        if "faiss" in references:
            import faiss as faiss_
            faiss = faiss_
            faiss.omp_set_num_threads(threads)
    except ImportError as e:
        die(f"{e}: run scripts/setup-torch-venv.sh and use assets/torch-venv/bin/python "
            f"(or leave the library out of --references)")


# ---------------------------------------------------------------------------------------------
# Chunked top-1 helpers: score a Q x chunk block at a time, keep the running best (ties keep the
# earlier candidate, as argmin/argmax do).


def chunk_rows(nq, itemsize, block_mb):
    return max(256, (block_mb << 20) // (nq * itemsize))


def np_chunked_best(block_fn, nq, n, chunk, largest):
    best_idx = np.zeros(nq, dtype=np.int64)
    best_val = np.full(nq, -np.inf if largest else np.inf)
    rows = np.arange(nq)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = block_fn(start, stop)
        idx = block.argmax(axis=1) if largest else block.argmin(axis=1)
        val = block[rows, idx]
        better = val > best_val if largest else val < best_val
        best_val[better] = val[better]
        best_idx[better] = idx[better] + start
    return best_idx


def torch_chunked_best(block_fn, nq, n, chunk, largest):
    best_idx = torch.zeros(nq, dtype=torch.int64)
    best_val = torch.full((nq,), -float("inf") if largest else float("inf"))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = block_fn(start, stop)
        val, idx = block.max(dim=1) if largest else block.min(dim=1)
        better = val > best_val if largest else val < best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx.numpy()


# ---------------------------------------------------------------------------------------------
# Implementations. Each make_* does the candidate-side preparation (untimed) and returns
# (label, search(q) -> indices of the best candidates, queries searched per call or None for all).


def make_numpy(metric, x, block_mb, nq):
    n = x.shape[0]
    chunk = chunk_rows(nq, 4, block_mb)
    if metric == "l2":
        xnorm = np.einsum("ij,ij->i", x, x)

        def search(q):
            qm2 = -2.0 * q

            def block(a, b):
                s = qm2 @ x[a:b].T
                s += xnorm[a:b]
                return s

            return np_chunked_best(block, q.shape[0], n, chunk, largest=False)

        return "numpy GEMM + argmin", search
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)

        def search(q):
            qn = q / np.linalg.norm(q, axis=1, keepdims=True)
            return np_chunked_best(lambda a, b: qn @ xn[a:b].T, q.shape[0], n, chunk, largest=True)

        return "numpy normalised GEMM + argmax", search
    return None


def make_torch(metric, x, block_mb, nq):
    n = x.shape[0]
    xt = torch.from_numpy(x)
    chunk = chunk_rows(nq, 4, block_mb)
    if metric in ("l2", "l1"):
        p = 2.0 if metric == "l2" else 1.0

        def search(q):
            qt = torch.from_numpy(q)
            with torch.inference_mode():
                return torch_chunked_best(lambda a, b: torch.cdist(qt, xt[a:b], p=p), q.shape[0], n, chunk,
                                          largest=False)

        return f"torch.cdist(p={int(p)}) + argmin", search
    xn = torch.nn.functional.normalize(xt, dim=1)

    def search(q):
        with torch.inference_mode():
            qn = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
            return torch_chunked_best(lambda a, b: qn @ xn[a:b].T, q.shape[0], n, chunk, largest=True)

    return "torch normalised matmul + argmax", search


def make_faiss(metric, x, block_mb, nq):
    d = x.shape[1]
    if metric == "l2":
        index, label, normalise = faiss.IndexFlatL2(d), "faiss IndexFlatL2", False
    elif metric == "cosine":
        index, label, normalise = faiss.IndexFlatIP(d), "faiss IndexFlatIP (normalised)", True
    else:
        index, label, normalise = faiss.IndexFlat(d, faiss.METRIC_L1), "faiss IndexFlat METRIC_L1", False
    if normalise:
        xn = x.copy()
        faiss.normalize_L2(xn)
        index.add(xn)
    else:
        index.add(x)

    def search(q):
        if normalise:
            q = q.copy()
            faiss.normalize_L2(q)
        _, idx = index.search(q, 1)
        return idx[:, 0]

    return label, search


# scipy: cdist holds the GIL, so it gets forked processes. The float64 candidates are a global set
# before the fork, so the workers share them copy-on-write.
_SCIPY_X = None
_SCIPY_METRIC = None
_SCIPY_BLOCK_MB = 256


def _scipy_worker(q):
    n = _SCIPY_X.shape[0]
    chunk = chunk_rows(q.shape[0], 8, _SCIPY_BLOCK_MB)
    q = q.astype(np.float64)
    return np_chunked_best(lambda a, b: cdist(q, _SCIPY_X[a:b], _SCIPY_METRIC), q.shape[0], n, chunk,
                           largest=False)


class ScipyPool:
    def __init__(self, x64, threads, block_mb):
        global _SCIPY_X, _SCIPY_BLOCK_MB
        _SCIPY_X, _SCIPY_BLOCK_MB = x64, block_mb
        self.threads = threads
        self.pool = None

    def search(self, metric, q):
        global _SCIPY_METRIC
        if self.pool is None or _SCIPY_METRIC != metric:
            self.close()
            _SCIPY_METRIC = metric
            self.pool = multiprocessing.get_context("fork").Pool(self.threads)
        parts = np.array_split(q, min(self.threads, q.shape[0]))
        return np.concatenate(self.pool.map(_scipy_worker, parts))

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


def make_scipy(metric, pool, threads, subset, nq):
    if metric == "cosine":
        return None
    name = "sqeuclidean" if metric == "l2" else "cityblock"
    nsub = min(subset, nq) if subset > 0 else nq
    label = f"scipy cdist '{name}' + argmin (float64, {threads} proc"
    label += f", {nsub} of {nq} queries, scaled)" if nsub < nq else ")"
    return label, lambda q: pool.search(name, q[:nsub]), nsub


# ---------------------------------------------------------------------------------------------


def exact_best(metric, q, x):
    """float64 exact top-1 for a few queries: (indices, scores of every candidate)."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    if metric == "l2":
        s = (x64 * x64).sum(1)[None, :] - 2 * q64 @ x64.T + (q64 * q64).sum(1)[:, None]
        return s.argmin(1), s
    if metric == "cosine":
        s = (q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ (x64 / np.linalg.norm(x64, axis=1, keepdims=True)).T
        return s.argmax(1), s
    s = np.stack([np.abs(x64 - row).sum(1) for row in q64])
    return s.argmin(1), s


def time_case(search, q, seconds, max_runs):
    """Warm up once, then time calls until about `seconds` are spent (at least one, at most
    max_runs). Returns (median seconds, number of timed calls, indices from the warm-up)."""
    t0 = time.perf_counter()
    idx = search(q)
    warm = time.perf_counter() - t0
    times = []
    while len(times) < max_runs:
        t0 = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t0)
        if sum(times) + statistics.median(times) > seconds:
            break
    log(f"    warm-up {warm:.3f} s, {len(times)} timed, median {statistics.median(times):.3f} s")
    return statistics.median(times), len(times), np.asarray(idx)


def rust_pairs_per_s(threads, features):
    """Run the criterion bench and return {(bench, d): pairs/s} at the full sizes (bench: a
    metric, or its bf16 pre-selection's name from BF16 where the CPU has AVX512-BF16)."""
    cmd = RUST_CMD[:2] + (["--features", features] if features else []) + RUST_CMD[2:]
    out = run_cargo_bench(cmd, threads, die)
    base = {**{m: m for m in Q_FULL}, **{b: m for m, b in BF16.items()}}
    result = {}
    for line in out.splitlines():
        m = BENCH_LINE.match(line.strip())
        if m:
            ns = bench_ns(m.group(3))
            name, d = m.group(1), int(m.group(2))
            if name in base:
                result[(name, d)] = Q_FULL[base[name]] * N_FULL / (ns * 1e-9)
    missing = [f"distance/{m}/d{d}" for m in METRICS for d in DIMS if (m, d) not in result]
    if missing:
        die(f"no bencher line for {', '.join(missing)} in the cargo bench output")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for all (default: all)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case (at least one call)")
    ap.add_argument("--max-runs", type=int, default=7, help="most timed calls per case")
    ap.add_argument("--quick", action="store_true", help="N / 8 for the references (a fast check)")
    ap.add_argument("--block-mb", type=int, default=256,
                    help="MiB of one query x candidate-chunk score block (bounds memory; default 256)")
    ap.add_argument("--scipy-queries", type=int, default=32,
                    help="queries scipy searches per call, pairs/s scaled to Q (0: all; default 32)")
    ap.add_argument("--check", type=int, default=8, help="queries cross-checked against float64 (default 8)")
    ap.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of l2,cosine,l1")
    ap.add_argument("--dims", default=",".join(map(str, DIMS)), help="comma-separated subset of 512,1280")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--skip-rust", action="store_true", help="measure the references only")
    ap.add_argument("--references", default=",".join(REFERENCES),
                    help="comma-separated subset of numpy,torch,scipy,faiss (numpy is always measured)")
    ap.add_argument("--cargo-features", default="", help="--features for cargo bench (default none)")
    args = ap.parse_args()
    if args.threads < 1:
        die("--threads must be at least 1")
    metrics = [m for m in args.metrics.split(",") if m]
    dims = [int(d) for d in args.dims.split(",") if d]
    if not metrics or any(m not in METRICS for m in metrics):
        die(f"--metrics: choose from {','.join(METRICS)}")
    if not dims or any(d <= 0 for d in dims):
        die("--dims: positive integers")
    references = {r for r in args.references.split(",") if r} | {"numpy"}
    if any(r not in REFERENCES for r in references):
        die(f"--references: choose from {','.join(REFERENCES)}")
    load_libraries(args.threads, references)

    n = N_FULL // 8 if args.quick else N_FULL
    blas = "?"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:
        pass
    info = {
        "threads": args.threads,
        "cpu": cpu_model(),
        "quick": args.quick,
        "n_reference": n,
        "n_bccp": N_FULL,
        "queries": Q_FULL,
        "seed": SEED,
        "numpy": np.__version__,
        "numpy_blas": blas,
        "torch": torch.__version__ if torch else None,
        "torch_mkl": torch.backends.mkl.is_available() if torch else None,
        "scipy": scipy.__version__ if scipy else None,
        "faiss": faiss.__version__ if faiss else None,
        "load_average": os.getloadavg(),
    }
    versions = [f"numpy {np.__version__} ({blas})"]
    if torch:
        versions.append(f"torch {torch.__version__} (MKL {'yes' if info['torch_mkl'] else 'no'}, "
                        f"{torch.get_num_threads()} threads)")
    if scipy:
        versions.append(f"scipy {scipy.__version__}")
    if faiss:
        versions.append(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)")
    print(f"threads {args.threads}, CPU: {info['cpu']}, load average at the start "
          f"{' '.join(f'{v:.2f}' for v in info['load_average'])}\n{', '.join(versions)}\n"
          f"N = {n}{' (--quick: N/8 for the references; bccp runs N = 65536)' if args.quick else ''}, "
          f"Q = {Q_FULL['l2']} (l2, cosine), {Q_FULL['l1']} (l1), k = 1, float32")

    rows = []  # one per (metric, d, implementation)
    warnings = []
    for d in dims:
        rng = np.random.default_rng(SEED + d)
        x = rng.standard_normal((n, d), dtype=np.float32)
        q_all = rng.standard_normal((max(Q_FULL.values()), d), dtype=np.float32)
        x64 = x.astype(np.float64) if "scipy" in references and any(m in metrics for m in ("l2", "l1")) else None
        pool = ScipyPool(x64, args.threads, args.block_mb)
        try:
            for metric in metrics:
                nq = Q_FULL[metric]
                q = np.ascontiguousarray(q_all[:nq])
                ncheck = min(args.check, nq)
                ref_idx, ref_scores = exact_best(metric, q[:ncheck], x)
                makers = {
                    "numpy": lambda: make_numpy(metric, x, args.block_mb, nq),
                    "torch": lambda: make_torch(metric, x, args.block_mb, nq),
                    "scipy": lambda: make_scipy(metric, pool, args.threads, args.scipy_queries, nq),
                    "faiss": lambda: make_faiss(metric, x, args.block_mb, nq),
                }
                for name, make in makers.items():
                    if name not in references:
                        continue
                    made = make()
                    if made is None:
                        continue
                    label, search, nsearched = made if len(made) == 3 else (*made, nq)
                    log(f"  {metric} d{d}: {label}")
                    med, runs, idx = time_case(search, q, args.seconds, args.max_runs)
                    pairs = nsearched * n / med
                    rows.append({"metric": metric, "d": d, "q": nq, "n": n, "implementation": label,
                                 "queries_timed": nsearched, "median_s": med, "runs": runs, "pairs_per_s": pairs,
                                 "gflop_s": pairs * FLOPS_PER_DIM[metric] * d * 1e-9})
                    for i in range(min(ncheck, len(idx))):
                        if idx[i] != ref_idx[i]:
                            got, want = ref_scores[i, idx[i]], ref_scores[i, ref_idx[i]]
                            w = (f"{metric} d{d}: {label} picked candidate {idx[i]} for query {i}, float64 says "
                                 f"{ref_idx[i]} (float64 scores {got:.6g} vs {want:.6g}, "
                                 f"relative gap {abs(got - want) / max(abs(want), 1e-30):.2g})")
                            warnings.append(w)
                            log(f"  WARNING: {w}")
        finally:
            pool.close()
        del x, x64

    rust = {} if args.skip_rust else rust_pairs_per_s(args.threads, args.cargo_features)
    info["load_average_after_bench"] = os.getloadavg()
    for metric in metrics:
        for d in dims:
            r = rust.get((metric, d))
            rb = rust.get((BF16.get(metric), d))
            for label, v in ((BCCP, r), (BCCP_BF16, rb)):
                if v is not None:
                    rows.append({"metric": metric, "d": d, "q": Q_FULL[metric], "n": N_FULL, "implementation": label,
                                 "queries_timed": Q_FULL[metric], "median_s": Q_FULL[metric] * N_FULL / v,
                                 "runs": None, "pairs_per_s": v, "gflop_s": v * FLOPS_PER_DIM[metric] * d * 1e-9})
            for row in rows:
                if row["metric"] == metric and row["d"] == d:
                    row["bccp_over_this"] = r / row["pairs_per_s"] if r is not None else None
                    row["bccp_bf16_over_this"] = rb / row["pairs_per_s"] if rb is not None else None

    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    for metric in metrics:
        for d in dims:
            print(f"\n### {metric}, D = {d} (Q = {Q_FULL[metric]}, N = {n}; "
                  f"GFLOP/s at {FLOPS_PER_DIM[metric]}*D flops per pair)\n")
            bf16 = metric in BF16
            print("| implementation | Mpairs/s | GFLOP/s | bccp / this |" + (" bccp bf16 / this |" if bf16 else "")
                  + "\n|---|---:|---:|---:|" + ("---:|" if bf16 else ""))
            for row in rows:
                if row["metric"] == metric and row["d"] == d:
                    print(f"| {row['implementation']} | {row['pairs_per_s'] * 1e-6:.1f} | {row['gflop_s']:.1f} "
                          f"| {fmt(row['bccp_over_this'], '.2f')} |"
                          + (f" {fmt(row['bccp_bf16_over_this'], '.2f')} |" if bf16 else ""))
    if warnings:
        print(f"\n{len(warnings)} cross-check warning(s):")
        for w in warnings:
            print(f"- {w}")
    else:
        print(f"\ncross-check: all implementations agree with float64 on the first {args.check} queries")

    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    write_json(args.json, {**info, "results": rows, "warnings": warnings})


if __name__ == "__main__":
    main()
