//! Waking the data-path workers from other threads: an `eventfd` every worker polls next to
//! its socket and TUN queue.
//!
//! # What it owns
//! One non-blocking `eventfd`. [`Wake::notify`] makes it readable (workers blocked in `ppoll`
//! return at once); a worker that sees it readable calls [`Wake::clear`] and looks for work
//! (held packets whose policy arrived). Several workers may wake for one notification; the one
//! that finds the work does it, the others find nothing.
//!
//! # Invariants
//! Never blocks: a notification when the counter is saturated is dropped (the fd is readable
//! anyway), a clear on an unreadable fd does nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The workers' wake-up fd.
#[derive(Debug)]
pub struct Wake {
    fd: OwnedFd,
}

impl Wake {
    /// A new, unsignalled eventfd.
    pub fn new() -> io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Wake { fd })
    }

    /// The descriptor (for `poll`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the fd readable.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which lives across the call. EAGAIN (counter
        // saturated) leaves the fd readable, which is all a notification needs.
        let _ = unsafe { libc::write(self.raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the fd to unreadable.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into `v`, which lives across the call. EAGAIN (nothing
        // signalled) is fine.
        let _ = unsafe { libc::read(self.raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(w: &Wake) -> bool {
        let mut fds = [libc::pollfd {
            fd: w.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        crate::udp::poll(&mut fds, std::time::Duration::ZERO).unwrap() == 1
    }

    #[test]
    fn notify_makes_it_readable_until_cleared() {
        let w = Wake::new().unwrap();
        assert!(!readable(&w));
        w.notify();
        w.notify();
        assert!(readable(&w));
        w.clear();
        assert!(!readable(&w));
        w.clear();
        assert!(!readable(&w));
    }
}
