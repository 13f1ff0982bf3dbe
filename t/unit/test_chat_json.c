/*
 * Unit tests for chat_json (strict JSON reader, writer helpers).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <string.h>
#include <stdio.h>
#include <cmocka.h>

#include "chat_json.h"

#define NTOK 64

static chat_json_tok_t  tok[NTOK];
static chat_json_doc_t  doc;

static chat_json_rc_t
parse_n(const char *s, size_t n, unsigned depth)
{
    return chat_json_parse(&doc, s, n, tok, NTOK, depth);
}

static chat_json_rc_t
parse(const char *s)
{
    return parse_n(s, strlen(s), 8);
}

#define OK(s)        assert_int_equal(parse(s), CHAT_JSON_OK)
#define ERR(s, rc)   assert_int_equal(parse(s), (rc))

/* ---------------------------------------------------------------------- */

static void
test_object_layout(void **state)
{
    int i;

    (void) state;
    OK("{\"a\":1,\"b\":[true,false,null],\"c\":{\"d\":\"x\"},\"e\":\"\"}");
    /* 0 obj, 1 "a", 2 1, 3 "b", 4 [, 5 t, 6 f, 7 n, 8 "c", 9 {, 10 "d",
     * 11 "x", 12 "e", 13 "" */
    assert_int_equal(doc.ntok, 14);
    assert_int_equal(tok[0].type, CHAT_JSON_OBJECT);
    assert_int_equal(tok[0].aux, 4);
    assert_int_equal(tok[0].next, 14);
    assert_int_equal(tok[0].start, 0);
    assert_int_equal(tok[0].len, doc.len);
    assert_int_equal(tok[1].type, CHAT_JSON_STRING);
    assert_true(tok[1].flags & CHAT_JSON_F_KEY);
    assert_int_equal(tok[2].type, CHAT_JSON_NUMBER);
    assert_true(tok[2].flags & CHAT_JSON_F_INT);
    assert_int_equal(tok[4].type, CHAT_JSON_ARRAY);
    assert_int_equal(tok[4].aux, 3);
    assert_int_equal(tok[4].next, 8);
    assert_memory_equal(chat_json_raw(&doc, 4), "[true,false,null]", 17);
    assert_int_equal(tok[4].len, 17);
    assert_int_equal(tok[5].type, CHAT_JSON_TRUE);
    assert_int_equal(tok[6].type, CHAT_JSON_FALSE);
    assert_int_equal(tok[7].type, CHAT_JSON_NULL);
    assert_int_equal(tok[9].type, CHAT_JSON_OBJECT);
    assert_int_equal(tok[9].aux, 1);
    assert_int_equal(tok[9].next, 12);
    assert_int_equal(tok[11].len, 1);
    assert_memory_equal(chat_json_raw(&doc, 11), "x", 1);
    assert_int_equal(tok[13].len, 0);
    assert_int_equal(tok[13].aux, 0);

    assert_int_equal(chat_json_obj_get(&doc, 0, "a", 1), 2);
    assert_int_equal(chat_json_obj_get(&doc, 0, "b", 1), 4);
    assert_int_equal(chat_json_obj_get(&doc, 0, "e", 1), 13);
    assert_int_equal(chat_json_obj_get(&doc, 0, "d", 1), -1);  /* nested */
    assert_int_equal(chat_json_obj_get(&doc, 9, "d", 1), 11);
    assert_int_equal(chat_json_obj_get(&doc, 4, "a", 1), -1);  /* array */

    /* every next index is in order and in range */
    for (i = 0; i < (int) doc.ntok; i++) {
        assert_true(tok[i].next > i && tok[i].next <= doc.ntok);
        assert_true((size_t) tok[i].start + tok[i].len <= doc.len);
    }
}

static void
test_whitespace(void **state)
{
    (void) state;
    OK(" \t\r\n{ \t\r\n\"a\" \t\r\n: \t\r\n[ 1 , 2 ] \t\r\n} \t\r\n");
    assert_int_equal(tok[0].aux, 1);
    assert_int_equal(tok[2].aux, 2);
    OK("[ ]");
    assert_int_equal(tok[0].aux, 0);
    OK("{ }");
    ERR("\f{}", CHAT_JSON_E_SYNTAX);          /* form feed is no JSON blank */
    ERR("{}\v", CHAT_JSON_E_TRAILING);
    ERR("\xEF\xBB\xBF{}", CHAT_JSON_E_SYNTAX); /* BOM */
    ERR("\xC2\xA0{}", CHAT_JSON_E_SYNTAX);     /* NBSP */
}

static void
test_scalars_at_root(void **state)
{
    (void) state;
    OK("1");
    assert_int_equal(tok[0].type, CHAT_JSON_NUMBER);
    OK("\"x\"");
    assert_int_equal(tok[0].type, CHAT_JSON_STRING);
    OK("true");
    OK("false");
    OK(" null ");
    assert_int_equal(doc.ntok, 1);
}

static void
test_empty_and_truncated(void **state)
{
    (void) state;
    ERR("", CHAT_JSON_E_EOF);
    ERR("   ", CHAT_JSON_E_EOF);
    assert_int_equal(parse_n(NULL, 0, 8), CHAT_JSON_E_EOF);
    ERR("{", CHAT_JSON_E_EOF);
    ERR("[", CHAT_JSON_E_EOF);
    ERR("[1", CHAT_JSON_E_EOF);
    ERR("[1,", CHAT_JSON_E_EOF);
    ERR("{\"a\"", CHAT_JSON_E_EOF);
    ERR("{\"a\":", CHAT_JSON_E_EOF);
    ERR("{\"a\":1", CHAT_JSON_E_EOF);
    ERR("\"abc", CHAT_JSON_E_EOF);             /* unterminated string */
    ERR("{\"a\":\"abc}", CHAT_JSON_E_EOF);
    ERR("\"abc\\\"", CHAT_JSON_E_EOF);         /* escaped quote is no end */
    ERR("\"\\", CHAT_JSON_E_EOF);
    ERR("\"\\u12", CHAT_JSON_E_EOF);
    ERR("tru", CHAT_JSON_E_EOF);
    ERR("nul", CHAT_JSON_E_EOF);
    ERR("-", CHAT_JSON_E_EOF);
    ERR("1.", CHAT_JSON_E_EOF);
    ERR("1e", CHAT_JSON_E_EOF);
    ERR("1e+", CHAT_JSON_E_EOF);
}

static void
test_trailing(void **state)
{
    (void) state;
    ERR("{} x", CHAT_JSON_E_TRAILING);
    ERR("{}}", CHAT_JSON_E_TRAILING);
    ERR("[1]]", CHAT_JSON_E_TRAILING);
    ERR("1 2", CHAT_JSON_E_TRAILING);
    ERR("{}{}", CHAT_JSON_E_TRAILING);
    ERR("\"a\"\"b\"", CHAT_JSON_E_TRAILING);
    assert_int_equal(parse_n("{}\0", 3, 8), CHAT_JSON_E_TRAILING);
    ERR("{} x", CHAT_JSON_E_TRAILING);
    assert_int_equal(doc.err_off, 3);
}

static void
test_syntax_errors(void **state)
{
    (void) state;
    ERR("[1,]", CHAT_JSON_E_SYNTAX);
    ERR("{\"a\":1,}", CHAT_JSON_E_SYNTAX);
    ERR("{\"a\" 1}", CHAT_JSON_E_SYNTAX);
    ERR("{a:1}", CHAT_JSON_E_SYNTAX);
    ERR("{'a':1}", CHAT_JSON_E_SYNTAX);
    ERR("['a']", CHAT_JSON_E_SYNTAX);
    ERR("{1:1}", CHAT_JSON_E_SYNTAX);
    ERR("[1 2]", CHAT_JSON_E_SYNTAX);
    ERR("{\"a\":1 \"b\":2}", CHAT_JSON_E_SYNTAX);
    ERR("[1}", CHAT_JSON_E_SYNTAX);
    ERR("{\"a\":1]", CHAT_JSON_E_SYNTAX);
    ERR("[,1]", CHAT_JSON_E_SYNTAX);
    ERR("01", CHAT_JSON_E_TRAILING);
    ERR("[01]", CHAT_JSON_E_SYNTAX);
    ERR("+1", CHAT_JSON_E_SYNTAX);
    ERR(".5", CHAT_JSON_E_SYNTAX);
    ERR("[1.]", CHAT_JSON_E_SYNTAX);
    ERR("[1.e5]", CHAT_JSON_E_SYNTAX);
    ERR("[-]", CHAT_JSON_E_SYNTAX);
    ERR("[--1]", CHAT_JSON_E_SYNTAX);
    ERR("[0x10]", CHAT_JSON_E_SYNTAX);
    ERR("[NaN]", CHAT_JSON_E_SYNTAX);
    ERR("[Infinity]", CHAT_JSON_E_SYNTAX);
    ERR("[-Infinity]", CHAT_JSON_E_SYNTAX);
    ERR("[trux]", CHAT_JSON_E_SYNTAX);
    ERR("[True]", CHAT_JSON_E_SYNTAX);
    ERR("[truefalse]", CHAT_JSON_E_SYNTAX);
    ERR("[nulll]", CHAT_JSON_E_SYNTAX);
    ERR("// c\n{}", CHAT_JSON_E_SYNTAX);
    ERR("{} /* c */", CHAT_JSON_E_TRAILING);
    ERR("[1 /* c */]", CHAT_JSON_E_SYNTAX);
    OK("[0,-0,1.5,-1.5e10,2E-3,1e+2,0.0]");
    assert_int_equal(tok[0].aux, 7);
    assert_true(tok[1].flags & CHAT_JSON_F_INT);
    assert_true(tok[2].flags & CHAT_JSON_F_NEG);
    assert_false(tok[3].flags & CHAT_JSON_F_INT);
    assert_false(tok[6].flags & CHAT_JSON_F_INT);
}

static void
test_nesting_limit(void **state)
{
    static chat_json_tok_t big[256];
    char                   buf[256];
    int                    i, n;

    (void) state;
    OK("[[[[[[[[1]]]]]]]]");                   /* 8 */
    ERR("[[[[[[[[[1]]]]]]]]]", CHAT_JSON_E_DEPTH);
    OK("{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":1}}}}}}}}");
    ERR("{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{}}}}}}}}}",
        CHAT_JSON_E_DEPTH);
    ERR("[{\"a\":[{\"a\":[{\"a\":[{\"a\":[]}]}]}]}]", CHAT_JSON_E_DEPTH);
    /* siblings do not add up */
    OK("[[[[[[[[1]]]]]]],[[[[[[[1]]]]]]]]");
    assert_int_equal(parse_n("[[1]]", 5, 1), CHAT_JSON_E_DEPTH);
    assert_int_equal(parse_n("[1]", 3, 1), CHAT_JSON_OK);
    assert_int_equal(parse_n("[1]", 3, 0), CHAT_JSON_E_DEPTH);
    assert_int_equal(parse_n("1", 1, 0), CHAT_JSON_OK);

    /* depth is capped at CHAT_JSON_DEPTH_CAP whatever the caller asks */
    n = CHAT_JSON_DEPTH_CAP + 1;
    for (i = 0; i < n; i++) {
        buf[i] = '[';
        buf[2 * n - 1 - i] = ']';
    }
    assert_int_equal(chat_json_parse(&doc, buf, 2 * (size_t) n, big, 256,
                                     1000), CHAT_JSON_E_DEPTH);
    assert_int_equal(chat_json_parse(&doc, buf + 1, 2 * (size_t) n - 2, big,
                                     256, 1000), CHAT_JSON_OK);
}

static void
test_token_limit(void **state)
{
    chat_json_tok_t small[4];

    (void) state;
    assert_int_equal(chat_json_parse(&doc, "[1,2,3]", 7, small, 4, 8),
                     CHAT_JSON_OK);
    assert_int_equal(doc.ntok, 4);
    assert_int_equal(chat_json_parse(&doc, "[1,2,3,4]", 9, small, 4, 8),
                     CHAT_JSON_E_TOKENS);
    assert_int_equal(chat_json_parse(&doc, "{\"a\":1,\"b\":2}", 13, small, 4,
                                     8), CHAT_JSON_E_TOKENS);
    assert_int_equal(chat_json_parse(&doc, "1", 1, small, 0, 8),
                     CHAT_JSON_E_TOKENS);
}

static void
test_escapes(void **state)
{
    char   out[64];
    size_t n;

    (void) state;
    OK("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"");
    assert_true(tok[0].flags & CHAT_JSON_F_ESC);
    assert_int_equal(tok[0].aux, 8);
    assert_int_equal(chat_json_get_str(&doc, 0, out, sizeof(out), &n),
                     CHAT_JSON_OK);
    assert_int_equal(n, 8);
    assert_memory_equal(out, "\"\\/\b\f\n\r\t", 8);
    assert_int_equal(out[8], '\0');

    OK("\"caf\\u00e9 \\u00E9 \\u20AC \\u0000\"");
    assert_int_equal(chat_json_get_str(&doc, 0, out, sizeof(out), &n),
                     CHAT_JSON_OK);
    assert_int_equal(n, 14);
    assert_memory_equal(out, "caf\xC3\xA9 \xC3\xA9 \xE2\x82\xAC \0", 14);
    assert_int_equal(tok[0].aux, 10);

    /* surrogate pair: U+1F600 */
    OK("\"\\ud83d\\ude00\"");
    assert_int_equal(tok[0].aux, 1);
    assert_int_equal(chat_json_get_str(&doc, 0, out, sizeof(out), &n),
                     CHAT_JSON_OK);
    assert_int_equal(n, 4);
    assert_memory_equal(out, "\xF0\x9F\x98\x80", 4);
    OK("\"\\uDBFF\\uDFFF\"");                  /* U+10FFFF */
    assert_int_equal(chat_json_get_str(&doc, 0, out, sizeof(out), &n),
                     CHAT_JSON_OK);
    assert_memory_equal(out, "\xF4\x8F\xBF\xBF", 4);

    ERR("\"\\x\"", CHAT_JSON_E_ESCAPE);
    ERR("\"\\U0041\"", CHAT_JSON_E_ESCAPE);
    ERR("\"\\u12G4\"", CHAT_JSON_E_ESCAPE);
    ERR("\"\\u-123\"", CHAT_JSON_E_ESCAPE);
    ERR("\"\\u12\"", CHAT_JSON_E_ESCAPE);
    ERR("\"\\'\"", CHAT_JSON_E_ESCAPE);
    ERR("\"\\a\"", CHAT_JSON_E_ESCAPE);
    ERR("\"\\0\"", CHAT_JSON_E_ESCAPE);

    /* lone and misordered surrogates */
    ERR("\"\\ud83d\"", CHAT_JSON_E_SURROGATE);
    ERR("\"\\ud83dx\"", CHAT_JSON_E_SURROGATE);
    ERR("\"\\ud83d\\n\"", CHAT_JSON_E_SURROGATE);
    ERR("\"\\ude00\"", CHAT_JSON_E_SURROGATE);
    ERR("\"\\ude00\\ud83d\"", CHAT_JSON_E_SURROGATE);
    ERR("\"\\ud83d\\ud83d\"", CHAT_JSON_E_SURROGATE);
    ERR("\"\\ud83d\\u0041\"", CHAT_JSON_E_SURROGATE);
    ERR("\"\\ud83d\\uzzzz\"", CHAT_JSON_E_ESCAPE);
    ERR("\"a\\uDFFF\"", CHAT_JSON_E_SURROGATE);
    ERR("{\"\\ud800\":1}", CHAT_JSON_E_SURROGATE);
}

static void
test_control_chars(void **state)
{
    char s[8];
    int  c;

    (void) state;
    for (c = 0; c < 0x20; c++) {
        s[0] = '"';
        s[1] = 'a';
        s[2] = (char) c;
        s[3] = '"';
        assert_int_equal(parse_n(s, 4, 8), CHAT_JSON_E_CONTROL);
        assert_int_equal(doc.err_off, 2);
    }
    OK("\"\x7F\"");                            /* DEL is allowed raw */
    ERR("{\"a\tb\":1}", CHAT_JSON_E_CONTROL);
}

static void
test_utf8(void **state)
{
    (void) state;
    OK("\"\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\xEF\xBF\xBF\xF4\x8F\xBF\xBF\"");
    assert_int_equal(tok[0].aux, 5);
    ERR("\"\xFF\"", CHAT_JSON_E_UTF8);
    ERR("\"\xFE\"", CHAT_JSON_E_UTF8);
    ERR("\"\x80\"", CHAT_JSON_E_UTF8);         /* lone continuation */
    ERR("\"\xC0\x80\"", CHAT_JSON_E_UTF8);     /* overlong NUL */
    ERR("\"\xC1\xBF\"", CHAT_JSON_E_UTF8);
    ERR("\"\xE0\x80\xAF\"", CHAT_JSON_E_UTF8); /* overlong '/' */
    ERR("\"\xE0\x9F\xBF\"", CHAT_JSON_E_UTF8);
    ERR("\"\xF0\x8F\xBF\xBF\"", CHAT_JSON_E_UTF8);
    ERR("\"\xED\xA0\x80\"", CHAT_JSON_E_UTF8); /* encoded surrogate */
    ERR("\"\xED\xBF\xBF\"", CHAT_JSON_E_UTF8);
    ERR("\"\xF4\x90\x80\x80\"", CHAT_JSON_E_UTF8); /* > U+10FFFF */
    ERR("\"\xF5\x80\x80\x80\"", CHAT_JSON_E_UTF8);
    ERR("\"\xC3\"", CHAT_JSON_E_UTF8);         /* truncated before quote */
    ERR("\"\xE2\x82\"", CHAT_JSON_E_UTF8);
    ERR("\"\xC3\x28\"", CHAT_JSON_E_UTF8);
    ERR("\"\xE2\x28\xA1\"", CHAT_JSON_E_UTF8);
    assert_int_equal(parse_n("\"\xF0\x9F\x98", 4, 8), CHAT_JSON_E_UTF8);
    OK("\"\xED\x9F\xBF\"");                    /* U+D7FF */
    OK("\"\xEE\x80\x80\"");                    /* U+E000 */
    ERR("[\xC3\xA9]", CHAT_JSON_E_SYNTAX);     /* only inside strings */
}

static void
test_duplicate_keys(void **state)
{
    (void) state;
    ERR("{\"a\":1,\"a\":2}", CHAT_JSON_E_DUPKEY);
    ERR("{\"a\":1,\"b\":2,\"a\":3}", CHAT_JSON_E_DUPKEY);
    ERR("{\"a\":1,\"\\u0061\":2}", CHAT_JSON_E_DUPKEY);
    ERR("{\"\\u0061\":1,\"a\":2}", CHAT_JSON_E_DUPKEY);
    ERR("{\"\\u00e9\":1,\"\xC3\xA9\":2}", CHAT_JSON_E_DUPKEY);
    ERR("{\"\\/\":1,\"/\":2}", CHAT_JSON_E_DUPKEY);
    ERR("{\"a\":{\"x\":[1,{\"y\":2}]},\"a\":3}", CHAT_JSON_E_DUPKEY);
    ERR("{\"\":1,\"\":2}", CHAT_JSON_E_DUPKEY);
    OK("{\"a\":1,\"A\":2,\"aa\":3,\"a \":4,\"\":5}");
    OK("{\"a\":{\"a\":{\"a\":1}},\"b\":{\"a\":2}}");
    OK("[{\"a\":1},{\"a\":2}]");
    OK("{\"a\\\\b\":1,\"a\\\\\\\\b\":2}");
}

static void
test_numbers(void **state)
{
    int64_t v = 0;

    (void) state;
    OK("[9223372036854775807,-9223372036854775808,0,-0,42,-7]");
    assert_int_equal(chat_json_get_int64(&doc, 1, &v), CHAT_JSON_OK);
    assert_true(v == INT64_MAX);
    assert_int_equal(chat_json_get_int64(&doc, 2, &v), CHAT_JSON_OK);
    assert_true(v == INT64_MIN);
    assert_int_equal(chat_json_get_int64(&doc, 4, &v), CHAT_JSON_OK);
    assert_true(v == 0);
    assert_int_equal(chat_json_get_int64(&doc, 5, &v), CHAT_JSON_OK);
    assert_true(v == 42);
    assert_int_equal(chat_json_get_int64(&doc, 6, &v), CHAT_JSON_OK);
    assert_true(v == -7);

    OK("[9223372036854775808,-9223372036854775809,"
       "123456789012345678901234567890,1.5,1e3,1E+2,1.0,\"1\"]");
    assert_int_equal(chat_json_get_int64(&doc, 1, &v), CHAT_JSON_E_RANGE);
    assert_int_equal(chat_json_get_int64(&doc, 2, &v), CHAT_JSON_E_RANGE);
    assert_int_equal(chat_json_get_int64(&doc, 3, &v), CHAT_JSON_E_RANGE);
    assert_int_equal(chat_json_get_int64(&doc, 4, &v), CHAT_JSON_E_NOT_INT);
    assert_int_equal(chat_json_get_int64(&doc, 5, &v), CHAT_JSON_E_NOT_INT);
    assert_int_equal(chat_json_get_int64(&doc, 6, &v), CHAT_JSON_E_NOT_INT);
    assert_int_equal(chat_json_get_int64(&doc, 7, &v), CHAT_JSON_E_NOT_INT);
    assert_int_equal(chat_json_get_int64(&doc, 8, &v), CHAT_JSON_E_TYPE);
    assert_int_equal(chat_json_get_int64(&doc, 0, &v), CHAT_JSON_E_TYPE);
    assert_int_equal(chat_json_get_int64(&doc, 99, &v), CHAT_JSON_E_TYPE);

    /* a very long number is still valid JSON */
    OK("[1000000000000000000000000000000000000000000000000000000000000e-999]");

    assert_int_equal(chat_json_parse_int64("12", 2, &v), CHAT_JSON_OK);
    assert_true(v == 12);
    assert_int_equal(chat_json_parse_int64("", 0, &v), CHAT_JSON_E_SYNTAX);
    assert_int_equal(chat_json_parse_int64("12 ", 3, &v), CHAT_JSON_E_SYNTAX);
    assert_int_equal(chat_json_parse_int64("012", 3, &v), CHAT_JSON_E_SYNTAX);
    assert_int_equal(chat_json_parse_int64("-", 1, &v), CHAT_JSON_E_SYNTAX);
    assert_int_equal(chat_json_parse_int64("2e0", 3, &v),
                     CHAT_JSON_E_NOT_INT);
    assert_int_equal(chat_json_parse_int64("99999999999999999999", 20, &v),
                     CHAT_JSON_E_RANGE);
}

static void
test_str_eq(void **state)
{
    (void) state;
    OK("[\"abc\",\"a\\u0062c\",\"\\\"q\\\"\",\"\",\"\\\\\"]");
    assert_true(chat_json_str_eq(&doc, 1, "abc", 3));
    assert_false(chat_json_str_eq(&doc, 1, "ab", 2));
    assert_false(chat_json_str_eq(&doc, 1, "abcd", 4));
    assert_true(chat_json_str_eq(&doc, 2, "abc", 3));
    assert_false(chat_json_str_eq(&doc, 2, "abd", 3));
    assert_false(chat_json_str_eq(&doc, 2, "a\\u0062c", 8));
    assert_true(chat_json_str_eq(&doc, 3, "\"q\"", 3));
    assert_true(chat_json_str_eq(&doc, 4, "", 0));
    assert_true(chat_json_str_eq(&doc, 5, "\\", 1));
    assert_false(chat_json_str_eq(&doc, 0, "", 0));   /* the array */

    OK("{\"t\\u0079pe\":\"x\"}");
    assert_int_equal(chat_json_obj_get(&doc, 0, "type", 4), 2);
}

static void
test_unescape_and_count(void **state)
{
    char   out[32];
    size_t n = 0, cp = 0;

    (void) state;
    assert_int_equal(chat_json_unescape("a\\nb", 4, out, sizeof(out), &n),
                     CHAT_JSON_OK);
    assert_int_equal(n, 3);
    assert_memory_equal(out, "a\nb", 3);

    /* output never larger than the raw input */
    assert_int_equal(chat_json_unescape("a\\nb", 4, out, 3, &n), CHAT_JSON_OK);
    assert_int_equal(chat_json_unescape("a\\nb", 4, out, 2, &n),
                     CHAT_JSON_E_SPACE);
    assert_int_equal(chat_json_unescape("\\ud83d\\ude00", 12, out, 4, &n),
                     CHAT_JSON_OK);
    assert_int_equal(n, 4);
    assert_int_equal(chat_json_unescape("\\ud83d\\ude00", 12, out, 3, &n),
                     CHAT_JSON_E_SPACE);

    /* the same validation as the parser */
    assert_int_equal(chat_json_unescape("a\"b", 3, out, sizeof(out), &n),
                     CHAT_JSON_E_SYNTAX);
    assert_int_equal(chat_json_unescape("a\\", 2, out, sizeof(out), &n),
                     CHAT_JSON_E_ESCAPE);
    assert_int_equal(chat_json_unescape("\\ud83d", 6, out, sizeof(out), &n),
                     CHAT_JSON_E_SURROGATE);
    assert_int_equal(chat_json_unescape("\\ud83d\\", 7, out, sizeof(out), &n),
                     CHAT_JSON_E_ESCAPE);
    assert_int_equal(chat_json_unescape("\x01", 1, out, sizeof(out), &n),
                     CHAT_JSON_E_CONTROL);
    assert_int_equal(chat_json_unescape("\xC3", 1, out, sizeof(out), &n),
                     CHAT_JSON_E_UTF8);
    assert_int_equal(chat_json_unescape("", 0, out, sizeof(out), &n),
                     CHAT_JSON_OK);
    assert_int_equal(n, 0);
    /* size query */
    assert_int_equal(chat_json_unescape("\\ud83d\\ude00\\n", 14, NULL, 0, &n),
                     CHAT_JSON_OK);
    assert_int_equal(n, 5);
    assert_int_equal(chat_json_unescape(NULL, 0, NULL, 0, &n), CHAT_JSON_OK);
    assert_int_equal(n, 0);

    assert_int_equal(chat_json_count_cp("h\xC3\xA9llo\xF0\x9F\x98\x80", 10,
                                        &cp), CHAT_JSON_OK);
    assert_int_equal(cp, 6);
    assert_int_equal(chat_json_count_cp("\\ud83d\\ude00\\u00e9\\n", 20, &cp),
                     CHAT_JSON_OK);
    assert_int_equal(cp, 3);
    assert_int_equal(chat_json_count_cp("\\ude00", 6, &cp),
                     CHAT_JSON_E_SURROGATE);
}

static void
test_escape_writer(void **state)
{
    char   out[128];
    size_t n;
    char   all[127];
    int    i;
    char   q[300], dec[300];
    size_t qn, dn;

    (void) state;
    n = chat_json_escape(out, sizeof(out), "a\"b\\c/", 6);
    assert_int_equal(n, 8);
    assert_memory_equal(out, "a\\\"b\\\\c/", 8);

    n = chat_json_escape(out, sizeof(out), "\b\f\n\r\t\x01\x1f\x7f", 8);
    assert_int_equal(n, 23);
    assert_memory_equal(out, "\\b\\f\\n\\r\\t\\u0001\\u001f\x7f", 23);

    n = chat_json_escape(out, sizeof(out), "\0", 1);
    assert_int_equal(n, 6);
    assert_memory_equal(out, "\\u0000", 6);

    /* valid UTF-8 passes, invalid bytes become U+FFFD */
    n = chat_json_escape(out, sizeof(out), "\xC3\xA9\xF0\x9F\x98\x80", 6);
    assert_int_equal(n, 6);
    assert_memory_equal(out, "\xC3\xA9\xF0\x9F\x98\x80", 6);
    n = chat_json_escape(out, sizeof(out), "a\xFF" "b\xC3", 4);
    assert_int_equal(n, 8);
    assert_memory_equal(out, "a\xEF\xBF\xBD" "b\xEF\xBF\xBD", 8);
    n = chat_json_escape(out, sizeof(out), "\xED\xA0\x80", 3);
    assert_int_equal(n, 9);

    /* U+2028 / U+2029 */
    n = chat_json_escape(out, sizeof(out), "\xE2\x80\xA8\xE2\x80\xA9", 6);
    assert_int_equal(n, 12);
    assert_memory_equal(out, "\\u2028\\u2029", 12);

    /* size query and truncation: whole characters only */
    assert_int_equal(chat_json_escape_len("a\"b", 3), 4);
    assert_int_equal(chat_json_escape(NULL, 0, "\n", 1), 2);
    memset(out, 'Z', sizeof(out));
    n = chat_json_escape(out, 2, "a\"b", 3);
    assert_int_equal(n, 4);
    assert_int_equal(out[0], 'a');
    assert_int_equal(out[1], 'Z');            /* no half escape */
    memset(out, 'Z', sizeof(out));
    n = chat_json_escape(out, 3, "\x01" "ab", 3);
    assert_int_equal(n, 8);
    assert_int_equal(out[0], 'Z');            /* nothing after a miss */
    assert_int_equal(out[1], 'Z');

    /* round trip for every ASCII byte */
    for (i = 0; i < 127; i++) {
        all[i] = (char) (i + 1);
    }
    q[0] = '"';
    qn = chat_json_escape(q + 1, sizeof(q) - 2, all, sizeof(all));
    assert_true(qn < sizeof(q) - 2);
    q[qn + 1] = '"';
    assert_int_equal(parse_n(q, qn + 2, 8), CHAT_JSON_OK);
    assert_int_equal(chat_json_get_str(&doc, 0, dec, sizeof(dec), &dn),
                     CHAT_JSON_OK);
    assert_int_equal(dn, sizeof(all));
    assert_memory_equal(dec, all, sizeof(all));
}

static void
test_writer(void **state)
{
    char          buf[64];
    chat_json_w_t w;
    char          num[20];

    (void) state;
    chat_json_w_init(&w, buf, sizeof(buf));
    chat_json_w_cstr(&w, "{\"type\":");
    chat_json_w_str(&w, "pong", 4);
    chat_json_w_cstr(&w, ",\"n\":");
    chat_json_w_int(&w, -12);
    chat_json_w_cstr(&w, ",\"s\":");
    chat_json_w_str(&w, "a\"b", 3);
    chat_json_w_cstr(&w, "}");
    assert_false(w.overflow);
    assert_int_equal(w.len, 34);
    assert_memory_equal(buf, "{\"type\":\"pong\",\"n\":-12,\"s\":\"a\\\"b\"}", 34);
    assert_int_equal(parse_n(buf, w.len, 8), CHAT_JSON_OK);

    chat_json_w_init(&w, buf, 5);
    chat_json_w_str(&w, "abc", 3);
    assert_false(w.overflow);
    chat_json_w_raw(&w, "x", 1);
    assert_true(w.overflow);
    assert_int_equal(w.len, 5);
    chat_json_w_raw(&w, "", 0);
    assert_true(w.overflow);

    chat_json_w_init(&w, buf, 4);
    chat_json_w_str(&w, "a\nb", 3);              /* needs 6 */
    assert_true(w.overflow);
    assert_true(w.len <= 4);

    assert_int_equal(chat_json_fmt_int64(num, INT64_MIN), 20);
    assert_memory_equal(num, "-9223372036854775808", 20);
    assert_int_equal(chat_json_fmt_int64(num, INT64_MAX), 19);
    assert_memory_equal(num, "9223372036854775807", 19);
    assert_int_equal(chat_json_fmt_int64(num, 0), 1);
    assert_int_equal(num[0], '0');
}

static void
test_errors_have_offsets(void **state)
{
    (void) state;
    ERR("{\"a\":[1,2,x]}", CHAT_JSON_E_SYNTAX);
    assert_int_equal(doc.err_off, 10);
    ERR("[\"ok\",\"b\\qd\"]", CHAT_JSON_E_ESCAPE);
    assert_int_equal(doc.err_off, 8);
    assert_int_equal(doc.ntok, 0);
    assert_string_equal(chat_json_strerror(CHAT_JSON_E_DUPKEY),
                        "duplicate key");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_object_layout),
        cmocka_unit_test(test_whitespace),
        cmocka_unit_test(test_scalars_at_root),
        cmocka_unit_test(test_empty_and_truncated),
        cmocka_unit_test(test_trailing),
        cmocka_unit_test(test_syntax_errors),
        cmocka_unit_test(test_nesting_limit),
        cmocka_unit_test(test_token_limit),
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_control_chars),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_str_eq),
        cmocka_unit_test(test_unescape_and_count),
        cmocka_unit_test(test_escape_writer),
        cmocka_unit_test(test_writer),
        cmocka_unit_test(test_errors_have_offsets),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
