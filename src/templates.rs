//! Stored message templates: `MAILROOM_TEMPLATES_DIR/NAME/` holds
//! `subject.txt` (required) and `text.txt` and/or `html.html`, rendered with
//! MiniJinja from a request's `data`.
//!
//! The rules, checked here so that callers only map errors to answers:
//! - Every template is compiled when the set is loaded; a syntax error, a
//!   missing `subject.txt`, a folder without a body, a name that is not
//!   `[A-Za-z0-9_-]+`, an unexpected file or a file that is not UTF-8 refuses
//!   the whole set, naming the file (and line).
//! - Undefined variables are errors, also as an `{% if %}` condition
//!   (`x is defined` and `x | default(...)` are the ways to make one
//!   optional); a `null` member of `data` counts as absent.
//!   `html.html` is HTML-escaped; subject and text are not.
//! - A template cannot include, import or extend another one or any file
//!   (MiniJinja is built without `multi_template`: those statements are
//!   syntax errors at load), and nothing reads files or the network while
//!   rendering. Macros are available within one file.
//! - The rendered subject is trimmed and must be one line: a line break in it
//!   (say, from data) is an error naming the expression that produced it.
//! - One render is bounded: `data` ([`DATA_LIMIT_BYTES`], [`DATA_DEPTH_LIMIT`]),
//!   the work of each part ([`FUEL_PER_PART`], [`RECURSION_LIMIT`]) and its
//!   output ([`SUBJECT_LIMIT_BYTES`], [`BODY_LIMIT_BYTES`]).
//! - [`Templates::reload`] reads and checks a new set before swapping it in
//!   whole; a broken set is refused and the old one stays. Each render uses
//!   one set from start to end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use minijinja::{AutoEscape, Environment, ErrorKind, OutputSpanKind, UndefinedBehavior, Value};
use serde::Serialize;

use crate::config::{Config, DEFAULT_TEMPLATES_DIR};

/// Largest template file; anything bigger is not a message template.
pub const FILE_LIMIT_BYTES: u64 = 1 << 20;
/// Largest `data` accepted by a render, counted as string bytes plus 8 per
/// value (a JSON object of that size in a request is about as large).
pub const DATA_LIMIT_BYTES: usize = 1 << 20;
/// Deepest nesting of objects and arrays in `data`.
pub const DATA_DEPTH_LIMIT: usize = 32;
/// MiniJinja fuel for each part of one render: about one unit per
/// instruction and per 64 bytes of data created, so it bounds both time and
/// memory (~12 MB). The example welcome template uses under 100.
pub const FUEL_PER_PART: u64 = 200_000;
/// MiniJinja's nesting limit (loops, conditions, macro calls) for a render;
/// below its default of 500 so that a render stays far from the end of a
/// thread's stack.
pub const RECURSION_LIMIT: usize = 100;
/// Longest rendered subject (one header line's worth, before encoding).
pub const SUBJECT_LIMIT_BYTES: usize = 998;
/// Longest rendered text or HTML part.
pub const BODY_LIMIT_BYTES: usize = 2 << 20;

/// The files of a template folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Subject,
    Text,
    Html,
}

impl Part {
    const ALL: [Part; 3] = [Part::Subject, Part::Text, Part::Html];

    fn file(self) -> &'static str {
        match self {
            Part::Subject => "subject.txt",
            Part::Text => "text.txt",
            Part::Html => "html.html",
        }
    }

    fn from_file(file: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|part| part.file() == file)
    }

    fn limit(self) -> usize {
        match self {
            Part::Subject => SUBJECT_LIMIT_BYTES,
            Part::Text | Part::Html => BODY_LIMIT_BYTES,
        }
    }
}

/// A message rendered from a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rendered {
    /// One line, trimmed.
    pub subject: String,
    /// From `text.txt`, when the template has one.
    pub text: Option<String>,
    /// From `html.html` (escaped), when the template has one.
    pub html: Option<String>,
}

/// A template and the variables it uses, for listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateInfo {
    /// The folder name.
    pub name: String,
    /// Top-level names the template reads from `data` in any part, sorted.
    pub variables: Vec<String>,
}

/// A template set that could not be loaded; names the file (and line).
#[derive(Debug)]
#[non_exhaustive]
pub enum TemplateError {
    /// A directory or file could not be read (including a templates
    /// directory that does not exist when it was set explicitly).
    Io {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A template does not compile.
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line, when MiniJinja knows it.
        line: Option<usize>,
        /// MiniJinja's description.
        detail: String,
    },
    /// A file is not valid UTF-8.
    NotUtf8 {
        /// The file.
        file: PathBuf,
        /// 1-based line of the first invalid byte.
        line: usize,
    },
    /// A file is larger than [`FILE_LIMIT_BYTES`].
    TooLarge {
        /// The file.
        file: PathBuf,
    },
    /// A folder name is not `[A-Za-z0-9_-]+`.
    InvalidName {
        /// The folder.
        path: PathBuf,
    },
    /// Something in the templates directory is not a template folder.
    NotAFolder {
        /// The entry.
        path: PathBuf,
    },
    /// A template folder holds something other than its three files.
    UnexpectedFile {
        /// The entry.
        path: PathBuf,
    },
    /// A template folder is empty.
    EmptyFolder {
        /// The folder.
        path: PathBuf,
    },
    /// A template folder has no `subject.txt`.
    MissingSubject {
        /// The missing file.
        file: PathBuf,
    },
    /// A template folder has neither `text.txt` nor `html.html`.
    MissingBody {
        /// The folder.
        path: PathBuf,
    },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Io { path, source } => {
                write!(f, "{}: cannot read: {source}", path.display())
            }
            TemplateError::Syntax { file, line, detail } => match line {
                Some(line) => write!(f, "{} line {line}: {detail}", file.display()),
                None => write!(f, "{}: {detail}", file.display()),
            },
            TemplateError::NotUtf8 { file, line } => {
                write!(f, "{} line {line}: not valid UTF-8", file.display())
            }
            TemplateError::TooLarge { file } => write!(
                f,
                "{}: larger than {FILE_LIMIT_BYTES} bytes",
                file.display()
            ),
            TemplateError::InvalidName { path } => write!(
                f,
                "{}: a template name may only use A-Z, a-z, 0-9, _ and -",
                path.display()
            ),
            TemplateError::NotAFolder { path } => write!(
                f,
                "{}: not a template folder (each template is a folder NAME/ with subject.txt, \
                 text.txt and/or html.html)",
                path.display()
            ),
            TemplateError::UnexpectedFile { path } => write!(
                f,
                "{}: unexpected; a template folder holds subject.txt, text.txt and html.html only",
                path.display()
            ),
            TemplateError::EmptyFolder { path } => write!(
                f,
                "{}: empty template folder (needs subject.txt and text.txt and/or html.html)",
                path.display()
            ),
            TemplateError::MissingSubject { file } => {
                write!(f, "{}: missing (every template needs one)", file.display())
            }
            TemplateError::MissingBody { path } => write!(
                f,
                "{}: needs text.txt or html.html (or both)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TemplateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TemplateError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A render that failed; names the template and, where there is one, the
/// variable. Built from MiniJinja's error without keeping it: in debug mode
/// that error carries a copy of the request's data.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RenderError {
    /// No template by that name.
    UnknownTemplate {
        /// The name asked for.
        name: String,
    },
    /// `data` is not a JSON object.
    DataNotObject,
    /// `data` is larger than [`DATA_LIMIT_BYTES`].
    DataTooLarge,
    /// `data` nests deeper than [`DATA_DEPTH_LIMIT`].
    DataTooDeep,
    /// The template uses a variable that `data` does not have.
    UndefinedVariable {
        /// The template.
        template: String,
        /// The file of the template (`subject.txt`, `text.txt`, `html.html`).
        file: &'static str,
        /// The expression that is undefined, e.g. `name` or `user.email`.
        variable: String,
        /// 1-based line in `file`.
        line: Option<usize>,
    },
    /// The rendered subject would span several lines (header injection).
    SubjectLineBreak {
        /// The template.
        template: String,
        /// The expression whose value brought the line break, or `None`
        /// when it is the template's own text.
        expression: Option<String>,
        /// 1-based line in `subject.txt`.
        line: Option<usize>,
    },
    /// A part rendered to more than [`SUBJECT_LIMIT_BYTES`] or
    /// [`BODY_LIMIT_BYTES`].
    OutputTooLarge {
        /// The template.
        template: String,
        /// The part.
        file: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// A part used up its [`FUEL_PER_PART`].
    TooMuchWork {
        /// The template.
        template: String,
        /// The part.
        file: &'static str,
    },
    /// Any other failure while rendering (a wrong type for an operation, an
    /// unknown filter, the recursion limit).
    Failed {
        /// The template.
        template: String,
        /// The part.
        file: &'static str,
        /// 1-based line in `file`.
        line: Option<usize>,
        /// MiniJinja's description.
        detail: String,
    },
}

impl RenderError {
    /// The request field at fault: `template` or `data`.
    pub fn field(&self) -> &'static str {
        match self {
            RenderError::UnknownTemplate { .. }
            | RenderError::SubjectLineBreak {
                expression: None, ..
            }
            | RenderError::TooMuchWork { .. }
            | RenderError::Failed { .. } => "template",
            RenderError::DataNotObject
            | RenderError::DataTooLarge
            | RenderError::DataTooDeep
            | RenderError::UndefinedVariable { .. }
            | RenderError::SubjectLineBreak { .. }
            | RenderError::OutputTooLarge { .. } => "data",
        }
    }
}

fn at(file: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{file} line {line}"),
        None => file.to_string(),
    }
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderError::UnknownTemplate { name } => write!(f, "unknown template {name:?}"),
            RenderError::DataNotObject => f.write_str("data must be a JSON object"),
            RenderError::DataTooLarge => {
                write!(f, "data is larger than {DATA_LIMIT_BYTES} bytes")
            }
            RenderError::DataTooDeep => {
                write!(f, "data nests deeper than {DATA_DEPTH_LIMIT} levels")
            }
            RenderError::UndefinedVariable {
                template,
                file,
                variable,
                line,
            } => write!(
                f,
                "template {template}: undefined variable {variable:?} ({})",
                at(file, *line)
            ),
            RenderError::SubjectLineBreak {
                template,
                expression: Some(expression),
                line,
            } => write!(
                f,
                "template {template}: the value of {expression:?} puts a line break into the \
                 subject ({})",
                at(Part::Subject.file(), *line)
            ),
            RenderError::SubjectLineBreak {
                template,
                expression: None,
                line,
            } => write!(
                f,
                "template {template}: the subject spans several lines ({})",
                at(Part::Subject.file(), *line)
            ),
            RenderError::OutputTooLarge {
                template,
                file,
                limit,
            } => write!(
                f,
                "template {template}: {file} renders to more than {limit} bytes"
            ),
            RenderError::TooMuchWork { template, file } => write!(
                f,
                "template {template}: {file} does too much work (more than {FUEL_PER_PART} steps)"
            ),
            RenderError::Failed {
                template,
                file,
                line,
                detail,
            } => write!(f, "template {template}: {}: {detail}", at(file, *line)),
        }
    }
}

impl std::error::Error for RenderError {}

/// The loaded templates, shared: clones are handles to the same set, and a
/// reload through any of them is seen by all.
#[derive(Clone)]
pub struct Templates {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    /// A missing directory is an empty set rather than an error.
    missing_ok: bool,
    current: Mutex<Arc<TemplateSet>>,
    /// One reload at a time, so the last one started is the one that stays.
    reloading: Mutex<()>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("dir", &self.shared.dir)
            .field("names", &self.snapshot().names().collect::<Vec<_>>())
            .finish()
    }
}

impl Templates {
    /// Loads and checks every template in `dir`, which must exist.
    pub fn load(dir: impl Into<PathBuf>) -> Result<Templates, TemplateError> {
        Templates::open(dir.into(), false)
    }

    /// Like [`load`](Self::load), but a missing `dir` is no templates (a
    /// later reload picks the directory up once it exists).
    pub fn load_or_empty(dir: impl Into<PathBuf>) -> Result<Templates, TemplateError> {
        Templates::open(dir.into(), true)
    }

    /// Loads `config.templates_dir`. The default location may be absent (no
    /// templates, so a service that uses none needs no folder); any other
    /// location must exist, as a typo or a missing mount would otherwise turn
    /// every templated request into an error long after the start.
    pub fn from_config(config: &Config) -> Result<Templates, TemplateError> {
        let missing_ok = config.templates_dir == Path::new(DEFAULT_TEMPLATES_DIR);
        Templates::open(config.templates_dir.clone(), missing_ok)
    }

    fn open(dir: PathBuf, missing_ok: bool) -> Result<Templates, TemplateError> {
        let set = TemplateSet::read(&dir, missing_ok)?;
        log::info!("templates: loaded {}", set.describe(&dir));
        Ok(Templates {
            shared: Arc::new(Shared {
                dir,
                missing_ok,
                current: Mutex::new(Arc::new(set)),
                reloading: Mutex::new(()),
            }),
        })
    }

    /// The directory the templates come from.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Reads and checks the directory again and swaps the new set in whole.
    /// A broken set is refused (the error says why) and the current one
    /// stays; renders already running finish with the set they started with.
    pub fn reload(&self) -> Result<(), TemplateError> {
        let _one_at_a_time = self
            .shared
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match TemplateSet::read(&self.shared.dir, self.shared.missing_ok) {
            Ok(set) => {
                log::info!("templates: reloaded {}", set.describe(&self.shared.dir));
                let previous = std::mem::replace(
                    &mut *self
                        .shared
                        .current
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                    Arc::new(set),
                );
                // Freed outside the lock, once the last render using it ends.
                drop(previous);
                Ok(())
            }
            Err(error) => {
                log::error!("templates: reload refused, the previous set stays: {error}");
                Err(error)
            }
        }
    }

    /// The current set, unaffected by later reloads (e.g. to render a whole
    /// batch from one set).
    pub fn snapshot(&self) -> TemplateSnapshot {
        TemplateSnapshot(Arc::clone(
            &self
                .shared
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ))
    }

    /// Renders template `name` with `data` (a JSON object) from the current set.
    pub fn render(&self, name: &str, data: &serde_json::Value) -> Result<Rendered, RenderError> {
        self.snapshot().render(name, data)
    }

    /// Every template with the variables it uses, sorted by name.
    pub fn list(&self) -> Vec<TemplateInfo> {
        self.snapshot().list()
    }
}

/// One loaded set of templates; see [`Templates::snapshot`].
#[derive(Clone)]
pub struct TemplateSnapshot(Arc<TemplateSet>);

impl fmt::Debug for TemplateSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl TemplateSnapshot {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.0.names()
    }

    /// Renders template `name` with `data` (a JSON object).
    pub fn render(&self, name: &str, data: &serde_json::Value) -> Result<Rendered, RenderError> {
        self.0.render(name, data)
    }

    /// Every template with the variables it uses, sorted by name.
    pub fn list(&self) -> Vec<TemplateInfo> {
        self.0
            .entries
            .iter()
            .map(|(name, entry)| TemplateInfo {
                name: name.clone(),
                variables: entry.variables.clone(),
            })
            .collect()
    }
}

struct Entry {
    parts: BTreeSet<Part>,
    variables: Vec<String>,
}

struct TemplateSet {
    environment: Environment<'static>,
    entries: BTreeMap<String, Entry>,
}

fn environment_name(template: &str, part: Part) -> String {
    format!("{template}/{}", part.file())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

fn new_environment() -> Environment<'static> {
    let mut environment = Environment::new();
    environment.set_undefined_behavior(UndefinedBehavior::Strict);
    let html_suffix = format!("/{}", Part::Html.file());
    environment.set_auto_escape_callback(move |name| {
        if name.ends_with(&html_suffix) {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    environment.set_fuel(Some(FUEL_PER_PART));
    environment.set_recursion_limit(RECURSION_LIMIT);
    // Debug mode makes MiniJinja name the undefined expression in its error.
    environment.set_debug(true);
    // Dumps the engine's state into the output: no use in a message.
    environment.remove_global("debug");
    environment
}

/// Directory entries, sorted by name so that the first problem reported is
/// the same on every run, without hidden files (`.gitkeep`, editor swap files).
fn visible_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, io::Error> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        entries.push((name.to_string_lossy().into_owned(), entry.path()));
    }
    entries.sort();
    Ok(entries)
}

fn read_source(file: &Path) -> Result<String, TemplateError> {
    let io_error = |source| TemplateError::Io {
        path: file.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|opened| opened.take(FILE_LIMIT_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io_error)?;
    if bytes.len() as u64 > FILE_LIMIT_BYTES {
        return Err(TemplateError::TooLarge {
            file: file.to_path_buf(),
        });
    }
    String::from_utf8(bytes).map_err(|error| {
        let valid = &error.as_bytes()[..error.utf8_error().valid_up_to()];
        TemplateError::NotUtf8 {
            file: file.to_path_buf(),
            line: 1 + valid.iter().filter(|&&byte| byte == b'\n').count(),
        }
    })
}

impl TemplateSet {
    fn read(dir: &Path, missing_ok: bool) -> Result<TemplateSet, TemplateError> {
        let mut set = TemplateSet {
            environment: new_environment(),
            entries: BTreeMap::new(),
        };
        let folders = match visible_entries(dir) {
            Ok(folders) => folders,
            Err(error) if missing_ok && error.kind() == io::ErrorKind::NotFound => return Ok(set),
            Err(source) => {
                return Err(TemplateError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        for (name, path) in folders {
            // Follows symbolic links: a deployment may link template folders in.
            let metadata = std::fs::metadata(&path).map_err(|source| TemplateError::Io {
                path: path.clone(),
                source,
            })?;
            if !metadata.is_dir() {
                return Err(TemplateError::NotAFolder { path });
            }
            if !valid_name(&name) {
                return Err(TemplateError::InvalidName { path });
            }
            let entry = set.add_folder(&name, &path)?;
            set.entries.insert(name, entry);
        }
        Ok(set)
    }

    fn add_folder(&mut self, name: &str, path: &Path) -> Result<Entry, TemplateError> {
        let files = visible_entries(path).map_err(|source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if files.is_empty() {
            return Err(TemplateError::EmptyFolder {
                path: path.to_path_buf(),
            });
        }
        let mut parts = BTreeMap::new();
        for (file, file_path) in files {
            match Part::from_file(&file) {
                Some(part) if file_path.is_file() => {
                    parts.insert(part, file_path);
                }
                _ => return Err(TemplateError::UnexpectedFile { path: file_path }),
            }
        }
        if !parts.contains_key(&Part::Subject) {
            return Err(TemplateError::MissingSubject {
                file: path.join(Part::Subject.file()),
            });
        }
        if !parts.contains_key(&Part::Text) && !parts.contains_key(&Part::Html) {
            return Err(TemplateError::MissingBody {
                path: path.to_path_buf(),
            });
        }
        let globals: BTreeSet<String> = self
            .environment
            .globals()
            .map(|(global, _)| global.to_string())
            .collect();
        let mut variables = BTreeSet::new();
        for (&part, file_path) in &parts {
            let source = read_source(file_path)?;
            let key = environment_name(name, part);
            self.environment
                .add_template_owned(key.clone(), source)
                .map_err(|error| TemplateError::Syntax {
                    file: file_path.clone(),
                    line: error.line(),
                    detail: describe(&error),
                })?;
            let template =
                self.environment
                    .get_template(&key)
                    .map_err(|error| TemplateError::Syntax {
                        file: file_path.clone(),
                        line: error.line(),
                        detail: describe(&error),
                    })?;
            variables.extend(
                template
                    .undeclared_variables(false)
                    .into_iter()
                    .filter(|variable| !globals.contains(variable)),
            );
        }
        Ok(Entry {
            parts: parts.into_keys().collect(),
            variables: variables.into_iter().collect(),
        })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// "2 from DIR: a, b", for the log.
    fn describe(&self, dir: &Path) -> String {
        let names: Vec<&str> = self.names().collect();
        match names.len() {
            0 => format!("none from {}", dir.display()),
            count => format!("{count} from {}: {}", dir.display(), names.join(", ")),
        }
    }

    fn render(&self, name: &str, data: &serde_json::Value) -> Result<Rendered, RenderError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| RenderError::UnknownTemplate {
                name: name.to_string(),
            })?;
        let serde_json::Value::Object(object) = data else {
            return Err(RenderError::DataNotObject);
        };
        let mut budget = DATA_LIMIT_BYTES;
        let context = object_value(object, 1, &mut budget)?;
        let mut rendered = Rendered {
            subject: String::new(),
            text: None,
            html: None,
        };
        for &part in &entry.parts {
            let output = self.render_part(name, part, &context)?;
            match part {
                Part::Subject => rendered.subject = self.check_subject(name, &context, output)?,
                Part::Text => rendered.text = Some(output),
                Part::Html => rendered.html = Some(output),
            }
        }
        Ok(rendered)
    }

    fn render_part(&self, name: &str, part: Part, context: &Value) -> Result<String, RenderError> {
        let failed = |detail: String, line| RenderError::Failed {
            template: name.to_string(),
            file: part.file(),
            line,
            detail,
        };
        let template = self
            .environment
            .get_template(&environment_name(name, part))
            .map_err(|error| failed(describe(&error), None))?;
        let mut output = CappedOutput {
            bytes: Vec::new(),
            limit: part.limit(),
            exceeded: false,
        };
        let result = template.render_captured_to(context.clone(), &mut output);
        if output.exceeded {
            return Err(RenderError::OutputTooLarge {
                template: name.to_string(),
                file: part.file(),
                limit: part.limit(),
            });
        }
        if let Err(error) = result {
            return Err(match error.kind() {
                ErrorKind::OutOfFuel => RenderError::TooMuchWork {
                    template: name.to_string(),
                    file: part.file(),
                },
                ErrorKind::UndefinedError => RenderError::UndefinedVariable {
                    template: name.to_string(),
                    file: part.file(),
                    variable: undefined_expression(&error)
                        .or_else(|| first_missing(template.undeclared_variables(false), context))
                        .unwrap_or_else(|| "?".to_string()),
                    line: error.line(),
                },
                _ => failed(describe(&error), error.line()),
            });
        }
        String::from_utf8(output.bytes)
            .map_err(|_| failed("rendered output is not UTF-8".into(), None))
    }

    /// Trims the subject and refuses one that spans lines, naming the
    /// expression that brought the line break.
    fn check_subject(
        &self,
        name: &str,
        context: &Value,
        subject: String,
    ) -> Result<String, RenderError> {
        let trimmed = subject.trim();
        let Some(found) = trimmed.find(['\r', '\n']) else {
            return Ok(trimmed.to_string());
        };
        let position = found + (subject.len() - subject.trim_start().len());
        // Render again with spans to find the culprit: rendering is
        // deterministic and this path is rare.
        let mut expression = None;
        let mut line = None;
        if let Ok(template) = self
            .environment
            .get_template(&environment_name(name, Part::Subject))
        {
            if let Ok((_, spans)) = template.render_with_spans(context.clone()) {
                if let Some(span) = spans
                    .iter()
                    .find(|span| span.output_range().contains(&position))
                {
                    line = Some(span.line());
                    if span.kind() == OutputSpanKind::Expression {
                        expression = template
                            .source()
                            .get(span.source_range())
                            .map(|source| source.trim().to_string());
                    }
                }
            }
        }
        Err(RenderError::SubjectLineBreak {
            template: name.to_string(),
            expression,
            line,
        })
    }
}

/// MiniJinja's description of an error, without the file and line (ours
/// are shown instead) or its debug dump (which may hold data).
fn describe(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    }
}

/// The undefined expression MiniJinja names in debug mode: its detail reads
/// "`name` is undefined" (possibly after more text, in parentheses).
fn undefined_expression(error: &minijinja::Error) -> Option<String> {
    let detail = error.detail()?;
    let end = detail.find("` is undefined")?;
    let start = detail[..end].rfind('`')? + 1;
    Some(detail[start..end].to_string())
}

/// The first variable a template uses that the data lacks: names the
/// variable should MiniJinja's detail not.
fn first_missing(used: std::collections::HashSet<String>, context: &Value) -> Option<String> {
    let mut used: Vec<String> = used.into_iter().collect();
    used.sort();
    used.into_iter().find(|variable| {
        context
            .get_attr(variable)
            .map_or(true, |value| value.is_undefined())
    })
}

/// Output that refuses to grow past `limit`: MiniJinja stops at the first
/// refused write, so a hostile template never holds more than that.
struct CappedOutput {
    bytes: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl io::Write for CappedOutput {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buffer.len() > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("output limit reached"));
        }
        self.bytes.extend_from_slice(buffer);
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Converts request data into MiniJinja values, bounding size and depth on
/// the way (each value costs 8 plus its string bytes). A member that is
/// `null` is left out, so using it is an undefined-variable error (and
/// `default(...)` applies) rather than a message that says "none".
fn json_value(
    value: &serde_json::Value,
    depth: usize,
    budget: &mut usize,
) -> Result<Value, RenderError> {
    charge(budget, 8)?;
    Ok(match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(flag) => Value::from(*flag),
        serde_json::Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                Value::from(integer)
            } else if let Some(integer) = number.as_u64() {
                Value::from(integer)
            } else {
                Value::from(number.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(text) => {
            charge(budget, text.len())?;
            Value::from(text.as_str())
        }
        serde_json::Value::Array(items) => {
            let depth = deeper(depth)?;
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                values.push(json_value(item, depth, budget)?);
            }
            Value::from(values)
        }
        serde_json::Value::Object(object) => object_value(object, deeper(depth)?, budget)?,
    })
}

fn object_value(
    object: &serde_json::Map<String, serde_json::Value>,
    depth: usize,
    budget: &mut usize,
) -> Result<Value, RenderError> {
    let mut map = BTreeMap::new();
    for (key, item) in object {
        charge(budget, key.len())?;
        if item.is_null() {
            charge(budget, 8)?;
            continue;
        }
        map.insert(key.clone(), json_value(item, depth, budget)?);
    }
    Ok(Value::from(map))
}

fn deeper(depth: usize) -> Result<usize, RenderError> {
    if depth >= DATA_DEPTH_LIMIT {
        Err(RenderError::DataTooDeep)
    } else {
        Ok(depth + 1)
    }
}

fn charge(budget: &mut usize, cost: usize) -> Result<(), RenderError> {
    *budget = budget.checked_sub(cost).ok_or(RenderError::DataTooLarge)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Barrier;

    /// A templates directory holding `files` (paths relative to it).
    fn directory(files: &[(&str, &str)]) -> PathBuf {
        let dir = mailroom_testkit::temp_dir("templates");
        write(&dir, files);
        dir
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (path, content) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
    }

    fn welcome() -> [(&'static str, &'static str); 3] {
        [
            ("welcome/subject.txt", "Welcome, {{ name }}!\n"),
            ("welcome/text.txt", "Hello {{ name }}, open {{ link }}\n"),
            (
                "welcome/html.html",
                "<p>Hello {{ name }}</p>\n<a href=\"{{ link }}\">open</a>\n",
            ),
        ]
    }

    fn load_error(files: &[(&str, &str)]) -> (PathBuf, TemplateError) {
        let dir = directory(files);
        let error = Templates::load(&dir).unwrap_err();
        (dir, error)
    }

    fn render_error(files: &[(&str, &str)], data: serde_json::Value) -> RenderError {
        let templates = Templates::load(directory(files)).unwrap();
        templates.render("t", &data).unwrap_err()
    }

    #[test]
    fn renders_text_and_html_with_data_escaping_only_the_html() {
        let templates = Templates::load(directory(&welcome())).unwrap();
        let rendered = templates
            .render(
                "welcome",
                &json!({"name": "<Bob & Co>", "link": "https://x.org/c?a=1&b=\"2\""}),
            )
            .unwrap();
        assert_eq!(rendered.subject, "Welcome, <Bob & Co>!");
        assert_eq!(
            rendered.text.as_deref(),
            Some("Hello <Bob & Co>, open https://x.org/c?a=1&b=\"2\"")
        );
        assert_eq!(
            rendered.html.as_deref(),
            Some(
                "<p>Hello &lt;Bob &amp; Co&gt;</p>\n\
                 <a href=\"https:&#x2f;&#x2f;x.org&#x2f;c?a=1&amp;b=&quot;2&quot;\">open</a>"
            )
        );
    }

    #[test]
    fn parts_are_optional_but_for_the_subject_and_data_may_nest() {
        let templates = Templates::load(directory(&[
            ("text-only/subject.txt", "  Order {{ order.id }}  \n"),
            (
                "text-only/text.txt",
                "{% for item in order.items %}{{ loop.index }}. {{ item.title | upper }} \
                 x{{ item.count }}\n{% endfor %}total {{ order.total }}",
            ),
            ("html-only/subject.txt", "Hi"),
            ("html-only/html.html", "<b>{{ flag }}</b>"),
        ]))
        .unwrap();
        let order = json!({"order": {"id": 7, "total": 12.5, "items": [
            {"title": "tea", "count": 2}, {"title": "cake", "count": 1}]}});
        let rendered = templates.render("text-only", &order).unwrap();
        assert_eq!(rendered.subject, "Order 7", "the subject is trimmed");
        assert_eq!(
            rendered.text.as_deref(),
            Some("1. TEA x2\n2. CAKE x1\ntotal 12.5")
        );
        assert_eq!(rendered.html, None);
        let rendered = templates
            .render("html-only", &json!({"flag": "on"}))
            .unwrap();
        assert_eq!(
            (rendered.text, rendered.html.as_deref()),
            (None, Some("<b>on</b>"))
        );
    }

    #[test]
    fn a_null_member_counts_as_missing_but_a_null_in_a_list_is_none() {
        let error = render_error(
            &[("t/subject.txt", "s"), ("t/text.txt", "Hello {{ name }}")],
            json!({"name": null}),
        );
        assert!(
            matches!(&error, RenderError::UndefinedVariable { variable, .. } if variable == "name"),
            "{error:?}"
        );
        let templates = Templates::load(directory(&[
            ("t/subject.txt", "{{ name | default('friend') }}"),
            ("t/text.txt", "{{ list | length }} {{ list[0] is none }}"),
        ]))
        .unwrap();
        let rendered = templates
            .render("t", &json!({"name": null, "list": [null]}))
            .unwrap();
        assert_eq!(rendered.subject, "friend");
        assert_eq!(rendered.text.as_deref(), Some("1 True"));
    }

    #[test]
    fn templates_can_be_shared_between_threads() {
        fn shared<T: Send + Sync + Clone + 'static>() {}
        shared::<Templates>();
        shared::<TemplateSnapshot>();
    }

    #[test]
    fn a_missing_variable_is_an_error_naming_it_and_the_template() {
        let templates = Templates::load(directory(&welcome())).unwrap();
        let error = templates
            .render("welcome", &json!({"link": "https://x.org"}))
            .unwrap_err();
        assert_eq!(
            error,
            RenderError::UndefinedVariable {
                template: "welcome".into(),
                file: "subject.txt",
                variable: "name".into(),
                line: Some(1),
            }
        );
        assert!(
            error
                .to_string()
                .starts_with("template welcome: undefined variable \"name\""),
            "{error}"
        );
        assert_eq!(error.field(), "data");

        let error = templates
            .render("welcome", &json!({"name": "Bob"}))
            .unwrap_err();
        assert!(
            matches!(&error, RenderError::UndefinedVariable { variable, file: "text.txt", .. } if variable == "link"),
            "{error:?}"
        );
    }

    #[test]
    fn undefined_is_an_error_in_conditions_loops_and_attributes_unless_asked_for() {
        let cases = [
            ("{% if vip %}VIP{% endif %}", "vip"),
            ("{% for item in items %}{{ item }}{% endfor %}", "items"),
            ("{{ user.email }}", "user.email"),
            ("{{ nobody.email }}", "nobody"),
            ("{{ name | upper }}", "name"),
        ];
        for (text, variable) in cases {
            let error = render_error(
                &[("t/subject.txt", "s"), ("t/text.txt", text)],
                json!({"user": {"name": "Bob"}}),
            );
            assert!(
                matches!(&error, RenderError::UndefinedVariable { variable: named, .. } if named == variable),
                "{text}: {error:?}"
            );
            assert!(error.to_string().contains(variable), "{error}");
        }
        // The explicit ways to make a variable optional still work.
        let templates = Templates::load(directory(&[
            ("t/subject.txt", "{{ product | default(\"mailroom\") }}"),
            (
                "t/text.txt",
                "{% if vip is defined and vip %}VIP {% endif %}{{ name }}",
            ),
        ]))
        .unwrap();
        let rendered = templates.render("t", &json!({"name": "Bob"})).unwrap();
        assert_eq!(
            (rendered.subject.as_str(), rendered.text.as_deref()),
            ("mailroom", Some("Bob"))
        );
        let rendered = templates
            .render("t", &json!({"name": "Bob", "vip": true, "product": "Shop"}))
            .unwrap();
        assert_eq!(
            (rendered.subject.as_str(), rendered.text.as_deref()),
            ("Shop", Some("VIP Bob"))
        );
    }

    #[test]
    fn a_syntax_error_at_load_names_the_file_and_line() {
        let (dir, error) = load_error(&[
            ("welcome/subject.txt", "Hi"),
            ("welcome/html.html", "<p>\n{{ name }}\n{{ name }\n<p>"),
        ]);
        assert!(
            matches!(&error, TemplateError::Syntax { line: Some(3), .. }),
            "{error:?}"
        );
        let expected = format!(
            "{} line 3: syntax error",
            dir.join("welcome/html.html").display()
        );
        assert!(error.to_string().starts_with(&expected), "{error}");

        let (dir, error) = load_error(&[("a/subject.txt", "Hi {{ name"), ("a/text.txt", "ok")]);
        let expected = format!(
            "{} line 1: syntax error",
            dir.join("a/subject.txt").display()
        );
        assert!(error.to_string().starts_with(&expected), "{error}");
    }

    #[test]
    fn templates_cannot_include_import_or_extend_anything() {
        for statement in [
            "{% include \"other/text.txt\" %}",
            "{% include \"/etc/passwd\" %}",
            "{% import \"other/text.txt\" as x %}",
            "{% from \"other/text.txt\" import y %}",
            "{% extends \"other/text.txt\" %}",
        ] {
            let (dir, error) = load_error(&[
                ("other/subject.txt", "s"),
                ("other/text.txt", "t"),
                ("t/subject.txt", "s"),
                ("t/text.txt", statement),
            ]);
            assert!(
                matches!(error, TemplateError::Syntax { .. }),
                "{statement}: {error:?}"
            );
            assert!(
                error
                    .to_string()
                    .starts_with(&dir.join("t/text.txt").display().to_string()),
                "{error}"
            );
        }
    }

    #[test]
    fn a_malformed_folder_refuses_the_load_naming_the_file() {
        let (dir, error) = load_error(&[("welcome/text.txt", "t")]);
        assert!(
            matches!(error, TemplateError::MissingSubject { .. }),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains(&dir.join("welcome/subject.txt").display().to_string()),
            "{error}"
        );

        let (dir, error) = load_error(&[("welcome/subject.txt", "s")]);
        assert!(
            matches!(error, TemplateError::MissingBody { .. }),
            "{error:?}"
        );
        assert!(error
            .to_string()
            .contains(&dir.join("welcome").display().to_string()));

        let dir = directory(&welcome());
        std::fs::create_dir(dir.join("empty")).unwrap();
        let error = Templates::load(&dir).unwrap_err();
        assert!(
            matches!(error, TemplateError::EmptyFolder { .. }),
            "{error:?}"
        );
        assert!(error
            .to_string()
            .contains(&dir.join("empty").display().to_string()));

        for name in ["bad name", "dots.too", "ünïcode"] {
            let (dir, error) = load_error(&[
                (&format!("{name}/subject.txt"), "s"),
                (&format!("{name}/text.txt"), "t"),
            ]);
            assert!(
                matches!(error, TemplateError::InvalidName { .. }),
                "{name}: {error:?}"
            );
            assert!(error
                .to_string()
                .contains(&dir.join(name).display().to_string()));
        }

        let (dir, error) = load_error(&[
            ("welcome/subject.txt", "s"),
            ("welcome/text.html", "a typo for text.txt"),
        ]);
        assert!(
            matches!(error, TemplateError::UnexpectedFile { .. }),
            "{error:?}"
        );
        assert!(error
            .to_string()
            .contains(&dir.join("welcome/text.html").display().to_string()));

        let (dir, error) = load_error(&[("welcome.txt", "a file, not a folder")]);
        assert!(
            matches!(error, TemplateError::NotAFolder { .. }),
            "{error:?}"
        );
        assert!(error
            .to_string()
            .contains(&dir.join("welcome.txt").display().to_string()));

        let dir = directory(&welcome());
        std::fs::write(dir.join("welcome/text.txt"), b"line one\nline \xff two\n").unwrap();
        let error = Templates::load(&dir).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} line 2: not valid UTF-8",
                dir.join("welcome/text.txt").display()
            )
        );

        let dir = directory(&welcome());
        std::fs::write(
            dir.join("welcome/html.html"),
            vec![b'x'; FILE_LIMIT_BYTES as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            Templates::load(&dir).unwrap_err(),
            TemplateError::TooLarge { .. }
        ));
    }

    #[test]
    fn hidden_files_are_ignored() {
        let dir = directory(&welcome());
        write(&dir, &[(".gitkeep", ""), ("welcome/.text.txt.swp", "x")]);
        let templates = Templates::load(&dir).unwrap();
        assert_eq!(templates.list().len(), 1);
    }

    #[test]
    fn only_the_default_directory_may_be_missing() {
        let missing = mailroom_testkit::temp_dir("templates").join("nowhere");
        let error = Templates::load(&missing).unwrap_err();
        assert!(
            matches!(&error, TemplateError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );

        let mut config = Config::for_outbox("unused");
        config.templates_dir = missing.clone();
        assert!(Templates::from_config(&config).is_err());

        // A missing directory that may be missing is no templates, until it appears.
        let templates = Templates::load_or_empty(&missing).unwrap();
        assert!(templates.list().is_empty());
        assert_eq!(
            templates.render("welcome", &json!({})).unwrap_err(),
            RenderError::UnknownTemplate {
                name: "welcome".into()
            }
        );
        write(&missing, &welcome());
        templates.reload().unwrap();
        assert_eq!(templates.list()[0].name, "welcome");
    }

    #[test]
    fn the_default_configuration_loads_the_example_welcome_template() {
        // Tests run in the package root, where the default ./templates is.
        let templates = Templates::from_config(&Config::for_outbox("unused")).unwrap();
        assert_eq!(
            templates.list(),
            vec![TemplateInfo {
                name: "welcome".into(),
                variables: vec!["link".into(), "name".into(), "product".into()],
            }]
        );
        let rendered = templates
            .render(
                "welcome",
                &json!({"name": "Ada", "link": "https://example.com/c?t=1&u=2"}),
            )
            .unwrap();
        assert_eq!(rendered.subject, "Welcome to mailroom, Ada");
        assert!(rendered
            .text
            .unwrap()
            .contains("https://example.com/c?t=1&u=2"));
        assert!(rendered.html.unwrap().contains("t=1&amp;u=2"));
    }

    #[test]
    fn list_gives_each_template_and_the_variables_it_uses() {
        let templates = Templates::load(directory(&[
            ("b/subject.txt", "{{ subject_line }}"),
            ("b/text.txt", "{{ name }}"),
            ("b/html.html", "{% set greeting = 'hi' %}{{ greeting }} {% for item in items %}{{ item.title }} {{ loop.index }}{% endfor %}{% for n in range(2) %}{{ n }}{% endfor %}{{ ns }}"),
            ("a/subject.txt", "fixed"),
            ("a/text.txt", "{% if x is defined %}{{ x }}{% endif %}"),
        ]))
        .unwrap();
        assert_eq!(
            templates.list(),
            vec![
                TemplateInfo {
                    name: "a".into(),
                    variables: vec!["x".into()]
                },
                TemplateInfo {
                    name: "b".into(),
                    variables: vec![
                        "items".into(),
                        "name".into(),
                        "ns".into(),
                        "subject_line".into()
                    ],
                },
            ]
        );
        let listed = serde_json::to_value(templates.list()).unwrap();
        assert_eq!(listed[0], json!({"name": "a", "variables": ["x"]}));
    }

    #[test]
    fn a_line_break_in_the_rendered_subject_is_refused_naming_its_source() {
        let templates = Templates::load(directory(&welcome())).unwrap();
        for name in ["Bob\r\nBcc: victim@example.org", "Bob\nX", "Bob\rX"] {
            let error = templates
                .render("welcome", &json!({"name": name, "link": "l"}))
                .unwrap_err();
            assert_eq!(
                error,
                RenderError::SubjectLineBreak {
                    template: "welcome".into(),
                    expression: Some("name".into()),
                    line: Some(1),
                }
            );
            assert!(
                error.to_string().contains("welcome") && error.to_string().contains("\"name\""),
                "{error}"
            );
        }
        // Line breaks at the ends are trimmed away with the rest of the space.
        let templates = Templates::load(directory(&[
            ("t/subject.txt", "{{ name }}"),
            ("t/text.txt", "t"),
        ]))
        .unwrap();
        let rendered = templates
            .render("t", &json!({"name": "\r\n Bob\r\n"}))
            .unwrap();
        assert_eq!(rendered.subject, "Bob");
    }

    #[test]
    fn a_subject_template_of_several_lines_is_refused_at_render() {
        let error = render_error(
            &[
                ("t/subject.txt", "Hello\n{{ name }}\n"),
                ("t/text.txt", "t"),
            ],
            json!({"name": "Bob"}),
        );
        assert_eq!(
            error,
            RenderError::SubjectLineBreak {
                template: "t".into(),
                expression: None,
                line: Some(1),
            }
        );
    }

    /// Version `n` of a set of two templates whose every part says `n`.
    fn version(dir: &Path, n: usize) {
        let tag = n.to_string();
        for name in ["one", "two"] {
            write(
                dir,
                &[
                    (
                        &format!("{name}/subject.txt"),
                        &format!("{tag} {{{{ who }}}}"),
                    ),
                    (&format!("{name}/text.txt"), &tag),
                    (&format!("{name}/html.html"), &tag),
                ],
            );
        }
    }

    #[test]
    fn a_reload_swaps_the_whole_set_while_renders_run() {
        let dir = mailroom_testkit::temp_dir("templates");
        version(&dir, 0);
        let templates = Templates::load(&dir).unwrap();
        const RELOADS: usize = 200;
        const RENDERERS: usize = 3;
        let done = AtomicBool::new(false);
        let renders = AtomicUsize::new(0);
        let start = Barrier::new(RENDERERS + 1);
        let seen = std::thread::scope(|scope| {
            let renderers: Vec<_> = (0..RENDERERS)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        let mut seen = BTreeSet::new();
                        // Keeps rendering until the reloads are over, and at
                        // least a few times after each of them on average.
                        while !done.load(Ordering::SeqCst)
                            || renders.load(Ordering::SeqCst) < RELOADS * 4
                        {
                            for name in ["one", "two"] {
                                let rendered =
                                    templates.render(name, &json!({"who": "x"})).unwrap();
                                let tag = rendered.text.clone().unwrap();
                                assert_eq!(rendered.subject, format!("{tag} x"), "{rendered:?}");
                                assert_eq!(rendered.html.as_deref(), Some(tag.as_str()));
                                seen.insert(tag.parse::<usize>().unwrap());
                            }
                            renders.fetch_add(1, Ordering::SeqCst);
                        }
                        seen
                    })
                })
                .collect();
            start.wait();
            for n in 1..=RELOADS {
                version(&dir, n);
                templates.reload().unwrap();
            }
            done.store(true, Ordering::SeqCst);
            renderers
                .into_iter()
                .map(|renderer| renderer.join().unwrap())
                .fold(BTreeSet::new(), |mut all, seen| {
                    all.extend(seen);
                    all
                })
        });
        assert!(seen.len() > 1, "the renders saw only {seen:?}");
        assert_eq!(
            templates
                .render("two", &json!({"who": "y"}))
                .unwrap()
                .subject,
            format!("{RELOADS} y")
        );
    }

    #[test]
    fn a_snapshot_keeps_its_set_across_a_reload() {
        let dir = mailroom_testkit::temp_dir("templates");
        version(&dir, 1);
        let templates = Templates::load(&dir).unwrap();
        let before = templates.snapshot();
        version(&dir, 2);
        templates.reload().unwrap();
        let data = json!({"who": "z"});
        assert_eq!(before.render("one", &data).unwrap().subject, "1 z");
        assert_eq!(templates.render("one", &data).unwrap().subject, "2 z");
        // Clones are handles to the same set.
        let clone = templates.clone();
        version(&dir, 3);
        clone.reload().unwrap();
        assert_eq!(templates.render("one", &data).unwrap().subject, "3 z");
    }

    #[test]
    fn a_broken_reload_is_refused_and_the_old_set_stays() {
        let dir = mailroom_testkit::temp_dir("templates");
        version(&dir, 1);
        let templates = Templates::load(&dir).unwrap();
        let listed = templates.list();
        let data = json!({"who": "w"});

        // A new template that works and one that is broken: neither goes in.
        write(
            &dir,
            &[
                ("new/subject.txt", "new"),
                ("new/text.txt", "new"),
                ("one/text.txt", "2"),
                ("two/html.html", "line 1\n{% for x in %}"),
            ],
        );
        let error = templates.reload().unwrap_err();
        let expected = format!("{} line 2:", dir.join("two/html.html").display());
        assert!(error.to_string().starts_with(&expected), "{error}");
        assert_eq!(templates.list(), listed);
        assert_eq!(
            templates.render("one", &data).unwrap().text.as_deref(),
            Some("1")
        );
        assert!(matches!(
            templates.render("new", &data),
            Err(RenderError::UnknownTemplate { .. })
        ));

        // A removed subject and a deleted directory are refused too.
        version(&dir, 1);
        std::fs::remove_file(dir.join("one/subject.txt")).unwrap();
        assert!(matches!(
            templates.reload(),
            Err(TemplateError::MissingSubject { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(templates.reload(), Err(TemplateError::Io { .. })));
        assert_eq!(templates.render("one", &data).unwrap().subject, "1 w");

        // Once fixed, the next reload takes it.
        version(&dir, 4);
        templates.reload().unwrap();
        assert_eq!(templates.render("one", &data).unwrap().subject, "4 w");
    }

    fn one(text: &str) -> Templates {
        Templates::load(directory(&[("t/subject.txt", "s"), ("t/text.txt", text)])).unwrap()
    }

    #[test]
    fn data_must_be_a_bounded_json_object() {
        let templates = one("{{ a }}");
        for data in [json!(null), json!([1]), json!("a"), json!(1)] {
            let error = templates.render("t", &data).unwrap_err();
            assert_eq!(error, RenderError::DataNotObject);
            assert_eq!(error.field(), "data");
            assert!(error.to_string().contains("data"), "{error}");
        }
        let large = json!({"a": "x".repeat(DATA_LIMIT_BYTES)});
        assert_eq!(
            templates.render("t", &large).unwrap_err(),
            RenderError::DataTooLarge
        );
        let mut deep = json!(1);
        for _ in 0..DATA_DEPTH_LIMIT {
            deep = json!([deep]);
        }
        assert_eq!(
            templates.render("t", &json!({ "a": deep })).unwrap_err(),
            RenderError::DataTooDeep
        );
        // Just under both limits renders.
        let mut deep = json!(1);
        for _ in 0..DATA_DEPTH_LIMIT - 2 {
            deep = json!([deep]);
        }
        assert!(templates.render("t", &json!({ "a": deep })).is_ok());
        assert!(templates
            .render("t", &json!({"a": "x".repeat(DATA_LIMIT_BYTES / 2)}))
            .is_ok());
    }

    #[test]
    fn hostile_templates_are_stopped() {
        type Expected = fn(&RenderError) -> bool;
        let cases: &[(&str, Expected)] = &[
            // Endless work: a loop nest of 10^10 steps.
            (
                "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
                |error| matches!(error, RenderError::TooMuchWork { file: "text.txt", .. }),
            ),
            // A huge string in one step.
            ("{{ 'x' * 1000000000 }}", |error| {
                matches!(error, RenderError::TooMuchWork { .. })
            }),
            // Growing a string by doubling.
            (
                "{% set s = namespace(v='x') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
                |error| matches!(error, RenderError::TooMuchWork { .. }),
            ),
            // Unbounded recursion.
            (
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                |error| matches!(error, RenderError::Failed { detail, .. } if detail.contains("recursion")),
            ),
            ("{{ range(1000000000) | list }}", |error| {
                matches!(error, RenderError::Failed { .. })
            }),
            // The engine's own state is not printable.
            ("{{ debug() }}", |error| {
                matches!(error, RenderError::Failed { .. })
            }),
        ];
        for (text, expected) in cases {
            let error = one(text).render("t", &json!({})).unwrap_err();
            assert!(expected(&error), "{text}: {error:?}");
            assert!(error.to_string().starts_with("template t: "), "{error}");
        }
    }

    #[test]
    fn output_is_capped_for_each_part() {
        let templates = Templates::load(directory(&[
            ("t/subject.txt", "{{ subject }}"),
            ("t/text.txt", "{{ big }}{{ big }}{{ big }}"),
        ]))
        .unwrap();
        let big = "x".repeat(BODY_LIMIT_BYTES / 3 + 1);
        let error = templates
            .render("t", &json!({"subject": "s", "big": big}))
            .unwrap_err();
        assert_eq!(
            error,
            RenderError::OutputTooLarge {
                template: "t".into(),
                file: "text.txt",
                limit: BODY_LIMIT_BYTES
            }
        );
        let big = "x".repeat(BODY_LIMIT_BYTES / 3 - 1);
        assert!(templates
            .render("t", &json!({"subject": "s", "big": big}))
            .is_ok());
        let error = templates
            .render(
                "t",
                &json!({"subject": "y".repeat(SUBJECT_LIMIT_BYTES + 1), "big": ""}),
            )
            .unwrap_err();
        assert!(
            matches!(
                error,
                RenderError::OutputTooLarge {
                    file: "subject.txt",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn a_deeply_nested_template_is_a_syntax_error_not_a_crash() {
        let source = format!("{{{{ {}1{} }}}}", "(".repeat(100_000), ")".repeat(100_000));
        let dir = directory(&[("t/subject.txt", "s"), ("t/text.txt", &source)]);
        let error = Templates::load(&dir).unwrap_err();
        assert!(matches!(error, TemplateError::Syntax { .. }), "{error:?}");
        let source = "{% if a %}".repeat(10_000);
        let dir = directory(&[("t/subject.txt", "s"), ("t/text.txt", &source)]);
        assert!(matches!(
            Templates::load(&dir).unwrap_err(),
            TemplateError::Syntax { .. }
        ));
    }
}
