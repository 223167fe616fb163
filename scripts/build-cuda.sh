#!/usr/bin/env bash
# Builds bccp with `--features cuda` on a machine with no GPU and no CUDA install, and packs
# what a card machine needs to test and benchmark that build into one folder (the "GPU bundle").
#
# Usage:
#   scripts/build-cuda.sh [OUT_DIR]       OUT_DIR defaults to gpu-bundle/ in the repo root
#   scripts/build-cuda.sh --toolchain     only install the CUDA toolchain cache, then print the
#                                         environment to `eval` for your own cargo commands
# Then, on the card machine (PyTorch with CUDA 13 libraries, an NVIDIA driver, no cargo):
#   cd OUT_DIR && bash scripts/gpu-check.sh          (see that script)
#
# Environment:
#   BCCP_CUDA_CACHE      toolchain cache (default .cuda/ in the repo root; ignored by git)
#   CARGO_TARGET_DIR     cargo's target folder (default target/)
#   CUDA_COMPUTE_CAP     GPU architecture of the PTX (default 90: H100/H200)
#   CUDARC_CUDA_VERSION  CUDA API level cudarc binds (default 13000)
#   BCCP_BUNDLE_TESTS    test executables to bundle (default "cuda lib": tests/cuda.rs and the
#                        library's unit tests; "all" bundles every test executable)
#   BCCP_BUNDLE_BENCHES  bench executables to bundle (default "distance", the one with CUDA
#                        benches; "all" bundles every bench)
#   BCCP_BUNDLE_MAX_MIB  size limit of the bundle (default 60; a card call carries 64 MiB)
#   PYTHON               Python with pip for the install (default python3)
#
# What it does:
#   1. Installs the CUDA 13.0 toolchain and libraries from PyPI wheels into
#      $BCCP_CUDA_CACHE/cuda (one CUDA_ROOT: bin/nvcc, include, nvvm, lib): nvidia-cuda-nvcc,
#      -crt, nvidia-nvvm, nvidia-cuda-cccl, -runtime, -nvrtc, nvidia-cublas (all 13.0.x) and
#      nvidia-curand 10.4.0.x (CUDA 13.0's). Pinned to 13.0 because the card machine's driver
#      (580) is CUDA 13.0: PTX from a newer nvcc does not load there. Adds the unversioned .so
#      links the linker wants, and lib/stubs/libcuda.so: candle 0.11's cudarc (0.19) *links*
#      the driver API (feature dynamic-linking: -lcuda -lnvrtc -lcurand -lcublas -lcublasLt, and
#      candle-kernels adds -lcudart), and no wheel ships libcuda, so a stub exporting every cu*
#      function of cudarc's bindings is compiled with cc (soname libcuda.so.1; the real driver
#      library is used at run time). Skipped when the cache is complete (a stamp file).
#   2. Builds in release mode for sm_$CUDA_COMPUTE_CAP: the bccp binary, the test executables
#      (`cargo test --no-run`) and the bench executables (`cargo bench --no-run`).
#   3. Copies the chosen executables (stripped) into OUT_DIR with scripts/gpu-check.sh,
#      scripts/gpu_compare.py, tests/fixtures/, models/, weights/mobilenet_v2.safetensors from the
#      assets folder (scripts/paths.sh: BCCP_ASSETS, BCCP_HOME, else the per-user one) as the
#      bundle's assets/ (tests/cuda.rs embeds with it) and three photos (gpu-check's command-line step). Every
#      executable carries the same ~50 MB of CUDA code, so they go into one bin.tar.xz (a
#      192 MiB xz dictionary stores that code about once; gpu-check.sh unpacks it to a temporary
#      folder). Prints the size; fails over BCCP_BUNDLE_MAX_MIB. No rpath points at this
#      machine: gpu-check.sh puts the card machine's PyTorch CUDA libraries on LD_LIBRARY_PATH.
#
# Time and sizes (measured on the 2-core build machine, nice 19):
#   toolchain install   19 s here, downloads included (a fast PyPI mirror; the wheels unpack
#                       to 1.2 GiB in .cuda/, cuBLASLt alone 515 MiB)
#   first build         ~10.5 min in a target folder that held a `cargo check --features cuda`
#                       (so candle-kernels' PTX was built): dependencies ~8 min, bccp's binary,
#                       tests and benches ~2.5 min. From an empty target folder add the
#                       candle-kernels nvcc step, ~13 min on 2 cores (not timed here)
#   rebuild             2–4.5 min after a change in src/ or tests/ (cargo test and cargo bench
#                       each build the library: release and bench profiles), ~1 s when nothing
#                       changed; packing ~1.5–2 min, skipped when the executables are unchanged
#   bundle              ~20 MiB: bin.tar.xz ~10 MiB (bccp 62 MiB, tests/cuda 57 MiB, tests/lib
#                       55 MiB, benches/distance 45 MiB stripped: 221 MiB), MobileNetV2 weights
#                       8.6 MiB, fixtures, photos and scripts ~1 MiB
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TOOLCHAIN_ONLY=0
if [[ "${1:-}" == "--toolchain" ]]; then
    TOOLCHAIN_ONLY=1
    shift
fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

OUT_DIR=${1:-$ROOT/gpu-bundle}
CACHE=${BCCP_CUDA_CACHE:-$ROOT/.cuda}
CUDA_ROOT_DIR=$CACHE/cuda
PYTHON=${PYTHON:-python3}
MAX_MIB=${BCCP_BUNDLE_MAX_MIB:-60}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

# The wheels (pip requirement specifiers). Changing this list re-installs the cache.
SPECS=(
    "nvidia-cuda-nvcc>=13.0,<13.1"
    "nvidia-cuda-crt>=13.0,<13.1"
    "nvidia-nvvm>=13.0,<13.1"
    "nvidia-cuda-cccl>=13.0,<13.1"
    "nvidia-cuda-runtime>=13.0,<13.1"
    "nvidia-cuda-nvrtc>=13.0,<13.1"
    "nvidia-cublas>=13.0,<13.1"
    "nvidia-curand>=10.4.0,<10.4.1"
)

log() { printf '[build-cuda %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# 1. Toolchain
# ---------------------------------------------------------------------------------------------
install_toolchain() {
    local stamp=$CUDA_ROOT_DIR/.bccp-toolchain
    local want
    want=$(printf '%s\n' "${SPECS[@]}")
    if [[ -f $stamp && "$(cat "$stamp")" == "$want" && -x $CUDA_ROOT_DIR/bin/nvcc ]]; then
        log "toolchain present: $CUDA_ROOT_DIR"
        return
    fi
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON to a Python with pip)"
    command -v cc >/dev/null || die "cc not found (needed for the libcuda stub)"
    local t0=$SECONDS
    log "installing the CUDA 13.0 wheels into $CACHE (a few minutes; ~1.6 GiB)"
    rm -rf "$CUDA_ROOT_DIR" "$CACHE/stage"
    mkdir -p "$CACHE/stage" "$CUDA_ROOT_DIR"
    local spec name
    for spec in "${SPECS[@]}"; do
        name=${spec%%[<>=]*}
        log "  $spec"
        "$PYTHON" -m pip install --quiet --no-deps --only-binary=:all: --root-user-action=ignore \
            --target "$CACHE/stage/$name" "$spec" \
            || die "pip could not install $spec"
        # Every wheel keeps its files under nvidia/cu13/ (CUDA 13) or nvidia/<part>/ (older
        # layouts): merge them into one tree.
        local part
        for part in "$CACHE/stage/$name"/nvidia/*/; do
            [[ -d $part ]] || continue
            cp -a "$part." "$CUDA_ROOT_DIR/"
        done
        grep -h '^Version:' "$CACHE/stage/$name"/*.dist-info/METADATA | sed "s/^/    $name /" >&2 || true
    done
    rm -rf "$CACHE/stage"
    [[ -x $CUDA_ROOT_DIR/bin/nvcc ]] || die "no bin/nvcc after the install"
    # nvcc looks for cicc and libdevice under nvvm/ next to bin/; the wheels already lay it so.
    [[ -d $CUDA_ROOT_DIR/nvvm ]] || die "no nvvm/ after the install"
    # Unversioned names for the linker (-lcublas → libcublas.so): the wheels ship only sonames.
    [[ -d $CUDA_ROOT_DIR/lib ]] || die "no lib/ after the install"
    local so base
    for so in "$CUDA_ROOT_DIR"/lib/lib*.so.*; do
        [[ -f $so ]] || continue
        base=${so%%.so.*}.so
        [[ -e $base ]] || ln -s "$(basename "$so")" "$base"
    done
    # The driver library comes with the NVIDIA driver, never in a wheel: link against a stub.
    make_libcuda_stub "$CUDA_ROOT_DIR/lib/stubs"
    printf '%s\n' "$want" >"$stamp"
    log "toolchain installed in $((SECONDS - t0)) s, $(du -sh "$CUDA_ROOT_DIR" | cut -f1)"
}

# A libcuda.so (soname libcuda.so.1) that exports every driver function cudarc declares.
make_libcuda_stub() {
    local dir=$1
    mkdir -p "$dir"
    if [[ -f $dir/libcuda.so ]]; then
        return
    fi
    local sys
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -1 || true)
    if [[ -z $sys ]]; then
        log "cudarc's sources are not in the cargo registry yet: fetching them"
        cargo fetch --quiet
        sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | sort -V | tail -1)
    fi
    local c=$dir/libcuda_stub.c
    {
        echo "/* Link-time stub of the CUDA driver API, generated by scripts/build-cuda.sh from"
        echo "   $sys. Never loaded at run time: the driver's libcuda.so.1 is. */"
        echo "#define STUB(name) int name(void) { return 999; /* CUDA_ERROR_UNKNOWN */ }"
        grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | sed 's/pub unsafe fn //' | sort -u \
            | sed 's/.*/STUB(&)/'
    } >"$c"
    cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$c" \
        || die "cannot compile the libcuda stub"
    log "libcuda stub: $(grep -c '^STUB(' "$c") symbols → $dir/libcuda.so"
}

install_toolchain

export CUDA_ROOT=$CUDA_ROOT_DIR CUDA_PATH=$CUDA_ROOT_DIR CUDA_HOME=$CUDA_ROOT_DIR
export PATH=$CUDA_ROOT_DIR/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
# ld resolves the libraries' own dependencies (libcublas.so.13 → libcublasLt.so.13) here.
export LD_LIBRARY_PATH=$CUDA_ROOT_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

if ((TOOLCHAIN_ONLY)); then
    cat <<EOF
export CUDA_ROOT=$CUDA_ROOT CUDA_PATH=$CUDA_PATH CUDA_HOME=$CUDA_HOME
export PATH=$CUDA_ROOT_DIR/bin:\$PATH
export CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION
export LD_LIBRARY_PATH=$CUDA_ROOT_DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
    exit 0
fi

nvcc --version | tail -2 >&2

# ---------------------------------------------------------------------------------------------
# 2. Build
# ---------------------------------------------------------------------------------------------
CARGO=(nice -n 19 cargo)
JSON_DIR=$(mktemp -d)
trap 'rm -rf "$JSON_DIR"' EXIT
t_build=$SECONDS
log "cargo build --release --features cuda (CARGO_TARGET_DIR=$CARGO_TARGET_DIR, sm_$CUDA_COMPUTE_CAP)"
"${CARGO[@]}" build --release --features cuda --bin bccp
log "cargo test --release --features cuda --no-run"
"${CARGO[@]}" test --release --features cuda --no-run --message-format=json-render-diagnostics \
    >"$JSON_DIR/test.json"
log "cargo bench --features cuda --no-run"
"${CARGO[@]}" bench --features cuda --no-run --message-format=json-render-diagnostics \
    >"$JSON_DIR/bench.json"
build_s=$((SECONDS - t_build))
log "build done in ${build_s} s"

# ---------------------------------------------------------------------------------------------
# 3. Bundle
# ---------------------------------------------------------------------------------------------
# Lines "KIND NAME PATH" of the executables cargo reported (KIND: lib, bin, test, bench).
executables() {
    "$PYTHON" - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") != "compiler-artifact" or not m.get("executable"):
            continue
        t = m["target"]
        kind = t["kind"][0]
        print(kind, t["name"], m["executable"])
PY
}
wanted() { # wanted LIST NAME KIND → 0 when NAME (or "lib" for the library's tests) is in LIST
    local list=$1 name=$2 kind=$3 w
    for w in $list; do
        [[ $w == all || $w == "$name" || ($w == lib && $kind == lib) ]] && return 0
    done
    return 1
}

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/bin/tests" "$OUT_DIR/bin/benches" "$OUT_DIR/scripts" "$OUT_DIR/tests" \
    "$OUT_DIR/assets/weights"
cp "$CARGO_TARGET_DIR/release/bccp" "$OUT_DIR/bin/bccp"
TESTS=${BCCP_BUNDLE_TESTS:-cuda lib}
BENCHES=${BCCP_BUNDLE_BENCHES:-distance}
while read -r kind name exe; do
    if [[ $kind == lib ]]; then dest=bin/tests/lib; else dest=bin/tests/$name; fi
    [[ $kind == bin ]] && continue # the binary's own unit tests: not needed on the card
    wanted "$TESTS" "$name" "$kind" && cp "$exe" "$OUT_DIR/$dest"
done < <(executables "$JSON_DIR/test.json")
while read -r kind name exe; do
    [[ $kind == bench ]] || continue
    wanted "$BENCHES" "$name" "$kind" && cp "$exe" "$OUT_DIR/bin/benches/$name"
done < <(executables "$JSON_DIR/bench.json")
[[ -f $OUT_DIR/bin/tests/cuda ]] || die "the cuda test executable was not built"
strip --strip-all "$OUT_DIR"/bin/bccp "$OUT_DIR"/bin/tests/* "$OUT_DIR"/bin/benches/*
raw_mib=$(du -sm "$OUT_DIR/bin" | cut -f1)
if [[ ${BCCP_BUNDLE_COMPRESS:-1} != 0 ]]; then
    # Every executable carries the same ~50 MB of CUDA code (candle's PTX and the fat binaries
    # of candle-kernels' libmoe.a, kept alive by their registration constructors), so one xz
    # stream with a dictionary larger than an executable stores it about once: ~230 MB → ~10 MB.
    # gpu-check.sh unpacks it (tar or Python's tarfile) on the card machine.
    # Packing takes ~2 min on 2 cores: reuse the last pack when the executables are the same.
    key=$(cd "$OUT_DIR" && find bin -type f | sort | xargs sha256sum | sha256sum | cut -c1-64)
    if [[ -f $CACHE/pack/bin.tar.xz && "$(cat "$CACHE/pack/key" 2>/dev/null)" == "$key" ]]; then
        log "executables unchanged: reusing $CACHE/pack/bin.tar.xz"
    else
        log "packing the executables (${raw_mib} MiB stripped) into bin.tar.xz (~2 min)"
        mkdir -p "$CACHE/pack"
        rm -f "$CACHE/pack/key"
        tar -C "$OUT_DIR" -cf - bin | xz -T1 --lzma2=preset=6,dict=192MiB -c >"$CACHE/pack/bin.tar.xz"
        echo "$key" >"$CACHE/pack/key"
    fi
    cp "$CACHE/pack/bin.tar.xz" "$OUT_DIR/bin.tar.xz"
    rm -rf "${OUT_DIR:?}/bin"
fi

cp scripts/gpu-check.sh scripts/gpu_compare.py "$OUT_DIR/scripts/"
cp -r tests/fixtures "$OUT_DIR/tests/"
cp -r models "$OUT_DIR/"
. "$ROOT/scripts/paths.sh"
assets_src=$(bccp_assets_dir)
weights=$assets_src/weights/mobilenet_v2.safetensors
if [[ -f $weights ]]; then
    cp "$weights" "$OUT_DIR/assets/weights/"
else
    log "warning: $weights missing (scripts/fetch-assets.sh): the MobileNetV2 CUDA test will fail"
fi
# Three photos in class folders for the command-line check (bccp embed / closest on CUDA).
for photo in chelsea.png coffee.png rocket.jpg; do
    src=$assets_src/photos/$photo
    [[ -f $src ]] || continue
    mkdir -p "$OUT_DIR/tests/images/${photo%.*}"
    cp "$src" "$OUT_DIR/tests/images/${photo%.*}/"
done
{
    echo "bccp GPU bundle, built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
    echo "features: cuda; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
    nvcc --version | tail -1
    echo "Run: bash scripts/gpu-check.sh   (needs the card machine's PyTorch CUDA libraries)"
} >"$OUT_DIR/BUNDLE.txt"

log "bundle contents:"
(cd "$OUT_DIR" && find . -type f -printf '%s\t%p\n' | sort -k2 \
    | awk -F'\t' '{printf "  %8.2f MiB  %s\n", $1/1048576, $2}') >&2
bytes=$(find "$OUT_DIR" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b/1048576}')
echo "bundle: $OUT_DIR  ${mib} MiB (executables: ${raw_mib} MiB stripped, packed into bin.tar.xz)  build ${build_s} s, total $((SECONDS - t_build)) s"
if awk -v b="$bytes" -v m="$MAX_MIB" 'BEGIN {exit !(b > m*1048576)}'; then
    die "the bundle is ${mib} MiB, over the ${MAX_MIB} MiB limit (fewer BCCP_BUNDLE_TESTS?)"
fi
