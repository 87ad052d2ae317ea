//! Agent tasks through the daemon (`/v1/tasks`).

use hutch_task::{Baseline, TaskRecord, TaskSpec};
use hyper::Method;

use super::{Client, ClientError};
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
