/*
 * Budgets of client actions shared by every worker process of this nginx:
 * token buckets in a shared memory zone (an rbtree by key with an LRU
 * queue, as nginx's limit_req keeps its states). A key is the action's
 * letter and the user id (and, for the typing interval, the target), so
 * every action of every user has a bucket of its own. When the zone is
 * full the least recently used buckets are dropped (those users start with
 * a full bucket again). Buckets count per nginx node by design: checking
 * them costs no Redis round trip, and a user's sessions across N nodes get
 * at most N budgets (bounded by chat_max_connections_per_user).
 */
#include "ngx_chat.h"


#define NGX_CHAT_RATE_ZONE_SIZE  (16 * 1024 * 1024)


typedef struct {
    u_char          color;
    u_char          len;
    u_char          pad[6];
    ngx_queue_t     queue;
    int64_t         ms;           /* last refill */
    int64_t         milli;        /* tokens x 1000 */
    u_char          data[1];
} ngx_chat_rate_node_t;


typedef struct {
    ngx_rbtree_t       rbtree;
    ngx_rbtree_node_t  sentinel;
    ngx_queue_t        queue;
} ngx_chat_rate_sh_t;


static ngx_chat_rate_sh_t  *ngx_chat_rate_sh;
static ngx_slab_pool_t     *ngx_chat_rate_pool;


static void
ngx_chat_rate_insert(ngx_rbtree_node_t *temp, ngx_rbtree_node_t *node,
    ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t     **p;
    ngx_chat_rate_node_t   *n, *t;

    for ( ;; ) {

        if (node->key != temp->key) {
            p = (node->key < temp->key) ? &temp->left : &temp->right;

        } else {
            n = (ngx_chat_rate_node_t *) &node->color;
            t = (ngx_chat_rate_node_t *) &temp->color;

            p = (ngx_memn2cmp(n->data, t->data, n->len, t->len) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


static ngx_int_t
ngx_chat_rate_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_slab_pool_t  *shpool;

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (data) {
        shm_zone->data = data;
        ngx_chat_rate_sh = data;
        ngx_chat_rate_pool = shpool;
        return NGX_OK;
    }

    ngx_chat_rate_sh = ngx_slab_alloc(shpool, sizeof(ngx_chat_rate_sh_t));
    if (ngx_chat_rate_sh == NULL) {
        return NGX_ERROR;
    }

    ngx_rbtree_init(&ngx_chat_rate_sh->rbtree, &ngx_chat_rate_sh->sentinel,
                    ngx_chat_rate_insert);
    ngx_queue_init(&ngx_chat_rate_sh->queue);

    shpool->log_nomem = 0;
    shm_zone->data = ngx_chat_rate_sh;
    ngx_chat_rate_pool = shpool;

    return NGX_OK;
}


ngx_int_t
ngx_chat_rate_add_zone(ngx_conf_t *cf)
{
    ngx_str_t        name = ngx_string("ngx_chat_rate");
    ngx_shm_zone_t  *zone;

    zone = ngx_shared_memory_add(cf, &name, NGX_CHAT_RATE_ZONE_SIZE,
                                 &ngx_chat_module);
    if (zone == NULL) {
        return NGX_ERROR;
    }

    zone->init = ngx_chat_rate_init_zone;

    return NGX_OK;
}


static ngx_chat_rate_node_t *
ngx_chat_rate_lookup(u_char *user, size_t len, uint32_t hash)
{
    ngx_int_t              rc;
    ngx_rbtree_node_t     *node, *sentinel;
    ngx_chat_rate_node_t  *rn;

    node = ngx_chat_rate_sh->rbtree.root;
    sentinel = ngx_chat_rate_sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash != node->key) {
            node = (hash < node->key) ? node->left : node->right;
            continue;
        }

        rn = (ngx_chat_rate_node_t *) &node->color;
        rc = ngx_memn2cmp(user, rn->data, len, (size_t) rn->len);

        if (rc == 0) {
            return rn;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


/* Drop the n least recently used buckets. */
static void
ngx_chat_rate_evict(ngx_uint_t n)
{
    ngx_queue_t           *q;
    ngx_rbtree_node_t     *node;
    ngx_chat_rate_node_t  *rn;

    while (n-- && !ngx_queue_empty(&ngx_chat_rate_sh->queue)) {
        q = ngx_queue_last(&ngx_chat_rate_sh->queue);
        ngx_queue_remove(q);

        rn = ngx_queue_data(q, ngx_chat_rate_node_t, queue);
        node = (ngx_rbtree_node_t *)
                   ((u_char *) rn - offsetof(ngx_rbtree_node_t, color));

        ngx_rbtree_delete(&ngx_chat_rate_sh->rbtree, node);
        ngx_slab_free_locked(ngx_chat_rate_pool, node);
    }
}


/*
 * Take n tokens from the bucket of key: 0, or the milliseconds until they
 * will be there (nothing is taken then). rate: tokens a minute (0: no
 * limit), burst: bucket size; n is at most burst.
 */
int64_t
ngx_chat_rate_take(ngx_uint_t rate, ngx_uint_t burst, u_char *user,
    size_t len, ngx_uint_t n)
{
    int64_t                now, refill, wait;
    uint32_t               hash;
    size_t                 size;
    ngx_rbtree_node_t     *node;
    ngx_chat_rate_node_t  *rn;

    if (rate == 0 || ngx_chat_rate_sh == NULL || len > 255) {
        return 0;
    }

    n = ngx_min(ngx_max(n, 1), burst);

    now = ngx_chat_now_ms();
    hash = ngx_crc32_short(user, len);

    ngx_shmtx_lock(&ngx_chat_rate_pool->mutex);

    rn = ngx_chat_rate_lookup(user, len, hash);

    if (rn == NULL) {
        size = offsetof(ngx_rbtree_node_t, color)
               + offsetof(ngx_chat_rate_node_t, data) + len;

        node = ngx_slab_alloc_locked(ngx_chat_rate_pool, size);
        if (node == NULL) {
            ngx_chat_rate_evict(16);
            node = ngx_slab_alloc_locked(ngx_chat_rate_pool, size);
        }

        if (node == NULL) {
            ngx_shmtx_unlock(&ngx_chat_rate_pool->mutex);
            return 0;            /* fail open: never refuse for our memory */
        }

        node->key = hash;
        rn = (ngx_chat_rate_node_t *) &node->color;
        rn->len = (u_char) len;
        ngx_memcpy(rn->data, user, len);
        rn->ms = now;
        rn->milli = (int64_t) burst * 1000;
        ngx_rbtree_insert(&ngx_chat_rate_sh->rbtree, node);

    } else {
        ngx_queue_remove(&rn->queue);
    }

    ngx_queue_insert_head(&ngx_chat_rate_sh->queue, &rn->queue);

    /* one token every 60000 / rate ms */
    refill = (now - rn->ms) * (int64_t) rate * 1000 / 60000;
    if (refill > 0) {
        rn->milli = ngx_min(rn->milli + refill, (int64_t) burst * 1000);
        rn->ms = now;
    }

    if (rn->milli >= (int64_t) n * 1000) {
        rn->milli -= (int64_t) n * 1000;
        wait = 0;

    } else {
        wait = ((int64_t) n * 1000 - rn->milli) * 60 / (int64_t) rate + 1;
    }

    ngx_shmtx_unlock(&ngx_chat_rate_pool->mutex);

    return wait;
}


/*
 * The budget of one action of one user (chat_limit): 0, or the
 * milliseconds until n more are allowed.
 */
int64_t
ngx_chat_limit(ngx_chat_loc_conf_t *conf, ngx_uint_t action, u_char *user,
    size_t ulen, ngx_uint_t n)
{
    u_char              key[1 + NGX_CHAT_USER_MAX];
    int64_t             wait;
    ngx_chat_limit_t   *l;

    l = &conf->limits[action];

    if (l->rate == 0 || ulen > NGX_CHAT_USER_MAX) {
        return 0;
    }

    key[0] = (u_char) ngx_chat_limit_names[action].data[0];
    ngx_memcpy(key + 1, user, ulen);

    wait = ngx_chat_rate_take(l->rate, l->burst, key, ulen + 1, n);

    if (wait) {
        ngx_chat_stat_limited(action);
        ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat: %V budget of %*s spent",
                       &ngx_chat_limit_names[action], ulen, user);
    }

    return wait;
}


/*
 * At most one relayed typing indicator per sender and conversation per
 * chat_typing_interval: 1 when this one may go, 0 when it is dropped.
 * Typing is repeated every few seconds while a user types, so a dropped
 * extra changes nothing a recipient sees.
 */
ngx_uint_t
ngx_chat_typing_allowed(ngx_chat_loc_conf_t *conf, u_char *user, size_t ulen,
    u_char *conv, size_t clen)
{
    u_char      key[2 + NGX_CHAT_USER_MAX + CHAT_CONV_MAX];
    ngx_uint_t  per_minute;

    if (conf->typing_interval == 0 || ulen > NGX_CHAT_USER_MAX
        || clen > CHAT_CONV_MAX)
    {
        return 1;
    }

    per_minute = ngx_max(60000 / conf->typing_interval, 1);

    key[0] = 'i';
    ngx_memcpy(key + 1, user, ulen);
    key[1 + ulen] = ' ';
    ngx_memcpy(key + 2 + ulen, conv, clen);

    if (ngx_chat_rate_take(per_minute, 1, key, ulen + 2 + clen, 1) == 0) {
        return 1;
    }

    ngx_chat_stat_inc(typing_dropped);

    return 0;
}
