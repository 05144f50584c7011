//! One bad record, one refusal, one outage is never a hang: each ends in an outcome a user
//! can act on, with the real binaries against a real broker and S3 server.

use std::time::Duration;

use crate::common::*;
use nix::sys::signal::Signal;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn ticket(id: &str) -> String {
    format!(
        r#"{{"ticket_id":"{id}","client_id":4242,"created_at":"2025-10-20T03:00:23.010952","request":"The gateway reboots.","request_type":"billing","priority":"high"}}"#
    )
}

/// Publishes `(key, value)` pairs to the fixture's topic with a producer that accepts messages
/// up to 2 MB, as a topic configured for large messages would.
async fn publish_large(fx: &Fixture, messages: &[(String, Vec<u8>)]) {
    let p: FutureProducer = fx
        .broker
        .config()
        .set("acks", "all")
        .set("message.max.bytes", "2097152")
        .create()
        .expect("producer");
    for (k, v) in messages {
        p.send(
            FutureRecord::to(&fx.topic).key(k.as_bytes()).payload(v),
            Duration::from_secs(30),
        )
        .await
        .expect("delivered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_message_too_large_for_the_dead_letter_topic_is_sent_truncated() {
    let fx = Fixture::start().await;
    let env = fx.env();
    fx.create_topic(1).await;

    // 1.2 MB of JSON that is not a ticket (no client_id), then five valid tickets.
    let big = format!(
        r#"{{"ticket_id":"HUGE","request":"{}"}}"#,
        "x".repeat(1_200_000)
    )
    .into_bytes();
    let mut messages = vec![("HUGE".to_string(), big.clone())];
    for i in 0..5 {
        let id = format!("OK-{i}");
        messages.push((id.clone(), ticket(&id).into_bytes()));
    }
    publish_large(&fx, &messages).await;

    // Before: the drain never ended (the oversized dead letter was retried forever).
    let out = run_ok("ticket-processor", &env, &["--drain"]).await;

    let dlq = fx.broker.read_all(&fx.dlq());
    assert_eq!(dlq.len(), 1, "one dead letter; log:\n{out}");
    let letter = &dlq[0];
    assert_eq!(letter.key.as_deref(), Some(&b"HUGE"[..]));
    assert_eq!(
        letter.headers.get("payload.truncated").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        letter.headers.get("payload.original.size"),
        Some(&big.len().to_string())
    );
    assert!(
        letter.headers["error.message"].contains("missing field"),
        "{:?}",
        letter.headers
    );
    let value = letter.value.as_deref().unwrap_or_default();
    assert!(value.len() < 1_000_000 && value.len() > 900_000);
    assert!(
        big.starts_with(value),
        "the dead letter keeps the message's first bytes"
    );

    let ids: Vec<String> = (0..5).map(|i| format!("OK-{i}")).collect();
    assert_eq!(fx.assert_exactly_once(&ids).await, 5);
}

/// The stop bound the outage test sets.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_s3_outage_ends_the_process_within_the_shutdown_timeout() {
    let fx = Fixture::start().await;
    let proxy = fx.s3.proxy().await;
    fx.create_topic(1).await;
    let env = fx
        .env()
        .s3_endpoint(&proxy)
        .set(
            "SHUTDOWN_TIMEOUT_SECS",
            SHUTDOWN_TIMEOUT.as_secs().to_string(),
        )
        .set("BATCH_MAX_AGE_MS", "200");
    let mut processor = fx.spawn("ticket-processor", &env, &[], "p");

    let first: Vec<String> = (0..10).map(|i| format!("A-{i}")).collect();
    let msgs: Vec<(String, Vec<u8>)> = first
        .iter()
        .map(|id| (id.clone(), ticket(id).into_bytes()))
        .collect();
    publish_large(&fx, &msgs).await;
    fx.wait_for_tickets(10, Duration::from_secs(60)).await;

    // S3 goes away with a batch to write: the writer retries...
    proxy.down();
    let second: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| format!("B-{i}"))
        .map(|id| (id.clone(), ticket(&id).into_bytes()))
        .collect();
    publish_large(&fx, &second).await;
    let addr = processor.http_addr().await;
    eventually(Duration::from_secs(60), "a retried S3 request", || async {
        let failed = metric(addr, "ticket_processor_s3_errors_total").await;
        failed.is_some_and(|n| n > 0.0).then_some(())
    })
    .await;
    // ... and a stop request ends the process anyway: within SHUTDOWN_TIMEOUT_SECS it gives
    // up writing and exits 0, and whatever it then waits on, it is gone EXIT_GRACE later.
    let bound = SHUTDOWN_TIMEOUT + ticket_stream::stream::EXIT_GRACE;
    let stopped = std::time::Instant::now();
    processor.signal(Signal::SIGTERM);
    let ok = processor.wait(bound + Duration::from_secs(5)).await;
    let took = stopped.elapsed();
    let log = processor.log();
    assert!(ok, "exit status after SIGTERM; log:\n{log}");
    assert!(
        took <= bound,
        "stopped in {took:?}, beyond SHUTDOWN_TIMEOUT_SECS + EXIT_GRACE = {bound:?}"
    );
    assert!(
        log.contains("they will be processed again on restart"),
        "log:\n{log}"
    );

    // Nothing was lost: once S3 is back, a drain writes the rest, exactly once.
    proxy.up();
    run_ok("ticket-processor", &env, &["--drain"]).await;
    fx.assert_exactly_once(&fx.topic_ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_refusal_stops_the_processor_with_what_to_fix_and_loses_nothing() {
    let fx = Fixture::start().await;
    if !fx.s3.deny_writes_under(Some("tickets_with_team/")) {
        eprintln!("skipped: the external S3 server cannot be told to refuse writes");
        return;
    }
    let env = fx.env().set("BATCH_MAX_AGE_MS", "200");
    run_ok(
        "ticket-producer",
        &env,
        &["--count", "20", "--partitions", "2"],
    )
    .await;

    // The results prefix is refused (403), as a bucket policy missing s3:PutObject would.
    let (ok, _, stderr) = run("ticket-processor", &env, &[]).await;
    assert!(!ok, "a refusal is an error exit, not a retry loop");
    assert!(
        stderr.contains("AccessDenied") && stderr.contains("grant s3:"),
        "the error says what was refused and what to grant:\n{stderr}"
    );
    assert!(
        fx.s3.keys("tickets_with_team/").await.is_empty(),
        "nothing written under the refused prefix"
    );

    // Once the permission is granted, everything lands exactly once.
    fx.s3.deny_writes_under(None);
    run_ok("ticket-processor", &env, &["--drain"]).await;
    fx.assert_exactly_once(&fx.topic_ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_https_with_a_private_ca_needs_aws_ca_bundle_and_is_exactly_once() {
    let fx = Fixture::start().await;
    let tls = crate::common::tls::TlsFront::start(&fx.s3.host_port()).await;
    let https = format!("https://{}", tls.address);
    fx.create_topic(2).await;
    let plain = fx.env().set("S3_ENDPOINT", &https);
    let env = plain
        .clone()
        .set("AWS_CA_BUNDLE", tls.ca.display().to_string());

    // Without the CA, or with another one: the processor stops at start and says what to set.
    let other = plain
        .clone()
        .set("AWS_CA_BUNDLE", tls.other_ca.display().to_string());
    // (`query` too: the stack's TLS run found it ending in object_store's bare "error sending
    // request" after ten retries.)
    for (case, e) in [("no CA", &plain), ("another CA", &other)] {
        for args in [
            &["--drain"][..],
            &["query", "SELECT count(*) FROM tickets"][..],
        ] {
            let (ok, _, err) = run("ticket-processor", e, args).await;
            assert!(!ok, "{case}: {args:?} started anyway");
            assert!(
                err.contains("certificate") && err.contains("AWS_CA_BUNDLE"),
                "{case}: {args:?}: the error does not name the certificate and the setting:\n{err}"
            );
        }
    }

    // With it: every ticket exactly once, written over HTTPS (the payload unsigned, its
    // CRC32C checked by the server), and `query` reads them back through the same CA.
    run_ok("ticket-producer", &env, &["--count", "500"]).await;
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let ids = fx.topic_ids();
    assert_eq!(fx.assert_exactly_once(&ids).await, 500);
    let out = run_ok(
        "ticket-processor",
        &env,
        &[
            "query",
            "--format",
            "csv",
            "SELECT count(*) AS n FROM tickets",
        ],
    )
    .await;
    assert!(
        out.lines().any(|l| l.trim() == "500"),
        "query over HTTPS:\n{out}"
    );
}

/// Over HTTPS the request signature skips the body, so what protects a body from damage
/// behind the TLS terminator is the CRC32C sent with every PUT. A relay between stunnel and
/// the S3 server flips one byte of the first data object's body: the server refuses it (400
/// BadDigest, stored nothing), the processor sends it again, and every ticket lands once,
/// byte for byte as published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_damaged_in_flight_under_https_is_refused_by_its_checksum_and_sent_again() {
    let fx = Fixture::start().await;
    let target = std::net::ToSocketAddrs::to_socket_addrs(&fx.s3.host_port())
        .expect("the S3 endpoint's address")
        .next()
        .expect("an address");
    let corrupter = Corrupter::start(target, "tickets_with_team", 1).await;
    let tls = crate::common::tls::TlsFront::start(&format!("127.0.0.1:{}", corrupter.port)).await;
    let env = fx
        .env()
        .set("S3_ENDPOINT", format!("https://{}", tls.address))
        .set("AWS_CA_BUNDLE", tls.ca.display().to_string());
    fx.create_topic(2).await;
    run_ok("ticket-producer", &env, &["--count", "500"]).await;
    let (ok, out, err) = run("ticket-processor", &env, &["--drain"]).await;
    assert!(ok, "the drain failed:\n{out}\n{err}");

    assert_eq!(
        corrupter.damaged(),
        1,
        "no body was damaged: the test proves nothing"
    );
    if std::env::var("S3_ENDPOINT").is_err() {
        assert_eq!(
            fx.s3.bad_digests(),
            1,
            "the server did not refuse the damaged body"
        );
    }
    assert!(
        err.contains("BadDigest"),
        "the processor's log does not show the refused write it retried:\n{err}"
    );
    let ids = fx.topic_ids();
    assert_eq!(fx.assert_exactly_once(&ids).await, 500);
    let published: std::collections::BTreeMap<String, serde_json::Value> = fx
        .broker
        .read_all(&fx.topic)
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.value?).ok())
        .map(|t| (t["ticket_id"].as_str().unwrap_or_default().to_string(), t))
        .collect();
    for line in fx.s3.json_lines("tickets_with_team/").await {
        let id = line["ticket_id"].as_str().expect("ticket_id");
        let source = &published[id];
        for f in [
            "ticket_id",
            "client_id",
            "request",
            "request_type",
            "priority",
        ] {
            assert_eq!(
                line[f], source[f],
                "field {f} of {id} differs from what was published"
            );
        }
    }
}

/// The broker over TLS with a private CA (stunnel in front of the test's Tansu, certificates
/// made by the test): every client runs through it with `KAFKA_SSL_CA_LOCATION`, exactly once;
/// a certificate that is not trusted, has expired or names another host stops each binary at
/// start, at the failed handshake (not after the connect timeout, which librdkafka's endless
/// retries would reach), with an error that says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_is_exactly_once_and_a_refused_certificate_stops_each_binary_at_start() {
    let (broker, tls) = Broker::tansu_behind_tls().await;
    let fx = Fixture::with_broker(broker).await;
    let env = fx.env().set("KAFKA_CONNECT_TIMEOUT_SECS", "60");

    let cases = [
        (
            "no CA set",
            env.clone().set("KAFKA_SSL_CA_LOCATION", ""),
            "set KAFKA_SSL_CA_LOCATION to that CA's PEM file",
        ),
        (
            "another CA",
            env.clone()
                .set("KAFKA_SSL_CA_LOCATION", tls.other_ca.display().to_string()),
            "not signed by the certificate authority in KAFKA_SSL_CA_LOCATION=",
        ),
        (
            "an expired certificate",
            env.clone().set("KAFKA_BROKERS", &tls.expired),
            "certificate has expired",
        ),
        (
            "a certificate for another host",
            env.clone().set("KAFKA_BROKERS", &tls.wrong_name),
            "not issued for the name in KAFKA_BROKERS",
        ),
    ];
    for (case, e, says) in &cases {
        for (bin, args) in [
            ("ticket-producer", &["--count", "1"][..]),
            ("ticket-processor", &["--drain"][..]),
            ("ticket-processor", &["replay-dlq"][..]),
        ] {
            let started = std::time::Instant::now();
            let (ok, _, err) = run(bin, e, args).await;
            let took = started.elapsed();
            assert!(!ok, "{bin} {args:?} with {case}: started anyway");
            assert!(
                err.contains(says) && err.contains("SSL handshake failed"),
                "{bin} {args:?} with {case}: the error does not say {says:?}:\n{err}"
            );
            assert!(
                took < Duration::from_secs(30),
                "{bin} {args:?} with {case}: stopped after {took:?}, i.e. waited for the 60 s connect timeout instead of the handshake's failure"
            );
        }
    }

    // Trusted: the producer (creating the topic), the streaming processor, more tickets with
    // the CA given the old way (KAFKA_OPTIONS=ssl.ca.location), replay-dlq and --drain.
    run_ok(
        "ticket-producer",
        &env,
        &["--count", "300", "--partitions", "2"],
    )
    .await;
    let mut processor = fx.spawn("ticket-processor", &env, &[], "processor-tls");
    fx.wait_for_tickets(300, Duration::from_secs(90)).await;
    processor.signal(Signal::SIGTERM);
    assert!(
        processor
            .exit_within(Duration::from_secs(60))
            .await
            .is_some_and(|s| s.success()),
        "the processor over TLS did not stop cleanly:\n{}",
        processor.log()
    );
    let ca = tls.ca.display().to_string();
    let old_way = env.clone().set("KAFKA_SSL_CA_LOCATION", "").set(
        "KAFKA_OPTIONS",
        format!("session.timeout.ms=6000,ssl.ca.location={ca}"),
    );
    run_ok("ticket-producer", &old_way, &["--count", "200"]).await;
    let letter = r#"{"ticket_id":"TLS-REPLAY-1","client_id":7,"created_at":"2025-10-20T03:00:23.010952","request":"Replayed over TLS.","request_type":"billing","priority":"high"}"#;
    fx.broker
        .publish_with_headers(
            &fx.dlq(),
            b"TLS-REPLAY-1",
            letter.as_bytes(),
            &[
                ("error.message", "replayed by the test"),
                ("source.topic", &fx.topic),
                ("source.partition", "0"),
                ("source.offset", "100000"),
            ],
        )
        .await;
    let out = run_ok("ticket-processor", &env, &["replay-dlq"]).await;
    assert!(out.contains("1 replayed"), "replay-dlq over TLS: {out}");
    run_ok("ticket-processor", &env, &["--drain"]).await;
    let ids = fx.topic_ids();
    assert_eq!(ids.len(), 501, "the topic read back over TLS");
    assert_eq!(fx.assert_exactly_once(&ids).await, 501);
}

/// No secret in any output: the S3 secret key, a session token and a Kafka password, set as a
/// user sets them, never appear in what the binaries print (logs at trace level included),
/// in `--help`, in `/metrics` or in the error of a SASL login the broker refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_appear_in_no_output_at_any_log_level() {
    let fx = Fixture::start().await;
    let password = "KAFKA-PASSWORD-5b7e19c2";
    let token = "SESSION-TOKEN-0d9a44f1";
    let mut secrets = vec![password, token];
    // The S3 secret is the fixture's (the server checks it); an external MinIO's default
    // secret equals its access key, which is no secret and shows in every signed request.
    if fx.s3.secret_key != fx.s3.access_key {
        secrets.push(fx.s3.secret_key.as_str());
    }
    let env = fx
        .env()
        .set("RUST_LOG", "trace")
        .set("KAFKA_PASSWORD", password)
        .set("KAFKA_USERNAME", "ticket-user");
    let mut outputs: Vec<(String, String)> = Vec::new();

    // --help of both binaries, with the secrets in the environment.
    for name in ["ticket-producer", "ticket-processor"] {
        let (_, out, err) = run(name, &env, &["--help"]).await;
        outputs.push((format!("{name} --help"), out + &err));
    }
    // A refused SASL login: a broker that requires one and knows no such user answers the
    // SCRAM exchange with a refusal. Each binary stops at once (librdkafka would retry for
    // ever; the connect timeout is 60 s here) and says what to check; no password in it.
    let refusing = Broker::tansu_requiring_login().await;
    let sasl = env
        .clone()
        .set("KAFKA_BROKERS", &refusing.bootstrap)
        .set("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
        .set("KAFKA_CONNECT_TIMEOUT_SECS", "60");
    for (name, args) in [
        ("ticket-producer", &["--count", "1"][..]),
        ("ticket-processor", &["--drain"][..]),
    ] {
        let started = std::time::Instant::now();
        let (ok, out, err) = run(name, &sasl, args).await;
        assert!(!ok, "{name}: a refused SASL login went on:\n{out}\n{err}");
        assert!(
            err.contains("SASL authentication error")
                && err.contains("check KAFKA_USERNAME, KAFKA_PASSWORD"),
            "{name}: the refused login does not say what to check:\n{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name}: waited for the connect timeout instead of stopping at the refusal"
        );
        outputs.push((format!("{name}, refused SASL login"), out + &err));
    }

    // A working run at trace level, with /metrics read while it runs; then a drain and a
    // query with a session token set (whatever the S3 server makes of it).
    let plain = env
        .clone()
        .set("KAFKA_PASSWORD", "")
        .set("KAFKA_USERNAME", "");
    run_ok("ticket-producer", &plain, &["--count", "50"]).await;
    let mut p = fx.spawn("ticket-processor", &plain, &[], "trace");
    let addr = p.http_addr().await;
    let (_, metrics) = http_get(addr, "/metrics").await;
    outputs.push(("/metrics".into(), metrics));
    eventually(Duration::from_secs(60), "the tickets written", || async {
        (metric(addr, "ticket_processor_tickets_written_total").await? >= 50.0).then_some(())
    })
    .await;
    p.signal(Signal::SIGTERM);
    assert!(p.wait(Duration::from_secs(30)).await, "{}", p.log());
    outputs.push(("processor at trace level".into(), p.log()));
    let with_token = plain.clone().set("AWS_SESSION_TOKEN", token);
    let (_, out, err) = run("ticket-processor", &with_token, &["--drain"]).await;
    outputs.push(("processor with a session token".into(), out + &err));
    let (_, out, err) = run(
        "ticket-processor",
        &with_token,
        &["query", "SELECT count(*) FROM tickets"],
    )
    .await;
    outputs.push(("query with a session token".into(), out + &err));

    let trace = &outputs
        .iter()
        .find(|(w, _)| w == "processor at trace level")
        .expect("run")
        .1;
    assert!(
        trace.lines().filter(|l| l.contains("TRACE")).count() > 100,
        "the run did not log at trace level:\n{trace}"
    );
    for (what, text) in &outputs {
        for s in &secrets {
            assert!(!text.contains(s), "{what} shows the secret {s:?}");
        }
    }
}
