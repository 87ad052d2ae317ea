//! The few pieces of the DNS wire format (RFC 1035, 3596) the per-sandbox filter needs, written
//! by hand: the guest is hostile, so every length is bounded, every read is checked, nothing
//! recurses and nothing panics. Queries from the guest are parsed strictly (one question, no
//! compression); answers from the upstream are only walked to collect A/AAAA records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Largest DNS message the filter reads from a guest (UDP datagram or TCP frame).
pub const MAX_QUERY: usize = 1232;
/// Largest message accepted from the upstream resolver.
pub const MAX_RESPONSE: usize = 4096;
/// Most answer records walked in one response.
const MAX_RECORDS: usize = 128;
/// `A` record type.
pub const TYPE_A: u16 = 1;
/// `AAAA` record type.
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Response code: no error.
pub const RCODE_NOERROR: u8 = 0;
/// Response code: server failure.
pub const RCODE_SERVFAIL: u8 = 2;
/// Response code: name does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Response code: refused.
pub const RCODE_REFUSED: u8 = 5;
const HEADER: usize = 12;

/// Why a message was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than its structure says.
    Truncated,
    /// Structurally valid DNS, but not what this filter serves (responses, other opcodes,
    /// several questions, compression in a query, …).
    Unsupported,
    /// A label or name over the RFC 1035 limits, or bytes outside a host name.
    BadName,
    /// The response does not answer the query that was sent.
    Mismatch,
}

/// A parsed guest query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Message id.
    pub id: u16,
    /// The question's name, lower case, without the trailing dot (`""` for the root).
    pub name: String,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// Recursion desired.
    pub rd: bool,
    /// End of the question section in the message.
    pub question_end: usize,
}

fn u16_at(b: &[u8], i: usize) -> Result<u16, DnsError> {
    let s = b.get(i..i + 2).ok_or(DnsError::Truncated)?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], i: usize) -> Result<u32, DnsError> {
    let s = b.get(i..i + 4).ok_or(DnsError::Truncated)?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads an uncompressed name at `i`; returns it (lower case, no trailing dot) and the offset
/// after it.
fn read_plain_name(b: &[u8], mut i: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let mut wire_len = 0usize;
    loop {
        let len = *b.get(i).ok_or(DnsError::Truncated)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            // Compression (or the reserved 0x40/0x80 forms) has no place in a question.
            return Err(DnsError::Unsupported);
        }
        wire_len += len + 1;
        if wire_len > 254 {
            return Err(DnsError::BadName);
        }
        let label = b.get(i..i + len).ok_or(DnsError::Truncated)?;
        if !label
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        {
            return Err(DnsError::BadName);
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|c| c.to_ascii_lowercase() as char));
        i += len;
    }
    Ok((name, i))
}

/// Skips a possibly compressed name at `i` and returns the offset after it. A pointer ends a
/// name, so this never follows one and cannot loop.
fn skip_name(b: &[u8], mut i: usize) -> Result<usize, DnsError> {
    let mut labels = 0;
    loop {
        let len = *b.get(i).ok_or(DnsError::Truncated)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(i + 1),
            0x00 => {
                i += 1 + len;
                labels += 1;
                if labels > 127 || i > b.len() {
                    return Err(DnsError::BadName);
                }
            }
            0xc0 => {
                b.get(i + 1).ok_or(DnsError::Truncated)?;
                return Ok(i + 2);
            }
            _ => return Err(DnsError::BadName),
        }
    }
}

/// Parses a guest's query: a standard query (opcode 0) with exactly one question, no answers or
/// authority records and at most one additional record (EDNS).
pub fn parse_query(b: &[u8]) -> Result<Query, DnsError> {
    if b.len() > MAX_QUERY {
        return Err(DnsError::Unsupported);
    }
    if b.len() < HEADER {
        return Err(DnsError::Truncated);
    }
    let id = u16_at(b, 0)?;
    let flags = u16_at(b, 2)?;
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    if qr || opcode != 0 {
        return Err(DnsError::Unsupported);
    }
    let (qd, an, ns, ar) = (u16_at(b, 4)?, u16_at(b, 6)?, u16_at(b, 8)?, u16_at(b, 10)?);
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return Err(DnsError::Unsupported);
    }
    let (name, i) = read_plain_name(b, HEADER)?;
    let qtype = u16_at(b, i)?;
    let qclass = u16_at(b, i + 2)?;
    Ok(Query {
        id,
        name,
        qtype,
        qclass,
        rd: flags & 0x0100 != 0,
        question_end: i + 4,
    })
}

/// A response carrying only the query's question and `rcode` (NXDOMAIN, SERVFAIL, REFUSED).
pub fn reply_with_rcode(query: &[u8], q: &Query, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.question_end);
    out.extend_from_slice(&q.id.to_be_bytes());
    let flags: u16 = 0x8000 | if q.rd { 0x0100 } else { 0 } | 0x0080 | u16::from(rcode & 0xf);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&query[HEADER..q.question_end]);
    out
}

/// What the filter needs from an upstream response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// Response code.
    pub rcode: u8,
    /// Truncated (TC bit).
    pub truncated: bool,
    /// Every A/AAAA record of the answer section, with its TTL in seconds.
    pub addrs: Vec<(IpAddr, u32)>,
}

/// Checks that `resp` answers `q` (same id, a response, same single question) and collects the
/// addresses of its answer section.
pub fn parse_answer(resp: &[u8], q: &Query) -> Result<Answer, DnsError> {
    if resp.len() > MAX_RESPONSE {
        return Err(DnsError::Unsupported);
    }
    if resp.len() < HEADER {
        return Err(DnsError::Truncated);
    }
    let flags = u16_at(resp, 2)?;
    if u16_at(resp, 0)? != q.id || flags & 0x8000 == 0 || u16_at(resp, 4)? != 1 {
        return Err(DnsError::Mismatch);
    }
    let an = u16_at(resp, 6)? as usize;
    let (name, mut i) = match read_plain_name(resp, HEADER) {
        Ok(v) => v,
        Err(DnsError::Truncated) => return Err(DnsError::Truncated),
        Err(_) => return Err(DnsError::Mismatch),
    };
    if name != q.name || u16_at(resp, i)? != q.qtype || u16_at(resp, i + 2)? != q.qclass {
        return Err(DnsError::Mismatch);
    }
    i += 4;
    let mut a = Answer {
        rcode: (flags & 0xf) as u8,
        truncated: flags & 0x0200 != 0,
        addrs: Vec::new(),
    };
    for _ in 0..an.min(MAX_RECORDS) {
        i = skip_name(resp, i)?;
        let ty = u16_at(resp, i)?;
        let class = u16_at(resp, i + 2)?;
        let ttl = u32_at(resp, i + 4)?;
        let rdlen = u16_at(resp, i + 8)? as usize;
        let rdata = resp
            .get(i + 10..i + 10 + rdlen)
            .ok_or(DnsError::Truncated)?;
        i += 10 + rdlen;
        // A TTL with the top bit set is treated as 0 (RFC 2181 §8).
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        if class != CLASS_IN {
            continue;
        }
        match (ty, rdlen) {
            (TYPE_A, 4) => {
                let o: [u8; 4] = rdata.try_into().map_err(|_| DnsError::Truncated)?;
                a.addrs.push((IpAddr::V4(Ipv4Addr::from(o)), ttl));
            }
            (TYPE_AAAA, 16) => {
                let o: [u8; 16] = rdata.try_into().map_err(|_| DnsError::Truncated)?;
                a.addrs.push((IpAddr::V6(Ipv6Addr::from(o)), ttl));
            }
            _ => {}
        }
    }
    Ok(a)
}

/// Encodes `name` (dotted, no trailing dot) as wire labels. For clients and test servers.
fn encode_name(name: &str, out: &mut Vec<u8>) -> Result<(), DnsError> {
    if name.len() > 253 {
        return Err(DnsError::BadName);
    }
    for label in name.split('.').filter(|l| !l.is_empty()) {
        if label.len() > 63 {
            return Err(DnsError::BadName);
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

/// A recursive query for `name`/`qtype` (class IN). For clients and tests.
pub fn build_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, DnsError> {
    let mut out = Vec::with_capacity(32 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    encode_name(name, &mut out)?;
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

/// An authoritative answer to `query` holding `addrs` (those matching the question's type) with
/// `ttl`, or NXDOMAIN when `addrs` is empty. For test servers.
pub fn build_answer(query: &[u8], q: &Query, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
    if addrs.is_empty() {
        return reply_with_rcode(query, q, RCODE_NXDOMAIN);
    }
    let recs: Vec<&IpAddr> = addrs
        .iter()
        .filter(|a| match a {
            IpAddr::V4(_) => q.qtype == TYPE_A,
            IpAddr::V6(_) => q.qtype == TYPE_AAAA,
        })
        .collect();
    let mut out = reply_with_rcode(query, q, RCODE_NOERROR);
    out[2] |= 0x04; // AA
    out[6..8].copy_from_slice(&(recs.len() as u16).to_be_bytes());
    for a in recs {
        out.extend_from_slice(&[0xc0, HEADER as u8]); // pointer to the question's name
        let (ty, data) = match a {
            IpAddr::V4(v) => (TYPE_A, v.octets().to_vec()),
            IpAddr::V6(v) => (TYPE_AAAA, v.octets().to_vec()),
        };
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// The response code of a message (for clients and tests).
pub fn rcode(resp: &[u8]) -> Option<u8> {
    resp.get(3).map(|f| f & 0xf)
}

/// Normalizes a policy domain: lower case, no trailing dot.
fn norm(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// True if `name` (as parsed by [`parse_query`]) matches one of `domains`: an exact name, or
/// `*.suffix`, which matches every name strictly below `suffix` (not `suffix` itself).
pub fn name_allowed(domains: &[String], name: &str) -> bool {
    domains.iter().any(|d| {
        let d = norm(d);
        match d.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix)
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
            _ => !d.is_empty() && d == name,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trip_and_answer() {
        let qb = build_query(0x1234, "Api.Example.COM.", TYPE_A).unwrap();
        let q = parse_query(&qb).unwrap();
        assert_eq!(q.name, "api.example.com");
        assert_eq!((q.id, q.qtype, q.qclass, q.rd), (0x1234, TYPE_A, 1, true));
        let a = build_answer(
            &qb,
            &q,
            &[
                "203.0.113.5".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
            60,
        );
        let ans = parse_answer(&a, &q).unwrap();
        assert_eq!(ans.rcode, RCODE_NOERROR);
        assert_eq!(ans.addrs, vec![("203.0.113.5".parse().unwrap(), 60)]);
        let nx = reply_with_rcode(&qb, &q, RCODE_NXDOMAIN);
        assert_eq!(rcode(&nx), Some(RCODE_NXDOMAIN));
        assert_eq!(parse_answer(&nx, &q).unwrap().addrs, vec![]);
        // A response to another query is refused.
        let other = parse_query(&build_query(0x1234, "evil.com", TYPE_A).unwrap()).unwrap();
        assert_eq!(parse_answer(&a, &other), Err(DnsError::Mismatch));
    }

    #[test]
    fn hostile_input_never_panics() {
        let qb = build_query(7, "a.b.c", TYPE_AAAA).unwrap();
        let q = parse_query(&qb).unwrap();
        let good = build_answer(&qb, &q, &["2001:db8::1".parse().unwrap()], 5);
        // Every truncation and every single-byte corruption of both messages.
        for msg in [&qb, &good] {
            for n in 0..msg.len() {
                let _ = parse_query(&msg[..n]);
                let _ = parse_answer(&msg[..n], &q);
            }
            for i in 0..msg.len() {
                for v in [0u8, 0x3f, 0x40, 0xc0, 0xff] {
                    let mut m = msg.to_vec();
                    m[i] = v;
                    let _ = parse_query(&m);
                    let _ = parse_answer(&m, &q);
                }
            }
        }
        // Pointer loops, huge counts, oversize.
        let mut evil = good.clone();
        evil[6..8].copy_from_slice(&0xffffu16.to_be_bytes());
        evil.extend_from_slice(&[0xc0, 0x0c]);
        let _ = parse_answer(&evil, &q);
        assert!(parse_query(&vec![0u8; MAX_QUERY + 1]).is_err());
        let mut long = vec![0u8; 12];
        long[5] = 1;
        for _ in 0..200 {
            long.extend_from_slice(&[2, b'a', b'b']);
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&long), Err(DnsError::BadName));
        // Compression in a question, responses and bad characters are refused.
        let mut c = qb.clone();
        c[12] = 0xc0;
        assert!(parse_query(&c).is_err());
        assert_eq!(parse_query(&good), Err(DnsError::Unsupported));
        let bad = build_query(1, "a b.com", TYPE_A).unwrap();
        assert_eq!(parse_query(&bad), Err(DnsError::BadName));
    }

    #[test]
    fn names_match_exactly_or_below_a_wildcard() {
        let d = vec!["Example.com.".to_string(), "*.svc.test".to_string()];
        assert!(name_allowed(&d, "example.com"));
        assert!(!name_allowed(&d, "www.example.com"));
        assert!(!name_allowed(&d, "badexample.com"));
        assert!(name_allowed(&d, "a.svc.test"));
        assert!(name_allowed(&d, "b.a.svc.test"));
        assert!(!name_allowed(&d, "svc.test"));
        assert!(!name_allowed(&d, "xsvc.test"));
        assert!(!name_allowed(&["*.".into(), "".into()], "com"));
        assert!(!name_allowed(&d, ""));
    }
}
