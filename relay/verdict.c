/*
 * verdict.c - classify replies and I/O events of the delivery client.
 *
 * The rules, in order (RFC 5321 4.2.1, 4.5.4; Postfix smtp_trouble.c):
 *  - No connection, a failure before MAIL, or a 4xx/5xx greeting or EHLO
 *    is the host's trouble: try the next MX (a 5xx greeting means "this
 *    host does not want to talk", not "this message is bad").
 *  - 421 at any point means the server is closing the channel.
 *  - At RCPT, 4xx/5xx concern that recipient only.
 *  - At MAIL, DATA and after the body they concern the whole transaction.
 *  - I/O failure inside a transaction: retry the transaction later; the
 *    message may have been delivered if the failure came after the final
 *    dot (RFC 1047) - at-least-once, the accepted cost.
 * Adaptive throttling and greylisting classes come with the configurable
 * rule table (issue 4); they refine these defaults, they do not replace
 * this module.
 */
#include <stddef.h>

#include "config/util.h"
#include "relay/verdict.h"

static const char *const verdict_names[] = {
	[VERDICT_OK] = "ok",
	[VERDICT_NEXT_MX] = "next-mx",
	[VERDICT_RCPT_RETRY] = "rcpt-retry",
	[VERDICT_MSG_RETRY] = "msg-retry",
	[VERDICT_RCPT_BOUNCE] = "rcpt-bounce",
	[VERDICT_MSG_BOUNCE] = "msg-bounce",
};
_Static_assert(ARRAY_SIZE(verdict_names) == VERDICT_LAST, "verdict names");

static const char *const phase_names[] = {
	[DLV_PHASE_CONNECT] = "connect",
	[DLV_PHASE_BANNER] = "banner",
	[DLV_PHASE_EHLO] = "ehlo",
	[DLV_PHASE_STARTTLS] = "starttls",
	[DLV_PHASE_MAIL] = "mail",
	[DLV_PHASE_RCPT] = "rcpt",
	[DLV_PHASE_DATA] = "data",
	[DLV_PHASE_DOT] = "dot",
	[DLV_PHASE_RSET] = "rset",
	[DLV_PHASE_QUIT] = "quit",
};
_Static_assert(ARRAY_SIZE(phase_names) == DLV_PHASE_LAST, "phase names");

const char *
verdict_action_name(enum verdict_action a)
{
	return a < VERDICT_LAST ? verdict_names[a] : "?";
}

const char *
dlv_phase_name(enum dlv_phase p)
{
	return p < DLV_PHASE_LAST ? phase_names[p] : "?";
}

/* verdict_set - fill out */
static void
verdict_set(struct verdict *out, enum verdict_action a, bool dead,
    const char *why)
{
	out->action = a;
	out->conn_dead = dead;
	out->why = why;
}

void
verdict_classify(enum dlv_phase phase, const struct smtp_reply *reply,
    int io_err, struct verdict *out)
{
	bool before_mail = phase <= DLV_PHASE_STARTTLS;
	int code = io_err < 0 ? 0 : reply->code;
	int cls = code / 100;

	if (io_err < 0 || code < 200 || code > 599) {
		if (before_mail)
			verdict_set(out, VERDICT_NEXT_MX, true, io_err < 0 ?
			    "connection failure" : "malformed reply");
		else if (phase == DLV_PHASE_RSET || phase == DLV_PHASE_QUIT)
			verdict_set(out, VERDICT_OK, true, "lost after txn");
		else
			verdict_set(out, VERDICT_MSG_RETRY, true, io_err < 0 ?
			    "connection lost in transaction" : "malformed reply");
		return;
	}
	if (cls == 2 || cls == 3) {
		verdict_set(out, VERDICT_OK, false, "ok");
		return;
	}
	if (before_mail) {
		verdict_set(out, VERDICT_NEXT_MX, true, cls == 4 ?
		    "host deferred the session" : "host refused the session");
		return;
	}
	if (code == 421) {
		verdict_set(out, phase == DLV_PHASE_RSET ||
		    phase == DLV_PHASE_QUIT ? VERDICT_OK : VERDICT_MSG_RETRY,
		    true, "server closing channel");
		return;
	}
	switch (phase) {
	case DLV_PHASE_RCPT:
		verdict_set(out, cls == 4 ? VERDICT_RCPT_RETRY :
		    VERDICT_RCPT_BOUNCE, false, "recipient refused");
		return;
	case DLV_PHASE_MAIL:
	case DLV_PHASE_DATA:
	case DLV_PHASE_DOT:
		verdict_set(out, cls == 4 ? VERDICT_MSG_RETRY :
		    VERDICT_MSG_BOUNCE, false, "transaction refused");
		return;
	default:
		/* RSET or QUIT refused: the transaction is over anyway. */
		verdict_set(out, VERDICT_OK, true, "rset/quit refused");
		return;
	}
}
