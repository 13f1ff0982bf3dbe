/*
 * The rest role: a small HTTP/1.1 server that nginx proxies the REST API to
 * (history, conversations, receipts; groups, settings and devices, which
 * also write). nginx authenticates the client and passes
 * the user in the X-Chat-User header. Whoever reaches this server could
 * claim any user, so the hop is authenticated: by default a unix socket
 * that only nginx's user may open (rest_listen = unix:/path, mode
 * rest_socket_mode, default 0600), and on TCP a shared secret that nginx
 * sends as X-Chat-Secret (rest_secret_file; the role refuses to start on
 * TCP without one, and answers 401 to a request without the right one,
 * compared in constant time). A secret may be set for a unix socket too.
 *
 * One thread, epoll, non-blocking sockets, keep-alive, bounded request size.
 * MongoDB queries are synchronous with bounded timeouts: this role is a
 * sidecar, scaled by running more of them.
 *
 *   GET /chat/history?conv=C&before=n&limit=k
 *       {"messages":[...],"next_before":n|null}, newest first
 *   GET /chat/history?conv=C&after=n&limit=k
 *       {"messages":[...],"next_after":n|null}, oldest first
 *   GET /chat/conversations
 *       {"conversations":[{"conv","last_seq","read_seq","unread","last"}...]}
 *       (groups also carry "group" and "name")
 *   POST /chat/groups, GET /chat/groups/G, POST /chat/groups/G/members,
 *   GET /chat/receipts?conv=C&seq=n      (groups.c)
 *   GET/PUT /chat/settings, /chat/settings/mute/<conv>   (settings.c)
 *   PUT/DELETE /chat/devices/<device>/push, GET /chat/devices   (devices.c)
 */
#include "chat_worker.h"
#include "chat_jwt.h"

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
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <jansson.h>
#include <mongoc/mongoc.h>

/* Headers and body: a group of 500 members of 64-character ids is about 34k. */
#define REST_MAX_REQUEST  65536
/* A larger request is answered 413; its body is read and dropped when it
 * is at most this long (so that the proxy reads the answer, not a reset),
 * else the connection is closed. */
#define REST_MAX_DISCARD  (1024 * 1024 + REST_MAX_REQUEST)

typedef struct rest_conn_s rest_conn_t;
struct rest_conn_s {
    rest_conn_t *prev, *next;      /* every open connection, freed at exit */
    int          fd;
    size_t       len;
    size_t       toolarge;         /* length of the request refused with 413 */
    size_t       discard;          /* bytes of it still to drop */
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
    const char *device;    /* X-Chat-Device, or NULL */
    const char *secret;    /* X-Chat-Secret, or NULL */
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
    case 201: return "Created";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
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
static mongoc_collection_t *rest_messages, *rest_conversations, *rest_groups;
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
    rest_groups = mongoc_client_get_collection(rest_client, rest_db, "groups");
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
    /* the one integer range of seqs and pointers: 0 .. 2^53-1 */
    if (len == 0 || len > 16) return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        n = n * 10 + (s[i] - '0');
    }
    return n > CW_INT_MAX ? -1 : n;
}


/* ---- GET /chat/history ----------------------------------------------------- */

#define HISTORY_DEFAULT  50
#define HISTORY_MAX      100
#define CONVERSATIONS_MAX 200

/* A history document as clients see it: messages as stored (with "id"),
 * membership records as the group event object. */
static json_t *
history_item(const bson_t *doc)
{
    json_t *m = cw_bson_to_json(doc), *kind = json_object_get(m, "kind"), *ev;

    /* who hid it for themselves (delete for me) is nobody else's business */
    json_object_del(m, "hidden");
    if (!json_is_string(kind) || strcmp(json_string_value(kind), "group") != 0) return m;
    ev = json_pack("{s:s, s:O?, s:O?, s:O?, s:O?, s:O?, s:O?, s:O?, s:O?}", "type", "group",
                   "id", json_object_get(m, "id"), "conv", json_object_get(m, "conv"),
                   "seq", json_object_get(m, "seq"), "group", json_object_get(m, "group"),
                   "event", json_object_get(m, "event"), "members", json_object_get(m, "members"),
                   "by", json_object_get(m, "from"), "ts", json_object_get(m, "ts"));
    json_decref(m);
    return ev;
}

/* qparam for the handlers of other files (delete.c) */
int
cw_qparam(const char *query, const char *name, char *out, size_t outlen)
{
    return qparam(query, name, out, outlen);
}

/* The seq up to which user deleted conv for themselves (0: never), -1 on
 * a storage error. */
static int64_t
cleared_seq(const char *user, const char *conv)
{
    char             id[CW_ID_MAX + CW_CONV_MAX + 2];
    bson_t          *filter;
    mongoc_cursor_t *cur;
    const bson_t    *doc;
    bson_error_t     error;
    bson_iter_t      it;
    int64_t          n = 0;

    snprintf(id, sizeof(id), "%s|%s", user, conv);
    filter = BCON_NEW("_id", BCON_UTF8(id));
    cur = mongoc_collection_find_with_opts(rest_conversations, filter, NULL, NULL);
    if (mongoc_cursor_next(cur, &doc)) {
        if (bson_iter_init_find(&it, doc, "cleared_seq") && BSON_ITER_HOLDS_NUMBER(&it)) n = bson_iter_as_int64(&it);
    } else if (mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: history %s: %s", conv, error.message);
        n = -1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    return n;
}

static void
history(int fd, const rest_req_t *rq)
{
    char             conv[CW_CONV_MAX + 1], a[CW_ID_MAX + 1], b[CW_ID_MAX + 1], num[32];
    int              is_group, rc, n = 0;
    int64_t          limit = HISTORY_DEFAULT, before = 0, after = -1, since = 0, last_seq = 0, cleared, lo;
    bson_t          *opts, filter = BSON_INITIALIZER, range;
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
    if ((rc = qparam(rq->query, "after", num, sizeof(num))) != 0) {
        after = rc > 0 ? parse_pos(num) : -1;
        if (after < 0) {
            respond_error(fd, 400, "bad_request", "after must be a non-negative integer");
            return;
        }
        if (before) {
            respond_error(fd, 400, "bad_request", "before and after cannot be combined");
            return;
        }
    }
    if (is_group) {
        rc = cw_group_member(a, rq->user, &since);
        if (rc < 0) {
            respond_error(fd, 503, "unavailable", "redis unavailable");
            return;
        }
        if (rc == 0) {
            respond_error(fd, 403, "forbidden", "not a member of this group");
            return;
        }
    } else if (strcmp(rq->user, a) != 0 && strcmp(rq->user, b) != 0) {
        respond_error(fd, 403, "forbidden", "not a participant of this conversation");
        return;
    }
    if (mongo_ready() != 0) {
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    /* a group member sees from the event that made it a member on;
     * nobody sees what they deleted for themselves (a message: `hidden`;
     * the conversation up to cleared_seq: DELETE /chat/conversations) */
    cleared = cleared_seq(rq->user, conv);
    if (cleared < 0) {
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    lo = after;
    if (since > 0 && since - 1 > lo) lo = since - 1;
    if (cleared > lo) lo = cleared;
    BSON_APPEND_UTF8(&filter, "conv", conv);
    {
        bson_t ne;
        BSON_APPEND_DOCUMENT_BEGIN(&filter, "hidden", &ne);
        BSON_APPEND_UTF8(&ne, "$ne", rq->user);
        bson_append_document_end(&filter, &ne);
    }
    if (before || lo >= 0) {
        BSON_APPEND_DOCUMENT_BEGIN(&filter, "seq", &range);
        if (before) BSON_APPEND_INT64(&range, "$lt", before);
        if (lo >= 0) BSON_APPEND_INT64(&range, "$gt", lo);
        bson_append_document_end(&filter, &range);
    }
    opts = BCON_NEW("sort", "{", "seq", BCON_INT32(after >= 0 ? 1 : -1), "}", "limit", BCON_INT64(limit + 1));
    cur = mongoc_collection_find_with_opts(rest_messages, &filter, opts, NULL);
    msgs = json_array();
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it;
        if (n == limit) {               /* one more exists */
            n++;
            break;
        }
        json_array_append_new(msgs, history_item(doc));
        if (bson_iter_init_find(&it, doc, "seq")) last_seq = bson_iter_as_int64(&it);
        n++;
    }
    if (n <= limit && mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: history %s: %s", conv, error.message);
        mongoc_cursor_destroy(cur);
        bson_destroy(&filter);
        bson_destroy(opts);
        json_decref(msgs);
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(&filter);
    bson_destroy(opts);
    root = json_object();
    json_object_set_new(root, "messages", msgs);
    json_object_set_new(root, after >= 0 ? "next_after" : "next_before",
                        n > limit ? json_integer(last_seq) : json_null());
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

/* One row of the conversation list and what it is sorted by. */
typedef struct {
    int64_t     ts;
    const char *last_id;       /* inside obj, or "" */
    json_t     *obj;
} conv_row_t;

typedef struct {
    conv_row_t *rows;
    size_t      n, cap;
} conv_rows_t;

static int
rows_add(conv_rows_t *l, int64_t ts, json_t *obj)
{
    json_t *id = json_object_get(json_object_get(obj, "last"), "id");

    if (l->n == l->cap) {
        size_t      cap = l->cap ? 2 * l->cap : 64;
        conv_row_t *r = realloc(l->rows, sizeof(*r) * cap);
        if (r == NULL) {
            json_decref(obj);
            return -1;
        }
        l->rows = r;
        l->cap = cap;
    }
    l->rows[l->n].ts = ts;
    l->rows[l->n].last_id = json_is_string(id) ? json_string_value(id) : "";
    l->rows[l->n].obj = obj;
    l->n++;
    return 0;
}

/* newest first; equal ts: the greater last message id first (in byte
 * order, as MongoDB sorts the direct ones) */
static int
rows_cmp(const void *x, const void *y)
{
    const conv_row_t *a = x, *b = y;
    if (a->ts != b->ts) return a->ts > b->ts ? -1 : 1;
    return -strcmp(a->last_id, b->last_id);
}

static void
rows_free(conv_rows_t *l)
{
    for (size_t i = 0; i < l->n; i++) json_decref(l->rows[i].obj);
    free(l->rows);
}

/* A subdocument as JSON, or null. */
static json_t *
sub_json(const bson_t *doc, const char *k)
{
    bson_iter_t    it;
    const uint8_t *data;
    uint32_t       len;
    bson_t         d;

    if (!bson_iter_init_find(&it, doc, k) || !BSON_ITER_HOLDS_DOCUMENT(&it)) return json_null();
    bson_iter_document(&it, &len, &data);
    if (!bson_init_static(&d, data, len)) return json_null();
    return cw_bson_to_json(&d);
}

/* The seq of the `last` message a conversations or groups document shows
 * (0: none yet). */
static int64_t
shown_seq(const bson_t *doc)
{
    bson_iter_t it, f;
    if (bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, "last.seq", &f) && BSON_ITER_HOLDS_NUMBER(&f))
        return bson_iter_as_int64(&f);
    return 0;
}

/*
 * Messages of conv with after < seq <= upto that user did not send
 * (membership records are not messages); -1 on error. upto is the seq of
 * the `last` the list shows: persist inserts messages first and sets
 * `last` afterwards, so counting every stored message showed "unread: 3"
 * next to the first of the three as `last`. Bounded by it, the count never
 * implies a message newer than the preview.
 */
static int64_t
unread_count(const char *conv, int64_t after, int64_t upto, const char *user, bson_error_t *error)
{
    bson_t *q = BCON_NEW("conv", BCON_UTF8(conv), "seq", "{", "$gt", BCON_INT64(after), "$lte", BCON_INT64(upto), "}",
                         "from", "{", "$ne", BCON_UTF8(user), "}", "kind", "{", "$ne", BCON_UTF8("group"), "}");
    int64_t n = mongoc_collection_count_documents(rest_messages, q, NULL, NULL, NULL, error);
    bson_destroy(q);
    return n;
}

/* Direct conversations: the user's conversations documents. */
static int
direct_rows(const char *user, conv_rows_t *rows)
{
    bson_t          *filter, *opts;
    mongoc_cursor_t *cur;
    const bson_t    *doc;
    bson_error_t     error;
    int              failed = 0;

    filter = BCON_NEW("user", BCON_UTF8(user), "last_seq", "{", "$gt", BCON_INT64(0), "}");
    /* ts has millisecond resolution: ties go to the newer message id
     * (Snowflake-style ids of equal length sort by time, node, counter) */
    opts = BCON_NEW("sort", "{", "ts", BCON_INT32(-1), "last.id", BCON_INT32(-1), "}",
                    "limit", BCON_INT64(CONVERSATIONS_MAX));
    cur = mongoc_collection_find_with_opts(rest_conversations, filter, opts, NULL);
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t  it;
        const char  *conv;
        /* last_seq is raised before `last` is written: the list shows
         * the conversation as far as its `last` (a conversation whose first
         * message has no `last` yet is not listed yet) */
        int64_t      last_seq = shown_seq(doc), read_seq = get_int(doc, "read_seq"), unread = 0,
                     cleared = get_int(doc, "cleared_seq");
        json_t      *c;

        if (!bson_iter_init_find(&it, doc, "conv") || !BSON_ITER_HOLDS_UTF8(&it)) continue;
        conv = bson_iter_utf8(&it, NULL);
        if (conv[0] != 'd') continue;                 /* group pointers: see group_rows */
        if (last_seq == 0) continue;
        if (cleared >= last_seq) continue;            /* deleted for me, nothing newer */
        if (last_seq > read_seq && last_seq > cleared) {
            unread = unread_count(conv, read_seq > cleared ? read_seq : cleared, last_seq, user, &error);
            if (unread < 0) {
                cw_warn("rest: unread count %s: %s", conv, error.message);
                failed = 1;
                break;
            }
        }
        c = json_pack("{s:s, s:I, s:I, s:I, s:o}", "conv", conv, "last_seq", (json_int_t) last_seq,
                      "read_seq", (json_int_t) read_seq, "unread", (json_int_t) unread,
                      "last", sub_json(doc, "last"));
        if (c && rows_add(rows, get_int(doc, "ts"), c) != 0) { failed = 1; break; }
    }
    if (!failed && mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: conversations of %s: %s", user, error.message);
        failed = 1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    bson_destroy(opts);
    return failed ? -1 : 0;
}

/* The user's read pointers of the groups in convs (an array of "g:G"),
 * into ptrs: conv -> read_seq. */
static int
group_pointers(const char *user, const bson_t *convs, json_t *ptrs, json_t *clr)
{
    bson_t           filter = BSON_INITIALIZER, in;
    mongoc_cursor_t *cur;
    const bson_t    *doc;
    bson_error_t     error;
    int              failed = 0;

    BSON_APPEND_UTF8(&filter, "user", user);
    BSON_APPEND_DOCUMENT_BEGIN(&filter, "conv", &in);
    BSON_APPEND_ARRAY(&in, "$in", convs);
    bson_append_document_end(&filter, &in);
    cur = mongoc_collection_find_with_opts(rest_conversations, &filter, NULL, NULL);
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it;
        if (bson_iter_init_find(&it, doc, "conv") && BSON_ITER_HOLDS_UTF8(&it)) {
            json_object_set_new(ptrs, bson_iter_utf8(&it, NULL), json_integer(get_int(doc, "read_seq")));
            json_object_set_new(clr, bson_iter_utf8(&it, NULL), json_integer(get_int(doc, "cleared_seq")));
        }
    }
    if (mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: group pointers of %s: %s", user, error.message);
        failed = 1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(&filter);
    return failed ? -1 : 0;
}

/* The since seq of user in a groups document (since: [{u, seq}]). */
static int64_t
group_since(const bson_t *doc, const char *user)
{
    bson_iter_t it, arr;

    if (!bson_iter_init_find(&it, doc, "since") || !BSON_ITER_HOLDS_ARRAY(&it) || !bson_iter_recurse(&it, &arr))
        return 0;
    while (bson_iter_next(&arr)) {
        bson_iter_t e;
        int         match = 0;
        int64_t     seq = 0;
        if (!BSON_ITER_HOLDS_DOCUMENT(&arr) || !bson_iter_recurse(&arr, &e)) continue;
        while (bson_iter_next(&e)) {
            if (strcmp(bson_iter_key(&e), "u") == 0 && BSON_ITER_HOLDS_UTF8(&e))
                match = strcmp(bson_iter_utf8(&e, NULL), user) == 0;
            else if (strcmp(bson_iter_key(&e), "seq") == 0 && BSON_ITER_HOLDS_NUMBER(&e))
                seq = bson_iter_as_int64(&e);
        }
        if (match) return seq;
    }
    return 0;
}

/* Groups: the groups documents the user is an active member of. */
static int
group_rows(const char *user, conv_rows_t *rows)
{
    bson_t          *filter, *opts, convs = BSON_INITIALIZER;
    mongoc_cursor_t *cur;
    const bson_t    *doc;
    bson_error_t     error;
    json_t          *ptrs = json_object(), *clr = json_object();
    int              failed = 0, n = 0;
    size_t           first = rows->n, kept;

    filter = BCON_NEW("members", BCON_UTF8(user));
    opts = BCON_NEW("sort", "{", "ts", BCON_INT32(-1), "}", "limit", BCON_INT64(CONVERSATIONS_MAX));
    cur = mongoc_collection_find_with_opts(rest_groups, filter, opts, NULL);
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it;
        const char *g, *name;
        char        conv[CW_CONV_MAX + 1], key[16];
        int64_t     since = group_since(doc, user), ts = get_int(doc, "ts");
        json_t     *c;

        if (!bson_iter_init_find(&it, doc, "_id") || !BSON_ITER_HOLDS_UTF8(&it)) continue;
        g = bson_iter_utf8(&it, NULL);
        if (!bson_iter_init_find(&it, doc, "name") || !BSON_ITER_HOLDS_UTF8(&it)) continue;
        name = bson_iter_utf8(&it, NULL);
        snprintf(conv, sizeof(conv), "g:%s", g);
        snprintf(key, sizeof(key), "%d", n++);
        BSON_APPEND_UTF8(&convs, key, conv);
        /* read_seq and unread are filled in below, with the pointers */
        c = json_pack("{s:s, s:I, s:I, s:I, s:o, s:s, s:s, s:I}", "conv", conv,
                      "last_seq", (json_int_t) shown_seq(doc), "read_seq", (json_int_t) 0,
                      "unread", (json_int_t) 0, "last", sub_json(doc, "last"), "group", g, "name", name,
                      "since", (json_int_t) since);
        if (c && rows_add(rows, ts ? ts : get_int(doc, "created"), c) != 0) { failed = 1; break; }
    }
    if (!failed && mongoc_cursor_error(cur, &error)) {
        cw_warn("rest: groups of %s: %s", user, error.message);
        failed = 1;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(filter);
    bson_destroy(opts);
    if (!failed && n > 0 && group_pointers(user, &convs, ptrs, clr) != 0) failed = 1;
    kept = first;
    for (size_t i = first; !failed && i < rows->n; i++) {
        json_t     *c = rows->rows[i].obj;
        const char *conv = json_string_value(json_object_get(c, "conv"));
        int64_t     read_seq = json_integer_value(json_object_get(ptrs, conv));
        int64_t     cleared = json_integer_value(json_object_get(clr, conv));
        int64_t     since = json_integer_value(json_object_get(c, "since"));
        int64_t     from = read_seq > since ? read_seq : since, unread = 0;

        if (cleared > 0 && cleared >= json_integer_value(json_object_get(c, "last_seq"))) {
            json_decref(c);                           /* deleted for me, nothing newer */
            rows->rows[i].obj = NULL;
            continue;
        }
        if (cleared > from) from = cleared;

        if (json_integer_value(json_object_get(c, "last_seq")) > from) {
            unread = unread_count(conv, from, json_integer_value(json_object_get(c, "last_seq")), user, &error);
            if (unread < 0) {
                cw_warn("rest: unread count %s: %s", conv, error.message);
                failed = 1;
                break;
            }
        }
        json_object_set_new(c, "read_seq", json_integer(read_seq));
        json_object_set_new(c, "unread", json_integer(unread));
        json_object_del(c, "since");
    }
    for (size_t i = first; !failed && i < rows->n; i++) {
        if (rows->rows[i].obj) rows->rows[kept++] = rows->rows[i];
    }
    if (!failed) rows->n = kept;
    bson_destroy(&convs);
    json_decref(ptrs);
    json_decref(clr);
    return failed ? -1 : 0;
}

static void
conversations(int fd, const rest_req_t *rq)
{
    conv_rows_t rows = { NULL, 0, 0 };
    json_t     *list, *root;

    if (mongo_ready() != 0) {
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    if (direct_rows(rq->user, &rows) != 0 || group_rows(rq->user, &rows) != 0) {
        rows_free(&rows);
        respond_error(fd, 503, "unavailable", "storage unavailable");
        return;
    }
    if (rows.n > 1) qsort(rows.rows, rows.n, sizeof(conv_row_t), rows_cmp);
    list = json_array();
    for (size_t i = 0; i < rows.n && i < CONVERSATIONS_MAX; i++) json_array_append(list, rows.rows[i].obj);
    rows_free(&rows);
    root = json_object();
    json_object_set_new(root, "conversations", list);
    respond_json(fd, 200, root);
}

/* ---- GET /chat/receipts ---------------------------------------------------- */

static void
receipts(int fd, const rest_req_t *rq)
{
    char    conv[CW_CONV_MAX + 1], a[CW_ID_MAX + 1], b[CW_ID_MAX + 1], num[32];
    int     is_group, rc, status;
    int64_t seq;
    json_t *out = NULL;

    rc = qparam(rq->query, "conv", conv, sizeof(conv));
    if (rc <= 0 || cw_parse_conv(conv, a, b, &is_group) != 0) {
        respond_error(fd, 400, "bad_request", rc == 0 ? "conv is required" : "conv is not a conversation id");
        return;
    }
    rc = qparam(rq->query, "seq", num, sizeof(num));
    seq = rc > 0 ? parse_pos(num) : -1;
    if (seq < 1) {
        respond_error(fd, 400, "bad_request", "seq must be a positive integer");
        return;
    }
    if (!is_group && strcmp(rq->user, a) != 0 && strcmp(rq->user, b) != 0) {
        respond_error(fd, 403, "forbidden", "not a participant of this conversation");
        return;
    }
    status = cw_receipts(conv, a, b, is_group, seq, rq->user, &out);
    respond_json(fd, status, out);
}

/* SHA-256 of the configured secret (rest_secret_file), if any */
static unsigned char rest_secret_sha[SHA256_DIGEST_LENGTH];
static int           rest_have_secret;

/* X-Chat-Secret right? Digests of equal length compared in constant time,
 * so neither the content nor the length of the secret leaks by timing. */
static int
secret_ok(const char *given)
{
    unsigned char d[SHA256_DIGEST_LENGTH];

    if (!rest_have_secret) return 1;
    if (given == NULL) return 0;
    SHA256((const unsigned char *) given, strlen(given), d);
    return CRYPTO_memcmp(d, rest_secret_sha, sizeof(d)) == 0;
}


/* ---- dev sign-in ---------------------------------------------------------
 * GET /dev/token?user=U&device=D&ttl=S mints a token with the nginx JWT
 * secret, for anyone who asks: only for the local dev stack, whose worker
 * config alone sets dev_token_secret_file and whose nginx alone routes
 * /dev/token here (conf/dev-locations.conf). Off (404) otherwise. */

static unsigned char dev_secret[4096];
static size_t        dev_secret_len;

static void
dev_token_load(const cw_config_t *cf)
{
    FILE *f;

    if (cf->dev_token_secret_file[0] == '\0') return;
    f = fopen(cf->dev_token_secret_file, "r");
    if (f == NULL) {
        cw_warn("dev_token_secret_file %s: %s; /dev/token stays off", cf->dev_token_secret_file, strerror(errno));
        return;
    }
    dev_secret_len = fread(dev_secret, 1, sizeof(dev_secret), f);
    fclose(f);
    while (dev_secret_len > 0 && (dev_secret[dev_secret_len - 1] == '\n' || dev_secret[dev_secret_len - 1] == '\r'))
        dev_secret_len--;
    if (dev_secret_len > 0) cw_warn("dev sign-in on: GET /dev/token gives anyone a token (dev stack only)");
}

static void
dev_token(int fd, const rest_req_t *rq)
{
    char    user[CW_ID_MAX + 1], dev[40], num[24], tok[1024];
    int64_t ttl = 3600, now;
    size_t  n;
    int     rc;

    if (strcmp(rq->method, "GET") != 0) {
        respond_error(fd, 405, "bad_request", "only GET is allowed here");
        return;
    }
    rc = qparam(rq->query, "user", user, sizeof(user));
    if (rc <= 0 || !cw_valid_id(user, strlen(user), CW_ID_MAX)) {
        respond_error(fd, 400, "bad_request", "user must be 1 to 64 of [A-Za-z0-9._-]");
        return;
    }
    rc = qparam(rq->query, "device", dev, sizeof(dev));
    if (rc <= 0) strcpy(dev, "web");
    if (!cw_valid_id(dev, strlen(dev), 32)) {
        respond_error(fd, 400, "bad_request", "device must be 1 to 32 of [A-Za-z0-9._-]");
        return;
    }
    if (qparam(rq->query, "ttl", num, sizeof(num)) > 0) {
        ttl = parse_pos(num);
        if (ttl < 1 || ttl > 86400) {
            respond_error(fd, 400, "bad_request", "ttl must be 1 to 86400 seconds");
            return;
        }
    }
    now = cw_now_ms() / 1000;
    n = chat_jwt_issue(user, dev, now, now + ttl, dev_secret, dev_secret_len, tok, sizeof(tok));
    if (n == 0) {
        respond_error(fd, 503, "unavailable", "could not sign a token");
        return;
    }
    respond_json(fd, 200, json_pack("{s:s, s:s, s:s, s:I}", "token", tok, "user", user, "device", dev,
                                    "exp", (json_int_t) (now + ttl)));
}

static void
route(int fd, const rest_req_t *rq)
{
    int is_history = strcmp(rq->path, "/chat/history") == 0;
    int is_convs = strcmp(rq->path, "/chat/conversations") == 0;
    int is_receipts = strcmp(rq->path, "/chat/receipts") == 0;
    int is_groups = strncmp(rq->path, "/chat/groups", 12) == 0 && (rq->path[12] == '\0' || rq->path[12] == '/');
    int is_settings = strncmp(rq->path, "/chat/settings", 14) == 0 && (rq->path[14] == '\0' || rq->path[14] == '/');
    int is_devices = strncmp(rq->path, "/chat/devices", 13) == 0 && (rq->path[13] == '\0' || rq->path[13] == '/');
    int is_messages = strncmp(rq->path, "/chat/messages/", 15) == 0;
    int is_clear = strncmp(rq->path, "/chat/conversations/", 20) == 0;

    if (strcmp(rq->path, "/healthz") == 0) {
        respond(fd, 200, "{\"status\":\"ok\"}");
        return;
    }
    if (!secret_ok(rq->secret)) {
        respond_error(fd, 401, "unauthorized", "this server answers nginx only");
        return;
    }
    if (strcmp(rq->path, "/dev/token") == 0 && dev_secret_len > 0) {
        dev_token(fd, rq);
        return;
    }
    if (!is_history && !is_convs && !is_receipts && !is_groups && !is_settings && !is_devices && !is_messages
        && !is_clear) {
        respond_error(fd, 404, "not_found", "no such endpoint");
        return;
    }
    if (rq->user == NULL || !cw_valid_id(rq->user, strlen(rq->user), CW_ID_MAX)) {
        respond_error(fd, 401, "unauthorized", "no authenticated user");
        return;
    }
    if (is_settings || is_devices) {        /* settings.c, devices.c (push notifications) */
        json_t *out = NULL;
        int     status;
        mongoc_client_t *client = mongo_ready() == 0 ? rest_client : NULL;
        if (is_settings)
            status = cw_settings_request(rq->method, rq->path, rq->user, rq->body, rq->body_len, client, rest_db, &out);
        else
            status = cw_devices_request(rq->method, rq->path, rq->user, rq->device, rq->body, rq->body_len,
                                        client, rest_db, &out);
        respond_json(fd, status, out);
        return;
    }
    if (is_clear) {                         /* delete.c: a conversation deleted for me */
        json_t *out = NULL;
        int     status = cw_clear_request(rest_cf, rq->method, rq->path, rq->user, rq->device, &out);
        respond_json(fd, status, out);
        return;
    }
    if (is_messages) {                      /* delete.c: deletions */
        json_t *out = NULL;
        int     status = cw_delete_request(rest_cf, rq->method, rq->path, rq->query, rq->user, rq->device,
                                           mongo_ready() == 0 ? rest_client : NULL, rest_db, &out);
        respond_json(fd, status, out);
        return;
    }
    if (is_groups) {
        json_t *out = NULL;
        int     status = cw_groups_request(rq->method, rq->path, rq->user, rq->body, rq->body_len, &out);
        respond_json(fd, status, out);
        return;
    }
    if (strcmp(rq->method, "GET") != 0) {
        respond_error(fd, 405, "bad_request", "only GET is allowed here");
        return;
    }
    if (is_history) history(fd, rq);
    else if (is_receipts) receipts(fd, rq);
    else conversations(fd, rq);
}

/* Returns bytes consumed by a complete request, 0 if incomplete, -1 if bad,
 * -2 if its body does not fit. */
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
    if (clen > REST_MAX_REQUEST - head_len - 1) {
        c->toolarge = head_len + clen;
        return -2;
    }
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
        else if (strcasecmp(h, "X-Chat-Device") == 0) rq.device = v;
        else if (strcasecmp(h, "X-Chat-Secret") == 0) rq.secret = v;
    }
    rq.body = c->buf + head_len;
    rq.body_len = clen;
    route(c->fd, &rq);
    return (ssize_t) (head_len + clen);
}

/* rest_secret_file: 16 to 4096 bytes, a trailing newline ignored */
static int
load_secret(const char *path)
{
    char   buf[4097];
    size_t n;
    FILE  *f = fopen(path, "r");

    if (f == NULL) {
        cw_error("rest_secret_file %s: %s", path, strerror(errno));
        return -1;
    }
    n = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
    if (n < 16 || n > 4096 || memchr(buf, '\0', n) != NULL) {
        cw_error("rest_secret_file %s must hold 16 to 4096 bytes of text (it holds %zu)", path, n);
        return -1;
    }
    SHA256((const unsigned char *) buf, n, rest_secret_sha);
    OPENSSL_cleanse(buf, sizeof(buf));
    rest_have_secret = 1;
    return 0;
}

/* The listening socket: unix:/path (mode rest_socket_mode) or host:port
 * (IPv4, a secret required). */
static int
rest_listen(const cw_config_t *cf)
{
    int lfd, one = 1;

    if (strncmp(cf->rest_listen, "unix:", 5) == 0) {
        struct sockaddr_un su;
        const char        *path = cf->rest_listen + 5;
        mode_t             old;
        struct stat        st;

        memset(&su, 0, sizeof(su));
        su.sun_family = AF_UNIX;
        if (path[0] != '/' || strlen(path) >= sizeof(su.sun_path)) {
            cw_error("rest_listen unix: needs an absolute path of at most %zu bytes", sizeof(su.sun_path) - 1);
            return -1;
        }
        strcpy(su.sun_path, path);
        /* a socket left by a previous run (never another kind of file) */
        if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);
        lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (lfd < 0) return -1;
        old = umask(0177);                      /* no window with a wider mode */
        if (bind(lfd, (struct sockaddr *) &su, sizeof(su)) != 0) {
            umask(old);
            cw_error("listen on %s: %s", cf->rest_listen, strerror(errno));
            close(lfd);
            return -1;
        }
        umask(old);
        if (chmod(path, (mode_t) cf->rest_socket_mode) != 0 || listen(lfd, 512) != 0) {
            cw_error("listen on %s: %s", cf->rest_listen, strerror(errno));
            close(lfd);
            return -1;
        }
        return lfd;
    } else {
        char               host[128];
        int                port;
        struct sockaddr_in sa;

        if (cw_parse_hostport(cf->rest_listen, host, sizeof(host), &port) != 0) {
            cw_error("bad rest_listen \"%s\"", cf->rest_listen);
            return -1;
        }
        if (!rest_have_secret) {
            cw_error("rest_listen %s is TCP: anyone who reaches it could claim any user; set rest_secret_file "
                     "(and nginx's X-Chat-Secret), or listen on a unix socket (rest_listen = unix:/path)",
                     cf->rest_listen);
            return -1;
        }
        memset(&sa, 0, sizeof(sa));
        sa.sin_family = AF_INET;
        sa.sin_port = htons((uint16_t) port);
        if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
            cw_error("rest_listen host must be an IPv4 address: %s", host);
            return -1;
        }
        lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (lfd < 0) return -1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(lfd, (struct sockaddr *) &sa, sizeof(sa)) != 0 || listen(lfd, 512) != 0) {
            cw_error("listen on %s: %s", cf->rest_listen, strerror(errno));
            close(lfd);
            return -1;
        }
        return lfd;
    }
}

int
cw_role_rest(const cw_config_t *cf)
{
    int                 lfd, ep, one = 1;
    struct epoll_event  ev, evs[64];

    if (cf->rest_secret_file[0] && load_secret(cf->rest_secret_file) != 0) return 2;
    lfd = rest_listen(cf);
    if (lfd < 0) return 2;
    ep = epoll_create1(EPOLL_CLOEXEC);
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    rest_cf = cf;
    dev_token_load(cf);
    cw_info("role rest listening on %s (%s)", cf->rest_listen,
            rest_have_secret ? "X-Chat-Secret required" : "unix socket permissions");
    cw_groups_init(cf);
    cw_settings_init(cf);

    while (!cw_stop) {
        int n;

        /* the group rebuild (until done once) and the Kafka re-produce sweep */
        cw_groups_tick(mongo_ready() == 0 ? rest_client : NULL, rest_db);
        n = epoll_wait(ep, evs, 64, 500);
        for (int i = 0; i < n; i++) {
            rest_conn_t *c = evs[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    if (strncmp(cf->rest_listen, "unix:", 5) != 0)
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
                    ssize_t used = 0;
                    c->len += (size_t) r;
                    if (c->discard) {               /* the rest of a refused body */
                        size_t d = c->discard < c->len ? c->discard : c->len;
                        memmove(c->buf, c->buf + d, c->len - d);
                        c->len -= d;
                        c->discard -= d;
                    }
                    while (c->discard == 0 && (used = parse_and_serve(c)) > 0) {
                        memmove(c->buf, c->buf + used, c->len - (size_t) used);
                        c->len -= (size_t) used;
                    }
                    if (used == -2 && c->toolarge <= REST_MAX_DISCARD) {
                        respond_error(c->fd, 413, "too_large", "request body too large");
                        c->discard = c->toolarge - c->len;      /* the buffer holds its start only */
                        c->len = 0;
                        continue;
                    }
                    if (used < 0) {
                        if (used == -2) respond_error(c->fd, 413, "too_large", "request body too large");
                        else respond_error(c->fd, 400, "bad_request", "malformed request");
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
    cw_groups_close();
    cw_settings_close();
    close(ep);
    close(lfd);
    if (strncmp(cf->rest_listen, "unix:", 5) == 0) unlink(cf->rest_listen + 5);
    if (rest_client) {
        mongoc_collection_destroy(rest_messages);
        mongoc_collection_destroy(rest_conversations);
        mongoc_collection_destroy(rest_groups);
        mongoc_client_destroy(rest_client);
    }
    cw_info("role rest stopped");
    return 0;
}
