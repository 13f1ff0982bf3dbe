/*
 * chat_entry (queue entries and delivery payloads) against the golden
 * vectors of t/vectors/entries.txt, shared with the Python tests.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "chat_entry.h"
#include "chat_json.h"

#define MAXF 16

typedef struct {
    char    name[64];
    char    verdict[128];
    char    rcpts[256];
    char    inbox[256];
    int     nf;
    char    fname[MAXF][32];
    char    fval[MAXF][1024];
    size_t  flen[MAXF];
} vec_t;

static vec_t  vecs[128];
static int    nvecs;

/* \t \n \\ \xHH */
static size_t
unescape(const char *s, size_t n, char *out)
{
    size_t  o = 0;

    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\' || i + 1 >= n) {
            out[o++] = s[i];
            continue;
        }
        i++;
        if (s[i] == 't') {
            out[o++] = '\t';
        } else if (s[i] == 'n') {
            out[o++] = '\n';
        } else if (s[i] == 'x' && i + 2 < n) {
            char  hex[3] = { s[i + 1], s[i + 2], 0 };
            out[o++] = (char) strtol(hex, NULL, 16);
            i += 2;
        } else {
            out[o++] = s[i];
        }
    }
    return o;
}

static int
load(void **state)
{
    char   line[8192];
    FILE  *f = fopen("t/vectors/entries.txt", "r");

    (void) state;
    if (f == NULL) {
        return -1;
    }
    while (fgets(line, sizeof(line), f) && nvecs < 128) {
        char   *col[4 + MAXF], *p = line, *t;
        int     n = 0;
        vec_t  *v = &vecs[nvecs];

        if (line[0] == '#' || line[0] == '\n') {
            continue;
        }
        line[strcspn(line, "\n")] = '\0';
        while ((t = strsep(&p, "\t")) != NULL && n < 4 + MAXF) {
            col[n++] = t;
        }
        if (n < 4) {
            fclose(f);
            return -1;
        }
        snprintf(v->name, sizeof(v->name), "%s", col[0]);
        snprintf(v->verdict, sizeof(v->verdict), "%s", col[1]);
        snprintf(v->rcpts, sizeof(v->rcpts), "%s", col[2]);
        snprintf(v->inbox, sizeof(v->inbox), "%s", col[3]);
        for (int i = 4; i < n; i++) {
            char *eq = strchr(col[i], '=');
            if (eq == NULL) {
                fclose(f);
                return -1;
            }
            snprintf(v->fname[v->nf], sizeof(v->fname[0]), "%.*s",
                     (int) (eq - col[i]), col[i]);
            v->flen[v->nf] = unescape(eq + 1, strlen(eq + 1), v->fval[v->nf]);
            v->nf++;
        }
        nvecs++;
    }
    fclose(f);
    return nvecs >= 20 ? 0 : -1;
}

/* decodes a vector; returns the why of chat_entry_set, or NULL */
static const char *
decode(const vec_t *v, chat_entry_t *e)
{
    const char  *why = NULL;

    memset(e, 0, sizeof(*e));
    for (int i = 0; i < v->nf; i++) {
        if (chat_entry_set(e, v->fname[i], strlen(v->fname[i]), v->fval[i],
                           v->flen[i], &why) != 0)
        {
            return why;
        }
    }
    return NULL;
}

static void
test_verdicts(void **state)
{
    int  ok = 0, bad = 0;

    (void) state;
    for (int k = 0; k < nvecs; k++) {
        const vec_t   *v = &vecs[k];
        chat_entry_t   e;
        chat_conv_t    cv;
        const char    *why = decode(v, &e);

        if (why == NULL) {
            why = chat_entry_check(&e, &cv, NULL);
        }
        if (strcmp(v->verdict, "ok") == 0) {
            if (why != NULL) {
                fail_msg("%s: expected ok, got %s", v->name, why);
            }
            ok++;
        } else {
            assert_non_null(why);
            if (strcmp(v->verdict + 4, why) != 0) {
                fail_msg("%s: expected %s, got %s", v->name, v->verdict, why);
            }
            bad++;
        }
    }
    /* the vectors cover both sides */
    assert_true(ok >= 8 && bad >= 15);
}

static void
test_recipients_and_inbox_field(void **state)
{
    int  checked = 0;

    (void) state;
    for (int k = 0; k < nvecs; k++) {
        const vec_t        *v = &vecs[k];
        chat_entry_t        e;
        chat_conv_t         cv;
        chat_entry_rcpt_t   r[2];
        char                got[256], field[256];
        size_t              o = 0;
        int                 n;

        if (strcmp(v->verdict, "ok") != 0) {
            continue;
        }
        assert_null(decode(v, &e));
        assert_null(chat_entry_check(&e, &cv, NULL));
        n = chat_entry_recipients(&e, &cv, r);
        for (int i = 0; i < n; i++) {
            o += (size_t) snprintf(got + o, sizeof(got) - o, "%s%.*s%s",
                                   i ? "," : "", (int) r[i].user.len,
                                   r[i].user.p, r[i].skip_dev ? "!" : "");
        }
        if (n == 0) {
            snprintf(got, sizeof(got), "-");
        }
        assert_string_equal(got, v->rcpts);
        assert_int_equal(chat_entry_inbox_field(&e, field, sizeof(field)),
                         strlen(v->inbox));
        assert_string_equal(field, v->inbox);
        /* too small a buffer is refused, not cut */
        assert_int_equal(chat_entry_inbox_field(&e, field, strlen(v->inbox)),
                         0);
        checked++;
    }
    assert_true(checked >= 8);
}

/* The encoders write back exactly the known fields, in the vector's
 * order (the vectors are written in the encoders' order). */
static void
test_pairs_round_trip(void **state)
{
    (void) state;
    for (int k = 0; k < nvecs; k++) {
        const vec_t   *v = &vecs[k];
        chat_entry_t   e;
        const char    *name[CHAT_EF_N], *val[CHAT_EF_N];
        size_t         len[CHAT_EF_N];
        char           num[CHAT_ENTRY_NUMBUF];
        int            n, j = 0;

        if (strcmp(v->verdict, "ok") != 0) {
            continue;
        }
        assert_null(decode(v, &e));
        n = chat_entry_pairs(&e, name, val, len, num);
        for (int i = 0; i < v->nf; i++) {
            if (chat_entry_field_lookup(v->fname[i], strlen(v->fname[i])) < 0) {
                continue;                    /* unknown: not written back */
            }
            assert_true(j < n);
            assert_string_equal(name[j], v->fname[i]);
            assert_int_equal(len[j], v->flen[i]);
            assert_memory_equal(val[j], v->fval[i], len[j]);
            j++;
        }
        assert_int_equal(j, n);
    }
}

/* The Kafka form: one JSON object of strings, which libchat's strict
 * parser reads back to the same values. */
static void
test_json_round_trip(void **state)
{
    (void) state;
    for (int k = 0; k < nvecs; k++) {
        const vec_t      *v = &vecs[k];
        chat_entry_t      e, back;
        char              buf[8192], dec[16][2048];
        chat_json_doc_t   doc;
        chat_json_tok_t   tok[64];
        size_t            n;
        int               used = 0;

        if (strcmp(v->verdict, "ok") != 0) {
            continue;
        }
        assert_null(decode(v, &e));
        n = chat_entry_json(&e, buf, sizeof(buf));
        assert_true(n > 2);
        assert_int_equal(chat_json_parse(&doc, buf, n, tok, 64, 4), CHAT_JSON_OK);
        memset(&back, 0, sizeof(back));
        for (int f = 0; f < CHAT_EF_N; f++) {
            const char  *nm = chat_entry_field_name((chat_entry_field_t) f),
                        *why = NULL;
            int          i = chat_json_obj_get(&doc, 0, nm, strlen(nm));
            size_t       dl;

            if (i < 0) {
                continue;
            }
            assert_int_equal(chat_json_get_str(&doc, (unsigned) i, dec[used],
                                               sizeof(dec[0]), &dl),
                             CHAT_JSON_OK);
            assert_int_equal(chat_entry_set(&back, nm, strlen(nm), dec[used],
                                            dl, &why), 0);
            used++;
        }
        assert_int_equal(back.type, e.type);
        assert_int_equal(back.seq, e.seq);
        assert_int_equal(back.prev, e.prev);
        assert_int_equal(back.ev.len, e.ev.len);
        assert_memory_equal(back.ev.p, e.ev.p, e.ev.len);
        assert_int_equal(back.conv.len, e.conv.len);
        assert_int_equal(back.rcpt.len, e.rcpt.len);
        /* too small: refused, not cut */
        assert_int_equal(chat_entry_json(&e, buf, n - 1), 0);
    }
}

static void
test_rcpt_iteration(void **state)
{
    chat_entry_t      e;
    chat_entry_str_t  u;
    size_t            pos = 0;
    const char       *want[] = { "bob", "carol", "dave" };
    int               n = 0;

    (void) state;
    memset(&e, 0, sizeof(e));
    e.rcpt.p = "  bob carol   dave ";
    e.rcpt.len = strlen(e.rcpt.p);
    while (chat_entry_rcpt_next(&e, &pos, &u)) {
        assert_true(n < 3);
        assert_int_equal(u.len, strlen(want[n]));
        assert_memory_equal(u.p, want[n], u.len);
        n++;
    }
    assert_int_equal(n, 3);
}

static void
test_delivery_payloads(void **state)
{
    char                  tok[CHAT_DELIVERY_TOKEN_MAX], pl[512];
    size_t                n, pos = 0, len;
    chat_entry_str_t      toks, ev;
    chat_delivery_rcpt_t  r;

    (void) state;

    /* the encoder's three forms */
    n = chat_delivery_token(tok, sizeof(tok), "bob", 3, 0, NULL, 0);
    assert_string_equal(tok, "bob");
    assert_int_equal(n, 3);
    n = chat_delivery_token(tok, sizeof(tok), "bob", 3, 42, NULL, 0);
    assert_string_equal(tok, "bob:42");
    n = chat_delivery_token(tok, sizeof(tok), "alice", 5, 9007199254740991ULL,
                            "phone", 5);
    assert_string_equal(tok, "alice:9007199254740991!phone");
    assert_int_equal(chat_delivery_token(tok, 5, "alice", 5, 1, NULL, 0), 0);

    /* what the module reads: malformed tokens are skipped, not fatal */
    len = (size_t) snprintf(pl, sizeof(pl), "%s",
                            "bob:7  alice!phone carol:0 b@d:3 dave:x eve:3!tab"
                            " :5 frank:99999999999999999\n{\"type\":\"msg\"}");
    assert_int_equal(chat_delivery_parse(pl, len, &toks, &ev), 0);
    assert_int_equal(ev.len, strlen("{\"type\":\"msg\"}"));
    assert_memory_equal(ev.p, "{\"type\":\"msg\"}", ev.len);

    assert_true(chat_delivery_next(&toks, &pos, &r));
    assert_int_equal(r.user.len, 3);
    assert_memory_equal(r.user.p, "bob", 3);
    assert_int_equal(r.cursor, 7);
    assert_int_equal(r.dev.len, 0);

    assert_true(chat_delivery_next(&toks, &pos, &r));
    assert_memory_equal(r.user.p, "alice", 5);
    assert_int_equal(r.cursor, 0);
    assert_int_equal(r.dev.len, 5);
    assert_memory_equal(r.dev.p, "phone", 5);

    assert_true(chat_delivery_next(&toks, &pos, &r));
    assert_memory_equal(r.user.p, "eve", 3);
    assert_int_equal(r.cursor, 3);
    assert_memory_equal(r.dev.p, "tab", 3);

    assert_false(chat_delivery_next(&toks, &pos, &r));
    assert_false(chat_delivery_next(&toks, &pos, &r));

    /* no newline, nothing after it, or not an object: refused */
    assert_int_equal(chat_delivery_parse("bob:1", 5, &toks, &ev), -1);
    assert_int_equal(chat_delivery_parse("bob:1\n{", 7, &toks, &ev), -1);
    assert_int_equal(chat_delivery_parse("bob:1\n[1]", 9, &toks, &ev), -1);
    /* no recipients is well-formed and names nobody */
    assert_int_equal(chat_delivery_parse("\n{}", 3, &toks, &ev), 0);
    pos = 0;
    assert_false(chat_delivery_next(&toks, &pos, &r));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_verdicts),
        cmocka_unit_test(test_recipients_and_inbox_field),
        cmocka_unit_test(test_pairs_round_trip),
        cmocka_unit_test(test_json_round_trip),
        cmocka_unit_test(test_rcpt_iteration),
        cmocka_unit_test(test_delivery_payloads),
    };

    return cmocka_run_group_tests(tests, load, NULL);
}
