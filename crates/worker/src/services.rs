//! The brokered host services as one name-and-byte-strings interface, shared by the
//! engines' host APIs.
//!
//! Each runtime exposes one native primitive that takes an operation name and byte
//! strings and returns byte strings (or a [`HostError`]); the typed API the plugin
//! author sees (`corral.kv.get`, `corral.fetch`, ...) is a thin layer in the
//! runtime's own language over it. Wasm modules see the primitive directly as the
//! `corral.host_call` import, with the lists encoded by [`encode_list`].
//!
//! | name | arguments | answer |
//! |---|---|---|
//! | `now` | | milliseconds since the epoch, decimal |
//! | `kv_get` | key | nothing (missing) or the value |
//! | `kv_put` | key, value | nothing |
//! | `kv_delete` | key | `1` if the key existed, else `0` |
//! | `kv_keys` | prefix | the keys, in order |
//! | `fetch` | method, url, headers, body | status, final url, headers, body |
//! | `publish` | topic, payload | number of subscribers it was queued for |
//! | `call` | plugin, function, input | the output |
//! | `config` | | key, value, key, value, ... |
//! | `secret` | name | nothing (no such secret) or the value |
//!
//! Headers travel as `name: value` lines joined by `\n`.

use crate::Host;
use corral_protocol::{FetchRequest, HostError, HostOp, HostReply};

/// Perform the operation `name` with `args` through `host`.
pub fn request(host: &Host, name: &str, args: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, HostError> {
    let want = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(HostError::Invalid(format!(
                "{name} takes {n} arguments, got {}",
                args.len()
            )))
        }
    };
    let op = match name {
        "config" => {
            want(0)?;
            return Ok(host
                .config()
                .iter()
                .flat_map(|(k, v)| [k.clone().into_bytes(), v.clone().into_bytes()])
                .collect());
        }
        "secret" => {
            want(1)?;
            let name = text(&args[0], "secret name")?;
            return Ok(host
                .secret(&name)
                .map(String::into_bytes)
                .into_iter()
                .collect());
        }
        "now" => {
            want(0)?;
            HostOp::Now
        }
        "kv_get" => {
            want(1)?;
            HostOp::KvGet {
                key: text(&args[0], "key")?,
            }
        }
        "kv_put" => {
            want(2)?;
            let mut args = args.into_iter();
            let key = text(&args.next().unwrap_or_default(), "key")?;
            HostOp::KvPut {
                key,
                value: args.next().unwrap_or_default(),
            }
        }
        "kv_delete" => {
            want(1)?;
            HostOp::KvDelete {
                key: text(&args[0], "key")?,
            }
        }
        "kv_keys" => {
            want(1)?;
            HostOp::KvKeys {
                prefix: text(&args[0], "prefix")?,
            }
        }
        "fetch" => {
            want(4)?;
            let mut args = args.into_iter();
            let mut next = || args.next().unwrap_or_default();
            let method = text(&next(), "method")?;
            let url = text(&next(), "url")?;
            let headers = parse_headers(&text(&next(), "headers")?)?;
            HostOp::Fetch(FetchRequest {
                method,
                url,
                headers,
                body: next(),
            })
        }
        "publish" => {
            want(2)?;
            let mut args = args.into_iter();
            let topic = text(&args.next().unwrap_or_default(), "topic")?;
            HostOp::Publish {
                topic,
                payload: args.next().unwrap_or_default(),
            }
        }
        "call" => {
            want(3)?;
            let mut args = args.into_iter();
            let mut next = || args.next().unwrap_or_default();
            let plugin = text(&next(), "plugin")?;
            let function = text(&next(), "function")?;
            HostOp::Call {
                plugin,
                function,
                input: next(),
            }
        }
        other => {
            return Err(HostError::Invalid(format!(
                "unknown host operation {other:?} (config, secret, now, kv_get, kv_put, \
                 kv_delete, kv_keys, fetch, publish, call)"
            )));
        }
    };
    Ok(match host.call(op)? {
        HostReply::Unit => vec![],
        HostReply::Time(ms) => vec![ms.to_string().into_bytes()],
        HostReply::Value(v) => v.into_iter().collect(),
        HostReply::Existed(b) => vec![if b { b"1".to_vec() } else { b"0".to_vec() }],
        HostReply::Keys(keys) => keys.into_iter().map(String::into_bytes).collect(),
        HostReply::Fetched(r) => vec![
            r.status.to_string().into_bytes(),
            r.url.into_bytes(),
            r.headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes(),
            r.body,
        ],
        HostReply::Delivered(n) => vec![n.to_string().into_bytes()],
        HostReply::Output(out) => vec![out],
    })
}

fn text(b: &[u8], what: &str) -> Result<String, HostError> {
    String::from_utf8(b.to_vec())
        .map_err(|e| HostError::Invalid(format!("the {what} is not UTF-8: {e}")))
}

/// The plugin's header lines (`name: value`), at most
/// [`corral_protocol::MAX_FETCH_HEADERS`]: refused at the first one past it, before
/// anything more is parsed or kept.
fn parse_headers(s: &str) -> Result<Vec<(String, String)>, HostError> {
    let max = corral_protocol::MAX_FETCH_HEADERS;
    let mut headers = Vec::new();
    for l in s.lines().filter(|l| !l.trim().is_empty()) {
        if headers.len() == max {
            return Err(HostError::Invalid(format!(
                "more than {max} headers; a request may have at most {max}"
            )));
        }
        let (k, v) = l.split_once(':').ok_or_else(|| {
            let shown: String = l.chars().take(80).collect();
            let more = if shown.len() < l.len() { " (cut)" } else { "" };
            HostError::Invalid(format!("header line {shown:?}{more} has no `:`"))
        })?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(headers)
}

/// Byte strings as the Wasm ABI passes them: each a little-endian `u32` length and
/// the bytes.
pub fn encode_list(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 4).sum());
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

/// The inverse of [`encode_list`].
pub fn decode_list(mut b: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut items = Vec::new();
    while !b.is_empty() {
        let Some((len, rest)) = b.split_first_chunk::<4>() else {
            return Err("truncated length in a byte-string list".into());
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(format!(
                "byte-string list item of {len} bytes, {} left",
                rest.len()
            ));
        }
        items.push(rest[..len].to_vec());
        b = &rest[len..];
    }
    Ok(items)
}

#[cfg(test)]
mod tests {

    #[test]
    fn headers_past_the_bound_are_refused_at_the_first_one_too_many() {
        let max = corral_protocol::MAX_FETCH_HEADERS;
        let ok = "a: b\n".repeat(max);
        assert_eq!(parse_headers(&ok).unwrap().len(), max);
        let e = parse_headers(&"a: b\n".repeat(max + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("more than {max} headers")), "{e}");
        // A long line without `:` is named in a bounded message.
        let e = parse_headers(&"x".repeat(1 << 20)).unwrap_err().to_string();
        assert!(
            e.contains("has no `:`") && e.len() < 300,
            "{} bytes",
            e.len()
        );
    }
    use super::*;

    #[test]
    fn lists_round_trip_and_reject_truncation() {
        let items = vec![b"kv_put".to_vec(), vec![], vec![0, 1, 2]];
        let enc = encode_list(&items);
        assert_eq!(decode_list(&enc).unwrap(), items);
        assert!(decode_list(&enc[..enc.len() - 1]).is_err());
        assert!(decode_list(&[1, 0]).is_err());
        assert_eq!(decode_list(&[]).unwrap(), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn headers_parse_and_refuse_lines_without_colon() {
        assert_eq!(
            parse_headers("A: 1\n\nb:two words ").unwrap(),
            vec![("A".into(), "1".into()), ("b".into(), "two words".into())]
        );
        assert!(matches!(parse_headers("nope"), Err(HostError::Invalid(_))));
    }
}
