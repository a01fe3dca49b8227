//! Test doubles the unit tests share (compiled for tests only).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A scripted upstream: each call takes `latency`, is logged with when it came, and gets the
/// next answer of the script; the last answer repeats for ever.
pub(crate) struct Script<T> {
    answers: Mutex<VecDeque<T>>,
    latency: Duration,
    arrivals: Mutex<Vec<Duration>>,
    started: Instant,
}

impl<T: Clone> Script<T> {
    pub(crate) fn new(answers: Vec<T>, latency: Duration) -> Script<T> {
        Script {
            answers: Mutex::new(answers.into()),
            latency,
            arrivals: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    /// Logs a call, waits out the latency and answers (`None`: an empty script).
    pub(crate) async fn next(&self) -> Option<T> {
        self.arrivals
            .lock()
            .expect("lock")
            .push(self.started.elapsed());
        let answer = {
            let mut answers = self.answers.lock().expect("lock");
            if answers.len() > 1 {
                answers.pop_front()
            } else {
                answers.front().cloned()
            }
        };
        tokio::time::sleep(self.latency).await;
        answer
    }

    /// When each call came, from the script's creation.
    pub(crate) fn arrivals(&self) -> Vec<Duration> {
        self.arrivals.lock().expect("lock").clone()
    }
}
