//! Nothing lost, nothing duplicated: the real binaries under real faults (SIGKILL, crashes
//! inside the commit protocol, rebalances with a stale owner, S3 and broker outages, SIGTERM
//! under load, misconfiguration). Each test prints its figures.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use rand::Rng;

/// Environment variables for one run of a binary.
type Env = Vec<(String, String)>;

/// Valid ticket ids in the topic (keys of messages that are not the test's invalid ones).
fn valid_ids(broker: &Broker, topic: &str) -> Vec<String> {
    topic_ids(broker, topic)
        .into_iter()
        .filter(|k| !k.starts_with("BAD-"))
        .collect()
}

async fn publish_invalid(broker: &Broker, topic: &str, n: usize) {
    let bodies: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            (
                format!("BAD-{i}"),
                if i % 2 == 0 {
                    b"{\"ticket_id\":".to_vec()
                } else {
                    b"[]".to_vec()
                },
            )
        })
        .collect();
    let msgs: Vec<RawMessage> = bodies
        .iter()
        .map(|(k, v)| (Some(k.as_bytes()), Some(v.as_slice())))
        .collect();
    broker.publish(topic, &msgs).await;
}

/// The outage tests' load: the topic created, a producer sending `total` tickets at 1,000/s
/// and a processor flushing every 300 ms, both logging into `dir`.
async fn steady_stream(
    env: &mut Vec<(String, String)>,
    total: u64,
    dir: &std::path::Path,
) -> (Running, Running) {
    env.push(("BATCH_MAX_AGE_MS".into(), "300".into()));
    run_ok("ticket-producer", env, &["--count", "0"]).await;
    let producer = Running::spawn(
        "ticket-producer",
        env,
        &["--count", &total.to_string(), "--rate", "1000"],
        dir.join("producer.log"),
    );
    let processor = Running::spawn("ticket-processor", env, &[], dir.join("processor.log"));
    (producer, processor)
}

fn report(name: &str, figures: &[(&str, String)]) {
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("FAULT-TEST {name}: {}", line.join(" "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_crashes_inside_the_commit_lose_and_duplicate_nothing() {
    let broker = Broker::start().await;
    let s3 = S3::start().await;
    let topic = unique("tickets");
    let mut env = env(&broker, &s3, &topic);
    env.push(("BATCH_MAX_RECORDS".into(), "700".into()));
    env.push(("BATCH_MAX_AGE_MS".into(), "300".into())); // most flushes are time-based
    let group = format!("{topic}-group");
    run_ok(
        "ticket-producer",
        &env,
        &["--count", "0", "--partitions", "3"],
    )
    .await;
    publish_invalid(&broker, &topic, 40).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let total: u64 = 40_000;
    let mut producer = Running::spawn(
        "ticket-producer",
        &env,
        &["--count", &total.to_string(), "--rate", "3000"],
        dir.path().join("producer.log"),
    );

    // Crashes at each step of the commit protocol, then plain SIGKILLs at random moments.
    let failpoints = [
        "after-staging:abort:2",
        "before-checkpoint:abort:3",
        "after-checkpoint:abort:2",
        "after-final:abort:3",
        "after-checkpoint:abort:5",
    ];
    let mut rng = rand::rng();
    let (mut kills, mut crashes) = (0, 0);
    let started = Instant::now();
    let mut round = 0;
    while round < failpoints.len() + 8 {
        let mut e = env.clone();
        if let Some(fp) = failpoints.get(round) {
            e.push(("TICKET_PROCESSOR_FAILPOINT".into(), fp.to_string()));
        }
        let mut p = Running::spawn(
            "ticket-processor",
            &e,
            &[],
            dir.path().join(format!("processor-{round}.log")),
        );
        if round < failpoints.len() {
            // Wait for the injected crash (or give up on it after a while and kill).
            let deadline = Instant::now() + Duration::from_secs(20);
            while p.child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if p.child.try_wait().expect("wait").is_some() {
                assert!(
                    p.log().contains("Failpoint reached"),
                    "processor died without its failpoint:\n{}",
                    p.log()
                );
                crashes += 1;
            } else {
                p.signal(Signal::SIGKILL);
                kills += 1;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(800..3000))).await;
            p.signal(Signal::SIGKILL);
            kills += 1;
        }
        let _ = p.wait(Duration::from_secs(10)).await;
        assert_commits_behind_s3(&broker, &s3, &group, &topic, 3).await;
        round += 1;
    }
    assert!(
        producer.wait(Duration::from_secs(120)).await,
        "producer failed:\n{}",
        producer.log()
    );

    let mut last = Running::spawn(
        "ticket-processor",
        &env,
        &[],
        dir.path().join("processor-last.log"),
    );
    wait_for_tickets(&s3, total, Duration::from_secs(120)).await;
    let ids = valid_ids(&broker, &topic);
    assert_eq!(ids.len() as u64, total);
    eventually(
        Duration::from_secs(40),
        "latest.jsonl to catch up",
        || async {
            let body = s3.get("counts_by_request_type/latest.jsonl").await?;
            let n: u64 = String::from_utf8_lossy(&body)
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["count"].as_u64())
                        .unwrap_or(0)
                })
                .sum();
            (n == total).then_some(())
        },
    )
    .await;
    let (lines, lost, duplicated) = tally(&s3, &ids).await;
    let (_, dead, _) = checkpoints(&s3).await;
    report(
        "sigkill",
        &[
            ("produced", total.to_string()),
            ("invalid", "40".into()),
            ("crashes_in_commit", crashes.to_string()),
            ("sigkills", kills.to_string()),
            ("seconds", started.elapsed().as_secs().to_string()),
            ("lines", lines.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert_exactly_once(&s3, &ids).await;
    assert_eq!(
        dead, 40,
        "each invalid message counted once in the checkpoints"
    );
    let dlq = broker.read_all(&format!("{topic}_dlq"));
    let sources: std::collections::BTreeSet<String> = dlq
        .iter()
        .map(|r| r.headers["source.offset"].clone() + "/" + &r.headers["source.partition"])
        .collect();
    assert_eq!(
        sources.len(),
        40,
        "every invalid message reached the DLQ (de-duplicated by source)"
    );
    assert!(
        s3.keys("_staging/").await.is_empty(),
        "staging objects left behind"
    );
    assert_commits_behind_s3(&broker, &s3, &group, &topic, 3).await;
    last.signal(Signal::SIGTERM);
    assert!(last.wait(Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_with_moving_partitions_and_a_stale_owner() {
    let broker = Broker::start().await;
    let s3 = S3::start().await;
    let topic = unique("tickets");
    let mut env = env(&broker, &s3, &topic);
    env.retain(|(k, _)| k != "KAFKA_OPTIONS");
    env.push((
        "KAFKA_OPTIONS".into(),
        "session.timeout.ms=6000,heartbeat.interval.ms=500,max.poll.interval.ms=7000".into(),
    ));
    env.push(("BATCH_MAX_RECORDS".into(), "500".into()));
    env.push(("BATCH_MAX_AGE_MS".into(), "300".into()));
    run_ok(
        "ticket-producer",
        &env,
        &["--count", "0", "--partitions", "6"],
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let total: u64 = 50_000;
    let mut producer = Running::spawn(
        "ticket-producer",
        &env,
        &["--count", &total.to_string(), "--rate", "2500"],
        dir.path().join("producer.log"),
    );

    // The stale owner: frozen (SIGSTOP, as a stalled VM or a long GC pause would be) in the
    // middle of committing a batch, for longer than the session timeout, so its partitions move
    // to the others, which commit batches of their own; then it wakes up and tries to commit.
    let mut stale_env = env.clone();
    stale_env.push((
        "TICKET_PROCESSOR_FAILPOINT".into(),
        "before-checkpoint:pause-3000:4".into(),
    ));
    let stale = Running::spawn(
        "ticket-processor",
        &stale_env,
        &[],
        dir.path().join("stale.log"),
    );
    let mut others: Vec<Running> = (0..2)
        .map(|i| {
            Running::spawn(
                "ticket-processor",
                &env,
                &[],
                dir.path().join(format!("p{i}.log")),
            )
        })
        .collect();
    eventually(
        Duration::from_secs(90),
        "the stale owner to start committing",
        || async { stale.log().contains("Failpoint reached").then_some(()) },
    )
    .await;
    stale.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(20)).await;
    stale.signal(Signal::SIGCONT);
    let mut rng = rand::rng();
    let mut restarts = 0;
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2500..4500))).await;
        let victim = rng.random_range(0..others.len());
        others[victim].signal(Signal::SIGKILL);
        let _ = others[victim].wait(Duration::from_secs(10)).await;
        others[victim] = Running::spawn(
            "ticket-processor",
            &env,
            &[],
            dir.path().join(format!("p-restart-{round}.log")),
        );
        restarts += 1;
    }
    assert!(
        producer.wait(Duration::from_secs(120)).await,
        "producer failed:\n{}",
        producer.log()
    );
    wait_for_tickets(&s3, total, Duration::from_secs(180)).await;
    let ids = topic_ids(&broker, &topic);
    let (lines, lost, duplicated) = tally(&s3, &ids).await;
    let mut logs = stale.log();
    for entry in std::fs::read_dir(dir.path()).expect("dir") {
        logs.push_str(&std::fs::read_to_string(entry.expect("entry").path()).unwrap_or_default());
    }
    let rebalances = logs.matches("Partitions assigned").count();
    let fenced = stale
        .log()
        .matches("Another writer committed this partition first")
        .count();
    report(
        "rebalance",
        &[
            ("produced", total.to_string()),
            ("instances", "3".into()),
            ("sigkills", restarts.to_string()),
            ("rebalances", rebalances.to_string()),
            ("stale_owner_fenced", fenced.to_string()),
            ("lines", lines.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert!(
        stale.log().contains("Failpoint reached"),
        "the stale owner never stalled:\n{}",
        stale.log()
    );
    assert!(
        fenced >= 1,
        "the stale owner's late commit was not refused:\n{}",
        stale.log()
    );
    assert_exactly_once(&s3, &ids).await;
    assert_commits_behind_s3(&broker, &s3, &format!("{topic}-group"), &topic, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_is_retried_without_loss_and_recovers_by_itself() {
    let broker = Broker::start().await;
    let s3 = S3::start().await;
    let topic = unique("tickets");
    let s3_addr = s3
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("s3 addr");
    let proxy = Proxy::start(s3_addr).await;
    let mut env = env(&broker, &s3, &topic);
    env.retain(|(k, _)| k != "S3_ENDPOINT");
    env.push((
        "S3_ENDPOINT".into(),
        format!("http://127.0.0.1:{}", proxy.port),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let total: u64 = 20_000;
    let (mut producer, mut processor) = steady_stream(&mut env, total, dir.path()).await;
    processor.http_addr().await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let outage = Duration::from_secs(20);
    proxy.down();
    let before = committed(&broker, &format!("{topic}-group"), &topic, 3);
    tokio::time::sleep(outage).await;
    let during = committed(&broker, &format!("{topic}-group"), &topic, 3);
    assert!(
        processor.child.try_wait().expect("wait").is_none(),
        "processor died during the outage:\n{}",
        processor.log()
    );
    proxy.up();
    assert_eq!(
        before, during,
        "offsets were committed while S3 was unreachable"
    );

    assert!(
        producer.wait(Duration::from_secs(120)).await,
        "producer failed:\n{}",
        producer.log()
    );
    wait_for_tickets(&s3, total, Duration::from_secs(120)).await;
    let ids = topic_ids(&broker, &topic);
    let (lines, lost, duplicated) = tally(&s3, &ids).await;
    let log = processor.log();
    report(
        "s3-outage",
        &[
            ("produced", total.to_string()),
            ("outage_seconds", outage.as_secs().to_string()),
            (
                "retries_logged",
                log.matches("S3 request failed; retrying.")
                    .count()
                    .to_string(),
            ),
            ("lines", lines.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert!(
        log.contains("S3 request failed; retrying."),
        "the outage was not logged:\n{log}"
    );
    assert!(
        log.contains("S3 is reachable again."),
        "the recovery was not logged:\n{log}"
    );
    assert_exactly_once(&s3, &ids).await;
    processor.signal(Signal::SIGTERM);
    assert!(processor.wait(Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_survived_by_producer_and_processor() {
    if std::env::var("KAFKA_BROKERS").is_ok() {
        eprintln!("skipped: cutting an external broker off needs the harness's own broker");
        return;
    }
    let (port, proxy_port) = {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        (
            a.local_addr().expect("a").port(),
            b.local_addr().expect("b").port(),
        )
    };
    let proxy = Proxy::on_port(
        proxy_port,
        format!("127.0.0.1:{port}").parse().expect("addr"),
    )
    .await;
    let broker = Broker::tansu_on(port, Some(proxy_port)).await;
    let s3 = S3::start().await;
    let topic = unique("tickets");
    let mut env = env(&broker, &s3, &topic);
    let dir = tempfile::tempdir().expect("tempdir");
    let total: u64 = 20_000;
    let (mut producer, mut processor) = steady_stream(&mut env, total, dir.path()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outage = Duration::from_secs(15);
    proxy.down();
    tokio::time::sleep(outage).await;
    assert!(
        processor.child.try_wait().expect("wait").is_none(),
        "processor died during the outage:\n{}",
        processor.log()
    );
    proxy.up();
    assert!(
        producer.wait(Duration::from_secs(180)).await,
        "producer failed:\n{}",
        producer.log()
    );
    wait_for_tickets(&s3, total, Duration::from_secs(120)).await;
    let ids = topic_ids(&broker, &topic);
    let (lines, lost, duplicated) = tally(&s3, &ids).await;
    report(
        "broker-outage",
        &[
            ("produced", total.to_string()),
            ("outage_seconds", outage.as_secs().to_string()),
            ("in_topic", ids.len().to_string()),
            ("lines", lines.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!(
        ids.len() as u64,
        total,
        "the producer's idempotent retries left the topic with the wrong count"
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert_exactly_once(&s3, &ids).await;
    processor.signal(Signal::SIGTERM);
    assert!(processor.wait(Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_having_committed_only_what_was_written() {
    let broker = Broker::start().await;
    let s3 = S3::start().await;
    let topic = unique("tickets");
    let env = env(&broker, &s3, &topic);
    let total: u64 = 50_000;
    run_ok("ticket-producer", &env, &["--count", &total.to_string()]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut processor = Running::spawn(
        "ticket-processor",
        &env,
        &["--batch-max-records", "2000"],
        dir.path().join("processor.log"),
    );
    eventually(Duration::from_secs(60), "the first batches", || async {
        let (n, _, _) = checkpoints(&s3).await;
        (n > 0).then_some(())
    })
    .await;
    let stop = Instant::now();
    processor.signal(Signal::SIGTERM);
    assert!(
        processor.wait(Duration::from_secs(40)).await,
        "SIGTERM must exit 0:\n{}",
        processor.log()
    );
    let stop_secs = stop.elapsed().as_secs_f64();
    assert_commits_behind_s3(&broker, &s3, &format!("{topic}-group"), &topic, 3).await;
    let (written_at_stop, _, _) = checkpoints(&s3).await;
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let ids = topic_ids(&broker, &topic);
    let (lines, lost, duplicated) = tally(&s3, &ids).await;
    report(
        "sigterm",
        &[
            ("produced", total.to_string()),
            ("written_at_stop", written_at_stop.to_string()),
            ("stop_seconds", format!("{stop_secs:.1}")),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
            ("lines", lines.to_string()),
        ],
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert_exactly_once(&s3, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfiguration_is_a_clear_error_at_start_not_a_hang() {
    let broker = Broker::start().await;
    let s3 = S3::start().await;
    let topic = unique("tickets");
    let good = env(&broker, &s3, &topic);
    let with = |k: &str, v: &str| {
        let mut e = good.clone();
        e.retain(|(key, _)| key != k);
        e.push((k.to_string(), v.to_string()));
        e.push(("KAFKA_CONNECT_TIMEOUT_SECS".into(), "3".into()));
        e
    };
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let cases: Vec<(&str, Env, &str)> = vec![
        (
            "ticket-processor",
            with("KAFKA_BROKERS", &format!("127.0.0.1:{dead_port}")),
            "cannot reach Kafka",
        ),
        (
            "ticket-producer",
            with("KAFKA_BROKERS", &format!("127.0.0.1:{dead_port}")),
            "cannot reach Kafka",
        ),
        (
            "ticket-processor",
            with("S3_BUCKET_NAME", "no-such-bucket"),
            "does not exist (create it, or set S3_BUCKET_NAME)",
        ),
        (
            "ticket-processor",
            with("AWS_SECRET_ACCESS_KEY", "wrong"),
            "refused our credentials",
        ),
        (
            "ticket-processor",
            with("S3_BUCKET_NAME", ""),
            "S3_BUCKET_NAME is empty",
        ),
        (
            "ticket-processor",
            with("TICKETS_TOPIC", "no_such_topic"),
            "does not exist on",
        ),
        (
            "ticket-processor",
            with("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            "needs KAFKA_USERNAME and KAFKA_PASSWORD",
        ),
        (
            "ticket-processor",
            with("BATCH_MAX_RECORDS", "0"),
            "BATCH_MAX_RECORDS",
        ),
        (
            "ticket-processor",
            with("ROUTING_FILE", "/nonexistent/routing.json"),
            "cannot read ROUTING_FILE",
        ),
    ];
    for (bin, env, expected) in cases {
        let start = Instant::now();
        let (ok, out, err) = run(bin, &env, &[]).await;
        let secs = start.elapsed().as_secs_f64();
        assert!(!ok, "{bin} should refuse to start ({expected})");
        assert!(
            err.contains(expected) || out.contains(expected),
            "{bin}: expected {expected:?} in:\n{err}"
        );
        assert!(secs < 30.0, "{bin} took {secs:.0} s to report {expected:?}");
    }
}
