// CommonJS modules (require, module.exports), shared by the QuickJS and V8 engines.
// Evaluated once per runtime as a function of the native primitives:
//   native.resolve(from, specifier) -> logical name of the file (throws if refused)
//   native.source(name) -> [format, text]: "commonjs", "detect", "json" or "module"
//   native.compile(text, name) -> the function a script evaluates to, named `name`
//                                 in stacks
// Returns load(name) -> that module's `module.exports`, which the ES module loader
// uses as the default export of a CommonJS module imported with `import`.
(function (native) {
  "use strict";
  const cache = new Map();
  const dirname = (name) => {
    const i = name.lastIndexOf("/");
    return i < 0 ? "" : name.slice(0, i);
  };
  const WRAP = "(function (exports, require, module, __filename, __dirname) {";

  function makeRequire(from) {
    const require = function require(specifier) {
      if (typeof specifier !== "string") {
        throw new TypeError(`require: the module name must be a string, got ${typeof specifier}`);
      }
      return load(native.resolve(from, specifier));
    };
    require.resolve = function resolve(specifier) {
      return native.resolve(from, String(specifier));
    };
    require.cache = Object.create(null);
    return require;
  }

  function load(name) {
    const cached = cache.get(name);
    if (cached !== undefined) return cached.exports; // a cycle sees what is there so far
    const [format, text] = native.source(name);
    if (format === "module") {
      throw new Error(
        `require() of ES module ${name}: it is an ES module (by its extension or its ` +
        `package.json "type"); load it with import instead`);
    }
    const module = {
      id: name, filename: name, path: dirname(name), exports: {}, loaded: false,
      children: [], paths: [],
    };
    module.require = makeRequire(name);
    cache.set(name, module);
    try {
      if (format === "json") {
        module.exports = JSON.parse(text);
      } else {
        // On the wrapper's first line, so that line numbers are the file's.
        const body = text.startsWith("#!") ? "//" + text : text;
        let fn;
        try {
          fn = native.compile(WRAP + body + "\n})", name);
        } catch (e) {
          if (format === "detect" && e instanceof SyntaxError) {
            throw new Error(
              `require() of ${name}: it does not parse as CommonJS (${e.message}); if it is ` +
              `an ES module, load it with import`);
          }
          throw e;
        }
        fn.call(module.exports, module.exports, module.require, module, name, dirname(name));
      }
      module.loaded = true;
    } catch (e) {
      cache.delete(name);
      throw e;
    }
    return module.exports;
  }

  return load;
})
