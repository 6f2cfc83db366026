//! The durable queue: every accepted message is on disk (written, fsync'd,
//! renamed into place, directory fsync'd) before its 202 is sent, and stays
//! there until the relay accepts it. Permanently failed messages move to
//! `dead/` as dead letters.
//!
//! Layout under the spool directory:
//! - `queue/<id>.json`: an unfinished message with its attempts, next due
//!   time and last error.
//! - `dead/<id>.json`: a permanently failed message.
//! - `corrupt/`: files that could not be read at start, set aside.
//! - `tmp/`: files being written; leftovers are removed at start.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::SpoolSetting;
use crate::message::{random_u64, OutgoingMessage};

/// One message as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolRecord {
    /// The built message.
    pub message: OutgoingMessage,
    /// Attempts started so far.
    pub attempts: u32,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Last change, milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// When the next attempt is due, if it waits for one.
    pub next_attempt_at_ms: Option<u64>,
    /// Last failure.
    pub last_error: Option<String>,
    /// The client's `Idempotency-Key`, kept across restarts.
    pub idempotency_key: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn to_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// The time `millis` milliseconds after the Unix epoch.
pub fn from_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// What was found in the spool at start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Unfinished messages, to deliver.
    pub pending: Vec<SpoolRecord>,
    /// Dead letters, for the status endpoint.
    pub dead: Vec<SpoolRecord>,
    /// Files set aside into `corrupt/`.
    pub corrupt: usize,
}

/// The spool: a directory, or nothing (memory only).
pub struct Spool {
    directory: Option<PathBuf>,
}

impl Spool {
    /// Opens (creating if needed) the spool and reads what it holds.
    pub fn open(setting: &SpoolSetting) -> io::Result<(Spool, Recovered)> {
        let SpoolSetting::Directory(directory) = setting else {
            return Ok((Spool { directory: None }, Recovered::default()));
        };
        for sub in ["queue", "dead", "corrupt", "tmp"] {
            fs::create_dir_all(directory.join(sub))?;
        }
        for leftover in fs::read_dir(directory.join("tmp"))? {
            let _ = fs::remove_file(leftover?.path());
        }
        let mut recovered = Recovered::default();
        for (sub, is_dead) in [("queue", false), ("dead", true)] {
            for entry in fs::read_dir(directory.join(sub))? {
                let path = entry?.path();
                match read_record(&path) {
                    Ok(record) if is_dead => recovered.dead.push(record),
                    Ok(record) => recovered.pending.push(record),
                    Err(reason) => {
                        let name = path
                            .file_name()
                            .map(|name| name.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let target = directory.join("corrupt").join(format!("{sub}-{name}"));
                        log::error!(
                            "spool: {} is unreadable ({reason}); moved to {}",
                            path.display(),
                            target.display()
                        );
                        fs::rename(&path, &target)?;
                        recovered.corrupt += 1;
                    }
                }
            }
        }
        // Oldest first, so recovery keeps the acceptance order.
        recovered
            .pending
            .sort_by_key(|record| (record.created_at_ms, record.message.id.clone()));
        Ok((
            Spool {
                directory: Some(directory.clone()),
            },
            recovered,
        ))
    }

    /// True when messages survive a restart.
    pub fn is_durable(&self) -> bool {
        self.directory.is_some()
    }

    /// Durably writes (or rewrites) an unfinished message.
    pub fn store(&self, record: &SpoolRecord) -> io::Result<()> {
        match &self.directory {
            Some(directory) => write_durably(directory, "queue", record),
            None => Ok(()),
        }
    }

    /// Forgets a delivered message.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        match &self.directory {
            Some(directory) => match fs::remove_file(record_path(directory, "queue", id)) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Moves a permanently failed message to the dead letters.
    pub fn dead_letter(&self, record: &SpoolRecord) -> io::Result<()> {
        match &self.directory {
            Some(directory) => {
                write_durably(directory, "dead", record)?;
                self.remove(&record.message.id)
            }
            None => Ok(()),
        }
    }
}

fn record_path(directory: &Path, sub: &str, id: &str) -> PathBuf {
    directory.join(sub).join(format!("{id}.json"))
}

fn write_durably(directory: &Path, sub: &str, record: &SpoolRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
    let temporary =
        directory
            .join("tmp")
            .join(format!("{}.{:016x}", record.message.id, random_u64()));
    let mut file = File::create(&temporary)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, record_path(directory, sub, &record.message.id))?;
    // The rename is durable only once the directory is.
    File::open(directory.join(sub))?.sync_all()
}

fn read_record(path: &Path) -> Result<SpoolRecord, String> {
    let bytes = fs::read(path).map_err(|error| error.to_string())?;
    let record: SpoolRecord = serde_json::from_slice(&bytes).map_err(|error| error.to_string())?;
    let expected = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    if record.message.id != expected || record.message.recipients.is_empty() {
        return Err("content does not match its file name".into());
    }
    Ok(record)
}
