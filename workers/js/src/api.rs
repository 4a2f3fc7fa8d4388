//! The global `corral` object (host API and byte helpers), and turning a function's
//! return value into output bytes.

use corral_protocol::CallError;
use corral_worker::Host;
use rquickjs::function::Opt;
use rquickjs::object::Property;
use rquickjs::{Ctx, Exception, Function, Object, TypedArray, Value};

/// Install the frozen global `corral`.
pub fn install<'js>(ctx: &Ctx<'js>, host: Host) -> rquickjs::Result<()> {
    let corral = Object::new(ctx.clone())?;
    let services_host = host.clone();
    let log_host = host.clone();
    corral.set(
        "log",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  level: String,
                  message: rquickjs::Coerced<String>|
                  -> rquickjs::Result<()> {
                let Some(level) = corral_protocol::LogLevel::from_name(&level) else {
                    return Err(Exception::throw_type(
                        &ctx,
                        &format!(
                            "corral.log: unknown level {level:?} (error, warn, info, debug, trace)"
                        ),
                    ));
                };
                let message = message.0;
                log_host.log(level, message);
                Ok(())
            },
        )?
        .with_name("log")?,
    )?;
    corral.set(
        "now_ms",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>| -> rquickjs::Result<f64> {
            let ms = host.now_ms().map_err(|e| {
                Exception::throw_internal(&ctx, &format!("host call now_ms failed: {e}"))
            })?;
            Ok(ms as f64)
        })?
        .with_name("now_ms")?,
    )?;
    corral.set(
        "text",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, bytes: Value<'js>| -> rquickjs::Result<String> {
                let bytes = byte_view(&ctx, bytes, "corral.text")?;
                String::from_utf8(bytes).map_err(|e| {
                    Exception::throw_type(&ctx, &format!("corral.text: not UTF-8: {e}"))
                })
            },
        )?
        .with_name("text")?,
    )?;
    corral.set(
        "bytes",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, text: String| -> rquickjs::Result<TypedArray<'js, u8>> {
                TypedArray::<u8>::new_copy(ctx, text.as_bytes())
            },
        )?
        .with_name("bytes")?,
    )?;
    // JSON.parse and JSON.stringify are looked up per call: a JS value captured by a
    // Rust closure is invisible to the cycle collector and would outlive the runtime.
    // (A plugin that replaces them only changes its own results.)
    corral.set(
        "json",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, bytes: Value<'js>| -> rquickjs::Result<Value<'js>> {
                let bytes = byte_view(&ctx, bytes, "corral.json")?;
                let text = String::from_utf8(bytes).map_err(|e| {
                    Exception::throw_type(&ctx, &format!("corral.json: not UTF-8: {e}"))
                })?;
                let json: Object = ctx.globals().get("JSON")?;
                let parse: Function = json.get("parse")?;
                parse.call((text,))
            },
        )?
        .with_name("json")?,
    )?;
    corral.set(
        "json_bytes",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  value: Value<'js>,
                  indent: Opt<Value<'js>>|
                  -> rquickjs::Result<TypedArray<'js, u8>> {
                let json: Object = ctx.globals().get("JSON")?;
                let stringify: Function = json.get("stringify")?;
                let text: Option<String> =
                    stringify.call((value, Value::new_undefined(ctx.clone()), indent.0))?;
                let text = text.ok_or_else(|| {
                    Exception::throw_type(&ctx, "corral.json_bytes: the value has no JSON form")
                })?;
                TypedArray::<u8>::new_copy(ctx, text.as_bytes())
            },
        )?
        .with_name("json_bytes")?,
    )?;
    install_services(ctx, &corral, services_host)?;
    let freeze: Function = ctx.globals().get::<_, Object>("Object")?.get("freeze")?;
    freeze.call::<_, ()>((corral.clone(),))?;
    ctx.globals().prop("corral", Property::from(corral))?;
    Ok(())
}

/// The typed services (`corral.kv`, `corral.fetch`, `corral.publish`, `corral.call`,
/// `corral.config`, `corral.secret`, `corral.HostError`): `services.js` over one
/// native primitive that only its closures can reach.
fn install_services<'js>(ctx: &Ctx<'js>, corral: &Object<'js>, host: Host) -> rquickjs::Result<()> {
    let host_call = Function::new(
        ctx.clone(),
        move |ctx: Ctx<'js>,
              name: String,
              args: rquickjs::function::Rest<Value<'js>>|
              -> rquickjs::Result<Object<'js>> {
            let mut bytes = Vec::with_capacity(args.0.len());
            for a in args.0 {
                bytes.push(match a.as_string() {
                    Some(s) => s.to_string()?.into_bytes(),
                    None => byte_view(&ctx, a, &format!("corral host call {name}"))?,
                });
            }
            let answer = Object::new(ctx.clone())?;
            match corral_worker::services::request(&host, &name, bytes) {
                Ok(items) => {
                    let list = rquickjs::Array::new(ctx.clone())?;
                    for (i, item) in items.iter().enumerate() {
                        list.set(i, TypedArray::<u8>::new_copy(ctx.clone(), item)?)?;
                    }
                    answer.set("ok", list)?;
                }
                Err(e) => {
                    answer.set("error", e.kind())?;
                    answer.set("message", e.to_string())?;
                }
            }
            Ok(answer)
        },
    )?;
    let define: Function = ctx.eval(SERVICES_JS)?;
    define.call::<_, ()>((corral.clone(), host_call))
}

/// The JavaScript half of the host services, shared with the V8 engine.
pub const SERVICES_JS: &str = include_str!("services.js");

/// The bytes of a `Uint8Array` argument, copied.
fn byte_view(ctx: &Ctx<'_>, v: Value<'_>, what: &str) -> rquickjs::Result<Vec<u8>> {
    let arr = TypedArray::<u8>::from_value(v)
        .map_err(|_| Exception::throw_type(ctx, &format!("{what}: expected a Uint8Array")))?;
    // SAFETY: the slice is copied at once; no JS runs while it is borrowed.
    let bytes = unsafe { arr.as_bytes() }.map(<[u8]>::to_vec);
    bytes.ok_or_else(|| Exception::throw_type(ctx, &format!("{what}: the array is detached")))
}

/// A function's return value as output bytes: a `Uint8Array` or a string. The
/// worker loop checks the size against `max_output`.
pub fn output(ret: &Value<'_>) -> Result<Vec<u8>, CallError> {
    if let Some(s) = ret.as_string() {
        s.to_string()
            .map(String::into_bytes)
            .map_err(|e| CallError::Trap {
                message: format!("the returned string is not valid UTF-16: {e}"),
            })
    } else if let Ok(arr) = TypedArray::<u8>::from_value(ret.clone()) {
        // SAFETY: copied at once; no JS runs while the slice is borrowed.
        unsafe { arr.as_bytes() }
            .map(<[u8]>::to_vec)
            .ok_or_else(|| CallError::Trap {
                message: "the returned Uint8Array is detached".into(),
            })
    } else if ret.is_undefined() {
        Ok(Vec::new())
    } else {
        Err(CallError::Plugin {
            message: format!(
                "the function returned a value of type {}; return a Uint8Array or a string \
                 (corral.json_bytes(value) for JSON)",
                ret.type_name()
            ),
        })
    }
}
