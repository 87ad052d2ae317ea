//! Choosing the backend: accelerator probe and the choice between QEMU and Firecracker (`--backend auto|qemu|firecracker`, `--jailer`/
//! `--no-jailer`).

use std::path::PathBuf;
use std::sync::Arc;

use hutch_vmm::firecracker::JailerConfig;
use hutch_vmm::{Accel, AccelReport, FirecrackerVmm, QemuVmm, Vmm};

use crate::{error::DaemonError, home::Home};

/// Which virtual machine monitor runs the sandboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Firecracker when a binary is found, KVM really runs guests here, and (unless
    /// `--no-jailer`) the jailer can be used; else QEMU.
    #[default]
    Auto,
    /// QEMU microvm (KVM, or TCG where KVM cannot run guests).
    Qemu,
    /// Firecracker (needs a binary and KVM that runs guests), through the jailer unless
    /// `--no-jailer`.
    Firecracker,
}

/// `--backend` and `--jailer`/`--no-jailer`: which VMM runs the sandboxes, and how.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// The VMM: firecracker when found and KVM runs guests (`auto`), or as named.
    #[arg(long, env = "HUTCH_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Launch Firecracker through its jailer (the default): a chroot under
    /// `$HUTCH_HOME/jail`, an unprivileged uid/gid, a memory cgroup, the sandbox's network
    /// namespace and a PID namespace of its own. Needs root and a `jailer` binary.
    #[arg(long, overrides_with = "no_jailer")]
    pub jailer: bool,
    /// Launch Firecracker directly, without the jailer: for development only (no chroot, no
    /// uid drop, no cgroup limits). `HUTCH_NO_JAILER=1` says the same (then `--jailer` is
    /// refused as a conflict).
    #[arg(long, env = "HUTCH_NO_JAILER", value_parser = clap::builder::FalseyValueParser::new(), overrides_with = "jailer")]
    pub no_jailer: bool,
}

impl BackendArgs {
    /// Whether Firecracker goes through the jailer (the last of `--jailer`/`--no-jailer`
    /// wins; jailed without either).
    pub fn jailed(&self) -> bool {
        self.jailer || !self.no_jailer
    }
}

/// The uid and gid a jailed Firecracker runs as: an id no account has on a stock host. Its
/// jail's files are owned by it.
pub const JAIL_ID: u32 = 10_990;

/// The chosen backend and why.
pub struct Backend {
    /// The backend.
    pub vmm: Arc<dyn Vmm>,
    /// The accelerator probe (QEMU runs under its answer; Firecracker needs it to be KVM).
    pub accel: AccelReport,
    /// Why this backend, in words.
    pub why: String,
}

/// What a Firecracker launch would use, each found or why not.
#[derive(Debug, Clone)]
pub struct Found {
    /// The firecracker binary.
    pub firecracker: Result<PathBuf, String>,
    /// The jailer, and whether it can run here (root); `None` with `--no-jailer`.
    pub jailer: Option<Result<PathBuf, String>>,
}

impl Found {
    /// Looks for firecracker and (when `jailed`) a usable jailer, on `$FIRECRACKER_BIN` /
    /// `$JAILER_BIN`, `PATH`, then `$HUTCH_HOME/bin`.
    pub fn look(home: &Home, jailed: bool) -> Found {
        let bin = home.bin();
        let jailer = jailed.then(|| {
            let path = hutch_vmm::firecracker::find_jailer_or_in(&bin)
                .map_err(|e| format!("{e}, nor in {}", bin.display()))?;
            match rustix::process::geteuid().is_root() {
                true => Ok(path),
                false => Err("the jailer needs root".to_string()),
            }
        });
        Found {
            firecracker: hutch_vmm::firecracker::find_firecracker_or_in(&bin)
                .map_err(|e| e.to_string()),
            jailer,
        }
    }

    /// How firecracker would be launched, in words.
    fn how(&self) -> String {
        match &self.jailer {
            Some(Ok(j)) => format!("jailed by {}", j.display()),
            Some(Err(_)) => "jailed".into(),
            None => "without the jailer (--no-jailer)".into(),
        }
    }
}

/// Whether to use Firecracker, from the choice, what was found and whether KVM runs guests;
/// with the reason.
fn pick(choice: BackendChoice, found: &Found, accel: Accel) -> Result<(bool, String), DaemonError> {
    let kvm_runs = accel == Accel::Kvm;
    let jailer_missing = match &found.jailer {
        Some(Err(e)) => Some(e),
        _ => None,
    };
    Ok(match (choice, &found.firecracker) {
        (BackendChoice::Qemu, _) => (false, "asked for with --backend qemu".into()),
        (BackendChoice::Firecracker, Err(e)) => {
            return Err(DaemonError::Backend(format!(
                "--backend firecracker: {e}; run `hutch setup firecracker`"
            )))
        }
        (BackendChoice::Firecracker, Ok(p)) if !kvm_runs => {
            return Err(DaemonError::Backend(format!(
                "--backend firecracker: firecracker is at {}, but KVM does not run guests on \
                 this host (the probe fell back to {accel}); use --backend qemu",
                p.display()
            )))
        }
        (BackendChoice::Firecracker, Ok(_)) if jailer_missing.is_some() => {
            return Err(DaemonError::Backend(format!(
                "--backend firecracker: {}; install the jailer with `hutch setup firecracker`, \
                 or pass --no-jailer to launch firecracker directly (development only)",
                jailer_missing.expect("checked")
            )))
        }
        (BackendChoice::Firecracker, Ok(p)) => (
            true,
            format!(
                "asked for with --backend firecracker ({}, {})",
                p.display(),
                found.how()
            ),
        ),
        (BackendChoice::Auto, Err(e)) => (false, format!("auto: no firecracker ({e})")),
        (BackendChoice::Auto, Ok(p)) if !kvm_runs => (
            false,
            format!(
                "auto: firecracker found at {}, but KVM does not run guests here (probe: {accel})",
                p.display()
            ),
        ),
        (BackendChoice::Auto, Ok(p)) if jailer_missing.is_some() => (
            false,
            format!(
                "auto: firecracker found at {} and KVM runs guests, but {} (--no-jailer \
                 launches firecracker directly)",
                p.display(),
                jailer_missing.expect("checked")
            ),
        ),
        (BackendChoice::Auto, Ok(p)) => (
            true,
            format!(
                "auto: firecracker at {} ({}) and KVM runs guests",
                p.display(),
                found.how()
            ),
        ),
    })
}

/// The Firecracker backend for `firecracker`: through `jailer` when given, with each VM's jail
/// under `chroot_base` and firecracker running as [`JAIL_ID`]; else direct.
fn firecracker_vmm(
    firecracker: PathBuf,
    jailer: Option<PathBuf>,
    chroot_base: PathBuf,
) -> FirecrackerVmm {
    let vmm = FirecrackerVmm::with_binary(firecracker);
    match jailer {
        Some(j) => {
            let mut cfg = JailerConfig::new(j, JAIL_ID, JAIL_ID);
            cfg.chroot_base = chroot_base;
            vmm.with_jailer(cfg)
        }
        None => vmm,
    }
}

/// Probes the accelerator with `image` (cached) and picks the backend.
pub async fn choose(
    home: &Home,
    image: &hutch_image::Image,
    args: &BackendArgs,
) -> Result<Backend, DaemonError> {
    let accel = hutch_vmm::probe_accel(&image.kernel, &image.initrd, &home.accel_cache()).await;
    let found = match args.backend {
        BackendChoice::Qemu => Found {
            firecracker: Err("not looked for".into()),
            jailer: None,
        },
        _ => Found::look(home, args.jailed()),
    };
    let (use_firecracker, why) = pick(args.backend, &found, accel.accel)?;
    let vmm: Arc<dyn Vmm> = match (use_firecracker, found.firecracker) {
        (true, Ok(fc)) => Arc::new(firecracker_vmm(
            fc,
            found.jailer.and_then(Result::ok),
            home.jails(),
        )),
        _ => Arc::new(QemuVmm::new(accel.accel)?),
    };
    tracing::info!(backend = vmm.name(), %why, accel = %accel.accel, reason = %accel.reason, "backend chosen");
    Ok(Backend { vmm, accel, why })
}

/// The backend for the daemon, probed with the image `name` (which must exist).
pub async fn backend(home: &Home, name: &str, args: &BackendArgs) -> Result<Backend, DaemonError> {
    let image = hutch_image::open(&home.images(), name)?;
    choose(home, &image, args).await
}

/// What `auto` would pick here with what was `found` and why (for `hutch doctor`), without
/// failing: `(backend, why)`.
pub fn describe_auto(found: &Found, accel: Accel) -> (&'static str, String) {
    match pick(BackendChoice::Auto, found, accel) {
        Ok((true, why)) => ("firecracker", why),
        Ok((false, why)) => ("qemu", why),
        Err(e) => ("qemu", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(fc: bool, jailer: Option<bool>) -> Found {
        Found {
            firecracker: match fc {
                true => Ok("/opt/fc".into()),
                false => Err("firecracker binary not found".into()),
            },
            jailer: jailer.map(|ok| match ok {
                true => Ok("/opt/jailer".into()),
                false => Err("the jailer needs root".into()),
            }),
        }
    }

    #[test]
    fn auto_needs_a_binary_kvm_that_runs_guests_and_a_usable_jailer() {
        let jailed = found(true, Some(true));
        let auto = |f: &Found, accel| pick(BackendChoice::Auto, f, accel).unwrap();
        let (fc, why) = auto(&jailed, Accel::Kvm);
        assert!(fc && why.contains("jailed by /opt/jailer"), "{why}");
        let (fc, why) = auto(&found(true, None), Accel::Kvm);
        assert!(fc && why.contains("without the jailer"), "{why}");
        let (fc, why) = auto(&jailed, Accel::Tcg);
        assert!(!fc && why.contains("KVM does not run guests"), "{why}");
        let (fc, why) = auto(&found(false, Some(true)), Accel::Kvm);
        assert!(!fc && why.contains("no firecracker"), "{why}");
        let (fc, why) = auto(&found(true, Some(false)), Accel::Kvm);
        assert!(
            !fc && why.contains("needs root") && why.contains("--no-jailer"),
            "{why}"
        );
        let fc = |f: &Found, accel| pick(BackendChoice::Firecracker, f, accel);
        assert!(fc(&jailed, Accel::Kvm).unwrap().0);
        assert!(fc(&found(true, None), Accel::Kvm).unwrap().0);
        assert!(!pick(BackendChoice::Qemu, &jailed, Accel::Kvm).unwrap().0);
        let e = fc(&jailed, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("use --backend qemu"), "{e}");
        let e = fc(&found(false, Some(true)), Accel::Kvm).unwrap_err();
        assert!(e.to_string().contains("hutch setup firecracker"), "{e}");
        let e = fc(&found(true, Some(false)), Accel::Kvm).unwrap_err();
        assert!(e.to_string().contains("--no-jailer"), "{e}");
        assert_eq!(describe_auto(&jailed, Accel::Tcg).0, "qemu");
        assert_eq!(describe_auto(&jailed, Accel::Kvm).0, "firecracker");
    }

    #[test]
    fn jailer_flags() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            b: BackendArgs,
        }
        let jailed = |args: &[&str]| {
            let mut v = vec!["t"];
            v.extend_from_slice(args);
            T::try_parse_from(v).unwrap().b.jailed()
        };
        assert!(jailed(&[]));
        assert!(jailed(&["--jailer"]));
        assert!(!jailed(&["--no-jailer"]));
        assert!(jailed(&["--no-jailer", "--jailer"]));
        assert!(!jailed(&["--jailer", "--no-jailer"]));
        // The environment's answer (for test suites), overridden by a flag. No other test
        // reads this variable.
        std::env::set_var("HUTCH_NO_JAILER", "1");
        let env_on = jailed(&[]);
        // clap's `overrides_with` does not reach a value from the environment.
        let both = T::try_parse_from(["t", "--jailer"]).is_err();
        std::env::set_var("HUTCH_NO_JAILER", "0");
        let env_off = jailed(&[]);
        std::env::remove_var("HUTCH_NO_JAILER");
        assert!(!env_on && both && env_off);
    }

    fn skip(test: &str, why: &str) {
        if std::env::var("HUTCH_REQUIRE_FIRECRACKER").as_deref() == Ok("1") {
            panic!("{test}: {why} (HUTCH_REQUIRE_FIRECRACKER=1, so this is a failure)");
        }
        eprintln!("SKIP {test}: {why}");
    }

    /// The libraries `ldd` lists for `binary` (none for a static one).
    #[allow(clippy::disallowed_methods)] // A test helper; one short `ldd`.
    fn ldd(binary: &std::path::Path) -> Vec<PathBuf> {
        let out = std::process::Command::new("ldd")
            .arg(binary)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(PathBuf::from)
            .collect()
    }

    /// The backend the CLI builds for `--backend firecracker` (jailed by default) starts a
    /// firecracker whose API answers, with a dynamically linked binary's libraries copied into
    /// the chroot, and destroy leaves no process, jail or run dir. The guest need not boot.
    #[tokio::test]
    async fn jailed_backend_from_the_cli_reaches_api_ready_and_cleans_its_chroot() {
        let test = "jailed_backend_from_the_cli_reaches_api_ready_and_cleans_its_chroot";
        let (fc, jailer) = match (
            hutch_vmm::firecracker::find_firecracker(),
            hutch_vmm::firecracker::find_jailer(),
        ) {
            (Ok(f), Ok(j)) => (f, j),
            _ => {
                return skip(
                    test,
                    "no firecracker and jailer (set FIRECRACKER_BIN, JAILER_BIN)",
                )
            }
        };
        if !rustix::process::geteuid().is_root() {
            return skip(test, "the jailer needs root");
        }
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return skip(test, &format!("/dev/kvm not usable: {e}"));
        }
        let home = std::env::var_os("HUTCH_HOME")
            .map_or_else(|| PathBuf::from("/var/lib/hutch"), PathBuf::from);
        let image = match hutch_image::open(&home.join("images"), "default") {
            Ok(i) if i.vmlinux.is_some() => i,
            Ok(_) => return skip(test, "the default image has no vmlinux"),
            Err(e) => return skip(test, &format!("no default image: {e}")),
        };
        let d = tempfile::tempdir().unwrap();
        let vmm = firecracker_vmm(fc.clone(), Some(jailer), d.path().join("jail"));
        let spec = hutch_vmm::VmSpec {
            shares: Vec::new(),
            id: "cli-jail".into(),
            kernel: image.vmlinux.clone().unwrap(),
            initrd: image.initrd.clone(),
            rootfs: image.rootfs.clone(),
            cpus: 1,
            memory_mib: 128,
            scratch_disk_mib: 16,
            run_dir: d.path().join("vm"),
            extra_cmdline: vec![],
            lifetime: hutch_vmm::Lifetime::Detached,
            memory: Default::default(),
        };
        let vm = match vmm.start_with(&spec, &Default::default()).await {
            Ok(vm) => vm,
            Err(e) => panic!("jailed start: {}", hutch_core::chain(&e)),
        };
        let jail = vm.jail_dir().expect("jailed").to_path_buf();
        assert!(
            jail.starts_with(d.path().join("jail")),
            "{}",
            jail.display()
        );
        let root = jail.join("root");
        let libs = ldd(&fc);
        for lib in &libs {
            let copied = root.join(lib.strip_prefix("/").unwrap());
            assert!(copied.is_file(), "{} not in the jail", lib.display());
        }
        eprintln!(
            "{test}: {} shared libraries copied into the jail",
            libs.len()
        );
        let info = vm.client().describe_instance().await.unwrap();
        assert_eq!(info.id, "cli-jail");
        let uid = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(format!("/proc/{}", hutch_vmm::Vm::pid(&vm))).unwrap(),
        );
        assert_eq!(uid, JAIL_ID, "firecracker runs as the jail's uid");
        let pid = hutch_vmm::Vm::pid(&vm);
        hutch_vmm::Vm::destroy(Box::new(vm)).await.unwrap();
        // Gone, or exited and waiting for whoever inherited it from the jailer to reap it.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state.rsplit_once(") ").map_or("", |(_, rest)| rest);
        assert!(
            state.is_empty() || state.starts_with('Z'),
            "pid {pid} remains: {state:.20}"
        );
        assert!(!jail.exists(), "jail remains");
        assert!(!spec.run_dir.exists(), "run dir remains");
    }
}
