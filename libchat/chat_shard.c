/* chat_shard: see chat_shard.h. Bitwise CRC-32: conversations are short
 * (at most 133 bytes), a table buys nothing measurable here. */
#include "chat_shard.h"

uint32_t
chat_crc32(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint32_t             c = 0xffffffffu;

    for (size_t i = 0; i < n; i++) {
        c ^= b[i];
        for (int k = 0; k < 8; k++) {
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
        }
    }

    return c ^ 0xffffffffu;
}

unsigned
chat_shard(const char *conv, size_t len, unsigned shards)
{
    return (unsigned) (chat_crc32(conv, len) % (shards ? shards : 1));
}
