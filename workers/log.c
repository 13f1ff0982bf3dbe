/* Logging, clock and signal handling shared by every role. */
#include "chat_worker.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

volatile int cw_stop;

int64_t
cw_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void
cw_log(const char *level, const char *fmt, ...)
{
    char       buf[1024];
    struct tm  tm;
    time_t     t = time(NULL);
    va_list    ap;
    int        n;

    gmtime_r(&t, &tm);
    n = (int) strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
    n += snprintf(buf + n, sizeof(buf) - n, " [%s] chat-worker[%d]: ", level, (int) getpid());
    va_start(ap, fmt);
    if (n < (int) sizeof(buf)) {
        vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
    }
    va_end(ap);
    fprintf(stderr, "%s\n", buf);
}

static void
on_signal(int sig)
{
    (void) sig;
    cw_stop = 1;
}

void
cw_install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int64_t
cw_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void
cw_sleep_ms(int ms)
{
    while (ms > 0 && !cw_stop) {
        int step = ms < 100 ? ms : 100;
        usleep((useconds_t) step * 1000);
        ms -= step;
    }
}

void
cw_backoff_reset(cw_backoff_t *b)
{
    b->ms = 100;
}

int
cw_backoff_ms(const cw_backoff_t *b)
{
    return b->ms;
}

void
cw_backoff_wait(cw_backoff_t *b)
{
    if (b->ms < 100) b->ms = 100;
    cw_sleep_ms(b->ms);
    b->ms = b->ms < 2500 ? b->ms * 2 : 5000;
}
