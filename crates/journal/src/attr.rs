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
/// SHA-256 (hex) of the DSSE pre-authentication encoding the sandbox key signed.
pub const ATTESTATION_DIGEST: &str = "hutch.attestation.sha256";
