//! QuickJS's side of module loading: the ES module resolver and loader, and the
//! CommonJS runtime (`commonjs.js`) with its native primitives. Where a module may
//! come from and what format it is are [`crate::modules`]'s to say.

use crate::modules::{Format, Mode, PluginFiles};
use rquickjs::context::EvalOptions;
use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::object::Property;
use rquickjs::{Ctx, Error, Exception, Function, Module, Object, Result, Value};

/// The CommonJS runtime, shared with the V8 engine.
pub const COMMONJS: &str = include_str!("commonjs.js");

/// The global (read-only, not enumerable) through which an ES module made for a
/// CommonJS file loads it.
pub const COMMONJS_GLOBAL: &str = "__corral_commonjs__";

/// The ES module that stands for CommonJS (or JSON) module `name`: its default
/// export is `module.exports`, as Node's `import` of CommonJS gives.
pub fn commonjs_facade(name: &str) -> String {
    let quoted = serde_json::to_string(name).expect("a string serializes");
    format!("export default globalThis.{COMMONJS_GLOBAL}({quoted});\n")
}

/// The text of the CommonJS wrapper around `body`.
fn compile<'js>(ctx: &Ctx<'js>, text: String, name: String) -> Result<Value<'js>> {
    let mut options = EvalOptions::default();
    options.global = true;
    options.strict = false;
    options.filename = Some(name);
    ctx.eval_with_options(text, options)
}

/// Install the CommonJS runtime in `ctx`, for the files of `files`.
pub fn install_commonjs<'js>(ctx: &Ctx<'js>, files: PluginFiles) -> Result<()> {
    let native = Object::new(ctx.clone())?;
    let resolving = files.clone();
    native.set(
        "resolve",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, from: String, spec: String| -> Result<String> {
                resolving
                    .resolve(&from, &spec, Mode::Require)
                    .map_err(|why| {
                        Exception::throw_message(
                            &ctx,
                            &format!("require({spec:?}) in {from}: {why}"),
                        )
                    })
            },
        )?,
    )?;
    native.set(
        "source",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, name: String| -> Result<Vec<String>> {
                let bytes = files
                    .read(&name)
                    .map_err(|why| Exception::throw_message(&ctx, &why))?;
                let text = String::from_utf8(bytes).map_err(|e| {
                    Exception::throw_message(&ctx, &format!("{name}: not UTF-8: {e}"))
                })?;
                Ok(vec![files.format(&name).name().to_owned(), text])
            },
        )?,
    )?;
    native.set(
        "compile",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, text: String, name: String| -> Result<Value<'js>> {
                compile(&ctx, text, name)
            },
        )?,
    )?;
    let factory: Function = compile(ctx, COMMONJS.to_owned(), "<corral commonjs>".into())?
        .into_function()
        .ok_or_else(|| Exception::throw_internal(ctx, "commonjs.js is not a function"))?;
    let load: Function = factory.call((native,))?;
    ctx.globals().prop(COMMONJS_GLOBAL, Property::from(load))?;
    // What CommonJS code looks for to find the global object.
    ctx.globals().prop(
        "global",
        Property::from(ctx.globals()).writable().configurable(),
    )?;
    Ok(())
}

/// Whether `text` compiles as the body of a CommonJS module.
fn parses_as_commonjs(ctx: &Ctx<'_>, text: &[u8], name: &str) -> bool {
    let mut wrapped = b"(function (exports, require, module, __filename, __dirname) {".to_vec();
    wrapped.extend_from_slice(text);
    wrapped.extend_from_slice(b"\n})");
    let Ok(wrapped) = String::from_utf8(wrapped) else {
        return false;
    };
    let ok = compile(ctx, wrapped, name.to_owned()).is_ok();
    if !ok {
        // The syntax error is pending: this was only a test.
        let _ = ctx.catch();
    }
    ok
}

/// The ES module source for module `name`: the file itself, or a facade for a
/// CommonJS or JSON file.
pub fn es_source(
    ctx: &Ctx<'_>,
    files: &PluginFiles,
    name: &str,
) -> std::result::Result<Vec<u8>, String> {
    let format = files.format(name);
    match format {
        Format::CommonJs | Format::Json => Ok(commonjs_facade(name).into_bytes()),
        Format::EsModule => files.read(name),
        Format::CommonJsUnlessModuleSyntax => {
            let text = files.read(name)?;
            if parses_as_commonjs(ctx, &text, name) {
                Ok(commonjs_facade(name).into_bytes())
            } else {
                Ok(text)
            }
        }
    }
}

/// Resolves `import` specifiers ([`PluginFiles::resolve`]).
#[derive(Debug)]
pub struct PluginResolver {
    files: PluginFiles,
}

impl PluginResolver {
    pub fn new(files: PluginFiles) -> PluginResolver {
        PluginResolver { files }
    }
}

impl Resolver for PluginResolver {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> Result<String> {
        self.files
            .resolve(base, name, Mode::Import)
            .map_err(|why| Error::new_resolving_message(base, name, why))
    }
}

/// Loads resolved modules from the plugin's files, or from their precompiled
/// bytecode ([`crate::bytecode`]) where it has it; a compile helper's loader also
/// keeps the bytecode of every module it declares.
#[derive(Debug)]
pub struct PluginLoader {
    files: PluginFiles,
    bytecode: Option<crate::bytecode::Modules>,
    record: Option<crate::bytecode::Recorded>,
}

impl PluginLoader {
    pub fn new(files: PluginFiles) -> PluginLoader {
        PluginLoader {
            files,
            bytecode: None,
            record: None,
        }
    }

    /// A loader that takes each module's bytecode from `bytecode` if it is there.
    pub fn with_bytecode(files: PluginFiles, bytecode: crate::bytecode::Modules) -> PluginLoader {
        PluginLoader {
            bytecode: Some(bytecode),
            ..PluginLoader::new(files)
        }
    }

    /// A compile helper's loader: each module declared from its source, and its
    /// bytecode kept in `out`.
    pub fn recording(files: PluginFiles, out: crate::bytecode::Recorded) -> PluginLoader {
        PluginLoader {
            record: Some(out),
            ..PluginLoader::new(files)
        }
    }
}

impl Loader for PluginLoader {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> Result<Module<'js>> {
        let module = crate::bytecode::declare(ctx, &self.files, self.bytecode.as_ref(), name)?;
        if let Some(out) = &self.record {
            let code = module.write(rquickjs::module::WriteOptions::default())?;
            out.borrow_mut().push((name.to_owned(), code));
        }
        Ok(module)
    }
}
