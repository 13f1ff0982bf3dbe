/*
 * ngx_chat_module: directives, configuration and module hooks.
 */
#include "ngx_chat.h"


static void *ngx_chat_create_main_conf(ngx_conf_t *cf);
static char *ngx_chat_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_chat_create_loc_conf(ngx_conf_t *cf);
static char *ngx_chat_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static char *ngx_chat_set_handler(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_chat_set_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_chat_set_secret_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_chat_set_outbound(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_chat_set_rate(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_chat_set_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_chat_set_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_chat_set_queue(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_chat_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_chat_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_chat_init_process(ngx_cycle_t *cycle);
static void ngx_chat_exit_process(ngx_cycle_t *cycle);
static ngx_int_t ngx_chat_handler(ngx_http_request_t *r);


static char *ngx_chat_check_max_message(ngx_conf_t *cf, void *post,
    void *data);


static ngx_uint_t  ngx_chat_enabled;


ngx_str_t  ngx_chat_limit_names[NGX_CHAT_ACT_N] = {
    ngx_string("send"), ngx_string("typing"), ngx_string("read"),
    ngx_string("ack"), ngx_string("watch"), ngx_string("presence")
};

/* Budgets a user gets on one nginx node unless chat_limit says otherwise:
 * well above what a person and a well-behaved client do, far below what
 * a script can send (docs/PROTOCOL.md, "Limits"). */
static ngx_chat_limit_t  ngx_chat_limit_defaults[NGX_CHAT_ACT_N] = {
    { 60, 10 },        /* send: messages */
    { 120, 20 },       /* typing: frames, every conversation together */
    { 300, 60 },       /* read: read pointers moved */
    { 600, 120 },      /* ack: acks applied one by one (HTTP, or WebSocket
                          with chat_ack_delay 0) */
    { 600, 250 },      /* watch: users newly watched */
    { 120, 30 }        /* presence: GET /chat/presence */
};


static ngx_conf_post_handler_pt  ngx_chat_max_message_p =
    ngx_chat_check_max_message;


static ngx_command_t  ngx_chat_commands[] = {

    { ngx_string("chat_websocket"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_chat_set_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) NGX_CHAT_LOC_WEBSOCKET },

    { ngx_string("chat_poll"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_chat_set_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) NGX_CHAT_LOC_POLL },

    { ngx_string("chat_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_chat_set_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) NGX_CHAT_LOC_STATUS },

    { ngx_string("chat_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_chat_set_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_auth"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, auth),
      NULL },

    { ngx_string("chat_user_variable"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, user_var),
      NULL },

    { ngx_string("chat_allowed_origins"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_chat_cors_set_origins,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, origins),
      NULL },

    { ngx_string("chat_heartbeat"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, heartbeat),
      NULL },

    { ngx_string("chat_idle_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, idle_timeout),
      NULL },

    { ngx_string("chat_send_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, send_timeout),
      NULL },

    { ngx_string("chat_max_message"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, max_message),
      &ngx_chat_max_message_p },

    { ngx_string("chat_max_body"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, max_body),
      NULL },

    { ngx_string("chat_outbound_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE2,
      ngx_chat_set_outbound,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_poll_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, poll_timeout),
      NULL },

    { ngx_string("chat_poll_max_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, poll_max),
      NULL },

    { ngx_string("chat_rate_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE2,
      ngx_chat_set_rate,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE3,
      ngx_chat_set_limit,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_typing_interval"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_chat_loc_conf_t, typing_interval),
      NULL },

    { ngx_string("chat_shards"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, shards),
      NULL },

    { ngx_string("chat_node_id"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, node_id),
      NULL },

    { ngx_string("chat_dedup_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, dedup_ttl),
      NULL },

    { ngx_string("chat_ack_delay"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, ack_delay),
      NULL },

    { ngx_string("chat_receipt_delay"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, receipt_delay),
      NULL },

    { ngx_string("chat_queue"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_chat_set_queue,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_kafka_brokers"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, kafka_brokers),
      NULL },

    { ngx_string("chat_kafka_topic"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, kafka_topic),
      NULL },

    { ngx_string("chat_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_chat_set_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_redis_cluster"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, redis_cluster),
      NULL },

    /* durability across failover: an accept is acknowledged once WAIT has
     * seen it on this many replicas of its master (0: no WAIT) */
    { ngx_string("chat_redis_replicas"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, redis_replicas),
      NULL },

    { ngx_string("chat_redis_wait_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, redis_wait_timeout),
      NULL },

    { ngx_string("chat_jwt_secret"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, jwt_secret),
      NULL },

    { ngx_string("chat_jwt_secret_file"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_chat_set_secret_file,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_jwt_leeway"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, jwt_leeway),
      NULL },

    { ngx_string("chat_registry_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, registry_ttl),
      NULL },

    { ngx_string("chat_max_connections_per_user"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, max_conns_user),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_chat_module_ctx = {
    ngx_chat_preconfiguration,             /* preconfiguration */
    ngx_chat_postconfiguration,            /* postconfiguration */

    ngx_chat_create_main_conf,             /* create main configuration */
    ngx_chat_init_main_conf,               /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_chat_create_loc_conf,              /* create location configuration */
    ngx_chat_merge_loc_conf                /* merge location configuration */
};


ngx_module_t  ngx_chat_module = {
    NGX_MODULE_V1,
    &ngx_chat_module_ctx,                  /* module context */
    ngx_chat_commands,                     /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_chat_init_process,                 /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_chat_exit_process,                 /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_int_t
ngx_chat_preconfiguration(ngx_conf_t *cf)
{
    ngx_chat_enabled = 0;

    return ngx_chat_auth_add_variables(cf);
}


static ngx_int_t
ngx_chat_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_chat_auth_access_handler;

    return ngx_chat_cors_init(cf);
}


static ngx_int_t
ngx_chat_init_process(ngx_cycle_t *cycle)
{
    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) {
        return NGX_OK;
    }

    if (!ngx_chat_enabled) {
        return NGX_OK;
    }

    /* bottom up: the session core and the transports' tables, the store
     * adapters, then the features, which register their callbacks with
     * the adapters and the core */
    if (ngx_chat_sessions_init_process(cycle) != NGX_OK
        || ngx_chat_ws_init_process(cycle) != NGX_OK
        || ngx_chat_poll_init_process(cycle) != NGX_OK
        || ngx_chat_redis_init_process(cycle) != NGX_OK
        || ngx_chat_kafka_init_process(cycle) != NGX_OK
        || ngx_chat_features_init_process(cycle) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_chat_exit_process(ngx_cycle_t *cycle)
{
    if (ngx_chat_enabled) {
        ngx_chat_kafka_exit_process(cycle);
        ngx_chat_redis_exit_process(cycle);
    }
}


static void *
ngx_chat_create_main_conf(ngx_conf_t *cf)
{
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_pcalloc(cf->pool, sizeof(ngx_chat_main_conf_t));
    if (cmcf == NULL) {
        return NULL;
    }

    cmcf->jwt_leeway = NGX_CONF_UNSET;
    cmcf->registry_ttl = NGX_CONF_UNSET;
    cmcf->max_conns_user = NGX_CONF_UNSET_UINT;
    cmcf->shards = NGX_CONF_UNSET_UINT;
    cmcf->node_id = NGX_CONF_UNSET_UINT;
    cmcf->dedup_ttl = NGX_CONF_UNSET;
    cmcf->receipt_delay = NGX_CONF_UNSET_MSEC;
    cmcf->ack_delay = NGX_CONF_UNSET_MSEC;
    cmcf->kafka = NGX_CONF_UNSET;
    cmcf->redis_urls = NGX_CONF_UNSET_PTR;
    cmcf->redis_cluster = NGX_CONF_UNSET;
    cmcf->redis_replicas = NGX_CONF_UNSET_UINT;
    cmcf->redis_wait_timeout = NGX_CONF_UNSET_MSEC;

    return cmcf;
}


static char *
ngx_chat_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_chat_main_conf_t  *cmcf = conf;

    if (ngx_chat_stats_add_zone(cf) != NGX_OK
        || ngx_chat_rate_add_zone(cf) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (cmcf->redis_urls == NGX_CONF_UNSET_PTR) {
        ngx_str_t  *u;

        cmcf->redis_urls = ngx_array_create(cf->pool, 1, sizeof(ngx_str_t));
        if (cmcf->redis_urls == NULL) {
            return NGX_CONF_ERROR;
        }

        u = ngx_array_push(cmcf->redis_urls);
        if (u == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_str_set(u, "redis://127.0.0.1:6379");
    }

    ngx_conf_init_value(cmcf->redis_cluster, 0);
    ngx_conf_init_uint_value(cmcf->redis_replicas, 0);
    ngx_conf_init_msec_value(cmcf->redis_wait_timeout, 1000);

    if (cmcf->redis_replicas > 16 || cmcf->redis_wait_timeout == 0
        || cmcf->redis_wait_timeout > 60000)
    {
        /* WAIT 0 ms would block forever; a link's replies stop meanwhile */
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_redis_replicas must be at most 16 and "
                           "chat_redis_wait_timeout between 1ms and 60s");
        return NGX_CONF_ERROR;
    }

    if (ngx_chat_redis_check_urls(cmcf->redis_urls, cmcf->redis_cluster,
                                  cf->log) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    ngx_conf_init_value(cmcf->jwt_leeway, 0);
    ngx_conf_init_value(cmcf->registry_ttl, 60);
    ngx_conf_init_uint_value(cmcf->max_conns_user, 16);
    ngx_conf_init_uint_value(cmcf->shards, 16);
    ngx_conf_init_uint_value(cmcf->node_id, 0);
    ngx_conf_init_value(cmcf->dedup_ttl, 7 * 86400);
    ngx_conf_init_msec_value(cmcf->receipt_delay, 200);
    ngx_conf_init_msec_value(cmcf->ack_delay, 100);

    if (cmcf->shards < 1 || cmcf->shards > 4096) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_shards must be 1 to 4096");
        return NGX_CONF_ERROR;
    }

    ngx_conf_init_value(cmcf->kafka, 0);

    if (cmcf->kafka_topic.len == 0) {
        ngx_str_set(&cmcf->kafka_topic, "chat.in");
    }

    /* HS256 with a short secret is brute-forced offline from any token:
     * at least 256 bits (RFC 7518, 3.2), from either directive */
    if (cmcf->jwt_secret.len && cmcf->jwt_secret.len < 32) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_secret is %uz bytes long; HS256 needs "
                           "at least 32 random bytes (e.g. head -c 32 "
                           "/dev/urandom | base64 > secret)",
                           cmcf->jwt_secret.len);
        return NGX_CONF_ERROR;
    }

    if (cmcf->kafka && cmcf->kafka_brokers.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_queue kafka needs chat_kafka_brokers");
        return NGX_CONF_ERROR;
    }

    if (cmcf->node_id > 31) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_node_id must be 0 to 31");
        return NGX_CONF_ERROR;
    }

    if (cmcf->registry_ttl < 3) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_registry_ttl must be at least 3s");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_chat_create_loc_conf(ngx_conf_t *cf)
{
    ngx_uint_t            i;
    ngx_chat_loc_conf_t  *clcf;

    clcf = ngx_pcalloc(cf->pool, sizeof(ngx_chat_loc_conf_t));
    if (clcf == NULL) {
        return NULL;
    }

    clcf->auth = NGX_CONF_UNSET;
    clcf->user_var = NGX_CONF_UNSET_PTR;
    clcf->origins = NGX_CONF_UNSET_PTR;
    clcf->heartbeat = NGX_CONF_UNSET;
    clcf->idle_timeout = NGX_CONF_UNSET;
    clcf->send_timeout = NGX_CONF_UNSET;
    clcf->max_message = NGX_CONF_UNSET_SIZE;
    clcf->max_body = NGX_CONF_UNSET_UINT;
    clcf->out_frames = NGX_CONF_UNSET_UINT;
    clcf->out_bytes = NGX_CONF_UNSET_SIZE;
    clcf->poll_timeout = NGX_CONF_UNSET;
    clcf->poll_max = NGX_CONF_UNSET;
    for (i = 0; i < NGX_CHAT_ACT_N; i++) {
        clcf->limits[i].rate = NGX_CONF_UNSET_UINT;
        clcf->limits[i].burst = NGX_CONF_UNSET_UINT;
    }

    clcf->typing_interval = NGX_CONF_UNSET_MSEC;

    return clcf;
}


static char *
ngx_chat_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_uint_t            i;
    ngx_chat_loc_conf_t  *prev = parent;
    ngx_chat_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->auth, prev->auth, 0);
    ngx_conf_merge_ptr_value(conf->user_var, prev->user_var, NULL);
    ngx_conf_merge_ptr_value(conf->origins, prev->origins, NULL);
    ngx_conf_merge_value(conf->heartbeat, prev->heartbeat, 30);
    ngx_conf_merge_value(conf->idle_timeout, prev->idle_timeout,
                         conf->heartbeat * 5 / 2);
    ngx_conf_merge_value(conf->send_timeout, prev->send_timeout, 30);
    ngx_conf_merge_size_value(conf->max_message, prev->max_message, 65536);
    ngx_conf_merge_uint_value(conf->max_body, prev->max_body, 1000);
    ngx_conf_merge_uint_value(conf->out_frames, prev->out_frames, 1024);
    ngx_conf_merge_size_value(conf->out_bytes, prev->out_bytes, 1024 * 1024);
    ngx_conf_merge_value(conf->poll_timeout, prev->poll_timeout, 25);
    ngx_conf_merge_value(conf->poll_max, prev->poll_max, 60);
    for (i = 0; i < NGX_CHAT_ACT_N; i++) {
        ngx_conf_merge_uint_value(conf->limits[i].rate, prev->limits[i].rate,
                                  ngx_chat_limit_defaults[i].rate);
        ngx_conf_merge_uint_value(conf->limits[i].burst,
                                  prev->limits[i].burst,
                                  ngx_chat_limit_defaults[i].burst);
    }

    ngx_conf_merge_msec_value(conf->typing_interval, prev->typing_interval,
                              2000);

    if (conf->heartbeat < 1 || conf->idle_timeout <= conf->heartbeat) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_idle_timeout must be longer than "
                           "chat_heartbeat (at least 1s)");
        return NGX_CONF_ERROR;
    }

    if (conf->poll_timeout > conf->poll_max) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_poll_timeout exceeds chat_poll_max_timeout");
        return NGX_CONF_ERROR;
    }

    if (conf->max_body < 1 || conf->max_body > 100000) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_max_body must be 1 to 100000 characters");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_chat_check_max_message(ngx_conf_t *cf, void *post, void *data)
{
    size_t  *sp = data;

    if (*sp < 128 || *sp > 65536) {
        return "must be between 128 and 64k";
    }

    return NGX_CONF_OK;
}


static char *
ngx_chat_set_outbound(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_loc_conf_t  *clcf = conf;
    ngx_str_t            *value;
    ngx_int_t             n;
    ssize_t               size;

    if (clcf->out_frames != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    n = ngx_atoi(value[1].data, value[1].len);
    if (n < 1 || n > 1000000) {
        return "takes a number of frames (1 to 1000000) and a size";
    }

    size = ngx_parse_size(&value[2]);
    if (size < 1024 || size > 64 * 1024 * 1024) {
        return "takes a number of frames and a size (1k to 64m)";
    }

    clcf->out_frames = (ngx_uint_t) n;
    clcf->out_bytes = (size_t) size;

    return NGX_CONF_OK;
}


/* chat_redis <url> [<url> ...]: one node, or the seeds of a cluster
 * (chat_redis_cluster on); checked once the block is read */
static char *
ngx_chat_set_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t  *cmcf = conf;
    ngx_str_t             *value, *u;
    ngx_uint_t             i;

    if (cmcf->redis_urls != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    cmcf->redis_urls = ngx_array_create(cf->pool, cf->args->nelts - 1,
                                        sizeof(ngx_str_t));
    if (cmcf->redis_urls == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {
        u = ngx_array_push(cmcf->redis_urls);
        if (u == NULL) {
            return NGX_CONF_ERROR;
        }

        *u = value[i];
    }

    return NGX_CONF_OK;
}


static char *
ngx_chat_set_queue(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t  *cmcf = conf;
    ngx_str_t             *value;

    if (cmcf->kafka != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 5 && ngx_strncmp(value[1].data, "redis", 5) == 0) {
        cmcf->kafka = 0;

    } else if (value[1].len == 5
               && ngx_strncmp(value[1].data, "kafka", 5) == 0)
    {
        cmcf->kafka = 1;

    } else {
        return "must be redis or kafka";
    }

    return NGX_CONF_OK;
}


static char *
ngx_chat_limit_value(ngx_chat_limit_t *l, ngx_str_t *rv, ngx_str_t *bv)
{
    ngx_int_t  rate, burst;

    if (l->rate != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    rate = ngx_atoi(rv->data, rv->len);
    burst = ngx_atoi(bv->data, bv->len);

    if (rate == NGX_ERROR || burst == NGX_ERROR || rate > 6000000
        || burst > 1000000 || (rate > 0 && burst < 1))
    {
        return "takes a number a minute and a burst of at least 1";
    }

    l->rate = (ngx_uint_t) rate;
    l->burst = (ngx_uint_t) burst;

    return NGX_CONF_OK;
}


/* chat_rate_limit <messages a minute> <burst>; 0 0 turns it off (the send
 * budget; the same as chat_limit send) */
static char *
ngx_chat_set_rate(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_loc_conf_t  *clcf = conf;
    ngx_str_t            *value = cf->args->elts;

    return ngx_chat_limit_value(&clcf->limits[NGX_CHAT_ACT_SEND], &value[1],
                                &value[2]);
}


/* chat_limit send|typing|read|ack|watch|presence <a minute> <burst>; */
static char *
ngx_chat_set_limit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_loc_conf_t  *clcf = conf;
    ngx_str_t            *value = cf->args->elts;
    ngx_uint_t            i;

    for (i = 0; i < NGX_CHAT_ACT_N; i++) {
        if (value[1].len == ngx_chat_limit_names[i].len
            && ngx_strncmp(value[1].data, ngx_chat_limit_names[i].data,
                           value[1].len) == 0)
        {
            return ngx_chat_limit_value(&clcf->limits[i], &value[2],
                                        &value[3]);
        }
    }

    return "takes send, typing, read, ack, watch or presence";
}


static char *
ngx_chat_set_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    static struct {
        ngx_str_t   name;
        ngx_uint_t  which;
    } apis[] = {
        { ngx_string("send"), NGX_CHAT_LOC_SEND },
        { ngx_string("ack"), NGX_CHAT_LOC_ACK },
        { ngx_string("read"), NGX_CHAT_LOC_READ },
        { ngx_string("typing"), NGX_CHAT_LOC_TYPING },
        { ngx_string("presence"), NGX_CHAT_LOC_PRESENCE },
    };

    ngx_str_t      *value;
    ngx_uint_t      i;
    ngx_command_t   c;

    value = cf->args->elts;

    for (i = 0; i < sizeof(apis) / sizeof(apis[0]); i++) {
        if (apis[i].name.len == value[1].len
            && ngx_strncmp(apis[i].name.data, value[1].data, value[1].len)
               == 0)
        {
            c = *cmd;
            c.post = (void *) apis[i].which;
            return ngx_chat_set_handler(cf, &c, conf);
        }
    }

    return "must be send, ack, read, typing or presence";
}


static char *
ngx_chat_set_handler(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_loc_conf_t       *clcf = conf;
    ngx_http_core_loc_conf_t  *hclcf;

    if (clcf->handlers) {
        return "is duplicate or conflicts with another chat handler";
    }

    clcf->handlers = (ngx_uint_t) cmd->post;

    if (clcf->handlers != NGX_CHAT_LOC_STATUS) {
        ngx_chat_enabled = 1;
    }

    hclcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    hclcf->handler = ngx_chat_handler;

    return NGX_CONF_OK;
}


static char *
ngx_chat_set_secret_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t  *cmcf = conf;

    u_char           *p;
    ssize_t           n;
    ngx_str_t        *value;
    ngx_file_t        file;
    ngx_file_info_t   fi;

    if (cmcf->jwt_secret.len) {
        return "is duplicate (chat_jwt_secret already set)";
    }

    value = cf->args->elts;

    if (ngx_conf_full_name(cf->cycle, &value[1], 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&file, sizeof(ngx_file_t));
    file.name = value[1];
    file.log = cf->log;

    file.fd = ngx_open_file(value[1].data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (file.fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_open_file_n " \"%V\" failed", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (ngx_fd_info(file.fd, &fi) == NGX_FILE_ERROR
        || ngx_file_size(&fi) == 0 || ngx_file_size(&fi) > 4096)
    {
        ngx_close_file(file.fd);
        return "must name a readable file of 1 to 4096 bytes";
    }

    p = ngx_pnalloc(cf->pool, (size_t) ngx_file_size(&fi));
    if (p == NULL) {
        ngx_close_file(file.fd);
        return NGX_CONF_ERROR;
    }

    n = ngx_read_file(&file, p, (size_t) ngx_file_size(&fi), 0);
    ngx_close_file(file.fd);

    if (n != (ssize_t) ngx_file_size(&fi)) {
        return "could not be read whole";
    }

    /* a trailing newline is not part of the secret */
    while (n > 0 && (p[n - 1] == '\n' || p[n - 1] == '\r')) {
        n--;
    }

    if (n == 0) {
        return "is empty";
    }

    cmcf->jwt_secret.data = p;
    cmcf->jwt_secret.len = n;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_chat_handler(ngx_http_request_t *r)
{
    ngx_chat_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);

    switch (clcf->handlers) {

    case NGX_CHAT_LOC_STATUS:
        return ngx_chat_status_handler(r);

    case NGX_CHAT_LOC_WEBSOCKET:
        return ngx_chat_ws_handler(r);

    case NGX_CHAT_LOC_POLL:
        return ngx_chat_poll_handler(r);

    default:
        return ngx_chat_api_handler(r, clcf->handlers);
    }
}
