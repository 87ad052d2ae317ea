//! What a caller may do: the scope of an API token (the Unix socket's caller is admin). Stored
//! by `hutch-store` with each token and checked by the daemon on every request.

use crate::{Labels, SandboxInfo, SandboxSpec};

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

    /// Labels a new sandbox's `spec` with this scope's label, refusing a conflicting one.
    pub fn label(&self, spec: &mut SandboxSpec) -> Result<(), Forbidden> {
        let TokenScope::Label { key, value } = self else {
            return Ok(());
        };
        match spec.labels.get(key) {
            Some(v) if v != value => Err(Forbidden(format!(
                "this token may only create sandboxes labelled {key}={value}"
            ))),
            _ => {
                spec.labels.insert(key.clone(), value.clone());
                Ok(())
            }
        }
    }

    /// Refuses an object of kind `what` (e.g. "secrets") whose `labels` are outside this scope.
    pub fn allows_labels(&self, what: &str, labels: &Labels) -> Result<(), Forbidden> {
        match self {
            TokenScope::Admin => Ok(()),
            TokenScope::Label { key, value } if labels.get(key) == Some(value) => Ok(()),
            TokenScope::Label { key, value } => Err(Forbidden(format!(
                "this token is limited to {what} labelled {key}={value}"
            ))),
        }
    }

    /// Labels a new object of kind `what` with this scope's label, refusing a conflicting one.
    pub fn label_labels(&self, what: &str, labels: &mut Labels) -> Result<(), Forbidden> {
        let TokenScope::Label { key, value } = self else {
            return Ok(());
        };
        match labels.get(key) {
            Some(v) if v != value => Err(Forbidden(format!(
                "this token may only make {what} labelled {key}={value}"
            ))),
            _ => {
                labels.insert(key.clone(), value.clone());
                Ok(())
            }
        }
    }

    /// Narrows a listing's label filter to this scope.
    pub fn narrow(&self, labels: &mut Vec<(String, String)>) {
        if let TokenScope::Label { key, value } = self {
            labels.push((key.clone(), value.clone()));
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

    #[test]
    fn a_label_scope_labels_what_it_creates_and_narrows_what_it_lists() {
        let team = TokenScope::Label {
            key: "team".into(),
            value: "a".into(),
        };
        let mut spec = SandboxSpec::default();
        team.label(&mut spec).unwrap();
        assert_eq!(spec.labels.get("team").map(String::as_str), Some("a"));
        let mut theirs = SandboxSpec::default();
        theirs.labels.insert("team".into(), "b".into());
        let refused = team.label(&mut theirs).unwrap_err();
        assert!(refused.0.contains("team=a"), "{refused}");
        assert_eq!(theirs.labels.get("team").map(String::as_str), Some("b"));
        let mut filter = vec![("x".to_string(), "y".to_string())];
        team.narrow(&mut filter);
        assert_eq!(filter.last(), Some(&("team".to_string(), "a".to_string())));
        let mut open = SandboxSpec::default();
        TokenScope::Admin.label(&mut open).unwrap();
        assert!(open.labels.is_empty());
    }
}
