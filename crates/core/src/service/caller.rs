//! Who is asking: the rights every request to the [`SandboxApi`](super::SandboxApi) carries.

use hutch_journal::Actor;
use hutch_types::{SandboxInfo, SandboxSpec, TokenScope};

use super::Result;

/// The caller of a request: admin (the Unix socket, an unscoped token) or limited to the
/// sandboxes carrying one label; and who it is, for the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What the caller may act on.
    pub scope: TokenScope,
    /// Who asks (the principal and the request's id), as journals record it.
    pub actor: Actor,
}

impl Caller {
    /// A caller who may do everything (principal `local` until a front end names it).
    pub fn admin() -> Caller {
        Caller::scoped(TokenScope::Admin)
    }

    /// A caller with a token's `scope`.
    pub fn scoped(scope: TokenScope) -> Caller {
        Caller {
            scope,
            actor: Actor {
                principal: "local".into(),
                request_id: None,
            },
        }
    }

    /// The same caller, named `principal` (`socket`, `token:<fingerprint>`).
    pub fn named(mut self, principal: impl Into<String>) -> Caller {
        self.actor.principal = principal.into();
        self
    }

    /// The same caller, in the request `id`.
    pub fn in_request(mut self, id: impl Into<String>) -> Caller {
        self.actor.request_id = Some(id.into());
        self
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
        Ok(self.scope.label(spec)?)
    }

    /// Narrows a listing to the caller's scope.
    pub fn narrow(&self, labels: &mut Vec<(String, String)>) {
        self.scope.narrow(labels);
    }
}
