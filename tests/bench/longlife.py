"""A Delta table's long life: one table driven through many small commits with the processors'
own upkeep on (short retentions set for the run), then compared with a table holding the same
rows in one file per partition-hour. Not part of the test suite: run `tests/bench/longlife.sh`.

1. A topic of LONG_TICKETS tickets over LONG_HOURS hours of Kafka timestamps (in order, a
   backlog), LONG_PARTITIONS partitions.
2. "long": one streaming processor writes them into a table in batches of LONG_BATCH tickets
   (so, thousands of commits), with TABLE_MAINTENANCE on, DELTA_LOG_RETENTION and
   DELTA_DELETED_FILE_RETENTION short (LONG_LOG_RETENTION, LONG_FILE_RETENTION): hours close as
   the stream passes them and are compacted while it commits. Once every ticket is written the
   processor runs on until every closed hour is one file, then stops. (The files replaced are
   deleted before each log checkpoint once their retention has passed.)
3. "base": the same topic drained into another bucket in large batches, then `compact`ed: one
   file per partition-hour, a handful of commits.
4. For each: commits, data files live and in the bucket, files per closed partition-hour, log
   entries left and the oldest one's age, the largest log entry, the processor's peak RSS, and
   every ticket exactly once as delta-rs's Python reader reads the table.
5. It writes, under BENCH_DIR, one script per measurement and table (reader.sh: a new reader
   loads the snapshot with delta-rs; query.sh: `ticket-processor query`; restart.sh: a
   processor starts on the table, recovers every partition, finds nothing to do and exits), to
   be timed side by side as whole processes, long against base.

Settings (environment): LONG_TICKETS (default 300000), LONG_PARTITIONS (2), LONG_HOURS (150),
LONG_BATCH (10), LONG_LOG_RETENTION (120s), LONG_FILE_RETENTION (60s), BENCH_RELEASE_DIR,
BENCH_DIR. The servers stay up, for the scripts, until BENCH_DIR/hold is removed. The harness
fails loudly if a ticket is missing or seen twice; it asserts no time.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

sys.argv = sys.argv[:1]  # bench.py reads a ticket count from its arguments
from bench import REL, free_port, start_tansu  # noqa: E402

WORK = os.environ.get("BENCH_DIR", "/tmp/ticket-longlife")
N = int(os.environ.get("LONG_TICKETS", "300000"))
PARTITIONS = int(os.environ.get("LONG_PARTITIONS", "2"))
HOURS = int(os.environ.get("LONG_HOURS", "150"))
BATCH = int(os.environ.get("LONG_BATCH", "10"))
LOG_RETENTION = os.environ.get("LONG_LOG_RETENTION", "120s")
FILE_RETENTION = os.environ.get("LONG_FILE_RETENTION", "60s")
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
TOPIC = "long"
TYPES = ["billing", "technical", "account", "other"]
PRIORITIES = ["low", "medium", "high"]


def metrics(http):
    try:
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
            out = {}
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    out[name] = float(value)
            return out
    except OSError:
        return {}


def produce(brokers):
    """N tickets, hour by hour over HOURS hours, keyed by id (the partitioner spreads them)."""
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1_000_000})
    step = HOURS * 3_600_000 / N
    for i in range(N):
        ts = T0 + int(i * step)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts / 1000))
        value = json.dumps({"ticket_id": f"L-{i}", "client_id": i % 1000 + 1, "created_at": created,
                            "request": "Help", "request_type": TYPES[i % 4], "priority": PRIORITIES[i % 3]})
        while True:
            try:
                p.produce(TOPIC, value=value, key=f"L-{i}", timestamp=ts)
                break
            except BufferError:
                p.poll(0.1)
        if i % 10000 == 0:
            p.poll(0)
    if p.flush(120) != 0:
        sys.exit("the producer could not deliver every ticket")


def data_files(root):
    """Data files in a table's directory (what the bucket holds, live or not)."""
    out = []
    for d, _, files in os.walk(os.path.join(root, "tables", "tickets_with_team")):
        if "_delta_log" not in d:
            out += [os.path.join(d, f) for f in files if f.endswith(".parquet")]
    return out


def log_entries(root):
    log = os.path.join(root, "tables", "tickets_with_team", "_delta_log")
    return sorted(os.path.join(log, f) for f in os.listdir(log) if f.endswith(".json"))


def read_table(bucket, env):
    """(rows, distinct ids, live files, files per partition-hour) as delta-rs reads the table."""
    script = r"""
import json, os, sys
from deltalake import DeltaTable
uri, endpoint = sys.argv[1:3]
dt = DeltaTable(uri, storage_options={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
ids = dt.to_pyarrow_table(columns=["ticket_id"]).column(0).to_pylist()
per = {}
for f in dt.file_uris():
    key = "/".join(s for s in f.split("/") if s.startswith(("date=", "hour=", "partition=")))
    per[key] = per.get(key, 0) + 1
print(json.dumps({"rows": len(ids), "distinct": len(set(ids)), "files": len(dt.file_uris()), "per_hour": per,
                  "version": dt.version()}))
# Everything is printed: skip the interpreter's teardown, where the package's threads now and
# then abort the process (as tests/e2e/common/checks.rs does).
sys.stdout.flush()
os._exit(0)
"""
    out = subprocess.check_output([sys.executable, "-c", script, f"s3://{bucket}/tables/tickets_with_team/",
                                   env["S3_ENDPOINT"]], text=True)
    return json.loads(out.strip().splitlines()[-1])


def describe(name, root, bucket, env, peak_kib, seconds):
    r = read_table(bucket, env)
    if r["rows"] != N or r["distinct"] != N:
        sys.exit(f"WRONG in {name}: {r['rows']} rows, {r['distinct']} distinct, expected {N}")
    entries = log_entries(root)
    oldest = time.time() - min(os.path.getmtime(e) for e in entries)
    largest = max(os.path.getsize(e) for e in entries)
    # Closed: ended at least 2 h before the newest hour (the processors' COMPACT_CLOSED_AFTER).
    per = r["per_hour"]
    hours = sorted({k.split("/partition=")[0] for k in per})
    closed_keys = [k for k in per if k.split("/partition=")[0] in hours[:-3]]
    most = max((per[k] for k in closed_keys), default=0)
    print(f"| {name} | {r['version']:,} | {seconds:,.0f} | {r['files']:,} | {len(data_files(root)):,} | "
          f"{len(closed_keys):,} / {most} | {len(entries):,} | {oldest:,.0f} | {largest / 1024:,.1f} | "
          f"{peak_kib / 1024:,.0f} | {r['rows']:,}, each once |", flush=True)


def peak_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    broker, brokers = start_tansu()
    s3_port = free_port()
    s3_root = os.path.join(WORK, "s3")
    for b in ("long", "base"):
        os.makedirs(os.path.join(s3_root, b))
    s3 = subprocess.Popen([f"{REL}/examples/s3-server", s3_root, str(s3_port)], stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "s3-server.log"), "w"))
    time.sleep(1)
    env = dict(os.environ, KAFKA_BROKERS=brokers, S3_ENDPOINT=f"http://127.0.0.1:{s3_port}", TICKETS_TOPIC=TOPIC,
               DLQ_TOPIC="long_dlq", AWS_ACCESS_KEY_ID="test-access-key", AWS_SECRET_ACCESS_KEY="test-secret-key",
               AWS_EC2_METADATA_DISABLED="true", OUTPUT_FORMAT="delta", KAFKA_OPTIONS="session.timeout.ms=6000")
    running = []
    try:
        subprocess.run([f"{REL}/ticket-producer", "--count", "0", "--partitions", str(PARTITIONS)], env=env, check=True, stdout=subprocess.DEVNULL)
        produce(brokers)
        print(f"{N:,} tickets over {HOURS} hours of Kafka timestamps, {PARTITIONS} partitions; "
              f"long: batches of {BATCH}, log retention {LOG_RETENTION}, replaced files kept {FILE_RETENTION}\n")
        print("| table | commits (version) | s to write | live data files | data files in the bucket | closed partition-hours / most files in one | log entries | oldest entry, s | largest entry, KiB | processor peak RSS, MiB | delta-rs reads |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")

        # The long life.
        http = f"127.0.0.1:{free_port()}"
        lenv = dict(env, S3_BUCKET_NAME="long", CONSUMER_GROUP="long", HTTP_ADDR=http, BATCH_MAX_RECORDS=str(BATCH),
                    BATCH_MAX_AGE_MS="200", DELTA_LOG_RETENTION=LOG_RETENTION, DELTA_DELETED_FILE_RETENTION=FILE_RETENTION)
        log_path = os.path.join(WORK, "long.log")
        start = time.time()
        proc = subprocess.Popen([f"{REL}/ticket-processor"], env=lenv, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        running.append(proc)
        root = os.path.join(s3_root, "long")
        written_at = None
        peak = 0
        deadline = time.time() + 7200
        while True:
            time.sleep(1)
            if proc.poll() is not None:
                sys.exit(f"the processor exited with status {proc.returncode}: see {log_path}")
            if time.time() > deadline:
                sys.exit(f"not done in 2 hours: see {log_path}")
            peak = max(peak, peak_kib(proc.pid))
            m = metrics(http)
            if written_at is None and m.get("ticket_processor_tickets_written_total", 0) >= N:
                written_at = time.time()
                writing = written_at - start
            if written_at is not None:
                # Every hour but the newest three of each partition closed, and one file each.
                closed = m.get('ticket_processor_table_files{hours="closed"}')
                hours = m.get('ticket_processor_table_partition_hours{hours="closed"}')
                if closed == hours and (hours or 0) >= PARTITIONS * (HOURS - 3):
                    break
        peak = max(peak, peak_kib(proc.pid))
        m = metrics(http)
        proc.terminate()
        if proc.wait(timeout=60) != 0:
            sys.exit(f"the processor exited with status {proc.returncode}: see {log_path}")
        describe("long", root, "long", env, peak, writing)
        print(f"\nlong: {m.get('ticket_processor_table_compactions_total', 0):,.0f} compactions, "
              f"{m.get('ticket_processor_table_files_compacted_total', 0):,.0f} files replaced, "
              f"{m.get('ticket_processor_table_bytes_rewritten_total', 0) / 2**20:,.1f} MiB rewritten, "
              f"{m.get('ticket_processor_table_files_vacuumed_total', 0):,.0f} vacuumed; "
              f"{time.time() - written_at:,.0f} s from the last ticket written to every closed hour compacted; "
              f"the files replaced since the last log checkpoint wait for the next one\n")

        # The baseline: the same rows in large batches, then compacted.
        benv = dict(env, S3_BUCKET_NAME="base", CONSUMER_GROUP="base", HTTP_ADDR=f"127.0.0.1:{free_port()}",
                    BATCH_MAX_RECORDS="1000000", BATCH_MAX_BYTES="1000000000", TABLE_MAINTENANCE="false")
        start = time.time()
        subprocess.run([f"{REL}/ticket-processor", "--drain"], env=benv, check=True, stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "base.log"), "w"))
        subprocess.run([f"{REL}/ticket-processor", "compact", "--older-than-hours", "0", "--vacuum-retain-hours", "0"], env=benv, check=True, stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "base-compact.log"), "w"))
        describe("base", os.path.join(s3_root, "base"), "base", env, 0, time.time() - start)

        # The measurements, as scripts to time side by side (the servers stay up meanwhile).
        for b in ("long", "base"):
            e = " ".join(f"{k}={v}" for k, v in [("KAFKA_BROKERS", brokers), ("S3_ENDPOINT", env["S3_ENDPOINT"]),
                                                 ("TICKETS_TOPIC", TOPIC), ("DLQ_TOPIC", "long_dlq"), ("S3_BUCKET_NAME", b),
                                                 ("AWS_ACCESS_KEY_ID", "test-access-key"), ("AWS_SECRET_ACCESS_KEY", "test-secret-key"),
                                                 ("AWS_EC2_METADATA_DISABLED", "true"), ("OUTPUT_FORMAT", "delta"),
                                                 ("HTTP_ADDR", "127.0.0.1:0"), ("RUST_LOG", "warn")])
            scripts = {
                "reader": f"exec {sys.executable} -c 'import sys; from deltalake import DeltaTable; "
                          f"dt = DeltaTable(\"s3://{b}/tables/tickets_with_team/\", storage_options={{\"AWS_ENDPOINT_URL\": \"{env['S3_ENDPOINT']}\", "
                          f"\"AWS_ACCESS_KEY_ID\": \"test-access-key\", \"AWS_SECRET_ACCESS_KEY\": \"test-secret-key\", \"AWS_REGION\": \"us-east-1\", "
                          f"\"AWS_ALLOW_HTTP\": \"true\"}}); print(len(dt.file_uris()), flush=True); import os; os._exit(0)'",
                "query": f"exec env {e} {REL}/ticket-processor query --format csv 'SELECT count(*) AS n FROM tickets_delta'",
                "restart": f"exec env {e} {REL}/ticket-processor --drain",
            }
            for what, cmd in scripts.items():
                path = os.path.join(WORK, f"{b}-{what}.sh")
                with open(path, "w") as f:
                    f.write(f"#!/bin/sh\n{cmd}\n")
                os.chmod(path, 0o755)
                if subprocess.run([path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
                    sys.exit(f"{path} failed")
        hold = os.path.join(WORK, "hold")
        open(hold, "w").close()
        print(f"\nscripts in {WORK}: {{long,base}}-{{reader,query,restart}}.sh; the servers stay up until {hold} is removed", flush=True)
        while os.path.exists(hold):
            time.sleep(1)
    finally:
        for p in running:
            p.kill()
        for p in (broker, s3):
            p.terminate()
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
