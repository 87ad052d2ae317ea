//! Agent tasks through the daemon (`/v1/tasks`).

use http_body_util::BodyExt;
use hutch_task::{
    model::{FrameReader, FRAME_ERROR, FRAME_RECORD},
    sign::SignatureCheck,
    Baseline, TaskRecord, TaskSpec,
};
use hyper::Method;

use super::{api_error, Client, ClientError};
use crate::API_PREFIX;

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
        let body = hutch_task::model::encode_request(spec, workspace_tar);
        self.call(Method::POST, &format!("{API_PREFIX}/tasks"), body)
            .await
    }

    /// Runs an agent task like [`Client::run_task`], handing the agent's (and the verify
    /// command's) output to `on_output` as it comes: `(FRAME_STDOUT | FRAME_STDERR, bytes)`.
    pub async fn run_task_streaming(
        &self,
        spec: &TaskSpec,
        workspace_tar: &[u8],
        mut on_output: impl FnMut(u8, &[u8]),
    ) -> Result<TaskRecord, ClientError> {
        let body = hutch_task::model::encode_request(spec, workspace_tar);
        let resp = self
            .send(
                Method::POST,
                &format!("{API_PREFIX}/tasks?stream=true"),
                body,
            )
            .await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map_err(ClientError::Http)?.to_bytes();
            return Err(api_error(status, &bytes));
        }
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

    /// Whether a stored task is as the daemon's host key signed it.
    pub async fn task_signature(&self, id: &str) -> Result<SignatureCheck, ClientError> {
        self.call(Method::GET, &task_path(id, "/signature"), vec![])
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
