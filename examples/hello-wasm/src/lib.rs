//! The example Corral plugin for WebAssembly: ordinary Rust functions over bytes,
//! exported with `corral_guest::plugin!`. Built for the machine instead of
//! `wasm32-wasip1`, the same source is the native example (`examples/hello-native`).

use std::str;

/// `greet "Ada"` -> `Hello, Ada!`
pub fn greet(input: &[u8]) -> Result<String, String> {
    let name = str::from_utf8(input).map_err(|e| format!("name is not UTF-8: {e}"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err("give a name to greet".into());
    }
    corral_guest::log::info(&format!("greeting {name}"));
    Ok(format!("Hello, {name}!"))
}

/// Reverse the characters of a UTF-8 string.
pub fn reverse(input: &[u8]) -> Result<String, String> {
    let s = str::from_utf8(input).map_err(|e| format!("input is not UTF-8: {e}"))?;
    Ok(s.chars().rev().collect())
}

/// Count words, lines and bytes, as JSON.
pub fn wc(input: &[u8]) -> Result<String, String> {
    let s = String::from_utf8_lossy(input);
    Ok(format!(
        "{{\"lines\":{},\"words\":{},\"bytes\":{}}}",
        s.lines().count(),
        s.split_whitespace().count(),
        input.len()
    ))
}

/// Return the input unchanged.
pub fn echo(input: &[u8]) -> Result<Vec<u8>, String> {
    Ok(input.to_vec())
}

/// Do nothing (for measuring call overhead).
pub fn noop(_input: &[u8]) -> Result<(), String> {
    Ok(())
}

/// The supervisor's clock, through a host call.
pub fn now(_input: &[u8]) -> Result<String, String> {
    Ok(corral_guest::now_ms().to_string())
}

// Host services, brokered by the supervisor under policies/grants.toml.

/// Count visits per name in the plugin's own store: `Welcome, Ada (visit 2)`.
pub fn visit(input: &[u8]) -> Result<String, corral_guest::HostError> {
    let name = String::from_utf8_lossy(input).trim().to_owned();
    let name = if name.is_empty() {
        "stranger".to_owned()
    } else {
        name
    };
    let key = format!("visits/{name}");
    let n = corral_guest::kv::get(&key)?
        .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    corral_guest::kv::put(&key, n.to_string().as_bytes())?;
    Ok(format!("Welcome, {name} (visit {n})"))
}

/// GET a URL through the supervisor: `200, 1234 bytes`.
pub fn fetch(input: &[u8]) -> Result<String, corral_guest::HostError> {
    let url = String::from_utf8_lossy(input).trim().to_owned();
    let r = corral_guest::fetch("GET", &url, &[], b"")?;
    Ok(format!("{}, {} bytes", r.status, r.body.len()))
}

/// Publish on `hello.news`: every example subscribed receives it in `on_news`.
pub fn announce(input: &[u8]) -> Result<String, corral_guest::HostError> {
    let n = corral_guest::publish("hello.news", input)?;
    Ok(format!("queued for {n} subscribers"))
}

/// Subscriber of `hello.news`: keep the latest message.
pub fn on_news(input: &[u8]) -> Result<(), corral_guest::HostError> {
    corral_guest::kv::put("news/latest", input)
}

/// The latest message on `hello.news`, or nothing.
pub fn news(_input: &[u8]) -> Result<Vec<u8>, corral_guest::HostError> {
    Ok(corral_guest::kv::get("news/latest")?.unwrap_or_default())
}

corral_guest::plugin!(functions: [
    greet, reverse, wc, echo, noop, now, visit, fetch, announce, on_news, news
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_work_natively() {
        assert_eq!(greet(b" Ada ").unwrap(), "Hello, Ada!");
        assert!(greet(b"").is_err());
        assert_eq!(reverse("añb".as_bytes()).unwrap(), "bña");
        assert_eq!(wc(b"a b\nc").unwrap(), r#"{"lines":2,"words":3,"bytes":5}"#);
    }
}
