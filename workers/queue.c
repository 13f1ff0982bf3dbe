/*
 * The inbound queue, consumed by the fanout, persist and push roles
 * (docs/PIPELINE.md, "Queue entries" and "Worker roles").
 *
 * Redis Streams: one stream per shard, chat:{s<s>}:in. Each role reads a
 * shard from its own committed position, chat:{s<s>}:pos:<role> (the id of
 * the last entry it processed), with XREAD, and moves the position after a
 * batch was processed: one command per shard and batch, no per-entry state
 * in Redis. (Consumer groups kept a pending-list entry per entry and role,
 * an XACK per entry, and Redis propagated an XCLAIM per entry read to the
 * AOF and the replicas: a quarter of the AOF's bytes, issue 13.) Only the
 * owner of a shard reads it (fanout: the holder of its lease, lease.c;
 * persist and push: their one process), so a position is all the state a
 * consumer needs: a worker killed with -9 and restarted, or the next holder
 * of a lease, reads again from the position whatever was processed and not
 * yet committed; processing is idempotent. The fan-out's commit is fenced by
 * its lease (lua/queue_commit.lua). Streams are trimmed to the lowest
 * position of the roles. An earlier version's consumer group is taken over
 * at the first start (lua/queue_start.lua).
 *
 * Kafka: topic chat.in, partition = shard, consumer groups chat-fanout and
 * chat-persist, offsets committed (asynchronously) after a batch was processed.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CW_TOPIC "chat.in"
#define Q_NONE  0
#define Q_SERVE 1
#define Q_DRAIN 2
#define KAFKA_LINGER_MS 5

struct cw_queue_s {
    const cw_config_t  *cf;
    int                 kafka;
    char                group[16];       /* the role: fanout, persist or push */
    char                consumer[64];
    const char         *owner;           /* our lease holder name (lease.c), with leases */

    /* Redis Streams */
    int                 nshards;
    int                *shards;          /* shard numbers we read */
    char              **keys;            /* their stream keys */
    char              **pkeys;           /* our positions on them, chat:{s<s>}:pos:<role> */
    char              **lkeys;           /* their leases, chat:{s<s>}:lease */
    int                *idx_of;          /* shard number -> index in shards, or -1 */
    /* Positions (stream ids, "<ms>-<seq>"): rpos is where the next read
     * starts (the last entry read), cpos the last one committed as far as
     * we know. A shard with load set has its position read from Redis
     * (lua/queue_start.lua) before it is read again. */
    char              (*rpos)[48];
    char              (*cpos)[48];
    unsigned char      *load;
    int                 nload;
    /* processed, not committed yet (dirty): dpos, to be committed at
     * commit_at (monotonic ms) at the latest */
    char              (*dpos)[48];
    unsigned char      *dirty;
    int64_t            *commit_at;
    /* Shard leases (the fanout role, fanout_lease_ms; workers/lease.c):
     * which shards we serve now (Q_SERVE), are giving back (Q_DRAIN: no
     * new read; its lease is given back once no read is out) or do not
     * hold (Q_NONE), and until when (monotonic ms) our lease is surely
     * still ours. Without leases every shard given is served forever. */
    int                 leases;
    unsigned char      *active;
    int64_t            *valid_until;
    int                 margin_ms;       /* a read must complete this long before the lease may end */
    int                 trim;
    int64_t             next_trim;
    /* Redis Cluster: every stream is in a slot of its own and a blocking
     * read holds its connection, so each stream has a connection of its
     * own to its master for its XREAD BLOCK (one read outstanding at
     * most per stream, so its entries are processed in stream order) */
    redisContext      **rd;
    unsigned char      *rd_out;          /* a read is outstanding on rd[i] */
    int                 redirected;      /* a read came back redirected (its slot moves) */

    /* Kafka */
    rd_kafka_t         *rk;
    rd_kafka_queue_t   *rkq;             /* the consumer queue */
    int                 subscribed;
    int64_t             next_topic_try;
};

int
cw_queue_is_kafka(const cw_queue_t *q)
{
    return q->kafka;
}

static void cw_kafka_close(cw_queue_t *q);

cw_queue_t *
cw_queue_new(const cw_config_t *cf, const char *group, const int *shards, int nshards, int trim)
{
    cw_queue_t *q = calloc(1, sizeof(*q));

    if (q == NULL) return NULL;
    q->cf = cf;
    q->kafka = strcmp(cf->queue, "kafka") == 0;
    snprintf(q->group, sizeof(q->group), "%s", group);
    if (strcmp(group, "fanout") == 0) snprintf(q->consumer, sizeof(q->consumer), "fanout-%d", cf->fanout_index);
    else snprintf(q->consumer, sizeof(q->consumer), "%s-0", group);
    q->trim = trim;
    if (q->kafka) return q;

    q->nshards = nshards;
    q->shards = calloc((size_t) nshards, sizeof(int));
    q->keys = calloc((size_t) nshards, sizeof(char *));
    q->pkeys = calloc((size_t) nshards, sizeof(char *));
    q->lkeys = calloc((size_t) nshards, sizeof(char *));
    q->rpos = calloc((size_t) nshards, sizeof(q->rpos[0]));
    q->cpos = calloc((size_t) nshards, sizeof(q->cpos[0]));
    q->load = calloc((size_t) nshards, 1);
    q->dpos = calloc((size_t) nshards, sizeof(q->dpos[0]));
    q->dirty = calloc((size_t) nshards, 1);
    q->commit_at = calloc((size_t) nshards, sizeof(int64_t));
    q->idx_of = malloc(sizeof(int) * (size_t) cf->shards);
    q->rd = calloc((size_t) nshards, sizeof(redisContext *));
    q->rd_out = calloc((size_t) nshards, 1);
    q->active = calloc((size_t) nshards, 1);
    q->valid_until = calloc((size_t) nshards, sizeof(int64_t));
    if (!q->shards || !q->keys || !q->pkeys || !q->lkeys || !q->rpos || !q->cpos || !q->load || !q->dpos
        || !q->dirty || !q->commit_at || !q->idx_of || !q->rd || !q->rd_out || !q->active || !q->valid_until)
    {
        goto fail;
    }
    q->leases = strcmp(group, "fanout") == 0 && cf->fanout_lease_ms > 0;
    q->margin_ms = cf->fanout_lease_ms / 5;
    for (int s = 0; s < cf->shards; s++) q->idx_of[s] = -1;
    for (int i = 0; i < nshards; i++) {
        q->shards[i] = shards[i];
        q->idx_of[shards[i]] = i;
        q->keys[i] = malloc(32);
        q->pkeys[i] = malloc(48);
        q->lkeys[i] = malloc(32);
        if (q->keys[i] == NULL || q->pkeys[i] == NULL || q->lkeys[i] == NULL) goto fail;
        snprintf(q->keys[i], 32, "chat:{s%d}:in", shards[i]);
        snprintf(q->pkeys[i], 48, "chat:{s%d}:pos:%s", shards[i], q->group);
        snprintf(q->lkeys[i], 32, "chat:{s%d}:lease", shards[i]);
        if (!q->leases) {
            q->active[i] = Q_SERVE;
            q->valid_until[i] = INT64_MAX;
        }
    }
    return q;
fail:
    cw_queue_free(q);
    return NULL;
}

void
cw_queue_free(cw_queue_t *q)
{
    if (q == NULL) return;
    if (q->rk) cw_kafka_close(q);
    for (int i = 0; q->rd && i < q->nshards; i++) if (q->rd[i]) redisFree(q->rd[i]);
    free(q->rd);
    free(q->rd_out);
    for (int i = 0; q->keys && i < q->nshards; i++) free(q->keys[i]);
    for (int i = 0; q->pkeys && i < q->nshards; i++) free(q->pkeys[i]);
    for (int i = 0; q->lkeys && i < q->nshards; i++) free(q->lkeys[i]);
    free(q->keys);
    free(q->pkeys);
    free(q->lkeys);
    free(q->rpos);
    free(q->cpos);
    free(q->load);
    free(q->dpos);
    free(q->dirty);
    free(q->commit_at);
    free(q->shards);
    free(q->idx_of);
    free(q->active);
    free(q->valid_until);
    free(q);
}

/* May a blocking read of `block_ms` be sent on stream i? Only while our
 * lease lasts until that read is surely over on the server (plus a margin
 * for the time the command takes to get there): whatever a read hands us
 * is then ours before the lease can pass to another worker, which reads
 * it again from the position when it takes the shard (the fencing of
 * workers/lease.c). */
static int
readable(const cw_queue_t *q, int i, int block_ms)
{
    return q->active[i] == Q_SERVE && q->valid_until[i] > cw_mono_ms() + block_ms + q->margin_ms;
}


/* ---- Redis Streams -------------------------------------------------------- */

/* Reads n pipelined replies; returns -1 when the connection failed. */
static int
drain(cw_redis_t *c, int n)
{
    redisReply *r;
    for (int i = 0; i < n; i++) {
        if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
        freeReplyObject(r);
    }
    return 0;
}

static int
shard_of_key(const cw_queue_t *q, const char *key)
{
    long s;
    if (strncmp(key, "chat:{s", 7) != 0) return -1;
    s = strtol(key + 7, NULL, 10);
    if (s < 0 || s >= q->cf->shards) return -1;
    return q->idx_of[s];
}

typedef struct { uint64_t ms, seq; } sid_t;

static int
parse_sid(const char *s, sid_t *id)
{
    char *end;
    id->ms = strtoull(s, &end, 10);
    if (*end == '-') id->seq = strtoull(end + 1, &end, 10);
    else id->seq = 0;
    return *end == '\0' && end != s ? 0 : -1;
}

static int
sid_less(sid_t a, sid_t b)
{
    return a.ms < b.ms || (a.ms == b.ms && a.seq < b.seq);
}

static void
set_load(cw_queue_t *q, int i, int on)
{
    if (q->load[i] == on) return;
    q->load[i] = (unsigned char) on;
    q->nload += on ? 1 : -1;
}

/* Stream i is read again from our last committed position: what was read
 * after it and not committed is read again (a lease not sure any more). A
 * read still out started further on, so it goes. */
static void reader_close(cw_queue_t *q, int i);

static void
rewind_to_commit(cw_queue_t *q, int i)
{
    q->dirty[i] = 0;
    q->commit_at[i] = 0;
    memcpy(q->rpos[i], q->cpos[i], sizeof(q->rpos[i]));
    if (q->rd && q->rd[i]) reader_close(q, i);
}

/*
 * The positions of the shards we serve that are to be loaded (only >= 0:
 * just that one), from Redis, in one pipelined round (lua/queue_start.lua:
 * made the first time; an earlier version's consumer group taken over).
 * Redis may have lost its scripts (a restart): loaded and tried again once.
 */
static int
load_positions(cw_queue_t *q, cw_redis_t *c, int only)
{
    const char *start = strcmp(q->group, "push") == 0 ? "$" : "0";
    int         n = 0, rc = 0, noscript = 0;

    for (int tries = 0; tries < 2; tries++) {
        n = 0;
        noscript = 0;
        for (int i = 0; i < q->nshards; i++) {
            const char *argv[7];
            size_t      lens[7];
            if (!q->load[i] || q->active[i] != Q_SERVE || (only >= 0 && i != only)) continue;
            argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_QUEUE_START); argv[2] = "2";
            argv[3] = q->keys[i]; argv[4] = q->pkeys[i]; argv[5] = q->group; argv[6] = start;
            for (int k = 0; k < 7; k++) lens[k] = strlen(argv[k]);
            cw_redis_append_argv(c, 7, argv, lens);
            n++;
        }
        for (int i = 0; i < q->nshards && n > 0; i++) {
            redisReply *r;
            sid_t       id;
            if (!q->load[i] || q->active[i] != Q_SERVE || (only >= 0 && i != only)) continue;
            n--;
            if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
            if (r->type == REDIS_REPLY_STRING && r->len < sizeof(q->rpos[i]) && parse_sid(r->str, &id) == 0) {
                memcpy(q->rpos[i], r->str, r->len + 1);
                memcpy(q->cpos[i], r->str, r->len + 1);
                set_load(q, i, 0);
            } else if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
                noscript = 1;
            } else {
                cw_error("%s: position on %s: %s", q->consumer, q->keys[i],
                         r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
                rc = -1;
            }
            freeReplyObject(r);
        }
        if (!noscript || rc != 0) break;
        if (cw_lua_load(c) != 0) return -1;
    }
    return rc != 0 || noscript ? -1 : 0;
}

static int
redis_setup(cw_queue_t *q, cw_redis_t *c)
{
    /* a new client: the readers of the last one go, and every position is
     * read again (what was read and not committed is read again) */
    for (int i = 0; i < q->nshards; i++) {
        if (q->rd[i]) redisFree(q->rd[i]);
        q->rd[i] = NULL;
        q->rd_out[i] = 0;
        q->dirty[i] = 0;           /* not committed: read again from the position */
        q->commit_at[i] = 0;
        set_load(q, i, 1);
    }
    if (load_positions(q, c, -1) != 0) return -1;
    q->next_trim = cw_mono_ms() + 1000;
    return 0;
}

/* An entry that cannot be processed keeps a copy of its fields, for the
 * dead-letter queue. */
static void
keep_fields(cw_entry_t *e, const redisReply *f)
{
    const char **v = malloc(sizeof(char *) * (f->elements + 1));
    size_t      *l = malloc(sizeof(size_t) * (f->elements + 1));
    int          n = 0;

    if (v && l) {
        for (size_t j = 0; j + 1 < f->elements; j += 2) {
            const redisReply *k = f->element[j], *x = f->element[j + 1];
            if (k->type != REDIS_REPLY_STRING || x->type != REDIS_REPLY_STRING) continue;
            v[n] = k->str; l[n++] = k->len;
            v[n] = x->str; l[n++] = x->len;
        }
        if (cw_entry_keep_raw(e, v, l, n, 0) != 0) cw_warn("out of memory keeping entry %s", e->qid);
    }
    free(v);
    free(l);
}

static void
parse_fields(cw_entry_t *e, const redisReply *f)
{
    if (f == NULL || f->type != REDIS_REPLY_ARRAY) {
        e->why = "entry deleted from the stream";
        return;
    }
    for (size_t j = 0; j + 1 < f->elements; j += 2) {
        const redisReply *k = f->element[j], *v = f->element[j + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING) continue;
        if (cw_entry_field(e, k->str, k->len, v->str, v->len) != 0) {
            if (e->why == NULL) e->why = "a field is too long or malformed";
            keep_fields(e, f);
            return;
        }
    }
    cw_entry_finish(e);
    if (!e->valid) keep_fields(e, f);
}

/* Appends the entries of an XREAD reply to b; each stream's read position
 * moves to its last entry. */
static int
take_reply(cw_queue_t *q, redisReply *r, cw_batch_t *b)
{
    if (r->type != REDIS_REPLY_ARRAY) return 0;             /* nil: nothing within the block time */
    for (size_t i = 0; i < r->elements; i++) {
        redisReply *sr = r->element[i];
        int         idx;
        if (sr->type != REDIS_REPLY_ARRAY || sr->elements < 2 || sr->element[0]->type != REDIS_REPLY_STRING)
            continue;
        idx = shard_of_key(q, sr->element[0]->str);
        if (idx < 0) continue;
        if (sr->element[1]->type != REDIS_REPLY_ARRAY) continue;
        for (size_t j = 0; j < sr->element[1]->elements; j++) {
            redisReply *er = sr->element[1]->element[j];
            cw_entry_t *e;
            if (er->type != REDIS_REPLY_ARRAY || er->elements < 1 || er->element[0]->type != REDIS_REPLY_STRING
                || er->element[0]->len >= sizeof(q->rpos[idx]))
            {
                continue;
            }
            e = cw_batch_add(b);
            if (e == NULL) return -1;
            e->shard = q->shards[idx];
            snprintf(e->qid, sizeof(e->qid), "%s", er->element[0]->str);
            memcpy(q->rpos[idx], er->element[0]->str, er->element[0]->len + 1);
            parse_fields(e, er->elements > 1 ? er->element[1] : NULL);
        }
    }
    return 0;
}

static int
redis_read(cw_queue_t *q, cw_redis_t *c, cw_batch_t *b, int block_ms)
{
    int          n = 0, argc, rc, nkeys;
    const char **argv;
    size_t      *lens;
    char         count[16], block[16];
    redisReply  *r;

    argv = malloc(sizeof(char *) * (size_t) (2 * q->nshards + 10));
    lens = malloc(sizeof(size_t) * (size_t) (2 * q->nshards + 10));
    if (argv == NULL || lens == NULL) { free(argv); free(lens); return -1; }
    snprintf(count, sizeof(count), "%d", q->cf->batch);
    snprintf(block, sizeof(block), "%d", block_ms);
    argv[n++] = "XREAD";
    argv[n++] = "COUNT";
    argv[n++] = count;
    argv[n++] = "BLOCK";
    argv[n++] = block;
    argv[n++] = "STREAMS";
    argc = n;
    for (int i = 0; i < q->nshards; i++) {
        if (q->load[i] || !readable(q, i, block_ms)) continue;
        argv[n++] = q->keys[i];
    }
    nkeys = n - argc;                           /* one id per key */
    if (nkeys == 0) {
        /* no shard to read now (leases: none held, or none for long
         * enough): the caller's loop renews and takes leases */
        free(argv);
        free(lens);
        cw_sleep_ms(block_ms < 100 ? block_ms : 100);
        return 0;
    }
    for (int i = 0; i < q->nshards; i++) {
        if (q->load[i] || !readable(q, i, block_ms)) continue;
        argv[n++] = q->rpos[i];
    }
    for (int i = 0; i < n; i++) lens[i] = strlen(argv[i]);
    r = cw_redis_command_argv(c, n, argv, lens);
    free(argv);
    free(lens);
    if (r == NULL) return -1;
    if (r->type == REDIS_REPLY_ERROR) {
        cw_error("XREAD: %s", r->str);
        freeReplyObject(r);
        return -1;
    }
    rc = take_reply(q, r, b);
    freeReplyObject(r);
    return rc;
}


/* ---- Redis Cluster: a read per stream ------------------------------------- */

static void
reader_close(cw_queue_t *q, int i)
{
    if (q->rd[i]) redisFree(q->rd[i]);
    q->rd[i] = NULL;
    q->rd_out[i] = 0;
}

/* Starts stream i's blocking read on its own connection. */
static int
reader_send(cw_queue_t *q, cw_redis_t *c, int i, int block_ms)
{
    int done = 0;

    if (q->rd[i] == NULL && (q->rd[i] = cw_redis_dial_for(c, q->keys[i], strlen(q->keys[i]))) == NULL) return -1;
    redisAppendCommand(q->rd[i], "XREAD COUNT %d BLOCK %d STREAMS %s %s", q->cf->batch, block_ms, q->keys[i],
                       q->rpos[i]);
    while (!done) {
        if (redisBufferWrite(q->rd[i], &done) != REDIS_OK) {
            cw_warn("%s: read of %s: %s", q->consumer, q->keys[i], q->rd[i]->errstr);
            reader_close(q, i);
            return -1;
        }
    }
    q->rd_out[i] = 1;
    return 0;
}

/* The reply of stream i's read: waited for (wait), or taken when it has
 * arrived (after poll). Entries go to b. -1: the connection failed. */
static int
reader_recv(cw_queue_t *q, cw_redis_t *c, int i, cw_batch_t *b, int wait)
{
    redisReply *r = NULL;
    int         rc = 0;

    if (wait) {
        if (redisGetReply(q->rd[i], (void **) &r) != REDIS_OK) r = NULL;
        if (r == NULL) goto lost;
    } else {
        if (redisBufferRead(q->rd[i]) != REDIS_OK || redisGetReplyFromReader(q->rd[i], (void **) &r) != REDIS_OK)
            goto lost;
        if (r == NULL) return 0;                    /* not all of it yet */
    }
    q->rd_out[i] = 0;
    if (r->type == REDIS_REPLY_ERROR) {
        /* The stream's slot moves: MOVED (the map learns it and the next
         * read goes there), ASK or TRYAGAIN while it migrates, UNBLOCKED
         * when the key left the node under a blocked read. Nothing was
         * delivered: read it again next time. Anything else sets up again
         * after a reconnect. */
        static const char *moving[] = { "MOVED", "ASK", "TRYAGAIN", "UNBLOCKED", "CLUSTERDOWN" };
        int                moved = 0;
        for (size_t k = 0; k < sizeof(moving) / sizeof(moving[0]); k++)
            moved |= strncmp(r->str, moving[k], strlen(moving[k])) == 0;
        if (moved) {
            cw_redis_note(c, r);
            q->redirected = 1;
        } else {
            cw_error("XREAD %s: %s", q->keys[i], r->str);
        }
        freeReplyObject(r);
        reader_close(q, i);
        return moved ? 0 : -1;
    }
    rc = take_reply(q, r, b);
    freeReplyObject(r);
    return rc;
lost:
    cw_warn("%s: read of %s: %s", q->consumer, q->keys[i], q->rd[i]->errstr[0] ? q->rd[i]->errstr : "lost");
    reader_close(q, i);
    return -1;
}

static int
cluster_fetch(cw_queue_t *q, cw_redis_t *c, cw_batch_t *b, int block_ms)
{
    struct pollfd *pf;
    int           *who, rc = 0;
    int64_t        deadline;

    /* a blocking read out on every stream (those still out
     * from the last fetch stay out), then whatever has come back within
     * block_ms; once something has, only what is back already */
    for (int i = 0; i < q->nshards; i++) {
        if (!q->load[i] && !q->rd_out[i] && readable(q, i, block_ms) && reader_send(q, c, i, block_ms) != 0)
            return -1;
    }
    pf = malloc(sizeof(*pf) * (size_t) q->nshards);
    who = malloc(sizeof(int) * (size_t) q->nshards);
    if (pf == NULL || who == NULL) { free(pf); free(who); return -1; }
    deadline = cw_mono_ms() + block_ms;
    while (!cw_stop) {
        int     n = 0, ready;
        int64_t left = deadline - cw_mono_ms();
        for (int i = 0; i < q->nshards; i++) {
            if (!q->rd_out[i]) continue;
            pf[n].fd = q->rd[i]->fd;
            pf[n].events = POLLIN;
            pf[n].revents = 0;
            who[n++] = i;
        }
        if (n == 0) {
            /* no stream to wait for (leases: none held now): not a busy loop */
            if (b->n == 0) cw_sleep_ms(block_ms < 100 ? block_ms : 100);
            break;
        }
        ready = poll(pf, (nfds_t) n, b->n > 0 || left < 0 ? 0 : (int) left);
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) break;
        for (int k = 0; k < n && rc == 0; k++) {
            if (pf[k].revents) rc = reader_recv(q, c, who[k], b, 0);
        }
        if (rc != 0) break;
    }
    free(pf);
    free(who);
    if (rc == 0 && b->n == 0 && q->redirected) cw_sleep_ms(10);   /* a migration: not a busy loop */
    q->redirected = 0;
    return rc != 0 ? -1 : b->n;
}

/* ---- Kafka ------------------------------------------------------------------ */

static void
cw_kafka_close(cw_queue_t *q)
{
    if (q->rkq) rd_kafka_queue_destroy(q->rkq);
    q->rkq = NULL;
    rd_kafka_consumer_close(q->rk);
    rd_kafka_destroy(q->rk);
    q->rk = NULL;
    q->subscribed = 0;
}

static void
kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void) rk;
    if (level <= 4) cw_warn("kafka %s: %s", fac, buf);
}

/* The outcome of an asynchronous commit (served by the next poll). A lost
 * commit only means a batch is read again: processing is idempotent. */
static void
kafka_committed(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    (void) rk;
    (void) offsets;
    (void) opaque;
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET) cw_warn("kafka commit: %s", rd_kafka_err2str(err));
}

static int
kafka_create(cw_queue_t *q)
{
    char             err[512], gid[64];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();

    snprintf(gid, sizeof(gid), "chat-%s", q->group);
    if (rd_kafka_conf_set(conf, "bootstrap.servers", q->cf->kafka_brokers, err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "group.id", gid, err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "client.id", q->consumer, err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "enable.partition.eof", "false", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "max.poll.interval.ms", "600000", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "session.timeout.ms", "6000", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "heartbeat.interval.ms", "1000", err, sizeof(err)) != RD_KAFKA_CONF_OK)
    {
        cw_error("kafka consumer config: %s", err);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_conf_set_log_cb(conf, kafka_log);
    rd_kafka_conf_set_offset_commit_cb(conf, kafka_committed);
    q->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof(err));
    if (q->rk == NULL) {
        cw_error("kafka consumer: %s", err);
        return -1;
    }
    rd_kafka_poll_set_consumer(q->rk);
    return 0;
}

/* chat.in must exist with one partition per shard: create it, or add
 * partitions when it has fewer (existing partitions keep their data). */
static int
kafka_ensure_topic(cw_queue_t *q)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t   *t;
    rd_kafka_resp_err_t err;
    int                 have = -1;

    t = rd_kafka_topic_new(q->rk, CW_TOPIC, NULL);
    err = rd_kafka_metadata(q->rk, 0, t, &md, 5000);
    rd_kafka_topic_destroy(t);
    if (err) {
        cw_warn("kafka metadata: %s", rd_kafka_err2str(err));
        return -1;
    }
    if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR) have = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    if (have >= q->cf->shards) return 0;

    {
        char                  errstr[256];
        rd_kafka_queue_t     *rq = rd_kafka_queue_new(q->rk);
        rd_kafka_event_t     *ev;
        rd_kafka_AdminOptions_t *opts = rd_kafka_AdminOptions_new(q->rk, RD_KAFKA_ADMIN_OP_ANY);
        int                   ok = 0;

        rd_kafka_AdminOptions_set_request_timeout(opts, 10000, errstr, sizeof(errstr));
        if (have < 0) {
            rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(CW_TOPIC, q->cf->shards, -1, errstr, sizeof(errstr));
            if (nt == NULL) { cw_error("NewTopic: %s", errstr); goto out; }
            rd_kafka_CreateTopics(q->rk, &nt, 1, opts, rq);
            rd_kafka_NewTopic_destroy(nt);
        } else {
            rd_kafka_NewPartitions_t *np = rd_kafka_NewPartitions_new(CW_TOPIC, (size_t) q->cf->shards,
                                                                      errstr, sizeof(errstr));
            if (np == NULL) { cw_error("NewPartitions: %s", errstr); goto out; }
            rd_kafka_CreatePartitions(q->rk, &np, 1, opts, rq);
            rd_kafka_NewPartitions_destroy(np);
        }
        ev = rd_kafka_queue_poll(rq, 15000);
        if (ev) {
            const rd_kafka_topic_result_t **res = NULL;
            size_t                          cnt = 0;
            if (rd_kafka_event_error(ev)) {
                cw_warn("kafka topic admin: %s", rd_kafka_event_error_string(ev));
            } else {
                if (rd_kafka_event_type(ev) == RD_KAFKA_EVENT_CREATETOPICS_RESULT)
                    res = rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &cnt);
                else
                    res = rd_kafka_CreatePartitions_result_topics(rd_kafka_event_CreatePartitions_result(ev), &cnt);
                ok = 1;
                for (size_t i = 0; i < cnt; i++) {
                    rd_kafka_resp_err_t e = rd_kafka_topic_result_error(res[i]);
                    if (e && e != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) {
                        cw_warn("kafka topic %s: %s", CW_TOPIC, rd_kafka_topic_result_error_string(res[i]));
                        ok = 0;
                    }
                }
                if (ok) cw_info("kafka topic %s: %d partitions", CW_TOPIC, q->cf->shards);
            }
            rd_kafka_event_destroy(ev);
        }
out:
        rd_kafka_AdminOptions_destroy(opts);
        rd_kafka_queue_destroy(rq);
        return ok ? 0 : -1;
    }
}

static int
kafka_fetch(cw_queue_t *q, cw_batch_t *b, int block_ms)
{
    int64_t deadline = cw_mono_ms() + block_ms;

    if (q->rk == NULL && kafka_create(q) != 0) {
        cw_sleep_ms(block_ms);
        return 0;
    }
    if (!q->subscribed) {
        rd_kafka_topic_partition_list_t *tl;
        rd_kafka_resp_err_t               err;
        if (cw_mono_ms() < q->next_topic_try) {
            cw_sleep_ms(block_ms);
            return 0;
        }
        if (kafka_ensure_topic(q) != 0) {
            q->next_topic_try = cw_mono_ms() + 2000;
            return 0;
        }
        tl = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(tl, CW_TOPIC, RD_KAFKA_PARTITION_UA);
        err = rd_kafka_subscribe(q->rk, tl);
        rd_kafka_topic_partition_list_destroy(tl);
        if (err) {
            cw_error("kafka subscribe: %s", rd_kafka_err2str(err));
            q->next_topic_try = cw_mono_ms() + 2000;
            return 0;
        }
        q->subscribed = 1;
        cw_info("%s: subscribed to kafka topic %s as group chat-%s", q->consumer, CW_TOPIC, q->group);
    }
    /* The same bound as a Redis batch (batch per stream, one stream per
     * shard): one commit per batch.
     * The first record is waited for up to block_ms; then KAFKA_LINGER_MS
     * once for more (records of one conversation produced by different
     * nginx processes may arrive out of seq order a few ms apart, and the
     * fan-out orders a conversation's messages within a batch); then what
     * is there. (rd_kafka_consume_batch_queue waits to fill the array.) */
    {
        int                  max = q->cf->batch * q->cf->shards, round = 0;
        rd_kafka_message_t  *ms[256];

        if (q->rkq == NULL) q->rkq = rd_kafka_queue_get_consumer(q->rk);
        while (b->n < max && !cw_stop) {
            size_t  want = (size_t) (max - b->n) < 256 ? (size_t) (max - b->n) : 256;
            ssize_t got;

            if (round == 0) {
                int64_t left = deadline - cw_mono_ms();
                ms[0] = rd_kafka_consumer_poll(q->rk, left > 0 ? (int) left : 0);
                got = ms[0] ? 1 : 0;
            } else {
                got = rd_kafka_consume_batch_queue(q->rkq, round == 1 ? KAFKA_LINGER_MS : 0, ms, want);
            }
            round++;
            if (got <= 0) break;
            for (ssize_t k = 0; k < got; k++) {
                rd_kafka_message_t *m = ms[k];
                cw_entry_t         *e;
                if (m->err) {
                    if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                        cw_warn("kafka consume: %s", rd_kafka_message_errstr(m));
                    rd_kafka_message_destroy(m);
                    continue;
                }
                e = cw_batch_add(b);
                if (e == NULL) {
                    for (; k < got; k++) rd_kafka_message_destroy(ms[k]);
                    return -1;
                }
                e->shard = m->partition;
                e->offset = m->offset;
                snprintf(e->qid, sizeof(e->qid), "%d@%" PRId64, (int) m->partition, m->offset);
                if (m->payload && cw_entry_from_json(e, m->payload, m->len) == 0) cw_entry_finish(e);
                else if (e->why == NULL) e->why = "empty record";
                if (!e->valid) {
                    const char *v = m->payload ? (const char *) m->payload : "";
                    size_t      l = m->payload ? m->len : 0;
                    if (cw_entry_keep_raw(e, &v, &l, 1, 1) != 0) cw_warn("out of memory keeping record %s", e->qid);
                }
                rd_kafka_message_destroy(m);
            }
            if (round > 1 && (size_t) got < want) break;
        }
    }
    return b->n;
}

static int
kafka_commit(cw_queue_t *q, const cw_batch_t *b)
{
    rd_kafka_topic_partition_list_t *tl;
    rd_kafka_resp_err_t               err;

    if (b->n == 0 || q->rk == NULL) return 0;
    tl = rd_kafka_topic_partition_list_new(16);
    for (int i = 0; i < b->n; i++) {
        rd_kafka_topic_partition_t *p = rd_kafka_topic_partition_list_find(tl, CW_TOPIC, b->e[i].shard);
        if (p == NULL) p = rd_kafka_topic_partition_list_add(tl, CW_TOPIC, b->e[i].shard);
        if (b->e[i].offset + 1 > p->offset) p->offset = b->e[i].offset + 1;
    }
    /* Asynchronous: the next batch does not wait for the coordinator's
     * answer (a synchronous commit was a broker round trip per batch on the
     * delivery path). The broker applies a consumer's commits in order; one
     * that fails (a rebalance) means the new owner re-reads from the last
     * commit, and processing is idempotent: nothing is lost or shown twice. */
    err = rd_kafka_commit(q->rk, tl, 1);
    rd_kafka_topic_partition_list_destroy(tl);
    if (err) {
        cw_warn("kafka commit: %s", rd_kafka_err2str(err));
        return -1;
    }
    return 0;
}


/* ---- the interface ---------------------------------------------------------- */

int
cw_queue_setup(cw_queue_t *q, cw_redis_t *c)
{
    if (q->kafka) return 0;
    return redis_setup(q, c);
}

int
cw_queue_fetch(cw_queue_t *q, cw_redis_t *c, cw_batch_t *b, int block_ms)
{
    cw_batch_clear(b);
    if (q->kafka) return kafka_fetch(q, b, block_ms);
    /* shards taken (leases) or rewound since the last fetch: their
     * positions first */
    if (q->nload > 0 && load_positions(q, c, -1) != 0) return -1;
    if (cw_redis_is_cluster(c)) return cluster_fetch(q, c, b, block_ms);
    if (redis_read(q, c, b, block_ms) != 0) return -1;
    return b->n;
}

/* Appends the commit of shard i's processed position. */
static void
commit_cmd(cw_queue_t *q, cw_redis_t *c, int i)
{
    const char *argv[7];
    size_t      lens[7];
    int         argc = 0;

    if (q->leases) {
        /* fenced: Redis refuses it when the lease is not ours */
        argv[argc++] = "EVALSHA";
        argv[argc++] = cw_lua_sha(CHAT_LUA_QUEUE_COMMIT);
        argv[argc++] = "2";
        argv[argc++] = q->pkeys[i];
        argv[argc++] = q->lkeys[i];
        argv[argc++] = q->dpos[i];
        argv[argc++] = q->owner ? q->owner : "";
    } else {
        /* the one reader of the shard (persist, push, a static fan-out
         * split) commits in order: a plain SET */
        argv[argc++] = "SET";
        argv[argc++] = q->pkeys[i];
        argv[argc++] = q->dpos[i];
    }
    for (int k = 0; k < argc; k++) lens[k] = strlen(argv[k]);
    cw_redis_append_argv(c, argc, argv, lens);
    memcpy(q->cpos[i], q->dpos[i], sizeof(q->cpos[i]));
    q->dirty[i] = 0;
    q->commit_at[i] = 0;
}

/* May shard i's processed position be committed now? Only while the lease
 * is surely ours: else the position stays where it was, and whoever
 * serves the shard next reads from there. */
static int
committable(cw_queue_t *q, int i)
{
    if (q->active[i] != Q_NONE && q->valid_until[i] > cw_mono_ms()) return 1;
    cw_warn("%s: lease of shard %d not sure any more; %s not committed", q->consumer, q->shards[i], q->dpos[i]);
    if (q->active[i] != Q_NONE) rewind_to_commit(q, i);
    else q->dirty[i] = 0;
    return 0;
}

int
cw_queue_ack(cw_queue_t *q, cw_redis_t *c, const cw_batch_t *b)
{
    int     n = 0;
    int64_t now = cw_mono_ms();
    sid_t  *top;

    if (q->kafka) return kafka_commit(q, b);
    if (b->n == 0) return 0;
    /* the last entry of each shard in the batch (a batch lists a shard's
     * entries in stream order, but persist's window joins several reads) */
    top = calloc((size_t) q->nshards, sizeof(sid_t));
    if (top == NULL) return -1;
    for (int i = 0; i < b->n; i++) {
        int   idx = q->idx_of[b->e[i].shard];
        sid_t id;
        if (idx < 0 || parse_sid(b->e[i].qid, &id) != 0) continue;
        if (sid_less(top[idx], id)) top[idx] = id;
    }
    for (int i = 0; i < q->nshards; i++) {
        if (top[i].ms == 0 && top[i].seq == 0) continue;
        snprintf(q->dpos[i], sizeof(q->dpos[i]), "%" PRIu64 "-%" PRIu64, top[i].ms, top[i].seq);
        q->dirty[i] = 1;
        /* A shard's position is committed at most every queue_commit_ms
         * (and when its lease is given back, or the worker stops): one
         * command per shard per interval instead of one per batch, whose
         * price is that a worker killed -9 or cut off processes up to that
         * much again (idempotent) */
        if (q->commit_at[i] == 0) q->commit_at[i] = now + q->cf->queue_commit_ms;
        /* Our lease may have passed to another worker while we worked (a
         * pause longer than the lease): not committed, and read again from
         * our last commit if the shard is still ours. The entries were
         * processed; whoever serves the shard next reads them from the
         * position and processes them again, which the inbox script makes
         * a re-publish with the same cursors. */
        if (!committable(q, i)) continue;
        if (now < q->commit_at[i] && q->active[i] == Q_SERVE) continue;   /* with the next one */
        commit_cmd(q, c, i);
        n++;
    }
    free(top);
    return n;
}

int
cw_queue_flush(cw_queue_t *q, cw_redis_t *c, int all)
{
    int64_t now = cw_mono_ms();
    int     n = 0;

    if (q->kafka || c == NULL) return 0;
    for (int i = 0; i < q->nshards; i++) {
        if (!q->dirty[i] || (!all && now < q->commit_at[i] && q->active[i] == Q_SERVE)) continue;
        if (!committable(q, i)) continue;
        commit_cmd(q, c, i);
        n++;
    }
    for (int k = 0; k < n; k++) {
        redisReply *r;
        if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
        if (r->type == REDIS_REPLY_ERROR) {
            /* NOSCRIPT (Redis restarted): the caller reconnects, which loads
             * the scripts, and the position is read again from Redis */
            cw_error("%s: commit of a position: %s", q->consumer, r->str);
            freeReplyObject(r);
            return -1;
        }
        freeReplyObject(r);
    }
    return 0;
}

/* Trim every stream to the lowest position of the roles (XTRIM MINID keeps
 * that entry and what follows; approximate: whole nodes only). The fanout
 * and persist positions must both exist, so a role that has not started
 * yet never misses what it has not read; push counts once it has run. */
static int
trim_streams(cw_queue_t *q, cw_redis_t *c)
{
    redisReply *r;
    sid_t      *minid = calloc((size_t) q->nshards, sizeof(sid_t));
    int        *ok = calloc((size_t) q->nshards, sizeof(int));
    int         n = 0, rc = 0;

    if (minid == NULL || ok == NULL) { free(minid); free(ok); return 0; }
    for (int i = 0; i < q->nshards; i++) {
        if (q->leases && q->active[i] == Q_NONE) continue;   /* another worker trims it */
        /* one slot ({s<s>}): one MGET */
        cw_redis_append(c, "MGET chat:{s%d}:pos:fanout chat:{s%d}:pos:persist chat:{s%d}:pos:push", q->shards[i],
                        q->shards[i], q->shards[i]);
    }
    for (int i = 0; i < q->nshards; i++) {
        int   have = 0, bad = 0;
        sid_t m = { 0, 0 };
        if (q->leases && q->active[i] == Q_NONE) continue;
        if (cw_redis_get_reply(c, &r) != REDIS_OK) { rc = -1; goto out; }
        if (r->type == REDIS_REPLY_ARRAY && r->elements == 3) {
            for (size_t k = 0; k < 3; k++) {
                sid_t id;
                if (r->element[k]->type != REDIS_REPLY_STRING) {
                    if (k < 2) bad = 1;                         /* fanout or persist not started */
                    continue;
                }
                if (parse_sid(r->element[k]->str, &id) != 0) { bad = 1; continue; }
                if (!have || sid_less(id, m)) m = id;
                have = 1;
            }
        } else {
            bad = 1;
        }
        if (have && !bad && (m.ms > 0 || m.seq > 0)) {
            minid[i] = m;
            ok[i] = 1;
        }
        freeReplyObject(r);
    }
    for (int i = 0; i < q->nshards; i++) {
        char id[48];
        if (!ok[i]) continue;
        snprintf(id, sizeof(id), "%" PRIu64 "-%" PRIu64, minid[i].ms, minid[i].seq);
        cw_redis_append(c, "XTRIM %s MINID ~ %s", q->keys[i], id);
        n++;
    }
    rc = drain(c, n);
out:
    free(minid);
    free(ok);
    return rc;
}

int
cw_queue_maintain(cw_queue_t *q, cw_redis_t *c)
{
    int64_t now = cw_mono_ms();

    if (q->kafka) return 0;
    if (cw_queue_flush(q, c, 0) != 0) return -1;
    if (q->trim && now >= q->next_trim) {
        if (trim_streams(q, c) != 0) return -1;
        q->next_trim = now + 5000;
    }
    return 0;
}


/* ---- shard leases (workers/lease.c decides, the queue obeys) -------------- */

void
cw_queue_set_owner(cw_queue_t *q, const char *owner)
{
    q->owner = owner;
}

int
cw_queue_leases(const cw_queue_t *q)
{
    return !q->kafka && q->leases;
}

int
cw_queue_shard_state(const cw_queue_t *q, int s)
{
    return q->active[q->idx_of[s]];
}

int
cw_queue_reading(const cw_queue_t *q, int s)
{
    return q->rd_out[q->idx_of[s]];
}

void
cw_queue_valid(cw_queue_t *q, int s, int64_t until)
{
    q->valid_until[q->idx_of[s]] = until;
}

int
cw_queue_take(cw_queue_t *q, cw_redis_t *c, int s, int64_t until)
{
    int i = q->idx_of[s];

    q->active[i] = Q_SERVE;
    q->valid_until[i] = until;
    /* read from the position the last holder committed: what it read and
     * did not commit is ours now, processed first, in stream order. Taken
     * after the lease was: a commit of the last holder after that is
     * refused (lua/queue_commit.lua), one before is seen here. */
    set_load(q, i, 1);
    return load_positions(q, c, i);
}

void
cw_queue_drain(cw_queue_t *q, int s)
{
    int i = q->idx_of[s];

    if (q->active[i] != Q_SERVE) return;
    q->active[i] = Q_DRAIN;      /* what is not committed is the next holder's */
}

void
cw_queue_drop(cw_queue_t *q, int s)
{
    int i = q->idx_of[s];

    set_load(q, i, 0);
    q->dirty[i] = 0;             /* not ours to commit any more */
    q->commit_at[i] = 0;
    q->active[i] = Q_NONE;
    q->valid_until[i] = 0;
    /* a read still out was sent while the lease was sure; what it would
     * hand us is after our last commit, so the next holder reads it */
    if (q->rd && q->rd[i]) reader_close(q, i);
}
