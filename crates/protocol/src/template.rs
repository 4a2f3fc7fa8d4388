//! The datagrams between the supervisor and a zygote template (see the supervisor's
//! `worker::zygote`): a template is a worker process with its engine set up and no
//! plugin, which forks a worker for each [`ForkRequest`]. Each datagram is one
//! [`crate::frame`] frame; descriptors travel beside it (`SCM_RIGHTS`).

use serde::{Deserialize, Serialize};

/// Environment variable that starts a worker binary as a template (value `1`); its
/// control socket (a datagram socket) is at [`crate::WORKER_SOCKET_FD`].
pub const TEMPLATE_ENV: &str = "CORRAL_ZYGOTE";

/// Largest datagram either side sends or accepts.
pub const MAX_TEMPLATE_DATAGRAM: usize = 64 << 10;

/// Fork one worker. Three descriptors come with it, in this order: the worker's end
/// of its supervisor socket, its stdout and its stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRequest {
    /// The worker's whole environment (the template's is replaced).
    pub env: Vec<(String, String)>,
    /// The isolation level (its name), for the namespaces every worker of it enters.
    pub level: String,
    /// The files (`cgroup.procs`, or `tasks` on v1) the child writes `0` to, to join
    /// its groups before anything else.
    pub cgroup_join: Vec<String>,
}

/// From the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromTemplate {
    /// The answer to a request: the child's pid, with a pidfd of it beside.
    Forked { pid: u32 },
    /// The answer to a request that could not be forked: the errno, and why.
    ForkFailed { errno: i32, message: String },
    /// A child ended (the template reaps its children): its wait status.
    Exited { pid: u32, status: i32 },
}
