/*
 * Push registrations of devices in the rest role (docs/PROTOCOL.md,
 * "Push notifications").
 */
#include "chat_worker.h"

#include <jansson.h>
#include <mongoc/mongoc.h>

int
cw_devices_request(const char *method, const char *path, const char *user, const char *device,
                   const char *body, size_t body_len, mongoc_client_t *client, const char *db, json_t **out)
{
    (void) method; (void) path; (void) user; (void) device; (void) body; (void) body_len; (void) client; (void) db;
    *out = json_pack("{s:s, s:s, s:s}", "type", "error", "code", "not_found", "message", "no such endpoint");
    return 404;
}
