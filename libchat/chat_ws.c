/*
 * chat_ws.c - RFC 6455 server-side codec for ngx-chat.  See chat_ws.h.
 *
 * Pure C11 + libc + libcrypto.  No allocation on the frame path.
 */
#include "chat_ws.h"

#include <string.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

/* ====================================================================== */
/* UTF-8 DFA                                                              */
/* ====================================================================== */

/*
 * Byte classes derived from Unicode Table 3-7 (well-formed UTF-8):
 *   0: 00..7F           1: 80..8F          2: 90..9F          3: A0..BF
 *   4: C0 C1 F5..FF (never valid)          5: C2..DF (2-byte lead)
 *   6: E0               7: E1..EC EE EF    8: ED
 *   9: F0              10: F1..F3         11: F4
 * Splitting the continuation range into 80..8F / 90..9F / A0..BF lets the
 * byte after a lead be restricted exactly as Table 3-7 requires:
 *   E0 -> A0..BF (no overlong 3-byte forms)
 *   ED -> 80..9F (no surrogates U+D800..DFFF)
 *   F0 -> 90..BF (no overlong 4-byte forms)
 *   F4 -> 80..8F (nothing above U+10FFFF)
 * C0/C1 (overlong 2-byte) and F5..FF (> U+10FFFF) can never appear.
 */
static const unsigned char utf8_class[256] = {
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 00..0F */
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 10..1F */
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 20..2F */
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 30..3F */
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 40..4F */
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 50..5F */
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 60..6F */
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 70..7F */
     1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 80..8F */
     2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 90..9F */
     3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, /* A0..AF */
     3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, /* B0..BF */
     4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, /* C0..CF */
     5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, /* D0..DF */
     6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 7, /* E0..EF */
     9,10,10,10,11, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, /* F0..FF */
};

/*
 * States:
 *   0 ACCEPT   at a code point boundary
 *   1          need 1 more continuation (80..BF)
 *   2          need 2 more continuations
 *   3          after E0: need A0..BF, then 1 more
 *   4          after ED: need 80..9F, then 1 more
 *   5          need 3 more continuations (after F1..F3)
 *   6          after F0: need 90..BF, then 2 more
 *   7          after F4: need 80..8F, then 2 more
 *   8 REJECT   sticky
 */
#define U8_ACCEPT 0
#define U8_REJECT 8
#define R U8_REJECT
static const unsigned char utf8_trans[9][12] = {
    /*        00 80 90 A0 bad C2 E0 E1 ED F0 F1 F4 */
    /* 0 */ {  0, R, R, R, R,  1, 3, 2, 4, 6, 5, 7 },
    /* 1 */ {  R, 0, 0, 0, R,  R, R, R, R, R, R, R },
    /* 2 */ {  R, 1, 1, 1, R,  R, R, R, R, R, R, R },
    /* 3 */ {  R, R, R, 1, R,  R, R, R, R, R, R, R },
    /* 4 */ {  R, 1, 1, R, R,  R, R, R, R, R, R, R },
    /* 5 */ {  R, 2, 2, 2, R,  R, R, R, R, R, R, R },
    /* 6 */ {  R, R, 2, 2, R,  R, R, R, R, R, R, R },
    /* 7 */ {  R, 2, R, R, R,  R, R, R, R, R, R, R },
    /* 8 */ {  R, R, R, R, R,  R, R, R, R, R, R, R },
};
#undef R

#define ASCII_MASK8 0x8080808080808080ULL

int chat_utf8_feed(uint32_t *state, const unsigned char *p, size_t n)
{
    uint32_t             s = *state;
    const unsigned char *end;

    if (s > U8_REJECT) {
        s = U8_REJECT;              /* garbage state: fail closed */
    }

    if (n != 0) {
        end = p + n;

        while (p < end && s != U8_REJECT) {
            if (s == U8_ACCEPT) {
                /* fast path: skip 8 ASCII bytes at a time */
                while ((size_t) (end - p) >= 8) {
                    uint64_t w;
                    memcpy(&w, p, 8);
                    if (w & ASCII_MASK8) {
                        break;
                    }
                    p += 8;
                }
                /* then plain ASCII bytes one by one */
                while (p < end && *p < 0x80) {
                    p++;
                }
                if (p == end) {
                    break;
                }
            }
            s = utf8_trans[s][utf8_class[*p++]];
        }
    }

    *state = s;

    if (s == U8_ACCEPT) {
        return CHAT_UTF8_ACCEPT;
    }
    return s == U8_REJECT ? CHAT_UTF8_REJECT : CHAT_UTF8_INCOMPLETE;
}

int chat_utf8_complete(uint32_t state)
{
    return state == U8_ACCEPT;
}

int chat_utf8_valid(const unsigned char *p, size_t n)
{
    uint32_t s = CHAT_UTF8_INIT;

    return chat_utf8_feed(&s, p, n) == CHAT_UTF8_ACCEPT;
}

/* ====================================================================== */
/* Handshake helpers                                                      */
/* ====================================================================== */

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int b64_is_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
           || (c >= '0' && c <= '9') || c == '+' || c == '/';
}

int chat_ws_key_valid(const char *key, size_t len)
{
    size_t i;

    /* 16 bytes = 5 full 3-byte groups (20 chars) + 1 byte (2 chars + "==") */
    if (key == NULL || len != 24 || key[22] != '=' || key[23] != '=') {
        return 0;
    }
    for (i = 0; i < 22; i++) {
        if (!b64_is_char((unsigned char) key[i])) {
            return 0;
        }
    }
    return 1;
}

#define WS_GUID      "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define WS_GUID_LEN  (sizeof(WS_GUID) - 1)

void chat_ws_accept(const char *key, size_t len, char out[CHAT_WS_ACCEPT_LEN])
{
    unsigned char  md[SHA_DIGEST_LENGTH];
    unsigned char  tmp[128];
    size_t         i, o;

    if (len <= sizeof(tmp) - WS_GUID_LEN) {
        /* normal case (24-byte key): one-shot on the stack */
        if (len) {
            memcpy(tmp, key, len);
        }
        memcpy(tmp + len, WS_GUID, WS_GUID_LEN);
        SHA1(tmp, len + WS_GUID_LEN, md);

    } else {
        /* oversized key: stream it (only reachable if the caller skipped
         * chat_ws_key_valid); on failure emit an accept that cannot match */
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        int ok = c != NULL
                 && EVP_DigestInit_ex(c, EVP_sha1(), NULL)
                 && EVP_DigestUpdate(c, key, len)
                 && EVP_DigestUpdate(c, WS_GUID, WS_GUID_LEN)
                 && EVP_DigestFinal_ex(c, md, NULL);
        EVP_MD_CTX_free(c);
        if (!ok) {
            memset(md, 0, sizeof(md));
        }
    }

    /* base64: 20 bytes = 6 groups of 3 (24 chars) + 2 bytes (3 chars + '=') */
    for (i = 0, o = 0; i + 3 <= SHA_DIGEST_LENGTH; i += 3) {
        uint32_t v = ((uint32_t) md[i] << 16) | ((uint32_t) md[i + 1] << 8)
                     | md[i + 2];
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = b64_alphabet[v & 63];
    }
    {
        uint32_t v = ((uint32_t) md[18] << 16) | ((uint32_t) md[19] << 8);
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o] = '=';
    }
}

static unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char) (c + 32) : c;
}

int chat_ws_header_has_token(const char *v, size_t len, const char *token)
{
    size_t i = 0, s, e, k, tlen;

    if (token == NULL || (tlen = strlen(token)) == 0 || v == NULL) {
        return 0;
    }

    for (;;) {
        s = i;
        while (i < len && v[i] != ',') {
            i++;
        }
        e = i;
        while (s < e && (v[s] == ' ' || v[s] == '\t')) {
            s++;
        }
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) {
            e--;
        }
        if (e - s == tlen) {
            for (k = 0; k < tlen; k++) {
                if (ascii_lower((unsigned char) v[s + k])
                    != ascii_lower((unsigned char) token[k]))
                {
                    break;
                }
            }
            if (k == tlen) {
                return 1;
            }
        }
        if (i >= len) {
            return 0;
        }
        i++;                        /* skip ',' */
    }
}

/* ====================================================================== */
/* Frame reader                                                           */
/* ====================================================================== */

/*
 * Wire format (RFC 6455 section 5.2):
 *   byte 0: FIN RSV1 RSV2 RSV3 opcode(4)
 *   byte 1: MASK len7
 *   len7 == 126: 16-bit big-endian length follows
 *   len7 == 127: 64-bit big-endian length follows (MSB must be 0)
 *   4-byte masking key if MASK (always, for client frames)
 *   payload, octet i XORed with key[i % 4]
 */

static ssize_t ws_fail(chat_ws_event_t *ev, unsigned code)
{
    ev->kind = CHAT_WS_EV_ERROR;
    ev->code = code;
    return -1;
}

/* Close codes a peer may put on the wire (RFC 6455 7.4.1/7.4.2 + IANA
 * registry: 1012-1014 are registered; 1004-1006 and 1015 are reserved /
 * never sent; 1016-2999 reserved for future RFCs; 3000-4999 for
 * libraries/applications). */
static int ws_close_code_ok(unsigned c)
{
    if (c >= 3000 && c <= 4999) {
        return 1;
    }
    return (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014);
}

/* XOR-unmask p[0..n) in place with key; key index restarts at p[0]. */
static void ws_unmask(unsigned char *p, size_t n, const unsigned char key[4])
{
    unsigned char k8[8];
    uint64_t      k, w;
    size_t        i = 0;

    memcpy(k8, key, 4);
    memcpy(k8 + 4, key, 4);
    memcpy(&k, k8, 8);              /* same byte order as the data loads */

    for (; n - i >= 8; i += 8) {
        memcpy(&w, p + i, 8);
        w ^= k;
        memcpy(p + i, &w, 8);
    }
    for (; i < n; i++) {
        p[i] ^= key[i & 3];         /* word loop kept i % 4 aligned */
    }
}

ssize_t chat_ws_read_frame(chat_ws_reader_t *r, unsigned char *buf, size_t len,
                           uint64_t max_msg, chat_ws_event_t *ev)
{
    unsigned       b0, b1, op, fin, control, msg_op;
    size_t         hdr, i;
    uint64_t       plen, so_far = 0;
    unsigned char *payload;

    ev->kind = CHAT_WS_EV_NONE;
    ev->fin = 0;
    ev->code = 0;
    ev->payload = NULL;
    ev->len = 0;
    ev->need = 2;

    if (len < 1) {
        return 0;
    }

    /* ---- byte 0: everything checkable from it is checked right away ---- */

    b0 = buf[0];
    fin = b0 >> 7;
    op = b0 & 0x0F;

    if (b0 & 0x70) {
        return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);  /* RSV, no ext */
    }

    switch (op) {
    case CHAT_WS_OP_CONT:
        if (!r->in_msg) {
            return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
        }
        so_far = r->msg_len;
        break;
    case CHAT_WS_OP_TEXT:
    case CHAT_WS_OP_BINARY:
        if (r->in_msg) {
            /* 5.4: fragments of one message may not be interleaved with
             * another data message */
            return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
        }
        break;
    case CHAT_WS_OP_CLOSE:
    case CHAT_WS_OP_PING:
    case CHAT_WS_OP_PONG:
        if (!fin) {
            /* 5.5: control frames MUST NOT be fragmented */
            return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
        }
        break;
    default:
        return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);  /* reserved */
    }
    control = op & 0x8;

    if (len < 2) {
        return 0;
    }

    /* ---- byte 1: mask bit + 7-bit length ---- */

    b1 = buf[1];
    if (!(b1 & 0x80)) {
        /* 5.1: a server MUST close on an unmasked client frame */
        return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
    }
    plen = b1 & 0x7F;
    if (control && plen > CHAT_WS_MAX_CONTROL) {
        return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
    }

    hdr = 2;
    if (plen == 126) {
        hdr = 4;
    } else if (plen == 127) {
        hdr = 10;
        if (len >= 3 && (buf[2] & 0x80)) {
            /* 5.2: the most significant bit MUST be 0 */
            return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
        }
    }

    if (len < hdr) {
        ev->need = hdr + 4;
        return 0;
    }

    /* Extended lengths.  Non-minimal encodings are accepted (see header). */
    if (hdr == 4) {
        plen = ((uint64_t) buf[2] << 8) | buf[3];
    } else if (hdr == 10) {
        plen = 0;
        for (i = 2; i < 10; i++) {
            plen = (plen << 8) | buf[i];
        }
    }

    /* message size limit, over all fragments (so_far <= max_msg holds by
     * induction, the subtraction cannot wrap) */
    if (!control && (so_far > max_msg || plen > max_msg - so_far)) {
        return ws_fail(ev, CHAT_WS_CLOSE_TOO_BIG);
    }

    hdr += 4;                       /* masking key */

    /* plen < 2^63 and hdr <= 14: the sum cannot overflow */
    if (len < hdr || plen > (uint64_t) (len - hdr)) {
        ev->need = (uint64_t) hdr + plen;
        return 0;
    }

    /* ---- complete frame: unmask in place, then validate payload ---- */

    payload = buf + hdr;
    ws_unmask(payload, (size_t) plen, buf + hdr - 4);

    ev->payload = payload;
    ev->len = (size_t) plen;

    switch (op) {
    case CHAT_WS_OP_PING:
        ev->kind = CHAT_WS_EV_PING;
        break;

    case CHAT_WS_OP_PONG:
        ev->kind = CHAT_WS_EV_PONG;
        break;

    case CHAT_WS_OP_CLOSE:
        if (plen == 0) {
            ev->code = CHAT_WS_CLOSE_NO_STATUS;
        } else if (plen == 1) {
            /* 5.5.1: if there is a body, its first two bytes are a code */
            return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
        } else {
            ev->code = ((unsigned) payload[0] << 8) | payload[1];
            if (!ws_close_code_ok(ev->code)) {
                return ws_fail(ev, CHAT_WS_CLOSE_PROTOCOL_ERROR);
            }
            ev->payload = payload + 2;
            ev->len = (size_t) plen - 2;
            if (!chat_utf8_valid(ev->payload, ev->len)) {
                return ws_fail(ev, CHAT_WS_CLOSE_INVALID_DATA);
            }
        }
        ev->kind = CHAT_WS_EV_CLOSE;
        break;

    default: {                      /* TEXT, BINARY, CONT */
        uint32_t st = 0;

        msg_op = (op == CHAT_WS_OP_CONT) ? r->msg_opcode : op;

        if (msg_op == CHAT_WS_OP_TEXT) {
            int res;

            if (op == CHAT_WS_OP_CONT) {
                st = r->utf8_state;  /* a code point may span fragments */
            }
            res = chat_utf8_feed(&st, payload, (size_t) plen);
            if (res == CHAT_UTF8_REJECT
                || (fin && res != CHAT_UTF8_ACCEPT))
            {
                /* 8.1: invalid UTF-8 (incl. a sequence left open by the
                 * final fragment) -> fail with 1007 */
                return ws_fail(ev, CHAT_WS_CLOSE_INVALID_DATA);
            }
            ev->kind = CHAT_WS_EV_TEXT;
        } else {
            ev->kind = CHAT_WS_EV_BINARY;
        }
        ev->fin = (int) fin;

        if (fin) {
            r->msg_len = 0;
            r->utf8_state = 0;
            r->in_msg = 0;
            r->msg_opcode = 0;
        } else {
            r->msg_len = so_far + plen;
            r->utf8_state = st;
            r->in_msg = 1;
            r->msg_opcode = (uint8_t) msg_op;
        }
        break;
    }
    }

    return (ssize_t) (hdr + (size_t) plen);
}

/* ====================================================================== */
/* Writer                                                                 */
/* ====================================================================== */

size_t chat_ws_write_header(unsigned char out[CHAT_WS_MAX_SERVER_HDR],
                            unsigned opcode, int fin, uint64_t len)
{
    int i;

    out[0] = (unsigned char) ((fin ? 0x80 : 0) | (opcode & 0x0F));

    if (len <= 125) {
        out[1] = (unsigned char) len;
        return 2;
    }
    if (len <= 0xFFFF) {
        out[1] = 126;
        out[2] = (unsigned char) (len >> 8);
        out[3] = (unsigned char) len;
        return 4;
    }
    out[1] = 127;
    for (i = 0; i < 8; i++) {
        out[2 + i] = (unsigned char) (len >> (56 - 8 * i));
    }
    return 10;
}

size_t chat_ws_write_close(unsigned char *out, unsigned code,
                           const char *reason, size_t rlen)
{
    const unsigned char *p = (const unsigned char *) reason;
    uint32_t             s = U8_ACCEPT;
    size_t               i, cut = 0;

    out[0] = 0x80 | CHAT_WS_OP_CLOSE;

    if (code == 0 || code == CHAT_WS_CLOSE_NO_STATUS) {
        out[1] = 0;                 /* 1005 must never be sent: empty body */
        return 2;
    }

    if (p == NULL) {
        rlen = 0;
    }
    if (rlen > CHAT_WS_MAX_CONTROL - 2) {
        rlen = CHAT_WS_MAX_CONTROL - 2;
    }
    /* longest prefix ending on a code point boundary while still valid */
    for (i = 0; i < rlen; i++) {
        s = utf8_trans[s][utf8_class[p[i]]];
        if (s == U8_REJECT) {
            break;
        }
        if (s == U8_ACCEPT) {
            cut = i + 1;
        }
    }

    out[1] = (unsigned char) (2 + cut);
    out[2] = (unsigned char) (code >> 8);
    out[3] = (unsigned char) code;
    if (cut) {
        memcpy(out + 4, p, cut);
    }
    return 4 + cut;
}
