//! How the replay CLI tells people how far it is ([`crate::replay::Progress`]):
//! on a terminal an indicatif bar ([`BarProgress`]); otherwise (logs, CI,
//! a pipe) a plain line every few seconds ([`LineProgress`]), which never
//! writes a carriage return or an escape sequence.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::replay::{Progress, ReplayReport};

/// The line each replay ends with, whichever progress is shown.
pub fn summary(report: &ReplayReport) -> String {
    format!(
        "[{}] {} events into {} documents in {:.1}s ({:.0} events/s), {} dead letters",
        report.projection,
        report.events,
        report.documents,
        report.elapsed.as_secs_f64(),
        report.events_per_second(),
        report.dead_letters
    )
}

/// A bar on the terminal's standard error.
#[derive(Debug, Default)]
pub struct BarProgress {
    bar: Option<ProgressBar>,
}

impl BarProgress {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Progress for BarProgress {
    fn start(&mut self, projection: &str, total: u64) {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        // the template is a constant: it parses, or the default style is fine
        if let Ok(style) =
            ProgressStyle::with_template("[{prefix}] {wide_bar} {pos}/{len} events ({percent}%), {msg}, ETA {eta}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(projection.to_owned());
        bar.set_message("0 events/s");
        self.bar = Some(bar);
    }

    fn advance(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            // indicatif's own {per_sec} prints four decimals
            let rate = done as f64 / bar.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!("{rate:.0} events/s"));
        }
    }

    fn finish(&mut self, report: &ReplayReport) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let _ = writeln!(std::io::stderr(), "{}", summary(report));
    }
}

/// Plain lines into `out`: one at the start, one every `every`, one at the end.
#[derive(Debug)]
pub struct LineProgress<W> {
    out: W,
    every: Duration,
    projection: String,
    total: u64,
    started: Instant,
    last_print: Instant,
}

impl<W: Write> LineProgress<W> {
    pub fn new(out: W, every: Duration) -> Self {
        let now = Instant::now();
        Self {
            out,
            every,
            projection: String::new(),
            total: 0,
            started: now,
            last_print: now,
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    fn line(&self, done: u64) -> String {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / elapsed;
        let eta = if rate > 0.0 && self.total > done {
            format!("{:.0}s", (self.total - done) as f64 / rate)
        } else {
            "-".to_owned()
        };
        let percent = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        format!(
            "[{}] {done}/{} events ({percent:.0}%), {rate:.0} events/s, ETA {eta}",
            self.projection, self.total
        )
    }
}

impl<W: Write> Progress for LineProgress<W> {
    fn start(&mut self, projection: &str, total: u64) {
        self.projection = projection.to_owned();
        self.total = total;
        self.started = Instant::now();
        self.last_print = self.started;
        let _ = writeln!(self.out, "[{projection}] replaying {total} events");
    }

    fn advance(&mut self, done: u64) {
        if self.last_print.elapsed() < self.every {
            return;
        }
        self.last_print = Instant::now();
        let line = self.line(done);
        let _ = writeln!(self.out, "{line}");
    }

    fn finish(&mut self, report: &ReplayReport) {
        let _ = writeln!(self.out, "{}", summary(report));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ReplayReport {
        ReplayReport {
            projection: "orders",
            events: 3_000,
            documents: 1_000,
            dead_letters: 0,
            elapsed: Duration::from_secs(2),
            differences: None,
        }
    }

    #[test]
    fn plain_lines_carry_no_terminal_control_and_come_at_most_every_interval() {
        let mut progress = LineProgress::new(Vec::new(), Duration::ZERO);
        progress.start("orders", 3_000);
        progress.advance(1_500);
        progress.advance(3_000);
        progress.finish(&report());
        let text = String::from_utf8(progress.into_inner()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "[orders] replaying 3000 events");
        assert!(lines[1].starts_with("[orders] 1500/3000 events (50%)"), "{}", lines[1]);
        assert_eq!(
            lines[3],
            "[orders] 3000 events into 1000 documents in 2.0s (1500 events/s), 0 dead letters"
        );
        assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");

        let mut quiet = LineProgress::new(Vec::new(), Duration::from_secs(3_600));
        quiet.start("orders", 10);
        for done in 1..=10 {
            quiet.advance(done);
        }
        quiet.finish(&report());
        assert_eq!(String::from_utf8(quiet.into_inner()).expect("utf-8").lines().count(), 2);
    }

    #[test]
    fn the_bar_survives_a_whole_replay_without_a_terminal() {
        let mut bar = BarProgress::new();
        bar.start("orders", 3);
        bar.advance(2);
        bar.finish(&report());
        assert!(bar.bar.is_none());
    }
}
