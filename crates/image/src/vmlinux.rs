//! An ELF `vmlinux` from a distro `bzImage`, for VMMs that take only ELF kernels (Firecracker
//! v1.16 on x86_64 refuses a bzImage with "Invalid Elf magic number").
//!
//! A bzImage is real-mode setup code, then the protected-mode part, which holds the compressed
//! kernel. The boot protocol header (≥ 2.08) gives the payload's offset and length; the payload's
//! last 4 bytes are the uncompressed size. LZ4 (Debian's choice: the legacy `lz4 -l` frame) is
//! decompressed here; gzip, xz, zstd, lzma and bzip2 through the host's tools. The result must be
//! an ELF64 x86_64 image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The largest kernel we are willing to produce (guards against a decompression bomb).
const MAX_VMLINUX: usize = 512 << 20;

/// Why a vmlinux could not be extracted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmlinuxError {
    /// Reading the bzImage or writing the vmlinux failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The input is not a bzImage we understand.
    #[error("not a usable bzImage: {0}")]
    NotBzImage(String),
    /// The payload's compression is not one we can undo.
    #[error("unsupported kernel compression (payload starts {0})")]
    UnknownCompression(String),
    /// The host tool for that compression is missing.
    #[error("{tool} not found: install it to unpack {format} kernels")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The compression format.
        format: &'static str,
    },
    /// Decompression failed.
    #[error("{format} payload: {reason}")]
    Decompress {
        /// The compression format.
        format: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The decompressed payload is not an ELF64 x86_64 kernel.
    #[error("decompressed kernel is not an ELF64 x86_64 image: {0}")]
    NotElf(String),
}

/// The compression of a bzImage payload, by magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelCompression {
    /// `1f 8b`.
    Gzip,
    /// `fd 37 7a 58 5a 00`.
    Xz,
    /// `28 b5 2f fd`.
    Zstd,
    /// `02 21 4c 18`: the legacy LZ4 frame.
    Lz4Legacy,
    /// `5d 00 00`.
    Lzma,
    /// `BZh`.
    Bzip2,
}

impl KernelCompression {
    /// Recognizes a payload by its first bytes.
    pub fn detect(b: &[u8]) -> Option<Self> {
        Some(if b.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if b.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Self::Xz
        } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else if b.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
            Self::Lz4Legacy
        } else if b.starts_with(&[0x5d, 0, 0]) {
            Self::Lzma
        } else if b.starts_with(b"BZh") {
            Self::Bzip2
        } else {
            return None;
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Lz4Legacy => "lz4",
            Self::Lzma => "lzma",
            Self::Bzip2 => "bzip2",
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage (without its trailing 4-byte size) and that size.
fn payload(b: &[u8]) -> Result<(&[u8], u32), VmlinuxError> {
    let bad = |s: &str| VmlinuxError::NotBzImage(s.to_string());
    if b.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad("no HdrS boot header at 0x202"));
    }
    let version = u16_at(b, 0x206).ok_or_else(|| bad("truncated header"))?;
    let setup_sects = match b[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let (start, len) = if version >= 0x208 {
        let off = u32_at(b, 0x248).ok_or_else(|| bad("truncated header"))? as usize;
        let len = u32_at(b, 0x24c).ok_or_else(|| bad("truncated header"))? as usize;
        (pm_start + off, len)
    } else {
        // Old header: no payload fields. Scan the protected-mode part for a known magic.
        let from = pm_start.min(b.len());
        let at = (from..b.len().saturating_sub(8))
            .find(|&i| KernelCompression::detect(&b[i..]).is_some())
            .ok_or_else(|| bad("no compressed payload found"))?;
        (at, b.len() - at)
    };
    let p = start
        .checked_add(len)
        .and_then(|end| b.get(start..end))
        .ok_or_else(|| bad("payload lies outside the file"))?;
    if p.len() < 8 {
        return Err(bad("payload too short"));
    }
    let (data, size) = p.split_at(p.len() - 4);
    Ok((data, u32::from_le_bytes(size.try_into().expect("4 bytes"))))
}

/// Decompresses the payload of the bzImage `b` and checks that it is an ELF64 x86_64 image.
pub fn vmlinux_from_bzimage(b: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let (data, size) = payload(b)?;
    let format = KernelCompression::detect(data).ok_or_else(|| {
        VmlinuxError::UnknownCompression(
            data.iter()
                .take(8)
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
        )
    })?;
    let out = match format {
        KernelCompression::Lz4Legacy => lz4_legacy(data)?,
        other => with_tool(other, data)?,
    };
    if out.len() != size as usize {
        // The appended size is what the kernel's own decompressor trusts: a mismatch means a
        // truncated or misparsed payload.
        return Err(VmlinuxError::Decompress {
            format: format.name(),
            reason: format!("{} bytes out, header says {size}", out.len()),
        });
    }
    check_elf_x86_64(&out)?;
    Ok(out)
}

/// Reads the bzImage at `bzimage` and writes its ELF vmlinux to `out` (via a temporary file and
/// a rename, so `out` is complete or absent).
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), VmlinuxError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| VmlinuxError::Io {
            action,
            path,
            source,
        }
    };
    let b = std::fs::read(bzimage).map_err(io("read", bzimage))?;
    let v = vmlinux_from_bzimage(&b)?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &v).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, out).map_err(io("rename into", out))
}

/// Checks the ELF header: ELF64, little-endian, `EM_X86_64`.
pub fn check_elf_x86_64(b: &[u8]) -> Result<(), VmlinuxError> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err(VmlinuxError::NotElf("no ELF magic".into()));
    }
    if b[4] != 2 || b[5] != 1 {
        return Err(VmlinuxError::NotElf("not ELF64 little-endian".into()));
    }
    match u16_at(b, 0x12) {
        Some(62) => Ok(()),
        m => Err(VmlinuxError::NotElf(format!(
            "e_machine {m:?}, not x86_64 (62)"
        ))),
    }
}

/// Decompresses the legacy LZ4 frame (`lz4 -l`, what the kernel's `cmd_lz4` makes): the magic,
/// then blocks of `u32 LE compressed size` + an independent LZ4 block of at most 8 MiB.
fn lz4_legacy(mut b: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    let err = |reason: String| VmlinuxError::Decompress {
        format: "lz4",
        reason,
    };
    let mut out = Vec::new();
    while b.len() >= 4 {
        let n = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
        b = &b[4..];
        if n == MAGIC {
            continue;
        }
        let n = n as usize;
        let block = b
            .get(..n)
            .ok_or_else(|| err(format!("block of {n} bytes past the end")))?;
        b = &b[n..];
        let before = out.len();
        lz4_block(block, &mut out, MAX_VMLINUX).map_err(err)?;
        if out.len() - before > BLOCK_MAX {
            return Err(err("block decompresses to more than 8 MiB".into()));
        }
    }
    if !b.is_empty() {
        return Err(err(format!("{} stray bytes at the end", b.len())));
    }
    Ok(out)
}

/// Decompresses one raw LZ4 block, appending to `out` (matches stay within this block's
/// output), never growing `out` past `limit`.
fn lz4_block(b: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), String> {
    let base = out.len();
    let mut i = 0;
    let len_ext = |i: &mut usize, mut n: usize| -> Result<usize, String> {
        if n == 15 {
            loop {
                let x = *b.get(*i).ok_or("truncated length")?;
                *i += 1;
                n += usize::from(x);
                if x != 255 {
                    break;
                }
            }
        }
        Ok(n)
    };
    while i < b.len() {
        let token = b[i];
        i += 1;
        let lit = len_ext(&mut i, usize::from(token >> 4))?;
        let lits = b
            .get(i..i.checked_add(lit).ok_or("overflow")?)
            .ok_or("literals past the end")?;
        if out.len() + lit > limit {
            return Err(format!("output over {limit} bytes"));
        }
        out.extend_from_slice(lits);
        i += lit;
        if i == b.len() {
            break; // the last sequence has literals only
        }
        let off = usize::from(u16_at(b, i).ok_or("truncated offset")?);
        i += 2;
        if off == 0 || off > out.len() - base {
            return Err(format!("match offset {off} out of range"));
        }
        let mlen = len_ext(&mut i, usize::from(token & 15))? + 4;
        if out.len() + mlen > limit {
            return Err(format!("output over {limit} bytes"));
        }
        let start = out.len() - off;
        // Byte by byte: a match may overlap what it produces (run-length style).
        for k in 0..mlen {
            let x = out[start + k];
            out.push(x);
        }
    }
    Ok(())
}

/// Decompresses with the host's tool (`gzip -dc`, …), bounded in output size.
fn with_tool(format: KernelCompression, data: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let (tool, args): (&'static str, &[&str]) = match format {
        KernelCompression::Gzip => ("gzip", &["-dc"]),
        KernelCompression::Xz => ("xz", &["-dc", "--single-stream"]),
        KernelCompression::Zstd => ("zstd", &["-dcq"]),
        KernelCompression::Lzma => ("xz", &["-dc", "--format=lzma"]),
        KernelCompression::Bzip2 => ("bzip2", &["-dc"]),
        KernelCompression::Lz4Legacy => unreachable!("decompressed in-process"),
    };
    let fail = |reason: String| VmlinuxError::Decompress {
        format: format.name(),
        reason,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VmlinuxError::ToolMissing {
                tool,
                format: format.name(),
            },
            _ => fail(format!("cannot run {tool}: {e}")),
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = data.to_vec();
    // Feed stdin from a thread so a full stdout pipe cannot deadlock us.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().expect("piped");
    let mut out = Vec::new();
    let read = std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut stdout, MAX_VMLINUX as u64 + 1),
        &mut out,
    );
    if out.len() > MAX_VMLINUX {
        let _ = child.kill();
    }
    drop(stdout);
    let _ = feeder.join();
    let status = child
        .wait()
        .map_err(|e| fail(format!("wait for {tool}: {e}")))?;
    read.map_err(|e| fail(format!("read from {tool}: {e}")))?;
    if out.len() > MAX_VMLINUX {
        return Err(fail(format!("output over {MAX_VMLINUX} bytes")));
    }
    // gzip says "trailing garbage ignored" with status 2 when the kernel's padding follows;
    // what counts is the size check and the ELF header afterwards.
    if !status.success() && out.is_empty() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(fail(format!("{tool} {status}: {}", err.trim())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86_64 header plus filler that compresses well.
    fn fake_elf(len: usize) -> Vec<u8> {
        let mut e = vec![0u8; len];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[0x12] = 62;
        for (i, x) in e.iter_mut().enumerate().skip(64) {
            *x = (i % 7) as u8;
        }
        e
    }

    /// A raw LZ4 block for `data`: 64 bytes of literals, then one long match repeating the
    /// 7-byte period, then 5 trailing literals (the format's end rule). `data` must be periodic
    /// with period 7 after byte 64, as [`fake_elf`] is.
    fn lz4_block_of(data: &[u8]) -> Vec<u8> {
        let lit = &data[..64 + 7];
        let tail = &data[data.len() - 5..];
        let mlen = data.len() - lit.len() - tail.len();
        let mut b = Vec::new();
        let ext = |b: &mut Vec<u8>, mut n: usize| {
            while n >= 255 {
                b.push(255);
                n -= 255;
            }
            b.push(n as u8);
        };
        b.push(0xff); // 15 + literal ext, 15 + match ext
        ext(&mut b, lit.len() - 15);
        b.extend_from_slice(lit);
        b.extend_from_slice(&7u16.to_le_bytes());
        ext(&mut b, mlen - 4 - 15);
        b.push(0x50); // 5 literals, no match
        b.extend_from_slice(tail);
        b
    }

    /// A bzImage around `payload` (which must end with the 4-byte size), boot protocol 2.15.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let pm = (usize::from(setup_sects) + 1) * 512;
        let off = 0x3a0usize; // somewhere inside the protected-mode part, as in real images
        let mut b = vec![0u8; pm + off];
        b[0x1f1] = setup_sects;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&(off as u32).to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(&[0u8; 100]); // the rest of the image
        b
    }

    #[test]
    fn lz4_legacy_bzimage() {
        let elf = fake_elf(100_000);
        let block = lz4_block_of(&elf);
        assert!(block.len() < 1000, "compresses: {}", block.len());
        let mut p = 0x184c_2102u32.to_le_bytes().to_vec();
        p.extend_from_slice(&(block.len() as u32).to_le_bytes());
        p.extend_from_slice(&block);
        p.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let img = bzimage(&p);
        assert_eq!(vmlinux_from_bzimage(&img).unwrap(), elf);

        // Through files.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), &img).unwrap();
        extract_vmlinux(&d.path().join("vmlinuz"), &d.path().join("vmlinux")).unwrap();
        assert_eq!(std::fs::read(d.path().join("vmlinux")).unwrap(), elf);

        // A wrong appended size is caught.
        let n = p.len();
        p[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            vmlinux_from_bzimage(&bzimage(&p)),
            Err(VmlinuxError::Decompress { .. })
        ));
    }

    #[test]
    fn gzip_bzimage_when_gzip_is_installed() {
        let elf = fake_elf(50_000);
        let mut child = match Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => {
                eprintln!("SKIP gzip_bzimage_when_gzip_is_installed: no gzip binary");
                return;
            }
        };
        child.stdin.take().unwrap().write_all(&elf).unwrap();
        let mut p = child.wait_with_output().unwrap().stdout;
        p.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(vmlinux_from_bzimage(&bzimage(&p)).unwrap(), elf);
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            vmlinux_from_bzimage(b"\x7fELF not a bzImage"),
            Err(VmlinuxError::NotBzImage(_))
        ));
        let mut p = b"\x00\x01\x02\x03\x04\x05\x06\x07".to_vec();
        p.extend_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            vmlinux_from_bzimage(&bzimage(&p)),
            Err(VmlinuxError::UnknownCompression(_))
        ));
        // A payload length pointing past the end.
        let mut img = bzimage(&p);
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            vmlinux_from_bzimage(&img),
            Err(VmlinuxError::NotBzImage(_))
        ));
        // Not x86_64.
        let mut e = fake_elf(100);
        e[0x12] = 183;
        assert!(check_elf_x86_64(&e).is_err());
        // Hostile LZ4: a match before the start of output.
        let mut out = Vec::new();
        assert!(lz4_block(&[0x10, b'a', 9, 0], &mut out, 1 << 20).is_err());
        // A bomb stops at the limit.
        let mut out = Vec::new();
        let bomb = [0x1f, b'a', 1, 0, 255, 255, 255, 255, 0];
        assert!(lz4_block(&bomb, &mut out, 500).is_err());
    }

    /// The real kernel of the default image (`/var/lib/hutch/images/default.json`).
    #[test]
    #[ignore = "needs a built default image in /var/lib/hutch/images"]
    fn real_default_image_kernel() {
        let root = Path::new("/var/lib/hutch/images");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("default.json")).unwrap()).unwrap();
        let kernel = root
            .join("cas")
            .join(manifest["kernel"].as_str().unwrap())
            .join("vmlinuz");
        let b = std::fs::read(&kernel).unwrap();
        let v = vmlinux_from_bzimage(&b).unwrap();
        assert_eq!(&v[..4], b"\x7fELF");
        check_elf_x86_64(&v).unwrap();
        assert!(v.len() > b.len(), "uncompressed is larger");
    }
}
