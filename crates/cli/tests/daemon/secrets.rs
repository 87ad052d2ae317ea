//! Secrets in a real guest: it sees each attached secret only as a placeholder, the broker's
//! CA is installed (trust store, bundle, the variables tools read), git answers bound hosts
//! with the placeholder, and the value is nowhere in the guest: not in its environment, any
//! process's `/proc/*/environ`, the files Hutch wrote, or its console.

use hutch_api::{CreateSandbox, SetSecretBody};
use hutch_types::{SandboxSpec, SecretBinding, SecretLocation, PLACEHOLDER_PREFIX};

use crate::{check, cli, on_rt, sh, suite, Result};

fn binding(host: &str, at: SecretLocation) -> SecretBinding {
    SecretBinding {
        host: host.into(),
        port: 443,
        path: None,
        methods: vec![],
        at,
        fetch_only: false,
    }
}

pub fn a_guest_holds_placeholders_and_the_ca_never_the_value() -> Result {
    let value = format!("hutch-test-value-{:016x}", rand_u64());
    let shown = value.clone();
    on_rt(async move {
        let c = &suite().client;
        let key = SetSecretBody {
            value: value.clone(),
            env: Some("VM_API_KEY".into()),
            bindings: Some(vec![binding(
                "api.example.test",
                SecretLocation::Header {
                    name: "x-api-key".into(),
                },
            )]),
            labels: Default::default(),
            ssh_allowed_host_keys: None,
        };
        c.set_secret("vm-key", &key).await?;
        let git = SetSecretBody {
            env: Some("VM_GIT_TOKEN".into()),
            bindings: Some(vec![binding(
                "git.example.test",
                SecretLocation::BasicPassword,
            )]),
            ..key.clone()
        };
        c.set_secret("vm-git", &git).await?;
        let req = CreateSandbox {
            spec: SandboxSpec {
                memory_mib: 256,
                disk_mib: 256,
                secrets: vec!["vm-key".into(), "vm-git".into()],
                ..Default::default()
            },
            idempotency_key: None,
        };
        let info = c.create(&req).await?;
        let id = info.id.as_str();
        check(
            info.spec.placeholders.is_empty(),
            "the API showed a placeholder",
        )?;

        let env = sh(c, id, "env").await?;
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(String::from)
        };
        let key_ph = var("VM_API_KEY").ok_or("no VM_API_KEY in the guest")?;
        let git_ph = var("VM_GIT_TOKEN").ok_or("no VM_GIT_TOKEN in the guest")?;
        check(
            key_ph.starts_with(PLACEHOLDER_PREFIX),
            format!("placeholder {key_ph}"),
        )?;
        check(key_ph != git_ph, "two secrets share a placeholder")?;
        for v in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
        ] {
            check(
                var(v).as_deref() == Some("/etc/hutch/ca-bundle.pem"),
                format!("{v} in {env}"),
            )?;
        }

        // A real client trusts the sandbox's CA through the bundle the variables name, and
        // the distro's roots are still there.
        let trusted = sh(
            c,
            id,
            "python3 -c 'import ssl; cs = ssl.create_default_context().get_ca_certs(); \
             print(len(cs), sum(\"Hutch sandbox \" in str(x[\"subject\"]) for x in cs))'",
        )
        .await?;
        let (roots, ours) = trusted.split_once(' ').ok_or("python's answer")?;
        check(
            roots.parse::<usize>().unwrap_or(0) > 50,
            format!("roots: {trusted}"),
        )?;
        check(
            ours == "1",
            format!("the sandbox CA is trusted once: {trusted}"),
        )?;
        sh(c, id, "cmp /usr/local/share/ca-certificates/hutch-sandbox.crt /etc/hutch/ca-bundle.distro.pem && exit 1 || tail -c 200 /etc/ssl/certs/ca-certificates.crt | grep -q 'END CERTIFICATE'").await?;

        // git asks the helper, which answers the bound host with the placeholder only.
        let fill = sh(
            c,
            id,
            "printf 'protocol=https\\nhost=git.example.test\\n\\n' | GIT_TERMINAL_PROMPT=0 git credential fill",
        )
        .await?;
        check(
            fill.contains("username=x-access-token")
                && fill.contains(&format!("password={git_ph}")),
            format!("git credential fill: {fill}"),
        )?;
        let rewrite = sh(
            c,
            id,
            "git config --get-all url.https://git.example.test/.insteadOf",
        )
        .await?;
        check(
            rewrite.lines().any(|l| l == "git@git.example.test:"),
            format!("insteadOf: {rewrite}"),
        )?;
        let other = c
            .exec(
                id,
                &hutch_api::ExecBody {
                    argv: vec![
                        "sh".into(),
                        "-c".into(),
                        "printf 'protocol=https\\nhost=evil.example.test\\n\\n' | GIT_TERMINAL_PROMPT=0 git credential fill".into(),
                    ],
                    ..Default::default()
                },
            )
            .await?;
        check(
            !other.stdout.contains(PLACEHOLDER_PREFIX),
            format!("an unbound host got a placeholder: {}", other.stdout),
        )?;

        // The value is nowhere in the guest: its console first, then (the value given on
        // stdin, so that it is in no argv) every process's environment and Hutch's files.
        check(!env.contains(&value), "the value is in the guest's env")?;
        let console = c.console(id).await?;
        check(
            !String::from_utf8_lossy(&console).contains(&value),
            "the value is in the console log",
        )?;
        let search = hutch_api::ExecBody {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "read -r v; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done 2>/dev/null | grep -cF \"$v\"; \
                 grep -rlsF \"$v\" /etc /run /tmp /root /usr/local | wc -l"
                    .into(),
            ],
            stdin: Some(format!("{value}\n")),
            ..Default::default()
        };
        let found = c.exec(id, &search).await?.stdout;
        check(
            found.split_whitespace().collect::<Vec<_>>() == ["0", "0"],
            format!("the value was found in the guest: {found}"),
        )?;
        check(c.secret_log(id).await?.is_empty(), "a log without a broker")?;

        // The CLI lists names and bindings, never the value, and refuses to remove one in use.
        let (ok, out, err) = cli(&["secret", "ls"])?;
        check(
            ok && out.contains("vm-key") && out.contains("api.example.test:443"),
            format!("secret ls: {out}{err}"),
        )?;
        check(!out.contains(&value), "secret ls shows the value")?;
        let (ok, _, err) = cli(&["secret", "rm", "vm-key"])?;
        check(!ok && err.contains("attached"), format!("rm in use: {err}"))?;
        let (ok, _, err) = cli(&["secret", "log", id])?;
        check(ok, format!("secret log: {err}"))?;

        c.destroy(id).await?;
        c.remove_secret("vm-key").await?;
        c.remove_secret("vm-git").await?;
        check(c.secrets().await?.is_empty(), "secrets left")?;
        Ok::<(), libtest_mimic::Failed>(())
    })?;
    // The daemon's own files hold no plain value.
    let dir = suite().home.join("secrets");
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p)?;
                check(
                    !bytes.windows(shown.len()).any(|w| w == shown.as_bytes()),
                    format!("{} holds the value", p.display()),
                )?;
            }
        }
    }
    Ok(())
}

pub(crate) fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("urandom");
    u64::from_le_bytes(b)
}
