/*
 * chat_proto.c - client frame parser and id helpers.  See chat_proto.h.
 */
#include "chat_proto.h"
#include "chat_json.h"

#include <string.h>

/* ---------------------------------------------------------------------- */
/* ids and conversations                                                  */
/* ---------------------------------------------------------------------- */

static int
id_char(unsigned c)
{
    return (c | 0x20) - 'a' < 26u || c - '0' < 10u
           || c == '.' || c == '_' || c == '-';
}

int
chat_id_valid(const char *p, size_t n, size_t max)
{
    size_t i;

    if (p == NULL || n == 0 || n > max) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        if (!id_char((unsigned char) p[i])) {
            return 0;
        }
    }
    return 1;
}

/* byte-order comparison of two ids */
static int
id_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int r = memcmp(a, b, alen < blen ? alen : blen);

    if (r != 0) {
        return r;
    }
    return (alen > blen) - (alen < blen);
}

int
chat_conv_parse(const char *p, size_t n, chat_conv_t *out)
{
    const char *colon;

    if (p == NULL || n < 3 || p[1] != ':') {
        return -1;
    }
    if (p[0] == 'g') {
        if (!chat_id_valid(p + 2, n - 2, CHAT_ID_MAX)) {
            return -1;
        }
        out->kind = 'g';
        out->a = p + 2;
        out->alen = n - 2;
        out->b = NULL;
        out->blen = 0;
        return 0;
    }
    if (p[0] != 'd') {
        return -1;
    }
    colon = memchr(p + 2, ':', n - 2);
    if (colon == NULL) {
        return -1;
    }
    out->a = p + 2;
    out->alen = (size_t) (colon - out->a);
    out->b = colon + 1;
    out->blen = n - (size_t) (out->b - p);
    if (!chat_id_valid(out->a, out->alen, CHAT_ID_MAX)
        || !chat_id_valid(out->b, out->blen, CHAT_ID_MAX)
        || id_cmp(out->a, out->alen, out->b, out->blen) > 0)
    {
        return -1;
    }
    out->kind = 'd';
    return 0;
}

size_t
chat_conv_direct(const char *a, size_t alen, const char *b, size_t blen,
    char out[CHAT_CONV_MAX + 1])
{
    const char *t;
    size_t      tl, o;

    if (!chat_id_valid(a, alen, CHAT_ID_MAX)
        || !chat_id_valid(b, blen, CHAT_ID_MAX))
    {
        return 0;
    }
    if (id_cmp(a, alen, b, blen) > 0) {
        t = a; a = b; b = t;
        tl = alen; alen = blen; blen = tl;
    }
    out[0] = 'd';
    out[1] = ':';
    memcpy(out + 2, a, alen);
    o = 2 + alen;
    out[o++] = ':';
    memcpy(out + o, b, blen);
    o += blen;
    out[o] = '\0';
    return o;
}

size_t
chat_conv_group(const char *g, size_t glen, char out[CHAT_CONV_MAX + 1])
{
    if (!chat_id_valid(g, glen, CHAT_ID_MAX)) {
        return 0;
    }
    out[0] = 'g';
    out[1] = ':';
    memcpy(out + 2, g, glen);
    out[2 + glen] = '\0';
    return 2 + glen;
}

/* ---------------------------------------------------------------------- */
/* frame parser                                                           */
/* ---------------------------------------------------------------------- */

enum {
    F_TYPE = 0,
    F_CLIENT_ID,
    F_TO,
    F_GROUP,
    F_BODY,
    F_KIND,
    F_MEDIA,
    F_CURSOR,
    F_CONV,
    F_SEQ,
    F_USERS,
    F_NFIELDS,
    F_UNKNOWN = F_NFIELDS
};

typedef struct {
    const char *name;
    size_t      len;
} name_t;

#define N(s) { s, sizeof(s) - 1 }

static const name_t field_names[F_NFIELDS] = {
    N("type"), N("client_id"), N("to"), N("group"), N("body"), N("kind"),
    N("media"), N("cursor"), N("conv"), N("seq"), N("users")
};

static const name_t type_names[] = {
    N(""), N("send"), N("ack"), N("read"), N("typing"), N("watch"),
    N("unwatch"), N("ping")
};

#undef N

/* a short decoded name, or 0 when it cannot be one of ours */
static size_t
short_str(const chat_json_doc_t *d, unsigned i, char *buf, size_t cap,
    const char **out)
{
    const chat_json_tok_t *t = &d->tok[i];
    size_t                 n;

    if (!(t->flags & CHAT_JSON_F_ESC)) {
        *out = chat_json_raw(d, i);
        return t->len;
    }
    if (chat_json_unescape(chat_json_raw(d, i), t->len, buf, cap, &n)
        != CHAT_JSON_OK)
    {
        return 0;
    }
    *out = buf;
    return n;
}

static unsigned
field_of(const chat_json_doc_t *d, unsigned k)
{
    char        buf[16];
    const char *s = NULL;
    size_t      n = short_str(d, k, buf, sizeof(buf), &s);
    unsigned    f;

    if (n == 0) {
        return F_UNKNOWN;
    }
    for (f = 0; f < F_NFIELDS; f++) {
        if (field_names[f].len == n && memcmp(field_names[f].name, s, n) == 0) {
            return f;
        }
    }
    return F_UNKNOWN;
}

static chat_proto_type_t
type_of(const chat_json_doc_t *d, unsigned i)
{
    char        buf[16];
    const char *s = NULL;
    size_t      n = short_str(d, i, buf, sizeof(buf), &s);
    unsigned    t;

    if (n == 0) {
        return CHAT_PROTO_NONE;
    }
    for (t = CHAT_PROTO_SEND; t <= CHAT_PROTO_PING; t++) {
        if (type_names[t].len == n && memcmp(type_names[t].name, s, n) == 0) {
            return (chat_proto_type_t) t;
        }
    }
    return CHAT_PROTO_NONE;
}

static void
set_str(chat_proto_str_t *s, const chat_json_doc_t *d, unsigned i)
{
    s->p = chat_json_raw(d, i);
    s->len = d->tok[i].len;
    s->esc = (d->tok[i].flags & CHAT_JSON_F_ESC) ? 1 : 0;
}

/* decode string token i into out (cap incl. NUL) and check it is an id */
static int
get_id(const chat_json_doc_t *d, unsigned i, char *out, size_t cap,
    size_t max, size_t *len)
{
    size_t n;

    if (d->tok[i].type != CHAT_JSON_STRING) {
        return -1;
    }
    if (!(d->tok[i].flags & CHAT_JSON_F_ESC)) {
        /* fast path: the raw text is the value */
        n = d->tok[i].len;
        if (!chat_id_valid(chat_json_raw(d, i), n, max) || n >= cap) {
            return -1;
        }
        memcpy(out, chat_json_raw(d, i), n);
        out[n] = '\0';
    } else if (chat_json_get_str(d, i, out, cap, &n) != CHAT_JSON_OK
               || n >= cap || !chat_id_valid(out, n, max))
    {
        return -1;
    }
    *len = n;
    return 0;
}

/* decoded UTF-8 without C0/C1 controls and DEL */
static int
no_controls(const unsigned char *p, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (p[i] < 0x20 || p[i] == 0x7F
            || (p[i] == 0xC2 && i + 1 < n && p[i + 1] < 0xA0))
        {
            return 0;
        }
    }
    return 1;
}

/* p[0..n) starts with the lower-case ASCII lit, compared case-insensitively */
static int
prefix_ci(const char *p, size_t n, const char *lit)
{
    size_t   i;
    unsigned c;

    for (i = 0; lit[i]; i++) {
        if (i == n) {
            return 0;
        }
        c = (unsigned char) p[i];
        if (c - 'A' < 26u) {
            c |= 0x20;
        }
        if (c != (unsigned char) lit[i]) {
            return 0;
        }
    }
    return 1;
}

static int
url_valid(const char *u, size_t n)
{
    size_t i, h;

    if (prefix_ci(u, n, "http://")) {
        h = 7;
    } else if (prefix_ci(u, n, "https://")) {
        h = 8;
    } else {
        return 0;
    }
    if (h == n || u[h] == '/' || u[h] == '?' || u[h] == '#') {
        return 0;                       /* no host */
    }
    for (i = 0; i < n; i++) {
        if ((unsigned char) u[i] <= 0x20 || (unsigned char) u[i] >= 0x7F) {
            return 0;
        }
    }
    return 1;
}

static int
tchar(unsigned c)
{
    return (c | 0x20) - 'a' < 26u || c - '0' < 10u
           || (c && strchr("!#$%&'*+-.^_`|~", (int) c) != NULL);
}

static int
mime_valid(const char *m, size_t n)
{
    size_t i, slash = 0;

    if (n == 0 || n > CHAT_PROTO_MIME_MAX) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        if (m[i] == '/') {
            if (slash || i == 0) {
                return 0;
            }
            slash = i;
        } else if (!tchar((unsigned char) m[i])) {
            return 0;
        }
    }
    return slash != 0 && slash != n - 1;
}

/* an integer 0 .. CHAT_INT_MAX */
static int
get_uint(const chat_json_doc_t *d, unsigned i, int64_t *v)
{
    return d->tok[i].type == CHAT_JSON_NUMBER
           && chat_json_get_int64(d, i, v) == CHAT_JSON_OK
           && *v >= 0 && *v <= CHAT_INT_MAX;
}

#define FAIL(code, text)                                                     \
    do { rc = (code); m = (text); goto fail; } while (0)

#define BAD(text)  FAIL(CHAT_PROTO_BAD_REQUEST, text)

/* to / group for send and typing */
static const char *
parse_target(const chat_json_doc_t *d, const unsigned *slot,
    chat_proto_frame_t *f)
{
    size_t n;

    if ((slot[F_TO] != 0) == (slot[F_GROUP] != 0)) {
        return "exactly one of to and group is required";
    }
    if (slot[F_TO]) {
        if (get_id(d, slot[F_TO], f->target_id, sizeof(f->target_id),
                   CHAT_ID_MAX, &n) != 0)
        {
            return "to must be a valid user id";
        }
        f->target = CHAT_PROTO_TARGET_USER;
    } else {
        if (get_id(d, slot[F_GROUP], f->target_id, sizeof(f->target_id),
                   CHAT_ID_MAX, &n) != 0)
        {
            return "group must be a valid group id";
        }
        f->target = CHAT_PROTO_TARGET_GROUP;
    }
    f->target_len = (uint8_t) n;
    return NULL;
}

static chat_proto_rc_t
parse_media(const chat_json_doc_t *d, unsigned obj, int64_t max_size,
    chat_proto_frame_t *f, const char **msg)
{
    char     url[CHAT_PROTO_URL_MAX];
    char     mime[CHAT_PROTO_MIME_MAX];
    size_t   n;
    int      iu, im, is;

    if (d->tok[obj].type != CHAT_JSON_OBJECT) {
        *msg = "media must be an object";
        return CHAT_PROTO_BAD_REQUEST;
    }
    iu = chat_json_obj_get(d, obj, "url", 3);
    im = chat_json_obj_get(d, obj, "mime", 4);
    is = chat_json_obj_get(d, obj, "size", 4);
    if (iu < 0 || im < 0 || is < 0) {
        *msg = "media needs url, mime and size";
        return CHAT_PROTO_BAD_REQUEST;
    }

    if (d->tok[iu].type != CHAT_JSON_STRING
        || chat_json_unescape(chat_json_raw(d, (unsigned) iu), d->tok[iu].len,
                              url, sizeof(url), &n) != CHAT_JSON_OK
        || !url_valid(url, n))
    {
        *msg = "media url must be an http or https URL of at most 2048 bytes";
        return CHAT_PROTO_BAD_REQUEST;
    }
    set_str(&f->media_url, d, (unsigned) iu);

    if (d->tok[im].type != CHAT_JSON_STRING
        || chat_json_unescape(chat_json_raw(d, (unsigned) im), d->tok[im].len,
                              mime, sizeof(mime), &n) != CHAT_JSON_OK
        || !mime_valid(mime, n))
    {
        *msg = "media mime must be a type/subtype";
        return CHAT_PROTO_BAD_REQUEST;
    }
    set_str(&f->media_mime, d, (unsigned) im);

    if (!get_uint(d, (unsigned) is, &f->media_size) || f->media_size == 0) {
        *msg = "media size must be a positive integer";
        return CHAT_PROTO_BAD_REQUEST;
    }
    if (f->media_size > max_size) {
        *msg = "media too large";
        return CHAT_PROTO_TOO_LARGE;
    }
    return CHAT_PROTO_OK;
}

chat_proto_rc_t
chat_proto_parse(const char *buf, size_t len, const chat_proto_opts_t *opts,
    chat_proto_frame_t *f, const char **msg)
{
    chat_json_tok_t    tok[CHAT_PROTO_MAX_TOKENS];
    chat_json_doc_t    doc, *d = &doc;
    chat_json_rc_t     jrc;
    chat_proto_rc_t    rc;
    chat_proto_type_t  type, deftype = CHAT_PROTO_NONE;
    unsigned           slot[F_NFIELDS + 1];
    unsigned           k, cnt, i;
    uint32_t           max_body = CHAT_PROTO_MAX_BODY_DEFAULT;
    int64_t            max_media = CHAT_PROTO_MAX_MEDIA_DEFAULT;
    const char        *m = NULL;
    char               idbuf[CHAT_ID_MAX + 1];
    unsigned char      cid[CHAT_PROTO_CLIENT_ID_MAX * 4];
    chat_proto_str_t   cidv;
    size_t             n;

    memset(f, 0, sizeof(*f));
    if (opts) {
        if (opts->max_body) {
            max_body = opts->max_body;
        }
        if (opts->max_media_size > 0) {
            max_media = opts->max_media_size;
        }
        deftype = opts->default_type;
    }

    jrc = chat_json_parse(d, buf, len, tok, CHAT_PROTO_MAX_TOKENS,
                          CHAT_PROTO_MAX_DEPTH);
    if (jrc != CHAT_JSON_OK) {
        FAIL((jrc == CHAT_JSON_E_TOKENS || jrc == CHAT_JSON_E_TOOBIG)
             ? CHAT_PROTO_TOO_LARGE : CHAT_PROTO_BAD_REQUEST,
             chat_json_strerror(jrc));
    }
    if (tok[0].type != CHAT_JSON_OBJECT) {
        BAD("frame must be a JSON object");
    }

    /* one pass over the members: remember where the known fields are */
    memset(slot, 0, sizeof(slot));
    for (k = 1, cnt = tok[0].aux; cnt; cnt--, k = tok[k + 1].next) {
        slot[field_of(d, k)] = k + 1;
    }

    /* type */
    if (slot[F_TYPE]) {
        if (tok[slot[F_TYPE]].type != CHAT_JSON_STRING) {
            BAD("type must be a string");
        }
        type = type_of(d, slot[F_TYPE]);
        if (type == CHAT_PROTO_NONE) {
            BAD("unknown type");
        }
        if (deftype != CHAT_PROTO_NONE && type != deftype) {
            BAD("type does not match the endpoint");
        }
    } else if (deftype != CHAT_PROTO_NONE) {
        type = deftype;
    } else {
        BAD("missing type");
    }
    f->type = type;

    switch (type) {

    case CHAT_PROTO_SEND:
        /* client_id */
        i = slot[F_CLIENT_ID];
        if (i == 0) {
            BAD("missing client_id");
        }
        if (tok[i].type != CHAT_JSON_STRING) {
            BAD("client_id must be a string");
        }
        if (tok[i].aux == 0 || tok[i].aux > CHAT_PROTO_CLIENT_ID_MAX) {
            BAD("client_id must be 1 to 64 characters");
        }
        if (tok[i].flags & CHAT_JSON_F_ESC) {
            if (chat_json_unescape(chat_json_raw(d, i), tok[i].len,
                                   (char *) cid, sizeof(cid), &n)
                != CHAT_JSON_OK || !no_controls(cid, n))
            {
                BAD("client_id must not contain control characters");
            }
        } else if (!no_controls((const unsigned char *) chat_json_raw(d, i),
                                tok[i].len))
        {
            BAD("client_id must not contain control characters");
        }
        set_str(&f->client_id, d, i);

        /* target */
        m = parse_target(d, slot, f);
        if (m) {
            rc = CHAT_PROTO_BAD_REQUEST;
            goto fail;
        }

        /* kind */
        f->kind = CHAT_PROTO_TEXT;
        i = slot[F_KIND];
        if (i) {
            if (chat_json_str_eq(d, i, "media", 5)) {
                f->kind = CHAT_PROTO_MEDIA;
            } else if (!chat_json_str_eq(d, i, "text", 4)) {
                BAD("kind must be text or media");
            }
        }

        /* body */
        i = slot[F_BODY];
        if (i) {
            if (tok[i].type != CHAT_JSON_STRING) {
                BAD("body must be a string");
            }
            if (tok[i].aux > max_body) {
                FAIL(CHAT_PROTO_TOO_LARGE, "body too long");
            }
            set_str(&f->body, d, i);
            f->body_chars = tok[i].aux;
        } else {
            f->body.p = buf;            /* empty, but inside the input */
        }
        if (f->kind == CHAT_PROTO_TEXT && f->body_chars == 0) {
            BAD(i ? "body must not be empty" : "missing body");
        }

        /* media */
        i = slot[F_MEDIA];
        if (f->kind == CHAT_PROTO_MEDIA) {
            if (i == 0) {
                BAD("missing media");
            }
            rc = parse_media(d, i, max_media, f, &m);
            if (rc != CHAT_PROTO_OK) {
                goto fail;
            }
        } else if (i) {
            BAD("media requires kind media");
        }
        break;

    case CHAT_PROTO_ACK:
        i = slot[F_CURSOR];
        if (i == 0) {
            BAD("missing cursor");
        }
        if (!get_uint(d, i, &f->cursor)) {
            BAD("cursor must be an integer 0..2^53-1");
        }
        break;

    case CHAT_PROTO_READ:
        i = slot[F_CONV];
        if (i == 0) {
            BAD("missing conv");
        }
        if (tok[i].type != CHAT_JSON_STRING
            || tok[i].len > 6 * (CHAT_CONV_MAX + 1)
            || chat_json_get_str(d, i, f->conv, sizeof(f->conv), &n)
               != CHAT_JSON_OK
            || n >= sizeof(f->conv)
            || !chat_conv_valid(f->conv, n))
        {
            BAD("conv must be a valid conversation id");
        }
        f->conv_len = (uint8_t) n;
        i = slot[F_SEQ];
        if (i == 0) {
            BAD("missing seq");
        }
        if (!get_uint(d, i, &f->seq)) {
            BAD("seq must be an integer 0..2^53-1");
        }
        break;

    case CHAT_PROTO_TYPING:
        m = parse_target(d, slot, f);
        if (m) {
            rc = CHAT_PROTO_BAD_REQUEST;
            goto fail;
        }
        break;

    case CHAT_PROTO_WATCH:
    case CHAT_PROTO_UNWATCH:
        i = slot[F_USERS];
        if (i == 0) {
            BAD("missing users");
        }
        if (tok[i].type != CHAT_JSON_ARRAY) {
            BAD("users must be an array");
        }
        if (tok[i].aux == 0) {
            BAD("users must not be empty");
        }
        if (tok[i].aux > CHAT_PROTO_MAX_USERS) {
            FAIL(CHAT_PROTO_TOO_LARGE, "at most 100 users at once");
        }
        for (k = i + 1, cnt = tok[i].aux; cnt; cnt--, k = tok[k].next) {
            if (get_id(d, k, idbuf, sizeof(idbuf), CHAT_ID_MAX, &n) != 0) {
                BAD("users must hold valid user ids");
            }
        }
        f->nusers = tok[i].aux;
        set_str(&f->users, d, i);
        break;

    case CHAT_PROTO_PING:
    case CHAT_PROTO_NONE:
        break;
    }

    if (msg) {
        *msg = NULL;
    }
    return CHAT_PROTO_OK;

fail:
    /* keep what an error answer may echo: the type, once known, and a
     * send's client_id, once it was found valid */
    type = f->type;
    cidv = f->client_id;
    memset(f, 0, sizeof(*f));
    f->type = type;
    f->client_id = cidv;
    if (msg) {
        *msg = m;
    }
    return rc;
}

const char *
chat_proto_code(chat_proto_rc_t rc)
{
    switch (rc) {
    case CHAT_PROTO_OK:          return "ok";
    case CHAT_PROTO_BAD_REQUEST: return "bad_request";
    case CHAT_PROTO_TOO_LARGE:   return "too_large";
    }
    return "bad_request";
}

const char *
chat_proto_type_name(chat_proto_type_t t)
{
    if ((unsigned) t > CHAT_PROTO_PING) {
        return "";
    }
    return type_names[t].name;
}

int
chat_proto_users_next(const chat_proto_frame_t *f, size_t *pos,
    char out[CHAT_ID_MAX + 1], size_t *outlen)
{
    const char *p = f->users.p;
    size_t      i = *pos, n = f->users.len, start;

    if (f->type != CHAT_PROTO_WATCH && f->type != CHAT_PROTO_UNWATCH) {
        return 0;
    }
    /* skip '[', blanks and ',' up to the next string */
    while (i < n && p[i] != '"') {
        if (p[i] == ']') {
            *pos = n;
            return 0;
        }
        i++;
    }
    if (i >= n) {
        *pos = n;
        return 0;
    }
    start = ++i;
    while (i < n && p[i] != '"') {
        i += (p[i] == '\\') ? 2 : 1;
    }
    if (i >= n
        || chat_json_unescape(p + start, i - start, out, CHAT_ID_MAX, outlen)
           != CHAT_JSON_OK)
    {
        *pos = n;
        return 0;
    }
    out[*outlen] = '\0';
    *pos = i + 1;
    return 1;
}
