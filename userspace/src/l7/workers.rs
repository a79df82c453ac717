//! The distributor's threads: one single-threaded runtime a CPU, each with
//! its own listening sockets on every endpoint (`SO_REUSEPORT`: the kernel
//! spreads connections over them) and its own pools. A request is served
//! start to end on one thread: no work stealing, no cross-thread wakeups
//! between a client connection and its instance's.

use std::{cell::Cell, io, sync::mpsc};

use tokio::{runtime::Handle, sync::oneshot};

thread_local! {
    /// Index of the worker this thread is (0 off the workers).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker the calling thread is.
pub(super) fn current() -> usize {
    WORKER.with(Cell::get)
}

pub(super) struct Workers {
    handles: Vec<Handle>,
    /// Dropped, each ends its worker (its runtime and tasks go with it).
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// One worker a CPU this process may run on.
    pub(super) fn start() -> io::Result<Self> {
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for k in 0..n {
            let (handle_tx, handle_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("sluice-l7-{k}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    WORKER.with(|w| w.set(k));
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            handles.push(
                handle_rx
                    .recv()
                    .map_err(|_| io::Error::other("an L7 worker thread died at start"))??,
            );
            stops.push(stop_tx);
        }
        Ok(Self {
            handles,
            _stops: stops,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.handles.len()
    }

    pub(super) fn handle(&self, k: usize) -> &Handle {
        &self.handles[k]
    }
}
