/*
 * Queue entries (docs/PIPELINE.md, "Queue entries"): the fields of one
 * stream entry or of one Kafka record's JSON value, validated, and the
 * recipients the fan-out computes from them.
 */
#include "chat_worker.h"
#include "chat_proto.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Ids and conversations: the module's own rules (chat_proto.c, linked into
 * the workers), so what one side accepts the other does too. */
int
cw_valid_id(const char *s, size_t len, size_t max)
{
    return chat_id_valid(s, len, max);
}

/*
 * "d:<a>:<b>" with a <= b in byte order, or "g:<group>". a and b receive
 * the participants (a also receives the group id). Returns 0 when valid.
 */
int
cw_parse_conv(const char *conv, char *a, char *b, int *is_group)
{
    chat_conv_t cv;
    size_t      len = strlen(conv);

    if (len > CW_CONV_MAX || chat_conv_parse(conv, len, &cv) != 0) return -1;
    memcpy(a, cv.a, cv.alen);
    a[cv.alen] = '\0';
    if (cv.kind == 'g') {
        b[0] = '\0';
        *is_group = 1;
        return 0;
    }
    memcpy(b, cv.b, cv.blen);
    b[cv.blen] = '\0';
    *is_group = 0;
    return 0;
}

void
cw_entry_reset(cw_entry_t *e)
{
    free(e->ev);
    free(e->rcpt);
    free(e->rcpt_users);
    free(e->state);
    for (int i = 0; i < e->n_raw; i++) free(e->raw[i]);
    free(e->raw);
    free(e->raw_len);
    memset(e, 0, sizeof(*e));
}

int
cw_entry_keep_raw(cw_entry_t *e, const char *const *v, const size_t *len, int n, int kafka)
{
    if (e->raw != NULL || n <= 0) return 0;
    e->raw = calloc((size_t) n, sizeof(char *));
    e->raw_len = calloc((size_t) n, sizeof(size_t));
    if (e->raw == NULL || e->raw_len == NULL) goto fail;
    e->n_raw = n;
    e->raw_kafka = kafka;
    for (int i = 0; i < n; i++) {
        e->raw[i] = malloc(len[i] + 1);
        if (e->raw[i] == NULL) goto fail;
        memcpy(e->raw[i], v[i], len[i]);
        e->raw[i][len[i]] = '\0';
        e->raw_len[i] = len[i];
    }
    return 0;
fail:
    for (int i = 0; e->raw && i < e->n_raw; i++) free(e->raw[i]);
    free(e->raw);
    free(e->raw_len);
    e->raw = NULL;
    e->raw_len = NULL;
    e->n_raw = 0;
    return -1;
}

static chat_entry_str_t
view_str(const char *s)
{
    chat_entry_str_t v = { s, s ? strlen(s) : 0 };
    return v;
}

void
cw_entry_view(const cw_entry_t *e, chat_entry_t *v)
{
    memset(v, 0, sizeof(*v));
    v->type = (chat_entry_type_t) e->type;
    v->conv = view_str(e->conv);
    v->from = view_str(e->from);
    v->dev = view_str(e->dev);
    v->to = view_str(e->to);
    v->group = view_str(e->group);
    v->st = view_str(e->st);
    v->event = view_str(e->event);
    v->seq = e->seq;
    v->prev = e->prev;
    v->rcpt = view_str(e->rcpt);
    v->state = view_str(e->state);
    v->ev.p = e->ev;
    v->ev.len = e->ev ? e->ev_len : 0;
}

static int
copy_field(char *dst, size_t cap, const char *v, size_t len)
{
    if (len >= cap) return -1;
    memcpy(dst, v, len);
    dst[len] = '\0';
    return 0;
}

static int
copy_alloc(char **dst, size_t *dlen, const char *v, size_t len)
{
    free(*dst);
    *dst = malloc(len + 1);
    if (*dst == NULL) return -1;
    memcpy(*dst, v, len);
    (*dst)[len] = '\0';
    if (dlen) *dlen = len;
    return 0;
}

/* Takes one field of the entry (libchat's names and rules, chat_entry.c)
 * into the entry's own storage; unknown fields are ignored (forward
 * compatibility). Returns -1 when a value does not fit. */
int
cw_entry_field(cw_entry_t *e, const char *name, size_t nlen, const char *val, size_t vlen)
{
    chat_entry_t  v;
    const char   *why = NULL;
    int           f = chat_entry_field_lookup(name, nlen);

    memset(&v, 0, sizeof(v));
    if (chat_entry_set(&v, name, nlen, val, vlen, &why) != 0) {
        e->why = why;
        return -1;
    }
    switch (f) {
    case CHAT_EF_T:     e->type = v.type; return 0;
    case CHAT_EF_SEQ:   e->seq = v.seq; return 0;
    case CHAT_EF_PREV:  e->prev = v.prev; return 0;
    case CHAT_EF_CONV:  return copy_field(e->conv, sizeof(e->conv), val, vlen);
    case CHAT_EF_FROM:  return copy_field(e->from, sizeof(e->from), val, vlen);
    case CHAT_EF_DEV:   return copy_field(e->dev, sizeof(e->dev), val, vlen);
    case CHAT_EF_TO:    return copy_field(e->to, sizeof(e->to), val, vlen);
    case CHAT_EF_GROUP: return copy_field(e->group, sizeof(e->group), val, vlen);
    case CHAT_EF_ST:    return copy_field(e->st, sizeof(e->st), val, vlen);
    case CHAT_EF_EVENT: return copy_field(e->event, sizeof(e->event), val, vlen);
    case CHAT_EF_EV:    return copy_alloc(&e->ev, &e->ev_len, val, vlen);
    case CHAT_EF_RCPT:  return copy_alloc(&e->rcpt, NULL, val, vlen);
    case CHAT_EF_STATE: return copy_alloc(&e->state, NULL, val, vlen);
    default:            return 0;
    }
}

/* Checks that the entry is complete and consistent (chat_entry_check);
 * sets valid and why, the conversation's parts and a group change's
 * users (rcpt_users, once: a finished entry may be finished again). */
void
cw_entry_finish(cw_entry_t *e)
{
    chat_entry_t      v;
    chat_conv_t       cv;
    chat_entry_str_t  u;
    unsigned          n = 0;
    size_t            pos = 0, at = 0;

    cw_entry_view(e, &v);
    e->valid = 0;
    e->why = chat_entry_check(&v, &cv, &n);
    if (e->why != NULL) return;
    memcpy(e->a, cv.a, cv.alen);
    e->a[cv.alen] = '\0';
    e->b[0] = '\0';
    if (cv.kind == 'd') {
        memcpy(e->b, cv.b, cv.blen);
        e->b[cv.blen] = '\0';
    }
    e->is_group = (cv.kind == 'g');
    if (e->type == CW_T_GROUP && e->rcpt_users == NULL) {
        e->rcpt_users = malloc(v.rcpt.len + 1);
        if (e->rcpt_users == NULL) { e->why = "out of memory"; return; }
        while (chat_entry_rcpt_next(&v, &pos, &u)) {
            memcpy(e->rcpt_users + at, u.p, u.len);
            at += u.len;
            e->rcpt_users[at++] = '\0';
        }
        e->n_rcpt = (int) n;
    }
    e->valid = 1;
}

/* A Kafka record's value: a JSON object with the entry's fields. Strings,
 * or numbers for seq, or an object for ev. */
int
cw_entry_from_json(cw_entry_t *e, const char *json, size_t len)
{
    json_error_t  jerr;
    json_t       *root, *v;
    const char   *k;
    int           rc = 0;

    /* a body may hold U+0000 (the module accepts "\u0000") */
    root = json_loadb(json, len, JSON_ALLOW_NUL, &jerr);
    if (root == NULL || !json_is_object(root)) {
        json_decref(root);
        e->why = "value is not a JSON object";
        return -1;
    }
    json_object_foreach(root, k, v) {
        char   num[32];
        char  *dump = NULL;
        const char *s = NULL;
        size_t slen = 0;

        if (json_is_string(v)) {
            s = json_string_value(v);
            slen = json_string_length(v);
        } else if (json_is_integer(v)) {
            slen = (size_t) snprintf(num, sizeof(num), "%lld", (long long) json_integer_value(v));
            s = num;
        } else if (json_is_object(v) && strcmp(k, "ev") == 0) {
            dump = json_dumps(v, JSON_COMPACT);
            s = dump;
            slen = dump ? strlen(dump) : 0;
        } else {
            continue;
        }
        if (s && cw_entry_field(e, k, strlen(k), s, slen) != 0) rc = -1;
        free(dump);
    }
    json_decref(root);
    if (rc != 0 && e->why == NULL) e->why = "a field is too long or malformed";
    return rc;
}

void
cw_entry_inbox_field(const cw_entry_t *e, char field[CW_FIELD_MAX])
{
    chat_entry_t v;

    cw_entry_view(e, &v);
    if (chat_entry_inbox_field(&v, field, CW_FIELD_MAX) == 0) field[0] = '\0';
}

/*
 * Recipients of a valid direct entry (chat_entry_recipients): at most two
 * users, with the device to skip for the acting user's own copy. Group
 * entries have theirs from Redis (the fan-out resolves them).
 */
int
cw_recipients(const cw_entry_t *e, cw_rcpt_t out[2])
{
    chat_entry_t       v;
    chat_conv_t        cv;
    chat_entry_rcpt_t  r[2];
    int                n;

    if (!e->valid || e->is_group) return 0;
    cw_entry_view(e, &v);
    if (chat_entry_check(&v, &cv, NULL) != NULL) return 0;
    n = chat_entry_recipients(&v, &cv, r);
    for (int k = 0; k < n; k++) {
        /* the views point into conv or from: name our NUL-terminated copies */
        int sender = r[k].user.p == v.from.p;
        out[k].user = sender ? e->from : (strcmp(e->from, e->a) == 0 ? e->b : e->a);
        out[k].skip_dev = r[k].skip_dev ? e->dev : NULL;
    }
    return n;
}

cw_entry_t *
cw_batch_add(cw_batch_t *b)
{
    if (b->n == b->cap) {
        int         cap = b->cap ? b->cap * 2 : 256;
        cw_entry_t *ne = realloc(b->e, sizeof(*ne) * (size_t) cap);
        if (ne == NULL) return NULL;
        memset(ne + b->cap, 0, sizeof(*ne) * (size_t) (cap - b->cap));
        b->e = ne;
        b->cap = cap;
    }
    cw_entry_reset(&b->e[b->n]);
    return &b->e[b->n++];
}

void
cw_batch_clear(cw_batch_t *b)
{
    for (int i = 0; i < b->n; i++) cw_entry_reset(&b->e[i]);
    b->n = 0;
}

void
cw_batch_free(cw_batch_t *b)
{
    cw_batch_clear(b);
    free(b->e);
    b->e = NULL;
    b->cap = 0;
}
