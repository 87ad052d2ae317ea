//! `hutch task run-many FILE`: a TOML list of tasks, run concurrently in rounds. A task may
//! name others in `after`; it runs in a later round, on the workspace with every earlier
//! round's accepted changesets applied.
//!
//! ```toml
//! concurrency = 2                # tasks at once (default 2)
//! [[task]]
//! name = "docs"
//! command = ["sh", "-c", "echo hi >> README.md"]
//! [[task]]
//! name = "tests"
//! command = ["sh", "-c", "..."]
//! after = ["docs"]
//! verify = "make test"           # also: template, net ("none"|"open"), env, timeout_secs, allow
//! ```

use std::collections::{BTreeMap, BTreeSet};

use hutch_types::NetworkPolicy;
use serde::Deserialize;

use crate::TaskSpec;

/// The file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManyFile {
    /// Tasks at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The tasks.
    #[serde(default, rename = "task")]
    pub tasks: Vec<ManyTask>,
}

fn default_concurrency() -> usize {
    2
}

/// One task of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManyTask {
    /// Unique name.
    pub name: String,
    /// The agent command (argv).
    pub command: Vec<String>,
    /// Template to restore from.
    #[serde(default)]
    pub template: Option<String>,
    /// `none` (default) or `open`.
    #[serde(default)]
    pub net: Option<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secrets attached to the agent's sandbox, by name.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Agent timeout in seconds (default 600).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Allowed path globs.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Verification command.
    #[serde(default)]
    pub verify: Option<String>,
    /// Tasks that must finish (with an accepted or empty changeset) first.
    #[serde(default)]
    pub after: Vec<String>,
}

/// Why a run-many file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManyError {
    /// Not valid TOML for this format.
    #[error("run-many file")]
    Parse(#[source] toml::de::Error),
    /// The task graph is unusable.
    #[error("run-many file: {0}")]
    Graph(String),
}

impl ManyTask {
    /// The task's spec.
    pub fn spec(&self) -> Result<TaskSpec, ManyError> {
        let network = match self.net.as_deref() {
            None | Some("none") => NetworkPolicy::None,
            Some("open") => NetworkPolicy::Open,
            Some(other) => {
                return Err(ManyError::Graph(format!(
                    "task {}: net {other:?} is not none or open",
                    self.name
                )))
            }
        };
        Ok(TaskSpec {
            command: self.command.clone(),
            template: self.template.clone(),
            network,
            env: self.env.clone(),
            secrets: self.secrets.clone(),
            timeout_secs: self.timeout_secs.unwrap_or(600),
            allow: self.allow.clone(),
            verify: self.verify.clone(),
            limits: Default::default(),
        })
    }
}

impl ManyFile {
    /// Parses and checks a run-many file.
    pub fn parse(text: &str) -> Result<ManyFile, ManyError> {
        let f: ManyFile = toml::from_str(text).map_err(ManyError::Parse)?;
        if f.concurrency == 0 {
            return Err(ManyError::Graph("concurrency must be at least 1".into()));
        }
        for t in &f.tasks {
            t.spec()?;
        }
        f.rounds()?;
        Ok(f)
    }

    /// The tasks in rounds (indices into `tasks`): each round's tasks depend only on tasks of
    /// earlier rounds. Refuses duplicate names, unknown names in `after`, and cycles.
    pub fn rounds(&self) -> Result<Vec<Vec<usize>>, ManyError> {
        let mut index = BTreeMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if index.insert(t.name.as_str(), i).is_some() {
                return Err(ManyError::Graph(format!(
                    "two tasks are named {:?}",
                    t.name
                )));
            }
        }
        for t in &self.tasks {
            if let Some(bad) = t.after.iter().find(|a| !index.contains_key(a.as_str())) {
                return Err(ManyError::Graph(format!(
                    "task {:?} is after unknown task {bad:?}",
                    t.name
                )));
            }
        }
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut rounds = Vec::new();
        while done.len() < self.tasks.len() {
            let round: Vec<usize> = (0..self.tasks.len())
                .filter(|i| !done.contains(self.tasks[*i].name.as_str()))
                .filter(|i| {
                    self.tasks[*i]
                        .after
                        .iter()
                        .all(|a| done.contains(a.as_str()))
                })
                .collect();
            if round.is_empty() {
                return Err(ManyError::Graph("the `after` lists form a cycle".into()));
            }
            done.extend(round.iter().map(|i| self.tasks[*i].name.as_str()));
            rounds.push(round);
        }
        Ok(rounds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tasks: &str) -> Result<ManyFile, ManyError> {
        ManyFile::parse(tasks)
    }

    #[test]
    fn rounds_follow_after() {
        let f = file(
            r#"
            concurrency = 3
            [[task]]
            name = "a"
            command = ["true"]
            [[task]]
            name = "c"
            command = ["true"]
            after = ["b"]
            [[task]]
            name = "b"
            command = ["true"]
            after = ["a"]
            net = "open"
            [[task]]
            name = "d"
            command = ["true"]
            "#,
        )
        .unwrap();
        assert_eq!(f.rounds().unwrap(), vec![vec![0, 3], vec![2], vec![1]]);
        assert_eq!(f.tasks[2].spec().unwrap().network, NetworkPolicy::Open);
    }

    #[test]
    fn bad_graphs_are_refused() {
        let t = |name: &str, after: &str| {
            format!("[[task]]\nname = \"{name}\"\ncommand = [\"true\"]\nafter = [{after}]\n")
        };
        assert!(
            file(&(t("a", "\"b\"") + &t("b", "\"a\""))).is_err(),
            "cycle"
        );
        assert!(file(&t("a", "\"zz\"")).is_err(), "unknown");
        assert!(file(&(t("a", "") + &t("a", ""))).is_err(), "duplicate");
        assert!(file("concurrency = 0").is_err());
        assert!(file("[[task]]\nname = \"a\"\ncommand = [\"x\"]\nnet = \"allow\"\n").is_err());
        assert!(file("[[task]]\nname = \"a\"\ncommand = [\"x\"]\nbogus = 1\n").is_err());
    }
}
