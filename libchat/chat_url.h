/*
 * chat_url: redis://[[user]:password@]host[:port][/db], the one parser of
 * the module (chat_redis) and the workers (redis_url), so that both accept
 * exactly the same URLs. db 0..15, port 1..65535 (default 6379).
 */
#ifndef CHAT_URL_H
#define CHAT_URL_H

#include <stddef.h>

typedef struct {
    char  host[256];
    int   port;
    int   db;
    char  password[256];
} chat_redis_url_t;

/* 0 and *out filled when url[0..len) is valid, else -1 */
int chat_redis_url_parse(const char *url, size_t len, chat_redis_url_t *out);

#endif
