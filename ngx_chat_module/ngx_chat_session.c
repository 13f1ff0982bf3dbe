/*
 * Sessions: what the delivery code knows of a client, whatever its
 * transport. Registry and presence in Redis, the per-worker index of
 * sessions by user, the bounded outbound queue, client frames, delivery of
 * what Redis pub/sub brings to this worker, watches, and the per-worker
 * timer that refreshes the registry and notices a graceful shutdown.
 */
#include "ngx_chat.h"

#include <hiredis/hiredis.h>


#define NGX_CHAT_MAX_WATCHES  250     /* watched users per session */
#define NGX_CHAT_TICK         250     /* ms */


typedef struct {
    ngx_rbtree_node_t   node;
    ngx_queue_t         links;        /* ngx_chat_watch_link_t.watch_link */
    u_char              len;
    u_char              id[NGX_CHAT_USER_MAX];
} ngx_chat_watch_t;


typedef struct {
    ngx_queue_t          watch_link;
    ngx_queue_t          session_link;
    ngx_chat_session_t  *session;
    ngx_chat_watch_t    *watch;
} ngx_chat_watch_link_t;


ngx_queue_t                   ngx_chat_sessions;
static ngx_rbtree_t           ngx_chat_users;
static ngx_rbtree_node_t      ngx_chat_users_sentinel;
static ngx_rbtree_t           ngx_chat_watches;
static ngx_rbtree_node_t      ngx_chat_watches_sentinel;
static uint64_t               ngx_chat_next_sid;
static ngx_event_t            ngx_chat_tick;
static ngx_connection_t       ngx_chat_tick_conn;
static ngx_msec_t             ngx_chat_last_refresh;
static ngx_uint_t             ngx_chat_drained;


static void ngx_chat_session_free(ngx_chat_session_t *s);
static void ngx_chat_unwatch_all(ngx_chat_session_t *s);


/* --- shared payloads ------------------------------------------------------ */

ngx_chat_shbuf_t *
ngx_chat_shbuf_alloc(size_t len)
{
    ngx_chat_shbuf_t  *b;

    b = ngx_alloc(offsetof(ngx_chat_shbuf_t, data) + len, ngx_cycle->log);
    if (b == NULL) {
        return NULL;
    }

    b->refs = 1;
    b->len = len;

    return b;
}


void
ngx_chat_shbuf_release(ngx_chat_shbuf_t *b)
{
    if (--b->refs == 0) {
        ngx_free(b);
    }
}


/* --- index of local sessions by user and of watches ------------------------ */

static void
ngx_chat_id_insert(ngx_rbtree_node_t *temp, ngx_rbtree_node_t *node,
    ngx_rbtree_node_t *sentinel)
{
    /* both ngx_chat_user_t and ngx_chat_watch_t start with node, len, id */
    ngx_chat_user_t     *n, *t;
    ngx_rbtree_node_t  **p;

    for ( ;; ) {
        n = (ngx_chat_user_t *) node;
        t = (ngx_chat_user_t *) temp;

        if (node->key != temp->key) {
            p = (node->key < temp->key) ? &temp->left : &temp->right;

        } else {
            p = (ngx_memn2cmp(n->id, t->id, n->len, t->len) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


static ngx_rbtree_node_t *
ngx_chat_id_lookup(ngx_rbtree_t *tree, u_char *id, size_t len,
    uint32_t hash)
{
    ngx_int_t           rc;
    ngx_chat_user_t    *u;
    ngx_rbtree_node_t  *node, *sentinel;

    node = tree->root;
    sentinel = tree->sentinel;

    while (node != sentinel) {
        if (hash != node->key) {
            node = (hash < node->key) ? node->left : node->right;
            continue;
        }

        u = (ngx_chat_user_t *) node;
        rc = ngx_memn2cmp(id, u->id, len, u->len);

        if (rc == 0) {
            return node;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


static ngx_chat_user_t *
ngx_chat_user_find(u_char *id, size_t len)
{
    return (ngx_chat_user_t *) ngx_chat_id_lookup(&ngx_chat_users, id, len,
                                                  ngx_crc32_short(id, len));
}


ngx_int_t
ngx_chat_sessions_init_process(ngx_cycle_t *cycle);


/* --- session lifecycle ------------------------------------------------------ */

static u_char *
ngx_chat_session_log_handler(ngx_log_t *log, u_char *buf, size_t len)
{
    u_char              *p = buf;
    ngx_chat_session_t  *s = log->data;

    if (log->action) {
        p = ngx_snprintf(p, len, " while %s", log->action);
        len -= p - buf;
    }

    if (s && s->user) {
        p = ngx_snprintf(p, len, ", chat user: %*s, device: %*s",
                         (size_t) s->user->len, s->user->id,
                         (size_t) s->dev_len, s->device);
    }

    return p;
}


ngx_chat_session_t *
ngx_chat_session_create(ngx_connection_t *c, ngx_chat_loc_conf_t *conf,
    ngx_chat_identity_t *id, ngx_uint_t transport)
{
    uint32_t             hash;
    ngx_chat_user_t     *u;
    ngx_chat_session_t  *s;

    s = ngx_calloc(sizeof(ngx_chat_session_t), c->log);
    if (s == NULL) {
        return NULL;
    }

    hash = ngx_crc32_short(id->user, id->user_len);
    u = ngx_chat_user_find(id->user, id->user_len);

    if (u == NULL) {
        u = ngx_alloc(sizeof(ngx_chat_user_t), c->log);
        if (u == NULL) {
            ngx_free(s);
            return NULL;
        }

        u->node.key = hash;
        u->len = (u_char) id->user_len;
        ngx_memcpy(u->id, id->user, id->user_len);
        ngx_queue_init(&u->sessions);
        ngx_rbtree_insert(&ngx_chat_users, &u->node);
    }

    s->connection = c;
    s->conf = conf;
    s->user = u;
    s->transport = transport;
    s->id = ++ngx_chat_next_sid;
    s->dev_len = (u_char) id->dev_len;
    ngx_memcpy(s->device, id->device, id->dev_len);

    /*
     * Until its replay starts (the registry answered, the cursor is known),
     * a new session takes no durable event live: the replay reads it from
     * the inbox. Taken live before, it was queued with a cursor the replay
     * then read again (the registry's answer resets sent_cursor), and a
     * device got the event twice (a long-poll test caught it).
     */
    s->replaying = 1;

    ngx_queue_init(&s->watches);
    ngx_queue_insert_tail(&u->sessions, &s->user_link);
    ngx_queue_insert_tail(&ngx_chat_sessions, &s->all_link);

    s->log = *c->log;
    s->log.handler = ngx_chat_session_log_handler;
    s->log.data = s;
    s->log.action = NULL;

    if (transport == NGX_CHAT_T_WS) {
        ngx_chat_stat_inc(conn_ws);

    } else {
        ngx_chat_stat_inc(conn_poll);
    }

    ngx_chat_stat_inc(accepted);

    /* state changes of a session are logged at debug level: nginx built
     * --with-debug and "error_log ... debug" show one session's life */
    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, &s->log, 0,
                   "chat: session %uL created, %s", s->id,
                   transport == NGX_CHAT_T_WS ? "websocket" : "long-poll");

    return s;
}


/* "<channel>|<device>|<session id>": one registry entry per session */
static size_t
ngx_chat_session_member(ngx_chat_session_t *s, u_char *buf)
{
    return ngx_sprintf(buf, "%V|%*s|%uL", &ngx_chat_worker_channel,
                       (size_t) s->dev_len, s->device, s->id) - buf;
}


static size_t
ngx_chat_user_key(ngx_chat_user_t *u, const char *suffix, u_char *buf)
{
    return ngx_sprintf(buf, "chat:{u:%*s}:%s", (size_t) u->len, u->id,
                       suffix) - buf;
}


typedef struct {
    ngx_chat_session_t  *s;
    void               (*done)(ngx_chat_session_t *s, ngx_int_t rc);
} ngx_chat_register_ctx_t;


static void
ngx_chat_session_registered(void *r, void *data)
{
    redisReply               *reply = r;
    ngx_chat_register_ctx_t  *ctx = data;
    ngx_chat_session_t       *s = ctx->s;
    void                    (*done)(ngx_chat_session_t *s, ngx_int_t rc);

    done = ctx->done;
    ngx_free(ctx);

    s->refs--;

    if (s->closed) {
        ngx_chat_session_release(s);
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 3
        || reply->element[0]->type != REDIS_REPLY_INTEGER)
    {
        if (reply && reply->type == REDIS_REPLY_ERROR) {
            ngx_log_error(NGX_LOG_ERR, &s->log, 0,
                          "chat: registry: %s", reply->str);
        }
        done(s, NGX_ERROR);
        return;
    }

    if (reply->element[0]->integer < 0) {
        done(s, NGX_DECLINED);
        return;
    }

    s->registered = 1;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, &s->log, 0,
                   "chat: session %uL registered, %i sessions of the user",
                   s->id, (ngx_int_t) reply->element[0]->integer);

    if (reply->element[1]->type == REDIS_REPLY_STRING) {
        s->cursor = ngx_atoof((u_char *) reply->element[1]->str,
                              reply->element[1]->len);
        if (s->cursor == (uint64_t) NGX_ERROR) {
            s->cursor = 0;
        }
    }

    /* the inbox's trim point, until the transport has told the client
     * (hello): sent_cursor is not used before the replay starts */
    s->sent_cursor = 0;

    if (reply->element[2]->type == REDIS_REPLY_STRING) {
        s->sent_cursor = ngx_atoof((u_char *) reply->element[2]->str,
                                   reply->element[2]->len);
        if (s->sent_cursor == (uint64_t) NGX_ERROR) {
            s->sent_cursor = 0;
        }
    }

    done(s, NGX_OK);
}


/*
 * Register the session in the user's connection registry (and so make the
 * user present). done(s, rc): NGX_OK, NGX_DECLINED (too many connections),
 * NGX_ERROR (Redis unavailable).
 */
void
ngx_chat_session_register(ngx_chat_session_t *s,
    void (*done)(ngx_chat_session_t *s, ngx_int_t rc))
{
    u_char                    member[160], conns[96], acked[96], last[96],
                              set[96], now[32], ttl[32], max[32];
    const char               *argv[10];
    size_t                    argl[10];
    ngx_chat_main_conf_t     *cmcf;
    ngx_chat_register_ctx_t  *ctx;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

    ctx = ngx_alloc(sizeof(ngx_chat_register_ctx_t), &s->log);
    if (ctx == NULL) {
        done(s, NGX_ERROR);
        return;
    }

    ctx->s = s;
    ctx->done = done;

    argv[0] = (char *) conns;
    argl[0] = ngx_chat_user_key(s->user, "conns", conns);
    argv[1] = (char *) acked;
    argl[1] = ngx_chat_user_key(s->user, "acked", acked);
    argv[2] = (char *) last;
    argl[2] = ngx_chat_user_key(s->user, "last", last);
    argv[3] = (char *) set;
    argl[3] = ngx_chat_user_key(s->user, "set", set);
    argv[4] = (char *) member;
    argl[4] = ngx_chat_session_member(s, member);
    argv[5] = (char *) now;
    argl[5] = ngx_sprintf(now, "%L", ngx_chat_now_ms())
              - now;
    argv[6] = (char *) ttl;
    argl[6] = ngx_sprintf(ttl, "%M", (ngx_msec_t) cmcf->registry_ttl * 1000)
              - ttl;
    argv[7] = (char *) max;
    argl[7] = ngx_sprintf(max, "%ui", cmcf->max_conns_user) - max;
    argv[8] = (char *) s->user->id;
    argl[8] = s->user->len;
    argv[9] = (char *) s->device;
    argl[9] = s->dev_len;

    if (ngx_chat_redis_script(CHAT_LUA_REGISTER,
                              ngx_chat_session_registered, ctx, 4, 10,
                              argv, argl) != NGX_OK)
    {
        ngx_free(ctx);
        done(s, NGX_ERROR);
        return;
    }

    s->refs++;
}


/*
 * The registry refused a session still waiting in its HTTP request (WebSocket
 * handshake or long-poll): forget the session and answer 429 (too many
 * connections for the user) or 503.
 */
void
ngx_chat_session_refuse(ngx_chat_session_t *s, ngx_int_t rc)
{
    ngx_int_t            hrc;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = s->request;
    c = r->connection;

    s->request = NULL;
    ngx_chat_session_close(s);

    if (rc == NGX_DECLINED) {
        hrc = ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                  "rate_limited",
                                  "too many connections for this user");
    } else {
        hrc = ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                  "unavailable", "try again later");
    }

    ngx_http_finalize_request(r, hrc);
    ngx_http_run_posted_requests(c);
}


static void
ngx_chat_session_unregister(ngx_chat_session_t *s)
{
    u_char        member[160], conns[96], seen[96], set[96], now[32];
    const char   *argv[6];
    size_t        argl[6];

    argv[0] = (char *) conns;
    argl[0] = ngx_chat_user_key(s->user, "conns", conns);
    argv[1] = (char *) seen;
    argl[1] = ngx_chat_user_key(s->user, "seen", seen);
    argv[2] = (char *) set;
    argl[2] = ngx_chat_user_key(s->user, "set", set);
    argv[3] = (char *) member;
    argl[3] = ngx_chat_session_member(s, member);
    argv[4] = (char *) now;
    argl[4] = ngx_sprintf(now, "%L", ngx_chat_now_ms())
              - now;
    argv[5] = (char *) s->user->id;
    argl[5] = s->user->len;

    /* fire and forget: an entry left behind expires with the registry TTL */
    (void) ngx_chat_redis_script(CHAT_LUA_UNREGISTER, NULL, NULL, 3, 6,
                                 argv, argl);
}


static void
ngx_chat_out_free_all(ngx_chat_session_t *s)
{
    ngx_chat_out_t  *o, *next;

    for (o = s->out_head; o; o = next) {
        next = o->next;
        ngx_chat_shbuf_release(o->buf);
        ngx_free(o);
    }

    s->out_head = NULL;
    s->out_tail = NULL;
    s->out_count = 0;
    s->out_bytes = 0;
}


/*
 * The transport is gone: leave the registry and the local index. The memory
 * stays until the last pending Redis reply has come back.
 */
void
ngx_chat_session_close(ngx_chat_session_t *s)
{
    ngx_chat_user_t  *u;

    if (s->closed) {
        return;
    }

    /* an acknowledgement still waiting for chat_ack_delay goes now, before
     * the registry entry does */
    ngx_chat_msg_ack_flush(s);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, &s->log, 0,
                   "chat: session %uL closed, %uD frames queued, %ui replies "
                   "pending", s->id, s->out_count, s->refs);

    s->closed = 1;
    s->connection = NULL;
    s->request = NULL;

    if (s->registered) {
        ngx_chat_session_unregister(s);
        s->registered = 0;
    }

    ngx_chat_unwatch_all(s);
    ngx_chat_out_free_all(s);

    if (s->rbuf) {
        ngx_free(s->rbuf);
        s->rbuf = NULL;
    }

    if (s->msg) {
        ngx_free(s->msg);
        s->msg = NULL;
    }

    u = s->user;
    ngx_queue_remove(&s->user_link);
    ngx_queue_remove(&s->all_link);

    if (ngx_queue_empty(&u->sessions)) {
        ngx_rbtree_delete(&ngx_chat_users, &u->node);
        ngx_free(u);
    }

    s->user = NULL;

    if (s->transport == NGX_CHAT_T_WS) {
        ngx_chat_stat_dec(conn_ws);

    } else {
        ngx_chat_stat_dec(conn_poll);
    }

    ngx_chat_session_release(s);
}


void
ngx_chat_session_release(ngx_chat_session_t *s)
{
    if (s->closed && s->refs == 0) {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: session %uL freed", s->id);
        ngx_chat_session_free(s);
    }
}


static void
ngx_chat_session_free(ngx_chat_session_t *s)
{
    ngx_free(s);
}


/* --- outbound queue ---------------------------------------------------------- */

void
ngx_chat_out_append(ngx_chat_session_t *s, ngx_chat_out_t *o)
{
    if (s->out_tail) {
        s->out_tail->next = o;

    } else {
        s->out_head = o;
    }

    s->out_tail = o;
    s->out_count++;
    s->out_bytes += o->hlen + o->buf->len;
}


/*
 * Queue [prefix][b] for the client. A consumer whose queue is over its
 * bounds is cut off alone; its durable events stay in its inbox.
 */
ngx_int_t
ngx_chat_session_send_shared(ngx_chat_session_t *s, ngx_chat_shbuf_t *b,
    u_char *prefix, size_t plen)
{
    size_t           len;
    ngx_chat_out_t  *o;

    if (s->closed || s->closing) {
        return NGX_DECLINED;
    }

    len = plen + b->len;

    if (s->out_count >= s->conf->out_frames
        || s->out_bytes + len + CHAT_WS_MAX_SERVER_HDR > s->conf->out_bytes)
    {
        ngx_log_error(NGX_LOG_WARN, &s->log, 0,
                      "chat: slow consumer, %uD frames and %uD bytes queued",
                      s->out_count, s->out_bytes);
        ngx_chat_stat_inc(closed_slow);

        if (s->transport == NGX_CHAT_T_WS) {
            ngx_chat_ws_close(s, 1008, "slow consumer");
        }

        return NGX_ERROR;
    }

    o = ngx_alloc(sizeof(ngx_chat_out_t), &s->log);
    if (o == NULL) {
        return NGX_ERROR;
    }

    o->next = NULL;
    o->buf = b;
    o->sent = 0;
    o->opcode = CHAT_WS_OP_TEXT;

    if (s->transport == NGX_CHAT_T_WS) {
        o->hlen = (uint8_t) chat_ws_write_header(o->head, CHAT_WS_OP_TEXT, 1,
                                                 len);

    } else {
        o->hlen = 0;
    }

    ngx_memcpy(o->head + o->hlen, prefix, plen);
    o->hlen += (uint8_t) plen;

    b->refs++;

    ngx_chat_out_append(s, o);

    if (s->transport == NGX_CHAT_T_WS) {
        ngx_chat_ws_flush(s);

    } else {
        ngx_chat_poll_wake(s);
    }

    return NGX_OK;
}


/*
 * Typing and presence: queued only while the session's outbound queue is
 * under half its bounds (the low-water mark), else dropped and counted.
 * An ephemeral event never costs a recipient its connection: a flood of
 * them aimed at one user fills nothing (durable events still have the
 * whole queue).
 */
ngx_int_t
ngx_chat_session_send_ephemeral(ngx_chat_session_t *s, ngx_chat_shbuf_t *b)
{
    if (s->out_count >= s->conf->out_frames / 2
        || s->out_bytes + b->len + 1 + CHAT_WS_MAX_SERVER_HDR
           > s->conf->out_bytes / 2)
    {
        ngx_chat_stat_inc(ephemeral_dropped);
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, &s->log, 0,
                       "chat: ephemeral event dropped, %uD frames and %uD "
                       "bytes queued", s->out_count, s->out_bytes);
        return NGX_DECLINED;
    }

    return ngx_chat_session_send_shared(s, b, (u_char *) "{", 1);
}


/* Queue one JSON object (a whole frame) for this session alone. */
ngx_int_t
ngx_chat_session_send(ngx_chat_session_t *s, u_char *json, size_t len)
{
    ngx_int_t          rc;
    ngx_chat_shbuf_t  *b;

    if (len < 2 || json[0] != '{') {
        return NGX_ERROR;
    }

    b = ngx_chat_shbuf_alloc(len - 1);
    if (b == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(b->data, json + 1, len - 1);

    rc = ngx_chat_session_send_shared(s, b, (u_char *) "{", 1);
    ngx_chat_shbuf_release(b);

    return rc;
}


void
ngx_chat_session_error(ngx_chat_session_t *s, const char *code,
    const char *message, chat_proto_str_t *client_id)
{
    u_char  buf[512], *p;

    p = ngx_sprintf(buf, "{\"type\":\"error\",\"code\":\"%s\","
                    "\"message\":\"%s\"", code, message);

    if (client_id && client_id->len && client_id->len < 300) {
        /* raw, still-escaped JSON string content: valid between quotes */
        p = ngx_sprintf(p, ",\"client_id\":\"%*s\"", (size_t) client_id->len,
                        client_id->p);
    }

    *p++ = '}';

    ngx_chat_stat_inc(errors_sent);

    (void) ngx_chat_session_send(s, buf, p - buf);
}


/* rate_limited: a budget is spent; retry_after in milliseconds */
void
ngx_chat_session_limited(ngx_chat_session_t *s, const char *message,
    int64_t wait)
{
    u_char  buf[256], *p;

    p = ngx_sprintf(buf, "{\"type\":\"error\",\"code\":\"rate_limited\","
                    "\"message\":\"%s\",\"retry_after\":%L}", message, wait);

    ngx_chat_stat_inc(errors_sent);

    (void) ngx_chat_session_send(s, buf, p - buf);
}


/* --- watches and presence ------------------------------------------------------ */

static ngx_chat_watch_t *
ngx_chat_watch_find(u_char *id, size_t len)
{
    return (ngx_chat_watch_t *) ngx_chat_id_lookup(&ngx_chat_watches, id, len,
                                                   ngx_crc32_short(id, len));
}


static void
ngx_chat_watch_channel(ngx_chat_watch_t *w, ngx_uint_t on)
{
    u_char     buf[80];
    ngx_str_t  ch;

    ch.data = buf;
    ch.len = ngx_sprintf(buf, "chat:p:%*s", (size_t) w->len, w->id) - buf;

    (void) ngx_chat_redis_subscribe(&ch, on);
}


void
ngx_chat_presence_resubscribe(void)
{
    ngx_rbtree_node_t  *node;

    if (ngx_chat_watches.root == ngx_chat_watches.sentinel) {
        return;
    }

    for (node = ngx_rbtree_min(ngx_chat_watches.root, ngx_chat_watches.sentinel);
         node;
         node = ngx_rbtree_next(&ngx_chat_watches, node))
    {
        ngx_chat_watch_channel((ngx_chat_watch_t *) node, 1);
    }
}


static void
ngx_chat_unwatch_link(ngx_chat_watch_link_t *l)
{
    ngx_chat_watch_t  *w = l->watch;

    ngx_queue_remove(&l->watch_link);
    ngx_queue_remove(&l->session_link);
    l->session->nwatches--;
    ngx_free(l);

    if (ngx_queue_empty(&w->links)) {
        ngx_chat_watch_channel(w, 0);
        ngx_rbtree_delete(&ngx_chat_watches, &w->node);
        ngx_free(w);
    }
}


static void
ngx_chat_unwatch_all(ngx_chat_session_t *s)
{
    ngx_queue_t  *q;

    while (!ngx_queue_empty(&s->watches)) {
        q = ngx_queue_head(&s->watches);
        ngx_chat_unwatch_link(ngx_queue_data(q, ngx_chat_watch_link_t,
                                             session_link));
    }
}


static ngx_chat_watch_link_t *
ngx_chat_session_watching(ngx_chat_session_t *s, ngx_chat_watch_t *w)
{
    ngx_queue_t            *q;
    ngx_chat_watch_link_t  *l;

    for (q = ngx_queue_head(&s->watches);
         q != ngx_queue_sentinel(&s->watches);
         q = ngx_queue_next(q))
    {
        l = ngx_queue_data(q, ngx_chat_watch_link_t, session_link);
        if (l->watch == w) {
            return l;
        }
    }

    return NULL;
}


typedef struct {
    ngx_chat_session_t  *s;           /* NULL: answer an HTTP request */
    ngx_http_request_t  *r;
    u_char               len;
    u_char               id[NGX_CHAT_USER_MAX];
} ngx_chat_presence_ctx_t;


/* {"type":"presence","user":U,"online":B,"last_seen":ms|null} */
u_char *
ngx_chat_presence_json(u_char *p, u_char *user, size_t len, void *r,
    ngx_uint_t with_type)
{
    ngx_uint_t   online;
    redisReply  *reply = r, *seen;

    online = reply->element[0]->integer == 1;
    seen = reply->element[1];

    p = ngx_sprintf(p, "{%s\"user\":\"%*s\",\"online\":%s,\"last_seen\":",
                    with_type ? "\"type\":\"presence\"," : "", len, user,
                    online ? "true" : "false");

    if (!online && seen->type == REDIS_REPLY_STRING && seen->len > 0
        && seen->len < 20)
    {
        p = ngx_sprintf(p, "%*s}", (size_t) seen->len, seen->str);

    } else {
        p = ngx_sprintf(p, "null}");
    }

    return p;
}


ngx_int_t
ngx_chat_presence_reply_ok(void *r)
{
    redisReply  *reply = r;

    return reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2
           && reply->element[0]->type == REDIS_REPLY_INTEGER;
}


static void
ngx_chat_presence_once(void *r, void *data)
{
    redisReply               *reply = r;
    ngx_chat_presence_ctx_t  *ctx = data;
    ngx_chat_session_t       *s = ctx->s;
    u_char                    buf[256], *p;

    s->refs--;

    if (!s->closed && ngx_chat_presence_reply_ok(reply)) {
        p = ngx_chat_presence_json(buf, ctx->id, ctx->len, reply, 1);
        (void) ngx_chat_session_send(s, buf, p - buf);
    }

    ngx_free(ctx);
    ngx_chat_session_release(s);
}


/* Query a user's presence for viewer; cb gets the reply (see
 * ngx_chat_presence_json). The user's privacy setting is applied by the
 * script. */
ngx_int_t
ngx_chat_presence_query(u_char *user, size_t len, u_char *viewer,
    size_t vlen, ngx_chat_redis_cb cb, void *data)
{
    u_char       conns[96], seen[96], set[96], now[32];
    const char  *argv[5];
    size_t       argl[5];

    argv[0] = (char *) conns;
    argl[0] = ngx_sprintf(conns, "chat:{u:%*s}:conns", len, user) - conns;
    argv[1] = (char *) seen;
    argl[1] = ngx_sprintf(seen, "chat:{u:%*s}:seen", len, user) - seen;
    argv[2] = (char *) set;
    argl[2] = ngx_sprintf(set, "chat:{u:%*s}:set", len, user) - set;
    argv[3] = (char *) now;
    argl[3] = ngx_sprintf(now, "%L", ngx_chat_now_ms())
              - now;
    argv[4] = (len == vlen && ngx_memcmp(user, viewer, len) == 0) ? "1" : "0";
    argl[4] = 1;

    return ngx_chat_redis_script(CHAT_LUA_PRESENCE, cb, data, 3, 5,
                                 argv, argl);
}


static void
ngx_chat_session_watch(ngx_chat_session_t *s, chat_proto_frame_t *f,
    ngx_uint_t on)
{
    u_char                    id[CHAT_ID_MAX + 1];
    size_t                    pos, len;
    int64_t                   wait;
    ngx_chat_watch_t         *w;
    ngx_chat_watch_link_t    *l;
    ngx_chat_presence_ctx_t  *ctx;

    pos = 0;

    while (chat_proto_users_next(f, &pos, (char *) id, &len)) {

        w = ngx_chat_watch_find(id, len);

        if (!on) {
            if (w && (l = ngx_chat_session_watching(s, w))) {
                ngx_chat_unwatch_link(l);
            }
            continue;
        }

        if (w && ngx_chat_session_watching(s, w)) {
            continue;
        }

        if (s->nwatches >= NGX_CHAT_MAX_WATCHES) {
            ngx_chat_session_error(s, "too_large",
                                   "too many watched users", NULL);
            return;
        }

        /* each newly watched user costs a presence query and maybe a
         * subscription: the budget counts users, not frames */
        wait = ngx_chat_limit(s->conf, NGX_CHAT_ACT_WATCH, s->user->id,
                              s->user->len, 1);
        if (wait) {
            ngx_chat_session_limited(s, "too many watches", wait);
            return;
        }

        if (w == NULL) {
            w = ngx_alloc(sizeof(ngx_chat_watch_t), &s->log);
            if (w == NULL) {
                return;
            }

            w->node.key = ngx_crc32_short(id, len);
            w->len = (u_char) len;
            ngx_memcpy(w->id, id, len);
            ngx_queue_init(&w->links);
            ngx_rbtree_insert(&ngx_chat_watches, &w->node);
            ngx_chat_watch_channel(w, 1);
        }

        l = ngx_alloc(sizeof(ngx_chat_watch_link_t), &s->log);
        if (l == NULL) {
            return;
        }

        l->session = s;
        l->watch = w;
        ngx_queue_insert_tail(&w->links, &l->watch_link);
        ngx_queue_insert_tail(&s->watches, &l->session_link);
        s->nwatches++;

        /* the current state once, then changes as they happen */
        ctx = ngx_alloc(sizeof(ngx_chat_presence_ctx_t), &s->log);
        if (ctx == NULL) {
            return;
        }

        ctx->s = s;
        ctx->r = NULL;
        ctx->len = (u_char) len;
        ngx_memcpy(ctx->id, id, len);

        if (ngx_chat_presence_query(id, len, s->user->id, s->user->len,
                                    ngx_chat_presence_once, ctx)
            != NGX_OK)
        {
            ngx_free(ctx);
            ngx_chat_session_error(s, "unavailable",
                                   "presence is unavailable", NULL);
            return;
        }

        s->refs++;
    }
}


/* A presence change published by a registry script. */
void
ngx_chat_presence_deliver(u_char *p, size_t len)
{
    u_char                 *u, *e;
    ngx_queue_t            *q;
    ngx_chat_shbuf_t       *b;
    ngx_chat_watch_t       *w;
    ngx_chat_watch_link_t  *l;

    /* {"type":"presence","user":"<id>",...} as the scripts write it */
    u = ngx_strlcasestrn(p, p + len, (u_char *) "\"user\":\"", 8 - 1);
    if (u == NULL || len < 2 || p[0] != '{') {
        return;
    }

    u += 8;
    e = ngx_strlchr(u, p + len, '"');
    if (e == NULL) {
        return;
    }

    w = ngx_chat_watch_find(u, e - u);
    if (w == NULL) {
        return;
    }

    b = ngx_chat_shbuf_alloc(len - 1);
    if (b == NULL) {
        return;
    }

    ngx_memcpy(b->data, p + 1, len - 1);

    for (q = ngx_queue_head(&w->links);
         q != ngx_queue_sentinel(&w->links);
         /* advanced below: a send may close the session and unlink it */)
    {
        l = ngx_queue_data(q, ngx_chat_watch_link_t, watch_link);
        q = ngx_queue_next(q);
        (void) ngx_chat_session_send_ephemeral(l->session, b);

        if (ngx_chat_watch_find(u, e - u) != w) {
            break;   /* the last watcher went away */
        }
    }

    ngx_chat_shbuf_release(b);
}


/* --- delivery from this worker's channel -------------------------------------- */

/*
 * "<recipients>\n<json object>". Recipients are separated by spaces, each
 * "user[:cursor][!device]": with a cursor the frame becomes
 * {"cursor":N,...}; "!device" skips that device (the sender's own).
 */
void
ngx_chat_deliver(u_char *p, size_t len)
{
    u_char              *nl, *last, *tok, *end, *colon, *bang, *uend,
                         prefix[40];
    size_t               plen;
    uint64_t             cursor;
    ngx_uint_t           eph;
    ngx_queue_t         *q, *next;
    ngx_chat_user_t     *u;
    ngx_chat_shbuf_t    *b;
    ngx_chat_session_t  *s;

    last = p + len;
    nl = ngx_strlchr(p, last, '\n');

    if (nl == NULL || last - nl < 3 || nl[1] != '{') {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: malformed delivery on the worker channel");
        return;
    }

    b = ngx_chat_shbuf_alloc(last - nl - 2);
    if (b == NULL) {
        return;
    }

    ngx_memcpy(b->data, nl + 2, b->len);

    /* typing (the only ephemeral event on these channels) */
    eph = (b->len > 15 && ngx_strncmp(b->data, "\"type\":\"typing\"", 15) == 0);

    for (tok = p; tok < nl; tok = end + 1) {
        end = ngx_strlchr(tok, nl, ' ');
        if (end == NULL) {
            end = nl;
        }

        if (end == tok) {
            continue;
        }

        bang = ngx_strlchr(tok, end, '!');
        colon = ngx_strlchr(tok, bang ? bang : end, ':');
        uend = colon ? colon : (bang ? bang : end);

        u = ngx_chat_user_find(tok, uend - tok);
        if (u == NULL) {
            continue;
        }

        cursor = 0;

        if (colon) {
            cursor = (uint64_t) ngx_atoof(colon + 1, (bang ? bang : end)
                                                     - colon - 1);
            if (cursor == (uint64_t) NGX_ERROR || cursor == 0) {
                continue;
            }

            plen = ngx_sprintf(prefix, "{\"cursor\":%uL,", cursor) - prefix;

        } else {
            prefix[0] = '{';
            plen = 1;
        }

        for (q = ngx_queue_head(&u->sessions);
             q != ngx_queue_sentinel(&u->sessions);
             q = next)
        {
            next = ngx_queue_next(q);
            s = ngx_queue_data(q, ngx_chat_session_t, user_link);

            if (cursor) {
                /* durable: exactly once per session, in cursor order */
                if (cursor <= s->sent_cursor) {
                    continue;
                }

                if (s->replaying) {
                    s->missed = 1;     /* the replay fetches it */
                    continue;
                }

                if (cursor != s->sent_cursor + 1 && s->sent_cursor) {
                    /* a gap (an event still on its way, or lost with a
                     * publish): fetch from the inbox in order instead */
                    s->missed = 0;
                    ngx_chat_replay_start(s);
                    continue;
                }

                s->sent_cursor = cursor;
            }

            if (bang && (size_t) (end - bang - 1) == s->dev_len
                && ngx_strncmp(bang + 1, s->device, s->dev_len) == 0)
            {
                continue;   /* the device the event came from */
            }

            if (eph && !cursor) {
                (void) ngx_chat_session_send_ephemeral(s, b);

            } else {
                (void) ngx_chat_session_send_shared(s, b, prefix, plen);
            }

            /* the send may have closed the last session and freed u */
            if (ngx_chat_user_find(tok, uend - tok) != u) {
                break;
            }
        }
    }

    ngx_chat_shbuf_release(b);
}


/* --- client frames ------------------------------------------------------------- */

/* One recipient of a typing indicator: one PUBLISH per worker process that
 * holds a connection of it, straight from its registry. */
static ngx_int_t
ngx_chat_typing_to(u_char *user, size_t ulen, u_char *json, size_t jlen)
{
    u_char        conns[96], now[32];
    const char   *argv[4];
    size_t        argl[4];

    argv[0] = (char *) conns;
    argl[0] = ngx_sprintf(conns, "chat:{u:%*s}:conns", ulen, user) - conns;
    argv[1] = (char *) now;
    argl[1] = ngx_sprintf(now, "%L", ngx_chat_now_ms()) - now;
    argv[2] = (char *) user;
    argl[2] = ulen;
    argv[3] = (char *) json;
    argl[3] = jlen;

    return ngx_chat_redis_script(CHAT_LUA_TYPING, NULL, NULL, 1, 4,
                                 argv, argl);
}


typedef struct {
    size_t   flen;
    size_t   jlen;
    u_char   from[NGX_CHAT_USER_MAX];
    u_char   json[320];
} ngx_chat_typing_ctx_t;


/* A member hash value is "<since>" (active) or "<since>:<until>". */
static ngx_inline ngx_uint_t
ngx_chat_member_active(redisReply *v)
{
    return v->type == REDIS_REPLY_STRING
           && ngx_strlchr((u_char *) v->str, (u_char *) v->str + v->len, ':')
              == NULL;
}


/*
 * The group's member hash: relay to every active member but the sender,
 * when the sender is one and the group is small enough to push to, with
 * one PUBLISH on the broadcast channel that every nginx worker process
 * reads ("<m1> <m2> ...\n<json>"): one Redis call per typing frame, not
 * one per member.
 */
static void
ngx_chat_typing_members(void *rp, void *data)
{
    u_char                 *buf, *p;
    size_t                  i, active, size;
    redisReply             *reply = rp, *m, *v;
    ngx_uint_t              member;
    ngx_chat_typing_ctx_t  *t = data;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        ngx_free(t);
        return;
    }

    member = 0;
    active = 0;
    size = t->jlen + 2;

    for (i = 0; i + 1 < reply->elements; i += 2) {
        m = reply->element[i];
        v = reply->element[i + 1];

        if (m->type != REDIS_REPLY_STRING || !ngx_chat_member_active(v)) {
            continue;
        }

        active++;
        size += m->len + 1;

        if ((size_t) m->len == t->flen
            && ngx_strncmp(m->str, t->from, t->flen) == 0)
        {
            member = 1;
        }
    }

    if (!member || active < 2 || active > NGX_CHAT_GROUP_TYPING_MAX) {
        ngx_free(t);
        return;
    }

    buf = ngx_alloc(size, ngx_cycle->log);
    if (buf == NULL) {
        ngx_free(t);
        return;
    }

    p = buf;

    for (i = 0; i + 1 < reply->elements; i += 2) {
        m = reply->element[i];
        v = reply->element[i + 1];

        if (m->type != REDIS_REPLY_STRING || !ngx_chat_member_active(v)
            || ((size_t) m->len == t->flen
                && ngx_strncmp(m->str, t->from, t->flen) == 0))
        {
            continue;
        }

        if (p != buf) {
            *p++ = ' ';
        }

        p = ngx_cpymem(p, m->str, m->len);
    }

    *p++ = '\n';
    p = ngx_cpymem(p, t->json, t->jlen);

    (void) ngx_chat_redis_command(NULL, NULL, "PUBLISH %s %b",
                                  NGX_CHAT_BROADCAST_CHANNEL, buf,
                                  (size_t) (p - buf));

    ngx_free(buf);
    ngx_free(t);
}


/*
 * Relay {"type":"typing"} to the connections of the target, never stored.
 * A group's typing goes to its active members (when the sender is one and
 * the group has at most NGX_CHAT_GROUP_TYPING_MAX of them; else it is
 * dropped: typing is best effort). The sender's typing budget (chat_limit
 * typing) is checked first: NGX_BUSY with *wait when it is spent. Beyond
 * it, one indicator per sender and conversation per chat_typing_interval
 * is relayed and extras are dropped silently (NGX_OK). NGX_ERROR: Redis is
 * away.
 */
ngx_int_t
ngx_chat_typing(ngx_chat_loc_conf_t *conf, u_char *from, size_t flen,
    chat_proto_frame_t *f, int64_t *wait)
{
    u_char                  conv[CHAT_CONV_MAX + 1], key[NGX_CHAT_GROUP_KEY_LEN],
                            json[320];
    size_t                  clen;
    ngx_chat_main_conf_t   *cmcf;
    ngx_chat_typing_ctx_t  *t;

    *wait = ngx_chat_limit(conf, NGX_CHAT_ACT_TYPING, from, flen, 1);
    if (*wait) {
        return NGX_BUSY;
    }

    if (f->target != CHAT_PROTO_TARGET_GROUP) {
        clen = chat_conv_direct((char *) from, flen, f->target_id,
                                f->target_len, (char *) conv);
    } else {
        clen = chat_conv_group(f->target_id, f->target_len, (char *) conv);
    }

    if (!ngx_chat_typing_allowed(conf, from, flen, conv, clen)) {
        return NGX_OK;
    }

    if (f->target != CHAT_PROTO_TARGET_GROUP) {
        return ngx_chat_typing_to((u_char *) f->target_id, f->target_len, json,
                                  ngx_sprintf(json, "{\"type\":\"typing\","
                                              "\"conv\":\"%*s\",\"from\":\"%*s\"}",
                                              clen, conv, flen, from) - json);
    }

    t = ngx_alloc(sizeof(ngx_chat_typing_ctx_t), ngx_cycle->log);
    if (t == NULL) {
        return NGX_ERROR;
    }

    t->flen = flen;
    ngx_memcpy(t->from, from, flen);
    t->jlen = ngx_sprintf(t->json, "{\"type\":\"typing\",\"conv\":\"%*s\","
                          "\"from\":\"%*s\"}", clen, conv, flen, from)
              - t->json;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

    if (ngx_chat_redis_command(ngx_chat_typing_members, t, "HGETALL %b", key,
                               ngx_chat_group_key(key,
                                   ngx_chat_shard(cmcf, conv, clen),
                                   (u_char *) f->target_id, f->target_len,
                                   "mem"))
        != NGX_OK)
    {
        ngx_free(t);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * One client frame (a complete WebSocket text message or an HTTP body).
 * Bad frames get an error object; the session lives on.
 */
void
ngx_chat_session_frame(ngx_chat_session_t *s, u_char *p, size_t len)
{
    int64_t              wait;
    ngx_int_t            trc;
    const char          *msg;
    chat_proto_rc_t      rc;
    chat_proto_opts_t    opts;
    chat_proto_frame_t   f;

    ngx_memzero(&opts, sizeof(opts));
    opts.max_body = (uint32_t) s->conf->max_body;

    rc = chat_proto_parse((char *) p, len, &opts, &f, &msg);
    if (rc != CHAT_PROTO_OK) {
        /* a refused send names its client_id when that much was valid */
        ngx_chat_session_error(s, chat_proto_code(rc), msg,
                               f.type == CHAT_PROTO_SEND && f.client_id.len
                               ? &f.client_id : NULL);
        return;
    }

    if (f.type != CHAT_PROTO_ACK) {
        /* any other frame applies a delayed ack first */
        ngx_chat_msg_ack_flush(s);
    }

    switch (f.type) {

    case CHAT_PROTO_PING:
        (void) ngx_chat_session_send(s, (u_char *) "{\"type\":\"pong\"}", 15);
        return;

    case CHAT_PROTO_TYPING:
        trc = ngx_chat_typing(s->conf, s->user->id, s->user->len, &f, &wait);

        if (trc == NGX_BUSY) {
            ngx_chat_session_limited(s, "too many typing frames", wait);

        } else if (trc != NGX_OK) {
            ngx_chat_session_error(s, "unavailable", "try again later", NULL);
        }
        return;

    case CHAT_PROTO_WATCH:
        ngx_chat_session_watch(s, &f, 1);
        return;

    case CHAT_PROTO_UNWATCH:
        ngx_chat_session_watch(s, &f, 0);
        return;

    default:
        /* send, ack, read */
        ngx_chat_msg_frame(s, &f);
        return;
    }
}


/* --- per-worker timer: registry refresh, graceful shutdown ----------------------- */

static void
ngx_chat_refresh_all(void)
{
    u_char                 member[160], conns[96], set[96], now[32], ttl[32];
    const char            *argv[6];
    size_t                 argl[6];
    ngx_queue_t           *q;
    ngx_chat_session_t    *s;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

    argv[3] = (char *) now;
    argl[3] = ngx_sprintf(now, "%L", ngx_chat_now_ms())
              - now;
    argv[4] = (char *) ttl;
    argl[4] = ngx_sprintf(ttl, "%M", (ngx_msec_t) cmcf->registry_ttl * 1000)
              - ttl;

    for (q = ngx_queue_head(&ngx_chat_sessions);
         q != ngx_queue_sentinel(&ngx_chat_sessions);
         q = ngx_queue_next(q))
    {
        s = ngx_queue_data(q, ngx_chat_session_t, all_link);

        if (!s->registered) {
            continue;
        }

        argv[0] = (char *) conns;
        argl[0] = ngx_chat_user_key(s->user, "conns", conns);
        argv[1] = (char *) set;
        argl[1] = ngx_chat_user_key(s->user, "set", set);
        argv[2] = (char *) member;
        argl[2] = ngx_chat_session_member(s, member);
        argv[5] = (char *) s->user->id;
        argl[5] = s->user->len;

        if (ngx_chat_redis_script(CHAT_LUA_REFRESH, NULL, NULL, 2, 6,
                                  argv, argl) != NGX_OK)
        {
            return;   /* Redis is away: the next tick tries again */
        }
    }
}


static void
ngx_chat_tick_handler(ngx_event_t *ev)
{
    ngx_queue_t           *q, *next;
    ngx_chat_session_t    *s;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

    if (ngx_exiting && !ngx_chat_drained) {
        /* graceful shutdown (reload, quit): tell every client to reconnect */
        ngx_chat_drained = 1;

        for (q = ngx_queue_head(&ngx_chat_sessions);
             q != ngx_queue_sentinel(&ngx_chat_sessions);
             q = next)
        {
            next = ngx_queue_next(q);
            s = ngx_queue_data(q, ngx_chat_session_t, all_link);

            if (s->transport == NGX_CHAT_T_WS) {
                ngx_chat_ws_drain(s);

            } else {
                ngx_chat_poll_drain(s);
            }
        }

        return;   /* no more ticks: let the worker exit */
    }

    if (ngx_current_msec - ngx_chat_last_refresh
        >= (ngx_msec_t) cmcf->registry_ttl * 1000 / 3)
    {
        ngx_chat_last_refresh = ngx_current_msec;
        ngx_chat_refresh_all();
    }

    ngx_add_timer(ev, NGX_CHAT_TICK);
}


ngx_int_t
ngx_chat_sessions_init_process(ngx_cycle_t *cycle)
{
    ngx_queue_init(&ngx_chat_sessions);
    ngx_rbtree_init(&ngx_chat_users, &ngx_chat_users_sentinel,
                    ngx_chat_id_insert);
    ngx_rbtree_init(&ngx_chat_watches, &ngx_chat_watches_sentinel,
                    ngx_chat_id_insert);

    ngx_chat_tick_conn.fd = (ngx_socket_t) -1;
    ngx_chat_tick.handler = ngx_chat_tick_handler;
    ngx_chat_tick.data = &ngx_chat_tick_conn;
    ngx_chat_tick.log = cycle->log;
    ngx_chat_tick.cancelable = 1;
    ngx_chat_last_refresh = ngx_current_msec;
    ngx_add_timer(&ngx_chat_tick, NGX_CHAT_TICK);

    return NGX_OK;
}
