//! A scripted, in-memory [`Kafka`] for the loop's unit tests: one log per partition, a fetch
//! position per assigned partition, pauses, seeks and offset commits, each recorded as a
//! [`Call`]; rebalances are the script's ([`Scripted::revoke`], [`Scripted::assign_back`]).
//! What it does not model: librdkafka's prefetch (a paused partition stops at once here).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use futures::Stream;
use rdkafka::consumer::CommitMode;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{OwnedMessage, Timestamp};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use super::Event;
use super::kafka::Kafka;

/// What the loop asked of the consumer, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Pause(i32),
    Resume(i32),
    Seek(i32, i64),
    Commit(i32, i64),
}

pub struct Scripted {
    topic: String,
    /// The loop's events, as librdkafka's rebalance callback sends them.
    events: UnboundedSender<Event>,
    state: Mutex<State>,
}

#[derive(Default)]
pub struct State {
    /// Partition p's message at offset o is `logs[p][o]`.
    logs: BTreeMap<i32, Vec<OwnedMessage>>,
    /// The assigned partitions and their fetch positions.
    positions: BTreeMap<i32, i64>,
    paused: BTreeSet<i32>,
    /// `enable.partition.eof`: each partition's end reported once each time it is reached.
    eof: bool,
    eof_sent: BTreeSet<i32>,
    pub committed: BTreeMap<i32, i64>,
    pub calls: Vec<Call>,
    /// Round robin between the partitions, as fetches interleave.
    turn: usize,
    waker: Option<Waker>,
}

impl State {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// A valid ticket, as the producer publishes it, for partition `p` at offset `o`.
pub fn ticket(topic: &str, p: i32, o: i64) -> OwnedMessage {
    let json = format!(
        r#"{{"ticket_id":"T-{p}-{o}","client_id":{o},"created_at":"2025-03-01T10:00:00Z","request":"Help","request_type":"billing","priority":"low"}}"#
    );
    OwnedMessage::new(
        Some(json.into_bytes()),
        Some(format!("client-{o}").into_bytes()),
        topic.to_string(),
        Timestamp::CreateTime(1_740_823_200_000 + o),
        p,
        o,
        None,
    )
}

impl Scripted {
    /// `partitions` empty partitions of `topic`; `eof`: report each partition's end (as
    /// `--drain` sets librdkafka to).
    pub fn new(topic: &str, partitions: i32, eof: bool, events: UnboundedSender<Event>) -> Self {
        let state = State {
            logs: (0..partitions).map(|p| (p, Vec::new())).collect(),
            eof,
            ..State::default()
        };
        Scripted {
            topic: topic.to_string(),
            events,
            state: Mutex::new(state),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `n` more tickets to partition `p`.
    pub fn publish(&self, p: i32, n: i64) {
        let mut s = self.state();
        let log = s.logs.entry(p).or_default();
        let from = log.len() as i64;
        log.extend((from..from + n).map(|o| ticket(&self.topic, p, o)));
        s.wake();
    }

    /// A rebalance takes `p` away: librdkafka's callback tells the loop, and it stops fetching.
    pub fn revoke(&self, p: i32) {
        {
            let mut s = self.state();
            s.positions.remove(&p);
            s.paused.remove(&p);
        }
        let _ = self.events.send(Event::Revoked(vec![p]));
    }

    /// A rebalance gives `p` back: fetching starts at the group's committed offset.
    pub fn assign_back(&self, p: i32) {
        let mut s = self.state();
        let at = s.committed.get(&p).copied().unwrap_or(0);
        s.positions.insert(p, at);
        s.wake();
    }

    fn poll_next(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<KafkaResult<OwnedMessage>>> {
        let mut s = self.state();
        let live: Vec<i32> = s
            .positions
            .keys()
            .copied()
            .filter(|p| !s.paused.contains(p))
            .collect();
        for i in 0..live.len() {
            let p = live[(s.turn + i) % live.len()];
            let at = s.positions[&p];
            if let Some(m) = s.logs.get(&p).and_then(|l| l.get(at as usize)).cloned() {
                s.positions.insert(p, at + 1);
                s.eof_sent.remove(&p);
                s.turn = s.turn.wrapping_add(i + 1);
                return Poll::Ready(Some(Ok(m)));
            }
        }
        if s.eof
            && let Some(&p) = live.iter().find(|p| !s.eof_sent.contains(p))
        {
            s.eof_sent.insert(p);
            return Poll::Ready(Some(Err(KafkaError::PartitionEOF(p))));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn each(tpl: &TopicPartitionList) -> impl Iterator<Item = (i32, Offset)> + '_ {
        tpl.elements()
            .into_iter()
            .map(|e| (e.partition(), e.offset()))
    }
}

impl Kafka for Scripted {
    type Message<'a> = OwnedMessage;

    fn messages(&self) -> impl Stream<Item = KafkaResult<OwnedMessage>> + Unpin + '_ {
        futures::stream::poll_fn(move |cx| self.poll_next(cx))
    }

    fn subscribe(&self, _topic: &str) -> KafkaResult<()> {
        let mut s = self.state();
        let parts: Vec<i32> = s.logs.keys().copied().collect();
        for p in parts {
            let at = s.committed.get(&p).copied().unwrap_or(0);
            s.positions.insert(p, at);
        }
        s.wake();
        Ok(())
    }

    fn assign(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        let mut s = self.state();
        for (p, offset) in Self::each(partitions) {
            let at = match offset {
                Offset::Offset(o) => o,
                _ => 0,
            };
            s.positions.insert(p, at);
        }
        s.wake();
        Ok(())
    }

    fn unsubscribe(&self) {
        self.state().positions.clear();
    }

    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        let mut s = self.state();
        for (p, _) in Self::each(partitions) {
            s.paused.insert(p);
            s.calls.push(Call::Pause(p));
        }
        Ok(())
    }

    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        let mut s = self.state();
        for (p, _) in Self::each(partitions) {
            s.paused.remove(&p);
            s.calls.push(Call::Resume(p));
        }
        s.wake();
        Ok(())
    }

    fn seek(&self, _topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        let mut s = self.state();
        if !s.positions.contains_key(&partition) {
            return Err(KafkaError::Seek("not assigned".into()));
        }
        s.positions.insert(partition, offset);
        s.calls.push(Call::Seek(partition, offset));
        s.wake();
        Ok(())
    }

    fn commit(&self, offsets: &TopicPartitionList, _mode: CommitMode) -> KafkaResult<()> {
        let mut s = self.state();
        for (p, offset) in Self::each(offsets) {
            if let Offset::Offset(o) = offset {
                s.committed.insert(p, o);
                s.calls.push(Call::Commit(p, o));
            }
        }
        Ok(())
    }

    fn position(&self) -> KafkaResult<TopicPartitionList> {
        let s = self.state();
        let mut tpl = TopicPartitionList::new();
        for (&p, &at) in &s.positions {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(at))?;
        }
        Ok(tpl)
    }

    fn fetch_watermarks(
        &self,
        _topic: &str,
        partition: i32,
        _timeout: Duration,
    ) -> KafkaResult<(i64, i64)> {
        let s = self.state();
        Ok((0, s.logs.get(&partition).map_or(0, |l| l.len() as i64)))
    }
}
