//! The process's exit codes: one table for `--once`, `--dry-run`, the daemon and the operator
//! commands (sysexits where one fits). ARCHITECTURE.md lists them for operators.

/// Process exit codes (ARCHITECTURE.md, "External interface"; sysexits where one fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitStatus {
    /// Everything delivered.
    Ok = 0,
    /// Anything else went wrong.
    Failure = 1,
    /// Bad command line.
    Usage = 2,
    /// Finished, but some records were rejected or dead-lettered.
    Rejected = 65,
    /// An upstream stayed unavailable.
    Unavailable = 69,
    /// The state file is in use by another sync-daemon process: try again later (EX_TEMPFAIL).
    TempFail = 75,
    /// An API refused its key.
    AuthRefused = 77,
    /// The configuration is invalid.
    Config = 78,
    /// `--once` stopped by SIGINT (128 + 2), after finishing what was in flight.
    Interrupted = 130,
    /// `--once` stopped by SIGTERM (128 + 15), after finishing what was in flight.
    Terminated = 143,
}

impl ExitStatus {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}
