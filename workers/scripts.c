/*
 * The Redis scripts of every role: lua/<name>.lua, compiled into the
 * table chat_lua[] (lua/gen.sh), the same table the module loads. Their
 * SHA1s are computed here, so EVALSHA needs no SCRIPT LOAD round trip;
 * when Redis answers NOSCRIPT (restarted, flushed) the caller loads them
 * all again with cw_lua_load() (on a cluster: on every master; a node the
 * client connects to later gets them when it connects).
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <string.h>

static char lua_sha[CHAT_LUA_N][SHA_DIGEST_LENGTH * 2 + 1];

const char *
cw_lua_sha(int id)
{
    if (lua_sha[id][0] == '\0') {
        unsigned char md[SHA_DIGEST_LENGTH];
        SHA1((const unsigned char *) chat_lua[id].src, strlen(chat_lua[id].src), md);
        for (int i = 0; i < SHA_DIGEST_LENGTH; i++) snprintf(lua_sha[id] + 2 * i, 3, "%02x", md[i]);
    }
    return lua_sha[id];
}

/* SCRIPT LOAD of every script on one connection: 0, or -1 (the reason
 * logged). cw_lua_load (redis.c) does it on every node of a client. */
int
cw_lua_load_ctx(redisContext *c)
{
    for (int i = 0; i < CHAT_LUA_N; i++) {
        redisReply *r = redisCommand(c, "SCRIPT LOAD %s", chat_lua[i].src);
        int ok = r && r->type == REDIS_REPLY_STRING && strcmp(r->str, cw_lua_sha(i)) == 0;
        if (!ok) {
            cw_error("SCRIPT LOAD %s: %s", chat_lua[i].name,
                     r == NULL ? (c->errstr[0] ? c->errstr : "no reply")
                     : r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        }
        if (r) freeReplyObject(r);
        if (!ok) return -1;
    }
    return 0;
}
