/*
 * tls.c - OpenSSL contexts, self-signed certificates and the memory-BIO pump.
 *
 * The pump keeps OpenSSL away from sockets: ciphertext goes in through a
 * memory BIO whose EOF behaviour is "retry" (an empty BIO means "wait for
 * more", never end-of-stream), and comes out through another memory BIO the
 * owner drains after every call that can produce output (handshake, read,
 * write, shutdown: TLS 1.3 may emit tickets during SSL_read).
 *
 * Error policy: every OpenSSL failure becomes RELAY_ETLS with the drained
 * error queue as text, so a log line can say why.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "config/util.h"
#include "tls/tls.h"

static int mkdir_parents(const char *path);
static int ctx_common(SSL_CTX *ctx, char *err, size_t errlen);

void
tls_error_text(char *out, size_t outlen)
{
	unsigned long e;
	size_t o = 0;

	if (outlen == 0)
		return;
	out[0] = '\0';
	while ((e = ERR_get_error()) != 0) {
		char one[256];

		ERR_error_string_n(e, one, sizeof one);
		int n = snprintf(out + o, outlen - o, "%s%s", o ? "; " : "",
		    one);
		if (n < 0 || (size_t)n >= outlen - o)
			break;
		o += (size_t)n;
	}
	if (o == 0)
		snprintf(out, outlen, "unknown TLS error");
}

/* ctx_common - settings both directions share */
static int
ctx_common(SSL_CTX *ctx, char *err, size_t errlen)
{
	if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)) {
		tls_error_text(err, errlen);
		return RELAY_ETLS;
	}
	/* Thousands of idle sessions: give the 34 KB buffers back. */
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION |
	    SSL_OP_NO_COMPRESSION);
	return 0;
}

SSL_CTX *
tls_server_ctx_new(const char *cert, const char *key, char *err,
    size_t errlen)
{
	SSL_CTX *ctx;
	char why[512];

	ERR_clear_error();
	if ((ctx = SSL_CTX_new(TLS_server_method())) == NULL) {
		tls_error_text(why, sizeof why);
		snprintf(err, errlen, "SSL_CTX_new: %s", why);
		return NULL;
	}
	if (ctx_common(ctx, why, sizeof why) < 0) {
		snprintf(err, errlen, "%s", why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
	if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
		tls_error_text(why, sizeof why);
		snprintf(err, errlen, "%s: cannot load certificate: %s", cert,
		    why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
		tls_error_text(why, sizeof why);
		snprintf(err, errlen, "%s: cannot load private key: %s", key,
		    why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	if (SSL_CTX_check_private_key(ctx) != 1) {
		tls_error_text(why, sizeof why);
		snprintf(err, errlen, "%s does not match %s: %s", key, cert,
		    why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

SSL_CTX *
tls_client_ctx_new(char *err, size_t errlen)
{
	SSL_CTX *ctx;
	char why[512];

	ERR_clear_error();
	if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL) {
		tls_error_text(why, sizeof why);
		snprintf(err, errlen, "SSL_CTX_new: %s", why);
		return NULL;
	}
	if (ctx_common(ctx, why, sizeof why) < 0) {
		snprintf(err, errlen, "%s", why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	return ctx;
}

SSL_CTX *
tls_client_verify_ctx_new(const char *ca_file, char *err, size_t errlen)
{
	SSL_CTX *ctx;
	char why[512];

	if ((ctx = tls_client_ctx_new(err, errlen)) == NULL)
		return NULL;
	if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
		tls_error_text(why, sizeof why);
		snprintf(err, errlen, "%s: cannot load CA bundle: %s", ca_file,
		    why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	return ctx;
}

/* mkdir_parents - create every missing directory above path (mode 0700) */
static int
mkdir_parents(const char *path)
{
	char tmp[4096];

	if (str_copy(tmp, path, sizeof tmp) >= sizeof tmp)
		return -ENAMETOOLONG;
	for (char *p = tmp + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(tmp, 0700) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	return 0;
}

int
tls_selfsigned_create(const char *cert, const char *key, const char *name,
    char *err, size_t errlen)
{
	EVP_PKEY *pkey = NULL;
	X509 *x = NULL;
	X509_EXTENSION *ext = NULL;
	FILE *fk = NULL, *fc = NULL;
	char san[300], why[512];
	int rc = RELAY_ETLS, fd;

	ERR_clear_error();
	if ((rc = mkdir_parents(cert)) < 0 || (rc = mkdir_parents(key)) < 0) {
		snprintf(err, errlen, "%s: cannot create directory: %s", cert,
		    relay_strerror(rc));
		return rc;
	}
	rc = RELAY_ETLS;
	if ((pkey = EVP_EC_gen("P-256")) == NULL || (x = X509_new()) == NULL)
		goto tls_fail;
	X509_set_version(x, 2);
	{
		unsigned char serial[16];
		BIGNUM *bn;

		if (RAND_bytes(serial, sizeof serial) != 1)
			goto tls_fail;
		serial[0] &= 0x7f;
		bn = BN_bin2bn(serial, sizeof serial, NULL);
		BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x));
		BN_free(bn);
	}
	X509_gmtime_adj(X509_getm_notBefore(x), -3600);
	X509_gmtime_adj(X509_getm_notAfter(x), 10L * 365 * 24 * 3600);
	X509_set_pubkey(x, pkey);
	X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_UTF8,
	    (const unsigned char *)name, -1, -1, 0);
	X509_set_issuer_name(x, X509_get_subject_name(x));
	snprintf(san, sizeof san, "DNS:%s", name);
	if ((ext = X509V3_EXT_conf_nid(NULL, NULL, NID_subject_alt_name,
	    san)) == NULL)
		goto tls_fail;
	X509_add_ext(x, ext, -1);
	if (X509_sign(x, pkey, EVP_sha256()) == 0)
		goto tls_fail;

	/* The key is created 0600 from the start, never world-readable. */
	if ((fd = open(key, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0 ||
	    (fk = fdopen(fd, "w")) == NULL) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", key, strerror(errno));
		goto done;
	}
	if ((fc = fopen(cert, "w")) == NULL) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", cert, strerror(errno));
		goto done;
	}
	if (!PEM_write_PrivateKey(fk, pkey, NULL, NULL, 0, NULL, NULL) ||
	    !PEM_write_X509(fc, x))
		goto tls_fail;
	rc = 0;
	goto done;

tls_fail:
	tls_error_text(why, sizeof why);
	snprintf(err, errlen, "self-signed certificate: %s", why);
	rc = RELAY_ETLS;
done:
	if (fk && fclose(fk) != 0 && rc == 0)
		rc = -errno;
	if (fc && fclose(fc) != 0 && rc == 0)
		rc = -errno;
	X509_EXTENSION_free(ext);
	X509_free(x);
	EVP_PKEY_free(pkey);
	return rc;
}

int
tls_pump_init(struct tls_pump *tp, SSL_CTX *ctx, bool server,
    const char *sni)
{
	memset(tp, 0, sizeof *tp);
	ERR_clear_error();
	if ((tp->ssl = SSL_new(ctx)) == NULL)
		return RELAY_ETLS;
	tp->rbio = BIO_new(BIO_s_mem());
	tp->wbio = BIO_new(BIO_s_mem());
	if (tp->rbio == NULL || tp->wbio == NULL) {
		BIO_free(tp->rbio);
		BIO_free(tp->wbio);
		SSL_free(tp->ssl);
		tp->ssl = NULL;
		return RELAY_ETLS;
	}
	/* An empty read BIO means "retry later", never end of stream. */
	BIO_set_mem_eof_return(tp->rbio, -1);
	SSL_set_bio(tp->ssl, tp->rbio, tp->wbio);
	if (server) {
		SSL_set_accept_state(tp->ssl);
	} else {
		SSL_set_connect_state(tp->ssl);
		if (sni)
			SSL_set_tlsext_host_name(tp->ssl, sni);
		/* A verifying context also checks the name (RFC 6125). */
		if (sni && (SSL_CTX_get_verify_mode(ctx) & SSL_VERIFY_PEER) &&
		    SSL_set1_host(tp->ssl, sni) != 1) {
			SSL_free(tp->ssl);
			tp->ssl = NULL;
			return RELAY_ETLS;
		}
	}
	tp->handshaking = true;
	return 0;
}

void
tls_pump_free(struct tls_pump *tp)
{
	SSL_free(tp->ssl);	/* frees both BIOs */
	tp->ssl = NULL;
}

void
tls_pump_feed(struct tls_pump *tp, const void *data, size_t len)
{
	/* A memory BIO grows to take everything. */
	BIO_write(tp->rbio, data, (int)len);
}

int
tls_pump_step(struct tls_pump *tp, struct buf *plain, bool *ready,
    char *err, size_t errlen)
{
	char tmp[16384];
	int r;

	*ready = false;
	ERR_clear_error();
	if (tp->handshaking) {
		r = SSL_do_handshake(tp->ssl);
		if (r != 1) {
			int e = SSL_get_error(tp->ssl, r);
			if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
				return 0;
			tls_error_text(err, errlen);
			return RELAY_ETLS;
		}
		tp->handshaking = false;
		*ready = true;
	}
	for (;;) {
		r = SSL_read(tp->ssl, tmp, sizeof tmp);
		if (r > 0) {
			buf_append(plain, tmp, (size_t)r);
			continue;
		}
		switch (SSL_get_error(tp->ssl, r)) {
		case SSL_ERROR_WANT_READ:
		case SSL_ERROR_WANT_WRITE:
			return 0;
		case SSL_ERROR_ZERO_RETURN:
			return TLS_PUMP_CLOSED;
		default:
			tls_error_text(err, errlen);
			return RELAY_ETLS;
		}
	}
}

int
tls_pump_write(struct tls_pump *tp, const void *data, size_t len,
    char *err, size_t errlen)
{
	ERR_clear_error();
	if (len == 0)
		return 0;
	/* With memory BIOs SSL_write takes everything or fails. */
	if (SSL_write(tp->ssl, data, (int)len) <= 0) {
		tls_error_text(err, errlen);
		return RELAY_ETLS;
	}
	return 0;
}

void
tls_pump_shutdown(struct tls_pump *tp)
{
	ERR_clear_error();
	if (!tp->handshaking)
		SSL_shutdown(tp->ssl);
	ERR_clear_error();
}

size_t
tls_pump_pending(const struct tls_pump *tp)
{
	return BIO_ctrl_pending(tp->wbio);
}

size_t
tls_pump_take(struct tls_pump *tp, void *out, size_t len)
{
	int n = BIO_read(tp->wbio, out, (int)len);

	return n > 0 ? (size_t)n : 0;
}

void
tls_pump_describe(const struct tls_pump *tp, char *out, size_t outlen)
{
	snprintf(out, outlen, "%s %s", SSL_get_version(tp->ssl),
	    SSL_get_cipher_name(tp->ssl));
}
