use std::io::Result as IoResult;
use std::io::{Read, Write};

use std::sync::mpsc::channel;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use std::mem;

pub struct SequentialReaderBuilder<R>
where
    R: Read + Send,
{
    inner: SequentialReaderBuilderInner<R>,
}

enum SequentialReaderBuilderInner<R>
where
    R: Read + Send,
{
    First(R),
    NotFirst(Receiver<R>),
}

pub struct SequentialReader<R>
where
    R: Read + Send,
{
    inner: SequentialReaderInner<R>,
    next: Sender<R>,
}

enum SequentialReaderInner<R>
where
    R: Read + Send,
{
    MyTurn(R),
    Waiting(Receiver<R>),
    Empty,
}

pub struct SequentialWriterBuilder<W>
where
    W: Write + Send,
{
    writer: Arc<Mutex<W>>,
    next_trigger: Option<Receiver<()>>,
}

pub struct SequentialWriter<W>
where
    W: Write + Send,
{
    trigger: Option<Receiver<()>>,
    writer: Arc<Mutex<W>>,
    on_finish: Sender<()>,
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    pub fn new(reader: R) -> SequentialReaderBuilder<R> {
        SequentialReaderBuilder {
            inner: SequentialReaderBuilderInner::First(reader),
        }
    }
}

impl<W: Write + Send> SequentialWriterBuilder<W> {
    pub fn new(writer: W) -> SequentialWriterBuilder<W> {
        SequentialWriterBuilder {
            writer: Arc::new(Mutex::new(writer)),
            next_trigger: None,
        }
    }
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    /// The reader whose turn comes after the last one made.
    pub fn new_reader(&mut self) -> SequentialReader<R> {
        let (tx, rx) = channel();

        let inner = mem::replace(&mut self.inner, SequentialReaderBuilderInner::NotFirst(rx));

        match inner {
            SequentialReaderBuilderInner::First(reader) => SequentialReader {
                inner: SequentialReaderInner::MyTurn(reader),
                next: tx,
            },

            SequentialReaderBuilderInner::NotFirst(previous) => SequentialReader {
                inner: SequentialReaderInner::Waiting(previous),
                next: tx,
            },
        }
    }
}

impl<W: Write + Send> SequentialWriterBuilder<W> {
    /// The writer whose turn comes after the last one made.
    pub fn new_writer(&mut self) -> SequentialWriter<W> {
        let (tx, rx) = channel();
        let mut next_next_trigger = Some(rx);
        ::std::mem::swap(&mut next_next_trigger, &mut self.next_trigger);

        SequentialWriter {
            trigger: next_next_trigger,
            writer: self.writer.clone(),
            on_finish: tx,
        }
    }
}

impl<R: Read + Send> SequentialReader<R> {
    /// Waits until the readers before this one are done with the stream.
    pub fn wait_turn(&mut self) -> IoResult<()> {
        if let SequentialReaderInner::Waiting(ref mut recv) = self.inner {
            let reader = recv.recv().map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the stream was lost")
            })?;
            self.inner = SequentialReaderInner::MyTurn(reader);
        }
        Ok(())
    }
}

impl<R: Read + Send> Read for SequentialReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        self.wait_turn()?;
        match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => reader.read(buf),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the stream was lost",
            )),
        }
    }
}

impl<W: Write + Send> SequentialWriter<W> {
    /// Waits until the answers before this one are written, then locks
    /// the writer.
    fn turn(&mut self) -> std::sync::MutexGuard<'_, W> {
        if let Some(v) = self.trigger.take() {
            // An error means the answer before this one is gone: our turn.
            let _ = v.recv();
        }
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<W: Write + Send> Write for SequentialWriter<W> {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        self.turn().write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.turn().flush()
    }
}

impl<R> Drop for SequentialReader<R>
where
    R: Read + Send,
{
    fn drop(&mut self) {
        let inner = mem::replace(&mut self.inner, SequentialReaderInner::Empty);

        match inner {
            SequentialReaderInner::MyTurn(reader) => {
                self.next.send(reader).ok();
            }
            SequentialReaderInner::Waiting(recv) => {
                if let Ok(reader) = recv.recv() {
                    self.next.send(reader).ok();
                }
            }
            SequentialReaderInner::Empty => (),
        }
    }
}

impl<W> Drop for SequentialWriter<W>
where
    W: Write + Send,
{
    fn drop(&mut self) {
        self.on_finish.send(()).ok();
    }
}
