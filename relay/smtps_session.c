/*
 * smtps_session.c - the submission server: greeting, EHLO, STARTTLS, AUTH,
 * MAIL/RCPT/DATA/BDAT, and the hand-off of each message to the spool.
 *
 * A session is a state machine on top of struct conn. Commands are looked
 * up in a const table {verb, allowed states, handler} (OpenSMTPD
 * commands[]); smtps_enter_state() is the only place that assigns the
 * state. While a reply depends on something asynchronous (a password check
 * on the thread pool, the spool's fsync), the conn is paused so pipelined
 * commands wait their turn, and replies go out in order.
 *
 * Durability: the reply to the end of DATA (or BDAT LAST) is written only
 * from the spool's commit callback, after fsync and rename.
 *
 * Body handling: the DATA stream is dot-unstuffed by smtp_dot_decode and
 * written to the spool as it arrives. Only the header section is held back
 * (up to SMTPS_HDR_MAX) so that Received: can be prepended and missing
 * Date:/Message-ID: appended at its end, as Postfix's cleanup does.
 *
 * Lifetime: the session owns a timer (AUTH failure delay) and the conn.
 * conn's on_closed closes the timer; the timer's close callback frees the
 * session. An async request still in flight is cancelled or detached there.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <uv.h>
#include <openssl/crypto.h>

#include "config/config.h"
#include "config/log.h"
#include "config/util.h"
#include "queue/envelope.h"
#include "queue/spool.h"
#include "relay/auth.h"
#include "relay/conn.h"
#include "relay/daemon.h"
#include "relay/listener.h"
#include "relay/smtp_parse.h"
#include "relay/smtps_session.h"

#define SMTPS_HDR_MAX	(256 * 1024)	/* header section held in memory */
#define SMTPS_MAX_PARAMS 16

enum smtps_state {
	SMTPS_ST_TLS,		/* implicit TLS handshake before the greeting */
	SMTPS_ST_CONNECTED,	/* greeted, waiting for EHLO/HELO */
	SMTPS_ST_HELO,		/* ready for MAIL */
	SMTPS_ST_AUTH,		/* AUTH exchange or verification under way */
	SMTPS_ST_MAIL,		/* MAIL accepted, waiting for RCPT */
	SMTPS_ST_RCPT,		/* at least one RCPT accepted */
	SMTPS_ST_DATA,		/* receiving the DATA stream */
	SMTPS_ST_BDAT,		/* inside a BDAT chunk or between chunks */
	SMTPS_ST_COMMIT,	/* waiting for the spool to make it durable */
	SMTPS_ST_STARTTLS,	/* STARTTLS handshake */
	SMTPS_ST_QUIT,		/* closing */
	SMTPS_ST_LAST
};

static const char *const smtps_state_names[] = {
	[SMTPS_ST_TLS] = "TLS",
	[SMTPS_ST_CONNECTED] = "CONNECTED",
	[SMTPS_ST_HELO] = "HELO",
	[SMTPS_ST_AUTH] = "AUTH",
	[SMTPS_ST_MAIL] = "MAIL",
	[SMTPS_ST_RCPT] = "RCPT",
	[SMTPS_ST_DATA] = "DATA",
	[SMTPS_ST_BDAT] = "BDAT",
	[SMTPS_ST_COMMIT] = "COMMIT",
	[SMTPS_ST_STARTTLS] = "STARTTLS",
	[SMTPS_ST_QUIT] = "QUIT",
};
_Static_assert(ARRAY_SIZE(smtps_state_names) == SMTPS_ST_LAST,
    "state names out of sync");

#define ST(x) (1u << SMTPS_ST_##x)

enum smtps_auth_step {
	AUTH_NONE,		/* not inside an AUTH exchange */
	AUTH_PLAIN_RESP,	/* waiting for the PLAIN response line */
	AUTH_LOGIN_USER,	/* waiting for the LOGIN user name */
	AUTH_LOGIN_PASS,	/* waiting for the LOGIN password */
	AUTH_VERIFYING,		/* password check on the thread pool */
};

struct smtps_session {
	TAILQ_ENTRY(smtps_session) entry;	/* relay->sessions */
	struct relay *relay;		/* root context */
	struct relay_config *cfg;	/* snapshot held for the session */
	struct smtps_listener_opts lis;	/* copy: listeners can be reloaded */
	struct conn *conn;		/* NULL once closed */
	uv_timer_t timer;		/* AUTH failure delay */
	uint64_t id;			/* for logs */
	enum smtps_state state;		/* see smtps_enter_state */
	bool esmtp;			/* EHLO (not HELO) was used */
	bool relay_net;			/* client is in relay_networks */
	bool stopping;			/* daemon stop: close after this txn */
	bool counted;			/* holds an ipcount slot */
	char *helo;			/* EHLO/HELO argument */
	char *auth_user;		/* authenticated login */
	enum smtps_auth_step auth_step;	/* AUTH sub-state */
	char *auth_login;		/* LOGIN: user name while asking pass */
	struct auth_req *auth_req;	/* in-flight verification */
	int errors;			/* bad commands so far */
	unsigned msgs;			/* messages queued in this session */

	/* The current transaction. */
	struct envelope *env;		/* NULL outside a transaction */
	struct spool_msg *msg;		/* body file while receiving */
	struct smtp_dot dot;		/* DATA decoder state */
	struct buf chunk;		/* decoded bytes of one read */
	struct buf hdr;			/* header section held back */
	bool in_headers;		/* still collecting the header section */
	uint64_t body_size;		/* octets received (before our headers) */
	int data_error;			/* first error while receiving */
	uint64_t bdat_remaining;	/* octets left in the current chunk */
	bool bdat_last;			/* the current chunk is LAST */
	bool bdat_discard;		/* chunk is read and thrown away */
	int bdat_reply;			/* reply code owed after a discard */
};

typedef void smtps_cmd_fn(struct smtps_session *s, const char *arg);

struct smtps_cmd {
	enum smtp_verb verb;		/* parsed verb */
	unsigned states;		/* mask of states it is allowed in */
	smtps_cmd_fn *fn;		/* handler */
	const char *wrong;		/* 503 text when not allowed */
};

static void smtps_enter_state(struct smtps_session *s, enum smtps_state st);
static void smtps_reply(struct smtps_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void smtps_greet(struct smtps_session *s);
static void smtps_txn_reset(struct smtps_session *s);
static void smtps_bad(struct smtps_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void smtps_close_421(struct smtps_session *s, const char *text);
static void smtps_body_put(struct smtps_session *s, const char *p, size_t n);
static void smtps_body_start(struct smtps_session *s);
static void smtps_body_end(struct smtps_session *s);
static void smtps_headers_flush(struct smtps_session *s, size_t hdr_end);
static void smtps_message_end(struct smtps_session *s, unsigned dotflags);
static void smtps_auth_check(struct smtps_session *s, const char *user,
    const char *pass);
static void smtps_auth_line(struct smtps_session *s, char *line, size_t len);
static void smtps_free(struct smtps_session *s);
static void smtps_session_stop(struct smtps_session *s, bool force);

static void smtps_on_line(struct conn *c, char *line, size_t len,
    bool too_long);
static size_t smtps_on_raw(struct conn *c, const char *data, size_t len);
static void smtps_on_tls_ready(struct conn *c);
static void smtps_on_timeout(struct conn *c);
static void smtps_on_closed(struct conn *c);
static void smtps_on_commit(void *arg, int status, const char *id);
static void smtps_on_auth(void *arg, bool ok);
static void smtps_on_auth_delay(uv_timer_t *t);
static void smtps_on_timer_closed(uv_handle_t *h);

static smtps_cmd_fn cmd_helo, cmd_ehlo, cmd_starttls, cmd_auth, cmd_mail,
    cmd_rcpt, cmd_data, cmd_bdat, cmd_rset, cmd_noop, cmd_quit, cmd_help,
    cmd_vrfy, cmd_expn;

static const struct conn_ops smtps_conn_ops = {
	.on_line = smtps_on_line,
	.on_raw = smtps_on_raw,
	.on_tls_ready = smtps_on_tls_ready,
	.on_timeout = smtps_on_timeout,
	.on_closed = smtps_on_closed,
};

#define ST_ANY_CMD (ST(CONNECTED) | ST(HELO) | ST(MAIL) | ST(RCPT) | ST(BDAT))

static const struct smtps_cmd smtps_cmds[] = {
	{ SMTP_CMD_HELO, ST_ANY_CMD & ~ST(BDAT), cmd_helo, NULL },
	{ SMTP_CMD_EHLO, ST_ANY_CMD & ~ST(BDAT), cmd_ehlo, NULL },
	{ SMTP_CMD_STARTTLS, ST(HELO), cmd_starttls,
	    "STARTTLS only after EHLO and outside a transaction" },
	{ SMTP_CMD_AUTH, ST(HELO), cmd_auth,
	    "AUTH only after EHLO and outside a transaction" },
	{ SMTP_CMD_MAIL, ST(HELO), cmd_mail, NULL },
	{ SMTP_CMD_RCPT, ST(MAIL) | ST(RCPT), cmd_rcpt, "need MAIL command" },
	{ SMTP_CMD_DATA, ST(RCPT), cmd_data, NULL },
	{ SMTP_CMD_BDAT, ST_ANY_CMD, cmd_bdat, NULL },
	{ SMTP_CMD_RSET, ST_ANY_CMD, cmd_rset, NULL },
	{ SMTP_CMD_NOOP, ST_ANY_CMD, cmd_noop, NULL },
	{ SMTP_CMD_QUIT, ST_ANY_CMD, cmd_quit, NULL },
	{ SMTP_CMD_HELP, ST_ANY_CMD, cmd_help, NULL },
	{ SMTP_CMD_VRFY, ST_ANY_CMD & ~ST(BDAT), cmd_vrfy, NULL },
	{ SMTP_CMD_EXPN, ST_ANY_CMD & ~ST(BDAT), cmd_expn, NULL },
};

void
smtps_session_start(struct relay *r, const struct smtps_listener_opts *o,
    uv_stream_t *server)
{
	struct smtps_session *s = xcalloc(1, sizeof *s);
	const struct relay_config *cfg = r->cfg;
	const char *refuse = NULL;

	s->relay = r;
	s->cfg = config_ref(r->cfg);
	s->lis = *o;
	s->id = relay_next_id(r);
	s->state = SMTPS_ST_CONNECTED;
	buf_init(&s->chunk);
	buf_init(&s->hdr);
	uv_timer_init(r->loop, &s->timer);
	s->timer.data = s;
	s->conn = conn_new(r->loop, &smtps_conn_ops, s, s->id,
	    (size_t)cfg->limits.max_line_length);
	TAILQ_INSERT_TAIL(&r->sessions, s, entry);
	r->nsessions++;
	if (conn_accept(s->conn, server) < 0) {
		conn_close(s->conn, "accept failed");
		return;
	}
	r->stats.connections++;
	s->relay_net = config_net_match(cfg, conn_peer_sa(s->conn));

	if (r->stopping)
		refuse = "421 4.3.2 Service shutting down, try again later";
	else if (r->nsessions > (size_t)cfg->limits.max_connections)
		refuse = "421 4.3.2 Too many connections, try again later";
	else if (!ipcount_acquire(r->ipcount, conn_peer_sa(s->conn),
	    cfg->limits.max_connections_per_ip))
		refuse = "421 4.7.0 Too many connections from your address";
	else
		s->counted = true;
	log_info("%016llx smtp connect peer=%s listener=%s%s",
	    (unsigned long long)s->id, conn_peer(s->conn), s->lis.name,
	    refuse ? " result=refused" : "");
	if (refuse) {
		r->stats.refused++;
		/* An implicit-TLS client cannot read a plaintext 421. */
		if (s->lis.tls == CFG_TLS_IMPLICIT)
			conn_close(s->conn, "limit");
		else
			smtps_close_421(s, refuse);
		return;
	}
	if (s->lis.tls == CFG_TLS_IMPLICIT) {
		smtps_enter_state(s, SMTPS_ST_TLS);
		conn_set_timeout(s->conn, (uint64_t)cfg->timeouts.tls_handshake_ms);
		if (r->server_tls == NULL ||
		    conn_start_tls(s->conn, r->server_tls, true, NULL) < 0)
			conn_close(s->conn, "tls setup failed");
		return;
	}
	smtps_greet(s);
}

/* smtps_greet - the 220 banner */
static void
smtps_greet(struct smtps_session *s)
{
	conn_set_timeout(s->conn, (uint64_t)s->cfg->timeouts.command_ms);
	smtps_reply(s, "220 %s ESMTP relay ready", s->cfg->hostname);
}

void
smtps_sessions_stop(struct relay *r, bool force)
{
	struct smtps_session *s;

	/* Closing frees nothing synchronously, so the walk is safe. */
	TAILQ_FOREACH(s, &r->sessions, entry)
		smtps_session_stop(s, force);
}

/* smtps_session_stop - one session's part of smtps_sessions_stop */
static void
smtps_session_stop(struct smtps_session *s, bool force)
{
	if (s->conn == NULL || conn_is_closing(s->conn))
		return;
	s->stopping = true;
	if (force) {
		if (s->state != SMTPS_ST_TLS && s->state != SMTPS_ST_STARTTLS &&
		    s->state != SMTPS_ST_DATA && s->state != SMTPS_ST_BDAT)
			smtps_reply(s, "421 4.3.2 %s Service shutting down",
			    s->cfg->hostname);
		conn_flush(s->conn);
		conn_close(s->conn, "shutdown");
		return;
	}
	switch (s->state) {
	case SMTPS_ST_CONNECTED:
	case SMTPS_ST_HELO:
		smtps_close_421(s, "421 4.3.2 Service shutting down");
		break;
	default:
		break;	/* finish the transaction; closed after its reply */
	}
}

static void
smtps_enter_state(struct smtps_session *s, enum smtps_state st)
{
	if (st >= SMTPS_ST_LAST)
		relay_panic("smtps: bad state %d", (int)st);
	log_trace(TRACE_STATE, "%016llx smtp state %s -> %s",
	    (unsigned long long)s->id, smtps_state_names[s->state],
	    smtps_state_names[st]);
	s->state = st;
}

static void
smtps_reply(struct smtps_session *s, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof line - 2, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof line - 3)
		n = (int)sizeof line - 3;
	log_trace(TRACE_SMTP, "%016llx smtp reply \"%.*s\"",
	    (unsigned long long)s->id, n, line);
	line[n++] = '\r';
	line[n++] = '\n';
	conn_write(s->conn, line, (size_t)n);
}

/* smtps_bad - a client error reply that counts toward max_errors */
static void
smtps_bad(struct smtps_session *s, const char *fmt, ...)
{
	char line[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	smtps_reply(s, "%s", line);
	if (++s->errors >= s->cfg->limits.max_errors)
		smtps_close_421(s, "421 4.7.0 Too many errors");
}

/* smtps_close_421 - say why, then close once it is written */
static void
smtps_close_421(struct smtps_session *s, const char *text)
{
	if (conn_is_closing(s->conn))
		return;
	smtps_reply(s, "%s", text);
	smtps_enter_state(s, SMTPS_ST_QUIT);
	conn_shutdown(s->conn, "421");
}

/* smtps_txn_reset - forget the transaction (RSET, end of message) */
static void
smtps_txn_reset(struct smtps_session *s)
{
	if (s->msg) {
		spool_msg_abort(s->msg);
		s->msg = NULL;
	}
	if (s->env) {
		envelope_free(s->env);
		free(s->env);
		s->env = NULL;
	}
	buf_free(&s->hdr);
	buf_free(&s->chunk);
	s->in_headers = false;
	s->body_size = 0;
	s->data_error = 0;
	s->bdat_remaining = 0;
	s->bdat_last = s->bdat_discard = false;
}

static void
smtps_on_line(struct conn *c, char *line, size_t len, bool too_long)
{
	struct smtps_session *s = conn_owner(c);
	struct smtp_cmd cmd;
	const struct smtps_cmd *e = NULL;

	if (s->state == SMTPS_ST_QUIT)
		return;
	if (too_long) {
		smtps_bad(s, "500 5.5.2 Line too long (limit %d octets)",
		    s->cfg->limits.max_line_length);
		if (s->auth_step != AUTH_NONE) {
			s->auth_step = AUTH_NONE;
			smtps_enter_state(s, SMTPS_ST_HELO);
		}
		return;
	}
	if (memchr(line, '\0', len) != NULL) {
		smtps_bad(s, "500 5.5.2 NUL octet in command");
		return;
	}
	if (s->auth_step != AUTH_NONE) {
		smtps_auth_line(s, line, len);
		return;
	}
	log_trace(TRACE_SMTP, "%016llx smtp command \"%s\"",
	    (unsigned long long)s->id,
	    str_hasprefix_i(line, "AUTH ") ? "AUTH ..." : line);
	smtp_cmd_parse(line, &cmd);
	for (size_t i = 0; i < ARRAY_SIZE(smtps_cmds); i++)
		if (smtps_cmds[i].verb == cmd.verb)
			e = &smtps_cmds[i];
	if (e == NULL) {
		smtps_bad(s, "500 5.5.1 Command unrecognized");
		return;
	}
	if (!(e->states & (1u << s->state))) {
		if (e->wrong)
			smtps_bad(s, "503 5.5.1 Error: %s", e->wrong);
		else if (s->state == SMTPS_ST_CONNECTED)
			smtps_bad(s, "503 5.5.1 Error: send EHLO first");
		else if (cmd.verb == SMTP_CMD_MAIL)
			smtps_bad(s, "503 5.5.1 Error: nested MAIL command");
		else if (cmd.verb == SMTP_CMD_DATA && s->state == SMTPS_ST_MAIL)
			smtps_bad(s, "554 5.5.1 Error: no valid recipients");
		else if (s->state == SMTPS_ST_BDAT)
			smtps_bad(s, "503 5.5.1 Error: BDAT transfer in progress");
		else
			smtps_bad(s, "503 5.5.1 Error: bad sequence of commands");
		return;
	}
	if (cmd.arg == NULL) {
		smtps_bad(s, "501 5.5.4 Syntax: %s", cmd.verb == SMTP_CMD_MAIL ?
		    "MAIL FROM:<address>" : "RCPT TO:<address>");
		return;
	}
	e->fn(s, cmd.arg);
}

/*
 * smtps_helo_ok - a name we can put into Received: and a reply: 1..255
 * printable ASCII octets without spaces (a domain or address literal;
 * RFC 5321 4.1.1.1). Anything else would let a client write headers.
 */
static bool
smtps_helo_ok(const char *arg)
{
	size_t n = 0;

	for (const unsigned char *p = (const unsigned char *)arg; *p; p++, n++)
		if (*p < 0x21 || *p > 0x7e)
			return false;
	return n > 0 && n <= 255;
}

static void
cmd_helo(struct smtps_session *s, const char *arg)
{
	if (!smtps_helo_ok(arg)) {
		smtps_bad(s, "501 5.5.4 Syntax: HELO hostname");
		return;
	}
	smtps_txn_reset(s);
	free(s->helo);
	s->helo = xstrdup(arg);
	s->esmtp = false;
	smtps_enter_state(s, SMTPS_ST_HELO);
	smtps_reply(s, "250 %s", s->cfg->hostname);
}

static void
cmd_ehlo(struct smtps_session *s, const char *arg)
{
	char name[256];
	bool tls = conn_is_tls(s->conn);

	if (!smtps_helo_ok(arg)) {
		smtps_bad(s, "501 5.5.4 Syntax: EHLO hostname");
		return;
	}
	smtps_txn_reset(s);
	free(s->helo);
	s->helo = xstrdup(arg);
	s->esmtp = true;
	smtps_enter_state(s, SMTPS_ST_HELO);
	str_copy(name, s->cfg->hostname, sizeof name);
	smtps_reply(s, "250-%s Hello %s [%s]", name, s->helo,
	    conn_peer(s->conn));
	smtps_reply(s, "250-PIPELINING");
	smtps_reply(s, "250-SIZE %llu",
	    (unsigned long long)s->cfg->limits.max_message_size);
	smtps_reply(s, "250-8BITMIME");
	smtps_reply(s, "250-SMTPUTF8");
	smtps_reply(s, "250-ENHANCEDSTATUSCODES");
	smtps_reply(s, "250-CHUNKING");
	smtps_reply(s, "250-DSN");
	if (!tls && s->lis.tls == CFG_TLS_STARTTLS && s->relay->server_tls)
		smtps_reply(s, "250-STARTTLS");
	if (tls)
		smtps_reply(s, "250-AUTH PLAIN LOGIN");
	smtps_reply(s, "250 HELP");
}

static void
cmd_starttls(struct smtps_session *s, const char *arg)
{
	int rc;

	if (*arg != '\0') {
		smtps_bad(s, "501 5.5.4 Syntax: STARTTLS");
		return;
	}
	if (conn_is_tls(s->conn)) {
		smtps_bad(s, "503 5.5.1 Error: TLS already active");
		return;
	}
	if (s->lis.tls != CFG_TLS_STARTTLS || s->relay->server_tls == NULL) {
		smtps_bad(s, "454 4.7.0 TLS not available");
		return;
	}
	if (conn_input_pending(s->conn) > 0) {
		/* RFC 3207 5: commands pipelined after STARTTLS would be
		 * taken as if they came over TLS. Refuse the session. */
		log_info("%016llx smtp reject peer=%s reason=\"data pipelined "
		    "after STARTTLS\"", (unsigned long long)s->id,
		    conn_peer(s->conn));
		smtps_close_421(s, "421 5.5.1 Error: command pipelined after "
		    "STARTTLS");
		return;
	}
	smtps_reply(s, "220 2.0.0 Ready to start TLS");
	smtps_enter_state(s, SMTPS_ST_STARTTLS);
	conn_set_timeout(s->conn, (uint64_t)s->cfg->timeouts.tls_handshake_ms);
	if ((rc = conn_start_tls(s->conn, s->relay->server_tls, true,
	    NULL)) < 0)
		conn_close(s->conn, relay_strerror(rc));
}

static void
smtps_on_tls_ready(struct conn *c)
{
	struct smtps_session *s = conn_owner(c);
	enum smtps_state was = s->state;

	log_info("%016llx smtp tls peer=%s tls=\"%s\"",
	    (unsigned long long)s->id, conn_peer(c), conn_tls_text(c));
	/* RFC 3207 4.2: forget everything learned before TLS. */
	smtps_txn_reset(s);
	free(s->helo);
	s->helo = NULL;
	smtps_enter_state(s, SMTPS_ST_CONNECTED);
	if (was == SMTPS_ST_TLS)
		smtps_greet(s);
	else
		conn_set_timeout(c, (uint64_t)s->cfg->timeouts.command_ms);
}

static void
cmd_auth(struct smtps_session *s, const char *arg)
{
	char mech[32];
	const char *init;
	size_t n;

	if (s->auth_user) {
		smtps_bad(s, "503 5.5.1 Error: already authenticated");
		return;
	}
	if (!conn_is_tls(s->conn)) {
		smtps_bad(s, "538 5.7.11 Encryption required for requested "
		    "authentication mechanism");
		return;
	}
	if (auth_limiter_blocked(s->relay->auth, conn_peer_sa(s->conn),
	    s->cfg->auth.max_failures, s->cfg->auth.failure_window_s,
	    time_wall())) {
		smtps_close_421(s, "421 4.7.0 Too many authentication failures"
		    ", try again later");
		return;
	}
	n = strcspn(arg, " ");
	if (n == 0 || n >= sizeof mech) {
		smtps_bad(s, "501 5.5.4 Syntax: AUTH mechanism [initial-response]");
		return;
	}
	memcpy(mech, arg, n);
	mech[n] = '\0';
	init = arg[n] ? arg + n + 1 : NULL;
	smtps_enter_state(s, SMTPS_ST_AUTH);
	if (str_ieq(mech, "PLAIN") || str_ieq(mech, "LOGIN")) {
		bool plain = str_ieq(mech, "PLAIN");

		s->auth_step = plain ? AUTH_PLAIN_RESP : AUTH_LOGIN_USER;
		if (init) {
			char *copy = xstrdup(init);	/* as long as the line */
			smtps_auth_line(s, copy, strlen(copy));
			free(copy);
		} else {
			/* LOGIN asks "Username:" in base64 */
			smtps_reply(s, plain ? "334 " : "334 VXNlcm5hbWU6");
		}
	} else {
		smtps_enter_state(s, SMTPS_ST_HELO);
		smtps_bad(s, "504 5.5.4 Unrecognized authentication type");
	}
}

/* smtps_auth_abort - end the AUTH exchange with an error reply */
static void
smtps_auth_abort(struct smtps_session *s, const char *reply)
{
	s->auth_step = AUTH_NONE;
	free(s->auth_login);
	s->auth_login = NULL;
	smtps_enter_state(s, SMTPS_ST_HELO);
	smtps_bad(s, "%s", reply);
}

/* smtps_auth_line - one line of an AUTH exchange (initial or 334 reply) */
static void
smtps_auth_line(struct smtps_session *s, char *line, size_t len)
{
	char dec[1024];
	int n;

	if (len == 1 && line[0] == '*') {
		smtps_auth_abort(s, "501 5.0.0 Authentication cancelled");
		return;
	}
	if (len == 1 && line[0] == '=') {
		n = 0;	/* RFC 4954: "=" is an empty response */
		dec[0] = '\0';
	} else if (len > 4 * (sizeof dec / 3) ||
	    (n = smtp_base64_decode(line, len, dec, sizeof dec)) < 0) {
		smtps_auth_abort(s, "501 5.5.2 Invalid base64 data");
		return;
	}
	switch (s->auth_step) {
	case AUTH_PLAIN_RESP: {
		const char *authz, *user, *pass;
		if (!auth_sasl_plain(dec, (size_t)n, &authz, &user, &pass)) {
			smtps_auth_abort(s, "501 5.5.2 Invalid PLAIN response");
			return;
		}
		if (*authz && strcmp(authz, user) != 0) {
			smtps_auth_abort(s, "535 5.7.8 Authorization identity "
			    "must match the login");
			return;
		}
		smtps_auth_check(s, user, pass);
		break;
	}
	case AUTH_LOGIN_USER:
		if (n == 0 || memchr(dec, '\0', (size_t)n)) {
			smtps_auth_abort(s, "501 5.5.2 Invalid user name");
			return;
		}
		s->auth_login = xstrdup(dec);
		s->auth_step = AUTH_LOGIN_PASS;
		smtps_reply(s, "334 UGFzc3dvcmQ6");	/* "Password:" */
		break;
	case AUTH_LOGIN_PASS: {
		char *user = s->auth_login;
		if (memchr(dec, '\0', (size_t)n)) {
			smtps_auth_abort(s, "501 5.5.2 Invalid password");
			return;
		}
		s->auth_login = NULL;
		smtps_auth_check(s, user, dec);
		free(user);
		break;
	}
	default:
		relay_panic("smtps: auth line in step %d", (int)s->auth_step);
	}
	OPENSSL_cleanse(dec, sizeof dec);
}

/* smtps_auth_check - verify off the loop; input waits meanwhile */
static void
smtps_auth_check(struct smtps_session *s, const char *user, const char *pass)
{
	s->auth_step = AUTH_VERIFYING;
	free(s->auth_login);
	s->auth_login = xstrdup(user);
	conn_pause(s->conn);
	s->auth_req = auth_verify(s->relay->loop, s->cfg, user, pass,
	    smtps_on_auth, s);
}

static void
smtps_on_auth(void *arg, bool ok)
{
	struct smtps_session *s = arg;
	struct relay *r = s->relay;

	s->auth_req = NULL;
	log_info("%016llx smtp auth peer=%s user=%s result=%s",
	    (unsigned long long)s->id, conn_peer(s->conn), s->auth_login,
	    ok ? "ok" : "failed");
	if (ok) {
		s->auth_user = s->auth_login;
		s->auth_login = NULL;
		s->auth_step = AUTH_NONE;
		smtps_enter_state(s, SMTPS_ST_HELO);
		smtps_reply(s, "235 2.7.0 Authentication successful");
		if (s->stopping) {
			smtps_close_421(s, "421 4.3.2 Service shutting down");
			return;
		}
		conn_resume(s->conn);
		return;
	}
	r->stats.auth_failures++;
	auth_limiter_fail(r->auth, conn_peer_sa(s->conn),
	    s->cfg->auth.failure_window_s, time_wall());
	/* Slow guessing down: the 535 comes after a delay. */
	uv_timer_start(&s->timer, smtps_on_auth_delay,
	    (uint64_t)s->cfg->auth.failure_delay_ms, 0);
}

static void
smtps_on_auth_delay(uv_timer_t *t)
{
	struct smtps_session *s = t->data;

	if (s->conn == NULL || conn_is_closing(s->conn))
		return;
	free(s->auth_login);
	s->auth_login = NULL;
	s->auth_step = AUTH_NONE;
	smtps_enter_state(s, SMTPS_ST_HELO);
	if (auth_limiter_blocked(s->relay->auth, conn_peer_sa(s->conn),
	    s->cfg->auth.max_failures, s->cfg->auth.failure_window_s,
	    time_wall())) {
		smtps_reply(s, "535 5.7.8 Authentication credentials invalid");
		smtps_close_421(s, "421 4.7.0 Too many authentication failures"
		    ", try again later");
		return;
	}
	smtps_bad(s, "535 5.7.8 Authentication credentials invalid");
	conn_resume(s->conn);
}

/* smtps_may_relay - authenticated, or inside a relay network */
static bool
smtps_may_relay(const struct smtps_session *s)
{
	return s->auth_user != NULL || s->relay_net;
}

static void
cmd_mail(struct smtps_session *s, const char *arg)
{
	struct smtp_param p[SMTPS_MAX_PARAMS];
	const char *params, *why;
	char *addr;
	bool utf8 = false;
	int np;

	/* RFC 6409: a submission listener that requires AUTH requires it
	 * of everyone; relay_networks matter on auth_required = false. */
	if (s->lis.auth_required && s->auth_user == NULL) {
		smtps_bad(s, "530 5.7.0 Authentication required");
		return;
	}
	if (s->stopping) {
		smtps_close_421(s, "421 4.3.2 Service shutting down");
		return;
	}
	/* SMTPUTF8 decides how the address is parsed: look ahead. */
	{
		const char *gt = strrchr(arg, '>');
		if (gt && (np = smtp_params_parse(gt + 1, p, SMTPS_MAX_PARAMS)) > 0)
			for (int i = 0; i < np; i++)
				if (strcmp(p[i].key, "SMTPUTF8") == 0)
					utf8 = true;
	}
	if (smtp_path_parse(arg, true, utf8, &addr, &params, &why) < 0) {
		smtps_bad(s, "501 5.1.7 Bad sender address syntax: %s", why);
		return;
	}
	if ((np = smtp_params_parse(params, p, SMTPS_MAX_PARAMS)) < 0) {
		free(addr);
		smtps_bad(s, "501 5.5.4 Bad MAIL parameters");
		return;
	}
	s->env = xcalloc(1, sizeof *s->env);
	envelope_init(s->env);
	s->env->sender = addr;
	for (int i = 0; i < np; i++) {
		const char *k = p[i].key, *v = p[i].value;
		size_t vl = p[i].vlen;

		if (strcmp(k, "SIZE") == 0 && v) {
			char *end;
			char tmp[32];
			if (vl == 0 || vl >= sizeof tmp)
				goto bad_param;
			memcpy(tmp, v, vl);
			tmp[vl] = '\0';
			unsigned long long sz = strtoull(tmp, &end, 10);
			if (*end != '\0' || tmp[0] == '-')
				goto bad_param;
			if (sz > s->cfg->limits.max_message_size) {
				smtps_txn_reset(s);
				smtps_reply(s, "552 5.3.4 Message size exceeds "
				    "fixed maximum message size");
				return;
			}
		} else if (strcmp(k, "BODY") == 0 && v) {
			if (vl == 4 && str_ieqn(v, "7BIT", 4))
				s->env->body = ENV_BODY_7BIT;
			else if (vl == 8 && str_ieqn(v, "8BITMIME", 8))
				s->env->body = ENV_BODY_8BITMIME;
			else
				goto bad_param;
		} else if (strcmp(k, "SMTPUTF8") == 0 && !v) {
			s->env->smtputf8 = true;
		} else if (strcmp(k, "RET") == 0 && v) {
			if (vl == 4 && str_ieqn(v, "FULL", 4))
				s->env->ret = ENV_RET_FULL;
			else if (vl == 4 && str_ieqn(v, "HDRS", 4))
				s->env->ret = ENV_RET_HDRS;
			else
				goto bad_param;
		} else if (strcmp(k, "ENVID") == 0 && v) {
			if (vl > 100 || !smtp_xtext_valid(v, vl))
				goto bad_param;
			char *x = xstrndup(v, vl);
			s->env->envid = xtext_decode(x, vl);
			free(x);
			if (s->env->envid == NULL)
				goto bad_param;
		} else if (strcmp(k, "AUTH") == 0 && v) {
			/* RFC 4954 5: accepted, not trusted. */
		} else {
			smtps_txn_reset(s);
			smtps_bad(s, "555 5.5.4 Unsupported MAIL parameter %s", k);
			return;
		}
	}
	s->env->helo = xstrdup(s->helo ? s->helo : "");
	s->env->client_addr = xstrdup(conn_peer(s->conn));
	if (s->auth_user)
		s->env->auth_user = xstrdup(s->auth_user);
	smtps_enter_state(s, SMTPS_ST_MAIL);
	smtps_reply(s, "250 2.1.0 Ok");
	return;
bad_param:
	smtps_txn_reset(s);
	smtps_bad(s, "501 5.5.4 Bad MAIL parameter value");
}

static void
cmd_rcpt(struct smtps_session *s, const char *arg)
{
	struct smtp_param p[SMTPS_MAX_PARAMS];
	const char *params, *why;
	char *addr;
	int np, notify = 0;
	char *orcpt = NULL;
	struct env_rcpt *rc;

	if (smtp_path_parse(arg, false, s->env->smtputf8, &addr, &params,
	    &why) < 0) {
		smtps_bad(s, "501 5.1.3 Bad recipient address syntax: %s", why);
		return;
	}
	if (!smtps_may_relay(s)) {
		char v[300];
		log_info("%016llx smtp reject peer=%s rcpt=%s reason=relay",
		    (unsigned long long)s->id, conn_peer(s->conn),
		    log_value(v, sizeof v, addr));
		free(addr);
		smtps_bad(s, "554 5.7.1 Relay access denied");
		return;
	}
	if (s->env->nrcpts >= (size_t)s->cfg->limits.max_recipients) {
		free(addr);
		smtps_reply(s, "452 4.5.3 Too many recipients");
		return;
	}
	if ((np = smtp_params_parse(params, p, SMTPS_MAX_PARAMS)) < 0) {
		free(addr);
		smtps_bad(s, "501 5.5.4 Bad RCPT parameters");
		return;
	}
	for (int i = 0; i < np; i++) {
		const char *k = p[i].key, *v = p[i].value;
		size_t vl = p[i].vlen;

		if (strcmp(k, "NOTIFY") == 0 && v) {
			char tmp[64];
			if (vl == 0 || vl >= sizeof tmp)
				goto bad_param;
			memcpy(tmp, v, vl);
			tmp[vl] = '\0';
			for (char *sv, *t = strtok_r(tmp, ",", &sv); t;
			    t = strtok_r(NULL, ",", &sv)) {
				if (str_ieq(t, "NEVER"))
					notify |= ENV_NOTIFY_NEVER;
				else if (str_ieq(t, "SUCCESS"))
					notify |= ENV_NOTIFY_SUCCESS;
				else if (str_ieq(t, "FAILURE"))
					notify |= ENV_NOTIFY_FAILURE;
				else if (str_ieq(t, "DELAY"))
					notify |= ENV_NOTIFY_DELAY;
				else
					goto bad_param;
			}
			if ((notify & ENV_NOTIFY_NEVER) && notify != ENV_NOTIFY_NEVER)
				goto bad_param;
		} else if (strcmp(k, "ORCPT") == 0 && v) {
			const char *semi = memchr(v, ';', vl);
			if (semi == NULL || vl > 500 ||
			    !smtp_xtext_valid(semi + 1, vl - (size_t)(semi + 1 - v)))
				goto bad_param;
			free(orcpt);
			orcpt = xstrndup(v, vl);
		} else {
			free(addr);
			free(orcpt);
			smtps_bad(s, "555 5.5.4 Unsupported RCPT parameter %s", k);
			return;
		}
	}
	rc = envelope_add_rcpt(s->env, addr);
	rc->notify = notify;
	rc->orcpt = orcpt;
	free(addr);
	smtps_enter_state(s, SMTPS_ST_RCPT);
	smtps_reply(s, "250 2.1.5 Ok");
	return;
bad_param:
	free(addr);
	free(orcpt);
	smtps_bad(s, "501 5.5.4 Bad RCPT parameter value");
}

/* smtps_body_open - open the body file; false (and a 452) on failure */
static bool
smtps_body_open(struct smtps_session *s)
{
	int rc;

	if ((rc = spool_msg_new(s->relay->spool, &s->msg)) < 0) {
		log_warnx("%016llx smtp spool-error error=\"%s\"",
		    (unsigned long long)s->id, relay_strerror(rc));
		smtps_reply(s, "452 4.3.1 Insufficient system storage");
		return false;
	}
	smtps_body_start(s);
	return true;
}

static void
cmd_data(struct smtps_session *s, const char *arg)
{
	if (*arg != '\0') {
		smtps_bad(s, "501 5.5.4 Syntax: DATA");
		return;
	}
	if (!smtps_body_open(s))
		return;
	smtp_dot_init(&s->dot);
	smtps_enter_state(s, SMTPS_ST_DATA);
	conn_set_mode(s->conn, CONN_MODE_RAW);
	conn_set_timeout(s->conn, (uint64_t)s->cfg->timeouts.data_ms);
	smtps_reply(s, "354 End data with <CR><LF>.<CR><LF>");
}

static void
cmd_bdat(struct smtps_session *s, const char *arg)
{
	char *end;
	unsigned long long n;
	bool last = false;

	n = strtoull(arg, &end, 10);
	if (end == arg || arg[0] == '-' || (*end && *end != ' ')) {
		/* Without a length the chunk cannot be skipped. */
		smtps_close_421(s, "421 5.5.4 Syntax: BDAT size [LAST]; closing");
		return;
	}
	while (*end == ' ')
		end++;
	if (str_ieq(end, "LAST"))
		last = true;
	else if (*end != '\0') {
		smtps_close_421(s, "421 5.5.4 Syntax: BDAT size [LAST]; closing");
		return;
	}
	s->bdat_remaining = n;
	s->bdat_last = last;
	s->bdat_discard = false;
	s->bdat_reply = 0;
	if (s->state == SMTPS_ST_RCPT) {
		if (!smtps_body_open(s)) {
			smtps_txn_reset(s);
			smtps_enter_state(s, SMTPS_ST_HELO);
			s->bdat_remaining = n;
			s->bdat_discard = true;
			s->bdat_reply = -1;	/* the 452 is already said */
		} else {
			smtps_enter_state(s, SMTPS_ST_BDAT);
		}
	} else if (s->state != SMTPS_ST_BDAT) {
		/* RFC 3030: the chunk follows anyway; read and drop it. */
		s->bdat_discard = true;
		s->bdat_reply = 503;
	}
	if (!s->bdat_discard && s->body_size + n > s->cfg->limits.max_message_size)
		s->data_error = RELAY_ETOOBIG;
	if (n == 0) {
		smtps_on_raw(s->conn, "", 0);
		return;
	}
	conn_set_mode(s->conn, CONN_MODE_RAW);
	conn_set_timeout(s->conn, (uint64_t)s->cfg->timeouts.data_ms);
}

static void
cmd_rset(struct smtps_session *s, const char *arg)
{
	smtps_txn_reset(s);
	if (s->state != SMTPS_ST_CONNECTED)
		smtps_enter_state(s, SMTPS_ST_HELO);
	smtps_reply(s, "250 2.0.0 Ok");
}

static void
cmd_noop(struct smtps_session *s, const char *arg)
{
	smtps_reply(s, "250 2.0.0 Ok");
}

static void
cmd_quit(struct smtps_session *s, const char *arg)
{
	smtps_txn_reset(s);
	smtps_reply(s, "221 2.0.0 Bye");
	smtps_enter_state(s, SMTPS_ST_QUIT);
	conn_shutdown(s->conn, "quit");
}

static void
cmd_help(struct smtps_session *s, const char *arg)
{
	smtps_reply(s, "214-2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT");
	smtps_reply(s, "214-2.0.0 DATA BDAT RSET NOOP QUIT HELP VRFY");
	smtps_reply(s, "214 2.0.0 See RFC 5321 and RFC 6409");
}

static void
cmd_vrfy(struct smtps_session *s, const char *arg)
{
	smtps_reply(s, "252 2.5.0 Cannot VRFY user, but will accept message");
}

static void
cmd_expn(struct smtps_session *s, const char *arg)
{
	smtps_reply(s, "502 5.5.1 EXPN not available");
}

/* smtps_body_start - prepare header buffering for a new message */
static void
smtps_body_start(struct smtps_session *s)
{
	buf_reset(&s->hdr);
	s->in_headers = true;
	s->body_size = 0;
	s->data_error = 0;
}

static size_t
smtps_on_raw(struct conn *c, const char *data, size_t len)
{
	struct smtps_session *s = conn_owner(c);
	size_t n;

	if (s->state == SMTPS_ST_DATA) {
		buf_reset(&s->chunk);
		n = smtp_dot_decode(&s->dot, data, len, &s->chunk);
		if (s->chunk.len)
			smtps_body_put(s, s->chunk.data, s->chunk.len);
		if (s->dot.done) {
			conn_set_mode(c, CONN_MODE_LINE);
			conn_set_timeout(c, (uint64_t)s->cfg->timeouts.command_ms);
			smtps_message_end(s, s->dot.flags);
		}
		return n;
	}
	/* BDAT: exactly bdat_remaining octets, no unstuffing. */
	n = len < s->bdat_remaining ? len : (size_t)s->bdat_remaining;
	if (!s->bdat_discard)
		smtps_body_put(s, data, n);
	s->bdat_remaining -= n;
	if (s->bdat_remaining > 0)
		return n;
	conn_set_mode(c, CONN_MODE_LINE);
	conn_set_timeout(c, (uint64_t)s->cfg->timeouts.command_ms);
	if (s->bdat_discard) {
		if (s->bdat_reply == 503)
			smtps_bad(s, "503 5.5.1 Error: BDAT needs MAIL and RCPT "
			    "first");
		return n;
	}
	if (s->bdat_last)
		smtps_message_end(s, 0);
	else
		smtps_reply(s, "250 2.0.0 Ok: %llu octets received",
		    (unsigned long long)s->body_size);
	return n;
}

/* smtps_body_write - to the spool, remembering the first error */
static void
smtps_body_write(struct smtps_session *s, const char *p, size_t n)
{
	int rc;

	if (s->data_error || n == 0)
		return;
	if ((rc = spool_msg_write(s->msg, p, n)) < 0)
		s->data_error = rc;
}

/* smtps_body_put - account, then hold headers back or stream to disk */
static void
smtps_body_put(struct smtps_session *s, const char *p, size_t n)
{
	s->body_size += n;
	if (s->body_size > s->cfg->limits.max_message_size && !s->data_error)
		s->data_error = RELAY_ETOOBIG;
	if (s->data_error)
		return;		/* keep reading to the end, store nothing */
	if (!s->in_headers) {
		smtps_body_write(s, p, n);
		return;
	}
	size_t old = s->hdr.len;
	buf_append(&s->hdr, p, n);
	/* The header section ends at the first empty line. */
	if (s->hdr.len >= 2 && memcmp(s->hdr.data, "\r\n", 2) == 0) {
		smtps_headers_flush(s, 0);
		return;
	}
	size_t from = old >= 3 ? old - 3 : 0;
	char *e = memmem(s->hdr.data + from, s->hdr.len - from, "\r\n\r\n", 4);
	if (e) {
		smtps_headers_flush(s, (size_t)(e - s->hdr.data) + 2);
		return;
	}
	if (s->hdr.len > SMTPS_HDR_MAX) {
		/* Not a header section we can amend: pass it through. */
		smtps_headers_flush(s, (size_t)-1);
	}
}

/* smtps_has_header - is there a field "name:" in the header section? */
static bool
smtps_has_header(const char *h, size_t len, const char *name)
{
	size_t nl = strlen(name);
	const char *p = h, *end = h + len;

	while (p < end) {
		if ((size_t)(end - p) > nl && str_ieqn(p, name, nl) &&
		    p[nl] == ':')
			return true;
		const char *lf = memchr(p, '\n', (size_t)(end - p));
		if (lf == NULL)
			break;
		p = lf + 1;
	}
	return false;
}

/*
 * smtps_headers_flush - write Received:, the header section (hdr_end
 * octets of s->hdr, which end in CRLF), any missing Date:/Message-ID:,
 * then the rest. hdr_end == -1: headers unusable, add nothing but
 * Received:.
 */
static void
smtps_headers_flush(struct smtps_session *s, size_t hdr_end)
{
	struct buf h;
	char date[64];
	time_t now = time(NULL);
	struct tm tm;
	const char *proto;
	bool tls = conn_is_tls(s->conn);

	localtime_r(&now, &tm);
	strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S %z", &tm);
	if (s->env->smtputf8)
		proto = tls ? (s->auth_user ? "UTF8SMTPSA" : "UTF8SMTPS") :
		    (s->auth_user ? "UTF8SMTPA" : "UTF8SMTP");
	else if (s->esmtp)
		proto = tls ? (s->auth_user ? "ESMTPSA" : "ESMTPS") :
		    (s->auth_user ? "ESMTPA" : "ESMTP");
	else
		proto = "SMTP";
	buf_init(&h);
	buf_printf(&h, "Received: from %s ([%s])\r\n\tby %s (relay) with %s "
	    "id %s", s->helo ? s->helo : "unknown", conn_peer(s->conn),
	    s->cfg->hostname, proto, spool_msg_id(s->msg));
	if (tls)
		buf_printf(&h, "\r\n\t(%s)", conn_tls_text(s->conn));
	if (s->env->nrcpts == 1)
		buf_printf(&h, "\r\n\tfor <%s>", s->env->rcpts[0].addr);
	buf_printf(&h, ";\r\n\t%s\r\n", date);
	s->in_headers = false;
	if (hdr_end == (size_t)-1) {
		smtps_body_write(s, h.data, h.len);
		smtps_body_write(s, s->hdr.data, s->hdr.len);
		buf_free(&h);
		buf_reset(&s->hdr);
		return;
	}
	smtps_body_write(s, h.data, h.len);
	smtps_body_write(s, s->hdr.data, hdr_end);
	buf_reset(&h);
	if (!smtps_has_header(s->hdr.data, hdr_end, "Date"))
		buf_printf(&h, "Date: %s\r\n", date);
	if (!smtps_has_header(s->hdr.data, hdr_end, "Message-ID"))
		buf_printf(&h, "Message-ID: <%s.%lld@%s>\r\n",
		    spool_msg_id(s->msg), (long long)now, s->cfg->hostname);
	smtps_body_write(s, h.data ? h.data : "", h.len);
	smtps_body_write(s, s->hdr.data + hdr_end, s->hdr.len - hdr_end);
	buf_free(&h);
	buf_reset(&s->hdr);
}

/* smtps_body_end - the message ended while headers were still held */
static void
smtps_body_end(struct smtps_session *s)
{
	if (!s->in_headers || s->data_error)
		return;
	/* A message that is all headers (or empty): terminate the last
	 * line so the added fields start on a line of their own. */
	if (s->hdr.len > 0 && (s->hdr.len < 2 ||
	    memcmp(s->hdr.data + s->hdr.len - 2, "\r\n", 2) != 0))
		buf_append(&s->hdr, "\r\n", 2);
	smtps_headers_flush(s, s->hdr.len);
}

/* smtps_message_end - judge the received message, then commit or refuse */
static void
smtps_message_end(struct smtps_session *s, unsigned dotflags)
{
	const char *refuse = NULL;
	struct envelope *env;

	smtps_body_end(s);
	if (s->data_error == RELAY_ETOOBIG)
		refuse = "552 5.3.4 Message size exceeds fixed maximum message size";
	else if (s->data_error)
		refuse = "452 4.3.1 Insufficient system storage";
	else if (dotflags & SMTP_DOT_NUL)
		refuse = "554 5.6.0 Message contains NUL octets";
	else if (dotflags & (SMTP_DOT_BARE_LF | SMTP_DOT_BARE_CR))
		refuse = "554 5.6.2 Message contains bare CR or LF; "
		    "lines must end with CRLF (RFC 5321 2.3.8)";
	else if (dotflags & SMTP_DOT_LONG_LINE)
		refuse = "554 5.6.0 Message has a line over 998 octets "
		    "(RFC 5322 2.1.1)";
	if (refuse) {
		s->relay->stats.rejected++;
		log_info("%016llx smtp reject peer=%s size=%llu reason=\"%s\"",
		    (unsigned long long)s->id, conn_peer(s->conn),
		    (unsigned long long)s->body_size, refuse);
		if (s->data_error && s->data_error != RELAY_ETOOBIG)
			log_warnx("%016llx smtp spool-error error=\"%s\"",
			    (unsigned long long)s->id,
			    relay_strerror(s->data_error));
		smtps_txn_reset(s);
		smtps_enter_state(s, SMTPS_ST_HELO);
		smtps_reply(s, "%s", refuse);
		return;
	}
	env = s->env;
	s->env = NULL;
	env->created = time_wall();
	smtps_enter_state(s, SMTPS_ST_COMMIT);
	conn_pause(s->conn);	/* nothing more until the reply is known */
	spool_msg_commit(s->msg, env, smtps_on_commit, s);
}

static void
smtps_on_commit(void *arg, int status, const char *id)
{
	struct smtps_session *s = arg;
	struct relay *r = s->relay;
	uint64_t size = s->body_size;

	s->msg = NULL;
	if (status < 0) {
		log_warnx("%016llx smtp spool-error error=\"%s\"",
		    (unsigned long long)s->id, relay_strerror(status));
		smtps_reply(s, "452 4.3.1 Insufficient system storage");
	} else {
		r->stats.messages++;
		r->stats.bytes += size;
		s->msgs++;
		log_info("%016llx smtp queued id=%s peer=%s user=%s size=%llu",
		    (unsigned long long)s->id, id, conn_peer(s->conn),
		    s->auth_user ? s->auth_user : "-",
		    (unsigned long long)size);
		smtps_reply(s, "250 2.0.0 Ok: queued as %s", id);
		relay_queued(r, id);
	}
	smtps_txn_reset(s);
	smtps_enter_state(s, SMTPS_ST_HELO);
	if (s->stopping) {
		smtps_close_421(s, "421 4.3.2 Service shutting down");
		return;
	}
	conn_resume(s->conn);
}

static void
smtps_on_timeout(struct conn *c)
{
	struct smtps_session *s = conn_owner(c);

	log_info("%016llx smtp timeout peer=%s state=%s",
	    (unsigned long long)s->id, conn_peer(c),
	    smtps_state_names[s->state]);
	if (s->state == SMTPS_ST_TLS || s->state == SMTPS_ST_STARTTLS) {
		conn_close(c, "tls timeout");
		return;
	}
	if (s->state == SMTPS_ST_COMMIT || s->auth_step == AUTH_VERIFYING)
		return;		/* waiting on us, not on the client */
	smtps_close_421(s, "421 4.4.2 Error: timeout exceeded");
}

static void
smtps_on_closed(struct conn *c)
{
	struct smtps_session *s = conn_owner(c);

	log_info("%016llx smtp close peer=%s messages=%u",
	    (unsigned long long)s->id, conn_peer(c), s->msgs);
	if (s->counted)
		ipcount_release(s->relay->ipcount, conn_peer_sa(c));
	s->conn = NULL;
	if (s->auth_req) {
		auth_cancel(s->auth_req);
		s->auth_req = NULL;
	}
	smtps_txn_reset(s);	/* detaches an in-flight commit */
	uv_close((uv_handle_t *)&s->timer, smtps_on_timer_closed);
}

static void
smtps_on_timer_closed(uv_handle_t *h)
{
	smtps_free(h->data);
}

/* smtps_free - the last step: nothing refers to the session any more */
static void
smtps_free(struct smtps_session *s)
{
	struct relay *r = s->relay;

	TAILQ_REMOVE(&r->sessions, s, entry);
	r->nsessions--;
	free(s->helo);
	free(s->auth_user);
	free(s->auth_login);
	buf_free(&s->chunk);
	buf_free(&s->hdr);
	config_unref(s->cfg);
	free(s);
	relay_session_gone(r);
}
