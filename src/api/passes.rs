//! Reconcile pass results as the daemon's `on_pass` publishes them, for `/readyz`, the
//! metrics, and the handlers that must wait for "a pass that started after my edit".
//! It only records and waits; it never runs a pass itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::daemon::Poke;
use crate::reconcile::{Problem, ProblemKind, Report};
use crate::tenants::TenantId;

/// A pass whose start is estimated (end minus its reported duration, in whole milliseconds)
/// counts as after an edit only with this much room, for the rounding and for the moment
/// between the pass's end and its publication.
const ESTIMATE_MARGIN: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The pass ran; `errors` lists its problems (empty = in sync).
    Done {
        errors: Vec<Problem>,
        held_back: Vec<TenantId>,
        reloaded: bool,
        duration: Duration,
    },
    /// The pass could not run (e.g. the tenants file is invalid); nothing was changed.
    Failed(Problem),
}

#[derive(Debug, Clone)]
pub struct PassRecord {
    /// 1 for the first pass since the agent started.
    pub seq: u64,
    /// When the previous pass was published (or the API started): no part of this pass ran
    /// before it, because the daemon runs one pass at a time and publishes each at its end.
    pub started_after: Instant,
    /// The pass's start as its duration says (`None` for a failed pass).
    pub started_estimate: Option<Instant>,
    pub finished: Instant,
    /// Seconds since the Unix epoch at `finished`.
    pub finished_unix: f64,
    pub outcome: Outcome,
}

impl PassRecord {
    /// Whether this pass certainly started after `t`, and so read the tenants file as it was
    /// at `t` or later.
    pub fn started_after(&self, t: Instant) -> bool {
        self.started_after >= t
            || self
                .started_estimate
                .is_some_and(|s| s.checked_sub(ESTIMATE_MARGIN).is_some_and(|s| s >= t))
    }

    /// Ran, and found nothing wrong.
    pub fn ok(&self) -> bool {
        matches!(&self.outcome, Outcome::Done { errors, .. } if errors.is_empty())
    }

    /// The problems of this pass, one line each.
    pub fn problems(&self) -> Vec<String> {
        match &self.outcome {
            Outcome::Done { errors, .. } => errors.iter().map(|e| e.to_string()).collect(),
            Outcome::Failed(e) => vec![e.to_string()],
        }
    }
}

/// Why a wait for a pass ended without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    Timeout,
    ShuttingDown,
}

/// The latest pass, shared between the daemon (writer) and the API (readers).
#[derive(Debug)]
pub struct PassLog {
    tx: watch::Sender<Option<Arc<PassRecord>>>,
    /// (passes so far, when the last was published)
    last: Mutex<(u64, Instant)>,
}

impl Default for PassLog {
    fn default() -> Self {
        PassLog::new()
    }
}

impl PassLog {
    pub fn new() -> PassLog {
        PassLog {
            tx: watch::channel(None).0,
            last: Mutex::new((0, Instant::now())),
        }
    }

    /// Records a finished pass (the daemon's `on_pass`); returns the record.
    pub fn publish(&self, result: &anyhow::Result<Report>) -> Arc<PassRecord> {
        let finished = Instant::now();
        let finished_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let outcome = match result {
            Ok(r) => Outcome::Done {
                errors: r.errors.clone(),
                held_back: r.held_back.clone(),
                reloaded: r.reloaded,
                duration: Duration::from_millis(r.duration_ms),
            },
            Err(e) => Outcome::Failed(Problem::new(
                ProblemKind::of_failed_pass(e),
                format!("{e:#}"),
            )),
        };
        let started_estimate = match &outcome {
            Outcome::Done { duration, .. } => finished.checked_sub(*duration),
            Outcome::Failed(_) => None,
        };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let record = Arc::new(PassRecord {
            seq: last.0 + 1,
            started_after: last.1,
            started_estimate,
            finished,
            finished_unix,
            outcome,
        });
        *last = (record.seq, finished);
        self.tx.send_replace(Some(Arc::clone(&record)));
        record
    }

    /// The latest pass, if any has finished.
    pub fn latest(&self) -> Option<Arc<PassRecord>> {
        self.tx.borrow().clone()
    }

    /// Pokes the reconciler and waits for a pass that started after `edit` to finish. A pass
    /// that ends without qualifying may have swallowed the poke (coalescing), so each one is
    /// answered with a new poke.
    pub async fn wait_for_pass_after(
        &self,
        edit: Instant,
        pokes: &mpsc::Sender<Poke>,
        timeout: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Arc<PassRecord>, WaitError> {
        let mut rx = self.tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let poke = || {
            // A full channel already holds pokes that will start a pass.
            let _ = pokes.try_send(Poke::Api);
        };
        poke();
        loop {
            if let Some(p) = rx.borrow_and_update().clone() {
                if p.started_after(edit) {
                    return Ok(p);
                }
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(WaitError::ShuttingDown);
                    }
                    let qualifies = rx.borrow().as_ref().is_some_and(|p| p.started_after(edit));
                    if !qualifies {
                        poke();
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Err(WaitError::Timeout),
                _ = super::stopped(&mut stop) => return Err(WaitError::ShuttingDown),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ms: u64) -> anyhow::Result<Report> {
        Ok(Report {
            duration_ms: ms,
            ..Report::default()
        })
    }

    #[test]
    fn a_pass_counts_only_when_it_certainly_started_after_the_edit() {
        let log = PassLog::new();
        std::thread::sleep(Duration::from_millis(5));
        let edit = Instant::now();
        // Ran for 10 s, so it started long before the edit, and the one before it was
        // published before the edit too.
        let first = log.publish(&report(10_000));
        assert!(!first.started_after(edit));
        // The next one started after `first` was published, which was after the edit.
        let second = log.publish(&anyhow::Result::Err(anyhow::anyhow!("bad file")));
        assert!(second.started_after(edit));
        assert_eq!(second.seq, 2);
        assert!(!second.ok());
        assert_eq!(second.problems(), vec!["bad file".to_string()]);
    }

    #[tokio::test]
    async fn waiting_pokes_again_until_a_qualifying_pass() {
        let log = Arc::new(PassLog::new());
        let (tx, mut rx) = mpsc::channel(8);
        let (_stop_tx, stop) = watch::channel(false);
        let edit = Instant::now();
        let daemon = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                // A pass that was already running: it does not count.
                rx.recv().await.unwrap();
                log.publish(&report(60_000));
                // The wait pokes again; this pass started after the first was published.
                rx.recv().await.unwrap();
                log.publish(&report(1));
            })
        };
        let p = log
            .wait_for_pass_after(edit, &tx, Duration::from_secs(5), stop)
            .await
            .unwrap();
        assert_eq!(p.seq, 2);
        daemon.await.unwrap();
    }

    #[tokio::test]
    async fn waiting_ends_on_timeout_and_on_shutdown() {
        let log = PassLog::new();
        let (tx, _rx) = mpsc::channel(8);
        let (stop_tx, stop) = watch::channel(false);
        let r = log
            .wait_for_pass_after(Instant::now(), &tx, Duration::from_millis(20), stop.clone())
            .await;
        assert_eq!(r.unwrap_err(), WaitError::Timeout);
        stop_tx.send_replace(true);
        let r = log
            .wait_for_pass_after(Instant::now(), &tx, Duration::from_secs(5), stop)
            .await;
        assert_eq!(r.unwrap_err(), WaitError::ShuttingDown);
    }
}
