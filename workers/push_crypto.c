/*
 * Cryptography of the push providers, all of it OpenSSL (EVP):
 *   - JWTs signed ES256 (VAPID, APNs provider tokens) and RS256 (the FCM
 *     OAuth assertion), keys loaded from PEM files;
 *   - RFC 8291 message encryption for Web Push (ECDH P-256, HKDF-SHA-256,
 *     AES-128-GCM, the aes128gcm content coding of RFC 8188, one record).
 */
#include "push.h"

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char b64u_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t
cw_b64url_encode(const unsigned char *in, size_t n, char *out, size_t outlen)
{
    size_t o = 0, i;

    if (outlen < (n * 4 + 2) / 3 + 1) return 0;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];
        out[o++] = b64u_chars[v >> 18 & 63];
        out[o++] = b64u_chars[v >> 12 & 63];
        out[o++] = b64u_chars[v >> 6 & 63];
        out[o++] = b64u_chars[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t) in[i] << 16;
        out[o++] = b64u_chars[v >> 18 & 63];
        out[o++] = b64u_chars[v >> 12 & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8;
        out[o++] = b64u_chars[v >> 18 & 63];
        out[o++] = b64u_chars[v >> 12 & 63];
        out[o++] = b64u_chars[v >> 6 & 63];
    }
    out[o] = '\0';
    return o;
}

static void
ssl_err(const char *what)
{
    unsigned long e = ERR_get_error();
    char          buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    cw_error("push: %s: %s", what, e ? buf : "failed");
    ERR_clear_error();
}

EVP_PKEY *
cw_pem_private_key(const char *path, int want_type)
{
    FILE     *f = fopen(path, "r");
    EVP_PKEY *k;

    if (f == NULL) {
        cw_error("push: cannot open key %s", path);
        return NULL;
    }
    k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (k == NULL) {
        ssl_err(path);
        return NULL;
    }
    if (EVP_PKEY_get_base_id(k) != want_type
        || (want_type == EVP_PKEY_EC && !EVP_PKEY_is_a(k, "EC"))) {
        cw_error("push: %s is not the expected key type (%s)", path, want_type == EVP_PKEY_EC ? "EC P-256" : "RSA");
        EVP_PKEY_free(k);
        return NULL;
    }
    if (want_type == EVP_PKEY_EC) {
        char curve[64];
        size_t cl = 0;
        if (!EVP_PKEY_get_utf8_string_param(k, OSSL_PKEY_PARAM_GROUP_NAME, curve, sizeof(curve), &cl)
            || strcmp(curve, "prime256v1") != 0) {
            cw_error("push: %s must be a P-256 key", path);
            EVP_PKEY_free(k);
            return NULL;
        }
    }
    return k;
}

EVP_PKEY *
cw_pem_private_key_mem(const char *pem, int want_type)
{
    BIO      *b = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *k = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    BIO_free(b);
    if (k && EVP_PKEY_get_base_id(k) != want_type) {
        EVP_PKEY_free(k);
        k = NULL;
    }
    if (k == NULL) ssl_err("private key");
    return k;
}

/* The uncompressed public point (65 bytes) of a P-256 key. */
int
cw_ec_public_raw(EVP_PKEY *k, unsigned char out[65])
{
    size_t n = 0;
    if (!EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_PUB_KEY, out, 65, &n) || n != 65) {
        /* some keys carry the compressed form: ask for the uncompressed one */
        unsigned char *buf = NULL;
        size_t         len = EVP_PKEY_get1_encoded_public_key(k, &buf);
        int            ok = len == 65;
        if (ok) memcpy(out, buf, 65);
        OPENSSL_free(buf);
        return ok ? 0 : -1;
    }
    return 0;
}

/* A signature over data: ES256 (r || s, 64 bytes, from the DER ECDSA
 * signature) or RS256 (PKCS#1 v1.5, the key's size). */
static int
sign(EVP_PKEY *k, int es256, const char *data, size_t n, unsigned char *sig, size_t *siglen)
{
    EVP_MD_CTX    *ctx = EVP_MD_CTX_new();
    unsigned char  der[256];
    size_t         dlen = sizeof(der);
    int            ok;

    ok = ctx && EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, k) == 1;
    if (ok && es256) {
        ok = EVP_DigestSign(ctx, der, &dlen, (const unsigned char *) data, n) == 1;
        if (ok) {
            const unsigned char *p = der;
            ECDSA_SIG           *es = d2i_ECDSA_SIG(NULL, &p, (long) dlen);
            const BIGNUM        *r, *s;
            ok = es != NULL;
            if (ok) {
                ECDSA_SIG_get0(es, &r, &s);
                ok = BN_bn2binpad(r, sig, 32) == 32 && BN_bn2binpad(s, sig + 32, 32) == 32;
                *siglen = 64;
                ECDSA_SIG_free(es);
            }
        }
    } else if (ok) {
        size_t need = 0;
        ok = EVP_DigestSign(ctx, NULL, &need, (const unsigned char *) data, n) == 1 && need <= *siglen
             && EVP_DigestSign(ctx, sig, siglen, (const unsigned char *) data, n) == 1;
    }
    if (!ok) ssl_err("sign");
    EVP_MD_CTX_free(ctx);
    return ok ? 0 : -1;
}

/* header.claims.signature, header and claims given as JSON text. The JWT
 * (malloc'd), or NULL. */
char *
cw_jwt_sign(EVP_PKEY *k, int es256, const char *header, const char *claims)
{
    size_t         hl = strlen(header), cl = strlen(claims);
    size_t         cap = (hl + cl) * 4 / 3 + 16 + 700;
    char          *out = malloc(cap);
    unsigned char  sig[512];
    size_t         siglen = sizeof(sig), o;

    if (out == NULL) return NULL;
    o = cw_b64url_encode((const unsigned char *) header, hl, out, cap);
    out[o++] = '.';
    o += cw_b64url_encode((const unsigned char *) claims, cl, out + o, cap - o);
    if (sign(k, es256, out, o, sig, &siglen) != 0) {
        free(out);
        return NULL;
    }
    out[o++] = '.';
    if (cw_b64url_encode(sig, siglen, out + o, cap - o) == 0) {
        free(out);
        return NULL;
    }
    return out;
}

/* HKDF-SHA-256 (RFC 5869), extract and expand. */
static int
hkdf(const unsigned char *salt, size_t saltlen, const unsigned char *ikm, size_t ikmlen,
     const unsigned char *info, size_t infolen, unsigned char *out, size_t outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
    int           ok = ctx && EVP_PKEY_derive_init(ctx) == 1
                       && EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) == 1
                       && EVP_PKEY_CTX_set1_hkdf_salt(ctx, salt, (int) saltlen) == 1
                       && EVP_PKEY_CTX_set1_hkdf_key(ctx, ikm, (int) ikmlen) == 1
                       && EVP_PKEY_CTX_add1_hkdf_info(ctx, info, (int) infolen) == 1
                       && EVP_PKEY_derive(ctx, out, &outlen) == 1;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

/* A P-256 public key from its uncompressed point. */
static EVP_PKEY *
ec_public_from_raw(const unsigned char *raw, size_t n)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    EVP_PKEY     *k = NULL;
    OSSL_PARAM    params[3];

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *) "prime256v1", 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *) raw, n);
    params[2] = OSSL_PARAM_construct_end();
    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1
        || EVP_PKEY_fromdata(ctx, &k, EVP_PKEY_PUBLIC_KEY, params) != 1) {
        k = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    return k;
}

/*
 * RFC 8291: encrypts plaintext for the subscription (ua_public: 65 bytes,
 * auth: 16 bytes) as one aes128gcm record (RFC 8188, rs 4096):
 *   salt(16) || rs(4) || idlen(1) = 65 || keyid = as_public(65) || ciphertext || tag
 * The body (malloc'd) and its length, or NULL.
 */
unsigned char *
cw_webpush_encrypt(const unsigned char *ua_public, const unsigned char *auth,
                   const unsigned char *plain, size_t plen, size_t *outlen)
{
    EVP_PKEY       *peer = NULL, *eph = NULL;
    EVP_PKEY_CTX   *dctx = NULL;
    EVP_CIPHER_CTX *c = NULL;
    unsigned char   secret[32], as_public[65], key_info[14 + 65 + 65], ikm[32], salt[16];
    unsigned char   cek[16], nonce[12], *out = NULL, *rec = NULL;
    size_t          slen = sizeof(secret), o;
    int             len, ok = 0;
    static const char cek_info[] = "Content-Encoding: aes128gcm";   /* + 0x00 */
    static const char nonce_info[] = "Content-Encoding: nonce";

    if (plen + 1 + 16 > 4096 - 86) return NULL;    /* one record */
    peer = ec_public_from_raw(ua_public, 65);
    eph = EVP_EC_gen("P-256");
    if (peer == NULL || eph == NULL || cw_ec_public_raw(eph, as_public) != 0) goto done;
    dctx = EVP_PKEY_CTX_new(eph, NULL);
    if (dctx == NULL || EVP_PKEY_derive_init(dctx) != 1 || EVP_PKEY_derive_set_peer(dctx, peer) != 1
        || EVP_PKEY_derive(dctx, secret, &slen) != 1 || slen != 32)
        goto done;
    /* IKM = HKDF(salt = auth, ikm = ecdh secret, info = "WebPush: info" 0x00 ua_public as_public, 32) */
    memcpy(key_info, "WebPush: info", 13);
    key_info[13] = 0;
    memcpy(key_info + 14, ua_public, 65);
    memcpy(key_info + 79, as_public, 65);
    if (hkdf(auth, 16, secret, 32, key_info, sizeof(key_info), ikm, 32) != 0) goto done;
    if (RAND_bytes(salt, sizeof(salt)) != 1) goto done;
    if (hkdf(salt, 16, ikm, 32, (const unsigned char *) cek_info, sizeof(cek_info), cek, 16) != 0
        || hkdf(salt, 16, ikm, 32, (const unsigned char *) nonce_info, sizeof(nonce_info), nonce, 12) != 0)
        goto done;
    out = malloc(86 + plen + 1 + 16);
    rec = malloc(plen + 1);
    if (out == NULL || rec == NULL) goto done;
    memcpy(out, salt, 16);
    out[16] = 0; out[17] = 0; out[18] = 0x10; out[19] = 0;     /* rs = 4096 */
    out[20] = 65;
    memcpy(out + 21, as_public, 65);
    memcpy(rec, plain, plen);
    rec[plen] = 0x02;                                          /* last record, no padding */
    o = 86;
    c = EVP_CIPHER_CTX_new();
    if (c == NULL || EVP_EncryptInit_ex(c, EVP_aes_128_gcm(), NULL, NULL, NULL) != 1
        || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1
        || EVP_EncryptInit_ex(c, NULL, NULL, cek, nonce) != 1
        || EVP_EncryptUpdate(c, out + o, &len, rec, (int) plen + 1) != 1)
        goto done;
    o += (size_t) len;
    if (EVP_EncryptFinal_ex(c, out + o, &len) != 1) goto done;
    o += (size_t) len;
    if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, out + o) != 1) goto done;
    o += 16;
    *outlen = o;
    ok = 1;
done:
    if (!ok) {
        ssl_err("web push encryption");
        free(out);
        out = NULL;
    }
    OPENSSL_cleanse(secret, sizeof(secret));
    OPENSSL_cleanse(ikm, sizeof(ikm));
    OPENSSL_cleanse(cek, sizeof(cek));
    free(rec);
    EVP_CIPHER_CTX_free(c);
    EVP_PKEY_CTX_free(dctx);
    EVP_PKEY_free(peer);
    EVP_PKEY_free(eph);
    return out;
}
