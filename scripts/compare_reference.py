"""Compare a whole Monday training run of `bccp train` with the reference BCCP pipeline's way of
training in PyTorch: same images, same input size, same train/test split, same thread count.

bccp side: `target/release/bccp -q train -d DATASET -t monday --monday-num N --image-size S
--device cpu --runs-dir TMP --no-cache --model-name cmp` with RAYON_NUM_THREADS=--threads, timed
as a subprocess (wall time; --no-cache, so it embeds every image too). Test accuracy comes from
TMP/cmp/1/metrics.json and the split from TMP/cmp/1/split.json (monday_train / monday_test:
record ids). A bccp that writes no split.json gets the same split recomputed here (bccp's
SplitMix64 shuffle of the first N records, 80/20, fixed seed) and checked against the test
class counts in bccp's confusion matrix.

PyTorch side, as the reference trains: torchvision mobilenet_v2().features with the real weights
(assets/weights/mobilenet_v2.safetensors, mapped as in scripts/mobilenet_v2_reference.py),
frozen and in eval mode, global average pool, a trainable nn.Linear(1280, classes). Every epoch a
DataLoader (batch 64, shuffled, --workers worker processes, default 0 = in the main process)
decodes each image again (PIL open, RGB, bilinear resize to S x S, ToTensor, ImageNet Normalize)
and the backbone is re-run on every batch. Adam lr 1e-3, StepLR x0.95 per epoch, cross-entropy,
--epochs epochs (default 15), torch.set_num_threads(--threads). The wall time covers model
loading, data loading, the epochs and the test evaluation. With --epochs below 15 the 15-epoch
time is also projected: (measured time outside the epochs) + (first epoch, with its warm-up)
+ 14 x (mean of the measured epochs after the first; the first itself when --epochs 1).

Prints a markdown table (pipeline, wall seconds, test accuracy, PyTorch s / bccp s) and, with
--json FILE, writes the same as JSON.

Usage (from the repository root, after scripts/run-default.sh or `bccp prepare`):
  scripts/setup-torch-venv.sh
  assets/torch-venv/bin/python scripts/compare_reference.py [--threads N] [--monday-num N]
      [--image-size S] [--epochs E] [--json FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from benchlib import assets_dir, cpu_model, write_json
from mobilenet_v2_reference import load_features

ROOT = Path(__file__).resolve().parent.parent
FULL_EPOCHS = 15
BATCH = 64
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
SPLIT_SEED = 0x5917  # bccp's pipeline::SPLIT_SEED; Monday is stream 0
TRAIN_SHARE = 0.8


def die(msg):
    sys.exit(f"compare_reference: error: {msg}")


def log(msg):
    print(f"  {msg}", file=sys.stderr, flush=True)


# --- bccp's split, for a bccp that writes no split.json --------------------------------------

def _mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class SplitMix64:
    """bccp's rng::Rng: derive(seed, stream), next_u64, below (Lemire), Fisher-Yates shuffle."""

    def __init__(self, seed, stream):
        self.state = _mix(_mix(seed ^ _mix((stream + GOLDEN) & MASK)))

    def next_u64(self):
        self.state = (self.state + GOLDEN) & MASK
        return _mix(self.state)

    def below(self, n):
        threshold = (-n & MASK) % n
        while True:
            product = self.next_u64() * n
            if product & MASK >= threshold:
                return product >> 64

    def shuffle(self, items):
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def recompute_split(records):
    order = list(range(len(records)))
    SplitMix64(SPLIT_SEED, 0).shuffle(order)
    n_train = int(len(records) * TRAIN_SHARE + 0.5)  # Rust's f64::round (half away from zero)
    return ([records[i]["id"] for i in sorted(order[:n_train])],
            [records[i]["id"] for i in sorted(order[n_train:])])


# --- bccp -------------------------------------------------------------------------------------

def run_bccp(args, records):
    binary = ROOT / "target/release/bccp"
    if not binary.is_file():
        die(f"{binary} not found: build it with `cargo build --release`")
    with tempfile.TemporaryDirectory(prefix="bccp-cmp-") as tmp:
        cmd = [str(binary), "-q", "train", "-d", str(args.dataset), "-t", "monday",
               "--monday-num", str(args.monday_num), "--image-size", str(args.image_size),
               "--device", "cpu", "--runs-dir", tmp, "--no-cache", "--model-name", "cmp"]
        log(f"running: RAYON_NUM_THREADS={args.threads} {' '.join(cmd)}")
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout)
            die(f"bccp train failed with exit status {proc.returncode}")
        run = Path(tmp) / "cmp" / "1"
        try:
            metrics = json.loads((run / "metrics.json").read_text())
        except (OSError, ValueError) as e:
            die(f"cannot read bccp's metrics.json: {e}")
        split_file = run / "split.json"
        if split_file.is_file():
            split = json.loads(split_file.read_text())
            train_ids, test_ids, split_source = split["monday_train"], split["monday_test"], "split.json"
        else:
            train_ids, test_ids = recompute_split(records)
            split_source = "recomputed (this bccp writes no split.json)"
            by_id = {r["id"]: r for r in records}
            counts = [0] * len(metrics["confusion"])
            for i in test_ids:
                counts[by_id[i]["target"]] += 1
            if counts != [sum(row) for row in metrics["confusion"]]:
                die("recomputed split disagrees with bccp's test class counts; rebuild bccp so it writes split.json")
    log(f"bccp: {seconds:.1f} s, test accuracy {metrics['test_accuracy']:.4f}")
    return seconds, metrics["test_accuracy"], train_ids, test_ids, split_source, cmd


# --- PyTorch reference ------------------------------------------------------------------------

class Images(torch.utils.data.Dataset):
    """Decodes and transforms an image on every access, as the reference's dataset does."""

    def __init__(self, root, records, size):
        self.items = [(root / r["image_path"], r["target"]) for r in records]
        self.transform = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, target = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), target


class Classifier(nn.Module):
    def __init__(self, features, classes):
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        self.head = nn.Linear(1280, classes)

    def train(self, mode=True):  # the backbone stays in eval mode (frozen BatchNorm statistics)
        self.head.train(mode)
        return self

    def forward(self, x):
        with torch.no_grad():
            x = self.features(x).mean(dim=(2, 3))
        return self.head(x)


def run_torch(args, train_records, test_records, classes):
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = Classifier(load_features(args.weights)[0].features, classes)
    loader = lambda recs, shuffle: torch.utils.data.DataLoader(
        Images(args.dataset, recs, args.image_size), batch_size=BATCH, shuffle=shuffle, num_workers=args.workers)
    train_loader, test_loader = loader(train_records, True), loader(test_records, False)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.95)
    loss_fn = nn.CrossEntropyLoss()
    epoch_times = []
    for epoch in range(args.epochs):
        e0 = time.perf_counter()
        model.train()
        total = 0.0
        for x, y in train_loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
        sched.step()
        epoch_times.append(time.perf_counter() - e0)
        log(f"torch epoch {epoch + 1}/{args.epochs}: loss {total / len(train_records):.4f}, {epoch_times[-1]:.1f} s")
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in test_loader:
            correct += (model(x).argmax(1) == y).sum().item()
    seconds = time.perf_counter() - t0
    accuracy = correct / len(test_records)
    log(f"torch: {seconds:.1f} s, test accuracy {accuracy:.4f}")
    return seconds, accuracy, epoch_times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=ROOT / "runs/default/fashion-mnist-days",
                    help="folder made by `bccp prepare`")
    ap.add_argument("--weights", type=Path, default=assets_dir() / "weights/mobilenet_v2.safetensors")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both (default: all)")
    ap.add_argument("--monday-num", type=int, default=3000, help="first N Monday records (default 3000)")
    ap.add_argument("--image-size", type=int, default=64, help="input size S x S (default 64)")
    ap.add_argument("--epochs", type=int, default=FULL_EPOCHS,
                    help=f"PyTorch epochs (default {FULL_EPOCHS}; fewer also projects {FULL_EPOCHS})")
    ap.add_argument("--workers", type=int, default=0, help="PyTorch DataLoader worker processes (default 0)")
    ap.add_argument("--seed", type=int, default=42, help="PyTorch seed (init and shuffling)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args()
    for name in ("threads", "monday_num", "image_size", "epochs"):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        die("--workers must be at least 0")
    args.dataset = args.dataset.resolve()
    for f in ("monday.jsonl", "dataset.json"):
        if not (args.dataset / f).is_file():
            die(f"{args.dataset / f} not found: run scripts/run-default.sh, or "
                f"`bccp prepare` to make a dataset folder and pass it with --dataset")
    if not args.weights.is_file():
        die(f"{args.weights} not found: run scripts/fetch-assets.sh first")

    torch.set_num_threads(args.threads)
    classes = len(json.loads((args.dataset / "dataset.json").read_text())["classes"])
    with open(args.dataset / "monday.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()][: args.monday_num]
    info = {
        "threads": args.threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_model(),
        "dataset": str(args.dataset),
        "monday_num": len(records),
        "image_size": args.image_size,
        "epochs": args.epochs,
        "dataloader_workers": args.workers,
        "loadavg_1min_before": os.getloadavg()[0],
    }
    print(f"threads {args.threads} (torch reports {torch.get_num_threads()}), torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, CPU: {info['cpu']}")

    b_sec, b_acc, train_ids, test_ids, split_source, cmd = run_bccp(args, records)
    by_id = {r["id"]: r for r in records}
    missing = [i for i in train_ids + test_ids if i not in by_id]
    if missing:
        die(f"{len(missing)} split ids (e.g. {missing[0]}) are not among the first {len(records)} Monday records")
    train_records, test_records = [by_id[i] for i in train_ids], [by_id[i] for i in test_ids]
    info.update(bccp_command=f"RAYON_NUM_THREADS={args.threads} " + " ".join(cmd), split=split_source,
                train_size=len(train_records), test_size=len(test_records))
    print(f"split ({split_source}): {len(train_records)} train, {len(test_records)} test images, "
          f"{args.image_size}x{args.image_size}")

    t_sec, t_acc, epoch_times = run_torch(args, train_records, test_records, classes)
    rows = [{"pipeline": "bccp train", "seconds": b_sec, "test_accuracy": b_acc, "ratio": 1.0},
            {"pipeline": f"PyTorch reference, {args.epochs} epochs (measured)", "seconds": t_sec,
             "test_accuracy": t_acc, "ratio": t_sec / b_sec}]
    if args.epochs < FULL_EPOCHS:
        # The first epoch carries one-off warm-up (oneDNN primitives); later epochs are steady.
        first, later = epoch_times[0], epoch_times[1:] or epoch_times[:1]
        steady = sum(later) / len(later)
        outside = t_sec - sum(epoch_times)
        projected = outside + first + (FULL_EPOCHS - 1) * steady
        rows.append({"pipeline": f"PyTorch reference, {FULL_EPOCHS} epochs (projected)", "seconds": projected,
                     "test_accuracy": None, "ratio": projected / b_sec})
        print(f"projected {FULL_EPOCHS}-epoch time = {outside:.1f} s outside the epochs + first epoch {first:.1f} s "
              f"+ {FULL_EPOCHS - 1} x {steady:.1f} s (mean of the measured epochs after the first)")
    info["torch_epoch_seconds"] = epoch_times
    print(f"1-minute load average before the runs: {info['loadavg_1min_before']:.2f} "
          f"(other work on the machine skews both timings)")

    print("\n| pipeline | wall s | test accuracy | PyTorch s / bccp s |\n|---|---:|---:|---:|")
    for r in rows:
        acc = "n/a" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        print(f"| {r['pipeline']} | {r['seconds']:.1f} | {acc} | {r['ratio']:.1f} |")

    write_json(args.json, {**info, "results": rows})


if __name__ == "__main__":
    main()
