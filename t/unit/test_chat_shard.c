/* chat_shard against the golden vectors shared with the Python tests. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "chat_shard.h"

static void
test_golden_vectors(void **state)
{
    char     line[512], conv[400];
    unsigned crc, s16, s7;
    int      n = 0;
    FILE    *f = fopen("t/vectors/shards.txt", "r");

    (void) state;
    assert_non_null(f);
    while (fgets(line, sizeof(line), f)) {
        if (line[0] == '#') continue;
        assert_int_equal(sscanf(line, "%399s %x %u %u", conv, &crc, &s16, &s7), 4);
        if (strcmp(conv, "-") == 0) conv[0] = '\0';
        assert_int_equal(chat_crc32(conv, strlen(conv)), crc);
        assert_int_equal(chat_shard(conv, strlen(conv), 16), s16);
        assert_int_equal(chat_shard(conv, strlen(conv), 7), s7);
        n++;
    }
    fclose(f);
    assert_true(n >= 8);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_vectors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
