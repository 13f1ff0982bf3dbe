/**
 * ChatClient: one user on one device, over WebSocket or long-poll, keeping
 * the client side of PROTOCOL 9 so that an app cannot get it wrong.
 */
import { Backoff, drainJitter } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { Outbox, type OutboxEntry } from "./outbox.js";
import {
  directConv, FINAL_SEND_ERRORS, peerOf,
  type ConversationSummary, type ConvId, type ErrorFrame, type DeletedEvent, type GroupEvent, type GroupInfo,
  type HelloFrame, type HistoryPage, type Media, type MsgEvent, type PollAnswer,
  type PresenceFrame, type ReceiptEvent, type ReceiptsAnswer, type SendAck, type ServerFrame,
} from "./protocol.js";
import { defaultStorage, type ChatStorage } from "./storage.js";
import { itemFromEvent, Timelines, type MessageState, type TimelineItem } from "./timeline.js";

export type TokenProvider = () => string | Promise<string>;
export type ConnectionState = "idle" | "connecting" | "websocket" | "longpoll" | "offline" | "stopped";
export type TransportPreference = "auto" | "websocket" | "longpoll";

export interface ChatClientOptions {
  /** Base URL of the chat server, e.g. "https://chat.example.com" (endpoints under /chat/). */
  url: string;
  /** WebSocket URL; default derived from url: ws(s)://host/chat/ws */
  wsUrl?: string;
  /** A token, or a function returning one; called again on 401 and before expiry. */
  token: string | TokenProvider;
  storage?: ChatStorage;
  /** A WebSocket constructor (browsers have one; Node 20: pass `ws`'s). */
  WebSocket?: any;
  fetch?: typeof fetch;
  /** "auto" (default): WebSocket, long-poll when it cannot be established. */
  transport?: TransportPreference;
  /** Long-poll hold in seconds (default 25). */
  pollTimeout?: number;
  /** While on long-poll, try WebSocket again this often (default 60 s). */
  wsRetryMs?: number;
  /** Reconnect backoff bounds (default 1 s ... 30 s). */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /** No hello within this time: the WebSocket could not be established (default 8 s). */
  connectTimeoutMs?: number;
  /** Resend an unacknowledged send after this long on the same connection (default 10 s). */
  ackTimeoutMs?: number;
  /** At most one typing frame per conversation this often (default 3 s). */
  typingThrottleMs?: number;
  /** A typing indicator goes away after this long without another one (default 5 s). */
  typingExpiryMs?: number;
  /** Presence going offline is applied after this long unless it comes back (default 3 s). */
  presenceDebounceMs?: number;
  /** Waits between attempts to fill a seq hole from history (default [0, 700, 2000]). */
  fillDelays?: number[];
  random?: () => number;
}

export class ChatError extends Error {
  constructor(readonly code: string, message: string, readonly status?: number, readonly retryAfter?: number) {
    super(message);
    this.name = "ChatError";
  }
}

export interface ChatMessage extends TimelineItem {
  /** true for messages of this user (any device) */
  mine: boolean;
}

export interface TypingChange { conv: ConvId; from: string; active: boolean }
export interface Presence { user: string; online: boolean; last_seen: number | null }

export interface ChatEvents {
  /** connection state changes */
  state: (s: ConnectionState) => void;
  hello: (h: HelloFrame) => void;
  /** a new message from someone (shown once, in order) */
  message: (m: ChatMessage) => void;
  /** something in this conversation's view changed: redraw it */
  timeline: (conv: ConvId) => void;
  /** an own send was acknowledged */
  ack: (ack: SendAck, entry: OutboxEntry | undefined) => void;
  /** an own send was refused for good (too_large, forbidden, conflict, ...) */
  sendFailed: (entry: OutboxEntry, err: ChatError) => void;
  receipt: (r: ReceiptEvent) => void;
  typing: (t: TypingChange) => void;
  presence: (p: Presence) => void;
  conversations: (list: ConversationSummary[]) => void;
  group: (e: GroupEvent) => void;
  /** a message was deleted (for everyone, or for me on another device):
   * drop its body and media from the app's own copies */
  deleted: (e: DeletedEvent) => void;
  /** the device missed events beyond the server's retention: reload from history */
  behind: () => void;
  error: (e: ChatError) => void;
}

interface Pointers { delivered: Map<string, number>; read: Map<string, number> }

function b64urlJson(part: string): any {
  const s = part.replace(/-/g, "+").replace(/_/g, "/");
  const pad = s + "=".repeat((4 - (s.length % 4)) % 4);
  const bin = atob(pad);
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** The claims of a JWT, read without verifying (the server verifies). */
export function tokenClaims(token: string): { sub?: string; dev?: string; exp?: number } {
  try { return b64urlJson(token.split(".")[1] ?? ""); } catch { return {}; }
}

export interface TransportInput {
  preference: TransportPreference;
  wsAvailable: boolean;
  /** consecutive failures to establish a WebSocket (no hello) */
  wsFailures: number;
  /** ms since the last WebSocket attempt */
  sinceWsTry: number;
  wsRetryMs: number;
}

/** Which transport to try next: WebSocket first; long-poll after a
 * WebSocket could not be established, until wsRetryMs has passed. */
export function chooseTransport(i: TransportInput): "websocket" | "longpoll" {
  if (i.preference === "longpoll" || !i.wsAvailable) return "longpoll";
  if (i.preference === "websocket") return "websocket";
  if (i.wsFailures > 0 && i.sinceWsTry < i.wsRetryMs) return "longpoll";
  return "websocket";
}


export class ChatClient extends Emitter<ChatEvents> {
  readonly opts: Required<Omit<ChatClientOptions, "storage" | "WebSocket" | "fetch" | "wsUrl" | "token">>;
  private storage: ChatStorage;
  private WS: any;
  private fetchFn: typeof fetch;
  private wsUrl: string;
  private tokenProvider: TokenProvider;
  private token: string | null = null;
  private tokenExp = 0;

  /** user and device, from the token until the server's hello says */
  user = "";
  device = "";
  /** highest cursor processed (persisted; acknowledged to the server) */
  cursor = 0;
  private ackedCursor = 0;
  heartbeat = 30;

  private _state: ConnectionState = "idle";
  private stopped = false;
  private started: Promise<void> | null = null;
  private backoff: Backoff;
  /** resends after unavailable / network errors (apart from reconnects) */
  private sendBackoff: Backoff;
  private wsFailures = 0;
  private lastWsTry = -Infinity;
  private lastReceiptRefresh = 0;
  private ws: any = null;
  /** ends the current WebSocket attempt without waiting for its onclose */
  private wsFinish: (() => void) | null = null;
  private pollAbort: AbortController | null = null;
  private wakeup: (() => void) | null = null;

  private outbox!: Outbox;
  private timelines: Timelines;
  private seen = new Set<string>();
  private liveNew = new Set<string>();
  private pointers = new Map<ConvId, Pointers>();
  private myRead = new Map<ConvId, number>();
  private convs = new Map<ConvId, ConversationSummary>();
  private groupsCache = new Map<string, GroupInfo>();
  private nextBefore = new Map<ConvId, number | null>();
  private typingSent = new Map<ConvId, number>();
  private typingTimers = new Map<string, ReturnType<typeof setTimeout>>();
  private watched = new Set<string>();
  private presenceMap = new Map<string, Presence>();
  private presenceTimers = new Map<string, ReturnType<typeof setTimeout>>();
  private presencePoll: ReturnType<typeof setInterval> | null = null;
  private ackTimer: ReturnType<typeof setTimeout> | null = null;
  private flushing = false;
  private resendTimers = new Map<string, ReturnType<typeof setTimeout>>();

  constructor(options: ChatClientOptions) {
    super();
    this.opts = {
      url: options.url.replace(/\/+$/, ""),
      transport: options.transport ?? "auto",
      pollTimeout: options.pollTimeout ?? 25,
      wsRetryMs: options.wsRetryMs ?? 60000,
      backoffMinMs: options.backoffMinMs ?? 1000,
      backoffMaxMs: options.backoffMaxMs ?? 30000,
      connectTimeoutMs: options.connectTimeoutMs ?? 8000,
      ackTimeoutMs: options.ackTimeoutMs ?? 10000,
      typingThrottleMs: options.typingThrottleMs ?? 3000,
      typingExpiryMs: options.typingExpiryMs ?? 5000,
      presenceDebounceMs: options.presenceDebounceMs ?? 3000,
      fillDelays: options.fillDelays ?? [0, 700, 2000],
      random: options.random ?? Math.random,
    };
    this.storage = options.storage ?? defaultStorage();
    this.WS = options.WebSocket ?? (globalThis as any).WebSocket;
    this.fetchFn = options.fetch ?? ((...a: Parameters<typeof fetch>) => fetch(...a));
    this.wsUrl = options.wsUrl ?? this.opts.url.replace(/^http/, "ws") + "/chat/ws";
    const t = options.token;
    this.tokenProvider = typeof t === "function" ? t : () => t;
    this.backoff = new Backoff(this.opts.backoffMinMs, this.opts.backoffMaxMs, this.opts.random);
    this.sendBackoff = new Backoff(this.opts.backoffMinMs, this.opts.backoffMaxMs, this.opts.random);
    this.timelines = new Timelines({
      fill: (conv, after, before) => this.fillGap(conv, after, before),
      onShow: (conv, items) => this.onShown(conv, items),
      fillDelays: this.opts.fillDelays,
    });
  }

  get state(): ConnectionState { return this._state; }
  private setState(s: ConnectionState): void {
    if (this._state === s) return;
    this._state = s;
    this.emit("state", s);
  }

  private key(k: string): string { return `ngx-chat:${this.user}:${this.device}:${k}`; }

  // ---- lifecycle --------------------------------------------------------

  /** Load what an earlier run left (cursor, outbox) and connect. Resolves once loaded. */
  start(): Promise<void> {
    if (this.started) return this.started;
    this.started = (async () => {
      const tok = await this.getToken();
      const c = tokenClaims(tok);
      this.user = c.sub ?? "";
      this.device = c.dev ?? "default";
      this.outbox = new Outbox(this.storage, this.key("outbox"));
      this.cursor = (await this.storage.get<number>(this.key("cursor"))) ?? 0;
      this.ackedCursor = this.cursor;
      for (const id of (await this.storage.get<string[]>(this.key("seen"))) ?? []) this.seen.add(id);
      const left = await this.outbox.load();
      for (const conv of new Set(left.map((e) => e.conv))) this.emit("timeline", conv);
      void this.run();
    })();
    return this.started;
  }

  /** Disconnect for good (persisted state stays for the next start). */
  async stop(): Promise<void> {
    this.stopped = true;
    this.setState("stopped");
    this.pollAbort?.abort();
    if (this.cursor > this.ackedCursor) this.wsSend({ type: "ack", cursor: this.cursor });
    try { this.ws?.close(1000); } catch { /* already closed */ }
    this.wakeup?.();
    for (const t of [...this.typingTimers.values(), ...this.presenceTimers.values(), ...this.resendTimers.values()]) clearTimeout(t);
    if (this.presencePoll) clearInterval(this.presencePoll);
    if (this.ackTimer) { clearTimeout(this.ackTimer); this.ackTimer = null; }
    await this.persistCursor();
  }

  /** Drop the current connection as if the network cut it (for tests and "retry now" buttons). */
  dropConnection(): void {
    this.pollAbort?.abort();
    try { this.ws?.close(4000, "client reset"); } catch { /* closed */ }
    // a dead network may never complete the close handshake, and onclose
    // would keep the state "websocket" until the browser gives up: the
    // attempt ends now (a late onclose finds it finished)
    this.wsFinish?.();
    this.wakeup?.();
  }

  private async getToken(force = false): Promise<string> {
    const now = Date.now() / 1000;
    if (!force && this.token && (this.tokenExp === 0 || this.tokenExp - now > 60)) return this.token;
    const t = await this.tokenProvider();
    this.token = t;
    this.tokenExp = tokenClaims(t).exp ?? 0;
    return t;
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      const t = chooseTransport({
        preference: this.opts.transport, wsAvailable: !!this.WS, wsFailures: this.wsFailures,
        sinceWsTry: Date.now() - this.lastWsTry, wsRetryMs: this.opts.wsRetryMs,
      });
      let delay: number;
      if (t === "websocket") {
        this.lastWsTry = Date.now();
        const r = await this.runWebSocket();
        if (this.stopped) break;
        if (r.established) {
          this.wsFailures = 0;
          delay = r.drain ? drainJitter(this.opts.random) : this.backoff.next();
        } else {
          this.wsFailures++;
          const next = chooseTransport({
            preference: this.opts.transport, wsAvailable: true, wsFailures: this.wsFailures,
            sinceWsTry: 0, wsRetryMs: this.opts.wsRetryMs,
          });
          if (next === "longpoll") continue;         // fall back at once
          delay = this.backoff.next();
        }
      } else {
        const r = await this.runPoll();
        if (this.stopped) break;
        if (r === "try-websocket") continue;
        // HTTP did not work either: the network or the server is down, not
        // just WebSocket blocked, so the next attempt is a WebSocket again
        if (r === "unreachable") this.wsFailures = 0;
        delay = this.backoff.next();
      }
      this.setState("offline");
      await new Promise<void>((res) => {
        const tm = setTimeout(res, delay);
        this.wakeup = () => { clearTimeout(tm); res(); };
      });
      this.wakeup = null;
    }
  }

  // ---- WebSocket ------------------------------------------------------

  private runWebSocket(): Promise<{ established: boolean; drain: boolean }> {
    return new Promise(async (resolve) => {
      let established = false, drain = false, done = false;
      let pingTimer: ReturnType<typeof setInterval> | null = null;
      let lastRx = Date.now();
      const finish = () => {
        if (done) return;
        done = true;
        clearTimeout(connectTimer);
        if (pingTimer) clearInterval(pingTimer);
        if (this.ws === ws) this.ws = null;
        if (this.wsFinish === finish) this.wsFinish = null;
        resolve({ established, drain });
      };
      let token: string;
      try { token = await this.getToken(); } catch (e) {
        this.emit("error", new ChatError("unauthorized", `token provider failed: ${e}`));
        resolve({ established: false, drain: false });
        return;
      }
      this.setState("connecting");
      const url = `${this.wsUrl}?token=${encodeURIComponent(token)}${this.cursor > 0 ? `&cursor=${this.cursor}` : ""}`;
      let ws: any;
      try { ws = new this.WS(url); } catch { resolve({ established: false, drain: false }); return; }
      this.ws = ws;
      this.wsFinish = finish;
      const connectTimer = setTimeout(() => { if (!established) { try { ws.close(); } catch { /* */ } finish(); } },
                                      this.opts.connectTimeoutMs);
      ws.onmessage = (ev: any) => {
        if (done) return;                             // an attempt ended early (dropConnection)
        lastRx = Date.now();
        let f: ServerFrame;
        try { f = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data)); } catch { return; }
        if (f.type === "hello") {
          established = true;
          clearTimeout(connectTimer);
          this.onHello(f);
          this.setState("websocket");
          const hb = Math.max(1, f.heartbeat || 30) * 1000;
          pingTimer = setInterval(() => {
            if (Date.now() - lastRx > 2 * hb) { try { ws.close(4001, "no answer"); } catch { /* */ } finish(); return; }
            this.wsSend({ type: "ping" });
          }, hb);
          this.afterConnect();
          return;
        }
        if (f.type === "reconnect") {
          drain = true;                               // the server drains: go at once
          try { ws.close(1000); } catch { /* */ }
          finish();
          return;
        }
        this.handleFrame(f);
      };
      ws.onclose = () => finish();
      ws.onerror = () => { /* onclose follows */ };
    });
  }

  private wsSend(f: object): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1 || this._state !== "websocket") return false;
    try { ws.send(JSON.stringify(f)); return true; } catch { return false; }
  }

  private onHello(h: HelloFrame): void {
    this.user = h.user;
    this.device = h.device;
    this.heartbeat = h.heartbeat;
    this.backoff.reset();
    // processed here but the ack did not reach the server (closed too soon):
    // acknowledge now, or the senders never see the double tick
    this.ackedCursor = Math.min(this.cursor, h.cursor);
    if (this.cursor > h.cursor) setTimeout(() => this.scheduleAck(), 0);
    this.emit("hello", h);
    if (h.behind) this.emit("behind");
    this.refreshReceipts();
  }

  /** Delivered receipts are live only (PROTOCOL 7): what came while this
   * device was away (or, long-polling, between two polls) is read as
   * pointers, for conversations with own messages not yet delivered. */
  private refreshReceipts(): void {
    this.lastReceiptRefresh = Date.now();
    for (const conv of this.timelines.conversations()) {
      const items = this.timelines.items(conv);
      const own = items.filter((i) => i.type === "msg" && i.from === this.user);
      if (own.length && own.some((i) => this.stateOf(conv, i.seq) === "sent")) void this.learnReceipts(conv, items);
    }
  }

  private afterConnect(): void {
    this.flushOutbox();
    if (this.watched.size) this.sendWatch([...this.watched]);
  }

  // ---- long-poll ------------------------------------------------------

  private async runPoll(): Promise<"failed" | "unreachable" | "try-websocket"> {
    this.setState("connecting");
    let unauthorized = 0;
    let first = true;
    while (!this.stopped) {
      if (this.opts.transport === "auto" && this.WS && Date.now() - this.lastWsTry >= this.opts.wsRetryMs) {
        return "try-websocket";
      }
      const ctl = new AbortController();
      this.pollAbort = ctl;
      // hold no longer than the next WebSocket attempt is due
      // the first poll answers at once: it tells that the session works
      let timeout = first ? 0 : this.opts.pollTimeout;
      if (this.opts.transport === "auto" && this.WS) {
        const left = Math.ceil((this.opts.wsRetryMs - (Date.now() - this.lastWsTry)) / 1000);
        timeout = Math.max(0, Math.min(timeout, left));
      }
      let res: Response;
      try {
        const tok = await this.getToken(unauthorized > 0);
        res = await this.fetchFn(`${this.opts.url}/chat/poll?cursor=${this.cursor}&timeout=${timeout}`, {
          headers: { Authorization: `Bearer ${tok}` }, signal: ctl.signal, cache: "no-store",
        });
      } catch {
        this.pollAbort = null;
        return first ? "unreachable" : "failed";
      }
      this.pollAbort = null;
      if (res.status === 401) {
        await res.body?.cancel().catch(() => {});
        if (++unauthorized > 1) {
          this.emit("error", new ChatError("unauthorized", "the token was refused", 401));
          return "failed";
        }
        continue;
      }
      if (res.status !== 200) {
        this.emit("error", await this.errorOf(res));
        return first ? "unreachable" : "failed";
      }
      unauthorized = 0;
      let ans: PollAnswer;
      try { ans = await res.json(); } catch { return "failed"; }
      if (first) {
        first = false;
        this.ackedCursor = this.cursor;
        this.setState("longpoll");
        this.backoff.reset();
        if (ans.behind) this.emit("behind");
        this.afterConnect();
        this.refreshReceipts();
      } else if (Date.now() - this.lastReceiptRefresh >= 10000) {
        this.refreshReceipts();      // receipts that came while no poll was held
      }
      for (const f of ans.events ?? []) this.handleFrame(f);
      // the next poll acknowledges what this one brought
      if (typeof ans.cursor === "number" && ans.cursor > this.cursor) this.cursor = ans.cursor;
      void this.persistCursor();
    }
    return "failed";
  }

  private async errorOf(res: Response): Promise<ChatError> {
    let b: any = {};
    try { b = await res.json(); } catch { /* not JSON */ }
    const ra = res.headers.get("Retry-After");
    return new ChatError(b.code ?? "unavailable", b.message ?? `HTTP ${res.status}`, res.status,
                         b.retry_after ?? (ra ? Number(ra) * 1000 : undefined));
  }

  /** An authenticated HTTP request to the chat server; retried once with a fresh token on 401. */
  async request<T = any>(method: string, path: string, body?: unknown): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      const tok = await this.getToken(attempt > 0);
      const headers: Record<string, string> = { Authorization: `Bearer ${tok}` };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const res = await this.fetchFn(this.opts.url + path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
      });
      if (res.status === 401 && attempt === 0) { await res.body?.cancel().catch(() => {}); continue; }
      if (res.status === 204) return undefined as T;
      if (res.ok) return (await res.json()) as T;
      throw await this.errorOf(res);
    }
  }

  // ---- incoming -------------------------------------------------------

  private handleFrame(f: ServerFrame): void {
    switch (f.type) {
      case "msg": case "receipt": case "group": {
        const cur = (f as any).cursor as number | undefined;
        if (cur !== undefined) {
          if (cur <= this.cursor) return;            // replayed: processed already
        }
        // a tombstone where a deleted message was (replay after the deletion)
        if (f.type === "msg" && (f as any).deleted) this.emit("deleted", { ...(f as any), type: "deleted" } as DeletedEvent);
        else if (f.type === "msg") this.onMsg(f);
        else if (f.type === "receipt") this.onReceipt(f);
        else this.onGroupEvent(f);
        if (cur !== undefined) { this.cursor = cur; this.scheduleAck(); }
        return;
      }
      case "deleted": {
        // durable like a message: processed once, acknowledged
        const cur = f.cursor;
        if (cur !== undefined && cur <= this.cursor) return;
        this.emit("deleted", f);
        if (cur !== undefined) { this.cursor = cur; this.scheduleAck(); }
        return;
      }
      case "ack": void this.onAck(f); return;
      case "presence": this.onPresence(f); return;
      case "typing": this.onTyping(f.conv, f.from); return;
      case "error": this.onError(f); return;
      default: return;                               // pong, unknown frames
    }
  }

  private scheduleAck(): void {
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      if (this.cursor > this.ackedCursor && this.wsSend({ type: "ack", cursor: this.cursor })) {
        this.ackedCursor = this.cursor;
      }
      void this.persistCursor();
    }, 100);
  }

  private async persistCursor(): Promise<void> {
    if (!this.outbox) return;
    await this.storage.set(this.key("cursor"), this.cursor);
    await this.storage.set(this.key("seen"), [...this.seen].slice(-2000));
  }

  private markSeen(id: string): boolean {
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    if (this.seen.size > 4000) this.seen = new Set([...this.seen].slice(-2000));
    return true;
  }

  private onMsg(m: MsgEvent): void {
    const fresh = this.markSeen(m.id);
    const it = itemFromEvent(m);
    const mine = m.from === this.user;
    if (mine) it.state = "sent";
    if (fresh && !mine) this.liveNew.add(m.id);
    this.timelines.addLive(it, mine);
    this.clearTyping(m.conv, m.from);
    if (!fresh) return;
    if (m.group) this.learnGroup(m.group);
    const s = this.summary(m.conv, m.group);
    if (m.seq > s.last_seq) { s.last_seq = m.seq; s.last = m; }
    if (!mine && m.seq > s.read_seq) s.unread++;
    this.emit("conversations", this.conversations);
  }

  private onShown(conv: ConvId, items: TimelineItem[]): void {
    for (const it of items) {
      if (this.liveNew.delete(it.id)) this.emit("message", this.decorate(it));
    }
    this.emit("timeline", conv);
  }

  private onReceipt(r: ReceiptEvent): void {
    if (r.by === this.user) {
      // my read on another device
      if (r.status === "read") this.applyMyRead(r.conv, r.seq);
    } else {
      const p = this.ptrs(r.conv);
      const bump = (m: Map<string, number>) => m.set(r.by, Math.max(m.get(r.by) ?? 0, r.seq));
      bump(p.delivered);
      if (r.status === "read") bump(p.read);
    }
    this.emit("receipt", r);
    this.emit("timeline", r.conv);
  }

  private onGroupEvent(e: GroupEvent): void {
    const g = this.groupsCache.get(e.group);
    if (g) {
      if (e.event === "created" || e.event === "added") for (const u of e.members) { if (!g.members.includes(u)) g.members.push(u); }
      if (e.event === "removed") g.members = g.members.filter((u) => !e.members.includes(u));
      if (e.owner) g.owner = e.owner;
    }
    if (this.markSeen(e.id)) {
      const s = this.summary(e.conv, e.group);
      if (e.event === "removed" && e.members.includes(this.user)) this.convs.delete(e.conv);
      else if (s.name === undefined && e.name) s.name = e.name;
      this.emit("conversations", this.conversations);
    }
    this.timelines.addLive(itemFromEvent(e));
    if (!(e.event === "removed" && e.members.includes(this.user))) this.learnGroup(e.group);
    this.emit("group", e);
  }

  /** A group this device has not read yet: its name and members, once. */
  private learning = new Set<string>();
  private learnGroup(group: string): void {
    if (this.groupsCache.has(group) || this.learning.has(group)) return;
    this.learning.add(group);
    this.getGroup(group).then((g) => {
      const s = this.convs.get(`g:${group}`);
      if (s) s.name = g.name;
      this.emit("conversations", this.conversations);
      this.emit("timeline", `g:${group}`);
    }, () => {}).finally(() => this.learning.delete(group));
  }

  private onPresence(p: PresenceFrame): void {
    const prev = this.presenceMap.get(p.user);
    const t = this.presenceTimers.get(p.user);
    if (t) { clearTimeout(t); this.presenceTimers.delete(p.user); }
    const apply = () => {
      const v = { user: p.user, online: p.online, last_seen: p.last_seen };
      const was = this.presenceMap.get(p.user);
      this.presenceMap.set(p.user, v);
      if (was && was.online === v.online && was.last_seen === v.last_seen) return;
      this.emit("presence", v);
    };
    // long-poll users flap between polls: an offline is believed after a moment
    if (prev?.online && !p.online && this.opts.presenceDebounceMs > 0) {
      this.presenceTimers.set(p.user, setTimeout(() => { this.presenceTimers.delete(p.user); apply(); }, this.opts.presenceDebounceMs));
    } else apply();
  }

  private onTyping(conv: ConvId, from: string): void {
    if (from === this.user) return;
    const k = `${conv}\n${from}`;
    const t = this.typingTimers.get(k);
    if (t) clearTimeout(t);
    this.typingTimers.set(k, setTimeout(() => this.clearTyping(conv, from), this.opts.typingExpiryMs));
    if (!t) this.emit("typing", { conv, from, active: true });     // typingIn() has it now
  }

  private clearTyping(conv: ConvId, from: string): void {
    const k = `${conv}\n${from}`;
    const t = this.typingTimers.get(k);
    if (!t) return;
    clearTimeout(t);
    this.typingTimers.delete(k);
    this.emit("typing", { conv, from, active: false });
  }

  /** Users typing in a conversation now. */
  typingIn(conv: ConvId): string[] {
    return [...this.typingTimers.keys()].filter((k) => k.startsWith(conv + "\n")).map((k) => k.slice(conv.length + 1));
  }

  private onError(e: ErrorFrame): void {
    const err = new ChatError(e.code, e.message, undefined, e.retry_after);
    if (e.client_id && this.outbox.get(e.client_id)) { void this.onSendError(e.client_id, err); return; }
    this.emit("error", err);
  }

  // ---- sending --------------------------------------------------------

  /** Send a message. Resolves with the server's ack (the single tick); retried
   * across reconnects and reloads until then; rejects on a final refusal. */
  async send(target: { to?: string; group?: string; conv?: ConvId }, body: string,
             extra: { kind?: "text" | "media"; media?: Media } = {}): Promise<SendAck> {
    await this.start();
    let { to, group } = target;
    if (target.conv) {
      if (target.conv.startsWith("g:")) group = target.conv.slice(2);
      else to = peerOf(target.conv, this.user) ?? undefined;
    }
    if (!to === !group) throw new ChatError("bad_request", "name exactly one of to and group");
    const conv = group ? `g:${group}` : directConv(this.user, to!);
    const { entry, done } = await this.outbox.add({ to, group, conv, body, ...extra });
    this.emit("timeline", conv);
    this.transmit(entry);
    return done;
  }

  private frameOf(e: OutboxEntry): any {
    const f: any = { type: "send", client_id: e.client_id, body: e.body };
    if (e.group) f.group = e.group; else f.to = e.to;
    if (e.kind) f.kind = e.kind;
    if (e.media) f.media = e.media;
    return f;
  }

  private transmit(e: OutboxEntry): void {
    if (this._state === "websocket") {
      if (this.wsSend(this.frameOf(e))) {
        this.outbox.noteTry(e.client_id);
        this.armResend(e.client_id);
      }
    } else if (this._state === "longpoll") {
      this.flushOutbox();
    }
  }

  private armResend(clientId: string): void {
    const old = this.resendTimers.get(clientId);
    if (old) clearTimeout(old);
    this.resendTimers.set(clientId, setTimeout(() => {
      this.resendTimers.delete(clientId);
      const e = this.outbox.get(clientId);
      if (e) this.transmit(e);              // the identical frame: dedup makes it one message
    }, this.opts.ackTimeoutMs));
  }

  /** Put every waiting send on the wire, oldest first. */
  private flushOutbox(): void {
    if (this._state === "websocket") {
      for (const e of this.outbox.list()) this.transmit(e);
      return;
    }
    if (this._state !== "longpoll" || this.flushing) return;
    this.flushing = true;
    void (async () => {
      try {
        for (;;) {
          const e = this.outbox.list()[0];
          if (!e || this._state !== "longpoll") break;
          this.outbox.noteTry(e.client_id);
          try {
            const ack = await this.request<SendAck>("POST", "/chat/send", this.frameOf(e));
            await this.onAck(ack);
          } catch (err) {
            const ce = err instanceof ChatError ? err : new ChatError("unavailable", String(err));
            const final = await this.onSendError(e.client_id, ce, true);
            if (!final) break;                 // try again on the next poll answer
          }
        }
      } finally { this.flushing = false; }
    })();
  }

  private async onAck(ack: SendAck): Promise<void> {
    this.sendBackoff.reset();
    const t = this.resendTimers.get(ack.client_id);
    if (t) { clearTimeout(t); this.resendTimers.delete(ack.client_id); }
    const entry = this.outbox.get(ack.client_id);
    if (!entry && this.seen.has(ack.id)) return;     // a repeated ack
    this.markSeen(ack.id);
    const it: TimelineItem = {
      type: "msg", id: ack.id, conv: ack.conv, seq: ack.seq, from: this.user, ts: ack.ts,
      body: entry?.body ?? "", kind: entry?.kind ?? "text", state: "sent", client_id: ack.client_id,
    };
    if (entry?.media) it.media = entry.media;
    if (entry?.to) it.to = entry.to;
    if (entry?.group) it.group = entry.group;
    this.timelines.addLive(it, true);
    const s = this.summary(ack.conv, entry?.group);
    if (ack.seq > s.last_seq) {
      s.last_seq = ack.seq;
      s.last = { type: "msg", id: ack.id, conv: ack.conv, seq: ack.seq, from: this.user, body: it.body ?? "", kind: it.kind ?? "text", ts: ack.ts, to: entry?.to, group: entry?.group };
    }
    // shown before the promise resolves, removed from the outbox (persisted) too
    await this.outbox.acked(ack);
    this.emit("ack", ack, entry);
    this.emit("conversations", this.conversations);
    this.emit("timeline", ack.conv);
  }

  /** Returns true when the error was final (the entry left the outbox). */
  private async onSendError(clientId: string, err: ChatError, http = false): Promise<boolean> {
    const e = this.outbox.get(clientId);
    if (!e) return true;
    if (FINAL_SEND_ERRORS.has(err.code)) {
      await this.outbox.failed(clientId, err);
      this.emit("sendFailed", e, err);
      this.emit("timeline", e.conv);
      return true;
    }
    // rate_limited, unavailable, network: the same frame again later
    const wait = err.code === "rate_limited" ? (err.retryAfter ?? 1000) : this.sendBackoff.next();
    const t = this.resendTimers.get(clientId);
    if (t) clearTimeout(t);
    this.resendTimers.set(clientId, setTimeout(() => {
      this.resendTimers.delete(clientId);
      const x = this.outbox.get(clientId);
      if (x) { if (http) this.flushOutbox(); else this.transmit(x); }
    }, wait));
    return false;
  }

  /** Sends not yet acknowledged (they survive reloads). */
  pending(): OutboxEntry[] { return this.outbox ? this.outbox.list() : []; }

  // ---- reads, typing, presence ---------------------------------------

  /** Mark everything up to seq as read (the other side's blue ticks). */
  async markRead(conv: ConvId, seq: number): Promise<void> {
    if (seq <= (this.myRead.get(conv) ?? 0)) return;
    this.applyMyRead(conv, seq);
    if (!this.wsSend({ type: "read", conv, seq })) await this.request("POST", "/chat/read", { conv, seq });
  }

  private applyMyRead(conv: ConvId, seq: number): void {
    if (seq <= (this.myRead.get(conv) ?? 0)) return;
    this.myRead.set(conv, seq);
    const s = this.convs.get(conv);
    if (s) {
      s.read_seq = Math.max(s.read_seq, seq);
      s.unread = s.read_seq >= s.last_seq ? 0
        : this.timelines.items(conv).filter((i) => i.type === "msg" && i.from !== this.user && i.seq > s.read_seq).length;
      this.emit("conversations", this.conversations);
    }
  }

  /** Tell the other side(s) this user is typing; throttled per conversation. */
  async typing(target: { to?: string; group?: string; conv?: ConvId }): Promise<void> {
    let { to, group } = target;
    if (target.conv) {
      if (target.conv.startsWith("g:")) group = target.conv.slice(2);
      else to = peerOf(target.conv, this.user) ?? undefined;
    }
    const conv = group ? `g:${group}` : directConv(this.user, to ?? "");
    const now = Date.now();
    if (now - (this.typingSent.get(conv) ?? -Infinity) < this.opts.typingThrottleMs) return;
    this.typingSent.set(conv, now);
    const f: any = group ? { group } : { to };
    if (!this.wsSend({ type: "typing", ...f })) {
      try { await this.request("POST", "/chat/typing", f); } catch { /* best effort */ }
    }
  }

  /** Follow users' presence: "presence" events and presenceOf(). */
  watch(users: string[]): void {
    const fresh = users.filter((u) => !this.watched.has(u));
    for (const u of fresh) this.watched.add(u);
    if (fresh.length) this.sendWatch(fresh);
  }

  unwatch(users: string[]): void {
    for (const u of users) { this.watched.delete(u); this.presenceMap.delete(u); }
    this.wsSend({ type: "unwatch", users });
  }

  presenceOf(user: string): Presence | undefined { return this.presenceMap.get(user); }

  private sendWatch(users: string[]): void {
    if (this._state === "websocket") {
      for (let i = 0; i < users.length; i += 100) this.wsSend({ type: "watch", users: users.slice(i, i + 100) });
      return;
    }
    if (this._state !== "longpoll") return;      // afterConnect watches them
    // long-poll has no watch: ask, and ask again now and then
    void this.pollPresence(users);
    if (!this.presencePoll) {
      this.presencePoll = setInterval(() => {
        if (this._state === "longpoll") void this.pollPresence([...this.watched]);
        else if (this._state === "websocket" && this.presencePoll) { clearInterval(this.presencePoll); this.presencePoll = null; }
      }, 15000);
    }
  }

  private async pollPresence(users: string[]): Promise<void> {
    for (const u of users) {
      try {
        const p = await this.request<PresenceFrame>("GET", `/chat/presence?user=${encodeURIComponent(u)}`);
        this.onPresence({ type: "presence", user: u, online: p.online, last_seen: p.last_seen });
      } catch { /* next round */ }
    }
  }

  // ---- reads over REST -------------------------------------------------

  /** The conversation list (most recent first) with unread counts. */
  get conversations(): ConversationSummary[] {
    return [...this.convs.values()].sort((a, b) => (b.last?.ts ?? 0) - (a.last?.ts ?? 0));
  }

  async loadConversations(): Promise<ConversationSummary[]> {
    const ans = await this.request<{ conversations: ConversationSummary[] }>("GET", "/chat/conversations");
    for (const c of ans.conversations) {
      const mine = this.convs.get(c.conv);
      // live updates may be newer than the list (it is as fresh as persistence)
      if (mine && mine.last_seq > c.last_seq) { c.last_seq = mine.last_seq; c.last = mine.last; c.unread = Math.max(c.unread, mine.unread); }
      this.convs.set(c.conv, c);
      const mr = this.myRead.get(c.conv) ?? 0;
      if (c.read_seq > mr) this.myRead.set(c.conv, c.read_seq);
    }
    this.emit("conversations", this.conversations);
    return this.conversations;
  }

  private summary(conv: ConvId, group?: string): ConversationSummary {
    let s = this.convs.get(conv);
    if (!s) {
      s = { conv, last_seq: 0, read_seq: this.myRead.get(conv) ?? 0, unread: 0, last: null };
      if (group) s.group = group;
      const g = group ? this.groupsCache.get(group) : undefined;
      if (g) s.name = g.name;
      this.convs.set(conv, s);
    }
    return s;
  }

  /** The newest page of a conversation, or the page before `before`. */
  async loadHistory(conv: ConvId, opts: { before?: number; limit?: number } = {}): Promise<HistoryPage> {
    const q = new URLSearchParams({ conv });
    if (opts.before) q.set("before", String(opts.before));
    if (opts.limit) q.set("limit", String(opts.limit));
    const page = await this.request<HistoryPage>("GET", `/chat/history?${q}`);
    this.nextBefore.set(conv, page.next_before ?? null);
    const items = page.messages.map((m) => { this.markSeen(m.id); return this.ownState(itemFromEvent(m)); });
    this.timelines.addHistory(conv, items, !opts.before);
    this.emit("timeline", conv);
    if (!opts.before) void this.learnReceipts(conv, items);
    return page;
  }

  /** Ticks of messages read from history (after a reload the receipts are
   * long past): where the newest own message stands. */
  private async learnReceipts(conv: ConvId, items: TimelineItem[]): Promise<void> {
    const own = items.filter((i) => i.type === "msg" && i.from === this.user).map((i) => i.seq);
    if (!own.length) return;
    const seq = Math.max(...own);
    try {
      const r = await this.receiptsOf(conv, seq);
      const p = this.ptrs(conv);
      const bump = (m: Map<string, number>, u: string, n = seq) => m.set(u, Math.max(m.get(u) ?? 0, n));
      for (const u of r.delivered) if (u !== this.user) bump(p.delivered, u);
      for (const u of r.read) if (u !== this.user) { bump(p.read, u); bump(p.delivered, u); }
      // direct conversations: the peer's pointers themselves (older own
      // messages get their ticks even when the newest is not delivered)
      for (const [u, v] of Object.entries(r.pointers ?? {})) {
        if (u === this.user) continue;
        bump(p.delivered, u, v.delivered);
        bump(p.read, u, v.read);
      }
      this.emit("timeline", conv);
    } catch { /* ticks stay at sent */ }
  }

  /** One more page of older messages; false when there is none. */
  async loadOlder(conv: ConvId, limit = 50): Promise<boolean> {
    if (!this.nextBefore.has(conv)) { await this.loadHistory(conv, { limit }); return true; }
    const before = this.nextBefore.get(conv);
    if (before == null) return false;
    await this.loadHistory(conv, { before, limit });
    return true;
  }

  private ownState(it: TimelineItem): TimelineItem {
    if (it.type === "msg" && it.from === this.user) it.state = "sent";
    return it;
  }

  private async fillGap(conv: ConvId, after: number, before: number): Promise<TimelineItem[]> {
    const out: TimelineItem[] = [];
    let a = Math.max(0, after);
    for (let pages = 0; pages < 20 && a < before - 1; pages++) {
      const q = new URLSearchParams({ conv, after: String(a), limit: "100" });
      const page = await this.request<HistoryPage>("GET", `/chat/history?${q}`);
      for (const m of page.messages) if (m.seq < before) out.push(this.ownState(itemFromEvent(m)));
      if (page.next_after == null || !page.messages.length) break;
      a = page.next_after;
    }
    for (const it of out) this.markSeen(it.id);
    return out;
  }

  /** Who got / read a message (GET /chat/receipts). */
  receiptsOf(conv: ConvId, seq: number): Promise<ReceiptsAnswer> {
    return this.request("GET", `/chat/receipts?conv=${encodeURIComponent(conv)}&seq=${seq}`);
  }

  // ---- groups ---------------------------------------------------------

  async createGroup(name: string, members: string[] = []): Promise<GroupInfo> {
    const g = await this.request<GroupInfo>("POST", "/chat/groups", { name, members });
    this.groupsCache.set(g.group, g);
    const s = this.summary(`g:${g.group}`, g.group);
    s.name = g.name;
    this.emit("conversations", this.conversations);
    return g;
  }

  async getGroup(group: string): Promise<GroupInfo> {
    const g = await this.request<GroupInfo>("GET", `/chat/groups/${encodeURIComponent(group)}`);
    this.groupsCache.set(g.group, g);
    return g;
  }

  async changeMembers(group: string, change: { add?: string[]; remove?: string[] }): Promise<GroupInfo> {
    const g = await this.request<GroupInfo>("POST", `/chat/groups/${encodeURIComponent(group)}/members`, change);
    this.groupsCache.set(g.group, g);
    return g;
  }
  addMembers(group: string, users: string[]): Promise<GroupInfo> { return this.changeMembers(group, { add: users }); }
  removeMembers(group: string, users: string[]): Promise<GroupInfo> { return this.changeMembers(group, { remove: users }); }
  leaveGroup(group: string): Promise<GroupInfo> { return this.changeMembers(group, { remove: [this.user] }); }
  groupInfo(group: string): GroupInfo | undefined { return this.groupsCache.get(group); }

  // ---- the view ---------------------------------------------------------

  private ptrs(conv: ConvId): Pointers {
    let p = this.pointers.get(conv);
    if (!p) { p = { delivered: new Map(), read: new Map() }; this.pointers.set(conv, p); }
    return p;
  }

  /** pending / sent / delivered / read of an own message with this seq. */
  stateOf(conv: ConvId, seq: number): MessageState {
    if (seq <= 0) return "pending";
    const p = this.pointers.get(conv);
    if (!p) return "sent";
    let others: string[];
    const peer = peerOf(conv, this.user);
    if (peer !== null) others = [peer];
    else {
      const g = this.groupsCache.get(conv.slice(2));
      others = g ? g.members.filter((u) => u !== this.user) : [...p.delivered.keys()];
      if (!others.length) return "sent";
    }
    const all = (m: Map<string, number>) => others.every((u) => (m.get(u) ?? 0) >= seq);
    if (all(p.read)) return "read";
    if (all(p.delivered)) return "delivered";
    return "sent";
  }

  private decorate(it: TimelineItem): ChatMessage {
    const mine = it.from === this.user;
    const m: ChatMessage = { ...it, mine };
    if (mine && it.type === "msg") m.state = this.stateOf(it.conv, it.seq);
    return m;
  }

  /** What to show for a conversation: the messages in seq order, each once,
   * then this device's sends still waiting for their ack. */
  messages(conv: ConvId): ChatMessage[] {
    const shown = this.timelines.items(conv).map((i) => this.decorate(i));
    const pending = this.pending().filter((e) => e.conv === conv).map((e): ChatMessage => ({
      type: "msg", id: `local:${e.client_id}`, conv, seq: 0, from: this.user, ts: e.created, body: e.body,
      kind: e.kind ?? "text", media: e.media, state: "pending", client_id: e.client_id, mine: true,
    }));
    return [...shown, ...pending];
  }
}
