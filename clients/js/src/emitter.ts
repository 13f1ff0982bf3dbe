/** A minimal typed event emitter (no dependency, browsers and Node). */
export class Emitter<E extends { [K in keyof E]: (...args: any[]) => void }> {
  private handlers: { [K in keyof E]?: Set<E[K]> } = {};
  on<K extends keyof E>(ev: K, fn: E[K]): () => void {
    (this.handlers[ev] ??= new Set()).add(fn);
    return () => this.off(ev, fn);
  }
  once<K extends keyof E>(ev: K, fn: E[K]): () => void {
    const w = ((...a: any[]) => { off(); fn(...a); }) as E[K];
    const off = this.on(ev, w);
    return off;
  }
  off<K extends keyof E>(ev: K, fn: E[K]): void { this.handlers[ev]?.delete(fn); }
  protected emit<K extends keyof E>(ev: K, ...args: Parameters<E[K]>): void {
    for (const fn of [...(this.handlers[ev] ?? [])]) {
      try { fn(...args); } catch (e) { console.error("ngx-chat: event handler for", String(ev), "threw", e); }
    }
  }
}
