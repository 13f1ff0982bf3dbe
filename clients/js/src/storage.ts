/**
 * Pluggable persistence for what must survive a reload: the cursor, the
 * outbox and the ids already seen. Values are JSON-serialisable.
 */
export interface ChatStorage {
  get<T = unknown>(key: string): Promise<T | undefined>;
  set(key: string, value: unknown): Promise<void>;
  delete(key: string): Promise<void>;
}

/** In memory: for tests and for Node processes that need no persistence. */
export class MemoryStorage implements ChatStorage {
  private map = new Map<string, string>();
  async get<T>(key: string): Promise<T | undefined> {
    const v = this.map.get(key);
    return v === undefined ? undefined : (JSON.parse(v) as T);
  }
  async set(key: string, value: unknown): Promise<void> {
    // stored as JSON so that callers never share mutable objects with it
    this.map.set(key, JSON.stringify(value));
  }
  async delete(key: string): Promise<void> {
    this.map.delete(key);
  }
}

interface WebStorageLike {
  getItem(k: string): string | null;
  setItem(k: string, v: string): void;
  removeItem(k: string): void;
}

/** window.localStorage (or any Web Storage). Synchronous underneath. */
export class LocalStorageStorage implements ChatStorage {
  constructor(private ls: WebStorageLike = (globalThis as any).localStorage) {
    if (!ls) throw new Error("no localStorage here");
  }
  async get<T>(key: string): Promise<T | undefined> {
    const v = this.ls.getItem(key);
    return v === null ? undefined : (JSON.parse(v) as T);
  }
  async set(key: string, value: unknown): Promise<void> {
    this.ls.setItem(key, JSON.stringify(value));
  }
  async delete(key: string): Promise<void> {
    this.ls.removeItem(key);
  }
}

/** IndexedDB, one object store of key -> JSON value. */
export class IndexedDBStorage implements ChatStorage {
  private db: Promise<IDBDatabase>;
  constructor(name = "ngx-chat", private store = "kv") {
    const idb: IDBFactory = (globalThis as any).indexedDB;
    if (!idb) throw new Error("no indexedDB here");
    this.db = new Promise((resolve, reject) => {
      const rq = idb.open(name, 1);
      rq.onupgradeneeded = () => rq.result.createObjectStore(store);
      rq.onsuccess = () => resolve(rq.result);
      rq.onerror = () => reject(rq.error);
    });
  }
  private async run<T>(mode: IDBTransactionMode, f: (s: IDBObjectStore) => IDBRequest): Promise<T> {
    const db = await this.db;
    return new Promise<T>((resolve, reject) => {
      const tx = db.transaction(this.store, mode);
      const rq = f(tx.objectStore(this.store));
      tx.oncomplete = () => resolve(rq.result as T);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }
  async get<T>(key: string): Promise<T | undefined> {
    const v = await this.run<string | undefined>("readonly", (s) => s.get(key));
    return v === undefined ? undefined : (JSON.parse(v) as T);
  }
  async set(key: string, value: unknown): Promise<void> {
    await this.run("readwrite", (s) => s.put(JSON.stringify(value), key));
  }
  async delete(key: string): Promise<void> {
    await this.run("readwrite", (s) => s.delete(key));
  }
}

/** The best storage this environment has: IndexedDB, localStorage, memory. */
export function defaultStorage(): ChatStorage {
  try { if ((globalThis as any).indexedDB) return new IndexedDBStorage(); } catch { /* next */ }
  try { if ((globalThis as any).localStorage) return new LocalStorageStorage(); } catch { /* next */ }
  return new MemoryStorage();
}
