//! The daemon's parts around the supervisor: the control socket ([`control`]) and
//! the watchers that apply policy and plugin edits live ([`reload`]).

pub mod control;
pub mod metrics;
pub mod reload;
pub mod remote;
pub mod serve;
