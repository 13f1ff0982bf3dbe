/*
 * Typing, a feature: relayed, never stored, budgeted (chat_limit typing,
 * chat_typing_interval); a direct indicator with one script on the
 * recipient's registry (ngx_chat_redis_relay), a group's with one publish
 * on the broadcast channel for all its members.
 */
#include "ngx_chat.h"

#include <hiredis/hiredis.h>


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

    (void) ngx_chat_redis_publish((u_char *) NGX_CHAT_BROADCAST_CHANNEL,
                                  sizeof(NGX_CHAT_BROADCAST_CHANNEL) - 1,
                                  buf, (size_t) (p - buf));

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
        return ngx_chat_redis_relay((u_char *) f->target_id, f->target_len,
                   json, ngx_sprintf(json, "{\"type\":\"typing\","
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
