/*
 * NAME
 *	bench_submit.c - a libuv load generator for relayd's submission port
 *
 * SUMMARY
 *	bench-submit [-H 127.0.0.x] -p port [-c conns] [-n msgs] [-s size]
 *	    [-m msgs-per-conn] [-t timeout-s] [-P relayd-pid] [-j] [-v]
 *
 * DESCRIPTION
 *	Opens -c plain-text SMTP connections to a listener with tls "none"
 *	and no AUTH requirement (the client must be in relay_networks), and
 *	sends -n messages of -s octets in total over them. Per connection:
 *	wait for the 220, EHLO once (PIPELINING must be advertised), then per
 *	message MAIL FROM, RCPT TO and DATA in one write, the three replies,
 *	the body (headers, filler lines of 76 characters, dot-stuffed where
 *	a line starts with '.') and ".\r\n" in one write, and the final
 *	reply. After -m messages (0 = never) the client says QUIT and opens
 *	a new connection.
 *
 *	Latency is measured per message from the moment the final "." is in
 *	the kernel (uv_try_write took everything, or the uv_write callback
 *	ran) to the moment the final reply is parsed, with the monotonic
 *	nanosecond clock (uv_hrtime). relayd answers that reply only after
 *	the message is fsync'd, so this is the commit latency seen by a
 *	client.
 *
 *	With -P the daemon's peak RSS (VmHWM) is reset before the run by
 *	writing "5" to /proc/<pid>/clear_refs (best effort) and read at the
 *	end, and its CPU time (utime + stime of all threads) is sampled
 *	before and after, so the figures belong to this run only.
 *
 * INVARIANTS
 *	Every message index below -n is handed out once; each ends as
 *	exactly one ok or one failure (with the reply code, or "conn",
 *	"proto", "timeout", "aborted"); indices never handed out are
 *	reported as not sent. Every loop is bounded: the line buffer has a
 *	hard size, reconnections after errors are capped and the whole run
 *	is cut off after -t seconds. Only 127.0.0.x is accepted as a target.
 *
 * ERRORS
 *	Exit 0 when every message got a 2xx, 1 when some failed, 2 when the
 *	run timed out or could not reach the server, 64 on a usage error.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <uv.h>

#include "config/util.h"

#define BENCH_LINE_MAX		4096	/* longest reply line we accept */
#define BENCH_MAX_TOTAL		10000000ULL	/* cap on -n (latency array) */
#define BENCH_MAX_CONNS		10000	/* cap on -c */
#define BENCH_MAX_SIZE		(256u * 1024 * 1024)	/* cap on -s */
#define BENCH_MAX_TIMEOUT	86400.0	/* cap on -t, seconds */
#define BENCH_LINE_CHARS	76	/* filler line length before CRLF */
#define BENCH_MAX_CONN_ERRORS	100	/* connection failures before giving up */
#define BENCH_NCODES		1000	/* reply codes 0..999 */

#define EX_FAILED	1
#define EX_INCOMPLETE	2
#define EX_USAGE_	64

enum bench_state {
	BENCH_ST_IDLE,		/* no socket */
	BENCH_ST_CONNECT,	/* TCP connect in progress */
	BENCH_ST_GREETING,	/* waiting for the 220 */
	BENCH_ST_EHLO,		/* waiting for the EHLO reply */
	BENCH_ST_ENVELOPE,	/* waiting for the MAIL, RCPT, DATA replies */
	BENCH_ST_BODY,		/* body sent, waiting for the final reply */
	BENCH_ST_QUIT,		/* waiting for the 221 */
	BENCH_ST_CLOSING,	/* uv_close called */
	BENCH_ST_LAST
};

static const char *const bench_state_names[] = {
	[BENCH_ST_IDLE] = "IDLE",
	[BENCH_ST_CONNECT] = "CONNECT",
	[BENCH_ST_GREETING] = "GREETING",
	[BENCH_ST_EHLO] = "EHLO",
	[BENCH_ST_ENVELOPE] = "ENVELOPE",
	[BENCH_ST_BODY] = "BODY",
	[BENCH_ST_QUIT] = "QUIT",
	[BENCH_ST_CLOSING] = "CLOSING",
};
_Static_assert(ARRAY_SIZE(bench_state_names) == BENCH_ST_LAST,
    "state names out of sync");

/* Failures that have no reply code. */
enum bench_fail {
	BENCH_FAIL_CONN,	/* connection lost or refused mid-message */
	BENCH_FAIL_PROTO,	/* unparsable or unexpected reply */
	BENCH_FAIL_TIMEOUT,	/* still in flight when -t expired */
	BENCH_FAIL_ABORT,	/* still in flight when the run was abandoned */
	BENCH_FAIL_LAST
};

static const char *const bench_fail_names[] = {
	[BENCH_FAIL_CONN] = "conn",
	[BENCH_FAIL_PROTO] = "proto",
	[BENCH_FAIL_TIMEOUT] = "timeout",
	[BENCH_FAIL_ABORT] = "aborted",
};
_Static_assert(ARRAY_SIZE(bench_fail_names) == BENCH_FAIL_LAST,
    "failure names out of sync");

struct bench_opts {
	const char *host;	/* target address, 127.0.0.x only */
	int port;		/* target port */
	unsigned conns;		/* concurrent connections */
	uint64_t total;		/* messages to send in all */
	size_t size;		/* message size in octets, before stuffing */
	unsigned per_conn;	/* messages per connection, 0 = unlimited */
	double timeout_s;	/* the whole run is cut off after this */
	long pid;		/* relayd pid for RSS and CPU, 0 = none */
	bool json;		/* print one JSON line instead of text */
	bool verbose;		/* trace state changes and closes to stderr */
};

struct bench;

struct bench_client {
	uv_tcp_t tcp;		/* embedded; re-initialised per connection */
	uv_connect_t creq;	/* the pending connect */
	struct bench *b;	/* owner */
	unsigned idx;		/* position in b->clients, for messages */
	enum bench_state state;	/* see bench_enter_state */
	char in[BENCH_LINE_MAX];	/* received bytes not yet parsed */
	size_t inlen;		/* bytes used in in[] */
	bool pipelining;	/* EHLO advertised PIPELINING */
	bool has_msg;		/* msg is in flight */
	uint64_t msg;		/* index of the message in flight */
	unsigned nreplies;	/* envelope replies received (0..3) */
	int env_fail;		/* first failing envelope code, 0 if none */
	bool dot_sent;		/* t_dot is valid: the final "." is out */
	uint64_t t_dot;		/* uv_hrtime() when the "." left */
	unsigned on_conn;	/* messages started on this connection */
};

/* One heap block per uv_write: the small part is copied, the big part
 * points into the shared body, which lives until exit. */
struct bench_wreq {
	uv_write_t req;		/* req.data = the client */
	bool marks_dot;		/* completion means the "." is out */
	const char *big;	/* shared bytes after data[], may be NULL */
	size_t biglen;		/* length of big */
	size_t len;		/* length of data[] */
	char data[];		/* the copied small part */
};

struct bench {
	uv_loop_t *loop;	/* the default loop */
	struct bench_opts o;	/* options */
	struct sockaddr_in addr;	/* target */
	struct bench_client *clients;	/* o.conns of them, never moved */
	unsigned nopen;		/* clients with a handle not yet closed */
	uv_timer_t timer;	/* the -t cut-off */
	bool stopping;		/* no new messages or connections */
	bool timed_out;		/* the cut-off fired */
	uint64_t next_msg;	/* next message index to hand out */
	uint64_t nok;		/* messages answered 2xx */
	uint64_t nfailed;	/* messages failed, any reason */
	uint64_t *lat;		/* latencies of ok messages, ns, nok used */
	uint64_t fail_code[BENCH_NCODES];	/* failures by reply code */
	uint64_t fail_other[BENCH_FAIL_LAST];	/* failures without a code */
	unsigned conn_errors;	/* connections lost or refused */
	uint64_t connects;	/* connections established */
	char *body;		/* shared: filler lines + ".\r\n", stuffed */
	size_t bodylen;		/* length of body */
	size_t hdrlen;		/* length of the per-message header block */
	uint64_t t_start;	/* uv_hrtime() at start */
	uint64_t t_end;		/* uv_hrtime() when the last client closed */
	char error[256];	/* the last connection-level error */
};

static void usage(void);
static int bench_parse_u64(const char *s, uint64_t min, uint64_t max,
    uint64_t *out);
static void bench_build_body(struct bench *b);
static size_t bench_header_format(uint64_t msg, char *out,
    size_t outlen);
static void bench_enter_state(struct bench_client *c, enum bench_state st);
static void bench_client_connect(struct bench_client *c);
static void bench_client_close(struct bench_client *c, const char *reason);
static void bench_client_fail(struct bench_client *c, const char *why);
static void bench_send(struct bench_client *c, const char *small,
    size_t smalllen, const char *big, size_t biglen, bool marks_dot);
static void bench_next(struct bench_client *c);
static void bench_msg_fail(struct bench_client *c, int code,
    enum bench_fail why);
static void bench_msg_ok(struct bench_client *c);
static void bench_on_reply(struct bench_client *c, int code, bool last,
    const char *text);
static void bench_parse_input(struct bench_client *c);
static void bench_stop(struct bench *b, const char *why);
static void bench_report(struct bench *b, const uint64_t *cpu_before,
    uint64_t *cpu_after);
static int bench_proc_cpu(long pid, uint64_t *ticks);
static long bench_proc_status_kb(long pid, const char *key);
static void bench_proc_reset_peak(long pid);
static int bench_cmp_u64(const void *a, const void *b);
static double bench_pct_ms(const uint64_t *v, uint64_t n, double pct);

static void bench_on_connect(uv_connect_t *req, int status);
static void bench_on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void bench_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void bench_on_write_done(uv_write_t *req, int status);
static void bench_on_closed(uv_handle_t *h);
static void bench_on_timeout(uv_timer_t *t);
static void bench_on_timer_closed(uv_handle_t *h);

static void
usage(void)
{
	fprintf(stderr,
	    "usage: bench-submit [-H 127.0.0.x] -p port [-c conns] [-n msgs]"
	    " [-s size]\n"
	    "                    [-m msgs-per-conn] [-t timeout-s]"
	    " [-P relayd-pid] [-j] [-v]\n"
	    "  -H  target address, 127.0.0.x only (127.0.0.1)\n"
	    "  -p  target port (required)\n"
	    "  -c  concurrent connections (50)\n"
	    "  -n  messages in total (20000)\n"
	    "  -s  message size in octets (2048)\n"
	    "  -m  messages per connection before QUIT and reconnect"
	    " (0 = unlimited)\n"
	    "  -t  overall timeout in seconds (300)\n"
	    "  -P  relayd pid: report its peak RSS and CPU time\n"
	    "  -j  print one JSON line\n"
	    "  -v  trace connections to stderr\n");
	exit(EX_USAGE_);
}

/* bench_parse_u64 - strict decimal in [min, max]; 0 or -EINVAL */
static int
bench_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (*s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end != '\0' || v < min || v > max)
		return -EINVAL;
	*out = v;
	return 0;
}

/*
 * bench_build_body - the shared part of every message: filler lines after
 * the header block, dot-stuffed, then ".\r\n". The header block has a fixed
 * length (the message number is zero-padded), so every message is exactly
 * o.size octets as the server counts them (after unstuffing).
 */
static void
bench_build_body(struct bench *b)
{
	static const char alphabet[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
	char hdr[1024];
	size_t rem, cap, len, k, line = 0;
	bool dot;
	char *p;

	b->hdrlen = bench_header_format(0, hdr, sizeof hdr);
	rem = b->o.size - b->hdrlen;	/* checked >= 2 by main */
	/* Worst case: every line stuffed (one extra octet per line). */
	cap = rem + rem / 2 + 3 + 1;
	p = b->body = xmalloc(cap);
	while (rem > 0) {
		/* A line is 2..78 octets; never leave a 1-octet remainder. */
		len = BENCH_LINE_CHARS + 2;
		if (rem < len)
			len = rem;
		else if (rem == len + 1)
			len--;
		/* Every 16th line starts with a dot, to exercise stuffing. */
		dot = len > 2 && line % 16 == 5;
		if (dot)
			*p++ = '.';	/* the stuffed extra dot */
		for (k = 0; k + 2 < len; k++)
			p[k] = alphabet[(line + k) % (sizeof alphabet - 1)];
		if (dot)
			p[0] = '.';
		p += len - 2;
		*p++ = '\r';
		*p++ = '\n';
		rem -= len;
		line++;
	}
	memcpy(p, ".\r\n", 3);
	p += 3;
	b->bodylen = (size_t)(p - b->body);
}

/* bench_header_format - the header block of message msg; its length */
static size_t
bench_header_format(uint64_t msg, char *out, size_t outlen)
{
	int n;

	n = snprintf(out, outlen,
	    "From: Bench <bench@example.com>\r\n"
	    "To: <rcpt@example.net>\r\n"
	    "Subject: bench message %010" PRIu64 "\r\n"
	    "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
	    "Message-ID: <%010" PRIu64 ".%ld@bench.example>\r\n"
	    "\r\n", msg, msg, (long)getpid() % 1000000);
	if (n < 0 || (size_t)n >= outlen)
		abort();	/* fixed format, cannot happen */
	return (size_t)n;
}

/* bench_enter_state - the only assignment of c->state; traced with -v */
static void
bench_enter_state(struct bench_client *c, enum bench_state st)
{
	if (c->b->o.verbose && c->state != st)
		fprintf(stderr, "bench-submit: client %u %s -> %s\n", c->idx,
		    bench_state_names[c->state], bench_state_names[st]);
	c->state = st;
}

/* bench_client_connect - open a new connection for c */
static void
bench_client_connect(struct bench_client *c)
{
	int rc;

	uv_tcp_init(c->b->loop, &c->tcp);
	c->tcp.data = c;
	c->b->nopen++;
	c->inlen = 0;
	c->on_conn = 0;
	c->pipelining = false;
	bench_enter_state(c, BENCH_ST_CONNECT);
	uv_tcp_nodelay(&c->tcp, 1);
	rc = uv_tcp_connect(&c->creq, &c->tcp,
	    (const struct sockaddr *)&c->b->addr, bench_on_connect);
	if (rc < 0)
		bench_client_fail(c, uv_strerror(rc));
}

/* bench_client_close - idempotent; fails the message in flight, if any */
static void
bench_client_close(struct bench_client *c, const char *reason)
{
	if (c->state == BENCH_ST_CLOSING || c->state == BENCH_ST_IDLE)
		return;
	if (c->b->o.verbose)
		fprintf(stderr, "bench-submit: client %u close reason=\"%s\"\n",
		    c->idx, reason);
	if (c->has_msg)
		bench_msg_fail(c, 0, c->b->timed_out ? BENCH_FAIL_TIMEOUT :
		    c->b->stopping ? BENCH_FAIL_ABORT : BENCH_FAIL_CONN);
	bench_enter_state(c, BENCH_ST_CLOSING);
	uv_close((uv_handle_t *)&c->tcp, bench_on_closed);
}

/* bench_client_fail - an abnormal end of a connection: count, note, close */
static void
bench_client_fail(struct bench_client *c, const char *why)
{
	struct bench *b = c->b;

	if (c->state == BENCH_ST_CLOSING || c->state == BENCH_ST_IDLE)
		return;
	b->conn_errors++;
	snprintf(b->error, sizeof b->error, "connection lost in state %s: %s",
	    bench_state_names[c->state], why);
	bench_client_close(c, why);
}

static void
bench_on_closed(uv_handle_t *h)
{
	struct bench_client *c = h->data;
	struct bench *b = c->b;

	bench_enter_state(c, BENCH_ST_IDLE);
	b->nopen--;
	if (!b->stopping && b->next_msg < b->o.total) {
		if (b->conn_errors >= BENCH_MAX_CONN_ERRORS) {
			bench_stop(b, "too many connection errors");
		} else {
			bench_client_connect(c);
			return;
		}
	}
	if (b->nopen == 0) {
		b->t_end = uv_hrtime();
		if (!uv_is_closing((uv_handle_t *)&b->timer))
			uv_close((uv_handle_t *)&b->timer,
			    bench_on_timer_closed);
	}
}

static void
bench_on_connect(uv_connect_t *req, int status)
{
	struct bench_client *c = container_of(req, struct bench_client, creq);
	int rc;

	if (status == UV_ECANCELED || c->state != BENCH_ST_CONNECT)
		return;
	if (status < 0) {
		bench_client_fail(c, uv_strerror(status));
		return;
	}
	c->b->connects++;
	bench_enter_state(c, BENCH_ST_GREETING);
	if ((rc = uv_read_start((uv_stream_t *)&c->tcp, bench_on_alloc,
	    bench_on_read)) < 0)
		bench_client_fail(c, uv_strerror(rc));
}

static void
bench_on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	struct bench_client *c = h->data;

	(void)hint;	/* replies are short; the line buffer is the limit */
	/* Never full here: bench_parse_input rejects a full buffer. */
	*buf = uv_buf_init(c->in + c->inlen,
	    (unsigned int)(sizeof c->in - c->inlen));
}

static void
bench_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	struct bench_client *c = s->data;

	(void)buf;	/* always c->in + c->inlen, see bench_on_alloc */
	if (c->state == BENCH_ST_CLOSING || c->state == BENCH_ST_IDLE)
		return;
	if (nread < 0) {
		/* EOF after QUIT is the normal end; otherwise it is an error. */
		if (c->state == BENCH_ST_QUIT)
			bench_client_close(c, "eof");
		else
			bench_client_fail(c, uv_strerror((int)nread));
		return;
	}
	c->inlen += (size_t)nread;
	bench_parse_input(c);
}

/* bench_parse_input - hand every complete reply line to bench_on_reply */
static void
bench_parse_input(struct bench_client *c)
{
	size_t off = 0;
	char *nl;

	while (c->state != BENCH_ST_CLOSING &&
	    (nl = memchr(c->in + off, '\n', c->inlen - off)) != NULL) {
		char *line = c->in + off;
		size_t len = (size_t)(nl - line);
		int code;

		off += len + 1;
		if (len > 0 && line[len - 1] == '\r')
			len--;
		line[len] = '\0';
		if (len < 3 || line[0] < '1' || line[0] > '5' ||
		    line[1] < '0' || line[1] > '9' ||
		    line[2] < '0' || line[2] > '9' ||
		    (len > 3 && line[3] != ' ' && line[3] != '-')) {
			if (c->has_msg)
				bench_msg_fail(c, 0, BENCH_FAIL_PROTO);
			bench_client_fail(c, "unparsable reply");
			return;
		}
		code = (line[0] - '0') * 100 + (line[1] - '0') * 10 +
		    (line[2] - '0');
		bench_on_reply(c, code, len == 3 || line[3] == ' ',
		    len > 4 ? line + 4 : "");
	}
	if (c->state == BENCH_ST_CLOSING)
		return;
	if (off > 0) {
		memmove(c->in, c->in + off, c->inlen - off);
		c->inlen -= off;
	}
	if (c->inlen == sizeof c->in) {
		if (c->has_msg)
			bench_msg_fail(c, 0, BENCH_FAIL_PROTO);
		bench_client_fail(c, "reply line too long");
	}
}

/* bench_on_reply - one reply line; only the last line of a reply acts */
static void
bench_on_reply(struct bench_client *c, int code, bool last, const char *text)
{
	struct bench *b = c->b;

	switch (c->state) {
	case BENCH_ST_GREETING:
		if (!last)
			return;
		if (code != 220) {
			bench_client_fail(c, text);
			return;
		}
		bench_enter_state(c, BENCH_ST_EHLO);
		bench_send(c, "EHLO bench.example\r\n", 20, NULL, 0, false);
		return;
	case BENCH_ST_EHLO:
		if (str_ieqn(text, "PIPELINING", 10) &&
		    (text[10] == '\0' || text[10] == ' '))
			c->pipelining = true;
		if (!last)
			return;
		if (code != 250 || !c->pipelining) {
			snprintf(b->error, sizeof b->error, code != 250 ?
			    "EHLO refused: %d %s" :
			    "server does not advertise PIPELINING", code, text);
			bench_stop(b, b->error);
			return;
		}
		bench_next(c);
		return;
	case BENCH_ST_ENVELOPE:
		if (!last)
			return;
		c->nreplies++;
		if (code == 421) {		/* the server is closing */
			bench_msg_fail(c, code, 0);
			bench_client_close(c, "421");
			return;
		}
		if (c->nreplies < 3) {		/* MAIL, RCPT */
			if (code / 100 != 2 && c->env_fail == 0)
				c->env_fail = code;
			return;
		}
		/* The DATA reply. */
		if (code == 354 && c->env_fail == 0) {
			char hdr[1024];
			size_t n = bench_header_format(c->msg, hdr,
			    sizeof hdr);

			bench_enter_state(c, BENCH_ST_BODY);
			c->dot_sent = false;
			bench_send(c, hdr, n, b->body, b->bodylen, true);
			return;
		}
		if (code == 354) {
			/* 354 after a refused MAIL or RCPT: end the empty body. */
			bench_enter_state(c, BENCH_ST_BODY);
			bench_send(c, ".\r\n", 3, NULL, 0, false);
			return;
		}
		bench_msg_fail(c, c->env_fail ? c->env_fail : code, 0);
		bench_next(c);
		return;
	case BENCH_ST_BODY:
		if (!last)
			return;
		if (c->env_fail)
			bench_msg_fail(c, c->env_fail, 0);
		else if (code / 100 == 2)
			bench_msg_ok(c);
		else
			bench_msg_fail(c, code, 0);
		if (code == 421) {
			bench_client_close(c, "421");
			return;
		}
		bench_next(c);
		return;
	case BENCH_ST_QUIT:
		if (last)
			bench_client_close(c, "quit");
		return;
	default:
		/* A reply nobody asked for (e.g. 421 while idle). */
		if (last)
			bench_client_fail(c, text);
		return;
	}
}

/* bench_next - start the next message on c, or QUIT */
static void
bench_next(struct bench_client *c)
{
	struct bench *b = c->b;
	char cmd[256];
	int n;

	if (b->stopping || b->next_msg >= b->o.total ||
	    (b->o.per_conn && c->on_conn >= b->o.per_conn)) {
		bench_enter_state(c, BENCH_ST_QUIT);
		bench_send(c, "QUIT\r\n", 6, NULL, 0, false);
		return;
	}
	c->msg = b->next_msg++;
	c->has_msg = true;
	c->on_conn++;
	c->nreplies = 0;
	c->env_fail = 0;
	c->dot_sent = false;
	n = snprintf(cmd, sizeof cmd,
	    "MAIL FROM:<bench@example.com> SIZE=%zu\r\n"
	    "RCPT TO:<rcpt%" PRIu64 "@example.net>\r\n"
	    "DATA\r\n", b->o.size, c->msg);
	bench_enter_state(c, BENCH_ST_ENVELOPE);
	bench_send(c, cmd, (size_t)n, NULL, 0, false);
}

/*
 * bench_send - write small (copied) then big (shared, must outlive the
 * write). uv_try_write first: when the kernel takes everything, the bytes
 * are out now, which is when a "." counts as sent; the rest goes through
 * one uv_write whose callback marks the time instead.
 */
static void
bench_send(struct bench_client *c, const char *small, size_t smalllen,
    const char *big, size_t biglen, bool marks_dot)
{
	struct bench_wreq *w;
	uv_buf_t bufs[2];
	size_t done = 0;
	unsigned nb = 0;
	int rc;

	bufs[nb++] = uv_buf_init((char *)(uintptr_t)small,
	    (unsigned int)smalllen);
	if (biglen)
		bufs[nb++] = uv_buf_init((char *)(uintptr_t)big,
		    (unsigned int)biglen);
	rc = uv_try_write((uv_stream_t *)&c->tcp, bufs, nb);
	if (rc >= 0)
		done = (size_t)rc;
	else if (rc != UV_EAGAIN && rc != UV_ENOSYS) {
		bench_client_fail(c, uv_strerror(rc));
		return;
	}
	if (done == smalllen + biglen) {
		if (marks_dot) {
			c->t_dot = uv_hrtime();
			c->dot_sent = true;
		}
		return;
	}
	/* Copy what is left of the small part; point at the rest of big. */
	if (done < smalllen) {
		w = xmalloc(sizeof *w + smalllen - done);
		w->len = smalllen - done;
		memcpy(w->data, small + done, w->len);
		w->big = big;
		w->biglen = biglen;
	} else {
		w = xmalloc(sizeof *w);
		w->len = 0;
		w->big = big + (done - smalllen);
		w->biglen = biglen - (done - smalllen);
	}
	w->marks_dot = marks_dot;
	w->req.data = c;
	nb = 0;
	if (w->len)
		bufs[nb++] = uv_buf_init(w->data, (unsigned int)w->len);
	if (w->biglen)
		bufs[nb++] = uv_buf_init((char *)(uintptr_t)w->big,
		    (unsigned int)w->biglen);
	if ((rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs, nb,
	    bench_on_write_done)) < 0) {
		free(w);
		bench_client_fail(c, uv_strerror(rc));
	}
}

static void
bench_on_write_done(uv_write_t *req, int status)
{
	struct bench_wreq *w = container_of(req, struct bench_wreq, req);
	struct bench_client *c = req->data;
	bool marks_dot = w->marks_dot;

	free(w);		/* always, even on UV_ECANCELED */
	if (status == UV_ECANCELED || c->state == BENCH_ST_CLOSING)
		return;
	if (status < 0) {
		bench_client_fail(c, uv_strerror(status));
		return;
	}
	/* The reply cannot precede the "."; guard anyway. */
	if (marks_dot && c->state == BENCH_ST_BODY && !c->dot_sent) {
		c->t_dot = uv_hrtime();
		c->dot_sent = true;
	}
}

/* bench_msg_ok - record the latency of the message in flight */
static void
bench_msg_ok(struct bench_client *c)
{
	struct bench *b = c->b;
	uint64_t now = uv_hrtime();

	if (!c->has_msg)
		return;
	c->has_msg = false;
	b->lat[b->nok++] = c->dot_sent && now > c->t_dot ? now - c->t_dot : 0;
}

/* bench_msg_fail - count the message in flight as failed, by code or why */
static void
bench_msg_fail(struct bench_client *c, int code, enum bench_fail why)
{
	struct bench *b = c->b;

	if (!c->has_msg)
		return;
	c->has_msg = false;
	b->nfailed++;
	if (code > 0 && code < BENCH_NCODES)
		b->fail_code[code]++;
	else
		b->fail_other[why]++;
}

/* bench_stop - no new messages; close every connection */
static void
bench_stop(struct bench *b, const char *why)
{
	if (b->stopping)
		return;
	b->stopping = true;
	if (why && b->error[0] == '\0')
		snprintf(b->error, sizeof b->error, "%s", why);
	for (unsigned i = 0; i < b->o.conns; i++)
		bench_client_close(&b->clients[i], why);
	if (b->nopen == 0 && !uv_is_closing((uv_handle_t *)&b->timer)) {
		b->t_end = uv_hrtime();
		uv_close((uv_handle_t *)&b->timer, bench_on_timer_closed);
	}
}

static void
bench_on_timeout(uv_timer_t *t)
{
	struct bench *b = t->data;

	b->timed_out = true;
	bench_stop(b, "timeout");
}

static void
bench_on_timer_closed(uv_handle_t *h)
{
	(void)h;	/* embedded in struct bench: nothing to free */
}

/* bench_proc_cpu - utime + stime of pid in clock ticks; 0 or -errno */
static int
bench_proc_cpu(long pid, uint64_t *ticks)
{
	char path[64], *data, *p;
	size_t len;
	unsigned long long ut, st;
	int rc;

	snprintf(path, sizeof path, "/proc/%ld/stat", pid);
	if ((rc = file_read_all(path, &data, &len, 65536)) < 0)
		return rc;
	/* Fields after the command name, which may contain spaces. */
	if ((p = strrchr(data, ')')) == NULL ||
	    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
	    &ut, &st) != 2) {
		free(data);
		return -EINVAL;
	}
	free(data);
	*ticks = ut + st;
	return 0;
}

/* bench_proc_status_kb - a "Key:   N kB" line of /proc/pid/status, or -1 */
static long
bench_proc_status_kb(long pid, const char *key)
{
	char path[64], *data, *p;
	size_t len, klen = strlen(key);
	long v = -1;

	snprintf(path, sizeof path, "/proc/%ld/status", pid);
	if (file_read_all(path, &data, &len, 65536) < 0)
		return -1;
	for (p = data; p != NULL; p = strchr(p, '\n')) {
		if (*p == '\n')
			p++;
		if (strncmp(p, key, klen) == 0 && p[klen] == ':') {
			v = strtol(p + klen + 1, NULL, 10);
			break;
		}
	}
	free(data);
	return v;
}

/* bench_proc_reset_peak - VmHWM := VmRSS (Linux >= 4.0); best effort */
static void
bench_proc_reset_peak(long pid)
{
	char path[64];
	FILE *f;

	snprintf(path, sizeof path, "/proc/%ld/clear_refs", pid);
	if ((f = fopen(path, "w")) == NULL)
		return;
	fputs("5", f);
	fclose(f);
}

static int
bench_cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* bench_pct_ms - nearest-rank percentile of the sorted latencies, in ms */
static double
bench_pct_ms(const uint64_t *v, uint64_t n, double pct)
{
	uint64_t rank;

	if (n == 0)
		return 0.0;
	rank = (uint64_t)((pct / 100.0) * (double)n + 0.999999);
	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return (double)v[rank - 1] / 1e6;
}

/* bench_report - the figures, as text or one JSON line */
static void
bench_report(struct bench *b, const uint64_t *cpu_before, uint64_t *cpu_after)
{
	struct buf fails, out;
	struct rusage ru;
	double elapsed, rate, p50, p90, p99, pmax, ccpu, dcpu = -1.0;
	long hwm = -1, rss = -1, tck = sysconf(_SC_CLK_TCK);
	uint64_t unsent = b->o.total - b->nok - b->nfailed;

	elapsed = (double)(b->t_end - b->t_start) / 1e9;
	rate = elapsed > 0 ? (double)b->nok / elapsed : 0.0;
	qsort(b->lat, b->nok, sizeof *b->lat, bench_cmp_u64);
	p50 = bench_pct_ms(b->lat, b->nok, 50);
	p90 = bench_pct_ms(b->lat, b->nok, 90);
	p99 = bench_pct_ms(b->lat, b->nok, 99);
	pmax = b->nok ? (double)b->lat[b->nok - 1] / 1e6 : 0.0;
	getrusage(RUSAGE_SELF, &ru);
	ccpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	    (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
	if (b->o.pid > 0) {
		hwm = bench_proc_status_kb(b->o.pid, "VmHWM");
		rss = bench_proc_status_kb(b->o.pid, "VmRSS");
		if (cpu_after && bench_proc_cpu(b->o.pid, cpu_after) == 0 &&
		    tck > 0)
			dcpu = (double)(*cpu_after - *cpu_before) / (double)tck;
	}

	/* Failures by code, e.g. "451:3 conn:1". */
	buf_init(&fails);
	for (int i = 0; i < BENCH_NCODES; i++)
		if (b->fail_code[i])
			buf_printf(&fails, "%s%d:%" PRIu64, fails.len ? " " : "",
			    i, b->fail_code[i]);
	for (int i = 0; i < BENCH_FAIL_LAST; i++)
		if (b->fail_other[i])
			buf_printf(&fails, "%s%s:%" PRIu64, fails.len ? " " : "",
			    bench_fail_names[i], b->fail_other[i]);

	buf_init(&out);
	if (b->o.json) {
		buf_printf(&out, "{\"conns\": %u, \"messages\": %" PRIu64
		    ", \"size\": %zu, \"per_conn\": %u, \"ok\": %" PRIu64
		    ", \"failed\": %" PRIu64 ", \"not_sent\": %" PRIu64
		    ", \"failures\": {",
		    b->o.conns, b->o.total, b->o.size, b->o.per_conn, b->nok,
		    b->nfailed, unsent);
		bool first = true;
		for (int i = 0; i < BENCH_NCODES; i++) {
			if (!b->fail_code[i])
				continue;
			buf_printf(&out, "%s\"%d\": %" PRIu64, first ? "" : ", ",
			    i, b->fail_code[i]);
			first = false;
		}
		for (int i = 0; i < BENCH_FAIL_LAST; i++) {
			if (!b->fail_other[i])
				continue;
			buf_printf(&out, "%s\"%s\": %" PRIu64, first ? "" : ", ",
			    bench_fail_names[i], b->fail_other[i]);
			first = false;
		}
		buf_printf(&out, "}, \"connections\": %" PRIu64
		    ", \"elapsed_s\": %.3f, \"msgs_per_s\": %.1f"
		    ", \"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f"
		    ", \"max_ms\": %.3f, \"client_cpu_s\": %.2f",
		    b->connects, elapsed, rate, p50, p90, p99, pmax, ccpu);
		if (b->o.pid > 0)
			buf_printf(&out, ", \"relayd_peak_rss_kb\": %ld"
			    ", \"relayd_rss_kb\": %ld, \"relayd_cpu_s\": %.2f",
			    hwm, rss, dcpu);
		buf_printf(&out, ", \"timed_out\": %s, \"error\": ",
		    b->timed_out ? "true" : "false");
		if (b->error[0])
			buf_json_string(&out, b->error);
		else
			buf_puts(&out, "null");
		buf_puts(&out, "}\n");
	} else {
		buf_printf(&out, "connections %u (%" PRIu64 " opened), "
		    "messages %" PRIu64 " of %zu octets, per connection %s\n",
		    b->o.conns, b->connects, b->o.total, b->o.size,
		    b->o.per_conn ? "limited" : "unlimited");
		buf_printf(&out, "ok        %" PRIu64 "\n", b->nok);
		buf_printf(&out, "failed    %" PRIu64 "%s%s%s\n", b->nfailed,
		    fails.len ? " (" : "", fails.len ? fails.data : "",
		    fails.len ? ")" : "");
		if (unsent)
			buf_printf(&out, "not sent  %" PRIu64 "\n", unsent);
		buf_printf(&out, "elapsed   %.3f s\n", elapsed);
		buf_printf(&out, "rate      %.1f msgs/s\n", rate);
		buf_printf(&out, "latency   p50 %.3f  p90 %.3f  p99 %.3f  "
		    "max %.3f ms\n", p50, p90, p99, pmax);
		buf_printf(&out, "client    cpu %.2f s\n", ccpu);
		if (b->o.pid > 0)
			buf_printf(&out, "relayd    peak RSS %ld kB, RSS %ld kB, "
			    "cpu %.2f s\n", hwm, rss, dcpu);
		if (b->timed_out)
			buf_puts(&out, "TIMED OUT\n");
		if (b->error[0])
			buf_printf(&out, "error     %s\n", b->error);
	}
	fwrite(out.data, 1, out.len, stdout);
	fflush(stdout);
	buf_free(&out);
	buf_free(&fails);
}

int
main(int argc, char **argv)
{
	struct bench *b;
	uint64_t v, cpu_before = 0, cpu_after = 0;
	const unsigned char *a;
	int ch, rc, ex;

	b = xcalloc(1, sizeof *b);
	b->o.host = "127.0.0.1";
	b->o.conns = 50;
	b->o.total = 20000;
	b->o.size = 2048;
	b->o.timeout_s = 300;
	while ((ch = getopt(argc, argv, "H:p:c:n:s:m:t:P:jvh")) != -1) {
		switch (ch) {
		case 'H':
			b->o.host = optarg;
			break;
		case 'p':
			if (bench_parse_u64(optarg, 1, 65535, &v) < 0)
				usage();
			b->o.port = (int)v;
			break;
		case 'c':
			if (bench_parse_u64(optarg, 1, BENCH_MAX_CONNS, &v) < 0)
				usage();
			b->o.conns = (unsigned)v;
			break;
		case 'n':
			if (bench_parse_u64(optarg, 1, BENCH_MAX_TOTAL, &v) < 0)
				usage();
			b->o.total = v;
			break;
		case 's':
			if (bench_parse_u64(optarg, 1, BENCH_MAX_SIZE, &v) < 0)
				usage();
			b->o.size = (size_t)v;
			break;
		case 'm':
			if (bench_parse_u64(optarg, 0, UINT32_MAX, &v) < 0)
				usage();
			b->o.per_conn = (unsigned)v;
			break;
		case 't':
			if (bench_parse_u64(optarg, 1, (uint64_t)BENCH_MAX_TIMEOUT,
			    &v) < 0)
				usage();
			b->o.timeout_s = (double)v;
			break;
		case 'P':
			if (bench_parse_u64(optarg, 1, 4194304, &v) < 0)
				usage();
			b->o.pid = (long)v;
			break;
		case 'j':
			b->o.json = true;
			break;
		case 'v':
			b->o.verbose = true;
			break;
		default:
			usage();
		}
	}
	if (optind != argc || b->o.port == 0)
		usage();
	if (uv_ip4_addr(b->o.host, b->o.port, &b->addr) < 0) {
		fprintf(stderr, "bench-submit: bad address: %s\n", b->o.host);
		return EX_USAGE_;
	}
	a = (const unsigned char *)&b->addr.sin_addr.s_addr;
	if (a[0] != 127 || a[1] != 0 || a[2] != 0) {
		fprintf(stderr, "bench-submit: only 127.0.0.x targets are "
		    "allowed, not %s\n", b->o.host);
		return EX_USAGE_;
	}
	{
		char hdr[1024];

		if (b->o.size < bench_header_format(0, hdr, sizeof hdr) + 2) {
			fprintf(stderr, "bench-submit: -s must be at least %zu\n",
			    bench_header_format(0, hdr, sizeof hdr) + 2);
			return EX_USAGE_;
		}
	}
	if (b->o.conns > b->o.total)
		b->o.conns = (unsigned)b->o.total;
	signal(SIGPIPE, SIG_IGN);
	bench_build_body(b);
	b->lat = xmalloc(sizeof *b->lat * b->o.total);
	b->clients = xcalloc(b->o.conns, sizeof *b->clients);
	b->loop = uv_default_loop();
	if (b->o.pid > 0) {
		if (bench_proc_cpu(b->o.pid, &cpu_before) < 0) {
			fprintf(stderr, "bench-submit: no process %ld\n",
			    b->o.pid);
			return EX_USAGE_;
		}
		bench_proc_reset_peak(b->o.pid);
	}

	uv_timer_init(b->loop, &b->timer);
	b->timer.data = b;
	uv_timer_start(&b->timer, bench_on_timeout,
	    (uint64_t)(b->o.timeout_s * 1000.0), 0);
	b->t_start = uv_hrtime();
	for (unsigned i = 0; i < b->o.conns; i++) {
		b->clients[i].b = b;
		b->clients[i].idx = i;
		bench_client_connect(&b->clients[i]);
	}
	/* Ends once every client and the timer are closed: bounded by -t. */
	rc = uv_run(b->loop, UV_RUN_DEFAULT);
	if (b->t_end == 0)
		b->t_end = uv_hrtime();
	if (rc != 0 || uv_loop_close(b->loop) != 0)
		fprintf(stderr, "bench-submit: loop did not drain\n");

	bench_report(b, &cpu_before, b->o.pid > 0 ? &cpu_after : NULL);
	if (b->timed_out || b->nok + b->nfailed < b->o.total)
		ex = EX_INCOMPLETE;
	else
		ex = b->nfailed ? EX_FAILED : 0;
	free(b->body);
	free(b->lat);
	free(b->clients);
	free(b);
	return ex;
}
