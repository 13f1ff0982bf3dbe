/* chat_redis_url_parse: what the module's chat_redis and the workers'
 * redis_url accept (one parser for both). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "chat_url.h"

static void
test_valid(void **state)
{
    chat_redis_url_t u;

    (void) state;
    assert_int_equal(chat_redis_url_parse("redis://127.0.0.1", 17, &u), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 6379);
    assert_int_equal(u.db, 0);
    assert_string_equal(u.password, "");
    assert_int_equal(chat_redis_url_parse("redis://:s3cret@h:7000/3", 24, &u), 0);
    assert_string_equal(u.host, "h");
    assert_int_equal(u.port, 7000);
    assert_int_equal(u.db, 3);
    assert_string_equal(u.password, "s3cret");
    assert_int_equal(chat_redis_url_parse("redis://user:pw@redis.example:6380/", 35, &u), 0);
    assert_string_equal(u.password, "pw");
    assert_int_equal(u.db, 0);
    assert_int_equal(chat_redis_url_parse("redis://pw@h", 12, &u), 0);
    assert_string_equal(u.password, "pw");
}

static void
test_unix(void **state)
{
    chat_redis_url_t u;
    char             longp[160];

    (void) state;
    assert_int_equal(chat_redis_url_parse("unix:///run/redis/redis.sock", 28, &u), 0);
    assert_string_equal(u.host, "/run/redis/redis.sock");
    assert_int_equal(u.port, 0);
    assert_int_equal(u.db, 0);
    assert_string_equal(u.password, "");
    assert_int_equal(chat_redis_url_parse("unix://:pw@/tmp/r.sock?db=3", 27, &u), 0);
    assert_string_equal(u.host, "/tmp/r.sock");
    assert_string_equal(u.password, "pw");
    assert_int_equal(u.db, 3);
    /* a path of 107 bytes fits sun_path with its NUL, 108 does not */
    memcpy(longp, "unix://", 7);
    longp[7] = '/';
    memset(longp + 8, 'a', 106);
    assert_int_equal(chat_redis_url_parse(longp, 7 + 107, &u), 0);
    assert_int_equal((int) strlen(u.host), 107);
    longp[7 + 107] = 'a';
    assert_int_not_equal(chat_redis_url_parse(longp, 7 + 108, &u), 0);
}

static void
test_invalid(void **state)
{
    static const char *bad[] = {
        "", "redis:/h", "http://h", "redis://", "redis://:6379", "redis://h:0", "redis://h:65536",
        "redis://h:12x", "redis://h/16", "redis://h/-1", "redis://h/1a", "redis://h:", "redis://@",
        "unix://", "unix://relative.sock", "unix:///", "unix:///tmp/", "unix:///tmp/r.sock?db=16",
        "unix:///tmp/r.sock?db=", "unix:///tmp/r.sock?x=1", "unix:/tmp/r.sock", "unix://:pw@",
    };
    chat_redis_url_t u;

    (void) state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (chat_redis_url_parse(bad[i], strlen(bad[i]), &u) == 0) {
            fail_msg("accepted \"%s\"", bad[i]);
        }
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_unix),
        cmocka_unit_test(test_invalid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
