/*
 * Which key a Redis command is routed by on a Redis Cluster (workers/redis.c).
 * Pure functions on the command as hiredis formats it (RESP), so that the
 * routing rules are unit-tested (t/unit/test_cw_route.c) without a server.
 */
#ifndef CW_ROUTE_H
#define CW_ROUTE_H

#include <stddef.h>

#define CW_ROUTE_ARGS 64            /* arguments looked at (keys are among the first) */

typedef enum {
    CW_ROUTE_ANY = 0,               /* no key: any node (PING, INFO, PUBLISH, SCRIPT, EVALSHA with 0 keys) */
    CW_ROUTE_KEY,                   /* the slot of *key */
    CW_ROUTE_MULTI,                 /* MULTI: goes where the transaction's first key goes */
    CW_ROUTE_EXEC                   /* EXEC / DISCARD: ends the transaction on its node */
} cw_route_t;

/* Splits a RESP command ("*N\r\n$L\r\n<L bytes>\r\n..."): fills at most max
 * (pointer, length) pairs; returns N (which may exceed max), or -1 when the
 * bytes are not one whole command. */
int        cw_resp_args(const char *cmd, size_t len, const char **arg, size_t *alen, int max);

/* The routing of a command given its first argc arguments (argc as
 * cw_resp_args returns it, capped at what was filled). */
cw_route_t cw_route(int argc, const char *const *arg, const size_t *alen, const char **key, size_t *klen);

#endif
