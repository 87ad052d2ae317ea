//! `hutch task` with real VMs under QEMU: scripted agents (honest and hostile) against git
//! workspaces in temp dirs, through one `hutch daemon` child with a private `HUTCH_HOME`.
//! After everything, no sandbox, VMM process or run dir may remain.

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::OnceLock,
};

use hutch_api::client::{Client, Endpoint};
use hutch_task::{Change, Limits, RejectKind, TaskRecord, TaskSpec, Verdict};
use hutch_types::NetworkPolicy;
use libtest_mimic::{Arguments, Failed};
use sha2::{Digest, Sha256};

mod common;
use common::{check, hutch};

type Result<T = ()> = std::result::Result<T, Failed>;

struct Suite {
    rt: tokio::runtime::Runtime,
    client: Client,
    home: tempfile::TempDir,
    daemon: std::sync::Mutex<Child>,
}

static SUITE: OnceLock<Suite> = OnceLock::new();

fn suite() -> &'static Suite {
    SUITE.get().expect("suite initialised")
}

fn main() {
    let args = Arguments::from_args();
    if args.list {
        // Listing (nextest asks for it before running each case in a process of its own)
        // starts nothing.
        libtest_mimic::run(&args, common_trials()).exit();
    }
    if common::default_image_or_skip("task").is_none() {
        return;
    }
    let namespaces_before = common::hutch_netns();
    let home = common::private_home();
    let daemon = common::spawn_daemon(home.path(), &["--max-sandboxes", "16"]);
    let socket = home.path().join("hutch.sock");
    let rt = common::suite_runtime();
    let _ = SUITE.set(Suite {
        rt,
        client: Client::new(Endpoint::Unix(socket), None),
        home,
        daemon: std::sync::Mutex::new(daemon),
    });

    let conclusion = libtest_mimic::run(&args, common_trials());

    let suite = suite();
    let left = suite.rt.block_on(suite.client.list(None, &[]));
    let mut daemon = suite.daemon.lock().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    let mut leaks = common::leaks(suite.home.path());
    leaks.extend(common::new_netns(&namespaces_before));
    match left {
        Ok(l) if l.is_empty() && leaks.is_empty() => {
            eprintln!("task suite: nothing left behind");
            // The suite lives in a static, never dropped: its temporary home goes by hand.
            let _ = std::fs::remove_dir_all(suite.home.path());
        }
        other => {
            eprintln!("LEAK after the task suite: {other:?} {leaks:#?}");
            std::process::exit(1);
        }
    }
    conclusion.exit();
}

fn common_trials() -> Vec<libtest_mimic::Trial> {
    trials![
        a_scripted_agents_changes_are_applied_exactly,
        hostile_agents_are_rejected_with_reasons,
        verify_passes_good_changes_fails_breaking_ones_without_a_network,
        three_parallel_tasks_then_a_round_that_sees_their_changes,
        task_run_streams_the_agents_output,
        a_tasks_attestation_verifies_with_securesystemslib_and_gates_apply,
    ]
}

// ---------------------------------------------------------------- helpers

fn on_rt<F, T>(f: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    common::on_rt(&suite().rt, f)
}

fn run(dir: &Path, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A git repository with a few committed files, an ignored one and an untracked one.
fn repo() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("h7ws").tempdir_in("/tmp")?;
    let p = dir.path();
    std::fs::write(p.join("a.txt"), "alpha\nbeta\n")?;
    std::fs::write(p.join("b.txt"), "to be deleted\n")?;
    std::fs::write(p.join("c.txt"), "to be renamed\n")?;
    std::fs::write(p.join("run.sh"), "#!/bin/sh\necho run\n")?;
    std::fs::create_dir(p.join("sub"))?;
    std::fs::write(p.join("sub/x.txt"), "x\n")?;
    std::fs::write(p.join("check.sh"), "test \"$(cat v.txt)\" = good\n")?;
    std::fs::write(p.join("v.txt"), "unset\n")?;
    std::fs::write(p.join(".gitignore"), "ignored.txt\n")?;
    run(p, "git", &["init", "-q"])?;
    run(p, "git", &["add", "."])?;
    run(p, "git", &["commit", "-qm", "base"])?;
    std::fs::write(p.join("ignored.txt"), "never copied\n")?;
    std::fs::write(p.join("untracked.txt"), "copied\n")?;
    Ok(dir)
}

/// Digest of a tree: every file (mode, contents) and symlink (target) by path, never
/// following a symlink. `.git` is left out unless `with_git`.
fn tree_digest(root: &Path, with_git: bool) -> BTreeMap<String, String> {
    fn walk(root: &Path, rel: &Path, with_git: bool, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .flatten()
            .collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            if e.file_name() == ".git" && !with_git {
                continue;
            }
            let p = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(root.join(&p)).unwrap();
            let key = p.to_string_lossy().into_owned();
            if m.file_type().is_symlink() {
                out.insert(
                    key,
                    format!(
                        "link {}",
                        std::fs::read_link(root.join(&p)).unwrap().display()
                    ),
                );
            } else if m.is_dir() {
                walk(root, &p, with_git, out);
            } else {
                let data = std::fs::read(root.join(&p)).unwrap();
                out.insert(
                    key,
                    format!(
                        "{:o} {}",
                        m.mode() & 0o777,
                        hex::encode(Sha256::digest(&data))
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), with_git, &mut out);
    out
}

fn task_spec(command: &str) -> TaskSpec {
    serde_json::from_value(serde_json::json!({
        "command": ["sh", "-c", command],
        "timeout_secs": 300,
    }))
    .unwrap()
}

async fn run_task(client: &Client, ws: &Path, spec: &TaskSpec) -> Result<TaskRecord> {
    let tar = hutch_task::workspace::pack(ws).map_err(|e| format!("pack: {e}"))?;
    Ok(client
        .run_task(spec, &tar)
        .await
        .map_err(|e| format!("task run: {e}"))?)
}

fn rejected_kinds(t: &TaskRecord) -> Vec<RejectKind> {
    match &t.verdict {
        Verdict::Rejected { rejections } => rejections.iter().map(|r| r.kind).collect(),
        _ => vec![],
    }
}

// ---------------------------------------------------------------- cases

/// Edit, add, delete, rename, chmod, a binary file and an inner symlink: the changeset
/// describes exactly these, the host workspace is untouched by the run, and `hutch task
/// apply` (to a branch, then to the work tree) reproduces the agent's tree.
const AGENT: &str = r#"set -e
printf 'alpha\nBETA\ngamma\n' > a.txt
echo new > new.txt
rm b.txt
mkdir -p moved && mv c.txt moved/c.txt
chmod +x run.sh
printf '\000\001\002\377binary' > blob.bin
ln -s ../a.txt sub/link
echo agent-done"#;

fn a_scripted_agents_changes_are_applied_exactly() -> Result {
    on_rt(async {
        let client = suite().client.clone();
        let ws = repo()?;
        let before = tree_digest(ws.path(), true);
        let t = run_task(&client, ws.path(), &task_spec(AGENT)).await?;
        check(
            tree_digest(ws.path(), true) == before,
            "the run changed the host workspace",
        )?;
        let agent = t.agent.as_ref().ok_or("no agent outcome")?;
        check(agent.exit_code == Some(0), format!("agent: {agent:?}"))?;
        check(
            agent.stdout.trim() == "agent-done",
            format!("agent output {:?}", agent.stdout),
        )?;
        check(
            t.verdict == Verdict::Accepted { changes: 7 },
            format!("verdict {:?} {:?}", t.verdict, t.error),
        )?;
        let mut seen: Vec<String> = t
            .changes
            .iter()
            .map(|c| match c {
                Change::Write {
                    path,
                    added,
                    binary,
                    ..
                } => format!("write {path} added={added} binary={binary}"),
                Change::Symlink { path, target } => format!("symlink {path} {target}"),
                Change::Delete { path } => format!("delete {path}"),
                Change::Rename { from, to, mode } => format!("rename {from} {to} {mode:o}"),
                Change::Chmod { path, mode } => format!("chmod {path} {mode:o}"),
                Change::Mkdir { path } => format!("mkdir {path}"),
                Change::Rmdir { path } => format!("rmdir {path}"),
            })
            .collect();
        seen.sort();
        let want = [
            "chmod run.sh 755",
            "delete b.txt",
            "rename c.txt moved/c.txt 644",
            "symlink sub/link ../a.txt",
            "write a.txt added=false binary=false",
            "write blob.bin added=true binary=true",
            "write new.txt added=true binary=false",
        ];
        check(seen == want, format!("changes {seen:#?}"))?;
        let diff = client.task_diff(&t.id).await.map_err(|e| e.to_string())?;
        check(
            diff.contains("-beta\n+BETA\n+gamma\n"),
            format!("diff:\n{diff}"),
        )?;
        check(
            diff.contains("rename from c.txt\nrename to moved/c.txt"),
            "diff shows the rename",
        )?;
        check(
            diff.contains("Binary files /dev/null and b/blob.bin differ"),
            "diff shows the binary",
        )?;

        // What the agent's tree is: the same script run on a copy of the workspace.
        let expected = tempfile::Builder::new()
            .prefix("h7exp")
            .tempdir_in("/tmp")?;
        run(
            Path::new("/"),
            "cp",
            &[
                "-a",
                &format!("{}/.", ws.path().display()),
                &expected.path().display().to_string(),
            ],
        )?;
        run(expected.path(), "sh", &["-c", AGENT])?;
        let home = suite().home.path().to_path_buf();

        let out = apply(&home, &t.id, ws.path(), Some("agent/one"))?;
        check(
            out.status.success(),
            format!("apply --branch: {}", String::from_utf8_lossy(&out.stderr)),
        )?;
        check(
            tree_digest(ws.path(), false) == without_git(&before),
            "apply --branch left the work tree alone",
        )?;
        let mode = run(ws.path(), "git", &["ls-tree", "agent/one", "run.sh"])?;
        check(mode.starts_with("100755"), format!("branch mode {mode}"))?;
        let a = run(ws.path(), "git", &["show", "agent/one:a.txt"])?;
        check(a == "alpha\nBETA\ngamma\n", "branch contents")?;
        let link = run(ws.path(), "git", &["ls-tree", "agent/one", "sub/link"])?;
        check(link.starts_with("120000"), format!("branch symlink {link}"))?;

        let out = apply(&home, &t.id, ws.path(), None)?;
        check(
            out.status.success(),
            format!("apply: {}", String::from_utf8_lossy(&out.stderr)),
        )?;
        let got = tree_digest(ws.path(), false);
        let want = tree_digest(expected.path(), false);
        check(
            got == want,
            format!("applied tree differs:\n{got:#?}\nexpected\n{want:#?}"),
        )?;
        // Applying again onto the changed work tree is refused: it is not clean.
        let again = || apply(&home, &t.id, ws.path(), None);
        let out = again()?;
        let said = String::from_utf8_lossy(&out.stderr);
        check(
            !out.status.success() && said.contains("not clean") && said.contains("a.txt"),
            format!("a second apply onto a dirty tree: {said}"),
        )?;
        // Committed, the tree is clean, and the apply conflicts: the paths are no longer as
        // in the baseline.
        run(ws.path(), "git", &["add", "-A"])?;
        run(ws.path(), "git", &["commit", "-qm", "applied"])?;
        let out = again()?;
        check(!out.status.success(), "a second apply is refused")?;
        check(
            String::from_utf8_lossy(&out.stderr).contains("conflicts"),
            "as a conflict",
        )?;
        check(
            tree_digest(ws.path(), false) == want,
            "a refused apply changes nothing",
        )?;

        // The record is stored and listed.
        let listed = client.tasks().await.map_err(|e| e.to_string())?;
        check(listed.iter().any(|r| r.id == t.id), "task ls lists it")?;
        check(
            client.task(&t.id).await.map_err(|e| e.to_string())? == t,
            "task show returns the record",
        )?;
        let stored = home.join("tasks").join(&t.id);
        for f in [
            "spec.json",
            "baseline.json",
            "workspace.tar",
            "changeset.bin",
            "record.json",
        ] {
            check(stored.join(f).is_file(), format!("{f} stored"))?;
        }

        // The record is attested; a record changed on disk is caught and not applied.
        let out = hutch(&home).args(["task", "show", &t.id]).output()?;
        check(
            out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("attestation: ok"),
            format!("task show: {}", String::from_utf8_lossy(&out.stderr)),
        )?;
        let record = stored.join("record.json");
        let signed = std::fs::read_to_string(&record)?;
        check(
            signed.contains("\"exit_code\": 0"),
            "record names the exit code",
        )?;
        std::fs::write(
            &record,
            signed.replace("\"exit_code\": 0", "\"exit_code\": 3"),
        )?;
        let out = hutch(&home).args(["task", "verify", &t.id]).output()?;
        let said = String::from_utf8_lossy(&out.stdout);
        check(
            !out.status.success()
                && said.contains("attestation: BAD")
                && said.contains("the record's exit is not the attested one"),
            format!("task verify of a tampered record: {said}"),
        )?;
        let out = apply(&home, &t.id, ws.path(), Some("agent/tampered"))?;
        check(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr)
                    .contains("the record's exit is not the attested one"),
            format!(
                "apply of a tampered task: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        )?;
        std::fs::write(&record, signed)?;
        let out = hutch(&home).args(["task", "verify", &t.id]).output()?;
        check(out.status.success(), "the restored record verifies")?;
        Ok(())
    })
}

/// securesystemslib's interpreter: `$HUTCH_TEST_PYTHON_SSLIB` (scripts/test.sh's venv), else
/// `python3`.
fn python_sslib() -> String {
    std::env::var("HUTCH_TEST_PYTHON_SSLIB").unwrap_or_else(|_| "python3".into())
}

/// The task's attestation, written by `hutch task attest -o`, verifies with securesystemslib
/// (DSSE, both keys, threshold 2) and names the changeset, the base commit, the command, the
/// verdict and the journal checkpoint; the sandbox's journal is sealed and verifies; `apply`
/// refuses the changeset when the attestation lost a signature or is gone, and applies it
/// again once the attestation is back.
fn a_tasks_attestation_verifies_with_securesystemslib_and_gates_apply() -> Result {
    on_rt(async {
        let client = suite().client.clone();
        let home = suite().home.path().to_path_buf();
        let ws = repo()?;
        let base = run(ws.path(), "git", &["rev-parse", "HEAD"])?;
        let t = run_task(&client, ws.path(), &task_spec("echo attested > a.txt")).await?;
        check(
            t.verdict == Verdict::Accepted { changes: 1 },
            format!("verdict {:?} {:?}", t.verdict, t.error),
        )?;
        let stored = home.join("tasks").join(&t.id);
        let out_dir = tempfile::tempdir()?;
        let file = out_dir.path().join("attestation.json");
        let out = hutch(&home)
            .args(["task", "attest", &t.id, "-o"])
            .arg(&file)
            .output()?;
        check(
            out.status.success() && file.is_file(),
            format!("task attest: {}", String::from_utf8_lossy(&out.stderr)),
        )?;

        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/task/verify_attestation.py"
        );
        let out = Command::new(python_sslib())
            .arg(script)
            .arg(&file)
            .arg(home.join("tasks/host.key"))
            .arg(stored.join("changeset.bin"))
            .arg(base.trim())
            .output()
            .map_err(|e| format!("cannot run {} (securesystemslib): {e}", python_sslib()))?;
        check(
            out.status.success(),
            format!("securesystemslib: {}", String::from_utf8_lossy(&out.stderr)),
        )?;
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        eprintln!("securesystemslib: {got}");
        check(
            got["ok"] == true,
            format!("securesystemslib refused: {got}"),
        )?;
        check(
            got["verified_keys"].as_array().map(Vec::len) == Some(2),
            "both keys verified",
        )?;
        check(
            got["type"] == "https://in-toto.io/Statement/v1",
            "in-toto Statement v1",
        )?;
        check(got["changeset_matches"] == true, "the changeset subject")?;
        check(got["base_matches"] == true, "the base commit subject")?;
        check(
            got["command"] == serde_json::json!(["sh", "-c", "echo attested > a.txt"]),
            "the command",
        )?;
        check(got["verdict"] == "accepted", "the verdict")?;
        check(
            got["network"]["mode"] == "none",
            format!("the network {}", got["network"]),
        )?;
        check(
            got["image_digest"].as_str().is_some_and(|d| !d.is_empty()),
            "the image digest",
        )?;
        check(
            got["checkpoint"]
                .as_str()
                .is_some_and(|n| n.contains("\n\u{2014} ")),
            format!("a signed checkpoint note: {}", got["checkpoint"]),
        )?;
        // The sandbox is gone and its journal sealed (its key destroyed) after the signing.
        let sandbox = got["sandbox"].as_str().ok_or("no sandbox id")?;
        let out = hutch(&home).args(["audit", "verify", sandbox]).output()?;
        let said = String::from_utf8_lossy(&out.stdout);
        check(
            out.status.success() && said.starts_with("ok:") && said.contains(", sealed"),
            format!(
                "audit verify {sandbox}: {said} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        )?;
        check(
            !home
                .join("journal")
                .join(sandbox)
                .join("sandbox.key")
                .exists(),
            "the sandbox key is destroyed",
        )?;

        // Without the sandbox's signature, or without any attestation, nothing is applied.
        let path = stored.join("attestation.json");
        let original = std::fs::read_to_string(&path)?;
        let mut envelope: serde_json::Value = serde_json::from_str(&original)?;
        envelope["signatures"]
            .as_array_mut()
            .ok_or("signatures")?
            .remove(0);
        std::fs::write(&path, serde_json::to_vec(&envelope)?)?;
        let before = tree_digest(ws.path(), true);
        let out = apply(&home, &t.id, ws.path(), None)?;
        let said = String::from_utf8_lossy(&out.stderr);
        check(
            !out.status.success()
                && said.contains("attestation does not verify")
                && said.contains("no signature by the sandbox key"),
            format!("apply with one signature: {said}"),
        )?;
        std::fs::remove_file(&path)?;
        let out = apply(&home, &t.id, ws.path(), None)?;
        let said = String::from_utf8_lossy(&out.stderr);
        check(
            !out.status.success() && said.contains("no attestation"),
            format!("apply without an attestation: {said}"),
        )?;
        check(
            tree_digest(ws.path(), true) == before,
            "refusals change nothing",
        )?;
        std::fs::write(&path, original)?;

        // The attestation is checked with a host key the client knows, not merely the one the
        // daemon names: a key given, or the one pinned for the daemon at its first apply.
        let pins = tempfile::tempdir()?;
        let pin_file = pins.path().join("host-keys");
        let other = "11".repeat(32);
        let out = apply_pinned(&home, &t.id, ws.path(), &pin_file, &["--host-key", &other])?;
        let said = String::from_utf8_lossy(&out.stderr);
        check(
            !out.status.success()
                && said.contains("does not verify against the host key given")
                && said.contains("names host key"),
            format!("apply with another --host-key: {said}"),
        )?;
        check(!pin_file.exists(), "a refused apply pins nothing")?;
        let out = apply_pinned(&home, &t.id, ws.path(), &pin_file, &[])?;
        let said = String::from_utf8_lossy(&out.stderr);
        check(
            out.status.success() && said.contains("pinned host key"),
            format!("apply: {said}"),
        )?;
        check(
            std::fs::read_to_string(ws.path().join("a.txt"))? == "attested\n",
            "applied",
        )?;
        let hutch_task::sign::SignatureCheck::Ok { public_key } = client
            .task_signature(&t.id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err("the task's attestation does not verify".into());
        };
        let pinned = std::fs::read_to_string(&pin_file)?;
        check(
            pinned.starts_with("unix:") && pinned.trim_end().ends_with(&format!(" {public_key}")),
            format!("pinned: {pinned:?}"),
        )?;
        // A daemon that now names another key than the pinned one is refused (checked before
        // anything else: this apply would conflict otherwise).
        std::fs::write(&pin_file, pinned.replace(&public_key, &other))?;
        let out = apply_pinned(&home, &t.id, ws.path(), &pin_file, &[])?;
        let said = String::from_utf8_lossy(&out.stderr);
        check(
            !out.status.success() && said.contains("the host key pinned for unix:"),
            format!("apply against another pinned key: {said}"),
        )?;
        Ok(())
    })
}

/// `hutch task run` prints the agent's output while the agent still runs.
fn task_run_streams_the_agents_output() -> Result {
    use std::io::BufRead;
    let ws = repo()?;
    let mut child = hutch(suite().home.path())
        .args(["task", "run", "--workspace"])
        .arg(ws.path())
        .args(["--", "sh", "-c", "echo first; sleep 8; echo second"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let first = lines.next().ok_or("no output")??;
    let running = child.try_wait()?.is_none();
    let rest: Vec<String> = lines.collect::<std::result::Result<_, _>>()?;
    let status = child.wait()?;
    check(first == "first", format!("first line {first:?}"))?;
    check(running, "the first line came only after the task ended")?;
    check(rest == ["second"], format!("rest {rest:?}"))?;
    check(status.success(), "task run failed")?;
    Ok(())
}

/// `hutch task apply ID --workspace WS [--branch B]`.
fn apply(
    home: &Path,
    id: &str,
    ws: &Path,
    branch: Option<&str>,
) -> std::io::Result<std::process::Output> {
    let mut cmd = hutch(home);
    cmd.args(["task", "apply", id, "--workspace"]).arg(ws);
    if let Some(b) = branch {
        cmd.args(["--branch", b]);
    }
    cmd.output()
}

/// `hutch task apply ID --workspace WS ARGS`, pinning host keys in `pins`.
fn apply_pinned(
    home: &Path,
    id: &str,
    ws: &Path,
    pins: &Path,
    args: &[&str],
) -> std::io::Result<std::process::Output> {
    hutch(home)
        .env("HUTCH_HOST_KEYS", pins)
        .args(["task", "apply", id, "--workspace"])
        .arg(ws)
        .args(args)
        .output()
}

fn without_git(d: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    d.iter()
        .filter(|(k, _)| !k.starts_with(".git/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A guest helper replaced by the agent: a stream whose one frame is shorter than it claims.
const LYING_HELPER: &str = r#"cat > /opt/hutch-task/task.py <<'EOF'
import hashlib, json, struct, sys
m = json.dumps({"entries": [{"op": "write", "path": "a.txt", "mode": 420, "size": 1000,
    "sha256": hashlib.sha256(b"x" * 1000).hexdigest()}], "total": 1}).encode()
sys.stdout.buffer.write(b"HUTCHCS1" + struct.pack("<Q", len(m)) + m + struct.pack("<Q", 1000) + b"x" * 10 + b"HUTCHEND")
EOF"#;

/// A guest helper replaced by the agent: a write to `../escape`.
const ESCAPING_HELPER: &str = r#"cat > /opt/hutch-task/task.py <<'EOF'
import hashlib, json, struct, sys
m = json.dumps({"entries": [{"op": "write", "path": "../escape", "mode": 420, "size": 1,
    "sha256": hashlib.sha256(b"x").hexdigest()}], "total": 1}).encode()
sys.stdout.buffer.write(b"HUTCHCS1" + struct.pack("<Q", len(m)) + m + struct.pack("<Q", 1) + b"x" + b"HUTCHEND")
EOF"#;

fn hostile_agents_are_rejected_with_reasons() -> Result {
    on_rt(async {
        let client = suite().client.clone();
        let ws = repo()?;
        let before = tree_digest(ws.path(), true);
        let small = Limits {
            max_file_bytes: 1 << 20,
            max_files: 100,
            max_total_bytes: 8 << 20,
        };
        let cases: Vec<(&str, &str, Option<RejectKind>)> = vec![
            ("symlink to /etc/passwd", "echo ok >> a.txt; ln -s /etc/passwd pw", Some(RejectKind::SymlinkEscapes)),
            ("chained relative symlinks", "mkdir x && ln -s .. x/b && ln -s b/.. x/c && ln -s c/victim x/d", Some(RejectKind::SymlinkEscapes)),
            ("hook", "printf '#!/bin/sh\\necho pwned\\n' > .git/hooks/pre-commit; chmod +x .git/hooks/pre-commit", Some(RejectKind::GitInternals)),
            ("fifo", "mkfifo pipe", Some(RejectKind::Special)),
            ("file over the limit", "head -c 2097152 /dev/zero > big.bin", Some(RejectKind::TooLarge)),
            ("too many files", "mkdir many && cd many && i=0; while [ $i -lt 300 ]; do echo $i > f$i; i=$((i+1)); done", Some(RejectKind::TooMany)),
            ("frame lying about its length", LYING_HELPER, Some(RejectKind::LengthMismatch)),
            ("path escaping the workspace", ESCAPING_HELPER, Some(RejectKind::BadPath)),
            ("nothing changed", "true", None),
            ("helper gone", "rm -rf /opt/hutch-task", None),
        ];
        let runs = cases.iter().map(|(_, cmd, _)| {
            let mut spec = task_spec(cmd);
            spec.limits = small;
            let client = client.clone();
            let ws = ws.path().to_path_buf();
            async move { run_task(&client, &ws, &spec).await }
        });
        let records = futures::future::join_all(runs).await;
        for ((name, _, want), t) in cases.iter().zip(records) {
            let t = t?;
            match want {
                Some(kind) => {
                    check(
                        rejected_kinds(&t).contains(kind),
                        format!("{name}: {:?} {:?}", t.verdict, t.error),
                    )?;
                    check(
                        t.changes.is_empty() && t.changeset_digest.is_none(),
                        format!("{name}: nothing kept"),
                    )?;
                    check(
                        client.task_changeset(&t.id).await.is_err(),
                        format!("{name}: no changeset served"),
                    )?;
                    let out = hutch(suite().home.path())
                        .args(["task", "apply", &t.id, "--workspace"])
                        .arg(ws.path())
                        .output()?;
                    check(!out.status.success(), format!("{name}: apply refused"))?;
                }
                None if *name == "nothing changed" => {
                    check(
                        t.verdict == Verdict::Empty,
                        format!("{name}: {:?}", t.verdict),
                    )?;
                    check(
                        client
                            .task_diff(&t.id)
                            .await
                            .map_err(|e| e.to_string())?
                            .is_empty(),
                        "empty diff",
                    )?;
                }
                None => check(
                    matches!(t.verdict, Verdict::ExtractionFailed { .. }),
                    format!("{name}: {:?}", t.verdict),
                )?,
            }
        }
        check(
            tree_digest(ws.path(), true) == before,
            "the host workspace is untouched",
        )?;
        Ok(())
    })
}

fn verify_passes_good_changes_fails_breaking_ones_without_a_network() -> Result {
    on_rt(async {
        let client = suite().client.clone();
        let ws = repo()?;
        let verify = "sh check.sh && ls /sys/class/net";
        // The agent has a network (it sees eth0); the verify sandbox has none.
        let mut good = task_spec("test -e /sys/class/net/eth0 && echo good > v.txt");
        good.network = NetworkPolicy::Open;
        good.verify = Some(verify.into());
        let mut bad = task_spec("echo bad > v.txt");
        bad.verify = Some(verify.into());
        let (g, b) = tokio::join!(
            run_task(&client, ws.path(), &good),
            run_task(&client, ws.path(), &bad)
        );
        let (g, b) = (g?, b?);
        check(
            g.verdict == Verdict::Accepted { changes: 1 },
            format!("good: {:?} {:?} {:?}", g.verdict, g.agent, g.error),
        )?;
        let v = g.verify.as_ref().ok_or("good: not verified")?;
        check(v.passed, format!("good change fails verification: {v:?}"))?;
        check(
            v.process.stdout.trim() == "lo",
            format!("the verify sandbox has a network: {:?}", v.process.stdout),
        )?;
        let v = b.verify.as_ref().ok_or("bad: not verified")?;
        check(
            !v.passed && v.process.exit_code == Some(1),
            format!("breaking change passes verification: {v:?}"),
        )?;
        Ok(())
    })
}

const MANY: &str = r#"
concurrency = 3
[[task]]
name = "a"
command = ["sh", "-c", "echo a > a.out"]
[[task]]
name = "b"
command = ["sh", "-c", "echo b > b.out"]
[[task]]
name = "c"
command = ["sh", "-c", "echo c > c.out"]
[[task]]
name = "d"
after = ["a", "b"]
command = ["sh", "-c", "test -f a.out && test -f b.out && test -f c.out && echo d > d.out"]
"#;

fn three_parallel_tasks_then_a_round_that_sees_their_changes() -> Result {
    on_rt(async {
        let client = suite().client.clone();
        let ws = repo()?;
        let before = tree_digest(ws.path(), true);
        let file = tempfile::Builder::new()
            .prefix("h7many")
            .suffix(".toml")
            .tempfile_in("/tmp")?;
        std::fs::write(file.path(), MANY)?;
        let out = hutch(suite().home.path())
            .args(["task", "run-many", "--json", "--workspace"])
            .arg(ws.path())
            .arg(file.path())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        check(
            out.status.success(),
            format!(
                "run-many: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        )?;
        let outcomes: Vec<serde_json::Value> = serde_json::from_str(&stdout)?;
        let mut ids = BTreeMap::new();
        for o in &outcomes {
            let name = o["name"].as_str().unwrap_or_default().to_string();
            let round = if name == "d" { 2 } else { 1 };
            check(
                o["round"] == round && o["status"] == "accepted",
                format!("{o}"),
            )?;
            ids.insert(name, o["id"].as_str().unwrap_or_default().to_string());
        }
        check(ids.len() == 4, format!("{outcomes:?}"))?;
        for (name, id) in &ids {
            let t = client.task(id).await.map_err(|e| e.to_string())?;
            let path = format!("{name}.out");
            check(
                matches!(&t.changes[..], [Change::Write { path: p, added: true, .. }] if *p == path),
                format!("{name}: {:?}", t.changes),
            )?;
        }
        let first = client.task(&ids["a"]).await.map_err(|e| e.to_string())?;
        let last = client.task(&ids["d"]).await.map_err(|e| e.to_string())?;
        check(
            last.baseline_files == first.baseline_files + 3,
            "round two's baseline holds round one's three new files",
        )?;
        check(
            tree_digest(ws.path(), true) == before,
            "the host workspace is untouched",
        )?;
        Ok(())
    })
}
