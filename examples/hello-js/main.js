// The example Corral plugin for JavaScript: the same functions as hello-wasm, plus
// `render` (markdown to HTML) with a library vendored from npm.
import { marked } from "./vendor/marked/marked.esm.js";

/** `greet "Ada"` -> `Hello, Ada!` */
export function greet(input) {
  const name = corral.text(input).trim();
  if (!name) throw new Error("give a name to greet");
  corral.log("info", `greeting ${name}`);
  return `Hello, ${name}!`;
}

/** Reverse the characters (code points) of a UTF-8 string. */
export function reverse(input) {
  return [...corral.text(input)].reverse().join("");
}

/** Count words, lines and bytes, as JSON. */
export function wc(input) {
  const text = corral.text(input);
  const lines = text === "" ? 0 : text.replace(/\r?\n$/, "").split(/\r?\n/).length;
  const words = text.split(/\s+/).filter((w) => w.length > 0).length;
  return JSON.stringify({ lines, words, bytes: input.length });
}

/** Return the input unchanged. */
export function echo(input) {
  return input;
}

/** Do nothing (for measuring call overhead). */
export function noop() {}

/** The supervisor's clock, through a host call. */
export function now() {
  return String(corral.now_ms());
}

/** Markdown to HTML, by marked (GitHub-flavoured). */
export function render(input) {
  return marked.parse(corral.text(input), { async: false });
}
