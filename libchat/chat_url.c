/* chat_url: see chat_url.h. */
#include "chat_url.h"

#include <string.h>

static const char *
find(const char *p, const char *end, char c)
{
    return memchr(p, c, (size_t) (end - p));
}

/* decimal digits only, lo..hi; -1 otherwise */
static int
number(const char *p, const char *end, int lo, int hi)
{
    int v = 0;

    if (p == end || end - p > 5) {
        return -1;
    }
    for (; p < end; p++) {
        if (*p < '0' || *p > '9') {
            return -1;
        }
        v = v * 10 + (*p - '0');
    }
    return (v < lo || v > hi) ? -1 : v;
}

int
chat_redis_url_parse(const char *url, size_t len, chat_redis_url_t *out)
{
    const char *p, *end, *at, *colon, *slash;

    memset(out, 0, sizeof(*out));
    out->port = 6379;

    if (len < 8 || memcmp(url, "redis://", 8) != 0) {
        return -1;
    }
    p = url + 8;
    end = url + len;

    at = find(p, end, '@');
    if (at) {
        colon = find(p, at, ':');
        colon = colon ? colon + 1 : p;
        if ((size_t) (at - colon) >= sizeof(out->password)) {
            return -1;
        }
        memcpy(out->password, colon, (size_t) (at - colon));
        p = at + 1;
    }

    slash = find(p, end, '/');
    if (slash) {
        if (slash + 1 < end) {
            out->db = number(slash + 1, end, 0, 15);
            if (out->db < 0) {
                return -1;
            }
        }
        end = slash;
    }

    colon = find(p, end, ':');
    if (colon) {
        out->port = number(colon + 1, end, 1, 65535);
        if (out->port < 0) {
            return -1;
        }
        end = colon;
    }

    if (end == p || (size_t) (end - p) >= sizeof(out->host)) {
        return -1;
    }
    memcpy(out->host, p, (size_t) (end - p));

    return 0;
}
