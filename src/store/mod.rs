//! The local state file: SQLite in WAL mode, one writer, versioned migrations.
//!
//! The file is split by what it keeps, each part stating the invariants it holds
//! (ARCHITECTURE.md numbers them): `outbox` jobs and batches (1 the page and its cursor in one
//! transaction, 2 ack after a final answer, 3 bodies and keys written once, 4 one lane),
//! `customers` change detection (5), `failures` rejections and dead letters (6),
//! `history` runs, polls, delivery totals and halts, `cursors` listing positions, `push`
//! push-feed events.
//!
//! Durability: `synchronous = NORMAL`. In WAL mode that survives a crash of the process at any
//! point; only a power loss or kernel crash can lose the last commits. That is enough here
//! because everything in this file can be re-derived from the sources: a lost cursor commit
//! means a page is fetched again, a lost ack means a job is re-sent with the same key and
//! RevKeen replays its answer, and a lost job is re-created by the next poll (its record still
//! differs from the synced hash). `FULL` would buy nothing but an fsync per page.
//!
//! One process writes: the daemon (or `--once`) takes an exclusive `flock` on the state file so
//! a second one fails fast instead of both sending. `status` and `failures` read through a
//! separate read-only connection and never block the writer; `replay` is a short write that
//! waits on the busy timeout.

mod cursors;
mod customers;
mod failures;
mod history;
mod migrations;
mod outbox;
mod push;

pub use customers::{Decision, Lane, Preview, Queued, decide};
pub use failures::{DeadLetter, Failure, FailureKind};
pub use history::{DeliveryCounts, Halt, PageOutcome, Pause, PollRecord, PollStats};
pub use outbox::{
    Batch, ClaimFilter, Finished, Job, PageItem, PageItemOutcome, QueueSummary, ReplayOutcome, Unit,
};
pub use push::PushRecorded;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Store::call`] keeps retrying work that found the file locked.
pub const LOCKED_PATIENCE: Duration = Duration::from_secs(120);

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state file {path} is in use by another sync-daemon process: stop it first (only one process may send from a state file)"
    )]
    Locked { path: PathBuf },
    #[error("state file {path} cannot be opened: {problem}")]
    Open { path: PathBuf, problem: String },
    #[error(
        "state file {path} was written by a newer sync-daemon (schema {found}, this build knows {known}): upgrade sync-daemon or restore a backup"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("state file {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state file {path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error(
        "state file {path} cannot be written: the disk is full ({free}) or the file reached its size limit; free space there: sync-daemon retries and resumes by itself ({detail})"
    )]
    Full {
        path: PathBuf,
        /// What the filesystem says is free, in words.
        free: String,
        detail: String,
    },
}

impl StoreError {
    /// Whether a write failed for want of space or because the file or disk failed: the
    /// daemon waits and retries, and `/readyz` says so.
    pub fn is_write_failure(&self) -> bool {
        match self {
            StoreError::Full { .. } => true,
            StoreError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::ReadOnly)
            ),
            _ => false,
        }
    }

    /// Whether another connection held the file locked past the busy timeout (transient).
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Sqlite { source, .. }
            if matches!(source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)))
    }
}

/// The state file, shared by the poll loops and the worker. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Why the last write failed, until a write succeeds again (`/readyz` reads it).
    write_problem: Mutex<Option<String>>,
    /// Writes counted by SQLite when the problem was last checked.
    changes_seen: std::sync::atomic::AtomicU64,
    /// Woken when writes succeed again after a failure.
    writable: tokio::sync::Notify,
    // Held for the life of the store: the exclusive flock that makes this the only writer.
    _lock: Option<File>,
}

pub(crate) use crate::clock::now_ms;

impl Store {
    /// Opens (creating it with mode 0600 if needed) the state file for sending: takes the
    /// writer lock, applies migrations and clears in-flight marks left by a crash.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let lock = create_and_lock(path)?;
        let mut conn = Connection::open(path).map_err(|e| open_error(path, &e))?;
        configure(&conn, path)?;
        migrate(&mut conn, path)?;
        let store = Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
                write_problem: Mutex::default(),
                changes_seen: Default::default(),
                writable: Default::default(),
                _lock: Some(lock),
            }),
        };
        store.reset_inflight()?;
        Ok(store)
    }

    /// Opens the state file for a short write (`replay`) without taking the writer lock, so it
    /// works while the daemon runs. Migrations are applied if the file is new.
    pub fn open_shared(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            create_file(path)?;
        }
        let mut conn = Connection::open(path).map_err(|e| open_error(path, &e))?;
        configure(&conn, path)?;
        migrate(&mut conn, path)?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
                write_problem: Mutex::default(),
                changes_seen: Default::default(),
                writable: Default::default(),
                _lock: None,
            }),
        })
    }

    /// Opens an existing state file read-only (`status`, `failures`, `--dry-run`): it never
    /// writes, never takes the writer lock and never blocks the daemon. `None` when the file
    /// does not exist yet.
    pub fn open_read_only(path: &Path) -> Result<Option<Store>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(path, &e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| sqlite(path, e))?;
        let version: usize = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| sqlite(path, e))?;
        let known = migrations::LATEST;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        if version < known {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                problem: format!(
                    "schema version {version} is older than this build's {known}: run sync-daemon once (or `sync-daemon replay --all`) to migrate it"
                ),
            });
        }
        Ok(Some(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
                write_problem: Mutex::default(),
                changes_seen: Default::default(),
                writable: Default::default(),
                _lock: None,
            }),
        }))
    }

    /// Whether a sending process (daemon or `--once`) holds the state file's writer lock.
    pub fn writer_active(path: &Path) -> bool {
        let Ok(file) = File::open(path) else {
            return false;
        };
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    }

    /// Returns SQLite's page cache to the allocator, and the allocator's free memory to the
    /// system, so an idle daemon keeps little resident memory.
    pub fn release_memory(&self) -> Result<(), StoreError> {
        self.conn()
            .execute_batch("PRAGMA shrink_memory")
            .map_err(|e| self.err(e))?;
        // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no live
        // allocation.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(())
    }

    /// A throwaway store in memory (`--dry-run` with no state file yet).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let path = PathBuf::from(":memory:");
        let mut conn = Connection::open_in_memory().map_err(|e| sqlite(&path, e))?;
        migrate(&mut conn, &path)?;
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(conn),
                write_problem: Mutex::default(),
                changes_seen: Default::default(),
                writable: Default::default(),
                _lock: None,
            }),
        })
    }

    /// [`Store::open`] on a blocking thread.
    pub async fn open_blocking(path: PathBuf) -> Result<Store, StoreError> {
        off_runtime(path.clone(), move || Store::open(&path)).await
    }

    /// [`Store::open_read_only`] on a blocking thread; `None` when the file does not exist.
    pub async fn open_read_only_blocking(path: PathBuf) -> Result<Option<Store>, StoreError> {
        off_runtime(path.clone(), move || Store::open_read_only(&path)).await
    }

    /// Runs blocking store work off the async runtime. Work that finds the file locked by
    /// another process for longer than the busy timeout (a `replay`, a backup tool) is retried
    /// for up to [`LOCKED_PATIENCE`] before the error is returned.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&Store) -> Result<R, StoreError> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let started = crate::clock::instant();
        loop {
            let (store, f) = (self.clone(), f.clone());
            let result = match tokio::task::spawn_blocking(move || f(&store)).await {
                Ok(result) => result,
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                Err(_) => Err(StoreError::Open {
                    path: self.inner.path.clone(),
                    problem: "the runtime is shutting down".to_string(),
                }),
            };
            match result {
                Err(error) if error.is_locked() && started.elapsed() < LOCKED_PATIENCE => {
                    tracing::warn!(%error, "The state file is locked by another process; retrying.");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the transaction rolls back
        // when dropped), so a poisoned lock is still safe to use.
        self.inner
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn err(&self, error: rusqlite::Error) -> StoreError {
        let error = sqlite(&self.inner.path, error);
        if error.is_write_failure() {
            let mut problem = self
                .inner
                .write_problem
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if problem.is_none() {
                tracing::error!(%error, "Writing the state file failed; whatever needs it waits and retries.");
            }
            *problem = Some(error.to_string());
        }
        error
    }

    /// Commits `tx`; a commit that wrote clears an earlier write failure (and says so).
    fn commit(&self, tx: rusqlite::Transaction<'_>) -> Result<(), StoreError> {
        let changes = tx.total_changes();
        tx.commit().map_err(|e| self.err(e))?;
        let seen = self
            .inner
            .changes_seen
            .swap(changes, std::sync::atomic::Ordering::Relaxed);
        if changes != seen {
            let cleared = self
                .inner
                .write_problem
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if cleared.is_some() {
                tracing::info!("The state file accepts writes again; sending resumes.");
                self.inner.writable.notify_waiters();
            }
        }
        Ok(())
    }

    /// Why writing the state file fails, while it does (a full disk, an I/O error).
    pub fn write_problem(&self) -> Option<String> {
        self.inner
            .write_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Resolves when a write succeeds after a failure.
    pub async fn writable_again(&self) {
        self.inner.writable.notified().await;
    }
}

/// Runs `open` on a blocking thread; a runtime shutting down is an error naming the file.
async fn off_runtime<T: Send + 'static>(
    path: PathBuf,
    open: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(open).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(StoreError::Open {
            path,
            problem: "the runtime is shutting down".to_string(),
        }),
    }
}

fn sqlite(path: &Path, source: rusqlite::Error) -> StoreError {
    let code = source.sqlite_error_code();
    let full = match code {
        Some(rusqlite::ErrorCode::DiskFull) => true,
        // A write that failed for want of space shows as an I/O error in some of SQLite's paths
        // (growing the WAL index): ask the filesystem.
        Some(rusqlite::ErrorCode::SystemIoFailure) => {
            free_bytes(path).is_some_and(|free| free < LOW_SPACE)
        }
        _ => false,
    };
    if full {
        return StoreError::Full {
            path: path.to_path_buf(),
            free: match free_bytes(path) {
                Some(free) => format!(
                    "{} free in {}",
                    human_bytes(free),
                    directory_of(path).display()
                ),
                None => format!("free space in {} unknown", directory_of(path).display()),
            },
            detail: source.to_string(),
        };
    }
    StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// What SQLite said, without the path the error would repeat.
fn error_text(error: &StoreError) -> String {
    match error {
        StoreError::Sqlite { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Below this much free space an I/O error is taken for a full disk.
const LOW_SPACE: u64 = 1024 * 1024;

/// The directory holding the state file.
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Bytes an unprivileged writer may still use on the state file's filesystem.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = std::ffi::CString::new(directory_of(path).as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into the struct passed; the path is a valid C string.
    unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(dir.as_ptr(), &mut stats) == 0)
            .then(|| stats.f_bavail.saturating_mul(stats.f_frsize))
    }
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b => format!("{} KiB", b / 1024),
    }
}

fn open_error(path: &Path, error: &dyn std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        problem: format!(
            "{error}; check that the directory exists and is writable by the service user (systemd: StateDirectory=, config: daemon.state_path)"
        ),
    }
}

fn create_file(path: &Path) -> Result<(), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_error(path, &e))?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(StoreError::Open {
            path: path.to_path_buf(),
            problem: "permission denied creating it: the directory is read-only for this user; check StateDirectory= or daemon.state_path".to_string(),
        }),
        Err(e) => Err(open_error(path, &e)),
    }
}

/// Creates the file with mode 0600 if missing (SQLite gives its -wal and -shm files the same
/// mode) and takes the exclusive writer lock.
fn create_and_lock(path: &Path) -> Result<File, StoreError> {
    create_file(path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                StoreError::Open {
                    path: path.to_path_buf(),
                    problem:
                        "it is read-only for this user: check StateDirectory= or daemon.state_path"
                            .to_string(),
                }
            } else {
                open_error(path, &e)
            }
        })?;
    // The state file holds customer emails and phones: keep it private even if it was copied in
    // with looser permissions.
    if let Ok(meta) = file.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(open_error(path, &e)),
    }
}

fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sqlite(path, e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| classify_open_failure(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            problem: format!(
                "SQLite refused WAL mode (got {mode}); put the state file on a local filesystem"
            ),
        });
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| sqlite(path, e))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|e| sqlite(path, e))?;
    // 8 MiB of page cache (the default is 2): the working set of a large backfill (outbox
    // indexes, the customers table) stays in memory instead of being re-read page by page.
    conn.pragma_update(None, "cache_size", -8192)
        .map_err(|e| sqlite(path, e))?;
    conn.set_prepared_statement_cache_capacity(64);
    // A full disk on demand, for the tests of what a failing state file does: SQLite answers
    // SQLITE_FULL once the file would grow past this many pages.
    if let Some(pages) = std::env::var(MAX_PAGES_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        conn.pragma_update(None, "max_page_count", pages)
            .map_err(|e| sqlite(path, e))?;
    }
    Ok(())
}

/// The environment variable that caps the state file's size in pages (see [`configure`]).
pub const MAX_PAGES_VAR: &str = "SYNC_DAEMON_MAX_PAGES";

fn classify_open_failure(path: &Path, error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ReadOnly) => StoreError::Open {
            path: path.to_path_buf(),
            problem: "it is read-only: check StateDirectory= or daemon.state_path".to_string(),
        },
        Some(rusqlite::ErrorCode::NotADatabase) => StoreError::Corrupt {
            path: path.to_path_buf(),
            problem: "this is not a SQLite database: move it aside; everything in it is re-derived from the sources on the next run".to_string(),
        },
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            problem: "the database is corrupt: move it aside; everything in it is re-derived from the sources on the next run".to_string(),
        },
        _ => sqlite(path, error),
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let known = migrations::LATEST;
    let found: usize = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| classify_open_failure(path, e))?;
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    migrations::migrations()
        .to_latest(conn)
        .map_err(|e| match e {
            // The statement's text says nothing an operator can act on: the error does.
            rusqlite_migration::Error::RusqliteError { err, .. } => match sqlite(path, err) {
                full @ StoreError::Full { .. } => full,
                other => StoreError::Corrupt {
                    path: path.to_path_buf(),
                    problem: format!("migrating it failed: {}", error_text(&other)),
                },
            },
            other => StoreError::Corrupt {
                path: path.to_path_buf(),
                problem: format!("migrating it failed: {other}"),
            },
        })
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A store in a fresh temporary directory (kept alive by the returned guard).
    pub fn temp_store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state.db")).expect("open");
        (store, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_state_file_is_private_and_in_wal_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/state.db");
        let store = Store::open(&path).expect("open");
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let journal: String = store
            .conn()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("pragma");
        assert_eq!(journal, "wal");
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let first = Store::open(&path).expect("open");
        let second = Store::open(&path).err().expect("locked");
        assert!(matches!(second, StoreError::Locked { .. }), "{second}");
        assert!(second.to_string().contains("another sync-daemon"));
        drop(first);
        Store::open(&path).expect("lock released with the first store");
    }

    #[test]
    fn read_only_open_of_a_missing_file_is_none_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        assert!(Store::open_read_only(&path).expect("ok").is_none());
        assert!(!path.exists());
    }

    #[test]
    fn garbage_file_is_reported_as_not_a_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        std::fs::write(&path, vec![0x42; 8192]).expect("write");
        let error = Store::open(&path).err().expect("refused");
        assert!(
            error.to_string().contains("not a SQLite database"),
            "{error}"
        );
    }

    #[test]
    fn newer_schema_is_refused_with_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        drop(Store::open(&path).expect("open"));
        Connection::open(&path)
            .expect("raw")
            .pragma_update(None, "user_version", 99)
            .expect("bump");
        let error = Store::open(&path).err().expect("refused");
        assert!(
            matches!(error, StoreError::TooNew { found: 99, .. }),
            "{error}"
        );
    }
}

#[cfg(test)]
mod outbox_tests {
    use super::test_support::temp_store;
    use super::*;

    fn item(id: &str, email: &str) -> PageItem {
        PageItem {
            external_id: id.to_string(),
            outcome: PageItemOutcome::Customer {
                body: format!(r#"{{"email":"{email}"}}"#).into_bytes(),
                update_only: false,
            },
        }
    }

    fn filter() -> ClaimFilter {
        ClaimFilter {
            sources: vec!["gym".to_string()],
            batch_size: 1,
            ..ClaimFilter::default()
        }
    }

    #[test]
    fn page_jobs_and_cursor_commit_together_and_unchanged_records_are_skipped() {
        let (store, _dir) = temp_store();
        let page = [item("1", "a@x.io"), item("2", "b@x.io")];
        let outcome = store
            .commit_page("gym", "wodify", &page, Some("c1"), false, false)
            .expect("commit");
        assert_eq!(outcome.enqueued, 2);
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("c1".to_string(), 0))
        );
        assert_eq!(store.outstanding(&filter().sources).expect("count"), 2);
        // Same bodies again: nothing new is queued.
        let again = store
            .commit_page("gym", "wodify", &page, Some("c2"), true, false)
            .expect("commit");
        assert_eq!((again.enqueued, again.unchanged), (0, 2));
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("c2".to_string(), 1))
        );
    }

    #[test]
    fn a_newer_version_replaces_a_queued_one_but_waits_behind_one_in_flight() {
        let (store, _dir) = temp_store();
        store
            .commit_page("gym", "wodify", &[item("1", "a@x.io")], None, false, false)
            .expect("commit");
        store
            .commit_page("gym", "wodify", &[item("1", "b@x.io")], None, false, false)
            .expect("commit");
        assert_eq!(
            store.outstanding(&filter().sources).expect("count"),
            1,
            "coalesced"
        );
        let Some(Unit::Single(first)) = store.claim(&filter(), now_ms()).expect("claim") else {
            panic!("expected a single");
        };
        assert_eq!(first.body, br#"{"email":"b@x.io"}"#);
        store
            .commit_page("gym", "wodify", &[item("1", "c@x.io")], None, false, false)
            .expect("commit");
        assert_eq!(store.outstanding(&filter().sources).expect("count"), 2);
        // The lane is busy: the newer version cannot be claimed until the first is answered.
        assert_eq!(store.claim(&filter(), now_ms()).expect("claim"), None);
        let unit = Unit::Single(first.clone());
        store
            .finish(
                &unit,
                &[(first.id, Finished::Delivered)],
                DeliveryCounts {
                    created: 1,
                    ..DeliveryCounts::default()
                },
            )
            .expect("ack");
        let Some(Unit::Single(second)) = store.claim(&filter(), now_ms()).expect("claim") else {
            panic!("expected the newer version");
        };
        assert_eq!(second.body, br#"{"email":"c@x.io"}"#);
        assert_ne!(second.idempotency_key, first.idempotency_key);
    }
}
