/*
 * ngx-chat load generator: shared helpers (time, random numbers, base64,
 * WebSocket accept key, HS256 JWT, latency histograms, a small JSON scanner,
 * nginx worker memory).  See bench/loadgen.c for the program itself.
 */
#ifndef LG_H
#define LG_H

#include <stddef.h>
#include <stdint.h>

/* ---- time and random numbers ------------------------------------------- */

uint64_t lg_now_ns(void);                 /* CLOCK_MONOTONIC, machine-wide */
void     lg_srand(uint64_t seed);
uint64_t lg_rand(void);                   /* xorshift64*, not for secrets */
double   lg_rand01(void);                 /* [0, 1) */

/* ---- encodings ---------------------------------------------------------- */

/* base64 of n bytes into out (NUL-terminated); url=1: base64url without
 * padding.  Returns the length written. */
size_t lg_base64(const uint8_t *in, size_t n, char *out, int url);

/* out = base64(SHA1(key "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")), 28 chars
 * and a NUL. */
void lg_ws_accept(const char *key, size_t keylen, char out[29]);

/* HS256 JWT {"sub":sub,"exp":exp[,"dev":dev]} into out.  Returns the length
 * or -1 when cap is too small. */
int lg_jwt_hs256(const char *secret, const char *sub, const char *dev,
                 long long exp, char *out, size_t cap);

uint64_t lg_hash64(const char *s, size_t n);  /* FNV-1a, never 0 */

/* ---- latency histogram ----------------------------------------------------
 * Log-linear buckets over nanoseconds: exact below 128 ns, then 64 linear
 * sub-buckets per power of two (about 1.6 % resolution) up to 2^48 ns. */
#define LG_HIST_N (128 + 41 * 64)

struct lg_hist {
    uint64_t count;
    uint64_t min, max;             /* ns; min is UINT64_MAX when empty */
    double   sum;                  /* ns */
    uint64_t b[LG_HIST_N];
};

void     lg_hist_init(struct lg_hist *h);
void     lg_hist_add(struct lg_hist *h, uint64_t ns);
void     lg_hist_merge(struct lg_hist *dst, const struct lg_hist *src);
uint64_t lg_hist_pct(const struct lg_hist *h, double pct); /* ns, 0..100 */
uint64_t lg_hist_bucket_hi(int i);                         /* ns */

/* ---- JSON scanning -------------------------------------------------------
 * Enough to read server frames: find a top-level member of an object and
 * walk arrays.  Strings are returned raw (escapes not decoded). */
struct lg_jv {
    char        t;      /* 's' string, 'n' number, 'o' object, 'a' array,
                           'b' true/false, 'z' null */
    const char *p;      /* string: between the quotes; others: the text */
    size_t      n;
};

/* Member `key` of the object at s[0..n).  0 found, -1 not found/invalid. */
int lg_json_get(const char *s, size_t n, const char *key, struct lg_jv *v);
/* Iterate the array a: *pos starts at 0; returns 1 with the element, 0 at
 * the end, -1 on malformed input. */
int lg_json_next(const struct lg_jv *a, size_t *pos, struct lg_jv *elem);
long long lg_jv_int(const struct lg_jv *v, long long dflt);
int lg_jv_eq(const struct lg_jv *v, const char *s);  /* string equals */

/* ---- server memory (nginx workers) -------------------------------------------------
 * Worker processes are the children of the master whose pid is in pidfile
 * (only those whose command line starts with "nginx: worker").  Sums of
 * VmRSS (/proc/pid/status) and Pss, Private_Clean+Private_Dirty
 * (/proc/pid/smaps_rollup), in kB.  When the process has no such children
 * (a server that is one process, e.g. Centrifugo) it is measured itself. */
struct lg_mem {
    int      nproc;
    long     master;
    uint64_t rss_kb, pss_kb, priv_kb;
};
int lg_mem_read(const char *pidfile, struct lg_mem *m);

/* ---- Redis cost ------------------------------------------------------------
 * A snapshot of INFO cpu (used_cpu_sys + used_cpu_user, every thread of the
 * server) and INFO commandstats (calls and usec per command).  Redis 7
 * counts a redis.call() inside a script under the called command's name,
 * and the EVALSHA itself once more (its usec include the inner calls). */
#define LG_REDIS_MAX 400
#define LG_REDIS_TOP 16
struct lg_redis_cmd { char name[48]; uint64_t calls, usec; };
struct lg_redis {
    int    ok, n;
    double cpu_us;
    double child_us;               /* used_cpu_*_children: AOF rewrites (forks reaped so far) */
    uint64_t forks;                /* total_forks (INFO stats) */
    uint64_t aof_bytes;            /* aof_current_size (INFO persistence): what is written per message */
    struct lg_redis_cmd c[LG_REDIS_MAX];
};
struct lg_redis_cost {
    int      ok, n;
    double   cpu_us;
    double   child_us;             /* of the forked children (AOF rewrites) reaped in the window */
    uint64_t forks;
    int64_t  aof_bytes;            /* AOF growth; a rewrite in the window (forks) makes it meaningless */
    uint64_t calls;                /* every command run, inner ones included */
    uint64_t scripts, script_usec; /* EVAL, EVALSHA, FCALL (and _ro) */
    struct lg_redis_cmd top[LG_REDIS_TOP];
};
int  lg_redis_snap(const char *host, int port, struct lg_redis *r);
/* MONITOR for secs seconds (it slows Redis while on): commands from
 * clients (scripts among them) and redis.calls made inside scripts
 * (MONITOR shows their client as "lua"), which INFO cannot tell apart. */
struct lg_redis_mon { int ok; double secs; uint64_t client, client_scripts, lua; };
int  lg_redis_monitor(const char *host, int port, double secs, struct lg_redis_mon *m);
void lg_redis_diff(const struct lg_redis *before, const struct lg_redis *after,
                   struct lg_redis_cost *d);

#endif
