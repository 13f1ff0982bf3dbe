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

int
cw_entry_fields(const cw_entry_t *e, const char *name[CW_ENTRY_FIELDS], const char *val[CW_ENTRY_FIELDS],
                size_t len[CW_ENTRY_FIELDS], char *buf, size_t buflen)
{
    static const char *types[] = { "?", "msg", "receipt", "group" };
    int                n = 0;
    size_t             used = 0;

#define F(nm, v, l) do { name[n] = (nm); val[n] = (v); len[n] = (l); n++; } while (0)
#define S(nm, v) do { if ((v)[0]) F(nm, v, strlen(v)); } while (0)
    F("t", types[e->type >= 1 && e->type <= 3 ? e->type : 0], strlen(types[e->type >= 1 && e->type <= 3 ? e->type : 0]));
    S("conv", e->conv);
    S("from", e->from);
    S("dev", e->dev);
    S("to", e->to);
    S("group", e->group);
    S("st", e->st);
    S("event", e->event);
    if (e->seq || e->prev) {
        int k = snprintf(buf, buflen, "%lld", (long long) e->seq);
        F("seq", buf, (size_t) k);
        used = (size_t) k + 1;
        if (e->prev && used < buflen) {
            k = snprintf(buf + used, buflen - used, "%lld", (long long) e->prev);
            F("prev", buf + used, (size_t) k);
            used += (size_t) k + 1;
        }
    }
    if (e->rcpt) {
        /* split_users replaced the spaces by NULs: put them back in a copy */
        size_t rl = 0;
        const char *u = e->rcpt;
        if (e->n_rcpt > 0) {
            for (int k = 0; k < e->n_rcpt; k++) {
                size_t ul = strlen(u);
                while (ul == 0) { u++; ul = strlen(u); }     /* empty runs of spaces */
                if (used + rl + ul + 1 >= buflen) break;
                if (rl) buf[used + rl++] = ' ';
                memcpy(buf + used + rl, u, ul);
                rl += ul;
                u += ul + 1;
            }
            F("rcpt", buf + used, rl);
        } else {
            F("rcpt", e->rcpt, strlen(e->rcpt));
        }
    }
    if (e->state) F("state", e->state, strlen(e->state));
    if (e->ev) F("ev", e->ev, e->ev_len);
#undef S
#undef F
    return n;
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
copy_alloc(char **dst, const char *v, size_t len)
{
    free(*dst);
    *dst = malloc(len + 1);
    if (*dst == NULL) return -1;
    memcpy(*dst, v, len);
    (*dst)[len] = '\0';
    return 0;
}

/* A decimal integer in 0 .. CW_INT_MAX (16 digits at most). */
static int
parse_num(int64_t *out, const char *val, size_t vlen)
{
    int64_t n = 0;
    if (vlen == 0 || vlen > 16) return -1;
    for (size_t i = 0; i < vlen; i++) {
        if (val[i] < '0' || val[i] > '9') return -1;
        n = n * 10 + (val[i] - '0');
    }
    if (n > CW_INT_MAX) return -1;
    *out = n;
    return 0;
}

/* Takes one field of the entry; unknown fields are ignored (forward
 * compatibility). Returns -1 when a value does not fit. */
int
cw_entry_field(cw_entry_t *e, const char *name, size_t nlen, const char *val, size_t vlen)
{
#define IS(s) (nlen == sizeof(s) - 1 && memcmp(name, s, nlen) == 0)
    if (IS("t")) {
        if (vlen == 3 && memcmp(val, "msg", 3) == 0) e->type = CW_T_MSG;
        else if (vlen == 7 && memcmp(val, "receipt", 7) == 0) e->type = CW_T_RECEIPT;
        else if (vlen == 5 && memcmp(val, "group", 5) == 0) e->type = CW_T_GROUP;
        else e->type = -1;
        return 0;
    }
    if (IS("conv")) return copy_field(e->conv, sizeof(e->conv), val, vlen);
    if (IS("from")) return copy_field(e->from, sizeof(e->from), val, vlen);
    if (IS("dev")) return copy_field(e->dev, sizeof(e->dev), val, vlen);
    if (IS("to")) return copy_field(e->to, sizeof(e->to), val, vlen);
    if (IS("group")) return copy_field(e->group, sizeof(e->group), val, vlen);
    if (IS("st")) return copy_field(e->st, sizeof(e->st), val, vlen);
    if (IS("event")) return copy_field(e->event, sizeof(e->event), val, vlen);
    if (IS("seq") || IS("prev")) {
        if (parse_num(IS("seq") ? &e->seq : &e->prev, val, vlen) == 0) return 0;
        e->why = "seq or prev is not an integer in 0 .. 2^53-1";
        return -1;
    }
    if (IS("ev")) {
        if (copy_alloc(&e->ev, val, vlen) != 0) return -1;
        e->ev_len = vlen;
        return 0;
    }
    if (IS("rcpt")) return copy_alloc(&e->rcpt, val, vlen);
    if (IS("state")) return copy_alloc(&e->state, val, vlen);
#undef IS
    return 0;
}

static const char *
other(const cw_entry_t *e, const char *u)
{
    return strcmp(u, e->a) == 0 ? e->b : e->a;
}

/* "a b c" -> "a\0b\0c\0", each a valid id; once (a finished entry may be
 * finished again: n_rcpt says it was split already). */
static int
split_users(cw_entry_t *e)
{
    char *p = e->rcpt, *end;

    if (e->n_rcpt > 0) return 0;
    end = p + strlen(p);
    while (p < end) {
        char *sp = strchr(p, ' ');
        if (sp == NULL) sp = end;
        if (sp > p) {
            if (!cw_valid_id(p, (size_t) (sp - p), CW_ID_MAX)) return -1;
            e->n_rcpt++;
        }
        *sp = '\0';
        p = sp + 1;
    }
    return 0;
}

/* Checks that the entry is complete and consistent; sets valid and why. */
void
cw_entry_finish(cw_entry_t *e)
{
    e->valid = 0;
    if (e->type != CW_T_MSG && e->type != CW_T_RECEIPT && e->type != CW_T_GROUP) {
        e->why = "unknown type t";
        return;
    }
    if (cw_parse_conv(e->conv, e->a, e->b, &e->is_group) != 0) { e->why = "bad conv"; return; }
    if (!cw_valid_id(e->from, strlen(e->from), CW_ID_MAX)) { e->why = "bad from"; return; }
    if (e->dev[0] && !cw_valid_id(e->dev, strlen(e->dev), CW_DEV_MAX)) { e->why = "bad dev"; return; }
    if (e->seq < 1) { e->why = "bad seq"; return; }
    if (e->ev == NULL || e->ev_len < 2 || e->ev[0] != '{') { e->why = "bad ev"; return; }
    if (e->type == CW_T_GROUP) {
        if (!e->is_group || strcmp(e->group, e->a) != 0) { e->why = "group mismatch"; return; }
        if (strcmp(e->event, "created") != 0 && strcmp(e->event, "added") != 0
            && strcmp(e->event, "removed") != 0)
        {
            e->why = "bad group event";
            return;
        }
        if (e->rcpt == NULL || e->state == NULL) { e->why = "group entry without rcpt or state"; return; }
        if (split_users(e) != 0) { e->why = "bad rcpt"; return; }
    } else if (e->is_group) {
        if (e->type == CW_T_MSG && strcmp(e->group, e->a) != 0) { e->why = "group mismatch"; return; }
    } else {
        if (strcmp(e->from, e->a) != 0 && strcmp(e->from, e->b) != 0) {
            e->why = "from is not a participant";
            return;
        }
        if (e->type == CW_T_MSG && strcmp(e->to, other(e, e->from)) != 0) {
            e->why = "to is not the other participant";
            return;
        }
    }
    if (e->type == CW_T_RECEIPT && strcmp(e->st, "delivered") != 0 && strcmp(e->st, "read") != 0) {
        e->why = "bad receipt status st";
        return;
    }
    e->why = NULL;
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
    /* messages and membership changes share the conversation's seqs */
    if (e->type == CW_T_RECEIPT) snprintf(field, CW_FIELD_MAX, "r:%s:%s:%s", e->st, e->conv, e->from);
    else snprintf(field, CW_FIELD_MAX, "m:%s", e->conv);
}

/*
 * Recipients of a valid direct entry (docs/PIPELINE.md, "Recipients"): at
 * most two users, with the device to skip for the acting user's own copy.
 * Group entries have theirs from Redis (the fan-out resolves them).
 */
int
cw_recipients(const cw_entry_t *e, cw_rcpt_t out[2])
{
    int         n = 0, self = strcmp(e->a, e->b) == 0;
    const char *peer;

    if (!e->valid || e->is_group) return 0;
    peer = other(e, e->from);
    if (e->type == CW_T_MSG || strcmp(e->st, "read") == 0) {
        if (!self) {
            out[n].user = peer;
            out[n].skip_dev = NULL;
            n++;
        }
        out[n].user = e->from;
        out[n].skip_dev = e->dev[0] ? e->dev : NULL;
        n++;
    } else if (!self) {                     /* delivered */
        out[n].user = peer;
        out[n].skip_dev = NULL;
        n++;
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
