/*
 * The fanout role (docs/PIPELINE.md, "Delivery to nginx"): for each queue
 * entry, append the event to every recipient's inbox (lua/inbox.lua, one
 * script call per user, idempotent), then publish once per nginx worker channel holding
 * the recipients' connections, then acknowledge the entry.
 *
 * One batch costs four round trips to Redis whatever its size: the
 * lookups (group members and receipts, the acting users' known devices),
 * all inbox appends pipelined, then all PUBLISHes and the XACKs
 * pipelined, then the next XREADGROUP. A batch is acknowledged only after all of it
 * was done; after any failure the connection is dropped and, once
 * reconnected, our pending entries are processed again: the inbox script
 * turns that into a re-publish with the same cursors, never a second copy.
 */
#include "chat_worker.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


typedef struct {
    char   *p;
    size_t  len, cap;
} buf_t;

static int
buf_put(buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char  *np;
        while (cap < b->len + n + 1) cap *= 2;
        np = realloc(b->p, cap);
        if (np == NULL) return -1;
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

/* One nginx worker channel and the recipient tokens published to it. */
typedef struct {
    const char *name;
    size_t      name_len;
    buf_t       toks;
    int         last_rcpt;     /* the recipient whose token was added last */
} chan_t;

/* What one entry of a batch goes to. */
typedef struct {
    int          r0, n;          /* its recipients: rc[r0 .. r0 + n) */
    int          pull;           /* live delivery only, no inbox copy: a big
                                    group's message, a delivered receipt */
    redisReply  *group;          /* the group's members or senders (Redis reply) */
    int          own_skip;       /* no device needs the acting user's own copy */
    char         field[CW_FIELD_MAX];
} target_t;

typedef struct {
    const cw_config_t *cf;
    cw_redis_t      *c;
    cw_queue_t        *q;
    cw_dlq_t          *dlq;
    cw_batch_t         batch;
    int                have_batch;       /* Kafka: a fetched batch not yet done */
    target_t          *tg;               /* per entry */
    cw_rcpt_t         *rc;               /* every recipient of the batch */
    redisReply       **replies;          /* per recipient */
    int                nrc, rc_cap;
    int               *ord, *msgs, *pos; /* processing order (order_batch) */
    int                cap;              /* entries the arrays above hold */
    chan_t            *chans;
    int                nchans, chans_cap;
    buf_t              own;              /* an inbox member marked with its device */
    char               max_s[24], ret_s[24];
    /* counters for the periodic log line */
    uint64_t           n_entries, n_appends, n_publishes, n_invalid;
    int64_t            next_stats;
} fanout_t;

/* The scripts (lua/inbox.lua, lua/group_receipt.lua) in this role's Redis. */
static int
load_script(fanout_t *f)
{
    return cw_lua_load(f->c);
}

static int
ensure_cap(fanout_t *f, int n)
{
    if (n <= f->cap) return 0;
    free(f->tg);
    free(f->ord);
    free(f->msgs);
    free(f->pos);
    f->tg = calloc((size_t) n, sizeof(target_t));
    f->ord = malloc(sizeof(int) * (size_t) n);
    f->msgs = malloc(sizeof(int) * (size_t) n);
    f->pos = malloc(sizeof(int) * (size_t) n);
    if (!f->tg || !f->ord || !f->msgs || !f->pos) {
        f->cap = 0;
        return -1;
    }
    f->cap = n;
    return 0;
}

/* Room for one more recipient; returns it, or NULL. */
static cw_rcpt_t *
rcpt_add(fanout_t *f, const char *user, const char *skip_dev)
{
    if (f->nrc == f->rc_cap) {
        int          cap = f->rc_cap ? f->rc_cap * 2 : 1024;
        cw_rcpt_t   *nr = realloc(f->rc, sizeof(cw_rcpt_t) * (size_t) cap);
        redisReply **np;
        if (nr == NULL) return NULL;
        f->rc = nr;
        np = realloc(f->replies, sizeof(redisReply *) * (size_t) cap);
        if (np == NULL) return NULL;
        f->replies = np;
        f->rc_cap = cap;
    }
    f->rc[f->nrc].user = user;
    f->rc[f->nrc].skip_dev = skip_dev;
    return &f->rc[f->nrc++];
}

static chan_t *
chan_get(fanout_t *f, const char *name, size_t len)
{
    for (int i = 0; i < f->nchans; i++) {
        if (f->chans[i].name_len == len && memcmp(f->chans[i].name, name, len) == 0) return &f->chans[i];
    }
    if (f->nchans == f->chans_cap) {
        int     cap = f->chans_cap ? f->chans_cap * 2 : 16;
        chan_t *nc = realloc(f->chans, sizeof(chan_t) * (size_t) cap);
        if (nc == NULL) return NULL;
        memset(nc + f->chans_cap, 0, sizeof(chan_t) * (size_t) (cap - f->chans_cap));
        f->chans = nc;
        f->chans_cap = cap;
    }
    f->chans[f->nchans].name = name;
    f->chans[f->nchans].name_len = len;
    f->chans[f->nchans].toks.len = 0;
    f->chans[f->nchans].last_rcpt = -1;
    return &f->chans[f->nchans++];
}

/*
 * Appends the PUBLISHes of entry e: for each recipient, each live registry
 * member "<channel>|<device>|<session>" adds the token
 * "user[:cursor][!device]" to its channel, once per user and channel (no
 * cursor: a pull-mode group event or a delivered receipt, live only). A channel whose
 * only connection is the skipped device gets the token too: the module
 * tracks each session's cursors and would take a missing one for a gap
 * (docs/PIPELINE.md). rep[k] is recipient k's inbox append reply
 * {appended, cursor, members...} or, for pull, its registry members.
 * Returns the number of commands appended, or -1 on memory exhaustion.
 */
static int
append_publishes(fanout_t *f, const cw_entry_t *e, const target_t *t, redisReply **rep)
{
    int n = 0;

    f->nchans = 0;
    for (int k = 0; k < t->n; k++) {
        const cw_rcpt_t *rc = &f->rc[t->r0 + k];
        redisReply      *r = rep[k];
        long long        cursor = 0;
        size_t           first = 0;
        char             tok[CHAT_DELIVERY_TOKEN_MAX];
        size_t           toklen;

        if (!t->pull) {
            if (r->element[1]->type != REDIS_REPLY_INTEGER || (cursor = r->element[1]->integer) <= 0) continue;
            first = 2;
        }
        /* the delivery payload's token (libchat: the module parses it) */
        toklen = chat_delivery_token(tok, sizeof(tok), rc->user, strlen(rc->user), (uint64_t) cursor,
                                     rc->skip_dev, rc->skip_dev ? strlen(rc->skip_dev) : 0);
        if (toklen == 0) continue;
        for (size_t j = first; j < r->elements; j++) {
            const char *m = r->element[j]->str, *bar;
            chan_t     *ch;
            if (r->element[j]->type != REDIS_REPLY_STRING) continue;
            bar = strchr(m, '|');
            if (bar == NULL || bar == m) continue;
            /* the acting device's channel gets the token too ("!device"
             * tells the module to skip it): its session keeps its cursors
             * contiguous and never takes the skip for a gap */
            ch = chan_get(f, m, (size_t) (bar - m));
            if (ch == NULL) return -1;
            if (ch->last_rcpt == k) continue;     /* one token per user and channel */
            ch->last_rcpt = k;
            if ((ch->toks.len && buf_put(&ch->toks, " ", 1) != 0) || buf_put(&ch->toks, tok, toklen) != 0)
                return -1;
        }
    }
    for (int i = 0; i < f->nchans; i++) {
        chan_t     *ch = &f->chans[i];
        const char *argv[3];
        size_t      lens[3];
        if (buf_put(&ch->toks, "\n", 1) != 0 || buf_put(&ch->toks, e->ev, e->ev_len) != 0) return -1;
        argv[0] = cw_redis_publish_cmd(f->c);      /* SPUBLISH on a cluster: one node, not all */
        lens[0] = strlen(argv[0]);
        argv[1] = ch->name;
        lens[1] = ch->name_len;
        argv[2] = ch->toks.p;
        lens[2] = ch->toks.len;
        cw_redis_append_argv(f->c, 3, argv, lens);
        n++;
    }
    return n;
}

/*
 * The order the entries of a batch are processed in: each conversation's
 * messages by seq, in the positions its messages had in the batch; every
 * other entry stays where it is. A Redis stream holds each conversation in
 * seq order already; a Kafka partition may not (seqs are assigned in Redis
 * and produced by several nginx processes), and cursors follow this order.
 */
static const cw_batch_t *sort_batch;

static int
by_conv_seq(const void *x, const void *y)
{
    const cw_entry_t *a = &sort_batch->e[*(const int *) x], *b = &sort_batch->e[*(const int *) y];
    int               c = strcmp(a->conv, b->conv);
    if (c) return c;
    if (a->seq != b->seq) return a->seq < b->seq ? -1 : 1;
    return *(const int *) x - *(const int *) y;
}

static int
by_conv_pos(const void *x, const void *y)
{
    const cw_entry_t *a = &sort_batch->e[*(const int *) x], *b = &sort_batch->e[*(const int *) y];
    int               c = strcmp(a->conv, b->conv);
    return c ? c : *(const int *) x - *(const int *) y;
}

static void
order_batch(fanout_t *f)
{
    cw_batch_t *b = &f->batch;
    int         n = 0;

    for (int i = 0; i < b->n; i++) {
        f->ord[i] = i;
        if (b->e[i].valid && b->e[i].type == CW_T_MSG) f->msgs[n++] = i;
    }
    if (n < 2) return;
    memcpy(f->pos, f->msgs, sizeof(int) * (size_t) n);
    sort_batch = b;
    qsort(f->msgs, (size_t) n, sizeof(int), by_conv_seq);
    qsort(f->pos, (size_t) n, sizeof(int), by_conv_pos);
    for (int k = 0; k < n; k++) f->ord[f->pos[k]] = f->msgs[k];
}

static void
free_groups(fanout_t *f)
{
    for (int i = 0; i < f->batch.n; i++) {
        if (f->tg[i].group) freeReplyObject(f->tg[i].group);
        f->tg[i].group = NULL;
    }
}

/* The entry carries an own copy for the acting user's other devices (a
 * message, a read receipt; the acting device named). */
static int
has_own_copy(const cw_entry_t *e)
{
    return e->valid && e->dev[0] && e->type != CW_T_GROUP
           && (e->type == CW_T_MSG || e->type == CW_T_DEL || strcmp(e->st, "read") == 0);
}

/*
 * One pipelined round trip before the appends: a group message's member
 * hash, a group receipt's pointer update and senders, and for each entry
 * with an own copy the acting user's known devices (HRANDFIELD acked 2: at
 * most two of them). The own copy is needed only when a device other than
 * the acting one is known (lua/inbox.lua checks the same again, so a
 * device registering in between still gets it); asking first keeps a
 * one-device sender's message at one plain command instead of a script,
 * and the appends then run in entry order, which keeps every user's
 * cursors in seq order per conversation. (A skipped copy leaves the
 * user's last[m:<conv>] alone, so the next message of the other
 * participant remembers the own seqs as missing, lua/inbox.lua's h list:
 * harmless, they never come.) Returns -1 when the connection must be
 * dropped.
 */
static int
resolve_groups(fanout_t *f)
{
    cw_batch_t *b = &f->batch;
    int         n = 0;

    for (int oi = 0; oi < b->n; oi++) {
        cw_entry_t *e = &b->e[f->ord[oi]];
        char        k[3][CW_ID_MAX + 48], seq_s[24], prev_s[24];

        f->tg[f->ord[oi]].group = NULL;
        f->tg[f->ord[oi]].own_skip = 0;
        if (has_own_copy(e)) {
            cw_redis_append(f->c, "HRANDFIELD chat:{u:%s}:acked 2", e->from);
            n++;
        }
        if (!e->valid || !e->is_group || e->type == CW_T_GROUP) continue;
        if (e->type == CW_T_MSG || e->type == CW_T_DEL) {
            cw_redis_append(f->c, "HGETALL chat:{s%d}:g:%s:mem", e->shard, e->a);
        } else {
            static const char *what[] = { "dlv", "read", "snd" };
            const char        *argv[10];
            size_t             lens[10];
            for (int j = 0; j < 3; j++) snprintf(k[j], sizeof(k[j]), "chat:{s%d}:g:%s:%s", e->shard, e->a, what[j]);
            snprintf(seq_s, sizeof(seq_s), "%" PRId64, e->seq);
            snprintf(prev_s, sizeof(prev_s), "%" PRId64, e->prev);
            argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_GROUP_RECEIPT); argv[2] = "3";
            argv[3] = k[0]; argv[4] = k[1]; argv[5] = k[2];
            argv[6] = e->from; argv[7] = seq_s; argv[8] = e->st; argv[9] = prev_s;
            for (int j = 0; j < 10; j++) lens[j] = strlen(argv[j]);
            cw_redis_append_argv(f->c, 10, argv, lens);
        }
        n++;
    }
    for (int oi = 0; oi < b->n && n > 0; oi++) {
        cw_entry_t *e = &b->e[f->ord[oi]];
        target_t   *t = &f->tg[f->ord[oi]];
        redisReply *r;
        if (has_own_copy(e)) {
            if (cw_redis_get_reply(f->c, &r) != REDIS_OK) return -1;
            n--;
            if (r->type != REDIS_REPLY_ARRAY) {
                cw_error("fanout: devices of %s: %s", e->from, r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
                freeReplyObject(r);
                goto drain;
            }
            t->own_skip = r->elements == 0
                          || (r->elements == 1 && r->element[0]->type == REDIS_REPLY_STRING
                              && strcmp(r->element[0]->str, e->dev) == 0);
            freeReplyObject(r);
        }
        if (!e->valid || !e->is_group || e->type == CW_T_GROUP) continue;
        if (cw_redis_get_reply(f->c, &r) != REDIS_OK) return -1;
        t->group = r;
        n--;
        if (r->type != REDIS_REPLY_ARRAY) {
            cw_error("fanout: group %s: %s", e->conv, r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
            goto drain;
        }
    }
    return 0;
drain:
    while (n-- > 0) {
        redisReply *r;
        if (cw_redis_get_reply(f->c, &r) != REDIS_OK) return -1;
        freeReplyObject(r);
    }
    return -1;
}

/* "<since>" or "<since>:<until>": a member at seq n? active: not removed. */
static int
member_at(const char *v, int64_t n, int *active)
{
    char      *end;
    long long  since = strtoll(v, &end, 10), until = 0;

    *active = (*end == '\0');
    if (*end == ':') until = strtoll(end + 1, NULL, 10);
    return since < n && (until == 0 || n < until);
}

/* The recipients of every entry, in processing order. */
static int
build_targets(fanout_t *f)
{
    cw_batch_t *b = &f->batch;

    f->nrc = 0;
    for (int oi = 0; oi < b->n; oi++) {
        int         i = f->ord[oi];
        cw_entry_t *e = &b->e[i];
        target_t   *t = &f->tg[i];
        redisReply *g = t->group;

        t->r0 = f->nrc;
        t->n = 0;
        t->pull = 0;
        if (!e->valid) continue;
        cw_entry_inbox_field(e, t->field);
        if (!e->is_group) {
            cw_rcpt_t d[2];
            int       nd = cw_recipients(e, d);
            for (int k = 0; k < nd; k++) {
                if (d[k].skip_dev && t->own_skip) continue;       /* no device needs it */
                if (rcpt_add(f, d[k].user, d[k].skip_dev) == NULL) return -1;
            }
        } else if (e->type == CW_T_GROUP) {
            /* membership change: the users the entry names, every device */
            const char *u = e->rcpt_users;
            for (int k = 0; k < e->n_rcpt; k++, u += strlen(u) + 1)
                if (rcpt_add(f, u, NULL) == NULL) return -1;
        } else if (e->type == CW_T_DEL && strcmp(e->event, "me") == 0) {
            /* a deletion for me: the acting user's other devices */
            if (!t->own_skip && rcpt_add(f, e->from, e->dev[0] ? e->dev : NULL) == NULL) return -1;
        } else if (e->type == CW_T_MSG || e->type == CW_T_DEL) {
            /* members at this seq (a deletion: the message's); the sender's
             * own copy skips its device */
            int active = 0;
            for (size_t j = 0; j + 1 < g->elements; j += 2) {
                const char *u = g->element[j]->str;
                int         now;
                if (g->element[j]->type != REDIS_REPLY_STRING || g->element[j + 1]->type != REDIS_REPLY_STRING)
                    continue;
                if (member_at(g->element[j + 1]->str, e->seq, &now)
                    && !(t->own_skip && strcmp(u, e->from) == 0)
                    && rcpt_add(f, u, strcmp(u, e->from) == 0 && e->dev[0] ? e->dev : NULL) == NULL)
                {
                    return -1;
                }
                active += now;
            }
            t->pull = active > f->cf->group_push_limit;
        } else {
            /* group receipt: the senders it tells something new, and for a
             * read the reader's other devices */
            for (size_t j = 0; j < g->elements; j++) {
                const char *u = g->element[j]->str;
                if (g->element[j]->type == REDIS_REPLY_STRING && strcmp(u, e->from) != 0
                    && rcpt_add(f, u, NULL) == NULL)
                {
                    return -1;
                }
            }
            if (strcmp(e->st, "read") == 0 && !t->own_skip && rcpt_add(f, e->from, e->dev[0] ? e->dev : NULL) == NULL)
                return -1;
        }
        /* a delivered receipt is live only (PROTOCOL 7): its pointer is in
         * Redis already (the ack script, group_receipt.lua) and is read on
         * reconnect (GET /chat/receipts), so no inbox copy, no cursor and
         * no ack of it by the sender's devices */
        if (e->type == CW_T_RECEIPT && strcmp(e->st, "delivered") == 0) t->pull = 1;
        t->n = f->nrc - t->r0;
    }
    return 0;
}

/* Appends recipient k's command: the inbox append (push), or a registry
 * read (pull). The acting user's own copy names its device (ARGV 7): the
 * script skips it when no other device of the user ever registered. */
static int
append_rcpt(fanout_t *f, const cw_entry_t *e, const target_t *t, const cw_rcpt_t *rc, const char *now_s)
{
    static const char *suffix[] = { "inbox", "cur", "last", "conns", "ages", "acked" };
    char               keys[6][CW_ID_MAX + 24], seq_s[24];
    const char        *argv[16];
    size_t             lens[16];

    if (t->pull) {
        cw_redis_append(f->c, "ZRANGEBYSCORE chat:{u:%s}:conns %s +inf", rc->user, now_s);
        return 0;
    }
    for (int j = 0; j < 6; j++) snprintf(keys[j], sizeof(keys[j]), "chat:{u:%s}:%s", rc->user, suffix[j]);
    snprintf(seq_s, sizeof(seq_s), "%" PRId64, e->seq);
    argv[0] = "EVALSHA"; argv[1] = cw_lua_sha(CHAT_LUA_INBOX); argv[2] = "6";
    for (int j = 0; j < 6; j++) argv[3 + j] = keys[j];
    argv[9] = t->field; argv[10] = seq_s; argv[11] = e->ev;
    argv[12] = now_s; argv[13] = f->max_s; argv[14] = f->ret_s;
    argv[15] = rc->skip_dev ? rc->skip_dev : "";
    for (int j = 0; j < 16; j++) lens[j] = strlen(argv[j]);
    lens[11] = e->ev_len;
    if (rc->skip_dev) {
        /* the acting user's own copy names the device it came from, so a
         * replay to that device skips it: {"!":"<device>", + the event */
        f->own.len = 0;
        if (buf_put(&f->own, "{\"!\":\"", 6) != 0 || buf_put(&f->own, rc->skip_dev, strlen(rc->skip_dev)) != 0
            || buf_put(&f->own, "\",", 2) != 0 || buf_put(&f->own, e->ev + 1, e->ev_len - 1) != 0)
        {
            return -1;
        }
        argv[11] = f->own.p;
        lens[11] = f->own.len;
    }
    cw_redis_append_argv(f->c, 16, argv, lens);
    return 0;
}

/*
 * Deletions of the batch (delete.c): before the deletion events are
 * appended, each recipient's inbox copies of the deleted message become a
 * tombstone (lua/tombstone.lua), one pipelined round trip, only when the
 * batch holds a deletion. Returns -1 when the connection must be dropped
 * (the batch comes back; the script is idempotent).
 */
static int
tombstones(fanout_t *f)
{
    cw_batch_t *b = &f->batch;
    int         n = 0, rc = 0;
    redisReply *r;

    for (int oi = 0; oi < b->n; oi++) {
        int         i = f->ord[oi];
        cw_entry_t *e = &b->e[i];
        if (!e->valid || e->type != CW_T_DEL || f->tg[i].pull) continue;
        for (int k = 0; k < f->tg[i].n; k++) n += cw_tombstone_append(f->c, e, f->rc[f->tg[i].r0 + k].user);
    }
    while (n-- > 0) {
        if (cw_redis_get_reply(f->c, &r) != REDIS_OK) return -1;
        if (r->type == REDIS_REPLY_ERROR) {
            cw_error("fanout: tombstone: %s", r->str);
            rc = -1;
        }
        freeReplyObject(r);
    }
    return rc;
}

/* Returns 0 when the whole batch was delivered and acknowledged, -1 when
 * the connection must be dropped (nothing of the batch was acknowledged
 * unless all of it was done). */
static int
process(fanout_t *f)
{
    cw_batch_t *b = &f->batch;
    char        now_s[24];
    int         tries = 0, err, ncmd, rc = 0;
    redisReply *r;

    if (ensure_cap(f, b->n) != 0) return -1;
    /* What cannot be processed is recorded in the dead-letter queue before
     * the batch is acknowledged; if that fails, nothing is acknowledged. */
    for (int i = 0; i < b->n; i++) {
        if (b->e[i].valid || b->e[i].dead) continue;
        if (cw_dlq_put(f->dlq, f->c, &b->e[i], b->e[i].why ? b->e[i].why : "invalid") != 0) return -1;
        f->n_invalid++;
    }
    order_batch(f);
again:
    snprintf(now_s, sizeof(now_s), "%lld", (long long) cw_now_ms());
    if (resolve_groups(f) != 0 || build_targets(f) != 0 || tombstones(f) != 0) {
        free_groups(f);
        return -1;
    }
    for (int oi = 0; oi < b->n; oi++) {
        int i = f->ord[oi];
        for (int k = 0; k < f->tg[i].n; k++) {
            if (append_rcpt(f, &b->e[i], &f->tg[i], &f->rc[f->tg[i].r0 + k], now_s) != 0) {
                free_groups(f);
                return -1;        /* commands are half written: the connection is dropped */
            }
        }
    }
    err = 0;
    for (int i = 0; i < f->nrc; i++) {
        if (cw_redis_get_reply(f->c, &f->replies[i]) != REDIS_OK) {
            for (int j = 0; j < i; j++) freeReplyObject(f->replies[j]);
            free_groups(f);
            return -1;
        }
        r = f->replies[i];
        if (r->type == REDIS_REPLY_ERROR) {
            if (strncmp(r->str, "NOSCRIPT", 8) == 0) err |= 1;
            else {
                if (!(err & 2)) cw_error("inbox append: %s", r->str);
                err |= 2;
            }
        } else if (r->type != REDIS_REPLY_ARRAY) {
            if (!(err & 2)) cw_error("inbox append: unexpected reply");
            err |= 2;
        }
    }
    for (int oi = 0; oi < b->n && !err; oi++) {
        const target_t *t = &f->tg[f->ord[oi]];
        for (int k = 0; k < t->n && !t->pull; k++) {
            if (f->replies[t->r0 + k]->elements < 2) err |= 2;
        }
    }
    if (err) {
        for (int i = 0; i < f->nrc; i++) freeReplyObject(f->replies[i]);
        free_groups(f);
        /* Redis restarted and lost its script cache: load and redo the
         * batch (appends that were done return the same cursors). */
        if (err == 1 && tries++ == 0 && load_script(f) == 0) goto again;
        return -1;
    }
    /* redis_replicas: the appends must have reached that many replicas of
     * each master before the entries are acknowledged, or a master that dies
     * takes acknowledged deliveries with it. Not reached: the batch is not
     * acknowledged and comes back (the inbox script makes that harmless). */
    if (f->cf->redis_replicas > 0) {
        int acked = cw_redis_wait(f->c, f->cf->redis_replicas, f->cf->redis_wait_ms);
        if (acked < f->cf->redis_replicas) {
            for (int i = 0; i < f->nrc; i++) freeReplyObject(f->replies[i]);
            free_groups(f);
            if (acked >= 0) cw_warn("fanout: inbox appends reached %d of %d replicas within %d ms; batch not acknowledged",
                                    acked, f->cf->redis_replicas, f->cf->redis_wait_ms);
            return -1;
        }
    }

    /* Every append is done: publish once per channel, then acknowledge. */
    ncmd = 0;
    for (int oi = 0; oi < b->n; oi++) {
        int             i = f->ord[oi];
        cw_entry_t     *e = &b->e[i];
        const target_t *t = &f->tg[i];
        int             n;
        if (!e->valid) continue;                   /* in the dead-letter queue (above) */
        n = append_publishes(f, e, t, f->replies + t->r0);
        if (n < 0) {
            rc = -1;
            break;
        }
        ncmd += n;
        f->n_publishes += (uint64_t) n;
        if (!t->pull) f->n_appends += (uint64_t) t->n;
    }
    for (int i = 0; i < f->nrc; i++) freeReplyObject(f->replies[i]);
    free_groups(f);
    if (rc != 0) {
        /* Out of memory halfway: the connection is dropped with whatever
         * was appended unsent; the batch comes back as pending. */
        cw_error("fanout: out of memory while building publishes");
        return -1;
    }
    if (!cw_queue_is_kafka(f->q)) {
        int na = cw_queue_ack(f->q, f->c, b);
        if (na < 0) return -1;
        ncmd += na;
    }
    for (int i = 0; i < ncmd; i++) {
        if (cw_redis_get_reply(f->c, &r) != REDIS_OK) return -1;
        if (r->type == REDIS_REPLY_ERROR) {
            cw_error("publish/ack: %s", r->str);
            rc = -1;
        }
        freeReplyObject(r);
    }
    if (rc != 0) return -1;
    if (cw_queue_is_kafka(f->q)) cw_queue_ack(f->q, NULL, b);   /* a failed commit is re-read: idempotent */
    f->n_entries += (uint64_t) b->n;
    return 0;
}

static void
drop(fanout_t *f, cw_backoff_t *bo, const char *why)
{
    if (f->c) {
        cw_warn("fanout: redis %s: %s; reconnecting in %d ms", why,
                cw_redis_err(f->c) ? cw_redis_errstr(f->c) : "command failed", cw_backoff_ms(bo));
        cw_redis_free(f->c);
        f->c = NULL;
    }
    cw_backoff_wait(bo);
}

int
cw_role_fanout(const cw_config_t *cf)
{
    fanout_t        f;
    cw_heartbeat_t  hb;
    cw_backoff_t    bo;
    cw_lease_t      lease;
    int            *shards, nshards = 0, leases;
    char            err[256];

    memset(&f, 0, sizeof(f));
    f.cf = cf;
    snprintf(f.max_s, sizeof(f.max_s), "%d", cf->inbox_max);
    snprintf(f.ret_s, sizeof(f.ret_s), "%lld", (long long) cf->retention_days * 86400000LL);
    shards = malloc(sizeof(int) * (size_t) cf->shards);
    if (shards == NULL) return 1;
    /* Redis queue with leases (fanout_lease_ms): any shard may become
     * ours, the leases say which are (lease.c); without: the static split */
    leases = strcmp(cf->queue, "kafka") != 0 && cf->fanout_lease_ms > 0;
    for (int s = 0; s < cf->shards; s++) {
        if (leases || s % cf->fanout_workers == cf->fanout_index) shards[nshards++] = s;
    }
    f.q = cw_queue_new(cf, "fanout", shards, nshards, 1);
    free(shards);
    if (f.q == NULL) return 1;
    if (leases && cw_lease_init(&lease, cf, f.q) != 0) return 1;
    f.dlq = cw_dlq_new(cf, "fanout");
    if (f.dlq == NULL) return 1;
    cw_heartbeat_init(&hb, cf, "fanout");
    cw_backoff_reset(&bo);
    if (cw_queue_is_kafka(f.q)) {
        cw_info("role fanout started (node %s, kafka topic chat.in, group chat-fanout, batch %d)",
                cf->node_id, cf->batch);
    } else if (leases) {
        cw_info("role fanout started (node %s, consumer fanout-%d, shard leases of %d ms renewed every %d ms, "
                "%d shards, batch %d)", cf->node_id, cf->fanout_index, cf->fanout_lease_ms,
                cf->fanout_lease_renew_ms, cf->shards, cf->batch);
    } else {
        cw_info("role fanout started (node %s, consumer fanout-%d, %d of %d shards, batch %d)",
                cf->node_id, cf->fanout_index, nshards, cf->shards, cf->batch);
    }
    f.next_stats = cw_mono_ms() + 10000;

    while (!cw_stop) {
        int n;
        if (f.c == NULL) {
            f.c = cw_redis_connect(cf, 5000, err, sizeof(err));
            if (f.c == NULL) {
                cw_warn("fanout: redis: %s; retrying in %d ms", err, cw_backoff_ms(&bo));
                cw_backoff_wait(&bo);
                continue;
            }
            if (load_script(&f) != 0 || cw_queue_setup(f.q, f.c) != 0) {
                drop(&f, &bo, "setup failed");
                continue;
            }
            cw_info("fanout: connected to redis %s", cf->redis_url);
            cw_backoff_reset(&bo);
        }
        if (cw_heartbeat_tick(&hb, f.c) != 0 || (leases && cw_lease_tick(&lease, f.c) != 0)
            || cw_queue_maintain(f.q, f.c) != 0)
        {
            drop(&f, &bo, "connection lost");
            continue;
        }
        if (!f.have_batch) {
            n = cw_queue_fetch(f.q, f.c, &f.batch, 1000);
            if (n < 0) {
                drop(&f, &bo, "read failed");
                continue;
            }
            if (n == 0) goto stats;
            f.have_batch = 1;
        }
        if (process(&f) != 0) {
            /* Redis queue: the batch stays pending in the group and is read
             * again after the reconnect. Kafka: keep it and retry. */
            if (!cw_queue_is_kafka(f.q)) {
                f.have_batch = 0;
                cw_batch_clear(&f.batch);
            }
            drop(&f, &bo, "batch failed");
            continue;
        }
        f.have_batch = 0;
        cw_backoff_reset(&bo);
        /* a small batch means traffic at a low rate: wait a moment before
         * the next read, so that one read, one round trip per step and one
         * ack cover several entries instead of one each (Redis time per
         * round trip is most of what is left per message); a delivery
         * waits at most this much more */
        if (f.batch.n < cf->batch && cf->fanout_gather_ms > 0 && !cw_stop) cw_sleep_ms(cf->fanout_gather_ms);
stats:
        if (cw_mono_ms() >= f.next_stats) {
            if (f.n_entries) {
                cw_info("fanout: %" PRIu64 " entries, %" PRIu64 " inbox appends, %" PRIu64
                        " publishes, %" PRIu64 " dead letters in the last 10 s (%" PRIu64
                        " dead letters since start)",
                        f.n_entries, f.n_appends, f.n_publishes, f.n_invalid, cw_dlq_total(f.dlq));
            }
            f.n_entries = f.n_appends = f.n_publishes = f.n_invalid = 0;
            f.next_stats = cw_mono_ms() + 10000;
        }
    }
    /* what was processed is committed (with leases: by the release, while
     * they are ours), so a restart does not process it again */
    if (!leases && f.c && !cw_redis_err(f.c) && !cw_queue_is_kafka(f.q)) cw_queue_flush(f.q, f.c, 1);
    if (leases) {
        /* the others take our shards at once instead of after the lease */
        cw_lease_release(&lease, f.c);
        cw_lease_free(&lease);
    }
    cw_heartbeat_clear(&hb, f.c);
    if (f.c) cw_redis_free(f.c);
    cw_queue_free(f.q);
    cw_dlq_free(f.dlq);
    cw_batch_free(&f.batch);
    for (int i = 0; i < f.chans_cap; i++) free(f.chans[i].toks.p);
    free(f.own.p);
    free(f.chans);
    free(f.tg);
    free(f.rc);
    free(f.replies);
    free(f.ord);
    free(f.msgs);
    free(f.pos);
    cw_info("role fanout stopped");
    return 0;
}
