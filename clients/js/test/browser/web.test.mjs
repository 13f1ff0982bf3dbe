// The web app (clients/web) in a real browser (Debian's chromium, headless,
// driven by puppeteer-core) against a real stack. Run by t/test_clients.py;
// by hand: set -a; . .stack/env; set +a; node --test clients/js/test/browser/
// CHAT_SHOTS_DIR: where the screenshots go (docs/ when run by the tests).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { randomBytes } from "node:crypto";
import puppeteer from "puppeteer-core";

const BASE = process.env.CHAT_HTTP_URL?.replace(/\/chat\/?$/, "");
if (!BASE) throw new Error("CHAT_HTTP_URL must name a running stack");
const PORT = new URL(BASE).port;
const SHOTS = process.env.CHAT_SHOTS_DIR;
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const run = randomBytes(3).toString("hex");
const uid = (n) => `${n}-${run}`;

let browser;
before(async () => {
  browser = await puppeteer.launch({
    executablePath: CHROMIUM, headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--window-size=1000,640"],
    defaultViewport: { width: 1000, height: 640 },
  });
});
after(async () => { await browser?.close(); });

async function page(opts = {}) {
  const ctx = await browser.createBrowserContext();    // its own storage: another device
  const p = await ctx.newPage();
  p.on("pageerror", (e) => console.error("page error:", e.message));
  p.on("console", (m) => { if (m.type() === "error" || m.type() === "warn") console.error("console:", m.text()); });
  if (opts.blockWebSocket) {
    // what a proxy that refuses upgrades looks like to the page
    await p.evaluateOnNewDocument(() => {
      window.WebSocket = class {
        constructor() { this.readyState = 3; setTimeout(() => { this.onerror?.({}); this.onclose?.({ code: 1006 }); }, 10); }
        send() { throw new Error("closed"); }
        close() {}
      };
    });
  }
  return p;
}

async function signIn(p, name) {
  await p.goto(`${BASE}/`);
  await p.waitForSelector("#signin-name", { visible: true });
  await p.type("#signin-name", name);
  await p.click("#signin button");
  await p.waitForFunction(() => ["websocket", "longpoll"].includes(document.querySelector("#conn")?.dataset.state), { timeout: 15000 });
}

async function openChat(p, peer) {
  await p.type("#new-chat-user", peer);
  await p.click("#new-chat button");
  await p.waitForSelector("#composer:not([hidden])");
}

async function say(p, text) {
  await p.type("#text", text);
  await p.click("#composer button");
}

const bodies = (p) => p.$$eval("#msgs .msg .body", (els) => els.map((e) => e.textContent));
const waitBodies = (p, want, timeout = 15000) =>
  p.waitForFunction((w) => {
    const got = [...document.querySelectorAll("#msgs .msg .body")].map((e) => e.textContent);
    return w.every((x) => got.includes(x));
  }, { timeout }, want);
const tickOf = (p, text) => p.evaluate((t) => {
  const m = [...document.querySelectorAll("#msgs .msg")].find((e) => e.querySelector(".body")?.textContent === t);
  return m?.querySelector(".tick")?.dataset.state ?? null;
}, text);
// state: one state, or several ("sent or beyond" when later ticks may come first)
const waitTick = (p, text, state) => p.waitForFunction((t, s) => {
  const m = [...document.querySelectorAll("#msgs .msg")].find((e) => e.querySelector(".body")?.textContent === t);
  return [].concat(s).includes(m?.querySelector(".tick")?.dataset.state);
}, { timeout: 15000 }, text, state);
const ACKED = ["sent", "delivered", "read"];
const shot = async (p, name) => { if (SHOTS) await p.screenshot({ path: `${SHOTS}/${name}` }); };

const alice = uid("alice"), bob = uid("bob"), carol = uid("carol");
let pa, pb;

test("two users chat; ticks go sent -> delivered -> read; typing and presence show", async () => {
  pa = await page();
  await pa.goto(`${BASE}/`);
  await pa.waitForSelector("#signin-name", { visible: true });
  await shot(pa, "web-signin.png");
  await signIn(pa, alice);
  await openChat(pa, bob);
  await say(pa, "hello bob");
  await waitTick(pa, "hello bob", "sent");              // ✓: bob has no device yet
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(await tickOf(pa, "hello bob"), "sent");

  pb = await page();
  await signIn(pb, bob);                                 // his device connects and acks
  await waitTick(pa, "hello bob", "delivered");         // ✓✓
  await pb.waitForSelector(`#convs li[data-conv="d:${alice < bob ? alice : bob}:${alice < bob ? bob : alice}"]`);
  assert.equal(await pb.$eval("#convs .unread", (e) => e.textContent), "1", "unread count in the list");
  await pb.click("#convs li");                          // opening it reads it
  await waitBodies(pb, ["hello bob"]);
  await waitTick(pa, "hello bob", "read");              // blue
  assert.equal(await pa.$eval(".tick[data-state=read]", (e) => getComputedStyle(e).color), "rgb(83, 189, 235)");

  await pb.waitForFunction(() => document.querySelector("#chat-sub").textContent === "online", { timeout: 10000 });
  await pb.type("#text", "typ");                          // typing reaches alice
  await pa.waitForFunction((b) => document.querySelector("#typing").textContent.includes(b), { timeout: 10000 }, bob);
  await pb.click("#composer button");
  await waitBodies(pa, ["typ"]);
  await say(pa, "see you ✓✓");
  await waitBodies(pb, ["see you ✓✓"]);
  await waitTick(pa, "see you ✓✓", "read");
  await shot(pa, "web-chat.png");
});

test("a device cut off catches up exactly once, in order, with an offline banner", async () => {
  await pb.setOfflineMode(true);
  await pb.evaluate(() => window.chat.dropConnection());
  await pb.waitForSelector("#banner:not([hidden])", { timeout: 10000 });
  for (let i = 1; i <= 3; i++) await say(pa, `while you were away ${i}`);
  await waitTick(pa, "while you were away 3", "sent");
  await shot(pb, "web-offline.png");
  await pb.setOfflineMode(false);
  await pb.evaluate(() => window.chat.dropConnection());   // retry now instead of after the backoff
  await waitBodies(pb, [1, 2, 3].map((i) => `while you were away ${i}`));
  await pb.waitForSelector("#banner[hidden]", { timeout: 10000 });
  await new Promise((r) => setTimeout(r, 800));
  const got = await bodies(pb);
  assert.deepEqual(got, ["hello bob", "typ", "see you ✓✓", ...[1, 2, 3].map((i) => `while you were away ${i}`)],
                   "each once, in seq order");
  const seqs = await pb.$$eval("#msgs .msg", (els) => els.map((e) => Number(e.dataset.seq)));
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
  await waitTick(pa, "while you were away 3", "read");
});

test("with WebSocket blocked the page falls back to long-poll and still chats; a reload sends the outbox once", async () => {
  const pc = await page({ blockWebSocket: true });
  await signIn(pc, carol);
  assert.equal(await pc.$eval("#conn", (e) => e.dataset.state), "longpoll");
  await openChat(pc, alice);
  await say(pc, "hi from long-poll");
  await waitTick(pc, "hi from long-poll", ACKED);
  await openChat(pa, carol);
  await waitBodies(pa, ["hi from long-poll"]);
  await say(pa, "answer to long-poll");
  await waitBodies(pc, ["answer to long-poll"]);
  await waitTick(pc, "hi from long-poll", "read");

  // the send cannot get out: it waits in the outbox (IndexedDB) with a clock
  await pc.setRequestInterception(true);
  const block = (rq) => (rq.url().includes("/chat/send") ? rq.abort("failed") : rq.continue());
  pc.on("request", block);
  await say(pc, "kept across a reload");
  await waitTick(pc, "kept across a reload", "pending");
  await new Promise((r) => setTimeout(r, 500));
  pc.off("request", block);
  await pc.setRequestInterception(false);
  await pc.reload();
  await pc.waitForFunction(() => document.querySelector("#conn")?.dataset.state === "longpoll", { timeout: 15000 });
  await waitTick(pc, "kept across a reload", ACKED).catch(async (e) => {
    const dbg = await pc.evaluate(() => JSON.stringify({ state: window.chat.state, pending: window.chat.pending(),
      hash: location.hash, msgs: [...document.querySelectorAll("#msgs .msg")].map((m) => m.textContent) }));
    throw new Error(`${e.message}: ${dbg}`);
  });
  await waitBodies(pa, ["kept across a reload"]);
  await new Promise((r) => setTimeout(r, 1000));
  const got = (await bodies(pa)).filter((b) => b === "kept across a reload");
  assert.equal(got.length, 1, "sent exactly once");
  await pc.close();
});

test("groups: create one in the web app, both members chat in it", async () => {
  await pa.click("#new-group-box summary");
  await pa.type("#new-group-name", "weekend");
  await pa.type("#new-group-members", bob);
  await pa.click("#new-group button");
  await pa.waitForFunction(() => document.querySelector("#chat-title").textContent.includes("weekend"), { timeout: 10000 });
  await say(pa, "group hello");
  await pb.waitForFunction(() => [...document.querySelectorAll("#convs .name")].some((e) => e.textContent.includes("weekend")), { timeout: 15000 });
  // found and clicked in one step inside the page: the list re-renders as
  // events arrive, and a handle taken before a render is detached after it
  await pb.waitForFunction(() => {
    const li = [...document.querySelectorAll("#convs li")].find((e) => e.textContent.includes("weekend"));
    if (li) li.click();
    return !!li && document.querySelector("#chat-title").textContent.includes("weekend");
  }, { timeout: 15000 });
  await waitBodies(pb, ["group hello"]);
  assert.ok((await pb.$eval("#chat-sub", (e) => e.textContent)).includes(alice), "members shown");
  await say(pb, "group answer");
  await waitBodies(pa, ["group answer"]);
  await waitTick(pa, "group hello", "read");
  await shot(pa, "web-group.png");
});

test("a page on another origin uses the HTTP endpoints with CORS; an origin not allowed is refused", async () => {
  // http://localhost:PORT is another origin than http://127.0.0.1:PORT, and the stack allows it
  const p = await page();
  await p.goto(`http://localhost:${PORT}/index.html`);
  const res = await p.evaluate(async (api, to) => {
    const tok = (await (await fetch(`/dev/token?user=cors-${to}&device=x`)).json()).token;
    const h = { Authorization: `Bearer ${tok}`, "Content-Type": "application/json" };
    const send = await fetch(`${api}/chat/send`, { method: "POST", headers: h, body: JSON.stringify({ client_id: "cors-1", to, body: "across origins" }) });
    const ack = await send.json();
    const poll = await fetch(`${api}/chat/poll?cursor=0&timeout=0`, { headers: h });
    const convs = await fetch(`${api}/chat/conversations`, { headers: h });
    const hist = await fetch(`${api}/chat/history?conv=${encodeURIComponent(ack.conv)}`, { headers: h });
    return { send: send.status, ack, poll: poll.status, convs: convs.status, hist: hist.status,
             cc: send.headers.get("Cache-Control") };
  }, BASE, alice);
  assert.equal(res.send, 200);
  assert.equal(res.ack.type, "ack");
  assert.equal(res.poll, 200);
  assert.equal(res.convs, 200);
  assert.equal(res.hist, 200);
  assert.equal(res.cc, "no-store");

  // a page served from an origin not in chat_allowed_origins
  const srv = http.createServer((q, r) => { r.setHeader("Content-Type", "text/html"); r.end("<!doctype html><title>other</title>"); });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  try {
    await p.goto(`http://127.0.0.1:${srv.address().port}/`);
    const refused = await p.evaluate(async (api) => {
      try {
        await fetch(`${api}/chat/send`, { method: "POST", headers: { Authorization: "Bearer x", "Content-Type": "application/json" }, body: "{}" });
        return "allowed";
      } catch (e) { return `refused: ${e.name}`; }
    }, BASE);
    assert.equal(refused, "refused: TypeError");
  } finally { srv.close(); }
  await p.close();
});
