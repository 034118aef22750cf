/*
 * test_smtp_parse.c - unit tests for relay/smtp_parse.c: command lines,
 * paths, ESMTP parameters, xtext, base64 and the DATA decoder.
 *
 * The DATA decoder is checked three ways: fixed cases, every split point
 * of each fixed case (plus one byte at a time), and random inputs against
 * a deliberately naive whole-buffer reference decoder.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config/util.h"
#include "relay/smtp_parse.h"
#include "tests/unit/test.h"

/* What one complete run of the DATA decoder produced. */
struct dot_result {
	struct buf body;	/* decoded body */
	size_t consumed;	/* input octets consumed */
	unsigned flags;		/* SMTP_DOT_* */
	bool done;		/* terminator seen */
};

static void dot_run_split(const char *, size_t, size_t, size_t,
    struct dot_result *);
static void dot_run_chunks(const char *, size_t, size_t, struct dot_result *);
static void dot_run_ref(const char *, size_t, struct dot_result *);
static void dot_check_all_splits(const char *, size_t);
static void dot_expect(const char *, size_t, const char *, size_t, size_t,
    unsigned, bool);
static void path_ok(const char *, bool, bool, const char *, const char *);
static const char *path_err(const char *, bool, bool);

/* dot_run_split - feed in as [0, a), [a, b), [b, len), stopping when done */
static void
dot_run_split(const char *in, size_t len, size_t a, size_t b,
    struct dot_result *r)
{
	struct smtp_dot d;
	size_t cuts[3] = { a, b, len }, off = 0, n, i;

	buf_init(&r->body);
	buf_append(&r->body, "", 0);
	smtp_dot_init(&d);
	for (i = 0; i < 3 && !d.done; i++) {
		if (cuts[i] < off)
			continue;
		n = smtp_dot_decode(&d, in + off, cuts[i] - off, &r->body);
		ASSERT(n <= cuts[i] - off);
		if (!d.done)
			ASSERT_EQ(n, cuts[i] - off);
		off += n;
	}
	r->consumed = off;
	r->flags = d.flags;
	r->done = d.done;
}

/* dot_run_chunks - feed in chunk octets at a time */
static void
dot_run_chunks(const char *in, size_t len, size_t chunk, struct dot_result *r)
{
	struct smtp_dot d;
	size_t off = 0, n, want;

	buf_init(&r->body);
	buf_append(&r->body, "", 0);
	smtp_dot_init(&d);
	while (off < len && !d.done) {
		want = len - off < chunk ? len - off : chunk;
		n = smtp_dot_decode(&d, in + off, want, &r->body);
		if (!d.done)
			ASSERT_EQ(n, want);
		off += n;
	}
	/* A finished decoder takes nothing more. */
	if (d.done)
		ASSERT_EQ(smtp_dot_decode(&d, "x", 1, &r->body), 0);
	r->consumed = off;
	r->flags = d.flags;
	r->done = d.done;
}

/*
 * dot_run_ref - a naive whole-buffer decoder written straight from the
 * rules, to compare the streaming one against.
 */
static void
dot_run_ref(const char *in, size_t len, struct dot_result *r)
{
	const unsigned char *s = (const unsigned char *)in;
	bool bol = true;
	size_t i = 0, linelen = 0;

	buf_init(&r->body);
	buf_append(&r->body, "", 0);
	r->flags = 0;
	r->done = false;
	while (i < len) {
		if (bol && s[i] == '.') {
			if (i + 2 < len && s[i + 1] == '\r' &&
			    s[i + 2] == '\n') {
				r->done = true;
				i += 3;
				break;
			}
			/* With only ".\r" left we cannot know yet. */
			if (i + 2 == len && s[i + 1] == '\r') {
				linelen++;
				i = len;
				break;
			}
			linelen++;
			i++;
			bol = false;
			continue;
		}
		bol = false;
		if (s[i] == '\n') {
			if (i == 0 || s[i - 1] != '\r')
				r->flags |= SMTP_DOT_BARE_LF;
			else
				bol = true;
			linelen = 0;
		} else if (s[i] == '\r') {
			if (i + 1 < len && s[i + 1] != '\n') {
				r->flags |= SMTP_DOT_BARE_CR;
				linelen++;
			}
		} else
			linelen++;
		if (s[i] == 0)
			r->flags |= SMTP_DOT_NUL;
		if (s[i] >= 0x80)
			r->flags |= SMTP_DOT_8BIT;
		if (linelen > 998)
			r->flags |= SMTP_DOT_LONG_LINE;
		buf_append(&r->body, s + i, 1);
		i++;
	}
	r->consumed = i;
}

/* dot_check_all_splits - every 1-, 2- and 3-piece feed agrees */
static void
dot_check_all_splits(const char *in, size_t len)
{
	struct dot_result whole, ref, r;
	size_t a, b;

	dot_run_chunks(in, len, len ? len : 1, &whole);
	dot_run_ref(in, len, &ref);
	ASSERT_EQ(whole.body.len, ref.body.len);
	ASSERT(memcmp(whole.body.data, ref.body.data, ref.body.len) == 0);
	ASSERT_EQ(whole.consumed, ref.consumed);
	ASSERT_EQ(whole.flags, ref.flags);
	ASSERT_EQ(whole.done, ref.done);

	dot_run_chunks(in, len, 1, &r);
	ASSERT_EQ(r.body.len, whole.body.len);
	ASSERT(memcmp(r.body.data, whole.body.data, whole.body.len) == 0);
	ASSERT_EQ(r.consumed, whole.consumed);
	ASSERT_EQ(r.flags, whole.flags);
	ASSERT_EQ(r.done, whole.done);
	buf_free(&r.body);

	for (a = 0; a <= len; a++) {
		for (b = a; b <= len; b++) {
			dot_run_split(in, len, a, b, &r);
			ASSERT_EQ(r.body.len, whole.body.len);
			ASSERT(memcmp(r.body.data, whole.body.data,
			    whole.body.len) == 0);
			ASSERT_EQ(r.consumed, whole.consumed);
			ASSERT_EQ(r.flags, whole.flags);
			ASSERT_EQ(r.done, whole.done);
			buf_free(&r.body);
		}
	}
	buf_free(&whole.body);
	buf_free(&ref.body);
}

/* dot_expect - decode whole and split, and compare with what we expect */
static void
dot_expect(const char *in, size_t len, const char *body, size_t blen,
    size_t consumed, unsigned flags, bool done)
{
	struct dot_result r;

	dot_run_chunks(in, len, len ? len : 1, &r);
	ASSERT_EQ(r.body.len, blen);
	ASSERT(blen == 0 || memcmp(r.body.data, body, blen) == 0);
	ASSERT_EQ(r.consumed, consumed);
	ASSERT_EQ(r.flags, flags);
	ASSERT_EQ(r.done, done);
	buf_free(&r.body);
	dot_check_all_splits(in, len);
}

#define DOT_EXPECT(in, body, consumed, flags, done) \
	dot_expect(in, sizeof(in) - 1, body, sizeof(body) - 1, consumed, \
	    flags, done)

/* path_ok - parse must succeed with the given address and parameters */
static void
path_ok(const char *arg, bool allow_null, bool utf8, const char *addr,
    const char *params)
{
	char *a = NULL;
	const char *p = NULL, *why = NULL;

	ASSERT_EQ(smtp_path_parse(arg, allow_null, utf8, &a, &p, &why), 0);
	ASSERT(why == NULL);
	ASSERT_STR_EQ(a, addr);
	ASSERT_STR_EQ(p, params);
	free(a);
}

/* path_err - parse must fail; returns the reason */
static const char *
path_err(const char *arg, bool allow_null, bool utf8)
{
	static char junk[] = "x";
	char *a = junk;
	const char *p = "x", *why = NULL;

	ASSERT_EQ(smtp_path_parse(arg, allow_null, utf8, &a, &p, &why),
	    RELAY_EPROTO);
	ASSERT(a == NULL);
	ASSERT(p == NULL);
	ASSERT(why != NULL && *why != '\0');
	return why;
}

TEST(cmd_table)
{
	static const struct {
		const char *line;
		enum smtp_verb verb;
		const char *arg;
	} t[] = {
		{ "HELO example.org", SMTP_CMD_HELO, "example.org" },
		{ "ehlo example.org", SMTP_CMD_EHLO, "example.org" },
		{ "EhLo  two", SMTP_CMD_EHLO, " two" },
		{ "STARTTLS", SMTP_CMD_STARTTLS, "" },
		{ "starttls", SMTP_CMD_STARTTLS, "" },
		{ "STARTTLSX", SMTP_CMD_UNKNOWN, "" },
		{ "START", SMTP_CMD_UNKNOWN, "" },
		{ "AUTH PLAIN AGZv", SMTP_CMD_AUTH, "PLAIN AGZv" },
		{ "DATA", SMTP_CMD_DATA, "" },
		{ "BDAT 100 LAST", SMTP_CMD_BDAT, "100 LAST" },
		{ "RSET", SMTP_CMD_RSET, "" },
		{ "NOOP hello", SMTP_CMD_NOOP, "hello" },
		{ "QUIT", SMTP_CMD_QUIT, "" },
		{ "help", SMTP_CMD_HELP, "" },
		{ "VRFY user", SMTP_CMD_VRFY, "user" },
		{ "EXPN list", SMTP_CMD_EXPN, "list" },
		{ "DATA ", SMTP_CMD_DATA, "" },
		{ "XYZZY foo", SMTP_CMD_UNKNOWN, "foo" },
		{ "", SMTP_CMD_UNKNOWN, "" },
		{ " HELO x", SMTP_CMD_UNKNOWN, "HELO x" },
		{ "GET / HTTP/1.1", SMTP_CMD_UNKNOWN, "/ HTTP/1.1" },
	};
	struct smtp_cmd c;
	size_t i;

	for (i = 0; i < ARRAY_SIZE(t); i++) {
		smtp_cmd_parse(t[i].line, &c);
		if (c.verb != t[i].verb)
			fprintf(stderr, "line \"%s\"\n", t[i].line);
		ASSERT_EQ(c.verb, t[i].verb);
		ASSERT_STR_EQ(c.arg, t[i].arg);
	}
}

TEST(cmd_mail_rcpt)
{
	static const struct {
		const char *line;
		enum smtp_verb verb;
		const char *arg;	/* NULL: keyword missing */
	} t[] = {
		{ "MAIL FROM:<a@b>", SMTP_CMD_MAIL, "<a@b>" },
		{ "mail from: <a@b>", SMTP_CMD_MAIL, "<a@b>" },
		{ "Mail From:   <a@b> SIZE=1", SMTP_CMD_MAIL, "<a@b> SIZE=1" },
		{ "MAIL  FROM:<a@b>", SMTP_CMD_MAIL, "<a@b>" },
		{ "MAIL FROM:", SMTP_CMD_MAIL, "" },
		{ "MAIL <a@b>", SMTP_CMD_MAIL, NULL },
		{ "MAIL FROM <a@b>", SMTP_CMD_MAIL, NULL },
		{ "MAIL", SMTP_CMD_MAIL, NULL },
		{ "MAIL TO:<a@b>", SMTP_CMD_MAIL, NULL },
		{ "RCPT TO:<a@b>", SMTP_CMD_RCPT, "<a@b>" },
		{ "rcpt to: <a@b>", SMTP_CMD_RCPT, "<a@b>" },
		{ "RCPT FROM:<a@b>", SMTP_CMD_RCPT, NULL },
		{ "RCPT", SMTP_CMD_RCPT, NULL },
		{ "MAILFROM:<a@b>", SMTP_CMD_UNKNOWN, "" },
	};
	struct smtp_cmd c;
	size_t i;

	for (i = 0; i < ARRAY_SIZE(t); i++) {
		smtp_cmd_parse(t[i].line, &c);
		ASSERT_EQ(c.verb, t[i].verb);
		if (t[i].arg == NULL)
			ASSERT(c.arg == NULL);
		else
			ASSERT_STR_EQ(c.arg, t[i].arg);
	}
}

TEST(verb_name)
{
	ASSERT_STR_EQ(smtp_verb_name(SMTP_CMD_MAIL), "MAIL");
	ASSERT_STR_EQ(smtp_verb_name(SMTP_CMD_STARTTLS), "STARTTLS");
	ASSERT_STR_EQ(smtp_verb_name(SMTP_CMD_EXPN), "EXPN");
	ASSERT_STR_EQ(smtp_verb_name(SMTP_CMD_UNKNOWN), "UNKNOWN");
	ASSERT_STR_EQ(smtp_verb_name(SMTP_CMD_LAST), "UNKNOWN");
}

TEST(path_simple)
{
	path_ok("<a@b>", false, false, "a@b", "");
	path_ok("<john.doe@mail.example.com>", false, false,
	    "john.doe@mail.example.com", "");
	path_ok("<x!#$%&'*+-/=?^_`{|}~@ex-ample.org>", false, false,
	    "x!#$%&'*+-/=?^_`{|}~@ex-ample.org", "");
	path_ok("<user@localhost>", false, false, "user@localhost", "");
	path_ok("<Postmaster@Example.COM>", false, false,
	    "Postmaster@Example.COM", "");
	path_ok("<a@b> ", false, false, "a@b", "");
}

TEST(path_null)
{
	path_ok("<>", true, false, "", "");
	path_ok("<> SIZE=100", true, false, "", "SIZE=100");
	ASSERT_STR_EQ(path_err("<>", false, false),
	    "null address not allowed here");
	ASSERT_STR_EQ(path_err("<>x", true, false),
	    "syntax error after address");
}

TEST(path_quoted)
{
	path_ok("<\"john doe\"@example.com>", false, false,
	    "\"john doe\"@example.com", "");
	path_ok("<\"a\\\"b\"@example.com>", false, false,
	    "\"a\\\"b\"@example.com", "");
	path_ok("<\"a\\\\b@c>d\"@example.com> BODY=7BIT", false, false,
	    "\"a\\\\b@c>d\"@example.com", "BODY=7BIT");
	path_ok("<\"\"@example.com>", false, false, "\"\"@example.com", "");
	/* Unterminated, control characters, bad escapes. */
	ASSERT_STR_EQ(path_err("<\"abc@example.com>", false, false),
	    "syntax error in local part");
	path_err("<\"a\tb\"@example.com>", false, false);
	path_err("<\"a\\\tb\"@example.com>", false, false);
	path_err("<\"ab\"x@example.com>", false, false);
	path_err("<\"a\"\"b\"@example.com>", false, false);
}

TEST(path_dot_string)
{
	ASSERT_STR_EQ(path_err("<.a@b>", false, false),
	    "syntax error in local part");
	path_err("<a.@b>", false, false);
	path_err("<a..b@b>", false, false);
	path_err("<a b@c>", false, false);
	path_err("<a(b)@c>", false, false);
	path_err("<a,b@c>", false, false);
	ASSERT_STR_EQ(path_err("<user>", false, false),
	    "address has no domain");
	ASSERT_STR_EQ(path_err("<@>", false, false), "syntax error in domain");
	ASSERT_STR_EQ(path_err("<a@>", false, false),
	    "syntax error in domain");
}

TEST(path_domain)
{
	path_ok("<a@x-1.y2.z>", false, false, "a@x-1.y2.z", "");
	path_ok("<a@123.example>", false, false, "a@123.example", "");
	ASSERT_STR_EQ(path_err("<a@-x.com>", false, false),
	    "syntax error in domain");
	path_err("<a@x-.com>", false, false);
	path_err("<a@x..com>", false, false);
	path_err("<a@.x.com>", false, false);
	path_err("<a@x.com.>", false, false);
	path_err("<a@x_y.com>", false, false);
	path_err("<a@x.com x>", false, false);
}

TEST(path_source_route)
{
	path_ok("<@a.example:user@b.example>", false, false,
	    "user@b.example", "");
	path_ok("<@a.example,@b.example:user@c.example> SIZE=1", false, false,
	    "user@c.example", "SIZE=1");
	ASSERT_STR_EQ(path_err("<@a.example user@b>", false, false),
	    "syntax error in source route");
	path_err("<@a.example,b.example:user@c>", false, false);
	path_err("<@:user@c>", false, false);
	path_err("<@a.example:>", false, false);
}

TEST(path_literal_ipv4)
{
	path_ok("<a@[192.0.2.1]>", false, false, "a@[192.0.2.1]", "");
	ASSERT_STR_EQ(path_err("<a@[192.0.2.256]>", false, false),
	    "invalid address literal");
	path_err("<a@[192.0.2]>", false, false);
	path_err("<a@[192.0.2.1>", false, false);
	path_err("<a@[]>", false, false);
	path_err("<a@[192.0.2.1]x>", false, false);
}

TEST(path_literal_ipv6)
{
	path_ok("<a@[IPv6:2001:db8::1]>", false, false,
	    "a@[IPv6:2001:db8::1]", "");
	path_ok("<a@[ipv6:::ffff:192.0.2.1]>", false, false,
	    "a@[ipv6:::ffff:192.0.2.1]", "");
	path_err("<a@[IPv6:2001:db8::g]>", false, false);
	path_err("<a@[IPv6:192.0.2.1]>", false, false);
	path_err("<a@[2001:db8::1]>", false, false);	/* no tag */
	path_err("<a@[x-tag:foo]>", false, false);	/* general literal */
	path_err("<a@[IPv6:1111:2222:3333:4444:5555:6666:7777:8888:9999:"
	    "aaaa:bbbb:cccc:dddd]>", false, false);
}

TEST(path_utf8)
{
	/* "jörg@münchen.example", "用户@例子.广告" */
	path_ok("<j\xc3\xb6rg@m\xc3\xbcnchen.example>", false, true,
	    "j\xc3\xb6rg@m\xc3\xbcnchen.example", "");
	path_ok("<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90."
	    "\xe5\xb9\xbf\xe5\x91\x8a>", false, true,
	    "\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90."
	    "\xe5\xb9\xbf\xe5\x91\x8a", "");
	path_ok("<\"\xc3\xa9 x\"@a.b>", false, true, "\"\xc3\xa9 x\"@a.b", "");
	path_ok("<a@\xf0\x9f\x98\x80.example>", false, true,
	    "a@\xf0\x9f\x98\x80.example", "");
	ASSERT_STR_EQ(path_err("<j\xc3\xb6rg@example.com>", false, false),
	    "non-ASCII address without SMTPUTF8");
	ASSERT_STR_EQ(path_err("<a@m\xc3\xbcnchen.example>", false, false),
	    "non-ASCII address without SMTPUTF8");
	ASSERT_STR_EQ(path_err("<\"\xc3\xa9\"@a.b>", false, false),
	    "non-ASCII address without SMTPUTF8");
}

TEST(path_utf8_invalid)
{
	static const char *const bad[] = {
		"<\xc0\xaf@a.b>",		/* overlong '/' */
		"<\xc1\xbf@a.b>",		/* overlong */
		"<\xe0\x80\xaf@a.b>",		/* overlong 3-byte */
		"<\xf0\x80\x80\xaf@a.b>",	/* overlong 4-byte */
		"<\xed\xa0\x80@a.b>",		/* surrogate U+D800 */
		"<\xed\xbf\xbf@a.b>",		/* surrogate U+DFFF */
		"<\xf4\x90\x80\x80@a.b>",	/* U+110000 */
		"<\xf5\x80\x80\x80@a.b>",	/* lead byte past F4 */
		"<\xff@a.b>",
		"<\x80@a.b>",			/* lone continuation */
		"<\xc3@a.b>",			/* truncated */
		"<\xe4\xbe@a.b>",		/* truncated */
		"<a@\xc3.b>",
		"<\"\xc3\"@a.b>",
	};
	size_t i;

	for (i = 0; i < ARRAY_SIZE(bad); i++)
		ASSERT_STR_EQ(path_err(bad[i], false, true),
		    "invalid UTF-8 in address");
	/* Boundaries that are valid. */
	path_ok("<\xed\x9f\xbf@a.b>", false, true, "\xed\x9f\xbf@a.b", "");
	path_ok("<\xf4\x8f\xbf\xbf@a.b>", false, true,
	    "\xf4\x8f\xbf\xbf@a.b", "");
	path_ok("<\xc2\x80@a.b>", false, true, "\xc2\x80@a.b", "");
}

TEST(path_limits)
{
	char arg[1024], label[80], want[1024];
	size_t n;

	/* Local part: 64 octets fine, 65 not; quotes count. */
	memset(label, 'l', 64);
	label[64] = '\0';
	snprintf(arg, sizeof(arg), "<%s@a.b>", label);
	snprintf(want, sizeof(want), "%s@a.b", label);
	path_ok(arg, false, false, want, "");
	snprintf(arg, sizeof(arg), "<%sl@a.b>", label);
	ASSERT_STR_EQ(path_err(arg, false, false), "local part too long");
	label[62] = '\0';
	snprintf(arg, sizeof(arg), "<\"%s\"@a.b>", label);
	snprintf(want, sizeof(want), "\"%s\"@a.b", label);
	path_ok(arg, false, false, want, "");
	snprintf(arg, sizeof(arg), "<\"%sl\"@a.b>", label);
	ASSERT_STR_EQ(path_err(arg, false, false), "local part too long");

	/* Labels: 63 fine, 64 not. */
	memset(label, 'd', 63);
	label[63] = '\0';
	snprintf(arg, sizeof(arg), "<a@%s.com>", label);
	snprintf(want, sizeof(want), "a@%s.com", label);
	path_ok(arg, false, false, want, "");
	snprintf(arg, sizeof(arg), "<a@%sd.com>", label);
	ASSERT_STR_EQ(path_err(arg, false, false), "domain label too long");

	/* Domain: 4 * 63 + 3 dots = 255 fine, 257 not. */
	n = (size_t)snprintf(arg, sizeof(arg), "<a@%s.%s.%s.%s>", label, label,
	    label, label);
	ASSERT_EQ(n, 3 + 255 + 1);
	snprintf(want, sizeof(want), "a@%s.%s.%s.%s", label, label, label,
	    label);
	path_ok(arg, false, false, want, "");
	snprintf(arg, sizeof(arg), "<a@%s.%s.%s.%s.x>", label, label, label,
	    label);
	ASSERT_STR_EQ(path_err(arg, false, false), "domain too long");

	/* A source route can push the whole path past SMTP_PATH_MAX. */
	snprintf(arg, sizeof(arg), "<@%s.%s,@%s.%s,@%s.%s:a@b>", label, label,
	    label, label, label, label);
	path_ok(arg, false, false, "a@b", "");
	snprintf(arg, sizeof(arg), "<@%s.%s,@%s.%s,@%s.%s,@%s.%s:a@b>", label,
	    label, label, label, label, label, label, label);
	ASSERT_STR_EQ(path_err(arg, false, false), "address too long");
}

TEST(path_brackets)
{
	const char *why = "syntax error in address (angle brackets required)";

	ASSERT_STR_EQ(path_err("a@b", false, false), why);
	ASSERT_STR_EQ(path_err("", true, false), why);
	ASSERT_STR_EQ(path_err(" <a@b>", false, false), why);
	ASSERT_STR_EQ(path_err("<a@b", false, false), why);
	ASSERT_STR_EQ(path_err("a@b>", false, false), why);
	path_err("< a@b>", false, false);
	path_err("<a@b >", false, false);
	path_err("<<a@b>>", false, false);
}

TEST(path_trailing)
{
	ASSERT_STR_EQ(path_err("<a@b>x", false, false),
	    "syntax error after address");
	path_err("<a@b>>", false, false);
	path_err("<a@b>\tSIZE=1", false, false);
	path_err("<postmaster>x", false, false);
}

TEST(path_params)
{
	path_ok("<a@b> SIZE=123 BODY=8BITMIME", true, false, "a@b",
	    "SIZE=123 BODY=8BITMIME");
	path_ok("<a@b>   SMTPUTF8", true, false, "a@b", "SMTPUTF8");
	path_ok("<> RET=HDRS", true, false, "", "RET=HDRS");
}

TEST(path_postmaster)
{
	path_ok("<postmaster>", false, false, "postmaster", "");
	path_ok("<PostMaster>", false, false, "postmaster", "");
	path_ok("<Postmaster> NOTIFY=NEVER", false, false, "postmaster",
	    "NOTIFY=NEVER");
	ASSERT_STR_EQ(path_err("<postmasterx>", false, false),
	    "address has no domain");
}

TEST(params_basic)
{
	struct smtp_param p[8];

	ASSERT_EQ(smtp_params_parse("", p, 8), 0);
	ASSERT_EQ(smtp_params_parse("   ", p, 8), 0);
	ASSERT_EQ(smtp_params_parse("SIZE=123 body=8BITMIME SMTPUTF8", p, 8),
	    3);
	ASSERT_STR_EQ(p[0].key, "SIZE");
	ASSERT_EQ(p[0].vlen, 3);
	ASSERT(memcmp(p[0].value, "123", 3) == 0);
	ASSERT_STR_EQ(p[1].key, "BODY");
	ASSERT_EQ(p[1].vlen, 8);
	ASSERT(memcmp(p[1].value, "8BITMIME", 8) == 0);
	ASSERT_STR_EQ(p[2].key, "SMTPUTF8");
	ASSERT(p[2].value == NULL);
	ASSERT_EQ(p[2].vlen, 0);

	ASSERT_EQ(smtp_params_parse("  ret=HDRS    ENVID=a+2Bb  ", p, 8), 2);
	ASSERT_STR_EQ(p[0].key, "RET");
	ASSERT_STR_EQ(p[1].key, "ENVID");
	ASSERT_EQ(p[1].vlen, 5);
	ASSERT(memcmp(p[1].value, "a+2Bb", 5) == 0);

	ASSERT_EQ(smtp_params_parse("X-FOO-1=bar ORCPT=rfc822;a@b", p, 8), 2);
	ASSERT_STR_EQ(p[0].key, "X-FOO-1");
	/* UTF-8 in a value passes (RFC 6531); its user checks it. */
	ASSERT_EQ(smtp_params_parse("ORCPT=utf-8;\xc3\xa9@b", p, 8), 1);
	ASSERT_EQ(p[0].vlen, 10);
}

TEST(params_bad)
{
	struct smtp_param p[4];
	char key[64];

	ASSERT_EQ(smtp_params_parse("SIZE=", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("=1", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("-X=1", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("SI_ZE=1", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("SIZE=1=2", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("SIZE=a\tb", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("SIZE=\x7f", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("A\tB", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("A B C D E", p, 4), -1);
	ASSERT_EQ(smtp_params_parse("A B C D", p, 4), 4);
	ASSERT_EQ(smtp_params_parse("A", p, 0), -1);
	/* Keys: 31 octets fit key[32], 32 do not. */
	memset(key, 'K', 31);
	key[31] = '\0';
	ASSERT_EQ(smtp_params_parse(key, p, 4), 1);
	ASSERT_EQ(strlen(p[0].key), 31);
	key[31] = 'K';
	key[32] = '\0';
	ASSERT_EQ(smtp_params_parse(key, p, 4), -1);
}

TEST(xtext)
{
#define XT(s) smtp_xtext_valid(s, sizeof(s) - 1)
	ASSERT(XT(""));
	ASSERT(XT("abc"));
	ASSERT(XT("rfc822;user@example.com"));
	ASSERT(XT("a+2Bb+3D"));
	ASSERT(XT("+00+FF"));
	ASSERT(XT("!~"));
	ASSERT(!XT("a b"));
	ASSERT(!XT("a=b"));
	ASSERT(!XT("a+"));
	ASSERT(!XT("a+2"));
	ASSERT(!XT("a+2b"));	/* lower-case hex */
	ASSERT(!XT("a+G0"));
	ASSERT(!XT("a\x7f"));
	ASSERT(!XT("\xc3\xa9"));
	ASSERT(!XT("a\tb"));
#undef XT
	/* The length is honoured: what follows it does not matter. */
	ASSERT(smtp_xtext_valid("ab cd", 2));
	ASSERT(!smtp_xtext_valid("a+2B", 3));
}

TEST(base64_valid)
{
	static const struct {
		const char *in, *out;
		int len;
	} t[] = {
		{ "", "", 0 },
		{ "Zg==", "f", 1 },
		{ "Zm8=", "fo", 2 },
		{ "Zm9v", "foo", 3 },
		{ "Zm9vYg==", "foob", 4 },
		{ "Zm9vYmE=", "fooba", 5 },
		{ "Zm9vYmFy", "foobar", 6 },
		{ "AGZvbwBiYXI=", "\0foo\0bar", 8 },
		{ "+/+/", "\xfb\xff\xbf", 3 },
	};
	char out[64];
	size_t i;

	for (i = 0; i < ARRAY_SIZE(t); i++) {
		ASSERT_EQ(smtp_base64_decode(t[i].in, strlen(t[i].in), out,
		    sizeof(out)), t[i].len);
		ASSERT(memcmp(out, t[i].out, (size_t)t[i].len) == 0);
		ASSERT_EQ(out[t[i].len], '\0');
	}
}

TEST(base64_invalid)
{
	static const char *const bad[] = {
		"=", "Zg=", "Zg", "Z", "Zm9vY", "Zg=x", "Z===", "====",
		"Zg==Zg==", "Zm=v", "Zm9v\n", "Zm 9", "Zm9-", "Zm9_",
		"Zh==",		/* non-zero bits under the padding */
		"Zm9=",		/* ditto */
		"Zm\xc3\xa9",
	};
	char out[64];
	size_t i;

	for (i = 0; i < ARRAY_SIZE(bad); i++) {
		if (smtp_base64_decode(bad[i], strlen(bad[i]), out,
		    sizeof(out)) != -1)
			fprintf(stderr, "accepted \"%s\"\n", bad[i]);
		ASSERT_EQ(smtp_base64_decode(bad[i], strlen(bad[i]), out,
		    sizeof(out)), -1);
	}
	/* Too small an output buffer is refused, not overrun. */
	ASSERT_EQ(smtp_base64_decode("Zm9vYmFy", 8, out, 6), -1);
	ASSERT_EQ(smtp_base64_decode("Zm9vYmFy", 8, out, 7), 6);
}

TEST(base64_encode)
{
	unsigned char in[256];
	char enc[400], dec[300];
	size_t n, i;

	smtp_base64_encode("", 0, enc, sizeof(enc));
	ASSERT_STR_EQ(enc, "");
	smtp_base64_encode("f", 1, enc, 5);
	ASSERT_STR_EQ(enc, "Zg==");
	smtp_base64_encode("fo", 2, enc, 5);
	ASSERT_STR_EQ(enc, "Zm8=");
	smtp_base64_encode("foobar", 6, enc, 9);
	ASSERT_STR_EQ(enc, "Zm9vYmFy");
	for (i = 0; i < sizeof(in); i++)
		in[i] = (unsigned char)(i * 7 + 3);
	/* Round trips at every length exercise all three tail cases. */
	for (n = 0; n <= sizeof(in); n++) {
		smtp_base64_encode(in, n, enc, sizeof(enc));
		ASSERT_EQ(strlen(enc), (n + 2) / 3 * 4);
		ASSERT_EQ(smtp_base64_decode(enc, strlen(enc), dec,
		    sizeof(dec)), n);
		ASSERT(memcmp(in, dec, n) == 0);
	}
}

TEST(dot_simple)
{
	DOT_EXPECT("a\r\n.\r\n", "a\r\n", 6, 0, true);
	DOT_EXPECT("Subject: x\r\n\r\nbody\r\n.\r\n",
	    "Subject: x\r\n\r\nbody\r\n", 23, 0, true);
	/* Not finished yet: everything consumed, done stays false. */
	DOT_EXPECT("a\r\nb\r\n", "a\r\nb\r\n", 6, 0, false);
	DOT_EXPECT("a\r\n.\r", "a\r\n", 5, 0, false);
	DOT_EXPECT("a\r\n.", "a\r\n", 4, 0, false);
}

TEST(dot_empty)
{
	/* DATA starts at the beginning of a line. */
	DOT_EXPECT(".\r\n", "", 3, 0, true);
	DOT_EXPECT("\r\n.\r\n", "\r\n", 5, 0, true);
	DOT_EXPECT("", "", 0, 0, false);
}

TEST(dot_stuffed)
{
	DOT_EXPECT("..\r\n.\r\n", ".\r\n", 7, 0, true);
	DOT_EXPECT("a\r\n..b\r\n...\r\n.x\r\n.\r\n",
	    "a\r\n.b\r\n..\r\nx\r\n", 20, 0, true);
	/* A dot in mid-line is data. */
	DOT_EXPECT("a.\r\nb.c\r\n.\r\n", "a.\r\nb.c\r\n", 12, 0, true);
	/* "..\r\n" is a stuffed lone dot, not the end. */
	DOT_EXPECT("..\r\n", ".\r\n", 4, 0, false);
}

TEST(dot_pipelined)
{
	static const char in[] = "a\r\n.\r\nQUIT\r\n";
	struct dot_result r;

	DOT_EXPECT("a\r\n.\r\nQUIT\r\n", "a\r\n", 6, 0, true);
	DOT_EXPECT(".\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", "", 3, 0,
	    true);
	DOT_EXPECT("x\r\n.\r\n.\r\n", "x\r\n", 6, 0, true);
	/* One byte at a time: the call that sees the LF returns 1. */
	dot_run_chunks(in, sizeof(in) - 1, 1, &r);
	ASSERT_EQ(r.consumed, 6);
	ASSERT_STR_EQ(in + r.consumed, "QUIT\r\n");
	buf_free(&r.body);
}

TEST(dot_smuggling_bare_lf)
{
	/* A bare LF before ".\r\n" is not a line end for the terminator. */
	DOT_EXPECT("a\n.\r\nMAIL FROM:<x@y>\r\n",
	    "a\n.\r\nMAIL FROM:<x@y>\r\n", 22, SMTP_DOT_BARE_LF, false);
	DOT_EXPECT("a\n.\r\nb\r\n.\r\n", "a\n.\r\nb\r\n", 11,
	    SMTP_DOT_BARE_LF, true);
	DOT_EXPECT("a\n.\n", "a\n.\n", 4, SMTP_DOT_BARE_LF, false);
	DOT_EXPECT("\n.\r\n", "\n.\r\n", 4, SMTP_DOT_BARE_LF, false);
	/* A bare CR does not end a line either. */
	DOT_EXPECT("a\r.\r\n", "a\r.\r\n", 5, SMTP_DOT_BARE_CR, false);
}

TEST(dot_smuggling_dot_lf)
{
	/* "\r\n.\n" does not end the data; the line's dot is unstuffed. */
	DOT_EXPECT("a\r\n.\nb\r\n", "a\r\n\nb\r\n", 8, SMTP_DOT_BARE_LF,
	    false);
	DOT_EXPECT("a\r\n.\n\r\n.\r\n", "a\r\n\n\r\n", 10, SMTP_DOT_BARE_LF,
	    true);
	/* "\r\n.\r.\r\n": a bare CR after the dot. */
	DOT_EXPECT("a\r\n.\rb\r\n.\r\n", "a\r\n\rb\r\n", 11,
	    SMTP_DOT_BARE_CR, true);
	DOT_EXPECT(".\r\r\n.\r\n", "\r\r\n", 7, SMTP_DOT_BARE_CR, true);
}

TEST(dot_flags)
{
	DOT_EXPECT("a\0b\r\n.\r\n", "a\0b\r\n", 8, SMTP_DOT_NUL, true);
	DOT_EXPECT("caf\xc3\xa9\r\n.\r\n", "caf\xc3\xa9\r\n", 10,
	    SMTP_DOT_8BIT, true);
	DOT_EXPECT("a\rb\r\n.\r\n", "a\rb\r\n", 8, SMTP_DOT_BARE_CR, true);
	DOT_EXPECT("a\r\r\n.\r\n", "a\r\r\n", 7, SMTP_DOT_BARE_CR, true);
	DOT_EXPECT("a\nb\r\n.\r\n", "a\nb\r\n", 8, SMTP_DOT_BARE_LF, true);
	DOT_EXPECT("\xff\0\r\n.\r\n", "\xff\0\r\n", 7,
	    SMTP_DOT_NUL | SMTP_DOT_8BIT, true);
	/* NUL and 8-bit found by the word-wise scan, far into a run. */
	DOT_EXPECT("0123456789abcdef0123456789\0bcdef\r\n.\r\n",
	    "0123456789abcdef0123456789\0bcdef\r\n", 37, SMTP_DOT_NUL, true);
	DOT_EXPECT("0123456789abcdef0123456789\x80zcdef\r\n.\r\n",
	    "0123456789abcdef0123456789\x80zcdef\r\n", 37, SMTP_DOT_8BIT,
	    true);
}

TEST(dot_long_line)
{
	static const size_t lens[] = { 997, 998, 999, 1000, 3000 };
	struct dot_result r;
	struct buf in;
	size_t i, j, chunk;

	for (i = 0; i < ARRAY_SIZE(lens); i++) {
		for (j = 0; j < 4; j++) {
			buf_init(&in);
			buf_puts(&in, "short\r\n");
			/* j: plain, stuffed dot, bare-LF end, CR at a cut */
			if (j == 1)
				buf_puts(&in, ".");
			while (in.len < 7 + lens[i])
				buf_puts(&in, "x");
			buf_puts(&in, j == 2 ? "\n" : "\r\n");
			buf_puts(&in, "short again\r\n.\r\n");
			chunk = j == 3 ? 7 + lens[i] + 1 : in.len;
			dot_run_chunks(in.data, in.len, chunk, &r);
			ASSERT(r.done);
			ASSERT_EQ(r.consumed, in.len);
			ASSERT_EQ(!!(r.flags & SMTP_DOT_LONG_LINE),
			    lens[i] > 998);
			buf_free(&r.body);
			dot_run_chunks(in.data, in.len, 1, &r);
			ASSERT_EQ(!!(r.flags & SMTP_DOT_LONG_LINE),
			    lens[i] > 998);
			buf_free(&r.body);
			buf_free(&in);
		}
	}
	/* Many short lines add up to nothing. */
	buf_init(&in);
	for (i = 0; i < 500; i++)
		buf_puts(&in, "0123456789\r\n");
	dot_run_chunks(in.data, in.len, 333, &r);
	ASSERT_EQ(r.flags, 0);
	buf_free(&r.body);
	buf_free(&in);
}

TEST(dot_every_split)
{
	static const char *const inputs[] = {
		"a\r\n.\r\nQUIT\r\n",
		".\r\n",
		"..\r\n...\r\n.\r\nX",
		"a\n.\r\nb\r\n.\r\n",
		"a\r\n.\nb\r.\r\r\n.\r\n",
		"\r\r\n.\r.\r\n.\r\n",
		"x\r\n.\r",
		"\n\n.\n\r\n..\r\n\r\n.\r\nRSET\r\n",
		"Subject: hi\r\n\r\n.leading\r\n..two\r\nend\r\n.\r\n",
	};
	size_t i;

	for (i = 0; i < ARRAY_SIZE(inputs); i++)
		dot_check_all_splits(inputs[i], strlen(inputs[i]));
	dot_check_all_splits("a\0\r\n.\0\r\n\xc3\xa9.\r\n.\r\n", 16);
}

TEST(dot_random)
{
	static const char alphabet[] = { '.', '.', '\r', '\r', '\n', '\n',
	    'a', 'b', '\0', (char)0xe9 };
	char in[48];
	unsigned seed = 12345;
	size_t len, i, iter;

	/* A fixed LCG so a failure reproduces. */
	for (iter = 0; iter < 3000; iter++) {
		seed = seed * 1103515245u + 12345u;
		len = (seed >> 16) % (sizeof(in) / 2);
		for (i = 0; i < len; i++) {
			seed = seed * 1103515245u + 12345u;
			in[i] = alphabet[(seed >> 16) % sizeof(alphabet)];
		}
		dot_check_all_splits(in, len);
	}
}

TEST(dot_large)
{
	struct smtp_dot d;
	struct buf in, out;
	size_t i, off, n;

	/* 1 MB of stuffed and plain lines in 4 KB reads, as the server does. */
	buf_init(&in);
	buf_init(&out);
	for (i = 0; i < 20000; i++)
		buf_puts(&in, i % 7 ? "the quick brown fox jumps over it\r\n" :
		    "..a stuffed line\r\n");
	buf_puts(&in, ".\r\nQUIT\r\n");
	smtp_dot_init(&d);
	for (off = 0; off < in.len && !d.done; off += n)
		n = smtp_dot_decode(&d, in.data + off, in.len - off < 4096 ?
		    in.len - off : 4096, &out);
	ASSERT(d.done);
	ASSERT_EQ(d.flags, 0);
	ASSERT_STR_EQ(in.data + off, "QUIT\r\n");
	ASSERT_EQ(out.len, in.len - 9 - (20000 + 6) / 7);
	buf_free(&in);
	buf_free(&out);
}

TEST_MAIN("smtp_parse",
    TEST_ENTRY(cmd_table),
    TEST_ENTRY(cmd_mail_rcpt),
    TEST_ENTRY(verb_name),
    TEST_ENTRY(path_simple),
    TEST_ENTRY(path_null),
    TEST_ENTRY(path_quoted),
    TEST_ENTRY(path_dot_string),
    TEST_ENTRY(path_domain),
    TEST_ENTRY(path_source_route),
    TEST_ENTRY(path_literal_ipv4),
    TEST_ENTRY(path_literal_ipv6),
    TEST_ENTRY(path_utf8),
    TEST_ENTRY(path_utf8_invalid),
    TEST_ENTRY(path_limits),
    TEST_ENTRY(path_brackets),
    TEST_ENTRY(path_trailing),
    TEST_ENTRY(path_params),
    TEST_ENTRY(path_postmaster),
    TEST_ENTRY(params_basic),
    TEST_ENTRY(params_bad),
    TEST_ENTRY(xtext),
    TEST_ENTRY(base64_valid),
    TEST_ENTRY(base64_invalid),
    TEST_ENTRY(base64_encode),
    TEST_ENTRY(dot_simple),
    TEST_ENTRY(dot_empty),
    TEST_ENTRY(dot_stuffed),
    TEST_ENTRY(dot_pipelined),
    TEST_ENTRY(dot_smuggling_bare_lf),
    TEST_ENTRY(dot_smuggling_dot_lf),
    TEST_ENTRY(dot_flags),
    TEST_ENTRY(dot_long_line),
    TEST_ENTRY(dot_every_split),
    TEST_ENTRY(dot_random),
    TEST_ENTRY(dot_large))
