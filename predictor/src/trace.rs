//! Reading request traces: CSV with header `ts_ms,client,service`, plain or gzipped.
//!
//! [`Reader`] streams [`Event`]s from any [`std::io::Read`], detecting gzip by its magic bytes
//! (`1f 8b`). Every bad row becomes a [`RowError`] carrying its 1-based line number; [`read`]
//! either skips bad rows and collects their errors ([`OnError::Skip`], keeping the first
//! [`MAX_KEPT_ERRORS`] and counting the rest) or stops at the first ([`OnError::Stop`]).
//! Blank lines are ignored. Fields are not quoted (names never contain commas); a line longer
//! than [`MAX_LINE`] bytes is refused without being held in memory.
//!
//! This module reads from a reader the caller opened; it never opens files itself.

use std::io::{self, BufRead, BufReader, Read};

use flate2::bufread::MultiGzDecoder;
use serde::{Deserialize, Serialize};

/// The required header line.
pub const HEADER: &str = "ts_ms,client,service";
/// Longest accepted line, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Row errors kept by [`read`] in skip mode; later ones are only counted.
pub const MAX_KEPT_ERRORS: usize = 1000;

/// One request: `client` asked for `service` at `ts_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds, any epoch.
    pub ts_ms: u64,
    /// Who asked.
    pub client: String,
    /// What was asked for.
    pub service: String,
}

/// A refused row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RowError {
    /// The row does not have exactly three comma-separated fields.
    #[error("line {line}: expected 3 fields `ts_ms,client,service`, found {found}")]
    FieldCount {
        /// 1-based line number.
        line: u64,
        /// Fields found.
        found: usize,
    },
    /// `ts_ms` is not an unsigned integer.
    #[error("line {line}: ts_ms {value:?} is not a non-negative integer")]
    Timestamp {
        /// 1-based line number.
        line: u64,
        /// The offending text (truncated to 40 characters).
        value: String,
    },
    /// `client` or `service` is empty.
    #[error("line {line}: empty {field}")]
    EmptyField {
        /// 1-based line number.
        line: u64,
        /// `client` or `service`.
        field: &'static str,
    },
    /// The row is not valid UTF-8.
    #[error("line {line}: not valid UTF-8")]
    NotUtf8 {
        /// 1-based line number.
        line: u64,
    },
    /// The row is longer than [`MAX_LINE`] bytes.
    #[error("line {line}: longer than {MAX_LINE} bytes")]
    TooLong {
        /// 1-based line number.
        line: u64,
    },
}

impl RowError {
    /// The 1-based line number of the refused row.
    pub fn line(&self) -> u64 {
        match self {
            RowError::FieldCount { line, .. }
            | RowError::Timestamp { line, .. }
            | RowError::EmptyField { line, .. }
            | RowError::NotUtf8 { line }
            | RowError::TooLong { line } => *line,
        }
    }
}

/// A failure that ends reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The input is empty: not even a header.
    #[error("empty trace: expected header `{HEADER}`")]
    Empty,
    /// The first line is not the expected header.
    #[error("line 1: expected header `{HEADER}`, found {found:?}")]
    Header {
        /// The first line (truncated to 80 characters).
        found: String,
    },
    /// Reading or decompressing failed.
    #[error("line {line}: read error: {source}")]
    Io {
        /// Line being read when it failed.
        line: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A bad row, in [`OnError::Stop`] mode.
    #[error(transparent)]
    Row(#[from] RowError),
}

/// What [`read`] does with a bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnError {
    /// Skip it, keep its error, go on.
    #[default]
    Skip,
    /// Stop with its error.
    Stop,
}

/// A whole trace read by [`read`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Good rows, in file order.
    pub events: Vec<Event>,
    /// Errors of the first [`MAX_KEPT_ERRORS`] bad rows.
    pub errors: Vec<RowError>,
    /// Number of bad rows, including those whose errors were not kept.
    pub bad_rows: u64,
}

/// A streaming trace reader: yields one item per non-blank data row.
pub struct Reader<'a> {
    input: Box<dyn BufRead + 'a>,
    line: u64,
    buf: Vec<u8>,
    started: bool,
}

impl std::fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl<'a> Reader<'a> {
    /// Wraps `input`, decompressing it if it starts with the gzip magic bytes.
    pub fn new(input: impl Read + 'a) -> Result<Self, TraceError> {
        let mut buffered = BufReader::new(input);
        let gz = {
            let head = buffered
                .fill_buf()
                .map_err(|source| TraceError::Io { line: 1, source })?;
            head.starts_with(&[0x1f, 0x8b])
        };
        let input: Box<dyn BufRead + 'a> = if gz {
            Box::new(BufReader::new(MultiGzDecoder::new(buffered)))
        } else {
            Box::new(buffered)
        };
        Ok(Self {
            input,
            line: 0,
            buf: Vec::new(),
            started: false,
        })
    }

    /// Reads the next raw line into `self.buf` (without the line ending). `Ok(false)` at end of
    /// input; `Ok(true)` with `self.buf` empty for a line over `MAX_LINE` (marked by `too_long`).
    fn next_line(&mut self, too_long: &mut bool) -> Result<bool, TraceError> {
        self.buf.clear();
        *too_long = false;
        let line = self.line + 1;
        let io = |source| TraceError::Io { line, source };
        let n = (&mut self.input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.buf)
            .map_err(io)?;
        if n == 0 {
            return Ok(false);
        }
        self.line = line;
        if self.buf.last() != Some(&b'\n') && self.buf.len() > MAX_LINE {
            *too_long = true;
            // Discard the rest of the line without holding it.
            loop {
                let chunk = self.input.fill_buf().map_err(io)?;
                if chunk.is_empty() {
                    break;
                }
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.input.consume(i + 1);
                        break;
                    }
                    None => {
                        let len = chunk.len();
                        self.input.consume(len);
                    }
                }
            }
            self.buf.clear();
            return Ok(true);
        }
        while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
            self.buf.pop();
        }
        Ok(true)
    }

    fn header(&mut self) -> Result<(), TraceError> {
        let mut too_long = false;
        if !self.next_line(&mut too_long)? {
            return Err(TraceError::Empty);
        }
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim_start_matches('\u{feff}').trim();
        if too_long || text != HEADER {
            return Err(TraceError::Header {
                found: truncate(text, 80),
            });
        }
        Ok(())
    }

    fn parse(&self) -> Result<Event, RowError> {
        let line = self.line;
        let text = std::str::from_utf8(&self.buf).map_err(|_| RowError::NotUtf8 { line })?;
        let mut fields = text.split(',');
        let (Some(ts), Some(client), Some(service), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(RowError::FieldCount {
                line,
                found: text.split(',').count(),
            });
        };
        let ts = ts.trim();
        let ts_ms = ts.parse::<u64>().map_err(|_| RowError::Timestamp {
            line,
            value: truncate(ts, 40),
        })?;
        let (client, service) = (client.trim(), service.trim());
        if client.is_empty() {
            return Err(RowError::EmptyField {
                line,
                field: "client",
            });
        }
        if service.is_empty() {
            return Err(RowError::EmptyField {
                line,
                field: "service",
            });
        }
        Ok(Event {
            ts_ms,
            client: client.to_owned(),
            service: service.to_owned(),
        })
    }

    /// The next row: `None` at end of input, `Some(Err(TraceError::Row))` for a bad row (reading
    /// can go on), any other error is fatal.
    pub fn next_event(&mut self) -> Option<Result<Event, TraceError>> {
        if !self.started {
            self.started = true;
            if let Err(e) = self.header() {
                return Some(Err(e));
            }
        }
        loop {
            let mut too_long = false;
            match self.next_line(&mut too_long) {
                Err(e) => return Some(Err(e)),
                Ok(false) => return None,
                Ok(true) if too_long => {
                    return Some(Err(RowError::TooLong { line: self.line }.into()))
                }
                Ok(true) if self.buf.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(true) => return Some(self.parse().map_err(TraceError::Row)),
            }
        }
    }
}

impl Iterator for Reader<'_> {
    type Item = Result<Event, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event()
    }
}

/// Reads a whole trace. Header, I/O and decompression errors always stop; bad rows stop or are
/// skipped as `on_error` says.
pub fn read(input: impl Read, on_error: OnError) -> Result<Trace, TraceError> {
    let mut trace = Trace::default();
    let mut reader = Reader::new(input)?;
    while let Some(item) = reader.next_event() {
        match item {
            Ok(ev) => trace.events.push(ev),
            Err(TraceError::Row(e)) if on_error == OnError::Skip => {
                trace.bad_rows += 1;
                if trace.errors.len() < MAX_KEPT_ERRORS {
                    trace.errors.push(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const GOOD: &str = "ts_ms,client,service\n1,a,x\n2,b,y\n";

    #[test]
    fn reads_plain_and_gzip_alike() {
        let plain = read(GOOD.as_bytes(), OnError::Stop).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(GOOD.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let unzipped = read(&gz[..], OnError::Stop).unwrap();
        assert_eq!(plain, unzipped);
        assert_eq!(plain.events.len(), 2);
        assert_eq!(
            plain.events[1],
            Event {
                ts_ms: 2,
                client: "b".into(),
                service: "y".into()
            }
        );
    }

    #[test]
    fn skip_mode_reports_bad_rows_with_line_numbers_and_keeps_going() {
        let text = "ts_ms,client,service\r\n1,a,x\r\nnope,a,x\n\n3,a\n4,,x\n5,a,x,extra\n6,c,z";
        let t = read(text.as_bytes(), OnError::Skip).unwrap();
        assert_eq!(t.events.len(), 2, "rows 2 and 8 are good");
        assert_eq!(t.events[1].ts_ms, 6);
        let lines: Vec<u64> = t.errors.iter().map(RowError::line).collect();
        assert_eq!(lines, vec![3, 5, 6, 7]);
        assert_eq!(t.bad_rows, 4);
        assert!(matches!(t.errors[0], RowError::Timestamp { .. }));
        assert!(matches!(t.errors[1], RowError::FieldCount { found: 2, .. }));
        assert!(matches!(
            t.errors[2],
            RowError::EmptyField {
                field: "client",
                ..
            }
        ));
        assert!(t.errors[3].to_string().starts_with("line 7:"));
    }

    #[test]
    fn stop_mode_stops_at_first_bad_row() {
        let text = "ts_ms,client,service\n1,a,x\n2,a\n3,a,x\n";
        match read(text.as_bytes(), OnError::Stop) {
            Err(TraceError::Row(e)) => assert_eq!(e.line(), 3),
            other => panic!("expected a row error, got {other:?}"),
        }
    }

    #[test]
    fn empty_and_headerless_input_are_errors() {
        assert!(matches!(
            read(&b""[..], OnError::Skip),
            Err(TraceError::Empty)
        ));
        assert!(matches!(
            read(&b"1,a,x\n"[..], OnError::Skip),
            Err(TraceError::Header { .. })
        ));
        let only_header = read(&b"ts_ms,client,service"[..], OnError::Stop).unwrap();
        assert!(only_header.events.is_empty());
    }

    #[test]
    fn long_lines_and_bad_utf8_are_refused() {
        let mut text = b"ts_ms,client,service\n1,a,".to_vec();
        text.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        text.extend(b"\n2,a,\xff\xfe\n3,a,y\n");
        let t = read(&text[..], OnError::Skip).unwrap();
        assert_eq!(t.events.len(), 1);
        assert!(matches!(t.errors[0], RowError::TooLong { line: 2 }));
        assert!(matches!(t.errors[1], RowError::NotUtf8 { line: 3 }));
    }

    #[test]
    fn truncated_gzip_is_an_io_error_not_a_panic() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(GOOD.repeat(100).as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let r = read(&gz[..gz.len() / 2], OnError::Skip);
        assert!(matches!(r, Err(TraceError::Io { .. })), "{r:?}");
    }
}
