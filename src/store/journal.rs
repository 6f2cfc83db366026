//! The durable queue: an append-only journal with group commit. Every
//! accepted message is in the journal and fsync'd before its 202; each
//! retry rewrites its record (attempts, next due time, last error, events);
//! a finished message gets a `finish` record carrying its final status.
//! Permanently failed messages become dead letters, one file each.
//!
//! Layout under the spool directory:
//! - `journal/<number>.journal`: segments of framed records (see `frame`),
//!   appended by one thread (see `committer`); finished segments are deleted.
//! - `dead/<id>.json`: a permanently failed message (a dead letter).
//! - `corrupt/`: data that could not be read at start, set aside.
//! - `tmp/`: dead letters being written; leftovers are removed at start.
//! - `sent.log`, `sent.old`: finished messages' statuses (see `finished`).
//! - `lock`: locked (flock) by the process using the spool.
//!
//! Recovery reads every segment in order and replays it (the last record
//! of an id wins; `finish` forgets the content and keeps the status; of a
//! dead letter and a journal record of the same message, the higher
//! revision wins), sets aside whatever is not a valid record, writes the
//! result into a fresh segment, fsyncs it, and only then deletes the old
//! segments, oldest first. A crash at any point of that leaves either the
//! old segments or the new one complete, and replaying both gives the same
//! state.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::committer::{
    read_frame, segment_name, segment_number, sync_directory, Change, CommitStats, Committer,
    Locations, Queue, Ticket,
};
use super::finished::FinishedLog;
use super::frame::{self, Piece};
use super::record::{MessageRecord, StatusRecord};
use crate::message::random_u64;

/// A segment is sealed and a new one started beyond this size.
pub(super) const SEGMENT_BYTES: u64 = 16 << 20;

/// What was found in the spool at start.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    /// Unfinished messages, to deliver, oldest first.
    pub pending: Vec<MessageRecord>,
    /// Dead letters.
    pub dead: Vec<MessageRecord>,
    /// Finished messages' statuses, oldest first (later ones of an id win).
    pub finished: Vec<StatusRecord>,
    /// Pieces of data (byte runs, files) set aside into `corrupt/`.
    pub corrupt: usize,
}

/// A journal record.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum EntryRef<'a> {
    Store(&'a MessageRecord),
    /// Written by [`finish_frame`] (the same bytes, from a status encoded once).
    #[cfg(test)]
    Finish(&'a StatusRecord),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    Store(MessageRecord),
    /// Written by earlier versions for a delivered message.
    Remove {
        id: String,
    },
    Finish(StatusRecord),
}

/// A finish record on its way to disk, and the sent log's line for it.
pub(super) struct Finishing {
    ticket: Ticket,
    line: Vec<u8>,
}

/// The spool directory in use.
pub(super) struct Journal {
    directory: PathBuf,
    queue: Arc<Queue>,
    /// Where each unfinished message's latest record is.
    locations: Locations,
    finished: Arc<FinishedLog>,
    commits: Arc<CommitStats>,
    committer: Option<JoinHandle<()>>,
    /// Held while the spool is open (released when closed, or when the process dies).
    _lock: File,
}

impl Drop for Journal {
    fn drop(&mut self) {
        // The committer ends once it has written what is pending.
        self.queue.close();
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
        self.flush_sent_log();
    }
}

impl Journal {
    /// Opens (creating if needed) the spool in `directory` and reads what
    /// it holds, remembering at least `finished_kept` finished messages.
    pub(super) fn open(
        directory: &Path,
        segment_bytes: u64,
        finished_kept: usize,
    ) -> io::Result<(Journal, Recovered)> {
        let lock = lock_directory(directory)?;
        let (finished, found) = FinishedLog::open(directory, finished_kept)?;
        let finished = Arc::new(finished);
        let (committer, mut recovered) =
            recover(directory, segment_bytes, &finished, found.as_slice())?;
        let mut all = found;
        all.append(&mut recovered.finished);
        recovered.finished = all;
        let queue = Arc::new(Queue::default());
        let committer_queue = Arc::clone(&queue);
        let locations = committer.locations();
        let commits = committer.stats();
        let committer = std::thread::Builder::new()
            .name("spool".into())
            .spawn(move || committer.run(&committer_queue))?;
        Ok((
            Journal {
                directory: directory.to_path_buf(),
                queue,
                locations,
                finished,
                commits,
                committer: Some(committer),
                _lock: lock,
            },
            recovered,
        ))
    }

    /// Durably records messages that may still be sent (new, or their
    /// retry state), all in one commit; returns once they are on disk.
    pub(super) fn store(&self, records: &[&MessageRecord]) -> io::Result<()> {
        let frames = records
            .iter()
            .map(|record| {
                Ok((
                    encode(&EntryRef::Store(record))?,
                    Change::Store(record.status.id.clone()),
                ))
            })
            .collect::<io::Result<Vec<_>>>()?;
        self.queue.commit(frames)
    }

    /// The `/metrics` lines of the journal's commits.
    pub(super) fn metrics_text(&self) -> String {
        self.commits.render()
    }

    /// Reads an unfinished message's latest record back from the journal
    /// (a scheduled message, whose content is not kept in memory).
    pub(super) fn load(&self, id: &str) -> io::Result<MessageRecord> {
        let journal = self.directory.join("journal");
        let mut last_error = io::Error::new(
            io::ErrorKind::NotFound,
            format!("message {id} is not in the journal"),
        );
        // Compaction may move the record (and delete its old segment)
        // between the look-up and the read: look again.
        for _ in 0..3 {
            let location = self
                .locations
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get(id)
                .copied();
            let Some(location) = location else {
                return Err(last_error);
            };
            let frame = match read_frame(&journal, &location) {
                Ok(frame) => frame,
                Err(error) => {
                    last_error = error;
                    continue;
                }
            };
            let payload = frame::frame_at(&frame, 0)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a frame"))?;
            return match decode(payload) {
                Ok(Entry::Store(record)) if record.status.id == id => Ok(record),
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the journal's record for message {id} is not its content"),
                )),
                Err(reason) => Err(io::Error::new(io::ErrorKind::InvalidData, reason)),
            };
        }
        Err(last_error)
    }

    /// Writes the sent log's buffered lines and syncs them (at a stop;
    /// lines lost otherwise are copied from the journal at the next start).
    pub(super) fn flush_sent_log(&self) {
        if let Err(error) = self.finished.sync() {
            log::warn!("spool: cannot write the sent log ({error}); the next start completes it");
        }
    }

    /// Durably records that a message is finished, with its final status.
    pub(super) fn finish(&self, status: &StatusRecord) -> io::Result<()> {
        let finishing = self.begin_finish(status)?;
        self.end_finish(finishing, &status.id)
    }

    /// Adds the record that a message is finished to the next commit,
    /// without waiting for it; [`Journal::end_finish`] waits.
    pub(super) fn begin_finish(&self, status: &StatusRecord) -> io::Result<Finishing> {
        // One encoding of the status serves the record (`EntryRef::Finish`,
        // `{"finish":<status>}`) and the sent log's line.
        let line = serde_json::to_vec(status).map_err(io::Error::other)?;
        let frame = finish_frame(&line)?;
        let ticket = self
            .queue
            .enqueue(vec![(frame, Change::Remove(status.id.clone()))])?;
        Ok(Finishing { ticket, line })
    }

    /// Waits until the record [`Journal::begin_finish`] added is on disk,
    /// then notes the final status in the sent log.
    pub(super) fn end_finish(&self, finishing: Finishing, id: &str) -> io::Result<()> {
        self.queue.wait(finishing.ticket)?;
        if let Err(error) = self.finished.append_line(finishing.line) {
            // The journal's record still carries the status until the next
            // start copies it into the log.
            log::warn!("message {id}: its final status is not in the sent log yet ({error})");
        }
        Ok(())
    }

    /// Keeps a permanently failed message as a dead letter.
    pub(super) fn dead_letter(&self, record: &MessageRecord) -> io::Result<()> {
        // The dead letter first: after a crash in between, it wins over
        // the journal's older record (same or higher revision).
        write_durably(&self.directory, "dead", record)?;
        self.finish(&record.status)
    }

    /// A dead letter's record.
    pub(super) fn read_dead_letter(&self, id: &str) -> io::Result<MessageRecord> {
        read_record(&self.directory.join("dead").join(format!("{id}.json")))
            .map_err(|reason| io::Error::new(io::ErrorKind::InvalidData, reason))
    }

    /// Queues a dead letter again: its new record (a higher revision) is
    /// stored, then the dead letter deleted.
    pub(super) fn requeue(&self, record: &MessageRecord) -> io::Result<()> {
        self.store(&[record])?;
        remove_dead_letter(&self.directory, &record.status.id)
    }
}

/// The frame of `EntryRef::Finish` for a status encoded as `status_json`.
fn finish_frame(status_json: &[u8]) -> io::Result<Vec<u8>> {
    frame::encode(|buffer| {
        buffer.extend_from_slice(b"{\"finish\":");
        buffer.extend_from_slice(status_json);
        buffer.push(b'}');
        Ok(())
    })
}

fn encode(entry: &EntryRef<'_>) -> io::Result<Vec<u8>> {
    frame::encode(|buffer| serde_json::to_writer(&mut *buffer, entry).map_err(io::Error::other))
}

fn remove_dead_letter(directory: &Path, id: &str) -> io::Result<()> {
    match fs::remove_file(directory.join("dead").join(format!("{id}.json"))) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => sync_directory(&directory.join("dead")),
    }
}

/// Takes the spool for this process: two processes replaying, rewriting and
/// deleting the same journal would lose messages.
fn lock_directory(directory: &Path) -> io::Result<File> {
    fs::create_dir_all(directory)?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(directory.join("lock"))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another mailroom process",
                directory.display()
            ),
        )),
        Err(fs::TryLockError::Error(error)) => Err(error),
    }
}

/// Reads the spool, sets aside what is unreadable, and rewrites the live
/// state into a fresh segment (deleting the old ones once it is durable and
/// the finished statuses found in them are in the finished log).
fn recover(
    directory: &Path,
    segment_bytes: u64,
    finished_log: &Arc<FinishedLog>,
    logged: &[StatusRecord],
) -> io::Result<(Committer, Recovered)> {
    for sub in ["journal", "dead", "corrupt", "tmp"] {
        fs::create_dir_all(directory.join(sub))?;
    }
    for leftover in fs::read_dir(directory.join("tmp"))? {
        let _ = fs::remove_file(leftover?.path());
    }
    let corrupt = directory.join("corrupt");
    let mut recovered = Recovered::default();

    let mut dead = Vec::new();
    for entry in fs::read_dir(directory.join("dead"))? {
        let path = entry?.path();
        match read_record(&path) {
            Ok(record) => dead.push(record),
            Err(reason) => {
                set_aside_file(
                    &path,
                    &corrupt.join(format!("dead-{}", file_name(&path))),
                    &reason,
                )?;
                recovered.corrupt += 1;
            }
        }
    }

    let journal = directory.join("journal");
    let mut segments = Vec::new();
    for entry in fs::read_dir(&journal)? {
        let path = entry?.path();
        match segment_number(&file_name(&path)) {
            Some(number) if path.is_file() => segments.push(number),
            _ => {
                let target = corrupt.join(format!("journal-{}", file_name(&path)));
                set_aside_file(&path, &target, "not a journal segment")?;
                recovered.corrupt += 1;
            }
        }
    }
    segments.sort_unstable();

    let mut live: HashMap<String, MessageRecord> = HashMap::new();
    let mut finished: Vec<StatusRecord> = Vec::new();
    for &number in &segments {
        let name = segment_name(number);
        let data = fs::read(journal.join(&name))?;
        for piece in frame::pieces(&data) {
            let (start, end, reason) = match piece {
                Piece::Frame {
                    offset,
                    length,
                    payload,
                } => match decode(payload) {
                    Ok(Entry::Store(record)) => {
                        live.insert(record.status.id.clone(), record);
                        continue;
                    }
                    Ok(Entry::Remove { id }) => {
                        live.remove(&id);
                        continue;
                    }
                    Ok(Entry::Finish(status)) => {
                        live.remove(&status.id);
                        finished.push(status);
                        continue;
                    }
                    Err(reason) => (offset, offset + length, reason),
                },
                Piece::Garbage { start, end } => (
                    start,
                    end,
                    "not a valid record (a torn write or damaged data)".to_string(),
                ),
                Piece::Unused { .. } => continue,
            };
            let target = corrupt.join(format!("{name}.{start}"));
            log::error!(
                "spool: bytes {start}..{end} of journal segment {name} are unreadable ({reason}); \
                 set aside as {}",
                target.display()
            );
            write_file_durably(&target, &data[start..end])?;
            recovered.corrupt += 1;
        }
    }
    if recovered.corrupt > 0 {
        sync_directory(&corrupt)?;
    }
    for record in dead {
        let id = record.status.id.clone();
        match live.get(&id) {
            // Queued again by hand after it failed: finish deleting it.
            Some(newer) if newer.status.revision > record.status.revision => {
                remove_dead_letter(directory, &id)?;
            }
            _ => {
                live.remove(&id);
                recovered.dead.push(record);
            }
        }
    }
    recovered.pending = live.into_values().collect();
    // Oldest first, so recovery keeps the acceptance order.
    recovered.pending.sort_by(|a, b| {
        (a.status.created_at_ms, &a.status.id).cmp(&(b.status.created_at_ms, &b.status.id))
    });

    // The finish records are about to go with their segments: their
    // statuses must be in the finished log, durably, first.
    let known: HashMap<&str, &StatusRecord> = logged
        .iter()
        .map(|record| (record.id.as_str(), record))
        .collect();
    for status in &finished {
        if known.get(status.id.as_str()) != Some(&status) {
            finished_log.append(status)?;
        }
    }
    finished_log.sync()?;
    recovered.finished = finished;

    let sync_log = Arc::clone(finished_log);
    let mut committer = Committer::new(
        &journal,
        &segments,
        segment_bytes,
        Box::new(move || sync_log.sync()),
    );
    let frames = recovered
        .pending
        .iter()
        .map(|record| {
            Ok((
                encode(&EntryRef::Store(record))?,
                Change::Store(record.status.id.clone()),
            ))
        })
        .collect::<io::Result<Vec<_>>>()?;
    committer.append(
        frames
            .iter()
            .map(|(frame, change)| (frame.as_slice(), change)),
    )?;
    // Nothing refers to the old segments any more: delete them, oldest first.
    committer.maintain();
    Ok((committer, recovered))
}

fn decode(payload: &[u8]) -> Result<Entry, String> {
    let entry: Entry = serde_json::from_slice(payload).map_err(|error| error.to_string())?;
    match entry {
        Entry::Store(record) => {
            let record = record.complete();
            check_record(&record)?;
            Ok(Entry::Store(record))
        }
        other => Ok(other),
    }
}

/// What every kept record must satisfy (its id also names a dead letter file).
fn check_record(record: &MessageRecord) -> Result<(), String> {
    let id = &record.message.id;
    if id.is_empty() || !id.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
        return Err(format!("invalid message id {id:?}"));
    }
    if record.status.id != *id {
        return Err(format!(
            "message {id} has a status for {:?}",
            record.status.id
        ));
    }
    if record.message.recipients.is_empty() {
        return Err(format!("message {id} has no recipients"));
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn set_aside_file(path: &Path, target: &Path, reason: &str) -> io::Result<()> {
    log::error!(
        "spool: {} is unreadable ({reason}); moved to {}",
        path.display(),
        target.display()
    );
    fs::rename(path, target)
}

fn write_file_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn write_durably(directory: &Path, sub: &str, record: &MessageRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
    let id = &record.status.id;
    let temporary = directory
        .join("tmp")
        .join(format!("{id}.{:016x}", random_u64()));
    write_file_durably(&temporary, &bytes)?;
    fs::rename(&temporary, directory.join(sub).join(format!("{id}.json")))?;
    // The rename is durable only once the directory is.
    sync_directory(&directory.join(sub))
}

fn read_record(path: &Path) -> Result<MessageRecord, String> {
    let bytes = fs::read(path).map_err(|error| error.to_string())?;
    let record: MessageRecord =
        serde_json::from_slice(&bytes).map_err(|error| error.to_string())?;
    let record = record.complete();
    check_record(&record)?;
    let expected = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    if record.message.id != expected {
        return Err("content does not match its file name".into());
    }
    Ok(record)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    use crate::message::OutgoingMessage;
    use crate::status::State;

    fn record(id: &str, attempts: u32) -> MessageRecord {
        let mut status = StatusRecord::new(
            id.to_string(),
            1_000 + attempts as u64,
            vec!["user@example.org".into()],
        );
        status.attempts = attempts;
        status.updated_at_ms = 2_000;
        status.next_attempt_at_ms = (attempts > 0).then_some(3_000);
        status.last_error = (attempts > 0).then(|| "451 busy".into());
        status.revision = u64::from(attempts);
        if attempts > 0 {
            status.set_state(State::Retrying);
        }
        MessageRecord {
            message: Arc::new(OutgoingMessage {
                id: id.to_string(),
                envelope_from: "app@example.com".into(),
                recipients: vec!["user@example.org".into()],
                content: format!("Subject: {id}\r\n\r\nhello\r\n"),
            }),
            status,
        }
    }

    fn finished(id: &str, state: State) -> StatusRecord {
        let mut status = record(id, 0).status;
        status.set_state(state);
        status
    }

    /// A fresh directory for one test (also used by `finished`'s tests).
    pub(in crate::store) fn empty_directory(name: &str) -> PathBuf {
        let directory = std::env::temp_dir().join(format!(
            "mailroom-spool-{}-{name}-{:x}",
            std::process::id(),
            random_u64()
        ));
        let _ = fs::remove_dir_all(&directory);
        fs::create_dir_all(&directory).unwrap();
        directory
    }

    /// Small segments keep the zero-fill (and the tests) quick.
    const TEST_SEGMENT_BYTES: u64 = 64 << 10;

    fn open(directory: &Path) -> (Journal, Recovered) {
        Journal::open(directory, TEST_SEGMENT_BYTES, 100).unwrap()
    }

    fn pending_ids(recovered: &Recovered) -> Vec<String> {
        let mut ids: Vec<String> = recovered
            .pending
            .iter()
            .map(|record| record.status.id.clone())
            .collect();
        ids.sort();
        ids
    }

    fn segments(directory: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = fs::read_dir(directory.join("journal"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn the_latest_record_wins_and_dead_letters_are_kept_apart() {
        let directory = empty_directory("latest");
        let (spool, recovered) = open(&directory);
        assert!(recovered.pending.is_empty() && recovered.dead.is_empty());
        spool.store(&[&record("a", 0)]).unwrap();
        spool.store(&[&record("b", 0)]).unwrap();
        spool.store(&[&record("c", 0)]).unwrap();
        spool.store(&[&record("a", 2)]).unwrap();
        spool.finish(&finished("b", State::Sent)).unwrap();
        spool.dead_letter(&record("c", 1)).unwrap();
        drop(spool);

        let (_spool, recovered) = open(&directory);
        assert_eq!(recovered.pending, vec![record("a", 2)]);
        assert_eq!(recovered.dead, vec![record("c", 1)]);
        assert_eq!(recovered.corrupt, 0);
        assert!(directory.join("dead").join("c.json").is_file());
    }

    #[test]
    fn one_process_at_a_time() {
        let directory = empty_directory("lock");
        let (spool, _) = open(&directory);
        let error = Journal::open(&directory, TEST_SEGMENT_BYTES, 100)
            .err()
            .expect("a second open is refused");
        assert!(error.to_string().contains("in use"), "{error}");
        drop(spool);
        let (_spool, _) = open(&directory);
    }

    #[test]
    fn a_dead_letter_beats_the_journal_after_a_crash_in_between() {
        let directory = empty_directory("dead-wins");
        let (spool, _) = open(&directory);
        spool.store(&[&record("x", 0)]).unwrap();
        drop(spool);
        // The dead letter was written, the journal's remove was not.
        write_durably(&directory, "dead", &record("x", 1)).unwrap();
        let (_spool, recovered) = open(&directory);
        assert!(recovered.pending.is_empty());
        assert_eq!(recovered.dead, vec![record("x", 1)]);
    }

    #[test]
    fn every_cut_of_a_torn_tail_keeps_the_records_before_it() {
        let directory = empty_directory("torn-source");
        let (spool, _) = open(&directory);
        for id in ["r1", "r2", "r3"] {
            spool.store(&[&record(id, 0)]).unwrap();
        }
        drop(spool);
        let [segment] = segments(&directory).try_into().unwrap();
        let mut data = fs::read(&segment).unwrap();
        // Frames as (start, end); commits may leave zeros between them.
        let frames: Vec<(usize, usize)> = frame::pieces(&data)
            .filter_map(|piece| match piece {
                Piece::Frame { offset, length, .. } => Some((offset, offset + length)),
                Piece::Unused { .. } => None,
                Piece::Garbage { .. } => panic!("the source segment is clean"),
            })
            .collect();
        let ends: Vec<usize> = frames.iter().map(|(_, end)| *end).collect();
        assert_eq!(ends.len(), 3);
        // Without the zero-filled space after the records.
        data.truncate(ends[2]);

        // Every fifth cut point inside the frames, every frame boundary
        // and its neighbours, and the middle of the zeros between frames.
        let mut cuts: Vec<usize> = frames
            .iter()
            .flat_map(|(start, end)| (*start..*end).step_by(5))
            .collect();
        for (index, end) in ends.iter().enumerate() {
            cuts.extend([end - 1, *end, (end + 1).min(data.len())]);
            if let Some((next, _)) = frames.get(index + 1) {
                cuts.push((end + next) / 2);
            }
        }
        for cut in cuts {
            let directory = empty_directory("torn");
            fs::create_dir_all(directory.join("journal")).unwrap();
            fs::write(
                directory.join("journal").join(segment_name(7)),
                &data[..cut],
            )
            .unwrap();
            let (spool, recovered) = open(&directory);
            let complete = ends.iter().filter(|end| **end <= cut).count();
            let expected: Vec<String> = ["r1", "r2", "r3"][..complete]
                .iter()
                .map(|id| id.to_string())
                .collect();
            assert_eq!(pending_ids(&recovered), expected, "cut at {cut}");
            let torn = frames.iter().any(|(start, end)| *start < cut && cut < *end);
            assert_eq!(recovered.corrupt, usize::from(torn), "cut at {cut}");
            drop(spool);
            // The torn bytes were set aside once; the next start is clean.
            let (_spool, again) = open(&directory);
            assert_eq!(pending_ids(&again), expected, "cut at {cut}");
            assert_eq!(again.corrupt, 0, "cut at {cut}");
            let _ = fs::remove_dir_all(&directory);
        }
    }

    #[test]
    fn a_finish_frame_is_what_serde_writes_for_a_finish_entry() {
        let status = finished("a", State::Sent);
        let line = serde_json::to_vec(&status).unwrap();
        assert_eq!(
            finish_frame(&line).unwrap(),
            encode(&EntryRef::Finish(&status)).unwrap()
        );
    }

    #[test]
    fn garbage_between_records_and_stray_files_are_set_aside() {
        let directory = empty_directory("garbage");
        let (spool, _) = open(&directory);
        spool.store(&[&record("before", 0)]).unwrap();
        drop(spool);
        let [segment] = segments(&directory).try_into().unwrap();
        let mut data = fs::read(&segment).unwrap();
        let end = data.iter().rposition(|byte| *byte != 0).unwrap() + 1;
        data.splice(
            end..end + 20,
            b"\x01\0\0 mrj1 garbage \xff\xfe".iter().copied(),
        );
        fs::write(&segment, &data).unwrap();
        let (spool, _) = open(&directory);
        spool.store(&[&record("after", 0)]).unwrap();
        drop(spool);
        // Garbage again, this time in the middle of the newest segment.
        let newest = segments(&directory).pop().unwrap();
        let mut data = fs::read(&newest).unwrap();
        data.truncate(data.iter().rposition(|byte| *byte != 0).unwrap() + 1);
        let middle = data.len();
        data.extend_from_slice(b"more garbage");
        data.extend_from_slice(
            &frame::encode(|buffer| {
                serde_json::to_writer(&mut *buffer, &EntryRef::Store(&record("last", 0)))
                    .map_err(io::Error::other)
            })
            .unwrap(),
        );
        fs::write(&newest, &data).unwrap();
        fs::write(directory.join("journal").join("notes.txt"), b"hello").unwrap();
        fs::write(directory.join("dead").join("zzz.json"), b"{").unwrap();

        let (_spool, recovered) = open(&directory);
        assert_eq!(pending_ids(&recovered), vec!["after", "before", "last"]);
        assert_eq!(
            recovered.corrupt, 3,
            "garbage run, stray file, bad dead letter"
        );
        let set_aside = fs::read(
            directory
                .join("corrupt")
                .join(format!("{}.{middle}", file_name(&newest))),
        )
        .unwrap();
        assert_eq!(set_aside, b"more garbage");
        assert!(directory
            .join("corrupt")
            .join("journal-notes.txt")
            .is_file());
        assert!(directory.join("corrupt").join("dead-zzz.json").is_file());
    }

    #[test]
    fn finished_segments_are_deleted_and_pinned_records_copied_forward() {
        let directory = empty_directory("compact");
        let (spool, _) = Journal::open(&directory, 2048, 100).unwrap();
        spool.store(&[&record("pinned", 0)]).unwrap();
        for round in 0..300 {
            let id = format!("m{round}");
            spool.store(&[&record(&id, 0)]).unwrap();
            spool.finish(&finished(&id, State::Sent)).unwrap();
            if round == 150 {
                spool.store(&[&record("pinned", 3)]).unwrap();
            }
            // Sealed segments stay bounded although "pinned" never finishes.
            assert!(segments(&directory).len() <= 6, "round {round}");
        }
        drop(spool);
        let (_spool, recovered) = open(&directory);
        assert_eq!(recovered.pending, vec![record("pinned", 3)]);
        assert_eq!(recovered.corrupt, 0);
        assert_eq!(segments(&directory).len(), 1);
    }

    #[test]
    fn a_crash_during_recovery_changes_nothing() {
        let directory = empty_directory("recovery-crash");
        let (spool, _) = open(&directory);
        for id in ["a", "b", "c"] {
            spool.store(&[&record(id, 0)]).unwrap();
        }
        spool.finish(&finished("b", State::Sent)).unwrap();
        spool.store(&[&record("a", 1)]).unwrap();
        drop(spool);
        let old: Vec<(PathBuf, Vec<u8>)> = segments(&directory)
            .into_iter()
            .map(|path| {
                let data = fs::read(&path).unwrap();
                (path, data)
            })
            .collect();
        let (spool, first) = open(&directory);
        drop(spool);
        let [rewritten] = segments(&directory).try_into().unwrap();
        let rewritten_data = fs::read(&rewritten).unwrap();

        // Crash before the old segments were deleted, with the new one
        // complete, torn, or empty: the same state every time.
        for cut in [rewritten_data.len(), rewritten_data.len() / 2, 0] {
            for (path, data) in &old {
                fs::write(path, data).unwrap();
            }
            fs::write(&rewritten, &rewritten_data[..cut]).unwrap();
            let (spool, again) = open(&directory);
            assert_eq!(again.pending, first.pending, "cut at {cut}");
            drop(spool);
            for path in segments(&directory) {
                fs::remove_file(path).unwrap();
            }
        }
        assert_eq!(
            first.pending,
            vec![record("c", 0), record("a", 1)],
            "sorted by acceptance time"
        );
    }
}
