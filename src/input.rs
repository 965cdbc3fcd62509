//! Input files that cannot hang or exhaust the process: [`read_regular`] reads a regular file
//! of at most a given size, and refuses anything else at once.
//!
//! A FIFO would block the `open(2)` (or the read) until a writer comes, forever; a character
//! device such as `/dev/zero` never ends; a folder is not a file. The open is non-blocking (a
//! FIFO's open returns at once), the type comes from `fstat(2)` of the very file opened (no race
//! between a check and the open), and the read stops one byte past the bound.

use std::fs::OpenOptions;
use std::io::{Error, ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest load trace (`plan --load`, `run --trace`, `simulate --trace`): 4 GiB. A trace is
/// read whole into memory and parsed; a larger one is better cut first.
pub(crate) const MAX_TRACE_BYTES: u64 = 4 << 30;

/// Largest JSON document read whole (a placement file, a report for `plot`): 1 GiB.
pub(crate) const MAX_JSON_BYTES: u64 = 1 << 30;

/// What a file type is called in a message.
fn kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// The whole of the regular file at `path` (symlinks followed), at most `max_bytes` of it.
/// Anything else (a FIFO, a device, a socket, a folder) or a larger file is an error of kind
/// `InvalidInput` that says what the path is and what to give instead, without reading it.
pub(crate) fn read_regular(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    let meta = file.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} (give a regular file: it is not read from a pipe or device)", kind(&t)),
        ));
    }
    if meta.len() > max_bytes {
        return Err(too_large(meta.len(), max_bytes));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64, max_bytes));
    }
    Ok(bytes)
}

fn too_large(len: u64, max: u64) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "{} is larger than the {} this input may have (cut it first)",
            crate::limits::human(len as u128),
            crate::limits::human(max as u128)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("eplb-input-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_fifo_a_device_and_a_folder_are_refused_at_once() {
        let d = dir("special");
        let fifo = d.join("f.json");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without a writer, a blocking open would never return.
        let e = read_regular(&fifo, 100).unwrap_err();
        assert!(e.kind() == ErrorKind::InvalidInput && e.to_string().contains("a FIFO"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let e = read_regular(&d, 100).unwrap_err();
        assert!(e.to_string().contains("a folder"), "{e}");
    }

    #[test]
    fn a_file_over_the_bound_is_refused_and_one_at_it_is_read() {
        let d = dir("size");
        let f = d.join("x");
        std::fs::write(&f, [7u8; 10]).unwrap();
        assert_eq!(read_regular(&f, 10).unwrap(), vec![7u8; 10]);
        let e = read_regular(&f, 9).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
