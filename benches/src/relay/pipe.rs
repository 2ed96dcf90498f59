//! The pipe a splicing relay moves one direction's bytes through: socket → pipe → socket,
//! page references rather than copies.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::unistd::pipe2;

/// Capacity asked for. The default is 64 KiB (16 pages), a few round trips per 256 KiB read of
/// the buffered relays; 1 MiB is the default `fs.pipe-max-size`.
const WANT: i32 = 1 << 20;

pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe holds when full (as set, or the default when the size was refused).
    pub(crate) capacity: usize,
}

impl Pipe {
    /// A pipe of up to [`WANT`] bytes. A refused resize is not an error: an unprivileged user
    /// past `fs.pipe-user-pages-soft` (64 MiB of pipes in all) gets EPERM, and above
    /// `fs.pipe-max-size` it is EPERM too; the pipe then keeps its size.
    pub(crate) fn new(nonblocking: bool) -> io::Result<Pipe> {
        let mut flags = OFlag::O_CLOEXEC;
        if nonblocking {
            flags |= OFlag::O_NONBLOCK;
        }
        let (read, write) = pipe2(flags).map_err(io::Error::from)?;
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(WANT)) {
            Ok(size) => size,
            Err(_) => fcntl(&write, FcntlArg::F_GETPIPE_SZ).map_err(io::Error::from)?,
        };
        Ok(Pipe {
            read,
            write,
            capacity: capacity as usize,
        })
    }

    pub(crate) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub(crate) fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Moves what `from` has (up to the pipe's capacity) into the pipe without blocking.
    ///
    /// Call it only on an empty pipe: EAGAIN then means `from` has nothing to read. On a pipe
    /// holding data it could also mean "pipe full", and treating that as "socket drained" would
    /// clear the socket's readiness and stall the direction.
    pub(crate) fn fill_from(&self, from: impl AsFd) -> io::Result<usize> {
        splice(
            from,
            None,
            &self.write,
            None,
            self.capacity,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
        .map_err(io::Error::from)
    }

    /// Moves up to `len` bytes (no more than the pipe holds) from the pipe into `to` without
    /// blocking; EAGAIN means `to` is full.
    pub(crate) fn drain_to(&self, to: impl AsFd, len: usize) -> io::Result<usize> {
        splice(
            &self.read,
            None,
            to,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
        .map_err(io::Error::from)
    }
}
