//! Attribute names. Where OpenTelemetry's semantic conventions name a thing, the journal uses
//! that name, so that the records read like the traces and logs of other tools; the rest are
//! `hutch.*`.

/// The full argv of a process (an array of strings).
pub const PROCESS_COMMAND_ARGS: &str = "process.command_args";
/// A process's exit code.
pub const PROCESS_EXIT_CODE: &str = "process.exit.code";
/// The signal that ended a process, if one did.
pub const PROCESS_EXIT_SIGNAL: &str = "hutch.process.exit.signal";
/// A process's working directory.
pub const PROCESS_WORKING_DIRECTORY: &str = "process.working_directory";
/// The names (never the values) of the variables set for a process.
pub const PROCESS_ENV_NAMES: &str = "hutch.process.env_names";
/// Whether a process ran on a terminal.
pub const PROCESS_TTY: &str = "hutch.process.tty";
/// How long a process ran, in milliseconds.
pub const PROCESS_DURATION_MS: &str = "hutch.process.duration_ms";
/// Bytes of standard output seen.
pub const STDOUT_BYTES: &str = "hutch.process.stdout.bytes";
/// BLAKE3 of the standard output seen.
pub const STDOUT_DIGEST: &str = "hutch.process.stdout.blake3";
/// Bytes of standard error seen.
pub const STDERR_BYTES: &str = "hutch.process.stderr.bytes";
/// BLAKE3 of the standard error seen.
pub const STDERR_DIGEST: &str = "hutch.process.stderr.blake3";
/// A file's path.
pub const FILE_PATH: &str = "file.path";
/// A file's size in bytes.
pub const FILE_SIZE: &str = "file.size";
/// A transfer's direction: `in` (host to guest) or `out`.
pub const FILE_DIRECTION: &str = "hutch.file.direction";
/// BLAKE3 of the bytes transferred.
pub const FILE_DIGEST: &str = "hutch.file.blake3";
/// An address the guest connected to.
pub const DESTINATION_ADDRESS: &str = "destination.address";
/// A port the guest connected to.
pub const DESTINATION_PORT: &str = "destination.port";
/// A server's name or address.
pub const SERVER_ADDRESS: &str = "server.address";
/// A DNS question's name.
pub const DNS_QUESTION_NAME: &str = "dns.question.name";
/// The API operation a record answers.
pub const OPERATION: &str = "hutch.operation";
/// How an operation ended: `ok`, or the error code.
pub const OUTCOME: &str = "hutch.outcome";
/// The error message of a failed operation.
pub const ERROR_MESSAGE: &str = "error.message";
/// The sandbox's identity public key (hex), in the first record.
pub const JOURNAL_PUBLIC_KEY: &str = "hutch.journal.public_key";
/// The host key's signature over the certificate message (hex), in the first record.
pub const JOURNAL_CERTIFICATE: &str = "hutch.journal.certificate";
/// The host key (hex) that certified the sandbox key, in the first record.
pub const JOURNAL_HOST_KEY: &str = "hutch.journal.host_key";
/// A checkpoint's signed note.
pub const CHECKPOINT_NOTE: &str = "hutch.checkpoint.note";
/// Bytes cut off a torn tail.
pub const TORN_BYTES: &str = "hutch.journal.torn.bytes";
/// BLAKE3 of a torn tail's bytes.
pub const TORN_DIGEST: &str = "hutch.journal.torn.blake3";
/// Why a journal was sealed.
pub const SEAL_REASON: &str = "hutch.journal.seal.reason";
/// A server's port.
pub const SERVER_PORT: &str = "server.port";
/// The transport of a flow: `tcp`, `udp`, `icmp`, or the IP protocol number.
pub const NETWORK_TRANSPORT: &str = "network.transport";
/// The addresses a DNS answer gave (an array of strings).
pub const DNS_ANSWERS: &str = "dns.answers";
/// A network decision: `allow` or `deny`.
pub const NETWORK_VERDICT: &str = "hutch.network.verdict";
/// The rule that decided (`deny_policy`, `allow_domain`, `dns_answer`, …).
pub const NETWORK_RULE: &str = "hutch.network.rule";
/// An HTTP request's method.
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
/// A URL's path.
pub const URL_PATH: &str = "url.path";
/// A secret, by name (never its value).
pub const SECRET_NAME: &str = "hutch.secret.name";
/// What the secret broker did (`substituted`, `refused`, `violation`, `forwarded`, `scrubbed`).
pub const SECRET_DECISION: &str = "hutch.secret.decision";
/// Why the broker refused or flagged a request.
pub const SECRET_REASON: &str = "hutch.secret.reason";
/// The audience a workload identity token was issued for.
pub const IDENTITY_AUDIENCE: &str = "hutch.identity.audience";
/// A token's id (`jti`).
pub const IDENTITY_TOKEN_ID: &str = "hutch.identity.jti";
/// A token's expiry (seconds since the Unix epoch).
pub const IDENTITY_EXPIRES: &str = "hutch.identity.exp";
/// How many guest-triggered events were left out (over the rate limit or the queue).
pub const SUPPRESSED_COUNT: &str = "hutch.suppressed.count";
/// A task's id.
pub const TASK_ID: &str = "hutch.task.id";
/// The SHA-256 of a task's encoded changeset.
pub const TASK_CHANGESET_DIGEST: &str = "hutch.task.changeset.sha256";
/// The paths a task's changeset changes (an array of strings).
pub const TASK_CHANGESET_FILES: &str = "hutch.task.changeset.files";
/// The host's verdict on a task's changeset (`accepted`, `empty`, `rejected`, …).
pub const TASK_VERDICT: &str = "hutch.task.verdict";
/// The id of one exec (in its `exec.start` and `exec.end` records): what `hutch replay` takes.
pub const EXEC_ID: &str = "hutch.exec.id";
/// BLAKE3 of an exec's session recording (hex): its file's name.
pub const RECORDING_DIGEST: &str = "hutch.recording.blake3";
/// The size of an exec's session recording in bytes.
pub const RECORDING_BYTES: &str = "hutch.recording.bytes";
/// Whether an exec's session recording was cut (at its cap).
pub const RECORDING_TRUNCATED: &str = "hutch.recording.truncated";
/// Bytes of an exec's session the recording did not keep.
pub const RECORDING_DROPPED: &str = "hutch.recording.dropped";
/// SHA-256 (hex) of the DSSE pre-authentication encoding the sandbox key signed.
pub const ATTESTATION_DIGEST: &str = "hutch.attestation.sha256";
