/*
 * The inbound queue, consumed by the fanout and persist roles
 * (docs/PIPELINE.md, "Queue entries" and "Worker roles").
 *
 * Redis Streams: one stream per shard, chat:{s<s>}:in, with the consumer
 * groups "fanout" and "persist". Consumer names are stable (fanout-<index>,
 * persist-0), so a worker killed with -9 and restarted finds its own pending
 * entries and processes them first, in stream order, before reading new
 * ones. Entries another consumer left pending are claimed: at (re)connect
 * all of them on our shards (only the owner of a shard reads it), later
 * those idle longer than claim_idle_ms. Streams are trimmed to the oldest
 * entry a group still needs.
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
    char                group[16];
    char                consumer[64];

    /* Redis Streams */
    int                 nshards;
    int                *shards;          /* shard numbers we read */
    char              **keys;            /* their stream keys */
    int                *idx_of;          /* shard number -> index in shards, or -1 */
    unsigned char      *pending;         /* still re-reading our pending entries */
    /* Shard leases (the fanout role, fanout_lease_ms; workers/lease.c):
     * which shards we serve now (Q_SERVE), are giving back (Q_DRAIN: no
     * new read; its lease is given back once no read is out) or do not
     * hold (Q_NONE), and until when (monotonic ms) our lease is surely
     * still ours. Without leases every shard given is served forever. */
    int                 leases;
    unsigned char      *active;
    int64_t            *valid_until;
    int                 margin_ms;       /* a read must complete this long before the lease may end */
    int                 npending;
    int                 trim;
    int64_t             next_trim;
    int64_t             next_claim;
    /* Redis Cluster: every stream is in a slot of its own and a blocking
     * read holds its connection, so each stream has a connection of its
     * own to its master for its XREADGROUP BLOCK (one read outstanding at
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
    q->pending = calloc((size_t) nshards, 1);
    q->idx_of = malloc(sizeof(int) * (size_t) cf->shards);
    q->rd = calloc((size_t) nshards, sizeof(redisContext *));
    q->rd_out = calloc((size_t) nshards, 1);
    q->active = calloc((size_t) nshards, 1);
    q->valid_until = calloc((size_t) nshards, sizeof(int64_t));
    if (!q->shards || !q->keys || !q->pending || !q->idx_of || !q->rd || !q->rd_out || !q->active
        || !q->valid_until)
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
        if (q->keys[i] == NULL) goto fail;
        snprintf(q->keys[i], 32, "chat:{s%d}:in", shards[i]);
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
    free(q->keys);
    free(q->shards);
    free(q->pending);
    free(q->idx_of);
    free(q->active);
    free(q->valid_until);
    free(q);
}

/* May a blocking read of `block_ms` be sent on stream i? Only while our
 * lease lasts until that read is surely over on the server (plus a margin
 * for the time the command takes to get there): whatever a read hands us
 * is then ours before the lease can pass to another worker, which claims
 * it when it takes the shard (the fencing of workers/lease.c). */
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

/* Does a consumer other than us hold pending entries of the group on this
 * stream? (reply of the summary form of XPENDING) */
static int
others_pending(const cw_queue_t *q, const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 4 || r->element[3]->type != REDIS_REPLY_ARRAY) return 0;
    for (size_t i = 0; i < r->element[3]->elements; i++) {
        const redisReply *cr = r->element[3]->element[i];
        if (cr->type == REDIS_REPLY_ARRAY && cr->elements >= 1 && cr->element[0]->type == REDIS_REPLY_STRING
            && strcmp(cr->element[0]->str, q->consumer) != 0)
        {
            return 1;
        }
    }
    return 0;
}

/*
 * Takes over the pending entries other consumers left on our streams and
 * marks those shards as pending for us (processed first, in id order):
 * entries idle at least min_idle ms, one page of `batch` per stream, or the
 * whole stream when all is set.
 */
static int
claim(cw_queue_t *q, cw_redis_t *c, long long min_idle, int all, int only)
{
    char           idle[32], count[32];
    redisReply    *r;
    unsigned char *want;
    int            rounds = 0, rc = 0, n = 0;

    want = calloc((size_t) q->nshards, 1);
    if (want == NULL) return 0;
    /* the shards we serve (only: just that one) */
    for (int i = 0; i < q->nshards; i++) {
        if (q->active[i] != Q_SERVE || (only >= 0 && i != only)) continue;
        cw_redis_append(c, "XPENDING %s %s", q->keys[i], q->group);
        want[i] = 2;
        n++;
    }
    for (int i = 0; i < q->nshards && n > 0; i++) {
        if (!want[i]) continue;
        n--;
        if (cw_redis_get_reply(c, &r) != REDIS_OK) { free(want); return -1; }
        want[i] = (unsigned char) others_pending(q, r);
        freeReplyObject(r);
    }
    snprintf(idle, sizeof(idle), "%lld", min_idle);
    snprintf(count, sizeof(count), "%d", q->cf->batch);
    for (int i = 0; i < q->nshards && rc == 0; i++) {
        char   start[48] = "0-0";
        size_t got = 0;
        if (!want[i]) continue;
        do {
            r = cw_redis_command(c, "XAUTOCLAIM %s %s %s %s %s COUNT %s", q->keys[i], q->group,
                             q->consumer, idle, start, count);
            if (r == NULL) { rc = -1; break; }
            if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 || r->element[0]->type != REDIS_REPLY_STRING) {
                if (r->type == REDIS_REPLY_ERROR) cw_warn("XAUTOCLAIM %s: %s", q->keys[i], r->str);
                freeReplyObject(r);
                break;
            }
            if (r->element[1]->type == REDIS_REPLY_ARRAY) got += r->element[1]->elements;
            snprintf(start, sizeof(start), "%s", r->element[0]->str);
            freeReplyObject(r);
        } while (all && strcmp(start, "0-0") != 0 && ++rounds < 100000);
        if (got > 0) {
            if (!q->pending[i]) q->npending++;
            q->pending[i] = 1;
            cw_info("%s: took over %zu pending entries of %s left by another consumer",
                    q->consumer, got, q->keys[i]);
        }
    }
    free(want);
    return rc;
}

static int
redis_setup(cw_queue_t *q, cw_redis_t *c)
{
    static const char *groups[] = { "fanout", "persist" };
    redisReply        *r;
    int                n = 0, rc = 0;

    /* a new client: the readers of the last one go (what they had read is
     * pending for us and read again below) */
    for (int i = 0; i < q->nshards; i++) {
        if (q->rd[i]) redisFree(q->rd[i]);
        q->rd[i] = NULL;
        q->rd_out[i] = 0;
    }

    for (int i = 0; i < q->nshards; i++) {
        for (int g = 0; g < 2; g++) {
            cw_redis_append(c, "XGROUP CREATE %s %s 0 MKSTREAM", q->keys[i], groups[g]);
            n++;
        }
        /* an optional consumer (push) starts at the end: it has no business
         * with what was queued before it first ran */
        if (strcmp(q->group, "fanout") != 0 && strcmp(q->group, "persist") != 0) {
            cw_redis_append(c, "XGROUP CREATE %s %s $ MKSTREAM", q->keys[i], q->group);
            n++;
        }
    }
    for (int i = 0; i < n; i++) {
        if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
        if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "BUSYGROUP", 9) != 0) {
            cw_error("XGROUP CREATE: %s", r->str);
            rc = -1;
        }
        freeReplyObject(r);
    }
    if (rc != 0) return -1;

    /* Only the owner of a shard reads it: whatever another consumer name
     * left pending there is from a dead process or an older configuration
     * (with leases: from the worker that held the shard before us). */
    q->npending = 0;
    for (int i = 0; i < q->nshards; i++) {
        q->pending[i] = q->active[i] == Q_SERVE;
        q->npending += q->pending[i];
    }
    if (claim(q, c, 0, 1, -1) != 0) return -1;
    q->next_claim = cw_mono_ms() + q->cf->claim_idle_ms;
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

/* Appends the entries of an XREADGROUP reply to b. In pending mode, a
 * shard that returned nothing has no pending entry left. */
static int
take_reply(cw_queue_t *q, redisReply *r, cw_batch_t *b, int pending_mode)
{
    unsigned char *seen = NULL;

    if (pending_mode) {
        seen = calloc((size_t) q->nshards, 1);
        if (seen == NULL) return -1;
    }
    if (r->type == REDIS_REPLY_ARRAY) {
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
                if (er->type != REDIS_REPLY_ARRAY || er->elements < 1 || er->element[0]->type != REDIS_REPLY_STRING)
                    continue;
                e = cw_batch_add(b);
                if (e == NULL) { free(seen); return -1; }
                e->shard = q->shards[idx];
                snprintf(e->qid, sizeof(e->qid), "%s", er->element[0]->str);
                parse_fields(e, er->elements > 1 ? er->element[1] : NULL);
                if (seen) seen[idx] = 1;
            }
        }
    }
    if (pending_mode) {
        for (int i = 0; i < q->nshards; i++) {
            if (q->pending[i] && !seen[i]) {
                q->pending[i] = 0;
                q->npending--;
            }
        }
        free(seen);
    }
    return 0;
}

static int
redis_read(cw_queue_t *q, cw_redis_t *c, cw_batch_t *b, int block_ms, int pending_mode)
{
    int          n = 0, argc, rc;
    const char **argv;
    size_t      *lens;
    char         count[16], block[16];
    redisReply  *r;

    argv = malloc(sizeof(char *) * (size_t) (2 * q->nshards + 10));
    lens = malloc(sizeof(size_t) * (size_t) (2 * q->nshards + 10));
    if (argv == NULL || lens == NULL) { free(argv); free(lens); return -1; }
    snprintf(count, sizeof(count), "%d", q->cf->batch);
    snprintf(block, sizeof(block), "%d", block_ms);
    argv[n++] = "XREADGROUP";
    argv[n++] = "GROUP";
    argv[n++] = q->group;
    argv[n++] = q->consumer;
    argv[n++] = "COUNT";
    argv[n++] = count;
    if (!pending_mode) {
        argv[n++] = "BLOCK";
        argv[n++] = block;
    }
    argv[n++] = "STREAMS";
    argc = n;
    for (int i = 0; i < q->nshards; i++) {
        if (pending_mode ? !q->pending[i] : (q->pending[i] || !readable(q, i, block_ms))) continue;
        argv[n++] = q->keys[i];
    }
    {
        int nkeys = n - argc;                   /* one id per key */
        if (nkeys == 0) {
            /* no shard to read now (leases: none held, or none for long
             * enough): the caller's loop renews and takes leases */
            free(argv);
            free(lens);
            if (!pending_mode) cw_sleep_ms(block_ms < 100 ? block_ms : 100);
            return 0;
        }
        for (int i = 0; i < nkeys; i++) argv[n++] = pending_mode ? "0" : ">";
    }
    for (int i = 0; i < n; i++) lens[i] = strlen(argv[i]);
    r = cw_redis_command_argv(c, n, argv, lens);
    free(argv);
    free(lens);
    if (r == NULL) return -1;
    if (r->type == REDIS_REPLY_ERROR) {
        /* NOGROUP: the stream was deleted; set up again after a reconnect. */
        cw_error("XREADGROUP: %s", r->str);
        freeReplyObject(r);
        return -1;
    }
    rc = take_reply(q, r, b, pending_mode);
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
    redisAppendCommand(q->rd[i], "XREADGROUP GROUP %s %s COUNT %d BLOCK %d STREAMS %s >", q->group, q->consumer,
                       q->cf->batch, block_ms, q->keys[i]);
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
         * delivered: read it again next time. Anything else (NOGROUP: the
         * stream was deleted) sets up again after a reconnect. */
        static const char *moving[] = { "MOVED", "ASK", "TRYAGAIN", "UNBLOCKED", "CLUSTERDOWN" };
        int                moved = 0;
        for (size_t k = 0; k < sizeof(moving) / sizeof(moving[0]); k++)
            moved |= strncmp(r->str, moving[k], strlen(moving[k])) == 0;
        if (moved) {
            cw_redis_note(c, r);
            q->redirected = 1;
        } else {
            cw_error("XREADGROUP %s: %s", q->keys[i], r->str);
        }
        freeReplyObject(r);
        reader_close(q, i);
        return moved ? 0 : -1;
    }
    rc = take_reply(q, r, b, 0);
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

    if (q->npending > 0) {
        /* our pending entries, per stream (one command per slot), pipelined:
         * one round trip per node. A stream whose blocking read is out gives
         * that read's reply first; its pending entries are read next time
         * (after this batch is acknowledged, so none is read twice). */
        unsigned char *asked = calloc((size_t) q->nshards, 1);
        int            nasked = 0;
        if (asked == NULL) return -1;
        for (int i = 0; i < q->nshards && rc == 0; i++) {
            if (!q->pending[i]) continue;
            if (q->rd_out[i]) {
                rc = reader_recv(q, c, i, b, 1);
                continue;
            }
            cw_redis_append(c, "XREADGROUP GROUP %s %s COUNT %d STREAMS %s 0", q->group, q->consumer,
                            q->cf->batch, q->keys[i]);
            asked[i] = 1;
            nasked++;
        }
        for (int i = 0; i < q->nshards && nasked > 0; i++) {
            redisReply *r;
            int         before = b->n;
            if (!asked[i]) continue;
            nasked--;
            if (cw_redis_get_reply(c, &r) != REDIS_OK) { rc = -1; break; }
            if (r->type == REDIS_REPLY_ERROR) {
                cw_error("XREADGROUP %s: %s", q->keys[i], r->str);
                rc = -1;
            } else if (rc == 0 && take_reply(q, r, b, 0) != 0) {
                rc = -1;
            }
            freeReplyObject(r);
            if (rc == 0 && b->n == before && q->pending[i]) {
                q->pending[i] = 0;                  /* none left */
                q->npending--;
            }
        }
        free(asked);
        if (rc != 0) return -1;
        if (b->n > 0) return b->n;
    }

    /* new entries: a blocking read out on every stream (those still out
     * from the last fetch stay out), then whatever has come back within
     * block_ms; once something has, only what is back already */
    for (int i = 0; i < q->nshards; i++) {
        if (!q->pending[i] && !q->rd_out[i] && readable(q, i, block_ms) && reader_send(q, c, i, block_ms) != 0)
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
    if (cw_redis_is_cluster(c)) return cluster_fetch(q, c, b, block_ms);
    if (q->npending > 0) {
        if (redis_read(q, c, b, 0, 1) != 0) return -1;
        if (b->n > 0) return b->n;
    }
    if (redis_read(q, c, b, block_ms, 0) != 0) return -1;
    return b->n;
}

int
cw_queue_ack(cw_queue_t *q, cw_redis_t *c, const cw_batch_t *b)
{
    int          n = 0, i = 0;
    const char **argv;
    size_t      *lens;

    if (q->kafka) return kafka_commit(q, b);
    if (b->n == 0) return 0;
    argv = malloc(sizeof(char *) * (size_t) (b->n + 3));
    lens = malloc(sizeof(size_t) * (size_t) (b->n + 3));
    if (argv == NULL || lens == NULL) { free(argv); free(lens); return -1; }
    /* One XACK per run of entries of one stream (a batch lists each
     * stream's entries together). */
    while (i < b->n) {
        int shard = b->e[i].shard, idx = q->idx_of[shard], argc = 0;
        if (q->active[idx] == Q_NONE || q->valid_until[idx] <= cw_mono_ms()) {
            /* Our lease may have passed to another worker while we worked
             * (a pause longer than the lease): leave the entries pending.
             * They were processed; whoever serves the shard next claims and
             * processes them again, which the inbox script makes a
             * re-publish with the same cursors (and so do we, if the
             * lease is still ours after all). */
            cw_warn("%s: lease of shard %d not sure any more; %s left pending", q->consumer, shard,
                    b->e[i].qid);
            if (q->active[idx] == Q_SERVE && !q->pending[idx]) {
                q->pending[idx] = 1;
                q->npending++;
            }
            while (i < b->n && b->e[i].shard == shard) i++;
            continue;
        }
        argv[argc++] = "XACK";
        argv[argc++] = q->keys[idx];
        argv[argc++] = q->group;
        while (i < b->n && b->e[i].shard == shard) argv[argc++] = b->e[i++].qid;
        for (int k = 0; k < argc; k++) lens[k] = strlen(argv[k]);
        cw_redis_append_argv(c, argc, argv, lens);
        n++;
    }
    free(argv);
    free(lens);
    return n;
}

typedef struct { uint64_t ms, seq; } sid_t;

static int
parse_sid(const char *s, sid_t *id)
{
    char *end;
    id->ms = strtoull(s, &end, 10);
    if (*end == '-') id->seq = strtoull(end + 1, &end, 10);
    else id->seq = 0;
    return *end == '\0' ? 0 : -1;
}

static int
sid_less(sid_t a, sid_t b)
{
    return a.ms < b.ms || (a.ms == b.ms && a.seq < b.seq);
}

/* Trim every stream to the oldest entry a consumer group still needs:
 * its smallest pending entry, else its last delivered one. Both groups
 * must exist, so the persist group never misses what it has not read. */
static int
trim_streams(cw_queue_t *q, cw_redis_t *c)
{
    redisReply *info, *pf, *pp, *pu;
    sid_t      *minid = calloc((size_t) q->nshards, sizeof(sid_t));
    int        *ok = calloc((size_t) q->nshards, sizeof(int));
    int         n = 0, rc = 0;

    if (minid == NULL || ok == NULL) { free(minid); free(ok); return 0; }
    for (int i = 0; i < q->nshards; i++) {
        if (q->leases && q->active[i] == Q_NONE) continue;   /* another worker trims it */
        cw_redis_append(c, "XINFO GROUPS %s", q->keys[i]);
        cw_redis_append(c, "XPENDING %s fanout", q->keys[i]);
        cw_redis_append(c, "XPENDING %s persist", q->keys[i]);
        cw_redis_append(c, "XPENDING %s push", q->keys[i]);
    }
    for (int i = 0; i < q->nshards; i++) {
        int   groups = 0, first = 1;
        sid_t m = { 0, 0 };
        if (q->leases && q->active[i] == Q_NONE) continue;
        if (cw_redis_get_reply(c, &info) != REDIS_OK) { rc = -1; goto out; }
        if (cw_redis_get_reply(c, &pf) != REDIS_OK) { freeReplyObject(info); rc = -1; goto out; }
        if (cw_redis_get_reply(c, &pp) != REDIS_OK) {
            freeReplyObject(info); freeReplyObject(pf); rc = -1; goto out;
        }
        if (cw_redis_get_reply(c, &pu) != REDIS_OK) {
            freeReplyObject(info); freeReplyObject(pf); freeReplyObject(pp); rc = -1; goto out;
        }
        if (info->type == REDIS_REPLY_ARRAY) {
            for (size_t g = 0; g < info->elements; g++) {
                redisReply *gr = info->element[g];
                const char *name = NULL, *last = NULL;
                long long   pending = 0;
                sid_t       need;
                if (gr->type != REDIS_REPLY_ARRAY) continue;
                for (size_t k = 0; k + 1 < gr->elements; k += 2) {
                    redisReply *key = gr->element[k], *v = gr->element[k + 1];
                    if (key->type != REDIS_REPLY_STRING) continue;
                    if (strcmp(key->str, "name") == 0 && v->type == REDIS_REPLY_STRING) name = v->str;
                    else if (strcmp(key->str, "last-delivered-id") == 0 && v->type == REDIS_REPLY_STRING) last = v->str;
                    else if (strcmp(key->str, "pending") == 0 && v->type == REDIS_REPLY_INTEGER) pending = v->integer;
                }
                if (name == NULL || last == NULL || parse_sid(last, &need) != 0) { groups = -100; continue; }
                if (strcmp(name, "fanout") == 0 || strcmp(name, "persist") == 0) groups++;
                if (pending > 0) {
                    redisReply *p = strcmp(name, "fanout") == 0 ? pf : strcmp(name, "persist") == 0 ? pp
                                  : strcmp(name, "push") == 0 ? pu : NULL;
                    sid_t       sm;
                    /* another group's pending entries: keep everything */
                    if (p == NULL || p->type != REDIS_REPLY_ARRAY || p->elements < 2
                        || p->element[1]->type != REDIS_REPLY_STRING || parse_sid(p->element[1]->str, &sm) != 0)
                    {
                        groups = -100;
                        continue;
                    }
                    if (sid_less(sm, need)) need = sm;
                }
                if (first || sid_less(need, m)) m = need;
                first = 0;
            }
        }
        if (groups == 2 && (m.ms > 0 || m.seq > 0)) {
            minid[i] = m;
            ok[i] = 1;
        }
        freeReplyObject(info);
        freeReplyObject(pf);
        freeReplyObject(pp);
        freeReplyObject(pu);
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
    if (now >= q->next_claim) {
        if (claim(q, c, q->cf->claim_idle_ms, 0, -1) != 0) return -1;
        q->next_claim = now + q->cf->claim_idle_ms;
    }
    if (q->trim && now >= q->next_trim) {
        if (trim_streams(q, c) != 0) return -1;
        q->next_trim = now + 5000;
    }
    return 0;
}


/* ---- shard leases (workers/lease.c decides, the queue obeys) -------------- */

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
    /* what the last holder read and did not acknowledge is ours now: taken
     * over before anything new is read, and processed first, in stream
     * order (with ours, if we held the shard before) */
    if (!q->pending[i]) q->npending++;
    q->pending[i] = 1;
    return claim(q, c, 0, 1, i);
}

void
cw_queue_drain(cw_queue_t *q, int s)
{
    int i = q->idx_of[s];

    if (q->active[i] != Q_SERVE) return;
    q->active[i] = Q_DRAIN;
    if (q->pending[i]) q->npending--;
    q->pending[i] = 0;           /* what is pending stays for the next holder */
}

void
cw_queue_drop(cw_queue_t *q, int s)
{
    int i = q->idx_of[s];

    if (q->pending[i]) q->npending--;
    q->pending[i] = 0;
    q->active[i] = Q_NONE;
    q->valid_until[i] = 0;
    /* a read still out was sent while the lease was sure, so what it hands
     * us is pending under our name: the next holder claims it */
    if (q->rd && q->rd[i]) reader_close(q, i);
}
