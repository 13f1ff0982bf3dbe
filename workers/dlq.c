/*
 * The dead-letter queue (docs/PIPELINE.md, "Dead letters"): a queue entry
 * that a role cannot process (malformed, out of range, refused by the
 * store) is recorded here, with a log line and a counter, and only then
 * acknowledged. Nothing the queue holds is dropped silently.
 *
 *   Redis queue   XADD chat:{dlq}:<role> MAXLEN ~ 100000: the entry's own
 *                 fields (as they came when they could not be parsed, else
 *                 as parsed) after dlq.role, dlq.why, dlq.src, dlq.shard,
 *                 dlq.at
 *   Kafka queue   a record on topic chat.dlq, key = the role, value = the
 *                 record as it came (or the parsed fields as a JSON
 *                 object), headers dlq.role, dlq.why, dlq.src, dlq.at;
 *                 written with acks=all and waited for
 *   counter       HINCRBY chat:{dlq}:count <role> 1 (both queues; with
 *                 Kafka only while Redis answers), and the role's 10 s
 *                 stats line
 *
 * A failed write returns -1: the caller keeps the entry unacknowledged and
 * tries again (a dead letter may then be recorded twice, never zero times).
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DLQ_MAXLEN "100000"

/* seq and prev of a re-written entry; one role per process, one thread */
static char dlq_num[CHAT_ENTRY_NUMBUF];
#define DLQ_TOPIC  "chat.dlq"

struct cw_dlq_s {
    const cw_config_t *cf;
    char               role[16];
    char               stream[48];
    int                kafka;
    rd_kafka_t        *rk;
    uint64_t           total;          /* since start */
};

cw_dlq_t *
cw_dlq_new(const cw_config_t *cf, const char *role)
{
    cw_dlq_t *d = calloc(1, sizeof(*d));

    if (d == NULL) return NULL;
    d->cf = cf;
    d->kafka = strcmp(cf->queue, "kafka") == 0;
    snprintf(d->role, sizeof(d->role), "%s", role);
    snprintf(d->stream, sizeof(d->stream), "chat:{dlq}:%s", role);
    return d;
}

void
cw_dlq_free(cw_dlq_t *d)
{
    if (d == NULL) return;
    if (d->rk) {
        rd_kafka_flush(d->rk, 5000);
        rd_kafka_destroy(d->rk);
    }
    free(d);
}

uint64_t
cw_dlq_total(const cw_dlq_t *d)
{
    return d ? d->total : 0;
}

static void
dlq_delivered(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void) rk;
    (void) opaque;
    if (m->_private) *(rd_kafka_resp_err_t *) m->_private = m->err;
}

static void
dlq_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void) rk;
    if (level <= 4) cw_warn("kafka dlq %s: %s", fac, buf);
}

static int
dlq_producer(cw_dlq_t *d)
{
    char             err[512];
    rd_kafka_conf_t *conf;

    if (d->rk) return 0;
    conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", d->cf->kafka_brokers, err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "acks", "all", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "enable.idempotence", "true", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "message.timeout.ms", "10000", err, sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "linger.ms", "0", err, sizeof(err)) != RD_KAFKA_CONF_OK)
    {
        cw_error("kafka dlq producer config: %s", err);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, dlq_delivered);
    rd_kafka_conf_set_log_cb(conf, dlq_kafka_log);
    d->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    if (d->rk == NULL) {
        cw_error("kafka dlq producer: %s", err);
        return -1;
    }
    return 0;
}

/* The parsed fields as a JSON object (Kafka: what cw_entry_from_json
 * reads), libchat's encoder (the module's receipts are written by it too). */
static char *
fields_json(const cw_entry_t *e, size_t *len)
{
    chat_entry_t  v;
    char         *s;
    size_t        cap;

    cw_entry_view(e, &v);
    /* each byte escapes to at most 6 */
    cap = 64 + 6 * (v.conv.len + v.from.len + v.dev.len + v.to.len + v.group.len + v.st.len
                    + v.event.len + v.rcpt.len + v.state.len + v.ev.len) + 2 * CHAT_ENTRY_NUMBUF
          + 16 * CHAT_EF_N;
    s = malloc(cap + 1);
    if (s == NULL) return NULL;
    *len = chat_entry_json(&v, s, cap);
    if (*len == 0) { free(s); return NULL; }
    s[*len] = '\0';
    return s;
}

static int
put_kafka(cw_dlq_t *d, const cw_entry_t *e, const char *why, const char *at)
{
    rd_kafka_resp_err_t st = RD_KAFKA_RESP_ERR__IN_PROGRESS, err;
    char               *own = NULL;
    const char         *val;
    size_t              len;

    if (dlq_producer(d) != 0) return -1;
    if (e->raw && e->raw_kafka) {
        val = e->raw[0];
        len = e->raw_len[0];
    } else {
        own = fields_json(e, &len);
        if (own == NULL) return -1;
        val = own;
    }
    err = rd_kafka_producev(d->rk, RD_KAFKA_V_TOPIC(DLQ_TOPIC), RD_KAFKA_V_KEY(d->role, strlen(d->role)),
                            RD_KAFKA_V_VALUE((void *) val, len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                            RD_KAFKA_V_HEADER("dlq.role", d->role, -1), RD_KAFKA_V_HEADER("dlq.why", why, -1),
                            RD_KAFKA_V_HEADER("dlq.src", e->qid, -1), RD_KAFKA_V_HEADER("dlq.at", at, -1),
                            RD_KAFKA_V_OPAQUE(&st), RD_KAFKA_V_END);
    free(own);
    if (err) {
        cw_warn("dlq: produce to %s: %s", DLQ_TOPIC, rd_kafka_err2str(err));
        return -1;
    }
    /* rare: wait for the broker (the delivery callback runs in poll) */
    for (int i = 0; i < 120 && st == RD_KAFKA_RESP_ERR__IN_PROGRESS; i++) rd_kafka_poll(d->rk, 100);
    if (st != RD_KAFKA_RESP_ERR_NO_ERROR) {
        cw_warn("dlq: %s: %s", DLQ_TOPIC,
                st == RD_KAFKA_RESP_ERR__IN_PROGRESS ? "no delivery report in time" : rd_kafka_err2str(st));
        if (st == RD_KAFKA_RESP_ERR__IN_PROGRESS) {
            /* the callback must not write to st after we return */
            rd_kafka_purge(d->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
            rd_kafka_flush(d->rk, 1000);
            rd_kafka_destroy(d->rk);
            d->rk = NULL;
        }
        return -1;
    }
    return 0;
}

static int
put_redis(cw_dlq_t *d, redisContext *c, const cw_entry_t *e, const char *why, const char *at)
{
    const char **argv;
    size_t      *lens;
    const char  *name[CHAT_EF_N], *val[CHAT_EF_N];
    size_t       vlen[CHAT_EF_N];
    chat_entry_t v;
    char         shard[16];
    int          n = 0, nf = 0, max, rc = 0;
    redisReply  *r;

    if (c == NULL) return -1;
    if (!(e->raw && !e->raw_kafka)) {
        cw_entry_view(e, &v);
        nf = chat_entry_pairs(&v, name, val, vlen, dlq_num);
    }
    max = 16 + (e->raw ? e->n_raw : 2 * nf);
    argv = malloc(sizeof(char *) * (size_t) max);
    lens = malloc(sizeof(size_t) * (size_t) max);
    if (argv == NULL || lens == NULL) { free(argv); free(lens); return -1; }
    snprintf(shard, sizeof(shard), "%d", e->shard);
#define A(s, l) do { argv[n] = (s); lens[n] = (l); n++; } while (0)
#define AS(s) A(s, strlen(s))
    AS("XADD"); AS(d->stream); AS("MAXLEN"); AS("~"); AS(DLQ_MAXLEN); AS("*");
    AS("dlq.role"); AS(d->role); AS("dlq.why"); AS(why); AS("dlq.src"); AS(e->qid);
    AS("dlq.shard"); AS(shard); AS("dlq.at"); AS(at);
    if (e->raw && !e->raw_kafka) {
        for (int i = 0; i < e->n_raw; i++) A(e->raw[i], e->raw_len[i]);
    } else if (e->raw) {
        AS("raw"); A(e->raw[0], e->raw_len[0]);
    } else {
        for (int i = 0; i < nf; i++) { AS(name[i]); A(val[i], vlen[i]); }
    }
#undef AS
#undef A
    r = redisCommandArgv(c, n, argv, lens);
    free(argv);
    free(lens);
    if (r == NULL) return -1;
    if (r->type == REDIS_REPLY_ERROR) {
        cw_warn("dlq: XADD %s: %s", d->stream, r->str);
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

int
cw_dlq_put(cw_dlq_t *d, redisContext *c, cw_entry_t *e, const char *why)
{
    char        at[24];
    redisReply *r;

    if (e->dead) return 0;
    snprintf(at, sizeof(at), "%" PRId64, cw_now_ms());
    if ((d->kafka ? put_kafka(d, e, why, at) : put_redis(d, c, e, why, at)) != 0) {
        cw_warn("%s: could not record entry %s (shard %d) in the dead-letter queue; it stays unacknowledged",
                d->role, e->qid, e->shard);
        return -1;
    }
    e->dead = 1;
    d->total++;
    cw_warn("%s: queue entry %s (shard %d) cannot be processed (%s): moved to the dead-letter queue %s",
            d->role, e->qid, e->shard, why, d->kafka ? DLQ_TOPIC : d->stream);
    /* the counter; with Kafka the record is safe even when Redis is away */
    if (c) {
        r = redisCommand(c, "HINCRBY chat:{dlq}:count %s 1", d->role);
        if (r == NULL && !d->kafka) return 0;      /* the caller sees the broken connection next */
        freeReplyObject(r);
    }
    return 0;
}
