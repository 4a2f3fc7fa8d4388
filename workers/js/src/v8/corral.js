// The V8 worker's glue: the frozen global `corral` (the same names as on QuickJS and
// in Wasm) and the driver the engine calls into. Plugin code runs after this.
const ops = Deno.core.ops;
const HOOKS = ["init", "shutdown"];

const corral = Object.freeze({
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
