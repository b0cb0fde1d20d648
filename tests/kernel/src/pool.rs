//! The page pool behind `Platform::alloc_pages`: a static, identity-mapped region handed out in
//! contiguous runs (first fit over a bitmap), with a count of pages in use so scenario 5 can
//! prove that devirtualizing gives every page back.
//!
//! **Runs in:** PASSIVE (any CPU; one lock).

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Pages in the pool (4 MiB).
pub const POOL_PAGES: usize = 1024;
const PAGE: usize = 4096;

#[repr(C, align(4096))]
struct Region(UnsafeCell<[u8; POOL_PAGES * PAGE]>);

struct Pool {
    lock: AtomicBool,
    used: UnsafeCell<[bool; POOL_PAGES]>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

// SAFETY: `used` is only touched under `lock`; the region's pages belong to whoever allocated
// them.
unsafe impl Sync for Pool {}
// SAFETY: as above.
unsafe impl Sync for Region {}

static REGION: Region = Region(UnsafeCell::new([0; POOL_PAGES * PAGE]));
static POOL: Pool = Pool {
    lock: AtomicBool::new(false),
    used: UnsafeCell::new([false; POOL_PAGES]),
    in_use: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
};

fn with_lock<R>(f: impl FnOnce(&mut [bool; POOL_PAGES]) -> R) -> R {
    while POOL
        .lock
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: the lock is held.
    let r = f(unsafe { &mut *POOL.used.get() });
    POOL.lock.store(false, Ordering::Release);
    r
}

/// `count` zeroed contiguous pages, or `None`.
pub fn alloc(count: usize) -> Option<NonNull<u8>> {
    if count == 0 || count > POOL_PAGES {
        return None;
    }
    let first = with_lock(|used| {
        let mut run = 0;
        for i in 0..POOL_PAGES {
            run = if used[i] { 0 } else { run + 1 };
            if run == count {
                let first = i + 1 - count;
                used[first..=i].iter_mut().for_each(|u| *u = true);
                return Some(first);
            }
        }
        None
    })?;
    let n = POOL.in_use.fetch_add(count, Ordering::Relaxed) + count;
    POOL.peak.fetch_max(n, Ordering::Relaxed);
    let p = (REGION.0.get() as *mut u8).wrapping_add(first * PAGE);
    // SAFETY: the run [first, first+count) is ours now and lies inside REGION.
    unsafe { core::ptr::write_bytes(p, 0, count * PAGE) };
    NonNull::new(p)
}

/// Returns pages from [`alloc`].
pub fn free(ptr: NonNull<u8>, count: usize) {
    let base = REGION.0.get() as usize;
    let offset = (ptr.as_ptr() as usize).wrapping_sub(base);
    if !offset.is_multiple_of(PAGE) || offset / PAGE + count > POOL_PAGES {
        crate::kprintln!(
            "pool: free of foreign pointer {:p} ({count} pages) ignored",
            ptr
        );
        return;
    }
    let first = offset / PAGE;
    let freed = with_lock(|used| {
        let mut n = 0;
        for u in &mut used[first..first + count] {
            n += usize::from(*u);
            *u = false;
        }
        n
    });
    if freed != count {
        crate::kprintln!(
            "pool: double free at {:p}: {} of {count} pages were in use",
            ptr,
            freed
        );
    }
    POOL.in_use.fetch_sub(freed, Ordering::Relaxed);
}

/// Pages allocated now.
pub fn in_use() -> usize {
    POOL.in_use.load(Ordering::Relaxed)
}

/// Most pages ever allocated at once.
pub fn peak() -> usize {
    POOL.peak.load(Ordering::Relaxed)
}
