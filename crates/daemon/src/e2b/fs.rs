//! envd's filesystem service (`filesystem.Filesystem/*`): list, stat, make, remove and
//! move, each one command in the guest through the request surface's capped exec, with
//! the path passed as an argument (never spliced into a script). `find -printf` describes
//! entries as NUL-separated fields, so any name parses; the output is the guest's and is
//! parsed as hostile input: a record that does not parse is left out. Watching a
//! directory is refused as unsupported.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
    Extension, Json, Router,
};
use hutch_core::{exec::Collected, service::Command};
use hutch_protocol::ExitStatus;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    connect,
    envd::{guest_path, sandbox_of},
    CallerExt, E2bError, E2bState, Result,
};

type AppState = State<Arc<E2bState>>;

/// The filesystem routes.
pub fn routes() -> Router<Arc<E2bState>> {
    Router::new()
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/Move", post(move_entry))
}

/// Most output a listing may produce.
const LISTING_LIMIT: usize = 16 << 20;

/// `find -printf`: type (own, then followed), size, octal and symbolic mode, owner, group,
/// modification time, path, symlink target; each field NUL-terminated.
const FORMAT: &str = r"%y\0%Y\0%s\0%m\0%M\0%u\0%g\0%T@\0%p\0%l\0";
/// Fields per entry in [`FORMAT`].
const FIELDS: usize = 10;

/// Exit codes the scripts below use to say why they refused.
const MISSING: i32 = 44;
const NOT_A_DIR: i32 = 45;
const EXISTS: i32 = 46;

/// Shell preamble: `$1` must exist (a dangling symlink counts).
const EXISTING: &str = r#"[ -e "$1" ] || [ -L "$1" ] || exit 44; "#;

/// Runs `sh -c SCRIPT sh ARGS...` in the sandbox; its output, or the E2B error its exit
/// code stands for.
async fn run(
    state: &E2bState,
    caller: &hutch_core::service::Caller,
    headers: &HeaderMap,
    script: &str,
    args: &[&str],
) -> Result<Collected> {
    let id = sandbox_of(headers)?;
    let argv = ["sh", "-c", script, "sh"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    let command = Command {
        argv,
        ..Default::default()
    };
    let out = state
        .app
        .api
        .exec(caller, &id, command, None, LISTING_LIMIT)
        .await?;
    let path = args.first().copied().unwrap_or_default();
    match out.status {
        ExitStatus::Code(0) if out.truncated() => Err(E2bError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the listing of {path:.200} is over {LISTING_LIMIT} bytes"),
        )),
        ExitStatus::Code(0) => Ok(out),
        ExitStatus::Code(MISSING) => Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("no such file or directory: {path:.200}"),
        )),
        ExitStatus::Code(NOT_A_DIR) => Err(E2bError::bad_request(format!(
            "not a directory: {path:.200}"
        ))),
        ExitStatus::Code(EXISTS) => Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("already exists: {path:.200}"),
        )),
        _ => Err(E2bError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "{:.300}",
                String::from_utf8_lossy(&out.stderr).trim().to_string()
            ),
        )),
    }
}

/// A request naming a path (and, for a listing, a depth).
#[derive(Debug, Deserialize)]
struct PathRequest {
    path: String,
    #[serde(default)]
    depth: u32,
}

async fn list_dir(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let req: PathRequest = connect::unary_request(&body)?;
    let path = guest_path(&req.path);
    let depth = req.depth.max(1).to_string();
    let script = format!(
        r#"{EXISTING}[ -d "$1" ] || exit 45; exec find "$1" -mindepth 1 -maxdepth "$2" -printf "$3""#
    );
    let out = run(&state, &caller, &headers, &script, &[&path, &depth, FORMAT]).await?;
    Ok(Json(json!({ "entries": entries(&out.stdout) })))
}

/// One entry of `path`, or its error.
async fn entry_of(
    state: &E2bState,
    caller: &hutch_core::service::Caller,
    headers: &HeaderMap,
    path: &str,
) -> Result<Value> {
    let script = format!(r#"{EXISTING}exec find "$1" -maxdepth 0 -printf "$2""#);
    let out = run(state, caller, headers, &script, &[path, FORMAT]).await?;
    entries(&out.stdout)
        .into_iter()
        .next()
        .ok_or_else(|| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, "the guest said nothing"))
}

async fn stat(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let req: PathRequest = connect::unary_request(&body)?;
    let entry = entry_of(&state, &caller, &headers, &guest_path(&req.path)).await?;
    Ok(Json(json!({ "entry": entry })))
}

async fn make_dir(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let req: PathRequest = connect::unary_request(&body)?;
    let path = guest_path(&req.path);
    let script = r#"if [ -e "$1" ]; then exit 46; fi; mkdir -p -- "$1""#;
    run(&state, &caller, &headers, script, &[&path]).await?;
    let entry = entry_of(&state, &caller, &headers, &path).await?;
    Ok(Json(json!({ "entry": entry })))
}

async fn remove(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let req: PathRequest = connect::unary_request(&body)?;
    let script = format!(r#"{EXISTING}rm -rf -- "$1""#);
    run(
        &state,
        &caller,
        &headers,
        &script,
        &[&guest_path(&req.path)],
    )
    .await?;
    Ok(Json(json!({})))
}

/// `filesystem.MoveRequest`.
#[derive(Debug, Deserialize)]
struct MoveRequest {
    source: String,
    destination: String,
}

async fn move_entry(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let req: MoveRequest = connect::unary_request(&body)?;
    let (from, to) = (guest_path(&req.source), guest_path(&req.destination));
    let script = format!(r#"{EXISTING}mv -T -- "$1" "$2""#);
    run(&state, &caller, &headers, &script, &[&from, &to]).await?;
    let entry = entry_of(&state, &caller, &headers, &to).await?;
    Ok(Json(json!({ "entry": entry })))
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
