//! A global allocator that keeps hostile length prefixes from aborting the process.
//!
//! `kafka-protocol` 0.18 sizes `Vec::with_capacity` from array counts read off the wire before it
//! checks that the elements exist (upstream PRs kafka-protocol-rs#152 and #200 are open). An 8-byte
//! Metadata request claiming 2^31 topics asks for well over this machine's memory; the system
//! allocator refuses and Rust aborts. No legitimate allocation in Sluice comes near
//! [`HUGE_BYTES`] (requests are capped at `socket.request.max.bytes`), so reservations above it are
//! served from a lazily-backed, non-reserving anonymous mapping instead: the decoder then fails
//! cleanly on the missing bytes and the mapping is returned untouched. Remove this once the
//! upstream fix ships.

use std::alloc::{GlobalAlloc, Layout, System};

/// Reservations at or above this size take the mmap path.
pub const HUGE_BYTES: usize = 1 << 30;

pub struct GuardedAlloc;

/// Tests only: the largest single allocation the current thread asked for since [`track::reset`],
/// so fuzz targets can compare what a decoder reserves with the bytes it was given. A
/// const-initialised `Cell` needs no allocation and no destructor, so the allocator may use it.
#[cfg(test)]
pub mod track {
    use std::cell::Cell;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    pub fn reset() {
        let _ = LARGEST.try_with(|c| c.set(0));
    }

    pub fn largest() -> usize {
        LARGEST.try_with(Cell::get).unwrap_or(0)
    }

    pub(super) fn note(size: usize) {
        let _ = LARGEST.try_with(|c| {
            if size > c.get() {
                c.set(size)
            }
        });
    }
}

fn page_aligned(layout: &Layout) -> bool {
    layout.align() <= 4096
}

unsafe fn map(size: usize) -> *mut u8 {
    // SAFETY: anonymous private mapping; no file descriptor, result checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p as *mut u8
    }
}

unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(test)]
        track::note(layout.size());
        if layout.size() >= HUGE_BYTES && page_aligned(&layout) {
            return unsafe { map(layout.size()) };
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(test)]
        track::note(layout.size());
        if layout.size() >= HUGE_BYTES && page_aligned(&layout) {
            // Fresh anonymous pages are already zero.
            return unsafe { map(layout.size()) };
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= HUGE_BYTES && page_aligned(&layout) {
            // SAFETY: ptr came from `map` with exactly this size.
            unsafe { libc::munmap(ptr as *mut libc::c_void, layout.size()) };
            return;
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_huge = layout.size() >= HUGE_BYTES && page_aligned(&layout);
        let new_huge = new_size >= HUGE_BYTES && page_aligned(&layout);
        if !old_huge && !new_huge {
            #[cfg(test)]
            track::note(new_size);
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: same alignment, new size non-zero (GlobalAlloc contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new_ptr = unsafe { self.alloc(new_layout) };
        if !new_ptr.is_null() {
            let n = layout.size().min(new_size);
            unsafe { std::ptr::copy_nonoverlapping(ptr, new_ptr, n) };
            unsafe { self.dealloc(ptr, layout) };
        }
        new_ptr
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{ApiKey, RequestKind};

    /// The 8-byte frame from kafka-protocol-rs#152: Metadata v0 claiming 54 million topics.
    #[test]
    fn hostile_array_count_is_a_decode_error_not_an_abort() {
        for count in [0x033c_0c00u32, 0x7fff_ffff] {
            let mut body = Bytes::from(count.to_be_bytes().to_vec());
            let r = RequestKind::decode(ApiKey::Metadata, &mut body, 0);
            assert!(r.is_err(), "count {count:#x} decoded");
        }
        // Compact (flexible) arrays: unsigned varint count near u32::MAX.
        let mut body = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]);
        assert!(RequestKind::decode(ApiKey::Metadata, &mut body, 9).is_err());
    }
}
