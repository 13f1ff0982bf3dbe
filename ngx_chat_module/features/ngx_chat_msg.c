/*
 * The front of the messaging pipeline, in nginx: accept a send (validate,
 * rate-limit, then one Redis script that deduplicates, numbers and
 * enqueues), acknowledge receipts of delivery and reading, and replay a
 * user's inbox to a device that (re)connects. Sends, acks and reads arrive
 * from a WebSocket session or an HTTP request; the answer goes back the way
 * the question came.
 */
#include "ngx_chat.h"
#include "chat_json.h"

#include <hiredis/hiredis.h>


#define NGX_CHAT_ID_EPOCH      1704067200000LL   /* 2024-01-01T00:00:00Z */


/* --- message ids: time (41 bits of ms), node (10), counter (12) ---------------- */

static int64_t     ngx_chat_id_ms;
static ngx_uint_t  ngx_chat_id_seq;
static ngx_uint_t  ngx_chat_id_node;


static uint64_t
ngx_chat_msg_id(void)
{
    int64_t  ms;

    ms = ngx_chat_now_ms() - NGX_CHAT_ID_EPOCH;

    if (ms > ngx_chat_id_ms) {
        ngx_chat_id_ms = ms;
        ngx_chat_id_seq = 0;

    } else if (++ngx_chat_id_seq >= 4096) {
        /* 4096 ids in one millisecond: borrow the next one */
        ngx_chat_id_ms++;
        ngx_chat_id_seq = 0;
    }

    return ((uint64_t) ngx_chat_id_ms << 22) | (ngx_chat_id_node << 12)
           | ngx_chat_id_seq;
}


/* --- where the answer goes --------------------------------------------------------- */

typedef struct {
    ngx_chat_session_t   *s;           /* WebSocket session, or */
    ngx_http_request_t   *r;           /* HTTP request */
    ngx_uint_t            shard;
    ngx_chat_loc_conf_t  *conf;
    u_char                user[NGX_CHAT_USER_MAX];
    u_char                device[NGX_CHAT_DEVICE_MAX];
    u_char                ulen;
    u_char                dlen;
    size_t                dd_len;      /* dedup key (Kafka queue) */
    u_char                dd[CHAT_PROTO_CLIENT_ID_MAX * 4 + 200];
    size_t                cid_len;     /* raw client_id, still escaped */
    u_char                cid[1];
} ngx_chat_msg_ctx_t;


static ngx_chat_msg_ctx_t *
ngx_chat_msg_ctx(ngx_chat_session_t *s, ngx_http_request_t *r, u_char *user,
    size_t ulen, u_char *dev, size_t dlen, chat_proto_str_t *cid)
{
    size_t               n;
    ngx_chat_msg_ctx_t  *ctx;

    n = cid ? cid->len : 0;

    ctx = ngx_alloc(sizeof(ngx_chat_msg_ctx_t) + n, ngx_cycle->log);
    if (ctx == NULL) {
        return NULL;
    }

    ctx->s = s;
    ctx->r = r;
    ctx->conf = s ? s->conf : ngx_http_get_module_loc_conf(r, ngx_chat_module);
    ctx->ulen = (u_char) ulen;
    ngx_memcpy(ctx->user, user, ulen);
    ctx->dlen = (u_char) dlen;
    ngx_memcpy(ctx->device, dev, dlen);
    ctx->dd_len = 0;
    ctx->cid_len = n;
    if (n) {
        ngx_memcpy(ctx->cid, cid->p, n);
    }

    /* the origin stays until the answer: a session lives on its refs, a
     * request on its count */
    if (s) {
        s->refs++;
    }

    if (r) {
        r->main->count++;
    }

    return ctx;
}


/* Answer and forget the context. status: the HTTP status for a request;
 * json NULL answers 204. */
static void
ngx_chat_msg_done(ngx_chat_msg_ctx_t *ctx, ngx_uint_t status, u_char *json,
    size_t len)
{
    u_char              *p;
    ngx_int_t            rc;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;
    ngx_chat_session_t  *s;

    s = ctx->s;
    r = ctx->r;
    ngx_free(ctx);

    if (s) {
        s->refs--;
        if (!s->closed && json) {
            (void) ngx_chat_session_send(s, json, len);
        }
        ngx_chat_session_release(s);
    }

    if (r) {
        c = r->connection;

        if (json) {
            p = ngx_pnalloc(r->pool, len);
            if (p == NULL) {
                ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
                ngx_http_run_posted_requests(c);
                return;
            }
            ngx_memcpy(p, json, len);
            rc = ngx_chat_http_json(r, status, p, len);

        } else {
            rc = ngx_chat_http_json(r, NGX_HTTP_NO_CONTENT, NULL, 0);
        }

        ngx_http_finalize_request(r, rc);
        ngx_http_run_posted_requests(c);
    }
}


static ngx_uint_t
ngx_chat_msg_status(const char *code)
{
    switch (code[0]) {
    case 'b': return NGX_HTTP_BAD_REQUEST;
    case 'c': return NGX_HTTP_CONFLICT;
    case 'f': return NGX_HTTP_FORBIDDEN;
    case 'n': return NGX_HTTP_NOT_FOUND;
    case 't': return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
    case 'r': return NGX_HTTP_TOO_MANY_REQUESTS;
    case 'u': return (code[2] == 'a') ? NGX_HTTP_SERVICE_UNAVAILABLE
                                      : NGX_HTTP_UNAUTHORIZED;
    default:  return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}


static void
ngx_chat_msg_fail(ngx_chat_msg_ctx_t *ctx, const char *code,
    const char *message, int64_t retry_after)
{
    u_char            buf[1024], *p;

    p = ngx_sprintf(buf, "{\"type\":\"error\",\"code\":\"%s\",\"message\":\"%s\"",
                    code, message);

    if (ctx->cid_len && ctx->cid_len < 800) {
        p = ngx_sprintf(p, ",\"client_id\":\"%*s\"", ctx->cid_len, ctx->cid);
    }

    if (retry_after > 0) {
        p = ngx_sprintf(p, ",\"retry_after\":%L", retry_after);

        if (ctx->r) {
            (void) ngx_chat_http_retry_after(ctx->r, retry_after);
        }
    }

    *p++ = '}';

    ngx_chat_stat_inc(errors_sent);
    ngx_chat_msg_done(ctx, ngx_chat_msg_status(code), buf, p - buf);
}


/* A direct conversation the user takes part in. */
static ngx_int_t
ngx_chat_participant(u_char *user, size_t ulen, chat_conv_t *cv)
{
    return (cv->alen == ulen && ngx_memcmp(cv->a, user, ulen) == 0)
           || (cv->blen == ulen && ngx_memcmp(cv->b, user, ulen) == 0);
}


/* --- send --------------------------------------------------------------------------- */

/* The single tick: rec is "id|seq|ts|conv" of the accepted message. */
static void
ngx_chat_msg_ack_send(ngx_chat_msg_ctx_t *ctx, u_char *rec, size_t len)
{
    u_char      *p, *f[4], buf[1200];
    size_t       flen[4];
    ngx_uint_t   i;

    p = rec;
    for (i = 0; i < 4; i++) {
        f[i] = p;
        p = (i < 3) ? ngx_strlchr(p, rec + len, '|') : rec + len;
        if (p == NULL) {
            ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
            return;
        }
        flen[i] = p - f[i];
        p++;
    }

    p = ngx_sprintf(buf, "{\"type\":\"ack\",\"client_id\":\"%*s\",\"id\":\"%*s\","
                    "\"conv\":\"%*s\",\"seq\":%*s,\"ts\":%*s}",
                    ngx_min(ctx->cid_len, 800), ctx->cid, flen[0], f[0],
                    flen[3], f[3], flen[1], f[1], flen[2], f[2]);

    ngx_chat_msg_done(ctx, NGX_HTTP_OK, buf, p - buf);
}


/* The accept script refused a group send: not_found or forbidden. */
static ngx_int_t
ngx_chat_msg_refused(ngx_chat_msg_ctx_t *ctx, redisReply *reply)
{
    if (reply == NULL || reply->type != REDIS_REPLY_STATUS) {
        return 0;
    }

    if (reply->len == 9 && ngx_strncmp(reply->str, "forbidden", 9) == 0) {
        ngx_chat_msg_fail(ctx, "forbidden", "not a member of the group", 0);

    } else {
        ngx_chat_msg_fail(ctx, "not_found", "no such group", 0);
    }

    return 1;
}


static void
ngx_chat_msg_accepted(void *rp, void *data)
{
    redisReply          *reply = rp;
    ngx_chat_msg_ctx_t  *ctx = data;

    if (ngx_chat_msg_refused(ctx, reply)) {
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_STRING) {
        if (reply && reply->type == REDIS_REPLY_ERROR) {
            ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                          "chat: accept failed: %s", reply->str);
        }
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    ngx_chat_msg_ack_send(ctx, (u_char *) reply->str, reply->len);
}


/* Kafka queue: the broker holds the record; forget the kept copy, ack. */
typedef struct {
    ngx_chat_msg_ctx_t  *ctx;
    size_t               dlen;
    size_t               rlen;
    u_char               data[1];      /* dedup key, then rec */
} ngx_chat_produced_t;


static void
ngx_chat_msg_produced(ngx_int_t ok, void *data)
{
    ngx_chat_produced_t  *pr = data;
    ngx_chat_msg_ctx_t   *ctx = pr->ctx;

    if (!ok) {
        ngx_free(pr);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    (void) ngx_chat_redis_command(NULL, NULL, "SET %b %b KEEPTTL XX",
                                  pr->data, pr->dlen, pr->data + pr->dlen,
                                  pr->rlen);

    ngx_chat_msg_ack_send(ctx, pr->data + pr->dlen, pr->rlen);
    ngx_free(pr);
}


static void
ngx_chat_msg_accepted_k(void *rp, void *data)
{
    u_char               *conv;
    size_t                clen;
    redisReply           *reply = rp, *rec, *record;
    ngx_chat_produced_t  *pr;
    ngx_chat_msg_ctx_t   *ctx = data;

    if (ngx_chat_msg_refused(ctx, reply)) {
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements < 2
        || reply->element[0]->type != REDIS_REPLY_INTEGER
        || reply->element[1]->type != REDIS_REPLY_STRING)
    {
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    rec = reply->element[1];

    if (reply->element[0]->integer == 0 || reply->elements < 3) {
        ngx_chat_msg_ack_send(ctx, (u_char *) rec->str, rec->len);
        return;
    }

    record = reply->element[2];

    pr = ngx_alloc(sizeof(ngx_chat_produced_t) + ctx->dd_len + rec->len,
                   ngx_cycle->log);
    if (pr == NULL) {
        ngx_chat_msg_fail(ctx, "unavailable", "out of memory", 0);
        return;
    }

    pr->ctx = ctx;
    pr->dlen = ctx->dd_len;
    pr->rlen = rec->len;
    ngx_memcpy(pr->data, ctx->dd, ctx->dd_len);
    ngx_memcpy(pr->data + pr->dlen, rec->str, rec->len);

    /* the key is the conversation: the rec ends with it */
    conv = (u_char *) ngx_strlchr((u_char *) rec->str, (u_char *) rec->str
                                  + rec->len, '|');
    conv = conv ? ngx_strlchr(conv + 1, (u_char *) rec->str + rec->len, '|')
                : NULL;
    conv = conv ? ngx_strlchr(conv + 1, (u_char *) rec->str + rec->len, '|')
                : NULL;
    conv = conv ? conv + 1 : (u_char *) rec->str;
    clen = (u_char *) rec->str + rec->len - conv;

    if (ngx_chat_kafka_produce(ctx->shard, conv, clen, (u_char *) record->str,
                               record->len, ngx_chat_msg_produced, pr)
        != NGX_OK)
    {
        ngx_free(pr);
        ngx_chat_msg_fail(ctx, "unavailable", "queue unavailable", 0);
    }
}


/* A script call's arguments, appended in order: keys first, then ARGV. */
#define NGX_CHAT_ACCEPT_ARGS  15

typedef struct {
    int           n;
    int           nkeys;
    const char   *v[NGX_CHAT_ACCEPT_ARGS];
    size_t        l[NGX_CHAT_ACCEPT_ARGS];
} ngx_chat_args_t;


static ngx_inline void
ngx_chat_arg(ngx_chat_args_t *a, const void *p, size_t len)
{
    a->v[a->n] = p;
    a->l[a->n++] = len;
}


/*
 * Deduplication is keyed by (sender, client_id) for every conversation:
 * before the accept script (which runs on the conversation's shard and
 * keeps its own idempotency record there) the client_id is claimed on the
 * sender's slot with a fingerprint of what it names (conversation, kind,
 * body, media). A retry with the same fingerprint goes on to the accept
 * script, which answers the original ack; a client_id reused for anything
 * else is answered `conflict`. One plain SET ... NX GET, no script.
 */
typedef struct {
    ngx_uint_t           script;
    ngx_chat_redis_cb    cb;
    ngx_chat_msg_ctx_t  *ctx;
    int                  nkeys;
    int                  argc;
    size_t               fplen;
    const char          *argv[NGX_CHAT_ACCEPT_ARGS];
    size_t               argl[NGX_CHAT_ACCEPT_ARGS];
    u_char               data[1];     /* fingerprint, then the arguments */
} ngx_chat_accept_t;


static void
ngx_chat_msg_claimed(void *rp, void *data)
{
    redisReply          *reply = rp;
    ngx_chat_accept_t   *a = data;
    ngx_chat_msg_ctx_t  *ctx = a->ctx;

    if (reply == NULL
        || (reply->type != REDIS_REPLY_NIL && reply->type != REDIS_REPLY_STRING))
    {
        if (reply && reply->type == REDIS_REPLY_ERROR) {
            ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                          "chat: client_id claim failed: %s", reply->str);
        }
        ngx_free(a);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    if (reply->type == REDIS_REPLY_STRING
        && ((size_t) reply->len != a->fplen
            || ngx_memcmp(reply->str, a->data, a->fplen) != 0))
    {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: client_id of %*s reused for another message",
                       (size_t) ctx->ulen, ctx->user);
        ngx_free(a);
        ngx_chat_msg_fail(ctx, "conflict",
                          "client_id already used for another message", 0);
        return;
    }

    /* durable: with chat_redis_replicas the reply (and so the ack, or the
     * Kafka produce) waits for WAIT on the master that ran it; none comes
     * when too few replicas confirmed it, and the client retries */
    if (ngx_chat_redis_script_durable(a->script, a->cb, ctx, a->nkeys,
                                      a->argc, a->argv, a->argl)
        != NGX_OK)
    {
        ngx_free(a);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    ngx_free(a);     /* hiredis formatted the command already */
}


/* "<conv>|<kind>|<crc32 of the decoded body, media url, mime, size>" */
static size_t
ngx_chat_msg_fingerprint(chat_proto_frame_t *f, u_char *conv, size_t clen,
    u_char *out)
{
    u_char    *dec, sz[NGX_INT64_LEN];
    size_t     dlen;
    uint32_t   crc;

    ngx_crc32_init(crc);

    /* the decoded body, so that "\u0061" and "a" are the same message;
     * without a backslash the raw form is the decoded one (no copy) */
    dec = NULL;

    if (ngx_strlchr((u_char *) f->body.p, (u_char *) f->body.p + f->body.len,
                    '\\') == NULL)
    {
        ngx_crc32_update(&crc, (u_char *) f->body.p, f->body.len);
        goto media;
    }

    dec = ngx_alloc(f->body.len + 1, ngx_cycle->log);
    if (dec != NULL
        && chat_json_unescape(f->body.p, f->body.len, (char *) dec,
                              f->body.len + 1, &dlen) == CHAT_JSON_OK)
    {
        ngx_crc32_update(&crc, dec, dlen);

    } else {
        /* cannot happen for a parsed frame; the raw form is as good */
        ngx_crc32_update(&crc, (u_char *) f->body.p, f->body.len);
    }

    if (dec) {
        ngx_free(dec);
    }

media:

    if (f->kind == CHAT_PROTO_MEDIA) {
        ngx_crc32_update(&crc, (u_char *) "\0", 1);
        ngx_crc32_update(&crc, (u_char *) f->media_url.p, f->media_url.len);
        ngx_crc32_update(&crc, (u_char *) "\0", 1);
        ngx_crc32_update(&crc, (u_char *) f->media_mime.p, f->media_mime.len);
        ngx_crc32_update(&crc, sz, ngx_sprintf(sz, "%L", f->media_size) - sz);
    }

    ngx_crc32_final(crc);

    return ngx_sprintf(out, "%*s|%c|%08xD", clen, conv,
                       f->kind == CHAT_PROTO_MEDIA ? 'm' : 't', crc) - out;
}


static ngx_int_t
ngx_chat_msg_claim(ngx_chat_msg_ctx_t *ctx, chat_proto_frame_t *f,
    u_char *conv, size_t clen, u_char *cid, size_t cidlen, ngx_uint_t script,
    ngx_chat_redis_cb cb, int nkeys, int argc, const char **argv,
    size_t *argl)
{
    u_char                 fp[CHAT_CONV_MAX + 16], key[CHAT_PROTO_CLIENT_ID_MAX * 4
                                                       + NGX_CHAT_USER_MAX + 32],
                           ttl[NGX_INT64_LEN], *p;
    size_t                 fplen, size, klen;
    int                    i;
    ngx_chat_accept_t     *a;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

    fplen = ngx_chat_msg_fingerprint(f, conv, clen, fp);

    size = sizeof(ngx_chat_accept_t) + fplen;
    for (i = 0; i < argc; i++) {
        size += argl[i];
    }

    a = ngx_alloc(size, ngx_cycle->log);
    if (a == NULL) {
        return NGX_ERROR;
    }

    a->script = script;
    a->cb = cb;
    a->ctx = ctx;
    a->nkeys = nkeys;
    a->argc = argc;
    a->fplen = fplen;

    p = ngx_cpymem(a->data, fp, fplen);

    for (i = 0; i < argc; i++) {
        a->argv[i] = (char *) p;
        a->argl[i] = argl[i];
        p = ngx_cpymem(p, argv[i], argl[i]);
    }

    klen = ngx_sprintf(key, "chat:{u:%*s}:cid:%*s", (size_t) ctx->ulen,
                       ctx->user, cidlen, cid) - key;

    if (ngx_chat_redis_command(ngx_chat_msg_claimed, a,
                               "SET %b %b NX GET EX %b", key, klen, fp, fplen,
                               ttl, (size_t) (ngx_sprintf(ttl, "%T",
                                                          cmcf->dedup_ttl)
                                              - ttl))
        != NGX_OK)
    {
        ngx_free(a);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_chat_msg_send(ngx_chat_msg_ctx_t *ctx, chat_proto_frame_t *f)
{
    u_char                 conv[CHAT_CONV_MAX + 1], id[NGX_INT64_LEN],
                           ts[NGX_INT64_LEN], ttl[NGX_INT64_LEN],
                           seqk[32], stream[32], pre[256], cidbuf[1024],
                           mem[NGX_CHAT_GROUP_KEY_LEN],
                           snd[NGX_CHAT_GROUP_KEY_LEN], *suf, *p;
    size_t                 clen, cidlen, slen, idlen;
    int64_t                wait, now;
    ngx_int_t              rc;
    ngx_uint_t             group;
    ngx_chat_args_t        args;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);
    group = (f->target == CHAT_PROTO_TARGET_GROUP);

    wait = ngx_chat_limit(ctx->conf, NGX_CHAT_ACT_SEND, ctx->user, ctx->ulen,
                          1);
    if (wait) {
        ngx_chat_msg_fail(ctx, "rate_limited", "too many messages", wait);
        return;
    }

    if (chat_json_unescape(f->client_id.p, f->client_id.len, (char *) cidbuf,
                           sizeof(cidbuf), &cidlen) != CHAT_JSON_OK)
    {
        ngx_chat_msg_fail(ctx, "bad_request", "bad client_id", 0);
        return;
    }

    if (group) {
        clen = chat_conv_group(f->target_id, f->target_len, (char *) conv);
    } else {
        clen = chat_conv_direct((char *) ctx->user, ctx->ulen, f->target_id,
                                f->target_len, (char *) conv);
    }

    ctx->shard = ngx_chat_shard(cmcf, conv, clen);
    now = ngx_chat_now_ms();

    /* the event as every device will see it, seq filled in by the script */
    slen = sizeof(",\"from\":\"\",\"to\":\"\",\"body\":\"\",\"kind\":\"media\","
                  "\"media\":{\"url\":\"\",\"mime\":\"\",\"size\":},\"ts\":}")
           + 2 * NGX_CHAT_USER_MAX + f->body.len + f->media_url.len
           + f->media_mime.len + 2 * NGX_INT64_LEN;

    suf = ngx_alloc(slen, ngx_cycle->log);
    if (suf == NULL) {
        ngx_chat_msg_fail(ctx, "unavailable", "out of memory", 0);
        return;
    }

    p = ngx_sprintf(suf, ",\"from\":\"%*s\",\"%s\":\"%*s\",\"body\":\"%*s\","
                    "\"kind\":\"%s\"", (size_t) ctx->ulen, ctx->user,
                    group ? "group" : "to", (size_t) f->target_len,
                    f->target_id,
                    (size_t) f->body.len, f->body.p,
                    f->kind == CHAT_PROTO_MEDIA ? "media" : "text");

    if (f->kind == CHAT_PROTO_MEDIA) {
        p = ngx_sprintf(p, ",\"media\":{\"url\":\"%*s\",\"mime\":\"%*s\","
                        "\"size\":%L}", (size_t) f->media_url.len,
                        f->media_url.p, (size_t) f->media_mime.len,
                        f->media_mime.p, f->media_size);
    }

    p = ngx_sprintf(p, ",\"ts\":%L}", now);

    /* the accept script's arguments by name (lua/accept.lua, accept_k.lua):
     * KEYS dedup, seq, [stream: the Redis queue], [mem, snd: a group];
     * ARGV conv, id, ts, dedup ttl, event prefix and suffix, sender,
     * device, "to" or "group", recipient */
    args.n = 0;
    idlen = ngx_sprintf(id, "%uL", ngx_chat_msg_id()) - id;

    ctx->dd_len = ngx_sprintf(ctx->dd, "chat:{s%ui}:dd:%*s:%*s", ctx->shard,
                              (size_t) ctx->ulen, ctx->user, cidlen, cidbuf)
                  - ctx->dd;
    ngx_chat_arg(&args, ctx->dd, ctx->dd_len);
    ngx_chat_arg(&args, seqk, ngx_sprintf(seqk, "chat:{s%ui}:seq", ctx->shard)
                              - seqk);

    if (!cmcf->kafka) {
        ngx_chat_arg(&args, stream, ngx_sprintf(stream, "chat:{s%ui}:in",
                                                ctx->shard) - stream);
    }

    if (group) {
        ngx_chat_arg(&args, mem, ngx_chat_group_key(mem, ctx->shard,
                                     (u_char *) f->target_id, f->target_len,
                                     "mem"));
        ngx_chat_arg(&args, snd, ngx_chat_group_key(snd, ctx->shard,
                                     (u_char *) f->target_id, f->target_len,
                                     "snd"));
    }

    args.nkeys = args.n;

    ngx_chat_arg(&args, conv, clen);
    ngx_chat_arg(&args, id, idlen);
    ngx_chat_arg(&args, ts, ngx_sprintf(ts, "%L", now) - ts);
    ngx_chat_arg(&args, ttl, ngx_sprintf(ttl, "%T", cmcf->dedup_ttl) - ttl);
    ngx_chat_arg(&args, pre, ngx_sprintf(pre, "{\"type\":\"msg\",\"id\":\"%*s\","
                                         "\"conv\":\"%*s\",\"seq\":", idlen, id,
                                         clen, conv) - pre);
    ngx_chat_arg(&args, suf, p - suf);
    ngx_chat_arg(&args, ctx->user, ctx->ulen);
    ngx_chat_arg(&args, ctx->device, ctx->dlen);
    ngx_chat_arg(&args, group ? "group" : "to", group ? 5 : 2);
    ngx_chat_arg(&args, f->target_id, f->target_len);

    rc = ngx_chat_msg_claim(ctx, f, conv, clen, cidbuf, cidlen,
                            cmcf->kafka ? CHAT_LUA_ACCEPT_K : CHAT_LUA_ACCEPT,
                            cmcf->kafka ? ngx_chat_msg_accepted_k
                                        : ngx_chat_msg_accepted,
                            args.nkeys, args.n, args.v, args.l);

    if (rc != NGX_OK) {
        ngx_free(suf);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    ngx_free(suf);   /* the claim copied the arguments */
}


/* --- receipts ------------------------------------------------------------------------ */

/* A receipt event as sessions get it: the same JSON whether the fan-out
 * publishes it (queued) or the module relays it (a direct delivered one). */
static size_t
ngx_chat_receipt_json(u_char *ev, size_t size, u_char *conv, size_t clen,
    const char *status, u_char *by, size_t blen, u_char *seq, size_t seqlen)
{
    return ngx_snprintf(ev, size, "{\"type\":\"receipt\",\"conv\":\"%*s\","
                        "\"status\":\"%s\",\"by\":\"%*s\",\"seq\":%*s,"
                        "\"ts\":%L}", clen, conv, status, blen, by,
                        seqlen, seq, ngx_chat_now_ms()) - ev;
}


/*
 * A receipt's queue entry (libchat's encoder, chat_entry.c, the format the
 * workers decode): a stream entry's pairs with the Redis queue, the same
 * fields as one JSON object with Kafka. Fire and forget: the pointer the
 * receipt reports is already in Redis when this runs.
 */
static void
ngx_chat_receipt_enqueue(u_char *by, size_t blen, u_char *dev, size_t dlen,
    u_char *conv, size_t clen, const char *status, u_char *seq, size_t seqlen,
    u_char *prev, size_t prevlen)
{
    u_char                 stream[32], ev[400], rec[1024];
    char                   num[CHAT_ENTRY_NUMBUF];
    const char            *argv[3 + 2 * CHAT_EF_N], *name[CHAT_EF_N],
                          *val[CHAT_EF_N];
    size_t                 argl[3 + 2 * CHAT_EF_N], vlen[CHAT_EF_N], len;
    ngx_int_t              n, i;
    ngx_uint_t             shard;
    chat_entry_t           e;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);
    shard = ngx_chat_shard(cmcf, conv, clen);

    ngx_memzero(&e, sizeof(chat_entry_t));
    e.type = CHAT_ENTRY_RECEIPT;
    e.conv.p = (char *) conv;
    e.conv.len = clen;
    e.from.p = (char *) by;
    e.from.len = blen;
    e.dev.p = (char *) dev;
    e.dev.len = dlen;
    e.st.p = status;
    e.st.len = ngx_strlen(status);
    e.seq = ngx_atoof(seq, seqlen);
    e.prev = prevlen ? ngx_atoof(prev, prevlen) : 0;
    e.ev.p = (char *) ev;
    e.ev.len = ngx_chat_receipt_json(ev, sizeof(ev), conv, clen, status, by,
                                     blen, seq, seqlen);

    if (cmcf->kafka) {
        len = chat_entry_json(&e, (char *) rec, sizeof(rec));

        if (len == 0
            || ngx_chat_kafka_produce(shard, conv, clen, rec, len, NULL, NULL)
               != NGX_OK)
        {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "chat: %s receipt for %*s lost: kafka unavailable",
                          status, clen, conv);
        }
        return;
    }

    argv[0] = "XADD";
    argl[0] = 4;
    argv[1] = (char *) stream;
    argl[1] = ngx_sprintf(stream, "chat:{s%ui}:in", shard) - stream;
    argv[2] = "*";
    argl[2] = 1;

    n = chat_entry_pairs(&e, name, val, vlen, num);
    for (i = 0; i < n; i++) {
        argv[3 + 2 * i] = name[i];
        argl[3 + 2 * i] = ngx_strlen(name[i]);
        argv[4 + 2 * i] = val[i];
        argl[4 + 2 * i] = vlen[i];
    }

    if (ngx_chat_redis_commandv(NULL, NULL, 3 + 2 * n, argv, argl) != NGX_OK) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: %s receipt for %*s lost: redis unavailable",
                      status, clen, conv);
    }
}


/*
 * A delivered receipt goes out: a direct conversation's is relayed straight
 * to the sender's connections (lua/relay.lua), with no queue entry: it is
 * live only (PROTOCOL 7), the pointer it reports is in Redis already (the
 * ack script) and GET /chat/receipts reads it there, so a queue entry would
 * cost an XADD, the fan-out's read and registry lookup and three consumer
 * groups' XACKs for the same PUBLISH. A group's goes through the queue:
 * the fan-out's group_receipt.lua finds the senders it tells something.
 */
static void
ngx_chat_dlv_send(u_char *by, size_t blen, u_char *dev, size_t dlen,
    u_char *conv, size_t clen, u_char *seq, size_t seqlen, u_char *prev,
    size_t prevlen)
{
    u_char       ev[400];
    chat_conv_t  cv;
    u_char      *peer;
    size_t       plen;

    if (chat_conv_parse((char *) conv, clen, &cv) != 0 || cv.kind != 'd') {
        ngx_chat_receipt_enqueue(by, blen, dev, dlen, conv, clen, "delivered",
                                 seq, seqlen, prev, prevlen);
        return;
    }

    if (cv.alen == blen && ngx_memcmp(cv.a, by, blen) == 0) {
        peer = (u_char *) cv.b;
        plen = cv.blen;
    } else {
        peer = (u_char *) cv.a;
        plen = cv.alen;
    }

    if (plen == blen && ngx_memcmp(peer, by, blen) == 0) {
        return;                     /* a conversation with oneself: nobody */
    }

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat: delivered receipt %*s relayed to %*s",
                   clen, conv, plen, peer);

    if (ngx_chat_redis_relay(peer, plen, ev,
            ngx_chat_receipt_json(ev, sizeof(ev), conv, clen, "delivered",
                                  by, blen, seq, seqlen))
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: delivered receipt for %*s not relayed: "
                      "redis unavailable (the pointer is stored)", clen, conv);
    }
}


/*
 * Delivered receipts, coalesced: an ack moves the user's delivered pointer
 * in Redis at once, but the receipt for the senders waits up to
 * chat_receipt_delay in this worker, so that a device acknowledging every
 * message one by one produces one receipt per conversation and delay, not
 * one per message (a group of 500 would otherwise send its senders 499
 * receipts per message). Pending receipts are bounded; the timer that
 * flushes them is not cancelable, so a graceful exit (reload, quit) sends
 * them first.
 */
#define NGX_CHAT_DLV_MAX  65536

typedef struct {
    ngx_str_node_t   sn;          /* key: hash of "user conv"; str: that */
    int64_t          seq;         /* the newest pointer */
    int64_t          prev;        /* the pointer before the first of them */
    u_char           dlen;
    u_char           device[NGX_CHAT_DEVICE_MAX];
    u_char           ulen;
    u_char           key[NGX_CHAT_USER_MAX + 1 + CHAT_CONV_MAX];
} ngx_chat_dlv_t;

static ngx_rbtree_t        ngx_chat_dlv_tree;
static ngx_rbtree_node_t   ngx_chat_dlv_sentinel;
static ngx_uint_t          ngx_chat_dlv_n;
static ngx_event_t         ngx_chat_dlv_ev;
static ngx_connection_t    ngx_chat_dlv_conn;


static void
ngx_chat_dlv_flush(ngx_event_t *ev)
{
    u_char             seq[NGX_INT64_LEN], prev[NGX_INT64_LEN];
    ngx_chat_dlv_t    *d;
    ngx_rbtree_node_t *node;

    while (ngx_chat_dlv_tree.root != &ngx_chat_dlv_sentinel) {
        node = ngx_rbtree_min(ngx_chat_dlv_tree.root, &ngx_chat_dlv_sentinel);
        d = (ngx_chat_dlv_t *) node;

        ngx_chat_dlv_send(d->key, d->ulen, d->device, d->dlen,
                          d->key + d->ulen + 1, d->sn.str.len - d->ulen - 1,
                          seq, ngx_sprintf(seq, "%L", d->seq) - seq,
                          prev, ngx_sprintf(prev, "%L", d->prev) - prev);

        ngx_rbtree_delete(&ngx_chat_dlv_tree, node);
        ngx_free(d);
    }

    ngx_chat_dlv_n = 0;
}


static void
ngx_chat_dlv_add(ngx_chat_msg_ctx_t *ctx, u_char *conv, size_t clen,
    u_char *seq, size_t seqlen, u_char *prev, size_t prevlen)
{
    u_char                 key[NGX_CHAT_USER_MAX + 1 + CHAT_CONV_MAX];
    int64_t                n, p;
    uint32_t               hash;
    ngx_str_t              k;
    ngx_chat_dlv_t        *d;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

    n = ngx_atoof(seq, seqlen);
    p = ngx_atoof(prev, prevlen);

    if (cmcf->receipt_delay == 0 || clen > CHAT_CONV_MAX || n < 0 || p < 0) {
        ngx_chat_dlv_send(ctx->user, ctx->ulen, ctx->device, ctx->dlen,
                          conv, clen, seq, seqlen, prev, prevlen);
        return;
    }

    k.data = key;
    k.len = ngx_sprintf(key, "%*s %*s", (size_t) ctx->ulen, ctx->user, clen,
                        conv) - key;
    hash = ngx_crc32_short(k.data, k.len);

    d = (ngx_chat_dlv_t *) ngx_str_rbtree_lookup(&ngx_chat_dlv_tree, &k, hash);

    if (d) {
        if (n > d->seq) {
            d->seq = n;
        }

        if (p < d->prev) {
            d->prev = p;
        }

        d->dlen = ctx->dlen;
        ngx_memcpy(d->device, ctx->device, ctx->dlen);
        return;
    }

    d = ngx_alloc(sizeof(ngx_chat_dlv_t), ngx_cycle->log);
    if (d == NULL) {
        ngx_chat_dlv_send(ctx->user, ctx->ulen, ctx->device, ctx->dlen,
                          conv, clen, seq, seqlen, prev, prevlen);
        return;
    }

    ngx_memcpy(d->key, key, k.len);
    d->sn.str.data = d->key;
    d->sn.str.len = k.len;
    d->sn.node.key = hash;
    d->ulen = ctx->ulen;
    d->dlen = ctx->dlen;
    ngx_memcpy(d->device, ctx->device, ctx->dlen);
    d->seq = n;
    d->prev = p;

    ngx_rbtree_insert(&ngx_chat_dlv_tree, &d->sn.node);

    if (++ngx_chat_dlv_n >= NGX_CHAT_DLV_MAX) {
        ngx_chat_dlv_flush(&ngx_chat_dlv_ev);
        return;
    }

    if (!ngx_chat_dlv_ev.timer_set) {
        ngx_add_timer(&ngx_chat_dlv_ev, cmcf->receipt_delay);
    }
}


static void
ngx_chat_msg_acked(void *rp, void *data)
{
    size_t               i;
    redisReply          *reply = rp, *c, *q, *pv;
    ngx_chat_msg_ctx_t  *ctx = data;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    /* {conv, seq, prev, ...}: a delivered receipt for each */
    for (i = 0; i + 2 < reply->elements; i += 3) {
        c = reply->element[i];
        q = reply->element[i + 1];
        pv = reply->element[i + 2];

        if (c->type == REDIS_REPLY_STRING && q->type == REDIS_REPLY_STRING
            && pv->type == REDIS_REPLY_STRING)
        {
            ngx_chat_dlv_add(ctx, (u_char *) c->str, c->len,
                             (u_char *) q->str, q->len,
                             (u_char *) pv->str, pv->len);
        }
    }

    ngx_chat_msg_done(ctx, NGX_HTTP_NO_CONTENT, NULL, 0);
}


static void
ngx_chat_msg_ack(ngx_chat_msg_ctx_t *ctx, int64_t cursor)
{
    u_char        acked[96], inbox[96], dlv[96], cur[96], n[NGX_INT64_LEN];
    const char   *argv[7];
    size_t        argl[7];

    argv[0] = (char *) acked;
    argl[0] = ngx_sprintf(acked, "chat:{u:%*s}:acked", (size_t) ctx->ulen,
                          ctx->user) - acked;
    argv[1] = (char *) inbox;
    argl[1] = ngx_sprintf(inbox, "chat:{u:%*s}:inbox", (size_t) ctx->ulen,
                          ctx->user) - inbox;
    argv[2] = (char *) dlv;
    argl[2] = ngx_sprintf(dlv, "chat:{u:%*s}:dlv", (size_t) ctx->ulen,
                          ctx->user) - dlv;
    argv[3] = (char *) cur;
    argl[3] = ngx_sprintf(cur, "chat:{u:%*s}:cur", (size_t) ctx->ulen,
                          ctx->user) - cur;
    argv[4] = (char *) ctx->device;
    argl[4] = ctx->dlen;
    argv[5] = (char *) n;
    argl[5] = ngx_sprintf(n, "%L", cursor) - n;
    argv[6] = (char *) ctx->user;
    argl[6] = ctx->ulen;

    if (ngx_chat_redis_script(CHAT_LUA_ACK, ngx_chat_msg_acked, ctx, 4,
                              7, argv, argl) != NGX_OK)
    {
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
    }
}


typedef struct {
    ngx_chat_msg_ctx_t  *ctx;
    size_t               clen;
    size_t               seqlen;
    int64_t              cap;          /* the conversation's last seq */
    ngx_uint_t           member;       /* group: 1 active member, 2 not,
                                          3 Redis failed, 4 the seq query
                                          was not sent */
    u_char               conv[CHAT_CONV_MAX];
    u_char               seq[NGX_INT64_LEN];
} ngx_chat_read_ctx_t;


static void
ngx_chat_msg_read_done(void *rp, void *data)
{
    redisReply           *reply = rp;
    ngx_chat_read_ctx_t  *rc = data;
    ngx_chat_msg_ctx_t   *ctx = rc->ctx;

    u_char                prev[NGX_INT64_LEN], seq[NGX_INT64_LEN];

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_INTEGER
        || reply->element[1]->type != REDIS_REPLY_INTEGER)
    {
        ngx_free(rc);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    if (reply->element[0]->integer >= 0) {
        /* the receipt names the pointer as stored: capped at the last seq */
        ngx_chat_receipt_enqueue(ctx->user, ctx->ulen, ctx->device, ctx->dlen,
                                 rc->conv, rc->clen, "read", seq,
                                 ngx_sprintf(seq, "%L",
                                             reply->element[1]->integer)
                                 - seq, prev,
                                 ngx_sprintf(prev, "%L",
                                             reply->element[0]->integer)
                                 - prev);
    }

    ngx_free(rc);
    ngx_chat_msg_done(ctx, NGX_HTTP_NO_CONTENT, NULL, 0);
}


static void ngx_chat_msg_read_pointer(ngx_chat_read_ctx_t *rc);


/* A read in a group: the reader must be an active member (first reply of
 * the pipeline; the group's last seq is the second, as for a direct
 * conversation). */
static void
ngx_chat_msg_read_member(void *rp, void *data)
{
    redisReply           *reply = rp;
    ngx_chat_msg_ctx_t   *ctx;
    ngx_chat_read_ctx_t  *rc = data;

    if (rc->member == 4) {
        /* the second command could not be queued: answer here */
        ctx = rc->ctx;
        ngx_free(rc);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    if (reply == NULL
        || (reply->type != REDIS_REPLY_STRING && reply->type != REDIS_REPLY_NIL))
    {
        rc->member = 3;

    } else if (reply->type == REDIS_REPLY_NIL
               || ngx_strlchr((u_char *) reply->str, (u_char *) reply->str
                              + reply->len, ':'))
    {
        rc->member = 2;

    } else {
        rc->member = 1;
    }
}


static void
ngx_chat_msg_read_group_seq(void *rp, void *data)
{
    int64_t               n;
    redisReply           *reply = rp;
    ngx_chat_read_ctx_t  *rc = data;
    ngx_chat_msg_ctx_t   *ctx = rc->ctx;

    if (rc->member == 2) {
        ngx_free(rc);
        ngx_chat_msg_fail(ctx, "forbidden", "not a member of the group", 0);
        return;
    }

    n = 0;
    if (reply && reply->type == REDIS_REPLY_STRING) {
        n = ngx_atoof((u_char *) reply->str, reply->len);
    }

    if (rc->member != 1 || reply == NULL
        || (reply->type != REDIS_REPLY_STRING && reply->type != REDIS_REPLY_NIL)
        || n < 0)
    {
        ngx_free(rc);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    rc->cap = n;
    ngx_chat_msg_read_pointer(rc);
}


static void
ngx_chat_msg_read(ngx_chat_msg_ctx_t *ctx, chat_proto_frame_t *f)
{
    u_char                 key[NGX_CHAT_GROUP_KEY_LEN], seqk[32];
    ngx_uint_t             shard;
    chat_conv_t            cv;
    ngx_chat_read_ctx_t   *rc;
    ngx_chat_main_conf_t  *cmcf;

    if (chat_conv_parse(f->conv, f->conv_len, &cv) != 0
        || (cv.kind == 'd' && !ngx_chat_participant(ctx->user, ctx->ulen, &cv)))
    {
        ngx_chat_msg_fail(ctx, "forbidden", "not a participant", 0);
        return;
    }

    rc = ngx_alloc(sizeof(ngx_chat_read_ctx_t), ngx_cycle->log);
    if (rc == NULL) {
        ngx_chat_msg_fail(ctx, "unavailable", "out of memory", 0);
        return;
    }

    rc->ctx = ctx;
    rc->clen = f->conv_len;
    rc->cap = -1;
    rc->member = 0;
    ngx_memcpy(rc->conv, f->conv, f->conv_len);
    rc->seqlen = ngx_sprintf(rc->seq, "%L", f->seq) - rc->seq;

    cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);
    shard = ngx_chat_shard(cmcf, rc->conv, rc->clen);

    if (cv.kind == 'd') {
        /* the conversation's last seq, from its shard: the cap */
        rc->member = 1;

        if (ngx_chat_redis_command(ngx_chat_msg_read_group_seq, rc,
                                   "HGET %b %b", seqk,
                                   (size_t) (ngx_sprintf(seqk,
                                                 "chat:{s%ui}:seq", shard)
                                             - seqk),
                                   rc->conv, rc->clen)
            != NGX_OK)
        {
            ngx_free(rc);
            ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        }

        return;
    }

    /* membership and the group's last seq, pipelined on its shard */
    if (ngx_chat_redis_command(ngx_chat_msg_read_member, rc, "HGET %b %b", key,
                               ngx_chat_group_key(key, shard, (u_char *) cv.a,
                                                  cv.alen, "mem"),
                               ctx->user, (size_t) ctx->ulen)
        != NGX_OK)
    {
        ngx_free(rc);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
        return;
    }

    if (ngx_chat_redis_command(ngx_chat_msg_read_group_seq, rc, "HGET %b %b",
                               seqk, (size_t) (ngx_sprintf(seqk,
                                                  "chat:{s%ui}:seq", shard)
                                               - seqk),
                               rc->conv, rc->clen)
        != NGX_OK)
    {
        /* the first callback answers */
        rc->member = 4;
    }
}


static void
ngx_chat_msg_read_pointer(ngx_chat_read_ctx_t *rc)
{
    u_char               key[96], cap[NGX_INT64_LEN];
    const char          *argv[4];
    size_t               argl[4];
    ngx_chat_msg_ctx_t  *ctx = rc->ctx;

    argv[0] = (char *) key;
    argl[0] = ngx_sprintf(key, "chat:{u:%*s}:read", (size_t) ctx->ulen,
                          ctx->user) - key;
    argv[1] = (char *) rc->conv;
    argl[1] = rc->clen;
    argv[2] = (char *) rc->seq;
    argl[2] = rc->seqlen;
    argv[3] = (char *) cap;
    argl[3] = ngx_sprintf(cap, "%L", rc->cap) - cap;

    if (ngx_chat_redis_script(CHAT_LUA_READ, ngx_chat_msg_read_done, rc, 1, 4,
                              argv, argl)
        != NGX_OK)
    {
        ngx_free(rc);
        ngx_chat_msg_fail(ctx, "unavailable", "try again later", 0);
    }
}


static void
ngx_chat_msg_dispatch(ngx_chat_msg_ctx_t *ctx, chat_proto_frame_t *f)
{
    int64_t  wait;

    switch (f->type) {

    case CHAT_PROTO_SEND:
        ngx_chat_msg_send(ctx, f);
        return;

    case CHAT_PROTO_ACK:
        /* an ack applied at once costs a script: it has a budget (the
         * coalesced WebSocket acks cost one per chat_ack_delay) */
        wait = ngx_chat_limit(ctx->conf, NGX_CHAT_ACT_ACK, ctx->user,
                              ctx->ulen, 1);
        if (wait) {
            ngx_chat_msg_fail(ctx, "rate_limited", "too many acks", wait);
            return;
        }

        ngx_chat_msg_ack(ctx, f->cursor);
        return;

    default: /* CHAT_PROTO_READ */
        wait = ngx_chat_limit(ctx->conf, NGX_CHAT_ACT_READ, ctx->user,
                              ctx->ulen, 1);
        if (wait) {
            ngx_chat_msg_fail(ctx, "rate_limited", "too many reads", wait);
            return;
        }

        ngx_chat_msg_read(ctx, f);
        return;
    }
}


/*
 * Acks of a WebSocket session, coalesced: the session's cursor moves at
 * once (replay and delivery use it), the ack script (inbox trim, delivered
 * pointer, receipts) runs for the newest cursor once per chat_ack_delay,
 * and when the session closes. A device that acknowledges every message of
 * a busy conversation by itself would otherwise cost one script per
 * message per member.
 */
static ngx_uint_t         ngx_chat_acks_pending;
static ngx_event_t        ngx_chat_ack_ev;
static ngx_connection_t   ngx_chat_ack_conn;


/* Runs the session's pending ack script; returns 0 when none was pending. */
static ngx_uint_t
ngx_chat_ack_run(ngx_chat_session_t *s)
{
    ngx_chat_msg_ctx_t  *ctx;

    if (!s->ack_pending) {
        return 0;
    }

    s->ack_pending = 0;
    ngx_chat_acks_pending--;

    ctx = ngx_chat_msg_ctx(s, NULL, s->user->id, s->user->len, s->device,
                           s->dev_len, NULL);
    if (ctx != NULL) {
        ngx_chat_msg_ack(ctx, (int64_t) s->cursor);
    }

    return 1;
}


/*
 * The client sent another frame, or the session closes: its pending ack is
 * applied and written to Redis now, not when this event-loop turn ends, so
 * it is in Redis before that frame's answer reaches the client ("ack, ping,
 * pong"), whichever worker the client reconnects through. Event handlers
 * only, never from a hiredis callback.
 */
void
ngx_chat_msg_ack_flush(ngx_chat_session_t *s)
{
    if (ngx_chat_ack_run(s)) {
        ngx_chat_redis_flush();
    }
}


static void
ngx_chat_ack_timer(ngx_event_t *ev)
{
    ngx_queue_t         *q, *next;
    ngx_chat_session_t  *s;

    for (q = ngx_queue_head(&ngx_chat_sessions);
         q != ngx_queue_sentinel(&ngx_chat_sessions) && ngx_chat_acks_pending;
         q = next)
    {
        next = ngx_queue_next(q);
        s = ngx_queue_data(q, ngx_chat_session_t, all_link);
        (void) ngx_chat_ack_run(s);   /* written out in one go by the event loop */
    }
}


/* send, ack, read from a WebSocket session */
void
ngx_chat_msg_frame(ngx_chat_session_t *s, chat_proto_frame_t *f)
{
    ngx_chat_msg_ctx_t    *ctx;
    ngx_chat_main_conf_t  *cmcf;

    if (f->type == CHAT_PROTO_ACK && ngx_chat_tp(s)->coalesce_acks) {
        cmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);

        if (cmcf->ack_delay) {
            if ((uint64_t) f->cursor > s->cursor) {
                s->cursor = (uint64_t) f->cursor;

                if (!s->ack_pending) {
                    s->ack_pending = 1;
                    ngx_chat_acks_pending++;

                    if (!ngx_chat_ack_ev.timer_set) {
                        ngx_add_timer(&ngx_chat_ack_ev, cmcf->ack_delay);
                    }
                }
            }

            return;
        }
    }

    ctx = ngx_chat_msg_ctx(s, NULL, s->user->id, s->user->len, s->device,
                           s->dev_len,
                           f->type == CHAT_PROTO_SEND ? &f->client_id : NULL);
    if (ctx == NULL) {
        ngx_chat_session_error(s, "unavailable", "out of memory", NULL);
        return;
    }

    if (f->type == CHAT_PROTO_ACK && (uint64_t) f->cursor > s->cursor) {
        s->cursor = (uint64_t) f->cursor;
    }

    ngx_chat_msg_dispatch(ctx, f);
}


/* send, ack, read from an HTTP request: the request is answered later */
ngx_int_t
ngx_chat_msg_http(ngx_http_request_t *r, ngx_chat_identity_t *id,
    chat_proto_frame_t *f)
{
    ngx_chat_msg_ctx_t  *ctx;

    ctx = ngx_chat_msg_ctx(NULL, r, id->user, id->user_len, id->device,
                           id->dev_len,
                           f->type == CHAT_PROTO_SEND ? &f->client_id : NULL);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_chat_msg_dispatch(ctx, f);

    return NGX_DONE;
}


/* --- inbox replay --------------------------------------------------------------------- */

static void ngx_chat_replay_page(ngx_chat_session_t *s);


static void
ngx_chat_replay_reply(void *rp, void *data)
{
    size_t               i, n;
    uint64_t             cursor;
    redisReply          *reply = rp, *m, *sc;
    ngx_chat_session_t  *s = data;
    ngx_chat_shbuf_t    *b;
    u_char               prefix[40], *body, *dev, *q;
    size_t               plen, blen;

    s->refs--;

    if (s->closed) {
        ngx_chat_session_release(s);
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        /* the inbox cannot be read: the device must come back later */
        s->replaying = 0;
        ngx_chat_session_error(s, "unavailable", "inbox unavailable", NULL);
        if (ngx_chat_tp(s)->close) {
            ngx_chat_tp(s)->close(s, 1013, "try again later");
        }
        return;
    }

    n = reply->elements / 2;

    for (i = 0; i < n; i++) {
        m = reply->element[2 * i];
        sc = reply->element[2 * i + 1];

        if (m->type != REDIS_REPLY_STRING || sc->type != REDIS_REPLY_STRING
            || m->len < 2 || m->str[0] != '{')
        {
            continue;
        }

        cursor = (uint64_t) ngx_atoof((u_char *) sc->str, sc->len);
        if (cursor == (uint64_t) NGX_ERROR || cursor <= s->sent_cursor) {
            continue;
        }

        /* {"!":"<device>",...}: the sender's own copy, not for that device */
        body = (u_char *) m->str + 1;
        blen = m->len - 1;

        if (blen > 6 && ngx_strncmp(body, "\"!\":\"", 5) == 0) {
            dev = body + 5;
            q = ngx_strlchr(dev, body + blen, '"');
            if (q == NULL || q + 2 > body + blen || q[1] != ',') {
                continue;
            }

            if ((size_t) (q - dev) == s->dev_len
                && ngx_strncmp(dev, s->device, s->dev_len) == 0)
            {
                s->sent_cursor = cursor;
                continue;
            }

            blen -= q + 2 - body;
            body = q + 2;
        }

        b = ngx_chat_shbuf_alloc(blen);
        if (b == NULL) {
            break;
        }

        ngx_memcpy(b->data, body, blen);
        plen = ngx_sprintf(prefix, "{\"cursor\":%uL,", cursor) - prefix;
        s->sent_cursor = cursor;

        (void) ngx_chat_session_send_shared(s, b, prefix, plen, cursor);
        ngx_chat_shbuf_release(b);

        if (s->closed || s->closing) {
            return;
        }
    }

    if (ngx_chat_tp(s)->one_page) {
        if (s->missed && s->out_head == NULL) {
            /* an event came live while this page was read, after it: the
             * poll would hold without it (its publish is gone) until the
             * timeout; read again (a page that had events answers now, and
             * the next poll starts below the missed one) */
            s->missed = 0;
            ngx_chat_replay_page(s);
            return;
        }

        /* one page per poll; what is left comes with the next poll */
        s->replaying = 0;
        ngx_chat_tp(s)->replayed(s);
        return;
    }

    if (n == ngx_chat_tp(s)->replay_page || s->missed) {
        s->missed = 0;

        if (s->out_count > s->conf->out_frames / 2) {
            s->replay_wait = 1;      /* resumed when the queue drains */
            return;
        }

        ngx_chat_replay_page(s);
        return;
    }

    s->replaying = 0;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, &s->log, 0,
                   "chat: session %uL live at cursor %uL", s->id,
                   s->sent_cursor);
}


static void
ngx_chat_replay_page(ngx_chat_session_t *s)
{
    u_char  key[96], from[NGX_INT64_LEN + 1];
    size_t  klen, flen, page;

    klen = ngx_sprintf(key, "chat:{u:%*s}:inbox", (size_t) s->user->len,
                       s->user->id) - key;
    flen = ngx_sprintf(from, "(%uL", s->sent_cursor) - from;

    page = ngx_chat_tp(s)->replay_page;

    if (ngx_chat_redis_command(ngx_chat_replay_reply, s,
                               "ZRANGEBYSCORE %b %b +inf WITHSCORES LIMIT 0 %d",
                               key, klen, from, flen, (int) page) != NGX_OK)
    {
        s->replaying = 0;
        ngx_chat_session_error(s, "unavailable", "inbox unavailable", NULL);
        if (ngx_chat_tp(s)->close) {
            ngx_chat_tp(s)->close(s, 1013, "try again later");
        }
        return;
    }

    s->refs++;
}


/* Replay every retained event after s->sent_cursor, then go live: events
 * published meanwhile are dropped and fetched by one more round. */
void
ngx_chat_replay_start(ngx_chat_session_t *s)
{
    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, &s->log, 0,
                   "chat: session %uL replays after cursor %uL", s->id,
                   s->sent_cursor);

    s->replaying = 1;
    s->missed = 0;
    ngx_chat_replay_page(s);
}


void
ngx_chat_replay_resume(ngx_chat_session_t *s)
{
    if (s->replay_wait && !s->closed && !s->closing) {
        s->replay_wait = 0;
        ngx_chat_replay_page(s);
    }
}


ngx_int_t
ngx_chat_msg_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_chat_module);

    ngx_chat_id_node = ((cmcf->node_id << 5) | (ngx_worker & 0x1f)) & 0x3ff;

    ngx_rbtree_init(&ngx_chat_dlv_tree, &ngx_chat_dlv_sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_chat_dlv_conn.fd = (ngx_socket_t) -1;
    ngx_chat_dlv_ev.data = &ngx_chat_dlv_conn;
    ngx_chat_dlv_ev.handler = ngx_chat_dlv_flush;
    ngx_chat_dlv_ev.log = cycle->log;
    ngx_chat_dlv_ev.cancelable = 0;     /* a graceful exit flushes first */

    ngx_chat_ack_conn.fd = (ngx_socket_t) -1;
    ngx_chat_ack_ev.data = &ngx_chat_ack_conn;
    ngx_chat_ack_ev.handler = ngx_chat_ack_timer;
    ngx_chat_ack_ev.log = cycle->log;
    ngx_chat_ack_ev.cancelable = 1;     /* closing sessions flush their own */

    return NGX_OK;
}
