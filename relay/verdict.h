/*
 * verdict.h - what a receiver's reply (or an I/O failure) means for the
 * delivery. One module decides (STYLE.md 11, Postfix smtp_trouble.c): the
 * delivery session reports what happened and never picks retry policy.
 */
#ifndef RELAY_VERDICT_H
#define RELAY_VERDICT_H

#include <stdbool.h>

enum dlv_phase {
	DLV_PHASE_CONNECT,	/* TCP connect */
	DLV_PHASE_BANNER,	/* 220 greeting */
	DLV_PHASE_EHLO,		/* EHLO or HELO */
	DLV_PHASE_STARTTLS,	/* STARTTLS and the handshake */
	DLV_PHASE_MAIL,		/* MAIL FROM */
	DLV_PHASE_RCPT,		/* RCPT TO */
	DLV_PHASE_DATA,		/* DATA (the 354) */
	DLV_PHASE_DOT,		/* the reply after the body */
	DLV_PHASE_RSET,		/* RSET between messages */
	DLV_PHASE_QUIT,		/* QUIT */
	DLV_PHASE_LAST
};

/* One complete SMTP reply, multi-line replies joined with "; ". */
struct smtp_reply {
	int code;		/* 100..599, or 0 when none (I/O error) */
	char enh[16];		/* enhanced status "4.7.0" or "" */
	char text[1024];	/* text after code and enhanced status */
};

enum verdict_action {
	VERDICT_OK,		/* go on */
	VERDICT_NEXT_MX,	/* this host failed: try the next one */
	VERDICT_RCPT_RETRY,	/* this recipient: later */
	VERDICT_MSG_RETRY,	/* every recipient in this transaction: later */
	VERDICT_RCPT_BOUNCE,	/* this recipient failed for good */
	VERDICT_MSG_BOUNCE,	/* every recipient in this transaction: bounce */
	VERDICT_LAST
};

struct verdict {
	enum verdict_action action;	/* what to do */
	bool conn_dead;			/* the connection cannot be reused */
	const char *why;		/* short static reason for logs */
};

/*
 * verdict_classify - map a reply (io_err == 0) or an I/O failure (io_err
 * < 0, reply ignored) in a phase to an action.
 */
void verdict_classify(enum dlv_phase phase, const struct smtp_reply *reply,
    int io_err, struct verdict *out);

const char *verdict_action_name(enum verdict_action a);
const char *dlv_phase_name(enum dlv_phase p);

#endif
