/*
 * libFuzzer target for chat_jwt.  Modes, chosen by the first byte:
 *   0: the rest is a token, verified as it is;
 *   1: the rest is a payload, signed with the default header, verified;
 *   2: the rest is a header, signed over a fixed payload, verified;
 *   3: base64url: decode then encode gives the input back.
 * Aborts when an invariant does not hold.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat_jwt.h"
#include "chat_proto.h"

#define CHECK(c)  do { if (!(c)) abort(); } while (0)

static const unsigned char secret[] = "fuzz-secret";
#define SLEN    (sizeof(secret) - 1)
#define NOW     1700000000LL

static void
check_claims(chat_jwt_rc_t rc, const chat_jwt_claims_t *c)
{
    CHECK(chat_jwt_strerror(rc) != NULL);
    if (rc != CHAT_JWT_OK) {
        return;
    }
    CHECK(c->sub_len == strlen(c->sub));
    CHECK(chat_id_valid(c->sub, c->sub_len, CHAT_JWT_SUB_MAX));
    CHECK(c->dev_len == strlen(c->dev));
    CHECK(chat_id_valid(c->dev, c->dev_len, CHAT_JWT_DEV_MAX));
    CHECK(c->exp > NOW - 60);
}

/* after a good verify: any single changed signature character fails */
static void
check_tamper(char *tok, size_t n, unsigned pick)
{
    char             *d1 = memchr(tok, '.', n);
    char             *sig;
    size_t            sl, i;
    char              old;
    chat_jwt_claims_t c;

    sig = (char *) memchr(d1 + 1, '.', n - (size_t) (d1 + 1 - tok)) + 1;
    sl = n - (size_t) (sig - tok);
    i = pick % sl;
    old = sig[i];

    sig[i] = (char) (old == 'A' ? 'B' : 'A');
    CHECK(chat_jwt_verify(tok, n, secret, SLEN, NOW, 60, &c) != CHAT_JWT_OK);
    sig[i] = old;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char       tok[3 * CHAT_JWT_MAX_LEN];
    static unsigned char dec[CHAT_JWT_MAX_LEN];
    static char       enc[2 * CHAT_JWT_MAX_LEN];
    static const char pay[] = "{\"sub\":\"alice\",\"exp\":4102444800}";
    chat_jwt_claims_t c;
    chat_jwt_rc_t     rc;
    size_t            n, dn;
    const char       *in = (const char *) data + 1;

    if (size == 0 || size > 2 * CHAT_JWT_MAX_LEN) {
        return 0;
    }
    size--;

    switch (data[0] & 3) {

    case 0:
        memset(&c, 0, sizeof(c));
        rc = chat_jwt_verify(in, size, secret, SLEN, NOW, 60, &c);
        check_claims(rc, &c);
        if (size > CHAT_JWT_MAX_LEN) {
            CHECK(rc == CHAT_JWT_MALFORMED);
        }
        break;

    case 1:
        n = chat_jwt_sign_hs256(NULL, 0, in, size, secret, SLEN, tok,
                                sizeof(tok));
        CHECK(n > 0 && n < sizeof(tok) && tok[n] == '\0');
        memset(&c, 0, sizeof(c));
        rc = chat_jwt_verify(tok, n, secret, SLEN, NOW, 60, &c);
        check_claims(rc, &c);
        if (n > CHAT_JWT_MAX_LEN) {
            CHECK(rc == CHAT_JWT_MALFORMED);
        } else {
            /* header and signature are right: only the payload can fail */
            CHECK(rc != CHAT_JWT_BAD_ALG && rc != CHAT_JWT_BAD_SIGNATURE
                  && rc != CHAT_JWT_INTERNAL);
        }
        if (rc == CHAT_JWT_OK) {
            check_tamper(tok, n, size);
            CHECK(chat_jwt_verify(tok, n, (const unsigned char *) "other", 5,
                                  NOW, 60, &c) == CHAT_JWT_BAD_SIGNATURE);
        }
        break;

    case 2:
        n = chat_jwt_sign_hs256(in, size, pay, sizeof(pay) - 1, secret, SLEN,
                                tok, sizeof(tok));
        CHECK(n > 0);
        memset(&c, 0, sizeof(c));
        rc = chat_jwt_verify(tok, n, secret, SLEN, NOW, 60, &c);
        check_claims(rc, &c);
        CHECK(rc == CHAT_JWT_OK || rc == CHAT_JWT_MALFORMED
              || rc == CHAT_JWT_BAD_ALG);
        if (rc == CHAT_JWT_OK) {
            CHECK(strcmp(c.sub, "alice") == 0);
            check_tamper(tok, n, size);
        }
        break;

    case 3:
        if (chat_jwt_b64url_decode(dec, sizeof(dec), in, size, &dn) == 0) {
            CHECK(dn <= size);
            n = chat_jwt_b64url_encode(enc, dec, dn);
            CHECK(n == size && memcmp(enc, in, size) == 0);
        }
        if (size <= sizeof(dec)) {
            n = chat_jwt_b64url_encode(enc, data + 1, size);
            CHECK(n == chat_jwt_b64url_len(size));
            CHECK(chat_jwt_b64url_decode(dec, sizeof(dec), enc, n, &dn) == 0);
            CHECK(dn == size && memcmp(dec, data + 1, size) == 0);
        }
        break;
    }
    return 0;
}
