//! Requests spent on each source per calendar month (`request_budget`, migration V8), for the
//! monthly request budget (`sources/budget.rs` decides; this only keeps the figures). The count
//! is written ahead of the requests it covers, so the file never shows fewer than were sent.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::secret::redact;

/// A source's month as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetMonth {
    /// Requests counted this month (at least those sent).
    pub used: u64,
    /// What the last complete poll cost, this month or (when none completed yet) the newest
    /// earlier month that has one.
    pub scan_requests: Option<u64>,
    /// When that poll started (Unix ms), this month only.
    pub scan_started_at: Option<i64>,
    /// When the source last said its own quota is spent (Unix ms), this month.
    pub quota_spent_at: Option<i64>,
    /// Why polls are spaced out or stopped this month.
    pub note: Option<String>,
}

/// A count that does not fit SQLite's integer is stored as its largest value.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Store {
    /// The source's figures for `month` (`YYYY-MM`), defaults when nothing was recorded; an
    /// older state file without the table (read by `status` before the daemon migrated it)
    /// reads as nothing recorded.
    pub fn budget_month(&self, source: &str, month: &str) -> Result<BudgetMonth, StoreError> {
        let conn = self.conn();
        let exists: bool = conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'request_budget'",
                [],
                |row| row.get(0),
            )
            .map_err(|e| self.err(e))?;
        if !exists {
            return Ok(BudgetMonth::default());
        }
        let row = conn
            .query_row(
                "SELECT used, scan_requests, scan_started_at, quota_spent_at, note
                   FROM request_budget WHERE source = ?1 AND month = ?2",
                params![source, month],
                |row| {
                    Ok(BudgetMonth {
                        used: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                        scan_requests: row
                            .get::<_, Option<i64>>(1)?
                            .and_then(|n| u64::try_from(n).ok()),
                        scan_started_at: row.get(2)?,
                        quota_spent_at: row.get(3)?,
                        note: row.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let mut month_row = row.unwrap_or_default();
        if month_row.scan_requests.is_none() {
            month_row.scan_requests = conn
                .query_row(
                    "SELECT scan_requests FROM request_budget
                      WHERE source = ?1 AND month < ?2 AND scan_requests IS NOT NULL
                      ORDER BY month DESC LIMIT 1",
                    params![source, month],
                    |row| row.get::<_, i64>(0),
                )
                .optional()
                .map_err(|e| self.err(e))?
                .and_then(|n| u64::try_from(n).ok());
        }
        Ok(month_row)
    }

    /// Records the month's count.
    pub fn set_budget_used(&self, source: &str, month: &str, used: u64) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO request_budget (source, month, used) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source, month) DO UPDATE SET used = excluded.used",
            )
            .and_then(|mut stmt| stmt.execute(params![source, month, int(used)]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Records what a complete poll that started at `started_at` cost, with the month's count.
    pub fn set_budget_scan(
        &self,
        source: &str,
        month: &str,
        used: u64,
        requests: u64,
        started_at: i64,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO request_budget (source, month, used, scan_requests, scan_started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (source, month) DO UPDATE SET used = excluded.used,
                     scan_requests = excluded.scan_requests,
                     scan_started_at = excluded.scan_started_at",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![source, month, int(used), int(requests), started_at])
            })
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Records when the source last said its quota is spent (`None`: it answers again).
    pub fn set_quota_spent(
        &self,
        source: &str,
        month: &str,
        at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO request_budget (source, month, quota_spent_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source, month) DO UPDATE SET quota_spent_at = excluded.quota_spent_at",
            )
            .and_then(|mut stmt| stmt.execute(params![source, month, at]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Records why polls are spaced out or stopped this month (`None`: they are not).
    pub fn set_budget_note(
        &self,
        source: &str,
        month: &str,
        note: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO request_budget (source, month, note) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source, month) DO UPDATE SET note = excluded.note",
            )
            .and_then(|mut stmt| stmt.execute(params![source, month, note.map(redact)]))
            .map(drop)
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::temp_store;

    #[test]
    fn a_month_starts_at_zero_and_carries_the_last_scan_cost_over() {
        let (store, _dir) = temp_store();
        assert_eq!(store.budget_month("gym", "2026-11").expect("read").used, 0);
        store.set_budget_used("gym", "2026-11", 40).expect("used");
        store
            .set_budget_scan("gym", "2026-11", 52, 12, 1_000)
            .expect("scan");
        store.set_quota_spent("gym", "2026-11", Some(5)).expect("q");
        let november = store.budget_month("gym", "2026-11").expect("read");
        assert_eq!(
            (
                november.used,
                november.scan_requests,
                november.quota_spent_at
            ),
            (52, Some(12), Some(5))
        );
        let december = store.budget_month("gym", "2026-12").expect("read");
        assert_eq!((december.used, december.scan_requests), (0, Some(12)));
        assert_eq!(december.quota_spent_at, None);
        assert_eq!(
            store.budget_month("clinic", "2026-12").expect("read").used,
            0
        );
    }
}
