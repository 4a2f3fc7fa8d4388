//! The `corral` module: the host API under the same names as in Wasm and JavaScript,
//! registered in the interpreter's inittab before it starts.
//!
//! `log(level, message)`, `now_ms()`, `text(data)`, `bytes(text)`, `json(data)`,
//! `json_bytes(value, indent=None)`, and the exception `DeadlineExceeded` (a
//! `BaseException`, so `except Exception` does not swallow it).

use corral_worker::Host;
use pyo3::exceptions::{PyBaseException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

pyo3::create_exception!(
    corral,
    DeadlineExceeded,
    PyBaseException,
    "The call ran past its deadline."
);

static HOST: Mutex<Option<Host>> = Mutex::new(None);
static EPOCH: OnceLock<Instant> = OnceLock::new();
/// The running call's deadline in nanoseconds after `EPOCH`; 0 when none.
static DEADLINE: AtomicU64 = AtomicU64::new(0);

pub fn set_host(host: &Host) {
    *HOST.lock().unwrap_or_else(|e| e.into_inner()) = Some(host.clone());
}

fn host() -> PyResult<Host> {
    HOST.lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| PyRuntimeError::new_err("the host API is available once the plugin loads"))
}

fn nanos_now() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Arm the deadline: from `at` on, the SIGALRM handler raises `DeadlineExceeded`.
pub fn set_deadline(at: Option<Instant>) {
    let epoch = *EPOCH.get_or_init(Instant::now);
    let ns = at.map_or(0, |t| {
        t.saturating_duration_since(epoch).as_nanos().max(1) as u64
    });
    DEADLINE.store(ns, Ordering::Relaxed);
}

/// Python-level SIGALRM handler: raise if the call is past its deadline. A signal
/// that arrives late (the call already answered) does nothing.
#[pyfunction]
fn _deadline(_signum: i32, _frame: Bound<'_, PyAny>) -> PyResult<()> {
    let d = DEADLINE.load(Ordering::Relaxed);
    if d != 0 && nanos_now() >= d {
        return Err(DeadlineExceeded::new_err("the call ran past its deadline"));
    }
    Ok(())
}

#[pyfunction]
fn log(level: &str, message: &Bound<'_, PyAny>) -> PyResult<()> {
    let Some(level) = corral_protocol::LogLevel::from_name(level) else {
        return Err(PyValueError::new_err(format!(
            "corral.log: unknown level {level:?} (error, warn, info, debug, trace)"
        )));
    };
    let message = message.str()?.to_string();
    host()?.log(level, message);
    Ok(())
}

#[pyfunction]
fn now_ms() -> PyResult<i64> {
    host()?
        .now_ms()
        .map_err(|e| PyRuntimeError::new_err(format!("host call now_ms failed: {e}")))
}

fn byte_view(data: &Bound<'_, PyAny>, what: &str) -> PyResult<PyBackedBytes> {
    data.extract::<PyBackedBytes>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what}: expected bytes or bytearray, got {}",
            data.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> PyResult<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| PyValueError::new_err(format!("{what}: not UTF-8: {e}")))
}

#[pyfunction]
fn text(data: &Bound<'_, PyAny>) -> PyResult<String> {
    let bytes = byte_view(data, "corral.text")?;
    utf8(&bytes, "corral.text").map(str::to_owned)
}

#[pyfunction]
fn bytes<'py>(py: Python<'py>, text: &str) -> Bound<'py, PyBytes> {
    PyBytes::new(py, text.as_bytes())
}

#[pyfunction]
fn json<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let bytes = byte_view(data, "corral.json")?;
    let text = utf8(&bytes, "corral.json")?;
    py.import("json")?.call_method1("loads", (text,))
}

#[pyfunction]
#[pyo3(signature = (value, indent=None))]
fn json_bytes<'py>(
    py: Python<'py>,
    value: &Bound<'py, PyAny>,
    indent: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("indent", indent)?;
    kwargs.set_item("ensure_ascii", false)?;
    let text: String = py
        .import("json")?
        .call_method("dumps", (value,), Some(&kwargs))?
        .extract()?;
    Ok(PyBytes::new(py, text.as_bytes()))
}

/// The native half of the host services (`services.py` is the typed half).
#[pyfunction]
#[pyo3(signature = (name, *args))]
fn _host<'py>(
    py: Python<'py>,
    name: &str,
    args: Vec<Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let mut bytes = Vec::with_capacity(args.len());
    for a in &args {
        bytes.push(match a.extract::<String>() {
            Ok(s) => s.into_bytes(),
            Err(_) => byte_view(a, &format!("corral host call {name}"))?.to_vec(),
        });
    }
    let host = host()?;
    match py.detach(|| corral_worker::services::request(&host, name, bytes)) {
        Ok(items) => Ok(items.iter().map(|i| PyBytes::new(py, i)).collect()),
        Err(e) => {
            let class = py.import("corral")?.getattr("HostError")?;
            Err(PyErr::from_value(class.call1((e.kind(), e.to_string()))?))
        }
    }
}

/// The typed host services, run in the module's namespace at start.
pub const SERVICES_PY: &str = include_str!("services.py");

#[pymodule]
#[pyo3(name = "corral")]
pub fn corral_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(log, m)?)?;
    m.add_function(wrap_pyfunction!(now_ms, m)?)?;
    m.add_function(wrap_pyfunction!(text, m)?)?;
    m.add_function(wrap_pyfunction!(bytes, m)?)?;
    m.add_function(wrap_pyfunction!(json, m)?)?;
    m.add_function(wrap_pyfunction!(json_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(_deadline, m)?)?;
    m.add_function(wrap_pyfunction!(_host, m)?)?;
    m.add("DeadlineExceeded", m.py().get_type::<DeadlineExceeded>())?;
    Ok(())
}
