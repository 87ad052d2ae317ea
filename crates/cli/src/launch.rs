//! Turning VM flags into a backend and boot options: image lookup, accelerator probe and the
//! choice between QEMU and Firecracker (`--backend auto|qemu|firecracker`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hutch_core::BootOptions;
use hutch_vmm::{Accel, AccelReport, FirecrackerVmm, QemuVmm, Vmm};

use crate::{args::VmArgs, error::CliError, home::Home};

/// Which virtual machine monitor runs the sandboxes.
///
/// `auto` never picks Firecracker for the daemon yet: the Firecracker backend cannot give a
/// guest a NIC, nor boot a template (guest RAM in a shared file), both of which the daemon does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Firecracker when a binary is found and KVM really runs guests here (and, for now, not
    /// for the daemon), else QEMU.
    #[default]
    Auto,
    /// QEMU microvm (KVM, or TCG where KVM cannot run guests).
    Qemu,
    /// Firecracker (needs a binary and KVM that runs guests), launched without the jailer.
    Firecracker,
}

/// The chosen backend and why.
pub struct Backend {
    /// The backend.
    pub vmm: Arc<dyn Vmm>,
    /// The accelerator probe (QEMU runs under its answer; Firecracker needs it to be KVM).
    pub accel: AccelReport,
    /// Why this backend, in words.
    pub why: String,
}

/// Everything needed to boot sandboxes of one shape.
pub struct Launcher {
    /// The backend.
    pub vmm: Arc<dyn Vmm>,
    /// The probed accelerator and why.
    pub accel: AccelReport,
    /// Boot options; callers set a fresh `id` per sandbox.
    pub options: BootOptions,
}

/// Who the backend is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// `hutch run --local`, benchmarks: boots without NICs or templates.
    Run,
    /// The daemon: sandboxes with NICs, templates, clones.
    Daemon,
}

/// Whether to use Firecracker, from the choice, whether a firecracker binary was found (or why
/// not) and whether KVM runs guests; with the reason.
fn pick(
    choice: BackendChoice,
    firecracker: &Result<PathBuf, String>,
    accel: Accel,
    user: User,
) -> Result<(bool, String), CliError> {
    let kvm_runs = accel == Accel::Kvm;
    Ok(match (choice, firecracker) {
        (BackendChoice::Qemu, _) => (false, "asked for with --backend qemu".into()),
        (BackendChoice::Firecracker, Err(e)) => {
            return Err(CliError::Usage(format!(
                "--backend firecracker: {e}; run `hutch setup firecracker`"
            )))
        }
        (BackendChoice::Firecracker, Ok(p)) if !kvm_runs => {
            return Err(CliError::Usage(format!(
                "--backend firecracker: firecracker is at {}, but KVM does not run guests on \
                 this host (the probe fell back to {accel}); use --backend qemu",
                p.display()
            )))
        }
        (BackendChoice::Firecracker, Ok(p)) => (
            true,
            format!("asked for with --backend firecracker ({})", p.display()),
        ),
        (BackendChoice::Auto, Err(e)) => (false, format!("auto: no firecracker ({e})")),
        (BackendChoice::Auto, Ok(p)) if !kvm_runs => (
            false,
            format!(
                "auto: firecracker found at {}, but KVM does not run guests here (probe: {accel})",
                p.display()
            ),
        ),
        (BackendChoice::Auto, Ok(p)) if user == User::Daemon => (
            false,
            format!(
                "auto: firecracker found at {} and KVM runs guests, but the firecracker backend \
                 has no NICs or templates yet (--backend firecracker forces it)",
                p.display()
            ),
        ),
        (BackendChoice::Auto, Ok(p)) => (
            true,
            format!("auto: firecracker at {} and KVM runs guests", p.display()),
        ),
    })
}

/// Probes the accelerator with `image` (cached) and picks the backend.
async fn choose(
    home: &Home,
    image: &hutch_image::Image,
    choice: BackendChoice,
    user: User,
) -> Result<Backend, CliError> {
    let accel = hutch_vmm::probe_accel(&image.kernel, &image.initrd, &home.accel_cache()).await;
    let firecracker = match choice {
        BackendChoice::Qemu => Err("not looked for".into()),
        _ => hutch_vmm::firecracker::find_firecracker_or_in(&home.bin()).map_err(|e| e.to_string()),
    };
    let (use_firecracker, why) = pick(choice, &firecracker, accel.accel, user)?;
    let vmm: Arc<dyn Vmm> = match (use_firecracker, firecracker) {
        (true, Ok(fc)) => Arc::new(FirecrackerVmm::with_binary(fc)),
        _ => Arc::new(QemuVmm::new(accel.accel)?),
    };
    tracing::info!(backend = vmm.name(), %why, accel = %accel.accel, reason = %accel.reason, "backend chosen");
    Ok(Backend { vmm, accel, why })
}

/// The backend for the daemon, probed with the image `name` (which must exist).
pub async fn backend(home: &Home, name: &str, choice: BackendChoice) -> Result<Backend, CliError> {
    let image = hutch_image::open(&home.images(), name)?;
    choose(home, &image, choice, User::Daemon).await
}

/// Opens the image, picks the backend (cached accelerator probe) and prepares boot options.
pub async fn prepare(home: &Home, vm: &VmArgs) -> Result<Launcher, CliError> {
    let image = hutch_image::open(&home.images(), &vm.image)?;
    let backend = choose(home, &image, vm.backend, User::Run).await?;
    let options = BootOptions {
        id: hutch_core::new_id(),
        image,
        cpus: vm.cpus,
        memory_mib: vm.memory,
        disk_mib: vm.disk,
        runs_dir: home.local_vms(),
        boot_timeout: Duration::from_secs(vm.boot_timeout),
        detached: false,
        network: None,
        memory: hutch_vmm::GuestMemory::Anonymous,
    };
    Ok(Launcher {
        vmm: backend.vmm,
        accel: backend.accel,
        options,
    })
}

/// What `auto` would pick here for `user` and why (for `hutch doctor`), without failing:
/// `(backend, why)`.
pub fn describe_auto(
    firecracker: &Result<PathBuf, String>,
    accel: Accel,
    user: User,
) -> (&'static str, String) {
    match pick(BackendChoice::Auto, firecracker, accel, user) {
        Ok((true, why)) => ("firecracker", why),
        Ok((false, why)) => ("qemu", why),
        Err(e) => ("qemu", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_a_binary_and_kvm_that_runs_guests() {
        let found: Result<PathBuf, String> = Ok("/opt/fc".into());
        let missing: Result<PathBuf, String> = Err("firecracker binary not found".into());
        let run = User::Run;
        let auto = |fc, accel| pick(BackendChoice::Auto, fc, accel, run).unwrap();
        assert!(auto(&found, Accel::Kvm).0);
        let (fc, why) = auto(&found, Accel::Tcg);
        assert!(!fc && why.contains("KVM does not run guests"), "{why}");
        let (fc, why) = auto(&missing, Accel::Kvm);
        assert!(!fc && why.contains("no firecracker"), "{why}");
        // The daemon's sandboxes need NICs and templates: auto keeps it on QEMU for now.
        let (fc, why) = pick(BackendChoice::Auto, &found, Accel::Kvm, User::Daemon).unwrap();
        assert!(!fc && why.contains("no NICs"), "{why}");
        let forced = pick(BackendChoice::Firecracker, &found, Accel::Kvm, User::Daemon);
        assert!(forced.unwrap().0);
        assert!(
            !pick(BackendChoice::Qemu, &found, Accel::Kvm, run)
                .unwrap()
                .0
        );
        assert!(
            pick(BackendChoice::Firecracker, &found, Accel::Kvm, run)
                .unwrap()
                .0
        );
        let e = pick(BackendChoice::Firecracker, &found, Accel::Tcg, run).unwrap_err();
        assert!(e.to_string().contains("use --backend qemu"), "{e}");
        let e = pick(BackendChoice::Firecracker, &missing, Accel::Kvm, run).unwrap_err();
        assert!(e.to_string().contains("hutch setup firecracker"), "{e}");
        assert_eq!(describe_auto(&found, Accel::Tcg, run).0, "qemu");
        assert_eq!(describe_auto(&found, Accel::Kvm, run).0, "firecracker");
        assert_eq!(describe_auto(&found, Accel::Kvm, User::Daemon).0, "qemu");
    }
}
