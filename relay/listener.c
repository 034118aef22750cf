/*
 * listener.c - bind, accept and re-bind on reload; count sessions per
 * client address.
 *
 * A listener is identified by (address, port). On reload, sockets that
 * the new configuration still wants stay open (their options are
 * updated), new ones are bound before anything is closed, and a failed
 * bind leaves the running set untouched.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "config/config.h"
#include "config/log.h"
#include "config/util.h"
#include "relay/addrmap.h"
#include "relay/daemon.h"
#include "relay/smtps_session.h"
#include "relay/listener.h"

struct listener {
	uv_tcp_t tcp;			/* embedded listening handle */
	LIST_ENTRY(listener) entry;	/* relay->listeners */
	struct relay *relay;		/* root */
	char address[64];		/* numeric address */
	int port;			/* TCP port */
	struct smtps_listener_opts opts;	/* handed to each session */
	bool mark;			/* scratch flag for listeners_sync */
};

static void listener_on_connection(uv_stream_t *server, int status);
static void listener_on_closed(uv_handle_t *h);
static int listener_bind(struct relay *r, const struct cfg_listener *cl,
    struct listener **out, char *err, size_t errlen);
static void listener_opts(struct smtps_listener_opts *o,
    const struct cfg_listener *cl);

static void
listener_opts(struct smtps_listener_opts *o, const struct cfg_listener *cl)
{
	memset(o, 0, sizeof *o);
	str_copy(o->name, cl->name, sizeof o->name);
	o->tls = cl->tls;
	o->auth_required = cl->auth_required;
}

/* listener_bind - a new bound, listening socket for cl */
static int
listener_bind(struct relay *r, const struct cfg_listener *cl,
    struct listener **out, char *err, size_t errlen)
{
	struct sockaddr_storage ss;
	struct listener *l;
	int rc;

	memset(&ss, 0, sizeof ss);
	if (strchr(cl->address, ':'))
		rc = uv_ip6_addr(cl->address, cl->port, (struct sockaddr_in6 *)&ss);
	else
		rc = uv_ip4_addr(cl->address, cl->port, (struct sockaddr_in *)&ss);
	if (rc < 0) {
		snprintf(err, errlen, "listener %s: bad address %s",
		    cl->name, cl->address);
		return rc;
	}
	l = xcalloc(1, sizeof *l);
	l->relay = r;
	str_copy(l->address, cl->address, sizeof l->address);
	l->port = cl->port;
	listener_opts(&l->opts, cl);
	uv_tcp_init(r->loop, &l->tcp);
	l->tcp.data = l;
	if ((rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&ss,
	    strchr(cl->address, ':') ? UV_TCP_IPV6ONLY : 0)) == 0)
		rc = uv_listen((uv_stream_t *)&l->tcp, 511,
		    listener_on_connection);
	if (rc < 0) {
		snprintf(err, errlen, "listener %s: cannot listen on %s port "
		    "%d: %s%s", cl->name, cl->address, cl->port,
		    uv_strerror(rc), rc == UV_EACCES ?
		    " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" : "");
		uv_close((uv_handle_t *)&l->tcp, listener_on_closed);
		return rc;
	}
	log_info("listener start name=%s address=%s port=%d tls=%s auth=%s",
	    cl->name, cl->address, cl->port,
	    cl->tls == CFG_TLS_IMPLICIT ? "implicit" :
	    cl->tls == CFG_TLS_STARTTLS ? "starttls" : "none",
	    cl->auth_required ? "required" : "optional");
	*out = l;
	return 0;
}

int
listeners_sync(struct relay *r, const struct relay_config *cfg, char *err,
    size_t errlen)
{
	struct listener *l, *tmp;
	struct listener **fresh = xcalloc(cfg->nlisteners + 1, sizeof *fresh);
	size_t nfresh = 0;
	int rc = 0;

	LIST_FOREACH(l, &r->listeners, entry)
		l->mark = false;
	for (size_t i = 0; i < cfg->nlisteners; i++) {
		const struct cfg_listener *cl = &cfg->listeners[i];
		bool found = false;

		LIST_FOREACH(l, &r->listeners, entry) {
			if (l->port == cl->port &&
			    strcmp(l->address, cl->address) == 0) {
				l->mark = true;
				found = true;
			}
		}
		if (found)
			continue;
		if ((rc = listener_bind(r, cl, &fresh[nfresh], err,
		    errlen)) < 0) {
			for (size_t j = 0; j < nfresh; j++)
				uv_close((uv_handle_t *)&fresh[j]->tcp,
				    listener_on_closed);
			free(fresh);
			return rc;
		}
		fresh[nfresh++]->mark = true;
	}
	/* Everything bound: now drop what is gone, update what stays. */
	for (l = LIST_FIRST(&r->listeners); l != NULL; l = tmp) {
		tmp = LIST_NEXT(l, entry);
		if (l->mark) {
			for (size_t i = 0; i < cfg->nlisteners; i++)
				if (l->port == cfg->listeners[i].port &&
				    strcmp(l->address,
				    cfg->listeners[i].address) == 0)
					listener_opts(&l->opts,
					    &cfg->listeners[i]);
			continue;
		}
		log_info("listener stop name=%s address=%s port=%d",
		    l->opts.name, l->address, l->port);
		LIST_REMOVE(l, entry);
		uv_close((uv_handle_t *)&l->tcp, listener_on_closed);
	}
	for (size_t j = 0; j < nfresh; j++)
		LIST_INSERT_HEAD(&r->listeners, fresh[j], entry);
	free(fresh);
	return 0;
}

void
listeners_close_all(struct relay *r)
{
	struct listener *l;

	while ((l = LIST_FIRST(&r->listeners)) != NULL) {
		LIST_REMOVE(l, entry);
		uv_close((uv_handle_t *)&l->tcp, listener_on_closed);
	}
}

static void
listener_on_connection(uv_stream_t *server, int status)
{
	struct listener *l = server->data;

	if (status < 0) {
		log_warnx("listener accept-error name=%s error=%s",
		    l->opts.name, uv_strerror(status));
		return;
	}
	smtps_session_start(l->relay, &l->opts, server);
}

static void
listener_on_closed(uv_handle_t *h)
{
	free(h->data);
}

struct ipcount *
ipcount_new(void)
{
	return (struct ipcount *)addrmap_new();
}

void
ipcount_free(struct ipcount *ic)
{
	addrmap_free((struct addrmap *)ic);
}

bool
ipcount_acquire(struct ipcount *ic, const struct sockaddr *sa, int max)
{
	struct addrmap_entry *e = addrmap_get((struct addrmap *)ic, sa, true);

	if (e->count >= max)
		return false;
	e->count++;
	return true;
}

void
ipcount_release(struct ipcount *ic, const struct sockaddr *sa)
{
	struct addrmap_entry *e = addrmap_get((struct addrmap *)ic, sa, false);

	if (e == NULL)
		relay_panic("ipcount: release without acquire");
	if (--e->count == 0)
		addrmap_del((struct addrmap *)ic, e);
}
