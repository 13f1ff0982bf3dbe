/*
 * Delivery, a feature: what the fan-out workers publish to this worker
 * process's channel (and what the broadcast channel brings, group typing)
 * goes to the sessions of the named users, durable events exactly once
 * and in cursor order per session (a gap is fetched from the inbox by a
 * replay), ephemeral ones only to sessions with room for them.
 */
#include "ngx_chat.h"


/*
 * "<recipients>\n<json object>" (libchat's chat_delivery_parse, the format
 * the fan-out writes with chat_delivery_token). Recipients are separated
 * by spaces, each "user[:cursor][!device]": with a cursor the frame
 * becomes {"cursor":N,...}; "!device" skips that device (the sender's own).
 */
void
ngx_chat_deliver(u_char *p, size_t len)
{
    u_char                prefix[40];
    size_t                plen, pos;
    ngx_uint_t            eph;
    ngx_queue_t          *q, *next;
    chat_entry_str_t      toks, ev;
    ngx_chat_user_t      *u;
    ngx_chat_shbuf_t     *b;
    ngx_chat_session_t   *s;
    chat_delivery_rcpt_t  r;

    if (chat_delivery_parse((char *) p, len, &toks, &ev) != 0) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: malformed delivery on the worker channel");
        return;
    }

    /* the event without its "{": each session's prefix opens it */
    b = ngx_chat_shbuf_alloc(ev.len - 1);
    if (b == NULL) {
        return;
    }

    ngx_memcpy(b->data, ev.p + 1, b->len);

    /* typing (the only ephemeral event on these channels) */
    eph = (b->len > 15 && ngx_strncmp(b->data, "\"type\":\"typing\"", 15) == 0);

    for (pos = 0; chat_delivery_next(&toks, &pos, &r); /* void */) {

        u = ngx_chat_user_find((u_char *) r.user.p, r.user.len);
        if (u == NULL) {
            continue;
        }

        if (r.cursor) {
            plen = ngx_sprintf(prefix, "{\"cursor\":%uL,", r.cursor) - prefix;

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

            if (r.cursor) {
                /* durable: exactly once per session, in cursor order */
                if (r.cursor <= s->sent_cursor) {
                    continue;
                }

                if (s->replaying) {
                    s->missed = 1;     /* the replay fetches it */
                    continue;
                }

                if (r.cursor != s->sent_cursor + 1) {
                    /* a gap (an event still on its way, or lost with a
                     * publish): fetch from the inbox in order instead.
                     * Also at cursor 0: the user's events come from every
                     * fan-out worker whose shards they touch, so the
                     * first publish to arrive may not be the lowest */
                    s->missed = 0;
                    ngx_chat_replay_start(s);
                    continue;
                }

                s->sent_cursor = r.cursor;
            }

            if (r.dev.len && r.dev.len == s->dev_len
                && ngx_strncmp(r.dev.p, s->device, s->dev_len) == 0)
            {
                continue;   /* the device the event came from */
            }

            if (eph && !r.cursor) {
                (void) ngx_chat_session_send_ephemeral(s, b);

            } else {
                (void) ngx_chat_session_send_shared(s, b, prefix, plen,
                                                    r.cursor);
            }

            /* the send may have closed the last session and freed u */
            if (ngx_chat_user_find((u_char *) r.user.p, r.user.len) != u) {
                break;
            }
        }
    }

    ngx_chat_shbuf_release(b);
}


ngx_int_t
ngx_chat_deliver_init_process(ngx_cycle_t *cycle)
{
    static ngx_str_t  all = ngx_string(NGX_CHAT_BROADCAST_CHANNEL);

    /* the worker channel's name is set by ngx_chat_redis_init_process */
    if (ngx_chat_redis_on_channel(&ngx_chat_worker_channel, 0,
                                  ngx_chat_deliver) != NGX_OK
        || ngx_chat_redis_on_channel(&all, 0, ngx_chat_deliver) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}
