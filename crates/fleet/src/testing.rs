//! A real etcd for tests: Debian's `etcd-server` (`etcd` on `PATH`, or `HUTCH_ETCD_BIN`),
//! one member on free loopback ports, its data in a temporary directory.

use std::{net::TcpListener, path::PathBuf, time::Duration};

use tokio::process::{Child, Command};

/// A running single-member etcd, killed (and its data removed) when dropped.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("a temporary directory for etcd");
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.launch().await;
        etcd
    }

    /// The fleet URL clients connect with.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (as a crash would: SIGKILL), keeping its data.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("killing etcd");
        }
    }

    /// Starts etcd again on the same data and ports.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    async fn launch(&mut self) {
        let bin = std::env::var_os("HUTCH_ETCD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| "etcd".into());
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(&bin)
            .arg("--name=t")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): install Debian's etcd-server or set HUTCH_ETCD_BIN",
                    bin.display()
                )
            });
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(fleet) = crate::Fleet::connect(&self.url()).await {
                if fleet.client().get("health", None).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        panic!("etcd did not answer within 10 s; its log:\n{log}");
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}
