"""Freshness: from the moment Kafka receives a ticket until a reader can see it, for each output
mode, batch age and rate. Not part of the test suite: run `tests/bench/freshness.sh`.

One streaming processor (6 partitions), our producer at a fixed rate; every ticket counted:
- its Kafka timestamp (CreateTime, read back from the topic with confluent-kafka);
- when a reader could first see it, read off the S3 server's directory: for objects, the
  modification time of the object holding it (listable from then on); for the Delta table, that
  of the log entry whose version adds the file holding it;
- the processor's own stage timings, each batch's as its debug log line "Batch stages." gives
  them (the same values its `/metrics` histograms `ticket_processor_stage_seconds` count):
  each stage's p50/p99 over the batches of the run;
- the S3 requests the server served during the run, by kind, and the objects or log entries
  written, per hour of running at that rate (what freshness costs).

The harness fails loudly if a ticket is missing or seen twice, and never asserts a time.

Settings (environment): FRESH_FORMATS (default jsonl,parquet,delta), FRESH_AGES (ms, default
200,500,1000,5000), FRESH_RATES (tickets/s, default 1000,10000), FRESH_SECONDS (default 40),
FRESH_ENV (more processor settings, `K=V;K=V`), BENCH_RELEASE_DIR (the binaries), BENCH_DIR.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

sys.argv = sys.argv[:1]  # bench.py reads a ticket count from its arguments
from bench import REL, free_port, start_tansu, kafka_timestamps, percentile, s3_requests  # noqa: E402

WORK = os.environ.get("BENCH_DIR", "/tmp/ticket-freshness")
FORMATS = os.environ.get("FRESH_FORMATS", "jsonl,parquet,delta").split(",")
AGES = [int(a) for a in os.environ.get("FRESH_AGES", "200,500,1000,5000").split(",")]
RATES = [int(r) for r in os.environ.get("FRESH_RATES", "1000,10000").split(",")]
SECONDS = int(os.environ.get("FRESH_SECONDS", "40"))
PARTITIONS = 6
WARM_UP = 2  # seconds after every partition is loaded before tickets are counted
EXTRA = dict(kv.split("=", 1) for kv in os.environ.get("FRESH_ENV", "").split(";") if kv)
STAGES = ["fetch", "seal", "queue", "encode", "wait", "data_write", "record", "visible"]


def stage_quantiles(log_path, offset, qs):
    """Each stage's quantiles over the batches the processor logged ("Batch stages.", at debug
    level) after `offset` in its log: exact, where the /metrics histograms have buckets."""
    values = {}
    with open(log_path) as f:
        f.seek(offset)
        for line in f:
            if "Batch stages." in line:
                for k, v in re.findall(r"(\w+)_ms=([0-9.]+)", line):
                    values.setdefault(k, []).append(float(v) / 1000)
    return {k: [percentile(sorted(v), q) for q in qs] for k, v in values.items()}


def visible_times(fmt, root):
    """ticket_id -> when a reader could first see it (s), and how many objects or log entries
    made them visible."""
    import pyarrow.parquet as pq
    seen = {}

    def add(ids, at, where):
        for tid in ids:
            if tid in seen:
                sys.exit(f"DUPLICATE {tid} in {where}")
            seen[tid] = at

    if fmt == "delta":
        table = os.path.join(root, "tables", "tickets_with_team")
        entries = sorted(glob.glob(os.path.join(table, "_delta_log", "*.json")))
        for entry in entries:
            at = os.path.getmtime(entry)
            for line in open(entry):
                action = json.loads(line).get("add")
                if action:
                    path = os.path.join(table, urllib.request.url2pathname(action["path"]))
                    add(pq.read_table(path, columns=["ticket_id"]).column(0).to_pylist(), at, path)
        return seen, len(entries)
    files = glob.glob(os.path.join(root, "tickets_with_team", "**", f"*.{fmt}"), recursive=True)
    for f in files:
        if fmt == "parquet":
            ids = pq.read_table(f, columns=["ticket_id"]).column(0).to_pylist()
        else:
            ids = [json.loads(line)["ticket_id"] for line in open(f)]
        add(ids, os.path.getmtime(f), f)
    return seen, len(files)


def tickets_written(http):
    """The processor's count of tickets written (cheap to poll: reading the output while it is
    written would take a core from the processor, the broker and the S3 server)."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ticket_processor_tickets_written_total "):
                return int(float(line.split()[1]))
    return 0


def run(fmt, age, rate, env, s3_root, s3_stats):
    # Short: s3s-fs keeps each object's metadata in a file named after its key, base64-encoded,
    # and a table's data file keys are long already.
    name = f"{fmt[0]}{age}r{rate}t{int(time.time()) % 100000}"
    n = rate * SECONDS
    http = f"127.0.0.1:{free_port()}"
    # A bucket per run: s3s-fs answers a LIST by walking the whole bucket, so one shared by the
    # runs would make every later run's listings (the table's log) slower.
    os.makedirs(os.path.join(s3_root, name))
    penv = dict(env, TICKETS_TOPIC=name, CONSUMER_GROUP=name, DLQ_TOPIC=f"{name}_dlq", S3_BUCKET_NAME=name,
                OUTPUT_FORMAT=fmt, BATCH_MAX_AGE_MS=str(age), HTTP_ADDR=http,
                RUST_LOG="info,ticket_stream::stream::writer=debug", **EXTRA)
    subprocess.run([f"{REL}/ticket-producer", "--count", "0", "--partitions", str(PARTITIONS)], env=penv, check=True, stdout=subprocess.DEVNULL)
    log_path = os.path.join(WORK, f"{name}.log")
    proc = subprocess.Popen([f"{REL}/ticket-processor"], env=penv, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    root = os.path.join(s3_root, name)
    try:
        # One producer for the whole run, started once the processor has the partitions: a
        # producer's first messages wait for its connection and metadata, and each partition
        # is loaded (its checkpoint read) on its first message. Tickets sent before every
        # partition is loaded and WARM_UP seconds more are written and checked like the others
        # but not counted in the figures (steady state).
        deadline = time.time() + 90
        while "Partitions assigned" not in open(log_path).read():
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"the processor never got its partitions (status {proc.poll()}): see {log_path}")
            time.sleep(0.1)
        total = rate * (SECONDS + WARM_UP + 5)
        producer = subprocess.Popen([f"{REL}/ticket-producer", "--count", str(total), "--rate", str(rate), "--seed", "3"], env=penv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while open(log_path).read().count("Resuming from the S3 checkpoint") < PARTITIONS:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"the processor never loaded its partitions (status {proc.poll()}): see {log_path}")
            time.sleep(0.1)
        time.sleep(WARM_UP)
        counted_from = time.time()
        log_from = os.path.getsize(log_path)
        before = s3_requests(s3_stats)
        if producer.wait() != 0:
            sys.exit(f"the producer exited with status {producer.returncode}")
        deadline = time.time() + 60 + age / 1000
        while tickets_written(http) < total:
            if proc.poll() is not None:
                sys.exit(f"the processor exited with status {proc.returncode}: see {log_path}")
            if time.time() > deadline:
                sys.exit(f"only {tickets_written(http)} of {total} tickets written: see {log_path}")
            time.sleep(0.5)
        elapsed = time.time() - counted_from
        time.sleep(0.5)  # the server writes its counts five times a second
        after = s3_requests(s3_stats)
    finally:
        proc.terminate()
        status = proc.wait(timeout=60)
    if status != 0:
        sys.exit(f"the processor exited with status {status}: see {log_path}")
    sent = kafka_timestamps(env["KAFKA_BROKERS"], name, total)
    seen, units = visible_times(fmt, root)
    if len(sent) != total or set(seen) != set(sent):
        sys.exit(f"WRONG at {fmt}/{age}/{rate}: {len(seen)} seen, {len(sent)} sent, expected {total}")
    lat = sorted(seen[t] - sent[t] for t in sent if sent[t] >= counted_from)
    n = len(lat)
    stages = stage_quantiles(log_path, log_from, [0.5, 0.99])
    requests = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    per_hour = 3600 / elapsed
    return {
        "format": fmt, "age_ms": age, "rate": rate, "tickets": n,
        "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "max": lat[-1],
        "stages": stages, "units_per_hour": units * per_hour,
        "requests_per_hour": {k: v * per_hour for k, v in sorted(requests.items()) if v},
    }


def ms(s):
    return "-" if s is None else f"{s * 1000:.0f}"


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    broker, brokers = start_tansu()
    s3_port = free_port()
    s3_root, s3_stats = os.path.join(WORK, "s3"), os.path.join(WORK, "s3-requests.json")
    os.makedirs(s3_root)
    s3 = subprocess.Popen([f"{REL}/examples/s3-server", s3_root, str(s3_port), s3_stats], stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "s3-server.log"), "w"))
    time.sleep(1)
    env = dict(os.environ, KAFKA_BROKERS=brokers, S3_ENDPOINT=f"http://127.0.0.1:{s3_port}",
               AWS_ACCESS_KEY_ID="test-access-key", AWS_SECRET_ACCESS_KEY="test-secret-key", AWS_EC2_METADATA_DISABLED="true",
               KAFKA_OPTIONS=os.environ.get("KAFKA_OPTIONS", "session.timeout.ms=6000"))
    results = []
    try:
        print(f"{SECONDS} s per run, {PARTITIONS} partitions, settings {EXTRA or 'default'}\n")
        print("| output | age ms | tickets/s | p50 / p99 / max ms | " + " | ".join(f"{s} p50/p99" for s in STAGES) + " | objects or log entries per hour | S3 requests per hour |")
        print("|---" * (6 + len(STAGES)) + "|")
        for rate in RATES:
            for age in AGES:
                for fmt in FORMATS:
                    r = run(fmt, age, rate, env, s3_root, s3_stats)
                    results.append(r)
                    st = " | ".join(f"{ms((r['stages'].get(s) or [None, None])[0])}/{ms((r['stages'].get(s) or [None, None])[1])}" for s in STAGES)
                    req = ", ".join(f"{k} {v:,.0f}" for k, v in r["requests_per_hour"].items())
                    print(f"| {fmt} | {age:,} | {rate:,} | {ms(r['p50'])} / **{ms(r['p99'])}** / {ms(r['max'])} | {st} | {r['units_per_hour']:,.0f} | {req} |", flush=True)
    finally:
        for p in (broker, s3):
            p.terminate()
            p.wait(timeout=30)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
