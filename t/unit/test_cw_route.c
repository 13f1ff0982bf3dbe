/*
 * The workers' cluster routing (workers/route.c): which key each command
 * they send is routed by, on commands as hiredis formats them. The file is
 * compiled in (it is pure: no I/O, no allocation).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "chat_cluster.h"
#include "../../workers/route.c"

/* Formats like the workers do and routes. */
static cw_route_t
route_of(unsigned *slot, const char *fmt, ...)
{
    char       *cmd;
    int         len;
    cw_route_t  how;
    va_list     ap;

    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    assert_true(len > 0);
    *slot = 99999;
    how = cw_route(cmd, (size_t) len, slot);
    free(cmd);
    return how;
}

#define SLOT_OF(k) chat_cluster_slot(k, strlen(k))

static void
test_first_key_of_each_command(void **state)
{
    unsigned s;

    (void) state;
    assert_int_equal(route_of(&s, "HGETALL chat:{s3}:g:G:mem"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s3"));
    assert_int_equal(route_of(&s, "EVALSHA %s 5 chat:{u:a}:inbox chat:{u:a}:cur x y z f 1 ev",
                              "0123456789012345678901234567890123456789"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("u:a"));
    assert_int_equal(route_of(&s, "EVALSHA abc 0 arg"), CW_ROUTE_ANY);
    assert_int_equal(route_of(&s, "XREADGROUP GROUP fanout fanout-0 COUNT 200 BLOCK 1000 STREAMS chat:{s7}:in >"),
                     CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s7"));
    assert_int_equal(route_of(&s, "XREADGROUP GROUP persist persist-0 COUNT 1 STREAMS chat:{s1}:in 0"),
                     CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s1"));
    /* the workers' own rules: the key after the subcommand */
    assert_int_equal(route_of(&s, "XGROUP CREATE chat:{s2}:in fanout 0 MKSTREAM"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s2"));
    assert_int_equal(route_of(&s, "XINFO GROUPS chat:{s4}:in"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s4"));
    assert_int_equal(route_of(&s, "XINFO HELP"), CW_ROUTE_ANY);
    assert_int_equal(route_of(&s, "XACK chat:{s5}:in fanout 1-1 2-2"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s5"));
    assert_int_equal(route_of(&s, "XAUTOCLAIM chat:{s6}:in g c 0 0-0 COUNT 10"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s6"));
    assert_int_equal(route_of(&s, "SPUBLISH chat:w:n1:3 payload"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("chat:w:n1:3"));
    assert_int_equal(route_of(&s, "SPUBLISH chat:p:{u:b} payload"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("u:b"));
    /* lower case is the same command */
    assert_int_equal(route_of(&s, "hget chat:{u:b}:set tz"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("u:b"));
    assert_int_equal(route_of(&s, "xgroup create chat:{s9}:in push $ MKSTREAM"), CW_ROUTE_SLOT);
    assert_int_equal(s, SLOT_OF("s9"));
}

static void
test_keyless_and_transactions(void **state)
{
    unsigned s;

    (void) state;
    assert_int_equal(route_of(&s, "PING"), CW_ROUTE_ANY);
    assert_int_equal(route_of(&s, "INFO server"), CW_ROUTE_ANY);
    assert_int_equal(route_of(&s, "PUBLISH chat:p:u msg"), CW_ROUTE_ANY);   /* broadcast */
    assert_int_equal(route_of(&s, "SCRIPT LOAD %s", "return 1"), CW_ROUTE_ANY);
    assert_int_equal(route_of(&s, "CLUSTER SLOTS"), CW_ROUTE_ANY);
    assert_int_equal(route_of(&s, "WAIT 1 1000"), CW_ROUTE_ANY);
    assert_int_equal(route_of(&s, "MULTI"), CW_ROUTE_MULTI);
    assert_int_equal(route_of(&s, "EXEC"), CW_ROUTE_EXEC);
    assert_int_equal(route_of(&s, "DISCARD"), CW_ROUTE_EXEC);
    /* not a command: any node, which answers the error */
    assert_int_equal(cw_route("+OK\r\n", 5, &s), CW_ROUTE_ANY);
    assert_int_equal(cw_route("", 0, &s), CW_ROUTE_ANY);
}

/* Every key a script of the inbox append names is in the slot of its tag. */
static void
test_script_keys_share_the_slot(void **state)
{
    unsigned s, tag = chat_cluster_slot("u:alice", 7);

    (void) state;
    assert_int_equal(route_of(&s, "EVALSHA sha 5 chat:{u:alice}:inbox chat:{u:alice}:cur "
                              "chat:{u:alice}:last chat:{u:alice}:conns chat:{u:alice}:ages f 1 ev 0 10 20"),
                     CW_ROUTE_SLOT);
    assert_int_equal(s, tag);
    assert_int_equal(chat_cluster_slot("chat:{u:alice}:ages", 19), tag);
}

static void
test_resp_split(void **state)
{
    const char *arg[4];
    size_t      alen[4];
    static const char ok[] = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n";
    static const char bin[] = "*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n";   /* CRLF inside a bulk string */

    (void) state;
    assert_int_equal(cw_resp_args(ok, sizeof(ok) - 1, arg, alen, 4), 3);
    assert_int_equal(alen[0], 3);
    assert_memory_equal(arg[1], "k", 1);
    assert_int_equal(alen[2], 0);
    assert_int_equal(cw_resp_args(bin, sizeof(bin) - 1, arg, alen, 4), 2);
    assert_int_equal(alen[1], 4);
    assert_memory_equal(arg[1], "a\r\nb", 4);
    /* more arguments than room: the count, the first ones filled */
    assert_int_equal(cw_resp_args(ok, sizeof(ok) - 1, arg, alen, 2), 3);
    assert_memory_equal(arg[1], "k", 1);
    /* not one whole command */
    assert_int_equal(cw_resp_args(ok, sizeof(ok) - 2, arg, alen, 4), -1);
    assert_int_equal(cw_resp_args("*1\r\n$3\r\nGET\r\nX", 14, arg, alen, 4), -1);
    assert_int_equal(cw_resp_args("+OK\r\n", 5, arg, alen, 4), -1);
    assert_int_equal(cw_resp_args("*1\r\n$9\r\nGET\r\n", 13, arg, alen, 4), -1);
    assert_int_equal(cw_resp_args("*0\r\n", 4, arg, alen, 4), -1);
    assert_int_equal(cw_resp_args("", 0, arg, alen, 4), -1);
    assert_int_equal(cw_resp_args("*99999999999999999999\r\n", 23, arg, alen, 4), -1);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_first_key_of_each_command),
        cmocka_unit_test(test_keyless_and_transactions),
        cmocka_unit_test(test_script_keys_share_the_slot),
        cmocka_unit_test(test_resp_split),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
