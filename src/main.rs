//! The `mailroom` service: configuration from the environment and `.env`,
//! the engine, the HTTP API, signals and systemd notification.

use std::process::ExitCode;
use std::sync::Arc;

use mailroom::config::{ConfigError, Relay, VARIABLES};
use mailroom::{systemd, Config, Engine, HttpServer, HttpSettings, Templates};

/// Blocks of this size or more are mapped from the kernel by glibc's
/// malloc and returned to it when freed.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Fixes glibc's mmap threshold. By default it grows to the size of the
/// largest block freed (up to 32 MiB), after which blocks of message size
/// come from the heaps and stay with the process: four messages with a
/// 7 MiB attachment left ~65 MB resident after delivery. With a fixed
/// threshold a large message's memory goes back when it is freed.
fn return_large_blocks_to_the_kernel() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's tuning; called at start,
        // before any thread is spawned. A refusal (0) keeps the default.
        let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    }
}

/// `println!` that ignores a closed stdout (`mailroom --help | head`):
/// `println!` panics on a broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    return_large_blocks_to_the_kernel();
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if arguments
        .iter()
        .any(|argument| argument == "--help" || argument == "-h")
    {
        print_help();
        return ExitCode::SUCCESS;
    }
    if arguments
        .iter()
        .any(|argument| argument == "--version" || argument == "-V")
    {
        say!("mailroom {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let check = arguments.iter().any(|argument| argument == "--check");
    let check_smtp = arguments.iter().any(|argument| argument == "--smtp");
    if let Some(unknown) = arguments
        .iter()
        .find(|argument| !["--check", "--smtp"].contains(&argument.as_str()))
    {
        eprintln!("mailroom: unknown argument {unknown:?}; see mailroom --help");
        return ExitCode::from(2);
    }

    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(error) if error.not_found() => {}
        Err(error) => {
            eprintln!("mailroom: cannot read .env: {}", explain_dotenv(&error));
            return ExitCode::from(2);
        }
    }
    init_logging();
    warn_unknown_variables();

    let settings = Config::from_env().and_then(|config| Ok((config, HttpSettings::from_env()?)));
    let (config, http) = match settings {
        Ok(settings) => settings,
        Err(error) => return configuration_error(&error),
    };
    if check {
        return run_check(&config, &http, check_smtp);
    }
    run(config, http)
}

fn configuration_error(error: &ConfigError) -> ExitCode {
    eprintln!("mailroom: configuration error: {error}");
    ExitCode::from(2)
}

fn run(config: Config, http: HttpSettings) -> ExitCode {
    log::info!(
        "starting mailroom {}: {}, {}",
        env!("CARGO_PKG_VERSION"),
        http.summary(),
        config.summary()
    );
    if let Relay::Outbox(dir) = &config.relay {
        log::warn!(
            "no relay configured: messages are written to {} as .eml files. Set MAILROOM_SMTP_URL \
             (or GOOGLE_MAIL and GOOGLE_APP_PASSWORD) to deliver them",
            dir.display()
        );
    }
    let engine = match Engine::start(config) {
        Ok(engine) => engine,
        Err(error) => {
            eprintln!("mailroom: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    let server = match HttpServer::bind(engine.clone(), http) {
        Ok(server) => Arc::new(server),
        Err(error) => {
            eprintln!("mailroom: {error}");
            engine.shutdown();
            return ExitCode::from(1);
        }
    };
    let reloading = engine.clone();
    let reload_templates = move || {
        // A refused set is logged by reload; the previous one stays.
        let _ = reloading.templates().reload();
    };
    if let Err(error) = watch_signals(engine.clone(), Arc::clone(&server))
        .and_then(|()| watch_reload_signal(reload_templates))
    {
        eprintln!("mailroom: cannot install signal handlers: {error}");
        return ExitCode::from(1);
    }
    log::info!("listening on http://{}", server.local_addr());
    systemd::notify("READY=1");
    server.run();
    ExitCode::SUCCESS
}

/// dotenvy names the offending line by its text and a column; say which
/// line it is and what usually fixes it.
fn explain_dotenv(error: &dotenvy::Error) -> String {
    let dotenvy::Error::LineParse(line, _) = error else {
        return error.to_string();
    };
    let text = std::fs::read_to_string(".env").unwrap_or_default();
    let number = text
        .lines()
        .position(|candidate| candidate.contains(line.trim()))
        .map_or_else(String::new, |index| format!("line {}: ", index + 1));
    format!(
        "{number}`{line}` is not KEY=value; put values with spaces or # in quotes, \
         e.g. GOOGLE_APP_PASSWORD=\"abcd efgh ijkl mnop\""
    )
}

/// `RUST_LOG` (default `info`). A value env_logger would read as a module
/// name, such as a misspelt level, would silence every line: say so and
/// use `info` instead.
fn init_logging() {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    const MODULES: [&str; 3] = ["mailroom", "tiny_http", "lettre"];
    let given = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty());
    let understood = given.as_deref().is_none_or(|value| {
        value.split(',').all(|directive| {
            let directive = directive.trim();
            let (module, level) = directive.split_once('=').unwrap_or(("", directive));
            let level_ok = LEVELS.iter().any(|known| known.eq_ignore_ascii_case(level));
            let module_ok = module.is_empty()
                || MODULES
                    .iter()
                    .any(|known| module == *known || module.starts_with(&format!("{known}::")));
            (level_ok && module_ok) || (module.is_empty() && MODULES.contains(&directive))
        })
    });
    let filter = if understood {
        given.clone().unwrap_or_else(|| "info".into())
    } else {
        "info".to_string()
    };
    env_logger::Builder::new().parse_filters(&filter).init();
    if !understood {
        log::warn!(
            "RUST_LOG={:?} is not understood: use a level (error, warn, info, debug, trace) or \
             module=level, e.g. RUST_LOG=mailroom=debug; logging at info",
            given.unwrap_or_default()
        );
    }
}

/// A `MAILROOM_*` variable that nothing reads is most likely a typo.
fn warn_unknown_variables() {
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .collect();
    for (name, closest) in mailroom::config::unknown_variables(names.iter().map(String::as_str)) {
        match closest {
            Some(known) => log::warn!(
                "{name} is not a mailroom variable (did you mean {known}?); it is ignored"
            ),
            None => {
                log::warn!("{name} is not a mailroom variable; it is ignored (see mailroom --help)")
            }
        }
    }
}

/// On SIGTERM or SIGINT: refuse new work (503), let deliveries in flight
/// finish, keep the rest in the spool, then stop serving HTTP.
fn watch_signals(engine: Engine, server: Arc<HttpServer>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                log::info!("signal {signal} received: stopping");
                systemd::notify("STOPPING=1");
                engine.shutdown();
                server.stop();
            }
        })?;
    Ok(())
}

/// On SIGHUP: `reload` (the templates), as often as the signal comes.
fn watch_reload_signal(reload: impl Fn() + Send + 'static) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                log::info!("SIGHUP received: reloading");
                reload();
            }
        })?;
    Ok(())
}

fn run_check(config: &Config, http: &HttpSettings, check_smtp: bool) -> ExitCode {
    say!("configuration ok: {}, {}", http.summary(), config.summary());
    match Templates::from_config(config) {
        Ok(templates) => say!(
            "templates ok: {} in {}",
            templates.list().len(),
            templates.dir().display()
        ),
        Err(error) => {
            say!("templates: {error}");
            return ExitCode::from(1);
        }
    }
    if !check_smtp {
        return ExitCode::SUCCESS;
    }
    if let Relay::Outbox(dir) = &config.relay {
        say!(
            "no relay configured, nothing to connect to: messages are written to {} \
             (set MAILROOM_SMTP_URL, or GOOGLE_MAIL and GOOGLE_APP_PASSWORD)",
            dir.display()
        );
        return ExitCode::SUCCESS;
    }
    match mailroom::check_relay(&config.relay, &mut |step| say!("  {step}")) {
        Ok(()) => {
            say!("relay ok");
            ExitCode::SUCCESS
        }
        Err(error) => {
            say!("relay check failed: {error}");
            ExitCode::from(1)
        }
    }
}

fn print_help() {
    say!(
        "mailroom {}: queues notification email over HTTP and delivers it through an SMTP relay\n\n\
         usage: mailroom [--check [--smtp]] [--help] [--version]\n\n\
         \x20 --check        validate the configuration and exit\n\
         \x20 --check --smtp also connect to the relay (STARTTLS, AUTH, QUIT) and report each step\n\n\
         Configuration comes from environment variables, also read from ./.env:\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, default, description) in VARIABLES {
        say!("  {name:<30} {description}");
        if let Some(default) = default {
            say!("  {:<30} default: {default}", "");
        }
    }
}
