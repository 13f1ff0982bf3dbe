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


#include "chat_ws.h"
#include "chat_proto.h"
#include "chat_lua.h"
#include "chat_shard.h"
#include "chat_entry.h"


#define NGX_CHAT_LOC_WEBSOCKET  1
#define NGX_CHAT_LOC_STATUS     2
#define NGX_CHAT_LOC_POLL       3
#define NGX_CHAT_LOC_SEND       4
#define NGX_CHAT_LOC_ACK        5
#define NGX_CHAT_LOC_READ       6
#define NGX_CHAT_LOC_TYPING     7
#define NGX_CHAT_LOC_PRESENCE   8

#define NGX_CHAT_USER_MAX       CHAT_ID_MAX
#define NGX_CHAT_DEVICE_MAX     CHAT_DEV_ID_MAX


typedef struct {
    ngx_array_t  *redis_urls;      /* chat_redis: ngx_str_t, one or the
                                      cluster's seeds */
    ngx_flag_t    redis_cluster;   /* chat_redis_cluster */
    ngx_uint_t    redis_replicas;  /* chat_redis_replicas: WAIT before an
                                      accept is acknowledged */
    ngx_msec_t    redis_wait_timeout;  /* chat_redis_wait_timeout */
    ngx_str_t     jwt_secret;      /* chat_jwt_secret or chat_jwt_secret_file */
    time_t        jwt_leeway;      /* chat_jwt_leeway */
    time_t        registry_ttl;    /* chat_registry_ttl */
    ngx_uint_t    max_conns_user;  /* chat_max_connections_per_user */
    ngx_uint_t    shards;          /* chat_shards */
    ngx_uint_t    node_id;         /* chat_node_id */
    time_t        dedup_ttl;       /* chat_dedup_ttl */
    ngx_msec_t    receipt_delay;   /* chat_receipt_delay: delivered receipts
                                      of a user and conversation coalesce */
    ngx_msec_t    ack_delay;       /* chat_ack_delay: a WebSocket session's
                                      acks within it run one ack script */
    ngx_flag_t    kafka;           /* chat_queue kafka (else Redis Streams) */
    ngx_str_t     kafka_brokers;   /* chat_kafka_brokers */
    ngx_str_t     kafka_topic;     /* chat_kafka_topic */
} ngx_chat_main_conf_t;


/* Client actions with a budget of their own (chat_limit). */
#define NGX_CHAT_ACT_SEND      0
#define NGX_CHAT_ACT_TYPING    1
#define NGX_CHAT_ACT_READ      2
#define NGX_CHAT_ACT_ACK       3
#define NGX_CHAT_ACT_WATCH     4
#define NGX_CHAT_ACT_PRESENCE  5
#define NGX_CHAT_ACT_N         6

typedef struct {
    ngx_uint_t    rate;            /* a minute; 0: no limit */
    ngx_uint_t    burst;
} ngx_chat_limit_t;

/* "send", "typing", ...: directive arguments and metric labels; the first
 * letters differ, and a bucket's key starts with it */
extern ngx_str_t  ngx_chat_limit_names[NGX_CHAT_ACT_N];


typedef struct {
    ngx_uint_t    handlers;        /* NGX_CHAT_LOC_* */
    ngx_flag_t    auth;            /* chat_auth: authenticate, then the
                                      location's own handler (proxy_pass) */
    ngx_http_complex_value_t  *user_var;    /* chat_user_variable */
    ngx_array_t  *origins;         /* chat_allowed_origins, of ngx_str_t */
    time_t        heartbeat;       /* chat_heartbeat */
    time_t        idle_timeout;    /* chat_idle_timeout */
    time_t        send_timeout;    /* chat_send_timeout */
    size_t        max_message;     /* chat_max_message: one client message */
    ngx_uint_t    max_body;        /* chat_max_body: characters of a body */
    ngx_uint_t    out_frames;      /* chat_outbound_limit: queued frames */
    size_t        out_bytes;       /*   and bytes */
    time_t        poll_timeout;    /* chat_poll_timeout: default hold */
    time_t        poll_max;        /*   and the most a client may ask */
    ngx_chat_limit_t  limits[NGX_CHAT_ACT_N];  /* chat_limit (and
                                      chat_rate_limit for send) */
    ngx_msec_t    typing_interval; /* chat_typing_interval: one relayed
                                      typing per sender and conversation */
} ngx_chat_loc_conf_t;


/* An immutable, reference-counted payload shared by every session of a
 * worker that receives the same event. */
typedef struct {
    ngx_uint_t    refs;
    size_t        len;
    u_char        data[1];
} ngx_chat_shbuf_t;


/* One queued outbound item: [ws header][prefix][shared payload]. The prefix
 * carries per-recipient bytes (the cursor of a durable event). */
typedef struct ngx_chat_out_s  ngx_chat_out_t;

struct ngx_chat_out_s {
    ngx_chat_out_t     *next;
    ngx_chat_shbuf_t   *buf;
    uint64_t            cursor;     /* of a durable event, else 0 */
    uint32_t            sent;       /* bytes of this item already written */
    uint8_t             hlen;       /* bytes of head[] in use */
    uint8_t             opcode;
    u_char              head[CHAT_WS_MAX_SERVER_HDR + 30];
};


typedef struct ngx_chat_user_s     ngx_chat_user_t;
typedef struct ngx_chat_session_s  ngx_chat_session_t;


/* Sessions of one user in this worker process (rbtree by user id). */
struct ngx_chat_user_s {
    ngx_rbtree_node_t   node;       /* key: hash of the id */
    ngx_queue_t         sessions;
    u_char              len;
    u_char              id[NGX_CHAT_USER_MAX];
};


#define NGX_CHAT_T_WS    1
#define NGX_CHAT_T_POLL  2

/*
 * A client session: one WebSocket connection or one held long-poll request.
 * Kept small: idle connections hold nothing beyond this struct (no pools,
 * no buffers); read buffers exist only while a frame is partly received.
 */
struct ngx_chat_session_s {
    ngx_connection_t      *connection;
    ngx_http_request_t    *request;      /* long-poll only */
    ngx_chat_loc_conf_t   *conf;
    ngx_chat_user_t       *user;
    ngx_queue_t            user_link;    /* in user->sessions */
    ngx_queue_t            all_link;     /* in the worker's session list */
    ngx_queue_t            watches;      /* ngx_chat_watch_link_t */

    ngx_chat_out_t        *out_head;
    ngx_chat_out_t        *out_tail;
    uint32_t               out_count;
    uint32_t               out_bytes;

    u_char                *rbuf;         /* partial frame, or NULL */
    uint32_t               rlen;
    uint32_t               rsize;
    u_char                *msg;          /* fragmented message being assembled */
    uint32_t               msg_len;

    chat_ws_reader_t       reader;
    uint64_t               cursor;       /* last cursor acknowledged */
    uint64_t               sent_cursor;  /* highest durable cursor queued */
    uint64_t               id;           /* unique in the worker */
    ngx_uint_t             refs;         /* pending Redis replies */

    unsigned               transport:2;
    unsigned               registered:1;
    unsigned               closing:1;    /* close frame queued */
    unsigned               closed:1;     /* connection gone; free at refs 0 */
    unsigned               draining:1;
    unsigned               peer_closed:1; /* close after the queue drains */
    unsigned               error:1;       /* the socket failed */
    unsigned               replaying:1;   /* inbox replay in progress */
    unsigned               missed:1;      /* live events skipped meanwhile */
    unsigned               replay_wait:1; /* next page when the queue drains */
    unsigned               behind:1;      /* events after its cursor were
                                             dropped from the inbox */
    unsigned               ack_pending:1; /* cursor acked, script not run yet */
    unsigned               nwatches:8;

    u_char                 dev_len;
    u_char                 device[NGX_CHAT_DEVICE_MAX];
    ngx_log_t              log;
};


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
      "Worker processes whose Redis connections are up.")                     \
    X(redis_moved, "ngx_chat_redis_redirects_total", "{kind=\"moved\"}",    \
      "counter", "Redis Cluster redirects followed, by kind.")               \
    X(redis_ask, "ngx_chat_redis_redirects_total", "{kind=\"ask\"}",        \
      "counter", "Redis Cluster redirects followed, by kind.")               \
    X(redis_tryagain, "ngx_chat_redis_redirects_total",                       \
      "{kind=\"tryagain\"}", "counter",                                     \
      "Redis Cluster redirects followed, by kind.")                          \
    X(redis_maps, "ngx_chat_redis_cluster_maps_total", "", "counter",         \
      "Redis Cluster slot maps that changed the routing.")                    \
    X(redis_waits, "ngx_chat_redis_waits_total", "", "counter",               \
      "WAITs sent for chat_redis_replicas (each covers a batch of accepts).") \
    X(redis_waited, "ngx_chat_redis_durable_accepts_total", "", "counter",    \
      "Accepts acknowledged only after a WAIT (chat_redis_replicas).")        \
    X(redis_wait_short, "ngx_chat_redis_wait_short_total", "", "counter",     \
      "WAITs that confirmed fewer replicas than chat_redis_replicas.")      \
    X(limited_send, "ngx_chat_limited_total", "{action=\"send\"}", "counter", \
      "Client actions refused by their budget (chat_limit).")                 \
    X(limited_typing, "ngx_chat_limited_total", "{action=\"typing\"}",        \
      "counter", "Client actions refused by their budget (chat_limit).")      \
    X(limited_read, "ngx_chat_limited_total", "{action=\"read\"}", "counter", \
      "Client actions refused by their budget (chat_limit).")                 \
    X(limited_ack, "ngx_chat_limited_total", "{action=\"ack\"}", "counter",   \
      "Client actions refused by their budget (chat_limit).")                 \
    X(limited_watch, "ngx_chat_limited_total", "{action=\"watch\"}",          \
      "counter", "Client actions refused by their budget (chat_limit).")      \
    X(limited_presence, "ngx_chat_limited_total", "{action=\"presence\"}",    \
      "counter", "Client actions refused by their budget (chat_limit).")      \
    X(typing_dropped, "ngx_chat_typing_dropped_total", "", "counter",         \
      "Typing indicators dropped by chat_typing_interval.")                   \
    X(ephemeral_dropped, "ngx_chat_ephemeral_dropped_total", "", "counter",   \
      "Typing and presence frames not queued to a session whose outbound "   \
      "queue was above half its bound.")

#define NGX_CHAT_STAT_FIELD(field, name, labels, type, help)  ngx_atomic_t field;

typedef struct {
    NGX_CHAT_STATS(NGX_CHAT_STAT_FIELD)
} ngx_chat_stats_t;

extern ngx_chat_stats_t  *ngx_chat_stats;

#define ngx_chat_stat_inc(field)                                              \
    (void) ngx_atomic_fetch_add(&ngx_chat_stats->field, 1)
#define ngx_chat_stat_dec(field)                                              \
    (void) ngx_atomic_fetch_add(&ngx_chat_stats->field, (ngx_atomic_int_t) -1)

static ngx_inline void
ngx_chat_stat_limited(ngx_uint_t action)
{
    switch (action) {
    case NGX_CHAT_ACT_SEND:     ngx_chat_stat_inc(limited_send); break;
    case NGX_CHAT_ACT_TYPING:   ngx_chat_stat_inc(limited_typing); break;
    case NGX_CHAT_ACT_READ:     ngx_chat_stat_inc(limited_read); break;
    case NGX_CHAT_ACT_ACK:      ngx_chat_stat_inc(limited_ack); break;
    case NGX_CHAT_ACT_WATCH:    ngx_chat_stat_inc(limited_watch); break;
    default:                    ngx_chat_stat_inc(limited_presence); break;
    }
}

ngx_int_t ngx_chat_stats_add_zone(ngx_conf_t *cf);
ngx_int_t ngx_chat_status_handler(ngx_http_request_t *r);

/* ngx_chat_auth.c */
typedef struct {
    u_char        user[NGX_CHAT_USER_MAX + 1];
    u_char        device[NGX_CHAT_DEVICE_MAX + 1];
    size_t        user_len;
    size_t        dev_len;
} ngx_chat_identity_t;

ngx_int_t ngx_chat_authenticate(ngx_http_request_t *r,
    ngx_chat_identity_t *id);
ngx_int_t ngx_chat_auth_add_variables(ngx_conf_t *cf);
ngx_int_t ngx_chat_auth_access_handler(ngx_http_request_t *r);

/* ngx_chat_cors.c: preflights and the CORS/cache headers of chat answers */
ngx_int_t ngx_chat_cors_init(ngx_conf_t *cf);
char *ngx_chat_cors_set_origins(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/* ngx_chat_http.c: small HTTP answers */
ngx_int_t ngx_chat_http_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message);
ngx_int_t ngx_chat_http_json(ngx_http_request_t *r, ngx_uint_t status,
    u_char *json, size_t len);
ngx_int_t ngx_chat_http_retry_after(ngx_http_request_t *r, int64_t wait);
ngx_int_t ngx_chat_http_limited(ngx_http_request_t *r, const char *message,
    int64_t wait);
ngx_int_t ngx_chat_arg_int(ngx_http_request_t *r, const char *name,
    size_t nlen, int64_t *v);
ngx_int_t ngx_chat_arg_id(ngx_http_request_t *r, const char *name,
    size_t nlen, u_char *out, size_t max, size_t *len);

/* --- store adapters: Redis (ngx_chat_redis.c), Kafka (ngx_chat_kafka.c) ---
 * They fire the callbacks they are given and know no session. */
ngx_int_t ngx_chat_redis_check_urls(ngx_array_t *urls, ngx_flag_t cluster,
    ngx_log_t *log);
typedef void (*ngx_chat_redis_cb)(void *reply, void *data);

ngx_int_t ngx_chat_redis_init_process(ngx_cycle_t *cycle);
void ngx_chat_redis_exit_process(ngx_cycle_t *cycle);
ngx_int_t ngx_chat_redis_ready(void);
void ngx_chat_redis_flush(void);
ngx_int_t ngx_chat_redis_command(ngx_chat_redis_cb cb, void *data,
    const char *fmt, ...);
ngx_int_t ngx_chat_redis_commandv(ngx_chat_redis_cb cb, void *data,
    int argc, const char **argv, const size_t *argvlen);
ngx_int_t ngx_chat_redis_script_durable(ngx_uint_t script,
    ngx_chat_redis_cb cb, void *data, int nkeys, int argc, const char **argv,
    const size_t *argvlen);
ngx_int_t ngx_chat_redis_script(ngx_uint_t script, ngx_chat_redis_cb cb,
    void *data, int nkeys, int argc, const char **argv, const size_t *argvlen);
ngx_int_t ngx_chat_redis_subscribe(ngx_str_t *channel, ngx_uint_t on);
/* cluster mode: pub/sub is sharded (SPUBLISH/SSUBSCRIBE), the presence
 * channel carries the user's hash tag, scripts get their "s" flag */
ngx_uint_t ngx_chat_redis_sharded(void);
ngx_int_t ngx_chat_redis_publish(u_char *ch, size_t clen, u_char *payload,
    size_t plen);
ngx_int_t ngx_chat_redis_relay(u_char *user, size_t ulen, u_char *json,
    size_t jlen);
typedef void (*ngx_chat_redis_msg_handler)(u_char *payload, size_t len);
ngx_int_t ngx_chat_redis_on_channel(ngx_str_t *name, ngx_uint_t prefix,
    ngx_chat_redis_msg_handler handler);
ngx_int_t ngx_chat_redis_on_resubscribe(void (*cb)(void));
extern ngx_str_t  ngx_chat_worker_channel;

/* scripts: CHAT_LUA_<NAME>, one per lua/<name>.lua (generated) */

/* the shard of a conversation (docs/PIPELINE.md, "Shards") */
static ngx_inline ngx_uint_t
ngx_chat_shard(ngx_chat_main_conf_t *cmcf, u_char *conv, size_t len)
{
    return chat_shard((const char *) conv, len, (unsigned) cmcf->shards);
}

/* a key of group G's live state, on its conversation's shard:
 * chat:{s<shard>}:g:<G>:<suffix> (docs/PIPELINE.md, "Groups") */
#define NGX_CHAT_GROUP_KEY_LEN  (NGX_CHAT_USER_MAX + 48)

/* typing in a group is relayed to at most this many members */
#define NGX_CHAT_GROUP_TYPING_MAX  500

/* every nginx worker process subscribes to it besides its own channel:
 * one publish reaches the members of a group wherever they are connected
 * (the same "<recipients>\n<json>" payload as a worker channel) */
#define NGX_CHAT_BROADCAST_CHANNEL  "chat:w:all"


static ngx_inline size_t
ngx_chat_group_key(u_char *buf, ngx_uint_t shard, u_char *g, size_t glen,
    const char *suffix)
{
    return ngx_sprintf(buf, "chat:{s%ui}:g:%*s:%s", shard, glen, g, suffix)
           - buf;
}

/* wall clock in milliseconds (presence, registry expiry, message ts) */
static ngx_inline int64_t
ngx_chat_now_ms(void)
{
    ngx_time_t  *tp = ngx_timeofday();

    return (int64_t) tp->sec * 1000 + (int64_t) tp->msec;
}

/* ngx_chat_rate.c */
ngx_int_t ngx_chat_rate_add_zone(ngx_conf_t *cf);
int64_t ngx_chat_rate_take(ngx_uint_t rate, ngx_uint_t burst, u_char *user,
    size_t len, ngx_uint_t n);
int64_t ngx_chat_limit(ngx_chat_loc_conf_t *conf, ngx_uint_t action,
    u_char *user, size_t ulen, ngx_uint_t n);
ngx_uint_t ngx_chat_typing_allowed(ngx_chat_loc_conf_t *conf, u_char *user,
    size_t ulen, u_char *conv, size_t clen);

/* ngx_chat_kafka.c */
typedef void (*ngx_chat_kafka_cb)(ngx_int_t ok, void *data);

ngx_int_t ngx_chat_kafka_init_process(ngx_cycle_t *cycle);
void ngx_chat_kafka_exit_process(ngx_cycle_t *cycle);
ngx_int_t ngx_chat_kafka_produce(ngx_uint_t partition, u_char *key,
    size_t klen, u_char *val, size_t vlen, ngx_chat_kafka_cb cb, void *data);

/* --- session core (ngx_chat_session.c) ------------------------------------
 * Calls only down; a transport serves it through its table, the features
 * through the close hook. */

/* What the core and the features may ask of a transport (WebSocket,
 * long-poll), filled in by ngx_chat_ws.c and ngx_chat_poll.c at process
 * start: nothing below the transports calls one by name. */
typedef struct {
    void        (*flush)(ngx_chat_session_t *s);   /* something was queued */
    void        (*close)(ngx_chat_session_t *s, ngx_uint_t code,
                         const char *reason);      /* NULL: none to send */
    void        (*drain)(ngx_chat_session_t *s);   /* graceful shutdown */
    void        (*replayed)(ngx_chat_session_t *s);  /* one_page: a replay
                                                      page is queued */
    unsigned      framed:1;        /* queued items carry a frame header */
    unsigned      one_page:1;      /* one replay page per request */
    unsigned      coalesce_acks:1; /* acks may wait for chat_ack_delay */
    ngx_uint_t    replay_page;     /* events per replay page */
} ngx_chat_transport_t;

extern ngx_chat_transport_t  *ngx_chat_transports[3];
#define ngx_chat_tp(s)  ngx_chat_transports[(s)->transport]

extern void (*ngx_chat_session_close_hook)(ngx_chat_session_t *s);
extern ngx_queue_t  ngx_chat_sessions;

ngx_chat_session_t *ngx_chat_session_create(ngx_connection_t *c,
    ngx_chat_loc_conf_t *conf, ngx_chat_identity_t *id, ngx_uint_t transport);
typedef void (*ngx_chat_registered_pt)(ngx_chat_session_t *s, ngx_int_t rc,
    uint64_t trim);
void ngx_chat_session_register(ngx_chat_session_t *s,
    ngx_chat_registered_pt done);
void ngx_chat_session_close(ngx_chat_session_t *s);
void ngx_chat_session_refuse(ngx_chat_session_t *s, ngx_int_t rc);
void ngx_chat_session_release(ngx_chat_session_t *s);
void ngx_chat_out_append(ngx_chat_session_t *s, ngx_chat_out_t *o);
ngx_int_t ngx_chat_session_send(ngx_chat_session_t *s, u_char *json,
    size_t len);
ngx_int_t ngx_chat_session_send_shared(ngx_chat_session_t *s,
    ngx_chat_shbuf_t *b, u_char *prefix, size_t plen, uint64_t cursor);
ngx_int_t ngx_chat_session_send_ephemeral(ngx_chat_session_t *s,
    ngx_chat_shbuf_t *b);
void ngx_chat_session_error(ngx_chat_session_t *s, const char *code,
    const char *message, chat_proto_str_t *client_id);
void ngx_chat_session_limited(ngx_chat_session_t *s, const char *message,
    int64_t wait);
ngx_chat_shbuf_t *ngx_chat_shbuf_alloc(size_t len);
void ngx_chat_shbuf_release(ngx_chat_shbuf_t *b);
ngx_chat_user_t *ngx_chat_user_find(u_char *id, size_t len);
void ngx_chat_id_insert(ngx_rbtree_node_t *temp, ngx_rbtree_node_t *node,
    ngx_rbtree_node_t *sentinel);
ngx_rbtree_node_t *ngx_chat_id_lookup(ngx_rbtree_t *tree, u_char *id,
    size_t len, uint32_t hash);
ngx_int_t ngx_chat_sessions_init_process(ngx_cycle_t *cycle);

/* --- features ----------------------------------------------------------------
 * Messages (ngx_chat_msg.c), delivery from the worker channel
 * (ngx_chat_deliver.c), presence (ngx_chat_presence.c), typing
 * (ngx_chat_typing.c), and the frame router above them (ngx_chat_router.c). */

void ngx_chat_msg_frame(ngx_chat_session_t *s, chat_proto_frame_t *f);
ngx_int_t ngx_chat_msg_http(ngx_http_request_t *r, ngx_chat_identity_t *id,
    chat_proto_frame_t *f);
void ngx_chat_msg_ack_flush(ngx_chat_session_t *s);
void ngx_chat_replay_start(ngx_chat_session_t *s);
void ngx_chat_replay_resume(ngx_chat_session_t *s);
ngx_int_t ngx_chat_msg_init_process(ngx_cycle_t *cycle);

void ngx_chat_deliver(u_char *p, size_t len);
ngx_int_t ngx_chat_deliver_init_process(ngx_cycle_t *cycle);

void ngx_chat_presence_watch(ngx_chat_session_t *s, chat_proto_frame_t *f,
    ngx_uint_t on);
void ngx_chat_presence_unwatch_all(ngx_chat_session_t *s);
void ngx_chat_presence_resubscribe(void);
ngx_int_t ngx_chat_presence_query(u_char *user, size_t len, u_char *viewer,
    size_t vlen, ngx_chat_redis_cb cb, void *data);
ngx_int_t ngx_chat_presence_reply_ok(void *reply);
u_char *ngx_chat_presence_json(u_char *p, u_char *user, size_t len,
    void *reply, ngx_uint_t with_type);
void ngx_chat_presence_deliver(u_char *p, size_t len);
ngx_int_t ngx_chat_presence_init_process(ngx_cycle_t *cycle);

ngx_int_t ngx_chat_typing(ngx_chat_loc_conf_t *conf, u_char *from,
    size_t flen, chat_proto_frame_t *f, int64_t *wait);

ngx_int_t ngx_chat_route(ngx_chat_session_t *s, ngx_http_request_t *r,
    ngx_chat_identity_t *id, chat_proto_frame_t *f);
void ngx_chat_route_frame(ngx_chat_session_t *s, u_char *p, size_t len);
ngx_int_t ngx_chat_features_init_process(ngx_cycle_t *cycle);

/* --- transports: WebSocket (ngx_chat_ws.c), long-poll and the HTTP
 * endpoints (ngx_chat_poll.c) ------------------------------------------------ */

ngx_int_t ngx_chat_ws_handler(ngx_http_request_t *r);
void ngx_chat_ws_flush(ngx_chat_session_t *s);
void ngx_chat_ws_close(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason);
void ngx_chat_ws_drain(ngx_chat_session_t *s);
ngx_int_t ngx_chat_ws_init_process(ngx_cycle_t *cycle);

ngx_int_t ngx_chat_poll_handler(ngx_http_request_t *r);
ngx_int_t ngx_chat_api_handler(ngx_http_request_t *r, ngx_uint_t which);
void ngx_chat_poll_wake(ngx_chat_session_t *s);
void ngx_chat_poll_drain(ngx_chat_session_t *s);
void ngx_chat_poll_hold(ngx_chat_session_t *s);
ngx_int_t ngx_chat_poll_init_process(ngx_cycle_t *cycle);


extern ngx_module_t  ngx_chat_module;

#endif /* NGX_CHAT_H */
