/*
 * Browsers on other origins: CORS for the HTTP endpoints, driven by
 * chat_allowed_origins (the list the WebSocket handshake checks), and the
 * HTTP headers every chat answer carries.
 *
 *   - OPTIONS on a chat HTTP location (not the WebSocket one) is answered
 *     204 in the preaccess phase, before authentication: a preflight carries
 *     no token.  It has Allow; when the Origin is in the list it also has
 *     Access-Control-Allow-Origin/-Methods/-Headers/-Max-Age.  An origin
 *     not in the list (or no list at all) gets no CORS header, so the
 *     browser refuses the request it wanted to make.
 *   - every answer of a chat location (module handlers and chat_auth
 *     locations, whoever produced the answer) gets, from a header filter:
 *     Access-Control-Allow-Origin and -Expose-Headers for an allowed Origin,
 *     Vary: Origin when a list is configured, Cache-Control: no-store
 *     (PROTOCOL 11: never cached) unless the answer has its own, and Allow
 *     on a 405 of the module's own handlers.
 *
 * No credentials mode: tokens travel in Authorization, never in cookies, so
 * Access-Control-Allow-Credentials is not sent.
 */
#include "ngx_chat.h"


static ngx_int_t ngx_chat_cors_preflight(ngx_http_request_t *r);
static ngx_int_t ngx_chat_cors_header_filter(ngx_http_request_t *r);


static ngx_http_output_header_filter_pt  ngx_chat_cors_next_header_filter;


static ngx_str_t  ngx_chat_cors_allow_headers =
    ngx_string("Authorization, Content-Type");
static ngx_str_t  ngx_chat_cors_expose_headers =
    ngx_string("Retry-After, WWW-Authenticate");
static ngx_str_t  ngx_chat_cors_max_age = ngx_string("600");


/* The methods a chat location answers; an empty string for a location
 * that is not a chat HTTP endpoint. */
static void
ngx_chat_cors_methods(ngx_chat_loc_conf_t *clcf, ngx_str_t *m)
{
    switch (clcf->handlers) {

    case NGX_CHAT_LOC_WEBSOCKET:
        ngx_str_set(m, "GET");
        return;

    case NGX_CHAT_LOC_POLL:
        ngx_str_set(m, "GET, OPTIONS");
        return;

    case NGX_CHAT_LOC_PRESENCE:
        ngx_str_set(m, "GET, HEAD, OPTIONS");
        return;

    case NGX_CHAT_LOC_SEND:
    case NGX_CHAT_LOC_ACK:
    case NGX_CHAT_LOC_READ:
    case NGX_CHAT_LOC_TYPING:
        ngx_str_set(m, "POST, OPTIONS");
        return;

    default:
        break;
    }

    if (clcf->auth) {
        /* the REST worker's endpoints: reads and the group changes */
        ngx_str_set(m, "GET, POST, OPTIONS");
        return;
    }

    ngx_str_null(m);
}


static ngx_table_elt_t *
ngx_chat_cors_find(ngx_list_t *list, const char *name, size_t len)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &list->part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash != 0 && h[i].key.len == len
            && ngx_strncasecmp(h[i].key.data, (u_char *) name, len) == 0)
        {
            return &h[i];
        }
    }
}


static ngx_int_t
ngx_chat_cors_add(ngx_http_request_t *r, const char *key, ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) key;
    h->key.len = ngx_strlen(key);
    h->value = *value;
#if (nginx_version >= 1023000)
    h->next = NULL;
#endif

    return NGX_OK;
}


/* The request's Origin when it is in chat_allowed_origins, else NULL (also
 * with no list: cross-origin HTTP is off until origins are named). */
static ngx_table_elt_t *
ngx_chat_cors_allowed(ngx_http_request_t *r, ngx_chat_loc_conf_t *clcf)
{
    ngx_str_t        *o;
    ngx_uint_t        i;
    ngx_table_elt_t  *h;

    if (clcf->origins == NULL) {
        return NULL;
    }

    h = ngx_chat_cors_find(&r->headers_in.headers, "Origin", 6);
    if (h == NULL) {
        return NULL;
    }

    o = clcf->origins->elts;
    for (i = 0; i < clcf->origins->nelts; i++) {
        if (o[i].len == h->value.len
            && ngx_strncasecmp(o[i].data, h->value.data, o[i].len) == 0)
        {
            return h;
        }
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "chat cors: origin \"%V\" not allowed", &h->value);

    return NULL;
}


/* Preaccess phase: answer OPTIONS before chat_auth asks for a token. */
static ngx_int_t
ngx_chat_cors_preflight(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    ngx_str_t             methods;
    ngx_table_elt_t      *origin;
    ngx_chat_loc_conf_t  *clcf;

    if (r->method != NGX_HTTP_OPTIONS || r != r->main) {
        return NGX_DECLINED;
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);

    if (clcf->handlers == NGX_CHAT_LOC_WEBSOCKET) {
        return NGX_DECLINED;        /* not fetchable: the handshake's 405 */
    }

    ngx_chat_cors_methods(clcf, &methods);
    if (methods.len == 0) {
        return NGX_DECLINED;
    }

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    origin = ngx_chat_cors_allowed(r, clcf);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "chat cors: preflight %s, methods \"%V\"",
                   origin ? "allowed" : "without cors", &methods);

    /* the filter adds Allow-Origin and Vary; Allow-Methods names what a
     * browser may do next, so OPTIONS itself is left out */
    if (origin) {
        methods.len -= sizeof(", OPTIONS") - 1;

        if (ngx_chat_cors_add(r, "Access-Control-Allow-Methods", &methods)
                != NGX_OK
            || ngx_chat_cors_add(r, "Access-Control-Allow-Headers",
                                 &ngx_chat_cors_allow_headers) != NGX_OK
            || ngx_chat_cors_add(r, "Access-Control-Max-Age",
                                 &ngx_chat_cors_max_age) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    /* Allow is added by the filter for every OPTIONS answer */
    rc = ngx_chat_http_json(r, NGX_HTTP_NO_CONTENT, NULL, 0);

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


static ngx_int_t
ngx_chat_cors_header_filter(ngx_http_request_t *r)
{
    ngx_str_t             methods, v;
    ngx_table_elt_t      *origin;
    ngx_chat_loc_conf_t  *clcf;

    if (r != r->main
        || r->headers_out.status == NGX_HTTP_SWITCHING_PROTOCOLS)
    {
        return ngx_chat_cors_next_header_filter(r);
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);
    if (clcf == NULL) {
        return ngx_chat_cors_next_header_filter(r);
    }

    ngx_chat_cors_methods(clcf, &methods);
    if (methods.len == 0) {
        return ngx_chat_cors_next_header_filter(r);
    }

    origin = ngx_chat_cors_allowed(r, clcf);

    if (origin) {
        if (ngx_chat_cors_add(r, "Access-Control-Allow-Origin",
                              &origin->value) != NGX_OK
            || ngx_chat_cors_add(r, "Access-Control-Expose-Headers",
                                 &ngx_chat_cors_expose_headers) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (clcf->origins) {
        ngx_str_set(&v, "Origin");
        if (ngx_chat_cors_add(r, "Vary", &v) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (ngx_chat_cors_find(&r->headers_out.headers, "Cache-Control", 13)
        == NULL)
    {
        ngx_str_set(&v, "no-store");
        if (ngx_chat_cors_add(r, "Cache-Control", &v) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    /* Allow on the module's own 405s and OPTIONS answers (a proxied 405
     * comes from the REST worker, which knows its paths) */
    if ((r->headers_out.status == NGX_HTTP_NOT_ALLOWED
         && clcf->handlers != 0)
        || (r->method == NGX_HTTP_OPTIONS
            && r->headers_out.status == NGX_HTTP_NO_CONTENT))
    {
        if (ngx_chat_cors_find(&r->headers_out.headers, "Allow", 5) == NULL
            && ngx_chat_cors_add(r, "Allow", &methods) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return ngx_chat_cors_next_header_filter(r);
}


/* chat_allowed_origins <origin> ...: every argument is an entry (the stock
 * str_array slot keeps only the first argument of each directive); the
 * directive may also be repeated. */
char *
ngx_chat_cors_set_origins(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_loc_conf_t  *clcf = conf;

    ngx_str_t   *value, *o;
    ngx_uint_t   i;

    if (clcf->origins == NGX_CONF_UNSET_PTR) {
        clcf->origins = ngx_array_create(cf->pool, cf->args->nelts - 1,
                                         sizeof(ngx_str_t));
        if (clcf->origins == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {
        if (value[i].len == 0 || value[i].data[value[i].len - 1] == '/') {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid origin \"%V\" (scheme://host[:port], "
                               "no trailing slash)", &value[i]);
            return NGX_CONF_ERROR;
        }

        o = ngx_array_push(clcf->origins);
        if (o == NULL) {
            return NGX_CONF_ERROR;
        }

        *o = value[i];
    }

    return NGX_CONF_OK;
}


ngx_int_t
ngx_chat_cors_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_chat_cors_preflight;

    ngx_chat_cors_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_chat_cors_header_filter;

    return NGX_OK;
}
