//! The `mailroom` service: configuration from the environment and `.env`,
//! the engine, the HTTP API, signals and systemd notification.

use std::process::ExitCode;
use std::sync::Arc;

use mailroom::allocator::HugeAllocator;
use mailroom::config::{Relay, VARIABLES};
use mailroom::http::HttpServer;
use mailroom::{systemd, Config, Engine};

/// Lets tiny_http discard the unread body of a request that declared an
/// enormous `Content-Length` without aborting the process (see the module).
#[global_allocator]
static ALLOCATOR: HugeAllocator = HugeAllocator;

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
        println!("mailroom {}", env!("CARGO_PKG_VERSION"));
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
            eprintln!("mailroom: cannot read .env: {error}");
            return ExitCode::from(2);
        }
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("mailroom: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    if check {
        return run_check(&config, check_smtp);
    }
    run(config)
}

fn run(config: Config) -> ExitCode {
    log::info!(
        "starting mailroom {}: {}",
        env!("CARGO_PKG_VERSION"),
        config.summary()
    );
    if let Relay::Outbox(dir) = &config.relay {
        log::warn!(
            "no relay configured: messages are written to {} as .eml files. Set MAILROOM_SMTP_URL \
             (or GOOGLE_MAIL and GOOGLE_APP_PASSWORD) to deliver them",
            dir.display()
        );
    }
    let listen = config.listen;
    let engine = match Engine::start(config) {
        Ok(engine) => engine,
        Err(error) => {
            eprintln!("mailroom: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    let server = match HttpServer::bind(engine.clone(), listen) {
        Ok(server) => Arc::new(server),
        Err(error) => {
            eprintln!("mailroom: MAILROOM_LISTEN={listen}: cannot listen: {error}");
            engine.shutdown();
            return ExitCode::from(1);
        }
    };
    if let Err(error) = watch_signals(engine.clone(), Arc::clone(&server)) {
        eprintln!("mailroom: cannot install signal handlers: {error}");
        return ExitCode::from(1);
    }
    match server.local_addr() {
        Ok(address) => log::info!("listening on http://{address}"),
        Err(error) => log::warn!("listening, but the address is unknown: {error}"),
    }
    systemd::notify("READY=1");
    server.run();
    ExitCode::SUCCESS
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

fn run_check(config: &Config, check_smtp: bool) -> ExitCode {
    println!("configuration ok: {}", config.summary());
    if !check_smtp {
        return ExitCode::SUCCESS;
    }
    match mailroom::transport::check_relay(&config.relay, &mut |step| println!("  {step}")) {
        Ok(()) => {
            println!("relay ok");
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("relay check failed: {error}");
            ExitCode::from(1)
        }
    }
}

fn print_help() {
    println!(
        "mailroom {}: queues notification email over HTTP and delivers it through an SMTP relay\n\n\
         usage: mailroom [--check [--smtp]] [--help] [--version]\n\n\
         \x20 --check        validate the configuration and exit\n\
         \x20 --check --smtp also connect to the relay (STARTTLS, AUTH, QUIT) and report each step\n\n\
         Configuration comes from environment variables, also read from ./.env:\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, default, description) in VARIABLES {
        println!("  {name:<30} {description}");
        if let Some(default) = default {
            println!("  {:<30} default: {default}", "");
        }
    }
}
