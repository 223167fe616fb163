"""Runs the load test of scripts/bench-serve.sh (standard library only): for each input size
and stack (the reference as its app.py is written, the reference tuned with torch.no_grad(),
`bccp serve`, and with --bf16 `bccp serve --precision bf16`), starts the server, warms it up, then `wrk` at each concurrency for a bounded time
with JSON `{"image_path": ...}` requests cycling over the same images, and prints one markdown
table: requests/s, p50 and p99 latency, errors. Against 127.0.0.1 only.

Usage: python3 bench_serve.py --bccp BIN --runs DIR --days DIR --python PY --reference FILE
       --weights W --cache DIR [--sizes 256,64] [--concurrency 1,8,32] [--seconds 10]
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import free_port, start_reference_server, wait_ready



def seconds(value, unit):
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url, script, connections, duration):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "30s",
         "-s", script, url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        lat[q] = seconds(*m.groups()) if m else float("nan")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, lat["50"], lat["99"], errors, total


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bccp", required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--days", required=True)
    p.add_argument("--python", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--sizes", default="256,64")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--bf16", action="store_true",
                   help="also time `bccp serve --precision bf16` (CPUs with AVX512-BF16)")
    args = p.parse_args()

    monday = os.path.join(args.days, "monday")
    paths = sorted(
        os.path.join("monday", c, f)
        for c in os.listdir(monday)
        for f in os.listdir(os.path.join(monday, c))
    )[: args.images]
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    script = os.path.join(tmp, "post.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        f.write("local bodies = {\n")
        for path in paths:
            f.write("  " + json.dumps(json.dumps({"image_path": path})) + ",\n")
        f.write("}\nlocal i = 0\nrequest = function()\n  i = i % #bodies + 1\n"
                "  return wrk.format(nil, nil, nil, bodies[i])\nend\n")

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        run = os.path.join(args.runs, f"bench{size}")
        stacks = ("reference", "reference-no-grad", "bccp") + (("bccp-bf16",) if args.bf16 else ())
        for stack in stacks:
            if stack.startswith("bccp"):
                port = free_port()
                cmd = [args.bccp, "--quiet", "serve", "--model", f"bench{size}@champion",
                       "--runs-dir", args.runs, "--cache-dir", args.cache, "--image-root",
                       args.days, "--bind", f"127.0.0.1:{port}", "--device", "cpu",
                       "--db", f"sqlite:{os.path.join(tmp, f'{stack}-store{size}.sqlite3')}"]
                if stack == "bccp-bf16":
                    cmd += ["--precision", "bf16"]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
                url = f"http://127.0.0.1:{port}/predict"
                try:
                    wait_ready(f"http://127.0.0.1:{port}/readyz", proc,
                               "bench_serve: the bccp server")
                except BaseException:
                    stop(proc)
                    raise
            else:
                extra = ("--no-grad",) if stack == "reference-no-grad" else ()
                proc, url = start_reference_server(args.python, args.reference, args.days,
                                                   args.weights, run, size, extra)
            try:
                wrk(url, script, 4, 2)  # warm-up
                for c in [int(c) for c in args.concurrency.split(",")]:
                    rps, p50, p99, errors, total = wrk(url, script, c, args.seconds)
                    rows.append((size, stack, c, rps, p50, p99, errors, total))
                    print(f"{size}x{size} {stack:17} c={c:<3} {rps:8.1f} req/s  p50 {p50*1e3:8.1f} ms"
                          f"  p99 {p99*1e3:8.1f} ms  errors {errors}/{total}", flush=True)
            finally:
                stop(proc)

    # The reference as its app.py is written, and tuned (torch.no_grad(), no DataFrame).
    print("\n| input | concurrency | reference req/s | reference no_grad req/s | bccp req/s "
          "| × reference | × no_grad | reference p50 | bccp p50 | reference p99 | bccp p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(s, st, c): (r, a, b, e, t) for s, st, c, r, a, b, e, t in rows}
    ms = lambda v: f"{v*1e3:.1f} ms"
    for size in [int(s) for s in args.sizes.split(",")]:
        for c in [int(c) for c in args.concurrency.split(",")]:
            ref, tuned, new = (by.get((size, st, c))
                               for st in ("reference", "reference-no-grad", "bccp"))
            if not (ref and tuned and new):
                continue
            print(f"| {size}×{size} | {c} | {ref[0]:.1f} | {tuned[0]:.1f} | {new[0]:.1f} "
                  f"| **{new[0]/ref[0]:.1f}** | {new[0]/tuned[0]:.1f} | {ms(ref[1])} | {ms(new[1])} "
                  f"| {ms(ref[2])} | {ms(new[2])} |")
    if args.bf16:
        print("\n| input | concurrency | bccp f32 req/s | bccp bf16 req/s | bf16 / f32 | × reference "
              "| × no_grad | bccp bf16 p50 | bccp bf16 p99 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size in [int(s) for s in args.sizes.split(",")]:
            for c in [int(c) for c in args.concurrency.split(",")]:
                ref, tuned, new, half = (by.get((size, st, c)) for st in
                                         ("reference", "reference-no-grad", "bccp", "bccp-bf16"))
                if not (ref and tuned and new and half):
                    continue
                print(f"| {size}×{size} | {c} | {new[0]:.1f} | {half[0]:.1f} | **{half[0]/new[0]:.2f}** "
                      f"| {half[0]/ref[0]:.1f} | {half[0]/tuned[0]:.1f} | {ms(half[1])} "
                      f"| {ms(half[2])} |")
    failed = sum(e for *_, e, _ in rows)
    print(f"\nerrors: {failed} of {sum(t for *_, t in rows)} requests")


if __name__ == "__main__":
    main()
