/*
 * NAME
 *	config.c - load, validate and reference-count the relay configuration
 * SUMMARY
 *	config_load(), config_load_string(), config_ref(), config_unref(),
 *	config_net_match(), config_user_find(), config_tls_policy(),
 *	config_regex_compile(), config_class_name(),
 *	config_shape_provider(), config_shape_for()
 * DESCRIPTION
 *	libconfig only parses; this file owns the schema. Every value is
 *	checked (type, range, syntax) and copied into a struct relay_config,
 *	after which the libconfig tree is destroyed: nothing outside this file
 *	ever sees a config_setting_t, and the snapshot owns all its memory.
 *
 *	The schema is one table, cfg_keys[]: (scope, key, kind, range, member
 *	offset). cfg_apply() walks the members of a group in file order and
 *	looks each one up there, so the unknown-key check and the copy are the
 *	same pass and an error names the first bad line. An unknown key is an
 *	error, not a warning: a misspelt limit that is silently ignored is
 *	worse than a daemon that refuses to start. Lists of records (listeners,
 *	users, networks, trace flags, DNS servers, the retry schedule, the
 *	TLS policies) and the delivery source address have their own parsers.
 *	A group or list inside a group (delivery.timeouts,
 *	delivery.tls_policies) has the scope "outer.inner".
 *
 *	reply_rules are the operator's additions to the reply classifier
 *	(relay/verdict.c). Their text regexes are compiled here, once per
 *	load, so that a bad pattern is an error naming its line like any other
 *	and a reply is never classified by a pattern that does not compile;
 *	the compiled rules belong to the snapshot. The engine is PCRE2
 *	(libpcre2-8): it is the maintained successor of PCRE, matches
 *	caselessly in UTF-8 while tolerating the invalid bytes a receiver
 *	may send (PCRE2_MATCH_INVALID_UTF), JIT-compiles, can bound a match
 *	(verdict.c sets a match limit) and speaks the Perl dialect operators
 *	already use in MTA rule files. POSIX regcomp(3) has none of that and
 *	its behaviour on bad UTF-8 depends on the locale.
 *
 *	shaping holds the static limits of destinations (relay/site.h
 *	ceilings and floors, session limits, TLS): shaping.default, providers
 *	(MX host name suffixes: every MX host of one provider is one site)
 *	and domains. Built-in providers (cfg_builtin_providers[], the figures
 *	of RECEIVERS.md 4.4) are merged with the file's by name, field by
 *	field; a provider or domain entry records which fields it set
 *	(struct cfg_shape.set) and inherits the rest when looked up, so a
 *	later change of shaping.default reaches them. Unset fields of
 *	shaping.default come from delivery.max_connections_per_domain,
 *	max_messages_per_connection and max_recipients_per_transaction, which
 *	keeps older files meaning what they meant.
 *
 *	Error policy: the first problem wins. Its text goes into the caller's
 *	err buffer as "file:line: message" and the function returns
 *	RELAY_ECONFIG (or -errno when the file itself cannot be read). A
 *	partially built snapshot is freed before returning.
 *
 *	XXX libconfig 1.5 silently truncates an integer literal that does not
 *	fit in 32 bits unless it carries the L suffix (5000000000 reads as
 *	705032704). We cannot see the literal, so relay.conf.example says to
 *	write large sizes with L.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libconfig.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "config/log.h"
#include "config/util.h"
#include "config/config.h"

#define CFG_MAX_FILE	(1024 * 1024)	/* a bigger config file is a mistake */
#define CFG_DAY_MS	(86400LL * 1000)	/* longest timeout */
#define CFG_MAX_DNS_SERVERS	16	/* more is a mistake; c-ares tries in order */
#define CFG_HOUR_MS	(3600LL * 1000)	/* longest outbound SMTP timeout */
#define CFG_MAX_QUEUE_MS (30 * CFG_DAY_MS)	/* longest queue lifetime */
#define CFG_MAX_RETRIES	32	/* retry_schedule entries */
#define CFG_MAX_TLS_POLICIES 10000	/* tls_policies entries */
#define CFG_MAX_REPLY_RULES 10000	/* reply_rules entries, tried in turn */
#define CFG_MAX_PROVIDERS 256	/* shaping.providers, built-ins included */
#define CFG_MAX_SUFFIXES 32	/* mx_suffixes of one provider */
#define CFG_MAX_SHAPE_DOMAINS 10000	/* shaping.domains entries */
/* Fastest rate: site.c's cap of 1e6 msgs/s, per hour as CFG_K_RATE ranges. */
#define CFG_MAX_RATE_H	(1000000LL * 3600)
/*
 * Compile options of every classifier regex: case does not matter in
 * reply texts; MATCH_INVALID_UTF implies UTF and lets a subject with
 * broken UTF-8 be searched instead of failing; \C could split a UTF-8
 * character, so it is refused.
 */
#define CFG_REGEX_OPTIONS (PCRE2_CASELESS | PCRE2_MATCH_INVALID_UTF | \
	PCRE2_NEVER_BACKSLASH_C)

/* One load in progress: where messages go and what is being built. */
struct cfg_parse {
	const char *name;		/* file name when libconfig has none */
	char *err;			/* caller's buffer, may be NULL */
	size_t errlen;			/* size of err */
	struct relay_config *cfg;	/* snapshot under construction */
};

/* How a value is checked and stored. */
enum cfg_kind {
	CFG_K_GROUP,	/* sub-group; its keys use the same base struct */
	CFG_K_OTHER,	/* a list parsed by dedicated code after the walk */
	CFG_K_STR,	/* char *, non-empty, replaces the default */
	CFG_K_BOOL,	/* bool */
	CFG_K_INT,	/* int in lo..hi, int or int64 literal */
	CFG_K_U64,	/* uint64_t in lo..hi, int or int64 literal */
	CFG_K_STR0,	/* char *, "" = NULL (the default) */
	CFG_K_MS,	/* int ms; seconds given as int or float, lo..hi ms */
	CFG_K_MS64,	/* uint64_t ms; like CFG_K_MS */
	CFG_K_SEC,	/* int s; like CFG_K_MS, rounded to whole seconds */
	CFG_K_FRAC,	/* double, int or float, lo/1000..hi/1000 */
	CFG_K_MODE,	/* int permission bits from an octal string */
	CFG_K_TLS,	/* enum cfg_tls_mode from its name */
	CFG_K_DLV_TLS,	/* int enum cfg_dlv_tls from its name */
	CFG_K_CLASS,	/* int enum cfg_class from its name, not "ok" */
	CFG_K_PHASES,	/* unsigned mask of 1u << enum cfg_phase from a
			   phase name or an array of them; "any" = all */
	CFG_K_RATE,	/* double per second from "N/s", "N/min" or "N/h";
			   lo..hi per hour */
};

/* One schema entry: a key inside a scope, stored at base + off. */
struct cfg_key {
	const char *scope;	/* NULL = top level, else group/list name */
	const char *key;	/* setting name */
	enum cfg_kind kind;	/* check and storage */
	long long lo, hi;	/* inclusive range (ms for durations) */
	size_t off;		/* offset in the base struct */
};

#define RC(m)	offsetof(struct relay_config, m)
#define LS(m)	offsetof(struct cfg_listener, m)
#define US(m)	offsetof(struct cfg_user, m)
#define TP(m)	offsetof(struct cfg_tls_policy, m)
#define RR(m)	offsetof(struct cfg_reply_rule, m)
#define SH(m)	offsetof(struct cfg_shape, m)
#define PV(m)	offsetof(struct cfg_provider, m)
#define DS(m)	offsetof(struct cfg_domain_shape, m)

/*
 * The keys of a struct cfg_shape at offset at of the scope's base: the
 * same in shaping.default, shaping.providers and shaping.domains. Which
 * of them a group gave is read back through cfg_shape_bits[].
 */
#define CFG_SHAPE_KEYS(scope, at) \
	{ scope, "max_connections", CFG_K_INT, 1, 10000, \
	    (at) + SH(max_conn) }, \
	/* At most max_connections, checked after the walk. */ \
	{ scope, "min_connections", CFG_K_INT, 1, 10000, \
	    (at) + SH(min_conn) }, \
	{ scope, "max_messages_per_connection", CFG_K_INT, 1, 100000, \
	    (at) + SH(max_msgs_per_conn) }, \
	{ scope, "max_recipients_per_transaction", CFG_K_INT, 1, 100000, \
	    (at) + SH(max_rcpts_per_txn) }, \
	{ scope, "rate", CFG_K_RATE, 1, CFG_MAX_RATE_H, (at) + SH(rate) }, \
	/* At most rate, checked after the walk. */ \
	{ scope, "min_rate", CFG_K_RATE, 1, CFG_MAX_RATE_H, \
	    (at) + SH(min_rate) }, \
	{ scope, "connection_rate", CFG_K_RATE, 1, CFG_MAX_RATE_H, \
	    (at) + SH(conn_rate) }, \
	{ scope, "tls", CFG_K_DLV_TLS, 0, 0, (at) + SH(tls) }

static const struct cfg_key cfg_keys[] = {
	{ NULL, "hostname", CFG_K_STR, 0, 0, RC(hostname) },
	{ NULL, "spool_dir", CFG_K_STR, 0, 0, RC(spool_dir) },
	{ NULL, "control", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "tls", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "listeners", CFG_K_OTHER, 0, 0, 0 },
	{ NULL, "users", CFG_K_OTHER, 0, 0, 0 },
	{ NULL, "relay_networks", CFG_K_OTHER, 0, 0, 0 },
	{ NULL, "limits", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "timeouts", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "auth", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "log", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "dns", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "delivery", CFG_K_GROUP, 0, 0, 0 },
	{ NULL, "reply_rules", CFG_K_OTHER, 0, 0, 0 },
	{ NULL, "shaping", CFG_K_GROUP, 0, 0, 0 },
	{ "control", "socket", CFG_K_STR, 0, 0, RC(control_socket) },
	{ "control", "mode", CFG_K_MODE, 0, 0777, RC(control_mode) },
	{ "tls", "certificate", CFG_K_STR, 0, 0, RC(tls_cert) },
	{ "tls", "key", CFG_K_STR, 0, 0, RC(tls_key) },
	{ "tls", "generate", CFG_K_BOOL, 0, 0, RC(tls_generate) },
	{ "limits", "max_message_size", CFG_K_U64, 1024, 1LL << 40,
	    RC(limits.max_message_size) },
	{ "limits", "max_recipients", CFG_K_INT, 1, 100000,
	    RC(limits.max_recipients) },
	{ "limits", "max_connections", CFG_K_INT, 1, 1000000,
	    RC(limits.max_connections) },
	/* The upper bound is max_connections, checked after the walk. */
	{ "limits", "max_connections_per_ip", CFG_K_INT, 1, 1000000,
	    RC(limits.max_connections_per_ip) },
	{ "limits", "max_line_length", CFG_K_INT, 512, 65536,
	    RC(limits.max_line_length) },
	{ "limits", "max_errors", CFG_K_INT, 1, 1000, RC(limits.max_errors) },
	{ "timeouts", "command", CFG_K_MS, 1, CFG_DAY_MS,
	    RC(timeouts.command_ms) },
	{ "timeouts", "data", CFG_K_MS, 1, CFG_DAY_MS, RC(timeouts.data_ms) },
	{ "timeouts", "tls_handshake", CFG_K_MS, 1, CFG_DAY_MS,
	    RC(timeouts.tls_handshake_ms) },
	{ "timeouts", "shutdown", CFG_K_MS, 1, CFG_DAY_MS,
	    RC(timeouts.shutdown_ms) },
	{ "auth", "failure_delay", CFG_K_MS, 0, 60 * 1000,
	    RC(auth.failure_delay_ms) },
	{ "auth", "max_failures", CFG_K_INT, 1, 1000, RC(auth.max_failures) },
	{ "auth", "failure_window", CFG_K_SEC, 1000, CFG_DAY_MS,
	    RC(auth.failure_window_s) },
	{ "log", "syslog", CFG_K_BOOL, 0, 0, RC(log.syslog) },
	{ "log", "trace", CFG_K_OTHER, 0, 0, 0 },
	{ "dns", "servers", CFG_K_OTHER, 0, 0, 0 },
	{ "dns", "timeout", CFG_K_MS, 1, 300 * 1000, RC(dns.timeout_ms) },
	{ "dns", "tries", CFG_K_INT, 1, 20, RC(dns.tries) },
	{ "dns", "ipv6", CFG_K_BOOL, 0, 0, RC(dns.ipv6) },
	{ "dns", "max_mx_ttl", CFG_K_SEC, 0, 7 * CFG_DAY_MS,
	    RC(dns.max_mx_ttl_s) },
	{ "dns", "negative_ttl", CFG_K_SEC, 0, CFG_DAY_MS,
	    RC(dns.negative_ttl_s) },
	{ "dns", "cache_size", CFG_K_INT, 0, 10000000, RC(dns.cache_size) },
	{ "delivery", "enabled", CFG_K_BOOL, 0, 0, RC(delivery.enabled) },
	{ "delivery", "port", CFG_K_INT, 1, 65535, RC(delivery.port) },
	{ "delivery", "source_address", CFG_K_OTHER, 0, 0, 0 },
	{ "delivery", "helo", CFG_K_STR0, 0, 0, RC(delivery.helo) },
	{ "delivery", "tls", CFG_K_DLV_TLS, 0, 0, RC(delivery.tls) },
	/* Checked readable after the walk, if some policy is "verify". */
	{ "delivery", "ca_file", CFG_K_STR, 0, 0, RC(delivery.ca_file) },
	{ "delivery", "tls_policies", CFG_K_OTHER, 0, 0, 0 },
	{ "delivery", "max_connections", CFG_K_INT, 1, 100000,
	    RC(delivery.max_connections) },
	/* The upper bound is max_connections, checked after the walk. */
	{ "delivery", "max_connections_per_domain", CFG_K_INT, 1, 10000,
	    RC(delivery.max_connections_per_domain) },
	{ "delivery", "max_connections_per_host", CFG_K_INT, 1, 10000,
	    RC(delivery.max_connections_per_host) },
	{ "delivery", "max_messages_per_connection", CFG_K_INT, 1, 100000,
	    RC(delivery.max_messages_per_connection) },
	{ "delivery", "max_recipients_per_transaction", CFG_K_INT, 1, 100000,
	    RC(delivery.max_recipients_per_transaction) },
	/* Checked against min_retry after the walk. */
	{ "delivery", "retry_schedule", CFG_K_OTHER, 0, 0, 0 },
	{ "delivery", "retry_jitter", CFG_K_FRAC, 0, 500,
	    RC(delivery.retry_jitter) },
	{ "delivery", "min_retry", CFG_K_SEC, 1000, CFG_DAY_MS,
	    RC(delivery.min_retry_s) },
	{ "delivery", "greylist_retry", CFG_K_SEC, 1000, CFG_DAY_MS,
	    RC(delivery.greylist_retry_s) },
	{ "delivery", "max_queue_lifetime", CFG_K_SEC, 60 * 1000,
	    CFG_MAX_QUEUE_MS, RC(delivery.max_queue_lifetime_s) },
	/* Below max_queue_lifetime unless 0, checked after the walk. */
	{ "delivery", "delay_warning", CFG_K_SEC, 0, CFG_MAX_QUEUE_MS,
	    RC(delivery.delay_warning_s) },
	{ "delivery", "timeouts", CFG_K_GROUP, 0, 0, 0 },
	{ "delivery.timeouts", "connect", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_CONNECT]) },
	{ "delivery.timeouts", "banner", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_BANNER]) },
	{ "delivery.timeouts", "ehlo", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_EHLO]) },
	{ "delivery.timeouts", "starttls", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_STARTTLS]) },
	{ "delivery.timeouts", "mail", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_MAIL]) },
	{ "delivery.timeouts", "rcpt", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_RCPT]) },
	{ "delivery.timeouts", "data", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_DATA]) },
	{ "delivery.timeouts", "dot", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_DOT]) },
	{ "delivery.timeouts", "rset", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_RSET]) },
	{ "delivery.timeouts", "quit", CFG_K_MS64, 1, CFG_HOUR_MS,
	    RC(delivery.timeout_ms[CFG_PHASE_QUIT]) },
	{ "listeners", "name", CFG_K_STR, 0, 0, LS(name) },
	{ "listeners", "address", CFG_K_STR, 0, 0, LS(address) },
	{ "listeners", "port", CFG_K_INT, 1, 65535, LS(port) },
	{ "listeners", "tls", CFG_K_TLS, 0, 0, LS(tls) },
	{ "listeners", "auth_required", CFG_K_BOOL, 0, 0, LS(auth_required) },
	{ "users", "name", CFG_K_STR, 0, 0, US(name) },
	{ "users", "password_hash", CFG_K_STR, 0, 0, US(hash) },
	{ "delivery.tls_policies", "domain", CFG_K_STR, 0, 0, TP(domain) },
	{ "delivery.tls_policies", "tls", CFG_K_DLV_TLS, 0, 0, TP(tls) },
	/* Syntax of code, enhanced and text is checked after the walk. */
	{ "reply_rules", "name", CFG_K_STR, 0, 0, RR(name) },
	{ "reply_rules", "code", CFG_K_STR, 0, 0, RR(code) },
	{ "reply_rules", "enhanced", CFG_K_STR, 0, 0, RR(enh) },
	{ "reply_rules", "phase", CFG_K_PHASES, 0, 0, RR(phases) },
	{ "reply_rules", "text", CFG_K_STR, 0, 0, RR(text) },
	{ "reply_rules", "class", CFG_K_CLASS, 0, 0, RR(cls) },
	{ "reply_rules", "suspend", CFG_K_SEC, 1000, CFG_DAY_MS,
	    RR(suspend_s) },
	{ "shaping", "default", CFG_K_GROUP, 0, 0, 0 },
	{ "shaping", "builtin_providers", CFG_K_BOOL, 0, 0,
	    RC(shaping.builtin_providers) },
	{ "shaping", "providers", CFG_K_OTHER, 0, 0, 0 },
	{ "shaping", "domains", CFG_K_OTHER, 0, 0, 0 },
	CFG_SHAPE_KEYS("shaping.default", RC(shaping.dflt)),
	/* Names and suffixes are checked after the walk. */
	{ "shaping.providers", "name", CFG_K_STR, 0, 0, PV(name) },
	{ "shaping.providers", "mx_suffixes", CFG_K_OTHER, 0, 0, 0 },
	CFG_SHAPE_KEYS("shaping.providers", PV(shape)),
	{ "shaping.domains", "domain", CFG_K_STR, 0, 0, DS(domain) },
	{ "shaping.domains", "rollup", CFG_K_BOOL, 0, 0, DS(rollup) },
	CFG_SHAPE_KEYS("shaping.domains", DS(shape)),
};

/* The CFG_SHAPE_KEYS names and the struct cfg_shape.set bit of each. */
static const struct {
	const char *key;
	unsigned int bit;
} cfg_shape_bits[] = {
	{ "max_connections", CFG_SHAPE_MAX_CONN },
	{ "min_connections", CFG_SHAPE_MIN_CONN },
	{ "max_messages_per_connection", CFG_SHAPE_MSGS },
	{ "max_recipients_per_transaction", CFG_SHAPE_RCPTS },
	{ "rate", CFG_SHAPE_RATE },
	{ "min_rate", CFG_SHAPE_MIN_RATE },
	{ "connection_rate", CFG_SHAPE_CONN_RATE },
	{ "tls", CFG_SHAPE_TLS },
};

/*
 * Built-in providers: KumoMTA's shaping.toml figures as collected in
 * RECEIVERS.md 4.4 "Provider limits" (connections per provider, messages
 * per connection, TLS), plus Comcast's postmaster page (25 simultaneous
 * connections per IP). A field left 0 (tls -1) is inherited from
 * shaping.default. The file's shaping.providers entries of the same name
 * override them field by field (relay.conf.example shows them).
 */
static const struct {
	const char *name;
	const char *suffixes[4];	/* NULL-terminated if shorter */
	int max_conn;			/* 0 = inherit */
	int max_msgs_per_conn;		/* 0 = inherit */
	int tls;			/* enum cfg_dlv_tls, -1 = inherit */
} cfg_builtin_providers[] = {
	/* Gmail and Workspace: one provider; TLS required. */
	{ "google", { ".google.com", ".googlemail.com",
	    ".aspmx.l.google.com" }, 5, 50, CFG_DLV_TLS_REQUIRED },
	/* "Provided by Yahoo directly" (AOL shares the MX hosts). */
	{ "yahoo", { ".yahoodns.net" }, 0, 20, -1 },
	/* Outlook.com, Office 365 and the newer mx.microsoft hosts. */
	{ "microsoft", { ".outlook.com", ".protection.outlook.com",
	    ".mx.microsoft" }, 5, 50, -1 },
	{ "comcast", { ".comcast.net" }, 25, 1000, CFG_DLV_TLS_REQUIRED },
	{ "apple", { ".icloud.com", ".me.com", ".mail.icloud.com" }, 10, 5,
	    -1 },
	{ "orange", { ".orange.fr", ".wanadoo.fr" }, 2, 100,
	    CFG_DLV_TLS_REQUIRED },
};

static const char *const cfg_tls_names[] = {
	[CFG_TLS_NONE] = "none",
	[CFG_TLS_STARTTLS] = "starttls",
	[CFG_TLS_IMPLICIT] = "implicit",
};

static const char *const cfg_dlv_tls_names[] = {
	[CFG_DLV_TLS_NONE] = "none",
	[CFG_DLV_TLS_OPPORTUNISTIC] = "opportunistic",
	[CFG_DLV_TLS_REQUIRED] = "required",
	[CFG_DLV_TLS_VERIFY] = "verify",
};

/* reply_rules class names; also the classifier's names in logs. */
static const char *const cfg_class_names[] = {
	[CFG_CLASS_OK] = "ok",
	[CFG_CLASS_THROTTLE] = "throttle",
	[CFG_CLASS_SUSPEND] = "suspend",
	[CFG_CLASS_GREYLIST] = "greylist",
	[CFG_CLASS_RCPT_TEMP] = "rcpt-temp",
	[CFG_CLASS_MSG_TEMP] = "msg-temp",
	[CFG_CLASS_PERMANENT] = "permanent",
	[CFG_CLASS_CONN_FAIL] = "conn-fail",
	[CFG_CLASS_MSGS_PER_CONN] = "msgs-per-conn",
};
_Static_assert(ARRAY_SIZE(cfg_class_names) == CFG_CLASS_LAST, "class names");

/* reply_rules phase names: the delivery.timeouts keys, in enum order. */
static const char *const cfg_phase_names[] = {
	[CFG_PHASE_CONNECT] = "connect",
	[CFG_PHASE_BANNER] = "banner",
	[CFG_PHASE_EHLO] = "ehlo",
	[CFG_PHASE_STARTTLS] = "starttls",
	[CFG_PHASE_MAIL] = "mail",
	[CFG_PHASE_RCPT] = "rcpt",
	[CFG_PHASE_DATA] = "data",
	[CFG_PHASE_DOT] = "dot",
	[CFG_PHASE_RSET] = "rset",
	[CFG_PHASE_QUIT] = "quit",
};
_Static_assert(ARRAY_SIZE(cfg_phase_names) == CFG_PHASE_LAST, "phase names");
_Static_assert(CFG_PHASE_LAST < 32, "phase mask fits an unsigned int");

/* delivery.retry_schedule default, s: 5th retry ~2 h 22 min in, then 4000. */
static const int cfg_retry_default[] = { 300, 600, 1200, 2400, 4000 };

/* log.trace names; "all" is a convenience for debugging sessions. */
static const struct {
	const char *name;
	int flag;
} cfg_trace_names[] = {
	{ "smtp", TRACE_SMTP },
	{ "io", TRACE_IO },
	{ "spool", TRACE_SPOOL },
	{ "dns", TRACE_DNS },
	{ "dlv", TRACE_DLV },
	{ "state", TRACE_STATE },
	{ "all", TRACE_SMTP | TRACE_IO | TRACE_SPOOL | TRACE_DNS | TRACE_DLV |
	    TRACE_STATE },
};

/* crypt(3) method prefixes we accept: anything else is probably plaintext. */
static const char *const cfg_hash_ids[] = {
	"$1$", "$5$", "$6$", "$y$", "$gy$", "$7$", "$2b$", "$2a$", "$2y$",
};

static int cfg_fail(struct cfg_parse *, const config_setting_t *,
    const char *, ...) __attribute__((format(printf, 3, 4)));
static int cfg_load_text(const char *, const char *, const char *,
    struct relay_config **, char *, size_t);
static struct relay_config *cfg_new(void);
static void cfg_free(struct relay_config *);
static char *cfg_default_hostname(void);
static bool cfg_hostname_valid(const char *);
static bool cfg_hash_valid(const char *);
static bool cfg_addr_parse(const char *, int *, uint8_t *);
static int cfg_net_parse(const char *, struct cfg_net *);
static int cfg_apply(struct cfg_parse *, const config_setting_t *,
    const char *, void *);
static int cfg_value(struct cfg_parse *, const config_setting_t *,
    const struct cfg_key *, void *);
static int cfg_seq(struct cfg_parse *, const config_setting_t *,
    const char *, config_setting_t **);
static int cfg_parse_root(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_listeners(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_listener(struct cfg_parse *, const config_setting_t *,
    struct cfg_listener *);
static int cfg_parse_users(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_nets(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_trace(struct cfg_parse *, const config_setting_t *);
static int cfg_server_parse(const char *, char *, size_t);
static int cfg_parse_servers(struct cfg_parse *, const config_setting_t *);
static int cfg_cap(struct cfg_parse *, const config_setting_t *,
    const char *, const char *, int *, int, const char *);
static int cfg_parse_delivery(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_source(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_retry(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_policies(struct cfg_parse *, const config_setting_t *);
static int cfg_check_ca(struct cfg_parse *, const config_setting_t *,
    const config_setting_t *);
static int cfg_phase_name(struct cfg_parse *, const config_setting_t *,
    unsigned int *);
static int cfg_parse_rules(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_rule(struct cfg_parse *, const config_setting_t *,
    size_t);
static bool cfg_code_valid(char *);
static bool cfg_enh_valid(const char *);
static const struct cfg_tls_policy *cfg_tls_policy_find(
    const struct relay_config *, const char *);
static int cfg_check_ca_file(struct cfg_parse *, const config_setting_t *,
    const config_setting_t *);
static bool cfg_rate_parse(const char *, double *);
static unsigned int cfg_shape_given(const config_setting_t *);
static void cfg_shape_over(struct cfg_shape *, const struct cfg_shape *);
static void cfg_shape_clamp(struct cfg_shape *);
static int cfg_shape_check(struct cfg_parse *, const config_setting_t *,
    struct cfg_shape *);
static void cfg_lower(char *);
static void cfg_provider_free(struct cfg_provider *);
static void cfg_builtin_add(struct relay_config *);
static int cfg_parse_shaping(struct cfg_parse *, const config_setting_t *);
static int cfg_parse_providers(struct cfg_parse *, const config_setting_t *,
    const config_setting_t **);
static int cfg_parse_provider(struct cfg_parse *, const config_setting_t *,
    struct cfg_provider *, bool *);
static int cfg_parse_suffixes(struct cfg_parse *, const config_setting_t *,
    struct cfg_provider *);
static int cfg_check_suffixes(struct cfg_parse *,
    const config_setting_t *const *);
static int cfg_parse_shape_domains(struct cfg_parse *,
    const config_setting_t *);
static int cfg_check_shape_ca(struct cfg_parse *, const config_setting_t *,
    const config_setting_t *, const config_setting_t *const *,
    const config_setting_t *);
static size_t cfg_suffix_match(const char *, size_t, const char *);

/* cfg_fail - format "file:line: message" into the caller's buffer */
static int
cfg_fail(struct cfg_parse *p, const config_setting_t *s, const char *fmt, ...)
{
	const char *file = NULL;
	unsigned int line = 0;
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (s != NULL) {
		file = config_setting_source_file(s);
		line = config_setting_source_line(s);
	}
	/* Settings read from a string (which ours all are) carry no file. */
	if (file == NULL)
		file = p->name;
	if (p->err != NULL && p->errlen > 0) {
		if (line > 0)
			snprintf(p->err, p->errlen, "%s:%u: %s", file, line,
			    msg);
		else
			snprintf(p->err, p->errlen, "%s: %s", file, msg);
	}
	return RELAY_ECONFIG;
}

/* config_load - read a file and hand its text to the common loader */
int
config_load(const char *path, struct relay_config **out, char *err,
    size_t errlen)
{
	char *text, *dir, *slash;
	size_t len;
	int rc;

	*out = NULL;
	/*
	 * Read it ourselves rather than config_read_file(), which reports
	 * every open failure as a bare "file I/O error" and loses errno.
	 */
	if ((rc = file_read_all(path, &text, &len, CFG_MAX_FILE)) < 0) {
		if (err != NULL && errlen > 0)
			snprintf(err, errlen, "%s: %s", path, strerror(-rc));
		return rc;
	}
	if (strlen(text) != len) {
		free(text);
		if (err != NULL && errlen > 0)
			snprintf(err, errlen, "%s: file contains a NUL byte",
			    path);
		return RELAY_ECONFIG;
	}
	/*
	 * @include paths are taken relative to the including file's
	 * directory ("/relay.conf" keeps "/"); without a slash, the cwd.
	 */
	dir = xstrdup(path);
	if ((slash = strrchr(dir, '/')) != NULL)
		slash[slash == dir ? 1 : 0] = '\0';
	rc = cfg_load_text(text, path, slash != NULL ? dir : NULL, out, err,
	    errlen);
	free(dir);
	free(text);
	return rc;
}

/* config_load_string - parse text in memory; name stands in for a file name */
int
config_load_string(const char *text, const char *name,
    struct relay_config **out, char *err, size_t errlen)
{
	*out = NULL;
	return cfg_load_text(text, name, NULL, out, err, errlen);
}

/* cfg_load_text - parse with libconfig, validate, copy out, destroy the tree */
static int
cfg_load_text(const char *text, const char *name, const char *incdir,
    struct relay_config **out, char *err, size_t errlen)
{
	struct cfg_parse p = { name, err, errlen, NULL };
	config_t lc;
	int rc;

	config_init(&lc);
	if (incdir != NULL)
		config_set_include_dir(&lc, incdir);
	if (config_read_string(&lc, text) != CONFIG_TRUE) {
		const char *file = config_error_file(&lc);

		if (err != NULL && errlen > 0)
			snprintf(err, errlen, "%s:%d: %s",
			    file != NULL ? file : name, config_error_line(&lc),
			    config_error_text(&lc));
		config_destroy(&lc);
		return RELAY_ECONFIG;
	}
	p.cfg = cfg_new();
	p.cfg->path = xstrdup(name);
	rc = cfg_parse_root(&p, config_root_setting(&lc));
	config_destroy(&lc);
	if (rc < 0) {
		cfg_free(p.cfg);
		return rc;
	}
	*out = p.cfg;
	return 0;
}

/* cfg_new - a snapshot holding every default, refs == 1 */
static struct relay_config *
cfg_new(void)
{
	struct relay_config *cfg = xcalloc(1, sizeof *cfg);

	cfg->refs = 1;
	cfg->hostname = cfg_default_hostname();
	cfg->spool_dir = xstrdup("/var/spool/relay");
	cfg->control_socket = xstrdup("/run/relay/relayd.sock");
	cfg->control_mode = 0600;
	cfg->tls_cert = xstrdup("/etc/relay/cert.pem");
	cfg->tls_key = xstrdup("/etc/relay/key.pem");
	cfg->tls_generate = false;
	/* 50 MiB: room for attachments, but one client cannot fill a disk. */
	cfg->limits.max_message_size = 52428800;
	cfg->limits.max_recipients = 1000;
	cfg->limits.max_connections = 1000;
	cfg->limits.max_connections_per_ip = 50;
	/* 512 is RFC 5321's minimum, but AUTH PLAIN lines are longer. */
	cfg->limits.max_line_length = 2048;
	cfg->limits.max_errors = 10;
	/* RFC 5321 4.5.3.2 suggests 5 min for commands, 3 min inside DATA. */
	cfg->timeouts.command_ms = 300 * 1000;
	cfg->timeouts.data_ms = 180 * 1000;
	cfg->timeouts.tls_handshake_ms = 30 * 1000;
	cfg->timeouts.shutdown_ms = 10 * 1000;
	cfg->auth.failure_delay_ms = 1000;
	cfg->auth.max_failures = 5;
	cfg->auth.failure_window_s = 300;
	cfg->log.syslog = false;
	cfg->log.trace = 0;
	/* Defaults of resolv.conf(5) would be 5 s x 2; keep those. */
	cfg->dns.timeout_ms = 5000;
	cfg->dns.tries = 2;
	cfg->dns.ipv6 = false;
	cfg->dns.max_mx_ttl_s = 3600;
	cfg->dns.negative_ttl_s = 300;
	cfg->dns.cache_size = 10000;
	cfg->delivery.enabled = true;
	cfg->delivery.port = 25;
	cfg->delivery.has_source = false;
	cfg->delivery.helo = NULL;
	cfg->delivery.tls = CFG_DLV_TLS_OPPORTUNISTIC;
	/* Debian's bundle; only opened when some policy is "verify". */
	cfg->delivery.ca_file = xstrdup("/etc/ssl/certs/ca-certificates.crt");
	cfg->delivery.max_connections = 200;
	cfg->delivery.max_connections_per_domain = 20;
	cfg->delivery.max_connections_per_host = 10;
	cfg->delivery.max_messages_per_connection = 100;
	/* RFC 5321 4.5.3.1.8: a server must take at least 100. */
	cfg->delivery.max_recipients_per_transaction = 100;
	cfg->delivery.nretry = ARRAY_SIZE(cfg_retry_default);
	cfg->delivery.retry_schedule_s = xcalloc(cfg->delivery.nretry,
	    sizeof *cfg->delivery.retry_schedule_s);
	memcpy(cfg->delivery.retry_schedule_s, cfg_retry_default,
	    sizeof cfg_retry_default);
	cfg->delivery.retry_jitter = 0.1;
	cfg->delivery.min_retry_s = 60;
	cfg->delivery.greylist_retry_s = 300;
	cfg->delivery.max_queue_lifetime_s = 5 * 86400;
	cfg->delivery.delay_warning_s = 0;
	/* RFC 5321 4.5.3.2; connect, STARTTLS, RSET and QUIT are ours. */
	cfg->delivery.timeout_ms[CFG_PHASE_CONNECT] = 30 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_BANNER] = 300 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_EHLO] = 300 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_STARTTLS] = 120 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_MAIL] = 300 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_RCPT] = 300 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_DATA] = 120 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_DOT] = 600 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_RSET] = 60 * 1000;
	cfg->delivery.timeout_ms[CFG_PHASE_QUIT] = 60 * 1000;
	/*
	 * KumoMTA's default shaping (100 msgs/s, 100 connections/min) and
	 * site.c's floors (1 connection, 1 msg/min). The connection and
	 * per-connection ceilings follow delivery.* unless shaping.default
	 * sets them (cfg_parse_shaping()); the built-in providers are added
	 * there too, once builtin_providers is known.
	 */
	cfg->shaping.dflt.min_conn = 1;
	cfg->shaping.dflt.rate = 100.0;
	cfg->shaping.dflt.min_rate = 1.0 / 60.0;
	cfg->shaping.dflt.conn_rate = 100.0 / 60.0;
	cfg->shaping.dflt.tls = -1;
	cfg->shaping.builtin_providers = true;
	return cfg;
}

/* cfg_free - release a snapshot and everything it owns */
static void
cfg_free(struct relay_config *cfg)
{
	size_t i;

	for (i = 0; i < cfg->nlisteners; i++) {
		free(cfg->listeners[i].name);
		free(cfg->listeners[i].address);
	}
	free(cfg->listeners);
	for (i = 0; i < cfg->nusers; i++) {
		free(cfg->users[i].name);
		free(cfg->users[i].hash);
	}
	free(cfg->users);
	free(cfg->relay_nets);
	for (i = 0; i < cfg->dns.nservers; i++)
		free(cfg->dns.servers[i]);
	free(cfg->dns.servers);
	free(cfg->delivery.helo);
	free(cfg->delivery.ca_file);
	for (i = 0; i < cfg->delivery.ntls_policies; i++)
		free(cfg->delivery.tls_policies[i].domain);
	free(cfg->delivery.tls_policies);
	free(cfg->delivery.retry_schedule_s);
	for (i = 0; i < cfg->reply_rules.n; i++) {
		struct cfg_reply_rule *r = &cfg->reply_rules.v[i];

		free(r->name);
		free(r->code);
		free(r->enh);
		free(r->text);
		pcre2_code_free(r->re);
	}
	free(cfg->reply_rules.v);
	for (i = 0; i < cfg->shaping.nproviders; i++)
		cfg_provider_free(&cfg->shaping.providers[i]);
	free(cfg->shaping.providers);
	for (i = 0; i < cfg->shaping.ndomains; i++)
		free(cfg->shaping.domains[i].domain);
	free(cfg->shaping.domains);
	free(cfg->path);
	free(cfg->hostname);
	free(cfg->spool_dir);
	free(cfg->control_socket);
	free(cfg->tls_cert);
	free(cfg->tls_key);
	free(cfg);
}

/* config_ref - take another reference; the loop is single-threaded */
struct relay_config *
config_ref(struct relay_config *cfg)
{
	if (cfg != NULL)
		cfg->refs++;
	return cfg;
}

/* config_unref - drop a reference, freeing on the last one */
void
config_unref(struct relay_config *cfg)
{
	if (cfg == NULL)
		return;
	if (cfg->refs <= 0)
		relay_panic("config_unref: refs %d on %s", cfg->refs,
		    cfg->path ? cfg->path : "?");
	if (--cfg->refs == 0)
		cfg_free(cfg);
}

/* config_net_match - whether sa lies in a relay network */
bool
config_net_match(const struct relay_config *cfg, const struct sockaddr *sa)
{
	const uint8_t *addr;
	int family;
	size_t i;

	if (cfg == NULL || sa == NULL)
		return false;
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const void *)sa;

		family = AF_INET;
		addr = (const uint8_t *)&sin->sin_addr;
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const void *)sa;

		family = AF_INET6;
		addr = sin6->sin6_addr.s6_addr;
		/* A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d. */
		if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
			family = AF_INET;
			addr += 12;
		}
	} else
		return false;

	for (i = 0; i < cfg->nrelay_nets; i++) {
		const struct cfg_net *n = &cfg->relay_nets[i];
		int full = n->prefix / 8, rest = n->prefix % 8;

		if (n->family != family ||
		    memcmp(n->addr, addr, (size_t)full) != 0)
			continue;
		if (rest != 0 &&
		    ((addr[full] ^ n->addr[full]) & (0xff00 >> rest) & 0xff))
			continue;
		return true;
	}
	return false;
}

/* config_user_find - exact, case-sensitive lookup by login name */
const struct cfg_user *
config_user_find(const struct relay_config *cfg, const char *name)
{
	size_t i;

	if (cfg == NULL || name == NULL)
		return NULL;
	for (i = 0; i < cfg->nusers; i++)
		if (strcmp(cfg->users[i].name, name) == 0)
			return &cfg->users[i];
	return NULL;
}

/*
 * config_tls_policy - an exact entry wins; else the subdomain entry with the
 * longest domain that domain lies strictly below; else delivery.tls
 */
int
config_tls_policy(const struct relay_config *cfg, const char *domain)
{
	const struct cfg_tls_policy *tp = cfg_tls_policy_find(cfg, domain);

	return tp != NULL ? tp->tls : cfg->delivery.tls;
}

/* cfg_tls_policy_find - config_tls_policy()'s entry, or NULL: none matched */
static const struct cfg_tls_policy *
cfg_tls_policy_find(const struct relay_config *cfg, const char *domain)
{
	const struct cfg_tls_policy *best = NULL;
	size_t i, dlen, plen, blen = 0;

	if (domain == NULL)
		return NULL;
	dlen = strlen(domain);
	/* A linear scan: few entries, and no allocation per delivery. */
	for (i = 0; i < cfg->delivery.ntls_policies; i++) {
		const struct cfg_tls_policy *tp =
		    &cfg->delivery.tls_policies[i];

		if (!tp->subdomains) {
			if (str_ieq(tp->domain, domain))
				return tp;
			continue;
		}
		/* "a.example.org" is below "example.org"; it is not. */
		plen = strlen(tp->domain);
		if (dlen > plen + 1 && plen > blen &&
		    domain[dlen - plen - 1] == '.' &&
		    str_ieq(domain + dlen - plen, tp->domain)) {
			best = tp;
			blen = plen;
		}
	}
	return best;
}

/* cfg_default_hostname - gethostname(), or "localhost" if it is unusable */
static char *
cfg_default_hostname(void)
{
	char host[256];

	/*
	 * A default must never make a valid file fail to load, so a host
	 * name our own validator would reject falls back to "localhost".
	 */
	if (gethostname(host, sizeof host) != 0)
		return xstrdup("localhost");
	host[sizeof host - 1] = '\0';
	return xstrdup(cfg_hostname_valid(host) ? host : "localhost");
}

/* cfg_hostname_valid - RFC 1123 syntax: LDH labels of 1..63, total <= 253 */
static bool
cfg_hostname_valid(const char *s)
{
	size_t len = strlen(s), label = 0, i;

	if (len == 0 || len > 253)
		return false;
	for (i = 0; i < len; i++) {
		char c = s[i];

		if (c == '.') {
			if (label == 0 || s[i - 1] == '-')
				return false;
			label = 0;
			continue;
		}
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '-'))
			return false;
		if ((c == '-' && label == 0) || ++label > 63)
			return false;
	}
	/* A trailing dot or hyphen ends in an empty or malformed label. */
	return label > 0 && s[len - 1] != '-';
}

/* cfg_hash_valid - "$id$...$hash" with a known id and no stray bytes */
static bool
cfg_hash_valid(const char *s)
{
	const char *last;
	size_t i, dollars = 0;
	bool known = false;

	for (i = 0; i < ARRAY_SIZE(cfg_hash_ids); i++)
		if (strncmp(s, cfg_hash_ids[i], strlen(cfg_hash_ids[i])) == 0)
			known = true;
	if (!known)
		return false;
	/* crypt(3) output is printable ASCII without spaces or colons. */
	for (i = 0; s[i] != '\0'; i++) {
		if (s[i] <= ' ' || s[i] > '~' || s[i] == ':')
			return false;
		if (s[i] == '$')
			dollars++;
	}
	/* "$id$salt$hash" at least, and the hash part must not be empty. */
	last = strrchr(s, '$');
	return dollars >= 3 && last[1] != '\0';
}

/* cfg_addr_parse - numeric IPv4 or IPv6 into family and 4 or 16 bytes */
static bool
cfg_addr_parse(const char *s, int *family, uint8_t *out)
{
	memset(out, 0, 16);
	if (inet_pton(AF_INET, s, out) == 1) {
		*family = AF_INET;
		return true;
	}
	if (inet_pton(AF_INET6, s, out) == 1) {
		*family = AF_INET6;
		return true;
	}
	return false;
}

/* cfg_net_parse - 0, -EINVAL for bad syntax or -EDOM for host bits set */
static int
cfg_net_parse(const char *v, struct cfg_net *net)
{
	char text[INET6_ADDRSTRLEN + 8], *slash, *end;
	int max, k;
	long pfx;

	if (str_copy(text, v, sizeof text) >= sizeof text)
		return -EINVAL;
	if ((slash = strchr(text, '/')) != NULL)
		*slash++ = '\0';
	if (!cfg_addr_parse(text, &net->family, net->addr))
		return -EINVAL;
	max = net->family == AF_INET ? 32 : 128;
	net->prefix = max;
	if (slash != NULL) {
		/* Digits only: strtol would also take " 8", "+8" or "". */
		if (*slash < '0' || *slash > '9' || strlen(slash) > 3)
			return -EINVAL;
		pfx = strtol(slash, &end, 10);
		if (*end != '\0' || pfx > max)
			return -EINVAL;
		net->prefix = (int)pfx;
	}
	for (k = net->prefix; k < max; k++)
		if (net->addr[k / 8] & (0x80 >> (k % 8)))
			return -EDOM;
	/* ::ffff:0:0/96 and longer are IPv4 networks in disguise. */
	if (net->family == AF_INET6 && net->prefix >= 96 &&
	    IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)(void *)net->addr)) {
		net->family = AF_INET;
		memmove(net->addr, net->addr + 12, 4);
		memset(net->addr + 4, 0, 12);
		net->prefix -= 96;
	}
	return 0;
}

/* cfg_apply - check every member of group g against scope, store at base */
static int
cfg_apply(struct cfg_parse *p, const config_setting_t *g, const char *scope,
    void *base)
{
	int i, n = config_setting_length(g), rc;
	size_t k;

	for (i = 0; i < n; i++) {
		const config_setting_t *s = config_setting_get_elem(g,
		    (unsigned int)i);
		const char *name = config_setting_name(s);

		/* A linear scan: ~80 entries, once per load. */
		for (k = 0; k < ARRAY_SIZE(cfg_keys); k++)
			if (strcmp(cfg_keys[k].key, name) == 0 &&
			    (scope == NULL ? cfg_keys[k].scope == NULL :
			    cfg_keys[k].scope != NULL &&
			    strcmp(cfg_keys[k].scope, scope) == 0))
				break;
		if (k == ARRAY_SIZE(cfg_keys)) {
			if (scope == NULL)
				return cfg_fail(p, s, "unknown setting '%s'",
				    name);
			return cfg_fail(p, s, "unknown setting '%s' in '%s'",
			    name, scope);
		}
		if ((rc = cfg_value(p, s, &cfg_keys[k], base)) < 0)
			return rc;
	}
	return 0;
}

/* cfg_value - type- and range-check one setting and store it */
static int
cfg_value(struct cfg_parse *p, const config_setting_t *s,
    const struct cfg_key *k, void *base)
{
	/* Group and list entries have no storage of their own (off 0). */
	void *dst = (char *)base + k->off;
	int type = config_setting_type(s);
	bool isint = type == CONFIG_TYPE_INT || type == CONFIG_TYPE_INT64;
	const char *v = type == CONFIG_TYPE_STRING ?
	    config_setting_get_string(s) : NULL;
	char scope[64];
	long long n;
	double ms;
	size_t i;

	switch (k->kind) {
	case CFG_K_GROUP:
		if (type != CONFIG_TYPE_GROUP)
			return cfg_fail(p, s, "'%s' must be a group { ... }",
			    k->key);
		if (k->scope == NULL)
			return cfg_apply(p, s, k->key, base);
		/* Nested: "delivery.timeouts" is not the top-level one. */
		snprintf(scope, sizeof scope, "%s.%s", k->scope, k->key);
		return cfg_apply(p, s, scope, base);
	case CFG_K_OTHER:
		return 0;
	case CFG_K_STR:
	case CFG_K_STR0:
		if (v == NULL)
			return cfg_fail(p, s, "'%s' must be a string", k->key);
		if (*v == '\0' && k->kind == CFG_K_STR)
			return cfg_fail(p, s, "'%s' must not be empty", k->key);
		free(*(char **)dst);
		*(char **)dst = *v == '\0' ? NULL : xstrdup(v);
		return 0;
	case CFG_K_BOOL:
		if (type != CONFIG_TYPE_BOOL)
			return cfg_fail(p, s, "'%s' must be a boolean (true or "
			    "false)", k->key);
		*(bool *)dst = config_setting_get_bool(s) != 0;
		return 0;
	case CFG_K_INT:
	case CFG_K_U64:
		if (!isint)
			return cfg_fail(p, s, "'%s' must be an integer",
			    k->key);
		n = config_setting_get_int64(s);
		if (n < k->lo || n > k->hi)
			return cfg_fail(p, s, "'%s' must be between %lld and "
			    "%lld", k->key, k->lo, k->hi);
		/* Every CFG_K_INT range fits an int, so this cannot wrap. */
		if (k->kind == CFG_K_INT)
			*(int *)dst = (int)n;
		else
			*(uint64_t *)dst = (uint64_t)n;
		return 0;
	case CFG_K_MS:
	case CFG_K_MS64:
	case CFG_K_SEC:
		if (type == CONFIG_TYPE_FLOAT)
			ms = config_setting_get_float(s) * 1000.0;
		else if (isint)
			ms = (double)config_setting_get_int64(s) * 1000.0;
		else
			return cfg_fail(p, s, "'%s' must be a number of "
			    "seconds", k->key);
		/* Written negated so that NaN fails too. */
		if (!(ms >= (double)k->lo && ms <= (double)k->hi))
			return cfg_fail(p, s, "'%s' must be between %.10g and "
			    "%.10g seconds", k->key, (double)k->lo / 1000.0,
			    (double)k->hi / 1000.0);
		/* Round, so that 0.1 s is 100 ms and not 99.99999. */
		n = (long long)(ms + 0.5);
		if (k->kind == CFG_K_MS64)
			*(uint64_t *)dst = (uint64_t)n;
		else
			*(int *)dst = (int)(k->kind == CFG_K_MS ? n :
			    (n + 500) / 1000);
		return 0;
	case CFG_K_FRAC:
		/* ms is the plain value here; lo and hi are thousandths. */
		if (type == CONFIG_TYPE_FLOAT)
			ms = config_setting_get_float(s);
		else if (isint)
			ms = (double)config_setting_get_int64(s);
		else
			return cfg_fail(p, s, "'%s' must be a number", k->key);
		if (!(ms >= (double)k->lo / 1000.0 &&
		    ms <= (double)k->hi / 1000.0))
			return cfg_fail(p, s, "'%s' must be between %g and %g",
			    k->key, (double)k->lo / 1000.0,
			    (double)k->hi / 1000.0);
		*(double *)dst = ms;
		return 0;
	case CFG_K_MODE:
		/* A string, because libconfig has no octal: 0600 means 600. */
		for (i = 0; v != NULL && v[i] >= '0' && v[i] <= '7'; i++)
			;
		if (v == NULL || v[i] != '\0' || i == 0 || i > 4 ||
		    strtol(v, NULL, 8) > k->hi)
			return cfg_fail(p, s, "'%s' must be an octal string "
			    "from \"0000\" to \"0777\", such as \"0600\"",
			    k->key);
		*(int *)dst = (int)strtol(v, NULL, 8);
		return 0;
	case CFG_K_TLS:
		for (i = 0; v != NULL && i < ARRAY_SIZE(cfg_tls_names); i++)
			if (strcmp(v, cfg_tls_names[i]) == 0) {
				*(enum cfg_tls_mode *)dst = i;
				return 0;
			}
		return cfg_fail(p, s, "'%s' must be one of \"none\", "
		    "\"starttls\" or \"implicit\"", k->key);
	case CFG_K_DLV_TLS:
		for (i = 0; v != NULL && i < ARRAY_SIZE(cfg_dlv_tls_names);
		    i++)
			if (strcmp(v, cfg_dlv_tls_names[i]) == 0) {
				*(int *)dst = (int)i;
				return 0;
			}
		return cfg_fail(p, s, "'%s' must be one of \"none\", "
		    "\"opportunistic\", \"required\" or \"verify\"", k->key);
	case CFG_K_CLASS:
		/* "ok" is no class a failure can have. */
		for (i = CFG_CLASS_OK + 1; v != NULL &&
		    i < ARRAY_SIZE(cfg_class_names); i++)
			if (strcmp(v, cfg_class_names[i]) == 0) {
				*(int *)dst = (int)i;
				return 0;
			}
		return cfg_fail(p, s, "'%s' must be one of \"throttle\", "
		    "\"suspend\", \"greylist\", \"rcpt-temp\", \"msg-temp\", "
		    "\"permanent\", \"conn-fail\" or \"msgs-per-conn\"",
		    k->key);
	case CFG_K_PHASES:
		*(unsigned int *)dst = 0;
		if (v != NULL)
			return cfg_phase_name(p, s, (unsigned int *)dst);
		if (!config_setting_is_array(s) || config_setting_length(s) == 0)
			return cfg_fail(p, s, "'%s' must be a phase name or a "
			    "non-empty array of them", k->key);
		for (i = 0; i < (size_t)config_setting_length(s); i++) {
			const config_setting_t *e = config_setting_get_elem(s,
			    (unsigned int)i);
			int rc = cfg_phase_name(p, e, (unsigned int *)dst);

			if (rc < 0)
				return rc;
		}
		return 0;
	case CFG_K_RATE:
		/* ms is messages per hour here, as are lo and hi. */
		if (v == NULL || !cfg_rate_parse(v, &ms))
			return cfg_fail(p, s, "'%s' must be a rate \"N/s\", "
			    "\"N/min\" or \"N/h\" with N a positive number, "
			    "such as \"100/s\" or \"20/min\"", k->key);
		if (!(ms >= (double)k->lo && ms <= (double)k->hi))
			return cfg_fail(p, s, "'%s' must be between %lld/h and "
			    "%lld/s", k->key, k->lo, k->hi / 3600);
		*(double *)dst = ms / 3600.0;
		return 0;
	}
	/* Only a new kind added to the table without a case gets here. */
	relay_panic("cfg_value: kind %d", (int)k->kind);
}

/* cfg_seq - optional list ( ... ) or array [ ... ] *out, NULL if absent */
static int
cfg_seq(struct cfg_parse *p, const config_setting_t *parent, const char *key,
    config_setting_t **out)
{
	config_setting_t *s;

	*out = NULL;
	if (parent == NULL || (s = config_setting_get_member(parent, key)) ==
	    NULL)
		return 0;
	if (!config_setting_is_list(s) && !config_setting_is_array(s))
		return cfg_fail(p, s, "'%s' must be a list ( ... ) or [ ... ]",
		    key);
	*out = s;
	return 0;
}

/* cfg_parse_root - the schema walk, then lists and cross-key checks */
static int
cfg_parse_root(struct cfg_parse *p, const config_setting_t *root)
{
	struct relay_config *cfg = p->cfg;
	const config_setting_t *g;
	config_setting_t *s;
	int rc;

	if ((rc = cfg_apply(p, root, NULL, cfg)) < 0)
		return rc;
	/* The gethostname() default was checked already; this is the file's. */
	if (!cfg_hostname_valid(cfg->hostname))
		return cfg_fail(p, config_setting_get_member(root, "hostname"),
		    "hostname '%s' is not a valid domain name", cfg->hostname);

	if ((rc = cfg_seq(p, root, "listeners", &s)) < 0)
		return rc;
	if (s == NULL)
		return cfg_fail(p, NULL, "'listeners' is required: define at "
		    "least one listener");
	if ((rc = cfg_parse_listeners(p, s)) < 0)
		return rc;
	if ((rc = cfg_seq(p, root, "users", &s)) < 0 ||
	    (s != NULL && (rc = cfg_parse_users(p, s)) < 0))
		return rc;
	if ((rc = cfg_seq(p, root, "relay_networks", &s)) < 0 ||
	    (s != NULL && (rc = cfg_parse_nets(p, s)) < 0))
		return rc;
	g = config_setting_get_member(root, "log");
	if ((rc = cfg_seq(p, g, "trace", &s)) < 0 ||
	    (s != NULL && (rc = cfg_parse_trace(p, s)) < 0))
		return rc;
	g = config_setting_get_member(root, "dns");
	if ((rc = cfg_seq(p, g, "servers", &s)) < 0 ||
	    (s != NULL && (rc = cfg_parse_servers(p, s)) < 0))
		return rc;
	if ((rc = cfg_parse_delivery(p, root)) < 0)
		return rc;
	if ((rc = cfg_seq(p, root, "reply_rules", &s)) < 0 ||
	    (s != NULL && (rc = cfg_parse_rules(p, s)) < 0))
		return rc;
	/* After delivery: its limits are shaping.default's defaults. */
	if ((rc = cfg_parse_shaping(p, root)) < 0)
		return rc;

	/*
	 * max_connections_per_ip may not exceed max_connections. Its default
	 * (50) follows a small max_connections down instead of making
	 * "max_connections = 10;" alone an error.
	 */
	return cfg_cap(p, root, "limits", "max_connections_per_ip",
	    &cfg->limits.max_connections_per_ip, cfg->limits.max_connections,
	    "max_connections");
}

/*
 * cfg_cap - *v may not exceed max (the value of maxkey). A value set in
 * group of the file is an error naming its line; a default above max
 * follows it down.
 */
static int
cfg_cap(struct cfg_parse *p, const config_setting_t *root, const char *group,
    const char *key, int *v, int max, const char *maxkey)
{
	const config_setting_t *g;

	if (*v <= max)
		return 0;
	g = config_setting_get_member(root, group);
	if (g != NULL && (g = config_setting_get_member(g, key)) != NULL)
		return cfg_fail(p, g, "'%s' (%d) must not exceed %s (%d)", key,
		    *v, maxkey, max);
	*v = max;
	return 0;
}

/* cfg_parse_delivery - what the delivery walk left: lists, cross checks */
static int
cfg_parse_delivery(struct cfg_parse *p, const config_setting_t *root)
{
	struct relay_config *cfg = p->cfg;
	const config_setting_t *g = config_setting_get_member(root,
	    "delivery");
	config_setting_t *s;
	size_t i;
	int rc;

	if (g != NULL &&
	    (s = config_setting_get_member(g, "source_address")) != NULL &&
	    (rc = cfg_parse_source(p, s)) < 0)
		return rc;
	/* The same rule as hostname, which is what an unset helo means. */
	if (cfg->delivery.helo != NULL &&
	    !cfg_hostname_valid(cfg->delivery.helo))
		return cfg_fail(p, config_setting_get_member(g, "helo"),
		    "helo '%s' is not a valid domain name", cfg->delivery.helo);
	if ((rc = cfg_seq(p, g, "retry_schedule", &s)) < 0)
		return rc;
	if (s != NULL) {
		if ((rc = cfg_parse_retry(p, s)) < 0)
			return rc;
	} else {
		/* The default follows a larger min_retry up, as per_ip does. */
		for (i = 0; i < cfg->delivery.nretry; i++)
			if (cfg->delivery.retry_schedule_s[i] <
			    cfg->delivery.min_retry_s)
				cfg->delivery.retry_schedule_s[i] =
				    cfg->delivery.min_retry_s;
	}
	if ((rc = cfg_seq(p, g, "tls_policies", &s)) < 0 ||
	    (s != NULL && (rc = cfg_parse_policies(p, s)) < 0) ||
	    (rc = cfg_check_ca(p, g, s)) < 0)
		return rc;
	/* A warning at or after the bounce would never be sent. */
	if (cfg->delivery.delay_warning_s != 0 &&
	    cfg->delivery.delay_warning_s >=
	    cfg->delivery.max_queue_lifetime_s)
		return cfg_fail(p, config_setting_get_member(g,
		    "delay_warning"), "'delay_warning' (%d) must be less than "
		    "max_queue_lifetime (%d), or 0",
		    cfg->delivery.delay_warning_s,
		    cfg->delivery.max_queue_lifetime_s);
	return cfg_cap(p, root, "delivery", "max_connections_per_domain",
	    &cfg->delivery.max_connections_per_domain,
	    cfg->delivery.max_connections, "max_connections");
}

/* cfg_parse_source - delivery.source_address: numeric address or "" */
static int
cfg_parse_source(struct cfg_parse *p, const config_setting_t *s)
{
	struct relay_config *cfg = p->cfg;
	struct sockaddr_storage *ss = &cfg->delivery.source;
	uint8_t addr[16];
	const char *v;
	int family;

	if (config_setting_type(s) != CONFIG_TYPE_STRING)
		return cfg_fail(p, s, "'source_address' must be a string");
	v = config_setting_get_string(s);
	memset(ss, 0, sizeof *ss);
	cfg->delivery.has_source = false;
	if (*v == '\0')
		return 0;
	if (!cfg_addr_parse(v, &family, addr))
		return cfg_fail(p, s, "'source_address' must be a numeric IPv4 "
		    "or IPv6 address or \"\", not '%s'", v);
	if (family == AF_INET) {
		struct sockaddr_in *sin = (void *)ss;

		sin->sin_family = AF_INET;
		memcpy(&sin->sin_addr, addr, 4);
	} else {
		struct sockaddr_in6 *sin6 = (void *)ss;

		sin6->sin6_family = AF_INET6;
		memcpy(&sin6->sin6_addr, addr, 16);
	}
	cfg->delivery.has_source = true;
	return 0;
}

/*
 * cfg_parse_retry - delivery.retry_schedule: 1..CFG_MAX_RETRIES delays in
 * seconds (int or float, rounded), each >= min_retry and none shorter than
 * the one before. Replaces the default.
 */
static int
cfg_parse_retry(struct cfg_parse *p, const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	size_t i, n = (size_t)config_setting_length(list);
	double ms;
	int *d;

	if (n == 0 || n > CFG_MAX_RETRIES)
		return cfg_fail(p, list, "'retry_schedule' must hold 1 to %d "
		    "delays", CFG_MAX_RETRIES);
	/* Swapped in up front so cfg_free() has one array to free. */
	free(cfg->delivery.retry_schedule_s);
	cfg->delivery.retry_schedule_s = d = xcalloc(n, sizeof *d);
	cfg->delivery.nretry = n;
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		int type = config_setting_type(e);

		if (type == CONFIG_TYPE_FLOAT)
			ms = config_setting_get_float(e) * 1000.0;
		else if (type == CONFIG_TYPE_INT || type == CONFIG_TYPE_INT64)
			ms = (double)config_setting_get_int64(e) * 1000.0;
		else
			return cfg_fail(p, e, "'retry_schedule' entries must "
			    "be numbers of seconds");
		if (!(ms >= 1000.0 && ms <= (double)CFG_MAX_QUEUE_MS))
			return cfg_fail(p, e, "'retry_schedule' entries must "
			    "be between 1 and %lld seconds",
			    CFG_MAX_QUEUE_MS / 1000);
		d[i] = (int)(((long long)(ms + 0.5) + 500) / 1000);
		if (d[i] < cfg->delivery.min_retry_s)
			return cfg_fail(p, e, "retry_schedule entry %zu (%d) is "
			    "shorter than min_retry (%d)", i + 1, d[i],
			    cfg->delivery.min_retry_s);
		if (i > 0 && d[i] < d[i - 1])
			return cfg_fail(p, e, "retry_schedule entry %zu (%d) is "
			    "shorter than the one before it (%d); the delays "
			    "must not decrease", i + 1, d[i], d[i - 1]);
	}
	return 0;
}

/*
 * cfg_parse_policies - delivery.tls_policies: up to CFG_MAX_TLS_POLICIES
 * { domain, tls } groups, both required. "example.com" is that domain
 * only, ".example.com" every domain below it; domains are lower-cased and
 * no two entries may be alike.
 */
static int
cfg_parse_policies(struct cfg_parse *p, const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	size_t i, j, n = (size_t)config_setting_length(list);
	int rc;

	if (n > CFG_MAX_TLS_POLICIES)
		return cfg_fail(p, list, "'tls_policies' may hold at most %d "
		    "entries", CFG_MAX_TLS_POLICIES);
	/* Counted up front so cfg_free() copes with a half-filled array. */
	cfg->delivery.tls_policies = xcalloc(n == 0 ? 1 : n,
	    sizeof *cfg->delivery.tls_policies);
	cfg->delivery.ntls_policies = n;
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		struct cfg_tls_policy *tp = &cfg->delivery.tls_policies[i];
		char *c;

		if (!config_setting_is_group(e))
			return cfg_fail(p, e, "'tls_policies' entries must be "
			    "groups { ... }");
		tp->tls = -1;
		if ((rc = cfg_apply(p, e, "delivery.tls_policies", tp)) < 0)
			return rc;
		if (tp->domain == NULL)
			return cfg_fail(p, e, "tls policy is missing 'domain'");
		if (tp->domain[0] == '.') {
			tp->subdomains = true;
			memmove(tp->domain, tp->domain + 1,
			    strlen(tp->domain));
		}
		if (!cfg_hostname_valid(tp->domain))
			return cfg_fail(p, config_setting_get_member(e,
			    "domain"), "tls policy domain '%s%s' is not a "
			    "domain name or .domain", tp->subdomains ? "." : "",
			    tp->domain);
		/* DNS names compare without case; lookups do too. */
		for (c = tp->domain; *c != '\0'; c++)
			if (*c >= 'A' && *c <= 'Z')
				*c = (char)(*c - 'A' + 'a');
		if (tp->tls < 0)
			return cfg_fail(p, e, "tls policy for '%s%s' is missing "
			    "'tls'", tp->subdomains ? "." : "", tp->domain);
		/* Alike entries could only mean the later one is a typo. */
		for (j = 0; j < i; j++)
			if (cfg->delivery.tls_policies[j].subdomains ==
			    tp->subdomains &&
			    strcmp(cfg->delivery.tls_policies[j].domain,
			    tp->domain) == 0)
				return cfg_fail(p, e, "tls policy for '%s%s' is "
				    "defined twice", tp->subdomains ? "." : "",
				    tp->domain);
	}
	return 0;
}

/*
 * cfg_check_ca - when delivery.tls or a policy (list, may be NULL) is
 * "verify", delivery.ca_file must be a readable regular file now, rather
 * than every verified delivery failing later. The error names ca_file's
 * line if the file sets it, else the line that asked for "verify".
 */
static int
cfg_check_ca(struct cfg_parse *p, const config_setting_t *g,
    const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	const config_setting_t *at = NULL;
	size_t i;

	if (cfg->delivery.tls == CFG_DLV_TLS_VERIFY)
		at = config_setting_get_member(g, "tls");
	else {
		for (i = 0; i < cfg->delivery.ntls_policies; i++)
			if (cfg->delivery.tls_policies[i].tls ==
			    CFG_DLV_TLS_VERIFY)
				break;
		if (i == cfg->delivery.ntls_policies)
			return 0;
		at = config_setting_get_member(config_setting_get_elem(list,
		    (unsigned int)i), "tls");
	}
	return cfg_check_ca_file(p, g, at);
}

/*
 * cfg_check_ca_file - delivery.ca_file must be a readable regular file,
 * since the setting at (a tls = "verify"; may be NULL) needs it. g is the
 * delivery group (may be NULL).
 */
static int
cfg_check_ca_file(struct cfg_parse *p, const config_setting_t *g,
    const config_setting_t *at)
{
	struct relay_config *cfg = p->cfg;
	const config_setting_t *ca;
	const char *why = NULL;
	struct stat st;
	int fd;

	/* O_NONBLOCK: a FIFO given by mistake must not hang the load. */
	fd = open(cfg->delivery.ca_file, O_RDONLY | O_NONBLOCK | O_NOCTTY |
	    O_CLOEXEC);
	if (fd < 0)
		why = strerror(errno);
	else if (fstat(fd, &st) != 0)
		why = strerror(errno);
	else if (!S_ISREG(st.st_mode))
		why = "not a regular file";
	if (fd >= 0)
		close(fd);
	if (why == NULL)
		return 0;
	if (g != NULL && (ca = config_setting_get_member(g, "ca_file")) !=
	    NULL)
		at = ca;
	return cfg_fail(p, at, "ca_file '%s' cannot be read (%s); tls "
	    "\"verify\" needs a CA bundle", cfg->delivery.ca_file, why);
}

/* cfg_phase_name - OR the phase named by string setting s into *mask */
static int
cfg_phase_name(struct cfg_parse *p, const config_setting_t *s,
    unsigned int *mask)
{
	const char *v = config_setting_type(s) == CONFIG_TYPE_STRING ?
	    config_setting_get_string(s) : NULL;
	size_t i;

	if (v != NULL && strcmp(v, "any") == 0) {
		*mask |= CFG_PHASE_ANY;
		return 0;
	}
	for (i = 0; v != NULL && i < ARRAY_SIZE(cfg_phase_names); i++)
		if (strcmp(v, cfg_phase_names[i]) == 0) {
			*mask |= 1u << i;
			return 0;
		}
	return cfg_fail(p, s, "'phase' must be \"any\" or one of \"connect\", "
	    "\"banner\", \"ehlo\", \"starttls\", \"mail\", \"rcpt\", "
	    "\"data\", \"dot\", \"rset\", \"quit\" (or an array of them)");
}

/*
 * cfg_parse_rules - reply_rules: up to CFG_MAX_REPLY_RULES groups, kept in
 * file order (the classifier tries them in turn), names unique.
 */
static int
cfg_parse_rules(struct cfg_parse *p, const config_setting_t *list)
{
	struct cfg_reply_rules *rules = &p->cfg->reply_rules;
	size_t i, j, n = (size_t)config_setting_length(list);
	int rc;

	if (n > CFG_MAX_REPLY_RULES)
		return cfg_fail(p, list, "'reply_rules' may hold at most %d "
		    "rules", CFG_MAX_REPLY_RULES);
	/* Counted up front so cfg_free() copes with a half-filled array. */
	rules->v = xcalloc(n == 0 ? 1 : n, sizeof *rules->v);
	rules->n = n;
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);

		if ((rc = cfg_parse_rule(p, e, i)) < 0)
			return rc;
		/* Logs name the rule that decided; two alike would lie. */
		for (j = 0; j < i; j++)
			if (strcmp(rules->v[j].name, rules->v[i].name) == 0)
				return cfg_fail(p, e, "reply rule name '%s' is "
				    "used twice", rules->v[i].name);
	}
	return 0;
}

/*
 * cfg_parse_rule - one { name, code, enhanced, phase, text, class,
 * suspend } group: class is required, and at least one of code, enhanced
 * and text, since a rule matching every failure would hide the rest.
 */
static int
cfg_parse_rule(struct cfg_parse *p, const config_setting_t *e, size_t i)
{
	struct cfg_reply_rule *r = &p->cfg->reply_rules.v[i];
	char rerr[256];
	const char *c;
	int rc;

	if (!config_setting_is_group(e))
		return cfg_fail(p, e, "'reply_rules' entries must be groups "
		    "{ ... }");
	r->phases = CFG_PHASE_ANY;
	r->cls = -1;
	if ((rc = cfg_apply(p, e, "reply_rules", r)) < 0)
		return rc;
	if (r->name == NULL)
		r->name = xasprintf("rule-%zu", i + 1);
	/* Names reach the logs, where control bytes forge lines. */
	for (c = r->name; *c != '\0'; c++)
		if ((unsigned char)*c <= ' ' || *c == 0x7f)
			return cfg_fail(p, config_setting_get_member(e, "name"),
			    "reply rule name '%s' must not contain spaces or "
			    "control characters", r->name);
	if (r->code != NULL && !cfg_code_valid(r->code))
		return cfg_fail(p, config_setting_get_member(e, "code"),
		    "reply rule '%s': 'code' must be a 4xx or 5xx reply code "
		    "such as \"421\", or a pattern such as \"45x\" or \"4xx\", "
		    "not '%s'", r->name, r->code);
	if (r->enh != NULL && !cfg_enh_valid(r->enh))
		return cfg_fail(p, config_setting_get_member(e, "enhanced"),
		    "reply rule '%s': 'enhanced' must be a 4.x.x or 5.x.x "
		    "status such as \"4.7.28\", or a prefix ending in a dot "
		    "such as \"4.7.\", not '%s'", r->name, r->enh);
	if (r->code != NULL && r->enh != NULL && r->code[0] != r->enh[0])
		return cfg_fail(p, config_setting_get_member(e, "enhanced"),
		    "reply rule '%s' can never match: code %s with enhanced "
		    "status %s", r->name, r->code, r->enh);
	if (r->code == NULL && r->enh == NULL && r->text == NULL)
		return cfg_fail(p, e, "reply rule '%s' would match every "
		    "failure: give at least one of 'code', 'enhanced' and "
		    "'text'", r->name);
	if (r->cls < 0)
		return cfg_fail(p, e, "reply rule '%s' is missing 'class'",
		    r->name);
	if (r->suspend_s != 0 && r->cls != CFG_CLASS_SUSPEND)
		return cfg_fail(p, config_setting_get_member(e, "suspend"),
		    "reply rule '%s': 'suspend' is only for class \"suspend\"",
		    r->name);
	if (r->text != NULL && config_regex_compile(r->text, &r->re, rerr,
	    sizeof rerr) < 0)
		return cfg_fail(p, config_setting_get_member(e, "text"),
		    "reply rule '%s': 'text' is not a valid regex: %s",
		    r->name, rerr);
	return 0;
}

/* cfg_code_valid - "421", "45x", "4xx" (X lower-cased in place) */
static bool
cfg_code_valid(char *v)
{
	size_t i;

	if (strlen(v) != 3 || (v[0] != '4' && v[0] != '5'))
		return false;
	for (i = 1; i < 3; i++) {
		if (v[i] == 'X')
			v[i] = 'x';
		if (v[i] == 'x')
			continue;
		/* A digit after an x ("4x1") is no prefix. */
		if (v[i] < '0' || v[i] > '9' || v[i - 1] == 'x')
			return false;
	}
	return true;
}

/*
 * cfg_enh_valid - class "." [subject "." [detail]], RFC 3463 numbers of
 * 1..3 digits: "4.7.28" exactly, or a prefix ending in a dot ("4.", "4.7.")
 */
static bool
cfg_enh_valid(const char *v)
{
	size_t field, n;

	if ((v[0] != '4' && v[0] != '5') || v[1] != '.')
		return false;
	v += 2;
	for (field = 0; field < 2 && *v != '\0'; field++) {
		for (n = 0; v[n] >= '0' && v[n] <= '9'; n++)
			;
		if (n == 0 || n > 3)
			return false;
		v += n;
		if (field == 0 && *v++ != '.')
			return false;
	}
	return *v == '\0';
}

/* config_regex_compile - PCRE2 with CFG_REGEX_OPTIONS, then JIT if we can */
int
config_regex_compile(const char *pattern, struct pcre2_real_code_8 **out,
    char *err, size_t errlen)
{
	PCRE2_UCHAR msg[256];
	PCRE2_SIZE off;
	pcre2_code *re;
	int ec;

	*out = NULL;
	re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED,
	    CFG_REGEX_OPTIONS, &ec, &off, NULL);
	if (re == NULL) {
		if (pcre2_get_error_message(ec, msg, sizeof msg) < 0)
			str_copy((char *)msg, "unknown error", sizeof msg);
		if (err != NULL && errlen > 0)
			snprintf(err, errlen, "%s at offset %zu", (char *)msg,
			    (size_t)off);
		return RELAY_ECONFIG;
	}
	/*
	 * Without JIT (not built in, or no executable memory allowed)
	 * pcre2_match() interprets the pattern: slower, same answers.
	 */
	(void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
	*out = re;
	return 0;
}

/* config_class_name - the enum cfg_class name used in files and logs */
const char *
config_class_name(int cls)
{
	return cls >= 0 && cls < CFG_CLASS_LAST ? cfg_class_names[cls] : "?";
}

/* cfg_parse_listeners - every element, then no two on one address:port */
static int
cfg_parse_listeners(struct cfg_parse *p, const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	size_t i, j, n = (size_t)config_setting_length(list);
	uint8_t a[16], b[16];
	int fa, fb, rc;

	if (n == 0)
		return cfg_fail(p, list, "'listeners' must hold at least one "
		    "listener");
	/* Counted up front so cfg_free() copes with a half-filled array. */
	cfg->listeners = xcalloc(n, sizeof *cfg->listeners);
	cfg->nlisteners = n;
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		struct cfg_listener *l = &cfg->listeners[i];

		if ((rc = cfg_parse_listener(p, e, l)) < 0)
			return rc;
		(void)cfg_addr_parse(l->address, &fa, a);
		for (j = 0; j < i; j++) {
			const struct cfg_listener *o = &cfg->listeners[j];

			/* Compare bytes: "::1" and "0::1" are one address. */
			(void)cfg_addr_parse(o->address, &fb, b);
			if (o->port == l->port && fa == fb &&
			    memcmp(a, b, sizeof a) == 0)
				return cfg_fail(p, e, "listener '%s' uses the "
				    "same address and port as '%s' (%s port "
				    "%d)", l->name, o->name, l->address,
				    l->port);
			/* Logs and relayctl name listeners; keep it unique. */
			if (strcmp(o->name, l->name) == 0)
				return cfg_fail(p, e, "listener name '%s' is "
				    "used twice", l->name);
		}
	}
	return 0;
}

/* cfg_parse_listener - one { name, address, port, tls, auth_required } */
static int
cfg_parse_listener(struct cfg_parse *p, const config_setting_t *e,
    struct cfg_listener *l)
{
	uint8_t addr[16];
	int family, rc;

	if (!config_setting_is_group(e))
		return cfg_fail(p, e, "'listeners' entries must be groups "
		    "{ ... }");
	l->tls = CFG_TLS_STARTTLS;
	l->auth_required = true;
	if ((rc = cfg_apply(p, e, "listeners", l)) < 0)
		return rc;
	/* Required: a silent default of "all interfaces" would surprise. */
	if (l->address == NULL)
		return cfg_fail(p, e, "listener is missing 'address'");
	if (!cfg_addr_parse(l->address, &family, addr))
		return cfg_fail(p, config_setting_get_member(e, "address"),
		    "'address' must be a numeric IPv4 or IPv6 address, not "
		    "'%s'", l->address);
	if (l->port == 0)
		return cfg_fail(p, e, "listener is missing 'port'");
	if (l->name == NULL)
		l->name = xasprintf("%s:%d", l->address, l->port);
	/*
	 * tls != none needs a certificate and key. tls.certificate and
	 * tls.key always hold a path (default or given), so nothing is left
	 * to check here; whether the files exist is for tls/ to say.
	 */
	return 0;
}

/* cfg_parse_users - { name, password_hash } entries, names unique */
static int
cfg_parse_users(struct cfg_parse *p, const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	size_t i, j, n = (size_t)config_setting_length(list);
	int rc;

	cfg->users = xcalloc(n, sizeof *cfg->users);
	cfg->nusers = n;
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		struct cfg_user *u = &cfg->users[i];
		const char *c;

		if (!config_setting_is_group(e))
			return cfg_fail(p, e, "'users' entries must be groups "
			    "{ ... }");
		if ((rc = cfg_apply(p, e, "users", u)) < 0)
			return rc;
		if (u->name == NULL)
			return cfg_fail(p, e, "user is missing 'name'");
		/* Names reach the logs, where control bytes forge lines. */
		for (c = u->name; *c != '\0'; c++)
			if ((unsigned char)*c <= ' ' || *c == 0x7f)
				return cfg_fail(p, config_setting_get_member(e,
				    "name"), "user name '%s' must not contain "
				    "spaces or control characters", u->name);
		if (u->hash == NULL)
			return cfg_fail(p, e, "user '%s' is missing "
			    "'password_hash'", u->name);
		if (!cfg_hash_valid(u->hash))
			return cfg_fail(p, config_setting_get_member(e,
			    "password_hash"), "password_hash must be a "
			    "crypt(3) hash such as $6$... or $y$...; generate "
			    "one with: openssl passwd -6");
		for (j = 0; j < i; j++)
			if (strcmp(cfg->users[j].name, u->name) == 0)
				return cfg_fail(p, e, "user '%s' is defined "
				    "twice", u->name);
	}
	return 0;
}

/* cfg_parse_nets - the relay_networks list; errors name the bad value */
static int
cfg_parse_nets(struct cfg_parse *p, const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	size_t i, n = (size_t)config_setting_length(list);

	cfg->relay_nets = xcalloc(n, sizeof *cfg->relay_nets);
	cfg->nrelay_nets = n;
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		struct cfg_net *net = &cfg->relay_nets[i];
		char fix[INET6_ADDRSTRLEN];
		const char *v;
		int k, rc;

		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			return cfg_fail(p, e, "'relay_networks' entries must "
			    "be strings");
		v = config_setting_get_string(e);
		if ((rc = cfg_net_parse(v, net)) == -EINVAL)
			return cfg_fail(p, e, "relay network '%s' is not an "
			    "address or CIDR such as 192.0.2.0/24 or "
			    "2001:db8::/32", v);
		if (rc == -EDOM) {
			/* Suggest the network the operator probably meant. */
			for (k = net->prefix; k < 128; k++)
				net->addr[k / 8] &= (uint8_t)~(0x80 >> (k % 8));
			inet_ntop(net->family, net->addr, fix, sizeof fix);
			return cfg_fail(p, e, "relay network '%s' has host "
			    "bits set; did you mean '%s/%d'?", v, fix,
			    net->prefix);
		}
	}
	return 0;
}

/* cfg_parse_trace - OR the named TRACE_* flags into cfg->log.trace */
static int
cfg_parse_trace(struct cfg_parse *p, const config_setting_t *list)
{
	int i, n = config_setting_length(list);
	size_t j;

	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		const char *v;

		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			return cfg_fail(p, e, "'trace' entries must be "
			    "strings");
		v = config_setting_get_string(e);
		for (j = 0; j < ARRAY_SIZE(cfg_trace_names); j++)
			if (strcmp(v, cfg_trace_names[j].name) == 0)
				break;
		if (j == ARRAY_SIZE(cfg_trace_names))
			return cfg_fail(p, e, "unknown trace flag '%s' (known: "
			    "smtp, io, spool, dns, dlv, state, all)", v);
		p->cfg->log.trace |= cfg_trace_names[j].flag;
	}
	return 0;
}

/*
 * cfg_server_parse - "addr", "addr:port", "[v6]" or "[v6]:port" into the
 * form c-ares's ares_set_servers_ports_csv() takes, port always written:
 * "192.0.2.1:53" or "[2001:db8::1]:53". 0 or -EINVAL.
 */
static int
cfg_server_parse(const char *v, char *out, size_t outlen)
{
	char host[INET6_ADDRSTRLEN + 2], canon[INET6_ADDRSTRLEN];
	const char *port = NULL, *close;
	uint8_t addr[16];
	size_t i, n;
	long pnum = 53;
	int family;

	if (v[0] == '[') {
		/* Brackets are for IPv6 only, as in URLs. */
		if ((close = strchr(v, ']')) == NULL ||
		    (n = (size_t)(close - v - 1)) >= sizeof host)
			return -EINVAL;
		memcpy(host, v + 1, n);
		host[n] = '\0';
		if (close[1] == ':')
			port = close + 2;
		else if (close[1] != '\0')
			return -EINVAL;
		if (inet_pton(AF_INET6, host, addr) != 1)
			return -EINVAL;
		family = AF_INET6;
	} else {
		/* One colon is "v4:port"; more is a bare IPv6 address. */
		const char *colon = strchr(v, ':');

		if (colon != NULL && strchr(colon + 1, ':') == NULL) {
			if ((n = (size_t)(colon - v)) >= sizeof host)
				return -EINVAL;
			memcpy(host, v, n);
			host[n] = '\0';
			port = colon + 1;
		} else if (str_copy(host, v, sizeof host) >= sizeof host)
			return -EINVAL;
		if (!cfg_addr_parse(host, &family, addr) ||
		    (family == AF_INET6 && port != NULL))
			return -EINVAL;
	}
	if (port != NULL) {
		/* Digits only, as for prefixes: no sign, space or empty. */
		for (i = 0; port[i] >= '0' && port[i] <= '9'; i++)
			;
		if (i == 0 || i > 5 || port[i] != '\0')
			return -EINVAL;
		pnum = strtol(port, NULL, 10);
		if (pnum < 1 || pnum > 65535)
			return -EINVAL;
	}
	inet_ntop(family, addr, canon, sizeof canon);
	if (family == AF_INET6)
		snprintf(out, outlen, "[%s]:%ld", canon, pnum);
	else
		snprintf(out, outlen, "%s:%ld", canon, pnum);
	return 0;
}

/* cfg_parse_servers - dns.servers: numeric addresses with optional port */
static int
cfg_parse_servers(struct cfg_parse *p, const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	size_t i, n = (size_t)config_setting_length(list);
	char norm[INET6_ADDRSTRLEN + 16];

	if (n > CFG_MAX_DNS_SERVERS)
		return cfg_fail(p, list, "'servers' may list at most %d "
		    "servers", CFG_MAX_DNS_SERVERS);
	cfg->dns.servers = xcalloc(n == 0 ? 1 : n, sizeof *cfg->dns.servers);
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		const char *v;

		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			return cfg_fail(p, e, "'servers' entries must be "
			    "strings");
		v = config_setting_get_string(e);
		/* Names would need a resolver to find the resolver. */
		if (cfg_server_parse(v, norm, sizeof norm) < 0)
			return cfg_fail(p, e, "DNS server '%s' must be a "
			    "numeric address, address:port or [IPv6]:port, "
			    "such as 127.0.0.1:53 or [::1]:53", v);
		cfg->dns.servers[i] = xstrdup(norm);
		cfg->dns.nservers = i + 1;
	}
	return 0;
}

/*
 * cfg_rate_parse - "N/s", "N/min" or "N/h", N digits with an optional
 * fraction ("0.5/s"), into messages per hour; false for anything else.
 * No sign, space, exponent or empty part: strtod would take all those.
 */
static bool
cfg_rate_parse(const char *v, double *per_h)
{
	char num[32];
	const char *slash = strchr(v, '/');
	size_t i, n, dots = 0;
	double x;

	if (slash == NULL || (n = (size_t)(slash - v)) == 0 ||
	    n >= sizeof num)
		return false;
	for (i = 0; i < n; i++) {
		if (v[i] == '.') {
			/* "1.", ".5" and "1.2.3" are not numbers we write. */
			if (++dots > 1 || i == 0 || i == n - 1)
				return false;
		} else if (v[i] < '0' || v[i] > '9')
			return false;
	}
	memcpy(num, v, n);
	num[n] = '\0';
	x = strtod(num, NULL);
	if (!(x > 0))
		return false;
	/* Multiplied, not divided, so that "1/h" is exactly 1 per hour. */
	if (strcmp(slash + 1, "s") == 0)
		*per_h = x * 3600.0;
	else if (strcmp(slash + 1, "min") == 0)
		*per_h = x * 60.0;
	else if (strcmp(slash + 1, "h") == 0)
		*per_h = x;
	else
		return false;
	return true;
}

/* cfg_shape_given - the CFG_SHAPE_* keys group g (may be NULL) holds */
static unsigned int
cfg_shape_given(const config_setting_t *g)
{
	unsigned int set = 0;
	size_t i;

	for (i = 0; g != NULL && i < ARRAY_SIZE(cfg_shape_bits); i++)
		if (config_setting_get_member(g, cfg_shape_bits[i].key) !=
		    NULL)
			set |= cfg_shape_bits[i].bit;
	return set;
}

/* cfg_shape_over - copy the fields set in src over dst, adding to dst->set */
static void
cfg_shape_over(struct cfg_shape *dst, const struct cfg_shape *src)
{
	if (src->set & CFG_SHAPE_MAX_CONN)
		dst->max_conn = src->max_conn;
	if (src->set & CFG_SHAPE_MIN_CONN)
		dst->min_conn = src->min_conn;
	if (src->set & CFG_SHAPE_MSGS)
		dst->max_msgs_per_conn = src->max_msgs_per_conn;
	if (src->set & CFG_SHAPE_RCPTS)
		dst->max_rcpts_per_txn = src->max_rcpts_per_txn;
	if (src->set & CFG_SHAPE_RATE)
		dst->rate = src->rate;
	if (src->set & CFG_SHAPE_MIN_RATE)
		dst->min_rate = src->min_rate;
	if (src->set & CFG_SHAPE_CONN_RATE)
		dst->conn_rate = src->conn_rate;
	if (src->set & CFG_SHAPE_TLS)
		dst->tls = src->tls;
	dst->set |= src->set;
}

/* cfg_shape_clamp - floors set above their set ceilings come down to them */
static void
cfg_shape_clamp(struct cfg_shape *sh)
{
	if ((sh->set & (CFG_SHAPE_MIN_CONN | CFG_SHAPE_MAX_CONN)) ==
	    (CFG_SHAPE_MIN_CONN | CFG_SHAPE_MAX_CONN) &&
	    sh->min_conn > sh->max_conn)
		sh->min_conn = sh->max_conn;
	if ((sh->set & (CFG_SHAPE_MIN_RATE | CFG_SHAPE_RATE)) ==
	    (CFG_SHAPE_MIN_RATE | CFG_SHAPE_RATE) && sh->min_rate > sh->rate)
		sh->min_rate = sh->rate;
}

/*
 * cfg_shape_check - a floor above its ceiling, both held by one entry, is
 * an error naming the floor's line when group e gives the floor; a floor
 * that is a default follows the ceiling down, as per_ip does. (A floor
 * above an inherited ceiling is lowered by config_shape_for().)
 */
static int
cfg_shape_check(struct cfg_parse *p, const config_setting_t *e,
    struct cfg_shape *sh)
{
	const config_setting_t *at;

	if ((sh->set & (CFG_SHAPE_MIN_CONN | CFG_SHAPE_MAX_CONN)) ==
	    (CFG_SHAPE_MIN_CONN | CFG_SHAPE_MAX_CONN) &&
	    sh->min_conn > sh->max_conn && e != NULL &&
	    (at = config_setting_get_member(e, "min_connections")) != NULL)
		return cfg_fail(p, at, "'min_connections' (%d) must not exceed "
		    "max_connections (%d)", sh->min_conn, sh->max_conn);
	if ((sh->set & (CFG_SHAPE_MIN_RATE | CFG_SHAPE_RATE)) ==
	    (CFG_SHAPE_MIN_RATE | CFG_SHAPE_RATE) &&
	    sh->min_rate > sh->rate && e != NULL &&
	    (at = config_setting_get_member(e, "min_rate")) != NULL)
		return cfg_fail(p, at, "'min_rate' (%g/s) must not exceed rate "
		    "(%g/s)", sh->min_rate, sh->rate);
	cfg_shape_clamp(sh);
	return 0;
}

/* cfg_lower - ASCII lower-case in place: DNS names compare without case */
static void
cfg_lower(char *s)
{
	for (; *s != '\0'; s++)
		if (*s >= 'A' && *s <= 'Z')
			*s = (char)(*s - 'A' + 'a');
}

/* cfg_provider_free - what a provider owns, not the struct itself */
static void
cfg_provider_free(struct cfg_provider *pv)
{
	size_t i;

	free(pv->name);
	for (i = 0; i < pv->nsuffixes; i++)
		free(pv->suffixes[i]);
	free(pv->suffixes);
	memset(pv, 0, sizeof *pv);
}

/* cfg_builtin_add - cfg_builtin_providers[] as the first providers */
static void
cfg_builtin_add(struct relay_config *cfg)
{
	size_t i, j, n = ARRAY_SIZE(cfg_builtin_providers);

	cfg->shaping.providers = xcalloc(n, sizeof *cfg->shaping.providers);
	for (i = 0; i < n; i++) {
		struct cfg_provider *pv = &cfg->shaping.providers[i];
		const char *const *sfx = cfg_builtin_providers[i].suffixes;

		pv->name = xstrdup(cfg_builtin_providers[i].name);
		pv->suffixes = xcalloc(ARRAY_SIZE(cfg_builtin_providers[i].
		    suffixes), sizeof *pv->suffixes);
		for (j = 0; j < ARRAY_SIZE(cfg_builtin_providers[i].suffixes) &&
		    sfx[j] != NULL; j++)
			pv->suffixes[j] = xstrdup(sfx[j]);
		pv->nsuffixes = j;
		pv->shape.tls = cfg_builtin_providers[i].tls;
		if (pv->shape.tls >= 0)
			pv->shape.set |= CFG_SHAPE_TLS;
		if ((pv->shape.max_conn = cfg_builtin_providers[i].max_conn) >
		    0)
			pv->shape.set |= CFG_SHAPE_MAX_CONN;
		if ((pv->shape.max_msgs_per_conn =
		    cfg_builtin_providers[i].max_msgs_per_conn) > 0)
			pv->shape.set |= CFG_SHAPE_MSGS;
		cfg->shaping.nproviders = i + 1;
	}
}

/*
 * cfg_parse_shaping - what the walk left of shaping: the defaults of
 * shaping.default from delivery, the providers (built-in, then merged with
 * the file's), the domains, and the CA bundle a tls "verify" there needs
 */
static int
cfg_parse_shaping(struct cfg_parse *p, const config_setting_t *root)
{
	struct relay_config *cfg = p->cfg;
	struct cfg_shape *df = &cfg->shaping.dflt;
	const config_setting_t *g = config_setting_get_member(root,
	    "shaping");
	const config_setting_t *d = g == NULL ? NULL :
	    config_setting_get_member(g, "default");
	const config_setting_t **at = NULL;
	config_setting_t *s;
	unsigned int given = cfg_shape_given(d);
	int rc;

	if (!(given & CFG_SHAPE_MAX_CONN))
		df->max_conn = cfg->delivery.max_connections_per_domain;
	if (!(given & CFG_SHAPE_MSGS))
		df->max_msgs_per_conn =
		    cfg->delivery.max_messages_per_connection;
	if (!(given & CFG_SHAPE_RCPTS))
		df->max_rcpts_per_txn =
		    cfg->delivery.max_recipients_per_transaction;
	/* Every field holds a value, tls only when given (else -1). */
	df->set = (CFG_SHAPE_ALL & ~CFG_SHAPE_TLS) | (given & CFG_SHAPE_TLS);
	if ((rc = cfg_shape_check(p, d, df)) < 0)
		return rc;

	if (cfg->shaping.builtin_providers)
		cfg_builtin_add(cfg);
	if ((rc = cfg_seq(p, g, "providers", &s)) < 0)
		return rc;
	/* at[i]: the file's entry for provider i, NULL for a built-in. */
	at = xcalloc(CFG_MAX_PROVIDERS, sizeof *at);
	if ((s != NULL && (rc = cfg_parse_providers(p, s, at)) < 0) ||
	    (rc = cfg_check_suffixes(p, at)) < 0)
		goto out;
	if ((rc = cfg_seq(p, g, "domains", &s)) < 0 ||
	    (s != NULL && (rc = cfg_parse_shape_domains(p, s)) < 0))
		goto out;
	rc = cfg_check_shape_ca(p, config_setting_get_member(root, "delivery"),
	    d, at, s);
out:
	free(at);
	return rc;
}

/*
 * cfg_parse_providers - shaping.providers: an entry named like a provider
 * already there (a built-in) is merged into it field by field, its
 * mx_suffixes (if given) replacing the built-in ones; any other is added
 * after them and needs mx_suffixes. No name twice in the file. at[k]
 * becomes the entry that set provider k.
 */
static int
cfg_parse_providers(struct cfg_parse *p, const config_setting_t *list,
    const config_setting_t **at)
{
	struct relay_config *cfg = p->cfg;
	size_t i, j, k, n = (size_t)config_setting_length(list);
	struct cfg_provider pv, *dst;
	const char *prev;
	bool has_sfx;
	int rc;

	if (n > CFG_MAX_PROVIDERS)
		return cfg_fail(p, list, "'providers' may hold at most %d "
		    "providers", CFG_MAX_PROVIDERS);
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);

		memset(&pv, 0, sizeof pv);
		if ((rc = cfg_parse_provider(p, e, &pv, &has_sfx)) < 0)
			goto fail;
		/* Earlier entries were checked, so each has its name. */
		for (j = 0; j < i; j++)
			if (config_setting_lookup_string(
			    config_setting_get_elem(list, (unsigned int)j),
			    "name", &prev) == CONFIG_TRUE &&
			    strcmp(prev, pv.name) == 0) {
				rc = cfg_fail(p, e, "provider '%s' is defined "
				    "twice", pv.name);
				goto fail;
			}
		for (k = 0; k < cfg->shaping.nproviders; k++)
			if (strcmp(cfg->shaping.providers[k].name, pv.name) ==
			    0)
				break;
		if (k < cfg->shaping.nproviders) {
			dst = &cfg->shaping.providers[k];
			cfg_shape_over(&dst->shape, &pv.shape);
			if (has_sfx) {
				for (j = 0; j < dst->nsuffixes; j++)
					free(dst->suffixes[j]);
				free(dst->suffixes);
				dst->suffixes = pv.suffixes;
				dst->nsuffixes = pv.nsuffixes;
				pv.suffixes = NULL;
				pv.nsuffixes = 0;
			}
			cfg_provider_free(&pv);
		} else {
			if (!has_sfx) {
				rc = cfg_fail(p, e, "provider '%s' is missing "
				    "'mx_suffixes' (it is no built-in provider "
				    "to inherit them from)", pv.name);
				goto fail;
			}
			if (k == CFG_MAX_PROVIDERS) {
				rc = cfg_fail(p, e, "more than %d providers, "
				    "built-in ones included",
				    CFG_MAX_PROVIDERS);
				goto fail;
			}
			cfg->shaping.providers = xrealloc(
			    cfg->shaping.providers,
			    (k + 1) * sizeof *cfg->shaping.providers);
			dst = &cfg->shaping.providers[k];
			*dst = pv;
			cfg->shaping.nproviders = k + 1;
		}
		at[k] = e;
		if ((rc = cfg_shape_check(p, e, &dst->shape)) < 0)
			return rc;
	}
	return 0;
fail:
	cfg_provider_free(&pv);
	return rc;
}

/*
 * cfg_parse_provider - one { name, mx_suffixes, <shape keys> } group into
 * pv, which the caller frees on failure; *has_sfx says mx_suffixes was
 * there (an empty list disables a built-in provider)
 */
static int
cfg_parse_provider(struct cfg_parse *p, const config_setting_t *e,
    struct cfg_provider *pv, bool *has_sfx)
{
	config_setting_t *s;
	const char *c;
	int rc;

	*has_sfx = false;
	if (!config_setting_is_group(e))
		return cfg_fail(p, e, "'providers' entries must be groups "
		    "{ ... }");
	pv->shape.tls = -1;
	if ((rc = cfg_apply(p, e, "shaping.providers", pv)) < 0)
		return rc;
	if (pv->name == NULL)
		return cfg_fail(p, e, "provider is missing 'name'");
	/* Names reach logs and site names; one spelling per provider. */
	for (c = pv->name; *c != '\0'; c++)
		if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') ||
		    *c == '-' || *c == '_' || *c == '.'))
			return cfg_fail(p, config_setting_get_member(e, "name"),
			    "provider name '%s' may only hold lower-case "
			    "letters, digits, '-', '_' and '.'", pv->name);
	pv->shape.set = cfg_shape_given(e);
	if ((rc = cfg_seq(p, e, "mx_suffixes", &s)) < 0)
		return rc;
	*has_sfx = s != NULL;
	return s != NULL ? cfg_parse_suffixes(p, s, pv) : 0;
}

/*
 * cfg_parse_suffixes - mx_suffixes: up to CFG_MAX_SUFFIXES strings, each
 * ".domain" or a host name, lower-cased; duplicates are
 * cfg_check_suffixes()'s business
 */
static int
cfg_parse_suffixes(struct cfg_parse *p, const config_setting_t *list,
    struct cfg_provider *pv)
{
	size_t i, n = (size_t)config_setting_length(list);

	if (n > CFG_MAX_SUFFIXES)
		return cfg_fail(p, list, "provider '%s': 'mx_suffixes' may "
		    "hold at most %d suffixes", pv->name, CFG_MAX_SUFFIXES);
	pv->suffixes = xcalloc(n == 0 ? 1 : n, sizeof *pv->suffixes);
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		const char *v;

		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			return cfg_fail(p, e, "'mx_suffixes' entries must be "
			    "strings");
		v = config_setting_get_string(e);
		if (!cfg_hostname_valid(v[0] == '.' ? v + 1 : v))
			return cfg_fail(p, e, "provider '%s': mx suffix '%s' "
			    "is not a host name or .domain such as "
			    "\".google.com\"", pv->name, v);
		pv->suffixes[i] = xstrdup(v);
		pv->nsuffixes = i + 1;
		cfg_lower(pv->suffixes[i]);
	}
	return 0;
}

/*
 * cfg_check_suffixes - no suffix twice, in one provider or two (which
 * would make the lookup depend on the order); the error names the file's
 * mx_suffixes entry, at[] being the entries that set each provider
 */
static int
cfg_check_suffixes(struct cfg_parse *p, const config_setting_t *const *at)
{
	const struct relay_config *cfg = p->cfg;
	const struct cfg_provider *a, *b;
	const config_setting_t *where;
	size_t ia, ib, ja, jb;

	for (ia = 0; ia < cfg->shaping.nproviders; ia++)
		for (ib = 0; ib <= ia; ib++) {
			a = &cfg->shaping.providers[ia];
			b = &cfg->shaping.providers[ib];
			for (ja = 0; ja < a->nsuffixes; ja++)
				for (jb = 0; jb < (ia == ib ? ja :
				    b->nsuffixes); jb++) {
					if (strcmp(a->suffixes[ja],
					    b->suffixes[jb]) != 0)
						continue;
					/* Two built-ins never clash. */
					where = at[ia] != NULL ?
					    config_setting_get_member(at[ia],
					    "mx_suffixes") : NULL;
					if (where != NULL)
						where = config_setting_get_elem(
						    where, (unsigned int)ja);
					else if (at[ib] != NULL &&
					    (where = config_setting_get_member(
					    at[ib], "mx_suffixes")) != NULL)
						where = config_setting_get_elem(
						    where, (unsigned int)jb);
					if (ia == ib)
						return cfg_fail(p, where,
						    "provider '%s' lists mx "
						    "suffix '%s' twice",
						    a->name, a->suffixes[ja]);
					return cfg_fail(p, where, "mx suffix "
					    "'%s' is claimed by providers '%s' "
					    "and '%s'", a->suffixes[ja],
					    b->name, a->name);
				}
		}
	return 0;
}

/*
 * cfg_parse_shape_domains - shaping.domains: up to CFG_MAX_SHAPE_DOMAINS
 * { domain, rollup, <shape keys> } groups; domain required, a domain name
 * (exact, lower-cased), no two alike
 */
static int
cfg_parse_shape_domains(struct cfg_parse *p, const config_setting_t *list)
{
	struct relay_config *cfg = p->cfg;
	size_t i, j, n = (size_t)config_setting_length(list);
	int rc;

	if (n > CFG_MAX_SHAPE_DOMAINS)
		return cfg_fail(p, list, "'domains' may hold at most %d "
		    "entries", CFG_MAX_SHAPE_DOMAINS);
	/* Counted up front so cfg_free() copes with a half-filled array. */
	cfg->shaping.domains = xcalloc(n == 0 ? 1 : n,
	    sizeof *cfg->shaping.domains);
	cfg->shaping.ndomains = n;
	for (i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(list,
		    (unsigned int)i);
		struct cfg_domain_shape *dm = &cfg->shaping.domains[i];

		if (!config_setting_is_group(e))
			return cfg_fail(p, e, "'domains' entries must be "
			    "groups { ... }");
		dm->rollup = true;
		dm->shape.tls = -1;
		if ((rc = cfg_apply(p, e, "shaping.domains", dm)) < 0)
			return rc;
		if (dm->domain == NULL)
			return cfg_fail(p, e, "shaping domain entry is missing "
			    "'domain'");
		if (!cfg_hostname_valid(dm->domain))
			return cfg_fail(p, config_setting_get_member(e,
			    "domain"), "shaping domain '%s' is not a domain "
			    "name such as example.com", dm->domain);
		cfg_lower(dm->domain);
		dm->shape.set = cfg_shape_given(e);
		if ((rc = cfg_shape_check(p, e, &dm->shape)) < 0)
			return rc;
		for (j = 0; j < i; j++)
			if (strcmp(cfg->shaping.domains[j].domain,
			    dm->domain) == 0)
				return cfg_fail(p, e, "shaping for domain '%s' "
				    "is defined twice", dm->domain);
	}
	return 0;
}

/*
 * cfg_check_shape_ca - a tls "verify" in shaping.default (group d), a
 * provider (at[]) or a domain entry (list dl) needs delivery.ca_file, as
 * one in delivery does (dlv: the delivery group, may be NULL)
 */
static int
cfg_check_shape_ca(struct cfg_parse *p, const config_setting_t *dlv,
    const config_setting_t *d, const config_setting_t *const *at,
    const config_setting_t *dl)
{
	const struct relay_config *cfg = p->cfg;
	size_t i;

	if (cfg->shaping.dflt.tls == CFG_DLV_TLS_VERIFY)
		return cfg_check_ca_file(p, dlv,
		    config_setting_get_member(d, "tls"));
	/* A built-in is never "verify": at[i] is the file's entry. */
	for (i = 0; i < cfg->shaping.nproviders; i++)
		if (cfg->shaping.providers[i].shape.tls == CFG_DLV_TLS_VERIFY)
			return cfg_check_ca_file(p, dlv, at[i] == NULL ? NULL :
			    config_setting_get_member(at[i], "tls"));
	for (i = 0; i < cfg->shaping.ndomains; i++)
		if (cfg->shaping.domains[i].shape.tls == CFG_DLV_TLS_VERIFY)
			return cfg_check_ca_file(p, dlv,
			    config_setting_get_member(config_setting_get_elem(
			    dl, (unsigned int)i), "tls"));
	return 0;
}

/*
 * cfg_suffix_match - how long a match of suffix sfx on the host name of
 * hlen bytes at host is (the suffix's length without its dot), 0 if none:
 * ".example.net" matches strictly below example.net, "example.net" that
 * name and below
 */
static size_t
cfg_suffix_match(const char *host, size_t hlen, const char *sfx)
{
	size_t slen = strlen(sfx);

	if (sfx[0] == '.')
		return hlen > slen && str_ieqn(host + hlen - slen, sfx, slen) ?
		    slen - 1 : 0;
	if (hlen == slen)
		return str_ieqn(host, sfx, slen) ? slen : 0;
	return hlen > slen && host[hlen - slen - 1] == '.' &&
	    str_ieqn(host + hlen - slen, sfx, slen) ? slen : 0;
}

/* config_shape_provider - the longest suffix match over every MX host */
const struct cfg_provider *
config_shape_provider(const struct relay_config *cfg, const char *mx_names)
{
	const struct cfg_provider *best = NULL;
	const char *h, *end;
	size_t i, j, hlen, len, blen = 0;

	if (cfg == NULL || mx_names == NULL)
		return NULL;
	/* A linear scan: a few providers, once per resolved destination. */
	for (h = mx_names; *h != '\0'; h = *end == ',' ? end + 1 : end) {
		if ((end = strchr(h, ',')) == NULL)
			end = h + strlen(h);
		hlen = (size_t)(end - h);
		/* An absolute name "mx.example.net." is the same host. */
		if (hlen > 0 && h[hlen - 1] == '.')
			hlen--;
		for (i = 0; i < cfg->shaping.nproviders; i++) {
			const struct cfg_provider *pv =
			    &cfg->shaping.providers[i];

			for (j = 0; j < pv->nsuffixes; j++) {
				len = cfg_suffix_match(h, hlen,
				    pv->suffixes[j]);
				if (len > blen) {
					best = pv;
					blen = len;
				}
			}
		}
	}
	return best;
}

/*
 * config_shape_for - default, then provider, then domain entry, field by
 * field; tls from the domain's own settings before the provider's
 */
void
config_shape_for(const struct relay_config *cfg, const char *domain,
    const char *mx_names, struct cfg_shape *out, bool *rollup,
    const char **site_name)
{
	const struct cfg_provider *pv = config_shape_provider(cfg, mx_names);
	const struct cfg_domain_shape *dm = NULL;
	const struct cfg_tls_policy *tp;
	size_t i;

	for (i = 0; domain != NULL && i < cfg->shaping.ndomains; i++)
		if (str_ieq(cfg->shaping.domains[i].domain, domain)) {
			dm = &cfg->shaping.domains[i];
			break;
		}
	*out = cfg->shaping.dflt;
	if (pv != NULL)
		cfg_shape_over(out, &pv->shape);
	if (dm != NULL)
		cfg_shape_over(out, &dm->shape);
	/*
	 * A delivery.tls_policies entry names this domain: it beats what a
	 * provider or the default says for every domain they cover.
	 */
	if ((dm == NULL || !(dm->shape.set & CFG_SHAPE_TLS)) &&
	    (tp = cfg_tls_policy_find(cfg, domain)) != NULL)
		out->tls = tp->tls;
	else if (out->tls < 0)
		out->tls = cfg->delivery.tls;
	out->set = CFG_SHAPE_ALL;
	cfg_shape_clamp(out);
	if (rollup != NULL)
		*rollup = dm != NULL ? dm->rollup : true;
	if (site_name != NULL)
		*site_name = pv != NULL ? pv->name : NULL;
}
