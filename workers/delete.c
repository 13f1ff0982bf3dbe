/*
 * Deletions (docs/PROTOCOL.md "Retention and deletion", docs/PIPELINE.md
 * "Deletions"): one queue entry t=del per request, written by the rest role
 * and processed like a message by the other roles, so that the fan-out
 * delivers the deletion event (durable: an inbox copy and a cursor, live
 * and on replay) and persist rewrites the stored message, each at its own
 * pace and idempotently.
 *
 *   rest     DELETE /chat/messages/<id>?conv=C[&for=me]: checks (sender,
 *            window, participant), then enqueues (XADD, or Kafka produce
 *            waited for) before answering: what is acknowledged is queued
 *   fanout   per recipient lua/tombstone.lua (the copies of the message in
 *            the inbox become a bodiless tombstone at their cursor), then
 *            the ordinary append of the deletion event (lua/inbox.lua,
 *            field x:<e|m>:<conv>:<seq>)
 *   persist  messages: body and media unset (everyone) or the user added to
 *            `hidden` (me); the conversation's `last` loses its body too
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How much older than the message the events before it in an inbox may
 * be (appends follow accepts; Kafka may reorder): lua/tombstone.lua stops
 * its scan there. */
#define TOMBSTONE_SLACK_MS  "600000"

int cw_qparam(const char *query, const char *name, char *out, size_t outlen);

static int
fail(json_t **out, int status, const char *code, const char *message)
{
    *out = json_pack("{s:s, s:s, s:s}", "type", "error", "code", code, "message", message);
    return status;
}

static const char *
doc_str(const bson_t *doc, const char *k)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, doc, k) && BSON_ITER_HOLDS_UTF8(&it) ? bson_iter_utf8(&it, NULL) : NULL;
}

static int64_t
doc_int(const bson_t *doc, const char *k)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, doc, k) && BSON_ITER_HOLDS_NUMBER(&it) ? bson_iter_as_int64(&it) : 0;
}

/* 1: the array field k holds the string v */
static int
doc_has(const bson_t *doc, const char *k, const char *v)
{
    bson_iter_t it, a;
    if (!bson_iter_init_find(&it, doc, k) || !BSON_ITER_HOLDS_ARRAY(&it) || !bson_iter_recurse(&it, &a)) return 0;
    while (bson_iter_next(&a)) {
        if (BSON_ITER_HOLDS_UTF8(&a) && strcmp(bson_iter_utf8(&a, NULL), v) == 0) return 1;
    }
    return 0;
}

/* The entry onto the conversation's shard: XADD (Redis queue) or a Kafka
 * record the broker confirmed. 0 when queued. */
static int
enqueue(const cw_config_t *cf, const chat_entry_t *v, const char *conv)
{
    int s = (int) chat_shard(conv, strlen(conv), (unsigned) cf->shards);

    if (strcmp(cf->queue, "kafka") == 0) {
        char   buf[8192];
        size_t n = chat_entry_json(v, buf, sizeof(buf));
        return n ? cw_rest_produce(s, conv, buf, n) : -1;
    } else {
        const char *name[CHAT_EF_N], *val[CHAT_EF_N], *argv[3 + 2 * CHAT_EF_N];
        size_t      len[CHAT_EF_N], lens[3 + 2 * CHAT_EF_N];
        char        num[CHAT_ENTRY_NUMBUF], key[48];
        int         n = chat_entry_pairs(v, name, val, len, num), argc = 3, rc;
        cw_redis_t *c = cw_rest_redis();
        redisReply *r;

        if (c == NULL) return -1;
        snprintf(key, sizeof(key), "chat:{s%d}:in", s);
        argv[0] = "XADD"; argv[1] = key; argv[2] = "*";
        for (int i = 0; i < n; i++) {
            argv[argc] = name[i];
            lens[argc++] = strlen(name[i]);
            argv[argc] = val[i];
            lens[argc++] = len[i];
        }
        for (int i = 0; i < 3; i++) lens[i] = strlen(argv[i]);
        r = cw_redis_command_argv(c, argc, argv, lens);
        if (r == NULL) {
            cw_rest_redis_failed();
            return -1;
        }
        rc = r->type == REDIS_REPLY_STRING ? 0 : -1;
        if (rc) cw_warn("rest: XADD %s: %s", key, r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        freeReplyObject(r);
        return rc;
    }
}

/* The t=del entry of a request by user (device: the acting one, which gets
 * no copy) in conv (a, b as cw_parse_conv), event "everyone", "me" or
 * "clear"; the caller sets ev and seq. */
static void
del_entry(chat_entry_t *v, const char *conv, const char *user, const char *device, int is_group,
          const char *a, const char *b, const char *event)
{
    memset(v, 0, sizeof(*v));
    v->type = CHAT_ENTRY_DEL;
    v->conv.p = conv; v->conv.len = strlen(conv);
    v->from.p = user; v->from.len = strlen(user);
    if (device && cw_valid_id(device, strlen(device), CW_DEV_MAX)) { v->dev.p = device; v->dev.len = strlen(device); }
    if (is_group) { v->group.p = a; v->group.len = strlen(a); }
    else if (strcmp(user, a) == 0) { v->to.p = b; v->to.len = strlen(b); }
    else { v->to.p = a; v->to.len = strlen(a); }
    v->event.p = event; v->event.len = strlen(event);
}

int
cw_delete_request(const cw_config_t *cf, const char *method, const char *path, const char *query,
                  const char *user, const char *device, mongoc_client_t *client, const char *db, json_t **out)
{
    const char          *id = path + strlen("/chat/messages/"), *from, *kind;
    char                 conv[CW_CONV_MAX + 1], a[CW_ID_MAX + 1], b[CW_ID_MAX + 1], what[16], ev[1024];
    int                  is_group, rc, everyone, status;
    int64_t              seq, sent, now = cw_now_ms(), since = 0;
    mongoc_collection_t *coll;
    mongoc_cursor_t     *cur;
    const bson_t        *doc;
    bson_t              *filter;
    bson_error_t         error;
    chat_entry_t         v;

    if (strncmp(path, "/chat/messages/", 15) != 0 || !cw_valid_id(id, strlen(id), CW_ID_MAX))
        return fail(out, 404, "not_found", "no such endpoint (DELETE /chat/messages/<id>?conv=<conv>)");
    if (strcmp(method, "DELETE") != 0) return fail(out, 405, "bad_request", "only DELETE is allowed here");
    /* every client action has a budget: a deletion costs MongoDB lookups */
    if ((status = cw_rest_budget(user, "deletes", cf->delete_rate, "too many deletions", out)) != 0)
        return status;
    rc = cw_qparam(query, "conv", conv, sizeof(conv));
    if (rc <= 0 || cw_parse_conv(conv, a, b, &is_group) != 0)
        return fail(out, 400, "bad_request", rc == 0 ? "conv is required" : "conv is not a conversation id");
    rc = cw_qparam(query, "for", what, sizeof(what));
    if (rc == 0) strcpy(what, "everyone");
    if (rc < 0 || (strcmp(what, "everyone") != 0 && strcmp(what, "me") != 0))
        return fail(out, 400, "bad_request", "for must be \"everyone\" (the default) or \"me\"");
    everyone = what[0] == 'e';
    if (is_group) {
        rc = cw_group_member(a, user, &since);
        if (rc < 0) return fail(out, 503, "unavailable", "redis unavailable");
        if (rc == 0 && !everyone) return fail(out, 403, "forbidden", "not a member of this group");
    } else if (strcmp(user, a) != 0 && strcmp(user, b) != 0) {
        return fail(out, 403, "forbidden", "not a participant of this conversation");
    }
    if (client == NULL) return fail(out, 503, "unavailable", "storage unavailable");

    /* the stored message: persist has it once the send was acknowledged
     * and its batch written (a fraction of a second) */
    coll = mongoc_client_get_collection(client, db, "messages");
    filter = BCON_NEW("_id", BCON_UTF8(id));
    cur = mongoc_collection_find_with_opts(coll, filter, NULL, NULL);
    if (!mongoc_cursor_next(cur, &doc)) {
        status = mongoc_cursor_error(cur, &error)
                 ? fail(out, 503, "unavailable", "storage unavailable")
                 : fail(out, 404, "not_found", "no such message (a message just sent may not be stored yet: retry)");
        goto done;
    }
    from = doc_str(doc, "from");
    kind = doc_str(doc, "kind");
    seq = doc_int(doc, "seq");
    sent = doc_int(doc, "ts");
    if (doc_str(doc, "conv") == NULL || strcmp(doc_str(doc, "conv"), conv) != 0 || seq < 1 || from == NULL
        || (is_group && seq <= since && !everyone))
    {
        status = fail(out, 404, "not_found", "no such message in this conversation");
        goto done;
    }
    if (kind && strcmp(kind, "group") == 0) {
        status = fail(out, 400, "bad_request", "a membership event cannot be deleted");
        goto done;
    }
    if (everyone && strcmp(from, user) != 0) {
        status = fail(out, 403, "forbidden", "only the sender may delete a message for everyone (for=me hides it)");
        goto done;
    }
    /* done already: answered again, not queued again (the first entry is
     * in the queue for every role) */
    if (everyone ? bson_has_field(doc, "deleted") : doc_has(doc, "hidden", user)) {
        status = 200;
        goto answer;
    }
    if (everyone && now - sent > (int64_t) cf->delete_window_s * 1000) {
        char msg[160];
        snprintf(msg, sizeof(msg), "a message can be deleted for everyone only within %d s of sending "
                 "(for=me still hides it)", cf->delete_window_s);
        status = fail(out, 403, "forbidden", msg);
        goto done;
    }

    /* the deletion event: ids and conversations are [A-Za-z0-9._:-], no
     * escaping needed; it starts with its type and ends with its ts
     * (lua/tombstone.lua relies on both) */
    snprintf(ev, sizeof(ev), "{\"type\":\"deleted\",\"for\":\"%s\",\"id\":\"%s\",\"conv\":\"%s\",\"seq\":%" PRId64
             ",\"by\":\"%s\",\"sent\":%" PRId64 ",\"ts\":%" PRId64 "}", what, id, conv, seq, user, sent, now);
    del_entry(&v, conv, user, device, is_group, a, b, what);
    v.seq = seq;
    v.ev.p = ev; v.ev.len = strlen(ev);
    if (chat_entry_check(&v, NULL, NULL) != NULL || enqueue(cf, &v, conv) != 0) {
        status = fail(out, 503, "unavailable", "the deletion could not be queued; nothing was done: retry");
        goto done;
    }
    status = 200;
answer:
    *out = json_pack("{s:s, s:s, s:I, s:s}", "id", id, "conv", conv, "seq", (json_int_t) seq, "for", what);
done:
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    mongoc_collection_destroy(coll);
    return status;
}


/* DELETE /chat/conversations/<conv>: the whole conversation for me, up to
 * its last seq (chat:{s<s>}:seq, where seqs are assigned). */
int
cw_clear_request(const cw_config_t *cf, const char *method, const char *path, const char *user,
                 const char *device, json_t **out)
{
    const char   *conv = path + strlen("/chat/conversations/");
    char          a[CW_ID_MAX + 1], b[CW_ID_MAX + 1], ev[512], key[48];
    int           is_group, rc;
    int64_t       upto = 0, since = 0, now = cw_now_ms();
    cw_redis_t   *c;
    redisReply   *r;
    chat_entry_t  v;

    if (strcmp(method, "DELETE") != 0) return fail(out, 405, "bad_request", "only DELETE is allowed here");
    if ((rc = cw_rest_budget(user, "deletes", cf->delete_rate, "too many deletions", out)) != 0) return rc;
    if (strlen(conv) > CW_CONV_MAX || cw_parse_conv(conv, a, b, &is_group) != 0)
        return fail(out, 400, "bad_request", "not a conversation id");
    if (is_group) {
        rc = cw_group_member(a, user, &since);
        if (rc < 0) return fail(out, 503, "unavailable", "redis unavailable");
        if (rc == 0) return fail(out, 403, "forbidden", "not a member of this group");
    } else if (strcmp(user, a) != 0 && strcmp(user, b) != 0) {
        return fail(out, 403, "forbidden", "not a participant of this conversation");
    }
    if ((c = cw_rest_redis()) == NULL) return fail(out, 503, "unavailable", "redis unavailable");
    snprintf(key, sizeof(key), "chat:{s%u}:seq", chat_shard(conv, strlen(conv), (unsigned) cf->shards));
    r = cw_redis_command(c, "HGET %s %s", key, conv);
    if (r == NULL) {
        cw_rest_redis_failed();
        return fail(out, 503, "unavailable", "redis unavailable");
    }
    if (r->type == REDIS_REPLY_STRING) upto = strtoll(r->str, NULL, 10);
    freeReplyObject(r);
    if (upto < 1) return fail(out, 404, "not_found", "this conversation has no messages");
    snprintf(ev, sizeof(ev), "{\"type\":\"deleted\",\"for\":\"me\",\"conv\":\"%s\",\"upto\":%" PRId64
             ",\"by\":\"%s\",\"ts\":%" PRId64 "}", conv, upto, user, now);
    del_entry(&v, conv, user, device, is_group, a, b, "clear");
    v.seq = upto;
    v.ev.p = ev; v.ev.len = strlen(ev);
    if (chat_entry_check(&v, NULL, NULL) != NULL || enqueue(cf, &v, conv) != 0)
        return fail(out, 503, "unavailable", "the deletion could not be queued; nothing was done: retry");
    *out = json_pack("{s:s, s:I, s:s}", "conv", conv, "upto", (json_int_t) upto, "for", "me");
    return 200;
}


/* ---- fanout -------------------------------------------------------------------- */

int
cw_tombstone_append(cw_redis_t *c, const cw_entry_t *e, const char *user)
{
    json_t     *ev = json_loadb(e->ev, e->ev_len, 0, NULL), *id, *sent;
    char        key[CW_ID_MAX + 24], sent_s[24];
    const char *argv[8];
    size_t      lens[8];

    id = json_object_get(ev, "id");
    sent = json_object_get(ev, "sent");
    if (!json_is_string(id) || !json_is_integer(sent)) {
        json_decref(ev);
        return 0;                   /* nothing to find: the event is still appended */
    }
    snprintf(key, sizeof(key), "chat:{u:%s}:inbox", user);
    snprintf(sent_s, sizeof(sent_s), "%" PRId64, (int64_t) json_integer_value(sent));
    argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_TOMBSTONE); argv[2] = "1"; argv[3] = key;
    argv[4] = json_string_value(id); argv[5] = e->ev; argv[6] = sent_s; argv[7] = TOMBSTONE_SLACK_MS;
    for (int i = 0; i < 8; i++) lens[i] = strlen(argv[i]);
    lens[5] = e->ev_len;
    cw_redis_append_argv(c, 8, argv, lens);
    json_decref(ev);
    return 1;
}


/* ---- persist ------------------------------------------------------------------- */

static int
update_one(mongoc_collection_t *coll, bson_t *sel, bson_t *upd, int upsert, const char *what)
{
    bson_t                  opts = BSON_INITIALIZER;
    mongoc_write_concern_t *wc = mongoc_write_concern_new();
    bson_error_t            error;
    int                     rc = 0;

    mongoc_write_concern_set_wmajority(wc, 10000);
    mongoc_write_concern_append(wc, &opts);
    if (upsert) BSON_APPEND_BOOL(&opts, "upsert", true);
    if (!mongoc_collection_update_one(coll, sel, upd, &opts, NULL, &error)) {
        cw_warn("persist: %s: %s", what, error.message);
        rc = -1;
    }
    mongoc_write_concern_destroy(wc);
    bson_destroy(&opts);
    bson_destroy(sel);
    bson_destroy(upd);
    return rc;
}

/* The body of `last` goes too when `last` is the deleted message (read,
 * then write by _id alone: FerretDB finds a document by _id only for
 * exactly that filter; persist is the only writer of `last`). */
int
cw_strip_last(mongoc_collection_t *coll, const char *docid, const char *id)
{
    bson_t          *filter = BCON_NEW("_id", BCON_UTF8(docid));
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, filter, NULL, NULL);
    const bson_t    *doc;
    bson_error_t     error;
    bson_iter_t      it, f;
    int              rc = 0, hit = 0;

    if (mongoc_cursor_next(cur, &doc)) {
        hit = bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, "last.id", &f) && BSON_ITER_HOLDS_UTF8(&f)
              && strcmp(bson_iter_utf8(&f, NULL), id) == 0;
    } else if (mongoc_cursor_error(cur, &error)) {
        cw_warn("persist: read %s: %s", docid, error.message);
        rc = -1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    if (hit) {
        rc = update_one(coll, BCON_NEW("_id", BCON_UTF8(docid)),
                        BCON_NEW("$unset", "{", "last.body", BCON_UTF8(""), "last.media", BCON_UTF8(""), "}",
                                 "$set", "{", "last.deleted", BCON_BOOL(true), "}"),
                        0, "strip the last message");
    }
    return rc;
}

/* Delete for me of the newest message of a direct conversation: the
 * user's own conversations document (docid) shows the newest earlier
 * message the user has not hidden as its `last` (the peer's is not
 * touched); with none, the deleted one without its body. */
static int
hide_last(mongoc_collection_t *conversations, mongoc_collection_t *messages, const char *docid,
          const char *conv, const char *id, const char *user)
{
    bson_t          *filter = BCON_NEW("_id", BCON_UTF8(docid)), *opts, last;
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(conversations, filter, NULL, NULL);
    const bson_t    *doc;
    bson_error_t     error;
    bson_iter_t      it, f;
    int64_t          seq = 0;
    int              rc = 0, hit = 0, found = 0;

    if (mongoc_cursor_next(cur, &doc)) {
        hit = bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, "last.id", &f) && BSON_ITER_HOLDS_UTF8(&f)
              && strcmp(bson_iter_utf8(&f, NULL), id) == 0;
        if (hit && bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, "last.seq", &f)
            && BSON_ITER_HOLDS_NUMBER(&f))
            seq = bson_iter_as_int64(&f);
    } else if (mongoc_cursor_error(cur, &error)) {
        cw_warn("persist: read %s: %s", docid, error.message);
        rc = -1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    if (!hit || rc != 0) return rc;

    /* the newest earlier message not hidden for the user, as persist
     * writes `last` (seq first: the $max of later messages still wins) */
    filter = BCON_NEW("conv", BCON_UTF8(conv), "seq", "{", "$lt", BCON_INT64(seq), "}",
                      "hidden", "{", "$ne", BCON_UTF8(user), "}");
    opts = BCON_NEW("sort", "{", "seq", BCON_INT32(-1), "}", "limit", BCON_INT64(1));
    cur = mongoc_collection_find_with_opts(messages, filter, opts, NULL);
    bson_init(&last);
    if (mongoc_cursor_next(cur, &doc)) {
        static const char *keep[] = { "conv", "from", "to", "body", "kind", "media", "ts", "deleted" };
        BSON_APPEND_INT64(&last, "seq", bson_iter_init_find(&it, doc, "seq") && BSON_ITER_HOLDS_NUMBER(&it)
                                         ? bson_iter_as_int64(&it) : 0);
        if (bson_iter_init_find(&it, doc, "_id") && BSON_ITER_HOLDS_UTF8(&it))
            BSON_APPEND_UTF8(&last, "id", bson_iter_utf8(&it, NULL));
        for (size_t k = 0; k < sizeof(keep) / sizeof(keep[0]); k++)
            if (bson_iter_init_find(&it, doc, keep[k])) bson_append_iter(&last, keep[k], -1, &it);
        found = 1;
    } else if (mongoc_cursor_error(cur, &error)) {
        cw_warn("persist: earlier messages of %s: %s", conv, error.message);
        rc = -1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    bson_destroy(opts);
    if (rc == 0 && found)
        rc = update_one(conversations, BCON_NEW("_id", BCON_UTF8(docid)),
                        BCON_NEW("$set", "{", "last", BCON_DOCUMENT(&last), "}"), 0, "the last message for me");
    else if (rc == 0)
        rc = cw_strip_last(conversations, docid, id);
    bson_destroy(&last);
    return rc;
}

int
cw_persist_deletions(mongoc_collection_t *messages, mongoc_collection_t *conversations,
                     mongoc_collection_t *groups, const cw_batch_t *b)
{
    for (int i = 0; i < b->n; i++) {
        const cw_entry_t *e = &b->e[i];
        json_t           *ev, *id, *ts;
        const char       *mid;
        char              docid[CW_ID_MAX + CW_CONV_MAX + 2];
        int               rc = 0;

        if (!e->valid || e->dead || e->type != CW_T_DEL) continue;
        if (strcmp(e->event, "clear") == 0) {
            /* the user's own conversations document: history and the list
             * show nothing up to cleared_seq to that user */
            snprintf(docid, sizeof(docid), "%s|%s", e->from, e->conv);
            if (update_one(conversations, BCON_NEW("_id", BCON_UTF8(docid)),
                           BCON_NEW("$max", "{", "cleared_seq", BCON_INT64(e->seq), "}",
                                    "$setOnInsert", "{", "user", BCON_UTF8(e->from), "conv", BCON_UTF8(e->conv),
                                    "last_seq", BCON_INT64(0), "read_seq", BCON_INT64(0),
                                    "delivered_seq", BCON_INT64(0), "}"),
                           1, "clear a conversation") != 0)
                return -1;
            continue;
        }
        ev = json_loadb(e->ev, e->ev_len, 0, NULL);
        id = json_object_get(ev, "id");
        ts = json_object_get(ev, "ts");
        if (!json_is_string(id)) {          /* the rest role writes one: nothing to apply */
            json_decref(ev);
            continue;
        }
        mid = json_string_value(id);
        if (strcmp(e->event, "me") == 0) {
            rc = update_one(messages, BCON_NEW("_id", BCON_UTF8(mid)),
                            BCON_NEW("$addToSet", "{", "hidden", BCON_UTF8(e->from), "}"), 0, "hide a message");
            /* my conversation list no longer shows it either (a group's
             * `last` is one for every member: it stays, see PROTOCOL 19) */
            if (rc == 0 && !e->is_group) {
                snprintf(docid, sizeof(docid), "%s|%s", e->from, e->conv);
                rc = hide_last(conversations, messages, docid, e->conv, mid, e->from);
            }
        } else {
            rc = update_one(messages, BCON_NEW("_id", BCON_UTF8(mid)),
                            BCON_NEW("$unset", "{", "body", BCON_UTF8(""), "media", BCON_UTF8(""), "}",
                                     "$set", "{", "deleted", BCON_BOOL(true), "deleted_at",
                                     BCON_INT64(json_is_integer(ts) ? json_integer_value(ts) : cw_now_ms()), "}"),
                            0, "delete a message");
            if (rc == 0 && e->is_group) rc = cw_strip_last(groups, e->a, mid);
            for (int k = 0; rc == 0 && !e->is_group && k < (strcmp(e->a, e->b) == 0 ? 1 : 2); k++) {
                snprintf(docid, sizeof(docid), "%s|%s", k ? e->b : e->a, e->conv);
                rc = cw_strip_last(conversations, docid, mid);
            }
        }
        json_decref(ev);
        if (rc != 0) return -1;
    }
    return 0;
}
