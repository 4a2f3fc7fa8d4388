// @ts-check
// {{id}}: a Corral plugin in JavaScript. Every exported function takes the
// input bytes (a Uint8Array) and returns a string or bytes; a thrown error is
// the call's error. `corral` (its types: corral.d.ts; `tsc --noEmit` checks
// this file against them) is the host API: corral.text, corral.bytes, corral.log, corral.config,
// corral.secret, corral.kv, corral.fetch, corral.publish, corral.call.

let greeting = "Hello";

/** Runs once when a worker loads the plugin, before any call. */
export function init() {
  greeting = corral.config.greeting ?? "Hello";
  corral.log("info", `ready to say ${greeting}`);
}

/**
 * `greet "Ada"` -> `Hello, Ada!`
 * @param {Uint8Array} input
 */
export function greet(input) {
  const name = corral.text(input).trim();
  if (!name) throw new Error("give a name to greet");
  return `${greeting}, ${name}!`;
}

/**
 * Count visits per name in the plugin's own store: `Welcome, Ada (visit 2)`.
 * @param {Uint8Array} input
 */
export function visit(input) {
  const name = corral.text(input).trim() || "stranger";
  const n = Number(corral.kv.get_text(`visits/${name}`) ?? "0") + 1;
  corral.kv.put(`visits/${name}`, String(n));
  return `Welcome, ${name} (visit ${n})`;
}

/** Runs when the worker stops, within the plugin's timeout. */
export function shutdown() {
  corral.log("info", "stopping");
}
