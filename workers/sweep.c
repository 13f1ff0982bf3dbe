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
 *   tick     between batches, at most sweep_rate messages a second in
 *            rounds of sweep_batch: the expired ones and the acknowledged
 *            ephemeral ones are deleted from MongoDB (by _id: FerretDB has
 *            no TTL index; on a server with TTL indexes `expire_at` has one
 *            as well), from the conversation's `last`, and from every
 *            participant's inbox (lua/expire.lua)
 *
 * The sweeper shares the persist process, not the delivery path: the
 * fan-out never waits for it, and its Redis work per round is bounded by
 * sweep_batch.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
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
    /* planned by the last batch: ZADDs to send after it is written */
    char             **zadd;        /* "exp"/"eph" key, score, member triples */
    int                nz, zcap;
    double             tokens;      /* messages the rate allows now */
    int64_t            t_tokens;
    int                next_shard;
    int               *eph_off;     /* per shard: where the next look at eph starts */
    int64_t            deleted_upto; /* every document with an expire_at up to this is
                                        deleted (lowered when a batch stores one below it) */
    int64_t            plan_min_at;  /* the earliest expire_at of the planned batch */
    uint64_t           n_removed, n_checked;
    int64_t            next_stats;
};

cw_sweep_t *
cw_sweep_new(const cw_config_t *cf)
{
    cw_sweep_t *s = calloc(1, sizeof(*s));
    if (s == NULL) return NULL;
    s->cf = cf;
    s->plan_min_at = INT64_MAX;
    s->eph_off = calloc((size_t) cf->shards, sizeof(int));
    if (s->eph_off == NULL) { free(s); return NULL; }
    s->t_tokens = cw_mono_ms();
    s->next_stats = cw_mono_ms() + 10000;
    return s;
}

static void
zadd_clear(cw_sweep_t *s)
{
    for (int i = 0; i < s->nz; i++) free(s->zadd[i]);
    s->nz = 0;
}

void
cw_sweep_free(cw_sweep_t *s)
{
    if (s == NULL) return;
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
    s->plan_min_at = INT64_MAX;
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
        if (at < s->plan_min_at) s->plan_min_at = at;
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
    /* a message stored late (persistence was behind) may expire before
     * what the range deletes covered already: they must look at it again */
    if (s->plan_min_at <= s->deleted_upto) s->deleted_upto = s->plan_min_at - 1;
    s->plan_min_at = INT64_MAX;
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


/* ---- the sweep ------------------------------------------------------------------ */

typedef struct {
    char     id[CW_ID_MAX + 1];
    char     conv[CW_CONV_MAX + 1];
    char     from[CW_ID_MAX + 1];
    int64_t  seq, ts;
    int64_t  due;               /* its expire_at (ms) when it came from exp, else 0 */
    const char *member;
} item_t;

static int
parse_item(const char *m, item_t *it)
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
    it->due = 0;
    return 0;
}

/* The conversation's participants (a group's: every member in the hash,
 * current or past: an inbox without the message costs one short scan). */
static redisReply *
participants(cw_redis_t *c, int shard, const char *conv, char *a, char *b, int *is_group)
{
    if (cw_parse_conv(conv, a, b, is_group) != 0) return NULL;
    if (!*is_group) return NULL;
    return cw_redis_command(c, "HKEYS chat:{s%d}:g:%s:mem", shard, a);
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

int cw_strip_last(mongoc_collection_t *coll, const char *docid, const char *id);

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

/* Removes a round's messages: MongoDB (one deleteMany by _id, the `last`
 * that shows one of them), every participant's inbox (one lua/expire.lua
 * call per participant and message), the sweeper's sets. 0, or -1 to try
 * again next round (every step is idempotent). */
static int
remove_items(cw_sweep_t *s, cw_redis_t *c, mongoc_collection_t *messages, mongoc_collection_t *conversations,
             mongoc_collection_t *groups, int shard, item_t *it, int n)
{
    bson_t        ids = BSON_INITIALIZER, filter = BSON_INITIALIZER, in;
    bson_error_t  error;
    char          k[16];
    int           rc = 0, ncmd = 0, nids = 0, nd = 0, m;
    redisReply   *r;

    if (n == 0) return 0;
    /* the due ones (first in it[], in expire_at order) in one range
     * statement: FerretDB runs a delete as a scan of the collection, one
     * comparison per document, where an $in of 1,000 ids costs 1,000 (20 s
     * against 0.3 s on 65,000 documents); the acknowledged ephemeral ones
     * by id */
    while (nd < n && it[nd].due) nd++;
    m = nd;
    /* another shard's round deleted them already: one scan serves the
     * rounds of every shard up to its cutoff */
    if (m > 0 && it[m - 1].due <= s->deleted_upto) m = -m;
    while (m > 0) {
        bson_t *f = BCON_NEW("expire_at", "{", "$lte", BCON_DATE_TIME(it[m - 1].due), "}");
        int     ok = mongoc_collection_delete_many(messages, f, NULL, NULL, &error);
        bson_destroy(f);
        if (ok) {
            if (it[m - 1].due > s->deleted_upto) s->deleted_upto = it[m - 1].due;
            break;
        }
        /* FerretDB (SQLite) deletes what matched as SQL variables, at most
         * 32,766: a smaller range, down to one expire_at; what is left of
         * the round goes by id below */
        if (strstr(error.message, "too many SQL variables") == NULL) {
            cw_warn("persist: sweep: delete expired messages: %s", error.message);
            rc = -1;
            break;
        }
        m = m > 1 ? m / 2 : 0;
    }
    if (m < 0) m = -m;
    for (int i = m; i < n; i++) {
        snprintf(k, sizeof(k), "%d", nids++);
        BSON_APPEND_UTF8(&ids, k, it[i].id);
    }
    BSON_APPEND_DOCUMENT_BEGIN(&filter, "_id", &in);
    BSON_APPEND_ARRAY(&in, "$in", &ids);
    bson_append_document_end(&filter, &in);
    if (rc == 0 && nids > 0 && !mongoc_collection_delete_many(messages, &filter, NULL, NULL, &error)) {
        cw_warn("persist: sweep: delete %d messages: %s", nids, error.message);
        rc = -1;
    }
    /* every id for the `last` lookups */
    bson_reinit(&ids);
    for (int i = 0; i < n; i++) {
        snprintf(k, sizeof(k), "%d", i);
        BSON_APPEND_UTF8(&ids, k, it[i].id);
    }
    if (rc == 0) rc = strip_lasts(conversations, &ids);
    if (rc == 0) rc = strip_lasts(groups, &ids);
    bson_destroy(&filter);
    bson_destroy(&ids);
    if (rc != 0) return -1;

    /* the inboxes: direct participants, or the group's members (current or
     * past: an inbox without the message costs one short scan) */
    for (int i = 0; i < n; i++) {
        char        a[CW_ID_MAX + 1], b[CW_ID_MAX + 1], ts_s[24];
        int         is_group = 0;
        redisReply *mem = NULL;
        size_t      nu;

        if (cw_parse_conv(it[i].conv, a, b, &is_group) != 0) continue;
        if (is_group) {
            mem = cw_redis_command(c, "HKEYS chat:{s%d}:g:%s:mem", shard, a);
            if (mem == NULL) return -1;
        }
        nu = is_group ? (mem->type == REDIS_REPLY_ARRAY ? mem->elements : 0) : (strcmp(a, b) == 0 ? 1 : 2);
        snprintf(ts_s, sizeof(ts_s), "%" PRId64, it[i].ts);
        for (size_t u = 0; u < nu; u++) {
            const char *user = is_group ? mem->element[u]->str : (u ? b : a);
            char        key[CW_ID_MAX + 24];
            const char *argv[7];
            size_t      lens[7];
            snprintf(key, sizeof(key), "chat:{u:%s}:inbox", user);
            argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_EXPIRE); argv[2] = "1"; argv[3] = key;
            argv[4] = ts_s; argv[5] = EXPIRE_SLACK_MS; argv[6] = it[i].id;
            for (int j = 0; j < 7; j++) lens[j] = strlen(argv[j]);
            cw_redis_append_argv(c, 7, argv, lens);
            ncmd++;
        }
        if (mem) freeReplyObject(mem);
        cw_redis_append(c, "ZREM chat:{s%d}:exp %s", shard, it[i].member);
        cw_redis_append(c, "ZREM chat:{s%d}:eph %s", shard, it[i].member);
        ncmd += 2;
    }
    for (int i = 0; i < ncmd; i++) {
        if (cw_redis_get_reply(c, &r) != REDIS_OK) return -1;
        if (r->type == REDIS_REPLY_ERROR) {
            if (strncmp(r->str, "NOSCRIPT", 8) == 0) rc = -2;
            else {
                if (rc == 0) cw_warn("persist: sweep: inbox: %s", r->str);
                rc = -1;
            }
        }
        freeReplyObject(r);
    }
    if (rc == -2) cw_lua_load(c);                   /* Redis lost its scripts: next round */
    return rc ? -1 : 0;
}

/* Is every recipient device done with this ephemeral message? */
static int
delivered_everywhere(cw_redis_t *c, int shard, const item_t *it)
{
    char        a[CW_ID_MAX + 1], b[CW_ID_MAX + 1];
    int         is_group = 0, rc = 1;
    redisReply *mem = participants(c, shard, it->conv, a, b, &is_group);

    if (cw_parse_conv(it->conv, a, b, &is_group) != 0) return 0;
    if (!is_group) {
        /* the recipient (notes to self: the user's own devices) */
        const char *peer = strcmp(it->from, a) == 0 ? b : a;
        rc = acked_by(c, peer, it->conv, it->seq);
    } else if (mem == NULL || mem->type != REDIS_REPLY_ARRAY) {
        rc = mem == NULL ? -1 : 0;
    } else {
        redisReply *since = cw_redis_command(c, "HGETALL chat:{s%d}:g:%s:mem", shard, a);
        for (size_t j = 0; rc == 1 && since && since->type == REDIS_REPLY_ARRAY && j + 1 < since->elements; j += 2) {
            const char *u = since->element[j]->str;
            if (strcmp(u, it->from) == 0 || since->element[j + 1]->type != REDIS_REPLY_STRING
                || !member_at(since->element[j + 1]->str, it->seq)) continue;
            rc = acked_by(c, u, it->conv, it->seq);
        }
        if (since == NULL) rc = -1;
        else freeReplyObject(since);
    }
    if (mem) freeReplyObject(mem);
    return rc;
}

void
cw_sweep_tick(cw_sweep_t *s, cw_redis_t *c, mongoc_collection_t *messages, mongoc_collection_t *conversations,
              mongoc_collection_t *groups)
{
    int64_t now = cw_mono_ms();
    int     budget;
    item_t *items;

    if (c == NULL) return;
    s->tokens += (double) (now - s->t_tokens) * s->cf->sweep_rate / 1000.0;
    s->t_tokens = now;
    if (s->tokens > s->cf->sweep_batch) s->tokens = s->cf->sweep_batch;
    budget = (int) s->tokens;
    if (budget < 1) return;
    items = malloc(sizeof(item_t) * (size_t) budget);
    if (items == NULL) return;
    for (int k = 0; k < s->cf->shards && budget > 0; k++) {
        int         shard = (s->next_shard + k) % s->cf->shards;
        redisReply *r[2] = { NULL, NULL };
        int         n = 0, failed = 0;

        for (int set = 0; set < 2 && budget > 0 && !failed; set++) {
            /* set 0: expired (days, or an ephemeral one never delivered);
             * set 1: ephemeral ones waiting for their acks, oldest first */
            if (set == 0)
                r[0] = cw_redis_command(c, "ZRANGEBYSCORE chat:{s%d}:exp -inf %lld WITHSCORES LIMIT 0 %d", shard,
                                        (long long) cw_now_ms(), budget);
            else
                r[1] = cw_redis_command(c, "ZRANGE chat:{s%d}:eph %d %d", shard, s->eph_off[shard],
                                        s->eph_off[shard] + budget - 1);
            if (r[set] == NULL) { failed = 1; break; }
            /* the ones still waiting are passed over next time, so that
             * an offline recipient's backlog does not hide newer ones */
            if (set == 1) {
                if (r[1]->type != REDIS_REPLY_ARRAY || (int) r[1]->elements < budget) s->eph_off[shard] = 0;
                else s->eph_off[shard] += budget;
            }
            for (size_t j = 0; r[set]->type == REDIS_REPLY_ARRAY && j < r[set]->elements && budget > 0;
                 j += set == 0 ? 2 : 1)
            {
                int d;
                if (r[set]->element[j]->type != REDIS_REPLY_STRING
                    || (set == 0 && (j + 1 >= r[set]->elements || r[set]->element[j + 1]->type != REDIS_REPLY_STRING)))
                    continue;
                if (parse_item(r[set]->element[j]->str, &items[n]) != 0) {
                    redisReply *x = cw_redis_command(c, "ZREM chat:{s%d}:%s %s", shard, set ? "eph" : "exp",
                                                     r[set]->element[j]->str);
                    if (x) freeReplyObject(x);
                    continue;
                }
                budget--;
                s->tokens -= 1;
                s->n_checked++;
                if (set == 0) items[n].due = strtoll(r[0]->element[j + 1]->str, NULL, 10);
                if (set == 1) {
                    int dup = 0;
                    for (int q = 0; q < n && !dup; q++) dup = strcmp(items[q].id, items[n].id) == 0;
                    if (dup) continue;
                    if ((d = delivered_everywhere(c, shard, &items[n])) != 1) {
                        if (d < 0) failed = 1;
                        if (d < 0) break;
                        continue;
                    }
                }
                n++;
            }
        }
        if (!failed && remove_items(s, c, messages, conversations, groups, shard, items, n) == 0) {
            s->n_removed += (uint64_t) n;
            if (s->eph_off[shard] >= n) s->eph_off[shard] -= n;
            else s->eph_off[shard] = 0;
        }
        for (int set = 0; set < 2; set++) if (r[set]) freeReplyObject(r[set]);
        if (failed) break;
    }
    free(items);
    s->next_shard = (s->next_shard + 1) % s->cf->shards;
    if (now >= s->next_stats) {
        if (s->n_removed) cw_info("persist: sweep removed %" PRIu64 " messages (%" PRIu64 " looked at) in the last 10 s",
                                  s->n_removed, s->n_checked);
        s->n_removed = s->n_checked = 0;
        s->next_stats = now + 10000;
    }
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
