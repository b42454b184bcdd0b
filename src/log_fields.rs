//! The text log's line, field formatter and timestamp: the same output as
//! tracing-subscriber's `Format<Full>`, `DefaultFields` and `SystemTime`, for less work per
//! line.
//!
//! [`FastFormat`] writes the line around the fields (`timestamp LEVEL target: fields`)
//! directly; `Format<Full>` writes its level, target and separators through `write!` with
//! each piece wrapped in an ANSI style, empty when colours are off (about 1k instructions
//! of the proxy's access line). With colours on, inside a span, or for a record of the
//! `log` crate, the line is left to `Format<Full>`.
//!
//! [`FastTime`] formats the date and time of day once per second per thread and only the
//! microseconds for each line (`SystemTime` formats the whole RFC 3339 timestamp per line:
//! 2.4k instructions of the proxy's access line).
//!
//! `DefaultFields` formats every field through `write!` with its name wrapped in an ANSI
//! style (empty when colours are off) and every string through `Debug`, which escapes it
//! one `char` at a time: about 11k instructions for the proxy's access line, as much as
//! parsing the request (BENCHMARKS.md, "Proxy"). Here a string that `Debug` would leave
//! unchanged (printable ASCII without `"` or `\`) is written between quotes as it is, and
//! an integer or bool by its `Display`, the message when
//! sanitizing it changes nothing as it is, any other value by one `write!` of its `Debug`
//! without the styling; what `DefaultVisitor` treats specially (the message, which is
//! sanitized of terminal escapes, errors with their sources, the `log.*` fields of `log`
//! records, `r#` names, and any field when colours are on) is handed to a
//! `DefaultVisitor`, so that the line is byte for byte what `DefaultFields` writes. A unit
//! test compares the two.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Use with `tracing_subscriber::fmt().event_format(FastFormat::default())`: the lines of
/// `tracing_subscriber::fmt().with_timer(FastTime)` (the default `Format<Full>`: timestamp,
/// level and target shown; thread names, ids, file and line not).
#[derive(Debug, Clone)]
pub struct FastFormat {
    full: Format<Full, FastTime>,
}

impl Default for FastFormat {
    fn default() -> Self {
        Self {
            full: Format::default().with_timer(FastTime),
        }
    }
}

impl<S, N> FormatEvent<S, N> for FastFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // Colours, the spans' names and fields, and a `log` record's normalized metadata
        // (its callsites have target `log`) are `Format<Full>`'s to write.
        if writer.has_ansi_escapes() || meta.target() == "log" || ctx.event_scope().is_some() {
            return self.full.format_event(ctx, writer, event);
        }
        if FastTime.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// Use with `tracing_subscriber::fmt().with_timer(FastTime)`: `2026-12-03T13:52:47.897398Z`,
/// as `tracing_subscriber::fmt::time::SystemTime` writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastTime;

impl FormatTime for FastTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        match std::time::SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => write_timestamp(w, since),
            // A clock before 1970: the library's own formatting.
            Err(_) => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

thread_local! {
    /// The message of the event being formatted on this thread.
    static MESSAGE: RefCell<String> = const { RefCell::new(String::new()) };
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `since` (from the Unix epoch) as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`.
fn write_timestamp(w: &mut dyn fmt::Write, since: Duration) -> fmt::Result {
    let secs = since.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let Some(t) = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            else {
                return Err(fmt::Error);
            };
            cached.1.clear();
            fmt::Write::write_fmt(
                &mut cached.1,
                format_args!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                ),
            )?;
            cached.0 = secs;
        }
        w.write_str(&cached.1)
    })?;
    let mut micros = since.subsec_micros();
    let mut digits = [b'0'; 8];
    digits[0] = b'.';
    digits[7] = b'Z';
    for d in digits[1..7].iter_mut().rev() {
        // A decimal digit: `micros % 10` is below 10.
        *d = b'0' + u8::try_from(micros % 10).unwrap_or(0);
        micros /= 10;
    }
    w.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
}

/// Use with `tracing_subscriber::fmt().fmt_fields(FastFields)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastFields;

impl<'a> MakeVisitor<Writer<'a>> for FastFields {
    type Visitor = FastVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        FastVisitor {
            plain: !target.has_ansi_escapes(),
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

/// The visitor of [`FastFields`].
pub struct FastVisitor<'a> {
    writer: Writer<'a>,
    /// No ANSI colours: field names are written bare.
    plain: bool,
    /// Nothing written yet (no space before the first field).
    is_empty: bool,
    result: fmt::Result,
}

impl FastVisitor<'_> {
    /// Whether this field may take the fast path: not the message, not a `log.*` or `r#`
    /// name (which `DefaultVisitor` treats specially), colours off.
    fn fast(&self, field: &Field) -> bool {
        let name = field.name();
        self.plain && name != "message" && !name.starts_with("log.") && !name.starts_with("r#")
    }

    /// A space before every field but the first.
    fn separate(&mut self) -> fmt::Result {
        if self.is_empty {
            self.is_empty = false;
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    /// Writes ` name=` (the space only after another field).
    fn name(&mut self, field: &Field) -> fmt::Result {
        self.separate()?;
        self.writer.write_str(field.name())?;
        self.writer.write_char('=')
    }

    /// Lets `DefaultVisitor` write the field, from where this one stands.
    fn delegate(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        // `DefaultVisitor` skips `log.*` fields without writing anything.
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }

    /// `name=` and the value's `Debug` (of a `%` field: its `Display`), as `DefaultVisitor`
    /// writes it with colours off.
    fn debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .name(field)
            .and_then(|()| write!(self.writer, "{value:?}"));
    }

    /// The message (colours off): `DefaultVisitor` writes its `Debug` through a writer that
    /// escapes terminal controls (`\x1b`, `\x07`, `\x08`, `\x0c`, `\x7f`, U+0080..U+009F)
    /// when the writer sanitizes. Formatted once here; when it holds none of them (UTF-8
    /// `0xC2` starts every U+0080..U+00BF, so any such byte counts as one) it is written as
    /// it is, else `DefaultVisitor` writes it.
    fn message(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        MESSAGE.with(|buffer| {
            let Ok(mut text) = buffer.try_borrow_mut() else {
                // Formatting the message logged another event on this thread.
                return self.delegate(field, |v| v.record_debug(field, value));
            };
            text.clear();
            let sanitize = self.writer.sanitizes_ansi_escapes();
            let clean = fmt::Write::write_fmt(&mut *text, format_args!("{value:?}")).is_ok()
                && !(sanitize
                    && text
                        .bytes()
                        .any(|b| matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2)));
            if !clean {
                drop(text);
                return self.delegate(field, |v| v.record_debug(field, value));
            }
            self.result = self.separate().and_then(|()| self.writer.write_str(&text));
        });
    }

    fn display(&mut self, field: &Field, value: impl fmt::Display) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .name(field)
            .and_then(|()| write!(self.writer, "{value}"));
    }
}

/// Whether `Debug` leaves `s` as it is between its quotes.
fn debug_is_plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for FastVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.fast(field) || !debug_is_plain(value) {
            return self.delegate(field, |v| v.record_str(field, value));
        }
        if self.result.is_err() {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            self.writer.write_char('"')?;
            self.writer.write_str(value)?;
            self.writer.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.fast(field) {
            return self.delegate(field, |v| v.record_u64(field, value));
        }
        self.display(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if !self.fast(field) {
            return self.delegate(field, |v| v.record_i64(field, value));
        }
        self.display(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.fast(field) {
            return self.delegate(field, |v| v.record_bool(field, value));
        }
        self.display(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if !self.fast(field) {
            return self.delegate(field, |v| v.record_f64(field, value));
        }
        self.debug(field, &value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.plain && field.name() == "message" {
            return self.message(field, value);
        }
        if !self.fast(field) {
            return self.delegate(field, |v| v.record_debug(field, value));
        }
        self.debug(field, value);
    }
}

impl VisitOutput<fmt::Result> for FastVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for FastVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer failure")]
    struct Outer(#[source] io::Error);

    /// Every kind of field the gateway logs, and the ones that must not take the fast
    /// path, through both formatters: the same bytes.
    fn events() {
        let addr: std::net::SocketAddr = "127.0.0.1:4431".parse().unwrap();
        let error = Outer(io::Error::other("inner cause"));
        tracing::info!(
            target: "agentgate::access",
            route = "open",
            upstream = "http://127.0.0.1:9000",
            method = %"GET",
            path = %"/open/x",
            status = 200u16,
            ms = 0.412_f64,
            remote = %addr,
            identity = %"key:ci",
            request_id = "4d57abdac46321eb9c5dd028691f6cf6",
            "proxied"
        );
        tracing::warn!(
            quoted = "say \"hi\"",
            backslash = "a\\b",
            tab = "a\tb",
            unicode = "é and \u{1b}[31m",
            empty = "",
            negative = -5i64,
            yes = true,
            debug = ?vec![1, 2],
            r#type = "raw name",
            error = &error as &(dyn std::error::Error + 'static),
            "message with \u{1b}[2J an escape {}", 7
        );
        tracing::error!(only = 1u64);
        tracing::info!("no fields");
        tracing::info!(first = "a", message = "explicit message field", last = 2u64);
        // Messages the sanitizer changes, or might (`0xC2` starts U+0080..U+00BF), and
        // ones it leaves.
        tracing::warn!("bell \u{7} and C1 \u{85} here");
        tracing::debug!("a cent \u{a2}, an e acute \u{e9}, a snowman \u{2603}");
        tracing::trace!(n = 1u64, "{} formatted {:?}", "args", "quoted");
        // Floats, `Debug` writing some with an exponent.
        for ms in [
            0.412,
            0.001,
            0.000_999,
            0.000_1,
            0.000_01,
            1.0,
            1.5,
            12.345_678_9,
            999.999_5,
            1e15,
            9.999e14,
            1e16,
            123_456_789.123,
            0.0,
            -0.0,
            -1.5,
            f64::NAN,
            f64::INFINITY,
        ] {
            tracing::info!(target: "agentgate::access", ms, "proxied");
        }
        // Inside spans: `Format<Full>` writes these lines.
        let span = tracing::info_span!("connection", peer = 7u64);
        span.in_scope(|| {
            tracing::info!(status = 200u64, "in a span");
            tracing::info_span!("inner").in_scope(|| tracing::warn!("nested"));
        });
        tracing::error!("after the spans");
    }

    /// Every line of [`events`] through tracing-subscriber's own formatters (with our
    /// timer) or ours, timestamps masked.
    fn render(fast: bool, ansi: bool) -> String {
        let buffer = Buffer::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .with_ansi(ansi)
            .with_max_level(tracing::Level::TRACE);
        if fast {
            let subscriber = builder
                .fmt_fields(FastFields)
                .event_format(FastFormat::default())
                .finish();
            tracing::subscriber::with_default(subscriber, events);
        } else {
            tracing::subscriber::with_default(builder.with_timer(FastTime).finish(), events);
        }
        let bytes = buffer.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let mut masked = String::new();
        for line in text.lines() {
            // `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`, after the colour code when there is one.
            let at = line.find('T').and_then(|t| t.checked_sub(10)).unwrap();
            let stamp = &line[at..at + 27];
            assert!(stamp.ends_with('Z'), "{line}");
            masked.push_str(&line.replacen(stamp, "<time>", 1));
            masked.push('\n');
        }
        masked
    }

    /// The cached timestamp is RFC 3339 with microseconds, the same instant as the `time`
    /// crate formats it, across second and day boundaries and back in time.
    #[test]
    fn timestamps_match_rfc3339_with_microseconds() {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        for (secs, micros) in [
            (1_796_306_261, 897_398),
            (1_796_306_261, 0),
            (1_796_306_261, 999_999),
            (1_796_306_262, 5),
            (1_796_342_399, 1),
            (1_796_342_400, 10),
            (0, 0),
            (1_796_306_261, 42),
            (951_782_400, 123_456),
        ] {
            let since = Duration::new(secs, micros * 1000);
            let mut ours = String::new();
            write_timestamp(&mut ours, since).unwrap();
            let theirs = time::OffsetDateTime::from_unix_timestamp_nanos(since.as_nanos() as i128)
                .unwrap()
                .format(&format)
                .unwrap();
            assert_eq!(ours, theirs);
        }
        // The shape of the library's own timestamp for now.
        let mut ours = String::new();
        let mut theirs = String::new();
        FastTime.format_time(&mut Writer::new(&mut ours)).unwrap();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        let shape = |s: &str| {
            s.chars()
                .map(|c| if c.is_ascii_digit() { '9' } else { c })
                .collect::<String>()
        };
        assert_eq!(shape(&ours), shape(&theirs));
    }

    #[test]
    fn lines_are_those_of_the_default_formatter() {
        for ansi in [false, true] {
            let default = render(false, ansi);
            assert!(default.contains("route=") || ansi, "{default}");
            assert!(
                default.contains("connection{peer=7}:inner:") || ansi,
                "{default}"
            );
            assert_eq!(render(true, ansi), default, "ansi {ansi}");
        }
    }
}
