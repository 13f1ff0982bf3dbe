/*
 * chat_cluster: the Redis Cluster pieces the module and the workers share,
 * so both route a command to the same master: the key -> slot function of
 * the cluster spec (CRC16-XMODEM mod 16384 with the {hash tag} rule), the
 * parser of MOVED/ASK redirections, and a slot map built from a
 * CLUSTER SLOTS reply and patched by MOVED. Pure code: no I/O, no
 * allocation (the map is one fixed-size struct the caller owns).
 */
#ifndef CHAT_CLUSTER_H
#define CHAT_CLUSTER_H

#include <stddef.h>
#include <stdint.h>
#include <hiredis/hiredis.h>

#define CHAT_CLUSTER_SLOTS      16384
#define CHAT_CLUSTER_MAX_NODES  64
#define CHAT_CLUSTER_NO_NODE    0xffff

/* CRC16-XMODEM of the hash tag (the bytes between the first '{' and the
 * first '}' after it, when not empty) or of the whole key, mod 16384 */
unsigned chat_cluster_slot(const char *key, size_t len);

/* the CRC16 itself (XMODEM: poly 0x1021, init 0), exposed for the tests */
uint16_t chat_crc16(const char *p, size_t len);

typedef enum {
    CHAT_REDIRECT_NONE = 0,
    CHAT_REDIRECT_MOVED,
    CHAT_REDIRECT_ASK
} chat_redirect_kind_t;

typedef struct {
    chat_redirect_kind_t  kind;
    unsigned              slot;
    char                  host[256];   /* "" when the error said ":port" */
    int                   port;
} chat_redirect_t;

/*
 * "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381" -> 0 and *out
 * filled; "MOVED 3999 :6381" gives host "" (the sender's own host, which
 * the caller knows). An IPv6 host is everything before the last ':'.
 * Anything else -> -1 and out->kind = CHAT_REDIRECT_NONE.
 */
int chat_cluster_parse_redirect(const char *err, size_t len, chat_redirect_t *out);

typedef struct {
    char  host[256];
    int   port;
} chat_cluster_node_t;

typedef struct {
    uint16_t             slot_node[CHAT_CLUSTER_SLOTS]; /* index into node[] or CHAT_CLUSTER_NO_NODE */
    unsigned             nnodes;
    chat_cluster_node_t  node[CHAT_CLUSTER_MAX_NODES];  /* masters only */
} chat_cluster_map_t;

/* every slot unassigned, no node */
void chat_cluster_map_init(chat_cluster_map_t *m);

/*
 * Builds the map from a CLUSTER SLOTS reply (array of [start, end,
 * [master-host, master-port, ...], replicas...]): 0 ok; -1 when the reply
 * is malformed or names more than CHAT_CLUSTER_MAX_NODES masters (the map
 * is then untouched). An empty host in the reply (a node that does not
 * know its own address) is kept as "": the caller substitutes the host
 * of the node it asked.
 */
int chat_cluster_map_from_slots(chat_cluster_map_t *m, const redisReply *r);

/* node index owning slot, or -1 when the slot is unassigned / out of range */
int chat_cluster_map_node(const chat_cluster_map_t *m, unsigned slot);

/* index of the node host:port, or -1 */
int chat_cluster_map_find(const chat_cluster_map_t *m, const char *host, int port);

/* index of host:port, added when new; -1 when the table is full */
int chat_cluster_map_add(chat_cluster_map_t *m, const char *host, int port);

/* applies a MOVED: slot now belongs to host:port (added when new);
 * the node's index, or -1 (slot out of range, table full, bad host) */
int chat_cluster_map_move(chat_cluster_map_t *m, unsigned slot, const char *host, int port);

/*
 * The slot a formatted command (RESP array of bulk strings, as hiredis'
 * redisFormatCommand / redisFormatCommandArgv build it) must go to: that
 * of its first key. EVAL/EVALSHA(_RO)/FCALL(_RO): the first of their KEYS
 * (none when numkeys is 0); XREAD/XREADGROUP: the first stream after
 * STREAMS; commands without a key (PUBLISH, PING, INFO, CLUSTER, SCRIPT,
 * AUTH, SELECT, ASKING, READONLY, WAIT): none; every other command: its
 * first argument. Returns the slot, -1 for "any node", -2 when the bytes
 * are not a well-formed command.
 */
int chat_cluster_command_slot(const char *cmd, size_t len);

/* number of slots with an owner (16384 when the cluster covers all) */
unsigned chat_cluster_map_covered(const chat_cluster_map_t *m);

#endif
