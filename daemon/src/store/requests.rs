//! Which kiosk request ids the database may hold, without asking it: a Bloom filter.
//!
//! Every create whose request id is not among the calls in memory used to be looked up
//! in the `requests` table, in case it repeats a call already forgotten from memory. That
//! read ran on the dispatch loop's thread and, since every commit changes the file, began
//! each time with a fresh read transaction (WAL lock, page cache dropped). A filter that
//! holds every request id of the database answers "certainly not there" for new request
//! ids, so only possible repeats (and a small share of false positives) still read.
//!
//! The filter has no false negatives as long as every request id the database holds was
//! inserted: [`build`] reads the table once in the background (a covering index scan,
//! after start, not before READY) once every write queued before it is committed, and
//! the dispatch loop inserts the request id of every call it creates, into the filter
//! being built as well, so that nothing committed after the build's snapshot is missed.
//! A filter filled past its capacity is replaced by a larger one the same way. Rows removed by retention stay in the filter (only a
//! false positive: the lookup then finds nothing).

use std::hash::{Hash, Hasher};
use std::path::Path;

use super::{Reader, StoreError};

/// Bits per expected entry: with [`PROBES`] probes, about 1 % false positives.
const BITS_PER_ENTRY: usize = 10;
/// Probes per request id.
const PROBES: u64 = 7;
/// The smallest capacity a filter is built with (128 KiB of bits).
pub const MIN_CAPACITY: usize = 100_000;

/// A Bloom filter of request ids.
#[derive(Debug, Clone)]
pub struct RequestFilter {
    bits: Vec<u64>,
    /// Number of bits − 1 (a power of two − 1).
    mask: u64,
    inserted: usize,
    capacity: usize,
}

impl RequestFilter {
    /// An empty filter sized for `capacity` request ids at about 1 % false positives.
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(MIN_CAPACITY);
        let nbits = (capacity.saturating_mul(BITS_PER_ENTRY)).next_power_of_two();
        Self {
            bits: vec![0; nbits / 64],
            mask: nbits as u64 - 1,
            inserted: 0,
            capacity,
        }
    }

    /// Notes a request id.
    pub fn insert(&mut self, id: &str) {
        for p in probes(self.mask, id) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.inserted += 1;
    }

    /// False only if `id` was certainly never inserted.
    pub fn may_contain(&self, id: &str) -> bool {
        probes(self.mask, id).all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Adds everything `other` holds. Both must have been made with the same capacity.
    pub fn merge(&mut self, other: &RequestFilter) {
        debug_assert_eq!(self.bits.len(), other.bits.len());
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
        }
        self.inserted += other.inserted;
    }

    /// Whether more ids were inserted than it was sized for (false positives then grow:
    /// time to build a larger one).
    pub fn saturated(&self) -> bool {
        self.inserted > self.capacity
    }

    /// The capacity it was sized for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of bits held.
    pub fn bytes(&self) -> usize {
        self.bits.len() * 8
    }
}

/// The bits of `id`: double hashing of one 64-bit SipHash (fixed keys, so the same id
/// always maps to the same bits).
fn probes(mask: u64, id: &str) -> impl Iterator<Item = u64> {
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    let x = h.finish();
    let (a, b) = (x & 0xffff_ffff, (x >> 32) | 1);
    (0..PROBES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) & mask)
}

/// A capacity for a filter of the database at `path`: twice the request ids it holds
/// (estimated from the largest rowid, which is an index lookup, not a count), at least
/// [`MIN_CAPACITY`].
pub fn capacity_for(reader: &Reader) -> rusqlite::Result<usize> {
    let max: i64 =
        reader
            .conn()
            .query_row("SELECT coalesce(max(rowid), 0) FROM requests", [], |r| {
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
        .prepare("SELECT request_id FROM requests")
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
        /// No false negatives, also after a merge; few false positives.
        #[test]
        fn inserted_ids_are_always_found(
            a in proptest::collection::vec("[a-z0-9-]{1,24}", 0..300),
            b in proptest::collection::vec("[a-z0-9-]{1,24}", 0..300),
        ) {
            let mut f = RequestFilter::with_capacity(1_000);
            let mut g = RequestFilter::with_capacity(1_000);
            for id in &a { f.insert(id); }
            for id in &b { g.insert(id); }
            f.merge(&g);
            for id in a.iter().chain(&b) {
                prop_assert!(f.may_contain(id));
            }
        }
    }

    #[test]
    fn false_positives_stay_near_one_percent_at_capacity() {
        let mut f = RequestFilter::with_capacity(MIN_CAPACITY);
        for i in 0..MIN_CAPACITY {
            f.insert(&format!("r-{i}"));
        }
        assert!(!f.saturated());
        let fp = (0..100_000)
            .filter(|i| f.may_contain(&format!("other-{i}")))
            .count();
        // Sized at 10 bits per id (rounded up to a power of two), 7 probes: about 1 %.
        assert!(fp < 2_000, "{fp} false positives in 100 000");
    }

    #[test]
    fn build_reads_every_request_id_of_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let conn = crate::store::open(&path).unwrap();
        for i in 0..1_000 {
            conn.execute(
                "INSERT INTO requests (request_id, call_id, created_at) VALUES (?1, ?2, 0)",
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
