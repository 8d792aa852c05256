//! File mode: JSON lines from a file or stdin, turns to a file or stdout, dead
//! letters as JSON lines. One file is one partition; the record's position is
//! its 1-based line number. Event time only: no wall-clock advance, and the
//! end of input closes every session.

pub mod config;
pub mod dlq;

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;

use sha2::{Digest, Sha256};

use crate::codec::{encode_turn, Decoder, OutputFormat, Poison};
use crate::config::{Config, ConfigError};
use crate::engine::ClosedSession;
use crate::model::{DeadLetter, DeadLetterReason, DeadLetterSource, Truncated, KEPT_PREFIX_BYTES};
use crate::pipeline::{deliver_all, Outcome, OutcomeSink, PartitionPipeline, Stats};
use crate::redact::Redactor;
use crate::wall_clock::{now_ms, rfc3339_ms, worker_id};

/// Why a file run stopped.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: String, source: io::Error },
}

/// An output file with its own buffer: records are encoded straight into
/// `buf` (no second copy through a `BufWriter`) and written in large chunks.
struct Sink {
    path: String,
    writer: Box<dyn Write>,
    buf: Vec<u8>,
}

impl Sink {
    const CHUNK: usize = 1 << 20;

    /// Opens `path` for writing without truncating it yet (see
    /// [`open_sinks`]), or `dash` for "-".
    fn open(
        key: &str,
        path: &str,
        dash: Box<dyn Write>,
    ) -> Result<(Sink, Option<File>), ConfigError> {
        let (writer, file): (Box<dyn Write>, _) = if path == "-" {
            (dash, None)
        } else {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| ConfigError {
                    key: key.into(),
                    reason: format!("cannot create {path:?}: {e}"),
                })?;
            let handle = file.try_clone().map_err(|e| ConfigError {
                key: key.into(),
                reason: format!("cannot open {path:?}: {e}"),
            })?;
            (Box::new(file), Some(handle))
        };
        let sink = Sink {
            path: path.to_owned(),
            writer,
            buf: Vec::with_capacity(Self::CHUNK + (64 << 10)),
        };
        Ok((sink, file))
    }
    fn write_if_full(&mut self) -> Result<(), FileError> {
        if self.buf.len() >= Self::CHUNK {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), FileError> {
        self.writer
            .write_all(&self.buf)
            .and_then(|()| self.writer.flush())
            .map_err(|source| FileError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.buf.clear();
        Ok(())
    }
}

/// Runs file mode to the end of the input and returns the counts. Every file
/// is opened before the first line is read, so a bad path fails at start.
pub fn run(config: &Config) -> Result<Stats, FileError> {
    let file = config.file_section()?;
    let mut taken = Vec::new();
    let input: Box<dyn BufRead> = if file.input == "-" {
        Box::new(BufReader::with_capacity(1 << 20, io::stdin()))
    } else {
        let (f, id) = open_input(&file.input)?;
        taken.push((id, "file.input"));
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let (output, dlq) = open_sinks(file, taken)?;
    let decoder = Decoder::new(config.input_format(), config.decode_limits());
    let mut runner = Runner {
        pipeline: PartitionPipeline::new(decoder, config.window_config()).named(&file.input),
        redactor: config.redactor()?,
        max_record_bytes: config.input.max_record_bytes,
        format: config.output_format(),
        input_name: file.input.clone(),
        worker: worker_id(),
        output,
        dlq,
    };
    runner.read_all(input)?;
    Ok(runner.pipeline.stats().clone())
}

/// Opens the input file (`file.input`, not `-`) and says which file it is.
fn open_input(path: &str) -> Result<(File, FileId), ConfigError> {
    let error = |reason: String| ConfigError::new("file.input", reason);
    let f = File::open(path).map_err(|e| error(format!("cannot open {path:?}: {e}")))?;
    let id = FileId::of(&f).map_err(|e| error(format!("cannot stat {path:?}: {e}")))?;
    Ok((f, id))
}

/// What `run` checks about the files before it reads a line, without
/// creating, truncating or writing anything (for `check-config`): the input
/// opens, each output's directory exists, an existing output can be written,
/// and no output is the input. Paths are relative to the working directory,
/// as `run` opens them.
pub fn check_paths(file: &crate::config::FileSection) -> Result<(), ConfigError> {
    let mut taken = Vec::new();
    if file.input != "-" {
        let (_, id) = open_input(&file.input)?;
        taken.push((id, "file.input"));
    }
    for (key, path) in [("file.output", &file.output), ("file.dlq", &file.dlq)] {
        if path == "-" {
            continue;
        }
        let error = |reason: String| ConfigError::new(key, reason);
        let dir = std::path::Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(error(format!(
                "the directory {dir:?} of {path:?} does not exist"
            )));
        }
        if std::path::Path::new(path).exists() {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| error(format!("cannot open {path:?} for writing: {e}")))?;
            if f.metadata().is_ok_and(|m| m.is_file()) {
                let id = FileId::of(&f).map_err(|e| error(format!("cannot stat {path:?}: {e}")))?;
                if let Some((_, other)) = taken.iter().find(|(t, _)| *t == id) {
                    return Err(error(format!(
                        "{path:?} is the same file as {other}; refusing to overwrite it"
                    )));
                }
                taken.push((id, key));
            }
        }
    }
    Ok(())
}

/// A file's identity: the same file whatever path (`.`, `..`, symlinks,
/// hard links) named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(file: &File) -> io::Result<FileId> {
        let meta = file.metadata()?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Opens the output and the dead-letter file, and truncates them only after
/// both are known to be neither the input nor each other, by device and
/// inode: paths are not compared as strings, so `./in.jsonl`, `/x/./in.jsonl`,
/// a symlink or a hard link to the input are refused at start instead of
/// destroying it, and nothing is truncated.
fn open_sinks(
    file: &crate::config::FileSection,
    mut taken: Vec<(FileId, &'static str)>,
) -> Result<(Sink, Sink), ConfigError> {
    let mut opened = Vec::new();
    for (key, path, dash) in [
        (
            "file.output",
            &file.output,
            Box::new(io::stdout()) as Box<dyn Write>,
        ),
        ("file.dlq", &file.dlq, Box::new(io::stderr())),
    ] {
        let (sink, handle) = Sink::open(key, path, dash)?;
        // Only regular files can be destroyed (or truncated): `/dev/null`, a
        // pipe or `/dev/stdout` are written as they are.
        let handle = handle.filter(|h| h.metadata().is_ok_and(|m| m.is_file()));
        if let Some(handle) = &handle {
            let id = FileId::of(handle).map_err(|e| ConfigError {
                key: key.into(),
                reason: format!("cannot stat {path:?}: {e}"),
            })?;
            if let Some((_, other)) = taken.iter().find(|(taken, _)| *taken == id) {
                return Err(ConfigError {
                    key: key.into(),
                    reason: format!(
                        "{path:?} is the same file as {other}; refusing to overwrite it"
                    ),
                });
            }
            taken.push((id, key));
        }
        opened.push((sink, handle));
    }
    for (sink, handle) in &opened {
        if let Some(handle) = handle {
            handle.set_len(0).map_err(|e| ConfigError {
                key: "file".into(),
                reason: format!("cannot truncate {:?}: {e}", sink.path),
            })?;
        }
    }
    let mut opened = opened.into_iter().map(|(sink, _)| sink);
    let output = opened.next().expect("two sinks");
    let dlq = opened.next().expect("two sinks");
    Ok((output, dlq))
}

/// Reads the next line into `line`, without its newline; `None` at the end
/// of input. What is buffered is bounded: a line over `max` bytes is read to
/// its end, but `line` keeps only its first [`KEPT_PREFIX_BYTES`] bytes, and
/// the [`Truncated`] returned says its length and SHA-256 (a 200 MB line
/// took 2.7 GB of memory when lines were read whole).
fn read_line_bounded(
    input: &mut dyn BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<Option<Truncated>>> {
    line.clear();
    let mut total = 0usize;
    let mut hasher: Option<Sha256> = None;
    let mut any = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            break;
        }
        any = true;
        let (chunk, used, ended) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        total += chunk.len();
        match &mut hasher {
            Some(h) => h.update(chunk),
            None if total > max => {
                let mut h = Sha256::new_with_prefix(&line[..]);
                h.update(chunk);
                hasher = Some(h);
            }
            None => {}
        }
        let room = match hasher {
            Some(_) => KEPT_PREFIX_BYTES.min(max).saturating_sub(line.len()),
            None => chunk.len(),
        };
        line.extend_from_slice(&chunk[..room.min(chunk.len())]);
        if hasher.is_some() {
            line.truncate(KEPT_PREFIX_BYTES.min(max));
        }
        input.consume(used);
        if ended {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    Ok(Some(
        hasher.map(|h| Truncated::from_hasher(total as u64, h)),
    ))
}

struct Runner {
    pipeline: PartitionPipeline,
    redactor: Option<Redactor>,
    max_record_bytes: usize,
    format: OutputFormat,
    input_name: String,
    worker: String,
    output: Sink,
    dlq: Sink,
}

impl Runner {
    fn read_all(&mut self, mut input: Box<dyn BufRead>) -> Result<(), FileError> {
        let mut line = Vec::with_capacity(1024);
        let mut outcomes = Vec::new();
        let mut line_number = 0u64;
        let mut now = now_ms();
        let max = self.max_record_bytes;
        loop {
            let read = read_line_bounded(&mut input, &mut line, max).map_err(|source| {
                FileError::Read {
                    path: self.input_name.clone(),
                    source,
                }
            })?;
            let Some(truncated) = read else { break };
            line_number += 1;
            if let Some(t) = &truncated {
                let poison = Poison::oversize(format!(
                    "the record is {} bytes, over input.max_record_bytes ({max}); the dead \
                     letter keeps its first {} bytes, its length and its SHA-256",
                    t.original_bytes,
                    line.len()
                ));
                self.pipeline.reject(line_number, poison, &mut outcomes);
                self.write(&mut outcomes, &line, truncated)?;
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines are not records
            }
            // The clock only serves the future-skew check: reading it once
            // per 1024 lines is precise enough and keeps it off the hot path.
            if line_number % 1024 == 0 {
                now = now_ms();
            }
            self.pipeline
                .process(&line, line_number, now, &mut outcomes);
            self.write(&mut outcomes, &line, None)?;
        }
        self.pipeline.flush(&mut outcomes);
        self.write(&mut outcomes, &[], None)?;
        self.output.write_out()?;
        self.dlq.write_out()
    }

    /// Writes outcomes; `line` is the record just processed (the only one a
    /// dead letter can be about).
    /// `truncated`: `line` is only the record's first bytes.
    fn write(
        &mut self,
        outcomes: &mut Vec<Outcome>,
        line: &[u8],
        truncated: Option<Truncated>,
    ) -> Result<(), FileError> {
        let mut output = FileOutput {
            runner: self,
            line,
            truncated,
            error: None,
        };
        deliver_all(outcomes, &mut output);
        output.error.map_or(Ok(()), Err)
    }
}

/// The file sinks as the pipeline's output; keeps the first write error.
struct FileOutput<'a> {
    runner: &'a mut Runner,
    line: &'a [u8],
    truncated: Option<Truncated>,
    error: Option<FileError>,
}

impl OutcomeSink for FileOutput<'_> {
    fn turn(&mut self, mut session: ClosedSession) {
        let r = &mut *self.runner;
        if let Some(redactor) = &r.redactor {
            redactor.apply(&mut session);
        }
        let buf = &mut r.output.buf;
        match r.format {
            OutputFormat::Json => {
                encode_turn(&session, OutputFormat::Json, buf);
                buf.push(b'\n');
            }
            OutputFormat::Protobuf => {
                let mut body = Vec::new();
                encode_turn(&session, OutputFormat::Protobuf, &mut body);
                prost::encoding::encode_varint(body.len() as u64, buf);
                buf.extend_from_slice(&body);
            }
        }
        if let Err(e) = r.output.write_if_full() {
            self.error.get_or_insert(e);
        }
    }

    fn dead_letter(&mut self, seq: u64, reason: DeadLetterReason, error: String) {
        let r = &mut *self.runner;
        let mut letter = DeadLetter::new(
            reason,
            error,
            DeadLetterSource {
                kind: "file".into(),
                name: r.input_name.clone(),
                position: seq,
            },
            rfc3339_ms(now_ms()),
            r.worker.clone(),
            self.line,
        );
        letter.truncated = self.truncated.take();
        serde_json::to_writer(&mut r.dlq.buf, &letter).expect("a dead letter serializes");
        r.dlq.buf.push(b'\n');
        // Dead letters are rare and an operator may be tailing them.
        if let Err(e) = r.dlq.write_out() {
            self.error.get_or_insert(e);
        }
    }

    /// File mode has no commit position: it reads its whole input each run.
    fn resolve(&mut self, _seqs: &[u64], _held_by: Option<u64>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of `input`, read through a buffer of `capacity` bytes.
    fn lines(input: &[u8], capacity: usize, max: usize) -> Vec<(Vec<u8>, Option<Truncated>)> {
        let mut reader = BufReader::with_capacity(capacity, input);
        let mut line = Vec::new();
        let mut out = Vec::new();
        while let Some(truncated) = read_line_bounded(&mut reader, &mut line, max).unwrap() {
            out.push((line.clone(), truncated));
        }
        out
    }

    #[test]
    fn lines_within_the_bound_are_read_whole_in_any_buffer_size() {
        for capacity in [1, 3, 1024] {
            let got = lines(b"ab\n\ncdef\nlast", capacity, 4);
            let want: Vec<(Vec<u8>, Option<Truncated>)> = [&b"ab"[..], b"", b"cdef", b"last"]
                .iter()
                .map(|l| (l.to_vec(), None))
                .collect();
            assert_eq!(got, want, "capacity {capacity}");
        }
    }

    #[test]
    fn a_line_over_the_bound_keeps_a_prefix_its_length_and_hash() {
        let long = vec![b'x'; 3 * KEPT_PREFIX_BYTES];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        for capacity in [7, 8192, 1 << 20] {
            let got = lines(&input, capacity, 2 * KEPT_PREFIX_BYTES);
            assert_eq!(got.len(), 2, "the next line survives");
            let (kept, truncated) = &got[0];
            assert_eq!(kept[..], long[..KEPT_PREFIX_BYTES]);
            let truncated = truncated.as_ref().expect("over the bound");
            assert_eq!(truncated.original_bytes, long.len() as u64);
            let whole = Truncated::from_hasher(long.len() as u64, Sha256::new_with_prefix(&long));
            assert_eq!(truncated, &whole);
            assert_eq!(got[1], (b"next".to_vec(), None));
        }
        // A bound below the kept prefix keeps no more than the bound.
        let got = lines(b"0123456789\n", 2, 4);
        assert_eq!(got[0].0, b"0123");
        assert_eq!(got[0].1.as_ref().unwrap().original_bytes, 10);
    }
}
