/*
 * conn.h - one TCP connection, plaintext or TLS, used by both the
 * submission server and (later) the delivery client.
 *
 * A conn owns an embedded uv_tcp_t and uv_timer_t, an optional TLS pump,
 * a plaintext input buffer cut into lines with a hard length limit (or
 * handed over raw, for DATA), and a plaintext output buffer. Replies
 * written while input is being dispatched are batched and flushed when the
 * input runs dry or the owner pauses (RFC 2920 pipelining).
 *
 * Callbacks never free the conn: conn_close() marks it, closes the handles,
 * and ops->on_closed runs from the last close callback, after which the
 * owner must not touch it.
 */
#ifndef RELAY_CONN_H
#define RELAY_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>
#include <openssl/ssl.h>

#include "config/util.h"
#include "tls/tls.h"

struct conn;

enum conn_mode {
	CONN_MODE_LINE,		/* deliver complete lines to on_line */
	CONN_MODE_RAW,		/* deliver bytes to on_raw */
};

struct conn_ops {
	/*
	 * on_line - one line without its CRLF (or bare LF), NUL-terminated;
	 * len may count embedded NULs. too_long: the line exceeded the
	 * limit and was dropped (line is empty then).
	 */
	void (*on_line)(struct conn *c, char *line, size_t len, bool too_long);
	/* on_raw - bytes in raw mode; returns how many it consumed */
	size_t (*on_raw)(struct conn *c, const char *data, size_t len);
	/* on_tls_ready - the handshake completed */
	void (*on_tls_ready)(struct conn *c);
	/* on_timeout - no input for the configured timeout */
	void (*on_timeout)(struct conn *c);
	/* on_eof - the peer closed (or TLS close_notify); conn is closing */
	void (*on_eof)(struct conn *c, const char *reason);
	/* on_drain - output fell below the low-water mark after being
	 * above the high-water mark: a producer may write again */
	void (*on_drain)(struct conn *c);
	/* on_closed - handles are closed; free the owner, forget the conn */
	void (*on_closed)(struct conn *c);
};

/* conn_new - allocate with an initialised (unconnected) uv_tcp_t */
struct conn *conn_new(uv_loop_t *loop, const struct conn_ops *ops,
    void *owner, uint64_t id, size_t max_line);

/* conn_accept - accept from a listening stream and start reading */
int conn_accept(struct conn *c, uv_stream_t *server);

/* conn_connect_cb - status 0 (connected, reading) or a UV_E* error */
typedef void (*conn_connect_cb)(struct conn *c, int status);

/*
 * conn_connect - connect to dst, from src when not NULL (source address
 * binding). cb runs later from the loop; on error the owner closes the
 * conn. A connect timeout is the owner's conn_set_timeout.
 */
int conn_connect(struct conn *c, const struct sockaddr *dst,
    const struct sockaddr *src, conn_connect_cb cb);

void *conn_owner(const struct conn *c);
uint64_t conn_id(const struct conn *c);
/* conn_peer - numeric peer address text; conn_peer_sa - the sockaddr */
const char *conn_peer(const struct conn *c);
const struct sockaddr *conn_peer_sa(const struct conn *c);
bool conn_is_tls(const struct conn *c);
/* conn_tls_text - "TLSv1.3 TLS_AES_256_GCM_SHA384" or "" */
const char *conn_tls_text(const struct conn *c);
bool conn_is_closing(const struct conn *c);
/* conn_input_pending - plaintext bytes received but not yet dispatched */
size_t conn_input_pending(const struct conn *c);

void conn_set_mode(struct conn *c, enum conn_mode mode);
/* conn_set_timeout - idle timeout in ms, re-armed on each read; 0 = none */
void conn_set_timeout(struct conn *c, uint64_t ms);

/*
 * conn_start_tls - begin a handshake (server or client). Any plaintext
 * already buffered from the peer is an injection attempt (RFC 3207): the
 * call fails with RELAY_EPROTO and nothing is started. Pending plaintext
 * output is flushed in clear first (the "220 Ready" reply).
 */
int conn_start_tls(struct conn *c, SSL_CTX *ctx, bool server,
    const char *sni);

/* conn_write / conn_printf - queue plaintext; flushed as described above */
void conn_write(struct conn *c, const void *data, size_t len);
void conn_printf(struct conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void conn_flush(struct conn *c);
/* conn_write_blocked - more output queued than the high-water mark */
bool conn_write_blocked(const struct conn *c);

/*
 * conn_pause / conn_resume - stop/restart reading and dispatching input
 * (while the owner waits for the disk, a timer, ...). Resuming dispatches
 * what is already buffered, from a fresh call stack if needed.
 */
void conn_pause(struct conn *c);
void conn_resume(struct conn *c);

/* conn_shutdown - flush, send close_notify, close once written */
void conn_shutdown(struct conn *c, const char *reason);
/* conn_close - abort now; idempotent */
void conn_close(struct conn *c, const char *reason);

#endif
