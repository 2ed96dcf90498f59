//! The `ambientd` binary: parse the command line, set up logging, run the command.

use std::cell::Cell;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent::cli::{CaCommand, Cli, Command, LogFormat};
use clap::Parser;

/// jemalloc: no per-allocation header, size classes that fit the connection tasks (512 B), and
/// freed memory goes back to the kernel under connection churn (DESIGN.md). Measured with
/// `ambientd bench`: ~0.6 KiB less per idle tunnelled connection than glibc's malloc, for
/// ~1 MiB more at idle.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How often a running agent lets jemalloc give back what it freed ([`return_freed_memory`]).
const DECAY_EVERY: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent's lines go through a writer thread of their own (`agent::logs`); the other
    // commands are short or interactive and write theirs straight away.
    let buffered = matches!(cli.command, Command::Run(_));
    let flush = init_logging(cli.log_format, buffered);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(flush_thread_cache)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let cfg = args.into_config().map_err(anyhow::Error::msg)?;
                match agent::app::raise_nofile_limit() {
                    Ok((from, to)) => tracing::info!(from, to, "open-files limit (RLIMIT_NOFILE)"),
                    Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
                }
                tracing::info!(config = ?cfg, "starting");
                tokio::spawn(return_freed_memory());
                agent::app::run(cfg).await
            }
            Command::Demo => agent::demo::run().await,
            Command::Bench(args) if args.hold.is_some() => {
                agent::bench::load::hold(args.hold.expect("checked")).await
            }
            Command::Bench(args) => {
                let settings = args.into_settings().map_err(anyhow::Error::msg)?;
                agent::bench::run(settings).await
            }
            Command::DevControlPlane(args) => {
                let cfg = args.into_config().map_err(anyhow::Error::msg)?;
                agent::control_plane::run(cfg).await
            }
            Command::Ca(CaCommand::Init { dir }) => agent::ca::init(&dir),
            Command::Ca(CaCommand::Issue {
                dir,
                identity,
                out,
                ttl,
            }) => agent::ca::issue(&dir, &identity, &out, ttl),
        }
    });
    // What the runtime's tasks logged as they stopped, then every buffered line, before the
    // error.
    drop(runtime);
    drop(flush);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", agent::describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Lets jemalloc give freed memory back to the kernel while the agent is quiet.
///
/// jemalloc returns pages that stayed unused past their decay time (`dirty_decay_ms`, 10 s)
/// only as it allocates, so an agent that goes quiet after a burst kept the burst's peak for
/// as long as it stayed quiet: on loopback, +20 / +13 MiB in the two agents after 512 MiB
/// through one tunnel, for good. Once a second this runs the same decay, which costs next to
/// nothing when there is nothing to give back and gives back only what has aged when there
/// is. (jemalloc's own background thread would do the same; in `ambientd bench` it cost a
/// few percent more agent CPU per GB.)
async fn return_freed_memory() {
    let mut ticks = tokio::time::interval(DECAY_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(code) = decay() {
            tracing::warn!(
                code,
                "jemalloc's decay failed: freed memory goes back only as the agent allocates"
            );
            return;
        }
    }
}

thread_local! {
    /// When this worker thread last gave back its allocation cache.
    static CACHE_FLUSHED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs as a runtime worker thread is about to wait for work: gives back the freed memory the
/// thread holds in its jemalloc cache, at most once per [`DECAY_EVERY`].
///
/// Each thread keeps freed blocks for its next allocations, and trims that cache only as it
/// allocates, so a worker that goes idle after a burst kept what it had cached for good (the
/// decay cannot return memory a thread cache holds, nor the pages it pins): 2.9–3.6 MB per agent
/// in `ambientd bench` after 10,000 connections had closed. Flushing at most once a second
/// costs nothing measurable; flushing at every wait would empty the cache the data path runs
/// from between two packets.
fn flush_thread_cache() {
    CACHE_FLUSHED.with(|flushed| {
        let now = Instant::now();
        if flushed
            .get()
            .is_some_and(|at| now.duration_since(at) < DECAY_EVERY)
        {
            return;
        }
        flushed.set(Some(now));
        // Cannot fail with a thread cache (the default); without one there is nothing to do.
        let _ = mallctl_run(b"thread.tcache.flush\0");
    });
}

/// `arena.<MALLCTL_ARENAS_ALL>.decay`: every arena gives back the pages that aged past its
/// decay time. An error is jemalloc's error number.
fn decay() -> Result<(), std::ffi::c_int> {
    mallctl_run(b"arena.4096.decay\0")
}

/// Runs the jemalloc control `name` (NUL-terminated) that reads and writes nothing.
fn mallctl_run(name: &'static [u8]) -> Result<(), std::ffi::c_int> {
    assert_eq!(name.last(), Some(&0), "a C string");
    // SAFETY: the name is NUL-terminated, and the control reads and writes nothing: every
    // pointer is null and the new value's length 0. mallctl may be called from any thread.
    let code = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if code == 0 { Ok(()) } else { Err(code) }
}

/// Logs to stderr, through [`agent::logs`] when `buffered`; the returned guard writes what is
/// left when dropped.
fn init_logging(format: LogFormat, buffered: bool) -> Option<agent::logs::Flush> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let direct = || BoxMakeWriter::new(std::io::stderr);
    let (writer, flush) = match buffered.then(|| agent::logs::Lines::start(std::io::stderr())) {
        Some(Ok((lines, flush))) => (BoxMakeWriter::new(lines), Some(flush)),
        Some(Err(e)) => {
            eprintln!("warning: cannot start the log writer thread ({e}); logging directly");
            (direct(), None)
        }
        None => (direct(), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    flush
}

#[cfg(test)]
mod tests {
    /// The control's name is one this jemalloc knows (a wrong one is `ENOENT`).
    #[test]
    fn decay_runs_on_every_arena() {
        super::decay().unwrap();
    }

    /// The thread-cache control exists and works on a thread with a cache.
    #[test]
    fn a_thread_cache_can_be_flushed() {
        let held: Vec<Box<[u8; 256]>> = (0..100).map(|_| Box::new([0; 256])).collect();
        drop(held);
        super::mallctl_run(b"thread.tcache.flush\0").unwrap();
    }
}
