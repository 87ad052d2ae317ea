//! Every way of changing a journal after the fact is found and named; a crash's torn tail is
//! cut, recorded and the journal continues.

use std::{path::Path, sync::Arc};

use ed25519_dalek::SigningKey;
use hutch_journal::{
    attr, chain, kinds, read_records, verify_dir, Actor, Event, Failure, Journal, Options, Record,
    Redactor, Report, Status, JOURNAL_FILE,
};

const SANDBOX: &str = "sb-tamper";

fn host() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn host_public() -> [u8; 32] {
    host().verifying_key().to_bytes()
}

/// A journal in `dir` with a create record and `n` exec records (a checkpoint after the
/// create), sealed when `seal`.
async fn journal(dir: &Path, n: usize, seal: bool) -> Journal {
    let j = Journal::create(
        dir.to_path_buf(),
        SANDBOX.into(),
        Arc::new(host()),
        Event::new("sandbox.create").attr("hutch.sandbox.image", "base"),
        Redactor::new(["s3cret-value".to_string()]),
        Options::default(),
    )
    .await
    .unwrap();
    let actor = Actor {
        principal: "socket".into(),
        request_id: Some("req-1".into()),
    };
    for i in 0..n {
        j.append(
            Event::new("exec.end")
                .by(Some(&actor))
                .attr(attr::PROCESS_COMMAND_ARGS, vec![format!("step-{i}")])
                .attr(attr::PROCESS_EXIT_CODE, 0),
        );
    }
    if seal {
        j.seal(Event::new(kinds::SEAL)).await.unwrap();
    } else {
        j.checkpoint().await.unwrap();
    }
    j
}

fn verify(dir: &Path) -> Report {
    verify_dir(dir, &host_public()).unwrap()
}

fn lines(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(JOURNAL_FILE)).unwrap();
    text.lines().map(str::to_string).collect()
}

fn write_lines(dir: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(dir.join(JOURNAL_FILE), text).unwrap();
}

/// The line of the record with `kind` whose argv is `step-<i>`.
fn step_line(lines: &[String], i: usize) -> usize {
    lines
        .iter()
        .position(|l| l.contains(&format!("\"step-{i}\"")))
        .unwrap()
}

async fn sealed() -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), 5, true).await;
    let l = lines(dir.path());
    (dir, l)
}

#[tokio::test]
async fn an_intact_sealed_journal_is_ok() {
    let (dir, lines) = sealed().await;
    let report = verify(dir.path());
    assert_eq!(report.status, Status::Ok, "{report}");
    assert!(report.sealed);
    assert_eq!(report.records, lines.len() as u64);
    assert_eq!(report.checkpointed, report.records - 1);
    // Envelope and chain, as written.
    let records = read_records(dir.path(), 0).unwrap();
    assert!(records.iter().enumerate().all(|(i, r)| r.seq == i as u64));
    assert_eq!(records[0].prev, hex::encode(chain::genesis(SANDBOX)));
    assert_eq!(
        records[1].prev,
        hex::encode(chain::line_hash(lines[0].as_bytes()))
    );
    assert_eq!(records.last().unwrap().kind, kinds::CHECKPOINT);
    assert_eq!(records[records.len() - 2].kind, kinds::SEAL);
    assert!(
        !dir.path().join(hutch_journal::KEY_FILE).exists(),
        "key destroyed at the seal"
    );
}

#[tokio::test]
async fn a_journal_never_sealed_is_unsealed_not_ok() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(dir.path(), 3, false).await;
    let report = verify(dir.path());
    assert_eq!(report.status, Status::Unsealed, "{report}");
    assert!(report.failures.is_empty());
    assert_eq!(report.checkpointed, report.records - 1);
    assert!(j
        .latest_checkpoint()
        .unwrap()
        .starts_with("hutch.dev/journal/sb-tamper\n"));
}

#[tokio::test]
async fn one_edited_byte_is_named() {
    let (dir, mut lines) = sealed().await;
    let i = step_line(&lines, 2);
    lines[i] = lines[i].replace("\"step-2\"", "\"step-X\"");
    write_lines(dir.path(), &lines);
    let report = verify(dir.path());
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.failures,
        [Failure::Edited { seq: i as u64 }],
        "{report}"
    );
    assert!(report.to_string().contains("edited: record"));
}

#[tokio::test]
async fn a_deleted_line_is_named() {
    let (dir, mut lines) = sealed().await;
    let i = step_line(&lines, 1);
    lines.remove(i);
    write_lines(dir.path(), &lines);
    let report = verify(dir.path());
    assert_eq!(
        report.failures,
        [Failure::Deleted {
            first: i as u64,
            last: i as u64
        }],
        "{report}"
    );
}

#[tokio::test]
async fn swapped_lines_are_named() {
    let (dir, mut lines) = sealed().await;
    let i = step_line(&lines, 1);
    lines.swap(i, i + 1);
    write_lines(dir.path(), &lines);
    let report = verify(dir.path());
    assert_eq!(report.status, Status::Failed);
    assert!(
        report.failures.contains(&Failure::Reordered {
            line: i as u64 + 1,
            seq: i as u64
        }),
        "{report}"
    );
}

#[tokio::test]
async fn an_inserted_line_is_named() {
    let (dir, mut lines) = sealed().await;
    let i = step_line(&lines, 1);
    let copy = lines[i].replace("\"step-1\"", "\"rm -rf /\"");
    lines.insert(i + 1, copy);
    write_lines(dir.path(), &lines);
    let report = verify(dir.path());
    assert_eq!(
        report.failures,
        [Failure::Inserted {
            line: i as u64 + 1,
            seq: i as u64
        }],
        "{report}"
    );
}

#[tokio::test]
async fn a_cut_tail_is_truncated_up_to_the_last_checkpoint() {
    let (dir, mut lines) = sealed().await;
    lines.truncate(lines.len() - 2);
    write_lines(dir.path(), &lines);
    let report = verify(dir.path());
    assert_eq!(report.status, Status::Failed);
    assert!(
        matches!(report.failures[..], [Failure::Truncated { .. }]),
        "{report}"
    );
}

#[tokio::test]
async fn a_chain_rehashed_without_the_key_is_named() {
    let (dir, lines) = sealed().await;
    let target = step_line(&lines, 3);
    let mut prev = chain::genesis(SANDBOX);
    let mut forged = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let mut record: Record = serde_json::from_str(line).unwrap();
        if i == target {
            record
                .attrs
                .insert(attr::PROCESS_COMMAND_ARGS.into(), vec!["innocent"].into());
        }
        record.prev = hex::encode(prev);
        let text = serde_json::to_string(&record).unwrap();
        prev = chain::line_hash(text.as_bytes());
        forged.push(text);
    }
    write_lines(dir.path(), &forged);
    let report = verify(dir.path());
    assert_eq!(report.status, Status::Failed);
    assert!(
        report
            .failures
            .iter()
            .all(|f| matches!(f, Failure::Rehashed { .. })),
        "{report}"
    );
    assert!(!report.failures.is_empty());
    assert!(report.to_string().contains("re-hashed"));
}

#[tokio::test]
async fn another_host_key_does_not_certify_it() {
    let (dir, _) = sealed().await;
    let other = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
    let report = verify_dir(dir.path(), &other).unwrap();
    assert!(
        matches!(report.failures[..], [Failure::Certificate { .. }]),
        "{report}"
    );
}

#[tokio::test]
async fn a_torn_tail_is_cut_recorded_and_the_journal_continues() {
    let dir = tempfile::tempdir().unwrap();
    drop(journal(dir.path(), 2, false).await);
    // What a crash mid-write leaves: half a line.
    let path = dir.path().join(JOURNAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"v\":1,\"seq\":99,\"prev\":\"ab");
    std::fs::write(&path, &bytes).unwrap();
    let before = verify(dir.path());
    assert_eq!(before.status, Status::Unsealed, "{before}");
    assert_eq!(before.torn_bytes, 26);

    let j = Journal::open(
        dir.path().to_path_buf(),
        Redactor::default(),
        Options::default(),
    )
    .await
    .unwrap();
    j.append(Event::new("exec.end").attr(attr::PROCESS_EXIT_CODE, 1));
    j.seal(Event::new(kinds::SEAL)).await.unwrap();
    let report = verify(dir.path());
    assert_eq!(report.status, Status::Ok, "{report}");
    let records = read_records(dir.path(), 0).unwrap();
    let torn = records.iter().find(|r| r.kind == kinds::TORN_TAIL).unwrap();
    assert_eq!(torn.attrs[attr::TORN_BYTES], 26);
    let kinds_after: Vec<&str> = records[torn.seq as usize..]
        .iter()
        .map(|r| r.kind.as_str())
        .collect();
    assert_eq!(
        kinds_after,
        [
            kinds::TORN_TAIL,
            kinds::REOPEN,
            "exec.end",
            kinds::SEAL,
            kinds::CHECKPOINT
        ]
    );
    assert!(matches!(
        Journal::open(
            dir.path().to_path_buf(),
            Redactor::default(),
            Options::default()
        )
        .await,
        Err(hutch_journal::JournalError::Sealed)
    ));
}

#[tokio::test]
async fn secret_values_never_reach_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(dir.path(), 0, false).await;
    j.append(Event::new("exec.start").attr(
        attr::PROCESS_COMMAND_ARGS,
        vec!["curl", "-H", "token: s3cret-value"],
    ));
    j.sync().await.unwrap();
    let text = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
    assert!(!text.contains("s3cret-value"));
    assert!(text.contains("token: [REDACTED]"));
}

#[tokio::test]
async fn the_checkpoint_file_is_the_latest_note() {
    let (dir, _) = sealed().await;
    let note = std::fs::read_to_string(dir.path().join(hutch_journal::CHECKPOINT_FILE)).unwrap();
    let records = read_records(dir.path(), 0).unwrap();
    let last = records.last().unwrap();
    assert_eq!(last.attrs[attr::CHECKPOINT_NOTE], note.as_str());
    assert_eq!(note.lines().nth(1), Some(last.seq.to_string().as_str()));
}

#[tokio::test]
async fn the_sandbox_key_signs_dsse_encodings_only_and_only_before_the_seal() {
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};
    let dir = tempfile::tempdir().unwrap();
    let j = journal(dir.path(), 1, false).await;
    // Not a DSSE pre-authentication encoding (a forged checkpoint note, say): refused.
    let note = format!("{SANDBOX}\n1\nAAAA\n");
    assert!(matches!(
        j.sign_dsse(note.into_bytes()).await,
        Err(hutch_journal::JournalError::NotDsse)
    ));
    let pae = b"DSSEv1 4 text 2 hi".to_vec();
    let (public, sig) = j.sign_dsse(pae.clone()).await.unwrap();
    // The key is the one the first record names, and the signing is recorded.
    j.sync().await.unwrap();
    let records = read_records(dir.path(), 0).unwrap();
    assert_eq!(
        records[0].attrs[attr::JOURNAL_PUBLIC_KEY],
        hex::encode(public)
    );
    let signed = records
        .iter()
        .find(|r| r.kind == kinds::ATTESTATION_SIGN)
        .expect("an attestation.sign record");
    assert_eq!(
        signed.attrs[attr::ATTESTATION_DIGEST],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&pae))
    );
    VerifyingKey::from_bytes(&public)
        .unwrap()
        .verify(&pae, &Signature::from_bytes(&sig))
        .unwrap();
    // Sealed, the key is gone: nothing more is signed.
    j.seal(Event::new(kinds::SEAL)).await.unwrap();
    assert!(j.sign_dsse(pae).await.is_err());
    assert_eq!(verify(dir.path()).status, Status::Ok);
}
