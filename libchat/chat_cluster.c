/*
 * chat_cluster: key -> slot, MOVED/ASK parsing and the slot map
 * (chat_cluster.h). Written from the Redis Cluster specification: the slot
 * is CRC16 (XMODEM variant) of the key or of its hash tag, mod 16384.
 */
#include <string.h>
#include <strings.h>

#include "chat_cluster.h"

uint16_t
chat_crc16(const char *p, size_t len)
{
    uint16_t  crc = 0;

    /* bitwise: the keys are short and this is not on a path where a
     * 512-byte table would pay for its cache lines */
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t) ((unsigned char) p[i] << 8);
        for (int b = 0; b < 8; b++) {
            crc = (crc & 0x8000) ? (uint16_t) ((crc << 1) ^ 0x1021) : (uint16_t) (crc << 1);
        }
    }
    return crc;
}

unsigned
chat_cluster_slot(const char *key, size_t len)
{
    const char  *open, *close;

    /* the spec: hash only what is between the first '{' and the first '}'
     * after it, provided that is not empty; otherwise the whole key */
    open = memchr(key, '{', len);
    if (open != NULL) {
        size_t  rest = len - (size_t) (open - key) - 1;

        close = memchr(open + 1, '}', rest);
        if (close != NULL && close > open + 1) {
            return chat_crc16(open + 1, (size_t) (close - open - 1)) & (CHAT_CLUSTER_SLOTS - 1);
        }
    }
    return chat_crc16(key, len) & (CHAT_CLUSTER_SLOTS - 1);
}

/* decimal digits p[0..n) -> value <= max; -1 when empty, not digits or too big */
static long
parse_uint(const char *p, size_t n, long max)
{
    long  v = 0;

    if (n == 0 || n > 6) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return -1;
        }
        v = v * 10 + (p[i] - '0');
    }
    return v <= max ? v : -1;
}

int
chat_cluster_parse_redirect(const char *err, size_t len, chat_redirect_t *out)
{
    const char  *p, *end, *sp, *colon;
    size_t       hlen;
    long         slot, port;

    out->kind = CHAT_REDIRECT_NONE;
    if (err == NULL) {
        return -1;
    }
    end = err + len;
    if (len > 6 && memcmp(err, "MOVED ", 6) == 0) {
        p = err + 6;
    } else if (len > 4 && memcmp(err, "ASK ", 4) == 0) {
        p = err + 4;
    } else {
        return -1;
    }

    sp = memchr(p, ' ', (size_t) (end - p));
    if (sp == NULL) {
        return -1;
    }
    slot = parse_uint(p, (size_t) (sp - p), CHAT_CLUSTER_SLOTS - 1);
    if (slot < 0) {
        return -1;
    }

    /* host:port, the host possibly empty or an IPv6 address (so the port
     * is after the last ':') */
    p = sp + 1;
    colon = NULL;
    for (const char *q = p; q < end; q++) {
        if (*q == ' ' || *q == '\0' || *q == '\r' || *q == '\n') {
            return -1;
        }
        if (*q == ':') {
            colon = q;
        }
    }
    if (colon == NULL) {
        return -1;
    }
    port = parse_uint(colon + 1, (size_t) (end - colon - 1), 65535);
    if (port <= 0) {
        return -1;
    }
    hlen = (size_t) (colon - p);
    if (hlen >= sizeof(out->host)) {
        return -1;
    }

    memcpy(out->host, p, hlen);
    out->host[hlen] = '\0';
    out->port = (int) port;
    out->slot = (unsigned) slot;
    out->kind = (err[0] == 'M') ? CHAT_REDIRECT_MOVED : CHAT_REDIRECT_ASK;
    return 0;
}

void
chat_cluster_map_init(chat_cluster_map_t *m)
{
    memset(m->slot_node, 0xff, sizeof(m->slot_node));
    m->nnodes = 0;
}

static int
nodes_find(const chat_cluster_node_t *node, unsigned n, const char *host, int port)
{
    for (unsigned i = 0; i < n; i++) {
        if (node[i].port == port && strcmp(node[i].host, host) == 0) {
            return (int) i;
        }
    }
    return -1;
}

/* the master of one CLUSTER SLOTS entry: [host, port, id?, ...] -> host
 * (NUL-terminated, "" for nil / "?" / empty) and port; -1 when malformed */
static int
entry_master(const redisReply *e, char *host, size_t hsz, int *port)
{
    const redisReply  *h, *p;

    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2) {
        return -1;
    }
    h = e->element[0];
    p = e->element[1];
    if (h == NULL || p == NULL || p->type != REDIS_REPLY_INTEGER
        || p->integer <= 0 || p->integer > 65535)
    {
        return -1;
    }
    if (h->type == REDIS_REPLY_NIL) {
        host[0] = '\0';
    } else if (h->type == REDIS_REPLY_STRING || h->type == REDIS_REPLY_STATUS) {
        if (h->len >= hsz || memchr(h->str, '\0', h->len) != NULL) {
            return -1;
        }
        /* "?" is Redis 7's "endpoint unknown": like empty, the asked node's host */
        if (h->len == 1 && h->str[0] == '?') {
            host[0] = '\0';
        } else {
            memcpy(host, h->str, h->len);
            host[h->len] = '\0';
        }
    } else {
        return -1;
    }
    *port = (int) p->integer;
    return 0;
}

int
chat_cluster_map_from_slots(chat_cluster_map_t *m, const redisReply *r)
{
    /* first pass into locals, so a malformed reply leaves *m as it was */
    chat_cluster_node_t  node[CHAT_CLUSTER_MAX_NODES];
    unsigned             nnodes = 0;
    char                 host[256];
    int                  port, idx;

    if (r == NULL || r->type != REDIS_REPLY_ARRAY) {
        return -1;
    }
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply  *e = r->element[i];

        if (e == NULL || e->type != REDIS_REPLY_ARRAY || e->elements < 3
            || e->element[0]->type != REDIS_REPLY_INTEGER
            || e->element[1]->type != REDIS_REPLY_INTEGER
            || e->element[0]->integer < 0
            || e->element[1]->integer >= CHAT_CLUSTER_SLOTS
            || e->element[0]->integer > e->element[1]->integer
            || entry_master(e->element[2], host, sizeof(host), &port) != 0)
        {
            return -1;
        }
        if (nodes_find(node, nnodes, host, port) < 0) {
            if (nnodes == CHAT_CLUSTER_MAX_NODES) {
                return -1;
            }
            memcpy(node[nnodes].host, host, sizeof(host));
            node[nnodes].port = port;
            nnodes++;
        }
    }

    chat_cluster_map_init(m);
    memcpy(m->node, node, nnodes * sizeof(node[0]));
    m->nnodes = nnodes;
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply  *e = r->element[i];

        (void) entry_master(e->element[2], host, sizeof(host), &port);
        idx = nodes_find(m->node, m->nnodes, host, port);
        for (long long s = e->element[0]->integer; s <= e->element[1]->integer; s++) {
            m->slot_node[s] = (uint16_t) idx;
        }
    }
    return 0;
}

int
chat_cluster_map_node(const chat_cluster_map_t *m, unsigned slot)
{
    if (slot >= CHAT_CLUSTER_SLOTS || m->slot_node[slot] == CHAT_CLUSTER_NO_NODE
        || m->slot_node[slot] >= m->nnodes)
    {
        return -1;
    }
    return m->slot_node[slot];
}

int
chat_cluster_map_find(const chat_cluster_map_t *m, const char *host, int port)
{
    return nodes_find(m->node, m->nnodes, host, port);
}

int
chat_cluster_map_add(chat_cluster_map_t *m, const char *host, int port)
{
    size_t  hlen;
    int     idx;

    idx = nodes_find(m->node, m->nnodes, host, port);
    if (idx >= 0) {
        return idx;
    }
    hlen = strlen(host);
    if (m->nnodes == CHAT_CLUSTER_MAX_NODES || hlen >= sizeof(m->node[0].host)
        || port <= 0 || port > 65535)
    {
        return -1;
    }
    memcpy(m->node[m->nnodes].host, host, hlen + 1);
    m->node[m->nnodes].port = port;
    return (int) m->nnodes++;
}

int
chat_cluster_map_move(chat_cluster_map_t *m, unsigned slot, const char *host, int port)
{
    int  idx;

    if (slot >= CHAT_CLUSTER_SLOTS) {
        return -1;
    }
    idx = chat_cluster_map_add(m, host, port);
    if (idx < 0) {
        return -1;
    }
    m->slot_node[slot] = (uint16_t) idx;
    return idx;
}

unsigned
chat_cluster_map_covered(const chat_cluster_map_t *m)
{
    unsigned  n = 0;

    for (unsigned s = 0; s < CHAT_CLUSTER_SLOTS; s++) {
        n += chat_cluster_map_node(m, s) >= 0;
    }
    return n;
}


/* one "$<n>\r\n<bytes>\r\n" at *pos: 0 and the argument, or -1 */
static int
resp_bulk(const char *cmd, size_t len, size_t *pos, const char **arg, size_t *alen)
{
    size_t  p = *pos, n = 0, digits = 0;

    if (p >= len || cmd[p] != '$') {
        return -1;
    }
    for (p++; p < len && cmd[p] >= '0' && cmd[p] <= '9'; p++) {
        if (++digits > 10) {
            return -1;
        }
        n = n * 10 + (size_t) (cmd[p] - '0');
    }
    if (digits == 0 || len - p < 2 || cmd[p] != '\r' || cmd[p + 1] != '\n') {
        return -1;
    }
    p += 2;
    if (len - p < n || len - p - n < 2 || cmd[p + n] != '\r' || cmd[p + n + 1] != '\n') {
        return -1;
    }
    *arg = cmd + p;
    *alen = n;
    *pos = p + n + 2;
    return 0;
}

static int
name_is(const char *a, size_t n, const char *name)
{
    return strlen(name) == n && strncasecmp(a, name, n) == 0;
}

int
chat_cluster_command_slot(const char *cmd, size_t len)
{
    const char  *arg[4], *a;
    size_t       alen[4], al, pos = 1, argc = 0, digits = 0;
    long         numkeys;

    if (cmd == NULL || len < 4 || cmd[0] != '*') {
        return -2;
    }
    for (; pos < len && cmd[pos] >= '0' && cmd[pos] <= '9'; pos++) {
        if (++digits > 9) {
            return -2;
        }
        argc = argc * 10 + (size_t) (cmd[pos] - '0');
    }
    if (digits == 0 || argc == 0 || len - pos < 2 || cmd[pos] != '\r' || cmd[pos + 1] != '\n') {
        return -2;
    }
    pos += 2;
    for (size_t i = 0; i < argc && i < 4; i++) {
        if (resp_bulk(cmd, len, &pos, &arg[i], &alen[i]) != 0) {
            return -2;
        }
    }

    a = arg[0];
    al = alen[0];
    if (name_is(a, al, "EVAL") || name_is(a, al, "EVALSHA") || name_is(a, al, "EVAL_RO")
        || name_is(a, al, "EVALSHA_RO") || name_is(a, al, "FCALL") || name_is(a, al, "FCALL_RO"))
    {
        if (argc < 3) {
            return -2;
        }
        numkeys = parse_uint(arg[2], alen[2], 1000000);
        if (numkeys < 0 || (size_t) numkeys > argc - 3) {
            return -2;
        }
        return numkeys == 0 ? -1 : (int) chat_cluster_slot(arg[3], alen[3]);
    }
    if (name_is(a, al, "XREAD") || name_is(a, al, "XREADGROUP")) {
        /* the arguments after the first four are still in the buffer */
        const char  *x;
        size_t       xl, p2 = pos;

        for (size_t i = 1; i < argc && i < 4; i++) {
            if (name_is(arg[i], alen[i], "STREAMS")) {
                if (i + 1 < 4 && i + 1 < argc) {
                    return (int) chat_cluster_slot(arg[i + 1], alen[i + 1]);
                }
                return resp_bulk(cmd, len, &p2, &x, &xl) == 0 ? (int) chat_cluster_slot(x, xl) : -2;
            }
        }
        for (size_t i = 4; i < argc; i++) {
            if (resp_bulk(cmd, len, &p2, &x, &xl) != 0) {
                return -2;
            }
            if (name_is(x, xl, "STREAMS")) {
                return resp_bulk(cmd, len, &p2, &x, &xl) == 0 ? (int) chat_cluster_slot(x, xl) : -2;
            }
        }
        return -2;
    }
    if (argc < 2 || name_is(a, al, "PUBLISH") || name_is(a, al, "PING") || name_is(a, al, "INFO")
        || name_is(a, al, "CLUSTER") || name_is(a, al, "SCRIPT") || name_is(a, al, "AUTH")
        || name_is(a, al, "SELECT") || name_is(a, al, "ASKING") || name_is(a, al, "READONLY")
        || name_is(a, al, "WAIT"))
    {
        return -1;
    }
    return (int) chat_cluster_slot(arg[1], alen[1]);
}
