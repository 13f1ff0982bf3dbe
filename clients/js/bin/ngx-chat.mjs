#!/usr/bin/env node
// ngx-chat terminal client: connect as a user, send, receive, see receipts,
// presence and typing. Built on the SDK (clients/js/dist: `make clients`).
//
//   node clients/js/bin/ngx-chat.mjs --url http://127.0.0.1:17104 --user alice --to bob
//
// Token: --token JWT, or $CHAT_TOKEN, else the local dev stack's sign-in
// (GET /dev/token, only on the stack started by scripts/stack).
import readline from "node:readline";
import { ChatClient, MemoryStorage, directConv, peerOf } from "../dist/index.js";

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : def;
};
if (args.includes("--help") || args.includes("-h")) {
  console.log(`usage: ngx-chat --user NAME [--to USER | --group GROUP] [--url http://127.0.0.1:17104]
                [--device cli] [--token JWT] [--transport auto|websocket|longpoll]
Type a line to send it. Commands: /to USER, /group ID, /new NAME [USER,USER...],
/add USER, /list, /history, /watch USER, /who, /help, /quit`);
  process.exit(0);
}

const envUrl = process.env.CHAT_HTTP_URL ? process.env.CHAT_HTTP_URL.replace(/\/chat\/?$/, "") : undefined;
const url = opt("url", envUrl ?? "http://127.0.0.1:17104").replace(/\/+$/, "");
const user = opt("user", process.env.USER_NAME);
const device = opt("device", "cli");
const fixedToken = opt("token", process.env.CHAT_TOKEN);
if (!user && !fixedToken) {
  console.error("ngx-chat: --user NAME is required (or --token)");
  process.exit(2);
}

async function token() {
  if (fixedToken) return fixedToken;
  const r = await fetch(`${url}/dev/token?user=${encodeURIComponent(user)}&device=${encodeURIComponent(device)}`);
  if (!r.ok) throw new Error(`dev sign-in refused (HTTP ${r.status}); pass --token`);
  return (await r.json()).token;
}

// Node 22+ has a WebSocket; Node 20 uses the `ws` package (npm ci in clients/js).
let WS = globalThis.WebSocket;
if (!WS) {
  try { WS = (await import("ws")).WebSocket; } catch { WS = undefined; }
}

const client = new ChatClient({
  url, token, WebSocket: WS, storage: new MemoryStorage(),
  transport: opt("transport", "auto"),
});

let current = null;
let rl = null;
const to = opt("to"), group = opt("group");
const tty = process.stdout.isTTY;
const out = (s) => {
  if (tty) { readline.clearLine(process.stdout, 0); readline.cursorTo(process.stdout, 0); }
  process.stdout.write(s + "\n");
  if (tty) rl?.prompt(true);
};
const readUpTo = new Map();     // conv \n user -> highest read seq seen
const hm = (ms) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

client.on("state", (s) => {
  if (s === "websocket" || s === "longpoll") out(`* connected (${s}) as ${client.user}/${client.device}`);
  else if (s === "offline") out("* offline, reconnecting…");
});
client.on("message", (m) => {
  const where = m.conv === current ? "" : `[${m.conv}] `;
  out(`${where}#${m.seq} ${m.from}: ${m.body}`);
  if (m.conv === current) client.markRead(m.conv, m.seq).catch(() => {});
});
client.on("ack", (a) => out(`  ✓ sent #${a.seq}`));
client.on("sendFailed", (e, err) => out(`  ! not sent (${err.code}): ${e.body}`));
client.on("receipt", (r) => {
  if (r.by === client.user) return;
  const k = `${r.conv}\n${r.by}`;
  if (r.status === "read") readUpTo.set(k, Math.max(readUpTo.get(k) ?? 0, r.seq));
  else if ((readUpTo.get(k) ?? 0) >= r.seq) return;      // read already says it
  out(`  ${r.status === "read" ? "✓✓ read (blue)" : "✓✓ delivered"} up to #${r.seq} by ${r.by}`);
});
client.on("presence", (p) => out(`* ${p.user} is ${p.online ? "online" : p.last_seen ? `offline, last seen ${hm(p.last_seen)}` : "offline"}`));
client.on("typing", (t) => { if (t.active) out(`* ${t.from} is typing…`); });
client.on("group", (e) => out(`* group ${e.group}: ${e.by} ${e.event} ${e.members.join(", ")}`));
client.on("error", (e) => out(`* error ${e.code}: ${e.message}`));

function target() {
  if (!current) return null;
  return current.startsWith("g:") ? { group: current.slice(2) } : { to: peerOf(current, client.user) };
}

async function openConv(conv) {
  current = conv;
  const peer = peerOf(conv, client.user);
  if (peer && peer !== client.user) client.watch([peer]);
  out(`* talking in ${conv}`);
  try {
    await client.loadHistory(conv, { limit: 10 });
    for (const m of client.messages(conv).slice(-10)) {
      if (m.type === "msg") out(`  #${m.seq} ${m.from}: ${m.body}${m.mine ? `  (${m.state})` : ""}`);
    }
    const theirs = client.messages(conv).filter((m) => !m.mine && m.seq > 0);
    if (theirs.length) client.markRead(conv, theirs[theirs.length - 1].seq).catch(() => {});
  } catch { /* history is optional */ }
}

await client.start();
if (to) await openConv(directConv(client.user || user, to));
else if (group) await openConv(`g:${group}`);
else out("* /to USER to start talking (/help for commands)");
// readline only now, with its line handler in the same turn: what was typed
// while the history loaded waited in stdin (paused until a reader comes); a
// line readline emits before its handler is attached would be lost
rl = readline.createInterface({ input: process.stdin, output: tty ? process.stdout : undefined, prompt: "> " });
if (process.stdin.isTTY) {
  process.stdin.on("keypress", () => { if (current) client.typing(target()).catch(() => {}); });
}
if (tty) rl.prompt();

rl.on("line", async (line) => {
  const [cmd, ...rest] = line.trim().split(/\s+/);
  try {
    if (!line.trim()) { /* nothing */ }
    else if (cmd === "/quit") { await client.stop(); process.exit(0); }
    else if (cmd === "/help") out("/to USER, /group ID, /new NAME [USER,USER], /add USER, /list, /history, /watch USER, /who, /quit");
    else if (cmd === "/to") await openConv(directConv(client.user, rest[0]));
    else if (cmd === "/group") await openConv(`g:${rest[0]}`);
    else if (cmd === "/new") {
      const g = await client.createGroup(rest[0], (rest[1] ?? "").split(",").filter(Boolean));
      out(`* created group ${g.group} (${g.members.join(", ")})`);
      await openConv(`g:${g.group}`);
    } else if (cmd === "/add") {
      if (!current?.startsWith("g:")) out("* open a group first");
      else out(`* members: ${(await client.addMembers(current.slice(2), rest)).members.join(", ")}`);
    } else if (cmd === "/list") {
      for (const c of await client.loadConversations()) out(`  ${c.conv}${c.name ? ` "${c.name}"` : ""}  unread ${c.unread}  ${c.last ? `${c.last.from}: ${c.last.body}` : ""}`);
    } else if (cmd === "/history") { if (current) await openConv(current); }
    else if (cmd === "/watch") client.watch(rest);
    else if (cmd === "/who") { for (const u of rest) { const p = client.presenceOf(u); out(`* ${u}: ${p ? (p.online ? "online" : "offline") : "unknown (use /watch)"}`); } }
    else if (cmd.startsWith("/")) out(`* unknown command ${cmd}`);
    else if (!current) out("* /to USER first");
    else {
      const body = line;
      client.send(target(), body).catch(() => { /* sendFailed says it */ });
    }
  } catch (e) { out(`* ${e.code ?? "error"}: ${e.message}`); }
  if (tty) rl.prompt();
});
rl.on("close", async () => { await client.stop(); process.exit(0); });
