/*
 * daemon.c - the root context: start-up, SIGHUP reload, graceful stop.
 *
 * Start-up order matters: the spool is recovered before any listener
 * accepts, so the index is complete before the first new message, and the
 * control socket comes last so relayctl never sees a half-started daemon.
 *
 * Reload builds everything new (snapshot, TLS context, newly bound
 * listeners) before touching the running state; any failure leaves the old
 * configuration in force. Sessions keep the snapshot they started with.
 * The spool directory and control socket are fixed for the life of the
 * process: a change to them is logged and needs a restart.
 *
 * Stop: listeners close, idle sessions get 421, sessions inside a
 * transaction may finish until timeouts.shutdown, then everything is
 * closed. Nothing acknowledged is lost: acknowledgement follows fsync.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "config/config.h"
#include "config/log.h"
#include "config/util.h"
#include "queue/spool.h"
#include "tls/tls.h"
#include "relay/auth.h"
#include "relay/control.h"
#include "relay/listener.h"
#include "relay/scheduler.h"
#include "relay/smtps_session.h"
#include "relay/daemon.h"

#define RELAY_STOP_POLL_MS 50	/* after the deadline: wait for the spool */

static void relay_on_signal(uv_signal_t *h, int signum);
static void relay_on_stop_timer(uv_timer_t *t);
static void relay_finish(struct relay *r);
static SSL_CTX *relay_tls_ctx(const struct relay_config *cfg, char *err,
    size_t errlen);

/* relay_needs_tls - does any listener use TLS? */
static bool
relay_needs_tls(const struct relay_config *cfg)
{
	for (size_t i = 0; i < cfg->nlisteners; i++)
		if (cfg->listeners[i].tls != CFG_TLS_NONE)
			return true;
	return false;
}

/* relay_tls_ctx - the server context, creating a self-signed pair if asked */
static SSL_CTX *
relay_tls_ctx(const struct relay_config *cfg, char *err, size_t errlen)
{
	struct stat st;

	if (!relay_needs_tls(cfg))
		return NULL;
	if (cfg->tls_generate && (stat(cfg->tls_cert, &st) < 0 ||
	    stat(cfg->tls_key, &st) < 0)) {
		if (tls_selfsigned_create(cfg->tls_cert, cfg->tls_key,
		    cfg->hostname, err, errlen) < 0)
			return NULL;
		log_info("tls generated cert=%s key=%s name=%s", cfg->tls_cert,
		    cfg->tls_key, cfg->hostname);
	}
	return tls_server_ctx_new(cfg->tls_cert, cfg->tls_key, err, errlen);
}

int
relay_start(struct relay *r, uv_loop_t *loop, struct relay_config *cfg,
    char *err, size_t errlen)
{
	int rc;

	r->loop = loop;
	loop->data = r;
	r->cfg = cfg;
	r->started = time_wall();
	r->next_id = ((uint64_t)time_wall() << 32) | ((uint64_t)getpid() << 16);
	LIST_INIT(&r->listeners);
	TAILQ_INIT(&r->sessions);
	r->ipcount = ipcount_new();
	r->auth = auth_limiter_new();
	log_set_trace(cfg->log.trace);

	if ((rc = spool_open(loop, cfg->spool_dir, &r->spool, err,
	    errlen)) < 0)
		return rc;
	if (relay_needs_tls(cfg) &&
	    (r->server_tls = relay_tls_ctx(cfg, err, errlen)) == NULL)
		return RELAY_ETLS;
	if ((rc = listeners_sync(r, cfg, err, errlen)) < 0)
		return rc;
	if (cfg->delivery.enabled &&
	    (rc = sched_new(r, &r->sched, err, errlen)) < 0)
		return rc;
	if ((rc = control_open(r, cfg->control_socket, cfg->control_mode,
	    &r->control, err, errlen)) < 0)
		return rc;
	uv_signal_init(loop, &r->sig_term);
	uv_signal_init(loop, &r->sig_int);
	uv_signal_init(loop, &r->sig_hup);
	r->sig_term.data = r->sig_int.data = r->sig_hup.data = r;
	uv_signal_start(&r->sig_term, relay_on_signal, SIGTERM);
	uv_signal_start(&r->sig_int, relay_on_signal, SIGINT);
	uv_signal_start(&r->sig_hup, relay_on_signal, SIGHUP);
	uv_timer_init(loop, &r->stop_timer);
	r->stop_timer.data = r;
	log_info("relayd started pid=%d config=%s hostname=%s spool=%s "
	    "queued=%zu", (int)getpid(), cfg->path, cfg->hostname,
	    cfg->spool_dir, spool_count(r->spool));
	return 0;
}

void
relay_queued(struct relay *r, const char *id)
{
	if (r->sched && !r->stopping)
		sched_msg_queued(r->sched, id);
}

void
relay_abort_start(struct relay *r)
{
	if (r->sched) {
		sched_stop(r->sched);
		sched_free(r->sched);
		r->sched = NULL;
	}
	listeners_close_all(r);
	control_close(r->control);
	r->control = NULL;
}

uint64_t
relay_next_id(struct relay *r)
{
	return ++r->next_id;
}

static void
relay_on_signal(uv_signal_t *h, int signum)
{
	struct relay *r = h->data;

	if (signum == SIGHUP)
		relay_reload(r);
	else
		relay_stop(r, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

void
relay_reload(struct relay *r)
{
	struct relay_config *cfg = NULL;
	SSL_CTX *ctx = NULL;
	char err[1024];
	int rc;

	if (r->stopping)
		return;
	if (r->config_path)
		rc = config_load(r->config_path, &cfg, err, sizeof err);
	else
		rc = config_load_string(config_default_text(), "(built-in)",
		    &cfg, err, sizeof err);
	if (rc < 0) {
		log_warnx("config reload-failed error=\"%s\" action=keep-old",
		    err);
		return;
	}
	if (relay_needs_tls(cfg) &&
	    (ctx = relay_tls_ctx(cfg, err, sizeof err)) == NULL) {
		log_warnx("config reload-failed error=\"%s\" action=keep-old",
		    err);
		config_unref(cfg);
		return;
	}
	if ((rc = listeners_sync(r, cfg, err, sizeof err)) < 0) {
		log_warnx("config reload-failed error=\"%s\" action=keep-old",
		    err);
		SSL_CTX_free(ctx);
		config_unref(cfg);
		return;
	}
	if (strcmp(cfg->spool_dir, r->cfg->spool_dir) != 0)
		log_warnx("config spool_dir change ignored until restart "
		    "running=%s", r->cfg->spool_dir);
	if (strcmp(cfg->control_socket, r->cfg->control_socket) != 0)
		log_warnx("config control.socket change ignored until restart "
		    "running=%s", r->cfg->control_socket);
	/* Live TLS sessions hold their own reference to the old context. */
	SSL_CTX_free(r->server_tls);
	r->server_tls = ctx;
	config_unref(r->cfg);
	r->cfg = cfg;
	log_set_trace(cfg->log.trace);
	if (r->sched)
		sched_reload(r->sched, cfg);
	log_info("config reloaded path=%s listeners=%zu users=%zu", cfg->path,
	    cfg->nlisteners, cfg->nusers);
}

void
relay_stop(struct relay *r, const char *why)
{
	if (r->stopping)
		return;
	r->stopping = true;
	log_info("relayd stopping reason=%s sessions=%zu", why, r->nsessions);
	listeners_close_all(r);
	smtps_sessions_stop(r, false);
	if (r->sched)
		sched_stop(r->sched);
	uv_timer_start(&r->stop_timer, relay_on_stop_timer,
	    (uint64_t)r->cfg->timeouts.shutdown_ms, RELAY_STOP_POLL_MS);
	relay_session_gone(r);
}

static void
relay_on_stop_timer(uv_timer_t *t)
{
	struct relay *r = t->data;

	/* The deadline has passed: abort what is left. */
	smtps_sessions_stop(r, true);
	relay_session_gone(r);
}

void
relay_session_gone(struct relay *r)
{
	if (!r->stopping || r->nsessions > 0 ||
	    (r->sched && sched_busy(r->sched)) || spool_busy(r->spool))
		return;
	relay_finish(r);
}

/* relay_finish - close the remaining handles so uv_run returns */
static void
relay_finish(struct relay *r)
{
	if (uv_is_closing((uv_handle_t *)&r->stop_timer))
		return;
	control_close(r->control);
	r->control = NULL;
	if (r->sched) {
		sched_free(r->sched);
		r->sched = NULL;
	}
	uv_close((uv_handle_t *)&r->stop_timer, NULL);
	uv_close((uv_handle_t *)&r->sig_term, NULL);
	uv_close((uv_handle_t *)&r->sig_int, NULL);
	uv_close((uv_handle_t *)&r->sig_hup, NULL);
	log_info("relayd stopped queued=%zu", spool_count(r->spool));
}
