/* chat_cluster: key -> slot against a real server's CLUSTER KEYSLOT
 * (t/vectors/slots.txt), MOVED/ASK parsing, the slot map from CLUSTER
 * SLOTS replies fed through hiredis' own reader (the bytes a server sends). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "chat_cluster.h"

/* %XX-decode the vector file's key column */
static size_t
pct_decode(const char *in, char *out)
{
    size_t  n = 0;

    if (strcmp(in, "-") == 0) {
        return 0;
    }
    for (const char *p = in; *p; p++) {
        unsigned  b;

        if (*p == '%' && sscanf(p + 1, "%2x", &b) == 1) {
            out[n++] = (char) b;
            p += 2;
        } else {
            out[n++] = *p;
        }
    }
    return n;
}

static void
test_golden_vectors(void **state)
{
    char      line[1024], col[512], key[512];
    unsigned  slot, crc, n = 0;
    size_t    klen;
    FILE     *f = fopen("t/vectors/slots.txt", "r");

    (void) state;
    assert_non_null(f);
    while (fgets(line, sizeof(line), f)) {
        if (line[0] == '#') continue;
        assert_int_equal(sscanf(line, "%511s %u %x", col, &slot, &crc), 3);
        klen = pct_decode(col, key);
        assert_int_equal(chat_crc16(key, klen), crc);
        if (chat_cluster_slot(key, klen) != slot) {
            fail_msg("slot of \"%s\": %u, server says %u", col, chat_cluster_slot(key, klen), slot);
        }
        n++;
    }
    fclose(f);
    assert_true(n >= 30);
}

static void
test_hash_tags(void **state)
{
    (void) state;
    /* the spec's own examples */
    assert_int_equal(chat_cluster_slot("{user1000}.following", 20), chat_cluster_slot("user1000", 8));
    assert_int_equal(chat_cluster_slot("foo{{bar}}zap", 13), chat_cluster_slot("{bar", 4));
    assert_int_equal(chat_cluster_slot("foo{bar}{zap}", 13), chat_cluster_slot("bar", 3));
    assert_int_equal(chat_cluster_slot("foo{}{bar}", 10), chat_cluster_slot("foo{}{bar}", 10));
    assert_int_not_equal(chat_cluster_slot("foo{}{bar}", 10), chat_cluster_slot("bar", 3));
    /* a tag ends at the key's length, not at a NUL: "{ab" of "{ab}" has no close */
    assert_int_equal(chat_cluster_slot("{ab}", 3), chat_crc16("{ab", 3) & 16383);
    /* the project's keys: every key of one user shares the user's slot */
    assert_int_equal(chat_cluster_slot("chat:{u:alice}:conns", 20), chat_cluster_slot("chat:{u:alice}:inbox", 20));
}

static void
test_redirect(void **state)
{
    static const char *bad[] = {
        "", "MOVED", "MOVED ", "MOVED 1", "MOVED 1 ", "MOVED 1 h", "MOVED 1 h:", "MOVED 1 h:0",
        "MOVED 1 h:65536", "MOVED 16384 h:1", "MOVED -1 h:1", "MOVED x h:1", "MOVED 1 h:1 extra",
        "MOVED  1 h:1", "moved 1 h:1", "ASK", "ASK 1", "ASKING", "ERR wrong", "CROSSSLOT Keys",
        "TRYAGAIN Multiple keys", "CLUSTERDOWN The cluster is down", "MOVED 1 h:1x", "MOVED 1 h:12345678",
        "MOVED 0000001 h:1",
    };
    chat_redirect_t  r;
    char             big[400];

    (void) state;
    assert_int_equal(chat_cluster_parse_redirect("MOVED 3999 127.0.0.1:6381", 25, &r), 0);
    assert_int_equal(r.kind, CHAT_REDIRECT_MOVED);
    assert_int_equal(r.slot, 3999);
    assert_string_equal(r.host, "127.0.0.1");
    assert_int_equal(r.port, 6381);
    assert_int_equal(chat_cluster_parse_redirect("ASK 16383 redis-3.example:7000", 30, &r), 0);
    assert_int_equal(r.kind, CHAT_REDIRECT_ASK);
    assert_int_equal(r.slot, 16383);
    assert_string_equal(r.host, "redis-3.example");
    assert_int_equal(r.port, 7000);
    assert_int_equal(chat_cluster_parse_redirect("MOVED 0 :6381", 13, &r), 0);
    assert_string_equal(r.host, "");
    assert_int_equal(r.slot, 0);
    assert_int_equal(chat_cluster_parse_redirect("MOVED 7 ::1:6390", 16, &r), 0);
    assert_string_equal(r.host, "::1");
    assert_int_equal(r.port, 6390);
    /* the length is what counts: the same error followed by junk past len */
    assert_int_equal(chat_cluster_parse_redirect("MOVED 3 h:12zz", 12, &r), 0);
    assert_int_equal(r.port, 12);

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r.kind = CHAT_REDIRECT_MOVED;
        if (chat_cluster_parse_redirect(bad[i], strlen(bad[i]), &r) == 0) {
            fail_msg("accepted \"%s\"", bad[i]);
        }
        assert_int_equal(r.kind, CHAT_REDIRECT_NONE);
    }
    /* a host longer than the struct holds */
    memcpy(big, "MOVED 1 ", 8);
    memset(big + 8, 'h', 300);
    memcpy(big + 308, ":1", 3);
    assert_int_equal(chat_cluster_parse_redirect(big, strlen(big), &r), -1);
}

/* a reply as hiredis builds it from the bytes the server sends */
static redisReply *
resp(const char *bytes)
{
    redisReader  *rd = redisReaderCreate();
    void         *reply = NULL;

    assert_non_null(rd);
    assert_int_equal(redisReaderFeed(rd, bytes, strlen(bytes)), REDIS_OK);
    assert_int_equal(redisReaderGetReply(rd, &reply), REDIS_OK);
    assert_non_null(reply);
    redisReaderFree(rd);
    return reply;
}

/* three masters (one with two ranges), each entry with a replica and the
 * node id, as redis 7 sends CLUSTER SLOTS */
static const char *three =
    "*4\r\n"
    "*4\r\n:0\r\n:5460\r\n"
      "*3\r\n$9\r\n127.0.0.1\r\n:18500\r\n$4\r\nid-a\r\n"
      "*3\r\n$9\r\n127.0.0.1\r\n:18503\r\n$4\r\nid-d\r\n"
    "*4\r\n:5461\r\n:10922\r\n"
      "*3\r\n$9\r\n127.0.0.1\r\n:18501\r\n$4\r\nid-b\r\n"
      "*3\r\n$9\r\n127.0.0.1\r\n:18504\r\n$4\r\nid-e\r\n"
    "*3\r\n:10923\r\n:16000\r\n"
      "*2\r\n$9\r\n127.0.0.1\r\n:18502\r\n"
    "*3\r\n:16001\r\n:16383\r\n"
      "*4\r\n$0\r\n\r\n:18502\r\n$4\r\nid-c\r\n*0\r\n";

static void
test_map_from_slots(void **state)
{
    static chat_cluster_map_t  m;
    redisReply                *r;
    int                        c;

    (void) state;
    chat_cluster_map_init(&m);
    assert_int_equal(chat_cluster_map_covered(&m), 0);
    assert_int_equal(chat_cluster_map_node(&m, 0), -1);

    r = resp(three);
    assert_int_equal(chat_cluster_map_from_slots(&m, r), 0);
    freeReplyObject(r);
    /* 127.0.0.1:18502 and ":18502" (empty host: the asked node's) differ */
    assert_int_equal(m.nnodes, 4);
    assert_int_equal(chat_cluster_map_covered(&m), CHAT_CLUSTER_SLOTS);
    assert_int_equal(chat_cluster_map_node(&m, 0), chat_cluster_map_find(&m, "127.0.0.1", 18500));
    assert_int_equal(chat_cluster_map_node(&m, 5460), chat_cluster_map_find(&m, "127.0.0.1", 18500));
    assert_int_equal(chat_cluster_map_node(&m, 5461), chat_cluster_map_find(&m, "127.0.0.1", 18501));
    c = chat_cluster_map_find(&m, "127.0.0.1", 18502);
    assert_true(c >= 0);
    assert_int_equal(chat_cluster_map_node(&m, 16000), c);
    assert_int_equal(chat_cluster_map_node(&m, 16001), chat_cluster_map_find(&m, "", 18502));
    assert_int_equal(chat_cluster_map_find(&m, "127.0.0.1", 18503), -1);   /* replicas are not nodes */
    assert_int_equal(chat_cluster_map_node(&m, 16384), -1);

    /* a MOVED to a known node, then to a new one */
    assert_int_equal(chat_cluster_map_move(&m, 100, "127.0.0.1", 18501), chat_cluster_map_find(&m, "127.0.0.1", 18501));
    assert_int_equal(chat_cluster_map_node(&m, 100), chat_cluster_map_find(&m, "127.0.0.1", 18501));
    assert_int_equal(chat_cluster_map_node(&m, 99), chat_cluster_map_find(&m, "127.0.0.1", 18500));
    c = chat_cluster_map_move(&m, 101, "10.0.0.9", 7000);
    assert_int_equal(c, 4);
    assert_int_equal(m.nnodes, 5);
    assert_string_equal(m.node[c].host, "10.0.0.9");
    assert_int_equal(chat_cluster_map_move(&m, 16384, "10.0.0.9", 7000), -1);
    assert_int_equal(chat_cluster_map_move(&m, 1, "10.0.0.9", 0), -1);

    /* a partial map: the uncovered slots have no node */
    r = resp("*1\r\n*3\r\n:10\r\n:19\r\n*2\r\n$1\r\nh\r\n:1\r\n");
    assert_int_equal(chat_cluster_map_from_slots(&m, r), 0);
    freeReplyObject(r);
    assert_int_equal(m.nnodes, 1);
    assert_int_equal(chat_cluster_map_covered(&m), 10);
    assert_int_equal(chat_cluster_map_node(&m, 9), -1);
    assert_int_equal(chat_cluster_map_node(&m, 10), 0);
    assert_int_equal(chat_cluster_map_node(&m, 20), -1);

    /* an empty reply (a cluster with no slots assigned yet) */
    r = resp("*0\r\n");
    assert_int_equal(chat_cluster_map_from_slots(&m, r), 0);
    freeReplyObject(r);
    assert_int_equal(chat_cluster_map_covered(&m), 0);
}

static void
test_map_malformed(void **state)
{
    static const char *bad[] = {
        "+OK\r\n",
        "-ERR This instance has cluster support disabled\r\n",
        "*1\r\n:1\r\n",
        "*1\r\n*2\r\n:0\r\n:1\r\n",                                   /* no master */
        "*1\r\n*3\r\n:5\r\n:4\r\n*2\r\n$1\r\nh\r\n:1\r\n",              /* start > end */
        "*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n",          /* past the last slot */
        "*1\r\n*3\r\n:-1\r\n:3\r\n*2\r\n$1\r\nh\r\n:1\r\n",
        "*1\r\n*3\r\n$1\r\n0\r\n:3\r\n*2\r\n$1\r\nh\r\n:1\r\n",         /* string slot */
        "*1\r\n*3\r\n:0\r\n:3\r\n*2\r\n$1\r\nh\r\n:0\r\n",              /* port 0 */
        "*1\r\n*3\r\n:0\r\n:3\r\n*2\r\n$1\r\nh\r\n$4\r\n6379\r\n",      /* string port */
        "*1\r\n*3\r\n:0\r\n:3\r\n*1\r\n$1\r\nh\r\n",                    /* no port */
        "*1\r\n*3\r\n:0\r\n:3\r\n:7\r\n",                               /* master not an array */
        "*1\r\n*3\r\n:0\r\n:3\r\n*2\r\n:1\r\n:1\r\n",                   /* integer host */
        "*1\r\n*3\r\n:0\r\n:3\r\n*2\r\n$3\r\nh\0h\r\n:1\r\n",           /* NUL in host */
    };
    static chat_cluster_map_t  m, before;
    redisReply                *r;
    char                       buf[65536];
    size_t                     n;

    (void) state;
    chat_cluster_map_init(&m);
    r = resp(three);
    assert_int_equal(chat_cluster_map_from_slots(&m, r), 0);
    freeReplyObject(r);
    memcpy(&before, &m, sizeof(m));

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        redisReader  *rd = redisReaderCreate();
        void         *reply = NULL;
        size_t        blen = strlen(bad[i]);

        if (i == sizeof(bad) / sizeof(bad[0]) - 1) {
            blen = 33;   /* the literal holds a NUL: its length by hand */
        }
        assert_int_equal(redisReaderFeed(rd, bad[i], blen), REDIS_OK);
        assert_int_equal(redisReaderGetReply(rd, &reply), REDIS_OK);
        assert_non_null(reply);
        if (chat_cluster_map_from_slots(&m, reply) == 0) {
            fail_msg("accepted bad reply %zu", i);
        }
        assert_memory_equal(&m, &before, sizeof(m));
        freeReplyObject(reply);
        redisReaderFree(rd);
    }
    assert_int_equal(chat_cluster_map_from_slots(&m, NULL), -1);

    /* 65 distinct masters: more than the table holds */
    n = (size_t) snprintf(buf, sizeof(buf), "*%d\r\n", CHAT_CLUSTER_MAX_NODES + 1);
    for (int i = 0; i <= CHAT_CLUSTER_MAX_NODES; i++) {
        n += (size_t) snprintf(buf + n, sizeof(buf) - n, "*3\r\n:%d\r\n:%d\r\n*2\r\n$1\r\nh\r\n:%d\r\n", i, i, 1000 + i);
    }
    r = resp(buf);
    assert_int_equal(chat_cluster_map_from_slots(&m, r), -1);
    freeReplyObject(r);
    assert_memory_equal(&m, &before, sizeof(m));
    /* 64 is fine (positive control of the limit) */
    n = (size_t) snprintf(buf, sizeof(buf), "*%d\r\n", CHAT_CLUSTER_MAX_NODES);
    for (int i = 0; i < CHAT_CLUSTER_MAX_NODES; i++) {
        n += (size_t) snprintf(buf + n, sizeof(buf) - n, "*3\r\n:%d\r\n:%d\r\n*2\r\n$1\r\nh\r\n:%d\r\n", i, i, 1000 + i);
    }
    r = resp(buf);
    assert_int_equal(chat_cluster_map_from_slots(&m, r), 0);
    freeReplyObject(r);
    assert_int_equal(m.nnodes, CHAT_CLUSTER_MAX_NODES);
    assert_int_equal(chat_cluster_map_node(&m, 63), 63);
    assert_int_equal(chat_cluster_map_move(&m, 0, "new", 1), -1);   /* full */
    assert_int_equal(chat_cluster_map_move(&m, 0, "h", 1063), 63);   /* known: fine */
}

static int
cmd_slot(int argc, const char **argv)
{
    char  *cmd;
    int    n, slot;

    n = redisFormatCommandArgv(&cmd, argc, argv, NULL);
    assert_true(n > 0);
    slot = chat_cluster_command_slot(cmd, (size_t) n);
    /* cut inside the header or the name: never well-formed (the
     * arguments after the key are not looked at) */
    assert_int_equal(chat_cluster_command_slot(cmd, 5), -2);
    redisFreeCommand(cmd);
    return slot;
}

static void
test_command_slot(void **state)
{
    unsigned  alice = chat_cluster_slot("u:alice", 7), s3 = chat_cluster_slot("s3", 2);
    char     *cmd;
    int       n;

    (void) state;
    assert_int_equal(cmd_slot(3, (const char *[]) { "HGET", "chat:{u:alice}:set", "x" }), alice);
    assert_int_equal(cmd_slot(2, (const char *[]) { "hgetall", "chat:{u:alice}:set" }), alice);
    assert_int_equal(cmd_slot(5, (const char *[]) { "EVALSHA", "abc", "2", "chat:{s3}:in", "chat:{s3}:seq" }), s3);
    assert_int_equal(cmd_slot(4, (const char *[]) { "evalsha", "abc", "0", "x" }), -1);
    assert_int_equal(cmd_slot(3, (const char *[]) { "EVAL", "return 1", "0" }), -1);
    assert_int_equal(cmd_slot(3, (const char *[]) { "EVALSHA", "abc", "1" }), -2);   /* KEYS missing */
    assert_int_equal(cmd_slot(4, (const char *[]) { "EVALSHA", "abc", "x", "k" }), -2);
    assert_int_equal(cmd_slot(3, (const char *[]) { "PUBLISH", "chat:w:all", "p" }), -1);
    assert_int_equal(cmd_slot(3, (const char *[]) { "SPUBLISH", "chat:w:all", "p" }),
                     chat_cluster_slot("chat:w:all", 10));
    assert_int_equal(cmd_slot(2, (const char *[]) { "CLUSTER", "SLOTS" }), -1);
    assert_int_equal(cmd_slot(1, (const char *[]) { "PING" }), -1);
    assert_int_equal(cmd_slot(1, (const char *[]) { "ASKING" }), -1);
    assert_int_equal(cmd_slot(7, (const char *[]) { "XREADGROUP", "GROUP", "g", "c", "STREAMS", "chat:{s3}:in", ">" }), s3);
    assert_int_equal(cmd_slot(9, (const char *[]) { "XREADGROUP", "GROUP", "g", "c", "COUNT", "10", "STREAMS",
                                                    "chat:{s3}:in", ">" }), s3);
    assert_int_equal(cmd_slot(4, (const char *[]) { "XREAD", "STREAMS", "chat:{s3}:in", "0" }), s3);
    assert_int_equal(cmd_slot(4, (const char *[]) { "XREAD", "COUNT", "1", "0" }), -2);
    /* the format path of ngx_chat_redis_command */
    n = redisFormatCommand(&cmd, "SET %b %b NX GET EX %d", "chat:{u:alice}:cid:1", (size_t) 20, "v", (size_t) 1, 60);
    assert_true(n > 0);
    assert_int_equal(chat_cluster_command_slot(cmd, (size_t) n), alice);
    redisFreeCommand(cmd);
    assert_int_equal(chat_cluster_command_slot("*1\r\n$4\r\nPING\r\n", 14), -1);
    assert_int_equal(chat_cluster_command_slot("PING\r\n", 6), -2);
    assert_int_equal(chat_cluster_command_slot("*0\r\n", 4), -2);
    assert_int_equal(chat_cluster_command_slot("*2\r\n$4\r\nPING\r\n", 14), -2);
    assert_int_equal(chat_cluster_command_slot("*1\r\n$9\r\nPING\r\n", 14), -2);
    assert_int_equal(chat_cluster_command_slot(NULL, 0), -2);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_vectors),
        cmocka_unit_test(test_hash_tags),
        cmocka_unit_test(test_redirect),
        cmocka_unit_test(test_map_from_slots),
        cmocka_unit_test(test_map_malformed),
        cmocka_unit_test(test_command_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
