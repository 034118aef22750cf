/*
 * log.c - one line per event to stderr (and syslog when asked).
 *
 * Lines are "<time> <prog>[pid]: <text>" on stderr; callers write the
 * "<id> <module> <event> key=value" part. Output is a single write(2) per
 * line so concurrent writers (tests piping stderr) never interleave.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "config/log.h"

static const char *log_prog = "relay";
static bool log_syslog;
static int log_trace_mask;
static int log_pid;		/* cached: getpid(2) per line showed up in strace */

void
log_init(const char *progname, bool use_syslog, int trace_mask)
{
	log_prog = progname;
	log_pid = (int)getpid();
	log_syslog = use_syslog;
	log_trace_mask = trace_mask;
	if (use_syslog)
		openlog(progname, LOG_PID | LOG_NDELAY, LOG_MAIL);
}

void
log_set_trace(int trace_mask)
{
	log_trace_mask = trace_mask;
}

bool
log_tracing(int flag)
{
	return (log_trace_mask & flag) != 0;
}

/* log_append - vsnprintf into line at *n, clamping at the end */
static void
log_vappend(char *line, size_t *n, size_t cap, const char *fmt, va_list ap)
{
	int r;

	if (*n >= cap - 1)
		return;
	r = vsnprintf(line + *n, cap - *n, fmt, ap);
	if (r > 0)
		*n += (size_t)r < cap - *n ? (size_t)r : cap - *n - 1;
}

static void
log_append(char *line, size_t *n, size_t cap, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vappend(line, n, cap, fmt, ap);
	va_end(ap);
}

static void
log_emit(int prio, const char *errtext, const char *fmt, va_list ap)
{
	char line[4096];
	struct timespec ts;
	struct tm tm;
	size_t n, body;

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	n = strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%S", &tm);
	log_append(line, &n, sizeof line, ".%03ldZ %s[%d]: ",
	    ts.tv_nsec / 1000000, log_prog, log_pid ? log_pid : (int)getpid());
	body = n;
	log_vappend(line, &n, sizeof line, fmt, ap);
	if (errtext)
		log_append(line, &n, sizeof line, ": %s", errtext);
	if (n > sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	if (write(STDERR_FILENO, line, n) < 0) {
		/* nowhere else to report it */
	}
	if (log_syslog)
		syslog(prio, "%.*s", (int)(n - body - 1), line + body);
}

void
log_info(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_emit(LOG_INFO, NULL, fmt, ap);
	va_end(ap);
}

void
log_warn(const char *fmt, ...)
{
	va_list ap;
	const char *e = strerror(errno);

	va_start(ap, fmt);
	log_emit(LOG_WARNING, e, fmt, ap);
	va_end(ap);
}

void
log_warnx(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_emit(LOG_WARNING, NULL, fmt, ap);
	va_end(ap);
}

void
log_fatal(const char *fmt, ...)
{
	va_list ap;
	const char *e = strerror(errno);

	va_start(ap, fmt);
	log_emit(LOG_CRIT, e, fmt, ap);
	va_end(ap);
	exit(1);
}

void
log_fatalx(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_emit(LOG_CRIT, NULL, fmt, ap);
	va_end(ap);
	exit(1);
}

void
log_trace(int flag, const char *fmt, ...)
{
	va_list ap;

	if (!(log_trace_mask & flag))
		return;
	va_start(ap, fmt);
	log_emit(LOG_DEBUG, NULL, fmt, ap);
	va_end(ap);
}

void
relay_panic(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_emit(LOG_CRIT, NULL, fmt, ap);
	va_end(ap);
	abort();
}

const char *
log_value(char *out, size_t outlen, const char *s)
{
	bool plain = *s != '\0';
	size_t o = 0;

	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		if (*p <= ' ' || *p == '"' || *p == '\\' || *p == '=' ||
		    *p == 0x7f)
			plain = false;
	if (plain) {
		snprintf(out, outlen, "%s", s);
		return out;
	}
	if (outlen < 3) {
		if (outlen)
			out[0] = '\0';
		return out;
	}
	out[o++] = '"';
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		char esc[5];
		size_t el;

		if (*p == '"' || *p == '\\') {
			esc[0] = '\\';
			esc[1] = (char)*p;
			el = 2;
		} else if (*p < 0x20 || *p == 0x7f) {
			snprintf(esc, sizeof esc, "\\x%02x", *p);
			el = 4;
		} else {
			esc[0] = (char)*p;
			el = 1;
		}
		if (o + el + 2 > outlen)
			break;
		memcpy(out + o, esc, el);
		o += el;
	}
	out[o++] = '"';
	out[o] = '\0';
	return out;
}
