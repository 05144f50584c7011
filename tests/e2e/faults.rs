//! Nothing lost, nothing duplicated: the real binaries under real faults (SIGKILL, crashes
//! inside the commit protocol, rebalances with a stale owner, S3 and broker outages, SIGTERM
//! under load, misconfiguration). Each test prints its figures.

use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::Signal;
use rand::Rng;

/// Valid ticket ids in the topic (keys of messages that are not the test's invalid ones).
fn valid_ids(fx: &Fixture) -> Vec<String> {
    fx.topic_ids()
        .into_iter()
        .filter(|k| !k.starts_with("BAD-"))
        .collect()
}

async fn publish_invalid(fx: &Fixture, n: usize) {
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
    fx.broker.publish(&fx.topic, &msgs).await;
}

/// The outage tests' load: the topic created, a producer sending `total` tickets at 1,000/s
/// and a processor (with `env`) flushing every 300 ms.
async fn steady_stream(fx: &Fixture, env: Env, total: u64) -> (Running, Running) {
    let env = env.set("BATCH_MAX_AGE_MS", "300");
    fx.create_topic(3).await;
    let producer = fx.spawn(
        "ticket-producer",
        &env,
        &["--count", &total.to_string(), "--rate", "1000"],
        "producer",
    );
    let processor = fx.spawn("ticket-processor", &env, &[], "processor");
    (producer, processor)
}

/// The partition a process's failpoint stopped in, once it has (its log line names it).
async fn failpoint_partition(p: &Running, timeout: Duration) -> i32 {
    eventually(
        timeout,
        "the stale owner to reach its failpoint",
        || async {
            let log = p.log();
            let line = log.lines().find(|l| l.contains("Failpoint reached"))?;
            line.split("partition=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        },
    )
    .await
}

fn report(name: &str, figures: &[(&str, String)]) {
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("FAULT-TEST {name}: {}", line.join(" "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_crashes_inside_the_commit_lose_and_duplicate_nothing() {
    let fx = Fixture::start().await;
    let env = fx
        .env()
        .set("BATCH_MAX_RECORDS", "700")
        .set("BATCH_MAX_AGE_MS", "300"); // most flushes are time-based
    fx.create_topic(3).await;
    publish_invalid(&fx, 40).await;

    let total: u64 = 40_000;
    let mut producer = fx.spawn(
        "ticket-producer",
        &env,
        &["--count", &total.to_string(), "--rate", "3000"],
        "producer",
    );

    // Crashes at each step of the commit protocol, then plain SIGKILLs at random moments.
    // `after-checkpoint` leaves a committed batch without its objects: the next processor
    // must rebuild it from Kafka.
    let failpoints = [
        "after-checkpoint:abort:2",
        "before-checkpoint:abort:3",
        "after-final:abort:3",
        "after-checkpoint:abort:5",
        "after-checkpoint:abort:1",
    ];
    let mut rng = rand::rng();
    let (mut kills, mut crashes, mut rebuilds_left) = (0, 0, 0);
    let started = Instant::now();
    let mut round = 0;
    while round < failpoints.len() + 8 {
        let e = match failpoints.get(round) {
            Some(fp) => env.clone().failpoint(fp),
            None => env.clone(),
        };
        let mut p = fx.spawn("ticket-processor", &e, &[], &format!("processor-{round}"));
        if let Some(fp) = failpoints.get(round) {
            // The injected crash must happen: it is what this round tests.
            let status = p.exit_within(Duration::from_secs(60)).await;
            assert!(
                status.is_some() && p.log().contains("Failpoint reached"),
                "round {round}: the processor did not crash at {fp}:\n{}",
                p.log()
            );
            crashes += 1;
            if fp.starts_with("after-checkpoint") {
                rebuilds_left += usize::from(!fx.recorded_but_missing().await.is_empty());
            }
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(800..3000))).await;
            p.signal(Signal::SIGKILL);
            kills += 1;
        }
        let _ = p.wait(Duration::from_secs(10)).await;
        fx.assert_commits_behind_s3(3).await;
        round += 1;
    }
    assert!(
        producer.wait(Duration::from_secs(120)).await,
        "producer failed:\n{}",
        producer.log()
    );

    let mut last = fx.spawn("ticket-processor", &env, &[], "processor-last");
    fx.wait_for_tickets(total, Duration::from_secs(120)).await;
    let ids = valid_ids(&fx);
    assert_eq!(ids.len() as u64, total);
    let (lines, lost, duplicated) = fx.tally(&ids).await;
    let (_, dead, _) = fx.checkpoints().await;
    report(
        "sigkill",
        &[
            ("produced", total.to_string()),
            ("invalid", "40".into()),
            ("crashes_in_commit", crashes.to_string()),
            ("left_to_rebuild", rebuilds_left.to_string()),
            ("sigkills", kills.to_string()),
            ("seconds", started.elapsed().as_secs().to_string()),
            ("lines", lines.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!((lost, duplicated), (0, 0));
    fx.assert_exactly_once(&ids).await;
    assert_eq!(
        dead, 40,
        "each invalid message counted once in the checkpoints"
    );
    let dlq = fx.broker.read_all(&fx.dlq());
    let sources: std::collections::BTreeSet<String> = dlq
        .iter()
        .map(|r| r.headers["source.offset"].clone() + "/" + &r.headers["source.partition"])
        .collect();
    assert_eq!(
        sources.len(),
        40,
        "every invalid message reached the DLQ (de-duplicated by source)"
    );
    // Crashes between a checkpoint and its objects did leave committed batches to rebuild
    // (this test's point), and every one of them was rebuilt from Kafka.
    assert!(
        rebuilds_left > 0,
        "no crash left a committed batch without its objects"
    );
    assert_eq!(fx.recorded_but_missing().await, Vec::<String>::new());
    assert!(
        fx.s3.keys("_staging/").await.is_empty(),
        "nothing is staged"
    );
    fx.assert_commits_behind_s3(3).await;
    last.signal(Signal::SIGTERM);
    assert!(last.wait(Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_with_moving_partitions_and_a_stale_owner() {
    let fx = Fixture::start().await;
    let env = fx
        .env()
        .set(
            "KAFKA_OPTIONS",
            "session.timeout.ms=6000,heartbeat.interval.ms=500,max.poll.interval.ms=7000",
        )
        .set("BATCH_MAX_RECORDS", "500")
        .set("BATCH_MAX_AGE_MS", "300");
    fx.create_topic(6).await;
    let total: u64 = 50_000;
    let mut producer = fx.spawn(
        "ticket-producer",
        &env,
        &["--count", &total.to_string(), "--rate", "2500"],
        "producer",
    );

    // The stale owner: frozen (SIGSTOP, as a stalled VM or a long GC pause would be) in the
    // middle of committing a batch, for longer than the session timeout, so its partitions move
    // to the others, which commit batches of their own; then it wakes up and tries to commit.
    let stale_env = env.clone().failpoint("before-checkpoint:pause-3000:4");
    let stale = fx.spawn("ticket-processor", &stale_env, &[], "stale");
    let mut others: Vec<Running> = (0..2)
        .map(|i| fx.spawn("ticket-processor", &env, &[], &format!("p{i}")))
        .collect();
    let partition = failpoint_partition(&stale, Duration::from_secs(90)).await;
    stale.signal(Signal::SIGSTOP);
    // Frozen until another instance has taken the partition over and committed two batches of
    // it: its late commit must then be refused. After one batch only, that batch may be the
    // very one the stale owner holds (both cut 500 records from the same offset), and then its
    // checkpoint write finds its own bytes there and is rightly taken as done, not fenced.
    let next_of = |at: std::collections::BTreeMap<i32, i64>| at.get(&partition).copied();
    let (_, _, at_stop) = fx.checkpoints().await;
    let mut seen = next_of(at_stop).unwrap_or(0);
    for commit in ["a first", "a second"] {
        seen = eventually(
            Duration::from_secs(120),
            &format!("another instance to commit {commit} batch of the stale owner's partition"),
            || async {
                let (_, _, next) = fx.checkpoints().await;
                next_of(next).filter(|n| *n > seen)
            },
        )
        .await;
    }
    stale.signal(Signal::SIGCONT);
    let mut rng = rand::rng();
    let mut restarts = 0;
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2500..4500))).await;
        let victim = rng.random_range(0..others.len());
        others[victim].signal(Signal::SIGKILL);
        let _ = others[victim].wait(Duration::from_secs(10)).await;
        others[victim] = fx.spawn("ticket-processor", &env, &[], &format!("p-restart-{round}"));
        restarts += 1;
    }
    assert!(
        producer.wait(Duration::from_secs(120)).await,
        "producer failed:\n{}",
        producer.log()
    );
    fx.wait_for_tickets(total, Duration::from_secs(180)).await;
    let ids = fx.topic_ids();
    let (lines, lost, duplicated) = fx.tally(&ids).await;
    let mut logs = stale.log();
    for entry in std::fs::read_dir(fx.log_dir()).expect("dir") {
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
    fx.assert_exactly_once(&ids).await;
    fx.assert_commits_behind_s3(6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_is_retried_without_loss_and_recovers_by_itself() {
    let fx = Fixture::start().await;
    let proxy = fx.s3.proxy().await;
    let total: u64 = 20_000;
    let (mut producer, mut processor) =
        steady_stream(&fx, fx.env().s3_endpoint(&proxy), total).await;
    fx.wait_for_tickets_above(0).await;

    let outage = Duration::from_secs(20);
    proxy.down();
    // An offset commit for a batch S3 confirmed just before the cut may still be on its way.
    let settle = Duration::from_secs(2);
    tokio::time::sleep(settle).await;
    let before = fx.committed(3);
    tokio::time::sleep(outage - settle).await;
    let during = fx.committed(3);
    assert!(
        processor.is_running(),
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
    fx.wait_for_tickets(total, Duration::from_secs(120)).await;
    let ids = fx.topic_ids();
    let (lines, lost, duplicated) = fx.tally(&ids).await;
    let log = processor.log();
    report(
        "s3-outage",
        &[
            ("produced", total.to_string()),
            ("outage_seconds", outage.as_secs().to_string()),
            (
                "retries_logged",
                log.matches("S3 is unreachable").count().to_string(),
            ),
            ("lines", lines.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert!(
        log.contains("S3 is unreachable"),
        "the outage was not logged:\n{log}"
    );
    assert!(
        log.contains("S3 is reachable again."),
        "the recovery was not logged:\n{log}"
    );
    fx.assert_exactly_once(&ids).await;
    processor.signal(Signal::SIGTERM);
    assert!(processor.wait(Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_survived_by_producer_and_processor() {
    if std::env::var("KAFKA_BROKERS").is_ok() {
        eprintln!("skipped: cutting an external broker off needs the harness's own broker");
        return;
    }
    let (broker, proxy) = Broker::tansu_behind_proxy().await;
    let fx = Fixture::with_broker(broker).await;
    let total: u64 = 20_000;
    let (mut producer, mut processor) = steady_stream(&fx, fx.env(), total).await;
    fx.wait_for_tickets_above(0).await;
    let outage = Duration::from_secs(15);
    proxy.down();
    tokio::time::sleep(outage).await;
    assert!(
        processor.is_running(),
        "processor died during the outage:\n{}",
        processor.log()
    );
    proxy.up();
    assert!(
        producer.wait(Duration::from_secs(180)).await,
        "producer failed:\n{}",
        producer.log()
    );
    fx.wait_for_tickets(total, Duration::from_secs(120)).await;
    let ids = fx.topic_ids();
    let (lines, lost, duplicated) = fx.tally(&ids).await;
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
    fx.assert_exactly_once(&ids).await;
    processor.signal(Signal::SIGTERM);
    assert!(processor.wait(Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_having_committed_only_what_was_written() {
    let fx = Fixture::start().await;
    let env = fx.env();
    let total: u64 = 50_000;
    run_ok("ticket-producer", &env, &["--count", &total.to_string()]).await;
    let mut processor = fx.spawn(
        "ticket-processor",
        &env,
        &["--batch-max-records", "2000"],
        "processor",
    );
    fx.wait_for_tickets_above(0).await;
    let stop = Instant::now();
    processor.signal(Signal::SIGTERM);
    assert!(
        processor.wait(Duration::from_secs(40)).await,
        "SIGTERM must exit 0:\n{}",
        processor.log()
    );
    let stop_secs = stop.elapsed().as_secs_f64();
    fx.assert_commits_behind_s3(3).await;
    let (written_at_stop, _, _) = fx.checkpoints().await;
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let ids = fx.topic_ids();
    let (lines, lost, duplicated) = fx.tally(&ids).await;
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
    fx.assert_exactly_once(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfiguration_is_a_clear_error_at_start_not_a_hang() {
    let fx = Fixture::start().await;
    let with = |k: &str, v: &str| fx.env().set(k, v).set("KAFKA_CONNECT_TIMEOUT_SECS", "3");
    let dead_port = free_port();
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
        // `run` fails the test if the process has not exited within its deadline: a hang.
        let (ok, out, err) = run(bin, &env, &[]).await;
        assert!(!ok, "{bin} should refuse to start ({expected})");
        assert!(
            err.contains(expected) || out.contains(expected),
            "{bin}: expected {expected:?} in:\n{err}"
        );
    }
}

/// A batch whose checkpoint is written but whose objects are not (a crash in between) is
/// rebuilt from Kafka by the next processor, and only if that reproduces what the checkpoint
/// records. Two ways it cannot, each must stop the processor with what to do and write
/// nothing under the recorded keys: a changed routing table (restoring it finishes the
/// batch), and a recorded range Kafka no longer has (the topic deleted and created again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_batch_that_cannot_be_rebuilt_stops_the_processor_and_writes_nothing() {
    let fx = Fixture::start().await;
    let env = fx.env().set("BATCH_MAX_RECORDS", "10");
    fx.create_topic(1).await;
    // Crashes between the checkpoint of its second batch and that batch's objects.
    let crash = || async {
        let mut p = fx.spawn(
            "ticket-processor",
            &env.clone().failpoint("after-checkpoint:abort:2"),
            &["--drain"],
            "crash",
        );
        let status = p.exit_within(Duration::from_secs(60)).await;
        assert!(
            status.is_some() && p.log().contains("Failpoint reached"),
            "the processor did not crash after its second checkpoint:\n{}",
            p.log()
        );
        let missing = fx.recorded_but_missing().await;
        assert!(!missing.is_empty(), "no committed batch left to rebuild");
        let batch = fx.checkpoint_per_partition().await[&0]
            .batch
            .clone()
            .expect("a recorded batch");
        (missing, batch)
    };
    let objects = || async { fx.s3.keys("tickets_with_team/").await };

    // 1. The routing table changed between the checkpoint and the rebuild.
    run_ok("ticket-producer", &env, &["--count", "20"]).await;
    let (missing, batch) = crash().await;
    let before = objects().await;
    let routing = fx.log_dir().join("routing.json");
    std::fs::write(
        &routing,
        r#"{"teams": {"technical": "Platform"}, "default_team": "Everyone Else"}"#,
    )
    .expect("routing file");
    let changed = env
        .clone()
        .set("ROUTING_FILE", routing.display().to_string());
    let (ok, _, err) = run("ticket-processor", &changed, &["--drain"]).await;
    assert!(!ok, "a rebuild with another routing table must not finish");
    assert!(
        err.contains("routing table of digest") && err.contains("restore the routing file"),
        "{err}"
    );
    assert_eq!(objects().await, before, "something was written");
    // Restored: the batch is finished exactly as recorded.
    run_ok("ticket-processor", &env, &["--drain"]).await;
    assert_eq!(fx.recorded_but_missing().await, Vec::<String>::new());
    let present = objects().await;
    assert!(missing.iter().all(|k| present.contains(k)));
    assert_eq!(fx.assert_exactly_once(&fx.topic_ids()).await, 20);
    report(
        "rebuild_with_changed_routing",
        &[
            ("offsets", format!("{}..={}", batch.first, batch.last)),
            ("objects", missing.len().to_string()),
        ],
    );

    // 2. The recorded range is gone: the topic was deleted and created again, with fewer
    // messages than the recorded offsets.
    run_ok("ticket-producer", &env, &["--count", "20"]).await;
    let (missing, batch) = crash().await;
    let before = objects().await;
    fx.broker.delete_topic(&fx.topic).await;
    fx.create_topic(1).await;
    run_ok("ticket-producer", &env, &["--count", "5"]).await;
    let (ok, _, err) = run("ticket-processor", &env, &["--drain"]).await;
    assert!(
        !ok,
        "a drain past a recorded range Kafka no longer has must fail:\n{err}"
    );
    for needed in [
        format!("topic {:?}, partition 0", fx.topic),
        format!("offsets {}..={}", batch.first, batch.last),
        "remove the \"batch\" field".to_owned(),
    ] {
        assert!(err.contains(&needed), "{needed:?} not in:\n{err}");
    }
    // Which check saw it depends on the broker: Kafka and Redpanda answer a fetch past the
    // end with "offset out of range", the consumer starts over at 0 and the first message
    // is not the recorded first; Tansu answers with nothing, and the drain's end test asks
    // for the partition's end offset.
    assert!(
        err.contains("it delivered 0 instead") || err.contains("the partition ends at offset"),
        "{err}"
    );
    assert_eq!(objects().await, before, "something was written");
    assert_eq!(fx.recorded_but_missing().await, missing);
    report(
        "recorded_range_gone",
        &[("offsets", format!("{}..={}", batch.first, batch.last))],
    );
}

/// `OUTPUT_FORMAT=delta` under the faults its commit must survive, one after the other on one
/// stream: crashes on both sides of the log write, a commit whose answer is lost, SIGKILLs at
/// random moments, a stale owner frozen before its commit while two other instances take its
/// partition over, and an S3 outage under those two. Then delta-rs's own reader must see every valid ticket exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_table_through_crashes_in_its_commit_a_lost_answer_a_stale_owner_and_an_outage() {
    let fx = Fixture::start().await;
    let proxy = fx.s3.proxy().await;
    let env = fx
        .env()
        .s3_endpoint(&proxy)
        .set("OUTPUT_FORMAT", "delta")
        .set(
            "KAFKA_OPTIONS",
            "session.timeout.ms=6000,heartbeat.interval.ms=500,max.poll.interval.ms=7000",
        )
        .set("BATCH_MAX_RECORDS", "700")
        .set("BATCH_MAX_AGE_MS", "300");
    fx.create_topic(3).await;
    publish_invalid(&fx, 20).await;
    let total: u64 = 20_000;
    let mut producer = fx.spawn(
        "ticket-producer",
        &env,
        &["--count", &total.to_string(), "--rate", "1500"],
        "producer",
    );

    // Crashes before and after the log write, and an answer lost after it (the process then
    // asks again and must not commit the same rows twice).
    let mut crashes = 0;
    for fp in [
        "before-table-commit:abort:2",
        "after-table-commit:abort:2",
        "after-table-commit:lose:2",
    ] {
        let mut p = fx.spawn("ticket-processor", &env.clone().failpoint(fp), &[], fp);
        if fp.ends_with(":abort:2") {
            let status = p.exit_within(Duration::from_secs(60)).await;
            assert!(
                status.is_some() && p.log().contains("Failpoint reached"),
                "the processor did not crash at {fp}:\n{}",
                p.log()
            );
            crashes += 1;
        } else {
            eventually(Duration::from_secs(60), "the lost answer", || async {
                p.log().contains("Failpoint reached").then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            p.signal(Signal::SIGKILL);
            let _ = p.wait(Duration::from_secs(10)).await;
        }
    }

    // SIGKILLs at random moments.
    let mut rng = rand::rng();
    for round in 0..3 {
        let mut p = fx.spawn("ticket-processor", &env, &[], &format!("killed-{round}"));
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
        p.signal(Signal::SIGKILL);
        let _ = p.wait(Duration::from_secs(10)).await;
    }

    // The stale owner: frozen just before its commit until another instance has committed
    // its partition; then it wakes and commits with the version it knew. Three instances.
    let stale_env = env.clone().failpoint("before-table-commit:pause-3000:2");
    let stale = fx.spawn("ticket-processor", &stale_env, &[], "stale");
    let partition = failpoint_partition(&stale, Duration::from_secs(60)).await;
    stale.signal(Signal::SIGSTOP);
    let at_stop = fx.read_delta(3).versions[&partition];
    let mut other = fx.spawn("ticket-processor", &env, &[], "other");
    let mut third = fx.spawn("ticket-processor", &env, &[], "third");
    eventually(
        Duration::from_secs(90),
        "another instance to commit the stale owner's partition",
        || async { (fx.read_delta(3).versions[&partition] > at_stop).then_some(()) },
    )
    .await;
    stale.signal(Signal::SIGCONT);
    eventually(
        Duration::from_secs(60),
        "the stale owner's commit refused",
        || async {
            stale
                .log()
                .contains("Another writer committed this partition first")
                .then_some(())
        },
    )
    .await;

    // An S3 outage (the log and the data files alike) under the other instance.
    proxy.down();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(other.is_running(), "died in the outage:\n{}", other.log());
    assert!(third.is_running(), "died in the outage:\n{}", third.log());
    proxy.up();

    assert!(
        producer.wait(Duration::from_secs(120)).await,
        "producer failed:\n{}",
        producer.log()
    );
    for p in [&stale, &other, &third] {
        p.signal(Signal::SIGTERM);
    }
    assert!(other.wait(Duration::from_secs(40)).await, "{}", other.log());
    assert!(third.wait(Duration::from_secs(40)).await, "{}", third.log());
    run_ok("ticket-processor", &env, &["--drain"]).await;

    let ids = valid_ids(&fx);
    assert_eq!(ids.len() as u64, total);
    let (rows, lost, duplicated) = fx.tally_delta(&ids, 3);
    report(
        "delta",
        &[
            ("produced", total.to_string()),
            ("invalid", "20".into()),
            ("crashes_in_commit", crashes.to_string()),
            ("sigkills", "3".into()),
            ("rows", rows.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!((rows as u64, lost, duplicated), (total, 0, 0));
    // Each partition's version is its last offset, the invalid messages included.
    let last: std::collections::BTreeMap<i32, i64> =
        fx.broker
            .read_all(&fx.topic)
            .iter()
            .fold(Default::default(), |mut m, r| {
                let e = m.entry(r.partition).or_insert(r.offset);
                *e = (*e).max(r.offset);
                m
            });
    let versions = fx.read_delta(3).versions;
    for (p, offset) in last {
        assert_eq!(versions[&p], Some(offset), "partition {p}");
    }
    let sources: std::collections::BTreeSet<String> = fx
        .broker
        .read_all(&fx.dlq())
        .iter()
        .map(|r| r.headers["source.offset"].clone() + "/" + &r.headers["source.partition"])
        .collect();
    assert_eq!(sources.len(), 20, "every invalid message in the DLQ");
}

/// The part of a log written since `from` bytes (a line cut in two is kept whole).
fn since(log: &str, from: usize) -> &str {
    let start = log[..from.min(log.len())].rfind('\n').map_or(0, |i| i + 1);
    &log[start..]
}

/// Two processors in one group on six partitions, under a steady stream, while S3 is cut off
/// for three of their poll intervals: neither dies nor leaves the group (the partitions whose
/// writers wait are paused, the loop goes on polling), their health says since when S3 is
/// unreachable without asking for a restart, both exit 0 on SIGTERM afterwards, and every
/// ticket is there exactly once.
async fn s3_outage_longer_than_the_poll_interval(format: &str) {
    let fx = Fixture::start().await;
    let proxy = fx.s3.proxy().await;
    let poll_interval = Duration::from_secs(7);
    let env = fx
        .env()
        .s3_endpoint(&proxy)
        .set("OUTPUT_FORMAT", format)
        .set("BATCH_MAX_AGE_MS", "300")
        .set(
            "KAFKA_OPTIONS",
            format!(
                "session.timeout.ms=6000,heartbeat.interval.ms=500,max.poll.interval.ms={}",
                poll_interval.as_millis()
            ),
        );
    fx.create_topic(6).await;
    let total: u64 = 30_000;
    let mut producer = fx.spawn(
        "ticket-producer",
        &env,
        &["--count", &total.to_string(), "--rate", "1000"],
        "producer",
    );
    let mut a = fx.spawn("ticket-processor", &env, &[], "a");
    let mut b = fx.spawn("ticket-processor", &env, &[], "b");
    let (addr_a, addr_b) = (a.http_addr().await, b.http_addr().await);
    // Both own partitions and have written some.
    eventually(
        Duration::from_secs(90),
        "both processors writing",
        || async {
            let owned = |log: String| log.contains("Resuming from the S3 checkpoint");
            let written = metric(addr_a, "ticket_processor_batches_written_total").await? > 0.0
                && metric(addr_b, "ticket_processor_batches_written_total").await? > 0.0;
            (owned(a.log()) && owned(b.log()) && written).then_some(())
        },
    )
    .await;
    for p in [&a, &b] {
        assert!(
            p.log()
                .lines()
                .any(|l| l.contains("Kafka consumer settings")
                    && l.contains("max_poll_interval_ms=\"7000\"")),
            "the lowered max.poll.interval.ms is not in effect:\n{}",
            p.log()
        );
    }

    let outage = poll_interval * 3;
    let (cut_a, cut_b) = (a.log().len(), b.log().len());
    proxy.down();
    tokio::time::sleep(Duration::from_secs(6)).await;
    for p in [&mut a, &mut b] {
        assert!(p.is_running(), "died in the outage:\n{}", p.log());
    }
    for addr in [addr_a, addr_b] {
        let (live, _) = http_get(addr, "/health/live").await;
        let (ready, body) = http_get(addr, "/health/ready").await;
        assert_eq!(live, 200, "/health/live during an outage");
        assert_eq!(ready, 503, "/health/ready during an outage: {body}");
        assert!(body.contains("S3 unreachable since"), "{body}");
        let since = metric(addr, "ticket_processor_s3_unreachable_since_seconds").await;
        assert!(since.is_some_and(|s| s > 0.0), "{since:?}");
    }
    tokio::time::sleep(outage - Duration::from_secs(6)).await;
    for p in [&mut a, &mut b] {
        assert!(p.is_running(), "died in the outage:\n{}", p.log());
    }
    let (during_a, during_b) = (
        since(&a.log(), cut_a).to_string(),
        since(&b.log(), cut_b).to_string(),
    );
    proxy.up();
    let back = Instant::now();
    let back_at = std::time::SystemTime::now();

    assert!(
        producer.wait(Duration::from_secs(120)).await,
        "producer failed:\n{}",
        producer.log()
    );
    let ids = fx.topic_ids();
    let visible_after = match format {
        "delta" => {
            eventually(
                Duration::from_secs(120),
                "every ticket in the table",
                || async {
                    let rows = fx.read_delta(6).rows.len() as u64;
                    (rows >= total).then_some(())
                },
            )
            .await;
            back.elapsed()
        }
        _ => {
            fx.wait_for_tickets(total, Duration::from_secs(120)).await;
            back.elapsed()
        }
    };
    for (p, during) in [(&a, &during_a), (&b, &during_b)] {
        let log = p.log();
        assert!(
            !log.contains("maximum poll interval"),
            "a processor left the group:\n{log}"
        );
        assert!(
            !during.contains("Partitions revoked"),
            "partitions moved while S3 was unreachable:\n{during}"
        );
        assert_eq!(
            during.matches("S3 is unreachable").count(),
            1,
            "one line when S3 goes away:\n{during}"
        );
        assert!(log.contains("S3 is reachable again."), "{log}");
    }
    for p in [&a, &b] {
        p.signal(Signal::SIGTERM);
    }
    for p in [&mut a, &mut b] {
        assert!(p.wait(Duration::from_secs(40)).await, "{}", p.log());
    }
    // When the last ticket became visible: the newest log version, or the newest object.
    let newest = match format {
        "delta" => {
            fx.s3
                .newest("tables/tickets_with_team/_delta_log/", ".json")
                .await
        }
        _ => fx.s3.newest("tickets_with_team/", "").await,
    };
    let last_visible = newest
        .and_then(|t| t.duration_since(back_at).ok())
        .map_or("?".to_string(), |d| format!("{:.1}", d.as_secs_f64()));
    let (rows, lost, duplicated) = match format {
        "delta" => fx.tally_delta(&ids, 6),
        _ => fx.tally(&ids).await,
    };
    report(
        &format!("s3-outage-{format}"),
        &[
            ("produced", total.to_string()),
            ("outage_seconds", outage.as_secs().to_string()),
            (
                "max_poll_interval_seconds",
                poll_interval.as_secs().to_string(),
            ),
            ("last_visible_after_return_s", last_visible),
            (
                "seen_all_after_return_s",
                format!("{:.1}", visible_after.as_secs_f64()),
            ),
            ("rows", rows.to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
        ],
    );
    assert_eq!((rows as u64, lost, duplicated), (total, 0, 0));
    if format != "delta" {
        fx.assert_exactly_once(&ids).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_of_three_poll_intervals_costs_no_member_of_the_group_json_lines() {
    s3_outage_longer_than_the_poll_interval("jsonl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_of_three_poll_intervals_costs_no_member_of_the_group_delta() {
    s3_outage_longer_than_the_poll_interval("delta").await;
}
