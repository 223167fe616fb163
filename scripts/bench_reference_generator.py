"""The reference's way of writing the stream (duneag2/bccp-mlops,
data_generate/data_generator_tuesday.py, insert_dataframe): one INSERT and one COMMIT per
record into `{dataset}(id SERIAL, timestamp, image_path, target)` with psycopg2. Parameters are
bound here instead of formatted into the SQL (same round trips, no injection).

Usage: bench_reference_generator.py DSN MANIFEST.jsonl ROWS
Prints: rows seconds
"""

import json
import sys
import time

import psycopg2


def main():
    dsn, manifest, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    records = []
    with open(manifest) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
            if len(records) == rows:
                break
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS reference_bench;")
        cur.execute(
            "CREATE TABLE reference_bench (id SERIAL PRIMARY KEY, timestamp timestamp, "
            "image_path varchar(255), target int);"
        )
        conn.commit()
    start = time.perf_counter()
    for r in records:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO reference_bench (timestamp, image_path, target) VALUES (NOW(), %s, %s);",
                (r["image_path"], r["target"]),
            )
            conn.commit()
    seconds = time.perf_counter() - start
    print(len(records), f"{seconds:.3f}")


if __name__ == "__main__":
    main()
