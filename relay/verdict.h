/*
 * verdict.h - what a receiver's reply (or an I/O failure) means for the
 * delivery. One module decides (STYLE.md 11, Postfix smtp_trouble.c): the
 * delivery session reports what happened and never picks retry policy.
 *
 * A verdict has two halves. The action says what happens to this
 * transaction (retry, bounce, next MX) and depends on the code and phase
 * alone. The class says what the event means for the destination site
 * (slow down, stop for a while, greylisted, ...); it comes from the
 * operator's reply_rules, then the built-in rules for known receivers,
 * then a fallback by code and phase. See verdict.c for the table.
 */
#ifndef RELAY_VERDICT_H
#define RELAY_VERDICT_H

#include <stdbool.h>

struct cfg_reply_rules;		/* config/config.h */

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

/*
 * What the event means for the destination. Mirrors enum cfg_class of
 * config/config.h (reply_rules class names), checked in verdict.c.
 */
enum verdict_class {
	VERDICT_CLASS_OK,	/* success, or nothing to act on (RSET/QUIT) */
	VERDICT_CLASS_THROTTLE,	/* the site says "slower": fewer connections,
				   lower rate */
	VERDICT_CLASS_SUSPEND,	/* the site blocks us: stop for suspend_s */
	VERDICT_CLASS_GREYLIST,	/* retry this recipient after max(hint, a
				   few minutes), same source; no site penalty */
	VERDICT_CLASS_RCPT_TEMP, /* this recipient, later (over quota, rate
				   of one mailbox) */
	VERDICT_CLASS_MSG_TEMP,	/* this message, later; not the site's rate */
	VERDICT_CLASS_PERMANENT, /* bounce */
	VERDICT_CLASS_CONN_FAIL, /* no usable session with this host
				   (connect, greeting, TLS, I/O) */
	VERDICT_CLASS_MSGS_PER_CONN, /* the connection carried as many
				   messages as the receiver takes on one: go
				   on on a new one, and send fewer per
				   connection; no attempt, no site penalty */
	VERDICT_CLASS_LAST
};

/*
 * XXX Members after why may be left out of a positional initializer
 * ({ action, dead, why }), which leaves cls OK, hint_s and suspend_s 0
 * and rule NULL: set them when the verdict is not from the classifier.
 */
struct verdict {
	enum verdict_action action;	/* what to do */
	bool conn_dead;			/* the connection cannot be reused */
	const char *why;		/* short static reason for logs */
	enum verdict_class cls;		/* what it means for the site */
	int hint_s;			/* receiver's "come back in N s" hint,
					   0..86400; 0 = none */
	int suspend_s;			/* class SUSPEND: how long, from the
					   rule; 0 = the scheduler's default */
	const char *rule;		/* the rule that chose cls, for logs:
					   a reply_rules or built-in name, or
					   "fallback"; valid as long as the
					   rules passed in are (the config
					   snapshot) */
};

/*
 * verdict_classify_rules - map a reply (io_err == 0) or an I/O failure
 * (io_err < 0; reply may then be NULL, or carry a descriptive text that
 * rules without a code can match) in a phase to an action and a class.
 * rules (cfg->reply_rules) are tried first, in order, and may be NULL;
 * then the built-in rules; then the fallback by code and phase. A 2xx or
 * 3xx reply is class OK without looking at any rule. Never fails; the
 * built-in patterns are compiled on first use (verdict_init).
 *
 * The action is the code/phase one, with one exception: a rule that puts
 * a 5xx reply in a temporary class turns a bounce into a retry, and a rule
 * that calls a 4xx reply permanent turns a retry into a bounce. No
 * built-in rule does either; only the operator's rules can.
 */
void verdict_classify_rules(const struct cfg_reply_rules *rules,
    enum dlv_phase phase, const struct smtp_reply *reply, int io_err,
    struct verdict *out);

/* verdict_classify - verdict_classify_rules() without reply_rules */
void verdict_classify(enum dlv_phase phase, const struct smtp_reply *reply,
    int io_err, struct verdict *out);

/*
 * verdict_hint_seconds - the delay a reply text asks for ("come back in
 * 300 seconds", "try again in 10 min", "retry after 60s", "wait 2 hours",
 * "come back in 00:04:59"), capped at 86400; 0 when there is none.
 */
int verdict_hint_seconds(const char *text);

/*
 * verdict_init - compile the built-in patterns now rather than on the
 * first classification. Idempotent; a built-in pattern that does not
 * compile is a bug (relay_panic).
 */
void verdict_init(void);

const char *verdict_action_name(enum verdict_action a);
const char *verdict_class_name(enum verdict_class c);
const char *dlv_phase_name(enum dlv_phase p);

#endif
