//! Real VMs: the behaviour suite, run once per backend (`qemu::<case>`, `firecracker::<case>`).
//!
//! Each backend's shared VM serves the in-process cases (booted once: TCG boots take seconds);
//! cases that need their own VMs (isolation, the `hutch` binary end to end, with `--backend`
//! set through `HUTCH_BACKEND`, Firecracker without the jailer through `HUTCH_NO_JAILER`) boot
//! them. After every case has run, the suite checks that no
//! VM process, run dir or socket of Hutch is left.
//!
//! Needs the `default` image in `$HUTCH_HOME` (`scripts/test.sh` builds it). Set
//! `HUTCH_SKIP_VM_TESTS=1` to skip with a printed reason instead. `HUTCH_TEST_BACKEND=qemu` or
//! `=firecracker` runs one backend only. The Firecracker run needs a binary (`FIRECRACKER_BIN`,
//! `PATH` or `$HUTCH_HOME/bin`) and KVM that really runs guests (not nested PVM, where a stock
//! kernel cannot boot): without them it prints a `SKIP vm suite [firecracker]: <why>` line, or
//! fails with `HUTCH_REQUIRE_FIRECRACKER=1`.

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

use std::{
    cell::Cell,
    io::Read,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use hutch_core::{BootOptions, Sandbox};
use hutch_protocol::{
    host::{Channel, ExecEvent},
    ExecRequest, ExitInfo, ExitStatus, ReadFileRequest, WriteFileRequest,
};
use hutch_vmm::{Accel, FirecrackerVmm, QemuVmm, Vmm};
use libtest_mimic::{Arguments, Failed, Trial};
use sha2::{Digest, Sha256};

mod common;
use common::{check, hutch_home, leaks};

type Result = std::result::Result<(), Failed>;

/// State shared by every case of one backend: a runtime whose worker threads outlive each case
/// (a VM dies with the thread that spawned it), the backend, and the shared VM.
struct Suite {
    /// `qemu` or `firecracker`: the `--backend` the CLI cases pass.
    backend: &'static str,
    rt: tokio::runtime::Runtime,
    vmm: Arc<dyn Vmm>,
    options: BootOptions,
    shared: Mutex<Option<Sandbox>>,
    channel: Arc<Channel>,
    kernel_release: String,
    home: PathBuf,
    /// Environment for `hutch` runs (the backend, and where its binary is).
    env: Env,
}

static SUITES: OnceLock<Vec<Suite>> = OnceLock::new();

/// Environment variables for `hutch` runs.
type Env = Vec<(&'static str, String)>;

thread_local! {
    /// The suite whose case runs on this (test) thread.
    static CURRENT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn suite() -> &'static Suite {
    let i = CURRENT.with(Cell::get);
    &SUITES.get().expect("suites initialised in main")[i]
}

/// Prints why the Firecracker run is skipped, or fails the suite under
/// `HUTCH_REQUIRE_FIRECRACKER=1`.
fn skip_firecracker(why: &str) {
    if std::env::var("HUTCH_REQUIRE_FIRECRACKER").as_deref() == Ok("1") {
        eprintln!(
            "vm suite [firecracker]: {why} (HUTCH_REQUIRE_FIRECRACKER=1, so this is a failure)"
        );
        std::process::exit(1);
    }
    eprintln!("SKIP vm suite [firecracker]: {why}");
}

fn main() {
    let args = Arguments::from_args();
    let Some(image) = common::default_image_or_skip("vm") else {
        return;
    };
    let home = hutch_home();
    let only = std::env::var("HUTCH_TEST_BACKEND").ok();
    if let Some(b) = only
        .as_deref()
        .filter(|b| !matches!(*b, "qemu" | "firecracker"))
    {
        eprintln!("HUTCH_TEST_BACKEND={b:?}: want qemu or firecracker");
        std::process::exit(1);
    }
    let backends = backends(&image, &home, only.as_deref());
    if args.list {
        // Listing (nextest asks for it before running each case in a process of its own)
        // boots nothing.
        let names: Vec<_> = backends.iter().map(|(b, ..)| *b).collect();
        libtest_mimic::run(&args, trials(&names)).exit();
    }
    let mut suites = Vec::new();
    for (backend, vmm, env) in backends {
        let rt = common::suite_runtime();
        let options = BootOptions {
            id: String::new(),
            image: image.clone(),
            cpus: 2,
            memory_mib: 512,
            disk_mib: 1024,
            runs_dir: home.join("local"),
            boot_timeout: Duration::from_secs(120),
            detached: false,
            network: None,
            memory: hutch_vmm::GuestMemory::Anonymous,
            shares: Vec::new(),
        };
        let shared = rt.block_on({
            let (vmm, options) = (vmm.clone(), options.clone());
            async move {
                tokio::spawn(async move { boot(&*vmm, &options).await })
                    .await
                    .unwrap()
            }
        });
        eprintln!("vm suite [{backend}]: shared VM {} is up", shared.id());
        suites.push(Suite {
            backend,
            rt,
            vmm,
            channel: shared.channel().clone(),
            kernel_release: options.image.kernel_release.clone(),
            options,
            shared: Mutex::new(Some(shared)),
            home: home.clone(),
            env,
        });
    }
    let _ = SUITES.set(suites);

    let names: Vec<_> = SUITES.get().unwrap().iter().map(|s| s.backend).collect();
    let conclusion = libtest_mimic::run(&args, trials(&names));

    let mut shared_ids = Vec::new();
    for suite in SUITES.get().unwrap() {
        let shared = suite.shared.lock().unwrap().take().expect("shared VM");
        shared_ids.push(format!("{}: {}", suite.backend, shared.id()));
        suite
            .rt
            .block_on(async { shared.destroy().await.expect("destroy the shared VM") });
    }
    let leaks = leaks(&home);
    if !leaks.is_empty() {
        eprintln!(
            "LEAK after the vm suite (shared VMs were {}):\n{}",
            shared_ids.join(", "),
            leaks.join("\n")
        );
        std::process::exit(1);
    }
    eprintln!("vm suite: nothing left behind (no VMM process, run dir or socket)");
    conclusion.exit();
}

/// The backends this host can run, each with its VMM and the environment `hutch` needs to pick
/// it; the ones it cannot run print a SKIP line (or fail, when required).
fn backends(
    image: &hutch_image::Image,
    home: &std::path::Path,
    only: Option<&str>,
) -> Vec<(&'static str, Arc<dyn Vmm>, Env)> {
    let wanted = |b: &str| only.is_none_or(|o| o == b);
    let accel = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (k, i, cache) = (
            image.kernel.clone(),
            image.initrd.clone(),
            home.join("accel.json"),
        );
        rt.block_on(async move { hutch_vmm::probe_accel(&k, &i, &cache).await })
    };
    eprintln!("vm suite: accelerator {} ({})", accel.accel, accel.reason);
    let mut backends: Vec<(&'static str, Arc<dyn Vmm>, Env)> = Vec::new();
    if wanted("qemu") {
        let vmm: Arc<dyn Vmm> = Arc::new(QemuVmm::new(accel.accel).expect("qemu"));
        backends.push(("qemu", vmm, vec![("HUTCH_BACKEND", "qemu".into())]));
    }
    if wanted("firecracker") {
        match hutch_vmm::firecracker::find_firecracker_or_in(&home.join("bin")) {
            Err(e) => skip_firecracker(&format!("{e}, nor in {}", home.join("bin").display())),
            Ok(_) if accel.accel != Accel::Kvm => skip_firecracker(&format!(
                "KVM does not run guests on this host (nested PVM?): the probe fell back to {}: {}",
                accel.accel, accel.reason
            )),
            Ok(fc) => {
                eprintln!("vm suite: firecracker {}", fc.display());
                // Direct launches, as the in-process VMM's: the jailed path is tested by
                // `launch`'s unit test and hutch-core's network tests.
                let env = vec![
                    ("HUTCH_BACKEND", "firecracker".into()),
                    ("HUTCH_NO_JAILER", "1".into()),
                    ("FIRECRACKER_BIN", fc.display().to_string()),
                ];
                backends.push((
                    "firecracker",
                    Arc::new(FirecrackerVmm::with_binary(fc)),
                    env,
                ));
            }
        }
    }
    backends
}

async fn boot(vmm: &dyn Vmm, template: &BootOptions) -> Sandbox {
    let mut options = template.clone();
    options.id = hutch_core::new_id();
    Sandbox::boot(vmm, &options).await.expect("boot a VM")
}

/// `(name, case)` for each case.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        [$((stringify!($case), $case as fn() -> Result)),*]
    };
}

/// Every case once per backend, as `<backend>::<case>`; case `i` runs on `SUITES[i]`.
fn trials(backends: &[&'static str]) -> Vec<Trial> {
    let cases = cases![
        guest_reports_its_own_kernel,
        exit_codes_and_signals_propagate,
        stdin_round_trip,
        four_concurrent_execs,
        timeout_kills_the_command,
        guest_clock_matches_host,
        identity_and_writable_overlay,
        orphans_are_reaped,
        files_round_trip,
        two_vms_do_not_share_files,
        cli_run_passes_stdio_and_exit_codes,
        cli_64mib_stdout_intact_with_bounded_memory,
        cli_bad_input_gives_one_line_errors,
        cli_ctrl_c_removes_everything,
        shares_read_only_writable_and_no_escape,
        cli_run_with_a_share,
    ];
    let mut out = Vec::new();
    for (i, backend) in backends.iter().enumerate() {
        for (name, case) in cases {
            out.push(Trial::test(format!("{backend}::{name}"), move || {
                CURRENT.with(|c| c.set(i));
                case()
            }));
        }
    }
    out
}

// ---------------------------------------------------------------- helpers

/// [`common::on_rt`] on this suite's runtime.
fn on_rt<F, T>(f: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    common::on_rt(&suite().rt, f)
}

/// Runs `req` and collects stdout, stderr and the exit.
async fn output(
    ch: &Channel,
    req: ExecRequest,
) -> std::result::Result<(Vec<u8>, Vec<u8>, ExitInfo), Failed> {
    let mut exec = ch.exec(req).await.map_err(|e| format!("exec: {e}"))?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match exec
            .next_event()
            .await
            .map_err(|e| format!("exec event: {e}"))?
        {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(d) => err.extend(d),
            ExecEvent::Exited(info) => return Ok((out, err, info)),
        }
    }
}

async fn stdout_of(ch: &Channel, script: &str) -> std::result::Result<String, Failed> {
    let (out, err, info) = output(ch, ExecRequest::shell(script)).await?;
    if info.status != ExitStatus::Code(0) {
        return Err(format!(
            "{script:?} ended {info:?}; stderr: {}",
            String::from_utf8_lossy(&err)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

fn hutch() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hutch"));
    cmd.env("HUTCH_HOME", &suite().home).env_remove("HUTCH_LOG");
    cmd.envs(suite().env.iter().map(|(k, v)| (k, v)));
    cmd
}

// ---------------------------------------------------------------- cases on the shared VM

fn guest_reports_its_own_kernel() -> Result {
    let ch = suite().channel.clone();
    let release = on_rt(async move { stdout_of(&ch, "uname -r").await })?;
    check(
        release == suite().kernel_release,
        format!(
            "guest kernel {release:?}, image has {:?}",
            suite().kernel_release
        ),
    )?;
    check(
        suite().channel.welcome().kernel_release == release,
        "handshake reports another kernel",
    )
}

fn exit_codes_and_signals_propagate() -> Result {
    let ch = suite().channel.clone();
    on_rt(async move {
        let (_, _, info) = output(&ch, ExecRequest::shell("exit 42")).await?;
        check(
            info.status == ExitStatus::Code(42),
            format!("exit 42 gave {info:?}"),
        )?;
        let (_, _, info) = output(&ch, ExecRequest::shell("kill -KILL $$")).await?;
        check(
            info.status == ExitStatus::Signal(9),
            format!("SIGKILL gave {info:?}"),
        )?;
        check(info.status.shell_code() == 137, "128+9")?;
        let (_, _, info) = output(&ch, ExecRequest::shell("kill -SEGV $$")).await?;
        check(
            info.status == ExitStatus::Signal(11),
            format!("SIGSEGV gave {info:?}"),
        )?;
        // A crashing child never takes the agent down.
        ch.ping(7)
            .await
            .map_err(|e| format!("agent gone after a crash: {e}"))?;
        Ok(())
    })
}

fn stdin_round_trip() -> Result {
    let ch = suite().channel.clone();
    on_rt(async move {
        let mut req = ExecRequest::shell("sha256sum | cut -d' ' -f1");
        req.stdin = true;
        let data: Vec<u8> = (0..5_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let expected = hex::encode(Sha256::digest(&data));
        let mut exec = ch.exec(req).await.map_err(|e| e.to_string())?;
        let ctl = exec.control();
        let feeder = tokio::spawn(async move {
            ctl.write_stdin(&data).await?;
            ctl.close_stdin().await
        });
        let mut out = Vec::new();
        loop {
            match exec.next_event().await.map_err(|e| e.to_string())? {
                ExecEvent::Stdout(d) => out.extend(d),
                ExecEvent::Stderr(_) => {}
                ExecEvent::Exited(info) => {
                    check(info.status == ExitStatus::Code(0), format!("{info:?}"))?;
                    break;
                }
            }
        }
        feeder.await.unwrap().map_err(|e| e.to_string())?;
        let got = String::from_utf8_lossy(&out).trim().to_string();
        check(
            got == expected,
            format!("guest saw digest {got}, host sent {expected}"),
        )
    })
}

fn four_concurrent_execs() -> Result {
    let ch = suite().channel.clone();
    on_rt(async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..4 {
            let ch = ch.clone();
            set.spawn(async move {
                let script = format!(
                    "sleep 1; for n in $(seq 1 500); do echo exec{i}-$n; done; echo err{i} >&2"
                );
                (i, output(&ch, ExecRequest::shell(&script)).await)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (i, res) = joined.unwrap();
            let (out, err, info) = res?;
            check(
                info.status == ExitStatus::Code(0),
                format!("exec {i}: {info:?}"),
            )?;
            let text = String::from_utf8_lossy(&out);
            let ok = text.lines().count() == 500
                && text.lines().all(|l| l.starts_with(&format!("exec{i}-")));
            check(ok, format!("exec {i} got mixed or short output"))?;
            check(
                err == format!("err{i}\n").as_bytes(),
                format!("exec {i} stderr mixed"),
            )?;
        }
        Ok(())
    })
}

fn timeout_kills_the_command() -> Result {
    let ch = suite().channel.clone();
    on_rt(async move {
        let mut req = ExecRequest::shell("sleep 60");
        req.timeout_ms = Some(500);
        let (_, _, info) = output(&ch, req).await?;
        check(
            info.timed_out && info.status == ExitStatus::Signal(9),
            format!("{info:?}"),
        )
    })
}

fn guest_clock_matches_host() -> Result {
    let ch = suite().channel.clone();
    on_rt(async move {
        let guest: f64 = stdout_of(&ch, "date +%s.%N")
            .await?
            .parse()
            .map_err(|e| format!("date: {e}"))?;
        let host = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        check(
            (host - guest).abs() < 2.0,
            format!("guest clock {guest} vs host {host}"),
        )
    })
}

fn identity_and_writable_overlay() -> Result {
    let ch = suite().channel.clone();
    let id = suite()
        .shared
        .lock()
        .unwrap()
        .as_ref()
        .map(|s| s.id().to_string())
        .unwrap();
    on_rt(async move {
        check(
            stdout_of(&ch, "hostname").await? == id,
            "hostname is not the sandbox id",
        )?;
        let root = stdout_of(&ch, "awk '$2==\"/\"{print $3}' /proc/mounts").await?;
        check(root == "overlay", format!("root filesystem is {root}"))?;
        stdout_of(&ch, "echo changed > /etc/hutch-test && cat /etc/hutch-test").await?;
        let lo = stdout_of(
            &ch,
            "cat /sys/class/net/lo/operstate /sys/class/net/lo/flags",
        )
        .await?;
        check(
            lo.lines().nth(1).is_some_and(|f| {
                u32::from_str_radix(f.trim_start_matches("0x"), 16).unwrap_or(0) & 1 == 1
            }),
            format!("lo not up: {lo}"),
        )
    })
}

fn orphans_are_reaped() -> Result {
    let ch = suite().channel.clone();
    on_rt(async move {
        // Grandchildren whose parent exits first are re-parented to the agent (PID 1).
        stdout_of(&ch, "for i in 1 2 3 4 5; do (sleep 0.2 &); done; true").await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let zombies = stdout_of(
            &ch,
            "cat /proc/[0-9]*/stat 2>/dev/null | awk '$3==\"Z\"' | wc -l",
        )
        .await?;
        check(
            zombies == "0",
            format!("{zombies} zombie processes in the guest"),
        )
    })
}

fn files_round_trip() -> Result {
    let ch = suite().channel.clone();
    on_rt(async move {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let path = "/root/deep/dir/blob.bin".to_string();
        let req = WriteFileRequest {
            path: path.clone(),
            mode: 0o600,
            make_parents: true,
        };
        ch.write_file(req, &data[..])
            .await
            .map_err(|e| e.to_string())?;
        let sum = stdout_of(
            &ch,
            &format!("sha256sum {path} | cut -d' ' -f1; stat -c %a {path}"),
        )
        .await?;
        check(
            sum == format!("{}\n600", hex::encode(Sha256::digest(&data))),
            format!("guest sees {sum}"),
        )?;
        let mut back = Vec::new();
        ch.read_file(
            ReadFileRequest {
                path,
                max_bytes: 1 << 20,
            },
            &mut back,
        )
        .await
        .map_err(|e| e.to_string())?;
        check(back == data, "read back differs")
    })
}

// ---------------------------------------------------------------- cases with their own VMs

fn two_vms_do_not_share_files() -> Result {
    let s = suite();
    on_rt(async move {
        let (a, b) = tokio::join!(boot(&*s.vmm, &s.options), boot(&*s.vmm, &s.options));
        let result = async {
            stdout_of(a.channel(), "echo from-a > /root/mark; echo a > /tmp/mark").await?;
            stdout_of(b.channel(), "echo from-b > /root/mark").await?;
            let in_a = stdout_of(a.channel(), "cat /root/mark").await?;
            let in_b = stdout_of(
                b.channel(),
                "cat /root/mark; test ! -e /tmp/mark && echo no-tmp",
            )
            .await?;
            check(in_a == "from-a", format!("A sees {in_a:?}"))?;
            check(in_b == "from-b\nno-tmp", format!("B sees {in_b:?}"))
        }
        .await;
        let (da, db) = tokio::join!(a.destroy(), b.destroy());
        da.map_err(|e| e.to_string())?;
        db.map_err(|e| e.to_string())?;
        result
    })
}

fn cli_run_passes_stdio_and_exit_codes() -> Result {
    let mut child = hutch()
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "read line; echo \"out:$line:$(uname -r)\"; echo err >&2; exit 7",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"ping\n")?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    check(
        stdout == format!("out:ping:{}\n", suite().kernel_release),
        format!("stdout {stdout:?}"),
    )?;
    check(
        out.stderr == b"err\n",
        format!("stderr {:?}", String::from_utf8_lossy(&out.stderr)),
    )?;
    check(
        out.status.code() == Some(7),
        format!("status {:?}", out.status),
    )?;
    let killed = hutch()
        .args(["run", "--", "sh", "-c", "kill -TERM $$"])
        .output()?;
    check(
        killed.status.code() == Some(143),
        format!("signal status {:?}", killed.status),
    )
}

fn cli_64mib_stdout_intact_with_bounded_memory() -> Result {
    let script = "dd if=/dev/urandom of=/tmp/blob bs=1M count=64 status=none && sha256sum /tmp/blob | cut -d' ' -f1 >&2 && cat /tmp/blob";
    let mut child = hutch()
        .args(["run", "--memory", "512", "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    // hutch's own peak RSS (VmHWM), sampled every MiB while it relays (rusage from wait4
    // would include QEMU's, which holds the guest's RAM).
    let mut peak_kib = 0;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        if total % (1 << 20) < n as u64 {
            peak_kib = peak_kib.max(vm_hwm_kib(child.id()).unwrap_or(0));
        }
    }
    peak_kib = peak_kib.max(vm_hwm_kib(child.id()).unwrap_or(0));
    let status = child.wait()?;
    let guest_digest = err_reader.join().unwrap().trim().to_string();
    check(status.success(), format!("hutch run ended with {status:?}"))?;
    check(total == 64 << 20, format!("received {total} bytes"))?;
    check(
        hex::encode(hasher.finalize()) == guest_digest,
        "digest mismatch",
    )?;
    // The host side streams: it must not hold anything near the 64 MiB it relayed.
    check(peak_kib > 0, "could not sample hutch's memory")?;
    check(
        peak_kib < 48 * 1024,
        format!("hutch run peaked at {peak_kib} KiB RSS"),
    )
}

/// Peak resident set size of `pid` so far, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn cli_bad_input_gives_one_line_errors() -> Result {
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &["run", "--image", "no-such-image", "--", "true"],
            1,
            "hutch image build --name no-such-image",
        ),
        (&["run", "--cpus", "0", "--", "true"], 2, "--cpus"),
        (
            &["run", "--", "no-such-command-xyz"],
            127,
            "command not found: no-such-command-xyz",
        ),
        (
            &["run", "--env", "1BAD=x", "--", "true"],
            2,
            "not a valid variable name",
        ),
    ];
    for (args, code, needle) in cases {
        let out = hutch().args(args).stdin(Stdio::null()).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        check(
            out.status.code() == Some(code),
            format!("{args:?}: status {:?}, stderr {stderr}", out.status),
        )?;
        check(
            stderr.contains(needle),
            format!("{args:?}: stderr lacks {needle:?}: {stderr}"),
        )?;
        check(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            format!("{args:?}: {stderr}"),
        )?;
        if code != 2 {
            let lines = stderr.lines().filter(|l| l.starts_with("hutch:")).count();
            check(
                lines == 1,
                format!("{args:?}: want one error line, got: {stderr}"),
            )?;
        }
    }
    Ok(())
}

fn cli_ctrl_c_removes_everything() -> Result {
    // A private HUTCH_HOME (sharing the images) so only this run's objects are in view.
    let home = tempfile::tempdir()?;
    std::os::unix::fs::symlink(suite().home.join("images"), home.path().join("images"))?;
    let _ = std::fs::copy(
        suite().home.join("accel.json"),
        home.path().join("accel.json"),
    );
    let mut child = hutch()
        .env("HUTCH_HOME", home.path())
        .args(["run", "--", "sh", "-c", "echo started; sleep 600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = [0u8; 8];
    child.stdout.take().unwrap().read_exact(&mut first)?;
    check(&first == b"started\n", "command did not start")?;
    check(
        !leaks(home.path()).is_empty(),
        "no VM visible while the command runs",
    )?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    check(
        status.code() == Some(130),
        format!("status after SIGINT: {status:?}"),
    )?;
    let left = leaks(home.path());
    check(left.is_empty(), format!("left after SIGINT: {left:?}"))
}

// ---------------------------------------------------------------- shared folders

/// Host files of a shares case: a read-only share holding `a.txt`, an empty writable one.
struct ShareDirs {
    _tmp: tempfile::TempDir,
    ro: PathBuf,
    rw: PathBuf,
}

fn share_dirs() -> std::result::Result<ShareDirs, Failed> {
    let tmp = tempfile::tempdir()?;
    let (ro, rw) = (tmp.path().join("ro"), tmp.path().join("rw"));
    std::fs::create_dir(&ro)?;
    std::fs::create_dir(&rw)?;
    std::fs::write(ro.join("a.txt"), "from the host\n")?;
    Ok(ShareDirs { _tmp: tmp, ro, rw })
}

fn boot_share(
    tag: &str,
    dir: &std::path::Path,
    writable: bool,
    guest: &str,
) -> hutch_core::BootShare {
    hutch_core::BootShare {
        share: hutch_vmm::VmShare {
            tag: tag.into(),
            host_dir: dir.into(),
            writable,
        },
        guest_dir: guest.into(),
    }
}

/// The guest runs `script`; its exit code and stderr.
async fn attempt(ch: &Channel, script: &str) -> std::result::Result<(i32, String), Failed> {
    let (_, err, info) = output(ch, ExecRequest::shell(script)).await?;
    Ok((
        info.status.shell_code(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

/// A read-only share cannot be written even after the guest remounts it read-write; a
/// writable one takes writes; a guest-made symlink to `/etc` leads the guest to its own `/etc`,
/// never the host's; device nodes, FIFOs and set-id modes are refused on the host; each
/// share's virtiofsd dies with the VM. Firecracker refuses shares, naming task workspaces.
fn shares_read_only_writable_and_no_escape() -> Result {
    let s = suite();
    let dirs = share_dirs()?;
    let mut options = s.options.clone();
    options.id = hutch_core::new_id();
    options.shares = vec![
        boot_share("hutch-share-0", &dirs.ro, false, "/mnt/ro"),
        boot_share("hutch-share-1", &dirs.rw, true, "/mnt/rw"),
    ];
    if s.backend == "firecracker" {
        let err = on_rt(async move {
            match Sandbox::boot(&*s.vmm, &options).await {
                Ok(sb) => {
                    let _ = sb.destroy().await;
                    Err("firecracker booted a VM with shares".to_string())
                }
                Err(e) => Ok(hutch_core::chain(&e)),
            }
        })?;
        return check(
            err.contains("virtio-fs") && err.contains("task workspace"),
            format!("error {err:?}"),
        );
    }
    let etc_before = std::fs::read("/etc/passwd")?;
    let (ro, rw) = (dirs.ro.clone(), dirs.rw.clone());
    let result = on_rt(async move {
        let sb = Sandbox::boot(&*s.vmm, &options)
            .await
            .map_err(|e| hutch_core::chain(&e))?;
        let helpers = sb.vm().helpers();
        let ch = sb.channel().clone();
        let run = async {
            check(helpers.len() == 2, format!("helpers {helpers:?}"))?;
            let read = stdout_of(&ch, "cat /mnt/ro/a.txt").await?;
            check(read == "from the host", format!("read {read:?}"))?;
            // The guest may remount its side read-write: the host's mount still refuses.
            let (code, err) = attempt(
                &ch,
                "mount -o remount,rw /mnt/ro && echo x > /mnt/ro/new || exit 9",
            )
            .await?;
            check(
                code == 9 && err.contains("Read-only file system"),
                format!("write to the ro share: {code} {err}"),
            )?;
            let (code, _) = attempt(&ch, "echo y > /mnt/ro/a.txt || rm /mnt/ro/a.txt").await?;
            check(code != 0, "the ro share's file was changed or removed")?;
            stdout_of(&ch, "echo data > /mnt/rw/f && mkdir /mnt/rw/d && echo in > /mnt/rw/d/g").await?;
            // A symlink the guest makes is resolved by the guest, into its own tree.
            let (code, err) = attempt(
                &ch,
                "ln -s /etc /mnt/rw/etc && ln -s /etc/passwd /mnt/rw/pw && \
                 echo escaped > /mnt/rw/etc/hutch-share-escape && echo escaped >> /mnt/rw/pw && \
                 test -e /etc/hutch-share-escape",
            )
            .await?;
            check(code == 0, format!("symlink writes in the guest: {code} {err}"))?;
            for (script, what) in [
                ("mkfifo /mnt/rw/fifo", "a FIFO"),
                ("mknod /mnt/rw/null c 1 3", "a character device"),
                ("mknod /mnt/rw/disk b 8 0", "a block device"),
                ("touch /mnt/rw/suid && chmod u+s /mnt/rw/suid", "a setuid file"),
                ("chmod g+s /mnt/rw/f", "a setgid file"),
                ("chmod 2755 /mnt/rw/d", "a setgid directory"),
                ("python3 -c 'import os; os.open(\"/mnt/rw/s2\", os.O_CREAT|os.O_WRONLY, 0o4755)'", "a file created setuid"),
            ] {
                let (code, err) = attempt(&ch, script).await?;
                check(code != 0, format!("the guest made {what} on the host: {err}"))?;
            }
            // Nothing saves virtiofsd's state: a snapshot (template, fork, suspend) is refused.
            sb.vm().pause().await.map_err(|e| e.to_string())?;
            let snap_dir = tempfile::tempdir()?;
            let refused = sb.vm().snapshot(&snap_dir.path().join("s")).await;
            let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
            check(why.contains("shared folders"), format!("snapshot: {why:?}"))?;
            sb.vm().resume().await.map_err(|e| e.to_string())?;
            Ok::<_, Failed>(())
        }
        .await;
        let destroyed = sb.destroy().await.map_err(|e| hutch_core::chain(&e));
        run?;
        destroyed?;
        for (pid, start) in helpers {
            check(
                !hutch_vmm::kill_recorded(pid, start).map_err(|e| e.to_string())?,
                format!("virtiofsd {pid} outlived its VM"),
            )?;
        }
        Ok::<_, Failed>(())
    });
    result?;
    // The host's side of it all.
    check(
        std::fs::read("/etc/passwd")? == etc_before,
        "the host's /etc/passwd changed",
    )?;
    check(
        !std::path::Path::new("/etc/hutch-share-escape").exists(),
        "a file appeared in the host's /etc",
    )?;
    check(
        std::fs::read_to_string(ro.join("a.txt"))? == "from the host\n",
        "ro file changed",
    )?;
    let ro_entries = std::fs::read_dir(&ro)?.count();
    check(
        ro_entries == 1,
        format!("{ro_entries} entries in the ro share"),
    )?;
    check(
        std::fs::read_to_string(rw.join("f"))? == "data\n",
        "rw file missing",
    )?;
    check(
        std::fs::read_to_string(rw.join("d/g"))? == "in\n",
        "rw subdir file missing",
    )?;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let link = std::fs::read_link(rw.join("etc"))?;
    check(
        link == std::path::Path::new("/etc"),
        format!("link {link:?}"),
    )?;
    check(
        !rw.join("pw").exists()
            || std::fs::symlink_metadata(rw.join("pw"))?
                .file_type()
                .is_symlink(),
        "pw became a file",
    )?;
    for name in ["fifo", "null", "disk", "s2"] {
        let m = std::fs::symlink_metadata(rw.join(name));
        check(
            m.as_ref().map_or(true, |m| {
                !(m.file_type().is_fifo()
                    || m.file_type().is_char_device()
                    || m.file_type().is_block_device())
            }),
            format!("{name} is a special file on the host"),
        )?;
        check(
            m.as_ref()
                .map_or(true, |m| m.permissions().mode() & 0o6000 == 0),
            format!("{name} has a set-id bit on the host"),
        )?;
    }
    for name in ["suid", "f", "d"] {
        let mode = std::fs::symlink_metadata(rw.join(name))?
            .permissions()
            .mode();
        check(
            mode & 0o6000 == 0,
            format!("{name} has mode {mode:o} on the host"),
        )?;
    }
    Ok(())
}

/// `hutch run --share` through the manager: a writable share's file reaches the host, a bad
/// share is a one-line error, and on Firecracker `--share` names the alternative.
fn cli_run_with_a_share() -> Result {
    let dirs = share_dirs()?;
    let share = format!("{}:/work:rw", dirs.rw.display());
    let out = hutch()
        .args([
            "run",
            "--share",
            &share,
            "--",
            "sh",
            "-c",
            "echo made-in-guest > /work/out && cat /work/out",
        ])
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if suite().backend == "firecracker" {
        return check(
            out.status.code() != Some(0)
                && stderr.contains("virtio-fs")
                && stderr.contains("hutch task run --workspace"),
            format!("status {:?}, stderr {stderr}", out.status),
        );
    }
    check(
        out.status.code() == Some(0),
        format!("status {:?}, stderr {stderr}", out.status),
    )?;
    check(
        std::fs::read_to_string(dirs.rw.join("out"))? == "made-in-guest\n",
        "the guest's file is not on the host",
    )?;
    let missing = format!("{}/nope:/x", dirs.rw.display());
    let out = hutch()
        .args(["run", "--share", &missing, "--", "true"])
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    check(
        out.status.code() != Some(0) && stderr.contains("nope") && !stderr.contains("panicked"),
        format!("missing share dir: {:?} {stderr}", out.status),
    )
}
