/*
 * Fuzz the queue-entry codec and the delivery payload parser (chat_entry):
 * the first byte picks the target; an entry is "name=value" fields
 * separated by NUL bytes (values may hold anything else). Whatever is
 * decoded is checked, routed and encoded again, in bounded buffers.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "chat_entry.h"

static void
fuzz_entry(const char *p, size_t n)
{
    chat_entry_t       e;
    chat_conv_t        cv;
    chat_entry_rcpt_t  r[2];
    chat_entry_str_t   u;
    const char        *why = NULL, *name[CHAT_EF_N], *val[CHAT_EF_N];
    size_t             len[CHAT_EF_N], pos = 0, i = 0;
    char               num[CHAT_ENTRY_NUMBUF], buf[4096];
    unsigned           nr;

    memset(&e, 0, sizeof(e));
    while (i < n) {
        const char *f = p + i, *end = memchr(f, '\0', n - i), *eq;
        size_t      fl = end ? (size_t) (end - f) : n - i;

        eq = memchr(f, '=', fl);
        if (eq && chat_entry_set(&e, f, (size_t) (eq - f), eq + 1,
                                 fl - (size_t) (eq - f) - 1, &why) != 0)
        {
            return;
        }
        i += fl + 1;
    }
    (void) chat_entry_pairs(&e, name, val, len, num);
    (void) chat_entry_json(&e, buf, sizeof(buf));
    (void) chat_entry_inbox_field(&e, buf, sizeof(buf));
    while (chat_entry_rcpt_next(&e, &pos, &u)) { /* void */ }
    if (chat_entry_check(&e, &cv, &nr) == NULL) {
        (void) chat_entry_recipients(&e, &cv, r);
    }
}

static void
fuzz_delivery(const char *p, size_t n)
{
    chat_entry_str_t      toks, ev;
    chat_delivery_rcpt_t  r;
    size_t                pos = 0;
    char                  tok[CHAT_DELIVERY_TOKEN_MAX];

    if (chat_delivery_parse(p, n, &toks, &ev) != 0) {
        return;
    }
    while (chat_delivery_next(&toks, &pos, &r)) {
        chat_entry_str_t      t2, ev2;
        chat_delivery_rcpt_t  r2;
        size_t                p2 = 0, tl;

        /* what the fan-out would write for it reads back the same */
        tl = chat_delivery_token(tok, sizeof(tok) - 3, r.user.p, r.user.len,
                                 r.cursor, r.dev.p, r.dev.len);
        if (tl == 0) {
            continue;            /* too long for the buffer */
        }
        memcpy(tok + tl, "\n{}", 3);
        if (chat_delivery_parse(tok, tl + 3, &t2, &ev2) != 0
            || !chat_delivery_next(&t2, &p2, &r2) || r2.cursor != r.cursor
            || r2.user.len != r.user.len || r2.dev.len != r.dev.len
            || (r.dev.len && memcmp(r2.dev.p, r.dev.p, r.dev.len) != 0))
        {
            __builtin_trap();
        }
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) {
        return 0;
    }
    if (data[0] & 1) {
        fuzz_delivery((const char *) data + 1, size - 1);
    } else {
        fuzz_entry((const char *) data + 1, size - 1);
    }
    return 0;
}
