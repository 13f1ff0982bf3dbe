/* Helpers of the load generator; see lg.h. */
#define _GNU_SOURCE
#include "lg.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

/* ---- time and random numbers ------------------------------------------- */

uint64_t lg_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

void lg_srand(uint64_t seed)
{
    rng_state = seed ? seed : 0x9E3779B97F4A7C15ull;
}

uint64_t lg_rand(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

double lg_rand01(void)
{
    return (double)(lg_rand() >> 11) / 9007199254740992.0;
}

/* ---- encodings ---------------------------------------------------------- */

size_t lg_base64(const uint8_t *in, size_t n, char *out, int url)
{
    static const char std[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    static const char web[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const char *al = url ? web : std;
    size_t o = 0, i = 0;

    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = al[v >> 18];
        out[o++] = al[(v >> 12) & 63];
        out[o++] = al[(v >> 6) & 63];
        out[o++] = al[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = al[v >> 18];
        out[o++] = al[(v >> 12) & 63];
        if (!url) { out[o++] = '='; out[o++] = '='; }
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = al[v >> 18];
        out[o++] = al[(v >> 12) & 63];
        out[o++] = al[(v >> 6) & 63];
        if (!url) out[o++] = '=';
    }
    out[o] = '\0';
    return o;
}

void lg_ws_accept(const char *key, size_t keylen, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    char buf[128];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    if (keylen > sizeof(buf) - sizeof(guid)) keylen = sizeof(buf) - sizeof(guid);
    memcpy(buf, key, keylen);
    memcpy(buf + keylen, guid, sizeof(guid) - 1);
    EVP_Digest(buf, keylen + sizeof(guid) - 1, md, &mdlen, EVP_sha1(), NULL);
    lg_base64(md, 20, out, 0);
}

int lg_jwt_hs256(const char *secret, const char *sub, const char *dev,
                 long long exp, char *out, size_t cap)
{
    static const char hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    char claims[256];
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    int cl;
    size_t o;

    if (dev && *dev)
        cl = snprintf(claims, sizeof(claims), "{\"sub\":\"%s\",\"exp\":%lld,\"dev\":\"%s\"}",
                      sub, exp, dev);
    else
        cl = snprintf(claims, sizeof(claims), "{\"sub\":\"%s\",\"exp\":%lld}", sub, exp);
    if (cl < 0 || (size_t)cl >= sizeof(claims)) return -1;
    /* header.payload.signature: 4/3 growth of each part, plus dots */
    if (cap < (sizeof(hdr) + (size_t)cl + 32) * 4 / 3 + 16) return -1;

    o = lg_base64((const uint8_t *)hdr, sizeof(hdr) - 1, out, 1);
    out[o++] = '.';
    o += lg_base64((const uint8_t *)claims, (size_t)cl, out + o, 1);
    if (!HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)out, o,
              mac, &maclen))
        return -1;
    out[o++] = '.';
    o += lg_base64(mac, maclen, out + o, 1);
    return (int)o;
}

uint64_t lg_hash64(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return h ? h : 1;
}

/* ---- histogram ---------------------------------------------------------- */

void lg_hist_init(struct lg_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->min = UINT64_MAX;
}

static int hist_index(uint64_t v)
{
    int m, sub, i;

    if (v < 128) return (int)v;
    m = 63 - __builtin_clzll(v);
    sub = (int)((v >> (m - 6)) & 63);
    i = 128 + (m - 7) * 64 + sub;
    return i < LG_HIST_N ? i : LG_HIST_N - 1;
}

uint64_t lg_hist_bucket_hi(int i)
{
    int m, sub;

    if (i < 128) return (uint64_t)i;
    m = 7 + (i - 128) / 64;
    sub = (i - 128) % 64;
    return ((uint64_t)(64 + sub) << (m - 6)) + ((uint64_t)1 << (m - 6)) - 1;
}

void lg_hist_add(struct lg_hist *h, uint64_t ns)
{
    h->b[hist_index(ns)]++;
    h->count++;
    h->sum += (double)ns;
    if (ns < h->min) h->min = ns;
    if (ns > h->max) h->max = ns;
}

void lg_hist_merge(struct lg_hist *dst, const struct lg_hist *src)
{
    if (!src->count) return;
    for (int i = 0; i < LG_HIST_N; i++) dst->b[i] += src->b[i];
    dst->count += src->count;
    dst->sum += src->sum;
    if (src->min < dst->min) dst->min = src->min;
    if (src->max > dst->max) dst->max = src->max;
}

uint64_t lg_hist_pct(const struct lg_hist *h, double pct)
{
    uint64_t rank, acc = 0;

    if (!h->count) return 0;
    if (pct >= 100.0) return h->max;
    rank = (uint64_t)(pct / 100.0 * (double)h->count + 0.999999);
    if (rank < 1) rank = 1;
    for (int i = 0; i < LG_HIST_N; i++) {
        acc += h->b[i];
        if (acc >= rank) {
            uint64_t hi = lg_hist_bucket_hi(i);
            if (hi > h->max) hi = h->max;
            if (hi < h->min) hi = h->min;
            return hi;
        }
    }
    return h->max;
}

/* ---- JSON scanning ------------------------------------------------------ */

static const char *js_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* p at the opening quote; returns the pointer after the closing quote */
static const char *js_str(const char *p, const char *e)
{
    for (p++; p < e; p++) {
        if (*p == '\\') { p++; continue; }
        if (*p == '"') return p + 1;
    }
    return NULL;
}

static const char *js_val(const char *p, const char *e, int depth, struct lg_jv *v)
{
    const char *s;

    p = js_ws(p, e);
    if (p >= e || depth > 64) return NULL;
    s = p;
    switch (*p) {
    case '"':
        if (!(p = js_str(p, e))) return NULL;
        if (v) { v->t = 's'; v->p = s + 1; v->n = (size_t)(p - s - 2); }
        return p;
    case '{':
    case '[': {
        char close = *p == '{' ? '}' : ']';
        int obj = *p == '{';
        p = js_ws(p + 1, e);
        if (p < e && *p == close) p++;
        else for (;;) {
            if (obj) {
                p = js_ws(p, e);
                if (p >= e || *p != '"' || !(p = js_str(p, e))) return NULL;
                p = js_ws(p, e);
                if (p >= e || *p != ':') return NULL;
                p++;
            }
            if (!(p = js_val(p, e, depth + 1, NULL))) return NULL;
            p = js_ws(p, e);
            if (p >= e) return NULL;
            if (*p == ',') { p++; continue; }
            if (*p == close) { p++; break; }
            return NULL;
        }
        if (v) { v->t = obj ? 'o' : 'a'; v->p = s; v->n = (size_t)(p - s); }
        return p;
    }
    default:
        while (p < e && (isalnum((unsigned char)*p) || *p == '-' || *p == '+' || *p == '.'))
            p++;
        if (p == s) return NULL;
        if (v) {
            v->p = s; v->n = (size_t)(p - s);
            v->t = *s == 't' || *s == 'f' ? 'b' : *s == 'n' ? 'z' : 'n';
        }
        return p;
    }
}

int lg_json_get(const char *s, size_t n, const char *key, struct lg_jv *v)
{
    const char *p = s, *e = s + n, *k, *ke;
    size_t kl = strlen(key);

    p = js_ws(p, e);
    if (p >= e || *p != '{') return -1;
    p = js_ws(p + 1, e);
    if (p < e && *p == '}') return -1;
    for (;;) {
        p = js_ws(p, e);
        if (p >= e || *p != '"') return -1;
        k = p + 1;
        if (!(ke = js_str(p, e))) return -1;
        p = js_ws(ke, e);
        if (p >= e || *p != ':') return -1;
        struct lg_jv tmp;
        if (!(p = js_val(p + 1, e, 1, &tmp))) return -1;
        if ((size_t)(ke - 1 - k) == kl && memcmp(k, key, kl) == 0) {
            *v = tmp;
            return 0;
        }
        p = js_ws(p, e);
        if (p >= e) return -1;
        if (*p == ',') { p++; continue; }
        return -1;
    }
}

int lg_json_next(const struct lg_jv *a, size_t *pos, struct lg_jv *elem)
{
    const char *s = a->p, *e = a->p + a->n, *p;

    if (a->t != 'a') return -1;
    p = s + (*pos ? *pos : 1);
    p = js_ws(p, e);
    if (p >= e) return -1;
    if (*p == ']') return 0;
    if (*p == ',') p++;
    if (!(p = js_val(p, e, 1, elem))) return -1;
    *pos = (size_t)(p - s);
    return 1;
}

long long lg_jv_int(const struct lg_jv *v, long long dflt)
{
    char buf[32];

    if ((v->t != 'n' && v->t != 's') || v->n == 0 || v->n >= sizeof(buf)) return dflt;
    memcpy(buf, v->p, v->n);
    buf[v->n] = 0;
    return strtoll(buf, NULL, 10);
}

int lg_jv_eq(const struct lg_jv *v, const char *s)
{
    size_t l = strlen(s);
    return v->t == 's' && v->n == l && memcmp(v->p, s, l) == 0;
}

/* ---- nginx worker memory ------------------------------------------------ */

static long read_ppid(long pid)
{
    char path[64], buf[512], *p;
    FILE *f;
    size_t n;
    long ppid = -1;

    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    if (!(f = fopen(path, "r"))) return -1;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    if (!(p = strrchr(buf, ')'))) return -1;
    if (sscanf(p + 1, " %*c %ld", &ppid) != 1) return -1;
    return ppid;
}

static uint64_t read_kb_field(const char *path, const char *field)
{
    char line[256];
    size_t fl = strlen(field);
    uint64_t sum = 0;
    FILE *f = fopen(path, "r");

    if (!f) return 0;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, field, fl) == 0 && line[fl] == ':')
            sum += strtoull(line + fl + 1, NULL, 10);
    fclose(f);
    return sum;
}

int lg_mem_read(const char *pidfile, struct lg_mem *m)
{
    FILE *f;
    DIR *d;
    struct dirent *de;
    long master = 0;

    memset(m, 0, sizeof(*m));
    if (!(f = fopen(pidfile, "r"))) return -1;
    if (fscanf(f, "%ld", &master) != 1) master = 0;
    fclose(f);
    if (master <= 0) return -1;
    m->master = master;
    if (!(d = opendir("/proc"))) return -1;
    while ((de = readdir(d))) {
        char path[300], cmd[64];
        long pid;
        size_t n;

        if (!isdigit((unsigned char)de->d_name[0])) continue;
        pid = strtol(de->d_name, NULL, 10);
        if (read_ppid(pid) != master) continue;
        snprintf(path, sizeof(path), "/proc/%ld/cmdline", pid);
        if (!(f = fopen(path, "r"))) continue;
        n = fread(cmd, 1, sizeof(cmd) - 1, f);
        fclose(f);
        cmd[n] = 0;
        if (strncmp(cmd, "nginx: worker", 13) != 0) continue;
        m->nproc++;
        snprintf(path, sizeof(path), "/proc/%ld/status", pid);
        m->rss_kb += read_kb_field(path, "VmRSS");
        snprintf(path, sizeof(path), "/proc/%ld/smaps_rollup", pid);
        m->pss_kb += read_kb_field(path, "Pss");
        m->priv_kb += read_kb_field(path, "Private_Clean") + read_kb_field(path, "Private_Dirty");
    }
    closedir(d);
    if (!m->nproc) {
        /* no nginx workers under it: a server that is one process (Centrifugo,
         * a Go program) is measured itself */
        char path[64];
        snprintf(path, sizeof(path), "/proc/%ld/status", master);
        if (access(path, R_OK) != 0) return -1;
        m->nproc = 1;
        m->rss_kb = read_kb_field(path, "VmRSS");
        snprintf(path, sizeof(path), "/proc/%ld/smaps_rollup", master);
        m->pss_kb = read_kb_field(path, "Pss");
        m->priv_kb = read_kb_field(path, "Private_Clean") + read_kb_field(path, "Private_Dirty");
    }
    return m->nproc ? 0 : -1;
}

/* ---- Redis cost: INFO commandstats and INFO cpu ------------------------- */

/* One INFO <section> over a blocking socket: the bulk reply into buf
 * (NUL-terminated).  Returns its length or -1. */
static long redis_info_section(int fd, const char *section, char *buf, size_t cap)
{
    char req[128], hdr[32];
    size_t got = 0, want, hl = 0;
    long len;
    int n = snprintf(req, sizeof(req), "*2\r\n$4\r\nINFO\r\n$%zu\r\n%s\r\n", strlen(section), section);

    if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) return -1;
    /* "$<len>\r\n", read byte by byte: short and once per snapshot */
    while (hl < sizeof(hdr) - 1) {
        if (recv(fd, hdr + hl, 1, 0) != 1) return -1;
        if (hdr[hl++] == '\n') break;
    }
    hdr[hl] = 0;
    if (hdr[0] != '$' || (len = strtol(hdr + 1, NULL, 10)) < 0) return -1;
    want = (size_t)len + 2;                              /* and its CRLF */
    if (want > cap) return -1;
    while (got < want) {
        ssize_t r = recv(fd, buf + got, want - got, 0);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    buf[len] = 0;
    return len;
}

static int is_script_cmd(const char *name)
{
    return !strcmp(name, "evalsha") || !strcmp(name, "eval") || !strcmp(name, "evalsha_ro")
        || !strcmp(name, "eval_ro") || !strcmp(name, "fcall") || !strcmp(name, "fcall_ro");
}

int lg_redis_snap(const char *host, int port, struct lg_redis *r)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    struct timeval tv = { 2, 0 };
    static char buf[256 * 1024];
    int fd;
    long len;
    char *line, *save = NULL;

    memset(r, 0, sizeof(*r));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) return -1;
    if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) { close(fd); return -1; }

    if ((len = redis_info_section(fd, "cpu", buf, sizeof(buf))) < 0) { close(fd); return -1; }
    for (line = strtok_r(buf, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save)) {
        if (!strncmp(line, "used_cpu_sys:", 13)) r->cpu_us += strtod(line + 13, NULL) * 1e6;
        else if (!strncmp(line, "used_cpu_user:", 14)) r->cpu_us += strtod(line + 14, NULL) * 1e6;
        else if (!strncmp(line, "used_cpu_sys_children:", 22)) r->child_us += strtod(line + 22, NULL) * 1e6;
        else if (!strncmp(line, "used_cpu_user_children:", 23)) r->child_us += strtod(line + 23, NULL) * 1e6;
    }
    /* the AOF rewrites' forks: their CPU is on the same cores (counted
     * once the child is reaped) */
    if ((len = redis_info_section(fd, "stats", buf, sizeof(buf))) < 0) { close(fd); return -1; }
    save = NULL;
    for (line = strtok_r(buf, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save)) {
        if (!strncmp(line, "total_forks:", 12)) r->forks = strtoull(line + 12, NULL, 10);
    }
    if ((len = redis_info_section(fd, "persistence", buf, sizeof(buf))) < 0) { close(fd); return -1; }
    save = NULL;
    for (line = strtok_r(buf, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save)) {
        if (!strncmp(line, "aof_current_size:", 17)) r->aof_bytes = strtoull(line + 17, NULL, 10);
    }
    if ((len = redis_info_section(fd, "commandstats", buf, sizeof(buf))) < 0) { close(fd); return -1; }
    close(fd);
    save = NULL;
    for (line = strtok_r(buf, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save)) {
        /* cmdstat_<name>:calls=N,usec=N,usec_per_call=F,... */
        char *colon, *p;
        if (strncmp(line, "cmdstat_", 8) || !(colon = strchr(line, ':')) || r->n >= LG_REDIS_MAX) continue;
        *colon = 0;
        struct lg_redis_cmd *c = &r->c[r->n];
        snprintf(c->name, sizeof(c->name), "%s", line + 8);
        if ((p = strstr(colon + 1, "calls="))) c->calls = strtoull(p + 6, NULL, 10);
        if ((p = strstr(colon + 1, "usec="))) c->usec = strtoull(p + 5, NULL, 10);
        r->n++;
    }
    r->ok = 1;
    return 0;
}

/* after - before, without the INFO commands of the snapshots themselves */
void lg_redis_diff(const struct lg_redis *a, const struct lg_redis *b, struct lg_redis_cost *d)
{
    memset(d, 0, sizeof(*d));
    if (!a->ok || !b->ok) return;
    d->ok = 1;
    d->cpu_us = b->cpu_us - a->cpu_us;
    d->child_us = b->child_us - a->child_us;
    d->forks = b->forks - a->forks;
    d->aof_bytes = (int64_t)b->aof_bytes - (int64_t)a->aof_bytes;
    for (int i = 0; i < b->n; i++) {
        const struct lg_redis_cmd *c = &b->c[i];
        uint64_t calls = c->calls, usec = c->usec;
        if (!strcmp(c->name, "info")) continue;
        for (int j = 0; j < a->n; j++)
            if (!strcmp(a->c[j].name, c->name)) { calls -= a->c[j].calls; usec -= a->c[j].usec; break; }
        if (!calls) continue;
        d->calls += calls;
        if (is_script_cmd(c->name)) { d->scripts += calls; d->script_usec += usec; }
        /* keep the commands by calls, most first */
        if (d->n < LG_REDIS_TOP || calls > d->top[d->n - 1].calls) {
            int k = d->n < LG_REDIS_TOP ? d->n++ : d->n - 1;
            while (k > 0 && d->top[k - 1].calls < calls) { d->top[k] = d->top[k - 1]; k--; }
            snprintf(d->top[k].name, sizeof(d->top[k].name), "%s", c->name);
            d->top[k].calls = calls;
            d->top[k].usec = usec;
        }
    }
}

/* MONITOR for `secs` seconds: each line is "+<time> [<db> <client>] "<CMD>" ...",
 * <client> being "lua" for a redis.call inside a script. */
int lg_redis_monitor(const char *host, int port, double secs, struct lg_redis_mon *m)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    struct timeval tv = { 0, 200000 };
    static char buf[256 * 1024];
    size_t have = 0;
    uint64_t end;
    int fd;

    memset(m, 0, sizeof(*m));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) return -1;
    if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0
        || send(fd, "MONITOR\r\n", 9, MSG_NOSIGNAL) != 9) { close(fd); return -1; }
    end = lg_now_ns() + (uint64_t)(secs * 1e9);
    while (lg_now_ns() < end) {
        ssize_t r = recv(fd, buf + have, sizeof(buf) - have, 0);
        char *p = buf, *e, *nl;
        if (r <= 0) { if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue; break; }
        have += (size_t)r;
        e = buf + have;
        while ((nl = memchr(p, '\n', (size_t)(e - p)))) {
            char *lb = memchr(p, '[', (size_t)(nl - p)), *rb = lb ? memchr(lb, ']', (size_t)(nl - lb)) : NULL;
            if (rb && rb[1] == ' ' && rb[2] == '"') {
                char *q = rb + 3, *qe = memchr(q, '"', (size_t)(nl - q));
                int lua = rb - lb >= 4 && !memcmp(rb - 4, " lua", 4);
                if (lua) m->lua++;
                else {
                    m->client++;
                    if (qe && ((qe - q == 7 && !strncasecmp(q, "evalsha", 7)) || (qe - q == 4 && !strncasecmp(q, "eval", 4))
                               || (qe - q == 5 && !strncasecmp(q, "fcall", 5))))
                        m->client_scripts++;
                }
            }
            p = nl + 1;
        }
        have = (size_t)(e - p);
        memmove(buf, p, have);
        if (have == sizeof(buf)) have = 0;   /* a line longer than the buffer: drop it */
    }
    close(fd);
    m->secs = secs;
    m->ok = 1;
    return 0;
}
