//! The only task that publishes. It drains the outbox at least once (QoS 1, a row is
//! marked sent only after the broker's PUBACK), sends answers after their commit, and
//! re-sends what was in flight when the broker lost the daemon's session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pickup_protocol::client::{Link, PublishProps};
use pickup_protocol::ReplyPath;
use tokio::sync::{mpsc, oneshot};

use crate::dispatch::{OutMsg, ReplyBody};
use crate::store::{Committed, Op, WriteJob, Writer};

/// An answer and where it goes.
#[derive(Debug)]
pub struct Reply {
    /// Reply path of the request.
    pub path: ReplyPath,
    /// The answer.
    pub body: ReplyBody,
}

/// What rides along a write job and is handed on after its commit.
#[derive(Debug)]
pub enum AfterCommit {
    /// Send this answer.
    Reply(Reply),
    /// Fire when everything committed before it has been handed to the client.
    Barrier(oneshot::Sender<()>),
}

/// Input of the publisher.
#[derive(Debug)]
pub enum PubIn {
    /// Results of a commit.
    Committed(Committed<AfterCommit>),
    /// An answer that needs no commit (refusals, status reads).
    Direct(Reply),
    /// A message outside the outbox (daemon state, scale readings, retained snapshots).
    Raw(OutMsg),
    /// The client sent a publish with this packet id.
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
    /// The broker did not keep the session: in-flight messages were dropped.
    SessionLost,
    /// Answer with the number of outbox rows not yet acknowledged.
    Backlog(oneshot::Sender<usize>),
    /// Fire once everything queued before it has been handed to the client: bulk senders
    /// (the republishing of retained state) wait on it so that the unbounded input holds
    /// at most a page or two of theirs, not the whole database.
    Mark(oneshot::Sender<()>),
    /// Stop now (shutdown); what is unacknowledged stays unsent in the database.
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Outbox(i64),
    Other,
}

/// Counters shared with the status line.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Outbox rows handed out but not yet acknowledged.
    pub unacked: AtomicU64,
    /// Messages published.
    pub published: AtomicU64,
    /// The most messages seen waiting in the publisher's input at once (memory: the
    /// input is unbounded, so bulk senders pace themselves with [`PubIn::Mark`]).
    pub queued_peak: AtomicU64,
}

/// Runs the publisher until its input closes. `unsent` are outbox rows left from before
/// the start.
pub async fn run(
    link: Link,
    mut rx: mpsc::UnboundedReceiver<PubIn>,
    writer: Writer<AfterCommit>,
    unsent: Vec<(i64, OutMsg)>,
    stats: Arc<PublisherStats>,
    expiry: bool,
    beat: crate::systemd::Heartbeat,
) {
    let mut p = Publisher {
        expiry,
        link,
        tags: VecDeque::new(),
        inflight: HashMap::new(),
        unacked: BTreeMap::new(),
        writer,
        stats,
        acked_batch: Vec::new(),
    };
    for (id, m) in unsent {
        p.publish_outbox(id, m).await;
    }
    let mut idle = tokio::time::interval(std::time::Duration::from_secs(1));
    // When the acknowledgements waiting to be recorded are due (see ACKS_WAIT).
    let mut acks_due: Option<tokio::time::Instant> = None;
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
            () = sleep_until_due(acks_due), if acks_due.is_some() => {
                p.flush_acks().await;
                acks_due = None;
                continue;
            }
            _ = idle.tick() => {
                beat.beat();
                continue;
            }
        };
        p.stats
            .queued_peak
            .fetch_max(rx.len() as u64 + 1, Ordering::Relaxed);
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if matches!(msg, PubIn::Stop) {
                p.flush_acks().await;
                return;
            }
            p.handle(msg).await;
            next = rx.try_recv().ok();
        }
        if p.acked_batch.len() >= ACKS_MAX {
            p.flush_acks().await;
            acks_due = None;
        } else if !p.acked_batch.is_empty() && acks_due.is_none() {
            acks_due = Some(tokio::time::Instant::now() + ACKS_WAIT);
        }
        beat.beat();
    }
    p.flush_acks().await;
}

/// How long acknowledged outbox rows wait to be marked sent, so that the marks of many
/// acknowledgements share one write job. A mark is a commit the writer does not sync
/// (a lost mark only means the row is published once more, and receivers drop repeats
/// by id); recorded after every burst of acknowledgements, at a moderate rate they were
/// about half of the writer's commits, each writing its own log frames. A graceful stop
/// records the waiting marks first.
pub const ACKS_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Acknowledgements that are recorded at once without waiting for [`ACKS_WAIT`]. Small,
/// so that under load the marks stay small jobs riding along with the calls' commits: a
/// cap of 1 024 let about 700 rows gather in 100 ms at 1 800 calls/s, and the calls that
/// shared their commit waited for them (p99 13.8 ms there against 11.2 without waiting).
pub const ACKS_MAX: usize = 64;

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Publisher {
    link: Link,
    /// Tags of publishes handed to the client, in order, not yet seen going out.
    tags: VecDeque<Tag>,
    /// Packet id → tag, for QoS 1 publishes sent but not yet acknowledged.
    inflight: HashMap<u16, Tag>,
    /// Outbox rows handed out and not yet acknowledged.
    unacked: BTreeMap<i64, OutMsg>,
    writer: Writer<AfterCommit>,
    stats: Arc<PublisherStats>,
    acked_batch: Vec<i64>,
    /// Whether to attach MQTT 5 message expiry (only where every receiver copes).
    expiry: bool,
}

impl Publisher {
    async fn send(
        &mut self,
        tag: Tag,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        props: Option<PublishProps>,
    ) {
        self.tags.push_back(tag);
        if let Err(e) = self
            .link
            .publish(topic, true, retain, payload, props.as_ref())
            .await
        {
            // The client is gone (shutdown); the row stays unsent in the database.
            tracing::warn!(error = %e, topic, "publish failed");
            self.tags.pop_back();
            return;
        }
        self.stats.published.fetch_add(1, Ordering::Relaxed);
    }

    async fn publish_outbox(&mut self, id: i64, m: OutMsg) {
        let props = m.expiry_s.filter(|_| self.expiry).map(|s| PublishProps {
            message_expiry_s: Some(s),
            ..Default::default()
        });
        self.unacked.insert(id, m.clone());
        self.stats
            .unacked
            .store(self.unacked.len() as u64, Ordering::Relaxed);
        self.send(Tag::Outbox(id), &m.topic, m.retain, m.payload, props)
            .await;
    }

    async fn reply(&mut self, r: Reply) {
        let Some(topic) = r.path.topic.clone() else {
            return;
        };
        let payload = r.body.to_payload(r.path.payload_correlation());
        let props = r.path.correlation_data.clone().map(|c| PublishProps {
            correlation_data: Some(c),
            ..Default::default()
        });
        self.send(Tag::Other, &topic, false, payload, props).await;
    }

    async fn handle(&mut self, msg: PubIn) {
        match msg {
            PubIn::Committed(c) => {
                for (id, m) in c.outbox {
                    self.publish_outbox(id, m).await;
                }
                for a in c.after {
                    match a {
                        AfterCommit::Reply(r) => self.reply(r).await,
                        AfterCommit::Barrier(tx) => {
                            let _ = tx.send(());
                        }
                    }
                }
            }
            PubIn::Direct(r) => self.reply(r).await,
            PubIn::Raw(m) => {
                let props = m.expiry_s.filter(|_| self.expiry).map(|s| PublishProps {
                    message_expiry_s: Some(s),
                    ..Default::default()
                });
                self.send(Tag::Other, &m.topic, m.retain, m.payload, props)
                    .await;
            }
            PubIn::Sent(pkid) => {
                if pkid != 0 && self.inflight.contains_key(&pkid) {
                    // A retransmission after reconnect (session kept): same packet.
                    return;
                }
                let tag = self.tags.pop_front().unwrap_or(Tag::Other);
                if pkid != 0 {
                    self.inflight.insert(pkid, tag);
                }
            }
            PubIn::Acked(pkid) => {
                if let Some(Tag::Outbox(id)) = self.inflight.remove(&pkid) {
                    self.unacked.remove(&id);
                    self.acked_batch.push(id);
                    self.stats
                        .unacked
                        .store(self.unacked.len() as u64, Ordering::Relaxed);
                }
            }
            PubIn::SessionLost => {
                // rumqttc dropped what was in flight; send those outbox rows again.
                let lost: Vec<i64> = self
                    .inflight
                    .drain()
                    .filter_map(|(_, t)| match t {
                        Tag::Outbox(id) => Some(id),
                        Tag::Other => None,
                    })
                    .collect();
                let mut lost: Vec<(i64, OutMsg)> = lost
                    .into_iter()
                    .filter_map(|id| self.unacked.get(&id).cloned().map(|m| (id, m)))
                    .collect();
                lost.sort_by_key(|(id, _)| *id);
                if !lost.is_empty() {
                    tracing::warn!(
                        count = lost.len(),
                        "broker lost the session; re-sending in-flight outbox rows"
                    );
                }
                for (id, m) in lost {
                    self.publish_outbox(id, m).await;
                }
            }
            PubIn::Backlog(tx) => {
                let _ = tx.send(self.unacked.len());
            }
            PubIn::Mark(tx) => {
                let _ = tx.send(());
            }
            PubIn::Stop => {}
        }
    }

    async fn flush_acks(&mut self) {
        if self.acked_batch.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.acked_batch);
        // Marking sent may wait for room in the writer queue; repeats after a crash are
        // harmless (receivers drop them by id).
        if self
            .writer
            .send(WriteJob {
                op: Op::MarkSent(ids),
                after: None,
            })
            .await
            .is_err()
        {
            tracing::debug!("writer closed; acknowledgements not recorded");
        }
    }
}
