/*
 * Redis inside nginx's event loop: hiredis' async API on an adapter that
 * wraps the hiredis socket in an ngx_connection_t and drives it with nginx
 * events (level-triggered, because hiredis reads one buffer per call).
 *
 * Per worker process two links: "cmd" for commands and scripts, "sub" for
 * pub/sub (the worker's own delivery channel and the presence channels of
 * users watched from this worker). Each link reconnects by itself with
 * exponential backoff; while a link is down, commands fail at once (callers
 * answer `unavailable`) instead of queueing without bound. A link whose
 * replies stop coming is dropped by a watchdog so that callers are answered.
 *
 * With chat_redis_cluster on, the same links exist once per master of a
 * Redis Cluster (node[] below): a slot map (libchat/chat_cluster.c) from
 * CLUSTER SLOTS of any node routes each command by the slot of its first
 * key; MOVED updates the map and resends, ASK resends once after ASKING,
 * TRYAGAIN/CLUSTERDOWN resend after a short delay, always with the same
 * callback, so a request is answered exactly once. The map is refreshed on
 * a schedule, after a link loss and after a redirect. Pub/sub is sharded
 * (SSUBSCRIBE on the master owning the channel's slot, on a plain
 * non-blocking hiredis context: hiredis 0.14's async layer does not know
 * the sharded replies), every channel subscribed again when the map
 * changes or a node's link is back.
 */
#include "ngx_chat.h"
#include "chat_url.h"
#include "chat_cluster.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <openssl/sha.h>
#include <poll.h>


#define NGX_CHAT_REDIS_BACKOFF_MIN   100
#define NGX_CHAT_REDIS_BACKOFF_MAX   5000
#define NGX_CHAT_REDIS_STALL         5000    /* ms without a reply */
#define NGX_CHAT_REDIS_MAX_PENDING   65536   /* commands awaiting replies */
#define NGX_CHAT_REDIS_MAX_SEEDS     16
#define NGX_CHAT_REDIS_REDIRECTS     16      /* MOVED/ASK/TRYAGAIN per request */
#define NGX_CHAT_REDIS_REFRESH       10000   /* ms: slot map refresh, healthy */
#define NGX_CHAT_REDIS_REFRESH_FAST  250     /* ms: ... while not */
#define NGX_CHAT_REDIS_MAX_HELD      65536   /* accepts awaiting WAIT, a link */


typedef struct ngx_chat_redis_node_s  ngx_chat_redis_node_t;

typedef struct {
    redisAsyncContext      *ac;
    ngx_connection_t       *conn;
    ngx_event_t             reconnect;
    ngx_msec_t              backoff;
    ngx_msec_t              last_reply;
    ngx_uint_t              pending;
    ngx_uint_t              loading;      /* script loads awaiting replies */
    ngx_chat_redis_node_t  *node;
    ngx_queue_t             held;         /* durable replies: next WAIT */
    ngx_queue_t             waited;       /* ... the WAIT in flight's */
    ngx_uint_t              nheld;
    ngx_event_t             wait_ev;      /* posted: WAIT after this turn */
    unsigned                ready:1;
    unsigned                sub:1;
    unsigned                connected:1;
    unsigned                waiting:1;    /* a WAIT in flight */
} ngx_chat_redis_link_t;


/* a cluster node's sharded pub/sub link, read by this file */
typedef struct {
    redisContext           *rc;
    ngx_connection_t       *conn;
    ngx_event_t             reconnect;
    ngx_msec_t              backoff;
    unsigned                connected:1;
} ngx_chat_redis_slink_t;


struct ngx_chat_redis_node_s {
    ngx_chat_redis_link_t   cmd;
    ngx_chat_redis_link_t   sub;          /* single node only */
    ngx_chat_redis_slink_t  ssub;         /* cluster only */
    char                    host[256];
    int                     port;
    unsigned                used:1;
    unsigned                seed:1;
    unsigned                mapped:1;     /* a master of the current map */
};


typedef struct {
    ngx_chat_redis_cb   cb;
    void               *data;
    ngx_uint_t          durable;
} ngx_chat_redis_req_t;


/* a durable command's reply (a copy: hiredis frees its own), held for WAIT */
typedef struct {
    ngx_queue_t         queue;
    ngx_chat_redis_cb   cb;
    void               *data;
    redisReply         *reply;
} ngx_chat_redis_held_t;


/* node[0] is the single node (or the first seed of a cluster) */
static ngx_chat_redis_node_t  ngx_chat_nodes[CHAT_CLUSTER_MAX_NODES];
static ngx_uint_t             ngx_chat_nnodes;
#define ngx_chat_cmd  (ngx_chat_nodes[0].cmd)
#define ngx_chat_sub  (ngx_chat_nodes[0].sub)

static ngx_event_t            ngx_chat_watchdog;
static ngx_connection_t       ngx_chat_watchdog_conn;
static ngx_uint_t             ngx_chat_counted;   /* in the redis_up gauge */

static int      ngx_chat_redis_db;
static int      ngx_chat_redis_replicas;     /* chat_redis_replicas */
static int      ngx_chat_redis_wait_ms;      /* chat_redis_wait_timeout */
static u_char   ngx_chat_redis_pass[256];

/* cluster state */
static ngx_uint_t              ngx_chat_sharded;
static chat_cluster_map_t      ngx_chat_map, ngx_chat_map_new;
static ngx_chat_redis_node_t  *ngx_chat_map_node[CHAT_CLUSTER_MAX_NODES];
static ngx_uint_t              ngx_chat_map_ok;       /* every slot owned */
static ngx_uint_t              ngx_chat_refreshing;   /* CLUSTER SLOTS sent */
static ngx_uint_t              ngx_chat_resub;        /* resubscribe at the next map */
static ngx_event_t             ngx_chat_refresh_ev;
static ngx_chat_redis_node_t  *ngx_chat_wch_node;     /* holds our channel */

static u_char   ngx_chat_channel_buf[128];
ngx_str_t       ngx_chat_worker_channel;


/*
 * The Redis scripts are lua/<name>.lua (each with a header naming its KEYS,
 * ARGV, result and the guarantee it implements); the build generates their
 * table chat_lua[] (lua/gen.sh). Every key a script touches carries one
 * hash tag and is passed in KEYS, so each runs on one slot of a Redis
 * Cluster. This side loads them all at connect and after NOSCRIPT.
 */
static u_char  ngx_chat_script_sha[CHAT_LUA_N][SHA_DIGEST_LENGTH * 2 + 1];


static void ngx_chat_redis_connect(ngx_chat_redis_link_t *link);
static void ngx_chat_redis_on_connect(const redisAsyncContext *ac, int status);
static void ngx_chat_redis_on_disconnect(const redisAsyncContext *ac,
    int status);
static void ngx_chat_redis_sub_cb(redisAsyncContext *ac, void *reply,
    void *data);
static void ngx_chat_redis_update_up(void);
static void ngx_chat_redis_load_scripts(ngx_chat_redis_link_t *link);
static void ngx_chat_redis_refresh_soon(ngx_msec_t delay);
static void ngx_chat_redis_refresh_send(void);
static void ngx_chat_redis_ssub_connect(ngx_chat_redis_node_t *n);
static void ngx_chat_redis_ssub_close(ngx_chat_redis_node_t *n);
static void ngx_chat_redis_resubscribe_all(void);
static void ngx_chat_redis_dispatch(redisReply *ch, redisReply *payload);
static void ngx_chat_redis_wait_handler(ngx_event_t *ev);
static void ngx_chat_redis_hold(ngx_chat_redis_link_t *link,
    ngx_chat_redis_cb cb, void *data, redisReply *reply);
static void ngx_chat_redis_fail_held(ngx_chat_redis_link_t *link);
static ngx_int_t ngx_chat_redis_ssubscribe(u_char *ch, size_t len,
    ngx_uint_t on);


/*
 * What pub/sub brings is handed to the handler registered for its channel
 * (an exact name, or a prefix): the adapter knows no session or feature.
 * Handlers register at process start (ngx_chat_redis_on_channel), the
 * resubscribe callbacks run each time the pub/sub link is back.
 */
#define NGX_CHAT_REDIS_HANDLERS  8

typedef struct {
    ngx_str_t                     name;
    ngx_uint_t                    prefix;
    ngx_chat_redis_msg_handler    handler;
} ngx_chat_redis_channel_t;

static ngx_chat_redis_channel_t  ngx_chat_channels[NGX_CHAT_REDIS_HANDLERS];
static ngx_uint_t                ngx_chat_nchannels;
static void                    (*ngx_chat_resubscribe[NGX_CHAT_REDIS_HANDLERS])(void);
static ngx_uint_t                ngx_chat_nresubscribe;


static ngx_chat_redis_link_t *
ngx_chat_redis_link(const redisAsyncContext *ac)
{
    ngx_uint_t  i;

    if (ac == NULL) {
        return NULL;
    }

    for (i = 0; i < ngx_chat_nnodes; i++) {
        if (ngx_chat_nodes[i].cmd.ac == ac) {
            return &ngx_chat_nodes[i].cmd;
        }

        if (ngx_chat_nodes[i].sub.ac == ac) {
            return &ngx_chat_nodes[i].sub;
        }
    }

    return NULL;
}


/* everything a worker process needs to serve: single node, both links;
 * cluster, a map owning every slot, every master's command link and our
 * delivery channel subscribed */
static ngx_uint_t
ngx_chat_redis_ready_all(void)
{
    ngx_uint_t  i;

    if (!ngx_chat_sharded) {
        return ngx_chat_cmd.ready && ngx_chat_sub.ready;
    }

    if (!ngx_chat_map_ok || ngx_chat_wch_node == NULL) {
        return 0;
    }

    for (i = 0; i < ngx_chat_map.nnodes; i++) {
        if (ngx_chat_map_node[i] == NULL || !ngx_chat_map_node[i]->cmd.ready) {
            return 0;
        }
    }

    return 1;
}


static void
ngx_chat_redis_update_up(void)
{
    if (ngx_chat_redis_ready_all()) {
        if (!ngx_chat_counted) {
            ngx_chat_counted = 1;
            ngx_chat_stat_inc(redis_up);
            ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                          "chat: redis %s%s:%d connected, channel \"%V\"",
                          ngx_chat_sharded ? "cluster via " : "",
                          ngx_chat_nodes[0].host, ngx_chat_nodes[0].port,
                          &ngx_chat_worker_channel);
        }

    } else if (ngx_chat_counted) {
        ngx_chat_counted = 0;
        ngx_chat_stat_dec(redis_up);
    }
}


static void
ngx_chat_redis_set_ready(ngx_chat_redis_link_t *link, ngx_uint_t ready)
{
    if (link->ready != (ready ? 1 : 0)) {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: redis %s link %s", link->sub ? "pub/sub" : "command",
                       ready ? "ready" : "not ready");
    }

    link->ready = ready ? 1 : 0;

    ngx_chat_redis_update_up();
}


/* --- the adapter: hiredis asks, nginx's event loop does ----------------- */

static void
ngx_chat_redis_read_handler(ngx_event_t *ev)
{
    ngx_connection_t       *c = ev->data;
    ngx_chat_redis_link_t  *link = c->data;

    redisAsyncHandleRead(link->ac);
}


static void
ngx_chat_redis_write_handler(ngx_event_t *ev)
{
    ngx_connection_t       *c = ev->data;
    ngx_chat_redis_link_t  *link = c->data;

    redisAsyncHandleWrite(link->ac);
}


static void
ngx_chat_redis_add_read(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && !link->conn->read->active) {
        /* level-triggered: hiredis reads one buffer per call */
        (void) ngx_add_event(link->conn->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_chat_redis_del_read(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && link->conn->read->active) {
        (void) ngx_del_event(link->conn->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_chat_redis_add_write(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && !link->conn->write->active) {
        (void) ngx_add_event(link->conn->write, NGX_WRITE_EVENT, 0);
    }
}


static void
ngx_chat_redis_del_write(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && link->conn->write->active) {
        (void) ngx_del_event(link->conn->write, NGX_WRITE_EVENT, 0);
    }
}


static void
ngx_chat_redis_cleanup(void *data)
{
    ngx_chat_redis_link_t  *link = data;
    ngx_connection_t       *c;

    c = link->conn;
    if (c == NULL) {
        return;
    }

    link->conn = NULL;

    /* hiredis closes the socket itself right after this */
    if (c->read->active) {
        (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }

    if (c->write->active) {
        (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    c->fd = (ngx_socket_t) -1;
    ngx_free_connection(c);
}


static void
ngx_chat_redis_schedule(ngx_chat_redis_link_t *link)
{
    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    if (!link->reconnect.timer_set) {
        ngx_add_timer(&link->reconnect, link->backoff);
    }

    link->backoff = ngx_min(link->backoff * 2, NGX_CHAT_REDIS_BACKOFF_MAX);
}


static void
ngx_chat_redis_reconnect_handler(ngx_event_t *ev)
{
    ngx_chat_redis_link_t  *link = ev->data;

    /* a cluster node that left the map (a dead master, a replica seed
     * after the map came) is not dialled again */
    if (ngx_chat_sharded && !link->node->mapped
        && !(link->node->seed && !ngx_chat_map_ok))
    {
        return;
    }

    ngx_chat_redis_connect(link);
}


static void
ngx_chat_redis_connect(ngx_chat_redis_link_t *link)
{
    ngx_connection_t   *c;
    redisAsyncContext  *ac;

    /* port 0: the node is a unix socket (chat_redis unix://...): no TCP
     * stack on either side */
    ac = link->node->port == 0 ? redisAsyncConnectUnix(link->node->host)
                               : redisAsyncConnect(link->node->host,
                                                   link->node->port);
    if (ac == NULL) {
        ngx_chat_redis_schedule(link);
        return;
    }

    if (ac->err) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis connect to %s:%d: %s",
                      link->node->host, link->node->port, ac->errstr);
        redisAsyncFree(ac);
        ngx_chat_redis_schedule(link);
        return;
    }

    c = ngx_get_connection(ac->c.fd, ngx_cycle->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        ngx_chat_redis_schedule(link);
        return;
    }

    c->data = link;
    c->read->handler = ngx_chat_redis_read_handler;
    c->write->handler = ngx_chat_redis_write_handler;
    c->read->log = c->log;
    c->write->log = c->log;

    link->ac = ac;
    link->conn = c;
    link->pending = 0;
    link->loading = 0;
    link->connected = 0;
    link->last_reply = ngx_current_msec;

    ac->ev.data = link;
    ac->ev.addRead = ngx_chat_redis_add_read;
    ac->ev.delRead = ngx_chat_redis_del_read;
    ac->ev.addWrite = ngx_chat_redis_add_write;
    ac->ev.delWrite = ngx_chat_redis_del_write;
    ac->ev.cleanup = ngx_chat_redis_cleanup;

    redisAsyncSetConnectCallback(ac, ngx_chat_redis_on_connect);
    redisAsyncSetDisconnectCallback(ac, ngx_chat_redis_on_disconnect);

    /* the connect completes when the socket becomes writable */
    ngx_chat_redis_add_write(link);
}


static void
ngx_chat_redis_prelude(ngx_chat_redis_link_t *link)
{
    if (ngx_chat_redis_pass[0]) {
        redisAsyncCommand(link->ac, NULL, NULL, "AUTH %s",
                          ngx_chat_redis_pass);
    }

    if (ngx_chat_redis_db && !link->sub) {
        redisAsyncCommand(link->ac, NULL, NULL, "SELECT %d",
                          ngx_chat_redis_db);
    }
}


static void
ngx_chat_redis_script_loaded(redisAsyncContext *ac, void *r, void *data)
{
    redisReply             *reply = r;
    ngx_chat_redis_link_t  *link;

    link = ngx_chat_redis_link(ac);

    if (reply == NULL || link == NULL) {
        return;
    }

    link->last_reply = ngx_current_msec;

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "chat: redis SCRIPT LOAD failed: %s", reply->str);
        redisAsyncDisconnect(ac);
        return;
    }

    if (--link->loading == 0) {
        ngx_chat_redis_set_ready(link, 1);
    }
}


static void
ngx_chat_redis_load_scripts(ngx_chat_redis_link_t *link)
{
    ngx_uint_t  i;

    link->loading = CHAT_LUA_N;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat: redis loading %d scripts on %s:%d",
                   (int) CHAT_LUA_N, link->node->host, link->node->port);

    for (i = 0; i < CHAT_LUA_N; i++) {
        redisAsyncCommand(link->ac, ngx_chat_redis_script_loaded, NULL,
                          "SCRIPT LOAD %s", chat_lua[i].src);
    }
}


static void
ngx_chat_redis_on_connect(const redisAsyncContext *ac, int status)
{
    ngx_uint_t              i;
    ngx_chat_redis_link_t  *link;

    link = ngx_chat_redis_link(ac);
    if (link == NULL) {
        return;
    }

    if (status != REDIS_OK) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis connect to %s:%d failed: %s",
                      link->node->host, link->node->port, ac->errstr);
        /* hiredis frees the context after this callback */
        link->ac = NULL;
        ngx_chat_redis_schedule(link);
        return;
    }

    link->backoff = NGX_CHAT_REDIS_BACKOFF_MIN;
    link->last_reply = ngx_current_msec;
    link->connected = 1;

    ngx_chat_redis_prelude(link);

    if (ngx_chat_sharded) {
        ngx_chat_redis_load_scripts(link);

        /* the first link up asks for the map; later ones when it is not whole */
        if (!ngx_chat_map_ok) {
            ngx_chat_redis_refresh_send();
        }

        return;
    }

    if (link->sub) {
        redisAsyncCommand(link->ac, ngx_chat_redis_sub_cb, NULL,
                          "SUBSCRIBE %b", ngx_chat_worker_channel.data,
                          ngx_chat_worker_channel.len);
        /* every worker process: group typing, one publish for all members */
        redisAsyncCommand(link->ac, ngx_chat_redis_sub_cb, NULL,
                          "SUBSCRIBE " NGX_CHAT_BROADCAST_CHANNEL);

        for (i = 0; i < ngx_chat_nresubscribe; i++) {
            ngx_chat_resubscribe[i]();
        }

    } else {
        ngx_chat_redis_load_scripts(link);
    }
}


static void
ngx_chat_redis_on_disconnect(const redisAsyncContext *ac, int status)
{
    ngx_chat_redis_link_t  *link;

    link = ngx_chat_redis_link(ac);
    if (link == NULL) {
        return;
    }

    link->ac = NULL;
    link->pending = 0;
    link->connected = 0;
    ngx_chat_redis_set_ready(link, 0);

    /* what the master ran but no WAIT confirmed: not acknowledged */
    ngx_chat_redis_fail_held(link);

    if (status != REDIS_OK) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis %s link to %s:%d lost: %s",
                      link->sub ? "pub/sub" : "command",
                      link->node->host, link->node->port,
                      ac->errstr[0] ? ac->errstr : "closed");
    }

    link->backoff = NGX_CHAT_REDIS_BACKOFF_MIN;
    ngx_chat_redis_schedule(link);

    if (ngx_chat_sharded) {
        /* a master gone: its replica may be taking over */
        ngx_chat_redis_refresh_soon(NGX_CHAT_REDIS_REFRESH_FAST);
    }
}


/* --- pub/sub ------------------------------------------------------------ */

static void
ngx_chat_redis_sub_cb(redisAsyncContext *ac, void *r, void *data)
{
    redisReply  *reply = r, *kind, *ch, *payload;

    ngx_chat_sub.last_reply = ngx_current_msec;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements < 3)
    {
        return;
    }

    kind = reply->element[0];
    ch = reply->element[1];
    payload = reply->element[2];

    if (kind->type != REDIS_REPLY_STRING) {
        return;
    }

    if (kind->len == 9 && ngx_strncmp(kind->str, "subscribe", 9) == 0) {
        if (ch->type == REDIS_REPLY_STRING
            && (size_t) ch->len == ngx_chat_worker_channel.len
            && ngx_strncmp(ch->str, ngx_chat_worker_channel.data,
                           ch->len) == 0)
        {
            ngx_chat_redis_set_ready(&ngx_chat_sub, 1);
        }
        return;
    }

    if (kind->len != 7 || ngx_strncmp(kind->str, "message", 7) != 0) {
        return;
    }

    ngx_chat_redis_dispatch(ch, payload);
}


/* a message on ch goes to the handler registered for it */
static void
ngx_chat_redis_dispatch(redisReply *ch, redisReply *payload)
{
    ngx_uint_t                 i;
    ngx_chat_redis_channel_t  *c;

    if (ch->type != REDIS_REPLY_STRING || payload->type != REDIS_REPLY_STRING) {
        return;
    }

    for (i = 0; i < ngx_chat_nchannels; i++) {
        c = &ngx_chat_channels[i];

        if (c->prefix ? ((size_t) ch->len > c->name.len
                         && ngx_strncmp(ch->str, c->name.data, c->name.len) == 0)
                      : ((size_t) ch->len == c->name.len
                         && ngx_strncmp(ch->str, c->name.data, c->name.len)
                            == 0))
        {
            c->handler((u_char *) payload->str, payload->len);
            return;
        }
    }
}


/* Messages on channel (or every channel starting with it) go to handler. */
ngx_int_t
ngx_chat_redis_on_channel(ngx_str_t *name, ngx_uint_t prefix,
    ngx_chat_redis_msg_handler handler)
{
    if (ngx_chat_nchannels == NGX_CHAT_REDIS_HANDLERS) {
        return NGX_ERROR;
    }

    ngx_chat_channels[ngx_chat_nchannels].name = *name;
    ngx_chat_channels[ngx_chat_nchannels].prefix = prefix;
    ngx_chat_channels[ngx_chat_nchannels].handler = handler;
    ngx_chat_nchannels++;

    return NGX_OK;
}


/* cb subscribes again what its owner needs, each time pub/sub is back. */
ngx_int_t
ngx_chat_redis_on_resubscribe(void (*cb)(void))
{
    if (ngx_chat_nresubscribe == NGX_CHAT_REDIS_HANDLERS) {
        return NGX_ERROR;
    }

    ngx_chat_resubscribe[ngx_chat_nresubscribe++] = cb;

    return NGX_OK;
}


ngx_int_t
ngx_chat_redis_subscribe(ngx_str_t *channel, ngx_uint_t on)
{
    if (ngx_chat_sharded) {
        return ngx_chat_redis_ssubscribe(channel->data, channel->len, on);
    }

    if (ngx_chat_sub.ac == NULL) {
        return NGX_ERROR;     /* resubscribed on reconnect */
    }

    if (redisAsyncCommand(ngx_chat_sub.ac, ngx_chat_redis_sub_cb, NULL,
                          on ? "SUBSCRIBE %b" : "UNSUBSCRIBE %b",
                          channel->data, channel->len) != REDIS_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* --- Redis Cluster: nodes, slot map, sharded pub/sub ---------------------- */

static void
ngx_chat_redis_link_init(ngx_chat_redis_link_t *link, ngx_chat_redis_node_t *n,
    ngx_uint_t sub)
{
    link->node = n;
    link->sub = sub;
    link->backoff = NGX_CHAT_REDIS_BACKOFF_MIN;
    link->reconnect.handler = ngx_chat_redis_reconnect_handler;
    link->reconnect.data = link;
    link->reconnect.log = ngx_cycle->log;
    link->reconnect.cancelable = 1;
    ngx_queue_init(&link->held);
    ngx_queue_init(&link->waited);
    link->wait_ev.handler = ngx_chat_redis_wait_handler;
    link->wait_ev.data = link;
    link->wait_ev.log = ngx_cycle->log;
    link->wait_ev.cancelable = 1;
}


static void ngx_chat_redis_ssub_reconnect_handler(ngx_event_t *ev);

/* the node host:port, created (and dialled) when new; NULL when full */
static ngx_chat_redis_node_t *
ngx_chat_redis_node_get(const char *host, int port)
{
    ngx_uint_t              i;
    ngx_chat_redis_node_t  *n;

    for (i = 0; i < ngx_chat_nnodes; i++) {
        n = &ngx_chat_nodes[i];

        if (n->port == port && ngx_strcmp(n->host, host) == 0) {
            return n;
        }
    }

    if (ngx_chat_nnodes == CHAT_CLUSTER_MAX_NODES
        || ngx_strlen(host) >= sizeof(n->host))
    {
        return NULL;
    }

    n = &ngx_chat_nodes[ngx_chat_nnodes++];
    ngx_memzero(n, sizeof(ngx_chat_redis_node_t));
    ngx_cpystrn((u_char *) n->host, (u_char *) host, sizeof(n->host));
    n->port = port;
    n->used = 1;

    ngx_chat_redis_link_init(&n->cmd, n, 0);
    n->ssub.backoff = NGX_CHAT_REDIS_BACKOFF_MIN;
    n->ssub.reconnect.handler = ngx_chat_redis_ssub_reconnect_handler;
    n->ssub.reconnect.data = n;
    n->ssub.reconnect.log = ngx_cycle->log;
    n->ssub.reconnect.cancelable = 1;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat: redis cluster node %s:%d", n->host, n->port);

    ngx_chat_redis_connect(&n->cmd);

    return n;
}


/* the node that owns slot, NULL when none (or not known yet) */
static ngx_chat_redis_node_t *
ngx_chat_redis_owner(unsigned slot)
{
    int  i;

    i = chat_cluster_map_node(&ngx_chat_map, slot);

    return i < 0 ? NULL : ngx_chat_map_node[i];
}


/* the map's nodes are ours: find or create each, dial its pub/sub link */
static void
ngx_chat_redis_map_bind(void)
{
    ngx_uint_t              i;
    ngx_chat_redis_node_t  *n;

    for (i = 0; i < ngx_chat_nnodes; i++) {
        ngx_chat_nodes[i].mapped = 0;
    }

    for (i = 0; i < ngx_chat_map.nnodes; i++) {
        n = ngx_chat_redis_node_get(ngx_chat_map.node[i].host,
                                    ngx_chat_map.node[i].port);
        ngx_chat_map_node[i] = n;

        if (n) {
            n->mapped = 1;
        }
    }

    for (i = 0; i < ngx_chat_nnodes; i++) {
        n = &ngx_chat_nodes[i];

        if (n->mapped) {
            if (!n->cmd.ac && !n->cmd.reconnect.timer_set) {
                ngx_chat_redis_connect(&n->cmd);
            }

            if (!n->ssub.rc && !n->ssub.reconnect.timer_set) {
                ngx_chat_redis_ssub_connect(n);
            }

        } else if (n->ssub.rc) {
            /* not a master any more: what it carried is subscribed anew */
            ngx_chat_redis_ssub_close(n);
        }
    }

    ngx_chat_map_ok = chat_cluster_map_covered(&ngx_chat_map)
                      == CHAT_CLUSTER_SLOTS;
}


/* whether two maps send some slot to different host:port */
static ngx_uint_t
ngx_chat_redis_map_differs(chat_cluster_map_t *a, chat_cluster_map_t *b)
{
    int         x, y;
    ngx_uint_t  s;

    for (s = 0; s < CHAT_CLUSTER_SLOTS; s++) {
        x = chat_cluster_map_node(a, s);
        y = chat_cluster_map_node(b, s);

        if ((x < 0) != (y < 0)) {
            return 1;
        }

        if (x >= 0 && (a->node[x].port != b->node[y].port
                       || ngx_strcmp(a->node[x].host, b->node[y].host) != 0))
        {
            return 1;
        }
    }

    return 0;
}


static void
ngx_chat_redis_slots_reply(redisAsyncContext *ac, void *r, void *data)
{
    ngx_uint_t              i, changed;
    redisReply             *reply = r;
    ngx_chat_redis_link_t  *link;

    ngx_chat_refreshing = 0;
    link = ngx_chat_redis_link(ac);

    if (reply == NULL || link == NULL || ngx_exiting) {
        return;
    }

    link->last_reply = ngx_current_msec;

    if (chat_cluster_map_from_slots(&ngx_chat_map_new, reply) != 0) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis %s:%d: unusable CLUSTER SLOTS reply%s%s",
                      link->node->host, link->node->port,
                      reply->type == REDIS_REPLY_ERROR ? ": " : "",
                      reply->type == REDIS_REPLY_ERROR ? reply->str : "");
        return;
    }

    /* a node that does not know its own address: the one we asked */
    for (i = 0; i < ngx_chat_map_new.nnodes; i++) {
        if (ngx_chat_map_new.node[i].host[0] == '\0') {
            ngx_cpystrn((u_char *) ngx_chat_map_new.node[i].host,
                        (u_char *) link->node->host,
                        sizeof(ngx_chat_map_new.node[i].host));
        }
    }

    changed = ngx_chat_redis_map_differs(&ngx_chat_map, &ngx_chat_map_new);

    if (changed) {
        ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                      "chat: redis cluster map from %s:%d: %ui masters, "
                      "%ui slots owned", link->node->host, link->node->port,
                      (ngx_uint_t) ngx_chat_map_new.nnodes,
                      (ngx_uint_t) chat_cluster_map_covered(&ngx_chat_map_new));
        ngx_chat_stat_inc(redis_maps);
    }

    /* the answer replaces the map even when every slot goes where it went:
     * a MOVED may have added a master that owns nothing now (a dead one
     * kept in the map would hold readiness back for good) */
    ngx_memcpy(&ngx_chat_map, &ngx_chat_map_new, sizeof(ngx_chat_map));

    ngx_chat_redis_map_bind();

    if (changed || ngx_chat_resub) {
        ngx_chat_resub = 0;
        ngx_chat_redis_resubscribe_all();
    }

    ngx_chat_redis_update_up();
}


/* CLUSTER SLOTS on some connected node (the seeds dial on their own) */
static void
ngx_chat_redis_refresh_send(void)
{
    ngx_uint_t              i, k;
    static ngx_uint_t       next;
    ngx_chat_redis_node_t  *n;

    if (ngx_chat_refreshing || ngx_exiting) {
        return;
    }

    for (k = 0; k < ngx_chat_nnodes; k++) {
        i = (next + k) % ngx_chat_nnodes;
        n = &ngx_chat_nodes[i];

        if (n->cmd.connected && n->cmd.ac
            && redisAsyncCommand(n->cmd.ac, ngx_chat_redis_slots_reply, NULL,
                                 "CLUSTER SLOTS") == REDIS_OK)
        {
            next = i + 1;
            ngx_chat_refreshing = 1;
            return;
        }
    }
}


static void
ngx_chat_redis_refresh_handler(ngx_event_t *ev)
{
    ngx_uint_t              i;
    ngx_chat_redis_node_t  *n;

    if (ngx_exiting) {
        return;
    }

    /* without a map, every seed is dialled again (a seed that was a
     * replica when the map came is not kept) */
    if (!ngx_chat_map_ok) {
        for (i = 0; i < ngx_chat_nnodes; i++) {
            if (ngx_chat_nodes[i].seed && !ngx_chat_nodes[i].cmd.ac
                && !ngx_chat_nodes[i].cmd.reconnect.timer_set)
            {
                ngx_chat_redis_connect(&ngx_chat_nodes[i].cmd);
            }
        }
    }

    ngx_chat_redis_refresh_send();

    /* the map is whole but our delivery channel not confirmed: dial its
     * master's pub/sub link if nothing will, or ask again (SSUBSCRIBE of
     * a held channel only confirms it once more) */
    if (ngx_chat_map_ok && ngx_chat_wch_node == NULL) {
        n = ngx_chat_redis_owner(chat_cluster_slot(
                (const char *) ngx_chat_worker_channel.data,
                ngx_chat_worker_channel.len));

        if (n && n->ssub.rc == NULL && !n->ssub.reconnect.timer_set) {
            n->mapped = 1;
            ngx_chat_redis_ssub_connect(n);

        } else {
            (void) ngx_chat_redis_ssubscribe(ngx_chat_worker_channel.data,
                                             ngx_chat_worker_channel.len, 1);
        }
    }

    ngx_add_timer(ev, ngx_chat_redis_ready_all() ? NGX_CHAT_REDIS_REFRESH
                                                 : NGX_CHAT_REDIS_REFRESH_FAST);
}


static void
ngx_chat_redis_refresh_soon(ngx_msec_t delay)
{
    if (ngx_exiting || !ngx_chat_sharded) {
        return;
    }

    if (ngx_chat_refresh_ev.timer_set
        && ngx_chat_refresh_ev.timer.key <= ngx_current_msec + delay)
    {
        return;
    }

    if (ngx_chat_refresh_ev.timer_set) {
        ngx_del_timer(&ngx_chat_refresh_ev);
    }

    ngx_add_timer(&ngx_chat_refresh_ev, delay);
}


/* sharded pub/sub link: a non-blocking redisContext on nginx events */

static void
ngx_chat_redis_ssub_flush(ngx_chat_redis_node_t *n)
{
    int  done = 0;

    if (!n->ssub.connected) {
        return;                  /* written once connected */
    }

    if (redisBufferWrite(n->ssub.rc, &done) == REDIS_ERR) {
        ngx_chat_redis_ssub_close(n);
        return;
    }

    if (!done && !n->ssub.conn->write->active) {
        (void) ngx_add_event(n->ssub.conn->write, NGX_WRITE_EVENT, 0);

    } else if (done && n->ssub.conn->write->active) {
        (void) ngx_del_event(n->ssub.conn->write, NGX_WRITE_EVENT, 0);
    }
}


static ngx_int_t
ngx_chat_redis_ssubscribe(u_char *ch, size_t len, ngx_uint_t on)
{
    ngx_chat_redis_node_t  *n;

    n = ngx_chat_redis_owner(chat_cluster_slot((const char *) ch, len));

    if (n == NULL || n->ssub.rc == NULL || !n->ssub.connected) {
        return NGX_ERROR;        /* subscribed when that link is up */
    }

    if (redisAppendCommand(n->ssub.rc, on ? "SSUBSCRIBE %b" : "SUNSUBSCRIBE %b",
                           ch, len) != REDIS_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_redis_ssub_flush(n);

    return NGX_OK;
}


static void
ngx_chat_redis_resubscribe_all(void)
{
    ngx_uint_t  i;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat: redis cluster resubscribing");

    /* SSUBSCRIBE of a channel a link holds already is a no-op */
    (void) ngx_chat_redis_ssubscribe(ngx_chat_worker_channel.data,
                                     ngx_chat_worker_channel.len, 1);
    (void) ngx_chat_redis_ssubscribe((u_char *) NGX_CHAT_BROADCAST_CHANNEL,
                                     sizeof(NGX_CHAT_BROADCAST_CHANNEL) - 1, 1);

    for (i = 0; i < ngx_chat_nresubscribe; i++) {
        ngx_chat_resubscribe[i]();
    }
}


static ngx_uint_t
ngx_chat_redis_is_wch(redisReply *ch)
{
    return ch->type == REDIS_REPLY_STRING
           && (size_t) ch->len == ngx_chat_worker_channel.len
           && ngx_strncmp(ch->str, ngx_chat_worker_channel.data, ch->len) == 0;
}


static void
ngx_chat_redis_ssub_reply(ngx_chat_redis_node_t *n, redisReply *reply)
{
    redisReply  *kind, *ch;

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis %s:%d pub/sub: %s", n->host, n->port,
                      reply->str);
        /* a MOVED for SSUBSCRIBE: the map is behind */
        ngx_chat_resub = 1;
        ngx_chat_redis_refresh_soon(NGX_CHAT_REDIS_REFRESH_FAST);
        return;
    }

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 3
        || reply->element[0]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    kind = reply->element[0];
    ch = reply->element[1];

    if (kind->len == 8 && ngx_strncmp(kind->str, "smessage", 8) == 0) {
        ngx_chat_redis_dispatch(ch, reply->element[2]);
        return;
    }

    if (kind->len == 10 && ngx_strncmp(kind->str, "ssubscribe", 10) == 0) {
        if (ngx_chat_redis_is_wch(ch) && ngx_chat_wch_node != n) {
            ngx_chat_wch_node = n;
            ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                           "chat: redis delivery channel on %s:%d",
                           n->host, n->port);
            ngx_chat_redis_update_up();
        }
        return;
    }

    if (kind->len == 12 && ngx_strncmp(kind->str, "sunsubscribe", 12) == 0) {
        /* we never drop our own channel: its slot moved away from n; the
         * other channels may be an unwatch, or the same: look again */
        if (ngx_chat_redis_is_wch(ch) && ngx_chat_wch_node == n) {
            ngx_chat_wch_node = NULL;
            ngx_chat_redis_update_up();
        }

        ngx_chat_resub = 1;
        ngx_chat_redis_refresh_soon(20);
    }
}


static void
ngx_chat_redis_ssub_read_handler(ngx_event_t *ev)
{
    void                   *reply;
    ngx_connection_t       *c = ev->data;
    ngx_chat_redis_node_t  *n = c->data;

    if (redisBufferRead(n->ssub.rc) == REDIS_ERR) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis pub/sub link to %s:%d lost: %s",
                      n->host, n->port,
                      n->ssub.rc->errstr[0] ? n->ssub.rc->errstr : "closed");
        ngx_chat_redis_ssub_close(n);
        ngx_chat_redis_refresh_soon(NGX_CHAT_REDIS_REFRESH_FAST);
        return;
    }

    for ( ;; ) {
        reply = NULL;

        if (redisReaderGetReply(n->ssub.rc->reader, &reply) != REDIS_OK) {
            ngx_chat_redis_ssub_close(n);
            return;
        }

        if (reply == NULL) {
            return;
        }

        ngx_chat_redis_ssub_reply(n, reply);
        freeReplyObject(reply);

        if (n->ssub.rc == NULL) {
            return;              /* closed by what the reply did */
        }
    }
}


static void
ngx_chat_redis_ssub_write_handler(ngx_event_t *ev)
{
    int                     err;
    socklen_t               len;
    ngx_connection_t       *c = ev->data;
    ngx_chat_redis_node_t  *n = c->data;

    if (!n->ssub.connected) {
        err = 0;
        len = sizeof(err);

        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1
            || err != 0)
        {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, err,
                          "chat: redis pub/sub connect to %s:%d failed",
                          n->host, n->port);
            ngx_chat_redis_ssub_close(n);
            return;
        }

        n->ssub.connected = 1;
        n->ssub.backoff = NGX_CHAT_REDIS_BACKOFF_MIN;

        if (ngx_chat_redis_pass[0]) {
            (void) redisAppendCommand(n->ssub.rc, "AUTH %s",
                                      ngx_chat_redis_pass);
        }

        ngx_chat_redis_resubscribe_all();
    }

    ngx_chat_redis_ssub_flush(n);
}


static void
ngx_chat_redis_ssub_connect(ngx_chat_redis_node_t *n)
{
    redisContext      *rc;
    ngx_connection_t  *c;

    rc = n->port == 0 ? redisConnectUnixNonBlock(n->host)
                      : redisConnectNonBlock(n->host, n->port);

    if (rc == NULL || rc->err) {
        if (rc) {
            redisFree(rc);
        }
        goto retry;
    }

    c = ngx_get_connection(rc->fd, ngx_cycle->log);
    if (c == NULL) {
        redisFree(rc);
        goto retry;
    }

    c->data = n;
    c->read->handler = ngx_chat_redis_ssub_read_handler;
    c->write->handler = ngx_chat_redis_ssub_write_handler;
    c->read->log = c->log;
    c->write->log = c->log;

    n->ssub.rc = rc;
    n->ssub.conn = c;
    n->ssub.connected = 0;

    /* level-triggered like the command links; writable = connected */
    if (ngx_add_event(c->read, NGX_READ_EVENT, 0) != NGX_OK
        || ngx_add_event(c->write, NGX_WRITE_EVENT, 0) != NGX_OK)
    {
        ngx_chat_redis_ssub_close(n);
    }

    return;

retry:

    if (!ngx_exiting && !n->ssub.reconnect.timer_set) {
        ngx_add_timer(&n->ssub.reconnect, n->ssub.backoff);
        n->ssub.backoff = ngx_min(n->ssub.backoff * 2,
                                  NGX_CHAT_REDIS_BACKOFF_MAX);
    }
}


static void
ngx_chat_redis_ssub_reconnect_handler(ngx_event_t *ev)
{
    ngx_chat_redis_node_t  *n = ev->data;

    if (n->mapped && n->ssub.rc == NULL) {
        ngx_chat_redis_ssub_connect(n);
    }
}


static void
ngx_chat_redis_ssub_close(ngx_chat_redis_node_t *n)
{
    ngx_connection_t  *c = n->ssub.conn;

    if (c) {
        if (c->read->active) {
            (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
        }

        if (c->write->active) {
            (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
        }

        if (c->read->posted) {
            ngx_delete_posted_event(c->read);
        }

        if (c->write->posted) {
            ngx_delete_posted_event(c->write);
        }

        c->fd = (ngx_socket_t) -1;   /* redisFree closes it */
        ngx_free_connection(c);
        n->ssub.conn = NULL;
    }

    if (n->ssub.rc) {
        redisFree(n->ssub.rc);
        n->ssub.rc = NULL;
    }

    n->ssub.connected = 0;

    if (ngx_chat_wch_node == n) {
        ngx_chat_wch_node = NULL;
        ngx_chat_redis_update_up();
    }

    if (n->mapped && !ngx_exiting && !n->ssub.reconnect.timer_set) {
        ngx_add_timer(&n->ssub.reconnect, n->ssub.backoff);
        n->ssub.backoff = ngx_min(n->ssub.backoff * 2,
                                  NGX_CHAT_REDIS_BACKOFF_MAX);
    }
}


/* cluster commands: formatted once, so that a redirect resends the bytes */

typedef struct {
    ngx_chat_redis_cb   cb;
    void               *data;
    char               *cmd;          /* hiredis' (redisFreeCommand) */
    size_t              len;
    int                 slot;         /* -1: any node */
    ngx_uint_t          tries;
    ngx_uint_t          asking;       /* ASKING first, once */
    ngx_uint_t          durable;      /* answered after WAIT */
    ngx_event_t         retry;
} ngx_chat_redis_creq_t;


static void ngx_chat_redis_creply(redisAsyncContext *ac, void *r, void *data);


static void
ngx_chat_redis_creq_done(ngx_chat_redis_creq_t *q, redisReply *reply)
{
    if (q->cb) {
        q->cb(reply, q->data);
    }

    redisFreeCommand(q->cmd);
    ngx_free(q);
}


static ngx_chat_redis_node_t *
ngx_chat_redis_any_node(void)
{
    ngx_uint_t  i;

    for (i = 0; i < ngx_chat_map.nnodes; i++) {
        if (ngx_chat_map_node[i] && ngx_chat_map_node[i]->cmd.ready) {
            return ngx_chat_map_node[i];
        }
    }

    return NULL;
}


static ngx_int_t
ngx_chat_redis_csend(ngx_chat_redis_creq_t *q, ngx_chat_redis_node_t *n)
{
    if (n == NULL) {
        n = q->slot < 0 ? ngx_chat_redis_any_node()
                        : ngx_chat_redis_owner((unsigned) q->slot);
    }

    if (n == NULL || !n->cmd.ready || n->cmd.ac == NULL
        || n->cmd.pending >= NGX_CHAT_REDIS_MAX_PENDING)
    {
        return NGX_ERROR;
    }

    if (q->asking) {
        q->asking = 0;

        if (redisAsyncCommand(n->cmd.ac, NULL, NULL, "ASKING") != REDIS_OK) {
            return NGX_ERROR;
        }
    }

    if (redisAsyncFormattedCommand(n->cmd.ac, ngx_chat_redis_creply, q,
                                   q->cmd, q->len) != REDIS_OK)
    {
        return NGX_ERROR;
    }

    n->cmd.pending++;

    return NGX_OK;
}


static void
ngx_chat_redis_retry_handler(ngx_event_t *ev)
{
    ngx_chat_redis_creq_t  *q = ev->data;

    if (ngx_exiting || ngx_chat_redis_csend(q, NULL) != NGX_OK) {
        ngx_chat_redis_creq_done(q, NULL);
    }
}


static void
ngx_chat_redis_creply(redisAsyncContext *ac, void *r, void *data)
{
    ngx_chat_redis_creq_t  *q = data;
    redisReply             *reply = r;
    ngx_chat_redis_link_t  *link;
    ngx_chat_redis_node_t  *n;
    chat_redirect_t         rd;
    const char             *host;
    int                     idx;

    link = ngx_chat_redis_link(ac);

    if (link && link->pending) {
        link->pending--;
        link->last_reply = ngx_current_msec;
    }

    /* also while exiting: an unconfirmed accept is never acknowledged */
    if (q->durable && ngx_chat_redis_replicas && reply && link
        && reply->type != REDIS_REPLY_ERROR)
    {
        /* ran on this master: answered after a WAIT on this link */
        ngx_chat_redis_hold(link, q->cb, q->data, reply);
        q->cb = NULL;
        ngx_chat_redis_creq_done(q, NULL);
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_ERROR || link == NULL
        || ngx_exiting)
    {
        ngx_chat_redis_creq_done(q, reply);
        return;
    }

    /* not executed where it was sent: send it where the cluster says, with
     * the same callback, so that it is answered once */
    if (chat_cluster_parse_redirect(reply->str, reply->len, &rd) == 0) {
        if (q->tries++ >= NGX_CHAT_REDIS_REDIRECTS) {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "chat: redis cluster: too many redirects (%s)",
                          reply->str);
            ngx_chat_redis_creq_done(q, NULL);
            return;
        }

        host = rd.host[0] ? rd.host : link->node->host;
        n = ngx_chat_redis_node_get(host, rd.port);

        ngx_log_debug4(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: redis %s slot %ui -> %s:%d",
                       rd.kind == CHAT_REDIRECT_MOVED ? "MOVED" : "ASK",
                       (ngx_uint_t) rd.slot, host, rd.port);

        if (rd.kind == CHAT_REDIRECT_MOVED) {
            ngx_chat_stat_inc(redis_moved);
            idx = chat_cluster_map_move(&ngx_chat_map, rd.slot, host, rd.port);
            if (idx >= 0 && n) {
                ngx_chat_map_node[idx] = n;
                n->mapped = 1;
            }
            ngx_chat_redis_refresh_soon(100);

        } else {
            ngx_chat_stat_inc(redis_ask);
            q->asking = 1;
        }

        if (n && ngx_chat_redis_csend(q, n) == NGX_OK) {
            return;
        }

        ngx_chat_redis_creq_done(q, NULL);
        return;
    }

    /* TRYAGAIN (a multi-key script while its slot migrates), CLUSTERDOWN
     * (a failover under way): not executed either, again shortly */
    if ((ngx_strncmp(reply->str, "TRYAGAIN", 8) == 0
         || ngx_strncmp(reply->str, "CLUSTERDOWN", 11) == 0)
        && q->tries < NGX_CHAT_REDIS_REDIRECTS)
    {
        q->tries++;
        ngx_chat_stat_inc(redis_tryagain);
        q->retry.handler = ngx_chat_redis_retry_handler;
        q->retry.data = q;
        q->retry.log = ngx_cycle->log;
        q->retry.cancelable = 1;
        ngx_add_timer(&q->retry, 25 * q->tries);
        ngx_chat_redis_refresh_soon(100);
        return;
    }

    if (ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis %s:%d lost the scripts, loading them again",
                      link->node->host, link->node->port);
        ngx_chat_redis_set_ready(link, 0);
        ngx_chat_redis_load_scripts(link);
    }

    ngx_chat_redis_creq_done(q, reply);
}


static ngx_int_t
ngx_chat_redis_cissue(ngx_chat_redis_cb cb, void *data, char *cmd, int len,
    ngx_uint_t durable)
{
    int                     slot;
    ngx_chat_redis_creq_t  *q;

    if (len <= 0) {
        return NGX_ERROR;
    }

    slot = chat_cluster_command_slot(cmd, (size_t) len);
    if (slot == -2) {
        redisFreeCommand(cmd);
        return NGX_ERROR;
    }

    q = ngx_alloc(sizeof(ngx_chat_redis_creq_t), ngx_cycle->log);
    if (q == NULL) {
        redisFreeCommand(cmd);
        return NGX_ERROR;
    }

    ngx_memzero(q, sizeof(ngx_chat_redis_creq_t));
    q->cb = cb;
    q->data = data;
    q->cmd = cmd;
    q->len = (size_t) len;
    q->slot = slot;
    q->durable = durable;

    if (ngx_chat_redis_csend(q, NULL) != NGX_OK) {
        redisFreeCommand(cmd);
        ngx_free(q);
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_uint_t
ngx_chat_redis_sharded(void)
{
    return ngx_chat_sharded;
}


/* PUBLISH (single node) or SPUBLISH on the channel's master (cluster) */
ngx_int_t
ngx_chat_redis_publish(u_char *ch, size_t clen, u_char *payload, size_t plen)
{
    return ngx_chat_redis_command(NULL, NULL,
                                  ngx_chat_sharded ? "SPUBLISH %b %b"
                                                   : "PUBLISH %b %b",
                                  ch, clen, payload, plen);
}


/* Cluster: lua/relay.lua cannot SPUBLISH to channels of other slots, so it
 * returns {payload, channel...} and the event goes out from here, each on
 * its channel's master. */
static void
ngx_chat_redis_relay_channels(void *r, void *data)
{
    size_t       i;
    redisReply  *reply = r;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements < 1
        || reply->element[0]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    for (i = 1; i < reply->elements; i++) {
        if (reply->element[i]->type == REDIS_REPLY_STRING) {
            (void) ngx_chat_redis_publish(
                       (u_char *) reply->element[i]->str,
                       reply->element[i]->len,
                       (u_char *) reply->element[0]->str,
                       reply->element[0]->len);
        }
    }
}


/*
 * An ephemeral event to every worker process holding a connection of user:
 * one script on the user's registry, one PUBLISH per process, nothing
 * stored, no queue entry (typing, a direct delivered receipt). The
 * sessions deliver it as they do the fan-out's live-only events.
 */
ngx_int_t
ngx_chat_redis_relay(u_char *user, size_t ulen, u_char *json, size_t jlen)
{
    u_char        conns[96], now[32];
    const char   *argv[5];
    size_t        argl[5];

    argv[0] = (char *) conns;
    argl[0] = ngx_sprintf(conns, "chat:{u:%*s}:conns", ulen, user) - conns;
    argv[1] = (char *) now;
    argl[1] = ngx_sprintf(now, "%L", ngx_chat_now_ms()) - now;
    argv[2] = (char *) user;
    argl[2] = ulen;
    argv[3] = (char *) json;
    argl[3] = jlen;

    if (ngx_chat_sharded) {
        argv[4] = "s";
        argl[4] = 1;

        return ngx_chat_redis_script(CHAT_LUA_RELAY,
                                     ngx_chat_redis_relay_channels, NULL, 1, 5,
                                     argv, argl);
    }

    return ngx_chat_redis_script(CHAT_LUA_RELAY, NULL, NULL, 1, 4, argv, argl);
}


/* --- commands ------------------------------------------------------------ */

/* why this worker process is not ready, for the log line of a refusal:
 * an operator must see which master or channel holds everything back */
static void
ngx_chat_redis_why(u_char *buf, size_t size)
{
    u_char                 *last = buf + size - 1;
    ngx_uint_t              i;
    ngx_chat_redis_node_t  *n;

    *ngx_cpymem(buf, "?", 1) = '\0';

    if (!ngx_chat_sharded) {
        *ngx_slprintf(buf, last, "command link %s, pub/sub link %s, "
                      "%ui commands pending",
                      ngx_chat_cmd.ready ? "ready" : "not ready",
                      ngx_chat_sub.ready ? "ready" : "not ready",
                      ngx_chat_cmd.pending) = '\0';
        return;
    }

    if (!ngx_chat_map_ok) {
        *ngx_slprintf(buf, last, "slot map owns %ui of %d slots",
                      (ngx_uint_t) chat_cluster_map_covered(&ngx_chat_map),
                      CHAT_CLUSTER_SLOTS) = '\0';
        return;
    }

    for (i = 0; i < ngx_chat_map.nnodes; i++) {
        n = ngx_chat_map_node[i];

        if (n == NULL) {
            *ngx_slprintf(buf, last, "master %s:%d has no node (table full)",
                          ngx_chat_map.node[i].host,
                          ngx_chat_map.node[i].port) = '\0';
            return;
        }

        if (!n->cmd.ready) {
            *ngx_slprintf(buf, last, "master %s:%d command link %s",
                          n->host, n->port,
                          n->cmd.ac == NULL ? "not connected"
                          : !n->cmd.connected ? "connecting"
                          : "loading scripts") = '\0';
            return;
        }
    }

    if (ngx_chat_wch_node == NULL) {
        n = ngx_chat_redis_owner(chat_cluster_slot(
                (const char *) ngx_chat_worker_channel.data,
                ngx_chat_worker_channel.len));

        *ngx_slprintf(buf, last, "delivery channel \"%V\" not subscribed "
                      "(its master %s:%d, pub/sub link %s)",
                      &ngx_chat_worker_channel,
                      n ? n->host : "?", n ? n->port : 0,
                      n == NULL ? "none"
                      : n->ssub.rc == NULL ? "not connected"
                      : !n->ssub.connected ? "connecting"
                      : "up") = '\0';
    }
}


ngx_int_t
ngx_chat_redis_ready(void)
{
    ngx_int_t          ok;
    u_char             why[256];
    static ngx_msec_t  logged;

    if (ngx_chat_sharded) {
        ok = ngx_chat_redis_ready_all();

    } else {
        ok = ngx_chat_cmd.ready && ngx_chat_sub.ready
             && ngx_chat_cmd.pending < NGX_CHAT_REDIS_MAX_PENDING;
    }

    /* a refusal is logged once a second at most */
    if (!ok && ngx_current_msec - logged >= 1000) {
        logged = ngx_current_msec;
        ngx_chat_redis_why(why, sizeof(why));
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis not ready, requests refused: %s", why);
    }

    return ok;
}


static void
ngx_chat_redis_reply(redisAsyncContext *ac, void *r, void *data)
{
    ngx_chat_redis_req_t  *req = data;
    redisReply            *reply = r;

    if (ngx_chat_cmd.ac == ac && ngx_chat_cmd.pending) {
        ngx_chat_cmd.pending--;
        ngx_chat_cmd.last_reply = ngx_current_msec;
    }

    if (reply && reply->type == REDIS_REPLY_ERROR
        && ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0)
    {
        /* the scripts were flushed: load them again */
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis lost the scripts, loading them again");
        ngx_chat_redis_set_ready(&ngx_chat_cmd, 0);
        ngx_chat_redis_load_scripts(&ngx_chat_cmd);
    }

    if (req->durable && ngx_chat_redis_replicas && reply
        && reply->type != REDIS_REPLY_ERROR)
    {
        ngx_chat_redis_hold(&ngx_chat_cmd, req->cb, req->data, reply);

    } else if (req->cb) {
        req->cb(reply, req->data);
    }

    ngx_free(req);
}


static ngx_chat_redis_req_t *
ngx_chat_redis_req(ngx_chat_redis_cb cb, void *data)
{
    ngx_chat_redis_req_t  *req;

    if (!ngx_chat_redis_ready()) {
        return NULL;
    }

    req = ngx_alloc(sizeof(ngx_chat_redis_req_t), ngx_cycle->log);
    if (req == NULL) {
        return NULL;
    }

    req->cb = cb;
    req->data = data;
    req->durable = 0;

    return req;
}


ngx_int_t
ngx_chat_redis_command(ngx_chat_redis_cb cb, void *data, const char *fmt, ...)
{
    int                    rc;
    char                  *cmd;
    va_list                ap;
    ngx_chat_redis_req_t  *req;

    if (ngx_chat_sharded) {
        va_start(ap, fmt);
        rc = redisvFormatCommand(&cmd, fmt, ap);
        va_end(ap);

        return rc <= 0 ? NGX_ERROR
                       : ngx_chat_redis_cissue(cb, data, cmd, rc, 0);
    }

    req = ngx_chat_redis_req(cb, data);
    if (req == NULL) {
        return NGX_ERROR;
    }

    va_start(ap, fmt);
    rc = redisvAsyncCommand(ngx_chat_cmd.ac, ngx_chat_redis_reply, req, fmt,
                            ap);
    va_end(ap);

    if (rc != REDIS_OK) {
        ngx_free(req);
        return NGX_ERROR;
    }

    ngx_chat_cmd.pending++;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_redis_commandv_x(ngx_chat_redis_cb cb, void *data, int argc,
    const char **argv, const size_t *argvlen, ngx_uint_t durable)
{
    int                    n;
    char                  *cmd;
    ngx_chat_redis_req_t  *req;

    if (ngx_chat_sharded) {
        n = redisFormatCommandArgv(&cmd, argc, argv, argvlen);

        return n <= 0 ? NGX_ERROR
                      : ngx_chat_redis_cissue(cb, data, cmd, n, durable);
    }

    req = ngx_chat_redis_req(cb, data);
    if (req == NULL) {
        return NGX_ERROR;
    }

    req->durable = durable;

    if (redisAsyncCommandArgv(ngx_chat_cmd.ac, ngx_chat_redis_reply, req, argc,
                              argv, argvlen) != REDIS_OK)
    {
        ngx_free(req);
        return NGX_ERROR;
    }

    ngx_chat_cmd.pending++;

    return NGX_OK;
}


ngx_int_t
ngx_chat_redis_commandv(ngx_chat_redis_cb cb, void *data, int argc,
    const char **argv, const size_t *argvlen)
{
    return ngx_chat_redis_commandv_x(cb, data, argc, argv, argvlen, 0);
}


/* EVALSHA <sha> <nkeys> argv... */
static ngx_int_t
ngx_chat_redis_script_x(ngx_uint_t script, ngx_chat_redis_cb cb, void *data,
    int nkeys, int argc, const char **argv, const size_t *argvlen,
    ngx_uint_t durable)
{
    u_char       nk[NGX_INT_T_LEN];
    const char  *av[20];
    size_t       al[20];
    int          i;

    if (argc > 17) {
        return NGX_ERROR;
    }

    av[0] = "EVALSHA";
    al[0] = 7;
    av[1] = (const char *) ngx_chat_script_sha[script];
    al[1] = SHA_DIGEST_LENGTH * 2;
    av[2] = (const char *) nk;
    al[2] = ngx_sprintf(nk, "%d", nkeys) - nk;

    for (i = 0; i < argc; i++) {
        av[3 + i] = argv[i];
        al[3 + i] = argvlen[i];
    }

    return ngx_chat_redis_commandv_x(cb, data, argc + 3, av, al, durable);
}


ngx_int_t
ngx_chat_redis_script(ngx_uint_t script, ngx_chat_redis_cb cb, void *data,
    int nkeys, int argc, const char **argv, const size_t *argvlen)
{
    return ngx_chat_redis_script_x(script, cb, data, nkeys, argc, argv,
                                   argvlen, 0);
}


/*
 * An accept: with chat_redis_replicas N the callback gets the reply only
 * once a WAIT N on the master that ran it confirms N replicas have it (the
 * write then survives that master's failover), else no reply (the caller
 * answers `unavailable`; the client's retry with its client_id is
 * deduplicated). Without it, as ngx_chat_redis_script.
 */
ngx_int_t
ngx_chat_redis_script_durable(ngx_uint_t script, ngx_chat_redis_cb cb,
    void *data, int nkeys, int argc, const char **argv,
    const size_t *argvlen)
{
    return ngx_chat_redis_script_x(script, cb, data, nkeys, argc, argv,
                                   argvlen, 1);
}


/*
 * --- WAIT batching ---------------------------------------------------------
 *
 * A durable reply is held on the link it came from. One WAIT per link is in
 * flight at a time: it is sent at the end of the event-loop turn in which
 * the first reply was held (so a read's worth of replies share it), and it
 * covers exactly the replies held before it was sent; the ones held while
 * it is in flight wait for the next. WAIT runs after everything before it
 * on the connection, so its count is for all of them: one round trip per
 * batch, not per message. While a WAIT blocks, the commands behind it on
 * that link wait too (Redis serves a connection in order).
 */
static void ngx_chat_redis_copy_free(redisReply *c);


static redisReply *
ngx_chat_redis_copy(redisReply *r)
{
    size_t       i;
    redisReply  *c;

    c = ngx_alloc(sizeof(redisReply), ngx_cycle->log);
    if (c == NULL) {
        return NULL;
    }

    ngx_memcpy(c, r, sizeof(redisReply));
    c->str = NULL;
    c->element = NULL;
    c->elements = 0;

    if (r->str) {
        c->str = ngx_alloc(r->len + 1, ngx_cycle->log);
        if (c->str == NULL) {
            ngx_free(c);
            return NULL;
        }

        ngx_memcpy(c->str, r->str, r->len);
        c->str[r->len] = '\0';
    }

    if (r->type == REDIS_REPLY_ARRAY && r->elements) {
        c->element = ngx_alloc(r->elements * sizeof(redisReply *),
                               ngx_cycle->log);
        if (c->element == NULL) {
            goto failed;
        }

        for (i = 0; i < r->elements; i++) {
            c->element[i] = ngx_chat_redis_copy(r->element[i]);
            if (c->element[i] == NULL) {
                goto failed;
            }
            c->elements = i + 1;
        }
    }

    return c;

failed:

    ngx_chat_redis_copy_free(c);       /* what was copied so far */
    return NULL;
}


static void
ngx_chat_redis_copy_free(redisReply *c)
{
    size_t  i;

    for (i = 0; i < c->elements; i++) {
        ngx_chat_redis_copy_free(c->element[i]);
    }

    if (c->element) {
        ngx_free(c->element);
    }

    if (c->str) {
        ngx_free(c->str);
    }

    ngx_free(c);
}


/* answer the replies of q: with them (confirmed) or with none */
static void
ngx_chat_redis_answer(ngx_queue_t *q, ngx_uint_t ok)
{
    ngx_queue_t            *e;
    ngx_chat_redis_held_t  *h;

    while (!ngx_queue_empty(q)) {
        e = ngx_queue_head(q);
        ngx_queue_remove(e);
        h = ngx_queue_data(e, ngx_chat_redis_held_t, queue);

        if (h->cb) {
            h->cb(ok ? h->reply : NULL, h->data);
        }

        ngx_chat_redis_copy_free(h->reply);
        ngx_free(h);
    }
}


static void
ngx_chat_redis_fail_held(ngx_chat_redis_link_t *link)
{
    ngx_queue_t  q;

    if (link->wait_ev.posted) {
        ngx_delete_posted_event(&link->wait_ev);
    }

    if (link->held.next == NULL) {      /* never initialised */
        return;
    }

    /* the callbacks may send again: take the lists off the link first */
    ngx_queue_init(&q);

    if (!ngx_queue_empty(&link->waited)) {
        ngx_queue_add(&q, &link->waited);
        ngx_queue_init(&link->waited);
    }

    if (!ngx_queue_empty(&link->held)) {
        ngx_queue_add(&q, &link->held);
        ngx_queue_init(&link->held);
    }

    if (!ngx_queue_empty(&q)) {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: redis %s link gone, unconfirmed accepts fail",
                       link->node->host);
    }

    link->nheld = 0;
    link->waiting = 0;
    ngx_chat_redis_answer(&q, 0);
}


static void ngx_chat_redis_wait_send(ngx_chat_redis_link_t *link);


static void
ngx_chat_redis_wait_reply(redisAsyncContext *ac, void *r, void *data)
{
    ngx_chat_redis_link_t  *link = data;
    redisReply             *reply = r;
    ngx_queue_t             q;
    ngx_uint_t              ok;

    (void) ac;

    link->waiting = 0;

    if (link->pending) {
        link->pending--;
        link->last_reply = ngx_current_msec;
    }

    ok = reply && reply->type == REDIS_REPLY_INTEGER
         && reply->integer >= ngx_chat_redis_replicas;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat: redis %s:%d WAIT answered %i",
                   link->node->host, link->node->port,
                   reply && reply->type == REDIS_REPLY_INTEGER
                   ? (ngx_int_t) reply->integer : (ngx_int_t) -1);

    if (!ok && reply) {
        ngx_chat_stat_inc(redis_wait_short);
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis %s:%d: WAIT confirmed %i of %d replicas "
                      "in %d ms, its accepts answered unavailable",
                      link->node->host, link->node->port,
                      reply->type == REDIS_REPLY_INTEGER
                      ? (ngx_int_t) reply->integer : (ngx_int_t) -1,
                      ngx_chat_redis_replicas, ngx_chat_redis_wait_ms);
    }

    ngx_queue_init(&q);

    if (!ngx_queue_empty(&link->waited)) {
        ngx_queue_add(&q, &link->waited);
        ngx_queue_init(&link->waited);
    }

    ngx_chat_redis_answer(&q, ok);

    if (reply == NULL) {
        /* the context is going: on_disconnect fails what is held */
        return;
    }

    /* the replies held meanwhile: the next WAIT, now */
    ngx_chat_redis_wait_send(link);
}


static void
ngx_chat_redis_wait_send(ngx_chat_redis_link_t *link)
{
    ngx_queue_t  q;

    if (link->waiting || ngx_queue_empty(&link->held)) {
        return;
    }

    if (link->ac == NULL || !link->connected) {
        ngx_chat_redis_fail_held(link);
        return;
    }

    ngx_queue_add(&link->waited, &link->held);
    ngx_queue_init(&link->held);
    link->nheld = 0;

    if (redisAsyncCommand(link->ac, ngx_chat_redis_wait_reply, link,
                          "WAIT %d %d", ngx_chat_redis_replicas,
                          ngx_chat_redis_wait_ms)
        != REDIS_OK)
    {
        ngx_queue_init(&q);
        ngx_queue_add(&q, &link->waited);
        ngx_queue_init(&link->waited);
        ngx_chat_redis_answer(&q, 0);
        return;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat: redis %s:%d WAIT sent",
                   link->node->host, link->node->port);

    link->waiting = 1;
    link->pending++;
    ngx_chat_stat_inc(redis_waits);
}


static void
ngx_chat_redis_wait_handler(ngx_event_t *ev)
{
    ngx_chat_redis_wait_send(ev->data);
}


static void
ngx_chat_redis_hold(ngx_chat_redis_link_t *link, ngx_chat_redis_cb cb,
    void *data, redisReply *reply)
{
    ngx_chat_redis_held_t  *h;

    h = NULL;

    if (link->nheld < NGX_CHAT_REDIS_MAX_HELD) {
        h = ngx_alloc(sizeof(ngx_chat_redis_held_t), ngx_cycle->log);
    }

    if (h) {
        h->reply = ngx_chat_redis_copy(reply);
        if (h->reply == NULL) {
            ngx_free(h);
            h = NULL;
        }
    }

    if (h == NULL) {
        /* not confirmable: not acknowledged */
        if (cb) {
            cb(NULL, data);
        }
        return;
    }

    h->cb = cb;
    h->data = data;
    ngx_queue_insert_tail(&link->held, &h->queue);
    link->nheld++;
    ngx_chat_stat_inc(redis_waited);

    if (!link->waiting && !link->wait_ev.posted) {
        ngx_post_event(&link->wait_ev, &ngx_posted_events);
    }
}


/* Write what is queued for Redis now, not when this event-loop turn ends
 * (a link is ready only while it has a context). */
void
ngx_chat_redis_flush(void)
{
    ngx_uint_t  i;

    for (i = 0; i < ngx_chat_nnodes; i++) {
        if (ngx_chat_nodes[i].cmd.ready) {
            redisAsyncHandleWrite(ngx_chat_nodes[i].cmd.ac);
        }
    }
}


/* --- watchdog: a link whose replies stopped is dropped -------------------- */

static void
ngx_chat_redis_watchdog_handler(ngx_event_t *ev)
{
    ngx_uint_t              i;
    ngx_chat_redis_link_t  *l;

    for (i = 0; i < ngx_chat_nnodes; i++) {
        l = &ngx_chat_nodes[i].cmd;

        if (l->ac && l->pending
            && ngx_current_msec - l->last_reply
               > NGX_CHAT_REDIS_STALL + (ngx_msec_t) ngx_chat_redis_wait_ms)
        {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "chat: redis %s:%d stopped answering (%ui pending), "
                          "reconnecting", l->node->host, l->node->port,
                          l->pending);
            redisAsyncDisconnect(l->ac);
        }
    }

    if (!ngx_exiting) {
        ngx_add_timer(ev, 1000);
    }
}


/* --- process hooks -------------------------------------------------------- */

/*
 * chat_redis: the workers' parser too (libchat/chat_url.c). One URL is a
 * single node; with chat_redis_cluster on, every URL is a seed of one
 * cluster (one password for all, db 0: a cluster has no other).
 */
ngx_int_t
ngx_chat_redis_check_urls(ngx_array_t *urls, ngx_flag_t cluster, ngx_log_t *log)
{
    ngx_uint_t         i;
    ngx_str_t         *url;
    chat_redis_url_t   u;

    url = urls->elts;

    if (urls->nelts > 1 && !cluster) {
        ngx_log_error(NGX_LOG_EMERG, log, 0,
                      "chat_redis: several URLs are the seeds of a cluster: "
                      "add chat_redis_cluster on");
        return NGX_ERROR;
    }

    if (urls->nelts > NGX_CHAT_REDIS_MAX_SEEDS) {
        ngx_log_error(NGX_LOG_EMERG, log, 0, "chat_redis: at most %d seeds",
                      NGX_CHAT_REDIS_MAX_SEEDS);
        return NGX_ERROR;
    }

    for (i = 0; i < urls->nelts; i++) {
        if (chat_redis_url_parse((const char *) url[i].data, url[i].len, &u)
            != 0)
        {
            ngx_log_error(NGX_LOG_EMERG, log, 0,
                          "chat_redis \"%V\" is not redis://[:password@]"
                          "host[:port][/db] or unix://[:password@]/path"
                          "[?db=N]", &url[i]);
            return NGX_ERROR;
        }

        if (cluster && u.db != 0) {
            ngx_log_error(NGX_LOG_EMERG, log, 0,
                          "chat_redis \"%V\": a cluster has database 0 only",
                          &url[i]);
            return NGX_ERROR;
        }

        if (cluster && u.port == 0) {
            /* nodes announce host:port in CLUSTER SLOTS and redirects */
            ngx_log_error(NGX_LOG_EMERG, log, 0,
                          "chat_redis \"%V\": a cluster is reached over TCP, "
                          "not a unix socket", &url[i]);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_redis_init_process(ngx_cycle_t *cycle)
{
    u_char                 *p;
    ngx_uint_t              i;
    ngx_str_t              *url;
    unsigned char           md[SHA_DIGEST_LENGTH];
    chat_redis_url_t        u;
    ngx_chat_redis_node_t  *n;
    ngx_chat_main_conf_t   *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_chat_module);

    for (i = 0; i < CHAT_LUA_N; i++) {
        SHA1((const unsigned char *) chat_lua[i].src,
             ngx_strlen(chat_lua[i].src), md);
        ngx_hex_dump(ngx_chat_script_sha[i], md, SHA_DIGEST_LENGTH);
        ngx_chat_script_sha[i][SHA_DIGEST_LENGTH * 2] = '\0';
    }

    /* chat:w:<host>:<pid>: this worker's delivery channel */
    p = ngx_snprintf(ngx_chat_channel_buf, sizeof(ngx_chat_channel_buf) - 1,
                     "chat:w:%V:%P", &cycle->hostname, ngx_pid);
    ngx_chat_worker_channel.data = ngx_chat_channel_buf;
    ngx_chat_worker_channel.len = p - ngx_chat_channel_buf;

    ngx_chat_sharded = cmcf->redis_cluster == 1;
    ngx_chat_redis_replicas = (int) cmcf->redis_replicas;
    ngx_chat_redis_wait_ms = (int) cmcf->redis_wait_timeout;
    chat_cluster_map_init(&ngx_chat_map);
    url = cmcf->redis_urls->elts;

    for (i = 0; i < cmcf->redis_urls->nelts; i++) {
        if (chat_redis_url_parse((const char *) url[i].data, url[i].len, &u)
            != 0)
        {
            return NGX_ERROR;
        }

        ngx_cpystrn(ngx_chat_redis_pass, (u_char *) u.password,
                    sizeof(ngx_chat_redis_pass));
        ngx_chat_redis_db = u.db;

        if (!ngx_chat_sharded) {
            n = &ngx_chat_nodes[0];
            ngx_cpystrn((u_char *) n->host, (u_char *) u.host, sizeof(n->host));
            n->port = u.port;
            n->used = 1;
            ngx_chat_nnodes = 1;

            ngx_chat_redis_link_init(&n->cmd, n, 0);
            ngx_chat_redis_link_init(&n->sub, n, 1);
            ngx_chat_redis_connect(&n->cmd);
            ngx_chat_redis_connect(&n->sub);
            break;
        }

        /* each seed dials its command link; the first up asks the map */
        n = ngx_chat_redis_node_get(u.host, u.port);
        if (n) {
            n->seed = 1;
        }
    }

    if (ngx_chat_sharded) {
        ngx_chat_refresh_ev.handler = ngx_chat_redis_refresh_handler;
        ngx_chat_refresh_ev.data = &ngx_chat_watchdog_conn;
        ngx_chat_refresh_ev.log = cycle->log;
        ngx_chat_refresh_ev.cancelable = 1;
        ngx_add_timer(&ngx_chat_refresh_ev, NGX_CHAT_REDIS_REFRESH_FAST);
    }

    ngx_chat_watchdog_conn.fd = (ngx_socket_t) -1;
    ngx_chat_watchdog.handler = ngx_chat_redis_watchdog_handler;
    ngx_chat_watchdog.data = &ngx_chat_watchdog_conn;
    ngx_chat_watchdog.log = cycle->log;
    ngx_chat_watchdog.cancelable = 1;
    ngx_add_timer(&ngx_chat_watchdog, 1000);

    return NGX_OK;
}


void
ngx_chat_redis_exit_process(ngx_cycle_t *cycle)
{
    int                     done, i;
    ngx_uint_t              k;
    struct pollfd           pfd;
    redisAsyncContext      *ac;
    ngx_chat_redis_node_t  *n;

    /*
     * The worker is exiting: what the closing sessions queued (their
     * registry removals) is written out before the links go, waiting at
     * most half a second per node. Replies are not awaited.
     */
    for (k = 0; k < ngx_chat_nnodes; k++) {
        n = &ngx_chat_nodes[k];

        if (n->cmd.ac == NULL) {
            continue;
        }

        done = 0;

        for (i = 0; i < 50 && !done; i++) {
            if (redisBufferWrite(&n->cmd.ac->c, &done) == REDIS_ERR) {
                break;
            }

            if (!done) {
                pfd.fd = n->cmd.ac->c.fd;
                pfd.events = POLLOUT;
                pfd.revents = 0;
                (void) poll(&pfd, 1, 10);
            }
        }
    }

    /*
     * Freeing a context calls the callbacks of its pending commands with no
     * reply; a callback that reacts by sending (a session closing on the
     * failure sends its unregister) must find the links not ready, not
     * reach for a context that is being freed.
     */
    for (k = 0; k < ngx_chat_nnodes; k++) {
        ngx_chat_nodes[k].cmd.ready = 0;
        ngx_chat_nodes[k].sub.ready = 0;
        ngx_chat_nodes[k].mapped = 0;
    }

    ngx_chat_map_ok = 0;

    for (k = 0; k < ngx_chat_nnodes; k++) {
        n = &ngx_chat_nodes[k];

        if (n->sub.ac) {
            ac = n->sub.ac;
            n->sub.ac = NULL;
            redisAsyncFree(ac);
        }

        if (n->cmd.ac) {
            ac = n->cmd.ac;
            n->cmd.ac = NULL;
            redisAsyncFree(ac);
        }

        ngx_chat_redis_ssub_close(n);
        ngx_chat_redis_fail_held(&n->cmd);
    }

    if (ngx_chat_counted) {
        ngx_chat_counted = 0;
        ngx_chat_stat_dec(redis_up);
    }
}
