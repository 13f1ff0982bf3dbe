/*
 * Web Push: RFC 8030 delivery (POST to the subscription's endpoint, TTL,
 * Urgency and Topic headers), RFC 8291 payload encryption (aes128gcm,
 * push_crypto.c) and RFC 8292 VAPID (Authorization: vapid t=<ES256 JWT>,
 * k=<our public key>; the JWT's aud is the endpoint's origin, cached per
 * origin for an hour and valid for twelve).
 *
 * The endpoint is a URL a client gave us: it must be https and its host
 * must end with one of webpush_allow (the browsers' push services by
 * default), or the push role would POST wherever a client points it.
 */
#include "push.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define VAPID_CACHE   32
#define VAPID_REFRESH 3600        /* s: a new JWT per origin this often */
#define VAPID_VALID   (12 * 3600) /* s: its exp */

static const cw_config_t *wcf;
static EVP_PKEY          *vapid_key;
static char               vapid_pub[100];       /* base64url of the 65-byte point */

static struct {
    char    origin[256];
    char   *jwt;
    int64_t made;                                /* s */
} vcache[VAPID_CACHE];

/* Does the endpoint's host end with one of the allowed suffixes (at a
 * label boundary)? */
int
cw_webpush_allowed(const cw_config_t *cf, const char *endpoint)
{
    const char *host, *end, *p;
    size_t      hl;

    if (strncmp(endpoint, "https://", 8) != 0) return 0;
    host = endpoint + 8;
    end = strpbrk(host, ":/?#");
    hl = end ? (size_t) (end - host) : strlen(host);
    for (p = cf->webpush_allow; *p;) {
        const char *comma = strchr(p, ','), *e = comma ? comma : p + strlen(p);
        size_t      sl;
        while (*p == ' ') p++;
        sl = (size_t) (e - p);
        while (sl > 0 && p[sl - 1] == ' ') sl--;
        if (sl > 0 && sl <= hl && strncasecmp(host + hl - sl, p, sl) == 0
            && (sl == hl || host[hl - sl - 1] == '.'))
            return 1;
        p = comma ? comma + 1 : e;
    }
    return 0;
}

static int
wp_init(const cw_config_t *cf)
{
    unsigned char pub[65];

    wcf = cf;
    if (cf->webpush_vapid_key[0] == '\0') return 0;
    if (cf->webpush_subject[0] == '\0'
        || (strncmp(cf->webpush_subject, "mailto:", 7) != 0 && strncmp(cf->webpush_subject, "https://", 8) != 0)) {
        cw_error("push: webpush_subject must be a mailto: or https: contact (RFC 8292)");
        return -1;
    }
    vapid_key = cw_pem_private_key(cf->webpush_vapid_key, EVP_PKEY_EC);
    if (vapid_key == NULL || cw_ec_public_raw(vapid_key, pub) != 0) return -1;
    cw_b64url_encode(pub, 65, vapid_pub, sizeof(vapid_pub));
    return 1;
}

static const char *
vapid_jwt(const char *origin)
{
    int64_t now = cw_now_ms() / 1000;
    int     slot = -1, oldest = 0;
    char    claims[512];
    json_t *c;
    char   *cj;

    for (int i = 0; i < VAPID_CACHE; i++) {
        if (vcache[i].jwt && strcmp(vcache[i].origin, origin) == 0) {
            if (now - vcache[i].made < VAPID_REFRESH) return vcache[i].jwt;
            slot = i;
            break;
        }
        if (vcache[i].made < vcache[oldest].made) oldest = i;
    }
    if (slot < 0) slot = oldest;
    c = json_pack("{s:s, s:I, s:s}", "aud", origin, "exp", (json_int_t) (now + VAPID_VALID), "sub", wcf->webpush_subject);
    cj = c ? json_dumps(c, JSON_COMPACT) : NULL;
    json_decref(c);
    if (cj == NULL) return NULL;
    snprintf(claims, sizeof(claims), "%s", cj);
    free(cj);
    free(vcache[slot].jwt);
    vcache[slot].jwt = cw_jwt_sign(vapid_key, 1, "{\"typ\":\"JWT\",\"alg\":\"ES256\"}", claims);
    snprintf(vcache[slot].origin, sizeof(vcache[slot].origin), "%s", origin);
    vcache[slot].made = now;
    return vcache[slot].jwt;
}

static void
wp_done(cw_http_req_t *r)
{
    push_job_t *j = r->data;
    int         retry = 0, outcome;
    char        why[160];

    if (r->status >= 200 && r->status < 300) outcome = PUSH_OK;
    else if (r->status == 404 || r->status == 410) outcome = PUSH_DEAD;
    else if (r->status == 0 || r->status == 429 || r->status >= 500) outcome = cw_push_common_outcome(r, &retry);
    else outcome = PUSH_FAIL;        /* 400, 401/403 (our VAPID refused), 413 */
    snprintf(why, sizeof(why), "%.150s", r->status ? r->resp : r->errbuf);
    cw_push_result(j, outcome, retry, r->status, why);
    cw_http_req_free(r);
}

static int
wp_send(push_job_t *j, int *outcome, int *retry_ms)
{
    const char    *ep = json_string_value(json_object_get(j->regj, "endpoint"));
    const char    *dh = json_string_value(json_object_get(j->regj, "p256dh"));
    const char    *au = json_string_value(json_object_get(j->regj, "auth"));
    unsigned char  ua[80], auth[32], *enc;
    char           origin[256], hdr[1024], *plain;
    const char    *host, *end, *jwt;
    size_t         elen;
    json_t        *pl;
    cw_http_req_t *r;

    *retry_ms = 0;
    *outcome = PUSH_FAIL;
    if (vapid_key == NULL) { *outcome = PUSH_FAIL; return -1; }
    if (ep == NULL || dh == NULL || au == NULL
        || cw_b64url_decode(dh, strlen(dh), ua, sizeof(ua)) != 65
        || cw_b64url_decode(au, strlen(au), auth, sizeof(auth)) != 16) {
        *outcome = PUSH_DEAD;          /* cannot be used: it would fail for ever */
        return -1;
    }
    if (!cw_webpush_allowed(wcf, ep)) {
        cw_warn("push: webpush endpoint host of %s/%s is not in webpush_allow; dropped", j->user, j->device);
        *outcome = PUSH_DEAD;
        return -1;
    }
    host = ep + 8;
    end = strpbrk(host, "/?#");
    snprintf(origin, sizeof(origin), "%.*s", (int) (end ? (size_t) (end - ep) : strlen(ep)), ep);
    jwt = vapid_jwt(origin);
    if (jwt == NULL) { *outcome = PUSH_RETRY; *retry_ms = 1000; return -1; }

    pl = json_pack("{s:s, s:s, s:s, s:i, s:i, s:I, s:s}", "title", j->title, "body", j->text, "conv", j->conv,
                   "badge", j->badge, "count", j->count, "seq", (json_int_t) j->seq, "tag", j->collapse);
    plain = pl ? json_dumps(pl, JSON_COMPACT) : NULL;
    json_decref(pl);
    if (plain == NULL) { *outcome = PUSH_RETRY; *retry_ms = 1000; return -1; }
    enc = cw_webpush_encrypt(ua, auth, (unsigned char *) plain, strlen(plain), &elen);
    free(plain);
    if (enc == NULL) { *outcome = PUSH_FAIL; return -1; }

    r = calloc(1, sizeof(*r));
    if (r == NULL) { free(enc); *outcome = PUSH_RETRY; *retry_ms = 1000; return -1; }
    r->prov = PUSH_WEBPUSH;
    r->body = (char *) enc;
    r->body_len = elen;
    r->done = wp_done;
    r->data = j;
    snprintf(hdr, sizeof(hdr), "TTL: %d", wcf->push_ttl);
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    r->hdrs = curl_slist_append(r->hdrs, j->urgent ? "Urgency: high" : "Urgency: normal");
    snprintf(hdr, sizeof(hdr), "Topic: %s", j->collapse);
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    r->hdrs = curl_slist_append(r->hdrs, "Content-Encoding: aes128gcm");
    r->hdrs = curl_slist_append(r->hdrs, "Content-Type: application/octet-stream");
    snprintf(hdr, sizeof(hdr), "Authorization: vapid t=%s, k=%s", jwt, vapid_pub);
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");
    if (cw_http_post(r, ep) != 0) {
        cw_http_req_free(r);
        *outcome = PUSH_RETRY;
        *retry_ms = 1000;
        return -1;
    }
    return 0;
}

static void
wp_close(void)
{
    for (int i = 0; i < VAPID_CACHE; i++) {
        free(vcache[i].jwt);
        vcache[i].jwt = NULL;
    }
    EVP_PKEY_free(vapid_key);
    vapid_key = NULL;
}

const push_provider_t cw_push_webpush = { "webpush", wp_init, wp_send, NULL, wp_close };
