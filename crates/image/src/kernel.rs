//! The kernel artifact: the distro kernel image plus the few modules the guest needs, taken from
//! the kernel package without installing it.
//!
//! Artifact layout:
//! ```text
//! vmlinuz                       the kernel image (bzImage)
//! release                       the kernel release string
//! modules/<relpath>.ko          decompressed modules, relative to lib/modules/<release>/
//! modules.load                  relative module paths, one a line, in load order (deps first)
//! modules.dep                   `path: deps…` lines for the selected modules (direct deps only)
//! meta.json                     see [`KernelMeta`]
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::apt::PrivateApt;
use crate::{elf, tools, ImageError};

/// Modules the guest agent needs, by module name; built-ins are skipped. virtio-mmio, -blk,
/// -rng and vsock serve both VMMs (Firecracker's channel is vsock; QEMU's is virtio-console);
/// virtiofs (and fuse under it) mounts QEMU's shared folders.
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "overlay",
    "ext4",
    "fuse",
    "virtiofs",
];

/// What the kernel artifact records about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct KernelMeta {
    /// The package asked for (often a metapackage).
    pub package: String,
    /// The concrete package that was downloaded.
    pub resolved_package: String,
    /// Its version.
    pub version: String,
    /// The kernel release (`uname -r`).
    pub release: String,
    /// Required modules that are built into the kernel.
    pub builtin: Vec<String>,
    /// Module paths relative to `lib/modules/<release>/`, decompressed, in load order.
    pub modules: Vec<String>,
}

/// Normalized module name: `-` and `_` are interchangeable in module names.
fn mod_name(s: &str) -> String {
    s.replace('-', "_")
}

/// The module name of a path like `kernel/drivers/char/hw_random/virtio-rng.ko.xz`.
fn name_of_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    mod_name(stem)
}

/// The path of a module with any compression suffix removed.
fn decompressed_path(path: &str) -> String {
    match path.rfind(".ko") {
        Some(i) => format!("{}.ko", &path[..i]),
        None => path.to_owned(),
    }
}

/// The module graph of one kernel: module name to (path relative to the module dir, deps).
#[derive(Debug, Default)]
pub(crate) struct ModuleGraph {
    /// Module name → path relative to `lib/modules/<release>/`, as shipped (maybe compressed).
    pub paths: BTreeMap<String, String>,
    /// Module name → names of the modules it depends on.
    pub deps: HashMap<String, Vec<String>>,
    /// Names of built-in modules.
    pub builtin: BTreeSet<String>,
}

impl ModuleGraph {
    /// Parses depmod's `modules.dep` and `modules.builtin`.
    pub(crate) fn from_modules_dep(modules_dep: &str, modules_builtin: &str) -> Self {
        let mut g = Self::default();
        for line in modules_dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let name = name_of_path(path.trim());
            g.paths.insert(name.clone(), path.trim().to_owned());
            g.deps
                .insert(name, deps.split_whitespace().map(name_of_path).collect());
        }
        g.builtin = parse_builtin(modules_builtin);
        g
    }

    /// The closure of `wanted` in load order (dependencies first), as module names. Built-in
    /// modules are left out; a name that is neither a module nor built in is an error.
    pub(crate) fn closure(&self, wanted: &[&str]) -> Result<Vec<String>, String> {
        fn visit(
            g: &ModuleGraph,
            name: &str,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            out: &mut Vec<String>,
        ) -> Result<(), String> {
            if done.contains(name) || g.builtin.contains(name) {
                return Ok(());
            }
            if stack.iter().any(|s| s == name) {
                return Err(format!("dependency cycle through {name}"));
            }
            if !g.paths.contains_key(name) {
                return Err(name.to_owned());
            }
            stack.push(name.to_owned());
            for dep in g.deps.get(name).into_iter().flatten() {
                visit(g, dep, stack, done, out)?;
            }
            stack.pop();
            done.insert(name.to_owned());
            out.push(name.to_owned());
            Ok(())
        }
        let (mut done, mut out) = (BTreeSet::new(), Vec::new());
        for w in wanted {
            visit(self, &mod_name(w), &mut Vec::new(), &mut done, &mut out)?;
        }
        Ok(out)
    }
}

fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(name_of_path)
        .collect()
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` with the host's `xz` / `zstd`.
fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return std::fs::read(path).map_err(ImageError::io("read", path));
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        return Err(ImageError::ModuleCompression { path: path.into() });
    };
    let mut cmd = tools::command(tool)?;
    cmd.args(["-d", "-c", "-q"]).arg(path);
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        program: tool.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("{tool} -d {}", path.display()),
            status: out.status.to_string(),
            tail: String::new(),
        });
    }
    Ok(out.stdout)
}

/// Builds the module graph of an unpacked module directory. Uses `modules.dep` where the package
/// ships one; otherwise (Debian generates it at install time) reads each needed module's
/// `.modinfo` `depends=` field.
fn scan_modules(
    moddir: &Path,
    release: &str,
    package: &str,
) -> Result<(ModuleGraph, HashMap<String, Vec<u8>>), ImageError> {
    let read_opt = |name: &str| -> Result<String, ImageError> {
        let p = moddir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(ImageError::io("read", p)(e)),
        }
    };
    let builtin = read_opt("modules.builtin")?;
    let dep = read_opt("modules.dep")?;
    let mut cache = HashMap::new();
    if !dep.trim().is_empty() {
        return Ok((ModuleGraph::from_modules_dep(&dep, &builtin), cache));
    }

    let mut g = ModuleGraph {
        builtin: parse_builtin(&builtin),
        ..Default::default()
    };
    let mut stack = vec![moddir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(ImageError::io("read", &dir))? {
            let entry = entry.map_err(ImageError::io("read", &dir))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(ImageError::io("stat", &path))?;
            if ft.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().contains(".ko") {
                let rel = path
                    .strip_prefix(moddir)
                    .expect("under moddir")
                    .to_string_lossy()
                    .into_owned();
                g.paths.insert(name_of_path(&rel), rel);
            }
        }
    }
    // Walk the dependency graph from the required modules, reading modinfo on the way.
    let mut todo: Vec<String> = REQUIRED_MODULES.iter().map(|m| mod_name(m)).collect();
    while let Some(name) = todo.pop() {
        if g.deps.contains_key(&name) || g.builtin.contains(&name) {
            continue;
        }
        let Some(rel) = g.paths.get(&name) else {
            continue; // reported by closure()
        };
        let data = read_module(&moddir.join(rel))?;
        let info = elf::modinfo(&data).ok_or_else(|| ImageError::Kernel {
            package: package.to_owned(),
            reason: format!("{rel} ({release}) has no .modinfo section"),
        })?;
        let deps: Vec<String> = info
            .iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| v.split(',').filter(|d| !d.is_empty()).map(mod_name))
            .collect();
        todo.extend(deps.iter().cloned());
        g.deps.insert(name.clone(), deps);
        cache.insert(name, data);
    }
    Ok((g, cache))
}

/// Downloads and unpacks `package` with `apt`, and writes the kernel artifact into `out`.
pub(crate) fn build(
    out: &Path,
    work: &Path,
    mirror: &str,
    suite: &str,
    package: &str,
    bar: &ProgressBar,
) -> Result<KernelMeta, ImageError> {
    let apt_root = work.join("apt");
    let debs = work.join("debs");
    let unpack = work.join("unpack");
    for d in [&apt_root, &debs] {
        std::fs::create_dir_all(d).map_err(ImageError::io("create", d))?;
    }
    let apt = PrivateApt::new(&apt_root, mirror, suite)?;
    bar.set_message(format!("apt-get update ({suite})"));
    apt.update(bar)?;

    let resolved = apt
        .depends(package, bar)?
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .unwrap_or_else(|| package.to_owned());
    tracing::info!(%package, %resolved, "kernel package");
    bar.set_message(format!("downloading {resolved}"));
    let deb = apt.download(&resolved, &debs, bar)?;

    let mut cmd = tools::command("dpkg-deb")?;
    cmd.arg("-f").arg(&deb).arg("Version");
    let version = tools::run(cmd, bar)?.trim().to_owned();

    bar.set_message(format!("unpacking {resolved}"));
    let mut cmd = tools::command("dpkg-deb")?;
    cmd.arg("-x").arg(&deb).arg(&unpack);
    tools::run(cmd, bar)?;

    let kerr = |reason: String| ImageError::Kernel {
        package: resolved.clone(),
        reason,
    };
    let boot = unpack.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(ImageError::io("read", &boot))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| kerr("no boot/vmlinuz-*".into()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("matched above")
        .to_owned();
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpack.join(d).join(&release))
        .find(|d| d.is_dir())
        .ok_or_else(|| kerr(format!("no lib/modules/{release}")))?;

    let (graph, mut cache) = scan_modules(&moddir, &release, &resolved)?;
    let order = graph
        .closure(REQUIRED_MODULES)
        .map_err(|module| ImageError::ModuleMissing {
            release: release.clone(),
            module,
        })?;
    let builtin: Vec<String> = REQUIRED_MODULES
        .iter()
        .map(|m| mod_name(m))
        .filter(|m| graph.builtin.contains(m))
        .collect();

    std::fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(ImageError::io("copy", &vmlinuz))?;
    let mut modules = Vec::new();
    let mut dep_lines = String::new();
    for name in &order {
        let shipped = &graph.paths[name];
        let data = match cache.remove(name) {
            Some(d) => d,
            None => read_module(&moddir.join(shipped))?,
        };
        let rel = decompressed_path(shipped);
        let dest = out.join("modules").join(&rel);
        let parent = dest.parent().expect("has parent");
        std::fs::create_dir_all(parent).map_err(ImageError::io("create", parent))?;
        std::fs::write(&dest, data).map_err(ImageError::io("write", &dest))?;
        let deps: Vec<String> = graph.deps[name]
            .iter()
            .filter(|d| graph.paths.contains_key(*d))
            .map(|d| decompressed_path(&graph.paths[d]))
            .collect();
        dep_lines.push_str(&format!("{rel}: {}\n", deps.join(" ")));
        modules.push(rel);
    }
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(ImageError::io("write", p))
    };
    write("release", format!("{release}\n"))?;
    write("modules.dep", dep_lines)?;
    write(
        "modules.load",
        modules.iter().map(|m| format!("{m}\n")).collect(),
    )?;
    tracing::info!(%release, ?builtin, load_order = ?order, "kernel modules selected");
    Ok(KernelMeta {
        package: package.to_owned(),
        resolved_package: resolved,
        version,
        release,
        builtin,
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.zst: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/overlayfs/overlay.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/unrelated.ko:
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/mbcache.ko\n";

    #[test]
    fn closure_is_in_dependency_order() {
        let g = ModuleGraph::from_modules_dep(DEP, BUILTIN);
        let order = g.closure(REQUIRED_MODULES).unwrap();
        assert_eq!(
            order,
            [
                "virtio",
                "virtio_ring",
                "virtio_mmio",
                "virtio_blk",
                "virtio_console",
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_rng",
                "overlay",
                "fuse",
                "virtiofs",
            ]
        );
        // Every module comes after all of its dependencies.
        for (i, m) in order.iter().enumerate() {
            for d in &g.deps[m] {
                let j = order.iter().position(|x| x == d).unwrap();
                assert!(j < i, "{d} must load before {m}");
            }
        }
        assert_eq!(
            g.paths["virtio_rng"],
            "kernel/drivers/char/hw_random/virtio-rng.ko.zst"
        );
        assert!(!order.contains(&"unrelated".to_owned()));
    }

    #[test]
    fn missing_module_is_reported() {
        let g = ModuleGraph::from_modules_dep(DEP, "");
        assert_eq!(g.closure(REQUIRED_MODULES).unwrap_err(), "ext4");
    }

    #[test]
    fn cycles_are_reported() {
        let g = ModuleGraph::from_modules_dep("a.ko: b.ko\nb.ko: a.ko\n", "");
        assert!(g.closure(&["a"]).unwrap_err().contains("cycle"));
    }

    #[test]
    fn path_helpers() {
        assert_eq!(name_of_path("kernel/x/virtio-rng.ko.xz"), "virtio_rng");
        assert_eq!(
            decompressed_path("kernel/x/virtio-rng.ko.xz"),
            "kernel/x/virtio-rng.ko"
        );
        assert_eq!(decompressed_path("kernel/x/a.ko"), "kernel/x/a.ko");
    }

    #[test]
    fn unknown_compression_is_an_error() {
        let err = read_module(Path::new("/nonexistent/a.ko.lz4")).unwrap_err();
        assert!(matches!(err, ImageError::ModuleCompression { .. }));
    }
}
