//! Where log lines go: a buffer in memory that a thread of its own writes out in batches.
//!
//! A line is appended to the buffer under a short lock by the thread that logs it (a
//! copy, no allocation once the buffer has grown). The writing thread sleeps until the
//! buffer has something, lets a batch gather for [`BATCH_DELAY`], then takes the whole
//! buffer and writes it with one `write`. Under load that is one system call and one
//! wake-up per batch, not per line: tracing-appender, used before, allocated each line,
//! sent it over a channel and woke its thread for almost every line (at 16,000 proxied
//! requests in 3 s, 0.8 `write`, 0.8 `sched_yield` and 0.3 `futex` calls per request;
//! BENCHMARKS.md, "Proxy").
//!
//! While lines keep coming, the writing thread does not wait to be woken: it looks at the
//! buffer again every [`BATCH_DELAY`] and only after [`LINGER`] without a line sleeps
//! until the next one. So a steady stream of lines (the proxy's access log at any rate
//! above a few a second) never has a thread that logs make the `futex` call that wakes
//! it, a call that sits in the request's path and, on an idle CPU of a virtual machine,
//! costs an inter-processor interrupt. An idle process still has a sleeping log thread.
//!
//! No line is dropped: past [`MAX_WAITING`] bytes waiting, a thread that logs waits for the
//! writing thread. Lines appear within [`BATCH_DELAY`] of being logged while the output
//! keeps up (a stalled pipe holds them, then the threads that log). The
//! [`Flush`] guard, held by `main`, writes what is left when it is dropped; lines logged
//! after that are written directly.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writing thread lets lines gather once the first one of a batch came.
pub const BATCH_DELAY: Duration = Duration::from_millis(5);

/// How long the writing thread keeps looking every [`BATCH_DELAY`] after the last line
/// before it sleeps until woken.
pub const LINGER: Duration = Duration::from_millis(100);

/// Bytes waiting past which a thread that logs waits for the writing thread.
pub const MAX_WAITING: usize = 4 << 20;

/// A batch buffer larger than this is not kept for the next batch.
const KEEP_CAPACITY: usize = 1 << 20;

/// Hands out writers for `tracing_subscriber::fmt().with_writer(...)`; cheap to clone.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes on drop: the writing thread writes what is waiting and stops; later lines are
/// written directly, in order after those.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// The writing thread waits here for lines (or the end).
    lines: Condvar,
    /// Threads that log wait here while [`State::max_waiting`] bytes are waiting.
    room: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
    /// How often a thread that logs woke the writing thread.
    wakes: AtomicUsize,
}

struct State {
    buf: Vec<u8>,
    /// The writing thread is waiting on `lines` (so a line into an empty buffer wakes it;
    /// otherwise there is no system call to make).
    idle: bool,
    /// Threads that log waiting on `room`.
    blocked: usize,
    /// The writing thread is to write what is left and stop.
    closing: bool,
    /// The writing thread has stopped: lines are written directly.
    direct: bool,
    max_waiting: usize,
}

impl BatchWriter {
    /// A writer to `out` and its guard; starts the writing thread.
    pub fn new(out: impl Write + Send + 'static) -> std::io::Result<(Self, Flush)> {
        Self::with_limit(out, MAX_WAITING)
    }

    fn with_limit(
        out: impl Write + Send + 'static,
        max_waiting: usize,
    ) -> std::io::Result<(Self, Flush)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: Vec::new(),
                idle: false,
                blocked: 0,
                closing: false,
                direct: false,
                max_waiting,
            }),
            lines: Condvar::new(),
            room: Condvar::new(),
            out: Mutex::new(Box::new(out)),
            wakes: AtomicUsize::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("agentgate-log".into())
            .spawn({
                let shared = shared.clone();
                move || shared.write_batches()
            })?;
        Ok((
            Self {
                shared: shared.clone(),
            },
            Flush {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_out(&self, bytes: &[u8]) {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        // Nowhere to report a failed log write; the next batch tries again.
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }

    /// One line (or any bytes) from a thread that logs.
    fn push(&self, bytes: &[u8]) {
        let mut state = self.state();
        while state.buf.len() >= state.max_waiting && !state.direct {
            state.blocked += 1;
            state = self
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.blocked -= 1;
        }
        if state.direct {
            drop(state);
            return self.write_out(bytes);
        }
        state.buf.extend_from_slice(bytes);
        let wake = state.idle;
        state.idle = false;
        drop(state);
        if wake {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            self.lines.notify_one();
        }
    }

    /// The writing thread: each round takes what is waiting and writes it, then waits a
    /// batch's delay, or, after [`LINGER`] without a line, until a line wakes it.
    fn write_batches(&self) {
        let mut batch = Vec::new();
        let linger_rounds = LINGER.as_millis() / BATCH_DELAY.as_millis().max(1);
        // Rounds without a line; at the start there was none for a long time.
        let mut quiet = linger_rounds;
        loop {
            let mut state = self.state();
            std::mem::swap(&mut state.buf, &mut batch);
            let closing = state.closing;
            let blocked = state.blocked > 0;
            if batch.is_empty() && closing {
                // Everything is written.
                state.direct = true;
            }
            drop(state);
            if blocked {
                self.room.notify_all();
            }
            if batch.is_empty() {
                if closing {
                    return;
                }
                quiet += 1;
            } else {
                quiet = 0;
                self.write_out(&batch);
                batch.clear();
                if batch.capacity() > KEEP_CAPACITY {
                    batch = Vec::new();
                }
            }
            if closing {
                // Write what is left at once.
                continue;
            }
            if quiet >= linger_rounds {
                let mut state = self.state();
                while state.buf.is_empty() && !state.closing {
                    state.idle = true;
                    state = self
                        .lines
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                state.idle = false;
                if state.closing {
                    continue;
                }
            }
            // Let the batch gather.
            std::thread::sleep(BATCH_DELAY);
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.state().closing = true;
        self.shared.lines.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer of one event.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.shared.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    /// A sink that records what it got, and the number of `write` calls; it blocks while
    /// `hold` is set.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        hold: Arc<AtomicBool>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            while self.hold.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.bytes.lock().unwrap().extend_from_slice(buf);
            *self.writes.lock().unwrap() += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    fn line(writer: &BatchWriter, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    /// Every line of every thread arrives whole and in its thread's order, in far fewer
    /// writes than lines; the last ones when the guard is dropped.
    #[test]
    fn lines_of_many_threads_arrive_whole_in_order_in_batches() {
        let sink = Sink::default();
        let (writer, flush) = BatchWriter::new(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        line(&writer, &format!("thread {t} line {i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(flush);
        let text = sink.text();
        for t in 0..4 {
            let numbers: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..2000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(text.lines().count(), 8000);
        let writes = *sink.writes.lock().unwrap();
        assert!(writes < 8000 / 4, "{writes} writes for 8000 lines");
        // After the guard: written directly.
        line(&writer, "after\n");
        assert!(sink.text().ends_with("after\n"));
    }

    /// A line shows without the guard being dropped, soon after it was logged.
    #[test]
    fn a_line_is_written_within_the_batch_delay() {
        let sink = Sink::default();
        let (writer, _flush) = BatchWriter::new(sink.clone()).unwrap();
        for text in ["first\n", "second\n"] {
            line(&writer, text);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sink.text().ends_with(text) {
                assert!(Instant::now() < deadline, "not written: {text}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(sink.text(), "first\nsecond\n");
    }

    /// While lines keep coming, the writing thread looks for them itself: threads that log
    /// wake it only for the first line after a quiet spell (at most a few times here, where
    /// waking it for each batch would be 20 times and more), also when lines come further
    /// apart than a batch's delay; and it goes back to sleep when the lines stop, so an idle
    /// process has no thread waking every few milliseconds.
    #[test]
    fn a_steady_stream_of_lines_does_not_wake_the_writing_thread_for_each_batch() {
        let sink = Sink::default();
        let (writer, _flush) = BatchWriter::new(sink.clone()).unwrap();
        let asleep = || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !writer.shared.state().idle {
                assert!(Instant::now() < deadline, "the writing thread never slept");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        asleep();
        for i in 0..60 {
            line(&writer, &format!("line {i}\n"));
            let gap = if i < 40 {
                2
            } else {
                3 * BATCH_DELAY.as_millis() as u64
            };
            std::thread::sleep(Duration::from_millis(gap));
        }
        let wakes = writer.shared.wakes.load(Ordering::Relaxed);
        assert!((1..=3).contains(&wakes), "{wakes} wake-ups for 60 lines");
        asleep();
        assert_eq!(sink.text().lines().count(), 60);
        line(&writer, "after a quiet spell\n");
        assert_eq!(writer.shared.wakes.load(Ordering::Relaxed), wakes + 1);
    }

    /// Past the limit of bytes waiting, a thread that logs waits for the writing thread
    /// instead of dropping lines or growing without bound.
    #[test]
    fn a_thread_that_logs_waits_when_too_much_is_waiting() {
        let sink = Sink::default();
        sink.hold.store(true, Ordering::Release);
        let (writer, flush) = BatchWriter::with_limit(sink.clone(), 64).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let logger = std::thread::spawn({
            let (writer, done) = (writer.clone(), done.clone());
            move || {
                for i in 0..100 {
                    line(&writer, &format!("{i:031}\n"));
                }
                done.store(true, Ordering::Release);
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!done.load(Ordering::Acquire), "the logger never waited");
        let waiting = writer.shared.state().buf.len();
        assert!(waiting <= 64 + 32, "{waiting} bytes waiting");
        sink.hold.store(false, Ordering::Release);
        logger.join().unwrap();
        drop(flush);
        assert_eq!(sink.text().lines().count(), 100);
    }
}
