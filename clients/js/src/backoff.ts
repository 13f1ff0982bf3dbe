/**
 * Exponential backoff with jitter for reconnects: the n-th consecutive
 * failure waits a random time in [base/2, base] where base = min(max,
 * min * 2^n) ("equal jitter": never zero, never more than the cap).
 */
export class Backoff {
  private n = 0;
  constructor(
    readonly minMs = 1000,
    readonly maxMs = 30000,
    private random: () => number = Math.random,
  ) {}
  /** The delay before the next attempt; each call counts one failure. */
  next(): number {
    const base = Math.min(this.maxMs, this.minMs * 2 ** Math.min(this.n, 30));
    this.n++;
    return Math.round(base / 2 + (this.random() * base) / 2);
  }
  /** A connection succeeded: the next failure starts from minMs again. */
  reset(): void { this.n = 0; }
  get attempts(): number { return this.n; }
}

/** A short random delay for `reconnect` frames (drain): reconnect at once,
 * but not all clients in the same millisecond. */
export function drainJitter(random: () => number = Math.random, maxMs = 500): number {
  return Math.round(random() * maxMs);
}
