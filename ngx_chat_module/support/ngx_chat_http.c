/*
 * Small HTTP helpers shared by the handlers: JSON answers, error objects,
 * query arguments.
 */
#include "ngx_chat.h"


ngx_int_t
ngx_chat_http_json(ngx_http_request_t *r, ngx_uint_t status, u_char *json,
    size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    r->headers_out.status = status;

    if (status == NGX_HTTP_NO_CONTENT) {
        r->header_only = 1;
        r->headers_out.content_length_n = 0;
        return ngx_http_send_header(r);
    }

    r->headers_out.content_length_n = len;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    /* never cached: every answer is about one user, now */
    r->headers_out.last_modified_time = -1;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = json;
    b->last = json + len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* {"type":"error","code":C,"message":M} with the given status. For a
 * status nginx has no reason phrase for (426), the status line is set.
 * Returns what the output filter returned: a content handler returns it. */
ngx_int_t
ngx_chat_http_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message)
{
    u_char  *p, *json;
    size_t   len;

    len = sizeof("{\"type\":\"error\",\"code\":\"\",\"message\":\"\"}") - 1
          + ngx_strlen(code) + ngx_strlen(message);

    json = ngx_pnalloc(r->pool, len);
    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* codes and messages are our own constants: nothing to escape */
    p = ngx_sprintf(json, "{\"type\":\"error\",\"code\":\"%s\","
                    "\"message\":\"%s\"}", code, message);

    if (status == 426) {
        ngx_str_set(&r->headers_out.status_line, "426 Upgrade Required");
    }

    if (status == NGX_HTTP_UNAUTHORIZED) {
        r->headers_out.www_authenticate = ngx_list_push(&r->headers_out.headers);
        if (r->headers_out.www_authenticate == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        r->headers_out.www_authenticate->hash = 1;
        ngx_str_set(&r->headers_out.www_authenticate->key, "WWW-Authenticate");
        ngx_str_set(&r->headers_out.www_authenticate->value, "Bearer");
    }

    return ngx_chat_http_json(r, status, json, p - json);
}


/* Retry-After: the wait in seconds, rounded up (wait in milliseconds) */
ngx_int_t
ngx_chat_http_retry_after(ngx_http_request_t *r, int64_t wait)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->value.data = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (h->value.data == NULL) {
        h->hash = 0;
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    h->value.len = ngx_sprintf(h->value.data, "%L", (wait + 999) / 1000)
                   - h->value.data;

    return NGX_OK;
}


/* 429 rate_limited with retry_after (ms) in the body and Retry-After */
ngx_int_t
ngx_chat_http_limited(ngx_http_request_t *r, const char *message,
    int64_t wait)
{
    u_char  *json, *p;

    json = ngx_pnalloc(r->pool, 128 + ngx_strlen(message));
    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_sprintf(json, "{\"type\":\"error\",\"code\":\"rate_limited\","
                    "\"message\":\"%s\",\"retry_after\":%L}", message, wait);

    (void) ngx_chat_http_retry_after(r, wait);

    return ngx_chat_http_json(r, NGX_HTTP_TOO_MANY_REQUESTS, json, p - json);
}


ngx_int_t
ngx_chat_arg_int(ngx_http_request_t *r, const char *name, size_t nlen,
    int64_t *v)
{
    ngx_str_t  arg;
    int64_t    n;
    size_t     i;

    if (ngx_http_arg(r, (u_char *) name, nlen, &arg) != NGX_OK) {
        return NGX_DECLINED;
    }

    /* the one integer range of cursors and seqs (chat_proto.h) */
    if (arg.len == 0 || arg.len > CHAT_INT_DIGITS) {
        return NGX_ERROR;
    }

    n = 0;
    for (i = 0; i < arg.len; i++) {
        if (arg.data[i] < '0' || arg.data[i] > '9') {
            return NGX_ERROR;
        }
        n = n * 10 + (arg.data[i] - '0');
    }

    if (n > CHAT_INT_MAX) {
        return NGX_ERROR;
    }

    *v = n;

    return NGX_OK;
}


ngx_int_t
ngx_chat_arg_id(ngx_http_request_t *r, const char *name, size_t nlen,
    u_char *out, size_t max, size_t *len)
{
    ngx_str_t  arg;

    if (ngx_http_arg(r, (u_char *) name, nlen, &arg) != NGX_OK) {
        return NGX_DECLINED;
    }

    if (!chat_id_valid((char *) arg.data, arg.len, max)) {
        return NGX_ERROR;
    }

    ngx_memcpy(out, arg.data, arg.len);
    *len = arg.len;

    return NGX_OK;
}
