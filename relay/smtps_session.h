/*
 * smtps_session.h - the submission server session (RFC 5321, RFC 6409):
 * one per accepted connection, a state machine on top of struct conn.
 */
#ifndef RELAY_SMTPS_SESSION_H
#define RELAY_SMTPS_SESSION_H

#include <stdbool.h>

#include <uv.h>

#include "config/config.h"

struct relay;
struct smtps_session;

/* smtps_listener_opts - what a session needs to know about its listener */
struct smtps_listener_opts {
	char name[64];		/* listener label for logs */
	int tls;		/* enum cfg_tls_mode */
	bool auth_required;	/* MAIL FROM needs AUTH (or a relay network) */
};

/*
 * smtps_session_start - accept a connection from server and run a session.
 * Refuses with 421 when the daemon's connection limits are reached.
 */
void smtps_session_start(struct relay *r, const struct smtps_listener_opts *o,
    uv_stream_t *server);

/*
 * smtps_sessions_stop - the daemon is stopping. Idle sessions get 421 and
 * close now; a session inside a transaction finishes it first. With force,
 * every session is closed at once (the shutdown deadline passed).
 */
void smtps_sessions_stop(struct relay *r, bool force);

#endif
