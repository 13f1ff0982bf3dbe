/* Synchronous Redis connections for the workers (hiredis). */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <string.h>

redisContext *
cw_redis_connect(const char *url, int timeout_ms, char *err, size_t errlen)
{
    char            host[256], pw[256];
    int             port, db;
    struct timeval  tv = { timeout_ms / 1000, (timeout_ms % 1000) * 1000 };
    redisContext   *c;
    redisReply     *r;

    if (cw_parse_redis_url(url, host, sizeof(host), &port, &db, pw, sizeof(pw)) != 0) {
        snprintf(err, errlen, "bad redis url \"%s\"", url);
        return NULL;
    }
    c = redisConnectWithTimeout(host, port, tv);
    if (c == NULL || c->err) {
        snprintf(err, errlen, "connect %s:%d: %s", host, port, c ? c->errstr : "out of memory");
        if (c) redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    if (pw[0]) {
        r = redisCommand(c, "AUTH %s", pw);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "AUTH failed: %s", r ? r->str : c->errstr);
            if (r) freeReplyObject(r);
            redisFree(c);
            return NULL;
        }
        freeReplyObject(r);
    }
    if (db) {
        r = redisCommand(c, "SELECT %d", db);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "SELECT failed");
            if (r) freeReplyObject(r);
            redisFree(c);
            return NULL;
        }
        freeReplyObject(r);
    }
    return c;
}
