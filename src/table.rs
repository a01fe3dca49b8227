//! Aligned text tables for terminal output (`status`, the `--once` summary).

use std::fmt::Write as _;

/// Rows (the first one the header) as aligned columns two spaces apart, one line each;
/// `right_aligned(column)` picks the numeric columns.
pub(crate) fn text_table(rows: &[Vec<String>], right_aligned: impl Fn(usize) -> bool) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &width))| {
                if right_aligned(c) {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}
