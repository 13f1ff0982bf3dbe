/*
 * libFuzzer target for chat_proto_parse.  The first byte picks the
 * endpoint default type and a body limit; the rest is the frame.  Checks
 * that every result is consistent and every slice lies inside the input.
 * Aborts when an invariant does not hold.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat_json.h"
#include "chat_proto.h"

#define CHECK(c)  do { if (!(c)) abort(); } while (0)

static const char *in_base;
static size_t      in_len;

static void
check_slice(chat_proto_str_t s, int may_be_empty)
{
    static char buf[65536];
    size_t      n;

    if (s.len == 0) {
        CHECK(may_be_empty);
        return;
    }
    CHECK(s.p >= in_base && s.p + s.len <= in_base + in_len);
    CHECK(s.len <= sizeof(buf));
    CHECK(chat_json_unescape(s.p, s.len, buf, s.len, &n) == CHAT_JSON_OK);
    CHECK(s.esc || (n == s.len && memcmp(buf, s.p, n) == 0));
}

static size_t
cps(chat_proto_str_t s)
{
    size_t n = 0;

    CHECK(chat_json_count_cp(s.p, s.len, &n) == CHAT_JSON_OK);
    return n;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    chat_proto_frame_t f;
    chat_proto_opts_t  o;
    chat_proto_rc_t    rc;
    const char        *msg = NULL;
    char               id[CHAT_ID_MAX + 1];
    size_t             pos, n;
    unsigned           count;

    if (size == 0 || size > 65536) {
        return 0;
    }
    o.default_type = (chat_proto_type_t) (data[0] % 8);
    o.max_body = (data[0] & 0x80) ? 8 : 0;
    o.max_media_size = (data[0] & 0x40) ? 1000 : 0;
    in_base = (const char *) data + 1;
    in_len = size - 1;

    memset(&f, 0xA5, sizeof(f));
    rc = chat_proto_parse(in_base, in_len, &o, &f, &msg);
    CHECK(rc == CHAT_PROTO_OK || rc == CHAT_PROTO_BAD_REQUEST
          || rc == CHAT_PROTO_TOO_LARGE);
    CHECK(chat_proto_code(rc) != NULL);

    if (rc != CHAT_PROTO_OK) {
        CHECK(msg != NULL && msg[0] != '\0');
        CHECK(strchr(msg, '"') == NULL && strchr(msg, '\\') == NULL);
        CHECK(f.type <= CHAT_PROTO_PING);
        if (f.type == CHAT_PROTO_SEND && f.client_id.len) {
            check_slice(f.client_id, 0);
            n = cps(f.client_id);
            CHECK(n >= 1 && n <= CHAT_PROTO_CLIENT_ID_MAX);
        } else {
            CHECK(f.client_id.len == 0);
        }
        CHECK(f.body.len == 0 && f.nusers == 0 && f.target_len == 0);
        return 0;
    }

    CHECK(msg == NULL);
    CHECK(f.type >= CHAT_PROTO_SEND && f.type <= CHAT_PROTO_PING);
    CHECK(o.default_type == CHAT_PROTO_NONE || f.type == o.default_type);

    switch (f.type) {
    case CHAT_PROTO_SEND:
    case CHAT_PROTO_TYPING:
        CHECK(f.target == CHAT_PROTO_TARGET_USER
              || f.target == CHAT_PROTO_TARGET_GROUP);
        CHECK(f.target_len == strlen(f.target_id));
        CHECK(chat_id_valid(f.target_id, f.target_len, CHAT_ID_MAX));
        if (f.type == CHAT_PROTO_TYPING) {
            break;
        }
        check_slice(f.client_id, 0);
        n = cps(f.client_id);
        CHECK(n >= 1 && n <= CHAT_PROTO_CLIENT_ID_MAX);
        check_slice(f.body, f.kind == CHAT_PROTO_MEDIA);
        CHECK(cps(f.body) == f.body_chars);
        CHECK(f.body_chars <= (o.max_body ? o.max_body
                                          : CHAT_PROTO_MAX_BODY_DEFAULT));
        if (f.kind == CHAT_PROTO_MEDIA) {
            check_slice(f.media_url, 0);
            check_slice(f.media_mime, 0);
            CHECK(f.media_size >= 1
                  && f.media_size <= (o.max_media_size > 0
                                      ? o.max_media_size
                                      : CHAT_PROTO_MAX_MEDIA_DEFAULT));
        } else {
            CHECK(f.kind == CHAT_PROTO_TEXT && f.body_chars >= 1);
            CHECK(f.media_url.len == 0 && f.media_mime.len == 0);
        }
        break;

    case CHAT_PROTO_ACK:
        CHECK(f.cursor >= 0);
        break;

    case CHAT_PROTO_READ:
        CHECK(f.seq >= 0);
        CHECK(f.conv_len == strlen(f.conv));
        CHECK(chat_conv_valid(f.conv, f.conv_len));
        break;

    case CHAT_PROTO_WATCH:
    case CHAT_PROTO_UNWATCH:
        CHECK(f.nusers >= 1 && f.nusers <= CHAT_PROTO_MAX_USERS);
        CHECK(f.users.p >= in_base
              && f.users.p + f.users.len <= in_base + in_len);
        CHECK(f.users.p[0] == '[' && f.users.p[f.users.len - 1] == ']');
        pos = 0;
        count = 0;
        while (chat_proto_users_next(&f, &pos, id, &n)) {
            CHECK(n == strlen(id) && chat_id_valid(id, n, CHAT_ID_MAX));
            CHECK(pos <= f.users.len);
            count++;
        }
        CHECK(count == f.nusers);
        break;

    default:
        break;
    }
    return 0;
}
