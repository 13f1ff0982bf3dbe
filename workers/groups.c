/*
 * Groups in the rest role (docs/PIPELINE.md, "Groups"): create, read and
 * change membership, group receipts, and the rebuild of the Redis copy of
 * every group from MongoDB (the system of record) at start.
 *
 * Every membership change is one Lua script on the group's shard tag
 * {s<s>} (s = crc32("g:G") mod shards): it checks, numbers each event with
 * HINCRBY chat:{s<s>}:seq g:G 1, updates meta and mem, and enqueues the
 * entry (Redis queue: XADD chat:{s<s>}:in). With the Kafka queue the script
 * also keeps each record in chat:{s<s>}:gq (field "<G>#<seq>") and returns
 * it; it is produced to chat.in (partition s, key g:G, acks=all,
 * idempotence) before the answer, and removed from gq once the broker has
 * it. A record whose produce failed stays in gq and is produced again by a
 * sweep every few seconds, so Redis and the queue never part for good.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define GROUP_NAME_MAX     128         /* characters (code points) */
#define GROUP_KAFKA_WAIT   8000        /* ms: message.timeout.ms + margin */
#define GROUP_SWEEP_MS     5000        /* re-produce pending Kafka records this often */
#define GROUP_SWEEP_AGE    10000       /* ... when they are at least this old (a live
                                          * request gives up after GROUP_KAFKA_WAIT) */
#define GROUP_REBUILD_MS   5000        /* retry a failed rebuild this often */


static const cw_config_t *gr_cf;
static cw_redis_t      *gr_redis;
static int64_t            gr_redis_used;      /* mono ms of the last use */
static rd_kafka_t        *gr_rk;
static int                gr_rebuilt;
static int64_t            gr_next_rebuild, gr_next_sweep;


/* ---- helpers -------------------------------------------------------------- */

static int
shard_of(const char *conv)
{
    return (int) (chat_crc32(conv, strlen(conv)) % (uint32_t) gr_cf->shards);
}

/* chat:{s<s>}:g:<G>:<what> */
static void
gkey(char *buf, size_t len, const char *group, const char *what)
{
    char conv[CW_CONV_MAX + 1];
    snprintf(conv, sizeof(conv), "g:%s", group);
    snprintf(buf, len, "chat:{s%d}:g:%s:%s", shard_of(conv), group, what);
}

static json_t *
error_obj(const char *code, const char *message)
{
    return json_pack("{s:s, s:s, s:s}", "type", "error", "code", code, "message", message);
}

static int
fail(json_t **out, int status, const char *code, const char *message)
{
    *out = error_obj(code, message);
    return status;
}

/*
 * The connection to Redis, (re)connected when needed. A connection idle
 * for a second is checked with a PING first: after a Redis restart the
 * first command on the old connection would fail, and a membership change
 * must not be sent twice to find out.
 */
static cw_redis_t *
rdb(void)
{
    char    err[256];
    int64_t now = cw_mono_ms();

    if (gr_redis && now - gr_redis_used > 1000) {
        redisReply *r = cw_redis_command(gr_redis, "PING");
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            cw_redis_free(gr_redis);
            gr_redis = NULL;
        }
        if (r) freeReplyObject(r);
    }
    if (gr_redis == NULL) {
        gr_redis = cw_redis_connect(gr_cf, 3000, err, sizeof(err));
        if (gr_redis == NULL) cw_warn("rest: redis: %s", err);
    }
    gr_redis_used = now;
    return gr_redis;
}

/* Drops the connection after an I/O error (reply NULL); the next request
 * connects again. */
static void
rdb_failed(const char *what)
{
    if (gr_redis) {
        cw_warn("rest: redis %s: %s", what, cw_redis_errstr(gr_redis));
        cw_redis_free(gr_redis);
        gr_redis = NULL;
    }
}

/* The scripts of this role: lua/group_change.lua, group_rebuild.lua,
 * group_budget.lua, group_adds.lua (the table chat_lua[], shared with the
 * module and the other roles). */
static int
script_load(void)
{
    if (cw_lua_load(gr_redis) == 0) return 0;
    rdb_failed("SCRIPT LOAD");
    return -1;
}

/* EVALSHA of a script; the reply, or NULL when Redis is unreachable. */
static redisReply *
rdb_eval(int script, int nkeys, const char **keys, int nargs, const char **args)
{
    redisReply  *r = NULL;
    const char **argv;
    size_t      *lens;
    char         nk[16];
    int          argc = 3 + nkeys + nargs;

    if (rdb() == NULL) return NULL;
    argv = malloc(sizeof(char *) * (size_t) argc);
    lens = malloc(sizeof(size_t) * (size_t) argc);
    if (argv == NULL || lens == NULL) goto done;
    snprintf(nk, sizeof(nk), "%d", nkeys);
    argv[0] = "EVALSHA"; lens[0] = 7;
    argv[1] = cw_lua_sha(script); lens[1] = 40;
    argv[2] = nk; lens[2] = strlen(nk);
    for (int i = 0; i < nkeys; i++) {
        argv[3 + i] = keys[i];
        lens[3 + i] = strlen(keys[i]);
    }
    for (int i = 0; i < nargs; i++) {
        argv[3 + nkeys + i] = args[i];
        lens[3 + nkeys + i] = strlen(args[i]);
    }
    r = cw_redis_command_argv(gr_redis, argc, argv, lens);
    if (r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
        freeReplyObject(r);
        r = NULL;
        if (script_load() == 0) r = cw_redis_command_argv(gr_redis, argc, argv, lens);
    }
    if (r == NULL && gr_redis) rdb_failed("EVALSHA");
done:
    free(argv);
    free(lens);
    return r;
}

/* 1 to max characters of UTF-8 text (jansson has checked the encoding). */
static int
name_ok(const char *s, size_t len)
{
    size_t chars = 0;
    for (size_t i = 0; i < len; i++) {
        if (((unsigned char) s[i] & 0xc0) != 0x80) chars++;
    }
    return chars >= 1 && chars <= GROUP_NAME_MAX;
}

/* A JSON array of user ids -> its compact JSON text (malloc'd); NULL when
 * v is not such an array. Absent (NULL) is the empty array. */
static char *
id_list(json_t *v)
{
    size_t  i;
    json_t *u;

    if (v == NULL) return strdup("[]");
    if (!json_is_array(v)) return NULL;
    json_array_foreach(v, i, u) {
        if (!json_is_string(u) || !cw_valid_id(json_string_value(u), json_string_length(u), CW_ID_MAX)) {
            return NULL;
        }
    }
    return json_dumps(v, JSON_COMPACT);
}

/* The group object clients see, from the script's state JSON. */
static json_t *
group_obj(const char *group, const char *state)
{
    json_error_t jerr;
    json_t      *st = json_loads(state, 0, &jerr), *out;

    if (st == NULL) return NULL;
    out = json_pack("{s:s, s:O, s:O, s:O}", "group", group, "name", json_object_get(st, "name"),
                    "owner", json_object_get(st, "owner"), "members", json_object_get(st, "members"));
    json_decref(st);
    return out;
}


/* ---- Kafka ----------------------------------------------------------------- */

typedef struct {
    int  done;
    int  err;
} gr_dr_t;

static void
gr_on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    gr_dr_t *st = m->_private;
    (void) rk; (void) opaque;
    if (st == NULL) return;
    st->done = 1;
    st->err = m->err;
    if (m->err) cw_warn("rest: kafka delivery to partition %d failed: %s", (int) m->partition,
                        rd_kafka_err2str(m->err));
}

static void
gr_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void) rk;
    if (level <= 4) cw_warn("kafka %s: %s", fac, buf);
}

static rd_kafka_t *
kafka(void)
{
    char             err[512];
    rd_kafka_conf_t *conf;

    if (gr_rk) return gr_rk;
    conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", gr_cf->kafka_brokers, err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "acks", "all", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "enable.idempotence", "true", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "message.timeout.ms", "6000", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "linger.ms", "0", err, sizeof(err)) != RD_KAFKA_CONF_OK)
    {
        cw_error("rest: kafka producer config: %s", err);
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, gr_on_delivery);
    rd_kafka_conf_set_log_cb(conf, gr_kafka_log);
    gr_rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    if (gr_rk == NULL) cw_error("rest: kafka producer: %s", err);
    return gr_rk;
}

/* One record (a deletion, delete.c) to chat.in partition s, waited for
 * like a membership record; 0 when the broker has it. */
int
cw_rest_produce(int s, const char *key, const char *val, size_t len)
{
    rd_kafka_t *rk = kafka();
    gr_dr_t    *st;
    int64_t     deadline;

    if (rk == NULL || (st = calloc(1, sizeof(*st))) == NULL) return -1;
    if (rd_kafka_producev(rk, RD_KAFKA_V_TOPIC("chat.in"), RD_KAFKA_V_PARTITION(s),
                          RD_KAFKA_V_KEY(key, strlen(key)), RD_KAFKA_V_VALUE((void *) val, len),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(st),
                          RD_KAFKA_V_END) != RD_KAFKA_RESP_ERR_NO_ERROR)
    {
        cw_warn("rest: kafka produce refused: %s", rd_kafka_err2str(rd_kafka_last_error()));
        free(st);
        return -1;
    }
    deadline = cw_mono_ms() + GROUP_KAFKA_WAIT;
    while (!st->done && cw_mono_ms() < deadline) rd_kafka_poll(rk, 50);
    if (!st->done) {
        rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_flush(rk, 2000);
        if (!st->done) {
            cw_error("rest: kafka delivery report missing after purge; leaking its state");
            return -1;
        }
    }
    if (st->err) {
        free(st);
        return -1;
    }
    free(st);
    return 0;
}

/*
 * Produces the records (chat.in, partition s, key g:G) and waits for every
 * delivery report (bounded by message.timeout.ms). Each delivered record
 * is removed from gq. Returns 0 when all were delivered.
 */
static int
produce(int s, const char *conv, redisReply **fields, redisReply **recs, int n)
{
    rd_kafka_t *rk = kafka();
    gr_dr_t    *st;
    int64_t     deadline;
    int         failed = 0, pending = 0;
    char        gq[64];

    if (rk == NULL || n == 0) return rk ? 0 : -1;
    st = calloc((size_t) n, sizeof(*st));
    if (st == NULL) return -1;
    for (int i = 0; i < n; i++) {
        if (rd_kafka_producev(rk, RD_KAFKA_V_TOPIC("chat.in"), RD_KAFKA_V_PARTITION(s),
                              RD_KAFKA_V_KEY(conv, strlen(conv)),
                              RD_KAFKA_V_VALUE(recs[i]->str, recs[i]->len),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                              RD_KAFKA_V_OPAQUE(&st[i]), RD_KAFKA_V_END) != RD_KAFKA_RESP_ERR_NO_ERROR)
        {
            st[i].done = 1;
            st[i].err = 1;
            cw_warn("rest: kafka produce refused: %s", rd_kafka_err2str(rd_kafka_last_error()));
        }
    }
    deadline = cw_mono_ms() + GROUP_KAFKA_WAIT;
    for (;;) {
        pending = 0;
        for (int i = 0; i < n; i++) pending += !st[i].done;
        if (pending == 0 || cw_mono_ms() >= deadline) break;
        rd_kafka_poll(rk, 50);
    }
    if (pending) {
        /* message.timeout.ms is below the deadline, so this is rare: purge
         * what is left so that its reports (errors) are served now, not
         * later into freed memory */
        rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_flush(rk, 2000);
        for (int i = 0; i < n; i++) {
            if (!st[i].done) {
                cw_error("rest: kafka delivery report missing after purge; leaking its state");
                st = NULL;                  /* never freed: a late report may still write it */
                return -1;
            }
        }
    }
    if (rd_kafka_fatal_error(rk, NULL, 0) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        /* an idempotent producer can fail for good: start a new one */
        cw_warn("rest: kafka producer failed for good; a new one will be made");
        rd_kafka_destroy(rk);
        gr_rk = NULL;
    }
    snprintf(gq, sizeof(gq), "chat:{s%d}:gq", s);
    for (int i = 0; i < n; i++) {
        if (!st[i].done || st[i].err) {
            failed = 1;
            continue;
        }
        if (rdb()) {
            redisReply *r = cw_redis_command(gr_redis, "HDEL %s %b", gq, fields[i]->str, (size_t) fields[i]->len);
            if (r) freeReplyObject(r);
            else rdb_failed("HDEL");
        }
    }
    free(st);
    return failed ? -1 : 0;
}

/* Kafka: produce again the records of every shard whose first produce
 * failed (or whose process died before it finished). Stops at the first
 * failure, so that a broker outage costs one wait per sweep. */
static void
sweep(void)
{
    int64_t now = cw_now_ms();

    for (int s = 0; s < gr_cf->shards && rdb(); s++) {
        char        gq[64];
        redisReply *r;
        snprintf(gq, sizeof(gq), "chat:{s%d}:gq", s);
        r = cw_redis_command(gr_redis, "HGETALL %s", gq);
        if (r == NULL) { rdb_failed("HGETALL"); return; }
        if (r->type == REDIS_REPLY_ARRAY) {
            for (size_t i = 0; i + 1 < r->elements; i += 2) {
                redisReply *f = r->element[i], *v = r->element[i + 1], rec;
                redisReply *fp[1], *rp[1];
                char       *sp = memchr(v->str, ' ', v->len), conv[CW_CONV_MAX + 1], *hash;
                if (sp == NULL || now - strtoll(v->str, NULL, 10) < GROUP_SWEEP_AGE) continue;
                hash = memchr(f->str, '#', f->len);
                if (hash == NULL || (size_t) (hash - f->str) > CW_ID_MAX) continue;
                snprintf(conv, sizeof(conv), "g:%.*s", (int) (hash - f->str), f->str);
                memset(&rec, 0, sizeof(rec));
                rec.str = sp + 1;
                rec.len = v->len - (size_t) (sp + 1 - v->str);
                fp[0] = f;
                rp[0] = &rec;
                if (produce(s, conv, fp, rp, 1) != 0) {
                    freeReplyObject(r);             /* the broker is still away: next sweep */
                    return;
                }
                cw_info("rest: produced pending group record %s", f->str);
            }
        }
        freeReplyObject(r);
    }
}


/* ---- requests ---------------------------------------------------------------- */

/* Runs the membership script; returns the HTTP status and *out. */
static int
run_script(const char *op, const char *group, const char *user, const char *name,
           const char *add, const char *rem, json_t **out, int *again)
{
    char        conv[CW_CONV_MAX + 1], meta[160], mem[160], seqk[48], qk[48], now[24], max[16], plim[16];
    const char *keys[4], *args[10];
    int         s, kafka_q = strcmp(gr_cf->queue, "kafka") == 0, status;
    redisReply *r;
    const char *code;

    *again = 0;
    snprintf(conv, sizeof(conv), "g:%s", group);
    s = shard_of(conv);
    snprintf(meta, sizeof(meta), "chat:{s%d}:g:%s:meta", s, group);
    snprintf(mem, sizeof(mem), "chat:{s%d}:g:%s:mem", s, group);
    snprintf(seqk, sizeof(seqk), "chat:{s%d}:seq", s);
    snprintf(qk, sizeof(qk), kafka_q ? "chat:{s%d}:gq" : "chat:{s%d}:in", s);
    snprintf(now, sizeof(now), "%" PRId64, cw_now_ms());
    snprintf(max, sizeof(max), "%d", gr_cf->group_max_members);
    snprintf(plim, sizeof(plim), "%d", gr_cf->group_push_limit);
    keys[0] = meta; keys[1] = mem; keys[2] = seqk; keys[3] = qk;
    args[0] = op; args[1] = group; args[2] = user; args[3] = now; args[4] = max; args[5] = plim;
    args[6] = gr_cf->queue; args[7] = name ? name : ""; args[8] = add ? add : "[]"; args[9] = rem ? rem : "[]";

    r = rdb_eval(CHAT_LUA_GROUP_CHANGE, 4, keys, 10, args);
    if (r == NULL) return fail(out, 503, "unavailable", "redis unavailable");
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 || r->element[0]->type != REDIS_REPLY_STRING) {
        cw_warn("rest: group script: %s", r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        freeReplyObject(r);
        return fail(out, 503, "unavailable", "redis unavailable");
    }
    code = r->element[0]->str;
    if (strcmp(code, "ok") != 0 || r->elements < 2) {
        if (strcmp(code, "exists") == 0) { *again = 1; status = fail(out, 503, "unavailable", "no free group id"); }
        else if (strcmp(code, "not_found") == 0) status = fail(out, 404, "not_found", "no such group");
        else if (strcmp(code, "forbidden") == 0) {
            status = fail(out, 403, "forbidden", strcmp(op, "change") == 0
                          ? "only the owner adds members or removes others; members may remove themselves"
                          : "not a member of this group");
        } else if (strcmp(code, "too_large") == 0) {
            status = fail(out, 409, "too_large", "the group would have more members than allowed");
        } else status = fail(out, 503, "unavailable", "unexpected reply");
        freeReplyObject(r);
        return status;
    }
    *out = group_obj(group, r->element[1]->str);
    status = *out ? (strcmp(op, "create") == 0 ? 201 : 200) : 503;
    if (status == 503) *out = error_obj("unavailable", "bad group state");
    if (kafka_q && r->elements > 2) {
        int          n = (int) (r->elements - 2) / 2;
        redisReply **f = malloc(sizeof(*f) * (size_t) n), **v = malloc(sizeof(*v) * (size_t) n);
        int          rc = -1;
        if (f && v) {
            for (int i = 0; i < n; i++) {
                f[i] = r->element[2 + 2 * i];
                v[i] = r->element[3 + 2 * i];
            }
            rc = produce(s, conv, f, v, n);
        }
        free(f);
        free(v);
        if (rc != 0) {
            json_decref(*out);
            status = fail(out, 503, "unavailable",
                          "the change is applied but not queued yet; it will be queued again shortly");
        }
    }
    freeReplyObject(r);
    return status;
}

/* A new group id: the time in base36, then random base36 digits. */
static void
new_group_id(char *out, size_t len)
{
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    char          t[16];
    int           n = 0;
    unsigned char rnd[10];
    uint64_t      ms = (uint64_t) cw_now_ms();
    size_t        o = 0;

    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t) sizeof(rnd)) {
        uint64_t x = (uint64_t) cw_mono_ms() * 6364136223846793005ull + (uint64_t) getpid();
        for (size_t i = 0; i < sizeof(rnd); i++) { rnd[i] = (unsigned char) (x >> 56); x = x * 6364136223846793005ull + 1442695040888963407ull; }
    }
    do { t[n++] = digits[ms % 36]; ms /= 36; } while (ms && n < (int) sizeof(t));
    while (n > 0 && o + 1 < len) out[o++] = t[--n];
    for (size_t i = 0; i < sizeof(rnd) && o + 1 < len; i++) out[o++] = digits[rnd[i] % 36];
    out[o] = '\0';
}

static int adds(const char *actor, const char *ids, int give, json_t **out);

static int
create_group(const char *user, json_t *body, json_t **out)
{
    json_t *name = json_object_get(body, "name");
    char   *add;
    int     status = 503, again = 1;

    if (!json_is_string(name) || !name_ok(json_string_value(name), json_string_length(name))
        || memchr(json_string_value(name), 0, json_string_length(name)))
    {
        return fail(out, 400, "bad_request", "name must be 1 to 128 characters");
    }
    add = id_list(json_object_get(body, "members"));
    if (add == NULL) return fail(out, 400, "bad_request", "members must be an array of user ids");
    if ((status = adds(user, add, 0, out)) != 0) {
        free(add);
        return status;
    }
    for (int i = 0; i < 3 && again; i++) {
        char g[CW_ID_MAX + 1];
        new_group_id(g, sizeof(g));
        if (i > 0) json_decref(*out);
        status = run_script("create", g, user, json_string_value(name), add, NULL, out, &again);
    }
    if (status >= 300) adds(user, add, 1, NULL);          /* nothing was added */
    free(add);
    return status;
}

static int
change_members(const char *user, const char *group, json_t *body, json_t **out)
{
    char *add = id_list(json_object_get(body, "add")), *rem = id_list(json_object_get(body, "remove"));
    int   status, again;

    if (add == NULL || rem == NULL) {
        status = fail(out, 400, "bad_request", "add and remove must be arrays of user ids");
    } else if ((status = adds(user, add, 0, out)) == 0) {
        status = run_script("change", group, user, NULL, add, rem, out, &again);
        if (status >= 300) adds(user, add, 1, NULL);      /* refused: nothing was added */
    }
    free(add);
    free(rem);
    return status;
}

static int
limited(json_t **out, const char *code, const char *message, int64_t retry_ms, const char *who)
{
    *out = json_pack("{s:s, s:s, s:s, s:I}", "type", "error", "code", code, "message", message,
                     "retry_after", (json_int_t) ((retry_ms + 999) / 1000 > 0 ? (retry_ms + 999) / 1000 : 1));
    if (*out && who) json_object_set_new(*out, "user", json_string(who));
    return 429;
}

/* One token of user's budget named bucket (a token bucket in Redis,
 * chat:{u:U}:rl:<bucket>, lua/group_budget.lua; limit: per minute and burst,
 * 0 0 for none): 0, or 429 / 503 in *out. Shared by every rest process. */
int
cw_rest_budget(const char *user, const char *bucket, const int limit[2], const char *what,
               json_t **out)
{
    char        key[CW_ID_MAX + 48], now[24], rate[16], burst[16];
    const char *keys[1] = { key }, *args[3] = { now, rate, burst };
    redisReply *r;
    long long   wait;

    if (limit[0] == 0) return 0;
    snprintf(key, sizeof(key), "chat:{u:%s}:rl:%s", user, bucket);
    snprintf(now, sizeof(now), "%lld", (long long) cw_now_ms());
    snprintf(rate, sizeof(rate), "%d", limit[0]);
    snprintf(burst, sizeof(burst), "%d", limit[1]);
    r = rdb_eval(CHAT_LUA_GROUP_BUDGET, 1, keys, 3, args);
    if (r == NULL || r->type != REDIS_REPLY_INTEGER) {
        if (r) freeReplyObject(r);
        return fail(out, 503, "unavailable", "redis unavailable");
    }
    wait = r->integer;
    freeReplyObject(r);
    if (wait == 0) return 0;
    return limited(out, "rate_limited", what, wait, NULL);
}

static int
take_budget(const char *user, json_t **out)
{
    return cw_rest_budget(user, "groups", gr_cf->group_rate,
                          "too many group creations or membership changes", out);
}

/* Takes (give 0) or gives back (give 1) one add of each user of the JSON
 * array ids other than the actor. On a refusal everything taken is given
 * back and *out says who is full (429). */
static int
adds(const char *actor, const char *ids, int give, json_t **out)
{
    json_error_t jerr;
    json_t      *a = json_loads(ids, 0, &jerr);
    size_t       i, n;
    int64_t      now = cw_now_ms();
    char         hour[24], day[24], mh[16], md[16], key[CW_ID_MAX + 32];
    const char  *keys[1] = { key }, *args[5] = { hour, day, mh, md, give ? "give" : "take" };
    int          status = 0;

    if (gr_cf->group_adds[0] == 0 || a == NULL) { json_decref(a); return 0; }
    snprintf(hour, sizeof(hour), "%lld", (long long) (now / 3600000));
    snprintf(day, sizeof(day), "%lld", (long long) (now / 86400000));
    snprintf(mh, sizeof(mh), "%d", gr_cf->group_adds[0]);
    snprintf(md, sizeof(md), "%d", gr_cf->group_adds[1]);
    n = json_array_size(a);
    for (i = 0; i < n && status == 0; i++) {
        redisReply *r;
        const char *x = json_string_value(json_array_get(a, i));
        if (x == NULL || strcmp(x, actor) == 0) continue;
        snprintf(key, sizeof(key), "chat:{u:%s}:adds", x);
        r = rdb_eval(CHAT_LUA_GROUP_ADDS, 1, keys, 5, args);
        if (r == NULL || r->type != REDIS_REPLY_INTEGER) {
            if (!give) status = fail(out, 503, "unavailable", "redis unavailable");
            else cw_warn("rest: could not give back an add of %s", x);
        } else if (r->integer != 0 && !give) {
            int64_t end = r->integer == 1 ? (now / 3600000 + 1) * 3600000 : (now / 86400000 + 1) * 86400000;
            status = limited(out, "too_many_adds", r->integer == 1
                             ? "this user was added to too many groups in the last hour"
                             : "this user was added to too many groups today", end - now, x);
        }
        if (r) freeReplyObject(r);
    }
    if (status != 0 && !give) {
        /* give back what this request took (entries before i - 1) */
        args[4] = "give";
        for (size_t k = 0; k + 1 < i; k++) {
            redisReply *r;
            const char *x = json_string_value(json_array_get(a, k));
            if (x == NULL || strcmp(x, actor) == 0) continue;
            snprintf(key, sizeof(key), "chat:{u:%s}:adds", x);
            r = rdb_eval(CHAT_LUA_GROUP_ADDS, 1, keys, 5, args);
            if (r) freeReplyObject(r);
        }
    }
    json_decref(a);
    return status;
}

int
cw_groups_request(const char *method, const char *path, const char *user,
                  const char *body, size_t body_len, json_t **out)
{
    const char  *rest = path + strlen("/chat/groups");
    const char  *slash;
    char         group[CW_ID_MAX + 1];
    json_t      *doc = NULL;
    json_error_t jerr;
    int          post = strcmp(method, "POST") == 0, status, again;
    size_t       glen;

    *out = NULL;
    if (*rest == '\0' || strcmp(rest, "/") == 0) {
        if (!post) return fail(out, 405, "bad_request", "use POST to create a group");
    } else {
        rest++;
        slash = strchr(rest, '/');
        glen = slash ? (size_t) (slash - rest) : strlen(rest);
        if (!cw_valid_id(rest, glen, CW_ID_MAX)) return fail(out, 400, "bad_request", "bad group id");
        memcpy(group, rest, glen);
        group[glen] = '\0';
        if (slash == NULL) {
            if (strcmp(method, "GET") != 0) return fail(out, 405, "bad_request", "use GET to read a group");
            return run_script("get", group, user, NULL, NULL, NULL, out, &again);
        }
        if (strcmp(slash, "/members") != 0) return fail(out, 404, "not_found", "no such endpoint");
        if (!post) return fail(out, 405, "bad_request", "use POST to change members");
    }
    doc = json_loadb(body, body_len, 0, &jerr);
    if (doc == NULL || !json_is_object(doc)) {
        json_decref(doc);
        return fail(out, 400, "bad_request", "the body must be a JSON object");
    }
    /* every creation and membership change costs the actor a token */
    if ((status = take_budget(user, out)) != 0) {
        json_decref(doc);
        return status;
    }
    if (*rest == '\0' || strcmp(rest, "/") == 0) status = create_group(user, doc, out);
    else status = change_members(user, group, doc, out);
    json_decref(doc);
    return status;
}


/* ---- membership checks and receipts -------------------------------------------- */

int
cw_group_member(const char *group, const char *user, int64_t *since)
{
    char        mem[160];
    redisReply *r;
    int         rc = 0;

    if (rdb() == NULL) return -1;
    gkey(mem, sizeof(mem), group, "mem");
    r = cw_redis_command(gr_redis, "HGET %s %s", mem, user);
    if (r == NULL) { rdb_failed("HGET"); return -1; }
    if (r->type == REDIS_REPLY_STRING && memchr(r->str, ':', r->len) == NULL) {
        *since = strtoll(r->str, NULL, 10);
        rc = 1;
    } else if (r->type == REDIS_REPLY_ERROR) {
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}


static int
cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *) a, *(const char *const *) b);
}

/* The keys of a JSON object used as a set, as a sorted array. */
static json_t *
sorted_keys(json_t *set)
{
    const char  *k, **ks;
    json_t      *v, *arr = json_array();
    size_t       n = json_object_size(set), i = 0;

    ks = malloc(sizeof(char *) * (n ? n : 1));
    if (ks == NULL || arr == NULL) {
        free(ks);
        json_decref(arr);
        return NULL;
    }
    json_object_foreach(set, k, v) ks[i++] = k;
    qsort(ks, n, sizeof(char *), cmp_str);
    for (i = 0; i < n; i++) json_array_append_new(arr, json_string(ks[i]));
    free(ks);
    return arr;
}

/* Users of an HGETALL reply whose pointer is >= seq, added to the sets. */
static void
users_at(const redisReply *r, int64_t seq, json_t *a, json_t *also)
{
    if (r == NULL || r->type != REDIS_REPLY_ARRAY) return;
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        if (r->element[i]->type != REDIS_REPLY_STRING || r->element[i + 1]->type != REDIS_REPLY_STRING
            || strtoll(r->element[i + 1]->str, NULL, 10) < seq)
        {
            continue;
        }
        json_object_set_new(a, r->element[i]->str, json_true());
        if (also) json_object_set_new(also, r->element[i]->str, json_true());
    }
}

/* Reads the replies of n pipelined commands; 0 when all arrived. */
static int
replies(redisReply **r, int n)
{
    for (int i = 0; i < n; i++) r[i] = NULL;
    for (int i = 0; i < n; i++) {
        if (cw_redis_get_reply(gr_redis, &r[i]) != REDIS_OK || r[i] == NULL) {
            for (int k = 0; k < i; k++) freeReplyObject(r[k]);
            rdb_failed("pipeline");
            return -1;
        }
    }
    return 0;
}

int
cw_receipts(const char *conv, const char *a, const char *b, int is_group, int64_t seq,
            const char *user, json_t **out)
{
    json_t     *dlv = json_object(), *rd = json_object(), *dl, *rl, *ptrs = NULL;
    redisReply *r[3];
    int         n, status = 200;
    char        k1[192], k2[192], k3[192];

    *out = NULL;
    if (dlv == NULL || rd == NULL || rdb() == NULL) {
        json_decref(dlv);
        json_decref(rd);
        return fail(out, 503, "unavailable", "redis unavailable");
    }
    if (is_group) {
        gkey(k1, sizeof(k1), a, "mem");
        gkey(k2, sizeof(k2), a, "dlv");
        gkey(k3, sizeof(k3), a, "read");
        cw_redis_append(gr_redis, "HGET %s %s", k1, user);
        cw_redis_append(gr_redis, "HGETALL %s", k2);
        cw_redis_append(gr_redis, "HGETALL %s", k3);
        n = 3;
    } else {
        const char *peer = strcmp(user, a) == 0 ? b : a;
        snprintf(k2, sizeof(k2), "chat:{u:%s}:dlv", peer);
        snprintf(k3, sizeof(k3), "chat:{u:%s}:read", peer);
        cw_redis_append(gr_redis, "HGET %s %s", k2, conv);
        cw_redis_append(gr_redis, "HGET %s %s", k3, conv);
        n = 2;
        if (replies(r, n) == 0) {
            long long pd = r[0]->type == REDIS_REPLY_STRING ? strtoll(r[0]->str, NULL, 10) : 0;
            long long pr = r[1]->type == REDIS_REPLY_STRING ? strtoll(r[1]->str, NULL, 10) : 0;
            if (pd >= seq) json_object_set_new(dlv, peer, json_true());
            if (pr >= seq) {
                json_object_set_new(dlv, peer, json_true());
                json_object_set_new(rd, peer, json_true());
            }
            /* the pointers themselves: delivered receipts are live only, so
             * a device that was away reads them here (read implies
             * delivered) */
            ptrs = json_pack("{s:{s:I, s:I}}", peer, "delivered", (json_int_t) (pd > pr ? pd : pr),
                             "read", (json_int_t) pr);
            freeReplyObject(r[0]);
            freeReplyObject(r[1]);
        } else {
            status = 503;
        }
        goto answer;
    }
    if (replies(r, n) != 0) {
        status = 503;
        goto answer;
    }
    if (r[0]->type != REDIS_REPLY_STRING || memchr(r[0]->str, ':', r[0]->len) != NULL) {
        status = 403;
    } else {
        users_at(r[1], seq, dlv, NULL);
        users_at(r[2], seq, dlv, rd);                  /* read implies delivered */
    }
    for (int i = 0; i < n; i++) freeReplyObject(r[i]);
answer:
    if (status == 200) {
        dl = sorted_keys(dlv);
        rl = sorted_keys(rd);
        *out = json_pack("{s:s, s:I, s:o*, s:o*}", "conv", conv, "seq", (json_int_t) seq,
                         "delivered", dl, "read", rl);
        if (*out != NULL && ptrs != NULL) {
            json_object_set_new(*out, "pointers", ptrs);
            ptrs = NULL;
        }
        if (*out == NULL) status = fail(out, 503, "unavailable", "out of memory");
    } else if (status == 403) {
        fail(out, 403, "forbidden", "not a member of this group");
    } else {
        fail(out, 503, "unavailable", "redis unavailable");
    }
    json_decref(dlv);
    json_decref(rd);
    json_decref(ptrs);
    return status;
}


/* ---- rebuild from MongoDB ----------------------------------------------------- */

static int64_t
bson_int(const bson_t *doc, const char *k)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, k) && BSON_ITER_HOLDS_NUMBER(&it)) return bson_iter_as_int64(&it);
    return 0;
}

static const char *
bson_str(const bson_t *doc, const char *k)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, k) && BSON_ITER_HOLDS_UTF8(&it)) return bson_iter_utf8(&it, NULL);
    return NULL;
}

/* One group document -> the rebuild script. 1 rebuilt, 0 current, -1 failed. */
static int
rebuild_one(const bson_t *doc)
{
    const char  *g = bson_str(doc, "_id"), *name = bson_str(doc, "name"), *owner = bson_str(doc, "owner");
    int64_t      ver = bson_int(doc, "ver"), last = bson_int(doc, "last_seq"), created = bson_int(doc, "created");
    bson_iter_t  it, arr, sub;
    json_t      *since = json_object();
    const char **args = NULL, *keys[3];
    char         conv[CW_CONV_MAX + 1], meta[160], mem[160], seqk[48], nums[4][24], *vals = NULL;
    int          nargs = 6, n = 0, rc = -1;
    redisReply  *r;

    if (g == NULL || name == NULL || owner == NULL || ver < 1 || !cw_valid_id(g, strlen(g), CW_ID_MAX)
        || since == NULL)
    {
        json_decref(since);
        return 0;                               /* not a group (yet): a message arrived before it */
    }
    if (bson_iter_init_find(&it, doc, "since") && BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &arr)) {
        while (bson_iter_next(&arr)) {
            bson_t         d;
            const uint8_t *data;
            uint32_t       len;
            const char    *u;
            if (!BSON_ITER_HOLDS_DOCUMENT(&arr)) continue;
            bson_iter_document(&arr, &len, &data);
            if (!bson_init_static(&d, data, len) || (u = bson_str(&d, "u")) == NULL) continue;
            json_object_set_new(since, u, json_integer(bson_int(&d, "seq")));
        }
    }
    if (bson_iter_init_find(&it, doc, "members") && BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &sub)) {
        bson_iter_t c = sub;
        while (bson_iter_next(&c)) n++;
    }
    args = malloc(sizeof(char *) * (size_t) (nargs + 2 * n));
    vals = malloc(24 * (size_t) (n ? n : 1));
    if (args == NULL || vals == NULL) goto done;
    snprintf(conv, sizeof(conv), "g:%s", g);
    snprintf(nums[0], sizeof(nums[0]), "%" PRId64, ver);
    snprintf(nums[1], sizeof(nums[1]), "%" PRId64, created);
    snprintf(nums[2], sizeof(nums[2]), "%" PRId64, last > ver ? last : ver);
    args[0] = conv; args[1] = nums[0]; args[2] = name; args[3] = owner; args[4] = nums[1]; args[5] = nums[2];
    n = 0;
    if (bson_iter_init_find(&it, doc, "members") && BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &sub)) {
        while (bson_iter_next(&sub)) {
            const char *u;
            json_t     *s;
            if (!BSON_ITER_HOLDS_UTF8(&sub)) continue;
            u = bson_iter_utf8(&sub, NULL);
            if (!cw_valid_id(u, strlen(u), CW_ID_MAX)) continue;
            s = json_object_get(since, u);
            /* no since recorded: the member sees from the latest change on */
            snprintf(vals + 24 * n, 24, "%" PRId64, json_is_integer(s) ? (int64_t) json_integer_value(s) : ver);
            args[nargs++] = u;
            args[nargs++] = vals + 24 * n;
            n++;
        }
    }
    snprintf(meta, sizeof(meta), "chat:{s%d}:g:%s:meta", shard_of(conv), g);
    snprintf(mem, sizeof(mem), "chat:{s%d}:g:%s:mem", shard_of(conv), g);
    snprintf(seqk, sizeof(seqk), "chat:{s%d}:seq", shard_of(conv));
    keys[0] = meta; keys[1] = mem; keys[2] = seqk;
    r = rdb_eval(CHAT_LUA_GROUP_REBUILD, 3, keys, nargs, args);
    if (r) {
        if (r->type == REDIS_REPLY_INTEGER) rc = (int) r->integer;
        else cw_warn("rest: group rebuild %s: %s", g, r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        freeReplyObject(r);
    }
done:
    free(args);
    free(vals);
    json_decref(since);
    return rc;
}

/* Every group of MongoDB whose Redis copy is missing or older. */
static int
rebuild(mongoc_client_t *client, const char *db)
{
    mongoc_collection_t *coll;
    mongoc_cursor_t     *cur;
    const bson_t        *doc;
    bson_error_t         error;
    bson_t              *filter = BCON_NEW("ver", "{", "$gt", BCON_INT64(0), "}");
    int                  failed = 0, n = 0, done = 0;

    if (rdb() == NULL) {
        bson_destroy(filter);
        return -1;
    }
    coll = mongoc_client_get_collection(client, db, "groups");
    cur = mongoc_collection_find_with_opts(coll, filter, NULL, NULL);
    while (!failed && mongoc_cursor_next(cur, &doc)) {
        int rc = rebuild_one(doc);
        if (rc < 0) failed = 1;
        done += rc > 0;
        n++;
    }
    if (!failed && mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: group rebuild: %s", error.message);
        failed = 1;
    }
    mongoc_cursor_destroy(cur);
    mongoc_collection_destroy(coll);
    bson_destroy(filter);
    if (failed) return -1;
    cw_info("rest: %d groups in MongoDB, %d rebuilt in Redis", n, done);
    return 0;
}


/* ---- life cycle ------------------------------------------------------------------ */

void
cw_groups_init(const cw_config_t *cf)
{
    gr_cf = cf;
    gr_rebuilt = 0;
    gr_next_rebuild = 0;
    gr_next_sweep = cw_mono_ms() + GROUP_SWEEP_MS;
}

void
cw_groups_tick(struct _mongoc_client_t *client, const char *db)
{
    int64_t now = cw_mono_ms();

    if (!gr_rebuilt && now >= gr_next_rebuild) {
        if (client && rebuild(client, db) == 0) gr_rebuilt = 1;
        else gr_next_rebuild = now + GROUP_REBUILD_MS;
    }
    if (strcmp(gr_cf->queue, "kafka") == 0 && now >= gr_next_sweep) {
        sweep();
        gr_next_sweep = cw_mono_ms() + GROUP_SWEEP_MS;
    }
}

void
cw_groups_close(void)
{
    if (gr_rk) {
        rd_kafka_flush(gr_rk, 5000);
        rd_kafka_destroy(gr_rk);
        gr_rk = NULL;
    }
    if (gr_redis) {
        cw_redis_free(gr_redis);
        gr_redis = NULL;
    }
}
