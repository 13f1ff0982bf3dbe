/*
 * Unit tests for chat_jwt (HS256 verification and signing).
 *
 * The TOK_* literals were computed independently of this code with Python
 * (hmac, hashlib, base64; secret "test-secret-0123456789"), e.g.
 *   python3 -c 'import hmac,hashlib,base64;b=lambda x:base64.urlsafe_b64encode(x).rstrip(b"=");
 *     si=b(b"{\"alg\":\"HS256\",\"typ\":\"JWT\"}")+b"."+b(PAYLOAD);
 *     print((si+b"."+b(hmac.new(SECRET,si,hashlib.sha256).digest())).decode())'
 * TOK_HS512 is signed with HMAC-SHA512, TOK_NONE has an empty signature.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <string.h>
#include <stdio.h>
#include <cmocka.h>

#include "chat_jwt.h"

#define SECRET     "test-secret-0123456789"
#define NOW        1700000000LL

#define TOK_VALID \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImRldiI6InBob25lLTEiLCJpYXQiOjE3MDAwMDAwMDAsImV4cCI6NDEwMjQ0NDgwMH0.i-0scXn5v1-dFVz1XwfwHgX1umVHf9BUkP9zCIhApcU"
#define TOK_NODEV \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJib2IiLCJleHAiOjQxMDI0NDQ4MDB9.0OGPwekvJoMeGpWPtTPgOBuzuIQwaqkNrzcM5avtC8g"
#define TOK_NONE \
    "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0."
#define TOK_HS512 \
    "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.27PvYtZJU2JoOgz8KmA6p7bJan5vClCsabNabH1Zlr-2yMXYxuWCA23WF25yo2AatLPZP8_XYCL06xwxm7J9aw"
#define TOK_EXPIRED \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTYwMDAwMDAwMH0.KhloLCUv34IJZvza6EqXESYaul4Wbz3ERSzPRsZDPWA"
#define TOK_NEAR \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTY5OTk5OTk3MH0.dhRg5D4swePqw7ozi4MZbEAozuiZ_YyLetrj0QjZ0FY"
#define TOK_NBF \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsIm5iZiI6MTcwMDAwMzYwMCwiZXhwIjo0MTAyNDQ0ODAwfQ.p7nth5cyVM1lHQsxvZIBOg7HvkeSULZuqXozp9dC8sE"
#define TOK_NOSUB \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjQxMDI0NDQ4MDB9.VFEmNoaxC9kWqZZvq6UHl9iy9xbGeTx0cGGIY1aZPHY"
#define TOK_NOEXP \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.EhVpI9lNSP1iPSyTkupV1SpIvsg7sKIz8up45Wa3PHw"
#define TOK_BADSUB \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSIsImV4cCI6NDEwMjQ0NDgwMH0.jHiarPhliyidsG9PswsmLhzpCHdcDxLixJM-37qLUhI"
#define TOK_LONGSUB \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYSIsImV4cCI6NDEwMjQ0NDgwMH0.-tr6920SxdL8stkXa6KmLvXJvB8cjVxq3uoaSCDx7tk"
#define TOK_NUMSUB \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOjQyLCJleHAiOjQxMDI0NDQ4MDB9.H-OuUBuBceD1gSmC_4gR8EzjK8KqESGUM8gSSG7hNMg"
#define TOK_FLOATEXP \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMC41fQ.1q2PaClfOA7Vvft4loC3y8QA-8chIgpUqxUJdrXOQOQ"
#define TOK_STREXP \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6IjQxMDI0NDQ4MDAifQ.0Y6dmOhEOCslsRNxKsVQASjwSKOm1OfceQ0PziMKBCc"
#define TOK_BADDEV \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImRldiI6ImRkZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGRkZCIsImV4cCI6NDEwMjQ0NDgwMH0.-Na4YoJxYzSr2ipVGE1iJPY92UEgY2A7u68NqXo5wVc"
#define TOK_ESCSUB \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJcdTAwNjFsaWNlIiwiZXhwIjo0MTAyNDQ0ODAwfQ.nbv5ja3oCZa_fuJ0KA2FhbSL0X3PaEo0H6OOZMPmE58"
#define TOK_TYPLOWER \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6Imp3dCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.eCajyMyI9zrtGrKzkvOx-pJrq1mghuxz8KNk229d4ag"
#define TOK_TYPJWS \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXUyJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.swRNONDyl49PnFcYpeT4UZUxWh_JjFKzO8XlJ7l8dZE"
#define TOK_CRIT \
    "eyJhbGciOiJIUzI1NiIsImNyaXQiOlsiZXhwIl19.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.KXNoqvm8QCuGrI39v4NO4M3fXEM3DMOv54sYgCE3MAE"
#define TOK_DUPALG \
    "eyJhbGciOiJIUzI1NiIsImFsZyI6Im5vbmUifQ.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.7lgglxN7m-GCnvP3wmKzkNlyxK0X0UPGkFxj_KfIk3U"
#define TOK_NOTJSONPAY \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.c3ViPWFsaWNl.-LGrbiS1vIvuEUofkLtdWHNsG_nFr0I-HjF0CAfU3_M"
#define TOK_ARRPAY \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.WzEsMl0.zG_6B4VkQ3wNo3mgtkKfkLVS5Y8aWV9LIEwrcl3zP9s"
#define TOK_MALLORY_PAYLOAD \
    "eyJzdWIiOiJtYWxsb3J5IiwiZGV2IjoicGhvbmUtMSIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjo0MTAyNDQ0ODAwfQ"

/* RFC 7515 appendix A.1: HS256 example (no sub claim, so the signature is
 * accepted and then the claims are rejected) */
#define RFC7515_A1 \
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9" \
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ" \
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"

static const unsigned char rfc7515_key[64] = {
    3, 35, 53, 75, 43, 15, 165, 188, 131, 126, 6, 101, 119, 123, 166, 143,
    90, 179, 40, 230, 240, 84, 201, 40, 169, 15, 132, 178, 210, 80, 46, 191,
    211, 251, 90, 146, 210, 6, 71, 239, 150, 138, 180, 195, 119, 98, 61, 34,
    61, 46, 33, 114, 5, 46, 79, 8, 192, 205, 154, 245, 103, 208, 128, 163
};

static chat_jwt_rc_t
verify_at(const char *t, int64_t now, int64_t leeway, chat_jwt_claims_t *c)
{
    return chat_jwt_verify(t, strlen(t), (const unsigned char *) SECRET,
                           strlen(SECRET), now, leeway, c);
}

static chat_jwt_rc_t
verify(const char *t)
{
    chat_jwt_claims_t c;

    return verify_at(t, NOW, 0, &c);
}

/* sign an arbitrary header and payload with the test secret */
static const char *
sign(const char *hdr, const char *pay)
{
    static char out[8192];
    size_t      n;

    n = chat_jwt_sign_hs256(hdr, hdr ? strlen(hdr) : 0, pay, strlen(pay),
                            (const unsigned char *) SECRET, strlen(SECRET),
                            out, sizeof(out));
    assert_true(n > 0);
    return out;
}

/* ---------------------------------------------------------------------- */

static void
test_valid(void **state)
{
    chat_jwt_claims_t c;

    (void) state;
    memset(&c, 0x55, sizeof(c));
    assert_int_equal(verify_at(TOK_VALID, NOW, 0, &c), CHAT_JWT_OK);
    assert_string_equal(c.sub, "alice");
    assert_int_equal(c.sub_len, 5);
    assert_string_equal(c.dev, "phone-1");
    assert_int_equal(c.dev_len, 7);
    assert_true(c.exp == 4102444800LL);
    /* out may be NULL */
    assert_int_equal(chat_jwt_verify(TOK_VALID, strlen(TOK_VALID),
                                     (const unsigned char *) SECRET,
                                     strlen(SECRET), NOW, 0, NULL),
                     CHAT_JWT_OK);
}

static void
test_default_device(void **state)
{
    chat_jwt_claims_t c;

    (void) state;
    assert_int_equal(verify_at(TOK_NODEV, NOW, 0, &c), CHAT_JWT_OK);
    assert_string_equal(c.sub, "bob");
    assert_string_equal(c.dev, "default");
    assert_int_equal(c.dev_len, 7);
}

static void
test_sign_matches_python(void **state)
{
    char   out[512];
    size_t n;

    (void) state;
    n = chat_jwt_issue("alice", "phone-1", 1700000000, 4102444800LL,
                       (const unsigned char *) SECRET, strlen(SECRET),
                       out, sizeof(out));
    assert_int_equal(n, strlen(TOK_VALID));
    assert_string_equal(out, TOK_VALID);

    n = chat_jwt_issue("bob", NULL, -1, 4102444800LL,
                       (const unsigned char *) SECRET, strlen(SECRET),
                       out, sizeof(out));
    assert_string_equal(out, TOK_NODEV);

    assert_string_equal(sign(NULL, "{\"sub\":\"alice\",\"exp\":1600000000}"),
                        TOK_EXPIRED);

    /* too small a buffer (the NUL counts), invalid ids, empty secret */
    n = strlen(TOK_NODEV);
    assert_int_equal(chat_jwt_issue("bob", NULL, -1, 4102444800LL,
                                    (const unsigned char *) SECRET,
                                    strlen(SECRET), out, n), 0);
    assert_int_equal(chat_jwt_issue("bob", NULL, -1, 4102444800LL,
                                    (const unsigned char *) SECRET,
                                    strlen(SECRET), out, n + 1), n);
    assert_int_equal(chat_jwt_issue("b b", NULL, -1, 1, (const unsigned char *)
                                    SECRET, strlen(SECRET), out,
                                    sizeof(out)), 0);
    assert_int_equal(chat_jwt_issue("bob", "", -1, 1, (const unsigned char *)
                                    SECRET, strlen(SECRET), out,
                                    sizeof(out)), 0);
    assert_int_equal(chat_jwt_issue("bob", NULL, -1, 1,
                                    (const unsigned char *) "", 0, out,
                                    sizeof(out)), 0);
}

static void
test_rfc7515_vector(void **state)
{
    char t[] = RFC7515_A1;

    (void) state;
    /* signature good (so we get as far as the claims): no sub */
    assert_int_equal(chat_jwt_verify(t, strlen(t), rfc7515_key,
                                     sizeof(rfc7515_key), 1300819000, 0,
                                     NULL), CHAT_JWT_MISSING_CLAIM);
    /* another key */
    assert_int_equal(chat_jwt_verify(t, strlen(t), rfc7515_key,
                                     sizeof(rfc7515_key) - 1, 1300819000, 0,
                                     NULL), CHAT_JWT_BAD_SIGNATURE);
    /* a changed signature byte */
    t[strlen(t) - 10] ^= 0x01;
    assert_int_equal(chat_jwt_verify(t, strlen(t), rfc7515_key,
                                     sizeof(rfc7515_key), 1300819000, 0,
                                     NULL), CHAT_JWT_BAD_SIGNATURE);
}

static void
test_bad_alg(void **state)
{
    (void) state;
    assert_int_equal(verify(TOK_NONE), CHAT_JWT_BAD_ALG);
    assert_int_equal(verify(TOK_HS512), CHAT_JWT_BAD_ALG);
    /* correctly signed with our secret, but claiming another algorithm */
    assert_int_equal(verify(sign("{\"alg\":\"none\"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_ALG);
    assert_int_equal(verify(sign("{\"alg\":\"hs256\"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_ALG);
    assert_int_equal(verify(sign("{\"alg\":\"HS256 \"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_ALG);
    assert_int_equal(verify(sign("{\"alg\":\"RS256\"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_ALG);
    assert_int_equal(verify(sign("{\"typ\":\"JWT\"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_ALG);
    assert_int_equal(verify(sign("{\"alg\":null}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_ALG);
    assert_int_equal(verify(sign("{\"alg\":[\"HS256\"]}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_ALG);
    /* alg only header, escaped alg value */
    assert_int_equal(verify(sign("{\"alg\":\"HS256\"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_OK);
    assert_int_equal(verify(sign("{\"alg\":\"HS\\u0032\\u00356\"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_OK);
    /* duplicate alg (second one "none") is a malformed header */
    assert_int_equal(verify(TOK_DUPALG), CHAT_JWT_MALFORMED);
}

static void
test_header_rules(void **state)
{
    (void) state;
    assert_int_equal(verify(TOK_TYPLOWER), CHAT_JWT_OK);
    assert_int_equal(verify(TOK_TYPJWS), CHAT_JWT_MALFORMED);
    assert_int_equal(verify(TOK_CRIT), CHAT_JWT_MALFORMED);
    assert_int_equal(verify(sign("{\"alg\":\"HS256\",\"typ\":7}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_MALFORMED);
    assert_int_equal(verify(sign("[\"HS256\"]",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_MALFORMED);
    assert_int_equal(verify(sign("alg=HS256",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_MALFORMED);
    assert_int_equal(verify(sign("{\"alg\":\"HS256\"} ",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_OK);
    assert_int_equal(verify(sign("{\"alg\":\"HS256\",\"kid\":\"k1\"}",
                                 "{\"sub\":\"a\",\"exp\":4102444800}")),
                     CHAT_JWT_OK);
}

static void
test_tampered_payload(void **state)
{
    char t[1024];
    const char *d1 = strchr(TOK_VALID, '.');
    const char *d2 = strchr(d1 + 1, '.');

    (void) state;
    /* header of VALID + mallory's payload + signature of VALID */
    snprintf(t, sizeof(t), "%.*s.%s%s", (int) (d1 - TOK_VALID), TOK_VALID,
             TOK_MALLORY_PAYLOAD, d2);
    assert_int_equal(verify(t), CHAT_JWT_BAD_SIGNATURE);

    /* one bit of the payload text */
    strcpy(t, TOK_VALID);
    t[d1 - TOK_VALID + 5] ^= 0x01;
    assert_int_equal(verify(t), CHAT_JWT_BAD_SIGNATURE);

    /* the header */
    strcpy(t, TOK_VALID);
    t[3] = (char) (t[3] == 'a' ? 'b' : 'a');
    assert_true(verify(t) != CHAT_JWT_OK);
}

static void
test_tampered_signature(void **state)
{
    char        t[1024];
    size_t      n;
    char       *sig;
    const char *zero31 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    (void) state;
    strcpy(t, TOK_VALID);
    sig = strrchr(t, '.') + 1;
    sig[0] = (char) (sig[0] == 'A' ? 'B' : 'A');
    assert_int_equal(verify(t), CHAT_JWT_BAD_SIGNATURE);

    /* signature of the wrong length (31 and 33 bytes, valid base64url) */
    strcpy(t, TOK_VALID);
    sig = strrchr(t, '.') + 1;
    strcpy(sig, zero31);
    assert_int_equal(verify(t), CHAT_JWT_BAD_SIGNATURE);
    strcpy(sig, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_int_equal(verify(t), CHAT_JWT_BAD_SIGNATURE);

    /* signature missing */
    strcpy(t, TOK_VALID);
    *(strrchr(t, '.') + 1) = '\0';
    assert_int_equal(verify(t), CHAT_JWT_BAD_SIGNATURE);

    /* a signature made with another secret */
    n = strlen(TOK_VALID);
    assert_int_equal(chat_jwt_verify(TOK_VALID, n,
                                     (const unsigned char *) "other", 5, NOW,
                                     0, NULL), CHAT_JWT_BAD_SIGNATURE);
    assert_int_equal(chat_jwt_verify(TOK_VALID, n,
                                     (const unsigned char *) SECRET,
                                     strlen(SECRET) - 1, NOW, 0, NULL),
                     CHAT_JWT_BAD_SIGNATURE);

    /* the last character's unused bits must be zero: 'U' -> 'V' */
    strcpy(t, TOK_VALID);
    assert_int_equal(t[strlen(t) - 1], 'U');
    t[strlen(t) - 1] = 'V';
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);
}

static void
test_expiry(void **state)
{
    chat_jwt_claims_t c;

    (void) state;
    assert_int_equal(verify(TOK_EXPIRED), CHAT_JWT_EXPIRED);
    assert_int_equal(verify_at(TOK_EXPIRED, 1599999999, 0, &c), CHAT_JWT_OK);
    /* exp = NOW - 30 */
    assert_int_equal(verify_at(TOK_NEAR, NOW, 0, &c), CHAT_JWT_EXPIRED);
    assert_int_equal(verify_at(TOK_NEAR, NOW, 30, &c), CHAT_JWT_EXPIRED);
    assert_int_equal(verify_at(TOK_NEAR, NOW, 31, &c), CHAT_JWT_OK);
    assert_int_equal(verify_at(TOK_NEAR, NOW, 60, &c), CHAT_JWT_OK);
    assert_int_equal(verify_at(TOK_NEAR, NOW, -60, &c), CHAT_JWT_EXPIRED);
    /* exp itself is already too late */
    assert_int_equal(verify_at(TOK_NEAR, NOW - 30, 0, &c), CHAT_JWT_EXPIRED);
    assert_int_equal(verify_at(TOK_NEAR, NOW - 31, 0, &c), CHAT_JWT_OK);
    /* no overflow at the extremes */
    assert_int_equal(verify_at(TOK_VALID, INT64_MAX, INT64_MAX, &c),
                     CHAT_JWT_EXPIRED);
    assert_int_equal(verify_at(TOK_VALID, INT64_MIN, INT64_MAX, &c),
                     CHAT_JWT_OK);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\","
                                 "\"exp\":9223372036854775807}")),
                     CHAT_JWT_OK);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\","
                                 "\"exp\":-9223372036854775808}")),
                     CHAT_JWT_EXPIRED);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\","
                                 "\"exp\":9223372036854775808}")),
                     CHAT_JWT_BAD_CLAIM);
}

static void
test_not_before(void **state)
{
    chat_jwt_claims_t c;

    (void) state;
    /* nbf = NOW + 3600 */
    assert_int_equal(verify(TOK_NBF), CHAT_JWT_NOT_YET_VALID);
    assert_int_equal(verify_at(TOK_NBF, NOW + 3599, 0, &c),
                     CHAT_JWT_NOT_YET_VALID);
    assert_int_equal(verify_at(TOK_NBF, NOW + 3600, 0, &c), CHAT_JWT_OK);
    assert_int_equal(verify_at(TOK_NBF, NOW, 3600, &c), CHAT_JWT_OK);
    assert_int_equal(verify_at(TOK_NBF, NOW, 3599, &c),
                     CHAT_JWT_NOT_YET_VALID);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"exp\":4102444800,"
                                 "\"nbf\":\"soon\"}")), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"exp\":4102444800,"
                                 "\"nbf\":1.5}")), CHAT_JWT_BAD_CLAIM);
    /* iat is ignored, whatever it holds */
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"exp\":4102444800,"
                                 "\"iat\":\"x\"}")), CHAT_JWT_OK);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"exp\":4102444800,"
                                 "\"iat\":4102444800}")), CHAT_JWT_OK);
}

static void
test_claims(void **state)
{
    chat_jwt_claims_t c;
    char              pay[256];

    (void) state;
    assert_int_equal(verify(TOK_NOSUB), CHAT_JWT_MISSING_CLAIM);
    assert_int_equal(verify(TOK_NOEXP), CHAT_JWT_MISSING_CLAIM);
    assert_int_equal(verify(TOK_BADSUB), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(TOK_LONGSUB), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(TOK_NUMSUB), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(TOK_FLOATEXP), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(TOK_STREXP), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(TOK_BADDEV), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(TOK_NOTJSONPAY), CHAT_JWT_MALFORMED);
    assert_int_equal(verify(TOK_ARRPAY), CHAT_JWT_MALFORMED);

    /* escaped sub is decoded */
    assert_int_equal(verify_at(TOK_ESCSUB, NOW, 0, &c), CHAT_JWT_OK);
    assert_string_equal(c.sub, "alice");

    /* sub charset and length */
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a b\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a/b\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a:b\",\"exp\":4102444800}")),
                     CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"\xC3\xA9\","
                                 "\"exp\":4102444800}")), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\\u0000\","
                                 "\"exp\":4102444800}")), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":null,\"exp\":4102444800}")),
                     CHAT_JWT_BAD_CLAIM);
    snprintf(pay, sizeof(pay), "{\"sub\":\"%s\",\"exp\":4102444800}",
             "A-Za-z0.9_" "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    assert_int_equal(verify_at(sign(NULL, pay), NOW, 0, &c), CHAT_JWT_OK);
    assert_int_equal(c.sub_len, 64);

    /* dev */
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"dev\":\"\","
                                 "\"exp\":4102444800}")), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"dev\":5,"
                                 "\"exp\":4102444800}")), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"dev\":\"x y\","
                                 "\"exp\":4102444800}")), CHAT_JWT_BAD_CLAIM);
    assert_int_equal(verify_at(sign(NULL, "{\"sub\":\"a\",\"dev\":"
                                    "\"dddddddddddddddddddddddddddddddd\","
                                    "\"exp\":4102444800}"), NOW, 0, &c),
                     CHAT_JWT_OK);
    assert_int_equal(c.dev_len, 32);

    /* duplicate claims are malformed JSON */
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"sub\":\"b\","
                                 "\"exp\":4102444800}")), CHAT_JWT_MALFORMED);
    /* unknown claims are fine */
    assert_int_equal(verify(sign(NULL, "{\"sub\":\"a\",\"exp\":4102444800,"
                                 "\"roles\":[\"x\",{\"y\":[1,2]}],"
                                 "\"aud\":\"chat\"}")), CHAT_JWT_OK);

    /* claims are checked after the signature */
    assert_int_equal(chat_jwt_verify(TOK_NOSUB, strlen(TOK_NOSUB),
                                     (const unsigned char *) "x", 1, NOW, 0,
                                     NULL), CHAT_JWT_BAD_SIGNATURE);
    assert_int_equal(chat_jwt_verify(TOK_NOTJSONPAY, strlen(TOK_NOTJSONPAY),
                                     (const unsigned char *) "x", 1, NOW, 0,
                                     NULL), CHAT_JWT_BAD_SIGNATURE);
}

static void
test_structure(void **state)
{
    char  t[8192];
    char  pay[4096];
    const char *d1 = strchr(TOK_VALID, '.');
    size_t n;

    (void) state;
    assert_int_equal(verify(""), CHAT_JWT_MALFORMED);
    assert_int_equal(verify("abc"), CHAT_JWT_MALFORMED);
    assert_int_equal(verify("a.b"), CHAT_JWT_MALFORMED);
    assert_int_equal(verify(".."), CHAT_JWT_MALFORMED);
    assert_int_equal(chat_jwt_verify(NULL, 0, (const unsigned char *) SECRET,
                                     6, NOW, 0, NULL), CHAT_JWT_MALFORMED);

    snprintf(t, sizeof(t), "%s.AAAA", TOK_VALID);           /* four parts */
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);
    snprintf(t, sizeof(t), ".%s", d1 + 1);                  /* no header */
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);
    snprintf(t, sizeof(t), "%.*s.%s", (int) (d1 - TOK_VALID), TOK_VALID,
             strchr(d1 + 1, '.'));                          /* no payload */
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);
    snprintf(t, sizeof(t), " %s", TOK_VALID);
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);
    snprintf(t, sizeof(t), "%s ", TOK_VALID);
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);
    snprintf(t, sizeof(t), "Bearer %s", TOK_VALID);
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);

    /* padding is rejected everywhere */
    snprintf(t, sizeof(t), "%s=", TOK_VALID);
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);
    snprintf(t, sizeof(t), "%.*s=%s", (int) (d1 - TOK_VALID), TOK_VALID, d1);
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);

    /* standard base64 characters are not base64url */
    strcpy(t, TOK_VALID);
    *strchr(t, '-') = '+';
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);

    /* a length no base64 has (4n+1) */
    snprintf(t, sizeof(t), "%sAA", TOK_VALID);
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);

    /* embedded NUL */
    strcpy(t, TOK_VALID);
    n = strlen(t);
    t[10] = '\0';
    assert_int_equal(chat_jwt_verify(t, n, (const unsigned char *) SECRET,
                                     strlen(SECRET), NOW, 0, NULL),
                     CHAT_JWT_MALFORMED);

    /* length limit: a correctly signed token of exactly 4096 bytes passes,
     * one of 4097 bytes is malformed.  header 36 + 1 + payload + 1 + 43:
     * b64(payload) = 4015 chars <=> 3011 bytes; 4016 <=> 3012 */
    n = (size_t) snprintf(pay, sizeof(pay),
                          "{\"sub\":\"alice\",\"exp\":4102444800,\"pad\":\"");
    memset(pay + n, 'x', 3011 - n - 2);
    memcpy(pay + 3011 - 2, "\"}", 3);
    assert_int_equal(strlen(pay), 3011);
    strcpy(t, sign(NULL, pay));
    assert_int_equal(strlen(t), CHAT_JWT_MAX_LEN);
    assert_int_equal(verify(t), CHAT_JWT_OK);

    memmove(pay + 3011 - 2, "x\"}", 4);
    assert_int_equal(strlen(pay), 3012);
    strcpy(t, sign(NULL, pay));
    assert_int_equal(strlen(t), CHAT_JWT_MAX_LEN + 1);
    assert_int_equal(verify(t), CHAT_JWT_MALFORMED);

    /* empty secret never verifies */
    assert_int_equal(chat_jwt_verify(TOK_VALID, strlen(TOK_VALID),
                                     (const unsigned char *) "", 0, NOW, 0,
                                     NULL), CHAT_JWT_INTERNAL);
}

static void
test_base64url(void **state)
{
    static const struct { const char *raw; const char *enc; } v[] = {
        { "", "" }, { "f", "Zg" }, { "fo", "Zm8" }, { "foo", "Zm9v" },
        { "foob", "Zm9vYg" }, { "fooba", "Zm9vYmE" }, { "foobar", "Zm9vYmFy" },
        { "\xfb\xff\xbf", "-_-_" }
    };
    char          enc[32];
    unsigned char dec[32];
    size_t        i, n, dn;

    (void) state;
    for (i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        n = chat_jwt_b64url_encode(enc, (const unsigned char *) v[i].raw,
                                   strlen(v[i].raw));
        assert_int_equal(n, strlen(v[i].enc));
        assert_int_equal(n, chat_jwt_b64url_len(strlen(v[i].raw)));
        assert_memory_equal(enc, v[i].enc, n);
        assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), v[i].enc,
                                                strlen(v[i].enc), &dn), 0);
        assert_int_equal(dn, strlen(v[i].raw));
        assert_memory_equal(dec, v[i].raw, dn);
    }
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Zg==", 4, &dn),
                     -1);
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Zh", 2, &dn),
                     -1);                     /* non-canonical */
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Zm9", 3, &dn),
                     -1);
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Zm8", 3, &dn),
                     0);
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Zm-", 3, &dn),
                     -1);                     /* '-' = 62: low bits set */
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Z", 1, &dn),
                     -1);
    /* 4n+1 characters, even when valid ones follow in memory */
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Zm9vYg", 5,
                                            &dn), -1);
    assert_int_equal(chat_jwt_b64url_decode(dec, sizeof(dec), "Zm9v+A", 6,
                                            &dn), -1);
    assert_int_equal(chat_jwt_b64url_decode(dec, 2, "Zm9v", 4, &dn), -1);
    assert_int_equal(chat_jwt_b64url_decode(dec, 3, "Zm9v", 4, &dn), 0);
}

static void
test_strerror(void **state)
{
    int i;

    (void) state;
    for (i = CHAT_JWT_OK; i <= CHAT_JWT_INTERNAL; i++) {
        assert_non_null(chat_jwt_strerror((chat_jwt_rc_t) i));
        assert_null(strchr(chat_jwt_strerror((chat_jwt_rc_t) i), '"'));
    }
    assert_string_equal(chat_jwt_strerror(CHAT_JWT_EXPIRED), "token expired");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_default_device),
        cmocka_unit_test(test_sign_matches_python),
        cmocka_unit_test(test_rfc7515_vector),
        cmocka_unit_test(test_bad_alg),
        cmocka_unit_test(test_header_rules),
        cmocka_unit_test(test_tampered_payload),
        cmocka_unit_test(test_tampered_signature),
        cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_not_before),
        cmocka_unit_test(test_claims),
        cmocka_unit_test(test_structure),
        cmocka_unit_test(test_base64url),
        cmocka_unit_test(test_strerror),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
