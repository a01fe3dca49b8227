//! Progress bars for `--once` on a terminal (indicatif), and a log writer that draws around
//! them. When stderr is not a terminal nothing is drawn and logs go straight to stderr.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::run::{ProgressFn, SourceProgress};

/// The bars of one `--once` run.
pub struct ProgressUi {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl ProgressUi {
    /// Bars on stderr, hidden unless stderr is a terminal.
    pub fn new() -> Arc<ProgressUi> {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr_with_hz(5)
        } else {
            ProgressDrawTarget::hidden()
        };
        Arc::new(ProgressUi {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
        })
    }

    /// The callback `run::once` calls with each snapshot.
    pub fn callback(self: &Arc<Self>) -> ProgressFn {
        let ui = self.clone();
        Arc::new(move |snapshot: &[SourceProgress]| ui.update(snapshot))
    }

    fn update(&self, snapshot: &[SourceProgress]) {
        let mut bars = self.bars.lock().expect("progress lock poisoned");
        for source in snapshot {
            let bar = bars.entry(source.name.clone()).or_insert_with(|| {
                let bar = match source.expected {
                    Some(total) => {
                        let bar = ProgressBar::new(total.max(1));
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>12} [{bar:28}] {pos}/{len} fetched · {msg} · ETA {eta}",
                            )
                            .expect("static template")
                            .progress_chars("=> "),
                        );
                        bar
                    }
                    None => {
                        let bar = ProgressBar::new_spinner();
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>12} {spinner} {pos} fetched · {msg}",
                            )
                            .expect("static template"),
                        );
                        bar.enable_steady_tick(Duration::from_millis(120));
                        bar
                    }
                };
                bar.set_prefix(source.name.clone());
                self.multi.add(bar)
            });
            if let Some(total) = bar.length()
                && source.poll.fetched > total
            {
                bar.set_length(source.poll.fetched);
            }
            bar.set_position(source.poll.fetched);
            let phase = if source.poll_done {
                "poll done"
            } else {
                "polling"
            };
            bar.set_message(format!(
                "{} pages · queued {} · sent {} · {phase}",
                source.poll.pages,
                source.poll.enqueued,
                source.sent.delivered()
            ));
        }
    }

    /// Removes the bars (the summary table follows).
    pub fn finish(&self) {
        for bar in self.bars.lock().expect("progress lock poisoned").values() {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }

    /// A writer for log lines that hides the bars while it writes.
    pub fn log_writer(self: &Arc<Self>) -> impl Fn() -> LogWriter + Send + Sync + 'static {
        let multi = self.multi.clone();
        move || LogWriter {
            multi: multi.clone(),
            buffer: Vec::new(),
        }
    }
}

/// Buffers one log event and writes it to stderr with the bars suspended.
pub struct LogWriter {
    multi: MultiProgress,
    buffer: Vec<u8>,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if !self.buffer.is_empty() {
            let buffer = std::mem::take(&mut self.buffer);
            self.multi.suspend(|| {
                let _ = std::io::stderr().write_all(&buffer);
            });
        }
    }
}
