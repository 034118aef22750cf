/*
 * NAME
 *	fake_mx.c - a scriptable fake MX: smtp-sink with knobs
 *
 * SUMMARY
 *	fake-mx -l [NAME=]127.0.0.x:PORT ... [-r RECORD] [-k DIR]
 *	    [-s SCRIPT] [-e 'RULE; RULE'] [-t SECONDS] [-T SECONDS] [-S] [-q]
 *	    [--max-conn N[:REPLY]] [--rate R/SECONDS] [--greylist SECONDS]
 *	    [--tls CERT:KEY] [--ehlo-ext LIST] [--delay MS] ...
 *
 * DESCRIPTION
 *	The receiving end for relayd's delivery tests and benchmarks. It
 *	speaks correct server-side SMTP on the normal path (PIPELINING with
 *	batched replies, STARTTLS, DATA with dot-unstuffing, RSET, NOOP,
 *	QUIT) and misbehaves on request: a script of rules picks, per phase
 *	(connect, ehlo, starttls, mail, rcpt, data, dot, rset, noop, quit),
 *	a reply, a close, a stall, a reply split into one-byte writes, a
 *	malformed or an overlong reply line. Global knobs add concurrency
 *	limits, an anvil-like message rate limit per client IP, postgrey-like
 *	greylisting and a reply delay. tools/fake-mx.md is the manual.
 *
 *	Every event is one JSON line in the record file (-r), written with
 *	one write(2) per line by default so tests can read it while we run;
 *	each accepted message gets a "message" line with the SHA-256 of the
 *	unstuffed body. SIGUSR1 dumps counters (-S: to stderr too).
 *
 *	Connections use relay/conn (TLS over memory BIOs, a line reader with
 *	a hard limit, batched output) and the body goes through
 *	smtp_dot_decode, so this tool shares the relay's I/O code but not
 *	its policy: every reply is decided here.
 *
 * INVARIANTS
 *	At most one reply is being decided or sent per session: a delayed,
 *	split or stalled reply pauses the conn, so pipelined commands wait in
 *	its buffer. Only loopback addresses are bound. Everything a peer can
 *	grow is bounded: line length (conn), recipients per message (-m),
 *	the body prefix kept for regexes (FMX_HEAD_MAX), the rate and
 *	greylist tables (FMX_TABLE_MAX), and idle time per connection.
 *
 * ERRORS
 *	Usage errors exit 64 before anything is bound; a listener that
 *	cannot be bound, an unreadable certificate or record file exit 1.
 *	Run-time failures (a body file that cannot be written) are logged and
 *	the session goes on. SIGTERM, SIGINT and -t stop cleanly (exit 0).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <regex.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <uv.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include "config/log.h"
#include "config/util.h"
#include "tls/tls.h"
#include "relay/conn.h"
#include "relay/smtp_parse.h"

#define FMX_LINE_MAX		4096	/* command line limit incl. CRLF */
#define FMX_IDLE_MS		60000	/* default idle timeout per connection */
#define FMX_HEAD_MAX		65536	/* body prefix kept for dot ~REGEX */
#define FMX_LONGLINE		5000	/* default length of a longline reply */
#define FMX_LONGLINE_MAX	1000000	/* cap on the "len" modifier */
#define FMX_GAP_MS		2	/* default pause between split bytes */
#define FMX_MAX_LISTENERS	64	/* cap on -l */
#define FMX_MAX_RULES		4096	/* cap on script rules */
#define FMX_MAX_EXT		64	/* cap on EHLO keywords */
#define FMX_MAX_RCPT		1000	/* default recipients per message */
#define FMX_TABLE_MAX		1000000	/* rate/greylist entries, then reset */
#define FMX_MAX_MS		(7ULL * 86400 * 1000)	/* cap on any duration */
#define FMX_REC_HIWAT		65536	/* unflushed record bytes (--no-flush) */
#define FMX_REC_FLUSH_MS	200	/* record flush period (--no-flush) */
#define FMX_BACKLOG		1024	/* listen(2) backlog */
#define FMX_NCODES		1000	/* reply codes 0..999 in the stats */
#define FMX_DEFAULT_SIZE	"10240000"	/* advertised SIZE by default */
#define EX_USAGE_		64

/* The phases a rule can name; FMX_PH_OTHER is for protocol errors. */
enum fmx_phase {
	FMX_PH_CONNECT,		/* the greeting */
	FMX_PH_EHLO,		/* EHLO and HELO */
	FMX_PH_STARTTLS,	/* STARTTLS */
	FMX_PH_MAIL,		/* MAIL FROM */
	FMX_PH_RCPT,		/* RCPT TO */
	FMX_PH_DATA,		/* the DATA command */
	FMX_PH_DOT,		/* the end of the body */
	FMX_PH_RSET,		/* RSET */
	FMX_PH_NOOP,		/* NOOP */
	FMX_PH_QUIT,		/* QUIT */
	FMX_PH_OTHER,		/* sequence/syntax errors, unknown commands */
	FMX_PH_LAST
};

static const char *const fmx_phase_names[] = {
	[FMX_PH_CONNECT] = "connect",
	[FMX_PH_EHLO] = "ehlo",
	[FMX_PH_STARTTLS] = "starttls",
	[FMX_PH_MAIL] = "mail",
	[FMX_PH_RCPT] = "rcpt",
	[FMX_PH_DATA] = "data",
	[FMX_PH_DOT] = "dot",
	[FMX_PH_RSET] = "rset",
	[FMX_PH_NOOP] = "noop",
	[FMX_PH_QUIT] = "quit",
	[FMX_PH_OTHER] = "other",
};
_Static_assert(ARRAY_SIZE(fmx_phase_names) == FMX_PH_LAST,
    "phase names out of sync");

/* The server's session states; fmx_enter_state is the only setter. */
enum fmx_state {
	FMX_ST_GREETING,	/* the greeting is not out yet */
	FMX_ST_NOSERVICE,	/* a non-2xx greeting: only QUIT/NOOP */
	FMX_ST_INIT,		/* waiting for EHLO/HELO */
	FMX_ST_READY,		/* greeted, no transaction */
	FMX_ST_MAIL,		/* MAIL accepted, no recipient yet */
	FMX_ST_RCPT,		/* at least one recipient accepted */
	FMX_ST_BODY,		/* reading the body after 354 */
	FMX_ST_LAST
};

static const char *const fmx_state_names[] = {
	[FMX_ST_GREETING] = "GREETING",
	[FMX_ST_NOSERVICE] = "NOSERVICE",
	[FMX_ST_INIT] = "INIT",
	[FMX_ST_READY] = "READY",
	[FMX_ST_MAIL] = "MAIL",
	[FMX_ST_RCPT] = "RCPT",
	[FMX_ST_BODY] = "BODY",
};
_Static_assert(ARRAY_SIZE(fmx_state_names) == FMX_ST_LAST,
    "state names out of sync");

#define ST(x)		(1u << (x))
#define ST_LIVE		(ST(FMX_ST_INIT) | ST(FMX_ST_READY) | ST(FMX_ST_MAIL) | \
			ST(FMX_ST_RCPT))

/* Which of a rule's matching events fire it. */
enum fmx_count {
	FMX_CNT_ALWAYS,		/* every one */
	FMX_CNT_EVERY,		/* the Nth, 2Nth, ... */
	FMX_CNT_FIRST,		/* the first N */
	FMX_CNT_AFTER,		/* all but the first N */
};

enum fmx_action {
	FMX_ACT_REPLY,		/* the rule's reply */
	FMX_ACT_PASS,		/* knobs and the default reply */
	FMX_ACT_CLOSE,		/* close without replying */
	FMX_ACT_STALL,		/* never reply; the idle timeout closes */
	FMX_ACT_SPLIT,		/* a reply sent one byte per write */
	FMX_ACT_GARBAGE,	/* a malformed (raw) reply line */
	FMX_ACT_LONGLINE,	/* a reply with an overlong first line */
	FMX_ACT_LAST
};

static const char *const fmx_action_names[] = {
	[FMX_ACT_REPLY] = "reply",
	[FMX_ACT_PASS] = "pass",
	[FMX_ACT_CLOSE] = "close",
	[FMX_ACT_STALL] = "stall",
	[FMX_ACT_SPLIT] = "reply-split",
	[FMX_ACT_GARBAGE] = "garbage",
	[FMX_ACT_LONGLINE] = "longline",
};
_Static_assert(ARRAY_SIZE(fmx_action_names) == FMX_ACT_LAST,
    "action names out of sync");

/* Record event classes for --events. */
enum {
	FMX_EV_READY = 1 << 0,		/* "ready" */
	FMX_EV_CONNECT = 1 << 1,	/* "connect" */
	FMX_EV_COMMAND = 1 << 2,	/* "ehlo", "mail", "rcpt", ... */
	FMX_EV_REPLY = 1 << 3,		/* "reply" */
	FMX_EV_TLS = 1 << 4,		/* "tls" */
	FMX_EV_MESSAGE = 1 << 5,	/* "message" */
	FMX_EV_REJECTED = 1 << 6,	/* "rejected" */
	FMX_EV_CLOSE = 1 << 7,		/* "close" */
	FMX_EV_STATS = 1 << 8,		/* "stats" */
	FMX_EV_ALL = (1 << 9) - 1,
};

static const struct {
	const char *name;
	unsigned mask;
} fmx_event_names[] = {
	{ "ready", FMX_EV_READY }, { "connect", FMX_EV_CONNECT },
	{ "command", FMX_EV_COMMAND }, { "reply", FMX_EV_REPLY },
	{ "tls", FMX_EV_TLS }, { "message", FMX_EV_MESSAGE },
	{ "rejected", FMX_EV_REJECTED }, { "close", FMX_EV_CLOSE },
	{ "stats", FMX_EV_STATS }, { "all", FMX_EV_ALL },
};

struct fmx_rule {
	enum fmx_phase phase;	/* the phase it applies to */
	char *listener;		/* only this listener's sessions, or NULL */
	bool has_re;		/* re is compiled */
	bool negate;		/* fire when re does NOT match */
	regex_t re;		/* ~REGEX on the phase's argument */
	enum fmx_count count;	/* every/first/after, or always */
	uint64_t n;		/* the N of every/first/after */
	uint64_t seen;		/* matching events so far (all sessions) */
	int64_t delay_ms;	/* "delay MS"; -1: the global --delay */
	uint64_t gap_ms;	/* "gap MS" between reply-split bytes */
	size_t len;		/* "len N" of a longline reply */
	enum fmx_action action;	/* what to do when it fires */
	int code;		/* reply code, 0 = the phase's default reply */
	char *wire;		/* rendered reply or raw garbage, or NULL */
	char *src;		/* the rule as written, for -v and --check */
};

struct fmx;

struct fmx_listener {
	uv_tcp_t tcp;		/* embedded, never moved; tcp.data = this */
	struct fmx *fmx;	/* the root */
	char name[64];		/* record and stats name */
	char addr[80];		/* "127.0.0.2:2525" once bound */
	struct sockaddr_storage sa;	/* the address to bind */
	uint64_t cur;		/* sessions open now (not max-conn rejects) */
	uint64_t peak;		/* highest cur */
	uint64_t total;		/* sessions accepted */
	uint64_t rejected;	/* connections refused by --max-conn* */
	uint64_t messages;	/* messages accepted */
};

/* The reply being decided and sent; one at a time per session. */
struct fmx_out {
	enum fmx_phase phase;	/* the phase it answers */
	enum fmx_action action;	/* how it is sent */
	int code;		/* its code, 0 for none or garbage */
	uint64_t delay_ms;	/* wait this long before sending */
	uint64_t gap_ms;	/* reply-split: pause between bytes */
	size_t sent;		/* reply-split: bytes already written */
	bool pending;		/* waiting on the session timer */
};

struct fmx_sess {
	struct fmx *fmx;		/* the root */
	struct fmx_listener *lst;	/* where it came in */
	struct conn *conn;		/* NULL once its handles closed */
	uv_timer_t timer;		/* delayed and split replies */
	uint64_t id;			/* "conn" in the record */
	enum fmx_state state;		/* see fmx_enter_state */
	bool counted;			/* in lst->cur and fmx->cur */
	bool closing;			/* we asked the conn to close */
	bool stalled;			/* a stall rule fired */
	bool tls;			/* STARTTLS completed */
	bool esmtp;			/* the pending greeting is EHLO */
	bool rate_blocked;		/* --rate-phase rcpt: over the rate */
	char peer[64];			/* client IP */
	int peer_port;			/* client port */
	char helo[256];			/* accepted EHLO/HELO argument */
	char helo_pending[256];		/* argument awaiting its reply */
	char close_reason[64];		/* for the "close" record */
	uint64_t t_start;		/* time_now_ms() at accept */
	struct fmx_out out;		/* the reply in flight */
	struct buf reply;		/* its wire text */
	/* The transaction. */
	char *pending_addr;		/* MAIL/RCPT address awaiting a reply */
	char *from;			/* accepted sender ("" for <>) */
	char **rcpts;			/* accepted recipients */
	size_t nrcpt;			/* used in rcpts */
	size_t rcpt_cap;		/* allocated in rcpts */
	uint64_t nmsg;			/* messages finished on this conn */
	uint64_t qid;			/* queue id of the body, 0 = none yet */
	/* The body. */
	struct smtp_dot dot;		/* the unstuffing decoder */
	struct buf chunk;		/* decoded bytes of one read */
	struct buf head;		/* first FMX_HEAD_MAX octets, for regexes */
	EVP_MD_CTX *md;			/* SHA-256 of the unstuffed body */
	char sha256[65];		/* hex digest once the body ended */
	uint64_t body_size;		/* unstuffed octets */
	int body_fd;			/* -k temporary file, or -1 */
	char *body_tmp;			/* its path */
	struct fmx_sess *prev, *next;	/* fmx->sessions */
};

struct fmx_entry {
	struct fmx_entry *next;	/* bucket chain */
	uint64_t hash;		/* FNV-1a of key */
	uint64_t a;		/* rate: window start; greylist: first seen */
	uint64_t b;		/* rate: messages in the window */
	char key[];		/* NUL-terminated */
};

/* A string-keyed hash table for the rate and greylist knobs. */
struct fmx_table {
	struct fmx_entry **slot;	/* nslot buckets */
	size_t nslot;			/* a power of two */
	size_t count;			/* entries */
	const char *what;		/* "rate" or "greylist", for the log */
};

struct fmx {
	uv_loop_t loop;			/* ours, closed at exit */
	/* Options. */
	const char *hostname;		/* -H, in greetings */
	uint64_t idle_ms;		/* -T */
	uint64_t lifetime_ms;		/* -t, 0 = until a signal */
	uint64_t delay_ms;		/* --delay before every reply */
	bool quiet;			/* -q */
	bool verbose;			/* -v */
	bool stats_stderr;		/* -S */
	bool flush;			/* write each record line at once */
	bool die_with_parent;		/* --die-with-parent */
	unsigned events;		/* FMX_EV_* recorded */
	unsigned max_conn;		/* per listener, 0 = none */
	unsigned max_conn_total;	/* all listeners, 0 = none */
	char *max_conn_wire;		/* its reply */
	char *max_conn_total_wire;	/* its reply */
	uint64_t rate_n;		/* --rate R, 0 = off */
	uint64_t rate_window_ms;	/* --rate /SECONDS */
	int rate_code;			/* --rate-reply code, 0 = default */
	char *rate_wire;		/* --rate-reply text, NULL = default */
	enum fmx_phase rate_phase;	/* MAIL or RCPT */
	uint64_t greylist_ms;		/* --greylist, 0 = off */
	SSL_CTX *tls;			/* --tls, or NULL */
	char **ext;			/* EHLO keywords, in order */
	size_t next;			/* count of ext */
	bool ext_custom;		/* --ehlo-ext given: list is exact */
	uint64_t max_size;		/* from "SIZE N", 0 = no limit */
	uint64_t max_rcpt;		/* -m */
	uint64_t max_msgs;		/* --max-msgs-per-conn (0: none) */
	const char *keep_dir;		/* -k */
	const char *record_path;	/* -r */
	/* The script. */
	struct fmx_rule *rules;		/* in order; fixed after start-up */
	size_t nrules;			/* used */
	size_t rules_cap;		/* allocated */
	bool need_head;			/* some dot rule has a regex */
	/* Listeners and sessions. */
	struct fmx_listener *lst[FMX_MAX_LISTENERS];	/* never moved */
	size_t nlst;			/* used */
	struct fmx_sess *sessions;	/* all live sessions */
	uint64_t next_conn;		/* last session id given */
	uint64_t next_qid;		/* last queue id given */
	/* The record. */
	int rec_fd;			/* -1 = no record */
	struct buf rec;			/* lines not yet written */
	/* Knob state. */
	struct fmx_table rate_tab;	/* client IP -> window, count */
	struct fmx_table grey_tab;	/* IP/from/rcpt -> first seen */
	/* Counters. */
	uint64_t cur;			/* sessions open now */
	uint64_t peak;			/* highest cur */
	uint64_t total;			/* sessions accepted */
	uint64_t rejected;		/* connections refused by max-conn */
	uint64_t messages;		/* messages accepted */
	uint64_t messages_rejected;	/* bodies answered non-2xx */
	uint64_t bytes;			/* unstuffed octets accepted */
	uint64_t replies[FMX_NCODES];	/* replies sent, by code */
	uint64_t t_start;		/* time_now_ms() at start */
	/* Process handles. */
	uv_timer_t life_timer;		/* -t */
	uv_timer_t flush_timer;		/* --no-flush */
	uv_signal_t sig_usr1;		/* stats */
	uv_signal_t sig_term;		/* stop */
	uv_signal_t sig_int;		/* stop */
	bool stopping;			/* fmx_stop ran */
};

typedef void (*fmx_cmd_fn)(struct fmx_sess *s, const struct smtp_cmd *cmd);

static void fmx_cmd_helo(struct fmx_sess *s, const struct smtp_cmd *cmd);
static void fmx_cmd_starttls(struct fmx_sess *s, const struct smtp_cmd *cmd);
static void fmx_cmd_mail(struct fmx_sess *s, const struct smtp_cmd *cmd);
static void fmx_cmd_rcpt(struct fmx_sess *s, const struct smtp_cmd *cmd);
static void fmx_cmd_data(struct fmx_sess *s, const struct smtp_cmd *cmd);
static void fmx_cmd_simple(struct fmx_sess *s, const struct smtp_cmd *cmd);
static void fmx_cmd_unimpl(struct fmx_sess *s, const struct smtp_cmd *cmd);

/* The command table (STYLE.md 4): verb, phase, allowed states, handler. */
static const struct fmx_command {
	enum smtp_verb verb;	/* from smtp_cmd_parse */
	enum fmx_phase phase;	/* rules that apply */
	unsigned states;	/* ST() mask where it is allowed */
	fmx_cmd_fn fn;		/* its handler */
} fmx_commands[] = {
	{ SMTP_CMD_HELO, FMX_PH_EHLO, ST_LIVE, fmx_cmd_helo },
	{ SMTP_CMD_EHLO, FMX_PH_EHLO, ST_LIVE, fmx_cmd_helo },
	{ SMTP_CMD_STARTTLS, FMX_PH_STARTTLS,
	    ST(FMX_ST_INIT) | ST(FMX_ST_READY), fmx_cmd_starttls },
	{ SMTP_CMD_MAIL, FMX_PH_MAIL, ST(FMX_ST_READY), fmx_cmd_mail },
	{ SMTP_CMD_RCPT, FMX_PH_RCPT, ST(FMX_ST_MAIL) | ST(FMX_ST_RCPT),
	    fmx_cmd_rcpt },
	{ SMTP_CMD_DATA, FMX_PH_DATA, ST(FMX_ST_RCPT), fmx_cmd_data },
	{ SMTP_CMD_RSET, FMX_PH_RSET, ST_LIVE, fmx_cmd_simple },
	{ SMTP_CMD_NOOP, FMX_PH_NOOP, ST_LIVE | ST(FMX_ST_NOSERVICE),
	    fmx_cmd_simple },
	{ SMTP_CMD_QUIT, FMX_PH_QUIT, ST_LIVE | ST(FMX_ST_NOSERVICE),
	    fmx_cmd_simple },
	{ SMTP_CMD_AUTH, FMX_PH_OTHER, ST_LIVE, fmx_cmd_unimpl },
	{ SMTP_CMD_BDAT, FMX_PH_OTHER, ST_LIVE, fmx_cmd_unimpl },
	{ SMTP_CMD_HELP, FMX_PH_OTHER, ST_LIVE, fmx_cmd_unimpl },
	{ SMTP_CMD_VRFY, FMX_PH_OTHER, ST_LIVE, fmx_cmd_unimpl },
	{ SMTP_CMD_EXPN, FMX_PH_OTHER, ST_LIVE, fmx_cmd_unimpl },
};

static void fmx_on_line(struct conn *c, char *line, size_t len,
    bool too_long);
static size_t fmx_on_raw(struct conn *c, const char *data, size_t len);
static void fmx_on_tls_ready(struct conn *c);
static void fmx_on_timeout(struct conn *c);
static void fmx_on_eof(struct conn *c, const char *reason);
static void fmx_on_closed(struct conn *c);

static const struct conn_ops fmx_conn_ops = {
	.on_line = fmx_on_line,
	.on_raw = fmx_on_raw,
	.on_tls_ready = fmx_on_tls_ready,
	.on_timeout = fmx_on_timeout,
	.on_eof = fmx_on_eof,
	.on_closed = fmx_on_closed,
};

static void fmx_decide(struct fmx_sess *s, enum fmx_phase ph,
    const char *arg);
static void fmx_reply_now(struct fmx_sess *s, const char *wire);
static void fmx_send(struct fmx_sess *s);
static void fmx_reply_done(struct fmx_sess *s);
static void fmx_apply(struct fmx_sess *s, int code);
static void fmx_close(struct fmx_sess *s, const char *reason);
static void fmx_stop(struct fmx *f, const char *why);
static void fmx_on_sess_timer(uv_timer_t *t);
static void fmx_on_sess_freed(uv_handle_t *h);
static void usage(void) __attribute__((noreturn));

/* ------------------------------------------------------------------ */
/* JSON records                                                        */

/* fmx_utf8_len - length of the valid UTF-8 sequence at p, or 0 */
static size_t
fmx_utf8_len(const unsigned char *p, const unsigned char *end)
{
	unsigned char c = p[0], lo = 0x80, hi = 0xbf;
	size_t n, i;

	if (c >= 0xc2 && c <= 0xdf)
		n = 2;
	else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		if (c == 0xe0)
			lo = 0xa0;
		else if (c == 0xed)
			hi = 0x9f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		if (c == 0xf0)
			lo = 0x90;
		else if (c == 0xf4)
			hi = 0x8f;
	} else
		return 0;
	if ((size_t)(end - p) < n || p[1] < lo || p[1] > hi)
		return 0;
	for (i = 2; i < n; i++)
		if ((p[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

/*
 * fmx_json_escape - s[0..len) as a JSON string. Peers send arbitrary
 * octets; a byte that is not part of valid UTF-8 becomes \u00XX (its
 * Latin-1 reading), so every record line is valid JSON.
 */
static void
fmx_json_escape(struct buf *b, const char *s, size_t len)
{
	const unsigned char *p = (const unsigned char *)s, *end = p + len;
	const unsigned char *run;

	buf_append(b, "\"", 1);
	while (p < end) {
		run = p;
		while (p < end && *p >= 0x20 && *p < 0x7f && *p != '"' &&
		    *p != '\\')
			p++;
		if (p > run)
			buf_append(b, run, (size_t)(p - run));
		if (p == end)
			break;
		if (*p == '"' || *p == '\\') {
			buf_append(b, "\\", 1);
			buf_append(b, p++, 1);
		} else if (*p == '\n') {
			buf_puts(b, "\\n");
			p++;
		} else if (*p == '\r') {
			buf_puts(b, "\\r");
			p++;
		} else if (*p == '\t') {
			buf_puts(b, "\\t");
			p++;
		} else if (*p < 0x80) {
			buf_printf(b, "\\u%04x", *p++);
		} else {
			size_t n = fmx_utf8_len(p, end);

			if (n == 0)
				buf_printf(b, "\\u%04x", *p++);
			else {
				buf_append(b, p, n);
				p += n;
			}
		}
	}
	buf_append(b, "\"", 1);
}

/* fmx_json_str - append ,"key":"value" */
static void
fmx_json_str(struct buf *b, const char *key, const char *v)
{
	buf_printf(b, ",\"%s\":", key);
	fmx_json_escape(b, v, strlen(v));
}

/* fmx_json_head - open a record object: time, event, listener, conn */
static void
fmx_json_head(struct buf *b, const char *event, const struct fmx_sess *s)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	buf_printf(b, "{\"t\":%lld.%03ld,\"event\":\"%s\"",
	    (long long)ts.tv_sec, ts.tv_nsec / 1000000, event);
	if (s) {
		fmx_json_str(b, "listener", s->lst->name);
		buf_printf(b, ",\"conn\":%" PRIu64, s->id);
	}
}

/* fmx_rec_flush - write the buffered record lines */
static void
fmx_rec_flush(struct fmx *f)
{
	int rc;

	if (f->rec_fd < 0 || f->rec.len == 0)
		return;
	if ((rc = fd_write_all(f->rec_fd, f->rec.data, f->rec.len)) < 0)
		log_warnx("record write %s: %s", f->record_path,
		    relay_strerror(rc));
	buf_reset(&f->rec);
}

/*
 * fmx_rec_begin - start a record line if recording and ev is wanted.
 * Returns the buffer to append ,"key":value pairs to, or NULL; a non-NULL
 * return must be closed with fmx_rec_end.
 */
static struct buf *
fmx_rec_begin(struct fmx *f, unsigned ev, const char *event,
    const struct fmx_sess *s)
{
	if (f->rec_fd < 0 || !(f->events & ev))
		return NULL;
	fmx_json_head(&f->rec, event, s);
	return &f->rec;
}

/* fmx_rec_end - close the line; write it now unless --no-flush */
static void
fmx_rec_end(struct fmx *f)
{
	buf_append(&f->rec, "}\n", 2);
	if (f->flush || f->rec.len >= FMX_REC_HIWAT)
		fmx_rec_flush(f);
}

static void
fmx_on_flush_timer(uv_timer_t *t)
{
	fmx_rec_flush(t->data);
}

/* ------------------------------------------------------------------ */
/* Hash tables for the knobs                                           */

static uint64_t
fmx_hash(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
	return h;
}

/* fmx_table_clear - drop every entry (also the memory of the slots) */
static void
fmx_table_clear(struct fmx_table *t)
{
	for (size_t i = 0; i < t->nslot; i++) {
		struct fmx_entry *e = t->slot[i], *n;

		for (; e; e = n) {
			n = e->next;
			free(e);
		}
	}
	free(t->slot);
	t->slot = NULL;
	t->nslot = 0;
	t->count = 0;
}

/* fmx_table_grow - double the buckets and rehash */
static void
fmx_table_grow(struct fmx_table *t)
{
	size_t n = t->nslot ? t->nslot * 2 : 1024;
	struct fmx_entry **slot = xcalloc(n, sizeof *slot);

	for (size_t i = 0; i < t->nslot; i++) {
		struct fmx_entry *e = t->slot[i], *nx;

		for (; e; e = nx) {
			nx = e->next;
			e->next = slot[e->hash & (n - 1)];
			slot[e->hash & (n - 1)] = e;
		}
	}
	free(t->slot);
	t->slot = slot;
	t->nslot = n;
}

/*
 * fmx_table_get - find or create the entry for key; *created tells which.
 * The table is bounded: at FMX_TABLE_MAX entries it starts over, which a
 * test tool can afford (a greylisted triplet is simply greylisted again).
 */
static struct fmx_entry *
fmx_table_get(struct fmx_table *t, const char *key, bool *created)
{
	uint64_t h = fmx_hash(key);
	struct fmx_entry *e;
	size_t klen;

	if (t->nslot) {
		for (e = t->slot[h & (t->nslot - 1)]; e; e = e->next)
			if (e->hash == h && strcmp(e->key, key) == 0) {
				*created = false;
				return e;
			}
	}
	if (t->count >= FMX_TABLE_MAX) {
		log_warnx("%s table full (%zu entries): starting over",
		    t->what, t->count);
		fmx_table_clear(t);
	}
	if (t->count >= t->nslot)
		fmx_table_grow(t);
	klen = strlen(key);
	e = xcalloc(1, sizeof *e + klen + 1);
	memcpy(e->key, key, klen + 1);
	e->hash = h;
	e->next = t->slot[h & (t->nslot - 1)];
	t->slot[h & (t->nslot - 1)] = e;
	t->count++;
	*created = true;
	return e;
}

/* ------------------------------------------------------------------ */
/* Replies                                                             */

/*
 * fmx_render - append a reply: text may hold the two characters "\n" to
 * start a new line of the same reply (code repeated, '-' continuation).
 */
static void
fmx_render(struct buf *b, int code, const char *text)
{
	const char *p = text, *nl;

	for (;;) {
		nl = strstr(p, "\\n");
		if (nl == NULL) {
			buf_printf(b, "%03d%s%s\r\n", code, *p ? " " : "", p);
			return;
		}
		buf_printf(b, "%03d-%.*s\r\n", code, (int)(nl - p), p);
		p = nl + 2;
	}
}

/* fmx_render_dup - fmx_render into a new heap string */
static char *
fmx_render_dup(int code, const char *text)
{
	struct buf b;

	buf_init(&b);
	fmx_render(&b, code, text);
	return b.data;
}

/* fmx_raw_dup - a garbage line: text with "\n" escapes as CRLF, + CRLF */
static char *
fmx_raw_dup(const char *text)
{
	struct buf b;
	const char *p = text, *nl;

	buf_init(&b);
	while ((nl = strstr(p, "\\n")) != NULL) {
		buf_append(&b, p, (size_t)(nl - p));
		buf_puts(&b, "\r\n");
		p = nl + 2;
	}
	buf_puts(&b, p);
	buf_puts(&b, "\r\n");
	return b.data;
}

/* fmx_pad_longline - pad the first line of the reply to len octets */
static void
fmx_pad_longline(struct buf *b, size_t len)
{
	struct buf nb;
	char *crlf = strstr(b->data ? b->data : "", "\r\n");
	size_t first = crlf ? (size_t)(crlf - b->data) : b->len;

	buf_init(&nb);
	buf_append(&nb, b->data, first);
	if (nb.len < len) {
		buf_append(&nb, " ", 1);
		while (nb.len < len)
			buf_append(&nb, "x", 1);
	}
	if (crlf)
		buf_append(&nb, crlf, b->len - first);
	else
		buf_puts(&nb, "\r\n");
	buf_free(b);
	*b = nb;
}

/* fmx_reply_code - the 3-digit code at the start of wire text, or 0 */
static int
fmx_reply_code(const char *w)
{
	if (w[0] < '1' || w[0] > '5' || w[1] < '0' || w[1] > '9' ||
	    w[2] < '0' || w[2] > '9')
		return 0;
	return (w[0] - '0') * 100 + (w[1] - '0') * 10 + (w[2] - '0');
}

/* fmx_ehlo_reply - the multi-line EHLO reply for this session */
static void
fmx_ehlo_reply(struct fmx_sess *s, struct buf *b)
{
	struct fmx *f = s->fmx;
	const char *kw[FMX_MAX_EXT + 1];
	size_t n = 0;

	for (size_t i = 0; i < f->next; i++) {
		if (s->tls && str_hasprefix_i(f->ext[i], "STARTTLS"))
			continue;
		kw[n++] = f->ext[i];
	}
	if (!f->ext_custom && f->tls && !s->tls)
		kw[n++] = "STARTTLS";
	buf_printf(b, "250%c%s\r\n", n ? '-' : ' ', f->hostname);
	for (size_t i = 0; i < n; i++)
		buf_printf(b, "250%c%s\r\n", i + 1 < n ? '-' : ' ', kw[i]);
}

/*
 * fmx_default - the knobs, then the built-in reply, for phase ph into
 * s->reply; returns the code. Knobs run only here, so a rule that fires
 * (other than pass) skips them: the rate counter does not count a MAIL
 * that a rule answered.
 */
static int
fmx_default(struct fmx_sess *s, enum fmx_phase ph)
{
	struct fmx *f = s->fmx;
	struct buf *b = &s->reply;
	struct fmx_entry *e;
	bool created;
	uint64_t now;

	switch (ph) {
	case FMX_PH_CONNECT:
		buf_printf(b, "220 %s ESMTP fake-mx\r\n", f->hostname);
		return 220;
	case FMX_PH_EHLO:
		if (s->esmtp)
			fmx_ehlo_reply(s, b);
		else
			buf_printf(b, "250 %s\r\n", f->hostname);
		return 250;
	case FMX_PH_STARTTLS:
		buf_puts(b, "220 2.0.0 Ready to start TLS\r\n");
		return 220;
	case FMX_PH_MAIL:
		if (f->max_msgs && s->nmsg >= f->max_msgs) {
			/* Yahoo's words; a 421 closes the connection. */
			buf_puts(b, "421 Max message per connection "
			    "reached, closing transmission channel\r\n");
			return 421;
		}
		if (f->rate_n) {
			/* Fixed windows per client IP, as anvil counts. */
			now = time_now_ms();
			e = fmx_table_get(&f->rate_tab, s->peer, &created);
			if (created || now - e->a >= f->rate_window_ms) {
				e->a = now;
				e->b = 0;
			}
			if (++e->b > f->rate_n) {
				if (f->rate_phase == FMX_PH_RCPT)
					s->rate_blocked = true;
				else
					goto rate;
			}
		}
		buf_puts(b, "250 2.1.0 Ok\r\n");
		return 250;
	case FMX_PH_RCPT:
		if (s->rate_blocked)
			goto rate;
		if (f->greylist_ms) {
			struct buf key;
			const char *dom = strrchr(s->pending_addr, '@');
			uint64_t left = 0;

			buf_init(&key);
			buf_printf(&key, "%s/%s/%s", s->peer, s->from,
			    s->pending_addr);
			for (size_t i = 0; i < key.len; i++)
				if (key.data[i] >= 'A' && key.data[i] <= 'Z')
					key.data[i] += 'a' - 'A';
			now = time_now_ms();
			e = fmx_table_get(&f->grey_tab, key.data, &created);
			buf_free(&key);
			if (created) {
				e->a = now;
				left = f->greylist_ms;
			} else if (now - e->a < f->greylist_ms)
				left = f->greylist_ms - (now - e->a);
			if (left) {
				buf_printf(b, "450 4.2.0 <%s>: Recipient address "
				    "rejected: Greylisted, see http://postgrey"
				    ".schweikert.ch/help/%s.html; please come "
				    "back in %" PRIu64 " seconds\r\n",
				    s->pending_addr, dom ? dom + 1 : "",
				    (left + 999) / 1000);
				return 450;
			}
		}
		buf_puts(b, "250 2.1.5 Ok\r\n");
		return 250;
	case FMX_PH_DATA:
		buf_puts(b, "354 End data with <CR><LF>.<CR><LF>\r\n");
		return 354;
	case FMX_PH_DOT:
		if (f->max_size && s->body_size > f->max_size) {
			buf_puts(b, "552 5.3.4 Error: message file too big\r\n");
			return 552;
		}
		s->qid = ++f->next_qid;
		buf_printf(b, "250 2.0.0 Ok: queued as %010" PRIX64 "\r\n",
		    s->qid);
		return 250;
	case FMX_PH_QUIT:
		buf_puts(b, "221 2.0.0 Bye\r\n");
		return 221;
	case FMX_PH_RSET:
	case FMX_PH_NOOP:
	case FMX_PH_OTHER:
	case FMX_PH_LAST:
		break;
	}
	buf_puts(b, "250 2.0.0 Ok\r\n");
	return 250;
rate:
	if (f->rate_wire) {
		buf_puts(b, f->rate_wire);
		return f->rate_code;
	}
	buf_printf(b, "421 4.7.0 Error: too much mail from %s\r\n", s->peer);
	return 421;
}

/* fmx_rules_match - the first rule for ph that fires, or NULL */
static struct fmx_rule *
fmx_rules_match(struct fmx *f, struct fmx_sess *s, enum fmx_phase ph,
    const char *arg)
{
	for (size_t i = 0; i < f->nrules; i++) {
		struct fmx_rule *r = &f->rules[i];
		bool fire;

		if (r->phase != ph)
			continue;
		if (r->listener && strcmp(r->listener, s->lst->name) != 0)
			continue;
		if (r->has_re &&
		    (regexec(&r->re, arg, 0, NULL, 0) == 0) == r->negate)
			continue;
		r->seen++;
		switch (r->count) {
		case FMX_CNT_EVERY:
			fire = r->seen % r->n == 0;
			break;
		case FMX_CNT_FIRST:
			fire = r->seen <= r->n;
			break;
		case FMX_CNT_AFTER:
			fire = r->seen > r->n;
			break;
		default:
			fire = true;
		}
		if (fire) {
			if (f->verbose)
				log_info("%" PRIu64 " rule fired: %s", s->id,
				    r->src);
			return r;
		}
	}
	return NULL;
}

/*
 * fmx_decide - choose the reply to phase ph (rules, else knobs and the
 * default) and send it. arg is what ~REGEX rules see.
 */
static void
fmx_decide(struct fmx_sess *s, enum fmx_phase ph, const char *arg)
{
	struct fmx *f = s->fmx;
	struct fmx_rule *r = fmx_rules_match(f, s, ph, arg);
	enum fmx_action act = r ? r->action : FMX_ACT_PASS;
	int code = 0;

	buf_reset(&s->reply);
	s->out.phase = ph;
	s->out.action = act;
	s->out.delay_ms = r && r->delay_ms >= 0 ? (uint64_t)r->delay_ms :
	    f->delay_ms;
	s->out.gap_ms = r ? r->gap_ms : FMX_GAP_MS;
	s->out.sent = 0;
	switch (act) {
	case FMX_ACT_REPLY:
	case FMX_ACT_GARBAGE:
		code = r->code;
		buf_puts(&s->reply, r->wire);
		break;
	case FMX_ACT_CLOSE:
	case FMX_ACT_STALL:
		break;
	case FMX_ACT_PASS:
	case FMX_ACT_SPLIT:
	case FMX_ACT_LONGLINE:
	case FMX_ACT_LAST:
		if (r && r->code) {
			code = r->code;
			buf_puts(&s->reply, r->wire);
		} else
			code = fmx_default(s, ph);
		if (act == FMX_ACT_LONGLINE)
			fmx_pad_longline(&s->reply, r->len);
		break;
	}
	s->out.code = code;
	fmx_send(s);
}

/* fmx_reply_now - a protocol reply outside the rules (errors, limits) */
static void
fmx_reply_now(struct fmx_sess *s, const char *wire)
{
	buf_reset(&s->reply);
	buf_puts(&s->reply, wire);
	s->out.phase = FMX_PH_OTHER;
	s->out.action = FMX_ACT_REPLY;
	s->out.code = fmx_reply_code(wire);
	s->out.delay_ms = s->fmx->delay_ms;
	s->out.gap_ms = 0;
	s->out.sent = 0;
	fmx_send(s);
}

/* fmx_record_reply - the "reply" record for s->out */
static void
fmx_record_reply(struct fmx_sess *s)
{
	struct fmx *f = s->fmx;
	struct buf *b;
	size_t len = s->reply.len;

	if (f->verbose)
		log_info("%" PRIu64 " > %s %.*s", s->id,
		    fmx_action_names[s->out.action],
		    (int)(len > 200 ? 200 : len), s->reply.data ?
		    s->reply.data : "");
	if ((b = fmx_rec_begin(f, FMX_EV_REPLY, "reply", s)) == NULL)
		return;
	fmx_json_str(b, "phase", fmx_phase_names[s->out.phase]);
	buf_printf(b, ",\"code\":%d", s->out.code);
	if (s->out.action != FMX_ACT_REPLY && s->out.action != FMX_ACT_PASS)
		fmx_json_str(b, "action", fmx_action_names[s->out.action]);
	/* Without the final CRLF; a longline is recorded by its length. */
	if (len >= 2 && s->reply.data[len - 1] == '\n')
		len -= 2;
	if (s->out.action == FMX_ACT_LONGLINE)
		buf_printf(b, ",\"length\":%zu", s->reply.len);
	else {
		buf_puts(b, ",\"text\":");
		fmx_json_escape(b, s->reply.data ? s->reply.data : "", len);
	}
	fmx_rec_end(f);
}

/*
 * fmx_send - deliver s->out: now, or after a delay / byte by byte from
 * the session timer with the conn paused, or never (stall), or by
 * closing. Every path ends in exactly one fmx_apply.
 */
static void
fmx_send(struct fmx_sess *s)
{
	switch (s->out.action) {
	case FMX_ACT_STALL:
		fmx_record_reply(s);
		fmx_apply(s, 0);
		if (!s->closing) {
			s->stalled = true;
			conn_pause(s->conn);
		}
		return;
	case FMX_ACT_CLOSE:
		fmx_record_reply(s);
		fmx_apply(s, 0);
		fmx_close(s, "script");
		return;
	default:
		break;
	}
	if (s->out.delay_ms || s->out.action == FMX_ACT_SPLIT) {
		s->out.pending = true;
		conn_pause(s->conn);
		uv_timer_start(&s->timer, fmx_on_sess_timer, s->out.delay_ms, 0);
		return;
	}
	conn_write(s->conn, s->reply.data, s->reply.len);
	fmx_reply_done(s);
}

/* fmx_reply_done - the reply is written: count it, record it, act on it */
static void
fmx_reply_done(struct fmx_sess *s)
{
	struct fmx *f = s->fmx;

	if (s->out.code >= 0 && s->out.code < FMX_NCODES)
		f->replies[s->out.code]++;
	fmx_record_reply(s);
	fmx_apply(s, s->out.code);
}

/* fmx_alive - the conn can still be used */
static bool
fmx_alive(const struct fmx_sess *s)
{
	return s->conn && !s->closing && !conn_is_closing(s->conn);
}

static void
fmx_on_sess_timer(uv_timer_t *t)
{
	struct fmx_sess *s = t->data;

	if (!fmx_alive(s) || !s->out.pending)
		return;
	if (s->out.action == FMX_ACT_SPLIT) {
		if (s->out.sent < s->reply.len)
			conn_write(s->conn, s->reply.data + s->out.sent++, 1);
		if (!fmx_alive(s))
			return;
		if (s->out.sent < s->reply.len) {
			uv_timer_start(&s->timer, fmx_on_sess_timer,
			    s->out.gap_ms, 0);
			return;
		}
	} else
		conn_write(s->conn, s->reply.data, s->reply.len);
	s->out.pending = false;
	fmx_reply_done(s);
	if (fmx_alive(s) && !s->stalled)
		conn_resume(s->conn);
}

/* ------------------------------------------------------------------ */
/* Sessions                                                            */

/* fmx_enter_state - the only assignment of s->state */
static void
fmx_enter_state(struct fmx_sess *s, enum fmx_state st)
{
	if (s->fmx->verbose && s->state != st)
		log_info("%" PRIu64 " state %s -> %s", s->id,
		    fmx_state_names[s->state], fmx_state_names[st]);
	s->state = st;
}

/* fmx_body_discard - drop the -k temporary file, if any */
static void
fmx_body_discard(struct fmx_sess *s)
{
	if (s->body_fd >= 0) {
		close(s->body_fd);
		s->body_fd = -1;
	}
	if (s->body_tmp) {
		unlink(s->body_tmp);
		free(s->body_tmp);
		s->body_tmp = NULL;
	}
}

/* fmx_tx_reset - forget the transaction (RSET, EHLO, end of message) */
static void
fmx_tx_reset(struct fmx_sess *s)
{
	free(s->from);
	s->from = NULL;
	for (size_t i = 0; i < s->nrcpt; i++)
		free(s->rcpts[i]);
	s->nrcpt = 0;
	s->rate_blocked = false;
	fmx_body_discard(s);
}

/* fmx_close - reply nothing more, close once the output is written */
static void
fmx_close(struct fmx_sess *s, const char *reason)
{
	if (s->closing || s->conn == NULL)
		return;
	s->closing = true;
	if (!s->close_reason[0])
		str_copy(s->close_reason, reason, sizeof s->close_reason);
	conn_shutdown(s->conn, reason);
}

/* fmx_body_begin - after a 3xx to DATA: the conn goes raw */
static void
fmx_body_begin(struct fmx_sess *s)
{
	struct fmx *f = s->fmx;

	smtp_dot_init(&s->dot);
	if (s->md == NULL && (s->md = EVP_MD_CTX_new()) == NULL)
		relay_panic("EVP_MD_CTX_new failed");
	if (EVP_DigestInit_ex(s->md, EVP_sha256(), NULL) != 1)
		relay_panic("EVP_DigestInit_ex(sha256) failed");
	s->body_size = 0;
	s->qid = 0;
	buf_reset(&s->head);
	if (f->keep_dir) {
		s->body_tmp = xasprintf("%s/.tmp.%d.%" PRIu64 ".%" PRIu64,
		    f->keep_dir, (int)getpid(), s->id, s->nmsg);
		s->body_fd = open(s->body_tmp, O_WRONLY | O_CREAT | O_TRUNC |
		    O_CLOEXEC, 0644);
		if (s->body_fd < 0) {
			log_warn("%s", s->body_tmp);
			free(s->body_tmp);
			s->body_tmp = NULL;
		}
	}
	fmx_enter_state(s, FMX_ST_BODY);
	conn_set_mode(s->conn, CONN_MODE_RAW);
}

/* fmx_record_message - the "message" or "rejected" record */
static void
fmx_record_message(struct fmx_sess *s, bool accepted, int code,
    const char *body_file)
{
	struct fmx *f = s->fmx;
	struct buf *b;

	b = fmx_rec_begin(f, accepted ? FMX_EV_MESSAGE : FMX_EV_REJECTED,
	    accepted ? "message" : "rejected", s);
	if (b == NULL)
		return;
	buf_printf(b, ",\"msg\":%" PRIu64, s->nmsg);
	if (accepted)
		buf_printf(b, ",\"queue_id\":\"%010" PRIX64 "\"", s->qid);
	else
		buf_printf(b, ",\"code\":%d", code);
	fmx_json_str(b, "helo", s->helo);
	fmx_json_str(b, "from", s->from ? s->from : "");
	buf_puts(b, ",\"rcpts\":[");
	for (size_t i = 0; i < s->nrcpt; i++) {
		if (i)
			buf_append(b, ",", 1);
		fmx_json_escape(b, s->rcpts[i], strlen(s->rcpts[i]));
	}
	buf_printf(b, "],\"size\":%" PRIu64 ",\"sha256\":\"%s\"",
	    s->body_size, s->sha256);
	if (body_file)
		fmx_json_str(b, "body_file", body_file);
	buf_printf(b, ",\"tls\":%s", s->tls ? "true" : "false");
	fmx_rec_end(f);
}

/* fmx_message_done - the reply to the body is out (code 0: none was) */
static void
fmx_message_done(struct fmx_sess *s, int code)
{
	struct fmx *f = s->fmx;
	char *path = NULL;

	s->nmsg++;
	if (code >= 200 && code < 300) {
		if (s->qid == 0)
			s->qid = ++f->next_qid;	/* a scripted 2xx */
		f->messages++;
		s->lst->messages++;
		f->bytes += s->body_size;
		if (s->body_fd >= 0) {
			path = xasprintf("%s/%s", f->keep_dir, s->sha256);
			if (close(s->body_fd) < 0 ||
			    rename(s->body_tmp, path) < 0) {
				log_warn("keep %s", path);
				free(path);
				path = NULL;
			}
			s->body_fd = -1;
		}
		fmx_record_message(s, true, code, path);
		free(path);
	} else {
		f->messages_rejected++;
		fmx_record_message(s, false, code, NULL);
	}
	fmx_tx_reset(s);
	fmx_enter_state(s, FMX_ST_READY);
}

/*
 * fmx_apply - act on the reply just sent for s->out.phase: state changes,
 * STARTTLS, the body, the message record, and closing after QUIT or any
 * 421. code 0 means no usable reply went out (close, stall, garbage).
 */
static void
fmx_apply(struct fmx_sess *s, int code)
{
	bool ok = code >= 200 && code < 300;
	char *addr = s->pending_addr;
	int rc;

	s->pending_addr = NULL;
	if (s->closing || s->conn == NULL) {
		free(addr);
		return;
	}
	switch (s->out.phase) {
	case FMX_PH_CONNECT:
		fmx_enter_state(s, ok ? FMX_ST_INIT : FMX_ST_NOSERVICE);
		break;
	case FMX_PH_EHLO:
		if (ok) {
			fmx_tx_reset(s);
			str_copy(s->helo, s->helo_pending, sizeof s->helo);
			fmx_enter_state(s, FMX_ST_READY);
		}
		break;
	case FMX_PH_STARTTLS:
		if (code != 220)
			break;
		if ((rc = conn_start_tls(s->conn, s->fmx->tls, true,
		    NULL)) < 0) {
			/*
			 * Bytes pipelined after STARTTLS (RFC 3207): the
			 * 220 still goes out in clear, then we hang up.
			 */
			fmx_close(s, rc == RELAY_EPROTO ?
			    "starttls: pipelined input" : "starttls failed");
			break;
		}
		fmx_tx_reset(s);
		s->helo[0] = '\0';
		fmx_enter_state(s, FMX_ST_INIT);
		break;
	case FMX_PH_MAIL:
		if (ok && addr) {
			s->from = addr;
			addr = NULL;
			fmx_enter_state(s, FMX_ST_MAIL);
		}
		break;
	case FMX_PH_RCPT:
		if (ok && addr) {
			if (s->nrcpt == s->rcpt_cap) {
				s->rcpt_cap = s->rcpt_cap ? s->rcpt_cap * 2 : 8;
				s->rcpts = xrealloc(s->rcpts,
				    s->rcpt_cap * sizeof *s->rcpts);
			}
			s->rcpts[s->nrcpt++] = addr;
			addr = NULL;
			fmx_enter_state(s, FMX_ST_RCPT);
		}
		break;
	case FMX_PH_DATA:
		if (code >= 300 && code < 400)
			fmx_body_begin(s);
		break;
	case FMX_PH_DOT:
		fmx_message_done(s, code);
		break;
	case FMX_PH_RSET:
		if (ok) {
			fmx_tx_reset(s);
			fmx_enter_state(s, s->helo[0] ? FMX_ST_READY :
			    FMX_ST_INIT);
		}
		break;
	case FMX_PH_QUIT:
		fmx_close(s, "quit");
		break;
	case FMX_PH_NOOP:
	case FMX_PH_OTHER:
	case FMX_PH_LAST:
		break;
	}
	free(addr);
	if (code == 421)
		fmx_close(s, "421");
}

/* fmx_seq_error - the reply to a command not allowed in this state */
static const char *
fmx_seq_error(const struct fmx_sess *s, enum smtp_verb verb)
{
	if (s->state == FMX_ST_NOSERVICE)
		return "503 5.5.1 Error: no SMTP service here\r\n";
	switch (verb) {
	case SMTP_CMD_MAIL:
		return s->state == FMX_ST_INIT ?
		    "503 5.5.1 Error: send HELO/EHLO first\r\n" :
		    "503 5.5.1 Error: nested MAIL command\r\n";
	case SMTP_CMD_RCPT:
		return "503 5.5.1 Error: need MAIL command\r\n";
	case SMTP_CMD_DATA:
		return s->state == FMX_ST_MAIL ?
		    "554 5.5.1 Error: no valid recipients\r\n" :
		    "503 5.5.1 Error: need RCPT command\r\n";
	case SMTP_CMD_STARTTLS:
		return "503 5.5.1 Error: MAIL transaction in progress\r\n";
	default:
		return "503 5.5.1 Error: bad sequence of commands\r\n";
	}
}

static void
fmx_on_line(struct conn *c, char *line, size_t len, bool too_long)
{
	struct fmx_sess *s = conn_owner(c);
	struct fmx *f = s->fmx;
	const struct fmx_command *cmd = NULL;
	struct smtp_cmd sc;
	struct buf *b;

	if (s->closing)
		return;
	if (f->verbose)
		log_info("%" PRIu64 " < %.*s", s->id, (int)(len > 200 ? 200 :
		    len), line);
	if (too_long || strlen(line) != len) {
		if ((b = fmx_rec_begin(f, FMX_EV_COMMAND, "unknown", s))) {
			fmx_json_str(b, "error", too_long ? "line too long" :
			    "NUL in command");
			fmx_rec_end(f);
		}
		fmx_reply_now(s, too_long ? "500 5.5.0 Error: line too long\r\n" :
		    "500 5.5.2 Error: bad syntax\r\n");
		return;
	}
	smtp_cmd_parse(line, &sc);
	for (size_t i = 0; i < ARRAY_SIZE(fmx_commands); i++)
		if (fmx_commands[i].verb == sc.verb)
			cmd = &fmx_commands[i];
	if ((b = fmx_rec_begin(f, FMX_EV_COMMAND, cmd ? fmx_phase_names[
	    cmd->phase] : "unknown", s))) {
		if (cmd && cmd->phase == FMX_PH_OTHER)
			fmx_json_str(b, "verb", smtp_verb_name(sc.verb));
		if (cmd && sc.verb == SMTP_CMD_HELO)
			fmx_json_str(b, "verb", "HELO");
		if (cmd && sc.arg)
			fmx_json_str(b, "arg", sc.arg);
		else
			fmx_json_str(b, "line", line);
		fmx_rec_end(f);
	}
	if (cmd == NULL) {
		fmx_reply_now(s, s->state == FMX_ST_NOSERVICE ?
		    fmx_seq_error(s, sc.verb) :
		    "502 5.5.2 Error: command not recognized\r\n");
		return;
	}
	if (!(cmd->states & ST(s->state))) {
		fmx_reply_now(s, fmx_seq_error(s, sc.verb));
		return;
	}
	cmd->fn(s, &sc);
}

static void
fmx_cmd_helo(struct fmx_sess *s, const struct smtp_cmd *cmd)
{
	s->esmtp = cmd->verb == SMTP_CMD_EHLO;
	if (cmd->arg == NULL || cmd->arg[0] == '\0') {
		fmx_reply_now(s, s->esmtp ? "501 5.5.4 Syntax: EHLO hostname\r\n" :
		    "501 5.5.4 Syntax: HELO hostname\r\n");
		return;
	}
	str_copy(s->helo_pending, cmd->arg, sizeof s->helo_pending);
	fmx_decide(s, FMX_PH_EHLO, cmd->arg);
}

static void
fmx_cmd_starttls(struct fmx_sess *s, const struct smtp_cmd *cmd)
{
	if (cmd->arg && cmd->arg[0])
		fmx_reply_now(s, "501 5.5.4 Syntax: STARTTLS\r\n");
	else if (s->tls)
		fmx_reply_now(s, "554 5.5.1 Error: TLS already active\r\n");
	else if (s->fmx->tls == NULL)
		fmx_reply_now(s, "454 4.7.0 TLS not available\r\n");
	else
		fmx_decide(s, FMX_PH_STARTTLS, "");
}

/* fmx_size_param - the SIZE= value of MAIL parameters, or 0 */
static uint64_t
fmx_size_param(const char *params)
{
	struct smtp_param p[16];
	int n = smtp_params_parse(params, p, ARRAY_SIZE(p));

	for (int i = 0; i < n; i++)
		if (strcmp(p[i].key, "SIZE") == 0 && p[i].value)
			return strtoull(p[i].value, NULL, 10);
	return 0;
}

static void
fmx_cmd_mail(struct fmx_sess *s, const struct smtp_cmd *cmd)
{
	const char *params, *why;
	char *addr;

	if (cmd->arg == NULL) {
		fmx_reply_now(s, "501 5.5.4 Syntax: MAIL FROM:<address>\r\n");
		return;
	}
	if (smtp_path_parse(cmd->arg, true, true, &addr, &params, &why) < 0) {
		fmx_reply_now(s, "501 5.1.7 Bad sender address syntax\r\n");
		return;
	}
	if (s->fmx->max_size && fmx_size_param(params) > s->fmx->max_size) {
		free(addr);
		fmx_reply_now(s, "552 5.3.4 Message size exceeds fixed "
		    "limit\r\n");
		return;
	}
	s->pending_addr = addr;
	fmx_decide(s, FMX_PH_MAIL, cmd->arg);
}

static void
fmx_cmd_rcpt(struct fmx_sess *s, const struct smtp_cmd *cmd)
{
	const char *params, *why;
	char *addr;

	if (cmd->arg == NULL) {
		fmx_reply_now(s, "501 5.5.4 Syntax: RCPT TO:<address>\r\n");
		return;
	}
	if (smtp_path_parse(cmd->arg, false, true, &addr, &params, &why) < 0) {
		fmx_reply_now(s, "501 5.1.3 Bad recipient address syntax\r\n");
		return;
	}
	if (s->nrcpt >= s->fmx->max_rcpt) {
		free(addr);
		fmx_reply_now(s, "452 4.5.3 Error: too many recipients\r\n");
		return;
	}
	s->pending_addr = addr;
	fmx_decide(s, FMX_PH_RCPT, cmd->arg);
}

static void
fmx_cmd_data(struct fmx_sess *s, const struct smtp_cmd *cmd)
{
	if (cmd->arg && cmd->arg[0])
		fmx_reply_now(s, "501 5.5.4 Syntax: DATA\r\n");
	else
		fmx_decide(s, FMX_PH_DATA, "");
}

/* fmx_cmd_simple - RSET, NOOP, QUIT: rules see the argument */
static void
fmx_cmd_simple(struct fmx_sess *s, const struct smtp_cmd *cmd)
{
	enum fmx_phase ph = cmd->verb == SMTP_CMD_RSET ? FMX_PH_RSET :
	    cmd->verb == SMTP_CMD_NOOP ? FMX_PH_NOOP : FMX_PH_QUIT;

	fmx_decide(s, ph, cmd->arg ? cmd->arg : "");
}

static void
fmx_cmd_unimpl(struct fmx_sess *s, const struct smtp_cmd *cmd)
{
	fmx_reply_now(s, "502 5.5.1 Error: command not implemented\r\n");
}

/*
 * fmx_on_raw - body octets after 354: unstuff, hash, keep the head for
 * dot regexes and the whole for -k; at the end go back to lines and
 * decide the reply. Returns what belonged to the body.
 */
static size_t
fmx_on_raw(struct conn *c, const char *data, size_t len)
{
	struct fmx_sess *s = conn_owner(c);
	struct fmx *f = s->fmx;
	static const char hex[] = "0123456789abcdef";
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	size_t n;
	int rc;

	if (s->closing || s->state != FMX_ST_BODY)
		return len;
	buf_reset(&s->chunk);
	n = smtp_dot_decode(&s->dot, data, len, &s->chunk);
	if (s->chunk.len) {
		EVP_DigestUpdate(s->md, s->chunk.data, s->chunk.len);
		s->body_size += s->chunk.len;
		if (f->need_head && s->head.len < FMX_HEAD_MAX)
			buf_append(&s->head, s->chunk.data,
			    s->chunk.len < FMX_HEAD_MAX - s->head.len ?
			    s->chunk.len : FMX_HEAD_MAX - s->head.len);
		if (s->body_fd >= 0 && (rc = fd_write_all(s->body_fd,
		    s->chunk.data, s->chunk.len)) < 0) {
			log_warnx("%s: %s", s->body_tmp, relay_strerror(rc));
			fmx_body_discard(s);
		}
	}
	if (!s->dot.done)
		return n;
	conn_set_mode(c, CONN_MODE_LINE);
	EVP_DigestFinal_ex(s->md, md, &mdlen);
	for (unsigned int i = 0; i < mdlen && i < 32; i++) {
		s->sha256[2 * i] = hex[md[i] >> 4];
		s->sha256[2 * i + 1] = hex[md[i] & 15];
	}
	s->sha256[64] = '\0';
	fmx_decide(s, FMX_PH_DOT, s->head.data ? s->head.data : "");
	return n;
}

static void
fmx_on_tls_ready(struct conn *c)
{
	struct fmx_sess *s = conn_owner(c);
	struct buf *b;

	s->tls = true;
	if ((b = fmx_rec_begin(s->fmx, FMX_EV_TLS, "tls", s))) {
		fmx_json_str(b, "cipher", conn_tls_text(c));
		fmx_rec_end(s->fmx);
	}
}

static void
fmx_on_timeout(struct conn *c)
{
	struct fmx_sess *s = conn_owner(c);
	char wire[256];

	str_copy(s->close_reason, "timeout", sizeof s->close_reason);
	if (s->closing || s->stalled || s->state == FMX_ST_GREETING) {
		/* A stall means silence; a close already started gives up. */
		s->closing = true;
		conn_close(c, "timeout");
		return;
	}
	snprintf(wire, sizeof wire, "421 4.4.2 %s Error: timeout exceeded\r\n",
	    s->fmx->hostname);
	s->out.phase = FMX_PH_OTHER;
	s->out.action = FMX_ACT_REPLY;
	s->out.code = 421;
	s->out.pending = false;
	buf_reset(&s->reply);
	buf_puts(&s->reply, wire);
	conn_write(c, s->reply.data, s->reply.len);
	fmx_reply_done(s);	/* 421: closes */
}

static void
fmx_on_eof(struct conn *c, const char *reason)
{
	struct fmx_sess *s = conn_owner(c);

	s->closing = true;
	if (!s->close_reason[0])
		str_copy(s->close_reason, reason, sizeof s->close_reason);
}

/* fmx_on_closed - the conn is gone: counters, record, then the timer */
static void
fmx_on_closed(struct conn *c)
{
	struct fmx_sess *s = conn_owner(c);
	struct fmx *f = s->fmx;
	struct buf *b;

	s->conn = NULL;
	if (s->counted) {
		s->lst->cur--;
		f->cur--;
		s->counted = false;
	}
	if ((b = fmx_rec_begin(f, FMX_EV_CLOSE, "close", s))) {
		fmx_json_str(b, "reason", s->close_reason[0] ?
		    s->close_reason : "error");
		buf_printf(b, ",\"messages\":%" PRIu64 ",\"duration_ms\":%"
		    PRIu64, s->nmsg, time_now_ms() - s->t_start);
		fmx_rec_end(f);
	}
	if (s->prev)
		s->prev->next = s->next;
	else
		f->sessions = s->next;
	if (s->next)
		s->next->prev = s->prev;
	s->prev = s->next = NULL;
	uv_close((uv_handle_t *)&s->timer, fmx_on_sess_freed);
}

static void
fmx_on_sess_freed(uv_handle_t *h)
{
	struct fmx_sess *s = h->data;

	fmx_tx_reset(s);
	free(s->pending_addr);
	free(s->rcpts);
	buf_free(&s->reply);
	buf_free(&s->chunk);
	buf_free(&s->head);
	if (s->md)
		EVP_MD_CTX_free(s->md);
	free(s);
}

/* fmx_sess_greet - a new session: the limits, then the greeting */
static void
fmx_sess_greet(struct fmx_sess *s)
{
	struct fmx *f = s->fmx;
	struct fmx_listener *l = s->lst;
	const char *limit = NULL;
	struct buf *b;

	if (f->max_conn && l->cur >= f->max_conn)
		limit = f->max_conn_wire;
	else if (f->max_conn_total && f->cur >= f->max_conn_total)
		limit = f->max_conn_total_wire;
	if ((b = fmx_rec_begin(f, FMX_EV_CONNECT, "connect", s))) {
		fmx_json_str(b, "peer", s->peer);
		buf_printf(b, ",\"port\":%d", s->peer_port);
		if (limit)
			buf_puts(b, ",\"rejected\":true");
		fmx_rec_end(f);
	}
	if (limit) {
		l->rejected++;
		f->rejected++;
		buf_reset(&s->reply);
		buf_puts(&s->reply, limit);
		s->out.phase = FMX_PH_CONNECT;
		s->out.action = FMX_ACT_REPLY;
		s->out.code = fmx_reply_code(limit);
		str_copy(s->close_reason, "max-conn", sizeof s->close_reason);
		conn_write(s->conn, s->reply.data, s->reply.len);
		fmx_reply_done(s);
		fmx_close(s, "max-conn");
		return;
	}
	s->counted = true;
	l->total++;
	f->total++;
	if (++l->cur > l->peak)
		l->peak = l->cur;
	if (++f->cur > f->peak)
		f->peak = f->cur;
	fmx_decide(s, FMX_PH_CONNECT, s->peer);
}

static void
fmx_on_connection(uv_stream_t *server, int status)
{
	struct fmx_listener *l = server->data;
	struct fmx *f = l->fmx;
	struct fmx_sess *s;
	const struct sockaddr *sa;
	int rc;

	if (status < 0) {
		log_warnx("%s accept: %s", l->name, uv_strerror(status));
		return;
	}
	if (f->stopping)
		return;
	s = xcalloc(1, sizeof *s);
	s->fmx = f;
	s->lst = l;
	s->id = ++f->next_conn;
	s->body_fd = -1;
	s->t_start = time_now_ms();
	s->state = FMX_ST_GREETING;
	buf_init(&s->reply);
	buf_init(&s->chunk);
	buf_init(&s->head);
	uv_timer_init(&f->loop, &s->timer);
	s->timer.data = s;
	s->conn = conn_new(&f->loop, &fmx_conn_ops, s, s->id, FMX_LINE_MAX);
	s->next = f->sessions;
	if (f->sessions)
		f->sessions->prev = s;
	f->sessions = s;
	if ((rc = conn_accept(s->conn, server)) < 0) {
		log_warnx("%s accept: %s", l->name, uv_strerror(rc));
		s->closing = true;
		str_copy(s->close_reason, "accept failed",
		    sizeof s->close_reason);
		conn_close(s->conn, "accept failed");
		return;
	}
	str_copy(s->peer, conn_peer(s->conn), sizeof s->peer);
	sa = conn_peer_sa(s->conn);
	s->peer_port = sa->sa_family == AF_INET6 ?
	    ntohs(((const struct sockaddr_in6 *)(const void *)sa)->sin6_port) :
	    ntohs(((const struct sockaddr_in *)(const void *)sa)->sin_port);
	conn_set_timeout(s->conn, f->idle_ms);
	fmx_sess_greet(s);
}

/* ------------------------------------------------------------------ */
/* Stats, signals, stop                                                */

/* fmx_stats - the counters as one JSON object (the "stats" record) */
static void
fmx_stats(struct fmx *f, struct buf *b)
{
	bool first = true;

	fmx_json_head(b, "stats", NULL);
	buf_printf(b, ",\"uptime_ms\":%" PRIu64 ",\"conns\":{\"current\":%"
	    PRIu64 ",\"peak\":%" PRIu64 ",\"total\":%" PRIu64
	    ",\"rejected\":%" PRIu64 "},\"messages\":%" PRIu64
	    ",\"messages_rejected\":%" PRIu64 ",\"bytes\":%" PRIu64,
	    time_now_ms() - f->t_start, f->cur, f->peak, f->total,
	    f->rejected, f->messages, f->messages_rejected, f->bytes);
	buf_puts(b, ",\"listeners\":{");
	for (size_t i = 0; i < f->nlst; i++) {
		struct fmx_listener *l = f->lst[i];

		if (i)
			buf_append(b, ",", 1);
		fmx_json_escape(b, l->name, strlen(l->name));
		buf_puts(b, ":{\"addr\":");
		fmx_json_escape(b, l->addr, strlen(l->addr));
		buf_printf(b, ",\"current\":%" PRIu64 ",\"peak\":%" PRIu64
		    ",\"total\":%" PRIu64 ",\"rejected\":%" PRIu64
		    ",\"messages\":%" PRIu64 "}", l->cur, l->peak, l->total,
		    l->rejected, l->messages);
	}
	buf_puts(b, "},\"replies\":{");
	for (int code = 0; code < FMX_NCODES; code++) {
		if (f->replies[code] == 0)
			continue;
		buf_printf(b, "%s\"%d\":%" PRIu64, first ? "" : ",", code,
		    f->replies[code]);
		first = false;
	}
	buf_puts(b, "}}\n");
}

/* fmx_stats_dump - stats to stderr (-S) and to the record */
static void
fmx_stats_dump(struct fmx *f, bool to_stderr)
{
	struct buf b;

	buf_init(&b);
	fmx_stats(f, &b);
	if (to_stderr)
		fd_write_all(STDERR_FILENO, b.data, b.len);
	if (f->rec_fd >= 0 && (f->events & FMX_EV_STATS)) {
		buf_append(&f->rec, b.data, b.len);
		if (f->flush)
			fmx_rec_flush(f);
	}
	buf_free(&b);
}

static void
fmx_on_signal(uv_signal_t *h, int signum)
{
	struct fmx *f = h->data;

	if (signum == SIGUSR1)
		fmx_stats_dump(f, f->stats_stderr);
	else
		fmx_stop(f, signum == SIGINT ? "SIGINT" : "SIGTERM");
}

static void
fmx_on_life_timer(uv_timer_t *t)
{
	fmx_stop(t->data, "lifetime");
}

/* fmx_stop - close every listener, session and process handle */
static void
fmx_stop(struct fmx *f, const char *why)
{
	if (f->stopping)
		return;
	f->stopping = true;
	if (!f->quiet)
		log_info("stopping: %s", why);
	for (size_t i = 0; i < f->nlst; i++)
		uv_close((uv_handle_t *)&f->lst[i]->tcp, NULL);
	for (struct fmx_sess *s = f->sessions; s; s = s->next) {
		if (s->conn && !conn_is_closing(s->conn)) {
			s->closing = true;
			if (!s->close_reason[0])
				str_copy(s->close_reason, "exit",
				    sizeof s->close_reason);
			conn_close(s->conn, "exit");
		}
	}
	uv_close((uv_handle_t *)&f->life_timer, NULL);
	uv_close((uv_handle_t *)&f->flush_timer, NULL);
	uv_close((uv_handle_t *)&f->sig_usr1, NULL);
	uv_close((uv_handle_t *)&f->sig_term, NULL);
	uv_close((uv_handle_t *)&f->sig_int, NULL);
}

/* ------------------------------------------------------------------ */
/* Options and the script                                              */

static void
usage(void)
{
	fprintf(stderr,
	    "usage: fake-mx -l [NAME=]ADDR:PORT ... [options]\n"
	    "  -l, --listen [NAME=]127.x.y.z:PORT | [::1]:PORT  (repeatable; PORT 0 = any)\n"
	    "  -r, --record FILE      JSON line per event ('-' = stdout)\n"
	    "  -k, --keep DIR         keep accepted bodies as DIR/<sha256>\n"
	    "  -s, --script FILE      rules, one per line\n"
	    "  -e, --rules 'R; R'     rules separated by ';'\n"
	    "  -S, --stats            SIGUSR1 (and exit) print stats JSON to stderr\n"
	    "  -t, --lifetime SEC     exit after SEC seconds\n"
	    "  -T, --idle-timeout SEC per-connection idle timeout (60)\n"
	    "  -H, --hostname NAME    name in greetings (fake-mx.test)\n"
	    "  -m, --max-rcpt N       recipients per message (1000)\n"
	    "  --max-msgs-per-conn N  421 at MAIL after N messages on a\n"
	    "                         connection (as Yahoo)\n"
	    "  -q, --quiet            no log lines on stderr\n"
	    "  -v, --verbose          log commands, replies, state changes\n"
	    "  --max-conn N[:REPLY]   per-listener concurrency limit\n"
	    "  --max-conn-total N[:REPLY]\n"
	    "  --rate R/SEC           messages per client IP per window\n"
	    "  --rate-reply 'CODE TEXT'   --rate-phase mail|rcpt\n"
	    "  --greylist SEC         greylist (IP, sender, recipient)\n"
	    "  --tls CERT[:KEY]       offer STARTTLS\n"
	    "  --ehlo-ext 'K,K V,...' exact EHLO keyword list\n"
	    "  --delay MS             delay before every reply\n"
	    "  --events LIST          record only these event classes\n"
	    "  --no-flush             buffer the record (flushed every 200 ms)\n"
	    "  --die-with-parent      exit when the parent process dies\n"
	    "  --check                parse everything, print the rules, exit\n"
	    "see tools/fake-mx.md\n");
	exit(EX_USAGE_);
}

static void
fmx_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2),
    noreturn));

static void
fmx_usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs("fake-mx: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(EX_USAGE_);
}

/* fmx_parse_u64 - a whole decimal number in [0, max] */
static bool
fmx_parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (s == NULL || *s < '0' || *s > '9')
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v > max)
		return false;
	*out = v;
	return true;
}

/* fmx_parse_ms - seconds (may be fractional, > 0) into milliseconds */
static bool
fmx_parse_ms(const char *s, uint64_t *ms)
{
	char *end;
	double v;

	if (s == NULL || *s < '0' || *s > '9')
		return false;
	errno = 0;
	v = strtod(s, &end);
	if (errno || *end || !(v > 0) || v * 1000 > (double)FMX_MAX_MS)
		return false;
	*ms = (uint64_t)(v * 1000 + 0.5);
	if (*ms == 0)
		*ms = 1;
	return true;
}

/* fmx_parse_reply - "CODE TEXT" into a rendered reply; code set */
static char *
fmx_parse_reply(const char *s, int *code)
{
	while (*s == ' ' || *s == '\t')
		s++;
	if ((*code = fmx_reply_code(s)) == 0 || (s[3] && s[3] != ' '))
		return NULL;
	s += 3;
	while (*s == ' ' || *s == '\t')
		s++;
	return fmx_render_dup(*code, *s ? s : "fake-mx scripted reply");
}

static enum fmx_phase
fmx_phase_parse(const char *w)
{
	if (strcmp(w, "greeting") == 0 || strcmp(w, "banner") == 0)
		return FMX_PH_CONNECT;
	if (strcmp(w, "helo") == 0)
		return FMX_PH_EHLO;
	for (int i = 0; i < FMX_PH_OTHER; i++)
		if (strcmp(w, fmx_phase_names[i]) == 0)
			return (enum fmx_phase)i;
	return FMX_PH_LAST;
}

/* fmx_token - the next whitespace-separated word; *p moves past it */
static char *
fmx_token(char **p)
{
	char *s = *p, *w;

	while (*s == ' ' || *s == '\t')
		s++;
	if (*s == '\0') {
		*p = s;
		return NULL;
	}
	w = s;
	while (*s && *s != ' ' && *s != '\t')
		s++;
	if (*s)
		*s++ = '\0';
	*p = s;
	return w;
}

/* fmx_rest - the rest of the line, trimmed */
static char *
fmx_rest(char *p)
{
	size_t n;

	while (*p == ' ' || *p == '\t')
		p++;
	n = strlen(p);
	while (n && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\r'))
		p[--n] = '\0';
	return p;
}

/*
 * fmx_rule_add - parse one rule (see tools/fake-mx.md):
 *   [@LISTENER] PHASE [~RE | !~RE] [every N | first N | after N]
 *       [delay MS] [gap MS] [len N] ACTION
 * where is names the source for errors. Usage errors exit.
 */
static void
fmx_rule_add(struct fmx *f, const char *text, const char *where)
{
	char *copy = xstrdup(text), *p = copy, *w, *hash;
	struct fmx_rule r;
	uint64_t v;
	int rc, flags;

	/* A comment starts at a '#' at the start or after whitespace. */
	for (hash = copy; (hash = strchr(hash, '#')) != NULL; hash++)
		if (hash == copy || hash[-1] == ' ' || hash[-1] == '\t') {
			*hash = '\0';
			break;
		}
	p = fmx_rest(copy);
	if (*p == '\0') {
		free(copy);
		return;
	}
	memset(&r, 0, sizeof r);
	r.src = xstrdup(p);
	r.delay_ms = -1;
	r.gap_ms = FMX_GAP_MS;
	r.len = FMX_LONGLINE;
	w = fmx_token(&p);
	if (w[0] == '@') {
		if (w[1] == '\0')
			fmx_usage_error("%s: empty listener name", where);
		r.listener = xstrdup(w + 1);
		if ((w = fmx_token(&p)) == NULL)
			fmx_usage_error("%s: missing phase: %s", where, r.src);
	}
	if ((r.phase = fmx_phase_parse(w)) == FMX_PH_LAST)
		fmx_usage_error("%s: unknown phase '%s' in: %s", where, w,
		    r.src);
	for (;;) {
		if ((w = fmx_token(&p)) == NULL)
			fmx_usage_error("%s: missing action in: %s", where,
			    r.src);
		if (w[0] == '~' || (w[0] == '!' && w[1] == '~')) {
			r.negate = w[0] == '!';
			w += r.negate ? 2 : 1;
			if (r.has_re || *w == '\0')
				fmx_usage_error("%s: bad regex in: %s", where,
				    r.src);
			flags = REG_EXTENDED | REG_NOSUB | REG_ICASE;
			if (r.phase == FMX_PH_DOT)
				flags |= REG_NEWLINE;
			if ((rc = regcomp(&r.re, w, flags)) != 0) {
				char err[256];

				regerror(rc, &r.re, err, sizeof err);
				fmx_usage_error("%s: regex '%s': %s", where,
				    w, err);
			}
			r.has_re = true;
			if (r.phase == FMX_PH_DOT)
				f->need_head = true;
			continue;
		}
		if (strcmp(w, "every") == 0 || strcmp(w, "first") == 0 ||
		    strcmp(w, "after") == 0) {
			r.count = w[0] == 'e' ? FMX_CNT_EVERY : w[0] == 'f' ?
			    FMX_CNT_FIRST : FMX_CNT_AFTER;
			if (!fmx_parse_u64(fmx_token(&p), UINT32_MAX, &r.n) ||
			    (r.count == FMX_CNT_EVERY && r.n == 0))
				fmx_usage_error("%s: '%s' needs a number in: %s",
				    where, w, r.src);
			continue;
		}
		if (strcmp(w, "delay") == 0 || strcmp(w, "gap") == 0) {
			if (!fmx_parse_u64(fmx_token(&p), FMX_MAX_MS, &v))
				fmx_usage_error("%s: '%s' needs milliseconds "
				    "in: %s", where, w, r.src);
			if (w[0] == 'd')
				r.delay_ms = (int64_t)v;
			else
				r.gap_ms = v;
			continue;
		}
		if (strcmp(w, "len") == 0) {
			if (!fmx_parse_u64(fmx_token(&p), FMX_LONGLINE_MAX, &v))
				fmx_usage_error("%s: 'len' needs a number in: %s",
				    where, r.src);
			r.len = (size_t)v;
			continue;
		}
		break;		/* w is the action, p the rest */
	}
	p = fmx_rest(p);
	if (fmx_reply_code(w) && w[3] == '\0') {
		r.action = FMX_ACT_REPLY;
		r.code = fmx_reply_code(w);
		r.wire = fmx_render_dup(r.code, *p ? p :
		    "fake-mx scripted reply");
	} else if (strcmp(w, "pass") == 0 || strcmp(w, "close") == 0 ||
	    strcmp(w, "stall") == 0) {
		r.action = w[0] == 'p' ? FMX_ACT_PASS : w[0] == 'c' ?
		    FMX_ACT_CLOSE : FMX_ACT_STALL;
		if (*p)
			fmx_usage_error("%s: junk after '%s' in: %s", where, w,
			    r.src);
	} else if (strcmp(w, "garbage") == 0) {
		r.action = FMX_ACT_GARBAGE;
		r.wire = fmx_raw_dup(*p ? p : "XYZ this is not an SMTP reply");
	} else if (strcmp(w, "reply-split") == 0 ||
	    strcmp(w, "longline") == 0) {
		r.action = w[0] == 'r' ? FMX_ACT_SPLIT : FMX_ACT_LONGLINE;
		if (*p && (r.wire = fmx_parse_reply(p, &r.code)) == NULL)
			fmx_usage_error("%s: '%s' takes an optional CODE TEXT "
			    "in: %s", where, w, r.src);
	} else
		fmx_usage_error("%s: unknown action '%s' in: %s", where, w,
		    r.src);
	if (f->nrules >= FMX_MAX_RULES)
		fmx_usage_error("too many rules (max %d)", FMX_MAX_RULES);
	if (f->nrules == f->rules_cap) {
		f->rules_cap = f->rules_cap ? f->rules_cap * 2 : 16;
		f->rules = xrealloc(f->rules, f->rules_cap * sizeof *f->rules);
	}
	f->rules[f->nrules++] = r;
	free(copy);
}

/* fmx_rules_text - rules separated by ';' or newlines (-e) */
static void
fmx_rules_text(struct fmx *f, const char *text, const char *where)
{
	char *copy = xstrdup(text), *save = NULL;

	for (char *r = strtok_r(copy, ";\n", &save); r;
	    r = strtok_r(NULL, ";\n", &save))
		fmx_rule_add(f, r, where);
	free(copy);
}

/* fmx_rules_file - one rule per line (-s) */
static void
fmx_rules_file(struct fmx *f, const char *path)
{
	char *text, where[1100];
	size_t len;
	int rc, lineno = 0;
	char *line, *p;

	if ((rc = file_read_all(path, &text, &len, 1 << 20)) < 0)
		fmx_usage_error("%s: %s", path, relay_strerror(rc));
	p = text;
	while ((line = p) != NULL && *p) {
		char *nl = strchr(p, '\n');

		if (nl) {
			*nl = '\0';
			p = nl + 1;
		} else
			p = NULL;
		lineno++;
		snprintf(where, sizeof where, "%s:%d", path, lineno);
		fmx_rule_add(f, line, where);
	}
	free(text);
}

/* fmx_listen_add - parse [NAME=]ADDR:PORT; loopback only */
static void
fmx_listen_add(struct fmx *f, const char *arg)
{
	struct fmx_listener *l;
	const char *eq = strchr(arg, '='), *hp = eq ? eq + 1 : arg, *colon;
	char host[64];
	uint64_t port;

	if (f->nlst >= FMX_MAX_LISTENERS)
		fmx_usage_error("too many listeners (max %d)",
		    FMX_MAX_LISTENERS);
	l = xcalloc(1, sizeof *l);
	l->fmx = f;
	if (eq) {
		if (eq == arg || (size_t)(eq - arg) >= sizeof l->name)
			fmx_usage_error("-l %s: bad name", arg);
		memcpy(l->name, arg, (size_t)(eq - arg));
		for (const char *c = l->name; *c; c++)
			if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' &&
			    *c <= 'Z') || (*c >= '0' && *c <= '9') ||
			    *c == '-' || *c == '_' || *c == '.'))
				fmx_usage_error("-l %s: name may hold only "
				    "[A-Za-z0-9._-]", arg);
	} else
		snprintf(l->name, sizeof l->name, "l%zu", f->nlst + 1);
	for (size_t i = 0; i < f->nlst; i++)
		if (strcmp(f->lst[i]->name, l->name) == 0)
			fmx_usage_error("-l %s: duplicate name %s", arg,
			    l->name);
	if (hp[0] == '[') {
		const char *rb = strchr(hp, ']');

		if (rb == NULL || rb[1] != ':' ||
		    (size_t)(rb - hp - 1) >= sizeof host)
			fmx_usage_error("-l %s: want [IPv6]:PORT", arg);
		memcpy(host, hp + 1, (size_t)(rb - hp - 1));
		host[rb - hp - 1] = '\0';
		colon = rb + 1;
	} else {
		colon = strrchr(hp, ':');
		if (colon == NULL || (size_t)(colon - hp) >= sizeof host)
			fmx_usage_error("-l %s: want ADDR:PORT", arg);
		memcpy(host, hp, (size_t)(colon - hp));
		host[colon - hp] = '\0';
	}
	if (!fmx_parse_u64(colon + 1, 65535, &port))
		fmx_usage_error("-l %s: bad port", arg);
	if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&l->sa) == 0) {
		const struct sockaddr_in *sin = (const void *)&l->sa;

		if ((ntohl(sin->sin_addr.s_addr) >> 24) != 127)
			fmx_usage_error("-l %s: only 127.0.0.0/8 or ::1 may "
			    "be used", arg);
	} else if (uv_ip6_addr(host, (int)port,
	    (struct sockaddr_in6 *)&l->sa) == 0) {
		const struct sockaddr_in6 *sin6 = (const void *)&l->sa;

		if (memcmp(&sin6->sin6_addr, &in6addr_loopback,
		    sizeof in6addr_loopback) != 0)
			fmx_usage_error("-l %s: only 127.0.0.0/8 or ::1 may "
			    "be used", arg);
	} else
		fmx_usage_error("-l %s: '%s' is not a numeric address", arg,
		    host);
	f->lst[f->nlst++] = l;
}

/* fmx_max_conn_parse - N[:CODE TEXT] */
static void
fmx_max_conn_parse(const char *arg, unsigned *n, char **wire)
{
	char num[32];
	const char *colon = strchr(arg, ':');
	size_t len = colon ? (size_t)(colon - arg) : strlen(arg);
	uint64_t v;
	int code;

	if (len >= sizeof num)
		fmx_usage_error("--max-conn %s: bad number", arg);
	memcpy(num, arg, len);
	num[len] = '\0';
	if (!fmx_parse_u64(num, 1000000, &v) || v == 0)
		fmx_usage_error("--max-conn %s: bad number", arg);
	*n = (unsigned)v;
	free(*wire);
	if (colon) {
		if ((*wire = fmx_parse_reply(colon + 1, &code)) == NULL)
			fmx_usage_error("--max-conn %s: want N:CODE TEXT", arg);
	} else
		*wire = xstrdup("421 4.7.0 Too many connections\r\n");
}

/* fmx_ext_parse - --ehlo-ext: comma-separated keywords */
static void
fmx_ext_parse(struct fmx *f, const char *list)
{
	char *copy = xstrdup(list), *save = NULL;

	for (size_t i = 0; i < f->next; i++)
		free(f->ext[i]);
	f->next = 0;
	f->max_size = 0;
	for (char *k = strtok_r(copy, ",", &save); k;
	    k = strtok_r(NULL, ",", &save)) {
		k = fmx_rest(k);
		if (*k == '\0')
			continue;
		if (f->next >= FMX_MAX_EXT)
			fmx_usage_error("--ehlo-ext: too many keywords (max "
			    "%d)", FMX_MAX_EXT);
		f->ext = xrealloc(f->ext, (f->next + 1) * sizeof *f->ext);
		f->ext[f->next++] = xstrdup(k);
		if (str_hasprefix_i(k, "SIZE") && (k[4] == ' ' ||
		    k[4] == '\0')) {
			uint64_t v = 0;

			if (k[4] && !fmx_parse_u64(fmx_rest(k + 5), UINT64_MAX,
			    &v))
				fmx_usage_error("--ehlo-ext: bad SIZE '%s'", k);
			f->max_size = v;
		}
	}
	free(copy);
}

enum {
	OPT_MAX_CONN = 256, OPT_MAX_CONN_TOTAL, OPT_RATE, OPT_RATE_REPLY,
	OPT_RATE_PHASE, OPT_GREYLIST, OPT_TLS, OPT_EHLO_EXT, OPT_DELAY,
	OPT_EVENTS, OPT_FLUSH, OPT_NO_FLUSH, OPT_CHECK, OPT_PARENT,
	OPT_MAX_MSGS,
};

static const struct option fmx_long_opts[] = {
	{ "listen", required_argument, NULL, 'l' },
	{ "record", required_argument, NULL, 'r' },
	{ "keep", required_argument, NULL, 'k' },
	{ "script", required_argument, NULL, 's' },
	{ "rules", required_argument, NULL, 'e' },
	{ "stats", no_argument, NULL, 'S' },
	{ "lifetime", required_argument, NULL, 't' },
	{ "idle-timeout", required_argument, NULL, 'T' },
	{ "hostname", required_argument, NULL, 'H' },
	{ "max-rcpt", required_argument, NULL, 'm' },
	{ "quiet", no_argument, NULL, 'q' },
	{ "verbose", no_argument, NULL, 'v' },
	{ "help", no_argument, NULL, 'h' },
	{ "max-conn", required_argument, NULL, OPT_MAX_CONN },
	{ "max-msgs-per-conn", required_argument, NULL, OPT_MAX_MSGS },
	{ "max-conn-total", required_argument, NULL, OPT_MAX_CONN_TOTAL },
	{ "rate", required_argument, NULL, OPT_RATE },
	{ "rate-reply", required_argument, NULL, OPT_RATE_REPLY },
	{ "rate-phase", required_argument, NULL, OPT_RATE_PHASE },
	{ "greylist", required_argument, NULL, OPT_GREYLIST },
	{ "tls", required_argument, NULL, OPT_TLS },
	{ "ehlo-ext", required_argument, NULL, OPT_EHLO_EXT },
	{ "delay", required_argument, NULL, OPT_DELAY },
	{ "events", required_argument, NULL, OPT_EVENTS },
	{ "flush", no_argument, NULL, OPT_FLUSH },
	{ "no-flush", no_argument, NULL, OPT_NO_FLUSH },
	{ "check", no_argument, NULL, OPT_CHECK },
	{ "die-with-parent", no_argument, NULL, OPT_PARENT },
	{ NULL, 0, NULL, 0 },
};

/* fmx_options - parse argv into f; returns true for --check */
static bool
fmx_options(struct fmx *f, int argc, char **argv)
{
	const char *tls_arg = NULL;
	bool check = false;
	uint64_t v;
	int ch;

	while ((ch = getopt_long(argc, argv, "l:r:k:s:e:St:T:H:m:qvh",
	    fmx_long_opts, NULL)) != -1) {
		switch (ch) {
		case 'l':
			fmx_listen_add(f, optarg);
			break;
		case 'r':
			f->record_path = optarg;
			break;
		case 'k':
			f->keep_dir = optarg;
			break;
		case 's':
			fmx_rules_file(f, optarg);
			break;
		case 'e':
			fmx_rules_text(f, optarg, "-e");
			break;
		case 'S':
			f->stats_stderr = true;
			break;
		case 't':
			if (!fmx_parse_ms(optarg, &f->lifetime_ms))
				fmx_usage_error("-t %s: want seconds", optarg);
			break;
		case 'T':
			if (!fmx_parse_ms(optarg, &f->idle_ms))
				fmx_usage_error("-T %s: want seconds", optarg);
			break;
		case 'H':
			if (!*optarg || strlen(optarg) > 255 ||
			    strpbrk(optarg, " \t\r\n"))
				fmx_usage_error("-H: bad hostname");
			f->hostname = optarg;
			break;
		case 'm':
			if (!fmx_parse_u64(optarg, 1000000, &f->max_rcpt) ||
			    f->max_rcpt == 0)
				fmx_usage_error("-m %s: bad number", optarg);
			break;
		case 'q':
			f->quiet = true;
			break;
		case 'v':
			f->verbose = true;
			break;
		case OPT_MAX_CONN:
			fmx_max_conn_parse(optarg, &f->max_conn,
			    &f->max_conn_wire);
			break;
		case OPT_MAX_MSGS:
			if (!fmx_parse_u64(optarg, 1000000, &f->max_msgs) ||
			    f->max_msgs == 0)
				fmx_usage_error("--max-msgs-per-conn %s: bad "
				    "number", optarg);
			break;
		case OPT_MAX_CONN_TOTAL:
			fmx_max_conn_parse(optarg, &f->max_conn_total,
			    &f->max_conn_total_wire);
			break;
		case OPT_RATE: {
			const char *slash = strchr(optarg, '/');
			char num[32];

			if (slash == NULL || (size_t)(slash - optarg) >=
			    sizeof num)
				fmx_usage_error("--rate %s: want R/SECONDS",
				    optarg);
			memcpy(num, optarg, (size_t)(slash - optarg));
			num[slash - optarg] = '\0';
			if (!fmx_parse_u64(num, UINT32_MAX, &f->rate_n) ||
			    !fmx_parse_ms(slash + 1, &f->rate_window_ms))
				fmx_usage_error("--rate %s: want R/SECONDS",
				    optarg);
			break;
		}
		case OPT_RATE_REPLY:
			free(f->rate_wire);
			if ((f->rate_wire = fmx_parse_reply(optarg,
			    &f->rate_code)) == NULL)
				fmx_usage_error("--rate-reply: want 'CODE "
				    "TEXT'");
			break;
		case OPT_RATE_PHASE:
			if (strcmp(optarg, "mail") == 0)
				f->rate_phase = FMX_PH_MAIL;
			else if (strcmp(optarg, "rcpt") == 0)
				f->rate_phase = FMX_PH_RCPT;
			else
				fmx_usage_error("--rate-phase: mail or rcpt");
			break;
		case OPT_GREYLIST:
			if (!fmx_parse_ms(optarg, &f->greylist_ms))
				fmx_usage_error("--greylist %s: want seconds",
				    optarg);
			break;
		case OPT_TLS:
			tls_arg = optarg;
			break;
		case OPT_EHLO_EXT:
			fmx_ext_parse(f, optarg);
			f->ext_custom = true;
			break;
		case OPT_DELAY:
			if (!fmx_parse_u64(optarg, FMX_MAX_MS, &v))
				fmx_usage_error("--delay %s: want ms", optarg);
			f->delay_ms = v;
			break;
		case OPT_EVENTS: {
			char *copy = xstrdup(optarg), *save = NULL;

			f->events = 0;
			for (char *e = strtok_r(copy, ",", &save); e;
			    e = strtok_r(NULL, ",", &save)) {
				size_t i;

				for (i = 0; i < ARRAY_SIZE(fmx_event_names); i++)
					if (strcmp(e, fmx_event_names[i].name)
					    == 0)
						break;
				if (i == ARRAY_SIZE(fmx_event_names))
					fmx_usage_error("--events: unknown "
					    "'%s'", e);
				f->events |= fmx_event_names[i].mask;
			}
			free(copy);
			break;
		}
		case OPT_FLUSH:
			f->flush = true;
			break;
		case OPT_NO_FLUSH:
			f->flush = false;
			break;
		case OPT_CHECK:
			check = true;
			break;
		case OPT_PARENT:
			f->die_with_parent = true;
			break;
		default:
			usage();
		}
	}
	if (optind != argc)
		fmx_usage_error("unexpected argument '%s'", argv[optind]);
	if (f->nlst == 0)
		fmx_usage_error("at least one -l is required");
	if (f->rate_n == 0 && (f->rate_wire || f->rate_phase != FMX_PH_MAIL))
		fmx_usage_error("--rate-reply/--rate-phase need --rate");
	if (tls_arg) {
		char *cert = xstrdup(tls_arg), *key = strchr(cert, ':');
		char err[512];

		if (key)
			*key++ = '\0';
		if ((f->tls = tls_server_ctx_new(cert, key ? key : cert, err,
		    sizeof err)) == NULL) {
			fprintf(stderr, "fake-mx: --tls: %s\n", err);
			exit(1);
		}
		free(cert);
	}
	return check;
}

/* fmx_listen_all - bind every listener or exit; then fill in addr */
static void
fmx_listen_all(struct fmx *f)
{
	for (size_t i = 0; i < f->nlst; i++) {
		struct fmx_listener *l = f->lst[i];
		struct sockaddr_storage ss;
		int len = sizeof ss, rc;
		char host[64];

		uv_tcp_init(&f->loop, &l->tcp);
		l->tcp.data = l;
		if ((rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&l->sa,
		    0)) < 0 || (rc = uv_listen((uv_stream_t *)&l->tcp,
		    FMX_BACKLOG, fmx_on_connection)) < 0)
			log_fatalx("listen %s: %s", l->name, uv_strerror(rc));
		uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&ss, &len);
		if (ss.ss_family == AF_INET6) {
			uv_ip6_name((struct sockaddr_in6 *)&ss, host,
			    sizeof host);
			snprintf(l->addr, sizeof l->addr, "[%s]:%d", host,
			    ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
		} else {
			uv_ip4_name((struct sockaddr_in *)&ss, host,
			    sizeof host);
			snprintf(l->addr, sizeof l->addr, "%s:%d", host,
			    ntohs(((struct sockaddr_in *)&ss)->sin_port));
		}
	}
}

/* fmx_check_print - --check: the parsed rules, one per line */
static void
fmx_check_print(const struct fmx *f)
{
	for (size_t i = 0; i < f->nrules; i++) {
		const struct fmx_rule *r = &f->rules[i];

		printf("rule %zu phase=%s action=%s code=%d: %s\n", i + 1,
		    fmx_phase_names[r->phase], fmx_action_names[r->action],
		    r->code, r->src);
	}
	printf("ok %zu rules\n", f->nrules);
}

static void
fmx_free(struct fmx *f)
{
	for (size_t i = 0; i < f->nrules; i++) {
		struct fmx_rule *r = &f->rules[i];

		if (r->has_re)
			regfree(&r->re);
		free(r->listener);
		free(r->wire);
		free(r->src);
	}
	free(f->rules);
	for (size_t i = 0; i < f->nlst; i++)
		free(f->lst[i]);
	for (size_t i = 0; i < f->next; i++)
		free(f->ext[i]);
	free(f->ext);
	free(f->max_conn_wire);
	free(f->max_conn_total_wire);
	free(f->rate_wire);
	fmx_table_clear(&f->rate_tab);
	fmx_table_clear(&f->grey_tab);
	buf_free(&f->rec);
	if (f->tls)
		SSL_CTX_free(f->tls);
	free(f);
}

int
main(int argc, char **argv)
{
	struct fmx *f = xcalloc(1, sizeof *f);
	struct buf b;
	int rc;

	signal(SIGPIPE, SIG_IGN);
	log_init("fake-mx", false, 0);
	f->hostname = "fake-mx.test";
	f->idle_ms = FMX_IDLE_MS;
	f->flush = true;
	f->events = FMX_EV_ALL;
	f->max_rcpt = FMX_MAX_RCPT;
	f->rate_phase = FMX_PH_MAIL;
	f->rec_fd = -1;
	f->rate_tab.what = "rate";
	f->grey_tab.what = "greylist";
	fmx_ext_parse(f, "PIPELINING,SIZE " FMX_DEFAULT_SIZE ",8BITMIME,"
	    "ENHANCEDSTATUSCODES,SMTPUTF8");
	if (fmx_options(f, argc, argv)) {
		fmx_check_print(f);
		fmx_free(f);
		return 0;
	}
#ifdef __linux__
	if (f->die_with_parent) {
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		if (getppid() == 1)
			exit(0);	/* the parent is already gone */
	}
#endif
	if (f->record_path) {
		if (strcmp(f->record_path, "-") == 0)
			f->rec_fd = STDOUT_FILENO;
		else if ((f->rec_fd = open(f->record_path, O_WRONLY | O_CREAT |
		    O_TRUNC | O_APPEND | O_CLOEXEC, 0644)) < 0)
			log_fatal("%s", f->record_path);
	}
	if (f->keep_dir && mkdir(f->keep_dir, 0755) < 0 && errno != EEXIST)
		log_fatal("%s", f->keep_dir);
	if ((rc = uv_loop_init(&f->loop)) < 0)
		log_fatalx("uv_loop_init: %s", uv_strerror(rc));
	f->loop.data = f;
	f->t_start = time_now_ms();
	fmx_listen_all(f);
	uv_timer_init(&f->loop, &f->life_timer);
	uv_timer_init(&f->loop, &f->flush_timer);
	f->life_timer.data = f->flush_timer.data = f;
	if (f->lifetime_ms)
		uv_timer_start(&f->life_timer, fmx_on_life_timer,
		    f->lifetime_ms, 0);
	if (!f->flush)
		uv_timer_start(&f->flush_timer, fmx_on_flush_timer,
		    FMX_REC_FLUSH_MS, FMX_REC_FLUSH_MS);
	uv_signal_init(&f->loop, &f->sig_usr1);
	uv_signal_init(&f->loop, &f->sig_term);
	uv_signal_init(&f->loop, &f->sig_int);
	f->sig_usr1.data = f->sig_term.data = f->sig_int.data = f;
	uv_signal_start(&f->sig_usr1, fmx_on_signal, SIGUSR1);
	uv_signal_start(&f->sig_term, fmx_on_signal, SIGTERM);
	uv_signal_start(&f->sig_int, fmx_on_signal, SIGINT);

	/* The ready line: tests connect once they have read it. */
	buf_init(&b);
	buf_printf(&b, "ready pid=%d", (int)getpid());
	for (size_t i = 0; i < f->nlst; i++)
		buf_printf(&b, " %s=%s", f->lst[i]->name, f->lst[i]->addr);
	printf("%s\n", b.data);
	fflush(stdout);
	if (!f->quiet)
		log_info("%s", b.data);
	buf_free(&b);
	{
		struct buf *r = fmx_rec_begin(f, FMX_EV_READY, "ready", NULL);

		if (r) {
			buf_printf(r, ",\"pid\":%d,\"listeners\":{", (int)getpid());
			for (size_t i = 0; i < f->nlst; i++) {
				if (i)
					buf_append(r, ",", 1);
				fmx_json_escape(r, f->lst[i]->name,
				    strlen(f->lst[i]->name));
				buf_append(r, ":", 1);
				fmx_json_escape(r, f->lst[i]->addr,
				    strlen(f->lst[i]->addr));
			}
			buf_append(r, "}", 1);
			fmx_rec_end(f);
		}
	}

	uv_run(&f->loop, UV_RUN_DEFAULT);

	if (f->stats_stderr)
		fmx_stats_dump(f, true);
	fmx_rec_flush(f);
	if (f->rec_fd > STDERR_FILENO)
		close(f->rec_fd);
	if ((rc = uv_loop_close(&f->loop)) != 0)
		log_warnx("uv_loop_close: %s", uv_strerror(rc));
	fmx_free(f);
	return 0;
}
