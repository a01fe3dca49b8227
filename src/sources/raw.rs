//! Reading an untrusted page: the envelope first, then each record on its own, so one record
//! that cannot be read is one rejection, never a lost page.
//!
//! A page whose bytes are not all UTF-8 is read with the bad bytes replaced; the records that
//! held them are the ones rejected. Messages about a record never quote its values (a
//! PracticeHub row may hold clinical data): they say what is wrong and where.

use std::borrow::Cow;

use serde_json::value::RawValue;

/// A page's text: as it came when it is UTF-8, else with every bad byte replaced (`true`).
pub(crate) fn text(body: &[u8]) -> (Cow<'_, str>, bool) {
    match std::str::from_utf8(body) {
        Ok(text) => (Cow::Borrowed(text), false),
        Err(_) => (String::from_utf8_lossy(body), true),
    }
}

/// One record's text as it stood in its page, and whether bytes of it were not UTF-8.
pub(crate) struct RawRecord<'a> {
    pub text: &'a RawValue,
    pub damaged: bool,
}

impl<'a> RawRecord<'a> {
    /// `raw` from a page read by [`text`] (`lossy`: it was not all UTF-8).
    pub(crate) fn new(raw: &'a RawValue, lossy: bool) -> RawRecord<'a> {
        RawRecord {
            text: raw,
            damaged: lossy && raw.get().contains('\u{FFFD}'),
        }
    }

    /// A digest of the record's text: what names a record without a usable id.
    pub(crate) fn digest(&self) -> String {
        crate::customer::body_hash(self.text.get().as_bytes())[..12].to_string()
    }
}

/// What is wrong with a record that did not parse, without quoting any of it.
pub(crate) fn json_problem(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match error.classify() {
        Category::Syntax | Category::Eof => "is not valid JSON",
        Category::Data => "has a value of an unexpected type or form",
        Category::Io => "could not be read",
    };
    format!("{what} (at column {})", error.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bytes_mark_only_their_records() {
        let mut body = br#"[{"id":1},{"id":2,"name":"a"#.to_vec();
        body.push(0xff);
        body.extend_from_slice(br#""},{"id":3}]"#);
        let (page, lossy) = text(&body);
        assert!(lossy);
        let records: Vec<Box<RawValue>> = serde_json::from_str(&page).expect("an array");
        let damaged: Vec<bool> = records
            .iter()
            .map(|r| RawRecord::new(r, lossy).damaged)
            .collect();
        assert_eq!(damaged, [false, true, false]);
    }

    #[test]
    fn problems_never_quote_the_record() {
        let error = serde_json::from_str::<u32>(r#""SECRET-NOTE""#).expect_err("a string");
        let problem = json_problem(&error);
        assert!(!problem.contains("SECRET"), "{problem}");
        assert!(problem.contains("unexpected type"), "{problem}");
    }
}
