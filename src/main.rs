//! The `telemesh` command line: one binary for every role. Only argument parsing and process
//! set-up live here; each role's work lives in its crate.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

/// IoT edge-to-cloud event mesh.
#[derive(Debug, Parser)]
#[command(name = "telemesh", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the wire protocol's version and error codes.
    Protocol,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Protocol => {
            println!(
                "telemesh/{} (ALPN {})",
                telemesh_proto::PROTOCOL_VERSION,
                String::from_utf8_lossy(telemesh_proto::frame::ALPN)
            );
            for code in telemesh_proto::ErrorCode::ALL {
                println!("{:>5}  {}", code.0, code.name());
            }
        }
    }
    Ok(())
}
