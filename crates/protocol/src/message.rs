//! The messages each side may send. Variant order is part of the wire format (postcard encodes
//! the variant index); append new variants at the end and bump [`crate::PROTOCOL_VERSION`].

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What travels inside one frame: an operation id and one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<M> {
    /// Operation this message belongs to; [`crate::CONNECTION_OP`] for connection-level ones.
    pub op: u32,
    /// The message itself.
    pub msg: M,
}

/// Messages the host sends to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    /// Opens the connection: the versions the host can speak.
    Hello(Hello),
    /// One-time boot setup: entropy, clock and identity from the host. Answered by `Done`.
    Setup(Setup),
    /// Starts a process. Answered by `Started` (or `Error`), output, then `Exited`.
    Exec(ExecRequest),
    /// Bytes for the process's stdin (at most [`crate::MAX_CHUNK`], within credit).
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Closes the process's stdin.
    StdinEof,
    /// Sends a signal to the process's whole process group.
    Signal(i32),
    /// Grants the peer this many more bytes of data for this operation.
    Credit(u32),
    /// Starts writing a file; followed by `FileData` chunks and `FileEof`, answered by `Done`.
    WriteFile(WriteFileRequest),
    /// A chunk of a file being written.
    FileData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Ends the file being written.
    FileEof,
    /// Reads a file; answered by `FileData` chunks and `FileEnd`, or `Error`.
    ReadFile(ReadFileRequest),
    /// Liveness check, answered by `Pong` with the same nonce.
    Ping(u64),
    /// Syncs filesystems and powers the VM off; answered by `Done` just before.
    Shutdown,
    /// New terminal size for an exec that runs under a PTY.
    Resize(TtySize),
    /// Configures the guest's NIC, default route and resolver (version 3). Answered by `Done`
    /// once applied, or `Error`.
    Network(NetworkConfig),
    /// Makes the guest a sandbox of its own (version 4): writes its machine-id and sandbox id,
    /// so a clone restored from a snapshot does not keep its template's. Answered by `Done`,
    /// or `Error`.
    Identity(GuestIdentity),
    /// Installs what a sandbox with secrets needs (version 5): its broker's CA certificate in
    /// the trust store and [`CA_BUNDLE`], and a git credential helper answering with
    /// placeholders for bound hosts. Sent again at every hand-out (clones, forks, pools), it
    /// replaces what an earlier one installed. Answered by `Done`, or `Error`.
    Trust(GuestTrust),
    /// Answers a guest's [`GuestMsg::TokenRequest`] (version 5) on the guest's operation id:
    /// a JWT the host signed for this sandbox. Ends the request.
    Token(String),
    /// Refuses a guest's request (version 5) on the guest's operation id: rate limited, bad
    /// audience, or no issuer on this host. Ends the request.
    Refused(OpError),
    /// Bytes from the host's SSH agent for a forwarded connection (version 6), on the guest's
    /// operation id: at most [`crate::MAX_CHUNK`], within the credit the guest granted
    /// ([`crate::SSH_WINDOW`] to start).
    SshData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The host's SSH agent closed a forwarded connection (version 6): the guest closes its
    /// socket and ends the operation with its own `SshClose`.
    SshClose,
}

/// Messages the guest agent sends to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMsg {
    /// Answer to `Hello`: the version chosen and who is speaking.
    Welcome(Welcome),
    /// The operation succeeded and is over.
    Done,
    /// The operation failed and is over.
    Error(OpError),
    /// The process is running with this pid (inside the guest).
    Started(u32),
    /// Bytes the process wrote to stdout.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes the process wrote to stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process ended; the operation is over.
    Exited(ExitInfo),
    /// Grants the host this many more bytes of data (stdin, file data) for this operation.
    Credit(u32),
    /// A chunk of a file being read.
    FileData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The file being read ended after this many bytes; the operation is over.
    FileEnd(u64),
    /// Answer to `Ping`.
    Pong(u64),
    /// Asks the host for a workload identity token (version 5). Sent on an operation id the
    /// guest chose, with [`crate::GUEST_OP_BIT`] set; answered by `Token` or `Refused`. The
    /// host decides whose token it is by the channel it came on, never by the request.
    TokenRequest(TokenRequest),
    /// A guest process connected to [`crate::SSH_AUTH_SOCK`] (version 6): opens a forwarded
    /// SSH agent connection on an operation id the guest chose, with [`crate::GUEST_OP_BIT`]
    /// set. At most [`crate::MAX_SSH_STREAMS`] are open at once. The host decides which key
    /// answers by the channel it came on.
    SshOpen,
    /// Bytes a guest process wrote to a forwarded SSH agent connection (version 6): at least
    /// one, at most [`crate::MAX_CHUNK`], within the host's credit ([`crate::SSH_WINDOW`] to
    /// start). The host grants more with `Credit` on the same operation.
    SshData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The guest's end of a forwarded SSH agent connection closed (version 6); ends the
    /// operation. Nothing more is sent on it.
    SshClose,
}

/// A guest process's request for a short-lived identity token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Who the token is for (its `aud` claim): 1 to [`TokenRequest::MAX_AUDIENCE`] visible
    /// ASCII characters (a URL or URN, typically).
    pub audience: String,
}

impl TokenRequest {
    /// Longest audience accepted, in bytes.
    pub const MAX_AUDIENCE: usize = 256;

    /// Checks the audience's length and characters (visible ASCII: no spaces, no control
    /// characters, nothing a log line or header could be confused by).
    pub fn check(&self) -> Result<(), OpError> {
        let a = &self.audience;
        let problem = if a.is_empty() {
            Some("the audience is empty".to_string())
        } else if a.len() > Self::MAX_AUDIENCE {
            Some(format!(
                "the audience has {} bytes, at most {} are allowed",
                a.len(),
                Self::MAX_AUDIENCE
            ))
        } else if !a.bytes().all(|b| b.is_ascii_graphic()) {
            Some("the audience may hold only visible ASCII characters".to_string())
        } else {
            None
        };
        match problem {
            Some(message) => Err(OpError {
                code: ErrorCode::InvalidRequest,
                message,
            }),
            None => Ok(()),
        }
    }
}

/// Opening message of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`crate::MAGIC`].
    pub magic: [u8; 4],
    /// Oldest version the host speaks.
    pub min_version: u16,
    /// Newest version the host speaks.
    pub max_version: u16,
}

/// The guest's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Always [`crate::MAGIC`].
    pub magic: [u8; 4],
    /// Version chosen for this connection.
    pub version: u16,
    /// The agent's own version string, for diagnostics.
    pub agent: String,
    /// The guest kernel's release (`uname -r`).
    pub kernel_release: String,
}

/// Boot-time facts only the host can supply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Random bytes to credit to the guest kernel's entropy pool (then reseed).
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
    /// Host wall clock: seconds since the Unix epoch.
    pub unix_secs: u64,
    /// Host wall clock: nanoseconds within the second.
    pub unix_nanos: u32,
    /// Hostname to give the guest.
    pub hostname: String,
}

/// Who a guest is, given by the host to every new sandbox (booted or restored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIdentity {
    /// For `/etc/machine-id` (32 lowercase hex digits); never all zeros.
    pub machine_id: [u8; 16],
    /// For `/etc/hutch/sandbox-id`: the sandbox's id, a valid hostname.
    pub sandbox_id: String,
}

/// The combined CA bundle (the distro's roots plus the sandbox's CA) the agent writes, and
/// that `SSL_CERT_FILE` and its kin name in every exec of a sandbox with secrets.
pub const CA_BUNDLE: &str = "/etc/hutch/ca-bundle.pem";
/// The git configuration the agent writes (`GIT_CONFIG_SYSTEM` in every exec of a sandbox with
/// secrets): includes `/etc/gitconfig`, adds the credential helper and `insteadOf` rules.
pub const GIT_CONFIG: &str = "/etc/hutch/gitconfig";
/// The git credential helper the agent installs.
pub const GIT_CREDENTIAL_HELPER: &str = "/usr/local/bin/git-credential-hutch";

/// A sandbox's trust material, given by the host to a guest with secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestTrust {
    /// The sandbox's CA certificate: one PEM `CERTIFICATE` block. Its key stays on the host.
    pub ca_pem: String,
    /// What git's credential helper answers, by host.
    pub git: Vec<GitCredential>,
}

/// One host the git credential helper answers for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitCredential {
    /// The host as git names it: a lowercase DNS name, with `:port` when not 443.
    pub host: String,
    /// The password to answer with (a placeholder; the user is `x-access-token`).
    pub password: String,
}

impl GuestTrust {
    /// Longest PEM accepted.
    pub const MAX_PEM: usize = 16 * 1024;
    /// Most git hosts.
    pub const MAX_GIT: usize = 64;

    /// Checks everything the agent will write, so nothing but a certificate and plain
    /// `host password` lines reach a file: one PEM block of base64 lines; hosts of
    /// `[a-z0-9.-]` with an optional port; passwords of `[a-z0-9_]`.
    pub fn validate(&self) -> Result<(), String> {
        check_pem(&self.ca_pem)?;
        if self.git.len() > Self::MAX_GIT {
            return Err(format!("more than {} git hosts", Self::MAX_GIT));
        }
        for c in &self.git {
            check_git_host(&c.host)?;
            let ok = (1..=128).contains(&c.password.len())
                && c.password
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(format!(
                    "git password for {} is not [a-z0-9_]{{1,128}}",
                    c.host
                ));
            }
        }
        Ok(())
    }
}

/// One PEM certificate block: header, base64 lines of at most 76 characters, footer.
fn check_pem(pem: &str) -> Result<(), String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let bad = |why: &str| Err(format!("CA certificate: {why}"));
    if pem.len() > GuestTrust::MAX_PEM {
        return bad("too long");
    }
    let lines: Vec<&str> = pem.trim_end_matches('\n').split('\n').collect();
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return bad("empty");
    };
    if *first != BEGIN || *last != END || lines.len() < 3 {
        return bad("not one PEM CERTIFICATE block");
    }
    let body = &lines[1..lines.len() - 1];
    let base64 = |l: &&str| {
        !l.is_empty()
            && l.len() <= 76
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    };
    if !body.iter().all(base64) {
        return bad("body is not base64 lines");
    }
    Ok(())
}

/// `name` or `name:port`, `name` lowercase DNS characters.
fn check_git_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let name_ok = (1..=253).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(format!(
            "git host {host:?} is not a lowercase DNS name with an optional port"
        ))
    }
}

/// The guest's network configuration, pushed by the host (no DHCP in the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// MAC address of the NIC to configure (the one the VMM gave the guest).
    pub mac: [u8; 6],
    /// The guest's address on that NIC.
    pub address: IpAddr,
    /// Prefix length of `address`'s subnet.
    pub prefix_len: u8,
    /// Default gateway, inside that subnet.
    pub gateway: IpAddr,
    /// Name servers for `/etc/resolv.conf`, in order (at most [`NetworkConfig::MAX_DNS`]).
    pub dns: Vec<IpAddr>,
}

impl NetworkConfig {
    /// Most name servers a resolver uses (glibc's `MAXNS`); more are refused.
    pub const MAX_DNS: usize = 3;
}

/// A process to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Extra environment, applied over the agent's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub cwd: Option<String>,
    /// User id to run as; root when absent.
    pub uid: Option<u32>,
    /// Group id to run as; the uid's value when absent.
    pub gid: Option<u32>,
    /// Whether the host will stream stdin; otherwise stdin is `/dev/null`.
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run under a pseudo-terminal of this size: stdin, stdout and stderr are its slave side,
    /// and all output arrives as `Stdout`.
    pub tty: Option<TtySize>,
}

impl ExecRequest {
    /// A request for `argv` with defaults: root, `/`, no stdin, no timeout, no terminal.
    pub fn new(argv: Vec<String>) -> ExecRequest {
        ExecRequest {
            argv,
            env: vec![],
            cwd: None,
            uid: None,
            gid: None,
            stdin: false,
            timeout_ms: None,
            tty: None,
        }
    }

    /// `sh -c script`.
    pub fn shell(script: &str) -> ExecRequest {
        ExecRequest::new(vec!["sh".into(), "-c".into(), script.into()])
    }
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited normally with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Final report of an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// How the process ended.
    pub status: ExitStatus,
    /// Whether the agent killed it because its timeout passed.
    pub timed_out: bool,
}

/// A file to write in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits of the file.
    pub mode: u32,
    /// Create missing parent directories.
    pub make_parents: bool,
}

/// A file to read from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Fail with `TooLarge` instead of sending more than this many bytes.
    pub max_bytes: u64,
}

/// Stable category of a failed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A file or program does not exist.
    NotFound,
    /// Permission denied.
    PermissionDenied,
    /// The request was malformed or not allowed in this state.
    InvalidRequest,
    /// A size limit was exceeded.
    TooLarge,
    /// Any other I/O failure.
    Io,
    /// No common protocol version.
    UnsupportedVersion,
    /// Too many requests: try again later (version 5).
    RateLimited,
}

/// A failed operation: a category plus a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpError {
    /// Stable category.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OpError {}

impl GuestMsg {
    /// Bytes of flow-controlled data this message carries.
    pub fn data_len(&self) -> usize {
        match self {
            GuestMsg::Stdout(d)
            | GuestMsg::Stderr(d)
            | GuestMsg::FileData(d)
            | GuestMsg::SshData(d) => d.len(),
            _ => 0,
        }
    }
}

impl HostMsg {
    /// Bytes of flow-controlled data this message carries.
    pub fn data_len(&self) -> usize {
        match self {
            HostMsg::Stdin(d) | HostMsg::FileData(d) | HostMsg::SshData(d) => d.len(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nAAAA==\n-----END CERTIFICATE-----\n";

    fn trust(ca_pem: &str, host: &str, password: &str) -> GuestTrust {
        GuestTrust {
            ca_pem: ca_pem.into(),
            git: vec![GitCredential {
                host: host.into(),
                password: password.into(),
            }],
        }
    }

    #[test]
    fn trust_admits_one_certificate_and_plain_git_lines_only() {
        assert_eq!(
            trust(PEM, "github.com", "hutch_ph_abc123").validate(),
            Ok(())
        );
        assert_eq!(trust(PEM, "git.example.test:8443", "x").validate(), Ok(()));
        let two = format!("{PEM}{PEM}");
        let bad = [
            trust("", "h", "p"),
            trust(&two, "h", "p"),
            trust(&PEM.replace("AAAA==", "AA\rAA"), "h", "p"),
            trust(&PEM.replace("AAAA==", "$(reboot)"), "h", "p"),
            trust(&PEM.replace("CERTIFICATE", "PRIVATE KEY"), "h", "p"),
            trust(PEM, "Host.test", "p"),
            trust(PEM, "h\nx", "p"),
            trust(PEM, "h:0", "p"),
            trust(PEM, "h:x", "p"),
            trust(PEM, "-h", "p"),
            trust(PEM, "h", ""),
            trust(PEM, "h", "a b"),
            trust(PEM, "h", "p\nusername=root"),
            trust(PEM, "h", &"a".repeat(129)),
        ];
        for t in bad {
            assert!(t.validate().is_err(), "{t:?}");
        }
        let many = GuestTrust {
            ca_pem: PEM.into(),
            git: vec![trust(PEM, "h", "p").git[0].clone(); GuestTrust::MAX_GIT + 1],
        };
        assert!(many.validate().is_err());
    }
}
