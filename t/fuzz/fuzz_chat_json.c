/*
 * libFuzzer target for chat_json: the parser, the string helpers and the
 * escaper.  Aborts when an invariant does not hold.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat_json.h"

#define NTOK 512

#define CHECK(c)  do { if (!(c)) abort(); } while (0)

/* independent UTF-8 check (Unicode table 3-7), for the escaper's contract */
static int
utf8_ok(const unsigned char *p, size_t n)
{
    size_t i = 0, k, j;
    unsigned c, lo, hi;

    while (i < n) {
        c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        lo = 0x80;
        hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            lo = c == 0xE0 ? 0xA0 : 0x80;
            hi = c == 0xED ? 0x9F : 0xBF;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            lo = c == 0xF0 ? 0x90 : 0x80;
            hi = c == 0xF4 ? 0x8F : 0xBF;
        } else {
            return 0;
        }
        if (n - i <= k || p[i + 1] < lo || p[i + 1] > hi) {
            return 0;
        }
        for (j = 2; j <= k; j++) {
            if ((p[i + j] & 0xC0) != 0x80) {
                return 0;
            }
        }
        i += k + 1;
    }
    return 1;
}

static void
check_doc(const chat_json_doc_t *d, const uint8_t *data, size_t size)
{
    static char     buf[65536 * 2];
    static char     esc[65536 * 8];
    chat_json_tok_t stok[1];
    chat_json_doc_t sd;
    unsigned        i, c, m;
    size_t          n, cp, en;
    int64_t         v;
    chat_json_rc_t  rc;

    CHECK(d->ntok >= 1 && d->ntok <= NTOK);
    CHECK(d->tok[0].next == d->ntok);

    for (i = 0; i < d->ntok; i++) {
        const chat_json_tok_t *t = &d->tok[i];

        CHECK(t->next > i && t->next <= d->ntok);
        CHECK((size_t) t->start + t->len <= size);

        switch (t->type) {
        case CHAT_JSON_OBJECT:
        case CHAT_JSON_ARRAY:
            CHECK(data[t->start] == (t->type == CHAT_JSON_OBJECT ? '{' : '['));
            CHECK(data[t->start + t->len - 1]
                  == (t->type == CHAT_JSON_OBJECT ? '}' : ']'));
            /* walking the children ends exactly at next */
            for (c = i + 1, m = t->aux; m; m--) {
                CHECK(c < t->next);
                if (t->type == CHAT_JSON_OBJECT) {
                    CHECK(d->tok[c].type == CHAT_JSON_STRING
                          && (d->tok[c].flags & CHAT_JSON_F_KEY));
                    c = d->tok[c + 1].next;
                } else {
                    c = d->tok[c].next;
                }
            }
            CHECK(c == t->next);
            if (t->type == CHAT_JSON_OBJECT && t->aux) {
                /* the first key is found (keys are unique) */
                n = 0;
                if (chat_json_get_str(d, i + 1, buf, sizeof(buf), &n)
                    == CHAT_JSON_OK)
                {
                    CHECK(chat_json_obj_get(d, i, buf, n) == (int) i + 2);
                }
            }
            break;

        case CHAT_JSON_STRING:
            CHECK(t->start >= 1 && data[t->start - 1] == '"');
            CHECK(t->start + t->len < size && data[t->start + t->len] == '"');
            CHECK(t->len <= sizeof(buf));
            rc = chat_json_unescape(chat_json_raw(d, i), t->len, buf, t->len,
                                    &n);
            CHECK(rc == CHAT_JSON_OK);
            CHECK(n <= t->len);
            CHECK(chat_json_str_eq(d, i, buf, n));
            CHECK(chat_json_count_cp(chat_json_raw(d, i), t->len, &cp)
                  == CHAT_JSON_OK);
            CHECK(cp <= n);
            if (!(t->flags & CHAT_JSON_F_KEY)) {
                CHECK(cp == t->aux);
            }
            CHECK(!(t->flags & CHAT_JSON_F_ESC) == (n == t->len
                  && memcmp(buf, chat_json_raw(d, i), n) == 0
                  && memchr(buf, '\\', n) == NULL));
            CHECK(utf8_ok((const unsigned char *) buf, n));
            /* re-escaping the decoded value gives a string that decodes
             * to the same value */
            en = chat_json_escape(esc + 1, sizeof(esc) - 2, buf, n);
            CHECK(en <= sizeof(esc) - 2);
            esc[0] = '"';
            esc[en + 1] = '"';
            CHECK(chat_json_parse(&sd, esc, en + 2, stok, 1, 1)
                  == CHAT_JSON_OK);
            CHECK(stok[0].aux == cp);
            CHECK(chat_json_str_eq(&sd, 0, buf, n));
            break;

        case CHAT_JSON_NUMBER:
            rc = chat_json_get_int64(d, i, &v);
            CHECK(rc == CHAT_JSON_OK || rc == CHAT_JSON_E_NOT_INT
                  || rc == CHAT_JSON_E_RANGE);
            CHECK((rc == CHAT_JSON_E_NOT_INT) == !(t->flags & CHAT_JSON_F_INT));
            if (rc == CHAT_JSON_OK) {
                char   num[20];
                size_t nl = chat_json_fmt_int64(num, v);

                CHECK((nl == t->len && memcmp(num, chat_json_raw(d, i), nl) == 0)
                      || (v == 0 && t->len == 2));     /* "-0" */
            }
            break;

        case CHAT_JSON_TRUE:
        case CHAT_JSON_FALSE:
        case CHAT_JSON_NULL:
            CHECK(t->len == (t->type == CHAT_JSON_FALSE ? 5u : 4u));
            break;

        default:
            abort();
        }
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static chat_json_tok_t tok[NTOK];
    static char            out[65536 * 8];
    static char            dec[65536 * 8];
    chat_json_doc_t        doc;
    chat_json_tok_t        one[1];
    chat_json_rc_t         rc;
    size_t                 n, dn, small;

    if (size > 65536) {
        return 0;
    }

    rc = chat_json_parse(&doc, (const char *) data, size, tok, NTOK, 16);
    if (rc == CHAT_JSON_OK) {
        check_doc(&doc, data, size);
    } else {
        CHECK(doc.ntok == 0 && doc.err_off <= size);
        CHECK(chat_json_strerror(rc) != NULL);
    }

    /* the input as a string body: helpers agree with each other */
    rc = chat_json_unescape((const char *) data, size, dec, sizeof(dec), &dn);
    if (rc == CHAT_JSON_OK) {
        CHECK(dn <= size);
        CHECK(chat_json_count_cp((const char *) data, size, &n)
              == CHAT_JSON_OK);
        CHECK(utf8_ok((const unsigned char *) dec, dn));
    } else {
        CHECK(chat_json_count_cp((const char *) data, size, &n) == rc);
    }

    /* the escaper always produces a valid JSON string body */
    n = chat_json_escape(out + 1, sizeof(out) - 2, (const char *) data, size);
    CHECK(n <= size * 6 && n <= sizeof(out) - 2);
    CHECK(chat_json_escape_len((const char *) data, size) == n);
    out[0] = '"';
    out[n + 1] = '"';
    CHECK(chat_json_parse(&doc, out, n + 2, one, 1, 1) == CHAT_JSON_OK);
    CHECK(chat_json_unescape(out + 1, n, dec, sizeof(dec), &dn)
          == CHAT_JSON_OK);
    if (utf8_ok(data, size)) {
        CHECK(dn == size && memcmp(dec, data, size) == 0);
    }

    /* a short output buffer holds a prefix of the full output */
    small = size ? data[0] % 16 : 0;
    memset(dec, 0, small + 1);
    CHECK(chat_json_escape(dec, small, (const char *) data, size) == n);
    CHECK(dec[small] == 0);
    for (dn = 0; dn < small && dn < n; dn++) {
        if (dec[dn] != out[1 + dn]) {
            /* only allowed once the rest did not fit: all zero from here */
            for ( ; dn < small; dn++) {
                CHECK(dec[dn] == 0);
            }
            break;
        }
    }
    return 0;
}
