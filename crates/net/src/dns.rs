//! The few pieces of the DNS wire format (RFC 1035, 3596, 6891) the per-sandbox filter needs.
//! Messages are read with `hickory-proto`'s bounds-checked decoder, and a guest's question name
//! with its name reader (pointer loops, overlong names and labels and short reads are its
//! refusals); what this module adds is the filter's own strictness. The guest is hostile, so
//! the header's counts are checked or capped before any section is read and nothing panics.
//! Queries from the guest are parsed strictly (one question, no compression, host-name bytes
//! only, at most an EDNS record, nothing after it) and never forwarded: the upstream gets a query
//! rebuilt from the parsed question ([`upstream_query`]), so no byte the guest chose but the name
//! and type reaches it. Answers from the upstream are only walked to collect A/AAAA records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Header, MessageType, OpCode};
use hickory_proto::rr::Name;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, DecodeError};
use hickory_proto::{ProtoError, ProtoErrorKind};

/// Largest DNS message the filter reads from a guest (UDP datagram or TCP frame).
pub const MAX_QUERY: usize = 1232;
/// Largest message accepted from the upstream resolver.
pub const MAX_RESPONSE: usize = 4096;
/// Most answer records walked in one response (documented on [`parse_answer`]: keep in step).
const MAX_RECORDS: u16 = 128;
/// `A` record type.
pub const TYPE_A: u16 = 1;
/// `AAAA` record type.
pub const TYPE_AAAA: u16 = 28;
/// EDNS pseudo-record type (RFC 6891).
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The UDP payload size the filter's own EDNS record announces upstream (the DNS flag day 2020
/// value: no fragmentation on any usual path).
pub const EDNS_PAYLOAD: u16 = 1232;
/// The question types the filter forwards (class IN only): what resolvers and everyday tools
/// ask for. A and AAAA (every resolver), CNAME, SRV (apt asks `_http._tcp` first), HTTPS and
/// SVCB (curl, browsers), MX and TXT (mail and verification tools, Go's resolver), PTR (reverse
/// lookups: ssh, ping), NS, SOA and CAA (`dig`, `host`, ACME clients). Everything else is
/// refused: ANY (amplification; RFC 8482 retires it), NULL (the tunnelling tools' favourite),
/// zone transfers and other meta-queries, and DNSSEC records (the filter asks without the DO
/// bit, so a validating resolver in the guest gets nothing to validate either way).
pub const FORWARDED_TYPES: [u16; 12] = [1, 2, 5, 6, 12, 15, 16, 28, 33, 64, 65, 257];
/// Response code: no error.
pub const RCODE_NOERROR: u8 = 0;
/// Response code: the query is malformed.
pub const RCODE_FORMERR: u8 = 1;
/// Response code: server failure.
pub const RCODE_SERVFAIL: u8 = 2;
/// Response code: name does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Response code: not implemented (an opcode other than QUERY).
pub const RCODE_NOTIMP: u8 = 4;
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
    /// Bytes after the last record the header announces.
    Trailing,
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
    /// The UDP payload size of the query's EDNS record, if it has one.
    pub edns: Option<u16>,
}

/// Running out of message is the only way the decoder's fixed-size reads fail.
fn short(_: DecodeError) -> DnsError {
    DnsError::Truncated
}

fn read_u8(d: &mut BinDecoder<'_>) -> Result<u8, DnsError> {
    Ok(d.read_u8().map_err(short)?.unverified(/* any value; checked where used */))
}

fn read_u16(d: &mut BinDecoder<'_>) -> Result<u16, DnsError> {
    Ok(d.read_u16().map_err(short)?.unverified(/* any value; checked where used */))
}

fn read_u32(d: &mut BinDecoder<'_>) -> Result<u32, DnsError> {
    Ok(d.read_u32().map_err(short)?.unverified(/* any value; checked where used */))
}

fn read_slice<'a>(d: &mut BinDecoder<'a>, len: u16) -> Result<&'a [u8], DnsError> {
    Ok(d.read_slice(len.into()).map_err(short)?.unverified(/* bounded by the message */))
}

/// A message's header; only a message shorter than one has none.
fn read_header(d: &mut BinDecoder<'_>) -> Result<Header, DnsError> {
    Header::read(d).map_err(|_| DnsError::Truncated)
}

/// Reads a (possibly compressed) name. A name over 255 bytes is [`DnsError::BadName`]; a
/// reserved label form, or a pointer that does not point before the name (the only way to
/// loop), [`DnsError::Unsupported`]; running out of message, [`DnsError::Truncated`].
fn read_name(d: &mut BinDecoder<'_>) -> Result<Name, DnsError> {
    Name::read(d).map_err(|e: ProtoError| match e.kind() {
        ProtoErrorKind::DomainNameTooLong(_) | ProtoErrorKind::LabelBytesTooLong(_) => {
            DnsError::BadName
        }
        ProtoErrorKind::UnrecognizedLabelCode(_)
        | ProtoErrorKind::PointerNotPriorToLabel { .. }
        | ProtoErrorKind::LabelOverlapsWithOther { .. } => DnsError::Unsupported,
        _ => DnsError::Truncated,
    })
}

/// Steps over a (possibly compressed) owner name without reading it: the filter needs only the
/// records' types and data. A pointer ends a name and is not followed, so nothing can loop, and
/// no name is built for each of up to [`MAX_RECORDS`] records.
fn skip_name(d: &mut BinDecoder<'_>) -> Result<(), DnsError> {
    // 127 labels and the root fill the 255 bytes a name may have.
    for _ in 0..=127 {
        match read_u8(d)? {
            0 => return Ok(()),
            len if len & 0xc0 == 0xc0 => return read_u8(d).map(drop),
            len if len & 0xc0 == 0 => drop(read_slice(d, len.into())?),
            _ => return Err(DnsError::BadName),
        }
    }
    Err(DnsError::BadName)
}

/// Reads a question name written out in full (no compression) and returns it as the filter
/// keeps it: lower case, no trailing dot, only letters, digits, `-` and `_`.
fn read_plain_name(d: &mut BinDecoder<'_>) -> Result<String, DnsError> {
    let start = d.index();
    let name = read_name(d)?;
    let mut text = Vec::with_capacity(name.len());
    let mut wire_len = 1;
    for label in name.iter() {
        if !label
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        {
            return Err(DnsError::BadName);
        }
        if wire_len > 1 {
            text.push(b'.');
        }
        text.extend_from_slice(label);
        wire_len += 1 + label.len();
    }
    // A pointer makes the name take fewer bytes than its labels: compression, which has no
    // place in a question.
    if d.index() - start != wire_len {
        return Err(DnsError::Unsupported);
    }
    text.make_ascii_lowercase();
    // Only ASCII gets here.
    String::from_utf8(text).map_err(|_| DnsError::BadName)
}

/// Reads a name and tells whether it is `name` (as [`parse_query`] gives it) written out in
/// full, up to letter case: a response repeats the question it answers.
fn repeats_name(d: &mut BinDecoder<'_>, name: &str) -> Result<bool, DnsError> {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let len = read_u8(d)?;
        if usize::from(len) != label.len()
            || !read_slice(d, len.into())?.eq_ignore_ascii_case(label.as_bytes())
        {
            return Ok(false);
        }
    }
    Ok(read_u8(d)? == 0)
}

/// Parses a guest's query: a standard query (opcode 0) with exactly one question, no answers or
/// authority records, at most one additional record, which must be a well-formed EDNS record,
/// and nothing after that.
pub fn parse_query(b: &[u8]) -> Result<Query, DnsError> {
    if b.len() > MAX_QUERY {
        return Err(DnsError::Unsupported);
    }
    let mut d = BinDecoder::new(b);
    let h = read_header(&mut d)?;
    if h.message_type() != MessageType::Query || h.op_code() != OpCode::Query {
        return Err(DnsError::Unsupported);
    }
    let ar = h.additional_count();
    if h.query_count() != 1 || h.answer_count() != 0 || h.name_server_count() != 0 || ar > 1 {
        return Err(DnsError::Unsupported);
    }
    let name = read_plain_name(&mut d)?;
    let qtype = read_u16(&mut d)?;
    let qclass = read_u16(&mut d)?;
    let question_end = d.index();
    let edns = match ar {
        0 => None,
        _ => Some(read_opt(&mut d)?),
    };
    if !d.is_empty() {
        return Err(DnsError::Trailing);
    }
    Ok(Query {
        id: h.id(),
        name,
        qtype,
        qclass,
        rd: h.recursion_desired(),
        question_end,
        edns,
    })
}

/// Reads an EDNS record: the root name, type OPT, version 0 and options that fill its data
/// exactly (their contents are not looked at: the upstream never sees them). Returns the UDP
/// payload size it announces.
fn read_opt(d: &mut BinDecoder<'_>) -> Result<u16, DnsError> {
    // name (1), type (2), payload size (2), extended rcode (1), version (1), flags (2),
    // data length (2), data.
    if read_u8(d)? != 0 || read_u16(d)? != TYPE_OPT {
        return Err(DnsError::Unsupported);
    }
    let size = read_u16(d)?;
    let _extended_rcode = read_u8(d)?;
    if read_u8(d)? != 0 {
        return Err(DnsError::Unsupported);
    }
    let _flags = read_u16(d)?;
    let len = read_u16(d)?;
    // Options: code (2), length (2), data; the last one ends where the record does.
    let mut options = BinDecoder::new(read_slice(d, len)?);
    while !options.is_empty() {
        let _code = read_u16(&mut options)?;
        let len = read_u16(&mut options)?;
        read_slice(&mut options, len)?;
    }
    Ok(size)
}

/// True if the filter forwards `q`'s question: class IN, a type of [`FORWARDED_TYPES`].
pub fn forwarded(q: &Query) -> bool {
    q.qclass == CLASS_IN && FORWARDED_TYPES.contains(&q.qtype)
}

/// The query the filter sends upstream for the guest's `q`, built from the parsed question
/// alone: id `id`, RD and nothing else in the header, one question (the name in lower case,
/// class IN), and the filter's own EDNS record ([`EDNS_PAYLOAD`], no flags, no options) when
/// the guest sent one, so that the answer has one exactly when the guest expects it.
pub fn upstream_query(id: u16, q: &Query) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + q.name.len() + 2 + 4 + 11);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(q.edns.is_some())]);
    push_name(&q.name, &mut out);
    out.extend_from_slice(&q.qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    if q.edns.is_some() {
        out.extend_from_slice(&[0]);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    out
}

/// The answer to the guest's query `guest` (parsed as `q`) made of the upstream's response
/// `resp` to [`upstream_query`], which [`parse_answer`] accepted: the guest's id, and its
/// question as it sent it, letter case included (resolvers compare it); the records are the
/// upstream's.
pub fn guest_reply(mut resp: Vec<u8>, guest: &[u8], q: &Query) -> Vec<u8> {
    resp[0..2].copy_from_slice(&q.id.to_be_bytes());
    // `parse_answer` checked that the response's question spans the same bytes.
    if let (Some(to), Some(from)) = (
        resp.get_mut(HEADER..q.question_end),
        guest.get(HEADER..q.question_end),
    ) {
        to.copy_from_slice(from);
    }
    resp
}

/// Largest answer the guest takes over UDP: 512 bytes, or what its EDNS record announces.
pub fn udp_limit(q: &Query) -> usize {
    usize::from(q.edns.unwrap_or(512).max(512))
}

/// An empty answer with TC set, for an answer larger than [`udp_limit`]: the guest asks again
/// over TCP.
pub fn reply_truncated(query: &[u8], q: &Query) -> Vec<u8> {
    let mut out = reply_with_rcode(query, q, RCODE_NOERROR);
    out[2] |= 0x02;
    out
}

/// The answer to a message [`parse_query`] refused: the header alone (its id, opcode and RD
/// bit; no records) with FORMERR, or NOTIMP for an opcode other than QUERY. `None` for a
/// message too short for a header or that is itself a response: those get no answer.
pub fn reply_malformed(msg: &[u8]) -> Option<Vec<u8>> {
    let header = msg.get(..HEADER)?;
    let flags = u16::from_be_bytes([header[2], header[3]]);
    if flags & 0x8000 != 0 {
        return None;
    }
    let opcode = flags & 0x7800;
    let rcode = if opcode != 0 {
        RCODE_NOTIMP
    } else {
        RCODE_FORMERR
    };
    let flags = 0x8000 | opcode | (flags & 0x0100) | 0x0080 | u16::from(rcode);
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(&header[..2]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
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
/// addresses of its answer section (the first 128 records; the rest of the message
/// is not read).
pub fn parse_answer(resp: &[u8], q: &Query) -> Result<Answer, DnsError> {
    if resp.len() > MAX_RESPONSE {
        return Err(DnsError::Unsupported);
    }
    let mut d = BinDecoder::new(resp);
    let h = read_header(&mut d)?;
    if h.id() != q.id || h.message_type() != MessageType::Response || h.query_count() != 1 {
        return Err(DnsError::Mismatch);
    }
    if !repeats_name(&mut d, &q.name)?
        || d.index() + 4 != q.question_end
        || read_u16(&mut d)? != q.qtype
        || read_u16(&mut d)? != q.qclass
    {
        return Err(DnsError::Mismatch);
    }
    let mut a = Answer {
        rcode: h.response_code().low(),
        truncated: h.truncated(),
        addrs: Vec::new(),
    };
    for _ in 0..h.answer_count().min(MAX_RECORDS) {
        skip_name(&mut d)?;
        let ty = read_u16(&mut d)?;
        let class = read_u16(&mut d)?;
        let ttl = read_u32(&mut d)?;
        let len = read_u16(&mut d)?;
        let rdata = read_slice(&mut d, len)?;
        // A TTL with the top bit set is treated as 0 (RFC 2181 §8).
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        if class != CLASS_IN {
            continue;
        }
        let addr = match ty {
            TYPE_A => <[u8; 4]>::try_from(rdata)
                .ok()
                .map(Ipv4Addr::from)
                .map(IpAddr::V4),
            TYPE_AAAA => <[u8; 16]>::try_from(rdata)
                .ok()
                .map(Ipv6Addr::from)
                .map(IpAddr::V6),
            _ => None,
        };
        a.addrs.extend(addr.map(|ip| (ip, ttl)));
    }
    Ok(a)
}

/// Encodes `name` (dotted, no trailing dot) as wire labels. For clients and test servers.
fn encode_name(name: &str, out: &mut Vec<u8>) -> Result<(), DnsError> {
    if name.len() > 253 || name.split('.').any(|l| l.len() > 63) {
        return Err(DnsError::BadName);
    }
    push_name(name, out);
    Ok(())
}

/// Writes `name`'s labels, which must be within the RFC 1035 limits (a parsed name is).
fn push_name(name: &str, out: &mut Vec<u8>) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
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
        let with_opt = guest(TYPE_A, 1, &OPT);
        // Every truncation and every single-byte corruption of the three messages.
        let all = |m: &[u8]| {
            if let Ok(q) = parse_query(m) {
                let _ = upstream_query(1, &q);
            }
            let _ = reply_malformed(m);
            let _ = parse_answer(m, &q);
        };
        for msg in [&qb, &good, &with_opt] {
            for n in 0..msg.len() {
                all(&msg[..n]);
            }
            for i in 0..msg.len() {
                for v in [0u8, 0x3f, 0x40, 0xc0, 0xff] {
                    let mut m = msg.to_vec();
                    m[i] = v;
                    all(&m);
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

    /// A query for `a.b.c`/AAAA with its question count set to `qd` and `extra` appended.
    fn with_questions(qd: u16, extra: &[u8]) -> Vec<u8> {
        let mut m = build_query(7, "a.b.c", TYPE_AAAA).unwrap();
        m[4..6].copy_from_slice(&qd.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    #[test]
    fn a_query_must_ask_exactly_one_question() {
        let second = b"\x01d\x00\x00\x01\x00\x01";
        assert_eq!(
            parse_query(&with_questions(2, second)),
            Err(DnsError::Unsupported)
        );
        assert_eq!(
            parse_query(&with_questions(0, &[])),
            Err(DnsError::Unsupported)
        );
        assert_eq!(
            parse_query(&with_questions(0xffff, &[])),
            Err(DnsError::Unsupported)
        );
        assert!(parse_query(&with_questions(1, &[])).is_ok());
    }

    #[test]
    fn compression_pointers_cannot_loop_or_enter_a_question() {
        // A question name that is a pointer: to itself, into the header, or forward.
        for ptr in [0x0c, 0x00, 0x20] {
            let mut m = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, ptr];
            m.extend_from_slice(&[0, 1, 0, 1]);
            assert!(parse_query(&m).is_err(), "pointer to {ptr}");
        }
        // A label, then a pointer back to it: a name that repeats itself, still compressed.
        let mut m = with_questions(1, &[]);
        m.truncate(12);
        m.extend_from_slice(&[1, b'a', 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::Unsupported));

        // In an answer, owner names are stepped over, pointers not followed: an owner name
        // pointing at itself, or two pointing at each other, cannot loop.
        let qb = build_query(7, "a.b.c", TYPE_A).unwrap();
        let q = parse_query(&qb).unwrap();
        let answer = build_answer(&qb, &q, &["203.0.113.5".parse().unwrap()], 5);
        let own = answer.len() as u8;
        let record = |ptr: u8, last: u8| [0xc0, ptr, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, last];
        let mut self_loop = answer.clone();
        self_loop[6..8].copy_from_slice(&2u16.to_be_bytes());
        self_loop.extend_from_slice(&record(own, 4));
        assert_eq!(parse_answer(&self_loop, &q).unwrap().addrs.len(), 2);
        let mut pair = answer.clone();
        pair[6..8].copy_from_slice(&3u16.to_be_bytes());
        pair.extend_from_slice(&record(own + 16, 4));
        pair.extend_from_slice(&record(own, 5));
        let addrs = parse_answer(&pair, &q).unwrap().addrs;
        assert_eq!(addrs[2], ("1.2.3.5".parse().unwrap(), 5));
        let mut back = answer;
        back[6..8].copy_from_slice(&2u16.to_be_bytes());
        back.extend_from_slice(&record(12, 4));
        assert_eq!(parse_answer(&back, &q).unwrap().addrs.len(), 2);
    }

    #[test]
    fn names_end_at_255_bytes() {
        // 63 + 63 + 63 + 61 characters in four labels: 255 bytes on the wire with the root.
        let label = |n| "x".repeat(n);
        let longest = [label(63), label(63), label(63), label(61)].join(".");
        let q = parse_query(&build_query(1, &longest, TYPE_A).unwrap()).unwrap();
        assert_eq!(q.name, longest);
        let mut over = build_query(1, &longest, TYPE_A).unwrap();
        over[12 + 3 * 64] = 62;
        over.insert(12 + 3 * 64 + 1, b'x');
        assert_eq!(parse_query(&over), Err(DnsError::BadName));
        // An owner name of 128 labels cannot fit in 255 bytes.
        let qb = build_query(7, "a.b.c", TYPE_A).unwrap();
        let q = parse_query(&qb).unwrap();
        let mut resp = build_answer(&qb, &q, &["203.0.113.5".parse().unwrap()], 5);
        resp[6..8].copy_from_slice(&2u16.to_be_bytes());
        for _ in 0..128 {
            resp.extend_from_slice(&[1, b'y']);
        }
        resp.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse_answer(&resp, &q), Err(DnsError::BadName));
    }

    #[test]
    fn counts_larger_than_the_message_are_refused_without_reading_on() {
        let qb = build_query(7, "a.b.c", TYPE_A).unwrap();
        let q = parse_query(&qb).unwrap();
        let mut resp = build_answer(&qb, &q, &["203.0.113.5".parse().unwrap()], 5);
        resp[6..8].copy_from_slice(&0xffffu16.to_be_bytes());
        assert_eq!(parse_answer(&resp, &q), Err(DnsError::Truncated));
        // More records than the filter walks: the first ones count, the rest is not read.
        let mut many = build_answer(&qb, &q, &["203.0.113.5".parse().unwrap()], 5);
        let record = many[many.len() - 16..].to_vec();
        for _ in 0..200 {
            many.extend_from_slice(&record);
        }
        many[6..8].copy_from_slice(&0xffffu16.to_be_bytes());
        assert_eq!(
            parse_answer(&many, &q).unwrap().addrs.len(),
            MAX_RECORDS as usize
        );
        let mut header_only = qb.clone();
        header_only.truncate(12);
        header_only[7] = 0xff;
        assert_eq!(parse_query(&header_only), Err(DnsError::Unsupported));
    }

    /// A guest query for `Api.Example.COM`/`qtype`: id 0x4242, RD, AD and CD set, then
    /// `tail` (with ARCOUNT `ar`).
    fn guest(qtype: u16, ar: u8, tail: &[u8]) -> Vec<u8> {
        let mut m = vec![0x42, 0x42, 0x01, 0x30, 0, 1, 0, 0, 0, 0, 0, ar];
        m.extend_from_slice(b"\x03Api\x07Example\x03COM\x00");
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        m.extend_from_slice(tail);
        m
    }

    /// EDNS: 4096 bytes, DO set, a cookie option.
    const OPT: [u8; 23] = [
        0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    #[test]
    fn the_upstream_query_is_rebuilt_from_the_question_alone() {
        let question: &[u8] = b"\x03api\x07example\x03com\x00";
        let mut want = vec![0, 7, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        want.extend_from_slice(question);
        want.extend_from_slice(&[0, 28, 0, 1, 0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        let q = parse_query(&guest(TYPE_AAAA, 1, &OPT)).unwrap();
        assert_eq!(q.edns, Some(4096));
        assert_eq!(upstream_query(7, &q), want);
        // Without the guest's EDNS record, without one of ours.
        let q = parse_query(&guest(TYPE_AAAA, 0, &[])).unwrap();
        let mut want = vec![0, 7, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(question);
        want.extend_from_slice(&[0, 28, 0, 1]);
        assert_eq!(upstream_query(7, &q), want);
        assert_eq!(parse_query(&want).unwrap().name, q.name);
    }

    #[test]
    fn anything_after_the_question_but_an_edns_record_is_refused() {
        let kilo = [0x5au8; 1000];
        let mut opt_then = OPT.to_vec();
        opt_then.extend_from_slice(&kilo);
        assert_eq!(parse_query(&guest(1, 0, &kilo)), Err(DnsError::Trailing));
        assert_eq!(
            parse_query(&guest(1, 1, &opt_then)),
            Err(DnsError::Trailing)
        );
        assert_eq!(parse_query(&guest(1, 0, &OPT)), Err(DnsError::Trailing));
        assert!(parse_query(&guest(1, 1, &kilo)).is_err());
        assert!(parse_query(&guest(1, 1, &[])).is_err());
        let with = |i: usize, v: u8| {
            let mut o = OPT.to_vec();
            o[i] = v;
            parse_query(&guest(1, 1, &o))
        };
        assert_eq!(with(2, 250), Err(DnsError::Unsupported)); // TSIG, not OPT
        assert_eq!(with(0, 1), Err(DnsError::Unsupported)); // not the root name
        assert_eq!(with(6, 1), Err(DnsError::Unsupported)); // EDNS version 1
        assert_eq!(with(10, 13), Err(DnsError::Truncated)); // data past the end
        assert_eq!(with(10, 11), Err(DnsError::Truncated)); // option past the data
        assert_eq!(with(14, 9), Err(DnsError::Truncated)); // option longer than the data
        assert!(with(10, 12).is_ok());
    }

    #[test]
    fn malformed_queries_get_formerr_and_responses_nothing() {
        let r = reply_malformed(&guest(1, 0, b"junk")).unwrap();
        assert_eq!(r, [0x42, 0x42, 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(rcode(&r), Some(RCODE_FORMERR));
        let mut update = guest(1, 0, &[]);
        update[2] = 0x28; // opcode 5 (UPDATE)
        assert_eq!(
            rcode(&reply_malformed(&update).unwrap()),
            Some(RCODE_NOTIMP)
        );
        let mut response = guest(1, 0, &[]);
        response[2] |= 0x80;
        assert_eq!(reply_malformed(&response), None);
        assert_eq!(reply_malformed(&[0x42; 11]), None);
    }

    #[test]
    fn only_everyday_types_of_class_in_are_forwarded() {
        let fwd = |qtype: u16, class: u8| {
            let mut m = guest(qtype, 0, &[]);
            let n = m.len();
            m[n - 1] = class;
            forwarded(&parse_query(&m).unwrap())
        };
        for t in [TYPE_A, TYPE_AAAA, 5, 16, 33, 65] {
            assert!(fwd(t, 1), "type {t}");
        }
        for t in [10, 255, 252, 251, 48, 46, 41, 0, 4242] {
            assert!(!fwd(t, 1), "type {t}");
        }
        assert!(!fwd(TYPE_A, 3));
    }

    #[test]
    fn the_guest_gets_its_own_id_and_question_back() {
        let gm = guest(TYPE_A, 1, &OPT);
        let q = parse_query(&gm).unwrap();
        let up = upstream_query(0x9999, &q);
        let uq = parse_query(&up).unwrap();
        let resp = build_answer(&up, &uq, &["203.0.113.5".parse().unwrap()], 60);
        assert!(parse_answer(&resp, &uq).is_ok());
        let r = guest_reply(resp, &gm, &q);
        assert_eq!(r[..2], gm[..2]);
        assert_eq!(r[12..q.question_end], gm[12..q.question_end]);
        let a = parse_answer(&r, &q).unwrap();
        assert_eq!(a.addrs, vec![("203.0.113.5".parse().unwrap(), 60)]);
        // Too big for what the guest takes over UDP: an empty truncated answer instead.
        assert_eq!(udp_limit(&q), 4096);
        let plain = parse_query(&guest(TYPE_A, 0, &[])).unwrap();
        assert_eq!(udp_limit(&plain), 512);
        let mut small = OPT;
        small[3..5].copy_from_slice(&255u16.to_be_bytes());
        let small = parse_query(&guest(TYPE_A, 1, &small)).unwrap();
        assert_eq!(udp_limit(&small), 512);
        let tc = reply_truncated(&gm, &q);
        assert_eq!(tc[2] & 0x02, 0x02);
        assert!(parse_answer(&tc, &q).unwrap().truncated);
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
