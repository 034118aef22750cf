/*
 * dlv_session.c - the delivery client: connect to the destination's hosts
 * in order, greet, STARTTLS when offered and wanted, then carry the
 * transactions the scheduler hands out over one connection.
 *
 * State machine (STYLE.md 4): dlv_enter_state() is the only assignment and
 * arms the phase timeout; dlv_on_reply() gets one complete (multi-line)
 * reply and picks the next state from the verdict of relay/verdict.c.
 * With PIPELINING, MAIL, every RCPT and DATA go out in one write and the
 * replies are matched against a queue of expectations (RFC 2920 3.1);
 * without it the same queue is fed one command at a time.
 *
 * Outcomes: each recipient of a transaction is untouched, accepted (250 to
 * RCPT, waiting for the final reply) or final. When the transaction ends
 * for any reason - the reply to the dot, a refusal, a timeout, a lost
 * connection - every recipient gets an outcome before ops->done, so the
 * caller never has to guess. A failure after the dot was sent is reported
 * as a retry: at-least-once, never at-most-once.
 *
 * The body is read with pread(2) from the spool file (recent messages are
 * in the page cache), dot-stuffed, and written in 64 KiB steps, pausing
 * when the connection's write queue is above its high-water mark.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "config/log.h"
#include "config/util.h"
#include "queue/envelope.h"
#include "relay/conn.h"
#include "relay/verdict.h"
#include "relay/dlv_session.h"

#define DLV_MAX_LINE		4096	/* reply line limit (RFC says 512) */
#define DLV_MAX_REPLY_LINES	100	/* lines in one multi-line reply */
#define DLV_BODY_CHUNK		65536	/* body bytes read per step */

enum dlv_state {
	DLV_ST_CONNECT,		/* TCP connect in progress */
	DLV_ST_BANNER,		/* waiting for the 220 */
	DLV_ST_EHLO,		/* EHLO sent */
	DLV_ST_HELO,		/* HELO sent after EHLO was refused */
	DLV_ST_STARTTLS,	/* STARTTLS sent */
	DLV_ST_TLS,		/* handshake in progress */
	DLV_ST_READY,		/* between transactions */
	DLV_ST_TXN,		/* MAIL/RCPT/DATA replies expected */
	DLV_ST_BODY,		/* streaming the body */
	DLV_ST_DOT,		/* waiting for the reply to the body */
	DLV_ST_RSET,		/* RSET sent after a failed transaction */
	DLV_ST_QUIT,		/* QUIT sent */
	DLV_ST_LAST
};

static const struct {
	const char *name;	/* for traces */
	enum dlv_phase phase;	/* timeout and verdict phase */
} dlv_states[] = {
	[DLV_ST_CONNECT] = { "CONNECT", DLV_PHASE_CONNECT },
	[DLV_ST_BANNER] = { "BANNER", DLV_PHASE_BANNER },
	[DLV_ST_EHLO] = { "EHLO", DLV_PHASE_EHLO },
	[DLV_ST_HELO] = { "HELO", DLV_PHASE_EHLO },
	[DLV_ST_STARTTLS] = { "STARTTLS", DLV_PHASE_STARTTLS },
	[DLV_ST_TLS] = { "TLS", DLV_PHASE_STARTTLS },
	[DLV_ST_READY] = { "READY", DLV_PHASE_RSET },
	[DLV_ST_TXN] = { "TXN", DLV_PHASE_MAIL },
	[DLV_ST_BODY] = { "BODY", DLV_PHASE_DOT },
	[DLV_ST_DOT] = { "DOT", DLV_PHASE_DOT },
	[DLV_ST_RSET] = { "RSET", DLV_PHASE_RSET },
	[DLV_ST_QUIT] = { "QUIT", DLV_PHASE_QUIT },
};
_Static_assert(ARRAY_SIZE(dlv_states) == DLV_ST_LAST, "dlv state table");

enum dlv_rcpt_mark {
	RCPT_UNTOUCHED,		/* no reply about it yet */
	RCPT_ACCEPTED,		/* 250 to RCPT, waiting for the dot reply */
	RCPT_FINAL,		/* outcome decided */
};

struct dlv_expect {
	enum dlv_phase phase;	/* MAIL, RCPT or DATA */
	size_t rcpt;		/* for RCPT: index into txn->idx */
};

struct dlv_session {
	uv_loop_t *loop;		/* the loop */
	uint64_t id;			/* for logs */
	struct dlv_target t;		/* copy; t.hosts is our copy */
	const struct dlv_ops *ops;	/* scheduler callbacks */
	void *arg;			/* for ops */
	struct conn *conn;		/* NULL between hosts */
	size_t host;			/* index of the host in use */
	enum dlv_state state;		/* see dlv_enter_state */
	bool pipelining;		/* server capabilities from EHLO */
	bool starttls;
	bool smtputf8;
	bool eightbit;
	bool dsn;
	uint64_t size_max;		/* SIZE limit, 0 = none given */
	bool tls_active;		/* STARTTLS completed */
	bool tried_helo;		/* EHLO was refused, HELO sent */
	struct smtp_reply cur;		/* reply being assembled */
	int cur_lines;			/* lines in cur so far */
	bool cur_bad;			/* cur is malformed */
	struct smtp_reply last;		/* last failure, for ops->closed */
	struct verdict last_v;		/* its classification */
	bool next_host;			/* on close: try the next host */
	bool aborting;			/* dlv_session_abort was called */
	bool waiting;			/* READY after a DLV_TXN_WAIT */
	unsigned delivered;		/* transactions completed (all hosts) */
	unsigned conn_txns;		/* transactions started on this conn */
	struct dlv_txn *txn;		/* current transaction or NULL */
	uint8_t *marks;			/* enum dlv_rcpt_mark per recipient */
	struct dlv_expect *expect;	/* replies still expected */
	size_t nexpect, pexpect;	/* queue length and read position */
	size_t nsent;			/* expectations whose command is sent */
	size_t accepted;		/* recipients accepted in txn */
	bool mail_ok;			/* MAIL got 250 */
	uint64_t body_off;		/* body bytes sent */
	bool body_bol;			/* the last byte sent ended a line */
	struct buf body;		/* dot-stuffed chunk */
	char addr[64];			/* peer address text */
};

static void dlv_enter_state(struct dlv_session *s, enum dlv_state st);
static void dlv_try_host(struct dlv_session *s);
static void dlv_on_connect(struct conn *c, int status);
static void dlv_on_line(struct conn *c, char *line, size_t len,
    bool too_long);
static void dlv_on_reply(struct dlv_session *s);
static void dlv_on_tls_ready(struct conn *c);
static void dlv_on_timeout(struct conn *c);
static void dlv_on_eof(struct conn *c, const char *why);
static void dlv_on_drain(struct conn *c);
static void dlv_on_closed(struct conn *c);
static void dlv_fail(struct dlv_session *s, enum dlv_phase phase,
    const struct smtp_reply *r, int io_err);
static void dlv_ready(struct dlv_session *s);
static void dlv_txn_start(struct dlv_session *s, struct dlv_txn *t);
static void dlv_txn_send_next(struct dlv_session *s);
static void dlv_txn_step(struct dlv_session *s);
static void dlv_txn_finish(struct dlv_session *s);
static void dlv_txn_resolve(struct dlv_session *s, enum dlv_rcpt_mark which,
    enum dlv_phase phase, const struct verdict *v,
    const struct smtp_reply *r);
static void dlv_body_pump(struct dlv_session *s);
static size_t dlv_raw_unused(struct conn *c, const char *d, size_t n);

static const struct conn_ops dlv_conn_ops = {
	.on_line = dlv_on_line,
	.on_raw = dlv_raw_unused,
	.on_tls_ready = dlv_on_tls_ready,
	.on_timeout = dlv_on_timeout,
	.on_eof = dlv_on_eof,
	.on_drain = dlv_on_drain,
	.on_closed = dlv_on_closed,
};

struct dlv_session *
dlv_session_start(uv_loop_t *loop, uint64_t id,
    const struct dlv_target *target, const struct dlv_ops *ops, void *arg)
{
	struct dlv_session *s = xcalloc(1, sizeof *s);

	s->loop = loop;
	s->id = id;
	s->t = *target;
	s->t.hosts = xcalloc(target->nhosts, sizeof *s->t.hosts);
	memcpy(s->t.hosts, target->hosts, target->nhosts * sizeof
	    *target->hosts);
	s->ops = ops;
	s->arg = arg;
	buf_init(&s->body);
	s->last_v.why = "no host to try";
	s->last_v.cls = VERDICT_CLASS_CONN_FAIL;
	s->last_v.rule = "none";
	dlv_try_host(s);
	return s;
}

void
dlv_session_abort(struct dlv_session *s)
{
	s->aborting = true;
	s->next_host = false;
	if (s->conn)
		conn_close(s->conn, "abort");
}

const char *
dlv_session_host(const struct dlv_session *s)
{
	return s->host < s->t.nhosts ? s->t.hosts[s->host].name : "";
}

const char *
dlv_session_addr(const struct dlv_session *s)
{
	return s->addr;
}

const char *
dlv_session_tls(const struct dlv_session *s)
{
	return s->conn && s->tls_active ? conn_tls_text(s->conn) : "";
}

bool
dlv_session_idle(const struct dlv_session *s)
{
	return s->state == DLV_ST_READY && s->waiting && s->conn != NULL &&
	    !conn_is_closing(s->conn);
}

unsigned
dlv_session_txns(const struct dlv_session *s)
{
	return s->conn_txns;
}

static void
dlv_enter_state(struct dlv_session *s, enum dlv_state st)
{
	if (st >= DLV_ST_LAST)
		relay_panic("dlv: bad state %d", (int)st);
	log_trace(TRACE_STATE, "%016llx dlv state %s -> %s",
	    (unsigned long long)s->id, dlv_states[s->state].name,
	    dlv_states[st].name);
	s->state = st;
	if (s->conn)
		conn_set_timeout(s->conn,
		    s->t.timeout_ms[dlv_states[st].phase]);
}

/* dlv_send - one command line; pipelined lines share a write */
static void
dlv_send(struct dlv_session *s, const char *fmt, ...)
{
	char line[2048];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof line - 2, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n > sizeof line - 3)
		relay_panic("dlv: command too long");
	log_trace(TRACE_DLV, "%016llx dlv send \"%s\"",
	    (unsigned long long)s->id, line);
	line[n++] = '\r';
	line[n++] = '\n';
	conn_write(s->conn, line, (size_t)n);
}

/* dlv_try_host - connect to the current host, or finish when none is left */
static void
dlv_try_host(struct dlv_session *s)
{
	struct sockaddr_storage dst;
	int rc;

	for (; s->host < s->t.nhosts; s->host++) {
		if (s->ops->connecting && !s->ops->connecting(s->arg, s,
		    &s->t.hosts[s->host].addr))
			continue;	/* that address is at its cap */
		dst = s->t.hosts[s->host].addr;
		if (dst.ss_family == AF_INET6)
			((struct sockaddr_in6 *)&dst)->sin6_port =
			    htons((uint16_t)s->t.port);
		else
			((struct sockaddr_in *)&dst)->sin_port =
			    htons((uint16_t)s->t.port);
		s->pipelining = s->starttls = s->smtputf8 = false;
		s->eightbit = s->dsn = s->tls_active = s->tried_helo = false;
		s->size_max = 0;
		s->conn_txns = 0;
		s->next_host = false;
		s->conn = conn_new(s->loop, &dlv_conn_ops, s, s->id,
		    DLV_MAX_LINE);
		s->state = DLV_ST_CONNECT;
		dlv_enter_state(s, DLV_ST_CONNECT);
		rc = conn_connect(s->conn, (struct sockaddr *)&dst,
		    s->t.has_source ? (struct sockaddr *)&s->t.source : NULL,
		    dlv_on_connect);
		str_copy(s->addr, conn_peer(s->conn), sizeof s->addr);
		if (rc == 0)
			return;
		/* Synchronous failure (bad source address): next host. */
		s->last.code = 0;
		snprintf(s->last.text, sizeof s->last.text, "connect: %s",
		    uv_strerror(rc));
		s->last_v.why = "connection failure";
		s->last_v.cls = VERDICT_CLASS_CONN_FAIL;
		s->last_v.rule = "none";
		s->next_host = true;
		conn_close(s->conn, "connect failed");
		return;		/* dlv_on_closed moves on */
	}
	/* Every host failed before a transaction could start. */
	s->ops->closed(s->arg, s, s->delivered, &s->last, &s->last_v);
	free(s->t.hosts);
	buf_free(&s->body);
	free(s);
}

static void
dlv_on_connect(struct conn *c, int status)
{
	struct dlv_session *s = conn_owner(c);

	if (status < 0) {
		dlv_fail(s, DLV_PHASE_CONNECT, NULL, status);
		return;
	}
	str_copy(s->addr, conn_peer(c), sizeof s->addr);
	log_trace(TRACE_DLV, "%016llx dlv connected domain=%s host=%s addr=%s",
	    (unsigned long long)s->id, s->t.domain, dlv_session_host(s),
	    s->addr);
	dlv_enter_state(s, DLV_ST_BANNER);
}

static size_t
dlv_raw_unused(struct conn *c, const char *d, size_t n)
{
	return n;	/* the client never switches to raw mode */
}

/* dlv_parse_enh - "4.7.0 text": split off an enhanced status code */
static const char *
dlv_parse_enh(const char *text, char *enh, size_t enhlen)
{
	const char *p = text;
	int parts = 0, digits = 0;

	if (*p < '2' || *p > '5')
		return text;
	for (; *p && *p != ' '; p++) {
		if (*p >= '0' && *p <= '9') {
			if (++digits > 3)
				return text;
		} else if (*p == '.' && digits > 0 && parts < 2) {
			parts++;
			digits = 0;
		} else {
			return text;
		}
	}
	if (parts != 2 || digits == 0 || (size_t)(p - text) >= enhlen)
		return text;
	memcpy(enh, text, (size_t)(p - text));
	enh[p - text] = '\0';
	return *p ? p + 1 : p;
}

/* dlv_ehlo_keyword - note one EHLO capability line */
static void
dlv_ehlo_keyword(struct dlv_session *s, const char *kw)
{
	if (str_ieq(kw, "PIPELINING"))
		s->pipelining = true;
	else if (str_ieq(kw, "STARTTLS"))
		s->starttls = true;
	else if (str_ieq(kw, "SMTPUTF8"))
		s->smtputf8 = true;
	else if (str_ieq(kw, "8BITMIME"))
		s->eightbit = true;
	else if (str_ieq(kw, "DSN"))
		s->dsn = true;
	else if (str_hasprefix_i(kw, "SIZE ") || str_ieq(kw, "SIZE"))
		s->size_max = strtoull(kw + 4, NULL, 10);
}

static void
dlv_on_line(struct conn *c, char *line, size_t len, bool too_long)
{
	struct dlv_session *s = conn_owner(c);
	bool final;
	int code;

	log_trace(TRACE_DLV, "%016llx dlv recv \"%.*s\"",
	    (unsigned long long)s->id, (int)(len > 200 ? 200 : len), line);
	if (s->cur_lines == 0) {
		memset(&s->cur, 0, sizeof s->cur);
		s->cur_bad = false;
	}
	if (too_long || len < 3 || memchr(line, '\0', len) ||
	    line[0] < '1' || line[0] > '5' || line[1] < '0' || line[1] > '9' ||
	    line[2] < '0' || line[2] > '9' ||
	    (len > 3 && line[3] != ' ' && line[3] != '-')) {
		s->cur_bad = true;
		final = true;
		code = 0;
	} else {
		code = (line[0] - '0') * 100 + (line[1] - '0') * 10 +
		    (line[2] - '0');
		final = len == 3 || line[3] == ' ';
		if (s->cur_lines > 0 && code != s->cur.code)
			s->cur_bad = true;
	}
	if (++s->cur_lines > DLV_MAX_REPLY_LINES)
		s->cur_bad = true;
	if (!s->cur_bad) {
		const char *text = len > 4 ? line + 4 : "";
		s->cur.code = code;
		if (s->cur_lines == 1)
			text = dlv_parse_enh(text, s->cur.enh, sizeof s->cur.enh);
		else if (s->cur.enh[0] && strncmp(text, s->cur.enh,
		    strlen(s->cur.enh)) == 0 && text[strlen(s->cur.enh)] == ' ')
			text += strlen(s->cur.enh) + 1;
		if (s->state == DLV_ST_EHLO && code == 250 && s->cur_lines > 1)
			dlv_ehlo_keyword(s, text);
		size_t have = strlen(s->cur.text);
		snprintf(s->cur.text + have, sizeof s->cur.text - have, "%s%s",
		    have ? "; " : "", text);
	}
	if (!final && !s->cur_bad)
		return;
	if (s->cur_bad) {
		s->cur.code = 0;
		snprintf(s->cur.text, sizeof s->cur.text, "malformed reply");
		/* Drop what follows: the stream is out of step. */
	}
	s->cur_lines = 0;
	dlv_on_reply(s);
}

/* dlv_fail - the connection is unusable; decide what the close means */
static void
dlv_fail(struct dlv_session *s, enum dlv_phase phase,
    const struct smtp_reply *r, int io_err)
{
	struct verdict v;
	struct smtp_reply io;

	if (r == NULL) {
		memset(&io, 0, sizeof io);
		snprintf(io.text, sizeof io.text, "%s while %s",
		    io_err == UV_ETIMEDOUT ? "timeout" : uv_strerror(io_err),
		    dlv_phase_name(phase));
		r = &io;
	}
	verdict_classify_rules(s->t.rules, phase, r,
	    r == &io ? (io_err ? io_err : -EIO) : 0, &v);
	s->last = *r;
	s->last_v = v;
	if (s->txn) {
		dlv_txn_resolve(s, RCPT_UNTOUCHED, phase, &v, r);
		dlv_txn_resolve(s, RCPT_ACCEPTED, phase, &v, r);
		dlv_txn_finish(s);
	}
	/* Another host is worth trying only if this one never got a txn. */
	s->next_host = !s->aborting && s->conn_txns == 0 &&
	    v.action == VERDICT_NEXT_MX;
	log_info("%016llx dlv host-failed domain=%s host=%s addr=%s phase=%s "
	    "code=%d reply=\"%.200s\" action=%s class=%s rule=%s",
	    (unsigned long long)s->id, s->t.domain, dlv_session_host(s),
	    s->addr, dlv_phase_name(phase), r->code, r->text,
	    s->next_host ? "next-host" : "end", verdict_class_name(v.cls),
	    v.rule);
	if (s->conn)
		conn_close(s->conn, v.why);
}

static void
dlv_on_reply(struct dlv_session *s)
{
	struct smtp_reply *r = &s->cur;
	enum dlv_phase phase = dlv_states[s->state].phase;
	struct verdict v;

	if (s->state == DLV_ST_TXN && s->pexpect < s->nexpect)
		phase = s->expect[s->pexpect].phase;
	verdict_classify_rules(s->t.rules, phase, r, 0, &v);

	switch (s->state) {
	case DLV_ST_BANNER:
		if (v.action != VERDICT_OK)
			return dlv_fail(s, phase, r, 0);
		dlv_enter_state(s, DLV_ST_EHLO);
		dlv_send(s, "EHLO %s", s->t.helo);
		return;
	case DLV_ST_EHLO:
		if (r->code >= 500 && r->code != 521 && !s->tried_helo) {
			/* RFC 5321 3.2: an old server; HELO it is. */
			s->tried_helo = true;
			dlv_enter_state(s, DLV_ST_HELO);
			dlv_send(s, "HELO %s", s->t.helo);
			return;
		}
		if (v.action != VERDICT_OK)
			return dlv_fail(s, phase, r, 0);
		if (!s->tls_active && s->t.tls != DLV_TLS_NONE &&
		    s->starttls && s->t.tls_ctx) {
			dlv_enter_state(s, DLV_ST_STARTTLS);
			dlv_send(s, "STARTTLS");
			return;
		}
		if (!s->tls_active && s->t.tls >= DLV_TLS_REQUIRED) {
			snprintf(r->text, sizeof r->text,
			    "TLS required but STARTTLS not offered");
			r->code = 0;
			return dlv_fail(s, DLV_PHASE_STARTTLS, r, 0);
		}
		dlv_ready(s);
		return;
	case DLV_ST_HELO:
		if (v.action != VERDICT_OK)
			return dlv_fail(s, phase, r, 0);
		if (s->t.tls >= DLV_TLS_REQUIRED) {
			snprintf(r->text, sizeof r->text,
			    "TLS required but the server has no ESMTP");
			r->code = 0;
			return dlv_fail(s, DLV_PHASE_STARTTLS, r, 0);
		}
		dlv_ready(s);
		return;
	case DLV_ST_STARTTLS:
		if (r->code != 220) {
			if (s->t.tls >= DLV_TLS_REQUIRED || r->code == 421 ||
			    r->code == 0)
				return dlv_fail(s, phase, r, 0);
			dlv_ready(s);	/* opportunistic: go on in clear */
			return;
		}
		dlv_enter_state(s, DLV_ST_TLS);
		/* Bytes after the 220 would be injected into TLS (RFC 3207). */
		if (conn_start_tls(s->conn, s->t.tls_ctx, false,
		    s->host < s->t.nhosts ? s->t.hosts[s->host].name : NULL) < 0) {
			snprintf(r->text, sizeof r->text,
			    "data after 220 to STARTTLS or TLS setup failure");
			r->code = 0;
			return dlv_fail(s, DLV_PHASE_STARTTLS, r, 0);
		}
		return;
	case DLV_ST_TXN:
		break;
	case DLV_ST_DOT:
		dlv_txn_resolve(s, RCPT_ACCEPTED, DLV_PHASE_DOT, &v, r);
		dlv_txn_finish(s);
		if (v.conn_dead)
			return dlv_fail(s, DLV_PHASE_DOT, r, 0);
		dlv_ready(s);
		return;
	case DLV_ST_RSET:
		if (v.conn_dead || r->code / 100 != 2)
			return dlv_fail(s, DLV_PHASE_RSET, r, 0);
		dlv_ready(s);
		return;
	case DLV_ST_QUIT:
		conn_shutdown(s->conn, "quit");
		return;
	default:
		/* A reply nobody asked for (or after a malformed one). */
		if (r->code == 0 || r->code == 421)
			return dlv_fail(s, phase, r, 0);
		return;
	}

	/* DLV_ST_TXN: match the reply with the oldest expectation. */
	if (s->pexpect >= s->nexpect)
		return dlv_fail(s, phase, r, 0);
	struct dlv_expect e = s->expect[s->pexpect++];
	if (r->code == 0 || (v.conn_dead && r->code == 421)) {
		dlv_txn_resolve(s, RCPT_UNTOUCHED, e.phase, &v, r);
		dlv_txn_resolve(s, RCPT_ACCEPTED, e.phase, &v, r);
		return dlv_fail(s, e.phase, r, 0);
	}
	switch (e.phase) {
	case DLV_PHASE_MAIL:
		s->mail_ok = v.action == VERDICT_OK;
		if (!s->mail_ok)
			dlv_txn_resolve(s, RCPT_UNTOUCHED, e.phase, &v, r);
		break;
	case DLV_PHASE_RCPT:
		if (!s->mail_ok || s->marks[e.rcpt] != RCPT_UNTOUCHED)
			break;
		if (v.action == VERDICT_OK) {
			s->marks[e.rcpt] = RCPT_ACCEPTED;
			s->accepted++;
		} else {
			struct dlv_rcpt_out *o = &s->txn->out[e.rcpt];
			o->v = v;
			o->phase = e.phase;
			o->reply = *r;
			s->marks[e.rcpt] = RCPT_FINAL;
		}
		break;
	case DLV_PHASE_DATA:
		if (s->mail_ok && s->accepted > 0 && r->code == 354) {
			dlv_enter_state(s, DLV_ST_BODY);
			s->body_off = 0;
			s->body_bol = true;
			dlv_body_pump(s);
			return;
		}
		if (s->mail_ok && s->accepted > 0)
			dlv_txn_resolve(s, RCPT_ACCEPTED, e.phase, &v, r);
		/* Every recipient has its outcome: hand them back now,
		 * whatever becomes of the RSET and of the connection. */
		dlv_txn_finish(s);
		dlv_enter_state(s, DLV_ST_RSET);
		dlv_send(s, "RSET");
		return;
	default:
		break;
	}
	if (!s->pipelining)
		dlv_txn_step(s);
}

/* dlv_ready - between transactions: the next one, or QUIT */
static void
dlv_ready(struct dlv_session *s)
{
	struct dlv_txn *t = NULL;

	dlv_enter_state(s, DLV_ST_READY);
	if (!s->aborting && (s->t.max_msgs <= 0 ||
	    s->conn_txns < (unsigned)s->t.max_msgs))
		t = s->ops->next(s->arg, s);
	if (t == DLV_TXN_WAIT || t == DLV_TXN_LINGER) {
		s->waiting = true;	/* idle until poked or timed out */
		if (t == DLV_TXN_LINGER && s->conn)
			conn_set_timeout(s->conn, s->t.linger_ms);
		return;
	}
	if (t == NULL) {
		dlv_enter_state(s, DLV_ST_QUIT);
		dlv_send(s, "QUIT");
		return;
	}
	dlv_txn_start(s, t);
}

void
dlv_session_poke(struct dlv_session *s)
{
	if (s->state != DLV_ST_READY || !s->waiting || s->conn == NULL ||
	    conn_is_closing(s->conn))
		return;
	s->waiting = false;
	dlv_ready(s);
	if (s->conn)
		conn_flush(s->conn);	/* not inside a dispatch: send now */
}

/* dlv_mail_params - MAIL FROM parameters the server understands */
static void
dlv_mail_params(struct dlv_session *s, const struct dlv_txn *t,
    struct buf *b)
{
	const struct envelope *env = t->env;

	if (s->size_max || s->pipelining)	/* SIZE is cheap to add */
		buf_printf(b, " SIZE=%llu", (unsigned long long)t->size);
	if (env->body == ENV_BODY_8BITMIME && s->eightbit)
		buf_puts(b, " BODY=8BITMIME");
	if (env->smtputf8)
		buf_puts(b, " SMTPUTF8");
	if (s->dsn) {
		if (env->ret == ENV_RET_FULL)
			buf_puts(b, " RET=FULL");
		else if (env->ret == ENV_RET_HDRS)
			buf_puts(b, " RET=HDRS");
		if (env->envid) {
			buf_puts(b, " ENVID=");
			xtext_encode(b, env->envid);
		}
	}
}

/* dlv_txn_start - send MAIL (and with PIPELINING every RCPT and DATA) */
static void
dlv_txn_start(struct dlv_session *s, struct dlv_txn *t)
{
	struct smtp_reply r;
	struct verdict v;
	struct buf p;

	s->txn = t;
	s->conn_txns++;
	s->marks = xcalloc(t->n, 1);
	s->expect = xcalloc(t->n + 2, sizeof *s->expect);
	s->nexpect = s->pexpect = 0;
	s->accepted = 0;
	s->mail_ok = false;
	for (size_t i = 0; i < t->n; i++) {
		memset(&t->out[i], 0, sizeof t->out[i]);
		t->out[i].v.action = VERDICT_MSG_RETRY;
	}
	/* Refusals we can know without asking (RFC 6531 3.5, RFC 1870). */
	memset(&r, 0, sizeof r);
	if (t->env->smtputf8 && !s->smtputf8) {
		r.code = 553;
		str_copy(r.enh, "5.6.7", sizeof r.enh);
		str_copy(r.text, "recipient's server does not support SMTPUTF8",
		    sizeof r.text);
	} else if (s->size_max && t->size > s->size_max) {
		r.code = 552;
		str_copy(r.enh, "5.3.4", sizeof r.enh);
		snprintf(r.text, sizeof r.text, "message size %llu exceeds the "
		    "server's limit %llu", (unsigned long long)t->size,
		    (unsigned long long)s->size_max);
	}
	if (r.code) {
		verdict_classify_rules(s->t.rules, DLV_PHASE_MAIL, &r, 0, &v);
		dlv_txn_resolve(s, RCPT_UNTOUCHED, DLV_PHASE_MAIL, &v, &r);
		dlv_txn_finish(s);
		dlv_ready(s);
		return;
	}
	s->expect[s->nexpect++] = (struct dlv_expect){ DLV_PHASE_MAIL, 0 };
	for (size_t i = 0; i < t->n; i++)
		s->expect[s->nexpect++] = (struct dlv_expect){ DLV_PHASE_RCPT, i };
	s->expect[s->nexpect++] = (struct dlv_expect){ DLV_PHASE_DATA, 0 };
	dlv_enter_state(s, DLV_ST_TXN);
	buf_init(&p);
	dlv_mail_params(s, t, &p);
	dlv_send(s, "MAIL FROM:<%s>%s", t->env->sender, p.data ? p.data : "");
	buf_free(&p);
	s->nsent = 1;
	while (s->pipelining && s->nsent < s->nexpect)
		dlv_txn_send_next(s);
}

/* dlv_txn_send_next - send the command of the next unsent expectation */
static void
dlv_txn_send_next(struct dlv_session *s)
{
	const struct dlv_txn *t = s->txn;
	const struct dlv_expect *e;

	if (s->nsent >= s->nexpect)
		return;
	e = &s->expect[s->nsent++];
	if (e->phase == DLV_PHASE_RCPT) {
		const struct env_rcpt *rc = &t->env->rcpts[t->idx[e->rcpt]];
		struct buf p;

		buf_init(&p);
		if (s->dsn && rc->notify) {
			const char *sep = "";

			buf_puts(&p, " NOTIFY=");
			if (rc->notify & ENV_NOTIFY_NEVER)
				buf_puts(&p, "NEVER");
			if (rc->notify & ENV_NOTIFY_SUCCESS) {
				buf_printf(&p, "%sSUCCESS", sep);
				sep = ",";
			}
			if (rc->notify & ENV_NOTIFY_FAILURE) {
				buf_printf(&p, "%sFAILURE", sep);
				sep = ",";
			}
			if (rc->notify & ENV_NOTIFY_DELAY)
				buf_printf(&p, "%sDELAY", sep);
		}
		if (s->dsn && rc->orcpt)
			buf_printf(&p, " ORCPT=%s", rc->orcpt);
		dlv_send(s, "RCPT TO:<%s>%s", rc->addr, p.data ? p.data : "");
		buf_free(&p);
	} else if (e->phase == DLV_PHASE_DATA) {
		dlv_send(s, "DATA");
	}
}

/* dlv_txn_step - without PIPELINING: the next command, or RSET early */
static void
dlv_txn_step(struct dlv_session *s)
{
	bool data_next = s->nsent == s->nexpect - 1;

	if (!s->mail_ok || (data_next && s->accepted == 0)) {
		dlv_txn_finish(s);	/* as after a refused DATA */
		dlv_enter_state(s, DLV_ST_RSET);
		dlv_send(s, "RSET");
		return;
	}
	dlv_txn_send_next(s);
}

/*
 * dlv_txn_resolve - give every recipient marked "which" the outcome v/r
 * (the verdict's transaction-wide action is narrowed to the recipient).
 */
static void
dlv_txn_resolve(struct dlv_session *s, enum dlv_rcpt_mark which,
    enum dlv_phase phase, const struct verdict *v,
    const struct smtp_reply *r)
{
	struct dlv_txn *t = s->txn;

	if (t == NULL)
		return;
	for (size_t i = 0; i < t->n; i++) {
		struct dlv_rcpt_out *o = &t->out[i];

		if (s->marks[i] != which)
			continue;
		/* No reply at all and the recipient never reached the
		 * server (lost connection, abort): not an attempt. */
		o->untried = which == RCPT_UNTOUCHED && r->code == 0 &&
		    s->pexpect <= 1 + i;
		o->v = *v;
		if (v->action == VERDICT_MSG_RETRY ||
		    v->action == VERDICT_NEXT_MX)
			o->v.action = VERDICT_RCPT_RETRY;
		else if (v->action == VERDICT_MSG_BOUNCE)
			o->v.action = VERDICT_RCPT_BOUNCE;
		o->phase = phase;
		o->reply = *r;
		s->marks[i] = RCPT_FINAL;
	}
}

/* dlv_txn_finish - every recipient has an outcome: hand the txn back */
static void
dlv_txn_finish(struct dlv_session *s)
{
	struct dlv_txn *t = s->txn;
	struct smtp_reply none;
	struct verdict v = { .action = VERDICT_RCPT_RETRY,
	    .cls = VERDICT_CLASS_CONN_FAIL, .why = "not attempted" };

	if (t == NULL)
		return;
	memset(&none, 0, sizeof none);
	str_copy(none.text, "not attempted", sizeof none.text);
	dlv_txn_resolve(s, RCPT_UNTOUCHED, DLV_PHASE_MAIL, &v, &none);
	dlv_txn_resolve(s, RCPT_ACCEPTED, DLV_PHASE_DOT, &v, &none);
	s->txn = NULL;
	free(s->marks);
	s->marks = NULL;
	free(s->expect);
	s->expect = NULL;
	s->nexpect = s->pexpect = s->nsent = 0;
	s->delivered++;
	s->ops->done(s->arg, s, t);
}

/* dlv_body_pump - send body chunks until done or the socket is full */
static void
dlv_body_pump(struct dlv_session *s)
{
	char in[DLV_BODY_CHUNK];

	while (s->state == DLV_ST_BODY && !conn_write_blocked(s->conn)) {
		ssize_t n = pread(s->txn->fd, in, sizeof in,
		    (off_t)s->body_off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			struct smtp_reply r;
			memset(&r, 0, sizeof r);
			snprintf(r.text, sizeof r.text, "reading the queue "
			    "file: %s", strerror(errno));
			log_warnx("%016llx dlv spool-read id=%s error=\"%s\"",
			    (unsigned long long)s->id, s->txn->id, r.text);
			return dlv_fail(s, DLV_PHASE_DOT, &r, 0);
		}
		buf_reset(&s->body);
		if (n == 0) {
			/* RFC 5321 4.1.1.4: the body ends with CRLF.CRLF */
			if (!s->body_bol)
				buf_append(&s->body, "\r\n", 2);
			buf_append(&s->body, ".\r\n", 3);
			conn_write(s->conn, s->body.data, s->body.len);
			conn_flush(s->conn);
			dlv_enter_state(s, DLV_ST_DOT);
			return;
		}
		/* Dot-stuffing: a line that starts with "." gets another. */
		const char *p = in, *end = in + n;
		while (p < end) {
			if (s->body_bol && *p == '.')
				buf_append(&s->body, ".", 1);
			const char *lf = memchr(p, '\n', (size_t)(end - p));
			const char *stop = lf ? lf + 1 : end;
			buf_append(&s->body, p, (size_t)(stop - p));
			s->body_bol = lf != NULL;
			p = stop;
		}
		s->body_off += (uint64_t)n;
		conn_write(s->conn, s->body.data, s->body.len);
		conn_flush(s->conn);	/* also from inside a reply callback */
	}
}

static void
dlv_on_drain(struct conn *c)
{
	struct dlv_session *s = conn_owner(c);

	if (s->state == DLV_ST_BODY)
		dlv_body_pump(s);
}

static void
dlv_on_tls_ready(struct conn *c)
{
	struct dlv_session *s = conn_owner(c);

	s->tls_active = true;
	/* RFC 3207 4.2: forget what the server said before TLS. */
	s->pipelining = s->starttls = s->smtputf8 = false;
	s->eightbit = s->dsn = false;
	s->size_max = 0;
	dlv_enter_state(s, DLV_ST_EHLO);
	dlv_send(s, "EHLO %s", s->t.helo);
}

static void
dlv_on_timeout(struct conn *c)
{
	struct dlv_session *s = conn_owner(c);
	enum dlv_phase phase = dlv_states[s->state].phase;

	if (s->state == DLV_ST_TXN && s->pexpect < s->nexpect)
		phase = s->expect[s->pexpect].phase;
	if (s->state == DLV_ST_QUIT) {
		conn_close(c, "quit timeout");
		return;
	}
	if (s->state == DLV_ST_READY && s->waiting) {
		/* Idled long enough for a token or more work: leave nicely. */
		s->waiting = false;
		dlv_enter_state(s, DLV_ST_QUIT);
		dlv_send(s, "QUIT");
		return;
	}
	dlv_fail(s, phase, NULL, UV_ETIMEDOUT);
}

static void
dlv_on_eof(struct conn *c, const char *why)
{
	struct dlv_session *s = conn_owner(c);
	enum dlv_phase phase = dlv_states[s->state].phase;
	struct smtp_reply r;

	if (s->state == DLV_ST_QUIT)
		return;
	if (s->state == DLV_ST_TXN && s->pexpect < s->nexpect)
		phase = s->expect[s->pexpect].phase;
	if (strncmp(why, "TLS: ", 5) != 0) {
		dlv_fail(s, phase, NULL, UV_EOF);
		return;
	}
	/* A failed handshake (e.g. certificate verification): say why. */
	memset(&r, 0, sizeof r);
	snprintf(r.text, sizeof r.text, "%s", why);
	dlv_fail(s, phase, &r, 0);
}

static void
dlv_on_closed(struct conn *c)
{
	struct dlv_session *s = conn_owner(c);

	s->conn = NULL;
	if (s->txn) {
		/* Closed under us (abort, write error): retry what is left. */
		struct smtp_reply r;
		struct verdict v = { .action = VERDICT_RCPT_RETRY,
		    .cls = VERDICT_CLASS_CONN_FAIL, .conn_dead = true,
		    .why = "connection closed" };

		memset(&r, 0, sizeof r);
		str_copy(r.text, "connection closed", sizeof r.text);
		dlv_txn_resolve(s, RCPT_UNTOUCHED, DLV_PHASE_MAIL, &v, &r);
		dlv_txn_resolve(s, RCPT_ACCEPTED, DLV_PHASE_DOT, &v, &r);
		dlv_txn_finish(s);
	}
	if (s->next_host) {
		s->host++;
		dlv_try_host(s);
		return;
	}
	s->ops->closed(s->arg, s, s->delivered, &s->last, &s->last_v);
	free(s->t.hosts);
	buf_free(&s->body);
	free(s);
}
