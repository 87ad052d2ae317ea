//! Real VMs under QEMU: the walking skeleton's behaviour suite.
//!
//! One shared VM serves the in-process cases (booted once: TCG boots take seconds); cases
//! that need their own VMs (isolation, the `hutch` binary end to end) boot them. After every
//! case has run, the suite checks that no VM process, run dir or socket of Hutch is left.
//!
//! Needs the `default` image in `$HUTCH_HOME` (`scripts/test.sh` builds it). Set
//! `HUTCH_SKIP_VM_TESTS=1` to skip with a printed reason instead.

use std::{
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
use hutch_vmm::QemuVmm;
use libtest_mimic::{Arguments, Failed};
use sha2::{Digest, Sha256};

mod common;
use common::{check, hutch_home, leaks};

type Result = std::result::Result<(), Failed>;

/// State shared by every case: a runtime whose worker threads outlive each case (a VM dies
/// with the thread that spawned it), the backend, and the shared VM.
struct Suite {
    rt: tokio::runtime::Runtime,
    vmm: QemuVmm,
    options: BootOptions,
    shared: Mutex<Option<Sandbox>>,
    channel: Arc<Channel>,
    kernel_release: String,
    home: PathBuf,
}

static SUITE: OnceLock<Suite> = OnceLock::new();

fn suite() -> &'static Suite {
    SUITE.get().expect("suite initialised in main")
}

fn main() {
    let args = Arguments::from_args();
    if std::env::var_os("HUTCH_SKIP_VM_TESTS").is_some() {
        eprintln!("SKIP vm suite: HUTCH_SKIP_VM_TESTS is set");
        return;
    }
    let home = hutch_home();
    let image = match hutch_image::open(&home.join("images"), "default") {
        Ok(i) => i,
        Err(e) => {
            eprintln!("vm suite needs the default image ({e}); run scripts/test.sh, or set HUTCH_SKIP_VM_TESTS=1 to skip");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (vmm, options, shared) = rt.block_on(async {
        tokio::spawn(async move {
            let accel =
                hutch_vmm::probe_accel(&image.kernel, &image.initrd, &home.join("accel.json"))
                    .await;
            eprintln!("vm suite: accelerator {} ({})", accel.accel, accel.reason);
            let vmm = QemuVmm::new(accel.accel).expect("qemu");
            let options = BootOptions {
                id: String::new(),
                image,
                cpus: 2,
                memory_mib: 512,
                disk_mib: 1024,
                runs_dir: home.join("local"),
                boot_timeout: Duration::from_secs(120),
                detached: false,
                network: None,
            };
            let shared = boot(&vmm, &options).await;
            (vmm, options, shared)
        })
        .await
        .unwrap()
    });
    let home = hutch_home();
    let channel = shared.channel().clone();
    let kernel_release = options.image.kernel_release.clone();
    let shared = Mutex::new(Some(shared));
    let _ = SUITE.set(Suite {
        rt,
        vmm,
        options,
        shared,
        channel,
        kernel_release,
        home,
    });

    let conclusion = libtest_mimic::run(&args, trials());

    let suite = suite();
    let shared = suite.shared.lock().unwrap().take().expect("shared VM");
    let shared_id = shared.id().to_string();
    suite
        .rt
        .block_on(async { shared.destroy().await.expect("destroy the shared VM") });
    let leaks = leaks(&suite.home);
    if !leaks.is_empty() {
        eprintln!(
            "LEAK after the vm suite (shared VM was {shared_id}):\n{}",
            leaks.join("\n")
        );
        std::process::exit(1);
    }
    eprintln!("vm suite: nothing left behind (no VMM process, run dir or socket)");
    conclusion.exit();
}

async fn boot(vmm: &QemuVmm, template: &BootOptions) -> Sandbox {
    let mut options = template.clone();
    options.id = hutch_core::new_id();
    Sandbox::boot(vmm, &options).await.expect("boot a VM")
}

fn trials() -> Vec<libtest_mimic::Trial> {
    trials![
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
    ]
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
    on_rt(async move {
        let s = suite();
        let (a, b) = tokio::join!(boot(&s.vmm, &s.options), boot(&s.vmm, &s.options));
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
