//! Text for a terminal: aligned tables (`status`, the `--once` summary) and the escaping of
//! control characters in anything an upstream wrote (an id or an error code carrying
//! `ESC]0;…` must not retitle or recolour the operator's terminal). JSON output is never
//! escaped here: it stays exact.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every control character (C0, DEL, C1) shown as a `\u{…}` escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Rows (the first one the header) as aligned columns two spaces apart, one line each;
/// `right_aligned(column)` picks the numeric columns.
pub(crate) fn text_table(rows: &[Vec<String>], right_aligned: impl Fn(usize) -> bool) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape(cell).into_owned()).collect())
        .collect();
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\u{1b}]0;owned\u{7}b"), "a\\u{1b}]0;owned\\u{7}b");
        assert_eq!(
            escape("nul\0del\u{7f}c1\u{9b}"),
            "nul\\u{0}del\\u{7f}c1\\u{9b}"
        );
        let table = text_table(&[vec!["ID".into()], vec!["x\u{1b}[31m".into()]], |_| false);
        assert!(!table.contains('\u{1b}'), "{table:?}");
    }
}
