//! The owner array, mapped into the agent's memory (`BPF_F_MMAPABLE`): a
//! group's owners are rewritten with plain atomic stores, which the data
//! path sees at once, instead of one syscall per unit.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;

use super::DatapathError;

pub(super) struct OwnerTable {
    /// Elements are 8 bytes apart (value size rounded up to 8).
    ptr: NonNull<u64>,
    len: usize,
    entries: u32,
}

// SAFETY: the mapping is owned by this value and only accessed through
// atomics.
unsafe impl Send for OwnerTable {}
// SAFETY: as above: shared access is only ever through atomics.
unsafe impl Sync for OwnerTable {}

/// An array map's elements are `value_size` rounded up to 8 bytes apart.
const OWNER_STRIDE: usize = size_of::<u64>();

impl OwnerTable {
    pub(super) fn map(data: &MapData, entries: u32) -> Result<Self, DatapathError> {
        let len = (entries as usize * OWNER_STRIDE).next_multiple_of(4096);
        // SAFETY: mapping a BPF_F_MMAPABLE array map of `entries` elements,
        // shared, for reading and writing; the length covers the elements.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Mmap {
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap succeeded"),
            len,
            entries,
        })
    }

    /// Element `index`: 8 bytes, 8-byte aligned, in the mapping.
    fn element(&self, index: u32) -> *mut u64 {
        assert!(
            index < self.entries,
            "owner index {index} out of {}",
            self.entries
        );
        // SAFETY: in bounds (checked).
        unsafe { self.ptr.as_ptr().add(index as usize) }
    }

    fn slot(&self, index: u32) -> &AtomicU32 {
        // SAFETY: an element's first 4 bytes are the u32 value; only
        // accessed atomically.
        unsafe { &*self.element(index).cast::<AtomicU32>() }
    }

    /// Stores a 64-bit element whole (`PREVIOUS`'s).
    pub(super) fn set_wide(&self, index: u32, value: u64) {
        // SAFETY: a whole element, only accessed atomically.
        unsafe { &*self.element(index).cast::<AtomicU64>() }.store(value, Ordering::Release);
    }

    pub(super) fn set(&self, index: u32, owner: u32) {
        self.slot(index).store(owner, Ordering::Release);
    }

    pub(super) fn get(&self, index: u32) -> u32 {
        self.slot(index).load(Ordering::Acquire)
    }
}

impl Drop for OwnerTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
