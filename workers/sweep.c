/*
 * Expiry that removes data (docs/PROTOCOL.md §19.1, docs/PIPELINE.md
 * "Expiry"), in the persist role:
 *
 *   plan     before a batch is written: the history policy of each new
 *            message's conversation (the strictest of its participants'
 *            chat:{u:U}:set `history`; a group: of the members active at
 *            the message's seq), written into the document as `expire_at`
 *   commit   after the batch is written: the message joins
 *            chat:{s<s>}:exp (score: when it expires) and, for `device`,
 *            chat:{s<s>}:eph (waiting for every recipient device's ack)
 *   sweep    a thread of its own (cw_sweep_start), at most sweep_rate
 *            messages a second in rounds of sweep_batch: the expired ones
 *            (one range delete on expire_at: FerretDB has no TTL index; on
 *            a server with TTL indexes `expire_at` has one as well) and the
 *            acknowledged ephemeral ones (by _id) are deleted from MongoDB,
 *            from the conversation's `last`, and from every participant's
 *            inbox (lua/expire.lua)
 *
 * The sweeper shares the persist process, not the delivery path: the
 * fan-out never waits for it, and its Redis work per round is bounded by
 * sweep_batch. Its thread shares no state with the persist thread but
 * the configuration: plan and commit are the persist thread's, and the
 * sets in Redis are the only link between them.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <jansson.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPIRE_SLACK_MS  "600000"
#define POLICY_KEEP      INT64_MAX
#define POLICY_DEVICE    (-1)

struct cw_sweep_s {
    const cw_config_t *cf;
    /* the persist thread: planned by the last batch, the ZADDs to send
     * after it is written */
    char             **zadd;        /* "exp"/"eph" key, score, member triples */
    int                nz, zcap;

    /* the sweeper thread alone, from cw_sweep_start on */
    pthread_t          th;
    int                started;
    volatile int       stop;
    volatile int       done;        /* the thread has returned */
    cw_redis_t        *c;
    mongoc_client_t   *client;
    mongoc_collection_t *messages, *conversations, *groups;
    char               db[128];
    double             tokens;      /* messages the rate allows now */
    int64_t            t_tokens;
    int                round;       /* messages a round takes at most: sweep_batch,
                                       halved after a MongoDB timeout, doubled back */
    int                next_shard;
    int               *eph_off;     /* per shard: where the next look at eph starts */
    uint64_t           n_removed, n_checked;
    int64_t            next_stats;
};

cw_sweep_t *
cw_sweep_new(const cw_config_t *cf)
{
    cw_sweep_t *s = calloc(1, sizeof(*s));
    if (s == NULL) return NULL;
    s->cf = cf;
    s->round = cf->sweep_batch;
    s->eph_off = calloc((size_t) cf->shards, sizeof(int));
    if (s->eph_off == NULL) { free(s); return NULL; }
    return s;
}

static void
zadd_clear(cw_sweep_t *s)
{
    for (int i = 0; i < s->nz; i++) free(s->zadd[i]);
    s->nz = 0;
}

static void sweep_close(cw_sweep_t *s);

/* At the persist role's end: the thread is told to stop and given a few
 * seconds (a MongoDB statement in flight may take longer: then it is left
 * to the process's exit, and so is the memory it uses). */
void
cw_sweep_free(cw_sweep_t *s)
{
    if (s == NULL) return;
    if (s->started) {
        struct timespec until;
        s->stop = 1;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 3;
        if (pthread_timedjoin_np(s->th, NULL, &until) != 0) {
            cw_warn("persist: the sweeper is inside a MongoDB statement; left to the exit");
            return;
        }
        sweep_close(s);
    }
    zadd_clear(s);
    free(s->zadd);
    free(s->eph_off);
    free(s);
}

static int
zadd_put(cw_sweep_t *s, const char *key, int64_t score, const char *member)
{
    char num[24];
    if (s->nz + 3 > s->zcap) {
        int    cap = s->zcap ? s->zcap * 2 : 96;
        char **n = realloc(s->zadd, sizeof(char *) * (size_t) cap);
        if (n == NULL) return -1;
        s->zadd = n;
        s->zcap = cap;
    }
    snprintf(num, sizeof(num), "%" PRId64, score);
    s->zadd[s->nz++] = strdup(key);
    s->zadd[s->nz++] = strdup(num);
    s->zadd[s->nz++] = strdup(member);
    return s->zadd[s->nz - 1] && s->zadd[s->nz - 2] && s->zadd[s->nz - 3] ? 0 : -1;
}

/* A policy value as a lifetime in days (POLICY_KEEP, POLICY_DEVICE). */
static int64_t
policy_of(const redisReply *r)
{
    if (r == NULL || r->type != REDIS_REPLY_STRING) return POLICY_KEEP;
    if (strcmp(r->str, "device") == 0) return POLICY_DEVICE;
    if (strncmp(r->str, "days:", 5) == 0 && atoi(r->str + 5) > 0) return atoi(r->str + 5);
    return POLICY_KEEP;
}

/* stricter: device, then fewer days, then keep */
static int64_t
stricter(int64_t a, int64_t b)
{
    if (a == POLICY_DEVICE || b == POLICY_DEVICE) return POLICY_DEVICE;
    return a < b ? a : b;
}

/* "<since>" or "<since>:<until>": a member at seq n (as the fan-out) */
static int
member_at(const char *v, int64_t n)
{
    char      *end;
    long long  since = strtoll(v, &end, 10), until = 0;
    if (*end == ':') until = strtoll(end + 1, NULL, 10);
    return since < n && (until == 0 || n < until);
}

static const char *
msg_id(const bson_t *doc)
{
    bson_iter_t it;
    return doc && bson_iter_init_find(&it, doc, "_id") && BSON_ITER_HOLDS_UTF8(&it) ? bson_iter_utf8(&it, NULL) : NULL;
}

/*
 * The policies of the batch's new messages: per message one pipelined
 * round trip for the group member hashes, then one for the participants'
 * settings. Appends expire_at to the documents of expiring messages and
 * remembers the ZADDs for cw_sweep_commit. Redis unavailable (c NULL):
 * nothing is planned (kept), with a warning.
 */
int
cw_sweep_plan(cw_sweep_t *s, cw_redis_t *c, const cw_batch_t *b, bson_t **docs, const int64_t *ts)
{
    redisReply **mem = NULL;
    int          n = 0, rc = -1;
    int         *cnt = NULL, *lead = NULL;
    int64_t     *pol = NULL;

    zadd_clear(s);
    if (c == NULL) return 0;
    mem = calloc((size_t) b->n + 1, sizeof(*mem));
    cnt = calloc((size_t) b->n + 1, sizeof(*cnt));
    lead = calloc((size_t) b->n + 1, sizeof(*lead));
    pol = calloc((size_t) b->n + 1, sizeof(*pol));
    if (mem == NULL || cnt == NULL || lead == NULL || pol == NULL) goto done;
    for (int i = 0; i < b->n; i++) {
        const cw_entry_t *e = &b->e[i];
        lead[i] = i;
        if (docs[i] == NULL || e->type != CW_T_MSG || !e->is_group) continue;
        for (int j = 0; j < i; j++) {
            if (lead[j] == j && docs[j] && b->e[j].type == CW_T_MSG && b->e[j].is_group
                && strcmp(b->e[j].conv, e->conv) == 0) { lead[i] = j; break; }
        }
        if (lead[i] != i) continue;
        cw_redis_append(c, "HGETALL chat:{s%d}:g:%s:mem", e->shard, e->a);
        n++;
    }
    for (int i = 0; i < b->n; i++) {
        const cw_entry_t *e = &b->e[i];
        if (docs[i] == NULL || e->type != CW_T_MSG || !e->is_group || lead[i] != i) continue;
        if (cw_redis_get_reply(c, &mem[i]) != REDIS_OK) goto done;
        n--;
    }
    /* the participants' settings, in entry order; the messages of one
     * group in one batch share one lookup (its first message's members:
     * a big group's batch costs one HGET per member, not per message) */
    n = 0;
    for (int i = 0; i < b->n; i++) {
        const cw_entry_t *e = &b->e[i];
        if (docs[i] == NULL || e->type != CW_T_MSG) continue;
        if (!e->is_group) {
            cw_redis_append(c, "HGET chat:{u:%s}:set history", e->a);
            cw_redis_append(c, "HGET chat:{u:%s}:set history", e->b);
            cnt[i] = 2;
        } else {
            if (lead[i] != i || mem[i] == NULL || mem[i]->type != REDIS_REPLY_ARRAY) continue;
            for (size_t j = 0; j + 1 < mem[i]->elements; j += 2) {
                if (mem[i]->element[j + 1]->type != REDIS_REPLY_STRING
                    || !member_at(mem[i]->element[j + 1]->str, e->seq)) continue;
                cw_redis_append(c, "HGET chat:{u:%s}:set history", mem[i]->element[j]->str);
                cnt[i]++;
            }
        }
        n += cnt[i];
    }
    for (int i = 0; i < b->n; i++) {
        const cw_entry_t *e = &b->e[i];
        int64_t           day = s->cf->sweep_day_ms, at;
        char              member[CW_ID_MAX * 2 + CW_CONV_MAX + 64], key[48];
        const char       *id = msg_id(docs[i]);

        pol[i] = lead[i] == i ? POLICY_KEEP : pol[lead[i]];
        for (int k = 0; k < cnt[i]; k++) {
            redisReply *r;
            if (cw_redis_get_reply(c, &r) != REDIS_OK) goto done;
            n--;
            pol[i] = stricter(pol[i], policy_of(r));
            freeReplyObject(r);
        }
        if (docs[i] == NULL || e->type != CW_T_MSG || pol[i] == POLICY_KEEP || id == NULL) continue;
        /* device: removed once acknowledged, else after the undelivered
         * retention; days: N days after it was sent */
        at = ts[i] + (pol[i] == POLICY_DEVICE ? (int64_t) s->cf->retention_days : pol[i]) * day;
        BSON_APPEND_DATE_TIME(docs[i], "expire_at", at);
        snprintf(member, sizeof(member), "%s|%s|%" PRId64 "|%" PRId64 "|%s", id, e->conv, e->seq, ts[i], e->from);
        snprintf(key, sizeof(key), "chat:{s%d}:exp", e->shard);
        if (zadd_put(s, key, at, member) != 0) goto done;
        if (pol[i] == POLICY_DEVICE) {
            snprintf(key, sizeof(key), "chat:{s%d}:eph", e->shard);
            if (zadd_put(s, key, ts[i], member) != 0) goto done;
        }
    }
    rc = 0;
done:
    if (rc != 0) {
        /* the connection is in an unknown state: the caller drops it */
        cw_warn("persist: history policy lookup failed; batch retried");
        zadd_clear(s);
    }
    for (int i = 0; mem && i < b->n; i++) if (mem[i]) freeReplyObject(mem[i]);
    free(mem);
    free(cnt);
    free(lead);
    free(pol);
    return rc;
}

/* After the batch was written: its expiring messages join the sweeper's
 * sets (idempotent: a rewritten batch sets the same scores). */
int
cw_sweep_commit(cw_sweep_t *s, cw_redis_t *c)
{
    int rc = 0;
    if (c == NULL || s->nz == 0) return 0;
    for (int i = 0; i < s->nz; i += 3) cw_redis_append(c, "ZADD %s %s %s", s->zadd[i], s->zadd[i + 1], s->zadd[i + 2]);
    for (int i = 0; i < s->nz; i += 3) {
        redisReply *r;
        if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
        if (r->type == REDIS_REPLY_ERROR) rc = -1;
        freeReplyObject(r);
    }
    zadd_clear(s);
    return rc;
}


/* ---- the sweep (its own thread) -------------------------------------------------- */

typedef struct {
    char        id[CW_ID_MAX + 1];
    char        conv[CW_CONV_MAX + 1];
    char        from[CW_ID_MAX + 1];
    int64_t     seq, ts;
    int64_t     due;            /* its expire_at (ms) when it came from exp, else 0 */
    int         shard;
    const char *member;         /* in a reply of the round */
} item_t;

/* Commands in flight at most: the round's pipeline is read back in
 * slices, so that neither side buffers a whole round. */
#define PIPE_MAX     1000
/* ids per lua/expire.lua call */
#define EXPIRE_IDS   100
/* acknowledged ephemeral messages per round at most: they go by id, and
 * FerretDB compares every document with every id of an $in (a round of
 * 1,000 costs 1,000 comparisons per document; MongoDB uses _id's index) */
#define EPH_MAX      1000

static int
parse_item(const char *m, int shard, item_t *it)
{
    char        buf[CW_ID_MAX * 2 + CW_CONV_MAX + 64];
    char       *f[5], *p = buf;
    int         n = 0;

    if (strlen(m) >= sizeof(buf)) return -1;
    strcpy(buf, m);
    while (n < 5 && (f[n] = p) != NULL) {
        n++;
        p = strchr(p, '|');
        if (p == NULL) break;
        *p++ = '\0';
    }
    if (n != 5) return -1;
    snprintf(it->id, sizeof(it->id), "%s", f[0]);
    snprintf(it->conv, sizeof(it->conv), "%s", f[1]);
    it->seq = strtoll(f[2], NULL, 10);
    it->ts = strtoll(f[3], NULL, 10);
    snprintf(it->from, sizeof(it->from), "%s", f[4]);
    it->member = m;
    it->shard = shard;
    it->due = 0;
    return 0;
}

/* A member that is not ours (or damaged) leaves its set, with a warning. */
static void
drop_member(cw_redis_t *c, int shard, const char *set, const char *m)
{
    redisReply *x = cw_redis_command(c, "ZREM chat:{s%d}:%s %s", shard, set, m);
    cw_warn("persist: sweep: unreadable member of chat:{s%d}:%s removed: %.80s", shard, set, m);
    if (x) freeReplyObject(x);
}

/* 1 when every device of user has acknowledged conv up to seq (its newest
 * appended event of conv is at or below every device's cursor), 0 not
 * yet, -1 on a connection error. */
static int
acked_by(cw_redis_t *c, const char *user, const char *conv, int64_t seq)
{
    redisReply *last = cw_redis_command(c, "HGET chat:{u:%s}:last m:%s", user, conv), *acked;
    long long   lseq = 0, lcur = 0;
    int         ok;

    if (last == NULL) return -1;
    if (last->type == REDIS_REPLY_STRING) sscanf(last->str, "%lld:%lld", &lseq, &lcur);
    freeReplyObject(last);
    if (lseq < seq) return 0;                       /* not appended yet (or never: no device) */
    acked = cw_redis_command(c, "HVALS chat:{u:%s}:acked", user);
    if (acked == NULL) return -1;
    ok = acked->type == REDIS_REPLY_ARRAY && acked->elements > 0;
    for (size_t j = 0; ok && j < acked->elements; j++) {
        if (acked->element[j]->type != REDIS_REPLY_STRING || strtoll(acked->element[j]->str, NULL, 10) < lcur) ok = 0;
    }
    freeReplyObject(acked);
    return ok;
}

/* Is every recipient device done with this ephemeral message? 1, 0, or
 * -1 on a connection error. */
static int
delivered_everywhere(cw_redis_t *c, const item_t *it)
{
    char        a[CW_ID_MAX + 1], b[CW_ID_MAX + 1];
    int         is_group = 0, rc = 1;
    redisReply *since;

    if (cw_parse_conv(it->conv, a, b, &is_group) != 0) return 0;
    if (!is_group) {
        /* the recipient (notes to self: the user's own devices) */
        return acked_by(c, strcmp(it->from, a) == 0 ? b : a, it->conv, it->seq);
    }
    /* every member at the message's seq but its sender */
    since = cw_redis_command(c, "HGETALL chat:{s%d}:g:%s:mem", it->shard, a);
    if (since == NULL) return -1;
    for (size_t j = 0; rc == 1 && since->type == REDIS_REPLY_ARRAY && j + 1 < since->elements; j += 2) {
        const char *u = since->element[j]->str;
        if (strcmp(u, it->from) == 0 || since->element[j + 1]->type != REDIS_REPLY_STRING
            || !member_at(since->element[j + 1]->str, it->seq)) continue;
        rc = acked_by(c, u, it->conv, it->seq);
    }
    if (since->type != REDIS_REPLY_ARRAY) rc = 0;
    freeReplyObject(since);
    return rc;
}


/* The `last` of the conversations (groups) documents that show one of
 * ids loses its body: one query per round finds them (FerretDB reads the
 * collection once for it, not once per message). */
static int
strip_lasts(mongoc_collection_t *coll, const bson_t *ids)
{
    bson_t           filter = BSON_INITIALIZER, in;
    mongoc_cursor_t *cur;
    const bson_t    *doc;
    bson_error_t     error;
    bson_iter_t      it, f;
    int              rc = 0;

    BSON_APPEND_DOCUMENT_BEGIN(&filter, "last.id", &in);
    BSON_APPEND_ARRAY(&in, "$in", ids);
    bson_append_document_end(&filter, &in);
    cur = mongoc_collection_find_with_opts(coll, &filter, NULL, NULL);
    while (rc == 0 && mongoc_cursor_next(cur, &doc)) {
        if (bson_iter_init_find(&it, doc, "_id") && BSON_ITER_HOLDS_UTF8(&it) && bson_iter_init(&f, doc)
            && bson_iter_find_descendant(&f, "last.id", &f) && BSON_ITER_HOLDS_UTF8(&f))
        {
            rc = cw_strip_last(coll, bson_iter_utf8(&it, NULL), bson_iter_utf8(&f, NULL));
        }
    }
    if (rc == 0 && mongoc_cursor_error(cur, &error)) {
        cw_warn("persist: sweep: conversations: %s", error.message);
        rc = -1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(&filter);
    return rc;
}

static int
by_conv_seq(const void *x, const void *y)
{
    const item_t *a = *(item_t * const *) x, *b = *(item_t * const *) y;
    int           c = strcmp(a->conv, b->conv);
    return c ? c : (a->seq > b->seq) - (a->seq < b->seq);
}

static int
by_due(const void *x, const void *y)
{
    const item_t *a = x, *b = y;
    return (a->due > b->due) - (a->due < b->due);
}

/* Reads the replies of the commands appended so far; 0, or -1 when the
 * connection failed (the round is given up: every step is idempotent). */
static int
drain(cw_sweep_t *s, int *pending, int *bad)
{
    redisReply *r;
    for (; *pending > 0; (*pending)--) {
        if (cw_redis_get_reply(s->c, &r) != REDIS_OK) return -1;
        if (r->type == REDIS_REPLY_ERROR) {
            if (strncmp(r->str, "NOSCRIPT", 8) == 0) *bad = 2;
            else {
                if (*bad == 0) cw_warn("persist: sweep: inbox: %s", r->str);
                if (*bad == 0) *bad = 1;
            }
        }
        freeReplyObject(r);
    }
    return 0;
}

static int
pipe_add(cw_sweep_t *s, int *pending, int *bad)
{
    return ++*pending >= PIPE_MAX ? drain(s, pending, bad) : 0;
}

/*
 * After MongoDB: the conversations' `last`, every participant's inbox
 * (direct participants, or the group's members, current or past: an inbox
 * without the message costs one short scan), and the sweeper's sets. The
 * items are taken in conversation order so that one lua/expire.lua call
 * per participant covers up to EXPIRE_IDS messages of a conversation, and
 * only a conversation's newest item of the round can be its `last`.
 * 0, or -1 (the round is retried: every step is idempotent).
 */
static int
clear_rest(cw_sweep_t *s, item_t *items, int n)
{
    item_t     **o = malloc(sizeof(*o) * (size_t) n);
    bson_t       lasts = BSON_INITIALIZER;
    int          rc = 0, pending = 0, bad = 0, nl = 0;
    char         k[16];

    if (o == NULL) return -1;
    for (int i = 0; i < n; i++) o[i] = &items[i];
    qsort(o, (size_t) n, sizeof(*o), by_conv_seq);
    for (int i = 0; i < n; i++) {
        if (i + 1 < n && strcmp(o[i]->conv, o[i + 1]->conv) == 0) continue;
        snprintf(k, sizeof(k), "%d", nl++);
        BSON_APPEND_UTF8(&lasts, k, o[i]->id);
    }
    if (strip_lasts(s->conversations, &lasts) != 0 || strip_lasts(s->groups, &lasts) != 0) rc = -1;
    bson_destroy(&lasts);

    for (int i = 0; rc == 0 && i < n;) {
        char        a[CW_ID_MAX + 1], b[CW_ID_MAX + 1], ts_s[24];
        int         is_group = 0, j = i;
        int64_t     ts = 0;
        redisReply *mem = NULL;
        size_t      nu;

        /* one conversation's next EXPIRE_IDS items: o[i .. j) */
        while (j < n && j - i < EXPIRE_IDS && strcmp(o[j]->conv, o[i]->conv) == 0) {
            if (o[j]->ts > ts) ts = o[j]->ts;
            j++;
        }
        if (cw_parse_conv(o[i]->conv, a, b, &is_group) != 0) { i = j; continue; }
        if (is_group) {
            if (drain(s, &pending, &bad) != 0) { rc = -1; break; }
            mem = cw_redis_command(s->c, "HKEYS chat:{s%d}:g:%s:mem", o[i]->shard, a);
            if (mem == NULL) { rc = -1; break; }
        }
        nu = is_group ? (mem->type == REDIS_REPLY_ARRAY ? mem->elements : 0) : (strcmp(a, b) == 0 ? 1 : 2);
        snprintf(ts_s, sizeof(ts_s), "%" PRId64, ts);
        for (size_t u = 0; rc == 0 && u < nu; u++) {
            const char *user = is_group ? mem->element[u]->str : (u ? b : a);
            char        key[CW_ID_MAX + 24];
            const char *argv[6 + EXPIRE_IDS];
            size_t      lens[6 + EXPIRE_IDS];
            int         argc = 6;

            snprintf(key, sizeof(key), "chat:{u:%s}:inbox", user);
            argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_EXPIRE); argv[2] = "1"; argv[3] = key;
            argv[4] = ts_s; argv[5] = EXPIRE_SLACK_MS;
            for (int q = i; q < j; q++) argv[argc++] = o[q]->id;
            for (int q = 0; q < argc; q++) lens[q] = strlen(argv[q]);
            cw_redis_append_argv(s->c, argc, argv, lens);
            if (pipe_add(s, &pending, &bad) != 0) rc = -1;
        }
        if (mem) freeReplyObject(mem);
        /* and the sweeper's sets: an ephemeral message is in both */
        for (int set = 0; rc == 0 && set < 2; set++) {
            for (int q = i; q < j; q++) {
                cw_redis_append(s->c, "ZREM chat:{s%d}:%s %s", o[q]->shard, set ? "eph" : "exp", o[q]->member);
                if (pipe_add(s, &pending, &bad) != 0) { rc = -1; break; }
            }
        }
        i = j;
    }
    if (rc == 0 && drain(s, &pending, &bad) != 0) rc = -1;
    free(o);
    if (rc != 0) return -1;
    if (bad == 2) cw_lua_load(s->c);                /* Redis lost its scripts: next round */
    return bad ? -1 : 0;
}

/* A MongoDB error: a timeout halves the next rounds (FerretDB's range
 * delete costs a scan of the collection, its size whatever the range: a
 * smaller round is only a smaller deletion after it), others are logged. */
static void
mongo_failed(cw_sweep_t *s, const char *what, const bson_error_t *error)
{
    if (error->domain == MONGOC_ERROR_STREAM || strstr(error->message, "timed out") != NULL) {
        s->round = s->round > 200 ? s->round / 2 : 100;
        cw_warn("persist: sweep: %s: %s; rounds of %d from now on", what, error->message, s->round);
    } else {
        cw_warn("persist: sweep: %s: %s", what, error->message);
    }
}

/* {_id: {$in: [the ids of it[0 .. n)]}} */
static bson_t *
id_filter(const item_t *it, int n)
{
    bson_t *filter = bson_new(), in, ids;
    char    k[16];

    BSON_APPEND_DOCUMENT_BEGIN(filter, "_id", &in);
    BSON_APPEND_ARRAY_BEGIN(&in, "$in", &ids);
    for (int i = 0; i < n; i++) {
        snprintf(k, sizeof(k), "%d", i);
        BSON_APPEND_UTF8(&ids, k, it[i].id);
    }
    bson_append_array_end(&in, &ids);
    bson_append_document_end(filter, &in);
    return filter;
}

/*
 * The expired ones: the lowest scores of every shard's chat:{s<s>}:exp up
 * to now, merged, at most budget of them, then deleted from MongoDB by one
 * range `expire_at <= cutoff`: FerretDB runs a delete as a scan of the
 * collection with a comparison per document, so one range costs one scan
 * where an $in of 1,000 ids costs 1,000 comparisons per document (20 s
 * against 0.3 s on 65,000 documents). Documents at or below the cutoff
 * that the round did not read (their members are beyond a shard's
 * slice) are deleted with it; their members come in a later round and
 * find them gone. Returns the number removed, or -1.
 */
static int
sweep_expired(cw_sweep_t *s, int budget)
{
    int          shards = s->cf->shards, per = budget / shards * 2, n = 0, m, rc = 0, by_id = 0;
    redisReply **r = calloc((size_t) shards, sizeof(*r));
    item_t      *it = NULL;
    int64_t      cutoff = INT64_MAX, now = cw_now_ms();

    if (per < 64) per = 64;
    if (per > budget) per = budget;
    if (r == NULL) return -1;
    for (int k = 0; k < shards; k++)
        cw_redis_append(s->c, "ZRANGEBYSCORE chat:{s%d}:exp -inf %lld WITHSCORES LIMIT 0 %d", k, (long long) now, per);
    for (int k = 0; k < shards; k++) {
        if (cw_redis_get_reply(s->c, &r[k]) != REDIS_OK) { rc = -1; r[k] = NULL; }
        else if (r[k]->type != REDIS_REPLY_ARRAY) { freeReplyObject(r[k]); r[k] = NULL; }
        else if ((int) r[k]->elements == 2 * per) {
            /* a full slice: what is beyond it may be below another's */
            int64_t last = strtoll(r[k]->element[2 * per - 1]->str, NULL, 10);
            if (last < cutoff) cutoff = last;
        }
        if (r[k]) n += (int) r[k]->elements / 2;
    }
    if (rc == 0 && n > 0 && (it = malloc(sizeof(*it) * (size_t) n)) == NULL) rc = -1;
    n = 0;
    for (int k = 0; rc == 0 && k < shards; k++) {
        for (size_t j = 0; r[k] && j + 1 < r[k]->elements; j += 2) {
            int64_t due = strtoll(r[k]->element[j + 1]->str, NULL, 10);
            if (due > cutoff) break;
            if (r[k]->element[j]->type != REDIS_REPLY_STRING || parse_item(r[k]->element[j]->str, k, &it[n]) != 0) {
                drop_member(s->c, k, "exp", r[k]->element[j]->str);
                continue;
            }
            it[n++].due = due;
        }
    }
    /* the budget's lowest */
    if (rc == 0 && n > 1) qsort(it, (size_t) n, sizeof(*it), by_due);
    m = n < budget ? n : budget;
    while (rc == 0 && m > 0) {
        bson_error_t error;
        bson_t      *f = by_id ? id_filter(it, m)
                               : BCON_NEW("expire_at", "{", "$lte", BCON_DATE_TIME(it[m - 1].due), "}");
        int          ok = mongoc_collection_delete_many(s->messages, f, NULL, NULL, &error), m2;
        bson_destroy(f);
        if (ok) break;
        if (by_id || strstr(error.message, "too many SQL variables") == NULL) {
            mongo_failed(s, "delete expired messages", &error);
            m = 0;
            rc = -2;
            break;
        }
        /* FerretDB (SQLite) deletes what matched as SQL variables, at most
         * 32,766 (more documents than the round's members are at or below
         * the cutoff: ones whose members were lost): a lower cutoff, the
         * rest waits for the next round; when no lower one is left (all
         * at one expire_at) the round's own documents go by id */
        m2 = m / 2;
        while (m2 > 0 && it[m2 - 1].due == it[m - 1].due) m2--;
        if (m2 == 0) {
            by_id = 1;
            if (m > 10000) m = 10000;
        } else {
            m = m2;
        }
        if (m < s->round) s->round = m > 100 ? m : 100;
    }
    s->n_checked += (uint64_t) n;
    if (rc == 0 && m > 0 && clear_rest(s, it, m) != 0) rc = -1;
    for (int k = 0; k < shards; k++) if (r[k]) freeReplyObject(r[k]);
    free(r);
    free(it);
    return rc == 0 ? m : rc;
}

/*
 * The ephemeral ones (`device`) whose every recipient device has
 * acknowledged them, oldest first, shard by shard from where the last
 * round stopped, deleted by id. Those still waiting are passed over next
 * time, so that an offline recipient's backlog does not hide newer ones.
 * Returns the number removed, or -1.
 */
static int
sweep_ephemeral(cw_sweep_t *s, int budget)
{
    item_t *it = malloc(sizeof(*it) * (size_t) budget);
    int     n = 0, rc = 0, looked = 0;
    redisReply **held = calloc((size_t) s->cf->shards, sizeof(*held));

    if (it == NULL || held == NULL) { free(it); free(held); return -1; }
    for (int k = 0; rc == 0 && k < s->cf->shards && looked < budget; k++) {
        int         shard = (s->next_shard + k) % s->cf->shards;
        redisReply *r = cw_redis_command(s->c, "ZRANGE chat:{s%d}:eph %d %d", shard, s->eph_off[shard],
                                         s->eph_off[shard] + budget - looked - 1);
        int         got;

        if (r == NULL) { rc = -1; break; }
        held[shard] = r;
        got = r->type == REDIS_REPLY_ARRAY ? (int) r->elements : 0;
        if (got < budget - looked) s->eph_off[shard] = 0;
        else s->eph_off[shard] += got;
        for (int j = 0; j < got && rc == 0; j++) {
            int d;
            looked++;
            if (r->element[j]->type != REDIS_REPLY_STRING || parse_item(r->element[j]->str, shard, &it[n]) != 0) {
                drop_member(s->c, shard, "eph", r->element[j]->str);
                continue;
            }
            if ((d = delivered_everywhere(s->c, &it[n])) < 0) rc = -1;
            else if (d == 1) {
                /* it leaves the set: the ones after it move down one */
                if (s->eph_off[shard] > 0) s->eph_off[shard]--;
                n++;
            }
        }
    }
    s->next_shard = (s->next_shard + 1) % s->cf->shards;
    s->n_checked += (uint64_t) looked;
    if (rc == 0 && n > 0) {
        bson_t      *filter = id_filter(it, n);
        bson_error_t error;
        if (!mongoc_collection_delete_many(s->messages, filter, NULL, NULL, &error)) {
            mongo_failed(s, "delete acknowledged ephemeral messages", &error);
            rc = -2;
        }
        bson_destroy(filter);
        if (rc == 0 && clear_rest(s, it, n) != 0) rc = -1;
    }
    for (int k = 0; k < s->cf->shards; k++) if (held[k]) freeReplyObject(held[k]);
    free(held);
    free(it);
    return rc == 0 ? n : rc;
}

static void
sweep_close(cw_sweep_t *s)
{
    if (s->c) cw_redis_free(s->c);
    s->c = NULL;
    if (s->messages) mongoc_collection_destroy(s->messages);
    if (s->conversations) mongoc_collection_destroy(s->conversations);
    if (s->groups) mongoc_collection_destroy(s->groups);
    s->messages = s->conversations = s->groups = NULL;
    if (s->client) mongoc_client_destroy(s->client);
    s->client = NULL;
}

/*
 * The sweeper thread: rounds of at most `round` messages, at most
 * sweep_rate a second, expired ones first. Its clients are its own: a
 * round may wait tens of seconds for FerretDB (sweep_timeout_ms) while
 * the persist thread goes on storing (SQLite in WAL mode lets its inserts
 * through; measured: 100-document inserts at most 3.3 s while a 40 s
 * range delete ran on 1,000,000 documents).
 */
static void *
sweep_main(void *arg)
{
    cw_sweep_t *s = arg;
    char        err[256];

    s->t_tokens = cw_mono_ms();
    s->next_stats = s->t_tokens + 10000;
    while (!s->stop && !cw_stop) {
        int64_t now = cw_mono_ms();
        int     budget, a = 0, b = 0;

        if (s->c == NULL && (s->c = cw_redis_connect(s->cf, 5000, err, sizeof(err))) == NULL) {
            cw_warn("persist: sweep: redis: %s; retrying in 2 s", err);
            cw_sleep_ms(2000);
            continue;
        }
        s->tokens += (double) (now - s->t_tokens) * s->cf->sweep_rate / 1000.0;
        s->t_tokens = now;
        if (s->tokens > s->cf->sweep_batch) s->tokens = s->cf->sweep_batch;
        budget = (int) s->tokens < s->round ? (int) s->tokens : s->round;
        if (budget >= 1) {
            a = sweep_expired(s, budget);
            if (a >= 0 && budget - a > 0) b = sweep_ephemeral(s, budget - a < EPH_MAX ? budget - a : EPH_MAX);
            if (a == -1 || b == -1) {
                cw_warn("persist: sweep: redis: %s; reconnecting",
                        s->c && cw_redis_errstr(s->c) ? cw_redis_errstr(s->c) : "failed");
                cw_redis_free(s->c);
                s->c = NULL;
            }
            if (a > 0) s->tokens -= a;
            if (b > 0) s->tokens -= b;
            s->n_removed += (uint64_t) (a > 0 ? a : 0) + (uint64_t) (b > 0 ? b : 0);
            /* a round that went through: back towards sweep_batch */
            if (a >= 0 && b >= 0 && s->round < s->cf->sweep_batch)
                s->round = s->round * 2 < s->cf->sweep_batch ? s->round * 2 : s->cf->sweep_batch;
        }
        if (now >= s->next_stats) {
            if (s->n_removed) cw_info("persist: sweep removed %" PRIu64 " messages (%" PRIu64 " looked at) in the last 10 s",
                                      s->n_removed, s->n_checked);
            s->n_removed = s->n_checked = 0;
            s->next_stats = now + 10000;
        }
        /* nothing (more) to do now: the idle wake-up */
        if (a <= 0 && b <= 0) cw_sleep_ms(a < 0 || b < 0 ? 1000 : 250);
        else if (s->tokens < 1) cw_sleep_ms(100);
    }
    s->done = 1;
    return NULL;
}

int
cw_sweep_start(cw_sweep_t *s)
{
    sigset_t all, old;
    int      rc;

    if (s->started) return 0;
    s->client = cw_mongo_client_timeout(s->cf, "chat-worker-sweep", s->db, sizeof(s->db), s->cf->sweep_timeout_ms);
    if (s->client == NULL) return -1;
    s->messages = mongoc_client_get_collection(s->client, s->db, "messages");
    s->conversations = mongoc_client_get_collection(s->client, s->db, "conversations");
    s->groups = mongoc_client_get_collection(s->client, s->db, "groups");
    /* the SHA1s are computed lazily: before there are two threads */
    for (int i = 0; i < CHAT_LUA_N; i++) cw_lua_sha(i);
    /* signals stay with the persist thread (it sets cw_stop) */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&s->th, NULL, sweep_main, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        cw_error("persist: sweeper thread: %s", strerror(rc));
        sweep_close(s);
        return -1;
    }
    s->started = 1;
    cw_info("persist: sweeper started (rounds of %d, %d messages/s at most, MongoDB timeout %d ms)",
            s->cf->sweep_batch, s->cf->sweep_rate, s->cf->sweep_timeout_ms);
    return 0;
}

/* A TTL index on expire_at where the server has them (MongoDB), as a
 * second line behind the sweeper; FerretDB 1.24 has none (its buildInfo
 * names it): the sweeper alone removes expired messages there. */
void
cw_sweep_ttl_index(mongoc_client_t *client, const char *db)
{
    bson_t       *cmd = BCON_NEW("buildInfo", BCON_INT32(1)), reply;
    bson_error_t  error;
    bson_iter_t   it;
    int           ferret;

    if (!mongoc_client_command_simple(client, db, cmd, NULL, &reply, &error)) {
        cw_warn("persist: buildInfo: %s (no TTL index; the sweeper removes expired messages)", error.message);
        bson_destroy(cmd);
        bson_destroy(&reply);
        return;
    }
    ferret = bson_iter_init_find(&it, &reply, "ferretdbVersion") || bson_iter_init_find(&it, &reply, "ferretdb");
    bson_destroy(&reply);
    bson_destroy(cmd);
    if (ferret) {
        cw_info("persist: FerretDB has no TTL indexes: the sweeper removes expired messages");
        return;
    }
    cmd = BCON_NEW("createIndexes", BCON_UTF8("messages"), "indexes", "[", "{", "key", "{", "expire_at",
                   BCON_INT32(1), "}", "name", BCON_UTF8("expire_at_ttl"), "expireAfterSeconds", BCON_INT32(0),
                   "}", "]");
    if (!mongoc_client_command_simple(client, db, cmd, NULL, &reply, &error))
        cw_warn("persist: TTL index on messages.expire_at: %s (the sweeper removes expired messages)", error.message);
    else
        cw_info("persist: TTL index on messages.expire_at (and the sweeper for Redis)");
    bson_destroy(&reply);
    bson_destroy(cmd);
}
