//! The `ambientd` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use agent::cli::{CaCommand, Cli, Command, LogFormat};
use clap::Parser;

/// jemalloc: no per-allocation header, size classes that fit the connection tasks (512 B), and
/// freed memory goes back to the kernel under connection churn (DESIGN.md). Measured with
/// `ambientd bench`: ~0.6 KiB less per idle tunnelled connection than glibc's malloc, for
/// ~1 MiB more at idle.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
