"""How many queue entries a role has not committed yet on the Redis queue:
the entries of every shard stream after the role's position
chat:{s<s>}:pos:<role> (workers/queue.c), the whole stream while it has
none. Prints one number.

    python bench/redis_backlog.py <redis url> <role>
"""
import sys

import redis


def main():
    url, role = sys.argv[1], sys.argv[2]
    r = redis.Redis.from_url(url, decode_responses=True)
    n = 0
    for key in r.scan_iter(match="chat:{s*}:in", count=1000):
        tag = key[len("chat:"):key.index("}") + 1]
        pos = r.get("chat:%s:pos:%s" % (tag, role))
        if pos is None:
            n += r.xlen(key)
            continue
        start = "(" + pos
        while True:                            # paged: a long backlog is not one reply
            got = r.xrange(key, start, "+", count=10000)
            n += len(got)
            if len(got) < 10000:
                break
            start = "(" + got[-1][0]
    print(n)


if __name__ == "__main__":
    main()
