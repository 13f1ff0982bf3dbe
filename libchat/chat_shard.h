/*
 * chat_shard: the shard of a conversation (docs/PIPELINE.md, "Shards"):
 * crc32(conv) mod shards, with the IEEE CRC-32 (zlib's, nginx's
 * ngx_crc32_long). One definition for the module, the workers and the
 * tests; golden vectors in t/vectors/shards.txt (cmocka and pytest).
 */
#ifndef CHAT_SHARD_H
#define CHAT_SHARD_H

#include <stddef.h>
#include <stdint.h>

uint32_t chat_crc32(const void *p, size_t n);
unsigned chat_shard(const char *conv, size_t len, unsigned shards);

#endif
