//! End to end: the real `ticket-producer` and `ticket-processor` against a real broker and a
//! real S3 server (see `common`).

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_run_lands_every_ticket_once_and_reruns_add_nothing() {
    let fx = Fixture::start().await;
    let env = fx.env();

    let out = run_ok("ticket-producer", &env, &[]).await;
    assert!(out.contains("delivered 100 of 100 tickets"), "{out}");
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let ids = fx.topic_ids();
    assert_eq!(ids.len(), 100);
    assert_eq!(fx.assert_exactly_once(&ids).await, 100);

    // The original's one-shot rerun duplicated or overwrote; ours adds nothing.
    let before: Vec<(String, Vec<u8>)> = {
        let mut v = Vec::new();
        for k in fx.s3.keys("tickets_with_team/").await {
            v.push((k.clone(), fx.s3.get(&k).await.expect("object")));
        }
        v
    };
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let mut after = Vec::new();
    for k in fx.s3.keys("tickets_with_team/").await {
        after.push((k.clone(), fx.s3.get(&k).await.expect("object")));
    }
    assert_eq!(before, after, "a second --drain changed the output");

    // A second producer run adds 100 new tickets, no id collides with the first run's.
    run_ok("ticket-producer", &env, &[]).await;
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let ids = fx.topic_ids();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        200,
        "ticket ids collided across runs"
    );
    assert_eq!(fx.assert_exactly_once(&ids).await, 200);
    // A --drain that ended cleanly has written every object its checkpoints record.
    assert_eq!(fx.recorded_but_missing().await, Vec::<String>::new());
}

fn valid_ticket(id: &str, request_type: &str) -> String {
    format!(
        r#"{{"ticket_id":"{id}","client_id":4242,"created_at":"2025-10-20T03:00:23.010952","request":"The sensor gateway keeps crashing.","request_type":"{request_type}","priority":"medium"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_the_dead_letter_topic_with_their_reason() {
    let fx = Fixture::start().await;
    let env = fx.env().set("BATCH_MAX_AGE_MS", "500");
    fx.create_topic(1).await;

    let valid = [
        valid_ticket("OK-1", "billing"),
        valid_ticket("OK-2", "refund"),
        valid_ticket("OK-3", "technical"),
    ];
    let truncated = valid_ticket("BAD-T", "billing");
    let truncated = &truncated[..50];
    let wrong_type = valid_ticket("BAD-C", "billing").replace("4242", "\"4242\"");
    let bad_priority = valid_ticket("BAD-P", "billing").replace("medium", "urgent");
    let bad_time =
        valid_ticket("BAD-D", "billing").replace("2025-10-20T03:00:23.010952", "last tuesday");
    let missing = valid_ticket("BAD-M", "billing").replace(r#","request_type":"billing""#, "");
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", b"".to_vec(), "empty message"),
        ("utf8", vec![b'{', 0xc3, 0x28, b'}'], "not valid UTF-8"),
        (
            "truncated",
            truncated.as_bytes().to_vec(),
            "malformed or truncated JSON",
        ),
        ("array", b"[1,2,3]".to_vec(), "expected a JSON object"),
        (
            "client",
            wrong_type.into_bytes(),
            "field `client_id` must be an integer",
        ),
        (
            "priority",
            bad_priority.into_bytes(),
            "field `priority` must be one of",
        ),
        (
            "time",
            bad_time.into_bytes(),
            "field `created_at` must be an RFC 3339 timestamp",
        ),
        (
            "missing",
            missing.into_bytes(),
            "missing field `request_type`",
        ),
    ];
    let mut messages: Vec<RawMessage> = Vec::new();
    messages.push((Some(b"OK-1"), Some(valid[0].as_bytes())));
    for (k, v, _) in &bad {
        messages.push((Some(k.as_bytes()), Some(v.as_slice())));
    }
    messages.push((Some(b"OK-2"), Some(valid[1].as_bytes())));
    messages.push((Some(b"tombstone"), None));
    messages.push((Some(b"OK-3"), Some(valid[2].as_bytes())));
    fx.broker.publish(&fx.topic, &messages).await;

    let mut processor = fx.spawn("ticket-processor", &env, &[], "processor");
    let addr = processor.http_addr().await;

    let lines = eventually(
        Duration::from_secs(60),
        "the valid tickets in S3",
        || async {
            let l = fx.s3.json_lines("tickets_with_team/").await;
            (l.len() >= 3).then_some(l)
        },
    )
    .await;
    let teams: BTreeMap<String, String> = lines
        .iter()
        .map(|l| {
            (
                l["ticket_id"].as_str().expect("id").into(),
                l["support_team"].as_str().expect("team").into(),
            )
        })
        .collect();
    assert_eq!(
        teams,
        BTreeMap::from([
            ("OK-1".into(), "Billing Team".into()),
            ("OK-2".into(), "General Support".into()),
            ("OK-3".into(), "Tech Support".into())
        ])
    );
    // Counted too: a map keeps one line per id, so a duplicate would disappear in it.
    assert_eq!(
        lines.len(),
        teams.len(),
        "a ticket written twice: {lines:?}"
    );

    let (status, _) = http_get(addr, "/health/ready").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(addr, "/health/live").await;
    assert_eq!(status, 200);
    let (_, metrics) = eventually(
        Duration::from_secs(20),
        "metrics to show the batch",
        || async {
            let (s, body) = http_get(addr, "/metrics").await;
            body.contains("ticket_processor_tickets_written_total 3")
                .then_some((s, body))
        },
    )
    .await;
    assert!(
        metrics.contains("ticket_processor_dead_lettered_total 9"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ticket_processor_messages_in_total 12"),
        "{metrics}"
    );
    // Each written batch went through every stage once, and its freshness was measured.
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{metrics}"))
    };
    let batches = value("ticket_processor_batches_written_total");
    assert!(batches >= 1.0, "{metrics}");
    for stage in [
        "fetch",
        "seal",
        "queue",
        "encode",
        "wait",
        "data_write",
        "record",
        "visible",
    ] {
        let count = value(&format!(
            "ticket_processor_stage_seconds_count{{stage=\"{stage}\"}}"
        ));
        assert_eq!(count, batches, "stage {stage}: {metrics}");
    }
    let sum = |stage: &str| {
        value(&format!(
            "ticket_processor_stage_seconds_sum{{stage=\"{stage}\"}}"
        ))
    };
    assert!(
        sum("visible") >= sum("record") && sum("record") > 0.0,
        "a batch is visible after its record is written: {metrics}"
    );

    // Read once the batch is written (its dead letters are durable before its commit, which
    // the metrics above show), so that a duplicate would be counted, not waited past.
    let dead = fx.broker.read_all(&fx.dlq());
    let written = fx.s3.json_lines("tickets_with_team/").await;
    assert_eq!(written.len(), 3, "each valid ticket once: {written:?}");
    assert_eq!(
        dead.len(),
        bad.len() + 1,
        "each invalid message once in the DLQ"
    );
    let source = fx.broker.read_all(&fx.topic);
    for d in &dead {
        let offset: i64 = d.headers["source.offset"].parse().expect("offset header");
        let original = source
            .iter()
            .find(|r| r.offset == offset)
            .expect("source message");
        assert_eq!(d.key, original.key, "original key kept");
        assert_eq!(
            d.value.clone().unwrap_or_default(),
            original.value.clone().unwrap_or_default(),
            "original bytes kept"
        );
        assert_eq!(d.headers["source.topic"], fx.topic);
        assert_eq!(d.headers["source.partition"], "0");
        let key = String::from_utf8(d.key.clone().expect("key")).expect("utf8");
        let reason = &d.headers["error.message"];
        let expected = bad
            .iter()
            .find(|(k, _, _)| *k == key)
            .map_or("empty message", |(_, _, r)| *r);
        assert!(
            reason.contains(expected),
            "{key}: reason {reason:?} lacks {expected:?}"
        );
    }

    processor.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        processor.wait(Duration::from_secs(30)).await,
        "SIGTERM should exit 0; log:\n{}",
        processor.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_file_agrees_with_the_streaming_path() {
    let fx = Fixture::start().await;
    let env = fx.env();
    run_ok("ticket-producer", &env, &["--count", "700", "--seed", "11"]).await;
    run_ok(
        "ticket-processor",
        &env,
        &["--drain", "--batch-max-records", "64"],
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("tickets.jsonl");
    let mut text = String::new();
    for r in fx.broker.read_all(&fx.topic) {
        text.push_str(std::str::from_utf8(&r.value.expect("value")).expect("utf8"));
        text.push('\n');
    }
    text.push_str("{\"ticket_id\": 42}\n");
    std::fs::write(&input, text).expect("write input");
    let out_dir = dir.path().join("out");
    let out = run_ok(
        "ticket-processor",
        &env,
        &[
            "process-file",
            input.to_str().expect("path"),
            "--output-dir",
            out_dir.to_str().expect("path"),
        ],
    )
    .await;
    assert!(out.contains("701 lines: 700 valid, 1 invalid"), "{out}");

    // Each ticket in the folder of the UTC hour of its created_at.
    let mut from_file: Vec<Value> = Vec::new();
    for (path, body) in jsonl_tree(&out_dir.join("tickets_with_team")) {
        for l in body.lines() {
            let v: Value = serde_json::from_str(l).expect("json");
            let created =
                chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().expect("created_at"))
                    .or_else(|_| {
                        chrono::NaiveDateTime::parse_from_str(
                            v["created_at"].as_str().unwrap_or_default(),
                            "%Y-%m-%dT%H:%M:%S%.f",
                        )
                        .map(|t| t.and_utc().fixed_offset())
                    })
                    .expect("a timestamp")
                    .to_utc();
            let folder = created.format("date=%Y-%m-%d/hour=%H/").to_string();
            assert!(
                path.starts_with(&folder),
                "{} in {path}, not {folder}",
                v["ticket_id"]
            );
            from_file.push(v);
        }
    }
    let mut from_s3 = fx.s3.json_lines("tickets_with_team/").await;
    let key = |v: &Value| v["ticket_id"].as_str().unwrap_or_default().to_string();
    from_file.sort_by_key(key);
    from_s3.sort_by_key(key);
    assert_eq!(from_file.len(), 700);
    assert_eq!(from_file, from_s3, "file and streaming outputs differ");
    let file_counts =
        std::fs::read(out_dir.join("counts_by_request_type/latest.jsonl")).expect("counts");
    assert_eq!(
        Some(file_counts),
        fx.s3.get("counts_by_request_type/latest.jsonl").await,
        "counts differ"
    );
    let dead = std::fs::read_to_string(out_dir.join("dead_letters/part-00000.jsonl"))
        .expect("dead letters");
    assert!(
        dead.contains("\"line\":701") && dead.contains("field `ticket_id` must be a string"),
        "{dead}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_letters_are_processed_exactly_once() {
    let fx = Fixture::start().await;
    let env = fx.env();
    run_ok(
        "ticket-producer",
        &env,
        &["--count", "20", "--partitions", "1"],
    )
    .await;
    run_ok("ticket-processor", &env, &["--drain"]).await; // also creates the DLQ topic

    // Dead letters an older processor wrote for tickets the current one accepts (the "fix"),
    // one of them dead-lettered twice, as a crash can do.
    let tickets: Vec<String> = (1..=3)
        .map(|i| valid_ticket(&format!("REPLAY-{i}"), "billing"))
        .collect();
    let mut letters = Vec::new();
    for (i, t) in tickets
        .iter()
        .enumerate()
        .chain(std::iter::once((0, &tickets[0])))
    {
        letters.push((
            format!("REPLAY-{}", i + 1),
            t.clone(),
            (100 + i).to_string(),
        ));
    }
    for (key, value, offset) in &letters {
        fx.broker
            .publish_with_headers(
                &fx.dlq(),
                key.as_bytes(),
                value.as_bytes(),
                &[
                    ("error.message", "field `priority` rejected by v0"),
                    ("source.topic", &fx.topic),
                    ("source.partition", "0"),
                    ("source.offset", offset),
                ],
            )
            .await;
    }
    let out = run_ok("ticket-processor", &env, &["replay-dlq"]).await;
    assert!(
        out.contains("3 replayed, 0 skipped by --reason-contains, 1 duplicates"),
        "{out}"
    );
    let out = run_ok("ticket-processor", &env, &["replay-dlq"]).await;
    assert!(
        out.contains("0 replayed"),
        "a second replay re-injected again: {out}"
    );

    run_ok("ticket-processor", &env, &["--drain"]).await;
    let ids = fx.topic_ids();
    assert_eq!(ids.len(), 23);
    assert_eq!(fx.assert_exactly_once(&ids).await, 23);
    let replayed = fx
        .broker
        .read_all(&fx.topic)
        .into_iter()
        .filter(|r| r.headers.contains_key("replayed.from"))
        .count();
    assert_eq!(replayed, 3, "replayed messages carry replayed.from");
}
