/*
 * Presence, a feature: the users a session watches (one subscription to
 * chat:p:<user> per watched user in this worker process, whatever the
 * number of watchers), the current state once per new watch and for
 * GET /chat/presence, and the changes the registry scripts publish, which
 * the Redis adapter hands to ngx_chat_presence_deliver(). The user's
 * privacy setting is applied by the scripts (lua/presence.lua).
 */
#include "ngx_chat.h"

#include <hiredis/hiredis.h>


#define NGX_CHAT_MAX_WATCHES  250     /* watched users per session */


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


static ngx_rbtree_t       ngx_chat_watches;
static ngx_rbtree_node_t  ngx_chat_watches_sentinel;


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
    /* cluster: the user's hash tag, so that the registry scripts running
     * on {u:U} may SPUBLISH it (lua/_online.lua) */
    ch.len = (ngx_chat_redis_sharded()
              ? ngx_sprintf(buf, "chat:p:{u:%*s}", (size_t) w->len, w->id)
              : ngx_sprintf(buf, "chat:p:%*s", (size_t) w->len, w->id))
             - buf;

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


void
ngx_chat_presence_unwatch_all(ngx_chat_session_t *s)
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


void
ngx_chat_presence_watch(ngx_chat_session_t *s, chat_proto_frame_t *f,
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


ngx_int_t
ngx_chat_presence_init_process(ngx_cycle_t *cycle)
{
    static ngx_str_t  prefix = ngx_string("chat:p:");

    ngx_rbtree_init(&ngx_chat_watches, &ngx_chat_watches_sentinel,
                    ngx_chat_id_insert);

    if (ngx_chat_redis_on_channel(&prefix, 1, ngx_chat_presence_deliver)
        != NGX_OK
        || ngx_chat_redis_on_resubscribe(ngx_chat_presence_resubscribe)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}
