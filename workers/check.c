/*
 * chat-worker --check: prove that each server the product depends on works,
 * not only that its port is open. Redis: PING and a SET/GET round trip.
 * Kafka: produce one record (acks=all) and consume exactly that record back.
 * MongoDB: insert one document with write concern majority, read it back,
 * delete it.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <librdkafka/rdkafka.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void
nonce(char *buf, size_t len)
{
    snprintf(buf, len, "check-%lld-%d", (long long) cw_now_ms(), (int) getpid());
}

int
cw_check_redis(const cw_config_t *cf, char *msg, size_t len)
{
    char          err[256], key[96], val[64];
    cw_redis_t *c;
    redisReply   *r;
    int           ok = 0;
    int64_t       t0 = cw_now_ms();

    c = cw_redis_connect(cf, 3000, err, sizeof(err));
    if (c == NULL) {
        snprintf(msg, len, "%s", err);
        return -1;
    }
    nonce(val, sizeof(val));
    snprintf(key, sizeof(key), "chat:check:%s", val);
    r = cw_redis_command(c, "SET %s %s EX 30", key, val);
    if (r && r->type == REDIS_REPLY_STATUS) {
        freeReplyObject(r);
        r = cw_redis_command(c, "GET %s", key);
        ok = r && r->type == REDIS_REPLY_STRING && strcmp(r->str, val) == 0;
    }
    if (r) freeReplyObject(r);
    if (ok) {
        r = cw_redis_command(c, "DEL %s", key);
        if (r) freeReplyObject(r);
        r = cw_redis_command(c, "INFO server");
        const char *ver = r && r->type == REDIS_REPLY_STRING ? strstr(r->str, "redis_version:") : NULL;
        char v[32] = "?";
        if (ver) sscanf(ver + 14, "%31[0-9.]", v);
        snprintf(msg, len, "redis %s at %s, SET/GET round trip %lld ms", v, cf->redis_url,
                 (long long) (cw_now_ms() - t0));
        if (r) freeReplyObject(r);
    } else {
        snprintf(msg, len, "SET/GET round trip failed: %s", cw_redis_errstr(c));
    }
    cw_redis_free(c);
    return ok ? 0 : -1;
}

typedef struct {
    int      done;
    int      err;
    int32_t  partition;
    int64_t  offset;
    char     errstr[256];
} dr_state_t;

static void
on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    dr_state_t *st = m->_private;
    (void) rk; (void) opaque;
    st->done = 1;
    st->err = m->err;
    st->partition = m->partition;
    st->offset = m->offset;
    if (m->err) snprintf(st->errstr, sizeof(st->errstr), "%s", rd_kafka_err2str(m->err));
}

int
cw_check_kafka(const cw_config_t *cf, char *msg, size_t len)
{
    char                 err[512], payload[64];
    const char          *topic = "chat.check";
    rd_kafka_conf_t     *conf;
    rd_kafka_t          *p = NULL, *c = NULL;
    dr_state_t           st = {0};
    rd_kafka_topic_partition_list_t *tpl;
    int64_t              t0 = cw_now_ms(), deadline;
    int                  found = 0;

    if (cf->kafka_brokers[0] == '\0') {
        snprintf(msg, len, "no kafka_brokers configured");
        return -1;
    }
    nonce(payload, sizeof(payload));

    conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", cf->kafka_brokers, err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "acks", "all", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "enable.idempotence", "true", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "message.timeout.ms", "15000", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "log_level", "3", err, sizeof(err)) != RD_KAFKA_CONF_OK)
    {
        snprintf(msg, len, "producer config: %s", err);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    if (p == NULL) {
        snprintf(msg, len, "producer: %s", err);
        return -1;
    }
    if (rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(0),
                          RD_KAFKA_V_VALUE(payload, strlen(payload)),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                          RD_KAFKA_V_OPAQUE(&st), RD_KAFKA_V_END) != RD_KAFKA_RESP_ERR_NO_ERROR)
    {
        snprintf(msg, len, "produce failed");
        rd_kafka_destroy(p);
        return -1;
    }
    rd_kafka_flush(p, 20000);
    rd_kafka_destroy(p);
    if (!st.done || st.err) {
        snprintf(msg, len, "produce to %s not acknowledged: %s", cf->kafka_brokers,
                 st.done ? st.errstr : "timed out");
        return -1;
    }

    /* Read back exactly the record we wrote. */
    conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", cf->kafka_brokers, err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "group.id", "chat-check", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "log_level", "3", err, sizeof(err)) != RD_KAFKA_CONF_OK)
    {
        snprintf(msg, len, "consumer config: %s", err);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    c = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof(err));
    if (c == NULL) {
        snprintf(msg, len, "consumer: %s", err);
        return -1;
    }
    rd_kafka_poll_set_consumer(c);
    tpl = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(tpl, topic, st.partition)->offset = st.offset;
    rd_kafka_assign(c, tpl);
    rd_kafka_topic_partition_list_destroy(tpl);
    deadline = cw_now_ms() + 15000;
    while (!found && cw_now_ms() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(c, 200);
        if (m == NULL) continue;
        if (!m->err && m->len == strlen(payload) && memcmp(m->payload, payload, m->len) == 0) {
            found = 1;
        }
        rd_kafka_message_destroy(m);
    }
    rd_kafka_consumer_close(c);
    rd_kafka_destroy(c);
    if (!found) {
        snprintf(msg, len, "produced %s[%d]@%lld but could not consume it back",
                 topic, (int) st.partition, (long long) st.offset);
        return -1;
    }
    snprintf(msg, len, "kafka at %s (librdkafka %s), produce+consume %s[%d]@%lld in %lld ms",
             cf->kafka_brokers, rd_kafka_version_str(), topic, (int) st.partition,
             (long long) st.offset, (long long) (cw_now_ms() - t0));
    return 0;
}

/* FerretDB does not implement endSessions; libmongoc warns about it on every
 * client shutdown. Everything else libmongoc logs is passed on. */
static void
mongo_log(mongoc_log_level_t level, const char *domain, const char *message, void *data)
{
    (void) data;
    if (strstr(message, "endSessions") != NULL) return;
    mongoc_log_default_handler(level, domain, message, NULL);
}

int
cw_check_mongo(const cw_config_t *cf, char *msg, size_t len)
{
    mongoc_client_t        *client;
    mongoc_collection_t    *coll;
    mongoc_uri_t           *uri;
    mongoc_write_concern_t *wc;
    mongoc_cursor_t        *cur;
    bson_error_t            error;
    bson_t                 *doc, *filter, opts = BSON_INITIALIZER;
    const bson_t           *got;
    const char             *db;
    char                    id[64];
    int                     found = 0, rc = -1;
    int64_t                 t0 = cw_now_ms();

    if (cf->mongo_uri[0] == '\0') {
        snprintf(msg, len, "no mongo_uri configured");
        return -1;
    }
    mongoc_log_set_handler(mongo_log, NULL);
    uri = mongoc_uri_new_with_error(cf->mongo_uri, &error);
    if (uri == NULL) {
        snprintf(msg, len, "bad mongo uri: %s", error.message);
        return -1;
    }
    mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, 5000);
    db = mongoc_uri_get_database(uri);
    if (db == NULL) db = "chat";
    client = mongoc_client_new_from_uri(uri);
    if (client == NULL) {
        snprintf(msg, len, "mongoc client creation failed");
        mongoc_uri_destroy(uri);
        return -1;
    }
    mongoc_client_set_appname(client, "chat-worker-check");
    coll = mongoc_client_get_collection(client, db, "check");
    nonce(id, sizeof(id));
    doc = BCON_NEW("_id", BCON_UTF8(id), "ts", BCON_INT64(cw_now_ms()));
    wc = mongoc_write_concern_new();
    mongoc_write_concern_set_wmajority(wc, 5000);
    mongoc_write_concern_append(wc, &opts);
    if (!mongoc_collection_insert_one(coll, doc, &opts, NULL, &error)) {
        snprintf(msg, len, "insert at %s failed: %s", cf->mongo_uri, error.message);
        goto done;
    }
    filter = BCON_NEW("_id", BCON_UTF8(id));
    cur = mongoc_collection_find_with_opts(coll, filter, NULL, NULL);
    while (mongoc_cursor_next(cur, &got)) {
        bson_iter_t it;
        if (bson_iter_init_find(&it, got, "_id") && BSON_ITER_HOLDS_UTF8(&it)
            && strcmp(bson_iter_utf8(&it, NULL), id) == 0)
        {
            found = 1;
        }
    }
    if (mongoc_cursor_error(cur, &error)) {
        snprintf(msg, len, "find failed: %s", error.message);
        mongoc_cursor_destroy(cur);
        bson_destroy(filter);
        goto done;
    }
    mongoc_cursor_destroy(cur);
    mongoc_collection_delete_one(coll, filter, NULL, NULL, NULL);
    bson_destroy(filter);
    if (!found) {
        snprintf(msg, len, "inserted document not found when read back");
        goto done;
    }
    snprintf(msg, len, "mongodb-wire at %s, insert+find in %lld ms", cf->mongo_uri,
             (long long) (cw_now_ms() - t0));
    rc = 0;
done:
    bson_destroy(doc);
    bson_destroy(&opts);
    mongoc_write_concern_destroy(wc);
    mongoc_collection_destroy(coll);
    mongoc_client_destroy(client);
    mongoc_uri_destroy(uri);
    return rc;
}

int
cw_check(const cw_config_t *cf)
{
    char msg[1024];
    int  failed = 0;

    if (cw_check_redis(cf, msg, sizeof(msg)) == 0) printf("redis    ok    %s\n", msg);
    else { printf("redis    FAIL  %s\n", msg); failed++; }
    fflush(stdout);
    if (cw_check_kafka(cf, msg, sizeof(msg)) == 0) printf("kafka    ok    %s\n", msg);
    else { printf("kafka    FAIL  %s\n", msg); failed++; }
    fflush(stdout);
    if (cw_check_mongo(cf, msg, sizeof(msg)) == 0) printf("mongodb  ok    %s\n", msg);
    else { printf("mongodb  FAIL  %s\n", msg); failed++; }
    fflush(stdout);
    return failed ? 1 : 0;
}
