//! Workload identity and metrics, checked by tools nobody here wrote: a guest process gets a
//! token from `hutch-identity`, PyJWT verifies it against the JWKS it fetches over HTTP from
//! the daemon's TCP listener (right audience accepted; wrong audience and, after the suite's
//! short token lifetime, expiry refused), a second sandbox's token names that sandbox, and
//! `promtool check metrics` accepts `/metrics`, whose counters move with what happened.

use std::{process::Command, time::Duration};

use serde_json::Value;

use crate::*;

/// The token lifetime the suite's daemon is started with (`--identity-token-ttl`).
pub(crate) const TOKEN_TTL_SECS: u64 = 10;

/// Fetches the discovery document and the JWKS over HTTP, as a service would, and verifies
/// `token` for `audience` with PyJWT: `{"ok": true, "claims": …}` or `{"ok": false, "error":
/// <PyJWT's exception name>}`.
const VERIFY: &str = r#"
import json, sys, urllib.request
import jwt
issuer, audience, token = sys.argv[1:4]
discovery = json.load(urllib.request.urlopen(issuer + "/.well-known/openid-configuration"))
assert discovery["issuer"] == issuer, discovery
key = jwt.PyJWKClient(discovery["jwks_uri"]).get_signing_key_from_jwt(token)
try:
    claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience=audience, issuer=issuer,
                        options={"require": ["exp", "iat", "sub", "aud", "iss"]})
    print(json.dumps({"ok": True, "claims": claims}))
except jwt.InvalidTokenError as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
"#;

/// PyJWT's interpreter: `$HUTCH_TEST_PYTHON_JWT` (scripts/test.sh's venv), else `python3`.
fn python() -> String {
    std::env::var("HUTCH_TEST_PYTHON_JWT").unwrap_or_else(|_| "python3".into())
}

fn verify(issuer: &str, audience: &str, token: &str) -> Result<Value> {
    let out = Command::new(python())
        .args(["-c", VERIFY, issuer, audience, token])
        .output()
        .map_err(|e| format!("cannot run {} (PyJWT): {e}", python()))?;
    check(
        out.status.success(),
        format!("PyJWT failed: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `GET /metrics` over TCP with `token` (curl, a client nobody here wrote): status and body.
fn scrape(tcp: &str, token: &str) -> Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://{tcp}/metrics"))
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let (body, status) = text.rsplit_once('\n').ok_or("no status from curl")?;
    Ok((status.parse()?, body.to_string()))
}

/// `promtool check metrics` on `body`: its complaints, if any.
fn promtool_check(body: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    check(
        out.status.success(),
        format!(
            "promtool refused /metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The value of the sample `series` (name and labels, exactly as exposed).
fn sample(body: &str, series: &str) -> Result<f64> {
    let line = body
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .ok_or_else(|| format!("no {series} in /metrics:\n{body}"))?;
    Ok(line.trim().parse()?)
}

pub(crate) fn guests_get_tokens_pyjwt_verifies_and_metrics_move() -> Result {
    let admin = access::token_cmd(&["create"])?;
    let scoped = access::token_cmd(&["create", "--label", "team=y"])?;
    let tcp = suite().daemon.lock().unwrap().tcp.clone();
    let issuer = format!("http://{tcp}");

    let (status, before) = scrape(&tcp, &admin)?;
    check(status == 200, format!("admin /metrics: {status}"))?;
    promtool_check(&before)?;
    let (status, _) = scrape(&tcp, &scoped)?;
    check(
        status == 403,
        format!("a scoped token reads /metrics: {status}"),
    )?;
    let cold = "hutch_sandbox_creates_total{path=\"cold\"}";
    let issued = "hutch_identity_tokens_issued_total";

    let (a, b, token_a, token_b) = on_rt(async move {
        let c = suite().client.clone();
        let a = c
            .create(&spec(&[("team", "y")]))
            .await
            .map_err(|e| e.to_string())?
            .id;
        let b = c
            .create(&spec(&[("team", "z")]))
            .await
            .map_err(|e| e.to_string())?
            .id;
        let get = "hutch-identity token --audience https://svc.example";
        let token_a = sh(&c, &a, get).await?;
        // Any user in the guest may ask: the token names the sandbox, not the process.
        let as_nobody = format!("setpriv --reuid=65534 --regid=65534 --clear-groups {get}");
        let token_b = sh(&c, &b, &as_nobody).await?;
        // Bad audiences are refused in the guest with the host's reason.
        let bad = sh(
            &c,
            &a,
            "hutch-identity token --audience 'two words' 2>&1; echo rc=$?",
        )
        .await?;
        check(
            bad.contains("visible ASCII") && bad.ends_with("rc=1"),
            format!("bad audience: {bad}"),
        )?;
        Ok::<_, Failed>((a, b, token_a, token_b))
    })?;

    let ok = verify(&issuer, "https://svc.example", &token_a)?;
    check(ok["ok"] == true, format!("PyJWT refused a's token: {ok}"))?;
    let claims = &ok["claims"];
    check(claims["sub"] == a.as_str(), format!("a's sub: {claims}"))?;
    check(
        claims["labels"]["team"] == "y",
        format!("a's labels: {claims}"),
    )?;
    check(claims["image"] == "default", format!("a's image: {claims}"))?;
    check(
        claims["image_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        format!("a's image digest: {claims}"),
    )?;
    let lifetime = claims["exp"].as_u64().zip(claims["iat"].as_u64());
    check(
        lifetime.map(|(e, i)| e - i) == Some(TOKEN_TTL_SECS),
        format!("a's lifetime: {claims}"),
    )?;
    let wrong = verify(&issuer, "https://other.example", &token_a)?;
    check(
        wrong["error"] == "InvalidAudienceError",
        format!("wrong audience: {wrong}"),
    )?;
    let other = verify(&issuer, "https://svc.example", &token_b)?;
    check(
        other["ok"] == true && other["claims"]["sub"] == b.as_str(),
        format!("b's token must name b ({b}): {other}"),
    )?;

    let (_, after) = scrape(&tcp, &admin)?;
    promtool_check(&after)?;
    let created = sample(&after, cold)? - sample(&before, cold)?;
    check(created >= 2.0, format!("cold creates moved by {created}"))?;
    let tokens = sample(&after, issued)? - sample(&before, issued)?;
    check(tokens == 2.0, format!("tokens issued moved by {tokens}"))?;
    check(
        sample(&after, "hutch_sandboxes{state=\"running\"}")? >= 2.0,
        "two running sandboxes at least",
    )?;
    check(
        sample(&after, "process_resident_memory_bytes")? > 0.0,
        "daemon RSS",
    )?;

    // Past its lifetime the token is refused.
    std::thread::sleep(Duration::from_secs(TOKEN_TTL_SECS + 1));
    let expired = verify(&issuer, "https://svc.example", &token_a)?;
    check(
        expired["error"] == "ExpiredSignatureError",
        format!("expired token: {expired}"),
    )?;

    on_rt(async move {
        let c = suite().client.clone();
        for id in [a, b] {
            c.destroy(&id).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}
