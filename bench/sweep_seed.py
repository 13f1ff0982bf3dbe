"""The sweeper benchmark's helper (bench/sweep_bench.sh): seeds expired
messages straight into MongoDB and the sweeper's sets, then follows how
fast the sweeper removes them.

  sweep_seed.py seed  --env ENV --n N --base MS   documents only (no Redis yet)
  sweep_seed.py arm   --env ENV --n N --base MS   the chat:{s<s>}:exp members: the sweep starts
  sweep_seed.py watch --env ENV --n N --base MS [--stop-file F]
                                                  until every member is gone: prints the rate
(the same --base for seed and arm: a member's score is its document's expire_at)
"""
import argparse
import datetime
import time
import zlib

import pymongo
import redis

SHARDS = 16


def env_of(path):
    out = {}
    for line in open(path):
        k, _, v = line.strip().partition("=")
        out[k] = v
    return out


def convs(n):
    # 1,000 conversations between seeded users who never connect
    for i in range(n):
        a, b = f"sweepa{i % 1000:04d}", f"sweepb{i % 1000:04d}"
        yield i, f"d:{a}:{b}", a, b


def seed(db, n, base):
    old = base - 10 * 86400000
    batch = []
    t0 = time.time()
    for i, conv, a, b in convs(n):
        batch.append({"_id": f"sw{i:09d}", "conv": conv, "seq": i // 1000 + 1, "from": a, "to": b,
                      "body": "expired " + "x" * 40, "kind": "text", "ts": old + i,
                      "expire_at": datetime.datetime.fromtimestamp((old + 86400000 + i) / 1000, datetime.timezone.utc)})
        if len(batch) == 5000:
            db.messages.insert_many(batch, ordered=False)
            batch = []
    if batch:
        db.messages.insert_many(batch, ordered=False)
    print(f"seeded {n} documents in {time.time() - t0:.1f} s")


def arm(r, n, base):
    old = base - 10 * 86400000
    p = r.pipeline(transaction=False)
    for i, conv, a, b in convs(n):
        s = zlib.crc32(conv.encode()) % SHARDS
        p.zadd("chat:{s%d}:exp" % s, {f"sw{i:09d}|{conv}|{i // 1000 + 1}|{old + i}|{a}": old + 86400000 + i})
        if i % 10000 == 9999:
            p.execute()
    p.execute()
    print(f"armed {n} at {time.time():.3f}")


def watch(r, db, n, stop_file):
    t0 = time.time()
    last = n
    while True:
        left = sum(r.zcard("chat:{s%d}:exp" % s) for s in range(SHARDS))
        if left != last:
            print(f"t={time.time() - t0:6.1f} s left={left}", flush=True)
            last = left
        if left == 0:
            break
        time.sleep(1)
    dt = time.time() - t0
    if stop_file:
        # the load generator stops sending: the run covers the removal
        open(stop_file, "w").close()
    docs = db.messages.count_documents({"_id": {"$regex": "^sw"}})
    print(f"REMOVED {n} in {dt:.1f} s: {n / dt:.0f} messages/s; documents left {docs}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("seed", "arm", "watch"))
    ap.add_argument("--env", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--base", type=int, required=True, help="ms: the same for seed and arm")
    ap.add_argument("--stop-file", help="watch: created when every member is gone")
    a = ap.parse_args()
    env = env_of(a.env)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    db = pymongo.MongoClient(env["MONGO_URI"]).get_default_database()
    if a.what == "seed":
        seed(db, a.n, a.base)
    elif a.what == "arm":
        arm(r, a.n, a.base)
    else:
        watch(r, db, a.n, a.stop_file)


if __name__ == "__main__":
    main()
