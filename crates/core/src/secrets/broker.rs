//! Each sandbox's secret broker ([`hutch_broker::Broker`]), run by the manager: started when a
//! sandbox with secrets and a NIC becomes live (booted, restored, handed out, adopted after a
//! restart), given new values when a secret is set again, and stopped before its network goes.
//!
//! The broker listens inside the sandbox's namespace ([`HostNetwork::intercept`]), reads the
//! names the sandbox's DNS filter answered, dials upstream from that namespace (whose `output`
//! chain holds it to the sandbox's policy and deny lists), and records every decision in the
//! secret store's [`BrokerLog`].

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use hutch_broker::{AttachedSecret, Broker, BrokerConfig, EgressCheck, SandboxCa};
use hutch_types::{BrokerEvent, SandboxSpec};
use tokio::task::AbortHandle;

use super::{log::BrokerLog, SecretError, SecretStore};
use crate::{blocking::off_worker, manager::CoreError, Manager};

/// The running brokers, by sandbox id.
#[derive(Default)]
pub(crate) struct Brokers(std::sync::Mutex<HashMap<String, (Broker, AbortHandle)>>);

impl hutch_broker::EventSink for BrokerLog {
    fn record(&self, event: BrokerEvent) {
        BrokerLog::record(self, event);
    }
}

/// A broker's decisions go to the secret log (`hutch secret log`) and, when journals are kept,
/// to the sandbox's journal.
struct BrokerEvents {
    log: Arc<BrokerLog>,
    feed: Option<Arc<crate::audit::GuestFeed>>,
}

impl hutch_broker::EventSink for BrokerEvents {
    fn record(&self, event: BrokerEvent) {
        if let Some(feed) = &self.feed {
            feed.broker(&event);
        }
        self.log.record(event);
    }
}

/// The broker dials from the sandbox's namespace, whose `output` chain applies the sandbox's
/// policy and deny lists to every connection it opens (`hutch_net::Network::intercept`): the
/// kernel refuses what the guest could not reach, so this check has nothing left to add.
struct PolicyInTheNamespace;

impl EgressCheck for PolicyInTheNamespace {
    fn allowed(&self, _dst: SocketAddr, _host: Option<&str>) -> bool {
        true
    }
}

/// The host's trust roots for upstream certificates, read once (blocking file reads).
async fn upstream_roots() -> Result<Arc<rustls::RootCertStore>, SecretError> {
    static ROOTS: tokio::sync::OnceCell<Arc<rustls::RootCertStore>> =
        tokio::sync::OnceCell::const_new();
    ROOTS
        .get_or_try_init(|| async {
            off_worker(hutch_broker::native_roots)
                .await
                .map(Arc::new)
                .map_err(SecretError::Broker)
        })
        .await
        .cloned()
}

impl SecretStore {
    /// A sandbox's attached secrets as its broker holds them.
    fn for_broker(&self, spec: &SandboxSpec) -> Vec<AttachedSecret> {
        self.attached(spec)
            .into_iter()
            .map(|a| AttachedSecret {
                name: a.name,
                value: a.value,
                placeholder: a.placeholder,
                bindings: a.bindings,
            })
            .collect()
    }
}

impl Manager {
    /// Starts the secret broker of sandbox `id` if it has secrets and a NIC (without a NIC it
    /// reaches nothing a secret could go to). A sandbox whose broker cannot start fails.
    pub(crate) async fn start_broker(&self, id: &str, spec: &SandboxSpec) -> Result<(), CoreError> {
        if spec.placeholders.is_empty() || !spec.network.has_nic() {
            return Ok(());
        }
        let store = self.secret_store()?.clone();
        let intercepted = self.net()?.intercept(id).await?;
        let ca = {
            let (store, id) = (store.clone(), id.to_string());
            off_worker(move || {
                let files = store.sandbox_ca(&id)?;
                SandboxCa::from_pem(&id, &files.cert_pem, &files.key_pem)
                    .map_err(SecretError::Broker)
            })
            .await?
        };
        let broker = Broker::new(BrokerConfig {
            sandbox_id: id.to_string(),
            secrets: store.for_broker(spec),
            ca,
            upstream_roots: upstream_roots().await?,
            dns: intercepted.dns,
            egress: Arc::new(PolicyInTheNamespace),
            events: Arc::new(BrokerEvents {
                log: store.log().clone(),
                feed: self.guest_feed().cloned(),
            }),
            dial: intercepted.dial,
        })
        .map_err(SecretError::Broker)?;
        let serving = broker.clone();
        let listener = intercepted.listener;
        let task = tokio::spawn(async move {
            let e = serving.serve(listener).await;
            tracing::warn!(error = %e, "secret broker stopped accepting");
        });
        let old = self
            .brokers
            .0
            .lock()
            .unwrap()
            .insert(id.to_string(), (broker, task.abort_handle()));
        if let Some((_, old)) = old {
            old.abort();
        }
        tracing::info!(%id, "secret broker serving");
        Ok(())
    }

    /// Stops sandbox `id`'s broker (ending its connections), if it has one.
    pub(crate) fn stop_broker(&self, id: &str) {
        if let Some((_, task)) = self.brokers.0.lock().unwrap().remove(id) {
            task.abort();
        }
    }

    /// Gives every running broker its sandbox's secrets as they are now (a value set again
    /// is used from the next request on).
    pub(crate) async fn refresh_brokers(&self) {
        let Some(store) = self.cfg.secrets.clone() else {
            return;
        };
        let running: Vec<(String, Broker)> = self
            .brokers
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(id, (b, _))| (id.clone(), b.clone()))
            .collect();
        for (id, broker) in running {
            if let Ok(info) = self.info(&id).await {
                broker.set_secrets(store.for_broker(&info.spec));
            }
        }
    }
}
