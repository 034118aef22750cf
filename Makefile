# relay - one plain GNU Makefile (STYLE.md 19).
#
#   make            build relayd, relayctl, the test tools and unit tests
#   make run        install missing packages, build, run relayd on the
#                   built-in default configuration in the foreground
#   make test       install missing packages (with the tests' own: postfix,
#                   postgrey), build, run every test
#   make asan       the same build with ASan+UBSan in build-asan/
#   make test-asan  every test against the ASan+UBSan build
#   make bench      submission benchmark (docs/BENCHMARKS.md)
#   make bench-e2e  end to end: relayd vs a private Postfix into fake-mx
#   make bench-throttle  a rate-limited receiver: adaptive vs naive retries
#   make install    PREFIX=/usr/local DESTDIR=

PREFIX  ?= /usr/local
DESTDIR ?=
BUILD   ?= build
CC      ?= cc
PKGS     = libuv openssl libcares libconfig libpcre2-8

WARN     = -Wall -Wextra -Wstrict-prototypes -Wmissing-prototypes -Wshadow \
           -Wcast-qual -Wpointer-arith -Wno-unused-parameter -Werror
CFLAGS  ?= -O2 -g
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE -MMD -MP -I. $(WARN) $(CFLAGS) $(EXTRA_CFLAGS) \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LIBS     = $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lcrypt
LDFLAGS ?=

# Bottom layer: configuration and the shared runtime (util, log).
SRCS_CONFIG += config/util.c
SRCS_CONFIG += config/log.c
SRCS_CONFIG += config/config.c
SRCS_CONFIG += config/config_default.c

SRCS_TLS += tls/tls.c

SRCS_DNS += dns/dns.c

SRCS_QUEUE += queue/envelope.c
SRCS_QUEUE += queue/spool.c

SRCS_RELAY += relay/conn.c
SRCS_RELAY += relay/addrmap.c
SRCS_RELAY += relay/smtp_parse.c
SRCS_RELAY += relay/auth.c
SRCS_RELAY += relay/smtps_session.c
SRCS_RELAY += relay/listener.c
SRCS_RELAY += relay/control.c
SRCS_RELAY += relay/daemon.c
SRCS_RELAY += relay/dsn.c
SRCS_RELAY += relay/verdict.c
SRCS_RELAY += relay/dlv_session.c
SRCS_RELAY += relay/scheduler.c
SRCS_RELAY += relay/site.c

LIB_SRCS = $(SRCS_CONFIG) $(SRCS_TLS) $(SRCS_DNS) $(SRCS_QUEUE) $(SRCS_RELAY)
LIB_OBJS = $(LIB_SRCS:%.c=$(BUILD)/%.o)

UNIT_TESTS = $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(wildcard tests/unit/test_*.c))
TOOLS_BIN  = $(BUILD)/relayctl $(BUILD)/bench-submit $(BUILD)/fake-mx

all: $(BUILD)/relayd $(TOOLS_BIN) $(UNIT_TESTS)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(BUILD)/librelay.a: $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/relayd: $(BUILD)/relay/main.o $(BUILD)/librelay.a
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/relayctl: $(BUILD)/tools/relayctl.o $(BUILD)/librelay.a
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/bench-submit: $(BUILD)/tools/bench_submit.o $(BUILD)/librelay.a
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/fake-mx: $(BUILD)/tools/fake_mx.o $(BUILD)/librelay.a
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/tests/%: $(BUILD)/tests/unit/%.o $(BUILD)/librelay.a
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS)

deps:
	@tools/install-deps

# What the tests need on top: private Postfix and postgrey instances.
test-deps:
	@tools/install-deps --test

run: deps
	$(MAKE) all
	$(BUILD)/relayd -f -d

test: test-deps
	$(MAKE) all
	BUILD=$(BUILD) tests/run

asan:
	$(MAKE) BUILD=build-asan CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" LDFLAGS="-fsanitize=address,undefined" all

test-asan: test-deps asan
	BUILD=build-asan ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 tests/run

bench: deps
	$(MAKE) all
	tools/bench-submit.sh

bench-e2e: deps
	$(MAKE) all
	BUILD=$(BUILD) tools/bench-e2e.sh

bench-throttle: deps
	$(MAKE) all
	BUILD=$(BUILD) tools/bench-throttle.sh

check-style:
	@tools/check-style

install: $(BUILD)/relayd $(BUILD)/relayctl
	install -d $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/bin \
	    $(DESTDIR)$(PREFIX)/share/doc/relay
	install -m 755 $(BUILD)/relayd $(DESTDIR)$(PREFIX)/sbin/relayd
	install -m 755 $(BUILD)/relayctl $(DESTDIR)$(PREFIX)/bin/relayctl
	install -m 644 config/relay.conf.example $(DESTDIR)$(PREFIX)/share/doc/relay/

clean:
	rm -rf build build-asan

.PHONY: all deps test-deps run test asan test-asan bench bench-e2e bench-throttle check-style install clean
.SECONDARY:

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
