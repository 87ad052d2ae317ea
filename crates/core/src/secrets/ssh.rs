//! SSH keys as secrets: the key stays in the store; a sandbox with one attached gets
//! `SSH_AUTH_SOCK` in every exec, whose connections the guest agent forwards over the host
//! channel to an agent here ([`hutch_broker::ssh::SshAgentKey`]) that signs only for a
//! verified session bind to a host key on the secret's allow-list, recording each signature
//! and refusal in the secret log.

use std::sync::{Arc, Weak};

use hutch_broker::ssh::{canonical_host_key, parse_private_key, public_key_line, SshAgentKey};
use hutch_protocol::host::{SshAgentFuture, SshAgentServer};
use hutch_types::{SandboxSpec, SshKeyInfo};

use super::{SecretError, SecretStore, SecretValue};
use crate::Manager;

/// What an SSH key secret shows of itself, checked: `None` for a secret that is no SSH key.
/// A value set again for an SSH key must still be one (with its old list unless a new one
/// is given).
pub(super) fn key_info(
    value: &SecretValue,
    allowed: Option<&[String]>,
    old: Option<SshKeyInfo>,
) -> Result<Option<SshKeyInfo>, SecretError> {
    let allowed = match (allowed, old) {
        (Some(new), _) => new
            .iter()
            .map(|line| canonical_host_key(line))
            .collect::<Result<Vec<_>, _>>()?,
        (None, Some(old)) => old.allowed_host_keys,
        (None, None) => return Ok(None),
    };
    if allowed.is_empty() {
        return Err(hutch_broker::ssh::SshKeyError::NoHostKey.into());
    }
    if allowed.len() > super::MAX_BINDINGS {
        return Err(SecretError::BadRequest(format!(
            "an SSH key may allow at most {} host keys",
            super::MAX_BINDINGS
        )));
    }
    let key = parse_private_key(value)?;
    Ok(Some(SshKeyInfo {
        public_key: public_key_line(&key),
        allowed_host_keys: allowed,
    }))
}

impl SecretStore {
    /// The SSH key attached to a sandbox with `spec`, by name (at most one is).
    pub fn ssh_key_of(&self, spec: &SandboxSpec) -> Option<String> {
        spec.secrets
            .iter()
            .find(|name| self.info(name).is_some_and(|i| i.ssh.is_some()))
            .cloned()
    }

    /// The agent serving sandbox `id`'s SSH key as it is now (a key set again is used from
    /// the next connection on), recording its signatures and refusals in `events`; `None`
    /// without one.
    pub fn ssh_agent(
        &self,
        id: &str,
        spec: &SandboxSpec,
        events: Arc<dyn hutch_broker::EventSink>,
    ) -> Option<SshAgentKey> {
        let name = self.ssh_key_of(spec)?;
        let ssh = self.info(&name)?.ssh?;
        let value = self.value(&name)?;
        match SshAgentKey::new(id, &name, &value, &ssh.allowed_host_keys, events) {
            Ok(agent) => Some(agent),
            Err(e) => {
                tracing::warn!(%id, secret = %name, error = %e, "unusable SSH key");
                None
            }
        }
    }
}

/// Serves a sandbox's forwarded SSH agent connections: bound to the sandbox by the manager
/// when it goes live, so the guest can reach no other sandbox's key.
pub(crate) struct SandboxSshAgent {
    pub(crate) manager: Weak<Manager>,
    pub(crate) id: String,
}

impl SshAgentServer for SandboxSshAgent {
    fn serve(&self, stream: tokio::io::DuplexStream) -> SshAgentFuture {
        let (manager, id) = (self.manager.clone(), self.id.clone());
        Box::pin(async move {
            // Without a key (none attached, removed meanwhile, no store) the connection
            // closes at once: the client sees an agent with nothing to offer.
            let Some(manager) = manager.upgrade() else {
                return;
            };
            let Ok(info) = manager.get(&id).await else {
                return;
            };
            let Some(agent) = manager
                .secrets()
                .and_then(|store| store.ssh_agent(&id, &info.spec, manager.secret_events(store)))
            else {
                return;
            };
            Arc::new(agent).serve(stream).await;
        })
    }
}
