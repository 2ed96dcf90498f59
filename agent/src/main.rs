//! The `ambientd` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use agent::cli::{CaCommand, Cli, Command, LogFormat};
use clap::Parser;

fn main() -> ExitCode {
    tune_malloc();
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

/// glibc's malloc, set for a proxy's traffic. By default it gives memory back to the system as
/// soon as 128 KiB are free at the top of a heap and serves larger blocks with fresh `mmap`s,
/// adjusting both as it goes; under bulk traffic the copy buffers (up to 256 KiB, freed and
/// taken again all the time) then cost page faults, zeroing and `madvise` calls — a tenth of
/// the agents' CPU in a profile of a single stream. Fixed thresholds keep blocks up to 1 MiB
/// in the heap and give memory back once 8 MiB are free, so a busy agent reuses its buffers and
/// an idle one still shrinks.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    use nix::libc::{M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt};
    // SAFETY: mallopt only sets allocator parameters; called first thing in main, before any
    // other thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 1 << 20);
        mallopt(M_TRIM_THRESHOLD, 8 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
