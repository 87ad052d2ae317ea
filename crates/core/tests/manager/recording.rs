//! Session recordings behind the request surface: each exec's output (and, on a terminal,
//! input and resizes) recorded as asciicast v2, named by digest in its `exec.end` record,
//! found again by exec id, seq or `latest`, and cut at the cap with a marker.

use std::sync::Arc;

use hutch_core::{
    audit::{AuditQuery, HostKeySigner, Journals},
    recording::LATEST,
    service::{Caller, Command, Create, Lifecycle, LocalApi, SandboxApi},
    task::Tasks,
};
use hutch_journal::{
    attr,
    cast::{parse, CastEvent, TRUNCATED_MARKER},
    Record,
};
use hutch_protocol::{host::ExecEvent, TtySize};
use hutch_types::{ErrorCode, NetworkPolicy, SandboxId};
use serde_json::Value;

use crate::world::{spec, World};

/// The surface over the world's manager, recordings capped at `cap` bytes.
fn surface(w: &World, cap: u64) -> LocalApi {
    let tasks = Arc::new(Tasks::new(w.dir.path().join("tasks"), w.manager.clone()));
    let key = hutch_task::sign::HostKey::load_or_create(&w.dir.path().join("host.key")).unwrap();
    let journals = Journals::new(w.dir.path().join("journal"), Arc::new(HostKeySigner(key)))
        .with_recording_cap(cap);
    LocalApi::new(w.manager.clone(), tasks).with_journals(Arc::new(journals))
}

fn sh(script: &str) -> Command {
    Command {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Command::default()
    }
}

async fn create(api: &LocalApi) -> SandboxId {
    let req = Create {
        spec: spec(NetworkPolicy::None),
        idempotency_key: None,
    };
    let info = api.create(&Caller::admin(), req).await.unwrap().0;
    info.id.parse().unwrap()
}

async fn ends(api: &LocalApi, id: &SandboxId) -> Vec<Record> {
    let query = AuditQuery {
        from: 0,
        kind: Some("exec.end".into()),
    };
    api.audit(&Caller::admin(), id, query)
        .await
        .unwrap()
        .records
}

fn text<'a>(r: &'a Record, key: &str) -> &'a str {
    r.attrs.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The `(code, data)` of a recording's events, after checking the recording against the
/// digest its `exec.end` record names.
async fn recorded(
    api: &LocalApi,
    id: &SandboxId,
    end: &Record,
) -> (u16, u16, Vec<(String, String)>) {
    let rec = api
        .recording(&Caller::admin(), id, text(end, attr::EXEC_ID))
        .await
        .unwrap();
    assert_eq!(rec.digest, text(end, attr::RECORDING_DIGEST));
    assert_eq!(blake3::hash(&rec.cast).to_hex().as_str(), rec.digest);
    assert_eq!(end.attrs[attr::RECORDING_BYTES], rec.cast.len() as u64);
    let (header, events) = parse(&rec.cast).unwrap();
    let events = events
        .into_iter()
        .map(|CastEvent(_, code, data)| (code, data))
        .collect();
    (header.width, header.height, events)
}

fn output(events: &[(String, String)]) -> String {
    events
        .iter()
        .filter(|(c, _)| c == "o")
        .map(|(_, d)| d.as_str())
        .collect()
}

#[tokio::test]
async fn a_capped_exec_is_recorded_with_both_streams_and_invalid_utf8_replaced() {
    let w = World::new().await;
    let api = surface(&w, 1 << 20);
    let id = create(&api).await;
    api.exec(
        &Caller::admin(),
        &id,
        sh("printf 'a\\377b\\n'; printf 'err\\n' >&2"),
        None,
        1024,
    )
    .await
    .unwrap();
    let ends = ends(&api, &id).await;
    let (width, height, events) = recorded(&api, &id, &ends[0]).await;
    assert_eq!((width, height), (80, 24));
    let out = output(&events);
    assert!(
        out.contains("a\u{FFFD}b\n") && out.contains("err\n"),
        "{out:?}"
    );
    assert_eq!(ends[0].attrs[attr::RECORDING_TRUNCATED], false);
    // The same recording by the seq of the exec's end record, and as the latest.
    let by_seq = api
        .recording(&Caller::admin(), &id, &ends[0].seq.to_string())
        .await
        .unwrap();
    let latest = api.recording(&Caller::admin(), &id, LATEST).await.unwrap();
    assert_eq!(by_seq.digest, text(&ends[0], attr::RECORDING_DIGEST));
    assert_eq!(latest.digest, by_seq.digest);
    let unknown = api.recording(&Caller::admin(), &id, "no-such-exec").await;
    assert_eq!(unknown.unwrap_err().code(), ErrorCode::NotFound);
    api.lifecycle(&Caller::admin(), &id, Lifecycle::Destroy)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_terminal_session_records_input_and_resizes() {
    let w = World::new().await;
    let api = surface(&w, 1 << 20);
    let id = create(&api).await;
    let tty = TtySize { rows: 24, cols: 80 };
    let mut stream = api
        .exec_stream(
            &Caller::admin(),
            &id,
            sh("read x; stty size; echo got $x"),
            Some(tty),
        )
        .await
        .unwrap();
    let control = stream.control();
    control
        .resize(TtySize {
            rows: 40,
            cols: 100,
        })
        .await
        .unwrap();
    control.write_stdin(b"hello\n").await.unwrap();
    while !matches!(stream.next_event().await.unwrap(), ExecEvent::Exited(_)) {}
    drop(stream);

    let ends = ends(&api, &id).await;
    let (width, height, events) = recorded(&api, &id, &ends[0]).await;
    assert_eq!((width, height), (80, 24));
    let resize = events
        .iter()
        .position(|e| *e == ("r".into(), "100x40".into()));
    let input = events
        .iter()
        .position(|e| *e == ("i".into(), "hello\n".into()));
    assert!(resize.is_some() && input.is_some(), "{events:?}");
    assert!(resize < input, "in the order they happened: {events:?}");
    let out = output(&events);
    assert!(
        out.contains("40 100") && out.contains("got hello"),
        "{out:?}"
    );
    api.lifecycle(&Caller::admin(), &id, Lifecycle::Destroy)
        .await
        .unwrap();
}

#[tokio::test]
async fn output_past_the_cap_is_cut_with_a_marker_while_the_exec_keeps_all() {
    let w = World::new().await;
    let api = surface(&w, 100);
    let id = create(&api).await;
    let out = api
        .exec(
            &Caller::admin(),
            &id,
            sh("head -c 5000 /dev/zero | tr '\\0' x"),
            None,
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(
        out.stdout.len(),
        5000,
        "the exec's own output is not capped by the recording"
    );
    let ends = ends(&api, &id).await;
    assert_eq!(ends[0].attrs[attr::RECORDING_TRUNCATED], true);
    assert_eq!(ends[0].attrs[attr::RECORDING_DROPPED], 4900);
    let (_, _, events) = recorded(&api, &id, &ends[0]).await;
    assert_eq!(output(&events), "x".repeat(100));
    let (code, label) = events.last().unwrap();
    assert_eq!(code, "m");
    assert!(label.starts_with(TRUNCATED_MARKER), "{label}");
    api.lifecycle(&Caller::admin(), &id, Lifecycle::Destroy)
        .await
        .unwrap();
}

const STORE_SECRET: &str = "store-secret-value-3141";
const SPEC_SECRET: &str = "spec-secret-value-2718";
const EXEC_SECRET: &str = "exec-secret-value-1618";

#[tokio::test]
async fn secret_values_are_redacted_from_recordings_even_split_across_writes() {
    let w = World::new().await;
    let api = surface(&w, 1 << 20);
    let admin = Caller::admin();
    api.set_secret(&admin, crate::journal::set_secret(STORE_SECRET))
        .await
        .unwrap();
    let mut spec = spec(NetworkPolicy::None);
    spec.env.insert("SPEC_VAR".into(), SPEC_SECRET.into());
    let req = Create {
        spec,
        idempotency_key: None,
    };
    let id: SandboxId = api.create(&admin, req).await.unwrap().0.id.parse().unwrap();
    // The store's value in two writes, apart in time (so in two chunks of output), on both
    // streams; the sandbox's variable and the exec's own. Each stream's redaction holds back
    // its own unfinished tail, so a write to the other stream is kept apart in time too: the
    // two pipes are read in whatever order their data is ready.
    let (head, tail) = STORE_SECRET.split_at(9);
    let script = format!(
        "printf 'a={head}'; sleep 0.3; printf '{tail}!\\n'; sleep 0.3; \
         printf 'b={head}' >&2; sleep 0.3; printf '{tail}\\n' >&2; sleep 0.3; \
         echo \"c=$SPEC_VAR d=$EXEC_VAR\"; printf 'e={head}'"
    );
    let mut cmd = sh(&script);
    cmd.env.insert("EXEC_VAR".into(), EXEC_SECRET.into());
    let out = api.exec(&admin, &id, cmd, None, 1 << 20).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(STORE_SECRET) && stdout.contains(SPEC_SECRET),
        "the exec itself gets its output whole: {stdout:?}"
    );

    let ends = ends(&api, &id).await;
    let (_, _, events) = recorded(&api, &id, &ends[0]).await;
    let shown = output(&events);
    for line in [
        "a=[REDACTED]!\n",
        "b=[REDACTED]\n",
        "c=[REDACTED] d=[REDACTED]\n",
    ] {
        assert!(shown.contains(line), "no {line:?} in {shown:?}");
    }
    // The start of a secret that never came is output like any other.
    assert!(shown.ends_with(&format!("e={head}")), "{shown:?}");
    let rec = api
        .recording(&admin, &id, text(&ends[0], attr::EXEC_ID))
        .await
        .unwrap();
    let file = String::from_utf8_lossy(&rec.cast);
    for secret in [STORE_SECRET, SPEC_SECRET, EXEC_SECRET] {
        assert!(!file.contains(secret), "{secret} in the recording");
    }
    api.lifecycle(&admin, &id, Lifecycle::Destroy)
        .await
        .unwrap();
}
