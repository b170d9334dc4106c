//! The status-read connection: a second MQTT connection that subscribes only to
//! `calls/+/get` and answers on itself. A broker queues messages per connection, so when
//! kiosks flood `calls/create` the status requests do not wait behind the flood (nor do
//! their answers wait behind the publisher's queue); the reader thread answers them from
//! the database without touching the dispatch loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pickup_protocol::answer::decode_request;
use pickup_protocol::client::{Backoff, Link, LinkEvent, LinkEvents, PublishProps};
use pickup_protocol::{ErrorBody, GetCall, Inbound, Topics};
use tokio::sync::{mpsc, watch};

use super::inbound::{confined_reply_path, wait_to_reconnect, GetRequest, MqttState};
use super::publisher::Reply;
use crate::dispatch::ReplyBody;

/// Everything the read connection's task needs.
pub struct ReadsCtx {
    /// Topics of the site.
    pub topics: Topics,
    /// The read connection.
    pub link: Link,
    /// Reader thread input.
    pub reads: std::sync::mpsc::SyncSender<GetRequest>,
    /// Answers (from the reader thread and from here) to publish on this connection.
    pub answers: mpsc::UnboundedSender<Reply>,
    /// Flags and counters shared with the main connection (`reads_*`, `rejected`).
    pub state: Arc<MqttState>,
    /// Reconnect backoff ceiling.
    pub reconnect_max: Duration,
    /// Turns true when the task must end.
    pub stop: watch::Receiver<bool>,
    /// Watchdog heartbeat of this task.
    pub beat: crate::systemd::Heartbeat,
}

/// Runs the read connection on a thread of its own with its own small runtime: under a
/// flood the daemon's worker threads have long queues of inbound work, and status reads
/// must not wait in them. Returns when the thread is started; it ends after `ctx.stop`.
pub fn spawn(
    events: LinkEvents,
    ctx: ReadsCtx,
    answers: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("mqtt-reads".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::spawn(answer(ctx.link.clone(), answers));
                run(events, ctx).await;
            });
        })
}

/// Publishes answers on the read connection until the channel closes. Runs apart from
/// [`run`] because a publish may wait on the client's channel, which only `run` drains.
pub async fn answer(link: Link, mut rx: mpsc::UnboundedReceiver<Reply>) {
    while let Some(r) = rx.recv().await {
        let Some(topic) = r.path.topic.clone() else {
            continue;
        };
        let payload = r.body.to_payload(r.path.payload_correlation());
        let props = r.path.correlation_data.clone().map(|c| PublishProps {
            correlation_data: Some(c),
            ..Default::default()
        });
        if let Err(e) = link
            .publish(&topic, true, false, payload, props.as_ref())
            .await
        {
            tracing::debug!(error = %e, "read connection closed; answers stop");
            return;
        }
    }
}

/// Polls the read connection until told to stop.
pub async fn run(mut events: LinkEvents, ctx: ReadsCtx) {
    let mut backoff = Backoff::new(Duration::from_millis(100), ctx.reconnect_max);
    let mut stop = ctx.stop.clone();
    let mut idle = tokio::time::interval(Duration::from_secs(1));
    loop {
        let ev = tokio::select! {
            ev = events.poll() => ev,
            _ = stop.wait_for(|s| *s) => return,
            _ = idle.tick() => {
                ctx.beat.beat();
                continue;
            }
        };
        ctx.beat.beat();
        match ev {
            Ok(LinkEvent::Connected { .. }) => {
                backoff.reset();
                ctx.state.reads_connected.store(true, Ordering::Relaxed);
                ctx.state.reads_subscribed.store(false, Ordering::Relaxed);
                tracing::info!("status-read connection up");
                let link = ctx.link.clone();
                let filters = vec![ctx.topics.call_gets()];
                tokio::spawn(async move {
                    if let Err(e) = link.subscribe_many(&filters).await {
                        tracing::warn!(error = %e, "status-read subscribe failed");
                    }
                });
            }
            Ok(LinkEvent::SubAck) => ctx.state.reads_subscribed.store(true, Ordering::Relaxed),
            Ok(LinkEvent::Message(m)) => {
                let id = match ctx.topics.parse(&m.topic) {
                    // A retained request is stale by definition (see the main connection).
                    Ok(Inbound::GetCall(id)) if !m.retain => id.to_string(),
                    _ => {
                        tracing::debug!(topic = %m.topic, "read connection ignored a message");
                        continue;
                    }
                };
                let (p, res) = decode_request::<GetCall>(&m.payload);
                let path = confined_reply_path(&ctx.topics, &m, p);
                if let Err(e) = res {
                    ctx.state.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(topic = %m.topic, error = %e.to_body().message, "bad status request");
                    let _ = ctx.answers.send(Reply {
                        path,
                        body: ReplyBody::Error(e.to_body()),
                    });
                    continue;
                }
                if let Err(e) = ctx.reads.try_send(GetRequest { call_id: id, path }) {
                    let req = match e {
                        std::sync::mpsc::TrySendError::Full(r)
                        | std::sync::mpsc::TrySendError::Disconnected(r) => r,
                    };
                    let _ = ctx.answers.send(Reply {
                        path: req.path,
                        body: ReplyBody::Error(ErrorBody::busy(
                            200,
                            "too many status reads in progress",
                        )),
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                let was = ctx.state.reads_connected.swap(false, Ordering::Relaxed);
                ctx.state.reads_subscribed.store(false, Ordering::Relaxed);
                if !wait_to_reconnect(
                    &e,
                    was,
                    &mut backoff,
                    &mut stop,
                    "status-read connection",
                    false,
                )
                .await
                {
                    return;
                }
            }
        }
    }
}
