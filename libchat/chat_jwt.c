/*
 * chat_jwt.c - HS256 JWT verification and signing.  See chat_jwt.h.
 */
#include "chat_jwt.h"
#include "chat_json.h"
#include "chat_proto.h"

#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#define JWT_SIG_LEN     32
#define JWT_SIG_B64LEN  43              /* chat_jwt_b64url_len(32) */
#define JWT_MAX_TOKENS  256
#define JWT_MAX_DEPTH   8

static const char b64url_alpha[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* value + 1 for the 64 alphabet characters, 0 for everything else */
static const unsigned char b64url_val1[256] = {
    ['A'] = 1, ['B'] = 2, ['C'] = 3, ['D'] = 4, ['E'] = 5, ['F'] = 6,
    ['G'] = 7, ['H'] = 8, ['I'] = 9, ['J'] = 10, ['K'] = 11, ['L'] = 12,
    ['M'] = 13, ['N'] = 14, ['O'] = 15, ['P'] = 16, ['Q'] = 17, ['R'] = 18,
    ['S'] = 19, ['T'] = 20, ['U'] = 21, ['V'] = 22, ['W'] = 23, ['X'] = 24,
    ['Y'] = 25, ['Z'] = 26, ['a'] = 27, ['b'] = 28, ['c'] = 29, ['d'] = 30,
    ['e'] = 31, ['f'] = 32, ['g'] = 33, ['h'] = 34, ['i'] = 35, ['j'] = 36,
    ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40, ['o'] = 41, ['p'] = 42,
    ['q'] = 43, ['r'] = 44, ['s'] = 45, ['t'] = 46, ['u'] = 47, ['v'] = 48,
    ['w'] = 49, ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54,
    ['2'] = 55, ['3'] = 56, ['4'] = 57, ['5'] = 58, ['6'] = 59, ['7'] = 60,
    ['8'] = 61, ['9'] = 62, ['-'] = 63, ['_'] = 64,
};

size_t
chat_jwt_b64url_encode(char *out, const unsigned char *in, size_t n)
{
    size_t   i, o = 0;
    uint32_t v;

    for (i = 0; i + 3 <= n; i += 3) {
        v = ((uint32_t) in[i] << 16) | ((uint32_t) in[i + 1] << 8) | in[i + 2];
        out[o++] = b64url_alpha[v >> 18];
        out[o++] = b64url_alpha[(v >> 12) & 63];
        out[o++] = b64url_alpha[(v >> 6) & 63];
        out[o++] = b64url_alpha[v & 63];
    }
    if (n - i == 1) {
        v = (uint32_t) in[i] << 16;
        out[o++] = b64url_alpha[v >> 18];
        out[o++] = b64url_alpha[(v >> 12) & 63];
    } else if (n - i == 2) {
        v = ((uint32_t) in[i] << 16) | ((uint32_t) in[i + 1] << 8);
        out[o++] = b64url_alpha[v >> 18];
        out[o++] = b64url_alpha[(v >> 12) & 63];
        out[o++] = b64url_alpha[(v >> 6) & 63];
    }
    return o;
}

int
chat_jwt_b64url_decode(unsigned char *out, size_t cap, const char *in,
    size_t n, size_t *outlen)
{
    const unsigned char *s = (const unsigned char *) in;
    size_t               i, o = 0, rem = n % 4, need;
    uint32_t             v;
    unsigned             a, b, c, d;

    if (rem == 1) {
        return -1;
    }
    need = n / 4 * 3 + (rem ? rem - 1 : 0);
    if (need > cap) {
        return -1;
    }

    for (i = 0; i + 4 <= n; i += 4) {
        a = b64url_val1[s[i]];
        b = b64url_val1[s[i + 1]];
        c = b64url_val1[s[i + 2]];
        d = b64url_val1[s[i + 3]];
        if (!a || !b || !c || !d) {
            return -1;
        }
        a--; b--; c--; d--;
        v = (a << 18) | (b << 12) | (c << 6) | d;
        out[o++] = (unsigned char) (v >> 16);
        out[o++] = (unsigned char) (v >> 8);
        out[o++] = (unsigned char) v;
    }

    if (rem) {
        a = b64url_val1[s[i]];
        b = b64url_val1[s[i + 1]];
        c = (rem == 3) ? b64url_val1[s[i + 2]] : 1;
        if (!a || !b || !c) {
            return -1;
        }
        a--; b--; c--;
        if (rem == 2) {
            if (b & 0x0F) {
                return -1;              /* not canonical */
            }
            out[o++] = (unsigned char) ((a << 2) | (b >> 4));
        } else {
            if (c & 0x03) {
                return -1;
            }
            v = (a << 18) | (b << 12) | (c << 6);
            out[o++] = (unsigned char) (v >> 16);
            out[o++] = (unsigned char) (v >> 8);
        }
    }

    *outlen = o;
    return 0;
}

static int
ascii_ieq(const char *a, size_t n, const char *lit)
{
    size_t i;

    if (strlen(lit) != n) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        unsigned x = (unsigned char) a[i], y = (unsigned char) lit[i];

        if (x - 'A' < 26u) {
            x |= 0x20;
        }
        if (y - 'A' < 26u) {
            y |= 0x20;
        }
        if (x != y) {
            return 0;
        }
    }
    return 1;
}

static int64_t
sat_add(int64_t a, int64_t b)
{
    /* b >= 0 */
    return (a > INT64_MAX - b) ? INT64_MAX : a + b;
}

static int
hmac_sha256(const unsigned char *key, size_t klen, const void *data,
    size_t n, unsigned char md[JWT_SIG_LEN])
{
    unsigned int mdlen = 0;

    if (klen == 0 || klen > INT_MAX) {
        return -1;
    }
    if (HMAC(EVP_sha256(), key, (int) klen, data, n, md, &mdlen) == NULL
        || mdlen != JWT_SIG_LEN)
    {
        return -1;
    }
    return 0;
}

chat_jwt_rc_t
chat_jwt_verify(const char *token, size_t len, const unsigned char *secret,
    size_t slen, int64_t now, int64_t leeway, chat_jwt_claims_t *out)
{
    /* every decoded part fits: 3/4 of at most CHAT_JWT_MAX_LEN bytes */
    unsigned char     buf[CHAT_JWT_MAX_LEN / 4 * 3];
    unsigned char     mac[JWT_SIG_LEN];
    chat_json_tok_t   tok[JWT_MAX_TOKENS];
    chat_json_doc_t   doc;
    chat_jwt_claims_t c;
    const char       *dot1, *dot2;
    size_t            hlen, plen, siglen, n;
    unsigned char    *hdr, *pay, *sig;
    int               i_alg, i_typ, i_sub, i_exp, i_nbf, i_dev;
    int64_t           nbf = 0;
    int               ok;

    if (token == NULL || len == 0 || len > CHAT_JWT_MAX_LEN) {
        return CHAT_JWT_MALFORMED;
    }
    if (leeway < 0) {
        leeway = 0;
    }

    /* 1. structure */
    dot1 = memchr(token, '.', len);
    if (dot1 == NULL) {
        return CHAT_JWT_MALFORMED;
    }
    dot2 = memchr(dot1 + 1, '.', len - (size_t) (dot1 + 1 - token));
    if (dot2 == NULL
        || memchr(dot2 + 1, '.', len - (size_t) (dot2 + 1 - token)) != NULL
        || dot1 == token || dot2 == dot1 + 1)
    {
        return CHAT_JWT_MALFORMED;
    }

    hdr = buf;
    if (chat_jwt_b64url_decode(hdr, sizeof(buf), token,
                               (size_t) (dot1 - token), &hlen) != 0)
    {
        return CHAT_JWT_MALFORMED;
    }
    pay = hdr + hlen;
    if (chat_jwt_b64url_decode(pay, sizeof(buf) - hlen, dot1 + 1,
                               (size_t) (dot2 - dot1 - 1), &plen) != 0)
    {
        return CHAT_JWT_MALFORMED;
    }
    sig = pay + plen;
    if (chat_jwt_b64url_decode(sig, sizeof(buf) - hlen - plen, dot2 + 1,
                               len - (size_t) (dot2 + 1 - token), &siglen) != 0)
    {
        return CHAT_JWT_MALFORMED;
    }

    if (chat_json_parse(&doc, (const char *) hdr, hlen, tok, JWT_MAX_TOKENS,
                        JWT_MAX_DEPTH) != CHAT_JSON_OK
        || tok[0].type != CHAT_JSON_OBJECT)
    {
        return CHAT_JWT_MALFORMED;
    }

    i_typ = chat_json_obj_get(&doc, 0, "typ", 3);
    if (i_typ >= 0) {
        char   typ[8];

        if (chat_json_get_str(&doc, (unsigned) i_typ, typ, sizeof(typ), &n)
            != CHAT_JSON_OK
            || !ascii_ieq(typ, n, "JWT"))
        {
            return CHAT_JWT_MALFORMED;
        }
    }
    if (chat_json_obj_get(&doc, 0, "crit", 4) >= 0) {
        return CHAT_JWT_MALFORMED;
    }

    /* 2. algorithm */
    i_alg = chat_json_obj_get(&doc, 0, "alg", 3);
    if (i_alg < 0 || !chat_json_str_eq(&doc, (unsigned) i_alg, "HS256", 5)) {
        return CHAT_JWT_BAD_ALG;
    }

    /* 3. signature, before anything in the payload is looked at */
    if (hmac_sha256(secret, slen, token, (size_t) (dot2 - token), mac) != 0) {
        return CHAT_JWT_INTERNAL;
    }
    if (siglen != JWT_SIG_LEN) {
        OPENSSL_cleanse(mac, sizeof(mac));
        return CHAT_JWT_BAD_SIGNATURE;
    }
    ok = CRYPTO_memcmp(mac, sig, JWT_SIG_LEN) == 0;
    OPENSSL_cleanse(mac, sizeof(mac));
    if (!ok) {
        return CHAT_JWT_BAD_SIGNATURE;
    }

    /* 4. payload */
    if (chat_json_parse(&doc, (const char *) pay, plen, tok, JWT_MAX_TOKENS,
                        JWT_MAX_DEPTH) != CHAT_JSON_OK
        || tok[0].type != CHAT_JSON_OBJECT)
    {
        return CHAT_JWT_MALFORMED;
    }

    /* 5. presence */
    i_sub = chat_json_obj_get(&doc, 0, "sub", 3);
    i_exp = chat_json_obj_get(&doc, 0, "exp", 3);
    if (i_sub < 0 || i_exp < 0) {
        return CHAT_JWT_MISSING_CLAIM;
    }

    /* 6. types and values */
    memset(&c, 0, sizeof(c));
    if (chat_json_get_str(&doc, (unsigned) i_sub, c.sub, sizeof(c.sub), &n)
        != CHAT_JSON_OK
        || !chat_id_valid(c.sub, n, CHAT_JWT_SUB_MAX))
    {
        return CHAT_JWT_BAD_CLAIM;
    }
    c.sub_len = (uint8_t) n;

    if (chat_json_get_int64(&doc, (unsigned) i_exp, &c.exp) != CHAT_JSON_OK) {
        return CHAT_JWT_BAD_CLAIM;
    }

    i_nbf = chat_json_obj_get(&doc, 0, "nbf", 3);
    if (i_nbf >= 0
        && chat_json_get_int64(&doc, (unsigned) i_nbf, &nbf) != CHAT_JSON_OK)
    {
        return CHAT_JWT_BAD_CLAIM;
    }

    i_dev = chat_json_obj_get(&doc, 0, "dev", 3);
    if (i_dev >= 0) {
        if (chat_json_get_str(&doc, (unsigned) i_dev, c.dev, sizeof(c.dev), &n)
            != CHAT_JSON_OK
            || !chat_id_valid(c.dev, n, CHAT_JWT_DEV_MAX))
        {
            return CHAT_JWT_BAD_CLAIM;
        }
        c.dev_len = (uint8_t) n;
    } else {
        memcpy(c.dev, CHAT_JWT_DEFAULT_DEV, sizeof(CHAT_JWT_DEFAULT_DEV));
        c.dev_len = sizeof(CHAT_JWT_DEFAULT_DEV) - 1;
    }

    /* 7, 8. time */
    if (now >= sat_add(c.exp, leeway)) {
        return CHAT_JWT_EXPIRED;
    }
    if (i_nbf >= 0 && sat_add(now, leeway) < nbf) {
        return CHAT_JWT_NOT_YET_VALID;
    }

    if (out) {
        *out = c;
    }
    return CHAT_JWT_OK;
}

const char *
chat_jwt_strerror(chat_jwt_rc_t rc)
{
    switch (rc) {
    case CHAT_JWT_OK:            return "ok";
    case CHAT_JWT_MALFORMED:     return "malformed token";
    case CHAT_JWT_BAD_ALG:       return "unsupported token algorithm";
    case CHAT_JWT_BAD_SIGNATURE: return "bad token signature";
    case CHAT_JWT_EXPIRED:       return "token expired";
    case CHAT_JWT_NOT_YET_VALID: return "token not yet valid";
    case CHAT_JWT_MISSING_CLAIM: return "token claim missing";
    case CHAT_JWT_BAD_CLAIM:     return "invalid token claim";
    case CHAT_JWT_INTERNAL:      return "token verification failed";
    }
    return "unknown error";
}

size_t
chat_jwt_sign_hs256(const char *header, size_t hlen, const char *payload,
    size_t plen, const unsigned char *secret, size_t slen, char *out,
    size_t outcap)
{
    static const char def_hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    unsigned char     mac[JWT_SIG_LEN];
    size_t            need, o;

    if (header == NULL) {
        header = def_hdr;
        hlen = sizeof(def_hdr) - 1;
    }
    if (hlen > SIZE_MAX / 2 || plen > SIZE_MAX / 2) {
        return 0;
    }
    need = chat_jwt_b64url_len(hlen) + 1 + chat_jwt_b64url_len(plen) + 1
           + JWT_SIG_B64LEN + 1;
    if (out == NULL || outcap < need) {
        return 0;
    }

    o = chat_jwt_b64url_encode(out, (const unsigned char *) header, hlen);
    out[o++] = '.';
    o += chat_jwt_b64url_encode(out + o, (const unsigned char *) payload, plen);
    if (hmac_sha256(secret, slen, out, o, mac) != 0) {
        return 0;
    }
    out[o++] = '.';
    o += chat_jwt_b64url_encode(out + o, mac, sizeof(mac));
    OPENSSL_cleanse(mac, sizeof(mac));
    out[o] = '\0';
    return o;
}

size_t
chat_jwt_issue(const char *sub, const char *dev, int64_t iat, int64_t exp,
    const unsigned char *secret, size_t slen, char *out, size_t outcap)
{
    char          buf[256];
    chat_json_w_t w;

    if (sub == NULL || !chat_id_valid(sub, strlen(sub), CHAT_JWT_SUB_MAX)) {
        return 0;
    }
    if (dev && !chat_id_valid(dev, strlen(dev), CHAT_JWT_DEV_MAX)) {
        return 0;
    }

    chat_json_w_init(&w, buf, sizeof(buf));
    chat_json_w_cstr(&w, "{\"sub\":");
    chat_json_w_str(&w, sub, strlen(sub));
    if (dev) {
        chat_json_w_cstr(&w, ",\"dev\":");
        chat_json_w_str(&w, dev, strlen(dev));
    }
    if (iat >= 0) {
        chat_json_w_cstr(&w, ",\"iat\":");
        chat_json_w_int(&w, iat);
    }
    chat_json_w_cstr(&w, ",\"exp\":");
    chat_json_w_int(&w, exp);
    chat_json_w_cstr(&w, "}");
    if (w.overflow) {
        return 0;
    }
    return chat_jwt_sign_hs256(NULL, 0, buf, w.len, secret, slen, out, outcap);
}
