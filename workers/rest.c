/*
 * The rest role: a small HTTP/1.1 server that nginx proxies REST reads to
 * (history, conversations, groups). nginx authenticates the client and passes
 * the user in the X-Chat-User header; this server trusts only that header and
 * therefore listens on loopback (or a private network) only.
 *
 * One thread, epoll, non-blocking sockets, keep-alive, bounded request size.
 * MongoDB queries are synchronous with bounded timeouts: this role is a
 * sidecar serving reads, scaled by running more of them.
 *
 *   GET /chat/history?conv=C&before=n&limit=k
 *       {"messages":[...],"next_before":n|null}, newest first
 *   GET /chat/conversations
 *       {"conversations":[{"conv","last_seq","read_seq","unread","last"}...]}
 */
#include "chat_worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <jansson.h>
#include <mongoc/mongoc.h>

#define REST_MAX_REQUEST  16384

typedef struct rest_conn_s rest_conn_t;
struct rest_conn_s {
    rest_conn_t *prev, *next;      /* every open connection, freed at exit */
    int          fd;
    size_t       len;
    char         buf[REST_MAX_REQUEST];
};

static rest_conn_t *rest_conns;

static void
conn_close(int ep, rest_conn_t *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->prev) c->prev->next = c->next;
    else rest_conns = c->next;
    if (c->next) c->next->prev = c->prev;
    free(c);
}

typedef struct {
    const char *method;
    const char *path;      /* without the query */
    const char *query;     /* after '?', or "" */
    const char *user;      /* X-Chat-User, or NULL */
    const char *body;
    size_t      body_len;
} rest_req_t;

static void
send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;   /* the peer went away; the connection is closed by the caller */
        }
        p += w;
        n -= (size_t) w;
    }
}

static const char *
reason_of(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 503: return "Service Unavailable";
    default:  return "Error";
    }
}

static void
respond(int fd, int status, const char *json)
{
    char   head[256];
    size_t blen = strlen(json);
    int    n = snprintf(head, sizeof(head),
                        "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                        "Cache-Control: no-store\r\nContent-Length: %zu\r\n\r\n",
                        status, reason_of(status), blen);
    send_all(fd, head, (size_t) n);
    send_all(fd, json, blen);
}

static void
respond_json(int fd, int status, json_t *v)
{
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    if (s == NULL) {
        respond(fd, 503, "{\"type\":\"error\",\"code\":\"unavailable\",\"message\":\"out of memory\"}");
        return;
    }
    respond(fd, status, s);
    free(s);
}

static void
respond_error(int fd, int status, const char *code, const char *message)
{
    respond_json(fd, status, json_pack("{s:s, s:s, s:s}", "type", "error", "code", code, "message", message));
}


/* ---- MongoDB ------------------------------------------------------------ */

static const cw_config_t   *rest_cf;
static mongoc_client_t     *rest_client;
static mongoc_collection_t *rest_messages, *rest_conversations;
static char                 rest_db[128];

static int
mongo_ready(void)
{
    if (rest_client) return 0;
    cw_mongo_log_init();
    rest_client = cw_mongo_client(rest_cf, "chat-worker-rest", rest_db, sizeof(rest_db));
    if (rest_client == NULL) return -1;
    rest_messages = mongoc_client_get_collection(rest_client, rest_db, "messages");
    rest_conversations = mongoc_client_get_collection(rest_client, rest_db, "conversations");
    return 0;
}


/* ---- query strings -------------------------------------------------------- */

static int
hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The URL-decoded value of name in query: 1 found, 0 absent, -1 malformed
 * or longer than outlen - 1. */
static int
qparam(const char *query, const char *name, char *out, size_t outlen)
{
    size_t      nlen = strlen(name);
    const char *p = query;

    while (p && *p) {
        const char *amp = strchr(p, '&'), *end = amp ? amp : p + strlen(p);
        if ((size_t) (end - p) > nlen && p[nlen] == '=' && memcmp(p, name, nlen) == 0) {
            size_t o = 0;
            for (const char *v = p + nlen + 1; v < end; v++) {
                int ch = (unsigned char) *v;
                if (ch == '+') ch = ' ';
                else if (ch == '%') {
                    int h, l;
                    if (end - v < 3 || (h = hexval(v[1])) < 0 || (l = hexval(v[2])) < 0) return -1;
                    ch = h * 16 + l;
                    v += 2;
                }
                if (ch == 0 || o + 1 >= outlen) return -1;
                out[o++] = (char) ch;
            }
            out[o] = '\0';
            return 1;
        }
        if ((size_t) (end - p) == nlen && memcmp(p, name, nlen) == 0) {
            out[0] = '\0';
            return 1;
        }
        p = amp ? amp + 1 : NULL;
    }
    return 0;
}

/* A positive decimal integer of at most 15 digits; -1 otherwise. */
static int64_t
parse_pos(const char *s)
{
    int64_t n = 0;
    size_t  len = strlen(s);
    if (len == 0 || len > 15) return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        n = n * 10 + (s[i] - '0');
    }
    return n;
}


/* ---- GET /chat/history ----------------------------------------------------- */

#define HISTORY_DEFAULT  50
#define HISTORY_MAX      100
#define CONVERSATIONS_MAX 200

static void
history(int fd, const rest_req_t *rq)
{
    char             conv[CW_CONV_MAX + 1], a[CW_ID_MAX + 1], b[CW_ID_MAX + 1], num[32];
    int              is_group, rc, n = 0;
    int64_t          limit = HISTORY_DEFAULT, before = 0, last_seq = 0;
    bson_t          *filter, *opts;
    mongoc_cursor_t *cur;
    const bson_t    *doc;
    bson_error_t     error;
    json_t          *msgs, *root;

    rc = qparam(rq->query, "conv", conv, sizeof(conv));
    if (rc <= 0 || cw_parse_conv(conv, a, b, &is_group) != 0) {
        respond_error(fd, 400, "bad_request", rc == 0 ? "conv is required" : "conv is not a conversation id");
        return;
    }
    if ((rc = qparam(rq->query, "limit", num, sizeof(num))) != 0) {
        limit = rc > 0 ? parse_pos(num) : -1;
        if (limit < 1 || limit > HISTORY_MAX) {
            respond_error(fd, 400, "bad_request", "limit must be an integer from 1 to 100");
            return;
        }
    }
    if ((rc = qparam(rq->query, "before", num, sizeof(num))) != 0) {
        before = rc > 0 ? parse_pos(num) : -1;
        if (before < 1) {
            respond_error(fd, 400, "bad_request", "before must be a positive integer");
            return;
        }
    }
    if (is_group || (strcmp(rq->user, a) != 0 && strcmp(rq->user, b) != 0)) {
        /* Group history arrives with the groups: until then nobody reads it. */
        respond_error(fd, 403, "forbidden", "not a participant of this conversation");
        return;
    }
    if (mongo_ready() != 0) {
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    if (before) filter = BCON_NEW("conv", BCON_UTF8(conv), "seq", "{", "$lt", BCON_INT64(before), "}");
    else filter = BCON_NEW("conv", BCON_UTF8(conv));
    opts = BCON_NEW("sort", "{", "seq", BCON_INT32(-1), "}", "limit", BCON_INT64(limit + 1));
    cur = mongoc_collection_find_with_opts(rest_messages, filter, opts, NULL);
    msgs = json_array();
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it;
        if (n == limit) {               /* one more exists */
            n++;
            break;
        }
        json_array_append_new(msgs, cw_bson_to_json(doc));
        if (bson_iter_init_find(&it, doc, "seq")) last_seq = bson_iter_as_int64(&it);
        n++;
    }
    if (n <= limit && mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: history %s: %s", conv, error.message);
        mongoc_cursor_destroy(cur);
        bson_destroy(filter);
        bson_destroy(opts);
        json_decref(msgs);
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    bson_destroy(opts);
    root = json_object();
    json_object_set_new(root, "messages", msgs);
    json_object_set_new(root, "next_before", n > limit ? json_integer(last_seq) : json_null());
    respond_json(fd, 200, root);
}


/* ---- GET /chat/conversations ----------------------------------------------- */

static int64_t
get_int(const bson_t *doc, const char *k)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, k) && BSON_ITER_HOLDS_NUMBER(&it)) return bson_iter_as_int64(&it);
    return 0;
}

static void
conversations(int fd, const rest_req_t *rq)
{
    bson_t          *filter, *opts;
    mongoc_cursor_t *cur;
    const bson_t    *doc;
    bson_error_t     error;
    json_t          *list, *root;
    int              failed = 0;

    if (mongo_ready() != 0) {
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    filter = BCON_NEW("user", BCON_UTF8(rq->user), "last_seq", "{", "$gt", BCON_INT64(0), "}");
    /* ts has millisecond resolution: ties go to the newer message id
     * (Snowflake-style ids of equal length sort by time, node, counter) */
    opts = BCON_NEW("sort", "{", "ts", BCON_INT32(-1), "last.id", BCON_INT32(-1), "}",
                    "limit", BCON_INT64(CONVERSATIONS_MAX));
    cur = mongoc_collection_find_with_opts(rest_conversations, filter, opts, NULL);
    list = json_array();
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t  it, sub;
        const char  *conv;
        int64_t      last_seq = get_int(doc, "last_seq"), read_seq = get_int(doc, "read_seq"), unread = 0;
        json_t      *c, *last = json_null();

        if (!bson_iter_init_find(&it, doc, "conv") || !BSON_ITER_HOLDS_UTF8(&it)) continue;
        conv = bson_iter_utf8(&it, NULL);
        if (bson_iter_init_find(&sub, doc, "last") && BSON_ITER_HOLDS_DOCUMENT(&sub)) {
            const uint8_t *data;
            uint32_t       len;
            bson_t         ld;
            bson_iter_document(&sub, &len, &data);
            if (bson_init_static(&ld, data, len)) {
                json_decref(last);
                last = cw_bson_to_json(&ld);
            }
        }
        if (last_seq > read_seq) {
            bson_t *q = BCON_NEW("conv", BCON_UTF8(conv), "seq", "{", "$gt", BCON_INT64(read_seq), "}",
                                 "from", "{", "$ne", BCON_UTF8(rq->user), "}");
            unread = mongoc_collection_count_documents(rest_messages, q, NULL, NULL, NULL, &error);
            bson_destroy(q);
            if (unread < 0) {
                cw_warn("rest: unread count %s: %s", conv, error.message);
                json_decref(last);
                failed = 1;
                break;
            }
        }
        c = json_pack("{s:s, s:I, s:I, s:I, s:o}", "conv", conv, "last_seq", (json_int_t) last_seq,
                      "read_seq", (json_int_t) read_seq, "unread", (json_int_t) unread, "last", last);
        if (c) json_array_append_new(list, c);
    }
    if (!failed && mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: conversations of %s: %s", rq->user, error.message);
        failed = 1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    bson_destroy(opts);
    if (failed) {
        json_decref(list);
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    root = json_object();
    json_object_set_new(root, "conversations", list);
    respond_json(fd, 200, root);
}

static void
route(int fd, const rest_req_t *rq)
{
    int is_history = strcmp(rq->path, "/chat/history") == 0;
    int is_convs = strcmp(rq->path, "/chat/conversations") == 0;

    if (strcmp(rq->path, "/healthz") == 0) {
        respond(fd, 200, "{\"status\":\"ok\"}");
        return;
    }
    if (!is_history && !is_convs) {
        respond_error(fd, 404, "not_found", "no such endpoint");
        return;
    }
    if (rq->user == NULL || !cw_valid_id(rq->user, strlen(rq->user), CW_ID_MAX)) {
        respond_error(fd, 401, "unauthorized", "no authenticated user");
        return;
    }
    if (strcmp(rq->method, "GET") != 0) {
        respond_error(fd, 405, "bad_request", "only GET is allowed here");
        return;
    }
    if (is_history) history(fd, rq);
    else conversations(fd, rq);
}

/* Returns bytes consumed by a complete request, 0 if incomplete, -1 if bad. */
static ssize_t
parse_and_serve(rest_conn_t *c)
{
    char       *end, *line, *next, *sp1, *sp2, *q;
    size_t      head_len, clen = 0;
    rest_req_t  rq = {0};

    c->buf[c->len] = '\0';
    end = strstr(c->buf, "\r\n\r\n");
    if (end == NULL) return c->len >= REST_MAX_REQUEST - 1 ? -1 : 0;
    head_len = (size_t) (end - c->buf) + 4;
    *end = '\0';

    /* Wait for the whole body before the header is cut up in place. */
    for (line = strstr(c->buf, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "Content-Length:", 15) == 0) {
            clen = strtoul(line + 17, NULL, 10);
            break;
        }
    }
    if (clen > REST_MAX_REQUEST - head_len - 1) return -1;
    if (c->len < head_len + clen) {
        *end = '\r';
        return 0;
    }

    line = c->buf;
    next = strstr(line, "\r\n");
    if (next) *next = '\0';
    sp1 = strchr(line, ' ');
    if (sp1 == NULL) return -1;
    *sp1 = '\0';
    sp2 = strchr(sp1 + 1, ' ');
    if (sp2 == NULL) return -1;
    *sp2 = '\0';
    rq.method = line;
    rq.path = sp1 + 1;
    q = strchr(sp1 + 1, '?');
    if (q) { *q = '\0'; rq.query = q + 1; } else rq.query = "";

    while (next) {
        char *h = next + 2, *colon, *v;
        next = strstr(h, "\r\n");
        if (next) *next = '\0';
        colon = strchr(h, ':');
        if (colon == NULL) continue;
        *colon = '\0';
        v = colon + 1;
        while (*v == ' ' || *v == '\t') v++;
        if (strcasecmp(h, "X-Chat-User") == 0) rq.user = v;
    }
    rq.body = c->buf + head_len;
    rq.body_len = clen;
    route(c->fd, &rq);
    return (ssize_t) (head_len + clen);
}

int
cw_role_rest(const cw_config_t *cf)
{
    char                host[128];
    int                 port, lfd, ep, one = 1;
    struct sockaddr_in  sa;
    struct epoll_event  ev, evs[64];

    if (cw_parse_hostport(cf->rest_listen, host, sizeof(host), &port) != 0) {
        cw_error("bad rest_listen \"%s\"", cf->rest_listen);
        return 2;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t) port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        cw_error("rest_listen host must be an IPv4 address: %s", host);
        return 2;
    }
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *) &sa, sizeof(sa)) != 0 || listen(lfd, 512) != 0) {
        cw_error("listen on %s: %s", cf->rest_listen, strerror(errno));
        close(lfd);
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    rest_cf = cf;
    cw_info("role rest listening on %s", cf->rest_listen);

    while (!cw_stop) {
        int n = epoll_wait(ep, evs, 64, 500);
        for (int i = 0; i < n; i++) {
            rest_conn_t *c = evs[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    c = calloc(1, sizeof(*c));
                    if (c == NULL) { close(fd); continue; }
                    c->fd = fd;
                    c->next = rest_conns;
                    if (rest_conns) rest_conns->prev = c;
                    rest_conns = c;
                    ev.events = EPOLLIN | EPOLLRDHUP;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(c->fd, c->buf + c->len, REST_MAX_REQUEST - 1 - c->len);
                if (r > 0) {
                    ssize_t used;
                    c->len += (size_t) r;
                    while ((used = parse_and_serve(c)) > 0) {
                        memmove(c->buf, c->buf + used, c->len - (size_t) used);
                        c->len -= (size_t) used;
                    }
                    if (used < 0) {
                        respond_error(c->fd, 400, "bad_request", "malformed request");
                        r = 0;
                    } else {
                        continue;
                    }
                }
                if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                    conn_close(ep, c);
                }
                break;
            }
        }
    }
    while (rest_conns) conn_close(ep, rest_conns);
    close(ep);
    close(lfd);
    if (rest_client) {
        mongoc_collection_destroy(rest_messages);
        mongoc_collection_destroy(rest_conversations);
        mongoc_client_destroy(rest_client);
    }
    cw_info("role rest stopped");
    return 0;
}
