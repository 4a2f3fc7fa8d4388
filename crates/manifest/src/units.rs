//! Human units in manifests and policy files: sizes ("256MiB") and durations ("30s").

use std::time::Duration;

/// Parse a byte size such as `"64MiB"`, `"1 GiB"`, `"512kB"` or `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| {
            format!("invalid size {s:?}: {e} (expected e.g. \"64MiB\", \"1GiB\" or \"4096\")")
        })
}

/// Parse a duration such as `"30s"`, `"250ms"` or `"1m 30s"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration {s:?}: {e} (expected e.g. \"30s\", \"250ms\" or \"2m\")")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1 GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").unwrap_err().contains("expected e.g."));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("invalid duration")
        );
    }
}
