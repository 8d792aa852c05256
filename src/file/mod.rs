//! File mode: JSON lines from a file or stdin, turns to a file or stdout, dead
//! letters as JSON lines. One file is one partition; the record's position is
//! its 1-based line number. Event time only: no wall-clock advance, and the
//! end of input closes every session.

pub mod dlq;

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;

use crate::codec::{encode_turn, Decoder, OutputFormat};
use crate::config::{Config, ConfigError};
use crate::model::{DeadLetter, DeadLetterSource};
use crate::pipeline::{Outcome, PartitionPipeline, Stats};
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
        let error = |reason: String| ConfigError {
            key: "file.input".into(),
            reason,
        };
        let f = File::open(&file.input)
            .map_err(|e| error(format!("cannot open {:?}: {e}", file.input)))?;
        let id = FileId::of(&f).map_err(|e| error(format!("cannot stat {:?}: {e}", file.input)))?;
        taken.push((id, "file.input"));
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let (output, dlq) = open_sinks(file, taken)?;
    let decoder = Decoder::new(config.input_format(), config.decode_limits());
    let mut runner = Runner {
        pipeline: PartitionPipeline::new(decoder, config.window_config()),
        format: config.output_format(),
        input_name: file.input.clone(),
        worker: worker_id(),
        output,
        dlq,
    };
    runner.read_all(input)?;
    Ok(runner.pipeline.stats().clone())
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

struct Runner {
    pipeline: PartitionPipeline,
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
        loop {
            line.clear();
            // A whole line, however long: an oversize one is dead-lettered
            // byte for byte.
            let read = input
                .read_until(b'\n', &mut line)
                .map_err(|source| FileError::Read {
                    path: self.input_name.clone(),
                    source,
                })?;
            if read == 0 {
                break;
            }
            line_number += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
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
            self.write(&mut outcomes, &line)?;
        }
        self.pipeline.flush(&mut outcomes);
        self.write(&mut outcomes, &[])?;
        self.output.write_out()?;
        self.dlq.write_out()
    }

    /// Writes outcomes; `line` is the record just processed (the only one a
    /// dead letter can be about).
    fn write(&mut self, outcomes: &mut Vec<Outcome>, line: &[u8]) -> Result<(), FileError> {
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::Turn(session) => {
                    let buf = &mut self.output.buf;
                    match self.format {
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
                    self.output.write_if_full()?;
                }
                Outcome::DeadLetter { seq, reason, error } => {
                    let letter = DeadLetter::new(
                        reason,
                        error,
                        DeadLetterSource {
                            kind: "file".into(),
                            name: self.input_name.clone(),
                            position: seq,
                        },
                        rfc3339_ms(now_ms()),
                        self.worker.clone(),
                        line,
                    );
                    serde_json::to_writer(&mut self.dlq.buf, &letter)
                        .expect("a dead letter serializes");
                    self.dlq.buf.push(b'\n');
                    // Dead letters are rare and an operator may be tailing them.
                    self.dlq.write_out()?;
                }
                Outcome::Dropped { .. } => {}
            }
        }
        Ok(())
    }
}
