/*
 * log.h - one line per event, key=value, to stderr and optionally syslog.
 *
 * Form: "<id> <module> <event> key=value ..." as OpenSMTPD does. Callers
 * format their own key=value pairs; log_value() quotes a value that contains
 * spaces, quotes or control bytes so a line always parses.
 */
#ifndef RELAY_LOG_H
#define RELAY_LOG_H

#include <stdbool.h>
#include <stddef.h>

enum log_trace_flag {
	TRACE_SMTP = 1 << 0,	/* submission session commands and replies */
	TRACE_IO = 1 << 1,	/* conn reads/writes and TLS */
	TRACE_SPOOL = 1 << 2,	/* spool commits and recovery */
	TRACE_DNS = 1 << 3,	/* resolver */
	TRACE_DLV = 1 << 4,	/* delivery client */
	TRACE_STATE = 1 << 5,	/* every state-machine transition */
};

/* log_init - set the program name, whether to also use syslog, trace mask */
void log_init(const char *progname, bool use_syslog, int trace_mask);
void log_set_trace(int trace_mask);
bool log_tracing(int flag);

void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* log_warn appends ": <strerror(errno)>", log_warnx does not */
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* log_fatal / log_fatalx - log and exit(1); for start-up environment failures */
void log_fatal(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));
void log_fatalx(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));
void log_trace(int flag, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* relay_panic - a bug: log and abort() */
void relay_panic(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));

/*
 * log_value - render s as a log value into out: bare if it is plain,
 * otherwise double-quoted with \" \\ and \xNN escapes; truncated to fit.
 */
const char *log_value(char *out, size_t outlen, const char *s);

#endif
