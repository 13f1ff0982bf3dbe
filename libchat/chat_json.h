/*
 * chat_json: a small, strict JSON (RFC 8259) reader and writer helpers.
 *
 * No allocation.  The reader validates a whole document in one pass and
 * records it in a token array supplied by the caller; strings are returned
 * as raw slices of the input (still escaped, without the quotes), which are
 * always a valid JSON string body and can be copied verbatim into output.
 *
 * Strictness (everything else is an error):
 *   - exactly one value, optionally surrounded by ' ', \t, \n, \r
 *     (no BOM, no comments, no trailing commas, no NaN/Infinity);
 *   - strings: valid UTF-8 only (no overlongs, no encoded surrogates,
 *     nothing above U+10FFFF), no raw bytes below 0x20, only the escapes
 *     \" \\ \/ \b \f \n \r \t \uXXXX; a \u escape of a surrogate must be a
 *     high surrogate immediately followed by a \u escape of a low one;
 *   - numbers follow the RFC grammar exactly (no leading zeros, no '+');
 *   - an object may not contain the same key twice (compared decoded);
 *   - nesting deeper than the caller's max_depth is rejected.
 *
 * Token layout: depth-first, in document order.  A container is followed by
 * its children; an object's children are key, value, key, value, ...
 * tok[i].next is the index just past the subtree of i, so the next sibling
 * of child c is tok[c].next (for an object member: tok[key + 1].next).
 */
#ifndef CHAT_JSON_H
#define CHAT_JSON_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    CHAT_JSON_OK = 0,
    CHAT_JSON_E_SYNTAX,     /* unexpected character */
    CHAT_JSON_E_EOF,        /* input ended inside a value */
    CHAT_JSON_E_TRAILING,   /* more than blanks after the value */
    CHAT_JSON_E_DEPTH,      /* nested deeper than max_depth */
    CHAT_JSON_E_TOKENS,     /* more values than the token array holds */
    CHAT_JSON_E_ESCAPE,     /* invalid backslash escape or \u sequence */
    CHAT_JSON_E_SURROGATE,  /* lone or misordered UTF-16 surrogate escape */
    CHAT_JSON_E_CONTROL,    /* raw control character (< 0x20) in a string */
    CHAT_JSON_E_UTF8,       /* invalid UTF-8 */
    CHAT_JSON_E_DUPKEY,     /* the same key twice in one object */
    CHAT_JSON_E_TOOBIG,     /* input of 4 GiB or more */
    CHAT_JSON_E_TYPE,       /* accessor: token has another type */
    CHAT_JSON_E_NOT_INT,    /* accessor: number has a fraction or exponent */
    CHAT_JSON_E_RANGE,      /* accessor: integer does not fit int64_t */
    CHAT_JSON_E_SPACE       /* accessor: output buffer too small */
} chat_json_rc_t;

typedef enum {
    CHAT_JSON_NONE = 0,
    CHAT_JSON_OBJECT,
    CHAT_JSON_ARRAY,
    CHAT_JSON_STRING,
    CHAT_JSON_NUMBER,
    CHAT_JSON_TRUE,
    CHAT_JSON_FALSE,
    CHAT_JSON_NULL
} chat_json_type_t;

/* token flags */
#define CHAT_JSON_F_ESC  0x01   /* string: contains at least one escape */
#define CHAT_JSON_F_KEY  0x02   /* string: is an object key */
#define CHAT_JSON_F_INT  0x04   /* number: no fraction and no exponent */
#define CHAT_JSON_F_NEG  0x08   /* number: starts with '-' */

typedef struct {
    uint32_t start;  /* byte offset; strings: first byte after the quote */
    uint32_t len;    /* bytes; strings: raw body without the quotes */
    uint32_t aux;    /* object/array: number of members/elements;
                        string value: decoded length in code points;
                        key: hash of the decoded key (internal) */
    uint16_t next;   /* index of the first token after this subtree */
    uint8_t  type;   /* chat_json_type_t */
    uint8_t  flags;  /* CHAT_JSON_F_* */
} chat_json_tok_t;

#define CHAT_JSON_MAX_TOKENS  65535u   /* larger arrays are used up to this */
#define CHAT_JSON_DEPTH_CAP   64u      /* max_depth is clamped to this */

typedef struct {
    const char      *buf;
    size_t           len;
    chat_json_tok_t *tok;
    unsigned         ntok;     /* tokens used; the root is tok[0] */
    size_t           err_off;  /* on error: offset where it was detected */
} chat_json_doc_t;

/*
 * Validate buf[0..len) and fill tok[0..cap).  max_depth counts containers:
 * 1 allows a flat object or array, "[[1]]" needs 2.  Scalars as the root
 * are accepted (RFC 8259); callers that want an object check tok[0].type.
 */
chat_json_rc_t chat_json_parse(chat_json_doc_t *doc, const char *buf,
    size_t len, chat_json_tok_t *tok, unsigned cap, unsigned max_depth);

const char *chat_json_strerror(chat_json_rc_t rc);

/* ---- walking ---------------------------------------------------------- */

static inline const char *
chat_json_raw(const chat_json_doc_t *d, unsigned i)
{
    return d->buf + d->tok[i].start;
}

/* value index for key in object obj, or -1 (also when obj is no object) */
int chat_json_obj_get(const chat_json_doc_t *d, unsigned obj,
    const char *key, size_t klen);

/* 1 when string token i decodes to exactly lit[0..n), else 0 */
int chat_json_str_eq(const chat_json_doc_t *d, unsigned i,
    const char *lit, size_t n);

/* number token -> int64 (E_TYPE, E_NOT_INT, E_RANGE) */
chat_json_rc_t chat_json_get_int64(const chat_json_doc_t *d, unsigned i,
    int64_t *out);

/* string token -> decoded bytes (E_TYPE, E_SPACE); NUL-terminated when
 * there is room for it, *outlen excludes the NUL */
chat_json_rc_t chat_json_get_str(const chat_json_doc_t *d, unsigned i,
    char *out, size_t cap, size_t *outlen);

/* ---- standalone string and number helpers ---------------------------- */

/*
 * raw is a string body without quotes (as in a token slice).  Both validate
 * it completely (an unescaped '"' is E_SYNTAX).  The decoded form is never
 * longer than the raw form, so cap >= rawlen always suffices; with out NULL
 * nothing is written and *outlen is the decoded size.  No NUL is added.
 */
chat_json_rc_t chat_json_unescape(const char *raw, size_t rawlen,
    char *out, size_t cap, size_t *outlen);
chat_json_rc_t chat_json_count_cp(const char *raw, size_t rawlen, size_t *cp);

/* p[0..n) is exactly a JSON number; E_SYNTAX, E_NOT_INT, E_RANGE */
chat_json_rc_t chat_json_parse_int64(const char *p, size_t n, int64_t *out);

/* ---- writer ----------------------------------------------------------- */

/*
 * Escape in[0..inlen) into a JSON string body (no quotes): '"', '\\' and
 * all characters below 0x20 are escaped (\b \f \n \r \t or \u00XX), as are
 * U+2028 and U+2029 (safe for JavaScript); valid UTF-8 passes through; each
 * byte that is not part of a valid UTF-8 sequence becomes U+FFFD.
 * Returns the number of bytes the whole result needs (like snprintf); it
 * writes only whole characters and at most outlen bytes, so the output is
 * complete if and only if the return value <= outlen.  out may be NULL when
 * outlen is 0.  No NUL is written.
 */
size_t chat_json_escape(char *out, size_t outlen, const char *in, size_t inlen);

static inline size_t
chat_json_escape_len(const char *in, size_t inlen)
{
    return chat_json_escape(NULL, 0, in, inlen);
}

/* decimal form of v (at most 20 bytes), returns the length; no NUL */
size_t chat_json_fmt_int64(char out[20], int64_t v);

/*
 * Output buffer builder.  Appends never overrun; once something does not
 * fit, overflow is set and later appends are dropped.
 */
typedef struct {
    char   *p;
    size_t  len;
    size_t  cap;
    int     overflow;
} chat_json_w_t;

void chat_json_w_init(chat_json_w_t *w, char *buf, size_t cap);
void chat_json_w_raw(chat_json_w_t *w, const char *s, size_t n);
void chat_json_w_cstr(chat_json_w_t *w, const char *s);        /* raw */
void chat_json_w_str(chat_json_w_t *w, const char *s, size_t n); /* "esc" */
void chat_json_w_int(chat_json_w_t *w, int64_t v);

#endif /* CHAT_JSON_H */
