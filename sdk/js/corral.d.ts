// Types of the `corral` global that Corral's JavaScript worker gives a plugin
// (QuickJS or V8): for editors and `tsc --noEmit` (checkJs or `// @ts-check`).
// Every function a plugin exports takes the call's input as a Uint8Array and
// returns a string (sent as UTF-8), a Uint8Array, or nothing; a thrown error is
// the call's error. Host services are performed by the supervisor under the
// operator's policy: a refusal throws `corral.HostError` with kind "denied".

declare namespace corral {
  /** A payload: text is sent as UTF-8; null and undefined as no bytes. */
  type Payload = string | Uint8Array | null | undefined;

  /** The kinds of a refused or failed host call. */
  type HostErrorKind =
    | "denied"
    | "invalid"
    | "quota"
    | "overloaded"
    | "cycle"
    | "call"
    | "failed";

  /** A host call was refused or failed. */
  class HostError extends Error {
    readonly kind: HostErrorKind;
    constructor(kind: HostErrorKind, message: string);
  }

  /** A brokered fetch's answer. */
  interface Response {
    readonly status: number;
    /** The final URL, after redirects the policy allowed. */
    readonly url: string;
    /** Header names in lower case. */
    readonly headers: Readonly<Record<string, string>>;
    readonly body: Uint8Array;
    text(): string;
    json(): unknown;
  }

  interface FetchOptions {
    method?: string;
    headers?: Record<string, string>;
    body?: Payload;
  }

  /** The plugin's own key-value store, kept by the supervisor. */
  interface Store {
    get(key: string): Uint8Array | null;
    get_text(key: string): string | null;
    put(key: string, value: Payload): void;
    /** Whether the key was there. */
    delete(key: string): boolean;
    keys(prefix?: string): string[];
  }

  type LogLevel = "error" | "warn" | "info" | "debug" | "trace";

  /** The input bytes as text (UTF-8); anything else throws. */
  function text(bytes: Uint8Array): string;
  /** Text as UTF-8 bytes. */
  function bytes(text: string): Uint8Array;
  /** The input bytes parsed as JSON. */
  function json(bytes: Uint8Array): unknown;
  /** A value as JSON, UTF-8. */
  function json_bytes(value: unknown, indent?: number | string): Uint8Array;
  /** A line in the supervisor's log, with the plugin's id (secrets redacted). */
  function log(level: LogLevel, message: string): void;
  /** Wall-clock milliseconds since the Unix epoch, from the supervisor. */
  function now_ms(): number;
  /** An HTTP request the supervisor makes, if the policy allows it. */
  function fetch(url: string, options?: FetchOptions): Response;
  /** Queue `payload` for the topic's subscribers; how many there are. */
  function publish(topic: string, payload: Payload): number;
  /** Call another plugin's function through the supervisor; its output. */
  function call(plugin: string, fn: string, input?: Payload): Uint8Array;
  /** One of the plugin's secrets, or null. */
  function secret(name: string): string | null;

  const kv: Store;
  /** The operator's configuration for the plugin. */
  const config: Readonly<Record<string, string>>;
}
