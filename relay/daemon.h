/*
 * daemon.h - the root context (STYLE.md 8): the loop, the current
 * configuration snapshot, the spool, the listeners, the live sessions and
 * the signal handling that drives reload and shutdown.
 */
#ifndef RELAY_DAEMON_H
#define RELAY_DAEMON_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include <uv.h>
#include <openssl/ssl.h>

#include "config/config.h"
#include "queue/spool.h"

struct listener;
struct smtps_session;
struct auth_limiter;
struct control;
struct ipcount;
struct sched;

struct relay_stats {
	uint64_t connections;		/* accepted since start */
	uint64_t refused;		/* turned away at accept (limits) */
	uint64_t messages;		/* acknowledged with 250 */
	uint64_t bytes;			/* body bytes acknowledged */
	uint64_t rejected;		/* messages refused after DATA */
	uint64_t auth_failures;		/* failed AUTH attempts */
};

struct relay {
	uv_loop_t *loop;			/* the one event loop */
	struct relay_config *cfg;		/* current snapshot (one ref) */
	SSL_CTX *server_tls;			/* for the current snapshot */
	struct spool *spool;			/* the queue */
	LIST_HEAD(, listener) listeners;	/* bound listening sockets */
	TAILQ_HEAD(, smtps_session) sessions;	/* live submission sessions */
	size_t nsessions;			/* length of sessions */
	struct ipcount *ipcount;		/* sessions per client address */
	struct auth_limiter *auth;		/* AUTH failures per address */
	struct control *control;		/* relayctl socket */
	struct sched *sched;			/* delivery; NULL if disabled */
	uv_signal_t sig_term;			/* SIGTERM: graceful stop */
	uv_signal_t sig_int;			/* SIGINT: same */
	uv_signal_t sig_hup;			/* SIGHUP: reload */
	uv_timer_t stop_timer;			/* shutdown deadline, then sweep */
	bool stopping;				/* no new sessions */
	uint64_t next_id;			/* session ids */
	struct relay_stats stats;		/* counters for relayctl */
	int64_t started;			/* wall-clock start time */
	char *config_path;			/* what SIGHUP re-reads; NULL
						 * means the built-in default */
};

/*
 * relay_start - build the root from a loaded config: spool recovery, TLS
 * context (generating a self-signed pair if configured), listeners,
 * control socket, signals. On failure err says why; exit code 78 for
 * configuration problems is the caller's choice.
 */
int relay_start(struct relay *r, uv_loop_t *loop, struct relay_config *cfg,
    char *err, size_t errlen);

/*
 * relay_abort_start - after a failed relay_start: close what it opened so
 * that running the loop once more lets everything be freed.
 */
void relay_abort_start(struct relay *r);

/* relay_reload - try a new snapshot from config_path; keep the old on error */
void relay_reload(struct relay *r);

/* relay_stop - begin the graceful stop; the loop ends once all is closed */
void relay_stop(struct relay *r, const char *why);

/* relay_next_id - a new 64-bit session id for logs */
uint64_t relay_next_id(struct relay *r);

/* relay_queued - a message was committed: hand it to delivery */
void relay_queued(struct relay *r, const char *id);

/* relay_session_gone - a session ended; may finish a pending stop */
void relay_session_gone(struct relay *r);

#endif
