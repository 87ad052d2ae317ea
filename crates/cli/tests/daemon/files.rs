//! Files and trees in and out: round trips, symlinks a guest planted, bounded memory.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use hutch_api::client::ClientError;

use crate::*;

pub(crate) fn files_and_trees_round_trip() -> Result {
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[])).await.map(|s| s.id) })
        .map_err(|e| e.to_string())?;
    let host = tempfile::tempdir()?;
    let tree = host.path().join("tree");
    std::fs::create_dir_all(tree.join("empty"))?;
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::write(tree.join("bin/run.sh"), "#!/bin/sh\necho ran\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )?;
    std::fs::set_permissions(tree.join("empty"), std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::symlink("bin/run.sh", tree.join("link"))?;
    std::fs::write(host.path().join("one.txt"), "one file\n")?;
    let cp = |src: &str, dst: &str| -> Result {
        let out = hutch(&suite().home).args(["cp", src, dst]).output()?;
        check(
            out.status.success(),
            format!("cp {src} {dst}: {}", String::from_utf8_lossy(&out.stderr)),
        )
    };
    let result = (|| {
        cp(
            &host.path().join("one.txt").display().to_string(),
            &format!("{id}:/root/one.txt"),
        )?;
        cp(&tree.display().to_string(), &format!("{id}:/srv/tree"))?;
        let c = suite().client.clone();
        let id2 = id.clone();
        let seen = on_rt(async move {
            sh(&c, &id2, "cat /root/one.txt; stat -c '%a %F' /srv/tree/empty /srv/tree/bin/run.sh; readlink /srv/tree/link; /srv/tree/link").await
        })?;
        check(
            seen == "one file\n700 directory\n750 regular file\nbin/run.sh\nran",
            format!("guest sees {seen:?}"),
        )?;
        let back = host.path().join("back");
        cp(&format!("{id}:/srv/tree"), &back.display().to_string())?;
        cp(
            &format!("{id}:/root/one.txt"),
            &host.path().join("one.back").display().to_string(),
        )?;
        let mode = |p: &str| {
            std::fs::metadata(back.join(p))
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0)
        };
        check(
            mode("empty") == 0o700 && mode("bin/run.sh") == 0o750,
            "modes lost on the way back",
        )?;
        check(
            std::fs::read_link(back.join("link"))? == Path::new("bin/run.sh"),
            "symlink lost",
        )?;
        check(
            std::fs::read_dir(back.join("empty"))?.count() == 0,
            "empty dir not empty",
        )?;
        check(
            std::fs::read(host.path().join("one.back"))? == b"one file\n",
            "file differs",
        )
    })();
    let c = suite().client.clone();
    on_rt(async move { c.destroy(&id).await }).map_err(|e| e.to_string())?;
    result
}

/// `hutch cp SRC DST` against the suite's daemon.
pub(crate) fn hutch_cp(src: &str, dst: &str) -> Result<std::process::Output> {
    Ok(hutch(&suite().home).args(["cp", src, dst]).output()?)
}

pub(crate) fn cp_never_follows_what_a_guest_planted() -> Result {
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[])).await.map(|s| s.id) })
        .map_err(|e| e.to_string())?;
    let host = tempfile::tempdir()?;
    let victim = host.path().join("victim");
    std::fs::create_dir(&victim)?;
    let precious = host.path().join("precious.txt");
    std::fs::write(&precious, "precious\n")?;
    let out = host.path().join("out");
    let guest_sh = |script: String| {
        let c = suite().client.clone();
        let id = id.clone();
        on_rt(async move { sh(&c, &id, &script).await })
    };
    let result = (|| {
        // First copy: the guest's tree holds symlinks to host paths; they land as symlinks.
        guest_sh(format!(
            "mkdir -p /srv/evil && ln -s {} /srv/evil/link && ln -s {} /srv/evil/file && echo guest > /srv/one",
            victim.display(),
            precious.display()
        ))?;
        let first = hutch_cp(&format!("{id}:/srv/evil"), &out.display().to_string())?;
        check(
            first.status.success(),
            format!("first cp: {}", String::from_utf8_lossy(&first.stderr)),
        )?;
        // Second copy into the same place: `link` is now a directory with a file in it (and
        // `file` is gone, so that nothing else in the tree stops the copy first).
        guest_sh(
            "rm /srv/evil/link /srv/evil/file && mkdir /srv/evil/link && echo pwned > /srv/evil/link/pwned"
                .into(),
        )?;
        let second = hutch_cp(&format!("{id}:/srv/evil"), &out.display().to_string())?;
        check(
            !second.status.success(),
            "the second cp went through the planted link",
        )?;
        check(
            std::fs::read_dir(&victim)?.count() == 0,
            "the second cp wrote into the host directory the link names",
        )?;
        // A single file copied onto the planted `file` symlink replaces the link.
        let single = hutch_cp(
            &format!("{id}:/srv/one"),
            &out.join("file").display().to_string(),
        )?;
        check(
            single.status.success(),
            format!("single cp: {}", String::from_utf8_lossy(&single.stderr)),
        )?;
        check(
            std::fs::read(&precious)? == b"precious\n",
            "the single-file cp overwrote the symlink's target",
        )?;
        check(
            std::fs::read(out.join("file"))? == b"guest\n",
            "the single-file cp did not land",
        )
    })();
    let c = suite().client.clone();
    on_rt(async move { c.destroy(&id).await }).map_err(|e| e.to_string())?;
    result
}

/// A `/proc/PID/status` field in MiB (`VmRSS`, `VmHWM`).
pub(crate) fn proc_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Bytes a download delivers before it ends, or the error that cut it.
pub(crate) async fn drain(
    download: std::result::Result<hutch_api::client::Download, ClientError>,
) -> std::result::Result<u64, String> {
    use futures::StreamExt;
    let mut download = download.map_err(|e| e.to_string())?;
    let mut total = 0u64;
    while let Some(chunk) = download.next().await {
        total += chunk.map_err(|e| e.to_string())?.len() as u64;
    }
    Ok(total)
}

pub(crate) fn downloads_stream_in_bounded_memory() -> Result {
    const BIG: u64 = 250 << 20;
    let pid = suite().daemon.lock().unwrap().child.id();
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[])).await.map(|s| s.id) })
        .map_err(|e| e.to_string())?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = (|| {
        let c = suite().client.clone();
        let id2 = id.clone();
        on_rt(async move {
            sh(&c, &id2, "truncate -s 250M /root/big && truncate -s 4G /root/huge && mkdir /root/hd && truncate -s 4G /root/hd/huge").await
        })?;
        let before = proc_mib(pid, "VmRSS");
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(proc_mib(pid, "VmRSS"));
                    std::thread::sleep(Duration::from_millis(50));
                }
                peak
            })
        };
        let c = suite().client.clone();
        let id2 = id.clone();
        let started = Instant::now();
        let got = on_rt(async move {
            let (a, b, d) = tokio::join!(
                drain(c.download_file(&id2, "/root/big").await),
                drain(c.download_file(&id2, "/root/big").await),
                drain(c.download_file(&id2, "/root/big").await),
            );
            [a, b, d]
        });
        let took = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().map_err(|_| "sampler panicked")?;
        eprintln!(
            "3 concurrent GETs of 250 MiB in {took:.1?}: daemon VmRSS {before} MiB before, \
             peak {peak} MiB during, VmHWM {} MiB",
            proc_mib(pid, "VmHWM")
        );
        for g in &got {
            check(g == &Ok(BIG), format!("download delivered {g:?}"))?;
        }
        check(peak < 200, format!("daemon RSS peaked at {peak} MiB"))?;
        let c = suite().client.clone();
        let id2 = id.clone();
        let (file, file_took, tree, tree_took) = on_rt(async move {
            let t = Instant::now();
            let file = drain(c.download_file(&id2, "/root/huge").await).await;
            let file_took = t.elapsed();
            let t = Instant::now();
            let tree = drain(c.download_archive(&id2, "/root/hd").await).await;
            (file, file_took, tree, t.elapsed())
        });
        eprintln!(
            "4 GiB sparse file refused after {file_took:.1?} ({file:?}); \
             its directory's archive cut off after {tree_took:.1?} ({tree:?})"
        );
        check(file.is_err(), "a 4 GiB file was served")?;
        check(tree.is_err(), "a 4 GiB archive was served")
    })();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let c = suite().client.clone();
    on_rt(async move { c.destroy(&id).await }).map_err(|e| e.to_string())?;
    result
}
