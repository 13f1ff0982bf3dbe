/*
 * loadgen: the ngx-chat benchmark load generator.
 *
 * One epoll loop per process, non-blocking sockets, many connections per
 * process; --procs N forks N such processes (each may open up to its
 * RLIMIT_NOFILE files).  The parent plans the run, drives the phases through
 * a shared memory block (connect, run, drain, late, close, exit), prints
 * progress once a second, measures the memory of the target's nginx worker
 * processes, and adds up the children's counters and latency histograms.
 *
 * Targets:
 *   chat   ngx-chat: ws://host:port/chat/ws?token=<HS256 JWT>, hello frame,
 *          {"type":"ping"} every heartbeat, send/ack/msg/ack-cursor; or the
 *          long-poll transport GET /chat/poll and POST /chat/send.
 *   nchan  nchan: WebSocket subscribers on /sub/<channel>, HTTP POST
 *          publishers on /pub/<channel>; WebSocket ping frames as heartbeat.
 *   centrifugo  Centrifugo v6, its JSON protocol over WebSocket
 *          (ws://host:port/connection/websocket): a connect command with an
 *          HS256 JWT (sub = user), one subscription per connection (the
 *          user's channel personal:#<user>, or a group's channel
 *          group:<name> for fan-out receivers), client-side publish into the
 *          recipient's channel, pushes {"push":{"channel","pub":{"data",
 *          "offset"}}}; the server's empty ping {} is answered with {}, and
 *          WebSocket ping frames are the heartbeat we measure.  A connection
 *          that comes back resubscribes with recover, epoch and offset, and
 *          the missed publications arrive in the subscribe reply.
 *
 * Scenarios: idle, churn, one2one, fanout, offline (see usage()).
 *
 * Accounting: every message carries "lg1 <flow> <seq> <t_ns>" in its body,
 * t_ns being the intended send time on CLOCK_MONOTONIC (one machine, shared
 * by every process).  All connections of one conversation (flow) live in one
 * process, so that process knows what was acknowledged (sent) and what each
 * receiver got: deliveries, duplicates (by (flow, seq) and by server message
 * id) and losses are exact, and the lost ones are listed.
 */
#define _GNU_SOURCE
#include "lg.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS     64
#define SCRATCH       (256 * 1024)
#define HS_TIMEOUT_NS (15ull * 1000000000ull)
#define CLOSE_WAIT_NS (3ull * 1000000000ull)
#define NS            1000000000ull
#define MS            1000000ull

/* ===================================================================== */
/* options                                                               */
/* ===================================================================== */

enum { TGT_CHAT, TGT_NCHAN, TGT_CENTRIFUGO };
enum { SC_IDLE, SC_CHURN, SC_ONE2ONE, SC_FANOUT, SC_OFFLINE };
enum { TR_WS, TR_POLL };

static const char *sc_names[] = { "idle", "churn", "one2one", "fanout", "offline" };

static struct opts {
    int    target, scenario, transport;
    char   host[64];
    int    port;
    char   ws_path[128], http_prefix[64];
    char   sub_prefix[64], sub_old_prefix[64], pub_prefix[64];
    char   secret[256], device[33], run[24], label[48];
    char   pidfile[512];
    char   redis_host[64];        /* --redis: the server's Redis, for its cost */
    int    redis_port;
    double redis_monitor;         /* --redis-monitor: seconds of MONITOR mid-run */
    const char *stop_file;        /* --stop-file: the sending stops when it exists */
    int    conns, procs, src_addrs, pairs, groups, group_size, messages, window;
    int    body_size, pub_conns, poll_timeout, max_inflight_hs, verbose, hist_dump;
    double ramp, hold, duration, max_time, ping_interval, rate, churn_rate, drain;
    double settle, progress;
    double offline_wait;          /* offline: pause between the last ack and the receivers */
} O;

/* ===================================================================== */
/* shared block: phases and per-process counters                         */
/* ===================================================================== */

enum { PH_INIT, PH_CONNECT, PH_RUN, PH_DRAIN, PH_LATE, PH_CLOSE, PH_EXIT };
static const char *ph_names[] = { "init", "connect", "run", "drain", "late", "close", "exit" };

static const char *ec_names[] = { "bad_request", "too_large", "rate_limited", "forbidden",
                                  "not_found", "unavailable", "unauthorized", "other" };
#define EC_N 8
#define MAX_RETRIES 8
#define TRIES_FAILED 0xff    /* flow->tries[seq]: the send failed for good */

enum { CC_1000, CC_1001, CC_1002, CC_1003, CC_1006, CC_1008, CC_1011, CC_OTHER, CC_N };
static const char *cc_names[] = { "1000", "1001", "1002", "1003", "1006(eof)", "1008",
                                  "1009/1011/1013", "other" };

struct cstats {
    /* connections */
    uint64_t init_target, init_done;
    uint64_t attempted, established, failed, open, dropped, closed_clean, closed_forced;
    uint64_t f_connect, f_handshake, f_status, f_timeout, f_hello, f_proto;
    uint64_t run_established, reconnects;
    uint64_t close_codes[CC_N];
    /* heartbeats */
    uint64_t pings, pongs, srv_pings, pong_late;
    /* messages */
    uint64_t flows, flows_ready, flows_failed, flows_done;
    uint64_t sent, acked, send_err, retries, skipped, expected;
    uint64_t delivered, dups, id_mismatch, out_of_range, foreign, lost, unacked_delivered;
    uint64_t other_events, errors_rx, reconnect_frames, receipts, polls;
    uint64_t recovered, not_recovered;   /* centrifugo: resubscribes with recovery */
    uint64_t err_codes[EC_N];
    uint64_t drain_done, drain_ns_max;
    int      planned, exited;
    char     err[4][160];
    int      nerr;
    char     lost_list[512];
    struct lg_hist h_conn, h_pong, h_ack, h_lat, h_lag, h_drain, h_last;
};

struct shared {
    int      phase;
    uint64_t phase_ns;
    uint64_t deadline_ns;     /* hard stop for every process */
    int      heartbeat_s;     /* from the first hello */
    struct cstats st[MAX_PROCS];
};

static struct shared *SH;
static struct cstats *S;        /* this child's slot */
static int child_no = -1;

#define INC(f)    __atomic_fetch_add(&S->f, 1, __ATOMIC_RELAXED)
#define ADD(f, n) __atomic_fetch_add(&S->f, (n), __ATOMIC_RELAXED)
#define DEC(f)    __atomic_fetch_sub(&S->f, 1, __ATOMIC_RELAXED)
#define LD(x)     __atomic_load_n(&(x), __ATOMIC_RELAXED)

static void errsample(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void errsample(const char *fmt, ...)
{
    va_list ap;
    int i;

    if (!S) return;
    i = S->nerr < 4 ? S->nerr : 3;      /* keep the first three, then the last */
    va_start(ap, fmt);
    vsnprintf(S->err[i], sizeof(S->err[i]), fmt, ap);
    va_end(ap);
    if (S->nerr < 4) S->nerr++;
    if (O.verbose) fprintf(stderr, "[loadgen %d] %s\n", child_no, S->err[i]);
}

/* ===================================================================== */
/* connections and flows                                                 */
/* ===================================================================== */

enum { K_WS, K_POLL, K_HTTP };
enum { S_NONE, S_CONNECTING, S_HANDSHAKE, S_HELLO, S_OPEN, S_CLOSING, S_DONE };
enum { R_PLAIN, R_SENDER, R_RECV, R_HTTP };
enum { HR_NONE, HR_PUB, HR_SEND, HR_GROUP };

#define F_DEFERRED 0x01   /* receiver that connects in the late phase */
#define F_INITIAL  0x02   /* counts towards init_target until it settles */
#define F_WANT_OUT 0x04
#define F_ACK_DUE  0x08
#define F_BROKEN   0x10
#define F_EVER     0x20   /* has been open at least once */
#define F_GOTCLOSE 0x40
#define F_RETRY    0x80   /* reopen when retry_at has passed */

struct hreq {
    uint8_t  type;
    uint32_t flow, seq;
    uint64_t t;
};

struct conn {
    int       fd;
    uint8_t   kind, state, role, flags, fop;
    int32_t   flow;
    uint32_t  rslot, idx, pings_out;
    int       close_code;
    long long cursor, acked_cursor;
    uint64_t  t_start, t_open, next_ping, ping_t, deadline, life, retry_at;
    uint32_t  fails;          /* consecutive failures, for the backoff */
    char      user[48];
    char      key[25];
    char     *chan;           /* centrifugo: the one channel it subscribes to */
    char      epoch[24];      /* centrifugo: stream position of that channel */
    uint64_t  offset;
    uint8_t  *rb; uint32_t rlen, rcap;
    uint8_t  *wb; uint32_t wlen, woff, wcap;
    uint8_t  *fb; uint32_t flen, fcap;
    struct hreq req;
    int       busy;
};

struct flow {
    uint32_t  gid;
    int       ready, failed, done;
    struct conn *sender;
    char      sender_user[48];
    char      dest[96];           /* chat: "to":"u" or "group":"g"; nchan: channel */
    uint32_t  nrecv;
    struct conn **recv;
    char    (*members)[48];       /* chat groups: member ids (incl. sender) */
    uint32_t  nmembers;
    uint32_t  cap, next_seq, inflight, nacked;
    uint64_t *send_ns;
    uint64_t *idh;
    uint8_t  *acked;              /* cap bits */
    uint8_t  *seen;               /* nrecv * cap bits */
    uint8_t  *tries;              /* resends per seq */
    uint32_t *rcount;             /* per receiver distinct deliveries */
    uint32_t *mcount;             /* per seq: receivers that have it */
    uint64_t  late_start;         /* offline: when the receivers started */
};

static struct conn  *conns;
static uint32_t      nconns;
static struct flow  *flows;
static uint32_t      nflows;
static int           ep = -1;
static uint64_t      now;
static uint8_t      *scratch;
static int           phase = PH_INIT;
static uint64_t      phase_t;

/* queue of connections to open */
static struct conn **openq;
static uint32_t      oq_head, oq_len, oq_cap;
static uint32_t      hs_inflight;

/* request queues: hq for HTTP (publish / chat send / group create), rq for
 * WebSocket resends of chat messages after rate_limited / unavailable */
struct reqq {
    struct hreq *a;
    uint32_t     head, len, cap;
};
static struct reqq   hq, rq;
static struct conn **pool;
static uint32_t      npool;

/* send scheduling */
static double        my_rate;            /* messages per second, this process */
static uint64_t      run_t0, sched_n;
static uint32_t      rr_flow;
static int           tfd = -1;           /* timerfd: paces the sends */
static char          timer_tag;

static inline int bit_get(const uint8_t *b, uint64_t i) { return b[i >> 3] >> (i & 7) & 1; }
static inline void bit_set(uint8_t *b, uint64_t i) { b[i >> 3] |= (uint8_t)(1u << (i & 7)); }

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) { fprintf(stderr, "loadgen: out of memory\n"); exit(3); }
    return p;
}

/* ---- queues ------------------------------------------------------------ */

static void openq_push(struct conn *c)
{
    if (oq_len == oq_cap) {
        uint32_t nc = oq_cap ? oq_cap * 2 : 1024;
        struct conn **n = xcalloc(nc, sizeof(*n));
        for (uint32_t i = 0; i < oq_len; i++) n[i] = openq[(oq_head + i) % oq_cap];
        free(openq);
        openq = n; oq_cap = nc; oq_head = 0;
    }
    openq[(oq_head + oq_len++) % oq_cap] = c;
}

static struct conn *openq_pop(void)
{
    struct conn *c;
    if (!oq_len) return NULL;
    c = openq[oq_head];
    oq_head = (oq_head + 1) % oq_cap;
    oq_len--;
    return c;
}

static void q_push(struct reqq *q, struct hreq r, int front)
{
    if (q->len == q->cap) {
        uint32_t nc = q->cap ? q->cap * 2 : 1024;
        struct hreq *n = xcalloc(nc, sizeof(*n));
        for (uint32_t i = 0; i < q->len; i++) n[i] = q->a[(q->head + i) % q->cap];
        free(q->a);
        q->a = n; q->cap = nc; q->head = 0;
    }
    if (front) {
        q->head = (q->head + q->cap - 1) % q->cap;
        q->a[q->head] = r;
        q->len++;
    } else {
        q->a[(q->head + q->len++) % q->cap] = r;
    }
}

static int q_pop(struct reqq *q, struct hreq *r)
{
    if (!q->len) return 0;
    *r = q->a[q->head];
    q->head = (q->head + 1) % q->cap;
    q->len--;
    return 1;
}

static void hq_push(struct hreq r, int front) { q_push(&hq, r, front); }
static int hq_pop(struct hreq *r) { return q_pop(&hq, r); }

/* ===================================================================== */
/* socket plumbing                                                       */
/* ===================================================================== */

static void ep_set(struct conn *c, int out)
{
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | (out ? EPOLLOUT : 0),
                              .data.ptr = c };
    if (out == !!(c->flags & F_WANT_OUT)) return;
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    if (out) c->flags |= F_WANT_OUT; else c->flags &= ~F_WANT_OUT;
}

static int conn_write(struct conn *c, const void *buf, size_t n)
{
    const uint8_t *p = buf;

    if (c->fd < 0 || (c->flags & F_BROKEN)) return -1;
    if (c->woff == c->wlen && c->state != S_CONNECTING) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) { c->flags |= F_BROKEN; return -1; }
            w = 0;
        }
        p += w; n -= (size_t)w;
        c->woff = c->wlen = 0;
        if (!n) return 0;
    }
    if (c->wlen + n > c->wcap) {
        if (c->woff) {
            memmove(c->wb, c->wb + c->woff, c->wlen - c->woff);
            c->wlen -= c->woff; c->woff = 0;
        }
        if (c->wlen + n > c->wcap) {
            uint32_t nc = c->wcap ? c->wcap : 1024;
            while (nc < c->wlen + n) nc *= 2;
            uint8_t *nb = realloc(c->wb, nc);
            if (!nb) { c->flags |= F_BROKEN; return -1; }
            c->wb = nb; c->wcap = nc;
        }
    }
    memcpy(c->wb + c->wlen, p, n);
    c->wlen += (uint32_t)n;
    if (c->state != S_CONNECTING) ep_set(c, 1);
    return 0;
}

static void conn_flush(struct conn *c)
{
    while (c->woff < c->wlen) {
        ssize_t w = send(c->fd, c->wb + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            c->flags |= F_BROKEN;
            return;
        }
        c->woff += (uint32_t)w;
    }
    c->woff = c->wlen = 0;
    if (c->wcap > 65536) { free(c->wb); c->wb = NULL; c->wcap = 0; }
    ep_set(c, 0);
}

static int ws_send(struct conn *c, int op, const void *payload, size_t n)
{
    uint8_t stackbuf[2048], *f = stackbuf;
    const uint8_t *p = payload;
    uint8_t mask[4];
    uint32_t m = (uint32_t)lg_rand();
    size_t h = 0;
    int rc;

    if (n + 14 > sizeof(stackbuf)) f = xcalloc(1, n + 14);
    f[h++] = (uint8_t)(0x80 | op);
    if (n < 126) {
        f[h++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        f[h++] = 0x80 | 126;
        f[h++] = (uint8_t)(n >> 8);
        f[h++] = (uint8_t)n;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) f[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    memcpy(mask, &m, 4);
    memcpy(f + h, mask, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) f[h + i] = p[i] ^ mask[i & 3];
    rc = conn_write(c, f, h + n);
    if (f != stackbuf) free(f);
    return rc;
}

static int ws_text(struct conn *c, const char *s, size_t n) { return ws_send(c, 1, s, n); }

/* ===================================================================== */
/* names, tokens                                                         */
/* ===================================================================== */

static int make_token(const char *user, char *out, size_t cap)
{
    return lg_jwt_hs256(O.secret, user, O.device, (long long)time(NULL) + 86400, out, cap);
}

/* ===================================================================== */
/* closing and reopening                                                 */
/* ===================================================================== */

static void on_send_failed(struct flow *f, uint32_t seq);

static void conn_settle_initial(struct conn *c)
{
    if (c->flags & F_INITIAL) {
        c->flags &= ~F_INITIAL;
        INC(init_done);
    }
}

static int wants_reopen(struct conn *c)
{
    if (phase >= PH_CLOSE || c->state == S_DONE) return 0;
    switch (c->role) {
    case R_HTTP: return 1;
    case R_SENDER:
    case R_RECV: return (c->flags & F_EVER) != 0;   /* resume after a drop */
    case R_PLAIN: return O.scenario == SC_CHURN && phase == PH_RUN;
    }
    return 0;
}

static void close_code_count(int code)
{
    int i;
    switch (code) {
    case 1000: i = CC_1000; break;
    case 1001: i = CC_1001; break;
    case 1002: i = CC_1002; break;
    case 1003: i = CC_1003; break;
    case 1006: i = CC_1006; break;
    case 1008: i = CC_1008; break;
    case 1009: case 1011: case 1013: i = CC_1011; break;
    default: i = CC_OTHER;
    }
    INC(close_codes[i]);
}

/* Close the socket.  `how`: 0 clean end we asked for, 1 dropped by the
 * server / error after open, 2 failure before open, 3 forced (timeout). */
static void conn_close(struct conn *c, int how)
{
    if (c->fd < 0) return;
    if (how >= 2 || (c->flags & F_BROKEN)) {
        struct linger l = { 1, 0 };   /* RST: keep our ports free */
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    }
    close(c->fd);
    c->fd = -1;
    if (c->state == S_CONNECTING || c->state == S_HANDSHAKE || c->state == S_HELLO) {
        if (hs_inflight) hs_inflight--;
    }
    if (c->state == S_OPEN || c->state == S_CLOSING) {
        DEC(open);
        if (how == 0) INC(closed_clean);
        else if (how == 3) INC(closed_forced);
        else if (c->role != R_HTTP || c->state == S_CLOSING) {
            INC(dropped);
            close_code_count(c->close_code ? c->close_code : 1006);
        }
    }
    conn_settle_initial(c);
    free(c->rb); c->rb = NULL; c->rlen = c->rcap = 0;
    free(c->wb); c->wb = NULL; c->wlen = c->woff = c->wcap = 0;
    free(c->fb); c->fb = NULL; c->flen = c->fcap = 0;
    c->flags &= ~(F_WANT_OUT | F_ACK_DUE | F_BROKEN | F_GOTCLOSE);
    c->pings_out = 0;
    c->close_code = 0;
    if (c->busy) {
        /* an HTTP request was in flight: a chat send is safe to repeat (same
         * client_id); a publish or group creation may have happened, so it
         * counts as failed rather than risking a duplicate */
        c->busy = 0;
        if (c->req.type == HR_SEND && phase < PH_CLOSE) {
            INC(retries);
            hq_push(c->req, 1);
        } else if (c->req.type == HR_PUB) {
            errsample("publish connection lost with a request in flight");
            on_send_failed(&flows[c->req.flow], c->req.seq);
        } else if (c->req.type == HR_GROUP) {
            errsample("connection lost while creating a group");
            flows[c->req.flow].failed = 1;
            INC(flows_failed);
        }
        c->req.type = HR_NONE;
    }
    int again = wants_reopen(c);
    if (how == 0 && c->state != S_NONE) c->fails = 0;
    else if (how != 0) c->fails++;
    c->state = S_NONE;
    if (again) {
        if (c->role == R_SENDER || c->role == R_RECV) INC(reconnects);
        if (c->fails) {
            /* back off: 100 ms, doubling, at most 2 s */
            uint64_t d = 100 * MS << (c->fails > 5 ? 5 : c->fails - 1);
            if (d > 2 * NS) d = 2 * NS;
            c->retry_at = now + d;
            c->flags |= F_RETRY;
        } else {
            openq_push(c);
        }
    }
}

static void conn_fail(struct conn *c, uint64_t *counter, const char *why)
{
    if (counter) __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    if (c->state != S_OPEN && c->state != S_CLOSING) INC(failed);
    if (why) errsample("%s: %s", c->user, why);
    conn_close(c, c->state == S_OPEN || c->state == S_CLOSING ? 1 : 2);
}

/* Begin a graceful close: WebSocket close frame, then wait for the server
 * to answer and close the TCP connection. */
static void conn_begin_close(struct conn *c)
{
    if (c->fd < 0) return;
    if (c->kind != K_WS || c->state != S_OPEN) {
        int open = c->state == S_OPEN;
        if (!open) { conn_close(c, 2); return; }
        conn_close(c, 0);
        return;
    }
    uint8_t code[2] = { 1000 >> 8, 1000 & 0xff };
    ws_send(c, 8, code, 2);
    c->state = S_CLOSING;
    c->deadline = now + CLOSE_WAIT_NS;
}

/* ===================================================================== */
/* opening                                                               */
/* ===================================================================== */

static void conn_start_request(struct conn *c);

static void conn_open(struct conn *c)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)O.port) };
    int fd, one = 1;

    c->t_start = now;
    c->deadline = now + HS_TIMEOUT_NS;
    INC(attempted);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->state = S_NONE;
        INC(failed); INC(f_connect);
        errsample("socket: %s", strerror(errno));
        conn_settle_initial(c);
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (O.src_addrs > 0) {
        struct sockaddr_in src = { .sin_family = AF_INET };
        uint32_t a = 0x7f000002u + (uint32_t)((c->idx * (uint32_t)O.procs + (uint32_t)child_no)
                                              % (uint32_t)O.src_addrs);
        src.sin_addr.s_addr = htonl(a);
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0) {
            errsample("bind 127.x: %s", strerror(errno));
        }
    }
    inet_pton(AF_INET, O.host, &sa.sin_addr);
    c->fd = fd;
    c->state = S_CONNECTING;
    hs_inflight++;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno != EINPROGRESS) {
        errsample("connect: %s", strerror(errno));
        INC(f_connect);
        conn_fail(c, NULL, NULL);
        return;
    }
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = c };
    c->flags |= F_WANT_OUT;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        errsample("epoll_ctl: %s", strerror(errno));
        conn_fail(c, &S->f_connect, NULL);
    }
}

static void ws_handshake(struct conn *c)
{
    char req[2048], tok[1024], path[1400];
    uint8_t rnd[16];
    uint64_t a = lg_rand(), b = lg_rand();
    int n;

    memcpy(rnd, &a, 8);
    memcpy(rnd + 8, &b, 8);
    lg_base64(rnd, 16, c->key, 0);
    if (O.target == TGT_CHAT) {
        if (make_token(c->user, tok, sizeof(tok)) < 0) { conn_fail(c, &S->f_proto, "token"); return; }
        if (c->cursor > 0)
            snprintf(path, sizeof(path), "%s?token=%s&cursor=%lld", O.ws_path, tok, c->cursor);
        else
            snprintf(path, sizeof(path), "%s?token=%s", O.ws_path, tok);
    } else if (O.target == TGT_CENTRIFUGO) {
        snprintf(path, sizeof(path), "%s", O.ws_path);
    } else {
        const char *pre = (c->flags & F_DEFERRED) && O.scenario == SC_OFFLINE
                          ? O.sub_old_prefix : O.sub_prefix;
        snprintf(path, sizeof(path), "%s%s", pre, c->user);
    }
    n = snprintf(req, sizeof(req),
                 "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                 path, O.host, O.port, c->key);
    c->state = S_HANDSHAKE;
    conn_write(c, req, (size_t)n);
}

static void conn_connected(struct conn *c)
{
    int err = 0;
    socklen_t l = sizeof(err);

    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    if (err) {
        errsample("connect: %s", strerror(err));
        conn_fail(c, &S->f_connect, NULL);
        return;
    }
    c->flags &= ~F_WANT_OUT;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    if (c->kind == K_WS) {
        ws_handshake(c);
    } else {
        /* HTTP connections count as open once connected */
        c->state = S_OPEN;
        if (hs_inflight) hs_inflight--;
        c->t_open = now;
        INC(established); INC(open);
        if (phase == PH_RUN) INC(run_established);
        c->flags |= F_EVER;
        c->fails = 0;
        conn_settle_initial(c);
        conn_start_request(c);
    }
}

static void conn_became_open(struct conn *c)
{
    int again = (c->flags & F_EVER) != 0;

    c->state = S_OPEN;
    c->t_open = now;
    if (hs_inflight) hs_inflight--;
    INC(established); INC(open);
    if (phase == PH_RUN) INC(run_established);
    lg_hist_add(&S->h_conn, now - c->t_start);
    c->flags |= F_EVER;
    c->fails = 0;
    conn_settle_initial(c);
    c->pings_out = 0;
    if (O.ping_interval > 0)
        c->next_ping = now + (uint64_t)(O.ping_interval * NS * (0.2 + 0.8 * lg_rand01()));
    else
        c->next_ping = UINT64_MAX;
    if (O.scenario == SC_CHURN && phase == PH_RUN && c->role == R_PLAIN) {
        double mean = O.conns / O.churn_rate;
        c->life = now + (uint64_t)(mean * NS * (0.5 + lg_rand01()));
    } else {
        c->life = UINT64_MAX;
    }
    if (c->flow >= 0 && (c->flags & F_DEFERRED) && !flows[c->flow].late_start)
        flows[c->flow].late_start = c->t_start;
    if (again && c->role == R_SENDER && c->flow >= 0 && phase < PH_CLOSE) {
        /* a sender back after a drop sends what was not acknowledged again,
         * with the same client_id, as a real client would.  A Centrifugo
         * client publish has no idempotency key: sending again could
         * duplicate, so what was in flight counts as failed (if it was
         * published after all, it shows as delivered without ack). */
        struct flow *f = &flows[c->flow];
        for (uint32_t q = 0; q < f->next_seq && q < f->cap; q++) {
            if (bit_get(f->acked, q) || f->tries[q] == TRIES_FAILED) continue;
            if (O.target == TGT_CENTRIFUGO) { on_send_failed(f, q); continue; }
            struct hreq r = { HR_SEND, (uint32_t)c->flow, q, now };
            INC(retries);
            q_push(&rq, r, 0);
        }
    }
}

/* ===================================================================== */
/* message accounting                                                    */
/* ===================================================================== */

static void flow_check_done(struct flow *f)
{
    if (f->done) return;
    if (O.scenario == SC_OFFLINE && f->next_seq >= (uint32_t)O.messages && f->inflight == 0) {
        f->done = 1;
        INC(flows_done);
    }
}

static void on_acked(struct flow *f, uint32_t seq, const char *id, size_t idn)
{
    if (seq >= f->cap || seq >= f->next_seq) { INC(out_of_range); return; }
    if (bit_get(f->acked, seq)) { INC(dups); errsample("second ack flow %u seq %u", f->gid, seq); return; }
    bit_set(f->acked, seq);
    f->nacked++;
    if (f->inflight) f->inflight--;
    INC(acked);
    ADD(expected, f->nrecv);
    lg_hist_add(&S->h_ack, now > f->send_ns[seq] ? now - f->send_ns[seq] : 0);
    if (id && idn) {
        uint64_t h = lg_hash64(id, idn);
        if (f->idh[seq] && f->idh[seq] != h) INC(id_mismatch);
        else f->idh[seq] = h;
    }
    flow_check_done(f);
}

static void on_send_failed(struct flow *f, uint32_t seq)
{
    if (seq < f->cap) f->tries[seq] = TRIES_FAILED;
    if (f->inflight) f->inflight--;
    INC(send_err);
    flow_check_done(f);
}

/* body "lg1 <flow> <seq> <t_ns> ..." as delivered to receiver slot r */
static void on_delivery(struct conn *c, const char *body, size_t n, const char *id, size_t idn)
{
    char buf[96];
    unsigned long gid, seq;
    unsigned long long t;
    struct flow *f;
    uint64_t bit;

    if (n > sizeof(buf) - 1) n = sizeof(buf) - 1;
    memcpy(buf, body, n);
    buf[n] = 0;
    if (sscanf(buf, "lg1 %lu %lu %llu", &gid, &seq, &t) != 3) { INC(foreign); return; }
    if (c->flow < 0 || flows[c->flow].gid != gid) { INC(foreign); return; }
    f = &flows[c->flow];
    if (seq >= f->cap) { INC(out_of_range); return; }
    bit = (uint64_t)c->rslot * f->cap + seq;
    if (id && idn) {
        uint64_t h = lg_hash64(id, idn);
        if (!f->idh[seq]) f->idh[seq] = h;
        else if (f->idh[seq] != h) { INC(id_mismatch); errsample("flow %lu seq %lu: two ids", gid, seq); }
    }
    if (bit_get(f->seen, bit)) { INC(dups); return; }
    bit_set(f->seen, bit);
    f->rcount[c->rslot]++;
    INC(delivered);
    lg_hist_add(&S->h_lat, now > t ? now - t : 0);
    if (++f->mcount[seq] == f->nrecv) lg_hist_add(&S->h_last, now > t ? now - t : 0);   /* the last member has it */
    if (O.scenario == SC_OFFLINE && f->rcount[c->rslot] == f->nacked && f->done) {
        uint64_t d = now - (f->late_start ? f->late_start : c->t_start);
        lg_hist_add(&S->h_drain, d);
        INC(drain_done);
        if (d > S->drain_ns_max) S->drain_ns_max = d;
    }
}

/* ===================================================================== */
/* chat protocol                                                         */
/* ===================================================================== */

static void chat_event(struct conn *c, const char *s, size_t n, int from_poll)
{
    struct lg_jv type, v, w;

    if (lg_json_get(s, n, "type", &type) < 0) {
        errsample("%s: frame without type: %.60s", c->user, s);
        INC(f_proto);
        return;
    }
    if (!from_poll && c->state == S_HELLO) {
        if (!lg_jv_eq(&type, "hello")) {
            conn_fail(c, &S->f_hello, "first frame is not hello");
            return;
        }
        if (lg_json_get(s, n, "heartbeat", &v) == 0 && O.ping_interval <= 0) {
            long long hb = lg_jv_int(&v, 30);
            if (hb > 0) {
                O.ping_interval = (double)hb;
                __atomic_store_n(&SH->heartbeat_s, (int)hb, __ATOMIC_RELAXED);
            }
        }
        if (lg_json_get(s, n, "cursor", &v) == 0) {
            long long cur = lg_jv_int(&v, 0);
            if (cur > c->acked_cursor) c->acked_cursor = cur;
            if (cur > c->cursor) c->cursor = cur;
        }
        conn_became_open(c);
        return;
    }
    if (lg_json_get(s, n, "cursor", &v) == 0) {
        long long cur = lg_jv_int(&v, 0);
        if (cur > c->cursor) { c->cursor = cur; c->flags |= F_ACK_DUE; }
    }
    if (lg_jv_eq(&type, "pong")) {
        INC(pongs);
        if (c->pings_out) {
            c->pings_out--;
            lg_hist_add(&S->h_pong, now - c->ping_t);
        }
    } else if (lg_jv_eq(&type, "msg")) {
        struct lg_jv id = { 0 };
        if (lg_json_get(s, n, "body", &v) < 0) { INC(foreign); return; }
        lg_json_get(s, n, "id", &id);
        on_delivery(c, v.p, v.n, id.p, id.n);
    } else if (lg_jv_eq(&type, "ack")) {
        /* client_id "<run>.<flow>.<seq>" */
        if (lg_json_get(s, n, "client_id", &v) == 0 && c->flow >= 0) {
            char cid[96];
            size_t l = v.n < sizeof(cid) - 1 ? v.n : sizeof(cid) - 1;
            memcpy(cid, v.p, l); cid[l] = 0;
            char *dot = strrchr(cid, '.');
            if (!dot) { INC(foreign); return; }
            uint32_t seq = (uint32_t)strtoul(dot + 1, NULL, 10);
            struct lg_jv id = { 0 };
            lg_json_get(s, n, "id", &id);
            on_acked(&flows[c->flow], seq, id.p, id.n);
        } else {
            INC(foreign);
        }
    } else if (lg_jv_eq(&type, "error")) {
        struct lg_jv code = { 0 }, msg = { 0 };
        int ec;
        INC(errors_rx);
        lg_json_get(s, n, "code", &code);
        lg_json_get(s, n, "message", &msg);
        for (ec = 0; ec < EC_N - 1; ec++) if (lg_jv_eq(&code, ec_names[ec])) break;
        if (S->err_codes[ec]++ == 0)   /* one sample of every code */
            errsample("error frame %.*s: %.*s%s", (int)(code.n < 40 ? code.n : 40), code.p,
                      (int)(msg.n < 80 ? msg.n : 80), msg.p,
                      lg_json_get(s, n, "client_id", &w) == 0 ? " (answering a send)" : "");
        if (lg_json_get(s, n, "client_id", &v) == 0 && c->flow >= 0) {
            char cid[96];
            size_t l = v.n < sizeof(cid) - 1 ? v.n : sizeof(cid) - 1;
            memcpy(cid, v.p, l); cid[l] = 0;
            char *dot = strrchr(cid, '.');
            uint32_t seq = dot ? (uint32_t)strtoul(dot + 1, NULL, 10) : 0;
            struct flow *f = &flows[c->flow];
            if ((lg_jv_eq(&code, "rate_limited") || lg_jv_eq(&code, "unavailable"))
                && seq < f->cap && f->tries[seq] < MAX_RETRIES) {
                /* the same client_id again: the server maps it to one message;
                 * retry_after when given, else 100 ms doubling up to 2 s */
                long long ra = 100LL << (f->tries[seq] < 5 ? f->tries[seq] : 5);
                if (ra > 2000) ra = 2000;
                if (lg_json_get(s, n, "retry_after", &w) == 0) ra = lg_jv_int(&w, ra);
                f->tries[seq]++;
                struct hreq r = { HR_SEND, (uint32_t)c->flow, seq, now + (uint64_t)ra * MS };
                INC(retries);
                q_push(&rq, r, 0);     /* resent over the WebSocket by chat_resends() */
            } else {
                on_send_failed(f, seq);
            }
        }
    } else if (lg_jv_eq(&type, "receipt")) {
        INC(receipts);
    } else if (lg_jv_eq(&type, "reconnect")) {
        INC(reconnect_frames);
    } else {
        INC(other_events);
    }
}

static void chat_send_ack(struct conn *c)
{
    char buf[64];
    int n;

    c->flags &= ~F_ACK_DUE;
    if (c->cursor <= c->acked_cursor || c->state != S_OPEN || c->kind != K_WS) return;
    n = snprintf(buf, sizeof(buf), "{\"type\":\"ack\",\"cursor\":%lld}", c->cursor);
    ws_text(c, buf, (size_t)n);
    c->acked_cursor = c->cursor;
}

/* ===================================================================== */
/* Centrifugo protocol (JSON over WebSocket)                             */
/* ===================================================================== */

/* command ids: 1 connect, 2 subscribe, CF_PUB_ID + seq a publish */
#define CF_PUB_ID 16

static void cf_send_connect(struct conn *c)
{
    char tok[1024], frame[1200];
    int n;

    /* no "dev" claim: Centrifugo knows users, not devices */
    if (lg_jwt_hs256(O.secret, c->user, NULL, (long long)time(NULL) + 86400, tok, sizeof(tok)) < 0) {
        conn_fail(c, &S->f_proto, "token");
        return;
    }
    n = snprintf(frame, sizeof(frame), "{\"id\":1,\"connect\":{\"token\":\"%s\",\"name\":\"loadgen\"}}", tok);
    ws_text(c, frame, (size_t)n);
}

static void cf_send_subscribe(struct conn *c)
{
    char frame[400];
    int n;

    if (c->epoch[0])   /* back after a drop: what was missed, from the history */
        n = snprintf(frame, sizeof(frame),
                     "{\"id\":2,\"subscribe\":{\"channel\":\"%s\",\"recover\":true,\"epoch\":\"%s\",\"offset\":%" PRIu64 "}}",
                     c->chan, c->epoch, c->offset);
    else
        n = snprintf(frame, sizeof(frame), "{\"id\":2,\"subscribe\":{\"channel\":\"%s\"}}", c->chan);
    ws_text(c, frame, (size_t)n);
}

/* one publication {"data":"lg1 ...","offset":N} of the conn's channel */
static void cf_publication(struct conn *c, const char *s, size_t n)
{
    struct lg_jv data, off = { 0 };

    if (lg_json_get(s, n, "data", &data) < 0 || data.t != 's') { INC(foreign); return; }
    if (lg_json_get(s, n, "offset", &off) == 0) {
        long long o = lg_jv_int(&off, 0);
        if (o > 0 && (uint64_t)o > c->offset) c->offset = (uint64_t)o;
    }
    /* the offset is the publication's id in its channel: one per message */
    on_delivery(c, data.p, data.n, off.n ? off.p : NULL, off.n);
}

static void cf_subscribed(struct conn *c, const char *s, size_t n)
{
    struct lg_jv v;
    int again = c->epoch[0] != 0;

    if (again) {
        if (lg_json_get(s, n, "recovered", &v) == 0 && v.t == 'b' && v.n == 4) INC(recovered);
        else {
            INC(not_recovered);
            errsample("%s: resubscribed to %s without recovery: %.*s", c->user, c->chan, (int)(n < 80 ? n : 80), s);
        }
    }
    if (lg_json_get(s, n, "epoch", &v) == 0 && v.t == 's' && v.n < sizeof(c->epoch)) {
        memcpy(c->epoch, v.p, v.n);
        c->epoch[v.n] = 0;
    }
    if (lg_json_get(s, n, "publications", &v) == 0 && v.t == 'a') {
        size_t pos = 0;
        struct lg_jv pub;
        while (lg_json_next(&v, &pos, &pub) == 1)
            if (pub.t == 'o') cf_publication(c, pub.p, pub.n);
    }
    /* the stream position to recover from after a drop: the top of the
     * stream now (a recovery's publications are all below it) */
    if (lg_json_get(s, n, "offset", &v) == 0) {
        long long o = lg_jv_int(&v, 0);
        if (o > 0 && (uint64_t)o > c->offset) c->offset = (uint64_t)o;
    }
    if (c->state == S_HELLO) conn_became_open(c);
}

static int cf_error_index(long long code)
{
    switch (code) {
    case 101: case 109: return 6;    /* unauthorized, token expired */
    case 103: return 3;              /* permission denied */
    case 106: case 111: return 2;    /* limit exceeded, too many requests */
    case 107: return 0;              /* bad request */
    case 100: case 108: return 5;    /* internal, not available */
    case 102: return 4;              /* unknown channel */
    default: return EC_N - 1;
    }
}

static void cf_error(struct conn *c, long long rid, const char *s, size_t n)
{
    struct lg_jv code = { 0 }, msg = { 0 }, tmp = { 0 };
    long long cd;
    int ec;

    INC(errors_rx);
    lg_json_get(s, n, "code", &code);
    lg_json_get(s, n, "message", &msg);
    cd = lg_jv_int(&code, 0);
    ec = cf_error_index(cd);
    if (S->err_codes[ec]++ == 0)
        errsample("%s: error %lld %.*s answering command %lld", c->user, cd,
                  (int)(msg.n < 80 ? msg.n : 80), msg.p, rid);
    if (rid == 1 || rid == 2) {   /* connect or subscribe refused */
        conn_fail(c, &S->f_hello, NULL);
        return;
    }
    if (rid >= CF_PUB_ID && c->flow >= 0) {
        uint32_t seq = (uint32_t)(rid - CF_PUB_ID);
        struct flow *f = &flows[c->flow];
        int temporary = lg_json_get(s, n, "temporary", &tmp) == 0 && tmp.t == 'b' && tmp.n == 4;
        if ((temporary || cd == 111) && seq < f->cap && f->tries[seq] < MAX_RETRIES) {
            /* refused, so not published: safe to send again after a pause */
            long long ra = 100LL << (f->tries[seq] < 5 ? f->tries[seq] : 5);
            if (ra > 2000) ra = 2000;
            f->tries[seq]++;
            struct hreq r = { HR_SEND, (uint32_t)c->flow, seq, now + (uint64_t)ra * MS };
            INC(retries);
            q_push(&rq, r, 0);
        } else if (seq < f->cap) {
            on_send_failed(f, seq);
        }
    }
}

/* one reply or push (a frame can carry several, one per line) */
static void cf_reply(struct conn *c, const char *s, size_t n)
{
    struct lg_jv v, w, id;
    long long rid;

    while (n && (s[n - 1] == '\r' || s[n - 1] == ' ')) n--;
    if (!n) return;
    if (n == 2 && s[0] == '{' && s[1] == '}') {   /* the server's ping: pong */
        INC(srv_pings);
        ws_text(c, "{}", 2);
        return;
    }
    if (lg_json_get(s, n, "push", &v) == 0 && v.t == 'o') {
        if (lg_json_get(v.p, v.n, "pub", &w) == 0 && w.t == 'o') {
            struct lg_jv ch;
            if (lg_json_get(v.p, v.n, "channel", &ch) == 0 && c->chan && !lg_jv_eq(&ch, c->chan)) {
                INC(foreign);
                return;
            }
            cf_publication(c, w.p, w.n);
        } else if (lg_json_get(v.p, v.n, "disconnect", &w) == 0) {
            errsample("%s: disconnect push %.*s", c->user, (int)(w.n < 80 ? w.n : 80), w.p);
            INC(other_events);
        } else {
            INC(other_events);
        }
        return;
    }
    if (lg_json_get(s, n, "id", &id) < 0) { INC(foreign); return; }
    rid = lg_jv_int(&id, 0);
    if (lg_json_get(s, n, "error", &v) == 0 && v.t == 'o') { cf_error(c, rid, v.p, v.n); return; }
    if (rid == 1 && lg_json_get(s, n, "connect", &v) == 0) {
        if (c->state == S_HELLO) cf_send_subscribe(c);
        return;
    }
    if (rid == 2 && lg_json_get(s, n, "subscribe", &v) == 0) {
        cf_subscribed(c, v.p, v.n);
        return;
    }
    if (rid >= CF_PUB_ID && lg_json_get(s, n, "publish", &v) == 0) {
        if (c->flow >= 0) on_acked(&flows[c->flow], (uint32_t)(rid - CF_PUB_ID), NULL, 0);
        return;
    }
    INC(other_events);
}

static void cf_frame(struct conn *c, const char *s, size_t n)
{
    const char *e = s + n;

    while (s < e && c->fd >= 0) {
        const char *nl = memchr(s, '\n', (size_t)(e - s));
        const char *end = nl ? nl : e;
        cf_reply(c, s, (size_t)(end - s));
        s = nl ? nl + 1 : e;
    }
}

/* ===================================================================== */
/* incoming WebSocket data                                               */
/* ===================================================================== */

static void ws_message(struct conn *c, int op, const uint8_t *p, size_t n)
{
    if (op != 1) {
        conn_fail(c, &S->f_proto, "binary frame from server");
        return;
    }
    if (O.target == TGT_CHAT) chat_event(c, (const char *)p, n, 0);
    else if (O.target == TGT_CENTRIFUGO) cf_frame(c, (const char *)p, n);
    else on_delivery(c, (const char *)p, n, NULL, 0);
}

/* Returns bytes consumed, or -1 when the connection was closed. */
static long ws_parse(struct conn *c, const uint8_t *d, size_t len)
{
    size_t off = 0;

    while (off + 2 <= len && c->fd >= 0) {
        const uint8_t *p = d + off;
        int fin = p[0] & 0x80, op = p[0] & 0x0f, masked = p[1] & 0x80;
        uint64_t pl = p[1] & 0x7f;
        size_t h = 2;

        if (p[0] & 0x70) { conn_fail(c, &S->f_proto, "reserved bits set by server"); return -1; }
        if (pl == 126) {
            if (len - off < 4) break;
            pl = (uint64_t)p[2] << 8 | p[3];
            h = 4;
        } else if (pl == 127) {
            if (len - off < 10) break;
            pl = 0;
            for (int i = 0; i < 8; i++) pl = pl << 8 | p[2 + i];
            h = 10;
        }
        if (masked) { conn_fail(c, &S->f_proto, "masked frame from server"); return -1; }
        if (pl > 64 * 1024 * 1024) { conn_fail(c, &S->f_proto, "frame too large"); return -1; }
        if (len - off < h + pl) break;
        const uint8_t *pay = p + h;
        off += h + (size_t)pl;

        if (op >= 8) {
            if (!fin || pl > 125) { conn_fail(c, &S->f_proto, "bad control frame"); return -1; }
            if (op == 9) {
                INC(srv_pings);
                ws_send(c, 10, pay, (size_t)pl);
            } else if (op == 10) {
                if (O.target != TGT_CHAT) {
                    INC(pongs);
                    if (c->pings_out) { c->pings_out--; lg_hist_add(&S->h_pong, now - c->ping_t); }
                }
            } else if (op == 8) {
                int code = pl >= 2 ? (pay[0] << 8 | pay[1]) : 1005;
                if (c->state == S_CLOSING) {
                    c->flags |= F_GOTCLOSE;
                    /* server answered; it closes the TCP connection next */
                    c->deadline = now + NS;
                } else {
                    uint8_t echo[2] = { (uint8_t)(code >> 8), (uint8_t)code };
                    c->close_code = code;
                    if (c->state == S_HELLO || c->state == S_HANDSHAKE) {
                        errsample("%s: closed %d before hello", c->user, code);
                        ws_send(c, 8, echo, pl >= 2 ? 2 : 0);
                        conn_fail(c, &S->f_hello, NULL);
                        return -1;
                    }
                    ws_send(c, 8, echo, pl >= 2 ? 2 : 0);
                    conn_flush(c);
                    conn_close(c, 1);
                    return -1;
                }
            } else {
                conn_fail(c, &S->f_proto, "reserved opcode"); return -1;
            }
            continue;
        }
        if (op == 0) {
            if (!c->fop) { conn_fail(c, &S->f_proto, "continuation without start"); return -1; }
        } else if (c->fop) {
            conn_fail(c, &S->f_proto, "new message inside fragmented one"); return -1;
        }
        if (!fin || op == 0) {
            if (c->flen + pl > c->fcap) {
                uint32_t nc = c->fcap ? c->fcap : 4096;
                while (nc < c->flen + pl) nc *= 2;
                uint8_t *nb = realloc(c->fb, nc);
                if (!nb) { conn_fail(c, &S->f_proto, "oom"); return -1; }
                c->fb = nb; c->fcap = nc;
            }
            memcpy(c->fb + c->flen, pay, (size_t)pl);
            c->flen += (uint32_t)pl;
            if (op) c->fop = (uint8_t)op;
            if (fin) {
                int fop = c->fop;
                uint32_t fl = c->flen;
                c->fop = 0;
                c->flen = 0;
                ws_message(c, fop, c->fb, fl);
            }
        } else {
            ws_message(c, op, pay, (size_t)pl);
        }
        if (c->fd < 0) return -1;
    }
    return (long)off;
}

static const char *hdr_find(const char *h, size_t n, const char *name, size_t *vl)
{
    size_t nl = strlen(name);
    const char *p = h, *e = h + n;

    while (p < e) {
        const char *eol = memmem(p, (size_t)(e - p), "\r\n", 2);
        if (!eol) eol = e;
        if ((size_t)(eol - p) > nl && p[nl] == ':' && strncasecmp(p, name, nl) == 0) {
            const char *v = p + nl + 1;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            const char *ve = eol;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            *vl = (size_t)(ve - v);
            return v;
        }
        p = eol + 2;
    }
    return NULL;
}

static long ws_handshake_reply(struct conn *c, const uint8_t *d, size_t len)
{
    const char *s = (const char *)d, *end, *v;
    size_t hl, vl;
    int status = 0;
    char want[29];

    end = memmem(s, len, "\r\n\r\n", 4);
    if (!end) {
        if (len > 16384) { conn_fail(c, &S->f_handshake, "oversized handshake reply"); return -1; }
        return 0;
    }
    hl = (size_t)(end - s) + 4;
    if (sscanf(s, "HTTP/1.%*d %d", &status) != 1) {
        conn_fail(c, &S->f_handshake, "not an HTTP reply");
        return -1;
    }
    if (status != 101) {
        char why[96];
        const char *body = s + hl;
        size_t bl = len - hl < 60 ? len - hl : 60;
        snprintf(why, sizeof(why), "HTTP %d %.*s", status, (int)bl, body);
        for (char *q = why; *q; q++) if (*q == '\r' || *q == '\n') *q = ' ';
        conn_fail(c, &S->f_status, why);
        return -1;
    }
    v = hdr_find(s, hl, "Upgrade", &vl);
    if (!v || vl != 9 || strncasecmp(v, "websocket", 9) != 0) {
        conn_fail(c, &S->f_handshake, "101 without Upgrade: websocket");
        return -1;
    }
    lg_ws_accept(c->key, strlen(c->key), want);
    v = hdr_find(s, hl, "Sec-WebSocket-Accept", &vl);
    if (!v || vl != 28 || memcmp(v, want, 28) != 0) {
        conn_fail(c, &S->f_handshake, "bad Sec-WebSocket-Accept");
        return -1;
    }
    if (O.target == TGT_CHAT) c->state = S_HELLO;
    else if (O.target == TGT_CENTRIFUGO) {
        /* open once connected and subscribed */
        c->state = S_HELLO;
        cf_send_connect(c);
    } else conn_became_open(c);
    return (long)hl;
}

/* ===================================================================== */
/* HTTP requests (nchan publish, chat send / groups / poll)              */
/* ===================================================================== */

static void body_text(char *out, size_t cap, uint32_t gid, uint32_t seq, uint64_t t)
{
    int n = snprintf(out, cap, "lg1 %u %u %" PRIu64 " ", gid, seq, t);
    int want = O.body_size > n ? O.body_size : n;
    if ((size_t)want >= cap) want = (int)cap - 1;
    for (int i = n; i < want; i++) out[i] = (char)('a' + i % 26);
    out[want] = 0;
}

static void http_dispatch(struct conn *c)
{
    char sbody[2048], hdr[2048], tok[1024], *body = sbody, *heap = NULL;
    size_t bcap = sizeof(sbody);
    int bl = 0, hl;
    struct flow *f;
    struct hreq r;

    if (c->busy || c->state != S_OPEN) return;
    /* the first request that is due (resends wait for their time) */
    for (uint32_t k = hq.len;; k--) {
        if (!k || !hq_pop(&r)) return;
        if (!(r.type == HR_SEND && r.t > now)) break;
        hq_push(r, 0);
    }
    f = &flows[r.flow];
    if (r.type == HR_PUB) {
        body_text(body, bcap, f->gid, r.seq, r.t);
        bl = (int)strlen(body);
        hl = snprintf(hdr, sizeof(hdr),
                      "POST %s%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: text/plain\r\n"
                      "Content-Length: %d\r\n\r\n", O.pub_prefix, f->dest, O.host, O.port, bl);
    } else if (r.type == HR_SEND) {
        char text[1200];
        body_text(text, sizeof(text), f->gid, r.seq, r.t);
        bl = snprintf(body, bcap, "{\"client_id\":\"%s.%u.%u\",%s,\"body\":\"%s\"}",
                      O.run, f->gid, r.seq, f->dest, text);
        make_token(f->sender_user, tok, sizeof(tok));
        hl = snprintf(hdr, sizeof(hdr),
                      "POST %s/send HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
                      "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n",
                      O.http_prefix, O.host, O.port, tok, bl);
    } else if (r.type == HR_GROUP) {
        bcap = (size_t)f->nmembers * 52 + 128;
        body = heap = xcalloc(1, bcap);
        bl = snprintf(body, bcap, "{\"name\":\"lg %s %u\",\"members\":[", O.run, f->gid);
        for (uint32_t i = 1; i < f->nmembers; i++)
            bl += snprintf(body + bl, bcap - (size_t)bl, "%s\"%s\"", i > 1 ? "," : "", f->members[i]);
        bl += snprintf(body + bl, bcap - (size_t)bl, "]}");
        make_token(f->sender_user, tok, sizeof(tok));
        hl = snprintf(hdr, sizeof(hdr),
                      "POST %s/groups HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
                      "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n",
                      O.http_prefix, O.host, O.port, tok, bl);
    } else {
        return;
    }
    c->req = r;
    c->busy = 1;
    c->deadline = now + 30 * NS;
    if (r.type != HR_GROUP) lg_hist_add(&S->h_lag, now > r.t ? now - r.t : 0);
    conn_write(c, hdr, (size_t)hl);
    conn_write(c, body, (size_t)bl);
    free(heap);
}

static void poll_request(struct conn *c)
{
    char req[2048], tok[1024];
    int n;

    make_token(c->user, tok, sizeof(tok));
    n = snprintf(req, sizeof(req),
                 "GET %s/poll?cursor=%lld&timeout=%d HTTP/1.1\r\nHost: %s:%d\r\n"
                 "Authorization: Bearer %s\r\n\r\n",
                 O.http_prefix, c->cursor, O.poll_timeout, O.host, O.port, tok);
    c->busy = 1;
    c->req.type = HR_NONE;
    c->deadline = now + (uint64_t)(O.poll_timeout + 15) * NS;
    INC(polls);
    conn_write(c, req, (size_t)n);
}

static void conn_start_request(struct conn *c)
{
    if (c->kind == K_POLL) {
        if (phase < PH_CLOSE) poll_request(c);
    } else {
        http_dispatch(c);
    }
}

struct hresp {
    int status, close;
    const char *body;
    size_t blen;
    char *alloc;
};

/* One complete response at d: >0 bytes consumed, 0 incomplete, -1 bad. */
static long http_parse(const uint8_t *d, size_t len, struct hresp *r)
{
    const char *s = (const char *)d, *end, *v;
    size_t hl, vl;

    memset(r, 0, sizeof(*r));
    end = memmem(s, len, "\r\n\r\n", 4);
    if (!end) return len > 65536 ? -1 : 0;
    hl = (size_t)(end - s) + 4;
    if (sscanf(s, "HTTP/1.%*d %d", &r->status) != 1) return -1;
    if ((v = hdr_find(s, hl, "Connection", &vl)) && vl == 5 && strncasecmp(v, "close", 5) == 0)
        r->close = 1;
    if ((v = hdr_find(s, hl, "Transfer-Encoding", &vl)) && memmem(v, vl, "chunked", 7)) {
        size_t p = hl, cap = 0, bl = 0;
        char *buf = NULL;
        for (;;) {
            const char *eol = memmem(s + p, len - p, "\r\n", 2);
            if (!eol) { free(buf); return 0; }
            size_t sz = strtoul(s + p, NULL, 16);
            p = (size_t)(eol - s) + 2;
            if (sz == 0) {
                /* trailers until an empty line */
                for (;;) {
                    const char *e2 = memmem(s + p, len - p, "\r\n", 2);
                    if (!e2) { free(buf); return 0; }
                    size_t ll = (size_t)(e2 - (s + p));
                    p += ll + 2;
                    if (ll == 0) break;
                }
                r->alloc = buf;
                r->body = buf ? buf : "";
                r->blen = bl;
                return (long)p;
            }
            if (len - p < sz + 2) { free(buf); return 0; }
            if (bl + sz > cap) {
                cap = (bl + sz) * 2;
                char *nb = realloc(buf, cap);
                if (!nb) { free(buf); return -1; }
                buf = nb;
            }
            memcpy(buf + bl, s + p, sz);
            bl += sz;
            p += sz + 2;
        }
    }
    size_t cl = 0;
    if ((v = hdr_find(s, hl, "Content-Length", &vl))) cl = strtoul(v, NULL, 10);
    if (len - hl < cl) return 0;
    r->body = s + hl;
    r->blen = cl;
    return (long)(hl + cl);
}

static void http_response(struct conn *c, struct hresp *r)
{
    struct hreq q = c->req;
    struct flow *f = q.type != HR_NONE ? &flows[q.flow] : NULL;
    struct lg_jv v;

    c->busy = 0;
    c->req.type = HR_NONE;
    c->deadline = UINT64_MAX;
    if (c->kind == K_POLL) {
        if (r->status != 200) {
            if (!(c->flags & F_EVER)) { conn_fail(c, &S->f_status, "poll status"); return; }
            errsample("%s: poll HTTP %d %.60s", c->user, r->status, r->body);
            INC(errors_rx);
            return;
        }
        if (lg_json_get(r->body, r->blen, "events", &v) == 0) {
            size_t pos = 0;
            struct lg_jv ev;
            while (lg_json_next(&v, &pos, &ev) == 1)
                if (ev.t == 'o') chat_event(c, ev.p, ev.n, 1);
        }
        if (lg_json_get(r->body, r->blen, "cursor", &v) == 0) {
            long long cur = lg_jv_int(&v, c->cursor);
            if (cur > c->cursor) c->cursor = cur;
        }
        c->acked_cursor = c->cursor;    /* polling with cursor n acknowledges n */
        return;
    }
    if (!f) return;
    if (q.type == HR_PUB) {
        if (r->status == 201 || r->status == 202) on_acked(f, q.seq, NULL, 0);
        else {
            errsample("publish HTTP %d", r->status);
            on_send_failed(f, q.seq);
        }
    } else if (q.type == HR_SEND) {
        if (r->status == 200) {
            struct lg_jv id = { 0 };
            lg_json_get(r->body, r->blen, "id", &id);
            on_acked(f, q.seq, id.p, id.n);
        } else if ((r->status == 429 || r->status == 503) && q.seq < f->cap && f->tries[q.seq] < MAX_RETRIES) {
            uint64_t ra = 100 << (f->tries[q.seq] < 4 ? f->tries[q.seq] : 4);
            f->tries[q.seq]++;
            q.t = now + ra * MS;
            INC(retries);
            hq_push(q, 0);
        } else {
            errsample("send HTTP %d %.60s", r->status, r->body);
            on_send_failed(f, q.seq);
        }
    } else if (q.type == HR_GROUP) {
        if ((r->status == 201 || r->status == 200) && lg_json_get(r->body, r->blen, "group", &v) == 0
            && v.t == 's' && v.n < 64) {
            snprintf(f->dest, sizeof(f->dest), "\"group\":\"%.*s\"", (int)v.n, v.p);
            f->ready = 1;
            INC(flows_ready);
        } else {
            errsample("create group HTTP %d %.80s", r->status, r->body);
            f->failed = 1;
            INC(flows_failed);
        }
    }
}

static long http_input(struct conn *c, const uint8_t *d, size_t len)
{
    size_t off = 0;

    while (off < len) {
        struct hresp r;
        long n = http_parse(d + off, len - off, &r);
        if (n == 0) break;
        if (n < 0) { conn_fail(c, &S->f_proto, "bad HTTP response"); return -1; }
        off += (size_t)n;
        if (!c->busy) { free(r.alloc); INC(foreign); continue; }
        http_response(c, &r);
        free(r.alloc);
        if (c->fd < 0) return -1;
        if (r.close) { conn_close(c, 0); return -1; }
        conn_start_request(c);
    }
    return (long)off;
}

/* ===================================================================== */
/* event handling                                                        */
/* ===================================================================== */

static long conn_input(struct conn *c, const uint8_t *d, size_t len)
{
    long used = 0, n;

    if (c->kind != K_WS) return http_input(c, d, len);
    if (c->state == S_HANDSHAKE) {
        used = ws_handshake_reply(c, d, len);
        if (used <= 0) return used;
    }
    n = ws_parse(c, d + used, len - (size_t)used);
    if (n < 0) return -1;
    return used + n;
}

static void conn_readable(struct conn *c)
{
    for (int loop = 0; loop < 8; loop++) {
        ssize_t r = recv(c->fd, scratch, SCRATCH, 0);
        const uint8_t *d;
        size_t len;
        long used;

        if (r == 0) {
            if (c->state == S_CLOSING) { conn_close(c, 0); return; }
            if (c->state == S_OPEN) {
                if (c->kind == K_HTTP && !c->busy) { conn_close(c, 0); return; }
                errsample("%s: server closed the connection", c->user);
                conn_close(c, 1);
                return;
            }
            conn_fail(c, c->state == S_HELLO ? &S->f_hello : &S->f_handshake,
                      "closed during handshake");
            return;
        }
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            errsample("%s: recv: %s", c->user, strerror(errno));
            if (c->state == S_CLOSING) { conn_close(c, 0); return; }
            conn_fail(c, NULL, NULL);
            return;
        }
        if (c->rlen) {
            if (c->rlen + (size_t)r > c->rcap) {
                uint32_t nc = c->rcap ? c->rcap : 4096;
                while (nc < c->rlen + (size_t)r) nc *= 2;
                uint8_t *nb = realloc(c->rb, nc);
                if (!nb) { conn_fail(c, NULL, "oom"); return; }
                c->rb = nb; c->rcap = nc;
            }
            memcpy(c->rb + c->rlen, scratch, (size_t)r);
            c->rlen += (uint32_t)r;
            d = c->rb; len = c->rlen;
        } else {
            d = scratch; len = (size_t)r;
        }
        used = conn_input(c, d, len);
        if (used < 0 || c->fd < 0) return;
        if ((size_t)used < len) {
            size_t left = len - (size_t)used;
            if (d == c->rb) {
                memmove(c->rb, c->rb + used, left);
            } else {
                if (left > c->rcap) {
                    uint32_t nc = 4096;
                    while (nc < left) nc *= 2;
                    uint8_t *nb = realloc(c->rb, nc);
                    if (!nb) { conn_fail(c, NULL, "oom"); return; }
                    c->rb = nb; c->rcap = nc;
                }
                memcpy(c->rb, d + used, left);
            }
            c->rlen = (uint32_t)left;
        } else {
            c->rlen = 0;
            if (c->rcap > 65536) { free(c->rb); c->rb = NULL; c->rcap = 0; }
        }
        if ((size_t)r < SCRATCH) break;
    }
    if (c->flags & F_ACK_DUE) chat_send_ack(c);
}

static void conn_event(struct conn *c, uint32_t ev)
{
    if (c->fd < 0) return;
    if (c->state == S_CONNECTING) {
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) conn_connected(c);
        if (c->fd < 0 || c->state == S_CONNECTING) return;
        if (c->wlen) conn_flush(c);
        return;
    }
    if (ev & EPOLLOUT) conn_flush(c);
    if (c->fd >= 0 && (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) conn_readable(c);
    if (c->fd >= 0 && (c->flags & F_BROKEN)) {
        if (c->state == S_CLOSING) conn_close(c, 0);
        else conn_fail(c, NULL, "write failed");
    }
}

/* ===================================================================== */
/* periodic work                                                         */
/* ===================================================================== */

static void send_ping(struct conn *c)
{
    static const char ping[] = "{\"type\":\"ping\"}";
    if (c->pings_out > 1) INC(pong_late);
    c->pings_out++;
    c->ping_t = now;
    INC(pings);
    if (O.target == TGT_CHAT) ws_text(c, ping, sizeof(ping) - 1);
    else ws_send(c, 9, "lgping", 6);
}

static void scan_conns(void)
{
    for (uint32_t i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->fd < 0) {
            if ((c->flags & F_RETRY) && now >= c->retry_at) {
                c->flags &= ~F_RETRY;
                if (phase < PH_CLOSE) openq_push(c);
            }
            continue;
        }
        if (c->flags & F_BROKEN) {
            if (c->state == S_CLOSING) conn_close(c, 0); else conn_fail(c, NULL, "write failed");
            continue;
        }
        switch (c->state) {
        case S_CONNECTING:
        case S_HANDSHAKE:
        case S_HELLO:
            if (now > c->deadline) conn_fail(c, &S->f_timeout, "handshake timeout");
            break;
        case S_CLOSING:
            if (now > c->deadline) conn_close(c, (c->flags & F_GOTCLOSE) ? 0 : 3);
            break;
        case S_OPEN:
            if (c->kind == K_WS) {
                if (now >= c->life) { conn_begin_close(c); break; }
                if (now >= c->next_ping) {
                    send_ping(c);
                    c->next_ping = now + (uint64_t)(O.ping_interval * NS);
                }
            } else if (c->busy && now > c->deadline) {
                conn_fail(c, &S->f_timeout, "HTTP request timeout");
            }
            break;
        }
    }
}

/* the WebSocket frame that sends message seq of flow f (intended at t) */
static int send_frame(struct flow *f, uint32_t seq, uint64_t t, char *frame, size_t cap)
{
    char text[1200];

    body_text(text, sizeof(text), f->gid, seq, t);
    if (O.target == TGT_CENTRIFUGO)   /* the data is a JSON string */
        return snprintf(frame, cap, "{\"id\":%u,\"publish\":{\"channel\":\"%s\",\"data\":\"%s\"}}",
                        CF_PUB_ID + seq, f->dest, text);
    return snprintf(frame, cap, "{\"type\":\"send\",\"client_id\":\"%s.%u.%u\",%s,\"body\":\"%s\"}",
                    O.run, f->gid, seq, f->dest, text);
}

static int ws_sender(void)   /* messages go out over the sender's WebSocket */
{
    return O.target == TGT_CENTRIFUGO || (O.target == TGT_CHAT && O.transport == TR_WS);
}

static void send_one(struct flow *f, uint64_t t)
{
    uint32_t seq;

    if (f->next_seq >= f->cap) { INC(skipped); return; }
    if (ws_sender()) {
        if (!f->sender || f->sender->state != S_OPEN) { INC(skipped); return; }
    }
    seq = f->next_seq++;
    f->send_ns[seq] = t;
    f->inflight++;
    INC(sent);
    if (O.target == TGT_NCHAN) {
        struct hreq r = { HR_PUB, (uint32_t)(f - flows), seq, t };
        hq_push(r, 0);
    } else if (O.transport == TR_POLL) {
        struct hreq r = { HR_SEND, (uint32_t)(f - flows), seq, t };
        hq_push(r, 0);
    } else {
        char frame[1600];
        int n = send_frame(f, seq, t, frame, sizeof(frame));
        lg_hist_add(&S->h_lag, now > t ? now - t : 0);
        ws_text(f->sender, frame, (size_t)n);
    }
}

/* WebSocket resends: chat after rate_limited / unavailable (same
 * client_id), Centrifugo after a refused (so unpublished) publish. */
static void ws_resends(void)
{
    uint32_t n = rq.len;
    while (n--) {
        struct hreq r;
        q_pop(&rq, &r);
        struct flow *f = &flows[r.flow];
        if (r.seq < f->cap && f->tries[r.seq] == TRIES_FAILED) continue;
        if (r.t > now || !f->sender || f->sender->state != S_OPEN) { q_push(&rq, r, 0); continue; }
        char frame[1600];
        int l = send_frame(f, r.seq, f->send_ns[r.seq], frame, sizeof(frame));
        ws_text(f->sender, frame, (size_t)l);
    }
}

static int flow_can_send(struct flow *f)
{
    if (!f->ready || f->failed) return 0;
    if (ws_sender() && (!f->sender || f->sender->state != S_OPEN))
        return 0;
    return 1;
}

static void do_sends(void)
{
    if (!nflows || phase != PH_RUN) return;
    if (O.scenario == SC_OFFLINE) {
        for (uint32_t i = 0; i < nflows; i++) {
            struct flow *f = &flows[i];
            if (!flow_can_send(f)) continue;
            while (f->next_seq < (uint32_t)O.messages && f->inflight < (uint32_t)O.window)
                send_one(f, now);
        }
        return;
    }
    if (my_rate <= 0) return;
    /* message j is due at run_t0 + j / rate */
    uint64_t due = (uint64_t)((double)(now - run_t0) * my_rate / 1e9) + 1;
    while (sched_n < due) {
        uint64_t t = run_t0 + (uint64_t)((double)sched_n * 1e9 / my_rate);
        struct flow *f = NULL;
        for (uint32_t k = 0; k < nflows; k++) {
            struct flow *g = &flows[(rr_flow + k) % nflows];
            if (flow_can_send(g)) { f = g; rr_flow = (rr_flow + k + 1) % nflows; break; }
        }
        sched_n++;
        if (!f) { INC(skipped); continue; }
        send_one(f, t);
    }
}

static void open_some(void)
{
    static uint64_t opened, t_ramp;
    uint64_t due;
    double per_proc = O.ramp / O.procs;

    if (!t_ramp) t_ramp = now;
    due = per_proc > 0 ? (uint64_t)((double)(now - t_ramp) * per_proc / 1e9) + 1 : UINT64_MAX;
    while (oq_len && hs_inflight < (uint32_t)O.max_inflight_hs) {
        struct conn *c = openq[oq_head];
        /* initial connections follow the ramp; reconnects go at once */
        if ((c->flags & F_INITIAL) && opened >= due) break;
        openq_pop();
        if (c->flags & F_INITIAL) opened++;
        if (c->state != S_NONE) continue;
        conn_open(c);
    }
}

static void enter_phase(int ph)
{
    phase = ph;
    phase_t = now;
    switch (ph) {
    case PH_CONNECT:
        __atomic_store_n(&S->planned, 1, __ATOMIC_RELEASE);
        for (uint32_t i = 0; i < nconns; i++) {
            struct conn *c = &conns[i];
            if (c->flags & F_DEFERRED) continue;
            c->flags |= F_INITIAL;
            INC(init_target);
            openq_push(c);
        }
        for (uint32_t i = 0; i < nflows; i++) {
            struct flow *f = &flows[i];
            if (O.target == TGT_CHAT && O.scenario == SC_FANOUT) {
                struct hreq r = { HR_GROUP, i, 0, now };
                hq_push(r, 0);
            } else {
                f->ready = 1;
                INC(flows_ready);
            }
        }
        break;
    case PH_RUN:
        run_t0 = now;
        sched_n = 0;
        if (my_rate > 0 && O.scenario != SC_OFFLINE) {
            /* wake up for every scheduled send, at most every 50 us */
            uint64_t iv = (uint64_t)(1e9 / my_rate);
            if (iv < 50000) iv = 50000;
            struct itimerspec its = {
                .it_interval = { (time_t)(iv / NS), (long)(iv % NS) },
                .it_value = { 0, 1000 },
            };
            timerfd_settime(tfd, 0, &its, NULL);
        }
        if (O.scenario == SC_CHURN) {
            double mean = O.conns / O.churn_rate;
            for (uint32_t i = 0; i < nconns; i++)
                if (conns[i].state == S_OPEN && conns[i].role == R_PLAIN)
                    conns[i].life = now + (uint64_t)(mean * NS * lg_rand01());  /* N/mean per s from the start */
        }
        break;
    case PH_DRAIN: {
        struct itimerspec off = { { 0, 0 }, { 0, 0 } };
        timerfd_settime(tfd, 0, &off, NULL);
        for (uint32_t i = 0; i < nconns; i++) conns[i].life = UINT64_MAX;
        break;
    }
    case PH_LATE:
        for (uint32_t i = 0; i < nconns; i++)
            if (conns[i].flags & F_DEFERRED) { conns[i].t_start = now; openq_push(&conns[i]); }
        for (uint32_t i = 0; i < nflows; i++) flows[i].late_start = now;
        break;
    case PH_CLOSE:
        oq_len = 0;
        for (uint32_t i = 0; i < nconns; i++) {
            struct conn *c = &conns[i];
            if (c->fd < 0) { c->state = S_DONE; continue; }
            if (c->state == S_OPEN && c->kind == K_WS) conn_begin_close(c);
            else if (c->state != S_CLOSING) conn_close(c, c->state == S_OPEN ? 0 : 2);
            if (c->fd < 0) c->state = S_DONE;
        }
        break;
    }
}

/* ===================================================================== */
/* final accounting in the child                                         */
/* ===================================================================== */

static void account(void)
{
    size_t ll = 0;
    int listed = 0;

    for (uint32_t i = 0; i < nflows; i++) {
        struct flow *f = &flows[i];
        for (uint32_t r = 0; r < f->nrecv; r++) {
            for (uint32_t s = 0; s < f->next_seq && s < f->cap; s++) {
                int a = bit_get(f->acked, s), seen = bit_get(f->seen, (uint64_t)r * f->cap + s);
                if (a && !seen) {
                    INC(lost);
                    if (listed < 12 && ll < sizeof(S->lost_list) - 48) {
                        ll += (size_t)snprintf(S->lost_list + ll, sizeof(S->lost_list) - ll,
                                               "%sflow %u seq %u to %s", listed ? "; " : "",
                                               f->gid, s, f->recv[r] ? f->recv[r]->user : "?");
                        listed++;
                    }
                } else if (!a && seen) {
                    INC(unacked_delivered);
                }
            }
        }
    }
}

/* ===================================================================== */
/* the child's plan                                                      */
/* ===================================================================== */

static struct conn *new_conn(int kind, int role, const char *user)
{
    struct conn *c = &conns[nconns];
    memset(c, 0, sizeof(*c));
    c->fd = -1;
    c->idx = nconns++;
    c->kind = (uint8_t)kind;
    c->role = (uint8_t)role;
    c->flow = -1;
    c->life = UINT64_MAX;
    c->deadline = UINT64_MAX;
    c->next_ping = UINT64_MAX;
    snprintf(c->user, sizeof(c->user), "%s", user);
    return c;
}

static uint32_t flow_cap(uint32_t total_flows)
{
    if (O.scenario == SC_OFFLINE) return (uint32_t)O.messages;
    double per = O.rate * O.duration / (total_flows ? total_flows : 1);
    return (uint32_t)(per * 1.5) + 64;
}

/* Centrifugo: the user's channel, which only that user may subscribe to
 * (a user-limited channel: the part after # lists the users) */
static char *cf_personal(const char *user)
{
    size_t n = strlen(user) + 11;
    char *ch = xcalloc(1, n);
    snprintf(ch, n, "personal:#%s", user);
    return ch;
}

static void plan_child(void)
{
    uint32_t plain_lo = 0, plain_hi = 0, flow_lo = 0, flow_hi = 0, total_flows = 0;
    uint32_t members = 2, max = 0;
    char name[64];

    if (O.scenario == SC_IDLE || O.scenario == SC_CHURN) {
        plain_lo = (uint32_t)((uint64_t)O.conns * (uint64_t)child_no / (uint64_t)O.procs);
        plain_hi = (uint32_t)((uint64_t)O.conns * (uint64_t)(child_no + 1) / (uint64_t)O.procs);
    }
    if (O.scenario == SC_ONE2ONE || O.scenario == SC_OFFLINE) { total_flows = (uint32_t)O.pairs; members = 2; }
    if (O.scenario == SC_FANOUT) { total_flows = (uint32_t)O.groups; members = (uint32_t)O.group_size; }
    if (O.scenario == SC_CHURN && O.pairs > 0 && O.rate > 0) { total_flows = (uint32_t)O.pairs; members = 2; }
    flow_lo = (uint32_t)((uint64_t)total_flows * (uint64_t)child_no / (uint64_t)O.procs);
    flow_hi = (uint32_t)((uint64_t)total_flows * (uint64_t)(child_no + 1) / (uint64_t)O.procs);

    nflows = flow_hi - flow_lo;
    int pool_n = 0;
    if (nflows) {
        if (O.target == TGT_NCHAN || O.transport == TR_POLL) pool_n = O.pub_conns;
        else if (O.target == TGT_CHAT && O.scenario == SC_FANOUT) pool_n = 2;   /* group creation */
    }
    max = (plain_hi - plain_lo) + nflows * members + (uint32_t)pool_n;
    conns = xcalloc(max, sizeof(*conns));
    flows = xcalloc(nflows, sizeof(*flows));
    pool = xcalloc((size_t)pool_n, sizeof(*pool));

    for (uint32_t g = plain_lo; g < plain_hi; g++) {
        snprintf(name, sizeof(name), "%si%u", O.run, g);
        struct conn *c = new_conn(O.target == TGT_CHAT && O.transport == TR_POLL ? K_POLL : K_WS,
                                  R_PLAIN, name);
        if (O.target == TGT_CENTRIFUGO) c->chan = cf_personal(name);
    }
    for (uint32_t k = 0; k < nflows; k++) {
        struct flow *f = &flows[k];
        uint32_t gid = flow_lo + k;
        f->gid = gid;
        f->cap = flow_cap(total_flows);
        f->send_ns = xcalloc(f->cap, sizeof(uint64_t));
        f->idh = xcalloc(f->cap, sizeof(uint64_t));
        f->tries = xcalloc(f->cap, 1);
        f->acked = xcalloc((f->cap + 7) / 8, 1);
        f->nrecv = members - 1;
        f->recv = xcalloc(f->nrecv, sizeof(*f->recv));
        f->rcount = xcalloc(f->nrecv, sizeof(uint32_t));
        f->mcount = xcalloc(f->cap, sizeof(uint32_t));
        f->seen = xcalloc(((uint64_t)f->nrecv * f->cap + 7) / 8, 1);
        f->members = xcalloc(members, sizeof(*f->members));
        f->nmembers = members;
        for (uint32_t m = 0; m < members; m++) {
            if (members == 2) snprintf(f->members[m], 48, "%s%c%u", O.run, m ? 'b' : 'a', gid);
            else snprintf(f->members[m], 48, "%sg%um%u", O.run, gid, m);
        }
        snprintf(f->sender_user, sizeof(f->sender_user), "%s", f->members[0]);
        INC(flows);
        if (O.target == TGT_CHAT) {
            if (members == 2) snprintf(f->dest, sizeof(f->dest), "\"to\":\"%s\"", f->members[1]);
            if (O.transport == TR_WS) {
                f->sender = new_conn(K_WS, R_SENDER, f->members[0]);
                f->sender->flow = (int32_t)k;
            }
        } else if (O.target == TGT_CENTRIFUGO) {
            /* one to one: into the recipient's channel; a group: into the
             * group's channel, which its members subscribe to */
            if (members == 2) snprintf(f->dest, sizeof(f->dest), "personal:#%s", f->members[1]);
            else snprintf(f->dest, sizeof(f->dest), "group:%sg%u", O.run, gid);
            f->sender = new_conn(K_WS, R_SENDER, f->members[0]);
            f->sender->flow = (int32_t)k;
            f->sender->chan = cf_personal(f->members[0]);   /* every user has one */
        } else {
            snprintf(f->dest, sizeof(f->dest), "%sf%u", O.run, gid);
        }
        for (uint32_t r = 0; r < f->nrecv; r++) {
            const char *u = O.target == TGT_NCHAN ? f->dest : f->members[r + 1];
            struct conn *c = new_conn(O.target == TGT_CHAT && O.transport == TR_POLL ? K_POLL : K_WS,
                                      R_RECV, u);
            if (O.target == TGT_CENTRIFUGO) c->chan = members == 2 ? cf_personal(u) : f->dest;
            c->flow = (int32_t)k;
            c->rslot = r;
            if (O.scenario == SC_OFFLINE) c->flags |= F_DEFERRED;
            f->recv[r] = c;
        }
    }
    for (int i = 0; i < pool_n; i++) {
        snprintf(name, sizeof(name), "http%d", i);
        pool[npool++] = new_conn(K_HTTP, R_HTTP, name);
    }
    my_rate = total_flows ? O.rate * (double)nflows / (double)total_flows : 0;
}

static void child_main(void)
{
    struct epoll_event evs[512];
    uint64_t last_scan = 0;
    pid_t parent = getppid();

    S = &SH->st[child_no];
    lg_srand((uint64_t)getpid() * 0x9E3779B97F4A7C15ull ^ lg_now_ns());
    signal(SIGPIPE, SIG_IGN);
    scratch = xcalloc(1, SCRATCH);
    ep = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    {
        struct epoll_event tev = { .events = EPOLLIN, .data.ptr = &timer_tag };
        epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    }
    now = lg_now_ns();
    plan_child();

    for (;;) {
        int want = LD(SH->phase);
        now = lg_now_ns();
        if (now > LD(SH->deadline_ns) + 5 * NS || getppid() != parent) want = PH_EXIT;
        while (phase < want) {
            enter_phase(phase + 1);
            if (phase == PH_EXIT) break;
        }
        if (phase >= PH_EXIT) break;

        int timeout = (phase == PH_RUN && O.scenario == SC_OFFLINE) ? 1 : 10;
        int n = epoll_wait(ep, evs, 512, timeout);
        now = lg_now_ns();
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &timer_tag) {
                uint64_t exp;
                if (read(tfd, &exp, sizeof(exp)) < 0) { /* nothing to do */ }
                continue;
            }
            conn_event(evs[i].data.ptr, evs[i].events);
        }

        if (phase >= PH_CONNECT && phase < PH_CLOSE) open_some();
        if (ws_sender() && phase < PH_CLOSE && rq.len) ws_resends();
        do_sends();
        for (uint32_t i = 0; i < npool; i++) http_dispatch(pool[i]);
        if (now - last_scan > 50 * MS) {
            last_scan = now;
            scan_conns();
        }
    }
    account();
    for (uint32_t i = 0; i < nconns; i++) if (conns[i].fd >= 0) conn_close(&conns[i], 3);
    __atomic_store_n(&S->exited, 1, __ATOMIC_RELEASE);
    _exit(0);
}

/* ===================================================================== */
/* parent: aggregation and report                                        */
/* ===================================================================== */

#define SUM(field) ({ uint64_t _s = 0; for (int _i = 0; _i < O.procs; _i++) _s += LD(SH->st[_i].field); _s; })

static const char *target_label(void)
{
    static char buf[64];
    const char *base = O.label[0] ? O.label : O.target == TGT_CHAT ? "ngx-chat"
                       : O.target == TGT_CENTRIFUGO ? "centrifugo" : "nchan";
    snprintf(buf, sizeof(buf), "%s%s", base, O.transport == TR_POLL ? "-poll" : "");
    return buf;
}

static void print_hist(const char *name, const struct lg_hist *h, FILE *out)
{
    if (!h->count) { fprintf(out, "  %-22s (none)\n", name); return; }
    fprintf(out, "  %-22s n=%-9" PRIu64 " p50 %9.3f  p90 %9.3f  p99 %9.3f  p99.9 %9.3f  max %9.3f  mean %9.3f ms\n",
            name, h->count, lg_hist_pct(h, 50) / 1e6, lg_hist_pct(h, 90) / 1e6, lg_hist_pct(h, 99) / 1e6,
            lg_hist_pct(h, 99.9) / 1e6, h->max / 1e6, h->sum / (double)h->count / 1e6);
}

static void result_hist(FILE *out, const char *name, const struct lg_hist *h)
{
    fprintf(out, " %s_n=%" PRIu64 " %s_p50_us=%.1f %s_p90_us=%.1f %s_p99_us=%.1f %s_p999_us=%.1f %s_max_us=%.1f",
            name, h->count, name, lg_hist_pct(h, 50) / 1e3, name, lg_hist_pct(h, 90) / 1e3,
            name, lg_hist_pct(h, 99) / 1e3, name, lg_hist_pct(h, 99.9) / 1e3, name, h->max / 1e3);
}

static void dump_hist(FILE *out, const char *name, const struct lg_hist *h)
{
    if (!h->count) return;
    fprintf(out, "HIST target=%s scenario=%s rate=%g name=%s buckets_us=", target_label(),
            sc_names[O.scenario], O.rate, name);
    int first = 1;
    for (int i = 0; i < LG_HIST_N; i++) {
        if (!h->b[i]) continue;
        fprintf(out, "%s%.3f:%" PRIu64, first ? "" : ",", lg_hist_bucket_hi(i) / 1e3, h->b[i]);
        first = 0;
    }
    fputc('\n', out);
}

struct memsnap { int ok; struct lg_mem m; uint64_t held; };

static void mem_take(struct memsnap *s, uint64_t held)
{
    s->held = held;
    s->ok = O.pidfile[0] && lg_mem_read(O.pidfile, &s->m) == 0;
}

static void print_mem(const char *what, const struct memsnap *s)
{
    if (!s->ok) return;
    printf("  %-28s %d workers  RSS %8" PRIu64 " kB  PSS %8" PRIu64 " kB  private %8" PRIu64
           " kB  (%" PRIu64 " connections open)\n", what, s->m.nproc, s->m.rss_kb, s->m.pss_kb,
           s->m.priv_kb, s->held);
}

static void progress(uint64_t t0)
{
    fprintf(stderr, "[%s %s] t=%5.1fs %-7s open %6" PRIu64 "/%-6" PRIu64 " fail %" PRIu64
            " drop %" PRIu64 " pings %" PRIu64 " pongs %" PRIu64,
            target_label(), sc_names[O.scenario], (double)(lg_now_ns() - t0) / 1e9,
            ph_names[LD(SH->phase)], SUM(open), SUM(init_target), SUM(failed), SUM(dropped),
            SUM(pings), SUM(pongs));
    if (O.scenario != SC_IDLE)
        fprintf(stderr, " conn %" PRIu64, SUM(established));
    if (SUM(flows))
        fprintf(stderr, " sent %" PRIu64 " acked %" PRIu64 " deliv %" PRIu64 "/%" PRIu64,
                SUM(sent), SUM(acked), SUM(delivered), SUM(expected));
    fputc('\n', stderr);
}

/* Redis snapshots around the measured phase: just before the sending
 * starts, and when it is over (the drain done), before the closing */
static struct lg_redis redis_a, redis_b;
static uint64_t redis_ta, redis_tb;
static struct lg_redis_mon redis_mon;
static uint64_t mon_d0, mon_d1;     /* deliveries when the MONITOR sample began and ended */

static void set_phase(int ph)
{
    if (O.redis_port && ph == PH_RUN && !redis_a.ok) {
        if (lg_redis_snap(O.redis_host, O.redis_port, &redis_a) < 0)
            fprintf(stderr, "loadgen: no INFO from Redis %s:%d\n", O.redis_host, O.redis_port);
        redis_ta = lg_now_ns();
    }
    if (O.redis_port && ph >= PH_CLOSE && redis_a.ok && !redis_b.ok) {
        if (lg_redis_snap(O.redis_host, O.redis_port, &redis_b) < 0)
            fprintf(stderr, "loadgen: no INFO from Redis %s:%d\n", O.redis_host, O.redis_port);
        redis_tb = lg_now_ns();
    }
    __atomic_store_n(&SH->phase_ns, lg_now_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(&SH->phase, ph, __ATOMIC_RELEASE);
}

static int usage(int rc)
{
    fprintf(rc ? stderr : stdout,
"usage: loadgen --target chat|nchan|centrifugo --scenario idle|churn|one2one|fanout|offline [options]\n"
"  --url ws://HOST:PORT/PATH   target (or --host, --port, --path)\n"
"  --secret S | --env FILE     JWT HS256 secret (FILE: CHAT_JWT_SECRET=... line);\n"
"                              centrifugo: its client.token.hmac_secret_key (--secret)\n"
"  --procs N                   processes (default: one per 4000 connections)\n"
"  --conns N                   idle/churn: connections (default 1000)\n"
"  --ramp R                    new connections per second, all processes (default 1000)\n"
"  --hold S                    idle: seconds to hold after connecting (default 10)\n"
"  --ping-interval S           heartbeat; chat default: the hello's heartbeat, nchan 30\n"
"  --src-addrs K               bind sources to 127.0.0.2 .. 127.0.0.(K+1) (default 4; 0 off)\n"
"  --pidfile F                 nginx master pid file: measure worker memory (idle); a pid\n"
"                              without nginx workers (centrifugo) is measured itself\n"
"  --redis HOST:PORT           the server's Redis: commands, scripts and CPU time it spent\n"
"                              from the start of sending to the end of the drain (INFO)\n"
"  --redis-monitor S           and MONITOR it for S seconds in the middle of the sending:\n"
"                              clients' commands apart from redis.calls inside scripts\n"
"                              (MONITOR slows Redis while it is on)\n"
"  --churn-rate R              churn: connections replaced per second (default 100)\n"
"  --pairs N                   one2one/offline (and churn with --rate): conversations\n"
"  --groups N --group-size K   fanout: groups of K members (one sender, K-1 receivers)\n"
"  --rate R                    offered messages per second, all processes\n"
"  --duration S                seconds of sending (one2one, fanout, churn)\n"
"  --stop-file PATH            ... or less: until PATH exists (a benchmark's other part is done)\n"
"  --messages M --window W     offline: messages waiting per user, sends in flight\n"
"  --body-size B               message body bytes (default 100)\n"
"  --transport ws|poll         chat: WebSocket, or long-poll receivers (GET /chat/poll) and\n"
"                              senders over POST /chat/send\n"
"  --poll-timeout S            long-poll timeout parameter (default 25)\n"
"  --device D                  chat: device id in the tokens (default lg)\n"
"  --http-prefix P             chat: HTTP prefix (default /chat)\n"
"  --sub-prefix P --pub-prefix P  nchan: locations (default /sub/ and /pub/; offline uses /subold/)\n"
"  --settle S                  idle: pause before the memory measurement (default 1)\n"
"  --offline-wait S            offline: pause between the last ack and the receivers' connect\n"
"                              (default 0: they connect while the pipeline may still be storing)\n"
"  --pub-conns N               HTTP publisher connections per process (default 8)\n"
"  --drain S                   stop waiting for deliveries after S seconds without progress (default 10)\n"
"  --max-time S                hard limit for the whole run\n"
"  --run TAG                   prefix of user and channel names (default: random)\n"
"  --label L                   name of the target in the report\n"
"  --hist                      print histogram buckets (HIST lines) for plots\n"
"  --progress S                progress line on stderr every S seconds (0: none)\n"
"  -v                          print every error sample as it happens\n");
    return rc;
}

static int parse_url(const char *u)
{
    const char *p = u, *slash;
    char hostport[128];

    if (strncmp(p, "ws://", 5) == 0) p += 5;
    else if (strncmp(p, "http://", 7) == 0) p += 7;
    slash = strchr(p, '/');
    size_t hl = slash ? (size_t)(slash - p) : strlen(p);
    if (hl >= sizeof(hostport)) return -1;
    memcpy(hostport, p, hl);
    hostport[hl] = 0;
    char *colon = strrchr(hostport, ':');
    if (colon) { *colon = 0; O.port = atoi(colon + 1); }
    snprintf(O.host, sizeof(O.host), "%.63s", hostport);
    if (slash) snprintf(O.ws_path, sizeof(O.ws_path), "%s", slash);
    return 0;
}

static int read_env_secret(const char *file)
{
    char line[1024];
    FILE *f = fopen(file, "r");
    if (!f) { perror(file); return -1; }
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "CHAT_JWT_SECRET=", 16) == 0) {
            line[strcspn(line, "\r\n")] = 0;
            snprintf(O.secret, sizeof(O.secret), "%.255s", line + 16);
        } else if (strncmp(line, "CHAT_WS_URL=", 12) == 0 && !O.port) {
            line[strcspn(line, "\r\n")] = 0;
            parse_url(line + 12);
        }
    }
    fclose(f);
    return O.secret[0] ? 0 : -1;
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "target", 1, 0, 't' }, { "scenario", 1, 0, 's' }, { "url", 1, 0, 'u' },
        { "host", 1, 0, 'H' }, { "port", 1, 0, 'P' }, { "path", 1, 0, 'W' },
        { "secret", 1, 0, 'k' }, { "env", 1, 0, 'e' }, { "procs", 1, 0, 'p' },
        { "conns", 1, 0, 'n' }, { "ramp", 1, 0, 'r' }, { "hold", 1, 0, 'h' },
        { "ping-interval", 1, 0, 'i' }, { "src-addrs", 1, 0, 'a' }, { "pidfile", 1, 0, 'f' },
        { "churn-rate", 1, 0, 'c' }, { "pairs", 1, 0, 'x' }, { "groups", 1, 0, 'g' },
        { "group-size", 1, 0, 'G' }, { "rate", 1, 0, 'R' }, { "duration", 1, 0, 'd' },
        { "messages", 1, 0, 'm' }, { "window", 1, 0, 'w' }, { "body-size", 1, 0, 'b' },
        { "transport", 1, 0, 'T' }, { "pub-conns", 1, 0, 'C' }, { "drain", 1, 0, 'D' },
        { "max-time", 1, 0, 'M' }, { "run", 1, 0, 'N' }, { "label", 1, 0, 'L' },
        { "device", 1, 0, 'V' }, { "http-prefix", 1, 0, 'X' }, { "sub-prefix", 1, 0, 'S' },
        { "pub-prefix", 1, 0, 'B' }, { "poll-timeout", 1, 0, 'O' }, { "hist", 0, 0, 'z' },
        { "settle", 1, 0, 'Z' }, { "redis", 1, 0, 'J' }, { "redis-monitor", 1, 0, 'K' }, { "offline-wait", 1, 0, 'y' }, { "progress", 1, 0, 'Q' },
        { "stop-file", 1, 0, 'F' }, { "help", 0, 0, '?' }, { 0, 0, 0, 0 }
    };
    int opt;

    O.target = -1; O.scenario = -1;
    snprintf(O.host, sizeof(O.host), "127.0.0.1");
    snprintf(O.ws_path, sizeof(O.ws_path), "/chat/ws");
    snprintf(O.http_prefix, sizeof(O.http_prefix), "/chat");
    snprintf(O.sub_prefix, sizeof(O.sub_prefix), "/sub/");
    snprintf(O.sub_old_prefix, sizeof(O.sub_old_prefix), "/subold/");
    snprintf(O.pub_prefix, sizeof(O.pub_prefix), "/pub/");
    snprintf(O.device, sizeof(O.device), "lg");
    O.conns = 1000; O.ramp = 1000; O.hold = 10; O.src_addrs = 4; O.churn_rate = 100;
    O.pairs = 0; O.groups = 1; O.group_size = 500; O.rate = 0; O.duration = 10;
    O.messages = 5000; O.window = 64; O.body_size = 100; O.pub_conns = 8; O.drain = 10;
    O.poll_timeout = 25; O.max_inflight_hs = 256; O.ping_interval = -1; O.settle = 1; O.progress = 1;

    while ((opt = getopt_long(argc, argv, "v", lo, NULL)) != -1) {
        switch (opt) {
        case 't':
            if (!strcmp(optarg, "chat") || !strcmp(optarg, "ngx-chat")) O.target = TGT_CHAT;
            else if (!strcmp(optarg, "nchan")) O.target = TGT_NCHAN;
            else if (!strcmp(optarg, "centrifugo")) O.target = TGT_CENTRIFUGO;
            else return usage(2);
            break;
        case 's':
            for (int i = 0; i < 5; i++) if (!strcmp(optarg, sc_names[i])) O.scenario = i;
            if (O.scenario < 0) return usage(2);
            break;
        case 'u': if (parse_url(optarg) < 0) return usage(2); break;
        case 'H': snprintf(O.host, sizeof(O.host), "%s", optarg); break;
        case 'P': O.port = atoi(optarg); break;
        case 'W': snprintf(O.ws_path, sizeof(O.ws_path), "%s", optarg); break;
        case 'k': snprintf(O.secret, sizeof(O.secret), "%s", optarg); break;
        case 'e': if (read_env_secret(optarg) < 0) { fprintf(stderr, "no CHAT_JWT_SECRET in %s\n", optarg); return 2; } break;
        case 'p': O.procs = atoi(optarg); break;
        case 'n': O.conns = atoi(optarg); break;
        case 'r': O.ramp = atof(optarg); break;
        case 'h': O.hold = atof(optarg); break;
        case 'i': O.ping_interval = atof(optarg); break;
        case 'a': O.src_addrs = atoi(optarg); break;
        case 'f': snprintf(O.pidfile, sizeof(O.pidfile), "%s", optarg); break;
        case 'c': O.churn_rate = atof(optarg); break;
        case 'x': O.pairs = atoi(optarg); break;
        case 'g': O.groups = atoi(optarg); break;
        case 'G': O.group_size = atoi(optarg); break;
        case 'R': O.rate = atof(optarg); break;
        case 'd': O.duration = atof(optarg); break;
        case 'F': O.stop_file = optarg; break;
        case 'm': O.messages = atoi(optarg); break;
        case 'w': O.window = atoi(optarg); break;
        case 'b': O.body_size = atoi(optarg); break;
        case 'T':
            if (!strcmp(optarg, "ws")) O.transport = TR_WS;
            else if (!strcmp(optarg, "poll")) O.transport = TR_POLL;
            else return usage(2);
            break;
        case 'C': O.pub_conns = atoi(optarg); break;
        case 'D': O.drain = atof(optarg); break;
        case 'M': O.max_time = atof(optarg); break;
        case 'N': snprintf(O.run, sizeof(O.run), "%s", optarg); break;
        case 'L': snprintf(O.label, sizeof(O.label), "%s", optarg); break;
        case 'V': snprintf(O.device, sizeof(O.device), "%s", optarg); break;
        case 'X': snprintf(O.http_prefix, sizeof(O.http_prefix), "%s", optarg); break;
        case 'S': snprintf(O.sub_prefix, sizeof(O.sub_prefix), "%s", optarg); break;
        case 'B': snprintf(O.pub_prefix, sizeof(O.pub_prefix), "%s", optarg); break;
        case 'O': O.poll_timeout = atoi(optarg); break;
        case 'z': O.hist_dump = 1; break;
        case 'Z': O.settle = atof(optarg); break;
        case 'K': O.redis_monitor = atof(optarg); break;
        case 'J': {
            const char *hp = optarg, *colon;
            if (!strncmp(hp, "redis://", 8)) hp += 8;
            if (!(colon = strrchr(hp, ':')) || colon - hp >= (long)sizeof(O.redis_host)) return usage(2);
            snprintf(O.redis_host, sizeof(O.redis_host), "%.*s", (int)(colon - hp), hp);
            O.redis_port = atoi(colon + 1);
            break;
        }
        case 'y': O.offline_wait = atof(optarg); break;
        case 'Q': O.progress = atof(optarg); break;
        case 'v': O.verbose = 1; break;
        case '?': return usage(strcmp(argv[optind - 1], "--help") ? 2 : 0);
        default: return usage(2);
        }
    }
    if (O.target < 0 || O.scenario < 0 || !O.port) return usage(2);
    if ((O.target == TGT_CHAT || O.target == TGT_CENTRIFUGO) && !O.secret[0]) {
        fprintf(stderr, "loadgen: the %s target needs --secret%s\n",
                O.target == TGT_CHAT ? "chat" : "centrifugo", O.target == TGT_CHAT ? " or --env" : "");
        return 2;
    }
    if (O.target == TGT_CENTRIFUGO) {
        if (O.scenario == SC_OFFLINE) {
            fprintf(stderr, "loadgen: the offline scenario is not implemented for centrifugo\n");
            return 2;
        }
        O.transport = TR_WS;
        if (O.ping_interval < 0) O.ping_interval = 30;
        /* the URL's path, or Centrifugo's default endpoint */
        if (!strcmp(O.ws_path, "/chat/ws")) snprintf(O.ws_path, sizeof(O.ws_path), "/connection/websocket");
    }
    if (O.body_size > 1000) O.body_size = 1000;
    if (O.target == TGT_NCHAN) { O.transport = TR_WS; if (O.ping_interval < 0) O.ping_interval = 30; }
    if (!O.run[0]) {
        /* unique per run: user ids and client_ids must not meet an earlier
         * run's (the server deduplicates by client_id) */
        uint64_t r = lg_hash64((const char *)&(uint64_t[2]){ lg_now_ns(), (uint64_t)getpid() << 40 ^ (uint64_t)time(NULL) }, 16);
        snprintf(O.run, sizeof(O.run), "r%08" PRIx64, r & 0xffffffffu);
    }
    if ((O.scenario == SC_ONE2ONE || O.scenario == SC_OFFLINE) && O.pairs <= 0) O.pairs = 100;
    if (O.scenario == SC_ONE2ONE && O.rate <= 0) O.rate = 1000;
    if (O.scenario == SC_FANOUT && O.rate <= 0) O.rate = 10;
    if (O.group_size < 2) O.group_size = 2;

    uint64_t total_conns;
    switch (O.scenario) {
    case SC_IDLE: case SC_CHURN: total_conns = (uint64_t)O.conns + (uint64_t)O.pairs * 2; break;
    case SC_FANOUT: total_conns = (uint64_t)O.groups * (uint64_t)O.group_size; break;
    default: total_conns = (uint64_t)O.pairs * 2;
    }
    if (O.procs <= 0) O.procs = (int)((total_conns + 3999) / 4000);
    if (O.procs < 1) O.procs = 1;
    if (O.procs > MAX_PROCS) O.procs = MAX_PROCS;
    if (O.scenario == SC_FANOUT && O.groups < O.procs) O.procs = O.groups;
    if ((O.scenario == SC_ONE2ONE || O.scenario == SC_OFFLINE) && O.pairs < O.procs) O.procs = O.pairs;

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && total_conns / (uint64_t)O.procs + 64 > rl.rlim_cur) {
        fprintf(stderr, "loadgen: %" PRIu64 " connections per process exceed the open file limit %lu; "
                "use more --procs\n", total_conns / (uint64_t)O.procs, (unsigned long)rl.rlim_cur);
        return 2;
    }

    double connect_budget = (double)total_conns / (O.ramp > 0 ? O.ramp : 1e9) + 30;
    double body = O.scenario == SC_IDLE ? O.hold : O.scenario == SC_OFFLINE ? 120 : O.duration;
    if (O.max_time <= 0) O.max_time = connect_budget + body + O.drain + 30;

    SH = mmap(NULL, sizeof(*SH), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (SH == MAP_FAILED) { perror("mmap"); return 1; }
    for (int i = 0; i < O.procs; i++) {
        struct cstats *s = &SH->st[i];
        lg_hist_init(&s->h_conn); lg_hist_init(&s->h_pong); lg_hist_init(&s->h_ack);
        lg_hist_init(&s->h_lat); lg_hist_init(&s->h_lag); lg_hist_init(&s->h_drain); lg_hist_init(&s->h_last);
    }
    uint64_t t0 = lg_now_ns();
    SH->deadline_ns = t0 + (uint64_t)(O.max_time * NS);
    SH->phase = PH_INIT;

    struct memsnap m_before = { 0 }, m_held = { 0 }, m_after = { 0 };
    mem_take(&m_before, 0);

    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("== loadgen %s %s: target %s:%d, run %s, %d process(es), %" PRIu64 " connections planned ==\n",
           target_label(), sc_names[O.scenario], O.host, O.port, O.run, O.procs, total_conns);
    fflush(stdout);

    pid_t kids[MAX_PROCS];
    for (int i = 0; i < O.procs; i++) {
        pid_t p = fork();
        if (p < 0) { perror("fork"); return 1; }
        if (p == 0) { child_no = i; child_main(); }
        kids[i] = p;
    }
    signal(SIGPIPE, SIG_IGN);

    /* ---- drive the phases ---- */
    set_phase(PH_CONNECT);
    uint64_t t_phase = lg_now_ns(), last_print = 0, connected_at = 0, held_at_measure = 0;
    uint64_t deadline = SH->deadline_ns;
    int timed_out = 0;
    double drain_secs = 0, late_secs = 0;
    uint64_t progress_mark = 0, progress_t = 0;   /* drain/late: last change */
    int ph = PH_CONNECT;

    while (ph < PH_EXIT) {
        usleep(50000);
        uint64_t t = lg_now_ns();
        if (O.progress > 0 && t - last_print >= (uint64_t)(O.progress * NS)) { last_print = t; progress(t0); }
        int all_exited = 1;
        for (int i = 0; i < O.procs; i++) if (!LD(SH->st[i].exited)) all_exited = 0;
        if (all_exited) break;
        if (t > deadline && ph < PH_CLOSE) {
            timed_out = 1;
            fprintf(stderr, "loadgen: hard time limit (%.0f s) reached in phase %s\n", O.max_time, ph_names[ph]);
            set_phase(ph = PH_CLOSE);
            t_phase = t;
            continue;
        }
        double in_phase = (double)(t - t_phase) / 1e9;
        switch (ph) {
        case PH_CONNECT: {
            int ready = SUM(init_done) >= SUM(init_target) && SUM(flows_ready) + SUM(flows_failed) >= SUM(flows);
            int all_procs_planned = 1;
            for (int i = 0; i < O.procs; i++)
                if (!LD(SH->st[i].planned)) all_procs_planned = 0;
            if ((ready && all_procs_planned) || in_phase > connect_budget) {
                connected_at = t;
                fprintf(stderr, "loadgen: %" PRIu64 " of %" PRIu64 " connections open after %.1f s\n",
                        SUM(open), SUM(init_target), in_phase);
                set_phase(ph = PH_RUN);
                t_phase = t;
            }
            break;
        }
        case PH_RUN:
            if (O.redis_port && O.redis_monitor > 0 && !redis_mon.ok && SUM(flows) && O.scenario != SC_OFFLINE
                && in_phase >= (O.duration - O.redis_monitor) / 2) {
                /* blocks this loop for the sample; the children send on */
                mon_d0 = SUM(delivered);
                if (lg_redis_monitor(O.redis_host, O.redis_port, O.redis_monitor, &redis_mon) < 0)
                    fprintf(stderr, "loadgen: MONITOR of Redis %s:%d failed\n", O.redis_host, O.redis_port);
                mon_d1 = SUM(delivered);
                break;
            }
            held_at_measure = SUM(open);
            if (O.scenario == SC_IDLE) {
                if (in_phase >= O.hold) {
                    usleep((useconds_t)(O.settle * 1e6));
                    held_at_measure = SUM(open);
                    mem_take(&m_held, held_at_measure);
                    set_phase(ph = PH_CLOSE);
                    t_phase = lg_now_ns();
                }
            } else if (O.scenario == SC_OFFLINE) {
                if (SUM(flows_done) + SUM(flows_failed) >= SUM(flows) || in_phase > 90) {
                    progress_t = 0;
                    fprintf(stderr, "loadgen: %" PRIu64 " messages acknowledged in %.1f s; receivers connect %s\n",
                            SUM(acked), in_phase, O.offline_wait > 0 ? "after the wait" : "now");
                    if (O.offline_wait > 0) {
                        /* what is waiting is stored by then (ngx-chat: the
                         * fan-out has appended it to the inboxes) */
                        usleep((useconds_t)(O.offline_wait * 1e6));
                        t = lg_now_ns();
                    }
                    set_phase(ph = PH_LATE);
                    t_phase = t;
                }
            } else if (in_phase >= O.duration || (O.stop_file && access(O.stop_file, F_OK) == 0)) {
                /* --stop-file: the sending ends early, and the rates are
                 * of the time it lasted */
                if (in_phase < O.duration) O.duration = in_phase;
                set_phase(ph = PH_DRAIN);
                t_phase = t;
            }
            break;
        case PH_DRAIN: {
            if (O.scenario == SC_CHURN && !SUM(flows)) { set_phase(ph = PH_CLOSE); t_phase = t; break; }
            /* until everything is in, or nothing moved for --drain seconds */
            uint64_t mark = SUM(acked) + SUM(send_err) + SUM(delivered) + SUM(dups);
            if (mark != progress_mark || !progress_t) { progress_mark = mark; progress_t = t; }
            if ((SUM(acked) + SUM(send_err) >= SUM(sent) && SUM(delivered) >= SUM(expected))
                || (double)(t - progress_t) / 1e9 > O.drain) {
                drain_secs = in_phase;
                set_phase(ph = PH_CLOSE);
                t_phase = t;
            }
            break;
        }
        case PH_LATE: {
            held_at_measure = SUM(open);
            uint64_t mark = SUM(delivered) + SUM(dups) + SUM(established) + SUM(failed);
            if (mark != progress_mark || !progress_t) { progress_mark = mark; progress_t = t; }
            if (SUM(delivered) >= SUM(expected) || (double)(t - progress_t) / 1e9 > O.drain) {
                late_secs = in_phase;
                set_phase(ph = PH_CLOSE);
                t_phase = t;
            }
            break;
        }
        case PH_CLOSE:
            if (SUM(open) == 0 || in_phase > 5) {
                set_phase(ph = PH_EXIT);
                t_phase = t;
            }
            break;
        }
    }
    set_phase(PH_EXIT);
    /* wait for the children, bounded */
    uint64_t wait_until = lg_now_ns() + 15 * NS;
    int alive = O.procs;
    while (alive > 0) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p > 0) { alive--; continue; }
        if (p < 0 && errno == ECHILD) break;
        if (lg_now_ns() > wait_until) {
            for (int i = 0; i < O.procs; i++) if (!LD(SH->st[i].exited)) kill(kids[i], SIGKILL);
            wait_until = UINT64_MAX;
        }
        usleep(20000);
    }
    if (O.scenario == SC_IDLE && O.pidfile[0]) {
        sleep(2);
        mem_take(&m_after, SUM(open));
    }

    /* ---- report ---- */
    struct lg_hist h_conn, h_pong, h_ack, h_lat, h_lag, h_drain, h_last;
    lg_hist_init(&h_conn); lg_hist_init(&h_pong); lg_hist_init(&h_ack);
    lg_hist_init(&h_lat); lg_hist_init(&h_lag); lg_hist_init(&h_drain); lg_hist_init(&h_last);
    for (int i = 0; i < O.procs; i++) {
        lg_hist_merge(&h_conn, &SH->st[i].h_conn); lg_hist_merge(&h_pong, &SH->st[i].h_pong);
        lg_hist_merge(&h_ack, &SH->st[i].h_ack); lg_hist_merge(&h_lat, &SH->st[i].h_lat);
        lg_hist_merge(&h_lag, &SH->st[i].h_lag); lg_hist_merge(&h_drain, &SH->st[i].h_drain);
        lg_hist_merge(&h_last, &SH->st[i].h_last);
    }
    double elapsed = (double)(lg_now_ns() - t0) / 1e9;
    const char *lbl = target_label();

    printf("-- %s %s: %.1f s%s --\n", lbl, sc_names[O.scenario], elapsed, timed_out ? " (HARD TIME LIMIT HIT)" : "");
    printf("connections: attempted %" PRIu64 ", established %" PRIu64 ", failed %" PRIu64
           " (connect %" PRIu64 ", handshake %" PRIu64 ", HTTP status %" PRIu64 ", timeout %" PRIu64
           ", hello %" PRIu64 ", protocol %" PRIu64 ")\n",
           SUM(attempted), SUM(established), SUM(failed), SUM(f_connect), SUM(f_handshake),
           SUM(f_status), SUM(f_timeout), SUM(f_hello), SUM(f_proto));
    printf("             held %" PRIu64 " of %" PRIu64 " initial at the end of the %s phase, dropped by server %" PRIu64
           ", closed cleanly %" PRIu64 ", closed by force %" PRIu64 ", reconnects %" PRIu64 "\n",
           held_at_measure, SUM(init_target), O.scenario == SC_OFFLINE ? "late" : "run",
           SUM(dropped), SUM(closed_clean), SUM(closed_forced), SUM(reconnects));
    if (SUM(dropped)) {
        printf("             close codes of dropped connections:");
        for (int k = 0; k < CC_N; k++) {
            uint64_t v = 0;
            for (int i = 0; i < O.procs; i++) v += SH->st[i].close_codes[k];
            if (v) printf(" %s x%" PRIu64, cc_names[k], v);
        }
        printf("\n");
    }
    printf("heartbeats:  pings %" PRIu64 ", pongs %" PRIu64 ", server pings %" PRIu64 ", late pongs %" PRIu64
           " (interval %.1f s)\n", SUM(pings), SUM(pongs), SUM(srv_pings), SUM(pong_late),
           O.ping_interval > 0 ? O.ping_interval : (double)SH->heartbeat_s);
    if (O.scenario == SC_CHURN) {
        double run = O.duration;
        printf("churn:       %" PRIu64 " connections opened during %.0f s of churn = %.1f per second "
               "(offered %.1f), %" PRIu64 " clean closes\n", SUM(run_established), run,
               SUM(run_established) / run, O.churn_rate, SUM(closed_clean));
    }
    printf("latency:\n");
    print_hist(O.target == TGT_CHAT ? "connect to hello" : O.target == TGT_CENTRIFUGO
               ? "connect to subscribed" : "connect to upgrade", &h_conn, stdout);
    print_hist("heartbeat round trip", &h_pong, stdout);
    if (SUM(flows)) {
        print_hist("send to ack", &h_ack, stdout);
        print_hist("send to delivery", &h_lat, stdout);
        print_hist("scheduler lag", &h_lag, stdout);
        if (O.scenario == SC_OFFLINE) print_hist("offline drain", &h_drain, stdout);
        if (O.scenario == SC_FANOUT) print_hist("send to last member", &h_last, stdout);
        printf("messages:    flows %" PRIu64 " (ready %" PRIu64 ", failed %" PRIu64 "), sent %" PRIu64
               ", acked %" PRIu64 ", send errors %" PRIu64 ", retries %" PRIu64 ", not sent (sender down or full) %" PRIu64 "\n",
               SUM(flows), SUM(flows_ready), SUM(flows_failed), SUM(sent), SUM(acked), SUM(send_err),
               SUM(retries), SUM(skipped));
        printf("             expected deliveries %" PRIu64 ", delivered %" PRIu64 ", LOST (acked, not delivered by the end) %" PRIu64
               ", DUPLICATES %" PRIu64 ", delivered without ack %" PRIu64 ", id mismatches %" PRIu64
               ", foreign %" PRIu64 ", out of range %" PRIu64 "\n",
               SUM(expected), SUM(delivered), SUM(lost), SUM(dups), SUM(unacked_delivered),
               SUM(id_mismatch), SUM(foreign), SUM(out_of_range));
        {
            int any = 0;
            for (int k = 0; k < EC_N; k++) {
                uint64_t v = 0;
                for (int i = 0; i < O.procs; i++) v += SH->st[i].err_codes[k];
                if (v) printf("%s%s x%" PRIu64, any++ ? ", " : "             error frames by code: ", ec_names[k], v);
            }
            if (any) printf("\n");
        }
        printf("             other events %" PRIu64 ", receipts %" PRIu64 ", error frames %" PRIu64
               ", reconnect frames %" PRIu64 ", polls %" PRIu64 "\n", SUM(other_events), SUM(receipts),
               SUM(errors_rx), SUM(reconnect_frames), SUM(polls));
        if (O.target == TGT_CENTRIFUGO)
            printf("             resubscribes after a drop: recovered %" PRIu64 ", NOT recovered %" PRIu64 "\n",
                   SUM(recovered), SUM(not_recovered));
        if (O.scenario != SC_OFFLINE) {
            printf("             offered %.0f msg/s for %.0f s; acked %.1f msg/s; deliveries %.1f per s; drain %.1f s\n",
                   O.rate, O.duration, SUM(acked) / O.duration, SUM(delivered) / O.duration, drain_secs);
        } else {
            uint64_t mx = 0;
            for (int i = 0; i < O.procs; i++)
                if (SH->st[i].drain_ns_max > mx) mx = SH->st[i].drain_ns_max;
            printf("             offline receivers drained %" PRIu64 " of %" PRIu64 ", slowest drain %.3f s, late phase %.1f s\n",
                   SUM(drain_done), SUM(flows), (double)mx / 1e9, late_secs);
        }
        for (int i = 0; i < O.procs; i++)
            if (SH->st[i].lost_list[0]) printf("             lost (process %d): %s\n", i, SH->st[i].lost_list);
        if (SUM(acked) && !SUM(delivered))
            printf("             note: messages were acknowledged but none reached a receiver: "
                   "is the delivery path (fan-out) running?\n");
    }
    (void)connected_at;
    int nerr = 0;
    for (int i = 0; i < O.procs; i++) nerr += SH->st[i].nerr;
    if (nerr) {
        printf("error samples:\n");
        for (int i = 0; i < O.procs; i++)
            for (int k = 0; k < SH->st[i].nerr && k < 4; k++) printf("  [%d] %s\n", i, SH->st[i].err[k]);
    }
    struct lg_redis_cost rc = { 0 };
    double per = 0;                   /* 1 / delivered messages */
    if (O.redis_port) {
        lg_redis_diff(&redis_a, &redis_b, &rc);
        if (!rc.ok) printf("redis %s:%d: no cost figures (INFO failed)\n", O.redis_host, O.redis_port);
    }
    if (rc.ok) {
        uint64_t dl = SUM(delivered), ak = SUM(acked);
        printf("redis %s:%d during %.1f s, %s (INFO commandstats, INFO cpu):\n",
               O.redis_host, O.redis_port, (double)(redis_tb - redis_ta) / 1e9,
               SUM(flows) ? "from the first send to the end of the drain" : "while holding the connections");
        printf("  %" PRIu64 " commands run (every redis.call inside a script counts, the script itself once more),\n"
               "  %" PRIu64 " of them scripts (EVALSHA/EVAL/FCALL: %.0f us inside them); CPU %.0f us (user+sys, all threads)\n",
               rc.calls, rc.scripts, (double)rc.script_usec, rc.cpu_us);
        if (dl) {
            per = 1.0 / (double)dl;
            printf("  PER DELIVERED MESSAGE (%" PRIu64 "): %.2f commands, %.2f of them scripts, %.1f us CPU, %.1f us in scripts\n",
                   dl, rc.calls * per, rc.scripts * per, rc.cpu_us * per, rc.script_usec * per);
            if (ak && ak != dl)
                printf("  per sent message (%" PRIu64 " acknowledged): %.2f commands, %.2f scripts, %.1f us CPU\n",
                       ak, (double)rc.calls / ak, (double)rc.scripts / ak, rc.cpu_us / ak);
            printf("  and %.1f us CPU per delivered message in forked children (%" PRIu64
                   " forks in the window: AOF rewrites), not in the figures above\n", rc.child_us * per, rc.forks);
            if (rc.forks == 0)
                printf("  and %.0f bytes of AOF per delivered message\n", (double)rc.aof_bytes * per);
            printf("  most run, per delivered message:");
            for (int k = 0; k < rc.n; k++) printf(" %s %.2f", rc.top[k].name, rc.top[k].calls * per);
            printf("\n");
        } else {
            /* no messages (idle, churn without pairs): the cost of holding
             * the connections */
            double secs = (double)(redis_tb - redis_ta) / 1e9, cs = secs * (double)held_at_measure;
            if (secs > 0)
                printf("  per second: %.1f commands, %.1f scripts, %.0f us CPU", rc.calls / secs, rc.scripts / secs,
                       rc.cpu_us / secs);
            if (cs > 0)
                printf("; per connection and second: %.3f commands, %.2f us CPU", rc.calls / cs, rc.cpu_us / cs);
            printf("\n  most run:");
            for (int k = 0; k < rc.n; k++) printf(" %s %" PRIu64, rc.top[k].name, rc.top[k].calls);
            printf("\n");
        }
    }
    double mon_per = 0;
    if (redis_mon.ok && mon_d1 > mon_d0) {
        mon_per = 1.0 / (double)(mon_d1 - mon_d0);
        printf("  MONITOR, %.1f s in the middle of the sending (%" PRIu64 " deliveries; Redis is slower while it is on):\n"
               "  PER DELIVERED MESSAGE %.2f commands from clients (%.2f of them scripts) and %.2f redis.calls inside scripts\n",
               redis_mon.secs, mon_d1 - mon_d0, redis_mon.client * mon_per, redis_mon.client_scripts * mon_per,
               redis_mon.lua * mon_per);
    }
    double rss_pc = 0, pss_pc = 0, priv_pc = 0;
    if (O.scenario == SC_IDLE && O.pidfile[0]) {
        if (O.target == TGT_CENTRIFUGO)
            printf("memory of the centrifugo process (pid %ld):\n", m_before.m.master);
        else
            printf("memory of the nginx worker processes (master pid %ld):\n", m_before.m.master);
        print_mem("before connections", &m_before);
        print_mem("holding connections", &m_held);
        print_mem("after closing", &m_after);
        if (m_before.ok && m_held.ok && m_held.held) {
            rss_pc = ((double)m_held.m.rss_kb - (double)m_before.m.rss_kb) * 1024.0 / (double)m_held.held;
            pss_pc = ((double)m_held.m.pss_kb - (double)m_before.m.pss_kb) * 1024.0 / (double)m_held.held;
            priv_pc = ((double)m_held.m.priv_kb - (double)m_before.m.priv_kb) * 1024.0 / (double)m_held.held;
            printf("  PER CONNECTION: RSS %.0f bytes, PSS %.0f bytes, private %.0f bytes (%" PRIu64 " held)\n",
                   rss_pc, pss_pc, priv_pc, m_held.held);
        } else {
            printf("  (memory not measured: could not read the workers of %s)\n", O.pidfile);
        }
    }
    printf("RESULT target=%s scenario=%s procs=%d planned=%" PRIu64 " established=%" PRIu64
           " failed=%" PRIu64 " dropped=%" PRIu64 " held=%" PRIu64 " pings=%" PRIu64 " pongs=%" PRIu64,
           lbl, sc_names[O.scenario], O.procs, total_conns, SUM(established), SUM(failed), SUM(dropped),
           held_at_measure, SUM(pings), SUM(pongs));
    if (O.scenario == SC_IDLE && m_held.ok)
        printf(" rss_before_kb=%" PRIu64 " rss_held_kb=%" PRIu64 " pss_before_kb=%" PRIu64 " pss_held_kb=%" PRIu64
               " rss_per_conn=%.0f pss_per_conn=%.0f priv_per_conn=%.0f",
               m_before.m.rss_kb, m_held.m.rss_kb, m_before.m.pss_kb, m_held.m.pss_kb, rss_pc, pss_pc, priv_pc);
    if (O.scenario == SC_CHURN)
        printf(" churn_offered=%.1f churn_achieved=%.1f", O.churn_rate, SUM(run_established) / O.duration);
    if (SUM(flows))
        printf(" flows=%" PRIu64 " members=%d", SUM(flows),
               O.scenario == SC_FANOUT ? O.group_size : 2);
    if (SUM(flows))
        printf(" rate=%g duration=%g sent=%" PRIu64 " acked=%" PRIu64 " expected=%" PRIu64 " delivered=%" PRIu64
               " lost=%" PRIu64 " dups=%" PRIu64 " send_errors=%" PRIu64,
               O.rate, O.duration, SUM(sent), SUM(acked), SUM(expected), SUM(delivered), SUM(lost), SUM(dups),
               SUM(send_err));
    result_hist(stdout, "connect", &h_conn);
    if (SUM(flows)) {
        result_hist(stdout, "ack", &h_ack);
        result_hist(stdout, "lat", &h_lat);
        if (O.scenario == SC_OFFLINE) result_hist(stdout, "drain", &h_drain);
        if (O.scenario == SC_FANOUT) result_hist(stdout, "last", &h_last);
    }
    if (rc.ok) {
        printf(" redis_secs=%.1f redis_calls=%" PRIu64 " redis_scripts=%" PRIu64 " redis_script_us=%" PRIu64
               " redis_cpu_us=%.0f", (double)(redis_tb - redis_ta) / 1e9, rc.calls, rc.scripts, rc.script_usec, rc.cpu_us);
        if (per > 0)
            printf(" redis_calls_per_msg=%.2f redis_scripts_per_msg=%.2f redis_cpu_us_per_msg=%.1f redis_script_us_per_msg=%.1f"
                   " redis_child_cpu_us_per_msg=%.1f redis_forks=%" PRIu64 " redis_aof_bytes_per_msg=%.0f",
                   rc.calls * per, rc.scripts * per, rc.cpu_us * per, rc.script_usec * per, rc.child_us * per, rc.forks,
                   rc.forks ? -1.0 : (double)rc.aof_bytes * per);
    }
    if (mon_per > 0)
        printf(" redis_mon_client_per_msg=%.2f redis_mon_scripts_per_msg=%.2f redis_mon_lua_per_msg=%.2f",
               redis_mon.client * mon_per, redis_mon.client_scripts * mon_per, redis_mon.lua * mon_per);
    printf(" timed_out=%d\n", timed_out);
    if (O.hist_dump) {
        dump_hist(stdout, "connect", &h_conn);
        dump_hist(stdout, "ack", &h_ack);
        dump_hist(stdout, "lat", &h_lat);
    }
    int bad = timed_out || SUM(lost) || SUM(dups) || SUM(flows_failed);
    return bad ? 1 : 0;
}
