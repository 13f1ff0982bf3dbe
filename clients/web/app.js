// The ngx-chat web app: plain DOM on the SDK (served at /sdk/ by the stack).
import { ChatClient, peerOf } from "/sdk/index.js";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const ID = /^[A-Za-z0-9._-]{1,64}$/;
const params = new URLSearchParams(location.search);

// One device id per browser profile, so two windows of one profile are one device.
let device = localStorage.getItem("ngx-chat-device");
if (!device) {
  device = "web-" + Math.random().toString(36).slice(2, 10);
  localStorage.setItem("ngx-chat-device", device);
}

let client = null;
let current = null;          // the open conversation id
let everConnected = false;

async function devToken(user) {
  // the local dev stack's sign-in (conf/dev-locations.conf); a real app
  // gets its token from its own login service instead
  const r = await fetch(`/dev/token?user=${encodeURIComponent(user)}&device=${encodeURIComponent(device)}`, { cache: "no-store" });
  if (!r.ok) throw new Error(`sign-in failed: HTTP ${r.status}`);
  return (await r.json()).token;
}

function showSignin() {
  $("signin").hidden = false;
  $("app").hidden = true;
}

$("signin").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("signin-name").value.trim();
  if (!ID.test(name)) return;
  localStorage.setItem("ngx-chat-user", name);
  start(name);
});

$("signout").addEventListener("click", async () => {
  localStorage.removeItem("ngx-chat-user");
  await client?.stop();
  location.reload();
});

function title(conv) {
  if (conv.startsWith("g:")) {
    const s = client.conversations.find((c) => c.conv === conv);
    return "# " + (s?.name ?? client.groupInfo(conv.slice(2))?.name ?? conv.slice(2));
  }
  return peerOf(conv, client.user) ?? conv;
}

function lastSeen(ms) {
  if (ms == null) return "offline";
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return "last seen " + (today ? "today at " : d.toLocaleDateString() + " ") +
    d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function renderConnection(state) {
  $("conn").dataset.state = state;
  $("conn").textContent = state;
  if (state === "websocket" || state === "longpoll") everConnected = true;
  const down = everConnected && (state === "offline" || state === "connecting");
  $("banner").hidden = !down;
}

function renderConvs() {
  const ul = $("convs");
  ul.textContent = "";
  const list = client.conversations;
  if (current && !list.some((c) => c.conv === current)) list.unshift({ conv: current, unread: 0, last: null });
  for (const c of list) {
    const li = el("li");
    li.dataset.conv = c.conv;
    if (c.conv === current) li.classList.add("active");
    const box = el("div");
    box.style.flex = "1";
    box.style.minWidth = "0";
    box.append(el("span", "name", title(c.conv)));
    const last = c.last ? (c.last.from === client.user ? "you: " : (c.conv.startsWith("g:") ? c.last.from + ": " : "")) + (c.last.body || "[media]") : "";
    box.append(el("span", "last", last));
    li.append(box, el("span", "unread", c.unread > 0 && c.conv !== current ? String(c.unread) : ""));
    li.addEventListener("click", () => open(c.conv));
    ul.append(li);
  }
}

const TICKS = { pending: "🕓", sent: "✓", delivered: "✓✓", read: "✓✓", failed: "!" };

function renderMsgs() {
  if (!current) return;
  const ol = $("msgs");
  const atBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 40;
  ol.textContent = "";
  const group = current.startsWith("g:");
  for (const m of client.messages(current)) {
    if (m.type === "group") {
      const who = m.members?.join(", ");
      const text = m.event === "created" ? `${m.by} created the group` : `${m.by} ${m.event} ${who}`;
      const li = el("li", "event", text);
      li.dataset.seq = m.seq;
      ol.append(li);
      continue;
    }
    const li = el("li", "msg" + (m.mine ? " mine" : ""));
    li.dataset.seq = m.seq;
    li.dataset.id = m.id;
    if (group && !m.mine) li.append(el("span", "from", m.from));
    li.append(el("span", "body", m.kind === "media" ? `${m.body} [${m.media?.url ?? "media"}]` : m.body));
    const meta = el("span", "meta", new Date(m.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
    if (m.mine) {
      const t = el("span", "tick", TICKS[m.state] ?? "");
      t.dataset.state = m.state;
      t.title = m.state;
      meta.append(t);
    }
    li.append(meta);
    ol.append(li);
  }
  if (atBottom) ol.scrollTop = ol.scrollHeight;
  markRead();
}

function renderHead() {
  if (!current) return;
  $("chat-title").textContent = title(current);
  const peer = peerOf(current, client.user);
  let sub = "";
  if (peer !== null) {
    const p = client.presenceOf(peer);
    sub = p ? (p.online ? "online" : lastSeen(p.last_seen)) : "";
  } else {
    const g = client.groupInfo(current.slice(2));
    sub = g ? g.members.join(", ") : "";
  }
  $("chat-sub").textContent = sub;
  const typers = client.typingIn(current);
  $("typing").textContent = typers.length ? `${typers.join(", ")} ${typers.length > 1 ? "are" : "is"} typing…` : "";
}

// Everything from others that is shown counts as read while the page is visible.
function markRead() {
  if (!current || document.visibilityState !== "visible") return;
  const theirs = client.messages(current).filter((m) => !m.mine && m.seq > 0);
  if (theirs.length) client.markRead(current, theirs[theirs.length - 1].seq).catch(() => {});
}
document.addEventListener("visibilitychange", markRead);

async function open(conv) {
  current = conv;
  $("composer").hidden = false;
  $("older").hidden = false;
  history.replaceState(null, "", "#" + encodeURIComponent(conv));
  const peer = peerOf(conv, client.user);
  if (peer !== null && peer !== client.user) client.watch([peer]);
  if (conv.startsWith("g:")) client.getGroup(conv.slice(2)).then(renderHead, () => {});
  renderConvs();
  renderHead();
  renderMsgs();
  try { await client.loadHistory(conv, { limit: 50 }); } catch { /* offline: live only */ }
  $("text").focus();
}

$("older").addEventListener("click", async () => {
  if (!current) return;
  const more = await client.loadOlder(current).catch(() => false);
  if (!more) $("older").hidden = true;
});

$("new-chat").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const u = $("new-chat-user").value.trim();
  if (!ID.test(u)) return;
  $("new-chat-user").value = "";
  const [a, b] = [client.user, u].sort();
  open(`d:${a}:${b}`);
});

$("new-group").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("new-group-name").value.trim();
  const members = $("new-group-members").value.split(/[\s,]+/).filter((x) => ID.test(x));
  try {
    const g = await client.createGroup(name, members);
    $("new-group-name").value = $("new-group-members").value = "";
    $("new-group-box").open = false;
    open(`g:${g.group}`);
  } catch (e) { alert(`could not create the group: ${e.message}`); }
});

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !current) return;
  $("text").value = "";
  client.send({ conv: current }, text).catch((e) => alert(`not sent: ${e.code ?? ""} ${e.message}`));
});

$("text").addEventListener("input", () => {
  if (current && $("text").value) client.typing({ conv: current }).catch(() => {});
});

async function start(user) {
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me").textContent = user;
  client = new ChatClient({
    url: location.origin,
    token: () => devToken(user),
    transport: params.get("transport") ?? "auto",
  });
  window.chat = client;       // for the browser tests and the console
  client.on("state", renderConnection);
  client.on("conversations", renderConvs);
  client.on("timeline", (conv) => { if (conv === current) renderMsgs(); renderConvs(); });
  client.on("typing", (t) => { if (t.conv === current) renderHead(); });
  client.on("presence", () => renderHead());
  client.on("group", () => { renderConvs(); renderHead(); });
  client.on("sendFailed", (e, err) => console.warn("send refused", err.code, e));
  client.on("behind", () => client.loadConversations().catch(() => {}));
  client.on("hello", () => client.loadConversations().catch(() => {}));
  client.on("state", (s) => { if (s === "longpoll") client.loadConversations().catch(() => {}); });
  await client.start();
  const hash = decodeURIComponent(location.hash.slice(1));
  if (hash) open(hash);
}

const saved = localStorage.getItem("ngx-chat-user");
if (saved && ID.test(saved)) start(saved); else showSignin();
