use super::Ack;
use bytes::{Bytes, BytesMut};
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    matches, QoS, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::filters::FilterTree;
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::io;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    /// pickupd patch: boxed. Every stored message (in each filter's log and among the
    /// retained ones) carried the MQTT 5 properties inline, about 140 of its 230 bytes,
    /// though MQTT 3.1.1 messages have none: a log of small courier reports took about
    /// five times its `segment_size` in memory. Boxed, a message without properties takes
    /// 96 bytes plus its topic and payload.
    pub properties: Option<Box<PublishProperties>>,
    pub timestamp: Instant,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties: properties.map(Box::new),
            timestamp: Instant::now(),
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        let publish = &self.publish;
        4 + publish.topic.len() + publish.payload.len()
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
/// pickupd patch: a retained message as kept: the payload alone (the topic is the map's
/// key), the QoS, and only for MQTT 5 messages their properties and the time they came
/// (for expiry). Upstream kept a whole `PublishData` (96 bytes), a second copy of the
/// topic in it, and the topic and payload as shared buffers with a header each: about
/// 450 bytes for a courier's presence with a 50-byte topic and an 80-byte payload, 250
/// bytes more than this. A site keeps one per courier and one per recent call.
struct Retained {
    payload: Box<[u8]>,
    qos: QoS,
    v5: Option<Box<(PublishProperties, Instant)>>,
}

pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    /// pickupd patch: a B-tree, not a hash map. With one retained state per call the map
    /// holds 100k+ topics on a busy site, and a hash map doubling at that size rehashed
    /// every topic at once on the router thread: a 50-100 ms stall of the whole broker.
    /// A B-tree grows a node at a time.
    retained_publishes: BTreeMap<Box<str>, Retained>,
    /// pickupd patch: the filters by level, to find a topic's filters (`filters.rs`).
    /// Upstream cached, per topic ever published, the filters found by testing each.
    filter_tree: FilterTree,
    /// pickupd patch: some log may hold entries that no trim pass has looked at.
    pub untrimmed: bool,
    /// pickupd patch: per log, the position before which its entries are to be freed,
    /// worked off a budget at a time (`DataLog::trim_step`).
    trim_targets: Vec<(FilterIdx, Offset)>,
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = BTreeMap::new();
        let mut filter_tree = FilterTree::default();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                // pickupd patch: a repeated filter is one filter.
                if filter_indexes.contains_key(&filter) {
                    continue;
                }
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                filter_tree.insert(&filter, idx);
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            filter_tree,
            filter_indexes,
            retained_publishes,
            untrimmed: false,
            trim_targets: Vec::new(),
        })
    }

    /// pickupd patch: the requests parked on the filter logs, with their connections.
    pub fn waiters_requests(&self) -> impl Iterator<Item = &(ConnectionId, DataRequest)> {
        self.native
            .iter()
            .flat_map(|(_, data)| data.waiters.waiters().iter())
    }

    /// pickupd patch: sets, for every log holding entries, the position before which
    /// they are to be freed: `keep_from[filter]`, the earliest position any reader of it
    /// may still read from, or the log's end if nobody reads it (`None` or missing). A
    /// reader that comes later starts at the end as it is then, so the targets stay safe
    /// while `trim_step` works them off.
    pub fn set_trim_targets(&mut self, keep_from: &[Option<Offset>]) {
        self.trim_targets.clear();
        for (idx, data) in self.native.iter() {
            if data.log.is_empty() {
                continue;
            }
            let target = keep_from
                .get(idx)
                .copied()
                .flatten()
                .unwrap_or_else(|| data.log.next_offset());
            self.trim_targets.push((idx, target));
        }
        self.untrimmed = !self.trim_targets.is_empty();
    }

    /// pickupd patch: frees up to `budget` entries towards the targets set by
    /// `set_trim_targets`; returns whether any target is left, and how many entries
    /// were freed.
    pub fn trim_step(&mut self, budget: u64) -> (bool, u64) {
        let mut left = budget;
        while let Some(&(idx, target)) = self.trim_targets.last() {
            let freed = self.native.get_mut(idx).map_or(0, |data| {
                let freed = data.log.trim(target, left);
                if data.log.is_empty() {
                    data.chunks.reset();
                }
                freed
            });
            if freed < left {
                // Nothing before the target is left in that log.
                self.trim_targets.pop();
            }
            left -= freed.min(left);
            if left == 0 {
                break;
            }
        }
        (!self.trim_targets.is_empty(), budget - left)
    }

    /// pickupd patch: one past the largest filter index in use (for sizing `trim`'s
    /// table).
    pub fn filter_index_end(&self) -> usize {
        self.native.iter().map(|(idx, _)| idx + 1).max().unwrap_or(0)
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(filter)?)
            .unwrap();
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|&(conn_id, _)| conn_id == id)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    /// The filters `topic` matches (pickupd patch: found by walking the filter tree).
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        let mut v = Vec::new();
        self.filter_tree.matches(topic, &mut v);
        Some(v)
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);
                // pickupd patch: into the filter tree; upstream walked its cache of every
                // topic published so far to add the new filter to those it matches.
                self.filter_tree.insert(filter, idx);

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties.map(|p| *p)), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties.map(|p| *p)))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let data = self.native.get_mut(request.filter_idx).unwrap();
        data.waiters.register(id, request);
    }

    /// pickupd patch: takes connection `id`'s parked requests on one filter's log back
    /// from its waiters (to re-send that filter's retained messages).
    pub fn take_waiters(&mut self, id: ConnectionId, filter_idx: FilterIdx) -> Vec<DataRequest> {
        self.native
            .get_mut(filter_idx)
            .map(|data| data.waiters.remove(id))
            .unwrap_or_default()
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
    ) {
        let retained = Retained {
            payload: publish.payload.as_ref().into(),
            qos: publish.qos,
            // pickupd patch: the correlation data is a view into the read buffer (see
            // `stored_copy` in routing.rs); the payload above is copied already.
            v5: publish_properties.map(|mut p| {
                if let Some(c) = p.correlation_data.as_mut() {
                    *c = Bytes::copy_from_slice(c);
                }
                Box::new((p, Instant::now()))
            }),
        };
        self.retained_publishes.insert(topic.into(), retained);
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(topic.as_str());
    }

    /// pickupd patch: reads only the part of the retained messages that can match, up to
    /// `limit` of them, after topic `after` (the last one a previous read returned);
    /// returns them, and the topic to resume after if more may match.
    ///
    /// Upstream walked every retained message on every subscription (first to drop expired
    /// ones, then to match): with one retained state per call that is 100k+ topic matches
    /// per SUBSCRIBE, so a fleet of handhelds reconnecting at once stalled the router for
    /// minutes. The map is ordered, so the topics a filter can match are the range that
    /// starts with its literal part (everything before the first wildcard; all of them
    /// for a filter starting with one). Expiry is now checked on the messages read:
    /// expired ones are dropped, the others go out with the time they have left (upstream
    /// also wrote that back into the stored message, shortening it again on each read).
    pub fn read_retained_messages(
        &mut self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<PubWithProp>, Option<Topic>) {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();
        let prefix = retained_prefix(filter);
        let mut out = Vec::new();
        let mut expired = Vec::new();
        let mut resume = None;
        let mut last: Option<&str> = None;
        let start = match after {
            Some(topic) => Bound::Excluded(topic),
            None => Bound::Included(prefix),
        };
        let range = self
            .retained_publishes
            .range::<str, _>((start, Bound::Unbounded));
        for (topic, retained) in range {
            if !topic.starts_with(prefix) {
                break;
            }
            if !matches(topic, filter) {
                continue;
            }
            let mut properties = None;
            if let Some(v5) = &retained.v5 {
                let (props, stored) = v5.as_ref();
                let mut props = props.clone();
                if let Some(interval) = props.message_expiry_interval.as_mut() {
                    let spent = now.saturating_duration_since(*stored).as_secs();
                    let spent = u32::try_from(spent).unwrap_or(u32::MAX);
                    if spent >= *interval {
                        expired.push(topic.clone());
                        continue;
                    }
                    // The time left, as MQTT 5 asks (3.3.2.3.3).
                    *interval -= spent;
                }
                properties = Some(props);
            }
            if out.len() == limit {
                // One more matches: the caller comes back for it.
                resume = last.map(str::to_string);
                break;
            }
            let publish = Publish {
                dup: false,
                qos: retained.qos,
                pkid: 0,
                retain: true,
                topic: Bytes::copy_from_slice(topic.as_bytes()),
                payload: Bytes::copy_from_slice(&retained.payload),
            };
            out.push((publish, properties));
            last = Some(topic);
        }
        for topic in expired {
            self.retained_publishes.remove(&topic);
        }
        (out, resume)
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
    /// pickupd patch: where this log's messages keep their bytes (see [`Chunks`]).
    pub chunks: Chunks,
}

/// pickupd patch: the bytes of a filter log's messages, copied into chunks the log owns.
///
/// A stored message's topic and payload must not stay views into the publishing
/// connection's read buffer (see `stored_copy` in routing.rs), but copying
/// each into an allocation of its own interleaves a burst's short-lived log entries with
/// the long-lived allocations made at the same time (retained messages, new
/// connections): once the entries are read and freed, their holes are too small to give
/// back, and a burst of 10 000 couriers coming online left megabytes of free space held
/// in partly used pages. Entries of one log are freed in order, so copies into chunks of
/// that log free whole chunks. Chunks start small and double up to [`Chunks::MAX`], so a
/// log of a few messages (a handheld's job topic) holds little more than their bytes;
/// when the log has been read to its end the current chunk is let go.
pub struct Chunks {
    current: BytesMut,
    next: usize,
}

impl Chunks {
    /// The first chunk of a log, in bytes.
    const FIRST: usize = 256;
    /// The largest chunk, in bytes: under glibc's mmap threshold, so chunks come from the
    /// heap and a freed one is whole pages the allocator can reuse or give back.
    const MAX: usize = 64 * 1024;

    fn new() -> Chunks {
        Chunks {
            current: BytesMut::new(),
            next: Chunks::FIRST,
        }
    }

    /// Copies of a message's topic and payload, side by side in this log's current chunk
    /// (a new one when they do not fit: the next size, or theirs if larger).
    pub fn copy(&mut self, topic: &[u8], payload: &[u8]) -> (Bytes, Bytes) {
        let need = topic.len() + payload.len();
        if self.current.capacity() - self.current.len() < need {
            self.current = BytesMut::with_capacity(self.next.max(need));
            self.next = (self.next * 2).min(Chunks::MAX);
        }
        self.current.extend_from_slice(topic);
        let topic = self.current.split().freeze();
        self.current.extend_from_slice(payload);
        let payload = self.current.split().freeze();
        (topic, payload)
    }

    /// Lets the current chunk go (once nothing in the log refers to it) and starts the
    /// next one small again.
    fn reset(&mut self) {
        *self = Chunks::new();
    }
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        // pickupd patch: no room reserved up front (upstream: 10 requests, about 1 KiB per
        // filter); most filters have one subscriber, a handheld's own job topic.
        let waiters = Waiters::with_capacity(0);
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
            chunks: Chunks::new(),
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    recorded: VecDeque<(Publish, Option<PublishProperties>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            // pickupd patch: grows as used (see `Outgoing::new`).
            committed: VecDeque::new(),
            recorded: VecDeque::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        self.recorded.push_back((publish, props));
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    pub fn pubcomp(&mut self, ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
        self.recorded.pop_front()
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

/// pickupd patch: the literal start of a subscription filter, before its first wildcard
/// level, without the separator (`a/b/#` also matches the topic `a/b`). Every topic the
/// filter matches starts with it.
fn retained_prefix(filter: &str) -> &str {
    let literal = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
    literal.strip_suffix('/').unwrap_or(literal)
}

#[cfg(test)]
mod test {
    use super::{Chunks, DataLog};
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.matches("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        assert_eq!(data.matches("topic/a").unwrap().len(), 1);
    }

    // pickupd patch: trimming frees entries up to the targets, a budget at a time, and
    // says how many it freed (the router gathers less often after rounds that freed none).
    #[test]
    fn trimming_frees_up_to_the_targets_and_counts_what_it_freed() {
        use crate::protocol::Publish;
        let config = RouterConfig {
            max_segment_size: 1024 * 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        let (idx, start) = data.next_native_offset("t/+");
        let log = &mut data.native.get_mut(idx).unwrap().log;
        for i in 0..10 {
            log.append((Publish::new(format!("t/{i}"), "v".to_string(), false), None).into());
        }
        // A reader at the seventh entry: six are freeable.
        let keep = (start.0, start.1 + 6);
        let mut targets = vec![None; data.filter_index_end()];
        targets[idx] = Some(keep);
        data.set_trim_targets(&targets);
        assert!(data.untrimmed);
        assert_eq!(data.trim_step(4), (true, 4));
        assert_eq!(data.trim_step(4), (false, 2));
        assert_eq!(data.trim_step(4), (false, 0));
        // The same target again frees nothing: the log still holds what the reader needs.
        data.set_trim_targets(&targets);
        assert_eq!(data.trim_step(4), (false, 0));
        let mut left = Vec::new();
        let log = &data.native.get(idx).unwrap().log;
        log.readv(keep, 100, &mut left).unwrap();
        assert_eq!(left.len(), 4);
    }

    // pickupd patch: a subscription gets exactly the retained messages its filter matches,
    // read from the filter's range of the ordered map.
    #[test]
    fn retained_messages_read_for_a_filter_are_those_it_matches() {
        use crate::protocol::{Publish, PublishProperties, QoS};
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        let topics = [
            "a", "a/b", "a/b/c", "a/b/c/d", "a/bc", "a/bc/d", "ab/c", "b/b", "b/b/c", "x/y/z",
        ];
        for t in topics {
            let p = Publish::new(t, "v", true);
            data.insert_to_retained_publishes(p, None, t.to_string());
        }
        // Read in windows of `limit`, resuming after the last topic each time, as the
        // router does while the subscriber's in-flight window frees up.
        let read = |data: &mut DataLog, f: &str, limit: usize| {
            let mut v: Vec<String> = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let (got, resume) = data.read_retained_messages(f, after.as_deref(), limit);
                assert!(got.len() <= limit);
                for (p, props) in got {
                    assert_eq!((p.payload.as_ref(), p.retain, p.qos), (&b"v"[..], true, QoS::AtMostOnce));
                    assert!(props.is_none());
                    v.push(String::from_utf8(p.topic.to_vec()).unwrap());
                }
                match resume {
                    Some(t) => {
                        assert_eq!(v.last(), Some(&t));
                        after = Some(t);
                    }
                    None => return v,
                }
            }
        };
        for f in ["a/b", "a/b/#", "a/+", "a/+/c", "+/b", "+/b/#", "#", "a/bc/d", "x/+/z", "q/#"] {
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| crate::protocol::matches(t, f))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            for limit in [1, 2, 3, 1024] {
                // Each once, in topic order.
                assert_eq!(read(&mut data, f, limit), want, "filter {f}, limit {limit}");
            }
        }

        // Expiry: an expired message is dropped; a live one goes out with the time left,
        // and reading it again does not shorten the stored interval.
        let props = |secs| PublishProperties {
            message_expiry_interval: Some(secs),
            ..Default::default()
        };
        data.insert_to_retained_publishes(Publish::new("e/live", "v", true), Some(props(60)), "e/live".into());
        data.insert_to_retained_publishes(Publish::new("e/gone", "v", true), Some(props(0)), "e/gone".into());
        for _ in 0..3 {
            let (got, resume) = data.read_retained_messages("e/#", None, 1);
            assert_eq!(resume, None, "the expired one is not more to read");
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].0.topic, "e/live");
            let left = got[0].1.as_ref().and_then(|p| p.message_expiry_interval);
            assert!(matches!(left, Some(59..=60)), "{left:?}");
        }
        assert_eq!(data.read_retained_messages("e/gone", None, 10).0.len(), 0);
    }

    // pickupd patch: the size a stored message takes before its topic and payload.
    #[test]
    fn a_stored_message_without_properties_is_small() {
        assert!(std::mem::size_of::<super::PublishData>() <= 96);
    }

    // pickupd patch: a filter added after topics were published reaches them, and
    // topics without end cost nothing kept per topic.
    #[test]
    fn new_filters_reach_old_topics_and_topics_are_not_kept() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        let (all, _) = data.next_native_offset("calls/+/state");
        for i in 0..1000 {
            assert_eq!(data.matches(&format!("calls/{i}/state")), Some(vec![all]));
        }
        let (late, _) = data.next_native_offset("calls/#");
        let mut got = data.matches("calls/999/state").unwrap();
        got.sort();
        assert_eq!(got, vec![all, late]);
        assert_eq!(data.matches("calls"), Some(vec![late]));
        assert_eq!(data.matches("$SYS/calls"), Some(vec![]));
        // The same filter again is the same filter.
        assert_eq!(data.next_native_offset("calls/#").0, late);
        assert_eq!(data.matches("calls/1/x"), Some(vec![late]));
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }

    // pickupd patch: a log's copies share chunks that start small and double up to the
    // largest; a message larger than the next chunk gets a chunk of its own size; a reset
    // starts small again. Each copy equals what was copied.
    #[test]
    fn copies_share_chunks_that_grow_and_start_small_after_a_reset() {
        let mut c = Chunks::new();
        let (t, p) = c.copy(b"topic/a", b"payload");
        assert_eq!((&t[..], &p[..]), (&b"topic/a"[..], &b"payload"[..]));
        assert_eq!(p.as_ptr(), t.as_ptr().wrapping_add(t.len()), "one chunk");
        let (t, p) = c.copy(b"", b"");
        assert!(t.is_empty() && p.is_empty());

        // Fill chunks with 8-byte messages and note how many bytes each chunk took.
        let mut sizes = Vec::new();
        let mut run = 0;
        let mut last: Option<bytes::Bytes> = None;
        let mut kept = Vec::new();
        for _ in 0..20_000 {
            let (t, p) = c.copy(b"t/1", b"abcde");
            assert_eq!(p.as_ptr(), t.as_ptr().wrapping_add(3));
            let adjacent = last
                .as_ref()
                .is_some_and(|l| t.as_ptr() == l.as_ptr().wrapping_add(l.len()));
            if adjacent || last.is_none() {
                run += 8;
            } else {
                sizes.push(run);
                run = 8;
            }
            last = Some(p.clone());
            kept.push((t, p));
        }
        // The first chunk (256 bytes) held 14 bytes before these.
        assert_eq!(sizes[..9], [240, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]);
        assert!(sizes[9..].iter().all(|&s| s == Chunks::MAX), "{sizes:?}");
        assert!(kept.iter().all(|(t, p)| t[..] == b"t/1"[..] && p[..] == b"abcde"[..]));

        let big = vec![1u8; 3 * Chunks::MAX];
        let (_, y) = c.copy(b"big", &big);
        assert_eq!(y[..], big[..]);
        let (z, _) = c.copy(b"next", b"");
        assert_ne!(z.as_ptr(), y.as_ptr().wrapping_add(y.len()), "a chunk of its own");

        c.reset();
        let (_, first) = c.copy(b"", &[2u8; 200]);
        let (second, _) = c.copy(&[3u8; 100], b"");
        assert_ne!(
            second.as_ptr(),
            first.as_ptr().wrapping_add(first.len()),
            "after a reset the first chunk is small again ({} bytes)",
            Chunks::FIRST
        );
    }
}
