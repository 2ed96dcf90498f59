//! The agent's log lines go to a buffer, and a thread of their own writes them to stderr in
//! batches.
//!
//! Written directly, every line is a `write(2)` on the worker thread that logged it: one per
//! connection and agent (the connection record), and a worker blocks for as long as the
//! reader of its stderr (a container runtime's pipe) does not keep up, with every connection
//! it serves. Here a worker only copies its line into the buffer. The writer thread gathers
//! lines for [`GATHER`] after the first one arrives and writes them with one call. When the
//! buffer holds [`CAPACITY`] bytes, further lines are dropped and counted, and the count is
//! logged once the writer catches up: the data path never waits on the log.
//!
//! [`Lines::start`] returns a [`Flush`]; dropping it writes what is left and stops the thread.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer waits after a line arrives in an empty buffer, to write more at once.
pub const GATHER: Duration = Duration::from_millis(10);

/// Bytes the buffer holds before lines are dropped.
pub const CAPACITY: usize = 1 << 20;

/// A batch buffer keeps at most this much capacity once written, so a burst does not stay
/// resident.
const KEEP: usize = 64 << 10;

/// The buffered log: a [`tracing_subscriber::fmt::MakeWriter`] (each line is one `write`).
#[derive(Clone)]
pub struct Lines {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a line arrives in an empty buffer, when the buffer is half full, and on
    /// close.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// Lines dropped and not yet reported in the log.
    unreported: u64,
    /// Lines dropped since the start.
    dropped: u64,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left whole lines or none.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Lines {
    /// Starts the writer thread, writing to `out`.
    pub fn start(out: impl Write + Send + 'static) -> io::Result<(Lines, Flush)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || write_batches(&shared, out))?
        };
        let lines = Lines { shared };
        let flush = Flush {
            lines: lines.clone(),
            writer: Some(writer),
        };
        Ok((lines, flush))
    }

    /// Lines dropped since the start, because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }
}

impl Write for &Lines {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let before = state.buf.len();
        if before + line.len() > CAPACITY {
            state.unreported += 1;
            state.dropped += 1;
        } else {
            state.buf.extend_from_slice(line);
            let half = CAPACITY / 2;
            if before == 0 || (before < half && state.buf.len() >= half) {
                self.shared.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = &'a Lines;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Writes what is buffered and stops the writer when dropped.
pub struct Flush {
    lines: Lines,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.lines.shared.lock().closed = true;
        self.lines.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.buf.is_empty() && !state.closed {
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if !state.closed {
            state = shared
                .wake
                .wait_timeout_while(state, GATHER, |s| !s.closed && s.buf.len() < CAPACITY / 2)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::swap(&mut batch, &mut state.buf);
        let dropped = std::mem::take(&mut state.unreported);
        let closed = state.closed && batch.is_empty();
        drop(state);
        if closed {
            return;
        }
        // A reader that went away takes the lines with it; there is nowhere else to put them.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        batch.shrink_to(KEEP);
        if dropped > 0 {
            // Through the subscriber, in the log's format, into the next batch.
            tracing::warn!(
                dropped,
                "log lines dropped: stderr was not read fast enough"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that keeps what it got, and can be held up: a write counts itself as
    /// entered, then waits for the gate.
    #[derive(Clone, Default)]
    struct Sink {
        got: Arc<Mutex<Vec<u8>>>,
        entered: Arc<Mutex<usize>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            *self.entered.lock().unwrap() += 1;
            let _held = self.gate.lock().unwrap();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(lines: &Lines, text: &str) {
        let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(lines);
        w.write_all(text.as_bytes()).unwrap();
    }

    #[allow(
        clippy::disallowed_methods,
        reason = "a test's own thread, not a runtime worker"
    )]
    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn lines_are_written_in_batches_and_all_of_them_on_flush() {
        let sink = Sink::default();
        let gate = sink.gate.lock().unwrap();
        let (lines, flush) = Lines::start(sink.clone()).unwrap();
        let logged = std::time::Instant::now();
        line(&lines, "first\n");
        wait_for("the first line is never written", || {
            *sink.entered.lock().unwrap() == 1
        });
        assert!(
            logged.elapsed() >= GATHER,
            "written before the gathering time"
        );
        // Logged while the writer is busy: all of them go out in its next write.
        for i in 0..100 {
            line(&lines, &format!("line {i}\n"));
        }
        drop(gate);
        wait_for("the lines are never written", || {
            sink.got.lock().unwrap().ends_with(b"line 99\n")
        });
        assert_eq!(*sink.entered.lock().unwrap(), 2);
        // Closing does not wait for the gathering time of what is left.
        line(&lines, "last\n");
        drop(flush);
        let expected = (0..100).fold("first\n".to_owned(), |text, i| {
            text + &format!("line {i}\n")
        });
        let got = String::from_utf8(sink.got.lock().unwrap().clone()).unwrap();
        assert_eq!(got, expected + "last\n");
        assert_eq!(lines.dropped(), 0);
    }

    #[test]
    fn a_stuck_reader_costs_lines_not_waiting() {
        let sink = Sink::default();
        let gate = sink.gate.lock().unwrap();
        let (lines, flush) = Lines::start(sink.clone()).unwrap();
        // The first line is taken by the writer, which then waits on the stuck reader.
        line(&lines, "first\n");
        wait_for("the first line is never written", || {
            *sink.entered.lock().unwrap() == 1
        });
        // The buffer fills and the rest are dropped, without the loggers waiting.
        let text = "x".repeat(1023) + "\n";
        let n = 2 * CAPACITY / text.len();
        let started = std::time::Instant::now();
        for _ in 0..n {
            line(&lines, &text);
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        let kept = CAPACITY / text.len();
        assert_eq!(lines.dropped(), (n - kept) as u64);
        drop(gate);
        drop(flush);
        let got = String::from_utf8(sink.got.lock().unwrap().clone()).unwrap();
        assert!(got.starts_with("first\n"));
        assert_eq!(
            got.matches(&text).count(),
            kept,
            "the buffer holds CAPACITY bytes"
        );
    }
}
