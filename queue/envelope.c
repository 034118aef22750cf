/*
 * NAME
 *	envelope.c - format and parse the envelope record
 *
 * SUMMARY
 *	An envelope is the sender, the session facts that a DSN or a log
 *	needs (HELO, client address, AUTH user, ESMTP parameters) and one
 *	line of delivery state per recipient. This file converts between
 *	struct envelope and its on-disk text. It is pure: no I/O, no clock.
 *
 * DESCRIPTION
 *	The record is versioned "key: value" text, one key per line, every
 *	line ending in '\n', recipients last, and a final "end: <nrcpts>"
 *	line. Every value that can carry a space or an odd byte (addresses
 *	inside their <>, HELO, AUTH user, ENVID, ORCPT, the last reply) is
 *	xtext-encoded, so a line is printable ASCII and a "rcpt:" line
 *	splits on single spaces without any quoting language.
 *
 *	Invariants: envelope_format() output always parses back into an
 *	identical struct (the unit tests check this). The parser accepts
 *	nothing else: a missing "end:" line (a truncated file), a missing
 *	newline at the end, an unknown or repeated key, a bad number, a
 *	recipient count that differs from "end:", or a version newer than
 *	ENVELOPE_VERSION. "version" must be the first line, so a future
 *	format can change everything after it.
 *
 * ERRORS
 *	envelope_parse() returns RELAY_ECORRUPT and writes "line N: what"
 *	into err; the struct is then empty (as after envelope_init()).
 *	Allocation failure aborts (xmalloc).
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/util.h"
#include "queue/envelope.h"

/* Required top-level keys, as bits of "seen" (rcpt and end are special). */
#define EK_VERSION	0x0001
#define EK_ID		0x0002
#define EK_CREATED	0x0004
#define EK_SIZE		0x0008
#define EK_FROM		0x0010
#define EK_HELO		0x0020
#define EK_CLIENT	0x0040
#define EK_AUTH		0x0080
#define EK_BODY		0x0100
#define EK_SMTPUTF8	0x0200
#define EK_ENVID	0x0400
#define EK_RET		0x0800
#define EK_REQUIRED	(EK_VERSION | EK_ID | EK_CREATED | EK_SIZE | EK_FROM)

/* Recipient fields, as bits of a per-line "seen". */
#define RF_STATE	0x01
#define RF_ATTEMPTS	0x02
#define RF_NEXT		0x04
#define RF_UPDATED	0x08
#define RF_NOTIFY	0x10
#define RF_ORCPT	0x20
#define RF_LAST		0x40
#define RF_WARNED	0x80
#define RF_GREY		0x100
#define RF_REQUIRED	(RF_STATE | RF_ATTEMPTS | RF_NEXT | RF_UPDATED)

/* Parser state shared by the per-line helpers. */
struct env_parser {
	struct envelope *env;	/* being filled */
	int lineno;		/* 1-based line being parsed, for err */
	char *err;		/* caller's error buffer (may be NULL) */
	size_t errlen;		/* its size */
};

static const char *const env_body_names[] = {
	[ENV_BODY_7BIT] = "7bit",
	[ENV_BODY_8BITMIME] = "8bitmime",
	[ENV_BODY_BINARYMIME] = "binarymime",
};

static const char *const env_ret_names[] = {
	[ENV_RET_UNSPEC] = "unspec",	/* never written: the key is omitted */
	[ENV_RET_FULL] = "full",
	[ENV_RET_HDRS] = "hdrs",
};

static const char *const env_state_names[] = {
	[ENV_RCPT_PENDING] = "pending",
	[ENV_RCPT_SENT] = "sent",
	[ENV_RCPT_BOUNCED] = "bounced",
};
_Static_assert(ARRAY_SIZE(env_state_names) == ENV_RCPT_STATE_LAST,
    "env_state_names out of sync with enum env_rcpt_state");

static const struct {
	const char *name;	/* keyword in the notify= list */
	int flag;		/* ENV_NOTIFY_* bit */
} env_notify_names[] = {
	{ "never", ENV_NOTIFY_NEVER },
	{ "success", ENV_NOTIFY_SUCCESS },
	{ "failure", ENV_NOTIFY_FAILURE },
	{ "delay", ENV_NOTIFY_DELAY },
};

static int env_fail(struct env_parser *, const char *, ...)
    __attribute__((format(printf, 2, 3)));
static bool env_number(const char *, size_t, uint64_t, uint64_t *);
static bool env_is_key(const char *, size_t, const char *);
static int env_enum(const char *, size_t, const char *const *, size_t);
static int env_decode(struct env_parser *, const char *, size_t,
    const char *, char **);
static int env_decode_path(struct env_parser *, const char *, size_t,
    const char *, char **);
static int env_parse_notify(const char *, size_t);
static char **env_string_key(struct envelope *, const char *, size_t,
    unsigned *);
static int env_parse_rcpt(struct env_parser *, const char *, size_t);
static int env_parse_line(struct env_parser *, const char *, size_t,
    unsigned *, bool *, uint64_t *);
static void env_format_notify(struct buf *, int);
static char *env_strdup_null(const char *);

/* envelope_init - an empty envelope of the current format version */
void
envelope_init(struct envelope *env)
{
	memset(env, 0, sizeof *env);
	env->version = ENVELOPE_VERSION;
	env->sender = NULL;
	env->rcpts = NULL;
}

/* envelope_free - release every string and the recipient array */
void
envelope_free(struct envelope *env)
{
	for (size_t i = 0; i < env->nrcpts; i++) {
		free(env->rcpts[i].addr);
		free(env->rcpts[i].orcpt);
		free(env->rcpts[i].last_reply);
	}
	free(env->rcpts);
	free(env->sender);
	free(env->helo);
	free(env->client_addr);
	free(env->auth_user);
	free(env->envid);
	envelope_init(env);
}

/* env_strdup_null - xstrdup that maps NULL to NULL */
static char *
env_strdup_null(const char *s)
{
	return s ? xstrdup(s) : NULL;
}

/* envelope_copy - deep copy; dst is overwritten (see envelope.h) */
void
envelope_copy(struct envelope *dst, const struct envelope *src)
{
	/* Scalars and the id in one go, then replace every pointer. */
	*dst = *src;
	dst->sender = env_strdup_null(src->sender);
	dst->helo = env_strdup_null(src->helo);
	dst->client_addr = env_strdup_null(src->client_addr);
	dst->auth_user = env_strdup_null(src->auth_user);
	dst->envid = env_strdup_null(src->envid);
	dst->rcpts = NULL;
	if (src->nrcpts == 0)
		return;
	dst->rcpts = xcalloc(src->nrcpts, sizeof *dst->rcpts);
	for (size_t i = 0; i < src->nrcpts; i++) {
		const struct env_rcpt *s = &src->rcpts[i];
		struct env_rcpt *d = &dst->rcpts[i];

		*d = *s;
		d->addr = env_strdup_null(s->addr);
		d->orcpt = env_strdup_null(s->orcpt);
		d->last_reply = env_strdup_null(s->last_reply);
	}
}

/* envelope_add_rcpt - append a pending recipient (earlier pointers move) */
struct env_rcpt *
envelope_add_rcpt(struct envelope *env, const char *addr)
{
	struct env_rcpt *r;

	env->rcpts = xrealloc(env->rcpts, (env->nrcpts + 1) * sizeof *r);
	r = &env->rcpts[env->nrcpts++];
	memset(r, 0, sizeof *r);
	r->addr = xstrdup(addr);
	r->state = ENV_RCPT_PENDING;
	return r;
}

/* envelope_is_done - no recipient is still pending */
bool
envelope_is_done(const struct envelope *env)
{
	for (size_t i = 0; i < env->nrcpts; i++)
		if (env->rcpts[i].state == ENV_RCPT_PENDING)
			return false;
	return true;
}

/* env_rcpt_state_name - the on-disk and log name of a recipient state */
const char *
env_rcpt_state_name(enum env_rcpt_state st)
{
	if ((unsigned)st >= ARRAY_SIZE(env_state_names))
		return "invalid";
	return env_state_names[st];
}

/* xtext_encode - append s with every byte outside 0x21..0x7e, '+', '=' as +XX */
void
xtext_encode(struct buf *out, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	const unsigned char *p = (const unsigned char *)s;
	const unsigned char *run = p;

	/* Copy plain runs in one append: last replies can be long. */
	for (; *p; p++) {
		if (*p >= 0x21 && *p <= 0x7e && *p != '+' && *p != '=')
			continue;
		buf_append(out, run, (size_t)(p - run));
		char enc[3] = { '+', hex[*p >> 4], hex[*p & 0xf] };
		buf_append(out, enc, sizeof enc);
		run = p + 1;
	}
	buf_append(out, run, (size_t)(p - run));
}

/* xtext_decode - heap copy of the decoded text, NULL if s is not xtext */
char *
xtext_decode(const char *s, size_t len)
{
	char *out = xmalloc(len + 1);
	size_t o = 0;

	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		int v = 0;

		if (c == '+') {
			/* RFC 3461: exactly two upper-case hex digits. */
			if (len - i < 3)
				goto bad;
			for (size_t k = 1; k <= 2; k++) {
				unsigned char h = (unsigned char)s[i + k];

				if (h >= '0' && h <= '9')
					v = v * 16 + (h - '0');
				else if (h >= 'A' && h <= 'F')
					v = v * 16 + (h - 'A' + 10);
				else
					goto bad;
			}
			if (v == 0)	/* a NUL cannot live in a C string */
				goto bad;
			out[o++] = (char)v;
			i += 2;
		} else if (c < 0x21 || c > 0x7e || c == '=') {
			goto bad;
		} else
			out[o++] = (char)c;
	}
	out[o] = '\0';
	return out;
bad:
	free(out);
	return NULL;
}

/* env_format_notify - append the comma list for a NOTIFY mask */
static void
env_format_notify(struct buf *out, int notify)
{
	const char *sep = "";

	for (size_t i = 0; i < ARRAY_SIZE(env_notify_names); i++) {
		if (!(notify & env_notify_names[i].flag))
			continue;
		buf_printf(out, "%s%s", sep, env_notify_names[i].name);
		sep = ",";
	}
}

/* envelope_format - append the record; always the current version */
void
envelope_format(const struct envelope *env, struct buf *out)
{
	buf_printf(out, "version: %d\n", ENVELOPE_VERSION);
	buf_printf(out, "id: %s\n", env->id);
	buf_printf(out, "created: %" PRId64 "\n", env->created);
	buf_printf(out, "size: %" PRIu64 "\n", env->size);
	buf_puts(out, "from: <");
	xtext_encode(out, env->sender ? env->sender : "");
	buf_puts(out, ">\n");
	if (env->helo) {
		buf_puts(out, "helo: ");
		xtext_encode(out, env->helo);
		buf_puts(out, "\n");
	}
	if (env->client_addr) {
		buf_puts(out, "client: ");
		xtext_encode(out, env->client_addr);
		buf_puts(out, "\n");
	}
	if (env->auth_user) {
		buf_puts(out, "auth: ");
		xtext_encode(out, env->auth_user);
		buf_puts(out, "\n");
	}
	buf_printf(out, "body: %s\n", env_body_names[env->body]);
	buf_printf(out, "smtputf8: %d\n", env->smtputf8 ? 1 : 0);
	if (env->envid) {
		buf_puts(out, "envid: ");
		xtext_encode(out, env->envid);
		buf_puts(out, "\n");
	}
	if (env->ret != ENV_RET_UNSPEC)
		buf_printf(out, "ret: %s\n", env_ret_names[env->ret]);
	for (size_t i = 0; i < env->nrcpts; i++) {
		const struct env_rcpt *r = &env->rcpts[i];

		buf_puts(out, "rcpt: <");
		xtext_encode(out, r->addr);
		buf_printf(out, "> state=%s attempts=%d next=%" PRId64
		    " updated=%" PRId64, env_rcpt_state_name(r->state),
		    r->attempts, r->next_attempt, r->updated);
		if (r->notify) {
			buf_puts(out, " notify=");
			env_format_notify(out, r->notify);
		}
		if (r->orcpt) {
			buf_puts(out, " orcpt=");
			xtext_encode(out, r->orcpt);
		}
		if (r->warned)
			buf_puts(out, " warned=1");
		if (r->greylists)
			buf_printf(out, " grey=%d", r->greylists);
		if (r->last_reply) {
			buf_puts(out, " last=");
			xtext_encode(out, r->last_reply);
		}
		buf_puts(out, "\n");
	}
	buf_printf(out, "end: %zu\n", env->nrcpts);
}

/* env_fail - fill err with "line N: ..." and return RELAY_ECORRUPT */
static int
env_fail(struct env_parser *ps, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (ps->err == NULL || ps->errlen == 0)
		return RELAY_ECORRUPT;
	n = snprintf(ps->err, ps->errlen, "line %d: ", ps->lineno);
	if (n >= 0 && (size_t)n < ps->errlen) {
		va_start(ap, fmt);
		vsnprintf(ps->err + n, ps->errlen - (size_t)n, fmt, ap);
		va_end(ap);
	}
	return RELAY_ECORRUPT;
}

/* env_number - strict decimal (no sign, no blanks, 1-20 digits) <= max */
static bool
env_number(const char *s, size_t len, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;

	if (len == 0 || len > 20)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned d = (unsigned char)s[i] - '0';

		if (d > 9 || v > (UINT64_MAX - d) / 10)
			return false;
		v = v * 10 + d;
	}
	if (v > max)
		return false;
	*out = v;
	return true;
}

/* env_is_key - does the counted string s equal the keyword? */
static bool
env_is_key(const char *s, size_t len, const char *key)
{
	return strlen(key) == len && memcmp(s, key, len) == 0;
}

/* env_enum - index of s in names[], or -1 */
static int
env_enum(const char *s, size_t len, const char *const *names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (names[i] && env_is_key(s, len, names[i]))
			return (int)i;
	return -1;
}

/* env_decode - xtext-decode a value into *out (which must be unset) */
static int
env_decode(struct env_parser *ps, const char *s, size_t len,
    const char *what, char **out)
{
	if ((*out = xtext_decode(s, len)) == NULL)
		return env_fail(ps, "invalid xtext in %s", what);
	return 0;
}

/* env_decode_path - decode "<xtext>" into the bare address */
static int
env_decode_path(struct env_parser *ps, const char *s, size_t len,
    const char *what, char **out)
{
	if (len < 2 || s[0] != '<' || s[len - 1] != '>')
		return env_fail(ps, "%s is not <address>", what);
	return env_decode(ps, s + 1, len - 2, what, out);
}

/* env_parse_notify - mask for "success,failure", or -1 */
static int
env_parse_notify(const char *s, size_t len)
{
	int mask = 0;

	while (len > 0) {
		const char *comma = memchr(s, ',', len);
		size_t n = comma ? (size_t)(comma - s) : len;
		int flag = 0;

		for (size_t i = 0; i < ARRAY_SIZE(env_notify_names); i++)
			if (env_is_key(s, n, env_notify_names[i].name))
				flag = env_notify_names[i].flag;
		if (flag == 0 || (mask & flag))
			return -1;
		mask |= flag;
		if (comma == NULL)
			return mask;
		s = comma + 1;
		len -= n + 1;
		if (len == 0)	/* trailing comma */
			return -1;
	}
	return -1;
}

/* env_parse_rcpt - "<addr> key=value ..." into a new recipient */
static int
env_parse_rcpt(struct env_parser *ps, const char *v, size_t len)
{
	struct envelope *env = ps->env;
	struct env_rcpt *r;
	const char *end = v + len, *sp;
	unsigned seen = 0;
	uint64_t n;
	int rc;

	/* Append a blank recipient first so envelope_free owns its strings. */
	env->rcpts = xrealloc(env->rcpts, (env->nrcpts + 1) * sizeof *r);
	r = &env->rcpts[env->nrcpts++];
	memset(r, 0, sizeof *r);

	sp = memchr(v, ' ', len);
	if ((rc = env_decode_path(ps, v, sp ? (size_t)(sp - v) : len,
	    "recipient", &r->addr)) != 0)
		return rc;
	while (sp != NULL) {
		const char *f = sp + 1, *eq, *fv;
		size_t flen, fvlen;
		unsigned bit;

		sp = memchr(f, ' ', (size_t)(end - f));
		flen = (size_t)((sp ? sp : end) - f);
		if ((eq = memchr(f, '=', flen)) == NULL)
			return env_fail(ps, "recipient field without '='");
		fv = eq + 1;
		fvlen = flen - (size_t)(fv - f);
		flen = (size_t)(eq - f);
		if (env_is_key(f, flen, "state")) {
			int st = env_enum(fv, fvlen, env_state_names,
			    ARRAY_SIZE(env_state_names));
			if (st < 0)
				return env_fail(ps, "bad recipient state");
			r->state = (enum env_rcpt_state)st;
			bit = RF_STATE;
		} else if (env_is_key(f, flen, "attempts")) {
			if (!env_number(fv, fvlen, INT32_MAX, &n))
				return env_fail(ps, "bad number in attempts");
			r->attempts = (int)n;
			bit = RF_ATTEMPTS;
		} else if (env_is_key(f, flen, "next")) {
			if (!env_number(fv, fvlen, INT64_MAX, &n))
				return env_fail(ps, "bad number in next");
			r->next_attempt = (int64_t)n;
			bit = RF_NEXT;
		} else if (env_is_key(f, flen, "updated")) {
			if (!env_number(fv, fvlen, INT64_MAX, &n))
				return env_fail(ps, "bad number in updated");
			r->updated = (int64_t)n;
			bit = RF_UPDATED;
		} else if (env_is_key(f, flen, "notify")) {
			if ((r->notify = env_parse_notify(fv, fvlen)) < 0)
				return env_fail(ps, "bad notify list");
			bit = RF_NOTIFY;
		} else if (env_is_key(f, flen, "orcpt")) {
			if (seen & RF_ORCPT)
				return env_fail(ps, "repeated field orcpt");
			if ((rc = env_decode(ps, fv, fvlen, "orcpt",
			    &r->orcpt)) != 0)
				return rc;
			bit = RF_ORCPT;
		} else if (env_is_key(f, flen, "grey")) {
			if (!env_number(fv, fvlen, INT32_MAX, &n))
				return env_fail(ps, "bad number in grey");
			r->greylists = (int)n;
			bit = RF_GREY;
		} else if (env_is_key(f, flen, "warned")) {
			if (fvlen != 1 || fv[0] != '1')
				return env_fail(ps, "bad warned flag");
			r->warned = true;
			bit = RF_WARNED;
		} else if (env_is_key(f, flen, "last")) {
			if (seen & RF_LAST)
				return env_fail(ps, "repeated field last");
			if ((rc = env_decode(ps, fv, fvlen, "last",
			    &r->last_reply)) != 0)
				return rc;
			bit = RF_LAST;
		} else
			return env_fail(ps, "unknown recipient field \"%.*s\"",
			    (int)(flen > 32 ? 32 : flen), f);
		if (seen & bit)
			return env_fail(ps, "repeated recipient field");
		seen |= bit;
	}
	if ((seen & RF_REQUIRED) != RF_REQUIRED)
		return env_fail(ps, "recipient lacks state, attempts, next "
		    "or updated");
	return 0;
}

/* env_string_key - the member behind an optional xtext key, or NULL */
static char **
env_string_key(struct envelope *env, const char *key, size_t klen,
    unsigned *bit)
{
	char **dst = NULL;

	if (env_is_key(key, klen, "helo")) {
		*bit = EK_HELO;
		dst = &env->helo;
	} else if (env_is_key(key, klen, "client")) {
		*bit = EK_CLIENT;
		dst = &env->client_addr;
	} else if (env_is_key(key, klen, "auth")) {
		*bit = EK_AUTH;
		dst = &env->auth_user;
	} else if (env_is_key(key, klen, "envid")) {
		*bit = EK_ENVID;
		dst = &env->envid;
	}
	return dst;
}

/*
 * env_parse_line - one line (without its '\n'). *seen collects EK_* bits,
 * *ended is set by "end:", *end_count is its value.
 */
static int
env_parse_line(struct env_parser *ps, const char *line, size_t len,
    unsigned *seen, bool *ended, uint64_t *end_count)
{
	struct envelope *env = ps->env;
	const char *colon, *v;
	size_t klen, vlen;
	unsigned bit = 0;
	uint64_t n;
	char **dst;
	int i;

	for (size_t k = 0; k < len; k++) {
		unsigned char c = (unsigned char)line[k];

		if (c < 0x20 || c > 0x7e)
			return env_fail(ps, "invalid byte 0x%02x", c);
	}
	if ((colon = memchr(line, ':', len)) == NULL || colon == line)
		return env_fail(ps, "not a \"key: value\" line");
	klen = (size_t)(colon - line);
	for (size_t k = 0; k < klen; k++)
		if (!((line[k] >= 'a' && line[k] <= 'z') ||
		    (line[k] >= '0' && line[k] <= '9')))
			return env_fail(ps, "bad key");
	/* "key: value"; an empty value may lose its space to an editor. */
	v = colon + 1;
	vlen = len - klen - 1;
	if (vlen > 0) {
		if (*v != ' ')
			return env_fail(ps, "missing space after ':'");
		v++;
		vlen--;
	}
	if (ps->lineno == 1 && !env_is_key(line, klen, "version"))
		return env_fail(ps, "record does not start with version");

	if (env_is_key(line, klen, "version")) {
		if (!env_number(v, vlen, INT32_MAX, &n) || n == 0)
			return env_fail(ps, "bad number in version");
		if (n > ENVELOPE_VERSION)
			return env_fail(ps, "version %" PRIu64 " is newer than "
			    "supported %d", n, ENVELOPE_VERSION);
		env->version = (int)n;
		bit = EK_VERSION;
	} else if (env_is_key(line, klen, "id")) {
		if (vlen != ENVELOPE_ID_LEN)
			return env_fail(ps, "bad id");
		for (size_t k = 0; k < vlen; k++)
			if (!((v[k] >= '0' && v[k] <= '9') ||
			    (v[k] >= 'a' && v[k] <= 'f')))
				return env_fail(ps, "bad id");
		memcpy(env->id, v, vlen);
		env->id[vlen] = '\0';
		bit = EK_ID;
	} else if (env_is_key(line, klen, "created")) {
		if (!env_number(v, vlen, INT64_MAX, &n))
			return env_fail(ps, "bad number in created");
		env->created = (int64_t)n;
		bit = EK_CREATED;
	} else if (env_is_key(line, klen, "size")) {
		if (!env_number(v, vlen, UINT64_MAX, &env->size))
			return env_fail(ps, "bad number in size");
		bit = EK_SIZE;
	} else if (env_is_key(line, klen, "from")) {
		/* String keys check for repeats before decoding: no leak. */
		if (*seen & EK_FROM)
			return env_fail(ps, "repeated key from");
		*seen |= EK_FROM;
		return env_decode_path(ps, v, vlen, "from", &env->sender);
	} else if ((dst = env_string_key(env, line, klen, &bit)) != NULL) {
		if (*seen & bit)
			return env_fail(ps, "repeated key %.*s", (int)klen,
			    line);
		*seen |= bit;
		return env_decode(ps, v, vlen, "value", dst);
	} else if (env_is_key(line, klen, "body")) {
		if ((i = env_enum(v, vlen, env_body_names,
		    ARRAY_SIZE(env_body_names))) < 0)
			return env_fail(ps, "bad body type");
		env->body = (enum env_body)i;
		bit = EK_BODY;
	} else if (env_is_key(line, klen, "smtputf8")) {
		if (vlen != 1 || (v[0] != '0' && v[0] != '1'))
			return env_fail(ps, "smtputf8 is not 0 or 1");
		env->smtputf8 = v[0] == '1';
		bit = EK_SMTPUTF8;
	} else if (env_is_key(line, klen, "ret")) {
		/* "unspec" is not a valid value: the key is omitted instead */
		if ((i = env_enum(v, vlen, env_ret_names,
		    ARRAY_SIZE(env_ret_names))) <= ENV_RET_UNSPEC)
			return env_fail(ps, "bad ret value");
		env->ret = (enum env_ret)i;
		bit = EK_RET;
	} else if (env_is_key(line, klen, "rcpt")) {
		return env_parse_rcpt(ps, v, vlen);
	} else if (env_is_key(line, klen, "end")) {
		if (!env_number(v, vlen, UINT64_MAX, end_count))
			return env_fail(ps, "bad number in end");
		*ended = true;
		return 0;
	} else
		return env_fail(ps, "unknown key \"%.*s\"",
		    (int)(klen > 32 ? 32 : klen), line);

	if (*seen & bit)
		return env_fail(ps, "repeated key %.*s", (int)klen, line);
	*seen |= bit;
	return 0;
}

/* envelope_parse - strict parse of a whole record; see envelope.h */
int
envelope_parse(const char *text, size_t len, struct envelope *env,
    char *err, size_t errlen)
{
	struct env_parser ps = { env, 0, err, errlen };
	const char *p = text, *end = text + len;
	unsigned seen = 0;
	bool ended = false;
	uint64_t end_count = 0;
	int rc = 0;

	envelope_init(env);
	if (err && errlen)
		err[0] = '\0';
	if (len == 0) {
		ps.lineno = 1;
		return env_fail(&ps, "empty record");
	}
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));

		ps.lineno++;
		if (ended) {
			rc = env_fail(&ps, "data after end line");
			goto fail;
		}
		if (nl == NULL) {
			rc = env_fail(&ps, "truncated record (no newline)");
			goto fail;
		}
		if ((rc = env_parse_line(&ps, p, (size_t)(nl - p), &seen,
		    &ended, &end_count)) != 0)
			goto fail;
		p = nl + 1;
	}
	if (!ended) {
		rc = env_fail(&ps, "truncated record (no end line)");
		goto fail;
	}
	if ((seen & EK_REQUIRED) != EK_REQUIRED) {
		rc = env_fail(&ps, "missing %s",
		    !(seen & EK_VERSION) ? "version" : !(seen & EK_ID) ? "id" :
		    !(seen & EK_CREATED) ? "created" :
		    !(seen & EK_SIZE) ? "size" : "from");
		goto fail;
	}
	if (end_count != env->nrcpts) {
		rc = env_fail(&ps, "end says %" PRIu64 " recipients, record "
		    "has %zu", end_count, env->nrcpts);
		goto fail;
	}
	return 0;
fail:
	envelope_free(env);
	return rc;
}
