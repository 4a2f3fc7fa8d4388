//! {{id}}: a Corral plugin in Rust, {{built}}. Every function in
//! `corral_guest::plugin!` takes the input bytes and returns a `Result` whose
//! error is the call's error; `corral_guest` is the host API (log, config, secret,
//! kv, fetch, publish, call).

use std::sync::OnceLock;

static GREETING: OnceLock<String> = OnceLock::new();

/// Runs once when a worker loads the plugin, before any call.
fn init() -> Result<(), String> {
    let greeting = corral_guest::config("greeting").unwrap_or_else(|| "Hello".to_owned());
    corral_guest::log::info(&format!("ready to say {greeting}"));
    GREETING
        .set(greeting)
        .map_err(|_| "init ran twice".to_owned())
}

/// `greet "Ada"` -> `Hello, Ada!`
pub fn greet(input: &[u8]) -> Result<String, String> {
    let name = std::str::from_utf8(input).map_err(|e| format!("name is not UTF-8: {e}"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err("give a name to greet".into());
    }
    let greeting = GREETING.get().map_or("Hello", String::as_str);
    Ok(format!("{greeting}, {name}!"))
}

/// Count visits per name in the plugin's own store: `Welcome, Ada (visit 2)`.
pub fn visit(input: &[u8]) -> Result<String, corral_guest::HostError> {
    let name = String::from_utf8_lossy(input).trim().to_owned();
    let name = if name.is_empty() { "stranger".to_owned() } else { name };
    let key = format!("visits/{name}");
    let n = corral_guest::kv::get(&key)?
        .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    corral_guest::kv::put(&key, n.to_string().as_bytes())?;
    Ok(format!("Welcome, {name} (visit {n})"))
}

/// Runs when the worker stops, within the plugin's timeout.
fn shutdown() {
    corral_guest::log::info("stopping");
}

corral_guest::plugin!(init: init, shutdown: shutdown, functions: [greet, visit]);
