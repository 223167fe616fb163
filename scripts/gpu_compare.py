"""bccp against PyTorch on the same GPU, in one run: closest-candidate search and embedding
throughput, each figure with the ratio bccp / torch (> 1: bccp is faster).

Workloads (defaults; --cpu-smoke shrinks them all to run on a CPU in seconds):
  distance   Q = 8192 queries, N = 1,048,576 candidates, D = 512, float32 standard normal, top-1
             (k = 1) per query, in millions of query-candidate pairs per second:
               torch  l2: torch.cdist(p=2) + topk(1, largest=False); l1: torch.cdist(p=1) + topk;
                      cosine: F.normalize both sides, matmul + topk(1, largest=True); candidates
                      in chunks of --chunk rows with a running best (so memory stays bounded),
                      normalising the candidates counts in the time
               bccp   bccp::distance::search on CUDA tensors, through the ignored test
                      `perf_distance` of the bundled tests/cuda.rs executable
  bench      the same torch code at the sizes of the criterion bench `distance_cuda/*`
             (benches/distance.rs: Q = 2048 for l2/cosine, 256 for l1, N = 65,536, D = 512 and
             1280) against the bench's throughput, when --criterion-log gives its output
  embed      images/s of MobileNetV2 and ResNet-50 (torchvision, weights=None: random, eval mode,
             torch.inference_mode, NCHW contiguous unless --channels-last) at batch 256, 224x224,
             in float32 and bfloat16 (the model and the input cast), features only (the pooled
             features bccp's Backbone::embed returns: no classifier);
             bccp: Backbone::embed through the ignored test `perf_embed` (MobileNetV2 with the
             real weights when bundled, ResNet-50 with random weights; bfloat16 is reported as an
             error where bccp has no kernel for it, e.g. MobileNetV2's depthwise op is f32 only)
  finetune   images/s of one full fine-tuning step (forward, cross-entropy through a 10-class
             linear head, backward, Adam over every parameter) of MobileNetV2 and ResNet-18 at
             batch 64 and ViT-B/16 at batch 32, 224x224, random weights, batch-norm statistics
             frozen (torch: eval mode with trainable parameters), in float32 and in mixed
             precision (torch: torch.autocast("cuda", torch.bfloat16); bccp: --precision bf16,
             bf16 activations on candle's ops, f32 weights and Adam);
             bccp: the ignored test `perf_finetune`
Timing: one warm-up call, then the median of up to --reps calls that fit --budget-s seconds per
figure (torch: CUDA events around each call; bccp: wall clock with a device synchronize).
float32 is strict: TF32 off for cuDNN convolutions and matmuls (torch's default allows it for
convolutions) unless --tf32; bccp/candle computes float32 in full precision too.

Output: a table on stdout and JSON (--out, default gpu-compare.json) with every figure, the
settings and the errors.

Usage (on the card machine, usually through scripts/gpu-check.sh):
  python3 scripts/gpu_compare.py --bccp-tests bin/tests/cuda [--criterion-log bench.log]
  python3 scripts/gpu_compare.py --cpu-smoke [--bccp-tests ...]    # logic check on a CPU
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

SMOKE = {
    "distance": (64, 4096, 64),
    "bench": [("l2", 32, 2048, 64), ("cosine", 32, 2048, 64), ("l1", 8, 2048, 64)],
    "batch": 2,
    "size": 64,
    "chunk": 1024,
    "train": [("mobilenet_v2", 2), ("resnet18", 2), ("vit_base_patch16_224", 2)],
    "train_size": 64,
}
FULL = {
    "distance": (8192, 1_048_576, 512),
    "bench": [
        (m, q, 65536, d)
        for d in (512, 1280)
        for (m, q) in (("l2", 2048), ("cosine", 2048), ("l1", 256))
    ],
    "batch": 256,
    "size": 224,
    "chunk": 65536,
    "train": [("mobilenet_v2", 64), ("resnet18", 64), ("vit_base_patch16_224", 32)],
    "train_size": 224,
}
METRICS = ("l2", "cosine", "l1")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    p.add_argument("--bccp-tests", help="the tests/cuda.rs executable (its perf_* probes); none: torch only")
    p.add_argument("--criterion-log", help="output of the distance bench (distance_cuda/*) to compare with")
    p.add_argument("--out", default="gpu-compare.json", help="JSON output file")
    p.add_argument("--budget-s", type=float, default=None, help="timed seconds per figure (default 4; smoke 0.5)")
    p.add_argument("--reps", type=int, default=5, help="at most this many timed calls per figure")
    p.add_argument("--deadline-s", type=float, default=240, help="stop starting new figures after this many seconds")
    p.add_argument("--chunk", type=int, default=None, help="candidate rows per torch distance chunk")
    p.add_argument("--channels-last", action="store_true", help="torch convnets in channels_last")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in torch's float32 convs/matmuls")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: distance,bench,embed,finetune,bccp")
    return p.parse_args()


class Clock:
    def __init__(self, deadline_s):
        self.t0 = time.monotonic()
        self.deadline = deadline_s

    def left(self):
        return self.deadline - (time.monotonic() - self.t0)


def timer(torch, dev):
    """Returns time_fn(fn) → (median seconds, reps) with one warm-up call."""

    def once(fn):
        if dev.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def run(fn, budget, max_reps):
        warm = once(fn)
        reps = max(1, min(max_reps, int(budget / max(warm, 1e-6))))
        times = sorted(once(fn) for _ in range(reps))
        return times[reps // 2], reps

    return run


def torch_search(torch, q, c, metric, chunk):
    """Top-1 candidate of every query: (values, indices), over candidate chunks."""
    F = torch.nn.functional
    best_v = best_i = None
    if metric == "cosine":
        q = F.normalize(q, dim=1)
    for s in range(0, c.shape[0], chunk):
        part = c[s : s + chunk]
        if metric == "cosine":
            v, i = torch.topk(q @ F.normalize(part, dim=1).T, 1, dim=1, largest=True)
        else:
            d = torch.cdist(q, part, p=2.0 if metric == "l2" else 1.0)
            v, i = torch.topk(d, 1, dim=1, largest=False)
        i = i + s
        if best_v is None:
            best_v, best_i = v, i
        else:
            better = v > best_v if metric == "cosine" else v < best_v
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i, best_i)
    return best_v, best_i


def torch_distance(torch, dev, run, metric, q, n, d, chunk, budget, reps):
    g = torch.Generator(device=dev).manual_seed(1)
    cand = torch.randn(n, d, device=dev, generator=g)
    queries = torch.randn(q, d, device=dev, generator=g)
    secs, r = run(lambda: torch_search(torch, queries, cand, metric, chunk), budget, reps)
    return {"seconds": secs, "reps": r, "mpairs_per_s": q * n / secs / 1e6}


def torch_embed(torch, dev, run, model_name, dtype_name, batch, size, channels_last, budget, reps):
    import torchvision

    if model_name == "mobilenet_v2":
        m = torchvision.models.mobilenet_v2(weights=None)
        net = torch.nn.Sequential(m.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    else:
        net = torchvision.models.resnet50(weights=None)
        net.fc = torch.nn.Identity()
    dtype = torch.float32 if dtype_name == "f32" else torch.bfloat16
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.eval().to(device=dev, dtype=dtype, memory_format=fmt)
    x = torch.randn(batch, 3, size, size, device=dev).to(dtype=dtype, memory_format=fmt)

    def fwd():
        with torch.inference_mode():
            net(x)

    secs, r = run(fwd, budget, reps)
    return {"seconds": secs, "reps": r, "images_per_s": batch / secs}


def torch_finetune(torch, dev, run, model_name, dtype_name, batch, size, budget, reps):
    import torchvision

    if model_name == "mobilenet_v2":
        m = torchvision.models.mobilenet_v2(weights=None)
        net, dim = torch.nn.Sequential(m.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), 1280
    elif model_name == "resnet18":
        net, dim = torchvision.models.resnet18(weights=None), 512
        net.fc = torch.nn.Identity()
    else:
        net, dim = torchvision.models.vit_b_16(weights=None, image_size=size), 768
        net.heads = torch.nn.Identity()
    head = torch.nn.Linear(dim, 10)
    torch.nn.init.zeros_(head.weight)
    # Batch-norm statistics frozen as bccp's default: eval mode, every parameter trained.
    net = net.eval().to(dev)
    head = head.to(dev)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.arange(batch, device=dev) % 10
    mixed = dtype_name == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=mixed):
            logits = head(net(x))
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    secs, r = run(step, budget, reps)
    return {"seconds": secs, "reps": r, "images_per_s": batch / secs}


def run_bccp_probes(exe, sizes, batch, size, budget, reps, timeout, cpu, train_size):
    """Runs the perf_* ignored tests; returns (records, error text or None)."""
    env = dict(os.environ)
    env.update(
        {
            "BCCP_PERF_DISTANCE": ",".join(map(str, sizes)),
            "BCCP_PERF_BATCH": str(batch),
            "BCCP_PERF_SIZE": str(size),
            "BCCP_PERF_BUDGET_S": str(max(1, round(budget))),
            "BCCP_PERF_REPS": str(reps),
            "BCCP_PERF_TRAIN_SIZE": str(train_size),
        }
    )
    if cpu:
        env["BCCP_PERF_TRAIN_BATCH"] = "2"
        env["BCCP_CUDA_TESTS_DEVICE"] = "cpu"
    cmd = [
        exe, "--ignored", "--exact", "perf_distance", "perf_embed", "perf_finetune",
        "--nocapture", "--test-threads=1",
    ]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return parse_probes(out), f"timed out after {timeout:.0f} s"
    except OSError as e:
        return [], f"cannot run {exe}: {e}"
    records = parse_probes(p.stdout)
    err = None
    if p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        err = f"exit {p.returncode}: " + " | ".join(tail)
    return records, err


def parse_probes(text):
    # libtest prints "test perf_x ... " without a newline first, so a record may follow it.
    out = []
    for line in text.splitlines():
        at = line.find("BCCP_PERF {")
        if at >= 0:
            try:
                out.append(json.loads(line[at + len("BCCP_PERF ") :]))
            except ValueError:
                pass
    return out


def parse_criterion(text):
    """{(metric, dim): Melem/s} from criterion's `distance_cuda/<metric>/d<dim>` results."""
    out = {}
    current = None
    scale = {"elem/s": 1e-6, "Kelem/s": 1e-3, "Melem/s": 1.0, "Gelem/s": 1e3}
    for line in text.splitlines():
        m = re.search(r"distance_cuda/(\w+)/d(\d+)", line)
        if m:
            current = (m.group(1), int(m.group(2)))
        t = re.search(r"thrpt:\s*\[\s*\S+\s+\S+\s+(\S+)\s+(\S+)", line)
        if t and current:
            unit = t.group(2)
            if unit in scale:
                out[current] = float(t.group(1)) * scale[unit]
            current = None
    return out


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def main():
    args = parse_args()
    sz = SMOKE if args.cpu_smoke else FULL
    budget = args.budget_s if args.budget_s is not None else (0.5 if args.cpu_smoke else 4.0)
    chunk = args.chunk or sz["chunk"]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    clock = Clock(args.deadline_s)
    errors = []

    import torch

    if args.cpu_smoke:
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_compare.py: torch sees no CUDA device (use --cpu-smoke on a CPU)")
        dev = torch.device("cuda", 0)
        torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    run = timer(torch, dev)
    result = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "settings": {
            "budget_s": budget,
            "max_reps": args.reps,
            "chunk": chunk,
            "channels_last": args.channels_last,
            "tf32": args.tf32,
            "cudnn_benchmark": dev.type == "cuda",
            "distance": dict(zip("QND", sz["distance"])),
            "batch": sz["batch"],
            "size": sz["size"],
        },
        "distance": [],
        "distance_bench": [],
        "embed": [],
        "finetune": [],
        "errors": errors,
    }

    def guarded(what, fn):
        if clock.left() <= 0:
            errors.append(f"{what}: skipped, past the deadline")
            return None
        try:
            return fn()
        except Exception as e:  # a figure that fails is reported, the others still run
            errors.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        finally:
            # The figure's tensors died with its function: give their memory back.
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    # bccp's probes first: they own the GPU alone (torch has allocated nothing yet).
    probes = []
    if args.bccp_tests and "bccp" not in skip:
        left = clock.left() * 0.5
        probes, err = run_bccp_probes(
            args.bccp_tests, sz["distance"], sz["batch"], sz["size"], budget, args.reps, left, args.cpu_smoke,
            sz["train_size"],
        )
        if err:
            errors.append(f"bccp probes: {err}")
    elif "bccp" not in skip:
        errors.append("bccp probes: no --bccp-tests executable given")
    bccp_dist = {p["metric"]: p for p in probes if p.get("kind") == "distance"}
    bccp_embed = {(p["model"], p["dtype"]): p for p in probes if p.get("kind") == "embed"}
    bccp_train = {(p["model"], p["dtype"]): p for p in probes if p.get("kind") == "finetune"}

    q, n, d = sz["distance"]
    if "distance" not in skip:
        for metric in METRICS:
            t = guarded(
                f"torch distance {metric}",
                lambda: torch_distance(torch, dev, run, metric, q, n, d, chunk, budget, args.reps),
            )
            b = bccp_dist.get(metric, {})
            result["distance"].append(
                {
                    "metric": metric, "q": q, "n": n, "d": d, "k": 1,
                    "torch_mpairs_per_s": t and t["mpairs_per_s"],
                    "bccp_mpairs_per_s": b.get("mpairs_per_s"),
                    "ratio": ratio(b.get("mpairs_per_s"), t and t["mpairs_per_s"]),
                    "torch_reps": t and t["reps"], "bccp_reps": b.get("reps"),
                }
            )

    crit = {}
    if args.criterion_log and os.path.exists(args.criterion_log):
        with open(args.criterion_log, errors="replace") as f:
            crit = parse_criterion(f.read())
    if "bench" not in skip and (crit or args.cpu_smoke):
        for metric, bq, bn, bd in sz["bench"]:
            t = guarded(
                f"torch bench-size distance {metric}/d{bd}",
                lambda: torch_distance(torch, dev, run, metric, bq, bn, bd, chunk, budget, args.reps),
            )
            b = crit.get((metric, bd))
            result["distance_bench"].append(
                {
                    "metric": metric, "q": bq, "n": bn, "d": bd,
                    "torch_mpairs_per_s": t and t["mpairs_per_s"],
                    "bccp_criterion_mpairs_per_s": b,
                    "ratio": ratio(b, t and t["mpairs_per_s"]),
                }
            )

    if "embed" not in skip:
        for model in ("mobilenet_v2", "resnet50"):
            for dt in ("f32", "bf16"):
                t = guarded(
                    f"torch embed {model} {dt}",
                    lambda: torch_embed(
                        torch, dev, run, model, dt, sz["batch"], sz["size"], args.channels_last, budget, args.reps
                    ),
                )
                b = bccp_embed.get((model, dt), {})
                result["embed"].append(
                    {
                        "model": model, "dtype": dt, "batch": sz["batch"], "size": sz["size"],
                        "torch_images_per_s": t and t["images_per_s"],
                        "bccp_images_per_s": b.get("images_per_s"),
                        "ratio": ratio(b.get("images_per_s"), t and t["images_per_s"]),
                        "bccp_weights": b.get("weights"),
                        "bccp_error": b.get("error"),
                    }
                )

    if "finetune" not in skip:
        for model, tb in sz["train"]:
            for dt in ("f32", "bf16"):
                t = guarded(
                    f"torch finetune {model} {dt}",
                    lambda: torch_finetune(torch, dev, run, model, dt, tb, sz["train_size"], budget, args.reps),
                )
                b = bccp_train.get((model, dt), {})
                result["finetune"].append(
                    {
                        "model": model, "dtype": dt, "batch": tb, "size": sz["train_size"],
                        "torch_images_per_s": t and t["images_per_s"],
                        "bccp_images_per_s": b.get("images_per_s"),
                        "ratio": ratio(b.get("images_per_s"), t and t["images_per_s"]),
                        "bccp_error": b.get("error"),
                    }
                )

    result["elapsed_s"] = round(time.monotonic() - clock.t0, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    print(f"wrote {args.out} ({result['elapsed_s']} s)")


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def print_table(r):
    print(f"\n## bccp vs torch {r['torch']} on {r['device']} ({r['mode']})\n")
    print("| workload | torch | bccp | bccp/torch |")
    print("| --- | ---: | ---: | ---: |")
    for x in r["distance"]:
        print(
            f"| distance {x['metric']} Q={x['q']} N={x['n']} D={x['d']} (Mpairs/s) | "
            f"{fmt(x['torch_mpairs_per_s'])} | {fmt(x['bccp_mpairs_per_s'])} | {fmt(x['ratio'], 2)} |"
        )
    for x in r["distance_bench"]:
        print(
            f"| bench distance {x['metric']} Q={x['q']} N={x['n']} D={x['d']} (Mpairs/s) | "
            f"{fmt(x['torch_mpairs_per_s'])} | {fmt(x['bccp_criterion_mpairs_per_s'])} | {fmt(x['ratio'], 2)} |"
        )
    for x in r["embed"]:
        b = fmt(x["bccp_images_per_s"]) if x["bccp_error"] is None else "error"
        print(
            f"| embed {x['model']} {x['dtype']} batch {x['batch']} {x['size']}² (images/s) | "
            f"{fmt(x['torch_images_per_s'])} | {b} | {fmt(x['ratio'], 2)} |"
        )
    for x in r["finetune"]:
        b = fmt(x["bccp_images_per_s"]) if x["bccp_error"] is None else "error"
        print(
            f"| finetune {x['model']} {x['dtype']} batch {x['batch']} {x['size']}² (images/s) | "
            f"{fmt(x['torch_images_per_s'])} | {b} | {fmt(x['ratio'], 2)} |"
        )
    for e in r["errors"]:
        print(f"- {e}")


if __name__ == "__main__":
    main()
