/*
 * conn.c - a TCP connection with an optional TLS pump, a line reader with a
 * hard limit, batched output with write backpressure, an idle timer, and a
 * close path that frees the object only after every handle has closed.
 *
 * Invariants:
 *  - tcp and timer are embedded and never move; the last close callback
 *    calls ops->on_closed and then frees the conn (STYLE.md 5).
 *  - Each uv_write owns its buffer (struct conn_wreq), freed in
 *    conn_on_write_done whatever the status (STYLE.md 7).
 *  - Input is dispatched one line at a time from c->in; the owner can pause
 *    between lines (pipelining: the next command is not read until the
 *    reply to the current one is decided). Output written during dispatch
 *    is flushed when dispatch stops, so a pipelined group of replies goes
 *    out in one write (one TLS record).
 *  - conn_close may be called from any callback; everything after it checks
 *    CONN_F_CLOSING and returns.
 *  - A write error on an outbound connection does not close it at once:
 *    the server's last reply (a 421 before it closed) may be waiting
 *    unread behind our pipelined commands. Output is dropped from then
 *    on, input is read and dispatched until EOF or CONN_DRAIN_MS.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "config/log.h"
#include "config/util.h"
#include "tls/tls.h"
#include "relay/conn.h"

#define CONN_READ_CHUNK		65536
#define CONN_WRITE_HIWAT	(256 * 1024)	/* stop reading above this */
#define CONN_WRITE_LOWAT	(32 * 1024)	/* resume reading below this */
#define CONN_SHUTDOWN_MS	10000		/* grace for a graceful close */
#define CONN_DRAIN_MS		2000		/* reading on after a write error */

enum {
	CONN_F_CLOSING = 1 << 0,	/* conn_close called */
	CONN_F_PAUSED = 1 << 1,		/* owner asked to stop input */
	CONN_F_DISPATCHING = 1 << 2,	/* inside conn_dispatch */
	CONN_F_DISCARD = 1 << 3,	/* dropping an over-long line */
	CONN_F_READING = 1 << 4,	/* uv_read_start is active */
	CONN_F_SHUTDOWN = 1 << 5,	/* closing once writes drain */
	CONN_F_WBLOCKED = 1 << 6,	/* write queue above high water */
	CONN_F_ACCEPTED = 1 << 7,	/* the socket is connected */
	CONN_F_OUTBOUND = 1 << 8,	/* we connected (conn_connect) */
	CONN_F_WDEAD = 1 << 9,		/* a write failed: read what is left */
};

struct conn {
	uv_tcp_t tcp;			/* embedded; tcp.data = conn */
	uv_timer_t timer;		/* idle or shutdown timer */
	uv_connect_t connect;		/* outbound connect request */
	conn_connect_cb on_connect;	/* outbound: owner's callback */
	uv_loop_t *loop;		/* the loop it runs on */
	uint64_t id;			/* session id for logs */
	const struct conn_ops *ops;	/* owner's callbacks */
	void *owner;			/* owner's object */
	struct tls_pump tls;		/* valid when has_tls */
	bool has_tls;			/* TLS started on this conn */
	char tls_text[96];		/* protocol and cipher once ready */
	struct buf in;			/* plaintext not yet dispatched */
	struct buf line;		/* the line handed to on_line */
	struct buf out;			/* plaintext not yet written */
	enum conn_mode mode;		/* lines or raw */
	size_t max_line;		/* line limit including CRLF */
	uint64_t timeout_ms;		/* idle timeout, 0 = none */
	int flags;			/* CONN_F_* */
	int pending_closes;		/* handles still closing */
	char peer[64];			/* numeric peer address */
	struct sockaddr_storage peer_sa;	/* peer address */
	const char *wdead_why;		/* the write error (static string) */
};

struct conn_wreq {
	uv_write_t req;		/* req.data unused; handle->data is the conn */
	size_t len;		/* bytes in data */
	char data[];		/* owned by this request */
};

static void conn_on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b);
static void conn_write_failed(struct conn *c, const char *why);
static void conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void conn_on_write_done(uv_write_t *req, int status);
static void conn_on_timer(uv_timer_t *t);
static void conn_on_connect(uv_connect_t *req, int status);
static void conn_set_peer(struct conn *c);
static void conn_on_handle_closed(uv_handle_t *h);
static void conn_dispatch(struct conn *c);
static void conn_read_update(struct conn *c);
static int conn_send_raw(struct conn *c, const void *data, size_t len);
static int conn_send_cipher(struct conn *c);
static void conn_after_write(struct conn *c);

struct conn *
conn_new(uv_loop_t *loop, const struct conn_ops *ops, void *owner,
    uint64_t id, size_t max_line)
{
	struct conn *c = xcalloc(1, sizeof *c);

	c->loop = loop;
	c->ops = ops;
	c->owner = owner;
	c->id = id;
	c->max_line = max_line;
	c->mode = CONN_MODE_LINE;
	buf_init(&c->in);
	buf_init(&c->line);
	buf_init(&c->out);
	uv_tcp_init(loop, &c->tcp);
	uv_timer_init(loop, &c->timer);
	c->tcp.data = c;
	c->timer.data = c;
	return c;
}

/* conn_set_peer - remember the peer address as a sockaddr and as text */
static void
conn_set_peer(struct conn *c)
{
	int len = sizeof c->peer_sa;

	if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->peer_sa,
	    &len) == 0) {
		if (c->peer_sa.ss_family == AF_INET6)
			uv_ip6_name((struct sockaddr_in6 *)&c->peer_sa,
			    c->peer, sizeof c->peer);
		else
			uv_ip4_name((struct sockaddr_in *)&c->peer_sa,
			    c->peer, sizeof c->peer);
	} else {
		str_copy(c->peer, "unknown", sizeof c->peer);
	}
}

int
conn_accept(struct conn *c, uv_stream_t *server)
{
	int rc;

	if ((rc = uv_accept(server, (uv_stream_t *)&c->tcp)) < 0)
		return rc;
	c->flags |= CONN_F_ACCEPTED;
	uv_tcp_nodelay(&c->tcp, 1);
	conn_set_peer(c);
	conn_read_update(c);
	return 0;
}

int
conn_connect(struct conn *c, const struct sockaddr *dst,
    const struct sockaddr *src, conn_connect_cb cb)
{
	int rc;

	if (src && (rc = uv_tcp_bind(&c->tcp, src, 0)) < 0)
		return rc;
	c->on_connect = cb;
	c->connect.data = c;
	c->flags |= CONN_F_OUTBOUND;
	/* Until connected, name the peer we are trying, for logs. */
	if (dst->sa_family == AF_INET6)
		uv_ip6_name((const struct sockaddr_in6 *)(const void *)dst,
		    c->peer, sizeof c->peer);
	else
		uv_ip4_name((const struct sockaddr_in *)(const void *)dst,
		    c->peer, sizeof c->peer);
	return uv_tcp_connect(&c->connect, &c->tcp, dst, conn_on_connect);
}

static void
conn_on_connect(uv_connect_t *req, int status)
{
	struct conn *c = req->data;

	if (c->flags & CONN_F_CLOSING)
		return;		/* UV_ECANCELED after conn_close */
	if (status == 0) {
		c->flags |= CONN_F_ACCEPTED;
		uv_tcp_nodelay(&c->tcp, 1);
		conn_set_peer(c);
		conn_read_update(c);
	}
	c->on_connect(c, status);
}

void *
conn_owner(const struct conn *c)
{
	return c->owner;
}

uint64_t
conn_id(const struct conn *c)
{
	return c->id;
}

const char *
conn_peer(const struct conn *c)
{
	return c->peer;
}

const struct sockaddr *
conn_peer_sa(const struct conn *c)
{
	return (const struct sockaddr *)&c->peer_sa;
}

bool
conn_is_tls(const struct conn *c)
{
	return c->has_tls && !c->tls.handshaking;
}

const char *
conn_tls_text(const struct conn *c)
{
	return c->tls_text;
}

bool
conn_is_closing(const struct conn *c)
{
	return (c->flags & CONN_F_CLOSING) != 0;
}

size_t
conn_input_pending(const struct conn *c)
{
	return c->in.len;
}

void
conn_set_mode(struct conn *c, enum conn_mode mode)
{
	c->mode = mode;
}

void
conn_set_timeout(struct conn *c, uint64_t ms)
{
	c->timeout_ms = ms;
	if (c->flags & (CONN_F_CLOSING | CONN_F_SHUTDOWN | CONN_F_WDEAD))
		return;
	if (ms)
		uv_timer_start(&c->timer, conn_on_timer, ms, 0);
	else
		uv_timer_stop(&c->timer);
}

/* conn_read_update - read exactly when nothing asks us not to */
static void
conn_read_update(struct conn *c)
{
	bool want = (c->flags & CONN_F_ACCEPTED) &&
	    !(c->flags & (CONN_F_CLOSING | CONN_F_PAUSED | CONN_F_SHUTDOWN |
	    CONN_F_WBLOCKED));

	if (want && !(c->flags & CONN_F_READING)) {
		if (uv_read_start((uv_stream_t *)&c->tcp, conn_on_alloc,
		    conn_on_read) == 0)
			c->flags |= CONN_F_READING;
	} else if (!want && (c->flags & CONN_F_READING)) {
		uv_read_stop((uv_stream_t *)&c->tcp);
		c->flags &= ~CONN_F_READING;
	}
}

static void
conn_on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
	b->base = xmalloc(CONN_READ_CHUNK);
	b->len = CONN_READ_CHUNK;
}

static void
conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
	struct conn *c = s->data;
	char err[512];
	bool ready = false;
	int rc;

	if (nread == 0 || (c->flags & CONN_F_CLOSING)) {
		free(b->base);
		return;
	}
	if (nread < 0) {
		free(b->base);
		const char *why = nread == UV_EOF ? "eof" : uv_err_name((int)nread);
		if (c->ops->on_eof)
			c->ops->on_eof(c, why);
		conn_close(c, why);
		return;
	}
	if (c->timeout_ms && !(c->flags & (CONN_F_SHUTDOWN | CONN_F_WDEAD)))
		uv_timer_start(&c->timer, conn_on_timer, c->timeout_ms, 0);
	if (!c->has_tls) {
		buf_append(&c->in, b->base, (size_t)nread);
		free(b->base);
		conn_dispatch(c);
		return;
	}
	tls_pump_feed(&c->tls, b->base, (size_t)nread);
	free(b->base);
	rc = tls_pump_step(&c->tls, &c->in, &ready, err, sizeof err);
	if (conn_send_cipher(c) < 0)
		return;
	if (rc < 0) {
		char why[600];

		log_info("%016llx conn tls-error peer=%s error=\"%s\"",
		    (unsigned long long)c->id, c->peer, err);
		snprintf(why, sizeof why, "TLS: %s", err);
		if (c->ops->on_eof)
			c->ops->on_eof(c, why);
		conn_close(c, "tls error");
		return;
	}
	if (ready) {
		tls_pump_describe(&c->tls, c->tls_text, sizeof c->tls_text);
		if (c->ops->on_tls_ready)
			c->ops->on_tls_ready(c);
		if (c->flags & CONN_F_CLOSING)
			return;
		conn_flush(c);	/* output queued during the handshake */
	}
	conn_dispatch(c);
	if (rc == TLS_PUMP_CLOSED && !(c->flags & CONN_F_CLOSING)) {
		if (c->ops->on_eof)
			c->ops->on_eof(c, "close_notify");
		conn_close(c, "close_notify");
	}
}

/* conn_dispatch - hand buffered input to the owner until paused or dry */
static void
conn_dispatch(struct conn *c)
{
	if (c->flags & CONN_F_DISPATCHING)
		return;
	c->flags |= CONN_F_DISPATCHING;
	while (!(c->flags & (CONN_F_CLOSING | CONN_F_PAUSED)) && c->in.len) {
		if (c->mode == CONN_MODE_RAW) {
			size_t n = c->ops->on_raw(c, c->in.data, c->in.len);
			if (c->flags & CONN_F_CLOSING)
				break;
			if (n > c->in.len)
				relay_panic("conn on_raw consumed %zu of %zu",
				    n, c->in.len);
			buf_consume(&c->in, n);
			if (n == 0 && c->mode == CONN_MODE_RAW)
				break;
			continue;
		}
		char *lf = memchr(c->in.data, '\n', c->in.len);
		if (lf == NULL) {
			/* No end in sight: drop what we have, keep dropping. */
			if (c->in.len >= c->max_line) {
				c->flags |= CONN_F_DISCARD;
				buf_reset(&c->in);
			}
			break;
		}
		size_t raw = (size_t)(lf - c->in.data) + 1;
		bool too_long = (c->flags & CONN_F_DISCARD) || raw > c->max_line;
		size_t len = raw - 1;

		if (len > 0 && c->in.data[len - 1] == '\r')
			len--;
		buf_reset(&c->line);
		if (!too_long)
			buf_append(&c->line, c->in.data, len);
		else
			buf_append(&c->line, "", 0);
		c->flags &= ~CONN_F_DISCARD;
		/*
		 * Consume before the callback: conn_start_tls must see only
		 * what follows this line.
		 */
		buf_consume(&c->in, raw);
		c->ops->on_line(c, c->line.data, too_long ? 0 : len, too_long);
	}
	c->flags &= ~CONN_F_DISPATCHING;
	if (c->flags & CONN_F_CLOSING)
		return;
	conn_flush(c);
	conn_read_update(c);
}

int
conn_start_tls(struct conn *c, SSL_CTX *ctx, bool server, const char *sni)
{
	int rc;

	if (c->in.len > 0)
		return RELAY_EPROTO;	/* bytes pipelined after STARTTLS */
	if (c->has_tls)
		return RELAY_EPROTO;
	conn_flush(c);			/* the 220 goes out in clear */
	if (c->flags & CONN_F_CLOSING)
		return UV_ECANCELED;
	if ((rc = tls_pump_init(&c->tls, ctx, server, sni)) < 0)
		return rc;
	c->has_tls = true;
	if (!server) {
		/* The client speaks first: produce the ClientHello. */
		bool ready;
		char err[256];
		tls_pump_step(&c->tls, &c->in, &ready, err, sizeof err);
		return conn_send_cipher(c);
	}
	return 0;
}

void
conn_write(struct conn *c, const void *data, size_t len)
{
	if (c->flags & (CONN_F_CLOSING | CONN_F_SHUTDOWN))
		return;
	buf_append(&c->out, data, len);
	if (!(c->flags & CONN_F_DISPATCHING))
		conn_flush(c);
}

void
conn_printf(struct conn *c, const char *fmt, ...)
{
	char tmp[1024], *p = tmp;
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof tmp) {
		p = xmalloc((size_t)n + 1);
		va_start(ap, fmt);
		vsnprintf(p, (size_t)n + 1, fmt, ap);
		va_end(ap);
	}
	conn_write(c, p, (size_t)n);
	if (p != tmp)
		free(p);
}

void
conn_flush(struct conn *c)
{
	char err[512];

	if (c->out.len == 0 || (c->flags & CONN_F_CLOSING))
		return;
	if (!c->has_tls) {
		if (conn_send_raw(c, c->out.data, c->out.len) == 0)
			buf_reset(&c->out);
		return;
	}
	if (c->tls.handshaking)
		return;		/* sent once the handshake completes */
	if (tls_pump_write(&c->tls, c->out.data, c->out.len, err,
	    sizeof err) < 0) {
		log_info("%016llx conn tls-error peer=%s error=\"%s\"",
		    (unsigned long long)c->id, c->peer, err);
		conn_close(c, "tls write error");
		return;
	}
	buf_reset(&c->out);
	conn_send_cipher(c);
}

/* conn_submit - hand w (filled, w->len set) to uv_write; it owns w now */
static int
conn_submit(struct conn *c, struct conn_wreq *w)
{
	uv_buf_t ub = uv_buf_init(w->data, (unsigned int)w->len);
	int rc;

	if (c->flags & CONN_F_WDEAD) {
		free(w);	/* nobody listens: drop it */
		return 0;
	}
	if ((rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &ub, 1,
	    conn_on_write_done)) < 0) {
		free(w);
		conn_write_failed(c, uv_err_name(rc));
		if (c->flags & CONN_F_CLOSING)
			return rc;
		return 0;	/* the caller goes on; we are draining */
	}
	return rc;
}

/* conn_send_raw - one uv_write that owns a copy of the bytes */
static int
conn_send_raw(struct conn *c, const void *data, size_t len)
{
	struct conn_wreq *w = xmalloc(sizeof *w + len);
	int rc;

	w->len = len;
	memcpy(w->data, data, len);
	if ((rc = conn_submit(c, w)) < 0)
		return rc;
	conn_after_write(c);
	return 0;
}

/* conn_send_cipher - drain the TLS write BIO to the socket */
static int
conn_send_cipher(struct conn *c)
{
	size_t n;
	int rc;

	while ((n = tls_pump_pending(&c->tls)) > 0) {
		struct conn_wreq *w = xmalloc(sizeof *w + n);

		w->len = tls_pump_take(&c->tls, w->data, n);
		if ((rc = conn_submit(c, w)) < 0)
			return rc;
	}
	conn_after_write(c);
	return 0;
}

/*
 * conn_write_failed - a write failed (EPIPE, ECONNRESET). An inbound
 * conn closes; an outbound one stops writing and reads on for at most
 * CONN_DRAIN_MS, so the reply the server sent before it went (a 421
 * after our pipelined commands) still reaches the owner; EOF, a read
 * error or the timer then close it with the write error as the reason.
 */
static void
conn_write_failed(struct conn *c, const char *why)
{
	if (c->flags & (CONN_F_CLOSING | CONN_F_WDEAD))
		return;
	if (!(c->flags & CONN_F_OUTBOUND) || (c->flags & CONN_F_SHUTDOWN)) {
		conn_close(c, why);
		return;
	}
	log_trace(TRACE_IO, "%016llx conn write-error peer=%s error=%s: "
	    "reading what is left", (unsigned long long)c->id, c->peer, why);
	c->flags |= CONN_F_WDEAD;
	c->flags &= ~CONN_F_WBLOCKED;
	c->wdead_why = why;
	buf_reset(&c->out);
	uv_timer_start(&c->timer, conn_on_timer, CONN_DRAIN_MS, 0);
	if (!(c->flags & CONN_F_DISPATCHING))
		conn_dispatch(c);	/* lines already buffered */
	if (!(c->flags & CONN_F_CLOSING))
		conn_read_update(c);
}

/* conn_after_write - stop reading while the peer does not read replies */
static void
conn_after_write(struct conn *c)
{
	if (c->flags & CONN_F_WDEAD)
		return;
	if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) >
	    CONN_WRITE_HIWAT) {
		c->flags |= CONN_F_WBLOCKED;
		conn_read_update(c);
	}
}

static void
conn_on_write_done(uv_write_t *req, int status)
{
	struct conn_wreq *w = container_of(req, struct conn_wreq, req);
	struct conn *c = req->handle->data;
	size_t queued;

	free(w);
	if (c->flags & CONN_F_CLOSING)
		return;
	if (status < 0) {
		conn_write_failed(c, uv_err_name(status));
		return;
	}
	if (c->flags & CONN_F_WDEAD)
		return;
	queued = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
	if ((c->flags & CONN_F_SHUTDOWN) && queued == 0) {
		conn_close(c, "shutdown");
		return;
	}
	if ((c->flags & CONN_F_WBLOCKED) && queued < CONN_WRITE_LOWAT) {
		c->flags &= ~CONN_F_WBLOCKED;
		conn_read_update(c);
		if (c->ops->on_drain)
			c->ops->on_drain(c);
	}
}

bool
conn_write_blocked(const struct conn *c)
{
	return (c->flags & CONN_F_WBLOCKED) != 0;
}

void
conn_pause(struct conn *c)
{
	c->flags |= CONN_F_PAUSED;
	if (!(c->flags & CONN_F_DISPATCHING)) {
		conn_flush(c);
		conn_read_update(c);
	}
}

void
conn_resume(struct conn *c)
{
	if (!(c->flags & CONN_F_PAUSED) || (c->flags & CONN_F_CLOSING))
		return;
	c->flags &= ~CONN_F_PAUSED;
	if (c->flags & CONN_F_DISPATCHING)
		return;		/* the running dispatch loop goes on */
	if (c->timeout_ms && !(c->flags & CONN_F_WDEAD))
		uv_timer_start(&c->timer, conn_on_timer, c->timeout_ms, 0);
	conn_dispatch(c);
}

static void
conn_on_timer(uv_timer_t *t)
{
	struct conn *c = t->data;

	if (c->flags & CONN_F_CLOSING)
		return;
	if (c->flags & CONN_F_WDEAD) {
		conn_close(c, c->wdead_why);
		return;
	}
	if (c->flags & CONN_F_SHUTDOWN) {
		conn_close(c, "shutdown timeout");
		return;
	}
	if (c->ops->on_timeout)
		c->ops->on_timeout(c);
	else
		conn_close(c, "timeout");
}

void
conn_shutdown(struct conn *c, const char *reason)
{
	if (c->flags & (CONN_F_CLOSING | CONN_F_SHUTDOWN))
		return;
	if (c->flags & CONN_F_WDEAD) {
		conn_close(c, reason);	/* nothing can be said any more */
		return;
	}
	conn_flush(c);
	if (c->flags & CONN_F_CLOSING)
		return;
	if (c->has_tls && !c->tls.handshaking) {
		tls_pump_shutdown(&c->tls);
		if (conn_send_cipher(c) < 0)
			return;
	}
	c->flags |= CONN_F_SHUTDOWN;
	conn_read_update(c);
	log_trace(TRACE_IO, "%016llx conn shutdown reason=%s",
	    (unsigned long long)c->id, reason);
	if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) == 0) {
		conn_close(c, reason);
		return;
	}
	uv_timer_start(&c->timer, conn_on_timer, CONN_SHUTDOWN_MS, 0);
}

void
conn_close(struct conn *c, const char *reason)
{
	if (c->flags & CONN_F_CLOSING)
		return;
	c->flags |= CONN_F_CLOSING;
	log_trace(TRACE_IO, "%016llx conn close peer=%s reason=%s",
	    (unsigned long long)c->id, c->peer, reason);
	if (c->flags & CONN_F_READING)
		uv_read_stop((uv_stream_t *)&c->tcp);
	c->pending_closes = 2;
	uv_close((uv_handle_t *)&c->tcp, conn_on_handle_closed);
	uv_close((uv_handle_t *)&c->timer, conn_on_handle_closed);
}

static void
conn_on_handle_closed(uv_handle_t *h)
{
	struct conn *c = h->data;

	if (--c->pending_closes > 0)
		return;
	if (c->ops->on_closed)
		c->ops->on_closed(c);
	if (c->has_tls)
		tls_pump_free(&c->tls);
	buf_free(&c->in);
	buf_free(&c->line);
	buf_free(&c->out);
	free(c);
}
