//! The per-client rate limit: a token bucket per client, where a client is an IPv4 address or an
//! IPv6 prefix (`rate_limit_ipv6_prefix`, /64 by default: one host's whole allocation), and the
//! client's address is the connection's peer unless that peer is a trusted forwarder
//! (`trusted_forwarders`), whose `X-Forwarded-For` then names it.
//!
//! Memory is bounded: at most [`MAX_CLIENTS`] buckets, pruned on a timer (a bucket idle long
//! enough to be full again carries no information). Clients beyond the bound while it is full
//! share one overflow bucket until the next prune, so a flood of addresses neither grows the
//! table nor escapes the limit. No request scans the table.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most (about 60 bytes each: under 8 MB).
pub const MAX_CLIENTS: usize = 100_000;

/// How often idle buckets are dropped.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// An address or a prefix (`10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        mask(canonical(ip), self.prefix) == self.addr
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = canonical(
            addr.parse::<IpAddr>()
                .map_err(|_| format!("`{text}` is not an IP address or ADDRESS/PREFIX"))?,
        );
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("`{text}`: the prefix must be 0 to {bits}"))?,
        };
        Ok(Network { addr: mask(addr, prefix), prefix })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// `ip` with all but its first `prefix` bits cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept =
                if prefix == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(prefix.min(32)))) };
            IpAddr::V4(kept.into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = if prefix == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - u32::from(prefix.min(128))))
            };
            IpAddr::V6(Ipv6Addr::from(kept))
        }
    }
}

/// The client a request comes from: the peer, or for a trusted forwarder the last address of
/// `X-Forwarded-For` that is not itself a trusted forwarder (the one the first untrusted hop
/// saw). A forwarder that sends no usable header is the client.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Network]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else { return peer };
    let mut client = peer;
    for hop in header.rsplit(',') {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else { break };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// Token buckets by client.
#[derive(Default)]
pub struct RateLimiter {
    state: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    by_client: HashMap<IpAddr, Bucket>,
    overflow: Option<Bucket>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl RateLimiter {
    /// The key `ip` is limited under: itself, or its IPv6 prefix.
    pub fn key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
        match canonical(ip) {
            v4 @ IpAddr::V4(_) => v4,
            v6 => mask(v6, ipv6_prefix),
        }
    }

    /// Whether client `key` may make a request now, at `per_second`.
    pub fn allow(&self, key: IpAddr, per_second: u32) -> bool {
        let rate = f64::from(per_second.max(1));
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = state.by_client.len() >= MAX_CLIENTS;
        if full && !state.by_client.contains_key(&key) {
            return state
                .overflow
                .get_or_insert(Bucket { tokens: rate, last: now })
                .take(rate, now);
        }
        state.by_client.entry(key).or_insert(Bucket { tokens: rate, last: now }).take(rate, now)
    }

    /// Drops the buckets that are full again (idle for a second or more at any rate ≥ 1/s).
    pub fn prune(&self) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.by_client.retain(|_, b| now.duration_since(b.last) < PRUNE_INTERVAL);
        if state.overflow.is_some_and(|b| now.duration_since(b.last) >= PRUNE_INTERVAL) {
            state.overflow = None;
        }
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).by_client.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn ipv6_clients_are_keyed_by_prefix_and_ipv4_by_address() {
        let limiter = RateLimiter::default();
        let key = |text| RateLimiter::key(ip(text), 64);
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(RateLimiter::key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        // One request per second: a second address of the same /64 is refused.
        assert!(limiter.allow(key("2001:db8:1:2::1"), 1));
        assert!(!limiter.allow(key("2001:db8:1:2::2"), 1));
        assert!(limiter.allow(key("2001:db8:1:3::1"), 1));
    }

    #[test]
    fn a_hundred_thousand_and_more_clients_stay_bounded_and_limited() {
        let limiter = RateLimiter::default();
        for n in 0..(MAX_CLIENTS as u128 + 20_000) {
            // Distinct /64s.
            let addr = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | (n << 64)));
            limiter.allow(RateLimiter::key(addr, 64), 1);
        }
        assert_eq!(limiter.len(), MAX_CLIENTS);
        // Clients beyond the bound share the overflow bucket: the 20,000 beyond it got one
        // request through between them, not one each.
        assert!(!limiter.allow(ip("198.51.100.1"), 1));
        limiter.prune();
        assert_eq!(limiter.len(), MAX_CLIENTS, "the buckets are not idle yet");
    }

    #[test]
    fn idle_buckets_are_pruned() {
        let limiter = RateLimiter::default();
        limiter.allow(ip("192.0.2.1"), 5);
        std::thread::sleep(PRUNE_INTERVAL);
        limiter.prune();
        assert!(limiter.is_empty());
    }

    #[test]
    fn a_forwarded_address_counts_only_from_a_trusted_forwarder() {
        let trusted: Vec<Network> =
            ["10.0.0.0/8", "2001:db8::1"].iter().map(|t| t.parse().expect("network")).collect();
        let xff = Some("203.0.113.9, 198.51.100.4, 10.1.1.1");
        assert_eq!(client_address(ip("192.0.2.1"), xff, &trusted), ip("192.0.2.1"));
        assert_eq!(client_address(ip("10.0.0.2"), xff, &trusted), ip("198.51.100.4"));
        assert_eq!(
            client_address(ip("2001:db8::1"), Some("198.51.100.4"), &trusted),
            ip("198.51.100.4")
        );
        assert_eq!(client_address(ip("10.0.0.2"), None, &trusted), ip("10.0.0.2"));
        assert_eq!(client_address(ip("10.0.0.2"), Some("garbage"), &trusted), ip("10.0.0.2"));
        assert_eq!(client_address(ip("10.0.0.2"), xff, &[]), ip("10.0.0.2"));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nonsense".parse::<Network>().is_err());
    }
}
