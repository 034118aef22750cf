/*
 * dlv_session.h - the outbound SMTP client: one connection to one
 * destination, carrying as many transactions as the scheduler hands it.
 *
 * The session pulls work: once a host has greeted it (and TLS is up when
 * wanted) it asks ops->next for a transaction, delivers it, reports every
 * recipient's outcome through ops->done, and asks again, until next
 * returns NULL or the per-connection maximum is reached. Hosts are tried in
 * the order given; a host that fails before a transaction starts is
 * skipped for the next one. Policy (retry, bounce) is not decided here:
 * each outcome carries the verdict of relay/verdict.c.
 */
#ifndef RELAY_DLV_SESSION_H
#define RELAY_DLV_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <uv.h>
#include <openssl/ssl.h>

#include "config/config.h"
#include "queue/envelope.h"
#include "relay/verdict.h"

enum dlv_tls {
	DLV_TLS_NONE,		/* never STARTTLS */
	DLV_TLS_OPPORTUNISTIC,	/* STARTTLS when offered */
	DLV_TLS_REQUIRED,	/* no STARTTLS offered: the host fails */
	DLV_TLS_VERIFY,		/* required, and the certificate must verify
				 * and name the MX host (tls_ctx verifies) */
};

struct dlv_host {
	char name[256];			/* MX host name, for logs */
	struct sockaddr_storage addr;	/* address to connect to (port 0) */
};

struct dlv_target {
	char domain[256];		/* destination, for logs */
	struct dlv_host *hosts;		/* in preference order */
	size_t nhosts;
	int port;			/* usually 25 */
	char helo[256];			/* our EHLO name */
	struct sockaddr_storage source;	/* source address, if has_source */
	bool has_source;		/* bind before connecting */
	enum dlv_tls tls;		/* STARTTLS policy */
	SSL_CTX *tls_ctx;		/* client context (not owned) */
	int max_msgs;			/* transactions per connection */
	uint64_t timeout_ms[DLV_PHASE_LAST];	/* per phase */
	uint64_t linger_ms;		/* DLV_TXN_LINGER: how long to stay */
	const struct cfg_reply_rules *rules;	/* operator reply rules (the
						 * owner keeps the config) */
};

struct dlv_rcpt_out {
	struct verdict v;		/* OK means the server accepted it */
	bool untried;			/* the transaction ended before this
					 * recipient was named: no attempt */
	enum dlv_phase phase;		/* where it was decided */
	struct smtp_reply reply;	/* the reply (code 0 for I/O errors) */
};

struct dlv_txn {
	char id[ENVELOPE_ID_LEN + 1];	/* queue id */
	const struct envelope *env;	/* caller's; valid until ops->done */
	size_t *idx;			/* recipients (indexes into env) */
	size_t n;			/* how many */
	struct dlv_rcpt_out *out;	/* n outcomes, filled by the session */
	int fd;				/* body file, caller opens and closes */
	uint64_t size;			/* body size */
	void *owner;			/* caller's cookie */
};

struct dlv_session;

/*
 * ops->next may answer "nothing yet, stay connected": see dlv_session_poke.
 * WAIT idles up to the RSET timeout (work is due soon: a rate token);
 * LINGER up to target.linger_ms (no work now, more may come), then QUIT.
 */
#define DLV_TXN_WAIT ((struct dlv_txn *)1)
#define DLV_TXN_LINGER ((struct dlv_txn *)2)

struct dlv_ops {
	/*
	 * connecting - about to connect to addr; false skips that host (it
	 * is at its connection cap). The owner accounts per address here.
	 */
	bool (*connecting)(void *arg, struct dlv_session *s,
	    const struct sockaddr_storage *addr);
	/* next - the next transaction for this connection, or NULL */
	struct dlv_txn *(*next)(void *arg, struct dlv_session *s);
	/* done - outcomes are filled in; the session forgets t */
	void (*done)(void *arg, struct dlv_session *s, struct dlv_txn *t);
	/*
	 * closed - the session is over. delivered counts transactions done.
	 * If no host could be used, last and lastv say what the last one
	 * did and how verdict.c classified it (class, hint, rule, why).
	 */
	void (*closed)(void *arg, struct dlv_session *s, unsigned delivered,
	    const struct smtp_reply *last, const struct verdict *lastv);
};

/* dlv_session_start - copy target and begin with its first host */
struct dlv_session *dlv_session_start(uv_loop_t *loop, uint64_t id,
    const struct dlv_target *target, const struct dlv_ops *ops, void *arg);

/*
 * dlv_session_poke - a session that got DLV_TXN_WAIT asks ops->next again
 * (a rate token is due). It idles in between, up to the RSET timeout,
 * then quits; a poke to a busy session does nothing.
 */
void dlv_session_poke(struct dlv_session *s);

/* dlv_session_abort - stop now (shutdown); the in-flight txn is retried */
void dlv_session_abort(struct dlv_session *s);

/* dlv_session_host - the host and address currently connected, for logs */
const char *dlv_session_host(const struct dlv_session *s);
const char *dlv_session_addr(const struct dlv_session *s);
const char *dlv_session_tls(const struct dlv_session *s);

/* dlv_session_idle - idling after DLV_TXN_WAIT/LINGER, pokable */
bool dlv_session_idle(const struct dlv_session *s);

/* dlv_session_txns - transactions begun on the current connection */
unsigned dlv_session_txns(const struct dlv_session *s);

#endif
