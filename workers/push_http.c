/*
 * The push role's HTTP client: libcurl's multi interface, HTTP/2 over TLS
 * (multiplexed: one connection per provider host carries many requests),
 * connections kept and reused across requests, a bound on requests in
 * flight per provider (so one provider that hangs cannot take the slots of
 * the others), a timeout on every request. Single-threaded: the role's
 * loop calls cw_http_poll.
 */
#include "push.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static CURLM             *hm;
static const cw_config_t *hcf;
static int                inflight[PUSH_NPROV];
static cw_http_req_t     *active;          /* every request in flight */

static void
unlink_req(cw_http_req_t *r)
{
    if (r->hprev) r->hprev->hnext = r->hnext;
    else active = r->hnext;
    if (r->hnext) r->hnext->hprev = r->hprev;
    r->hprev = r->hnext = NULL;
    inflight[r->prov]--;
}

int
cw_http_init(const cw_config_t *cf)
{
    hcf = cf;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return -1;
    hm = curl_multi_init();
    if (hm == NULL) return -1;
    curl_multi_setopt(hm, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);
    /* per host: HTTP/2 multiplexes, so a few connections carry everything */
    curl_multi_setopt(hm, CURLMOPT_MAX_HOST_CONNECTIONS, 4L);
    curl_multi_setopt(hm, CURLMOPT_MAX_TOTAL_CONNECTIONS, 256L);
    curl_multi_setopt(hm, CURLMOPT_MAXCONNECTS, 256L);
    curl_multi_setopt(hm, CURLMOPT_MAX_CONCURRENT_STREAMS, 1000L);
    return 0;
}

void
cw_http_req_free(cw_http_req_t *r)
{
    if (r == NULL) return;
    if (r->easy) curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    free(r->body);
    free(r);
}

void
cw_http_close(void)
{
    if (hm) {
        /* what is still in flight at exit: its due entries are leased and
         * come back after push_lease_ms */
        while (active) {
            cw_http_req_t *r = active;
            curl_multi_remove_handle(hm, r->easy);
            unlink_req(r);
            r->status = 0;
            snprintf(r->errbuf, sizeof(r->errbuf), "worker stopping");
            r->done(r);
        }
        curl_multi_cleanup(hm);
    }
    hm = NULL;
    curl_global_cleanup();
}

static size_t
on_body(char *p, size_t size, size_t n, void *ud)
{
    cw_http_req_t *r = ud;
    size_t         len = size * n, room = sizeof(r->resp) - 1 - r->resp_len;

    if (len > room) len = room;           /* answers are small; the rest is dropped */
    memcpy(r->resp + r->resp_len, p, len);
    r->resp_len += len;
    r->resp[r->resp_len] = '\0';
    return size * n;
}

static size_t
on_header(char *p, size_t size, size_t n, void *ud)
{
    cw_http_req_t *r = ud;
    size_t         len = size * n;

    if (len > 12 && strncasecmp(p, "retry-after:", 12) == 0) {
        char  buf[32];
        size_t l = len - 12 < sizeof(buf) - 1 ? len - 12 : sizeof(buf) - 1;
        char *end;
        long  v;
        memcpy(buf, p + 12, l);
        buf[l] = '\0';
        v = strtol(buf, &end, 10);
        /* delta-seconds only; an HTTP date is treated as absent */
        if (end != buf && v >= 0 && v <= 86400) r->retry_after = v;
    }
    return len;
}

int
cw_http_post(cw_http_req_t *r, const char *url)
{
    CURL *e = curl_easy_init();

    if (e == NULL) return -1;
    r->easy = e;
    r->retry_after = -1;
    r->status = 0;
    r->resp_len = 0;
    r->resp[0] = '\0';
    r->errbuf[0] = '\0';
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body ? r->body : "");
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) r->body_len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *) r);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long) hcf->push_timeout_ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long) (hcf->push_timeout_ms < 5000 ? hcf->push_timeout_ms : 5000));
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "ngx-chat-push/1");
    if (hcf->push_ca_file[0]) curl_easy_setopt(e, CURLOPT_CAINFO, hcf->push_ca_file);
    if (curl_multi_add_handle(hm, e) != CURLM_OK) {
        curl_easy_cleanup(e);
        r->easy = NULL;
        return -1;
    }
    inflight[r->prov]++;
    r->hprev = NULL;
    r->hnext = active;
    if (active) active->hprev = r;
    active = r;
    return 0;
}

int
cw_http_inflight(int prov)
{
    return inflight[prov];
}

void
cw_http_poll(int timeout_ms)
{
    int      running = 0, left;
    CURLMsg *m;

    curl_multi_perform(hm, &running);
    if (running > 0 && timeout_ms > 0) {
        curl_multi_poll(hm, NULL, 0, timeout_ms, NULL);
        curl_multi_perform(hm, &running);
    }
    while ((m = curl_multi_info_read(hm, &left)) != NULL) {
        cw_http_req_t *r = NULL;
        if (m->msg != CURLMSG_DONE) continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **) &r);
        if (m->data.result == CURLE_OK) curl_easy_getinfo(m->easy_handle, CURLINFO_RESPONSE_CODE, &r->status);
        else {
            r->status = 0;
            if (r->errbuf[0] == '\0') snprintf(r->errbuf, sizeof(r->errbuf), "%s", curl_easy_strerror(m->data.result));
        }
        curl_multi_remove_handle(hm, m->easy_handle);
        unlink_req(r);
        r->done(r);
    }
}
