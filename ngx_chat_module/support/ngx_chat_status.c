/*
 * Counters shared by every worker process (one shared memory zone of
 * atomics, like stub_status) and the chat_status location that prints them
 * in Prometheus text format.
 */
#include "ngx_chat.h"


ngx_chat_stats_t  *ngx_chat_stats;

static ngx_chat_stats_t  ngx_chat_stats_fallback;


typedef struct {
    const char   *name;
    const char   *labels;
    const char   *type;
    const char   *help;
    size_t        offset;
} ngx_chat_stat_desc_t;

#define NGX_CHAT_STAT_DESC(field, name, labels, type, help)                  \
    { name, labels, type, help, offsetof(ngx_chat_stats_t, field) },

static ngx_chat_stat_desc_t  ngx_chat_stat_descs[] = {
    NGX_CHAT_STATS(NGX_CHAT_STAT_DESC)
    { NULL, NULL, NULL, NULL, 0 }
};


static ngx_int_t
ngx_chat_stats_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_slab_pool_t  *shpool;

    if (data) {
        /* reload: keep counting in the zone of the previous cycle */
        shm_zone->data = data;
        ngx_chat_stats = data;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    ngx_chat_stats = ngx_slab_calloc(shpool, sizeof(ngx_chat_stats_t));
    if (ngx_chat_stats == NULL) {
        return NGX_ERROR;
    }

    shm_zone->data = ngx_chat_stats;

    return NGX_OK;
}


ngx_int_t
ngx_chat_stats_add_zone(ngx_conf_t *cf)
{
    ngx_str_t        name = ngx_string("ngx_chat_stats");
    ngx_shm_zone_t  *zone;

    ngx_chat_stats = &ngx_chat_stats_fallback;

    zone = ngx_shared_memory_add(cf, &name, 8 * ngx_pagesize, &ngx_chat_module);
    if (zone == NULL) {
        return NGX_ERROR;
    }

    zone->init = ngx_chat_stats_init_zone;

    return NGX_OK;
}


ngx_int_t
ngx_chat_status_handler(ngx_http_request_t *r)
{
    size_t                 size;
    ngx_int_t              rc;
    ngx_buf_t             *b;
    ngx_chat_stat_desc_t  *d;
    ngx_chain_t            out;
    const char            *last_name;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    size = 0;
    for (d = ngx_chat_stat_descs; d->name; d++) {
        size += 2 * ngx_strlen(d->name) + ngx_strlen(d->help)
                + ngx_strlen(d->type) + ngx_strlen(d->labels) + 64 + NGX_ATOMIC_T_LEN;
    }

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    last_name = NULL;
    for (d = ngx_chat_stat_descs; d->name; d++) {
        if (last_name == NULL || ngx_strcmp(last_name, d->name) != 0) {
            b->last = ngx_sprintf(b->last, "# HELP %s %s\n# TYPE %s %s\n",
                                  d->name, d->help, d->name, d->type);
            last_name = d->name;
        }
        b->last = ngx_sprintf(b->last, "%s%s %uA\n", d->name, d->labels,
                      *(ngx_atomic_t *) ((u_char *) ngx_chat_stats + d->offset));
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "text/plain; version=0.0.4");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;
    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
