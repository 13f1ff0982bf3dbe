/*
 * chat_jwt: HS256 JSON Web Token verification (RFC 7519 / RFC 7515 compact
 * serialization) and signing.  No allocation; OpenSSL libcrypto for
 * HMAC-SHA256 and CRYPTO_memcmp.
 *
 * Verification rules, in the order they are checked:
 *   1. 1..CHAT_JWT_MAX_LEN bytes, exactly three parts separated by '.',
 *      each non-empty base64url without padding ('=' is rejected) and in
 *      canonical form (unused low bits of the last character are zero);
 *      the header decodes to a JSON object (strict chat_json rules, so no
 *      duplicate keys); typ, if present, is the string "JWT" (any case);
 *      a crit header is not supported and rejected            -> MALFORMED
 *   2. header "alg" is exactly the string "HS256" (missing, "none",
 *      "HS512", "hs256", non-string ...)                        -> BAD_ALG
 *   3. the signature is 32 bytes and equals HMAC-SHA256(secret,
 *      "<header>.<payload>") compared in constant time    -> BAD_SIGNATURE
 *      (an empty secret never verifies: -> INTERNAL)
 *   4. only now is the payload read: a JSON object          -> MALFORMED
 *   5. sub and exp present                              -> MISSING_CLAIM
 *   6. sub: string, a valid user id (1..64 of [A-Za-z0-9._-]);
 *      exp: integer (no fraction/exponent);  nbf if present: integer;
 *      dev if present: string, a valid device id (1..32 of the same);
 *      iat and every other claim are ignored                 -> BAD_CLAIM
 *   7. now >= exp + leeway                                    -> EXPIRED
 *   8. now + leeway < nbf                               -> NOT_YET_VALID
 */
#ifndef CHAT_JWT_H
#define CHAT_JWT_H

#include <stddef.h>
#include <stdint.h>

#define CHAT_JWT_MAX_LEN      4096   /* longer tokens are MALFORMED */
#define CHAT_JWT_SUB_MAX      64
#define CHAT_JWT_DEV_MAX      32
#define CHAT_JWT_DEFAULT_DEV  "default"

typedef enum {
    CHAT_JWT_OK = 0,
    CHAT_JWT_MALFORMED,
    CHAT_JWT_BAD_ALG,
    CHAT_JWT_BAD_SIGNATURE,
    CHAT_JWT_EXPIRED,
    CHAT_JWT_NOT_YET_VALID,
    CHAT_JWT_MISSING_CLAIM,
    CHAT_JWT_BAD_CLAIM,
    CHAT_JWT_INTERNAL        /* empty secret or HMAC failure (fail closed) */
} chat_jwt_rc_t;

typedef struct {
    char     sub[CHAT_JWT_SUB_MAX + 1];   /* NUL-terminated */
    char     dev[CHAT_JWT_DEV_MAX + 1];   /* NUL-terminated, "default" */
    uint8_t  sub_len;
    uint8_t  dev_len;
    int64_t  exp;
} chat_jwt_claims_t;

/*
 * Verify token[0..len) (no "Bearer " prefix, no surrounding blanks).
 * now: seconds since the epoch; leeway: allowed clock skew in seconds
 * (negative is treated as 0).  *out is filled only on CHAT_JWT_OK.
 */
chat_jwt_rc_t chat_jwt_verify(const char *token, size_t len,
    const unsigned char *secret, size_t slen, int64_t now, int64_t leeway,
    chat_jwt_claims_t *out);

const char *chat_jwt_strerror(chat_jwt_rc_t rc);

/*
 * Sign: out receives "<b64url(header)>.<b64url(payload)>.<b64url(sig)>"
 * and a NUL.  header NULL means {"alg":"HS256","typ":"JWT"}; header and
 * payload are taken as they are (not checked).  Returns the token length
 * (without the NUL), or 0 when it does not fit in outcap (including the
 * NUL), the secret is empty or HMAC fails.
 */
size_t chat_jwt_sign_hs256(const char *header, size_t hlen,
    const char *payload, size_t plen, const unsigned char *secret, size_t slen,
    char *out, size_t outcap);

/*
 * Issue a token with claims {"sub":sub,"dev":dev,"iat":iat,"exp":exp};
 * dev NULL leaves dev out, iat < 0 leaves iat out.  sub and dev must be
 * valid ids (else 0).  Returns as chat_jwt_sign_hs256.
 */
size_t chat_jwt_issue(const char *sub, const char *dev, int64_t iat,
    int64_t exp, const unsigned char *secret, size_t slen,
    char *out, size_t outcap);

/* base64url without padding.  encode returns the length written (needs
 * chat_jwt_b64url_len(n) bytes, no NUL); decode returns 0 and sets
 * *outlen, or -1 for bad characters, padding, an impossible length,
 * non-canonical trailing bits or too small cap. */
static inline size_t
chat_jwt_b64url_len(size_t n)
{
    return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
}

size_t chat_jwt_b64url_encode(char *out, const unsigned char *in, size_t n);
int chat_jwt_b64url_decode(unsigned char *out, size_t cap, const char *in,
    size_t n, size_t *outlen);

#endif /* CHAT_JWT_H */
