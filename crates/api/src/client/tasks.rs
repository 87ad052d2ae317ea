//! Agent tasks through the daemon (`/v1/tasks`).

use http_body_util::BodyExt;
use hutch_task::{
    attest::Envelope,
    model::{FrameReader, FRAME_ERROR, FRAME_RECORD},
    sign::SignatureCheck,
    Baseline, TaskRecord, TaskSpec,
};
use hyper::Method;

use super::{api_error, Client, ClientError};
use crate::API_PREFIX;

/// The `multipart/form-data` body of `POST /v1/tasks` and its content type: a `spec` part
/// (the spec as JSON) and a `workspace` part (the tar archive).
pub fn task_form(spec: &TaskSpec, workspace_tar: &[u8]) -> (String, Vec<u8>) {
    let json = serde_json::to_vec(spec).expect("serializable");
    let boundary = free_boundary(&[&json, workspace_tar]);
    let mut body = Vec::with_capacity(json.len() + workspace_tar.len() + 512);
    let parts: [(&str, &str, &[u8]); 2] = [
        ("name=\"spec\"", "application/json", &json),
        (
            "name=\"workspace\"; filename=\"workspace.tar\"",
            "application/x-tar",
            workspace_tar,
        ),
    ];
    for (disposition, content_type, data) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\
                 Content-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A form boundary that occurs in none of the parts.
fn free_boundary(parts: &[&[u8]]) -> String {
    (0u64..)
        .map(|n| format!("hutch-task-form-{n:08x}"))
        .find(|b| {
            parts
                .iter()
                .all(|p| !p.windows(b.len()).any(|w| w == b.as_bytes()))
        })
        .expect("a free boundary")
}

fn task_path(id: &str, tail: &str) -> String {
    format!("{API_PREFIX}/tasks/{}{tail}", super::encode(id))
}

impl Client {
    /// Runs an agent task on `workspace_tar` and waits for its record (this takes as long as
    /// the agent and the verification).
    pub async fn run_task(
        &self,
        spec: &TaskSpec,
        workspace_tar: &[u8],
    ) -> Result<TaskRecord, ClientError> {
        let (content_type, body) = task_form(spec, workspace_tar);
        let bytes = self
            .ok_with(
                Method::POST,
                &format!("{API_PREFIX}/tasks"),
                &content_type,
                body,
            )
            .await?;
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// Runs an agent task like [`Client::run_task`], handing the agent's (and the verify
    /// command's) output to `on_output` as it comes: `(FRAME_STDOUT | FRAME_STDERR, bytes)`.
    pub async fn run_task_streaming(
        &self,
        spec: &TaskSpec,
        workspace_tar: &[u8],
        mut on_output: impl FnMut(u8, &[u8]),
    ) -> Result<TaskRecord, ClientError> {
        let (content_type, body) = task_form(spec, workspace_tar);
        let resp = self
            .send_with(
                Method::POST,
                &format!("{API_PREFIX}/tasks?stream=true"),
                &content_type,
                body,
            )
            .await?;
        let mut body = super::check_status(resp).await?.into_body();
        let mut reader = FrameReader::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(ClientError::Http)?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            reader.push(data);
            while let Some((kind, data)) = reader.next_frame().map_err(ClientError::Stream)? {
                match kind {
                    FRAME_RECORD => {
                        return serde_json::from_slice(&data).map_err(ClientError::Decode)
                    }
                    // The stream itself was a 200; the error frame carries its own code.
                    FRAME_ERROR => return Err(api_error(hyper::StatusCode::BAD_REQUEST, &data)),
                    _ => on_output(kind, &data),
                }
            }
        }
        Err(ClientError::Stream(
            "the task stream ended before its record".into(),
        ))
    }

    /// Whether a stored task is as its attestation says (checked by the daemon, with its key).
    pub async fn task_signature(&self, id: &str) -> Result<SignatureCheck, ClientError> {
        self.call(Method::GET, &task_path(id, "/signature"), vec![])
            .await
    }

    /// A task's attestation (an in-toto statement in a DSSE envelope), as stored.
    pub async fn task_attestation(&self, id: &str) -> Result<Envelope, ClientError> {
        self.call(Method::GET, &task_path(id, "/attestation"), vec![])
            .await
    }

    /// Every stored task, oldest first.
    pub async fn tasks(&self) -> Result<Vec<TaskRecord>, ClientError> {
        self.call(Method::GET, &format!("{API_PREFIX}/tasks"), vec![])
            .await
    }

    /// One task's record.
    pub async fn task(&self, id: &str) -> Result<TaskRecord, ClientError> {
        self.call(Method::GET, &task_path(id, ""), vec![]).await
    }

    /// The task's baseline.
    pub async fn task_baseline(&self, id: &str) -> Result<Baseline, ClientError> {
        self.call(Method::GET, &task_path(id, "/baseline"), vec![])
            .await
    }

    /// The accepted changeset's stream (guest-made once: validate before use).
    pub async fn task_changeset(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        Ok(self
            .ok(Method::GET, &task_path(id, "/changeset"), vec![])
            .await?
            .to_vec())
    }

    /// The accepted changeset as a unified diff.
    pub async fn task_diff(&self, id: &str) -> Result<String, ClientError> {
        let bytes = self
            .ok(Method::GET, &task_path(id, "/diff"), vec![])
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
