/*
 * WebSocket transport (RFC 6455): the handshake, then the connection is
 * taken over from nginx's HTTP machinery. The request and its pools are
 * freed once the 101 is queued, so an idle connection costs nginx only its
 * ngx_connection_t and our session struct. Frames are parsed by chat_ws.c
 * in a per-worker buffer; only a partly received frame is copied into a
 * per-connection buffer sized for it, and freed when it completes.
 */
#include "ngx_chat.h"

#include <sys/uio.h>


#define NGX_CHAT_WS_READ_BUF      65536
#define NGX_CHAT_WS_CLOSE_WAIT    2000      /* ms for the peer's close */
#define NGX_CHAT_WS_READS         16        /* reads per event, for fairness */


static u_char  *ngx_chat_ws_buf;            /* per worker */
static size_t   ngx_chat_ws_buf_size;


static void ngx_chat_ws_registered(ngx_chat_session_t *s, ngx_int_t rc,
    uint64_t trim);
static void ngx_chat_ws_read_handler(ngx_event_t *rev);
static void ngx_chat_ws_write_handler(ngx_event_t *wev);
static void ngx_chat_ws_finalize(ngx_chat_session_t *s);
static ngx_int_t ngx_chat_ws_queue_raw(ngx_chat_session_t *s, u_char *data,
    size_t len, ngx_uint_t force);


static ngx_table_elt_t *
ngx_chat_header(ngx_http_request_t *r, const char *name, size_t len)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == len
            && ngx_strncasecmp(h[i].key.data, (u_char *) name, len) == 0)
        {
            return &h[i];
        }
    }
}


static ngx_int_t
ngx_chat_ws_origin_allowed(ngx_http_request_t *r, ngx_chat_loc_conf_t *clcf)
{
    ngx_str_t        *o;
    ngx_uint_t        i;
    ngx_table_elt_t  *h;

    if (clcf->origins == NULL) {
        return 1;
    }

    h = ngx_chat_header(r, "Origin", 6);
    if (h == NULL) {
        return 1;       /* not a browser: the token is what protects us */
    }

    o = clcf->origins->elts;
    for (i = 0; i < clcf->origins->nelts; i++) {
        if (o[i].len == h->value.len
            && ngx_strncasecmp(o[i].data, h->value.data, o[i].len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


/* The handshake in progress; the identity comes first so that the request
 * context still serves $chat_user and $chat_device. */
typedef struct {
    ngx_chat_identity_t  id;
    int64_t              cursor;       /* -1: none asked */
    char                 accept[CHAT_WS_ACCEPT_LEN];
} ngx_chat_ws_hs_t;


ngx_int_t
ngx_chat_ws_handler(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    int64_t               cursor;
    ngx_table_elt_t      *h, *c;
    ngx_chat_ws_hs_t     *hs;
    ngx_chat_identity_t   id;
    ngx_chat_session_t   *s;
    ngx_chat_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);

    if (r->method != NGX_HTTP_GET) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "the WebSocket handshake is a GET");
    }

    if (r != r->main || r->http_version != NGX_HTTP_VERSION_11
#if (NGX_HTTP_V2)
        || r->stream
#endif
       )
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "WebSocket needs HTTP/1.1");
    }

    h = ngx_chat_header(r, "Upgrade", 7);
    c = ngx_chat_header(r, "Connection", 10);

    if (h == NULL
        || !chat_ws_header_has_token((char *) h->value.data, h->value.len,
                                     "websocket")
        || c == NULL
        || !chat_ws_header_has_token((char *) c->value.data, c->value.len,
                                     "upgrade"))
    {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        h->hash = 1;
        ngx_str_set(&h->key, "Upgrade");
        ngx_str_set(&h->value, "websocket");

        return ngx_chat_http_error(r, 426, "bad_request",
                                   "this location speaks WebSocket only");
    }

    h = ngx_chat_header(r, "Sec-WebSocket-Version", 21);
    if (h == NULL || h->value.len != 2
        || ngx_strncmp(h->value.data, "13", 2) != 0)
    {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        h->hash = 1;
        ngx_str_set(&h->key, "Sec-WebSocket-Version");
        ngx_str_set(&h->value, "13");

        return ngx_chat_http_error(r, 426, "bad_request",
                                   "WebSocket version 13 is required");
    }

    h = ngx_chat_header(r, "Sec-WebSocket-Key", 17);
    if (h == NULL || !chat_ws_key_valid((char *) h->value.data, h->value.len)) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "missing or invalid Sec-WebSocket-Key");
    }

    if (!ngx_chat_ws_origin_allowed(r, clcf)) {
        return ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                   "origin not allowed");
    }

    rc = ngx_chat_authenticate(r, &id);
    if (rc == NGX_HTTP_UNAUTHORIZED) {
        return ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                   "missing, invalid or expired token");
    }

    if (rc != NGX_OK) {
        return rc;
    }

    cursor = -1;
    rc = ngx_chat_arg_int(r, "cursor", 6, &cursor);
    if (rc == NGX_ERROR) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "cursor must be an integer 0..2^53-1");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    hs = ngx_palloc(r->pool, sizeof(ngx_chat_ws_hs_t));
    if (hs == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    hs->id = id;
    hs->cursor = cursor;
    chat_ws_accept((char *) h->value.data, h->value.len, hs->accept);

    if (!ngx_chat_redis_ready()) {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "try again later");
    }

    s = ngx_chat_session_create(r->connection, clcf, &id, NGX_CHAT_T_WS);
    if (s == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    s->request = r;
    ngx_http_set_ctx(r, hs, ngx_chat_module);

    /* the upgrade is answered once the registry has taken the session */
    r->main->count++;
    ngx_chat_session_register(s, ngx_chat_ws_registered);

    return NGX_DONE;
}


/* Registry answered: refuse with an HTTP error, or switch protocols. */
static void
ngx_chat_ws_registered(ngx_chat_session_t *s, ngx_int_t rc, uint64_t trim)
{
    u_char               *p, hello[256], resp[160];
    size_t                rest;
    uint64_t              from;
    ngx_pool_t           *pool;
    ngx_connection_t     *c;
    ngx_chat_ws_hs_t     *hs;
    ngx_http_request_t   *r;

    r = s->request;
    c = s->connection;
    hs = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (rc == NGX_OK && (s->draining || ngx_exiting)) {
        rc = NGX_ERROR;       /* this worker is going away: come back */
    }

    if (rc != NGX_OK) {
        ngx_chat_session_refuse(s, rc);
        return;
    }

    p = ngx_sprintf(resp, "HTTP/1.1 101 Switching Protocols\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Accept: %*s\r\n\r\n",
                    (size_t) CHAT_WS_ACCEPT_LEN, hs->accept);

    /* where the replay starts, and whether the inbox dropped events after
     * it unacknowledged (the registry's trim point); hs goes with the
     * request's pool below */
    from = (hs->cursor < 0) ? s->cursor : (uint64_t) hs->cursor;
    s->behind = (trim > from);

    /* bytes the client sent right after its handshake */
    rest = r->header_in ? (size_t) (r->header_in->last - r->header_in->pos)
                        : 0;
    if (rest) {
        s->rbuf = ngx_alloc(rest, &s->log);
        if (s->rbuf == NULL) {
            s->request = NULL;
            ngx_chat_session_close(s);
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
        ngx_memcpy(s->rbuf, r->header_in->pos, rest);
        s->rlen = (uint32_t) rest;
        s->rsize = (uint32_t) rest;
    }

    /* hand the connection over: log the 101, free the request and pools */
    r->headers_out.status = NGX_HTTP_SWITCHING_PROTOCOLS;
    s->request = NULL;

    ngx_http_free_request(r, 0);

    c->destroyed = 0;
    c->data = s;
    c->log = &s->log;
    c->read->log = c->log;
    c->write->log = c->log;
    c->idle = 0;
    ngx_reusable_connection(c, 0);

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    pool = c->pool;
#if (NGX_HTTP_SSL)
    if (c->ssl) {
        pool = NULL;         /* the SSL connection lives in it */
    }
#endif
    if (pool) {
        c->pool = NULL;
        c->buffer = NULL;
        c->sockaddr = NULL;
        c->addr_text.len = 0;
        c->addr_text.data = NULL;
        ngx_destroy_pool(pool);
    }

    c->read->handler = ngx_chat_ws_read_handler;
    c->write->handler = ngx_chat_ws_write_handler;

    if (ngx_chat_ws_queue_raw(s, resp, p - resp, 1) != NGX_OK) {
        ngx_chat_ws_finalize(s);
        return;
    }

    p = ngx_sprintf(hello, "{\"type\":\"hello\",\"user\":\"%*s\","
                    "\"device\":\"%*s\",\"cursor\":%uL,\"heartbeat\":%T%s}",
                    (size_t) s->user->len, s->user->id, (size_t) s->dev_len,
                    s->device, s->cursor, s->conf->heartbeat,
                    s->behind ? ",\"behind\":true" : "");

    (void) ngx_chat_session_send(s, hello, p - hello);

    /* then everything retained after the cursor, then live */
    s->sent_cursor = from;
    ngx_chat_replay_start(s);

    if (s->error) {
        ngx_post_event(c->write, &ngx_posted_events);
        return;
    }

    ngx_add_timer(c->read, (ngx_msec_t) s->conf->idle_timeout * 1000);

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_chat_ws_finalize(s);
        return;
    }

    if (s->rlen || c->read->ready) {
        ngx_post_event(c->read, &ngx_posted_events);
    }
}


/* --- output ---------------------------------------------------------------- */

static ssize_t
ngx_chat_ws_send_iov(ngx_connection_t *c, struct iovec *iov, int n)
{
    ssize_t   rc;
    ngx_err_t err;

#if (NGX_HTTP_SSL)
    if (c->ssl) {
        /* TLS: one record from a contiguous copy */
        size_t   len = 0;
        int      i;
        u_char  *p;

        for (i = 0; i < n; i++) {
            if (len + iov[i].iov_len > ngx_chat_ws_buf_size) {
                break;
            }
            len += iov[i].iov_len;
        }

        p = ngx_chat_ws_buf;
        for (i = 0; i < n && p - ngx_chat_ws_buf < (ssize_t) len; i++) {
            p = ngx_cpymem(p, iov[i].iov_base, iov[i].iov_len);
        }

        return c->send(c, ngx_chat_ws_buf, len);
    }
#endif

    for ( ;; ) {
        rc = writev(c->fd, iov, n);

        if (rc >= 0) {
            c->sent += rc;
            return rc;
        }

        err = ngx_socket_errno;

        if (err == NGX_EINTR) {
            continue;
        }

        if (err == NGX_EAGAIN) {
            c->write->ready = 0;
            return NGX_AGAIN;
        }

        c->write->error = 1;
        return NGX_ERROR;
    }
}


void
ngx_chat_ws_flush(ngx_chat_session_t *s)
{
    int                n;
    size_t             want;
    ssize_t            sent;
    uint32_t           left;
    struct iovec       iov[2];
    ngx_chat_out_t    *o;
    ngx_connection_t  *c;

    c = s->connection;
    if (c == NULL || s->error || s->request) {
        return;     /* before the 101, frames wait in the queue */
    }

    while (s->out_head) {
        o = s->out_head;
        n = 0;

        if (o->sent < o->hlen) {
            iov[n].iov_base = o->head + o->sent;
            iov[n].iov_len = o->hlen - o->sent;
            n++;
            iov[n].iov_base = o->buf->data;
            iov[n].iov_len = o->buf->len;
            n++;

        } else {
            left = o->sent - o->hlen;
            iov[n].iov_base = o->buf->data + left;
            iov[n].iov_len = o->buf->len - left;
            n++;
        }

        want = iov[0].iov_len + (n > 1 ? iov[1].iov_len : 0);

        sent = ngx_chat_ws_send_iov(c, iov, n);

        if (sent == NGX_AGAIN) {
            break;
        }

        if (sent == NGX_ERROR) {
            /* finalized from the write handler, not from under a caller */
            s->error = 1;
            ngx_post_event(c->write, &ngx_posted_events);
            return;
        }

        o->sent += (uint32_t) sent;

        if ((size_t) sent < want) {
            continue;
        }

        s->out_head = o->next;
        if (s->out_head == NULL) {
            s->out_tail = NULL;
        }

        s->out_count--;
        s->out_bytes -= (uint32_t) (o->hlen + o->buf->len);
        ngx_chat_stat_inc(frames_out);
        ngx_chat_shbuf_release(o->buf);
        ngx_free(o);
    }

    if (s->replay_wait && s->out_count <= s->conf->out_frames / 4) {
        ngx_chat_replay_resume(s);
    }

    if (s->out_head == NULL) {
        if (c->write->timer_set) {
            ngx_del_timer(c->write);
        }

        if (s->closing && s->peer_closed) {
            ngx_post_event(c->write, &ngx_posted_events);
        }

        return;
    }

    if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
        s->error = 1;
        ngx_post_event(c->write, &ngx_posted_events);
        return;
    }

    if (!c->write->timer_set) {
        ngx_add_timer(c->write, (ngx_msec_t) s->conf->send_timeout * 1000);
    }
}


/* A complete, pre-built frame (or the 101), queued as it is. */
static ngx_int_t
ngx_chat_ws_queue_raw(ngx_chat_session_t *s, u_char *data, size_t len,
    ngx_uint_t force)
{
    ngx_chat_out_t    *o;
    ngx_chat_shbuf_t  *b;

    if (!force && s->out_count >= s->conf->out_frames) {
        ngx_chat_stat_inc(closed_slow);
        ngx_chat_ws_close(s, 1008, "slow consumer");
        return NGX_ERROR;
    }

    b = ngx_chat_shbuf_alloc(len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    o = ngx_alloc(sizeof(ngx_chat_out_t), &s->log);
    if (o == NULL) {
        ngx_chat_shbuf_release(b);
        return NGX_ERROR;
    }

    ngx_memcpy(b->data, data, len);
    o->next = NULL;
    o->buf = b;
    o->cursor = 0;
    o->sent = 0;
    o->hlen = 0;
    o->opcode = 0;

    ngx_chat_out_append(s, o);

    ngx_chat_ws_flush(s);

    return NGX_OK;
}


/*
 * Start the closing handshake: what is queued and not yet started is
 * dropped (durable events stay in the inbox), the close frame goes out,
 * and the peer has NGX_CHAT_WS_CLOSE_WAIT ms to answer.
 */
void
ngx_chat_ws_close(ngx_chat_session_t *s, ngx_uint_t code, const char *reason)
{
    u_char             frame[CHAT_WS_CLOSE_FRAME_MAX];
    size_t             n;
    ngx_chat_out_t    *o, *next;
    ngx_connection_t  *c;

    c = s->connection;
    if (c == NULL || s->closing) {
        return;
    }

    /* a slow consumer loses what it has not started to receive (durable
     * events stay in its inbox); keep a frame already half on the wire */
    o = (code == 1008) ? s->out_head : NULL;
    if (o) {
        next = o->next;
        if (o->sent == 0) {
            next = o;
            s->out_head = NULL;
            s->out_tail = NULL;
            s->out_count = 0;

        } else {
            o->next = NULL;
            s->out_tail = o;
            s->out_count = 1;
        }

        s->out_bytes = s->out_head ? o->hlen + o->buf->len : 0;

        for (o = next; o; o = next) {
            next = o->next;
            ngx_chat_shbuf_release(o->buf);
            ngx_free(o);
        }
    }

    n = chat_ws_write_close(frame, (unsigned) code, reason,
                            reason ? ngx_strlen(reason) : 0);

    (void) ngx_chat_ws_queue_raw(s, frame, n, 1);

    s->closing = 1;

    if (code >= 1002 && code <= 1009) {
        ngx_chat_stat_inc(closed_protocol);
    }

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    ngx_add_timer(c->read, NGX_CHAT_WS_CLOSE_WAIT);
}


void
ngx_chat_ws_drain(ngx_chat_session_t *s)
{
    if (s->request) {
        s->draining = 1;      /* still in its handshake: refused with 503 */
        return;
    }

    if (s->closing || s->connection == NULL) {
        return;
    }

    s->draining = 1;
    ngx_chat_stat_inc(closed_drain);
    (void) ngx_chat_session_send(s, (u_char *) "{\"type\":\"reconnect\"}", 20);
    ngx_chat_ws_close(s, 1001, "server restart");
}


static void
ngx_chat_ws_finalize(ngx_chat_session_t *s)
{
    ngx_pool_t        *pool;
    ngx_connection_t  *c;

    c = s->connection;

    if (c) {
        /*
         * The connection logs through the session (c->log = &s->log), and
         * the session may be freed by the close below: nginx's own
         * ngx_close_connection() reads the log of the events whose timers
         * it deletes. Hand the connection the cycle's log first (a reload
         * with live sessions found this as a worker dying on SIGSEGV once
         * the freed session was the heap top and got trimmed; ASan cannot
         * see it, nginx itself is not instrumented).
         */
        c->log = ngx_cycle->log;
        c->read->log = c->log;
        c->write->log = c->log;
    }

    ngx_chat_session_close(s);

    if (c == NULL) {
        return;
    }

#if (NGX_HTTP_SSL)
    if (c->ssl) {
        c->ssl->no_wait_shutdown = 1;
        (void) ngx_ssl_shutdown(c);
    }
#endif

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_active, -1);
#endif

    pool = c->pool;
    c->destroyed = 1;
    ngx_close_connection(c);

    if (pool) {
        ngx_destroy_pool(pool);
    }
}


static void
ngx_chat_ws_write_handler(ngx_event_t *wev)
{
    ngx_connection_t    *c = wev->data;
    ngx_chat_session_t  *s = c->data;

    if (wev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                      "chat: client timed out while receiving");
        ngx_chat_stat_inc(closed_slow);
        ngx_chat_ws_finalize(s);
        return;
    }

    if (s->error) {
        ngx_chat_ws_finalize(s);
        return;
    }

    ngx_chat_ws_flush(s);

    if (s->error || (s->closing && s->peer_closed && s->out_head == NULL)) {
        ngx_chat_ws_finalize(s);
    }
}


/* --- input ------------------------------------------------------------------ */

/* Returns NGX_OK to go on, NGX_DONE when the session stops reading. */
static ngx_int_t
ngx_chat_ws_event(ngx_chat_session_t *s, chat_ws_event_t *ev)
{
    u_char   *m, frame[CHAT_WS_CLOSE_FRAME_MAX];
    size_t    n;

    ngx_chat_stat_inc(frames_in);

    switch (ev->kind) {

    case CHAT_WS_EV_TEXT:
        if (s->closing) {
            return NGX_OK;          /* data after our close is ignored */
        }

        if (ev->fin && s->msg == NULL) {
            ngx_chat_route_frame(s, ev->payload, ev->len);
            return NGX_OK;
        }

        /* fragmented: assemble (the codec bounds the total by max_message) */
        m = ngx_alloc(s->msg_len + ev->len + 1, &s->log);
        if (m == NULL) {
            ngx_chat_ws_close(s, 1011, "out of memory");
            return NGX_DONE;
        }

        if (s->msg) {
            ngx_memcpy(m, s->msg, s->msg_len);
            ngx_free(s->msg);
        }

        ngx_memcpy(m + s->msg_len, ev->payload, ev->len);
        s->msg = m;
        s->msg_len += (uint32_t) ev->len;

        if (ev->fin) {
            m = s->msg;
            n = s->msg_len;
            s->msg = NULL;
            s->msg_len = 0;
            ngx_chat_route_frame(s, m, n);
            ngx_free(m);
        }

        return NGX_OK;

    case CHAT_WS_EV_BINARY:
        ngx_chat_ws_close(s, 1003, "binary frames are not accepted");
        return NGX_DONE;

    case CHAT_WS_EV_PING:
        if (s->closing) {
            return NGX_OK;
        }

        n = chat_ws_write_header(frame, CHAT_WS_OP_PONG, 1, ev->len);
        ngx_memcpy(frame + n, ev->payload, ev->len);
        return ngx_chat_ws_queue_raw(s, frame, n + ev->len, 0) == NGX_OK
               ? NGX_OK : NGX_DONE;

    case CHAT_WS_EV_PONG:
        return NGX_OK;

    case CHAT_WS_EV_CLOSE:
        s->peer_closed = 1;

        if (!s->closing) {
            /* echo the code; 1005 (no status) is echoed as an empty close */
            n = chat_ws_write_close(frame,
                             ev->code == CHAT_WS_CLOSE_NO_STATUS ? 0 : ev->code,
                             NULL, 0);
            s->closing = 1;
            (void) ngx_chat_ws_queue_raw(s, frame, n, 1);
        }

        if (s->out_head == NULL && s->connection) {
            ngx_post_event(s->connection->write, &ngx_posted_events);
        }

        return NGX_DONE;

    default: /* CHAT_WS_EV_ERROR */
        ngx_chat_ws_close(s, ev->code, ev->code == 1009 ? "message too big"
                          : ev->code == 1007 ? "invalid UTF-8"
                          : "protocol error");
        return NGX_DONE;
    }
}


/*
 * Parse the frames in buf[0..*len). Returns NGX_OK (the unparsed tail is
 * moved to the front, *len updated, *need set), NGX_DONE (stop reading).
 */
static ngx_int_t
ngx_chat_ws_parse(ngx_chat_session_t *s, u_char *buf, size_t *len,
    uint64_t *need)
{
    u_char           *p;
    size_t            left;
    ssize_t           n;
    chat_ws_event_t   ev;

    p = buf;
    left = *len;
    *need = 0;

    while (left) {
        n = chat_ws_read_frame(&s->reader, p, left, s->conf->max_message, &ev);

        if (n == 0) {
            *need = ev.need;
            break;
        }

        if (n < 0) {
            ngx_log_error(NGX_LOG_INFO, &s->log, 0,
                          "chat: websocket protocol error, closing with %ui",
                          (ngx_uint_t) ev.code);
            (void) ngx_chat_ws_event(s, &ev);
            return NGX_DONE;
        }

        p += n;
        left -= n;

        if (ngx_chat_ws_event(s, &ev) != NGX_OK || s->connection == NULL) {
            return NGX_DONE;
        }
    }

    if (left && p != buf) {
        ngx_memmove(buf, p, left);
    }

    *len = left;

    return NGX_OK;
}


static void
ngx_chat_ws_read_handler(ngx_event_t *rev)
{
    u_char              *buf, *nb;
    size_t               len, size;
    ssize_t              n;
    uint64_t             need;
    ngx_uint_t           i;
    ngx_connection_t    *c = rev->data;
    ngx_chat_session_t  *s = c->data;

    if (rev->timedout) {
        if (s->closing) {
            ngx_chat_ws_finalize(s);
            return;
        }

        ngx_log_error(NGX_LOG_INFO, &s->log, 0,
                      "chat: no heartbeat for %T s, closing",
                      s->conf->idle_timeout);
        ngx_chat_stat_inc(closed_idle);
        rev->timedout = 0;
        ngx_chat_ws_close(s, 1001, "idle timeout");
        return;
    }

    if (s->error) {
        ngx_chat_ws_finalize(s);
        return;
    }

    for (i = 0; i < NGX_CHAT_WS_READS; i++) {

        if (s->rbuf) {
            buf = s->rbuf;
            len = s->rlen;
            size = s->rsize;

        } else {
            buf = ngx_chat_ws_buf;
            len = 0;
            size = ngx_chat_ws_buf_size;
        }

        if (len < size) {
            n = c->recv(c, buf + len, size - len);

            if (n == NGX_AGAIN) {
                break;

            } else if (n == 0 || n == NGX_ERROR) {
                /* the peer is gone, with or without a close frame */
                ngx_chat_ws_finalize(s);
                return;
            }

            len += n;
        }

        if (ngx_chat_ws_parse(s, buf, &len, &need) != NGX_OK) {
            /* closing: drop what was read; wait for the close or EOF */
            if (s->rbuf) {
                ngx_free(s->rbuf);
                s->rbuf = NULL;
                s->rlen = s->rsize = 0;
            }

            if (s->connection == NULL) {
                return;
            }

            break;
        }

        if (len == 0) {
            if (s->rbuf) {
                ngx_free(s->rbuf);   /* idle connections hold no buffer */
                s->rbuf = NULL;
                s->rlen = s->rsize = 0;
            }
            continue;
        }

        /* a frame is partly here: keep it in a buffer sized for the whole */
        if (need > ngx_chat_ws_buf_size) {
            need = ngx_chat_ws_buf_size;
        }

        if (buf != s->rbuf || need > s->rsize) {
            nb = ngx_alloc((size_t) need, &s->log);
            if (nb == NULL) {
                ngx_chat_ws_close(s, 1011, "out of memory");
                break;
            }

            ngx_memcpy(nb, buf, len);

            if (s->rbuf) {
                ngx_free(s->rbuf);
            }

            s->rbuf = nb;
            s->rsize = (uint32_t) need;
        }

        s->rlen = (uint32_t) len;
    }

    if (s->connection == NULL) {
        return;
    }

    if (i == NGX_CHAT_WS_READS) {
        ngx_post_event(rev, &ngx_posted_events);   /* let others run */
    }

    if (!s->closing) {
        ngx_add_timer(rev, (ngx_msec_t) s->conf->idle_timeout * 1000);
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_chat_ws_finalize(s);
    }
}


/* What the session core and the features may ask of a WebSocket. */
static ngx_chat_transport_t  ngx_chat_ws_transport = {
    ngx_chat_ws_flush,
    ngx_chat_ws_close,
    ngx_chat_ws_drain,
    NULL,                        /* replayed: pages follow by themselves */
    1,                           /* framed: items carry a frame header */
    0,                           /* one_page */
    1,                           /* coalesce_acks (chat_ack_delay) */
    256                          /* replay_page */
};


ngx_int_t
ngx_chat_ws_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_transports[NGX_CHAT_T_WS] = &ngx_chat_ws_transport;

    /* big enough for the largest accepted frame (chat_max_message <= 64k) */
    ngx_chat_ws_buf_size = NGX_CHAT_WS_READ_BUF;

    ngx_chat_ws_buf = ngx_alloc(ngx_chat_ws_buf_size + CHAT_WS_MAX_CLIENT_HDR,
                                cycle->log);
    if (ngx_chat_ws_buf == NULL) {
        return NGX_ERROR;
    }

    ngx_chat_ws_buf_size += CHAT_WS_MAX_CLIENT_HDR;

    return NGX_OK;
}
