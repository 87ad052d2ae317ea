//! envd's filesystem service (`filesystem.Filesystem/*`): list, stat, make, remove and
//! move. Each call is one [`Call`]: a shell script run in the guest through the request
//! surface's capped exec, its paths passed as arguments (never spliced into the script),
//! and what it answers. Calls that change an entry describe it in the same script, so each
//! is one round trip. `find -printf` describes entries as NUL-separated fields, so any name
//! parses; the output is the guest's and is parsed as hostile input: a record that does not
//! parse is left out. Watching a directory is refused as unsupported.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::{post, MethodRouter},
    Extension, Json, Router,
};
use hutch_core::service::{Caller, Command};
use hutch_protocol::ExitStatus;
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use super::{
    connect,
    envd::{guest_path, sandbox_of},
    CallerExt, E2bError, E2bState, Result,
};

/// The filesystem routes.
pub fn routes() -> Router<Arc<E2bState>> {
    Router::new()
        .route("/filesystem.Filesystem/ListDir", rpc(list_dir))
        .route("/filesystem.Filesystem/Stat", rpc(stat))
        .route("/filesystem.Filesystem/MakeDir", rpc(make_dir))
        .route("/filesystem.Filesystem/Remove", rpc(remove))
        .route("/filesystem.Filesystem/Move", rpc(move_entry))
}

/// A unary filesystem RPC whose request `plan` turns into a [`Call`].
fn rpc<R: DeserializeOwned + Send + 'static>(plan: fn(R) -> Call) -> MethodRouter<Arc<E2bState>> {
    post(
        move |State(state): State<Arc<E2bState>>,
              Extension(caller): CallerExt,
              headers: HeaderMap,
              body: Bytes| async move {
            let call = plan(connect::unary_request(&body)?);
            call.run(&state, &caller, &headers).await.map(Json)
        },
    )
}

/// Most output a call may produce.
const LISTING_LIMIT: usize = 16 << 20;

/// `find -printf`: type (own, then followed), size, octal and symbolic mode, owner, group,
/// modification time, path, symlink target; each field NUL-terminated. Every script gets
/// it as `$1`; its paths follow as `$2` (and `$3`).
const FORMAT: &str = r"%y\0%Y\0%s\0%m\0%M\0%u\0%g\0%T@\0%p\0%l\0";
/// Fields per entry in [`FORMAT`].
const FIELDS: usize = 10;

/// Exit codes the scripts below use to say why they refused.
const MISSING: i32 = 44;
const NOT_A_DIR: i32 = 45;
const EXISTS: i32 = 46;

/// Script preamble: `$2` must exist (a dangling symlink counts).
const MUST_EXIST: &str = r#"[ -e "$2" ] || [ -L "$2" ] || exit 44; "#;

/// Script tail describing the entry at argument `arg` itself, in [`FORMAT`].
fn describe(arg: u8) -> String {
    format!(r#"exec find "${arg}" -maxdepth 0 -printf "$1""#)
}

/// What a call answers, from its script's standard output.
#[derive(Debug, PartialEq)]
enum Answer {
    /// `{"entries": [...]}`: every record.
    Entries,
    /// `{"entry": ...}`: the one record.
    Entry,
    /// `{}`.
    Nothing,
}

/// One filesystem call: `sh -c SCRIPT sh FORMAT PATH [ARG]` in the guest, and its answer.
#[derive(Debug)]
struct Call {
    script: String,
    /// The guest path it is about (`$2`; errors name it).
    path: String,
    /// `$3`, if any.
    arg: Option<String>,
    answer: Answer,
}

impl Call {
    fn new(script: String, path: String, answer: Answer) -> Call {
        Call {
            script,
            path,
            arg: None,
            answer,
        }
    }

    fn with(mut self, arg: String) -> Call {
        self.arg = Some(arg);
        self
    }

    fn argv(&self) -> Vec<String> {
        ["sh", "-c", &self.script, "sh", FORMAT, &self.path]
            .into_iter()
            .map(String::from)
            .chain(self.arg.clone())
            .collect()
    }

    /// Runs it in the request's sandbox; its answer, or the E2B error its exit code stands
    /// for.
    async fn run(&self, state: &E2bState, caller: &Caller, headers: &HeaderMap) -> Result<Value> {
        let id = sandbox_of(headers)?;
        let command = Command {
            argv: self.argv(),
            ..Default::default()
        };
        let out = state
            .app
            .api
            .exec(caller, &id, command, None, LISTING_LIMIT)
            .await?;
        let path = &self.path;
        match out.status {
            ExitStatus::Code(0) if out.truncated() => Err(E2bError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the answer about {path:.200} is over {LISTING_LIMIT} bytes"),
            )),
            ExitStatus::Code(0) => self.answer(&out.stdout),
            ExitStatus::Code(MISSING) => Err(E2bError::new(
                StatusCode::NOT_FOUND,
                format!("no such file or directory: {path:.200}"),
            )),
            ExitStatus::Code(NOT_A_DIR) => Err(E2bError::bad_request(format!(
                "not a directory: {path:.200}"
            ))),
            ExitStatus::Code(EXISTS) => {
                Err(E2bError::exists(format!("already exists: {path:.200}")))
            }
            _ => Err(E2bError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{:.300}", String::from_utf8_lossy(&out.stderr).trim()),
            )),
        }
    }

    fn answer(&self, stdout: &[u8]) -> Result<Value> {
        Ok(match self.answer {
            Answer::Entries => json!({ "entries": entries(stdout) }),
            Answer::Entry => {
                let entry = entries(stdout).into_iter().next().ok_or_else(|| {
                    E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, "the guest said nothing")
                })?;
                json!({ "entry": entry })
            }
            Answer::Nothing => json!({}),
        })
    }
}

/// A request naming a path (and, for a listing, a depth).
#[derive(Debug, Deserialize)]
struct PathRequest {
    path: String,
    #[serde(default)]
    depth: u32,
}

fn list_dir(req: PathRequest) -> Call {
    let script = format!(
        r#"{MUST_EXIST}[ -d "$2" ] || exit 45; exec find "$2" -mindepth 1 -maxdepth "$3" -printf "$1""#
    );
    Call::new(script, guest_path(&req.path), Answer::Entries).with(req.depth.max(1).to_string())
}

fn stat(req: PathRequest) -> Call {
    let script = format!("{MUST_EXIST}{}", describe(2));
    Call::new(script, guest_path(&req.path), Answer::Entry)
}

fn make_dir(req: PathRequest) -> Call {
    let script = format!(
        r#"[ -e "$2" ] && exit 46; mkdir -p -- "$2" && {}"#,
        describe(2)
    );
    Call::new(script, guest_path(&req.path), Answer::Entry)
}

fn remove(req: PathRequest) -> Call {
    let script = format!(r#"{MUST_EXIST}rm -rf -- "$2""#);
    Call::new(script, guest_path(&req.path), Answer::Nothing)
}

/// `filesystem.MoveRequest`.
#[derive(Debug, Deserialize)]
struct MoveRequest {
    source: String,
    destination: String,
}

fn move_entry(req: MoveRequest) -> Call {
    let script = format!(r#"{MUST_EXIST}mv -T -- "$2" "$3" && {}"#, describe(3));
    Call::new(script, guest_path(&req.source), Answer::Entry).with(guest_path(&req.destination))
}

/// `filesystem.EntryInfo`s from [`FORMAT`] records; a record that does not parse is left
/// out.
fn entries(out: &[u8]) -> Vec<Value> {
    let fields: Vec<&[u8]> = out.split(|b| *b == 0).collect();
    fields
        .chunks_exact(FIELDS)
        .filter_map(|f| entry(f.try_into().ok()?))
        .collect()
}

fn entry(f: &[&[u8]; FIELDS]) -> Option<Value> {
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_string);
    let [own, followed, size, mode, perms, owner, group, mtime, path, target] = f;
    let path = text(path)?;
    let name = path.rsplit('/').next().unwrap_or_default().to_string();
    let is_symlink = *own == b"l";
    let kind = match *if is_symlink { followed } else { own } {
        b"d" => "FILE_TYPE_DIRECTORY",
        b"l" => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_FILE",
    };
    let size: i64 = text(size)?.parse().ok()?;
    let mode = u32::from_str_radix(&text(mode)?, 8).ok()?;
    let mtime_ms = (text(mtime)?.parse::<f64>().ok()? * 1000.0) as i64;
    let mut entry = json!({
        "name": name,
        "type": kind,
        "path": path,
        "size": size.to_string(),
        "mode": mode,
        "permissions": text(perms)?,
        "owner": text(owner)?,
        "group": text(group)?,
        "modifiedTime": super::rest::rfc3339(mtime_ms),
        "isSymlink": is_symlink,
    });
    if is_symlink {
        entry["symlinkTarget"] = json!(text(target)?);
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a call's script under the host's `sh` and GNU `find` (the guest's tools): its
    /// exit code and answer.
    #[allow(clippy::disallowed_methods)] // A sync test waiting for its own shell.
    fn run_here(call: &Call) -> (i32, Option<Value>) {
        let argv = call.argv();
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .expect("sh runs");
        let code = out.status.code().expect("exited");
        (
            code,
            (code == 0).then(|| call.answer(&out.stdout).expect("answers")),
        )
    }

    #[test]
    fn each_call_is_one_script_that_does_and_describes() {
        let dir = tempfile::tempdir().unwrap();
        let at = |rel: &str| dir.path().join(rel).to_str().unwrap().to_string();
        let path = |rel: &str| PathRequest {
            path: at(rel),
            depth: 0,
        };

        let (code, made) = run_here(&make_dir(path("a/b c")));
        assert_eq!(code, 0);
        let made = made.unwrap();
        assert_eq!(made["entry"]["name"], "b c");
        assert_eq!(made["entry"]["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(run_here(&make_dir(path("a/b c"))).0, EXISTS);

        std::fs::write(at("a/b c/f"), "hi").unwrap();
        let (code, listed) = run_here(&list_dir(PathRequest {
            path: at("a"),
            depth: 2,
        }));
        assert_eq!(code, 0);
        let mut names: Vec<String> = listed.unwrap()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["b c", "f"]);
        assert_eq!(run_here(&list_dir(path("a/b c/f"))).0, NOT_A_DIR);
        assert_eq!(run_here(&stat(path("nothing"))).0, MISSING);

        let (code, moved) = run_here(&move_entry(MoveRequest {
            source: at("a/b c/f"),
            destination: at("a/g"),
        }));
        assert_eq!(code, 0);
        let moved = moved.unwrap();
        assert_eq!(
            (&moved["entry"]["name"], &moved["entry"]["size"]),
            (&json!("g"), &json!("2"))
        );
        assert_eq!(
            run_here(&stat(path("a/g"))).1.unwrap()["entry"]["type"],
            "FILE_TYPE_FILE"
        );

        assert_eq!(run_here(&remove(path("a"))), (0, Some(json!({}))));
        assert_eq!(run_here(&remove(path("a"))).0, MISSING);
    }

    #[test]
    fn find_records_parse_and_garbage_is_left_out() {
        let nul_terminated = |fields: &[&str]| -> Vec<u8> {
            fields.iter().flat_map(|f| f.bytes().chain([0])).collect()
        };
        let mut out = nul_terminated(&[
            "f",
            "f",
            "12",
            "644",
            "-rw-r--r--",
            "root",
            "root",
            "1700000000.5",
            "/w/a\tb\n",
            "",
        ]);
        out.extend(nul_terminated(&[
            "l",
            "d",
            "7",
            "777",
            "lrwxrwxrwx",
            "root",
            "root",
            "1700000000",
            "/w/link",
            "/etc",
        ]));
        out.extend(nul_terminated(&["d", "d", "x"]));
        let all = entries(&out);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0]["name"], "a\tb\n");
        assert_eq!(all[0]["size"], "12");
        assert_eq!(all[0]["mode"], 0o644);
        assert_eq!(all[0]["modifiedTime"], "2023-11-14T22:13:20.500Z");
        assert_eq!(all[1]["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(all[1]["isSymlink"], true);
        assert_eq!(all[1]["symlinkTarget"], "/etc");
    }
}
