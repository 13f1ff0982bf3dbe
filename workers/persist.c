/*
 * The persist role (docs/PIPELINE.md, "MongoDB"): queue batches into
 * MongoDB with write concern majority, acknowledged only after the writes
 * succeeded. Every write is idempotent, so a batch written again after a
 * crash or a failed acknowledgement changes nothing:
 *
 *   messages        insert, _id = message id; duplicate key = already there
 *   conversations   one upsert per (user, conversation) for all the
 *                   batches of persist_state_delay_ms (pend_merge):
 *                   $setOnInsert the zero pointers, $max last_seq, read_seq,
 *                   delivered_seq, ts and `last` (seq first); the batches
 *                   are acknowledged once it is written (ack_ready)
 *   groups          membership entries: one upsert per group and batch with
 *                   the newest state, filter {_id, ver: {$lt: seq}} (a
 *                   duplicate key means a newer state is stored already),
 *                   and a history record "g:G#<seq>" in messages; group
 *                   messages raise last_seq and set last/ts like above
 *
 * While MongoDB is away the batch is retried with backoff (up to 5 s),
 * never acknowledged, and the process does not exit.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What one batch changes in one conversations document, or (group set)
 * in one groups document. */
typedef struct {
    char        id[CW_ID_MAX + 1 + CW_CONV_MAX + 1];   /* "<user>|<conv>", or "g:G" for a group */
    const char *user;
    const char *conv;
    const char *group;                                 /* groups document: its _id */
    int64_t     last_seq, read_seq, delivered_seq;     /* 0: untouched */
    int         last_msg;                              /* index of the newest msg, or -1 */
    int64_t     state_seq;                             /* group: newest membership entry */
    int         state_entry;                           /* ... its index, or -1 */
    int         state_stored;                          /* inserted as a new document */
} convop_t;

/*
 * A conversations (groups) document's change not written yet: the batches
 * coalesced since its first change, written persist_state_delay_ms after
 * it (see pend_merge). first is the serial of the oldest batch it holds a
 * change of: no batch from there on is acknowledged before it is written.
 */
typedef struct {
    char      id[CW_ID_MAX + 1 + CW_CONV_MAX + 1];  /* as convop_t */
    int       ulen;                               /* id[0..ulen) is the user; 0: a groups document */
    int64_t   last_seq, read_seq, delivered_seq;  /* 0: untouched */
    int64_t   ts;
    bson_t   *last;                               /* the newest message's `last`, or NULL */
    int64_t   lseq;                               /* ... its seq */
    uint64_t  first;
    int64_t   due;                                /* cw_mono_ms() */
} pend_t;

/* Where a written batch ends in each shard: acknowledged once nothing
 * pending holds a change of it or of an earlier batch. */
typedef struct {
    uint64_t  serial;
    int       n;
    struct { int shard; int64_t offset; char qid[48]; } *pos;
} marker_t;

typedef struct {
    const cw_config_t   *cf;
    mongoc_client_t     *client;
    char                 db[128];
    mongoc_collection_t *messages, *conversations, *groups;
    int                  indexes_ok;
    cw_sweep_t          *sweep;        /* expiry (sweep.c) */
    cw_redis_t        *c;
    cw_queue_t          *q;
    cw_dlq_t            *dlq;
    cw_batch_t           batch;
    cw_batch_t           more;
    cw_heartbeat_t      *hb;         /* the window's later fetches, before they join batch */

    /* per batch */
    char               **refused;      /* per entry: why MongoDB refuses its document, or NULL */
    bson_t             **msg_doc;      /* per entry: the messages document, or NULL */
    bson_t             **msg_last;     /* per entry: the `last` subdocument */
    bson_t             **state_set;    /* per membership entry: the groups document's $set */
    int64_t             *msg_ts;
    int                  ecap;
    convop_t            *ops;
    int                  nops, opcap;
    int                 *slots;        /* hash of ops by id */
    int                  nslots;
    uint64_t             serial;       /* of the batch in hand */

    /* across batches: what is written later, and what is acknowledged then */
    pend_t              *pend;
    int                  npend, pcap;
    int                 *pslots;       /* hash of pend by id */
    int                  npslots;
    marker_t            *marks;        /* oldest first */
    int                  nmarks, mcap;
    cw_batch_t           ackb;         /* the positions of one acknowledgement */

    uint64_t             n_msgs, n_receipts, n_groups, n_batches, n_dead;
    uint64_t             n_entries, n_statements;
    int64_t              busy_ms;      /* spent writing batches (prepare + MongoDB) */
    int64_t              next_stats;
    int64_t              t_batch;
} persist_t;

static uint32_t
fnv(const char *s)
{
    uint32_t h = 2166136261u;
    while (*s) { h ^= (unsigned char) *s++; h *= 16777619u; }
    return h;
}

/* user NULL: the groups document of conv "g:G" */
static convop_t *
op_get(persist_t *p, const char *user, const char *conv)
{
    char     id[sizeof(((convop_t *) 0)->id)];
    uint32_t h;

    if (user) snprintf(id, sizeof(id), "%s|%s", user, conv);
    else snprintf(id, sizeof(id), "%s", conv);
    h = fnv(id) & (uint32_t) (p->nslots - 1);
    while (p->slots[h] >= 0) {
        convop_t *op = &p->ops[p->slots[h]];
        if (strcmp(op->id, id) == 0) return op;
        h = (h + 1) & (uint32_t) (p->nslots - 1);
    }
    if (p->nops == p->opcap) return NULL;              /* sized for the batch: cannot happen */
    p->slots[h] = p->nops;
    convop_t *op = &p->ops[p->nops++];
    memset(op, 0, sizeof(*op));
    snprintf(op->id, sizeof(op->id), "%s", id);
    op->user = user;
    op->conv = conv;
    op->group = user ? NULL : conv + 2;
    op->last_msg = -1;
    op->state_entry = -1;
    return op;
}

static void
free_batch_docs(persist_t *p)
{
    for (int i = 0; i < p->ecap; i++) {
        if (p->msg_doc[i]) bson_destroy(p->msg_doc[i]);
        if (p->msg_last[i]) bson_destroy(p->msg_last[i]);
        if (p->state_set[i]) bson_destroy(p->state_set[i]);
        p->msg_doc[i] = p->msg_last[i] = p->state_set[i] = NULL;
    }
}

static int
ensure_cap(persist_t *p, int n)
{
    int slots = 16;
    if (n > p->ecap) {
        free_batch_docs(p);
        free(p->msg_doc); free(p->msg_last); free(p->state_set); free(p->msg_ts); free(p->ops);
        for (int i = 0; p->refused && i < p->ecap; i++) free(p->refused[i]);
        free(p->refused);
        p->refused = calloc((size_t) n, sizeof(char *));
        p->msg_doc = calloc((size_t) n, sizeof(bson_t *));
        p->msg_last = calloc((size_t) n, sizeof(bson_t *));
        p->state_set = calloc((size_t) n, sizeof(bson_t *));
        p->msg_ts = calloc((size_t) n, sizeof(int64_t));
        p->ops = calloc(2 * (size_t) n, sizeof(convop_t));
        if (!p->refused || !p->msg_doc || !p->msg_last || !p->state_set || !p->msg_ts || !p->ops) {
            p->ecap = 0;
            return -1;
        }
        p->ecap = n;
        p->opcap = 2 * n;
    }
    while (slots < 4 * n) slots *= 2;
    if (slots > p->nslots) {
        free(p->slots);
        p->slots = malloc(sizeof(int) * (size_t) slots);
        if (p->slots == NULL) { p->nslots = 0; return -1; }
        p->nslots = slots;
    }
    for (int i = 0; i < p->nslots; i++) p->slots[i] = -1;
    p->nops = 0;
    return 0;
}

/* Fields of a message as clients see it (no type, no cursor). The `last`
 * subdocument (idkey "id") starts with seq: `$max: {last: ...}` then keeps
 * the message with the highest seq (BSON compares documents field by
 * field), which is what lets one upsert filtered by _id alone carry it. */
static int
append_msg(bson_t *b, const char *idkey, const char *id, const cw_entry_t *e, json_t *ev, int64_t ts)
{
    json_t *v;
    int     last = strcmp(idkey, "id") == 0;

    if (last) BSON_APPEND_INT64(b, "seq", e->seq);
    BSON_APPEND_UTF8(b, idkey, id);
    BSON_APPEND_UTF8(b, "conv", e->conv);
    if (!last) BSON_APPEND_INT64(b, "seq", e->seq);
    BSON_APPEND_UTF8(b, "from", e->from);
    if (e->is_group) BSON_APPEND_UTF8(b, "group", e->group);
    else BSON_APPEND_UTF8(b, "to", e->to);
    v = json_object_get(ev, "body");
    if (json_is_string(v)) bson_append_utf8(b, "body", 4, json_string_value(v), (int) json_string_length(v));
    v = json_object_get(ev, "kind");
    BSON_APPEND_UTF8(b, "kind", json_is_string(v) ? json_string_value(v) : "text");
    v = json_object_get(ev, "media");
    if (json_is_object(v)) {
        char         *s = json_dumps(v, JSON_COMPACT);
        bson_error_t  err;
        bson_t       *m = s ? bson_new_from_json((const uint8_t *) s, -1, &err) : NULL;
        free(s);
        if (m == NULL) return -1;
        BSON_APPEND_DOCUMENT(b, "media", m);
        bson_destroy(m);
    }
    BSON_APPEND_INT64(b, "ts", ts);
    return 0;
}

/* name: [the strings of the JSON array a] */
static void
append_strings(bson_t *doc, const char *name, json_t *a)
{
    bson_t  arr;
    size_t  n;
    json_t *v;
    char    key[24];

    BSON_APPEND_ARRAY_BEGIN(doc, name, &arr);
    json_array_foreach(a, n, v) {
        if (!json_is_string(v)) continue;
        snprintf(key, sizeof(key), "%zu", n);
        bson_append_utf8(&arr, key, -1, json_string_value(v), (int) json_string_length(v));
    }
    bson_append_array_end(doc, &arr);
}

/*
 * A membership entry: its history record for messages ({_id: "g:G#<seq>",
 * conv, seq, group, from, kind: "group", event, members, ts}) and the $set
 * of its groups document (name, owner, members, since, created, ver).
 * FerretDB refuses field names with '.', which user ids may contain, so
 * since is stored as [{u, seq}] instead of {u: seq}.
 */
static int
group_docs(persist_t *p, int i)
{
    cw_entry_t  *e = &p->batch.e[i];
    json_error_t jerr;
    json_t      *ev = json_loadb(e->ev, e->ev_len, JSON_ALLOW_NUL, &jerr);
    json_t      *st = json_loads(e->state, JSON_ALLOW_NUL, &jerr);
    json_t      *members, *smembers, *since, *name, *owner, *ts, *created, *v;
    bson_t      *doc, *set, arr, sub;
    const char  *k;
    size_t       n;
    char         id[CW_CONV_MAX + 24], key[24];
    int          rc = -1;

    if (ev == NULL || st == NULL) goto done;
    members = json_object_get(ev, "members");
    ts = json_object_get(ev, "ts");
    name = json_object_get(st, "name");
    owner = json_object_get(st, "owner");
    smembers = json_object_get(st, "members");
    since = json_object_get(st, "since");
    created = json_object_get(st, "created");
    if (!json_is_array(members) || !json_is_string(name) || !json_is_string(owner) || !json_is_array(smembers)
        || !json_is_object(since) || !json_is_integer(created))
    {
        goto done;
    }
    p->msg_ts[i] = json_is_integer(ts) ? (int64_t) json_integer_value(ts) : cw_now_ms();

    doc = p->msg_doc[i] = bson_new();
    snprintf(id, sizeof(id), "%s#%" PRId64, e->conv, e->seq);
    BSON_APPEND_UTF8(doc, "_id", id);
    BSON_APPEND_UTF8(doc, "conv", e->conv);
    BSON_APPEND_INT64(doc, "seq", e->seq);
    BSON_APPEND_UTF8(doc, "group", e->group);
    BSON_APPEND_UTF8(doc, "from", e->from);
    BSON_APPEND_UTF8(doc, "kind", "group");
    BSON_APPEND_UTF8(doc, "event", e->event);
    append_strings(doc, "members", members);
    BSON_APPEND_INT64(doc, "ts", p->msg_ts[i]);

    set = p->state_set[i] = bson_new();
    bson_append_utf8(set, "name", 4, json_string_value(name), (int) json_string_length(name));
    bson_append_utf8(set, "owner", 5, json_string_value(owner), (int) json_string_length(owner));
    append_strings(set, "members", smembers);
    BSON_APPEND_ARRAY_BEGIN(set, "since", &arr);
    n = 0;
    json_object_foreach(since, k, v) {
        snprintf(key, sizeof(key), "%zu", n++);
        BSON_APPEND_DOCUMENT_BEGIN(&arr, key, &sub);
        BSON_APPEND_UTF8(&sub, "u", k);
        BSON_APPEND_INT64(&sub, "seq", json_is_integer(v) ? (int64_t) json_integer_value(v) : e->seq);
        bson_append_document_end(&arr, &sub);
    }
    bson_append_array_end(set, &arr);
    BSON_APPEND_INT64(set, "created", (int64_t) json_integer_value(created));
    BSON_APPEND_INT64(set, "ver", e->seq);
    rc = 0;
done:
    json_decref(ev);
    json_decref(st);
    return rc;
}

/* An entry that cannot be stored goes to the dead-letter queue. */
static int
dead(persist_t *p, cw_entry_t *e, const char *why)
{
    if (cw_dlq_put(p->dlq, p->c, e, why) != 0) return -1;
    p->n_dead++;
    return 0;
}

/* Turns the batch into documents and per-conversation changes. Entries
 * that cannot be stored are moved to the dead-letter queue (and then
 * acknowledged with the batch). Returns -1 when out of memory, -2 when a
 * dead letter could not be recorded (the batch is kept and prepared again;
 * entries recorded already are not recorded twice). */
static int
prepare(persist_t *p)
{
    cw_batch_t *b = &p->batch;

    if (ensure_cap(p, b->n) != 0) return -1;
    free_batch_docs(p);
    for (int i = 0; i < b->n; i++) {
        cw_entry_t *e = &b->e[i];
        convop_t   *op;

        if (e->dead) continue;                  /* recorded in the dead-letter queue already */
        if (!e->valid) {
            if (dead(p, e, e->why ? e->why : "invalid") != 0) return -2;
            continue;
        }
        if (p->refused[i]) {                    /* MongoDB refused its document (write_batch) */
            char why[300];
            snprintf(why, sizeof(why), "MongoDB refuses the document: %s", p->refused[i]);
            if (dead(p, e, why) != 0) return -2;
            free(p->refused[i]);
            p->refused[i] = NULL;
            continue;
        }
        if (e->type == CW_T_MSG) {
            json_error_t jerr;
            /* a body may hold U+0000: the module accepts "\u0000", and
             * BSON strings carry their length */
            json_t      *ev = json_loadb(e->ev, e->ev_len, JSON_ALLOW_NUL, &jerr), *id, *ts;
            if (ev == NULL || !json_is_object(ev) || !json_is_string(id = json_object_get(ev, "id"))
                || json_string_length(id) == 0 || json_string_length(id) != strlen(json_string_value(id)))
            {
                json_decref(ev);
                if (dead(p, e, ev == NULL ? "ev is not JSON" : "ev has no message id") != 0) return -2;
                continue;
            }
            ts = json_object_get(ev, "ts");
            p->msg_ts[i] = json_is_integer(ts) ? (int64_t) json_integer_value(ts) : cw_now_ms();
            p->msg_doc[i] = bson_new();
            p->msg_last[i] = bson_new();
            if (append_msg(p->msg_doc[i], "_id", json_string_value(id), e, ev, p->msg_ts[i]) != 0
                || append_msg(p->msg_last[i], "id", json_string_value(id), e, ev, p->msg_ts[i]) != 0)
            {
                bson_destroy(p->msg_doc[i]);
                bson_destroy(p->msg_last[i]);
                p->msg_doc[i] = p->msg_last[i] = NULL;
                json_decref(ev);
                if (dead(p, e, "bad media object") != 0) return -2;
                continue;
            }
            json_decref(ev);
            p->n_msgs++;
            if (e->is_group) {
                op = op_get(p, NULL, e->conv);
                if (op == NULL) return -1;
                if (e->seq > op->last_seq) {
                    op->last_seq = e->seq;
                    op->last_msg = i;
                }
                continue;
            }
            for (int k = 0; k < (strcmp(e->a, e->b) == 0 ? 1 : 2); k++) {
                op = op_get(p, k == 0 ? e->a : e->b, e->conv);
                if (op == NULL) return -1;
                if (e->seq > op->last_seq) {
                    op->last_seq = e->seq;
                    op->last_msg = i;
                }
            }
        } else if (e->type == CW_T_GROUP) {
            if (group_docs(p, i) != 0) {
                if (p->msg_doc[i]) bson_destroy(p->msg_doc[i]);
                if (p->state_set[i]) bson_destroy(p->state_set[i]);
                p->msg_doc[i] = p->state_set[i] = NULL;
                if (dead(p, e, "membership entry with a bad state or ev") != 0) return -2;
                continue;
            }
            op = op_get(p, NULL, e->conv);
            if (op == NULL) return -1;
            if (e->seq > op->state_seq) {
                op->state_seq = e->seq;
                op->state_entry = i;
            }
            p->n_groups++;
        } else if (e->type == CW_T_DEL) {
            continue;                           /* applied after the writes (write_batch) */
        } else {
            p->n_receipts++;
            /* a group's delivered pointers live in Redis (chat:{s}:g:G:dlv,
             * what /chat/receipts answers from); MongoDB keeps the read
             * pointers, which the conversation list needs for unread counts.
             * Writing one document per member per receipt would make a big
             * group's receipts the whole load of the database. */
            if (e->is_group && strcmp(e->st, "delivered") == 0) continue;
            op = op_get(p, e->from, e->conv);
            if (op == NULL) return -1;
            if (strcmp(e->st, "read") == 0) { if (e->seq > op->read_seq) op->read_seq = e->seq; }
            else if (e->seq > op->delivered_seq) op->delivered_seq = e->seq;
        }
    }
    return 0;
}

static void
wc_opts(bson_t *opts, int ordered)
{
    mongoc_write_concern_t *wc = mongoc_write_concern_new();
    mongoc_write_concern_set_wmajority(wc, 10000);
    bson_init(opts);
    BSON_APPEND_BOOL(opts, "ordered", ordered);
    mongoc_write_concern_append(wc, opts);
    mongoc_write_concern_destroy(wc);
}

/* Write errors of an insert that no retry can cure (a field name MongoDB
 * refuses, a document too large, ...), as opposed to a primary stepping
 * down or a timeout. */
static int
retryable_code(int64_t code)
{
    static const int64_t codes[] = { 6, 7, 24, 50, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11602, 13435,
                                     13436 };
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        if (codes[i] == code) return 1;
    return 0;
}

/* Only duplicate-key write errors (the document is already there)? */
static int
only_duplicates(const bson_t *reply)
{
    bson_iter_t it, arr, doc;
    int         n = 0;

    if (bson_iter_init_find(&it, reply, "writeConcernErrors") && BSON_ITER_HOLDS_ARRAY(&it)
        && bson_iter_recurse(&it, &arr) && bson_iter_next(&arr))
    {
        return 0;
    }
    if (!bson_iter_init_find(&it, reply, "writeErrors") || !BSON_ITER_HOLDS_ARRAY(&it)
        || !bson_iter_recurse(&it, &arr))
    {
        return 0;
    }
    while (bson_iter_next(&arr)) {
        if (!BSON_ITER_HOLDS_DOCUMENT(&arr) || !bson_iter_recurse(&arr, &doc)) return 0;
        if (!bson_iter_find(&doc, "code") || bson_iter_as_int64(&doc) != 11000) return 0;
        n++;
    }
    return n > 0;
}

static int
run_bulk(mongoc_bulk_operation_t *bulk, int dup_ok, const char *what)
{
    bson_t       reply;
    bson_error_t error;
    int          ok = (int) mongoc_bulk_operation_execute(bulk, &reply, &error);

    if (!ok && dup_ok && error.domain == MONGOC_ERROR_SERVER && only_duplicates(&reply)) ok = 1;
    if (!ok) cw_warn("persist: %s: %s (domain %u, code %u)", what, error.message, error.domain, error.code);
    bson_destroy(&reply);
    mongoc_bulk_operation_destroy(bulk);
    return ok ? 0 : -1;
}

/*
 * FerretDB v1 (SQLite backend) keeps one pooled SQLite connection open per
 * statement of an `update` command until the command ends
 * (handler/msg_update.go defers closing each statement's query inside the
 * loop), and its pool has 100: an update command of about 100 statements
 * deadlocks the whole server. Updates therefore go in commands of at most
 * UPDATE_CHUNK statements, leaving room for concurrent readers.
 */
#define UPDATE_CHUNK 32

typedef struct {
    mongoc_collection_t     *coll;
    mongoc_bulk_operation_t *bulk;
    int                      n;
    int                      dup_ok;               /* duplicate keys are success */
    int                      max;                  /* statements per command (0: UPDATE_CHUNK) */
    const char              *what;
    cw_heartbeat_t          *hb;                   /* kept alive through a long batch */
    uint64_t                *statements;
    cw_redis_t              *c;
} chunker_t;

static mongoc_bulk_operation_t *
new_bulk(mongoc_collection_t *coll)
{
    bson_t                   opts;
    mongoc_bulk_operation_t *bulk;

    wc_opts(&opts, 0);
    bulk = mongoc_collection_create_bulk_operation_with_opts(coll, &opts);
    bson_destroy(&opts);
    return bulk;
}

/* Runs the pending command, if any. */
static int
chunk_flush(chunker_t *ch)
{
    mongoc_bulk_operation_t *bulk = ch->bulk;

    ch->bulk = NULL;
    ch->n = 0;
    if (ch->hb && ch->c && !cw_redis_err(ch->c)) cw_heartbeat_tick(ch->hb, ch->c);    /* rate-limited itself */
    return bulk ? run_bulk(bulk, ch->dup_ok, ch->what) : 0;
}

/* Adds one update; runs the command when the chunk is full. */
static int
chunk_update(chunker_t *ch, const bson_t *sel, const bson_t *upd, const bson_t *opts)
{
    bson_error_t error;

    if (ch->bulk == NULL) ch->bulk = new_bulk(ch->coll);
    mongoc_bulk_operation_update_one_with_opts(ch->bulk, sel, upd, opts, &error);
    if (ch->statements) (*ch->statements)++;
    if (++ch->n < (ch->max ? ch->max : UPDATE_CHUNK)) return 0;
    return chunk_flush(ch);
}

static int64_t
get_created(const bson_t *set)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, set, "created") ? bson_iter_as_int64(&it) : 0;
}

/*
 * Step 1 of a batch: the insert of its messages (duplicate keys are
 * success). Documents MongoDB refuses for good are noted in refused[]
 * (the batch is then prepared again: they go to the dead-letter queue, the
 * rest is written): returns -3. Other failures -1 (retried as they are).
 */
static int
insert_messages(persist_t *p, mongoc_bulk_operation_t *bulk)
{
    bson_t       reply;
    bson_error_t error;
    bson_iter_t  it, arr, doc;
    int          ok = (int) mongoc_bulk_operation_execute(bulk, &reply, &error), refused = 0, other = 0;

    mongoc_bulk_operation_destroy(bulk);
    if (!ok && error.domain == MONGOC_ERROR_SERVER && only_duplicates(&reply)) ok = 1;
    if (!ok && error.domain == MONGOC_ERROR_SERVER
        && !(bson_iter_init_find(&it, &reply, "writeConcernErrors") && BSON_ITER_HOLDS_ARRAY(&it)
             && bson_iter_recurse(&it, &arr) && bson_iter_next(&arr))
        && bson_iter_init_find(&it, &reply, "writeErrors") && BSON_ITER_HOLDS_ARRAY(&it)
        && bson_iter_recurse(&it, &arr))
    {
        while (bson_iter_next(&arr)) {
            int64_t     index = -1, code = 0;
            const char *msg = "refused";
            if (!BSON_ITER_HOLDS_DOCUMENT(&arr) || !bson_iter_recurse(&arr, &doc)) { other = 1; continue; }
            while (bson_iter_next(&doc)) {
                if (strcmp(bson_iter_key(&doc), "index") == 0) index = bson_iter_as_int64(&doc);
                else if (strcmp(bson_iter_key(&doc), "code") == 0) code = bson_iter_as_int64(&doc);
                else if (strcmp(bson_iter_key(&doc), "errmsg") == 0 && BSON_ITER_HOLDS_UTF8(&doc))
                    msg = bson_iter_utf8(&doc, NULL);
            }
            if (code == 11000) continue;
            if (retryable_code(code) || index < 0) { other = 1; continue; }
            /* index counts the documents inserted: the index-th non-NULL msg_doc */
            for (int i = 0, k = 0; i < p->batch.n; i++) {
                if (p->msg_doc[i] == NULL) continue;
                if (k++ == index) {
                    free(p->refused[i]);
                    p->refused[i] = strdup(msg);
                    refused += p->refused[i] != NULL;
                    break;
                }
            }
        }
    }
    if (!ok && (refused == 0 || other)) {
        cw_warn("persist: insert messages: %s (domain %u, code %u)", error.message, error.domain, error.code);
    }
    bson_destroy(&reply);
    if (ok) return 0;
    return refused > 0 && !other ? -3 : -1;
}

/*
 * Step 2a: each group state as a new document first, all in one unordered
 * insert. Most states are a group's creation, whose document does not
 * exist yet; the insert is one statement for all of them, where the
 * conditional upsert below (filter {_id, ver: {$lt}}) is one statement per
 * group that FerretDB 1.24 cannot look up by _id: it reads and decodes the
 * whole groups collection for each (a thousand groups created at once
 * held persistence up for minutes). A duplicate key means the document is
 * there (an earlier state, a message's ver 0 document, or this state
 * written before): that group takes the conditional upsert, which keeps
 * the newest state. Returns 0, or -1 on any other failure (retried).
 */
static int
insert_group_states(persist_t *p)
{
    mongoc_bulk_operation_t *bulk = NULL;
    bson_t                   reply;
    bson_error_t             error;
    bson_iter_t              it, arr, doc;
    int                      n = 0, ok, rc = 0;
    int                     *op_of = NULL;        /* the n-th insert's op: a reply's index -> op */

    for (int i = 0; i < p->nops; i++) {
        convop_t *op = &p->ops[i];
        bson_t    d = BSON_INITIALIZER;
        op->state_stored = 0;
        if (op->state_entry < 0) continue;
        if (bulk == NULL) {
            op_of = malloc(sizeof(int) * (size_t) p->nops);
            if (op_of == NULL) return -1;
            bulk = new_bulk(p->groups);
        }
        op_of[n] = i;
        BSON_APPEND_UTF8(&d, "_id", op->group);
        bson_concat(&d, p->state_set[op->state_entry]);
        BSON_APPEND_INT64(&d, "last_seq", 0);
        BSON_APPEND_INT64(&d, "ts", get_created(p->state_set[op->state_entry]));
        mongoc_bulk_operation_insert_with_opts(bulk, &d, NULL, &error);
        bson_destroy(&d);
        op->state_stored = 1;               /* until the reply says otherwise */
        n++;
    }
    if (n == 0) return 0;
    p->n_statements++;
    ok = (int) mongoc_bulk_operation_execute(bulk, &reply, &error);
    mongoc_bulk_operation_destroy(bulk);
    if (!ok && !(error.domain == MONGOC_ERROR_SERVER && only_duplicates(&reply))) {
        cw_warn("persist: insert group states: %s (domain %u, code %u)", error.message, error.domain, error.code);
        rc = -1;
    } else if (!ok && bson_iter_init_find(&it, &reply, "writeErrors") && BSON_ITER_HOLDS_ARRAY(&it)
               && bson_iter_recurse(&it, &arr))
    {
        /* the index-th state op's document exists: it takes the upsert */
        while (bson_iter_next(&arr)) {
            int64_t index = -1;
            if (BSON_ITER_HOLDS_DOCUMENT(&arr) && bson_iter_recurse(&arr, &doc) && bson_iter_find(&doc, "index"))
                index = bson_iter_as_int64(&doc);
            if (index >= 0 && index < n) p->ops[op_of[index]].state_stored = 0;
            else rc = -1;
        }
    }
    bson_destroy(&reply);
    free(op_of);
    return rc;
}

/* ---- conversations state, written later ----------------------------------
 *
 * FerretDB (SQLite) runs each update statement in a transaction of its
 * own: on this stack a conversations upsert costs 150-250 µs of its CPU,
 * where a batch's messages go in one insert (about 60 µs per message with
 * no upserts at all; docs/BENCHMARKS.md). So a conversations (groups)
 * document's changes are coalesced over persist_state_delay_ms from its
 * first change on, and no batch is acknowledged before every change it
 * holds is written: a crash re-reads the batches since (every write is
 * idempotent), nothing is lost. The messages themselves (history) are
 * still inserted with their batch. Written at once, whatever the delay:
 * a message with an expiry policy (the sweeper must not find its `last`
 * missing and see it written afterwards), everything before a batch's
 * deletions (they read and change `last`), and everything when more than
 * PEND_MAX documents or MARKS_MAX batches wait.
 */
#define PEND_MAX  20000
#define MARKS_MAX 4096

/* pslots sized for pcap (load at most one half), filled from pend */
static int
pend_rehash(persist_t *p)
{
    int need = 16;

    while (need < 2 * p->pcap) need *= 2;
    if (need != p->npslots) {
        int *ns = malloc(sizeof(int) * (size_t) need);
        if (ns == NULL) return -1;
        free(p->pslots);
        p->pslots = ns;
        p->npslots = need;
    }
    for (int i = 0; i < p->npslots; i++) p->pslots[i] = -1;
    for (int i = 0; i < p->npend; i++) {
        uint32_t h = fnv(p->pend[i].id) & (uint32_t) (p->npslots - 1);
        while (p->pslots[h] >= 0) h = (h + 1) & (uint32_t) (p->npslots - 1);
        p->pslots[h] = i;
    }
    return 0;
}

static pend_t *
pend_get(persist_t *p, const char *id, int ulen)
{
    uint32_t h;
    pend_t  *x;

    if (p->npend == p->pcap) {
        int     cap = p->pcap ? 2 * p->pcap : 1024;
        pend_t *np = realloc(p->pend, sizeof(*np) * (size_t) cap);
        if (np == NULL) return NULL;
        p->pend = np;
        p->pcap = cap;
    }
    if (2 * (p->npend + 1) > p->npslots && pend_rehash(p) != 0) return NULL;
    h = fnv(id) & (uint32_t) (p->npslots - 1);
    while (p->pslots[h] >= 0) {
        x = &p->pend[p->pslots[h]];
        if (strcmp(x->id, id) == 0) return x;
        h = (h + 1) & (uint32_t) (p->npslots - 1);
    }
    p->pslots[h] = p->npend;
    x = &p->pend[p->npend++];
    memset(x, 0, sizeof(*x));
    snprintf(x->id, sizeof(x->id), "%s", id);
    x->ulen = ulen;
    x->first = p->serial;
    x->due = cw_mono_ms() + p->cf->persist_state_delay_ms;
    return x;
}

/* One batch's change of a document joins what is pending for it; every
 * field only moves forward, as in MongoDB ($max). */
static int
pend_merge(persist_t *p, const convop_t *op)
{
    pend_t     *x = pend_get(p, op->id, op->group ? 0 : (int) strlen(op->user));
    bson_iter_t it;

    if (x == NULL) return -1;
    if (op->last_seq > x->last_seq) x->last_seq = op->last_seq;
    if (op->read_seq > x->read_seq) x->read_seq = op->read_seq;
    if (op->delivered_seq > x->delivered_seq) x->delivered_seq = op->delivered_seq;
    if (op->last_msg >= 0) {
        int64_t seq = p->batch.e[op->last_msg].seq;
        if (x->last == NULL || seq > x->lseq) {
            bson_t *l = bson_copy(p->msg_last[op->last_msg]);
            if (l == NULL) return -1;
            if (x->last) bson_destroy(x->last);
            x->last = l;
            x->lseq = seq;
        }
        if (p->msg_ts[op->last_msg] > x->ts) x->ts = p->msg_ts[op->last_msg];
        if (p->msg_doc[op->last_msg] && bson_iter_init_find(&it, p->msg_doc[op->last_msg], "expire_at")) x->due = 0;
    }
    return 0;
}

/*
 * Writes the pending documents that are due (all: force), one upsert
 * each, filtered by _id alone: FerretDB (SQLite) looks a document up by
 * its _id only when the filter is exactly {_id: <string>}; any other
 * filter reads and decodes the whole collection per statement. Every field
 * moves forward only ($max): the pointers, ts (of the newest message) and
 * `last`, whose first field is seq (append_msg), so an older message never
 * replaces a newer one, whatever order batches are written (or written
 * again) in. A group message persisted before its group's first state
 * leaves a document with ver 0. 0, or -1 (all kept, written again).
 */
static int
pend_write(persist_t *p, int force)
{
    int64_t   now = cw_mono_ms();
    bson_t    upsert = BSON_INITIALIZER;
    chunker_t ch;
    int       rc = -1, kept = 0;

    if (p->npend == 0) return 0;
    BSON_APPEND_BOOL(&upsert, "upsert", true);
    memset(&ch, 0, sizeof(ch));
    ch.hb = p->hb;
    ch.statements = &p->n_statements;
    ch.c = p->c;
    for (int g = 0; g < 2; g++) {
        ch.coll = g ? p->groups : p->conversations;
        ch.what = g ? "update groups' last messages" : "update conversations";
        for (int i = 0; i < p->npend; i++) {
            pend_t *x = &p->pend[i];
            bson_t  sel = BSON_INITIALIZER, upd = BSON_INITIALIZER, soi, max;
            char    user[CW_ID_MAX + 1];
            int     r;
            if ((x->ulen == 0) != g || (!force && x->due > now)) continue;
            BSON_APPEND_UTF8(&sel, "_id", g ? x->id + 2 : x->id);
            BSON_APPEND_DOCUMENT_BEGIN(&upd, "$setOnInsert", &soi);
            if (g) {
                BSON_APPEND_INT64(&soi, "ver", 0);
            } else {
                snprintf(user, sizeof(user), "%.*s", x->ulen, x->id);
                BSON_APPEND_UTF8(&soi, "user", user);
                BSON_APPEND_UTF8(&soi, "conv", x->id + x->ulen + 1);
                if (!x->last_seq) BSON_APPEND_INT64(&soi, "last_seq", 0);
                if (!x->read_seq) BSON_APPEND_INT64(&soi, "read_seq", 0);
                if (!x->delivered_seq) BSON_APPEND_INT64(&soi, "delivered_seq", 0);
            }
            bson_append_document_end(&upd, &soi);
            BSON_APPEND_DOCUMENT_BEGIN(&upd, "$max", &max);
            if (x->last_seq) BSON_APPEND_INT64(&max, "last_seq", x->last_seq);
            if (x->read_seq) BSON_APPEND_INT64(&max, "read_seq", x->read_seq);
            if (x->delivered_seq) BSON_APPEND_INT64(&max, "delivered_seq", x->delivered_seq);
            if (x->last) {
                BSON_APPEND_INT64(&max, "ts", x->ts);
                BSON_APPEND_DOCUMENT(&max, "last", x->last);
            }
            bson_append_document_end(&upd, &max);
            r = chunk_update(&ch, &sel, &upd, &upsert);
            bson_destroy(&sel);
            bson_destroy(&upd);
            if (r != 0) goto done_chunk;
        }
        if (chunk_flush(&ch) != 0) goto done;
    }
    for (int i = 0; i < p->npend; i++) {
        pend_t *x = &p->pend[i];
        if (force || x->due <= now) {
            if (x->last) bson_destroy(x->last);
            continue;
        }
        p->pend[kept++] = *x;
    }
    p->npend = kept;
    pend_rehash(p);                             /* the table exists: cannot fail */
    rc = 0;
    goto done;
done_chunk:
    if (ch.bulk) mongoc_bulk_operation_destroy(ch.bulk);
done:
    bson_destroy(&upsert);
    return rc;
}

/* ms until the first pending document is due (at most max) */
static int
pend_wait(const persist_t *p, int max)
{
    int64_t now = cw_mono_ms(), w = max;
    for (int i = 0; i < p->npend; i++)
        if (p->pend[i].due - now < w) w = p->pend[i].due - now;
    return w < 10 ? 10 : (int) w;
}

/* The written batch's end in each shard, to be acknowledged (ack_ready).
 * Out of memory: not recorded, and a later batch's end covers its shards
 * (a shard it alone has stays behind: read again after a restart). */
static void
mark_push(persist_t *p)
{
    cw_batch_t *b = &p->batch;
    marker_t   *m;
    int         maxs = 0, *at;

    if (b->n == 0) return;
    if (p->nmarks == p->mcap) {
        int       cap = p->mcap ? 2 * p->mcap : 64;
        marker_t *nm = realloc(p->marks, sizeof(*nm) * (size_t) cap);
        if (nm == NULL) return;
        p->marks = nm;
        p->mcap = cap;
    }
    for (int i = 0; i < b->n; i++) if (b->e[i].shard > maxs) maxs = b->e[i].shard;
    at = malloc(sizeof(int) * (size_t) (maxs + 1));
    m = &p->marks[p->nmarks];
    m->pos = malloc(sizeof(*m->pos) * (size_t) (b->n < maxs + 1 ? b->n : maxs + 1));
    if (at == NULL || m->pos == NULL) {
        free(at);
        free(m->pos);
        cw_error("persist: out of memory noting a batch's position");
        return;
    }
    for (int s = 0; s <= maxs; s++) at[s] = -1;
    m->serial = p->serial;
    m->n = 0;
    /* a batch lists each shard's entries in stream order: the last one is
     * the shard's end (cw_queue_ack takes the highest anyway) */
    for (int i = 0; i < b->n; i++) {
        int s = b->e[i].shard < 0 ? 0 : b->e[i].shard, k = at[s];
        if (k < 0) k = at[s] = m->n++;
        m->pos[k].shard = b->e[i].shard;
        m->pos[k].offset = b->e[i].offset;
        memcpy(m->pos[k].qid, b->e[i].qid, sizeof(m->pos[k].qid));
    }
    free(at);
    p->nmarks++;
}

static void
marks_drop(persist_t *p, int k)
{
    for (int i = 0; i < k; i++) free(p->marks[i].pos);
    memmove(p->marks, p->marks + k, sizeof(p->marks[0]) * (size_t) (p->nmarks - k));
    p->nmarks -= k;
}

/* Acknowledges the batches older than every pending change. -1: Redis
 * failed (the caller reconnects; what was not committed is read again). */
static int
ack_ready(persist_t *p)
{
    uint64_t upto = UINT64_MAX;
    int      k = 0;

    for (int i = 0; i < p->npend; i++) if (p->pend[i].first < upto) upto = p->pend[i].first;
    cw_batch_clear(&p->ackb);
    for (; k < p->nmarks && p->marks[k].serial < upto; k++) {
        for (int j = 0; j < p->marks[k].n; j++) {
            cw_entry_t *e = cw_batch_add(&p->ackb);
            if (e == NULL) return 0;            /* out of memory: with a later one */
            e->shard = p->marks[k].pos[j].shard;
            e->offset = p->marks[k].pos[j].offset;
            memcpy(e->qid, p->marks[k].pos[j].qid, sizeof(e->qid));
        }
    }
    if (k == 0) return 0;
    if (cw_queue_is_kafka(p->q)) {
        cw_queue_ack(p->q, NULL, &p->ackb);     /* a failed commit is re-read: idempotent */
    } else {
        int na, bad = 0;
        if (p->c == NULL) return 0;
        na = cw_queue_ack(p->q, p->c, &p->ackb);
        for (int i = 0; i < na && !bad; i++) {
            redisReply *r;
            if (cw_redis_get_reply(p->c, &r) != REDIS_OK) bad = 1;
            else freeReplyObject(r);
        }
        if (na < 0 || bad) return -1;
    }
    marks_drop(p, k);
    return 0;
}

/* Writes the prepared batch; 0 when all of it is durably in MongoDB; -3
 * when documents were refused for good (prepare the batch again). */
static int
write_batch(persist_t *p)
{
    cw_batch_t              *b = &p->batch;
    mongoc_bulk_operation_t *bulk;
    bson_t                   upsert = BSON_INITIALIZER;
    bson_error_t             error;
    chunker_t                ch;
    int                      n = 0, rc = -1, force;

    BSON_APPEND_BOOL(&upsert, "upsert", true);

    /* 1. messages: one insert command (FerretDB inserts it in one go) */
    bulk = new_bulk(p->messages);
    for (int i = 0; i < b->n; i++) {
        if (p->msg_doc[i] == NULL) continue;
        mongoc_bulk_operation_insert_with_opts(bulk, p->msg_doc[i], NULL, &error);
        n++;
    }
    if (n == 0) mongoc_bulk_operation_destroy(bulk);
    else if ((rc = insert_messages(p, bulk)) != 0) goto done;
    rc = -1;

    /* 2. group states: the newest of the batch, where it is newer than
     * the stored one (else the upsert's insert is a duplicate key). One
     * statement per command: FerretDB 1.24 stops an unordered update
     * command at its first error, so a stale state's duplicate key would
     * silently skip the statements after it. */
    memset(&ch, 0, sizeof(ch));
    ch.hb = p->hb;
    ch.statements = &p->n_statements;
    ch.c = p->c;
    ch.coll = p->groups;
    ch.what = "update group states";
    ch.dup_ok = 1;
    ch.max = 1;
    if (insert_group_states(p) != 0) goto done;
    for (int i = 0; i < p->nops; i++) {
        convop_t *op = &p->ops[i];
        bson_t    sel = BSON_INITIALIZER, upd = BSON_INITIALIZER, lt, soi;
        int       r;
        if (op->state_entry < 0 || op->state_stored) continue;
        BSON_APPEND_UTF8(&sel, "_id", op->group);
        BSON_APPEND_DOCUMENT_BEGIN(&sel, "ver", &lt);
        BSON_APPEND_INT64(&lt, "$lt", op->state_seq);
        bson_append_document_end(&sel, &lt);
        BSON_APPEND_DOCUMENT(&upd, "$set", p->state_set[op->state_entry]);
        BSON_APPEND_DOCUMENT_BEGIN(&upd, "$setOnInsert", &soi);
        BSON_APPEND_INT64(&soi, "last_seq", 0);
        BSON_APPEND_INT64(&soi, "ts", get_created(p->state_set[op->state_entry]));
        bson_append_document_end(&upd, &soi);
        r = chunk_update(&ch, &sel, &upd, &upsert);
        bson_destroy(&sel);
        bson_destroy(&upd);
        if (r != 0) goto done_chunk;
    }
    if (chunk_flush(&ch) != 0) goto done;

    /* 3. the conversations and groups documents: this batch's changes
     * join what is pending, and what is due is written (see pend_write) */
    force = p->cf->persist_state_delay_ms == 0 || p->nmarks >= MARKS_MAX;
    for (int i = 0; i < b->n && !force; i++) if (b->e[i].type == CW_T_DEL) force = 1;
    for (int i = 0; i < p->nops; i++) {
        if (p->ops[i].group != NULL && p->ops[i].last_msg < 0) continue;   /* a state only: step 2 */
        if (pend_merge(p, &p->ops[i]) != 0) goto done;
    }
    if (p->npend > PEND_MAX) force = 1;
    if (pend_write(p, force) != 0) goto done;
    /* 4. deletions (delete.c), after the messages and the `last` they may
     * remove the body of */
    if (cw_persist_deletions(p->messages, p->conversations, p->groups, b) != 0) goto done;
    rc = 0;
    goto done;
done_chunk:
    if (ch.bulk) mongoc_bulk_operation_destroy(ch.bulk);
done:
    bson_destroy(&upsert);
    return rc;
}

static int
create_indexes(persist_t *p)
{
    static const struct { const char *coll, *name, *k1; int d1; const char *k2; int d2; int unique; } ix[] = {
        { "messages", "conv_1_seq_1", "conv", 1, "seq", 1, 1 },
        { "conversations", "user_1_ts_-1", "user", 1, "ts", -1, 0 },
        { "groups", "members_1", "members", 1, NULL, 0, 0 },
    };
    for (size_t i = 0; i < sizeof(ix) / sizeof(ix[0]); i++) {
        bson_t       cmd = BSON_INITIALIZER, arr, idx, key, reply;
        bson_error_t error;
        int          ok;
        BSON_APPEND_UTF8(&cmd, "createIndexes", ix[i].coll);
        BSON_APPEND_ARRAY_BEGIN(&cmd, "indexes", &arr);
        BSON_APPEND_DOCUMENT_BEGIN(&arr, "0", &idx);
        BSON_APPEND_DOCUMENT_BEGIN(&idx, "key", &key);
        BSON_APPEND_INT32(&key, ix[i].k1, ix[i].d1);
        if (ix[i].k2) BSON_APPEND_INT32(&key, ix[i].k2, ix[i].d2);
        bson_append_document_end(&idx, &key);
        BSON_APPEND_UTF8(&idx, "name", ix[i].name);
        if (ix[i].unique) BSON_APPEND_BOOL(&idx, "unique", true);
        bson_append_document_end(&arr, &idx);
        bson_append_array_end(&cmd, &arr);
        ok = mongoc_client_write_command_with_opts(p->client, p->db, &cmd, NULL, &reply, &error);
        bson_destroy(&cmd);
        bson_destroy(&reply);
        if (!ok) {
            cw_warn("persist: createIndexes %s: %s", ix[i].coll, error.message);
            return -1;
        }
    }
    cw_info("persist: indexes on %s.messages, %s.conversations and %s.groups are in place", p->db, p->db, p->db);
    return 0;
}

/*
 * The coalescing window: after a fetch, more entries are read for up to
 * persist_window_ms (or until WINDOW_MAX entries) and written as one batch, so a
 * conversation that changes many times in the window costs one update.
 * On FerretDB 1.24 (SQLite) each modifying update statement reads the
 * whole collection (its _id index is on `sjson->"_id"`, its statements
 * filter on `sjson->'$._id'`, which SQLite does not match), so statements
 * per batch are the cost, and entries per statement the throughput; when
 * persistence is behind the fetches return at once and the batch grows to
 * WINDOW_MAX. Nothing is acknowledged before the whole batch is written.
 * Memory: at most WINDOW_MAX entries (plus one fetch).
 */
#define WINDOW_MAX 20000

static void
collect_window(persist_t *p)
{
    int64_t end = cw_mono_ms() + p->cf->persist_window_ms;

    while (!cw_stop && p->batch.n < WINDOW_MAX) {
        int64_t left = end - cw_mono_ms();
        int     n, i;

        if (left <= 0 || (!cw_queue_is_kafka(p->q) && p->c == NULL)) break;
        n = cw_queue_fetch(p->q, p->c, &p->more, (int) left);
        if (n <= 0) break;                      /* quiet, or a failed read: the batch goes as it is */
        for (i = 0; i < p->more.n; i++) {
            cw_entry_t *d = cw_batch_add(&p->batch);
            if (d == NULL) break;
            *d = p->more.e[i];
            memset(&p->more.e[i], 0, sizeof(p->more.e[i]));
        }
        if (i < p->more.n) {                    /* out of memory: the rest is the next batch */
            memmove(p->more.e, p->more.e + i, sizeof(p->more.e[0]) * (size_t) (p->more.n - i));
            memset(p->more.e + (p->more.n - i), 0, sizeof(p->more.e[0]) * (size_t) i);
            p->more.n -= i;
            return;
        }
        p->more.n = 0;
    }
}

/*
 * `last` used to start with id; `$max: {last}` needs seq first (see
 * append_msg), and a stored `last` starting with a string would compare
 * above every new one and never move again. Once per database (the
 * marker is persist_meta {_id: "last_seq_first"}), before the first
 * batch, stored `last` subdocuments are rewritten with seq first.
 */
static int
migrate_last(persist_t *p)
{
    mongoc_collection_t *meta = mongoc_client_get_collection(p->client, p->db, "persist_meta");
    bson_t              *marker = BCON_NEW("_id", BCON_UTF8("last_seq_first"));
    bson_error_t         error;
    int64_t              done;
    int                  rc = -1, moved = 0, failed = 0;

    done = mongoc_collection_count_documents(meta, marker, NULL, NULL, NULL, &error);
    if (done < 0) { cw_warn("persist: persist_meta: %s", error.message); goto out; }
    if (done > 0) { rc = 0; goto out; }
    for (int g = 0; g < 2; g++) {
        mongoc_collection_t *coll = g ? p->groups : p->conversations;
        bson_t              *filter = BCON_NEW("last", "{", "$exists", BCON_BOOL(true), "}");
        bson_t              *opts = BCON_NEW("projection", "{", "last", BCON_INT32(1), "}");
        mongoc_cursor_t     *cur = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
        const bson_t        *doc;
        bson_iter_t          it, sub, id;

        while (mongoc_cursor_next(cur, &doc)) {
            bson_t  last = BSON_INITIALIZER, *sel, *upd;
            int64_t seq = -1;
            int     first = 1, ok;

            if (!bson_iter_init_find(&it, doc, "last") || !BSON_ITER_HOLDS_DOCUMENT(&it)
                || !bson_iter_init_find(&id, doc, "_id") || !BSON_ITER_HOLDS_UTF8(&id)
                || !bson_iter_recurse(&it, &sub))
            {
                continue;
            }
            while (bson_iter_next(&sub)) {
                if (strcmp(bson_iter_key(&sub), "seq") == 0) {
                    if (first) break;               /* the new layout already */
                    seq = bson_iter_as_int64(&sub);
                }
                first = 0;
            }
            if (seq < 0) continue;
            BSON_APPEND_INT64(&last, "seq", seq);
            bson_iter_recurse(&it, &sub);
            while (bson_iter_next(&sub)) {
                if (strcmp(bson_iter_key(&sub), "seq") != 0) bson_append_iter(&last, bson_iter_key(&sub), -1, &sub);
            }
            sel = BCON_NEW("_id", BCON_UTF8(bson_iter_utf8(&id, NULL)));
            upd = BCON_NEW("$set", "{", "last", BCON_DOCUMENT(&last), "}");
            ok = mongoc_collection_update_one(coll, sel, upd, NULL, NULL, &error);
            bson_destroy(sel);
            bson_destroy(upd);
            bson_destroy(&last);
            if (!ok) { failed = 1; break; }
            moved++;
        }
        if (!failed && mongoc_cursor_error(cur, &error)) failed = 1;
        mongoc_cursor_destroy(cur);
        bson_destroy(filter);
        bson_destroy(opts);
        if (failed) {
            cw_warn("persist: rewriting stored last messages: %s", error.message);
            goto out;
        }
    }
    if (!mongoc_collection_insert_one(meta, marker, NULL, NULL, &error) && error.code != 11000) {
        cw_warn("persist: persist_meta: %s", error.message);
        goto out;
    }
    if (moved) cw_info("persist: %d stored last messages rewritten with seq first", moved);
    rc = 0;
out:
    bson_destroy(marker);
    mongoc_collection_destroy(meta);
    return rc;
}

static void
drop_redis(persist_t *p, cw_backoff_t *bo, const char *why)
{
    if (p->c) {
        cw_warn("persist: redis %s: %s; reconnecting in %d ms", why,
                cw_redis_err(p->c) ? cw_redis_errstr(p->c) : "command failed", cw_backoff_ms(bo));
        cw_redis_free(p->c);
        p->c = NULL;
    }
    /* a new connection reads again from the committed positions: those
     * batches come again, with new positions to acknowledge */
    if (!cw_queue_is_kafka(p->q)) marks_drop(p, p->nmarks);
    cw_backoff_wait(bo);
}

int
cw_role_persist(const cw_config_t *cf)
{
    persist_t       p;
    cw_heartbeat_t  hb;
    cw_backoff_t    bo, mbo;
    int            *shards, kafka, have_batch = 0, prepared = 0;
    int64_t         next_redis_try = 0;
    char            err[256];

    memset(&p, 0, sizeof(p));
    p.cf = cf;
    cw_mongo_log_init();
    p.client = cw_mongo_client(cf, "chat-worker-persist", p.db, sizeof(p.db));
    if (p.client == NULL) return 2;
    p.messages = mongoc_client_get_collection(p.client, p.db, "messages");
    p.conversations = mongoc_client_get_collection(p.client, p.db, "conversations");
    p.groups = mongoc_client_get_collection(p.client, p.db, "groups");
    shards = malloc(sizeof(int) * (size_t) cf->shards);
    if (shards == NULL) return 1;
    for (int s = 0; s < cf->shards; s++) shards[s] = s;
    p.q = cw_queue_new(cf, "persist", shards, cf->shards, 0);
    free(shards);
    if (p.q == NULL) return 1;
    p.dlq = cw_dlq_new(cf, "persist");
    if (p.dlq == NULL) return 1;
    p.sweep = cw_sweep_new(cf);
    if (p.sweep == NULL) return 1;
    kafka = cw_queue_is_kafka(p.q);
    cw_heartbeat_init(&hb, cf, "persist");
    p.hb = &hb;
    cw_backoff_reset(&bo);
    cw_backoff_reset(&mbo);
    cw_info("role persist started (node %s, %s, database %s, batch %d, window %d ms, state delay %d ms)",
            cf->node_id, kafka ? "kafka topic chat.in, group chat-persist" : "consumer persist-0 on every shard",
            p.db, cf->batch, cf->persist_window_ms, cf->persist_state_delay_ms);
    p.next_stats = cw_mono_ms() + 10000;

    while (!cw_stop) {
        int n;

        /* Redis: the queue (Redis mode) and the heartbeat. In Kafka mode
         * a missing Redis only costs the heartbeat. */
        if (p.c == NULL && (!kafka || cw_mono_ms() >= next_redis_try)) {
            p.c = cw_redis_connect(cf, 5000, err, sizeof(err));
            if (p.c == NULL) {
                if (!kafka) {
                    cw_warn("persist: redis: %s; retrying in %d ms", err, cw_backoff_ms(&bo));
                    cw_backoff_wait(&bo);
                    continue;
                }
                next_redis_try = cw_mono_ms() + 5000;
            } else if (cw_queue_setup(p.q, p.c) != 0) {
                if (!kafka) { drop_redis(&p, &bo, "setup failed"); continue; }
                cw_redis_free(p.c);
                p.c = NULL;
            } else {
                cw_backoff_reset(&bo);
            }
        }
        if (p.c && (cw_heartbeat_tick(&hb, p.c) != 0 || (!kafka && cw_queue_maintain(p.q, p.c) != 0))) {
            if (!kafka) { drop_redis(&p, &bo, "connection lost"); continue; }
            cw_redis_free(p.c);
            p.c = NULL;
        }
        if (!p.indexes_ok) {
            if (create_indexes(&p) != 0 || migrate_last(&p) != 0) { cw_backoff_wait(&mbo); continue; }
            p.indexes_ok = 1;
            cw_sweep_ttl_index(p.client, p.db);
            if (cw_sweep_start(p.sweep) != 0) { p.indexes_ok = 0; cw_backoff_wait(&mbo); continue; }
            cw_backoff_reset(&mbo);
        }
        if (!have_batch) {
            if (p.more.n > 0) {                 /* left over by a window that could not take it */
                cw_batch_t t = p.batch;
                p.batch = p.more;
                p.more = t;
                cw_batch_clear(&p.more);
            } else {
                n = cw_queue_fetch(p.q, p.c, &p.batch, p.npend ? pend_wait(&p, 1000) : 1000);
                if (n < 0) {
                    if (!kafka) drop_redis(&p, &bo, "read failed");
                    continue;
                }
                if (n == 0) {
                    /* quiet: what is due is written, and acknowledged */
                    if (p.npend && pend_write(&p, 0) != 0) { cw_backoff_wait(&mbo); goto stats; }
                    if (ack_ready(&p) != 0) { drop_redis(&p, &bo, "ack failed"); continue; }
                    goto stats;
                }
            }
            collect_window(&p);
            have_batch = 1;
            prepared = 0;
            p.serial++;
        }
        if (!prepared) {
            p.t_batch = cw_mono_ms();
            /* kept until it is prepared and written: a Kafka consumer does
             * not read an uncommitted batch again by itself */
            int r = prepare(&p);
            if (r != 0) {
                if (r == -1) cw_error("persist: out of memory preparing a batch; retrying");
                if (!kafka && p.c && cw_redis_err(p.c)) { drop_redis(&p, &bo, "dead-letter write failed"); continue; }
                cw_backoff_wait(&mbo);
                continue;
            }
            /* the history policy of the new messages (sweep.c) */
            if (cw_sweep_plan(p.sweep, p.c, &p.batch, p.msg_doc, p.msg_ts) != 0) {
                if (!kafka) { drop_redis(&p, &bo, "policy lookup failed"); continue; }
                cw_redis_free(p.c);
                p.c = NULL;
                continue;
            }
            prepared = 1;
        }
        if ((n = write_batch(&p)) == -3) {
            prepared = 0;                       /* the refused ones go to the dead-letter queue */
            continue;
        }
        if (n != 0) {
            cw_warn("persist: mongodb write failed; %d entries kept unacknowledged, retrying in %d ms",
                    p.batch.n, cw_backoff_ms(&mbo));
            if (p.c) cw_heartbeat_tick(&hb, p.c);
            cw_backoff_wait(&mbo);
            continue;
        }
        cw_backoff_reset(&mbo);
        if (cw_sweep_commit(p.sweep, p.c) != 0) {
            /* Redis queue: unacknowledged, written again (no-op) and
             * committed again; Kafka: those messages are kept (logged) */
            if (!kafka) { drop_redis(&p, &bo, "expiry sets not written"); have_batch = 0; prepared = 0; continue; }
            cw_warn("persist: expiry of a batch's messages not recorded (redis); they are kept");
        }
        have_batch = 0;
        prepared = 0;
        p.busy_ms += cw_mono_ms() - p.t_batch;
        p.n_entries += (uint64_t) p.batch.n;
        mark_push(&p);
        if (ack_ready(&p) != 0) {
            /* The entries stay pending and are written again (no-op). */
            drop_redis(&p, &bo, "ack failed");
            continue;
        }
        p.n_batches++;
        /* a small batch: let entries gather before the next read, so that
         * at low rates one read, one write and one ack cover many entries
         * (persistence is asynchronous anyway) */
        if (p.batch.n < cf->batch && cf->gather_ms > 0 && !cw_stop) cw_sleep_ms(cf->gather_ms);
stats:
        if (cw_mono_ms() >= p.next_stats) {
            if (p.n_batches) {
                /* entries per second of writing: what persistence can
                 * sustain, whatever the idle time between batches */
                cw_info("persist: %" PRIu64 " messages, %" PRIu64 " receipts, %" PRIu64 " membership changes, %"
                        PRIu64 " dead letters in %" PRIu64 " batches in the last 10 s (%" PRIu64
                        " dead letters since start); %" PRIu64 " entries, %" PRIu64 " update statements, %"
                        PRId64 " ms writing: %.0f entries/s while writing; %d documents and %d batches pending",
                        p.n_msgs, p.n_receipts, p.n_groups, p.n_dead, p.n_batches, cw_dlq_total(p.dlq),
                        p.n_entries, p.n_statements, p.busy_ms,
                        p.busy_ms > 0 ? (double) p.n_entries * 1000.0 / (double) p.busy_ms : 0.0, p.npend,
                        p.nmarks);
            }
            p.n_msgs = p.n_receipts = p.n_groups = p.n_batches = p.n_dead = 0;
            p.n_entries = p.n_statements = 0;
            p.busy_ms = 0;
            p.next_stats = cw_mono_ms() + 10000;
        }
    }
    /* what is pending is written and what was written is committed, so a
     * restart does not write it again */
    if (pend_write(&p, 1) == 0 && (kafka || (p.c && !cw_redis_err(p.c)))) ack_ready(&p);
    if (!kafka && p.c && !cw_redis_err(p.c)) cw_queue_flush(p.q, p.c, 1);
    cw_heartbeat_clear(&hb, p.c);
    if (p.c) cw_redis_free(p.c);
    cw_queue_free(p.q);
    cw_dlq_free(p.dlq);
    cw_sweep_free(p.sweep);
    free_batch_docs(&p);
    cw_batch_free(&p.batch);
    cw_batch_free(&p.more);
    for (int i = 0; i < p.ecap; i++) free(p.refused[i]);
    free(p.refused);
    free(p.msg_doc); free(p.msg_last); free(p.state_set); free(p.msg_ts); free(p.ops); free(p.slots);
    for (int i = 0; i < p.npend; i++) if (p.pend[i].last) bson_destroy(p.pend[i].last);
    free(p.pend);
    free(p.pslots);
    marks_drop(&p, p.nmarks);
    free(p.marks);
    cw_batch_free(&p.ackb);
    mongoc_collection_destroy(p.messages);
    mongoc_collection_destroy(p.conversations);
    mongoc_collection_destroy(p.groups);
    mongoc_client_destroy(p.client);
    cw_info("role persist stopped");
    return 0;
}
