//! Requests whose content took workers down, so that one hostile request cannot take a fleet.
//!
//! A worker that dies under a request may have died of it. The proxy keys each such death by the
//! request's content, a BLAKE3 digest of the proof type and the payload (not of the message
//! bytes, which a client could vary without changing what the worker proves); content that took
//! down [`REFUSE_AFTER`] workers is refused at admission until `poison_ttl` has passed since the
//! last death. The table is bounded: a full one forgets expired entries first, then the oldest.
//! The digest is also the key of the proof cache ([`share`](crate::share)), so every request is
//! hashed once; while the table is empty (the normal case) it is not even locked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Workers a content may take down before it is refused.
pub const REFUSE_AFTER: u32 = 2;

/// Entries kept at most (a digest and a count each: under 1 MB).
pub const CAPACITY: usize = 10_000;

pub use crate::share::Digest;

/// A `ProofRequest`'s fields, the payload as a slice of the message (no copy).
#[derive(Clone, PartialEq, prost::Message)]
struct RequestContent {
    #[prost(int32, tag = "1")]
    proof_type: i32,
    #[prost(bytes = "bytes", tag = "2")]
    payload: Bytes,
}

/// The digest of the content of an encoded `ProofRequest` (one that the proxy already decoded
/// the head of; a message that does not decode is hashed whole).
pub fn digest(message: &Bytes) -> Digest {
    match <RequestContent as prost::Message>::decode(message.clone()) {
        Ok(content) => crate::share::digest(content.proof_type, &content.payload),
        Err(_) => *blake3::hash(message).as_bytes(),
    }
}

struct Deaths {
    count: u32,
    last: Instant,
}

/// Deaths by content.
#[derive(Default)]
pub struct PoisonTable {
    entries: Mutex<HashMap<Digest, Deaths>>,
    /// True once anything was recorded: admission hashes requests only then.
    used: AtomicBool,
}

impl PoisonTable {
    /// Whether admission needs to hash requests.
    pub fn in_use(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Workers this content took down within `ttl` of the last death, when that reaches
    /// [`REFUSE_AFTER`] (the request is to be refused); `None` otherwise.
    pub fn refused(&self, digest: &Digest, ttl: Duration) -> Option<u32> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries
            .get(digest)
            .filter(|d| d.count >= REFUSE_AFTER && d.last.elapsed() < ttl)
            .map(|d| d.count)
    }

    /// Records that this content took a worker down; returns how many it took within `ttl`.
    pub fn record(&self, digest: Digest, ttl: Duration) -> u32 {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !entries.contains_key(&digest) && entries.len() >= CAPACITY {
            entries.retain(|_, d| now.duration_since(d.last) < ttl);
            if entries.len() >= CAPACITY
                && let Some(oldest) = entries.iter().min_by_key(|(_, d)| d.last).map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        let deaths = entries.entry(digest).or_insert(Deaths { count: 0, last: now });
        if now.duration_since(deaths.last) >= ttl {
            deaths.count = 0;
        }
        deaths.count += 1;
        deaths.last = now;
        self.used.store(true, Ordering::Relaxed);
        deaths.count
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(proof_type: i32, payload: &[u8]) -> Bytes {
        let content = RequestContent { proof_type, payload: Bytes::copy_from_slice(payload) };
        Bytes::from(prost::Message::encode_to_vec(&content))
    }

    #[test]
    fn the_digest_is_of_the_content_not_of_the_encoding() {
        let plain = request(0, b"payload");
        // The same fields, the payload given twice (the last one counts, as for the worker).
        let mut twice = request(0, b"other").to_vec();
        twice.extend_from_slice(&request(0, b"payload"));
        assert_eq!(digest(&plain), digest(&Bytes::from(twice)));
        assert_ne!(digest(&plain), digest(&request(1, b"payload")));
        assert_ne!(digest(&plain), digest(&request(0, b"payloaD")));
    }

    #[test]
    fn content_is_refused_after_two_deaths_until_the_ttl_passes_and_the_table_stays_bounded() {
        let table = PoisonTable::default();
        let ttl = Duration::from_secs(3600);
        let poison = digest(&request(0, b"poison"));
        assert!(!table.in_use());
        assert_eq!(table.record(poison, ttl), 1);
        assert!(table.in_use());
        assert_eq!(table.refused(&poison, ttl), None);
        assert_eq!(table.record(poison, ttl), 2);
        assert_eq!(table.refused(&poison, ttl), Some(2));
        assert_eq!(table.refused(&poison, Duration::ZERO), None, "expired");
        for n in 0..CAPACITY + 100 {
            table.record(digest(&request(0, &n.to_le_bytes())), ttl);
        }
        assert_eq!(table.len(), CAPACITY);
        // A death after the ttl starts the count again.
        assert_eq!(table.record(poison, Duration::ZERO), 1);
    }
}
