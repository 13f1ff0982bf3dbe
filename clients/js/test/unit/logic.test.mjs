// Unit tests of the SDK's logic that needs no server: ordering with gaps,
// dedup, outbox persistence and retry, backoff, the transport decision.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  Timelines, Outbox, MemoryStorage, Backoff, drainJitter, chooseTransport, ChatClient, directConv, tokenClaims,
} from "../../dist/index.js";

const msg = (conv, seq, id = `m${conv}${seq}`) => ({ type: "msg", id, conv, seq, from: "bob", ts: seq, body: `b${seq}` });
const wait = (ms) => new Promise((r) => setTimeout(r, ms));

test("in-order items show at once, duplicates never", () => {
  const shown = [];
  const t = new Timelines({ fill: async () => [], onShow: (c, items) => shown.push(...items.map((i) => i.seq)) });
  assert.equal(t.addLive(msg("d:a:b", 1)), true);
  assert.equal(t.addLive(msg("d:a:b", 2)), true);
  assert.equal(t.addLive(msg("d:a:b", 2)), false, "same id twice");
  assert.equal(t.addLive({ ...msg("d:a:b", 2), id: "other" }), false, "same seq twice");
  assert.deepEqual(shown, [1, 2]);
  assert.deepEqual(t.items("d:a:b").map((i) => i.seq), [1, 2]);
});

test("a hole is filled from history before later messages are shown", async () => {
  const shown = [];
  const asked = [];
  const t = new Timelines({
    fillDelays: [0],
    fill: async (conv, after, before) => { asked.push([after, before]); return [msg(conv, 3), msg(conv, 2)]; },
    onShow: (c, items) => shown.push(...items.map((i) => i.seq)),
  });
  t.addLive(msg("d:a:b", 1));
  t.addLive(msg("d:a:b", 4));                       // 2 and 3 missing
  assert.deepEqual(shown, [1], "4 waits for the hole");
  assert.equal(t.waiting("d:a:b"), 1);
  await wait(20);
  assert.deepEqual(asked, [[1, 4]]);
  assert.deepEqual(shown, [1, 2, 3, 4], "history first, then 4, in seq order");
  t.addLive(msg("d:a:b", 3));                       // late live copy of a filled one
  assert.deepEqual(t.items("d:a:b").map((i) => i.seq), [1, 2, 3, 4]);
});

test("a hole that arrives live while filling ends the fill; a real hole is accepted", async () => {
  const shown = [];
  let calls = 0;
  const t = new Timelines({
    fillDelays: [0, 30, 30],
    fill: async () => { calls++; return []; },
    onShow: (c, items) => shown.push(...items.map((i) => i.seq)),
  });
  t.addLive(msg("g:x", 5));
  t.addLive(msg("g:x", 7));
  await wait(5);
  t.addLive(msg("g:x", 6));                          // the missing one comes live
  assert.deepEqual(shown, [5, 6, 7]);
  t.addLive(msg("g:x", 10));                         // 8, 9 never come
  await wait(120);
  assert.deepEqual(shown, [5, 6, 7, 10], "shown after the last attempt");
  assert.ok(calls >= 3);
  assert.equal(t.frontier("g:x"), 10);
});

test("own acked sends are shown where their seq is", () => {
  const t = new Timelines({ fill: async () => [], onShow: () => {} });
  t.addLive(msg("d:a:b", 1));
  t.addLive({ ...msg("d:a:b", 3), from: "a" }, true);
  assert.deepEqual(t.items("d:a:b").map((i) => i.seq), [1, 3]);
  t.addLive(msg("d:a:b", 2));
  assert.deepEqual(t.items("d:a:b").map((i) => i.seq), [1, 2, 3]);
  assert.equal(t.frontier("d:a:b"), 3);
});

test("outbox: persisted before sending, reloaded, acked once, final errors reject", async () => {
  const st = new MemoryStorage();
  const ob = new Outbox(st, "k");
  const { entry, done } = await ob.add({ to: "bob", conv: "d:alice:bob", body: "hi" });
  assert.match(entry.client_id, /^[0-9a-f-]{36}$/);
  assert.equal((await st.get("k")).length, 1, "saved at once");

  const again = new Outbox(st, "k");                  // a reload
  const left = await again.load();
  assert.equal(left.length, 1);
  assert.equal(left[0].client_id, entry.client_id, "the same client_id after a reload");

  const ack = { type: "ack", client_id: entry.client_id, id: "1", conv: "d:alice:bob", seq: 1, ts: 1 };
  await ob.acked(ack);
  assert.deepEqual(await done, ack);
  assert.equal((await st.get("k")).length, 0);

  const b = await ob.add({ to: "bob", conv: "d:alice:bob", body: "x".repeat(5000) });
  await ob.failed(b.entry.client_id, new Error("too_large"));
  await assert.rejects(b.done, /too_large/);
  assert.equal(ob.size, 0);
});

test("backoff: exponential from 1 s to 30 s with jitter, reset after success", () => {
  const lo = new Backoff(1000, 30000, () => 0);
  const hi = new Backoff(1000, 30000, () => 1);
  const los = [], his = [];
  for (let i = 0; i < 8; i++) { los.push(lo.next()); his.push(hi.next()); }
  assert.deepEqual(his, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
  assert.deepEqual(los, his.map((x) => x / 2), "jitter within [base/2, base]");
  const r = new Backoff(1000, 30000);
  for (let i = 0; i < 20; i++) { const d = r.next(); assert.ok(d >= 500 && d <= 30000); }
  hi.reset();
  assert.equal(hi.next(), 1000);
  assert.ok(drainJitter(() => 0.5) === 250);
});

test("transport decision: WebSocket first, long-poll after a failure, WebSocket again later", () => {
  const base = { preference: "auto", wsAvailable: true, wsFailures: 0, sinceWsTry: 0, wsRetryMs: 60000 };
  assert.equal(chooseTransport(base), "websocket");
  assert.equal(chooseTransport({ ...base, wsFailures: 1, sinceWsTry: 10 }), "longpoll");
  assert.equal(chooseTransport({ ...base, wsFailures: 3, sinceWsTry: 60000 }), "websocket", "retry after wsRetryMs");
  assert.equal(chooseTransport({ ...base, wsAvailable: false }), "longpoll", "no WebSocket constructor");
  assert.equal(chooseTransport({ ...base, preference: "longpoll" }), "longpoll");
  assert.equal(chooseTransport({ ...base, preference: "websocket", wsFailures: 9 }), "websocket");
});

test("ids and tokens", () => {
  assert.equal(directConv("bob", "alice"), "d:alice:bob");
  assert.equal(directConv("Bob", "alice"), "d:Bob:alice");
  const p = Buffer.from(JSON.stringify({ sub: "alice", dev: "web", exp: 5 })).toString("base64url");
  assert.deepEqual(tokenClaims(`x.${p}.y`), { sub: "alice", dev: "web", exp: 5 });
});

// A scripted fake server, only for the client's decisions that a real
// server cannot be made to take on cue (the integration tests use the real one).
function fakeWS(script) {
  return class {
    constructor(url) { this.url = url; this.readyState = 0; this.sent = []; script.sockets.push(this); setTimeout(() => script.onOpen(this), 1); }
    send(s) { this.sent.push(JSON.parse(s)); script.onSend?.(this, JSON.parse(s)); }
    close() { if (this.readyState === 3) return; this.readyState = 3; setTimeout(() => this.onclose?.({ code: 1000 }), 1); }
    deliver(f) { this.onmessage?.({ data: JSON.stringify(f) }); }
  };
}
const tok = (sub) => `h.${Buffer.from(JSON.stringify({ sub, dev: "t", exp: 4102444800 })).toString("base64url")}.s`;

test("client: a WebSocket that cannot be established falls back to long-poll; outbox goes over HTTP", async () => {
  const script = { sockets: [], onOpen: (ws) => { ws.readyState = 3; ws.onclose?.({ code: 1006 }); } };
  const calls = [];
  const fetchFn = async (url, init) => {
    calls.push(`${init?.method ?? "GET"} ${new URL(url).pathname}`);
    if (url.includes("/chat/poll")) { await wait(30); return new Response(JSON.stringify({ events: [], cursor: 0 }), { status: 200 }); }
    if (url.includes("/chat/send")) {
      const f = JSON.parse(init.body);
      return new Response(JSON.stringify({ type: "ack", client_id: f.client_id, id: "9", conv: "d:alice:bob", seq: 1, ts: 1 }), { status: 200 });
    }
    return new Response("{}", { status: 404 });
  };
  const c = new ChatClient({ url: "http://x", token: tok("alice"), WebSocket: fakeWS(script), fetch: fetchFn, storage: new MemoryStorage() });
  const states = [];
  c.on("state", (s) => states.push(s));
  await c.start();
  const ack = await c.send({ to: "bob" }, "hi");
  assert.equal(ack.seq, 1);
  assert.ok(states.includes("longpoll"), states.join());
  assert.equal(script.sockets.length, 1, "one WebSocket attempt, then long-poll");
  assert.ok(calls.includes("POST /chat/send"));
  assert.deepEqual(c.messages("d:alice:bob").map((m) => [m.seq, m.state]), [[1, "sent"]]);
  await c.stop();
});

test("client: resends the same client_id after a reconnect; reconnect frames reconnect at once", async () => {
  const script = {
    sockets: [],
    onOpen: (ws) => { ws.readyState = 1; ws.deliver({ type: "hello", user: "alice", device: "t", cursor: 0, heartbeat: 30 }); },
  };
  const storage = new MemoryStorage();
  const c = new ChatClient({ url: "http://x", token: tok("alice"), WebSocket: fakeWS(script), storage,
                             fetch: async () => new Response("{}", { status: 503 }) });
  await c.start();
  await wait(10);
  const p = c.send({ to: "bob" }, "hello");
  await wait(10);
  const first = script.sockets[0].sent.find((f) => f.type === "send");
  assert.ok(first);
  const t0 = Date.now();
  script.sockets[0].deliver({ type: "reconnect" });       // drain: no ack came
  await wait(700);
  assert.equal(script.sockets.length, 2, "reconnected");
  assert.ok(Date.now() - t0 < 1000);
  const second = script.sockets[1].sent.find((f) => f.type === "send");
  assert.equal(second.client_id, first.client_id, "the identical frame again");
  script.sockets[1].deliver({ type: "ack", client_id: first.client_id, id: "77", conv: "d:alice:bob", seq: 4, ts: 1 });
  assert.equal((await p).id, "77");
  // a replay of the own message and of a foreign one twice: each shown once
  script.sockets[1].deliver({ cursor: 1, type: "msg", id: "77", conv: "d:alice:bob", seq: 4, from: "alice", to: "bob", body: "hello", kind: "text", ts: 1 });
  script.sockets[1].deliver({ cursor: 2, type: "msg", id: "78", conv: "d:alice:bob", seq: 5, from: "bob", to: "alice", body: "yo", kind: "text", ts: 2 });
  script.sockets[1].deliver({ cursor: 2, type: "msg", id: "78", conv: "d:alice:bob", seq: 5, from: "bob", to: "alice", body: "yo", kind: "text", ts: 2 });
  script.sockets[1].deliver({ cursor: 3, type: "receipt", conv: "d:alice:bob", status: "delivered", by: "bob", seq: 4, ts: 3 });
  assert.deepEqual(c.messages("d:alice:bob").map((m) => [m.seq, m.state ?? null]), [[4, "delivered"], [5, null]]);
  await wait(150);
  assert.ok(script.sockets[1].sent.some((f) => f.type === "ack" && f.cursor === 3), "cursor acked");
  assert.equal(await storage.get("ngx-chat:alice:t:cursor"), 3, "cursor persisted");
  await c.stop();
});

test("client: after a reconnect the delivered and read pointers are read (delivered receipts are live only)", async () => {
  const script = {
    sockets: [],
    onOpen: (ws) => { ws.readyState = 1; ws.deliver({ type: "hello", user: "alice", device: "t", cursor: 0, heartbeat: 30 }); },
  };
  const asked = [];
  const fetchFn = async (url) => {
    const u = new URL(url);
    if (u.pathname === "/chat/receipts") {
      asked.push(`${u.searchParams.get("conv")} ${u.searchParams.get("seq")}`);
      return new Response(JSON.stringify({ conv: "d:alice:bob", seq: 2, delivered: [], read: [],
                                           pointers: { bob: { delivered: 1, read: 0 } } }), { status: 200 });
    }
    return new Response("{}", { status: 404 });
  };
  const c = new ChatClient({ url: "http://x", token: tok("alice"), WebSocket: fakeWS(script), fetch: fetchFn,
                             storage: new MemoryStorage() });
  await c.start();
  await wait(10);
  for (const seq of [1, 2]) {
    const p = c.send({ to: "bob" }, `m${seq}`);
    await wait(5);
    const f = script.sockets[0].sent.filter((x) => x.type === "send").pop();
    script.sockets[0].deliver({ type: "ack", client_id: f.client_id, id: `i${seq}`, conv: "d:alice:bob", seq, ts: seq });
    await p;
  }
  assert.deepEqual(c.messages("d:alice:bob").map((m) => m.state), ["sent", "sent"]);
  assert.deepEqual(asked, [], "nothing to ask on the first hello");
  script.sockets[0].deliver({ type: "reconnect" });
  await wait(700);
  assert.equal(script.sockets.length, 2, "reconnected");
  assert.deepEqual(asked, ["d:alice:bob 2"], "the newest own message's conversation");
  assert.deepEqual(c.messages("d:alice:bob").map((m) => m.state), ["delivered", "sent"], "the pointer, not just seq 2");
  await c.stop();
});

test("client: on long-poll it tries WebSocket again after wsRetryMs and moves back to it", async () => {
  let fail = true;
  const script = {
    sockets: [],
    onOpen: (ws) => {
      if (fail) { ws.readyState = 3; ws.onclose?.({ code: 1006 }); return; }
      ws.readyState = 1;
      ws.deliver({ type: "hello", user: "alice", device: "t", cursor: 0, heartbeat: 30 });
    },
  };
  const fetchFn = async (url, init) => {
    await new Promise((r) => setTimeout(r, 20));
    return new Response(JSON.stringify({ events: [], cursor: 0 }), { status: 200 });
  };
  const c = new ChatClient({ url: "http://x", token: tok("alice"), WebSocket: fakeWS(script), fetch: fetchFn,
                             storage: new MemoryStorage(), wsRetryMs: 150 });
  const states = [];
  c.on("state", (s) => states.push(s));
  await c.start();
  await wait(60);
  assert.equal(c.state, "longpoll");
  fail = false;                                      // the proxy lets upgrades through again
  await wait(400);
  assert.equal(c.state, "websocket", states.join());
  assert.ok(script.sockets.length >= 2);
  await c.stop();
});

test("client: network down on both transports keeps trying WebSocket first", async () => {
  const script = { sockets: [], onOpen: (ws) => { ws.readyState = 3; ws.onclose?.({ code: 1006 }); } };
  const c = new ChatClient({ url: "http://x", token: tok("alice"), WebSocket: fakeWS(script), storage: new MemoryStorage(),
                             fetch: async () => { throw new TypeError("network down"); },
                             backoffMinMs: 20, backoffMaxMs: 40 });
  await c.start();
  await wait(300);
  // each round: a WebSocket attempt, then one poll; never stuck on long-poll
  assert.ok(script.sockets.length >= 3, `${script.sockets.length} WebSocket attempts`);
  await c.stop();
});

test("client: dropConnection on a dead network leaves websocket at once; the old socket's frames are ignored", async () => {
  const script = {
    sockets: [],
    onOpen: (ws) => { ws.readyState = 1; ws.deliver({ type: "hello", user: "alice", device: "t", cursor: 0, heartbeat: 30 }); },
  };
  const Dead = class extends fakeWS(script) {
    close() { this.readyState = 2; }                       // the close handshake never completes: no onclose
  };
  const c = new ChatClient({ url: "http://x", token: tok("alice"), WebSocket: Dead, storage: new MemoryStorage(),
                             fetch: async () => new Response("{}", { status: 503 }) });
  await c.start();
  await wait(10);
  assert.equal(c.state, "websocket");
  const old = script.sockets[0];
  c.dropConnection();
  await wait(5);                                           // the loop runs on (no onclose ever comes)
  assert.notEqual(c.state, "websocket", "the attempt ended without its onclose");
  old.deliver({ cursor: 1, type: "msg", id: "90", conv: "d:alice:bob", seq: 1, from: "bob", to: "alice", body: "late", kind: "text", ts: 1 });
  assert.deepEqual(c.messages("d:alice:bob"), [], "a frame of the dropped socket is not handled");
  await c.stop();
});
