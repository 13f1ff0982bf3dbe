/* MongoDB helpers shared by the persist and rest roles. */
#include "chat_worker.h"

#include <jansson.h>
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <string.h>

/* FerretDB does not implement endSessions; libmongoc warns about it on every
 * client shutdown. Everything else libmongoc logs is passed on. */
static void
mongo_log(mongoc_log_level_t level, const char *domain, const char *message, void *data)
{
    (void) data;
    if (strstr(message, "endSessions") != NULL) return;
    if (level > MONGOC_LOG_LEVEL_MESSAGE) return;
    mongoc_log_default_handler(level, domain, message, NULL);
}

void
cw_mongo_log_init(void)
{
    mongoc_log_set_handler(mongo_log, NULL);
}

/* A single-threaded client with bounded timeouts (the socket's unless the
 * URI names one); db receives the URI's database (default "chat"). */
mongoc_client_t *
cw_mongo_client_timeout(const cw_config_t *cf, const char *app, char *db, size_t dblen, int socket_timeout_ms)
{
    mongoc_uri_t    *uri;
    mongoc_client_t *client;
    bson_error_t     error;
    const char      *d;

    if (cf->mongo_uri[0] == '\0') {
        cw_error("no mongo_uri configured");
        return NULL;
    }
    uri = mongoc_uri_new_with_error(cf->mongo_uri, &error);
    if (uri == NULL) {
        cw_error("bad mongo uri: %s", error.message);
        return NULL;
    }
    if (!mongoc_uri_has_option(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS))
        mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, 3000);
    if (!mongoc_uri_has_option(uri, MONGOC_URI_CONNECTTIMEOUTMS))
        mongoc_uri_set_option_as_int32(uri, MONGOC_URI_CONNECTTIMEOUTMS, 2000);
    if (!mongoc_uri_has_option(uri, MONGOC_URI_SOCKETTIMEOUTMS))
        mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SOCKETTIMEOUTMS, socket_timeout_ms);
    d = mongoc_uri_get_database(uri);
    snprintf(db, dblen, "%s", d ? d : "chat");
    client = mongoc_client_new_from_uri(uri);
    mongoc_uri_destroy(uri);
    if (client == NULL) {
        cw_error("mongoc client creation failed");
        return NULL;
    }
    mongoc_client_set_appname(client, app);
    mongoc_client_set_error_api(client, MONGOC_ERROR_API_VERSION_2);
    return client;
}

mongoc_client_t *
cw_mongo_client(const cw_config_t *cf, const char *app, char *db, size_t dblen)
{
    return cw_mongo_client_timeout(cf, app, db, dblen, 30000);
}

static json_t *
iter_to_json(bson_iter_t *it)
{
    switch (bson_iter_type(it)) {
    case BSON_TYPE_UTF8: {
        uint32_t    len;
        const char *s = bson_iter_utf8(it, &len);
        return json_stringn(s, len);
    }
    case BSON_TYPE_INT32:
        return json_integer(bson_iter_int32(it));
    case BSON_TYPE_INT64:
        return json_integer(bson_iter_int64(it));
    case BSON_TYPE_DOUBLE:
        return json_real(bson_iter_double(it));
    case BSON_TYPE_BOOL:
        return json_boolean(bson_iter_bool(it));
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY: {
        bson_iter_t child;
        int         arr = bson_iter_type(it) == BSON_TYPE_ARRAY;
        json_t     *out = arr ? json_array() : json_object();
        if (out == NULL || !bson_iter_recurse(it, &child)) return out;
        while (bson_iter_next(&child)) {
            json_t *v = iter_to_json(&child);
            if (v == NULL) continue;
            if (arr) json_array_append_new(out, v);
            else json_object_set_new(out, bson_iter_key(&child), v);
        }
        return out;
    }
    case BSON_TYPE_NULL:
        return json_null();
    default:
        return NULL;                         /* not part of our schema */
    }
}

json_t *
cw_bson_to_json(const bson_t *doc)
{
    bson_iter_t it;
    json_t     *out = json_object();

    if (out == NULL || !bson_iter_init(&it, doc)) return out;
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        json_t     *v = iter_to_json(&it);
        if (v == NULL) continue;
        json_object_set_new(out, strcmp(k, "_id") == 0 ? "id" : k, v);
    }
    return out;
}
