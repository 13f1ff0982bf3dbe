/*
 * chat_json.c - strict JSON reader and writer helpers.  See chat_json.h.
 */
#include "chat_json.h"

#include <string.h>

typedef const unsigned char *cup;

/* ---------------------------------------------------------------------- */
/* UTF-8                                                                  */
/* ---------------------------------------------------------------------- */

/*
 * Length of the well-formed UTF-8 sequence at p (p < end, *p >= 0x80), or 0.
 * Second-byte ranges per Unicode table 3-7: E0 A0..BF (no overlongs),
 * ED 80..9F (no surrogates), F0 90..BF (no overlongs), F4 80..8F (max
 * U+10FFFF); C0, C1 and F5..FF never start a sequence.
 */
static size_t
utf8_seq(cup p, cup end, uint32_t *cp)
{
    unsigned c = p[0], lo = 0x80, hi = 0xBF;
    size_t   n, i;
    uint32_t v;

    if (c >= 0xC2 && c <= 0xDF) {
        n = 2; v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3; v = c & 0x0F;
        if (c == 0xE0) {
            lo = 0xA0;
        } else if (c == 0xED) {
            hi = 0x9F;
        }
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4; v = c & 0x07;
        if (c == 0xF0) {
            lo = 0x90;
        } else if (c == 0xF4) {
            hi = 0x8F;
        }
    } else {
        return 0;
    }

    if ((size_t) (end - p) < n) {
        return 0;
    }
    if (p[1] < lo || p[1] > hi) {
        return 0;
    }
    v = (v << 6) | (p[1] & 0x3F);
    for (i = 2; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) {
            return 0;
        }
        v = (v << 6) | (p[i] & 0x3F);
    }
    *cp = v;
    return n;
}

static size_t
utf8_put(unsigned char *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (unsigned char) cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char) (0xC0 | (cp >> 6));
        o[1] = (unsigned char) (0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char) (0xE0 | (cp >> 12));
        o[1] = (unsigned char) (0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char) (0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char) (0xF0 | (cp >> 18));
    o[1] = (unsigned char) (0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char) (0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char) (0x80 | (cp & 0x3F));
    return 4;
}

/* ---------------------------------------------------------------------- */
/* escapes                                                                */
/* ---------------------------------------------------------------------- */

static int
hexval(unsigned c)
{
    if (c >= '0' && c <= '9') {
        return (int) (c - '0');
    }
    c |= 0x20;
    if (c >= 'a' && c <= 'f') {
        return (int) (c - 'a' + 10);
    }
    return -1;
}

/*
 * Up to 4 hex digits at p, of which avail are present: the value, -1 for a
 * byte that is no hex digit, -2 when the input ends first.
 */
static long
hex4(cup p, ptrdiff_t avail)
{
    long     v = 0;
    int      i, h;

    for (i = 0; i < 4; i++) {
        if (i >= avail) {
            return -2;
        }
        h = hexval(p[i]);
        if (h < 0) {
            return -1;
        }
        v = (v << 4) | h;
    }
    return v;
}

/*
 * Decode the escape at p (*p == '\\').  On success *used is the number of
 * input bytes and *cp the code point.  short_rc is returned when the input
 * ends inside the escape.
 */
static chat_json_rc_t
decode_escape(cup p, cup end, size_t *used, uint32_t *cp,
    chat_json_rc_t short_rc)
{
    long hi, lo;

    if (end - p < 2) {
        return short_rc;
    }
    switch (p[1]) {
    case '"':  *cp = '"';  break;
    case '\\': *cp = '\\'; break;
    case '/':  *cp = '/';  break;
    case 'b':  *cp = 0x08; break;
    case 'f':  *cp = 0x0C; break;
    case 'n':  *cp = 0x0A; break;
    case 'r':  *cp = 0x0D; break;
    case 't':  *cp = 0x09; break;
    case 'u':
        hi = hex4(p + 2, end - p - 2);
        if (hi < 0) {
            return hi == -2 ? short_rc : CHAT_JSON_E_ESCAPE;
        }
        if (hi >= 0xDC00 && hi <= 0xDFFF) {
            return CHAT_JSON_E_SURROGATE;
        }
        if (hi < 0xD800 || hi > 0xDBFF) {
            *cp = (uint32_t) hi;
            *used = 6;
            return CHAT_JSON_OK;
        }
        /* high surrogate: a \u low surrogate must follow */
        if (end - p < 7) {
            /* the end of a document is truncation, that of a string body
             * leaves the surrogate alone */
            return short_rc == CHAT_JSON_E_EOF ? short_rc
                                               : CHAT_JSON_E_SURROGATE;
        }
        if (p[6] != '\\') {
            return CHAT_JSON_E_SURROGATE;
        }
        if (end - p < 8) {
            return short_rc;
        }
        if (p[7] != 'u') {
            return CHAT_JSON_E_SURROGATE;
        }
        lo = hex4(p + 8, end - p - 8);
        if (lo < 0) {
            return lo == -2 ? short_rc : CHAT_JSON_E_ESCAPE;
        }
        if (lo < 0xDC00 || lo > 0xDFFF) {
            return CHAT_JSON_E_SURROGATE;
        }
        *cp = 0x10000 + (((uint32_t) hi - 0xD800) << 10)
              + ((uint32_t) lo - 0xDC00);
        *used = 12;
        return CHAT_JSON_OK;
    default:
        return CHAT_JSON_E_ESCAPE;
    }
    *used = 2;
    return CHAT_JSON_OK;
}

/* ---------------------------------------------------------------------- */
/* string scanner                                                         */
/* ---------------------------------------------------------------------- */

/* 1 for bytes that can be taken as they are: 0x20..0x7F except " and \ */
static const unsigned char plain[256] = {
    ['\x20'] = 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,      /* 20-2F */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,                 /* 30-3F */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,                 /* 40-4F */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1,                 /* 50-5F */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,                 /* 60-6F */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,                 /* 70-7F */
};

#define FNV_INIT  2166136261u
#define FNV_MUL   16777619u

typedef struct {
    size_t   cp;       /* decoded code points */
    size_t   outlen;   /* decoded bytes (written when there is an out) */
    uint32_t hash;     /* FNV-1a of the decoded bytes (when asked for) */
    int      esc;      /* saw a backslash */
} scan_t;

/* Append n decoded bytes: to out when there is one (-1: no room), to the
 * length, and to the hash when asked for. */
static int
emit(unsigned char *out, size_t cap, size_t *olen, uint32_t *h, cup src,
    size_t n)
{
    size_t  i;

    if (out) {
        if (cap - *olen < n) {
            return -1;
        }
        memcpy(out + *olen, src, n);
    }

    *olen += n;

    if (h) {
        for (i = 0; i < n; i++) {
            *h = (*h ^ src[i]) * FNV_MUL;
        }
    }

    return 0;
}

/*
 * Scan a string body from p.  in_doc: the body ends at an unescaped '"'
 * (which must occur before end, *stop points at it); otherwise the body is
 * all of [p, end) and a '"' is an error.  out (may be NULL) receives the
 * decoded bytes.  On error *stop points at the offending byte.
 */
static chat_json_rc_t
scan_string(cup p, cup end, int in_doc, int want_hash, unsigned char *out,
    size_t cap, scan_t *st, cup *stop)
{
    chat_json_rc_t rc;
    chat_json_rc_t short_rc = in_doc ? CHAT_JSON_E_EOF : CHAT_JSON_E_ESCAPE;
    size_t         cp = 0, olen = 0, n;
    uint32_t       h = FNV_INIT, v;
    unsigned char  tmp[4];
    int            esc = 0;
    cup            run;

    for ( ;; ) {
        /* fast path: a run of plain ASCII */
        run = p;
        while (p < end && plain[*p]) {
            p++;
        }
        n = (size_t) (p - run);
        if (n) {
            cp += n;
            if (emit(out, cap, &olen, want_hash ? &h : NULL, run, n) != 0) {
                *stop = run;
                return CHAT_JSON_E_SPACE;
            }
        }

        if (p == end) {
            if (in_doc) {
                *stop = p;
                return CHAT_JSON_E_EOF;
            }
            break;
        }

        if (*p == '"') {
            if (!in_doc) {
                *stop = p;
                return CHAT_JSON_E_SYNTAX;
            }
            break;
        }

        if (*p == '\\') {
            rc = decode_escape(p, end, &n, &v, short_rc);
            if (rc != CHAT_JSON_OK) {
                *stop = p;
                return rc;
            }
            esc = 1;
            p += n;
            n = utf8_put(tmp, v);

        } else if (*p < 0x20) {
            *stop = p;
            return CHAT_JSON_E_CONTROL;

        } else {
            n = utf8_seq(p, end, &v);
            if (n == 0) {
                *stop = p;
                return CHAT_JSON_E_UTF8;
            }
            memcpy(tmp, p, n);
            p += n;
        }

        cp++;
        if (emit(out, cap, &olen, want_hash ? &h : NULL, tmp, n) != 0) {
            *stop = p;
            return CHAT_JSON_E_SPACE;
        }
    }

    st->cp = cp;
    st->outlen = olen;
    st->hash = h;
    st->esc = esc;
    *stop = p;
    return CHAT_JSON_OK;
}

/* ---------------------------------------------------------------------- */
/* decoded byte streams (over already validated string bodies)            */
/* ---------------------------------------------------------------------- */

typedef struct {
    cup            p, end;
    unsigned char  b[4];
    unsigned       bi, bn;
    int            esc;     /* 0: plain bytes, no escape processing */
} dstream_t;

static void
ds_init(dstream_t *s, const char *raw, size_t len, int esc)
{
    s->p = (cup) raw;
    s->end = s->p + len;
    s->bi = s->bn = 0;
    s->esc = esc;
}

/* next decoded byte, -1 at the end, -2 on malformed input */
static int
ds_get(dstream_t *s)
{
    size_t   used;
    uint32_t cp;

    if (s->bi < s->bn) {
        return s->b[s->bi++];
    }
    if (s->p >= s->end) {
        return -1;
    }
    if (!s->esc || *s->p != '\\') {
        return *s->p++;
    }
    if (decode_escape(s->p, s->end, &used, &cp, CHAT_JSON_E_ESCAPE)
        != CHAT_JSON_OK)
    {
        return -2;
    }
    s->p += used;
    s->bn = (unsigned) utf8_put(s->b, cp);
    s->bi = 1;
    return s->b[0];
}

/* do two string bodies decode to the same bytes? (esc: may hold escapes) */
static int
raw_eq_raw(const char *a, size_t alen, int aesc,
    const char *b, size_t blen, int besc)
{
    dstream_t sa, sb;
    int       ca, cb;

    if (!aesc && !besc) {
        return alen == blen && memcmp(a, b, alen) == 0;
    }
    ds_init(&sa, a, alen, aesc);
    ds_init(&sb, b, blen, besc);
    for ( ;; ) {
        ca = ds_get(&sa);
        cb = ds_get(&sb);
        if (ca != cb || ca == -2) {
            return 0;
        }
        if (ca == -1) {
            return 1;
        }
    }
}

/* ---------------------------------------------------------------------- */
/* parser                                                                 */
/* ---------------------------------------------------------------------- */

static cup
skip_ws(cup p, cup end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) {
        p++;
    }
    return p;
}

static int
is_digit(unsigned c)
{
    return c - '0' < 10u;
}

/* number at p; returns the end or NULL (with *rc set) */
static cup
scan_number(cup p, cup end, uint8_t *flags, chat_json_rc_t *rc)
{
    uint8_t f = CHAT_JSON_F_INT;

    if (*p == '-') {
        f |= CHAT_JSON_F_NEG;
        p++;
    }
    if (p == end) {
        goto eof;
    }
    if (*p == '0') {
        p++;
    } else if (is_digit(*p)) {
        while (p < end && is_digit(*p)) {
            p++;
        }
    } else {
        goto bad;
    }

    if (p < end && *p == '.') {
        f &= (uint8_t) ~CHAT_JSON_F_INT;
        p++;
        if (p == end) {
            goto eof;
        }
        if (!is_digit(*p)) {
            goto bad;
        }
        while (p < end && is_digit(*p)) {
            p++;
        }
    }

    if (p < end && (*p == 'e' || *p == 'E')) {
        f &= (uint8_t) ~CHAT_JSON_F_INT;
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }
        if (p == end) {
            goto eof;
        }
        if (!is_digit(*p)) {
            goto bad;
        }
        while (p < end && is_digit(*p)) {
            p++;
        }
    }

    *flags = f;
    return p;

eof:
    *rc = CHAT_JSON_E_EOF;
    return NULL;
bad:
    *rc = CHAT_JSON_E_SYNTAX;
    return NULL;
}

chat_json_rc_t
chat_json_parse(chat_json_doc_t *doc, const char *buf, size_t len,
    chat_json_tok_t *tok, unsigned cap, unsigned max_depth)
{
    cup              s, p, end, q;
    uint16_t         stack[CHAT_JSON_DEPTH_CAP];
    unsigned         depth = 0, n = 0, k, top;
    chat_json_tok_t *t;
    chat_json_rc_t   rc = CHAT_JSON_OK;
    scan_t           st;
    const char      *lit;
    size_t           litlen;

    if (buf == NULL) {
        buf = "";
        len = 0;
    }
    s = (cup) buf;
    p = s;
    end = s + len;

    doc->buf = buf;
    doc->len = len;
    doc->tok = tok;
    doc->ntok = 0;
    doc->err_off = 0;

    if (len > UINT32_MAX) {
        return CHAT_JSON_E_TOOBIG;
    }
    if (cap > CHAT_JSON_MAX_TOKENS) {
        cap = CHAT_JSON_MAX_TOKENS;
    }
    if (max_depth > CHAT_JSON_DEPTH_CAP) {
        max_depth = CHAT_JSON_DEPTH_CAP;
    }

value:
    p = skip_ws(p, end);
    if (p == end) {
        rc = CHAT_JSON_E_EOF;
        goto fail;
    }
    if (n == cap) {
        rc = CHAT_JSON_E_TOKENS;
        goto fail;
    }
    t = &tok[n];
    t->start = (uint32_t) (p - s);
    t->aux = 0;
    t->flags = 0;
    if (depth && tok[stack[depth - 1]].type == CHAT_JSON_ARRAY) {
        tok[stack[depth - 1]].aux++;
    }

    switch (*p) {

    case '{':
    case '[':
        if (depth >= max_depth) {
            rc = CHAT_JSON_E_DEPTH;
            goto fail;
        }
        t->type = (*p == '{') ? CHAT_JSON_OBJECT : CHAT_JSON_ARRAY;
        stack[depth++] = (uint16_t) n;
        n++;
        p = skip_ws(p + 1, end);
        if (p == end) {
            rc = CHAT_JSON_E_EOF;
            goto fail;
        }
        if (*p == (t->type == CHAT_JSON_OBJECT ? '}' : ']')) {
            p++;
            goto close;
        }
        if (t->type == CHAT_JSON_ARRAY) {
            goto value;
        }
        goto key;

    case '"':
        t->type = CHAT_JSON_STRING;
        t->start++;
        rc = scan_string(p + 1, end, 1, 0, NULL, 0, &st, &q);
        if (rc != CHAT_JSON_OK) {
            p = q;
            goto fail;
        }
        t->len = (uint32_t) (q - p - 1);
        t->aux = (st.cp > UINT32_MAX) ? UINT32_MAX : (uint32_t) st.cp;
        t->flags = st.esc ? CHAT_JSON_F_ESC : 0;
        p = q + 1;
        break;

    case 't':
        lit = "true";
        litlen = 4;
        t->type = CHAT_JSON_TRUE;
        goto literal;
    case 'f':
        lit = "false";
        litlen = 5;
        t->type = CHAT_JSON_FALSE;
        goto literal;
    case 'n':
        lit = "null";
        litlen = 4;
        t->type = CHAT_JSON_NULL;
        goto literal;

    default:
        if (*p != '-' && !is_digit(*p)) {
            rc = CHAT_JSON_E_SYNTAX;
            goto fail;
        }
        t->type = CHAT_JSON_NUMBER;
        q = scan_number(p, end, &t->flags, &rc);
        if (q == NULL) {
            goto fail;
        }
        t->len = (uint32_t) (q - p);
        p = q;
        break;
    }

    /* a scalar */
    n++;
    t->next = (uint16_t) n;
    goto after;

literal:
    if ((size_t) (end - p) < litlen) {
        rc = memcmp(p, lit, (size_t) (end - p)) == 0 ? CHAT_JSON_E_EOF
                                                     : CHAT_JSON_E_SYNTAX;
        goto fail;
    }
    if (memcmp(p, lit, litlen) != 0) {
        rc = CHAT_JSON_E_SYNTAX;
        goto fail;
    }
    t->len = (uint32_t) litlen;
    p += litlen;
    n++;
    t->next = (uint16_t) n;
    goto after;

key:
    /* p is at a non-blank byte inside an object, a key must start here */
    if (*p != '"') {
        rc = CHAT_JSON_E_SYNTAX;
        goto fail;
    }
    if (n == cap) {
        rc = CHAT_JSON_E_TOKENS;
        goto fail;
    }
    t = &tok[n];
    t->type = CHAT_JSON_STRING;
    t->start = (uint32_t) (p + 1 - s);
    rc = scan_string(p + 1, end, 1, 1, NULL, 0, &st, &q);
    if (rc != CHAT_JSON_OK) {
        p = q;
        goto fail;
    }
    t->len = (uint32_t) (q - p - 1);
    t->aux = st.hash;
    t->flags = CHAT_JSON_F_KEY | (st.esc ? CHAT_JSON_F_ESC : 0);
    t->next = (uint16_t) (n + 1);

    top = stack[depth - 1];
    for (k = top + 1; k < n; k = tok[k + 1].next) {
        if (tok[k].aux == t->aux
            && raw_eq_raw(buf + tok[k].start, tok[k].len,
                          tok[k].flags & CHAT_JSON_F_ESC,
                          buf + t->start, t->len, t->flags & CHAT_JSON_F_ESC))
        {
            rc = CHAT_JSON_E_DUPKEY;
            goto fail;
        }
    }
    tok[top].aux++;
    n++;

    p = skip_ws(q + 1, end);
    if (p == end) {
        rc = CHAT_JSON_E_EOF;
        goto fail;
    }
    if (*p != ':') {
        rc = CHAT_JSON_E_SYNTAX;
        goto fail;
    }
    p++;
    goto value;

close:
    /* p is just past the closing bracket of tok[stack[depth - 1]] */
    t = &tok[stack[--depth]];
    t->len = (uint32_t) (p - s) - t->start;
    t->next = (uint16_t) n;

after:
    p = skip_ws(p, end);
    if (depth == 0) {
        if (p != end) {
            rc = CHAT_JSON_E_TRAILING;
            goto fail;
        }
        doc->ntok = n;
        return CHAT_JSON_OK;
    }
    if (p == end) {
        rc = CHAT_JSON_E_EOF;
        goto fail;
    }
    top = stack[depth - 1];
    if (*p == ',') {
        p = skip_ws(p + 1, end);
        if (p == end) {
            rc = CHAT_JSON_E_EOF;
            goto fail;
        }
        if (tok[top].type == CHAT_JSON_OBJECT) {
            goto key;
        }
        goto value;
    }
    if (*p == (tok[top].type == CHAT_JSON_OBJECT ? '}' : ']')) {
        p++;
        goto close;
    }
    rc = CHAT_JSON_E_SYNTAX;

fail:
    doc->err_off = (size_t) (p - s);
    doc->ntok = 0;
    return rc;
}

const char *
chat_json_strerror(chat_json_rc_t rc)
{
    switch (rc) {
    case CHAT_JSON_OK:          return "ok";
    case CHAT_JSON_E_SYNTAX:    return "invalid JSON";
    case CHAT_JSON_E_EOF:       return "truncated JSON";
    case CHAT_JSON_E_TRAILING:  return "data after the JSON value";
    case CHAT_JSON_E_DEPTH:     return "JSON nested too deeply";
    case CHAT_JSON_E_TOKENS:    return "too many JSON values";
    case CHAT_JSON_E_ESCAPE:    return "invalid escape in JSON string";
    case CHAT_JSON_E_SURROGATE: return "unpaired surrogate in JSON string";
    case CHAT_JSON_E_CONTROL:   return "control character in JSON string";
    case CHAT_JSON_E_UTF8:      return "invalid UTF-8";
    case CHAT_JSON_E_DUPKEY:    return "duplicate key";
    case CHAT_JSON_E_TOOBIG:    return "JSON too large";
    case CHAT_JSON_E_TYPE:      return "wrong JSON type";
    case CHAT_JSON_E_NOT_INT:   return "number is not an integer";
    case CHAT_JSON_E_RANGE:     return "integer out of range";
    case CHAT_JSON_E_SPACE:     return "buffer too small";
    }
    return "unknown error";
}

/* ---------------------------------------------------------------------- */
/* accessors                                                              */
/* ---------------------------------------------------------------------- */

int
chat_json_str_eq(const chat_json_doc_t *d, unsigned i, const char *lit,
    size_t n)
{
    const chat_json_tok_t *t;

    if (i >= d->ntok || d->tok[i].type != CHAT_JSON_STRING) {
        return 0;
    }
    if (lit == NULL) {
        lit = "";
        n = 0;
    }
    t = &d->tok[i];
    return raw_eq_raw(d->buf + t->start, t->len, t->flags & CHAT_JSON_F_ESC,
                      lit, n, 0);
}

int
chat_json_obj_get(const chat_json_doc_t *d, unsigned obj, const char *key,
    size_t klen)
{
    unsigned k, m;

    if (obj >= d->ntok || d->tok[obj].type != CHAT_JSON_OBJECT) {
        return -1;
    }
    for (k = obj + 1, m = d->tok[obj].aux; m; m--, k = d->tok[k + 1].next) {
        if (chat_json_str_eq(d, k, key, klen)) {
            return (int) (k + 1);
        }
    }
    return -1;
}

chat_json_rc_t
chat_json_parse_int64(const char *p, size_t n, int64_t *out)
{
    cup            s, e, q;
    uint8_t        flags;
    uint64_t       acc = 0, lim;
    unsigned       dgt;
    chat_json_rc_t rc = CHAT_JSON_OK;

    if (p == NULL || n == 0) {
        return CHAT_JSON_E_SYNTAX;
    }
    s = (cup) p;
    e = s + n;
    q = scan_number(s, e, &flags, &rc);
    if (q == NULL) {
        return CHAT_JSON_E_SYNTAX;
    }
    if (q != e) {
        return CHAT_JSON_E_SYNTAX;
    }
    if (!(flags & CHAT_JSON_F_INT)) {
        return CHAT_JSON_E_NOT_INT;
    }
    lim = (flags & CHAT_JSON_F_NEG) ? (uint64_t) INT64_MAX + 1
                                    : (uint64_t) INT64_MAX;
    if (flags & CHAT_JSON_F_NEG) {
        s++;
    }
    for ( ; s < e; s++) {
        dgt = (unsigned) (*s - '0');
        if (acc > (lim - dgt) / 10) {
            return CHAT_JSON_E_RANGE;
        }
        acc = acc * 10 + dgt;
    }
    if (flags & CHAT_JSON_F_NEG) {
        *out = (acc == (uint64_t) INT64_MAX + 1) ? INT64_MIN
                                                 : -(int64_t) acc;
    } else {
        *out = (int64_t) acc;
    }
    return CHAT_JSON_OK;
}

chat_json_rc_t
chat_json_get_int64(const chat_json_doc_t *d, unsigned i, int64_t *out)
{
    if (i >= d->ntok || d->tok[i].type != CHAT_JSON_NUMBER) {
        return CHAT_JSON_E_TYPE;
    }
    return chat_json_parse_int64(chat_json_raw(d, i), d->tok[i].len, out);
}

chat_json_rc_t
chat_json_get_str(const chat_json_doc_t *d, unsigned i, char *out, size_t cap,
    size_t *outlen)
{
    chat_json_rc_t rc;
    size_t         len;

    if (i >= d->ntok || d->tok[i].type != CHAT_JSON_STRING) {
        return CHAT_JSON_E_TYPE;
    }
    rc = chat_json_unescape(chat_json_raw(d, i), d->tok[i].len, out, cap,
                            &len);
    if (rc != CHAT_JSON_OK) {
        return rc;
    }
    if (len < cap) {
        out[len] = '\0';
    }
    *outlen = len;
    return CHAT_JSON_OK;
}

chat_json_rc_t
chat_json_unescape(const char *raw, size_t rawlen, char *out, size_t cap,
    size_t *outlen)
{
    scan_t         st;
    cup            stop;
    chat_json_rc_t rc;

    if (raw == NULL) {
        raw = "";
        rawlen = 0;
    }
    rc = scan_string((cup) raw, (cup) raw + rawlen, 0, 0, (unsigned char *) out,
                     out ? cap : 0, &st, &stop);
    if (rc == CHAT_JSON_OK) {
        *outlen = st.outlen;
    }
    return rc;
}

chat_json_rc_t
chat_json_count_cp(const char *raw, size_t rawlen, size_t *cp)
{
    scan_t         st;
    cup            stop;
    chat_json_rc_t rc;

    if (raw == NULL) {
        raw = "";
        rawlen = 0;
    }
    rc = scan_string((cup) raw, (cup) raw + rawlen, 0, 0, NULL, 0, &st, &stop);
    if (rc == CHAT_JSON_OK) {
        *cp = st.cp;
    }
    return rc;
}

/* ---------------------------------------------------------------------- */
/* writer                                                                 */
/* ---------------------------------------------------------------------- */

static const char hexdig[] = "0123456789abcdef";

size_t
chat_json_escape(char *out, size_t outlen, const char *in, size_t inlen)
{
    cup            p, end, run;
    size_t         need = 0, n;
    int            full = 0;    /* something did not fit: write no more */
    uint32_t       cp;
    unsigned char  e[6];
    const unsigned char *src;

    if (out == NULL) {
        outlen = 0;
    }
    if (in == NULL) {
        return 0;
    }
    p = (cup) in;
    end = p + inlen;

    while (p < end) {
        run = p;
        while (p < end && plain[*p]) {
            p++;
        }
        n = (size_t) (p - run);
        if (n) {
            if (!full && outlen - need >= n) {
                memcpy(out + need, run, n);
            } else {
                full = 1;
            }
            need += n;
        }
        if (p == end) {
            break;
        }

        src = e;
        if (*p == '"' || *p == '\\') {
            e[0] = '\\';
            e[1] = *p;
            n = 2;
            p++;
        } else if (*p < 0x20) {
            e[0] = '\\';
            n = 2;
            switch (*p) {
            case '\b': e[1] = 'b'; break;
            case '\f': e[1] = 'f'; break;
            case '\n': e[1] = 'n'; break;
            case '\r': e[1] = 'r'; break;
            case '\t': e[1] = 't'; break;
            default:
                e[1] = 'u';
                e[2] = '0';
                e[3] = '0';
                e[4] = (unsigned char) hexdig[*p >> 4];
                e[5] = (unsigned char) hexdig[*p & 0xF];
                n = 6;
            }
            p++;
        } else {
            n = utf8_seq(p, end, &cp);
            if (n == 0) {
                e[0] = 0xEF;            /* U+FFFD */
                e[1] = 0xBF;
                e[2] = 0xBD;
                n = 3;
                p++;
            } else if (cp == 0x2028 || cp == 0x2029) {
                memcpy(e, cp == 0x2028 ? "\\u2028" : "\\u2029", 6);
                n = 6;
                p += 3;
            } else {
                src = p;
                p += n;
            }
        }

        if (!full && outlen - need >= n) {
            memcpy(out + need, src, n);
        } else {
            full = 1;
        }
        need += n;
    }

    return need;
}

size_t
chat_json_fmt_int64(char out[20], int64_t v)
{
    char     tmp[20];
    size_t   n = 0, i;
    uint64_t u;
    int      neg = v < 0;

    u = neg ? (uint64_t) 0 - (uint64_t) v : (uint64_t) v;
    do {
        tmp[n++] = (char) ('0' + u % 10);
        u /= 10;
    } while (u);

    i = 0;
    if (neg) {
        out[i++] = '-';
    }
    while (n) {
        out[i++] = tmp[--n];
    }
    return i;
}

void
chat_json_w_init(chat_json_w_t *w, char *buf, size_t cap)
{
    w->p = buf;
    w->len = 0;
    w->cap = buf ? cap : 0;
    w->overflow = 0;
}

void
chat_json_w_raw(chat_json_w_t *w, const char *s, size_t n)
{
    if (w->overflow || w->cap - w->len < n) {
        w->overflow = 1;
        return;
    }
    if (n) {
        memcpy(w->p + w->len, s, n);
    }
    w->len += n;
}

void
chat_json_w_cstr(chat_json_w_t *w, const char *s)
{
    chat_json_w_raw(w, s, strlen(s));
}

void
chat_json_w_str(chat_json_w_t *w, const char *s, size_t n)
{
    size_t need, room;

    chat_json_w_raw(w, "\"", 1);
    if (w->overflow) {
        return;
    }
    room = w->cap - w->len;
    need = chat_json_escape(w->p + w->len, room, s, n);
    if (need > room) {
        w->overflow = 1;
        return;
    }
    w->len += need;
    chat_json_w_raw(w, "\"", 1);
}

void
chat_json_w_int(chat_json_w_t *w, int64_t v)
{
    char   b[20];
    size_t n = chat_json_fmt_int64(b, v);

    chat_json_w_raw(w, b, n);
}
