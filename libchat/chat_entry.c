/*
 * chat_entry: queue entries and delivery payloads (see chat_entry.h).
 */
#include "chat_entry.h"
#include "chat_json.h"

#include <string.h>

static const char *const chat_entry_names[CHAT_EF_N] = {
    "t", "conv", "from", "dev", "to", "group", "st", "event", "seq", "prev",
    "rcpt", "state", "ev"
};

static const char *const chat_entry_types[] = { "msg", "receipt", "group", "del" };


const char *
chat_entry_field_name(chat_entry_field_t f)
{
    return (unsigned) f < CHAT_EF_N ? chat_entry_names[f] : "?";
}


int
chat_entry_field_lookup(const char *name, size_t len)
{
    for (int i = 0; i < CHAT_EF_N; i++) {
        if (strlen(chat_entry_names[i]) == len
            && memcmp(chat_entry_names[i], name, len) == 0)
        {
            return i;
        }
    }
    return -1;
}


const char *
chat_entry_type_name(chat_entry_type_t t)
{
    return t >= CHAT_ENTRY_MSG && t <= CHAT_ENTRY_DEL
           ? chat_entry_types[t - 1] : "?";
}


chat_entry_type_t
chat_entry_type_lookup(const char *v, size_t len)
{
    for (int i = 0; i < 4; i++) {
        if (strlen(chat_entry_types[i]) == len
            && memcmp(chat_entry_types[i], v, len) == 0)
        {
            return (chat_entry_type_t) (i + 1);
        }
    }
    return CHAT_ENTRY_BAD;
}


/* digits only, 0 .. CHAT_INT_MAX (so at most CHAT_INT_DIGITS of them) */
static int
chat_entry_int(const char *v, size_t len, int64_t *out)
{
    int64_t  n = 0;

    if (len == 0 || len > CHAT_INT_DIGITS) {
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        if (v[i] < '0' || v[i] > '9') {
            return -1;
        }
        n = n * 10 + (v[i] - '0');
    }
    if (n > CHAT_INT_MAX) {
        return -1;
    }
    *out = n;
    return 0;
}


static const chat_entry_str_t *
chat_entry_str(const chat_entry_t *e, int f)
{
    switch (f) {
    case CHAT_EF_CONV:  return &e->conv;
    case CHAT_EF_FROM:  return &e->from;
    case CHAT_EF_DEV:   return &e->dev;
    case CHAT_EF_TO:    return &e->to;
    case CHAT_EF_GROUP: return &e->group;
    case CHAT_EF_ST:    return &e->st;
    case CHAT_EF_EVENT: return &e->event;
    case CHAT_EF_RCPT:  return &e->rcpt;
    case CHAT_EF_STATE: return &e->state;
    case CHAT_EF_EV:    return &e->ev;
    default:            return NULL;
    }
}


int
chat_entry_set(chat_entry_t *e, const char *name, size_t nlen,
    const char *val, size_t vlen, const char **why)
{
    int                f = chat_entry_field_lookup(name, nlen);
    chat_entry_str_t  *s;

    switch (f) {
    case -1:
        return 0;                      /* a newer writer's field */
    case CHAT_EF_T:
        e->type = chat_entry_type_lookup(val, vlen);
        return 0;
    case CHAT_EF_SEQ:
    case CHAT_EF_PREV:
        if (chat_entry_int(val, vlen, f == CHAT_EF_SEQ ? &e->seq : &e->prev)
            == 0)
        {
            return 0;
        }
        *why = "seq or prev is not an integer in 0 .. 2^53-1";
        return -1;
    default:
        s = (chat_entry_str_t *) chat_entry_str(e, f);  /* e is ours */
        s->p = val;
        s->len = vlen;
        return 0;
    }
}


static int
chat_entry_is(const chat_entry_str_t *s, const char *lit)
{
    return s->len == strlen(lit) && memcmp(s->p, lit, s->len) == 0;
}


static int
chat_entry_eq(const chat_entry_str_t *s, const char *p, size_t len)
{
    return s->len == len && memcmp(s->p, p, len) == 0;
}


int
chat_entry_rcpt_next(const chat_entry_t *e, size_t *pos,
    chat_entry_str_t *user)
{
    size_t  i = *pos, j;

    while (i < e->rcpt.len && e->rcpt.p[i] == ' ') {
        i++;
    }
    if (i >= e->rcpt.len) {
        *pos = i;
        return 0;
    }
    for (j = i; j < e->rcpt.len && e->rcpt.p[j] != ' '; j++) { /* void */ }
    user->p = e->rcpt.p + i;
    user->len = j - i;
    *pos = j;
    return 1;
}


const char *
chat_entry_check(const chat_entry_t *e, chat_conv_t *cvp, unsigned *nrcpt)
{
    chat_conv_t       cv;
    chat_entry_str_t  u;
    size_t            pos = 0;
    unsigned          n = 0;
    int               is_group;

    if (e->type < CHAT_ENTRY_MSG || e->type > CHAT_ENTRY_DEL) {
        return "unknown type t";
    }
    if (e->conv.len > CHAT_CONV_MAX
        || chat_conv_parse(e->conv.p, e->conv.len, &cv) != 0)
    {
        return "bad conv";
    }
    if (!chat_id_valid(e->from.p, e->from.len, CHAT_ID_MAX)) {
        return "bad from";
    }
    if (e->dev.len && !chat_id_valid(e->dev.p, e->dev.len, CHAT_DEV_ID_MAX)) {
        return "bad dev";
    }
    if (e->seq < 1) {
        return "bad seq";
    }
    if (e->ev.len < 2 || e->ev.p[0] != '{') {
        return "bad ev";
    }

    is_group = (cv.kind == 'g');

    if (e->type == CHAT_ENTRY_GROUP) {
        if (!is_group || !chat_entry_eq(&e->group, cv.a, cv.alen)) {
            return "group mismatch";
        }
        if (!chat_entry_is(&e->event, "created")
            && !chat_entry_is(&e->event, "added")
            && !chat_entry_is(&e->event, "removed"))
        {
            return "bad group event";
        }
        if (e->rcpt.len == 0 || e->state.len == 0) {
            return "group entry without rcpt or state";
        }
        while (chat_entry_rcpt_next(e, &pos, &u)) {
            if (!chat_id_valid(u.p, u.len, CHAT_ID_MAX)) {
                return "bad rcpt";
            }
            n++;
        }
    } else if (is_group) {
        if ((e->type == CHAT_ENTRY_MSG || e->type == CHAT_ENTRY_DEL)
            && !chat_entry_eq(&e->group, cv.a, cv.alen))
        {
            return "group mismatch";
        }
    } else {
        int  is_a = chat_entry_eq(&e->from, cv.a, cv.alen),
             is_b = chat_entry_eq(&e->from, cv.b, cv.blen);

        if (!is_a && !is_b) {
            return "from is not a participant";
        }
        if ((e->type == CHAT_ENTRY_MSG || e->type == CHAT_ENTRY_DEL)
            && !(is_a ? chat_entry_eq(&e->to, cv.b, cv.blen)
                      : chat_entry_eq(&e->to, cv.a, cv.alen)))
        {
            return "to is not the other participant";
        }
    }

    /* a deletion names the message by its seq (the entry's seq) and the
     * event JSON by its id; a whole conversation deleted for me (clear)
     * names the last seq it covers */
    if (e->type == CHAT_ENTRY_DEL && !chat_entry_is(&e->event, "everyone")
        && !chat_entry_is(&e->event, "me") && !chat_entry_is(&e->event, "clear"))
    {
        return "bad deletion event";
    }

    if (e->type == CHAT_ENTRY_RECEIPT && !chat_entry_is(&e->st, "delivered")
        && !chat_entry_is(&e->st, "read"))
    {
        return "bad receipt status st";
    }

    if (cvp) {
        *cvp = cv;
    }
    if (nrcpt) {
        *nrcpt = n;
    }
    return NULL;
}


int
chat_entry_recipients(const chat_entry_t *e, const chat_conv_t *cv,
    chat_entry_rcpt_t out[2])
{
    int               n = 0, self;
    chat_entry_str_t  peer;

    if (cv->kind != 'd') {
        return 0;
    }
    self = (cv->alen == cv->blen && memcmp(cv->a, cv->b, cv->alen) == 0);
    if (chat_entry_eq(&e->from, cv->a, cv->alen)) {
        peer.p = cv->b;
        peer.len = cv->blen;
    } else {
        peer.p = cv->a;
        peer.len = cv->alen;
    }

    /* a message, a deletion for everyone and a read receipt go to both
     * sides (the sender's other devices sync); a deletion for me only to
     * the acting user's other devices; a delivered receipt only to the
     * other participant */
    if (e->type == CHAT_ENTRY_DEL && !chat_entry_is(&e->event, "everyone")) {
        out[n].user = e->from;
        out[n].skip_dev = (e->dev.len != 0);
        n++;
    } else if (e->type == CHAT_ENTRY_MSG || e->type == CHAT_ENTRY_DEL
        || chat_entry_is(&e->st, "read"))
    {
        if (!self) {
            out[n].user = peer;
            out[n].skip_dev = 0;
            n++;
        }
        out[n].user = e->from;
        out[n].skip_dev = (e->dev.len != 0);
        n++;
    } else if (!self) {
        out[n].user = peer;
        out[n].skip_dev = 0;
        n++;
    }
    return n;
}


size_t
chat_entry_inbox_field(const chat_entry_t *e, char *buf, size_t cap)
{
    chat_json_w_t  w;

    chat_json_w_init(&w, buf, cap);
    if (e->type == CHAT_ENTRY_RECEIPT) {
        chat_json_w_raw(&w, "r:", 2);
        chat_json_w_raw(&w, e->st.p, e->st.len);
        chat_json_w_raw(&w, ":", 1);
        chat_json_w_raw(&w, e->conv.p, e->conv.len);
        chat_json_w_raw(&w, ":", 1);
        chat_json_w_raw(&w, e->from.p, e->from.len);
    } else if (e->type == CHAT_ENTRY_DEL) {
        char  num[20];

        if (chat_entry_is(&e->event, "clear")) {
            /* one per conversation: a later clear covers more seqs */
            chat_json_w_raw(&w, "x:c:", 4);
            chat_json_w_raw(&w, e->conv.p, e->conv.len);
        } else {
            chat_json_w_raw(&w, chat_entry_is(&e->event, "me") ? "x:m:"
                                                               : "x:e:", 4);
            chat_json_w_raw(&w, e->conv.p, e->conv.len);
            chat_json_w_raw(&w, ":", 1);
            chat_json_w_raw(&w, num, chat_json_fmt_int64(num, e->seq));
        }
    } else {
        chat_json_w_raw(&w, "m:", 2);
        chat_json_w_raw(&w, e->conv.p, e->conv.len);
    }
    chat_json_w_raw(&w, "", 1);        /* the NUL */
    return w.overflow ? 0 : w.len - 1;
}


int
chat_entry_pairs(const chat_entry_t *e, const char *name[CHAT_EF_N],
    const char *val[CHAT_EF_N], size_t len[CHAT_EF_N],
    char num[CHAT_ENTRY_NUMBUF])
{
    int                     n = 0;
    size_t                  used = 0, k;
    const chat_entry_str_t *s;

    for (int f = 0; f < CHAT_EF_N; f++) {
        if (f == CHAT_EF_T) {
            if (e->type < CHAT_ENTRY_MSG || e->type > CHAT_ENTRY_DEL) {
                continue;
            }
            name[n] = "t";
            val[n] = chat_entry_type_name(e->type);
            len[n] = strlen(val[n]);
            n++;
            continue;
        }
        if (f == CHAT_EF_SEQ || f == CHAT_EF_PREV) {
            int64_t  v = (f == CHAT_EF_SEQ) ? e->seq : e->prev;

            if (v <= 0) {
                continue;
            }
            k = chat_json_fmt_int64(num + used, v);
            name[n] = chat_entry_names[f];
            val[n] = num + used;
            len[n] = k;
            used += k;
            n++;
            continue;
        }
        s = chat_entry_str(e, f);
        if (s->len == 0) {
            continue;
        }
        name[n] = chat_entry_names[f];
        val[n] = s->p;
        len[n] = s->len;
        n++;
    }
    return n;
}


size_t
chat_entry_json(const chat_entry_t *e, char *buf, size_t cap)
{
    const char     *name[CHAT_EF_N], *val[CHAT_EF_N];
    size_t          len[CHAT_EF_N];
    char            num[CHAT_ENTRY_NUMBUF];
    chat_json_w_t   w;
    int             n = chat_entry_pairs(e, name, val, len, num);

    chat_json_w_init(&w, buf, cap);
    chat_json_w_raw(&w, "{", 1);
    for (int i = 0; i < n; i++) {
        if (i) {
            chat_json_w_raw(&w, ",", 1);
        }
        chat_json_w_str(&w, name[i], strlen(name[i]));
        chat_json_w_raw(&w, ":", 1);
        chat_json_w_str(&w, val[i], len[i]);
    }
    chat_json_w_raw(&w, "}", 1);
    return w.overflow ? 0 : w.len;
}


/* ---- delivery payloads -------------------------------------------------- */

int
chat_delivery_parse(const char *p, size_t len, chat_entry_str_t *tokens,
    chat_entry_str_t *event)
{
    const char  *nl = memchr(p, '\n', len);

    /* at least "{}" after the newline */
    if (nl == NULL || (size_t) (p + len - nl) < 3 || nl[1] != '{') {
        return -1;
    }
    tokens->p = p;
    tokens->len = (size_t) (nl - p);
    event->p = nl + 1;
    event->len = (size_t) (p + len - nl - 1);
    return 0;
}


int
chat_delivery_next(const chat_entry_str_t *tokens, size_t *pos,
    chat_delivery_rcpt_t *r)
{
    const char  *t = tokens->p, *end = tokens->p + tokens->len, *tok, *te,
                *bang, *colon, *uend;
    int64_t      c;

    for (tok = t + *pos; tok < end; tok = te + 1) {
        te = memchr(tok, ' ', (size_t) (end - tok));
        if (te == NULL) {
            te = end;
        }
        *pos = (size_t) (te - t) + (te < end);
        if (te == tok) {
            continue;
        }
        bang = memchr(tok, '!', (size_t) (te - tok));
        colon = memchr(tok, ':', (size_t) ((bang ? bang : te) - tok));
        uend = colon ? colon : (bang ? bang : te);
        if (!chat_id_valid(tok, (size_t) (uend - tok), CHAT_ID_MAX)) {
            continue;
        }
        r->cursor = 0;
        if (colon) {
            if (chat_entry_int(colon + 1, (size_t) ((bang ? bang : te) - colon
                                                    - 1), &c) != 0
                || c == 0)
            {
                continue;
            }
            r->cursor = (uint64_t) c;
        }
        r->user.p = tok;
        r->user.len = (size_t) (uend - tok);
        r->dev.p = bang ? bang + 1 : NULL;
        r->dev.len = bang ? (size_t) (te - bang - 1) : 0;
        return 1;
    }
    *pos = tokens->len;
    return 0;
}


size_t
chat_delivery_token(char *buf, size_t cap, const char *user, size_t ulen,
    uint64_t cursor, const char *dev, size_t dlen)
{
    chat_json_w_t  w;
    char           num[20];

    chat_json_w_init(&w, buf, cap);
    chat_json_w_raw(&w, user, ulen);
    if (cursor) {
        chat_json_w_raw(&w, ":", 1);
        chat_json_w_raw(&w, num, chat_json_fmt_int64(num, (int64_t) cursor));
    }
    if (dlen) {
        chat_json_w_raw(&w, "!", 1);
        chat_json_w_raw(&w, dev, dlen);
    }
    chat_json_w_raw(&w, "", 1);
    return w.overflow ? 0 : w.len - 1;
}
