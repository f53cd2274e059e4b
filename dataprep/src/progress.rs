//! Progress reporting on stderr: a redrawn bar on a terminal, plain lines every few seconds
//! otherwise (logs, CI), nothing when disabled.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Progress {
    enabled: bool,
    tty: bool,
    total_bytes: u64,
    started: Instant,
    last_plain: Option<Instant>,
    drawn: bool,
}

impl Progress {
    pub(crate) fn new(enabled: bool, total_bytes: u64) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            total_bytes,
            started: Instant::now(),
            last_plain: None,
            drawn: false,
        }
    }

    pub(crate) fn update(&mut self, bytes: u64, docs: u64, instances: u64) {
        if !self.enabled {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let mb_s = bytes as f64 / 1e6 / secs;
        let fraction = if self.total_bytes > 0 {
            (bytes as f64 / self.total_bytes as f64).min(1.0)
        } else {
            0.0
        };
        let eta = if fraction > 0.0 {
            format_duration(secs * (1.0 - fraction) / fraction)
        } else {
            "?".into()
        };
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let filled = (fraction * width as f64) as usize;
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {:>3.0}%  {:.1} MB/s  docs {}  instances {}  ETA {}",
                "#".repeat(filled),
                "-".repeat(width - filled),
                fraction * 100.0,
                mb_s,
                docs,
                instances,
                eta
            );
            let _ = err.flush();
            self.drawn = true;
        } else if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            self.last_plain = Some(Instant::now());
            let _ = writeln!(
                err,
                "dataprep: {:.0}% of input, {:.1} MB/s, {} documents, {} instances, ETA {}",
                fraction * 100.0,
                mb_s,
                docs,
                instances,
                eta
            );
        }
    }

    pub(crate) fn finish(&mut self) {
        if self.enabled && self.tty && self.drawn {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}
