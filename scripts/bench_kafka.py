#!/usr/bin/env python3
"""Kafka throughput of bccp against the reference's consumer, side by side in one run
(scripts/bench-kafka.sh sets everything up and calls this with the kafka venv's Python).

One tansu broker (in memory) on 127.0.0.1; N records of distinct Fashion-MNIST images in the
reference's JSON Connect envelope on topic `postgres-source-bench`; one `bccp serve --kafka` of a
MobileNetV2 model at 64×64. Then, each timed from its first record to its last:

- reference: the reference's consumer (`dashboard_stream/data_subscriber.py`) as written, minus
  its prints: kafka-python, group `bench-consumer-group` from the earliest offset, and per record
  one `requests.post` to `/predict` (a new connection each, as it does) and one INSERT + COMMIT
  of the prediction (SQLite here, PostgreSQL there);
- reference stack (with --reference-server): the same consumer calling the reference's own
  prediction API (FastAPI + uvicorn + PyTorch MobileNetV2 at 64×64, one image per request,
  scripts/bench_serve_reference.py, the same backbone and head), i.e. the reference's whole
  predictions pipeline;
- bccp consume: `bccp stream consume` of the same topic into an SQLite store (each image read,
  hashed, decoded and stored, offsets committed after the store's commits);
- bccp serve → topic: predictions/s that `bccp serve --kafka` delivers to its topic while `wrk`
  sends JSON batches of BATCH image paths on CLIENTS connections (the delivery count from
  /metrics, before and after).

ROUNDS rounds alternate the three paths (SECONDS each), so a change of load on a shared machine
hits all of them; each ratio is to the reference's rate of the same round. Prints a table and the
median ratios, and writes target/bench-kafka/results.json.
"""

import argparse
import http.client
import json
import os
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from benchlib import free_port, start_reference_server, wait_ready

TOPIC = "postgres-source-bench"
PREDICTIONS = "bench-predictions"
SCHEMA = {
    "type": "struct",
    "fields": [
        {"type": "int32", "optional": False, "field": "id"},
        {"type": "string", "optional": True, "field": "timestamp"},
        {"type": "string", "optional": True, "field": "image_path"},
        {"type": "int32", "optional": True, "field": "target"},
    ],
    "optional": False,
    "name": "bench",
}


def wait_port(port, proc, what, limit=60):
    start = time.time()
    while time.time() - start < limit:
        if proc.poll() is not None:
            sys.exit(f"bench-kafka: {what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"bench-kafka: {what} did not listen on {port} within {limit} s")


def images(root, n):
    """n distinct image paths under root (relative), round-robin over the class folders."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    lists = [sorted(os.listdir(os.path.join(root, c))) for c in classes]
    out = []
    for i in range(max(len(x) for x in lists)):
        for c, files in zip(classes, lists):
            if i < len(files):
                out.append((f"{c}/{files[i]}", classes.index(c)))
                if len(out) == n:
                    return out
    sys.exit(f"bench-kafka: only {len(out)} images under {root}, {n} wanted")


def produce(brokers, records):
    admin = KafkaAdminClient(bootstrap_servers=brokers)
    admin.create_topics([NewTopic(TOPIC, 1, 1), NewTopic(PREDICTIONS, 1, 1)])
    admin.close()
    p = KafkaProducer(bootstrap_servers=brokers, linger_ms=20)
    for i, (path, target) in enumerate(records, start=1):
        payload = {"id": i, "timestamp": "2024-03-05 09:08:07.0", "image_path": path,
                   "target": target}
        p.send(TOPIC, value=json.dumps({"schema": SCHEMA, "payload": payload}).encode(),
               partition=0)
    p.flush()
    p.close()


def reference_consumer(brokers, url, n, seconds, db_path, group="bench-consumer-group"):
    """The reference's data_subscriber.py loop (prints removed); returns (records, seconds)."""
    import requests  # the reference's HTTP client

    db = sqlite3.connect(db_path)
    db.execute("CREATE TABLE IF NOT EXISTS bench_prediction "
               "(id INTEGER PRIMARY KEY, timestamp TEXT, target INT)")
    db.commit()
    consumer = KafkaConsumer(TOPIC, bootstrap_servers=brokers, auto_offset_reset="earliest",
                             group_id=group,
                             value_deserializer=lambda x: json.loads(x),
                             consumer_timeout_ms=10000)
    done, first, last = 0, None, None
    for msg in consumer:
        if first is None:
            first = time.perf_counter()
        payload = msg.value["payload"]
        payload.pop("id")
        payload.pop("target")
        ts = payload.pop("timestamp")
        response = requests.post(url=url, json=payload,
                                 headers={"Content-Type": "application/json"}).json()
        response["timestamp"] = ts
        db.execute("INSERT INTO bench_prediction (timestamp, target) VALUES (?, ?)",
                   (response["timestamp"], response["target"]))
        db.commit()
        done += 1
        last = time.perf_counter()
        if done == n or last - first >= seconds:
            break
    consumer.close()
    db.close()
    # Rate over the records after the first (timed from its arrival to the last one's end).
    return done - 1, last - first


def store_count(db_path):
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        (n,) = db.execute("SELECT count(*) FROM samples").fetchone()
        db.close()
        return n
    except sqlite3.Error:
        return 0


def bccp_consume(bccp, brokers, root, round_, db_path):
    """`bccp stream consume` of the whole topic; returns (rows, seconds, its own summary)."""
    proc = subprocess.Popen(
        [bccp, "--quiet", "stream", "consume", "--brokers", brokers, "--topic", TOPIC,
         "--group", f"bccp-bench-{round_}", "--db", f"sqlite:{db_path}", "--image-root", root,
         "--idle", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    samples = []
    while proc.poll() is None:
        n = store_count(db_path)
        now = time.perf_counter()
        if n > 0:
            if first is None:
                first = (n, now)
            samples.append((n, now))
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"bench-kafka: bccp stream consume failed:\n{out}{err}")
    n_end = store_count(db_path)
    # The last poll at which the count reached its final value.
    end = next(((n, t) for n, t in samples if n == n_end), samples[-1])
    return end[0] - first[0], end[1] - first[1], out.strip()


def counts(port):
    """(predictions delivered to the topic, predictions answered) from /metrics."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    m = re.search(r'bccp_kafka_predictions_total\{result="delivered"\} (\d+)', text)
    answered = sum(int(v) for v in re.findall(
        r'^bccp_predictions_total\{[^}]*status="ok"[^}]*\} (\d+)', text, re.M))
    return (int(m.group(1)) if m else 0), answered


def delivered(port):
    return counts(port)[0]


def wrk_load(port, records, seconds, clients, batch, tmp):
    """`wrk` (one thread, CLIENTS keep-alive connections) posting one JSON batch of BATCH
    image paths over and over; returns the number of non-2xx answers."""
    body = json.dumps({"batch": [{"image_path": r[0]} for r in records[:batch]]})
    script = os.path.join(tmp, "batch.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(body)}\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "60s", "-s", script,
         f"http://127.0.0.1:{port}/predict"],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return int(m.group(1)) if m else 0


def serve_to_topic(port, records, seconds, clients, batch, tmp):
    """Predictions/s delivered to the topic while `wrk` (a C client, which leaves the two cores
    to the server) sends CLIENTS connections of JSON batches."""
    # Warm-up, then the measured window between two delivery counts.
    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    warm.request("POST", "/predict", body=json.dumps({"batch": [{"image_path": records[0][0]}]}),
                 headers={"Content-Type": "application/json"})
    warm.getresponse().read()
    (before, answered_before), t0 = counts(port), time.perf_counter()
    bad = wrk_load(port, records, seconds, clients, batch, tmp)
    # Let the producer thread drain its queue (delivery reports), at most 10 s.
    last, t1 = delivered(port), time.perf_counter()
    for _ in range(100):
        time.sleep(0.1)
        now = delivered(port)
        if now == last:
            break
        last, t1 = now, time.perf_counter()
    if bad:
        sys.exit(f"bench-kafka: /predict gave {bad} non-2xx answers")
    answered = counts(port)[1] - answered_before
    return last - before, t1 - t0, answered


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bccp", required=True)
    ap.add_argument("--tansu", required=True)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--root", required=True, help="image root (class folders of PNGs)")
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="target/bench-kafka/results.json")
    ap.add_argument("--reference-server", help="bench_serve_reference.py: also time the consumer "
                    "against the reference's own prediction API")
    ap.add_argument("--reference-python", help="a Python with fastapi, uvicorn and torch")
    ap.add_argument("--weights", help="MobileNetV2 weights for the reference server")
    a = ap.parse_args()
    if a.reference_server and not (a.reference_python and a.weights):
        sys.exit("bench-kafka: --reference-server needs --reference-python and --weights")

    tmp = tempfile.mkdtemp(prefix="bccp-bench-kafka-")
    port = free_port()
    brokers = f"127.0.0.1:{port}"
    broker = subprocess.Popen(
        [a.tansu, "broker", "--listener-url", f"tcp://{brokers}",
         "--advertised-listener-url", f"tcp://{brokers}", "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = reference = None
    try:
        wait_port(port, broker, "tansu")
        records = images(a.root, a.records)
        produce(brokers, records)
        http_port = free_port()
        serve = subprocess.Popen(
            [a.bccp, "--quiet", "serve", "--model", f"{a.model}@champion", "--runs-dir", a.runs,
             "--image-root", a.root, "--db", f"sqlite:{tmp}/serve.sqlite3",
             "--bind", f"127.0.0.1:{http_port}", "--device", "cpu",
             "--kafka", f"{brokers},{PREDICTIONS}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_ready(f"http://127.0.0.1:{http_port}/readyz", serve, "bench-kafka: bccp serve")
        reference_url = None
        if a.reference_server:
            reference, reference_url = start_reference_server(
                a.reference_python, a.reference_server, a.root, a.weights,
                os.path.join(a.runs, a.model), 64)

        # Rounds alternate the paths, so a change of load on this shared machine hits each.
        url = f"http://127.0.0.1:{http_port}/predict"
        rounds = []
        for r in range(a.rounds):
            ref_n, ref_s = reference_consumer(brokers, url, a.records, a.seconds,
                                              f"{tmp}/reference.sqlite3")
            stack = None
            if reference_url:
                st_n, st_s = reference_consumer(brokers, reference_url, a.records, a.seconds,
                                                f"{tmp}/reference-stack.sqlite3",
                                                group="bench-reference-stack-group")
                stack = {"records": st_n, "seconds": st_s, "per_s": st_n / st_s}
            con_n, con_s, summary = bccp_consume(a.bccp, brokers, a.root, r,
                                                 f"{tmp}/consume{r}.sqlite3")
            pub_n, pub_s, answered = serve_to_topic(http_port, records, a.seconds, a.clients,
                                                    a.batch, tmp)
            rounds.append({
                "reference": {"records": ref_n, "seconds": ref_s, "per_s": ref_n / ref_s},
                "consume": {"records": con_n, "seconds": con_s, "per_s": con_n / con_s,
                            "summary": summary},
                "serve_to_topic": {"records": pub_n, "seconds": pub_s, "per_s": pub_n / pub_s,
                                   "answered": answered},
                "reference_stack": stack,
            })
    finally:
        for p in (reference, serve, broker):
            if p is not None:
                p.terminate()
                p.wait()

    print(f"\n{a.records} records of distinct Fashion-MNIST images, MobileNetV2 at 64×64, "
          f"{os.cpu_count()} CPUs, {a.rounds} rounds of {a.seconds:.0f} s per path; predictions "
          f"loaded by wrk ({a.clients} connections × batches of {a.batch})\n")
    stacked = all(x["reference_stack"] for x in rounds)
    print("| round | reference consumer → bccp serve /s | bccp stream consume /s | × | "
          "bccp serve --kafka → topic /s | × | answered → delivered |"
          + (" reference consumer → reference server /s | serve → topic × it |" if stacked else ""))
    print("|---|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if stacked else ""))
    for r, x in enumerate(rounds, start=1):
        ref, con, pub = x["reference"]["per_s"], x["consume"]["per_s"], x["serve_to_topic"]["per_s"]
        x["consume"]["ratio"], x["serve_to_topic"]["ratio"] = con / ref, pub / ref
        line = (f"| {r} | {ref:.1f} | {con:.0f} | {con / ref:.1f}× | {pub:.0f} | {pub / ref:.1f}× | "
                f"{x['serve_to_topic']['answered']} → {x['serve_to_topic']['records']} |")
        if stacked:
            st = x["reference_stack"]["per_s"]
            x["serve_to_topic"]["ratio_to_stack"] = pub / st
            line += f" {st:.1f} | {pub / st:.1f}× |"
        print(line)
    median = lambda k, r="ratio": statistics.median(x[k][r] for x in rounds)  # noqa: E731
    print(f"\nmedian × reference consumer → bccp serve: stream consume {median('consume'):.1f}×, "
          f"serve → topic {median('serve_to_topic'):.1f}×")
    if stacked:
        print("median serve → topic × reference consumer → reference server: "
              f"{median('serve_to_topic', 'ratio_to_stack'):.1f}×")
    print(f"bccp stream consume said (last round): {rounds[-1]['consume']['summary']}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    payload = {
        "records": a.records, "cpus": os.cpu_count(), "seconds": a.seconds, "load": "wrk",
        "clients": a.clients, "batch": a.batch, "rounds": rounds,
        "median_ratio": {"consume": median("consume"), "serve_to_topic": median("serve_to_topic"),
                         "serve_to_topic_vs_reference_stack":
                             median("serve_to_topic", "ratio_to_stack") if stacked else None},
    }
    with open(a.out + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
