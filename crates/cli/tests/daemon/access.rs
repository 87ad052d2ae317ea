//! Who may do what, and how refusals look: token scopes, expiry and removal, CLI errors
//! and JSON shapes, stable 4xx codes.

use std::time::Duration;

use hutch_api::{client::ClientError, ExecBody, ExecStart};
use hutch_types::ErrorCode;

use crate::*;

pub(crate) fn tokens_are_scoped() -> Result {
    let token = |label: Option<&str>| -> Result<String> {
        let mut cmd = hutch(&suite().home);
        cmd.args(["token", "create"]);
        if let Some(l) = label {
            cmd.args(["--label", l]);
        }
        let out = cmd.output()?;
        check(
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let team_a = token(Some("team=a"))?;
    let (anon, with_a) = {
        let d = suite().daemon.lock().unwrap();
        (d.tcp_client(None), d.tcp_client(Some(&team_a)))
    };
    on_rt(async move {
        let c = suite().client.clone();
        let b = c
            .create(&spec(&[("team", "b")]))
            .await
            .map_err(|e| e.to_string())?
            .id;
        let unauthorized = anon.list(None, &[]).await;
        check(
            matches!(&unauthorized, Err(ClientError::Api { status: 401, .. })),
            format!("no token: {unauthorized:?}"),
        )?;
        let forbidden = with_a.inspect(&b).await;
        check(
            matches!(&forbidden, Err(ClientError::Api { status: 403, .. })),
            format!("team a on b: {forbidden:?}"),
        )?;
        let destroy = with_a.destroy(&b).await;
        check(
            matches!(&destroy, Err(ClientError::Api { status: 403, .. })),
            "team a destroyed b",
        )?;
        let a = with_a.create(&spec(&[])).await.map_err(|e| e.to_string())?;
        check(
            a.spec.labels.get("team").map(String::as_str) == Some("a"),
            "create not labelled by the token",
        )?;
        let seen: Vec<String> = with_a
            .list(None, &[])
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|s| s.id)
            .collect();
        check(seen == vec![a.id.clone()], format!("team a sees {seen:?}"))?;
        check(
            sh(&with_a, &a.id, "echo ok").await? == "ok",
            "exec over TCP",
        )?;
        with_a.destroy(&a.id).await.map_err(|e| e.to_string())?;
        c.destroy(&b).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// Runs `hutch token ARGS` on the suite's home; its stdout.
pub(crate) fn token_cmd(args: &[&str]) -> Result<String> {
    let out = hutch(&suite().home).arg("token").args(args).output()?;
    check(
        out.status.success(),
        format!("token {args:?}: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

/// `hutch token ls --json`, by id.
pub(crate) fn listed_tokens() -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    let all: Vec<serde_json::Value> = serde_json::from_str(&token_cmd(&["ls", "--json"])?)?;
    Ok(all
        .into_iter()
        .map(|t| (t["id"].as_str().unwrap_or_default().to_string(), t))
        .collect())
}

pub(crate) fn tokens_expire_are_listed_and_can_be_removed() -> Result {
    let before = listed_tokens()?;
    let short = token_cmd(&["create", "--ttl", "1s"])?.trim().to_string();
    let long = token_cmd(&["create", "--ttl", "1h", "--label", "team=z"])?
        .trim()
        .to_string();
    let (short_client, long_client) = {
        let d = suite().daemon.lock().unwrap();
        (d.tcp_client(Some(&short)), d.tcp_client(Some(&long)))
    };
    let fresh: Vec<(String, serde_json::Value)> = listed_tokens()?
        .into_iter()
        .filter(|(id, _)| !before.contains_key(id))
        .collect();
    check(
        fresh.len() == 2,
        format!("two new tokens listed: {fresh:?}"),
    )?;
    let shown = serde_json::to_string(&fresh)?;
    check(
        !shown.contains(short.trim_start_matches("hutch_"))
            && !shown.contains(long.trim_start_matches("hutch_")),
        "token ls shows a secret",
    )?;
    let (long_id, listed) = fresh
        .iter()
        .find(|(_, t)| t["label"] == "team=z")
        .ok_or("the labelled token is not listed")?;
    check(
        listed["last_used_at_ms"].is_null() && listed["expires_at_ms"].is_i64(),
        format!("a fresh token: {listed}"),
    )?;
    // Well past the short token's second.
    std::thread::sleep(Duration::from_millis(1500));
    let (expired, used) = on_rt(async move {
        (
            short_client.list(None, &[]).await,
            long_client.list(None, &[]).await.map(|l| l.len()),
        )
    });
    check(
        matches!(&expired, Err(ClientError::Api { status: 401, error }) if error.message.contains("expired")),
        format!("an expired token: {expired:?}"),
    )?;
    check(used.is_ok(), format!("a valid token: {used:?}"))?;
    check(
        listed_tokens()?[long_id]["last_used_at_ms"].is_i64(),
        "last use not recorded",
    )?;

    token_cmd(&["rm", long_id])?;
    let long_client = suite().daemon.lock().unwrap().tcp_client(Some(&long));
    let removed = on_rt(async move { long_client.list(None, &[]).await });
    check(
        matches!(&removed, Err(ClientError::Api { status: 401, .. })),
        format!("a removed token: {removed:?}"),
    )?;
    check(
        !listed_tokens()?.contains_key(long_id.as_str()),
        "a removed token is listed",
    )?;
    let again = hutch(&suite().home)
        .args(["token", "rm", long_id])
        .output()?;
    check(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("no such token"),
        "removing an unknown token succeeded",
    )
}

pub(crate) fn cli_errors_and_json_keep_their_shape() -> Result {
    // A refused WebSocket upgrade is the API's error, not a bare status.
    let (ok, _, err) = cli(&["exec", "sb-00000000", "--", "true"])?;
    check(
        !ok && err.contains("no such sandbox"),
        format!("exec on an unknown id: {err}"),
    )?;
    let refused = on_rt(async {
        suite()
            .client
            .exec_stream("sb-00000000", &ExecStart::default())
            .await
            .map(drop)
    });
    check(
        api_code(refused) == Some(ErrorCode::NotFound),
        "exec stream on an unknown id",
    )?;
    // Listings are arrays whatever their length.
    for args in [
        &["ls", "--json"][..],
        &["template", "ls", "--json"],
        &["image", "ls", "--json"],
        &["token", "ls", "--json"],
    ] {
        let (ok, out, err) = cli(args)?;
        check(ok, format!("{args:?}: {err}"))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        check(v.is_array(), format!("{args:?} printed {out}"))?;
    }
    let (ok, out, _) = cli(&["rm", "--json", "sb-00000000", "sb-00000001"])?;
    check(!ok, "rm of unknown ids succeeded")?;
    check(out.trim() == "[]", format!("rm --json printed {out}"))?;
    // Flags that would be dropped are refused instead.
    for args in [
        &["create", "--allow", "203.0.113.1"][..],
        &["create", "--template", "t", "--memory", "1024"],
    ] {
        let (ok, _, err) = cli(args)?;
        check(!ok && !err.is_empty(), format!("{args:?} was accepted"))?;
    }
    Ok(())
}

pub(crate) fn bad_input_gets_stable_4xx_codes() -> Result {
    on_rt(async {
        let c = suite().client.clone();
        check(
            api_code(c.inspect("sb-00000000").await) == Some(ErrorCode::NotFound),
            "unknown id",
        )?;
        check(
            api_code(c.inspect("../etc").await) == Some(ErrorCode::NotFound),
            "bad id",
        )?;
        let mut huge = spec(&[]);
        huge.spec.cpus = 0;
        check(
            api_code(c.create(&huge).await) == Some(ErrorCode::InvalidSpec),
            "cpus 0",
        )?;
        huge.spec.cpus = 1;
        huge.spec.memory_mib = 200_000;
        check(
            api_code(c.create(&huge).await) == Some(ErrorCode::OverCapacity),
            "over the memory budget",
        )?;
        let mut no_image = spec(&[]);
        no_image.spec.image = "no-such-image".into();
        check(
            api_code(c.create(&no_image).await) == Some(ErrorCode::NotFound),
            "missing image",
        )?;
        let id = c.create(&spec(&[])).await.map_err(|e| e.to_string())?.id;
        let evil = evil_tar();
        let refused = api_code(c.put_archive(&id, "/root", evil).await);
        let escaped = c.get_file(&id, "/evil").await;
        let relative = api_code(c.get_file(&id, "etc/passwd").await);
        let missing = c
            .exec(
                &id,
                &ExecBody {
                    argv: vec!["no-such-cmd".into()],
                    ..Default::default()
                },
            )
            .await;
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        check(
            refused == Some(ErrorCode::UnsafePath),
            format!("unsafe archive: {refused:?}"),
        )?;
        check(escaped.is_err(), "the archive's escape landed")?;
        check(
            relative == Some(ErrorCode::UnsafePath),
            format!("relative path: {relative:?}"),
        )?;
        check(
            api_code(missing) == Some(ErrorCode::CommandNotFound),
            "missing command",
        )?;
        check(
            api_code(c.lifecycle(&id, "resume").await) == Some(ErrorCode::Conflict),
            "resume a destroyed sandbox",
        )
    })
}
