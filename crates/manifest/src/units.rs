//! Human units in manifests and policy files: sizes ("256MiB") and durations ("30s").

use std::time::Duration;

/// A value in a manifest or policy file that is not what it must be; callers put
/// the file, line and column around it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid size {input:?}: {reason} (expected e.g. \"64MiB\", \"1GiB\" or \"4096\")")]
    Size { input: String, reason: String },
    #[error("invalid duration {input:?}: {reason} (expected e.g. \"30s\", \"250ms\" or \"2m\")")]
    Duration { input: String, reason: String },
    #[error(
        "invalid plugin id {0:?}: use 1-64 characters of a-z, 0-9, '.', '_' and '-', \
         starting with a letter or digit"
    )]
    Id(String),
    #[error("invalid tag {0:?}: use 1-32 characters of a-z, 0-9, '.', '_' and '-'")]
    Tag(String),
    #[error(
        "invalid entry {0:?}: it must be a relative path inside the plugin directory \
         (no '/', '..' or '.' components at its start)"
    )]
    Entry(String),
}

/// Parse a byte size such as `"64MiB"`, `"1 GiB"`, `"512kB"` or `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|reason| ValueError::Size {
            input: s.to_owned(),
            reason,
        })
}

/// Parse a duration such as `"30s"`, `"250ms"` or `"1m 30s"`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    humantime::parse_duration(s.trim()).map_err(|e| ValueError::Duration {
        input: s.to_owned(),
        reason: e.to_string(),
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
        assert!(
            parse_size("lots")
                .unwrap_err()
                .to_string()
                .contains("expected e.g.")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .to_string()
                .contains("invalid duration")
        );
    }
}
