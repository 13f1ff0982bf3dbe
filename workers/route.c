/*
 * Routing of the workers' Redis commands on a cluster (workers/route.h):
 * libchat's rule (chat_cluster_command_slot) and the workers' own few.
 */
#include "route.h"
#include "chat_cluster.h"

#include <string.h>
#include <strings.h>

static int
is(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && strncasecmp(s, word, n) == 0;
}

/* A decimal number of at most 18 digits at p (up to end), then CRLF. */
static int
number(const char **p, const char *end, long long *out)
{
    long long v = 0;
    int       digits = 0;

    while (*p < end && **p >= '0' && **p <= '9' && digits < 18) {
        v = v * 10 + (**p - '0');
        (*p)++;
        digits++;
    }
    if (digits == 0 || end - *p < 2 || (*p)[0] != '\r' || (*p)[1] != '\n') return -1;
    *p += 2;
    *out = v;
    return 0;
}

int
cw_resp_args(const char *cmd, size_t len, const char **arg, size_t *alen, int max)
{
    const char *p = cmd, *end = cmd + len;
    long long   n, l;

    if (len < 1 || *p++ != '*' || number(&p, end, &n) != 0 || n < 1 || n > 1000000000) return -1;
    for (long long i = 0; i < n; i++) {
        if (p >= end || *p++ != '$' || number(&p, end, &l) != 0) return -1;
        if ((long long) (end - p) < l + 2 || p[l] != '\r' || p[l + 1] != '\n') return -1;
        if (i < max) {
            arg[i] = p;
            alen[i] = (size_t) l;
        }
        p += l + 2;
    }
    return p == end ? (int) n : -1;
}

cw_route_t
cw_route(const char *cmd, size_t len, unsigned *slot)
{
    const char *arg[3];
    size_t      alen[3];
    int         argc = cw_resp_args(cmd, len, arg, alen, 3), s;

    if (argc < 1) return CW_ROUTE_ANY;
    if (is(arg[0], alen[0], "MULTI")) return CW_ROUTE_MULTI;
    if (is(arg[0], alen[0], "EXEC") || is(arg[0], alen[0], "DISCARD")) return CW_ROUTE_EXEC;
    if (is(arg[0], alen[0], "XGROUP") || is(arg[0], alen[0], "XINFO")) {
        /* subcommand key ... (XINFO HELP and the like: anywhere) */
        if (argc < 3) return CW_ROUTE_ANY;
        *slot = chat_cluster_slot(arg[2], alen[2]);
        return CW_ROUTE_SLOT;
    }
    s = chat_cluster_command_slot(cmd, len);
    if (s < 0) return CW_ROUTE_ANY;
    *slot = (unsigned) s;
    return CW_ROUTE_SLOT;
}
