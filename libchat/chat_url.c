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

/* [[user]:password@]: the password into out; returns what follows */
static const char *
credentials(const char *p, const char *end, chat_redis_url_t *out)
{
    const char *at, *colon;

    at = find(p, end, '@');
    if (at == NULL) {
        return p;
    }
    colon = find(p, at, ':');
    colon = colon ? colon + 1 : p;
    if ((size_t) (at - colon) >= sizeof(out->password)) {
        return NULL;
    }
    memcpy(out->password, colon, (size_t) (at - colon));
    return at + 1;
}

/* unix://[[user]:password@]/absolute/path[?db=N]: port 0, host the path
 * (shorter than sun_path, 108 bytes) */
static int
unix_url(const char *p, const char *end, chat_redis_url_t *out)
{
    const char *q;

    out->port = 0;
    p = credentials(p, end, out);
    if (p == NULL) {
        return -1;
    }
    q = find(p, end, '?');
    if (q) {
        if (end - q < 5 || memcmp(q, "?db=", 4) != 0) {
            return -1;
        }
        out->db = number(q + 4, end, 0, 15);
        if (out->db < 0) {
            return -1;
        }
        end = q;
    }
    if (end - p < 2 || *p != '/' || end[-1] == '/' || end - p >= CHAT_REDIS_UNIX_PATH_MAX
        || find(p, end, '\0') != NULL)
    {
        return -1;
    }
    memcpy(out->host, p, (size_t) (end - p));
    return 0;
}

int
chat_redis_url_parse(const char *url, size_t len, chat_redis_url_t *out)
{
    const char *p, *end, *colon, *slash;

    memset(out, 0, sizeof(*out));
    out->port = 6379;

    if (len >= 7 && memcmp(url, "unix://", 7) == 0) {
        return unix_url(url + 7, url + len, out);
    }
    if (len < 8 || memcmp(url, "redis://", 8) != 0) {
        return -1;
    }
    p = url + 8;
    end = url + len;

    p = credentials(p, end, out);
    if (p == NULL) {
        return -1;
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
