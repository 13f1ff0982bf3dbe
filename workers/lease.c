/*
 * Shard leases of the fanout role on the Redis queue (docs/SCALING.md,
 * "Fan-out workers: shard leases"). Any fan-out worker can serve any
 * shard; a shard is served by the worker holding chat:{s<s>}:lease
 * (lua/fanout_lease.lua, on the shard's own slot). Every
 * fanout_lease_renew_ms a worker, in one pipelined round:
 *
 *   - says it is alive (lua/fanout_live.lua: the number alive comes back),
 *   - renews the leases it holds; one it finds held by another is dropped
 *     at once (nothing more is read from it, nothing of it acknowledged),
 *   - gives back those it was giving back and whose read is over,
 *
 * then, with share = ceil(shards / alive): above it, marks the surplus as
 * given back (no new read; the lease goes at the next round, once the
 * last read was processed), so that a worker that starts gets its share;
 * below it, tries free shards until it has its share. A shard taken is
 * read from the position its last holder committed (queue.c): what that
 * holder read and did not commit is processed first, before anything new.
 *
 * Fencing: our lease is counted as sure until the time we SENT the renewal
 * plus the lease (Redis starts its TTL later, when it runs the script), and
 * a blocking read goes out only while it surely ends, plus a margin of a
 * fifth of the lease, before that time (queue.c, readable()). So every
 * entry handed to us by a read was handed while we held the lease; a worker
 * that was paused past its lease finds it unsure and neither reads nor
 * commits that shard any more, and Redis refuses a commit from a worker
 * that is not the lease's holder (lua/queue_commit.lua), so the position
 * the next holder reads from never passes what that holder has not
 * processed. Two workers may still process the same entries (a holder
 * paused in the middle of a batch, and the next one reading from the
 * position): each in stream order, and the inbox script appends an entry once
 * (the first one to get there gives it its cursor, the other gets the same
 * cursor back), so inboxes hold everything once and in order; a device may
 * be published the same event twice, with the same cursor (PROTOCOL: a
 * cursor not above the last one is dropped).
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LIVE_KEY "chat:{fanout}:live"

int
cw_lease_init(cw_lease_t *l, const cw_config_t *cf, cw_queue_t *q)
{
    memset(l, 0, sizeof(*l));
    l->cf = cf;
    l->q = q;
    /* unique per process: a restarted worker does not renew its dead
     * predecessor's leases, it waits for them like everyone else */
    snprintf(l->owner, sizeof(l->owner), "fanout-%d:%s:%ld:%lld", cf->fanout_index, cf->node_id,
             (long) getpid(), (long long) cw_now_ms());
    l->cand = malloc(sizeof(int) * (size_t) cf->shards);
    l->alive = 1;
    cw_queue_set_owner(q, l->owner);
    return l->cand ? 0 : -1;
}

void
cw_lease_free(cw_lease_t *l)
{
    free(l->cand);
    l->cand = NULL;
}

static void
lease_cmd(cw_lease_t *l, cw_redis_t *c, int s, int ttl)
{
    char        key[32], ttl_s[16];
    const char *argv[6];
    size_t      lens[6];

    snprintf(key, sizeof(key), "chat:{s%d}:lease", s);
    snprintf(ttl_s, sizeof(ttl_s), "%d", ttl);
    argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_FANOUT_LEASE); argv[2] = "1";
    argv[3] = key; argv[4] = l->owner; argv[5] = ttl_s;
    for (int j = 0; j < 6; j++) lens[j] = strlen(argv[j]);
    cw_redis_append_argv(c, 6, argv, lens);
}

static void
live_cmd(cw_lease_t *l, cw_redis_t *c, int ttl)
{
    char        ttl_s[16];
    const char *argv[6];
    size_t      lens[6];

    snprintf(ttl_s, sizeof(ttl_s), "%d", ttl);
    argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_FANOUT_LIVE); argv[2] = "1";
    argv[3] = LIVE_KEY; argv[4] = l->owner; argv[5] = ttl_s;
    for (int j = 0; j < 6; j++) lens[j] = strlen(argv[j]);
    cw_redis_append_argv(c, 6, argv, lens);
}

/* A script reply: its integer, -1 for an error (-2: NOSCRIPT). */
static long long
reply_int(redisReply *r, const char *what)
{
    long long v = -1;

    if (r->type == REDIS_REPLY_INTEGER) v = r->integer;
    else if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) v = -2;
    else cw_warn("fanout lease %s: %s", what, r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    freeReplyObject(r);
    return v;
}

int
cw_lease_tick(cw_lease_t *l, cw_redis_t *c)
{
    const cw_config_t *cf = l->cf;
    int64_t            t0 = cw_mono_ms(), until;
    int                ttl = cf->fanout_lease_ms, n = 0, share, noscript = 0;
    redisReply        *r;
    long long          v;

    if (t0 < l->next) return 0;
    until = t0 + ttl;
    /* what was processed on a shard being given back is committed while
     * the lease is surely ours (so the next holder starts there), with
     * whatever else is due */
    if (cw_queue_flush(l->q, c, 0) != 0) return -1;

    /* alive, renewals and give-backs: one pipelined round */
    live_cmd(l, c, ttl);
    for (int s = 0; s < cf->shards; s++) {
        int st = cw_queue_shard_state(l->q, s);
        if (st == 0) continue;
        lease_cmd(l, c, s, st == 2 && !cw_queue_reading(l->q, s) ? 0 : ttl);
        l->cand[n++] = s;
    }
    if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
    v = reply_int(r, "alive");
    if (v > 0) l->alive = (int) v;
    noscript |= v == -2;
    l->held = 0;
    for (int k = 0; k < n; k++) {
        int s = l->cand[k], st = cw_queue_shard_state(l->q, s), giving = st == 2 && !cw_queue_reading(l->q, s);
        if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
        v = reply_int(r, giving ? "give back" : "renew");
        noscript |= v == -2;
        if (giving) {
            /* given back (or not ours any more): either way not ours */
            cw_queue_drop(l->q, s);
            l->n_given++;
            cw_info("fanout: gave back shard %d (%d fan-out workers alive)", s, l->alive);
        } else if (v == 1) {
            cw_queue_valid(l->q, s, until);
        } else if (v == 2) {
            /* it had expired (we could not renew for a lease's time) and
             * was free: taken anew, so whatever another holder may have
             * committed in between is read from its position first */
            l->cand[k] = -1 - s;          /* taken below, after the replies */
            cw_warn("fanout: lease of shard %d had expired; taken again", s);
        } else if (v == 0) {
            cw_queue_drop(l->q, s);
            l->n_lost++;
            cw_warn("fanout: lease of shard %d is held by another worker; not serving it any more", s);
        }
        /* an error (a failover under way): not renewed, so the lease stays
         * sure only until its time and reads stop before; the next round
         * renews or takes it again */
        if (cw_queue_shard_state(l->q, s) == 1) l->held++;
    }
    for (int k = 0; k < n; k++) {
        if (l->cand[k] < 0 && cw_queue_take(l->q, c, -1 - l->cand[k], until) != 0) return -1;
    }
    if (noscript) {
        /* Redis lost its script cache (a restart, a failover to a replica
         * that never had them): load and go again soon */
        if (cw_lua_load(c) != 0) return -1;
        l->next = t0 + 100;
        return 0;
    }

    share = (cf->shards + l->alive - 1) / l->alive;
    if (l->held > share) {
        /* give back the surplus, the highest shards first */
        for (int s = cf->shards - 1; s >= 0 && l->held > share; s--) {
            if (cw_queue_shard_state(l->q, s) != 1) continue;
            cw_queue_drain(l->q, s);
            l->held--;
        }
    } else if (l->held < share) {
        /* try free shards, from a place of our own (so that workers do not
         * all try the same ones), a few at a time until we have our share */
        int start = (int) (cw_now_ms() % cf->shards), nc = 0, k = 0;
        for (int j = 0; j < cf->shards; j++) {
            int s = (start + j) % cf->shards;
            if (cw_queue_shard_state(l->q, s) == 0) l->cand[nc++] = s;
        }
        while (k < nc && l->held < share) {
            int     want = share - l->held, m = 0;
            int64_t sent = cw_mono_ms();
            for (int j = k; j < nc && m < want; j++, m++) lease_cmd(l, c, l->cand[j], ttl);
            for (int j = 0; j < m; j++) {
                if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
                v = reply_int(r, "take");
                if (v < 1) l->cand[k + j] = -1;
            }
            for (int j = 0; j < m; j++) {
                int s = l->cand[k + j];
                if (s < 0) continue;
                if (cw_queue_take(l->q, c, s, sent + ttl) != 0) return -1;
                l->held++;
                l->n_taken++;
                cw_info("fanout: took shard %d (%d fan-out workers alive, %d of %d shards ours)", s, l->alive,
                        l->held, cf->shards);
            }
            k += m;
        }
    }
    l->next = t0 + cf->fanout_lease_renew_ms;
    return 0;
}

void
cw_lease_release(cw_lease_t *l, cw_redis_t *c)
{
    int         n = 0;
    redisReply *r;

    if (c == NULL || cw_redis_err(c)) return;
    if (cw_queue_flush(l->q, c, 1) != 0) return;
    live_cmd(l, c, 0);
    for (int s = 0; s < l->cf->shards; s++) {
        if (cw_queue_shard_state(l->q, s) == 0) continue;
        lease_cmd(l, c, s, 0);
        cw_queue_drop(l->q, s);
        n++;
    }
    for (int k = 0; k <= n; k++) {
        if (cw_redis_get_reply(c, &r) != REDIS_OK) return;
        freeReplyObject(r);
    }
    cw_info("fanout: stopped; gave back %d shard leases", n);
}
