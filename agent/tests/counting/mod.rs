//! A global allocator that counts the live bytes of glibc's malloc (each
//! block's usable size and its header, which is what RSS pays, not the size
//! asked), for the memory tests. The counter is per thread (what a thread
//! allocated minus what it freed), so tests side by side do not count each
//! other's allocations; a test measures what it builds on its own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting the bytes of the blocks it has handed out
/// and not had back.
struct Counting;

thread_local! {
    /// Constant-initialised and without a destructor: reading it never
    /// allocates, as the allocator must not.
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    LIVE_BYTES.with(|live| live.set(live.get() + bytes));
}

/// glibc's chunk header in front of every block.
const MALLOC_HEADER: usize = 8;

/// What the block at `ptr` takes from the heap.
///
/// # Safety
/// `ptr` must be a live block of glibc's malloc (as `System` hands out).
unsafe fn footprint(ptr: *mut u8) -> isize {
    // SAFETY: guaranteed by the caller.
    let usable = unsafe { libc::malloc_usable_size(ptr.cast()) };
    (usable + MALLOC_HEADER) as isize
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counter only reads the size of live blocks.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's `layout` contract is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            // SAFETY: `p` was just allocated by `System`.
            count(unsafe { footprint(p) });
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is live and was allocated by `System` with `layout`.
        count(-unsafe { footprint(ptr) });
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is live and was allocated by `System` with `layout`.
        let old = unsafe { footprint(ptr) };
        // SAFETY: as above; `new_size` is checked by the caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // SAFETY: `p` was just (re)allocated by `System`.
            count(unsafe { footprint(p) } - old);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes held right now by what this thread allocated.
pub fn live_bytes() -> isize {
    LIVE_BYTES.with(Cell::get)
}
