/*
 * NAME
 *	dsn.c - build delivery status notifications (bounces)
 *
 * SUMMARY
 *	Turns "these recipients of that message failed / are delayed / were
 *	delivered" into one RFC 3464 multipart/report message, and decides
 *	from the RFC 3461 NOTIFY parameter whether one is wanted at all.
 *
 * DESCRIPTION
 *	dsn_build() assembles the three body parts in separate buffers, then
 *	picks a MIME boundary that occurs in none of them (the seed makes a
 *	collision unlikely; the check makes it impossible, even for an
 *	original crafted to contain our next boundary), then writes the
 *	header and the parts to the caller's buffer in one go.
 *
 *	Everything we write ourselves goes through dsn_emit(): fields are
 *	folded before a space near 78 columns (unfolding gives back the
 *	exact value) and hard-folded at 998 octets when a value has no
 *	space at all; text is wrapped the same way. Values that come from
 *	outside (addresses, replies, HELO, ENVID, ORCPT) are cleaned first:
 *	CR, LF and other controls become one space each run, so no value
 *	can start a line or a field of its own, and bytes above 0x7f stay
 *	only where the RFC 6533 types allow UTF-8 and the sequence is valid.
 *
 *	The original message is copied line by line with CRLF endings.
 *	Submission only accepts CRLF lines of at most 998 octets without
 *	NUL, so that is a byte-exact copy; for anything else (a spool
 *	written by another tool) a bare CR or LF becomes CRLF, a NUL '?',
 *	and an over-long header line is folded. A whole original that would
 *	need such a repair is not returned at all: its headers are, with a
 *	note in the text part, because changing a body is worse than
 *	withholding it.
 *
 * ERRORS
 *	-EINVAL for caller bugs (no recipients, a null sender, an unknown
 *	action, a malformed status), -errno from pread(2)/fstat(2). The
 *	output buffer is only appended to on success.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config/util.h"
#include "queue/envelope.h"
#include "relay/dsn.h"

#define DSN_LINE_MAX	998	/* RFC 5322 2.1.1, octets without CRLF */
#define DSN_FOLD_AT	78	/* preferred width of what we write */
#define DSN_READ_CHUNK	(64 * 1024)	/* pread size for the header scan */
#define DSN_TOKEN_MAX	40	/* seed and host bytes in the boundary */

/* The kinds of notice, in the order the text part lists them. */
enum dsn_kind {
	DSN_FAILED,		/* "failed" */
	DSN_DELAYED,		/* "delayed" */
	DSN_DELIVERED,		/* "delivered", "relayed", "expanded" */
	DSN_KIND_LAST
};

/* RFC 3464 2.3.3 action values and the notice each belongs to. */
static const struct {
	const char *action;	/* as written in the Action: field */
	enum dsn_kind kind;	/* which notice */
} dsn_actions[] = {
	{ "failed", DSN_FAILED },
	{ "delayed", DSN_DELAYED },
	{ "delivered", DSN_DELIVERED },
	{ "relayed", DSN_DELIVERED },
	{ "expanded", DSN_DELIVERED },
};

/* Per kind: the Subject (the worst kind present wins) and its paragraph. */
static const struct {
	const char *subject;	/* Subject: of the whole notice */
	const char *intro;	/* text part, before its recipients */
} dsn_texts[] = {
	[DSN_FAILED] = { "Undelivered Mail Returned to Sender",
	    "Your message could not be delivered to the recipients below, "
	    "and the mail system has stopped trying:" },
	[DSN_DELAYED] = { "Delayed Mail (still being retried)",
	    "Your message has not reached the recipients below yet. The "
	    "mail system keeps trying; there is no need to send it again:" },
	[DSN_DELIVERED] = { "Successful Mail Delivery Report",
	    "Your message was delivered to the recipients below (or, where "
	    "it says relayed, handed to a system that does not report "
	    "delivery):" },
};
_Static_assert(ARRAY_SIZE(dsn_texts) == DSN_KIND_LAST,
    "dsn_texts out of sync with enum dsn_kind");

static const char dsn_days[7][4] = { "Sun", "Mon", "Tue", "Wed", "Thu",
    "Fri", "Sat" };
static const char dsn_months[12][4] = { "Jan", "Feb", "Mar", "Apr", "May",
    "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };

/* One dsn_build() call's facts, shared by the part writers. */
struct dsn_ctx {
	const struct envelope *orig;	/* the message reported on */
	const struct dsn_rcpt *rcpts;	/* its recipients to report */
	size_t n;			/* how many */
	int kinds[DSN_KIND_LAST];	/* recipients per kind */
	char host[DSN_TOKEN_MAX + 1];	/* reporting MTA, cleaned */
	bool global;			/* RFC 6533 types and UTF-8 */
	bool full;			/* part 3 is the whole message */
	const char *note;		/* why only headers, or NULL */
	struct buf text;		/* header section or whole message */
	size_t hdr_len;			/* header section bytes in text */
};

static int dsn_kind_of(const char *);
static bool dsn_status_valid(const char *);
static bool dsn_ascii(const char *, size_t);
static size_t dsn_utf8_seq(const unsigned char *, size_t, uint32_t *);
static void dsn_clean(struct buf *, const char *, bool);
static void dsn_token(char *, size_t, const char *, const char *);
static void dsn_emit(struct buf *, const char *, size_t, bool,
    const char *);
static void dsn_field(struct buf *, const char *, const char *, bool);
static void dsn_field_date(struct buf *, const char *, int64_t);
static void dsn_date(struct buf *, int64_t);
static void dsn_put_addr(struct buf *, const char *, bool);
static void dsn_put_orcpt(struct buf *, const char *, bool);
static int dsn_pread(int, struct buf *, size_t);
static size_t dsn_header_len(const char *, size_t, bool *);
static bool dsn_text_clean(const char *, size_t);
static void dsn_put_run(struct buf *, const char *, size_t);
static void dsn_put_lines(struct buf *, const char *, size_t);
static int dsn_load(struct dsn_ctx *, int);
static void dsn_part_human(const struct dsn_ctx *, struct buf *);
static void dsn_part_status(const struct dsn_ctx *, struct buf *);
static const char *dsn_reason(const struct dsn_rcpt *);
static bool dsn_8bit(const struct buf *);
static void dsn_boundary(const struct buf *, size_t, const char *, int64_t,
    char *, size_t);
static bool dsn_assemble(const struct dsn_ctx *, struct buf *,
    const struct buf *, const char *const *, const char *const *,
    const char *, int64_t, int);

/* dsn_kind_of - the notice an action belongs to, or -1 if unknown */
static int
dsn_kind_of(const char *action)
{
	for (size_t i = 0; action && i < ARRAY_SIZE(dsn_actions); i++)
		if (strcmp(action, dsn_actions[i].action) == 0)
			return (int)dsn_actions[i].kind;
	return -1;
}

/* dsn_status_valid - RFC 3463 class.subject.detail, class 2, 4 or 5 */
static bool
dsn_status_valid(const char *s)
{
	size_t n;

	if (s == NULL || (s[0] != '2' && s[0] != '4' && s[0] != '5') ||
	    s[1] != '.')
		return false;
	s += 2;
	for (int part = 0; part < 2; part++) {
		n = strspn(s, "0123456789");
		if (n < 1 || n > 3 || s[n] != (part == 0 ? '.' : '\0'))
			return false;
		s += n + 1;
	}
	return true;
}

/* dsn_ascii - no byte above 0x7f */
static bool
dsn_ascii(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)s[i] > 0x7f)
			return false;
	return true;
}

/*
 * dsn_utf8_seq - length of the valid UTF-8 sequence (2-4 bytes, shortest
 * form, no surrogates, at most U+10FFFF) at p, with its code point, or 0.
 */
static size_t
dsn_utf8_seq(const unsigned char *p, size_t left, uint32_t *cp)
{
	size_t n;
	uint32_t v, min;

	if (p[0] >= 0xc2 && p[0] <= 0xdf) {
		n = 2;
		v = p[0] & 0x1f;
		min = 0x80;
	} else if (p[0] >= 0xe0 && p[0] <= 0xef) {
		n = 3;
		v = p[0] & 0x0f;
		min = 0x800;
	} else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
		n = 4;
		v = p[0] & 0x07;
		min = 0x10000;
	} else
		return 0;
	if (left < n)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		v = v << 6 | (p[i] & 0x3f);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	*cp = v;
	return n;
}

/*
 * dsn_clean - append s as one safe line fragment: every run of control
 * bytes (CR, LF, TAB, ...) becomes one space; a byte above 0x7f is kept
 * only as part of valid UTF-8 when utf8 is allowed, else it becomes '?'.
 */
static void
dsn_clean(struct buf *out, const char *s, bool utf8)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t len = strlen(s), i = 0, n;
	uint32_t cp;

	while (i < len) {
		if (p[i] < 0x20 || p[i] == 0x7f) {
			while (i < len && (p[i] < 0x20 || p[i] == 0x7f))
				i++;
			buf_append(out, " ", 1);
		} else if (p[i] < 0x80) {
			buf_append(out, &p[i++], 1);
		} else if (utf8 && (n = dsn_utf8_seq(p + i, len - i,
		    &cp)) > 0) {
			buf_append(out, &p[i], n);
			i += n;
		} else {
			buf_append(out, "?", 1);
			i++;
		}
	}
}

/* dsn_token - copy the bytes of s that are alphanumeric or in extra */
static void
dsn_token(char *dst, size_t dstlen, const char *s, const char *extra)
{
	size_t o = 0;

	for (; s && *s && o + 1 < dstlen; s++) {
		unsigned char c = (unsigned char)*s;

		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || (c != '\0' && strchr(extra, c)))
			dst[o++] = (char)c;
	}
	dst[o] = '\0';
}

/*
 * dsn_emit - append s (no CR or LF in it) as one logical line ending in
 * CRLF, broken near DSN_FOLD_AT columns and never past DSN_LINE_MAX.
 * fold: a header field; the break goes before a space, which stays (so
 * unfolding restores s), and a hard break inserts one. Otherwise text: the
 * space at a break is replaced by CRLF and indent.
 */
static void
dsn_emit(struct buf *out, const char *s, size_t len, bool fold,
    const char *indent)
{
	size_t ilen = strlen(indent), lead = 0, cut, room, hard, i;

	while (lead + len > DSN_FOLD_AT) {
		room = DSN_FOLD_AT - lead;	/* lead < DSN_FOLD_AT here */
		hard = DSN_LINE_MAX - lead;
		cut = 0;
		/* The last space that fits; index 0 is a fold's own space. */
		for (i = room; i > 0 && cut == 0; i--)
			if (s[i] == ' ')
				cut = i;
		/* Else the first space after it, short of the hard limit. */
		for (i = room + 1; cut == 0 && i < len && i < hard; i++)
			if (s[i] == ' ')
				cut = i;
		if (cut == 0 && len <= hard)
			break;		/* one long word that fits: keep it */
		if (cut == 0) {
			/* No space at all: break, but not inside UTF-8. */
			cut = hard;
			while (cut > 1 && ((unsigned char)s[cut] & 0xc0) == 0x80)
				cut--;
			buf_append(out, s, cut);
			buf_puts(out, fold ? "\r\n " : "\r\n");
			if (!fold)
				buf_puts(out, indent);
			lead = fold ? 1 : ilen;
		} else if (fold) {
			buf_append(out, s, cut);
			buf_puts(out, "\r\n");
			lead = 0;	/* the space at s[cut] starts the line */
		} else {
			buf_append(out, s, cut);
			buf_puts(out, "\r\n");
			buf_puts(out, indent);
			lead = ilen;
			cut++;		/* the space is replaced by the break */
		}
		s += cut;
		len -= cut;
	}
	buf_append(out, s, len);
	buf_puts(out, "\r\n");
}

/* dsn_field - append "name: value" with value cleaned and folded */
static void
dsn_field(struct buf *out, const char *name, const char *value, bool utf8)
{
	struct buf line;

	buf_init(&line);
	buf_printf(&line, "%s: ", name);
	dsn_clean(&line, value, utf8);
	dsn_emit(out, line.data, line.len, true, "");
	buf_free(&line);
}

/* dsn_field_date - append "name: <RFC 5322 date>" */
static void
dsn_field_date(struct buf *out, const char *name, int64_t t)
{
	buf_printf(out, "%s: ", name);
	dsn_date(out, t);
	buf_puts(out, "\r\n");
}

/* dsn_date - append t as an RFC 5322 date-time in UTC; no locale */
static void
dsn_date(struct buf *out, int64_t t)
{
	time_t tt = (time_t)t;
	struct tm tm;

	if (gmtime_r(&tt, &tm) == NULL) {
		tt = 0;
		gmtime_r(&tt, &tm);
	}
	buf_printf(out, "%s, %02d %s %04d %02d:%02d:%02d +0000",
	    dsn_days[tm.tm_wday], tm.tm_mday, dsn_months[tm.tm_mon],
	    tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/*
 * dsn_put_addr - append an address-type; address for Final-Recipient:
 * "rfc822; a" when ASCII, else RFC 6533 "utf-8; a" raw in the global
 * types, or as utf-8-addr-unitext (\x{HEX} for non-ASCII and '\').
 */
static void
dsn_put_addr(struct buf *out, const char *addr, bool global)
{
	const unsigned char *p = (const unsigned char *)addr;
	size_t len = strlen(addr), n;
	uint32_t cp;

	if (dsn_ascii(addr, len)) {
		buf_puts(out, "rfc822; ");
		dsn_clean(out, addr, false);
		return;
	}
	buf_puts(out, "utf-8; ");
	if (global) {
		dsn_clean(out, addr, true);
		return;
	}
	for (size_t i = 0; i < len; i += n) {
		n = 1;
		if (p[i] == '\\')
			buf_puts(out, "\\x{5C}");
		else if (p[i] >= 0x20 && p[i] < 0x7f)
			buf_append(out, &p[i], 1);
		else if (p[i] >= 0x80 && (n = dsn_utf8_seq(p + i, len - i,
		    &cp)) > 0)
			buf_printf(out, "\\x{%" PRIX32 "}", cp);
		else {
			n = 1;
			buf_puts(out, "?");
		}
	}
}

/*
 * dsn_put_orcpt - append Original-Recipient's value from an ORCPT kept as
 * given ("addr-type;xtext"): the xtext decoded (RFC 3461 4.2) when that
 * yields a clean line, else the raw value (still ASCII xtext).
 */
static void
dsn_put_orcpt(struct buf *out, const char *orcpt, bool global)
{
	const char *semi = strchr(orcpt, ';'), *v;
	char *dec, *type;
	size_t tlen;

	if (semi == NULL) {
		dsn_clean(out, orcpt, false);
		return;
	}
	for (tlen = (size_t)(semi - orcpt); tlen > 0 &&
	    orcpt[tlen - 1] == ' '; tlen--)
		;
	for (v = semi + 1; *v == ' '; v++)
		;
	dec = xtext_decode(v, strlen(v));
	type = xstrndup(orcpt, tlen);
	dsn_clean(out, type, false);
	free(type);
	buf_puts(out, "; ");
	if (dec != NULL && strpbrk(dec, "\r\n\t") == NULL &&
	    (global || dsn_ascii(dec, strlen(dec))))
		dsn_clean(out, dec, global);
	else
		dsn_clean(out, v, false);
	free(dec);
}

/* dsn_pread - append up to want bytes of fd, from offset b->len; -errno */
static int
dsn_pread(int fd, struct buf *b, size_t want)
{
	char chunk[DSN_READ_CHUNK];
	ssize_t r;

	while (want > 0) {
		size_t n = want < sizeof chunk ? want : sizeof chunk;

		r = pread(fd, chunk, n, (off_t)b->len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			break;
		buf_append(b, chunk, (size_t)r);
		want -= (size_t)r;
	}
	return 0;
}

/*
 * dsn_header_len - bytes of the header section at the start of data: up to
 * the empty line (*found) or, without one, up to the last line end (all of
 * it at EOF: the caller passes the whole text then).
 */
static size_t
dsn_header_len(const char *data, size_t len, bool *found)
{
	size_t pos = 0;
	const char *nl;

	*found = false;
	while (pos < len) {
		if (data[pos] == '\n' || (data[pos] == '\r' &&
		    pos + 1 < len && data[pos + 1] == '\n')) {
			*found = true;
			return pos;
		}
		if ((nl = memchr(data + pos, '\n', len - pos)) == NULL)
			break;
		pos = (size_t)(nl - data) + 1;
	}
	return pos;
}

/* dsn_text_clean - CRLF-only lines of at most 998 octets, no NUL */
static bool
dsn_text_clean(const char *s, size_t len)
{
	size_t line = 0;

	for (size_t i = 0; i < len; i++) {
		if (s[i] == '\r') {
			if (i + 1 >= len || s[i + 1] != '\n')
				return false;
			i++;
			line = 0;
		} else if (s[i] == '\n' || s[i] == '\0') {
			return false;
		} else if (++line > DSN_LINE_MAX) {
			return false;
		}
	}
	return true;
}

/* dsn_put_run - append len bytes with each NUL replaced by '?' */
static void
dsn_put_run(struct buf *out, const char *s, size_t len)
{
	const char *nul;

	while ((nul = memchr(s, '\0', len)) != NULL) {
		buf_append(out, s, (size_t)(nul - s));
		buf_append(out, "?", 1);
		len -= (size_t)(nul - s) + 1;
		s = nul + 1;
	}
	buf_append(out, s, len);
}

/*
 * dsn_put_lines - append text as CRLF lines: CRLF, a bare LF or a bare CR
 * ends a line, NUL becomes '?', a line over DSN_LINE_MAX is folded (with
 * a space, so a header stays a header). A clean text is copied unchanged.
 */
static void
dsn_put_lines(struct buf *out, const char *s, size_t len)
{
	size_t i = 0, start, end, lead;

	while (i < len) {
		for (start = end = i; end < len && s[end] != '\r' &&
		    s[end] != '\n'; end++)
			;
		i = end;
		if (i < len && s[i] == '\r')
			i++;
		if (i < len && s[i] == '\n')
			i++;
		for (lead = 0; end - start + lead > DSN_LINE_MAX; lead = 1) {
			size_t cut = DSN_LINE_MAX - lead;

			while (cut > 1 &&
			    ((unsigned char)s[start + cut] & 0xc0) == 0x80)
				cut--;
			dsn_put_run(out, s + start, cut);
			buf_puts(out, "\r\n ");
			start += cut;
		}
		dsn_put_run(out, s + start, end - start);
		buf_puts(out, "\r\n");
	}
}

/*
 * dsn_load - read what part 3 returns into ctx->text: the whole message
 * (ctx->full) or its header section; set ctx->note when a requested full
 * return became headers only.
 */
static int
dsn_load(struct dsn_ctx *ctx, int fd)
{
	struct stat st;
	bool found = false;
	int rc;

	if (ctx->kinds[DSN_FAILED] > 0 && ctx->orig->ret == ENV_RET_FULL) {
		if (fstat(fd, &st) < 0)
			return -errno;
		if (st.st_size > DSN_FULL_MAX) {
			ctx->note = "The message was too large to return in "
			    "full, so only its headers are attached.";
		} else {
			/* One byte more than allowed tells us it grew. */
			if ((rc = dsn_pread(fd, &ctx->text,
			    DSN_FULL_MAX + 1)) != 0)
				return rc;
			ctx->hdr_len = dsn_header_len(ctx->text.data,
			    ctx->text.len, &found);
			if (ctx->text.len <= DSN_FULL_MAX &&
			    dsn_text_clean(ctx->text.data, ctx->text.len)) {
				ctx->full = true;
				return 0;
			}
			ctx->note = "The message could not be returned "
			    "unchanged, so only its headers are attached.";
		}
	}
	/* Headers: read on until the empty line, EOF or the limit. */
	while (ctx->text.len < DSN_HEADERS_MAX) {
		size_t before = ctx->text.len;

		ctx->hdr_len = dsn_header_len(ctx->text.data, ctx->text.len,
		    &found);
		if (found)
			break;
		if ((rc = dsn_pread(fd, &ctx->text, DSN_READ_CHUNK)) != 0)
			return rc;
		if (ctx->text.len == before) {
			/* EOF: a message that is all header. */
			ctx->hdr_len = ctx->text.len;
			return 0;
		}
	}
	if (ctx->text.len > DSN_HEADERS_MAX) {
		ctx->text.len = DSN_HEADERS_MAX;
		ctx->text.data[ctx->text.len] = '\0';
	}
	ctx->hdr_len = dsn_header_len(ctx->text.data, ctx->text.len, &found);
	return 0;
}

/* dsn_reason - the human-readable reason of one recipient */
static const char *
dsn_reason(const struct dsn_rcpt *r)
{
	const char *d = r->diagnostic, *semi;

	if (d == NULL || *d == '\0')
		return NULL;
	/* "smtp; 550 ..." reads better without its diagnostic type. */
	semi = strchr(d, ';');
	if (semi != NULL && (size_t)(semi - d) == strcspn(d, " ;")) {
		d = semi + 1;
		while (*d == ' ')
			d++;
	}
	return d;
}

/* dsn_part_human - the text/plain part for the sender */
static void
dsn_part_human(const struct dsn_ctx *ctx, struct buf *out)
{
	const struct envelope *o = ctx->orig;
	struct buf line;

	buf_init(&line);
	buf_printf(&line, "This is an automatic message from the mail "
	    "system at %s.", ctx->host);
	dsn_emit(out, line.data, line.len, false, "");
	for (int k = 0; k < DSN_KIND_LAST; k++) {
		if (ctx->kinds[k] == 0)
			continue;
		buf_puts(out, "\r\n");
		dsn_emit(out, dsn_texts[k].intro, strlen(dsn_texts[k].intro),
		    false, "");
		buf_puts(out, "\r\n");
		for (size_t i = 0; i < ctx->n; i++) {
			const struct dsn_rcpt *r = &ctx->rcpts[i];
			const char *why = dsn_reason(r);

			if (dsn_kind_of(r->action) != k)
				continue;
			buf_reset(&line);
			buf_puts(&line, "  <");
			dsn_clean(&line, r->rcpt->addr, ctx->global);
			buf_printf(&line, ">: %s, status %s", r->action,
			    r->status);
			dsn_emit(out, line.data, line.len, false, "    ");
			if (why) {
				buf_reset(&line);
				buf_puts(&line, "    ");
				dsn_clean(&line, why, ctx->global);
				dsn_emit(out, line.data, line.len, false,
				    "    ");
			}
			if (k == DSN_DELAYED && r->retry_until > 0) {
				buf_reset(&line);
				buf_puts(&line, "    It will be retried until ");
				dsn_date(&line, r->retry_until);
				buf_puts(&line, ".");
				dsn_emit(out, line.data, line.len, false,
				    "    ");
			}
		}
	}
	buf_puts(out, "\r\n");
	buf_reset(&line);
	buf_printf(&line, "The message was received on ");
	dsn_date(&line, o->created);
	buf_printf(&line, " with queue id %s, from <", o->id);
	dsn_clean(&line, o->sender, ctx->global);
	buf_puts(&line, ">. ");
	buf_puts(&line, ctx->full ? "It is attached below." :
	    "Its headers are attached below.");
	if (ctx->note) {
		buf_puts(&line, " ");
		buf_puts(&line, ctx->note);
	}
	dsn_emit(out, line.data, line.len, false, "");
	buf_free(&line);
}

/* dsn_part_status - the message/(global-)delivery-status part's fields */
static void
dsn_part_status(const struct dsn_ctx *ctx, struct buf *out)
{
	const struct envelope *o = ctx->orig;
	struct buf v;

	buf_init(&v);
	buf_printf(&v, "dns; %s", ctx->host);
	dsn_field(out, "Reporting-MTA", v.data, false);
	/* X- fields are RFC 3464 extension fields: ours, for operators. */
	if (o->id[0])
		dsn_field(out, "X-Relay-Queue-ID", o->id, false);
	buf_reset(&v);
	dsn_put_addr(&v, o->sender, ctx->global);
	dsn_field(out, "X-Relay-Sender", v.data, ctx->global);
	if (o->envid)
		dsn_field(out, "Original-Envelope-Id", o->envid, false);
	if (o->helo && o->helo[0]) {
		buf_reset(&v);
		buf_puts(&v, "dns; ");
		dsn_clean(&v, o->helo, false);
		if (o->client_addr && o->client_addr[0]) {
			buf_puts(&v, " (");
			dsn_clean(&v, o->client_addr, false);
			buf_puts(&v, ")");
		}
		dsn_field(out, "Received-From-MTA", v.data, false);
	}
	dsn_field_date(out, "Arrival-Date", o->created);
	for (size_t i = 0; i < ctx->n; i++) {
		const struct dsn_rcpt *r = &ctx->rcpts[i];
		int64_t last = r->last_attempt ? r->last_attempt :
		    r->rcpt->updated;

		/* Groups are separated by one empty line (RFC 3464 2.1). */
		buf_puts(out, "\r\n");
		if (r->rcpt->orcpt) {
			buf_reset(&v);
			dsn_put_orcpt(&v, r->rcpt->orcpt, ctx->global);
			dsn_field(out, "Original-Recipient", v.data,
			    ctx->global);
		}
		buf_reset(&v);
		dsn_put_addr(&v, r->rcpt->addr, ctx->global);
		dsn_field(out, "Final-Recipient", v.data, ctx->global);
		dsn_field(out, "Action", r->action, false);
		dsn_field(out, "Status", r->status, false);
		if (r->remote_mta && r->remote_mta[0])
			dsn_field(out, "Remote-MTA", r->remote_mta,
			    ctx->global);
		if (r->diagnostic && r->diagnostic[0])
			dsn_field(out, "Diagnostic-Code", r->diagnostic,
			    ctx->global);
		if (last > 0)
			dsn_field_date(out, "Last-Attempt-Date", last);
		if (dsn_kind_of(r->action) == DSN_DELAYED &&
		    r->retry_until > 0)
			dsn_field_date(out, "Will-Retry-Until",
			    r->retry_until);
	}
	buf_free(&v);
}

/* dsn_8bit - does the buffer hold a byte above 0x7f? */
static bool
dsn_8bit(const struct buf *b)
{
	return !dsn_ascii(b->data ? b->data : "", b->len);
}

/*
 * dsn_boundary - a boundary that none of the parts contains (RFC 2046
 * 5.1.1: at most 70 characters from bchars, here quoted).
 */
static void
dsn_boundary(const struct buf *part, size_t nparts, const char *seed,
    int64_t now, char *b, size_t blen)
{
	for (unsigned k = 0;; k++) {
		bool clash = false;

		snprintf(b, blen, "=_%s.%" PRId64 "/%u/dsn", seed, now, k);
		for (size_t i = 0; i < nparts && !clash; i++)
			clash = part[i].len > 0 && memmem(part[i].data,
			    part[i].len, b, strlen(b)) != NULL;
		if (!clash)
			return;
	}
}

/*
 * dsn_assemble - append the message header, the preamble, the parts with
 * their MIME headers, and the close delimiter to out; return whether any
 * of it is 8-bit.
 */
static bool
dsn_assemble(const struct dsn_ctx *ctx, struct buf *out,
    const struct buf *part, const char *const *ctype,
    const char *const *cdesc, const char *seed, int64_t now, int worst)
{
	char boundary[128];
	bool eight = false;
	struct buf to;

	dsn_boundary(part, 3, seed, now, boundary, sizeof boundary);
	/* The host is a short token already: no cleaning, no folding. */
	buf_printf(out, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n",
	    ctx->host);
	buf_init(&to);
	buf_puts(&to, "To: <");
	dsn_clean(&to, ctx->orig->sender, ctx->global);
	buf_puts(&to, ">");
	dsn_emit(out, to.data, to.len, true, "");
	eight = dsn_8bit(&to);
	buf_free(&to);
	dsn_field(out, "Subject", dsn_texts[worst].subject, false);
	dsn_field_date(out, "Date", now);
	buf_printf(out, "Message-ID: <%s.%" PRId64 ".dsn@%s>\r\n", seed, now,
	    ctx->host);
	/* RFC 3834: an automatic response, not to be answered by one. */
	buf_puts(out, "Auto-Submitted: auto-replied\r\n");
	buf_puts(out, "MIME-Version: 1.0\r\n");
	buf_printf(out, "Content-Type: multipart/report; report-type=%s;"
	    "\r\n\tboundary=\"%s\"\r\n", ctx->global ?
	    "global-delivery-status" : "delivery-status", boundary);
	for (int i = 0; i < 3; i++)
		eight = eight || dsn_8bit(&part[i]);
	if (eight)
		buf_puts(out, "Content-Transfer-Encoding: 8bit\r\n");
	buf_puts(out, "\r\nThis is a MIME-encapsulated delivery status "
	    "notification.\r\n");
	for (int i = 0; i < 3; i++) {
		buf_printf(out, "\r\n--%s\r\n", boundary);
		buf_printf(out, "Content-Type: %s\r\n", ctype[i]);
		buf_printf(out, "Content-Description: %s\r\n", cdesc[i]);
		if (dsn_8bit(&part[i]))
			buf_puts(out, "Content-Transfer-Encoding: 8bit\r\n");
		buf_puts(out, "\r\n");
		/*
		 * Every part ends in CRLF and the delimiter brings its own,
		 * so the original's last line keeps its line end.
		 */
		buf_append(out, part[i].data ? part[i].data : "", part[i].len);
	}
	buf_printf(out, "\r\n--%s--\r\n", boundary);
	return eight;
}

/* dsn_build - the whole notification; see dsn.h */
int
dsn_build(struct buf *out, const char *reporting_mta,
    const struct envelope *orig, const struct dsn_rcpt *rcpts, size_t n,
    int orig_fd, int64_t now, const char *boundary_seed, unsigned *needs)
{
	struct dsn_ctx ctx;
	struct buf part[3];
	char seed[DSN_TOKEN_MAX + 1];
	const char *ctype[3], *cdesc[3];
	int worst = DSN_KIND_LAST, rc;
	bool eight;

	if (needs)
		*needs = 0;
	if (n == 0 || orig->sender == NULL || orig->sender[0] == '\0')
		return -EINVAL;
	memset(&ctx, 0, sizeof ctx);
	ctx.orig = orig;
	ctx.rcpts = rcpts;
	ctx.n = n;
	for (size_t i = 0; i < n; i++) {
		int k = dsn_kind_of(rcpts[i].action);

		if (k < 0 || !dsn_status_valid(rcpts[i].status) ||
		    rcpts[i].rcpt == NULL || rcpts[i].rcpt->addr == NULL)
			return -EINVAL;
		ctx.kinds[k]++;
		if (k < worst)
			worst = k;
	}
	dsn_token(ctx.host, sizeof ctx.host, reporting_mta, ".-");
	if (ctx.host[0] == '\0')
		str_copy(ctx.host, "localhost", sizeof ctx.host);
	dsn_token(seed, sizeof seed, boundary_seed, ".-_");
	if (seed[0] == '\0')
		str_copy(seed, "relay", sizeof seed);
	buf_init(&ctx.text);
	if ((rc = dsn_load(&ctx, orig_fd)) != 0) {
		buf_free(&ctx.text);
		return rc;
	}
	/* RFC 6533 only when needed: not every receiver has SMTPUTF8. */
	if (orig->smtputf8) {
		ctx.global = !dsn_ascii(orig->sender, strlen(orig->sender)) ||
		    !dsn_ascii(ctx.text.data ? ctx.text.data : "",
		    ctx.hdr_len);
		for (size_t i = 0; i < n && !ctx.global; i++)
			ctx.global = !dsn_ascii(rcpts[i].rcpt->addr,
			    strlen(rcpts[i].rcpt->addr));
	}

	for (int i = 0; i < 3; i++)
		buf_init(&part[i]);
	dsn_part_human(&ctx, &part[0]);
	ctype[0] = dsn_8bit(&part[0]) ? "text/plain; charset=utf-8" :
	    "text/plain; charset=us-ascii";
	cdesc[0] = "Notification";
	dsn_part_status(&ctx, &part[1]);
	ctype[1] = ctx.global ? "message/global-delivery-status" :
	    "message/delivery-status";
	cdesc[1] = "Delivery report";
	if (ctx.full) {
		dsn_put_lines(&part[2], ctx.text.data, ctx.text.len);
		ctype[2] = ctx.global ? "message/global" : "message/rfc822";
		cdesc[2] = "Undelivered message";
	} else {
		dsn_put_lines(&part[2], ctx.text.data, ctx.hdr_len);
		ctype[2] = ctx.global ? "message/global-headers" :
		    "text/rfc822-headers";
		cdesc[2] = "Message headers";
	}
	eight = dsn_assemble(&ctx, out, part, ctype, cdesc, seed, now, worst);
	if (needs) {
		if (eight)
			*needs |= DSN_NEED_8BITMIME;
		if (ctx.global)
			*needs |= DSN_NEED_SMTPUTF8 | DSN_NEED_8BITMIME;
	}
	for (int i = 0; i < 3; i++)
		buf_free(&part[i]);
	buf_free(&ctx.text);
	return 0;
}

/* dsn_wanted - RFC 3461 NOTIFY rules; see dsn.h */
bool
dsn_wanted(const struct envelope *orig, const struct env_rcpt *rc,
    const char *action, bool delay_by_default)
{
	if (orig->sender == NULL || orig->sender[0] == '\0')
		return false;
	if (rc->notify & ENV_NOTIFY_NEVER)
		return false;
	switch (dsn_kind_of(action)) {
	case DSN_FAILED:
		return rc->notify == 0 || (rc->notify & ENV_NOTIFY_FAILURE);
	case DSN_DELAYED:
		return (rc->notify & ENV_NOTIFY_DELAY) ||
		    (rc->notify == 0 && delay_by_default);
	case DSN_DELIVERED:
		return (rc->notify & ENV_NOTIFY_SUCCESS) != 0;
	default:
		return false;
	}
}
