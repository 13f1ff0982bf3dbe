/*
 * The workers' Redis client (hiredis, synchronous): one node, or a Redis
 * Cluster given several seed nodes (workers/README.md, "Redis Cluster").
 *
 * The interface mirrors hiredis' (command, append, get reply) so that every
 * role pipelines as it does on one node: commands are appended in the
 * caller's order and their replies come back in that order, whatever node
 * each went to.
 *
 * Single node (redis_cluster off): a thin layer over one redisContext; no
 * CLUSTER command is ever sent.
 *
 * Cluster: the slot map comes from CLUSTER SLOTS of the first seed that
 * answers (libchat/chat_cluster); one connection per master, opened when a
 * command first goes there (and then the scripts of lua/ are loaded on it);
 * each command goes to the master of the slot of its first key
 * (workers/route.c). A pipeline's commands are written to every node before
 * the first reply is read, so a batch costs one round trip per node, in
 * parallel. A command is kept until its reply is read: MOVED updates the map
 * and sends it again to the new owner, ASK sends ASKING and the command to the
 * importing node once, TRYAGAIN (a multi-key command during a migration)
 * retries after a pause. Replies another node owes for commands behind the
 * redirected one are read first and kept (per node, in order), so the
 * caller still gets replies in its order. A transaction (MULTI ... EXEC)
 * goes to the node of its first key and is not redirected (its keys share
 * one hash tag; a moved slot fails it once, with the map updated). A
 * connection error fails the client: the role drops it and connects again,
 * which takes a fresh slot map (a failover shows up as a connection error
 * on the dead master).
 */
#include "chat_worker.h"
#include "chat_cluster.h"
#include "route.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CW_NODES       CHAT_CLUSTER_MAX_NODES
#define CW_REDIRECTS   8            /* MOVED/ASK/TRYAGAIN per command before giving up */
#define CW_SEEDS       16

typedef struct {
    redisReply **r;
    int          head, n, cap;
} stash_t;

typedef struct {
    int     node;
    char   *cmd;                    /* cluster: the command, for a redirect (NULL: none) */
    size_t  len;
} pend_t;

struct cw_redis_s {
    int                 cluster;
    int                 spublish;   /* sharded pub/sub: SPUBLISH instead of PUBLISH */
    int                 err;
    char                errstr[256];
    int                 timeout_ms;
    char                password[256];

    redisContext       *node[CW_NODES];   /* single node: node[0] */
    int                 unread[CW_NODES]; /* replies owed on the wire */
    stash_t             stash[CW_NODES];  /* replies read ahead of their turn */
    chat_cluster_map_t  map;

    pend_t             *pend;             /* commands whose reply the caller has not taken */
    int                 phead, pn, pcap;
    int                 flush;            /* appended since the last write-out */

    unsigned char       used[CW_NODES];   /* sent something since the last cw_redis_wait */
    int                 multi;            /* 1: MULTI held back, 2: in a transaction */
    int                 multi_node;
    uint64_t            redirects;
};

/* Seeds learned from the last slot map (masters), tried after the
 * configured ones when connecting again; shared by the clients of every
 * thread (persist's sweeper has its own), hence the lock. */
static chat_cluster_node_t learned[CW_SEEDS];
static int                 nlearned;
static pthread_mutex_t     learned_lock = PTHREAD_MUTEX_INITIALIZER;


static void
fail(cw_redis_t *c, const char *fmt, ...)
{
    va_list ap;

    if (c->err) return;
    c->err = 1;
    va_start(ap, fmt);
    vsnprintf(c->errstr, sizeof(c->errstr), fmt, ap);
    va_end(ap);
}

int
cw_redis_err(const cw_redis_t *c)
{
    return c->err;
}

const char *
cw_redis_errstr(const cw_redis_t *c)
{
    return c->err ? c->errstr : "unexpected reply";
}

int
cw_redis_is_cluster(const cw_redis_t *c)
{
    return c->cluster;
}

const char *
cw_redis_publish_cmd(const cw_redis_t *c)
{
    return c->spublish ? "SPUBLISH" : "PUBLISH";
}

uint64_t
cw_redis_redirects(const cw_redis_t *c)
{
    return c->redirects;
}

/* A connection to host:port (port 0: host is a unix socket's path) with
 * the timeout and AUTH; NULL and err set. */
static redisContext *
dial(const char *host, int port, int timeout_ms, const char *password, char *err, size_t errlen)
{
    struct timeval  tv = { timeout_ms / 1000, (timeout_ms % 1000) * 1000 };
    redisContext   *x = port == 0 ? redisConnectUnixWithTimeout(host, tv) : redisConnectWithTimeout(host, port, tv);
    redisReply     *r;

    if (x == NULL || x->err) {
        snprintf(err, errlen, "connect %s:%d: %s", host, port, x ? x->errstr : "out of memory");
        if (x) redisFree(x);
        return NULL;
    }
    redisSetTimeout(x, tv);
    if (password[0]) {
        r = redisCommand(x, "AUTH %s", password);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "AUTH %s:%d failed: %s", host, port, r ? r->str : x->errstr);
            if (r) freeReplyObject(r);
            redisFree(x);
            return NULL;
        }
        freeReplyObject(r);
    }
    return x;
}

/* The connection to node i of the map (opened, with the scripts loaded, on
 * first use); -1 and the client failed when it cannot be had. */
static int
node_up(cw_redis_t *c, int i)
{
    char err[300];

    if (i < 0 || i >= (int) c->map.nnodes) {
        fail(c, "no node for a slot (cluster map incomplete)");
        return -1;
    }
    if (c->node[i]) return 0;
    c->node[i] = dial(c->map.node[i].host, c->map.node[i].port, c->timeout_ms, c->password, err, sizeof(err));
    if (c->node[i] == NULL) {
        fail(c, "%s", err);
        return -1;
    }
    c->unread[i] = 0;
    if (cw_lua_load_ctx(c->node[i]) != 0) {
        fail(c, "SCRIPT LOAD on %s:%d failed", c->map.node[i].host, c->map.node[i].port);
        return -1;
    }
    return 0;
}

static int
stash_push(stash_t *s, redisReply *r)
{
    if (s->head + s->n == s->cap) {
        if (s->head > 0) {
            memmove(s->r, s->r + s->head, sizeof(redisReply *) * (size_t) s->n);
            s->head = 0;
        } else {
            int          cap = s->cap ? s->cap * 2 : 64;
            redisReply **nr = realloc(s->r, sizeof(redisReply *) * (size_t) cap);
            if (nr == NULL) return -1;
            s->r = nr;
            s->cap = cap;
        }
    }
    s->r[s->head + s->n++] = r;
    return 0;
}

/* The next reply node i owes us (read ahead earlier, or from the wire). */
static redisReply *
take(cw_redis_t *c, int i)
{
    stash_t    *s = &c->stash[i];
    redisReply *r = NULL;

    if (s->n > 0) {
        r = s->r[s->head++];
        if (--s->n == 0) s->head = 0;
        return r;
    }
    if (c->node[i] == NULL || redisGetReply(c->node[i], (void **) &r) != REDIS_OK || r == NULL) {
        fail(c, "%s:%d: %s", c->map.node[i].host, c->map.node[i].port,
             c->node[i] && c->node[i]->err ? c->node[i]->errstr : "connection lost");
        return NULL;
    }
    c->unread[i]--;
    return r;
}

/* Sends cmd to node i now (ASKING first when asking) and returns its
 * reply; what node i owed before is read and kept first. */
static redisReply *
run_on(cw_redis_t *c, int i, const char *cmd, size_t len, int asking)
{
    static const char asking_cmd[] = "*1\r\n$6\r\nASKING\r\n";
    redisReply       *r;

    if (node_up(c, i) != 0) return NULL;
    while (c->unread[i] > 0) {
        if (redisGetReply(c->node[i], (void **) &r) != REDIS_OK || r == NULL) {
            fail(c, "%s:%d: %s", c->map.node[i].host, c->map.node[i].port, c->node[i]->errstr);
            return NULL;
        }
        c->unread[i]--;
        if (stash_push(&c->stash[i], r) != 0) {
            freeReplyObject(r);
            fail(c, "out of memory");
            return NULL;
        }
    }
    if (asking) redisAppendFormattedCommand(c->node[i], asking_cmd, sizeof(asking_cmd) - 1);
    redisAppendFormattedCommand(c->node[i], cmd, len);
    c->used[i] = 1;
    if (asking) {
        if (redisGetReply(c->node[i], (void **) &r) != REDIS_OK || r == NULL) {
            fail(c, "%s:%d: %s", c->map.node[i].host, c->map.node[i].port, c->node[i]->errstr);
            return NULL;
        }
        freeReplyObject(r);
    }
    if (redisGetReply(c->node[i], (void **) &r) != REDIS_OK || r == NULL) {
        fail(c, "%s:%d: %s", c->map.node[i].host, c->map.node[i].port, c->node[i]->errstr);
        return NULL;
    }
    return r;
}

/* The node a command goes to (cluster), or -1 when held back (MULTI);
 * *keep: kept for a redirect. */
static int
route(cw_redis_t *c, const char *cmd, size_t len, int *keep)
{
    unsigned    slot = 0;
    cw_route_t  how = cw_route(cmd, len, &slot);
    int         i;

    *keep = 0;
    if (c->multi == 2) {
        if (how == CW_ROUTE_EXEC) c->multi = 0;
        return c->multi_node;
    }
    if (how == CW_ROUTE_MULTI) return -1;
    if (how == CW_ROUTE_SLOT) {
        i = chat_cluster_map_node(&c->map, slot);
        *keep = c->multi == 0;
    } else {
        i = 0;
        /* any node will do: one already connected */
        for (int j = 0; j < (int) c->map.nnodes; j++) {
            if (c->node[j]) { i = j; break; }
        }
    }
    if (i < 0) i = 0;             /* unassigned slot: the node answers MOVED or CLUSTERDOWN */
    return i;
}

static int
pend_push(cw_redis_t *c, int node, char *cmd, size_t len)
{
    if (c->phead + c->pn == c->pcap) {
        if (c->phead > 0) {
            memmove(c->pend, c->pend + c->phead, sizeof(pend_t) * (size_t) c->pn);
            c->phead = 0;
        } else {
            int     cap = c->pcap ? c->pcap * 2 : 256;
            pend_t *np = realloc(c->pend, sizeof(pend_t) * (size_t) cap);
            if (np == NULL) return -1;
            c->pend = np;
            c->pcap = cap;
        }
    }
    c->pend[c->phead + c->pn].node = node;
    c->pend[c->phead + c->pn].cmd = cmd;
    c->pend[c->phead + c->pn].len = len;
    c->pn++;
    return 0;
}

/* Appends a formatted command; takes cmd (freed here or with its reply). */
static int
append_formatted(cw_redis_t *c, char *cmd, size_t len)
{
    static const char multi_cmd[] = "*1\r\n$5\r\nMULTI\r\n";
    int               keep, i;

    if (!c->cluster) {
        int rc = redisAppendFormattedCommand(c->node[0], cmd, len);
        free(cmd);
        c->used[0] = 1;
        return rc;
    }
    if (c->err) {
        free(cmd);
        return REDIS_ERR;
    }
    i = route(c, cmd, len, &keep);
    if (i < 0) {                         /* MULTI: sent with the transaction's first command */
        free(cmd);
        c->multi = 1;
        return REDIS_OK;
    }
    if (node_up(c, i) != 0) {
        free(cmd);
        return REDIS_ERR;
    }
    if (c->multi == 1) {
        redisAppendFormattedCommand(c->node[i], multi_cmd, sizeof(multi_cmd) - 1);
        c->unread[i]++;
        if (pend_push(c, i, NULL, 0) != 0) { free(cmd); fail(c, "out of memory"); return REDIS_ERR; }
        c->multi = 2;
        c->multi_node = i;
        keep = 0;
    }
    redisAppendFormattedCommand(c->node[i], cmd, len);
    c->unread[i]++;
    c->used[i] = 1;
    if (pend_push(c, i, keep ? cmd : NULL, len) != 0) {
        free(cmd);
        fail(c, "out of memory");
        return REDIS_ERR;
    }
    if (!keep) free(cmd);
    c->flush = 1;
    return REDIS_OK;
}

/* Writes every node's pipeline out before the first reply is read: the
 * nodes work in parallel. */
static int
write_out(cw_redis_t *c)
{
    for (int i = 0; i < (int) c->map.nnodes; i++) {
        int done = 0;
        if (c->node[i] == NULL || c->unread[i] == 0) continue;
        while (!done) {
            if (redisBufferWrite(c->node[i], &done) != REDIS_OK) {
                fail(c, "%s:%d: %s", c->map.node[i].host, c->map.node[i].port, c->node[i]->errstr);
                return -1;
            }
        }
    }
    c->flush = 0;
    return 0;
}

/* The reply of cmd after a redirect or TRYAGAIN error r (freed here):
 * another reply, or NULL when the client failed. */
static redisReply *
redirect(cw_redis_t *c, int node, const char *cmd, size_t len, redisReply *r)
{
    for (int tries = 0; r && r->type == REDIS_REPLY_ERROR && tries < CW_REDIRECTS; tries++) {
        chat_redirect_t to;
        int             i;

        if (strncmp(r->str, "TRYAGAIN", 8) == 0) {
            /* a multi-key command while its slot migrates: soon done */
            freeReplyObject(r);
            cw_sleep_ms(20 << (tries < 4 ? tries : 4));
            r = run_on(c, node, cmd, len, 0);
            continue;
        }
        if (chat_cluster_parse_redirect(r->str, r->len, &to) != 0) break;
        if (to.host[0] == '\0' && node >= 0 && node < (int) c->map.nnodes)
            snprintf(to.host, sizeof(to.host), "%s", c->map.node[node].host);
        c->redirects++;
        freeReplyObject(r);
        if (to.kind == CHAT_REDIRECT_MOVED) {
            i = chat_cluster_map_move(&c->map, to.slot, to.host, to.port);
            cw_info("redis: slot %u moved to %s:%d", to.slot, to.host, to.port);
            if (i < 0) { fail(c, "cluster map full"); return NULL; }
            node = i;
            r = run_on(c, i, cmd, len, 0);
        } else {
            /* ASK: this command only, once, on the importing node */
            i = chat_cluster_map_find(&c->map, to.host, to.port);
            if (i >= 0) {
                r = run_on(c, i, cmd, len, 1);
            } else {
                char          err[300];
                redisContext *x = dial(to.host, to.port, c->timeout_ms, c->password, err, sizeof(err));
                if (x == NULL) { fail(c, "%s", err); return NULL; }
                r = NULL;
                if (cw_lua_load_ctx(x) == 0) {
                    redisAppendFormattedCommand(x, "*1\r\n$6\r\nASKING\r\n", 16);
                    redisAppendFormattedCommand(x, cmd, len);
                    if (redisGetReply(x, (void **) &r) == REDIS_OK && r) {
                        freeReplyObject(r);
                        r = NULL;
                        if (redisGetReply(x, (void **) &r) != REDIS_OK) r = NULL;
                    }
                }
                redisFree(x);
                if (r == NULL) { fail(c, "ASK %s:%d failed", to.host, to.port); return NULL; }
            }
            break;
        }
    }
    return r;
}

int
cw_redis_get_reply(cw_redis_t *c, redisReply **reply)
{
    pend_t      p;
    redisReply *r;

    *reply = NULL;
    if (!c->cluster) {
        if (redisGetReply(c->node[0], (void **) reply) != REDIS_OK || *reply == NULL) {
            fail(c, "%s", c->node[0]->errstr[0] ? c->node[0]->errstr : "connection lost");
            return REDIS_ERR;
        }
        return REDIS_OK;
    }
    if (c->err) return REDIS_ERR;
    if (c->pn == 0) {
        fail(c, "no reply pending");
        return REDIS_ERR;
    }
    if (c->flush && write_out(c) != 0) return REDIS_ERR;
    p = c->pend[c->phead];
    r = take(c, p.node);
    if (r && r->type == REDIS_REPLY_ERROR && p.cmd) r = redirect(c, p.node, p.cmd, p.len, r);
    free(p.cmd);
    c->phead++;
    if (--c->pn == 0) c->phead = 0;
    if (r == NULL) return REDIS_ERR;
    *reply = r;
    return REDIS_OK;
}

int
cw_redis_append(cw_redis_t *c, const char *fmt, ...)
{
    va_list ap;
    char   *cmd;
    int     len;

    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if (len < 0) {
        fail(c, "out of memory");
        return REDIS_ERR;
    }
    return append_formatted(c, cmd, (size_t) len);
}

int
cw_redis_append_argv(cw_redis_t *c, int argc, const char **argv, const size_t *lens)
{
    char *cmd;
    int   len = redisFormatCommandArgv(&cmd, argc, argv, lens);

    if (len < 0) {
        fail(c, "out of memory");
        return REDIS_ERR;
    }
    return append_formatted(c, cmd, (size_t) len);
}

redisReply *
cw_redis_command(cw_redis_t *c, const char *fmt, ...)
{
    va_list     ap;
    char       *cmd;
    int         len;
    redisReply *r;

    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if (len < 0) {
        fail(c, "out of memory");
        return NULL;
    }
    if (append_formatted(c, cmd, (size_t) len) != REDIS_OK) return NULL;
    return cw_redis_get_reply(c, &r) == REDIS_OK ? r : NULL;
}

redisReply *
cw_redis_command_argv(cw_redis_t *c, int argc, const char **argv, const size_t *lens)
{
    redisReply *r;

    if (cw_redis_append_argv(c, argc, argv, lens) != REDIS_OK) return NULL;
    return cw_redis_get_reply(c, &r) == REDIS_OK ? r : NULL;
}

/* WAIT n timeout_ms on every node this client sent commands to since the
 * last call, in parallel (nothing may be pending): the fewest replicas
 * that acknowledged, or -1 when the client failed. Redirected commands
 * count for the node that answered them (run_on marks it). */
int
cw_redis_wait(cw_redis_t *c, int n, int timeout_ms)
{
    static const char *fmt = "WAIT %d %d";
    int                least = INT32_MAX, sent[CW_NODES], ns = 0;

    if (c->err) return -1;
    for (int i = 0; i < CW_NODES; i++) {
        if (!c->used[i] || c->node[i] == NULL) continue;
        if (c->unread[i] > 0 || c->stash[i].n > 0) {
            fail(c, "WAIT with replies pending");
            return -1;
        }
        redisAppendCommand(c->node[i], fmt, n, timeout_ms);
        sent[ns++] = i;
    }
    for (int k = 0; k < ns; k++) {
        int i = sent[k], done = 0;
        while (!done) {
            if (redisBufferWrite(c->node[i], &done) != REDIS_OK) {
                fail(c, "%s:%d: %s", c->map.node[i].host, c->map.node[i].port, c->node[i]->errstr);
                return -1;
            }
        }
    }
    for (int k = 0; k < ns; k++) {
        redisReply *r = NULL;
        int         i = sent[k];
        if (redisGetReply(c->node[i], (void **) &r) != REDIS_OK || r == NULL) {
            fail(c, "%s:%d: %s", c->map.node[i].host, c->map.node[i].port, c->node[i]->errstr);
            return -1;
        }
        if (r->type == REDIS_REPLY_INTEGER && r->integer < least) least = (int) r->integer;
        else if (r->type != REDIS_REPLY_INTEGER) least = 0;
        freeReplyObject(r);
        c->used[i] = 0;
    }
    return least == INT32_MAX ? n : least;
}

/* SCRIPT LOAD of lua/ on every node (cluster: every master, connecting
 * them). Called between batches, with nothing pending. */
int
cw_lua_load(cw_redis_t *c)
{
    if (!c->cluster) return cw_lua_load_ctx(c->node[0]);
    for (int i = 0; i < (int) c->map.nnodes; i++) {
        if (c->node[i] == NULL) {
            if (node_up(c, i) != 0) return -1;        /* loads them */
        } else if (c->unread[i] == 0 && c->stash[i].n == 0 && cw_lua_load_ctx(c->node[i]) != 0) {
            return -1;
        }
    }
    return 0;
}

void
cw_redis_free(cw_redis_t *c)
{
    if (c == NULL) return;
    for (int i = 0; i < CW_NODES; i++) {
        if (c->node[i]) redisFree(c->node[i]);
        for (int k = 0; k < c->stash[i].n; k++) freeReplyObject(c->stash[i].r[c->stash[i].head + k]);
        free(c->stash[i].r);
    }
    for (int k = 0; k < c->pn; k++) free(c->pend[c->phead + k].cmd);
    free(c->pend);
    free(c);
}

/* The next URL of a comma-separated list into buf; NULL at the end. */
static const char *
next_url(const char *s, char *buf, size_t len)
{
    size_t n;

    while (*s == ',' || *s == ' ' || *s == '\t') s++;
    if (*s == '\0') return NULL;
    n = strcspn(s, ", \t");
    if (n >= len) n = len - 1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return s + strcspn(s, ", \t");
}

int
cw_redis_url_count(const char *list)
{
    char        u[CW_STR];
    const char *s = list;
    int         n = 0;

    while ((s = next_url(s, u, sizeof(u))) != NULL) n++;
    return n;
}

/* Cluster: the slot map from the first node of the seeds (then of the
 * masters last seen) that answers CLUSTER SLOTS. */
static int
cluster_connect(cw_redis_t *c, const cw_config_t *cf, char *err, size_t errlen)
{
    chat_cluster_node_t seeds[CW_SEEDS * 2];
    int                 nseeds = 0;
    char                u[CW_STR], host[256], pw[256];
    const char         *s = cf->redis_url;
    int                 port, db;

    while ((s = next_url(s, u, sizeof(u))) != NULL && nseeds < CW_SEEDS) {
        if (cw_parse_redis_url(u, host, sizeof(host), &port, &db, pw, sizeof(pw)) != 0) {
            snprintf(err, errlen, "bad redis url \"%s\"", u);
            return -1;
        }
        if (nseeds == 0) snprintf(c->password, sizeof(c->password), "%s", pw);
        snprintf(seeds[nseeds].host, sizeof(seeds[nseeds].host), "%s", host);
        seeds[nseeds++].port = port;
    }
    pthread_mutex_lock(&learned_lock);
    for (int i = 0; i < nlearned && nseeds < (int) (sizeof(seeds) / sizeof(seeds[0])); i++) seeds[nseeds++] = learned[i];
    pthread_mutex_unlock(&learned_lock);
    snprintf(err, errlen, "no seed node");
    for (int k = 0; k < nseeds; k++) {
        redisContext *x = dial(seeds[k].host, seeds[k].port, c->timeout_ms, c->password, err, errlen);
        redisReply   *r;
        int           ok, i;

        if (x == NULL) continue;
        r = redisCommand(x, "CLUSTER SLOTS");
        ok = r && chat_cluster_map_from_slots(&c->map, r) == 0 && c->map.nnodes > 0;
        if (!ok) {
            snprintf(err, errlen, "CLUSTER SLOTS from %s:%d: %s", seeds[k].host, seeds[k].port,
                     r == NULL ? x->errstr : r->type == REDIS_REPLY_ERROR ? r->str : "malformed reply");
        }
        if (r) freeReplyObject(r);
        if (!ok) {
            redisFree(x);
            continue;
        }
        for (unsigned j = 0; j < c->map.nnodes; j++) {
            /* a node that does not know its address: the one we asked */
            if (c->map.node[j].host[0] == '\0')
                memcpy(c->map.node[j].host, seeds[k].host, sizeof(c->map.node[j].host));
        }
        pthread_mutex_lock(&learned_lock);
        nlearned = 0;
        for (unsigned j = 0; j < c->map.nnodes && nlearned < CW_SEEDS; j++) learned[nlearned++] = c->map.node[j];
        pthread_mutex_unlock(&learned_lock);
        cw_info("redis cluster map from %s:%d: %u masters, %u of %d slots owned", seeds[k].host, seeds[k].port,
                c->map.nnodes, chat_cluster_map_covered(&c->map), CHAT_CLUSTER_SLOTS);
        /* keep the seed's connection when it is a master */
        i = chat_cluster_map_find(&c->map, seeds[k].host, seeds[k].port);
        if (i >= 0 && cw_lua_load_ctx(x) == 0) c->node[i] = x;
        else redisFree(x);
        return 0;
    }
    return -1;
}

cw_redis_t *
cw_redis_connect(const cw_config_t *cf, int timeout_ms, char *err, size_t errlen)
{
    cw_redis_t *c = calloc(1, sizeof(*c));
    char        u[CW_STR], host[256];
    int         port, db;

    if (c == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->timeout_ms = timeout_ms;
    c->cluster = cf->redis_cluster;
    c->spublish = cf->redis_cluster;      /* as the module: a cluster's pub/sub is sharded */
    if (c->cluster) {
        if (cluster_connect(c, cf, err, errlen) != 0) {
            cw_redis_free(c);
            return NULL;
        }
        return c;
    }
    if (next_url(cf->redis_url, u, sizeof(u)) == NULL
        || cw_parse_redis_url(u, host, sizeof(host), &port, &db, c->password, sizeof(c->password)) != 0)
    {
        snprintf(err, errlen, "bad redis url \"%s\"", cf->redis_url);
        cw_redis_free(c);
        return NULL;
    }
    c->node[0] = dial(host, port, timeout_ms, c->password, err, errlen);
    if (c->node[0] == NULL) {
        cw_redis_free(c);
        return NULL;
    }
    if (db) {
        redisReply *r = redisCommand(c->node[0], "SELECT %d", db);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "SELECT failed");
            if (r) freeReplyObject(r);
            cw_redis_free(c);
            return NULL;
        }
        freeReplyObject(r);
    }
    snprintf(c->map.node[0].host, sizeof(c->map.node[0].host), "%s", host);
    c->map.node[0].port = port;
    c->map.nnodes = 1;
    return c;
}

/* A connection of its own to the master of key's slot (the queue's
 * blocking reads, workers/queue.c); NULL and the client failed. */
redisContext *
cw_redis_dial_for(cw_redis_t *c, const char *key, size_t klen)
{
    int           i = chat_cluster_map_node(&c->map, chat_cluster_slot(key, klen));
    char          err[300];
    redisContext *x;

    if (i < 0) {
        fail(c, "no node for slot %u", chat_cluster_slot(key, klen));
        return NULL;
    }
    x = dial(c->map.node[i].host, c->map.node[i].port, c->timeout_ms, c->password, err, sizeof(err));
    if (x == NULL) fail(c, "%s", err);
    return x;
}

/* A redirect seen on a connection of cw_redis_dial_for: the map learns it. */
void
cw_redis_note(cw_redis_t *c, const redisReply *r)
{
    chat_redirect_t to;

    if (!c->cluster || r == NULL || r->type != REDIS_REPLY_ERROR) return;
    if (chat_cluster_parse_redirect(r->str, r->len, &to) == 0 && to.kind == CHAT_REDIRECT_MOVED && to.host[0]) {
        c->redirects++;
        cw_info("redis: slot %u moved to %s:%d", to.slot, to.host, to.port);
        chat_cluster_map_move(&c->map, to.slot, to.host, to.port);
    }
}
