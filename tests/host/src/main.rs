//! `spillway-host`: runs a Spin application on the embedded test host.

use clap::{Parser, Subcommand};

/// Run Spin applications without Spin: the embedded host used by Spillway's tests.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the application, like `spin up`.
    Up(spillway_testhost::up::UpArgs),
    /// Build the components, like `spin build`.
    Build {
        /// The manifest.
        #[arg(short = 'f', long = "from", default_value = "spin.toml")]
        from: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => {
            spillway_testhost::engine::one_app_per_process();
            spillway_testhost::up::run(args).await
        }
        Command::Build { from } => spillway_testhost::up::build(&from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
