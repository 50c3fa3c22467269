//! File access inside an evidence store that never follows a link, never blocks on a special file and never reads without a bound.
//!
//! The store is writable by the agent's user, while root may run the CLI on
//! it. So every name the writer removes, replaces or creates is resolved
//! relative to a directory it opened itself with `O_NOFOLLOW` (openat,
//! unlinkat, renameat): a symbolic link planted in the store is removed or
//! replaced as the link it is, never followed. Every read opens with
//! `O_NOFOLLOW | O_NONBLOCK`, requires a regular file and stops at a size
//! limit, so a FIFO, a device or a link to /dev/zero is a named problem, not a
//! hang or an exhausted memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// Why a file in the store could not be read.
#[derive(Debug)]
pub enum ReadFailure {
    NotFound,
    /// Not a regular file: a link, a FIFO, a device, a directory, a socket.
    NotRegular(&'static str),
    TooLarge {
        limit: u64,
    },
    Io(io::Error),
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFailure::NotFound => f.write_str("it is missing"),
            ReadFailure::NotRegular(kind) => write!(f, "it is {kind}, not a regular file"),
            ReadFailure::TooLarge { limit } => {
                write!(f, "it is larger than the {limit}-byte limit")
            }
            ReadFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<ReadFailure> for io::Error {
    fn from(r: ReadFailure) -> Self {
        match r {
            ReadFailure::NotFound => io::Error::from(io::ErrorKind::NotFound),
            ReadFailure::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// What a file type is, in words.
pub fn kind_name(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "a file of unknown type",
    }
}

fn read_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY
}

fn classify_open_error(e: rustix::io::Errno) -> ReadFailure {
    match e {
        rustix::io::Errno::NOENT => ReadFailure::NotFound,
        // O_NOFOLLOW on a link.
        rustix::io::Errno::LOOP => ReadFailure::NotRegular("a symbolic link"),
        other => ReadFailure::Io(other.into()),
    }
}

fn read_open(fd: OwnedFd, limit: u64) -> Result<Vec<u8>, ReadFailure> {
    let stat = rustix::fs::fstat(&fd).map_err(|e| ReadFailure::Io(e.into()))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        return Err(ReadFailure::NotRegular(kind_name(kind)));
    }
    if stat.st_size as u64 > limit {
        return Err(ReadFailure::TooLarge { limit });
    }
    let mut out = Vec::with_capacity(stat.st_size.max(0) as usize);
    // The file may grow while it is read: never read past the limit.
    File::from(fd)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(ReadFailure::Io)?;
    if out.len() as u64 > limit {
        return Err(ReadFailure::TooLarge { limit });
    }
    Ok(out)
}

/// Reads the regular file at `path` (its last component not followed), at most `limit` bytes.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, ReadFailure> {
    let fd = rustix::fs::open(path, read_flags(), Mode::empty()).map_err(classify_open_error)?;
    read_open(fd, limit)
}

/// Reads the regular file `name` in `dir`, at most `limit` bytes.
pub fn read_capped_at(dir: impl AsFd, name: &str, limit: u64) -> Result<Vec<u8>, ReadFailure> {
    let fd =
        rustix::fs::openat(dir, name, read_flags(), Mode::empty()).map_err(classify_open_error)?;
    read_open(fd, limit)
}

/// The type of `name` in `dir` without following a link; None when it does not exist.
pub fn kind_at(dir: impl AsFd, name: &str) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The type of `path` without following its last component; None when it does not exist.
pub fn kind_of(path: &Path) -> io::Result<Option<FileType>> {
    match rustix::fs::lstat(path) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens a directory given by the configuration (its path is followed: it is not the store's content).
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` in `dir`; a link there is refused (ELOOP or ENOTDIR), never followed.
pub fn open_dir_at(dir: impl AsFd, name: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` in `dir`, creating it if missing; returns whether it was created.
pub fn ensure_dir_at(dir: impl AsFd, name: &str) -> io::Result<(OwnedFd, bool)> {
    let created = match rustix::fs::mkdirat(dir.as_fd(), name, Mode::from_raw_mode(0o755)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(e.into()),
    };
    Ok((open_dir_at(dir, name)?, created))
}

/// Opens `name` in `dir` for locking: created if missing, a regular file or an error naming what it is.
pub fn open_lock_at(dir: impl AsFd, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => io::Error::other("it is a symbolic link, not a regular file"),
        other => other.into(),
    })?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != FileType::RegularFile {
        return Err(io::Error::other(format!(
            "it is {}, not a regular file; remove it",
            kind_name(kind)
        )));
    }
    Ok(File::from(fd))
}

/// Opens `name` in `dir` read-only for a shared lock; None when it does not exist.
pub fn open_lock_shared_at(dir: impl AsFd, name: &str) -> io::Result<Option<File>> {
    match rustix::fs::openat(dir, name, read_flags(), Mode::empty()) {
        Ok(fd) => {
            let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
            if kind != FileType::RegularFile {
                return Err(io::Error::other(format!(
                    "it is {}, not a regular file",
                    kind_name(kind)
                )));
            }
            Ok(Some(File::from(fd)))
        }
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(rustix::io::Errno::LOOP) => Err(io::Error::other(
            "it is a symbolic link, not a regular file",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Creates the new file `name` in `dir` with `data` (never through a link: O_EXCL).
pub fn write_new_at(dir: impl AsFd, name: &str, data: &[u8], durable: bool) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    let mut file = File::from(fd);
    file.write_all(data)?;
    if durable {
        file.sync_all()?;
    }
    Ok(())
}

/// Removes `name` from `dir` whatever it is (a link is removed as a link); missing is fine.
pub fn remove_at(dir: impl AsFd, name: &str) -> io::Result<()> {
    remove_tree_at(dir.as_fd(), name, 0)
}

/// Deepest tree the store's cleanup descends into (a bundle directory is one level).
const MAX_REMOVE_DEPTH: usize = 16;

fn remove_tree_at(dir: std::os::fd::BorrowedFd<'_>, name: &str, depth: usize) -> io::Result<()> {
    match kind_at(dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            if depth >= MAX_REMOVE_DEPTH {
                return Err(io::Error::other(format!(
                    "more than {MAX_REMOVE_DEPTH} directory levels to remove"
                )));
            }
            let sub = open_dir_at(dir, name)?;
            for child in list_names(&sub)? {
                remove_tree_at(sub.as_fd(), &child, depth + 1)?;
            }
            match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Some(_) => match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        },
    }
}

/// The names in `dir` (not `.` and `..`), with their types as the directory reports them.
pub fn list_entries(dir: impl AsFd) -> io::Result<Vec<(String, FileType)>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let bytes = entry.file_name().to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        // Names the writer makes are ASCII; anything else is kept lossily to be reported or removed.
        let name = String::from_utf8_lossy(bytes).into_owned();
        out.push((name, entry.file_type()));
    }
    Ok(out)
}

fn list_names(dir: impl AsFd) -> io::Result<Vec<String>> {
    Ok(list_entries(dir)?.into_iter().map(|(n, _)| n).collect())
}

/// Replaces `name` in `dir` by `data` through `tmp_name` and a rename; neither
/// name is followed if it is a link (the rename replaces the entry itself).
pub fn replace_at(
    dir: impl AsFd,
    name: &str,
    tmp_name: &str,
    data: &[u8],
    durable: bool,
) -> io::Result<()> {
    let dir = dir.as_fd();
    remove_at(dir, tmp_name)?;
    write_new_at(dir, tmp_name, data, durable)?;
    rustix::fs::renameat(dir, tmp_name, dir, name)?;
    Ok(())
}

/// Renames `from` in `from_dir` to `to` in `to_dir` (entries, never followed).
pub fn rename_at(from_dir: impl AsFd, from: &str, to_dir: impl AsFd, to: &str) -> io::Result<()> {
    Ok(rustix::fs::renameat(from_dir, from, to_dir, to)?)
}

pub fn fsync_fd(fd: impl AsFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(fd)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_named_not_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fifo = tmp.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        assert!(matches!(
            read_capped(&fifo, 10),
            Err(ReadFailure::NotRegular("a FIFO"))
        ));
        let zero = tmp.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        assert!(matches!(
            read_capped(&zero, 10),
            Err(ReadFailure::NotRegular("a symbolic link"))
        ));
        let big = tmp.path().join("big");
        std::fs::write(&big, [0u8; 11]).expect("write");
        assert!(matches!(
            read_capped(&big, 10),
            Err(ReadFailure::TooLarge { limit: 10 })
        ));
        assert_eq!(read_capped(&big, 11).expect("fits").len(), 11);
        assert!(matches!(
            read_capped(&tmp.path().join("none"), 10),
            Err(ReadFailure::NotFound)
        ));
    }

    #[test]
    fn removal_does_not_follow_links() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).expect("mkdir");
        std::fs::write(victim.join("precious"), b"x").expect("write");
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).expect("mkdir");
        std::os::unix::fs::symlink(&victim, store.join("link")).expect("symlink");
        std::fs::create_dir(store.join("sub")).expect("mkdir");
        std::os::unix::fs::symlink(&victim, store.join("sub/inner")).expect("symlink");
        let root = open_root(&store).expect("open");
        remove_at(&root, "link").expect("remove link");
        remove_at(&root, "sub").expect("remove tree");
        assert!(victim.join("precious").exists(), "the link's target stays");
        assert!(list_entries(&root).expect("list").is_empty());
    }
}
