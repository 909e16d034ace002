//! Group commit: appends of concurrent callers written together.
//!
//! Requests that each create one aggregate under a fresh id (a goods order's
//! `OrderSubmitted`) cannot conflict with each other, yet each paid a
//! statement and a WAL flush of its own. A [`GroupCommit`] queues them and one
//! task appends whatever is queued in one statement ([`EventStore::append`])
//! while the previous statement runs, so under load a batch grows to the
//! number of callers waiting and costs one round trip and one commit.
//!
//! All or none within a batch is the store's rule, but callers are
//! independent: when a batch fails (one caller's aggregate exists already, a
//! broken connection), each caller's appends are tried again on their own and
//! each caller gets its own outcome. Nothing is acknowledged before its
//! statement committed.

use tokio::sync::{mpsc, oneshot};

use crate::{Append, EventStore, StoreError};

struct Job {
    appends: Vec<Append>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The queue in front of the store; cheap to clone. The writing task ends
/// when the last handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writer; a batch holds at most `max_callers` callers.
    pub fn start(store: EventStore, max_callers: usize) -> Self {
        let max_callers = max_callers.max(1);
        let (queue, jobs) = mpsc::channel(max_callers * 4);
        tokio::spawn(write(store, jobs, max_callers));
        Self { queue }
    }

    /// Appends with the next batch; returns once it is committed (or refused).
    pub async fn append(&self, appends: Vec<Append>) -> Result<(), StoreError> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Job { appends, done })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        outcome.await.map_err(|_| StoreError::WriterStopped)?
    }
}

async fn write(store: EventStore, mut jobs: mpsc::Receiver<Job>, max_callers: usize) {
    let mut batch = Vec::with_capacity(max_callers);
    while jobs.recv_many(&mut batch, max_callers).await > 0 {
        metrics::histogram!("group_commit_callers").record(batch.len() as f64);
        if let [job] = batch.as_slice() {
            let outcome = store.append(&job.appends).await;
            if let Some(job) = batch.pop() {
                let _ = job.done.send(outcome);
            }
            continue;
        }
        let all: Vec<Append> = batch.iter().flat_map(|job| job.appends.iter().cloned()).collect();
        match store.append(&all).await {
            Ok(()) => {
                for job in batch.drain(..) {
                    let _ = job.done.send(Ok(()));
                }
            }
            Err(error) => {
                tracing::debug!(%error, callers = batch.len(), "group commit refused; appending each caller on its own");
                for job in batch.drain(..) {
                    let outcome = store.append(&job.appends).await;
                    let _ = job.done.send(outcome);
                }
            }
        }
    }
}
