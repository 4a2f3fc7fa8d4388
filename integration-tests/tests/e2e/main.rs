//! End-to-end tests through real `corral` and worker processes.
//!
//! One test binary with modules (so the binaries are built once per process, see
//! `corral_integration_tests::built`).

mod authors;
mod calls;
mod capacity;
mod channel;
mod cli;
mod contract;
mod deps;
mod examples;
mod faults;
mod fleet;
mod hooks;
mod hostile;
mod js;
mod kubernetes;
mod lifecycle;
mod modules;
mod native;
mod operators;
mod packages;
mod python;
mod remote;
mod services;
mod signing;
mod support;
mod zygote;
