//! What a sandbox's guest gets of its secrets: a placeholder per secret in every exec's
//! environment, the broker's CA (installed before the first exec, and again at every hand-out),
//! the variables that point tools at the CA bundle, and git credentials for bound hosts.

use std::collections::BTreeMap;

use hutch_protocol::{GitCredential, GuestTrust, CA_BUNDLE, GIT_CONFIG, SSH_AUTH_SOCK};
use hutch_types::{SandboxSpec, SecretBinding, SecretLocation, SpecError};

use super::{new_placeholder, SecretError, SecretStore, SecretValue};
use crate::{blocking::off_worker, manager::CoreError, sandbox::Sandbox, Manager};

/// Variables that point common tools at the combined CA bundle: OpenSSL and Python's `ssl`,
/// requests, curl, git, Node, pip, cargo and the AWS SDKs.
pub const CA_BUNDLE_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "CARGO_HTTP_CAINFO",
    "AWS_CA_BUNDLE",
];

/// One secret attached to a sandbox, as the broker needs it.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The secret's name (for the broker's events).
    pub name: String,
    /// What this sandbox's guest holds in its place.
    pub placeholder: String,
    /// Where it may go.
    pub bindings: Vec<SecretBinding>,
    /// Its current value.
    pub value: SecretValue,
}

/// A fresh placeholder for each of `secrets`.
pub fn placeholders_for(secrets: &[String]) -> BTreeMap<String, String> {
    secrets
        .iter()
        .map(|name| (name.clone(), new_placeholder()))
        .collect()
}

impl SecretStore {
    /// Refuses a spec that names an unknown secret, or whose `env` sets a variable one of its
    /// secrets' placeholders goes into. (Scope is the request surface's to check.)
    pub fn check_attachable(&self, spec: &SandboxSpec) -> Result<(), SecretError> {
        for name in &spec.secrets {
            let info = self
                .info(name)
                .ok_or_else(|| SecretError::NotFound(name.clone()))?;
            if let Some(env) = info.env.filter(|e| spec.env.contains_key(e)) {
                return Err(SecretError::BadRequest(format!(
                    "env sets {env}, which holds secret {name}'s placeholder"
                )));
            }
        }
        let ssh_keys = spec
            .secrets
            .iter()
            .filter(|n| self.info(n).is_some_and(|i| i.ssh.is_some()))
            .count();
        if ssh_keys > 1 {
            return Err(SecretError::BadRequest(
                "a sandbox takes at most one SSH key (its SSH_AUTH_SOCK serves one)".into(),
            ));
        }
        if ssh_keys == 1 && spec.env.contains_key("SSH_AUTH_SOCK") {
            return Err(SecretError::BadRequest(
                "env sets SSH_AUTH_SOCK, which leads to the sandbox's SSH key".into(),
            ));
        }
        Ok(())
    }

    /// The environment every exec in a sandbox with `spec` starts from, before the spec's own
    /// `env`: the CA bundle variables and git's configuration when it has secrets.
    pub fn trust_env(spec: &SandboxSpec) -> Vec<(String, String)> {
        if spec.placeholders.is_empty() {
            return Vec::new();
        }
        let mut env: Vec<(String, String)> = CA_BUNDLE_VARS
            .iter()
            .map(|v| (v.to_string(), CA_BUNDLE.to_string()))
            .collect();
        env.push(("GIT_CONFIG_SYSTEM".into(), GIT_CONFIG.into()));
        env
    }

    /// Each attached secret's variable and placeholder (a secret removed meanwhile, or one
    /// without a variable, gives none), and `SSH_AUTH_SOCK` for an SSH key, over the spec's
    /// own `env`.
    pub fn placeholder_env(&self, spec: &SandboxSpec) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = spec
            .placeholders
            .iter()
            .filter_map(|(name, placeholder)| Some((self.info(name)?.env?, placeholder.clone())))
            .collect();
        if self.ssh_key_of(spec).is_some() {
            env.push(("SSH_AUTH_SOCK".into(), SSH_AUTH_SOCK.into()));
        }
        env
    }

    /// What the git credential helper answers: each `basic-password` binding's host (with its
    /// port when not 443) and the placeholder of its secret; the first secret wins a host.
    fn git_credentials(&self, spec: &SandboxSpec) -> Vec<GitCredential> {
        let mut by_host = BTreeMap::new();
        for (name, placeholder) in &spec.placeholders {
            let Some(info) = self.info(name) else {
                continue;
            };
            for b in info
                .bindings
                .iter()
                .filter(|b| b.at == SecretLocation::BasicPassword)
            {
                let host = match b.port {
                    443 => b.host.clone(),
                    port => format!("{}:{port}", b.host),
                };
                by_host.entry(host).or_insert_with(|| placeholder.clone());
            }
        }
        by_host
            .into_iter()
            .map(|(host, password)| GitCredential { host, password })
            .collect()
    }

    /// A sandbox's attached secrets with their bindings and current values, for the broker.
    pub fn attached(&self, spec: &SandboxSpec) -> Vec<Attached> {
        spec.placeholders
            .iter()
            .filter_map(|(name, placeholder)| {
                let info = self.info(name)?;
                Some(Attached {
                    name: name.clone(),
                    placeholder: placeholder.clone(),
                    bindings: info.bindings,
                    value: self.value(name)?,
                })
            })
            .collect()
    }
}

impl Manager {
    /// The host's secret store, or why there is none.
    pub(crate) fn secret_store(&self) -> Result<&std::sync::Arc<SecretStore>, CoreError> {
        self.cfg.secrets.as_ref().ok_or_else(|| {
            SpecError("this host keeps no secrets (no secret store configured)".into()).into()
        })
    }

    /// Checks a new sandbox's secrets and gives it fresh placeholders; a client may not set
    /// them.
    pub(crate) fn give_placeholders(&self, spec: &mut SandboxSpec) -> Result<(), CoreError> {
        if !spec.placeholders.is_empty() {
            return Err(SpecError("placeholders are set by Hutch, not by clients".into()).into());
        }
        if spec.secrets.is_empty() {
            return Ok(());
        }
        self.secret_store()?.check_attachable(spec)?;
        spec.placeholders = placeholders_for(&spec.secrets);
        Ok(())
    }

    /// Installs the sandbox's broker CA and git credentials in its guest (before its first
    /// exec, and again at every hand-out of a clone, fork or pooled sandbox, which carries its
    /// origin's); nothing for a sandbox without secrets.
    pub(crate) async fn arm(
        &self,
        id: &str,
        spec: &SandboxSpec,
        sandbox: &Sandbox,
    ) -> Result<(), CoreError> {
        if spec.placeholders.is_empty() {
            return Ok(());
        }
        let store = self.secret_store()?.clone();
        let git = store.git_credentials(spec);
        let ca = {
            let id = id.to_string();
            off_worker(move || store.sandbox_ca(&id)).await?
        };
        let trust = GuestTrust {
            ca_pem: ca.cert_pem,
            git,
        };
        sandbox.channel().trust(trust).await?;
        Ok(())
    }

    /// Removes a destroyed sandbox's broker CA and event log.
    pub(crate) async fn forget_secrets(&self, id: &str) {
        if let Some(store) = self.cfg.secrets.clone() {
            let id = id.to_string();
            off_worker(move || store.forget_sandbox(&id)).await;
        }
    }

    /// The secrets attached to a sandbox, for its broker: each placeholder with its secret's
    /// bindings and current value (a rotation shows at the next call).
    pub async fn attached_secrets(&self, id: &str) -> Result<Vec<Attached>, CoreError> {
        let info = self.info(id).await?;
        Ok(match &self.cfg.secrets {
            Some(store) => store.attached(&info.spec),
            None => Vec::new(),
        })
    }

    /// The environment of an exec in a sandbox with `spec`: the CA bundle variables and git's
    /// configuration when it has secrets, then the spec's `env`, then each secret's
    /// placeholder, then the command's own `env`.
    pub fn exec_env(
        &self,
        spec: &SandboxSpec,
        command: impl IntoIterator<Item = (String, String)>,
    ) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = SecretStore::trust_env(spec).into_iter().collect();
        env.extend(spec.env.clone());
        if let Some(store) = &self.cfg.secrets {
            env.extend(store.placeholder_env(spec));
        }
        env.extend(command);
        env.into_iter().collect()
    }

    /// The host's secret store, if any (the broker reads values, CA keys and the event log
    /// through it).
    pub fn secrets(&self) -> Option<&std::sync::Arc<SecretStore>> {
        self.cfg.secrets.as_ref()
    }
}
