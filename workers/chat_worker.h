/*
 * chat-worker: the sidecar binary. One process runs one role:
 *   --check    connect to Redis, Kafka and MongoDB, prove each works, exit
 *   fanout     queue -> inboxes -> nginx workers holding the connections
 *   persist    queue -> MongoDB (messages, conversations, receipts)
 *   rest       HTTP reads behind nginx's proxy_pass (history, conversations)
 */
#ifndef CHAT_WORKER_H
#define CHAT_WORKER_H

#include <stddef.h>
#include <stdint.h>

#define CW_STR 512

typedef struct {
    char  redis_url[CW_STR];
    char  kafka_brokers[CW_STR];
    char  mongo_uri[CW_STR];
    char  queue[16];            /* "redis" or "kafka" */
    char  rest_listen[128];     /* host:port */
    char  node_id[64];          /* names this process in Redis (consumer name) */
} cw_config_t;

/* config.c */
int  cw_config_load(cw_config_t *cf, const char *path);
int  cw_parse_hostport(const char *s, char *host, size_t hostlen, int *port);
int  cw_parse_redis_url(const char *url, char *host, size_t hostlen, int *port,
                        int *db, char *password, size_t pwlen);

/* log.c */
void cw_log(const char *level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
#define cw_info(...)  cw_log("info", __VA_ARGS__)
#define cw_warn(...)  cw_log("warn", __VA_ARGS__)
#define cw_error(...) cw_log("error", __VA_ARGS__)
int64_t cw_now_ms(void);
extern volatile int cw_stop;
void cw_install_signals(void);

/* check.c */
int  cw_check(const cw_config_t *cf);
int  cw_check_redis(const cw_config_t *cf, char *msg, size_t len);
int  cw_check_kafka(const cw_config_t *cf, char *msg, size_t len);
int  cw_check_mongo(const cw_config_t *cf, char *msg, size_t len);

/* roles */
int  cw_role_fanout(const cw_config_t *cf);
int  cw_role_persist(const cw_config_t *cf);
int  cw_role_rest(const cw_config_t *cf);

/* redis.c: a synchronous connection for the workers */
struct redisContext;
struct redisContext *cw_redis_connect(const char *url, int timeout_ms, char *err, size_t errlen);

#endif
