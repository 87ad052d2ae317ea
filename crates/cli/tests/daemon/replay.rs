//! Session recordings: a capped exec and a PTY session with a resize are each recorded as
//! asciicast v2, named by digest in their `exec.end` journal records; Debian's `asciinema cat`
//! (nobody here wrote it) reads every recording and shows the session's output, and
//! `hutch replay` plays them back.

use std::{process::Command, time::Duration};

use hutch_api::{client::StreamEvent, ExecBody, ExecControl, ExecEventMsg, ExecStart, TtySize};
use hutch_journal::{attr, recording_path};

use crate::*;

/// `asciinema cat` on `cast`: what it printed. It reads keys from `/dev/tty` while it prints,
/// so it runs under `script` (util-linux), which gives it a terminal.
fn asciinema_cat(cast: &[u8]) -> Result<String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("session.cast");
    std::fs::write(&file, cast).map_err(|e| e.to_string())?;
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("asciinema cat '{}'", file.display()),
            "/dev/null",
        ])
        .env("HOME", dir.path())
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run script/asciinema (apt-get install asciinema): {e}"))?;
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    check(
        out.status.success(),
        format!("asciinema cat refused a recording: {shown}"),
    )?;
    Ok(shown)
}

/// Runs a PTY shell: types a command, resizes the terminal, asks its size, exits 3.
pub(crate) async fn pty_session(c: &Client, id: &str) -> Result {
    let start = ExecStart {
        argv: vec!["/bin/sh".into()],
        tty: Some(TtySize { rows: 24, cols: 80 }),
        ..Default::default()
    };
    let (mut tx, mut rx) = c.exec_stream(id, &start).await.map_err(|e| e.to_string())?;
    tx.stdin(b"echo ty''ped\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut screen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&screen).contains("typed\r\n") {
        let ev = tokio::time::timeout_at(deadline, rx.next())
            .await
            .map_err(|_| format!("no `typed` in {:?}", String::from_utf8_lossy(&screen)))?;
        if let StreamEvent::Stdout(d) = ev.ok_or("stream ended")?.map_err(|e| e.to_string())? {
            screen.extend(d);
        }
    }
    tx.control(&ExecControl::Resize(TtySize {
        rows: 40,
        cols: 100,
    }))
    .await
    .map_err(|e| e.to_string())?;
    tx.stdin(b"stty size; exit 3\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut exit = None;
    while let Some(ev) = rx.next().await {
        if let StreamEvent::Event(ExecEventMsg::Exit { exit_code, .. }) =
            ev.map_err(|e| e.to_string())?
        {
            exit = exit_code;
        }
    }
    check(exit == Some(3), format!("shell exit {exit:?}"))
}

pub(crate) fn sessions_are_recorded_named_by_digest_and_asciinema_reads_them() -> Result {
    on_rt(async {
        let c = suite().client.clone();
        let id = c.create(&spec(&[])).await.map_err(|e| e.to_string())?.id;
        // A capped exec: stdout and stderr, and bytes that are not UTF-8.
        let script = "printf 'out-line\\n'; printf 'err-line\\n' >&2; printf 'bin\\377ary\\n'";
        c.exec(
            &id,
            &ExecBody {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        pty_session(&c, &id).await?;

        let ends = c
            .audit(&id, 0, Some("exec.end"))
            .await
            .map_err(|e| e.to_string())?
            .records;
        check(ends.len() == 2, format!("{} exec.end records", ends.len()))?;
        let mut casts = Vec::new();
        for end in &ends {
            let text = |k: &str| end.attrs.get(k).and_then(|v| v.as_str()).map(String::from);
            let digest = text(attr::RECORDING_DIGEST).ok_or("exec.end names no recording")?;
            let exec = text(attr::EXEC_ID).ok_or("exec.end names no exec id")?;
            let cast = c.recording(&id, &exec).await.map_err(|e| e.to_string())?;
            check(
                blake3::hash(&cast).to_hex().as_str() == digest,
                "the served recording is not the one the journal names",
            )?;
            let stored = recording_path(&suite().home.join("journal").join(&id), &digest)
                .ok_or("not a digest")?;
            check(
                std::fs::read(&stored).map_err(|e| e.to_string())? == cast,
                format!("{} is not the recording", stored.display()),
            )?;
            // The same exec by the seq of its end record.
            let by_seq = c
                .recording(&id, &end.seq.to_string())
                .await
                .map_err(|e| e.to_string())?;
            check(by_seq == cast, "by seq: another recording")?;
            casts.push(cast);
        }

        let capped = asciinema_cat(&casts[0])?;
        for want in ["out-line", "err-line", "bin\u{FFFD}ary"] {
            check(capped.contains(want), format!("no {want:?} in {capped:?}"))?;
        }
        let pty = asciinema_cat(&casts[1])?;
        for want in ["typed", "40 100"] {
            check(pty.contains(want), format!("no {want:?} in {pty:?}"))?;
        }
        let pty_text = String::from_utf8_lossy(&casts[1]);
        check(
            pty_text.starts_with("{\"version\":2,\"width\":80,\"height\":24"),
            format!("header: {:?}", pty_text.lines().next()),
        )?;
        check(pty_text.contains("\"r\", \"100x40\""), "no resize event")?;
        check(
            pty_text.contains("\"i\", \"stty size; exit 3\\n\""),
            "no input event",
        )?;

        // `hutch replay` plays the latest exec (the PTY session), fast.
        let replay = common::hutch(&suite().home)
            .args(["replay", &id, "--speed", "50", "--idle-limit", "0.1"])
            .output()
            .map_err(|e| e.to_string())?;
        let shown = String::from_utf8_lossy(&replay.stdout);
        check(
            replay.status.success() && shown.contains("40 100"),
            format!(
                "hutch replay: {shown:?} {}",
                String::from_utf8_lossy(&replay.stderr)
            ),
        )?;
        let missing = api_code(c.recording(&id, "no-such-exec").await);
        check(
            missing == Some(hutch_types::ErrorCode::NotFound),
            format!("unknown exec: {missing:?}"),
        )?;
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}
