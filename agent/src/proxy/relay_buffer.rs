//! The buffer of one direction of a relay, held only while it has bytes a
//! write could not take.
//!
//! Each read goes into its thread's scratch buffer and is written on at
//! once, in the same poll: only what the writer could not take is copied to
//! the connection, and kept until written. So an open connection waiting
//! for its next request or response holds no buffer. (Each direction used
//! to keep the 16 KiB it allocated at its first read for the connection's
//! life: 32 KiB per relayed connection, the largest part of what an open
//! connection cost.) Reads are as large as before: 16 KiB, doubled while
//! they fill it (bulk transfers), up to 256 KiB.

use std::cell::RefCell;
use std::io;
use std::task::{ready, Poll};

const FIRST_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

thread_local! {
    /// Borrowed only for one read and the write that follows it, with no
    /// await between: nothing else on the thread can run meanwhile. Its
    /// pages are touched only as far as reads fill it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_READ].into_boxed_slice());
}

/// See the module documentation.
#[derive(Default)]
pub(super) struct RelayBuffer {
    /// Read and not yet written.
    unwritten: Vec<u8>,
    /// How much the next read may take (0: [`FIRST_READ`]).
    read_size: usize,
}

impl RelayBuffer {
    /// Reads once with `read` and passes what came to `write` at once;
    /// keeps what it did not take (a `WouldBlock` takes nothing) for
    /// [`Self::unwritten`]. How many bytes were read (0: the end of the
    /// stream); `Pending` if `read` is.
    pub(super) fn relay_once(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> Poll<io::Result<usize>>,
        write: impl FnOnce(&[u8]) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        debug_assert!(
            self.unwritten.is_empty(),
            "a read before the last was written"
        );
        let size = self.read_size.max(FIRST_READ);
        SCRATCH.with_borrow_mut(|scratch| {
            let n = ready!(read(&mut scratch[..size]))?;
            // Grown while reads fill it, back to the first size once one
            // takes less than half.
            self.read_size = match n {
                _ if n == size => (size * 2).min(MAX_READ),
                _ if n < size / 2 => FIRST_READ,
                _ => size,
            };
            if n > 0 {
                let taken = match write(&scratch[..n]) {
                    Ok(taken) => taken,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Poll::Ready(Err(e)),
                };
                self.unwritten.extend_from_slice(&scratch[taken..n]);
            }
            Poll::Ready(Ok(n))
        })
    }

    /// What the last read left for a write to wait for (empty: nothing).
    pub(super) fn unwritten(&self) -> &[u8] {
        &self.unwritten
    }

    /// [`Self::unwritten`] was written: its memory is let go, unless reads
    /// fill their buffer (a bulk transfer, whose next partial write needs
    /// as much again).
    pub(super) fn written(&mut self) {
        self.unwritten.clear();
        if self.read_size <= FIRST_READ {
            self.unwritten = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_of(bytes: &[u8]) -> impl FnOnce(&mut [u8]) -> Poll<io::Result<usize>> + '_ {
        |space| {
            let n = bytes.len().min(space.len());
            space[..n].copy_from_slice(&bytes[..n]);
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn what_a_write_takes_at_once_is_never_kept() {
        let mut buf = RelayBuffer::default();
        let mut out = Vec::new();
        let n = buf.relay_once(read_of(b"request"), |d| {
            out.extend_from_slice(d);
            Ok(d.len())
        });
        assert!(matches!(n, Poll::Ready(Ok(7))));
        assert_eq!(out, b"request");
        assert!(buf.unwritten().is_empty());
        assert_eq!(buf.unwritten.capacity(), 0);
    }

    #[test]
    fn what_a_write_leaves_is_kept_until_written() {
        let mut buf = RelayBuffer::default();
        let n = buf.relay_once(read_of(b"response"), |_| Ok(3));
        assert!(matches!(n, Poll::Ready(Ok(8))));
        assert_eq!(buf.unwritten(), b"ponse");
        buf.written();
        assert_eq!(buf.unwritten.capacity(), 0);
        let blocked = buf.relay_once(read_of(b"more"), |_| Err(io::ErrorKind::WouldBlock.into()));
        assert!(matches!(blocked, Poll::Ready(Ok(4))));
        assert_eq!(buf.unwritten(), b"more");
    }

    #[test]
    fn reads_grow_while_they_fill_the_buffer_and_shrink_after() {
        let bulk = vec![7u8; MAX_READ];
        let mut buf = RelayBuffer::default();
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let n = buf.relay_once(read_of(&bulk), |d| Ok(d.len()));
            let Poll::Ready(Ok(n)) = n else { panic!() };
            sizes.push(n / 1024);
        }
        assert_eq!(sizes, [16, 32, 64, 128, 256, 256]);
        // A bulk transfer keeps what it needs for its partial writes.
        let _ = buf.relay_once(read_of(&bulk), |_| Ok(0));
        buf.written();
        assert!(buf.unwritten.capacity() >= MAX_READ);
        // Request sized again: nothing kept.
        let _ = buf.relay_once(read_of(b"small"), |_| Ok(0));
        buf.written();
        assert_eq!(buf.unwritten.capacity(), 0);
    }

    #[test]
    fn a_pending_read_reads_nothing() {
        let mut buf = RelayBuffer::default();
        let pending = buf.relay_once(|_| Poll::Pending, |_| unreachable!());
        assert!(pending.is_pending());
        assert!(buf.unwritten().is_empty());
    }
}
