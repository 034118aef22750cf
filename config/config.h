/*
 * config.h - the validated, immutable configuration snapshot.
 *
 * config_load() parses a libconfig file into a struct relay_config. Every key
 * is checked: unknown keys, wrong types and out-of-range values are errors
 * that name the file and line. A snapshot is reference-counted so sessions
 * that started on an old configuration finish on it after SIGHUP.
 */
#ifndef RELAY_CONFIG_H
#define RELAY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

enum cfg_tls_mode {
	CFG_TLS_NONE,		/* plaintext only, STARTTLS not offered */
	CFG_TLS_STARTTLS,	/* plaintext greeting, STARTTLS offered */
	CFG_TLS_IMPLICIT,	/* TLS from the first byte (port 465) */
};

/*
 * Outbound STARTTLS policy (delivery.tls). The values mirror enum dlv_tls
 * in relay/dlv_session.h, which config/ may not include: keep them equal.
 */
enum cfg_dlv_tls {
	CFG_DLV_TLS_NONE,		/* never STARTTLS */
	CFG_DLV_TLS_OPPORTUNISTIC,	/* STARTTLS when offered */
	CFG_DLV_TLS_REQUIRED,		/* no STARTTLS offered: the host fails */
	CFG_DLV_TLS_VERIFY,		/* required, and the certificate must
					   verify against delivery.ca_file and
					   name the MX host */
};

/*
 * Indexes of delivery.timeout_ms[]. They mirror enum dlv_phase in
 * relay/verdict.h, in the same order, so the array can be copied into a
 * struct dlv_target as it is: keep the two identical.
 */
enum cfg_phase {
	CFG_PHASE_CONNECT,	/* TCP connect */
	CFG_PHASE_BANNER,	/* 220 greeting */
	CFG_PHASE_EHLO,		/* EHLO or HELO */
	CFG_PHASE_STARTTLS,	/* STARTTLS and the handshake */
	CFG_PHASE_MAIL,		/* MAIL FROM */
	CFG_PHASE_RCPT,		/* RCPT TO */
	CFG_PHASE_DATA,		/* DATA (the 354) */
	CFG_PHASE_DOT,		/* the reply after the body */
	CFG_PHASE_RSET,		/* RSET between messages */
	CFG_PHASE_QUIT,		/* QUIT */
	CFG_PHASE_LAST
};

struct cfg_listener {
	char *name;		/* label for logs, e.g. "submission" */
	char *address;		/* numeric IPv4/IPv6 address to bind */
	int port;		/* 1..65535 */
	enum cfg_tls_mode tls;	/* see enum cfg_tls_mode */
	bool auth_required;	/* MAIL FROM refused until AUTH succeeded */
};

struct cfg_user {
	char *name;		/* login name as given in AUTH */
	char *hash;		/* crypt(3) hash: $6$, $5$, $y$, $2b$ ... */
};

struct cfg_net {
	int family;		/* AF_INET or AF_INET6 */
	uint8_t addr[16];	/* network address, host bits cleared */
	int prefix;		/* prefix length in bits */
};

/*
 * One delivery.tls_policies entry: the STARTTLS policy for a destination
 * domain. domain is lower-case, without the leading dot of ".example.org";
 * subdomains says it was there (every subdomain of domain, not domain
 * itself). See config_tls_policy().
 */
struct cfg_tls_policy {
	char *domain;		/* lower-case domain name */
	bool subdomains;	/* ".domain": match strictly below it */
	int tls;		/* enum cfg_dlv_tls */
};

/*
 * Reply classes: what a receiver's reply or an I/O event means for the
 * destination (reply_rules class = "..."). They mirror enum verdict_class
 * in relay/verdict.h, which config/ may not include; verdict.c checks the
 * two are equal with _Static_assert. config_class_name() gives the names
 * the configuration uses.
 */
enum cfg_class {
	CFG_CLASS_OK,		/* nothing for the destination to act on */
	CFG_CLASS_THROTTLE,	/* slow the site down (rate, connections) */
	CFG_CLASS_SUSPEND,	/* stop the site for a while (blocks) */
	CFG_CLASS_GREYLIST,	/* retry this recipient after the delay */
	CFG_CLASS_RCPT_TEMP,	/* this recipient, later (over quota) */
	CFG_CLASS_MSG_TEMP,	/* this message, later */
	CFG_CLASS_PERMANENT,	/* bounce */
	CFG_CLASS_CONN_FAIL,	/* the host failed: no session */
	CFG_CLASS_MSGS_PER_CONN, /* the connection carried what the receiver
				   allows: go on on a new one, send fewer */
	CFG_CLASS_LAST
};

/*
 * libpcre2-8's compiled pattern (pcre2_code with PCRE2_CODE_UNIT_WIDTH 8),
 * declared here so that includers need not include pcre2.h.
 */
struct pcre2_real_code_8;

/*
 * One reply_rules entry. Every matcher given must match (AND); one left
 * out matches anything. A rule with a code never matches an I/O event,
 * which has no code. See config/relay.conf.example and relay/verdict.c.
 */
struct cfg_reply_rule {
	char *name;		/* for logs; unique; default "rule-<n>" */
	char *code;		/* "421", "4xx" or "45x" (x lower-case); NULL
				   = any code */
	char *enh;		/* enhanced status: "4.7.28" exactly, or a
				   prefix ending in '.' ("4.7."); NULL = any */
	unsigned int phases;	/* mask of 1u << enum cfg_phase */
	char *text;		/* regex source, for logs; NULL = any text */
	struct pcre2_real_code_8 *re;	/* text compiled by
				   config_regex_compile(); NULL = any text */
	int cls;		/* enum cfg_class, never CFG_CLASS_OK */
	int suspend_s;		/* class suspend: seconds, 0 = the
				   scheduler's default; 0 for other classes */
};

/* The reply_rules list, in file order (tried first to last). */
struct cfg_reply_rules {
	struct cfg_reply_rule *v;	/* n rules */
	size_t n;			/* 0..10000 */
};

/* Every phase (reply_rules phase = "any"). */
#define CFG_PHASE_ANY	((1u << CFG_PHASE_LAST) - 1)

/*
 * Static shaping of a destination (the shaping group): the ceilings and
 * floors the adaptive throttle of a site (relay/site.h) starts from, and
 * the session limits. set says which fields hold a value (CFG_SHAPE_*):
 * in a provider or domain entry, those given in the file (or built in);
 * the others are inherited, field by field, from what is below it
 * (domain entry over provider over shaping.default). Rates are messages
 * (connections) per second, from "N/s", "N/min" or "N/h" in the file.
 */
#define CFG_SHAPE_MAX_CONN	0x01u	/* max_connections */
#define CFG_SHAPE_MIN_CONN	0x02u	/* min_connections */
#define CFG_SHAPE_MSGS		0x04u	/* max_messages_per_connection */
#define CFG_SHAPE_RCPTS		0x08u	/* max_recipients_per_trans... */
#define CFG_SHAPE_RATE		0x10u	/* rate */
#define CFG_SHAPE_MIN_RATE	0x20u	/* min_rate */
#define CFG_SHAPE_CONN_RATE	0x40u	/* connection_rate */
#define CFG_SHAPE_TLS		0x80u	/* tls */
#define CFG_SHAPE_ALL		0xffu

struct cfg_shape {
	int max_conn;		/* connection ceiling, 1..10000 */
	int min_conn;		/* connection floor, 1..10000 */
	int max_msgs_per_conn;	/* transactions per connection,
				   1..100000 */
	int max_rcpts_per_txn;	/* RCPTs per transaction, 1..100000 */
	double rate;		/* message rate ceiling, msgs/s */
	double min_rate;	/* message rate floor, msgs/s */
	double conn_rate;	/* new connections per second */
	int tls;		/* enum cfg_dlv_tls; -1 = inherit (see
				   config_shape_for) */
	unsigned set;		/* CFG_SHAPE_* fields holding a value */
};

/*
 * One shaping.providers entry (built in or from the file, merged by
 * name): MX host names matching one of its suffixes belong to it. A
 * suffix ".example.net" matches host names strictly below example.net; one
 * without the dot matches that host name and every name below it.
 * Suffixes are lower-case.
 */
struct cfg_provider {
	char *name;		/* unique; a-z, 0-9, '-', '_', '.' */
	char **suffixes;	/* nsuffixes MX host name suffixes */
	size_t nsuffixes;	/* 0..32; 0 = matches nothing (disabled) */
	struct cfg_shape shape;	/* fields not in set are inherited */
};

/* One shaping.domains entry: a recipient domain's own shaping. */
struct cfg_domain_shape {
	char *domain;		/* lower-case, exact match */
	bool rollup;		/* false: the domain is a site of its own,
				   not shared with its MX hosts' other
				   domains */
	struct cfg_shape shape;	/* fields not in set are inherited */
};

struct relay_config {
	int refs;			/* config_ref/config_unref count */
	char *path;			/* file it was loaded from, or "(built-in)" */

	char *hostname;			/* EHLO/greeting name and Received: by */
	char *spool_dir;		/* root of the spool */
	char *control_socket;		/* unix socket path for relayctl */
	int control_mode;		/* permission bits of the socket, e.g. 0600 */

	char *tls_cert;			/* PEM certificate chain file */
	char *tls_key;			/* PEM private key file */
	bool tls_generate;		/* create a self-signed pair when missing */

	struct cfg_listener *listeners;	/* at least one */
	size_t nlisteners;
	struct cfg_user *users;		/* may be empty */
	size_t nusers;
	struct cfg_net *relay_nets;	/* clients allowed to relay without AUTH */
	size_t nrelay_nets;

	struct {
		uint64_t max_message_size;	/* bytes, SIZE= advertised */
		int max_recipients;		/* per transaction */
		int max_connections;		/* all listeners together */
		int max_connections_per_ip;	/* per client address */
		int max_line_length;		/* command line octets incl. CRLF */
		int max_errors;			/* bad commands before 421 */
	} limits;

	struct {
		int command_ms;		/* idle wait for a command */
		int data_ms;		/* wait for the next chunk inside DATA */
		int tls_handshake_ms;	/* STARTTLS / implicit handshake */
		int shutdown_ms;	/* grace for sessions on SIGTERM */
	} timeouts;

	struct {
		int failure_delay_ms;	/* delay before a 535 reply */
		int max_failures;	/* per client IP within the window */
		int failure_window_s;	/* window for max_failures */
	} auth;

	struct {
		bool syslog;		/* also log to syslog(3), facility mail */
		int trace;		/* TRACE_* mask from log.h */
	} log;

	struct {
		char **servers;		/* "a.b.c.d:port" / "[v6]:port", port
					   always present; none = resolv.conf */
		size_t nservers;
		int timeout_ms;		/* per query attempt */
		int tries;		/* attempts per server */
		bool ipv6;		/* also look up and use AAAA */
		int max_mx_ttl_s;	/* cap on how long an answer is cached */
		int negative_ttl_s;	/* NXDOMAIN / null MX / no host cache */
		int cache_size;		/* domains cached; 0 = no cache */
	} dns;

	struct {
		bool enabled;		/* false: only queue (submission only) */
		int port;		/* destination port, usually 25 */
		bool has_source;	/* bind outgoing connections to source */
		struct sockaddr_storage source;	/* port 0; if has_source */
		char *helo;		/* EHLO name; NULL = use hostname */
		int tls;		/* enum cfg_dlv_tls (= enum dlv_tls) */
		char *ca_file;		/* PEM CA bundle for tls "verify";
					   checked readable when one uses it */
		struct cfg_tls_policy *tls_policies; /* per-domain tls, file
					   order, no two alike */
		size_t ntls_policies;	/* 0..10000 */
		int max_connections;		/* all outbound together */
		int max_connections_per_domain;	/* per destination domain */
		int max_connections_per_host;	/* per MX IP address */
		int max_messages_per_connection; /* transactions, then QUIT */
		int max_recipients_per_transaction; /* RCPTs per MAIL */
		int *retry_schedule_s;	/* delays in s, non-decreasing, each
					   >= min_retry_s; the last repeats */
		size_t nretry;		/* 1..32 */
		double retry_jitter;	/* 0..0.5: delay * [1-j, 1+j] */
		int min_retry_s;	/* no retry sooner than this */
		int greylist_retry_s;	/* floor of the first retry after a
					   greylisting deferral */
		int max_queue_lifetime_s; /* undelivered after this: bounce */
		int delay_warning_s;	/* "delayed" DSN at this age; 0 = none */
		uint64_t timeout_ms[CFG_PHASE_LAST];	/* by enum cfg_phase */
	} delivery;

	struct cfg_reply_rules reply_rules;	/* operator's classifier
					   rules, compiled; tried before the
					   built-in ones (relay/verdict.c) */

	struct {
		/* shaping.default: every field but tls always set; unset
		   ones come from delivery.* and built-ins */
		struct cfg_shape dflt;
		bool builtin_providers;	/* use (and merge with) the
					   built-in providers */
		/* Built-ins first, then the file's new ones, in order. */
		struct cfg_provider *providers;
		size_t nproviders;	/* 0..256 */
		struct cfg_domain_shape *domains; /* file order, no two alike */
		size_t ndomains;	/* 0..10000 */
	} shaping;
};

/*
 * config_load - parse and validate a file. On success *out holds a snapshot
 * with refs == 1. On failure returns RELAY_ECONFIG (or -errno when the file
 * cannot be read) and err holds "file:line: message".
 */
int config_load(const char *path, struct relay_config **out, char *err,
    size_t errlen);

/* config_load_string - the same for text in memory; name is used in errors */
int config_load_string(const char *text, const char *name,
    struct relay_config **out, char *err, size_t errlen);

/* config_default_text - the built-in default configuration (relayd -d) */
const char *config_default_text(void);

struct relay_config *config_ref(struct relay_config *cfg);
/* config_unref - drop a reference; frees on the last one; NULL is fine */
void config_unref(struct relay_config *cfg);

/* config_net_match - is the address inside one of the relay networks? */
bool config_net_match(const struct relay_config *cfg,
    const struct sockaddr *sa);

/* config_user_find - the user entry for a login name, or NULL */
const struct cfg_user *config_user_find(const struct relay_config *cfg,
    const char *name);

/*
 * config_tls_policy - the TLS policy for a destination domain: the first
 * exact entry, else the longest subdomain entry, else delivery.tls.
 * Compared case-insensitively; a NULL domain gets delivery.tls.
 */
int config_tls_policy(const struct relay_config *cfg, const char *domain);

/*
 * config_regex_compile - compile a reply text regex the one way every
 * classifier pattern is compiled (PCRE2, caseless, UTF-8 with invalid
 * bytes tolerated in subjects, JIT when available). On success *out is
 * the caller's, freed with pcre2_code_free(). On failure returns
 * RELAY_ECONFIG and err holds PCRE2's message and the offset.
 */
int config_regex_compile(const char *pattern, struct pcre2_real_code_8 **out,
    char *err, size_t errlen);

/* config_class_name - "throttle", ... for enum cfg_class; "?" if unknown */
const char *config_class_name(int cls);

/*
 * config_shape_provider - the provider whose suffix matches one of the MX
 * host names (mx_names: comma-separated, as in a site name, e.g.
 * "alt1.aspmx.l.google.com,aspmx.l.google.com"; a single domain name is
 * fine too), or NULL (also for a NULL mx_names). Compared without case;
 * the longest matching suffix wins, the earlier provider on a tie.
 */
const struct cfg_provider *config_shape_provider(const struct relay_config *cfg,
    const char *mx_names);

/*
 * config_shape_for - the effective shaping of a destination: the domain's
 * shaping.domains entry over the provider of mx_names over
 * shaping.default, field by field. Every field of *out is set (out->set
 * is CFG_SHAPE_ALL); a floor above its ceiling is lowered to it. out->tls
 * is the domain entry's tls, else the delivery.tls_policies entry for the
 * domain, else the provider's tls, else shaping.default's, else
 * delivery.tls: never -1. *rollup (if not NULL) is false when the domain
 * entry says rollup = false (the domain is a site of its own), else true.
 * *site_name (if not NULL) is the provider's name if one matched, else
 * NULL. domain and mx_names may be NULL.
 */
void config_shape_for(const struct relay_config *cfg, const char *domain,
    const char *mx_names, struct cfg_shape *out, bool *rollup,
    const char **site_name);

#endif
