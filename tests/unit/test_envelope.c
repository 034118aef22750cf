/*
 * test_envelope.c - unit tests for queue/envelope.c: round trips, the
 * strict parser's refusals, xtext, and the deep copy.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/util.h"
#include "queue/envelope.h"
#include "tests/unit/test.h"

static void fill_full(struct envelope *);
static void assert_str_same(const char *, const char *);
static void assert_env_equal(const struct envelope *, const struct envelope *);
static int parse_text(const char *, char *, size_t);
static void format_text(struct buf *);

/* fill_full - an envelope that uses every field and every odd byte */
static void
fill_full(struct envelope *env)
{
	struct env_rcpt *r;

	envelope_init(env);
	memcpy(env->id, "6743a1f0000a3c7e", ENVELOPE_ID_LEN + 1);
	env->created = 1732425600;
	env->size = 2048;
	env->sender = xstrdup("\"john smith+tag\"@example.com");
	env->helo = xstrdup("mail.example.com");
	env->client_addr = xstrdup("2001:db8::1");
	env->auth_user = xstrdup("user name=x");
	env->body = ENV_BODY_8BITMIME;
	env->smtputf8 = true;
	env->envid = xstrdup("QQ314159+2B");
	env->ret = ENV_RET_HDRS;
	r = envelope_add_rcpt(env, "j\xc3\xbcrgen@b\xc3\xbc" "cher.example");
	r->notify = ENV_NOTIFY_SUCCESS | ENV_NOTIFY_FAILURE;
	r->orcpt = xstrdup("rfc822;j+C3+BCrgen@example");
	r->updated = 1732425600;
	r->last_reply = xstrdup("451 4.7.1 <x> greylisted\r\n\tline2 +=\x01\xff");
	r = envelope_add_rcpt(env, "\"a b\\\"c\"@[192.0.2.1]");
	r->state = ENV_RCPT_SENT;
	r->attempts = 3;
	r->next_attempt = 1732429200;
	r->updated = 1732425999;
	r->notify = ENV_NOTIFY_NEVER;
	r->warned = true;
	r->greylists = 2;
	r = envelope_add_rcpt(env, "c@example.org");
	r->state = ENV_RCPT_BOUNCED;
	r->last_reply = xstrdup("");
}

/* assert_str_same - both NULL or equal */
static void
assert_str_same(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		ASSERT(a == b);
	else
		ASSERT_STR_EQ(a, b);
}

/* assert_env_equal - field by field */
static void
assert_env_equal(const struct envelope *a, const struct envelope *b)
{
	ASSERT_EQ(a->version, b->version);
	ASSERT_STR_EQ(a->id, b->id);
	ASSERT_EQ(a->created, b->created);
	ASSERT_EQ(a->size, b->size);
	assert_str_same(a->sender, b->sender);
	assert_str_same(a->helo, b->helo);
	assert_str_same(a->client_addr, b->client_addr);
	assert_str_same(a->auth_user, b->auth_user);
	ASSERT_EQ(a->body, b->body);
	ASSERT_EQ(a->smtputf8, b->smtputf8);
	assert_str_same(a->envid, b->envid);
	ASSERT_EQ(a->ret, b->ret);
	ASSERT_EQ(a->nrcpts, b->nrcpts);
	for (size_t i = 0; i < a->nrcpts; i++) {
		const struct env_rcpt *x = &a->rcpts[i], *y = &b->rcpts[i];

		ASSERT_STR_EQ(x->addr, y->addr);
		assert_str_same(x->orcpt, y->orcpt);
		ASSERT_EQ(x->notify, y->notify);
		ASSERT_EQ(x->state, y->state);
		ASSERT_EQ(x->attempts, y->attempts);
		ASSERT_EQ(x->next_attempt, y->next_attempt);
		ASSERT_EQ(x->updated, y->updated);
		ASSERT_EQ(x->warned, y->warned);
		ASSERT_EQ(x->greylists, y->greylists);
		assert_str_same(x->last_reply, y->last_reply);
	}
}

/* format_text - the full envelope as text */
static void
format_text(struct buf *b)
{
	struct envelope env;

	buf_init(b);
	fill_full(&env);
	envelope_format(&env, b);
	envelope_free(&env);
}

/* parse_text - parse a C string, free the result, return the status */
static int
parse_text(const char *text, char *err, size_t errlen)
{
	struct envelope env;
	int rc;

	rc = envelope_parse(text, strlen(text), &env, err, errlen);
	envelope_free(&env);
	return rc;
}

#define MINIMAL "version: 1\nid: 0000000000000001\ncreated: 1\nsize: 0\n" \
	"from: <>\n"

TEST(roundtrip_full)
{
	struct envelope a, b;
	struct buf t;
	char err[128];

	fill_full(&a);
	buf_init(&t);
	envelope_format(&a, &t);
	/* Every line is printable ASCII: the encoding did its job. */
	for (size_t i = 0; i < t.len; i++)
		ASSERT(t.data[i] == '\n' ||
		    (t.data[i] >= 0x20 && t.data[i] <= 0x7e));
	ASSERT(strstr(t.data, "notify=success,failure") != NULL);
	ASSERT(strstr(t.data, "rcpt: <\"a+20b\\\"c\"@[192.0.2.1]>") != NULL);
	ASSERT_EQ(envelope_parse(t.data, t.len, &b, err, sizeof err), 0);
	assert_env_equal(&a, &b);
	ASSERT(!envelope_is_done(&b));
	b.rcpts[0].state = ENV_RCPT_SENT;
	ASSERT(envelope_is_done(&b));
	envelope_free(&a);
	envelope_free(&b);
	buf_free(&t);
}

TEST(roundtrip_minimal)
{
	struct envelope a, b;
	struct buf t;
	char err[128];

	envelope_init(&a);
	memcpy(a.id, "00000000000000ff", ENVELOPE_ID_LEN + 1);
	a.sender = xstrdup("");		/* null reverse path */
	buf_init(&t);
	envelope_format(&a, &t);
	ASSERT(strstr(t.data, "from: <>\n") != NULL);
	ASSERT(strstr(t.data, "auth:") == NULL);
	ASSERT(strstr(t.data, "envid:") == NULL);
	ASSERT(strstr(t.data, "ret:") == NULL);
	ASSERT(strstr(t.data, "end: 0\n") != NULL);
	ASSERT_EQ(envelope_parse(t.data, t.len, &b, err, sizeof err), 0);
	assert_env_equal(&a, &b);
	ASSERT(envelope_is_done(&b));
	envelope_free(&a);
	envelope_free(&b);
	buf_free(&t);
}

TEST(truncated_rejected)
{
	struct envelope env;
	struct buf t;
	char err[128];

	format_text(&t);
	/* Every proper prefix of a record is refused, without a leak. */
	for (size_t n = 0; n < t.len; n++) {
		ASSERT_EQ(envelope_parse(t.data, n, &env, err, sizeof err),
		    RELAY_ECORRUPT);
		ASSERT(strncmp(err, "line ", 5) == 0);
		ASSERT_EQ(env.nrcpts, 0);
		ASSERT(env.sender == NULL);
	}
	/* Cut exactly before "end:": the record looks whole otherwise. */
	char *end = strstr(t.data, "end: ");
	ASSERT(end != NULL);
	ASSERT_EQ(envelope_parse(t.data, (size_t)(end - t.data), &env, err,
	    sizeof err), RELAY_ECORRUPT);
	ASSERT(strstr(err, "no end line") != NULL);
	ASSERT_EQ(envelope_parse(t.data, t.len, &env, err, sizeof err), 0);
	envelope_free(&env);
	buf_free(&t);
}

TEST(unknown_key_rejected)
{
	char err[128];

	ASSERT_EQ(parse_text(MINIMAL "end: 0\n", err, sizeof err), 0);
	ASSERT_EQ(parse_text(MINIMAL "colour: blue\nend: 0\n", err,
	    sizeof err), RELAY_ECORRUPT);
	ASSERT_STR_EQ(err, "line 6: unknown key \"colour\"");
	ASSERT_EQ(parse_text(MINIMAL "rcpt: <a@b> state=pending attempts=0 "
	    "next=0 updated=0 colour=blue\nend: 1\n", err, sizeof err),
	    RELAY_ECORRUPT);
	ASSERT(strstr(err, "line 6: unknown recipient field") != NULL);
	/* Repeats are corruption too. */
	ASSERT_EQ(parse_text(MINIMAL "size: 1\nend: 0\n", err, sizeof err),
	    RELAY_ECORRUPT);
	ASSERT_EQ(parse_text(MINIMAL "from: <a@b>\nend: 0\n", err,
	    sizeof err), RELAY_ECORRUPT);
	ASSERT_EQ(parse_text(MINIMAL "rcpt: <a@b> state=sent state=sent "
	    "attempts=0 next=0 updated=0\nend: 1\n", err, sizeof err),
	    RELAY_ECORRUPT);
	ASSERT_EQ(parse_text(MINIMAL "end: 0\nend: 0\n", err, sizeof err),
	    RELAY_ECORRUPT);
	/* A record must start with its version. */
	ASSERT_EQ(parse_text("id: 0000000000000001\nversion: 1\ncreated: 1\n"
	    "size: 0\nfrom: <>\nend: 0\n", err, sizeof err), RELAY_ECORRUPT);
	ASSERT_STR_EQ(err, "line 1: record does not start with version");
}

TEST(version_rejected)
{
	char err[128];

	ASSERT_EQ(parse_text("version: 2\nid: 0000000000000001\ncreated: 1\n"
	    "size: 0\nfrom: <>\nfuture: yes\nend: 0\n", err, sizeof err),
	    RELAY_ECORRUPT);
	ASSERT_STR_EQ(err, "line 1: version 2 is newer than supported 1");
	ASSERT_EQ(parse_text("version: 0\nend: 0\n", err, sizeof err),
	    RELAY_ECORRUPT);
	ASSERT_EQ(parse_text("", err, sizeof err), RELAY_ECORRUPT);
	ASSERT_STR_EQ(err, "line 1: empty record");
}

TEST(missing_and_count)
{
	char err[128];

	ASSERT_EQ(parse_text("version: 1\ncreated: 1\nsize: 0\nfrom: <>\n"
	    "end: 0\n", err, sizeof err), RELAY_ECORRUPT);
	ASSERT_STR_EQ(err, "line 5: missing id");
	ASSERT_EQ(parse_text("version: 1\nid: 0000000000000001\ncreated: 1\n"
	    "from: <>\nend: 0\n", err, sizeof err), RELAY_ECORRUPT);
	ASSERT_STR_EQ(err, "line 5: missing size");
	ASSERT_EQ(parse_text(MINIMAL "rcpt: <a@b> state=pending attempts=0 "
	    "next=0 updated=0\nend: 2\n", err, sizeof err), RELAY_ECORRUPT);
	ASSERT(strstr(err, "end says 2 recipients") != NULL);
	ASSERT_EQ(parse_text(MINIMAL "rcpt: <a@b> state=pending\nend: 1\n",
	    err, sizeof err), RELAY_ECORRUPT);
	ASSERT_EQ(parse_text(MINIMAL "end: 0", err, sizeof err),
	    RELAY_ECORRUPT);	/* last newline missing: truncated */
	ASSERT_EQ(parse_text(MINIMAL "end: 0\nx", err, sizeof err),
	    RELAY_ECORRUPT);
}

TEST(bad_values_rejected)
{
	static const char *const bad[] = {
		"size: -1\n", "size: 12x\n", "size: 99999999999999999999\n",
		"size:  1\n", "size:1\n", "created: \n",
		"id: 0000000000000001X\n", "id: 000000000000000G\n",
		"id: 000000000000000A\n", "body: 9bit\n", "smtputf8: 2\n",
		"ret: unspec\n", "helo: a b\n", "helo: +zz\n", "auth: +00\n",
		"envid: a=b\n", "rcpt: a@b state=pending attempts=0 next=0 "
		"updated=0\n", "rcpt: <a@b> state=lost attempts=0 next=0 "
		"updated=0\n", "rcpt: <a@b> state=sent attempts=x next=0 "
		"updated=0\n", "rcpt: <a@b> state=sent attempts=2147483648 "
		"next=0 updated=0\n", "rcpt: <a@b>  state=sent attempts=0 "
		"next=0 updated=0\n", "rcpt: <a@b> state=sent attempts=0 "
		"next=0 updated=0 notify=success,\n", "rcpt: <a@b> state=sent "
		"attempts=0 next=0 updated=0 notify=never,never\n",
		"rcpt: <a@b> state=sent attempts=0 next=0 updated=0 last=\t\n",
		"tab:\tx\n", "Helo: x\n",
	};
	static const char *const good[] = { "version: 1\n",
	    "id: 0000000000000001\n", "created: 1\n", "size: 0\n",
	    "from: <>\n" };
	struct buf text;
	char err[128];

	buf_init(&text);
	for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
		size_t klen = strcspn(bad[i], ":");

		/* The bad line replaces the good line with its key. */
		buf_reset(&text);
		for (size_t k = 0; k < ARRAY_SIZE(good); k++)
			if (strncmp(good[k], bad[i], klen + 1) != 0)
				buf_puts(&text, good[k]);
		buf_puts(&text, bad[i]);
		buf_printf(&text, "end: %d\n", strncmp(bad[i], "rcpt", 4) == 0);
		if (parse_text(text.data, err, sizeof err) != RELAY_ECORRUPT) {
			fprintf(stderr, "accepted: %s", bad[i]);
			ASSERT(0);
		}
		ASSERT(strncmp(err, "line ", 5) == 0);
	}
	buf_free(&text);
}

TEST(xtext)
{
	struct buf b;
	char *s;

	buf_init(&b);
	xtext_encode(&b, "a+b=c d\x01\xc3\xbc~!");
	ASSERT_STR_EQ(b.data, "a+2Bb+3Dc+20d+01+C3+BC~!");
	s = xtext_decode(b.data, b.len);
	ASSERT_STR_EQ(s, "a+b=c d\x01\xc3\xbc~!");
	free(s);
	s = xtext_decode("", 0);
	ASSERT_STR_EQ(s, "");
	free(s);
	s = xtext_decode("+41+42", 6);
	ASSERT_STR_EQ(s, "AB");
	free(s);
	ASSERT(xtext_decode("+4", 2) == NULL);
	ASSERT(xtext_decode("+4a", 3) == NULL);	/* lower-case hex */
	ASSERT(xtext_decode("+00", 3) == NULL);	/* NUL */
	ASSERT(xtext_decode("a b", 3) == NULL);
	ASSERT(xtext_decode("a=b", 3) == NULL);
	ASSERT(xtext_decode("\xc3\xbc", 2) == NULL);
	/* The length bounds the input: a '+' at the cut is invalid. */
	ASSERT(xtext_decode("ab+41", 3) == NULL);
	buf_free(&b);
	ASSERT_STR_EQ(env_rcpt_state_name(ENV_RCPT_BOUNCED), "bounced");
	ASSERT_STR_EQ(env_rcpt_state_name(ENV_RCPT_STATE_LAST), "invalid");
}

TEST(odd_bytes_in_reply)
{
	struct envelope a, b;
	struct buf t;
	char err[128], reply[256];

	/* Every byte value 1..255 survives in last and orcpt. */
	for (int i = 1; i < 256; i++)
		reply[i - 1] = (char)i;
	reply[255] = '\0';
	envelope_init(&a);
	memcpy(a.id, "0123456789abcdef", ENVELOPE_ID_LEN + 1);
	a.sender = xstrdup(reply);
	envelope_add_rcpt(&a, reply)->last_reply = xstrdup(reply);
	a.rcpts[0].orcpt = xstrdup(reply);
	buf_init(&t);
	envelope_format(&a, &t);
	ASSERT_EQ(envelope_parse(t.data, t.len, &b, err, sizeof err), 0);
	assert_env_equal(&a, &b);
	envelope_free(&a);
	envelope_free(&b);
	buf_free(&t);
}

TEST(copy_deep)
{
	struct envelope a, b, c, empty;
	struct buf ta, tb;

	fill_full(&a);
	envelope_copy(&b, &a);
	assert_env_equal(&a, &b);
	/* Nothing is shared: every pointer is a fresh block. */
	ASSERT(b.sender != a.sender && b.helo != a.helo);
	ASSERT(b.client_addr != a.client_addr && b.auth_user != a.auth_user);
	ASSERT(b.envid != a.envid && b.rcpts != a.rcpts);
	for (size_t i = 0; i < a.nrcpts; i++) {
		ASSERT(b.rcpts[i].addr != a.rcpts[i].addr);
		ASSERT(a.rcpts[i].orcpt == NULL ||
		    b.rcpts[i].orcpt != a.rcpts[i].orcpt);
		ASSERT(a.rcpts[i].last_reply == NULL ||
		    b.rcpts[i].last_reply != a.rcpts[i].last_reply);
	}
	/* NULL stays NULL (rcpt 1 has neither orcpt nor last_reply). */
	ASSERT(b.rcpts[1].orcpt == NULL && b.rcpts[1].last_reply == NULL);
	/* Same record on disk. */
	buf_init(&ta);
	buf_init(&tb);
	envelope_format(&a, &ta);
	envelope_format(&b, &tb);
	ASSERT_EQ(ta.len, tb.len);
	ASSERT(memcmp(ta.data, tb.data, ta.len) == 0);
	/* Changing or freeing the original leaves the copy intact (ASan). */
	a.rcpts[0].state = ENV_RCPT_SENT;
	a.sender[0] = 'X';
	envelope_free(&a);
	ASSERT_EQ(b.rcpts[0].state, ENV_RCPT_PENDING);
	ASSERT_STR_EQ(b.sender, "\"john smith+tag\"@example.com");
	/* A copy of a copy, then of an empty envelope. */
	envelope_copy(&c, &b);
	envelope_free(&b);
	ASSERT_EQ(c.nrcpts, 3);
	ASSERT_STR_EQ(c.rcpts[2].addr, "c@example.org");
	ASSERT_STR_EQ(c.rcpts[2].last_reply, "");
	envelope_free(&c);
	envelope_init(&empty);
	envelope_copy(&c, &empty);
	ASSERT(c.rcpts == NULL && c.sender == NULL && c.nrcpts == 0);
	envelope_free(&c);
	buf_free(&ta);
	buf_free(&tb);
}

TEST_MAIN("envelope",
    TEST_ENTRY(roundtrip_full),
    TEST_ENTRY(roundtrip_minimal),
    TEST_ENTRY(truncated_rejected),
    TEST_ENTRY(unknown_key_rejected),
    TEST_ENTRY(version_rejected),
    TEST_ENTRY(missing_and_count),
    TEST_ENTRY(bad_values_rejected),
    TEST_ENTRY(xtext),
    TEST_ENTRY(odd_bytes_in_reply),
    TEST_ENTRY(copy_deep))
