//! Which actions are legal in which lifecycle state. Front ends never decide this themselves.

use hutch_types::SandboxState;

/// Something a client asks of an existing sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// Run a command, read or write files.
    Use,
    /// Freeze the vCPUs.
    Pause,
    /// Thaw the vCPUs.
    Resume,
    /// Power off, keep the record.
    Stop,
    /// Boot a stopped sandbox again.
    Start,
    /// Remove everything.
    Destroy,
    /// Read the console log.
    Console,
    /// Change the network policy.
    Network,
    /// Snapshot it into children.
    Fork,
    /// Save it to disk and stop its VMM.
    Suspend,
    /// Change when its TTL destroys it.
    Expire,
}

/// Why an action is refused in a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a sandbox that is {state}")]
pub struct IllegalAction {
    /// The action, in words.
    pub action: &'static str,
    /// The state's name.
    pub state: &'static str,
}

/// Checks `action` against `state`.
pub fn check(state: &SandboxState, action: ActionKind) -> Result<(), IllegalAction> {
    use ActionKind::*;
    use SandboxState as S;
    let ok = match action {
        Use => matches!(state, S::Running),
        Pause => matches!(state, S::Running),
        Resume => matches!(state, S::Paused | S::Suspended),
        Stop => matches!(state, S::Running | S::Paused),
        Start => matches!(state, S::Stopped),
        // A create in flight always ends (running or failed, within the boot timeout); tearing
        // it down meanwhile would race the boot, which would bring the sandbox back.
        Destroy => !matches!(state, S::Destroyed | S::Creating),
        Console => !matches!(state, S::Destroyed),
        Network => matches!(state, S::Running | S::Paused),
        Fork | Suspend => matches!(state, S::Running | S::Paused),
        Expire => !matches!(state, S::Destroyed | S::Creating),
    };
    if ok {
        Ok(())
    } else {
        Err(IllegalAction {
            action: match action {
                Use => "use",
                Pause => "pause",
                Resume => "resume",
                Stop => "stop",
                Start => "start",
                Destroy => "destroy",
                Console => "read the console of",
                Network => "change the network of",
                Fork => "fork",
                Suspend => "pause to disk",
                Expire => "change the TTL of",
            },
            state: state.name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hutch_types::SandboxState as S;

    #[test]
    fn the_table_allows_only_sensible_moves() {
        assert!(check(&S::Suspended, ActionKind::Resume).is_ok());
        assert!(check(&S::Suspended, ActionKind::Use).is_err());
        assert!(check(&S::Suspended, ActionKind::Suspend).is_err());
        assert!(check(&S::Suspended, ActionKind::Destroy).is_ok());
        assert!(check(&S::Paused, ActionKind::Fork).is_ok());
        assert!(check(&S::Stopped, ActionKind::Fork).is_err());
        assert!(check(&S::Running, ActionKind::Use).is_ok());
        assert!(check(&S::Paused, ActionKind::Use).is_err());
        assert!(check(&S::Paused, ActionKind::Resume).is_ok());
        assert!(check(&S::Running, ActionKind::Resume).is_err());
        assert!(check(&S::Creating, ActionKind::Pause).is_err());
        assert!(check(&S::Failed("x".into()), ActionKind::Destroy).is_ok());
        assert!(check(&S::Creating, ActionKind::Destroy).is_err());
        assert!(check(&S::Stopped, ActionKind::Start).is_ok());
        assert!(check(&S::Paused, ActionKind::Expire).is_ok());
        assert!(check(&S::Destroyed, ActionKind::Expire).is_err());
        assert!(check(&S::Running, ActionKind::Start).is_err());
        assert!(check(&S::Failed("x".into()), ActionKind::Start).is_err());
        let e = check(&S::Destroyed, ActionKind::Destroy).unwrap_err();
        assert_eq!(e.to_string(), "cannot destroy a sandbox that is destroyed");
    }
}
