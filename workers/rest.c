/*
 * The rest role: a small HTTP/1.1 server that nginx proxies REST reads to
 * (history, conversations, groups). nginx authenticates the client and passes
 * the user in the X-Chat-User header; this server trusts only that header and
 * therefore listens on loopback (or a private network) only.
 *
 * One thread, epoll, non-blocking sockets, keep-alive, bounded request size.
 */
#include "chat_worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define REST_MAX_REQUEST  16384

typedef struct {
    int     fd;
    size_t  len;
    char    buf[REST_MAX_REQUEST];
} rest_conn_t;

typedef struct {
    const char *method;
    const char *path;      /* without the query */
    const char *query;     /* after '?', or "" */
    const char *user;      /* X-Chat-User, or NULL */
    const char *body;
    size_t      body_len;
} rest_req_t;

static void
send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;   /* the peer went away; the connection is closed by the caller */
        }
        p += w;
        n -= (size_t) w;
    }
}

static void
respond(int fd, int status, const char *reason, const char *json)
{
    char   head[256];
    size_t blen = strlen(json);
    int    n = snprintf(head, sizeof(head),
                        "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                        "Content-Length: %zu\r\n\r\n", status, reason, blen);
    send_all(fd, head, (size_t) n);
    send_all(fd, json, blen);
}

static void
route(int fd, const rest_req_t *rq)
{
    if (strcmp(rq->path, "/healthz") == 0) {
        respond(fd, 200, "OK", "{\"status\":\"ok\"}");
        return;
    }
    respond(fd, 404, "Not Found", "{\"type\":\"error\",\"code\":\"not_found\",\"message\":\"no such endpoint\"}");
}

/* Returns bytes consumed by a complete request, 0 if incomplete, -1 if bad. */
static ssize_t
parse_and_serve(rest_conn_t *c)
{
    char       *end, *line, *next, *sp1, *sp2, *q;
    size_t      head_len, clen = 0;
    rest_req_t  rq = {0};

    c->buf[c->len] = '\0';
    end = strstr(c->buf, "\r\n\r\n");
    if (end == NULL) return c->len >= REST_MAX_REQUEST - 1 ? -1 : 0;
    head_len = (size_t) (end - c->buf) + 4;
    *end = '\0';

    /* Wait for the whole body before the header is cut up in place. */
    for (line = strstr(c->buf, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "Content-Length:", 15) == 0) {
            clen = strtoul(line + 17, NULL, 10);
            break;
        }
    }
    if (clen > REST_MAX_REQUEST - head_len - 1) return -1;
    if (c->len < head_len + clen) {
        *end = '\r';
        return 0;
    }

    line = c->buf;
    next = strstr(line, "\r\n");
    if (next) *next = '\0';
    sp1 = strchr(line, ' ');
    if (sp1 == NULL) return -1;
    *sp1 = '\0';
    sp2 = strchr(sp1 + 1, ' ');
    if (sp2 == NULL) return -1;
    *sp2 = '\0';
    rq.method = line;
    rq.path = sp1 + 1;
    q = strchr(sp1 + 1, '?');
    if (q) { *q = '\0'; rq.query = q + 1; } else rq.query = "";

    while (next) {
        char *h = next + 2, *colon, *v;
        next = strstr(h, "\r\n");
        if (next) *next = '\0';
        colon = strchr(h, ':');
        if (colon == NULL) continue;
        *colon = '\0';
        v = colon + 1;
        while (*v == ' ' || *v == '\t') v++;
        if (strcasecmp(h, "X-Chat-User") == 0) rq.user = v;
    }
    rq.body = c->buf + head_len;
    rq.body_len = clen;
    route(c->fd, &rq);
    return (ssize_t) (head_len + clen);
}

int
cw_role_rest(const cw_config_t *cf)
{
    char                host[128];
    int                 port, lfd, ep, one = 1;
    struct sockaddr_in  sa;
    struct epoll_event  ev, evs[64];

    if (cw_parse_hostport(cf->rest_listen, host, sizeof(host), &port) != 0) {
        cw_error("bad rest_listen \"%s\"", cf->rest_listen);
        return 2;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t) port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        cw_error("rest_listen host must be an IPv4 address: %s", host);
        return 2;
    }
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *) &sa, sizeof(sa)) != 0 || listen(lfd, 512) != 0) {
        cw_error("listen on %s: %s", cf->rest_listen, strerror(errno));
        close(lfd);
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    cw_info("role rest listening on %s", cf->rest_listen);

    while (!cw_stop) {
        int n = epoll_wait(ep, evs, 64, 500);
        for (int i = 0; i < n; i++) {
            rest_conn_t *c = evs[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    c = calloc(1, sizeof(*c));
                    if (c == NULL) { close(fd); continue; }
                    c->fd = fd;
                    ev.events = EPOLLIN | EPOLLRDHUP;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(c->fd, c->buf + c->len, REST_MAX_REQUEST - 1 - c->len);
                if (r > 0) {
                    ssize_t used;
                    c->len += (size_t) r;
                    while ((used = parse_and_serve(c)) > 0) {
                        memmove(c->buf, c->buf + used, c->len - (size_t) used);
                        c->len -= (size_t) used;
                    }
                    if (used < 0) {
                        respond(c->fd, 400, "Bad Request",
                                "{\"type\":\"error\",\"code\":\"bad_request\",\"message\":\"malformed request\"}");
                        r = 0;
                    } else {
                        continue;
                    }
                }
                if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    free(c);
                }
                break;
            }
        }
    }
    close(ep);
    close(lfd);
    cw_info("role rest stopped");
    return 0;
}
