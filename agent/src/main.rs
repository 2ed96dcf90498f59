//! The `ambientd` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;
use std::time::Duration;

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
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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

/// `arena.<MALLCTL_ARENAS_ALL>.decay`: every arena gives back the pages that aged past its
/// decay time. An error is jemalloc's error number.
fn decay() -> Result<(), std::ffi::c_int> {
    const NAME: &[u8] = b"arena.4096.decay\0";
    // SAFETY: the name is NUL-terminated, and the control reads and writes nothing: every
    // pointer is null and the new value's length 0. mallctl may be called from any thread.
    let code = unsafe {
        tikv_jemalloc_sys::mallctl(
            NAME.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if code == 0 { Ok(()) } else { Err(code) }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    /// The control's name is one this jemalloc knows (a wrong one is `ENOENT`).
    #[test]
    fn decay_runs_on_every_arena() {
        super::decay().unwrap();
    }
}
