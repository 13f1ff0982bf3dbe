/*
 * chat_proto: parse and validate one client frame (protocol v1, "Client to
 * server"): a WebSocket text message or an HTTP POST body.  No allocation;
 * the frame struct holds raw slices of the input plus small fixed copies
 * of the ids.
 *
 * Rules beyond the wire contract (docs/PROTOCOL.md):
 *   - the frame is one JSON object (strict chat_json: valid UTF-8, no
 *     duplicate keys, at most CHAT_PROTO_MAX_DEPTH levels, at most
 *     CHAT_PROTO_MAX_TOKENS JSON values in total -> too_large);
 *   - unknown fields, and known fields that do not belong to the frame's
 *     type, are ignored; a field that is used must have the right type
 *     (null is not "absent");
 *   - ids (to, group, users[], the parts of conv) are compared decoded,
 *     so "\u0061lice" is alice; they are copied out decoded;
 *   - client_id: 1..64 code points, no control characters (U+0000..U+001F,
 *     U+007F..U+009F);
 *   - body: counted in code points after decoding escapes; text needs
 *     1..max_body, media 0..max_body (absent = empty caption); longer
 *     -> too_large;
 *   - media only with kind "media" (media with kind text is bad_request);
 *     url: absolute http:// or https:// URL (scheme in any case), non-empty
 *     host, printable ASCII only (0x21..0x7E), at most 2048 bytes decoded;
 *     mime: type "/" subtype, both RFC 7230 tokens, no parameters, at most
 *     255 bytes; size: integer 1..max_media_size (larger -> too_large);
 *   - watch/unwatch: users is an array of 1..100 valid user ids; more than
 *     100 -> too_large; repeats are allowed;
 *   - ack cursor, read seq: integers 0..CHAT_INT_MAX = 2^53-1 (no
 *     fraction/exponent): the one range of seqs, cursors and pointers in
 *     the module, the scripts and the workers, and exact in JavaScript;
 *   - read conv: canonical: "d:<a>:<b>" with a <= b (byte order) or
 *     "g:<group>".
 */
#ifndef CHAT_PROTO_H
#define CHAT_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define CHAT_ID_MAX                   64   /* user and group ids */
#define CHAT_DEV_ID_MAX               32
#define CHAT_CONV_MAX                 (2 + CHAT_ID_MAX + 1 + CHAT_ID_MAX)

#define CHAT_PROTO_CLIENT_ID_MAX      64   /* code points */
#define CHAT_PROTO_MAX_BODY_DEFAULT   1000 /* code points */
#define CHAT_PROTO_MAX_MEDIA_DEFAULT  (100LL * 1024 * 1024)
#define CHAT_PROTO_URL_MAX            2048
#define CHAT_PROTO_MIME_MAX           255
#define CHAT_PROTO_MAX_USERS          100
#define CHAT_PROTO_MAX_TOKENS         256
#define CHAT_PROTO_MAX_DEPTH          8

/* seqs, cursors and pointers: 0 .. 2^53-1 everywhere (JSON numbers that
 * every client, JavaScript included, reads exactly); 16 digits */
#define CHAT_INT_MAX                  9007199254740991LL
#define CHAT_INT_DIGITS               16

typedef enum {
    CHAT_PROTO_OK = 0,
    CHAT_PROTO_BAD_REQUEST,
    CHAT_PROTO_TOO_LARGE
} chat_proto_rc_t;

typedef enum {
    CHAT_PROTO_NONE = 0,
    CHAT_PROTO_SEND,
    CHAT_PROTO_ACK,
    CHAT_PROTO_READ,
    CHAT_PROTO_TYPING,
    CHAT_PROTO_WATCH,
    CHAT_PROTO_UNWATCH,
    CHAT_PROTO_PING
} chat_proto_type_t;

typedef enum {
    CHAT_PROTO_TEXT = 0,
    CHAT_PROTO_MEDIA
} chat_proto_kind_t;

typedef enum {
    CHAT_PROTO_TARGET_NONE = 0,
    CHAT_PROTO_TARGET_USER,      /* "to" */
    CHAT_PROTO_TARGET_GROUP      /* "group" */
} chat_proto_target_t;

/*
 * A JSON string body exactly as received (escapes not decoded, no quotes).
 * It is always valid JSON string content, so it can be written back out
 * between quotes as it is.  esc == 0: no escapes, p[0..len) is the decoded
 * value.  Decode with chat_json_unescape (needs at most len bytes).
 */
typedef struct {
    const char *p;
    uint32_t    len;
    uint32_t    esc;
} chat_proto_str_t;

typedef struct {
    chat_proto_type_t   type;

    /* send, typing: the decoded, validated target id (NUL-terminated) */
    chat_proto_target_t target;
    uint8_t             target_len;
    char                target_id[CHAT_ID_MAX + 1];

    /* send */
    chat_proto_kind_t   kind;
    uint32_t            body_chars;   /* code points of the decoded body */
    chat_proto_str_t    client_id;
    chat_proto_str_t    body;         /* len 0 when absent (media) */
    chat_proto_str_t    media_url;    /* kind media only */
    chat_proto_str_t    media_mime;
    int64_t             media_size;

    /* ack */
    int64_t             cursor;

    /* read: the decoded, validated conversation id (NUL-terminated) */
    int64_t             seq;
    uint8_t             conv_len;
    char                conv[CHAT_CONV_MAX + 1];

    /* watch, unwatch: the raw array text "[...]"; see chat_proto_users_next */
    uint32_t            nusers;
    chat_proto_str_t    users;
} chat_proto_frame_t;

typedef struct {
    uint32_t          max_body;        /* code points; 0: 1000 */
    int64_t           max_media_size;  /* bytes; <= 0: 100 MiB */
    chat_proto_type_t default_type;    /* NONE: "type" is required
                                          (WebSocket); else the type of an
                                          HTTP endpoint: "type" may be
                                          omitted, and must match if given */
} chat_proto_opts_t;

/*
 * Parse buf[0..len).  opts NULL: defaults, type required.  On error
 * *msg (if msg) is a short static English message without quotes or
 * backslashes (safe to put in a JSON string as it is); on success NULL.
 * *f is fully initialised in both cases.  On error it is zeroed except
 * f->type (the frame's type if it was recognised, else NONE) and, for a
 * send, f->client_id (when the client_id itself was valid, else len 0),
 * so that the error answer can carry the client_id.
 */
chat_proto_rc_t chat_proto_parse(const char *buf, size_t len,
    const chat_proto_opts_t *opts, chat_proto_frame_t *f, const char **msg);

/* "bad_request", "too_large" ("ok" for CHAT_PROTO_OK) */
const char *chat_proto_code(chat_proto_rc_t rc);

/* "send", "ack", ... ("" for NONE) */
const char *chat_proto_type_name(chat_proto_type_t t);

/*
 * Iterate the user ids of a parsed watch/unwatch frame.  Start with
 * *pos = 0; each call that returns 1 stores the next decoded id in out
 * (NUL-terminated) and its length in *outlen; 0 at the end.
 */
int chat_proto_users_next(const chat_proto_frame_t *f, size_t *pos,
    char out[CHAT_ID_MAX + 1], size_t *outlen);

/* ---- ids and conversation ids ------------------------------------------ */

/* 1 when p[0..n) is 1..max bytes of [A-Za-z0-9._-], else 0 */
int chat_id_valid(const char *p, size_t n, size_t max);

typedef struct {
    char        kind;        /* 'd' or 'g' */
    const char *a;           /* direct: first user; group: the group id */
    size_t      alen;
    const char *b;           /* direct: second user; group: NULL */
    size_t      blen;
} chat_conv_t;

/* 0 and *out filled when p[0..n) is a canonical conversation id, else -1 */
int chat_conv_parse(const char *p, size_t n, chat_conv_t *out);

static inline int
chat_conv_valid(const char *p, size_t n)
{
    chat_conv_t c;

    return chat_conv_parse(p, n, &c) == 0;
}

/*
 * "d:<min(a,b)>:<max(a,b)>" (byte order) and "g:<g>" into out with a NUL;
 * return the length, or 0 when an id is invalid.
 */
size_t chat_conv_direct(const char *a, size_t alen, const char *b,
    size_t blen, char out[CHAT_CONV_MAX + 1]);
size_t chat_conv_group(const char *g, size_t glen, char out[CHAT_CONV_MAX + 1]);

#endif /* CHAT_PROTO_H */
