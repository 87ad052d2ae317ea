//! What a caller may do: the scope of an API token (the Unix socket's caller is admin). Stored
//! by `hutch-store` with each token and checked by the daemon on every request.

use crate::SandboxInfo;

/// What an API token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    /// Everything.
    Admin,
    /// Only sandboxes carrying this label (and creating sandboxes that carry it).
    Label {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
}

/// A request outside the caller's scope, with why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Forbidden(
    /// Why, for the caller.
    pub String,
);

impl TokenScope {
    /// Refuses a caller whose token is limited to some sandboxes, with `why` (for host-wide
    /// resources such as templates and tasks).
    pub fn require_admin(&self, why: &str) -> Result<(), Forbidden> {
        match self {
            TokenScope::Admin => Ok(()),
            TokenScope::Label { .. } => Err(Forbidden(why.to_string())),
        }
    }

    /// Refuses a sandbox outside this scope.
    pub fn allows(&self, info: &SandboxInfo) -> Result<(), Forbidden> {
        match self {
            TokenScope::Admin => Ok(()),
            TokenScope::Label { key, value } if info.spec.labels.get(key) == Some(value) => Ok(()),
            TokenScope::Label { key, value } => Err(Forbidden(format!(
                "this token is limited to sandboxes labelled {key}={value}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SandboxSpec, SandboxState};

    fn labelled(labels: &[(&str, &str)]) -> SandboxInfo {
        SandboxInfo {
            id: "sb-1".into(),
            state: SandboxState::Running,
            spec: SandboxSpec {
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            created_at_ms: 0,
            updated_at_ms: 0,
            expires_at_ms: None,
        }
    }

    #[test]
    fn a_label_scope_allows_only_its_label_and_nothing_host_wide() {
        let team = TokenScope::Label {
            key: "team".into(),
            value: "a".into(),
        };
        assert_eq!(team.allows(&labelled(&[("team", "a"), ("x", "y")])), Ok(()));
        for other in [&[("team", "b")][..], &[("squad", "a")], &[]] {
            let refused = team.allows(&labelled(other)).unwrap_err();
            assert!(refused.0.contains("team=a"), "{refused}");
        }
        assert_eq!(
            team.require_admin("templates are host-wide"),
            Err(Forbidden("templates are host-wide".into()))
        );
        assert_eq!(TokenScope::Admin.allows(&labelled(&[])), Ok(()));
        assert_eq!(TokenScope::Admin.require_admin("x"), Ok(()));
    }
}
