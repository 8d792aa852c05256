//! The file-mode dead-letter file (JSON lines) as `sessionizer dlq` reads
//! it. A file is only read: `dlq replay` writes the selected records (after
//! any `--transform`) as a new input file for the next file-mode run, and
//! keeps no progress of its own (the dead-letter file is rewritten by every
//! run anyway).

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};

use anyhow::Context as _;

use crate::config::FileSection;
use crate::dlq::{parse_failed_at, DlqEntry, Locator};
use crate::model::DeadLetter;

pub struct FileDlq {
    path: String,
    /// Bytes and lines read so far (for `follow`).
    offset: u64,
    lines: u64,
    out: Option<Box<dyn Write + Send>>,
    out_name: Option<String>,
}

impl std::fmt::Debug for FileDlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDlq")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileDlq {
    pub fn open(file: &FileSection) -> anyhow::Result<FileDlq> {
        anyhow::ensure!(
            file.dlq != "-",
            "invalid configuration: file.dlq: dead letters went to stderr; there is no file to read"
        );
        Ok(FileDlq {
            path: file.dlq.clone(),
            offset: 0,
            lines: 0,
            out: None,
            out_name: None,
        })
    }

    /// Every dead letter in the file, in file order.
    pub fn snapshot(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        self.offset = 0;
        self.lines = 0;
        self.read_more()
    }

    /// Lines appended since the last read (polls once a second).
    pub async fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        let entries = self.read_more()?;
        if entries.is_empty() {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        Ok(entries)
    }

    fn read_more(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening the dead-letter file {}", self.path))?;
        if file.metadata()?.len() < self.offset {
            // Rewritten by a new file-mode run: start over.
            self.offset = 0;
            self.lines = 0;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(file);
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break; // the end, or a line still being written
            }
            self.offset += n as u64;
            self.lines += 1;
            let dead: DeadLetter = serde_json::from_str(line.trim_end())
                .with_context(|| format!("{}:{}: not a dead letter", self.path, self.lines))?;
            out.push(entry(&self.path, self.lines, dead)?);
        }
        Ok(out)
    }

    pub fn target(&self, to: Option<&str>) -> String {
        to.unwrap_or("-").to_owned()
    }

    /// Writes one record as a line of the replay file (`--to`, default
    /// stdout).
    pub fn republish(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let out = self.out.as_mut().context("no replay output set")?;
        out.write_all(payload)?;
        out.write_all(b"\n")?;
        Ok(())
    }

    /// Where replayed records go: `-` is stdout.
    pub fn set_output(&mut self, to: &str) -> anyhow::Result<()> {
        if self.out_name.as_deref() != Some(to) {
            self.out = Some(if to == "-" {
                Box::new(std::io::stdout())
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(to).with_context(|| format!("creating {to}"))?,
                ))
            });
            self.out_name = Some(to.to_owned());
        }
        Ok(())
    }

    pub fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(out) = &mut self.out {
            out.flush()?;
        }
        Ok(())
    }
}

fn entry(path: &str, line: u64, dead: DeadLetter) -> anyhow::Result<DlqEntry> {
    let payload = dead
        .original_bytes()
        .with_context(|| format!("{path}:{line}: payload_base64"))?;
    Ok(DlqEntry {
        position: format!("{path}:{line}"),
        locator: Locator::File { line },
        failed_at_ms: parse_failed_at(&dead.failed_at),
        failed_at: dead.failed_at,
        reason: dead.reason.as_str().to_owned(),
        error: dead.error,
        source: dead.source.name,
        source_partition: None,
        source_position: dead.source.position.to_string(),
        worker: dead.worker,
        replay_count: 0,
        key: None,
        payload,
        headers: Vec::new(),
    })
}
