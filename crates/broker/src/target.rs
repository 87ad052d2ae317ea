//! Request targets as the broker matches them: normalised once, and the normalised form is
//! both what bindings are matched against and what goes upstream.

/// Normalises a path: `;parameters` dropped from each segment, `%2e` decoded to `.`, empty
/// segments (`//`) and `.` dropped, `..` resolved (never above the root). `None` for anything
/// that is not an origin-form path.
pub(crate) fn normalise(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing = false;
    for (i, raw) in segments.iter().enumerate() {
        let seg = raw.split(';').next().unwrap_or("");
        let seg = seg.replace("%2e", ".").replace("%2E", ".");
        match seg.as_str() {
            "" | "." => trailing = i == last,
            ".." => {
                out.pop();
                trailing = i == last;
            }
            _ => {
                out.push(seg);
                trailing = false;
            }
        }
    }
    let mut norm = format!("/{}", out.join("/"));
    if trailing && !out.is_empty() {
        norm.push('/');
    }
    Some(norm)
}

/// Matches a normalised path against a binding pattern: `*` within a segment, `**` across
/// segments; `/a/**` also matches `/a`.
pub(crate) fn matches(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix("/**") {
        if path == prefix {
            return true;
        }
    }
    glob(pattern.as_bytes(), path.as_bytes())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        [b'*', rest @ ..] => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob(rest, &s[i..])),
        [c, rest @ ..] => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tricks_normalise_to_what_servers_see() {
        for (raw, norm) in [
            ("/v1/messages", "/v1/messages"),
            ("/v1/../admin", "/admin"),
            ("/v1/%2e%2e/admin", "/admin"),
            ("/v1/%2E./admin", "/admin"),
            ("/v1;x=1/../../admin", "/admin"),
            ("/v1/x;/../../admin", "/admin"),
            ("//v1//messages/", "/v1/messages/"),
            ("/v1/./a/.", "/v1/a/"),
            ("/../../etc", "/etc"),
            ("/", "/"),
        ] {
            assert_eq!(normalise(raw).as_deref(), Some(norm), "{raw}");
        }
        assert_eq!(normalise("*"), None);
        assert_eq!(normalise("http://x/"), None);
    }

    #[test]
    fn globs() {
        assert!(matches("/v1/**", "/v1/messages"));
        assert!(matches("/v1/**", "/v1"));
        assert!(matches("/v1/**", "/v1/a/b"));
        assert!(!matches("/v1/**", "/v10/a"));
        assert!(!matches("/v1/**", "/admin"));
        assert!(matches("/repos/*/x", "/repos/a/x"));
        assert!(!matches("/repos/*/x", "/repos/a/b/x"));
        assert!(matches("/o/r.git/**", "/o/r.git/info/refs"));
    }
}
