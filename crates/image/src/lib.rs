//! Guest images for Hutch: a distro kernel (as the bzImage QEMU boots and the ELF `vmlinux`
//! Firecracker boots), an initramfs holding the guest agent and the kernel modules it needs, and
//! an ext4 root file system made with debootstrap.
//!
//! Everything is cached by content under `images_dir` (normally `$HUTCH_HOME/images`):
//!
//! ```text
//! images_dir/
//!   <name>.json                     manifest of a named image (points at its artifacts)
//!   cas/kernel-<sha256>/            vmlinuz, release, modules/…, modules.load, modules.dep, meta.json
//!   cas/vmlinux-<sha256>/           vmlinux (ELF, extracted from the kernel's vmlinuz), meta.json
//!   cas/rootfs-<sha256>/            rootfs.ext4 (label `hutch-root`), meta.json
//!   cas/initramfs-<sha256>/         initrd.cpio (uncompressed newc), meta.json
//! ```
//!
//! Each artifact id is the sha256 of its inputs: the kernel's of (suite, mirror, kernel package),
//! the rootfs's of (suite, mirror, sorted package list), the initramfs's of (kernel artifact id,
//! sha256 of the agent binary), the vmlinux's of the kernel artifact id. A second [`build`] with
//! the same inputs reuses them all and takes well under a second.
//!
//! Nothing is installed or mounted on the host: the kernel package is fetched with a private apt
//! configuration and unpacked with `dpkg-deb -x`; the rootfs tree is packed with `mkfs.ext4 -d`.

#![forbid(unsafe_code)]
// Image builds are synchronous: callers run them on a thread of their own or the blocking pool.
#![allow(clippy::disallowed_methods)]
#![warn(missing_docs)]

mod apt;
mod cas;
mod cpio;
mod elf;
mod error;
mod initramfs;
mod kernel;
pub mod kernel_src;
mod rootfs;
mod tools;
pub mod vmlinux;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::ImageError;
pub use kernel::REQUIRED_MODULES;
pub use rootfs::ROOTFS_LABEL;

use cas::{artifact_id, ArtifactMeta, Cas};

/// Default Debian suite.
pub const DEFAULT_SUITE: &str = "bookworm";

/// Default kernel package (a metapackage that depends on the current cloud kernel).
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// Packages installed into the rootfs on top of debootstrap's `minbase` by default.
pub const DEFAULT_PACKAGES: &[&str] = &["ca-certificates", "git", "python3", "curl"];

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    /// Image name; see [`validate_name`].
    pub name: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Debian mirror URL; `None` takes the Debian archive from the host's apt sources.
    pub mirror: Option<String>,
    /// Packages to include in the rootfs (order and duplicates do not matter).
    pub packages: Vec<String>,
    /// Kernel package (or metapackage) to take the kernel and modules from.
    pub kernel_package: String,
    /// The guest agent: a static x86_64 ELF executable, packed as the initramfs `/init`.
    pub agent_binary: PathBuf,
}

impl BuildSpec {
    /// A spec with the default suite, host mirror, packages and kernel.
    pub fn new(name: impl Into<String>, agent_binary: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            suite: DEFAULT_SUITE.into(),
            mirror: None,
            packages: DEFAULT_PACKAGES.iter().map(|p| (*p).to_owned()).collect(),
            kernel_package: DEFAULT_KERNEL_PACKAGE.into(),
            agent_binary: agent_binary.into(),
        }
    }
}

/// A built guest image: the three files a VMM boots from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The image name.
    pub name: String,
    /// Kernel image (bzImage), for QEMU.
    pub kernel: PathBuf,
    /// The same kernel as an ELF `vmlinux`, for Firecracker; `None` for an image built before
    /// Hutch extracted one (`hutch image build` again adds it, from the cache).
    pub vmlinux: Option<PathBuf>,
    /// Initramfs (uncompressed newc cpio) with the agent as `/init`.
    pub initrd: PathBuf,
    /// Root file system (ext4, label [`ROOTFS_LABEL`]); share it read-only between VMs.
    pub rootfs: PathBuf,
    /// The kernel release (`uname -r` in the guest).
    pub kernel_release: String,
    /// Content id of the image: `sha256:<hex>` over the hashes of kernel, initrd and rootfs.
    pub digest: String,
}

/// `<images_dir>/<name>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Manifest {
    schema: u32,
    name: String,
    digest: String,
    kernel_release: String,
    kernel: String,
    /// The vmlinux artifact; absent in manifests written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vmlinux: Option<String>,
    initramfs: String,
    rootfs: String,
    suite: String,
    mirror: String,
    packages: Vec<String>,
    kernel_package: String,
    agent_sha256: String,
    created_unix: u64,
}

const MANIFEST_SCHEMA: u32 = 1;

/// Checks an image name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_owned()))
    }
}

/// A Debian package or suite name: `[a-z0-9][a-z0-9+.-]*`.
fn check_debian_name(field: &'static str, value: &str) -> Result<(), ImageError> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 100
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidSpec {
            field,
            value: value.to_owned(),
            reason: "expected a Debian name (a-z 0-9 + . -)",
        })
    }
}

/// Checks that the host has everything a full build needs: the tools (`apt-get`, `apt-cache`,
/// `dpkg-deb`, `debootstrap`, `mkfs.ext4`), the Debian archive keyring, and root privileges.
///
/// [`build`] runs the same checks itself, only for the steps that are not cached.
pub fn check_host_tools() -> Result<(), ImageError> {
    tools::require(tools::KERNEL_TOOLS)?;
    tools::require(tools::ROOTFS_TOOLS)?;
    tools::require_keyring()?;
    tools::require_root("building the rootfs (debootstrap)")
}

/// A spec with its defaults resolved and its fields checked.
#[derive(Debug)]
struct Resolved {
    suite: String,
    mirror: String,
    packages: Vec<String>,
    kernel_package: String,
}

fn resolve(spec: &BuildSpec) -> Result<Resolved, ImageError> {
    validate_name(&spec.name)?;
    check_debian_name("suite", &spec.suite)?;
    check_debian_name("kernel package", &spec.kernel_package)?;
    let mut packages = spec.packages.clone();
    packages.sort();
    packages.dedup();
    for p in &packages {
        check_debian_name("package", p)?;
    }
    let mirror = match &spec.mirror {
        Some(m) => apt::check_mirror(m)?,
        None => apt::host_mirror(Path::new("/etc/apt"))?,
    };
    Ok(Resolved {
        suite: spec.suite.clone(),
        mirror,
        packages,
        kernel_package: spec.kernel_package.clone(),
    })
}

/// What a kernel artifact is built from. The module list is one of them: the artifact holds
/// the modules it names, so a Hutch that needs another module (say `virtiofs` for shares) gets
/// a new artifact instead of a cached one without it.
fn kernel_inputs(r: &Resolved) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("suite".into(), r.suite.clone()),
        ("mirror".into(), r.mirror.clone()),
        ("kernel_package".into(), r.kernel_package.clone()),
        ("modules".into(), kernel::REQUIRED_MODULES.join(" ")),
    ])
}

fn rootfs_inputs(r: &Resolved) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("suite".into(), r.suite.clone()),
        ("mirror".into(), r.mirror.clone()),
        ("packages".into(), r.packages.join(" ")),
    ])
}

fn vmlinux_inputs(kernel_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("kernel".into(), kernel_id.to_owned())])
}

/// The ELF `vmlinux` that [`build`] extracted from the bzImage `vmlinuz` of a kernel artifact
/// (`<images_dir>/cas/kernel-<id>/vmlinuz`), if it is in the cache: how a VMM that takes only ELF
/// kernels finds the one belonging to an image's kernel. `None` for any other path.
pub fn cached_vmlinux(vmlinuz: &Path) -> Option<PathBuf> {
    let kernel_dir = vmlinuz.parent()?;
    let kernel_id = kernel_dir.file_name()?.to_str()?;
    if vmlinuz.file_name()? != "vmlinuz"
        || !kernel_id.starts_with("kernel-")
        || !cas::is_artifact_id(kernel_id)
    {
        return None;
    }
    let dir = kernel_dir
        .parent()?
        .join(artifact_id("vmlinux", &vmlinux_inputs(kernel_id)));
    let file = dir.join("vmlinux");
    (dir.join("meta.json").is_file() && file.is_file()).then_some(file)
}

fn initramfs_inputs(kernel_id: &str, agent_sha256: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kernel".into(), kernel_id.to_owned()),
        ("agent_sha256".into(), agent_sha256.to_owned()),
    ])
}

/// The image digest: sha256 over the content hashes of its three boot files.
fn image_digest(vmlinuz: &str, initrd: &str, rootfs: &str) -> String {
    let text = format!(
        "{}\nvmlinuz {vmlinuz}\ninitrd {initrd}\nrootfs {rootfs}\n",
        cas::RECIPE
    );
    format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

/// A spinner for one build step when `progress` is set: drawn on stderr when it is a
/// terminal, else written as plain lines (a log or CI shows each step and its end).
fn spinner(progress: bool, prefix: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let target =
            indicatif::ProgressDrawTarget::term_like(Box::new(PlainLines::new(std::io::stderr())));
        let bar = ProgressBar::with_draw_target(None, target).with_prefix(prefix.to_owned());
        bar.set_style(ProgressStyle::with_template("{prefix}: {msg}").expect("valid template"));
        return bar;
    }
    let bar = ProgressBar::new_spinner().with_prefix(prefix.to_owned());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:.bold} [{elapsed}] {wide_msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A draw target that writes each new progress line once, plainly (to stderr): what a
/// spinner says when stderr is not a terminal.
#[derive(Debug)]
struct PlainLines<W> {
    /// The last line written, and where lines go.
    out: std::sync::Mutex<(String, W)>,
}

impl<W: std::io::Write> PlainLines<W> {
    fn new(out: W) -> Self {
        PlainLines {
            out: std::sync::Mutex::new((String::new(), out)),
        }
    }

    fn line(&self, s: &str) -> std::io::Result<()> {
        let s = s.trim_end();
        let mut guard = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let (last, out) = &mut *guard;
        if !s.is_empty() && last != s {
            out.write_all(format!("{s}\n").as_bytes())?;
            *last = s.to_owned();
        }
        Ok(())
    }
}

impl<W: std::io::Write + std::fmt::Debug + Send> indicatif::TermLike for PlainLines<W> {
    fn width(&self) -> u16 {
        160
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.line(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn finish(bar: &ProgressBar, started: Instant, what: String) {
    bar.set_style(ProgressStyle::with_template("  {prefix:.bold} {wide_msg}").expect("valid"));
    bar.finish_with_message(format!("{what} ({:.1}s)", started.elapsed().as_secs_f64()));
}

fn meta_sha(meta: &ArtifactMeta, file: &str) -> Result<String, ImageError> {
    meta.sha256
        .get(file)
        .cloned()
        .ok_or_else(|| ImageError::Io {
            action: "find the hash of",
            path: PathBuf::from(&meta.id).join(file),
            source: std::io::ErrorKind::NotFound.into(),
        })
}

/// Builds (or finds in the cache) the image described by `spec` under `images_dir`, and records
/// it as `<images_dir>/<name>.json`, replacing an older image of that name.
///
/// Steps that are cached are skipped, including their host checks: a fully cached build needs
/// neither root nor network. `progress` shows spinners on stderr (plain lines when it is not a
/// terminal).
pub fn build(images_dir: &Path, spec: &BuildSpec, progress: bool) -> Result<Image, ImageError> {
    let started = Instant::now();
    let r = resolve(spec)?;
    let agent = initramfs::read_agent(&spec.agent_binary)?;
    let agent_sha256 = cas::sha256_bytes(&agent);

    std::fs::create_dir_all(images_dir).map_err(ImageError::io("create", images_dir))?;
    let cas = Cas::open(images_dir)?;
    cas.clean_stale();

    let kernel_in = kernel_inputs(&r);
    let rootfs_in = rootfs_inputs(&r);
    let kernel_id = artifact_id("kernel", &kernel_in);
    let rootfs_id = artifact_id("rootfs", &rootfs_in);
    let mut kernel_meta = cas.get(&kernel_id)?;
    let rootfs_meta = cas.get(&rootfs_id)?;

    // Preflight for the steps that will run, before any slow work starts.
    if kernel_meta.is_none() {
        tools::require(tools::KERNEL_TOOLS)?;
        tools::require_keyring()?;
    }
    if rootfs_meta.is_none() {
        tools::require(tools::ROOTFS_TOOLS)?;
        tools::require_keyring()?;
        tools::require_root("building the rootfs (debootstrap)")?;
    }
    tracing::info!(
        name = %spec.name,
        mirror = %r.mirror,
        kernel_cached = kernel_meta.is_some(),
        rootfs_cached = rootfs_meta.is_some(),
        "building image"
    );

    if kernel_meta.is_none() {
        let t = Instant::now();
        let bar = spinner(progress, "kernel");
        let meta = cas.create(&kernel_id, |out, work| {
            let k = kernel::build(out, work, &r.mirror, &r.suite, &r.kernel_package, &bar)?;
            Ok(ArtifactMeta {
                id: kernel_id.clone(),
                inputs: kernel_in.clone(),
                sha256: BTreeMap::from([(
                    "vmlinuz".to_owned(),
                    cas::sha256_file(&out.join("vmlinuz"))?,
                )]),
                created_unix: cas::now_unix(),
                kernel: Some(k),
            })
        });
        let meta = meta.inspect_err(|_| bar.abandon())?;
        let k = meta.kernel.as_ref().expect("kernel meta");
        finish(&bar, t, format!("{} {}", k.resolved_package, k.version));
        kernel_meta = Some(meta);
    }
    let kernel_meta = kernel_meta.expect("set above");
    let k = kernel_meta.kernel.clone().ok_or_else(|| ImageError::Io {
        action: "read kernel details from",
        path: cas.path(&kernel_id).join("meta.json"),
        source: std::io::ErrorKind::InvalidData.into(),
    })?;

    let vmlinux_in = vmlinux_inputs(&kernel_id);
    let vmlinux_id = artifact_id("vmlinux", &vmlinux_in);
    if cas.get(&vmlinux_id)?.is_none() {
        let t = Instant::now();
        let bar = spinner(progress, "vmlinux");
        let vmlinuz = cas.path(&kernel_id).join("vmlinuz");
        bar.set_message("extracting the ELF kernel for Firecracker");
        let made = cas.create(&vmlinux_id, |out, _| {
            let file = out.join("vmlinux");
            vmlinux::extract_vmlinux(&vmlinuz, &file).map_err(|source| ImageError::Vmlinux {
                bzimage: vmlinuz.clone(),
                source,
            })?;
            Ok(ArtifactMeta {
                id: vmlinux_id.clone(),
                inputs: vmlinux_in.clone(),
                sha256: BTreeMap::from([("vmlinux".to_owned(), cas::sha256_file(&file)?)]),
                created_unix: cas::now_unix(),
                kernel: None,
            })
        });
        made.inspect_err(|_| bar.abandon())?;
        finish(&bar, t, "vmlinux extracted".into());
    }

    let rootfs_meta = match rootfs_meta {
        Some(m) => m,
        None => {
            let t = Instant::now();
            let bar = spinner(progress, "rootfs");
            let meta = cas.create(&rootfs_id, |out, work| {
                let tree = work.join("tree");
                let size = rootfs::build(out, &tree, &r.mirror, &r.suite, &r.packages, &bar)?;
                tracing::info!(size_mib = size >> 20, "rootfs.ext4 written");
                bar.set_message("hashing rootfs.ext4");
                Ok(ArtifactMeta {
                    id: rootfs_id.clone(),
                    inputs: rootfs_in.clone(),
                    sha256: BTreeMap::from([(
                        "rootfs.ext4".to_owned(),
                        cas::sha256_file(&out.join("rootfs.ext4"))?,
                    )]),
                    created_unix: cas::now_unix(),
                    kernel: None,
                })
            });
            let meta = meta.inspect_err(|_| bar.abandon())?;
            finish(
                &bar,
                t,
                format!("{} {} packages", r.suite, r.packages.len()),
            );
            meta
        }
    };

    let initramfs_in = initramfs_inputs(&kernel_id, &agent_sha256);
    let initramfs_id = artifact_id("initramfs", &initramfs_in);
    let initramfs_meta = match cas.get(&initramfs_id)? {
        Some(m) => m,
        None => {
            let kernel_dir = cas.path(&kernel_id);
            cas.create(&initramfs_id, |out, _| {
                let tree = initramfs::tree(agent, &kernel_dir, &k.release, &k.modules)?;
                let path = out.join("initrd.cpio");
                let bytes = initramfs::write(&tree, &path)?;
                tracing::info!(bytes, "initramfs written");
                Ok(ArtifactMeta {
                    id: initramfs_id.clone(),
                    inputs: initramfs_in.clone(),
                    sha256: BTreeMap::from([("initrd.cpio".to_owned(), cas::sha256_file(&path)?)]),
                    created_unix: cas::now_unix(),
                    kernel: None,
                })
            })?
        }
    };

    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        name: spec.name.clone(),
        digest: image_digest(
            &meta_sha(&kernel_meta, "vmlinuz")?,
            &meta_sha(&initramfs_meta, "initrd.cpio")?,
            &meta_sha(&rootfs_meta, "rootfs.ext4")?,
        ),
        kernel_release: k.release.clone(),
        kernel: kernel_id,
        vmlinux: Some(vmlinux_id),
        initramfs: initramfs_id,
        rootfs: rootfs_id,
        suite: r.suite,
        mirror: r.mirror,
        packages: r.packages,
        kernel_package: r.kernel_package,
        agent_sha256,
        created_unix: cas::now_unix(),
    };
    write_manifest(images_dir, &manifest)?;
    let image = image_of(images_dir, manifest)?;
    tracing::info!(
        name = %image.name,
        digest = %image.digest,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "image ready"
    );
    Ok(image)
}

fn manifest_path(images_dir: &Path, name: &str) -> PathBuf {
    images_dir.join(format!("{name}.json"))
}

fn write_manifest(images_dir: &Path, m: &Manifest) -> Result<(), ImageError> {
    let path = manifest_path(images_dir, &m.name);
    let tmp = images_dir.join(format!(".{}.json.tmp-{}", m.name, std::process::id()));
    let json = serde_json::to_vec_pretty(m).expect("manifest serializes");
    cas::write_synced(&tmp, &json)?;
    std::fs::rename(&tmp, &path).map_err(ImageError::io("rename into", &path))?;
    cas::sync_dir(images_dir);
    Ok(())
}

fn read_manifest(images_dir: &Path, name: &str) -> Result<Manifest, ImageError> {
    let path = manifest_path(images_dir, name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound {
                name: name.to_owned(),
            })
        }
        Err(e) => return Err(ImageError::io("read", path)(e)),
    };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|source| ImageError::Corrupt {
        path: path.clone(),
        source,
    })?;
    let bad = |what: &str| ImageError::Corrupt {
        path: path.clone(),
        source: serde::de::Error::custom(what),
    };
    if m.schema != MANIFEST_SCHEMA {
        return Err(bad("unknown manifest schema"));
    }
    if m.name != name {
        return Err(bad("manifest name does not match its file name"));
    }
    for id in [&m.kernel, &m.initramfs, &m.rootfs]
        .into_iter()
        .chain(m.vmlinux.as_ref())
    {
        if !cas::is_artifact_id(id) {
            return Err(bad("malformed artifact id"));
        }
    }
    Ok(m)
}

fn image_of(images_dir: &Path, m: Manifest) -> Result<Image, ImageError> {
    let cas = images_dir.join("cas");
    let file = |id: &str, file: &str| -> Result<PathBuf, ImageError> {
        let p = cas.join(id).join(file);
        if cas.join(id).join("meta.json").is_file() && p.is_file() {
            Ok(p)
        } else {
            Err(ImageError::ArtifactMissing {
                name: m.name.clone(),
                artifact: id.to_owned(),
            })
        }
    };
    Ok(Image {
        kernel: file(&m.kernel, "vmlinuz")?,
        vmlinux: match &m.vmlinux {
            Some(id) => Some(file(id, "vmlinux")?),
            None => None,
        },
        initrd: file(&m.initramfs, "initrd.cpio")?,
        rootfs: file(&m.rootfs, "rootfs.ext4")?,
        kernel_release: m.kernel_release.clone(),
        digest: m.digest.clone(),
        name: m.name,
    })
}

/// Opens the image called `name` under `images_dir`.
///
/// Fails with [`ImageError::NotFound`] (whose message says to run `hutch image build --name
/// NAME`) if it was never built, and with [`ImageError::ArtifactMissing`] if its cached files are
/// gone.
pub fn open(images_dir: &Path, name: &str) -> Result<Image, ImageError> {
    validate_name(name)?;
    let m = read_manifest(images_dir, name)?;
    image_of(images_dir, m)
}

/// Lists the images under `images_dir`, sorted by name. Images whose manifest is unreadable or
/// whose artifacts are missing are skipped with a warning; a missing `images_dir` is an empty
/// list.
pub fn list(images_dir: &Path) -> Result<Vec<Image>, ImageError> {
    let entries = match std::fs::read_dir(images_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io("read", images_dir)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let stem = n.strip_suffix(".json")?;
            validate_name(stem).ok().map(|_| stem.to_owned())
        })
        .collect();
    names.sort();
    let mut images = Vec::new();
    for name in names {
        match open(images_dir, &name) {
            Ok(i) => images.push(i),
            Err(e) => tracing::warn!(%name, error = %e, "skipping image"),
        }
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can still read after handing it away.
    #[derive(Debug, Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn progress_without_a_terminal_is_plain_lines_each_once() {
        let out = Shared::default();
        let target =
            indicatif::ProgressDrawTarget::term_like(Box::new(PlainLines::new(out.clone())));
        let bar = ProgressBar::with_draw_target(None, target).with_prefix("rootfs");
        bar.set_style(ProgressStyle::with_template("{prefix}: {msg}").unwrap());
        bar.set_message("debootstrap");
        bar.set_message("debootstrap");
        bar.set_message("hashing rootfs.ext4");
        finish(&bar, Instant::now(), "rootfs ready".into());
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..2],
            ["rootfs: debootstrap", "rootfs: hashing rootfs.ext4"],
            "{text}"
        );
        assert!(lines[2].starts_with("  rootfs rootfs ready ("), "{text}");
        assert_eq!(lines.len(), 3, "{text}");
    }

    #[test]
    fn names() {
        for ok in ["a", "default", "py3.11", "0x", "a-b_c.d", &"a".repeat(63)] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "A",
            "-a",
            ".a",
            "_a",
            "a/b",
            "../x",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(matches!(err, ImageError::InvalidName(_)), "{bad}");
        }
        assert_eq!(
            validate_name("Bad").unwrap_err().to_string(),
            "invalid image name `Bad`: use 1-63 of a-z 0-9 . _ - starting with a letter or digit"
        );
    }

    fn spec() -> BuildSpec {
        let mut s = BuildSpec::new("default", "/bin/busybox");
        s.mirror = Some("http://m.example.org/debian/".into());
        s
    }

    #[test]
    fn spec_resolution_and_keys() {
        let a = resolve(&spec()).unwrap();
        assert_eq!(a.mirror, "http://m.example.org/debian");
        assert_eq!(a.packages, ["ca-certificates", "curl", "git", "python3"]);

        // Order and duplicates of packages do not change the rootfs key.
        let mut s = spec();
        s.packages = vec!["python3".into(), "git".into(), "curl".into(), "git".into()];
        s.packages.push("ca-certificates".into());
        let b = resolve(&s).unwrap();
        assert_eq!(
            artifact_id("rootfs", &rootfs_inputs(&a)),
            artifact_id("rootfs", &rootfs_inputs(&b))
        );
        // The kernel key does not depend on the package list; the rootfs key does.
        s.packages.push("vim".into());
        let c = resolve(&s).unwrap();
        assert_eq!(
            artifact_id("kernel", &kernel_inputs(&a)),
            artifact_id("kernel", &kernel_inputs(&c))
        );
        assert_ne!(
            artifact_id("rootfs", &rootfs_inputs(&a)),
            artifact_id("rootfs", &rootfs_inputs(&c))
        );
        // A different mirror is a different kernel.
        let mut s = spec();
        s.mirror = Some("http://other.example.org/debian".into());
        assert_ne!(
            artifact_id("kernel", &kernel_inputs(&a)),
            artifact_id("kernel", &kernel_inputs(&resolve(&s).unwrap()))
        );
    }

    #[test]
    fn spec_validation() {
        let mut s = spec();
        s.packages.push("--foreign".into());
        assert!(resolve(&s)
            .unwrap_err()
            .to_string()
            .contains("invalid package `--foreign`"));
        let mut s = spec();
        s.packages.push("a,b".into());
        assert!(resolve(&s).is_err());
        let mut s = spec();
        s.suite = "bookworm main".into();
        assert!(resolve(&s).is_err());
        let mut s = spec();
        s.name = "Nope".into();
        assert!(matches!(
            resolve(&s).unwrap_err(),
            ImageError::InvalidName(_)
        ));
    }

    fn fake_manifest(dir: &Path, name: &str) -> Manifest {
        let r = resolve(&spec()).unwrap();
        let kernel = artifact_id("kernel", &kernel_inputs(&r));
        let rootfs = artifact_id("rootfs", &rootfs_inputs(&r));
        let initramfs = artifact_id("initramfs", &initramfs_inputs(&kernel, "00"));
        let vmlinux = artifact_id("vmlinux", &vmlinux_inputs(&kernel));
        for (id, file) in [
            (&kernel, "vmlinuz"),
            (&vmlinux, "vmlinux"),
            (&rootfs, "rootfs.ext4"),
            (&initramfs, "initrd.cpio"),
        ] {
            let d = dir.join("cas").join(id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(file), "x").unwrap();
            std::fs::write(d.join("meta.json"), "{}").unwrap();
        }
        Manifest {
            schema: MANIFEST_SCHEMA,
            name: name.into(),
            digest: image_digest("a", "b", "c"),
            kernel_release: "6.1.0-x-cloud-amd64".into(),
            kernel,
            vmlinux: Some(vmlinux),
            initramfs,
            rootfs,
            suite: r.suite,
            mirror: r.mirror,
            packages: r.packages,
            kernel_package: r.kernel_package,
            agent_sha256: "00".into(),
            created_unix: 0,
        }
    }

    #[test]
    fn open_and_list() {
        let d = tempfile::tempdir().unwrap();
        assert!(list(d.path()).unwrap().is_empty());
        assert!(list(&d.path().join("nonexistent")).unwrap().is_empty());
        let err = open(d.path(), "default").unwrap_err();
        assert_eq!(
            err.to_string(),
            "image `default` not found: run `hutch image build --name default`"
        );

        for name in ["b", "a"] {
            write_manifest(d.path(), &fake_manifest(d.path(), name)).unwrap();
        }
        let img = open(d.path(), "a").unwrap();
        assert_eq!(img.name, "a");
        assert_eq!(img.kernel_release, "6.1.0-x-cloud-amd64");
        assert!(img.kernel.ends_with("vmlinuz") && img.kernel.is_file());
        let vmlinux = img.vmlinux.clone().unwrap();
        assert!(vmlinux.ends_with("vmlinux") && vmlinux.is_file());
        // A VMM holding only the bzImage's path finds the same vmlinux; other paths find none.
        assert_eq!(cached_vmlinux(&img.kernel), Some(vmlinux.clone()));
        assert_eq!(cached_vmlinux(&img.initrd), None);
        assert_eq!(cached_vmlinux(Path::new("/boot/vmlinuz")), None);
        assert_eq!(cached_vmlinux(&vmlinux), None);
        assert!(img.digest.starts_with("sha256:") && img.digest.len() == 71);
        let names: Vec<_> = list(d.path())
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["a", "b"]);

        // A broken manifest is skipped by list and reported by open.
        std::fs::write(d.path().join("c.json"), "{").unwrap();
        assert_eq!(list(d.path()).unwrap().len(), 2);
        assert!(matches!(
            open(d.path(), "c").unwrap_err(),
            ImageError::Corrupt { .. }
        ));

        // A missing artifact makes the image incomplete.
        let m = fake_manifest(d.path(), "a");
        std::fs::remove_dir_all(d.path().join("cas").join(&m.rootfs)).unwrap();
        let err = open(d.path(), "a").unwrap_err();
        assert!(matches!(err, ImageError::ArtifactMissing { .. }));
        assert!(err.to_string().contains("hutch image build --name a"));
    }

    #[test]
    fn images_from_before_vmlinux_still_open() {
        let d = tempfile::tempdir().unwrap();
        let mut m = fake_manifest(d.path(), "old");
        let vmlinux_dir = d.path().join("cas").join(m.vmlinux.take().unwrap());
        std::fs::remove_dir_all(vmlinux_dir).unwrap();
        write_manifest(d.path(), &m).unwrap();
        let text = std::fs::read_to_string(d.path().join("old.json")).unwrap();
        assert!(!text.contains("vmlinux"), "{text}");
        let img = open(d.path(), "old").unwrap();
        assert_eq!(img.vmlinux, None);
        assert_eq!(cached_vmlinux(&img.kernel), None);
    }

    #[test]
    fn tampered_manifest_ids_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let mut m = fake_manifest(d.path(), "a");
        m.rootfs = "rootfs-../../../etc".into();
        write_manifest(d.path(), &m).unwrap();
        assert!(matches!(
            open(d.path(), "a").unwrap_err(),
            ImageError::Corrupt { .. }
        ));
    }

    #[test]
    fn digest_is_stable() {
        assert_eq!(image_digest("a", "b", "c"), image_digest("a", "b", "c"));
        assert_ne!(image_digest("a", "b", "c"), image_digest("a", "c", "b"));
    }

    /// The full pipeline, for real: debootstrap, apt, mkfs. Needs root and network.
    ///
    /// `HUTCH_TEST_IMAGES_DIR` keeps the cache between runs (default: a temp dir);
    /// `HUTCH_TEST_AGENT` names a static binary to pack as `/init` (default: `/bin/busybox`).
    #[test]
    #[ignore = "needs root and network; run by .ci/run"]
    fn full_build() {
        let dir = std::env::var_os("HUTCH_TEST_IMAGES_DIR").map(PathBuf::from);
        let tmp = tempfile::tempdir().unwrap();
        let dir = dir.unwrap_or_else(|| tmp.path().to_owned());
        let agent = std::env::var_os("HUTCH_TEST_AGENT")
            .map_or_else(|| PathBuf::from("/bin/busybox"), PathBuf::from);
        check_host_tools().unwrap();
        let spec = BuildSpec::new("test", agent);

        let t = Instant::now();
        let first = build(&dir, &spec, true).unwrap();
        eprintln!("first build: {:?} -> {first:#?}", t.elapsed());
        let t = Instant::now();
        let second = build(&dir, &spec, true).unwrap();
        let again = t.elapsed();
        eprintln!("second build: {again:?}");
        assert_eq!(first, second);
        assert!(
            again < Duration::from_secs(10),
            "cached build took {again:?}"
        );
        assert_eq!(open(&dir, "test").unwrap(), first);
        assert!(list(&dir).unwrap().contains(&first));

        let cpio = std::fs::read(&first.initrd).unwrap();
        let entries = cpio::parse(&cpio).unwrap();
        let modules = entries
            .iter()
            .find(|e| e.name == "etc/hutch/modules")
            .unwrap();
        let modules = String::from_utf8(modules.data.clone()).unwrap();
        eprintln!("modules:\n{modules}");
        for m in modules.lines() {
            let e = entries
                .iter()
                .find(|e| format!("/{}", e.name) == m)
                .unwrap();
            assert!(elf::modinfo(&e.data).is_some(), "{m} is not a plain .ko");
        }
        // What Firecracker's guests need, where the distro kernel has them as modules.
        for m in [
            "virtio_mmio.ko",
            "virtio_blk.ko",
            "/vsock.ko",
            "vmw_vsock_virtio_transport_common.ko",
            "vmw_vsock_virtio_transport.ko",
            "virtio-rng.ko",
            "overlay.ko",
        ] {
            assert!(modules.contains(m), "{m} is not loaded");
        }
        let vmlinux = std::fs::read(first.vmlinux.as_ref().expect("a vmlinux")).unwrap();
        vmlinux::check_elf_x86_64(&vmlinux).unwrap();
        assert_eq!(
            cached_vmlinux(&first.kernel).as_ref(),
            first.vmlinux.as_ref()
        );
    }
}
