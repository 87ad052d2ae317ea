//! Kernel arguments that let a guest skip timer calibration under TCG.
//!
//! Under TCG the guest has no kvm-clock, and `microvm` has no HPET or ACPI PM timer, so the
//! kernel calibrates its TSC against the emulated PIT. That is racy under emulation: on this
//! project's hosts "Fast TSC calibration using PIT" failed in 3 of 8 measured boots
//! ("tsc: Unable to calibrate against PIT", "No reference (HPET/PMTIMER) available"), the TSC is
//! then marked unstable, the clocksource falls back to jiffies and the boot stalls for tens of
//! seconds (measured: >60 s) in the delay-loop calibration. When calibration does succeed, the
//! TSC sync check still marks it unstable ("TSCs unsynchronized") and the guest keeps time with
//! the jiffies clocksource.
//!
//! Under TCG the guest's `rdtsc` returns the *host's* TSC (QEMU's `cpu_get_host_ticks`), so the
//! host knows the right answer. We therefore measure the host TSC frequency once and pass:
//!
//! * `tsc_early_khz=<khz>`: the TSC frequency, so no PIT calibration is attempted. This also
//!   gives the boot CPU its loops-per-jiffy ("Calibrating delay loop (skipped)").
//! * `lpj=<khz*1000/HZ>`: loops per jiffy for *every* CPU. Without it the secondary vCPUs still
//!   run the jiffies-based delay calibration. x86 `udelay` counts TSC cycles scaled by lpj, so
//!   lpj = TSC cycles per jiffy. HZ is the guest kernel's `CONFIG_HZ`, which the host cannot
//!   see; Debian kernels use 250 ([`GUEST_HZ`]). A kernel with another HZ can override it with
//!   its own `lpj=` in `extra_cmdline` (the last occurrence wins).
//! * `tsc=reliable`: skip the TSC sync check and clocksource watchdog, so the guest uses the TSC
//!   clocksource instead of jiffies. Honest only because the guest TSC *is* the host TSC, so it
//!   is passed only when the host TSC is invariant (`constant_tsc` and `nonstop_tsc`).
//! * `no_timer_check`: skip the IO-APIC timer IRQ check, another PIT round trip that is slow
//!   under emulation.
//!
//! Under KVM none of this is needed (kvm-clock provides the frequency) and nothing is passed.

use std::sync::OnceLock;

/// The guest kernel's `CONFIG_HZ` assumed when computing `lpj` (Debian's value).
pub const GUEST_HZ: u64 = 250;

/// The host's TSC, as seen by a TCG guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HostTsc {
    /// Measured frequency in kHz.
    pub khz: u64,
    /// Whether the host TSC is invariant (`constant_tsc` and `nonstop_tsc` in `/proc/cpuinfo`).
    pub invariant: bool,
}

/// The kernel arguments for a TCG guest given the host TSC (see the module docs).
pub fn tcg_timer_args(tsc: HostTsc) -> Vec<String> {
    let mut args = vec![
        format!("tsc_early_khz={}", tsc.khz),
        format!("lpj={}", tsc.khz * 1000 / GUEST_HZ),
    ];
    if tsc.invariant {
        args.push("tsc=reliable".into());
    }
    args.push("no_timer_check".into());
    args
}

/// The host TSC, measured once per process (about 60 ms, blocking); `None` on a host without a
/// usable TSC, in which case the guest calibrates by itself.
pub fn host_tsc() -> Option<HostTsc> {
    static TSC: OnceLock<Option<HostTsc>> = OnceLock::new();
    *TSC.get_or_init(|| {
        let khz = measure_tsc_khz()?;
        let invariant = cpuinfo_has_flags(&["constant_tsc", "nonstop_tsc"]);
        let tsc = HostTsc { khz, invariant };
        tracing::debug!(?tsc, "measured host TSC");
        Some(tsc)
    })
}

fn cpuinfo_has_flags(want: &[&str]) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else {
        return false;
    };
    let flags: Vec<&str> = flags.split_whitespace().collect();
    want.iter().all(|w| flags.contains(w))
}

/// Counts TSC ticks against `CLOCK_MONOTONIC_RAW` over three 20 ms windows and takes the median.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::disallowed_methods)] // Blocking by design: callers use the blocking pool.
fn measure_tsc_khz() -> Option<u64> {
    use std::time::Duration;

    fn raw_ns() -> Option<u128> {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_RAW).ok()?;
        Some(t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
    }
    if !cpuinfo_has_flags(&["tsc"]) {
        return None;
    }
    let mut samples = Vec::with_capacity(3);
    for _ in 0..3 {
        let (c0, t0) = (rdtsc(), raw_ns()?);
        std::thread::sleep(Duration::from_millis(20));
        let (c1, t1) = (rdtsc(), raw_ns()?);
        let ns = t1.checked_sub(t0)?;
        let cycles = c1.checked_sub(c0)?;
        if ns == 0 {
            return None;
        }
        samples.push((cycles as u128 * 1_000_000 / ns) as u64);
    }
    samples.sort_unstable();
    let khz = samples[1];
    // Anything outside 100 MHz..20 GHz is a broken measurement, not a TSC.
    (100_000..20_000_000).contains(&khz).then_some(khz)
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; the `tsc` cpuinfo flag was checked by the caller.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_for_invariant_tsc() {
        let args = tcg_timer_args(HostTsc {
            khz: 2_596_144,
            invariant: true,
        });
        assert_eq!(
            args,
            [
                "tsc_early_khz=2596144",
                "lpj=10384576",
                "tsc=reliable",
                "no_timer_check"
            ]
        );
    }

    #[test]
    fn no_reliable_claim_for_variant_tsc() {
        let args = tcg_timer_args(HostTsc {
            khz: 3_000_000,
            invariant: false,
        });
        assert!(!args.iter().any(|a| a == "tsc=reliable"));
        assert!(args.contains(&"lpj=12000000".to_string()));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn measures_something_plausible() {
        if let Some(tsc) = host_tsc() {
            assert!((100_000..20_000_000).contains(&tsc.khz), "{tsc:?}");
        }
    }
}
