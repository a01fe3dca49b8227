//! Faithful in-memory simulators of the three remote APIs, for the demo, the integration tests
//! and integrators trying a config offline.
//!
//! Each simulator behaves like the API described in `shared/api/` (auth, paging, documented rate
//! limits, error shapes) and adds two things the real services lack: fault injection ([`Faults`])
//! and a `/_sim/...` surface to inspect and change their state. They keep state in memory only.
//! The same state is reachable from Rust (the `*Sim` handles), so in-process tests need no HTTP
//! round trip to check what a simulator received.
//!
//! The two source simulators ([`wodify`], [`practicehub`]) keep their records, key, faults,
//! rate limit and request log, and serve their control surface, through [`source`]; each file
//! keeps only what its API does differently.

pub mod practicehub;
pub mod revkeen;
pub mod source;
pub mod wodify;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Faults a simulator injects into the requests it serves. Every rate is a fraction in `0.0..=1.0`
/// drawn independently per request; all zero (the default) is a healthy service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fraction of requests answered with a 5xx before any work is done.
    pub error_rate: f64,
    /// Fraction of requests answered 429 regardless of the rate limiter (with `Retry-After: 1`
    /// where the API documents the header).
    pub rate_429: f64,
    /// Milliseconds added to every request before it is answered.
    pub latency_ms: u64,
    /// Fraction of requests whose connection is dropped before an answer arrives: the request
    /// may already have been applied (RevKeen writes first, then drops), which is what makes
    /// idempotency keys matter.
    pub drop_rate: f64,
    /// Wodify only: fraction of requests answered HTTP 200 with an error envelope
    /// (`{"HTTPCode": 500, ...}`) instead of data.
    pub envelope_rate: f64,
}

impl Faults {
    /// True with probability `rate`.
    pub fn roll(rate: f64) -> bool {
        rate > 0.0 && fastrand::f64() < rate
    }

    /// Sleeps for the configured latency, if any.
    pub async fn delay(&self) {
        if self.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.latency_ms)).await;
        }
    }
}

/// A token bucket for a simulator's documented rate limit (`rate` requests per `per`, `burst`
/// at once). `None` rate means unlimited.
pub struct Bucket {
    limiter: Mutex<Option<Arc<DefaultDirectRateLimiter>>>,
}

impl Bucket {
    /// A bucket allowing `rate` requests every `per` with bursts of `burst`; `rate == 0` is
    /// unlimited.
    pub fn new(rate: u32, per: Duration, burst: u32) -> Self {
        let bucket = Bucket {
            limiter: Mutex::new(None),
        };
        bucket.set(rate, per, burst);
        bucket
    }

    /// Changes the limit (tests scale the documented limits down or switch them off).
    pub fn set(&self, rate: u32, per: Duration, burst: u32) {
        let limiter = NonZeroU32::new(rate).map(|rate| {
            let period = per / rate.get();
            let burst = NonZeroU32::new(burst.max(1)).expect("max(1) is non-zero");
            let quota = Quota::with_period(period)
                .expect("a non-zero rate over a non-zero period has a non-zero period")
                .allow_burst(burst);
            Arc::new(RateLimiter::direct(quota))
        });
        *self.limiter.lock().expect("bucket lock poisoned") = limiter;
    }

    /// Takes one token, or says how long until one is available.
    pub fn check(&self) -> Result<(), Duration> {
        let limiter = self.limiter.lock().expect("bucket lock poisoned").clone();
        match limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }
}

/// Whole seconds to put in a `Retry-After` header for a wait (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A response whose body fails before anything is written: hyper then closes the connection
/// and the client sees it drop without an answer, as when a proxy or process dies mid-request.
pub fn dropped_connection() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<axum::body::Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated dropped connection",
        ))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts are valid")
}

/// A simulator serving on a loopback port until dropped or [`SimServer::shutdown`] is called.
pub struct SimServer {
    /// The address the simulator listens on.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimServer {
    /// Binds `addr` (port 0 picks a free port) and serves `router` in a background task.
    pub async fn spawn(router: Router, addr: SocketAddr) -> std::io::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "Simulator stopped.");
            }
        });
        Ok(SimServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`, the base URL to put in a config.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Ports for [`SimSet::start`]; 0 picks a free one.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimPorts {
    pub revkeen: u16,
    pub wodify: u16,
    pub practicehub: u16,
}

/// The three simulators together, as `demo`, `sim` and the integration tests use them.
pub struct SimSet {
    pub revkeen: revkeen::RevKeenSim,
    pub wodify: wodify::WodifySim,
    pub practicehub: practicehub::PracticeHubSim,
    pub revkeen_server: SimServer,
    pub wodify_server: SimServer,
    pub practicehub_server: SimServer,
}

/// The API key each simulator accepts by default.
pub const REVKEEN_KEY: &str = "rk_sandbox_sim";
/// See [`REVKEEN_KEY`].
pub const WODIFY_KEY: &str = "wodify_sim_key";
/// See [`REVKEEN_KEY`].
pub const PRACTICEHUB_KEY: &str = "practicehub_sim_key";

impl SimSet {
    /// Starts all three on loopback with their documented limits and default keys.
    pub async fn start(ports: SimPorts) -> std::io::Result<SimSet> {
        let revkeen = revkeen::RevKeenSim::new(revkeen::RevKeenOptions {
            api_keys: vec![REVKEEN_KEY.to_string()],
            ..revkeen::RevKeenOptions::default()
        });
        let wodify = wodify::WodifySim::new(wodify::WodifyOptions {
            api_key: WODIFY_KEY.to_string(),
            ..wodify::WodifyOptions::default()
        });
        let practicehub = practicehub::PracticeHubSim::new(practicehub::PracticeHubOptions {
            api_key: PRACTICEHUB_KEY.to_string(),
            ..practicehub::PracticeHubOptions::default()
        });
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Ok(SimSet {
            revkeen_server: revkeen.spawn(loopback(ports.revkeen)).await?,
            wodify_server: wodify.spawn(loopback(ports.wodify)).await?,
            practicehub_server: practicehub.spawn(loopback(ports.practicehub)).await?,
            revkeen,
            wodify,
            practicehub,
        })
    }

    /// A daemon config pointing at these simulators: one Wodify source `gym` and one
    /// PracticeHub source `clinic`, with the simulators' documented limits.
    pub fn config_toml(&self, state_path: &std::path::Path) -> String {
        format!(
            r#"[daemon]
state_path = "{state}"

[revkeen]
base_url = "{revkeen}"
api_key = "{REVKEEN_KEY}"

[[sources]]
name = "gym"
kind = "wodify"
base_url = "{wodify}"
api_key = "{WODIFY_KEY}"
schedule = "0 */15 * * * *"

[[sources]]
name = "clinic"
kind = "practicehub"
base_url = "{practicehub}/api"
api_key = "{PRACTICEHUB_KEY}"
app_details = "revkeen-sync=ops@clinic.example"
schedule = "0 */5 * * * *"
"#,
            state = state_path
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\""),
            revkeen = self.revkeen_server.url(),
            wodify = self.wodify_server.url(),
            practicehub = self.practicehub_server.url(),
        )
    }
}

/// HTTP helpers the simulators' unit tests share.
#[cfg(test)]
mod testing {
    use serde::de::DeserializeOwned;

    /// Sends `request` and returns the status of its answer.
    pub(super) async fn send_status(request: reqwest::RequestBuilder) -> u16 {
        request.send().await.expect("send").status().as_u16()
    }

    /// Sends `request` and reads the JSON body of its answer.
    pub(super) async fn send_json<T: DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
        let response = request.send().await.expect("send");
        response.json().await.expect("JSON body")
    }

    /// Asserts that `sent` brought no data: the simulator dropped the connection.
    pub(super) async fn assert_dropped(sent: reqwest::Result<reqwest::Response>) {
        // hyper polls the body before flushing the headers, so the break usually surfaces as a
        // failed send rather than a failed body read; either way no data arrives.
        match sent {
            Ok(response) => assert!(response.bytes().await.is_err()),
            Err(error) => assert!(error.status().is_none(), "{error}"),
        }
    }
}
