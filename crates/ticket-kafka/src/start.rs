//! The first contact with the brokers, at start.
//!
//! librdkafka treats a failed TLS handshake or a refused SASL login like a broker that is
//! down: it logs the reason and tries again, for ever, and a metadata request only times out.
//! At start that is the wrong answer: a certificate that is not trusted, has expired or names
//! another host, or a wrong password, will not fix itself. So the metadata request is made in
//! short steps, the client's log is watched for the handshake's and the login's failure, and
//! the first one stops the program with librdkafka's reason and the setting to fix.
//! librdkafka says only "certificate verify failed", so the handshake is then made once more
//! with the same OpenSSL and the same CA file, to say why: not signed by a trusted CA, expired,
//! or issued for another host.
//! (Once running, the clients keep librdkafka's retries: a broker that restarts with a new
//! certificate, or is briefly unreachable, is an outage to ride out.)

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;

use crate::KafkaArgs;

/// How long one metadata request may take before the log is looked at again.
const STEP: Duration = Duration::from_millis(500);

/// A client context that keeps the first connection failure that retrying will not cure.
#[derive(Default)]
struct Watch {
    failure: Mutex<Option<String>>,
}

impl Watch {
    fn failure(&self) -> Option<String> {
        self.failure.lock().map(|f| f.clone()).unwrap_or_default()
    }

    fn see(&self, message: &str) {
        if is_fatal_at_start(message)
            && let Ok(mut f) = self.failure.lock()
        {
            f.get_or_insert_with(|| message.to_string());
        }
    }
}

impl ClientContext for Watch {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.see(message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::debug!(target: "librdkafka", "{fac} {message}")
            }
            _ => tracing::trace!(target: "librdkafka", "{fac} {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.see(reason);
        tracing::debug!(target: "librdkafka", "{error}: {reason}");
    }
}

impl ConsumerContext for Watch {}

/// A log line of librdkafka's that says a connection failed for a reason a retry cannot cure.
fn is_fatal_at_start(message: &str) -> bool {
    message.contains("SSL handshake failed") || message.contains("SASL authentication error")
}

pub(crate) fn check_brokers(args: &KafkaArgs) -> anyhow::Result<Metadata> {
    let consumer: BaseConsumer<Watch> = args
        .client_config()
        .create_with_context(Watch::default())
        .context("invalid Kafka client settings (check KAFKA_OPTIONS)")?;
    let deadline = Instant::now() + args.connect_timeout();
    loop {
        let step = deadline.saturating_duration_since(Instant::now()).min(STEP);
        let result = consumer.fetch_metadata(None, step.max(Duration::from_millis(50)));
        // The client's log and errors come through its queue (rdkafka sets log.queue).
        for _ in 0..256 {
            if consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        if let Some(reason) = consumer.context().failure() {
            bail!("{}", explain(args, &reason));
        }
        match result {
            Ok(md) => return Ok(md),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot reach Kafka at {} within {} s (check KAFKA_BROKERS, that the broker is up, and KAFKA_SECURITY_PROTOCOL/credentials)",
                        args.brokers, args.connect_timeout_secs
                    )
                });
            }
            Err(_) => {}
        }
    }
}

/// The failing broker's `host:port` in a librdkafka log line (`ssl://host:port/...`).
fn broker_in(reason: &str) -> Option<&str> {
    let at = reason.find("ssl://")? + "ssl://".len();
    let rest = &reason[at..];
    Some(&rest[..rest.find('/').unwrap_or(rest.len())])
}

/// Why OpenSSL refuses the certificate of `broker`, trusting what librdkafka trusts: the
/// CA file if one is set, else the system's store. `None` if the handshake succeeds or the
/// broker cannot be reached again.
fn verify_failure(broker: &str, ca: Option<&str>) -> Option<String> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let (host, _) = broker.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut builder = SslConnector::builder(SslMethod::tls_client()).ok()?;
    if let Some(ca) = ca {
        // Only that file, as librdkafka with ssl.ca.location.
        let mut store = openssl::x509::store::X509StoreBuilder::new().ok()?;
        for cert in openssl::x509::X509::stack_from_pem(&std::fs::read(ca).ok()?).ok()? {
            store.add_cert(cert).ok()?;
        }
        builder.set_verify_cert_store(store.build()).ok()?;
    }
    builder.set_verify(SslVerifyMode::PEER);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(broker)
        .ok()?
        .next()?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    match builder.build().connect(host, tcp) {
        Ok(_) => None,
        Err(openssl::ssl::HandshakeError::Failure(mid)) => {
            let result = mid.ssl().verify_result();
            (result != openssl::x509::X509VerifyResult::OK)
                .then(|| result.error_string().to_string())
        }
        Err(_) => None,
    }
}

/// The error for a failed handshake or login: librdkafka's reason (with OpenSSL's verdict on
/// the certificate when librdkafka gives none), then what to change.
fn explain(args: &KafkaArgs, reason: &str) -> String {
    let verdict = if reason.contains("certificate verify failed") {
        broker_in(reason).and_then(|b| verify_failure(b, crate::non_empty(&args.ssl_ca_location)))
    } else {
        None
    };
    // librdkafka's lines start with the thread's name: "[thrd:ssl://b:9093/bootstrap]: ".
    let said = match reason.split_once("]: ") {
        Some((thread, rest)) if thread.starts_with("[thrd:") => rest,
        _ => reason,
    }
    .trim();
    let reason = match &verdict {
        Some(v) => format!("{said} (the certificate: {v})"),
        None => said.to_string(),
    };
    let hint = if reason.contains("SASL authentication error") {
        format!(
            "the brokers refused the login: check KAFKA_USERNAME, KAFKA_PASSWORD and KAFKA_SASL_MECHANISM (now {})",
            args.sasl_mechanism
        )
    } else if reason.contains("expired") {
        "the broker's certificate has expired (or this machine's clock is wrong): the broker needs a renewed certificate; no client setting should work around it".to_string()
    } else if reason.contains("ostname mismatch") || reason.contains("IP address mismatch") {
        "the broker's certificate is not issued for the name in KAFKA_BROKERS (or the name a broker advertises): connect by a name the certificate holds".to_string()
    } else if reason.contains("wrong version number")
        || reason.contains("packet length too long")
        || reason.contains("record layer failure")
    {
        "the broker does not speak TLS on that port: check KAFKA_SECURITY_PROTOCOL and the port in KAFKA_BROKERS".to_string()
    } else if reason.contains("certificate verify failed") {
        match crate::non_empty(&args.ssl_ca_location) {
            Some(ca) => format!(
                "the broker's certificate is not signed by the certificate authority in KAFKA_SSL_CA_LOCATION={ca}: set it to the PEM file of the CA that signed the broker's certificate"
            ),
            None => "the broker's certificate is not signed by a certificate authority this machine trusts: if a private CA signed it, set KAFKA_SSL_CA_LOCATION to that CA's PEM file".to_string(),
        }
    } else {
        "check KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_CA_LOCATION and the broker's TLS setup"
            .to_string()
    };
    format!(
        "cannot connect to Kafka at {}: {reason}. {hint}",
        args.brokers
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> KafkaArgs {
        let all: Vec<&str> = ["--brokers", "b:9093"]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        crate::tests::parse(&all)
    }

    #[test]
    fn each_failure_names_what_to_fix() {
        let verify = "ssl://b:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified";
        let e = explain(&args(&[]), verify);
        assert!(e.contains("set KAFKA_SSL_CA_LOCATION"), "{e}");
        let e = explain(&args(&["--kafka-ssl-ca-location", "/ca.pem"]), verify);
        assert!(e.contains("KAFKA_SSL_CA_LOCATION=/ca.pem"), "{e}");
        let e = explain(
            &args(&[]),
            "SSL handshake failed: ... certificate has expired",
        );
        assert!(e.contains("renewed certificate"), "{e}");
        let e = explain(&args(&[]), "SSL handshake failed: Hostname mismatch");
        assert!(e.contains("name in KAFKA_BROKERS"), "{e}");
        let e = explain(
            &args(&[]),
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256",
        );
        assert!(e.contains("KAFKA_PASSWORD"), "{e}");
        assert!(e.starts_with("cannot connect to Kafka at b:9093: "), "{e}");
    }

    #[test]
    fn the_failing_broker_is_read_from_the_log_line() {
        let line = "[thrd:ssl://b:9093/bootstrap]: ssl://b:9093/bootstrap: SSL handshake failed";
        assert_eq!(broker_in(line), Some("b:9093"));
        assert_eq!(
            broker_in("sasl_ssl://h.example:443/1: SSL"),
            Some("h.example:443")
        );
        assert_eq!(broker_in("no broker here"), None);
    }

    #[test]
    fn only_failures_a_retry_cannot_cure_stop_the_start() {
        assert!(is_fatal_at_start(
            "ssl://b:9093/bootstrap: SSL handshake failed: ..."
        ));
        assert!(is_fatal_at_start("SASL authentication error: ..."));
        assert!(!is_fatal_at_start(
            "b:9093/bootstrap: Connect to ipv4#127.0.0.1:9093 failed: Connection refused"
        ));
    }
}
