/*
 * chat_ws.h - RFC 6455 (WebSocket, version 13) server-side codec for ngx-chat.
 *
 * Pure C11 + libc + OpenSSL libcrypto (SHA1).  No nginx headers, no heap
 * allocation on the frame path.  Exported symbols are prefixed chat_ws_ /
 * chat_utf8_.
 *
 * Contents:
 *   1. handshake helpers  (Sec-WebSocket-Key check, Sec-WebSocket-Accept,
 *                          comma-separated header token match)
 *   2. incremental frame reader (client -> server frames)
 *   3. frame writer        (server -> client frames, never masked)
 *   4. UTF-8 validator     (one-shot and incremental)
 */
#ifndef CHAT_WS_H
#define CHAT_WS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>          /* ssize_t */

/* ---------------------------------------------------------------------- */
/* Constants                                                              */
/* ---------------------------------------------------------------------- */

#define CHAT_WS_ACCEPT_LEN       28  /* base64(SHA1) = 28 chars, no NUL */
#define CHAT_WS_MAX_CLIENT_HDR   14  /* 2 + 8 (64-bit length) + 4 (mask) */
#define CHAT_WS_MAX_SERVER_HDR   10  /* 2 + 8, server frames are unmasked */
#define CHAT_WS_MAX_CONTROL      125 /* max control frame payload */
#define CHAT_WS_CLOSE_FRAME_MAX  (2 + CHAT_WS_MAX_CONTROL) /* 127 */

/* opcodes */
#define CHAT_WS_OP_CONT    0x0
#define CHAT_WS_OP_TEXT    0x1
#define CHAT_WS_OP_BINARY  0x2
#define CHAT_WS_OP_CLOSE   0x8
#define CHAT_WS_OP_PING    0x9
#define CHAT_WS_OP_PONG    0xA

/* close status codes used by the codec (RFC 6455 section 7.4.1) */
#define CHAT_WS_CLOSE_NORMAL          1000
#define CHAT_WS_CLOSE_GOING_AWAY      1001
#define CHAT_WS_CLOSE_PROTOCOL_ERROR  1002
#define CHAT_WS_CLOSE_UNSUPPORTED     1003  /* e.g. binary data we don't take */
#define CHAT_WS_CLOSE_NO_STATUS       1005  /* never on the wire */
#define CHAT_WS_CLOSE_ABNORMAL        1006  /* never on the wire */
#define CHAT_WS_CLOSE_INVALID_DATA    1007  /* bad UTF-8 */
#define CHAT_WS_CLOSE_POLICY          1008
#define CHAT_WS_CLOSE_TOO_BIG         1009
#define CHAT_WS_CLOSE_INTERNAL        1011

/* ---------------------------------------------------------------------- */
/* 1. Handshake helpers                                                   */
/* ---------------------------------------------------------------------- */

/*
 * Sec-WebSocket-Key must be base64 of exactly 16 bytes: 22 alphabet chars
 * followed by "==" (24 chars total).  The 4 unused low bits of the 22nd char
 * are NOT required to be zero (any decoder yields 16 bytes).  Leading or
 * trailing whitespace is not accepted (nginx already trims header values).
 * Returns 1 if valid, 0 otherwise.
 */
int chat_ws_key_valid(const char *key, size_t len);

/*
 * out = base64(SHA1(key || "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")),
 * exactly CHAT_WS_ACCEPT_LEN bytes, NOT NUL-terminated.  The key is used
 * verbatim (call chat_ws_key_valid() first).
 */
void chat_ws_accept(const char *key, size_t len, char out[CHAT_WS_ACCEPT_LEN]);

/*
 * 1 if the comma-separated header value v[0..len) contains `token`
 * (NUL-terminated) as one element, compared ASCII case-insensitively, with
 * optional whitespace (SP/HTAB) around elements ignored.  Empty elements are
 * skipped.  E.g. ("keep-alive, Upgrade", "upgrade") -> 1,
 * ("websocket2", "websocket") -> 0.
 */
int chat_ws_header_has_token(const char *v, size_t len, const char *token);

/* ---------------------------------------------------------------------- */
/* 2. Frame reader                                                        */
/* ---------------------------------------------------------------------- */

/*
 * Per-connection reader state, 16 bytes.  Zero-initialise it (or call
 * chat_ws_reader_init) once per connection.  It only changes when a
 * complete frame is consumed, so calling chat_ws_read_frame() repeatedly on
 * a growing prefix of the same frame is idempotent.
 */
typedef struct {
    uint64_t msg_len;    /* payload bytes of the open data message so far */
    uint32_t utf8_state; /* incremental UTF-8 state across text fragments */
    uint8_t  in_msg;     /* 1: a fragmented data message is open (FIN=0 seen) */
    uint8_t  msg_opcode; /* CHAT_WS_OP_TEXT / CHAT_WS_OP_BINARY of that msg */
    uint8_t  pad[2];
} chat_ws_reader_t;

typedef enum {
    CHAT_WS_EV_NONE = 0, /* need more bytes (return value 0), see ev->need */
    CHAT_WS_EV_TEXT,     /* a text frame (first or continuation fragment) */
    CHAT_WS_EV_BINARY,   /* a binary frame (first or continuation fragment) */
    CHAT_WS_EV_PING,
    CHAT_WS_EV_PONG,
    CHAT_WS_EV_CLOSE,    /* peer close: code + reason */
    CHAT_WS_EV_ERROR     /* protocol violation: send close `code`, then drop */
} chat_ws_ev_kind_t;

typedef struct {
    chat_ws_ev_kind_t kind;
    /*
     * TEXT/BINARY: 1 if this frame completes the message.  Continuation
     * frames are reported with the kind of the message they belong to.
     * For TEXT, the payload bytes of all fragments up to and including
     * this one are valid UTF-8 as a concatenation (a code point may be
     * split between fragments; it is only guaranteed complete when fin=1).
     */
    int            fin;
    /*
     * CLOSE: status code received (1005 CHAT_WS_CLOSE_NO_STATUS when the
     *        close payload was empty).
     * ERROR: the close code to send (1002, 1007 or 1009).
     */
    unsigned       code;
    /*
     * TEXT/BINARY/PING/PONG: unmasked payload, pointing INTO the caller's
     * buffer.  CLOSE: the reason (UTF-8, may be empty), also in the buffer.
     * Valid until the caller overwrites/compacts those bytes.
     */
    unsigned char *payload;
    size_t         len;
    /*
     * Return value 0 (need more): total number of bytes, counted from buf[0],
     * needed before another call can make progress.  While the header is
     * incomplete this is the header length known so far (2, then 4/10
     * (+mask)); once the length is known it is header + payload, i.e. the
     * whole frame.  Always > len passed in.  Bounded by
     * CHAT_WS_MAX_CLIENT_HDR + max_msg for data frames (larger frames are
     * rejected with 1009 first) and by CHAT_WS_MAX_CLIENT_HDR + 125 for
     * control frames.  Unset for other return values.
     */
    uint64_t       need;
} chat_ws_event_t;

static inline void chat_ws_reader_init(chat_ws_reader_t *r)
{
    r->msg_len = 0;
    r->utf8_state = 0;
    r->in_msg = 0;
    r->msg_opcode = 0;
    r->pad[0] = r->pad[1] = 0;
}

/*
 * Parse one client frame at buf[0..len).
 *
 * Returns
 *   > 0  a complete frame was consumed; that many bytes (header + payload)
 *        must be dropped from the front of the buffer.  ev describes it.
 *        The payload region of buf has been unmasked IN PLACE.
 *     0  incomplete frame: nothing consumed, buf NOT modified, reader state
 *        NOT modified; ev->kind = CHAT_WS_EV_NONE and ev->need says how many
 *        bytes (from buf[0]) to have before calling again.
 *    -1  protocol error: ev->kind = CHAT_WS_EV_ERROR and ev->code is the
 *        close code to send.  Errors detectable from the header (1002,
 *        1009) are reported as soon as the offending header bytes are in
 *        buf, without waiting for the payload.  The connection must be
 *        failed; the reader must not be used again (reinit to reuse).
 *
 * max_msg bounds the total payload size of one data message (summed over
 * its fragments); exceeding it -> 1009.  Pass UINT64_MAX for no limit.
 * Control frames are bounded by 125 regardless.
 *
 * Validation (error -> code):
 *   RSV1/2/3 set (no extension negotiated)            1002
 *   reserved opcode 0x3-0x7, 0xB-0xF                    1002
 *   control frame with FIN=0 or payload > 125           1002
 *   continuation with no open message                   1002
 *   text/binary while a fragmented message is open      1002
 *   frame not masked (client MUST mask)                 1002
 *   64-bit length with the most significant bit set    1002
 *   message total > max_msg                             1009
 *   text not valid UTF-8 (overlong, surrogate, >10FFFF,
 *     sequence truncated at the final fragment)         1007
 *   close payload of length 1                           1002
 *   close code not sendable (<1000, 1004-1006, 1015-2999, >=5000) 1002
 *   close reason not valid UTF-8                        1007
 * Non-minimal length encodings (e.g. 126 + 0x0005) are ACCEPTED: RFC 6455
 * section 5.2 puts the minimal-encoding MUST on the sender and defines no
 * receiver failure for it; the length is unambiguous either way.
 * Binary messages are reported as CHAT_WS_EV_BINARY (not an error); the
 * caller decides (ngx-chat closes with 1003).
 * Control frames may be interleaved between fragments; they do not touch
 * the data-message state.
 */
ssize_t chat_ws_read_frame(chat_ws_reader_t *r, unsigned char *buf, size_t len,
                           uint64_t max_msg, chat_ws_event_t *ev);

/* ---------------------------------------------------------------------- */
/* 3. Writer (server frames: never masked, minimal length encoding)       */
/* ---------------------------------------------------------------------- */

/*
 * Write a frame header for `len` payload bytes into out (2, 4 or 10 bytes,
 * returned).  opcode is masked to 4 bits; fin != 0 sets FIN.  len must be
 * < 2^63.
 */
size_t chat_ws_write_header(unsigned char out[CHAT_WS_MAX_SERVER_HDR],
                            unsigned opcode, int fin, uint64_t len);

/*
 * Write a complete close frame into out (room for CHAT_WS_CLOSE_FRAME_MAX =
 * 127 bytes), returning its size.  code 0 or 1005 -> empty payload (no
 * status; the reason is ignored).  Otherwise 2-byte code + reason, the
 * reason cut to at most 123 bytes and to its longest valid-UTF-8 prefix, so
 * a multi-byte sequence is never split (and an invalid reason never goes
 * out).  code is written as given (caller passes a sendable code).
 */
size_t chat_ws_write_close(unsigned char *out, unsigned code,
                           const char *reason, size_t rlen);

/* ---------------------------------------------------------------------- */
/* 4. UTF-8 validation (RFC 3629 / Unicode Table 3-7: rejects overlongs,  */
/*    surrogates U+D800..DFFF, code points > U+10FFFF)                    */
/* ---------------------------------------------------------------------- */

#define CHAT_UTF8_INIT  0u   /* initial state for chat_utf8_feed() */

#define CHAT_UTF8_ACCEPT     0  /* everything so far is complete valid UTF-8 */
#define CHAT_UTF8_INCOMPLETE 1  /* valid so far, ends inside a sequence */
#define CHAT_UTF8_REJECT     2  /* invalid; state is sticky */

/* 1 if p[0..n) is entirely valid UTF-8 (n == 0 is valid). */
int chat_utf8_valid(const unsigned char *p, size_t n);

/*
 * Feed p[0..n) to the incremental validator.  *state starts as
 * CHAT_UTF8_INIT.  Returns CHAT_UTF8_ACCEPT / _INCOMPLETE / _REJECT for the
 * concatenation of everything fed so far.  Rejection is detected at the
 * first byte that cannot continue a valid sequence.
 */
int chat_utf8_feed(uint32_t *state, const unsigned char *p, size_t n);

/* 1 if state is at a code point boundary (no partial sequence, not reject). */
int chat_utf8_complete(uint32_t state);

#endif /* CHAT_WS_H */
