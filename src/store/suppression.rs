//! The suppression list: addresses mail is not sent to (they bounced with
//! "no such user", or an operator put them there). Addresses compare with
//! the domain case-insensitive and the local part as written.
//!
//! Kept in memory, and in spool mode also in `suppressions.log` (one JSON
//! line per change, fsync'd: changes are rare and an operator's must hold),
//! rewritten compactly at each start.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::message::comparable_address;
use crate::time::to_millis;

/// One suppressed address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Suppression {
    /// The address as first suppressed.
    pub address: String,
    /// Why (a bounce's reply, or what the operator said).
    pub reason: Option<String>,
    /// When, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

impl Suppression {
    /// The API's JSON: `{"address", "reason", "created_at"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "reason": self.reason,
            "created_at": crate::time::rfc3339(crate::time::from_millis(self.created_at_ms)),
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Change {
    Put(Suppression),
    Delete { address: String },
}

struct Inner {
    entries: BTreeMap<String, Suppression>,
    log: Option<File>,
}

/// The list.
pub(crate) struct Suppressions {
    inner: Mutex<Inner>,
    path: Option<PathBuf>,
}

impl Suppressions {
    /// An empty list in memory only.
    pub(crate) fn in_memory() -> Suppressions {
        Suppressions {
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                log: None,
            }),
            path: None,
        }
    }

    /// The list kept in `directory/suppressions.log`.
    pub(crate) fn open(directory: &Path) -> io::Result<Suppressions> {
        let path = directory.join("suppressions.log");
        let mut entries = BTreeMap::new();
        match File::open(&path) {
            Ok(file) => {
                for (number, line) in BufReader::new(file).split(b'\n').enumerate() {
                    let line = line?;
                    if line.is_empty() {
                        continue;
                    }
                    match serde_json::from_slice::<Change>(&line) {
                        Ok(Change::Put(entry)) => {
                            entries.insert(comparable_address(&entry.address), entry);
                        }
                        Ok(Change::Delete { address }) => {
                            entries.remove(&comparable_address(&address));
                        }
                        // A line cut short by a crash: its change was never confirmed.
                        Err(error) => log::warn!(
                            "spool: line {} of {} is unreadable ({error}); skipped",
                            number + 1,
                            path.display()
                        ),
                    }
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        // Rewrite compactly: a temporary file, fsync'd, renamed over the log.
        let temporary = directory.join("suppressions.log.tmp");
        let mut file = File::create(&temporary)?;
        for entry in entries.values() {
            let mut line =
                serde_json::to_vec(&Change::Put(entry.clone())).map_err(io::Error::other)?;
            line.push(b'\n');
            file.write_all(&line)?;
        }
        file.sync_all()?;
        fs::rename(&temporary, &path)?;
        File::open(directory)?.sync_all()?;
        let log = File::options().append(true).open(&path)?;
        Ok(Suppressions {
            inner: Mutex::new(Inner {
                entries,
                log: Some(log),
            }),
            path: Some(path),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self, inner: &mut Inner, change: &Change) -> io::Result<()> {
        let Some(log) = inner.log.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(change).map_err(io::Error::other)?;
        line.push(b'\n');
        log.write_all(&line)?;
        log.sync_data().map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "{}: {error}",
                    self.path.as_deref().unwrap_or(Path::new("?")).display()
                ),
            )
        })
    }

    /// True when mail to `address` is suppressed.
    pub(crate) fn contains(&self, address: &str) -> bool {
        self.lock()
            .entries
            .contains_key(&comparable_address(address))
    }

    /// Which of `addresses` are suppressed.
    pub(crate) fn filter<'a>(&self, addresses: &'a [String]) -> Vec<&'a String> {
        let inner = self.lock();
        if inner.entries.is_empty() {
            return Vec::new();
        }
        addresses
            .iter()
            .filter(|address| inner.entries.contains_key(&comparable_address(address)))
            .collect()
    }

    /// Adds (or replaces) an entry; returns it.
    pub(crate) fn put(&self, address: &str, reason: Option<String>) -> io::Result<Suppression> {
        let entry = Suppression {
            address: address.trim().to_string(),
            reason,
            created_at_ms: to_millis(SystemTime::now()),
        };
        let mut inner = self.lock();
        self.write(&mut inner, &Change::Put(entry.clone()))?;
        inner
            .entries
            .insert(comparable_address(address), entry.clone());
        Ok(entry)
    }

    /// Adds an entry unless the address is there already (a bounce).
    pub(crate) fn add_if_absent(&self, address: &str, reason: &str) -> io::Result<bool> {
        if self.contains(address) {
            return Ok(false);
        }
        self.put(address, Some(reason.to_string())).map(|_| true)
    }

    /// Removes an entry; false when there was none.
    pub(crate) fn delete(&self, address: &str) -> io::Result<bool> {
        let key = comparable_address(address);
        let mut inner = self.lock();
        if !inner.entries.contains_key(&key) {
            return Ok(false);
        }
        self.write(
            &mut inner,
            &Change::Delete {
                address: address.trim().to_string(),
            },
        )?;
        inner.entries.remove(&key);
        Ok(true)
    }

    /// Up to `limit` entries after `cursor` (an address), in address order;
    /// and the cursor of the next page.
    pub(crate) fn page(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> (Vec<Suppression>, Option<String>) {
        let inner = self.lock();
        let start = cursor.map(comparable_address);
        let mut entries = inner.entries.iter().filter(|(key, _)| {
            start
                .as_ref()
                .is_none_or(|start| key.as_str() > start.as_str())
        });
        let page: Vec<Suppression> = entries
            .by_ref()
            .take(limit)
            .map(|(_, entry)| entry.clone())
            .collect();
        let next = (entries.next().is_some())
            .then(|| page.last().map(|entry| entry.address.clone()))
            .flatten();
        (page, next)
    }

    /// How many addresses are suppressed.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::journal::tests::empty_directory;

    #[test]
    fn domains_compare_case_insensitively_local_parts_do_not() {
        let list = Suppressions::in_memory();
        list.put("Bob@Example.ORG", None).unwrap();
        assert!(list.contains("Bob@example.org"));
        assert!(!list.contains("bob@example.org"));
    }

    #[test]
    fn survives_reopening_and_pages_in_order() {
        let directory = empty_directory("suppressions");
        let list = Suppressions::open(&directory).unwrap();
        for name in ["c", "a", "b", "d"] {
            list.put(&format!("{name}@x.org"), Some("test".into()))
                .unwrap();
        }
        assert!(list.delete("d@X.org").unwrap());
        assert!(!list.delete("d@x.org").unwrap());
        drop(list);
        // A torn last line (a crash mid-write) is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(directory.join("suppressions.log"))
            .and_then(|mut file| file.write_all(b"{\"op\":\"put\",\"addr"))
            .unwrap();
        let list = Suppressions::open(&directory).unwrap();
        assert_eq!(list.len(), 3);
        let (first, next) = list.page(None, 2);
        let names: Vec<&str> = first.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(names, ["a@x.org", "b@x.org"]);
        let (rest, next) = list.page(next.as_deref(), 2);
        assert_eq!(rest.len(), 1);
        assert_eq!(next, None);
        assert_eq!(rest[0].reason.as_deref(), Some("test"));
    }
}
