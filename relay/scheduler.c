/*
 * scheduler.c - work items, the retry heap, destinations and their caps,
 * outcomes made durable, bounces.
 *
 * Ownership: a struct sched_msg holds the authoritative in-memory
 * envelope of a message with work left (a copy of the spool's), and is
 * freed when its last item is done and its last spool update completed.
 * Every change to a recipient is made to that envelope and then written
 * with spool_env_update, which serialises updates of one id, so two
 * destinations finishing at once cannot lose each other's results.
 *
 * Caps: sched->active counts sessions (global cap), dest->active per
 * destination; per MX address a session is charged to the address it is
 * connecting to (the session asks before every connect, so a fallback to
 * a later MX moves the charge, and an address at its cap is skipped).
 *
 * Time: due times are wall-clock seconds (they are persisted as such);
 * the timer is armed for the earliest due item.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <sys/queue.h>

#include <uv.h>
#include <openssl/rand.h>

#include "config/config.h"
#include "config/log.h"
#include "config/util.h"
#include "dns/dns.h"
#include "queue/envelope.h"
#include "queue/spool.h"
#include "tls/tls.h"
#include "relay/addrmap.h"
#include "relay/daemon.h"
#include "relay/dlv_session.h"
#include "relay/dsn.h"
#include "relay/site.h"
#include "relay/verdict.h"
#include "relay/scheduler.h"

#define SCHED_DEST_BUCKETS	4096
#define SCHED_MAX_HOSTS		20	/* addresses tried per session */
#define SCHED_HOLD_BASE_MS	500	/* first hold after a failed session */
#define SCHED_HOLD_MAX_MS	60000	/* longest hold */
#define SCHED_SAVE_DELAY_MS	1000	/* site state writes, debounced */
#define SCHED_GREY_JITTER_S	60	/* spread of greylist retries */
#define SCHED_LINGER_MS		2000	/* an idle session waits this long for
					   more work before QUIT */

/* config/ mirrors these enums without including relay/ headers. */
_Static_assert((int)CFG_PHASE_LAST == (int)DLV_PHASE_LAST, "phase mirror");
_Static_assert((int)CFG_PHASE_DOT == (int)DLV_PHASE_DOT, "phase mirror");
_Static_assert((int)CFG_DLV_TLS_REQUIRED == (int)DLV_TLS_REQUIRED, "tls mirror");
_Static_assert((int)CFG_DLV_TLS_VERIFY == (int)DLV_TLS_VERIFY, "tls mirror");

struct sched_msg {
	char id[ENVELOPE_ID_LEN + 1];	/* queue id */
	struct envelope env;		/* authoritative state */
	int items;			/* work items still referring to it */
	int updates;			/* spool updates in flight */
	struct sched *sched;		/* owner */
};

struct sched_dest;

/*
 * A site is what a receiver sees as one destination: the set of MX hosts
 * a domain resolves to (MX rollup), so every domain hosted by one
 * provider shares one throttle (relay/site.c).
 */
struct sched_site {
	struct site *site;		/* the controller */
	int active;			/* sessions open to it */
	struct sched_site *hnext;	/* hash chain */
	char *domain;			/* a domain that resolved to it and */
	char *mx_names;			/* its MX names: to recompute the
					 * shaping after SIGHUP */
};

struct sched_item {
	struct sched_msg *msg;		/* the message */
	struct sched_dest *dest;	/* its destination */
	size_t *idx;			/* recipients (indexes into msg->env) */
	size_t n;
	int64_t due;			/* wall-clock seconds */
	size_t heap_pos;		/* position in the heap, or SIZE_MAX */
	TAILQ_ENTRY(sched_item) entry;	/* dest->ready */
};

struct sched_dest {
	char domain[256];		/* lower-case destination */
	TAILQ_HEAD(, sched_item) ready;	/* due items, oldest first */
	size_t nready;
	int active;			/* sessions open to it */
	struct dns_req *dns;		/* lookup in flight */
	struct dlv_host *hosts;		/* last good answer */
	size_t nhosts;
	uint64_t hosts_expire;		/* uv_now() ms */
	struct sched_dest *hnext;	/* hash chain */
	struct sched *sched;		/* owner */
	bool starved;			/* on sched->starved */
	TAILQ_ENTRY(sched_dest) starve;	/* waiting for a global or
					 * per-address slot */
	/*
	 * Negative feedback (Postfix qmgr's idea, before issue 4's site
	 * controller): a session that could not deliver anything lowers the
	 * destination's concurrency to what is working and holds new
	 * sessions back for a time that doubles with consecutive failures;
	 * a session that delivered raises it by one.
	 */
	int conn_limit;			/* sessions allowed now (<= cap) */
	int fail_streak;		/* sessions in a row that failed */
	uint64_t hold_until;		/* uv_now() ms: no new session before */
	bool held;			/* on sched->held */
	bool site_held;			/* ... because its site said so */
	TAILQ_ENTRY(sched_dest) hold;	/* waiting for hold_until */
	struct sched_site *site;	/* its site, once resolved */
	int nwaiting;			/* sessions idling for a rate token */
	struct cfg_shape shape;		/* effective shaping (config) */
};

/* A session's context: which destination and which MX address it counts. */
struct sched_conn {
	struct sched *sched;		/* owner */
	struct sched_dest *dest;	/* destination */
	struct sockaddr_storage counted;	/* address charged to the cap */
	bool charged;			/* counted is charged */
	bool tried;			/* some host was allowed a connect */
	bool waiting;			/* idling for a rate token, or lingering */
	bool lingering;			/* idling for more work (DLV_TXN_LINGER) */
	bool done;			/* the receiver ended it ("max message
					   per connection"): no more work */
	bool asked;			/* greeted and asked for work */
	struct sched_site *site;	/* site charged with this session */
	struct relay_config *cfg;	/* snapshot its reply rules live in */
	struct sched_item *item;	/* item of the txn in flight */
	struct dlv_txn txn;		/* the txn handed out */
	LIST_ENTRY(sched_conn) entry;	/* sched->conns */
	struct dlv_session *dlv;	/* the session */
};

struct sched {
	struct relay *relay;		/* root */
	uv_loop_t *loop;		/* the loop */
	struct dns *dns;		/* resolver */
	SSL_CTX *client_tls;		/* STARTTLS to MX hosts */
	SSL_CTX *verify_tls;		/* the same, verifying (lazily made) */
	uv_timer_t timer;		/* earliest due item */
	struct sched_item **heap;	/* min-heap by due */
	size_t nheap, capheap;
	struct sched_dest *dests[SCHED_DEST_BUCKETS];	/* by domain */
	struct addrmap *hosts;		/* sessions per MX address */
	LIST_HEAD(, sched_conn) conns;	/* live sessions */
	TAILQ_HEAD(, sched_dest) starved;	/* ready work, no global slot */
	TAILQ_HEAD(, sched_dest) held;	/* destinations holding back */
	uv_timer_t hold_timer;		/* wakes the earliest held one */
	int pending_closes;		/* handles still closing in sched_free */
	struct sched_site *sites[SCHED_DEST_BUCKETS];	/* by site name */
	uv_timer_t save_timer;		/* debounced write of site state */
	char *state_path;		/* <spool>/sites.state */
	int active;			/* live sessions */
	int updates;			/* spool updates in flight */
	bool stopping;			/* no new work */
};

static void sched_on_timer(uv_timer_t *t);
static void sched_on_timer_closed(uv_handle_t *h);
static void sched_on_dns(void *arg, const struct dns_mx_result *res);
static struct dlv_txn *sched_on_next(void *arg, struct dlv_session *s);
static bool sched_on_connecting(void *arg, struct dlv_session *s,
    const struct sockaddr_storage *addr);
static void sched_on_done(void *arg, struct dlv_session *s,
    struct dlv_txn *t);
static void sched_on_closed(void *arg, struct dlv_session *s,
    unsigned delivered, const struct smtp_reply *last,
    const struct verdict *lastv);
static void sched_on_update(void *arg, int status);
static void sched_on_bounce_commit(void *arg, int status, const char *id);
static void sched_kick(struct sched_dest *d);
static void sched_site_release(struct sched *s, struct sched_site *ss);
static void sched_item_due(struct sched *s, struct sched_item *it);
static void sched_item_fail_all(struct sched_dest *d, bool permanent,
    const char *enh, const char *text);
static void sched_msg_add(struct sched *s, const struct envelope *env);
static void sched_msg_write(struct sched_msg *m);
static void sched_arm(struct sched *s);
static void sched_hold(struct sched *s, struct sched_dest *d);
static void sched_starve(struct sched *s, struct sched_dest *d);
static size_t sched_hash(const char *k);
static void sched_on_hold_timer(uv_timer_t *t);

static const struct dlv_ops sched_dlv_ops = {
	.connecting = sched_on_connecting,
	.next = sched_on_next,
	.done = sched_on_done,
	.closed = sched_on_closed,
};

/* --- the heap of waiting items ------------------------------------ */

static void
heap_swap(struct sched *s, size_t a, size_t b)
{
	struct sched_item *t = s->heap[a];

	s->heap[a] = s->heap[b];
	s->heap[b] = t;
	s->heap[a]->heap_pos = a;
	s->heap[b]->heap_pos = b;
}

static void
heap_up(struct sched *s, size_t i)
{
	while (i > 0 && s->heap[(i - 1) / 2]->due > s->heap[i]->due) {
		heap_swap(s, i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
}

static void
heap_down(struct sched *s, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < s->nheap && s->heap[l]->due < s->heap[m]->due)
			m = l;
		if (r < s->nheap && s->heap[r]->due < s->heap[m]->due)
			m = r;
		if (m == i)
			return;
		heap_swap(s, i, m);
		i = m;
	}
}

static void
heap_push(struct sched *s, struct sched_item *it)
{
	if (s->nheap == s->capheap) {
		s->capheap = s->capheap ? s->capheap * 2 : 256;
		s->heap = xrealloc(s->heap, s->capheap * sizeof *s->heap);
	}
	it->heap_pos = s->nheap;
	s->heap[s->nheap++] = it;
	heap_up(s, it->heap_pos);
}

static struct sched_item *
heap_pop(struct sched *s)
{
	struct sched_item *top = s->heap[0];

	heap_swap(s, 0, s->nheap - 1);
	s->nheap--;
	if (s->nheap)
		heap_down(s, 0);
	top->heap_pos = SIZE_MAX;
	return top;
}

/* sched_arm - the timer fires when the earliest item is due */
static void
sched_arm(struct sched *s)
{
	int64_t now = time_wall();
	uint64_t ms;

	if (s->nheap == 0 || s->stopping) {
		uv_timer_stop(&s->timer);
		return;
	}
	ms = s->heap[0]->due > now ? (uint64_t)(s->heap[0]->due - now) * 1000 : 0;
	uv_timer_start(&s->timer, sched_on_timer, ms, 0);
}

static void
sched_on_timer(uv_timer_t *t)
{
	struct sched *s = t->data;
	int64_t now = time_wall();

	while (s->nheap && s->heap[0]->due <= now)
		sched_item_due(s, heap_pop(s));
	sched_arm(s);
}

/* --- sites ---------------------------------------------------------- */

/*
 * sched_site_limits - a site's ceilings and floors: from its shaping when
 * known (shaping.default / providers / domains), else shaping.default.
 */
static void
sched_site_limits(const struct relay_config *cfg,
    const struct cfg_shape *shape, struct site_limits *lim)
{
	const struct cfg_shape *sh = shape ? shape : &cfg->shaping.dflt;

	site_limits_default(lim);
	lim->max_conn = sh->max_conn > 0 ? sh->max_conn :
	    cfg->delivery.max_connections_per_domain;
	if (sh->min_conn > 0)
		lim->min_conn = sh->min_conn;
	if (sh->rate > 0)
		lim->max_rate = sh->rate;
	if (sh->min_rate > 0)
		lim->min_rate = sh->min_rate;
	if (sh->conn_rate > 0)
		lim->conn_rate = sh->conn_rate;
	if (lim->min_conn > lim->max_conn)
		lim->min_conn = lim->max_conn;
	if (lim->min_rate > lim->max_rate)
		lim->min_rate = lim->max_rate;
}

static struct sched_site *
sched_site_find(struct sched *s, const char *name)
{
	struct sched_site *ss;

	for (ss = s->sites[sched_hash(name)]; ss; ss = ss->hnext)
		if (strcmp(site_name(ss->site), name) == 0)
			return ss;
	return NULL;
}

/* sched_site_add - index a controller under its name */
static struct sched_site *
sched_site_add(struct sched *s, struct site *site)
{
	struct sched_site *ss = xcalloc(1, sizeof *ss);
	size_t h = sched_hash(site_name(site));

	ss->site = site;
	ss->hnext = s->sites[h];
	s->sites[h] = ss;
	return ss;
}

/* sched_site_get - the site of that name, created at its ceilings */
static struct sched_site *
sched_site_get(struct sched *s, const char *name,
    const struct cfg_shape *shape, const char *domain, const char *mx)
{
	struct sched_site *ss = sched_site_find(s, name);
	struct site_limits lim;

	if (ss == NULL) {
		sched_site_limits(s->relay->cfg, shape, &lim);
		ss = sched_site_add(s, site_new(name, &lim, time_wall_ms()));
	}
	if (ss->domain == NULL) {	/* loaded from sites.state: learn it */
		sched_site_limits(s->relay->cfg, shape, &lim);
		site_set_limits(ss->site, &lim, time_wall_ms());
		ss->domain = xstrdup(domain);
		ss->mx_names = xstrdup(mx);
	}
	return ss;
}

/* sched_site_save - write every site's state: tmp, fsync, rename */
static void
sched_site_save(struct sched *s)
{
	struct buf b;
	char *tmp;
	int fd, rc = 0;

	buf_init(&b);
	for (size_t i = 0; i < SCHED_DEST_BUCKETS; i++)
		for (struct sched_site *ss = s->sites[i]; ss; ss = ss->hnext)
			site_serialize(ss->site, &b);
	tmp = xasprintf("%s.tmp", s->state_path);
	if ((fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
	    0600)) < 0)
		rc = -errno;
	else {
		if ((rc = fd_write_all(fd, b.data ? b.data : "", b.len)) == 0 &&
		    fsync(fd) < 0)
			rc = -errno;
		close(fd);
	}
	if (rc == 0 && rename(tmp, s->state_path) < 0)
		rc = -errno;
	if (rc < 0) {
		log_warnx("sched site-save path=%s error=\"%s\"", s->state_path,
		    relay_strerror(rc));
		unlink(tmp);
	}
	free(tmp);
	buf_free(&b);
}

static void
sched_on_save_timer(uv_timer_t *t)
{
	sched_site_save(t->data);
}

/* sched_site_load - sites remembered from before a restart */
static void
sched_site_load(struct sched *s)
{
	struct site_limits lim;
	char *text, *line, *save;
	size_t len;
	int n = 0;

	if (file_read_all(s->state_path, &text, &len, 64 << 20) < 0)
		return;
	sched_site_limits(s->relay->cfg, NULL, &lim);
	for (line = strtok_r(text, "\n", &save); line;
	    line = strtok_r(NULL, "\n", &save)) {
		struct site *site;

		if (site_parse(line, &lim, &site, time_wall_ms()) < 0) {
			log_warnx("sched site-state skipped=\"%.60s\"", line);
			continue;
		}
		if (sched_site_find(s, site_name(site))) {
			site_free(site);
			continue;
		}
		sched_site_add(s, site);
		n++;
	}
	free(text);
	log_info("sched sites loaded=%d path=%s", n, s->state_path);
}

/* sched_site_fx - log what a report changed; persist durable changes */
static void
sched_site_fx(struct sched *s, struct sched_site *ss, unsigned fx,
    const char *reply)
{
	struct buf b;
	char rv[600];

	if (fx & (SITE_FX_RESUME | SITE_FX_INCREASE))
		sched_site_release(s, ss);
	if (!(fx & (SITE_FX_DECREASE | SITE_FX_SUSPEND | SITE_FX_MODE |
	    SITE_FX_INCREASE | SITE_FX_HOLD | SITE_FX_RESUME)))
		return;
	buf_init(&b);
	site_to_text(ss->site, &b);
	log_info("site %s %s%s%s%s%s%s reply=%s", site_name(ss->site),
	    b.data ? b.data : "", fx & SITE_FX_DECREASE ? " decrease" : "",
	    fx & SITE_FX_INCREASE ? " increase" : "",
	    fx & SITE_FX_SUSPEND ? " suspend" : "",
	    fx & SITE_FX_HOLD ? " hold" : "",
	    fx & SITE_FX_RESUME ? " resume" : "",
	    log_value(rv, sizeof rv, reply ? reply : "-"));
	buf_free(&b);
	if ((fx & (SITE_FX_DECREASE | SITE_FX_SUSPEND | SITE_FX_MODE)) &&
	    !uv_is_active((uv_handle_t *)&s->save_timer))
		uv_timer_start(&s->save_timer, sched_on_save_timer,
		    SCHED_SAVE_DELAY_MS, 0);
}

/* sched_site_name - the MX rollup key: sorted distinct MX host names */
static void
sched_site_name(const struct dns_mx_result *res, const char *domain,
    char *out, size_t outlen)
{
	const char *names[SCHED_MAX_HOSTS];
	size_t n = 0, o = 0;

	if (res->implicit || res->nhosts == 0) {
		str_copy(out, domain, outlen);
		return;
	}
	for (size_t i = 0; i < res->nhosts && n < SCHED_MAX_HOSTS; i++) {
		bool dup = false;
		for (size_t j = 0; j < n; j++)
			if (str_ieq(names[j], res->hosts[i].name))
				dup = true;
		if (!dup)
			names[n++] = res->hosts[i].name;
	}
	for (size_t i = 1; i < n; i++)	/* insertion sort: n <= 20 */
		for (size_t j = i; j > 0 && strcasecmp(names[j - 1], names[j]) > 0;
		    j--) {
			const char *t = names[j];
			names[j] = names[j - 1];
			names[j - 1] = t;
		}
	out[0] = '\0';
	for (size_t i = 0; i < n && o + 2 < outlen; i++) {
		int w = snprintf(out + o, outlen - o, "%s%s", i ? "," : "",
		    names[i]);
		if (w < 0 || (size_t)w >= outlen - o)
			break;
		o += (size_t)w;
	}
	for (char *p = out; *p; p++)
		if (*p >= 'A' && *p <= 'Z')
			*p = (char)(*p - 'A' + 'a');
}

/* --- destinations ---------------------------------------------------- */

static size_t
sched_hash(const char *k)
{
	uint32_t h = 2166136261u;

	for (; *k; k++)
		h = (h ^ (uint8_t)*k) * 16777619u;
	return h % SCHED_DEST_BUCKETS;
}

/* sched_dest_get - the destination for a domain, created on first use */
static struct sched_dest *
sched_dest_get(struct sched *s, const char *domain)
{
	size_t h = sched_hash(domain);
	struct sched_dest *d;

	for (d = s->dests[h]; d; d = d->hnext)
		if (strcmp(d->domain, domain) == 0)
			return d;
	d = xcalloc(1, sizeof *d);
	d->conn_limit = s->relay->cfg->delivery.max_connections_per_domain;
	str_copy(d->domain, domain, sizeof d->domain);
	TAILQ_INIT(&d->ready);
	d->sched = s;
	d->hnext = s->dests[h];
	s->dests[h] = d;
	return d;
}

/* sched_domain - the lower-cased domain of an address ("" if none) */
static void
sched_domain(const char *addr, char *out, size_t outlen)
{
	const char *at = strrchr(addr, '@');
	size_t i;

	if (at == NULL)
		at = addr - 1;	/* "postmaster": no domain */
	str_copy(out, at + 1, outlen);
	for (i = 0; out[i]; i++)
		if (out[i] >= 'A' && out[i] <= 'Z')
			out[i] = (char)(out[i] - 'A' + 'a');
}

/* --- messages and items --------------------------------------------- */

/* sched_item_new - an item for up to cap recipients of m to d */
static struct sched_item *
sched_item_new(struct sched_msg *m, struct sched_dest *d, int64_t due,
    size_t cap)
{
	struct sched_item *it = xcalloc(1, sizeof *it);

	it->msg = m;
	it->dest = d;
	it->due = due;
	it->heap_pos = SIZE_MAX;
	/* Exact size: a million one-recipient items must stay small. */
	it->idx = xcalloc(cap, sizeof *it->idx);
	m->items++;
	return it;
}

static void
sched_item_free(struct sched_item *it)
{
	struct sched_msg *m = it->msg;

	free(it->idx);
	free(it);
	m->items--;
	if (m->items == 0 && m->updates == 0) {
		envelope_free(&m->env);
		free(m);
	}
}

/* sched_item_place - into the heap, or the ready queue when due */
static void
sched_item_place(struct sched *s, struct sched_item *it)
{
	if (it->due <= time_wall() && !s->stopping) {
		sched_item_due(s, it);
		return;
	}
	heap_push(s, it);
	if (it->heap_pos == 0)
		sched_arm(s);
}

static void
sched_item_due(struct sched *s, struct sched_item *it)
{
	TAILQ_INSERT_TAIL(&it->dest->ready, it, entry);
	it->dest->nready++;
	sched_kick(it->dest);
}

/*
 * sched_schedule - create items for the pending recipients of m whose
 * index is in want (NULL = all pending), grouped per domain.
 */
static void
sched_schedule(struct sched *s, struct sched_msg *m)
{
	const struct relay_config *cfg = s->relay->cfg;
	size_t max = (size_t)cfg->delivery.max_recipients_per_transaction;
	bool *taken = xcalloc(m->env.nrcpts + 1, sizeof *taken);

	for (size_t i = 0; i < m->env.nrcpts; i++) {
		char dom[256];
		struct sched_item *it;

		if (taken[i] || m->env.rcpts[i].state != ENV_RCPT_PENDING)
			continue;
		sched_domain(m->env.rcpts[i].addr, dom, sizeof dom);
		size_t want = 0;
		for (size_t j = i; j < m->env.nrcpts && want < max; j++) {
			char dj[256];

			if (taken[j] || m->env.rcpts[j].state != ENV_RCPT_PENDING)
				continue;
			sched_domain(m->env.rcpts[j].addr, dj, sizeof dj);
			if (strcmp(dj, dom) == 0)
				want++;
		}
		it = sched_item_new(m, sched_dest_get(s, dom),
		    m->env.rcpts[i].next_attempt, want);
		for (size_t j = i; j < m->env.nrcpts && it->n < want; j++) {
			char dj[256];
			const struct env_rcpt *rc = &m->env.rcpts[j];

			if (taken[j] || rc->state != ENV_RCPT_PENDING)
				continue;
			sched_domain(rc->addr, dj, sizeof dj);
			if (strcmp(dj, dom) != 0)
				continue;
			taken[j] = true;
			it->idx[it->n++] = j;
			if (rc->next_attempt < it->due)
				it->due = rc->next_attempt;
		}
		sched_item_place(s, it);
	}
	free(taken);
}

/* sched_msg_add - take a committed envelope under the scheduler's care */
static void
sched_msg_add(struct sched *s, const struct envelope *env)
{
	struct sched_msg *m = xcalloc(1, sizeof *m);

	m->sched = s;
	envelope_copy(&m->env, env);
	str_copy(m->id, env->id, sizeof m->id);
	m->items = 1;		/* hold it while scheduling */
	sched_schedule(s, m);
	if (m->items == 1 && envelope_is_done(&m->env))
		spool_msg_remove(s->relay->spool, m->id);
	m->items--;
	if (m->items == 0 && m->updates == 0) {
		envelope_free(&m->env);
		free(m);
	}
}

void
sched_msg_queued(struct sched *s, const char *id)
{
	const struct envelope *env = spool_find(s->relay->spool, id);

	if (env == NULL) {
		log_warnx("%s sched queued-unknown", id);
		return;
	}
	sched_msg_add(s, env);
}

static void
sched_load_one(void *arg, const struct envelope *env)
{
	sched_msg_add(arg, env);
}

/* --- retries, bounces, durable outcomes ------------------------------ */

/* sched_retry_delay - seconds until the next attempt after n failures */
static int64_t
sched_retry_delay(const struct relay_config *cfg, int attempts)
{
	size_t i = attempts > 0 ? (size_t)attempts - 1 : 0;
	double d, j = cfg->delivery.retry_jitter;
	uint32_t r = 0;

	if (i >= cfg->delivery.nretry)
		i = cfg->delivery.nretry - 1;
	d = cfg->delivery.retry_schedule_s[i];
	RAND_bytes((unsigned char *)&r, sizeof r);
	d *= 1.0 - j + 2.0 * j * ((double)r / 4294967295.0);
	if (d < cfg->delivery.min_retry_s)
		d = cfg->delivery.min_retry_s;
	return (int64_t)d;
}

/*
 * sched_grey_delay - when to come back after a greylisting deferral
 * (RECEIVERS.md 4.3): first max(hint, delivery.greylist_retry, default
 * 5 min) plus up to a minute of jitter, then 10, 20 and 40 minutes, then
 * the normal schedule. A greylister's "come back in N seconds" counts
 * from the first attempt, so a later greylisting with a hint waits N s,
 * not 10 min. Hints are whole seconds and the retry time too: one more
 * second, or the retry can come a fraction early and be greylisted again
 * (make bench-throttle's greylist mode: 12 of 300). The retry goes to
 * the same site, from the same sender; the site is not slowed.
 */
static int64_t
sched_grey_delay(const struct relay_config *cfg, const struct env_rcpt *rc,
    int hint_s)
{
	static const int64_t later[] = { 600, 1200, 2400 };
	uint32_t r = 0;
	int64_t d;

	RAND_bytes((unsigned char *)&r, sizeof r);
	if (rc->greylists == 0) {
		d = hint_s > cfg->delivery.greylist_retry_s ? hint_s :
		    cfg->delivery.greylist_retry_s;
		/* up to a minute of spread, less for a short setting */
		d += 1 + (int64_t)(r % ((d / 5 < SCHED_GREY_JITTER_S ? d / 5 :
		    SCHED_GREY_JITTER_S) + 1));
	} else if ((size_t)rc->greylists <= ARRAY_SIZE(later)) {
		d = hint_s > 0 ? (int64_t)hint_s + 1 : later[rc->greylists - 1];
	} else {
		d = sched_retry_delay(cfg, rc->attempts);
	}
	if (d < cfg->delivery.min_retry_s)
		d = cfg->delivery.min_retry_s;
	return d;
}

/* sched_reply_text - "550 5.1.1 text" for last_reply and DSNs */
static void
sched_reply_text(const struct smtp_reply *r, char *out, size_t outlen)
{
	if (r->code)
		snprintf(out, outlen, "%d%s%s %s", r->code, r->enh[0] ? " " : "",
		    r->enh, r->text);
	else
		snprintf(out, outlen, "%s", r->text);
}

/* sched_report - queue an RFC 3464 report (failed/delayed) on rcpts of m */
static void
sched_report(struct sched *s, struct sched_msg *m, struct dsn_rcpt *dr,
    size_t n, const char *action)
{
	struct relay *r = s->relay;
	struct spool_msg *sm;
	struct envelope *benv;
	struct buf out;
	unsigned needs = 0;
	int fd = -1, rc;
	size_t keep = 0;

	for (size_t i = 0; i < n; i++)
		/* delay reports exist only because the operator set
		 * delivery.delay_warning, so NOTIFY unset means "yes" */
		if (dsn_wanted(&m->env, dr[i].rcpt, action, true))
			dr[keep++] = dr[i];
	if (keep == 0)
		return;
	buf_init(&out);
	if (spool_body_open(r->spool, m->id, &fd) < 0)
		fd = -1;
	rc = dsn_build(&out, r->cfg->hostname, &m->env, dr, keep, fd,
	    time_wall(), m->id, &needs);
	if (fd >= 0)
		close(fd);
	if (rc < 0 || (rc = spool_msg_new(r->spool, &sm)) < 0) {
		log_warnx("%s dsn build-failed error=\"%s\"", m->id,
		    relay_strerror(rc));
		buf_free(&out);
		return;
	}
	spool_msg_write(sm, out.data, out.len);
	buf_free(&out);
	benv = xcalloc(1, sizeof *benv);
	envelope_init(benv);
	benv->sender = xstrdup("");	/* a bounce is never bounced */
	benv->helo = xstrdup(r->cfg->hostname);
	benv->client_addr = xstrdup("127.0.0.1");
	benv->created = time_wall();
	benv->body = (needs & DSN_NEED_8BITMIME) ? ENV_BODY_8BITMIME :
	    ENV_BODY_7BIT;
	benv->smtputf8 = (needs & DSN_NEED_SMTPUTF8) != 0;
	envelope_add_rcpt(benv, m->env.sender);
	log_info("%s dsn queued action=%s to=<%s> rcpts=%zu bounce=%s", m->id,
	    action, m->env.sender, keep, spool_msg_id(sm));
	s->updates++;
	spool_msg_commit(sm, benv, sched_on_bounce_commit, s);
}

static void
sched_on_bounce_commit(void *arg, int status, const char *id)
{
	struct sched *s = arg;

	s->updates--;
	if (status < 0) {
		log_warnx("dsn commit-failed error=\"%s\"", relay_strerror(status));
		return;
	}
	if (!s->stopping)
		sched_msg_queued(s, id);
	relay_session_gone(s->relay);
}

/* sched_msg_write - persist m's envelope; remove it when all is final */
static void
sched_msg_write(struct sched_msg *m)
{
	m->updates++;
	m->sched->updates++;
	spool_env_update(m->sched->relay->spool, &m->env, sched_on_update, m);
}

static void
sched_on_update(void *arg, int status)
{
	struct sched_msg *m = arg;
	struct sched *s = m->sched;

	m->updates--;
	s->updates--;
	if (status < 0)
		log_warnx("%s sched update-failed error=\"%s\"", m->id,
		    relay_strerror(status));
	else if (m->updates == 0 && m->items == 0 && envelope_is_done(&m->env))
		spool_msg_remove(s->relay->spool, m->id);
	if (m->items == 0 && m->updates == 0) {
		envelope_free(&m->env);
		free(m);
	}
	relay_session_gone(s->relay);
}

/*
 * sched_outcome - apply one recipient's outcome to the message: final
 * states, or a retry time; log the delivery line. Returns the new state.
 */
static enum env_rcpt_state
sched_outcome(struct sched *s, struct sched_msg *m, size_t ri,
    const struct dlv_rcpt_out *o, const char *host, const char *addr,
    const char *tls, bool *expired, bool *now_again)
{
	const struct relay_config *cfg = s->relay->cfg;
	struct env_rcpt *rc = &m->env.rcpts[ri];
	const struct smtp_reply *r = &o->reply;
	enum verdict_action a = o->v.action;
	int64_t now = time_wall();
	char text[1100], lv[1200], av[600];
	const char *status;
	bool retry = a != VERDICT_OK && a != VERDICT_RCPT_BOUNCE &&
	    a != VERDICT_MSG_BOUNCE;
	/*
	 * A throttle moves the site, not the message; so does a
	 * transaction cut off before the recipient was even named (the
	 * connection died under it): neither is an attempt.
	 */
	bool site_signal = retry && (o->v.cls == VERDICT_CLASS_THROTTLE ||
	    o->v.cls == VERDICT_CLASS_SUSPEND ||
	    o->v.cls == VERDICT_CLASS_MSGS_PER_CONN || o->untried);

	sched_reply_text(r, text, sizeof text);
	free(rc->last_reply);
	rc->last_reply = xstrdup(text);
	rc->updated = now;
	*expired = false;
	*now_again = false;
	/* A throttle moves the site, not the message: no attempt counted,
	 * no retry schedule; it waits in the ready queue for the site. */
	if (!site_signal)
		rc->attempts++;
	if (retry && now - m->env.created >= cfg->delivery.max_queue_lifetime_s)
		a = VERDICT_RCPT_BOUNCE, *expired = true;
	switch (a) {
	case VERDICT_OK:
		rc->state = ENV_RCPT_SENT;
		status = "sent";
		break;
	case VERDICT_RCPT_BOUNCE:
	case VERDICT_MSG_BOUNCE:
		rc->state = ENV_RCPT_BOUNCED;
		status = "bounced";
		break;
	default:
		if (site_signal) {
			*now_again = true;
			status = o->v.cls == VERDICT_CLASS_THROTTLE ||
			    o->v.cls == VERDICT_CLASS_SUSPEND ? "throttled" :
			    "requeued";
		} else if (o->v.cls == VERDICT_CLASS_GREYLIST) {
			rc->next_attempt = now + sched_grey_delay(cfg, rc,
			    o->v.hint_s);
			rc->greylists++;
			status = "greylisted";
		} else {
			rc->next_attempt = now + sched_retry_delay(cfg,
			    rc->attempts);
			status = "deferred";
		}
	}
	if (*expired)
		status = "expired";
	log_info("%s dlv result rcpt=%s host=%s addr=%s tls=%s status=%s "
	    "code=%d enh=%s reply=%s delay=%llds attempt=%d class=%s rule=%s",
	    m->id,
	    log_value(av, sizeof av, rc->addr), host[0] ? host : "-",
	    addr[0] ? addr : "-", tls[0] ? "yes" : "no", status, r->code,
	    r->enh[0] ? r->enh : "-", log_value(lv, sizeof lv, r->text),
	    (long long)(now - m->env.created), rc->attempts,
	    verdict_class_name(o->v.cls), o->v.rule ? o->v.rule : "-");
	return rc->state;
}

/*
 * sched_item_finish - outcomes for every recipient of it are in out:
 * persist, bounce, reschedule, free the item.
 */
static void
sched_item_finish(struct sched *s, struct sched_item *it,
    const struct dlv_rcpt_out *out, const char *host, const char *addr,
    const char *tls)
{
	struct sched_msg *m = it->msg;
	struct dsn_rcpt *dr = xcalloc(it->n, sizeof *dr);
	char (*diag)[1200] = xcalloc(it->n, sizeof *diag);
	char (*ddiag)[1200] = xcalloc(it->n, sizeof *ddiag);
	char remote[300];
	struct dsn_rcpt *dd = xcalloc(it->n, sizeof *dd);
	/* Retries grouped by due time: a greylisted recipient must not be
	 * pulled forward by another recipient's shorter retry. */
	struct sched_item **again = xcalloc(it->n, sizeof *again);
	size_t nagain = 0;
	const struct relay_config *cfg = s->relay->cfg;
	int64_t now = time_wall();
	size_t nb = 0, nd = 0;

	snprintf(remote, sizeof remote, "dns; %s", host);
	bool any_ok = false, throttled = false, suspended = false;
	bool answered = false;
	int hint = 0;
	const struct smtp_reply *sig_reply = NULL;

	for (size_t i = 0; i < it->n; i++) {
		const struct verdict *v = &out[i].v;

		if (out[i].reply.code >= 200 && v->cls != VERDICT_CLASS_CONN_FAIL &&
		    v->cls != VERDICT_CLASS_MSGS_PER_CONN)
			answered = true;
		if (v->action == VERDICT_OK)
			any_ok = true;
		else if (v->cls == VERDICT_CLASS_THROTTLE && !throttled) {
			throttled = true;
			hint = v->hint_s;
			sig_reply = &out[i].reply;
		} else if (v->cls == VERDICT_CLASS_SUSPEND && !suspended &&
		    !throttled) {
			suspended = true;
			hint = v->hint_s > v->suspend_s ? v->hint_s : v->suspend_s;
			sig_reply = &out[i].reply;
		}
	}
	if (it->dest->site && host[0]) {
		struct sched_site *ss = it->dest->site;
		char st[1100] = "";
		unsigned fx;

		if (sig_reply)
			sched_reply_text(sig_reply, st, sizeof st);
		/* Only a delivery is good news: a transaction that was only
		 * greylisted or deferred per recipient says nothing. */
		if (throttled || suspended || any_ok) {
			fx = site_report(ss->site, throttled ? SITE_SIG_THROTTLE :
			    suspended ? SITE_SIG_SUSPEND : SITE_SIG_OK,
			    time_wall_ms(), hint, sig_reply ? st : NULL);
			sched_site_fx(s, ss, fx, sig_reply ? st : NULL);
		} else if (answered) {
			/* Greylisted, deferred or bounced: the receiver took
			 * the probe of a throttle episode. */
			fx = site_answered(ss->site, time_wall_ms());
			sched_site_fx(s, ss, fx, NULL);
		}
	}
	for (size_t i = 0; i < it->n; i++) {
		size_t ri = it->idx[i];
		bool expired, now_again;
		enum env_rcpt_state st = sched_outcome(s, m, ri, &out[i], host,
		    addr, tls, &expired, &now_again);

		if (st == ENV_RCPT_BOUNCED) {
			char t[1100];
			sched_reply_text(&out[i].reply, t, sizeof t);
			snprintf(diag[nb], sizeof diag[nb], "%s%s",
			    out[i].reply.code ? "smtp; " : "x-relay; ", t);
			dr[nb].rcpt = &m->env.rcpts[ri];
			dr[nb].action = "failed";
			dr[nb].status = expired ? "4.4.7" :
			    out[i].reply.enh[0] ? out[i].reply.enh : "5.0.0";
			dr[nb].remote_mta = host[0] ? remote : NULL;
			dr[nb].diagnostic = diag[nb];
			nb++;
		} else if (st == ENV_RCPT_PENDING) {
			struct env_rcpt *rc = &m->env.rcpts[ri];

			if (cfg->delivery.delay_warning_s > 0 && !rc->warned &&
			    now - m->env.created >= cfg->delivery.delay_warning_s) {
				/* One "still trying" report per recipient. */
				rc->warned = true;
				dd[nd].rcpt = rc;
				dd[nd].action = "delayed";
				dd[nd].status = out[i].reply.enh[0] ?
				    out[i].reply.enh : "4.0.0";
				dd[nd].remote_mta = host[0] ? remote : NULL;
				dd[nd].retry_until = m->env.created +
				    cfg->delivery.max_queue_lifetime_s;
				snprintf(ddiag[nd], sizeof ddiag[nd], "%s%s",
				    out[i].reply.code ? "smtp; " : "x-relay; ",
				    rc->last_reply);
				dd[nd].diagnostic = ddiag[nd];
				nd++;
			}
			int64_t due = now_again ? 0 : m->env.rcpts[ri].next_attempt;
			size_t k;

			for (k = 0; k < nagain && again[k]->due != due; k++)
				;
			if (k == nagain)
				again[nagain++] = sched_item_new(m, it->dest, due,
				    it->n);
			again[k]->idx[again[k]->n++] = ri;
		}
	}
	/* The bounce is queued before the state that caused it is saved:
	 * a crash in between duplicates a bounce, never loses one. */
	if (nb)
		sched_report(s, m, dr, nb, "failed");
	if (nd)
		sched_report(s, m, dd, nd, "delayed");
	if (nagain == 0 && m->items == 1 && m->updates == 0 &&
	    envelope_is_done(&m->env)) {
		/*
		 * Every recipient is final and nothing else refers to the
		 * message: remove it (durably, with the next shared queue/
		 * fsync) instead of first writing an "all final" envelope.
		 * A crash before that fsync repeats this last transaction,
		 * the at-least-once window there always is.
		 */
		spool_msg_remove(s->relay->spool, m->id);
	} else {
		sched_msg_write(m);
	}
	for (size_t k = 0; k < nagain; k++)
		sched_item_place(s, again[k]);
	free(again);
	free(dr);
	free(dd);
	free(ddiag);
	free(diag);
	sched_item_free(it);
}

/* sched_item_fail_all - every ready item of d gets the same outcome */
static void
sched_item_fail_all(struct sched_dest *d, bool permanent, const char *enh,
    const char *text)
{
	struct sched_item *it;
	struct smtp_reply r;

	memset(&r, 0, sizeof r);
	str_copy(r.enh, enh, sizeof r.enh);
	str_copy(r.text, text, sizeof r.text);
	while ((it = TAILQ_FIRST(&d->ready)) != NULL) {
		struct dlv_rcpt_out *out = xcalloc(it->n, sizeof *out);

		TAILQ_REMOVE(&d->ready, it, entry);
		d->nready--;
		for (size_t i = 0; i < it->n; i++) {
			out[i].v.action = permanent ? VERDICT_RCPT_BOUNCE :
			    VERDICT_RCPT_RETRY;
			out[i].reply = r;
		}
		sched_item_finish(d->sched, it, out, "", "", "");
		free(out);
	}
}

/* --- resolving and starting sessions -------------------------------- */

static void
sched_on_dns(void *arg, const struct dns_mx_result *res)
{
	struct sched_dest *d = arg;
	struct sched *s = d->sched;
	char text[600];

	d->dns = NULL;
	if (res->status < 0) {
		bool perm = dns_status_permanent(res->status);
		const char *enh = res->status == DNS_ENULLMX ? "5.1.10" :
		    perm ? "5.1.2" : "4.4.3";

		snprintf(text, sizeof text, "%s: %s", d->domain,
		    res->why ? res->why : dns_strerror(res->status));
		log_info("%s sched dns-failed status=%s why=\"%s\"", d->domain,
		    dns_strerror(res->status), res->why ? res->why : "");
		sched_item_fail_all(d, perm, enh, text);
		return;
	}
	free(d->hosts);
	d->hosts = xcalloc(SCHED_MAX_HOSTS, sizeof *d->hosts);
	d->nhosts = 0;
	for (size_t i = 0; i < res->nhosts; i++) {
		const struct dns_mx_host *h = &res->hosts[i];
		for (size_t j = 0; j < h->naddrs && d->nhosts < SCHED_MAX_HOSTS;
		    j++) {
			struct dlv_host *dh = &d->hosts[d->nhosts++];
			str_copy(dh->name, h->name, sizeof dh->name);
			memcpy(&dh->addr, &h->addrs[j], sizeof dh->addr);
		}
	}
	{
		char mx[512], name[600];
		const char *provider = NULL;
		bool rollup = true;

		sched_site_name(res, d->domain, mx, sizeof mx);
		config_shape_for(s->relay->cfg, d->domain, mx, &d->shape,
		    &rollup, &provider);
		/* One throttle per provider (MX suffix group), else per MX
		 * set; a domain with rollup off has its own. */
		if (!rollup)
			snprintf(name, sizeof name, "domain:%s", d->domain);
		else if (provider)
			snprintf(name, sizeof name, "provider:%s", provider);
		else
			str_copy(name, mx, sizeof name);
		d->site = sched_site_get(s, name, &d->shape, d->domain, mx);
	}
	d->hosts_expire = res->expires_ms;
	if (d->hosts_expire <= uv_now(s->loop))
		d->hosts_expire = uv_now(s->loop) + 1000;
	sched_kick(d);
}

/* sched_is_self - would this address reach one of our own listeners? */
static bool
sched_is_self(struct sched *s, const struct sockaddr_storage *a)
{
	const struct relay_config *cfg = s->relay->cfg;
	char text[64];

	if (a->ss_family == AF_INET6)
		uv_ip6_name((const struct sockaddr_in6 *)a, text, sizeof text);
	else
		uv_ip4_name((const struct sockaddr_in *)a, text, sizeof text);
	for (size_t i = 0; i < cfg->nlisteners; i++)
		if (cfg->listeners[i].port == cfg->delivery.port &&
		    strcmp(cfg->listeners[i].address, text) == 0)
			return true;
	return false;
}

/* sched_hold_arm - the hold timer fires for the earliest held dest */
static void
sched_hold_arm(struct sched *s)
{
	struct sched_dest *d;
	uint64_t now = uv_now(s->loop), first = UINT64_MAX;

	TAILQ_FOREACH(d, &s->held, hold)
		if (d->hold_until < first)
			first = d->hold_until;
	if (first == UINT64_MAX || s->stopping)
		uv_timer_stop(&s->hold_timer);
	else
		uv_timer_start(&s->hold_timer, sched_on_hold_timer,
		    first > now ? first - now : 0, 0);
}

/* sched_hold - d may not open sessions before hold_until */
static void
sched_hold(struct sched *s, struct sched_dest *d)
{
	if (!d->held) {
		d->held = true;
		TAILQ_INSERT_TAIL(&s->held, d, hold);
	}
	sched_hold_arm(s);
}

static void
sched_on_hold_timer(uv_timer_t *t)
{
	struct sched *s = t->data;
	struct sched_dest *d, *n;
	uint64_t now = uv_now(s->loop);

	for (d = TAILQ_FIRST(&s->held); d; d = n) {
		n = TAILQ_NEXT(d, hold);
		if (d->hold_until > now)
			continue;
		TAILQ_REMOVE(&s->held, d, hold);
		d->held = false;
		d->site_held = false;
		sched_kick(d);
	}
	sched_hold_arm(s);
}

/*
 * sched_site_release - the site allows more now (an episode ended, a
 * step up): its destinations held on its word are kicked at once rather
 * than when their hold, taken under the old limits, runs out.
 */
static void
sched_site_release(struct sched *s, struct sched_site *ss)
{
	struct sched_dest *d, *n;

	for (d = TAILQ_FIRST(&s->held); d; d = n) {
		n = TAILQ_NEXT(d, hold);
		if (d->site != ss || !d->site_held)
			continue;
		TAILQ_REMOVE(&s->held, d, hold);
		d->held = false;
		d->site_held = false;
		d->hold_until = 0;
		sched_kick(d);
	}
	sched_hold_arm(s);
}

/* sched_starve - d has ready work but no slot: wake it on a session end */
static void
sched_starve(struct sched *s, struct sched_dest *d)
{
	if (d->starved)
		return;
	d->starved = true;
	TAILQ_INSERT_TAIL(&s->starved, d, starve);
}

/*
 * sched_release_lingering - a destination waits for a session slot: the
 * sessions idling for more work of their own give theirs up (poked, they
 * find s->starved not empty and QUIT).
 */
static void
sched_release_lingering(struct sched *s)
{
	struct sched_conn *sc, *sn;

	for (sc = LIST_FIRST(&s->conns); sc; sc = sn) {
		sn = LIST_NEXT(sc, entry);
		if (sc->lingering)
			dlv_session_poke(sc->dlv);
	}
}

/* sched_kick - resolve, fail, or open sessions for d as caps allow */
static void
sched_kick(struct sched_dest *d)
{
	struct sched *s = d->sched;
	const struct relay_config *cfg = s->relay->cfg;

	if (d->nready == 0 || s->stopping)
		return;
	if (d->domain[0] == '\0') {
		sched_item_fail_all(d, true, "5.1.3", "recipient has no domain");
		return;
	}
	if (d->hosts == NULL || d->hosts_expire <= uv_now(s->loop)) {
		if (d->dns == NULL)
			d->dns = dns_mx_lookup(s->dns, d->domain, sched_on_dns, d);
		return;
	}
	if (d->hold_until > uv_now(s->loop)) {
		sched_hold(s, d);
		return;
	}
	if (d->nwaiting > 0) {
		/* Sessions idling for a rate token or more work go
		 * first; one whose idle time ran out is leaving. */
		struct sched_conn *sc, *sn;

		for (sc = LIST_FIRST(&s->conns); sc; sc = sn) {
			sn = LIST_NEXT(sc, entry);
			if (sc->dest != d || !sc->waiting)
				continue;
			if (!dlv_session_idle(sc->dlv)) {
				sc->waiting = false;
				sc->lingering = false;
				d->nwaiting--;
				continue;
			}
			dlv_session_poke(sc->dlv);
		}
		if (d->nwaiting > 0 || d->nready == 0)
			return;
	}
	if (d->conn_limit > cfg->delivery.max_connections_per_domain)
		d->conn_limit = cfg->delivery.max_connections_per_domain;
	while (d->nready > 0 && d->active < d->conn_limit) {
		if (d->site) {
			int64_t now = time_wall_ms(), next;
			unsigned lim = site_may_connect(d->site->site,
			    d->site->active, now, &next);

			if (lim) {
				/* The site says not now: until a time, or until
				 * one of its sessions ends. */
				if (next != SITE_NEVER) {
					d->hold_until = uv_now(s->loop) +
					    (uint64_t)(next > now ? next - now : 0);
					d->site_held = true;
					sched_hold(s, d);
				} else {
					sched_starve(s, d);
				}
				return;
			}
		}
		if (s->active >= cfg->delivery.max_connections) {
			/* The global cap: wait for any session to end. */
			sched_starve(s, d);
			sched_release_lingering(s);
			return;
		}
		struct dlv_target t;
		struct dlv_host hosts[SCHED_MAX_HOSTS];
		struct sched_conn *sc;
		size_t nh = 0;

		memset(&t, 0, sizeof t);
		for (size_t i = 0; i < d->nhosts; i++) {
			struct addrmap_entry *e;
			if (sched_is_self(s, &d->hosts[i].addr)) {
				sched_item_fail_all(d, true, "5.4.6",
				    "mail for this domain loops back to myself");
				return;
			}
			e = addrmap_get(s->hosts,
			    (struct sockaddr *)&d->hosts[i].addr, false);
			if (e && e->count >= cfg->delivery.max_connections_per_host)
				continue;
			hosts[nh++] = d->hosts[i];
		}
		if (nh == 0) {
			/* Every address at its cap (maybe another domain's
			 * sessions to a shared MX): wait for a session end. */
			sched_starve(s, d);
			sched_release_lingering(s);
			return;
		}
		/* Do not open more sessions than there is work for. */
		if (d->active > 0 && d->nready <= (size_t)d->active)
			return;
		t.tls = (enum dlv_tls)(d->shape.set ? d->shape.tls :
		    config_tls_policy(cfg, d->domain));
		t.tls_ctx = s->client_tls;
		if (t.tls == DLV_TLS_VERIFY) {
			char err[600];

			if (s->verify_tls == NULL && (s->verify_tls =
			    tls_client_verify_ctx_new(cfg->delivery.ca_file, err,
			    sizeof err)) == NULL) {
				log_warnx("%s sched tls-setup error=\"%s\"",
				    d->domain, err);
				sched_item_fail_all(d, false, "4.7.5", err);
				return;
			}
			t.tls_ctx = s->verify_tls;
		}
		str_copy(t.domain, d->domain, sizeof t.domain);
		t.hosts = hosts;
		t.nhosts = nh;
		t.port = cfg->delivery.port;
		str_copy(t.helo, cfg->delivery.helo ? cfg->delivery.helo :
		    cfg->hostname, sizeof t.helo);
		t.has_source = cfg->delivery.has_source;
		t.source = cfg->delivery.source;
		t.linger_ms = SCHED_LINGER_MS;
		t.max_msgs = d->shape.set && d->shape.max_msgs_per_conn > 0 ?
		    d->shape.max_msgs_per_conn :
		    cfg->delivery.max_messages_per_connection;
		if (d->site) {
			int mpc = site_msgs_per_conn(d->site->site,
			    time_wall_ms());

			if (mpc > 0 && (t.max_msgs <= 0 || mpc < t.max_msgs))
				t.max_msgs = mpc;
		}
		for (int p = 0; p < DLV_PHASE_LAST; p++)
			t.timeout_ms[p] = cfg->delivery.timeout_ms[p];
		sc = xcalloc(1, sizeof *sc);
		sc->sched = s;
		sc->dest = d;
		sc->site = d->site;
		if (sc->site)
			sc->site->active++;
		sc->cfg = config_ref(s->relay->cfg);
		t.rules = &sc->cfg->reply_rules;
		d->active++;
		s->active++;
		LIST_INSERT_HEAD(&s->conns, sc, entry);
		sc->dlv = dlv_session_start(s->loop, relay_next_id(s->relay), &t,
		    &sched_dlv_ops, sc);
	}
}

/* sched_uncharge - release the session's per-address slot */
static void
sched_uncharge(struct sched_conn *sc)
{
	struct addrmap_entry *e;

	if (!sc->charged)
		return;
	e = addrmap_get(sc->sched->hosts, (struct sockaddr *)&sc->counted,
	    false);
	if (e && --e->count == 0)
		addrmap_del(sc->sched->hosts, e);
	sc->charged = false;
}

static bool
sched_on_connecting(void *arg, struct dlv_session *dlv,
    const struct sockaddr_storage *addr)
{
	struct sched_conn *sc = arg;
	struct sched *s = sc->sched;
	struct addrmap_entry *e;

	sched_uncharge(sc);
	e = addrmap_get(s->hosts, (const struct sockaddr *)addr, true);
	if (e->count >= s->relay->cfg->delivery.max_connections_per_host) {
		if (e->count == 0)
			addrmap_del(s->hosts, e);
		return false;
	}
	e->count++;
	if (sc->site)		/* every connection counts against the rate */
		site_conn_open(sc->site->site, time_wall_ms());
	sc->counted = *addr;
	sc->charged = true;
	sc->tried = true;
	return true;
}

static struct dlv_txn *
sched_on_next(void *arg, struct dlv_session *dlv)
{
	struct sched_conn *sc = arg;
	struct sched_dest *d = sc->dest;
	struct sched_item *it;
	struct dlv_txn *t = &sc->txn;
	int64_t now = time_wall_ms(), next;
	int rc;

	sc->asked = true;	/* the host took us: not a connection failure */
	sc->lingering = false;
	if (sc->sched->stopping || sc->done)
		goto none;
	if (TAILQ_EMPTY(&d->ready)) {
		/*
		 * Nothing now: stay a moment for the next message rather
		 * than QUIT and reconnect (a new connection per message or
		 * two otherwise, which a receiver's connection rate limit
		 * counts), unless a destination waits for a session slot.
		 */
		if (!TAILQ_EMPTY(&sc->sched->starved))
			goto none;
		if (!sc->waiting) {
			sc->waiting = true;
			d->nwaiting++;
		}
		sc->lingering = true;
		return DLV_TXN_LINGER;
	}
	if (d->site && !site_take_token(d->site->site, now, &next)) {
		/* Over the site's message rate: idle on this connection
		 * until the token is due rather than reconnecting later. */
		if (!sc->waiting) {
			sc->waiting = true;
			d->nwaiting++;
		}
		if (next != SITE_NEVER) {
			d->hold_until = uv_now(sc->sched->loop) +
			    (uint64_t)(next > now ? next - now : 0);
			d->site_held = true;
			sched_hold(sc->sched, d);
		}
		return DLV_TXN_WAIT;
	}
	if (sc->waiting) {
		sc->waiting = false;
		d->nwaiting--;
	}

	while ((it = TAILQ_FIRST(&d->ready)) != NULL && !sc->sched->stopping) {
		size_t cap = d->shape.max_rcpts_per_txn > 0 ?
		    (size_t)d->shape.max_rcpts_per_txn : it->n;

		TAILQ_REMOVE(&d->ready, it, entry);
		d->nready--;
		if (it->n > cap) {
			/* Items are grouped per domain before the MX, and so
			 * the site's shaping, is known: the recipients over
			 * the site's limit wait at the head of the queue for
			 * the next transaction. */
			struct sched_item *rest = sched_item_new(it->msg, d,
			    it->due, it->n - cap);

			memcpy(rest->idx, it->idx + cap,
			    (it->n - cap) * sizeof *rest->idx);
			rest->n = it->n - cap;
			it->n = cap;
			TAILQ_INSERT_HEAD(&d->ready, rest, entry);
			d->nready++;
		}
		memset(t, 0, sizeof *t);
		if ((rc = spool_body_open(sc->sched->relay->spool, it->msg->id,
		    &t->fd)) < 0) {
			log_warnx("%s sched body-open error=\"%s\"", it->msg->id,
			    relay_strerror(rc));
			struct dlv_rcpt_out *out = xcalloc(it->n, sizeof *out);
			for (size_t i = 0; i < it->n; i++) {
				out[i].v.action = VERDICT_RCPT_RETRY;
				snprintf(out[i].reply.text,
				    sizeof out[i].reply.text,
				    "queue file unreadable: %s",
				    relay_strerror(rc));
			}
			sched_item_finish(sc->sched, it, out, "", "", "");
			free(out);
			continue;
		}
		str_copy(t->id, it->msg->id, sizeof t->id);
		t->env = &it->msg->env;
		t->idx = it->idx;
		t->n = it->n;
		t->out = xcalloc(it->n, sizeof *t->out);
		t->size = it->msg->env.size;
		t->owner = it;
		sc->item = it;
		return t;
	}
none:
	if (sc->waiting) {
		sc->waiting = false;
		d->nwaiting--;
	}
	return NULL;
}

static void
sched_on_done(void *arg, struct dlv_session *dlv, struct dlv_txn *t)
{
	struct sched_conn *sc = arg;
	struct sched_item *it = t->owner;

	close(t->fd);
	sc->item = NULL;
	for (size_t i = 0; i < t->n; i++) {
		/*
		 * "Max message per connection reached": this connection is
		 * done, and the ones before this transaction are what a
		 * connection may carry. Said of the first one, it is no
		 * count at all: a throttle, or we would reconnect at once,
		 * again and again.
		 */
		if (t->out[i].v.cls == VERDICT_CLASS_MSGS_PER_CONN) {
			int64_t now = time_wall_ms();
			int n = (int)dlv_session_txns(dlv) - 1;
			char text[1100];
			unsigned fx;

			sc->done = true;
			if (sc->site == NULL)
				break;
			sched_reply_text(&t->out[i].reply, text, sizeof text);
			fx = n >= 1 ? site_learn_msgs_per_conn(sc->site->site, n,
			    now) : site_report(sc->site->site,
			    SITE_SIG_THROTTLE, now, t->out[i].v.hint_s, text);
			sched_site_fx(sc->sched, sc->site, fx, text);
			break;
		}
	}
	sched_item_finish(sc->sched, it, t->out, dlv_session_host(dlv),
	    dlv_session_addr(dlv), dlv_session_tls(dlv));
	free(t->out);
	t->out = NULL;
}

static void
sched_on_closed(void *arg, struct dlv_session *dlv, unsigned delivered,
    const struct smtp_reply *last, const struct verdict *lastv)
{
	struct sched_conn *sc = arg;
	struct sched *s = sc->sched;
	struct sched_dest *d = sc->dest;
	struct sched_site *ss = sc->site;
	/* A session that got as far as asking for work did not fail to
	 * connect, even if it found nothing to do. */
	bool tried = sc->tried && !sc->asked;

	sched_uncharge(sc);
	if (sc->waiting)
		d->nwaiting--;
	if (ss) {
		ss->active--;
		/* No transaction at all: the host refused to talk. What
		 * that means is verdict.c's: a 421 greeting is the receiver
		 * asking for calm (RECEIVERS 2), a block greeting a
		 * suspension, anything else a connection failure. */
		if (delivered == 0 && tried && !s->stopping) {
			enum site_signal sig = SITE_SIG_CONN_FAIL;
			int hint = 0;
			char text[1100];
			unsigned fx;

			if (lastv->cls == VERDICT_CLASS_THROTTLE) {
				sig = SITE_SIG_THROTTLE;
				hint = lastv->hint_s;
			} else if (lastv->cls == VERDICT_CLASS_SUSPEND) {
				sig = SITE_SIG_SUSPEND;
				hint = lastv->hint_s > lastv->suspend_s ?
				    lastv->hint_s : lastv->suspend_s;
			}
			sched_reply_text(last, text, sizeof text);
			fx = site_report(ss->site, sig, time_wall_ms(), hint,
			    text);
			sched_site_fx(s, ss, fx, text);
		}
	}
	config_unref(sc->cfg);
	LIST_REMOVE(sc, entry);
	d->active--;
	s->active--;
	free(sc);
	/*
	 * No host could take anything and nobody else is delivering there:
	 * the destination is down for now; its items wait for their retry
	 * instead of spinning on connection attempts.
	 */
	if (delivered > 0) {
		d->fail_streak = 0;
		if (d->conn_limit < s->relay->cfg->delivery.
		    max_connections_per_domain)
			d->conn_limit++;
	} else if (tried) {
		uint64_t hold = SCHED_HOLD_BASE_MS;

		for (int i = 1; i < d->fail_streak && hold < SCHED_HOLD_MAX_MS;
		    i++)
			hold *= 2;
		if (hold > SCHED_HOLD_MAX_MS)
			hold = SCHED_HOLD_MAX_MS;
		d->fail_streak++;
		d->conn_limit = d->active > 1 ? d->active : 1;
		d->hold_until = uv_now(s->loop) + hold;
	}
	if (delivered == 0 && tried && d->active == 0 && !s->stopping) {
		char text[1100];
		sched_reply_text(last, text, sizeof text);
		sched_item_fail_all(d, false, last->enh[0] ? last->enh : "4.4.1",
		    text);
	}
	relay_session_gone(s->relay);
	/* A freed slot lets this destination, or one that waited for a
	 * global slot, go on (oldest waiter first). */
	if (!s->stopping) {
		TAILQ_HEAD(, sched_dest) waiting;
		struct sched_dest *o;

		sched_kick(d);
		/* Each waiter gets one try; one still blocked re-queues. */
		TAILQ_INIT(&waiting);
		TAILQ_CONCAT(&waiting, &s->starved, starve);
		while ((o = TAILQ_FIRST(&waiting)) != NULL) {
			TAILQ_REMOVE(&waiting, o, starve);
			o->starved = false;
			sched_kick(o);
		}
	}
}

/* --- relayctl -------------------------------------------------------- */

/* sched_site_waiting - ready recipients of destinations on that site */
static size_t
sched_site_waiting(const struct sched *s, const struct sched_site *ss)
{
	size_t n = 0;

	for (size_t b = 0; b < SCHED_DEST_BUCKETS; b++)
		for (const struct sched_dest *d = s->dests[b]; d; d = d->hnext)
			if (d->site == ss)
				n += d->nready;
	return n;
}

void
sched_sites_report(struct sched *s, struct buf *out, bool json)
{
	int64_t now = time_wall_ms();
	bool first = true;

	if (json)
		buf_puts(out, "{\"sites\": [");
	for (size_t b = 0; b < SCHED_DEST_BUCKETS; b++) {
		for (struct sched_site *ss = s->sites[b]; ss; ss = ss->hnext) {
			size_t waiting = sched_site_waiting(s, ss);

			if (json) {
				buf_puts(out, first ? "\n  {\"state\": " :
				    ",\n  {\"state\": ");
				site_to_json(ss->site, now, out);
				buf_printf(out, ", \"sessions\": %d, "
				    "\"waiting\": %zu}", ss->active, waiting);
			} else {
				buf_printf(out, "%s\n  sessions=%d waiting=%zu ",
				    site_name(ss->site), ss->active, waiting);
				site_to_text(ss->site, out);
				buf_puts(out, "\n");
			}
			first = false;
		}
	}
	if (json)
		buf_puts(out, first ? "]}\n" : "\n]}\n");
	else if (first)
		buf_puts(out, "no sites yet (a site appears once a destination "
		    "has been resolved)\n");
}

/* sched_item_has - does it carry recipient ri of message id? */
static bool
sched_item_has(const struct sched_item *it, const char *id, size_t ri)
{
	if (strcmp(it->msg->id, id) != 0)
		return false;
	for (size_t i = 0; i < it->n; i++)
		if (it->idx[i] == ri)
			return true;
	return false;
}

/* sched_ready_reason - why a ready item of d is not on its way yet */
static void
sched_ready_reason(struct sched *s, struct sched_dest *d, struct buf *out)
{
	int64_t now = time_wall_ms(), next;
	char when[32];

	if (d->dns) {
		buf_printf(out, "looking up the MX hosts of %s", d->domain);
		return;
	}
	if (d->site) {
		unsigned lim = site_may_connect(d->site->site, d->site->active,
		    now, &next);

		if (next != SITE_NEVER) {
			time_t t = (time_t)(next / 1000);
			struct tm tm;
			gmtime_r(&t, &tm);
			strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
		} else {
			str_copy(when, "a session ends", sizeof when);
		}
		if (lim & SITE_LIMIT_SUSPENDED) {
			buf_printf(out, "site %s is suspended until %s UTC",
			    site_name(d->site->site), when);
			return;
		}
		if (lim & SITE_LIMIT_HOLD) {
			buf_printf(out, "site %s is held after a throttle "
			    "(backoff or the receiver's hint) until %s UTC",
			    site_name(d->site->site), when);
			return;
		}
		if (lim & (SITE_LIMIT_CONN | SITE_LIMIT_PROBE)) {
			buf_printf(out, "site %s is at its connection limit "
			    "(%d of %d, mode %s); next when %s",
			    site_name(d->site->site), d->site->active,
			    site_conn_limit(d->site->site),
			    site_mode_name(site_mode(d->site->site)), when);
			return;
		}
		if (lim & SITE_LIMIT_CONN_RATE) {
			buf_printf(out, "site %s is at its connection rate; "
			    "next connection at %s UTC",
			    site_name(d->site->site), when);
			return;
		}
	}
	if (d->hold_until > uv_now(s->loop)) {
		buf_printf(out, "destination %s holds new connections for %llu "
		    "ms (failed connections or rate)", d->domain,
		    (unsigned long long)(d->hold_until - uv_now(s->loop)));
		return;
	}
	if (d->nwaiting > 0) {
		buf_printf(out, "waiting for a rate token of site %s (%.3f "
		    "msgs/s)", d->site ? site_name(d->site->site) : d->domain,
		    d->site ? site_rate(d->site->site) : 0.0);
		return;
	}
	if (d->starved) {
		buf_puts(out, "waiting for a free connection slot (global or "
		    "per MX address cap)");
		return;
	}
	buf_printf(out, "next in line for %s (%zu ready, %d sessions)",
	    d->domain, d->nready, d->active);
}

bool
sched_explain(struct sched *s, const char *id, struct buf *out)
{
	const struct envelope *env = spool_find(s->relay->spool, id);

	if (env == NULL)
		return false;
	buf_printf(out, "%s from <%s>, %llu bytes, queued %lld s ago\n", id,
	    env->sender, (unsigned long long)env->size,
	    (long long)(time_wall() - env->created));
	for (size_t ri = 0; ri < env->nrcpts; ri++) {
		const struct env_rcpt *rc = &env->rcpts[ri];
		const struct sched_conn *sc;
		bool found = false;

		buf_printf(out, "  <%s> %s attempts=%d", rc->addr,
		    env_rcpt_state_name(rc->state), rc->attempts);
		if (rc->last_reply)
			buf_printf(out, " last=\"%s\"", rc->last_reply);
		buf_puts(out, "\n    ");
		if (rc->state != ENV_RCPT_PENDING) {
			buf_puts(out, "final\n");
			continue;
		}
		LIST_FOREACH(sc, &s->conns, entry)
			if (sc->item && sched_item_has(sc->item, id, ri)) {
				buf_printf(out, "being delivered to %s now\n",
				    sc->dest->domain);
				found = true;
			}
		for (size_t h = 0; h < s->nheap && !found; h++)
			if (sched_item_has(s->heap[h], id, ri)) {
				char when[32];
				time_t t = (time_t)s->heap[h]->due;
				struct tm tm;

				gmtime_r(&t, &tm);
				strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
				buf_printf(out, "waiting for its retry at %s UTC "
				    "(in %lld s)\n", when,
				    (long long)(s->heap[h]->due - time_wall()));
				found = true;
			}
		for (size_t b = 0; b < SCHED_DEST_BUCKETS && !found; b++)
			for (struct sched_dest *d = s->dests[b]; d && !found;
			    d = d->hnext) {
				struct sched_item *it;
				TAILQ_FOREACH(it, &d->ready, entry)
					if (sched_item_has(it, id, ri)) {
						sched_ready_reason(s, d, out);
						buf_puts(out, "\n");
						found = true;
						break;
					}
			}
		if (!found)
			buf_puts(out, "its outcome is being written to the "
			    "spool\n");
	}
	return true;
}

/* --- life cycle -------------------------------------------------------- */

int
sched_new(struct relay *r, struct sched **out, char *err, size_t errlen)
{
	const struct relay_config *cfg = r->cfg;
	struct sched *s = xcalloc(1, sizeof *s);
	struct dns_options o;
	int rc;

	s->relay = r;
	s->loop = r->loop;
	s->hosts = addrmap_new();
	LIST_INIT(&s->conns);
	TAILQ_INIT(&s->starved);
	memset(&o, 0, sizeof o);
	o.servers = (const char *const *)cfg->dns.servers;
	o.nservers = cfg->dns.nservers;
	o.timeout_ms = cfg->dns.timeout_ms;
	o.tries = cfg->dns.tries;
	o.ipv6 = cfg->dns.ipv6;
	o.max_mx_ttl_s = cfg->dns.max_mx_ttl_s;
	o.negative_ttl_s = cfg->dns.negative_ttl_s;
	o.cache_size = (size_t)cfg->dns.cache_size;
	if ((rc = dns_new(r->loop, &o, &s->dns, err, errlen)) < 0) {
		addrmap_free(s->hosts);
		free(s);
		return rc;
	}
	if ((s->client_tls = tls_client_ctx_new(err, errlen)) == NULL) {
		dns_free(s->dns);
		addrmap_free(s->hosts);
		free(s);
		return RELAY_ETLS;
	}
	uv_timer_init(r->loop, &s->timer);
	s->timer.data = s;
	uv_timer_init(r->loop, &s->hold_timer);
	s->hold_timer.data = s;
	TAILQ_INIT(&s->held);
	uv_timer_init(r->loop, &s->save_timer);
	s->save_timer.data = s;
	s->state_path = xasprintf("%s/sites.state", cfg->spool_dir);
	sched_site_load(s);
	*out = s;
	spool_foreach(r->spool, sched_load_one, s);
	log_info("sched started waiting=%zu", s->nheap);
	return 0;
}

void
sched_reload(struct sched *s, const struct relay_config *cfg)
{
	/* Caps, timeouts and policies are read from relay->cfg when used;
	 * the verifying context is rebuilt in case ca_file changed (live
	 * sessions hold their own reference). */
	SSL_CTX_free(s->verify_tls);
	s->verify_tls = NULL;
	for (size_t b = 0; b < SCHED_DEST_BUCKETS; b++) {
		for (struct sched_site *ss = s->sites[b]; ss; ss = ss->hnext) {
			struct site_limits lim;
			struct cfg_shape sh;

			if (ss->domain) {
				config_shape_for(cfg, ss->domain, ss->mx_names,
				    &sh, NULL, NULL);
				sched_site_limits(cfg, &sh, &lim);
			} else {
				sched_site_limits(cfg, NULL, &lim);
			}
			site_set_limits(ss->site, &lim, time_wall_ms());
		}
	}
	/* Destinations pick their shaping up again at the next lookup. */
	for (size_t b = 0; b < SCHED_DEST_BUCKETS; b++)
		for (struct sched_dest *d = s->dests[b]; d; d = d->hnext)
			d->hosts_expire = 0;
	for (size_t b = 0; b < SCHED_DEST_BUCKETS; b++)
		for (struct sched_dest *d = s->dests[b]; d; d = d->hnext)
			sched_kick(d);
}

void
sched_stop(struct sched *s)
{
	struct sched_conn *sc;

	if (s->stopping)
		return;
	s->stopping = true;
	uv_timer_stop(&s->timer);
	uv_timer_stop(&s->hold_timer);
	/* What the sites learned survives the restart (RECEIVERS 4). */
	uv_timer_stop(&s->save_timer);
	sched_site_save(s);
	LIST_FOREACH(sc, &s->conns, entry)
		dlv_session_abort(sc->dlv);
}

bool
sched_busy(const struct sched *s)
{
	return s->active > 0 || s->updates > 0;
}

void
sched_free(struct sched *s)
{
	for (size_t b = 0; b < SCHED_DEST_BUCKETS; b++) {
		struct sched_dest *d = s->dests[b], *n;
		for (; d; d = n) {
			struct sched_item *it;
			n = d->hnext;
			if (d->dns)
				dns_req_cancel(d->dns);
			while ((it = TAILQ_FIRST(&d->ready)) != NULL) {
				TAILQ_REMOVE(&d->ready, it, entry);
				sched_item_free(it);
			}
			free(d->hosts);
			free(d);
		}
	}
	while (s->nheap)
		sched_item_free(heap_pop(s));
	free(s->heap);
	dns_free(s->dns);
	SSL_CTX_free(s->client_tls);
	SSL_CTX_free(s->verify_tls);
	addrmap_free(s->hosts);
	for (size_t b = 0; b < SCHED_DEST_BUCKETS; b++) {
		struct sched_site *ss = s->sites[b], *n;
		for (; ss; ss = n) {
			n = ss->hnext;
			site_free(ss->site);
			free(ss->domain);
			free(ss->mx_names);
			free(ss);
		}
	}
	free(s->state_path);
	/* Three handles; whichever close callback runs last frees s. */
	s->pending_closes = 3;
	uv_close((uv_handle_t *)&s->save_timer, sched_on_timer_closed);
	uv_close((uv_handle_t *)&s->hold_timer, sched_on_timer_closed);
	uv_close((uv_handle_t *)&s->timer, sched_on_timer_closed);
}

static void
sched_on_timer_closed(uv_handle_t *h)
{
	struct sched *s = h->data;

	if (--s->pending_closes == 0)
		free(s);
}
