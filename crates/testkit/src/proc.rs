//! Processes by exact identity, from `/proc/<pid>/stat`.

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: `T` when stopped (paused), `Z` when exited but not reaped.
    pub(crate) state: char,
    /// Field 22: when the process started, in clock ticks since boot.
    pub(crate) start_time: u64,
}

/// Reads `/proc/<pid>/stat`; `None` if there is no such process.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may contain spaces and parentheses: fields 3… follow the last ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// The process `pid` that started at `start_time`, if it still runs (a zombie does not).
pub(crate) fn running(pid: u32, start_time: u64) -> Option<Stat> {
    stat(pid).filter(|s| s.start_time == start_time && s.state != 'Z')
}
