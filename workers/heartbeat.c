/*
 * Liveness of a worker role in Redis: chat:worker:<role>:<node> with a TTL
 * of 10 s, refreshed every 3 s while the role runs, so ops (and
 * scripts/stack status) see which workers are alive.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <stdio.h>

void
cw_heartbeat_init(cw_heartbeat_t *hb, const cw_config_t *cf, const char *role)
{
    snprintf(hb->key, sizeof(hb->key), "chat:worker:%s:%s", role, cf->node_id);
    hb->next = 0;
}

int
cw_heartbeat_tick(cw_heartbeat_t *hb, cw_redis_t *c)
{
    redisReply *r;
    int64_t     now = cw_mono_ms();

    if (c == NULL || now < hb->next) return 0;
    r = cw_redis_command(c, "SET %s %lld EX 10", hb->key, (long long) cw_now_ms());
    if (r == NULL) return -1;
    freeReplyObject(r);
    hb->next = now + 3000;
    return 0;
}

void
cw_heartbeat_clear(cw_heartbeat_t *hb, cw_redis_t *c)
{
    redisReply *r;

    if (c == NULL || cw_redis_err(c)) return;
    r = cw_redis_command(c, "DEL %s", hb->key);
    if (r) freeReplyObject(r);
}
