//! Secrets the guest never holds: their names, where the broker may substitute them, and the
//! record of every use. Pure data: values never appear in any type here.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Labels;

/// Every placeholder starts with this, so a placeholder is recognisable in logs and requests.
/// The rest is `[a-z0-9_]`, at least 128 bits of entropy, distinct per sandbox.
pub const PLACEHOLDER_PREFIX: &str = "hutch_ph_";

/// Longest secret name.
pub const MAX_SECRET_NAME_LEN: usize = 64;

/// Headers a secret is never substituted into, whatever a binding says: they are echoed,
/// logged or reflected by servers and browsers.
pub const NEVER_SUBSTITUTED_HEADERS: &[&str] = &[
    "user-agent",
    "referer",
    "origin",
    "traceparent",
    "tracestate",
    "baggage",
    "host",
    "cookie",
];

/// Why a secret name, binding or location was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSecret {
    /// Names are `[A-Za-z0-9_.-]`, 1 to 64 characters, starting with a letter or digit.
    #[error("secret name {0:?} is not 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit")]
    Name(String),
    /// The location is not `header:NAME`, `bearer`, `basic-password` or `query:NAME`.
    #[error("secret location {0:?} is not header:NAME, bearer, basic-password or query:NAME")]
    Location(String),
    /// A header a secret may never go into.
    #[error("a secret is never substituted into the {0} header")]
    ForbiddenHeader(String),
    /// The host is not a DNS name.
    #[error(
        "binding host {0:?} is not a DNS name (letters, digits, '-', '.'; no IP, no wildcard)"
    )]
    Host(String),
    /// The path pattern does not start with '/'.
    #[error("binding path {0:?} must start with '/'")]
    Path(String),
    /// The method is not an HTTP token, or is TRACE/TRACK.
    #[error("binding method {0:?} is not an uppercase HTTP method other than TRACE/TRACK")]
    Method(String),
    /// The port is 0.
    #[error("binding port must be 1-65535")]
    Port,
    /// The environment variable name is not a shell identifier.
    #[error("environment variable name {0:?} is not [A-Za-z_][A-Za-z0-9_]*")]
    Env(String),
}

/// Checks a secret name.
pub fn check_secret_name(name: &str) -> Result<(), InvalidSecret> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    ok.then_some(())
        .ok_or_else(|| InvalidSecret::Name(name.to_string()))
}

/// Where in a request the broker puts a secret's real value in place of its placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SecretLocation {
    /// A named request header (lowercase), e.g. `x-api-key`.
    Header {
        /// The header's name, lowercase.
        name: String,
    },
    /// `Authorization: Bearer <value>`.
    Bearer,
    /// The password of `Authorization: Basic` (git over HTTPS).
    BasicPassword,
    /// A query parameter.
    Query {
        /// The parameter's name.
        name: String,
    },
}

impl FromStr for SecretLocation {
    type Err = InvalidSecret;

    /// Parses the CLI form: `header:NAME`, `bearer`, `basic-password`, `query:NAME`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidSecret::Location(s.to_string());
        let location = match s.split_once(':') {
            None if s == "bearer" => SecretLocation::Bearer,
            None if s == "basic-password" => SecretLocation::BasicPassword,
            Some(("header", name)) => SecretLocation::Header {
                name: name.to_ascii_lowercase(),
            },
            Some(("query", name)) => SecretLocation::Query {
                name: name.to_string(),
            },
            _ => return Err(bad()),
        };
        location.check()?;
        Ok(location)
    }
}

impl fmt::Display for SecretLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretLocation::Header { name } => write!(f, "header:{name}"),
            SecretLocation::Bearer => f.write_str("bearer"),
            SecretLocation::BasicPassword => f.write_str("basic-password"),
            SecretLocation::Query { name } => write!(f, "query:{name}"),
        }
    }
}

impl SecretLocation {
    /// Refuses empty or non-token names and the headers in [`NEVER_SUBSTITUTED_HEADERS`]
    /// (and `authorization` by name: use `bearer` or `basic-password`).
    pub fn check(&self) -> Result<(), InvalidSecret> {
        let token = |n: &str| {
            !n.is_empty()
                && n.len() <= 128
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        match self {
            SecretLocation::Header { name } => {
                if !token(name) {
                    return Err(InvalidSecret::Location(format!("header:{name}")));
                }
                let forbidden = NEVER_SUBSTITUTED_HEADERS.contains(&name.as_str())
                    || name == "authorization"
                    || name.starts_with("access-control-");
                if forbidden {
                    return Err(InvalidSecret::ForbiddenHeader(name.clone()));
                }
                Ok(())
            }
            SecretLocation::Query { name } if !token(name) => {
                Err(InvalidSecret::Location(format!("query:{name}")))
            }
            _ => Ok(()),
        }
    }
}

fn default_port() -> u16 {
    443
}

/// One destination a secret may be sent to, and where in the request it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretBinding {
    /// Exact DNS name (lowercase, no trailing dot); matched against the TLS SNI and `Host`.
    pub host: String,
    /// Destination port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Path pattern (`/v1/**`: `*` within a segment, `**` across segments); none: any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Allowed methods (uppercase); empty: any method but TRACE/TRACK.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Where the value goes.
    pub at: SecretLocation,
    /// Git over HTTPS: allow fetches but refuse pushes (`git-receive-pack`) to this host.
    #[serde(default)]
    pub fetch_only: bool,
}

impl SecretBinding {
    /// Canonicalises the host (case, trailing dot) and checks every field.
    pub fn normalised(mut self) -> Result<Self, InvalidSecret> {
        self.host = canonical_host(&self.host).ok_or(InvalidSecret::Host(self.host))?;
        if self.port == 0 {
            return Err(InvalidSecret::Port);
        }
        if let Some(path) = &self.path {
            if !path.starts_with('/') {
                return Err(InvalidSecret::Path(path.clone()));
            }
        }
        for m in &self.methods {
            let token = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
            if !token || m == "TRACE" || m == "TRACK" {
                return Err(InvalidSecret::Method(m.clone()));
            }
        }
        self.at.check()?;
        Ok(self)
    }
}

/// The canonical form of a DNS name as Hutch compares them: ASCII lowercase, one trailing dot
/// dropped; `None` for anything that is not a DNS name (IP literals, wildcards, empty labels).
pub fn canonical_host(host: &str) -> Option<String> {
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let is_ip = h.parse::<std::net::IpAddr>().is_ok();
    let all_digits = h
        .split('.')
        .next_back()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
    (h.len() <= 253 && !is_ip && !all_digits && h.split('.').all(label_ok)).then_some(h)
}

/// Checks an environment variable name for a placeholder.
pub fn check_env_name(name: &str) -> Result<(), InvalidSecret> {
    let mut bytes = name.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then_some(())
        .ok_or_else(|| InvalidSecret::Env(name.to_string()))
}

/// A secret as anyone may see it: everything but its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretInfo {
    /// The secret's name.
    pub name: String,
    /// The environment variable the guest sees, holding the placeholder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Where the value may go.
    pub bindings: Vec<SecretBinding>,
    /// Labels scoping who may see and attach it (as for sandboxes).
    #[serde(default)]
    pub labels: Labels,
    /// Set when the secret is an SSH key: served to the guest's `SSH_AUTH_SOCK` by a host-side
    /// agent that signs only for these host keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshKeyInfo>,
    /// When it was first set (RFC 3339).
    pub created_at: String,
    /// When its value last changed (RFC 3339).
    pub updated_at: String,
}

/// An SSH key secret's public side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshKeyInfo {
    /// The key's public half (`ssh-ed25519 AAAA...`), for the server's `authorized_keys`.
    pub public_key: String,
    /// The server host keys it signs for (`ssh-ed25519 AAAA...`, canonical: no comment).
    pub allowed_host_keys: Vec<String>,
}

/// What the broker decided about one request or connection that involved a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BrokerDecision {
    /// The placeholder was replaced by the value at the binding's location.
    Substituted,
    /// A request was refused (wrong destination, path, method, `Host` ≠ SNI, TRACE, push).
    Refused,
    /// A placeholder in an auth position was sent outside its binding (blocked, 403).
    Violation,
    /// A placeholder outside an auth position went to an unbound destination (forwarded
    /// unchanged, recorded).
    Forwarded,
    /// The real value (or an encoding of it) was removed from a response.
    Scrubbed,
    /// An SSH key signed a user authentication for a session bound to an allowed host key
    /// (the event's `host` is that key's SHA-256 fingerprint).
    Signed,
}

/// One use of a secret, as `hutch secret log` lists it: never a value, never a placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BrokerEvent {
    /// When (RFC 3339).
    pub time: String,
    /// The sandbox whose request it was.
    pub sandbox_id: String,
    /// The secret involved, by name.
    pub secret: String,
    /// The destination host (the SNI or `Host`).
    pub host: String,
    /// The destination port (0 for an SSH key's events: the agent sees a host key, not an
    /// address).
    pub port: u16,
    /// The request's method, where there was a request (`ssh-sign` for an SSH key's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request's normalised path, without its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// What happened.
    pub decision: BrokerDecision,
    /// Why, for refusals and violations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_from_the_cli_form_and_refuse_echoed_headers() {
        assert_eq!(
            "header:X-Api-Key".parse::<SecretLocation>().unwrap(),
            SecretLocation::Header {
                name: "x-api-key".into()
            }
        );
        assert_eq!("bearer".parse(), Ok(SecretLocation::Bearer));
        assert_eq!("basic-password".parse(), Ok(SecretLocation::BasicPassword));
        assert_eq!(
            "query:key".parse::<SecretLocation>().unwrap().to_string(),
            "query:key"
        );
        for bad in [
            "header:User-Agent",
            "header:referer",
            "header:authorization",
        ] {
            assert!(matches!(
                bad.parse::<SecretLocation>(),
                Err(InvalidSecret::ForbiddenHeader(_))
            ));
        }
        for bad in ["", "header:", "cookie", "query:a b", "header:x\r\ny"] {
            assert!(bad.parse::<SecretLocation>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts_are_canonical_dns_names_only() {
        assert_eq!(
            canonical_host("API.Example.test."),
            Some("api.example.test".into())
        );
        for bad in [
            "",
            "1.2.3.4",
            "::1",
            "*.example.test",
            "a..b",
            "-a.test",
            "a.123",
        ] {
            assert_eq!(canonical_host(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bindings_are_normalised_or_refused() {
        let b = SecretBinding {
            host: "Api.Example.Test.".into(),
            port: 443,
            path: Some("/v1/**".into()),
            methods: vec!["POST".into()],
            at: SecretLocation::Bearer,
            fetch_only: false,
        };
        assert_eq!(b.clone().normalised().unwrap().host, "api.example.test");
        let trace = SecretBinding {
            methods: vec!["TRACE".into()],
            ..b.clone()
        };
        assert!(trace.normalised().is_err());
        let rel = SecretBinding {
            path: Some("v1".into()),
            ..b
        };
        assert!(rel.normalised().is_err());
    }

    #[test]
    fn names_and_env_vars() {
        assert!(check_secret_name("anthropic.key-1").is_ok());
        assert!(check_secret_name("-x").is_err());
        assert!(check_secret_name(&"a".repeat(65)).is_err());
        assert!(check_env_name("ANTHROPIC_API_KEY").is_ok());
        assert!(check_env_name("1X").is_err());
        assert!(check_env_name("A=B").is_err());
    }
}
