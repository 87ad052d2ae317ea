//! The per-request decision: where each attached secret's placeholder appears, whether this
//! destination, path and method are inside one of its bindings, and the substituted headers
//! and query if they are. Pure: no I/O, so every rule is tested here.

use base64::Engine;
use hutch_types::{BrokerDecision, SecretBinding, SecretLocation};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION};
use hyper::{HeaderMap, StatusCode};
use percent_encoding::utf8_percent_encode;

use crate::target;
use crate::AttachedSecret;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The destination as the broker verified it.
#[derive(Debug, Clone)]
pub(crate) struct Dest<'a> {
    /// The SNI, canonical.
    pub(crate) host: &'a str,
    /// The original destination port.
    pub(crate) port: u16,
    /// The SNI was answered by the sandbox's DNS with the original destination IP.
    pub(crate) verified: bool,
}

/// The request as the policy sees it (path already normalised).
#[derive(Debug, Clone)]
pub(crate) struct Req<'a> {
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a HeaderMap,
}

/// A refusal, for the response and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) secret: String,
    pub(crate) decision: BrokerDecision,
    pub(crate) reason: String,
}

/// What to send upstream.
#[derive(Debug, Default)]
pub(crate) struct Forward {
    /// Headers to set (replacing the guest's).
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// The query to send instead of the guest's.
    pub(crate) query: Option<String>,
    /// Indexes of the secrets substituted.
    pub(crate) substituted: Vec<usize>,
    /// Names of secrets whose placeholder is forwarded unchanged outside an auth position.
    pub(crate) forwarded: Vec<String>,
}

/// Where in a request a placeholder sits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    /// An auth position that matches a location kind.
    Auth(SecretLocation),
    /// `Authorization` in a form no location describes (placeholder in a Basic user name,
    /// a custom scheme): still an auth position, never substituted.
    OtherAuthorization,
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// The auth positions holding `s`'s placeholder, and whether it also appears elsewhere.
fn positions(s: &AttachedSecret, req: &Req<'_>) -> (Vec<Position>, bool) {
    let ph = s.placeholder.as_str();
    let mut auth = Vec::new();
    let mut elsewhere = false;
    let bound_headers: Vec<&str> = s
        .bindings
        .iter()
        .filter_map(|b| match &b.at {
            SecretLocation::Header { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    for (name, value) in req.headers {
        let bytes = value.as_bytes();
        if *name == AUTHORIZATION {
            if let Some(p) = authorization_position(bytes, ph) {
                auth.push(p);
            }
        } else if contains(bytes, ph.as_bytes()) {
            if bound_headers.contains(&name.as_str()) {
                auth.push(Position::Auth(SecretLocation::Header {
                    name: name.as_str().to_string(),
                }));
            } else {
                elsewhere = true;
            }
        }
    }
    if contains(req.path.as_bytes(), ph.as_bytes()) {
        elsewhere = true;
    }
    for (key, value) in req.query.map(query_pairs).into_iter().flatten() {
        let bound = s
            .bindings
            .iter()
            .any(|b| matches!(&b.at, SecretLocation::Query { name } if name == key));
        if bound && value == ph {
            auth.push(Position::Auth(SecretLocation::Query {
                name: key.to_string(),
            }));
        } else if contains(value.as_bytes(), ph.as_bytes())
            || contains(key.as_bytes(), ph.as_bytes())
        {
            elsewhere = true;
        }
    }
    (auth, elsewhere)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn authorization_position(value: &[u8], ph: &str) -> Option<Position> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && rest == ph {
        return Some(Position::Auth(SecretLocation::Bearer));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = B64.decode(rest).ok().unwrap_or_default();
        let decoded = String::from_utf8_lossy(&decoded);
        if let Some((_, pass)) = decoded.split_once(':') {
            if pass == ph {
                return Some(Position::Auth(SecretLocation::BasicPassword));
            }
        }
        return contains(decoded.as_bytes(), ph.as_bytes()).then_some(Position::OtherAuthorization);
    }
    contains(value, ph.as_bytes()).then_some(Position::OtherAuthorization)
}

/// Whether a git request pushes.
fn is_push(req: &Req<'_>) -> bool {
    req.path.ends_with("/git-receive-pack")
        || req
            .query
            .map(query_pairs)
            .into_iter()
            .flatten()
            .any(|(k, v)| k == "service" && v == "git-receive-pack")
}

/// Why `b` does not allow this request at `at`, or `None` if it does.
fn binding_refuses(b: &SecretBinding, at: &SecretLocation, req: &Req<'_>) -> Option<String> {
    if &b.at != at {
        return Some(format!("bound at {}, not {at}", b.at));
    }
    if let Some(pattern) = &b.path {
        if !target::matches(pattern, req.path) {
            return Some(format!(
                "path {} is outside the binding's {pattern}",
                req.path
            ));
        }
    }
    if !b.methods.is_empty() && !b.methods.iter().any(|m| m == req.method) {
        return Some(format!("method {} is not among the binding's", req.method));
    }
    if b.fetch_only && is_push(req) {
        return Some("the binding allows git fetch only, not push".into());
    }
    None
}

/// Decides one request against every attached secret.
pub(crate) fn decide(
    secrets: &[AttachedSecret],
    dest: &Dest<'_>,
    req: &Req<'_>,
) -> Result<Forward, Refusal> {
    let mut fwd = Forward::default();
    let mut query = req.query.map(str::to_string);
    for (index, s) in secrets.iter().enumerate() {
        let (auth, elsewhere) = positions(s, req);
        if elsewhere {
            fwd.forwarded.push(s.name.clone());
        }
        for position in auth {
            let refuse = |decision, reason: String| Refusal {
                status: StatusCode::FORBIDDEN,
                secret: s.name.clone(),
                decision,
                reason,
            };
            let here: Vec<&SecretBinding> = s
                .bindings
                .iter()
                .filter(|b| b.host == dest.host && b.port == dest.port)
                .collect();
            let Position::Auth(at) = position else {
                return Err(refuse(
                    BrokerDecision::Violation,
                    "placeholder in an Authorization form no binding describes".into(),
                ));
            };
            if here.is_empty() {
                return Err(refuse(
                    BrokerDecision::Violation,
                    format!("secret is not bound to {}:{}", dest.host, dest.port),
                ));
            }
            let refusals: Vec<String> = here
                .iter()
                .filter_map(|b| binding_refuses(b, &at, req))
                .collect();
            if refusals.len() == here.len() {
                let located = here.iter().any(|b| b.at == at);
                let decision = if located {
                    BrokerDecision::Refused
                } else {
                    BrokerDecision::Violation
                };
                return Err(refuse(decision, refusals.join("; ")));
            }
            if !dest.verified {
                return Err(refuse(
                    BrokerDecision::Refused,
                    format!(
                        "destination not verified: the sandbox's DNS did not answer {} with this address",
                        dest.host
                    ),
                ));
            }
            substitute(s, &at, req, &mut fwd, &mut query)
                .map_err(|reason| refuse(BrokerDecision::Refused, reason))?;
            if !fwd.substituted.contains(&index) {
                fwd.substituted.push(index);
            }
        }
    }
    if query.as_deref() != req.query {
        fwd.query = query;
    }
    Ok(fwd)
}

fn substitute(
    s: &AttachedSecret,
    at: &SecretLocation,
    req: &Req<'_>,
    fwd: &mut Forward,
    query: &mut Option<String>,
) -> Result<(), String> {
    // Bindings are checked when they are made; checked again here so no binding can put a
    // value into an echoed header (User-Agent, Referer, Origin, tracing, CORS).
    at.check().map_err(|e| e.to_string())?;
    let value = s.value.expose();
    let ph = s.placeholder.as_bytes();
    let header = |name: HeaderName, bytes: Vec<u8>| {
        let mut v = HeaderValue::from_bytes(&bytes)
            .map_err(|_| "the secret's value is not a valid header value".to_string())?;
        v.set_sensitive(true);
        Ok::<_, String>((name, v))
    };
    match at {
        SecretLocation::Header { name } => {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            let old = req
                .headers
                .get(&name)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            fwd.headers.push(header(name, replace_all(old, ph, value))?);
        }
        SecretLocation::Bearer => {
            let mut v = b"Bearer ".to_vec();
            v.extend_from_slice(value);
            fwd.headers.push(header(AUTHORIZATION, v)?);
        }
        SecretLocation::BasicPassword => {
            let old = req.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
            let old = std::str::from_utf8(old.unwrap_or_default()).unwrap_or_default();
            let decoded = B64
                .decode(
                    old.split_once(' ')
                        .map(|(_, c)| c.trim())
                        .unwrap_or_default(),
                )
                .unwrap_or_default();
            let user = decoded.split(|&b| b == b':').next().unwrap_or_default();
            let mut plain = user.to_vec();
            plain.push(b':');
            plain.extend_from_slice(value);
            let v = format!("Basic {}", B64.encode(&plain)).into_bytes();
            fwd.headers.push(header(AUTHORIZATION, v)?);
        }
        SecretLocation::Query { name } => {
            let value = std::str::from_utf8(value)
                .map_err(|_| "the secret's value is not UTF-8".to_string())?;
            let encoded = utf8_percent_encode(value, crate::scrub::COMPONENT).to_string();
            let old = query.take().unwrap_or_default();
            let new: Vec<String> = old
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) if k == name && v == s.placeholder => format!("{k}={encoded}"),
                    _ => kv.to_string(),
                })
                .collect();
            *query = Some(new.join("&"));
        }
    }
    Ok(())
}

fn replace_all(hay: &[u8], find: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(find) {
            out.extend_from_slice(with);
            i += find.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// Names of the secrets whose placeholder appears anywhere in the request's headers or query
/// (for events about requests refused before any binding is looked at).
pub(crate) fn mentioned(secrets: &[AttachedSecret], req: &Req<'_>) -> Vec<String> {
    secrets
        .iter()
        .filter(|s| {
            let ph = s.placeholder.as_bytes();
            req.headers.values().any(|v| contains(v.as_bytes(), ph))
                || req.query.is_some_and(|q| contains(q.as_bytes(), ph))
        })
        .map(|s| s.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretValue;

    const PH: &str = "hutch_ph_0123456789abcdefghijklmnop";

    fn secret(at: &str, path: Option<&str>, methods: &[&str]) -> AttachedSecret {
        AttachedSecret {
            name: "s".into(),
            value: SecretValue::new(b"REAL+v/1".to_vec()),
            placeholder: PH.into(),
            bindings: vec![SecretBinding {
                host: "api.test".into(),
                port: 443,
                path: path.map(str::to_string),
                methods: methods.iter().map(|m| m.to_string()).collect(),
                at: at.parse().unwrap(),
                fetch_only: false,
            }],
        }
    }

    fn run(
        s: &AttachedSecret,
        host: &str,
        verified: bool,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &[(&str, String)],
    ) -> Result<Forward, Refusal> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let dest = Dest {
            host,
            port: 443,
            verified,
        };
        let req = Req {
            method,
            path,
            query,
            headers: &map,
        };
        decide(std::slice::from_ref(s), &dest, &req)
    }

    #[test]
    fn substitutes_at_the_bound_location_only() {
        let s = secret("header:x-api-key", None, &[]);
        let key = [("x-api-key", format!("k={PH}"))];
        let f = run(&s, "api.test", true, "GET", "/", None, &key).unwrap();
        assert_eq!(f.headers[0].1.as_bytes(), b"k=REAL+v/1");
        assert!(f.headers[0].1.is_sensitive());
        // The same placeholder as a Bearer token: an auth position the binding does not name.
        let bearer = [("authorization", format!("Bearer {PH}"))];
        let r = run(&s, "api.test", true, "GET", "/", None, &bearer).unwrap_err();
        assert_eq!(r.decision, BrokerDecision::Violation);
        // In User-Agent: forwarded unchanged, recorded.
        let ua = [("user-agent", PH.to_string())];
        let f = run(&s, "api.test", true, "GET", "/", None, &ua).unwrap();
        assert!(f.headers.is_empty() && f.substituted.is_empty());
        assert_eq!(f.forwarded, vec!["s".to_string()]);
    }

    #[test]
    fn echoed_headers_never_get_a_value_even_from_a_bad_binding() {
        let mut s = secret("header:x-api-key", None, &[]);
        s.bindings[0].at = SecretLocation::Header {
            name: "user-agent".into(),
        };
        let ua = [("user-agent", PH.to_string())];
        let r = run(&s, "api.test", true, "GET", "/", None, &ua).unwrap_err();
        assert_eq!(r.decision, BrokerDecision::Refused);
        let f = run(&s, "api.test", true, "GET", &format!("/x/{PH}"), None, &[]).unwrap();
        assert_eq!(f.forwarded, vec!["s".to_string()]);
    }

    #[test]
    fn unverified_or_unbound_destinations_get_nothing() {
        let s = secret("bearer", None, &[]);
        let bearer = [("authorization", format!("Bearer {PH}"))];
        let r = run(&s, "api.test", false, "GET", "/", None, &bearer).unwrap_err();
        assert_eq!(r.decision, BrokerDecision::Refused);
        let r = run(&s, "evil.test", true, "GET", "/", None, &bearer).unwrap_err();
        assert_eq!(
            (r.decision, r.status),
            (BrokerDecision::Violation, StatusCode::FORBIDDEN)
        );
        let f = run(&s, "api.test", true, "GET", "/", None, &bearer).unwrap();
        assert_eq!(f.headers[0].1.as_bytes(), b"Bearer REAL+v/1");
    }

    #[test]
    fn path_and_method_bound() {
        let s = secret("bearer", Some("/v1/**"), &["POST"]);
        let bearer = [("authorization", format!("Bearer {PH}"))];
        assert!(run(&s, "api.test", true, "POST", "/v1/messages", None, &bearer).is_ok());
        for (m, p) in [("GET", "/v1/messages"), ("POST", "/admin"), ("POST", "/v2")] {
            let r = run(&s, "api.test", true, m, p, None, &bearer).unwrap_err();
            assert_eq!(r.decision, BrokerDecision::Refused, "{m} {p}");
        }
    }

    #[test]
    fn basic_password_and_query() {
        let s = secret("basic-password", None, &[]);
        let basic = format!("Basic {}", B64.encode(format!("x-access-token:{PH}")));
        let f = run(
            &s,
            "api.test",
            true,
            "GET",
            "/",
            None,
            &[("authorization", basic)],
        )
        .unwrap();
        let sent = f.headers[0]
            .1
            .to_str()
            .unwrap()
            .strip_prefix("Basic ")
            .unwrap();
        assert_eq!(B64.decode(sent).unwrap(), b"x-access-token:REAL+v/1");
        let s = secret("query:key", None, &[]);
        let q = format!("a=1&key={PH}&b");
        let f = run(&s, "api.test", true, "GET", "/", Some(&q), &[]).unwrap();
        assert_eq!(f.query.as_deref(), Some("a=1&key=REAL%2Bv%2F1&b"));
        // Under another parameter name: not an auth position, forwarded.
        let q = format!("other={PH}");
        let f = run(&s, "api.test", true, "GET", "/", Some(&q), &[]).unwrap();
        assert_eq!((f.query, f.forwarded.len()), (None, 1));
    }
}
