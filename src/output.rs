//! Output files that never destroy anything: the one way every command writes a file
//! (`plan --output`, `plan --sglang-output`, `run --report`, `bench-migrate --output`).
//!
//! * [`check_outputs`], before any work: an output that is one of the inputs (the same file, also
//!   through a symlink or a hard link), a folder, or a place that cannot be written is refused
//!   (exit 2), so that a run never fails at its end for a bad path;
//! * [`write_output`]: a regular file (or a path that does not exist yet) is replaced atomically,
//!   through a temporary file in the same folder and a rename, so that a reader never sees a
//!   half-written file; a symlink is followed and its target replaced, so the link stays; a
//!   device node (`/dev/null`, `/dev/stdout`) or a FIFO is written straight into, never replaced.

use crate::exit::{ExitKind, Failure};
use std::ffi::CString;
use std::fs::{File, Metadata, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long [`write_output`] waits for a process to open a FIFO for reading.
pub(crate) const FIFO_READER_WAIT: Duration = Duration::from_secs(10);

/// Symlinks followed before giving up (Linux's own limit).
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, Error)]
pub enum OutputError {
    #[error("{flag} {}: is the same file as {input_flag} {}; writing it would destroy that input: choose another path", .path.display(), .input.display())]
    SameAsInput { flag: &'static str, path: PathBuf, input_flag: &'static str, input: PathBuf },
    #[error("{flag} {}: is a folder; give a file name inside it", .path.display())]
    IsDirectory { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: cannot be written ({what}): {source}; choose a writable place", .path.display())]
    NotWritable { flag: &'static str, path: PathBuf, what: String, source: std::io::Error },
    #[error("{flag} {}: cannot write: {source}", .path.display())]
    Write { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{flag} {}: is a FIFO and no process opened it for reading within {} s", .path.display(), FIFO_READER_WAIT.as_secs())]
    NoReader { flag: &'static str, path: PathBuf },
}

/// Bad input for a path refused before the work, a runtime failure for a write that failed at the end.
impl Failure for OutputError {
    fn kind(&self) -> ExitKind {
        match self {
            OutputError::SameAsInput { .. } | OutputError::IsDirectory { .. } | OutputError::NotWritable { .. } => {
                ExitKind::BadInput
            }
            OutputError::Write { .. } | OutputError::NoReader { .. } => ExitKind::Runtime,
        }
    }
}

/// A file a command reads or writes, with the flag that named it (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    pub flag: &'static str,
    pub path: &'a Path,
}

impl<'a> Named<'a> {
    pub fn new(flag: &'static str, path: &'a Path) -> Self {
        Named { flag, path }
    }
}

/// The files of `pairs` that were given: `(flag, Some(path))` becomes a [`Named`].
pub fn named<'a>(pairs: impl IntoIterator<Item = (&'static str, Option<&'a Path>)>) -> Vec<Named<'a>> {
    pairs.into_iter().filter_map(|(flag, p)| p.map(|p| Named::new(flag, p))).collect()
}

/// `path` with every symlink followed (also a dangling one: the place its target would be created).
pub(crate) fn resolve_symlinks(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(std::io::Error::other(format!("more than {MAX_SYMLINKS} symlinks to follow")))
}

/// Whether `m` is a device node, a FIFO or a socket: written straight into, never replaced.
fn is_special(m: &Metadata) -> bool {
    let t = m.file_type();
    t.is_char_device() || t.is_block_device() || t.is_fifo() || t.is_socket()
}

/// The folder a regular output is created in (`.` for a bare file name).
fn folder_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether two existing paths are the same file (device and inode, after symlinks).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// `access(path, W_OK)`: whether this process may open `path` for writing.
fn access_writable(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated path; access only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Checks, before any work, that every output can be written without destroying anything: no
/// output is an input or another output, none is a folder, and each can be created (a probe file
/// is created and removed in its folder) or, for a device node or FIFO, opened for writing
/// (checked with `access`, never opened: opening a FIFO would end its reader's input).
pub(crate) fn check_outputs(outputs: &[Named], inputs: &[Named]) -> Result<(), OutputError> {
    for (i, out) in outputs.iter().enumerate() {
        let (flag, path) = (out.flag, out.path.to_path_buf());
        for other in inputs.iter().chain(&outputs[..i]) {
            if same_file(out.path, other.path) || (out.path == other.path) {
                return Err(OutputError::SameAsInput {
                    flag,
                    path,
                    input_flag: other.flag,
                    input: other.path.to_path_buf(),
                });
            }
        }
        let not_writable =
            |what: &str, source| OutputError::NotWritable { flag, path: path.clone(), what: what.into(), source };
        let target = resolve_symlinks(out.path).map_err(|e| not_writable("its symlinks do not resolve", e))?;
        match std::fs::metadata(&target) {
            Ok(m) if m.is_dir() => return Err(OutputError::IsDirectory { flag, path }),
            Ok(m) if is_special(&m) => {
                access_writable(&target).map_err(|e| not_writable("no write permission", e))?;
                continue;
            }
            _ => {}
        }
        let folder = folder_of(&target);
        match std::fs::metadata(&folder) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(not_writable(
                    &format!("{} is not a folder", folder.display()),
                    std::io::Error::from(std::io::ErrorKind::NotADirectory),
                ))
            }
            Err(e) => return Err(not_writable(&format!("its folder {}", folder.display()), e)),
        }
        let probe = temp_name(&target, "probe");
        let created = OpenOptions::new().write(true).create_new(true).open(&probe);
        match created {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(e) => return Err(not_writable(&format!("no file can be created in {}", folder.display()), e)),
        }
    }
    Ok(())
}

/// `<target>.<pid>.<what>`: a temporary name beside the target.
fn temp_name(target: &Path, what: &str) -> PathBuf {
    let mut tmp = target.as_os_str().to_owned();
    tmp.push(format!(".{}.{what}", std::process::id()));
    PathBuf::from(tmp)
}

/// An output being written (see [`create_output`]): a temporary file beside a regular target,
/// renamed over it by [`OutputFile::commit`]; or the device node or FIFO itself.
pub(crate) struct OutputFile {
    flag: &'static str,
    path: PathBuf,
    /// `(temporary, target)` for a regular file; `None` for a device or FIFO.
    rename: Option<(PathBuf, PathBuf)>,
    file: std::io::BufWriter<File>,
}

/// Opens the output `flag path` for writing without destroying anything: a regular file (or a
/// new one) is written to a temporary file beside it, keeping the permissions of the file it
/// will replace, and renamed over it by [`OutputFile::commit`]; a symlink is followed, so the link
/// stays; a device node or a FIFO is written straight into (a FIFO waits at most
/// [`FIFO_READER_WAIT`] for a reader); a folder is refused. Dropped without a commit, the
/// temporary file is removed and the target left as it was.
pub(crate) fn create_output(flag: &'static str, path: &Path) -> Result<OutputFile, OutputError> {
    let write_err = |source| OutputError::Write { flag, path: path.to_path_buf(), source };
    let target = resolve_symlinks(path).map_err(write_err)?;
    let meta = std::fs::metadata(&target).ok();
    let (file, rename) = match &meta {
        Some(m) if m.is_dir() => return Err(OutputError::IsDirectory { flag, path: path.to_path_buf() }),
        Some(m) if m.file_type().is_fifo() => {
            let f = open_fifo(&target).map_err(write_err)?;
            (f.ok_or_else(|| OutputError::NoReader { flag, path: path.to_path_buf() })?, None)
        }
        Some(m) if is_special(m) => (OpenOptions::new().write(true).open(&target).map_err(write_err)?, None),
        _ => {
            let tmp = temp_name(&target, "tmp");
            let f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(write_err)?;
            if let Some(m) = &meta {
                if let Err(e) = f.set_permissions(m.permissions()) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(write_err(e));
                }
            }
            (f, Some((tmp, target)))
        }
    };
    Ok(OutputFile { flag, path: path.to_path_buf(), rename, file: std::io::BufWriter::new(file) })
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl OutputFile {
    /// Finishes the output: flushes it and, for a regular file, syncs it and renames it over
    /// the target in one step.
    pub fn commit(mut self) -> Result<(), OutputError> {
        let result = self.file.flush().and_then(|()| match &self.rename {
            Some((tmp, target)) => self.file.get_ref().sync_all().and_then(|()| std::fs::rename(tmp, target)),
            None => Ok(()),
        });
        if result.is_ok() {
            self.rename = None;
        }
        result.map_err(|source| OutputError::Write { flag: self.flag, path: self.path.clone(), source })
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Some((tmp, _)) = &self.rename {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes `bytes` to the output `flag path` without destroying anything (see [`create_output`]).
pub(crate) fn write_output(flag: &'static str, path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let mut out = create_output(flag, path)?;
    out.write_all(bytes).map_err(|source| OutputError::Write { flag, path: path.to_path_buf(), source })?;
    out.commit()
}

/// Writes `value` as JSON (and a newline) with [`write_output`].
pub(crate) fn write_json(flag: &'static str, path: &Path, value: &serde_json::Value) -> Result<(), OutputError> {
    let mut bytes = serde_json::to_vec(value).map_err(|e| OutputError::Write {
        flag,
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_output(flag, path, &bytes)
}

/// A JSON report that cannot lie: [`StatusReport::start`] replaces whatever is at the path with
/// `{"status": "running"}` (a regular file only: a device or FIFO receives the final report
/// alone), so that an older report never stands for this run; [`StatusReport::finish`] writes
/// the final document with `"status": "ok"`, or `"failed"` and its `error`. A run that dies
/// between the two leaves `"running"`, never a success.
#[derive(Debug, Clone)]
pub(crate) struct StatusReport {
    flag: &'static str,
    path: PathBuf,
}

/// `status` of a report.
pub(crate) const STATUS_RUNNING: &str = "running";
pub(crate) const STATUS_OK: &str = "ok";
pub(crate) const STATUS_FAILED: &str = "failed";

impl StatusReport {
    /// Writes `{"status": "running", ...extra}` to `flag path` when it is (or will be) a regular
    /// file. Check the path first with [`check_outputs`].
    pub fn start(flag: &'static str, path: &Path, extra: serde_json::Value) -> Result<StatusReport, OutputError> {
        let report = StatusReport { flag, path: path.to_path_buf() };
        let special =
            resolve_symlinks(path).ok().and_then(|t| std::fs::metadata(t).ok()).is_some_and(|m| is_special(&m));
        if !special {
            let mut doc = serde_json::json!({ "status": STATUS_RUNNING });
            if let (Some(d), serde_json::Value::Object(e)) = (doc.as_object_mut(), extra) {
                d.extend(e);
            }
            write_json(flag, path, &doc)?;
        }
        Ok(report)
    }

    /// The report at `flag path`, without writing anything (the final [`StatusReport::finish`]
    /// of a report that [`StatusReport::start`] began elsewhere).
    pub fn at(flag: &'static str, path: &Path) -> StatusReport {
        StatusReport { flag, path: path.to_path_buf() }
    }

    /// Writes the final report: `doc` (an object) with `status` `ok` when `error` is `None`, else
    /// `failed` and `error`.
    pub fn finish(&self, doc: serde_json::Value, error: Option<&str>) -> Result<(), OutputError> {
        write_json(self.flag, &self.path, &with_status(doc, error))
    }
}

/// `doc` with `status` (`ok`, or `failed` with `error`) in front of its keys.
pub(crate) fn with_status(doc: serde_json::Value, error: Option<&str>) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    out.insert("status".into(), (if error.is_some() { STATUS_FAILED } else { STATUS_OK }).into());
    if let serde_json::Value::Object(m) = doc {
        out.extend(m.into_iter().filter(|(k, _)| k != "status"));
    }
    if let Some(e) = error {
        out.insert("error".into(), e.into());
    }
    serde_json::Value::Object(out)
}

/// Opens a FIFO for writing once a reader has it open (`None` after [`FIFO_READER_WAIT`]): a
/// non-blocking open fails with `ENXIO` while nobody reads, so this never blocks forever.
fn open_fifo(path: &Path) -> std::io::Result<Option<File>> {
    let start = Instant::now();
    loop {
        match OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path) {
            Ok(f) => {
                // Blocking writes from here on: the reader takes the bytes at its pace.
                use std::os::fd::AsRawFd;
                // SAFETY: a valid descriptor of `f`; F_GETFL/F_SETFL only change its flags.
                unsafe {
                    let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
                }
                return Ok(Some(f));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if start.elapsed() >= FIFO_READER_WAIT {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("eplb-output-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_output_that_is_an_input_is_refused() {
        let d = dir("same");
        let input = d.join("load.json");
        std::fs::write(&input, "{}").unwrap();
        let link = d.join("link.json");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let hard = d.join("hard.json");
        std::fs::hard_link(&input, &hard).unwrap();
        for out in [&input, &link, &hard] {
            let e = check_outputs(&[Named::new("--output", out)], &[Named::new("--load", &input)]).unwrap_err();
            assert!(matches!(e, OutputError::SameAsInput { .. }) && e.exit_code() == 2, "{e}");
            assert!(e.to_string().contains("--load") && e.to_string().contains("destroy"), "{e}");
        }
        // Two outputs on one path, even before it exists.
        let new = d.join("new.json");
        let e = check_outputs(&[Named::new("--output", &new), Named::new("--sglang-output", &new)], &[]).unwrap_err();
        assert!(matches!(e, OutputError::SameAsInput { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&input).unwrap(), "{}");
        check_outputs(&[Named::new("--output", &new)], &[Named::new("--load", &input)]).unwrap();
        assert!(!new.exists(), "the check leaves nothing behind");
    }

    #[test]
    fn folders_and_unwritable_places_are_refused_before_any_work() {
        let d = dir("refuse");
        let e = check_outputs(&[Named::new("--report", &d)], &[]).unwrap_err();
        assert!(matches!(e, OutputError::IsDirectory { .. }) && e.exit_code() == 2, "{e}");
        let missing = d.join("no/such/folder/r.json");
        let e = check_outputs(&[Named::new("--report", &missing)], &[]).unwrap_err();
        assert!(matches!(e, OutputError::NotWritable { .. }) && e.exit_code() == 2, "{e}");
        // /proc refuses new files even to root.
        let e = check_outputs(&[Named::new("--report", Path::new("/proc/eplb-report.json"))], &[]).unwrap_err();
        assert!(matches!(e, OutputError::NotWritable { .. }), "{e}");
        let e = write_output("--report", &d, b"x").unwrap_err();
        assert!(matches!(e, OutputError::IsDirectory { .. }), "{e}");
    }

    #[test]
    fn symlinks_are_followed_and_kept_and_devices_written_into() {
        let d = dir("links");
        let target = d.join("target.json");
        std::fs::write(&target, "old").unwrap();
        let link = d.join("link.json");
        std::os::unix::fs::symlink("target.json", &link).unwrap();
        check_outputs(&[Named::new("--output", &link)], &[]).unwrap();
        write_output("--output", &link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        // A dangling link: its target is created.
        let dangling = d.join("dangling.json");
        std::os::unix::fs::symlink("created.json", &dangling).unwrap();
        write_output("--output", &dangling, b"made").unwrap();
        assert_eq!(std::fs::read_to_string(d.join("created.json")).unwrap(), "made");
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
        // /dev/null stays a character device.
        check_outputs(&[Named::new("--output", Path::new("/dev/null"))], &[]).unwrap();
        write_json("--output", Path::new("/dev/null"), &serde_json::json!({"a": 1})).unwrap();
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        // Permissions of a replaced file are kept; nothing is left beside it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_output("--output", &target, b"again").unwrap();
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o640);
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 4, "{left:?}");
    }

    #[test]
    fn a_status_report_says_running_then_ok_or_failed() {
        let d = dir("status");
        let path = d.join("report.json");
        std::fs::write(&path, r#"{"status": "ok", "steps": 100}"#).unwrap();
        let r = StatusReport::start("--report", &path, serde_json::json!({"world_size": 4})).unwrap();
        let read = || serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read(), serde_json::json!({"status": "running", "world_size": 4}), "the old success is gone");
        r.finish(serde_json::json!({"steps": 7, "error": null}), Some("rank 2 did not answer")).unwrap();
        let doc = read();
        assert_eq!((doc["status"].as_str(), doc["error"].as_str()), (Some("failed"), Some("rank 2 did not answer")));
        assert_eq!(doc["steps"], 7);
        r.finish(serde_json::json!({"steps": 9}), None).unwrap();
        assert_eq!(read()["status"], "ok");
        // /dev/null gets no "running" placeholder and stays a device.
        StatusReport::start("--report", Path::new("/dev/null"), serde_json::json!({})).unwrap();
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    }

    #[test]
    fn a_fifo_is_written_into_and_a_fifo_without_reader_does_not_block_the_check() {
        let d = dir("fifo");
        let fifo = d.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        check_outputs(&[Named::new("--report", &fifo)], &[]).unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
        };
        write_output("--report", &fifo, b"through the fifo").unwrap();
        assert_eq!(reader.join().unwrap(), "through the fifo");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO stays");
    }
}
