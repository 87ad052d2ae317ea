//! MCP tools: each parses its JSON arguments into one or two calls on the request surface and
//! formats the answer for a model. Arguments that do not fit a tool's schema, like every
//! refusal of the surface, are a tool result with `isError: true` carrying
//! `{"code": <stable ErrorCode>, "message": …}`.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::LazyLock,
    time::{Duration, Instant},
};

use base64::Engine as _;
use hutch_core::{
    exec::split_status,
    service::{Caller, Command, Create, Lifecycle, SandboxApi, ServiceError},
};
use hutch_store::ListFilter;
use hutch_task::TaskSpec;
use hutch_types::{ErrorCode, NetworkPolicy, SandboxId, SandboxSpec};
use rmcp::{
    handler::server::common::schema_for_type,
    model::{CallToolResult, ContentBlock, JsonObject, ProgressNotificationParam, Tool},
    service::RequestContext,
    RoleServer,
};
use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, DuplexStream};

/// Largest file or archive a tool moves inline (base64 in the JSON).
pub const MAX_INLINE: usize = 32 << 20;
/// Output kept per stream of an exec unless the call asks for another cap.
const DEFAULT_OUTPUT: usize = 32 << 10;
/// Most output a call may ask to keep per stream.
const MAX_OUTPUT: usize = hutch_api::JSON_EXEC_OUTPUT_LIMIT;
/// Bytes of a file `read_file` returns unless asked for another cap.
const DEFAULT_READ: usize = 256 << 10;
/// Most diff text `run_task` returns.
const MAX_DIFF: usize = 256 << 10;
/// How often a long call reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Buffer between the guest channel and a download collected in memory.
const PIPE_BYTES: usize = 64 << 10;

/// A sandbox id argument, shared by most tools.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    /// The sandbox's id, as returned by create_sandbox or list_sandboxes.
    sandbox_id: String,
}

/// Arguments of `create_sandbox`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateArgs {
    /// Guest image to boot (default "default": Debian with python3, git and curl).
    image: Option<String>,
    /// Restore from this template (a saved, provisioned VM) instead of booting an image;
    /// the template fixes image, cpus, memory and disk.
    template: Option<String>,
    /// Virtual CPUs (default 1).
    cpus: Option<u8>,
    /// Memory in MiB (default 512).
    memory_mib: Option<u32>,
    /// Writable disk in MiB (default 2048).
    disk_mib: Option<u64>,
    /// Environment variables for every command run in the sandbox.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Labels (key/value) to find the sandbox by later.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Destroy the sandbox automatically this many seconds after creation. Recommended.
    ttl_secs: Option<u64>,
    /// Network access (default: none, no network device at all).
    network: Option<NetArgs>,
    /// Secrets to attach, by name (`hutch secret ls` lists them). Each appears in the
    /// sandbox only as a placeholder in its environment variable; Hutch puts the real value
    /// into requests to the hosts the secret is bound to, so the sandbox never holds it.
    #[serde(default)]
    secrets: Vec<String>,
}

/// An egress policy. Private, host and metadata addresses stay unreachable whatever it says.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NetArgs {
    /// "none": no network; "open": every public address; "allow": only the cidrs and
    /// domains listed (on the listed ports, or any port if none are).
    mode: NetMode,
    /// With mode "allow": networks such as "203.0.113.0/24".
    #[serde(default)]
    cidrs: Vec<String>,
    /// With mode "allow": destination ports; empty means any.
    #[serde(default)]
    ports: Vec<u16>,
    /// With mode "allow": host names, exact or "*.example.com".
    #[serde(default)]
    domains: Vec<String>,
}

/// A policy's mode.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum NetMode {
    /// No network device.
    None,
    /// Every public address.
    Open,
    /// Only the listed destinations.
    Allow,
}

/// Arguments of `list_sandboxes`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    /// Only sandboxes in this state (e.g. "running", "paused", "stopped", "failed").
    state: Option<String>,
    /// Only sandboxes carrying all of these labels.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Arguments of `exec`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    /// The sandbox's id.
    sandbox_id: String,
    /// A shell command line, run as `/bin/sh -c <command>`. Give this or `argv`.
    command: Option<String>,
    /// The program and its arguments, run without a shell. Give this or `command`.
    argv: Option<Vec<String>>,
    /// Working directory in the sandbox (absolute).
    cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Kill the command after this many seconds.
    timeout_secs: Option<u64>,
    /// Text fed to the command's standard input.
    stdin: Option<String>,
    /// Bytes of stdout and of stderr to return (default 32768, at most 1048576); the rest
    /// is dropped and flagged as truncated.
    max_output_bytes: Option<usize>,
}

/// Arguments of `read_file`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    /// The sandbox's id.
    sandbox_id: String,
    /// Absolute path of the file in the sandbox.
    path: String,
    /// Bytes to return from the start of the file (default 262144, at most 33554432).
    max_bytes: Option<usize>,
}

/// Arguments of `write_file`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    /// The sandbox's id.
    sandbox_id: String,
    /// Absolute path of the file in the sandbox; missing parent directories are made.
    path: String,
    /// The file's contents.
    content: String,
    /// How `content` is encoded: "utf8" (default) or "base64" (for binary files).
    #[serde(default)]
    encoding: Encoding,
    /// Permission bits in octal, e.g. "755" (default "644").
    mode: Option<String>,
}

/// How file contents travel in JSON.
#[derive(Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Encoding {
    /// Text.
    #[default]
    Utf8,
    /// Any bytes, base64-encoded.
    Base64,
}

/// Arguments of `list_files`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListFilesArgs {
    /// The sandbox's id.
    sandbox_id: String,
    /// Absolute path of a directory in the sandbox.
    path: String,
}

/// Arguments of `upload_archive`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct UploadArgs {
    /// The sandbox's id.
    sandbox_id: String,
    /// Absolute path of the directory to unpack into (made if missing).
    path: String,
    /// A tar archive, base64-encoded (at most 32 MiB decoded). Relative paths only; files,
    /// directories and symlinks.
    tar_base64: String,
}

/// Arguments of `download_archive`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct DownloadArgs {
    /// The sandbox's id.
    sandbox_id: String,
    /// Absolute path of the directory to pack.
    path: String,
}

/// Arguments of `set_network_policy`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetNetArgs {
    /// The sandbox's id.
    sandbox_id: String,
    /// The new policy (replaces the old one).
    network: NetArgs,
}

/// Arguments of `run_task`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TaskArgs {
    /// The workspace: a tar archive of a directory, base64-encoded (at most 32 MiB decoded).
    workspace_tar_base64: String,
    /// The agent command (program and arguments), run in the workspace's copy.
    command: Vec<String>,
    /// A shell command run on the changed workspace in a fresh sandbox without network;
    /// its exit code is part of the verdict.
    verify: Option<String>,
    /// Restore the task's sandbox from this template instead of booting the default image.
    template: Option<String>,
    /// The agent's network access (default none).
    network: Option<NetArgs>,
    /// Environment for the agent command.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Kill the agent after this many seconds (default 600).
    timeout_secs: Option<u64>,
    /// Globs the changed paths must match (default: anything outside .git).
    #[serde(default)]
    allow: Vec<String>,
    /// Secrets to attach, by name (`hutch secret ls` lists them). Each appears in the
    /// sandbox only as a placeholder in its environment variable; Hutch puts the real value
    /// into requests to the hosts the secret is bound to, so the sandbox never holds it.
    #[serde(default)]
    secrets: Vec<String>,
}

/// One tool: its name, its description for a model, and its argument type's schema.
fn tool<A: JsonSchema + 'static>(name: &'static str, description: &'static str) -> Tool {
    Tool::new(name, description, schema_for_type::<A>())
}

/// Every tool, described for a model.
pub fn list() -> &'static [Tool] {
    static TOOLS: LazyLock<Vec<Tool>> = LazyLock::new(|| {
        vec![
            tool::<CreateArgs>(
                "create_sandbox",
                "Create and boot a disposable Linux microVM (a sandbox) and return it (its id, \
                 state and spec). Boots in a second or two. It has no network unless `network` \
                 allows one; give ttl_secs so it is removed even if you forget.",
            ),
            tool::<ListArgs>(
                "list_sandboxes",
                "List the sandboxes you can use, with their ids, states, labels and expiry.",
            ),
            tool::<IdArgs>(
                "destroy_sandbox",
                "Destroy a sandbox and everything in it. Cannot be undone.",
            ),
            tool::<ExecArgs>(
                "exec",
                "Run a command in a sandbox to its end and return exit_code (or signal), \
                 stdout, stderr, timed_out and per-stream truncation flags. Output beyond \
                 max_output_bytes is dropped and flagged; redirect large output to a file and \
                 read parts of it instead. Long commands report progress.",
            ),
            tool::<ReadArgs>(
                "read_file",
                "Read a file from a sandbox. Returns its contents as text (utf8) or, if it is \
                 not valid UTF-8, as base64, and whether it was truncated at max_bytes.",
            ),
            tool::<WriteArgs>(
                "write_file",
                "Write a file in a sandbox (replacing it), making parent directories.",
            ),
            tool::<ListFilesArgs>(
                "list_files",
                "List a directory in a sandbox: each entry's name, type (file, dir, symlink, \
                 other), size in bytes and octal mode.",
            ),
            tool::<UploadArgs>(
                "upload_archive",
                "Unpack a base64-encoded tar archive into a directory of a sandbox, e.g. to \
                 copy a project in. Unsafe entries (absolute paths, .., devices) are refused.",
            ),
            tool::<DownloadArgs>(
                "download_archive",
                "Pack a directory of a sandbox as a tar archive and return it base64-encoded \
                 (at most 32 MiB). Its contents were made in the sandbox: treat them as \
                 untrusted.",
            ),
            tool::<SetNetArgs>(
                "set_network_policy",
                "Replace a sandbox's network policy: none, open, or allow listed \
                 networks/domains/ports.",
            ),
            tool::<IdArgs>(
                "network_log",
                "The sandbox's recent network decisions: each flow's time, protocol, \
                 destination, domain, verdict (allow/deny) and the rule that decided.",
            ),
            tool::<TaskArgs>(
                "run_task",
                "Run an agent command on a copy of a workspace (a tar) in a fresh sandbox; the \
                 host validates what it changed, optionally runs `verify` on the result, and \
                 returns the task record (verdict, changes, exit codes) and the unified diff. \
                 The workspace itself is never modified.",
            ),
        ]
    });
    &TOOLS
}

/// One tool call: the surface, who is calling, and the MCP request (for progress).
pub struct Call<'a> {
    /// The request surface.
    pub api: &'a dyn SandboxApi,
    /// Who is asking.
    pub caller: &'a Caller,
    /// The MCP request.
    pub ctx: &'a RequestContext<RoleServer>,
}

/// What a tool returns before formatting: structured content, and text for the model when it
/// should differ from that JSON.
type Answer = Result<(Value, Option<String>), ServiceError>;

impl Call<'_> {
    /// Runs the tool `name` on `args`; `None` when there is no such tool. A call the client
    /// cancels (or hangs up on) stops here: its exec is dropped, which kills the process;
    /// state changes run to their end behind the surface anyway.
    pub async fn run(&self, name: &str, args: JsonObject) -> Option<CallToolResult> {
        let answer = tokio::select! {
            answer = self.dispatch(name, args) => answer?,
            _ = self.ctx.ct.cancelled() => Err(ServiceError::refused(
                ErrorCode::Internal,
                "the client cancelled the call",
            )),
        };
        Some(match answer {
            Ok((value, text)) => {
                let mut result = CallToolResult::structured(value);
                if let Some(text) = text {
                    result.content = vec![ContentBlock::text(text)];
                }
                result
            }
            Err(e) => CallToolResult::structured_error(json!({
                "code": e.code(),
                "message": hutch_core::chain(&e),
            })),
        })
    }

    /// The tool `name`'s answer to `args`; `None` when there is no such tool.
    async fn dispatch(&self, name: &str, args: JsonObject) -> Option<Answer> {
        Some(match name {
            "create_sandbox" => self.with(args, |a| self.create(a)).await,
            "list_sandboxes" => self.with(args, |a| self.list(a)).await,
            "destroy_sandbox" => self.with(args, |a| self.destroy(a)).await,
            "exec" => self.with(args, |a| self.exec(a)).await,
            "read_file" => self.with(args, |a| self.read_file(a)).await,
            "write_file" => self.with(args, |a| self.write_file(a)).await,
            "list_files" => self.with(args, |a| self.list_files(a)).await,
            "upload_archive" => self.with(args, |a| self.upload(a)).await,
            "download_archive" => self.with(args, |a| self.download(a)).await,
            "set_network_policy" => self.with(args, |a| self.set_network(a)).await,
            "network_log" => self.with(args, |a| self.network_log(a)).await,
            "run_task" => self.with(args, |a| self.run_task(a)).await,
            _ => return None,
        })
    }

    /// Parses `args` as `A` (a mismatch is a `bad_request`) and runs `f` on them.
    async fn with<A, F, Fut>(&self, args: JsonObject, f: F) -> Answer
    where
        A: DeserializeOwned,
        F: FnOnce(A) -> Fut,
        Fut: Future<Output = Answer>,
    {
        let args = serde_json::from_value(Value::Object(args)).map_err(|e| {
            ServiceError::refused(ErrorCode::BadRequest, format!("invalid arguments: {e}"))
        })?;
        f(args).await
    }

    /// Awaits `work`, sending a progress notification every [`PROGRESS_EVERY`] (seconds
    /// elapsed, of `total` when known) if the client asked for progress.
    async fn with_progress<T>(&self, total: Option<u64>, work: impl Future<Output = T>) -> T {
        let Some(token) = self.ctx.meta.get_progress_token() else {
            return work.await;
        };
        tokio::pin!(work);
        let start = Instant::now();
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => {
                    let secs = start.elapsed().as_secs();
                    let mut note = ProgressNotificationParam::new(token.clone(), secs as f64)
                        .with_message(format!("still running after {secs} s"));
                    if let Some(total) = total {
                        note = note.with_total(total as f64);
                    }
                    // A client that stopped listening still gets its answer.
                    let _ = self.ctx.peer.notify_progress(note).await;
                }
            }
        }
    }

    async fn create(&self, a: CreateArgs) -> Answer {
        let defaults = SandboxSpec::default();
        let spec = SandboxSpec {
            image: a.image.unwrap_or(defaults.image),
            cpus: a.cpus.unwrap_or(defaults.cpus),
            memory_mib: a.memory_mib.unwrap_or(defaults.memory_mib),
            disk_mib: a.disk_mib.unwrap_or(defaults.disk_mib),
            env: a.env,
            labels: a.labels,
            ttl_secs: a.ttl_secs,
            network: policy(a.network)?,
            template: a.template,
            secrets: a.secrets,
            ..defaults
        };
        let req = Create {
            spec,
            idempotency_key: None,
        };
        let (info, _) = self
            .with_progress(None, self.api.create(self.caller, req))
            .await?;
        Ok((to_json(&info), None))
    }

    async fn list(&self, a: ListArgs) -> Answer {
        let filter = ListFilter {
            state: a.state,
            labels: a.labels.into_iter().collect(),
            include_destroyed: false,
        };
        let sandboxes = self.api.list(self.caller, filter).await?;
        Ok((json!({ "sandboxes": sandboxes }), None))
    }

    async fn destroy(&self, a: IdArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let info = self
            .api
            .lifecycle(self.caller, &id, Lifecycle::Destroy)
            .await?;
        Ok((to_json(&info), None))
    }

    async fn exec(&self, a: ExecArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let argv = match (a.command, a.argv) {
            (Some(line), None) => vec!["/bin/sh".into(), "-c".into(), line],
            (None, Some(argv)) => argv,
            _ => return Err(bad("give exactly one of `command` and `argv`")),
        };
        let limit = a.max_output_bytes.unwrap_or(DEFAULT_OUTPUT).min(MAX_OUTPUT);
        let command = Command {
            argv,
            env: a.env,
            cwd: a.cwd,
            timeout_secs: a.timeout_secs,
        };
        let stdin = a.stdin.map(String::into_bytes);
        let out = self
            .with_progress(
                a.timeout_secs,
                self.api.exec(self.caller, &id, command, stdin, limit),
            )
            .await?;
        let (exit_code, signal) = split_status(out.status);
        let [stdout_dropped, stderr_dropped] = out.dropped;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut notes = Vec::new();
        for (stream, dropped) in [("stdout", stdout_dropped), ("stderr", stderr_dropped)] {
            if dropped > 0 {
                notes.push(format!(
                    "{stream} was truncated: the first {limit} bytes are shown, {dropped} more \
                     were dropped; write it to a file and read parts of it instead"
                ));
            }
        }
        if out.timed_out {
            notes.push("the command was killed at its timeout".into());
        }
        let status = match (exit_code, signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "no exit status".into(),
        };
        let mut text = format!("{status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        for note in &notes {
            text.push_str(&format!("\n[note] {note}"));
        }
        let value = json!({
            "exit_code": exit_code,
            "signal": signal,
            "timed_out": out.timed_out,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": stdout_dropped > 0,
            "stderr_truncated": stderr_dropped > 0,
            "notes": notes,
        });
        Ok((value, Some(text)))
    }

    async fn read_file(&self, a: ReadArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let cap = a.max_bytes.unwrap_or(DEFAULT_READ).min(MAX_INLINE);
        let (bytes, truncated) = collect(cap, |sink| {
            self.api.read_file(self.caller, &id, &a.path, sink)
        })
        .await?;
        let size = bytes.len();
        let (encoding, content) = match String::from_utf8(bytes) {
            Ok(text) => ("utf8", text),
            Err(e) => ("base64", base64_engine().encode(e.into_bytes())),
        };
        let mut value = json!({
            "path": a.path,
            "encoding": encoding,
            "content": content,
            "bytes": size,
            "truncated": truncated,
        });
        if truncated {
            value["note"] = json!(format!(
                "only the first {cap} bytes are shown; ask for more with max_bytes or read \
                 parts with exec (e.g. tail, sed -n)"
            ));
        }
        Ok((value, None))
    }

    async fn write_file(&self, a: WriteArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let mode = match a.mode.as_deref() {
            None => 0o644,
            Some(m) => u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| bad(format!("mode {m:.10} is not octal permission bits")))?,
        };
        let bytes = match a.encoding {
            Encoding::Utf8 => a.content.into_bytes(),
            Encoding::Base64 => decode(&a.content, "content")?,
        };
        let size = bytes.len();
        self.api
            .write_file(self.caller, &id, &a.path, mode, body(bytes))
            .await?;
        Ok((json!({ "path": a.path, "bytes": size }), None))
    }

    async fn list_files(&self, a: ListFilesArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        // Absolute, so `find` never takes it for an option.
        let path = hutch_core::service::transfer::guest_path(&a.path)?;
        // The guest's `find`, NUL-separated so that no name can forge an entry; whatever it
        // prints is guest data and is only split, never interpreted.
        let command = Command {
            argv: [
                "find",
                "-H",
                &path,
                "-mindepth",
                "1",
                "-maxdepth",
                "1",
                "-printf",
                "%y/%s/%m/%f\\0",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        };
        let out = self
            .api
            .exec(self.caller, &id, command, None, MAX_OUTPUT)
            .await?;
        if split_status(out.status).0 != Some(0) {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(ServiceError::refused(
                ErrorCode::NotFound,
                format!("cannot list {:.200}: {}", a.path, why.trim()),
            ));
        }
        let entries: Vec<Value> = out
            .stdout
            .split(|b| *b == 0)
            .filter(|e| !e.is_empty())
            .filter_map(entry)
            .collect();
        Ok((
            json!({ "path": a.path, "entries": entries, "truncated": out.truncated() }),
            None,
        ))
    }

    async fn upload(&self, a: UploadArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let tar = decode(&a.tar_base64, "tar_base64")?;
        let size = tar.len();
        self.api
            .put_archive(self.caller, &id, &a.path, body(tar))
            .await?;
        Ok((json!({ "path": a.path, "bytes": size }), None))
    }

    async fn download(&self, a: DownloadArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let (tar, truncated) = collect(MAX_INLINE, |sink| {
            self.api.get_archive(self.caller, &id, &a.path, sink)
        })
        .await?;
        if truncated {
            return Err(bad(format!(
                "the archive of {:.200} is larger than {MAX_INLINE} bytes; download a smaller \
                 directory",
                a.path
            )));
        }
        Ok((
            json!({ "path": a.path, "bytes": tar.len(), "tar_base64": base64_engine().encode(tar) }),
            None,
        ))
    }

    async fn set_network(&self, a: SetNetArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let info = self
            .api
            .set_network(self.caller, &id, policy(Some(a.network))?)
            .await?;
        Ok((to_json(&info), None))
    }

    async fn network_log(&self, a: IdArgs) -> Answer {
        let id = parse_id(&a.sandbox_id)?;
        let events = self.api.network_log(self.caller, &id).await?;
        let events: Vec<_> = events.into_iter().map(crate::routes::net_event).collect();
        Ok((json!({ "events": events }), None))
    }

    async fn run_task(&self, a: TaskArgs) -> Answer {
        let workspace = decode(&a.workspace_tar_base64, "workspace_tar_base64")?;
        let spec = TaskSpec {
            command: a.command,
            template: a.template,
            network: policy(a.network)?,
            env: a.env,
            timeout_secs: a.timeout_secs.unwrap_or(600),
            allow: a.allow,
            verify: a.verify,
            limits: Default::default(),
            secrets: a.secrets,
        };
        let total = spec.timeout_secs;
        let record = self
            .with_progress(
                Some(total),
                self.api.run_task(self.caller, spec, workspace, None),
            )
            .await?;
        let diff = match record.changeset_digest {
            Some(_) => Some(self.api.task_diff(self.caller, &record.id).await?),
            None => None,
        };
        let diff_truncated = diff.as_ref().is_some_and(|d| d.len() > MAX_DIFF);
        let diff = diff.map(|d| cut(d, MAX_DIFF));
        let mut value = json!({
            "record": record,
            "diff": diff,
            "diff_truncated": diff_truncated,
        });
        if diff_truncated {
            value["note"] = json!(format!(
                "the diff was cut at {MAX_DIFF} bytes; `hutch task diff {}` shows all of it",
                record.id
            ));
        }
        Ok((value, None))
    }
}

/// A sandbox id argument, parsed once as the HTTP routes do (one that cannot be an id is a
/// sandbox that does not exist).
pub fn parse_id(raw: &str) -> Result<SandboxId, ServiceError> {
    crate::extract::sandbox_id(raw).map_err(|e| ServiceError::refused(e.0.code, e.0.message))
}

/// A refusal of the arguments.
fn bad(message: impl Into<String>) -> ServiceError {
    ServiceError::refused(ErrorCode::BadRequest, message)
}

/// The surface's policy for a tool's network argument (none when absent).
fn policy(net: Option<NetArgs>) -> Result<NetworkPolicy, ServiceError> {
    let Some(net) = net else {
        return Ok(NetworkPolicy::None);
    };
    let listed = !(net.cidrs.is_empty() && net.ports.is_empty() && net.domains.is_empty());
    match net.mode {
        NetMode::Allow => Ok(NetworkPolicy::Allow {
            cidrs: net.cidrs,
            ports: net.ports,
            domains: net.domains,
        }),
        _ if listed => Err(bad("cidrs, ports and domains are only for mode \"allow\"")),
        NetMode::None => Ok(NetworkPolicy::None),
        NetMode::Open => Ok(NetworkPolicy::Open),
    }
}

/// The encoding of binary contents in JSON.
fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Decodes the base64 argument `what`, refusing more than [`MAX_INLINE`] bytes.
fn decode(text: &str, what: &str) -> Result<Vec<u8>, ServiceError> {
    if text.len() / 4 * 3 > MAX_INLINE {
        return Err(bad(format!("{what} is over {MAX_INLINE} bytes")));
    }
    base64_engine()
        .decode(text.trim())
        .map_err(|e| bad(format!("{what} is not base64: {e}")))
}

/// `bytes` as the surface's upload stream.
fn body(bytes: Vec<u8>) -> hutch_core::service::ByteStream {
    Box::pin(futures::stream::once(async move {
        Ok(axum::body::Bytes::from(bytes))
    }))
}

/// Runs a download (`send` writes into the pipe it is given) and keeps its first `cap`
/// bytes: the bytes, and whether there were more (then the download is cut off, and its
/// error for the closed pipe is not one).
async fn collect<F, Fut>(cap: usize, send: F) -> Result<(Vec<u8>, bool), ServiceError>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = hutch_core::service::Result<()>>,
{
    let (sink, source) = tokio::io::duplex(PIPE_BYTES);
    let read = async move {
        let mut bytes = Vec::new();
        let got = source
            .take(cap as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .map(|_| ());
        let over = bytes.len() > cap;
        bytes.truncate(cap);
        // The pipe closes here: a sender with more to write stops.
        (got, bytes, over)
    };
    let (sent, (got, bytes, over)) = tokio::join!(send(sink), read);
    if over {
        return Ok((bytes, true));
    }
    sent?;
    got.map_err(|e| ServiceError::refused(ErrorCode::Internal, format!("reading: {e}")))?;
    Ok((bytes, false))
}

/// One `find -printf '%y/%s/%m/%f'` entry as JSON (None if the guest printed something else).
fn entry(raw: &[u8]) -> Option<Value> {
    let raw = String::from_utf8_lossy(raw);
    let mut fields = raw.splitn(4, '/');
    let kind = match fields.next()? {
        "f" => "file",
        "d" => "dir",
        "l" => "symlink",
        _ => "other",
    };
    let size: u64 = fields.next()?.parse().ok()?;
    let mode = fields.next()?;
    let name = fields.next()?;
    Some(json!({ "name": name, "type": kind, "size": size, "mode": mode }))
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A serializable answer as JSON.
fn to_json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("serializable")
}
