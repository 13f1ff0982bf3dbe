/*
 * Unit tests for chat_proto (client frame parser, id helpers).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <string.h>
#include <stdio.h>
#include <cmocka.h>

#include "chat_proto.h"

static chat_proto_frame_t f;
static const char        *msg;

static chat_proto_rc_t
parse_opts(const char *s, const chat_proto_opts_t *o)
{
    chat_proto_rc_t rc = chat_proto_parse(s, strlen(s), o, &f, &msg);

    if (rc == CHAT_PROTO_OK) {
        assert_null(msg);
    } else {
        /* every message can go into a JSON string as it is */
        assert_non_null(msg);
        assert_true(strlen(msg) > 0);
        assert_null(strchr(msg, '"'));
        assert_null(strchr(msg, '\\'));
        /* only the type and a valid send client_id survive an error */
        assert_true(f.cursor == 0 && f.seq == 0 && f.media_size == 0);
        assert_int_equal(f.target, CHAT_PROTO_TARGET_NONE);
        assert_int_equal(f.body.len, 0);
        assert_int_equal(f.nusers, 0);
        if (f.type != CHAT_PROTO_SEND) {
            assert_int_equal(f.client_id.len, 0);
        }
    }
    return rc;
}

static chat_proto_rc_t
parse(const char *s)
{
    return parse_opts(s, NULL);
}

#define OK(s)       assert_int_equal(parse(s), CHAT_PROTO_OK)
#define BAD(s)      assert_int_equal(parse(s), CHAT_PROTO_BAD_REQUEST)
#define BIG(s)      assert_int_equal(parse(s), CHAT_PROTO_TOO_LARGE)
#define BADMSG(s, m) do { BAD(s); assert_string_equal(msg, (m)); } while (0)

static int
slice_eq(chat_proto_str_t s, const char *lit)
{
    return s.len == strlen(lit) && memcmp(s.p, lit, s.len) == 0;
}

/* ---------------------------------------------------------------------- */

static void
test_send_text(void **state)
{
    const char *s =
        "{\"type\":\"send\",\"client_id\":\"c-1\",\"to\":\"bob\","
        "\"body\":\"hi \\\"bob\\\"\"}";

    (void) state;
    assert_int_equal(parse(s), CHAT_PROTO_OK);
    assert_int_equal(f.type, CHAT_PROTO_SEND);
    assert_int_equal(f.target, CHAT_PROTO_TARGET_USER);
    assert_string_equal(f.target_id, "bob");
    assert_int_equal(f.target_len, 3);
    assert_int_equal(f.kind, CHAT_PROTO_TEXT);
    assert_true(slice_eq(f.client_id, "c-1"));
    assert_int_equal(f.client_id.esc, 0);
    /* raw, still escaped, pointing into the input */
    assert_true(slice_eq(f.body, "hi \\\"bob\\\""));
    assert_int_equal(f.body.esc, 1);
    assert_true(f.body.p > s && f.body.p + f.body.len < s + strlen(s));
    assert_int_equal(f.body_chars, 8);

    /* group, explicit kind, fields in any order, blanks */
    OK(" { \"body\" : \"x\" , \"kind\":\"text\", \"group\":\"ops.team_1\","
       " \"client_id\":\"k\", \"type\":\"send\" } ");
    assert_int_equal(f.target, CHAT_PROTO_TARGET_GROUP);
    assert_string_equal(f.target_id, "ops.team_1");

    /* ids are compared decoded */
    OK("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"\\u0062ob\","
       "\"body\":\"x\"}");
    assert_string_equal(f.target_id, "bob");
    OK("{\"t\\u0079pe\":\"s\\u0065nd\",\"client_id\":\"k\",\"to\":\"bob\","
       "\"body\":\"x\"}");
    assert_int_equal(f.type, CHAT_PROTO_SEND);

    /* unknown fields are ignored, so are fields of other types */
    OK("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"bob\",\"body\":\"x\","
       "\"reply_to\":{\"id\":\"123\",\"x\":[1,2,{}]},\"cursor\":\"nope\","
       "\"users\":7}");
}

static void
test_send_target(void **state)
{
    char s[256];

    (void) state;
    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"body\":\"x\"}",
           "exactly one of to and group is required");
    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"a\","
           "\"group\":\"g\",\"body\":\"x\"}",
           "exactly one of to and group is required");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"\",\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"a b\",\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"a:b\",\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"\xC3\xA9\","
        "\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":5,\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":null,\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":[\"a\"],\"body\":\"x\"}");
    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"group\":\"g/1\","
           "\"body\":\"x\"}", "group must be a valid group id");

    snprintf(s, sizeof(s), "{\"type\":\"send\",\"client_id\":\"k\","
             "\"to\":\"%.64s\",\"body\":\"x\"}",
             "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    OK(s);
    assert_int_equal(f.target_len, 64);
    snprintf(s, sizeof(s), "{\"type\":\"send\",\"client_id\":\"k\","
             "\"to\":\"%.65s\",\"body\":\"x\"}",
             "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    BAD(s);
}

static void
test_send_client_id(void **state)
{
    char   s[1024];
    size_t n;
    int    i;

    (void) state;
    BADMSG("{\"type\":\"send\",\"to\":\"b\",\"body\":\"x\"}",
           "missing client_id");
    BAD("{\"type\":\"send\",\"client_id\":\"\",\"to\":\"b\",\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":7,\"to\":\"b\",\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"a\\u0001\",\"to\":\"b\","
        "\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"a\\n\",\"to\":\"b\","
        "\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"a\x7F\",\"to\":\"b\","
        "\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"a\\u007f\",\"to\":\"b\","
        "\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"a\xC2\x85\",\"to\":\"b\","
        "\"body\":\"x\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"a\\u009f\",\"to\":\"b\","
        "\"body\":\"x\"}");
    /* printable non-ASCII, quotes and spaces are fine */
    OK("{\"type\":\"send\",\"client_id\":\"\\\"id\\\" 1 \xC2\xA0\xE2\x9C\x93\","
       "\"to\":\"b\",\"body\":\"x\"}");
    assert_int_equal(f.client_id.esc, 1);
    OK("{\"type\":\"send\",\"client_id\":\"550e8400-e29b-41d4-a716-446655440000\","
       "\"to\":\"b\",\"body\":\"x\"}");

    /* 64 characters (emoji, 4 bytes each) pass, 65 do not */
    n = (size_t) snprintf(s, sizeof(s), "{\"type\":\"send\",\"client_id\":\"");
    for (i = 0; i < 64; i++) {
        memcpy(s + n, "\xF0\x9F\x98\x80", 4);
        n += 4;
    }
    snprintf(s + n, sizeof(s) - n, "\",\"to\":\"b\",\"body\":\"x\"}");
    OK(s);
    assert_int_equal(f.client_id.len, 256);
    memcpy(s + n, "x", 1);
    snprintf(s + n + 1, sizeof(s) - n - 1, "\",\"to\":\"b\",\"body\":\"x\"}");
    BADMSG(s, "client_id must be 1 to 64 characters");

    /* escaped form counts decoded characters */
    n = (size_t) snprintf(s, sizeof(s), "{\"type\":\"send\",\"client_id\":\"");
    for (i = 0; i < 64; i++) {
        memcpy(s + n, "\\ud83d\\ude00", 12);
        n += 12;
    }
    snprintf(s + n, sizeof(s) - n, "\",\"to\":\"b\",\"body\":\"x\"}");
    OK(s);
}

/* a send frame whose body is count times unit */
static void
body_frame(char *s, size_t cap, const char *unit, int count,
    const char *extra)
{
    size_t n, u = strlen(unit);
    int    i;

    n = (size_t) snprintf(s, cap, "{\"type\":\"send\",\"client_id\":\"k\","
                          "\"to\":\"bob\",%s\"body\":\"", extra);
    for (i = 0; i < count; i++) {
        assert_true(n + u < cap);
        memcpy(s + n, unit, u);
        n += u;
    }
    snprintf(s + n, cap - n, "\"}");
}

static void
test_send_body_limit(void **state)
{
    static char       s[20000];
    chat_proto_opts_t o = { 5, 0, CHAT_PROTO_NONE };

    (void) state;
    /* 1000 emoji (4000 bytes) are allowed, 1001 are too large */
    body_frame(s, sizeof(s), "\xF0\x9F\x98\x80", 1000, "");
    OK(s);
    assert_int_equal(f.body_chars, 1000);
    assert_int_equal(f.body.len, 4000);
    body_frame(s, sizeof(s), "\xF0\x9F\x98\x80", 1001, "");
    BIG(s);
    assert_string_equal(msg, "body too long");

    /* the same as escaped surrogate pairs */
    body_frame(s, sizeof(s), "\\ud83d\\ude00", 1000, "");
    OK(s);
    assert_int_equal(f.body_chars, 1000);
    body_frame(s, sizeof(s), "\\ud83d\\ude00", 1001, "");
    BIG(s);

    /* ASCII, two- and three-byte characters, escapes */
    body_frame(s, sizeof(s), "a", 1000, "");
    OK(s);
    body_frame(s, sizeof(s), "a", 1001, "");
    BIG(s);
    body_frame(s, sizeof(s), "\xC3\xA9", 1000, "");
    OK(s);
    body_frame(s, sizeof(s), "\xE2\x82\xAC", 1001, "");
    BIG(s);
    body_frame(s, sizeof(s), "\\n", 1000, "");
    OK(s);
    body_frame(s, sizeof(s), "\\n", 1001, "");
    BIG(s);

    /* configured limit */
    assert_int_equal(parse_opts("{\"type\":\"send\",\"client_id\":\"k\","
                                "\"to\":\"b\",\"body\":\"12345\"}", &o),
                     CHAT_PROTO_OK);
    assert_int_equal(parse_opts("{\"type\":\"send\",\"client_id\":\"k\","
                                "\"to\":\"b\",\"body\":\"123456\"}", &o),
                     CHAT_PROTO_TOO_LARGE);
}

static void
test_error_keeps_client_id(void **state)
{
    static char s[8192];

    (void) state;
    /* a refused send still names its client_id for the error answer */
    body_frame(s, sizeof(s), "a", 1001, "");
    BIG(s);
    assert_int_equal(f.type, CHAT_PROTO_SEND);
    assert_true(slice_eq(f.client_id, "k"));
    BAD("{\"type\":\"send\",\"client_id\":\"c\\\"9\",\"to\":\"a b\","
        "\"body\":\"x\"}");
    assert_int_equal(f.type, CHAT_PROTO_SEND);
    assert_true(slice_eq(f.client_id, "c\\\"9"));
    assert_int_equal(f.client_id.esc, 1);
    /* but not an invalid one */
    BAD("{\"type\":\"send\",\"client_id\":\"\",\"to\":\"b\","
        "\"body\":\"x\"}");
    assert_int_equal(f.type, CHAT_PROTO_SEND);
    assert_int_equal(f.client_id.len, 0);
    BAD("{\"type\":\"send\",\"client_id\":7,\"to\":\"b\","
        "\"body\":\"x\"}");
    assert_int_equal(f.client_id.len, 0);
    /* nor anything when the JSON is bad or the type unknown */
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\","
        "\"body\":\"x\",}");
    assert_int_equal(f.type, CHAT_PROTO_NONE);
    assert_int_equal(f.client_id.len, 0);
    BAD("{\"type\":\"sned\",\"client_id\":\"k\"}");
    assert_int_equal(f.type, CHAT_PROTO_NONE);
    assert_int_equal(f.client_id.len, 0);
    /* other types: the type only */
    BAD("{\"type\":\"ack\",\"cursor\":-1}");
    assert_int_equal(f.type, CHAT_PROTO_ACK);
    assert_true(f.cursor == 0);
}

static void
test_send_body_rules(void **state)
{
    (void) state;
    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\"}",
           "missing body");
    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":\"\"}",
           "body must not be empty");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":1}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":null}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\","
        "\"body\":[\"x\"]}");
    /* newlines, tabs, NUL escapes and non-ASCII are message content */
    OK("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\","
       "\"body\":\"l1\\nl2\\t\\u0000 \xE4\xBD\xA0\xE5\xA5\xBD\"}");
    assert_int_equal(f.body_chars, 10);
    OK("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":\" \"}");
    /* invalid JSON strings never get this far */
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\","
        "\"body\":\"\\ud83d\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\","
        "\"body\":\"\xED\xA0\x80\"}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\","
        "\"body\":\"a\nb\"}");
    /* kind */
    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":\"x\","
           "\"kind\":\"image\"}", "kind must be text or media");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":\"x\","
        "\"kind\":1}");
    BAD("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":\"x\","
        "\"kind\":\"Text\"}");
}

#define MEDIA_FRAME(m) \
    "{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"kind\":\"media\"," \
    "\"media\":" m "}"

static void
test_send_media(void **state)
{
    static char       s[8192];
    chat_proto_opts_t o = { 0, 1000, CHAT_PROTO_NONE };
    size_t            n;

    (void) state;
    OK(MEDIA_FRAME("{\"url\":\"https://cdn.example.com/a/b.png?x=1\","
                   "\"mime\":\"image/png\",\"size\":12345}"));
    assert_int_equal(f.kind, CHAT_PROTO_MEDIA);
    assert_true(slice_eq(f.media_url, "https://cdn.example.com/a/b.png?x=1"));
    assert_true(slice_eq(f.media_mime, "image/png"));
    assert_true(f.media_size == 12345);
    assert_int_equal(f.body.len, 0);
    assert_int_equal(f.body_chars, 0);

    /* caption, escaped slashes (PHP style), upper-case scheme */
    OK("{\"type\":\"send\",\"client_id\":\"k\",\"group\":\"g\","
       "\"kind\":\"media\",\"body\":\"look\",\"media\":{\"url\":"
       "\"HTTP:\\/\\/h\\/x\",\"mime\":\"application\\/vnd.api+json\","
       "\"size\":1,\"w\":640}}");
    assert_int_equal(f.body_chars, 4);
    assert_int_equal(f.media_url.esc, 1);
    OK(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":1}"));
    OK("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"kind\":\"media\","
       "\"body\":\"\",\"media\":{\"url\":\"http://h\",\"mime\":\"a/b\","
       "\"size\":1}}");

    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\","
           "\"kind\":\"media\"}", "missing media");
    BADMSG("{\"type\":\"send\",\"client_id\":\"k\",\"to\":\"b\",\"body\":\"x\","
           "\"media\":{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":1}}",
           "media requires kind media");
    BAD(MEDIA_FRAME("\"http://h\""));
    BAD(MEDIA_FRAME("[]"));
    BAD(MEDIA_FRAME("{\"mime\":\"a/b\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\"}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"url\":\"http://i\","
                    "\"mime\":\"a/b\",\"size\":1}"));

    /* url */
    BAD(MEDIA_FRAME("{\"url\":\"ftp://h/x\",\"mime\":\"a/b\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"javascript:alert(1)\",\"mime\":\"a/b\","
                    "\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"/relative\",\"mime\":\"a/b\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"https://\",\"mime\":\"a/b\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"https:///x\",\"mime\":\"a/b\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"https://h/a b\",\"mime\":\"a/b\","
                    "\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"https://h/\xC3\xA9\",\"mime\":\"a/b\","
                    "\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"https://h/\\n\",\"mime\":\"a/b\","
                    "\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":7,\"mime\":\"a/b\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"\",\"mime\":\"a/b\",\"size\":1}"));
    /* 2048 bytes pass, 2049 do not */
    n = (size_t) snprintf(s, sizeof(s), "%s",
                          MEDIA_FRAME("{\"url\":\"https://h/"));
    n--;                                        /* MEDIA_FRAME's '}' */
    memset(s + n, 'x', 2048 - 10);
    n += 2048 - 10;
    snprintf(s + n, sizeof(s) - n, "\",\"mime\":\"a/b\",\"size\":1}}");
    OK(s);
    assert_int_equal(f.media_url.len, 2048);
    n = (size_t) snprintf(s, sizeof(s), "%s",
                          MEDIA_FRAME("{\"url\":\"https://h/"));
    n--;                                        /* MEDIA_FRAME's '}' */
    memset(s + n, 'x', 2049 - 10);
    n += 2049 - 10;
    snprintf(s + n, sizeof(s) - n, "\",\"mime\":\"a/b\",\"size\":1}}");
    BAD(s);

    /* mime */
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"image\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"image/\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"/png\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b/c\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"text/plain; "
                    "charset=utf-8\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"im age/png\","
                    "\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"\",\"size\":1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":1,\"size\":1}"));
    OK(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"video/x-matroska\","
                   "\"size\":1}"));

    /* size */
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":0}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":-1}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":1.5}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":1e3}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":\"1\"}"));
    BAD(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\","
                    "\"size\":99999999999999999999}"));
    OK(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\","
                   "\"size\":104857600}"));
    BIG(MEDIA_FRAME("{\"url\":\"http://h\",\"mime\":\"a/b\","
                    "\"size\":104857601}"));
    assert_string_equal(msg, "media too large");
    assert_int_equal(parse_opts(MEDIA_FRAME("{\"url\":\"http://h\","
                                            "\"mime\":\"a/b\",\"size\":1000}"),
                                &o), CHAT_PROTO_OK);
    assert_int_equal(parse_opts(MEDIA_FRAME("{\"url\":\"http://h\","
                                            "\"mime\":\"a/b\",\"size\":1001}"),
                                &o), CHAT_PROTO_TOO_LARGE);

    /* caption limit applies to media too */
    body_frame(s, sizeof(s), "a", 1001, "\"kind\":\"media\",\"media\":"
               "{\"url\":\"http://h\",\"mime\":\"a/b\",\"size\":1},");
    BIG(s);
}

static void
test_ack(void **state)
{
    (void) state;
    OK("{\"type\":\"ack\",\"cursor\":0}");
    assert_int_equal(f.type, CHAT_PROTO_ACK);
    assert_true(f.cursor == 0);
    OK("{\"type\":\"ack\",\"cursor\":9007199254740991}");
    assert_true(f.cursor == CHAT_INT_MAX);
    /* one range everywhere: 2^53 and 2^63-1 are refused, not truncated */
    BAD("{\"type\":\"ack\",\"cursor\":9007199254740992}");
    BAD("{\"type\":\"ack\",\"cursor\":9223372036854775807}");
    OK("{\"cursor\":42,\"type\":\"ack\"}");
    assert_true(f.cursor == 42);
    BADMSG("{\"type\":\"ack\"}", "missing cursor");
    BAD("{\"type\":\"ack\",\"cursor\":-1}");
    BAD("{\"type\":\"ack\",\"cursor\":1.0}");
    BAD("{\"type\":\"ack\",\"cursor\":1e2}");
    BAD("{\"type\":\"ack\",\"cursor\":\"5\"}");
    BAD("{\"type\":\"ack\",\"cursor\":null}");
    BAD("{\"type\":\"ack\",\"cursor\":9223372036854775808}");
    BAD("{\"type\":\"ack\",\"cursor\":5,\"cursor\":6}");
}

static void
test_read(void **state)
{
    char s[512];

    (void) state;
    OK("{\"type\":\"read\",\"conv\":\"d:alice:bob\",\"seq\":17}");
    assert_int_equal(f.type, CHAT_PROTO_READ);
    assert_string_equal(f.conv, "d:alice:bob");
    assert_int_equal(f.conv_len, 11);
    assert_true(f.seq == 17);
    OK("{\"type\":\"read\",\"conv\":\"d:alice:alice\",\"seq\":0}");
    OK("{\"type\":\"read\",\"conv\":\"d:alice:bob\",\"seq\":9007199254740991}");
    BAD("{\"type\":\"read\",\"conv\":\"d:alice:bob\",\"seq\":9007199254740992}");
    OK("{\"type\":\"read\",\"conv\":\"d:Bob:alice\",\"seq\":0}"); /* 'B'<'a' */
    OK("{\"type\":\"read\",\"conv\":\"d:a:aa\",\"seq\":0}");
    OK("{\"type\":\"read\",\"conv\":\"g:ops-team\",\"seq\":3}");
    assert_string_equal(f.conv, "g:ops-team");
    OK("{\"type\":\"read\",\"conv\":\"d\\u003aa:b\",\"seq\":3}");
    assert_string_equal(f.conv, "d:a:b");

    BADMSG("{\"type\":\"read\",\"conv\":\"d:bob:alice\",\"seq\":1}",
           "conv must be a valid conversation id");
    BAD("{\"type\":\"read\",\"conv\":\"d:aa:a\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"d:alice\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"d:alice:\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"d::bob\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"d:a:b:c\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"g:\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"g:a:b\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"x:alice\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"alice\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":\"D:a:b\",\"seq\":1}");
    BAD("{\"type\":\"read\",\"conv\":5,\"seq\":1}");
    BADMSG("{\"type\":\"read\",\"seq\":1}", "missing conv");
    BADMSG("{\"type\":\"read\",\"conv\":\"g:x\"}", "missing seq");
    BAD("{\"type\":\"read\",\"conv\":\"g:x\",\"seq\":-1}");
    BAD("{\"type\":\"read\",\"conv\":\"g:x\",\"seq\":\"1\"}");

    /* the longest conversation id */
    snprintf(s, sizeof(s), "{\"type\":\"read\",\"conv\":\"d:%.64s:%.64s\","
             "\"seq\":1}",
             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
             "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    OK(s);
    assert_int_equal(f.conv_len, CHAT_CONV_MAX);
    snprintf(s, sizeof(s), "{\"type\":\"read\",\"conv\":\"d:%.64s:%.65s\","
             "\"seq\":1}",
             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
             "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    BAD(s);
}

static void
test_typing(void **state)
{
    (void) state;
    OK("{\"type\":\"typing\",\"to\":\"bob\"}");
    assert_int_equal(f.type, CHAT_PROTO_TYPING);
    assert_int_equal(f.target, CHAT_PROTO_TARGET_USER);
    assert_string_equal(f.target_id, "bob");
    OK("{\"type\":\"typing\",\"group\":\"g1\"}");
    assert_int_equal(f.target, CHAT_PROTO_TARGET_GROUP);
    BAD("{\"type\":\"typing\"}");
    BAD("{\"type\":\"typing\",\"to\":\"a\",\"group\":\"g\"}");
    BAD("{\"type\":\"typing\",\"to\":\"a!\"}");
    BAD("{\"type\":\"typing\",\"group\":true}");
}

/* a watch frame with count ids u0, u1, ... */
static void
users_frame(char *s, size_t cap, const char *type, int count)
{
    size_t n;
    int    i;

    n = (size_t) snprintf(s, cap, "{\"type\":\"%s\",\"users\":[", type);
    for (i = 0; i < count; i++) {
        n += (size_t) snprintf(s + n, cap - n, "%s\"u%d\"", i ? "," : "", i);
    }
    snprintf(s + n, cap - n, "]}");
}

static void
test_watch(void **state)
{
    static char s[8192];
    char        id[CHAT_ID_MAX + 1], want[16];
    size_t      pos, n;
    int         i;

    (void) state;
    OK("{\"type\":\"watch\",\"users\":[\"alice\", \"b\\u006fb\" ,\"alice\"]}");
    assert_int_equal(f.type, CHAT_PROTO_WATCH);
    assert_int_equal(f.nusers, 3);
    pos = 0;
    assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 1);
    assert_string_equal(id, "alice");
    assert_int_equal(n, 5);
    assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 1);
    assert_string_equal(id, "bob");
    assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 1);
    assert_string_equal(id, "alice");
    assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 0);
    assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 0);

    OK("{\"type\":\"unwatch\",\"users\":[\"x\"]}");
    assert_int_equal(f.type, CHAT_PROTO_UNWATCH);
    assert_int_equal(f.nusers, 1);

    /* 100 users pass, 101 are too many */
    users_frame(s, sizeof(s), "watch", 100);
    OK(s);
    assert_int_equal(f.nusers, 100);
    pos = 0;
    for (i = 0; i < 100; i++) {
        snprintf(want, sizeof(want), "u%d", i);
        assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 1);
        assert_string_equal(id, want);
    }
    assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 0);
    users_frame(s, sizeof(s), "watch", 101);
    BIG(s);
    assert_string_equal(msg, "at most 100 users at once");
    users_frame(s, sizeof(s), "unwatch", 101);
    BIG(s);
    /* far too many for the token array: still too_large */
    users_frame(s, sizeof(s), "watch", 500);
    BIG(s);

    BADMSG("{\"type\":\"watch\",\"users\":[]}", "users must not be empty");
    BADMSG("{\"type\":\"watch\"}", "missing users");
    BAD("{\"type\":\"watch\",\"users\":\"alice\"}");
    BAD("{\"type\":\"watch\",\"users\":{\"alice\":1}}");
    BAD("{\"type\":\"watch\",\"users\":[\"alice\",\"\"]}");
    BAD("{\"type\":\"watch\",\"users\":[\"alice\",\"a b\"]}");
    BAD("{\"type\":\"watch\",\"users\":[\"alice\",1]}");
    BAD("{\"type\":\"watch\",\"users\":[\"alice\",null]}");
    BAD("{\"type\":\"watch\",\"users\":[[\"alice\"]]}");

    /* the iterator refuses frames of other types */
    OK("{\"type\":\"ping\"}");
    pos = 0;
    assert_int_equal(chat_proto_users_next(&f, &pos, id, &n), 0);
}

static void
test_ping_and_types(void **state)
{
    (void) state;
    OK("{\"type\":\"ping\"}");
    assert_int_equal(f.type, CHAT_PROTO_PING);
    OK("{\"type\":\"ping\",\"ts\":123,\"nested\":{\"a\":[1,{\"b\":null}]}}");
    BADMSG("{\"type\":\"pong\"}", "unknown type");
    BADMSG("{\"type\":\"Ping\"}", "unknown type");
    BADMSG("{\"type\":\"\"}", "unknown type");
    BADMSG("{\"type\":\"sendsendsendsendsend\"}", "unknown type");
    BADMSG("{\"type\":\"msg\"}", "unknown type");
    BADMSG("{\"type\":1}", "type must be a string");
    BADMSG("{\"type\":null}", "type must be a string");
    BADMSG("{}", "missing type");
    BADMSG("{\"to\":\"bob\"}", "missing type");

    assert_string_equal(chat_proto_type_name(CHAT_PROTO_UNWATCH), "unwatch");
    assert_string_equal(chat_proto_type_name(CHAT_PROTO_NONE), "");
    assert_string_equal(chat_proto_code(CHAT_PROTO_TOO_LARGE), "too_large");
    assert_string_equal(chat_proto_code(CHAT_PROTO_BAD_REQUEST),
                        "bad_request");
}

static void
test_http_default_type(void **state)
{
    chat_proto_opts_t send = { 0, 0, CHAT_PROTO_SEND };
    chat_proto_opts_t ack = { 0, 0, CHAT_PROTO_ACK };

    (void) state;
    assert_int_equal(parse_opts("{\"client_id\":\"k\",\"to\":\"b\","
                                "\"body\":\"x\"}", &send), CHAT_PROTO_OK);
    assert_int_equal(f.type, CHAT_PROTO_SEND);
    assert_int_equal(parse_opts("{\"type\":\"send\",\"client_id\":\"k\","
                                "\"to\":\"b\",\"body\":\"x\"}", &send),
                     CHAT_PROTO_OK);
    assert_int_equal(parse_opts("{\"type\":\"ack\",\"cursor\":1}", &send),
                     CHAT_PROTO_BAD_REQUEST);
    assert_string_equal(msg, "type does not match the endpoint");
    assert_int_equal(parse_opts("{\"type\":\"bogus\",\"client_id\":\"k\","
                                "\"to\":\"b\",\"body\":\"x\"}", &send),
                     CHAT_PROTO_BAD_REQUEST);
    assert_int_equal(parse_opts("{\"cursor\":7}", &ack), CHAT_PROTO_OK);
    assert_true(f.cursor == 7);
    assert_int_equal(parse_opts("{}", &ack), CHAT_PROTO_BAD_REQUEST);
}

static void
test_bad_json(void **state)
{
    static char s[8192];
    size_t      n;
    int         i;

    (void) state;
    BAD("");
    BAD(" ");
    BAD("null");
    BADMSG("[{\"type\":\"ping\"}]", "frame must be a JSON object");
    BADMSG("\"ping\"", "frame must be a JSON object");
    BAD("{\"type\":\"ping\"");
    BAD("{\"type\":\"ping\"}x");
    BAD("{\"type\":\"ping\"}{\"type\":\"ping\"}");
    BAD("{type:\"ping\"}");
    BAD("{\"type\":'ping'}");
    BAD("{\"type\":\"ping\",}");
    BADMSG("{\"type\":\"ping\",\"type\":\"ping\"}", "duplicate key");
    BADMSG("{\"type\":\"ping\",\"x\":1,\"x\":2}", "duplicate key");
    BAD("{\"type\":\"ping\",\"\\u0074ype\":\"ping\"}");
    BAD("{\"type\":\"ping\",\"x\":\"\xFF\"}");
    BAD("{\"type\":\"ping\",\"x\":\"\\ud800\"}");
    BAD("\xEF\xBB\xBF{\"type\":\"ping\"}");

    /* nesting: 8 levels are fine, 9 are not */
    OK("{\"type\":\"ping\",\"x\":[[[[[[[1]]]]]]]}");
    BADMSG("{\"type\":\"ping\",\"x\":[[[[[[[[1]]]]]]]]}",
           "JSON nested too deeply");

    /* too many JSON values */
    n = (size_t) snprintf(s, sizeof(s), "{\"type\":\"ping\",\"x\":[");
    for (i = 0; i < 300; i++) {
        n += (size_t) snprintf(s + n, sizeof(s) - n, "%s0", i ? "," : "");
    }
    snprintf(s + n, sizeof(s) - n, "]}");
    BIG(s);

    /* embedded NUL */
    assert_int_equal(chat_proto_parse("{\"type\":\"ping\"}\0", 16, NULL, &f,
                                      &msg), CHAT_PROTO_BAD_REQUEST);
    /* msg may be NULL */
    assert_int_equal(chat_proto_parse("{", 1, NULL, &f, NULL),
                     CHAT_PROTO_BAD_REQUEST);
}

static void
test_ids(void **state)
{
    (void) state;
    assert_true(chat_id_valid("a", 1, 64));
    assert_true(chat_id_valid("A-Z_a.z-0_9", 11, 64));
    assert_true(chat_id_valid("...", 3, 64));
    assert_false(chat_id_valid("", 0, 64));
    assert_false(chat_id_valid(NULL, 1, 64));
    assert_false(chat_id_valid("a b", 3, 64));
    assert_false(chat_id_valid("a:b", 3, 64));
    assert_false(chat_id_valid("a/b", 3, 64));
    assert_false(chat_id_valid("a@b", 3, 64));
    assert_false(chat_id_valid("a\0", 2, 64));
    assert_false(chat_id_valid("\xC3\xA9", 2, 64));
    assert_false(chat_id_valid("a+b", 3, 64));
    assert_true(chat_id_valid("abcd", 4, 4));
    assert_false(chat_id_valid("abcde", 5, 4));
}

static void
test_conv_helpers(void **state)
{
    char        out[CHAT_CONV_MAX + 1];
    chat_conv_t c;

    (void) state;
    assert_int_equal(chat_conv_direct("bob", 3, "alice", 5, out), 11);
    assert_string_equal(out, "d:alice:bob");
    assert_int_equal(chat_conv_direct("alice", 5, "bob", 3, out), 11);
    assert_string_equal(out, "d:alice:bob");
    assert_int_equal(chat_conv_direct("a", 1, "a", 1, out), 5);
    assert_string_equal(out, "d:a:a");
    assert_int_equal(chat_conv_direct("ab", 2, "a", 1, out), 6);
    assert_string_equal(out, "d:a:ab");
    assert_int_equal(chat_conv_direct("b", 1, "B", 1, out), 5);
    assert_string_equal(out, "d:B:b");
    assert_int_equal(chat_conv_direct("a b", 3, "c", 1, out), 0);
    assert_int_equal(chat_conv_direct("a", 1, "", 0, out), 0);
    assert_int_equal(chat_conv_group("team", 4, out), 6);
    assert_string_equal(out, "g:team");
    assert_int_equal(chat_conv_group("te:am", 5, out), 0);

    assert_int_equal(chat_conv_parse("d:alice:bob", 11, &c), 0);
    assert_int_equal(c.kind, 'd');
    assert_int_equal(c.alen, 5);
    assert_memory_equal(c.a, "alice", 5);
    assert_int_equal(c.blen, 3);
    assert_memory_equal(c.b, "bob", 3);
    assert_int_equal(chat_conv_parse("g:team", 6, &c), 0);
    assert_int_equal(c.kind, 'g');
    assert_int_equal(c.alen, 4);
    assert_null(c.b);
    assert_int_equal(chat_conv_parse("d:bob:alice", 11, &c), -1);
    assert_int_equal(chat_conv_parse("d:", 2, &c), -1);
    assert_int_equal(chat_conv_parse(NULL, 0, &c), -1);
    assert_true(chat_conv_valid("d:x:y", 5));
    assert_false(chat_conv_valid("d:y:x", 5));
    assert_false(chat_conv_valid("g:x\n", 4));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_send_text),
        cmocka_unit_test(test_send_target),
        cmocka_unit_test(test_send_client_id),
        cmocka_unit_test(test_send_body_limit),
        cmocka_unit_test(test_error_keeps_client_id),
        cmocka_unit_test(test_send_body_rules),
        cmocka_unit_test(test_send_media),
        cmocka_unit_test(test_ack),
        cmocka_unit_test(test_read),
        cmocka_unit_test(test_typing),
        cmocka_unit_test(test_watch),
        cmocka_unit_test(test_ping_and_types),
        cmocka_unit_test(test_http_default_type),
        cmocka_unit_test(test_bad_json),
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_conv_helpers),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
