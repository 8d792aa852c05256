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
    /// The file's first line when it was read: a file-mode run rewrites
    /// the file, and a rewrite that is already longer than what was read
    /// shows only here.
    first_line: Option<String>,
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
            first_line: None,
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
        let file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening the dead-letter file {}", self.path))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        if self.offset > 0 {
            reader.read_line(&mut line)?;
            if reader.get_ref().metadata()?.len() < self.offset
                || self.first_line.as_deref() != Some(line.as_str())
            {
                // Rewritten by a new file-mode run: start over.
                self.offset = 0;
                self.lines = 0;
            }
        }
        reader.seek(SeekFrom::Start(self.offset))?;
        let mut out = Vec::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break; // the end, or a line still being written
            }
            if self.offset == 0 {
                self.first_line = Some(line.clone());
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
        truncated: dead.truncated,
        headers: Vec::new(),
    })
}

impl crate::dlq::DeadLetterStore for FileDlq {
    /// A file is only read: no replay progress.
    async fn snapshot(&mut self, _replay_group: Option<&str>) -> anyhow::Result<Vec<DlqEntry>> {
        FileDlq::snapshot(self)
    }

    async fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        FileDlq::follow(self).await
    }

    fn target(
        &self,
        _entry: &DlqEntry,
        _payload: &[u8],
        to: Option<&str>,
    ) -> anyhow::Result<String> {
        Ok(FileDlq::target(self, to))
    }

    async fn republish(
        &mut self,
        _entry: &DlqEntry,
        payload: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<bool> {
        self.set_output(target)?;
        FileDlq::republish(self, &payload).map(|()| true)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        FileDlq::finish(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeadLetterReason, DeadLetterSource};

    fn dead_letter(id: u32) -> String {
        let source = DeadLetterSource {
            kind: "file".into(),
            name: "in.jsonl".into(),
            position: u64::from(id),
        };
        let payload = format!("{{\"message_id\":\"m{id}\"}}");
        let dead = DeadLetter::new(
            DeadLetterReason::Invalid,
            "text is missing".into(),
            source,
            "2026-11-23T00:00:00.000Z".into(),
            "w".into(),
            payload.as_bytes(),
        );
        let mut line = serde_json::to_string(&dead).unwrap();
        line.push('\n');
        line
    }

    #[tokio::test]
    async fn follow_starts_over_when_a_new_run_rewrites_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        std::fs::write(&path, [dead_letter(1), dead_letter(2)].concat()).unwrap();
        let section = FileSection {
            input: "-".into(),
            output: "-".into(),
            dlq: path.to_str().unwrap().to_owned(),
        };
        let mut dlq = FileDlq::open(&section).unwrap();
        assert_eq!(dlq.snapshot().unwrap().len(), 2);
        // Appended: only the new line.
        let mut appended = std::fs::read_to_string(&path).unwrap();
        appended.push_str(&dead_letter(3));
        std::fs::write(&path, &appended).unwrap();
        let new = dlq.follow().await.unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].position, format!("{}:3", section.dlq));
        // Rewritten by a new run, already longer than what was read.
        std::fs::write(&path, (10..15).map(dead_letter).collect::<String>()).unwrap();
        let rewritten = dlq.follow().await.unwrap();
        let payloads: Vec<String> = rewritten
            .iter()
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .collect();
        assert_eq!(payloads.len(), 5, "the whole new file: {payloads:?}");
        assert!(payloads[0].contains("m10"));
    }
}
