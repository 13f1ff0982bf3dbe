/*
 * The push role's internals (push*.c): jobs, the HTTP/2 client over
 * libcurl's multi interface, the providers and their cryptography.
 */
#ifndef CHAT_PUSH_H
#define CHAT_PUSH_H

#include "chat_worker.h"

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/evp.h>

enum { PUSH_WEBPUSH = 0, PUSH_APNS = 1, PUSH_FCM = 2, PUSH_NPROV = 3 };

/* What a provider's answer means for the notification. */
enum {
    PUSH_OK = 0,          /* accepted */
    PUSH_RETRY,           /* 429, 5xx, network: again after retry_ms (Retry-After when given) */
    PUSH_DEAD,            /* the registration is dead: remove it */
    PUSH_FAIL,            /* refused for good (bad request): drop this notification */
    PUSH_REAUTH           /* our credentials were refused: new token, then again */
};

#define PUSH_RESP_MAX  8192

/* ---- HTTP (push_http.c) ---- */
typedef struct cw_http_req_s cw_http_req_t;
struct cw_http_req_s {
    CURL              *easy;
    struct curl_slist *hdrs;
    char              *body;           /* owned */
    size_t             body_len;
    char               resp[PUSH_RESP_MAX];
    size_t             resp_len;
    long               status;         /* 0: no HTTP answer (network error) */
    long               retry_after;    /* seconds, -1 when absent */
    char               errbuf[CURL_ERROR_SIZE];
    int                prov;           /* whose concurrency slot it takes */
    void             (*done)(cw_http_req_t *r);
    void              *data;
    cw_http_req_t     *hprev, *hnext;  /* in flight (push_http.c) */
};

int  cw_http_init(const cw_config_t *cf);
void cw_http_close(void);
/* Starts a POST of r->body to url with r->hdrs (both owned by r from now
 * on; r->done is called once, from cw_http_poll). -1 when it could not
 * start (r is then untouched and still the caller's). */
int  cw_http_post(cw_http_req_t *r, const char *url);
/* Runs transfers and completion callbacks, waiting up to timeout_ms. */
void cw_http_poll(int timeout_ms);
int  cw_http_inflight(int prov);
void cw_http_req_free(cw_http_req_t *r);

/* ---- crypto (push_crypto.c) ---- */
size_t    cw_b64url_encode(const unsigned char *in, size_t n, char *out, size_t outlen);
int       cw_b64url_decode(const char *s, size_t len, unsigned char *out, size_t max);   /* devices.c */
EVP_PKEY *cw_pem_private_key(const char *path, int want_type);
EVP_PKEY *cw_pem_private_key_mem(const char *pem, int want_type);
int       cw_ec_public_raw(EVP_PKEY *k, unsigned char out[65]);
char     *cw_jwt_sign(EVP_PKEY *k, int es256, const char *header, const char *claims);
unsigned char *cw_webpush_encrypt(const unsigned char *ua_public, const unsigned char *auth,
                                  const unsigned char *plain, size_t plen, size_t *outlen);

/* ---- one notification to one device ---- */
typedef struct push_job_s push_job_t;
struct push_job_s {
    push_job_t *next;                       /* waiting lists (FCM token) */
    int         bucket;
    char        member[CW_ID_MAX + CW_DEV_MAX + CW_CONV_MAX + 3];   /* user|device|conv */
    char        user[CW_ID_MAX + 1], device[CW_DEV_MAX + 1], conv[CW_CONV_MAX + 1];
    int64_t     lease;                      /* its score while we hold it */
    char       *reg;                        /* the registration as Redis holds it */
    json_t     *regj;
    int         prov;
    char        title[200], text[400];      /* text: "" without preview */
    int         count, badge;
    int64_t     seq, msg_ts;
    char        collapse[40];               /* per conversation, opaque */
    int         urgent;
};

/* Providers: each builds the request for a job and judges the answer. */
typedef struct {
    const char *name;
    int   (*init)(const cw_config_t *cf);     /* 1 configured, 0 not, -1 broken config */
    /* Starts the request (or queues it until credentials are ready):
     * 0, or -1 when it failed at once (then *outcome/retry_ms say what to do). */
    int   (*send)(push_job_t *j, int *outcome, int *retry_ms);
    void  (*tick)(void);                      /* token refresh etc. */
    void  (*close)(void);
} push_provider_t;

extern const push_provider_t cw_push_webpush, cw_push_apns, cw_push_fcm;

/* Called by a provider when a job's request ended (push.c). */
void cw_push_result(push_job_t *j, int outcome, int retry_ms, long status, const char *why);
/* HTTP answer -> outcome for the common cases (429/5xx/network). */
int  cw_push_common_outcome(const cw_http_req_t *r, int *retry_ms);

#endif
