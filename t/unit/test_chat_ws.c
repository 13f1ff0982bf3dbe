/*
 * Unit tests for chat_ws (RFC 6455 codec + UTF-8 validator).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include <openssl/sha.h>

#include "chat_ws.h"

/* ---------------------------------------------------------------------- */
/* helpers                                                                */
/* ---------------------------------------------------------------------- */

static const unsigned char KEY[4] = { 0x37, 0xfa, 0x21, 0x3d };

/*
 * Build a client frame: b0 = FIN/RSV/opcode byte, payload plen bytes,
 * lenform 0 = minimal, 2 = force 16-bit, 8 = force 64-bit, key NULL =
 * unmasked.  Returns the frame size.
 */
static size_t mkframe_ex(unsigned char *out, unsigned b0, const void *payload,
                         size_t plen, int lenform, const unsigned char *key)
{
    const unsigned char *p = payload;
    size_t               n = 0, i;
    unsigned char        m = key ? 0x80 : 0;

    out[n++] = (unsigned char) b0;
    if (lenform == 0 && plen <= 125) {
        out[n++] = (unsigned char) (m | plen);
    } else if (lenform == 2 || (lenform == 0 && plen <= 0xFFFF)) {
        out[n++] = m | 126;
        out[n++] = (unsigned char) (plen >> 8);
        out[n++] = (unsigned char) plen;
    } else {
        out[n++] = m | 127;
        for (i = 0; i < 8; i++) {
            out[n++] = (unsigned char) ((uint64_t) plen >> (56 - 8 * i));
        }
    }
    if (key) {
        memcpy(out + n, key, 4);
        n += 4;
    }
    for (i = 0; i < plen; i++) {
        out[n + i] = (unsigned char) (p[i] ^ (key ? key[i & 3] : 0));
    }
    return n + plen;
}

static size_t mkframe(unsigned char *out, unsigned b0, const void *payload,
                      size_t plen)
{
    return mkframe_ex(out, b0, payload, plen, 0, KEY);
}

/* Feed exactly one frame; assert it is consumed whole; return the event. */
static chat_ws_event_t read_one(chat_ws_reader_t *r, unsigned char *buf,
                                size_t len, uint64_t max)
{
    chat_ws_event_t ev;
    ssize_t         n = chat_ws_read_frame(r, buf, len, max, &ev);

    assert_int_equal(n, (ssize_t) len);
    return ev;
}

/* Expect an error with `code` from buf[0..len). */
static void expect_error(chat_ws_reader_t *r, unsigned char *buf, size_t len,
                         uint64_t max, unsigned code)
{
    chat_ws_event_t ev;
    ssize_t         n = chat_ws_read_frame(r, buf, len, max, &ev);

    assert_int_equal(n, -1);
    assert_int_equal(ev.kind, CHAT_WS_EV_ERROR);
    assert_int_equal(ev.code, code);
}

static void expect_frame_error(unsigned b0, const void *p, size_t plen,
                               unsigned code)
{
    chat_ws_reader_t r = { 0 };
    unsigned char    buf[256];
    size_t           n = mkframe(buf, b0, p, plen);

    expect_error(&r, buf, n, UINT64_MAX, code);
}

/* ---------------------------------------------------------------------- */
/* handshake                                                              */
/* ---------------------------------------------------------------------- */

static void test_accept_rfc_example(void **st)
{
    const char *key = "dGhlIHNhbXBsZSBub25jZQ==";
    char        out[CHAT_WS_ACCEPT_LEN + 1];

    (void) st;
    memset(out, 'X', sizeof(out));
    chat_ws_accept(key, strlen(key), out);
    /* RFC 6455 section 1.3 (cross-checked with `openssl sha1 | base64`) */
    assert_memory_equal(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", 28);
    assert_int_equal(out[28], 'X');   /* not NUL-terminated, no overrun */
    assert_int_equal(CHAT_WS_ACCEPT_LEN, 28);
}

static void b64(const unsigned char *in, size_t n, char *out)
{
    static const char a[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;

    for (i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t) in[i] << 16;
        if (i + 1 < n) v |= (uint32_t) in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = a[(v >> 18) & 63];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = i + 1 < n ? a[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? a[v & 63] : '=';
    }
}

static void test_accept_long_key(void **st)
{
    /* the oversized (EVP) path must agree with a direct computation */
    char          key[300], cat[400], want[28], got[28];
    unsigned char md[20];
    size_t        klen;

    (void) st;
    for (klen = 80; klen < 300; klen += 37) {
        memset(key, 'k', klen);
        memcpy(cat, key, klen);
        memcpy(cat + klen, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
        SHA1((unsigned char *) cat, klen + 36, md);
        b64(md, 20, want);
        chat_ws_accept(key, klen, got);
        assert_memory_equal(got, want, 28);
    }
}

static void test_key_valid(void **st)
{
    (void) st;
    assert_true(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZQ==", 24));
    assert_true(chat_ws_key_valid("AAAAAAAAAAAAAAAAAAAAAA==", 24));
    assert_true(chat_ws_key_valid("+/+/+/+/+/+/+/+/+/+/+w==", 24));
    assert_false(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZQ==", 23));
    assert_false(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZQ", 22));
    assert_false(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZQ=", 23));
    assert_false(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZQ==A", 25));
    assert_false(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZQAA", 24));
    assert_false(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZQA=", 24));
    assert_false(chat_ws_key_valid("dGhlIHNhbXBsZSBub25jZ===", 24));
    assert_false(chat_ws_key_valid("dGhlIHNhbX-sZSBub25jZQ==", 24));
    assert_false(chat_ws_key_valid("dGhlIHNhbX sZSBub25jZQ==", 24));
    assert_false(chat_ws_key_valid(" dGhlIHNhbXBsZSBub25jZQ=", 24));
    /* 20 bytes (28 chars) is not 16 */
    assert_false(chat_ws_key_valid("s3pPLMBiTxaQ9kYGJRrHQDCjmy4=", 28));
    assert_false(chat_ws_key_valid("", 0));
    assert_false(chat_ws_key_valid(NULL, 24));
}

static void test_header_has_token(void **st)
{
#define HT(v, t) chat_ws_header_has_token(v, strlen(v), t)
    (void) st;
    assert_true(HT("Upgrade", "upgrade"));
    assert_true(HT("keep-alive, Upgrade", "upgrade"));
    assert_true(HT("keep-alive,Upgrade", "Upgrade"));
    assert_true(HT("UPGRADE , keep-alive", "upgrade"));
    assert_true(HT(" \tupgrade\t ", "upgrade"));
    assert_true(HT(",,upgrade,,", "upgrade"));
    assert_true(HT("websocket", "websocket"));
    assert_true(HT("WebSocket", "websocket"));
    assert_false(HT("websocket2", "websocket"));
    assert_false(HT("web socket", "websocket"));
    assert_false(HT("xwebsocket", "websocket"));
    assert_false(HT("keep-alive", "upgrade"));
    assert_false(HT("", "upgrade"));
    assert_false(HT(",", "upgrade"));
    assert_false(HT("upgrade", ""));
    /* length-bounded: must not look past len */
    assert_false(chat_ws_header_has_token("upgrade", 6, "upgrade"));
    assert_true(chat_ws_header_has_token("upgrade, x", 7, "upgrade"));
    assert_false(chat_ws_header_has_token("x, upgrade", 5, "upgrade"));
#undef HT
}

/* ---------------------------------------------------------------------- */
/* reader: RFC 6455 section 5.7 examples                                  */
/* ---------------------------------------------------------------------- */

static void test_reader_state_size(void **st)
{
    (void) st;
    assert_true(sizeof(chat_ws_reader_t) <= 24);
}

static void test_rfc_masked_hello(void **st)
{
    unsigned char    f[] = { 0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d,
                             0x7f, 0x9f, 0x4d, 0x51, 0x58 };
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    ev = read_one(&r, f, sizeof(f), 1024);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    assert_int_equal(ev.fin, 1);
    assert_int_equal(ev.len, 5);
    assert_ptr_equal(ev.payload, f + 6);      /* in place */
    assert_memory_equal(f + 6, "Hello", 5);   /* unmasked in place */
    assert_int_equal(r.in_msg, 0);
}

static void test_rfc_unmasked_rejected(void **st)
{
    unsigned char    f[] = { 0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f };
    chat_ws_reader_t r = { 0 };

    (void) st;
    expect_error(&r, f, sizeof(f), 1024, 1002);
    /* known from the 2 header bytes alone */
    expect_error(&r, f, 2, 1024, 1002);
}

static void test_rfc_fragmented_hello(void **st)
{
    unsigned char    buf[64];
    size_t           n1, n2;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    n1 = mkframe(buf, 0x01, "Hel", 3);
    n2 = mkframe(buf + n1, 0x80, "lo", 2);

    ev = read_one(&r, buf, n1, 1024);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    assert_int_equal(ev.fin, 0);
    assert_int_equal(ev.len, 3);
    assert_memory_equal(ev.payload, "Hel", 3);
    assert_int_equal(r.in_msg, 1);
    assert_int_equal(r.msg_len, 3);

    ev = read_one(&r, buf + n1, n2, 1024);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    assert_int_equal(ev.fin, 1);
    assert_memory_equal(ev.payload, "lo", 2);
    assert_int_equal(r.in_msg, 0);
    assert_int_equal(r.msg_len, 0);
}

static void test_rfc_ping_pong(void **st)
{
    /* masked pong from the RFC, and a masked ping "Hello" */
    unsigned char    pong[] = { 0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d,
                                0x7f, 0x9f, 0x4d, 0x51, 0x58 };
    unsigned char    ping[32];
    size_t           n;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    n = mkframe(ping, 0x89, "Hello", 5);
    ev = read_one(&r, ping, n, 1024);
    assert_int_equal(ev.kind, CHAT_WS_EV_PING);
    assert_int_equal(ev.len, 5);
    assert_memory_equal(ev.payload, "Hello", 5);

    ev = read_one(&r, pong, sizeof(pong), 1024);
    assert_int_equal(ev.kind, CHAT_WS_EV_PONG);
    assert_int_equal(ev.len, 5);
    assert_memory_equal(ev.payload, "Hello", 5);

    /* empty ping, and the max 125-byte ping */
    {
        unsigned char big[200], p[125];
        memset(p, 'p', sizeof(p));
        n = mkframe(big, 0x89, "", 0);
        ev = read_one(&r, big, n, 0);
        assert_int_equal(ev.kind, CHAT_WS_EV_PING);
        assert_int_equal(ev.len, 0);
        n = mkframe(big, 0x89, p, 125);
        ev = read_one(&r, big, n, 0);   /* max_msg does not apply */
        assert_int_equal(ev.kind, CHAT_WS_EV_PING);
        assert_int_equal(ev.len, 125);
        assert_memory_equal(ev.payload, p, 125);
    }
}

static unsigned char bigbuf[65536 + 64];
static unsigned char bigpay[65536];

static void test_rfc_len_126_and_127(void **st)
{
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;
    size_t           n, i;

    (void) st;
    for (i = 0; i < sizeof(bigpay); i++) {
        bigpay[i] = (unsigned char) (i * 7 + 3);
    }

    /* RFC: 256 bytes binary in one unmasked frame 0x82 0x7E 0x01 0x00 */
    n = mkframe(bigbuf, 0x82, bigpay, 256);
    assert_int_equal(bigbuf[1], 0x80 | 126);
    assert_int_equal(bigbuf[2], 0x01);
    assert_int_equal(bigbuf[3], 0x00);
    assert_int_equal(n, 4 + 4 + 256);
    ev = read_one(&r, bigbuf, n, 1 << 20);
    assert_int_equal(ev.kind, CHAT_WS_EV_BINARY);
    assert_int_equal(ev.fin, 1);
    assert_int_equal(ev.len, 256);
    assert_memory_equal(ev.payload, bigpay, 256);

    /* RFC: 64 KiB binary 0x82 0x7F 0x00..0x01 0x00 0x00 */
    n = mkframe(bigbuf, 0x82, bigpay, 65536);
    assert_int_equal(bigbuf[1], 0x80 | 127);
    assert_int_equal(n, 2 + 8 + 4 + 65536);
    ev = read_one(&r, bigbuf, n, 1 << 20);
    assert_int_equal(ev.kind, CHAT_WS_EV_BINARY);
    assert_int_equal(ev.len, 65536);
    assert_memory_equal(ev.payload, bigpay, 65536);

    /* boundary 125 / 126 / 65535 text */
    memset(bigpay, 'a', sizeof(bigpay));
    {
        size_t lens[] = { 0, 1, 7, 8, 9, 125, 126, 127, 65535 };
        for (i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
            n = mkframe(bigbuf, 0x81, bigpay, lens[i]);
            ev = read_one(&r, bigbuf, n, 65536);
            assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
            assert_int_equal(ev.len, lens[i]);
            assert_memory_equal(ev.payload, bigpay, lens[i]);
        }
    }
}

static void test_non_minimal_length_accepted(void **st)
{
    unsigned char    buf[64];
    size_t           n;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    n = mkframe_ex(buf, 0x81, "Hello", 5, 2, KEY);
    assert_int_equal(n, 4 + 4 + 5);
    ev = read_one(&r, buf, n, 1024);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    assert_memory_equal(ev.payload, "Hello", 5);

    n = mkframe_ex(buf, 0x81, "Hello", 5, 8, KEY);
    assert_int_equal(n, 10 + 4 + 5);
    ev = read_one(&r, buf, n, 1024);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    assert_memory_equal(ev.payload, "Hello", 5);
}

/* ---------------------------------------------------------------------- */
/* reader: incremental feeding, need                                      */
/* ---------------------------------------------------------------------- */

static void feed_bytewise(const unsigned char *frame, size_t n,
                          uint64_t max, chat_ws_event_t *out)
{
    static unsigned char buf[70000], copy[70000];
    chat_ws_reader_t     r = { 0 };
    chat_ws_event_t      ev;
    size_t               i;
    ssize_t              rc;

    memcpy(buf, frame, n);
    memcpy(copy, frame, n);
    for (i = 0; i < n; i++) {
        rc = chat_ws_read_frame(&r, buf, i, max, &ev);
        assert_int_equal(rc, 0);
        assert_int_equal(ev.kind, CHAT_WS_EV_NONE);
        assert_true(ev.need > i);
        assert_true(ev.need <= n);
        assert_memory_equal(buf, copy, n);      /* untouched */
        assert_int_equal(r.in_msg, 0);
        assert_int_equal(r.msg_len, 0);
    }
    rc = chat_ws_read_frame(&r, buf, n, max, &ev);
    assert_int_equal(rc, (ssize_t) n);
    *out = ev;
}

static void test_bytewise_feeding(void **st)
{
    unsigned char   f[70000];
    chat_ws_event_t ev;
    size_t          n, plens[] = { 0, 5, 125, 126, 300, 65535, 65536 };
    size_t          i;

    (void) st;
    memset(bigpay, 'z', sizeof(bigpay));
    for (i = 0; i < sizeof(plens) / sizeof(plens[0]); i++) {
        n = mkframe(f, 0x81, bigpay, plens[i]);
        if (plens[i] > 300) {
            /* keep the quadratic memcmp cheap: only the header bytes */
            chat_ws_reader_t r = { 0 };
            size_t k;
            for (k = 0; k < 20; k++) {
                assert_int_equal(chat_ws_read_frame(&r, f, k, UINT64_MAX, &ev), 0);
                assert_true(ev.need > k);
            }
            assert_int_equal(chat_ws_read_frame(&r, f, n - 1, UINT64_MAX, &ev), 0);
            assert_int_equal(ev.need, n);
            ev = read_one(&r, f, n, UINT64_MAX);
        } else {
            feed_bytewise(f, n, UINT64_MAX, &ev);
        }
        assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
        assert_int_equal(ev.len, plens[i]);
        assert_memory_equal(ev.payload, bigpay, plens[i]);
    }

    n = mkframe(f, 0x88, "\x03\xe8" "bye", 5);
    feed_bytewise(f, n, 0, &ev);
    assert_int_equal(ev.kind, CHAT_WS_EV_CLOSE);
    assert_int_equal(ev.code, 1000);
}

static void test_need_values(void **st)
{
    unsigned char    f[70000];
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    memset(bigpay, 'q', sizeof(bigpay));

    assert_int_equal(chat_ws_read_frame(&r, f, 0, 100, &ev), 0);
    assert_int_equal(ev.need, 2);

    mkframe(f, 0x81, bigpay, 5);                       /* 2 + 4 + 5 */
    assert_int_equal(chat_ws_read_frame(&r, f, 1, 100, &ev), 0);
    assert_int_equal(ev.need, 2);
    assert_int_equal(chat_ws_read_frame(&r, f, 2, 100, &ev), 0);
    assert_int_equal(ev.need, 11);
    assert_int_equal(chat_ws_read_frame(&r, f, 10, 100, &ev), 0);
    assert_int_equal(ev.need, 11);

    mkframe(f, 0x81, bigpay, 300);                     /* 4 + 4 + 300 */
    assert_int_equal(chat_ws_read_frame(&r, f, 2, 1000, &ev), 0);
    assert_int_equal(ev.need, 8);
    assert_int_equal(chat_ws_read_frame(&r, f, 3, 1000, &ev), 0);
    assert_int_equal(ev.need, 8);
    assert_int_equal(chat_ws_read_frame(&r, f, 4, 1000, &ev), 0);
    assert_int_equal(ev.need, 308);

    mkframe(f, 0x82, bigpay, 65536);                   /* 10 + 4 + 65536 */
    assert_int_equal(chat_ws_read_frame(&r, f, 2, 1 << 20, &ev), 0);
    assert_int_equal(ev.need, 14);
    assert_int_equal(chat_ws_read_frame(&r, f, 9, 1 << 20, &ev), 0);
    assert_int_equal(ev.need, 14);
    assert_int_equal(chat_ws_read_frame(&r, f, 10, 1 << 20, &ev), 0);
    assert_int_equal(ev.need, 14 + 65536);

    /* largest legal 64-bit length, no limit: need reported, no overflow */
    {
        unsigned char h[14] = { 0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF,
                                0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4 };
        assert_int_equal(chat_ws_read_frame(&r, h, 14, UINT64_MAX, &ev), 0);
        assert_true(ev.need == 14 + (uint64_t) INT64_MAX);
    }
}

static void test_multiple_frames_in_buffer(void **st)
{
    unsigned char    buf[256];
    size_t           n = 0, off = 0;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;
    ssize_t          rc;
    int              kinds[8], k = 0;

    (void) st;
    n += mkframe(buf + n, 0x01, "ab", 2);
    n += mkframe(buf + n, 0x89, "P", 1);
    n += mkframe(buf + n, 0x80, "cd", 2);
    n += mkframe(buf + n, 0x82, "\x00\x01", 2);
    n += mkframe(buf + n, 0x88, "", 0);
    n += mkframe(buf + n, 0x81, "partial", 7) - 3;     /* incomplete tail */

    while ((rc = chat_ws_read_frame(&r, buf + off, n - off, 100, &ev)) > 0) {
        kinds[k++] = ev.kind;
        off += (size_t) rc;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(k, 5);
    assert_int_equal(kinds[0], CHAT_WS_EV_TEXT);
    assert_int_equal(kinds[1], CHAT_WS_EV_PING);
    assert_int_equal(kinds[2], CHAT_WS_EV_TEXT);
    assert_int_equal(kinds[3], CHAT_WS_EV_BINARY);
    assert_int_equal(kinds[4], CHAT_WS_EV_CLOSE);
    assert_int_equal(ev.need, 2 + 4 + 7);
    assert_int_equal(n - off, 2 + 4 + 7 - 3);
}

/* ---------------------------------------------------------------------- */
/* reader: protocol errors (1002), reported from the header alone          */
/* ---------------------------------------------------------------------- */

static void test_err_rsv_bits(void **st)
{
    unsigned rsv[] = { 0x40, 0x20, 0x10, 0x70 };
    size_t   i;

    (void) st;
    for (i = 0; i < 4; i++) {
        chat_ws_reader_t r = { 0 };
        unsigned char    f[16];
        expect_frame_error(0x81 | rsv[i], "Hello", 5, 1002);
        expect_frame_error(0x89 | rsv[i], "", 0, 1002);
        /* one byte is enough */
        f[0] = (unsigned char) (0x81 | rsv[i]);
        expect_error(&r, f, 1, 100, 1002);
    }
}

static void test_err_reserved_opcodes(void **st)
{
    unsigned op;

    (void) st;
    for (op = 0; op < 16; op++) {
        chat_ws_reader_t r = { 0 };
        unsigned char    f[1] = { (unsigned char) (0x80 | op) };
        chat_ws_event_t  ev;
        ssize_t          rc = chat_ws_read_frame(&r, f, 1, 100, &ev);

        if ((op >= 3 && op <= 7) || op >= 0xB || op == 0) {
            /* op 0 is a continuation with no open message */
            assert_int_equal(rc, -1);
            assert_int_equal(ev.code, 1002);
            expect_frame_error(0x80 | op, "x", 1, 1002);
        } else {
            assert_int_equal(rc, 0);
            assert_int_equal(ev.need, 2);
        }
    }
}

static void test_err_control_frames(void **st)
{
    unsigned char    p[126], f[200];
    unsigned         ops[] = { 0x8, 0x9, 0xA };
    size_t           i;

    (void) st;
    memset(p, 'x', sizeof(p));
    for (i = 0; i < 3; i++) {
        chat_ws_reader_t r = { 0 };
        /* fragmented control frame (FIN=0), known from byte 0 */
        expect_frame_error(ops[i], "", 0, 1002);
        f[0] = (unsigned char) ops[i];
        expect_error(&r, f, 1, 100, 1002);
        /* 126-byte control payload, known from byte 1 */
        mkframe(f, 0x80 | ops[i], p, 126);
        expect_error(&r, f, 2, 100, 1002);
        /* 16-bit length of 5 encoded non-minimally is still "> 125" marker */
        mkframe_ex(f, 0x80 | ops[i], p, 5, 2, KEY);
        expect_error(&r, f, 2, 100, 1002);
        mkframe_ex(f, 0x80 | ops[i], p, 5, 8, KEY);
        expect_error(&r, f, 2, 100, 1002);
    }
}

static void test_err_continuation_state(void **st)
{
    unsigned char    buf[64];
    size_t           n;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    /* continuation with no open message */
    expect_frame_error(0x80, "x", 1, 1002);
    expect_frame_error(0x00, "x", 1, 1002);

    /* after a complete message, continuation is again invalid */
    n = mkframe(buf, 0x81, "a", 1);
    read_one(&r, buf, n, 100);
    n = mkframe(buf, 0x80, "b", 1);
    expect_error(&r, buf, 1, 100, 1002);

    /* new text / binary while a fragmented message is open */
    memset(&r, 0, sizeof(r));
    n = mkframe(buf, 0x01, "a", 1);
    ev = read_one(&r, buf, n, 100);
    assert_int_equal(ev.fin, 0);
    buf[0] = 0x81;
    expect_error(&r, buf, 1, 100, 1002);
    buf[0] = 0x02;
    expect_error(&r, buf, 1, 100, 1002);
    buf[0] = 0x82;
    expect_error(&r, buf, 1, 100, 1002);

    /* same for an open binary message */
    memset(&r, 0, sizeof(r));
    n = mkframe(buf, 0x02, "a", 1);
    read_one(&r, buf, n, 100);
    buf[0] = 0x81;
    expect_error(&r, buf, 1, 100, 1002);
}

static void test_err_unmasked(void **st)
{
    unsigned char    buf[64];
    size_t           n;
    chat_ws_reader_t r = { 0 };

    (void) st;
    n = mkframe_ex(buf, 0x81, "Hi", 2, 0, NULL);
    expect_error(&r, buf, n, 100, 1002);
    expect_error(&r, buf, 2, 100, 1002);
    n = mkframe_ex(buf, 0x89, "", 0, 0, NULL);
    expect_error(&r, buf, n, 100, 1002);
    n = mkframe_ex(buf, 0x88, "", 0, 0, NULL);
    expect_error(&r, buf, n, 100, 1002);
}

static void test_err_64bit_msb(void **st)
{
    unsigned char    h[14] = { 0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0,
                               1, 2, 3, 4 };
    chat_ws_reader_t r = { 0 };

    (void) st;
    expect_error(&r, h, 3, UINT64_MAX, 1002);   /* known at byte 3 */
    expect_error(&r, h, 14, UINT64_MAX, 1002);
    h[2] = 0xFF;
    expect_error(&r, h, 3, UINT64_MAX, 1002);
}

/* ---------------------------------------------------------------------- */
/* reader: max_msg (1009)                                                  */
/* ---------------------------------------------------------------------- */

static void test_max_msg_single_frame(void **st)
{
    unsigned char    f[70000];
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;
    size_t           n;

    (void) st;
    memset(bigpay, 'm', sizeof(bigpay));

    /* exactly max is fine */
    n = mkframe(f, 0x81, bigpay, 100);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.len, 100);

    /* max + 1: error as soon as the length is known (2 bytes) */
    n = mkframe(f, 0x81, bigpay, 101);
    expect_error(&r, f, 2, 100, 1009);
    expect_error(&r, f, n, 100, 1009);

    /* 16-bit form: error with 4 bytes */
    mkframe(f, 0x81, bigpay, 1000);
    assert_int_equal(chat_ws_read_frame(&r, f, 3, 999, &ev), 0);
    expect_error(&r, f, 4, 999, 1009);

    /* 64-bit form: error with 10 bytes, no payload present */
    {
        unsigned char h[10] = { 0x82, 0xFF, 0x00, 0x00, 0x00, 0x01,
                                0, 0, 0, 0 };              /* 2^32 */
        assert_int_equal(chat_ws_read_frame(&r, h, 9, 1 << 20, &ev), 0);
        expect_error(&r, h, 10, 1 << 20, 1009);
        h[2] = 0x7F;                                        /* ~2^63 */
        expect_error(&r, h, 10, 1 << 20, 1009);
    }

    /* max_msg 0: only empty data messages */
    n = mkframe(f, 0x81, "", 0);
    ev = read_one(&r, f, n, 0);
    assert_int_equal(ev.len, 0);
    n = mkframe(f, 0x81, "a", 1);
    expect_error(&r, f, 2, 0, 1009);
}

static void test_max_msg_across_fragments(void **st)
{
    unsigned char    f[256];
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;
    size_t           n;

    (void) st;
    memset(bigpay, 'm', sizeof(bigpay));

    n = mkframe(f, 0x01, bigpay, 40);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x00, bigpay, 40);
    read_one(&r, f, n, 100);
    assert_int_equal(r.msg_len, 80);
    /* control frames don't count */
    n = mkframe(f, 0x89, bigpay, 100);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_PING);
    assert_int_equal(r.msg_len, 80);
    /* 80 + 21 > 100: reported from the header */
    n = mkframe(f, 0x80, bigpay, 21);
    expect_error(&r, f, 2, 100, 1009);
    /* 80 + 20 == 100 fits */
    n = mkframe(f, 0x80, bigpay, 20);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.fin, 1);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    /* next message starts from zero again */
    n = mkframe(f, 0x81, bigpay, 100);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.len, 100);

    /* binary across fragments too */
    memset(&r, 0, sizeof(r));
    n = mkframe(f, 0x02, bigpay, 60);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x00, bigpay, 41);
    expect_error(&r, f, n, 100, 1009);
}

/* ---------------------------------------------------------------------- */
/* reader: UTF-8 in text messages (1007)                                   */
/* ---------------------------------------------------------------------- */

static void test_text_utf8_valid(void **st)
{
    /* "κόσμε" (Autobahn 6.2), plus CJK, emoji, U+10FFFF, U+FFFF, NUL */
    static const char *ok[] = {
        "\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5",
        "\xe4\xbd\xa0\xe5\xa5\xbd",
        "\xf0\x9f\x98\x80",
        "\xf4\x8f\xbf\xbf",
        "\xef\xbf\xbf",
        "\xed\x9f\xbf",           /* U+D7FF, just below surrogates */
        "\xee\x80\x80",           /* U+E000, just above */
        "\xc2\x80",
        "\xe0\xa0\x80",           /* U+0800, smallest 3-byte */
        "\xf0\x90\x80\x80",       /* U+10000, smallest 4-byte */
    };
    size_t i;

    (void) st;
    for (i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        chat_ws_reader_t r = { 0 };
        unsigned char    f[64];
        size_t           n = mkframe(f, 0x81, ok[i], strlen(ok[i]));
        chat_ws_event_t  ev = read_one(&r, f, n, 100);
        assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
        assert_memory_equal(ev.payload, ok[i], strlen(ok[i]));
    }
    {
        chat_ws_reader_t r = { 0 };
        unsigned char    f[64];
        size_t           n = mkframe(f, 0x81, "a\0b", 3);
        chat_ws_event_t  ev = read_one(&r, f, n, 100);
        assert_int_equal(ev.len, 3);
    }
}

static void test_text_utf8_invalid(void **st)
{
    static const char *bad[] = {
        "\xc0\xaf",               /* overlong '/' */
        "\xc1\xbf",               /* overlong */
        "\xe0\x80\xaf",           /* overlong 3-byte */
        "\xe0\x9f\xbf",           /* overlong 3-byte (max) */
        "\xf0\x80\x80\xaf",       /* overlong 4-byte */
        "\xf0\x8f\xbf\xbf",       /* overlong 4-byte (max) */
        "\xed\xa0\x80",           /* U+D800 */
        "\xed\xbf\xbf",           /* U+DFFF */
        "\xed\xa0\x80\xed\xb0\x80", /* surrogate pair */
        "\xf4\x90\x80\x80",       /* U+110000 */
        "\xf5\x80\x80\x80",
        "\xf7\xbf\xbf\xbf",
        "\xf8\x88\x80\x80\x80",   /* 5-byte */
        "\xfc\x84\x80\x80\x80\x80",
        "\xfe", "\xff",
        "\x80",                   /* lone continuation */
        "\xbf",
        ("a\x80" "b"),
        "\xc2",                   /* truncated */
        "\xe2\x82",
        "\xf0\x9f\x98",
        "\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64",
        "\xc2\x41",               /* lead followed by ASCII */
        "\xe2\x28\xa1",
    };
    size_t i;

    (void) st;
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        expect_frame_error(0x81, bad[i], strlen(bad[i]), 1007);
        /* the same bytes are fine as binary */
        {
            chat_ws_reader_t r = { 0 };
            unsigned char    f[64];
            size_t           n = mkframe(f, 0x82, bad[i], strlen(bad[i]));
            chat_ws_event_t  ev = read_one(&r, f, n, 100);
            assert_int_equal(ev.kind, CHAT_WS_EV_BINARY);
        }
    }
}

static void test_text_utf8_split_across_fragments(void **st)
{
    /* "€" = E2 82 AC, "😀" = F0 9F 98 80; split at every possible point */
    const char *s = "x\xe2\x82\xac" "y\xf0\x9f\x98\x80" "z";
    size_t      slen = strlen(s), a, b;

    (void) st;
    for (a = 0; a <= slen; a++) {
        for (b = a; b <= slen; b++) {
            chat_ws_reader_t r = { 0 };
            unsigned char    f[64], out[64];
            size_t           n, o = 0;
            chat_ws_event_t  ev;

            n = mkframe(f, 0x01, s, a);
            ev = read_one(&r, f, n, 100);
            memcpy(out + o, ev.payload, ev.len); o += ev.len;
            n = mkframe(f, 0x00, s + a, b - a);
            ev = read_one(&r, f, n, 100);
            assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
            assert_int_equal(ev.fin, 0);
            memcpy(out + o, ev.payload, ev.len); o += ev.len;
            n = mkframe(f, 0x80, s + b, slen - b);
            ev = read_one(&r, f, n, 100);
            assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
            assert_int_equal(ev.fin, 1);
            memcpy(out + o, ev.payload, ev.len); o += ev.len;
            assert_int_equal(o, slen);
            assert_memory_equal(out, s, slen);
            assert_int_equal(r.utf8_state, 0);
        }
    }
}

static void test_text_utf8_fragment_errors(void **st)
{
    unsigned char    f[64];
    size_t           n;
    chat_ws_reader_t r = { 0 };

    (void) st;
    /* truncated sequence at the final fragment */
    n = mkframe(f, 0x01, "ok\xe2", 3);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x80, "\x82", 1);
    expect_error(&r, f, n, 100, 1007);

    /* truncated: final fragment empty */
    memset(&r, 0, sizeof(r));
    n = mkframe(f, 0x01, "\xf0\x9f", 2);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x80, "", 0);
    expect_error(&r, f, n, 100, 1007);

    /* invalid inside a non-final fragment is reported immediately */
    memset(&r, 0, sizeof(r));
    n = mkframe(f, 0x01, "ab\xf4\x90", 4);
    expect_error(&r, f, n, 100, 1007);

    /* invalid only in combination: E0 | 80 (overlong) across fragments */
    memset(&r, 0, sizeof(r));
    n = mkframe(f, 0x01, "\xe0", 1);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x00, "\x80", 1);
    expect_error(&r, f, n, 100, 1007);

    /* ED | A0 (surrogate) across fragments, with a ping in between */
    memset(&r, 0, sizeof(r));
    n = mkframe(f, 0x01, "\xed", 1);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x89, "p", 1);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x80, "\xa0\x80", 2);
    expect_error(&r, f, n, 100, 1007);

    /* a previous message's open sequence does not leak into the next */
    memset(&r, 0, sizeof(r));
    n = mkframe(f, 0x01, "\xe2\x82", 2);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x80, "\xac", 1);
    read_one(&r, f, n, 100);
    n = mkframe(f, 0x81, "\xac", 1);
    expect_error(&r, f, n, 100, 1007);
}

static void test_interleaved_control(void **st)
{
    unsigned char    f[64];
    size_t           n;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    n = mkframe(f, 0x01, "He\xe2\x82", 4);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);

    n = mkframe(f, 0x89, "ping!", 5);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_PING);
    assert_memory_equal(ev.payload, "ping!", 5);

    n = mkframe(f, 0x8A, "", 0);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_PONG);

    n = mkframe(f, 0x88, "\x03\xe9" "brb", 5);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_CLOSE);
    assert_int_equal(ev.code, 1001);

    assert_int_equal(r.in_msg, 1);
    assert_int_equal(r.msg_opcode, CHAT_WS_OP_TEXT);
    assert_int_equal(r.msg_len, 4);

    n = mkframe(f, 0x00, "\xac", 1);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    assert_int_equal(ev.fin, 0);

    n = mkframe(f, 0x80, "llo", 3);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    assert_int_equal(ev.fin, 1);
    assert_memory_equal(ev.payload, "llo", 3);
    assert_int_equal(r.in_msg, 0);
}

static void test_binary_fragments(void **st)
{
    unsigned char    f[64];
    size_t           n;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    (void) st;
    n = mkframe(f, 0x02, "\xff\xfe", 2);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_BINARY);
    assert_int_equal(ev.fin, 0);
    n = mkframe(f, 0x00, "\xc0", 1);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_BINARY);   /* continuation keeps kind */
    assert_int_equal(ev.fin, 0);
    n = mkframe(f, 0x80, "", 0);
    ev = read_one(&r, f, n, 100);
    assert_int_equal(ev.kind, CHAT_WS_EV_BINARY);
    assert_int_equal(ev.fin, 1);
    assert_int_equal(ev.len, 0);
    assert_int_equal(r.in_msg, 0);

    /* empty non-final text fragments are fine */
    n = mkframe(f, 0x01, "", 0);
    ev = read_one(&r, f, n, 0);
    assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
    n = mkframe(f, 0x00, "", 0);
    read_one(&r, f, n, 0);
    n = mkframe(f, 0x80, "", 0);
    ev = read_one(&r, f, n, 0);
    assert_int_equal(ev.fin, 1);
}

/* ---------------------------------------------------------------------- */
/* reader: close frames                                                    */
/* ---------------------------------------------------------------------- */

static chat_ws_event_t read_close(const void *p, size_t plen)
{
    chat_ws_reader_t r = { 0 };
    unsigned char    f[256];
    size_t           n = mkframe(f, 0x88, p, plen);

    return read_one(&r, f, n, 0);
}

static void test_close_parsing(void **st)
{
    chat_ws_event_t ev;

    (void) st;
    ev = read_close("", 0);
    assert_int_equal(ev.kind, CHAT_WS_EV_CLOSE);
    assert_int_equal(ev.code, 1005);
    assert_int_equal(ev.len, 0);

    ev = read_close("\x03\xe8", 2);
    assert_int_equal(ev.code, 1000);
    assert_int_equal(ev.len, 0);

    ev = read_close("\x03\xe8" "bye \xe2\x82\xac", 9);
    assert_int_equal(ev.code, 1000);
    assert_int_equal(ev.len, 7);
    assert_memory_equal(ev.payload, "bye \xe2\x82\xac", 7);

    /* 125-byte close payload */
    {
        char p[125];
        memset(p, 'r', sizeof(p));
        p[0] = 0x0f; p[1] = (char) 0xa0;     /* 4000 */
        ev = read_close(p, 125);
        assert_int_equal(ev.code, 4000);
        assert_int_equal(ev.len, 123);
    }
}

static void test_close_codes(void **st)
{
    static const unsigned good[] = { 1000, 1001, 1002, 1003, 1007, 1008,
                                     1009, 1010, 1011, 1012, 1013, 1014,
                                     3000, 3999, 4000, 4999 };
    static const unsigned bad[] = { 0, 1, 999, 1004, 1005, 1006, 1015,
                                    1016, 1100, 2000, 2999, 5000, 65535 };
    size_t i;

    (void) st;
    for (i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        unsigned char p[2] = { (unsigned char) (good[i] >> 8),
                               (unsigned char) good[i] };
        chat_ws_event_t ev = read_close(p, 2);
        assert_int_equal(ev.kind, CHAT_WS_EV_CLOSE);
        assert_int_equal(ev.code, good[i]);
    }
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        unsigned char p[2] = { (unsigned char) (bad[i] >> 8),
                               (unsigned char) bad[i] };
        expect_frame_error(0x88, p, 2, 1002);
    }
}

static void test_close_errors(void **st)
{
    (void) st;
    expect_frame_error(0x88, "\x03", 1, 1002);            /* length 1 */
    {
        /* length 1 followed by more bytes that would complete a valid
         * code: must still be 1002 (the code is not read past the frame) */
        chat_ws_reader_t r = { 0 };
        unsigned char    f[16];
        size_t           n = mkframe(f, 0x88, "\x03", 1);
        f[n] = 0xe8;
        expect_error(&r, f, n + 1, 0, 1002);
    }
    expect_frame_error(0x88, "\x03\xe8\xff", 3, 1007);    /* bad reason */
    expect_frame_error(0x88, "\x03\xe8" "ab\xed\xa0\x80", 7, 1007);
    expect_frame_error(0x88, "\x03\xe8" "\xe2\x82", 4, 1007); /* truncated */
    expect_frame_error(0x08, "\x03\xe8", 2, 1002);        /* FIN=0 */
}

/* ---------------------------------------------------------------------- */
/* writer                                                                  */
/* ---------------------------------------------------------------------- */

/* Turn a server frame (header + payload) into a masked client frame. */
static size_t to_client(unsigned char *dst, const unsigned char *hdr,
                        size_t hlen, const unsigned char *p, size_t plen)
{
    size_t i;

    memcpy(dst, hdr, hlen);
    dst[1] |= 0x80;
    memcpy(dst + hlen, KEY, 4);
    for (i = 0; i < plen; i++) {
        dst[hlen + 4 + i] = (unsigned char) (p[i] ^ KEY[i & 3]);
    }
    return hlen + 4 + plen;
}

static void test_write_header(void **st)
{
    unsigned char h[CHAT_WS_MAX_SERVER_HDR];

    (void) st;
    assert_int_equal(chat_ws_write_header(h, CHAT_WS_OP_TEXT, 1, 0), 2);
    assert_int_equal(h[0], 0x81);
    assert_int_equal(h[1], 0x00);

    assert_int_equal(chat_ws_write_header(h, CHAT_WS_OP_TEXT, 1, 125), 2);
    assert_int_equal(h[1], 125);

    assert_int_equal(chat_ws_write_header(h, CHAT_WS_OP_BINARY, 0, 126), 4);
    assert_int_equal(h[0], 0x02);
    assert_int_equal(h[1], 126);
    assert_int_equal(h[2], 0);
    assert_int_equal(h[3], 126);

    assert_int_equal(chat_ws_write_header(h, CHAT_WS_OP_CONT, 1, 65535), 4);
    assert_int_equal(h[0], 0x80);
    assert_int_equal(h[2], 0xff);
    assert_int_equal(h[3], 0xff);

    assert_int_equal(chat_ws_write_header(h, CHAT_WS_OP_TEXT, 1, 65536), 10);
    assert_int_equal(h[1], 127);
    assert_memory_equal(h + 2, "\0\0\0\0\0\x01\0\0", 8);

    assert_int_equal(chat_ws_write_header(h, CHAT_WS_OP_PING, 1,
                                          0x0102030405060708ULL), 10);
    assert_int_equal(h[0], 0x89);
    assert_memory_equal(h + 2, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);

    /* opcode masked to 4 bits, server frames never masked */
    chat_ws_write_header(h, 0x1A, 1, 5);
    assert_int_equal(h[0], 0x8A);
    assert_int_equal(h[1] & 0x80, 0);
}

static void test_write_header_roundtrip(void **st)
{
    static unsigned char f[70100];
    size_t  lens[] = { 0, 1, 125, 126, 127, 1000, 65535, 65536 };
    size_t  i, hl, n;
    unsigned char h[CHAT_WS_MAX_SERVER_HDR];

    (void) st;
    for (i = 0; i < sizeof(bigpay); i++) {
        bigpay[i] = (unsigned char) ('a' + i % 26);
    }
    for (i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        chat_ws_reader_t r = { 0 };
        chat_ws_event_t  ev;

        hl = chat_ws_write_header(h, CHAT_WS_OP_TEXT, 1, lens[i]);
        n = to_client(f, h, hl, bigpay, lens[i]);
        ev = read_one(&r, f, n, UINT64_MAX);
        assert_int_equal(ev.kind, CHAT_WS_EV_TEXT);
        assert_int_equal(ev.fin, 1);
        assert_int_equal(ev.len, lens[i]);
        assert_memory_equal(ev.payload, bigpay, lens[i]);
    }
}

static void check_close_roundtrip(unsigned code, const char *reason,
                                  size_t rlen, size_t want_rlen)
{
    unsigned char    out[CHAT_WS_CLOSE_FRAME_MAX + 8], f[200];
    size_t           n, m;
    chat_ws_reader_t r = { 0 };
    chat_ws_event_t  ev;

    memset(out, 0xEE, sizeof(out));
    n = chat_ws_write_close(out, code, reason, rlen);
    assert_true(n <= CHAT_WS_CLOSE_FRAME_MAX);
    assert_int_equal(out[n], 0xEE);             /* no overrun */
    assert_int_equal(out[0], 0x88);
    assert_int_equal(n, 4 + want_rlen);
    assert_int_equal(out[1], 2 + want_rlen);

    m = to_client(f, out, 2, out + 2, n - 2);
    ev = read_one(&r, f, m, 0);
    assert_int_equal(ev.kind, CHAT_WS_EV_CLOSE);
    assert_int_equal(ev.code, code);
    assert_int_equal(ev.len, want_rlen);
    assert_memory_equal(ev.payload, reason, want_rlen);
}

static void test_write_close(void **st)
{
    char          s[400];
    unsigned char out[CHAT_WS_CLOSE_FRAME_MAX];
    size_t        i;

    (void) st;
    /* no status */
    assert_int_equal(chat_ws_write_close(out, 0, "ignored", 7), 2);
    assert_memory_equal(out, "\x88\x00", 2);
    assert_int_equal(chat_ws_write_close(out, 1005, NULL, 0), 2);

    assert_int_equal(chat_ws_write_close(out, 1009, NULL, 5), 4);
    assert_memory_equal(out, "\x88\x02\x03\xf1", 4);

    check_close_roundtrip(1000, "", 0, 0);
    check_close_roundtrip(1000, "bye", 3, 3);
    check_close_roundtrip(1003, "binary not supported", 20, 20);

    /* ASCII truncated to 123 */
    memset(s, 'a', 300);
    check_close_roundtrip(1008, s, 300, 123);
    check_close_roundtrip(1008, s, 123, 123);
    check_close_roundtrip(1008, s, 124, 123);

    /* 2-byte chars: 123 would split, cut to 122 */
    for (i = 0; i + 1 < 300; i += 2) { s[i] = (char) 0xc3; s[i + 1] = (char) 0xa9; }
    check_close_roundtrip(1011, s, 300, 122);
    /* 3-byte chars: 41 * 3 = 123 exactly */
    for (i = 0; i + 2 < 300; i += 3) {
        s[i] = (char) 0xe2; s[i + 1] = (char) 0x82; s[i + 2] = (char) 0xac;
    }
    check_close_roundtrip(1011, s, 297, 123);
    /* 4-byte chars: 30 * 4 = 120 */
    for (i = 0; i + 3 < 300; i += 4) {
        s[i] = (char) 0xf0; s[i + 1] = (char) 0x9f;
        s[i + 2] = (char) 0x98; s[i + 3] = (char) 0x80;
    }
    check_close_roundtrip(4000, s, 300, 120);
    /* one ASCII then 4-byte chars: 1 + 30*4 = 121 */
    memmove(s + 1, s, 299);
    s[0] = 'x';
    check_close_roundtrip(4000, s, 300, 121);

    /* invalid reason: cut before the bad / unfinished sequence */
    check_close_roundtrip(1000, "ok\xff" "zz", 5, 2);
    check_close_roundtrip(1000, "ok\xe2\x82", 4, 2);
    check_close_roundtrip(1000, "\xed\xa0\x80", 3, 0);
}

/* ---------------------------------------------------------------------- */
/* UTF-8 validator                                                         */
/* ---------------------------------------------------------------------- */

/* Straightforward reference: decode each sequence and check its value. */
static int ref_utf8_valid(const unsigned char *p, size_t n)
{
    size_t i = 0, k, need;
    uint32_t cp, min;

    while (i < n) {
        unsigned char c = p[i];
        if (c < 0x80) { i++; continue; }
        else if ((c & 0xE0) == 0xC0) { need = 1; cp = c & 0x1F; min = 0x80; }
        else if ((c & 0xF0) == 0xE0) { need = 2; cp = c & 0x0F; min = 0x800; }
        else if ((c & 0xF8) == 0xF0) { need = 3; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (i + need >= n) return 0;            /* truncated */
        for (k = 1; k <= need; k++) {
            if ((p[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += need + 1;
    }
    return 1;
}

static void test_utf8_exhaustive_short(void **st)
{
    unsigned char b[3];
    unsigned      x;

    (void) st;
    assert_true(chat_utf8_valid(NULL, 0));
    assert_true(chat_utf8_valid((const unsigned char *) "", 0));
    for (x = 0; x < 256; x++) {
        b[0] = (unsigned char) x;
        assert_int_equal(chat_utf8_valid(b, 1), ref_utf8_valid(b, 1));
    }
    for (x = 0; x < 65536; x++) {
        b[0] = (unsigned char) (x >> 8);
        b[1] = (unsigned char) x;
        assert_int_equal(chat_utf8_valid(b, 2), ref_utf8_valid(b, 2));
    }
    for (x = 0; x < (1u << 24); x++) {
        int a, e;
        b[0] = (unsigned char) (x >> 16);
        b[1] = (unsigned char) (x >> 8);
        b[2] = (unsigned char) x;
        a = chat_utf8_valid(b, 3);
        e = ref_utf8_valid(b, 3);
        if (a != e) {
            fail_msg("3-byte mismatch %02x %02x %02x: got %d want %d",
                     b[0], b[1], b[2], a, e);
        }
    }
}

static void test_utf8_four_byte(void **st)
{
    static const unsigned char tail[] = { 0x00, 0x41, 0x7F, 0x80, 0x8F,
                                          0x90, 0x9F, 0xA0, 0xBF, 0xC0,
                                          0xC2, 0xE0, 0xF0, 0xFF };
    size_t   nt = sizeof(tail), i, j, k;
    unsigned lead;
    unsigned char b[4];

    (void) st;
    for (lead = 0xE0; lead <= 0xFF; lead++) {
        b[0] = (unsigned char) lead;
        for (i = 0; i < nt; i++)
            for (j = 0; j < nt; j++)
                for (k = 0; k < nt; k++) {
                    b[1] = tail[i]; b[2] = tail[j]; b[3] = tail[k];
                    assert_int_equal(chat_utf8_valid(b, 4),
                                     ref_utf8_valid(b, 4));
                }
    }
    /* every 4-byte code point boundary */
    {
        uint32_t cps[] = { 0xFFFF, 0x10000, 0x10FFFF, 0x110000, 0x1FFFFF };
        for (i = 0; i < 5; i++) {
            uint32_t c = cps[i];
            b[0] = (unsigned char) (0xF0 | (c >> 18));
            b[1] = (unsigned char) (0x80 | ((c >> 12) & 0x3F));
            b[2] = (unsigned char) (0x80 | ((c >> 6) & 0x3F));
            b[3] = (unsigned char) (0x80 | (c & 0x3F));
            assert_int_equal(chat_utf8_valid(b, 4),
                             c >= 0x10000 && c <= 0x10FFFF);
        }
    }
}

static void test_utf8_incremental(void **st)
{
    const unsigned char *s = (const unsigned char *)
        "plain ascii text, then \xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"
        " and \xf0\x9f\x98\x80\xe2\x82\xac end";
    size_t   n = strlen((const char *) s), a, b;
    uint32_t state;

    (void) st;
    for (a = 0; a <= n; a++) {
        for (b = a; b <= n; b++) {
            int r1, r2, r3;
            state = CHAT_UTF8_INIT;
            r1 = chat_utf8_feed(&state, s, a);
            assert_int_not_equal(r1, CHAT_UTF8_REJECT);
            assert_int_equal(r1 == CHAT_UTF8_ACCEPT, chat_utf8_complete(state));
            r2 = chat_utf8_feed(&state, s + a, b - a);
            assert_int_not_equal(r2, CHAT_UTF8_REJECT);
            r3 = chat_utf8_feed(&state, s + b, n - b);
            assert_int_equal(r3, CHAT_UTF8_ACCEPT);
            assert_true(chat_utf8_complete(state));
        }
    }

    state = CHAT_UTF8_INIT;
    assert_int_equal(chat_utf8_feed(&state, (const unsigned char *) "\xe2", 1),
                     CHAT_UTF8_INCOMPLETE);
    assert_false(chat_utf8_complete(state));
    assert_int_equal(chat_utf8_feed(&state, NULL, 0), CHAT_UTF8_INCOMPLETE);
    assert_int_equal(chat_utf8_feed(&state, (const unsigned char *) "\x82\xac", 2),
                     CHAT_UTF8_ACCEPT);

    /* reject is sticky */
    state = CHAT_UTF8_INIT;
    assert_int_equal(chat_utf8_feed(&state, (const unsigned char *) "\xff", 1),
                     CHAT_UTF8_REJECT);
    assert_false(chat_utf8_complete(state));
    assert_int_equal(chat_utf8_feed(&state, (const unsigned char *) "abc", 3),
                     CHAT_UTF8_REJECT);
    assert_int_equal(chat_utf8_feed(&state, NULL, 0), CHAT_UTF8_REJECT);

    /* rejected as soon as the bad byte arrives (fail fast) */
    state = CHAT_UTF8_INIT;
    assert_int_equal(chat_utf8_feed(&state, (const unsigned char *) "\xf4\x90", 2),
                     CHAT_UTF8_REJECT);
}

static void test_utf8_fast_path_positions(void **st)
{
    /* a bad or multibyte byte at every offset of a long ASCII run: the
     * 8-byte fast path must not skip it */
    unsigned char buf[80];
    size_t        pos, n;

    (void) st;
    for (n = 1; n <= sizeof(buf); n++) {
        for (pos = 0; pos < n; pos++) {
            memset(buf, 'a', n);
            buf[pos] = 0x80;
            assert_false(chat_utf8_valid(buf, n));
            buf[pos] = 0xC3;
            assert_false(chat_utf8_valid(buf, n));     /* 'a' not cont */
            if (pos + 1 < n) {
                buf[pos + 1] = 0xA9;
                assert_true(chat_utf8_valid(buf, n));
            }
        }
        memset(buf, 'a', n);
        assert_true(chat_utf8_valid(buf, n));
        buf[n - 1] = 0x7F;
        assert_true(chat_utf8_valid(buf, n));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accept_rfc_example),
        cmocka_unit_test(test_accept_long_key),
        cmocka_unit_test(test_key_valid),
        cmocka_unit_test(test_header_has_token),
        cmocka_unit_test(test_reader_state_size),
        cmocka_unit_test(test_rfc_masked_hello),
        cmocka_unit_test(test_rfc_unmasked_rejected),
        cmocka_unit_test(test_rfc_fragmented_hello),
        cmocka_unit_test(test_rfc_ping_pong),
        cmocka_unit_test(test_rfc_len_126_and_127),
        cmocka_unit_test(test_non_minimal_length_accepted),
        cmocka_unit_test(test_bytewise_feeding),
        cmocka_unit_test(test_need_values),
        cmocka_unit_test(test_multiple_frames_in_buffer),
        cmocka_unit_test(test_err_rsv_bits),
        cmocka_unit_test(test_err_reserved_opcodes),
        cmocka_unit_test(test_err_control_frames),
        cmocka_unit_test(test_err_continuation_state),
        cmocka_unit_test(test_err_unmasked),
        cmocka_unit_test(test_err_64bit_msb),
        cmocka_unit_test(test_max_msg_single_frame),
        cmocka_unit_test(test_max_msg_across_fragments),
        cmocka_unit_test(test_text_utf8_valid),
        cmocka_unit_test(test_text_utf8_invalid),
        cmocka_unit_test(test_text_utf8_split_across_fragments),
        cmocka_unit_test(test_text_utf8_fragment_errors),
        cmocka_unit_test(test_interleaved_control),
        cmocka_unit_test(test_binary_fragments),
        cmocka_unit_test(test_close_parsing),
        cmocka_unit_test(test_close_codes),
        cmocka_unit_test(test_close_errors),
        cmocka_unit_test(test_write_header),
        cmocka_unit_test(test_write_header_roundtrip),
        cmocka_unit_test(test_write_close),
        cmocka_unit_test(test_utf8_exhaustive_short),
        cmocka_unit_test(test_utf8_four_byte),
        cmocka_unit_test(test_utf8_incremental),
        cmocka_unit_test(test_utf8_fast_path_positions),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
