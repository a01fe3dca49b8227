//! The local state file: SQLite in WAL mode, one writer, versioned migrations.
//!
//! The file is split by what it keeps, each part stating the invariants it holds
//! (ARCHITECTURE.md numbers them): `outbox` jobs and batches (1 the page and its cursor in one
//! transaction, 2 ack after a final answer, 3 bodies and keys written once, 4 one lane),
//! `customers` change detection (5), `failures` rejections and dead letters (6),
//! `history` runs, polls, delivery totals and halts, `cursors` listing positions, `push`
//! push-feed events, `budget` requests spent per source and month.
//!
//! Durability: `synchronous = NORMAL`. In WAL mode that survives a crash of the process at any
//! point; only a power loss or kernel crash can lose the last commits. That is enough here
//! because everything in this file can be re-derived from the sources: a lost cursor commit
//! means a page is fetched again, a lost ack means a job is re-sent with the same key and
//! RevKeen replays its answer, and a lost job is re-created by the next poll (its record still
//! differs from the synced hash). `FULL` would buy nothing but an fsync per page.
//!
//! One process writes: the daemon (or `--once`) takes an exclusive `flock` on
//! `<state file>.lock` (the path: a file moved aside still blocks a second sender) and on the
//! file, so a second one fails fast instead of both sending. `status` and `failures` read
//! through a separate read-only connection and never block the writer; `replay` is a short
//! write that waits on the busy timeout.
//!
//! The file is checked before it is used: another application's database is refused untouched
//! (`application_id`), a damaged one is refused with the recovery step (`quick_check`), and
//! each file carries a random identity that joins every idempotency key. A write that fails
//! (a full disk) is remembered until one succeeds, for `/readyz` and the worker's wait.

mod budget;
mod cursors;
mod customers;
mod failures;
mod history;
mod migrations;
mod outbox;
mod push;

pub use budget::BudgetMonth;
pub use customers::{Decision, Lane, Preview, Queued, SeenIds, decide};
pub use failures::{DeadLetter, Failure, FailureKind};
pub use history::{DeliveryCounts, Halt, KeyReread, PageOutcome, Pause, PollRecord, PollStats};
pub use outbox::{
    Batch, ClaimFilter, CursorSave, Finished, Job, PageItem, PageItemOutcome, QueueSummary,
    ReplayOutcome, Unit,
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
        "{path} is not a sync-daemon state file ({what}); it was left untouched: point daemon.state_path at a file of its own (a new one is created on the first run)"
    )]
    Foreign { path: PathBuf, what: String },
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
    /// The exit code of a run that failed on this: another application's file at
    /// `state_path` is a configuration error (a restart would not help), a file in use by
    /// another process a temporary failure (75: try again later); the rest are 1.
    pub fn exit_status(&self) -> crate::exit::ExitStatus {
        match self {
            StoreError::Foreign { .. } => crate::exit::ExitStatus::Config,
            StoreError::Locked { .. } => crate::exit::ExitStatus::TempFail,
            _ => crate::exit::ExitStatus::Failure,
        }
    }

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
    // Held for the life of the store: the exclusive flocks (on the lock file beside the state
    // file, and on the state file itself) that make this the only writer.
    _lock: Option<WriterLock>,
}

pub(crate) use crate::clock::now_ms;

impl Store {
    /// Opens (creating it with mode 0600 if needed) the state file for sending: takes the
    /// writer lock, applies migrations and clears in-flight marks left by a crash.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let lock = create_and_lock(path)?;
        let mut conn = Connection::open(path).map_err(|e| open_error(path, &e))?;
        check_ours(&conn, path)?;
        configure(&conn, path)?;
        check_intact(&conn, path)?;
        migrate(&mut conn, path)?;
        mark_ours(&conn, path)?;
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
        check_ours(&conn, path)?;
        configure(&conn, path)?;
        migrate(&mut conn, path)?;
        mark_ours(&conn, path)?;
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
        let conn = match read_only(path, false) {
            // A file this user may read but not write beside (a read-only directory or mount,
            // another user's state directory) with no WAL: SQLite cannot create the -shm it
            // wants, but there is nothing outside the main file to read, so read it as is.
            Err(error) if cannot_share(&error) && !wal_path(path).exists() => {
                read_only(path, true)?
            }
            other => other?,
        };
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

    /// Checks, without writing, that an existing file is a sync-daemon state file (or empty).
    pub fn check_file(path: &Path) -> Result<(), StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(path, &e))?;
        check_ours(&conn, path)
    }

    /// SQLite's `data_version` of this connection: it changes only when *another* connection
    /// (another process: `sync-daemon replay`) commits to the state file.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.conn()
            .pragma_query_value(None, "data_version", |row| row.get(0))
            .map_err(|e| self.err(e))
    }

    /// Whether a sending process (daemon or `--once`) holds the state file's writer lock.
    pub fn writer_active(path: &Path) -> bool {
        let held = |path: &Path| {
            File::open(path).is_ok_and(|file| {
                matches!(
                    file.try_lock_shared(),
                    Err(std::fs::TryLockError::WouldBlock)
                )
            })
        };
        held(&lock_path(path)) || held(path)
    }

    /// The state file's identity (a random UUID made with the file), joined into every
    /// idempotency key.
    pub fn state_id(&self) -> Result<String, StoreError> {
        state_id(&self.conn()).map_err(|e| self.err(e))
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

/// The directory holding the state file (`.` for a bare file name).
pub fn directory_of(path: &Path) -> &Path {
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

/// A read-only connection, checked to be ours; `immutable` reads the main file alone (no
/// -shm, no locks: only for a file with no WAL that nothing writes).
fn read_only(path: &Path, immutable: bool) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if immutable {
        let absolute = std::path::absolute(path).map_err(|e| open_error(path, &e))?;
        let mut uri = url::Url::from_file_path(&absolute).map_err(|()| StoreError::Open {
            path: path.to_path_buf(),
            problem: "the path cannot be written as a file: URI".to_string(),
        })?;
        uri.set_query(Some("immutable=1"));
        Connection::open_with_flags(uri.as_str(), flags | OpenFlags::SQLITE_OPEN_URI)
    } else {
        Connection::open_with_flags(path, flags)
    }
    .map_err(|e| classify_open_failure(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sqlite(path, e))?;
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(|e| sqlite(path, e))?;
    check_ours(&conn, path)?;
    Ok(conn)
}

/// Whether a read-only open failed only because SQLite could not set up its shared memory.
fn cannot_share(error: &StoreError) -> bool {
    match error {
        StoreError::Open { .. } => true,
        StoreError::Sqlite { source, .. } => matches!(
            source.sqlite_error_code(),
            Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
        ),
        _ => false,
    }
}

/// A companion file of the state file: its name with `suffix` appended (`-wal`, `.lock`).
fn companion(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `<state file>-wal`.
fn wal_path(path: &Path) -> PathBuf {
    companion(path, "-wal")
}

/// The writer's locks: on `<state file>.lock`, which stays at the path when the state file is
/// moved aside while a daemon runs (so a second sender on the path is still refused), and on
/// the state file itself (which is what older versions lock).
struct WriterLock {
    _beside: File,
    _file: File,
}

/// `<state file>.lock`, beside the state file.
pub fn lock_path(path: &Path) -> PathBuf {
    companion(path, ".lock")
}

/// Takes the exclusive writer lock (the lock file first, before anything is created at the
/// path), then creates the state file with mode 0600 if missing (SQLite gives its -wal and -shm
/// files the same mode).
fn create_and_lock(path: &Path) -> Result<WriterLock, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_error(path, &e))?;
    }
    let beside = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path(path))
        .map_err(|e| writable_error(path, &e))?;
    try_lock(&beside, path)?;
    create_file(path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| writable_error(path, &e))?;
    // The state file holds customer emails and phones: keep it private even if it was copied in
    // with looser permissions, and say so.
    if let Ok(meta) = file.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        let was = meta.permissions().mode() & 0o777;
        match file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => tracing::warn!(
                path = %path.display(),
                "The state file was readable by others (mode {was:04o}); its mode is now 0600."
            ),
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "The state file is readable by others (mode {was:04o}) and its mode cannot be changed: chmod 600 it."
            ),
        }
    }
    try_lock(&file, path)?;
    Ok(WriterLock {
        _beside: beside,
        _file: file,
    })
}

fn try_lock(file: &File, path: &Path) -> Result<(), StoreError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(open_error(path, &e)),
    }
}

fn writable_error(path: &Path, error: &std::io::Error) -> StoreError {
    if error.kind() == std::io::ErrorKind::PermissionDenied {
        StoreError::Open {
            path: path.to_path_buf(),
            problem: "it (or its directory) is read-only for this user: check StateDirectory= or daemon.state_path".to_string(),
        }
    } else {
        open_error(path, error)
    }
}

/// `PRAGMA application_id` of a sync-daemon state file: "SYNC".
const APPLICATION_ID: i32 = 0x5359_4E43;

/// Refuses, before writing anything, a database that is neither empty nor ours: another
/// application's file at `state_path` is never migrated or synced into. A file of an older
/// version (no application id yet, but our schema) is ours.
fn check_ours(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(|e| classify_open_failure(path, e))?;
    if application_id == APPLICATION_ID {
        return Ok(());
    }
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect())
        .map_err(|e| classify_open_failure(path, e))?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| classify_open_failure(path, e))?;
    let ours_before_ids = application_id == 0
        && version >= 1
        && ["customers", "cursors", "outbox"]
            .iter()
            .all(|t| tables.iter().any(|name| name == t));
    let empty = application_id == 0 && version == 0 && tables.is_empty();
    if empty || ours_before_ids {
        return Ok(());
    }
    let mut shown: Vec<&str> = tables.iter().take(3).map(String::as_str).collect();
    if tables.len() > 3 {
        shown.push("…");
    }
    Err(StoreError::Foreign {
        path: path.to_path_buf(),
        what: format!(
            "another SQLite database: application_id {application_id:#x}, user_version {version}, {} tables ({})",
            tables.len(),
            shown.join(", ")
        ),
    })
}

/// Marks the file as a sync-daemon state file (new files, and files of older versions).
fn mark_ours(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(|e| sqlite(path, e))?;
    if application_id != APPLICATION_ID {
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(|e| sqlite(path, e))?;
    }
    Ok(())
}

/// `PRAGMA quick_check` at start: a damaged file is refused with the recovery step instead of
/// being run on (and damaged further). O(file size): 53 ms (median) on a 51 MiB file of 100,000
/// customers (`cargo bench --bench status`).
fn check_intact(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let problems: Vec<String> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect())
        .map_err(|e| classify_open_failure(path, e))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(damaged(path, &problems.join("; ")))
}

fn damaged(path: &Path, detail: &str) -> StoreError {
    let shown = path.display();
    StoreError::Corrupt {
        path: path.to_path_buf(),
        problem: format!(
            "the database is damaged ({}): move it aside with any -wal and -shm beside it (mv {shown} {shown}.damaged) and run again; everything in it is re-derived from the sources, and the new file's own identity means RevKeen replays nothing from before",
            crate::secret::redact(detail)
        ),
    }
}

/// The state file's identity (migration V6).
/// `execute` and `query_row` through the connection's statement cache, so a statement is
/// compiled once per connection rather than on every call (plain `execute` compiles its SQL
/// each time: 5.5 % of a first sync's CPU, mostly in claim and finish). Every statement of
/// the store goes through the cache; one built with `format!` is cached by its text.
pub(super) trait Cached {
    fn exec_cached(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize>;
    fn row_cached<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec_cached(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row_cached<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, read)
    }
}

pub(super) fn state_id(conn: &Connection) -> rusqlite::Result<String> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = 'state_id'")?
        .query_row([], |row| row.get(0))
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
    // Temporary tables, sorts and statement journals in memory, never in a temporary file: a
    // container with a read-only root filesystem (Kubernetes' readOnlyRootFilesystem) has no
    // writable temporary directory, and SQLite would fail there with "disk I/O error". They are
    // small here (a page of records, a batch).
    conn.pragma_update(None, "temp_store", "MEMORY")
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
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => damaged(path, "SQLite reports it malformed"),
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
    fn another_applications_database_is_refused_untouched_and_an_older_state_file_is_ours() {
        let dir = tempfile::tempdir().expect("tempdir");
        for version in [0, 7] {
            let path = dir.path().join(format!("app-{version}.db"));
            {
                let other = Connection::open(&path).expect("create");
                other
                    .execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
                    .expect("schema");
                other
                    .pragma_update(None, "user_version", version)
                    .expect("version");
            }
            let before = std::fs::read(&path).expect("read");
            let error = Store::open(&path).err().expect("refused");
            assert!(matches!(error, StoreError::Foreign { .. }), "{error}");
            let text = error.to_string();
            assert!(
                text.contains(&path.display().to_string())
                    && text.contains("not a sync-daemon state file")
                    && text.contains("invoices")
                    && text.contains("left untouched"),
                "{text}"
            );
            assert_eq!(error.exit_status(), crate::exit::ExitStatus::Config);
            assert_eq!(std::fs::read(&path).expect("read"), before, "modified");
            assert!(!dir.path().join(format!("app-{version}.db-wal")).exists());
            assert!(
                Store::open_read_only(&path).is_err(),
                "status refuses it too"
            );
        }
        // A state file written before application ids: ours, and marked from now on.
        let path = dir.path().join("older.db");
        drop(Store::open(&path).expect("open"));
        Connection::open(&path)
            .expect("raw")
            .pragma_update(None, "application_id", 0)
            .expect("unmark");
        let store = Store::open(&path).expect("an older state file is ours");
        let id: i32 = store
            .conn()
            .pragma_query_value(None, "application_id", |row| row.get(0))
            .expect("pragma");
        assert_eq!(id, APPLICATION_ID);
    }

    #[test]
    fn the_lock_guards_the_path_so_a_file_moved_aside_leaves_no_room_for_a_second_sender() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let running = Store::open(&path).expect("open");
        std::fs::rename(&path, dir.path().join("state.db.moved")).expect("move aside");
        assert!(Store::writer_active(&path), "status sees the writer");
        let error = Store::open(&path).err().expect("refused");
        assert!(matches!(error, StoreError::Locked { .. }), "{error}");
        assert!(!path.exists(), "nothing was created at the path");
        drop(running);
        Store::open(&path).expect("free once the first writer is gone");
    }

    #[test]
    fn each_state_file_has_its_own_identity_and_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let first = Store::open(&path).expect("open").state_id().expect("id");
        assert_eq!(
            Store::open(&path).expect("reopen").state_id().expect("id"),
            first
        );
        std::fs::rename(&path, dir.path().join("state.db.old")).expect("reset");
        let second = Store::open(&path)
            .expect("new file")
            .state_id()
            .expect("id");
        assert_ne!(first, second);
    }

    #[test]
    fn a_world_readable_state_file_is_made_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        drop(Store::open(&path).expect("open"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        drop(Store::open(&path).expect("open"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
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

    /// The state file as another process sees it: the commit counter of one connection (it
    /// moves only for other connections' commits) and both files' sizes.
    fn disk_state(observer: &Connection, path: &Path) -> (i64, u64, u64) {
        let version = observer
            .pragma_query_value(None, "data_version", |row| row.get(0))
            .expect("data_version");
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        (version, size(path), size(Path::new(&wal)))
    }

    fn poll_page() -> Vec<PageItem> {
        vec![
            item("1", "a@x.io"),
            item("2", "b@x.io"),
            PageItem {
                external_id: "3".to_string(),
                outcome: PageItemOutcome::Rejected(crate::customer::Rejection::new(
                    "missing_email",
                    "no email".to_string(),
                    "add one",
                )),
            },
            PageItem {
                external_id: "4".to_string(),
                outcome: PageItemOutcome::Ignored,
            },
        ]
    }

    /// A batch of ten customers, claimed, sent (the test pretends) and scheduled for a retry.
    fn recorded_batch(store: &Store) -> Batch {
        let page: Vec<PageItem> = (1..=10)
            .map(|n| item(&format!("c{n:02}"), &format!("m{n}@x.io")))
            .collect();
        store
            .commit_page("gym", "wodify", &page, CursorSave::Keep, false, false)
            .expect("commit");
        let Some(Unit::Batch(batch)) = claim_batches(store) else {
            panic!("ten customers make a batch");
        };
        store
            .retry_later(&Unit::Batch(batch.clone()), 0, "timeout", true)
            .expect("retry");
        batch
    }

    /// The next unit, batches of up to 100 allowed.
    fn claim_batches(store: &Store) -> Option<Unit> {
        let filter = ClaimFilter {
            batch_size: 100,
            ..filter()
        };
        store.claim(&filter, now_ms()).expect("claim")
    }

    #[test]
    fn a_recorded_batch_is_resent_byte_for_byte_from_its_members_bodies() {
        let (store, _dir) = temp_store();
        let first = recorded_batch(&store);
        let (stored, hash): (Vec<u8>, String) = store
            .conn()
            .query_row(
                "SELECT body, body_sha256 FROM batches WHERE id = ?1",
                [first.id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .expect("the batch row");
        assert!(
            stored.is_empty(),
            "the bodies are stored once, in the outbox"
        );
        assert_eq!(hash, crate::customer::body_hash(&first.body));
        let Some(Unit::Batch(again)) = claim_batches(&store) else {
            panic!("the recorded batch is due again");
        };
        assert_eq!(
            (
                again.id,
                &again.body,
                &again.idempotency_key,
                again.attempts
            ),
            (first.id, &first.body, &first.idempotency_key, 1)
        );
        assert_eq!(again.members, first.members);
    }

    #[test]
    fn a_recorded_batch_whose_body_no_longer_hashes_the_same_goes_out_as_singles() {
        let (store, _dir) = temp_store();
        let first = recorded_batch(&store);
        // As if another sync-daemon version had built (and sent) the body under this key.
        store
            .conn()
            .execute(
                "UPDATE batches SET body_sha256 = 'other' WHERE id = ?1",
                [first.id],
            )
            .expect("tamper");
        let mut singles = Vec::new();
        while let Some(unit) = claim_batches(&store) {
            let Unit::Single(job) = &unit else {
                panic!("the key must not carry a different body: {unit:?}");
            };
            assert_ne!(job.idempotency_key, first.idempotency_key);
            singles.push(job.external_id.clone());
            store
                .finish(
                    &unit,
                    &[(job.id, Finished::Delivered)],
                    DeliveryCounts::default(),
                )
                .expect("finish");
        }
        let members: Vec<String> = first
            .members
            .iter()
            .map(|m| m.external_id.clone())
            .collect();
        singles.sort();
        assert_eq!(singles, members, "every member is sent, alone");
        let left: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM batches", [], |row| row.get(0))
            .expect("count");
        assert_eq!(left, 0);
    }

    #[test]
    fn a_batch_recorded_with_its_body_before_schema_10_is_resent_from_it() {
        let (store, _dir) = temp_store();
        let first = recorded_batch(&store);
        // Bytes the current build would not make (a trailing space), so the test tells the
        // stored copy from a rebuilt one.
        let old_body = [first.body.as_slice(), b" "].concat();
        store
            .conn()
            .execute(
                "UPDATE batches SET body = ?2, body_sha256 = NULL WHERE id = ?1",
                rusqlite::params![first.id, old_body],
            )
            .expect("an old row");
        let Some(Unit::Batch(again)) = claim_batches(&store) else {
            panic!("the recorded batch is due again");
        };
        assert_eq!((again.id, &again.body), (first.id, &old_body));
    }

    /// Rows of `bodies` (schema 11).
    fn body_rows(store: &Store) -> i64 {
        store
            .conn()
            .query_row("SELECT COUNT(*) FROM bodies", [], |row| row.get(0))
            .expect("count")
    }

    /// A state file at schema 10, as the release before `bodies` left it, and a connection to it.
    fn schema_10_file(dir: &tempfile::TempDir) -> (PathBuf, Connection) {
        let path = dir.path().join("state.db");
        let mut old = Connection::open(&path).expect("create");
        super::migrations::migrations()
            .to_version(&mut old, 10)
            .expect("a schema 10 file");
        (path, old)
    }

    #[test]
    fn a_state_file_from_before_schema_11_keeps_its_queued_and_synced_bodies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = {
            let (path, old) = schema_10_file(&dir);
            old.execute_batch(
                "INSERT INTO customers (source, external_id, version, latest_hash, synced_hash,
                                        synced_body, synced_at)
                 VALUES ('gym', 'a', 2, 'h2', 'h1', x'76312d73796e636564', 1),
                        ('gym', 'b', 1, 'hb', 'hb', x'622d73796e636564', 1);
                 INSERT INTO outbox (id, source, external_id, revkeen_source, body, body_hash,
                                     idempotency_key, enqueued_at)
                 VALUES (7, 'gym', 'a', 'wodify', x'76322d717565756564', 'h2', 'key-a-2', 1);",
            )
            .expect("a queued job and two synced customers");
            path
        };
        let store = Store::open(&path).expect("migrated");
        let synced = |id: &str| {
            store
                .lane("gym", id)
                .expect("lane")
                .expect("known")
                .synced_body
        };
        assert_eq!(synced("a").as_deref(), Some(&b"v1-synced"[..]));
        assert_eq!(synced("b").as_deref(), Some(&b"b-synced"[..]));
        assert_eq!(body_rows(&store), 1, "only the queued body moves");
        // The queued job goes out as it was written, under its stored key (invariant 3).
        let Some(Unit::Single(job)) = store.claim(&filter(), now_ms()).expect("claim") else {
            panic!("the queued job is claimable");
        };
        assert_eq!(
            (job.id, job.body.as_slice(), job.idempotency_key.as_str()),
            (7, &b"v2-queued"[..], "key-a-2")
        );
        store
            .finish(
                &Unit::Single(job.clone()),
                &[(job.id, Finished::Delivered)],
                DeliveryCounts::default(),
            )
            .expect("finish");
        // Its body is the customer's now; the one synced before is gone from the row.
        assert_eq!(synced("a").as_deref(), Some(&b"v2-queued"[..]));
        assert_eq!(body_rows(&store), 1);
        let inline: Option<Vec<u8>> = store
            .conn()
            .query_row(
                "SELECT synced_body FROM customers WHERE external_id = 'a'",
                [],
                |row| row.get(0),
            )
            .expect("read");
        assert_eq!(inline, None);
        assert_eq!(synced("b").as_deref(), Some(&b"b-synced"[..]));
    }

    #[test]
    fn a_full_disk_during_the_schema_11_upgrade_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut old) = schema_10_file(&dir);
        old.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
             INSERT INTO outbox (source, external_id, revkeen_source, body, body_hash,
                                 idempotency_key, enqueued_at)
             SELECT 'gym', 'c' || i, 'wodify', randomblob(2000), 'h' || i, 'k' || i, 1 FROM n;",
        )
        .expect("200 queued jobs");
        // Room for a few more pages, not for a copy of 400 KB of bodies.
        let pages: i64 = old
            .pragma_query_value(None, "page_count", |row| row.get(0))
            .expect("page count");
        old.pragma_update(None, "max_page_count", pages + 4)
            .expect("cap");
        let error = super::migrations::migrations()
            .to_latest(&mut old)
            .expect_err("the disk is full");
        assert!(error.to_string().contains("full"), "{error}");
        let (version, intact): (i64, i64) = old
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version),
                        (SELECT COUNT(*) FROM outbox WHERE length(body) = 2000)",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .expect("read");
        assert_eq!(
            (version, intact),
            (10, 200),
            "nothing of V11 is half applied"
        );
        drop(old);
        // With room again, the upgrade runs and every job keeps its body.
        let store = Store::open(&path).expect("migrated");
        let Some(Unit::Single(job)) = store.claim(&filter(), now_ms()).expect("claim") else {
            panic!("a queued job");
        };
        assert_eq!(job.body.len(), 2000);
        assert_eq!(body_rows(&store), 200);
    }

    #[test]
    fn a_deleted_record_never_created_at_revkeen_is_dropped_with_its_body() {
        let (store, _dir) = temp_store();
        // Its create is still waiting when the poll sees it deleted: the deletion replaces it.
        let deleted = PageItem {
            external_id: "gone".to_string(),
            outcome: PageItemOutcome::Customer {
                body: br#"{"email":"gone@x.io","deleted":true}"#.to_vec(),
                update_only: true,
            },
        };
        for page in [item("gone", "gone@x.io"), deleted] {
            store
                .commit_page("gym", "wodify", &[page], CursorSave::Keep, false, false)
                .expect("commit");
        }
        assert_eq!(store.outstanding(&["gym".to_string()]).expect("count"), 1);
        assert_eq!(body_rows(&store), 1);
        assert_eq!(store.claim(&filter(), now_ms()).expect("claim"), None);
        assert_eq!(store.outstanding(&["gym".to_string()]).expect("count"), 0);
        assert_eq!(body_rows(&store), 0, "the dropped job's body is freed");
    }

    #[test]
    fn an_unchanged_page_commits_nothing_and_its_cursor_waits() {
        let (store, dir) = temp_store();
        let path = dir.path().join("state.db");
        let observer = Connection::open(&path).expect("observer");
        let first = store
            .commit_page(
                "gym",
                "wodify",
                &poll_page(),
                CursorSave::WithChanges("c1"),
                false,
                false,
            )
            .expect("commit");
        assert!(first.cursor_saved, "a page that wrote saves its cursor");
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("c1".to_string(), 0))
        );

        // The same page again, rejection and deleted record included: not one write.
        let before = disk_state(&observer, &path);
        let again = store
            .commit_page(
                "gym",
                "wodify",
                &poll_page(),
                CursorSave::WithChanges("c2"),
                false,
                false,
            )
            .expect("commit");
        assert_eq!((again.unchanged, again.rejected, again.skipped), (2, 1, 1));
        assert!(!again.cursor_saved);
        assert_eq!(
            disk_state(&observer, &path),
            before,
            "nothing reached the state file"
        );
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("c1".to_string(), 0))
        );

        // A forced save, or the end of the pass, moves it anyway.
        let forced = store
            .commit_page(
                "gym",
                "wodify",
                &poll_page(),
                CursorSave::Always("c3"),
                false,
                false,
            )
            .expect("commit");
        assert!(forced.cursor_saved);
        let done = store
            .commit_page(
                "gym",
                "wodify",
                &poll_page(),
                CursorSave::WithChanges("c4"),
                true,
                false,
            )
            .expect("commit");
        assert!(done.cursor_saved);
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("c4".to_string(), 1))
        );

        // A rejection that changes its reason is written.
        let before = disk_state(&observer, &path);
        let mut changed = poll_page();
        changed[2].outcome = PageItemOutcome::Rejected(crate::customer::Rejection::new(
            "invalid_email",
            "not an email".to_string(),
            "fix it",
        ));
        let outcome = store
            .commit_page(
                "gym",
                "wodify",
                &changed,
                CursorSave::WithChanges("c5"),
                false,
                false,
            )
            .expect("commit");
        assert!(outcome.cursor_saved);
        assert_ne!(
            disk_state(&observer, &path).0,
            before.0,
            "the new reason was committed"
        );
        let failures = store.failures(None).expect("failures");
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].code, "invalid_email");
    }

    #[test]
    fn a_full_scan_marks_what_it_did_not_list_and_unmarks_what_comes_back() {
        let (store, _dir) = temp_store();
        let page = [
            item("1", "a@x.io"),
            item("2", "b@x.io"),
            item("3", "c@x.io"),
        ];
        store
            .commit_page(
                "gym",
                "wodify",
                &page,
                CursorSave::Always("end"),
                true,
                false,
            )
            .expect("first pass");
        let mut seen = SeenIds::default();
        for id in ["1", "2", "3"] {
            seen.insert(id);
        }
        assert_eq!(
            store
                .record_vanished("gym", 1, &mut seen)
                .expect("vanished"),
            (Vec::new(), 0)
        );

        // Pass 2 lists 1 only; 3 has a rejection, which is moot once it is gone.
        store
            .commit_page(
                "gym",
                "wodify",
                &page[..1],
                CursorSave::WithChanges("end"),
                true,
                false,
            )
            .expect("second pass");
        let mut seen = SeenIds::default();
        seen.insert("1");
        assert_eq!(
            store
                .record_vanished("gym", 2, &mut seen)
                .expect("vanished"),
            (vec!["2".to_string(), "3".to_string()], 2)
        );
        assert_eq!(store.vanished_total("gym").expect("total"), 2);

        // Pass 3: 2 comes back (listed, unchanged); 3 is still gone and not named again.
        store
            .commit_page(
                "gym",
                "wodify",
                &page[..2],
                CursorSave::WithChanges("end"),
                true,
                false,
            )
            .expect("third pass");
        let mut seen = SeenIds::default();
        seen.insert("1");
        seen.insert("2");
        assert_eq!(
            store
                .record_vanished("gym", 3, &mut seen)
                .expect("vanished"),
            (Vec::new(), 1)
        );

        // A record a push wrote during the pass counts as listed even if the scan missed it.
        store
            .commit_push("gym", "wodify", &[item("5", "e@x.io")], &[])
            .expect("push");
        store
            .commit_page(
                "gym",
                "wodify",
                &page[..2],
                CursorSave::WithChanges("end"),
                true,
                false,
            )
            .expect("fourth pass");
        let mut seen = SeenIds::default();
        seen.insert("1");
        seen.insert("2");
        assert_eq!(
            store
                .record_vanished("gym", 4, &mut seen)
                .expect("vanished"),
            (Vec::new(), 1)
        );
    }

    #[test]
    fn a_stopped_pass_keeps_its_ids_for_the_poll_that_continues_it_only() {
        let (store, _dir) = temp_store();
        store
            .commit_page(
                "gym",
                "wodify",
                &[item("1", "a@x.io")],
                CursorSave::Always("p1"),
                false,
                false,
            )
            .expect("page");
        let mut seen = SeenIds::default();
        seen.insert("1");
        store
            .stop_listing("gym", Some("p2"), Some(&mut seen))
            .expect("stop");
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("p2".to_string(), 0))
        );
        let mut kept = store
            .resume_pass("gym", "p2")
            .expect("resume")
            .expect("the ids continue from p2");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept.sorted_bytes(), seen.sorted_bytes());
        // Read once: a second poll from the same place has none (they may be out of date).
        assert!(store.resume_pass("gym", "p2").expect("resume").is_none());

        // Ids saved at another cursor do not continue this one.
        store
            .stop_listing("gym", None, Some(&mut seen))
            .expect("stop");
        assert!(
            store
                .resume_pass("gym", "elsewhere")
                .expect("resume")
                .is_none()
        );
    }

    #[test]
    fn page_jobs_and_cursor_commit_together_and_unchanged_records_are_skipped() {
        let (store, _dir) = temp_store();
        let page = [item("1", "a@x.io"), item("2", "b@x.io")];
        let outcome = store
            .commit_page(
                "gym",
                "wodify",
                &page,
                CursorSave::Always("c1"),
                false,
                false,
            )
            .expect("commit");
        assert_eq!(outcome.enqueued, 2);
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("c1".to_string(), 0))
        );
        assert_eq!(store.outstanding(&filter().sources).expect("count"), 2);
        // Same bodies again: nothing new is queued.
        let again = store
            .commit_page(
                "gym",
                "wodify",
                &page,
                CursorSave::Always("c2"),
                true,
                false,
            )
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
            .commit_page(
                "gym",
                "wodify",
                &[item("1", "a@x.io")],
                CursorSave::Keep,
                false,
                false,
            )
            .expect("commit");
        store
            .commit_page(
                "gym",
                "wodify",
                &[item("1", "b@x.io")],
                CursorSave::Keep,
                false,
                false,
            )
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
            .commit_page(
                "gym",
                "wodify",
                &[item("1", "c@x.io")],
                CursorSave::Keep,
                false,
                false,
            )
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

    /// Statements the hot paths ran while the trace hook was on (one list per process; only
    /// the query-plan test turns the hook on).
    static TRACED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn record(event: rusqlite::trace::TraceEvent<'_>) {
        if let rusqlite::trace::TraceEvent::Stmt(stmt, _) = event {
            let sql = stmt.sql().into_owned();
            let mut traced = TRACED.lock().expect("trace lock");
            if !traced.contains(&sql) {
                traced.push(sql);
            }
        }
    }

    /// No statement on a per-page or per-batch path scans a table that grows with the
    /// merchant (customers, outbox, batches, failures): each is answered from an index, so a
    /// first sync costs the same per record at 1M clients as at 100k. The statements are the
    /// ones a realistic workload actually runs (pages new and unchanged, rejections, batches
    /// acknowledged, a dead letter, retries, singles), each explained by SQLite itself; and
    /// none of them was compiled again while the workload ran.
    #[test]
    fn no_hot_path_statement_scans_a_growing_table() {
        let (store, _dir) = temp_store();
        let batches = ClaimFilter {
            sources: vec!["gym".to_string()],
            batch_size: 100,
            ..ClaimFilter::default()
        };
        let page = |from: usize, version: &str| -> Vec<PageItem> {
            (from..from + 100)
                .map(|n| match n % 25 {
                    0 => PageItem {
                        external_id: n.to_string(),
                        outcome: PageItemOutcome::Rejected(crate::customer::Rejection {
                            code: "no_email",
                            reason: "no email".to_string(),
                            hint: "add one".to_string(),
                        }),
                    },
                    _ => item(&n.to_string(), &format!("m{n}.{version}@x.io")),
                })
                .collect()
        };
        store.conn().trace_v2(
            rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT,
            Some(record),
        );
        for pass in 0..2 {
            for from in (0..300).step_by(100) {
                store
                    .commit_page(
                        "gym",
                        "wodify",
                        &page(from, "a"),
                        CursorSave::Always("c"),
                        from == 200,
                        false,
                    )
                    .expect("commit");
            }
            if pass == 0 {
                store
                    .commit_page(
                        "gym",
                        "wodify",
                        &page(300, "a"),
                        CursorSave::Always("c"),
                        false,
                        false,
                    )
                    .expect("commit");
            }
            while let Some(unit) = store.claim(&batches, now_ms()).expect("claim") {
                let results: Vec<(i64, Finished)> = unit
                    .jobs()
                    .iter()
                    .map(|job| match job.external_id.as_str() {
                        "7" => (
                            job.id,
                            Finished::DeadLetter(crate::store::DeadLetter {
                                code: "invalid".to_string(),
                                reason: "refused".to_string(),
                                http_status: Some(422),
                                field_errors: None,
                                hint: None,
                            }),
                        ),
                        _ => (job.id, Finished::Delivered),
                    })
                    .collect();
                store
                    .finish(&unit, &results, DeliveryCounts::default())
                    .expect("finish");
            }
        }
        // Changes sent one by one, retried, released and acknowledged.
        store
            .commit_page(
                "gym",
                "wodify",
                &page(0, "b"),
                CursorSave::Always("c"),
                false,
                false,
            )
            .expect("commit");
        let Some(unit) = store.claim(&filter(), now_ms()).expect("claim") else {
            panic!("a single");
        };
        store
            .retry_later(&unit, 0, "HTTP 503", true)
            .expect("retry");
        let unit = store
            .claim(&filter(), now_ms())
            .expect("claim")
            .expect("due");
        store.release(&unit).expect("release");
        while let Some(unit) = store.claim(&filter(), now_ms()).expect("claim") {
            let results: Vec<(i64, Finished)> = unit
                .jobs()
                .iter()
                .map(|job| (job.id, Finished::Delivered))
                .collect();
            store
                .finish(&unit, &results, DeliveryCounts::default())
                .expect("finish");
        }
        store.next_due(&filter()).expect("next due");
        store
            .conn()
            .trace_v2(rusqlite::trace::TraceEventCodes::empty(), None);

        let traced = TRACED.lock().expect("trace lock").clone();
        assert!(
            traced.len() > 15,
            "the workload ran the hot paths: {traced:#?}"
        );
        let conn = store.conn();
        // Nor is one compiled again on every run: SQLite re-prepares a statement whose plan
        // may depend on a bound value (a `LIMIT ?`) each time that value is bound.
        let recompiled: Vec<String> = traced
            .iter()
            .filter(|sql| {
                conn.prepare_cached(sql)
                    .is_ok_and(|stmt| stmt.get_status(rusqlite::StatementStatus::RePrepare) > 0)
            })
            .cloned()
            .collect();
        assert!(
            recompiled.is_empty(),
            "statements re-prepared on every run:\n{}",
            recompiled.join("\n")
        );
        let growing = ["customers", "outbox", "batches", "failures"];
        let mut scans = Vec::new();
        for sql in &traced {
            let head = sql.trim_start().to_ascii_uppercase();
            if !["SELECT", "INSERT", "UPDATE", "DELETE", "WITH"]
                .iter()
                .any(|verb| head.starts_with(verb))
            {
                continue;
            }
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explainable");
            let steps: Vec<String> = stmt
                .query_map(
                    rusqlite::params_from_iter(std::iter::repeat_n(
                        rusqlite::types::Null,
                        stmt.parameter_count(),
                    )),
                    |row| row.get::<_, String>(3),
                )
                .expect("plan")
                .collect::<Result<_, _>>()
                .expect("plan rows");
            for step in steps {
                // `SCAN t` reads every row; `SCAN t USING … INDEX` walks an index in order and
                // is bounded by the statement's LIMIT (the claim's walk of outbox_due).
                let scanned = step
                    .strip_prefix("SCAN ")
                    .filter(|rest| !rest.contains("USING"))
                    .map(|rest| rest.split_whitespace().next().unwrap_or(""));
                if let Some(table) = scanned {
                    let named = |t: &str| sql.contains(&format!("{t} {table}")) || t == table;
                    if growing.iter().any(|t| named(t)) {
                        scans.push(format!("{step}\n    in {sql}"));
                    }
                }
            }
        }
        assert!(
            scans.is_empty(),
            "full scans on hot paths:\n{}",
            scans.join("\n")
        );
    }
}
