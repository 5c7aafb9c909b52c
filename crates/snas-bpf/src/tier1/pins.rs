//! The bpffs side of a node: mounting bpffs and removing a node's pins.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use super::Tier1Error;

/// Removes every pin in `dir` and the directory itself.
pub fn remove_pins(dir: &Path) -> Result<(), Tier1Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Tier1Error::PinDir {
                path: dir.into(),
                source,
            })
        }
    };
    for e in entries.flatten() {
        fs::remove_file(e.path()).map_err(|source| Tier1Error::PinDir {
            path: e.path(),
            source,
        })?;
    }
    fs::remove_dir(dir).map_err(|source| Tier1Error::PinDir {
        path: dir.into(),
        source,
    })
}

/// Mounts bpffs on `/sys/fs/bpf` if nothing is mounted there (needs root). Returns whether it
/// mounted.
pub fn ensure_bpffs() -> Result<bool, Tier1Error> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let path = c"/sys/fs/bpf";
    let mut st = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: path is a valid C string and st points to writable memory of the right size.
    let rc = unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc == 0 {
        // SAFETY: statfs succeeded and initialised st.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)]
        if st.f_type as i64 == BPF_FS_MAGIC {
            return Ok(false);
        }
    }
    // SAFETY: all pointers are valid C strings; data is null, allowed for bpffs.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Tier1Error::PinDir {
            path: PathBuf::from("/sys/fs/bpf"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(true)
}
