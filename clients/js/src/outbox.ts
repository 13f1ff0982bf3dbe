/**
 * The outbox (PROTOCOL 9, rows 1-2): every send gets a client_id once and
 * is kept, persisted, until the server acks it; resends repeat the same
 * frame, so the server's dedup turns them into one message.
 */
import type { ChatStorage } from "./storage.js";
import type { Media, SendAck } from "./protocol.js";

export interface OutboxEntry {
  client_id: string;
  to?: string;
  group?: string;
  /** the conversation it will land in (known before the ack for display) */
  conv: string;
  body: string;
  kind?: "text" | "media";
  media?: Media;
  created: number;
  /** how many times it was put on the wire */
  tries: number;
}

export function newClientId(): string {
  const c: any = (globalThis as any).crypto;
  if (c?.randomUUID) return c.randomUUID();
  // fallback for old runtimes: 122 random bits in UUID v4 shape
  const h = [...Array(32)].map(() => Math.floor(Math.random() * 16).toString(16));
  h[12] = "4"; h[16] = ((parseInt(h[16], 16) & 3) | 8).toString(16);
  const s = h.join("");
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
}

export class Outbox {
  private entries: OutboxEntry[] = [];
  private waiters = new Map<string, { resolve: (a: SendAck) => void; reject: (e: Error) => void }>();
  private saving: Promise<void> = Promise.resolve();

  constructor(private storage: ChatStorage, private key: string) {}

  /** Entries left by an earlier run (a reload): they are sent again. */
  async load(): Promise<OutboxEntry[]> {
    const saved = await this.storage.get<OutboxEntry[]>(this.key);
    if (Array.isArray(saved)) {
      for (const e of saved) if (!this.entries.some((x) => x.client_id === e.client_id)) this.entries.push(e);
    }
    return this.list();
  }

  list(): OutboxEntry[] { return this.entries.slice(); }
  get size(): number { return this.entries.length; }
  get(clientId: string): OutboxEntry | undefined { return this.entries.find((e) => e.client_id === clientId); }

  /** Add a send; the promise settles with its ack or a final error. */
  async add(e: Omit<OutboxEntry, "client_id" | "created" | "tries"> & { client_id?: string }): Promise<{ entry: OutboxEntry; done: Promise<SendAck> }> {
    const entry: OutboxEntry = { ...e, client_id: e.client_id ?? newClientId(), created: Date.now(), tries: 0 };
    this.entries.push(entry);
    const done = new Promise<SendAck>((resolve, reject) => this.waiters.set(entry.client_id, { resolve, reject }));
    done.catch(() => { /* the caller may not listen */ });
    await this.save();                 // persisted before it is ever sent
    return { entry, done };
  }

  /** The server acked it: gone from the outbox, the promise resolves. */
  async acked(ack: SendAck): Promise<OutboxEntry | undefined> {
    const e = this.remove(ack.client_id);
    this.waiters.get(ack.client_id)?.resolve(ack);
    this.waiters.delete(ack.client_id);
    await this.save();
    return e;
  }

  /** A final error (too_large, forbidden, conflict, ...): no more retries. */
  async failed(clientId: string, err: Error): Promise<OutboxEntry | undefined> {
    const e = this.remove(clientId);
    this.waiters.get(clientId)?.reject(err);
    this.waiters.delete(clientId);
    await this.save();
    return e;
  }

  noteTry(clientId: string): void {
    const e = this.get(clientId);
    if (e) e.tries++;
  }

  private remove(clientId: string): OutboxEntry | undefined {
    const i = this.entries.findIndex((e) => e.client_id === clientId);
    return i < 0 ? undefined : this.entries.splice(i, 1)[0];
  }

  private save(): Promise<void> {
    // one write at a time, each of the state when it runs
    this.saving = this.saving.then(() => this.storage.set(this.key, this.entries)).catch(() => {});
    return this.saving;
  }
}
