/*
 * tls.h - OpenSSL contexts and the memory-BIO pump.
 *
 * The pump is I/O-free: the owner feeds ciphertext read from the socket,
 * steps the state machine to get plaintext, writes plaintext, and takes the
 * ciphertext to send. relay/conn.c drives it over a libuv stream; nothing
 * here knows about libuv, so both directions share exactly one TLS path.
 */
#ifndef RELAY_TLS_H
#define RELAY_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include <openssl/ssl.h>

#include "config/util.h"

/* tls_server_ctx_new - TLS >= 1.2 server context from PEM files, or NULL */
SSL_CTX *tls_server_ctx_new(const char *cert, const char *key, char *err,
    size_t errlen);

/* tls_client_ctx_new - client context (opportunistic: no verification) */
SSL_CTX *tls_client_ctx_new(char *err, size_t errlen);

/*
 * tls_client_verify_ctx_new - client context that requires a certificate
 * chain to ca_file; a pump made from it also checks the peer's name
 * against the sni given to tls_pump_init.
 */
SSL_CTX *tls_client_verify_ctx_new(const char *ca_file, char *err,
    size_t errlen);

/*
 * tls_selfsigned_create - write a new self-signed P-256 certificate for
 * name (CN and subjectAltName) and its key (mode 0600). Parent directories
 * are created. Returns 0 or -errno/RELAY_ETLS with err set.
 */
int tls_selfsigned_create(const char *cert, const char *key,
    const char *name, char *err, size_t errlen);

/* tls_error_text - drain OpenSSL's error queue into one line */
void tls_error_text(char *out, size_t outlen);

#define TLS_PUMP_CLOSED 1	/* tls_pump_step: peer sent close_notify */

struct tls_pump {
	SSL *ssl;		/* owns rbio and wbio */
	BIO *rbio;		/* ciphertext from the peer, fed by the owner */
	BIO *wbio;		/* ciphertext to the peer, taken by the owner */
	bool handshaking;	/* until SSL_do_handshake succeeds */
	bool ready_reported;	/* tls_pump_step reported completion once */
};

/* tls_pump_init - attach a new SSL in accept or connect state; 0 or error */
int tls_pump_init(struct tls_pump *tp, SSL_CTX *ctx, bool server,
    const char *sni);
void tls_pump_free(struct tls_pump *tp);

/* tls_pump_feed - hand ciphertext from the socket to OpenSSL */
void tls_pump_feed(struct tls_pump *tp, const void *data, size_t len);

/*
 * tls_pump_step - advance the handshake and decrypt everything available
 * into plain. *ready is set true exactly once, when the handshake has just
 * completed. Returns 0, TLS_PUMP_CLOSED, or RELAY_ETLS (err filled).
 */
int tls_pump_step(struct tls_pump *tp, struct buf *plain, bool *ready,
    char *err, size_t errlen);

/* tls_pump_write - encrypt plaintext (only after the handshake) */
int tls_pump_write(struct tls_pump *tp, const void *data, size_t len,
    char *err, size_t errlen);

/* tls_pump_shutdown - queue a close_notify */
void tls_pump_shutdown(struct tls_pump *tp);

/* tls_pump_pending - ciphertext bytes waiting to be sent */
size_t tls_pump_pending(const struct tls_pump *tp);
/* tls_pump_take - move up to len bytes of pending ciphertext into out */
size_t tls_pump_take(struct tls_pump *tp, void *out, size_t len);

/* tls_pump_describe - "TLSv1.3 TLS_AES_256_GCM_SHA384" for logs/Received */
void tls_pump_describe(const struct tls_pump *tp, char *out, size_t outlen);

#endif
