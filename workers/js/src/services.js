// The typed host services over the native primitive, shared by the QuickJS and V8
// engines. Evaluated once per runtime as a function of (corral, hostCall); hostCall
// is reachable from nothing but these closures.
(function (corral, hostCall) {
  "use strict";
  class HostError extends Error {
    constructor(kind, message) {
      super(message);
      this.name = "HostError";
      this.kind = kind;
    }
  }
  const enc = (v, what) => {
    if (typeof v === "string") return corral.bytes(v);
    if (v instanceof Uint8Array) return v;
    if (v === undefined || v === null) return new Uint8Array(0);
    throw new TypeError(`${what}: expected a string or Uint8Array, got ${typeof v}`);
  };
  const call = (name, ...args) => {
    const r = hostCall(name, ...args);
    if (r.error !== undefined) throw new HostError(r.error, r.message);
    return r.ok;
  };
  const str = (v, what) => {
    if (typeof v !== "string") throw new TypeError(`${what}: expected a string, got ${typeof v}`);
    return v;
  };
  const kv = Object.freeze({
    get(key) {
      const r = call("kv_get", str(key, "corral.kv.get"));
      return r.length ? r[0] : null;
    },
    get_text(key) {
      const v = kv.get(key);
      return v === null ? null : corral.text(v);
    },
    put(key, value) {
      call("kv_put", str(key, "corral.kv.put"), enc(value, "corral.kv.put"));
    },
    delete(key) {
      return corral.text(call("kv_delete", str(key, "corral.kv.delete"))[0]) === "1";
    },
    keys(prefix = "") {
      return call("kv_keys", str(prefix, "corral.kv.keys")).map(corral.text);
    },
  });
  const fetch = (url, options = {}) => {
    const method = options.method ?? "GET";
    const headers = Object.entries(options.headers ?? {})
      .map(([k, v]) => `${k}: ${v}`)
      .join("\n");
    const [status, final, head, body] = call(
      "fetch", str(method, "corral.fetch method"), str(url, "corral.fetch url"), headers,
      enc(options.body, "corral.fetch body"));
    const hs = {};
    for (const line of corral.text(head).split("\n")) {
      const i = line.indexOf(":");
      if (i > 0) hs[line.slice(0, i).toLowerCase()] = line.slice(i + 1).trim();
    }
    return Object.freeze({
      status: Number(corral.text(status)),
      url: corral.text(final),
      headers: Object.freeze(hs),
      body,
      text: () => corral.text(body),
      json: () => corral.json(body),
    });
  };
  const config = {};
  const flat = call("config");
  for (let i = 0; i + 1 < flat.length; i += 2) config[corral.text(flat[i])] = corral.text(flat[i + 1]);
  const defs = {
    HostError,
    kv,
    fetch,
    publish: (topic, payload) =>
      Number(corral.text(call("publish", str(topic, "corral.publish"), enc(payload, "corral.publish"))[0])),
    call: (plugin, fn, input) =>
      call("call", str(plugin, "corral.call plugin"), str(fn, "corral.call function"),
        enc(input, "corral.call input"))[0],
    config: Object.freeze(config),
    secret: (name) => {
      const r = call("secret", str(name, "corral.secret"));
      return r.length ? corral.text(r[0]) : null;
    },
  };
  for (const [k, v] of Object.entries(defs)) {
    Object.defineProperty(corral, k, { value: v, enumerable: true });
  }
})
