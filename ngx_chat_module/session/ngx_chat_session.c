/*
 * The session core: what the features know of a client, whatever its
 * transport. The registry in Redis (sessions per user across servers,
 * their refresh, presence announcements by the scripts), the per-worker
 * index of sessions by user, the bounded outbound queue, and the
 * per-worker timer that refreshes the registry and notices a graceful
 * shutdown. It calls only down (the Redis adapter, the codecs) and the
 * transport functions of ngx_chat_transports[]; features hook in through
 * ngx_chat_session_close_hook.
 */
#include "ngx_chat.h"

#include <hiredis/hiredis.h>


#define NGX_CHAT_TICK         250     /* ms */



ngx_queue_t                   ngx_chat_sessions;
ngx_chat_transport_t         *ngx_chat_transports[3];
void                        (*ngx_chat_session_close_hook)(ngx_chat_session_t *s);
static ngx_rbtree_t           ngx_chat_users;
static ngx_rbtree_node_t      ngx_chat_users_sentinel;
static uint64_t               ngx_chat_next_sid;
static ngx_event_t            ngx_chat_tick;
static ngx_connection_t       ngx_chat_tick_conn;
static ngx_msec_t             ngx_chat_last_refresh;
static ngx_uint_t             ngx_chat_nsessions;   /* in ngx_chat_sessions */
static ngx_uint_t             ngx_chat_refresh_credit;  /* sessions x ms */
static ngx_uint_t             ngx_chat_drained;


static void ngx_chat_session_free(ngx_chat_session_t *s);


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

void
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


ngx_rbtree_node_t *
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


ngx_chat_user_t *
ngx_chat_user_find(u_char *id, size_t len)
{
    return (ngx_chat_user_t *) ngx_chat_id_lookup(&ngx_chat_users, id, len,
                                                  ngx_crc32_short(id, len));
}



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
     * then read again (the replay starts from the cursor), and a
     * device got the event twice (a long-poll test caught it).
     */
    s->replaying = 1;

    ngx_queue_init(&s->watches);
    ngx_queue_insert_tail(&u->sessions, &s->user_link);
    ngx_queue_insert_tail(&ngx_chat_sessions, &s->all_link);
    ngx_chat_nsessions++;

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
    ngx_chat_registered_pt   done;
} ngx_chat_register_ctx_t;


static void
ngx_chat_session_registered(void *r, void *data)
{
    redisReply               *reply = r;
    ngx_chat_register_ctx_t  *ctx = data;
    ngx_chat_session_t       *s = ctx->s;
    uint64_t                  trim;
    ngx_chat_registered_pt    done;

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
        done(s, NGX_ERROR, 0);
        return;
    }

    if (reply->element[0]->integer < 0) {
        done(s, NGX_DECLINED, 0);
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

    /* the newest cursor the inbox dropped unacknowledged: the transport
     * tells a client below it that it is behind (hello, poll answer) */
    trim = 0;

    if (reply->element[2]->type == REDIS_REPLY_STRING) {
        trim = ngx_atoof((u_char *) reply->element[2]->str,
                         reply->element[2]->len);
        if (trim == (uint64_t) NGX_ERROR) {
            trim = 0;
        }
    }

    done(s, NGX_OK, trim);
}


/*
 * Register the session in the user's connection registry (and so make the
 * user present). done(s, rc, trim): NGX_OK, NGX_DECLINED (too many
 * connections), NGX_ERROR (Redis unavailable); trim is the inbox's trim
 * point (0 unless NGX_OK).
 */
void
ngx_chat_session_register(ngx_chat_session_t *s, ngx_chat_registered_pt done)
{
    u_char                    member[160], conns[96], acked[96], last[96],
                              set[96], now[32], ttl[32], max[32];
    const char               *argv[11];
    size_t                    argl[11];
    ngx_chat_main_conf_t     *cmcf;
    ngx_chat_register_ctx_t  *ctx;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

    ctx = ngx_alloc(sizeof(ngx_chat_register_ctx_t), &s->log);
    if (ctx == NULL) {
        done(s, NGX_ERROR, 0);
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

    /* cluster: announce presence with SPUBLISH (lua/_online.lua) */
    argv[10] = "s";
    argl[10] = 1;

    if (ngx_chat_redis_script(CHAT_LUA_REGISTER,
                              ngx_chat_session_registered, ctx, 4,
                              ngx_chat_redis_sharded() ? 11 : 10,
                              argv, argl) != NGX_OK)
    {
        ngx_free(ctx);
        done(s, NGX_ERROR, 0);
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
    const char   *argv[7];
    size_t        argl[7];

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
    argv[6] = "s";                  /* cluster: SPUBLISH */
    argl[6] = 1;

    (void) ngx_chat_redis_script(CHAT_LUA_UNREGISTER, NULL, NULL, 3,
                                 ngx_chat_redis_sharded() ? 7 : 6,
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

    /* the features' part first (a pending ack, watches): a callback they
     * gave, the core calls nothing above it */
    if (ngx_chat_session_close_hook) {
        ngx_chat_session_close_hook(s);
    }

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
    ngx_chat_nsessions--;

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
    u_char *prefix, size_t plen, uint64_t cursor)
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

        if (ngx_chat_tp(s)->close) {
            ngx_chat_tp(s)->close(s, 1008, "slow consumer");
        }

        return NGX_ERROR;
    }

    o = ngx_alloc(sizeof(ngx_chat_out_t), &s->log);
    if (o == NULL) {
        return NGX_ERROR;
    }

    o->next = NULL;
    o->buf = b;
    o->cursor = cursor;
    o->sent = 0;
    o->opcode = CHAT_WS_OP_TEXT;

    if (ngx_chat_tp(s)->framed) {
        o->hlen = (uint8_t) chat_ws_write_header(o->head, CHAT_WS_OP_TEXT, 1,
                                                 len);

    } else {
        o->hlen = 0;
    }

    ngx_memcpy(o->head + o->hlen, prefix, plen);
    o->hlen += (uint8_t) plen;

    b->refs++;

    ngx_chat_out_append(s, o);

    ngx_chat_tp(s)->flush(s);

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

    return ngx_chat_session_send_shared(s, b, (u_char *) "{", 1, 0);
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

    rc = ngx_chat_session_send_shared(s, b, (u_char *) "{", 1, 0);
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


/* --- per-worker timer: registry refresh, graceful shutdown ----------------------- */

/*
 * Each session's registry entry is renewed once per third of the registry
 * TTL, spread over that interval: every tick the sessions at the head of
 * the list (the longest unrefreshed: a refreshed one goes to the tail, a
 * new one starts there) get their share. One burst for the whole process
 * would put tens of thousands of scripts ahead of every send at once, and
 * beyond the link's pending bound (NGX_CHAT_REDIS_MAX_PENDING) the rest of
 * the list would never be refreshed at all.
 */
static void
ngx_chat_refresh_some(ngx_uint_t n)
{
    u_char                 member[160], conns[96], set[96], now[32], ttl[32];
    const char            *argv[7];
    size_t                 argl[7];
    ngx_uint_t             i;
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

    for (i = 0; i < n && !ngx_queue_empty(&ngx_chat_sessions); i++) {
        q = ngx_queue_head(&ngx_chat_sessions);
        s = ngx_queue_data(q, ngx_chat_session_t, all_link);

        if (s->registered) {
            argv[0] = (char *) conns;
            argl[0] = ngx_chat_user_key(s->user, "conns", conns);
            argv[1] = (char *) set;
            argl[1] = ngx_chat_user_key(s->user, "set", set);
            argv[2] = (char *) member;
            argl[2] = ngx_chat_session_member(s, member);
            argv[5] = (char *) s->user->id;
            argl[5] = s->user->len;

            argv[6] = "s";              /* cluster: SPUBLISH */
            argl[6] = 1;

            if (ngx_chat_redis_script(CHAT_LUA_REFRESH, NULL, NULL, 2,
                                      ngx_chat_redis_sharded() ? 7 : 6,
                                      argv, argl) != NGX_OK)
            {
                return;   /* Redis is away: it stays first for the next tick */
            }
        }

        /* refreshed (or registering: its register script is fresh) */
        ngx_queue_remove(q);
        ngx_queue_insert_tail(&ngx_chat_sessions, q);
    }
}


static void
ngx_chat_tick_handler(ngx_event_t *ev)
{
    ngx_uint_t             n;
    ngx_msec_t             elapsed, interval;
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

            ngx_chat_tp(s)->drain(s);
        }

        return;   /* no more ticks: let the worker exit */
    }

    /* the share of this tick: every session once per refresh interval,
     * counted from the last tick (a late tick does more); the remainder is
     * carried, so a few sessions are not renewed on every tick */
    elapsed = ngx_current_msec - ngx_chat_last_refresh;
    ngx_chat_last_refresh = ngx_current_msec;
    interval = (ngx_msec_t) cmcf->registry_ttl * 1000 / 3;

    if (interval) {
        ngx_chat_refresh_credit += ngx_chat_nsessions * elapsed;
        n = ngx_chat_refresh_credit / interval;
        ngx_chat_refresh_credit -= n * interval;

        if (n) {
            ngx_chat_refresh_some(n);
        }
    }

    ngx_add_timer(ev, NGX_CHAT_TICK);
}


ngx_int_t
ngx_chat_sessions_init_process(ngx_cycle_t *cycle)
{
    ngx_queue_init(&ngx_chat_sessions);
    ngx_rbtree_init(&ngx_chat_users, &ngx_chat_users_sentinel,
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
