/*
 * Kafka as the queue (chat_queue kafka): a librdkafka producer per nginx
 * worker process with acks=all and idempotence. librdkafka's main queue
 * signals a non-blocking pipe whenever it goes from empty to non-empty; the
 * pipe is an nginx connection, so delivery reports are served from nginx's
 * event loop and never block it. A short timer polls as well, as a safety
 * net for a missed wake-up.
 */
#include "ngx_chat.h"

#include <librdkafka/rdkafka.h>


#define NGX_CHAT_KAFKA_POLL  100      /* ms */


typedef struct {
    ngx_chat_kafka_cb   cb;
    void               *data;
} ngx_chat_kafka_dr_t;


static rd_kafka_t        *ngx_chat_rk;
static rd_kafka_topic_t  *ngx_chat_rkt;
static int                ngx_chat_kafka_fds[2] = { -1, -1 };
static ngx_connection_t  *ngx_chat_kafka_conn;
static ngx_event_t        ngx_chat_kafka_timer;
static ngx_connection_t   ngx_chat_kafka_timer_conn;


static void
ngx_chat_kafka_serve(void)
{
    if (ngx_chat_rk) {
        while (rd_kafka_poll(ngx_chat_rk, 0) > 0) { /* void */ }
    }
}


static void
ngx_chat_kafka_read_handler(ngx_event_t *rev)
{
    u_char  buf[64];

    while (read(ngx_chat_kafka_fds[0], buf, sizeof(buf)) > 0) { /* void */ }

    ngx_chat_kafka_serve();

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, rev->log, 0,
                      "chat: kafka wake-up event failed");
    }
}


static void
ngx_chat_kafka_timer_handler(ngx_event_t *ev)
{
    ngx_chat_kafka_serve();

    if (!ngx_exiting) {
        ngx_add_timer(ev, NGX_CHAT_KAFKA_POLL);
    }
}


static void
ngx_chat_kafka_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    ngx_chat_kafka_dr_t  *dr = m->_private;

    if (m->err) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: kafka delivery to partition %d failed: %s",
                      (int) m->partition, rd_kafka_err2str(m->err));

    } else {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: kafka has the record at partition %d offset %O",
                       (int) m->partition, (off_t) m->offset);
    }

    if (dr) {
        if (dr->cb) {
            dr->cb(m->err == RD_KAFKA_RESP_ERR_NO_ERROR, dr->data);
        }
        ngx_free(dr);
    }
}


static void
ngx_chat_kafka_log(const rd_kafka_t *rk, int level, const char *fac,
    const char *buf)
{
    /* librdkafka logs from its own threads: stderr goes to nginx's log */
    (void) rk;
    (void) level;
    fprintf(stderr, "chat: kafka %s: %s\n", fac, buf);
}


/*
 * Produce value to partition; cb(ok, data) once the broker has it (acks=all)
 * or it failed. NGX_ERROR: refused at once (queue full, no producer).
 */
ngx_int_t
ngx_chat_kafka_produce(ngx_uint_t partition, u_char *key, size_t klen,
    u_char *val, size_t vlen, ngx_chat_kafka_cb cb, void *data)
{
    rd_kafka_resp_err_t   err;
    ngx_chat_kafka_dr_t  *dr;

    if (ngx_chat_rk == NULL) {
        return NGX_ERROR;
    }

    dr = ngx_alloc(sizeof(ngx_chat_kafka_dr_t), ngx_cycle->log);
    if (dr == NULL) {
        return NGX_ERROR;
    }

    dr->cb = cb;
    dr->data = data;

    err = rd_kafka_produce(ngx_chat_rkt, (int32_t) partition,
                           RD_KAFKA_MSG_F_COPY, val, vlen, key, klen, dr);

    if (err != 0) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: kafka produce refused: %s",
                      rd_kafka_err2str(rd_kafka_last_error()));
        ngx_free(dr);
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_kafka_init_process(ngx_cycle_t *cycle)
{
    char                   err[512], bootstrap[512];
    rd_kafka_conf_t       *conf;
    rd_kafka_queue_t      *q;
    ngx_connection_t      *c;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_chat_module);

    if (!cmcf->kafka) {
        return NGX_OK;
    }

    ngx_cpystrn((u_char *) bootstrap, cmcf->kafka_brokers.data,
                ngx_min(cmcf->kafka_brokers.len + 1, sizeof(bootstrap)));

    conf = rd_kafka_conf_new();

    if (rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, err,
                          sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "acks", "all", err, sizeof(err))
           != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "enable.idempotence", "true", err,
                             sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "linger.ms", "1", err, sizeof(err))
           != RD_KAFKA_CONF_OK
        /* an unreachable cluster answers `unavailable` within seconds */
        || rd_kafka_conf_set(conf, "message.timeout.ms", "10000", err,
                             sizeof(err)) != RD_KAFKA_CONF_OK
        || rd_kafka_conf_set(conf, "queue.buffering.max.messages", "100000",
                             err, sizeof(err)) != RD_KAFKA_CONF_OK)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "chat: kafka: %s", err);
        rd_kafka_conf_destroy(conf);
        return NGX_ERROR;
    }

    rd_kafka_conf_set_dr_msg_cb(conf, ngx_chat_kafka_dr);
    rd_kafka_conf_set_log_cb(conf, ngx_chat_kafka_log);

    ngx_chat_rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    if (ngx_chat_rk == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "chat: kafka: %s", err);
        return NGX_ERROR;
    }

    ngx_chat_rkt = rd_kafka_topic_new(ngx_chat_rk,
                                      (char *) cmcf->kafka_topic.data, NULL);
    if (ngx_chat_rkt == NULL) {
        return NGX_ERROR;
    }

    if (pipe2(ngx_chat_kafka_fds, O_NONBLOCK | O_CLOEXEC) != 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "chat: kafka wake-up pipe failed");
        return NGX_ERROR;
    }

    q = rd_kafka_queue_get_main(ngx_chat_rk);
    rd_kafka_queue_io_event_enable(q, ngx_chat_kafka_fds[1], "1", 1);
    rd_kafka_queue_destroy(q);

    c = ngx_get_connection(ngx_chat_kafka_fds[0], cycle->log);
    if (c == NULL) {
        return NGX_ERROR;
    }

    c->read->handler = ngx_chat_kafka_read_handler;
    c->read->log = cycle->log;
    ngx_chat_kafka_conn = c;

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_chat_kafka_timer_conn.fd = (ngx_socket_t) -1;
    ngx_chat_kafka_timer.handler = ngx_chat_kafka_timer_handler;
    ngx_chat_kafka_timer.data = &ngx_chat_kafka_timer_conn;
    ngx_chat_kafka_timer.log = cycle->log;
    ngx_chat_kafka_timer.cancelable = 1;
    ngx_add_timer(&ngx_chat_kafka_timer, NGX_CHAT_KAFKA_POLL);

    return NGX_OK;
}


void
ngx_chat_kafka_exit_process(ngx_cycle_t *cycle)
{
    if (ngx_chat_rk == NULL) {
        return;
    }

    /* what was accepted but not yet acknowledged by the broker: give it a
     * moment (the sender got no ack for it, so it retries if this fails) */
    (void) rd_kafka_flush(ngx_chat_rk, 2000);
    ngx_chat_kafka_serve();

    rd_kafka_topic_destroy(ngx_chat_rkt);
    rd_kafka_destroy(ngx_chat_rk);
    ngx_chat_rk = NULL;

    if (ngx_chat_kafka_conn) {
        ngx_close_connection(ngx_chat_kafka_conn);
        ngx_chat_kafka_conn = NULL;
    }

    if (ngx_chat_kafka_fds[1] != -1) {
        close(ngx_chat_kafka_fds[1]);
        ngx_chat_kafka_fds[1] = -1;
    }
}
