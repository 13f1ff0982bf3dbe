/*
 * libFuzzer target for the chat_ws codec.
 *
 * Input layout:  byte 0  max_msg selector (low 3 bits)
 *                byte 1  seed for the chunk-split generator
 *                rest    client byte stream
 *
 * Pass 1 feeds the whole stream at once from a buffer of exactly its size
 * (ASan catches any read past len) and records the event sequence.
 * Pass 2 simulates the nginx glue: bytes arrive in pseudo-random chunks, the
 * pending bytes live in an exact-size heap buffer, consumed bytes are
 * dropped (compaction).  The event sequence must be identical to pass 1
 * (split-independence), and every call must satisfy the API contract.
 * The writer and UTF-8 helpers are exercised on the same bytes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat_ws.h"

#define CHECK(c)                                                          \
    do {                                                                  \
        if (!(c)) {                                                       \
            fprintf(stderr, "invariant failed: %s (%s:%d)\n", #c,         \
                    __FILE__, __LINE__);                                  \
            abort();                                                      \
        }                                                                 \
    } while (0)

static const uint64_t max_table[8] = {
    0, 1, 5, 125, 126, 1000, 65536, UINT64_MAX
};

typedef struct {
    int      kind;
    unsigned code;
    int      fin;
    size_t   len;
    uint64_t hash;
} rec_t;

static uint64_t fnv(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    size_t   i;

    for (i = 0; i < n; i++) {
        h = (h ^ p[i]) * 1099511628211ULL;
    }
    return h;
}

static int close_code_sendable(unsigned c)
{
    return (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014)
           || (c >= 3000 && c <= 4999);
}

/* harness-side model of the message state, used to cross-check */
typedef struct {
    int      open;
    int      text;
    uint64_t total;
    uint32_t u8;
} model_t;

/*
 * Check one chat_ws_read_frame() call.  buf/len are what was passed,
 * before/rbefore are copies taken before the call.
 */
static void check_call(ssize_t rc, const chat_ws_event_t *ev,
                       const chat_ws_reader_t *r,
                       const chat_ws_reader_t *rbefore,
                       const unsigned char *buf, const unsigned char *before,
                       size_t len, uint64_t max, model_t *m)
{
    CHECK(rc >= -1);
    CHECK(rc <= (ssize_t) len);

    if (rc == 0) {
        CHECK(ev->kind == CHAT_WS_EV_NONE);
        CHECK(ev->need > len);
        /* a frame we'd have to buffer is bounded by the limits */
        if (max < UINT64_MAX - 200) {
            CHECK(ev->need <= CHAT_WS_MAX_CLIENT_HDR
                              + (max > 125 ? max : 125));
        }
        CHECK(memcmp(buf, before, len) == 0);          /* untouched */
        CHECK(memcmp(r, rbefore, sizeof(*r)) == 0);    /* state untouched */
        return;
    }

    if (rc < 0) {
        CHECK(ev->kind == CHAT_WS_EV_ERROR);
        CHECK(ev->code == 1002 || ev->code == 1007 || ev->code == 1009);
        return;
    }

    /* complete frame */
    CHECK(rc >= 6);                                    /* 2 + mask */
    CHECK(ev->payload != NULL);
    CHECK(ev->payload >= buf + 2);
    CHECK(ev->payload + ev->len <= buf + rc);
    /* header bytes are never modified */
    CHECK(memcmp(buf, before, (size_t) (ev->payload - buf)
                               - (ev->kind == CHAT_WS_EV_CLOSE
                                  && ev->code != 1005 ? 2 : 0)) == 0);
    /* bytes after the frame are never touched */
    CHECK(memcmp(buf + rc, before + rc, len - (size_t) rc) == 0);

    switch (ev->kind) {
    case CHAT_WS_EV_PING:
    case CHAT_WS_EV_PONG:
        CHECK(ev->len <= 125);
        CHECK(memcmp(r, rbefore, sizeof(*r)) == 0);
        break;

    case CHAT_WS_EV_CLOSE:
        CHECK(ev->len <= 123);
        CHECK(memcmp(r, rbefore, sizeof(*r)) == 0);
        if (ev->code == 1005) {
            CHECK(ev->len == 0);
            CHECK(rc == 6);
        } else {
            CHECK(close_code_sendable(ev->code));
            CHECK(ev->payload[-2] == (ev->code >> 8));
            CHECK(ev->payload[-1] == (ev->code & 0xFF));
        }
        CHECK(chat_utf8_valid(ev->payload, ev->len));
        break;

    case CHAT_WS_EV_TEXT:
    case CHAT_WS_EV_BINARY: {
        int text = ev->kind == CHAT_WS_EV_TEXT;
        int res;

        if (m->open) {
            CHECK(text == m->text);                    /* kind carried */
        } else {
            m->text = text;
            m->total = 0;
            m->u8 = CHAT_UTF8_INIT;
        }
        m->total += ev->len;
        CHECK(m->total <= max);
        if (text) {
            res = chat_utf8_feed(&m->u8, ev->payload, ev->len);
            CHECK(res != CHAT_UTF8_REJECT);
            if (ev->fin) {
                CHECK(res == CHAT_UTF8_ACCEPT);
            }
        }
        m->open = !ev->fin;
        CHECK(r->in_msg == m->open);
        break;
    }

    default:
        CHECK(0);
    }

    /* reader state invariants */
    if (r->in_msg) {
        CHECK(r->msg_opcode == CHAT_WS_OP_TEXT
              || r->msg_opcode == CHAT_WS_OP_BINARY);
        CHECK(r->msg_len <= max);
        CHECK(r->msg_len == m->total);
        CHECK(r->msg_opcode == CHAT_WS_OP_BINARY || r->utf8_state == m->u8);
    } else {
        CHECK(r->msg_len == 0 && r->utf8_state == 0);
    }
}

static void fill_rec(rec_t *rec, ssize_t rc, const chat_ws_event_t *ev)
{
    rec->kind = ev->kind;
    rec->code = rc != 0 ? ev->code : 0;
    rec->fin = rc > 0 ? ev->fin : 0;
    rec->len = rc > 0 ? ev->len : 0;
    rec->hash = rc > 0 ? fnv(ev->payload, ev->len) : 0;
}

static void fuzz_writer(const unsigned char *p, size_t n)
{
    unsigned char    out[CHAT_WS_CLOSE_FRAME_MAX + 1], cl[CHAT_WS_CLOSE_FRAME_MAX + 4];
    unsigned char    h[CHAT_WS_MAX_SERVER_HDR];
    unsigned         code;
    size_t           w, i, hl;
    chat_ws_reader_t r;
    chat_ws_event_t  ev;
    uint64_t         l = 0;

    if (n < 2) {
        return;
    }
    code = 1000 + (((unsigned) p[0] << 8 | p[1]) % 4000);
    if (!close_code_sendable(code)) {
        code = 1000;
    }
    out[CHAT_WS_CLOSE_FRAME_MAX] = 0xA5;
    w = chat_ws_write_close(out, code, (const char *) p + 2, n - 2);
    CHECK(out[CHAT_WS_CLOSE_FRAME_MAX] == 0xA5);
    CHECK(w >= 4 && w <= CHAT_WS_CLOSE_FRAME_MAX);
    CHECK(out[1] == w - 2);
    CHECK(memcmp(out + 4, p + 2, w - 4) == 0);          /* a prefix */
    CHECK(chat_utf8_valid(out + 4, w - 4));
    /* maximal: one more complete code point would not fit or not be valid */

    /* round trip through the reader as a masked client frame */
    cl[0] = out[0];
    cl[1] = (unsigned char) (0x80 | out[1]);
    cl[2] = 0x11; cl[3] = 0x22; cl[4] = 0x33; cl[5] = 0x44;
    for (i = 2; i < w; i++) {
        cl[4 + i] = (unsigned char) (out[i] ^ cl[2 + ((i - 2) & 3)]);
    }
    chat_ws_reader_init(&r);
    CHECK(chat_ws_read_frame(&r, cl, w + 4, 0, &ev) == (ssize_t) (w + 4));
    CHECK(ev.kind == CHAT_WS_EV_CLOSE && ev.code == code);
    CHECK(ev.len == w - 4 && memcmp(ev.payload, p + 2, ev.len) == 0);

    /* header: round trip of the length */
    for (i = 0; i < 8 && i < n; i++) {
        l = (l << 8) | p[i];
    }
    l &= 0x7FFFFFFFFFFFFFFFULL;
    l >>= (p[0] & 63);
    hl = chat_ws_write_header(h, p[1] & 0xF, p[1] & 0x80, l);
    CHECK(hl == (l <= 125 ? 2u : l <= 0xFFFF ? 4u : 10u));
    CHECK(h[0] == ((p[1] & 0x80) | (p[1] & 0xF)));
    CHECK((h[1] & 0x80) == 0);
    {
        uint64_t back = h[1];
        if (hl == 4) back = (uint64_t) h[2] << 8 | h[3];
        if (hl == 10) {
            back = 0;
            for (i = 2; i < 10; i++) back = back << 8 | h[i];
        }
        CHECK(back == l);
    }
}

static void fuzz_misc(const unsigned char *p, size_t n)
{
    uint32_t s1 = CHAT_UTF8_INIT, s2 = CHAT_UTF8_INIT;
    size_t   cut = n ? p[0] % (n + 1) : 0;
    int      a, b;
    char     acc[CHAT_WS_ACCEPT_LEN];

    /* split-independence of the incremental validator */
    a = chat_utf8_feed(&s1, p, n);
    chat_utf8_feed(&s2, p, cut);
    b = chat_utf8_feed(&s2, p + cut, n - cut);
    CHECK(a == b && s1 == s2);
    CHECK((a == CHAT_UTF8_ACCEPT) == chat_utf8_valid(p, n));
    CHECK((a == CHAT_UTF8_ACCEPT) == chat_utf8_complete(s1));

    /* handshake helpers on arbitrary bytes */
    if (chat_ws_key_valid((const char *) p, n)) {
        CHECK(n == 24);
    }
    chat_ws_accept((const char *) p, n, acc);
    CHECK(acc[27] == '=');
    if (n > 1) {
        char tok[16];
        size_t tl = (p[0] & 7) + 1;
        if (tl < n) {
            memcpy(tok, p + 1, tl);
            tok[tl] = '\0';
            (void) chat_ws_header_has_token((const char *) p, n, tok);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const unsigned char *stream;
    size_t               slen, off, nrec = 0, irec = 0, npend = 0, fed = 0;
    uint64_t             max;
    uint32_t             seed;
    unsigned char       *whole, *pend = NULL, *before;
    rec_t               *recs;
    chat_ws_reader_t     r, rb;
    chat_ws_event_t      ev;
    model_t              m;
    ssize_t              rc;
    int                  stop = 0;

    if (size < 2) {
        return 0;
    }
    max = max_table[data[0] & 7];
    seed = data[1] * 2654435761u + 1;
    stream = data + 2;
    slen = size - 2;

    fuzz_writer(stream, slen);
    fuzz_misc(stream, slen);

    recs = malloc(sizeof(*recs) * (slen / 6 + 2));
    before = malloc(slen + 1);
    whole = malloc(slen + 1);                 /* +1: malloc(0) portability */
    CHECK(recs && before && whole);

    /* ---- pass 1: whole stream, exact-size buffer ---- */
    memcpy(whole, stream, slen);
    memset(&m, 0, sizeof(m));
    chat_ws_reader_init(&r);
    off = 0;
    for (;;) {
        memcpy(before, whole + off, slen - off);
        rb = r;
        rc = chat_ws_read_frame(&r, whole + off, slen - off, max, &ev);
        check_call(rc, &ev, &r, &rb, whole + off, before, slen - off, max, &m);
        fill_rec(&recs[nrec++], rc, &ev);
        if (rc <= 0) {
            break;
        }
        if (ev.kind == CHAT_WS_EV_CLOSE) {
            /* the glue stops reading after a close; keep parsing anyway
             * (the codec must cope), nothing to check */
        }
        off += (size_t) rc;
        CHECK(nrec < slen / 6 + 2);
    }

    /* ---- pass 2: glue simulation, chunked arrival + compaction ---- */
    memset(&m, 0, sizeof(m));
    chat_ws_reader_init(&r);
    while (!stop) {
        size_t         chunk, k;
        unsigned char *nb;

        if (fed == slen) {
            break;
        }
        seed = seed * 1103515245u + 12345u;
        switch ((seed >> 16) & 3) {
        case 0:  chunk = 1; break;
        case 1:  chunk = 1 + ((seed >> 18) & 15); break;
        case 2:  chunk = 1 + ((seed >> 18) & 255); break;
        default: chunk = slen - fed; break;
        }
        if (chunk > slen - fed) {
            chunk = slen - fed;
        }

        /* pending bytes in an exact-size allocation so ASan sees overreads */
        nb = malloc(npend + chunk);
        CHECK(nb);
        if (npend) {
            memcpy(nb, pend, npend);
        }
        memcpy(nb + npend, stream + fed, chunk);
        free(pend);
        pend = nb;
        npend += chunk;
        fed += chunk;

        off = 0;
        for (;;) {
            memcpy(before, pend + off, npend - off);
            rb = r;
            rc = chat_ws_read_frame(&r, pend + off, npend - off, max, &ev);
            check_call(rc, &ev, &r, &rb, pend + off, before, npend - off,
                       max, &m);
            if (rc == 0) {
                break;
            }
            /* must match the whole-buffer pass event for event */
            {
                rec_t cur;
                fill_rec(&cur, rc, &ev);
                CHECK(irec < nrec);
                CHECK(cur.kind == recs[irec].kind);
                CHECK(cur.code == recs[irec].code);
                CHECK(cur.fin == recs[irec].fin);
                CHECK(cur.len == recs[irec].len);
                CHECK(cur.hash == recs[irec].hash);
                irec++;
            }
            if (rc < 0) {
                stop = 1;
                break;
            }
            off += (size_t) rc;
        }
        /* compaction: drop consumed bytes */
        if (!stop && off) {
            for (k = 0; k < npend - off; k++) {
                pend[k] = pend[off + k];
            }
            npend -= off;
        }
    }
    /* everything pass 1 reported (before its final 0 / error) was seen */
    if (!stop) {
        CHECK(irec + 1 == nrec);
        CHECK(recs[nrec - 1].kind == CHAT_WS_EV_NONE);
    } else {
        CHECK(irec == nrec);
    }

    free(pend);
    free(whole);
    free(before);
    free(recs);
    return 0;
}
