/*
 * User settings in the rest role (docs/PROTOCOL.md, "Push notifications"):
 *
 *   GET /chat/settings                        the whole document
 *   PUT /chat/settings                        merge the given fields, answer the document
 *   PUT /chat/settings/mute/<conv>            {"until": ms | null}  (null or absent: forever)
 *   DELETE /chat/settings/mute/<conv>         unmute
 *   PUT/DELETE /chat/settings/notify/g:<G>    opt in to (out of) notifications of a
 *                                             group above group_push_limit (pull mode)
 *
 * MongoDB's `settings` collection ({_id: user, last_seen, preview, tz,
 * quiet, mute: [{conv, until}], ts}) is the system of record; Redis holds
 * what the module and the push role read:
 *   chat:{u:U}:set   hash: last_seen (everyone|nobody), preview (0|1),
 *                    tz (IANA name), quiet ("<from min>-<to min>", absent: none)
 *   chat:{u:U}:mute  hash: conv -> until (ms; 0 = forever)
 *   chat:{u:U}:notify hash: conv -> 1 (large groups the user opted in to)
 * A write goes to MongoDB first (majority), then replaces both Redis keys
 * in one MULTI (one hash tag). GET answers from MongoDB and rewrites the
 * Redis copy when Redis lost it.
 */
#include "chat_worker.h"

#include <ctype.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MUTE_MAX   1000            /* muted conversations per user */
#define TZ_MAX     64

typedef struct {
    char    conv[CW_CONV_MAX + 1];
    int64_t until;                 /* ms; 0 = forever */
    int     notify;                /* an opt-in (notify), not a mute */
} st_mute_t;

typedef struct {
    int        nobody;             /* last_seen: nobody */
    int        preview;
    char       tz[TZ_MAX];
    int        quiet_from, quiet_to;   /* minutes after local midnight; -1: none */
    char       history[16];        /* keep, days:N or device (history_policy_valid) */
    st_mute_t *mute;
    int        nmute;
} st_doc_t;

static const cw_config_t *st_cf;
static cw_redis_t      *st_redis;
static int64_t            st_redis_used;

void
cw_settings_init(const cw_config_t *cf)
{
    st_cf = cf;
}

/* A Redis connection for the rest role's push and settings endpoints,
 * checked with a PING when idle for a second (a restarted Redis). */
cw_redis_t *
cw_rest_redis(void)
{
    char    err[256];
    int64_t now = cw_mono_ms();

    if (st_redis && now - st_redis_used > 1000) {
        redisReply *r = cw_redis_command(st_redis, "PING");
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            cw_redis_free(st_redis);
            st_redis = NULL;
        }
        if (r) freeReplyObject(r);
    }
    if (st_redis == NULL && st_cf) {
        st_redis = cw_redis_connect(st_cf, 3000, err, sizeof(err));
        if (st_redis == NULL) cw_warn("rest: redis: %s", err);
    }
    st_redis_used = now;
    return st_redis;
}

void
cw_rest_redis_failed(void)
{
    if (st_redis) {
        cw_warn("rest: redis: %s", cw_redis_errstr(st_redis));
        cw_redis_free(st_redis);
        st_redis = NULL;
    }
}

void
cw_settings_close(void)
{
    if (st_redis) cw_redis_free(st_redis);
    st_redis = NULL;
}

static int
fail(json_t **out, int status, const char *code, const char *message)
{
    *out = json_pack("{s:s, s:s, s:s}", "type", "error", "code", code, "message", message);
    return status;
}

static void
doc_defaults(st_doc_t *d)
{
    memset(d, 0, sizeof(*d));
    strcpy(d->tz, "UTC");
    strcpy(d->history, "keep");
    d->quiet_from = d->quiet_to = -1;
}

/* The history policy (PROTOCOL "Retention and deletion"): "keep",
 * "device", or "days:N" with N from 1 to 3650, written without leading
 * zeros so that the value is one spelling per policy. */
static int
history_policy_valid(const char *v)
{
    if (strcmp(v, "keep") == 0 || strcmp(v, "device") == 0) return 1;
    if (strncmp(v, "days:", 5) != 0 || v[5] < '1' || v[5] > '9' || strlen(v) > 9) return 0;
    for (const char *p = v + 5; *p; p++) if (*p < '0' || *p > '9') return 0;
    return atoi(v + 5) <= 3650;
}

static void
doc_free(st_doc_t *d)
{
    free(d->mute);
    d->mute = NULL;
    d->nmute = 0;
}

/* An IANA time zone name this machine knows (/usr/share/zoneinfo, a TZif
 * file), or UTC. */
int
cw_tz_valid(const char *tz)
{
    size_t      len = strlen(tz);
    char        path[TZ_MAX + 32], magic[4];
    struct stat sb;
    FILE       *f;
    int         ok;

    if (strcmp(tz, "UTC") == 0) return 1;
    if (len == 0 || len >= TZ_MAX || tz[0] == '/' || tz[0] == '.' || strstr(tz, "..")) return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char) tz[i];
        if (!isalnum(c) && c != '/' && c != '_' && c != '-' && c != '+') return 0;
    }
    snprintf(path, sizeof(path), "/usr/share/zoneinfo/%s", tz);
    if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) return 0;
    f = fopen(path, "rb");
    if (f == NULL) return 0;
    ok = fread(magic, 1, 4, f) == 4 && memcmp(magic, "TZif", 4) == 0;
    fclose(f);
    return ok;
}

static void
fmt_hhmm(char out[8], int m)
{
    m = m < 0 ? 0 : m % 1440;
    snprintf(out, 8, "%02u:%02u", (unsigned) (m / 60) % 24u, (unsigned) (m % 60) % 60u);
}

/* "HH:MM" -> minutes after midnight, -1 if malformed */
static int
hhmm(const char *s)
{
    if (strlen(s) != 5 || !isdigit((unsigned char) s[0]) || !isdigit((unsigned char) s[1]) || s[2] != ':'
        || !isdigit((unsigned char) s[3]) || !isdigit((unsigned char) s[4]))
        return -1;
    int h = (s[0] - '0') * 10 + (s[1] - '0'), m = (s[3] - '0') * 10 + (s[4] - '0');
    if (h > 23 || m > 59) return -1;
    return h * 60 + m;
}

static json_t *
doc_json(const st_doc_t *d, int64_t now)
{
    json_t *mute = json_object(), *quiet = json_null(), *notify = json_array();
    char    f[8], t[8];

    for (int i = 0; i < d->nmute; i++) {
        if (d->mute[i].notify) {
            json_array_append_new(notify, json_string(d->mute[i].conv));
            continue;
        }
        if (d->mute[i].until && d->mute[i].until <= now) continue;      /* expired */
        json_object_set_new(mute, d->mute[i].conv,
                            d->mute[i].until ? json_integer(d->mute[i].until) : json_null());
    }
    if (d->quiet_from >= 0) {
        fmt_hhmm(f, d->quiet_from);
        fmt_hhmm(t, d->quiet_to);
        quiet = json_pack("{s:s, s:s}", "from", f, "to", t);
    }
    return json_pack("{s:s, s:b, s:s, s:o, s:o, s:o, s:s}", "last_seen", d->nobody ? "nobody" : "everyone",
                     "preview", d->preview, "tz", d->tz, "quiet", quiet, "mute", mute, "notify", notify,
                     "history", d->history);
}


/* ---- MongoDB --------------------------------------------------------------- */

static int
doc_load(mongoc_client_t *client, const char *db, const char *user, st_doc_t *d, int *found)
{
    mongoc_collection_t *coll = mongoc_client_get_collection(client, db, "settings");
    bson_t              *filter = BCON_NEW("_id", BCON_UTF8(user));
    mongoc_cursor_t     *cur = mongoc_collection_find_with_opts(coll, filter, NULL, NULL);
    const bson_t        *doc;
    bson_error_t         error;
    int                  rc = 0;

    doc_defaults(d);
    *found = 0;
    if (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it, sub, e;
        *found = 1;
        if (bson_iter_init_find(&it, doc, "last_seen") && BSON_ITER_HOLDS_UTF8(&it))
            d->nobody = strcmp(bson_iter_utf8(&it, NULL), "nobody") == 0;
        if (bson_iter_init_find(&it, doc, "preview")) d->preview = bson_iter_as_bool(&it);
        if (bson_iter_init_find(&it, doc, "history") && BSON_ITER_HOLDS_UTF8(&it)
            && history_policy_valid(bson_iter_utf8(&it, NULL)))
            snprintf(d->history, sizeof(d->history), "%s", bson_iter_utf8(&it, NULL));
        if (bson_iter_init_find(&it, doc, "tz") && BSON_ITER_HOLDS_UTF8(&it))
            snprintf(d->tz, sizeof(d->tz), "%s", bson_iter_utf8(&it, NULL));
        if (bson_iter_init_find(&it, doc, "quiet") && BSON_ITER_HOLDS_DOCUMENT(&it) && bson_iter_recurse(&it, &sub)) {
            int f = -1, t = -1;
            while (bson_iter_next(&sub)) {
                if (!BSON_ITER_HOLDS_UTF8(&sub)) continue;
                if (strcmp(bson_iter_key(&sub), "from") == 0) f = hhmm(bson_iter_utf8(&sub, NULL));
                else if (strcmp(bson_iter_key(&sub), "to") == 0) t = hhmm(bson_iter_utf8(&sub, NULL));
            }
            if (f >= 0 && t >= 0) { d->quiet_from = f; d->quiet_to = t; }
        }
        if (bson_iter_init_find(&it, doc, "mute") && BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &sub)) {
            d->mute = calloc(MUTE_MAX, sizeof(st_mute_t));
            while (d->mute && d->nmute < MUTE_MAX && bson_iter_next(&sub)) {
                const char *conv = NULL;
                int64_t     until = 0;
                if (!BSON_ITER_HOLDS_DOCUMENT(&sub) || !bson_iter_recurse(&sub, &e)) continue;
                while (bson_iter_next(&e)) {
                    if (strcmp(bson_iter_key(&e), "conv") == 0 && BSON_ITER_HOLDS_UTF8(&e)) conv = bson_iter_utf8(&e, NULL);
                    else if (strcmp(bson_iter_key(&e), "until") == 0 && BSON_ITER_HOLDS_NUMBER(&e)) until = bson_iter_as_int64(&e);
                }
                if (conv == NULL || strlen(conv) > CW_CONV_MAX) continue;
                snprintf(d->mute[d->nmute].conv, sizeof(d->mute[0].conv), "%s", conv);
                d->mute[d->nmute].until = until;
                d->nmute++;
            }
        }
        if (bson_iter_init_find(&it, doc, "notify") && BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &sub)) {
            if (d->mute == NULL) d->mute = calloc(MUTE_MAX, sizeof(st_mute_t));
            while (d->mute && d->nmute < MUTE_MAX && bson_iter_next(&sub)) {
                if (!BSON_ITER_HOLDS_UTF8(&sub) || strlen(bson_iter_utf8(&sub, NULL)) > CW_CONV_MAX) continue;
                snprintf(d->mute[d->nmute].conv, sizeof(d->mute[0].conv), "%s", bson_iter_utf8(&sub, NULL));
                d->mute[d->nmute].until = 0;
                d->mute[d->nmute].notify = 1;
                d->nmute++;
            }
        }
    }
    if (mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: settings of %s: %s", user, error.message);
        rc = -1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    mongoc_collection_destroy(coll);
    return rc;
}

static int
doc_store(mongoc_client_t *client, const char *db, const char *user, const st_doc_t *d)
{
    mongoc_collection_t *coll = mongoc_client_get_collection(client, db, "settings");
    bson_t              *filter = BCON_NEW("_id", BCON_UTF8(user));
    bson_t               doc = BSON_INITIALIZER, q, arr, e;
    bson_t              *opts = BCON_NEW("upsert", BCON_BOOL(true));
    mongoc_write_concern_t *wc = mongoc_write_concern_new();
    bson_error_t         error;
    char                 f[8], t[8], key[16];
    int                  rc = 0;

    mongoc_write_concern_set_w(wc, MONGOC_WRITE_CONCERN_W_MAJORITY);
    mongoc_write_concern_append(wc, opts);
    BSON_APPEND_UTF8(&doc, "_id", user);
    BSON_APPEND_UTF8(&doc, "last_seen", d->nobody ? "nobody" : "everyone");
    BSON_APPEND_BOOL(&doc, "preview", d->preview != 0);
    BSON_APPEND_UTF8(&doc, "tz", d->tz);
    BSON_APPEND_UTF8(&doc, "history", d->history);
    if (d->quiet_from >= 0) {
        fmt_hhmm(f, d->quiet_from);
        fmt_hhmm(t, d->quiet_to);
        BSON_APPEND_DOCUMENT_BEGIN(&doc, "quiet", &q);
        BSON_APPEND_UTF8(&q, "from", f);
        BSON_APPEND_UTF8(&q, "to", t);
        bson_append_document_end(&doc, &q);
    } else {
        BSON_APPEND_NULL(&doc, "quiet");
    }
    BSON_APPEND_ARRAY_BEGIN(&doc, "mute", &arr);
    for (int i = 0, k = 0; i < d->nmute; i++) {
        if (d->mute[i].notify) continue;
        snprintf(key, sizeof(key), "%d", k++);
        BSON_APPEND_DOCUMENT_BEGIN(&arr, key, &e);
        BSON_APPEND_UTF8(&e, "conv", d->mute[i].conv);
        BSON_APPEND_INT64(&e, "until", d->mute[i].until);
        bson_append_document_end(&arr, &e);
    }
    bson_append_array_end(&doc, &arr);
    BSON_APPEND_ARRAY_BEGIN(&doc, "notify", &arr);
    for (int i = 0, k = 0; i < d->nmute; i++) {
        if (!d->mute[i].notify) continue;
        snprintf(key, sizeof(key), "%d", k++);
        BSON_APPEND_UTF8(&arr, key, d->mute[i].conv);
    }
    bson_append_array_end(&doc, &arr);
    BSON_APPEND_INT64(&doc, "ts", cw_now_ms());
    if (!mongoc_collection_replace_one(coll, filter, &doc, opts, NULL, &error)) {
        cw_warn("rest: store settings of %s: %s", user, error.message);
        rc = -1;
    }
    mongoc_write_concern_destroy(wc);
    bson_destroy(opts);
    bson_destroy(&doc);
    bson_destroy(filter);
    mongoc_collection_destroy(coll);
    return rc;
}


/* ---- Redis ----------------------------------------------------------------- */

/* Replaces chat:{u:U}:set and chat:{u:U}:mute in one MULTI. */
static int
doc_to_redis(const char *user, const st_doc_t *d, int64_t now)
{
    cw_redis_t *c = cw_rest_redis();
    char          kset[CW_ID_MAX + 32], kmute[CW_ID_MAX + 32], knotify[CW_ID_MAX + 32], quiet[32], until[24];
    int           n = 0, failed = 0;

    if (c == NULL) return -1;
    snprintf(kset, sizeof(kset), "chat:{u:%s}:set", user);
    snprintf(kmute, sizeof(kmute), "chat:{u:%s}:mute", user);
    snprintf(knotify, sizeof(knotify), "chat:{u:%s}:notify", user);
    snprintf(quiet, sizeof(quiet), "%d-%d", d->quiet_from, d->quiet_to);
    cw_redis_append(c, "MULTI"); n++;
    cw_redis_append(c, "DEL %s %s %s", kset, kmute, knotify); n++;
    if (d->quiet_from >= 0) {
        cw_redis_append(c, "HSET %s last_seen %s preview %d tz %s history %s quiet %s", kset,
                           d->nobody ? "nobody" : "everyone", d->preview ? 1 : 0, d->tz, d->history, quiet);
    } else {
        cw_redis_append(c, "HSET %s last_seen %s preview %d tz %s history %s", kset,
                           d->nobody ? "nobody" : "everyone", d->preview ? 1 : 0, d->tz, d->history);
    }
    n++;
    for (int i = 0; i < d->nmute; i++) {
        if (d->mute[i].until && d->mute[i].until <= now) continue;
        snprintf(until, sizeof(until), "%" PRId64, d->mute[i].until);
        cw_redis_append(c, "HSET %s %s %s", d->mute[i].notify ? knotify : kmute, d->mute[i].conv,
                           d->mute[i].notify ? "1" : until);
        n++;
    }
    cw_redis_append(c, "EXEC"); n++;
    if (d->nobody) {
        /* watchers who saw this user online learn it no more: from now on
         * the user looks offline and never seen (lua/presence.lua), and the
         * registry scripts announce nothing. After the EXEC: on a cluster
         * it is an SPUBLISH, which a transaction need not carry. */
        if (cw_redis_is_cluster(c))      /* the user's own slot (docs/PIPELINE.md) */
            cw_redis_append(c, "SPUBLISH chat:p:{u:%s} {\"type\":\"presence\",\"user\":\"%s\","
                               "\"online\":false,\"last_seen\":null}", user, user);
        else
            cw_redis_append(c, "PUBLISH chat:p:%s {\"type\":\"presence\",\"user\":\"%s\","
                               "\"online\":false,\"last_seen\":null}", user, user);
    }
    for (int i = 0; i < n + (d->nobody ? 1 : 0); i++) {
        redisReply *r = NULL;
        if (cw_redis_get_reply(c, &r) != REDIS_OK || r == NULL) {
            cw_rest_redis_failed();
            return -1;
        }
        if (r->type == REDIS_REPLY_ERROR || (i == n - 1 && r->type != REDIS_REPLY_ARRAY)) failed = 1;
        freeReplyObject(r);
    }
    return failed ? -1 : 0;
}

/* ---- requests -------------------------------------------------------------- */

/* Applies the fields of a PUT /chat/settings body to d; NULL when valid,
 * else the message of the 400. */
static const char *
apply(st_doc_t *d, json_t *body)
{
    const char *k;
    json_t     *v;

    json_object_foreach(body, k, v) {
        if (strcmp(k, "last_seen") == 0) {
            if (!json_is_string(v)) return "last_seen must be \"everyone\" or \"nobody\"";
            if (strcmp(json_string_value(v), "everyone") == 0) d->nobody = 0;
            else if (strcmp(json_string_value(v), "nobody") == 0) d->nobody = 1;
            else return "last_seen must be \"everyone\" or \"nobody\"";
        } else if (strcmp(k, "preview") == 0) {
            if (!json_is_boolean(v)) return "preview must be true or false";
            d->preview = json_is_true(v);
        } else if (strcmp(k, "tz") == 0) {
            if (!json_is_string(v) || !cw_tz_valid(json_string_value(v)))
                return "tz must be an IANA time zone name such as \"Europe/Berlin\" (or \"UTC\")";
            snprintf(d->tz, sizeof(d->tz), "%s", json_string_value(v));
        } else if (strcmp(k, "quiet") == 0) {
            json_t *f, *t;
            int     fm, tm;
            if (json_is_null(v)) { d->quiet_from = d->quiet_to = -1; continue; }
            f = json_object_get(v, "from");
            t = json_object_get(v, "to");
            if (!json_is_object(v) || json_object_size(v) != 2 || !json_is_string(f) || !json_is_string(t))
                return "quiet must be null or {\"from\":\"HH:MM\",\"to\":\"HH:MM\"}";
            fm = hhmm(json_string_value(f));
            tm = hhmm(json_string_value(t));
            if (fm < 0 || tm < 0) return "quiet from and to must be times \"HH:MM\" (00:00 to 23:59)";
            if (fm == tm) return "quiet from and to must differ";
            d->quiet_from = fm;
            d->quiet_to = tm;
        } else if (strcmp(k, "history") == 0) {
            if (!json_is_string(v) || !history_policy_valid(json_string_value(v)))
                return "history must be \"keep\", \"device\" or \"days:N\" (N from 1 to 3650)";
            snprintf(d->history, sizeof(d->history), "%s", json_string_value(v));
        } else if (strcmp(k, "mute") == 0) {
            return "mute a conversation with PUT /chat/settings/mute/<conv>";
        } else {
            static char msg[160];
            snprintf(msg, sizeof(msg), "unknown setting \"%.64s\" (last_seen, preview, tz, quiet, history)", k);
            return msg;
        }
    }
    return NULL;
}

/* Writes d to MongoDB then Redis; the status of the answer (200, or 503
 * with *out set). */
static int
save(mongoc_client_t *client, const char *db, const char *user, st_doc_t *d, json_t **out)
{
    int64_t now = cw_now_ms();
    int     j = 0;

    /* expired mutes are dropped on every write */
    for (int i = 0; i < d->nmute; i++) {
        if (d->mute[i].until == 0 || d->mute[i].until > now) d->mute[j++] = d->mute[i];
    }
    d->nmute = j;
    if (doc_store(client, db, user, d) != 0) return fail(out, 503, "unavailable", "storage unavailable");
    if (doc_to_redis(user, d, now) != 0) return fail(out, 503, "unavailable", "redis unavailable");
    *out = doc_json(d, now);
    return 200;
}

int
cw_settings_request(const char *method, const char *path, const char *user, const char *body,
                    size_t body_len, mongoc_client_t *client, const char *db, json_t **out)
{
    st_doc_t     d;
    int          found, status;
    json_error_t jerr;
    json_t      *in = NULL;
    const char  *rest = path + strlen("/chat/settings");

    if (client == NULL) return fail(out, 503, "unavailable", "storage unavailable");
    if (*rest == '\0') {
        if (strcmp(method, "GET") != 0 && strcmp(method, "PUT") != 0)
            return fail(out, 405, "bad_request", "use GET or PUT on /chat/settings");
        if (strcmp(method, "PUT") == 0) {
            in = json_loadb(body, body_len, JSON_REJECT_DUPLICATES, &jerr);
            if (!json_is_object(in)) {
                json_decref(in);
                return fail(out, 400, "bad_request", "the body must be a JSON object of settings");
            }
        }
        if (doc_load(client, db, user, &d, &found) != 0) {
            json_decref(in);
            return fail(out, 503, "unavailable", "storage unavailable");
        }
        if (in == NULL) {
            /* Redis lost its copy (flushed, restarted without data): write it again */
            cw_redis_t *c = found ? cw_rest_redis() : NULL;
            if (c) {
                redisReply *r = cw_redis_command(c, "EXISTS chat:{u:%s}:set", user);
                if (r == NULL) cw_rest_redis_failed();
                else if (r->type == REDIS_REPLY_INTEGER && r->integer == 0) doc_to_redis(user, &d, cw_now_ms());
                if (r) freeReplyObject(r);
            }
            *out = doc_json(&d, cw_now_ms());
            doc_free(&d);
            return 200;
        }
        {
            const char *why = apply(&d, in);
            json_decref(in);
            if (why) {
                doc_free(&d);
                return fail(out, 400, "bad_request", why);
            }
        }
        status = save(client, db, user, &d, out);
        doc_free(&d);
        return status;
    }

    if (strncmp(rest, "/mute/", 6) == 0 || strncmp(rest, "/notify/", 8) == 0) {
        int         notify = rest[1] == 'n';
        const char *conv = rest + (notify ? 8 : 6);
        char        a[CW_ID_MAX + 1], b[CW_ID_MAX + 1];
        int         is_group, i, del = strcmp(method, "DELETE") == 0;
        int64_t     until = 0, now = cw_now_ms();

        if (strlen(conv) > CW_CONV_MAX || cw_parse_conv(conv, a, b, &is_group) != 0)
            return fail(out, 400, "bad_request", "not a conversation id");
        if (!del && strcmp(method, "PUT") != 0)
            return fail(out, 405, "bad_request", "use PUT or DELETE on /chat/settings/mute/<conv> or notify/<conv>");
        if (notify && !is_group)
            return fail(out, 400, "bad_request", "notify opts in to a large group's notifications: g:<group> only");
        if (is_group) {
            int64_t since;
            int     m = cw_group_member(a, user, &since);
            if (m < 0) return fail(out, 503, "unavailable", "redis unavailable");
            if (m == 0) return fail(out, 403, "forbidden", "not a member of this group");
        } else if (strcmp(user, a) != 0 && strcmp(user, b) != 0) {
            return fail(out, 403, "forbidden", "not a participant of this conversation");
        }
        if (!del && !notify && body_len > 0) {
            json_t *u;
            in = json_loadb(body, body_len, JSON_REJECT_DUPLICATES, &jerr);
            if (!json_is_object(in)) {
                json_decref(in);
                return fail(out, 400, "bad_request", "the body must be {\"until\": ms} or {\"until\": null}");
            }
            u = json_object_get(in, "until");
            if (json_object_size(in) > (u ? 1u : 0u)) {
                json_decref(in);
                return fail(out, 400, "bad_request", "only \"until\" may be given");
            }
            if (u && !json_is_null(u)) {
                if (!json_is_integer(u) || json_integer_value(u) <= now
                    || json_integer_value(u) > now + 100LL * 365 * 86400 * 1000) {
                    json_decref(in);
                    return fail(out, 400, "bad_request",
                                "until must be a future time in ms since the epoch, or null (forever)");
                }
                until = json_integer_value(u);
            }
            json_decref(in);
        }
        if (doc_load(client, db, user, &d, &found) != 0)
            return fail(out, 503, "unavailable", "storage unavailable");
        for (i = 0; i < d.nmute && (d.mute[i].notify != notify || strcmp(d.mute[i].conv, conv) != 0); i++) {}
        if (del) {
            if (i < d.nmute) d.mute[i] = d.mute[--d.nmute];
        } else {
            if (i == d.nmute) {
                if (d.mute == NULL) d.mute = calloc(MUTE_MAX, sizeof(st_mute_t));
                if (d.mute == NULL) return fail(out, 503, "unavailable", "out of memory");
                /* expired ones make room first */
                int j = 0;
                for (int k = 0; k < d.nmute; k++) {
                    if (d.mute[k].until == 0 || d.mute[k].until > now) d.mute[j++] = d.mute[k];
                }
                d.nmute = j;
                i = d.nmute;
                if (i >= MUTE_MAX) {
                    doc_free(&d);
                    return fail(out, 409, "too_large", "at most 1000 conversations can be muted or opted in to");
                }
                d.nmute++;
                snprintf(d.mute[i].conv, sizeof(d.mute[i].conv), "%s", conv);
                d.mute[i].notify = notify;
            }
            d.mute[i].until = until;
        }
        status = save(client, db, user, &d, out);
        doc_free(&d);
        return status;
    }
    return fail(out, 404, "not_found", "no such endpoint");
}
