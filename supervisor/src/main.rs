//! `corral`: the Corral daemon and command line. See `corral --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = corral::cli::Cli::parse();
    corral::cli::init_logging(&cli);
    match corral::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(corral::cli::exit::FAILURE)
        }
    }
}
