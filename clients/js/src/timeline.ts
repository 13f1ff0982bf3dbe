/**
 * Exactly-once, in-order view of conversations (PROTOCOL 4.2, 9).
 *
 * Per conversation, items are ordered by seq, never by arrival. An item is
 * shown at once when nothing is missing before it; one that comes after a
 * hole waits, hidden, while the hole is filled from history (the fill is
 * retried a few times: history is written by the persistence worker a
 * moment after delivery, and the missing item often arrives live first).
 * If the hole is still there after the last attempt it is a real hole
 * (PROTOCOL: "a hint, not an error") and the waiting items are shown.
 * A message id is shown at most once per conversation.
 */
import type { ConvId, GroupEvent, Media, MsgEvent } from "./protocol.js";

export type MessageState = "pending" | "sent" | "delivered" | "read" | "failed";

export interface TimelineItem {
  type: "msg" | "group";
  /** server id; for a pending send "local:<client_id>" */
  id: string;
  conv: ConvId;
  /** 0 while pending (no ack yet) */
  seq: number;
  from: string;
  ts: number;
  body?: string;
  kind?: "text" | "media";
  media?: Media;
  to?: string;
  group?: string;
  /** group events */
  event?: string;
  members?: string[];
  by?: string;
  /** own messages: pending -> sent -> delivered -> read (or failed) */
  state?: MessageState;
  client_id?: string;
  error?: string;
}

export function itemFromEvent(e: MsgEvent | GroupEvent): TimelineItem {
  if (e.type === "group" || (e as any).event !== undefined) {
    const g = e as GroupEvent;
    return { type: "group", id: g.id, conv: g.conv, seq: g.seq, from: g.by, ts: g.ts,
             event: g.event, members: g.members, by: g.by, group: g.group };
  }
  const m = e as MsgEvent;
  const it: TimelineItem = { type: "msg", id: m.id, conv: m.conv, seq: m.seq, from: m.from, ts: m.ts,
                             body: m.body, kind: m.kind ?? "text" };
  if (m.media) it.media = m.media;
  if (m.to !== undefined) it.to = m.to;
  if (m.group !== undefined) it.group = m.group;
  return it;
}

/** Fetch what the conversation holds with afterSeq < seq < beforeSeq, any order. */
export type GapFiller = (conv: ConvId, afterSeq: number, beforeSeq: number) => Promise<TimelineItem[]>;

export interface TimelineOptions {
  fill: GapFiller;
  /** called with the items that became visible, in seq order */
  onShow: (conv: ConvId, items: TimelineItem[]) => void;
  /** waits between fill attempts (ms); after the last, holes are accepted */
  fillDelays?: number[];
}

class ConvTimeline {
  shown = new Map<number, TimelineItem>();
  buffered = new Map<number, TimelineItem>();
  ids = new Set<string>();
  /** every seq <= high is resolved (shown or an accepted hole); -1: no baseline */
  high = -1;
  filling = false;
  oldest = Infinity;
  constructor(readonly conv: ConvId) {}
}

export class Timelines {
  private convs = new Map<ConvId, ConvTimeline>();
  private delays: number[];
  constructor(private opts: TimelineOptions) {
    this.delays = opts.fillDelays ?? [0, 700, 2000];
  }

  private get(conv: ConvId): ConvTimeline {
    let c = this.convs.get(conv);
    if (!c) { c = new ConvTimeline(conv); this.convs.set(conv, c); }
    return c;
  }

  /** Every conversation with something loaded. */
  conversations(): ConvId[] { return [...this.convs.keys()]; }

  has(conv: ConvId, id: string): boolean { return this.convs.get(conv)?.ids.has(id) ?? false; }

  /** Items of a conversation that are shown, by seq. */
  items(conv: ConvId): TimelineItem[] {
    const c = this.convs.get(conv);
    if (!c) return [];
    return [...c.shown.values()].sort((a, b) => a.seq - b.seq);
  }

  /** Highest seq shown without a hole before it (-1: nothing known). */
  frontier(conv: ConvId): number { return this.convs.get(conv)?.high ?? -1; }
  /** Lowest seq loaded (for paging back), Infinity when none. */
  oldest(conv: ConvId): number { return this.convs.get(conv)?.oldest ?? Infinity; }
  waiting(conv: ConvId): number { return this.convs.get(conv)?.buffered.size ?? 0; }

  /** The shown item with this seq, if any (to update its state). */
  at(conv: ConvId, seq: number): TimelineItem | undefined { return this.convs.get(conv)?.shown.get(seq); }

  /**
   * A live item (pushed, polled, or the ack of an own send). Returns false
   * when it was a duplicate. Own acked sends are shown at once wherever
   * their seq is (the sender saw them already); others wait for holes.
   */
  addLive(item: TimelineItem, own = false): boolean {
    const c = this.get(item.conv);
    if (c.ids.has(item.id)) return false;
    const prev = c.shown.get(item.seq) ?? c.buffered.get(item.seq);
    if (prev) return false;                          // same seq twice: the same event
    c.ids.add(item.id);
    if (c.high < 0) c.high = item.seq - 1;           // first thing we know of it
    if (own || item.seq <= c.high + 1) {
      this.show(c, [item]);
    } else {
      c.buffered.set(item.seq, item);
      this.fill(c);
    }
    return true;
  }

  /**
   * Items read from history (any order). They are shown where their seq
   * says; `latest` marks a page that ends at the newest message, which
   * sets the baseline of a conversation seen for the first time.
   */
  addHistory(conv: ConvId, items: TimelineItem[], latest = false): TimelineItem[] {
    const c = this.get(conv);
    const fresh = items.filter((it) => !c.ids.has(it.id) && !c.shown.has(it.seq));
    for (const it of fresh) {
      c.ids.add(it.id);
      c.buffered.delete(it.seq);
    }
    if (latest && fresh.length) {
      const top = Math.max(...fresh.map((i) => i.seq));
      if (c.high < top) c.high = top;
    }
    if (c.high < 0 && items.length) c.high = Math.max(...items.map((i) => i.seq));
    return this.show(c, fresh);
  }

  private show(c: ConvTimeline, items: TimelineItem[]): TimelineItem[] {
    const out: TimelineItem[] = [];
    for (const it of items) {
      c.shown.set(it.seq, it);
      if (it.seq < c.oldest) c.oldest = it.seq;
      out.push(it);
    }
    // advance the frontier over everything now contiguous
    for (;;) {
      const s = c.high + 1;
      if (c.shown.has(s)) { c.high = s; continue; }
      const b = c.buffered.get(s);
      if (b) { c.buffered.delete(s); c.shown.set(s, b); out.push(b); c.high = s; continue; }
      break;
    }
    if (out.length) this.opts.onShow(c.conv, out.sort((a, b) => a.seq - b.seq));
    return out;
  }

  private fill(c: ConvTimeline): void {
    if (c.filling) return;
    c.filling = true;
    void (async () => {
      for (const delay of this.delays) {
        if (delay) await new Promise((r) => setTimeout(r, delay));
        if (c.buffered.size === 0) break;
        const before = Math.min(...c.buffered.keys());
        try {
          const got = await this.opts.fill(c.conv, c.high, before);
          this.addHistory(c.conv, got.filter((i) => i.seq > c.high));
        } catch { /* offline or not yet persisted: try again */ }
        if (c.buffered.size === 0) break;
      }
      c.filling = false;
      if (c.buffered.size) {
        // a real hole: show what waits, in order
        const rest = [...c.buffered.values()].sort((a, b) => a.seq - b.seq);
        c.buffered.clear();
        c.high = Math.max(c.high, rest[rest.length - 1].seq);
        this.show(c, rest);
      }
    })();
  }
}
