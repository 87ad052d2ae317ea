//! A minimal microVM kernel built from the distro's `linux-source` package: `make allnoconfig`,
//! this project's fragment ([`MICROVM_CONFIG`]) merged on top the way the kernel's
//! `scripts/kconfig/merge_config.sh` does (later assignments win), `make olddefconfig`, a check
//! that every option of the fragment survived, then `make vmlinux bzImage`.
//!
//! Artifact `cas/srckernel-<sha256>/` (inputs: suite, mirror, the fragment's hash):
//! ```text
//! vmlinux        ELF kernel (Firecracker)
//! bzImage        the same kernel for QEMU
//! config         the final .config
//! release        `make kernelrelease`
//! meta.json
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use crate::apt::PrivateApt;
use crate::cas::{self, artifact_id, ArtifactMeta, Cas};
use crate::{tools, ImageError};

/// The config fragment kept in this project (`crates/image/kernel/microvm.config`).
pub const MICROVM_CONFIG: &str = include_str!("../kernel/microvm.config");

/// The source package (a metapackage depending on the current `linux-source-X.Y`).
const SOURCE_PACKAGE: &str = "linux-source";

/// Programs a source build needs, on top of apt and dpkg.
/// (`objtool` also needs libelf's headers: `libelf-dev`.)
const BUILD_TOOLS: &[&str] = &["make", "gcc", "flex", "bison", "bc", "tar", "xz"];

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceKernelSpec {
    /// Debian suite whose `linux-source` to use.
    pub suite: String,
    /// Debian mirror; `None` takes the host's.
    pub mirror: Option<String>,
    /// Parallel make jobs (at least 1).
    pub jobs: usize,
}

/// A built microVM kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceKernel {
    /// The ELF kernel.
    pub vmlinux: PathBuf,
    /// The bzImage.
    pub bzimage: PathBuf,
    /// `make kernelrelease`.
    pub release: String,
    /// The artifact id.
    pub id: String,
}

/// One line of a config fragment: `CONFIG_X=value` or `# CONFIG_X is not set` (`value` None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLine {
    /// The symbol, with its `CONFIG_` prefix.
    pub symbol: String,
    /// Its value; `None` for "is not set".
    pub value: Option<String>,
}

/// Parses a fragment: assignments and "is not set" lines; other comments and blank lines are
/// skipped; anything else is an error naming the line.
pub fn parse_fragment(text: &str) -> Result<Vec<ConfigLine>, ImageError> {
    let bad = |n: usize, line: &str| ImageError::KernelConfig(format!("line {n}: {line:?}"));
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(sym) = rest.strip_suffix(" is not set") {
                if !valid_symbol(sym) {
                    return Err(bad(i + 1, raw));
                }
                out.push(ConfigLine {
                    symbol: sym.to_string(),
                    value: None,
                });
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((sym, value)) if valid_symbol(sym) && !value.is_empty() => out.push(ConfigLine {
                symbol: sym.to_string(),
                value: Some(value.to_string()),
            }),
            _ => return Err(bad(i + 1, raw)),
        }
    }
    Ok(out)
}

fn valid_symbol(s: &str) -> bool {
    s.strip_prefix("CONFIG_").is_some_and(|r| {
        !r.is_empty()
            && r.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// The symbol a `.config` line sets or unsets, if any.
fn symbol_of(line: &str) -> Option<&str> {
    let line = line.trim();
    match line.strip_prefix("# ") {
        Some(rest) => rest.strip_suffix(" is not set"),
        None => line.split_once('=').map(|(s, _)| s),
    }
}

/// Merges `fragment` onto the `.config` text `base`, as `merge_config.sh` does: every symbol
/// the fragment names loses its old line, and the fragment's lines are appended.
pub fn merge(base: &str, fragment: &[ConfigLine]) -> String {
    let named: std::collections::HashSet<&str> =
        fragment.iter().map(|l| l.symbol.as_str()).collect();
    let mut out: String = base
        .lines()
        .filter(|l| symbol_of(l).is_none_or(|s| !named.contains(s)))
        .map(|l| format!("{l}\n"))
        .collect();
    for l in fragment {
        match &l.value {
            Some(v) => out.push_str(&format!("{}={v}\n", l.symbol)),
            None => out.push_str(&format!("# {} is not set\n", l.symbol)),
        }
    }
    out
}

/// The fragment's requests that the final `.config` does not honour (after `olddefconfig`
/// dropped what Kconfig would not allow): `(symbol, wanted, got)`.
pub fn unmet(final_config: &str, fragment: &[ConfigLine]) -> Vec<(String, String, String)> {
    let mut set: BTreeMap<&str, &str> = BTreeMap::new();
    for line in final_config.lines() {
        if let Some((s, v)) = line.trim().split_once('=') {
            if !line.starts_with('#') {
                set.insert(s, v);
            }
        }
    }
    fragment
        .iter()
        .filter_map(|l| {
            let got = set.get(l.symbol.as_str()).copied();
            let ok = match (&l.value, got) {
                (Some(want), Some(g)) => want == g,
                (Some(_), None) => false,
                (None, g) => g.is_none_or(|g| g == "n"),
            };
            (!ok).then(|| {
                (
                    l.symbol.clone(),
                    l.value.clone().unwrap_or_else(|| "n".into()),
                    got.unwrap_or("unset").to_string(),
                )
            })
        })
        .collect()
}

/// Checks the spec and the fragment without building anything.
pub fn validate(spec: &SourceKernelSpec) -> Result<Vec<ConfigLine>, ImageError> {
    crate::check_debian_name("suite", &spec.suite)?;
    if spec.jobs == 0 {
        return Err(ImageError::InvalidSpec {
            field: "jobs",
            value: "0".into(),
            reason: "at least 1",
        });
    }
    parse_fragment(MICROVM_CONFIG)
}

/// Builds (or finds in the cache under `images_dir`) the microVM kernel; `progress` shows a
/// spinner on stderr (only when it is a terminal).
pub fn build(
    images_dir: &Path,
    spec: &SourceKernelSpec,
    progress: bool,
) -> Result<SourceKernel, ImageError> {
    let fragment = validate(spec)?;
    let mirror = match &spec.mirror {
        Some(m) => crate::apt::check_mirror(m)?,
        None => crate::apt::host_mirror(Path::new("/etc/apt"))?,
    };
    let inputs = BTreeMap::from([
        ("suite".to_owned(), spec.suite.clone()),
        ("mirror".to_owned(), mirror.clone()),
        ("package".to_owned(), SOURCE_PACKAGE.to_owned()),
        (
            "fragment".to_owned(),
            cas::sha256_bytes(MICROVM_CONFIG.as_bytes()),
        ),
    ]);
    let id = artifact_id("srckernel", &inputs);
    std::fs::create_dir_all(images_dir).map_err(ImageError::io("create", images_dir))?;
    let store = Cas::open(images_dir)?;
    if store.get(&id)?.is_none() {
        tools::require(tools::KERNEL_TOOLS)?;
        tools::require(BUILD_TOOLS)?;
        tools::require_keyring()?;
        let bar = crate::spinner(progress, "kernel");
        let made = store.create(&id, |out, work| {
            compile(out, work, &mirror, spec, &fragment, &bar)?;
            let sha = |f: &str| cas::sha256_file(&out.join(f)).map(|h| (f.to_owned(), h));
            Ok(ArtifactMeta {
                id: id.clone(),
                inputs: inputs.clone(),
                sha256: BTreeMap::from([sha("vmlinux")?, sha("bzImage")?]),
                created_unix: cas::now_unix(),
                kernel: None,
            })
        });
        made.inspect_err(|_| bar.abandon())?;
        bar.finish_and_clear();
    }
    let dir = store.path(&id);
    let release = std::fs::read_to_string(dir.join("release"))
        .map_err(ImageError::io("read", dir.join("release")))?
        .trim()
        .to_owned();
    Ok(SourceKernel {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        release,
        id,
    })
}

/// Fetches and unpacks the source, configures it, builds it, and copies the results to `out`.
fn compile(
    out: &Path,
    work: &Path,
    mirror: &str,
    spec: &SourceKernelSpec,
    fragment: &[ConfigLine],
    bar: &ProgressBar,
) -> Result<(), ImageError> {
    let (apt_root, debs, unpack, src) = (
        work.join("apt"),
        work.join("debs"),
        work.join("unpack"),
        work.join("src"),
    );
    for d in [&apt_root, &debs, &src] {
        std::fs::create_dir_all(d).map_err(ImageError::io("create", d))?;
    }
    let apt = PrivateApt::new(&apt_root, mirror, &spec.suite)?;
    bar.set_message(format!("apt-get update ({})", spec.suite));
    apt.update(bar)?;
    let resolved = apt
        .depends(SOURCE_PACKAGE, bar)?
        .into_iter()
        .find(|d| d.starts_with("linux-source-"))
        .unwrap_or_else(|| SOURCE_PACKAGE.to_owned());
    bar.set_message(format!("downloading {resolved}"));
    let deb = apt.download(&resolved, &debs, bar)?;
    let mut cmd = tools::command("dpkg-deb")?;
    cmd.arg("-x").arg(&deb).arg(&unpack);
    tools::run(cmd, bar)?;
    let usr_src = unpack.join("usr/src");
    let tarball = std::fs::read_dir(&usr_src)
        .map_err(ImageError::io("read", &usr_src))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
        .ok_or_else(|| ImageError::Kernel {
            package: resolved.clone(),
            reason: "no usr/src/linux-source-*.tar.xz".into(),
        })?;
    bar.set_message(format!("unpacking {}", tarball.display()));
    let mut cmd = tools::command("tar")?;
    cmd.args(["-xJf"])
        .arg(&tarball)
        .args(["--strip-components=1", "-C"])
        .arg(&src);
    tools::run(cmd, bar)?;

    let make = |args: &[&str]| -> Result<String, ImageError> {
        let mut cmd = tools::command("make")?;
        cmd.arg("-C")
            .arg(&src)
            .args(["ARCH=x86_64", "LOCALVERSION=-hutch-microvm"])
            .args(args);
        tools::run(cmd, bar)
    };
    bar.set_message("configuring (allnoconfig + microvm.config)");
    make(&["allnoconfig"])?;
    let config = src.join(".config");
    let base = std::fs::read_to_string(&config).map_err(ImageError::io("read", &config))?;
    std::fs::write(&config, merge(&base, fragment)).map_err(ImageError::io("write", &config))?;
    make(&["olddefconfig"])?;
    let done = std::fs::read_to_string(&config).map_err(ImageError::io("read", &config))?;
    let missing = unmet(&done, fragment);
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(s, want, got)| format!("{s} wanted {want}, got {got}"))
            .collect();
        return Err(ImageError::KernelConfig(format!(
            "Kconfig dropped: {}",
            list.join("; ")
        )));
    }
    bar.set_message(format!("make -j{} vmlinux bzImage", spec.jobs));
    make(&[&format!("-j{}", spec.jobs), "vmlinux", "bzImage"])?;
    let release = make(&["-s", "kernelrelease"])?;
    for (from, to) in [
        (src.join("vmlinux"), "vmlinux"),
        (src.join("arch/x86/boot/bzImage"), "bzImage"),
        (config.clone(), "config"),
    ] {
        std::fs::copy(&from, out.join(to)).map_err(ImageError::io("copy", &from))?;
    }
    std::fs::write(out.join("release"), format!("{}\n", release.trim()))
        .map_err(ImageError::io("write", out.join("release")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projects_fragment_parses_and_builds_everything_in() {
        let f = parse_fragment(MICROVM_CONFIG).unwrap();
        let get = |s: &str| f.iter().find(|l| l.symbol == s).map(|l| l.value.clone());
        for needed in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_HW_RANDOM_VIRTIO",
            "CONFIG_ACPI",
            "CONFIG_PCI",
            "CONFIG_PVH",
            "CONFIG_OVERLAY_FS",
            "CONFIG_EXT4_FS",
            "CONFIG_SERIAL_8250_CONSOLE",
        ] {
            assert_eq!(get(needed), Some(Some("y".into())), "{needed}");
        }
        assert_eq!(get("CONFIG_MODULES"), Some(None), "no modules");
        assert!(f.iter().all(|l| l.value.as_deref() != Some("m")));
    }

    #[test]
    fn fragments_are_checked() {
        assert!(parse_fragment("CONFIG_A=y\n# comment\n\n# CONFIG_B is not set\n").is_ok());
        for bad in [
            "CONFIG_a=y",
            "A=y",
            "CONFIG_A=",
            "CONFIG_A",
            "# CONFIG_a is not set",
        ] {
            assert!(parse_fragment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn merge_overrides_like_merge_config_sh() {
        let base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\nCONFIG_D=\"x\"\n";
        let frag = parse_fragment("CONFIG_B=y\n# CONFIG_C is not set\nCONFIG_E=64\n").unwrap();
        let merged = merge(base, &frag);
        assert_eq!(
            merged,
            "CONFIG_A=y\nCONFIG_D=\"x\"\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_E=64\n"
        );
        // What olddefconfig kept is checked against the fragment.
        assert!(unmet(&merged, &frag).is_empty());
        let dropped = "CONFIG_A=y\nCONFIG_C=y\nCONFIG_E=64\n";
        assert_eq!(
            unmet(dropped, &frag),
            [
                ("CONFIG_B".into(), "y".into(), "unset".into()),
                ("CONFIG_C".into(), "n".into(), "y".into())
            ]
        );
    }

    /// The whole build, for real: apt, the kernel source, make. Needs network, the build
    /// tools and tens of minutes; `HUTCH_TEST_IMAGES_DIR` keeps the result.
    #[test]
    #[ignore = "downloads linux-source and builds a kernel (slow); run by hand"]
    fn source_build() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::env::var_os("HUTCH_TEST_IMAGES_DIR")
            .map_or_else(|| tmp.path().to_owned(), PathBuf::from);
        let spec = SourceKernelSpec {
            suite: crate::DEFAULT_SUITE.into(),
            mirror: None,
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let t = std::time::Instant::now();
        let k = build(&dir, &spec, false).unwrap();
        eprintln!("built {k:#?} in {:?}", t.elapsed());
        crate::vmlinux::check_elf_x86_64(&std::fs::read(&k.vmlinux).unwrap()).unwrap();
        assert!(k.release.ends_with("-hutch-microvm"), "{}", k.release);
        assert_eq!(build(&dir, &spec, false).unwrap(), k, "cached");
    }

    #[test]
    fn specs_are_validated() {
        let mut s = SourceKernelSpec {
            suite: "bookworm".into(),
            mirror: None,
            jobs: 2,
        };
        assert!(validate(&s).is_ok());
        s.jobs = 0;
        assert!(validate(&s).is_err());
        s.jobs = 1;
        s.suite = "Bad Suite".into();
        assert!(validate(&s).is_err());
    }
}
