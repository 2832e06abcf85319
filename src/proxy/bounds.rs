//! What clients may hold of the proxy, so that its memory and descriptors depend on its
//! configuration, not on its clients (settings in [`ClientBounds`]):
//!
//! - [`Connections`]: connections open at once, in all and per client. A connection that has
//!   not yet shown its protocol (`handshake_timeout`) is the first to go when the proxy is full.
//! - [`Budget`]: request bytes held at once, in all and per client. A request reserves what its
//!   gRPC prefix announces before its body is read; one that cannot is refused at once.
//!
//! A client is an IPv4 address or an IPv6 prefix, as for the rate limit.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::config::ClientBounds;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// CONNECTIONS
// ================================================================================================

/// The proxy's open connections.
#[derive(Default)]
pub struct Connections {
    state: Mutex<ConnectionState>,
}

#[derive(Default)]
struct ConnectionState {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
    /// Connections that have not shown their protocol yet, oldest first, each with its eviction.
    handshaking: VecDeque<(u64, oneshot::Sender<()>)>,
    next: u64,
}

/// Why a connection was closed at once.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `max_connections_per_client` from this client are open.
    #[error("{0} connections from this client are open (max_connections_per_client)")]
    Client(usize),
    /// `max_connections` are open and none of them is still in its handshake.
    #[error("{0} connections are open (max_connections)")]
    Full(usize),
}

/// Evicted connections whose tasks have not closed them yet, at most: beyond, new connections
/// are refused (see [`Connections::open`]).
pub const EVICTING: usize = 32;

/// One open connection; dropping it frees its place.
pub struct Slot {
    connections: Arc<Connections>,
    client: IpAddr,
    id: u64,
    /// Fires when a newer connection needs the place of this one, still in its handshake.
    pub evicted: Option<oneshot::Receiver<()>>,
}

impl Slot {
    /// The connection has shown its protocol: it can no longer be evicted for a newer one.
    pub fn handshake_done(&mut self) {
        self.evicted = None;
        lock(&self.connections.state).handshaking.retain(|(id, _)| *id != self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = lock(&self.connections.state);
        state.total -= 1;
        if let Some(count) = state.by_client.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                state.by_client.remove(&self.client);
            }
        }
        if self.evicted.is_some() {
            state.handshaking.retain(|(id, _)| *id != self.id);
        }
    }
}

impl Connections {
    /// A place for a new connection from `client` (`None`: a trusted forwarder, not counted per
    /// client), or why there is none. When the proxy is full, the oldest connection still in its
    /// handshake is evicted to make room.
    pub fn open(
        self: &Arc<Self>,
        client: IpAddr,
        exempt: bool,
        bounds: &ClientBounds,
    ) -> Result<Slot, Refused> {
        let mut state = lock(&self.state);
        let from_client = state.by_client.get(&client).copied().unwrap_or(0);
        if !exempt && from_client >= bounds.max_connections_per_client {
            return Err(Refused::Client(from_client));
        }
        if state.total >= bounds.max_connections {
            // An evicted connection holds its descriptor until its task runs and drops it; on a
            // starved machine those tasks lag the accept loop. Past `EVICTING` of them a new
            // connection is refused (closed at once) rather than evict another, so descriptors
            // stay within `max_connections + EVICTING` however far they lag.
            if state.total >= bounds.max_connections + EVICTING {
                return Err(Refused::Full(state.total));
            }
            // The place of the oldest silent connection; it closes when its task sees this.
            let Some((_, evict)) = state.handshaking.pop_front() else {
                return Err(Refused::Full(state.total));
            };
            let _ = evict.send(());
        }
        state.total += 1;
        *state.by_client.entry(client).or_insert(0) += 1;
        let id = state.next;
        state.next += 1;
        let (evict, evicted) = oneshot::channel();
        state.handshaking.push_back((id, evict));
        drop(state);
        Ok(Slot { connections: Arc::clone(self), client, id, evicted: Some(evicted) })
    }

    /// Connections open now.
    pub fn open_count(&self) -> usize {
        lock(&self.state).total
    }
}

// BUFFERED BYTES
// ================================================================================================

/// Request bytes the proxy holds.
#[derive(Default)]
pub struct Budget {
    state: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// Bytes reserved for one request; dropping it returns them.
pub struct Reservation {
    budget: Arc<Budget>,
    client: IpAddr,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = lock(&self.budget.state);
        state.total -= self.bytes;
        if let Some(held) = state.by_client.get_mut(&self.client) {
            *held -= self.bytes;
            if *held == 0 {
                state.by_client.remove(&self.client);
            }
        }
    }
}

/// Why bytes could not be reserved: what is held, and the setting that bounds it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    /// This client's requests hold `max_buffered_per_client`.
    #[error(
        "the proxy holds {held} bytes of this client's requests and may hold {limit} \
         (max_buffered_per_client); retry when they finish"
    )]
    Client {
        /// Held for the client.
        held: usize,
        /// The setting.
        limit: usize,
    },
    /// All requests together hold `max_buffered`.
    #[error(
        "the proxy holds {held} bytes of requests and may hold {limit} (max_buffered); retry \
         later or on another proxy"
    )]
    Total {
        /// Held in all.
        held: usize,
        /// The setting.
        limit: usize,
    },
}

impl Budget {
    /// Reserves `bytes` for a request of `client`, or says which bound it would pass.
    pub fn reserve(
        self: &Arc<Self>,
        client: IpAddr,
        bytes: usize,
        bounds: &ClientBounds,
    ) -> Result<Reservation, OverBudget> {
        let mut state = lock(&self.state);
        let held = state.by_client.get(&client).copied().unwrap_or(0);
        if held + bytes > bounds.max_buffered_per_client {
            return Err(OverBudget::Client { held, limit: bounds.max_buffered_per_client });
        }
        if state.total + bytes > bounds.max_buffered {
            return Err(OverBudget::Total { held: state.total, limit: bounds.max_buffered });
        }
        state.total += bytes;
        *state.by_client.entry(client).or_insert(0) += bytes;
        drop(state);
        Ok(Reservation { budget: Arc::clone(self), client, bytes })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        lock(&self.state).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> ClientBounds {
        ClientBounds {
            max_request_size: 100,
            request_timeout: std::time::Duration::from_secs(1),
            handshake_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(1),
            max_connections: 3,
            max_connections_per_client: 2,
            max_buffered: 250,
            max_buffered_per_client: 150,
        }
    }

    #[test]
    fn connections_are_bounded_per_client_and_in_all_and_silent_ones_make_room() {
        let connections = Arc::new(Connections::default());
        let (a, b, c) = (
            "192.0.2.1".parse().expect("address"),
            "192.0.2.2".parse().expect("address"),
            "192.0.2.3".parse().expect("address"),
        );
        let mut first = connections.open(a, false, &bounds()).expect("first");
        let second = connections.open(a, false, &bounds()).expect("second");
        assert_eq!(connections.open(a, false, &bounds()).err(), Some(Refused::Client(2)));
        // A forwarder is not counted per client.
        let forwarded = connections.open(a, true, &bounds()).expect("exempt");
        assert_eq!(connections.open_count(), 3);
        // Full: the oldest connection still in its handshake is evicted.
        let mut evicted = first.evicted.take().expect("handshaking");
        let fourth = connections.open(b, false, &bounds()).expect("room is made");
        assert!(evicted.try_recv().is_ok(), "the oldest silent connection was told to go");
        drop(first);
        assert_eq!(connections.open_count(), 3);
        let mut all: Vec<Slot> = Vec::new();
        drop(second);
        let mut slot = connections.open(c, false, &bounds()).expect("a freed place");
        slot.handshake_done();
        all.push(slot);
        drop(forwarded);
        drop(fourth);
        let mut slot = connections.open(c, false, &bounds()).expect("a freed place");
        slot.handshake_done();
        all.push(slot);
        let mut slot = connections.open(b, false, &bounds()).expect("a freed place");
        slot.handshake_done();
        all.push(slot);
        // Nobody left in a handshake: refused.
        assert_eq!(connections.open(a, false, &bounds()).err(), Some(Refused::Full(3)));
        drop(all);
        assert_eq!(connections.open_count(), 0);
    }

    /// Evicted connections whose tasks lag keep their descriptors: past `EVICTING` of them new
    /// connections are refused, so the open count never exceeds `max_connections + EVICTING`.
    #[test]
    fn evictions_not_yet_closed_are_bounded() {
        let connections = Arc::new(Connections::default());
        let bounds = ClientBounds { max_connections_per_client: 1_000, ..bounds() };
        let client = "192.0.2.1".parse().expect("address");
        let mut held = Vec::new();
        while let Ok(slot) = connections.open(client, false, &bounds) {
            held.push(slot);
        }
        assert_eq!(connections.open_count(), bounds.max_connections + EVICTING);
        let refused = connections.open(client, false, &bounds).err();
        assert_eq!(refused, Some(Refused::Full(bounds.max_connections + EVICTING)));
        // The evicted ones close: room again.
        held.drain(..EVICTING);
        assert!(connections.open(client, false, &bounds).is_ok());
    }

    #[test]
    fn bytes_are_reserved_per_client_and_in_all_and_returned_on_drop() {
        let budget = Arc::new(Budget::default());
        let (a, b, c) = (
            "192.0.2.1".parse().expect("address"),
            "192.0.2.2".parse().expect("address"),
            "192.0.2.3".parse().expect("address"),
        );
        let first = budget.reserve(a, 100, &bounds()).expect("first");
        assert_eq!(
            budget.reserve(a, 100, &bounds()).err(),
            Some(OverBudget::Client { held: 100, limit: 150 })
        );
        let _other = budget.reserve(b, 100, &bounds()).expect("another client");
        assert_eq!(
            budget.reserve(c, 100, &bounds()).err(),
            Some(OverBudget::Total { held: 200, limit: 250 })
        );
        drop(first);
        assert_eq!(budget.held(), 100);
        budget.reserve(a, 100, &bounds()).expect("returned on drop");
    }
}
