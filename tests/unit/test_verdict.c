/*
 * test_verdict.c - the reply classifier: actions by code and phase, then
 * classes on a table of real reply texts (RECEIVERS.md 4.5 and the
 * receivers' own software), receiver hints, and operator reply_rules
 * loaded through config_load_string().
 */
#include <string.h>

#include "config/config.h"
#include "config/util.h"
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

/* The class of bare replies and I/O events: the fallback, no text. */
struct ccase {
	enum dlv_phase phase;
	int code;
	int io_err;
	enum verdict_class want;
};

TEST(fallback_classes)
{
	static const struct ccase c[] = {
		{ DLV_PHASE_CONNECT, 0, -111, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_STARTTLS, 0, -110, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_BANNER, 0, 0, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_BANNER, 220, 0, VERDICT_CLASS_OK },
		/* A bare 421 is the site saying "not now": throttle. */
		{ DLV_PHASE_BANNER, 421, 0, VERDICT_CLASS_THROTTLE },
		{ DLV_PHASE_EHLO, 421, 0, VERDICT_CLASS_THROTTLE },
		{ DLV_PHASE_BANNER, 450, 0, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_BANNER, 554, 0, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_STARTTLS, 454, 0, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_MAIL, 250, 0, VERDICT_CLASS_OK },
		{ DLV_PHASE_MAIL, 451, 0, VERDICT_CLASS_MSG_TEMP },
		{ DLV_PHASE_MAIL, 553, 0, VERDICT_CLASS_PERMANENT },
		{ DLV_PHASE_MAIL, 421, 0, VERDICT_CLASS_THROTTLE },
		{ DLV_PHASE_RCPT, 450, 0, VERDICT_CLASS_RCPT_TEMP },
		{ DLV_PHASE_RCPT, 452, 0, VERDICT_CLASS_RCPT_TEMP },
		{ DLV_PHASE_RCPT, 550, 0, VERDICT_CLASS_PERMANENT },
		{ DLV_PHASE_RCPT, 421, 0, VERDICT_CLASS_THROTTLE },
		{ DLV_PHASE_DATA, 354, 0, VERDICT_CLASS_OK },
		{ DLV_PHASE_DATA, 451, 0, VERDICT_CLASS_MSG_TEMP },
		{ DLV_PHASE_DOT, 452, 0, VERDICT_CLASS_MSG_TEMP },
		{ DLV_PHASE_DOT, 554, 0, VERDICT_CLASS_PERMANENT },
		{ DLV_PHASE_DOT, 0, -104, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_RCPT, 699, 0, VERDICT_CLASS_CONN_FAIL },
		{ DLV_PHASE_RSET, 421, 0, VERDICT_CLASS_THROTTLE },
		{ DLV_PHASE_RSET, 0, -104, VERDICT_CLASS_OK },
		{ DLV_PHASE_RSET, 500, 0, VERDICT_CLASS_OK },
		{ DLV_PHASE_QUIT, 421, 0, VERDICT_CLASS_OK },
		{ DLV_PHASE_QUIT, 0, -104, VERDICT_CLASS_OK },
	};

	for (size_t i = 0; i < ARRAY_SIZE(c); i++) {
		struct smtp_reply r;
		struct verdict v;

		memset(&r, 0, sizeof r);
		r.code = c[i].code;
		verdict_classify(c[i].phase, &r, c[i].io_err, &v);
		if (v.cls != c[i].want || v.hint_s != 0 || v.suspend_s != 0 ||
		    strcmp(v.rule, "fallback") != 0) {
			fprintf(stderr, "case %zu: phase %s code %d io %d -> %s "
			    "(%s), want %s\n", i, dlv_phase_name(c[i].phase),
			    c[i].code, c[i].io_err, verdict_class_name(v.cls),
			    v.rule, verdict_class_name(c[i].want));
			ASSERT(0);
		}
	}
	/* An I/O event may come without a reply at all. */
	{
		struct verdict v;

		verdict_classify(DLV_PHASE_CONNECT, NULL, -111, &v);
		ASSERT_EQ(v.action, VERDICT_NEXT_MX);
		ASSERT_EQ(v.cls, VERDICT_CLASS_CONN_FAIL);
	}
}

/* One real reply: phase, code, enhanced status, text -> class, hint. */
struct rcase {
	enum dlv_phase phase;
	int code;
	const char *enh;
	const char *text;
	enum verdict_class want;
	int hint_s;		/* expected hint */
	int suspend_s;		/* expected suspension */
	const char *rule;	/* expected rule name */
};

/* reply - fill r from a case */
static void
reply(struct smtp_reply *r, int code, const char *enh, const char *text)
{
	memset(r, 0, sizeof *r);
	r->code = code;
	str_copy(r->enh, enh, sizeof r->enh);
	str_copy(r->text, text, sizeof r->text);
}

/* check_replies - classify each case with rules (may be NULL) */
static void
check_replies(const struct cfg_reply_rules *rules, const struct rcase *c,
    size_t n)
{
	for (size_t i = 0; i < n; i++) {
		struct smtp_reply r;
		struct verdict v, bare;

		reply(&r, c[i].code, c[i].enh, c[i].text);
		verdict_classify_rules(rules, c[i].phase, &r, 0, &v);
		if (v.cls != c[i].want || v.hint_s != c[i].hint_s ||
		    v.suspend_s != c[i].suspend_s ||
		    strcmp(v.rule, c[i].rule) != 0) {
			fprintf(stderr, "case %zu: %s %d %s %s\n  -> %s hint %d "
			    "suspend %d rule %s\n  want %s hint %d suspend %d "
			    "rule %s\n", i, dlv_phase_name(c[i].phase),
			    c[i].code, c[i].enh, c[i].text,
			    verdict_class_name(v.cls), v.hint_s, v.suspend_s,
			    v.rule, verdict_class_name(c[i].want), c[i].hint_s,
			    c[i].suspend_s, c[i].rule);
			ASSERT(0);
		}
		/* Built-in rules never change the action of the code. */
		if (rules == NULL) {
			reply(&r, c[i].code, "", "");
			verdict_classify(c[i].phase, &r, 0, &bare);
			ASSERT_EQ(v.action, bare.action);
			ASSERT_EQ(v.conn_dead, bare.conn_dead);
		}
	}
}

#define B DLV_PHASE_BANNER
#define E DLV_PHASE_EHLO
#define M DLV_PHASE_MAIL
#define R DLV_PHASE_RCPT
#define D DLV_PHASE_DOT
#define C(x) VERDICT_CLASS_##x

TEST(real_replies)
{
	static const struct rcase c[] = {
		/* Gmail */
		{ D, 421, "4.7.28", "[192.0.2.1] Our system has detected an "
		    "unusual rate of unsolicited mail originating from your IP "
		    "address. To protect our users from spam, mail sent from "
		    "your IP address has been temporarily rate limited. Please "
		    "visit https://support.google.com/mail/?p=UnsolicitedRate"
		    "LimitError to review our Bulk Email Senders Guidelines. "
		    "a1si2 - gsmtp", C(THROTTLE), 0, 0, "gmail-unusual-rate" },
		{ E, 421, "4.7.0", "Try again later, closing connection. "
		    "(EHLO) a1si2 - gsmtp", C(THROTTLE), 0, 0,
		    "gmail-try-again-later" },
		{ R, 421, "4.7.0", "TLS required for RCPT domain, closing "
		    "connection. a1si2 - gsmtp", C(MSG_TEMP), 0, 0,
		    "gmail-tls-required" },
		{ M, 421, "4.3.0", "Temporary System Problem.  Try again later "
		    "(10). a1si2 - gsmtp", C(MSG_TEMP), 0, 0,
		    "gmail-system-problem" },
		{ B, 421, "4.4.5", "Server busy, try again later.",
		    C(THROTTLE), 0, 0, "server-busy" },
		{ R, 450, "4.2.1", "The user you are trying to contact is "
		    "receiving mail at a rate that prevents additional messages "
		    "from being delivered. Please resend your message at a later "
		    "point. If the user is able to receive mail at that time, "
		    "your message will be delivered. a1si2 - gsmtp",
		    C(RCPT_TEMP), 0, 0, "gmail-rcpt-rate" },
		{ D, 451, "4.3.0", "Mail server temporarily rejected message. "
		    "a1si2 - gsmtp", C(MSG_TEMP), 0, 0, "fallback" },
		{ R, 452, "4.2.2", "The email account that you tried to reach "
		    "is over quota. Please direct the recipient to https://"
		    "support.google.com/mail/?p=OverQuotaTemp a1si2 - gsmtp",
		    C(RCPT_TEMP), 0, 0, "over-quota" },
		{ D, 421, "4.7.0", "[192.0.2.1 15] Our system has detected "
		    "that this message is suspicious due to the nature of the "
		    "content and/or the links within. a1si2 - gsmtp",
		    C(MSG_TEMP), 0, 0, "gmail-suspicious-content" },
		/* Yahoo / AOL */
		{ M, 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 "
		    "temporarily deferred due to unexpected volume or user "
		    "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/"
		    "error-codes", C(SUSPEND), 0, 7200, "yahoo-tss04" },
		{ M, 421, "4.7.0", "[TSS05] Messages from 192.0.2.1 "
		    "temporarily deferred due to user complaints - 4.16.55.1; "
		    "see https://postmaster.yahooinc.com/error-codes",
		    C(SUSPEND), 0, 14400, "yahoo-tss05" },
		{ B, 421, "", "[IPTS04] Messages from 192.0.2.1 temporarily "
		    "deferred due to unexpected volume or user complaints - "
		    "4.16.56.1", C(SUSPEND), 0, 7200, "yahoo-tss04" },
		{ B, 421, "4.7.1", "[TS03] All messages from 192.0.2.1 will be "
		    "permanently deferred; Retrying will NOT succeed. See "
		    "https://postmaster.yahooinc.com/error-codes", C(SUSPEND), 0,
		    14400, "yahoo-ts03" },
		{ D, 421, "", "Message temporarily deferred - 4.16.50",
		    C(THROTTLE), 0, 0, "yahoo-deferred" },
		{ M, 421, "4.7.0", "[TS01] Messages from 192.0.2.1 temporarily "
		    "deferred due to user complaints - 4.16.55.1",
		    C(THROTTLE), 0, 0, "yahoo-ts01-02" },
		{ D, 451, "", "Resources temporarily unavailable. Please try "
		    "again later [#4.16.1].", C(THROTTLE), 0, 0,
		    "yahoo-resources" },
		{ M, 421, "", "Max message per connection reached, closing "
		    "transmission channel", C(MSGS_PER_CONN), 0, 0,
		    "max-messages-per-connection" },
		{ B, 421, "4.7.1", ": (DYN:T1) https://postmaster.aol.com/"
		    "error-codes#421dynt1", C(THROTTLE), 0, 0, "aol-dyn-t1" },
		/* Microsoft */
		{ R, 451, "4.7.650", "The mail server [192.0.2.1] has been "
		    "temporarily rate limited due to IP reputation. For e-mail "
		    "delivery information, see https://aka.ms/postmaster (S775) "
		    "[Name=Protocol Filter Agent][AGT=PFA][MxId=11BA1B2C3D4E5F]",
		    C(THROTTLE), 0, 0, "microsoft-ip-reputation" },
		{ M, 451, "4.7.651", "The mail server [192.0.2.1] has been "
		    "temporarily rate limited due to IP reputation. For e-mail "
		    "delivery information, see https://postmaster.live.com "
		    "(S3114)", C(THROTTLE), 0, 0, "microsoft-ip-reputation" },
		{ R, 451, "4.7.500", "Server busy. Please try again later from "
		    "[192.0.2.1]. (S77714) [BN1NAM02FT003.eop-nam02.prod."
		    "protection.outlook.com]", C(THROTTLE), 0, 0, "server-busy" },
		{ B, 421, "4.7.0", "192.0.2.1 has exceeded the maximum number "
		    "of connections.", C(THROTTLE), 0, 0,
		    "too-many-connections" },
		{ B, 421, "4.3.2", "The maximum number of concurrent server "
		    "connections has exceeded a limit, closing transmission "
		    "channel", C(THROTTLE), 0, 0, "too-many-connections" },
		{ M, 421, "4.7.0", "exceed max concurrent connections. IB007",
		    C(THROTTLE), 0, 0, "too-many-connections" },
		{ M, 421, "", "RP-001 (BAY004-MC1F33) Unfortunately, some "
		    "messages from 192.0.2.1 weren't sent. Please try again. We "
		    "have limits for how many messages can be sent per hour and "
		    "per day.", C(THROTTLE), 0, 0, "microsoft-rp" },
		/* Comcast */
		{ B, 421, "", "- [Too many sessions opened]", C(THROTTLE), 0,
		    0, "comcast-sessions" },
		{ M, 421, "4.1.0", "192.0.2.1 Throttled - try again later. "
		    "Please see http://postmaster.comcast.net/smtp-error-codes."
		    "php#RL000001", C(THROTTLE), 0, 0, "comcast-rl" },
		{ M, 421, "4.1.0", "192.0.2.1 Throttled - try again later",
		    C(THROTTLE), 0, 0, "throttled" },
		/* Orange */
		{ B, 421, "", "mwinf5c10 ME Trop de connexions, veuillez "
		    "verifier votre configuration. Too many connections, slow "
		    "down. OFR005_104 [104]", C(THROTTLE), 0, 0,
		    "orange-connections" },
		{ B, 421, "", "mwinf5c20 ME Service refuse. Veuillez essayer "
		    "plus tard. Service refused, please try later. OFR_999 [999]",
		    C(SUSPEND), 0, 1800, "orange-later" },
		/* Apple iCloud */
		{ B, 421, "", "[HCM1] Your mail from 192.0.2.1 was deferred.",
		    C(SUSPEND), 0, 900, "icloud-hcm" },
		/* Greylisters */
		{ R, 450, "4.2.0", "<bob@example.test>: Recipient address "
		    "rejected: Greylisted, see http://postgrey.schweikert.ch/"
		    "help/example.test.html", C(GREYLIST), 0, 0, "greylist" },
		{ R, 451, "4.7.1", "Greylisting in action, please come back in "
		    "00:04:59", C(GREYLIST), 299, 0, "greylist" },
		{ R, 451, "4.7.1", "Greylisting in action, please come back "
		    "later", C(GREYLIST), 0, 0, "greylist" },
		{ R, 451, "4.7.1", "Please come back in 300 seconds",
		    C(GREYLIST), 300, 0, "come-back-later" },
		{ D, 451, "4.7.1", "Greylisted, please try again in 5 minutes",
		    C(GREYLIST), 300, 0, "greylist" },
		/* Postfix anvil, sendmail, Exim */
		{ B, 421, "4.7.0", "mx.example.test Error: too many connections "
		    "from 192.0.2.1", C(THROTTLE), 0, 0,
		    "too-many-connections" },
		{ R, 450, "4.7.1", "<bob@example.test>: Error: too much mail "
		    "from 192.0.2.1", C(THROTTLE), 0, 0, "rate-from-ip" },
		{ B, 421, "4.3.2", "Connection rate limit exceeded.",
		    C(THROTTLE), 0, 0, "too-many-connections" },
		{ B, 421, "", "Too many concurrent SMTP connections; please try "
		    "again later.", C(THROTTLE), 0, 0, "too-many-connections" },
		/* Not a rate: the rest goes in another transaction. */
		{ R, 452, "4.5.3", "Error: too many recipients", C(RCPT_TEMP),
		    0, 0, "fallback" },
		/* The server's disk, not the recipient's mailbox. */
		{ D, 452, "4.3.1", "Insufficient system storage", C(MSG_TEMP),
		    0, 0, "fallback" },
		{ R, 451, "4.7.1", "Service unavailable - try again in 10 "
		    "minutes", C(RCPT_TEMP), 600, 0, "fallback" },
		{ R, 550, "5.1.1", "The email account that you tried to reach "
		    "does not exist. a1si2 - gsmtp", C(PERMANENT), 0, 0,
		    "fallback" },
		{ B, 554, "5.7.1", "Service unavailable; Client host [192.0.2.1] "
		    "blocked using zen.spamhaus.org", C(CONN_FAIL), 0, 0,
		    "fallback" },
		{ B, 421, "", "mx.example.test Service not available, closing "
		    "transmission channel", C(THROTTLE), 0, 0, "fallback" },
		/* Built-in rules look at 4xx only. */
		{ R, 550, "5.7.1", "Too many connections", C(PERMANENT), 0, 0,
		    "fallback" },
		/* Greylisting wording outside a transaction is no greylist. */
		{ B, 421, "", "greylisted", C(THROTTLE), 0, 0, "fallback" },
	};

	ASSERT(ARRAY_SIZE(c) >= 30);
	check_replies(NULL, c, ARRAY_SIZE(c));
}

TEST(invalid_utf8_text)
{
	struct smtp_reply r;
	struct verdict v;

	/* A receiver's stray Latin-1 must not stop the search. */
	reply(&r, 421, "", "Service refus\xe9. Veuillez essayer plus tard "
	    "\xff\xfe");
	verdict_classify(DLV_PHASE_BANNER, &r, 0, &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_SUSPEND);
	ASSERT_STR_EQ(v.rule, "orange-later");
}

struct hcase {
	const char *text;
	int want;
};

TEST(hints)
{
	static const struct hcase c[] = {
		{ "please come back in 300 seconds", 300 },
		{ "Please come back in 5 minutes", 300 },
		{ "try again in 10 min", 600 },
		{ "retry after 60s", 60 },
		{ "wait 2 hours", 7200 },
		{ "Greylisting in action, please come back in 00:04:59", 299 },
		{ "Greylisting in action, please come back in 01:00:00", 3600 },
		{ "retry in 30 s", 30 },
		{ "Greylisted for 300 seconds", 300 },
		{ "Try again in about 5 minutes.", 300 },
		{ "please wait at least 90 seconds before retrying", 90 },
		{ "please retry in 2 hrs", 7200 },
		{ "Try again in 3m", 180 },
		{ "TRY AGAIN IN 1 HOUR", 3600 },
		{ "resend after 45 sec", 45 },
		/* capped at a day, without overflow */
		{ "come back in 1000 hours", 86400 },
		{ "wait 999999999 h", 86400 },
		/* no number, no unit, or not a trigger word */
		{ "Try again later", 0 },
		{ "please come back later", 0 },
		{ "try again in a few minutes", 0 },
		{ "retry timeout 5 s", 0 },
		{ "awaiting 5 s", 0 },
		{ "Retry-After: 60", 0 },
		{ "Greylisted, see http://postgrey.schweikert.ch/help/a.html",
		    0 },
		{ "", 0 },
	};

	for (size_t i = 0; i < ARRAY_SIZE(c); i++) {
		int got = verdict_hint_seconds(c[i].text);

		if (got != c[i].want) {
			fprintf(stderr, "\"%s\" -> %d, want %d\n", c[i].text,
			    got, c[i].want);
			ASSERT(0);
		}
	}
	ASSERT_EQ(verdict_hint_seconds(NULL), 0);
}

/* load - a config with the given reply_rules text, or abort */
static struct relay_config *
load(const char *rules)
{
	struct relay_config *cfg = NULL;
	char text[4096], err[512] = "";

	snprintf(text, sizeof text, "listeners = ( { address = \"127.0.0.1\"; "
	    "port = 2525; } );\nreply_rules = (\n%s\n);\n", rules);
	if (config_load_string(text, "t.conf", &cfg, err, sizeof err) != 0)
		fprintf(stderr, "%s\n", err);
	ASSERT(cfg != NULL);
	return cfg;
}

TEST(config_rule_overrides_default)
{
	static const struct rcase c[] = {
		{ D, 421, "4.7.28", "Our system has detected an unusual rate "
		    "of unsolicited mail originating from your IP address.",
		    C(SUSPEND), 0, 7200, "my-gmail" },
		/* Rules tried in file order: the first match wins. */
		{ R, 451, "4.7.1", "Greylisting in action, please come back in "
		    "00:05:00", C(RCPT_TEMP), 300, 0, "first" },
		/* Others still fall through to the built-in rules. */
		{ R, 450, "4.2.0", "Greylisted, see http://postgrey."
		    "schweikert.ch/help/example.test.html", C(GREYLIST), 0, 0,
		    "greylist" },
	};
	struct relay_config *cfg = load(
	    "{ name = \"my-gmail\"; code = \"421\"; enhanced = \"4.7.28\";\n"
	    "  class = \"suspend\"; suspend = 7200; },\n"
	    "{ name = \"first\"; text = \"greylisting in action\";\n"
	    "  class = \"rcpt-temp\"; },\n"
	    "{ name = \"second\"; text = \"greylisting\"; class = \"suspend\"; }");
	struct smtp_reply r;
	struct verdict v;

	check_replies(&cfg->reply_rules, c, ARRAY_SIZE(c));
	/* The same reply without the operator's rules. */
	reply(&r, 421, "4.7.28", "unusual rate of unsolicited mail");
	verdict_classify(DLV_PHASE_DOT, &r, 0, &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_THROTTLE);
	ASSERT_STR_EQ(v.rule, "gmail-unusual-rate");
	/* An empty list is no list. */
	config_unref(cfg);
	cfg = load("");
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_DOT, &r, 0, &v);
	ASSERT_STR_EQ(v.rule, "gmail-unusual-rate");
	config_unref(cfg);
}

TEST(config_rule_phases)
{
	static const struct rcase c[] = {
		{ R, 451, "", "custom block here", C(SUSPEND), 0, 0,
		    "rcpt-only" },
		{ M, 451, "", "custom block here", C(MSG_TEMP), 0, 0,
		    "fallback" },
		{ M, 451, "", "local policy", C(THROTTLE), 0, 0, "txn-ends" },
		{ D, 451, "", "local policy", C(THROTTLE), 0, 0, "txn-ends" },
		{ R, 451, "", "local policy", C(RCPT_TEMP), 0, 0, "fallback" },
		{ B, 421, "", "local policy", C(CONN_FAIL), 0, 0, "any" },
	};
	struct relay_config *cfg = load(
	    "{ name = \"rcpt-only\"; phase = \"rcpt\"; text = \"custom block\";"
	    " class = \"suspend\"; },\n"
	    "{ name = \"txn-ends\"; phase = [ \"mail\", \"dot\" ];"
	    " text = \"local policy\"; class = \"throttle\"; },\n"
	    "{ name = \"any\"; phase = \"any\"; code = \"421\";"
	    " text = \"local policy\"; class = \"conn-fail\"; }");

	check_replies(&cfg->reply_rules, c, ARRAY_SIZE(c));
	config_unref(cfg);
}

TEST(config_rule_codes)
{
	static const struct rcase c[] = {
		{ R, 451, "", "x", C(THROTTLE), 0, 0, "45x" },
		{ R, 450, "", "x", C(THROTTLE), 0, 0, "45x" },
		{ R, 421, "", "x", C(SUSPEND), 0, 0, "4xx" },
		{ R, 452, "4.7.28", "y", C(GREYLIST), 0, 0, "enh-prefix" },
		{ R, 452, "4.7.2", "y", C(GREYLIST), 0, 0, "enh-prefix" },
		{ R, 452, "4.2.2", "y", C(SUSPEND), 0, 0, "enh-exact" },
		/* "4.2.2" is exact: 4.2.22 is another status. */
		{ R, 452, "4.2.22", "y", C(RCPT_TEMP), 0, 0, "fallback" },
		{ R, 452, "", "y", C(RCPT_TEMP), 0, 0, "fallback" },
		{ R, 550, "", "x", C(PERMANENT), 0, 0, "fallback" },
	};
	struct relay_config *cfg = load(
	    "{ name = \"45x\"; code = \"45X\"; text = \"x\";\n"
	    "  class = \"throttle\"; },\n"
	    "{ name = \"4xx\"; code = \"4xx\"; text = \"x\";\n"
	    "  class = \"suspend\"; },\n"
	    "{ name = \"enh-prefix\"; enhanced = \"4.7.\";\n"
	    "  class = \"greylist\"; },\n"
	    "{ name = \"enh-exact\"; enhanced = \"4.2.2\";\n"
	    "  class = \"suspend\"; }");

	check_replies(&cfg->reply_rules, c, ARRAY_SIZE(c));
	config_unref(cfg);
}

TEST(config_rule_decides_retry_or_bounce)
{
	struct relay_config *cfg = load(
	    "{ name = \"5xx-rate\"; code = \"5xx\"; text = \"rate limit\";"
	    " class = \"throttle\"; },\n"
	    "{ name = \"quota-bounce\"; code = \"452\"; enhanced = \"4.2.2\";"
	    " class = \"permanent\"; },\n"
	    "{ name = \"tls\"; text = \"certificate verify failed\";"
	    " class = \"suspend\"; suspend = 600; },\n"
	    "{ name = \"timeout\"; code = \"4xx\"; text = \"timeout\";"
	    " class = \"permanent\"; }");
	struct smtp_reply r;
	struct verdict v;

	/* 5xx the rule calls temporary: retried, not bounced. */
	reply(&r, 550, "5.7.1", "Sending rate limit exceeded");
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_RCPT, &r, 0, &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_THROTTLE);
	ASSERT_EQ(v.action, VERDICT_RCPT_RETRY);
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_DOT, &r, 0, &v);
	ASSERT_EQ(v.action, VERDICT_MSG_RETRY);
	/* 4xx the rule calls permanent: bounced. */
	reply(&r, 452, "4.2.2", "Mailbox full");
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_RCPT, &r, 0, &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_PERMANENT);
	ASSERT_EQ(v.action, VERDICT_RCPT_BOUNCE);
	ASSERT_STR_EQ(v.rule, "quota-bounce");
	/* Before MAIL the host is skipped whatever the class. */
	reply(&r, 550, "", "rate limit");
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_BANNER, &r, 0,
	    &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_THROTTLE);
	ASSERT_EQ(v.action, VERDICT_NEXT_MX);
	/* A rule without a code sees the text of a failed handshake... */
	reply(&r, 0, "", "TLS: certificate verify failed");
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_STARTTLS, &r, 0,
	    &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_SUSPEND);
	ASSERT_EQ(v.suspend_s, 600);
	ASSERT_EQ(v.action, VERDICT_NEXT_MX);
	/* ...but a rule with a code never matches an I/O event, and I/O
	 * events keep their action whatever a rule says. */
	reply(&r, 0, "", "timeout while rcpt");
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_RCPT, &r, -110,
	    &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_CONN_FAIL);
	ASSERT_EQ(v.action, VERDICT_MSG_RETRY);
	ASSERT(v.conn_dead);
	/* 2xx never reaches the rules. */
	reply(&r, 250, "2.0.0", "rate limit ok");
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_RCPT, &r, 0, &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_OK);
	ASSERT_EQ(v.action, VERDICT_OK);
	config_unref(cfg);
}

TEST(config_rule_match_limit)
{
	/* Catastrophic backtracking is cut off and taken as no match. */
	struct relay_config *cfg = load(
	    "{ name = \"slow\"; text = \"^(a|aa)+$\"; class = \"suspend\"; }");
	struct smtp_reply r;
	struct verdict v;
	char text[200];

	memset(text, 'a', 120);
	text[120] = 'b';
	text[121] = '\0';
	reply(&r, 451, "", text);
	verdict_classify_rules(&cfg->reply_rules, DLV_PHASE_RCPT, &r, 0, &v);
	ASSERT_EQ(v.cls, VERDICT_CLASS_RCPT_TEMP);
	ASSERT_STR_EQ(v.rule, "fallback");
	config_unref(cfg);
}

TEST(names)
{
	ASSERT_STR_EQ(verdict_class_name(VERDICT_CLASS_THROTTLE), "throttle");
	ASSERT_STR_EQ(verdict_class_name(VERDICT_CLASS_RCPT_TEMP),
	    "rcpt-temp");
	ASSERT_STR_EQ(verdict_class_name(VERDICT_CLASS_CONN_FAIL),
	    "conn-fail");
	ASSERT_STR_EQ(verdict_class_name(VERDICT_CLASS_MSGS_PER_CONN),
	    "msgs-per-conn");
	ASSERT_STR_EQ(verdict_class_name(VERDICT_CLASS_LAST), "?");
	verdict_init();
	verdict_init();
}

TEST_MAIN("verdict",
    TEST_ENTRY(session_level),
    TEST_ENTRY(transaction_level),
    TEST_ENTRY(closing_and_io),
    TEST_ENTRY(fallback_classes),
    TEST_ENTRY(real_replies),
    TEST_ENTRY(invalid_utf8_text),
    TEST_ENTRY(hints),
    TEST_ENTRY(config_rule_overrides_default),
    TEST_ENTRY(config_rule_phases),
    TEST_ENTRY(config_rule_codes),
    TEST_ENTRY(config_rule_decides_retry_or_bounce),
    TEST_ENTRY(config_rule_match_limit),
    TEST_ENTRY(names))

