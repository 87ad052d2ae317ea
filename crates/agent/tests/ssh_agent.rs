//! SSH agent forwarding end to end without a VM: the real agent binary (as a host process)
//! serves `SSH_AUTH_SOCK`, the real host channel forwards its connections to the host's agent
//! for one key, and OpenSSH's own `ssh` (run through an exec, as in a guest) logs in to a real
//! `sshd` on loopback — when that server's host key is on the secret's allow-list, and only
//! then. Needs `ssh`, `ssh-keygen`, `ssh-add` and `/usr/sbin/sshd` (openssh-client and
//! openssh-server; `scripts/test.sh` installs them); skipped without them unless
//! `HUTCH_REQUIRE_SSH_TESTS=1`.

// Tests wait on processes synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::Duration,
};

use hutch_broker::{ssh::SshAgentKey, EventSink, SecretValue};
use hutch_protocol::{
    host::{Channel, ExecEvent, SshAgentFuture, SshAgentServer},
    ExecRequest, ExitStatus,
};
use hutch_types::{BrokerDecision, BrokerEvent};

const SSHD: &str = "/usr/sbin/sshd";

/// Whether the OpenSSH tools are here; a test without them is skipped unless required.
fn have_openssh() -> bool {
    let ok = Path::new(SSHD).exists()
        && Command::new("ssh-keygen").arg("-?").output().is_ok()
        && Command::new("ssh").arg("-V").output().is_ok();
    if !ok && std::env::var_os("HUTCH_REQUIRE_SSH_TESTS").is_some() {
        panic!("HUTCH_REQUIRE_SSH_TESTS is set but openssh-client/openssh-server are missing");
    }
    ok
}

#[derive(Default)]
struct Events(Mutex<Vec<BrokerEvent>>);

impl EventSink for Events {
    fn record(&self, event: BrokerEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// The host's agent for one key, as the daemon binds it to a sandbox's channel.
struct HostAgent(Arc<SshAgentKey>);

impl SshAgentServer for HostAgent {
    fn serve(&self, stream: tokio::io::DuplexStream) -> SshAgentFuture {
        Box::pin(self.0.clone().serve(stream))
    }
}

/// A fresh Ed25519 key pair at `path` (and `path.pub`); the public line.
fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// `sshd` on 127.0.0.1 with `host_key`, accepting `authorized` for root; killed on drop.
struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sshd(dir: &Path, host_key: &Path, authorized: &str) -> Sshd {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let keys = dir.join("authorized_keys");
    std::fs::write(&keys, format!("{authorized}\n")).unwrap();
    let config = dir.join(format!("sshd_config.{port}"));
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile {}/sshd.{port}.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            host_key.display(),
            keys.display(),
            dir.display(),
        ),
    )
    .unwrap();
    // Privilege separation wants its empty directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    // Killed and waited for by `Sshd`'s drop, also when it never listens.
    let sshd = Sshd {
        child: Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .spawn()
            .unwrap(),
        port,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return sshd;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sshd did not listen on {port}");
}

/// The agent binary serving one end of a socket pair, its SSH socket at `socket`.
fn spawn_agent(socket: &Path) -> (Child, tokio::net::UnixStream) {
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = guest.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hutch-agent"));
    cmd.args(["--serve-fd", "3"])
        .env("HUTCH_SSH_AUTH_SOCK", socket);
    // SAFETY: dup2 is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(guest);
    host.set_nonblocking(true).unwrap();
    (child, tokio::net::UnixStream::from_std(host).unwrap())
}

/// Runs `script` through the channel with `SSH_AUTH_SOCK` set, as a guest exec would.
async fn run(channel: &Channel, socket: &Path, script: &str) -> (i32, String, String) {
    let mut req = ExecRequest::shell(script);
    req.env = vec![("SSH_AUTH_SOCK".into(), socket.display().to_string())];
    req.timeout_ms = Some(30_000);
    let mut exec = channel.exec(req).await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match exec.next_event().await.unwrap() {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(d) => err.extend(d),
            ExecEvent::Exited(info) => {
                let code = match info.status {
                    ExitStatus::Code(c) => c,
                    ExitStatus::Signal(s) => 128 + s,
                };
                return (
                    code,
                    String::from_utf8_lossy(&out).into_owned(),
                    String::from_utf8_lossy(&err).into_owned(),
                );
            }
        }
    }
}

/// `ssh -T` to `sshd` trusting `host_pub` for it, running `echo logged-in`.
fn ssh_script(dir: &Path, sshd: &Sshd, host_pub: &str) -> String {
    let known = dir.join(format!("known_hosts.{}", sshd.port));
    std::fs::write(&known, format!("[127.0.0.1]:{} {host_pub}\n", sshd.port)).unwrap();
    format!(
        "ssh -T -F /dev/null -p {} -o BatchMode=yes -o StrictHostKeyChecking=yes \
         -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null root@127.0.0.1 echo logged-in",
        sshd.port,
        known.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_the_forwarded_agent_logs_in_only_to_an_allowed_host() {
    if !have_openssh() {
        eprintln!("skipped: no openssh-client/openssh-server");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let user_pub = keygen(&d.join("user"));
    let allowed_pub = keygen(&d.join("host_allowed"));
    let other_pub = keygen(&d.join("host_other"));
    let private = std::fs::read(d.join("user")).unwrap();

    let events = Arc::new(Events::default());
    let agent = SshAgentKey::new(
        "sb-ssh",
        "deploy",
        &SecretValue::new(private.clone()),
        std::slice::from_ref(&allowed_pub),
        events.clone(),
    )
    .unwrap();
    let socket: PathBuf = d.join("agent.sock");
    let (mut child, stream) = spawn_agent(&socket);
    let channel = Channel::connect(stream).await.unwrap();
    channel.serve_ssh_agent(Arc::new(HostAgent(Arc::new(agent))));
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The forwarded agent lists the secret's key, and only it.
    let (code, out, err) = run(&channel, &socket, "ssh-add -L").await;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<&str> = out.lines().collect();
    assert_eq!(listed.len(), 1, "{out}");
    assert!(
        listed[0].starts_with(user_pub.as_str()),
        "{out} vs {user_pub}"
    );

    // An allowed host: the login succeeds through the forwarded agent.
    let good = sshd(d, &d.join("host_allowed"), &user_pub);
    let (code, out, err) = run(&channel, &socket, &ssh_script(d, &good, &allowed_pub)).await;
    assert_eq!((code, out.trim()), (0, "logged-in"), "ssh said: {err}");
    drop(good);

    // A host whose key is not on the list (the client trusts it; the agent does not).
    let other = sshd(d, &d.join("host_other"), &user_pub);
    let (code, out, err) = run(&channel, &socket, &ssh_script(d, &other, &other_pub)).await;
    assert_ne!(code, 0, "must not log in: {out}");
    assert!(err.contains("Permission denied"), "ssh said: {err}");
    drop(other);

    let events = events.0.lock().unwrap().clone();
    let signed: Vec<_> = events
        .iter()
        .filter(|e| e.decision == BrokerDecision::Signed)
        .collect();
    assert_eq!(signed.len(), 1, "{events:?}");
    assert!(events.iter().any(|e| e.decision == BrokerDecision::Refused
        && e.reason.as_deref().unwrap_or("").contains("allow-list")));
    // No event carries key material.
    let text = serde_json_like(&events);
    let private_text = String::from_utf8(private).unwrap();
    let body: String = private_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!text.contains(&body[..40]), "{text}");
    let _ = child.kill();
    let _ = child.wait();
}

fn serde_json_like(events: &[BrokerEvent]) -> String {
    format!("{events:?}")
}
