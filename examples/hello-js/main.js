// @ts-check
// The example Corral plugin for JavaScript: the same functions as hello-wasm, plus
// `render` (markdown to HTML) with a library vendored from npm.
import { marked } from "./vendor/marked/marked.esm.js";

/** `greet "Ada"` -> `Hello, Ada!`
 * @param {Uint8Array} input
 */
export function greet(input) {
  const name = corral.text(input).trim();
  if (!name) throw new Error("give a name to greet");
  corral.log("info", `greeting ${name}`);
  return `Hello, ${name}!`;
}

/** Reverse the characters (code points) of a UTF-8 string.
 * @param {Uint8Array} input
 */
export function reverse(input) {
  return [...corral.text(input)].reverse().join("");
}

/** Count words, lines and bytes, as JSON.
 * @param {Uint8Array} input
 */
export function wc(input) {
  const text = corral.text(input);
  const lines = text === "" ? 0 : text.replace(/\r?\n$/, "").split(/\r?\n/).length;
  const words = text.split(/\s+/).filter((w) => w.length > 0).length;
  return JSON.stringify({ lines, words, bytes: input.length });
}

/** Return the input unchanged.
 * @param {Uint8Array} input
 */
export function echo(input) {
  return input;
}

/** Do nothing (for measuring call overhead). */
export function noop() {}

/** The supervisor's clock, through a host call. */
export function now() {
  return String(corral.now_ms());
}

/** Markdown to HTML, by marked (GitHub-flavoured).
 * @param {Uint8Array} input
 */
export function render(input) {
  return marked.parse(corral.text(input), { async: false });
}

// Host services, brokered by the supervisor under policies/grants.toml.

/** Count visits per name in the plugin's own store: `Welcome, Ada (visit 2)`.
 * @param {Uint8Array} input
 */
export function visit(input) {
  const name = corral.text(input).trim() || "stranger";
  const n = Number(corral.kv.get_text(`visits/${name}`) ?? "0") + 1;
  corral.kv.put(`visits/${name}`, String(n));
  return `Welcome, ${name} (visit ${n})`;
}

/** GET a URL through the supervisor: `200, 1234 bytes`.
 * @param {Uint8Array} input
 */
export function fetch(input) {
  const r = corral.fetch(corral.text(input).trim());
  return `${r.status}, ${r.body.length} bytes`;
}

/** Publish on `hello.news`: every example subscribed receives it in `on_news`.
 * @param {Uint8Array} input
 */
export function announce(input) {
  return `queued for ${corral.publish("hello.news", input)} subscribers`;
}

/** Subscriber of `hello.news`: keep the latest message.
 * @param {Uint8Array} input
 */
export function on_news(input) {
  corral.kv.put("news/latest", input);
}

/** The latest message on `hello.news`, or nothing. */
export function news() {
  return corral.kv.get("news/latest") ?? "";
}
