/*
 * Where a Redis command goes on a Redis Cluster (workers/redis.c). The rule
 * of which argument is the key is libchat's chat_cluster_command_slot (the
 * module's own); the workers add what only they send: transactions (MULTI
 * goes with the transaction's first key, EXEC/DISCARD end it) and the
 * commands whose key follows a subcommand (XGROUP CREATE <key>, XINFO
 * GROUPS <key>). Pure, unit-tested (t/unit/test_cw_route.c).
 */
#ifndef CW_ROUTE_H
#define CW_ROUTE_H

#include <stddef.h>

typedef enum {
    CW_ROUTE_ANY = 0,               /* no key: any node (PING, INFO, PUBLISH, SCRIPT, EVALSHA with 0 keys) */
    CW_ROUTE_SLOT,                  /* the master of *slot */
    CW_ROUTE_MULTI,                 /* MULTI: goes where the transaction's first key goes */
    CW_ROUTE_EXEC                   /* EXEC / DISCARD: ends the transaction on its node */
} cw_route_t;

/* Splits a RESP command ("*N\r\n$L\r\n<L bytes>\r\n..."): fills at most max
 * (pointer, length) pairs; returns N (which may exceed max), or -1 when the
 * bytes are not one whole command. */
int        cw_resp_args(const char *cmd, size_t len, const char **arg, size_t *alen, int max);

/* The routing of a formatted command (as hiredis' redisFormatCommand*
 * builds it); *slot is set for CW_ROUTE_SLOT. Malformed bytes: ANY (the
 * node answers the error). */
cw_route_t cw_route(const char *cmd, size_t len, unsigned *slot);

#endif
