/*
 * test_dsn.c - unit tests for relay/dsn.c: the multipart/report structure,
 * the per-message and per-recipient fields, what is returned of the
 * original (RET=FULL, HDRS, unspecified, too large, unclean), CRLF-only
 * output with bounded lines whatever the input, long original header
 * lines kept byte for byte, field injection, RFC 6533 addresses, the
 * boundary collision check, invalid input, and the dsn_wanted table.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/util.h"
#include "queue/envelope.h"
#include "relay/dsn.h"
#include "tests/unit/test.h"

#define HOST	"mx1.relay.example"
#define SEED	"6743a1f0000a3c7e"
#define NOW	1732430000	/* Sun, 24 Nov 2024 06:33:20 +0000 */
#define HDRS	"Received: from client.example\r\n" \
		"From: Alice <alice@example.com>\r\n" \
		"To: bob@example.net\r\n" \
		"Subject: quarterly report\r\n" \
		"Message-ID: <orig-1@example.com>\r\n"
#define BODY	"Body line one\r\n.leading dot\r\nSECRET-BODY-TEXT\r\n"

/* One body part of a parsed notification. */
struct part {
	const char *hdr;	/* its MIME header, without the empty line */
	size_t hlen;		/* length of hdr */
	const char *body;	/* its content, up to the next delimiter */
	size_t blen;		/* length of body */
};

/* A built notification and what it came from. */
struct fixture {
	struct envelope env;	/* the original's envelope */
	struct dsn_rcpt r[4];	/* what is reported */
	struct buf out;		/* dsn_build output */
	unsigned needs;		/* its needs */
	int fd;			/* the original message, unlinked file */
	char boundary[128];	/* found in out */
	struct part parts[4];	/* found in out */
	int nparts;		/* how many */
};

static int orig_fd(const char *, size_t);
static void fx_init(struct fixture *, const char *);
static void fx_free(struct fixture *);
static int fx_build(struct fixture *, size_t);
static void fx_parse(struct fixture *);
static bool has_line(const char *, size_t, const char *);
static bool contains(const char *, size_t, const char *);
static size_t count_of(const char *, size_t, const char *);
static void assert_crlf(const struct buf *);
static void assert_status_part(const struct fixture *);
static char *unfold(const char *, size_t);

/* orig_fd - an unlinked temporary file holding data, offset at 0 */
static int
orig_fd(const char *data, size_t len)
{
	char path[] = "/tmp/relay-dsn-XXXXXX";
	int fd;

	ASSERT((fd = mkstemp(path)) >= 0);
	ASSERT_EQ(unlink(path), 0);
	ASSERT_EQ(fd_write_all(fd, data, len), 0);
	ASSERT_EQ(lseek(fd, 0, SEEK_SET), 0);
	return fd;
}

/* fx_init - an envelope with two recipients and the given original */
static void
fx_init(struct fixture *fx, const char *message)
{
	struct env_rcpt *rc;

	memset(fx, 0, sizeof *fx);
	envelope_init(&fx->env);
	memcpy(fx->env.id, SEED, ENVELOPE_ID_LEN + 1);
	fx->env.created = 1732425600;	/* Sun, 24 Nov 2024 05:20:00 */
	fx->env.size = strlen(message);
	fx->env.sender = xstrdup("alice@example.com");
	fx->env.helo = xstrdup("client.example");
	fx->env.client_addr = xstrdup("192.0.2.7");
	fx->env.envid = xstrdup("QQ314159");
	rc = envelope_add_rcpt(&fx->env, "bob@example.net");
	rc->orcpt = xstrdup("rfc822;bob+2Btag@example.net");
	rc->updated = 1732429200;
	envelope_add_rcpt(&fx->env, "carol@example.org");
	fx->r[0] = (struct dsn_rcpt){ &fx->env.rcpts[0], "failed", "5.1.1",
	    "dns; mx.example.net", "smtp; 550 5.1.1 No such user", 0, 0 };
	fx->r[1] = (struct dsn_rcpt){ &fx->env.rcpts[1], "failed", "5.2.2",
	    NULL, NULL, 0, 0 };
	buf_init(&fx->out);
	fx->fd = orig_fd(message, strlen(message));
}

/* fx_free - release everything */
static void
fx_free(struct fixture *fx)
{
	envelope_free(&fx->env);
	buf_free(&fx->out);
	close(fx->fd);
}

/* fx_build - dsn_build for the first n recipients; parse on success */
static int
fx_build(struct fixture *fx, size_t n)
{
	int rc;

	rc = dsn_build(&fx->out, HOST, &fx->env, fx->r, n, fx->fd, NOW, SEED,
	    &fx->needs);
	if (rc == 0) {
		assert_crlf(&fx->out);
		fx_parse(fx);
	}
	return rc;
}

/*
 * fx_parse - find the boundary in the top header, then every body part
 * between delimiters (RFC 2046: CRLF "--" boundary), and the close.
 */
static void
fx_parse(struct fixture *fx)
{
	const char *s = fx->out.data, *end = s + fx->out.len, *p, *q, *h;
	char delim[160];
	size_t dl;

	ASSERT((p = strstr(s, "boundary=\"")) != NULL);
	p += strlen("boundary=\"");
	ASSERT((q = strchr(p, '"')) != NULL);
	ASSERT((size_t)(q - p) < sizeof fx->boundary);
	memcpy(fx->boundary, p, (size_t)(q - p));
	fx->boundary[q - p] = '\0';
	/* The top header ends before the first empty line. */
	ASSERT((h = strstr(s, "\r\n\r\n")) != NULL);
	ASSERT(q < h);
	dl = (size_t)snprintf(delim, sizeof delim, "\r\n--%s", fx->boundary);
	fx->nparts = 0;
	p = memmem(h, (size_t)(end - h), delim, dl);
	while (p != NULL) {
		p += dl;
		if (p + 2 <= end && memcmp(p, "--", 2) == 0) {
			/* The close delimiter, then only CRLF. */
			ASSERT(p + 4 == end && memcmp(p, "--\r\n", 4) == 0);
			return;
		}
		ASSERT(memcmp(p, "\r\n", 2) == 0);
		p += 2;
		ASSERT(fx->nparts < 4);
		struct part *pt = &fx->parts[fx->nparts++];
		ASSERT((q = memmem(p, (size_t)(end - p), "\r\n\r\n", 4)) != NULL);
		pt->hdr = p;
		pt->hlen = (size_t)(q - p) + 2;
		pt->body = q + 4;
		p = memmem(pt->body, (size_t)(end - pt->body), delim, dl);
		ASSERT(p != NULL);
		pt->blen = (size_t)(p - pt->body);
	}
	ASSERT(!"no close delimiter");
}

/* has_line - does text hold exactly this line (CRLF-terminated)? */
static bool
has_line(const char *text, size_t len, const char *line)
{
	size_t ll = strlen(line);
	const char *p = text, *end = text + len;

	while ((p = memmem(p, (size_t)(end - p), line, ll)) != NULL) {
		if ((p == text || p[-1] == '\n') && p + ll + 2 <= end &&
		    memcmp(p + ll, "\r\n", 2) == 0)
			return true;
		p++;
	}
	return false;
}

/* contains - substring test on a length-delimited text */
static bool
contains(const char *text, size_t len, const char *s)
{
	return memmem(text, len, s, strlen(s)) != NULL;
}

/* count_of - occurrences of s in text */
static size_t
count_of(const char *text, size_t len, const char *s)
{
	const char *p = text, *end = text + len;
	size_t n = 0;

	while ((p = memmem(p, (size_t)(end - p), s, strlen(s))) != NULL) {
		n++;
		p++;
	}
	return n;
}

/* assert_crlf - only CRLF line ends, no line over 998 octets, no NUL */
static void
assert_crlf(const struct buf *b)
{
	size_t line = 0;

	for (size_t i = 0; i < b->len; i++) {
		char c = b->data[i];

		ASSERT(c != '\0');
		if (c == '\r') {
			ASSERT(i + 1 < b->len && b->data[i + 1] == '\n');
			i++;
			line = 0;
			continue;
		}
		ASSERT(c != '\n');
		line++;
		ASSERT(line <= 998);
	}
	ASSERT(b->len >= 2 && memcmp(b->data + b->len - 2, "\r\n", 2) == 0);
}

/* unfold - a heap copy of text with every CRLF before WSP removed */
static char *
unfold(const char *text, size_t len)
{
	char *o = xmalloc(len + 1);
	size_t n = 0;

	for (size_t i = 0; i < len; i++) {
		if (text[i] == '\r' && i + 2 < len && text[i + 1] == '\n' &&
		    (text[i + 2] == ' ' || text[i + 2] == '\t')) {
			i++;
			continue;
		}
		o[n++] = text[i];
	}
	o[n] = '\0';
	return o;
}

/* assert_status_part - the fields the two default recipients produce */
static void
assert_status_part(const struct fixture *fx)
{
	const struct part *st = &fx->parts[1];

	ASSERT(has_line(st->body, st->blen, "Reporting-MTA: dns; " HOST));
	ASSERT(has_line(st->body, st->blen, "Original-Envelope-Id: QQ314159"));
	ASSERT(has_line(st->body, st->blen,
	    "Arrival-Date: Sun, 24 Nov 2024 05:20:00 +0000"));
	ASSERT(has_line(st->body, st->blen,
	    "Received-From-MTA: dns; client.example (192.0.2.7)"));
	/* ORCPT is xtext-decoded: +2B is '+'. */
	ASSERT(has_line(st->body, st->blen,
	    "Original-Recipient: rfc822; bob+tag@example.net"));
	ASSERT(has_line(st->body, st->blen,
	    "Final-Recipient: rfc822; bob@example.net"));
	ASSERT(has_line(st->body, st->blen,
	    "Final-Recipient: rfc822; carol@example.org"));
	ASSERT_EQ(count_of(st->body, st->blen, "Action: failed\r\n"), 2);
	ASSERT(has_line(st->body, st->blen, "Status: 5.1.1"));
	ASSERT(has_line(st->body, st->blen, "Status: 5.2.2"));
	ASSERT(has_line(st->body, st->blen, "Remote-MTA: dns; mx.example.net"));
	ASSERT(has_line(st->body, st->blen,
	    "Diagnostic-Code: smtp; 550 5.1.1 No such user"));
	ASSERT(has_line(st->body, st->blen,
	    "Last-Attempt-Date: Sun, 24 Nov 2024 06:20:00 +0000"));
	/* carol has neither: no empty fields are written. */
	ASSERT_EQ(count_of(st->body, st->blen, "Remote-MTA:"), 1);
	ASSERT_EQ(count_of(st->body, st->blen, "Last-Attempt-Date:"), 1);
	/* One group per message, one per recipient, empty lines between. */
	ASSERT_EQ(count_of(st->body, st->blen, "\r\n\r\nFinal-Recipient") +
	    count_of(st->body, st->blen, "\r\n\r\nOriginal-Recipient"), 2);
}

TEST(failed_structure)
{
	struct fixture fx;
	const char *o;
	size_t ol;

	fx_init(&fx, HDRS "\r\n" BODY);
	ASSERT_EQ(fx_build(&fx, 2), 0);
	o = fx.out.data;
	ol = fx.out.len;
	ASSERT(has_line(o, ol, "From: Mail Delivery System "
	    "<MAILER-DAEMON@" HOST ">"));
	ASSERT(has_line(o, ol, "To: <alice@example.com>"));
	ASSERT(has_line(o, ol, "Subject: Undelivered Mail Returned to Sender"));
	ASSERT(has_line(o, ol, "Date: Sun, 24 Nov 2024 06:33:20 +0000"));
	ASSERT(has_line(o, ol, "Message-ID: <" SEED ".1732430000.dsn@" HOST
	    ">"));
	ASSERT(has_line(o, ol, "Auto-Submitted: auto-replied"));
	ASSERT(has_line(o, ol, "MIME-Version: 1.0"));
	ASSERT(contains(o, ol, "Content-Type: multipart/report; "
	    "report-type=delivery-status;"));
	ASSERT(strncmp(fx.boundary, "=_" SEED, strlen("=_" SEED)) == 0);
	ASSERT(strlen(fx.boundary) <= 70);
	ASSERT(!contains(o, ol, "Content-Transfer-Encoding"));
	ASSERT_EQ(fx.needs, 0);

	ASSERT_EQ(fx.nparts, 3);
	ASSERT(has_line(fx.parts[0].hdr, fx.parts[0].hlen,
	    "Content-Type: text/plain; charset=us-ascii"));
	ASSERT(has_line(fx.parts[1].hdr, fx.parts[1].hlen,
	    "Content-Type: message/delivery-status"));
	ASSERT(has_line(fx.parts[2].hdr, fx.parts[2].hlen,
	    "Content-Type: text/rfc822-headers"));
	/* The human part names each recipient and the reason. */
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "<bob@example.net>: failed, status 5.1.1"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "550 5.1.1 No such user"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "<carol@example.org>: failed, status 5.2.2"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen, SEED));
	assert_status_part(&fx);
	/* RET unspecified: the header section exactly, and no body. */
	ASSERT_EQ(fx.parts[2].blen, strlen(HDRS));
	ASSERT(memcmp(fx.parts[2].body, HDRS, strlen(HDRS)) == 0);
	ASSERT(!contains(fx.out.data, fx.out.len, "SECRET-BODY-TEXT"));
	fx_free(&fx);
}

TEST(ret_full)
{
	static const char msg[] = HDRS "\r\n" BODY;
	struct fixture fx;

	fx_init(&fx, msg);
	fx.env.ret = ENV_RET_FULL;
	ASSERT_EQ(lseek(fx.fd, 7, SEEK_SET), 7);
	ASSERT_EQ(fx_build(&fx, 2), 0);
	/* pread: the caller's file offset did not move. */
	ASSERT_EQ(lseek(fx.fd, 0, SEEK_CUR), 7);
	ASSERT_EQ(fx.nparts, 3);
	ASSERT(has_line(fx.parts[2].hdr, fx.parts[2].hlen,
	    "Content-Type: message/rfc822"));
	/* The whole message, byte for byte, with its final CRLF. */
	ASSERT_EQ(fx.parts[2].blen, sizeof msg - 1);
	ASSERT(memcmp(fx.parts[2].body, msg, sizeof msg - 1) == 0);
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "It is attached below."));
	assert_status_part(&fx);
	fx_free(&fx);
}

TEST(ret_hdrs_and_unspec)
{
	struct fixture fx;

	fx_init(&fx, HDRS "\r\n" BODY);
	fx.env.ret = ENV_RET_HDRS;
	ASSERT_EQ(fx_build(&fx, 2), 0);
	ASSERT(has_line(fx.parts[2].hdr, fx.parts[2].hlen,
	    "Content-Type: text/rfc822-headers"));
	ASSERT(!contains(fx.out.data, fx.out.len, "SECRET-BODY-TEXT"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "Its headers are attached below."));
	fx_free(&fx);
}

TEST(ret_full_too_large)
{
	struct fixture fx;
	struct buf msg;

	buf_init(&msg);
	buf_puts(&msg, HDRS "\r\n");
	while (msg.len <= DSN_FULL_MAX)
		buf_puts(&msg, "SECRET-BODY-TEXT 0123456789 0123456789 "
		    "0123456789 0123456789\r\n");
	fx_init(&fx, msg.data);
	fx.env.ret = ENV_RET_FULL;
	ASSERT_EQ(fx_build(&fx, 2), 0);
	ASSERT(has_line(fx.parts[2].hdr, fx.parts[2].hlen,
	    "Content-Type: text/rfc822-headers"));
	ASSERT(!contains(fx.out.data, fx.out.len, "SECRET-BODY-TEXT"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen, "too large"));
	ASSERT(fx.out.len < 8192);
	buf_free(&msg);
	fx_free(&fx);
}

TEST(ret_full_only_for_failures)
{
	struct fixture fx;
	const struct part *st;

	fx_init(&fx, HDRS "\r\n" BODY);
	fx.env.ret = ENV_RET_FULL;
	fx.r[0].action = "delayed";
	fx.r[0].status = "4.4.1";
	fx.r[0].retry_until = 1732771200;	/* Thu, 28 Nov 2024 05:20 */
	ASSERT_EQ(fx_build(&fx, 1), 0);
	ASSERT(has_line(fx.out.data, fx.out.len,
	    "Subject: Delayed Mail (still being retried)"));
	ASSERT(!contains(fx.out.data, fx.out.len, "SECRET-BODY-TEXT"));
	st = &fx.parts[1];
	ASSERT(has_line(st->body, st->blen, "Action: delayed"));
	ASSERT(has_line(st->body, st->blen, "Status: 4.4.1"));
	ASSERT(has_line(st->body, st->blen,
	    "Will-Retry-Until: Thu, 28 Nov 2024 05:20:00 +0000"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "retried until Thu, 28 Nov 2024 05:20:00 +0000"));
	fx_free(&fx);
}

TEST(delivered_and_mixed)
{
	struct fixture fx;

	fx_init(&fx, HDRS "\r\n" BODY);
	fx.r[0].action = "delivered";
	fx.r[0].status = "2.0.0";
	fx.r[0].diagnostic = "smtp; 250 2.0.0 Ok: queued as 4Xyz";
	ASSERT_EQ(fx_build(&fx, 1), 0);
	ASSERT(has_line(fx.out.data, fx.out.len,
	    "Subject: Successful Mail Delivery Report"));
	ASSERT(has_line(fx.parts[1].body, fx.parts[1].blen,
	    "Action: delivered"));
	fx_free(&fx);

	/* Mixed: the subject is the worst, the text has both sections. */
	fx_init(&fx, HDRS "\r\n" BODY);
	fx.r[0].action = "delayed";
	fx.r[0].status = "4.7.1";
	fx.r[2] = (struct dsn_rcpt){ &fx.env.rcpts[0], "relayed", "2.0.0",
	    NULL, NULL, 0, 0 };
	ASSERT_EQ(fx_build(&fx, 2), 0);
	ASSERT(has_line(fx.out.data, fx.out.len,
	    "Subject: Undelivered Mail Returned to Sender"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "has stopped trying"));
	ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
	    "has not reached"));
	ASSERT(has_line(fx.parts[1].body, fx.parts[1].blen,
	    "Action: delayed"));
	fx_free(&fx);
}

TEST(crlf_only_from_odd_input)
{
	static char msg[4096];
	struct fixture fx;
	struct buf clean;
	size_t n;

	/* Bare LF, bare CR, a NUL, a 2000-octet line: none of it survives. */
	n = (size_t)snprintf(msg, sizeof msg, "Subject: odd\nX-A: cr\rX-B: ");
	memset(msg + n, 'w', 2000);
	n += 2000;
	memcpy(msg + n, "\r\nX-C: nul", 10);
	n += 10;
	msg[n++] = '\0';
	memcpy(msg + n, "here\n\nbody\rmore\n", 16);
	n += 16;
	for (int ret = 0; ret < 2; ret++) {
		fx_init(&fx, "");
		close(fx.fd);
		fx.fd = orig_fd(msg, n);
		fx.env.ret = ret ? ENV_RET_FULL : ENV_RET_UNSPEC;
		ASSERT_EQ(fx_build(&fx, 2), 0);	/* asserts CRLF-only */
		/* A body that would need repair is not returned at all. */
		ASSERT(has_line(fx.parts[2].hdr, fx.parts[2].hlen,
		    "Content-Type: text/rfc822-headers"));
		ASSERT(!contains(fx.out.data, fx.out.len, "more"));
		ASSERT(has_line(fx.parts[2].body, fx.parts[2].blen,
		    "Subject: odd"));
		ASSERT(has_line(fx.parts[2].body, fx.parts[2].blen, "X-A: cr"));
		ASSERT(has_line(fx.parts[2].body, fx.parts[2].blen,
		    "X-C: nul?here"));
		if (ret)
			ASSERT(contains(fx.parts[0].body, fx.parts[0].blen,
			    "could not be returned unchanged"));
		/* The long line is folded, and unfolds to the original. */
		buf_init(&clean);
		buf_puts(&clean, "X-B: ");
		for (int i = 0; i < 2000; i++)
			buf_puts(&clean, "w");
		ASSERT(!contains(fx.parts[2].body, fx.parts[2].blen,
		    clean.data));
		/* Unfolded: the 2000 octets, plus the folds' own spaces. */
		char *u = unfold(fx.parts[2].body, fx.parts[2].blen), *w;
		size_t span, nw = 0;
		ASSERT((w = strstr(u, "X-B: ")) != NULL);
		w += 5;
		span = strspn(w, "w ");
		for (size_t i = 0; i < span; i++)
			nw += w[i] == 'w';
		ASSERT_EQ(nw, 2000);
		ASSERT_EQ(span, 2002);	/* two hard folds */
		free(u);
		buf_free(&clean);
		fx_free(&fx);
	}
}

TEST(long_header_lines_kept)
{
	struct fixture fx;
	struct buf hdr, msg;

	/* A 998-octet line and a header folded over 60 lines (6 KB). */
	buf_init(&hdr);
	buf_puts(&hdr, "X-Long: ");
	while (hdr.len < 998)
		buf_puts(&hdr, "x");
	buf_puts(&hdr, "\r\nReferences: <first@example.com>");
	for (int i = 0; i < 60; i++)
		buf_printf(&hdr, "\r\n <ref-%03d-0123456789abcdef0123456789@"
		    "lists.example.com>", i);
	buf_puts(&hdr, "\r\n" HDRS);
	buf_init(&msg);
	buf_append(&msg, hdr.data, hdr.len);
	buf_puts(&msg, "\r\n" BODY);
	for (int ret = 0; ret < 2; ret++) {
		fx_init(&fx, msg.data);
		fx.env.ret = ret ? ENV_RET_FULL : ENV_RET_HDRS;
		ASSERT_EQ(fx_build(&fx, 2), 0);
		/* Byte for byte, in both kinds of return. */
		ASSERT(fx.parts[2].blen >= hdr.len);
		ASSERT(memcmp(fx.parts[2].body, hdr.data, hdr.len) == 0);
		if (ret)
			ASSERT_EQ(fx.parts[2].blen, msg.len);
		fx_free(&fx);
	}
	buf_free(&hdr);
	buf_free(&msg);
}

TEST(headers_only_message)
{
	struct fixture fx;

	/* No empty line at all: the whole text is the header section. */
	fx_init(&fx, "Subject: nothing else\r\nX-Last: yes\r\n");
	ASSERT_EQ(fx_build(&fx, 1), 0);
	ASSERT_EQ(fx.parts[2].blen, strlen("Subject: nothing else\r\n"
	    "X-Last: yes\r\n"));
	fx_free(&fx);
	/* An empty message and one that starts with its body. */
	fx_init(&fx, "");
	ASSERT_EQ(fx_build(&fx, 1), 0);
	ASSERT_EQ(fx.nparts, 3);
	ASSERT_EQ(fx.parts[2].blen, 0);
	fx_free(&fx);
	fx_init(&fx, "\r\nSECRET-BODY-TEXT\r\n");
	ASSERT_EQ(fx_build(&fx, 1), 0);
	ASSERT(!contains(fx.out.data, fx.out.len, "SECRET-BODY-TEXT"));
	fx_free(&fx);
}

TEST(no_field_injection)
{
	struct fixture fx;
	struct buf diag;
	const struct part *st;
	char *u;

	fx_init(&fx, HDRS "\r\n" BODY);
	fx.r[0].diagnostic = "smtp; 550-5.1.1 first line\r\n"
	    "X-Injected: yes\r\n\r\nAction: delivered";
	/* A long reply with spaces folds and unfolds back exactly. */
	buf_init(&diag);
	buf_puts(&diag, "smtp; 550 5.7.1");
	for (int i = 0; i < 300; i++)
		buf_printf(&diag, " word%d", i);
	fx.r[1].diagnostic = diag.data;
	fx.r[1].remote_mta = "dns; mx\nBcc: victim@example.net";
	free(fx.env.envid);
	fx.env.envid = xstrdup("id\r\nX-Evil: 1");
	ASSERT_EQ(fx_build(&fx, 2), 0);
	st = &fx.parts[1];
	ASSERT(!contains(fx.out.data, fx.out.len, "\nX-Injected"));
	ASSERT(!contains(fx.out.data, fx.out.len, "\nBcc:"));
	ASSERT(!contains(fx.out.data, fx.out.len, "\nX-Evil"));
	ASSERT_EQ(count_of(st->body, st->blen, "\nAction: "), 2);
	ASSERT(has_line(st->body, st->blen, "Diagnostic-Code: smtp; "
	    "550-5.1.1 first line X-Injected: yes Action: delivered"));
	ASSERT(has_line(st->body, st->blen, "Original-Envelope-Id: id "
	    "X-Evil: 1"));
	u = unfold(st->body, st->blen);
	ASSERT(strstr(u, diag.data) != NULL);
	free(u);
	buf_free(&diag);
	fx_free(&fx);

	/* One 3000-octet word: hard-folded, lines still at most 998. */
	fx_init(&fx, HDRS "\r\n" BODY);
	buf_init(&diag);
	buf_puts(&diag, "smtp; ");
	for (int i = 0; i < 3000; i++)
		buf_puts(&diag, "z");
	fx.r[0].diagnostic = diag.data;
	ASSERT_EQ(fx_build(&fx, 1), 0);	/* assert_crlf checks 998 */
	ASSERT_EQ(count_of(fx.parts[1].body, fx.parts[1].blen, "z"), 3000);
	buf_free(&diag);
	fx_free(&fx);
}

TEST(utf8_addresses)
{
	struct fixture fx;
	const struct part *st;

	/* SMTPUTF8 with a non-ASCII recipient: the RFC 6533 types. */
	fx_init(&fx, HDRS "\r\n" BODY);
	fx.env.smtputf8 = true;
	free(fx.env.rcpts[1].addr);
	fx.env.rcpts[1].addr = xstrdup("j\xc3\xbcrgen@b\xc3\xbc" "cher.example");
	ASSERT_EQ(fx_build(&fx, 2), 0);
	ASSERT(contains(fx.out.data, fx.out.len,
	    "report-type=global-delivery-status;"));
	ASSERT(has_line(fx.parts[1].hdr, fx.parts[1].hlen,
	    "Content-Type: message/global-delivery-status"));
	ASSERT(has_line(fx.parts[2].hdr, fx.parts[2].hlen,
	    "Content-Type: message/global-headers"));
	st = &fx.parts[1];
	ASSERT(has_line(st->body, st->blen, "Final-Recipient: utf-8; "
	    "j\xc3\xbcrgen@b\xc3\xbc" "cher.example"));
	ASSERT(has_line(st->body, st->blen,
	    "Final-Recipient: rfc822; bob@example.net"));
	ASSERT(has_line(fx.out.data, fx.out.len,
	    "Content-Transfer-Encoding: 8bit"));
	ASSERT(has_line(fx.parts[0].hdr, fx.parts[0].hlen,
	    "Content-Type: text/plain; charset=utf-8"));
	ASSERT_EQ(fx.needs, DSN_NEED_SMTPUTF8 | DSN_NEED_8BITMIME);
	fx_free(&fx);

	/* SMTPUTF8 given but all ASCII: the plain types, nothing needed. */
	fx_init(&fx, HDRS "\r\n" BODY);
	fx.env.smtputf8 = true;
	ASSERT_EQ(fx_build(&fx, 2), 0);
	ASSERT(contains(fx.out.data, fx.out.len, "report-type=delivery-status;"));
	ASSERT_EQ(fx.needs, 0);
	fx_free(&fx);

	/* Without SMTPUTF8 (never from our submission): 7-bit unitext. */
	fx_init(&fx, HDRS "\r\n" BODY);
	free(fx.env.rcpts[1].addr);
	fx.env.rcpts[1].addr = xstrdup("\xc3\xa9l\\ve@example.org");
	ASSERT_EQ(fx_build(&fx, 2), 0);
	ASSERT(has_line(fx.parts[1].body, fx.parts[1].blen,
	    "Final-Recipient: utf-8; \\x{E9}l\\x{5C}ve@example.org"));
	ASSERT(has_line(fx.parts[1].hdr, fx.parts[1].hlen,
	    "Content-Type: message/delivery-status"));
	ASSERT(!contains(fx.parts[1].body, fx.parts[1].blen, "\xc3"));
	fx_free(&fx);

	/* 8-bit header bytes without SMTPUTF8: 8bit part, BODY=8BITMIME. */
	fx_init(&fx, "Subject: caf\xc3\xa9\r\n\r\nx\r\n");
	ASSERT_EQ(fx_build(&fx, 1), 0);
	ASSERT(has_line(fx.parts[2].hdr, fx.parts[2].hlen,
	    "Content-Transfer-Encoding: 8bit"));
	ASSERT(has_line(fx.parts[2].body, fx.parts[2].blen,
	    "Subject: caf\xc3\xa9"));
	ASSERT_EQ(fx.needs, DSN_NEED_8BITMIME);
	fx_free(&fx);
}

TEST(boundary_never_in_content)
{
	struct fixture fx;
	char msg[512];

	/* The original quotes the boundary we would pick first. */
	snprintf(msg, sizeof msg, "Subject: trap\r\nX-B: --=_%s.%d/0/dsn"
	    "\r\nX-C: --=_%s.%d/1/dsn--\r\n\r\n" BODY, SEED, NOW, SEED, NOW);
	fx_init(&fx, msg);
	ASSERT_EQ(fx_build(&fx, 2), 0);
	ASSERT(strstr(fx.boundary, "/2/") != NULL);
	/* Three delimiters and the close: nothing else matches it. */
	ASSERT_EQ(count_of(fx.out.data, fx.out.len, fx.boundary), 5);
	ASSERT_EQ(fx.nparts, 3);
	ASSERT(has_line(fx.parts[2].body, fx.parts[2].blen, "Subject: trap"));
	fx_free(&fx);
}

TEST(invalid_input)
{
	struct fixture fx;

	fx_init(&fx, HDRS "\r\n" BODY);
	buf_puts(&fx.out, "kept");
	ASSERT_EQ(fx_build(&fx, 0), -EINVAL);
	fx.r[0].action = "bounced";
	ASSERT_EQ(fx_build(&fx, 1), -EINVAL);
	fx.r[0].action = "failed";
	fx.r[0].status = "550";
	ASSERT_EQ(fx_build(&fx, 1), -EINVAL);
	fx.r[0].status = "5.1.1000";
	ASSERT_EQ(fx_build(&fx, 1), -EINVAL);
	fx.r[0].status = "3.1.1";
	ASSERT_EQ(fx_build(&fx, 1), -EINVAL);
	fx.r[0].status = "5.1.1";
	/* No bounce of a bounce. */
	fx.env.sender[0] = '\0';
	ASSERT_EQ(fx_build(&fx, 1), -EINVAL);
	fx.env.sender[0] = 'a';
	/* A read error is reported, and the output left alone. */
	close(fx.fd);
	fx.fd = -1;
	ASSERT_EQ(fx_build(&fx, 1), -EBADF);
	ASSERT_EQ(fx.out.len, 4);
	ASSERT_STR_EQ(fx.out.data, "kept");
	fx.fd = orig_fd("x", 1);
	ASSERT_EQ(fx_build(&fx, 1), 0);
	ASSERT(strncmp(fx.out.data, "keptFrom: ", 10) == 0);
	fx_free(&fx);
}

TEST(wanted_table)
{
	static const struct {
		const char *sender;	/* envelope sender */
		int notify;		/* ENV_NOTIFY_* */
		const char *action;	/* asked about */
		bool delay_default;	/* configuration */
		bool want;		/* expected */
	} t[] = {
		{ "", 0, "failed", true, false },
		{ "", ENV_NOTIFY_FAILURE, "failed", true, false },
		{ "a@x", ENV_NOTIFY_NEVER, "failed", true, false },
		{ "a@x", ENV_NOTIFY_NEVER, "delayed", true, false },
		{ "a@x", 0, "failed", false, true },
		{ "a@x", 0, "delayed", false, false },
		{ "a@x", 0, "delayed", true, true },
		{ "a@x", 0, "delivered", true, false },
		{ "a@x", ENV_NOTIFY_SUCCESS, "failed", true, false },
		{ "a@x", ENV_NOTIFY_SUCCESS, "delayed", true, false },
		{ "a@x", ENV_NOTIFY_SUCCESS, "delivered", false, true },
		{ "a@x", ENV_NOTIFY_SUCCESS, "relayed", false, true },
		{ "a@x", ENV_NOTIFY_FAILURE, "failed", false, true },
		{ "a@x", ENV_NOTIFY_FAILURE, "delayed", true, false },
		{ "a@x", ENV_NOTIFY_DELAY, "delayed", false, true },
		{ "a@x", ENV_NOTIFY_DELAY, "failed", false, false },
		{ "a@x", ENV_NOTIFY_FAILURE | ENV_NOTIFY_DELAY, "delayed",
		    false, true },
		{ "a@x", ENV_NOTIFY_FAILURE | ENV_NOTIFY_DELAY, "failed",
		    false, true },
		{ "a@x", 0, "bounced", true, false },
	};
	struct envelope env;
	struct env_rcpt *rc;

	envelope_init(&env);
	rc = envelope_add_rcpt(&env, "b@y");
	for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
		free(env.sender);
		env.sender = xstrdup(t[i].sender);
		rc->notify = t[i].notify;
		if (dsn_wanted(&env, rc, t[i].action, t[i].delay_default) !=
		    t[i].want) {
			fprintf(stderr, "row %zu\n", i);
			ASSERT(!"dsn_wanted");
		}
	}
	free(env.sender);
	env.sender = NULL;		/* never set: treated as null */
	rc->notify = 0;
	ASSERT(!dsn_wanted(&env, rc, "failed", true));
	envelope_free(&env);
}

TEST_MAIN("dsn",
    TEST_ENTRY(failed_structure),
    TEST_ENTRY(ret_full),
    TEST_ENTRY(ret_hdrs_and_unspec),
    TEST_ENTRY(ret_full_too_large),
    TEST_ENTRY(ret_full_only_for_failures),
    TEST_ENTRY(delivered_and_mixed),
    TEST_ENTRY(crlf_only_from_odd_input),
    TEST_ENTRY(long_header_lines_kept),
    TEST_ENTRY(headers_only_message),
    TEST_ENTRY(no_field_injection),
    TEST_ENTRY(utf8_addresses),
    TEST_ENTRY(boundary_never_in_content),
    TEST_ENTRY(invalid_input),
    TEST_ENTRY(wanted_table))
