//! Pending webhooks: each is kept from the moment its event is recorded
//! until it is delivered, given up or dropped, so that a restart (or a
//! `kill -9`) sends what was not delivered yet, under the same id.
//!
//! [`WebhookQueue`] is what the rest of the engine sees; the spool keeps
//! it in files ([`open`] with a directory), memory mode keeps nothing.
//!
//! Layout under `<spool>/webhooks/`:
//! - `<n>.log`: JSON lines, `{"add":{...}}` when a webhook is queued and
//!   `{"done":"<id>"}` when it is no longer pending. Appended with one
//!   `write` each and not fsync'd: that survives `kill -9` (the data is in
//!   the kernel's page cache) but not a power loss or kernel crash, which
//!   may lose the webhooks of the last seconds (and repeat some delivered
//!   ones).
//! - `<n>.pending`: every webhook pending before segment `n` was started,
//!   one `add` line each; written to `<n>.pending.tmp`, fsync'd, renamed,
//!   and only then are the older files deleted, so a crash at any point
//!   leaves a readable state.
//!
//! Reading takes the newest `.pending` file and the segments from its
//! number on: a webhook is pending when it was added and not done, in
//! whatever order the lines come. Unreadable lines (a write torn by a power
//! loss) are skipped and counted in a log line. Every start folds what it
//! read into a new `.pending` file and appends to a new segment; segments
//! are folded again (off the threads that append) once they outgrow the
//! last `.pending` file and 4 MiB, so the directory holds about three
//! times what is pending at most.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::committer::sync_directory;
use crate::config::SpoolSetting;
use crate::webhooks::WebhookEvent;

/// Segments are folded into a new `.pending` file once they hold this
/// much, and more than the last one.
const FOLD_BYTES: u64 = 4 << 20;

/// A webhook waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingWebhook {
    /// Its `webhook-id`, the same on every attempt.
    pub id: String,
    /// What happened.
    pub event: WebhookEvent,
    /// The message it is about.
    pub message_id: String,
    /// When the event happened (milliseconds since the epoch): the retry
    /// window counts from it.
    #[serde(rename = "at")]
    pub at_ms: u64,
    /// The JSON body, exactly as signed and sent.
    pub body: String,
}

/// Where pending webhooks are kept. Appends are cheap (no fsync): they
/// run on the threads that record message changes.
pub(crate) trait WebhookQueue: Send + Sync {
    /// What an earlier run left pending, oldest first; empty after the
    /// first call.
    fn load(&self) -> Vec<PendingWebhook>;
    /// Keeps a new pending webhook.
    fn add(&self, webhook: &PendingWebhook) -> io::Result<()>;
    /// Forgets a webhook: delivered, given up or dropped.
    fn complete(&self, id: &str) -> io::Result<()>;
}

/// Opens the queue for this spool setting. A spool directory must be
/// locked (by the journal) first: one process uses it at a time.
pub(crate) fn open(setting: &SpoolSetting) -> io::Result<Arc<dyn WebhookQueue>> {
    Ok(match setting {
        SpoolSetting::Memory => Arc::new(MemoryQueue),
        SpoolSetting::Directory(spool) => Arc::new(FileQueue::open(&spool.join("webhooks"))?),
    })
}

/// Memory mode: nothing survives the process.
struct MemoryQueue;

impl WebhookQueue for MemoryQueue {
    fn load(&self) -> Vec<PendingWebhook> {
        Vec::new()
    }
    fn add(&self, _webhook: &PendingWebhook) -> io::Result<()> {
        Ok(())
    }
    fn complete(&self, _id: &str) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum LineRef<'a> {
    Add(&'a PendingWebhook),
    Done(&'a str),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Add(PendingWebhook),
    Done(String),
}

/// The files in `<spool>/webhooks/`.
struct FileQueue {
    shared: Arc<Shared>,
    loaded: Mutex<Vec<PendingWebhook>>,
    folder: Option<JoinHandle<()>>,
}

struct Shared {
    directory: PathBuf,
    head: Mutex<Head>,
    wake: Condvar,
}

/// The segment being appended to, and when to fold.
struct Head {
    file: File,
    number: u64,
    /// Bytes in this segment.
    bytes: u64,
    /// Bytes in older segments not folded yet.
    older_bytes: u64,
    /// Fold once `bytes + older_bytes` reaches this.
    fold_at: u64,
    fold_wanted: bool,
    closed: bool,
}

impl FileQueue {
    fn open(directory: &Path) -> io::Result<FileQueue> {
        fs::create_dir_all(directory)?;
        let newest = list(directory)?
            .iter()
            .map(|(number, _)| *number)
            .max()
            .unwrap_or(0);
        let number = newest + 1;
        let (pending, pending_bytes) = fold(directory, number)?;
        let file = create_segment(directory, number)?;
        let shared = Arc::new(Shared {
            directory: directory.to_path_buf(),
            head: Mutex::new(Head {
                file,
                number,
                bytes: 0,
                older_bytes: 0,
                fold_at: FOLD_BYTES.max(pending_bytes),
                fold_wanted: false,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let folder_shared = Arc::clone(&shared);
        let folder = std::thread::Builder::new()
            .name("webhook-spool".into())
            .spawn(move || folder_shared.run_folder())?;
        Ok(FileQueue {
            shared,
            loaded: Mutex::new(pending),
            folder: Some(folder),
        })
    }
}

impl Drop for FileQueue {
    fn drop(&mut self) {
        lock(&self.shared.head).closed = true;
        self.shared.wake.notify_all();
        if let Some(folder) = self.folder.take() {
            let _ = folder.join();
        }
    }
}

impl WebhookQueue for FileQueue {
    fn load(&self) -> Vec<PendingWebhook> {
        std::mem::take(&mut *lock(&self.loaded))
    }

    fn add(&self, webhook: &PendingWebhook) -> io::Result<()> {
        self.shared.append(&LineRef::Add(webhook))
    }

    fn complete(&self, id: &str) -> io::Result<()> {
        self.shared.append(&LineRef::Done(id))
    }
}

impl Shared {
    fn append(&self, line: &LineRef<'_>) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let mut head = lock(&self.head);
        // One write of a whole line: a kill -9 cannot tear it.
        head.file.write_all(&bytes)?;
        head.bytes += bytes.len() as u64;
        if !head.fold_wanted && head.bytes + head.older_bytes >= head.fold_at {
            head.fold_wanted = true;
            self.wake.notify_all();
        }
        Ok(())
    }

    /// Folds segments when asked, until the queue is closed.
    fn run_folder(&self) {
        loop {
            let mut head = lock(&self.head);
            while !head.fold_wanted && !head.closed {
                head = self
                    .wake
                    .wait(head)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if head.closed {
                return;
            }
            // Appends go on into a new segment while the older ones are folded.
            let number = head.number + 1;
            match create_segment(&self.directory, number) {
                Ok(file) => {
                    head.file = file;
                    head.number = number;
                    head.older_bytes += head.bytes;
                    head.bytes = 0;
                }
                Err(error) => {
                    log::error!("webhooks: cannot start a new segment in the spool: {error}");
                    head.fold_wanted = false;
                    head.fold_at = head.bytes + head.older_bytes + FOLD_BYTES;
                    continue;
                }
            }
            drop(head);
            let result = fold(&self.directory, number);
            let mut head = lock(&self.head);
            match result {
                Ok((_, pending_bytes)) => {
                    head.older_bytes = 0;
                    head.fold_at = FOLD_BYTES.max(pending_bytes);
                }
                Err(error) => {
                    log::error!("webhooks: cannot fold the pending webhooks in the spool: {error}");
                    head.fold_at = head.bytes + head.older_bytes + FOLD_BYTES;
                }
            }
            // What was appended meanwhile may call for the next fold already.
            head.fold_wanted = head.bytes + head.older_bytes >= head.fold_at;
            self.wake.notify_all();
        }
    }

    /// Waits until no fold is wanted or running.
    #[cfg(test)]
    fn wait_idle(&self) {
        let mut head = lock(&self.head);
        while head.fold_wanted {
            head = self
                .wake
                .wait(head)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// The numbered files of the directory: `(number, path)`; removes
/// leftover temporary files.
fn list(directory: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(directory)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            let _ = fs::remove_file(&path);
            continue;
        }
        let number = name
            .strip_suffix(".log")
            .or_else(|| name.strip_suffix(".pending"))
            .and_then(|number| number.parse::<u64>().ok());
        if let Some(number) = number {
            files.push((number, path));
        }
    }
    Ok(files)
}

fn segment_path(directory: &Path, number: u64) -> PathBuf {
    directory.join(format!("{number:020}.log"))
}

fn pending_path(directory: &Path, number: u64) -> PathBuf {
    directory.join(format!("{number:020}.pending"))
}

fn create_segment(directory: &Path, number: u64) -> io::Result<File> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(segment_path(directory, number))?;
    // The new name must survive a power loss before older files go.
    sync_directory(directory)?;
    Ok(file)
}

/// Writes `<upto>.pending` with every webhook pending in the files older
/// than segment `upto`, then deletes those files. Returns the pending
/// webhooks, oldest first, and the new file's size.
fn fold(directory: &Path, upto: u64) -> io::Result<(Vec<PendingWebhook>, u64)> {
    let files = list(directory)?;
    let base = files
        .iter()
        .filter(|(number, path)| *number < upto && path.extension() == Some("pending".as_ref()))
        .map(|(number, _)| *number)
        .max();
    // The newest `.pending` file and the segments started after it.
    let mut sources: Vec<&(u64, PathBuf)> = files
        .iter()
        .filter(|(number, _)| *number < upto && base.is_none_or(|base| *number >= base))
        .collect();
    // The `.pending` file of a number comes before its segment.
    sources.sort_by_key(|(number, path)| (*number, path.extension() != Some("pending".as_ref())));

    let mut added: Vec<PendingWebhook> = Vec::new();
    let mut positions: HashMap<String, usize> = HashMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut unreadable = 0usize;
    for (_, path) in &sources {
        let reader = BufReader::new(File::open(path)?);
        for line in reader.split(b'\n') {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Line>(&line) {
                Ok(Line::Add(webhook)) => {
                    if !positions.contains_key(&webhook.id) {
                        positions.insert(webhook.id.clone(), added.len());
                        added.push(webhook);
                    }
                }
                Ok(Line::Done(id)) => {
                    done.insert(id);
                }
                Err(_) => unreadable += 1,
            }
        }
    }
    if unreadable > 0 {
        log::warn!(
            "webhooks: {unreadable} unreadable lines in the spool skipped (a write torn by a crash); \
             the webhooks they held may be lost or sent again"
        );
    }
    let mut pending: Vec<PendingWebhook> = added
        .into_iter()
        .filter(|webhook| !done.contains(&webhook.id))
        .collect();
    // Oldest event first; a stable sort keeps the order of equal times.
    pending.sort_by_key(|webhook| webhook.at_ms);

    let mut contents = Vec::new();
    for webhook in &pending {
        serde_json::to_writer(&mut contents, &LineRef::Add(webhook)).map_err(io::Error::other)?;
        contents.push(b'\n');
    }
    let target = pending_path(directory, upto);
    let temporary = directory.join(format!("{upto:020}.pending.tmp"));
    {
        let mut file = File::create(&temporary)?;
        file.write_all(&contents)?;
        file.sync_all()?;
    }
    fs::rename(&temporary, &target)?;
    sync_directory(directory)?;
    for (number, path) in &files {
        if *number < upto {
            fs::remove_file(path)?;
        }
    }
    Ok((pending, contents.len() as u64))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(id: &str, at_ms: u64) -> PendingWebhook {
        PendingWebhook {
            id: id.into(),
            event: WebhookEvent::Sent,
            message_id: format!("message-{id}"),
            at_ms,
            body: format!("{{\"id\":\"{id}\"}}"),
        }
    }

    fn directory(name: &str) -> PathBuf {
        let directory = std::env::temp_dir().join(format!(
            "mailroom-unit-webhooks-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&directory);
        directory
    }

    fn ids(webhooks: &[PendingWebhook]) -> Vec<&str> {
        webhooks.iter().map(|webhook| webhook.id.as_str()).collect()
    }

    #[test]
    fn what_is_not_done_is_found_again_oldest_first() {
        let directory = directory("reopen");
        {
            let queue = FileQueue::open(&directory).unwrap();
            assert!(queue.load().is_empty());
            queue.add(&webhook("b", 20)).unwrap();
            queue.add(&webhook("a", 10)).unwrap();
            queue.add(&webhook("c", 30)).unwrap();
            queue.complete("b").unwrap();
        }
        let queue = FileQueue::open(&directory).unwrap();
        let loaded = queue.load();
        assert_eq!(ids(&loaded), ["a", "c"]);
        assert_eq!(loaded[0], webhook("a", 10), "kept byte for byte");
        assert!(queue.load().is_empty(), "loaded once");
        queue.complete("a").unwrap();
        drop(queue);
        let queue = FileQueue::open(&directory).unwrap();
        assert_eq!(ids(&queue.load()), ["c"]);
        let names: Vec<String> = fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "one .pending file and one segment: {names:?}"
        );
    }

    #[test]
    fn a_torn_line_is_skipped_and_the_rest_read() {
        let directory = directory("torn");
        {
            let queue = FileQueue::open(&directory).unwrap();
            queue.add(&webhook("a", 10)).unwrap();
            queue.add(&webhook("b", 20)).unwrap();
        }
        let (_, segment) = list(&directory)
            .unwrap()
            .into_iter()
            .find(|(_, path)| path.extension() == Some("log".as_ref()))
            .unwrap();
        let mut file = File::options().append(true).open(segment).unwrap();
        file.write_all(b"{\"add\":{\"id\":\"c\",\"ev").unwrap();
        drop(file);
        let queue = FileQueue::open(&directory).unwrap();
        assert_eq!(ids(&queue.load()), ["a", "b"]);
        queue.add(&webhook("d", 40)).unwrap();
        drop(queue);
        let queue = FileQueue::open(&directory).unwrap();
        assert_eq!(
            ids(&queue.load()),
            ["a", "b", "d"],
            "later lines are not glued to the torn one"
        );
    }

    #[test]
    fn folding_keeps_exactly_the_pending_ones_and_bounds_the_files() {
        let directory = directory("fold");
        let queue = FileQueue::open(&directory).unwrap();
        let body = "x".repeat(2000);
        // About 3 × FOLD_BYTES of appends, all but every 100th completed.
        let total = 3 * FOLD_BYTES as usize / 2100;
        for index in 0..total {
            let mut pending = webhook(&format!("w{index}"), index as u64);
            pending.body = body.clone();
            queue.add(&pending).unwrap();
            if index % 100 != 0 {
                queue.complete(&pending.id).unwrap();
            }
        }
        // The folder runs on its own thread, while appends go on.
        queue.shared.wait_idle();
        let on_disk: u64 = fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum();
        let pending_bytes = (total / 100 + 1) as u64 * 2200;
        assert!(
            on_disk < FOLD_BYTES + pending_bytes,
            "{on_disk} bytes on disk for {pending_bytes} pending"
        );
        drop(queue);
        let queue = FileQueue::open(&directory).unwrap();
        let loaded = queue.load();
        let expected: Vec<String> = (0..total)
            .filter(|index| index % 100 == 0)
            .map(|index| format!("w{index}"))
            .collect();
        assert_eq!(ids(&loaded), expected);
    }
}
