#!/usr/bin/env bash
# Checks and measures a CUDA build of bccp on a card machine (an NVIDIA GPU, its driver, and
# PyTorch with its CUDA 13 libraries; no cargo needed). Runs from inside a bundle made by
# scripts/build-cuda.sh, or from a repository root holding one in gpu-bundle/.
#
# Usage:
#   bash scripts/gpu-check.sh              on the card machine (under 6 minutes)
#   bash scripts/gpu-check.sh --dry-run    logic check on a CPU machine (also BCCP_GPU_CHECK_CPU=1):
#                                          the bundled executables on the CPU (tests/cuda.rs with
#                                          BCCP_CUDA_TESTS_DEVICE=cpu, a stub libcuda), the
#                                          comparison with --cpu-smoke; proves the plumbing only
# Steps, each under `timeout` within an overall budget (BCCP_GPU_CHECK_BUDGET_S, default 330 s):
#   1. nvidia-smi (missing → stop: not a GPU machine); the driver must be 580 or newer (CUDA
#      13.0, what the bundle's PTX and libraries are built for), else stop saying so
#   2. PyTorch's CUDA libraries (site-packages nvidia/*/lib and torch/lib) → LD_LIBRARY_PATH;
#      PyTorch's CUDA must be 13.x; every library the executables need must resolve (ldd),
#      else stop with the list of what is missing and the versions found
#   3. bin/tests/cuda (tests/cuda.rs: CUDA against CPU), each test in its own process (a fault
#      must not poison the CUDA context of the others), then bin/tests/lib (unit tests);
#      compute-sanitizer memcheck and racecheck over the small tests when the machine has it
#      (recorded "not supported" otherwise)
#   4. the bccp command on CUDA: embed two photos, closest pairs among them
#   5. bin/benches/distance, criterion group distance_cuda (--warm-up-time 1 --measurement-time 3)
#   6. scripts/gpu_compare.py: PyTorch against bccp on the same card (its perf_* probes)
# Writes $OUT/gpu-results.json when $OUT is set (else ./gpu-results.json), logs beside it in
# gpu-logs/, prints a table of the ratios bccp/torch. Exit status: 0 when every step passed.
# Environment: BCCP_PYTHON (default python3; in --dry-run assets/torch-venv/bin/python when
# present), BCCP_GPU_BUNDLE (the bundle folder, if not found by itself),
# BCCP_GPU_CHECK_SANITIZER=0 (skip step 3's compute-sanitizer runs, about a minute each).
set -uo pipefail

CPU_MODE=0
case "${1:-}" in
    --dry-run | --cpu) CPU_MODE=1 ;;
    "") ;;
    -h | --help)
        sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument $1 (see --help)" >&2
        exit 2
        ;;
esac
[[ ${BCCP_GPU_CHECK_CPU:-0} == 1 ]] && CPU_MODE=1

T0=$SECONDS
BUDGET=${BCCP_GPU_CHECK_BUDGET_S:-330}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RESULTS=${OUT:+$OUT/}gpu-results.json
RESULTS=$(cd "$(dirname "$RESULTS")" && pwd)/$(basename "$RESULTS")
LOGS=$(dirname "$RESULTS")/gpu-logs
mkdir -p "$LOGS"
STEPS=$LOGS/steps.tsv
: >"$STEPS"
FAILED=0

say() { printf '[gpu-check %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
record() { # record NAME STATUS SECONDS SUMMARY
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$STEPS"
    [[ $2 == fail ]] && FAILED=1
    say "$1: $2 (${3}s) $4"
}

# run_step NAME MAX_SECONDS LOG CMD... : runs CMD under timeout (capped by the budget left).
run_step() {
    local name=$1 max=$2 log=$3
    shift 3
    local l
    l=$(left)
    if ((l < 10)); then
        record "$name" skipped 0 "out of time (budget ${BUDGET}s)"
        return 1
    fi
    ((max > l - 5)) && max=$((l - 5))
    say "$name (timeout ${max}s): $*"
    local t=$SECONDS rc
    timeout --kill-after=5 "$max" "$@" >"$log" 2>&1
    rc=$?
    STEP_RC=$rc
    STEP_S=$((SECONDS - t))
    if ((rc == 124 || rc == 137)); then
        record "$name" fail "$STEP_S" "timed out after ${max}s; log $(basename "$log")"
        tail -5 "$log" | sed 's/^/    /'
        return 1
    fi
    return 0
}

# Writes the results JSON (also on an early stop) and exits with the overall status.
finish() {
    local py=${PY:-python3}
    command -v "$py" >/dev/null 2>&1 || py=python3
    "$py" - "$STEPS" "$LOGS" "$RESULTS" "$CPU_MODE" "$((SECONDS - T0))" <<'PY' || echo "could not write the results JSON" >&2
import json, os, re, sys
steps_path, logs, results, cpu, total = sys.argv[1:]
steps = []
for line in open(steps_path):
    name, status, secs, summary = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
    steps.append({"name": name, "status": status, "seconds": int(secs or 0), "summary": summary})
def read(name):
    p = os.path.join(logs, name)
    return open(p, errors="replace").read() if os.path.exists(p) else None
out = {
    "mode": "cpu-dry-run" if cpu == "1" else "gpu",
    "total_seconds": int(total),
    "passed": all(s["status"] != "fail" for s in steps),
    "steps": steps,
    "nvidia_smi": read("nvidia-smi.txt"),
    "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
}
bench = read("bench.log") or ""
out["criterion"] = [
    {"id": m.group(1), "thrpt": m.group(2).strip()}
    for m in re.finditer(r"(distance_cuda/\S+)\s+time:.*?\n\s+thrpt:\s+\[(.*?)\]", bench, re.S)
]
cmp_path = os.path.join(logs, "gpu-compare.json")
if os.path.exists(cmp_path):
    out["compare"] = json.load(open(cmp_path))
json.dump(out, open(results, "w"), indent=2)
print(f"\n{'step':<22} {'status':<8} {'s':>4}  summary")
for s in steps:
    print(f"{s['name']:<22} {s['status']:<8} {s['seconds']:>4}  {s['summary']}")
c = out.get("compare")
if c:
    print("\nratios bccp/torch (> 1: bccp faster):")
    for x in c.get("distance", []):
        print(f"  distance {x['metric']:<7} Q={x['q']} N={x['n']} D={x['d']}: {x['ratio']}")
    for x in c.get("distance_bench", []):
        print(f"  bench    {x['metric']:<7} Q={x['q']} N={x['n']} D={x['d']}: {x['ratio']}")
    for x in c.get("embed", []):
        r = x["ratio"] if not x.get("bccp_error") else "error: " + x["bccp_error"][:60]
        print(f"  embed    {x['model']} {x['dtype']}: {r}")
    for x in c.get("finetune", []):
        r = x["ratio"] if not x.get("bccp_error") else "error: " + x["bccp_error"][:60]
        print(f"  finetune {x['model']} {x['dtype']}: {r}")
print(f"\nwrote {results}")
PY
    say "done: $([[ $FAILED == 0 ]] && echo 'all steps passed' || echo 'some steps FAILED')"
    exit "$FAILED"
}

# ---- the bundle ------------------------------------------------------------------------------
# A folder with bin/ (or bin.tar.xz, as scripts/build-cuda.sh packs it) and the assets.
BUNDLE=
for cand in "${BCCP_GPU_BUNDLE:-}" "$SCRIPT_DIR/.." "$PWD" "$PWD/gpu-bundle" "$SCRIPT_DIR/../gpu-bundle"; do
    if [[ -n $cand && (-x $cand/bin/tests/cuda || -f $cand/bin.tar.xz) ]]; then
        BUNDLE=$(cd "$cand" && pwd)
        break
    fi
done
BIN=${BUNDLE:+$BUNDLE/bin}
# ---- 1. the GPU --------------------------------------------------------------------------------
if ((CPU_MODE)); then
    record nvidia-smi skipped 0 "dry run on the CPU"
else
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        record nvidia-smi fail 0 "nvidia-smi not found: not a GPU machine (BCCP_GPU_CHECK_CPU=1 or --dry-run for the CPU logic check)"
        finish
    fi
    if ! timeout 30 nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1; then
        cat "$LOGS/nvidia-smi.txt"
        record nvidia-smi fail 0 "nvidia-smi failed: no usable GPU or driver"
        finish
    fi
    cat "$LOGS/nvidia-smi.txt"
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    if [[ ! ${driver%%.*} =~ ^[0-9]+$ ]] || ((${driver%%.*} < 580)); then
        record nvidia-smi fail 0 "driver '${driver:-unknown}' is older than 580: the bundle is built for CUDA 13.0, which needs driver 580 or newer"
        finish
    fi
    record nvidia-smi pass 0 "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
fi

# ---- 2. Python, PyTorch and its CUDA libraries -------------------------------------------------
PY=${BCCP_PYTHON:-python3}
if ((CPU_MODE)) && [[ -z ${BCCP_PYTHON:-} ]]; then
    for cand in "$SCRIPT_DIR/../assets/torch-venv/bin/python" "$SCRIPT_DIR/../../assets/torch-venv/bin/python" \
        "$PWD/assets/torch-venv/bin/python"; do
        [[ -x $cand ]] && PY=$cand && break
    done
fi
LIBDIRS=$("$PY" - <<'PY' 2>"$LOGS/torch-libs.err"
import glob, os, torch
sp = os.path.dirname(os.path.dirname(torch.__file__))
dirs = sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
dirs += [os.path.join(sp, "nvidia", "lib"), os.path.join(os.path.dirname(torch.__file__), "lib")]
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)
if [[ -z $LIBDIRS && -s $LOGS/torch-libs.err ]]; then
    record torch fail 0 "$PY cannot import torch: $(tail -1 "$LOGS/torch-libs.err")"
    finish
fi
TORCH_INFO=$("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1)
if ((!CPU_MODE)) && [[ $TORCH_INFO != *"GPU: "* || $TORCH_INFO == *"GPU: none" ]]; then
    record torch fail 0 "torch sees no GPU: $TORCH_INFO"
    finish
fi
if ((!CPU_MODE)) && [[ $TORCH_INFO != *" cuda 13."* ]]; then
    record torch fail 0 "torch's CUDA is not 13.x ($TORCH_INFO): the bundle links CUDA 13 libraries (libcublas.so.13, libcudart.so.13, libnvrtc.so.13, libcurand.so.10); install a PyTorch built for CUDA 13"
    finish
fi
record torch pass 0 "$PY: torch $TORCH_INFO"
export LD_LIBRARY_PATH=$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

if [[ -z $BUNDLE ]]; then
    if ((CPU_MODE)); then
        record bundle skipped 0 "no bundle (bin/tests/cuda or bin.tar.xz) found: only the PyTorch side runs"
    else
        record bundle fail 0 "no bundle (bin/tests/cuda or bin.tar.xz) here, in ./gpu-bundle or BCCP_GPU_BUNDLE: run scripts/build-cuda.sh on the build machine and carry its output"
        finish
    fi
else
    if [[ ! -x $BIN/tests/cuda ]]; then
        # Unpack the executables (221 MiB) into a temporary folder: neither into the bundle
        # (which must stay small enough to carry) nor under $OUT (whose files are sent back).
        dest=$(mktemp -d "${TMPDIR:-/tmp}/bccp-gpu-bin.XXXXXX")
        trap 'rm -rf "$dest"' EXIT
        t=$SECONDS
        if command -v xz >/dev/null 2>&1; then
            tar -C "$dest" -xJf "$BUNDLE/bin.tar.xz"
        else
            "$PY" -c '
import sys, tarfile
t = tarfile.open(sys.argv[1], "r:xz")
try:
    t.extractall(sys.argv[2], filter="data")
except TypeError:
    t.extractall(sys.argv[2])' "$BUNDLE/bin.tar.xz" "$dest"
        fi
        BIN=$dest/bin
        if [[ -x $BIN/tests/cuda ]]; then
            record unpack pass $((SECONDS - t)) "bin.tar.xz → $BIN ($(du -sm "$BIN" | cut -f1) MiB)"
        else
            record unpack fail $((SECONDS - t)) "cannot unpack $BUNDLE/bin.tar.xz into $dest"
            finish
        fi
    fi
    if ((CPU_MODE)); then
        # No driver here: the executables still need a libcuda.so.1 to start. Use the stub that
        # scripts/build-cuda.sh compiled (every call fails, so CUDA counts as unavailable), and
        # the toolchain cache's libraries when PyTorch's install has none.
        stub=
        for cand in "${BCCP_CUDA_CACHE:-}" "$BUNDLE/../.cuda" "$SCRIPT_DIR/../.cuda" "$PWD/.cuda"; do
            [[ -n $cand && -f $cand/cuda/lib/stubs/libcuda.so ]] && stub=$cand/cuda/lib && break
        done
        if [[ -n $stub ]]; then
            mkdir -p "$LOGS/stub"
            ln -sf "$(cd "$stub/stubs" && pwd)/libcuda.so" "$LOGS/stub/libcuda.so.1"
            stub=$(cd "$stub" && pwd)
            export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$LOGS/stub:$stub
        fi
    fi
    cd "$BUNDLE" || finish
    export BCCP_ASSETS=$BUNDLE/assets
    missing=$(for exe in "$BIN"/bccp "$BIN"/tests/* "$BIN"/benches/*; do
        [[ -x $exe ]] && ldd "$exe" 2>/dev/null | awk -v e="$exe" '/not found/ {print e": "$1}'
    done | sort -u)
    if [[ -n $missing ]]; then
        found=$(for d in ${LIBDIRS//:/ }; do ls "$d" 2>/dev/null; done | grep -E '^lib(cublas|cublasLt|cudart|nvrtc|curand)\.so\.[0-9]+$' | sort -u | tr '\n' ' ')
        record libraries fail 0 "unresolved: $(echo "$missing" | tr '\n' ' ')(LD_LIBRARY_PATH from $PY's torch: $LIBDIRS; CUDA libraries there: ${found:-none})"
        finish
    fi
    record libraries pass 0 "$(ldd "$BIN/tests/cuda" | grep -E 'lib(cuda|cublas|cublasLt|curand|nvrtc|cudart)\.so' | awk '{print $1"→"$3}' | tr '\n' ' ')"
    head -3 BUNDLE.txt 2>/dev/null

    # ---- 3. tests ------------------------------------------------------------------------------
    test_exe() { # test_exe NAME EXE MAX [ENV...] [-- ARGS...]
        local name=$1 exe=$2 max=$3
        shift 3
        local envs=()
        while (($#)) && [[ $1 != -- ]]; do
            envs+=("$1")
            shift
        done
        (($#)) && shift
        run_step "$name" "$max" "$LOGS/$name.log" env "${envs[@]}" "$exe" "$@" || return
        local summary
        summary=$(grep -E '^test result:' "$LOGS/$name.log" | tail -1)
        local failures
        failures=$(grep -E '^test .* FAILED$' "$LOGS/$name.log" | awk '{print $2}' | tr '\n' ' ')
        if ((STEP_RC == 0)); then
            record "$name" pass "$STEP_S" "$summary"
        else
            record "$name" fail "$STEP_S" "exit $STEP_RC; ${summary:-no summary} ${failures:+failed: $failures}; log gpu-logs/$name.log"
            grep -E -A12 '^---- .* stdout ----' "$LOGS/$name.log" | head -40 | sed 's/^/    /'
        fi
    }
    # One process per test of tests/cuda.rs: a launch failure or a fault poisons the CUDA
    # context of its process only, so every other test still reports.
    cuda_env=()
    ((CPU_MODE)) && cuda_env=(BCCP_CUDA_TESTS_DEVICE=cpu)
    mapfile -t cuda_tests < <("$BIN/tests/cuda" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
    if ((${#cuda_tests[@]} == 0)); then
        record tests-cuda fail 0 "$BIN/tests/cuda lists no tests: $("$BIN/tests/cuda" --list 2>&1 | tail -1)"
    fi
    for t in "${cuda_tests[@]}"; do
        # perf_* probes are measurements for step 6, not checks.
        [[ $t == perf_* ]] && continue
        test_exe "cuda-$t" "$BIN/tests/cuda" 90 "${cuda_env[@]}" -- --exact "$t"
    done
    # compute-sanitizer over the small cases: out-of-bounds and misaligned accesses (memcheck),
    # shared-memory races of the merge (racecheck).
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    small=(distance_sliced_inputs_match_cpu distance_small_and_sparse_candidate_sets_match_cpu
        distance_l1_at_1280_dims_runs_on_the_kernels depthwise_matches_cpu_forward_and_backward)
    for tool in memcheck racecheck; do
        if ((CPU_MODE)) || [[ -z $sanitizer ]]; then
            record "sanitizer-$tool" skipped 0 "not supported here ($( ((CPU_MODE)) && echo 'dry run' || echo 'no compute-sanitizer'))"
            continue
        fi
        if [[ ${BCCP_GPU_CHECK_SANITIZER:-1} == 0 ]]; then
            record "sanitizer-$tool" skipped 0 "BCCP_GPU_CHECK_SANITIZER=0"
            continue
        fi
        for t in "${small[@]}"; do
            log=$LOGS/sanitizer-$tool-$t.log
            run_step "sanitizer-$tool-$t" 100 "$log" "$sanitizer" --tool "$tool" --error-exitcode 3 \
                "$BIN/tests/cuda" --exact "$t" || continue
            if ((STEP_RC == 0)); then
                record "sanitizer-$tool-$t" pass "$STEP_S" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
            else
                record "sanitizer-$tool-$t" fail "$STEP_S" "exit $STEP_RC: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard' "$log" | head -3 | tr '\n' ' ')"
            fi
        done
    done
    # The library's unit tests (CPU code, built with the cuda feature; device tests see the GPU).
    [[ -x $BIN/tests/lib ]] && ((!CPU_MODE)) && test_exe tests-lib "$BIN/tests/lib" 60

    # ---- 4. the command on CUDA ------------------------------------------------------------------
    if [[ -d tests/images && -f $BCCP_ASSETS/weights/mobilenet_v2.safetensors ]]; then
        devname=cuda
        ((CPU_MODE)) && devname=cpu
        t_cli=$SECONDS
        if run_step cli-embed 60 "$LOGS/cli.log" "$BIN/bccp" --quiet embed --data tests/images \
            --model mobilenet_v2 --weights "$BCCP_ASSETS/weights/mobilenet_v2.safetensors" --offline \
            --device "$devname" --no-cache --out "$LOGS/embeddings.safetensors" \
            && ((STEP_RC == 0)) \
            && run_step cli-closest 30 "$LOGS/cli-closest.log" "$BIN/bccp" --quiet closest \
                --queries "$LOGS/embeddings.safetensors" --candidates "$LOGS/embeddings.safetensors" \
                --metric l2 --k 2 --device "$devname" --out "$LOGS/closest.safetensors" \
            && ((STEP_RC == 0)); then
            record cli pass $((SECONDS - t_cli)) "embed + closest on $devname: $(tail -1 "$LOGS/cli-closest.log")"
        else
            record cli fail 0 "exit ${STEP_RC:-?}: $(tail -2 "$LOGS/cli.log" "$LOGS/cli-closest.log" 2>/dev/null | tr '\n' ' ')"
        fi
    fi

    # ---- 5. criterion bench ----------------------------------------------------------------------
    if [[ -x $BIN/benches/distance ]]; then
        if ((CPU_MODE)); then
            # Only that it starts (its libraries load, criterion parses the options): its
            # distance_cuda group opens CUDA device 0 even to list, and measuring on a CPU
            # takes minutes.
            bench_args=(--bench --warm-up-time 1 --measurement-time 3 --noplot --help)
        else
            bench_args=(--bench distance_cuda --warm-up-time 1 --measurement-time 3 --noplot)
        fi
        if CRITERION_HOME=$LOGS/criterion run_step bench-distance 100 "$LOGS/bench.log" \
            "$BIN/benches/distance" "${bench_args[@]}"; then
            if ((STEP_RC != 0)); then
                record bench-distance fail "$STEP_S" "exit $STEP_RC: $(tail -1 "$LOGS/bench.log")"
            elif ((CPU_MODE)); then
                record bench-distance pass "$STEP_S" "starts (--help); not measured on a CPU"
            else
                record bench-distance pass "$STEP_S" "$(grep -c 'thrpt:' "$LOGS/bench.log") throughputs"
            fi
        fi
    fi
fi

# ---- 6. PyTorch against bccp -------------------------------------------------------------------
COMPARE=$SCRIPT_DIR/gpu_compare.py
[[ -f $COMPARE ]] || COMPARE=${BUNDLE:-.}/scripts/gpu_compare.py
args=(--out "$LOGS/gpu-compare.json")
[[ -n $BUNDLE ]] && args+=(--bccp-tests "$BIN/tests/cuda")
[[ -f $LOGS/bench.log ]] && ((!CPU_MODE)) && args+=(--criterion-log "$LOGS/bench.log")
((CPU_MODE)) && args+=(--cpu-smoke)
l=$(left)
args+=(--deadline-s $((l > 60 ? l - 40 : 20)))
if run_step compare "$l" "$LOGS/compare.log" "$PY" "$COMPARE" "${args[@]}"; then
    sed -n '/^## /,$p' "$LOGS/compare.log"
    if ((STEP_RC == 0)); then
        errs=$(grep -c '^- ' "$LOGS/compare.log")
        record compare pass "$STEP_S" "$errs errors reported (see gpu-compare.json)"
    else
        record compare fail "$STEP_S" "exit $STEP_RC: $(tail -2 "$LOGS/compare.log" | tr '\n' ' ')"
    fi
fi
finish
