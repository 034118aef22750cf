/*
 * test_verdict.c - the reply classifier on a table of real replies.
 */
#include <string.h>

#include "relay/verdict.h"
#include "tests/unit/test.h"

struct vcase {
	enum dlv_phase phase;
	int code;
	int io_err;
	enum verdict_action want;
	bool dead;
};

static void
check(const struct vcase *c, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		struct smtp_reply r;
		struct verdict v;

		memset(&r, 0, sizeof r);
		r.code = c[i].code;
		verdict_classify(c[i].phase, &r, c[i].io_err, &v);
		if (v.action != c[i].want || v.conn_dead != c[i].dead) {
			fprintf(stderr, "case %zu: phase %s code %d -> %s dead=%d, "
			    "want %s dead=%d\n", i, dlv_phase_name(c[i].phase),
			    c[i].code, verdict_action_name(v.action), v.conn_dead,
			    verdict_action_name(c[i].want), c[i].dead);
			ASSERT(0);
		}
	}
}

TEST(session_level)
{
	static const struct vcase c[] = {
		{ DLV_PHASE_CONNECT, 0, -111, VERDICT_NEXT_MX, true },
		{ DLV_PHASE_BANNER, 220, 0, VERDICT_OK, false },
		{ DLV_PHASE_BANNER, 421, 0, VERDICT_NEXT_MX, true },
		{ DLV_PHASE_BANNER, 554, 0, VERDICT_NEXT_MX, true },
		{ DLV_PHASE_EHLO, 250, 0, VERDICT_OK, false },
		{ DLV_PHASE_STARTTLS, 0, -110, VERDICT_NEXT_MX, true },
		{ DLV_PHASE_BANNER, 0, 0, VERDICT_NEXT_MX, true },
	};
	check(c, sizeof c / sizeof c[0]);
}

TEST(transaction_level)
{
	static const struct vcase c[] = {
		{ DLV_PHASE_MAIL, 250, 0, VERDICT_OK, false },
		{ DLV_PHASE_MAIL, 451, 0, VERDICT_MSG_RETRY, false },
		{ DLV_PHASE_MAIL, 553, 0, VERDICT_MSG_BOUNCE, false },
		{ DLV_PHASE_RCPT, 250, 0, VERDICT_OK, false },
		{ DLV_PHASE_RCPT, 450, 0, VERDICT_RCPT_RETRY, false },
		{ DLV_PHASE_RCPT, 550, 0, VERDICT_RCPT_BOUNCE, false },
		{ DLV_PHASE_DATA, 354, 0, VERDICT_OK, false },
		{ DLV_PHASE_DATA, 554, 0, VERDICT_MSG_BOUNCE, false },
		{ DLV_PHASE_DOT, 250, 0, VERDICT_OK, false },
		{ DLV_PHASE_DOT, 452, 0, VERDICT_MSG_RETRY, false },
		{ DLV_PHASE_DOT, 552, 0, VERDICT_MSG_BOUNCE, false },
	};
	check(c, sizeof c / sizeof c[0]);
}

TEST(closing_and_io)
{
	static const struct vcase c[] = {
		/* 421 anywhere closes the channel; the txn is retried */
		{ DLV_PHASE_MAIL, 421, 0, VERDICT_MSG_RETRY, true },
		{ DLV_PHASE_RCPT, 421, 0, VERDICT_MSG_RETRY, true },
		{ DLV_PHASE_DOT, 421, 0, VERDICT_MSG_RETRY, true },
		/* lost after the dot: retried (at-least-once) */
		{ DLV_PHASE_DOT, 0, -104, VERDICT_MSG_RETRY, true },
		{ DLV_PHASE_RCPT, 0, -110, VERDICT_MSG_RETRY, true },
		/* nothing left to lose after the transaction */
		{ DLV_PHASE_QUIT, 0, -104, VERDICT_OK, true },
		{ DLV_PHASE_RSET, 421, 0, VERDICT_OK, true },
		/* a code out of range is malformed, not a success */
		{ DLV_PHASE_RCPT, 699, 0, VERDICT_MSG_RETRY, true },
		{ DLV_PHASE_RCPT, 199, 0, VERDICT_MSG_RETRY, true },
	};
	check(c, sizeof c / sizeof c[0]);
}

TEST_MAIN("verdict",
    TEST_ENTRY(session_level),
    TEST_ENTRY(transaction_level),
    TEST_ENTRY(closing_and_io))
