//! The PROXY protocol (`HAProxy`'s, versions 1 and 2): how an L4 load balancer that forwards a
//! TCP connection names the client it came from, in a header before the connection's own bytes.
//!
//! With `proxy_protocol = true`, a connection from a `trusted_forwarders` address must begin with
//! such a header; its source address then counts as the client (rate limit, logs), exactly as a
//! trusted `X-Forwarded-For` does for an HTTP load balancer. A `LOCAL` header (the balancer's
//! own health check) or an `UNKNOWN` one leaves the forwarder as the client. A connection from
//! anyone else is never read for a header, so a client cannot name itself someone else.
//!
//! The header is consumed and nothing past it: the stream is then handed on as if it had begun
//! after it. It must arrive whole within `handshake_timeout`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest version 1 header, `\r\n` included (the specification's figure).
const V1_MAX: usize = 107;

/// What a version 2 header begins with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 2 header accepted: the fixed 16 bytes, the addresses (36 at most) and
/// room for the TLVs balancers add (TLS details, a connection id).
const V2_MAX: usize = 4096;

/// A header read off a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A forwarded connection, from this client.
    Forwarded(SocketAddr),
    /// The forwarder's own connection (`LOCAL`), or a client address it does not give
    /// (`UNKNOWN`, a Unix socket): the forwarder stays the client.
    Local,
}

/// What the first bytes of a connection hold so far.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole header of this many bytes.
    Complete(usize, Header),
    /// The start of a header: more bytes are needed.
    Incomplete,
}

/// Parses the header at the start of `bytes`; an error says why they are not one.
fn parse(bytes: &[u8]) -> Result<Parsed, &'static str> {
    let prefix_of = |whole: &[u8]| bytes.len() < whole.len() && whole.starts_with(bytes);
    if bytes.starts_with(b"PROXY ") {
        parse_v1(bytes)
    } else if bytes.starts_with(V2_SIGNATURE) {
        parse_v2(bytes)
    } else if prefix_of(b"PROXY ") || prefix_of(V2_SIGNATURE) {
        Ok(Parsed::Incomplete)
    } else {
        Err("it does not begin with a PROXY protocol header")
    }
}

/// `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n`, `PROXY TCP6 …`, `PROXY UNKNOWN …`.
fn parse_v1(bytes: &[u8]) -> Result<Parsed, &'static str> {
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|pair| pair == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            Err("its version 1 header has no end within 107 bytes")
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line =
        std::str::from_utf8(&bytes[..end]).map_err(|_| "its version 1 header is not text")?;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", family @ ("TCP4" | "TCP6"), source, _destination, port, _destination_port] => {
            let ip: IpAddr = source.parse().map_err(|_| "its version 1 source address is bad")?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err("its version 1 source address is not of the family it names");
            }
            let port: u16 = port.parse().map_err(|_| "its version 1 source port is bad")?;
            Header::Forwarded(SocketAddr::new(ip, port))
        }
        _ => return Err("its version 1 header is malformed"),
    };
    Ok(Parsed::Complete(end + 2, header))
}

/// The binary header: signature, version and command, family, length, addresses, TLVs.
fn parse_v2(bytes: &[u8]) -> Result<Parsed, &'static str> {
    if bytes.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    if bytes[12] >> 4 != 2 {
        return Err("its version 2 header has another version number");
    }
    let length = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if length > V2_MAX {
        return Err("its version 2 header is longer than 4096 bytes");
    }
    if bytes.len() < length {
        return Ok(Parsed::Incomplete);
    }
    let addresses = &bytes[16..length];
    // Command 0 is LOCAL, 1 PROXY; family 1 is IPv4, 2 IPv6 (others, such as Unix sockets, name
    // no address the proxy could use).
    let header = match (bytes[12] & 0x0f, bytes[13] >> 4) {
        (1, 1) => {
            if addresses.len() < 12 {
                return Err("its version 2 header is too short for IPv4 addresses");
            }
            let ip = Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
            let port = u16::from_be_bytes([addresses[8], addresses[9]]);
            Header::Forwarded(SocketAddr::new(IpAddr::V4(ip), port))
        }
        (1, 2) => {
            if addresses.len() < 36 {
                return Err("its version 2 header is too short for IPv6 addresses");
            }
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&addresses[..16]);
            let port = u16::from_be_bytes([addresses[32], addresses[33]]);
            Header::Forwarded(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        (0 | 1, _) => Header::Local,
        _ => return Err("its version 2 header has an unknown command"),
    };
    Ok(Parsed::Complete(length, header))
}

/// Reads the PROXY protocol header at the start of `tcp`, and nothing past it, within
/// `timeout`. An error says why the connection is to be closed.
pub async fn read_header(tcp: &mut TcpStream, timeout: Duration) -> Result<Header, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; V2_MAX];
    let mut pause = Duration::from_millis(1);
    loop {
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(0)) => return Err("it closed before its PROXY protocol header".to_owned()),
            Ok(Ok(n)) => n,
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => {
                return Err(
                    "its PROXY protocol header did not arrive within handshake_timeout".to_owned()
                );
            }
        };
        match parse(&buf[..n]).map_err(str::to_owned)? {
            Parsed::Complete(length, header) => {
                tcp.read_exact(&mut buf[..length]).await.map_err(|err| err.to_string())?;
                return Ok(header);
            }
            // Part of the header: the rest is on its way (peek returns at once while bytes wait).
            Parsed::Incomplete => {
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(
                        "its PROXY protocol header did not arrive within handshake_timeout"
                            .to_owned(),
                    );
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend([0x20 | command, family]);
        bytes.extend(u16::try_from(addresses.len()).expect("short").to_be_bytes());
        bytes.extend(addresses);
        bytes
    }

    #[test]
    fn version_1_names_the_source_and_unknown_leaves_the_forwarder() {
        let line = b"PROXY TCP4 198.51.100.7 192.0.2.1 56324 50051\r\nPRI * HTTP/2.0";
        assert_eq!(
            parse(line),
            Ok(Parsed::Complete(47, Header::Forwarded("198.51.100.7:56324".parse().expect("ip"))))
        );
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 50051\r\n";
        assert_eq!(
            parse(line),
            Ok(Parsed::Complete(
                line.len(),
                Header::Forwarded("[2001:db8::7]:4000".parse().expect("ip"))
            ))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Parsed::Complete(15, Header::Local)));
        assert_eq!(parse(b"PROXY TCP4 198.51"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert!(parse(b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n").is_err(), "family mismatch");
        assert!(parse(b"PROXY TCP4 198.51.100.7 192.0.2.1 99999 1\r\n").is_err(), "port");
        assert!(parse(b"PROXY TCP4 198.51.100.7\r\n").is_err(), "fields missing");
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(20)).is_err(), "no end");
        assert!(parse(b"POST / HTTP/1.1\r\n").is_err(), "no header at all");
        assert!(parse(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").is_err(), "no header at all");
    }

    #[test]
    fn version_2_names_the_source_and_local_leaves_the_forwarder() {
        let ipv4 = [198, 51, 100, 7, 192, 0, 2, 1, 0xdc, 0x04, 0xc3, 0x53];
        let header = v2(1, 0x11, &ipv4);
        assert_eq!(
            parse(&header),
            Ok(Parsed::Complete(28, Header::Forwarded("198.51.100.7:56324".parse().expect("ip"))))
        );
        let mut ipv6 = "2001:db8::7".parse::<Ipv6Addr>().expect("ip").octets().to_vec();
        ipv6.extend([0; 16]);
        ipv6.extend([0x0f, 0xa0, 0, 0]);
        ipv6.extend([0x04, 0, 1, 0xff]); // a TLV, skipped
        let header = v2(1, 0x21, &ipv6);
        assert_eq!(
            parse(&header),
            Ok(Parsed::Complete(
                header.len(),
                Header::Forwarded("[2001:db8::7]:4000".parse().expect("ip"))
            ))
        );
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Parsed::Complete(16, Header::Local)));
        assert_eq!(parse(&header[..20]), Ok(Parsed::Incomplete));
        assert_eq!(parse(&V2_SIGNATURE[..5]), Ok(Parsed::Incomplete));
        assert!(parse(&v2(1, 0x11, &ipv4[..8])).is_err(), "too short for its family");
        assert!(parse(&v2(7, 0x11, &ipv4)).is_err(), "unknown command");
        let mut long = v2(1, 0x11, &ipv4);
        long[14..16].copy_from_slice(&5000u16.to_be_bytes());
        assert!(parse(&long).is_err(), "over 4096 bytes");
    }
}
