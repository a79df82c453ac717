//! What the kernel and end-to-end tests share: a frame builder and a harness
//! that loads the real XDP program and runs frames through it with
//! `BPF_PROG_TEST_RUN`.

pub mod checker;
pub mod cluster;
pub mod demo;
pub mod etcd;
pub mod harness;
pub mod http;
pub mod l7bed;
pub mod netns;
pub mod packet;
pub mod process;
pub mod scale;
pub mod testbed;
pub mod traffic;

/// Whether this process runs as root (the kernel and namespace tests need
/// it).
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `f` to completion on this thread's own runtime: the tests drive the
/// agent's async control loop from plain threads, as `sluice run` drives it
/// from its event loop.
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
    }
    RUNTIME.with(|rt| rt.block_on(f))
}
