/*
 * NAME
 *	smtp_parse - pure parsers for the SMTP server side
 * SUMMARY
 *	Command lines, RFC 5321 paths (with RFC 6531 UTF-8), ESMTP parameters,
 *	RFC 3461 xtext, base64 for AUTH, and the streaming DATA decoder.
 * DESCRIPTION
 *	Nothing here does I/O or keeps global state; the only allocation is
 *	the address copy smtp_path_parse hands back and the growth of the
 *	caller's struct buf. That keeps each piece testable on its own, and
 *	keeps the session (smtps_session.c) free of byte fiddling.
 *
 *	Error policy: parsers return RELAY_EPROTO or -1 with, where a human
 *	will read it, a static reason string short enough to follow
 *	"501 5.1.3 " in a reply. Nothing here logs: the session knows the
 *	peer and decides what to say.
 *
 *	The DATA decoder is the hot path: it runs over every body octet. It
 *	finds line ends with memchr, appends whole runs of input (often
 *	many lines at once) and breaks a run only where it must drop a byte
 *	(a stuffed dot). Its invariant: the end of data is CR LF "." CR LF
 *	where the first CR LF is a real line end or the start of DATA.
 *	A bare LF never starts a line for that purpose (SMTP smuggling).
 */
#include <arpa/inet.h>
#include <assert.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#include "config/util.h"
#include "relay/smtp_parse.h"

/* Why-texts for smtp_path_parse; each fits after "501 5.1.3 ". */
#define WHY_BRACKETS	"syntax error in address (angle brackets required)"
#define WHY_NULL	"null address not allowed here"
#define WHY_TOOLONG	"address too long"
#define WHY_ROUTE	"syntax error in source route"
#define WHY_LOCAL	"syntax error in local part"
#define WHY_LOCAL_LONG	"local part too long"
#define WHY_NODOMAIN	"address has no domain"
#define WHY_DOMAIN	"syntax error in domain"
#define WHY_DOMAIN_LONG	"domain too long"
#define WHY_LABEL_LONG	"domain label too long"
#define WHY_LITERAL	"invalid address literal"
#define WHY_TRAIL	"syntax error after address"
#define WHY_UTF8	"non-ASCII address without SMTPUTF8"
#define WHY_BADUTF8	"invalid UTF-8 in address"

#define SMTP_LOCAL_MAX	64	/* RFC 5321 4.5.3.1.1, octets as written */
#define SMTP_DOMAIN_MAX	255	/* RFC 5321 4.5.3.1.2 */
#define SMTP_LABEL_MAX	63	/* RFC 1035 2.3.4 */
#define SMTP_LINE_MAX	998	/* RFC 5321 4.5.3.1.6, without CRLF */

/* Where the DATA decoder stands; struct smtp_dot.state holds one of these. */
enum smtp_dot_state {
	DOT_ST_BOL,		/* start of DATA or just after CR LF */
	DOT_ST_TEXT,		/* inside a line; previous octet is no CR */
	DOT_ST_CR,		/* last octet was a CR, already in out */
	DOT_ST_DOT,		/* a line-leading "." was dropped */
	DOT_ST_DOT_CR,		/* "." then CR; the CR is held back */
};

static const char *const smtp_verb_names[] = {
	[SMTP_CMD_UNKNOWN] = "UNKNOWN",
	[SMTP_CMD_HELO] = "HELO",
	[SMTP_CMD_EHLO] = "EHLO",
	[SMTP_CMD_STARTTLS] = "STARTTLS",
	[SMTP_CMD_AUTH] = "AUTH",
	[SMTP_CMD_MAIL] = "MAIL",
	[SMTP_CMD_RCPT] = "RCPT",
	[SMTP_CMD_DATA] = "DATA",
	[SMTP_CMD_BDAT] = "BDAT",
	[SMTP_CMD_RSET] = "RSET",
	[SMTP_CMD_NOOP] = "NOOP",
	[SMTP_CMD_QUIT] = "QUIT",
	[SMTP_CMD_HELP] = "HELP",
	[SMTP_CMD_VRFY] = "VRFY",
	[SMTP_CMD_EXPN] = "EXPN",
};
_Static_assert(ARRAY_SIZE(smtp_verb_names) == SMTP_CMD_LAST,
    "smtp_verb_names out of sync with enum smtp_verb");

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static const char *skip_spaces(const char *);
static bool is_atext(unsigned char);
static bool is_letdig(unsigned char);
static bool is_hexupper(unsigned char);
static size_t utf8_seq_len(const unsigned char *);
static const char *path_nonascii(const char **, bool);
static const char *path_local(const char **, bool);
static const char *path_domain(const char **, bool);
static const char *path_literal(const char **);
static const char *path_route(const char **, bool);
static int b64_value(unsigned char);
static unsigned dot_scan(const char *, size_t);
static void dot_count(struct smtp_dot *, size_t);
static void dot_flush(struct smtp_dot *, struct buf *, const char *,
    const char *);

/* skip_spaces - step over SP characters (not tabs: SMTP uses SP) */
static const char *
skip_spaces(const char *p)
{
	while (*p == ' ')
		p++;
	return p;
}

/* is_atext - RFC 5322 atext, ASCII part only */
static bool
is_atext(unsigned char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	    (c >= '0' && c <= '9'))
		return true;
	return c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

/* is_letdig - RFC 5321 Let-dig */
static bool
is_letdig(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	    (c >= '0' && c <= '9');
}

/* is_hexupper - RFC 3461 hexchar digit: upper case only */
static bool
is_hexupper(unsigned char c)
{
	return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F');
}

/*
 * utf8_seq_len - length of the well-formed UTF-8 sequence at p, or 0.
 * Follows the Unicode table 3-7 ranges, which rule out overlongs,
 * surrogates and code points past U+10FFFF. The input is NUL-terminated,
 * and NUL is never a continuation byte, so we cannot run off the end.
 */
static size_t
utf8_seq_len(const unsigned char *p)
{
	unsigned char lo = 0x80, hi = 0xbf;
	size_t n, i;

	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		n = 2;
	else if (p[0] >= 0xe0 && p[0] <= 0xef) {
		n = 3;
		if (p[0] == 0xe0)
			lo = 0xa0;	/* overlong */
		else if (p[0] == 0xed)
			hi = 0x9f;	/* surrogates */
	} else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
		n = 4;
		if (p[0] == 0xf0)
			lo = 0x90;	/* overlong */
		else if (p[0] == 0xf4)
			hi = 0x8f;	/* past U+10FFFF */
	} else
		return 0;
	if (p[1] < lo || p[1] > hi)
		return 0;
	for (i = 2; i < n; i++)
		if (p[i] < 0x80 || p[i] > 0xbf)
			return 0;
	return n;
}

/*
 * path_nonascii - step over one UTF-8 character at *pp. Returns NULL, or
 * the reason it is not allowed (no SMTPUTF8, or malformed).
 */
static const char *
path_nonascii(const char **pp, bool utf8)
{
	size_t n;

	if (!utf8)
		return WHY_UTF8;
	if ((n = utf8_seq_len((const unsigned char *)*pp)) == 0)
		return WHY_BADUTF8;
	*pp += n;
	return NULL;
}

/* path_local - RFC 5321 Local-part: Dot-string or Quoted-string */
static const char *
path_local(const char **pp, bool utf8)
{
	const char *start = *pp, *p = *pp, *why;
	unsigned char c;

	if (*p == '"') {
		for (p++;; ) {
			c = (unsigned char)*p;
			if (c == '"') {
				p++;
				break;
			}
			if (c == '\\') {
				/* quoted-pairSMTP: backslash, printable */
				c = (unsigned char)p[1];
				if (c < 32 || c > 126)
					return WHY_LOCAL;
				p += 2;
			} else if (c >= 32 && c <= 126)
				p++;
			else if (c >= 0x80) {
				if ((why = path_nonascii(&p, utf8)) != NULL)
					return why;
			} else
				return WHY_LOCAL;	/* control, or NUL */
		}
	} else {
		for (;;) {
			const char *atom = p;

			for (;;) {
				c = (unsigned char)*p;
				if (is_atext(c))
					p++;
				else if (c >= 0x80) {
					why = path_nonascii(&p, utf8);
					if (why != NULL)
						return why;
				} else
					break;
			}
			/* An empty atom: leading, trailing or double dot. */
			if (p == atom)
				return WHY_LOCAL;
			if (*p != '.')
				break;
			p++;
		}
	}
	if (p - start > SMTP_LOCAL_MAX)
		return WHY_LOCAL_LONG;
	*pp = p;
	return NULL;
}

/*
 * path_domain - RFC 5321 Domain: sub-domain *("." sub-domain), with
 * U-labels when utf8. Stops at the first octet that cannot continue it.
 */
static const char *
path_domain(const char **pp, bool utf8)
{
	const char *start = *pp, *p = *pp, *label, *why;
	unsigned char c;

	for (;;) {
		label = p;
		c = (unsigned char)*p;
		if (!is_letdig(c) && c < 0x80)
			return WHY_DOMAIN;	/* empty label or leading '-' */
		for (;;) {
			c = (unsigned char)*p;
			if (is_letdig(c) || c == '-')
				p++;
			else if (c >= 0x80) {
				if ((why = path_nonascii(&p, utf8)) != NULL)
					return why;
			} else
				break;
		}
		if (p[-1] == '-')
			return WHY_DOMAIN;
		if (p - label > SMTP_LABEL_MAX)
			return WHY_LABEL_LONG;
		if (*p != '.')
			break;
		p++;
	}
	if (p - start > SMTP_DOMAIN_MAX)
		return WHY_DOMAIN_LONG;
	*pp = p;
	return NULL;
}

/*
 * path_literal - RFC 5321 address-literal "[IPv4]" or "[IPv6:...]". The
 * General-address-literal form names no protocol we could deliver to, so
 * it is refused.
 */
static const char *
path_literal(const char **pp)
{
	char tmp[64];
	struct in6_addr a6;
	struct in_addr a4;
	const char *p = *pp + 1, *close;
	size_t n;

	if ((close = strchr(p, ']')) == NULL)
		return WHY_LITERAL;
	if ((n = (size_t)(close - p)) >= sizeof(tmp))
		return WHY_LITERAL;
	memcpy(tmp, p, n);
	tmp[n] = '\0';
	if (strncasecmp(tmp, "IPv6:", 5) == 0) {
		if (inet_pton(AF_INET6, tmp + 5, &a6) != 1)
			return WHY_LITERAL;
	} else if (inet_pton(AF_INET, tmp, &a4) != 1)
		return WHY_LITERAL;
	*pp = close + 1;
	return NULL;
}

/* path_route - RFC 5321 A-d-l ":" (checked for syntax, then dropped) */
static const char *
path_route(const char **pp, bool utf8)
{
	const char *p = *pp, *why;

	for (;;) {
		if (*p != '@')
			return WHY_ROUTE;
		p++;
		if ((why = path_domain(&p, utf8)) != NULL)
			return why;
		if (*p == ':')
			break;
		if (*p != ',')
			return WHY_ROUTE;
		p++;
	}
	*pp = p + 1;
	return NULL;
}

/* smtp_cmd_parse - split a command line into verb and argument */
void
smtp_cmd_parse(const char *line, struct smtp_cmd *cmd)
{
	const char *sp;
	size_t n;
	int v;

	cmd->verb = SMTP_CMD_UNKNOWN;
	sp = strchr(line, ' ');
	n = sp ? (size_t)(sp - line) : strlen(line);
	for (v = SMTP_CMD_UNKNOWN + 1; v < SMTP_CMD_LAST; v++) {
		if (strlen(smtp_verb_names[v]) == n &&
		    strncasecmp(line, smtp_verb_names[v], n) == 0) {
			cmd->verb = (enum smtp_verb)v;
			break;
		}
	}
	if (cmd->verb == SMTP_CMD_MAIL || cmd->verb == SMTP_CMD_RCPT) {
		const char *kw = cmd->verb == SMTP_CMD_MAIL ? "FROM:" : "TO:";
		const char *p = skip_spaces(line + n);

		/*
		 * RFC 5321 allows no spaces around the keyword, but broken
		 * clients send them and Postfix tolerates them, so we do.
		 * The keyword itself is mandatory.
		 */
		if (str_hasprefix_i(p, kw))
			cmd->arg = skip_spaces(p + strlen(kw));
		else
			cmd->arg = NULL;
		return;
	}
	cmd->arg = sp ? sp + 1 : line + n;
}

/* smtp_verb_name - upper-case name of a verb, for logs and replies */
const char *
smtp_verb_name(enum smtp_verb v)
{
	if ((unsigned)v >= SMTP_CMD_LAST)
		return "UNKNOWN";
	return smtp_verb_names[v];
}

/*
 * smtp_path_parse - parse "<mailbox> [params]". See smtp_parse.h for the
 * contract. On failure *addr and *params are NULL.
 */
int
smtp_path_parse(const char *arg, bool allow_null, bool utf8, char **addr,
    const char **params, const char **why)
{
	const char *lt = arg, *mbox, *gt, *p;
	size_t mlen;

	*addr = NULL;
	*params = NULL;
	*why = NULL;
	if (*lt != '<') {
		*why = WHY_BRACKETS;
		return RELAY_EPROTO;
	}
	p = lt + 1;
	if (*p == '>') {
		if (!allow_null) {
			*why = WHY_NULL;
			return RELAY_EPROTO;
		}
		mbox = gt = p;
		mlen = 0;
	} else if (strncasecmp(p, "postmaster>", 11) == 0) {
		/*
		 * RFC 5321 4.1.1.3 lets RCPT name a bare postmaster; we
		 * cannot tell MAIL from RCPT here, so the MAIL handler must
		 * refuse an address without '@' itself.
		 */
		mbox = "postmaster";
		mlen = 10;
		gt = p + 10;
	} else {
		if (*p == '@' && (*why = path_route(&p, utf8)) != NULL)
			return RELAY_EPROTO;
		mbox = p;
		if ((*why = path_local(&p, utf8)) != NULL)
			return RELAY_EPROTO;
		if (*p != '@') {
			*why = *p == '>' ? WHY_NODOMAIN : WHY_LOCAL;
			return RELAY_EPROTO;
		}
		p++;
		if (*p == '[')
			*why = path_literal(&p);
		else
			*why = path_domain(&p, utf8);
		if (*why != NULL)
			return RELAY_EPROTO;
		if (*p != '>') {
			*why = *p == '\0' ? WHY_BRACKETS : WHY_DOMAIN;
			return RELAY_EPROTO;
		}
		gt = p;
		mlen = (size_t)(gt - mbox);
	}
	if (gt - lt + 1 > SMTP_PATH_MAX) {
		*why = WHY_TOOLONG;
		return RELAY_EPROTO;
	}
	/* Parameters are separated from the path by SP, nothing else. */
	p = gt + 1;
	if (*p != '\0' && *p != ' ') {
		*why = WHY_TRAIL;
		return RELAY_EPROTO;
	}
	*addr = xstrndup(mbox, mlen);
	*params = skip_spaces(p);
	return 0;
}

/* smtp_params_parse - split ESMTP parameters (RFC 5321 4.1.2) */
int
smtp_params_parse(const char *params, struct smtp_param *out, size_t max)
{
	const char *p = params, *k;
	size_t count = 0, i;
	unsigned char c;

	for (;;) {
		p = skip_spaces(p);
		if (*p == '\0')
			break;
		if (count >= max)
			return -1;
		/* esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-") */
		k = p;
		if (!is_letdig((unsigned char)*p))
			return -1;
		while (is_letdig((unsigned char)*p) || *p == '-')
			p++;
		if ((size_t)(p - k) >= sizeof(out[count].key))
			return -1;
		for (i = 0; k + i < p; i++) {
			c = (unsigned char)k[i];
			out[count].key[i] = (char)(c >= 'a' && c <= 'z' ?
			    c - 'a' + 'A' : c);
		}
		out[count].key[i] = '\0';
		out[count].value = NULL;
		out[count].vlen = 0;
		if (*p == '=') {
			/*
			 * esmtp-value = 1*(%d33-60 / %d62-126), plus UTF-8
			 * octets (RFC 6531); whoever uses a value checks
			 * its finer syntax.
			 */
			k = ++p;
			for (;; p++) {
				c = (unsigned char)*p;
				if ((c < 33 || c > 126 || c == '=') && c < 0x80)
					break;
			}
			if (p == k)
				return -1;
			out[count].value = k;
			out[count].vlen = (size_t)(p - k);
		}
		if (*p != ' ' && *p != '\0')
			return -1;
		count++;
	}
	return (int)count;
}

/* smtp_xtext_valid - RFC 3461 section 4 xtext */
bool
smtp_xtext_valid(const char *s, size_t len)
{
	size_t i;
	unsigned char c;

	for (i = 0; i < len; i++) {
		c = (unsigned char)s[i];
		if (c == '+') {
			if (len - i < 3 ||
			    !is_hexupper((unsigned char)s[i + 1]) ||
			    !is_hexupper((unsigned char)s[i + 2]))
				return false;
			i += 2;
		} else if (c < 0x21 || c > 0x7e || c == '=')
			return false;
	}
	return true;
}

/* b64_value - the 6-bit value of a base64 digit, or -1 */
static int
b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/*
 * smtp_base64_decode - strict RFC 4648 base64. Padding only at the end,
 * and the unused bits of the last digit must be zero, so every byte
 * string has exactly one accepted encoding: what we log or compare is
 * what the client meant.
 */
int
smtp_base64_decode(const char *in, size_t len, char *out, size_t outlen)
{
	const unsigned char *s = (const unsigned char *)in;
	size_t i, o = 0;
	int v[4], j, pad;
	unsigned long w;

	if (len % 4 != 0 || len / 4 > (INT_MAX - 3) / 3 ||
	    outlen < len / 4 * 3 + 1)
		return -1;
	for (i = 0; i < len; i += 4) {
		pad = 0;
		for (j = 0; j < 4; j++) {
			if (s[i + j] == '=' && i + 4 == len && j >= 2) {
				/* "xx==" or "xxx=", never "xx=x" */
				if (j == 2 && s[i + 3] != '=')
					return -1;
				v[j] = 0;
				pad++;
			} else if ((v[j] = b64_value(s[i + j])) < 0)
				return -1;
		}
		w = (unsigned long)v[0] << 18 | (unsigned long)v[1] << 12 |
		    (unsigned long)v[2] << 6 | (unsigned long)v[3];
		if ((pad == 1 && (w & 0xff)) || (pad == 2 && (w & 0xffff)))
			return -1;	/* non-zero bits in padding */
		out[o++] = (char)(w >> 16);
		if (pad < 2)
			out[o++] = (char)(w >> 8 & 0xff);
		if (pad < 1)
			out[o++] = (char)(w & 0xff);
	}
	out[o] = '\0';
	return (int)o;
}

/* smtp_base64_encode - RFC 4648 base64 with padding, NUL-terminated */
void
smtp_base64_encode(const void *in, size_t len, char *out, size_t outlen)
{
	const unsigned char *s = in;
	size_t i, o = 0;
	unsigned long w;

	/* Sanity check: a short buffer is a caller bug. */
	assert(outlen >= (len + 2) / 3 * 4 + 1);
	if (outlen < (len + 2) / 3 * 4 + 1) {
		if (outlen > 0)
			out[0] = '\0';
		return;
	}
	for (i = 0; i + 3 <= len; i += 3) {
		w = (unsigned long)s[i] << 16 | (unsigned long)s[i + 1] << 8 |
		    s[i + 2];
		out[o++] = b64_alphabet[w >> 18];
		out[o++] = b64_alphabet[w >> 12 & 63];
		out[o++] = b64_alphabet[w >> 6 & 63];
		out[o++] = b64_alphabet[w & 63];
	}
	if (len - i > 0) {
		w = (unsigned long)s[i] << 16;
		if (len - i == 2)
			w |= (unsigned long)s[i + 1] << 8;
		out[o++] = b64_alphabet[w >> 18];
		out[o++] = b64_alphabet[w >> 12 & 63];
		out[o++] = len - i == 2 ? b64_alphabet[w >> 6 & 63] : '=';
		out[o++] = '=';
	}
	out[o] = '\0';
}

/* smtp_dot_init - prepare a decoder for one DATA transaction */
void
smtp_dot_init(struct smtp_dot *d)
{
	d->state = DOT_ST_BOL;
	d->linelen = 0;
	d->flags = 0;
	d->done = false;
}

/*
 * dot_scan - SMTP_DOT_NUL / SMTP_DOT_8BIT for n octets, a word at a time.
 * The NUL test is the classic "has a zero byte" trick: exact for whether
 * any byte is zero, though not for which one, which we do not need.
 */
static unsigned
dot_scan(const char *p, size_t n)
{
	const uint64_t lo = 0x0101010101010101ULL;
	const uint64_t hi = 0x8080808080808080ULL;
	uint64_t w, high = 0, zero = 0;
	unsigned f = 0;

	for (; n >= 8; p += 8, n -= 8) {
		memcpy(&w, p, 8);
		high |= w;
		zero |= (w - lo) & ~w;
	}
	for (; n > 0; p++, n--) {
		if (*p == '\0')
			f |= SMTP_DOT_NUL;
		high |= (unsigned char)*p;
	}
	if (high & hi)
		f |= SMTP_DOT_8BIT;
	if (zero & hi)
		f |= SMTP_DOT_NUL;
	return f;
}

/* dot_count - add n octets to the current line and check its length */
static void
dot_count(struct smtp_dot *d, size_t n)
{
	d->linelen += n;
	if (d->linelen > SMTP_LINE_MAX)
		d->flags |= SMTP_DOT_LONG_LINE;
}

/* dot_flush - append the input run [run, p) to the body */
static void
dot_flush(struct smtp_dot *d, struct buf *out, const char *run,
    const char *p)
{
	const unsigned both = SMTP_DOT_NUL | SMTP_DOT_8BIT;

	if (p <= run)
		return;
	/* Once both flags are up there is nothing left to look for. */
	if ((d->flags & both) != both)
		d->flags |= dot_scan(run, (size_t)(p - run));
	buf_append(out, run, (size_t)(p - run));
}

/*
 * smtp_dot_decode - feed raw DATA octets; see smtp_parse.h.
 *
 * The body is the input minus stuffed dots and the terminator, so we
 * track a run of input still to append ([run, p)) and flush it only when
 * an octet must be dropped or the input ends. Only CR LF counts as a line
 * end for unstuffing and for the terminator; a bare LF does reset the
 * line length, since every later hop will treat it as a line end too.
 */
size_t
smtp_dot_decode(struct smtp_dot *d, const char *in, size_t len,
    struct buf *out)
{
	const char *p = in, *end = in + len, *run = in, *nl = NULL, *cr;

	if (d->done)
		return 0;
	while (p < end) {
		switch (d->state) {
		case DOT_ST_BOL:
			if (*p == '.') {
				/* RFC 5321 4.5.2: drop the stuffed dot. */
				dot_flush(d, out, run, p);
				run = ++p;
				dot_count(d, 1);	/* it was on the wire */
				d->state = DOT_ST_DOT;
			} else
				d->state = DOT_ST_TEXT;
			break;
		case DOT_ST_DOT:
			if (*p != '\r') {
				d->state = DOT_ST_TEXT;
				break;
			}
			if (p + 1 == end) {
				/* Hold the CR until we know what follows. */
				dot_flush(d, out, run, p);
				run = ++p;
				d->state = DOT_ST_DOT_CR;
				break;
			}
			if (p[1] == '\n') {
				dot_flush(d, out, run, p);
				d->done = true;
				d->state = DOT_ST_BOL;
				d->linelen = 0;
				return (size_t)(p + 2 - in);
			}
			/* A bare CR after the dot: it stays in the run. */
			d->flags |= SMTP_DOT_BARE_CR;
			dot_count(d, 1);
			p++;
			d->state = DOT_ST_TEXT;
			break;
		case DOT_ST_DOT_CR:
			/* Only reached at the start of a call, so run == p. */
			if (*p == '\n') {
				d->done = true;
				d->state = DOT_ST_BOL;
				d->linelen = 0;
				return (size_t)(p + 1 - in);
			}
			buf_append(out, "\r", 1);
			d->flags |= SMTP_DOT_BARE_CR;
			dot_count(d, 1);
			d->state = DOT_ST_TEXT;
			break;
		case DOT_ST_CR:
			/* The previous call ended on a CR, already in out. */
			if (*p == '\n') {
				p++;
				d->linelen = 0;
				d->state = DOT_ST_BOL;
			} else {
				d->flags |= SMTP_DOT_BARE_CR;
				dot_count(d, 1);
				d->state = DOT_ST_TEXT;
			}
			break;
		case DOT_ST_TEXT:
			/*
			 * nl caches the next LF (or end) so a line full of
			 * bare CRs does not rescan it: the work stays linear.
			 */
			if (nl == NULL || nl < p) {
				nl = memchr(p, '\n', (size_t)(end - p));
				if (nl == NULL)
					nl = end;
			}
			cr = memchr(p, '\r', (size_t)(nl - p));
			if (cr == NULL) {
				dot_count(d, (size_t)(nl - p));
				if (nl == end) {
					p = end;
					break;
				}
				/*
				 * In this state the octet before p is never
				 * a CR, and [p, nl) holds none, so this LF is
				 * bare. It does not start a line for the
				 * terminator: "\n.\r\n" is body, not the end.
				 */
				d->flags |= SMTP_DOT_BARE_LF;
				d->linelen = 0;
				p = nl + 1;
				break;
			}
			dot_count(d, (size_t)(cr - p));
			p = cr + 1;
			if (p == end)
				d->state = DOT_ST_CR;
			else if (*p == '\n') {
				p++;
				d->linelen = 0;
				d->state = DOT_ST_BOL;
			} else {
				d->flags |= SMTP_DOT_BARE_CR;
				dot_count(d, 1);
			}
			break;
		default:
			assert(!"smtp_dot: bad state");
			d->state = DOT_ST_TEXT;
			break;
		}
	}
	dot_flush(d, out, run, end);
	return len;
}
