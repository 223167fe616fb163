#!/usr/bin/env python3
"""Write models/imagenet_classes.txt: the 1000 ImageNet-1k class names, one per line, in class
index order, taken from torchvision's `_IMAGENET_CATEGORIES` (torchvision/models/_meta.py).

Usage: scripts/imagenet_classes.py [TORCHVISION_WHEEL_OR__meta.py]
Without an argument it downloads the torchvision wheel from PyPI (no install, no torch needed)
and reads the list with `ast` (nothing is imported or executed).
"""

import ast
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "models", "imagenet_classes.txt")


def meta_source(arg):
    if arg and arg.endswith(".py"):
        with open(arg, encoding="utf-8") as fh:
            return fh.read()
    wheel = arg
    if not wheel:
        tmp = tempfile.mkdtemp()
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "-d", tmp, "torchvision"], check=True)
        wheel = glob.glob(os.path.join(tmp, "torchvision-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        return z.read("torchvision/models/_meta.py").decode("utf-8")


def main():
    source = meta_source(sys.argv[1] if len(sys.argv) > 1 else None)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_IMAGENET_CATEGORIES" for t in node.targets):
            names = ast.literal_eval(node.value)
            break
    else:
        sys.exit("error: _IMAGENET_CATEGORIES not found in torchvision/models/_meta.py")
    if len(names) != 1000:
        sys.exit(f"error: expected 1000 names, found {len(names)}")
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(names) + "\n")
    os.replace(tmp, OUT)
    print(f"wrote {len(names)} names to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
