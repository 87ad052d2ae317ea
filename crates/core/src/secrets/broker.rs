//! Each sandbox's secret broker ([`hutch_broker::Broker`]), run by the manager: started when a
//! sandbox with secrets and a NIC becomes live (booted, restored, handed out, adopted after a
//! restart), given new values when a secret is set again, and stopped before its network goes.
//!
//! The broker listens inside the sandbox's namespace ([`HostNetwork::intercept`]), reads the
//! names the sandbox's DNS filter answered, dials upstream from that namespace (whose `output`
//! chain holds it to the sandbox's policy and deny lists), and records every decision in the
//! secret store's [`BrokerLog`].

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use hutch_broker::{AttachedSecret, Broker, BrokerConfig, EgressCheck, SandboxCa};
use hutch_types::{BrokerEvent, SandboxSpec};
use tokio::task::AbortHandle;

use super::{log::BrokerLog, SecretError, SecretStore};
use crate::{
    blocking::off_worker,
    exec::{run_capped, OverCap},
    manager::CoreError,
    Manager, Sandbox,
};

/// How long the guest's self-test request may take.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The host's trust roots for upstream certificates (read once: blocking file reads) and the
/// store's `extra` ones.
async fn upstream_roots(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::RootCertStore>, SecretError> {
    static ROOTS: tokio::sync::OnceCell<Arc<rustls::RootCertStore>> =
        tokio::sync::OnceCell::const_new();
    let native = ROOTS
        .get_or_try_init(|| async {
            off_worker(hutch_broker::native_roots)
                .await
                .map(Arc::new)
                .map_err(SecretError::Broker)
        })
        .await?;
    if extra.is_empty() {
        return Ok(native.clone());
    }
    let mut roots = (**native).clone();
    roots.add_parsable_certificates(extra.iter().cloned());
    Ok(Arc::new(roots))
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
    /// Where a sandbox's broker and SSH agent record their decisions: the secret log and,
    /// when journals are kept, the sandbox's journal.
    pub(crate) fn secret_events(&self, store: &SecretStore) -> Arc<dyn hutch_broker::EventSink> {
        Arc::new(BrokerEvents {
            log: store.log().clone(),
            feed: self.guest_feed().cloned(),
        })
    }

    /// Starts the secret broker of sandbox `id` if it has secrets and a NIC (without a NIC it
    /// reaches nothing a secret could go to). A sandbox whose broker cannot start fails.
    pub(crate) async fn start_broker(&self, id: &str, spec: &SandboxSpec) -> Result<(), CoreError> {
        self.serve_broker(id, spec).await.map(drop)
    }

    /// [`Manager::start_broker`], then the self-test from the guest (a new sandbox, before
    /// anything runs in it): a sandbox whose traffic does not reach its broker fails.
    pub(crate) async fn start_checked_broker(
        &self,
        id: &str,
        spec: &SandboxSpec,
        sandbox: &Sandbox,
    ) -> Result<(), CoreError> {
        match self.serve_broker(id, spec).await? {
            Some(canary) => self_test(id, sandbox, canary).await,
            None => Ok(()),
        }
    }

    /// Starts the broker (see [`Manager::start_broker`]); returns where the guest's self-test
    /// goes, `None` when the sandbox needs no broker.
    async fn serve_broker(
        &self,
        id: &str,
        spec: &SandboxSpec,
    ) -> Result<Option<SocketAddr>, CoreError> {
        if spec.placeholders.is_empty() || !spec.network.has_nic() {
            return Ok(None);
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
            upstream_roots: upstream_roots(store.extra_roots()).await?,
            dns: intercepted.dns,
            egress: Arc::new(PolicyInTheNamespace),
            events: self.secret_events(&store),
            dial: intercepted.dial,
        })
        .map_err(SecretError::Broker)?;
        let serving = broker.clone();
        let (listener, canary) = (intercepted.listener, intercepted.canary);
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
        Ok(Some(canary))
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

/// The broker's self-test, run by the guest: a plain HTTP request for
/// [`hutch_broker::CANARY_HOST`] to `canary` (bash's `/dev/tcp`: no client needed in the image)
/// must come back from this sandbox's broker.
async fn self_test(id: &str, sandbox: &Sandbox, canary: SocketAddr) -> Result<(), CoreError> {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} || exit 3; printf 'GET / HTTP/1.0\\r\\nHost: {}\\r\\n\\r\\n' >&3; cat <&3",
        canary.ip(),
        canary.port(),
        hutch_broker::CANARY_HOST
    );
    let mut req = hutch_protocol::ExecRequest::new(vec!["bash".into(), "-c".into(), script]);
    req.timeout_ms = Some(SELF_TEST_TIMEOUT.as_millis() as u64);
    let run = run_capped(sandbox.channel(), req, None, 4096, OverCap::Kill, None);
    let want = format!("{}{id}", hutch_broker::CANARY_REPLY);
    let why = match tokio::time::timeout(SELF_TEST_TIMEOUT + Duration::from_secs(2), run).await {
        Err(_) => "no answer in time".to_string(),
        Ok(Err(e)) => format!("the guest could not run it: {}", crate::chain(&e)),
        Ok(Ok(out)) if String::from_utf8_lossy(&out.stdout).contains(&want) => {
            tracing::debug!(%id, "secret broker self-test passed");
            return Ok(());
        }
        Ok(Ok(out)) => format!(
            "the guest's request to {canary} was not answered by the broker: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    Err(SecretError::SelfTest(why).into())
}
