/*
 * chat-worker: the sidecar binary. One process runs one role:
 *   --check    connect to Redis, Kafka and MongoDB, prove each works, exit
 *   fanout     queue -> inboxes -> nginx workers holding the connections
 *   persist    queue -> MongoDB (messages, conversations, receipts)
 *   rest       HTTP reads behind nginx's proxy_pass (history, conversations)
 *
 * The internal contract (keys, queue entries, recipients, publish payload,
 * MongoDB schema) is docs/PIPELINE.md.
 */
#ifndef CHAT_WORKER_H
#define CHAT_WORKER_H

#include <stddef.h>
#include <stdint.h>

#include "chat_lua.h"    /* generated from lua/ (lua/gen.sh) */
#include "chat_shard.h"  /* the pure code shared with the module */
#include "chat_entry.h"  /* queue entries and delivery payloads */

#define CW_STR 512

typedef struct {
    char  redis_url[CW_STR];    /* one URL, or several (comma-separated): cluster seeds */
    int   redis_cluster;        /* 1: Redis Cluster (default when redis_url lists several) */
    int   redis_replicas;       /* fanout: WAIT for this many replicas before acknowledging (0: no WAIT) */
    int   redis_wait_ms;        /* ... at most this long */
    char  kafka_brokers[CW_STR];
    char  mongo_uri[CW_STR];
    char  queue[16];            /* "redis" or "kafka" */
    char  rest_listen[128];     /* unix:/path or host:port */
    char  rest_secret_file[CW_STR]; /* the X-Chat-Secret nginx sends (required on TCP) */
    int   rest_socket_mode;     /* permissions of the unix socket (default 0600) */
    char  node_id[64];          /* names this process in Redis (heartbeat key) */
    int   shards;               /* conversation shards, equal to nginx's chat_shards */
    int   fanout_workers;       /* fan-out processes sharing the shards (Redis queue) */
    int   fanout_index;         /* which of them this one is (its consumer name) */
    int   fanout_lease_ms;      /* Redis queue: a shard's lease lasts this long (0: static split) */
    int   fanout_lease_renew_ms; /* ... renewed (and free shards claimed) this often */
    int   inbox_max;            /* events kept per user inbox */
    int   retention_days;       /* inbox TTL */
    int   delete_window_s;      /* rest: a sender may delete for everyone this long after sending */
    int   sweep_batch;          /* persist: messages the sweeper removes per round at most */
    int   sweep_rate;           /* ... and per second at most */
    int   sweep_day_ms;         /* the length of a day of the days:N policy (tests shorten it) */
    int   sweep_timeout_ms;     /* the sweeper's MongoDB socket timeout (a FerretDB range delete scans) */
    int   claim_idle_ms;        /* claim others' pending entries idle this long */
    int   gather_ms;            /* persist, push: wait this long after a small batch */
    int   fanout_gather_ms;     /* fanout: the same, on the delivery path (short) */
    int   queue_commit_ms;      /* Redis queue: a shard's position committed at most this often (0: per batch) */
    int   persist_window_ms;    /* persist: a batch is what arrives in this window */
    int   persist_state_delay_ms; /* persist: a conversation's state is written this long after its change */
    int   batch;                /* entries read per stream (Redis) or per poll (Kafka) */
    int   group_max_members;    /* active members a group may have (409 above) */
    int   group_push_limit;     /* groups up to this size get inbox copies (push); above: pull */
    int   group_rate[2];        /* group creations and membership changes per acting user:
                                   per minute, burst (0 0: off) */
    int   group_adds[2];        /* times one user may be added to groups by others:
                                   per hour, per day (0 0: off) */
    int   delete_rate[2];       /* deletions (DELETE /chat/messages, /chat/conversations)
                                   per user: per minute, burst (0 0: off) */
    char  dev_token_secret_file[CW_STR]; /* rest: serve GET /dev/token (local dev stack only) */
    /* push role (workers/README.md, "push") */
    int   push_delay_ms;        /* a device that has not acked within this gets a notification */
    int   push_buckets;         /* due sets chat:{pq<b>}:due */
    int   push_concurrency;     /* requests in flight per provider */
    int   push_lease_ms;        /* a claimed due entry comes back after this (crash) */
    int   push_timeout_ms;      /* one provider request */
    int   push_ttl;             /* s: how long a provider keeps an undelivered notification */
    int   push_max_age_ms;      /* older queue entries notify nobody (a new consumer group) */
    char  push_ca_file[CW_STR]; /* CA bundle for the providers (default: the system's) */
    char  webpush_vapid_key[CW_STR];   /* PEM P-256 private key */
    char  webpush_subject[CW_STR];     /* mailto: or https: contact */
    char  webpush_allow[CW_STR];       /* host suffixes endpoints may have (comma-separated) */
    char  apns_key_file[CW_STR];       /* the .p8 key */
    char  apns_key_id[32];
    char  apns_team_id[32];
    char  apns_url[CW_STR];
    char  apns_sandbox_url[CW_STR];
    char  fcm_service_account[CW_STR]; /* service-account JSON */
    char  fcm_url[CW_STR];
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
int64_t cw_mono_ms(void);
void    cw_sleep_ms(int ms);       /* returns early when cw_stop is set */
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
int  cw_role_push(const cw_config_t *cf);

/* redis.c: the workers' Redis client, one node or a Redis Cluster
 * (hiredis-like: commands, a pipeline whose replies come back in the order
 * of the commands, whatever node each went to) */
struct redisContext;
struct redisReply;
typedef struct cw_redis_s cw_redis_t;
cw_redis_t *cw_redis_connect(const cw_config_t *cf, int timeout_ms, char *err, size_t errlen);
void        cw_redis_free(cw_redis_t *c);
struct redisReply *cw_redis_command(cw_redis_t *c, const char *fmt, ...);
struct redisReply *cw_redis_command_argv(cw_redis_t *c, int argc, const char **argv, const size_t *lens);
int         cw_redis_append(cw_redis_t *c, const char *fmt, ...);
int         cw_redis_append_argv(cw_redis_t *c, int argc, const char **argv, const size_t *lens);
int         cw_redis_get_reply(cw_redis_t *c, struct redisReply **reply);   /* REDIS_OK / REDIS_ERR */
int         cw_redis_err(const cw_redis_t *c);             /* the client failed: drop it */
const char *cw_redis_errstr(const cw_redis_t *c);
int         cw_redis_is_cluster(const cw_redis_t *c);
const char *cw_redis_publish_cmd(const cw_redis_t *c);     /* "PUBLISH", or on a cluster "SPUBLISH" (sharded pub/sub) */
uint64_t    cw_redis_redirects(const cw_redis_t *c);       /* MOVED/ASK followed */
/* WAIT n on every node written to since the last call: the fewest replicas
 * that acknowledged (n when none was written to), -1 when the client failed */
int         cw_redis_wait(cw_redis_t *c, int n, int timeout_ms);
int         cw_redis_url_count(const char *list);          /* URLs in a comma-separated redis_url */
/* cluster: a connection of its own to the master of key's slot, and a
 * redirect seen on such a connection (the map learns it) */
struct redisContext *cw_redis_dial_for(cw_redis_t *c, const char *key, size_t klen);
void        cw_redis_note(cw_redis_t *c, const struct redisReply *r);

/* heartbeat.c: chat:worker:<role>:<node> with a TTL while the role runs */
typedef struct {
    char     key[160];
    int64_t  next;
} cw_heartbeat_t;
void cw_heartbeat_init(cw_heartbeat_t *hb, const cw_config_t *cf, const char *role);
/* Refreshes the key when due (one SET); returns -1 when the connection failed. */
int  cw_heartbeat_tick(cw_heartbeat_t *hb, cw_redis_t *c);
void cw_heartbeat_clear(cw_heartbeat_t *hb, cw_redis_t *c);

/* Exponential backoff: 100 ms doubling to 5 s. */
typedef struct { int ms; } cw_backoff_t;
void cw_backoff_reset(cw_backoff_t *b);
void cw_backoff_wait(cw_backoff_t *b);
int  cw_backoff_ms(const cw_backoff_t *b);


/* ---- queue entries (entry.c) --------------------------------------------- */

/* libchat's limits (chat_proto.h), under the workers' names */
#define CW_ID_MAX    CHAT_ID_MAX         /* user and group ids */
#define CW_DEV_MAX   CHAT_DEV_ID_MAX
#define CW_CONV_MAX  CHAT_CONV_MAX
#define CW_FIELD_MAX 256         /* a field of chat:{u:U}:last */

/* The one integer range of seqs, cursors and pointers everywhere (module,
 * Lua scripts, workers, clients): 0 .. 2^53-1, JavaScript's safe integers,
 * so that no client loses precision. A queue entry with a number outside
 * it is not processed: it goes to the dead-letter queue. */
#define CW_INT_MAX   CHAT_INT_MAX

/* entry types: libchat's (chat_entry.h) */
enum { CW_T_MSG = CHAT_ENTRY_MSG, CW_T_RECEIPT = CHAT_ENTRY_RECEIPT, CW_T_GROUP = CHAT_ENTRY_GROUP,
       CW_T_DEL = CHAT_ENTRY_DEL };

typedef struct {
    char        qid[48];         /* stream entry id, or "<partition>@<offset>" */
    int         shard;           /* stream's shard, or the Kafka partition */
    int64_t     offset;          /* Kafka offset */
    int         valid;           /* every field parsed and consistent */
    const char *why;             /* what is wrong when !valid */
    int         type;            /* CW_T_MSG or CW_T_RECEIPT */
    char        conv[CW_CONV_MAX + 1];
    char        a[CW_ID_MAX + 1];        /* direct conversation d:a:b */
    char        b[CW_ID_MAX + 1];
    int         is_group;
    char        from[CW_ID_MAX + 1];
    char        dev[CW_DEV_MAX + 1];
    char        to[CW_ID_MAX + 1];
    char        group[CW_ID_MAX + 1];
    char        st[CHAT_ENTRY_WORD_MAX + 1];     /* receipt status: delivered or read */
    int64_t     seq;
    int64_t     prev;            /* receipt: the user's pointer before it (0 if absent) */
    char        event[CHAT_ENTRY_WORD_MAX + 1];  /* group: created, added or removed */
    char       *rcpt;            /* group: the users as on the wire, space-separated (malloc'd) */
    char       *rcpt_users;      /* the same, each NUL-terminated, one after the other */
    int         n_rcpt;          /* how many */
    char       *state;           /* group: the group after the change, JSON (malloc'd) */
    char       *ev;              /* event JSON without cursor (malloc'd) */
    size_t      ev_len;
    /* the entry as it came, kept only when it could not be parsed (for
     * the dead-letter queue): Redis, name/value pairs in raw[0..2n);
     * Kafka, raw[0] is the record's value (n_raw 1, raw_kafka set) */
    char      **raw;
    size_t     *raw_len;
    int         n_raw;
    int         raw_kafka;
    int         dead;            /* recorded in the dead-letter queue */
} cw_entry_t;

typedef struct {
    cw_entry_t *e;
    int         n;
    int         cap;
} cw_batch_t;

typedef struct {
    const char *user;
    const char *skip_dev;        /* NULL: every device */
} cw_rcpt_t;

int  cw_valid_id(const char *s, size_t len, size_t max);
int  cw_parse_conv(const char *conv, char *a, char *b, int *is_group);
void cw_entry_reset(cw_entry_t *e);
int  cw_entry_field(cw_entry_t *e, const char *name, size_t nlen,
                    const char *val, size_t vlen);
void cw_entry_finish(cw_entry_t *e);
int  cw_entry_from_json(cw_entry_t *e, const char *json, size_t len);
/* The inbox idempotency field of an entry's recipients (one per entry). */
void cw_entry_inbox_field(const cw_entry_t *e, char field[CW_FIELD_MAX]);
int  cw_recipients(const cw_entry_t *e, cw_rcpt_t out[2]);

/* Keeps a copy of what could not be parsed (for the dead-letter queue). */
int  cw_entry_keep_raw(cw_entry_t *e, const char *const *v, const size_t *len, int n, int kafka);
/* The parsed entry as libchat's view (strings point into e). */
void cw_entry_view(const cw_entry_t *e, chat_entry_t *v);

cw_entry_t *cw_batch_add(cw_batch_t *b);
void cw_batch_clear(cw_batch_t *b);
void cw_batch_free(cw_batch_t *b);


/* ---- the queue (queue.c): Redis Streams read from positions, or Kafka ----- */

typedef struct cw_queue_s cw_queue_t;

/* group: the role, "fanout", "persist" or "push". shards: the shards this
 * consumer reads (Redis), ignored for Kafka where the consumer group
 * assigns partitions. */
cw_queue_t *cw_queue_new(const cw_config_t *cf, const char *group,
                         const int *shards, int nshards, int trim);
void cw_queue_free(cw_queue_t *q);
int  cw_queue_is_kafka(const cw_queue_t *q);

/* Redis mode: after (re)connecting, read our committed positions (made the
 * first time): whatever was read and not acknowledged is read again. Every
 * caller sets up again (reconnects) after a batch it could not process, so
 * no batch is left behind unacknowledged while later ones are. Returns -1
 * on a connection error. */
int  cw_queue_setup(cw_queue_t *q, cw_redis_t *c);

/* Fills b (cleared first) with the next entries; waits up to block_ms.
 * Returns the number of entries, or -1 when the connection failed. */
int  cw_queue_fetch(cw_queue_t *q, cw_redis_t *c, cw_batch_t *b, int block_ms);

/* Redis mode: appends the commits of b's positions to c's pipeline, at
 * most one per shard per 100 ms (the others are made by a later ack or by
 * cw_queue_maintain); returns the number of replies to read. Kafka mode:
 * commits b's offsets asynchronously; returns 0, or -1 when the commit
 * failed. */
int  cw_queue_ack(cw_queue_t *q, cw_redis_t *c, const cw_batch_t *b);

/* Redis mode: commits the processed positions not committed yet (all, or
 * those due and those of shards being given back), waiting for the
 * replies; before a lease is given back and when a role stops. -1: a
 * connection error. */
int  cw_queue_flush(cw_queue_t *q, cw_redis_t *c, int all);

/* Redis mode: positions due for commit, periodic stream trimming. Returns
 * -1 on a connection error. */
int  cw_queue_maintain(cw_queue_t *q, cw_redis_t *c);

/* Shard leases (Redis queue, the fanout role with fanout_lease_ms > 0):
 * the queue reads only the shards workers/lease.c says we hold. s is a
 * shard number. */
int  cw_queue_leases(const cw_queue_t *q);
/* our lease holder name (kept by the caller): commits are fenced by it */
void cw_queue_set_owner(cw_queue_t *q, const char *owner);
/* 0: not ours, 1: served, 2: being given back (no new read) */
int  cw_queue_shard_state(const cw_queue_t *q, int s);
/* a blocking read of the shard is out (its reply not yet taken) */
int  cw_queue_reading(const cw_queue_t *q, int s);
/* our lease of s is sure until this monotonic time */
void cw_queue_valid(cw_queue_t *q, int s, int64_t until);
/* we hold s now: read it from its committed position; -1: connection error */
int  cw_queue_take(cw_queue_t *q, cw_redis_t *c, int s, int64_t until);
void cw_queue_drain(cw_queue_t *q, int s);
void cw_queue_drop(cw_queue_t *q, int s);

/* ---- the fan-out worker's shard leases (lease.c) ------------------------- */

typedef struct {
    const cw_config_t *cf;
    cw_queue_t        *q;
    char               owner[192];
    int64_t            next;           /* monotonic ms of the next renewal */
    int                alive;          /* fan-out workers alive at the last renewal */
    int                held;           /* shards served */
    int               *cand;           /* scratch: shards tried in one round */
    uint64_t           n_taken, n_lost, n_given;
} cw_lease_t;

int  cw_lease_init(cw_lease_t *l, const cw_config_t *cf, cw_queue_t *q);
/* Renews our leases, gives back a surplus, takes free shards up to our
 * share; on its schedule (fanout_lease_renew_ms). -1: connection error. */
int  cw_lease_tick(cw_lease_t *l, cw_redis_t *c);
/* A clean stop: every lease given back, and we count as gone. */
void cw_lease_release(cw_lease_t *l, cw_redis_t *c);
void cw_lease_free(cw_lease_t *l);


/* ---- the dead-letter queue (dlq.c) --------------------------------------- */

typedef struct cw_dlq_s cw_dlq_t;
cw_dlq_t *cw_dlq_new(const cw_config_t *cf, const char *role);
void      cw_dlq_free(cw_dlq_t *d);
/* Records an entry the role cannot process (log line, counter) and marks it
 * dead; 0 when it is durably recorded (or was already), -1 when not: the
 * entry must stay unacknowledged. c: the role's Redis connection (Redis
 * queue: required; Kafka: only for the counter, may be NULL). */
int       cw_dlq_put(cw_dlq_t *d, cw_redis_t *c, cw_entry_t *e, const char *why);
uint64_t  cw_dlq_total(const cw_dlq_t *d);


/* ---- MongoDB helpers (mongo.c) ------------------------------------------ */

struct _mongoc_client_t;
struct _bson_t;
struct json_t;
void cw_mongo_log_init(void);
struct _mongoc_client_t *cw_mongo_client_timeout(const cw_config_t *cf, const char *app, char *db, size_t dblen,
                                                int socket_timeout_ms);
struct _mongoc_client_t *cw_mongo_client(const cw_config_t *cf, const char *app,
                                         char *db, size_t dblen);
/* A BSON document as a JSON value (strings, numbers, booleans, null,
 * documents and arrays); key "_id" is renamed to "id". */
struct json_t *cw_bson_to_json(const struct _bson_t *doc);

/* ---- groups in the rest role (groups.c) --------------------------------- */

/* The handlers answer with an HTTP status and a JSON body (*out, the
 * caller's to free). */
void cw_groups_init(const cw_config_t *cf);
/* From the rest role's loop: the rebuild of Redis group state from MongoDB
 * (until it succeeded once; client NULL: not yet), and with the Kafka queue
 * the produce of membership records whose first produce failed. */
void cw_groups_tick(struct _mongoc_client_t *client, const char *db);
void cw_groups_close(void);
/* POST /chat/groups, GET /chat/groups/G, POST /chat/groups/G/members */
int  cw_groups_request(const char *method, const char *path, const char *user,
                       const char *body, size_t body_len, struct json_t **out);
/* 1: user is an active member of group (since: its since seq), 0: not,
 * -1: Redis unavailable */
int  cw_group_member(const char *group, const char *user, int64_t *since);
/* one token of the user's rest budget bucket (chat:{u:U}:rl:<bucket>):
 * 0, or 429 / 503 with the error in *out */
int  cw_rest_budget(const char *user, const char *bucket, const int limit[2], const char *what,
                    struct json_t **out);
/* GET /chat/receipts for a parsed conversation (a, b as cw_parse_conv) */
int  cw_receipts(const char *conv, const char *a, const char *b, int is_group, int64_t seq,
                 const char *user, struct json_t **out);

/* ---- settings and push registrations in the rest role (settings.c, devices.c) */

cw_redis_t *cw_rest_redis(void);      /* connected, or NULL */
void cw_rest_redis_failed(void);               /* drop it after an I/O error */
void cw_settings_init(const cw_config_t *cf);
void cw_settings_close(void);
int  cw_tz_valid(const char *tz);
/* GET/PUT /chat/settings, PUT/DELETE /chat/settings/mute/<conv> */
int  cw_settings_request(const char *method, const char *path, const char *user, const char *body,
                         size_t body_len, struct _mongoc_client_t *client, const char *db, struct json_t **out);
/* PUT/DELETE /chat/devices/<device>/push, GET /chat/devices */
int  cw_devices_request(const char *method, const char *path, const char *user, const char *device,
                        const char *body, size_t body_len, struct _mongoc_client_t *client, const char *db,
                        struct json_t **out);

/* ---- deletions (delete.c; docs/PROTOCOL.md "Retention and deletion") ---- */

/* rest: DELETE /chat/messages/<id>?conv=C[&for=me] (queue entry t=del) */
int  cw_delete_request(const cw_config_t *cf, const char *method, const char *path, const char *query,
                       const char *user, const char *device, struct _mongoc_client_t *client, const char *db,
                       struct json_t **out);
/* rest: DELETE /chat/conversations/<conv> (for me, up to its last seq) */
int  cw_clear_request(const cw_config_t *cf, const char *method, const char *path, const char *user,
                      const char *device, struct json_t **out);
/* fanout: appends recipient user's tombstone script for a deletion entry
 * (1 command appended, 0 none) */
int  cw_tombstone_append(cw_redis_t *c, const cw_entry_t *e, const char *user);
/* persist: applies the batch's deletions to MongoDB (after its messages
 * and conversations were written); 0, or -1 to retry the batch */
struct _mongoc_collection_t;
int  cw_persist_deletions(struct _mongoc_collection_t *messages, struct _mongoc_collection_t *conversations,
                          struct _mongoc_collection_t *groups, const cw_batch_t *b);
/* the `last` of a conversations/groups document loses its body when it is message id */
int  cw_strip_last(struct _mongoc_collection_t *coll, const char *docid, const char *id);

/* ---- expiry in the persist role (sweep.c) ---- */
typedef struct cw_sweep_s cw_sweep_t;
struct _mongoc_client_t;
cw_sweep_t *cw_sweep_new(const cw_config_t *cf);
void cw_sweep_free(cw_sweep_t *s);
int  cw_sweep_plan(cw_sweep_t *s, cw_redis_t *c, const cw_batch_t *b, struct _bson_t **docs, const int64_t *ts);
int  cw_sweep_commit(cw_sweep_t *s, cw_redis_t *c);
/* the sweep in its own thread, with its own Redis and MongoDB clients:
 * a FerretDB range delete scans the collection (tens of seconds at a
 * million documents) and must not stall persistence */
int  cw_sweep_start(cw_sweep_t *s);
void cw_sweep_ttl_index(struct _mongoc_client_t *client, const char *db);

/* rest (groups.c's producer): one record to chat.in partition s, waited for */
int  cw_rest_produce(int s, const char *key, const char *val, size_t len);

/* scripts.c: the Redis scripts of lua/ (chat_lua[]); cw_lua_load (redis.c)
 * loads them on every node of the client */
const char *cw_lua_sha(int id);
int cw_lua_load_ctx(struct redisContext *c);
int cw_lua_load(cw_redis_t *c);

#endif
