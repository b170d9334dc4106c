//! Which kiosk request ids the database may hold, without asking it: a Bloom filter.
//!
//! Every create whose request id is not among the calls in memory used to be looked up
//! among the stored calls (`calls.request_id`), in case it repeats a call already forgotten from memory. That
//! read ran on the dispatch loop's thread and, since every commit changes the file, began
//! each time with a fresh read transaction (WAL lock, page cache dropped). A filter that
//! holds every request id of the database answers "certainly not there" for new request
//! ids, so only possible repeats (and a small share of false positives) still read.
//!
//! The filter has no false negatives as long as every request id the database holds was
//! inserted: [`build`] reads them once in the background (a covering index scan,
//! after start, not before READY) once every write queued before it is committed, and
//! the dispatch loop inserts the request id of every call it creates, and keeps those
//! created during the build aside for it, so that nothing committed after the build's
//! snapshot is missed. Rows removed by retention stay in the filter (only a false
//! positive: the lookup then finds nothing).
//!
//! A filter never needs the database again after that: when its newest layer is full it
//! adds a layer twice as large and with more bits per id (a scalable Bloom filter), so
//! false positives stay near 1 % overall however many calls arrive. Growing used to mean
//! reading every request id again on a second thread, under the very load that filled
//! the filter, which showed in the latency tail.

use std::hash::{Hash, Hasher};
use std::path::Path;

use super::{Reader, StoreError};

/// Bits per expected entry of the first layer: with [`PROBES`] probes, about 1 % false
/// positives. Each later layer gets [`BITS_STEP`] more.
const BITS_PER_ENTRY: usize = 10;
/// Extra bits per entry for each added layer: the layers' false-positive rates fall
/// geometrically, so their sum stays bounded (about 1 % + 0.3 % + 0.15 % + ...).
const BITS_STEP: usize = 2;
/// Probes per request id and layer.
const PROBES: u64 = 7;
/// The smallest capacity a filter is built with (128 KiB of bits).
pub const MIN_CAPACITY: usize = 100_000;

/// One fixed-size Bloom filter.
#[derive(Debug, Clone)]
struct Layer {
    bits: Vec<u64>,
    /// Number of bits − 1 (a power of two − 1).
    mask: u64,
    inserted: usize,
    capacity: usize,
}

impl Layer {
    fn new(capacity: usize, bits_per_entry: usize) -> Self {
        let nbits = capacity
            .saturating_mul(bits_per_entry)
            .max(64)
            .next_power_of_two();
        Self {
            bits: vec![0; nbits / 64],
            mask: nbits as u64 - 1,
            inserted: 0,
            capacity,
        }
    }

    fn insert(&mut self, h: u64) {
        for p in probes(self.mask, h) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.inserted += 1;
    }

    fn may_contain(&self, h: u64) -> bool {
        probes(self.mask, h).all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

/// A Bloom filter of request ids that grows by layers.
#[derive(Debug, Clone)]
pub struct RequestFilter {
    /// Oldest first; ids go into the last one.
    layers: Vec<Layer>,
}

impl RequestFilter {
    /// An empty filter sized for `capacity` request ids at about 1 % false positives
    /// (at least [`MIN_CAPACITY`]); it grows past that on its own.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            layers: vec![Layer::new(capacity.max(MIN_CAPACITY), BITS_PER_ENTRY)],
        }
    }

    /// Notes a request id; adds a layer first when the newest one is full.
    pub fn insert(&mut self, id: &str) {
        let h = hash(id);
        let full = self.layers.last().is_none_or(|l| l.inserted >= l.capacity);
        if full {
            let n = self.layers.len();
            let cap = self
                .layers
                .last()
                .map_or(MIN_CAPACITY, |l| l.capacity.saturating_mul(2));
            self.layers
                .push(Layer::new(cap, BITS_PER_ENTRY + BITS_STEP * n));
        }
        if let Some(l) = self.layers.last_mut() {
            l.insert(h);
        }
    }

    /// False only if `id` was certainly never inserted.
    pub fn may_contain(&self, id: &str) -> bool {
        let h = hash(id);
        self.layers.iter().any(|l| l.may_contain(h))
    }

    /// Request ids inserted.
    pub fn len(&self) -> usize {
        self.layers.iter().map(|l| l.inserted).sum()
    }

    /// Whether no request id was inserted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many ids it holds room for before it adds another layer.
    pub fn capacity(&self) -> usize {
        self.layers.iter().map(|l| l.capacity).sum()
    }

    /// Layers so far (1 until the first one fills).
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of bits held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bits.len() * 8).sum()
    }
}

/// One 64-bit SipHash of `id` (fixed keys, so the same id always maps to the same bits).
fn hash(id: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// A layer's bits for hash `x`: double hashing.
fn probes(mask: u64, x: u64) -> impl Iterator<Item = u64> {
    let (a, b) = (x & 0xffff_ffff, (x >> 32) | 1);
    (0..PROBES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) & mask)
}

/// A capacity for a filter of the database at `path`: twice the request ids it holds
/// (estimated from the calls' largest rowid, which is an index lookup, not a count), at least
/// [`MIN_CAPACITY`].
pub fn capacity_for(reader: &Reader) -> rusqlite::Result<usize> {
    let max: i64 =
        reader
            .conn()
            .query_row("SELECT coalesce(max(rowid), 0) FROM calls", [], |r| {
                r.get(0)
            })?;
    Ok(usize::try_from(max)
        .unwrap_or(0)
        .saturating_mul(2)
        .max(MIN_CAPACITY))
}

/// Reads every request id of the database at `path` into a filter of `capacity` (one
/// pass over the request-id index, from a read connection of its own).
pub fn build(path: &Path, capacity: usize) -> Result<RequestFilter, StoreError> {
    let reader = Reader::open(path)?;
    let e = super::sq(path);
    let mut f = RequestFilter::with_capacity(capacity);
    let mut st = reader
        .conn()
        .prepare("SELECT request_id FROM calls")
        .map_err(&e)?;
    let mut rows = st.query([]).map_err(&e)?;
    while let Some(r) = rows.next().map_err(&e)? {
        let id: String = r.get(0).map_err(&e)?;
        f.insert(&id);
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// No false negatives, whatever the number of layers.
        #[test]
        fn inserted_ids_are_always_found(
            ids in proptest::collection::vec("[a-z0-9-]{1,24}", 0..300),
            extra in 0usize..250_000,
        ) {
            let mut f = RequestFilter::with_capacity(MIN_CAPACITY);
            for i in 0..extra { f.insert(&format!("x-{i}")); }
            for id in &ids { f.insert(id); }
            for id in &ids {
                prop_assert!(f.may_contain(id));
            }
            prop_assert_eq!(f.len(), extra + ids.len());
        }
    }

    #[test]
    fn false_positives_stay_near_one_percent_at_capacity() {
        let mut f = RequestFilter::with_capacity(MIN_CAPACITY);
        for i in 0..MIN_CAPACITY {
            f.insert(&format!("r-{i}"));
        }
        assert_eq!(f.layers(), 1);
        let fp = (0..100_000)
            .filter(|i| f.may_contain(&format!("other-{i}")))
            .count();
        // Sized at 10 bits per id (rounded up to a power of two), 7 probes: about 1 %.
        assert!(fp < 2_000, "{fp} false positives in 100 000");
    }

    /// Grown far past its first capacity, it keeps every id and its false positives stay
    /// near the first layer's: no rebuild needed.
    #[test]
    fn grows_by_layers_without_losing_ids_or_precision() {
        let mut f = RequestFilter::with_capacity(MIN_CAPACITY);
        let n = MIN_CAPACITY * 7;
        for i in 0..n {
            f.insert(&format!("r-{i}"));
        }
        // 100k + 200k + 400k: the third layer holds the last 400k.
        assert_eq!(f.layers(), 3);
        assert_eq!(f.len(), n);
        assert!(f.capacity() >= n);
        assert!((0..n).step_by(7).all(|i| f.may_contain(&format!("r-{i}"))));
        let fp = (0..100_000)
            .filter(|i| f.may_contain(&format!("other-{i}")))
            .count();
        assert!(fp < 2_500, "{fp} false positives in 100 000");
        // One more id opens the fourth layer, twice the third.
        f.insert("one-more");
        assert_eq!(f.layers(), 4);
        assert!(f.may_contain("one-more"));
        assert_eq!(f.capacity(), MIN_CAPACITY * 15);
    }

    #[test]
    fn build_reads_every_request_id_of_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let conn = crate::store::open(&path).unwrap();
        for i in 0..1_000 {
            conn.execute(
                "INSERT INTO calls (id, request_id, status, tel, created_at, updated_at, view, body)
                 VALUES (?2, ?1, 'completed', '010', 0, 0, '{}', '{}')",
                [format!("req-{i}"), format!("c{i}")],
            )
            .unwrap();
        }
        let reader = Reader::open(&path).unwrap();
        let cap = capacity_for(&reader).unwrap();
        assert_eq!(cap, MIN_CAPACITY);
        let f = build(&path, cap).unwrap();
        for i in 0..1_000 {
            assert!(f.may_contain(&format!("req-{i}")));
        }
        let absent = (0..1_000)
            .filter(|i| f.may_contain(&format!("new-{i}")))
            .count();
        assert!(absent < 50, "{absent}");
    }
}
