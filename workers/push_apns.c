/*
 * APNs over HTTP/2 with token authentication: POST <apns_url>/3/device/<token>
 * with `authorization: bearer <ES256 JWT>` (header kid = apns_key_id,
 * claims iss = apns_team_id, iat), signed with the .p8 key and renewed
 * every 40 minutes (Apple refuses a token older than an hour and one renewed
 * more often than every 20 minutes), apns-topic (the registration's bundle
 * id), apns-push-type: alert, apns-priority (10, or 5 when not urgent),
 * apns-expiration and apns-collapse-id. A registration with env "sandbox"
 * goes to apns_sandbox_url.
 *
 * 200: accepted. 410 (Unregistered) and 400 BadDeviceToken /
 * DeviceTokenNotForTopic: the registration is dead. 403
 * ExpiredProviderToken / InvalidProviderToken: new JWT, again. 429, 5xx,
 * network: again later.
 */
#include "push.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define APNS_REFRESH (40 * 60)

static const cw_config_t *acf;
static EVP_PKEY          *akey;
static char              *ajwt;
static int64_t            ajwt_made;

static int
apns_init(const cw_config_t *cf)
{
    acf = cf;
    if (cf->apns_key_file[0] == '\0') return 0;
    if (cf->apns_key_id[0] == '\0' || cf->apns_team_id[0] == '\0') {
        cw_error("push: apns_key_file needs apns_key_id and apns_team_id");
        return -1;
    }
    akey = cw_pem_private_key(cf->apns_key_file, EVP_PKEY_EC);
    return akey ? 1 : -1;
}

static const char *
provider_token(int force)
{
    int64_t now = cw_now_ms() / 1000;
    char    header[128], claims[128];

    if (ajwt && !force && now - ajwt_made < APNS_REFRESH) return ajwt;
    snprintf(header, sizeof(header), "{\"alg\":\"ES256\",\"kid\":\"%s\"}", acf->apns_key_id);
    snprintf(claims, sizeof(claims), "{\"iss\":\"%s\",\"iat\":%lld}", acf->apns_team_id, (long long) now);
    free(ajwt);
    ajwt = cw_jwt_sign(akey, 1, header, claims);
    ajwt_made = now;
    return ajwt;
}

static void
apns_done(cw_http_req_t *r)
{
    push_job_t  *j = r->data;
    int          retry = 0, outcome;
    json_error_t jerr;
    json_t      *b = r->resp_len ? json_loads(r->resp, 0, &jerr) : NULL;
    const char  *reason = json_string_value(json_object_get(b, "reason"));
    char         why[160];

    if (reason == NULL) reason = "";
    if (r->status == 200) outcome = PUSH_OK;
    else if (r->status == 410) outcome = PUSH_DEAD;
    else if (r->status == 400 && (strcmp(reason, "BadDeviceToken") == 0 || strcmp(reason, "DeviceTokenNotForTopic") == 0))
        outcome = PUSH_DEAD;
    else if (r->status == 403 && (strcmp(reason, "ExpiredProviderToken") == 0 || strcmp(reason, "InvalidProviderToken") == 0)) {
        outcome = PUSH_REAUTH;
        provider_token(1);
    } else if (r->status == 0 || r->status == 429 || r->status >= 500) outcome = cw_push_common_outcome(r, &retry);
    else outcome = PUSH_FAIL;
    snprintf(why, sizeof(why), "%.100s", r->status ? reason : r->errbuf);
    json_decref(b);
    cw_push_result(j, outcome, retry, r->status, why);
    cw_http_req_free(r);
}

static int
apns_send(push_job_t *j, int *outcome, int *retry_ms)
{
    const char    *tok = json_string_value(json_object_get(j->regj, "token"));
    const char    *topic = json_string_value(json_object_get(j->regj, "topic"));
    const char    *env = json_string_value(json_object_get(j->regj, "env"));
    const char    *jwt;
    char           url[CW_STR + 256], hdr[1024];
    json_t        *alert, *pl;
    cw_http_req_t *r;

    *retry_ms = 0;
    *outcome = PUSH_FAIL;
    if (akey == NULL) return -1;
    if (tok == NULL || topic == NULL || strlen(tok) > 200) { *outcome = PUSH_DEAD; return -1; }
    jwt = provider_token(0);
    if (jwt == NULL) { *outcome = PUSH_RETRY; *retry_ms = 1000; return -1; }
    alert = j->text[0] ? json_pack("{s:s, s:s}", "title", j->title, "body", j->text)
                       : json_pack("{s:s}", "title", j->title);
    pl = json_pack("{s:{s:o, s:i, s:s, s:s}, s:s, s:I}", "aps", "alert", alert, "badge", j->badge,
                   "sound", "default", "thread-id", j->collapse, "conv", j->conv, "seq", (json_int_t) j->seq);
    r = calloc(1, sizeof(*r));
    if (r == NULL || pl == NULL || (r->body = json_dumps(pl, JSON_COMPACT)) == NULL) {
        json_decref(pl);
        free(r);
        *outcome = PUSH_RETRY;
        *retry_ms = 1000;
        return -1;
    }
    json_decref(pl);
    r->body_len = strlen(r->body);
    r->prov = PUSH_APNS;
    r->done = apns_done;
    r->data = j;
    snprintf(hdr, sizeof(hdr), "authorization: bearer %s", jwt);
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    snprintf(hdr, sizeof(hdr), "apns-topic: %s", topic);
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    r->hdrs = curl_slist_append(r->hdrs, "apns-push-type: alert");
    r->hdrs = curl_slist_append(r->hdrs, j->urgent ? "apns-priority: 10" : "apns-priority: 5");
    snprintf(hdr, sizeof(hdr), "apns-expiration: %lld", (long long) (cw_now_ms() / 1000 + acf->push_ttl));
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    snprintf(hdr, sizeof(hdr), "apns-collapse-id: %s", j->collapse);
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    r->hdrs = curl_slist_append(r->hdrs, "content-type: application/json");
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");
    snprintf(url, sizeof(url), "%s/3/device/%s",
             env && strcmp(env, "sandbox") == 0 ? acf->apns_sandbox_url : acf->apns_url, tok);
    if (cw_http_post(r, url) != 0) {
        cw_http_req_free(r);
        *outcome = PUSH_RETRY;
        *retry_ms = 1000;
        return -1;
    }
    return 0;
}

static void
apns_close(void)
{
    free(ajwt);
    ajwt = NULL;
    EVP_PKEY_free(akey);
    akey = NULL;
}

const push_provider_t cw_push_apns = { "apns", apns_init, apns_send, NULL, apns_close };
