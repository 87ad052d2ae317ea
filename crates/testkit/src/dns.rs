//! An authoritative DNS server for a test internet: answers A queries for the names it was
//! given (TTL 300), NOERROR with no answer for their other types, NXDOMAIN for every other
//! name. It stands in for the resolver Hutch's DNS filter forwards allowed names to, so the
//! filter's answers (and the broker's "SNI resolved to this address" check) are real.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};

/// The answer to one query (`None`: not a query this server can parse).
fn answer(query: &[u8], names: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries().first()?.clone();
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .add_query(question.clone());
    match names.get(name) {
        None => {
            r.set_response_code(ResponseCode::NXDomain);
        }
        Some(ip) if question.query_type() == RecordType::A => {
            r.add_answer(Record::from_rdata(
                question.name().clone(),
                300,
                RData::A(A(*ip)),
            ));
        }
        Some(_) => {}
    }
    r.to_vec().ok()
}

/// Serves `names` (lower case, no trailing dot) over UDP at `addr` inside network namespace
/// `ns`, on a task of the current runtime, until the runtime ends.
pub fn serve_dns(ns: &str, addr: SocketAddr, names: HashMap<String, Ipv4Addr>) {
    let sock = hutch_net::in_netns(ns, move || {
        let s = std::net::UdpSocket::bind(addr).map_err(|e| hutch_net::NetError::Io {
            what: "bind test DNS".into(),
            source: e,
        })?;
        s.set_nonblocking(true)
            .map_err(|e| hutch_net::NetError::Io {
                what: "test DNS nonblocking".into(),
                source: e,
            })?;
        Ok(s)
    })
    .unwrap();
    let sock = tokio::net::UdpSocket::from_std(sock).unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if let Some(reply) = answer(&buf[..n], &names) {
                let _ = sock.send_to(&reply, from).await;
            }
        }
    });
}
