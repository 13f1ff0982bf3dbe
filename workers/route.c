/*
 * Routing of the workers' Redis commands on a cluster (workers/route.h).
 * Only the commands the workers send have a rule of their own; any other
 * command is routed by its first argument, which is the key of every
 * single-key command.
 */
#include "route.h"

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
cw_route(int argc, const char *const *arg, const size_t *alen, const char **key, size_t *klen)
{
    int k = -1;

    if (argc < 1) return CW_ROUTE_ANY;
    if (is(arg[0], alen[0], "MULTI")) return CW_ROUTE_MULTI;
    if (is(arg[0], alen[0], "EXEC") || is(arg[0], alen[0], "DISCARD")) return CW_ROUTE_EXEC;
    if (is(arg[0], alen[0], "PING") || is(arg[0], alen[0], "INFO") || is(arg[0], alen[0], "PUBLISH")
        || is(arg[0], alen[0], "SCRIPT") || is(arg[0], alen[0], "CLUSTER") || is(arg[0], alen[0], "AUTH")
        || is(arg[0], alen[0], "SELECT") || is(arg[0], alen[0], "ASKING") || is(arg[0], alen[0], "READONLY")
        || is(arg[0], alen[0], "TIME") || is(arg[0], alen[0], "HELLO"))
    {
        return CW_ROUTE_ANY;
    }
    if (is(arg[0], alen[0], "EVALSHA") || is(arg[0], alen[0], "EVAL") || is(arg[0], alen[0], "EVALSHA_RO")
        || is(arg[0], alen[0], "EVAL_RO") || is(arg[0], alen[0], "FCALL"))
    {
        /* script numkeys key ...: no key (numkeys 0) runs anywhere */
        if (argc < 4 || (alen[2] == 1 && arg[2][0] == '0')) return CW_ROUTE_ANY;
        k = 3;
    } else if (is(arg[0], alen[0], "XREADGROUP") || is(arg[0], alen[0], "XREAD")) {
        for (int i = 1; i + 1 < argc; i++) {
            if (is(arg[i], alen[i], "STREAMS")) {
                k = i + 1;
                break;
            }
        }
        if (k < 0) return CW_ROUTE_ANY;
    } else if (is(arg[0], alen[0], "XGROUP") || is(arg[0], alen[0], "XINFO")
               || is(arg[0], alen[0], "OBJECT") || is(arg[0], alen[0], "MEMORY"))
    {
        /* subcommand key ... (XINFO HELP and the like: anywhere) */
        if (argc < 3) return CW_ROUTE_ANY;
        k = 2;
    } else {
        if (argc < 2) return CW_ROUTE_ANY;
        k = 1;
    }
    *key = arg[k];
    *klen = alen[k];
    return CW_ROUTE_KEY;
}
