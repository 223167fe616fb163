"""Write tests/fixtures/mobilenet_v2_reference.safetensors: PyTorch reference embeddings of
torchvision's MobileNetV2 with the weights in assets/weights/mobilenet_v2.safetensors, which
bccp's own MobileNetV2 must reproduce.

Tensors in the fixture:
  pixels    uint8   [3, 64, 64, 3]  chelsea/coffee/astronaut.png, RGB, PIL bilinear to 64x64
  input     float32 [3, 3, 64, 64]  NCHW, (pixels / 255 - mean) / std, ImageNet mean/std
  features  float32 [3, 1280]       global average pool of model.features(input)

The weights file uses torchvision's old flat layout (features.N.conv.K); it is mapped to the
current module names and loaded strictly.

Regenerate (from the repository root, after scripts/fetch-assets.sh):
  scripts/setup-torch-venv.sh
  assets/torch-venv/bin/python scripts/mobilenet_v2_reference.py
"""

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.numpy import save_file
from safetensors.torch import load_file

from benchlib import assets_dir

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["chelsea.png", "coffee.png", "astronaut.png"]
SIZE = 64
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
REGEN = "scripts/setup-torch-venv.sh && assets/torch-venv/bin/python scripts/mobilenet_v2_reference.py"

# Old flat index inside `features.N.conv` -> current torchvision name. Block 1 has no
# expansion conv (depthwise, project); blocks 2..17 are expand, depthwise, project.
# Old indices 2 and 5 were ReLU6 modules without parameters.
CONV_MAP_BLOCK1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
CONV_MAP = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


def die(msg):
    sys.exit(f"mobilenet_v2_reference: error: {msg}")


def map_name(old):
    """Old flat-layout name (`features.3.conv.4.weight`) -> key of model.features.state_dict()."""
    m = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(.+)", old)
    if m:
        block, idx, rest = m.groups()
        table = CONV_MAP_BLOCK1 if block == "1" else CONV_MAP
        if idx not in table:
            die(f"unexpected tensor {old}")
        return f"{block}.conv.{table[idx]}.{rest}"
    m = re.fullmatch(r"features\.(\d+\.\d+\..+)", old)  # first and last ConvBNReLU: unchanged
    if not m:
        die(f"unexpected tensor {old}")
    return m.group(1)


def load_features(weights):
    model = torchvision.models.mobilenet_v2()  # random init; no download
    old = load_file(str(weights))
    new = {map_name(k): v for k, v in old.items()}
    if len(new) != len(old):
        die("name mapping is not one-to-one")
    expected = model.features.state_dict()
    missing = sorted(set(expected) - set(new))
    unexpected = sorted(set(new) - set(expected))
    if missing or unexpected:
        die(f"missing {missing[:5]}..., unexpected {unexpected[:5]}...")
    for k, v in new.items():
        if v.shape != expected[k].shape:
            die(f"shape mismatch for {k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}")
    model.features.load_state_dict(new, strict=True)
    return model.eval(), len(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=assets_dir() / "weights/mobilenet_v2.safetensors")
    ap.add_argument("--photos", type=Path, default=assets_dir() / "photos")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/mobilenet_v2_reference.safetensors")
    args = ap.parse_args()

    if not args.weights.is_file():
        die(f"{args.weights} not found: run scripts/fetch-assets.sh first")
    paths = [args.photos / name for name in IMAGES]
    for p in paths:
        if not p.is_file():
            die(f"{p} not found: run scripts/fetch-assets.sh first")

    model, n = load_features(args.weights)
    print(f"loaded {n} tensors strictly into torchvision {torchvision.__version__} mobilenet_v2().features")

    pixels = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for p in paths]
    ).astype(np.uint8)
    x = (pixels.astype(np.float32) / np.float32(255) - MEAN) / STD
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

    with torch.inference_mode():
        fmap = model.features(torch.from_numpy(x))
        features = fmap.mean(dim=(2, 3)).numpy().astype(np.float32)
    print(f"feature map {tuple(fmap.shape)} -> features {features.shape}")
    for name, f in zip(IMAGES, features):
        print(f"  {name:14s} L2 norm {np.linalg.norm(f):9.4f}  mean {f.mean():.4f}  max {f.max():.4f}")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    print("cosine similarity:\n" + np.array2string(unit @ unit.T, precision=4))

    metadata = {
        "images": ",".join(IMAGES),
        "preprocess": f"PIL convert('RGB').resize(({SIZE}, {SIZE}), BILINEAR); input = (pixels/255 - mean)/std in float32",
        "mean": "0.485,0.456,0.406",
        "std": "0.229,0.224,0.225",
        "model": "torchvision.models.mobilenet_v2().features, eval; features = mean over H, W",
        "weights": "assets/weights/mobilenet_v2.safetensors",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "regenerate": REGEN,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"pixels": pixels, "input": x, "features": features}, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
