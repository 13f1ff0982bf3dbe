/*
 * chat_url: redis://[[user]:password@]host[:port][/db] or
 * unix://[[user]:password@]/path/to/redis.sock[?db=N], the one parser of
 * the module (chat_redis) and the workers (redis_url), so that both accept
 * exactly the same URLs. db 0..15, port 1..65535 (default 6379); a unix
 * socket has port 0 and its path in host: for a Redis on the same machine
 * (no TCP stack on either side, a file mode instead of an open port); a
 * cluster is TCP only (nodes announce host:port).
 */
#ifndef CHAT_URL_H
#define CHAT_URL_H

#include <stddef.h>

/* sizeof(sockaddr_un.sun_path) on Linux: the path and its NUL */
#define CHAT_REDIS_UNIX_PATH_MAX  108

typedef struct {
    char  host[256];                /* or a unix socket's path (port 0) */
    int   port;
    int   db;
    char  password[256];
} chat_redis_url_t;

/* 0 and *out filled when url[0..len) is valid, else -1 */
int chat_redis_url_parse(const char *url, size_t len, chat_redis_url_t *out);

#endif
