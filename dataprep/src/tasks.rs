//! Background tasks on the rayon pool that the whole dataprep run executes on.
//!
//! The pipeline's loop runs on one of the pool's threads and hands work to the others as
//! tasks: documents to tokenise while it reads on, row groups to encode while it generates
//! on. When it needs a task's result it runs pending tasks itself rather than block, so with
//! `--threads 1` everything happens, in order, on that one thread. [`InOrder`] holds each
//! kind of work's tasks, a bounded number at a time, and gives their results back in the
//! order they were handed out.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;

use anyhow::{Result, anyhow};

/// The result of a spawned task, once it is done.
pub(crate) type Task<T> = mpsc::Receiver<Result<T>>;

/// Runs `work` on the current rayon pool. A panic in it becomes an error (in a spawned task
/// it would abort the process).
pub(crate) fn spawn<T, F>(work: F) -> Task<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let (done, result) = mpsc::sync_channel(1);
    rayon::spawn(move || {
        let outcome = panic::catch_unwind(AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(anyhow!("internal error: a dataprep task panicked")));
        // The receiver is gone only when its owner was dropped after an error.
        let _ = done.send(outcome);
    });
    result
}

/// Waits for a task spawned by this thread, running pending tasks meanwhile.
///
/// Only the loop's thread spawns, and rayon puts what a pool thread spawns on that thread's
/// own queue, which `yield_now` searches first. So when there is nothing left to run, the
/// task awaited is running on another thread, and blocking until it ends loses nothing.
pub(crate) fn wait<T>(task: &Task<T>) -> Result<T> {
    let stopped = || anyhow!("internal error: a dataprep task stopped");
    loop {
        match task.try_recv() {
            Ok(result) => return result,
            Err(mpsc::TryRecvError::Disconnected) => return Err(stopped()),
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            return task.recv().map_err(|_| stopped())?;
        }
    }
}

/// How many tasks the loop keeps pending at most: two per thread keeps every thread busy
/// while bounding the memory the pending tasks hold.
pub(crate) fn max_pending() -> usize {
    2 * rayon::current_num_threads()
}

/// Tasks whose results are taken in the order they were spawned, at most [`max_pending`] at
/// a time. The loop uses one per kind of work it hands out (documents to tokenise, row
/// groups to encode), and handles each result itself, in order.
pub(crate) struct InOrder<T> {
    pending: VecDeque<Task<T>>,
}

impl<T: Send + 'static> InOrder<T> {
    pub(crate) fn new() -> InOrder<T> {
        InOrder {
            pending: VecDeque::new(),
        }
    }

    /// While the queue is full: waits for the oldest task and returns its result, for the
    /// caller to handle before asking again. `None` once there is room for [`Self::spawn`].
    pub(crate) fn make_room(&mut self) -> Result<Option<T>> {
        if self.pending.len() < max_pending() {
            return Ok(None);
        }
        self.oldest()
    }

    /// Runs `work` on the pool; call [`Self::make_room`] until it returns `None` first.
    pub(crate) fn spawn<F>(&mut self, work: F)
    where
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        debug_assert!(self.pending.len() < max_pending(), "spawn without room");
        self.pending.push_back(spawn(work));
    }

    /// Waits for the oldest task and returns its result; `None` when none is pending.
    pub(crate) fn oldest(&mut self) -> Result<Option<T>> {
        match self.pending.pop_front() {
            Some(task) => wait(&task).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs `f` on a pool of `threads` threads, failing instead of hanging on a deadlock.
    fn on_pool<T: Send + 'static>(threads: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let _ = done.send(pool.install(f));
        });
        result
            .recv_timeout(Duration::from_secs(60))
            .expect("the tasks did not finish: deadlock")
    }

    #[test]
    fn one_thread_runs_every_task_itself_and_results_come_back_in_order() {
        let results = on_pool(1, || {
            let me = std::thread::current().id();
            let tasks: Vec<Task<(usize, bool)>> = (0..6)
                .map(|i| spawn(move || Ok((i, std::thread::current().id() == me))))
                .collect();
            tasks.iter().map(|t| wait(t).unwrap()).collect::<Vec<_>>()
        });
        assert_eq!(results, (0..6).map(|i| (i, true)).collect::<Vec<_>>());
    }

    #[test]
    fn in_order_bounds_the_pending_tasks_and_returns_results_in_spawn_order() {
        let (results, most_pending) = on_pool(2, || {
            let mut queue = InOrder::new();
            let (mut results, mut most_pending) = (Vec::new(), 0);
            for i in 0..20u64 {
                while let Some(r) = queue.make_room().unwrap() {
                    results.push(r);
                }
                // Later tasks are quicker, so they would finish first if order were lost.
                queue.spawn(move || {
                    std::thread::sleep(Duration::from_millis(20 - i));
                    Ok(i)
                });
                most_pending = most_pending.max(queue.pending.len());
            }
            while let Some(r) = queue.oldest().unwrap() {
                results.push(r);
            }
            (results, most_pending)
        });
        assert_eq!(results, (0..20).collect::<Vec<_>>());
        assert_eq!(
            most_pending, 4,
            "two threads keep at most four tasks pending"
        );
    }

    #[test]
    fn a_failing_or_panicking_task_is_an_error_not_an_abort() {
        let (failed, panicked) = on_pool(2, || {
            let failed = wait(&spawn(|| -> Result<()> { Err(anyhow!("bad row")) }));
            let panicked = wait(&spawn(|| -> Result<()> { panic!("bug") }));
            (
                failed.unwrap_err().to_string(),
                panicked.unwrap_err().to_string(),
            )
        });
        assert_eq!(failed, "bad row");
        assert!(panicked.contains("panicked"), "{panicked}");
    }
}
