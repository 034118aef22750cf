/*
 * control.c - answers relayctl over a unix socket: the queue listing (text
 * or JSON) and status counters.
 *
 * Every answer is built on the loop from the spool's in-memory index and
 * written with one uv_write; the connection closes after it. A client that
 * sends more than CONTROL_MAX_REQUEST bytes without a newline is dropped.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "config/log.h"
#include "config/util.h"
#include "queue/envelope.h"
#include "queue/spool.h"
#include "relay/daemon.h"
#include "relay/scheduler.h"
#include "relay/control.h"

#define CONTROL_MAX_REQUEST 1024

struct control {
	uv_pipe_t pipe;			/* listening socket */
	struct relay *relay;		/* root */
	char *path;			/* socket path, unlinked on close */
};

struct ctl_client {
	uv_pipe_t pipe;			/* accepted connection */
	struct relay *relay;		/* root */
	struct buf in;			/* request bytes so far */
	bool answered;			/* a reply is on its way */
};

struct ctl_wreq {
	uv_write_t req;			/* the write */
	struct buf out;			/* owned reply */
};

static void control_on_connection(uv_stream_t *server, int status);
static void control_on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b);
static void control_on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b);
static void control_on_write_done(uv_write_t *req, int status);
static void control_on_client_closed(uv_handle_t *h);
static void control_on_closed(uv_handle_t *h);
static void control_answer(struct ctl_client *cl, const char *req);
static void control_queue_text(void *arg, const struct envelope *env);
static void control_queue_json(void *arg, const struct envelope *env);

/* control_socket_live - does a daemon answer on path? */
static bool
control_socket_live(const char *path)
{
	struct sockaddr_un sun;
	int fd;
	bool live;

	memset(&sun, 0, sizeof sun);
	sun.sun_family = AF_UNIX;
	str_copy(sun.sun_path, path, sizeof sun.sun_path);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		return false;
	live = connect(fd, (struct sockaddr *)&sun, sizeof sun) == 0;
	close(fd);
	return live;
}

int
control_open(struct relay *r, const char *path, int mode,
    struct control **out, char *err, size_t errlen)
{
	struct control *ctl;
	int rc;

	if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		snprintf(err, errlen, "control socket path too long: %s", path);
		return -ENAMETOOLONG;
	}
	if (control_socket_live(path)) {
		snprintf(err, errlen, "control socket %s: another relayd is "
		    "running", path);
		return -EADDRINUSE;
	}
	unlink(path);		/* a stale socket from a crash */
	ctl = xcalloc(1, sizeof *ctl);
	ctl->relay = r;
	ctl->path = xstrdup(path);
	uv_pipe_init(r->loop, &ctl->pipe, 0);
	ctl->pipe.data = ctl;
	if ((rc = uv_pipe_bind(&ctl->pipe, path)) == 0 &&
	    chmod(path, (mode_t)mode) < 0)
		rc = -errno;
	if (rc == 0)
		rc = uv_listen((uv_stream_t *)&ctl->pipe, 16,
		    control_on_connection);
	if (rc < 0) {
		snprintf(err, errlen, "control socket %s: %s", path,
		    uv_strerror(rc));
		control_close(ctl);
		return rc;
	}
	*out = ctl;
	return 0;
}

void
control_close(struct control *ctl)
{
	if (ctl == NULL)
		return;
	unlink(ctl->path);
	uv_close((uv_handle_t *)&ctl->pipe, control_on_closed);
}

static void
control_on_closed(uv_handle_t *h)
{
	struct control *ctl = h->data;

	free(ctl->path);
	free(ctl);
}

static void
control_on_connection(uv_stream_t *server, int status)
{
	struct control *ctl = server->data;
	struct ctl_client *cl;

	if (status < 0)
		return;
	cl = xcalloc(1, sizeof *cl);
	cl->relay = ctl->relay;
	buf_init(&cl->in);
	uv_pipe_init(ctl->relay->loop, &cl->pipe, 0);
	cl->pipe.data = cl;
	if (uv_accept(server, (uv_stream_t *)&cl->pipe) < 0 ||
	    uv_read_start((uv_stream_t *)&cl->pipe, control_on_alloc,
	    control_on_read) < 0)
		uv_close((uv_handle_t *)&cl->pipe, control_on_client_closed);
}

static void
control_on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
	b->base = xmalloc(4096);
	b->len = 4096;
}

static void
control_on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
	struct ctl_client *cl = s->data;
	char *nl;

	if (n > 0 && !cl->answered)
		buf_append(&cl->in, b->base, (size_t)n);
	free(b->base);
	if (cl->answered)
		return;
	if (n < 0) {
		uv_close((uv_handle_t *)&cl->pipe, control_on_client_closed);
		return;
	}
	if (cl->in.len > CONTROL_MAX_REQUEST) {
		uv_close((uv_handle_t *)&cl->pipe, control_on_client_closed);
		return;
	}
	if ((nl = memchr(cl->in.data, '\n', cl->in.len)) == NULL)
		return;
	*nl = '\0';
	if (nl > cl->in.data && nl[-1] == '\r')
		nl[-1] = '\0';
	cl->answered = true;
	uv_read_stop(s);
	control_answer(cl, cl->in.data);
}

/* control_time - "2026-11-24 05:30:01" in UTC */
static void
control_time(int64_t t, char *out, size_t outlen)
{
	time_t tt = (time_t)t;
	struct tm tm;

	gmtime_r(&tt, &tm);
	strftime(out, outlen, "%Y-%m-%d %H:%M:%S", &tm);
}

struct queue_walk {
	struct buf *out;	/* answer under construction */
	size_t n;		/* messages seen */
	uint64_t bytes;		/* their total size */
};

static void
control_queue_text(void *arg, const struct envelope *env)
{
	struct queue_walk *w = arg;
	char when[32];

	control_time(env->created, when, sizeof when);
	buf_printf(w->out, "%-16s %10llu  %s  <%s>\n", env->id,
	    (unsigned long long)env->size, when, env->sender);
	for (size_t i = 0; i < env->nrcpts; i++) {
		const struct env_rcpt *rc = &env->rcpts[i];
		buf_printf(w->out, "%41s<%s>  %s attempts=%d", "", rc->addr,
		    env_rcpt_state_name(rc->state), rc->attempts);
		if (rc->state == ENV_RCPT_PENDING && rc->next_attempt >
		    time_wall()) {
			char next[32];
			control_time(rc->next_attempt, next, sizeof next);
			buf_printf(w->out, "  next=\"%s\"", next);
		}
		if (rc->last_reply)
			buf_printf(w->out, "  last=\"%s\"", rc->last_reply);
		buf_puts(w->out, "\n");
	}
	w->n++;
	w->bytes += env->size;
}

static void
control_queue_json(void *arg, const struct envelope *env)
{
	struct queue_walk *w = arg;
	struct buf *o = w->out;

	buf_puts(o, w->n ? ",\n  {" : "\n  {");
	buf_puts(o, "\"id\": ");
	buf_json_string(o, env->id);
	buf_printf(o, ", \"size\": %llu, \"arrival\": %lld, \"sender\": ",
	    (unsigned long long)env->size, (long long)env->created);
	buf_json_string(o, env->sender);
	buf_puts(o, ", \"client\": ");
	buf_json_string(o, env->client_addr ? env->client_addr : "");
	buf_puts(o, ", \"user\": ");
	if (env->auth_user)
		buf_json_string(o, env->auth_user);
	else
		buf_puts(o, "null");
	buf_puts(o, ", \"recipients\": [");
	for (size_t i = 0; i < env->nrcpts; i++) {
		const struct env_rcpt *rc = &env->rcpts[i];
		buf_puts(o, i ? ", {\"address\": " : "{\"address\": ");
		buf_json_string(o, rc->addr);
		buf_puts(o, ", \"state\": ");
		buf_json_string(o, env_rcpt_state_name(rc->state));
		buf_printf(o, ", \"attempts\": %d, \"next_attempt\": %lld, "
		    "\"last_reply\": ", rc->attempts,
		    (long long)rc->next_attempt);
		if (rc->last_reply)
			buf_json_string(o, rc->last_reply);
		else
			buf_puts(o, "null");
		buf_puts(o, "}");
	}
	buf_puts(o, "]}");
	w->n++;
	w->bytes += env->size;
}

/* control_answer - build the reply for one request and send it */
static void
control_answer(struct ctl_client *cl, const char *req)
{
	struct relay *r = cl->relay;
	struct ctl_wreq *w = xcalloc(1, sizeof *w);
	struct queue_walk walk = { &w->out, 0, 0 };
	uv_buf_t ub;

	buf_init(&w->out);
	if (strcmp(req, "queue") == 0) {
		buf_printf(&w->out, "%-16s %10s  %-19s  %s\n", "ID", "SIZE",
		    "ARRIVAL (UTC)", "SENDER / RECIPIENTS");
		spool_foreach(r->spool, control_queue_text, &walk);
		buf_printf(&w->out, "-- %zu message%s, %llu bytes\n", walk.n,
		    walk.n == 1 ? "" : "s", (unsigned long long)walk.bytes);
	} else if (strcmp(req, "queue json") == 0) {
		buf_puts(&w->out, "{\"messages\": [");
		spool_foreach(r->spool, control_queue_json, &walk);
		buf_printf(&w->out, "%s], \"count\": %zu, \"bytes\": %llu}\n",
		    walk.n ? "\n" : "", walk.n, (unsigned long long)walk.bytes);
	} else if (strcmp(req, "status json") == 0) {
		buf_printf(&w->out, "{\"pid\": %d, \"uptime\": %lld, "
		    "\"sessions\": %zu, \"queued\": %zu, \"connections\": %llu, "
		    "\"refused\": %llu, \"messages\": %llu, \"bytes\": %llu, "
		    "\"rejected\": %llu, \"auth_failures\": %llu, "
		    "\"config\": ", (int)getpid(),
		    (long long)(time_wall() - r->started), r->nsessions,
		    spool_count(r->spool),
		    (unsigned long long)r->stats.connections,
		    (unsigned long long)r->stats.refused,
		    (unsigned long long)r->stats.messages,
		    (unsigned long long)r->stats.bytes,
		    (unsigned long long)r->stats.rejected,
		    (unsigned long long)r->stats.auth_failures);
		buf_json_string(&w->out, r->cfg->path);
		buf_puts(&w->out, "}\n");
	} else if (strncmp(req, "queue show ", 11) == 0) {
		if (r->sched == NULL)
			buf_puts(&w->out, "error: delivery is disabled in "
			    "this configuration\n");
		else if (!sched_explain(r->sched, req + 11, &w->out))
			buf_printf(&w->out, "error: no queued message %.40s\n",
			    req + 11);
	} else if (strcmp(req, "sites") == 0 || strcmp(req, "sites json") == 0) {
		if (r->sched)
			sched_sites_report(r->sched, &w->out, req[5] != '\0');
		else
			buf_puts(&w->out, "error: delivery is disabled in "
			    "this configuration\n");
	} else {
		buf_puts(&w->out, "error: unknown request (try: queue, "
		    "queue json, sites, sites json, status json)\n");
	}
	ub = uv_buf_init(w->out.data, (unsigned int)w->out.len);
	if (uv_write(&w->req, (uv_stream_t *)&cl->pipe, &ub, 1,
	    control_on_write_done) < 0) {
		buf_free(&w->out);
		free(w);
		uv_close((uv_handle_t *)&cl->pipe, control_on_client_closed);
	}
}

static void
control_on_write_done(uv_write_t *req, int status)
{
	struct ctl_wreq *w = container_of(req, struct ctl_wreq, req);
	uv_handle_t *h = (uv_handle_t *)req->handle;

	buf_free(&w->out);
	free(w);
	if (!uv_is_closing(h))
		uv_close(h, control_on_client_closed);
}

static void
control_on_client_closed(uv_handle_t *h)
{
	struct ctl_client *cl = h->data;

	buf_free(&cl->in);
	free(cl);
}
