// The SDK against a real stack (nginx + module + workers + Redis/Kafka +
// FerretDB). Run by t/test_clients.py with CHAT_HTTP_URL and CHAT_JWT_SECRET
// of the stack pytest started; or by hand against `scripts/stack up`:
//   set -a; . .stack/env; set +a; node --test clients/js/test/integration/
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { WebSocket } from "ws";
import { ChatClient, MemoryStorage, directConv } from "../../dist/index.js";

const HTTP = process.env.CHAT_HTTP_URL?.replace(/\/chat\/?$/, "");
const SECRET = process.env.CHAT_JWT_SECRET;
if (!HTTP || !SECRET) throw new Error("CHAT_HTTP_URL and CHAT_JWT_SECRET must name a running stack");

const run = randomBytes(3).toString("hex");
const uid = (name) => `${name}-${run}`;
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
function token(sub, dev = "t", ttl = 3600, secret = SECRET) {
  const h = b64({ alg: "HS256", typ: "JWT" });
  const p = b64({ sub, dev, exp: Math.floor(Date.now() / 1000) + ttl });
  const s = createHmac("sha256", secret).update(`${h}.${p}`).digest("base64url");
  return `${h}.${p}.${s}`;
}

const clients = [];
function mk(user, o = {}) {
  const c = new ChatClient({
    url: HTTP, token: () => token(user, o.dev ?? "t"), WebSocket, storage: o.storage ?? new MemoryStorage(),
    typingExpiryMs: 800, presenceDebounceMs: 0, backoffMinMs: 200, backoffMaxMs: 2000, ...o,
  });
  clients.push(c);
  return c;
}
after(async () => { for (const c of clients) await c.stop(); });

const until = async (what, f, ms = 10000) => {
  const t0 = Date.now();
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
};
const connected = (c, s = "websocket") => until(`${c.user} ${s}`, () => c.state === s);
const bodies = (c, conv) => c.messages(conv).filter((m) => m.type === "msg").map((m) => m.body);

test("WebSocket: ordered exactly-once delivery, ticks sent -> delivered -> read", async () => {
  const [a, b] = [uid("alice"), uid("bob")];
  const ca = mk(a), cb = mk(b);
  const got = [];
  cb.on("message", (m) => got.push(m.body));
  await ca.start(); await cb.start();
  await connected(ca); await connected(cb);
  const acks = await Promise.all(["one", "two", "three"].map((t) => ca.send({ to: b }, t)));
  assert.deepEqual(acks.map((x) => x.seq), [1, 2, 3]);
  const conv = directConv(a, b);
  await until("bob has 3", () => bodies(cb, conv).length === 3);
  assert.deepEqual(bodies(cb, conv), ["one", "two", "three"]);
  assert.deepEqual(got, ["one", "two", "three"], "each message event once, in order");
  await until("delivered", () => ca.messages(conv).every((m) => m.state === "delivered"));
  await cb.markRead(conv, 3);
  await until("read", () => ca.messages(conv).every((m) => m.state === "read"));
  assert.equal(ca.conversations.find((c) => c.conv === conv)?.last_seq, 3);
  // another device of alice (or the same after a reload) reads the ticks from the server
  const again = mk(a, { dev: "t2" });
  await again.start();
  await until("history with blue ticks", async () => {
    await again.loadHistory(conv);
    await new Promise((r) => setTimeout(r, 100));
    const ms = again.messages(conv);
    return ms.length === 3 && ms.every((m) => m.mine && m.state === "read");
  });
});

test("offline device catches up once, in order, from its persisted cursor", async () => {
  const [a, b] = [uid("alice2"), uid("bob2")];
  const storage = new MemoryStorage();
  const ca = mk(a);
  let cb = mk(b, { storage });
  await ca.start(); await cb.start();
  await connected(ca); await connected(cb);
  await ca.send({ to: b }, "before");
  const conv = directConv(a, b);
  await until("bob got it", () => bodies(cb, conv).length === 1);
  await new Promise((r) => setTimeout(r, 300));           // the ack goes out
  await cb.stop();
  for (let i = 1; i <= 5; i++) await ca.send({ to: b }, `while away ${i}`);
  cb = mk(b, { storage });
  const got = [];
  cb.on("message", (m) => got.push(m.body));
  await cb.start();
  await until("5 replayed", () => got.length >= 5);
  await new Promise((r) => setTimeout(r, 500));
  assert.deepEqual(got, [1, 2, 3, 4, 5].map((i) => `while away ${i}`), "exactly once, in order; 'before' not again");
});

test("long-poll transport: receive, send over HTTP, receipts", async () => {
  const [a, b] = [uid("alice3"), uid("bob3")];
  const ca = mk(a), cb = mk(b, { transport: "longpoll", pollTimeout: 5 });
  await ca.start(); await cb.start();
  await connected(ca); await connected(cb, "longpoll");
  const conv = directConv(a, b);
  await ca.send({ to: b }, "to a poller");
  await until("poller got it", () => bodies(cb, conv).includes("to a poller"));
  const ack = await cb.send({ to: a }, "from a poller");
  assert.equal(ack.seq, 2);
  await until("alice got the reply", () => bodies(ca, conv).includes("from a poller"));
  await until("delivered via the poll cursor", () => ca.messages(conv)[0].state === "delivered");
  await cb.markRead(conv, 1);
  await until("read", () => ca.messages(conv)[0].state === "read");
});

test("falls back to long-poll when the WebSocket cannot be established, and still chats", async () => {
  const [a, b] = [uid("alice4"), uid("bob4")];
  const ca = mk(a);
  const cb = mk(b, { wsUrl: HTTP.replace(/^http/, "ws") + "/chat/no-websocket-here", pollTimeout: 5 });
  await ca.start(); await cb.start();
  await connected(ca); await connected(cb, "longpoll");
  const conv = directConv(a, b);
  await cb.send({ to: a }, "over http");
  await until("alice got it", () => bodies(ca, conv).includes("over http"));
  await ca.send({ to: b }, "back to the poller");
  await until("poller got it", () => bodies(cb, conv).includes("back to the poller"));
});

test("outbox survives a restart: an unsent message is sent once by the next run", async () => {
  const [a, b] = [uid("alice5"), uid("bob5")];
  const storage = new MemoryStorage();
  // a server that is not there: the send stays in the outbox
  const dead = mk(a, { storage, url: "http://127.0.0.1:9", wsUrl: "ws://127.0.0.1:9/chat/ws" });
  await dead.start();
  const p = dead.send({ to: b }, "written offline");
  p.catch(() => {});
  await until("persisted", async () => ((await storage.get(`ngx-chat:${a}:t:outbox`)) ?? []).length === 1);
  assert.equal(dead.messages(directConv(a, b))[0].state, "pending");
  await dead.stop();

  const cb = mk(b);
  const got = [];
  cb.on("message", (m) => got.push(m.body));
  await cb.start(); await connected(cb);
  const ca = mk(a, { storage });
  const acks = [];
  ca.on("ack", (x) => acks.push(x));
  await ca.start();
  await until("sent by the new run", () => acks.length === 1);
  await until("bob got it", () => got.length === 1);
  await new Promise((r) => setTimeout(r, 500));
  assert.deepEqual(got, ["written offline"]);
  assert.equal(ca.pending().length, 0);
  assert.deepEqual((await storage.get(`ngx-chat:${a}:t:outbox`)), []);
});

test("token provider is asked again after a 401", async () => {
  const a = uid("alice6");
  let calls = 0;
  const c = mk(a, {
    transport: "longpoll",
    token: () => (++calls === 1 ? token(a, "t", 3600, "not-the-secret") : token(a)),
  });
  await c.start();
  await connected(c, "longpoll");
  assert.ok(calls >= 2, `provider called ${calls} times`);
  const ack = await c.send({ to: a }, "note to self");
  assert.equal(ack.conv, `d:${a}:${a}`);
});

test("groups, conversation list with unread counts, history pages", async () => {
  const [a, b, c] = [uid("ann"), uid("ben"), uid("cat")];
  const ca = mk(a), cb = mk(b), cc = mk(c);
  await Promise.all([ca.start(), cb.start(), cc.start()]);
  await connected(ca); await connected(cb); await connected(cc);
  const g = await ca.createGroup("ops", [b, c]);
  assert.deepEqual(g.members, [a, b, c].sort());
  const conv = `g:${g.group}`;
  for (let i = 1; i <= 4; i++) await ca.send({ group: g.group }, `g${i}`);
  await until("ben has the group messages", () => bodies(cb, conv).length === 4);
  assert.deepEqual(bodies(cb, conv), ["g1", "g2", "g3", "g4"]);
  await cc.leaveGroup(g.group);
  await until("left shows in ann's group", () => ca.groupInfo(g.group)?.members.length === 2);
  await until("persisted", async () => {
    const list = await cb.loadConversations();
    const s = list.find((x) => x.conv === conv);
    return s && s.last_seq >= 4 && s.unread === 4 && s.name === "ops";
  });
  // history is written with its batch and the list up to
  // persist_state_delay_ms later (PROTOCOL 12): wait for both
  await until("in history", async () => (await cb.loadHistory(conv, { limit: 10 })).messages.length >= 5);
  await cb.markRead(conv, 5);
  await until("unread 0", () => cb.conversations.find((x) => x.conv === conv)?.unread === 0);
  await until("group read receipt", () => ca.messages(conv).filter((m) => m.mine && m.type === "msg").every((m) => m.state === "read"))
    .catch((e) => { throw new Error(`${e.message}: ${JSON.stringify(ca.messages(conv).map((m) => [m.seq, m.type, m.state]))} members ${ca.groupInfo(g.group)?.members}`); });

  // history pages, newest first from the server, shown oldest first
  const fresh = mk(b, { dev: "other" });
  await fresh.start();
  const page = await fresh.loadHistory(conv, { limit: 2 });
  assert.equal(page.messages.length, 2);
  while (await fresh.loadOlder(conv, 2)) { /* page back */ }
  const seqs = fresh.messages(conv).map((m) => m.seq);
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y));
  assert.deepEqual(bodies(fresh, conv), ["g1", "g2", "g3", "g4"]);
});

test("typing shows and expires; presence online and last seen", async () => {
  const [a, b] = [uid("alice7"), uid("bob7")];
  const ca = mk(a), cb = mk(b);
  await ca.start(); await cb.start();
  await connected(ca); await connected(cb);
  const seen = [];
  cb.on("presence", (p) => seen.push(p));
  cb.watch([a]);
  await until("alice online", () => cb.presenceOf(a)?.online === true);
  const conv = directConv(a, b);
  const typing = [];
  cb.on("typing", (t) => typing.push(t.active));
  await ca.typing({ to: b });
  await ca.typing({ to: b });                          // throttled: one frame
  await until("typing shown", () => cb.typingIn(conv).includes(a));
  await until("typing expired", () => cb.typingIn(conv).length === 0, 3000);
  assert.deepEqual(typing, [true, false]);
  await ca.stop();
  await until("alice offline with last seen", () => cb.presenceOf(a)?.online === false && cb.presenceOf(a)?.last_seen > 0);
});
