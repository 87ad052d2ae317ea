//! Boot-time facts from the host (entropy, clock, hostname) and power-off.

use std::os::fd::AsRawFd;

use hutch_protocol::{ErrorCode, GuestMsg, OpError, Setup};
use nix::{sys::time::TimeSpec, time::ClockId};

use crate::{ops::io_error, server::Conn};

/// Most entropy bytes accepted in one `Setup`.
const MAX_ENTROPY: usize = 4096;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// Applies `setup` when the agent is the VM's init; as a host process it only validates, so a
/// test never touches the host's clock, RNG or hostname.
pub fn apply(setup: &Setup, is_init: bool) -> Result<(), OpError> {
    validate(setup)?;
    if !is_init {
        return Ok(());
    }
    seed_rng(&setup.entropy).map_err(io_error)?;
    let now = TimeSpec::new(setup.unix_secs as i64, setup.unix_nanos as i64);
    nix::time::clock_settime(ClockId::CLOCK_REALTIME, now).map_err(|e| io_error(e.into()))?;
    nix::unistd::sethostname(&setup.hostname).map_err(|e| io_error(e.into()))?;
    tracing::info!(hostname = %setup.hostname, "setup applied");
    Ok(())
}

fn validate(setup: &Setup) -> Result<(), OpError> {
    let bad = |m: String| OpError {
        code: ErrorCode::InvalidRequest,
        message: m,
    };
    if setup.entropy.len() > MAX_ENTROPY {
        return Err(bad(format!("more than {MAX_ENTROPY} entropy bytes")));
    }
    if setup.unix_nanos >= 1_000_000_000 {
        return Err(bad("nanoseconds out of range".into()));
    }
    let h = &setup.hostname;
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-');
    if !ok {
        return Err(bad(format!("invalid hostname {h:?}")));
    }
    Ok(())
}

/// Credits `bytes` to the kernel's entropy pool, then forces a CRNG reseed.
fn seed_rng(bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    // SAFETY: the buffer is a valid rand_pool_info that outlives both calls.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Answers `Shutdown`: syncs, confirms to the host, then powers off (PID 1) or exits (test mode).
pub async fn shutdown(conn: &Conn, op: u32) {
    nix::unistd::sync();
    conn.send(op, GuestMsg::Done);
    conn.flush().await;
    if conn.is_init {
        crate::init::power_off();
    }
    std::process::exit(0);
}
