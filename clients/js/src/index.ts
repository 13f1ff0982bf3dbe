export * from "./protocol.js";
export * from "./storage.js";
export * from "./backoff.js";
export * from "./emitter.js";
export * from "./outbox.js";
export * from "./timeline.js";
export * from "./client.js";
