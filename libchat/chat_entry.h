/*
 * chat_entry: the queue entry and the delivery payload, the two formats
 * the module and the workers exchange (docs/PIPELINE.md, "Queue entries"
 * and "Deliveries"). One codec for both sides, so that what the module
 * writes is exactly what the workers read; t/vectors/entries.txt holds
 * the golden cases shared by the C unit tests and the Python tests.
 *
 * A queue entry is a set of named string fields: a Redis stream entry's
 * field/value pairs, or, on Kafka, one JSON object with the same names.
 * Scripts (lua/accept.lua, accept_k.lua, group_change.lua) write the
 * message and group entries with the same names; this codec writes the
 * receipts and re-writes entries for the dead-letter queue.
 *
 * The entry is a view: its strings point into the caller's memory. No
 * allocation.
 */
#ifndef CHAT_ENTRY_H
#define CHAT_ENTRY_H

#include <stddef.h>
#include <stdint.h>

#include "chat_proto.h"

typedef enum {
    CHAT_ENTRY_BAD = -1,          /* a "t" this version does not know */
    CHAT_ENTRY_NONE = 0,          /* no "t" */
    CHAT_ENTRY_MSG = 1,
    CHAT_ENTRY_RECEIPT = 2,
    CHAT_ENTRY_GROUP = 3,
    CHAT_ENTRY_DEL = 4            /* a deletion: event "everyone", "me" or
                                     "clear" (a conversation, for me) */
} chat_entry_type_t;

/* the fields, in the order the encoders write them */
typedef enum {
    CHAT_EF_T = 0,
    CHAT_EF_CONV,
    CHAT_EF_FROM,
    CHAT_EF_DEV,
    CHAT_EF_TO,
    CHAT_EF_GROUP,
    CHAT_EF_ST,
    CHAT_EF_EVENT,
    CHAT_EF_SEQ,
    CHAT_EF_PREV,
    CHAT_EF_RCPT,
    CHAT_EF_STATE,
    CHAT_EF_EV,
    CHAT_EF_N
} chat_entry_field_t;

typedef struct {
    const char  *p;
    size_t       len;             /* 0: absent (an empty value is absent) */
} chat_entry_str_t;

typedef struct {
    chat_entry_type_t  type;
    chat_entry_str_t   conv;
    chat_entry_str_t   from;      /* the acting user */
    chat_entry_str_t   dev;       /* the acting device (optional) */
    chat_entry_str_t   to;        /* direct message: the other participant */
    chat_entry_str_t   group;     /* group message or change: the group id */
    chat_entry_str_t   st;        /* receipt: delivered or read */
    chat_entry_str_t   event;     /* group change: created, added, removed;
                                     deletion: everyone, me, clear */
    int64_t            seq;       /* 1 .. CHAT_INT_MAX; 0 absent */
    int64_t            prev;      /* receipt: the pointer before it; 0 absent */
    chat_entry_str_t   rcpt;      /* group change: users, space-separated */
    chat_entry_str_t   state;     /* group change: the group after it, JSON */
    chat_entry_str_t   ev;        /* the event as devices see it, JSON */
} chat_entry_t;

/* Longest field value the workers keep in a fixed buffer (st, event). */
#define CHAT_ENTRY_WORD_MAX  15

/* The field's name; its number from a name (-1: unknown, ignored for
 * forward compatibility). */
const char *chat_entry_field_name(chat_entry_field_t f);
int chat_entry_field_lookup(const char *name, size_t len);

const char *chat_entry_type_name(chat_entry_type_t t);
chat_entry_type_t chat_entry_type_lookup(const char *v, size_t len);

/*
 * Sets one field from its wire value (the view points at val). Returns 0,
 * or -1 with *why set when the value cannot be the field's (a seq that is
 * not an integer in 0 .. 2^53-1). Unknown names are ignored.
 */
int chat_entry_set(chat_entry_t *e, const char *name, size_t nlen,
    const char *val, size_t vlen, const char **why);

/*
 * What the workers accept (docs/PIPELINE.md, "Queue entries"): NULL when
 * the entry is complete and consistent, else why not (the text goes to
 * the dead-letter queue). cv receives the parsed conversation, nrcpt the
 * number of users of a group change (either may be NULL).
 */
const char *chat_entry_check(const chat_entry_t *e, chat_conv_t *cv,
    unsigned *nrcpt);

/* The next user of a group change's rcpt ("a b  c"); 0 at the end. */
int chat_entry_rcpt_next(const chat_entry_t *e, size_t *pos,
    chat_entry_str_t *user);

/*
 * The users a checked direct entry goes to (docs/PIPELINE.md,
 * "Recipients"): at most two, the other participant and the acting user's
 * own devices (skip_dev: all of them but the acting device). Group entries
 * have theirs from Redis. Returns how many.
 */
typedef struct {
    chat_entry_str_t  user;
    unsigned          skip_dev;   /* 1: every device but e->dev */
} chat_entry_rcpt_t;

int chat_entry_recipients(const chat_entry_t *e, const chat_conv_t *cv,
    chat_entry_rcpt_t out[2]);

/* The recipients' inbox idempotency field: "m:<conv>" for messages and
 * group changes (they share the conversation's seqs), a deletion
 * "x:<e or m>:<conv>:<seq>" (one per deleted message and kind; a
 * conversation deleted for me "x:c:<conv>"), else
 * "r:<st>:<conv>:<from>". Returns its length, or 0 if cap is too small. */
size_t chat_entry_inbox_field(const chat_entry_t *e, char *buf, size_t cap);

/*
 * Encoders. chat_entry_pairs: the present fields as name/value pairs in
 * CHAT_EF order (a Redis stream entry); seq and prev are formatted into
 * num (2 * 20 bytes). Returns the number of pairs (<= CHAT_EF_N).
 * chat_entry_json: one JSON object of string values (a Kafka record);
 * returns its length, or 0 when it does not fit cap.
 */
#define CHAT_ENTRY_NUMBUF  40

int chat_entry_pairs(const chat_entry_t *e, const char *name[CHAT_EF_N],
    const char *val[CHAT_EF_N], size_t len[CHAT_EF_N],
    char num[CHAT_ENTRY_NUMBUF]);
size_t chat_entry_json(const chat_entry_t *e, char *buf, size_t cap);


/*
 * The delivery payload, published by the fan-out to a worker process's
 * channel: "<token> <token>...\n<event JSON object>". A token is
 * "user[:cursor][!device]": with a cursor the event is durable and becomes
 * {"cursor":N,...} for that user; "!device" skips that device (the acting
 * one).
 */
typedef struct {
    chat_entry_str_t  user;
    uint64_t          cursor;     /* 0: none (ephemeral, or live-only) */
    chat_entry_str_t  dev;        /* the device to skip; len 0: none */
} chat_delivery_rcpt_t;

/* Splits a payload: 0 with the tokens and the event, -1 if malformed. */
int chat_delivery_parse(const char *p, size_t len, chat_entry_str_t *tokens,
    chat_entry_str_t *event);

/* The next well-formed token of tokens (malformed ones are skipped);
 * 0 at the end. */
int chat_delivery_next(const chat_entry_str_t *tokens, size_t *pos,
    chat_delivery_rcpt_t *r);

/* One token into buf (NUL-terminated); returns its length, 0 if it does
 * not fit. */
#define CHAT_DELIVERY_TOKEN_MAX  (CHAT_ID_MAX + 1 + 20 + 1 + CHAT_DEV_ID_MAX + 1)

size_t chat_delivery_token(char *buf, size_t cap, const char *user,
    size_t ulen, uint64_t cursor, const char *dev, size_t dlen);

#endif
