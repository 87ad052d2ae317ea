//! Writing inside one host directory without ever leaving it.
//!
//! Guest-made trees (archives, changesets) name paths that a previous write, or the tree
//! itself, may have turned into symlinks. [`Beneath`] holds an open directory and resolves
//! every path beneath it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, one component
//! at a time: a symlink anywhere on the way is an error (`ELOOP`), never followed. Files are
//! created under a fresh name with `O_CREAT | O_EXCL | O_NOFOLLOW` and renamed into place
//! within their directory, so an existing symlink at the final name is replaced, not written
//! through; modes are set with `fchmod` on the opened descriptor, never by path.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::{self, Read, Write},
    os::fd::{AsFd, OwnedFd},
    path::{Component, Path},
};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

/// Resolution that never leaves the directory and never follows a symlink.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

/// An open host directory that every path is resolved beneath.
#[derive(Debug)]
pub struct Beneath {
    root: OwnedFd,
}

/// What a path holds, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink.
    Symlink,
    /// Anything else (FIFO, socket, device).
    Other,
}

/// A file being written under a temporary name; [`NewFile::commit`] renames it into place,
/// dropping it uncommitted removes it.
#[derive(Debug)]
pub struct NewFile {
    dir: OwnedFd,
    tmp: OsString,
    name: OsString,
    file: Option<File>,
}

impl Beneath {
    /// Opens `root` (which the caller chose, so a symlink there is followed) as the directory
    /// every later path is resolved beneath.
    pub fn open(root: &Path) -> io::Result<Beneath> {
        let root = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Beneath { root })
    }

    /// The directory at `rel`, creating missing directories (mode 0755 before the umask) when
    /// `create` is set.
    pub fn dir(&self, rel: &Path, create: bool) -> io::Result<OwnedFd> {
        let mut fd = open_dir(&self.root, OsStr::new("."))?;
        for name in components(rel)? {
            if create {
                match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            fd = open_dir(&fd, name)?;
        }
        Ok(fd)
    }

    /// Creates the directory `rel` (and its parents) if missing and sets its permission bits.
    pub fn mkdir(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let fd = self.dir(rel, true)?;
        fchmod(&fd, mode)
    }

    /// Starts writing a new file at `rel` (creating its parent directories). The final name
    /// is only touched by [`NewFile::commit`].
    pub fn create(&self, rel: &Path) -> io::Result<NewFile> {
        let (dir, name) = self.parent(rel, true)?;
        for _ in 0..16 {
            let tmp = OsString::from(format!(".hutch-{:016x}.tmp", rand::random::<u64>()));
            let flags =
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(&dir, &tmp, flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => {
                    return Ok(NewFile {
                        dir,
                        tmp,
                        name: name.to_os_string(),
                        file: Some(File::from(fd)),
                    })
                }
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temporary name",
        ))
    }

    /// Writes `data` to a new file at `rel` with `mode`, replacing whatever file or symlink
    /// was there. Returns the bytes written.
    pub fn write_file(&self, rel: &Path, mode: u32, data: &mut dyn Read) -> io::Result<u64> {
        let mut file = self.create(rel)?;
        let n = io::copy(data, &mut file)?;
        file.commit(mode)?;
        Ok(n)
    }

    /// Creates the symlink `rel` → `target` (the target is stored, never resolved here).
    pub fn symlink(&self, rel: &Path, target: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel, true)?;
        rustix::fs::symlinkat(target, &dir, name)?;
        Ok(())
    }

    /// Sets the permission bits of the file or directory `rel` (a symlink there is refused).
    pub fn chmod(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(&self.root, rel, flags, Mode::empty(), RESOLVE)?;
        fchmod(&fd, mode)
    }

    /// Opens the regular file `rel` for reading.
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(&self.root, rel, flags, Mode::empty(), RESOLVE)?;
        Ok(File::from(fd))
    }

    /// What `rel` holds, with its permission bits; `None` if it (or a parent) is missing.
    /// A symlink among the parents is an error.
    pub fn kind(&self, rel: &Path) -> io::Result<Option<(Kind, u32)>> {
        let (dir, name) = match self.parent(rel, false) {
            Ok(found) => found,
            Err(e) if missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let kind = match rustix::fs::FileType::from_raw_mode(st.st_mode) {
            rustix::fs::FileType::RegularFile => Kind::File,
            rustix::fs::FileType::Directory => Kind::Dir,
            rustix::fs::FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Ok(Some((kind, st.st_mode & 0o7777)))
    }

    /// The target of the symlink `rel`.
    pub fn read_link(&self, rel: &Path) -> io::Result<OsString> {
        use std::os::unix::ffi::OsStringExt;
        let (dir, name) = self.parent(rel, false)?;
        let target = rustix::fs::readlinkat(&dir, name, Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// Whether the directory `rel` has no entries.
    pub fn is_empty_dir(&self, rel: &Path) -> io::Result<bool> {
        let fd = self.dir(rel, false)?;
        let mut entries = rustix::fs::Dir::read_from(&fd)?;
        while let Some(entry) = entries.read() {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes the file, symlink or empty directory `rel`; a missing one is not an error.
    pub fn remove(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = match self.parent(rel, false) {
            Ok(found) => found,
            Err(e) if missing(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(rustix::io::Errno::ISDIR) => {
                Ok(rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the empty directory `rel`.
    pub fn rmdir(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel, false)?;
        Ok(rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)?)
    }

    /// Moves `from` to `to` (creating `to`'s parents), replacing a file or symlink at `to`.
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from, false)?;
        let (to_dir, to_name) = self.parent(to, true)?;
        Ok(rustix::fs::renameat(
            &from_dir, from_name, &to_dir, to_name,
        )?)
    }

    /// Removes the now empty parent directories of `rel`, innermost first, stopping at the
    /// first that is not empty (or at the root).
    pub fn prune(&self, rel: &Path) {
        let mut dir = rel.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if self.rmdir(d).is_err() {
                return;
            }
            dir = d.parent();
        }
    }

    /// The open parent directory of `rel` and its last component.
    fn parent<'a>(&self, rel: &'a Path, create: bool) -> io::Result<(OwnedFd, &'a OsStr)> {
        let name = *components(rel)?.last().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "empty path has no parent")
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.dir(parent, create)?, name))
    }
}

impl NewFile {
    /// Sets the permission bits and renames the file over its final name.
    pub fn commit(mut self, mode: u32) -> io::Result<()> {
        let file = self.file.take().expect("committed once");
        fchmod(&file, mode)?;
        drop(file);
        rustix::fs::renameat(&self.dir, &self.tmp, &self.dir, &self.name)?;
        self.tmp.clear();
        Ok(())
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = rustix::fs::unlinkat(&self.dir, &self.tmp, AtFlags::empty());
        }
    }
}

/// Opens the directory `name` inside `dir`, refusing symlinks and escapes.
fn open_dir(dir: &impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    // No O_NOFOLLOW: RESOLVE_NO_SYMLINKS already refuses a trailing symlink, with ELOOP.
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    Ok(rustix::fs::openat2(
        dir,
        name,
        flags,
        Mode::empty(),
        RESOLVE,
    )?)
}

fn fchmod(fd: &impl AsFd, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o777))?)
}

/// The normal components of a relative path; anything else (absolute, `..`) is refused.
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a relative path without `..`", rel.display()),
            )),
        })
        .collect()
}

/// Whether `e` says a path component is missing (or is not a directory).
fn missing(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR)
    )
}

/// Whether `e` is what a symlink on the way (or an escape) produces.
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::LOOP | rustix::io::Errno::XDEV)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, Beneath) {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let b = Beneath::open(root.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        (root, outside, b)
    }

    #[test]
    fn writes_never_pass_through_a_symlink() {
        let (root, outside, b) = setup();
        use std::os::unix::fs::PermissionsExt;
        let before = std::fs::metadata(outside.path()).unwrap().permissions();
        assert!(is_symlink_refusal(
            &b.mkdir(Path::new("out"), 0o777).unwrap_err()
        ));
        assert!(b
            .write_file(Path::new("out/x"), 0o644, &mut &b"x"[..])
            .is_err());
        assert!(b.symlink(Path::new("out/y"), Path::new("z")).is_err());
        assert!(b.chmod(Path::new("out"), 0o777).is_err());
        assert_eq!(
            std::fs::metadata(outside.path())
                .unwrap()
                .permissions()
                .mode(),
            before.mode()
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A file written at the symlink's own name replaces the link.
        b.write_file(Path::new("out"), 0o600, &mut &b"data"[..])
            .unwrap();
        assert_eq!(std::fs::read(root.path().join("out")).unwrap(), b"data");
        assert_eq!(b.kind(Path::new("out")).unwrap(), Some((Kind::File, 0o600)));
    }

    #[test]
    fn an_uncommitted_file_leaves_nothing_behind() {
        let (root, _outside, b) = setup();
        let mut f = b.create(Path::new("a/b/c")).unwrap();
        f.write_all(b"half").unwrap();
        drop(f);
        assert!(b.is_empty_dir(Path::new("a/b")).unwrap());
        assert_eq!(b.kind(Path::new("a/b/c")).unwrap(), None);
        b.prune(Path::new("a/b/c"));
        assert!(!root.path().join("a").exists());
    }
}
