/*
 * Authentication: an HS256 JWT from "Authorization: Bearer <jwt>" or the
 * "token" query argument (browsers cannot set headers on a WebSocket), or,
 * with chat_user_variable, a user id that an upstream auth step (for
 * example auth_request) left in an nginx variable; the device then comes
 * from the "device" query argument.
 *
 * The identity is kept in the request's module context and exposed as the
 * variables $chat_user and $chat_device (logs, proxy_set_header).
 */
#include "ngx_chat.h"
#include "chat_jwt.h"


static ngx_int_t ngx_chat_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);


static ngx_http_variable_t  ngx_chat_vars[] = {

    { ngx_string("chat_user"), NULL, ngx_chat_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("chat_device"), NULL, ngx_chat_variable, 1,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


ngx_int_t
ngx_chat_auth_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_chat_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_chat_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    ngx_chat_identity_t  *id;

    id = ngx_http_get_module_ctx(r->main, ngx_chat_module);
    if (id == NULL || id->user_len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    if (data == 0) {
        v->data = id->user;
        v->len = id->user_len;

    } else {
        v->data = id->device;
        v->len = id->dev_len;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_chat_token(ngx_http_request_t *r, ngx_str_t *token)
{
    ngx_table_elt_t  *h;
    ngx_str_t         arg;

    h = r->headers_in.authorization;

    if (h) {
        if (h->value.len > 7
            && ngx_strncasecmp(h->value.data, (u_char *) "Bearer ", 7) == 0)
        {
            token->data = h->value.data + 7;
            token->len = h->value.len - 7;

            while (token->len && *token->data == ' ') {
                token->data++;
                token->len--;
            }

            return token->len ? NGX_OK : NGX_DECLINED;
        }

        return NGX_DECLINED;
    }

    if (ngx_http_arg(r, (u_char *) "token", 5, &arg) == NGX_OK && arg.len) {
        /* base64url and '.' need no unescaping */
        *token = arg;
        return NGX_OK;
    }

    return NGX_DECLINED;
}


/*
 * NGX_OK: *id filled and kept in the request context.
 * NGX_HTTP_UNAUTHORIZED: the caller answers 401 (the reason is logged).
 */
ngx_int_t
ngx_chat_authenticate(ngx_http_request_t *r, ngx_chat_identity_t *id)
{
    ngx_str_t              token, user, dev;
    chat_jwt_rc_t          rc;
    chat_jwt_claims_t      claims;
    ngx_chat_loc_conf_t   *clcf;
    ngx_chat_main_conf_t  *cmcf;
    ngx_chat_identity_t   *ctx;

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);
    cmcf = ngx_http_get_module_main_conf(r, ngx_chat_module);

    ngx_memzero(id, sizeof(ngx_chat_identity_t));

    if (clcf->user_var) {
        if (ngx_http_complex_value(r, clcf->user_var, &user) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (!chat_id_valid((char *) user.data, user.len, NGX_CHAT_USER_MAX)) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "chat: no valid user in chat_user_variable");
            goto unauthorized;
        }

        if (ngx_http_arg(r, (u_char *) "device", 6, &dev) != NGX_OK
            || dev.len == 0)
        {
            ngx_str_set(&dev, CHAT_JWT_DEFAULT_DEV);

        } else if (!chat_id_valid((char *) dev.data, dev.len,
                                  NGX_CHAT_DEVICE_MAX))
        {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "chat: invalid device argument");
            goto unauthorized;
        }

        id->user_len = user.len;
        ngx_memcpy(id->user, user.data, user.len);
        id->dev_len = dev.len;
        ngx_memcpy(id->device, dev.data, dev.len);
        goto done;
    }

    if (ngx_chat_token(r, &token) != NGX_OK) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "chat: no bearer token");
        goto unauthorized;
    }

    rc = chat_jwt_verify((char *) token.data, token.len,
                         cmcf->jwt_secret.data, cmcf->jwt_secret.len,
                         (int64_t) ngx_time(), (int64_t) cmcf->jwt_leeway,
                         &claims);

    if (rc != CHAT_JWT_OK) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "chat: token refused: %s", chat_jwt_strerror(rc));
        goto unauthorized;
    }

    id->user_len = claims.sub_len;
    ngx_memcpy(id->user, claims.sub, claims.sub_len);
    id->dev_len = claims.dev_len;
    ngx_memcpy(id->device, claims.dev, claims.dev_len);

done:

    ctx = ngx_palloc(r->main->pool, sizeof(ngx_chat_identity_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    *ctx = *id;
    ngx_http_set_ctx(r->main, ctx, ngx_chat_module);

    return NGX_OK;

unauthorized:

    ngx_chat_stat_inc(auth_failed);

    return NGX_HTTP_UNAUTHORIZED;
}


/* chat_auth on: the access phase authenticates, the location proxies. */
ngx_int_t
ngx_chat_auth_access_handler(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    ngx_chat_identity_t   id;
    ngx_chat_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);

    if (!clcf->auth || r != r->main) {
        return NGX_DECLINED;
    }

    if (ngx_http_get_module_ctx(r, ngx_chat_module)) {
        return NGX_DECLINED;
    }

    rc = ngx_chat_authenticate(r, &id);

    if (rc == NGX_HTTP_UNAUTHORIZED) {
        rc = ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                 "missing, invalid or expired token");
        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }

    if (rc != NGX_OK) {
        return rc;
    }

    return NGX_DECLINED;
}
