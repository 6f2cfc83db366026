//! The `mailroom` binary's global allocator: [`System`] for everything,
//! except blocks of [`HUGE`] bytes or more, which are mapped straight from
//! the kernel with `MAP_NORESERVE`.
//!
//! Why: tiny_http discards an unread request body by allocating a zeroed
//! buffer as large as the rest of the body the client *declared*
//! (`vec![0; remaining]`). A request declaring `Content-Length:
//! 50000000000` makes that a 50 GB allocation, which the default allocator
//! refuses, and Rust aborts the whole process. A `MAP_NORESERVE` mapping
//! of any size that fits the address space succeeds without committing
//! memory: only the pages actually written (here: the few kilobytes the
//! socket still holds) ever use RAM, and the mapping is returned to the
//! kernel when the buffer is dropped. The HTTP layer bounds how large and
//! how many such drains can happen at once (see `http.rs`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Allocations of at least this many bytes are mapped directly.
pub const HUGE: usize = 1 << 30;

/// Mappings are page aligned; larger alignments go to [`System`].
const PAGE: usize = 4096;

static IN_USE: AtomicBool = AtomicBool::new(false);

/// See the module documentation. Install with
/// `#[global_allocator] static A: HugeAllocator = HugeAllocator;`.
pub struct HugeAllocator;

/// True once [`HugeAllocator`] has served an allocation, i.e. it is the
/// program's global allocator (a program allocates before `main`).
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Relaxed)
}

fn is_huge(layout: &Layout) -> bool {
    layout.size() >= HUGE && layout.align() <= PAGE
}

fn note_use() {
    // Load first: a store on every allocation would bounce the cache line between cores.
    if !IN_USE.load(Ordering::Relaxed) {
        IN_USE.store(true, Ordering::Relaxed);
    }
}

/// Maps `size` zeroed, readable and writable bytes, or returns null.
fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory; the result is checked.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        address.cast()
    }
}

// SAFETY: every block is either from `System` or from `map`, chosen by
// `is_huge(layout)` alone; `GlobalAlloc` guarantees that `dealloc` and
// `realloc` receive the layout the block was allocated with, so each block
// is always returned to the allocator that made it. Mapped blocks are page
// aligned (>= any alignment `is_huge` accepts), zeroed and `size` long.
unsafe impl GlobalAlloc for HugeAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_use();
        if is_huge(&layout) {
            map(layout.size())
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_use();
        if is_huge(&layout) {
            map(layout.size())
        } else {
            System.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_huge(&layout) {
            libc::munmap(ptr.cast(), layout.size());
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The caller guarantees new_size, rounded up to the alignment, does not overflow isize.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        if !is_huge(&layout) && !is_huge(&new_layout) {
            return System.realloc(ptr, layout, new_size);
        }
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifty_gigabytes_zeroed_cost_only_what_is_touched() {
        let layout = Layout::from_size_align(50_000_000_000, 1).unwrap();
        unsafe {
            let block = HugeAllocator.alloc_zeroed(layout);
            assert!(!block.is_null());
            assert_eq!(*block, 0);
            assert_eq!(*block.add(layout.size() - 1), 0);
            *block.add(12_345) = 7;
            assert_eq!(*block.add(12_345), 7);
            HugeAllocator.dealloc(block, layout);
        }
    }

    #[test]
    fn realloc_crosses_the_threshold_both_ways_keeping_the_bytes() {
        unsafe {
            let small = Layout::from_size_align(16, 8).unwrap();
            let block = HugeAllocator.alloc(small);
            for index in 0..16 {
                *block.add(index) = index as u8;
            }
            let grown = HugeAllocator.realloc(block, small, HUGE + 1);
            assert!(!grown.is_null());
            assert_eq!(*grown.add(15), 15);
            let big = Layout::from_size_align(HUGE + 1, 8).unwrap();
            let shrunk = HugeAllocator.realloc(grown, big, 8);
            assert_eq!(*shrunk.add(7), 7);
            HugeAllocator.dealloc(shrunk, Layout::from_size_align(8, 8).unwrap());
        }
    }

    #[test]
    fn large_alignment_goes_to_the_system_allocator() {
        let layout = Layout::from_size_align(HUGE, 1 << 16).unwrap();
        assert!(!is_huge(&layout));
    }
}
