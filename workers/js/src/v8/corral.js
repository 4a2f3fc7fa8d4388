// The V8 worker's glue: the frozen global `corral` (the same names as on QuickJS and
// in Wasm) and the driver the engine calls into. Plugin code runs after this.
const ops = Deno.core.ops;
const HOOKS = ["init", "shutdown"];

const corral = ({
  log(level, message) {
    ops.op_corral_log(String(level), String(message));
  },
  now_ms() {
    return ops.op_corral_now_ms();
  },
  text(bytes) {
    if (!(bytes instanceof Uint8Array)) {
      throw new TypeError("corral.text: expected a Uint8Array");
    }
    return ops.op_corral_text(bytes);
  },
  bytes(text) {
    return ops.op_corral_bytes(String(text));
  },
  json(bytes) {
    return JSON.parse(corral.text(bytes));
  },
  json_bytes(value, indent) {
    const text = JSON.stringify(value, undefined, indent);
    if (text === undefined) {
      throw new TypeError("corral.json_bytes: the value has no JSON form");
    }
    return corral.bytes(text);
  },
});
// The host services: services.js (shared with QuickJS) over one op that takes and
// answers byte-string lists (a u32 LE length before each item).
function encodeList(items) {
  const parts = items.map((a) => (typeof a === "string" ? corral.bytes(a) : a));
  const out = new Uint8Array(parts.reduce((n, p) => n + 4 + p.length, 0));
  const view = new DataView(out.buffer);
  let i = 0;
  for (const p of parts) {
    view.setUint32(i, p.length, true);
    out.set(p, i + 4);
    i += 4 + p.length;
  }
  return out;
}
function decodeList(b) {
  const items = [];
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < b.length;) {
    const n = view.getUint32(i, true);
    items.push(b.slice(i + 4, i + 4 + n));
    i += 4 + n;
  }
  return items;
}
function hostCall(name, ...args) {
  const out = ops.op_corral_host(String(name), encodeList(args));
  if (out[0] === 1) {
    const text = corral.text(out.subarray(1));
    const nl = text.indexOf("\n");
    return { error: text.slice(0, nl), message: text.slice(nl + 1) };
  }
  return { ok: decodeList(out.subarray(1)) };
}
(0, eval)(ops.op_corral_services_js())(corral, hostCall);
// CommonJS (commonjs.js, shared with QuickJS): a module's wrapper is compiled by an
// indirect eval, named by its file for stacks.
const commonjs = (0, eval)(ops.op_corral_commonjs_js())({
  resolve: (from, specifier) => ops.op_corral_cjs_resolve(from, specifier),
  source: (name) => ops.op_corral_cjs_source(name),
  compile: (text, name) => (0, eval)(`${text}\n//# sourceURL=${name}`),
});
Object.defineProperty(globalThis, "__corral_commonjs__", {
  value: commonjs,
  writable: false,
  configurable: false,
  enumerable: false,
});
// What CommonJS code looks for to find the global object.
Object.defineProperty(globalThis, "global", {
  value: globalThis,
  writable: true,
  configurable: true,
  enumerable: false,
});
Object.freeze(corral);
Object.defineProperty(globalThis, "corral", {
  value: corral,
  writable: false,
  configurable: false,
  enumerable: false,
});

let plugin = null;
const driver = Object.freeze({
  async bind(namespace) {
    plugin = namespace;
    const names = Object.keys(namespace)
      .filter((k) => typeof namespace[k] === "function" && !HOOKS.includes(k))
      .sort();
    ops.op_corral_exports(names);
    if (typeof namespace.init === "function") await namespace.init();
  },
  async call(name) {
    let out = await plugin[name](ops.op_corral_input());
    if (typeof out === "string") out = corral.bytes(out);
    else if (out === undefined) out = new Uint8Array(0);
    else if (!(out instanceof Uint8Array)) {
      throw new Error(
        `the function returned a value of type ${typeof out}; return a Uint8Array or a ` +
          "string (corral.json_bytes(value) for JSON)",
      );
    }
    ops.op_corral_output(out);
  },
  async shutdown() {
    if (plugin && typeof plugin.shutdown === "function") await plugin.shutdown();
  },
});
Object.defineProperty(globalThis, "__corral", {
  value: driver,
  writable: false,
  configurable: false,
  enumerable: false,
});
