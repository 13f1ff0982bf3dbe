/*
 * Push registrations of devices in the rest role (docs/PROTOCOL.md,
 * "Push notifications"):
 *
 *   PUT    /chat/devices/<device>/push   register (or replace) the device's push target
 *   DELETE /chat/devices/<device>/push   unregister
 *   GET    /chat/devices                 the user's devices and their push state
 *
 * A device registers itself only: <device> must be the token's device
 * (X-Chat-Device, which nginx sets from the token), else 403. MongoDB's
 * `devices` collection ({_id: "<user>|<device>", user, device, provider,
 * ..., ts}) is the system of record; the push role reads the Redis hash
 * chat:{u:U}:push (device -> registration JSON, see cw_push_reg_json).
 * A write goes to MongoDB first, then Redis; GET rewrites what Redis lost.
 */
#include "chat_worker.h"

#include <ctype.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <mongoc/mongoc.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ENDPOINT_MAX   2048
#define FCM_TOKEN_MAX  4096
#define DEVICES_MAX    100      /* listed per user */

static int
fail(json_t **out, int status, const char *code, const char *message)
{
    *out = json_pack("{s:s, s:s, s:s}", "type", "error", "code", code, "message", message);
    return status;
}

/* base64url (RFC 4648 section 5), padding optional; the decoded length or
 * -1 when s is not base64url or decodes to more than max bytes. */
int
cw_b64url_decode(const char *s, size_t len, unsigned char *out, size_t max)
{
    size_t   o = 0;
    uint32_t acc = 0;
    int      bits = 0;

    while (len > 0 && s[len - 1] == '=') len--;
    if (len % 4 == 1) return -1;
    for (size_t i = 0; i < len; i++) {
        int c = (unsigned char) s[i], v;
        if (c >= 'A' && c <= 'Z') v = c - 'A';
        else if (c >= 'a' && c <= 'z') v = c - 'a' + 26;
        else if (c >= '0' && c <= '9') v = c - '0' + 52;
        else if (c == '-') v = 62;
        else if (c == '_') v = 63;
        else return -1;
        acc = (acc << 6) | (uint32_t) v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o >= max) return -1;
            out[o++] = (unsigned char) (acc >> bits);
        }
    }
    return (int) o;
}

/* A point on P-256 in uncompressed form (65 bytes, 0x04 || x || y). */
static int
p256_point_ok(const unsigned char *p, int len)
{
    EC_GROUP *g;
    EC_POINT *pt;
    int       ok;

    if (len != 65 || p[0] != 0x04) return 0;
    g = EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1);
    pt = g ? EC_POINT_new(g) : NULL;
    ok = pt && EC_POINT_oct2point(g, pt, p, 65, NULL) == 1 && EC_POINT_is_on_curve(g, pt, NULL) == 1;
    EC_POINT_free(pt);
    EC_GROUP_free(g);
    return ok;
}

/* https://host[:port]/path, printable ASCII without spaces */
static int
https_url_ok(const char *s, size_t len)
{
    const char *host, *end;

    if (len > ENDPOINT_MAX || len < 9 || strncmp(s, "https://", 8) != 0) return 0;
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char) s[i] <= 0x20 || (unsigned char) s[i] >= 0x7f) return 0;
    }
    host = s + 8;
    end = strpbrk(host, "/?#");
    if (end == NULL) end = s + len;
    if (end == host || memchr(host, '@', (size_t) (end - host))) return 0;
    for (const char *p = host; p < end; p++) {
        if (!isalnum((unsigned char) *p) && *p != '.' && *p != '-' && *p != ':' && *p != '[' && *p != ']') return 0;
    }
    return 1;
}

static int
charset_ok(const char *s, size_t len, const char *extra)
{
    for (size_t i = 0; i < len; i++) {
        if (!isalnum((unsigned char) s[i]) && strchr(extra, s[i]) == NULL) return 0;
    }
    return 1;
}

/* Validates a PUT body; on success *reg is the registration Redis holds
 * (and the push role reads), else the message of the 400. */
static const char *
parse_registration(json_t *in, json_t **reg)
{
    json_t     *prov = json_object_get(in, "provider");
    const char *p, *k;
    json_t     *v;

    *reg = NULL;
    if (!json_is_object(in)) return "the body must be a JSON object";
    if (!json_is_string(prov)) return "provider must be \"webpush\", \"apns\" or \"fcm\"";
    p = json_string_value(prov);
    if (strcmp(p, "webpush") == 0) {
        json_t       *sub = json_object_get(in, "subscription"), *ep, *keys, *dh, *au;
        unsigned char buf[80];
        int           n;

        json_object_foreach(in, k, v) {
            if (strcmp(k, "provider") != 0 && strcmp(k, "subscription") != 0)
                return "webpush takes provider and subscription only";
        }
        if (!json_is_object(sub)) return "subscription must be the browser's PushSubscription JSON object";
        json_object_foreach(sub, k, v) {
            if (strcmp(k, "endpoint") != 0 && strcmp(k, "keys") != 0 && strcmp(k, "expirationTime") != 0)
                return "subscription takes endpoint, expirationTime and keys only";
        }
        ep = json_object_get(sub, "endpoint");
        keys = json_object_get(sub, "keys");
        if (!json_is_string(ep) || !https_url_ok(json_string_value(ep), json_string_length(ep)))
            return "subscription.endpoint must be an https:// URL (at most 2048 characters)";
        v = json_object_get(sub, "expirationTime");
        if (v && !json_is_null(v) && !json_is_integer(v)) return "subscription.expirationTime must be null or ms";
        if (!json_is_object(keys) || json_object_size(keys) != 2) return "subscription.keys must hold p256dh and auth";
        dh = json_object_get(keys, "p256dh");
        au = json_object_get(keys, "auth");
        if (!json_is_string(dh)) return "subscription.keys.p256dh must be a string";
        n = cw_b64url_decode(json_string_value(dh), json_string_length(dh), buf, sizeof(buf));
        if (n < 0 || !p256_point_ok(buf, n))
            return "subscription.keys.p256dh must be base64url of an uncompressed P-256 point (65 bytes)";
        if (!json_is_string(au)) return "subscription.keys.auth must be a string";
        n = cw_b64url_decode(json_string_value(au), json_string_length(au), buf, sizeof(buf));
        if (n != 16) return "subscription.keys.auth must be base64url of 16 bytes";
        *reg = json_pack("{s:s, s:O, s:O, s:O}", "provider", "webpush", "endpoint", ep, "p256dh", dh, "auth", au);
    } else if (strcmp(p, "apns") == 0) {
        json_t     *tok = json_object_get(in, "token"), *topic = json_object_get(in, "topic");
        json_t     *env = json_object_get(in, "env");
        const char *e = "production";
        size_t      tl;

        json_object_foreach(in, k, v) {
            if (strcmp(k, "provider") != 0 && strcmp(k, "token") != 0 && strcmp(k, "topic") != 0
                && strcmp(k, "env") != 0)
                return "apns takes provider, token, topic and env only";
        }
        if (!json_is_string(tok) || (tl = json_string_length(tok)) < 64 || tl > 200 || tl % 2
            || !charset_ok(json_string_value(tok), tl, "") || strspn(json_string_value(tok), "0123456789abcdefABCDEF") != tl)
            return "token must be the APNs device token in hex (64 to 200 hex digits)";
        if (!json_is_string(topic) || json_string_length(topic) < 1 || json_string_length(topic) > 255
            || !charset_ok(json_string_value(topic), json_string_length(topic), ".-_"))
            return "topic must be the app's bundle id (letters, digits, '.', '-', '_'; at most 255)";
        if (env) {
            if (!json_is_string(env) || (strcmp(json_string_value(env), "production") != 0
                                         && strcmp(json_string_value(env), "sandbox") != 0))
                return "env must be \"production\" or \"sandbox\"";
            e = json_string_value(env);
        }
        *reg = json_pack("{s:s, s:O, s:O, s:s}", "provider", "apns", "token", tok, "topic", topic, "env", e);
    } else if (strcmp(p, "fcm") == 0) {
        json_t *tok = json_object_get(in, "token");
        size_t  tl;

        json_object_foreach(in, k, v) {
            if (strcmp(k, "provider") != 0 && strcmp(k, "token") != 0) return "fcm takes provider and token only";
        }
        if (!json_is_string(tok) || (tl = json_string_length(tok)) < 32 || tl > FCM_TOKEN_MAX
            || !charset_ok(json_string_value(tok), tl, "_-:."))
            return "token must be the FCM registration token (32 to 4096 of [A-Za-z0-9_:.-])";
        *reg = json_pack("{s:s, s:O}", "provider", "fcm", "token", tok);
    } else {
        return "provider must be \"webpush\", \"apns\" or \"fcm\"";
    }
    return *reg ? NULL : "out of memory";
}

/* What GET /chat/devices shows of a registration: never the secrets. */
static json_t *
push_state(json_t *reg, int64_t ts)
{
    const char *p = json_string_value(json_object_get(reg, "provider"));
    json_t     *o = json_pack("{s:s, s:I}", "provider", p ? p : "?", "ts", (json_int_t) ts);

    if (o && p && strcmp(p, "apns") == 0) {
        json_object_set(o, "topic", json_object_get(reg, "topic"));
        json_object_set(o, "env", json_object_get(reg, "env"));
    }
    if (o && p && strcmp(p, "webpush") == 0) {
        const char *ep = json_string_value(json_object_get(reg, "endpoint"));
        const char *host = ep ? ep + 8 : "", *end = strpbrk(host, "/?#");
        json_object_set_new(o, "origin", json_stringn(ep ? ep : "", end ? (size_t) (end - (ep ? ep : "")) : strlen(ep ? ep : "")));
    }
    return o;
}

static int
redis_set_reg(const char *user, const char *device, const char *val)
{
    cw_redis_t *c = cw_rest_redis();
    redisReply   *r;
    int           ok;

    if (c == NULL) return -1;
    if (val) r = cw_redis_command(c, "HSET chat:{u:%s}:push %s %s", user, device, val);
    else r = cw_redis_command(c, "HDEL chat:{u:%s}:push %s", user, device);
    if (r == NULL) {
        cw_rest_redis_failed();
        return -1;
    }
    ok = r->type == REDIS_REPLY_INTEGER;
    freeReplyObject(r);
    return ok ? 0 : -1;
}

static int
register_device(const char *user, const char *device, const char *body, size_t body_len,
                mongoc_client_t *client, const char *db, json_t **out)
{
    json_error_t         jerr;
    json_t              *in = json_loadb(body, body_len, JSON_REJECT_DUPLICATES, &jerr), *reg;
    const char          *why = in ? parse_registration(in, &reg) : "the body must be a JSON object";
    char                 id[CW_ID_MAX + CW_DEV_MAX + 2], *val;
    mongoc_collection_t *coll;
    bson_t              *filter, *opts, doc = BSON_INITIALIZER;
    bson_error_t         error;
    mongoc_write_concern_t *wc;
    int64_t              now = cw_now_ms();
    int                  ok;

    json_decref(in);
    if (why) return fail(out, 400, "bad_request", why);
    val = json_dumps(reg, JSON_COMPACT);
    if (val == NULL) {
        json_decref(reg);
        return fail(out, 503, "unavailable", "out of memory");
    }
    snprintf(id, sizeof(id), "%s|%s", user, device);
    coll = mongoc_client_get_collection(client, db, "devices");
    filter = BCON_NEW("_id", BCON_UTF8(id));
    opts = BCON_NEW("upsert", BCON_BOOL(true));
    wc = mongoc_write_concern_new();
    mongoc_write_concern_set_w(wc, MONGOC_WRITE_CONCERN_W_MAJORITY);
    mongoc_write_concern_append(wc, opts);
    BSON_APPEND_UTF8(&doc, "_id", id);
    BSON_APPEND_UTF8(&doc, "user", user);
    BSON_APPEND_UTF8(&doc, "device", device);
    BSON_APPEND_UTF8(&doc, "reg", val);          /* exactly what Redis holds */
    BSON_APPEND_UTF8(&doc, "provider", json_string_value(json_object_get(reg, "provider")));
    BSON_APPEND_INT64(&doc, "ts", now);
    ok = mongoc_collection_replace_one(coll, filter, &doc, opts, NULL, &error);
    if (!ok) cw_warn("rest: store device %s: %s", id, error.message);
    mongoc_write_concern_destroy(wc);
    bson_destroy(&doc);
    bson_destroy(opts);
    bson_destroy(filter);
    mongoc_collection_destroy(coll);
    if (!ok) {
        free(val);
        json_decref(reg);
        return fail(out, 503, "unavailable", "storage unavailable");
    }
    ok = redis_set_reg(user, device, val) == 0;
    free(val);
    if (!ok) {
        json_decref(reg);
        return fail(out, 503, "unavailable", "redis unavailable");
    }
    *out = json_pack("{s:s, s:o}", "device", device, "push", push_state(reg, now));
    json_decref(reg);
    return 200;
}

static int
unregister_device(const char *user, const char *device, mongoc_client_t *client, const char *db, json_t **out)
{
    char                 id[CW_ID_MAX + CW_DEV_MAX + 2];
    mongoc_collection_t *coll = mongoc_client_get_collection(client, db, "devices");
    bson_t              *filter;
    bson_error_t         error;
    int                  ok;

    snprintf(id, sizeof(id), "%s|%s", user, device);
    filter = BCON_NEW("_id", BCON_UTF8(id));
    ok = mongoc_collection_delete_one(coll, filter, NULL, NULL, &error);
    if (!ok) cw_warn("rest: delete device %s: %s", id, error.message);
    bson_destroy(filter);
    mongoc_collection_destroy(coll);
    if (!ok) return fail(out, 503, "unavailable", "storage unavailable");
    if (redis_set_reg(user, device, NULL) != 0) return fail(out, 503, "unavailable", "redis unavailable");
    *out = json_pack("{s:s, s:n}", "device", device, "push");
    return 200;
}

static json_t *
device_row(json_t *devs, const char *device)
{
    json_t *row = json_object_get(devs, device);
    if (row == NULL) {
        row = json_pack("{s:s, s:n, s:b, s:I}", "device", device, "push", "connected", 0, "acked", (json_int_t) 0);
        json_object_set_new(devs, device, row);
    }
    return row;
}

static int
list_devices(const char *user, mongoc_client_t *client, const char *db, json_t **out)
{
    mongoc_collection_t *coll = mongoc_client_get_collection(client, db, "devices");
    bson_t              *filter = BCON_NEW("user", BCON_UTF8(user));
    bson_t              *opts = BCON_NEW("limit", BCON_INT64(DEVICES_MAX));
    mongoc_cursor_t     *cur = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    const bson_t        *doc;
    bson_error_t         error;
    json_t              *devs = json_object(), *list, *mongo_regs = json_object();
    cw_redis_t        *c;
    int                  failed = 0;
    int64_t              now = cw_now_ms();
    const char          *k;
    json_t              *v;

    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t  it;
        const char  *dev = NULL, *reg = NULL;
        int64_t      ts = 0;
        json_error_t jerr;
        json_t      *rj;
        if (bson_iter_init_find(&it, doc, "device") && BSON_ITER_HOLDS_UTF8(&it)) dev = bson_iter_utf8(&it, NULL);
        if (bson_iter_init_find(&it, doc, "reg") && BSON_ITER_HOLDS_UTF8(&it)) reg = bson_iter_utf8(&it, NULL);
        if (bson_iter_init_find(&it, doc, "ts") && BSON_ITER_HOLDS_NUMBER(&it)) ts = bson_iter_as_int64(&it);
        if (dev == NULL || reg == NULL || (rj = json_loads(reg, 0, &jerr)) == NULL) continue;
        json_object_set_new(device_row(devs, dev), "push", push_state(rj, ts));
        json_object_set_new(mongo_regs, dev, json_string(reg));
        json_decref(rj);
    }
    if (mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: devices of %s: %s", user, error.message);
        failed = 1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    bson_destroy(opts);
    mongoc_collection_destroy(coll);
    if (failed) {
        json_decref(devs);
        json_decref(mongo_regs);
        return fail(out, 503, "unavailable", "storage unavailable");
    }
    c = cw_rest_redis();
    if (c) {
        redisReply *r[3] = { NULL, NULL, NULL };
        cw_redis_append(c, "HGETALL chat:{u:%s}:acked", user);
        cw_redis_append(c, "ZRANGE chat:{u:%s}:conns %" PRId64 " +inf BYSCORE", user, now);
        cw_redis_append(c, "HGETALL chat:{u:%s}:push", user);
        for (int i = 0; i < 3; i++) {
            if (cw_redis_get_reply(c, &r[i]) != REDIS_OK || r[i] == NULL) { failed = 1; break; }
        }
        if (!failed) {
            if (r[0]->type == REDIS_REPLY_ARRAY) {
                for (size_t i = 0; i + 1 < r[0]->elements && json_object_size(devs) < DEVICES_MAX; i += 2)
                    json_object_set_new(device_row(devs, r[0]->element[i]->str), "acked",
                                        json_integer(strtoll(r[0]->element[i + 1]->str, NULL, 10)));
            }
            if (r[1]->type == REDIS_REPLY_ARRAY) {
                for (size_t i = 0; i < r[1]->elements; i++) {
                    char *m = r[1]->element[i]->str, *p1 = strchr(m, '|'), *p2 = p1 ? strchr(p1 + 1, '|') : NULL;
                    char  dev[CW_DEV_MAX + 1];
                    if (p2 == NULL || p2 - p1 - 1 > CW_DEV_MAX || json_object_size(devs) >= DEVICES_MAX) continue;
                    memcpy(dev, p1 + 1, (size_t) (p2 - p1 - 1));
                    dev[p2 - p1 - 1] = '\0';
                    json_object_set_new(device_row(devs, dev), "connected", json_true());
                }
            }
            /* Redis lost a registration MongoDB has (flushed, failed write): restore it */
            if (r[2]->type == REDIS_REPLY_ARRAY) {
                json_object_foreach(mongo_regs, k, v) {
                    int have = 0;
                    for (size_t i = 0; i + 1 < r[2]->elements; i += 2) {
                        if (strcmp(r[2]->element[i]->str, k) == 0
                            && strcmp(r[2]->element[i + 1]->str, json_string_value(v)) == 0) have = 1;
                    }
                    if (!have) redis_set_reg(user, k, json_string_value(v));
                }
            }
        }
        for (int i = 0; i < 3; i++) if (r[i]) freeReplyObject(r[i]);
        if (failed) cw_rest_redis_failed();
    }
    json_decref(mongo_regs);
    list = json_array();
    json_object_foreach(devs, k, v) json_array_append(list, v);
    json_decref(devs);
    *out = json_pack("{s:o}", "devices", list);
    return 200;
}

int
cw_devices_request(const char *method, const char *path, const char *user, const char *device,
                   const char *body, size_t body_len, mongoc_client_t *client, const char *db, json_t **out)
{
    const char *rest = path + strlen("/chat/devices");
    char        dev[CW_DEV_MAX + 1];
    const char *slash;
    size_t      dl;

    if (*rest == '\0' || strcmp(rest, "/") == 0) {
        if (strcmp(method, "GET") != 0) return fail(out, 405, "bad_request", "use GET on /chat/devices");
        if (client == NULL) return fail(out, 503, "unavailable", "storage unavailable");
        return list_devices(user, client, db, out);
    }
    slash = strchr(rest + 1, '/');
    if (slash == NULL || strcmp(slash, "/push") != 0) return fail(out, 404, "not_found", "no such endpoint");
    dl = (size_t) (slash - rest - 1);
    if (dl == 0 || dl > CW_DEV_MAX || !cw_valid_id(rest + 1, dl, CW_DEV_MAX))
        return fail(out, 400, "bad_request", "not a device id (1 to 32 of [A-Za-z0-9._-])");
    memcpy(dev, rest + 1, dl);
    dev[dl] = '\0';
    if (device == NULL || strcmp(device, dev) != 0)
        return fail(out, 403, "forbidden", "a device registers only itself: the path must name the token's device");
    if (strcmp(method, "PUT") != 0 && strcmp(method, "DELETE") != 0)
        return fail(out, 405, "bad_request", "use PUT or DELETE on /chat/devices/<device>/push");
    if (client == NULL) return fail(out, 503, "unavailable", "storage unavailable");
    if (strcmp(method, "PUT") == 0) return register_device(user, dev, body, body_len, client, db, out);
    return unregister_device(user, dev, client, db, out);
}
