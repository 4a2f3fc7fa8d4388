//! Host calls: what the supervisor does on a plugin's behalf.
//!
//! Every operation a plugin can ask for is a variant of [`HostOp`]; this is the one
//! place that performs them. Policy checks (issue: confinement and policy) and the
//! brokered services (key-value store, fetch, messaging) hang off this function.

use corral_protocol::{HostError, HostOp, RequestId};

/// Perform `op` for `plugin` during call `call` and return the answer bytes.
pub fn perform(plugin: &str, call: RequestId, op: HostOp) -> Result<Vec<u8>, HostError> {
    tracing::trace!(plugin, call, ?op, "host call");
    match op {
        HostOp::Now => {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| HostError::Failed(format!("system clock before 1970: {e}")))?
                .as_millis() as i64;
            Ok(ms.to_le_bytes().to_vec())
        }
    }
}
