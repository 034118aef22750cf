/*
 * NAME
 *	verdict.c - classify replies and I/O events of the delivery client
 * SUMMARY
 *	verdict_classify(), verdict_classify_rules(), verdict_hint_seconds(),
 *	verdict_init(), verdict_action_name(), verdict_class_name(),
 *	dlv_phase_name()
 * DESCRIPTION
 *	Every reply or I/O event gets an action (what this transaction does)
 *	and a class (what the event means for the destination site).
 *
 *	The action depends on code and phase only (RFC 5321 4.2.1, 4.5.4;
 *	Postfix smtp_trouble.c):
 *	 - No connection, a failure before MAIL, or a 4xx/5xx greeting or EHLO
 *	   is the host's trouble: try the next MX (a 5xx greeting means "this
 *	   host does not want to talk", not "this message is bad").
 *	 - 421 at any point means the server is closing the channel.
 *	 - At RCPT, 4xx/5xx concern that recipient only.
 *	 - At MAIL, DATA and after the body they concern the whole transaction.
 *	 - I/O failure inside a transaction: retry the transaction later; the
 *	   message may have been delivered if the failure came after the final
 *	   dot (RFC 1047) - at-least-once, the accepted cost.
 *
 *	The class is decided by the first rule that matches, in this order:
 *	the operator's reply_rules (config, file order), then the built-in
 *	verdict_defaults[] below, then verdict_fallback(). A rule matches on
 *	phase, code pattern ("421", "45x", "4xx"), enhanced status (exact, or
 *	a prefix ending in '.') and a PCRE2 regex searched caselessly in the
 *	text; every matcher a rule gives must match. A 2xx/3xx reply is class
 *	OK without looking at rules. An I/O event has no code or enhanced
 *	status, so only rules with neither can match it, on the text the
 *	session wrote ("timeout while rcpt", "TLS: ...").
 *
 *	The fallback keeps the class in line with the action: 4xx at RCPT is
 *	RCPT_TEMP, 4xx at MAIL/DATA/dot is MSG_TEMP, 5xx in a transaction is
 *	PERMANENT, any other failure before MAIL (and any I/O failure before
 *	RSET) is CONN_FAIL, and whatever happens at RSET/QUIT is OK (the
 *	transaction is over; Postfix ignores QUIT trouble too). The exception
 *	is a bare 421 (no rule recognised the text): it is THROTTLE in every
 *	phase but QUIT, the greeting included. RECEIVERS.md's synthesis puts
 *	"421 at greeting or after MAIL" under throttle: a host that answers
 *	421 is up and saying "not now, too much", which is a load signal for
 *	the site, whereas CONN_FAIL is kept for hosts that give no usable
 *	session (refused, timed out, TLS failed, 4xx/5xx greeting other than
 *	421) and feed dead-destination detection. The action is unchanged:
 *	at the greeting the session still tries the next MX.
 *
 *	Rules change the action in one way only: an operator rule that puts
 *	a 5xx reply in a temporary class retries instead of bouncing (some
 *	receivers send 5xx for rate limits), and one that calls a 4xx reply
 *	permanent bounces instead of retrying. Built-in rules only match 4xx
 *	replies and only name temporary classes, so they never do.
 *
 *	Receiver hints ("come back in 300 seconds") are parsed from the text
 *	of every failure reply into hint_s, whatever the class.
 *
 *	The built-in patterns, the hint pattern and the PCRE2 match context
 *	are compiled once (verdict_init, or the first classification) and
 *	then only read: the one-time library setup STYLE.md 8 allows as file
 *	scope state. Match data is per call. The match context bounds every
 *	match (VERDICT_MATCH_LIMIT), so an operator's pathological regex on a
 *	1 KiB reply fails as "no match" with a warning instead of spinning.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "config/config.h"
#include "config/log.h"
#include "config/util.h"
#include "relay/verdict.h"

#define VERDICT_MATCH_LIMIT	100000	/* pcre2 backtracking steps */
#define VERDICT_HEAP_LIMIT	1024	/* KiB for the interpreter's frames */
#define VERDICT_OVEC		8	/* capture pairs: the hint pattern's 6 */
#define VERDICT_HINT_MAX	86400	/* hints above a day are capped */

/* enum cfg_class and enum cfg_phase mirror ours; they must stay equal. */
_Static_assert((int)VERDICT_CLASS_OK == CFG_CLASS_OK &&
    (int)VERDICT_CLASS_THROTTLE == CFG_CLASS_THROTTLE &&
    (int)VERDICT_CLASS_SUSPEND == CFG_CLASS_SUSPEND &&
    (int)VERDICT_CLASS_GREYLIST == CFG_CLASS_GREYLIST &&
    (int)VERDICT_CLASS_RCPT_TEMP == CFG_CLASS_RCPT_TEMP &&
    (int)VERDICT_CLASS_MSG_TEMP == CFG_CLASS_MSG_TEMP &&
    (int)VERDICT_CLASS_PERMANENT == CFG_CLASS_PERMANENT &&
    (int)VERDICT_CLASS_CONN_FAIL == CFG_CLASS_CONN_FAIL &&
    (int)VERDICT_CLASS_MSGS_PER_CONN == CFG_CLASS_MSGS_PER_CONN &&
    (int)VERDICT_CLASS_LAST == CFG_CLASS_LAST, "cfg_class mirror");
_Static_assert((int)DLV_PHASE_CONNECT == CFG_PHASE_CONNECT &&
    (int)DLV_PHASE_BANNER == CFG_PHASE_BANNER &&
    (int)DLV_PHASE_EHLO == CFG_PHASE_EHLO &&
    (int)DLV_PHASE_STARTTLS == CFG_PHASE_STARTTLS &&
    (int)DLV_PHASE_MAIL == CFG_PHASE_MAIL &&
    (int)DLV_PHASE_RCPT == CFG_PHASE_RCPT &&
    (int)DLV_PHASE_DATA == CFG_PHASE_DATA &&
    (int)DLV_PHASE_DOT == CFG_PHASE_DOT &&
    (int)DLV_PHASE_RSET == CFG_PHASE_RSET &&
    (int)DLV_PHASE_QUIT == CFG_PHASE_QUIT &&
    (int)DLV_PHASE_LAST == CFG_PHASE_LAST, "cfg_phase mirror");

/* Phase masks for the table. */
#define PH(p)	(1u << DLV_PHASE_##p)
#define PH_ANY	CFG_PHASE_ANY
#define PH_TXN	(PH(MAIL) | PH(RCPT) | PH(DATA) | PH(DOT))

#define MIN	60
#define HOUR	3600

/* One built-in rule; the fields mean what reply_rules' keys mean. */
struct verdict_default {
	const char *name;	/* rule name in logs */
	const char *code;	/* "421", "45x", "4xx"; NULL = any */
	const char *enh;	/* "4.7.28", or prefix "4.7."; NULL = any */
	unsigned int phases;	/* mask of PH() */
	const char *text;	/* PCRE2, caseless; NULL = any */
	enum verdict_class cls;	/* the class it gives */
	int suspend_s;		/* class SUSPEND: seconds */
};

/*
 * The built-in rules, tried in order: specific before general (Yahoo's
 * TSS04 text also says "temporarily deferred"; Gmail's 4.7.28 text also
 * says "rate limited"). Every one needs a 4xx code. Sources in brackets
 * are RECEIVERS.md's (4.2, 4.5 and the Momentum rule examples).
 */
static const struct verdict_default verdict_defaults[] = {
	/*
	 * Gmail [G-4728][G-err][bento-gmail]. 4.7.28 is a reputation rate
	 * limit of our IP: slow down (the scheduler decreases, and escalates
	 * to a suspension if it persists); an operator who wants to stop
	 * at once maps it to suspend in reply_rules.
	 */
	{ "gmail-unusual-rate", "4xx", "4.7.28", PH_ANY, NULL,
	    VERDICT_CLASS_THROTTLE, 0 },
	/* One mailbox receives too fast: that recipient, not the site. */
	{ "gmail-rcpt-rate", "45x", NULL, PH_ANY,
	    "receiving mail (?:at a rate|too quickly)",
	    VERDICT_CLASS_RCPT_TEMP, 0 },
	/* This message's content: retrying it is the whole remedy. */
	{ "gmail-suspicious-content", "4xx", NULL, PH_ANY,
	    "suspicious due to the nature of the content",
	    VERDICT_CLASS_MSG_TEMP, 0 },
	/* A policy (use STARTTLS for this domain), not a rate signal. */
	{ "gmail-tls-required", "4xx", "4.7.0", PH_ANY, "TLS required",
	    VERDICT_CLASS_MSG_TEMP, 0 },
	{ "gmail-system-problem", "4xx", "4.3.0", PH_ANY,
	    "temporary system problem", VERDICT_CLASS_MSG_TEMP, 0 },
	/* DoS protection at HELO and elsewhere. */
	{ "gmail-try-again-later", "421", "4.7.0", PH_ANY, "try again later",
	    VERDICT_CLASS_THROTTLE, 0 },

	/* Over quota (RFC 3463 X.2.2) [G-err]: the recipient, later. */
	{ "over-quota", "45x", "4.2.2", PH_ANY, NULL,
	    VERDICT_CLASS_RCPT_TEMP, 0 },
	{ "mailbox-full", "45x", NULL, PH_ANY,
	    "over quota|quota exceeded|mailbox (?:is )?full",
	    VERDICT_CLASS_RCPT_TEMP, 0 },

	/*
	 * Yahoo / AOL [Y-ts03][Y-tss04][Y-tss05][K-shp][M-rules]. TS03 is a
	 * block: Momentum suspends 4 h. TSS04/IPTS04: KumoMTA suspends 2 h;
	 * the 05 variants are "the same, longer". TS01/TS02 on one hit are
	 * throttles (Momentum suspends TS02 only at 5/s).
	 */
	{ "yahoo-ts03", "4xx", NULL, PH_ANY,
	    "\\[TS03\\]|permanently deferred", VERDICT_CLASS_SUSPEND,
	    4 * HOUR },
	{ "yahoo-tss05", "4xx", NULL, PH_ANY, "\\[(?:TSS|IPTS)05\\]",
	    VERDICT_CLASS_SUSPEND, 4 * HOUR },
	{ "yahoo-tss04", "4xx", NULL, PH_ANY, "\\[(?:TSS|IPTS)04\\]",
	    VERDICT_CLASS_SUSPEND, 2 * HOUR },
	{ "yahoo-ts01-02", "4xx", NULL, PH_ANY, "\\[TS0[12]\\]",
	    VERDICT_CLASS_THROTTLE, 0 },
	/* "421 Message temporarily deferred - 4.16.50" [Y-legacy]. */
	{ "yahoo-deferred", "4xx", NULL, PH_ANY, "temporarily deferred",
	    VERDICT_CLASS_THROTTLE, 0 },
	{ "yahoo-resources", "4xx", NULL, PH_ANY,
	    "resources temporarily unavailable", VERDICT_CLASS_THROTTLE, 0 },
	/* AOL legacy [M-rules][P-cn]: DYN:T1 rate; RLY:B1, HVU:B1 blocks. */
	{ "aol-dyn-t1", "4xx", NULL, PH_ANY, "\\bDYN:T1\\b",
	    VERDICT_CLASS_THROTTLE, 0 },
	{ "aol-block", "4xx", NULL, PH_ANY, "\\b(?:RLY|HVU):B1\\b",
	    VERDICT_CLASS_SUSPEND, 2 * HOUR },
	/*
	 * Yahoo "421 Max message per connection reached" and Microsoft's
	 * "exceeded maximum number of messages per connection" [K-comm]:
	 * not a rate; the site learns to send fewer per connection.
	 */
	{ "max-messages-per-connection", "4xx", NULL, PH_ANY,
	    "max(?:imum)? (?:number of )?messages? per connection",
	    VERDICT_CLASS_MSGS_PER_CONN, 0 },

	/* Microsoft [MS-da][MS-suped651][MS-500][MS-suped][K-comm]. */
	{ "microsoft-ip-reputation", "4xx", NULL, PH_ANY,
	    "rate limited due to IP reputation", VERDICT_CLASS_THROTTLE, 0 },
	{ "microsoft-rp", "421", NULL, PH_ANY, "\\bRP-00[123]\\b",
	    VERDICT_CLASS_THROTTLE, 0 },
	/* EOP's 4.7.500 (S77714), also Gmail's "421 4.4.5 Server busy". */
	{ "server-busy", "4xx", NULL, PH_ANY, "\\bserver busy\\b",
	    VERDICT_CLASS_THROTTLE, 0 },

	/* Comcast [C-pm][C-suped][K-shp]: 25 sessions per IP; RL0000xx. */
	{ "comcast-sessions", "4xx", NULL, PH_ANY, "too many sessions opened",
	    VERDICT_CLASS_THROTTLE, 0 },
	{ "comcast-rl", "4xx", NULL, PH_ANY, "\\bRL0000\\d\\d\\b",
	    VERDICT_CLASS_THROTTLE, 0 },

	/*
	 * Orange [M-rules][K-comm]: "Trop de connexions" = fewer
	 * connections; "Veuillez essayer plus tard" = Momentum suspends 30 min.
	 */
	{ "orange-connections", "4xx", NULL, PH_ANY, "trop de connexions",
	    VERDICT_CLASS_THROTTLE, 0 },
	{ "orange-later", "4xx", NULL, PH_ANY, "veuillez essayer plus tard",
	    VERDICT_CLASS_SUSPEND, 30 * MIN },

	/* Apple iCloud "421 [HCM1] Your mail ... was deferred" [K-comm]. */
	{ "icloud-hcm", "4xx", NULL, PH_ANY, "\\[HCM\\d+\\]",
	    VERDICT_CLASS_SUSPEND, 15 * MIN },

	/*
	 * Connection limits, any receiver: Microsoft "exceeded the maximum
	 * number of connections" / "exceed max concurrent connections"
	 * [K-comm], Exchange "The maximum number of concurrent server
	 * connections has exceeded a limit", Postfix anvil "421 4.7.0
	 * <host> Error: too many connections from <ip>", sendmail "Too
	 * many open connections", "Connection rate limit exceeded", Exim
	 * "Too many concurrent SMTP connections".
	 */
	{ "too-many-connections", "4xx", NULL, PH_ANY,
	    "too many (?:(?:concurrent|simultaneous|open|smtp) )*"
	    "(?:connections|sessions)"
	    "|max(?:imum)? (?:number of )?"
	    "(?:(?:concurrent|simultaneous|server) )*connections"
	    "|connection (?:rate )?limit",
	    VERDICT_CLASS_THROTTLE, 0 },
	/*
	 * Postfix anvil rate limits: "450 4.7.1 <rcpt>: Error: too much mail
	 * from <ip>", "too many recipients from", "too many messages from".
	 * A 450 4.7.1 at RCPT like a greylister's, but a rate signal:
	 * classified by the text.
	 */
	{ "rate-from-ip", "4xx", NULL, PH_ANY,
	    "too much mail from|too many (?:recipients|messages|new TLS "
	    "sessions) from", VERDICT_CLASS_THROTTLE, 0 },
	/* Generic rate wording: Comcast "Throttled - try again later". */
	{ "throttled", "4xx", NULL, PH_ANY, "\\bthrottl(?:ed|ing)\\b",
	    VERDICT_CLASS_THROTTLE, 0 },
	{ "rate-limit", "4xx", NULL, PH_ANY,
	    "\\brate[- ]?limit|\\bsending rate\\b", VERDICT_CLASS_THROTTLE, 0 },

	/*
	 * Greylisters [emailjs#202][O#601][mailcow#4443]: postgrey "450
	 * 4.2.0 <rcpt>: Recipient address rejected: Greylisted, see
	 * http://postgrey...", milter-greylist "451 4.7.1 Greylisting in
	 * action, please come back in 00:04:59", "please come back in N
	 * seconds". Inside a transaction only; the hint comes from the text.
	 */
	{ "greylist", "4xx", NULL, PH_TXN, "gr[ae]y[- ]?list",
	    VERDICT_CLASS_GREYLIST, 0 },
	{ "come-back-later", "4xx", NULL, PH_TXN,
	    "please come back (?:later|in\\b)", VERDICT_CLASS_GREYLIST, 0 },
};

/*
 * Receiver hints. A trigger phrase, an optional preposition and filler,
 * then "N unit" or "HH:MM:SS" (milter-greylist's %R). Groups: 1-3 the
 * clock, 4 the number, 5 the unit.
 */
static const char verdict_hint_pattern[] =
	"\\b(?:come\\s+back|try(?:\\s+it)?\\s+again|retry|resend|wait"
	"|gr[ae]ylist(?:ed|ing)\\s+for|delayed\\s+for)"
	"(?:\\s+(?:in|after|for))?"
	"(?:\\s+(?:about|approximately|at\\s+least|another))?"
	"\\s+(?:(\\d{1,2}):([0-5]\\d):([0-5]\\d)"
	"|(\\d{1,9})\\s*(sec(?:ond)?s?|s|min(?:ute)?s?|m|h(?:ou)?rs?|h)\\b)";

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

/* One-time setup (see DESCRIPTION): written by verdict_init only. */
static pcre2_code *verdict_default_re[ARRAY_SIZE(verdict_defaults)];
static pcre2_code *verdict_hint_re;	/* verdict_hint_pattern */
static pcre2_match_context *verdict_mctx; /* the match limits */
static bool verdict_ready;		/* the three above are set */

/* The event being classified, as the matchers see it. */
struct verdict_event {
	enum dlv_phase phase;		/* where it happened */
	int code;			/* 400..599, or 0: I/O or malformed */
	const char *enh;		/* enhanced status or "" */
	const char *text;		/* reply or event text, or "" */
	size_t len;			/* strlen(text) */
	pcre2_match_data *md;		/* this call's match data */
};

static void verdict_act(enum dlv_phase, int, bool, struct verdict *);
static enum verdict_class verdict_fallback(enum dlv_phase, int, bool);
static bool verdict_match(const struct verdict_event *, const char *,
    const char *, const char *, unsigned int, const pcre2_code *);
static bool verdict_code_match(const char *, int);
static bool verdict_enh_match(const char *, const char *);
static int verdict_hint(const char *, size_t, pcre2_match_data *);
static long long verdict_group(const char *, const PCRE2_SIZE *, int);
static void verdict_adjust(struct verdict *);

const char *
verdict_action_name(enum verdict_action a)
{
	return a < VERDICT_LAST ? verdict_names[a] : "?";
}

/* verdict_class_name - the reply_rules class name ("throttle", ...) */
const char *
verdict_class_name(enum verdict_class c)
{
	return config_class_name((int)c);
}

const char *
dlv_phase_name(enum dlv_phase p)
{
	return p < DLV_PHASE_LAST ? phase_names[p] : "?";
}

/* verdict_init - compile the built-in patterns and the match context */
void
verdict_init(void)
{
	char err[256];
	size_t i;

	if (verdict_ready)
		return;
	for (i = 0; i < ARRAY_SIZE(verdict_defaults); i++)
		if (verdict_defaults[i].text != NULL &&
		    config_regex_compile(verdict_defaults[i].text,
		    &verdict_default_re[i], err, sizeof err) < 0)
			relay_panic("verdict: built-in rule %s: %s",
			    verdict_defaults[i].name, err);
	if (config_regex_compile(verdict_hint_pattern, &verdict_hint_re, err,
	    sizeof err) < 0)
		relay_panic("verdict: hint pattern: %s", err);
	if ((verdict_mctx = pcre2_match_context_create(NULL)) == NULL)
		relay_panic("verdict: out of memory");
	/* Ample for 1 KiB of reply text; bounds a pathological pattern. */
	pcre2_set_match_limit(verdict_mctx, VERDICT_MATCH_LIMIT);
	pcre2_set_heap_limit(verdict_mctx, VERDICT_HEAP_LIMIT);
	verdict_ready = true;
}

/* verdict_classify - the classifier without operator rules */
void
verdict_classify(enum dlv_phase phase, const struct smtp_reply *reply,
    int io_err, struct verdict *out)
{
	verdict_classify_rules(NULL, phase, reply, io_err, out);
}

/* verdict_classify_rules - action by code/phase, class by the first rule */
void
verdict_classify_rules(const struct cfg_reply_rules *rules,
    enum dlv_phase phase, const struct smtp_reply *reply, int io_err,
    struct verdict *out)
{
	bool io = io_err < 0, matched = false;
	int code = io ? 0 : reply->code;
	struct verdict_event ev;
	size_t i;

	verdict_act(phase, code, io, out);
	out->cls = verdict_fallback(phase, code, io);
	out->hint_s = 0;
	out->suspend_s = 0;
	out->rule = "fallback";
	if (!io && code >= 200 && code <= 399)
		return;

	if (!verdict_ready)
		verdict_init();
	ev.phase = phase;
	/* Out of range is malformed: there is no code to match. */
	ev.code = code >= 400 && code <= 599 ? code : 0;
	ev.enh = io || reply == NULL ? "" : reply->enh;
	ev.text = reply == NULL ? "" : reply->text;
	ev.len = reply == NULL ? 0 : strnlen(reply->text, sizeof reply->text);
	if ((ev.md = pcre2_match_data_create(VERDICT_OVEC, NULL)) == NULL)
		relay_panic("verdict: out of memory");
	/* Our own I/O texts carry no hints. */
	if (!io)
		out->hint_s = verdict_hint(ev.text, ev.len, ev.md);

	for (i = 0; !matched && rules != NULL && i < rules->n; i++) {
		const struct cfg_reply_rule *r = &rules->v[i];

		if ((matched = verdict_match(&ev, r->name, r->code, r->enh,
		    r->phases, r->re))) {
			out->cls = (enum verdict_class)r->cls;
			out->suspend_s = r->suspend_s;
			out->rule = r->name;
		}
	}
	for (i = 0; !matched && i < ARRAY_SIZE(verdict_defaults); i++) {
		const struct verdict_default *d = &verdict_defaults[i];

		if ((matched = verdict_match(&ev, d->name, d->code, d->enh,
		    d->phases, verdict_default_re[i]))) {
			out->cls = d->cls;
			out->suspend_s = d->suspend_s;
			out->rule = d->name;
		}
	}
	pcre2_match_data_free(ev.md);
	if (matched && ev.code != 0)
		verdict_adjust(out);
}

/*
 * verdict_act - the transaction's action from code and phase alone (the
 * rules in the DESCRIPTION); io says the event is an I/O failure
 */
static void
verdict_act(enum dlv_phase phase, int code, bool io, struct verdict *out)
{
	bool before_mail = phase <= DLV_PHASE_STARTTLS;
	int cls = code / 100;

	out->conn_dead = true;
	if (io || code < 200 || code > 599) {
		if (before_mail) {
			out->action = VERDICT_NEXT_MX;
			out->why = io ? "connection failure" : "malformed reply";
		} else if (phase == DLV_PHASE_RSET || phase == DLV_PHASE_QUIT) {
			out->action = VERDICT_OK;
			out->why = "lost after txn";
		} else {
			out->action = VERDICT_MSG_RETRY;
			out->why = io ? "connection lost in transaction" :
			    "malformed reply";
		}
		return;
	}
	if (cls == 2 || cls == 3) {
		out->action = VERDICT_OK;
		out->conn_dead = false;
		out->why = "ok";
		return;
	}
	if (before_mail) {
		out->action = VERDICT_NEXT_MX;
		out->why = cls == 4 ? "host deferred the session" :
		    "host refused the session";
		return;
	}
	if (code == 421) {
		out->action = phase == DLV_PHASE_RSET ||
		    phase == DLV_PHASE_QUIT ? VERDICT_OK : VERDICT_MSG_RETRY;
		out->why = "server closing channel";
		return;
	}
	out->conn_dead = false;
	switch (phase) {
	case DLV_PHASE_RCPT:
		out->action = cls == 4 ? VERDICT_RCPT_RETRY :
		    VERDICT_RCPT_BOUNCE;
		out->why = "recipient refused";
		return;
	case DLV_PHASE_MAIL:
	case DLV_PHASE_DATA:
	case DLV_PHASE_DOT:
		out->action = cls == 4 ? VERDICT_MSG_RETRY :
		    VERDICT_MSG_BOUNCE;
		out->why = "transaction refused";
		return;
	default:
		/* RSET or QUIT refused: the transaction is over anyway. */
		out->action = VERDICT_OK;
		out->conn_dead = true;
		out->why = "rset/quit refused";
		return;
	}
}

/* verdict_fallback - the class when no rule matched (see DESCRIPTION) */
static enum verdict_class
verdict_fallback(enum dlv_phase phase, int code, bool io)
{
	bool after_txn = phase == DLV_PHASE_RSET || phase == DLV_PHASE_QUIT;

	if (io || code < 200 || code > 599)
		return after_txn ? VERDICT_CLASS_OK : VERDICT_CLASS_CONN_FAIL;
	if (code < 400)
		return VERDICT_CLASS_OK;
	if (code == 421)
		return phase == DLV_PHASE_QUIT ? VERDICT_CLASS_OK :
		    VERDICT_CLASS_THROTTLE;
	if (phase <= DLV_PHASE_STARTTLS)
		return VERDICT_CLASS_CONN_FAIL;
	if (after_txn)
		return VERDICT_CLASS_OK;
	if (code >= 500)
		return VERDICT_CLASS_PERMANENT;
	return phase == DLV_PHASE_RCPT ? VERDICT_CLASS_RCPT_TEMP :
	    VERDICT_CLASS_MSG_TEMP;
}

/* verdict_match - every matcher given (non-NULL) matches the event */
static bool
verdict_match(const struct verdict_event *ev, const char *name,
    const char *code, const char *enh, unsigned int phases,
    const pcre2_code *re)
{
	PCRE2_UCHAR msg[128];
	int rc;

	if (!(phases & (1u << ev->phase)) || !verdict_code_match(code,
	    ev->code) || !verdict_enh_match(enh, ev->enh))
		return false;
	if (re == NULL)
		return true;
	/* 0 means "matched, ovector too small": still a match. */
	rc = pcre2_match(re, (PCRE2_SPTR)ev->text, ev->len, 0, 0, ev->md,
	    verdict_mctx);
	if (rc >= 0)
		return true;
	if (rc != PCRE2_ERROR_NOMATCH) {
		if (pcre2_get_error_message(rc, msg, sizeof msg) < 0)
			str_copy((char *)msg, "?", sizeof msg);
		log_warnx("verdict rule=%s text match failed (%s); taken as "
		    "no match", name, (char *)msg);
	}
	return false;
}

/* verdict_code_match - "421", "45x", "4xx" against a code; NULL is any */
static bool
verdict_code_match(const char *pat, int code)
{
	char c[4];
	int i;

	if (pat == NULL)
		return true;
	if (code < 100 || code > 999)
		return false;
	snprintf(c, sizeof c, "%d", code);
	for (i = 0; i < 3; i++)
		if (pat[i] != 'x' && pat[i] != c[i])
			return false;
	return true;
}

/* verdict_enh_match - exact, or a prefix when pat ends in '.'; NULL is any */
static bool
verdict_enh_match(const char *pat, const char *enh)
{
	size_t n;

	if (pat == NULL)
		return true;
	n = strlen(pat);
	if (n > 0 && pat[n - 1] == '.')
		return strncmp(enh, pat, n) == 0;
	return strcmp(enh, pat) == 0;
}

/* verdict_hint_seconds - the hint in text, 0 if none (see verdict.h) */
int
verdict_hint_seconds(const char *text)
{
	pcre2_match_data *md;
	int s;

	if (text == NULL)
		return 0;
	if (!verdict_ready)
		verdict_init();
	if ((md = pcre2_match_data_create(VERDICT_OVEC, NULL)) == NULL)
		relay_panic("verdict: out of memory");
	s = verdict_hint(text, strlen(text), md);
	pcre2_match_data_free(md);
	return s;
}

/* verdict_hint - the first hint in text, in seconds, capped; 0 if none */
static int
verdict_hint(const char *text, size_t len, pcre2_match_data *md)
{
	const PCRE2_SIZE *ov;
	long long n, s;

	if (pcre2_match(verdict_hint_re, (PCRE2_SPTR)text, len, 0, 0, md,
	    verdict_mctx) < 0)
		return 0;
	ov = pcre2_get_ovector_pointer(md);
	if (ov[2] != PCRE2_UNSET) {
		s = verdict_group(text, ov, 1) * 3600 +
		    verdict_group(text, ov, 2) * 60 + verdict_group(text, ov, 3);
	} else {
		/* At most 9 digits: no overflow, even in hours. */
		n = verdict_group(text, ov, 4);
		switch (text[ov[10]] | 0x20) {
		case 'h':
			s = n * 3600;
			break;
		case 'm':
			s = n * 60;
			break;
		default:
			s = n;
			break;
		}
	}
	return (int)(s > VERDICT_HINT_MAX ? VERDICT_HINT_MAX : s);
}

/* verdict_group - capture group g, all digits, as a number (0 if unset) */
static long long
verdict_group(const char *text, const PCRE2_SIZE *ov, int g)
{
	long long n = 0;
	PCRE2_SIZE i;

	if (ov[2 * g] == PCRE2_UNSET)
		return 0;
	for (i = ov[2 * g]; i < ov[2 * g + 1]; i++)
		n = n * 10 + (text[i] - '0');
	return n;
}

/*
 * verdict_adjust - a rule's class settles retry versus bounce for a reply
 * whose code said otherwise (see DESCRIPTION)
 */
static void
verdict_adjust(struct verdict *out)
{
	bool temp = out->cls != VERDICT_CLASS_OK &&
	    out->cls != VERDICT_CLASS_PERMANENT;

	if (temp && out->action == VERDICT_RCPT_BOUNCE)
		out->action = VERDICT_RCPT_RETRY;
	else if (temp && out->action == VERDICT_MSG_BOUNCE)
		out->action = VERDICT_MSG_RETRY;
	else if (out->cls == VERDICT_CLASS_PERMANENT &&
	    out->action == VERDICT_RCPT_RETRY)
		out->action = VERDICT_RCPT_BOUNCE;
	else if (out->cls == VERDICT_CLASS_PERMANENT &&
	    out->action == VERDICT_MSG_RETRY)
		out->action = VERDICT_MSG_BOUNCE;
	else
		return;
	out->why = temp ? "reply rule: temporary" : "reply rule: permanent";
}
