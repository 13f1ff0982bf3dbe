/*
 * FCM HTTP v1: POST <fcm_url>/v1/projects/<project_id>/messages:send with
 * `Authorization: Bearer <OAuth 2.0 access token>`. The token comes from
 * the service-account JSON (fcm_service_account: project_id, client_email,
 * private_key, token_uri): an RS256 JWT assertion (iss = client_email,
 * scope firebase.messaging, aud = token_uri, one hour) exchanged at
 * token_uri (grant_type jwt-bearer), cached until a minute before it
 * expires. Jobs that come while no token is at hand wait for it (bounded).
 *
 * 200: accepted. 404 UNREGISTERED (and 400 with an invalid registration
 * token): dead. 401: new token, again. 429, 5xx, network: again later.
 */
#include "push.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const cw_config_t *fcf;
static EVP_PKEY          *fkey;
static char               project[256], email[512], token_uri[1024];
static char              *access_token;
static int64_t            token_expires;          /* mono ms */
static int                fetching;
static int64_t            next_fetch;             /* mono ms: after a failed fetch */
static cw_backoff_t       fetch_bo;
static push_job_t        *waiting, **waiting_tail = &waiting;
static int                nwaiting;

static int
fcm_init(const cw_config_t *cf)
{
    json_error_t jerr;
    json_t      *sa;
    const char  *pid, *em, *pk, *tu;

    fcf = cf;
    waiting_tail = &waiting;
    cw_backoff_reset(&fetch_bo);
    if (cf->fcm_service_account[0] == '\0') return 0;
    sa = json_load_file(cf->fcm_service_account, 0, &jerr);
    if (sa == NULL) {
        cw_error("push: fcm_service_account %s: %s", cf->fcm_service_account, jerr.text);
        return -1;
    }
    pid = json_string_value(json_object_get(sa, "project_id"));
    em = json_string_value(json_object_get(sa, "client_email"));
    pk = json_string_value(json_object_get(sa, "private_key"));
    tu = json_string_value(json_object_get(sa, "token_uri"));
    if (pid == NULL || em == NULL || pk == NULL || tu == NULL || strncmp(tu, "https://", 8) != 0
        || strlen(pid) >= sizeof(project) || strlen(em) >= sizeof(email) || strlen(tu) >= sizeof(token_uri)) {
        cw_error("push: %s needs project_id, client_email, private_key and an https token_uri",
                 cf->fcm_service_account);
        json_decref(sa);
        return -1;
    }
    strcpy(project, pid);
    strcpy(email, em);
    strcpy(token_uri, tu);
    fkey = cw_pem_private_key_mem(pk, EVP_PKEY_RSA);
    json_decref(sa);
    return fkey ? 1 : -1;
}

static void send_now(push_job_t *j);

/* The token request ended: start or fail what waited for it. */
static void
token_done(cw_http_req_t *r)
{
    json_error_t jerr;
    json_t      *b = r->status == 200 ? json_loads(r->resp, 0, &jerr) : NULL;
    const char  *tok = json_string_value(json_object_get(b, "access_token"));
    json_int_t   exp = json_integer_value(json_object_get(b, "expires_in"));
    push_job_t  *list = waiting;

    fetching = 0;
    waiting = NULL;
    waiting_tail = &waiting;
    nwaiting = 0;
    if (tok && exp > 0) {
        free(access_token);
        access_token = strdup(tok);
        token_expires = cw_mono_ms() + (exp > 120 ? exp - 60 : exp / 2) * 1000;
        cw_backoff_reset(&fetch_bo);
    } else {
        cw_warn("push: fcm token exchange at %s failed: %ld %s", token_uri, r->status,
                r->status ? r->resp : r->errbuf);
        next_fetch = cw_mono_ms() + cw_backoff_ms(&fetch_bo);
        fetch_bo.ms = fetch_bo.ms * 2 > 5000 ? 5000 : fetch_bo.ms * 2;
    }
    json_decref(b);
    cw_http_req_free(r);
    while (list) {
        push_job_t *j = list;
        list = j->next;
        j->next = NULL;
        if (access_token && cw_mono_ms() < token_expires) send_now(j);
        else cw_push_result(j, PUSH_RETRY, 1000, 0, "no fcm access token");
    }
}

static int
fetch_token(void)
{
    int64_t        now = cw_now_ms() / 1000;
    char           claims[2048], *jwt, *body;
    cw_http_req_t *r;
    json_t        *c;
    char          *cj;
    size_t         n;

    if (fetching) return 0;
    if (cw_mono_ms() < next_fetch) return -1;
    c = json_pack("{s:s, s:s, s:s, s:I, s:I}", "iss", email, "scope", "https://www.googleapis.com/auth/firebase.messaging",
                  "aud", token_uri, "iat", (json_int_t) now, "exp", (json_int_t) (now + 3600));
    cj = c ? json_dumps(c, JSON_COMPACT) : NULL;
    json_decref(c);
    if (cj == NULL) return -1;
    snprintf(claims, sizeof(claims), "%s", cj);
    free(cj);
    jwt = cw_jwt_sign(fkey, 0, "{\"alg\":\"RS256\",\"typ\":\"JWT\"}", claims);
    if (jwt == NULL) return -1;
    n = strlen(jwt) + 128;
    body = malloc(n);
    r = calloc(1, sizeof(*r));
    if (body == NULL || r == NULL) { free(jwt); free(body); free(r); return -1; }
    /* the JWT is base64url and dots: nothing to escape */
    snprintf(body, n, "grant_type=urn%%3Aietf%%3Aparams%%3Aoauth%%3Agrant-type%%3Ajwt-bearer&assertion=%s", jwt);
    free(jwt);
    r->body = body;
    r->body_len = strlen(body);
    r->prov = PUSH_FCM;
    r->done = token_done;
    r->hdrs = curl_slist_append(NULL, "Content-Type: application/x-www-form-urlencoded");
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");
    if (cw_http_post(r, token_uri) != 0) {
        cw_http_req_free(r);
        return -1;
    }
    fetching = 1;
    return 0;
}

static void
fcm_done(cw_http_req_t *r)
{
    push_job_t  *j = r->data;
    int          retry = 0, outcome;
    json_error_t jerr;
    json_t      *b = r->resp_len ? json_loads(r->resp, 0, &jerr) : NULL;
    json_t      *err = json_object_get(b, "error"), *det;
    const char  *status = json_string_value(json_object_get(err, "status"));
    const char  *code = NULL;
    size_t       i;
    char         why[200];

    /* the FCM error code is in error.details[].errorCode */
    json_array_foreach(json_object_get(err, "details"), i, det) {
        if (json_is_string(json_object_get(det, "errorCode"))) code = json_string_value(json_object_get(det, "errorCode"));
    }
    if (r->status == 200) outcome = PUSH_OK;
    else if (r->status == 404 || (code && strcmp(code, "UNREGISTERED") == 0)) outcome = PUSH_DEAD;
    else if (r->status == 401) {
        free(access_token);
        access_token = NULL;
        outcome = PUSH_REAUTH;
    } else if (r->status == 0 || r->status == 429 || r->status >= 500) outcome = cw_push_common_outcome(r, &retry);
    else outcome = PUSH_FAIL;
    snprintf(why, sizeof(why), "%.100s%s%.60s", r->status ? (status ? status : "") : r->errbuf, code ? " " : "", code ? code : "");
    json_decref(b);
    cw_push_result(j, outcome, retry, r->status, why);
    cw_http_req_free(r);
}

static void
send_now(push_job_t *j)
{
    const char    *tok = json_string_value(json_object_get(j->regj, "token"));
    char           url[CW_STR + 512], hdr[4096], badge[16], seq[24];
    json_t        *notif, *msg;
    cw_http_req_t *r = calloc(1, sizeof(*r));

    snprintf(badge, sizeof(badge), "%d", j->badge);
    snprintf(seq, sizeof(seq), "%lld", (long long) j->seq);
    notif = j->text[0] ? json_pack("{s:s, s:s}", "title", j->title, "body", j->text)
                       : json_pack("{s:s}", "title", j->title);
    msg = json_pack("{s:{s:s, s:o, s:{s:s, s:s, s:s}, s:{s:s, s:s, s:s, s:{s:s, s:i}}}}", "message",
                    "token", tok ? tok : "", "notification", notif,
                    "data", "conv", j->conv, "seq", seq, "badge", badge,
                    "android", "collapse_key", j->collapse, "priority", j->urgent ? "high" : "normal",
                    "ttl", "86400s", "notification", "tag", j->collapse, "notification_count", j->badge);
    if (r == NULL || msg == NULL || (r->body = json_dumps(msg, JSON_COMPACT)) == NULL) {
        json_decref(msg);
        free(r);
        cw_push_result(j, PUSH_RETRY, 1000, 0, "out of memory");
        return;
    }
    json_decref(msg);
    r->body_len = strlen(r->body);
    r->prov = PUSH_FCM;
    r->done = fcm_done;
    r->data = j;
    snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s", access_token);
    r->hdrs = curl_slist_append(r->hdrs, hdr);
    r->hdrs = curl_slist_append(r->hdrs, "Content-Type: application/json");
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");
    snprintf(url, sizeof(url), "%s/v1/projects/%s/messages:send", fcf->fcm_url, project);
    if (cw_http_post(r, url) != 0) {
        cw_http_req_free(r);
        cw_push_result(j, PUSH_RETRY, 1000, 0, "could not start the request");
    }
}

static int
fcm_send(push_job_t *j, int *outcome, int *retry_ms)
{
    const char *tok = json_string_value(json_object_get(j->regj, "token"));

    *retry_ms = 0;
    *outcome = PUSH_FAIL;
    if (fkey == NULL) return -1;
    if (tok == NULL || strlen(tok) > 4096) { *outcome = PUSH_DEAD; return -1; }
    if (access_token && cw_mono_ms() < token_expires) {
        send_now(j);
        return 0;
    }
    if (nwaiting >= fcf->push_concurrency * 4 || fetch_token() != 0) {
        *outcome = PUSH_RETRY;
        *retry_ms = 1000;
        return -1;
    }
    j->next = NULL;
    *waiting_tail = j;
    waiting_tail = &j->next;
    nwaiting++;
    return 0;
}

static void
fcm_close(void)
{
    /* jobs still waiting: the role's close returns them (leased) */
    while (waiting) {
        push_job_t *j = waiting;
        waiting = j->next;
        cw_push_result(j, PUSH_RETRY, 0, 0, "worker stopping");
    }
    free(access_token);
    access_token = NULL;
    EVP_PKEY_free(fkey);
    fkey = NULL;
}

const push_provider_t cw_push_fcm = { "fcm", fcm_init, fcm_send, NULL, fcm_close };
