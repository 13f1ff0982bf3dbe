/*
 * Redis inside nginx's event loop: hiredis' async API on an adapter that
 * wraps the hiredis socket in an ngx_connection_t and drives it with nginx
 * events (level-triggered, because hiredis reads one buffer per call).
 *
 * Per worker process two links: "cmd" for commands and scripts, "sub" for
 * pub/sub (the worker's own delivery channel and the presence channels of
 * users watched from this worker). Each link reconnects by itself with
 * exponential backoff; while a link is down, commands fail at once (callers
 * answer `unavailable`) instead of queueing without bound. A link whose
 * replies stop coming is dropped by a watchdog so that callers are answered.
 */
#include "ngx_chat.h"
#include "chat_url.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <openssl/sha.h>
#include <poll.h>


#define NGX_CHAT_REDIS_BACKOFF_MIN   100
#define NGX_CHAT_REDIS_BACKOFF_MAX   5000
#define NGX_CHAT_REDIS_STALL         5000    /* ms without a reply */
#define NGX_CHAT_REDIS_MAX_PENDING   65536   /* commands awaiting replies */


typedef struct {
    redisAsyncContext  *ac;
    ngx_connection_t   *conn;
    ngx_event_t         reconnect;
    ngx_msec_t          backoff;
    ngx_msec_t          last_reply;
    ngx_uint_t          pending;
    ngx_uint_t          loading;      /* script loads awaiting replies */
    unsigned            ready:1;
    unsigned            sub:1;
    unsigned            counted:1;    /* counted in the redis_up gauge */
} ngx_chat_redis_link_t;


typedef struct {
    ngx_chat_redis_cb   cb;
    void               *data;
} ngx_chat_redis_req_t;


static ngx_chat_redis_link_t  ngx_chat_cmd;
static ngx_chat_redis_link_t  ngx_chat_sub;
static ngx_event_t            ngx_chat_watchdog;
static ngx_connection_t       ngx_chat_watchdog_conn;

static u_char   ngx_chat_redis_host[256];
static int      ngx_chat_redis_port;
static int      ngx_chat_redis_db;
static u_char   ngx_chat_redis_pass[256];

static u_char   ngx_chat_channel_buf[128];
ngx_str_t       ngx_chat_worker_channel;


/*
 * The Redis scripts are lua/<name>.lua (each with a header naming its KEYS,
 * ARGV, result and the guarantee it implements); the build generates their
 * table chat_lua[] (lua/gen.sh). Every key a script touches carries one
 * hash tag and is passed in KEYS, so each runs on one slot of a Redis
 * Cluster. This side loads them all at connect and after NOSCRIPT.
 */
static u_char  ngx_chat_script_sha[CHAT_LUA_N][SHA_DIGEST_LENGTH * 2 + 1];


static void ngx_chat_redis_connect(ngx_chat_redis_link_t *link);
static void ngx_chat_redis_on_connect(const redisAsyncContext *ac, int status);
static void ngx_chat_redis_on_disconnect(const redisAsyncContext *ac,
    int status);
static void ngx_chat_redis_sub_cb(redisAsyncContext *ac, void *reply,
    void *data);


/*
 * What pub/sub brings is handed to the handler registered for its channel
 * (an exact name, or a prefix): the adapter knows no session or feature.
 * Handlers register at process start (ngx_chat_redis_on_channel), the
 * resubscribe callbacks run each time the pub/sub link is back.
 */
#define NGX_CHAT_REDIS_HANDLERS  8

typedef struct {
    ngx_str_t                     name;
    ngx_uint_t                    prefix;
    ngx_chat_redis_msg_handler    handler;
} ngx_chat_redis_channel_t;

static ngx_chat_redis_channel_t  ngx_chat_channels[NGX_CHAT_REDIS_HANDLERS];
static ngx_uint_t                ngx_chat_nchannels;
static void                    (*ngx_chat_resubscribe[NGX_CHAT_REDIS_HANDLERS])(void);
static ngx_uint_t                ngx_chat_nresubscribe;


static ngx_chat_redis_link_t *
ngx_chat_redis_link(const redisAsyncContext *ac)
{
    if (ngx_chat_cmd.ac == ac) {
        return &ngx_chat_cmd;
    }

    if (ngx_chat_sub.ac == ac) {
        return &ngx_chat_sub;
    }

    return NULL;
}


static void
ngx_chat_redis_set_ready(ngx_chat_redis_link_t *link, ngx_uint_t ready)
{
    if (link->ready != (ready ? 1 : 0)) {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: redis %s link %s", link->sub ? "pub/sub" : "command",
                       ready ? "ready" : "not ready");
    }

    link->ready = ready ? 1 : 0;

    if (ngx_chat_cmd.ready && ngx_chat_sub.ready) {
        if (!ngx_chat_cmd.counted) {
            ngx_chat_cmd.counted = 1;
            ngx_chat_stat_inc(redis_up);
            ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                          "chat: redis %s:%d connected, channel \"%V\"",
                          ngx_chat_redis_host, ngx_chat_redis_port,
                          &ngx_chat_worker_channel);
        }

    } else if (ngx_chat_cmd.counted) {
        ngx_chat_cmd.counted = 0;
        ngx_chat_stat_dec(redis_up);
    }
}


/* --- the adapter: hiredis asks, nginx's event loop does ----------------- */

static void
ngx_chat_redis_read_handler(ngx_event_t *ev)
{
    ngx_connection_t       *c = ev->data;
    ngx_chat_redis_link_t  *link = c->data;

    redisAsyncHandleRead(link->ac);
}


static void
ngx_chat_redis_write_handler(ngx_event_t *ev)
{
    ngx_connection_t       *c = ev->data;
    ngx_chat_redis_link_t  *link = c->data;

    redisAsyncHandleWrite(link->ac);
}


static void
ngx_chat_redis_add_read(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && !link->conn->read->active) {
        /* level-triggered: hiredis reads one buffer per call */
        (void) ngx_add_event(link->conn->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_chat_redis_del_read(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && link->conn->read->active) {
        (void) ngx_del_event(link->conn->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_chat_redis_add_write(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && !link->conn->write->active) {
        (void) ngx_add_event(link->conn->write, NGX_WRITE_EVENT, 0);
    }
}


static void
ngx_chat_redis_del_write(void *data)
{
    ngx_chat_redis_link_t  *link = data;

    if (link->conn && link->conn->write->active) {
        (void) ngx_del_event(link->conn->write, NGX_WRITE_EVENT, 0);
    }
}


static void
ngx_chat_redis_cleanup(void *data)
{
    ngx_chat_redis_link_t  *link = data;
    ngx_connection_t       *c;

    c = link->conn;
    if (c == NULL) {
        return;
    }

    link->conn = NULL;

    /* hiredis closes the socket itself right after this */
    if (c->read->active) {
        (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }

    if (c->write->active) {
        (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    c->fd = (ngx_socket_t) -1;
    ngx_free_connection(c);
}


static void
ngx_chat_redis_schedule(ngx_chat_redis_link_t *link)
{
    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    if (!link->reconnect.timer_set) {
        ngx_add_timer(&link->reconnect, link->backoff);
    }

    link->backoff = ngx_min(link->backoff * 2, NGX_CHAT_REDIS_BACKOFF_MAX);
}


static void
ngx_chat_redis_reconnect_handler(ngx_event_t *ev)
{
    ngx_chat_redis_connect(ev->data);
}


static void
ngx_chat_redis_connect(ngx_chat_redis_link_t *link)
{
    ngx_connection_t   *c;
    redisAsyncContext  *ac;

    ac = redisAsyncConnect((char *) ngx_chat_redis_host, ngx_chat_redis_port);
    if (ac == NULL) {
        ngx_chat_redis_schedule(link);
        return;
    }

    if (ac->err) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis connect to %s:%d: %s",
                      ngx_chat_redis_host, ngx_chat_redis_port, ac->errstr);
        redisAsyncFree(ac);
        ngx_chat_redis_schedule(link);
        return;
    }

    c = ngx_get_connection(ac->c.fd, ngx_cycle->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        ngx_chat_redis_schedule(link);
        return;
    }

    c->data = link;
    c->read->handler = ngx_chat_redis_read_handler;
    c->write->handler = ngx_chat_redis_write_handler;
    c->read->log = c->log;
    c->write->log = c->log;

    link->ac = ac;
    link->conn = c;
    link->pending = 0;
    link->loading = 0;
    link->last_reply = ngx_current_msec;

    ac->ev.data = link;
    ac->ev.addRead = ngx_chat_redis_add_read;
    ac->ev.delRead = ngx_chat_redis_del_read;
    ac->ev.addWrite = ngx_chat_redis_add_write;
    ac->ev.delWrite = ngx_chat_redis_del_write;
    ac->ev.cleanup = ngx_chat_redis_cleanup;

    redisAsyncSetConnectCallback(ac, ngx_chat_redis_on_connect);
    redisAsyncSetDisconnectCallback(ac, ngx_chat_redis_on_disconnect);

    /* the connect completes when the socket becomes writable */
    ngx_chat_redis_add_write(link);
}


static void
ngx_chat_redis_prelude(ngx_chat_redis_link_t *link)
{
    if (ngx_chat_redis_pass[0]) {
        redisAsyncCommand(link->ac, NULL, NULL, "AUTH %s",
                          ngx_chat_redis_pass);
    }

    if (ngx_chat_redis_db && !link->sub) {
        redisAsyncCommand(link->ac, NULL, NULL, "SELECT %d",
                          ngx_chat_redis_db);
    }
}


static void
ngx_chat_redis_script_loaded(redisAsyncContext *ac, void *r, void *data)
{
    redisReply  *reply = r;

    ngx_chat_cmd.last_reply = ngx_current_msec;

    if (reply == NULL) {
        return;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "chat: redis SCRIPT LOAD failed: %s", reply->str);
        redisAsyncDisconnect(ac);
        return;
    }

    if (--ngx_chat_cmd.loading == 0) {
        ngx_chat_redis_set_ready(&ngx_chat_cmd, 1);
    }
}


static void
ngx_chat_redis_load_scripts(void)
{
    ngx_uint_t  i;

    ngx_chat_cmd.loading = CHAT_LUA_N;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat: redis loading %d scripts", (int) CHAT_LUA_N);

    for (i = 0; i < CHAT_LUA_N; i++) {
        redisAsyncCommand(ngx_chat_cmd.ac, ngx_chat_redis_script_loaded, NULL,
                          "SCRIPT LOAD %s", chat_lua[i].src);
    }
}


static void
ngx_chat_redis_on_connect(const redisAsyncContext *ac, int status)
{
    ngx_uint_t              i;
    ngx_chat_redis_link_t  *link;

    link = ngx_chat_redis_link(ac);
    if (link == NULL) {
        return;
    }

    if (status != REDIS_OK) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis connect to %s:%d failed: %s",
                      ngx_chat_redis_host, ngx_chat_redis_port, ac->errstr);
        /* hiredis frees the context after this callback */
        link->ac = NULL;
        ngx_chat_redis_schedule(link);
        return;
    }

    link->backoff = NGX_CHAT_REDIS_BACKOFF_MIN;
    link->last_reply = ngx_current_msec;

    ngx_chat_redis_prelude(link);

    if (link->sub) {
        redisAsyncCommand(link->ac, ngx_chat_redis_sub_cb, NULL,
                          "SUBSCRIBE %b", ngx_chat_worker_channel.data,
                          ngx_chat_worker_channel.len);
        /* every worker process: group typing, one publish for all members */
        redisAsyncCommand(link->ac, ngx_chat_redis_sub_cb, NULL,
                          "SUBSCRIBE " NGX_CHAT_BROADCAST_CHANNEL);

        for (i = 0; i < ngx_chat_nresubscribe; i++) {
            ngx_chat_resubscribe[i]();
        }

    } else {
        ngx_chat_redis_load_scripts();
    }
}


static void
ngx_chat_redis_on_disconnect(const redisAsyncContext *ac, int status)
{
    ngx_chat_redis_link_t  *link;

    link = ngx_chat_redis_link(ac);
    if (link == NULL) {
        return;
    }

    link->ac = NULL;
    link->pending = 0;
    ngx_chat_redis_set_ready(link, 0);

    if (status != REDIS_OK) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis %s link lost: %s",
                      link->sub ? "pub/sub" : "command",
                      ac->errstr[0] ? ac->errstr : "closed");
    }

    link->backoff = NGX_CHAT_REDIS_BACKOFF_MIN;
    ngx_chat_redis_schedule(link);
}


/* --- pub/sub ------------------------------------------------------------ */

static void
ngx_chat_redis_sub_cb(redisAsyncContext *ac, void *r, void *data)
{
    ngx_uint_t                 i;
    redisReply                *reply = r, *kind, *ch, *payload;
    ngx_chat_redis_channel_t  *c;

    ngx_chat_sub.last_reply = ngx_current_msec;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements < 3)
    {
        return;
    }

    kind = reply->element[0];
    ch = reply->element[1];
    payload = reply->element[2];

    if (kind->type != REDIS_REPLY_STRING) {
        return;
    }

    if (kind->len == 9 && ngx_strncmp(kind->str, "subscribe", 9) == 0) {
        if (ch->type == REDIS_REPLY_STRING
            && (size_t) ch->len == ngx_chat_worker_channel.len
            && ngx_strncmp(ch->str, ngx_chat_worker_channel.data,
                           ch->len) == 0)
        {
            ngx_chat_redis_set_ready(&ngx_chat_sub, 1);
        }
        return;
    }

    if (kind->len != 7 || ngx_strncmp(kind->str, "message", 7) != 0
        || ch->type != REDIS_REPLY_STRING
        || payload->type != REDIS_REPLY_STRING)
    {
        return;
    }

    for (i = 0; i < ngx_chat_nchannels; i++) {
        c = &ngx_chat_channels[i];

        if (c->prefix ? ((size_t) ch->len > c->name.len
                         && ngx_strncmp(ch->str, c->name.data, c->name.len) == 0)
                      : ((size_t) ch->len == c->name.len
                         && ngx_strncmp(ch->str, c->name.data, c->name.len)
                            == 0))
        {
            c->handler((u_char *) payload->str, payload->len);
            return;
        }
    }
}


/* Messages on channel (or every channel starting with it) go to handler. */
ngx_int_t
ngx_chat_redis_on_channel(ngx_str_t *name, ngx_uint_t prefix,
    ngx_chat_redis_msg_handler handler)
{
    if (ngx_chat_nchannels == NGX_CHAT_REDIS_HANDLERS) {
        return NGX_ERROR;
    }

    ngx_chat_channels[ngx_chat_nchannels].name = *name;
    ngx_chat_channels[ngx_chat_nchannels].prefix = prefix;
    ngx_chat_channels[ngx_chat_nchannels].handler = handler;
    ngx_chat_nchannels++;

    return NGX_OK;
}


/* cb subscribes again what its owner needs, each time pub/sub is back. */
ngx_int_t
ngx_chat_redis_on_resubscribe(void (*cb)(void))
{
    if (ngx_chat_nresubscribe == NGX_CHAT_REDIS_HANDLERS) {
        return NGX_ERROR;
    }

    ngx_chat_resubscribe[ngx_chat_nresubscribe++] = cb;

    return NGX_OK;
}


ngx_int_t
ngx_chat_redis_subscribe(ngx_str_t *channel, ngx_uint_t on)
{
    if (ngx_chat_sub.ac == NULL) {
        return NGX_ERROR;     /* resubscribed on reconnect */
    }

    if (redisAsyncCommand(ngx_chat_sub.ac, ngx_chat_redis_sub_cb, NULL,
                          on ? "SUBSCRIBE %b" : "UNSUBSCRIBE %b",
                          channel->data, channel->len) != REDIS_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* --- commands ------------------------------------------------------------ */

ngx_int_t
ngx_chat_redis_ready(void)
{
    return ngx_chat_cmd.ready && ngx_chat_sub.ready
           && ngx_chat_cmd.pending < NGX_CHAT_REDIS_MAX_PENDING;
}


static void
ngx_chat_redis_reply(redisAsyncContext *ac, void *r, void *data)
{
    ngx_chat_redis_req_t  *req = data;
    redisReply            *reply = r;

    if (ngx_chat_cmd.ac == ac && ngx_chat_cmd.pending) {
        ngx_chat_cmd.pending--;
        ngx_chat_cmd.last_reply = ngx_current_msec;
    }

    if (reply && reply->type == REDIS_REPLY_ERROR
        && ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0)
    {
        /* the scripts were flushed: load them again */
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis lost the scripts, loading them again");
        ngx_chat_redis_set_ready(&ngx_chat_cmd, 0);
        ngx_chat_redis_load_scripts();
    }

    if (req->cb) {
        req->cb(reply, req->data);
    }

    ngx_free(req);
}


static ngx_chat_redis_req_t *
ngx_chat_redis_req(ngx_chat_redis_cb cb, void *data)
{
    ngx_chat_redis_req_t  *req;

    if (!ngx_chat_redis_ready()) {
        return NULL;
    }

    req = ngx_alloc(sizeof(ngx_chat_redis_req_t), ngx_cycle->log);
    if (req == NULL) {
        return NULL;
    }

    req->cb = cb;
    req->data = data;

    return req;
}


ngx_int_t
ngx_chat_redis_command(ngx_chat_redis_cb cb, void *data, const char *fmt, ...)
{
    int                    rc;
    va_list                ap;
    ngx_chat_redis_req_t  *req;

    req = ngx_chat_redis_req(cb, data);
    if (req == NULL) {
        return NGX_ERROR;
    }

    va_start(ap, fmt);
    rc = redisvAsyncCommand(ngx_chat_cmd.ac, ngx_chat_redis_reply, req, fmt,
                            ap);
    va_end(ap);

    if (rc != REDIS_OK) {
        ngx_free(req);
        return NGX_ERROR;
    }

    ngx_chat_cmd.pending++;

    return NGX_OK;
}


ngx_int_t
ngx_chat_redis_commandv(ngx_chat_redis_cb cb, void *data, int argc,
    const char **argv, const size_t *argvlen)
{
    ngx_chat_redis_req_t  *req;

    req = ngx_chat_redis_req(cb, data);
    if (req == NULL) {
        return NGX_ERROR;
    }

    if (redisAsyncCommandArgv(ngx_chat_cmd.ac, ngx_chat_redis_reply, req, argc,
                              argv, argvlen) != REDIS_OK)
    {
        ngx_free(req);
        return NGX_ERROR;
    }

    ngx_chat_cmd.pending++;

    return NGX_OK;
}


/* EVALSHA <sha> <nkeys> argv... */
ngx_int_t
ngx_chat_redis_script(ngx_uint_t script, ngx_chat_redis_cb cb, void *data,
    int nkeys, int argc, const char **argv, const size_t *argvlen)
{
    u_char       nk[NGX_INT_T_LEN];
    const char  *av[20];
    size_t       al[20];
    int          i;

    if (argc > 17) {
        return NGX_ERROR;
    }

    av[0] = "EVALSHA";
    al[0] = 7;
    av[1] = (const char *) ngx_chat_script_sha[script];
    al[1] = SHA_DIGEST_LENGTH * 2;
    av[2] = (const char *) nk;
    al[2] = ngx_sprintf(nk, "%d", nkeys) - nk;

    for (i = 0; i < argc; i++) {
        av[3 + i] = argv[i];
        al[3 + i] = argvlen[i];
    }

    return ngx_chat_redis_commandv(cb, data, argc + 3, av, al);
}


/* Write what is queued for Redis now, not when this event-loop turn ends
 * (a link is ready only while it has a context). */
void
ngx_chat_redis_flush(void)
{
    if (ngx_chat_cmd.ready) {
        redisAsyncHandleWrite(ngx_chat_cmd.ac);
    }
}


/* --- watchdog: a link whose replies stopped is dropped -------------------- */

static void
ngx_chat_redis_watchdog_handler(ngx_event_t *ev)
{
    if (ngx_chat_cmd.ac && ngx_chat_cmd.pending
        && ngx_current_msec - ngx_chat_cmd.last_reply > NGX_CHAT_REDIS_STALL)
    {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: redis stopped answering (%ui pending), "
                      "reconnecting", ngx_chat_cmd.pending);
        redisAsyncDisconnect(ngx_chat_cmd.ac);
    }

    if (!ngx_exiting) {
        ngx_add_timer(ev, 1000);
    }
}


/* --- process hooks -------------------------------------------------------- */

/* chat_redis: the workers' parser too (libchat/chat_url.c) */
static ngx_int_t
ngx_chat_redis_parse_url(ngx_str_t *url)
{
    chat_redis_url_t  u;

    if (chat_redis_url_parse((const char *) url->data, url->len, &u) != 0) {
        return NGX_ERROR;
    }

    ngx_cpystrn(ngx_chat_redis_host, (u_char *) u.host,
                sizeof(ngx_chat_redis_host));
    ngx_cpystrn(ngx_chat_redis_pass, (u_char *) u.password,
                sizeof(ngx_chat_redis_pass));
    ngx_chat_redis_port = u.port;
    ngx_chat_redis_db = u.db;

    return NGX_OK;
}


ngx_int_t
ngx_chat_redis_check_url(ngx_str_t *url)
{
    return ngx_chat_redis_parse_url(url);
}


ngx_int_t
ngx_chat_redis_init_process(ngx_cycle_t *cycle)
{
    u_char                *p;
    ngx_uint_t             i;
    unsigned char          md[SHA_DIGEST_LENGTH];
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_chat_module);

    if (ngx_chat_redis_parse_url(&cmcf->redis_url) != NGX_OK) {
        return NGX_ERROR;
    }

    for (i = 0; i < CHAT_LUA_N; i++) {
        SHA1((const unsigned char *) chat_lua[i].src,
             ngx_strlen(chat_lua[i].src), md);
        ngx_hex_dump(ngx_chat_script_sha[i], md, SHA_DIGEST_LENGTH);
        ngx_chat_script_sha[i][SHA_DIGEST_LENGTH * 2] = '\0';
    }

    /* chat:w:<host>:<pid>: this worker's delivery channel */
    p = ngx_snprintf(ngx_chat_channel_buf, sizeof(ngx_chat_channel_buf) - 1,
                     "chat:w:%V:%P", &cycle->hostname, ngx_pid);
    ngx_chat_worker_channel.data = ngx_chat_channel_buf;
    ngx_chat_worker_channel.len = p - ngx_chat_channel_buf;

    ngx_chat_cmd.sub = 0;
    ngx_chat_sub.sub = 1;

    for (i = 0; i < 2; i++) {
        ngx_chat_redis_link_t  *link = i ? &ngx_chat_sub : &ngx_chat_cmd;

        link->backoff = NGX_CHAT_REDIS_BACKOFF_MIN;
        link->reconnect.handler = ngx_chat_redis_reconnect_handler;
        link->reconnect.data = link;
        link->reconnect.log = cycle->log;
        link->reconnect.cancelable = 1;

        ngx_chat_redis_connect(link);
    }

    ngx_chat_watchdog_conn.fd = (ngx_socket_t) -1;
    ngx_chat_watchdog.handler = ngx_chat_redis_watchdog_handler;
    ngx_chat_watchdog.data = &ngx_chat_watchdog_conn;
    ngx_chat_watchdog.log = cycle->log;
    ngx_chat_watchdog.cancelable = 1;
    ngx_add_timer(&ngx_chat_watchdog, 1000);

    return NGX_OK;
}


void
ngx_chat_redis_exit_process(ngx_cycle_t *cycle)
{
    int                 done, i;
    struct pollfd       pfd;
    redisAsyncContext  *ac;

    /*
     * The worker is exiting: what the closing sessions queued (their
     * registry removals) is written out before the link goes, waiting at
     * most half a second. Replies are not awaited.
     */
    if (ngx_chat_cmd.ac) {
        done = 0;

        for (i = 0; i < 50 && !done; i++) {
            if (redisBufferWrite(&ngx_chat_cmd.ac->c, &done) == REDIS_ERR) {
                break;
            }

            if (!done) {
                pfd.fd = ngx_chat_cmd.ac->c.fd;
                pfd.events = POLLOUT;
                pfd.revents = 0;
                (void) poll(&pfd, 1, 10);
            }
        }
    }

    /*
     * Freeing a context calls the callbacks of its pending commands with no
     * reply; a callback that reacts by sending (a session closing on the
     * failure sends its unregister) must find the links not ready, not
     * reach for a context that is being freed.
     */
    ngx_chat_cmd.ready = 0;
    ngx_chat_sub.ready = 0;

    if (ngx_chat_sub.ac) {
        ac = ngx_chat_sub.ac;
        ngx_chat_sub.ac = NULL;
        redisAsyncFree(ac);
    }

    if (ngx_chat_cmd.ac) {
        ac = ngx_chat_cmd.ac;
        ngx_chat_cmd.ac = NULL;
        redisAsyncFree(ac);
    }

    if (ngx_chat_cmd.counted) {
        ngx_chat_cmd.counted = 0;
        ngx_chat_stat_dec(redis_up);
    }
}
