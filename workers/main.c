/*
 * chat-worker [--config FILE] (--check | --role fanout|persist|rest|push)
 */
#include "chat_worker.h"

#include <mongoc/mongoc.h>
#include <stdio.h>
#include <string.h>

static void
usage(void)
{
    fprintf(stderr,
        "usage: chat-worker [--config FILE] --check\n"
        "       chat-worker [--config FILE] --role fanout|persist|rest|push\n"
        "Environment overrides: REDIS_URL, KAFKA_BROKERS, MONGO_URI, CHAT_QUEUE\n");
}

int
main(int argc, char **argv)
{
    const char  *config = NULL, *role = NULL;
    int          check = 0, i, rc;
    cw_config_t  cf;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) config = argv[++i];
        else if (strcmp(argv[i], "--role") == 0 && i + 1 < argc) role = argv[++i];
        else if (strcmp(argv[i], "--check") == 0) check = 1;
        else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) { usage(); return 0; }
        else { usage(); return 2; }
    }
    if (!check && role == NULL) { usage(); return 2; }
    if (cw_config_load(&cf, config) != 0) return 2;

    mongoc_init();
    cw_install_signals();

    if (check) rc = cw_check(&cf);
    else if (strcmp(role, "fanout") == 0) rc = cw_role_fanout(&cf);
    else if (strcmp(role, "persist") == 0) rc = cw_role_persist(&cf);
    else if (strcmp(role, "rest") == 0) rc = cw_role_rest(&cf);
    else if (strcmp(role, "push") == 0) rc = cw_role_push(&cf);
    else { usage(); rc = 2; }

    mongoc_cleanup();
    return rc;
}
