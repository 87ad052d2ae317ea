//! Who is asking: the rights every request to the [`SandboxApi`](super::SandboxApi) carries.

use hutch_types::{ErrorCode, SandboxInfo, SandboxSpec, TokenScope};

use super::{Result, ServiceError};

/// The caller of a request: admin (the Unix socket, an unscoped token) or limited to the
/// sandboxes carrying one label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What the caller may act on.
    pub scope: TokenScope,
}

impl Caller {
    /// A caller who may do everything.
    pub fn admin() -> Caller {
        Caller {
            scope: TokenScope::Admin,
        }
    }

    /// A caller with a token's `scope`.
    pub fn scoped(scope: TokenScope) -> Caller {
        Caller { scope }
    }

    /// Refuses a caller limited to some sandboxes, with `why` (for host-wide resources such
    /// as templates and tasks).
    pub fn require_admin(&self, why: &'static str) -> Result<()> {
        Ok(self.scope.require_admin(why)?)
    }

    /// Refuses (forbidden) a sandbox outside this caller's scope.
    pub fn allows(&self, info: &SandboxInfo) -> Result<()> {
        Ok(self.scope.allows(info)?)
    }

    /// Labels a new sandbox's `spec` with the caller's scope, refusing a conflicting label.
    pub fn label(&self, spec: &mut SandboxSpec) -> Result<()> {
        let TokenScope::Label { key, value } = &self.scope else {
            return Ok(());
        };
        match spec.labels.get(key) {
            Some(v) if v != value => Err(ServiceError::refused(
                ErrorCode::Forbidden,
                format!("this token may only create sandboxes labelled {key}={value}"),
            )),
            _ => {
                spec.labels.insert(key.clone(), value.clone());
                Ok(())
            }
        }
    }

    /// Narrows a listing to the caller's scope.
    pub fn narrow(&self, labels: &mut Vec<(String, String)>) {
        if let TokenScope::Label { key, value } = &self.scope {
            labels.push((key.clone(), value.clone()));
        }
    }
}
