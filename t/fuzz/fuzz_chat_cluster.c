/*
 * libFuzzer target for chat_cluster.
 *
 * Input layout:  byte 0  low bit: 0 = the bytes are a redirect error,
 *                        1 = the bytes are RESP (a CLUSTER SLOTS reply)
 *                rest    the error text / the server's bytes
 *
 * Redirect: a parse that succeeds must give a slot < 16384, a port in
 * 1..65535, a NUL-terminated host that was in the input, and the kind the
 * prefix says; a failing one must leave kind NONE. The slot function runs
 * on the same bytes (range check).
 * Slots reply: the bytes go through hiredis' redisReader as they would
 * from a socket; each complete reply goes to chat_cluster_map_from_slots.
 * On success every slot's owner is a valid node index or none; on failure
 * the map is byte-for-byte what it was. Aborts when an invariant fails.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat_cluster.h"

#define CHECK(c)  do { if (!(c)) abort(); } while (0)

static chat_cluster_map_t  map, saved;

static void
fuzz_redirect(const char *p, size_t n)
{
    chat_redirect_t  r;
    char            *copy;

    /* an exact-size heap copy: ASan sees any read past n */
    copy = malloc(n ? n : 1);
    CHECK(copy != NULL);
    memcpy(copy, p, n);
    r.kind = CHAT_REDIRECT_MOVED;
    if (chat_cluster_parse_redirect(copy, n, &r) == 0) {
        size_t  hl = strlen(r.host);

        CHECK(r.kind == (copy[0] == 'M' ? CHAT_REDIRECT_MOVED : CHAT_REDIRECT_ASK));
        CHECK(r.slot < CHAT_CLUSTER_SLOTS);
        CHECK(r.port >= 1 && r.port <= 65535);
        CHECK(hl < sizeof(r.host) && hl < n);
        CHECK(hl == 0 || memmem(copy, n, r.host, hl) != NULL);
        /* applying it to a map puts the slot on that node */
        chat_cluster_map_init(&map);
        if (r.host[0] != '\0') {
            int  idx = chat_cluster_map_move(&map, r.slot, r.host, r.port);

            CHECK(idx == 0 && chat_cluster_map_node(&map, r.slot) == 0);
            CHECK(chat_cluster_map_find(&map, r.host, r.port) == 0);
            CHECK(chat_cluster_map_covered(&map) == 1);
        }
    } else {
        CHECK(r.kind == CHAT_REDIRECT_NONE);
    }
    CHECK(chat_cluster_slot(copy, n) < CHAT_CLUSTER_SLOTS);
    {
        int  cs = chat_cluster_command_slot(copy, n);

        CHECK(cs >= -2 && cs < CHAT_CLUSTER_SLOTS);
    }
    free(copy);
}

/* hiredis 0.14's reader allocates an array's element table as soon as it
 * reads the header, with no limit of its own: a "*99999999999" would be an
 * out-of-memory of the fuzzer, not of chat_cluster. The server is trusted
 * for that in production; here headers above 100000 elements are skipped. */
static int
huge_array(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '*') {
            unsigned long  v = 0;

            for (size_t j = i + 1; j < n && p[j] >= '0' && p[j] <= '9'; j++) {
                v = v * 10 + (unsigned long) (p[j] - '0');
                if (v > 100000) {
                    return 1;
                }
            }
        }
    }
    return 0;
}

static void
fuzz_slots(const char *p, size_t n)
{
    redisReader  *rd;
    void         *reply;

    if (huge_array(p, n)) {
        return;
    }
    rd = redisReaderCreate();
    CHECK(rd != NULL);
    if (redisReaderFeed(rd, p, n) != REDIS_OK) {
        redisReaderFree(rd);
        return;
    }
    for (int i = 0; i < 8; i++) {
        reply = NULL;
        if (redisReaderGetReply(rd, &reply) != REDIS_OK || reply == NULL) {
            break;
        }
        memcpy(&saved, &map, sizeof(map));
        if (chat_cluster_map_from_slots(&map, reply) == 0) {
            CHECK(map.nnodes <= CHAT_CLUSTER_MAX_NODES);
            for (unsigned s = 0; s < CHAT_CLUSTER_SLOTS; s++) {
                int  idx = chat_cluster_map_node(&map, s);

                CHECK(idx == -1 || (unsigned) idx < map.nnodes);
                CHECK(idx >= 0 || map.slot_node[s] == CHAT_CLUSTER_NO_NODE);
            }
            for (unsigned k = 0; k < map.nnodes; k++) {
                CHECK(strlen(map.node[k].host) < sizeof(map.node[k].host));
                CHECK(map.node[k].port >= 1 && map.node[k].port <= 65535);
                CHECK(chat_cluster_map_find(&map, map.node[k].host, map.node[k].port) == (int) k);
            }
        } else {
            CHECK(memcmp(&saved, &map, sizeof(map)) == 0);
        }
        freeReplyObject(reply);
    }
    redisReaderFree(rd);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int  init;

    if (!init) {
        chat_cluster_map_init(&map);
        init = 1;
    }
    if (size < 1) {
        return 0;
    }
    if (data[0] & 1) {
        fuzz_slots((const char *) data + 1, size - 1);
    } else {
        fuzz_redirect((const char *) data + 1, size - 1);
    }
    return 0;
}
