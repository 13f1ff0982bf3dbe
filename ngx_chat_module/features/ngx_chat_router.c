/*
 * The frame router, top of the features: one client frame, from a
 * WebSocket message or an HTTP endpoint's body, goes to the feature that
 * serves it (messages, typing, presence), and the answer goes back the
 * way the frame came. Also the features' part of a closing session
 * (ngx_chat_session_close_hook) and their start in each worker process.
 */
#include "ngx_chat.h"


/*
 * Route a parsed frame of a WebSocket session (s) or of an HTTP request (r,
 * authenticated as id). Over WebSocket the answer is queued to the session
 * (nothing, a frame, or an error) and NGX_OK returned; over HTTP the result
 * is what the request is finalized with (NGX_DONE: the pipeline answers
 * it later).
 */
ngx_int_t
ngx_chat_route(ngx_chat_session_t *s, ngx_http_request_t *r,
    ngx_chat_identity_t *id, chat_proto_frame_t *f)
{
    u_char               *user;
    size_t                ulen;
    int64_t               wait;
    ngx_int_t             rc;
    ngx_chat_loc_conf_t  *conf;

    if (s) {
        user = s->user->id;
        ulen = s->user->len;
        conf = s->conf;

        if (f->type != CHAT_PROTO_ACK) {
            /* any other frame applies a delayed ack first */
            ngx_chat_msg_ack_flush(s);
        }

    } else {
        user = id->user;
        ulen = id->user_len;
        conf = ngx_http_get_module_loc_conf(r, ngx_chat_module);
    }

    switch (f->type) {

    case CHAT_PROTO_PING:
        if (s == NULL) {
            break;
        }

        (void) ngx_chat_session_send(s, (u_char *) "{\"type\":\"pong\"}", 15);
        return NGX_OK;

    case CHAT_PROTO_TYPING:
        rc = ngx_chat_typing(conf, user, ulen, f, &wait);

        if (s) {
            if (rc == NGX_BUSY) {
                ngx_chat_session_limited(s, "too many typing frames", wait);

            } else if (rc != NGX_OK) {
                ngx_chat_session_error(s, "unavailable", "try again later",
                                       NULL);
            }

            return NGX_OK;
        }

        if (rc == NGX_OK) {
            return ngx_chat_http_json(r, NGX_HTTP_NO_CONTENT, NULL, 0);
        }

        if (rc == NGX_BUSY) {
            return ngx_chat_http_limited(r, "too many typing frames", wait);
        }

        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "try again later");

    case CHAT_PROTO_WATCH:
    case CHAT_PROTO_UNWATCH:
        if (s == NULL) {
            break;          /* WebSocket only: GET /chat/presence instead */
        }

        ngx_chat_presence_watch(s, f, f->type == CHAT_PROTO_WATCH);
        return NGX_OK;

    case CHAT_PROTO_SEND:
    case CHAT_PROTO_ACK:
    case CHAT_PROTO_READ:
        if (s) {
            ngx_chat_msg_frame(s, f);
            return NGX_OK;
        }

        return ngx_chat_msg_http(r, id, f);

    default:
        break;
    }

    if (s) {
        ngx_chat_session_error(s, "bad_request", "unexpected frame type",
                               NULL);
        return NGX_OK;
    }

    return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                               "unexpected frame type");
}


/*
 * One client frame of a WebSocket session (a complete text message). Bad
 * frames get an error object; the session lives on.
 */
void
ngx_chat_route_frame(ngx_chat_session_t *s, u_char *p, size_t len)
{
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

    (void) ngx_chat_route(s, NULL, NULL, &f);
}


/* A session closes: an ack still waiting for chat_ack_delay goes now,
 * before the registry entry does; its watches end. */
static void
ngx_chat_features_close(ngx_chat_session_t *s)
{
    ngx_chat_msg_ack_flush(s);
    ngx_chat_presence_unwatch_all(s);
}


ngx_int_t
ngx_chat_features_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_session_close_hook = ngx_chat_features_close;

    if (ngx_chat_msg_init_process(cycle) != NGX_OK
        || ngx_chat_presence_init_process(cycle) != NGX_OK
        || ngx_chat_deliver_init_process(cycle) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}
