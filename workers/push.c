/*
 * The push role (docs/PIPELINE.md, "Push"): notifications for devices that
 * did not get a message in time.
 *
 * Consumer group "push" on the queue (Redis: consumer push-0 on every
 * shard; Kafka: group chat-push). For each message entry and each
 * recipient (direct: `to`; group: the members active at its seq but the
 * sender; a pull-mode group: only members who opted in) one script on the
 * recipient's {u:U} keys records the message in chat:{u:U}:pn (per
 * conversation: its unread seqs, the newest sender/body/time) and returns
 * the devices with a push registration; each gets the member
 * "<user>|<device>|<conv>" in the due set chat:{pq<b>}:due (b = crc32(user)
 * mod push_buckets) with score now + push_delay_ms (ZADD LT: a pending one
 * keeps its earlier time, so a conversation collapses into one). The entry
 * is acknowledged after that, so a crash loses nothing.
 *
 * Due entries are leased (score moved to now + push_lease_ms) and checked
 * by one script on the user's keys: registration still there, not read
 * (chat:{u:U}:read), not acked by that device (chat:{u:U}:acked against the
 * cursor in chat:{u:U}:last m:<conv>), not muted; with push_delay_ms 0 (and
 * for pull groups) not connected. The answer also carries the count, the
 * badge (unread over every conversation in pn) and the settings (preview,
 * tz, quiet hours). Then the provider request; the lease is released only
 * when the provider accepted it, refused it for good, or the registration
 * is dead; retries move the score to the retry time. A lease that is never
 * released (a crash) makes the entry due again: at worst one repeat, with
 * the same collapse id.
 */
#include "push.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PUSH_BODY_MAX   180        /* bytes of a preview */
#define PUSH_PN_TTL     (30LL * 86400 * 1000)
#define PUSH_LAT_MAX    60000      /* ms: latency histogram range */
#define PUSH_BACKOFF_MAX 10000

/* The scripts: lua/push_enqueue.lua, push_check.lua, push_lease.lua,
 * push_done.lua, push_dead.lua (the table chat_lua[] every role loads). */

/* ---- state -------------------------------------------------------------- */

static const push_provider_t *providers[PUSH_NPROV] = { &cw_push_webpush, &cw_push_apns, &cw_push_fcm };

typedef struct {
    uint64_t sent, failed, dropped, retried, unconfigured;
    uint32_t *lat;                  /* histogram, 1 ms buckets (cumulative) */
    uint64_t  nlat;
} prov_stats_t;

static struct {
    const cw_config_t *cf;
    cw_redis_t      *c;
    cw_queue_t        *q;
    cw_batch_t         batch;
    mongoc_client_t   *mongo;
    char               db[128];
    int                configured[PUSH_NPROV];
    int64_t            down_until[PUSH_NPROV];   /* wall ms */
    int                fails[PUSH_NPROV];         /* consecutive */
    prov_stats_t       st[PUSH_NPROV];
    uint64_t           enqueued, skipped_acked, skipped_read, skipped_muted, skipped_quiet, skipped_online,
                       skipped_old, later;
    int                jobs;                      /* leased and in our hands */
    int64_t            next_stats, next_log;
    int                bucket_rr;
    char               stats_key[160];
} P;

static int
bucket_of(const char *user)
{
    return (int) (chat_crc32(user, strlen(user)) % (uint32_t) P.cf->push_buckets);
}

static void
drop_redis(const char *why)
{
    if (P.c) {
        cw_warn("push: redis %s: %s", why, cw_redis_errstr(P.c));
        cw_redis_free(P.c);
        P.c = NULL;
    }
}

static int
load_scripts(void)
{
    return cw_lua_load(P.c);
}

/* EVALSHA appended to the pipeline (argv: keys then args). */
static void
append_eval(int sc, int nkeys, int argc, const char **argv)
{
    const char *a[24];
    size_t      l[24];
    char        nk[8];
    int         n = 0;

    snprintf(nk, sizeof(nk), "%d", nkeys);
    a[n] = "EVALSHA"; l[n++] = 7;
    a[n] = cw_lua_sha(sc); l[n++] = 40;
    a[n] = nk; l[n++] = strlen(nk);
    for (int i = 0; i < argc && n < 24; i++) {
        a[n] = argv[i];
        l[n++] = strlen(argv[i]);
    }
    cw_redis_append_argv(P.c, n, a, l);
}

static redisReply *
get_reply(void)
{
    redisReply *r = NULL;
    if (P.c == NULL || cw_redis_get_reply(P.c, &r) != REDIS_OK) return NULL;
    return r;
}

/* One script call now; NULL when Redis failed (the connection is dropped). */
static redisReply *
eval_now(int sc, int nkeys, int argc, const char **argv)
{
    redisReply *r;

    if (P.c == NULL) return NULL;
    append_eval(sc, nkeys, argc, argv);
    r = get_reply();
    if (r == NULL) drop_redis("script");
    else if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
        freeReplyObject(r);
        if (load_scripts() != 0) { drop_redis("SCRIPT LOAD"); return NULL; }
        append_eval(sc, nkeys, argc, argv);
        r = get_reply();
        if (r == NULL) drop_redis("script");
    }
    return r;
}


/* ---- metrics ---------------------------------------------------------- */

static void
lat_add(int prov, int64_t ms)
{
    prov_stats_t *s = &P.st[prov];
    if (s->lat == NULL) s->lat = calloc(PUSH_LAT_MAX + 1, sizeof(uint32_t));
    if (s->lat == NULL) return;
    if (ms < 0) ms = 0;
    if (ms > PUSH_LAT_MAX) ms = PUSH_LAT_MAX;
    s->lat[ms]++;
    s->nlat++;
}

static int64_t
lat_pct(int prov, double pct)
{
    prov_stats_t *s = &P.st[prov];
    uint64_t      want, acc = 0;

    if (s->lat == NULL || s->nlat == 0) return -1;
    want = (uint64_t) ((double) s->nlat * pct / 100.0);
    if (want == 0) want = 1;
    for (int i = 0; i <= PUSH_LAT_MAX; i++) {
        acc += s->lat[i];
        if (acc >= want) return i;
    }
    return PUSH_LAT_MAX;
}

/* The counters into chat:{push}:stats:<node> (every second), and a log
 * line every 10 s when something happened. */
static void
stats_tick(void)
{
    int64_t now = cw_mono_ms();

    if (now < P.next_stats || P.c == NULL) return;
    P.next_stats = now + 1000;
    {
        const char *argv[80];
        char        vals[80][32];
        char        names[80][48];
        int         n = 0;
#define ADD(nm, fmt, v) do { snprintf(names[n], sizeof(names[n]), "%s", nm); \
        snprintf(vals[n], sizeof(vals[n]), fmt, v); n++; } while (0)
        ADD("enqueued", "%" PRIu64, P.enqueued);
        ADD("skipped_acked", "%" PRIu64, P.skipped_acked);
        ADD("skipped_read", "%" PRIu64, P.skipped_read);
        ADD("skipped_muted", "%" PRIu64, P.skipped_muted);
        ADD("skipped_quiet", "%" PRIu64, P.skipped_quiet);
        ADD("skipped_online", "%" PRIu64, P.skipped_online);
        ADD("skipped_old", "%" PRIu64, P.skipped_old);
        for (int p = 0; p < PUSH_NPROV; p++) {
            char k[48];
            const char *pn = providers[p]->name;
            snprintf(k, sizeof(k), "%s_sent", pn);         ADD(k, "%" PRIu64, P.st[p].sent);
            snprintf(k, sizeof(k), "%s_failed", pn);       ADD(k, "%" PRIu64, P.st[p].failed);
            snprintf(k, sizeof(k), "%s_dropped", pn);      ADD(k, "%" PRIu64, P.st[p].dropped);
            snprintf(k, sizeof(k), "%s_retried", pn);      ADD(k, "%" PRIu64, P.st[p].retried);
            snprintf(k, sizeof(k), "%s_unconfigured", pn); ADD(k, "%" PRIu64, P.st[p].unconfigured);
            snprintf(k, sizeof(k), "%s_p50_ms", pn);       ADD(k, "%" PRId64, lat_pct(p, 50));
            snprintf(k, sizeof(k), "%s_p99_ms", pn);       ADD(k, "%" PRId64, lat_pct(p, 99));
        }
#undef ADD
        argv[0] = "HSET";
        argv[1] = P.stats_key;
        for (int i = 0; i < n; i++) {
            argv[2 + 2 * i] = names[i];
            argv[3 + 2 * i] = vals[i];
        }
        cw_redis_append_argv(P.c, 2 + 2 * n, argv, NULL);
        cw_redis_append(P.c, "PEXPIRE %s 3600000", P.stats_key);
        for (int i = 0; i < 2; i++) {
            redisReply *r = get_reply();
            if (r == NULL) { drop_redis("stats"); return; }
            freeReplyObject(r);
        }
    }
    if (now >= P.next_log) {
        P.next_log = now + 10000;
        for (int p = 0; p < PUSH_NPROV; p++) {
            if (P.st[p].sent + P.st[p].failed + P.st[p].dropped == 0) continue;
            cw_info("push: %s: %" PRIu64 " sent, %" PRIu64 " failed, %" PRIu64 " dead registrations dropped, %"
                    PRIu64 " retries; message to acceptance p50 %" PRId64 " ms, p99 %" PRId64 " ms",
                    providers[p]->name, P.st[p].sent, P.st[p].failed, P.st[p].dropped, P.st[p].retried,
                    lat_pct(p, 50), lat_pct(p, 99));
        }
    }
}


/* ---- enqueue: queue entries -> due sets --------------------------------- */

typedef struct {
    char    user[CW_ID_MAX + 1];
    int     entry;               /* index in the batch */
    int     pull;
    char    name[132];           /* the group's name */
} push_rcpt_t;

/* The text a notification may show: the body as is (text), else the kind. */
static void
event_fields(const cw_entry_t *e, char *body, size_t blen, int64_t *ts)
{
    json_error_t jerr;
    json_t      *ev = json_loadb(e->ev, e->ev_len, 0, &jerr);
    const char  *b = json_string_value(json_object_get(ev, "body"));
    const char  *kind = json_string_value(json_object_get(ev, "kind"));
    size_t       n;

    *ts = json_integer_value(json_object_get(ev, "ts"));
    if (b == NULL || *b == '\0') b = kind && strcmp(kind, "text") != 0 ? "(media)" : "";
    n = strlen(b);
    if (n >= blen) {
        n = blen - 1;
        while (n > 0 && ((unsigned char) b[n] & 0xc0) == 0x80) n--;     /* a whole UTF-8 character */
    }
    memcpy(body, b, n);
    body[n] = '\0';
    json_decref(ev);
}

/* The recipients of each message entry of the batch. */
static int
recipients(push_rcpt_t **out, int *nout)
{
    cw_batch_t  *b = &P.batch;
    int          cap = 64, n = 0, ngroups = 0, *gidx = NULL;
    push_rcpt_t *rc = malloc(sizeof(*rc) * (size_t) cap);
    int64_t      now = cw_now_ms();

    if (rc == NULL) return -1;
    gidx = malloc(sizeof(int) * (size_t) (b->n + 1));
    if (gidx == NULL) { free(rc); return -1; }
    for (int i = 0; i < b->n; i++) {
        cw_entry_t *e = &b->e[i];
        if (!e->valid || e->type != CW_T_MSG) continue;
        {
            char    body[8];
            int64_t ts;
            event_fields(e, body, sizeof(body), &ts);
            if (ts > 0 && now - ts > P.cf->push_max_age_ms) { P.skipped_old++; continue; }
        }
        if (e->is_group) {
            char mem[256], meta[256], conv[CW_CONV_MAX + 1];
            snprintf(conv, sizeof(conv), "g:%s", e->group);
            int s = (int) (chat_crc32(conv, strlen(conv)) % (uint32_t) P.cf->shards);
            snprintf(mem, sizeof(mem), "chat:{s%d}:g:%s:mem", s, e->group);
            snprintf(meta, sizeof(meta), "chat:{s%d}:g:%s:meta", s, e->group);
            cw_redis_append(P.c, "HGETALL %s", mem);
            cw_redis_append(P.c, "HMGET %s n name", meta);
            gidx[ngroups++] = i;
            continue;
        }
        if (e->to[0] == '\0' || strcmp(e->to, e->from) == 0) continue;    /* notes to self */
        if (n == cap) {
            push_rcpt_t *x = realloc(rc, sizeof(*rc) * (size_t) (cap *= 2));
            if (x == NULL) goto oom;
            rc = x;
        }
        snprintf(rc[n].user, sizeof(rc[n].user), "%s", e->to);
        rc[n].entry = i;
        rc[n].pull = 0;
        rc[n].name[0] = '\0';
        n++;
    }
    for (int g = 0; g < ngroups; g++) {
        cw_entry_t *e = &b->e[gidx[g]];
        redisReply *mem = get_reply(), *cnt = mem ? get_reply() : NULL;
        int         pull;
        if (mem == NULL || cnt == NULL) {
            if (mem) freeReplyObject(mem);
            free(rc);
            free(gidx);
            return -1;
        }
        pull = cnt->type == REDIS_REPLY_ARRAY && cnt->elements == 2 && cnt->element[0]->type == REDIS_REPLY_STRING
               && atoi(cnt->element[0]->str) > P.cf->group_push_limit;
        for (size_t k = 0; mem->type == REDIS_REPLY_ARRAY && k + 1 < mem->elements; k += 2) {
            const char *u = mem->element[k]->str, *v = mem->element[k + 1]->str, *colon = strchr(v, ':');
            int64_t     since = strtoll(v, NULL, 10), until = colon ? strtoll(colon + 1, NULL, 10) : 0;
            if (strcmp(u, e->from) == 0 || since >= e->seq || (colon && e->seq >= until)) continue;
            if (strlen(u) > CW_ID_MAX) continue;
            if (n == cap) {
                push_rcpt_t *x = realloc(rc, sizeof(*rc) * (size_t) (cap *= 2));
                if (x == NULL) { freeReplyObject(mem); freeReplyObject(cnt); goto oom; }
                rc = x;
            }
            snprintf(rc[n].user, sizeof(rc[n].user), "%s", u);
            rc[n].entry = gidx[g];
            rc[n].pull = pull;
            snprintf(rc[n].name, sizeof(rc[n].name), "%.128s",
                     cnt->type == REDIS_REPLY_ARRAY && cnt->elements == 2 && cnt->element[1]->type == REDIS_REPLY_STRING
                     ? cnt->element[1]->str : e->group);
            n++;
        }
        freeReplyObject(mem);
        freeReplyObject(cnt);
    }
    free(gidx);
    *out = rc;
    *nout = n;
    return 0;
oom:
    free(rc);
    free(gidx);
    return -1;
}

/* The whole batch into the due sets. 0, or -1 when Redis failed (nothing
 * is acknowledged then: the entries come again). */
static int
enqueue_batch(void)
{
    push_rcpt_t *rc = NULL;
    int          n = 0, nz = 0, failed = 0;
    int64_t      now = cw_now_ms();
    char         due_at[24], pn_ttl[24];

    if (recipients(&rc, &n) != 0) return -1;
    /* most recipients register no device: one EXISTS each (a plain command,
     * pipelined) keeps the enqueue script for those who do; a script call
     * per member of every big group's message cost as much Redis as the
     * fan-out's inbox appends */
    for (int i = 0; i < n; i++) cw_redis_append(P.c, "EXISTS chat:{u:%s}:push", rc[i].user);
    {
        int kept = 0;
        for (int i = 0; i < n; i++) {
            redisReply *r = get_reply();
            if (r == NULL) { free(rc); return -1; }
            if (r->type != REDIS_REPLY_INTEGER || r->integer != 0) rc[kept++] = rc[i];
            freeReplyObject(r);
        }
        n = kept;
    }
    snprintf(due_at, sizeof(due_at), "%" PRId64, now + P.cf->push_delay_ms);
    snprintf(pn_ttl, sizeof(pn_ttl), "%lld", PUSH_PN_TTL);
    for (int i = 0; i < n; i++) {
        cw_entry_t *e = &P.batch.e[rc[i].entry];
        char        k[4][CW_ID_MAX + 32], seq[24], ts_s[24], body[PUSH_BODY_MAX + 1];
        const char *argv[12];
        int64_t     ts;
        event_fields(e, body, sizeof(body), &ts);
        snprintf(k[0], sizeof(k[0]), "chat:{u:%s}:pn", rc[i].user);
        snprintf(k[1], sizeof(k[1]), "chat:{u:%s}:push", rc[i].user);
        snprintf(k[2], sizeof(k[2]), "chat:{u:%s}:notify", rc[i].user);
        snprintf(k[3], sizeof(k[3]), "chat:{u:%s}:read", rc[i].user);
        snprintf(seq, sizeof(seq), "%" PRId64, e->seq);
        snprintf(ts_s, sizeof(ts_s), "%" PRId64, ts > 0 ? ts : now);
        argv[0] = k[0]; argv[1] = k[1]; argv[2] = k[2]; argv[3] = k[3];
        argv[4] = e->conv; argv[5] = seq; argv[6] = e->from; argv[7] = body; argv[8] = ts_s;
        argv[9] = rc[i].name; argv[10] = rc[i].pull ? "1" : "0"; argv[11] = pn_ttl;
        append_eval(CHAT_LUA_PUSH_ENQUEUE, 4, 12, argv);
    }
    for (int i = 0; i < n; i++) {
        redisReply *r = get_reply();
        if (r == NULL) { free(rc); return -1; }
        if (r->type == REDIS_REPLY_ERROR) {
            if (strncmp(r->str, "NOSCRIPT", 8) == 0) failed = 1;
            else cw_warn("push: enqueue script: %s", r->str);
        } else if (r->type == REDIS_REPLY_ARRAY) {
            int b = bucket_of(rc[i].user);
            for (size_t d = 0; d < r->elements; d++) {
                char key[32], member[sizeof(((push_job_t *) 0)->member)];
                snprintf(key, sizeof(key), "chat:{pq%d}:due", b);
                snprintf(member, sizeof(member), "%s|%s|%s", rc[i].user, r->element[d]->str,
                         P.batch.e[rc[i].entry].conv);
                cw_redis_append(P.c, "ZADD %s LT %s %s", key, due_at, member);
                nz++;
            }
        }
        freeReplyObject(r);
    }
    free(rc);
    for (int i = 0; i < nz; i++) {
        redisReply *r = get_reply();
        if (r == NULL) return -1;
        if (r->type == REDIS_REPLY_ERROR) { cw_warn("push: ZADD: %s", r->str); failed = 1; }
        else P.enqueued++;
        freeReplyObject(r);
    }
    if (failed) {
        if (load_scripts() != 0) return -1;
        return -2;       /* again, with the scripts loaded */
    }
    return 0;
}


/* ---- due notifications -> providers -------------------------------------- */

static void
job_free(push_job_t *j)
{
    free(j->reg);
    json_decref(j->regj);
    free(j);
    P.jobs--;
}

/* Release the lease: remove the due entry (at < 0) or move it to at. */
static void
release(push_job_t *j, int64_t at)
{
    char        key[32], lease[24], when[24];
    const char *argv[4];
    redisReply *r;

    snprintf(key, sizeof(key), "chat:{pq%d}:due", j->bucket);
    snprintf(lease, sizeof(lease), "%" PRId64, j->lease);
    snprintf(when, sizeof(when), "%" PRId64, at);
    argv[0] = key; argv[1] = j->member; argv[2] = lease; argv[3] = when;
    r = eval_now(CHAT_LUA_PUSH_DONE, 1, at < 0 ? 3 : 4, argv);
    if (r) freeReplyObject(r);
}

static void
dead_registration(push_job_t *j, long status, const char *why)
{
    char        key[CW_ID_MAX + 32], id[CW_ID_MAX + CW_DEV_MAX + 2];
    const char *argv[3];
    redisReply *r;

    cw_warn("push: %s declared the registration of %s/%s dead (%ld %s); removed",
            providers[j->prov]->name, j->user, j->device, status, why ? why : "");
    /* MongoDB first (the record; only if it still holds what we sent) */
    if (P.mongo == NULL && P.cf->mongo_uri[0]) P.mongo = cw_mongo_client(P.cf, "chat-worker-push", P.db, sizeof(P.db));
    if (P.mongo) {
        mongoc_collection_t *coll = mongoc_client_get_collection(P.mongo, P.db, "devices");
        bson_error_t         err;
        bson_t              *filter;
        snprintf(id, sizeof(id), "%s|%s", j->user, j->device);
        filter = BCON_NEW("_id", BCON_UTF8(id), "reg", BCON_UTF8(j->reg));
        if (!mongoc_collection_delete_one(coll, filter, NULL, NULL, &err))
            cw_warn("push: delete device %s from mongodb: %s", id, err.message);
        bson_destroy(filter);
        mongoc_collection_destroy(coll);
    }
    snprintf(key, sizeof(key), "chat:{u:%s}:push", j->user);
    argv[0] = key; argv[1] = j->device; argv[2] = j->reg;
    r = eval_now(CHAT_LUA_PUSH_DEAD, 1, 3, argv);
    if (r) freeReplyObject(r);
}

int
cw_push_common_outcome(const cw_http_req_t *r, int *retry_ms)
{
    int p = r->prov;
    int ms;

    if (r->retry_after >= 0) ms = (int) (r->retry_after * 1000);
    else {
        ms = 500 << (P.fails[p] < 5 ? P.fails[p] : 5);
        if (ms > PUSH_BACKOFF_MAX) ms = PUSH_BACKOFF_MAX;
    }
    if (ms < 100) ms = 100;
    *retry_ms = ms;
    return PUSH_RETRY;
}

void
cw_push_result(push_job_t *j, int outcome, int retry_ms, long status, const char *why)
{
    int     p = j->prov;
    int64_t now = cw_now_ms();

    switch (outcome) {
    case PUSH_OK:
        P.st[p].sent++;
        P.fails[p] = 0;
        P.down_until[p] = 0;
        lat_add(p, now - j->msg_ts);
        release(j, -1);
        break;
    case PUSH_DEAD:
        P.st[p].dropped++;
        dead_registration(j, status, why);
        release(j, -1);
        break;
    case PUSH_FAIL:
        P.st[p].failed++;
        cw_warn("push: %s refused the notification for %s/%s: %ld %s; dropped", providers[p]->name,
                j->user, j->device, status, why ? why : "");
        release(j, -1);
        break;
    case PUSH_REAUTH:
        P.st[p].retried++;
        release(j, now + 200);
        break;
    default:   /* PUSH_RETRY */
        P.st[p].retried++;
        if (status != 0 || strcmp(why ? why : "", "worker stopping") != 0) {
            P.fails[p]++;
            /* one endpoint of a web push service failing says little about
             * the others; APNs and FCM are one service each */
            if (p != PUSH_WEBPUSH && (status == 0 || status == 429 || status >= 500))
                P.down_until[p] = now + retry_ms;
            if (P.fails[p] == 1 || P.fails[p] % 100 == 0)
                cw_warn("push: %s: %ld %s; retrying in %d ms", providers[p]->name, status, why ? why : "", retry_ms);
        }
        if (strcmp(why ? why : "", "worker stopping") != 0) release(j, now + retry_ms);
        break;
    }
    job_free(j);
}

/* Minutes after local midnight in tz. */
static int
local_minutes(const char *tz, int64_t now_ms)
{
    static char current[64] = "";
    time_t      t = (time_t) (now_ms / 1000);
    struct tm   tm;

    if (strcmp(current, tz) != 0) {
        if (!cw_tz_valid(tz)) tz = "UTC";
        setenv("TZ", tz, 1);
        tzset();
        snprintf(current, sizeof(current), "%s", tz);
    }
    localtime_r(&t, &tm);
    return tm.tm_hour * 60 + tm.tm_min;
}

static int
in_quiet(const char *tz, const char *quiet, int64_t now_ms)
{
    int f, t, m;
    if (quiet == NULL || sscanf(quiet, "%d-%d", &f, &t) != 2 || f < 0 || t < 0) return 0;
    m = local_minutes(tz, now_ms);
    return f < t ? (m >= f && m < t) : (m >= f || m < t);
}

static void
compose(push_job_t *j, json_t *pn, int preview)
{
    const char *from = json_string_value(json_object_get(pn, "from"));
    const char *name = json_string_value(json_object_get(pn, "name"));
    const char *body = json_string_value(json_object_get(pn, "body"));
    int         group = name && *name;

    if (from == NULL) from = "someone";
    j->seq = json_integer_value(json_object_get(pn, "seq"));
    j->msg_ts = (int64_t) json_number_value(json_object_get(pn, "ts"));
    j->text[0] = '\0';
    if (preview) {
        if (group) snprintf(j->title, sizeof(j->title), "%s in %s", from, name);
        else snprintf(j->title, sizeof(j->title), "%s", from);
        snprintf(j->text, sizeof(j->text), "%s", body ? body : "");
        if (j->text[0] == '\0') snprintf(j->text, sizeof(j->text), "New message");
    } else if (j->count <= 1) {
        snprintf(j->title, sizeof(j->title), group ? "New message in %s" : "New message from %s", group ? name : from);
    } else {
        snprintf(j->title, sizeof(j->title), group ? "%d new messages in %s" : "%d new messages from %s", j->count,
                 group ? name : from);
    }
}

static void
collapse_id(const char *conv, char out[40])
{
    unsigned char d[32];
    unsigned int  dl = 0;
    EVP_Digest(conv, strlen(conv), d, &dl, EVP_sha256(), NULL);
    cw_b64url_encode(d, 16, out, 40);          /* 22 characters: within Web Push's 32 */
}

static int
provider_of(json_t *regj)
{
    const char *p = json_string_value(json_object_get(regj, "provider"));
    if (p == NULL) return -1;
    for (int i = 0; i < PUSH_NPROV; i++) if (strcmp(p, providers[i]->name) == 0) return i;
    return -1;
}

/* One leased due entry: check it on the user's keys, then hand it to its
 * provider (or release it). */
static void
handle_due(int bucket, const char *member, int64_t lease)
{
    push_job_t  *j = calloc(1, sizeof(*j));
    const char  *p1, *p2;
    char         k[8][CW_ID_MAX + 32], now_s[24];
    const char  *argv[12];
    redisReply  *r;
    int64_t      now = cw_now_ms();
    json_error_t jerr;
    json_t      *pn;
    int          outcome, retry;

    if (j == NULL) return;
    P.jobs++;
    j->bucket = bucket;
    j->lease = lease;
    snprintf(j->member, sizeof(j->member), "%s", member);
    p1 = strchr(member, '|');
    p2 = p1 ? strchr(p1 + 1, '|') : NULL;
    if (p2 == NULL || p1 - member > CW_ID_MAX || p2 - p1 - 1 > CW_DEV_MAX || strlen(p2 + 1) > CW_CONV_MAX) {
        release(j, -1);
        job_free(j);
        return;
    }
    snprintf(j->user, sizeof(j->user), "%.*s", (int) (p1 - member), member);
    snprintf(j->device, sizeof(j->device), "%.*s", (int) (p2 - p1 - 1), p1 + 1);
    snprintf(j->conv, sizeof(j->conv), "%s", p2 + 1);
    {
        static const char *what[8] = { "push", "set", "mute", "acked", "read", "last", "conns", "pn" };
        for (int i = 0; i < 8; i++) {
            snprintf(k[i], sizeof(k[i]), "chat:{u:%s}:%s", j->user, what[i]);
            argv[i] = k[i];
        }
    }
    snprintf(now_s, sizeof(now_s), "%" PRId64, now);
    argv[8] = j->device; argv[9] = j->conv; argv[10] = now_s; argv[11] = P.cf->push_delay_ms == 0 ? "1" : "0";
    r = eval_now(CHAT_LUA_PUSH_CHECK, 8, 12, argv);
    if (r == NULL) { job_free(j); return; }       /* the lease brings it back */
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 || r->element[0]->type != REDIS_REPLY_STRING) {
        if (r->type == REDIS_REPLY_ERROR) cw_warn("push: check script: %s", r->str);
        freeReplyObject(r);
        release(j, now + 1000);
        job_free(j);
        return;
    }
    if (strcmp(r->element[0]->str, "send") != 0 || r->elements < 8) {
        const char *why = r->element[0]->str;
        if (strcmp(why, "later") == 0) {
            /* the fan-out has not appended it yet: look again soon */
            P.later++;
            release(j, now + 500);
        } else {
            if (strcmp(why, "acked") == 0) P.skipped_acked++;
            else if (strcmp(why, "read") == 0) P.skipped_read++;
            else if (strcmp(why, "muted") == 0) P.skipped_muted++;
            else if (strcmp(why, "online") == 0) P.skipped_online++;
            release(j, -1);
        }
        freeReplyObject(r);
        job_free(j);
        return;
    }
    j->reg = strdup(r->element[1]->str);
    j->regj = json_loads(r->element[1]->str, 0, &jerr);
    j->count = (int) r->element[2]->integer;
    j->badge = (int) r->element[3]->integer;
    pn = json_loads(r->element[4]->str, 0, &jerr);
    if (j->reg == NULL || j->regj == NULL || pn == NULL || (j->prov = provider_of(j->regj)) < 0) {
        json_decref(pn);
        freeReplyObject(r);
        release(j, -1);
        job_free(j);
        return;
    }
    if (in_quiet(r->element[6]->str, r->element[7]->str, now)) {
        P.skipped_quiet++;
        json_decref(pn);
        freeReplyObject(r);
        release(j, -1);
        job_free(j);
        return;
    }
    compose(j, pn, strcmp(r->element[5]->str, "1") == 0);
    json_decref(pn);
    freeReplyObject(r);
    collapse_id(j->conv, j->collapse);
    j->urgent = 1;
    if (!P.configured[j->prov]) {
        if (P.st[j->prov].unconfigured++ == 0)
            cw_warn("push: registrations for %s exist but it is not configured; their notifications are dropped",
                    providers[j->prov]->name);
        release(j, -1);
        job_free(j);
        return;
    }
    if (P.down_until[j->prov] > now) {
        release(j, P.down_until[j->prov] + (int64_t) (rand() % 200));
        job_free(j);
        return;
    }
    if (cw_http_inflight(j->prov) >= P.cf->push_concurrency) {
        /* this provider's slots are full (another one's were free): soon */
        release(j, now + 50);
        job_free(j);
        return;
    }
    if (providers[j->prov]->send(j, &outcome, &retry) != 0) cw_push_result(j, outcome, retry, 0, "not sent");
}

/* Lease what is due in every bucket, as far as the providers have room. */
/* How often the due sets are asked: at most every PUSH_CLAIM_BUSY ms while
 * notifications come due, every PUSH_CLAIM_IDLE ms when a round found
 * none. Asking on every turn of the loop (each queue batch) cost one lease
 * script per bucket per batch: 16 EVALSHAs per batch, most of the Redis
 * work per message at 2,000 messages a second. */
#define PUSH_CLAIM_BUSY  10
#define PUSH_CLAIM_IDLE  50

static int
claim_due(void)
{
    static int64_t next_claim;
    int     room = 0, nb = P.cf->push_buckets, got = 0;
    int64_t now = cw_now_ms(), lease = now + P.cf->push_lease_ms;
    char    lease_s[24], now_s[24], lim[16];

    if (now < next_claim) return 0;
    next_claim = now + PUSH_CLAIM_IDLE;

    for (int p = 0; p < PUSH_NPROV; p++) {
        int free_slots = P.cf->push_concurrency - cw_http_inflight(p);
        if (free_slots > room) room = free_slots;
    }
    if (room <= 0 || P.jobs > P.cf->push_concurrency * PUSH_NPROV * 2) return 0;
    snprintf(lease_s, sizeof(lease_s), "%" PRId64, lease);
    snprintf(now_s, sizeof(now_s), "%" PRId64, now);
    snprintf(lim, sizeof(lim), "%d", room / nb + 8 < room ? room / nb + 8 : room);
    for (int i = 0; i < nb; i++) {
        char        key[32];
        const char *argv[4];
        snprintf(key, sizeof(key), "chat:{pq%d}:due", (P.bucket_rr + i) % nb);
        argv[0] = key; argv[1] = now_s; argv[2] = lease_s; argv[3] = lim;
        append_eval(CHAT_LUA_PUSH_LEASE, 1, 4, argv);
    }
    {
        redisReply **rs = nb > 0 && nb <= 4096 ? calloc((size_t) nb, sizeof(*rs)) : NULL;
        int          bad = 0;
        if (rs == NULL) return -1;
        for (int i = 0; i < nb; i++) {
            rs[i] = get_reply();
            if (rs[i] == NULL) { bad = 1; break; }
            if (rs[i]->type == REDIS_REPLY_ERROR && strncmp(rs[i]->str, "NOSCRIPT", 8) == 0) bad = 2;
        }
        for (int i = 0; !bad && i < nb; i++) {
            if (rs[i]->type != REDIS_REPLY_ARRAY) continue;
            for (size_t k = 0; k < rs[i]->elements && P.c; k++) {
                handle_due((P.bucket_rr + i) % nb, rs[i]->element[k]->str, lease);
                got++;
            }
        }
        for (int i = 0; i < nb; i++) if (rs[i]) freeReplyObject(rs[i]);
        free(rs);
        P.bucket_rr = (P.bucket_rr + 1) % nb;
        if (bad == 1) { drop_redis("lease"); return -1; }
        if (bad == 2 && load_scripts() != 0) { drop_redis("SCRIPT LOAD"); return -1; }
    }
    if (got) next_claim = now + PUSH_CLAIM_BUSY;
    return got;
}


/* ---- the role ------------------------------------------------------------ */

int
cw_role_push(const cw_config_t *cf)
{
    cw_heartbeat_t hb;
    cw_backoff_t   bo;
    int           *shards, kafka, any = 0;
    char           err[256];

    memset(&P, 0, sizeof(P));
    P.cf = cf;
    srand((unsigned) cw_mono_ms());
    cw_mongo_log_init();
    if (cw_http_init(cf) != 0) {
        cw_error("push: libcurl init failed");
        return 1;
    }
    {
        curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
        if (!(v->features & CURL_VERSION_HTTP2)) {
            cw_error("push: this libcurl has no HTTP/2 (APNs needs it)");
            return 1;
        }
    }
    for (int p = 0; p < PUSH_NPROV; p++) {
        int rc = providers[p]->init(cf);
        if (rc < 0) return 2;
        P.configured[p] = rc;
        any |= rc;
    }
    if (!any) cw_warn("push: no provider is configured (webpush_vapid_key, apns_key_file, fcm_service_account): "
                      "notifications are dropped");
    shards = malloc(sizeof(int) * (size_t) cf->shards);
    if (shards == NULL) return 1;
    for (int s = 0; s < cf->shards; s++) shards[s] = s;
    P.q = cw_queue_new(cf, "push", shards, cf->shards, 0);
    free(shards);
    if (P.q == NULL) return 1;
    kafka = cw_queue_is_kafka(P.q);
    snprintf(P.stats_key, sizeof(P.stats_key), "chat:{push}:stats:%s", cf->node_id);
    cw_heartbeat_init(&hb, cf, "push");
    cw_backoff_reset(&bo);
    cw_info("role push started (node %s, %s; webpush %s, apns %s, fcm %s; delay %d ms, %d buckets)", cf->node_id,
            kafka ? "kafka group chat-push" : "consumer push-0 on every shard",
            P.configured[0] ? "on" : "off", P.configured[1] ? "on" : "off", P.configured[2] ? "on" : "off",
            cf->push_delay_ms, cf->push_buckets);

    while (!cw_stop) {
        int n, busy;

        if (P.c == NULL) {
            err[0] = '\0';
            P.c = cw_redis_connect(cf, 5000, err, sizeof(err));
            if (P.c == NULL || load_scripts() != 0 || (!kafka && cw_queue_setup(P.q, P.c) != 0)) {
                if (P.c) {
                    snprintf(err, sizeof(err), "setup failed");
                    cw_redis_free(P.c);
                    P.c = NULL;
                }
                cw_warn("push: redis: %s; retrying in %d ms", err, cw_backoff_ms(&bo));
                cw_http_poll(0);
                cw_backoff_wait(&bo);
                continue;
            }
            cw_backoff_reset(&bo);
            cw_info("push: consuming the queue");
        }
        if (cw_heartbeat_tick(&hb, P.c) != 0 || (!kafka && cw_queue_maintain(P.q, P.c) != 0)) {
            drop_redis("connection lost");
            continue;
        }
        busy = cw_http_inflight(0) + cw_http_inflight(1) + cw_http_inflight(2) > 0;
        n = cw_queue_fetch(P.q, P.c, &P.batch, busy ? 5 : 50);
        if (n < 0) {
            if (!kafka) drop_redis("read failed");
            else cw_sleep_ms(100);
            continue;
        }
        if (n > 0) {
            int rc = enqueue_batch();
            if (rc == -2) rc = enqueue_batch();
            if (rc != 0) {
                drop_redis("enqueue failed");
                continue;          /* not acknowledged: read again */
            }
            if (kafka) cw_queue_ack(P.q, NULL, &P.batch);
            else {
                int na = cw_queue_ack(P.q, P.c, &P.batch), bad = na < 0;
                for (int i = 0; i < na && !bad; i++) {
                    redisReply *r = get_reply();
                    if (r == NULL) bad = 1;
                    else freeReplyObject(r);
                }
                if (bad) { drop_redis("ack failed"); continue; }
            }
        }
        if (claim_due() < 0) continue;
        /* a small batch and nothing in flight: let entries gather (one
         * read and one ack for many at low rates; notifications wait
         * push_delay_ms anyway) */
        if (!busy && n > 0 && n < cf->batch && cf->gather_ms > 0 && !cw_stop) cw_sleep_ms(cf->gather_ms);
        cw_http_poll(busy ? 5 : 0);
        stats_tick();
    }
    cw_info("push: stopping; %d requests in flight come back after push_lease_ms", P.jobs);
    /* requests in flight end first (their entries stay leased), then what
     * waited inside a provider (FCM: for a token) */
    cw_http_close();
    for (int p = 0; p < PUSH_NPROV; p++) if (providers[p]->close) providers[p]->close();
    /* what was enqueued is committed, so a restart does not read it again */
    if (!kafka && P.c && !cw_redis_err(P.c)) cw_queue_flush(P.q, P.c, 1);
    cw_heartbeat_clear(&hb, P.c);
    if (P.c) cw_redis_free(P.c);
    cw_queue_free(P.q);
    cw_batch_free(&P.batch);
    for (int p = 0; p < PUSH_NPROV; p++) free(P.st[p].lat);
    if (P.mongo) mongoc_client_destroy(P.mongo);
    cw_info("role push stopped");
    return 0;
}
