//! `corral`: the command line's front. `corral call ...` is answered here, by a
//! binary that links the call's arguments, its frame and its printing and nothing
//! else, so that it starts in about the time of `/bin/true` (the full command
//! line, with the daemon, TLS and PostgreSQL in it, took 2.6-3.1x). Everything
//! else, and any `call` this parser does not take as given (`--help`, a bad
//! argument, the global `--log` options), is run by `corral-supervisor` installed
//! beside this binary, with the same arguments and the same `argv[0]`: the same
//! process (exec), so its pid, help and errors are the full command line's own.

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

/// The full command line's binary, beside this one.
const FULL: &str = "corral-supervisor";

#[derive(Parser)]
#[command(name = "corral", bin_name = "corral")]
struct Front {
    #[command(subcommand)]
    command: FrontCommand,
}

#[derive(Subcommand)]
enum FrontCommand {
    Call(corral_client::CallArgs),
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "call")
        && let Ok(Front {
            command: FrontCommand::Call(call),
        }) = Front::try_parse_from(&args)
    {
        let json = call.out.json;
        corral_client::exit::set_json(json);
        return ExitCode::from(corral_client::exit::report(corral_client::call(call)));
    }
    run_full(&args)
}

/// Replace this process with `corral-supervisor` and the same arguments; returns
/// only if that cannot be done.
fn run_full(args: &[OsString]) -> ExitCode {
    let full = full_binary();
    let mut cmd = std::process::Command::new(&full);
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    let e = cmd.args(args.iter().skip(1)).exec();
    eprintln!(
        "error: cannot run {}: {e} (every command but `call` is in that binary, \
         installed beside `corral`)",
        full.display()
    );
    ExitCode::from(corral_client::exit::FAILURE)
}

/// `corral-supervisor` in this binary's directory (symbolic links resolved, as
/// `/usr/local/bin/corral` points into `/usr/libexec/corral`); by `PATH` if this
/// binary's own path cannot be read.
fn full_binary() -> PathBuf {
    match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(FULL),
        Err(_) => PathBuf::from(FULL),
    }
}
