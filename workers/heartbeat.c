/*
 * Liveness of a worker role in Redis: chat:worker:<role>:<node> with a TTL,
 * refreshed while the role runs, so ops (and scripts/stack status) see which
 * workers are alive. The fanout and persist roles consume the queue from
 * issue 4 on; until then they only hold their heartbeat.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <unistd.h>

static int
heartbeat_loop(const cw_config_t *cf, const char *role)
{
    char          err[256], key[160];
    redisContext *c = NULL;
    redisReply   *r;
    int           backoff = 100;

    snprintf(key, sizeof(key), "chat:worker:%s:%s", role, cf->node_id);
    cw_info("role %s started (node %s, queue %s)", role, cf->node_id, cf->queue);
    while (!cw_stop) {
        if (c == NULL) {
            c = cw_redis_connect(cf->redis_url, 2000, err, sizeof(err));
            if (c == NULL) {
                cw_warn("redis: %s; retrying in %d ms", err, backoff);
                usleep(backoff * 1000);
                backoff = backoff < 5000 ? backoff * 2 : 5000;
                continue;
            }
            backoff = 100;
        }
        r = redisCommand(c, "SET %s %lld EX 10", key, (long long) cw_now_ms());
        if (r == NULL) {
            cw_warn("redis: %s; reconnecting", c->errstr);
            redisFree(c);
            c = NULL;
            continue;
        }
        freeReplyObject(r);
        for (int i = 0; i < 30 && !cw_stop; i++) usleep(100 * 1000);
    }
    if (c) {
        r = redisCommand(c, "DEL %s", key);
        if (r) freeReplyObject(r);
        redisFree(c);
    }
    cw_info("role %s stopped", role);
    return 0;
}

int
cw_role_fanout(const cw_config_t *cf)
{
    return heartbeat_loop(cf, "fanout");
}

int
cw_role_persist(const cw_config_t *cf)
{
    return heartbeat_loop(cf, "persist");
}
