//! The reading side, end to end: time partitions from the Kafka timestamps, Parquet read back
//! by an independent reader (pyarrow), `query` over the tests' S3 server and a directory, and
//! the report page rendered by headless Chromium against the lake's own figures.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use rand::SeedableRng;
use serde_json::Value;
use ticket_core::generate::Generator;

/// 2026-11-29T08:59:59.500Z
const BEFORE_NINE: i64 = 1_795_942_799_500;

/// `n` generated tickets (id, JSON) of a seeded generator.
/// The tickets with the Kafka timestamp `at(i)` for the i-th, for `publish_at`.
fn stamped(input: &[(String, String)], at: impl Fn(i64) -> i64) -> Vec<(String, String, i64)> {
    input
        .iter()
        .enumerate()
        .map(|(i, (id, json))| (id.clone(), json.clone(), at(i as i64)))
        .collect()
}

fn tickets(n: usize, seed: u64) -> Vec<(String, String)> {
    let now = chrono::DateTime::from_timestamp_millis(BEFORE_NINE).expect("time");
    let mut g = Generator::new(rand::rngs::StdRng::seed_from_u64(seed), now, "lake");
    (0..n)
        .map(|_| {
            let t = g.next_ticket();
            (
                t.ticket_id.clone(),
                String::from_utf8(t.to_json()).expect("utf8"),
            )
        })
        .collect()
}

/// Ticket ids by the `date=…/hour=…` of the object they are in.
async fn ids_by_hour(fx: &Fixture, prefix: &str) -> BTreeMap<String, Vec<String>> {
    let mut by_hour: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in fx.s3.keys(&format!("{prefix}tickets_with_team/")).await {
        let hour = key
            .split('/')
            .filter(|s| s.starts_with("date=") || s.starts_with("hour="))
            .collect::<Vec<_>>()
            .join("/");
        let body = fx.s3.get(&key).await.expect("object");
        for line in String::from_utf8_lossy(&body).lines() {
            let v: Value = serde_json::from_str(line).expect("json line");
            by_hour
                .entry(hour.clone())
                .or_default()
                .push(v["ticket_id"].as_str().expect("id").to_string());
        }
    }
    by_hour
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_land_in_the_hour_of_their_kafka_timestamp_even_out_of_order() {
    let fx = Fixture::start().await;
    fx.create_topic(1).await;
    // Two producers' clocks half a second apart around 09:00: the timestamps alternate
    // between the two hours within one batch.
    let ts: Vec<(String, String, i64)> = tickets(20, 1)
        .into_iter()
        .enumerate()
        .map(|(i, (id, json))| (id, json, BEFORE_NINE + 500 * (i as i64 % 2)))
        .collect();
    fx.broker.publish_at(&fx.topic, &ts).await;
    let env = fx.env().set("BATCH_MAX_AGE_MS", "600000");
    run_ok("ticket-processor", &env, &["--drain"]).await;

    // One batch, split into one object per hour, each named by its first and last offsets.
    let keys = fx.s3.keys("tickets_with_team/").await;
    let topic = &fx.topic;
    let name = |hour: &str, first: u64, last: u64| {
        format!(
            "tickets_with_team/topic={topic}/date=2026-11-29/hour={hour}/partition=0/{first:020}-{last:020}.jsonl"
        )
    };
    assert_eq!(keys, vec![name("08", 0, 18), name("09", 1, 19)]);
    let by_hour = ids_by_hour(&fx, "").await;
    let expect = |parity: usize| -> Vec<String> {
        ts.iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, t)| t.0.clone())
            .collect()
    };
    assert_eq!(by_hour["date=2026-11-29/hour=08"], expect(0));
    assert_eq!(by_hour["date=2026-11-29/hour=09"], expect(1));
    fx.assert_exactly_once(&fx.topic_ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_kill_writes_the_same_keys_and_bytes_as_an_uninterrupted_run() {
    let fx = Fixture::start().await;
    fx.create_topic(1).await;
    // Three hours of tickets, 3.6 s apart, every 7th a little late (out of order).
    let ts: Vec<(String, String, i64)> = tickets(3000, 2)
        .into_iter()
        .enumerate()
        .map(|(i, (id, json))| {
            let late = if i % 7 == 0 { -5_000 } else { 0 };
            (id, json, BEFORE_NINE - 3_600_000 + 3_600 * i as i64 + late)
        })
        .collect();
    fx.broker.publish_at(&fx.topic, &ts).await;
    let env = |prefix: &str| {
        fx.env()
            .set("S3_PREFIX", prefix)
            .set("CONSUMER_GROUP", format!("{}-{prefix}", fx.group()))
            .set("BATCH_MAX_RECORDS", "400")
            .set("BATCH_MAX_AGE_MS", "600000")
    };
    // Killed right after its third commit point, before that batch's objects are copied.
    let (ok, _, _) = run(
        "ticket-processor",
        &env("killed").failpoint("after-checkpoint:abort:3"),
        &["--drain"],
    )
    .await;
    assert!(!ok, "the failpoint did not kill the processor");
    run_ok("ticket-processor", &env("killed"), &["--drain"]).await;
    run_ok("ticket-processor", &env("clean"), &["--drain"]).await;

    let objects = |prefix: &'static str| {
        let fx = &fx;
        async move {
            let mut out = BTreeMap::new();
            for key in fx.s3.keys(&format!("{prefix}/tickets_with_team/")).await {
                let body = fx.s3.get(&key).await.expect("object");
                out.insert(key.trim_start_matches(prefix).to_string(), body);
            }
            out
        }
    };
    let (killed, clean) = (objects("killed").await, objects("clean").await);
    assert!(killed.len() > 8, "expected objects in several hours");
    assert_eq!(
        killed.keys().collect::<Vec<_>>(),
        clean.keys().collect::<Vec<_>>()
    );
    assert!(killed == clean, "same keys, different bytes");
    let hours = ids_by_hour(&fx, "killed/").await;
    assert_eq!(hours.len(), 4, "07:59 to 10:59: {:?}", hours.keys());
    assert_eq!(hours.values().map(Vec::len).sum::<usize>(), 3000);
}

/// The rows of Parquet files as read by pyarrow, as JSON objects (timestamps in RFC 3339),
/// with the file's schema as `{"schema": ...}` first.
fn read_parquet_with_pyarrow(dir: &Path) -> (String, Vec<Value>) {
    let script = r#"
import json, sys, glob
import pyarrow.parquet as pq
files = sorted(glob.glob(sys.argv[1] + "/*.parquet"))
table = pq.read_table(files[0]) if len(files) == 1 else __import__("pyarrow").concat_tables([pq.read_table(f) for f in files])
print(json.dumps({"schema": ",".join(f"{f.name}:{f.type}" for f in table.schema)}))
for row in table.to_pylist():
    row["created_at"] = row["created_at"].isoformat()
    print(json.dumps(row))
"#;
    let dir = dir.to_str().expect("utf-8 path");
    let lines = python_lines(script, &[dir], "pyarrow could not read the Parquet files");
    let mut lines = lines.iter();
    let head: Value = serde_json::from_slice(lines.next().expect("schema")).expect("json");
    let rows = lines
        .map(|l| serde_json::from_slice(l).expect("json row"))
        .collect();
    (head["schema"].as_str().expect("schema").to_string(), rows)
}

/// A JSON Lines ticket as pyarrow prints the Parquet one: the same fields, the instant in UTC.
fn normalised(mut v: Value) -> Value {
    let t = chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().expect("created_at"))
        .expect("RFC 3339");
    v["created_at"] = Value::from(t.to_utc().to_rfc3339());
    v
}

/// `query` with the fixture's S3 settings (or `--dir`), its output in `format`.
async fn query(env: &Env, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["query"];
    all.extend_from_slice(args);
    run("ticket-processor", env, &all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_holds_what_jsonl_holds_and_query_reads_both_the_bucket_and_a_directory() {
    let fx = Fixture::start().await;
    fx.create_topic(2).await;
    let input = tickets(500, 3);
    let ts = stamped(&input, |i| BEFORE_NINE + 500 + 10 * i);
    fx.broker.publish_at(&fx.topic, &ts).await;
    let env = |prefix: &str, format: &str| {
        fx.env()
            .set("S3_PREFIX", prefix)
            .set("CONSUMER_GROUP", format!("{}-{prefix}", fx.group()))
            .set("OUTPUT_FORMAT", format)
    };
    run_ok("ticket-processor", &env("j", "jsonl"), &["--drain"]).await;
    run_ok("ticket-processor", &env("p", "parquet"), &["--drain"]).await;

    // The same objects in both formats...
    let jkeys = fx.s3.keys("j/tickets_with_team/").await;
    let pkeys = fx.s3.keys("p/tickets_with_team/").await;
    let strip = |keys: &[String], prefix: &str, ext: &str| -> Vec<String> {
        keys.iter()
            .map(|k| {
                k.trim_start_matches(prefix)
                    .trim_end_matches(ext)
                    .to_string()
            })
            .collect()
    };
    assert_eq!(
        strip(&jkeys, "j/", ".jsonl"),
        strip(&pkeys, "p/", ".parquet")
    );
    // ... holding the same tickets, as an independent reader sees them.
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, key) in pkeys.iter().enumerate() {
        let body = fx.s3.get(key).await.expect("object");
        assert_eq!(&body[..4], b"PAR1", "{key} is not Parquet");
        std::fs::write(dir.path().join(format!("{i:03}.parquet")), body).expect("write");
    }
    let (schema, rows) = read_parquet_with_pyarrow(dir.path());
    assert_eq!(
        schema,
        "ticket_id:string,client_id:int64,created_at:timestamp[us, tz=UTC],request:string,request_type:string,priority:string,support_team:string"
    );
    let by_id = |rows: Vec<Value>| -> BTreeMap<String, Value> {
        rows.into_iter()
            .map(|v| {
                (
                    v["ticket_id"].as_str().expect("id").to_string(),
                    normalised(v),
                )
            })
            .collect()
    };
    let jsonl = by_id(fx.s3.json_lines("j/tickets_with_team/").await);
    assert_eq!(jsonl.len(), 500);
    assert!(
        by_id(rows) == jsonl,
        "Parquet rows differ from the JSON Lines"
    );

    // query reads both the same way: counts per request type equal the tickets'.
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for v in jsonl.values() {
        *expected
            .entry(v["request_type"].as_str().expect("type").to_string())
            .or_default() += 1;
    }
    let sql = "SELECT request_type, count(*) AS n FROM tickets WHERE date = '2026-11-29' AND hour = 9 GROUP BY request_type ORDER BY request_type";
    let mut expected_csv = "request_type,n\n".to_string();
    for (t, n) in &expected {
        expected_csv += &format!("{t},{n}\n");
    }
    for prefix in ["j", "p"] {
        let (ok, out, err) = query(&env(prefix, "jsonl"), &["--format", "csv", sql]).await;
        assert!(ok, "query failed: {err}");
        assert_eq!(out, expected_csv, "query over {prefix}/");
    }
    // JSON output, the partition columns, and the counts table.
    let (ok, out, err) = query(
        &env("p", "jsonl"),
        &[
            "--format",
            "json",
            "SELECT topic, partition, count(*) AS n FROM tickets GROUP BY 1, 2 ORDER BY 2",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let parts: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(parts.len(), 2, "{out}");
    assert_eq!(parts[0]["topic"], fx.topic.as_str());
    assert_eq!(
        parts
            .iter()
            .map(|p| p["n"].as_u64().expect("n"))
            .sum::<u64>(),
        500
    );
    let (ok, out, err) = query(
        &env("j", "jsonl"),
        &["--format", "csv", "SELECT sum(count) AS total FROM counts"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "total\n500\n");

    // A bad query: DataFusion's message, exit code 2.
    let (ok, _, err) = query(&env("j", "jsonl"), &["SELECT nope FROM tickets"]).await;
    assert!(!ok && err.contains("nope"), "{err}");
    let status = std::process::Command::new(bin("ticket-processor"))
        .args(["query", "--dir", ".", "SELEKT 1"])
        .status()
        .expect("runs");
    assert_eq!(status.code(), Some(2));

    // A process-file directory, in Parquet.
    let file = dir.path().join("tickets.jsonl");
    let text: String = input.iter().map(|(_, j)| format!("{j}\n")).collect();
    std::fs::write(&file, text + "not a ticket\n").expect("write");
    // A name that must be percent-encoded in a URL (and would decode to "A" if it were not).
    let out_dir = dir.path().join("process-file out %41");
    let out_dir = out_dir.to_str().expect("utf8 path");
    run_ok(
        "ticket-processor",
        &Env::default(),
        &[
            "process-file",
            file.to_str().expect("utf8"),
            "--output-dir",
            out_dir,
            "--output-format",
            "parquet",
        ],
    )
    .await;
    let (ok, out, err) = query(
        &Env::default(),
        &[
            "--dir",
            out_dir,
            "--format",
            "csv",
            sql.replace(" WHERE date = '2026-11-29' AND hour = 9", "")
                .as_str(),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, expected_csv, "query over a process-file directory");
    // Its tickets have the hour they were created in, and no topic or partition.
    let (ok, out, err) = query(
        &Env::default(),
        &[
            "--dir",
            out_dir,
            "--format",
            "csv",
            "SELECT count(*) AS n FROM tickets WHERE hour IS NOT NULL \
             AND date = CAST(date_trunc('day', created_at) AS DATE) \
             AND hour = date_part('hour', created_at) AND topic IS NULL AND \"partition\" IS NULL",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!("n\n{}\n", input.len()),
        "process-file's date and hour"
    );

    // query only reads: no COPY (or DDL) into the lake.
    let copy = format!("COPY (SELECT * FROM tickets) TO '{out_dir}/tickets_with_team/dup.csv'");
    let (ok, _, err) = query(&Env::default(), &["--dir", out_dir, copy.as_str()]).await;
    assert!(!ok && err.contains("COPY"), "{err}");
    assert!(
        !Path::new(out_dir)
            .join("tickets_with_team/dup.csv")
            .exists()
    );

    // The report of that directory: its dead letter counted, its tickets in the hours they
    // were created in (none without an hour: the issue was "0 hours covered").
    run_ok(
        "ticket-processor",
        &Env::default(),
        &["report", "--dir", out_dir],
    )
    .await;
    let page = std::fs::read_to_string(Path::new(out_dir).join("reports/index.html"))
        .expect("reports/index.html in the directory");
    assert!(page.contains(r#"data-total="tickets" data-value="500""#));
    assert!(page.contains(r#"data-total="dead_letters" data-value="1""#));
    assert!(!page.contains("data-undated="), "tickets without an hour");
    assert!(
        page.contains(r#"data-total="hours""#)
            && !page.contains(r#"data-total="hours" data-value="0""#)
    );
    assert!(!page.contains("did not see the same tickets"));
}

/// The attributes of every `<tag …>` that has `attr`, from HTML as Chromium serialises it.
fn tags_with(html: &str, tag: &str, attr: &str) -> Vec<BTreeMap<String, String>> {
    let open = format!("<{tag} ");
    let mut found = Vec::new();
    for piece in html.split(open.as_str()).skip(1) {
        let Some(end) = piece.find('>') else { continue };
        let mut attrs = BTreeMap::new();
        let mut rest = &piece[..end];
        while let Some(eq) = rest.find("=\"") {
            let name = rest[..eq].trim().to_string();
            let after = &rest[eq + 2..];
            let close = after.find('"').unwrap_or(after.len());
            let value = after[..close]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&amp;", "&");
            attrs.insert(name, value);
            rest = after.get(close + 1..).unwrap_or("");
        }
        if attrs.contains_key(attr) {
            found.push(attrs);
        }
    }
    found
}

/// The `data-count` cells of the table whose rows are `row` and columns `col`, by (row, col).
fn count_cells(dom: &str, row: &str, col: &str) -> BTreeMap<(String, String), u64> {
    tags_with(dom, "td", "data-count")
        .iter()
        .filter(|a| a.contains_key(row))
        .map(|a| {
            let n = a["data-count"].parse::<u64>().expect("count");
            ((a[row].clone(), a[col].clone()), n)
        })
        .collect()
}

/// The page as headless Chromium renders it (its DOM after layout), and a screenshot when
/// `REPORT_SCREENSHOT` names a file (how docs/report.png is made).
async fn render_in_chromium(page: &Path) -> String {
    let profile = tempfile::tempdir().expect("tempdir");
    let chromium = |extra: &[String]| {
        let mut cmd = tokio::process::Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .kill_on_drop(true);
        cmd
    };
    if let Ok(shot) = std::env::var("REPORT_SCREENSHOT") {
        let args = [
            format!("--screenshot={shot}"),
            "--window-size=1280,1700".to_string(),
        ];
        let status = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            chromium(&args).status(),
        )
        .await
        .expect("chromium hung")
        .expect("chromium runs");
        assert!(status.success(), "screenshot failed");
    }
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        chromium(&["--dump-dom".to_string()]).output(),
    )
    .await
    .expect("chromium hung")
    .expect("chromium runs (tests/run.sh installs Debian's chromium)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8 DOM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_in_the_bucket_shows_the_lakes_numbers_when_rendered_by_chromium() {
    let fx = Fixture::start().await;
    fx.create_topic(1).await;
    // 400 tickets over seven hours (05:59 to 11:59), and three messages that are not tickets.
    let mut ts: Vec<(String, String, i64)> = tickets(400, 4)
        .into_iter()
        .enumerate()
        .map(|(i, (id, json))| (id, json, BEFORE_NINE - 3 * 3_600_000 + 54_000 * i as i64))
        .collect();
    for i in 0..3 {
        ts.push((format!("bad-{i}"), "not a ticket".to_string(), BEFORE_NINE));
    }
    fx.broker.publish_at(&fx.topic, &ts).await;
    run_ok("ticket-processor", &fx.env(), &["--drain"]).await;
    run_ok("ticket-processor", &fx.env(), &["report"]).await;

    // What the lake holds, read here from the objects and their keys (not through `query`).
    let mut per_hour: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut load: BTreeMap<(String, String), u64> = BTreeMap::new();
    for key in fx.s3.keys("tickets_with_team/").await {
        let part = |name: &str| -> String {
            key.split('/')
                .find_map(|s| s.strip_prefix(name))
                .expect("partition in key")
                .to_string()
        };
        let hour = format!("{} {}:00", part("date="), part("hour="));
        let body = fx.s3.get(&key).await.expect("object");
        for line in String::from_utf8_lossy(&body).lines() {
            let v: Value = serde_json::from_str(line).expect("json");
            let s = |f: &str| v[f].as_str().expect("text").to_string();
            *per_hour
                .entry((hour.clone(), s("request_type")))
                .or_default() += 1;
            *load.entry((s("support_team"), s("priority"))).or_default() += 1;
        }
    }
    let hours: std::collections::BTreeSet<&String> = per_hour.keys().map(|(h, _)| h).collect();
    assert_eq!(hours.len(), 7, "{hours:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("index.html");
    let html = fx
        .s3
        .get("reports/index.html")
        .await
        .expect("reports/index.html in the bucket");
    let html = String::from_utf8(html).expect("utf8");
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
    std::fs::write(&page, &html).expect("write");
    let dom = render_in_chromium(&page).await;

    let shown_hours = count_cells(&dom, "data-hour", "data-request-type");
    let shown_load = count_cells(&dom, "data-team", "data-priority");
    assert_eq!(shown_hours, per_hour, "tickets per hour by type");
    assert_eq!(shown_load, load, "load per team and priority");
    let totals: BTreeMap<String, String> = tags_with(&dom, "div", "data-total")
        .iter()
        .map(|a| (a["data-total"].clone(), a["data-value"].clone()))
        .collect();
    assert_eq!(totals["tickets"], "400");
    assert_eq!(totals["dead_letters"], "3");
    assert_eq!(totals["hours"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_of_the_earlier_layout_keeps_working_and_query_reads_both() {
    let fx = Fixture::start().await;
    fx.create_topic(1).await;
    let input = tickets(30, 5);
    let ts = stamped(&input, |i| BEFORE_NINE + 500 + i);
    fx.broker.publish_at(&fx.topic, &ts).await;

    // What the previous version left: offsets 0-9 under the old keys, 10-19 committed but
    // not yet copied (its checkpoint names one pending object, the old format).
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("first20.jsonl");
    let text: String = input[..20].iter().map(|(_, j)| format!("{j}\n")).collect();
    std::fs::write(&file, text).expect("write");
    let out = dir.path().join("out");
    let (file, out_s) = (file.to_str().expect("utf8"), out.to_str().expect("utf8"));
    run_ok(
        "ticket-processor",
        &Env::default(),
        &["process-file", file, "--output-dir", out_s],
    )
    .await;
    let enriched: String = jsonl_tree(&out.join("tickets_with_team"))
        .into_values()
        .collect();
    let lines: Vec<&str> = enriched.lines().collect();
    assert_eq!(lines.len(), 20);
    let topic = &fx.topic;
    let old_key = |first: u64, last: u64| {
        format!("tickets_with_team/topic={topic}/partition=0/{first:020}-{last:020}.jsonl")
    };
    let body = |range: std::ops::Range<usize>| lines[range].join("\n").into_bytes();
    fx.s3
        .put(&old_key(0, 9), [body(0..10), b"\n".to_vec()].concat())
        .await;
    let staging = format!(
        "_staging/topic={topic}/partition=0/{:020}-oldattempt.jsonl",
        10
    );
    fx.s3
        .put(&staging, [body(10..20), b"\n".to_vec()].concat())
        .await;
    let mut counts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for l in &lines {
        let v: Value = serde_json::from_str(l).expect("json");
        let s = |f: &str| v[f].as_str().expect("text").to_string();
        *counts
            .entry((s("request_type"), s("priority"), s("support_team")))
            .or_default() += 1;
    }
    let counts: Vec<Value> = counts
        .into_iter()
        .map(|((r, p, t), n)| {
            serde_json::json!({"request_type": r, "priority": p, "support_team": t, "count": n})
        })
        .collect();
    let checkpoint = serde_json::json!({
        "next_offset": 20, "tickets": 20, "dead_letters": 0, "counts": counts,
        "pending": {"staging_key": staging, "final_key": old_key(10, 19)},
    });
    fx.s3
        .put(
            &format!("_checkpoints/topic={topic}/partition=0.json"),
            serde_json::to_vec_pretty(&checkpoint).expect("json"),
        )
        .await;

    // This version finishes the old pending batch, then writes the rest under date=/hour=.
    run_ok("ticket-processor", &fx.env(), &["--drain"]).await;
    let keys = fx.s3.keys("tickets_with_team/").await;
    let new_key = format!(
        "tickets_with_team/topic={topic}/date=2026-11-29/hour=09/partition=0/{:020}-{:020}.jsonl",
        20, 29
    );
    assert_eq!(keys, vec![new_key, old_key(0, 9), old_key(10, 19)]);
    fx.assert_exactly_once(&fx.topic_ids()).await;
    assert!(fx.s3.keys("_staging/").await.is_empty());
    let (ok, out, err) = query(
        &fx.env(),
        &[
            "--format",
            "csv",
            "SELECT count(*) AS all_tickets, count(date) AS with_hour FROM tickets",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "all_tickets,with_hour\n30,10\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_output_holds_every_ticket_once_through_a_kill_and_reruns_as_deltalake_reads_it() {
    let fx = Fixture::start().await;
    let env = fx
        .env()
        .set("OUTPUT_FORMAT", "delta")
        .set("BATCH_MAX_RECORDS", "40");
    run_ok(
        "ticket-producer",
        &env,
        &["--count", "300", "--partitions", "3"],
    )
    .await;

    // Killed for real once it has committed something, then finished by a --drain.
    let mut killed = fx.spawn("ticket-processor", &env, &[], "killed");
    let addr = killed.http_addr().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric(addr, "ticket_processor_tickets_written_total")
        .await
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing written: {}",
            killed.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    killed.signal(nix::sys::signal::Signal::SIGKILL);
    let status = killed.exit_within(std::time::Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "not killed: {status:?}"
    );
    run_ok("ticket-processor", &env, &["--drain"]).await;
    // More tickets, and a rerun with nothing new.
    run_ok("ticket-producer", &env, &["--count", "100"]).await;
    run_ok("ticket-processor", &env, &["--drain"]).await;
    run_ok("ticket-processor", &env, &["--drain"]).await;

    let DeltaRead { rows, versions, .. } = fx.read_delta(3);
    let records = fx.broker.read_all(&fx.topic);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let routing = ticket_core::Routing::default();
    for r in &rows {
        *seen
            .entry(r["ticket_id"].as_str().expect("id").to_string())
            .or_default() += 1;
        assert_eq!(
            r["support_team"].as_str(),
            Some(routing.team_for(r["request_type"].as_str().expect("type"))),
            "{r}"
        );
        assert_eq!(r["topic"].as_str(), Some(fx.topic.as_str()), "{r}");
    }
    let ids = fx.topic_ids();
    assert_eq!(ids.len(), 400);
    assert_eq!(rows.len(), 400, "every ticket once, no duplicate");
    assert!(
        ids.iter().all(|id| seen.get(id) == Some(&1)),
        "a ticket missing or twice"
    );
    // Each partition's transaction version is its last offset: where a new owner resumes.
    for p in 0..3 {
        let last = records
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| r.offset)
            .max();
        assert_eq!(versions[&p], last, "partition {p}");
    }
    // The counts object, the data contract, is a GROUP BY over the table's snapshot.
    let counts = fx
        .s3
        .get("counts_by_request_type/latest.jsonl")
        .await
        .expect("latest.jsonl");
    assert_eq!(
        crate::common::checks::reported_by_type(&counts),
        Ok(crate::common::checks::tickets_by_type(&rows))
    );

    // `query` reads the table's snapshot, not a listing: a data file no commit refers to (a
    // crashed or fenced writer's) is not read.
    let committed = fx.s3.keys("tables/tickets_with_team/topic=").await;
    let body = fx.s3.get(&committed[0]).await.expect("a data file");
    let orphan = committed[0].replace(".parquet", "0.parquet");
    fx.s3.put(&orphan, body).await;
    let sql = "SELECT count(*) AS n, count(DISTINCT ticket_id) AS ids, count(DISTINCT \"partition\") AS parts, min(\"hour\") IS NOT NULL AS hours FROM tickets";
    let (ok, out, err) = query(&env, &["--format", "csv", sql]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "n,ids,parts,hours\n400,400,3,true", "{err}");
}

/// A backfill and the stream end in one table: `process-file --output-format delta` appends
/// a file's tickets to the table the stream writes, by the hour of their `created_at`, through
/// the stream's committer; run again on the same file it adds nothing. Read by delta-rs and by `query`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_backfill_lands_once_in_the_streams_delta_table_by_the_hour_it_was_created() {
    let fx = Fixture::start().await;
    let env = fx.env().set("OUTPUT_FORMAT", "delta");
    run_ok(
        "ticket-producer",
        &env,
        &["--count", "50", "--partitions", "1"],
    )
    .await;
    run_ok("ticket-processor", &env, &["--drain"]).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("backfill.jsonl");
    let created = |i: usize| format!("2024-05-0{}T{:02}:20:00+02:00", 1 + i % 3, i % 24);
    let mut text: String = (0..30)
        .map(|i| {
            format!(
                "{{\"ticket_id\":\"BACKFILL-{i}\",\"client_id\":{i},\"created_at\":\"{}\",\"request\":\"old\",\"request_type\":\"billing\",\"priority\":\"low\"}}\n",
                created(i)
            )
        })
        .collect();
    text.push_str("not a ticket\n");
    std::fs::write(&file, text).expect("write");
    let out_dir = dir.path().join("out");
    let args = [
        "process-file",
        file.to_str().expect("utf8"),
        "--output-dir",
        out_dir.to_str().expect("utf8"),
    ];
    let out = run_ok("ticket-processor", &env, &args).await;
    assert!(
        out.contains("appended to the Delta table") && out.contains("30 tickets"),
        "{out}"
    );
    let out = run_ok("ticket-processor", &env, &args).await;
    assert!(out.contains("already in the Delta table"), "a rerun: {out}");

    let rows = fx.read_delta(1).rows;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        let id = r["ticket_id"].as_str().expect("id");
        *seen.entry(id.to_string()).or_default() += 1;
        if let Some(i) = id.strip_prefix("BACKFILL-") {
            let i: usize = i.parse().expect("n");
            let utc = chrono::DateTime::parse_from_rfc3339(&created(i))
                .expect("time")
                .to_utc();
            assert_eq!(
                r["date"].as_str(),
                Some(utc.format("%Y-%m-%d").to_string().as_str()),
                "{r}"
            );
            assert_eq!(
                r["hour"].as_i64(),
                Some(i64::from(chrono::Timelike::hour(&utc))),
                "{r}"
            );
            assert!(
                r["topic"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("file:backfill.jsonl@")),
                "{r}"
            );
        } else {
            assert_eq!(r["topic"].as_str(), Some(fx.topic.as_str()), "{r}");
        }
    }
    assert_eq!(rows.len(), 80, "50 streamed and 30 backfilled, each once");
    assert!(seen.values().all(|n| *n == 1), "a ticket twice");
    let sql = "SELECT count(*) AS n, count(DISTINCT ticket_id) AS ids FROM tickets";
    let (ok, out, err) = query(&env, &["--format", "csv", sql]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "n,ids\n80,80", "{err}");
}

/// A backfill over many hours is committed in parts of 256 hour files, each exactly once: killed
/// between two commits and run again, it adds exactly the parts after the last one committed
/// (every ticket once, as delta-rs reads the table); a third run adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_between_two_commits_adds_exactly_the_rest_when_run_again() {
    let fx = Fixture::start().await;
    let env = fx.env().set("OUTPUT_FORMAT", "delta");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hours.jsonl");
    // 600 tickets, each in an hour of its own, in no order: three parts (256, 256, 88 hours).
    let text: String = (0..600i64)
        .map(|i| {
            let hour = (i * 389) % 600;
            let at = chrono::DateTime::from_timestamp(1_700_000_000 + hour * 3_600, 0)
                .expect("a time")
                .to_rfc3339();
            format!(
                "{{\"ticket_id\":\"H-{i}\",\"client_id\":{i},\"created_at\":\"{at}\",\"request\":\"old\",\"request_type\":\"billing\",\"priority\":\"low\"}}\n"
            )
        })
        .collect();
    std::fs::write(&file, text).expect("write");
    let out_dir = dir.path().join("out");
    let args = [
        "process-file",
        file.to_str().expect("utf8"),
        "--output-dir",
        out_dir.to_str().expect("utf8"),
    ];
    let ids = || {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for r in fx.read_delta(1).rows {
            *seen
                .entry(r["ticket_id"].as_str().expect("id").to_string())
                .or_default() += 1;
        }
        seen
    };

    // Killed (as SIGKILL would) just after its second commit.
    let killed = env
        .clone()
        .set("TICKET_PROCESSOR_FAILPOINT", "after-table-commit:abort:2");
    let (ok, out, err) = run("ticket-processor", &killed, &args).await;
    assert!(!ok, "the failpoint kills the run:\n{out}\n{err}");
    assert!(err.contains("Failpoint reached"), "{err}");
    let seen = ids();
    assert_eq!(seen.len(), 512, "two parts of 256 hours: {}", seen.len());
    assert!(seen.values().all(|n| *n == 1), "a ticket twice");

    let out = run_ok("ticket-processor", &env, &args).await;
    assert!(
        out.contains("88 tickets in 88 files, 1 commit, after 2 committed by an earlier run"),
        "{out}"
    );
    let seen = ids();
    let expected: BTreeMap<String, usize> = (0..600).map(|i| (format!("H-{i}"), 1)).collect();
    assert_eq!(seen, expected, "every ticket of the file exactly once");

    let out = run_ok("ticket-processor", &env, &args).await;
    assert!(
        out.contains("already in the Delta table"),
        "a third run: {out}"
    );
    assert_eq!(ids(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_makes_one_file_per_partition_hour_and_vacuum_removes_what_no_snapshot_needs() {
    let fx = Fixture::start().await;
    fx.create_topic(1).await;
    // Two past hours (08:xx and 09:xx), in many small batches: many files per hour.
    let input = stamped(&tickets(300, 7), |i| BEFORE_NINE - 1_000_000 + i * 5_000);
    fx.broker.publish_at(&fx.topic, &input).await;
    let env = fx
        .env()
        .set("OUTPUT_FORMAT", "delta")
        .set("BATCH_MAX_RECORDS", "20");
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let data_files = || async {
        let keys = fx.s3.keys("tables/tickets_with_team/topic=").await;
        keys.into_iter()
            .filter(|k| k.ends_with(".parquet"))
            .collect::<Vec<_>>()
    };
    let written = data_files().await;
    assert!(written.len() >= 15, "{written:?}");
    let counts = fx.s3.get("counts_by_request_type/latest.jsonl").await;
    // A writer killed between its data file and its commit left this behind.
    let orphan = written[0].replace(".parquet", "0.parquet");
    fx.s3
        .put(&orphan, fx.s3.get(&written[0]).await.expect("file"))
        .await;

    // Two compactions at once: one rewrites each hour, the other finds it done.
    let args = [
        "compact",
        "--older-than-hours",
        "1",
        "--vacuum-retain-hours",
        "0",
    ];
    let (a, b) = tokio::join!(
        run("ticket-processor", &env, &args),
        run("ticket-processor", &env, &args)
    );
    assert!(a.0 && b.0, "{}\n{}\n{}\n{}", a.1, a.2, b.1, b.2);
    let summary = format!("{}{}", a.1, b.1);
    assert!(summary.contains("compacted"), "{summary}");

    let DeltaRead { rows, .. } = fx.read_delta(1);
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|r| r["ticket_id"].as_str().expect("id"))
        .collect();
    ids.sort();
    let mut expected: Vec<&str> = input.iter().map(|t| t.0.as_str()).collect();
    expected.sort();
    assert_eq!(ids, expected, "every ticket once after the rewrite");
    // One file per partition-hour left in the bucket: the replaced ones and the orphan are gone.
    let left = data_files().await;
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().any(|k| k.contains("/hour=08/"))
            && left.iter().any(|k| k.contains("/hour=09/"))
    );
    assert!(!left.contains(&orphan));
    // A processor after the compaction: nothing new, the counts are what they were.
    run_ok("ticket-processor", &env, &["--drain"]).await;
    assert_eq!(
        fx.s3.get("counts_by_request_type/latest.jsonl").await,
        counts
    );
    let (ok, out, err) = query(
        &env,
        &["--format", "csv", "SELECT count(*) AS n FROM tickets"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "n\n300");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_processor_compacts_its_closed_hours_in_the_background() {
    let fx = Fixture::start().await;
    fx.create_topic(2).await;
    // Five hours, 04:00 to 08:59, a ticket a minute, in batches of 10: several files per
    // partition-hour.
    let four = BEFORE_NINE + 500 - 5 * 3_600_000;
    let input = stamped(&tickets(300, 11), |i| four + i * 60_000);
    fx.broker.publish_at(&fx.topic, &input).await;
    let env = fx
        .env()
        .set("OUTPUT_FORMAT", "delta")
        .set("BATCH_MAX_RECORDS", "10")
        .set("COMPACT_CLOSED_AFTER", "1h")
        .set("DELTA_LOG_RETENTION", "12h")
        .set("DELTA_DELETED_FILE_RETENTION", "3h");
    let mut p = fx.spawn("ticket-processor", &env, &[], "maintained");
    let addr = p.http_addr().await;
    // Closed: the hours that ended at least 1 h before 08:00 (04, 05, 06), in each of the two
    // partitions; each becomes one file while the processor runs, with no command.
    let closed = r#"ticket_processor_table_files{hours="closed"}"#;
    let hours = r#"ticket_processor_table_partition_hours{hours="closed"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let written = metric(addr, "ticket_processor_tickets_written_total").await;
        let files = metric(addr, closed).await;
        let n = metric(addr, hours).await;
        if written == Some(300.0) && files == Some(6.0) && n == Some(6.0) {
            break;
        }
        assert!(
            p.is_running() && std::time::Instant::now() < deadline,
            "closed hours not compacted (written {written:?}, closed files {files:?} in {n:?} partition-hours); log:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let compactions = metric(addr, "ticket_processor_table_compactions_total").await;
    assert!(compactions.is_some_and(|n| n >= 6.0), "{compactions:?}");
    p.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(p.wait(Duration::from_secs(30)).await, "{}", p.log());

    let DeltaRead {
        rows,
        files,
        configuration,
        ..
    } = fx.read_delta(2);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *seen
            .entry(r["ticket_id"].as_str().expect("id"))
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 300, "every ticket");
    assert!(seen.values().all(|n| *n == 1), "a ticket twice");
    let mut per_hour: BTreeMap<(String, String), usize> = BTreeMap::new();
    for f in &files {
        let part = |k: &str| {
            f.split('/')
                .find_map(|s| s.strip_prefix(k))
                .unwrap_or_default()
                .to_string()
        };
        *per_hour
            .entry((part("partition="), part("hour=")))
            .or_default() += 1;
    }
    for p in ["0", "1"] {
        for h in ["04", "05", "06"] {
            assert_eq!(
                per_hour.get(&(p.into(), h.into())),
                Some(&1),
                "{per_hour:?}"
            );
        }
        for h in ["07", "08"] {
            let n = per_hour.get(&(p.into(), h.into())).copied().unwrap_or(0);
            assert!(n > 1, "an open hour is left as written: {per_hour:?}");
        }
    }
    // The retentions were set when the processor made the table.
    assert_eq!(
        configuration.get("delta.logRetentionDuration"),
        Some(&Some("interval 43200 seconds".to_string()))
    );
    assert_eq!(
        configuration.get("delta.deletedFileRetentionDuration"),
        Some(&Some("interval 10800 seconds".to_string()))
    );
    // The running totals still count every ticket once.
    let counts = fx
        .s3
        .get("counts_by_request_type/latest.jsonl")
        .await
        .expect("counts");
    let total: u64 = String::from_utf8_lossy(&counts)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["count"]
                .as_u64()
                .expect("count")
        })
        .sum();
    assert_eq!(total, 300);
}
