"""Compare CPU full fine-tuning throughput of bccp with PyTorch: images/s of training steps,
batch-norm statistics frozen, Adam, images already decoded — MobileNetV2 at 64 x 64 (batch 64)
and 224 x 224 (batch 32), ResNet-18 at 224 x 224 (batch 32), ViT-B/16 at 224 x 224 (batch 8).

PyTorch side: torchvision's network without its classifier (mobilenet_v2().features + global
average pooling, resnet18() with fc = Identity, vit_b_16() with heads = Identity: the class
token's output) + a fresh 10-class linear head, random init, batch-norm layers in eval mode
(frozen statistics; their affine parameters train, as bccp's folded convolutions do), ViT's
class token and position embeddings frozen (as bccp's), cross-entropy, Adam (lr 1e-3 head, 1e-4
backbone), torch.set_num_threads(--threads); a few warm-up steps, then the median of timed steps
(about --seconds).
bccp side: `cargo bench --bench finetune -- --output-format bencher finetune` (criterion ids
GROUP/channels_last, the trainer `bccp train --finetune full` runs on the CPU for the CNNs
(MobileNetV2, ResNet-18), and GROUP/candle_autograd, candle's autograd path: ViT trains on it;
one iteration = an epoch of 2-4 steps, so that a run's setup weighs on a step as little as in real runs), run with
RAYON_NUM_THREADS=--threads; ns/iter is converted to images/s.

Mixed precision: the CNNs are also timed with bf16 products, PyTorch under
torch.autocast("cpu", dtype=torch.bfloat16) around the forward and the loss (its CPU autocast:
convolutions and linear layers on bf16 operands, weights and optimiser f32) against bccp's
GROUP/channels_last_bf16 (`bccp train --precision bf16`: every dense and pointwise product on
bf16 operands with f32 sums; present when the CPU has AVX512-BF16). For ResNet-18 also
GROUP/channels_last_im2col: its 3×3 convolutions through im2col instead of Winograd's
F(2×2, 3×3) transforms (the engine before them).

Prints a markdown table (model, input, path, precision, PyTorch img/s in that precision, bccp
img/s, bccp/PyTorch, and bccp/PyTorch-f32) and, with --json FILE, writes the same as JSON.

Usage (from the repository root): scripts/bench-finetune.sh [--threads N] [--json FILE]
[--group finetune224_resnet18]
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

CLASSES = 10
# (criterion group, model, input size, batch, bccp paths); STEPS: batches per criterion
# iteration of each group (one epoch of that many steps, as benches/finetune.rs runs them).
SHAPES = [("finetune64", "mobilenet_v2", 64, 64, ["channels_last", "channels_last_bf16", "candle_autograd"]),
          ("finetune224", "mobilenet_v2", 224, 32, ["channels_last", "channels_last_bf16"]),
          ("finetune224_resnet18", "resnet18", 224, 32, ["channels_last", "channels_last_im2col",
                                                          "channels_last_bf16"]),
          ("finetune224_vit_b16", "vit_b_16", 224, 8, ["candle_autograd", "candle_autograd_bf16"])]
STEPS = {"finetune64": 4, "finetune224": 3, "finetune224_resnet18": 3, "finetune224_vit_b16": 2}
# bccp paths that run bf16 products (optional: only on CPUs with AVX512-BF16).
BF16_PATHS = {"channels_last_bf16", "candle_autograd_bf16"}
RUST_CMD = ["cargo", "bench", "--bench", "finetune", "--", "--output-format", "bencher", "finetune"]
BENCH_LINE = re.compile(r"^test\s+(finetune\w+)/(\S+)\s+\.\.\.\s+bench:\s+([\d,._]+)\s+ns/iter")


def die(msg):
    sys.exit(f"compare_finetune: error: {msg}")


def torch_network(model):
    """(backbone returning pooled features, feature width) of a random-init torchvision model."""
    if model == "mobilenet_v2":
        features = torchvision.models.mobilenet_v2().features
        return torch.nn.Sequential(features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), 1280
    if model == "resnet18":
        net = torchvision.models.resnet18()
        net.fc = torch.nn.Identity()
        return net, 512
    if model == "vit_b_16":
        net = torchvision.models.vit_b_16()
        net.heads = torch.nn.Identity()
        net.class_token.requires_grad_(False)  # frozen, as in bccp
        net.encoder.pos_embedding.requires_grad_(False)
        return net, 768
    die(f"unknown model {model}")


def torch_images_per_s(model, size, batch, seconds, warmup, bf16=False):
    """Median images/s of training steps on a batch x 3 x size x size batch (with bf16: the
    forward and the loss under CPU autocast to bf16)."""
    torch.manual_seed(0)
    backbone, dim = torch_network(model)
    head = torch.nn.Linear(dim, CLASSES)
    backbone.train()
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # frozen running statistics
    opt_backbone = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-4)
    opt_head = torch.optim.Adam(head.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % CLASSES

    def step():
        opt_backbone.zero_grad(set_to_none=True)
        opt_head.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = backbone(x)
            loss = torch.nn.functional.cross_entropy(head(features), y)
        loss.backward()
        opt_backbone.step()
        opt_head.step()

    for _ in range(warmup):
        step()
    times = []
    end = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < end:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"  torch {model} {size}x{size} {'bf16' if bf16 else 'f32'}: {len(times)} timed steps, "
          f"median {med * 1e3:.1f} ms/batch", file=sys.stderr)
    return batch / med


def rust_images_per_s(threads, group):
    """Run the criterion bench (the groups starting with `group`) and return
    {(group, path): images/s}."""
    out = run_cargo_bench(RUST_CMD[:-1] + [group], threads, die)
    batches = {group: batch * STEPS[group] for group, _, _, batch, _ in SHAPES}
    result = {}
    for line in out.splitlines():
        m = BENCH_LINE.match(line.strip())
        if m and m.group(1) in batches:
            result[(m.group(1), m.group(2))] = batches[m.group(1)] / (bench_ns(m.group(3)) * 1e-9)
    missing = [f"{g}/{p}" for g, _, _, _, paths in SHAPES for p in paths
               if (g, p) not in result and p not in BF16_PATHS]
    if missing:
        die(f"no bencher line for {', '.join(missing)} in the cargo bench output")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both (default: all)")
    ap.add_argument("--seconds", type=float, default=15.0, help="timed seconds of PyTorch steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed PyTorch steps")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--group", default="finetune",
                    help="only the groups whose name starts with this, e.g. finetune224_resnet18 "
                         "(default: all)")
    args = ap.parse_args()
    if args.threads < 1:
        die("--threads must be at least 1")
    global SHAPES
    SHAPES = [s for s in SHAPES if s[0].startswith(args.group)]
    if not SHAPES:
        die(f"--group {args.group}: no group starts with it (groups: finetune64, finetune224, "
            "finetune224_resnet18, finetune224_vit_b16)")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    info = {
        "threads": args.threads,
        "shapes": [{"group": g, "model": m, "input": [b, 3, n, n]} for g, m, n, b, _ in SHAPES],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_model(),
        "loadavg_before": load,
    }
    print(f"threads {args.threads}, torch {torch.__version__}, CPU: {info['cpu']}, "
          f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    torch_ips = {}
    for g, m, n, b, paths in SHAPES:
        torch_ips[(g, "f32")] = torch_images_per_s(m, n, b, args.seconds, args.warmup)
        if BF16_PATHS & set(paths):
            torch_ips[(g, "bf16")] = torch_images_per_s(m, n, b, args.seconds, args.warmup, bf16=True)
    rust_ips = rust_images_per_s(args.threads, args.group)
    info["loadavg_after"] = os.getloadavg()
    rows = []
    print("\n| model | input, batch | path | precision | PyTorch img/s | bccp img/s | bccp/PyTorch "
          "| bccp/PyTorch f32 |\n|---|---|---|---|---:|---:|---:|---:|")
    for g, m, n, b, paths in SHAPES:
        for path in paths:
            if (g, path) not in rust_ips:
                print(f"| {m} | {n}×{n}, {b} | {path} (no AVX512-BF16 here) | bf16 | – | – | – | – |")
                continue
            precision = "bf16" if path in BF16_PATHS else "f32"
            r, t, t32 = rust_ips[(g, path)], torch_ips[(g, precision)], torch_ips[(g, "f32")]
            rows.append({"group": g, "model": m, "size": n, "batch": b, "path": path, "precision": precision,
                         "pytorch_img_s": t, "pytorch_f32_img_s": t32, "bccp_img_s": r, "ratio": r / t,
                         "ratio_to_pytorch_f32": r / t32})
            print(f"| {m} | {n}×{n}, {b} | {path} | {precision} | {t:.1f} | {r:.1f} | {r / t:.2f} "
                  f"| {r / t32:.2f} |")
    speedup = None
    if ("finetune64", "candle_autograd") in rust_ips:
        speedup = rust_ips[("finetune64", "channels_last")] / rust_ips[("finetune64", "candle_autograd")]
        print(f"\nchannels_last / candle_autograd at 64x64: {speedup:.2f}x")
    print("load average after " + " ".join(f"{v:.2f}" for v in info["loadavg_after"]))
    write_json(args.json, {**info, "results": rows, "channels_last_over_candle": speedup})


if __name__ == "__main__":
    main()
