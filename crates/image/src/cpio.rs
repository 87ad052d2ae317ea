//! A deterministic writer for the `newc` ("070701") cpio format the Linux kernel unpacks as an
//! initramfs.
//!
//! Entries are collected in a [`CpioTree`] and written sorted by path, so parents always precede
//! their children and the same tree always produces the same bytes: inode numbers count up from 1
//! in write order, mtimes are 0, owners are root.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// `S_IFDIR`.
const S_IFDIR: u32 = 0o040000;
/// `S_IFREG`.
const S_IFREG: u32 = 0o100000;
/// `S_IFCHR`.
const S_IFCHR: u32 = 0o020000;

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// A directory with its permission bits.
    Dir { perm: u32 },
    /// A regular file with its permission bits and contents.
    File { perm: u32, data: Vec<u8> },
    /// A character device with its permission bits and device number.
    CharDev { perm: u32, major: u32, minor: u32 },
}

/// An in-memory file tree to be written as one cpio archive.
#[derive(Debug, Default)]
pub(crate) struct CpioTree {
    nodes: BTreeMap<String, Node>,
}

impl CpioTree {
    /// An empty tree.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its missing parents, mode 0755).
    pub(crate) fn dir(&mut self, path: &str, perm: u32) {
        let path = normalize(path);
        self.parents(&path);
        self.nodes.insert(path, Node::Dir { perm });
    }

    /// Adds a regular file (and its missing parent directories, mode 0755).
    pub(crate) fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) {
        let path = normalize(path);
        self.parents(&path);
        self.nodes.insert(path, Node::File { perm, data });
    }

    /// Adds a character device node (and its missing parent directories, mode 0755).
    pub(crate) fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        let path = normalize(path);
        self.parents(&path);
        self.nodes
            .insert(path, Node::CharDev { perm, major, minor });
    }

    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let parent = &path[..end + i];
            self.nodes
                .entry(parent.to_owned())
                .or_insert(Node::Dir { perm: 0o755 });
            end += i + 1;
        }
    }

    /// Writes the archive, including the `TRAILER!!!` record, and returns the number of bytes.
    pub(crate) fn write_to<W: Write>(&self, out: &mut W) -> io::Result<u64> {
        let mut written = 0u64;
        for (ino, (path, node)) in (1u32..).zip(&self.nodes) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir { perm } => (S_IFDIR | perm, 2, &[], (0, 0)),
                Node::File { perm, data } => (S_IFREG | perm, 1, data, (0, 0)),
                Node::CharDev { perm, major, minor } => (S_IFCHR | perm, 1, &[], (*major, *minor)),
            };
            written += write_entry(out, ino, mode, nlink, rdev, path, data)?;
        }
        written += write_entry(out, 0, 0, 1, (0, 0), "TRAILER!!!", &[])?;
        Ok(written)
    }
}

/// Strips leading `/` and `./`: the kernel wants archive names relative to `/`.
fn normalize(path: &str) -> String {
    let p = path.trim_start_matches('/');
    let p = p.strip_prefix("./").unwrap_or(p);
    assert!(
        !p.is_empty() && !p.ends_with('/') && !p.split('/').any(|c| c.is_empty() || c == ".."),
        "bad cpio path {path:?}"
    );
    p.to_owned()
}

fn pad4(out: &mut impl Write, len: u64) -> io::Result<u64> {
    let pad = (4 - (len % 4)) % 4;
    out.write_all(&[0u8; 3][..pad as usize])?;
    Ok(pad)
}

fn write_entry(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<u64> {
    let size = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
    let namesize = name.len() as u32 + 1;
    let header = format!(
        "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
         {dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    debug_assert_eq!(header.len(), 110);
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let mut n = 110 + u64::from(namesize);
    n += pad4(out, n)?;
    out.write_all(data)?;
    n += data.len() as u64;
    n += pad4(out, n)?;
    Ok(n)
}

/// One entry read back by [`parse`]; used by tests.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub ino: u32,
    pub mode: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev: (u32, u32),
    pub name: String,
    pub data: Vec<u8>,
}

/// Parses a `newc` archive up to and excluding its trailer; used by tests.
#[cfg(test)]
pub(crate) fn parse(mut buf: &[u8]) -> Result<Vec<Entry>, String> {
    let total = buf.len();
    let mut entries = Vec::new();
    loop {
        let off = total - buf.len();
        if buf.len() < 110 || &buf[..6] != b"070701" {
            return Err(format!("bad magic at {off}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).map_err(|e| e.to_string())?;
            u32::from_str_radix(s, 16).map_err(|e| e.to_string())
        };
        let (ino, mode, nlink, mtime, size) = (
            field(0)?,
            field(1)?,
            field(4)?,
            field(5)?,
            field(6)? as usize,
        );
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        if buf.len() < name_end || buf[name_end - 1] != 0 {
            return Err(format!("bad name at {off}"));
        }
        let name = String::from_utf8(buf[110..name_end - 1].to_vec()).map_err(|e| e.to_string())?;
        let data_start = name_end.div_ceil(4) * 4;
        let data_end = data_start + size;
        if buf.len() < data_end {
            return Err(format!("short data at {off}"));
        }
        let data = buf[data_start..data_end].to_vec();
        let next = data_end.div_ceil(4) * 4;
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push(Entry {
            ino,
            mode,
            nlink,
            mtime,
            rdev,
            name,
            data,
        });
        buf = &buf[next.min(buf.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpioTree {
        let mut t = CpioTree::new();
        t.file("/init", 0o755, b"#!/bin/sh\n".to_vec());
        t.char_dev("/dev/console", 0o600, 5, 1);
        t.dir("/proc", 0o755);
        t.file("/lib/modules/6.1.0/kernel/a.ko", 0o644, vec![7; 13]);
        t.file("/etc/hutch/modules", 0o644, b"x\n".to_vec());
        t
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let n = sample().write_to(&mut buf).unwrap();
        assert_eq!(n as usize, buf.len());
        assert_eq!(buf.len() % 4, 0);
        let entries = parse(&buf).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/hutch",
                "etc/hutch/modules",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1.0",
                "lib/modules/6.1.0/kernel",
                "lib/modules/6.1.0/kernel/a.ko",
                "proc",
            ]
        );
        let init = entries.iter().find(|e| e.name == "init").unwrap();
        assert_eq!(init.mode, 0o100755);
        assert_eq!(init.data, b"#!/bin/sh\n");
        let console = entries.iter().find(|e| e.name == "dev/console").unwrap();
        assert_eq!(console.mode, 0o020600);
        assert_eq!(console.rdev, (5, 1));
        let ko = entries.iter().find(|e| e.name.ends_with("a.ko")).unwrap();
        assert_eq!(ko.data, vec![7; 13]);
        assert!(entries.iter().all(|e| e.mtime == 0));
        let inos: Vec<_> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, (1..=entries.len() as u32).collect::<Vec<_>>());
    }

    #[test]
    fn deterministic() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        sample().write_to(&mut a).unwrap();
        sample().write_to(&mut b).unwrap();
        assert_eq!(a, b);
    }

    /// Cross-check with GNU cpio where it is installed.
    #[test]
    fn gnu_cpio_lists_it() {
        let Ok(cpio) = crate::tools::find("cpio") else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        let mut buf = Vec::new();
        sample().write_to(&mut buf).unwrap();
        let mut child = std::process::Command::new(cpio)
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("crw-------"), "{listing}");
        assert!(listing.lines().any(|l| l.ends_with(" init")), "{listing}");
        assert!(
            listing
                .lines()
                .any(|l| l.ends_with(" lib/modules/6.1.0/kernel/a.ko")),
            "{listing}"
        );
    }
}
