/*
 * Delivery, a feature: what the fan-out workers publish to this worker
 * process's channel (and what the broadcast channel brings, group typing)
 * goes to the sessions of the named users, durable events exactly once
 * and in cursor order per session (a gap is fetched from the inbox by a
 * replay), ephemeral ones only to sessions with room for them.
 */
#include "ngx_chat.h"


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
                (void) ngx_chat_session_send_shared(s, b, prefix, plen,
                                                    cursor);
            }

            /* the send may have closed the last session and freed u */
            if (ngx_chat_user_find(tok, uend - tok) != u) {
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
