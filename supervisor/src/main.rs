//! `corral-supervisor`: the Corral daemon and the whole command line (`corral`, the
//! front in crates/client, answers `corral call` itself and runs this binary for
//! everything else). See `corral --help`.

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
