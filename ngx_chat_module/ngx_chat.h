/*
 * ngx_chat_module: shared declarations of the nginx glue.
 *
 * Files:
 *   ngx_chat_module.c   directives, configuration, module hooks
 *   chat_*.c            pure code (no nginx): frame codec, JSON, JWT, protocol
 */
#ifndef NGX_CHAT_H
#define NGX_CHAT_H

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


#define NGX_CHAT_LOC_WEBSOCKET  0x01
#define NGX_CHAT_LOC_STATUS     0x02


typedef struct {
    ngx_str_t     redis_url;       /* chat_redis */
    ngx_str_t     jwt_secret;      /* chat_jwt_secret or chat_jwt_secret_file */
} ngx_chat_main_conf_t;


typedef struct {
    ngx_uint_t    handlers;        /* NGX_CHAT_LOC_* */
} ngx_chat_loc_conf_t;


/*
 * Shared counters (ngx_chat_status.c). One table: field, metric name,
 * labels, Prometheus type, help. Gauges go up and down; counters only up.
 */
#define NGX_CHAT_STATS(X)                                                     \
    X(conn_ws, "ngx_chat_connections", "{transport=\"websocket\"}", "gauge",  \
      "Open client sessions by transport.")                                   \
    X(conn_poll, "ngx_chat_connections", "{transport=\"longpoll\"}", "gauge", \
      "Open client sessions by transport.")                                   \
    X(accepted, "ngx_chat_sessions_total", "", "counter",                     \
      "Sessions opened since start.")                                         \
    X(auth_failed, "ngx_chat_auth_failures_total", "", "counter",             \
      "Requests refused with 401.")                                           \
    X(frames_in, "ngx_chat_frames_total", "{direction=\"in\"}", "counter",    \
      "WebSocket frames received and sent.")                                  \
    X(frames_out, "ngx_chat_frames_total", "{direction=\"out\"}", "counter",  \
      "WebSocket frames received and sent.")                                  \
    X(errors_sent, "ngx_chat_error_frames_total", "", "counter",              \
      "Error objects sent to clients.")                                       \
    X(closed_protocol, "ngx_chat_closed_total", "{reason=\"protocol\"}",      \
      "counter", "Sessions closed by the server, by reason.")                 \
    X(closed_slow, "ngx_chat_closed_total", "{reason=\"slow_consumer\"}",     \
      "counter", "Sessions closed by the server, by reason.")                 \
    X(closed_idle, "ngx_chat_closed_total", "{reason=\"idle\"}", "counter",   \
      "Sessions closed by the server, by reason.")                            \
    X(closed_drain, "ngx_chat_closed_total", "{reason=\"drain\"}", "counter", \
      "Sessions closed by the server, by reason.")                            \
    X(redis_up, "ngx_chat_redis_connected_workers", "", "gauge",              \
      "Worker processes whose Redis connections are up.")

#define NGX_CHAT_STAT_FIELD(field, name, labels, type, help)  ngx_atomic_t field;

typedef struct {
    NGX_CHAT_STATS(NGX_CHAT_STAT_FIELD)
} ngx_chat_stats_t;

extern ngx_chat_stats_t  *ngx_chat_stats;

#define ngx_chat_stat_inc(field)                                              \
    (void) ngx_atomic_fetch_add(&ngx_chat_stats->field, 1)
#define ngx_chat_stat_dec(field)                                              \
    (void) ngx_atomic_fetch_add(&ngx_chat_stats->field, (ngx_atomic_int_t) -1)

ngx_int_t ngx_chat_stats_add_zone(ngx_conf_t *cf);
ngx_int_t ngx_chat_status_handler(ngx_http_request_t *r);


extern ngx_module_t  ngx_chat_module;

#endif /* NGX_CHAT_H */
