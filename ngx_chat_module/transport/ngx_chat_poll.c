/*
 * HTTP transport: long-poll (GET /chat/poll) as a session like any other,
 * and the small request/response endpoints (typing, presence; send, ack
 * and read arrive with the messaging pipeline).
 */
#include "ngx_chat.h"

#include <hiredis/hiredis.h>


#define NGX_CHAT_BODY_MAX   65536


static void ngx_chat_poll_registered(ngx_chat_session_t *s, ngx_int_t rc,
    uint64_t trim);
static void ngx_chat_poll_event_handler(ngx_http_request_t *r);
static void ngx_chat_poll_respond(ngx_chat_session_t *s);


typedef struct {
    ngx_chat_identity_t   id;        /* first: serves $chat_user */
    ngx_chat_session_t   *session;
    uint64_t              cursor;
    ngx_msec_t            timeout;
} ngx_chat_poll_ctx_t;


static void
ngx_chat_poll_cleanup(void *data)
{
    ngx_chat_poll_ctx_t  *ctx = data;

    /* the request ends (answered, timed out or the client left) */
    if (ctx->session) {
        ctx->session->request = NULL;
        ngx_chat_session_close(ctx->session);
        ctx->session = NULL;
    }
}


ngx_int_t
ngx_chat_poll_handler(ngx_http_request_t *r)
{
    int64_t               v;
    ngx_int_t             rc;
    ngx_pool_cleanup_t   *cln;
    ngx_chat_session_t   *s;
    ngx_chat_poll_ctx_t  *ctx;
    ngx_chat_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);

    if (r->method != NGX_HTTP_GET) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "poll with GET");
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_chat_poll_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_authenticate(r, &ctx->id);
    if (rc == NGX_HTTP_UNAUTHORIZED) {
        return ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                   "missing, invalid or expired token");
    }

    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_set_ctx(r, ctx, ngx_chat_module);

    v = 0;
    if (ngx_chat_arg_int(r, "cursor", 6, &v) == NGX_ERROR) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "cursor must be an integer 0..2^53-1");
    }

    ctx->cursor = (uint64_t) v;

    v = clcf->poll_timeout;
    if (ngx_chat_arg_int(r, "timeout", 7, &v) == NGX_ERROR
        || v > clcf->poll_max)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "timeout must be an integer of seconds "
                                   "within the server's limit");
    }

    ctx->timeout = (ngx_msec_t) v * 1000;

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (!ngx_chat_redis_ready()) {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "try again later");
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    s = ngx_chat_session_create(r->connection, clcf, &ctx->id,
                                NGX_CHAT_T_POLL);
    if (s == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    s->request = r;
    s->cursor = ctx->cursor;
    ctx->session = s;
    cln->handler = ngx_chat_poll_cleanup;
    cln->data = ctx;

    r->main->count++;
    ngx_chat_session_register(s, ngx_chat_poll_registered);

    return NGX_DONE;
}


static void
ngx_chat_poll_registered(ngx_chat_session_t *s, ngx_int_t rc, uint64_t trim)
{
    ngx_http_request_t   *r;
    ngx_chat_poll_ctx_t  *ctx;

    r = s->request;
    if (r == NULL) {
        return;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (rc != NGX_OK) {
        ctx->session = NULL;
        ngx_chat_session_refuse(s, rc);
        return;
    }

    /* the inbox dropped events after the cursor unacknowledged */
    s->behind = (trim > ctx->cursor);

    /* the answer's cursor is the one polled with: it acknowledges up to it */
    s->cursor = ctx->cursor;
    s->sent_cursor = ctx->cursor;

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_chat_poll_event_handler;

    if (ctx->cursor > 0) {
        chat_proto_frame_t  f;

        ngx_memzero(&f, sizeof(f));
        f.type = CHAT_PROTO_ACK;
        f.cursor = (int64_t) ctx->cursor;
        ngx_chat_msg_frame(s, &f);
    }

    /* what is waiting in the inbox first; then held (ngx_chat_poll_hold) */
    ngx_chat_replay_start(s);
}


/* The inbox had nothing after the cursor: hold the request for live events
 * (a client that goes away ends the request, and the session). */
void
ngx_chat_poll_hold(ngx_chat_session_t *s)
{
    ngx_http_request_t   *r = s->request;
    ngx_chat_poll_ctx_t  *ctx;

    if (r == NULL || s->error) {
        return;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (s->out_head || ctx->timeout == 0 || s->draining) {
        ngx_chat_poll_wake(s);
        return;
    }

    ngx_add_timer(r->connection->write, ctx->timeout);
}


/* Events arrived: answer from the write handler, not from under the
 * delivery loop that queued them. */
void
ngx_chat_poll_wake(ngx_chat_session_t *s)
{
    ngx_http_request_t  *r = s->request;

    if (r == NULL || s->error) {
        return;
    }

    if (r->write_event_handler != ngx_chat_poll_event_handler) {
        return;     /* not held yet: ngx_chat_poll_hold() answers */
    }

    s->error = 1;            /* woken once */
    ngx_post_event(r->connection->write, &ngx_posted_events);
}


void
ngx_chat_poll_drain(ngx_chat_session_t *s)
{
    s->draining = 1;
    ngx_chat_poll_wake(s);
}


static void
ngx_chat_poll_event_handler(ngx_http_request_t *r)
{
    ngx_chat_poll_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ctx->session == NULL) {
        return;
    }

    if (r->connection->write->timer_set) {
        ngx_del_timer(r->connection->write);
    }

    r->connection->write->timedout = 0;
    ngx_chat_poll_respond(ctx->session);
}


/* {"events":[...],"cursor":m} from what is queued, and the request ends. */
static void
ngx_chat_poll_respond(ngx_chat_session_t *s)
{
    u_char               *json, *p;
    size_t                len;
    uint64_t              cursor;
    ngx_int_t             rc;
    ngx_chat_out_t       *o, *next;
    ngx_http_request_t   *r;

    r = s->request;

    len = sizeof("{\"events\":[],\"cursor\":,\"behind\":true}") + NGX_INT64_LEN;
    for (o = s->out_head; o; o = o->next) {
        len += o->hlen + o->buf->len + 1;
    }

    json = ngx_pnalloc(r->pool, len);
    if (json == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    cursor = s->cursor;
    p = ngx_cpymem(json, "{\"events\":[", 11);

    for (o = s->out_head; o; o = next) {
        next = o->next;

        if (p[-1] != '[') {
            *p++ = ',';
        }

        p = ngx_cpymem(p, o->head, o->hlen);
        p = ngx_cpymem(p, o->buf->data, o->buf->len);

        if (o->cursor > cursor) {
            cursor = o->cursor;
        }

        ngx_chat_shbuf_release(o->buf);
        ngx_free(o);
    }

    s->out_head = NULL;
    s->out_tail = NULL;
    s->out_count = 0;
    s->out_bytes = 0;

    p = ngx_sprintf(p, "],\"cursor\":%uL%s}", cursor,
                    s->behind ? ",\"behind\":true" : "");

    rc = ngx_chat_http_json(r, NGX_HTTP_OK, json, p - json);
    ngx_http_finalize_request(r, rc);
}


/* --- request bodies ---------------------------------------------------------- */

static u_char *
ngx_chat_body(ngx_http_request_t *r, size_t *len)
{
    u_char       *p, *body;
    size_t        n;
    ngx_chain_t  *cl;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        *len = 0;
        return (u_char *) "";
    }

    if (r->request_body->temp_file) {
        return NULL;         /* larger than client_body_buffer_size */
    }

    n = 0;
    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        n += cl->buf->last - cl->buf->pos;
    }

    if (n > NGX_CHAT_BODY_MAX) {
        return NULL;
    }

    body = ngx_pnalloc(r->pool, n + 1);
    if (body == NULL) {
        return NULL;
    }

    p = body;
    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        p = ngx_cpymem(p, cl->buf->pos, cl->buf->last - cl->buf->pos);
    }

    *len = n;

    return body;
}


static void
ngx_chat_api_body_handler(ngx_http_request_t *r)
{
    u_char               *body;
    size_t                len;
    ngx_int_t             rc;
    const char           *msg;
    chat_proto_rc_t       prc;
    chat_proto_opts_t     opts;
    chat_proto_frame_t    f;
    ngx_chat_identity_t  *id;
    ngx_chat_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);
    id = ngx_http_get_module_ctx(r, ngx_chat_module);

    body = ngx_chat_body(r, &len);
    if (body == NULL) {
        rc = ngx_chat_http_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                 "too_large", "request body too large");
        ngx_http_finalize_request(r, rc);
        return;
    }

    ngx_memzero(&opts, sizeof(opts));
    opts.max_body = (uint32_t) clcf->max_body;

    switch (clcf->handlers) {
    case NGX_CHAT_LOC_TYPING:
        opts.default_type = CHAT_PROTO_TYPING;
        break;
    case NGX_CHAT_LOC_SEND:
        opts.default_type = CHAT_PROTO_SEND;
        break;
    case NGX_CHAT_LOC_ACK:
        opts.default_type = CHAT_PROTO_ACK;
        break;
    default:
        opts.default_type = CHAT_PROTO_READ;
        break;
    }

    prc = chat_proto_parse((char *) body, len, &opts, &f, &msg);
    if (prc != CHAT_PROTO_OK) {
        rc = ngx_chat_http_error(r, prc == CHAT_PROTO_TOO_LARGE
                                    ? NGX_HTTP_REQUEST_ENTITY_TOO_LARGE
                                    : NGX_HTTP_BAD_REQUEST,
                                 chat_proto_code(prc), msg);
        ngx_http_finalize_request(r, rc);
        return;
    }

    /* the same router as WebSocket frames; NGX_DONE: answered by the
     * pipeline later, drop the body reader's reference */
    rc = ngx_chat_route(NULL, r, id, &f);

    ngx_http_finalize_request(r, rc);
}


/* --- presence ----------------------------------------------------------------- */

static void
ngx_chat_presence_http_done(void *reply, void *data)
{
    u_char               buf[256], *p, *json;
    ngx_int_t            rc;
    redisReply          *rr = reply;
    ngx_http_request_t  *r = data;
    ngx_chat_identity_t *who;
    ngx_connection_t    *c = r->connection;

    who = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (!ngx_chat_presence_reply_ok(rr)) {
        rc = ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "unavailable", "try again later");

    } else {
        /* the queried user was stashed after the identity */
        p = ngx_chat_presence_json(buf, who[1].user, who[1].user_len, rr, 0);
        json = ngx_pnalloc(r->pool, p - buf);
        if (json == NULL) {
            rc = NGX_ERROR;
        } else {
            ngx_memcpy(json, buf, p - buf);
            rc = ngx_chat_http_json(r, NGX_HTTP_OK, json, p - buf);
        }
    }

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


static ngx_int_t
ngx_chat_presence_handler(ngx_http_request_t *r)
{
    int64_t               wait;
    ngx_int_t             rc;
    ngx_chat_identity_t  *ids;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "use GET");
    }

    ids = ngx_pcalloc(r->pool, 2 * sizeof(ngx_chat_identity_t));
    if (ids == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_authenticate(r, &ids[0]);
    if (rc == NGX_HTTP_UNAUTHORIZED) {
        return ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                   "missing, invalid or expired token");
    }

    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_set_ctx(r, ids, ngx_chat_module);

    wait = ngx_chat_limit(ngx_http_get_module_loc_conf(r, ngx_chat_module),
                          NGX_CHAT_ACT_PRESENCE, ids[0].user,
                          ids[0].user_len, 1);
    if (wait) {
        return ngx_chat_http_limited(r, "too many presence queries", wait);
    }

    if (ngx_chat_arg_id(r, "user", 4, ids[1].user, NGX_CHAT_USER_MAX,
                        &ids[1].user_len) != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "user must be a valid user id");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (ngx_chat_presence_query(ids[1].user, ids[1].user_len, ids[0].user,
                                ids[0].user_len, ngx_chat_presence_http_done,
                                r) != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "try again later");
    }

    r->main->count++;

    return NGX_DONE;
}


ngx_int_t
ngx_chat_api_handler(ngx_http_request_t *r, ngx_uint_t which)
{
    ngx_int_t             rc;
    ngx_chat_identity_t  *id;

    if (which == NGX_CHAT_LOC_PRESENCE) {
        return ngx_chat_presence_handler(r);
    }

    if (r->method != NGX_HTTP_POST) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "use POST");
    }

    id = ngx_pcalloc(r->pool, sizeof(ngx_chat_identity_t));
    if (id == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_authenticate(r, id);
    if (rc == NGX_HTTP_UNAUTHORIZED) {
        return ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                   "missing, invalid or expired token");
    }

    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_set_ctx(r, id, ngx_chat_module);

    if (r->headers_in.content_length_n > NGX_CHAT_BODY_MAX) {
        return ngx_chat_http_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                   "too_large", "request body too large");
    }

    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_chat_api_body_handler);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


/* What the session core and the features may ask of a long-poll session. */
static ngx_chat_transport_t  ngx_chat_poll_transport = {
    ngx_chat_poll_wake,          /* flush: answer a held request */
    NULL,                        /* close: a request has no close frame */
    ngx_chat_poll_drain,
    ngx_chat_poll_hold,          /* replayed: one page per request */
    0,                           /* framed */
    1,                           /* one_page */
    0,                           /* coalesce_acks: a poll acks by its cursor */
    100                          /* replay_page */
};


ngx_int_t
ngx_chat_poll_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_transports[NGX_CHAT_T_POLL] = &ngx_chat_poll_transport;

    return NGX_OK;
}
