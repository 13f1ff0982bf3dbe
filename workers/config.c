/*
 * Worker configuration: "key = value" lines, '#' comments. Environment
 * variables named like the stack's env file override the file, so the same
 * binary runs in the dev stack, in docker and next to existing servers.
 */
#include "chat_worker.h"
#include "chat_url.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void
set(char *dst, size_t len, const char *v)
{
    snprintf(dst, len, "%s", v);
}

static char *
trim(char *s)
{
    char *e;
    while (isspace((unsigned char) *s)) s++;
    e = s + strlen(s);
    while (e > s && isspace((unsigned char) e[-1])) *--e = '\0';
    return s;
}

/* Integer keys, and the environment variables that override them. */
static int *
int_key(cw_config_t *cf, const char *k)
{
    if (strcmp(k, "shards") == 0) return &cf->shards;
    if (strcmp(k, "fanout_workers") == 0) return &cf->fanout_workers;
    if (strcmp(k, "fanout_index") == 0) return &cf->fanout_index;
    if (strcmp(k, "fanout_lease_ms") == 0) return &cf->fanout_lease_ms;
    if (strcmp(k, "fanout_lease_renew_ms") == 0) return &cf->fanout_lease_renew_ms;
    if (strcmp(k, "inbox_max") == 0) return &cf->inbox_max;
    if (strcmp(k, "retention_days") == 0) return &cf->retention_days;
    if (strcmp(k, "delete_window_s") == 0) return &cf->delete_window_s;
    if (strcmp(k, "sweep_batch") == 0) return &cf->sweep_batch;
    if (strcmp(k, "sweep_rate") == 0) return &cf->sweep_rate;
    if (strcmp(k, "sweep_day_ms") == 0) return &cf->sweep_day_ms;
    if (strcmp(k, "sweep_timeout_ms") == 0) return &cf->sweep_timeout_ms;
    if (strcmp(k, "claim_idle_ms") == 0) return &cf->claim_idle_ms;
    if (strcmp(k, "gather_ms") == 0) return &cf->gather_ms;
    if (strcmp(k, "fanout_gather_ms") == 0) return &cf->fanout_gather_ms;
    if (strcmp(k, "queue_commit_ms") == 0) return &cf->queue_commit_ms;
    if (strcmp(k, "persist_window_ms") == 0) return &cf->persist_window_ms;
    if (strcmp(k, "persist_state_delay_ms") == 0) return &cf->persist_state_delay_ms;
    if (strcmp(k, "batch") == 0) return &cf->batch;
    if (strcmp(k, "group_max_members") == 0) return &cf->group_max_members;
    if (strcmp(k, "group_push_limit") == 0) return &cf->group_push_limit;
    if (strcmp(k, "push_delay_ms") == 0) return &cf->push_delay_ms;
    if (strcmp(k, "push_buckets") == 0) return &cf->push_buckets;
    if (strcmp(k, "push_concurrency") == 0) return &cf->push_concurrency;
    if (strcmp(k, "push_lease_ms") == 0) return &cf->push_lease_ms;
    if (strcmp(k, "push_timeout_ms") == 0) return &cf->push_timeout_ms;
    if (strcmp(k, "push_ttl") == 0) return &cf->push_ttl;
    if (strcmp(k, "push_max_age_ms") == 0) return &cf->push_max_age_ms;
    if (strcmp(k, "redis_replicas") == 0) return &cf->redis_replicas;
    if (strcmp(k, "redis_wait_ms") == 0) return &cf->redis_wait_ms;
    return NULL;
}

/* String keys of the push role. */
static char *
str_key(cw_config_t *cf, const char *k, size_t *len)
{
#define SK(name) if (strcmp(k, #name) == 0) { *len = sizeof(cf->name); return cf->name; }
    SK(push_ca_file) SK(webpush_vapid_key) SK(webpush_subject) SK(webpush_allow)
    SK(apns_key_file) SK(apns_key_id) SK(apns_team_id) SK(apns_url) SK(apns_sandbox_url)
    SK(fcm_service_account) SK(fcm_url)
#undef SK
    return NULL;
}

struct int_env { const char *env, *key; };
static const struct int_env int_envs[] = {
    { "CHAT_SHARDS", "shards" },
    { "CHAT_FANOUT_WORKERS", "fanout_workers" },
    { "CHAT_FANOUT_INDEX", "fanout_index" },
    { "CHAT_FANOUT_LEASE_MS", "fanout_lease_ms" },
    { "CHAT_FANOUT_LEASE_RENEW_MS", "fanout_lease_renew_ms" },
    { "CHAT_INBOX_MAX", "inbox_max" },
    { "CHAT_RETENTION_DAYS", "retention_days" },
    { "CHAT_CLAIM_IDLE_MS", "claim_idle_ms" },
    { "CHAT_GATHER_MS", "gather_ms" },
    { "CHAT_FANOUT_GATHER_MS", "fanout_gather_ms" },
    { "CHAT_QUEUE_COMMIT_MS", "queue_commit_ms" },
    { "CHAT_PERSIST_WINDOW_MS", "persist_window_ms" },
    { "CHAT_PERSIST_STATE_DELAY_MS", "persist_state_delay_ms" },
    { "CHAT_BATCH", "batch" },
    { "CHAT_GROUP_MAX_MEMBERS", "group_max_members" },
    { "CHAT_GROUP_PUSH_LIMIT", "group_push_limit" },
    { "CHAT_PUSH_DELAY_MS", "push_delay_ms" },
    { NULL, NULL }
};

static int
parse_int(const char *v, int *out)
{
    char *end;
    long  n;

    errno = 0;
    n = strtol(v, &end, 10);
    if (end == v || *end != '\0' || errno != 0 || n < -2147483647L || n > 2147483647L) return -1;
    *out = (int) n;
    return 0;
}

static int
check_range(const char *k, int v, int lo, int hi)
{
    if (v < lo || v > hi) {
        cw_error("%s must be between %d and %d, not %d", k, lo, hi, v);
        return -1;
    }
    return 0;
}

int
cw_config_load(cw_config_t *cf, const char *path)
{
    FILE  *f;
    char   line[1024], *k, *v, *eq;
    int    lineno = 0, *ip;
    char  *sp;
    size_t slen;
    const char *env;
    int    cluster = -1;                /* not set: follows redis_url */

    memset(cf, 0, sizeof(*cf));
    set(cf->redis_url, sizeof(cf->redis_url), "redis://127.0.0.1:6379");
    set(cf->queue, sizeof(cf->queue), "redis");
    set(cf->rest_listen, sizeof(cf->rest_listen), "unix:/run/ngx-chat/rest.sock");
    cf->rest_socket_mode = 0600;
    cf->shards = 16;
    cf->fanout_workers = 1;
    cf->fanout_index = 0;
    cf->fanout_lease_ms = 5000;
    cf->fanout_lease_renew_ms = 1000;
    cf->inbox_max = 100000;
    cf->retention_days = 365;
    cf->delete_window_s = 172800;       /* 48 h */
    cf->sweep_batch = 30000;
    cf->sweep_rate = 5000;
    cf->sweep_day_ms = 86400000;
    cf->sweep_timeout_ms = 600000;
    cf->claim_idle_ms = 5000;
    cf->gather_ms = 20;
    cf->fanout_gather_ms = 2;
    cf->queue_commit_ms = 100;
    cf->persist_window_ms = 250;
    cf->persist_state_delay_ms = 2000;
    cf->batch = 200;
    cf->group_max_members = 500;
    cf->group_push_limit = 500;
    cf->group_rate[0] = 30;             /* a minute, and a burst of 10 */
    cf->group_rate[1] = 10;
    cf->group_adds[0] = 50;             /* an hour, and 200 a day */
    cf->group_adds[1] = 200;
    cf->delete_rate[0] = 60;            /* a minute, and a burst of 30 */
    cf->delete_rate[1] = 30;
    cf->push_delay_ms = 3000;
    cf->push_buckets = 16;
    cf->push_concurrency = 100;
    cf->push_lease_ms = 30000;
    cf->push_timeout_ms = 10000;
    cf->push_ttl = 86400;
    cf->push_max_age_ms = 3600000;
    cf->redis_wait_ms = 1000;
    set(cf->webpush_allow, sizeof(cf->webpush_allow),
        "fcm.googleapis.com,updates.push.services.mozilla.com,push.services.mozilla.com,"
        "notify.windows.com,push.apple.com");
    set(cf->apns_url, sizeof(cf->apns_url), "https://api.push.apple.com");
    set(cf->apns_sandbox_url, sizeof(cf->apns_sandbox_url), "https://api.sandbox.push.apple.com");
    set(cf->fcm_url, sizeof(cf->fcm_url), "https://fcm.googleapis.com");

    if (path) {
        f = fopen(path, "r");
        if (f == NULL) {
            cw_error("cannot open config %s: %s", path, strerror(errno));
            return -1;
        }
        while (fgets(line, sizeof(line), f)) {
            lineno++;
            k = trim(line);
            if (*k == '#' || *k == '\0') continue;
            eq = strchr(k, '=');
            if (eq == NULL) {
                cw_error("%s:%d: expected key = value", path, lineno);
                fclose(f);
                return -1;
            }
            *eq = '\0';
            k = trim(k);
            v = trim(eq + 1);
            if (strcmp(k, "redis_url") == 0) set(cf->redis_url, sizeof(cf->redis_url), v);
            else if (strcmp(k, "redis_cluster") == 0) {
                int *flag = &cluster;
                if (strcmp(v, "on") == 0) *flag = 1;
                else if (strcmp(v, "off") == 0) *flag = 0;
                else {
                    cw_error("%s:%d: %s must be on or off, not \"%s\"", path, lineno, k, v);
                    fclose(f);
                    return -1;
                }
            }
            else if (strcmp(k, "kafka_brokers") == 0) set(cf->kafka_brokers, sizeof(cf->kafka_brokers), v);
            else if (strcmp(k, "mongo_uri") == 0) set(cf->mongo_uri, sizeof(cf->mongo_uri), v);
            else if (strcmp(k, "queue") == 0) set(cf->queue, sizeof(cf->queue), v);
            else if (strcmp(k, "rest_listen") == 0) set(cf->rest_listen, sizeof(cf->rest_listen), v);
            else if (strcmp(k, "node_id") == 0) set(cf->node_id, sizeof(cf->node_id), v);
            else if (strcmp(k, "group_rate_limit") == 0 || strcmp(k, "group_adds_limit") == 0
                     || strcmp(k, "delete_rate_limit") == 0)
            {
                int  *pair = strcmp(k, "group_rate_limit") == 0 ? cf->group_rate
                             : strcmp(k, "delete_rate_limit") == 0 ? cf->delete_rate : cf->group_adds;
                long  a, b;
                char *end, *end2;
                a = strtol(v, &end, 10);
                b = strtol(end, &end2, 10);
                while (*end2 == ' ' || *end2 == '\t') end2++;
                if (end == v || end2 == end || *end2 != '\0' || a < 0 || b < 0 || a > 1000000 || b > 1000000
                    || (a == 0) != (b == 0))
                {
                    cw_error("%s:%d: %s must be two numbers (%s), or 0 0 for no limit, not \"%s\"", path, lineno, k,
                             pair == cf->group_adds ? "per hour and per day" : "per minute and burst", v);
                    fclose(f);
                    return -1;
                }
                pair[0] = (int) a;
                pair[1] = (int) b;
            }
            else if (strcmp(k, "rest_secret_file") == 0) set(cf->rest_secret_file, sizeof(cf->rest_secret_file), v);
            else if (strcmp(k, "rest_socket_mode") == 0) {
                char *end;
                long  m = strtol(v, &end, 8);
                if (end == v || *end != '\0' || m < 0 || m > 0777) {
                    cw_error("%s:%d: rest_socket_mode must be an octal mode such as 0600, not \"%s\"", path, lineno, v);
                    fclose(f);
                    return -1;
                }
                cf->rest_socket_mode = (int) m;
            }
            else if (strcmp(k, "dev_token_secret_file") == 0) set(cf->dev_token_secret_file, sizeof(cf->dev_token_secret_file), v);
            else if ((sp = str_key(cf, k, &slen)) != NULL) set(sp, slen, v);
            else if ((ip = int_key(cf, k)) != NULL) {
                if (parse_int(v, ip) != 0) {
                    cw_error("%s:%d: %s must be an integer, not \"%s\"", path, lineno, k, v);
                    fclose(f);
                    return -1;
                }
            } else {
                cw_error("%s:%d: unknown key \"%s\"", path, lineno, k);
                fclose(f);
                return -1;
            }
        }
        fclose(f);
    }

    if ((env = getenv("REDIS_URL")) && *env) set(cf->redis_url, sizeof(cf->redis_url), env);
    if ((env = getenv("CHAT_REDIS_CLUSTER")) && *env) cluster = strcmp(env, "on") == 0;
    if ((env = getenv("KAFKA_BROKERS")) && *env) set(cf->kafka_brokers, sizeof(cf->kafka_brokers), env);
    if ((env = getenv("MONGO_URI")) && *env) set(cf->mongo_uri, sizeof(cf->mongo_uri), env);
    if ((env = getenv("CHAT_QUEUE")) && *env) set(cf->queue, sizeof(cf->queue), env);
    for (const struct int_env *ie = int_envs; ie->env; ie++) {
        if ((env = getenv(ie->env)) && *env) {
            ip = int_key(cf, ie->key);
            if (parse_int(env, ip) != 0) {
                cw_error("%s must be an integer, not \"%s\"", ie->env, env);
                return -1;
            }
        }
    }
    if (check_range("shards", cf->shards, 1, 4096) || check_range("fanout_workers", cf->fanout_workers, 1, 4096)
        || check_range("fanout_index", cf->fanout_index, 0, cf->fanout_workers - 1)
        || (cf->fanout_lease_ms != 0 && check_range("fanout_lease_ms", cf->fanout_lease_ms, 2000, 600000))
        || check_range("fanout_lease_renew_ms", cf->fanout_lease_renew_ms, 100,
                       cf->fanout_lease_ms ? cf->fanout_lease_ms / 5 : 600000)
        || check_range("inbox_max", cf->inbox_max, 1, 100000000)
        || check_range("retention_days", cf->retention_days, 1, 36500)
        || check_range("delete_window_s", cf->delete_window_s, 1, 315360000)
        || check_range("sweep_batch", cf->sweep_batch, 1, 100000)
        || check_range("sweep_rate", cf->sweep_rate, 1, 1000000)
        || check_range("sweep_day_ms", cf->sweep_day_ms, 1000, 86400000)
        || check_range("sweep_timeout_ms", cf->sweep_timeout_ms, 1000, 3600000)
        || check_range("claim_idle_ms", cf->claim_idle_ms, 100, 86400000)
        || check_range("gather_ms", cf->gather_ms, 0, 1000)
        || check_range("fanout_gather_ms", cf->fanout_gather_ms, 0, 100)
        || check_range("queue_commit_ms", cf->queue_commit_ms, 0, 10000)
        || check_range("persist_window_ms", cf->persist_window_ms, 10, 10000)
        || check_range("persist_state_delay_ms", cf->persist_state_delay_ms, 0, 60000)
        || check_range("batch", cf->batch, 1, 10000)
        || check_range("group_max_members", cf->group_max_members, 1, 100000)
        || check_range("group_push_limit", cf->group_push_limit, 1, 100000)
        || check_range("push_delay_ms", cf->push_delay_ms, 0, 3600000)
        || check_range("push_buckets", cf->push_buckets, 1, 4096)
        || check_range("push_concurrency", cf->push_concurrency, 1, 10000)
        || check_range("push_lease_ms", cf->push_lease_ms, 1000, 3600000)
        || check_range("push_timeout_ms", cf->push_timeout_ms, 100, 600000)
        || check_range("push_ttl", cf->push_ttl, 0, 2419200)
        || check_range("push_max_age_ms", cf->push_max_age_ms, 1000, 2000000000)
        || check_range("redis_replicas", cf->redis_replicas, 0, 16)
        || check_range("redis_wait_ms", cf->redis_wait_ms, 1, 600000))
    {
        return -1;
    }

    /* Redis Cluster: several seed URLs (or redis_cluster = on); every URL
     * must parse, and a cluster has database 0 only */
    {
        int  n = cw_redis_url_count(cf->redis_url), port, db;
        char u[CW_STR], host[256], pw[256];
        const char *s = cf->redis_url;
        if (n < 1) {
            cw_error("redis_url is empty");
            return -1;
        }
        cf->redis_cluster = cluster >= 0 ? cluster : n > 1;
        if (n > 1 && !cf->redis_cluster) {
            cw_error("redis_url lists %d nodes but redis_cluster is off", n);
            return -1;
        }
        for (int i = 0; i < n; i++) {
            size_t l;
            while (*s == ',' || *s == ' ' || *s == '\t') s++;
            l = strcspn(s, ", \t");
            snprintf(u, sizeof(u), "%.*s", (int) (l < sizeof(u) ? l : sizeof(u) - 1), s);
            s += l;
            if (cw_parse_redis_url(u, host, sizeof(host), &port, &db, pw, sizeof(pw)) != 0) {
                cw_error("redis_url: bad url \"%s\"", u);
                return -1;
            }
            if (cf->redis_cluster && db != 0) {
                cw_error("redis_url: a Redis Cluster has database 0 only (\"%s\")", u);
                return -1;
            }
            if (cf->redis_cluster && port == 0) {
                /* nodes announce host:port in CLUSTER SLOTS and redirects */
                cw_error("redis_url: a Redis Cluster is reached over TCP, not a unix socket (\"%s\")", u);
                return -1;
            }
        }
    }
    if (cf->push_lease_ms <= cf->push_timeout_ms) {
        cw_error("push_lease_ms (%d) must be above push_timeout_ms (%d)", cf->push_lease_ms, cf->push_timeout_ms);
        return -1;
    }
    if (strcmp(cf->queue, "redis") != 0 && strcmp(cf->queue, "kafka") != 0) {
        cw_error("queue must be \"redis\" or \"kafka\", not \"%s\"", cf->queue);
        return -1;
    }
    if (cf->node_id[0] == '\0') {
        char host[64] = "host";
        gethostname(host, sizeof(host) - 1);
        snprintf(cf->node_id, sizeof(cf->node_id), "%.40s-%d", host, (int) getpid());
    }
    return 0;
}

int
cw_parse_hostport(const char *s, char *host, size_t hostlen, int *port)
{
    const char *colon = strrchr(s, ':');
    char       *end;
    long        p;

    if (colon == NULL || colon == s || (size_t) (colon - s) >= hostlen) return -1;
    p = strtol(colon + 1, &end, 10);
    if (*end != '\0' || p <= 0 || p > 65535) return -1;
    memcpy(host, s, colon - s);
    host[colon - s] = '\0';
    *port = (int) p;
    return 0;
}

/* redis_url: the module's parser (libchat/chat_url.c), so that nginx and
 * the workers accept the same URLs */
int
cw_parse_redis_url(const char *url, char *host, size_t hostlen, int *port,
    int *db, char *password, size_t pwlen)
{
    chat_redis_url_t u;

    if (chat_redis_url_parse(url, strlen(url), &u) != 0) return -1;
    if (strlen(u.host) >= hostlen || strlen(u.password) >= (pwlen ? pwlen : 1)) return -1;
    strcpy(host, u.host);
    if (pwlen) strcpy(password, u.password);
    *port = u.port;
    *db = u.db;
    return 0;
}
