"""Compare CPU embedding throughput of bccp with PyTorch: images/s of MobileNetV2 and ResNet-18
forwards on a batch of 32 x 3 x 224 x 224 float32.

PyTorch side: torchvision mobilenet_v2() and resnet18(), random init, eval mode,
torch.inference_mode(), torch.set_num_threads(--threads); a few warm-up forwards, then the
median of timed forwards (about --seconds per model).
bccp side: `cargo bench --bench embed -- --output-format bencher embed/` (criterion ids
embed/mobilenet_v2 and embed/resnet18, one iteration = one forward of 32 images), run with
RAYON_NUM_THREADS=--threads; ns/iter is converted to images/s. Three more bccp rows show the
earlier paths: MobileNetV2 through candle's tensor ops with bccp's depthwise op (before the
channels-last engine) and with candle's grouped convolution (before the depthwise op), and
ResNet-18 through candle-transformers' model (before the engine).

Prints a markdown table (model, PyTorch img/s, bccp img/s, bccp/PyTorch) and, with --json FILE,
writes the same as JSON.

Usage (from the repository root):
  scripts/setup-torch-venv.sh
  assets/torch-venv/bin/python scripts/compare_embed.py [--threads N] [--json FILE] [--skip-rust]
"""

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

from benchlib import bench_ns, cpu_model, run_cargo_bench, write_json
BATCH = 32
MODELS = ["mobilenet_v2", "resnet18"]
RUST_CMD = ["cargo", "bench", "--bench", "embed", "--", "--output-format", "bencher", "embed/"]
BENCH_LINE = re.compile(r"^test\s+embed/(\S+)\s+\.\.\.\s+bench:\s+([\d,._]+)\s+ns/iter")


def die(msg):
    sys.exit(f"compare_embed: error: {msg}")


def torch_images_per_s(name, seconds, warmup):
    """Median images/s of forwards of a BATCH x 3 x 224 x 224 batch."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(BATCH, 3, 224, 224)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        end = time.perf_counter() + seconds
        while len(times) < 3 or time.perf_counter() < end:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"  torch {name}: {len(times)} timed forwards, median {med * 1e3:.1f} ms/batch", file=sys.stderr)
    return BATCH / med


def rust_images_per_s(threads):
    """Run the criterion bench and return {model: images/s}."""
    out = run_cargo_bench(RUST_CMD, threads, die)
    result = {}
    for line in out.splitlines():
        m = BENCH_LINE.match(line.strip())
        if m:
            ns = bench_ns(m.group(2))
            result[m.group(1)] = BATCH / (ns * 1e-9)
    missing = [name for name in MODELS if name not in result]
    if missing:
        die(f"no bencher line for {', '.join('embed/' + n for n in missing)} in the cargo bench output")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both (default: all)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per PyTorch model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed PyTorch forwards per model")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--skip-rust", action="store_true", help="measure PyTorch only")
    args = ap.parse_args()
    if args.threads < 1:
        die("--threads must be at least 1")

    torch.set_num_threads(args.threads)
    info = {
        "threads": args.threads,
        "batch": BATCH,
        "input": [BATCH, 3, 224, 224],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_model(),
    }
    print(f"threads {args.threads} (torch reports {torch.get_num_threads()}), torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, CPU: {info['cpu']}")

    torch_ips = {name: torch_images_per_s(name, args.seconds, args.warmup) for name in MODELS}
    rust_ips = {} if args.skip_rust else rust_images_per_s(args.threads)

    rows = []
    print("\n| model | PyTorch img/s | bccp img/s | bccp/PyTorch |\n|---|---:|---:|---:|")
    for name in MODELS:
        t, r = torch_ips[name], rust_ips.get(name)
        ratio = r / t if r is not None else None
        rows.append({"model": name, "pytorch_img_s": t, "bccp_img_s": r, "ratio": ratio})
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
        print(f"| {name} | {t:.1f} | {fmt(r, '.1f')} | {fmt(ratio, '.2f')} |")
    # The same models through the earlier paths.
    for key, label in [
        ("mobilenet_v2_candle_ops", "mobilenet_v2, candle ops + depthwise op (before the channels-last engine)"),
        ("mobilenet_v2_grouped_conv", "mobilenet_v2, candle grouped conv (before the depthwise op)"),
        ("resnet18_candle_ops", "resnet18, candle-transformers' ResNet (before the channels-last engine)"),
    ]:
        before = rust_ips.get(key)
        if before is not None:
            t = torch_ips[key.split("_candle")[0].split("_grouped")[0]]
            rows.append({"model": key, "pytorch_img_s": t, "bccp_img_s": before, "ratio": before / t})
            print(f"| {label} | {t:.1f} | {before:.1f} | {before / t:.2f} |")

    write_json(args.json, {**info, "results": rows})


if __name__ == "__main__":
    main()
