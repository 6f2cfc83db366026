//! Finished messages (sent, cancelled, suppressed, and the statuses of
//! failed ones), remembered across restarts so that their status and
//! events stay readable and a repeated `Idempotency-Key` still finds them.
//!
//! Two files of JSON lines in the spool directory: `sent.log`, appended to,
//! and `sent.old`; when `sent.log` holds `kept` lines it replaces
//! `sent.old`, so between `kept` and `2 × kept` of the latest are on disk.
//! Appends are buffered and not fsync'd one by one: each finish is also a
//! journal record (fsync'd), the log is flushed and synced before the
//! journal segment holding that record is deleted (see `journal`), and a
//! start copies into the log what the journal's finish records hold and
//! the log lacks (lines lost with a killed process's buffer).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::record::StatusRecord;

/// The open `sent.log`.
pub(super) struct FinishedLog {
    directory: PathBuf,
    kept: usize,
    current: Mutex<Current>,
}

struct Current {
    file: BufWriter<File>,
    lines: usize,
}

/// Bytes of lines kept in memory before they are written (about 64 lines).
const BUFFER: usize = 64 * 1024;

impl FinishedLog {
    /// Opens the log in `directory`, keeping at least `kept` records; returns
    /// the latest `kept` records found, oldest first.
    pub(super) fn open(
        directory: &Path,
        kept: usize,
    ) -> io::Result<(FinishedLog, Vec<StatusRecord>)> {
        let kept = kept.max(1);
        let (old, _) = read_lines(&directory.join("sent.old"))?;
        let (mut records, lines) = read_lines(&directory.join("sent.log"))?;
        let mut all = old;
        all.append(&mut records);
        let skip = all.len().saturating_sub(kept);
        all.drain(..skip);
        let mut file = File::options()
            .create(true)
            .append(true)
            .read(true)
            .open(directory.join("sent.log"))?;
        // A line cut short by a crash is ended, so the next one stays whole.
        if ends_unterminated(&mut file)? {
            file.write_all(b"\n")?;
        }
        let log = FinishedLog {
            directory: directory.to_path_buf(),
            kept,
            current: Mutex::new(Current {
                file: BufWriter::with_capacity(BUFFER, file),
                lines,
            }),
        };
        Ok((log, all))
    }

    /// Appends a record; rotates the files when `sent.log` is full.
    pub(super) fn append(&self, record: &StatusRecord) -> io::Result<()> {
        self.append_line(serde_json::to_vec(record).map_err(io::Error::other)?)
    }

    /// Appends a record already encoded as JSON (one line, no line end).
    pub(super) fn append_line(&self, mut line: Vec<u8>) -> io::Result<()> {
        line.push(b'\n');
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current.file.write_all(&line)?;
        current.lines += 1;
        if current.lines >= self.kept {
            current.file.flush()?;
            fs::rename(
                self.directory.join("sent.log"),
                self.directory.join("sent.old"),
            )?;
            let file = File::options()
                .create(true)
                .append(true)
                .open(self.directory.join("sent.log"))?;
            current.file = BufWriter::with_capacity(BUFFER, file);
            current.lines = 0;
        }
        Ok(())
    }
}

impl FinishedLog {
    /// Makes every line appended so far durable.
    pub(super) fn sync(&self) -> io::Result<()> {
        {
            let mut current = self
                .current
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            current.file.flush()?;
            current.file.get_ref().sync_data()?;
        }
        // A rotation renamed sent.log into sent.old; make that durable too.
        super::committer::sync_directory(&self.directory)
    }
}

/// True when the file is not empty and its last byte is not a line end.
fn ends_unterminated(file: &mut File) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// The records of one file, and how many lines it has. A line that does not
/// parse (a write cut short by a crash) is skipped.
fn read_lines(path: &Path) -> io::Result<(Vec<StatusRecord>, usize)> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(error) => return Err(error),
    };
    let mut records = Vec::new();
    let mut lines = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        lines += 1;
        match serde_json::from_slice(&line) {
            Ok(record) => records.push(record),
            Err(error) => log::warn!(
                "spool: line {lines} of {} is unreadable ({error}); skipped",
                path.display()
            ),
        }
    }
    Ok((records, lines))
}

#[cfg(test)]
mod tests {
    use super::{FinishedLog, StatusRecord};
    use crate::store::journal::tests::empty_directory;

    fn record(id: &str) -> StatusRecord {
        let mut record = StatusRecord::new(id.into(), 1, vec!["a@example.org".into()]);
        record.attempts = 1;
        record.idempotency_key = Some(format!("key-{id}"));
        record
    }

    #[test]
    fn keeps_the_latest_across_reopening_and_rotation() {
        let directory = empty_directory("sent-log");
        let (log, found) = FinishedLog::open(&directory, 3).unwrap();
        assert!(found.is_empty());
        for id in ["a", "b", "c", "d", "e"] {
            log.append(&record(id)).unwrap();
        }
        drop(log);
        // A torn last line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(directory.join("sent.log"))
            .and_then(|mut file| std::io::Write::write_all(&mut file, b"{\"id\":\"f\",\"att"))
            .unwrap();
        let (log, found) = FinishedLog::open(&directory, 3).unwrap();
        let ids: Vec<&str> = found.iter().map(|record| record.id.as_str()).collect();
        assert_eq!(ids, ["c", "d", "e"]);
        assert_eq!(found[2], record("e"));
        log.append(&record("g")).unwrap();
        drop(log);
        let (_, found) = FinishedLog::open(&directory, 3).unwrap();
        let ids: Vec<&str> = found.iter().map(|record| record.id.as_str()).collect();
        assert_eq!(ids, ["d", "e", "g"]);
        let _ = std::fs::remove_dir_all(&directory);
    }
}
