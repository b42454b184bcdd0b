//! The text log's field formatter: the same output as tracing-subscriber's `DefaultFields`,
//! written without `core::fmt` where a field is a plain string, an integer or a bool.
//!
//! `DefaultFields` formats every field through `write!` with its name wrapped in an ANSI
//! style (empty when colours are off) and every string through `Debug`, which escapes it
//! one `char` at a time: about 11k instructions for the proxy's access line, as much as
//! parsing the request (BENCHMARKS.md, "Proxy"). Here a string that `Debug` would leave
//! unchanged (printable ASCII without `"` or `\`) is written between quotes as it is, and
//! an integer or bool by `itoa`-free `Display`; everything else (the message, which is
//! sanitized of terminal escapes, floats, `Debug` values, errors with their sources, the
//! `log.*` fields of `log` records, `r#` names, and any field when colours are on) is
//! handed to a `DefaultVisitor`, so that the line is byte for byte what `DefaultFields`
//! writes. A unit test compares the two.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

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

    /// Writes ` name=` (the space only after another field).
    fn name(&mut self, field: &Field) -> fmt::Result {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.writer.write_char(' ')?;
        }
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
        self.delegate(field, |v| v.record_f64(field, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.delegate(field, |v| v.record_debug(field, value));
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
    }

    fn render(fast: bool, ansi: bool) -> String {
        let buffer = Buffer::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .with_ansi(ansi)
            .without_time()
            .with_max_level(tracing::Level::TRACE);
        if fast {
            tracing::subscriber::with_default(builder.fmt_fields(FastFields).finish(), events);
        } else {
            tracing::subscriber::with_default(builder.finish(), events);
        }
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn lines_are_those_of_the_default_formatter() {
        for ansi in [false, true] {
            let default = render(false, ansi);
            assert!(default.contains("route=") || ansi, "{default}");
            assert_eq!(render(true, ansi), default, "ansi {ansi}");
        }
    }
}
