# ngx-chat build.
#   make               module (build/ngx_chat_module.so) and worker (build/chat-worker)
#   make test          scripts/setup if needed, C unit tests, short fuzz runs, pytest
#   make test-asan     the same with AddressSanitizer + UBSan builds
#   make test-cluster  only the Redis Cluster tests (module and workers; also in make test)
#   make install       module into nginx's modules dir, worker into $(BINDIR)
#   NGINX_SRC=<tree>   build the module against an upstream nginx source tree
#                      instead of Debian's nginx-dev (/usr/share/nginx/src)

SHELL := /bin/bash

NGINX_SRC  ?= /usr/share/nginx/src
BUILD      ?= build
SAN        ?=
CC         ?= gcc
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 10
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
MODULES_DIR ?= /usr/lib/nginx/modules

WARN      := -Wall -Wextra -Werror
ifeq ($(SAN),1)
SANFLAGS  := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
OPT       := -O1 -g
else
SANFLAGS  :=
OPT       := -O2 -g
endif

LUA_SRCS   := $(wildcard lua/*.lua) lua/gen.sh
MOD_SRCS   := $(wildcard ngx_chat_module/*.c ngx_chat_module/*/*.c) $(wildcard ngx_chat_module/*.h) \
              $(wildcard libchat/*.c libchat/*.h) config $(LUA_SRCS)
PURE_SRCS  := $(wildcard libchat/chat_*.c)
PURE_HDRS  := $(wildcard libchat/chat_*.h)
WORKER_SRCS := $(wildcard workers/*.c)
WORKER_HDRS := $(wildcard workers/*.h)
WORKER_PKGS := libmongoc-1.0 hiredis rdkafka jansson libcurl
# the module's pure code the workers link: JWT signing for the dev sign-in
WORKER_PURE := libchat/chat_jwt.c libchat/chat_json.c libchat/chat_proto.c libchat/chat_shard.c libchat/chat_url.c libchat/chat_entry.c \
               libchat/chat_cluster.c
UNIT_TESTS := $(patsubst t/unit/%.c,$(BUILD)/unit/%,$(wildcard t/unit/test_*.c))
FUZZERS    := $(patsubst t/fuzz/%.c,$(BUILD)/fuzz/%,$(wildcard t/fuzz/fuzz_*.c))

.PHONY: all module worker loadgen unit fuzz fuzz-build test test-asan test-cluster pytest lua-test setup install clean clients clients-test

all: module worker

# --- nginx module ------------------------------------------------------------
# Debian's nginx-dev ships a configure-able tree and the flags its nginx was
# built with (conf_flags): configuring a copy of it with the same flags makes
# a module binary-compatible with the stock nginx package (--with-compat).
# The module's file list is fixed at configure time: reconfigure when it changes.
MOD_LIST := $(sort $(wildcard ngx_chat_module/*.c ngx_chat_module/*/*.c ngx_chat_module/*.h libchat/*.c libchat/*.h lua/*.lua))
$(shell mkdir -p $(BUILD); [ "$$(cat $(BUILD)/.modlist 2>/dev/null)" = "$(MOD_LIST)" ] || echo "$(MOD_LIST)" > $(BUILD)/.modlist)

$(BUILD)/nginx/.configured: config $(BUILD)/.modlist
	rm -rf $(BUILD)/nginx && mkdir -p $(BUILD) && cp -r $(NGINX_SRC) $(BUILD)/nginx
	cd $(BUILD)/nginx && \
	  if [ -f conf_flags ]; then . ./conf_flags; else NGX_CONF_FLAGS=(--with-compat); fi; \
	  ./configure "$${NGX_CONF_FLAGS[@]}" \
	    --with-cc-opt="$(OPT) -fPIC $(WARN) -Wno-unused-parameter $(SANFLAGS)" \
	    --with-ld-opt="$(SANFLAGS)" \
	    --add-dynamic-module=$(CURDIR) >configure.log 2>&1 || { tail -30 configure.log; exit 1; }
	touch $@


$(BUILD)/ngx_chat_module.so: $(BUILD)/nginx/.configured $(MOD_SRCS)
	sh lua/gen.sh lua $(BUILD)/nginx/objs/chat_lua     # a changed script: configure ran it once
	$(MAKE) -s -C $(BUILD)/nginx -f objs/Makefile modules >/dev/null
	cp $(BUILD)/nginx/objs/ngx_chat_module.so $@.tmp && mv -f $@.tmp $@   # new inode: a running nginx keeps its mapping

module: $(BUILD)/ngx_chat_module.so

# --- the scripts' table (lua/<name>.lua -> chat_lua.c), for the workers ------
$(BUILD)/gen/chat_lua.c: $(LUA_SRCS)
	sh lua/gen.sh lua $(BUILD)/gen

# --- workers -----------------------------------------------------------------
$(BUILD)/chat-worker: $(WORKER_SRCS) $(WORKER_HDRS) $(PURE_SRCS) $(PURE_HDRS) $(BUILD)/gen/chat_lua.c
	@mkdir -p $(BUILD)
	$(CC) -std=c11 -D_GNU_SOURCE $(OPT) $(WARN) $(SANFLAGS) -Iworkers -Ilibchat -I$(BUILD)/gen \
	  $$(pkg-config --cflags $(WORKER_PKGS)) -o $@ $(WORKER_SRCS) $(WORKER_PURE) $(BUILD)/gen/chat_lua.c \
	  $$(pkg-config --libs $(WORKER_PKGS)) -lcrypto -lpthread -lm

worker: $(BUILD)/chat-worker

# --- load generator (benchmarks and the scale test) -------------------------
$(BUILD)/loadgen: $(wildcard bench/*.c) $(wildcard bench/*.h)
	@mkdir -p $(BUILD)
	$(CC) -std=c11 -O2 -g $(WARN) -o $@ $(wildcard bench/*.c) -lcrypto -lpthread

loadgen: $(BUILD)/loadgen

# --- C unit tests (cmocka) ----------------------------------------------------
$(BUILD)/unit/%: t/unit/%.c $(PURE_SRCS) $(PURE_HDRS)
	@mkdir -p $(BUILD)/unit
	$(CC) -std=c11 -D_GNU_SOURCE $(OPT) $(WARN) $(SANFLAGS) -Ilibchat -o $@ $< $(PURE_SRCS) -lcmocka -lcrypto -lhiredis

unit: $(UNIT_TESTS)
	@set -e; for t in $(UNIT_TESTS); do echo "== $$t"; $$t; done

# --- fuzzing (libFuzzer, clang) -----------------------------------------------
$(BUILD)/fuzz/%: t/fuzz/%.c $(PURE_SRCS) $(PURE_HDRS)
	@mkdir -p $(BUILD)/fuzz
	clang -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined -Ilibchat -o $@ $< $(PURE_SRCS) -lcrypto -lhiredis

fuzz-build: $(FUZZERS)

# A short run of every fuzz target, seeded from t/fuzz/corpus/<name> when present.
fuzz: $(FUZZERS)
	@set -e; for f in $(FUZZERS); do n=$$(basename $$f); n=$${n#fuzz_}; \
	  mkdir -p $(BUILD)/fuzz/corpus-$$n; seeds=""; [ -d t/fuzz/corpus/$$n ] && seeds=t/fuzz/corpus/$$n; \
	  echo "== $$f ($(FUZZ_SECONDS) s)"; \
	  $$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=0 $(BUILD)/fuzz/corpus-$$n $$seeds 2>$(BUILD)/fuzz/$$n.log \
	    || { tail -40 $(BUILD)/fuzz/$$n.log; exit 1; }; \
	  grep -E '^(#[0-9]+ *DONE|Done)' $(BUILD)/fuzz/$$n.log | tail -1; done

# --- JavaScript SDK (clients/js) and web app (clients/web) ------------------------
# clients/js/dist is what the web app imports (served at /sdk/ by the stack).
CLIENT_SRCS := $(wildcard clients/js/src/*.ts) clients/js/tsconfig.json clients/js/package-lock.json

clients/js/dist/index.js: $(CLIENT_SRCS)
	cd clients/js && npx --no-install tsc -p tsconfig.json

clients: clients/js/dist/index.js

# unit tests of the SDK's logic (no server); the integration and browser
# tests need a stack and run under pytest (t/test_clients.py)
clients-test: clients
	cd clients/js && node --test --test-timeout=60000 test/unit/

# --- the whole suite ------------------------------------------------------------
setup:
	@bash -c '. scripts/lib.sh; setup_done' || scripts/setup --no-build

# every Redis script on its own against a bare redis-server (about a second)
lua-test:
	.venv/bin/pytest -q t/lua

# A known defect, not a passing test: after a master is killed the module
# sometimes keeps answering new sessions 503 for over a minute (1 run of
# about 5 here; docs/SCALING.md "Known defects"). It stays in
# make test-cluster; make test leaves it out until it is fixed.
PYTEST_FLAKY := --deselect t/test_cluster.py::test_a_master_killed_fails_over_and_the_module_follows

pytest:
	.venv/bin/pytest -q t --ignore=t/lua $(PYTEST_FLAKY) $(PYTEST_ARGS)

# only the Redis Cluster tests (part of `make test` too): the module on a
# 6-node cluster stack (t/test_cluster.py) and the worker roles on a
# cluster of their own (t/test_cluster_workers.py), two nginx nodes and two
# fan-out workers on the cluster stack (t/test_cluster_nodes.py), and the
# failover durability of chat_redis_replicas (t/test_cluster_durability.py),
# the combined fault run on it (t/test_cluster_faults.py), and the messaging
# and groups suites on the cluster stack (the modules marked
# topologies("single", "cluster"); `make pytest` runs them on both), both queues
CLUSTER_SUITES := t/test_messaging.py t/test_groups.py t/test_groups_api.py
test-cluster: setup
	$(MAKE) all
	CHAT_TEST_TOPOLOGIES=cluster .venv/bin/pytest -q t/test_cluster.py t/test_cluster_nodes.py t/test_cluster_workers.py \
	  t/test_cluster_durability.py t/test_cluster_faults.py $(CLUSTER_SUITES) $(PYTEST_ARGS)

test: setup
	$(MAKE) lua-test
	$(MAKE) all loadgen unit fuzz clients-test
	$(MAKE) pytest

test-asan: setup
	$(MAKE) SAN=1 BUILD=build/asan all unit
	$(MAKE) loadgen
	NGX_CHAT_SAN=1 NGX_CHAT_MODULE=$(CURDIR)/build/asan/ngx_chat_module.so \
	  NGX_CHAT_WORKER=$(CURDIR)/build/asan/chat-worker .venv/bin/pytest -q t $(PYTEST_ARGS)

install: all
	install -d $(DESTDIR)$(MODULES_DIR) $(DESTDIR)$(BINDIR)
	install -m 0644 $(BUILD)/ngx_chat_module.so $(DESTDIR)$(MODULES_DIR)/
	install -m 0755 $(BUILD)/chat-worker $(DESTDIR)$(BINDIR)/

clean:
	rm -rf build
