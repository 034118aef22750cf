/*
 * NAME
 *	dns.c - MX lookups with c-ares 1.18 on the libuv loop, and a cache
 *
 * SUMMARY
 *	dns_new(), dns_free(), dns_mx_lookup(), dns_req_cancel(),
 *	dns_strerror(), dns_status_permanent(), dns_cache_count()
 *
 * DESCRIPTION
 *	c-ares owns the sockets; we watch them. Its SOCK_STATE_CB tells us
 *	when a socket opens, what to wait for, and when it is about to be
 *	closed: each gets a uv_poll_t (struct dns_sock) that feeds
 *	ares_process_fd(). One uv_timer_t is re-armed from ares_timeout()
 *	after every call into c-ares, and fires ares_process_fd() with
 *	ARES_SOCKET_BAD so retransmissions and timeouts happen.
 *
 *	A lookup (struct dns_lookup) is one ares_query() for MX, then one
 *	ares_getaddrinfo() per MX host, all in parallel. It belongs to the
 *	domain, not to a caller: callers hold a struct dns_req that waits on
 *	it, so identical lookups in flight coalesce, and cancelling a request
 *	only detaches it (c-ares 1.18 cannot cancel a single query). When the
 *	last address lookup settles, the lookup builds an immutable,
 *	reference-counted struct dns_answer in one heap block, caches it, and
 *	moves its waiters to the ready list.
 *
 *	Nothing is ever delivered from inside the call that asked. c-ares
 *	may complete a query inside ares_query() (a bad name, no servers),
 *	and cache hits and literals complete at once; so every result goes
 *	through d->ready and a uv_idle_t. An idle handle, not a check handle:
 *	an active idle handle makes the loop poll with a zero timeout, so the
 *	delivery happens on this iteration instead of after the next event.
 *
 *	Equal MX preferences are shuffled at delivery, per request, so a
 *	cached answer does not send all its mail to one host.
 *
 * ERRORS
 *	Results carry 0 or a DNS_E* status with a sentence in why. c-ares
 *	failures that retrying could cure (SERVFAIL, REFUSED, timeouts,
 *	connection errors, malformed or truncated answers) are DNS_ETEMP and
 *	never cached. NXDOMAIN, null MX and "no MX host has an address" are
 *	permanent and cached for negative_ttl. A lookup in which some MX hosts
 *	failed temporarily but others resolved succeeds with those, cached at
 *	most DNS_PARTIAL_TTL_S. Every c-ares return is checked; a parse
 *	failure is a temporary error, never a crash.
 */
#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <ares.h>
#include <uv.h>

#include "config/log.h"
#include "config/util.h"
#include "dns/dns.h"

#define DNS_MAX_HOSTS	16	/* MX hosts resolved, lowest preferences */
#define DNS_MAX_ADDRS	16	/* addresses kept per host */
#define DNS_NAME_MAX	253	/* longest domain, without the final dot */
#define DNS_INFLIGHT	256	/* buckets of the in-flight table */
#define DNS_PARTIAL_TTL_S 60	/* cache cap when some MX hosts failed */

/* A list of requests: a lookup's waiters, or the ready list. */
struct dns_list {
	struct dns_req *head;		/* oldest */
	struct dns_req *tail;		/* newest: appends go here */
	size_t n;			/* members */
};

/* One socket c-ares asked us to watch. */
struct dns_sock {
	struct dns *dns;		/* owner */
	ares_socket_t fd;		/* c-ares's socket */
	uv_poll_t poll;			/* embedded; freed by its close cb */
	struct dns_sock *next;		/* d->socks */
};

/* An immutable result, shared by the cache and the deliveries. */
struct dns_answer {
	int refs;			/* cache entry + pending deliveries */
	struct dns_mx_result res;	/* all pointers lead into this block */
};

/* A cached answer; the key is ans->res.domain. */
struct dns_entry {
	uint32_t hash;			/* dns_hash(key) */
	struct dns_answer *ans;		/* one reference */
	struct dns_entry *hnext;	/* hash chain */
	struct dns_entry *newer;	/* LRU list, towards d->lru_new */
	struct dns_entry *older;	/* LRU list, towards d->lru_old */
};

/* One MX host of a lookup and the state of its address lookup. */
struct dns_hostq {
	struct dns_lookup *lk;		/* owner, for dns_on_addrinfo */
	char *name;			/* exchange, lower case */
	int pref;			/* MX preference */
	int status;			/* ARES_* of its address lookup */
	int ttl;			/* smallest address TTL, seconds */
	struct sockaddr_storage *addrs;	/* usable addresses, port 0 */
	size_t naddrs;			/* in addrs */
};

/* One domain being resolved, shared by every request for it. */
struct dns_lookup {
	struct dns *dns;		/* owner */
	char *key;			/* lower-cased domain */
	uint32_t hash;			/* dns_hash(key) */
	uint32_t id;			/* for logs: the first request's id */
	struct dns_lookup *hnext;	/* d->inflight chain */
	struct dns_list waiters;	/* requests to answer */
	struct dns_hostq *hq;		/* MX hosts; never reallocated once
					   their address lookups started */
	size_t nhq;			/* entries in hq */
	int pending;			/* address lookups still running */
	int mx_ttl;			/* smallest MX TTL, seconds */
	bool implicit;			/* no MX: hq[0] is the domain */
};

/* One caller's interest in a domain. */
struct dns_req {
	uint32_t id;			/* for logs */
	struct dns_list *on;		/* lk->waiters or d->ready */
	struct dns_req *prev, *next;	/* neighbours in *on */
	struct dns_answer *ans;		/* set once on the ready list */
	bool cached;			/* answered from the cache */
	dns_mx_cb cb;			/* the caller's callback */
	void *arg;			/* for cb */
};

struct dns {
	uv_loop_t *loop;		/* the loop everything runs on */
	ares_channel ch;		/* the c-ares channel */
	uv_timer_t timer;		/* c-ares's next timeout */
	uv_idle_t idle;			/* delivers d->ready; active iff
					   the list is not empty */
	struct dns_sock *socks;		/* sockets being watched */
	struct dns_list ready;		/* answered, waiting for delivery */
	struct dns_lookup *inflight[DNS_INFLIGHT];	/* by key hash */
	struct dns_entry **cache;	/* hash buckets */
	size_t ncache_buckets;		/* a power of two */
	size_t ncache;			/* entries */
	size_t cache_size;		/* most entries kept */
	struct dns_entry *lru_new;	/* most recently used */
	struct dns_entry *lru_old;	/* next to evict */
	bool ipv6;			/* resolve AAAA too */
	int max_mx_ttl_s;		/* cap of positive answers */
	int negative_ttl_s;		/* life of permanent failures */
	uint64_t rng;			/* xorshift state for the shuffle */
	uint32_t next_id;		/* request ids for logs */
	int pending_closes;		/* uv_close()s not yet called back */
	bool closing;			/* dns_free() has begun */
	bool delivering;		/* inside dns_on_idle */
};

static void dns_list_add(struct dns_list *, struct dns_req *);
static void dns_list_del(struct dns_req *);
static uint32_t dns_hash(const char *);
static uint64_t dns_rand(struct dns *);
static bool dns_name_norm(const char *, char *, size_t);
static int dns_addr_parse(const char *, struct sockaddr_storage *);
static const char *dns_put(char **, const char *);
static struct dns_answer *dns_answer_new(const char *, int, const char *,
    const struct dns_hostq *, size_t);
static struct dns_answer *dns_answer_fail(const char *, int, const char *,
    ...) __attribute__((format(printf, 3, 4)));
static struct dns_answer *dns_answer_literal(struct dns *, const char *);
static void dns_answer_unref(struct dns_answer *);
static void dns_req_ready(struct dns *, struct dns_req *,
    struct dns_answer *);
static struct dns_entry *dns_cache_get(struct dns *, const char *, uint32_t);
static void dns_cache_put(struct dns *, uint32_t, struct dns_answer *);
static void dns_cache_del(struct dns *, struct dns_entry *);
static void dns_lru_unlink(struct dns *, struct dns_entry *);
static void dns_lru_push(struct dns *, struct dns_entry *);
static int dns_answer_ttl(const unsigned char *, int);
static int dns_hostq_cmp(const void *, const void *);
static void dns_lookup_mx(struct dns_lookup *, struct ares_mx_reply *, int);
static void dns_lookup_implicit(struct dns_lookup *);
static void dns_lookup_resolve(struct dns_lookup *);
static void dns_lookup_settle(struct dns_lookup *);
static void dns_lookup_finish(struct dns_lookup *, struct dns_answer *, int);
static void dns_lookup_free(struct dns_lookup *);
static void dns_sock_close(struct dns *, struct dns_sock *);
static void dns_rearm(struct dns *);
static void dns_closed(struct dns *);
static void dns_on_mx_answer(void *, int, int, unsigned char *, int);
static void dns_on_addrinfo(void *, int, int, struct ares_addrinfo *);
static void dns_on_idle(uv_idle_t *);
static void dns_on_sock_state(void *, ares_socket_t, int, int);
static void dns_on_poll(uv_poll_t *, int, int);
static void dns_on_timer(uv_timer_t *);
static void dns_on_sock_closed(uv_handle_t *);
static void dns_on_handle_closed(uv_handle_t *);

/* ares_library_init() is process-wide; this is its one-time flag. */
static bool dns_lib_ready;
/* ARES_OPT_LOOKUPS: DNS only, never /etc/hosts ("b" = bind). */
static char dns_lookups[] = "b";

/* dns_list_add - append r to l */
static void
dns_list_add(struct dns_list *l, struct dns_req *r)
{
	r->on = l;
	r->next = NULL;
	r->prev = l->tail;
	*(l->tail != NULL ? &l->tail->next : &l->head) = r;
	l->tail = r;
	l->n++;
}

/* dns_list_del - unlink r from whichever list holds it */
static void
dns_list_del(struct dns_req *r)
{
	struct dns_list *l = r->on;

	*(r->prev != NULL ? &r->prev->next : &l->head) = r->next;
	*(r->next != NULL ? &r->next->prev : &l->tail) = r->prev;
	l->n--;
	r->on = NULL;
}

/* dns_hash - FNV-1a of a lower-cased key */
static uint32_t
dns_hash(const char *s)
{
	uint32_t h = 2166136261u;

	for (; *s != '\0'; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h;
}

/* dns_rand - xorshift64*: shuffling needs spread, not secrecy */
static uint64_t
dns_rand(struct dns *d)
{
	d->rng ^= d->rng >> 12;
	d->rng ^= d->rng << 25;
	d->rng ^= d->rng >> 27;
	return d->rng * 0x2545F4914F6CDD1DULL;
}

/*
 * dns_name_norm - lower-case a domain into out, dropping one final dot.
 * Only LDH labels (and '_') of 1..63 octets, 253 in all: anything else
 * cannot be an MX target, and IDNs must arrive as A-labels.
 */
static bool
dns_name_norm(const char *s, char *out, size_t outlen)
{
	size_t len = strlen(s), i, label = 0;

	if (len > 0 && s[len - 1] == '.')
		len--;
	if (len == 0 || len > DNS_NAME_MAX || len >= outlen)
		return false;
	for (i = 0; i < len; i++) {
		char c = s[i] >= 'A' && s[i] <= 'Z' ? (char)(s[i] + 32) : s[i];

		if (c == '.' ? label == 0 : !((c >= 'a' && c <= 'z') ||
		    (c >= '0' && c <= '9') || c == '-' || c == '_'))
			return false;
		label = c == '.' ? 0 : label + 1;
		if (label > 63)
			return false;
		out[i] = c;
	}
	out[len] = '\0';
	return true;
}

/* dns_addr_parse - numeric IPv4 or IPv6 into ss (port 0); family or 0 */
static int
dns_addr_parse(const char *s, struct sockaddr_storage *ss)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof *ss);
	if (inet_pton(AF_INET, s, &sin->sin_addr) == 1)
		return sin->sin_family = AF_INET;
	if (inet_pton(AF_INET6, s, &sin6->sin6_addr) == 1)
		return sin6->sin6_family = AF_INET6;
	return 0;
}

/* dns_put - copy s with its NUL to *p, advance *p; returns the copy */
static const char *
dns_put(char **p, const char *s)
{
	size_t n = strlen(s) + 1;
	char *at = *p;

	memcpy(at, s, n);
	*p += n;
	return at;
}

/*
 * dns_answer_new - one heap block: header, hosts, addresses, strings.
 * Hosts without an address are left out; hq may be NULL.
 */
static struct dns_answer *
dns_answer_new(const char *domain, int status, const char *why,
    const struct dns_hostq *hq, size_t nhq)
{
	size_t i, nh = 0, na = 0, text = strlen(domain) + 1;
	struct sockaddr_storage *ss;
	struct dns_answer *a;
	struct dns_mx_host *h;
	char *p;

	for (i = 0; i < nhq; i++)
		if (hq[i].naddrs > 0) {
			nh++;
			na += hq[i].naddrs;
			text += strlen(hq[i].name) + 1;
		}
	text += why != NULL ? strlen(why) + 1 : 0;
	/* Every part before the text is a multiple of 8 bytes. */
	_Static_assert(sizeof(struct dns_answer) % 8 == 0, "align");
	_Static_assert(sizeof(struct dns_mx_host) % 8 == 0, "align");
	a = xcalloc(1, sizeof *a + nh * sizeof *h + na * sizeof *ss + text);
	h = (struct dns_mx_host *)(a + 1);
	ss = (struct sockaddr_storage *)(h + nh);
	p = (char *)(ss + na);
	a->refs = 1;
	a->res.status = status;
	a->res.hosts = h;
	a->res.nhosts = nh;
	a->res.domain = dns_put(&p, domain);
	a->res.why = why != NULL ? dns_put(&p, why) : NULL;
	for (i = 0; i < nhq; i++) {
		if (hq[i].naddrs == 0)
			continue;
		h->name = dns_put(&p, hq[i].name);
		h->pref = hq[i].pref;
		memcpy(ss, hq[i].addrs, hq[i].naddrs * sizeof *ss);
		h->addrs = ss;
		h->naddrs = hq[i].naddrs;
		ss += hq[i].naddrs;
		h++;
	}
	return a;
}

/* dns_answer_fail - a host-less answer with a formatted reason */
static struct dns_answer *
dns_answer_fail(const char *domain, int status, const char *fmt, ...)
{
	char why[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof why, fmt, ap);
	va_end(ap);
	return dns_answer_new(domain, status, why, NULL, 0);
}

/*
 * dns_answer_literal - "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321
 * 4.1.3; the tag is case-insensitive). No DNS is involved.
 */
static struct dns_answer *
dns_answer_literal(struct dns *d, const char *domain)
{
	char in[INET6_ADDRSTRLEN + 8], canon[INET6_ADDRSTRLEN];
	struct dns_hostq hq = { .name = canon, .naddrs = 1 };
	struct sockaddr_storage ss;
	struct dns_answer *a;
	size_t len = strlen(domain);
	bool tag;
	int fam = 0;

	if (len >= 3 && domain[len - 1] == ']' && len - 2 < sizeof in) {
		memcpy(in, domain + 1, len - 2);
		in[len - 2] = '\0';
		tag = str_hasprefix_i(in, "IPv6:");
		fam = dns_addr_parse(in + (tag ? 5 : 0), &ss);
		/* An IPv4 address only bare, an IPv6 one only tagged. */
		if (fam != (tag ? AF_INET6 : AF_INET))
			fam = 0;
	}
	if (fam == 0)
		return dns_answer_fail(domain, DNS_EBADNAME, "%s is not an "
		    "address literal such as [192.0.2.1] or "
		    "[IPv6:2001:db8::1]", log_value(in, sizeof in, domain));
	if (fam == AF_INET6 && !d->ipv6)
		return dns_answer_fail(domain, DNS_ENOHOST, "address literal "
		    "%s is IPv6, and IPv6 is disabled", domain);
	inet_ntop(fam, fam == AF_INET ?
	    (void *)&((struct sockaddr_in *)&ss)->sin_addr :
	    (void *)&((struct sockaddr_in6 *)&ss)->sin6_addr, canon,
	    sizeof canon);
	hq.addrs = &ss;
	a = dns_answer_new(domain, 0, NULL, &hq, 1);
	a->res.literal = true;
	/* An address never changes; the cap only bounds caller caches. */
	a->res.expires_ms = uv_now(d->loop) + (uint64_t)d->max_mx_ttl_s * 1000;
	return a;
}

/* dns_answer_unref - drop a reference; the last frees the block */
static void
dns_answer_unref(struct dns_answer *a)
{
	if (a != NULL && --a->refs == 0)
		free(a);
}

/* dns_req_ready - queue r for delivery with answer a (reference taken) */
static void
dns_req_ready(struct dns *d, struct dns_req *r, struct dns_answer *a)
{
	r->ans = a;
	dns_list_add(&d->ready, r);
	uv_idle_start(&d->idle, dns_on_idle);
}

/* dns_new - the channel, its handles and an empty cache; see dns.h */
int
dns_new(uv_loop_t *loop, const struct dns_options *o, struct dns **out,
    char *err, size_t errlen)
{
	struct ares_options opts;
	struct dns *d;
	struct buf csv;
	size_t i;
	int rc;

	*out = NULL;
	if (o->timeout_ms <= 0 || o->tries <= 0 || o->max_mx_ttl_s < 0 ||
	    o->negative_ttl_s < 0 || (o->nservers > 0 && o->servers == NULL)) {
		snprintf(err, errlen, "dns: invalid options");
		return -EINVAL;
	}
	if (!dns_lib_ready &&
	    (rc = ares_library_init(ARES_LIB_INIT_ALL)) != ARES_SUCCESS) {
		snprintf(err, errlen, "dns: ares_library_init: %s",
		    ares_strerror(rc));
		return -EIO;
	}
	dns_lib_ready = true;
	d = xcalloc(1, sizeof *d);
	memset(&opts, 0, sizeof opts);
	opts.sock_state_cb = dns_on_sock_state;
	opts.sock_state_cb_data = d;
	opts.timeout = o->timeout_ms;
	opts.tries = o->tries;
	opts.lookups = dns_lookups;
	/* ndomains 0: no search list; an MX target is fully qualified. */
	rc = ares_init_options(&d->ch, &opts, ARES_OPT_SOCK_STATE_CB |
	    ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_DOMAINS |
	    ARES_OPT_LOOKUPS);
	if (rc != ARES_SUCCESS) {
		snprintf(err, errlen, "dns: ares_init_options: %s",
		    ares_strerror(rc));
		free(d);
		return rc == ARES_ENOMEM ? -ENOMEM : -EIO;
	}
	buf_init(&csv);
	for (i = 0; i < o->nservers; i++)
		buf_printf(&csv, "%s%s", i > 0 ? "," : "", o->servers[i]);
	rc = o->nservers > 0 ? ares_set_servers_ports_csv(d->ch, csv.data) :
	    ARES_SUCCESS;
	if (rc != ARES_SUCCESS) {
		snprintf(err, errlen, "dns: servers \"%s\": %s", csv.data,
		    ares_strerror(rc));
		buf_free(&csv);
		ares_destroy(d->ch);
		free(d);
		return rc == ARES_ENOMEM ? -ENOMEM : RELAY_ECONFIG;
	}
	buf_free(&csv);
	d->loop = loop;
	d->ipv6 = o->ipv6;
	d->max_mx_ttl_s = o->max_mx_ttl_s;
	d->negative_ttl_s = o->negative_ttl_s;
	d->cache_size = o->cache_size;
	/* About one bucket per entry, within reason. */
	for (d->ncache_buckets = 64; d->ncache_buckets < d->cache_size &&
	    d->ncache_buckets < (1u << 20); d->ncache_buckets <<= 1)
		;
	d->cache = xcalloc(d->ncache_buckets, sizeof *d->cache);
	if (getrandom(&d->rng, sizeof d->rng, GRND_NONBLOCK) !=
	    (ssize_t)sizeof d->rng)
		d->rng = uv_hrtime() ^ ((uint64_t)getpid() << 32);
	d->rng |= 1;	/* xorshift must not start at 0 */
	/* Loop handles last: nothing above needs uv_close() to undo. */
	uv_timer_init(loop, &d->timer);
	uv_idle_init(loop, &d->idle);
	d->timer.data = d->idle.data = d;
	*out = d;
	return 0;
}

/* dns_free - destroy the channel, drop requests, close handles; see dns.h */
void
dns_free(struct dns *d)
{
	struct dns_lookup *lk;
	struct dns_req *r;
	size_t i;

	if (d == NULL)
		return;
	/* Sanity checks: teardown from a callback would free the caller. */
	if (d->delivering || d->closing)
		relay_panic("dns_free: %s", d->closing ? "called twice" :
		    "called from a dns callback");
	d->closing = true;
	/*
	 * Every query's callback runs now with ARES_EDESTRUCTION (they see
	 * d->closing and do nothing), and every socket gets sock_state
	 * (fd, 0, 0), which closes its poll handle.
	 */
	ares_destroy(d->ch);
	while (d->socks != NULL)
		dns_sock_close(d, d->socks);
	for (i = 0; i < DNS_INFLIGHT; i++)
		while ((lk = d->inflight[i]) != NULL) {
			d->inflight[i] = lk->hnext;
			while ((r = lk->waiters.head) != NULL) {
				dns_list_del(r);
				free(r);
			}
			dns_lookup_free(lk);
		}
	while ((r = d->ready.head) != NULL) {
		dns_list_del(r);
		dns_answer_unref(r->ans);
		free(r);
	}
	while (d->lru_old != NULL)
		dns_cache_del(d, d->lru_old);
	free(d->cache);
	d->pending_closes += 2;
	uv_close((uv_handle_t *)&d->timer, dns_on_handle_closed);
	uv_close((uv_handle_t *)&d->idle, dns_on_handle_closed);
}

/* dns_mx_lookup - from a literal, the cache, a lookup in flight or a new one */
struct dns_req *
dns_mx_lookup(struct dns *d, const char *domain, dns_mx_cb cb, void *arg)
{
	char key[DNS_NAME_MAX + 2], shown[128];
	struct dns_lookup *lk, **b;
	struct dns_entry *e;
	struct dns_req *r;
	uint32_t hash;

	if (d->closing)
		relay_panic("dns_mx_lookup after dns_free");
	r = xcalloc(1, sizeof *r);
	r->id = ++d->next_id;
	r->cb = cb;
	r->arg = arg;
	if (domain[0] == '[') {
		dns_req_ready(d, r, dns_answer_literal(d, domain));
		return r;
	}
	if (!dns_name_norm(domain, key, sizeof key)) {
		log_value(shown, sizeof shown, domain);
		log_trace(TRACE_DNS, "%08x dns bad-name domain=%s", r->id,
		    shown);
		dns_req_ready(d, r, dns_answer_fail(domain, DNS_EBADNAME,
		    "%s is not a valid domain name", shown));
		return r;
	}
	hash = dns_hash(key);
	if ((e = dns_cache_get(d, key, hash)) != NULL) {
		log_trace(TRACE_DNS, "%08x dns cache-hit domain=%s", r->id,
		    key);
		e->ans->refs++;
		r->cached = true;
		dns_req_ready(d, r, e->ans);
		return r;
	}
	b = &d->inflight[hash % DNS_INFLIGHT];
	for (lk = *b; lk != NULL; lk = lk->hnext)
		if (lk->hash == hash && strcmp(lk->key, key) == 0) {
			log_trace(TRACE_DNS, "%08x dns coalesce domain=%s "
			    "with=%08x", r->id, key, lk->id);
			dns_list_add(&lk->waiters, r);
			return r;
		}
	lk = xcalloc(1, sizeof *lk);
	lk->dns = d;
	lk->key = xstrdup(key);
	lk->hash = hash;
	lk->id = r->id;
	lk->hnext = *b;
	*b = lk;
	/* Waiter first: c-ares may complete the query inside ares_query(). */
	dns_list_add(&lk->waiters, r);
	log_trace(TRACE_DNS, "%08x dns query domain=%s type=MX", lk->id, key);
	ares_query(d->ch, key, C_IN, T_MX, dns_on_mx_answer, lk);
	dns_rearm(d);
	return r;
}

/* dns_req_cancel - detach and free; the lookup itself runs on */
void
dns_req_cancel(struct dns_req *r)
{
	if (r == NULL)
		return;
	log_trace(TRACE_DNS, "%08x dns cancel", r->id);
	dns_list_del(r);
	dns_answer_unref(r->ans);
	free(r);
}

/* dns_strerror - a short phrase per status */
const char *
dns_strerror(int status)
{
	switch (status) {
	case 0:
		return "ok";
	case DNS_ENXDOMAIN:
		return "domain does not exist";
	case DNS_ENULLMX:
		return "domain accepts no mail (null MX)";
	case DNS_ENOHOST:
		return "no MX host has an address";
	case DNS_ETEMP:
		return "temporary DNS failure";
	case DNS_EBADNAME:
		return "invalid domain name";
	}
	return relay_strerror(status);
}

/* dns_status_permanent - true for answers that a retry will not change */
bool
dns_status_permanent(int status)
{
	return status == DNS_ENXDOMAIN || status == DNS_ENULLMX ||
	    status == DNS_ENOHOST || status == DNS_EBADNAME;
}

/* dns_cache_count - entries in the cache, expired ones included */
size_t
dns_cache_count(const struct dns *d)
{
	return d->ncache;
}

/* dns_cache_get - a live entry for key, made most recent; drops stale ones */
static struct dns_entry *
dns_cache_get(struct dns *d, const char *key, uint32_t hash)
{
	struct dns_entry *e = d->cache[hash & (d->ncache_buckets - 1)];

	while (e != NULL && (e->hash != hash ||
	    strcmp(e->ans->res.domain, key) != 0))
		e = e->hnext;
	if (e != NULL && e->ans->res.expires_ms <= uv_now(d->loop)) {
		dns_cache_del(d, e);
		e = NULL;
	}
	if (e != NULL) {
		dns_lru_unlink(d, e);
		dns_lru_push(d, e);
	}
	return e;
}

/* dns_cache_put - insert a (keyed by its domain), evicting LRU when full */
static void
dns_cache_put(struct dns *d, uint32_t hash, struct dns_answer *a)
{
	struct dns_entry *e, **b = &d->cache[hash & (d->ncache_buckets - 1)];

	if (d->cache_size == 0)
		return;
	/* No old entry for the key: a lookup starts only on a miss. */
	while (d->ncache >= d->cache_size)
		dns_cache_del(d, d->lru_old);
	e = xcalloc(1, sizeof *e);
	e->hash = hash;
	e->ans = a;
	a->refs++;
	e->hnext = *b;
	*b = e;
	dns_lru_push(d, e);
	d->ncache++;
}

/* dns_cache_del - unlink from the bucket and the LRU list, free */
static void
dns_cache_del(struct dns *d, struct dns_entry *e)
{
	struct dns_entry **pp = &d->cache[e->hash & (d->ncache_buckets - 1)];

	while (*pp != e)
		pp = &(*pp)->hnext;
	*pp = e->hnext;
	dns_lru_unlink(d, e);
	d->ncache--;
	dns_answer_unref(e->ans);
	free(e);
}

/* dns_lru_unlink - take e out of the LRU list */
static void
dns_lru_unlink(struct dns *d, struct dns_entry *e)
{
	*(e->newer != NULL ? &e->newer->older : &d->lru_new) = e->older;
	*(e->older != NULL ? &e->older->newer : &d->lru_old) = e->newer;
}

/* dns_lru_push - put e at the most recently used end */
static void
dns_lru_push(struct dns *d, struct dns_entry *e)
{
	e->newer = NULL;
	e->older = d->lru_new;
	*(d->lru_new != NULL ? &d->lru_new->newer : &d->lru_old) = e;
	d->lru_new = e;
}

/* dns_on_mx_answer - c-ares's MX callback: classify, then resolve hosts */
static void
dns_on_mx_answer(void *arg, int status, int timeouts, unsigned char *abuf,
    int alen)
{
	struct dns_lookup *lk = arg;
	struct dns *d = lk->dns;
	struct ares_mx_reply *mx = NULL;
	int rc = ARES_SUCCESS, ttl = -1;

	/* ARES_EDESTRUCTION: dns_free() frees lk after ares_destroy(). */
	if (d->closing)
		return;
	log_trace(TRACE_DNS, "%08x dns answer domain=%s type=MX status=\"%s\" "
	    "timeouts=%d", lk->id, lk->key, ares_strerror(status), timeouts);
	if (status == ARES_SUCCESS)
		rc = ares_parse_mx_reply(abuf, alen, &mx);
	if (status == ARES_ENOTFOUND)
		dns_lookup_finish(lk, dns_answer_fail(lk->key, DNS_ENXDOMAIN,
		    "domain %s does not exist (NXDOMAIN)", lk->key),
		    d->negative_ttl_s);
	else if (status == ARES_ENODATA || (status == ARES_SUCCESS &&
	    (rc == ARES_ENODATA || (rc == ARES_SUCCESS && mx == NULL))))
		/* No MX (perhaps a CNAME to none): RFC 5321 5.1 implicit MX. */
		dns_lookup_implicit(lk);
	else if (status != ARES_SUCCESS)
		dns_lookup_finish(lk, dns_answer_fail(lk->key, DNS_ETEMP,
		    "MX lookup for %s failed: %s", lk->key,
		    ares_strerror(status)), 0);
	else if (rc != ARES_SUCCESS || (ttl = dns_answer_ttl(abuf, alen)) < 0) {
		log_warnx("%08x dns bad-answer domain=%s type=MX error=\"%s\"",
		    lk->id, lk->key, rc != ARES_SUCCESS ? ares_strerror(rc) :
		    "bad resource record");
		dns_lookup_finish(lk, dns_answer_fail(lk->key, DNS_ETEMP,
		    "malformed MX answer for %s: %s", lk->key,
		    rc != ARES_SUCCESS ? ares_strerror(rc) :
		    "bad resource record"), 0);
	} else
		dns_lookup_mx(lk, mx, ttl);
	if (mx != NULL)
		ares_free_data(mx);
}

/*
 * dns_answer_ttl - smallest TTL in the answer section (MX and any CNAME
 * on the way), or -1 if the message does not parse. c-ares 1.18's
 * ares_parse_mx_reply() drops TTLs, so walk the records ourselves.
 */
static int
dns_answer_ttl(const unsigned char *abuf, int alen)
{
	int qd, an, i, off = HFIXEDSZ, min = INT_MAX;
	unsigned long ttl;
	char *name;
	long enclen;

	if (alen < HFIXEDSZ)
		return -1;
	qd = abuf[4] << 8 | abuf[5];
	an = abuf[6] << 8 | abuf[7];
	for (i = 0; i < qd + an; i++) {
		if (ares_expand_name(abuf + off, abuf, alen, &name, &enclen) !=
		    ARES_SUCCESS)
			return -1;
		ares_free_string(name);
		off += (int)enclen + (i < qd ? QFIXEDSZ : RRFIXEDSZ);
		if (off > alen)
			return -1;
		if (i < qd)
			continue;
		ttl = (unsigned long)abuf[off - 6] << 24 |
		    (unsigned long)abuf[off - 5] << 16 |
		    (unsigned long)abuf[off - 4] << 8 | abuf[off - 3];
		/* RFC 2181 8: a TTL with the top bit set means zero. */
		if (ttl > INT_MAX)
			ttl = 0;
		if ((int)ttl < min)
			min = (int)ttl;
		off += abuf[off - 2] << 8 | abuf[off - 1];
		if (off > alen)
			return -1;
	}
	return min;
}

/* dns_hostq_cmp - qsort order: preference, then name (for dedup) */
static int
dns_hostq_cmp(const void *a, const void *b)
{
	const struct dns_hostq *x = a, *y = b;

	if (x->pref != y->pref)
		return x->pref < y->pref ? -1 : 1;
	return strcmp(x->name, y->name);
}

/* dns_lookup_mx - the MX set: null MX, checks, order, limits; then resolve */
static void
dns_lookup_mx(struct dns_lookup *lk, struct ares_mx_reply *mx, int ttl)
{
	struct dns *d = lk->dns;
	char name[DNS_NAME_MAX + 2], shown[128];
	struct sockaddr_storage ss;
	struct ares_mx_reply *m;
	size_t n = 0, i, j, keep = 0;

	for (m = mx; m != NULL; m = m->next)
		n++;
	/* RFC 7505: one record, exchange "." (c-ares renders it as ""). */
	if (n == 1 && mx->host[0] == '\0') {
		dns_lookup_finish(lk, dns_answer_fail(lk->key, DNS_ENULLMX,
		    "%s publishes a null MX (RFC 7505): it accepts no mail",
		    lk->key), d->negative_ttl_s);
		return;
	}
	lk->mx_ttl = ttl;
	lk->hq = xcalloc(n, sizeof *lk->hq);
	for (m = mx; m != NULL; m = m->next) {
		/* An MX naming an address is wrong but works; keep it. */
		if (dns_addr_parse(m->host, &ss) != 0)
			str_copy(name, m->host, sizeof name);
		else if (!dns_name_norm(m->host, name, sizeof name)) {
			/* Includes "." beside other MX, against 7505 3. */
			log_warnx("%08x dns bad-mx-host domain=%s host=%s",
			    lk->id, lk->key, log_value(shown, sizeof shown,
			    m->host));
			continue;
		}
		lk->hq[lk->nhq].lk = lk;
		lk->hq[lk->nhq].name = xstrdup(name);
		lk->hq[lk->nhq++].pref = m->priority;
	}
	qsort(lk->hq, lk->nhq, sizeof *lk->hq, dns_hostq_cmp);
	/* One entry per name, at its best preference; at most the limit. */
	for (i = 0; i < lk->nhq; i++) {
		for (j = 0; j < keep; j++)
			if (strcmp(lk->hq[j].name, lk->hq[i].name) == 0)
				break;
		if (j == keep && keep < DNS_MAX_HOSTS)
			lk->hq[keep++] = lk->hq[i];
		else {
			if (j == keep)
				log_warnx("%08x dns mx-limit domain=%s "
				    "dropped=%s", lk->id, lk->key,
				    lk->hq[i].name);
			free(lk->hq[i].name);
		}
	}
	lk->nhq = keep;
	dns_lookup_resolve(lk);
}

/* dns_lookup_implicit - no MX: the domain is its own exchange, pref 0 */
static void
dns_lookup_implicit(struct dns_lookup *lk)
{
	lk->implicit = true;
	lk->mx_ttl = INT_MAX;	/* NODATA has no MX TTL; max_mx_ttl caps */
	lk->hq = xcalloc(1, sizeof *lk->hq);
	lk->hq[0].lk = lk;
	lk->hq[0].name = xstrdup(lk->key);
	lk->nhq = 1;
	dns_lookup_resolve(lk);
}

/* dns_lookup_resolve - start every address lookup; literals inline */
static void
dns_lookup_resolve(struct dns_lookup *lk)
{
	struct dns *d = lk->dns;
	struct ares_addrinfo_hints hints;
	struct sockaddr_storage ss;
	size_t i;
	int fam;

	memset(&hints, 0, sizeof hints);
	hints.ai_family = d->ipv6 ? AF_UNSPEC : AF_INET;
	hints.ai_socktype = SOCK_STREAM;
	/* No RFC 6724 sort: it connect()s probe sockets; delivery orders. */
	hints.ai_flags = ARES_AI_NOSORT;
	/* +1 holds lk while callbacks may run inside ares_getaddrinfo(). */
	lk->pending = (int)lk->nhq + 1;
	for (i = 0; i < lk->nhq; i++) {
		struct dns_hostq *hq = &lk->hq[i];

		if ((fam = dns_addr_parse(hq->name, &ss)) != 0) {
			hq->ttl = INT_MAX;
			hq->status = ARES_ENODATA;
			if (fam == AF_INET || d->ipv6) {
				hq->addrs = xmalloc(sizeof ss);
				*hq->addrs = ss;
				hq->naddrs = 1;
				hq->status = ARES_SUCCESS;
			}
			lk->pending--;
			continue;
		}
		log_trace(TRACE_DNS, "%08x dns query domain=%s host=%s type=%s",
		    lk->id, lk->key, hq->name, d->ipv6 ? "A+AAAA" : "A");
		ares_getaddrinfo(d->ch, hq->name, NULL, &hints,
		    dns_on_addrinfo, hq);
	}
	dns_lookup_settle(lk);
}

/* dns_on_addrinfo - one MX host's addresses (or why there are none) */
static void
dns_on_addrinfo(void *arg, int status, int timeouts, struct ares_addrinfo *ai)
{
	struct dns_hostq *hq = arg;
	struct dns_lookup *lk = hq->lk;
	struct dns *d = lk->dns;
	struct ares_addrinfo_node *n;

	if (d->closing) {
		if (ai != NULL)
			ares_freeaddrinfo(ai);
		return;
	}
	hq->status = status;
	hq->ttl = INT_MAX;
	if (status == ARES_SUCCESS && ai != NULL) {
		hq->addrs = xcalloc(DNS_MAX_ADDRS, sizeof *hq->addrs);
		for (n = ai->nodes; n != NULL && hq->naddrs < DNS_MAX_ADDRS;
		    n = n->ai_next) {
			if ((n->ai_family != AF_INET && (n->ai_family !=
			    AF_INET6 || !d->ipv6)) ||
			    n->ai_addrlen > sizeof *hq->addrs)
				continue;
			memcpy(&hq->addrs[hq->naddrs], n->ai_addr,
			    n->ai_addrlen);
			/* Same offset in sockaddr_in and sockaddr_in6. */
			((struct sockaddr_in *)&hq->addrs[hq->naddrs++])->
			    sin_port = 0;
			if (n->ai_ttl < hq->ttl)
				hq->ttl = n->ai_ttl < 0 ? 0 : n->ai_ttl;
		}
		if (hq->naddrs == 0)
			hq->status = ARES_ENODATA;
	}
	if (ai != NULL)
		ares_freeaddrinfo(ai);
	log_trace(TRACE_DNS, "%08x dns answer domain=%s host=%s status=\"%s\" "
	    "addrs=%zu ttl=%d timeouts=%d", lk->id, lk->key, hq->name,
	    ares_strerror(hq->status), hq->naddrs, hq->ttl, timeouts);
	dns_lookup_settle(lk);
}

/* dns_lookup_settle - one address lookup done; the last builds the answer */
static void
dns_lookup_settle(struct dns_lookup *lk)
{
	struct dns *d = lk->dns;
	const struct dns_hostq *temp = NULL;
	size_t i, nok = 0;
	int ttl = lk->mx_ttl;

	if (--lk->pending > 0)
		return;
	for (i = 0; i < lk->nhq; i++) {
		const struct dns_hostq *hq = &lk->hq[i];

		if (hq->naddrs > 0) {
			nok++;
			ttl = hq->ttl < ttl ? hq->ttl : ttl;
			continue;
		}
		/* NXDOMAIN and NODATA are answers; anything else is not. */
		if (hq->status != ARES_ENOTFOUND &&
		    hq->status != ARES_ENODATA && temp == NULL)
			temp = hq;
		if (!lk->implicit)
			log_warnx("%08x dns mx-host-unusable domain=%s host=%s "
			    "error=\"%s\"", lk->id, lk->key, hq->name,
			    ares_strerror(hq->status));
	}
	ttl = ttl < d->max_mx_ttl_s ? ttl : d->max_mx_ttl_s;
	if (nok > 0 && temp != NULL && ttl > DNS_PARTIAL_TTL_S)
		ttl = DNS_PARTIAL_TTL_S;
	if (nok > 0)
		dns_lookup_finish(lk, dns_answer_new(lk->key, 0, NULL, lk->hq,
		    lk->nhq), ttl);
	else if (temp != NULL)
		dns_lookup_finish(lk, dns_answer_fail(lk->key, DNS_ETEMP,
		    "address lookup for %s (MX of %s) failed: %s", temp->name,
		    lk->key, ares_strerror(temp->status)), 0);
	else
		dns_lookup_finish(lk, dns_answer_fail(lk->key, DNS_ENOHOST,
		    lk->implicit ? "%s has neither MX nor address records" :
		    "no MX host of %s has an address", lk->key),
		    d->negative_ttl_s);
}

/*
 * dns_lookup_finish - stamp and cache the answer (ttl_s 0: not cached),
 * hand it to every waiter and free the lookup. Takes a's reference.
 */
static void
dns_lookup_finish(struct dns_lookup *lk, struct dns_answer *a, int ttl_s)
{
	struct dns *d = lk->dns;
	struct dns_lookup **pp = &d->inflight[lk->hash % DNS_INFLIGHT];
	struct dns_req *r;

	a->res.implicit = lk->implicit;
	a->res.expires_ms = uv_now(d->loop) + (uint64_t)ttl_s * 1000;
	log_trace(TRACE_DNS, "%08x dns done domain=%s status=\"%s\" hosts=%zu "
	    "implicit=%d ttl=%d waiters=%zu", lk->id, lk->key,
	    dns_strerror(a->res.status), a->res.nhosts, lk->implicit, ttl_s,
	    lk->waiters.n);
	if (ttl_s > 0)
		dns_cache_put(d, lk->hash, a);
	while ((r = lk->waiters.head) != NULL) {
		dns_list_del(r);
		a->refs++;
		dns_req_ready(d, r, a);
	}
	dns_answer_unref(a);
	while (*pp != lk)
		pp = &(*pp)->hnext;
	*pp = lk->hnext;
	dns_lookup_free(lk);
}

/* dns_lookup_free - release a lookup that is out of d->inflight */
static void
dns_lookup_free(struct dns_lookup *lk)
{
	size_t i;

	for (i = 0; i < lk->nhq; i++) {
		free(lk->hq[i].name);
		free(lk->hq[i].addrs);
	}
	free(lk->hq);
	free(lk->key);
	free(lk);
}

/* dns_on_idle - deliver what was ready when this round began */
static void
dns_on_idle(uv_idle_t *h)
{
	struct dns *d = h->data;
	struct dns_mx_host hosts[DNS_MAX_HOSTS], t;
	struct dns_mx_result res;
	struct dns_answer *a;
	struct dns_req *r;
	size_t n = d->ready.n, i, j, k, m;
	dns_mx_cb cb;
	void *arg;

	/* Only this round's: a callback's own cache hits wait a turn. */
	d->delivering = true;
	while (n-- > 0 && (r = d->ready.head) != NULL) {
		dns_list_del(r);
		a = r->ans;
		res = a->res;
		res.cached = r->cached;
		memcpy(hosts, res.hosts, res.nhosts * sizeof *hosts);
		res.hosts = hosts;
		/* RFC 5321 5.1: randomize among equal preferences. */
		for (i = 0; i < res.nhosts; i = j) {
			for (j = i + 1; j < res.nhosts &&
			    hosts[j].pref == hosts[i].pref; j++)
				;
			for (k = j - 1; k > i; k--) {
				m = i + (size_t)(dns_rand(d) % (k - i + 1));
				t = hosts[k];
				hosts[k] = hosts[m];
				hosts[m] = t;
			}
		}
		cb = r->cb;
		arg = r->arg;
		free(r);
		cb(arg, &res);
		dns_answer_unref(a);
	}
	d->delivering = false;
	if (d->ready.head == NULL)
		uv_idle_stop(h);
}

/* dns_sock_close - stop watching; c-ares closes the fd after we return */
static void
dns_sock_close(struct dns *d, struct dns_sock *s)
{
	struct dns_sock **pp = &d->socks;

	while (*pp != s)
		pp = &(*pp)->next;
	*pp = s->next;
	/* Synchronous: epoll forgets the fd before c-ares closes it. */
	uv_poll_stop(&s->poll);
	d->pending_closes++;
	uv_close((uv_handle_t *)&s->poll, dns_on_sock_closed);
}

/* dns_rearm - one-shot timer at c-ares's next deadline, or none */
static void
dns_rearm(struct dns *d)
{
	struct timeval tv, *tvp;

	if ((tvp = ares_timeout(d->ch, NULL, &tv)) == NULL) {
		uv_timer_stop(&d->timer);
		return;
	}
	/* Round up: waking early would only re-arm for the remainder. */
	uv_timer_start(&d->timer, dns_on_timer, (uint64_t)tvp->tv_sec * 1000 +
	    ((uint64_t)tvp->tv_usec + 999) / 1000, 0);
}

/* dns_on_sock_state - c-ares opened, re-flagged or is closing a socket */
static void
dns_on_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
	struct dns *d = data;
	struct dns_sock *s;
	int rc;

	for (s = d->socks; s != NULL && s->fd != fd; s = s->next)
		;
	if (!readable && !writable) {
		if (s != NULL)
			dns_sock_close(d, s);
		return;
	}
	if (s == NULL) {
		s = xcalloc(1, sizeof *s);
		s->dns = d;
		s->fd = fd;
		if ((rc = uv_poll_init_socket(d->loop, &s->poll, fd)) < 0) {
			/* Its queries will time out through the timer. */
			log_warnx("dns poll-init-failed fd=%d error=%s",
			    (int)fd, uv_strerror(rc));
			free(s);
			return;
		}
		s->poll.data = s;
		s->next = d->socks;
		d->socks = s;
	}
	if ((rc = uv_poll_start(&s->poll, (readable ? UV_READABLE : 0) |
	    (writable ? UV_WRITABLE : 0), dns_on_poll)) < 0)
		log_warnx("dns poll-start-failed fd=%d error=%s", (int)fd,
		    uv_strerror(rc));
}

/* dns_on_poll - a socket is ready (or broken): let c-ares handle it */
static void
dns_on_poll(uv_poll_t *h, int status, int events)
{
	struct dns_sock *s = h->data;
	struct dns *d = s->dns;
	ares_socket_t fd = s->fd;	/* s may be closed inside c-ares */

	/* On error, wake both sides so that c-ares sees it. */
	ares_process_fd(d->ch,
	    status < 0 || (events & UV_READABLE) ? fd : ARES_SOCKET_BAD,
	    status < 0 || (events & UV_WRITABLE) ? fd : ARES_SOCKET_BAD);
	dns_rearm(d);
}

/* dns_on_timer - c-ares's deadline: retransmit or time queries out */
static void
dns_on_timer(uv_timer_t *t)
{
	struct dns *d = t->data;

	ares_process_fd(d->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
	dns_rearm(d);
}

/* dns_on_sock_closed - a poll handle is closed; free its dns_sock */
static void
dns_on_sock_closed(uv_handle_t *h)
{
	struct dns_sock *s = h->data;
	struct dns *d = s->dns;

	free(s);
	dns_closed(d);
}

/* dns_on_handle_closed - the timer or the idle handle is closed */
static void
dns_on_handle_closed(uv_handle_t *h)
{
	dns_closed(h->data);
}

/* dns_closed - count a close down; the last one after dns_free frees d */
static void
dns_closed(struct dns *d)
{
	if (--d->pending_closes == 0 && d->closing)
		free(d);
}
