/*
 * test_dns.c - unit tests for dns/dns.c against a real dnsmasq on
 * 127.0.0.1 (a free port, records given on its command line) and, for
 * answers dnsmasq will not give (SERVFAIL, malformed, truncated), a fake
 * server on the test's own loop. The system resolver is never used:
 * every resolver is created with explicit servers.
 *
 * Covered: MX order, equal-preference shuffle, implicit MX, null MX,
 * NXDOMAIN, MX hosts without address, address literals, the cache
 * (positive, negative, TTL, LRU bound, temporary failures not cached),
 * coalescing, cancellation, never calling back inline, dns_free with
 * requests pending, and a clean uv_loop_close() after every test.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "config/log.h"
#include "config/util.h"
#include "dns/dns.h"
#include "tests/unit/test.h"

#define DNSMASQ		"/usr/sbin/dnsmasq"
#define MAXH		8	/* hosts a struct got records */

/* Records every test's dnsmasq serves (all under .test, see --local). */
static const char *const zone[] = {
	"--mx-host=two.test,mx1.two.test,10",
	"--mx-host=two.test,mx2.two.test,20",
	"--host-record=mx1.two.test,127.0.0.11",
	"--host-record=mx2.two.test,127.0.0.12,::12",
	"--mx-host=eq.test,a.eq.test,10",
	"--mx-host=eq.test,b.eq.test,10",
	"--mx-host=eq.test,c.eq.test,10",
	"--mx-host=eq.test,d.eq.test,30",
	"--host-record=a.eq.test,127.0.0.21",
	"--host-record=b.eq.test,127.0.0.22",
	"--host-record=c.eq.test,127.0.0.23",
	"--host-record=d.eq.test,127.0.0.24",
	"--host-record=nomx.test,127.0.0.9",
	"--txt-record=txtonly.test,\"no mail here\"",
	"--host-record=v6only.test,::61",
	"--mx-host=nullmx.test,.,0",
	"--dns-rr=nullmx2.test,15,000a00",	/* "10 ." as raw rdata */
	"--mx-host=partial.test,gone.partial.test,5",
	"--mx-host=partial.test,good.partial.test,10",
	"--host-record=good.partial.test,127.0.0.31",
	"--mx-host=dead.test,gone1.dead.test,10",
	"--mx-host=dead.test,gone2.dead.test,20",
	"--mx-host=lit.test,127.0.0.41,10",
	"--mx-host=self.test,self.test,10",
	"--host-record=self.test,127.0.0.51",
	NULL,
};

/* What one callback saw, copied out of the result. */
struct got {
	int calls;			/* times the callback ran */
	int status;			/* res->status */
	bool implicit, literal, cached;	/* res flags */
	char why[256];			/* res->why or "" */
	char domain[256];		/* res->domain */
	size_t nhosts;			/* res->nhosts */
	char name[MAXH][64];		/* hosts[i].name */
	int pref[MAXH];			/* hosts[i].pref */
	size_t naddrs[MAXH];		/* hosts[i].naddrs */
	char addr[MAXH][2][64];		/* first two addresses as text */
	uint64_t ttl_ms;		/* expires_ms - uv_now() */
	bool *inline_flag;		/* set while the asking call runs */
	bool was_inline;		/* the callback saw *inline_flag */
};

/* One test's world. */
struct fx {
	uv_loop_t loop;			/* private loop, closed at the end */
	pid_t dnsmasq;			/* running dnsmasq or 0 */
	int port;			/* its UDP/TCP port */
	int local_ttl;			/* TTL dnsmasq gives its records */
	struct dns *dns;		/* resolver under test or NULL */
	struct dns_options opt;		/* what dns_new() got */
	char server[32];		/* "127.0.0.1:port" */
	const char *servers[1];		/* opt.servers */
	uv_udp_t fake;			/* fake server, when fake_on */
	bool fake_on;			/* fake is open */
	int fake_queries;		/* queries the fake server saw */
	bool timed_out;			/* the guard timer fired */
};

static struct fx *g_fx;	/* for uv callbacks without a data pointer */
static bool g_asking;	/* inside lookup()'s call to dns_mx_lookup() */

static int free_port(void);
static void fx_init(struct fx *);
static void fx_dnsmasq(struct fx *, const char *const *);
static void fx_dnsmasq_stop(struct fx *);
static void fx_dns(struct fx *);
static void fx_done(struct fx *);
static void on_guard(uv_timer_t *);
static void on_guard_closed(uv_handle_t *);
static void on_fake_closed(uv_handle_t *);
static void run_until(struct fx *, const int *, int, int);
static void run_ms(struct fx *, int);
static void on_mx(void *, const struct dns_mx_result *);
static void on_chain_first(void *, const struct dns_mx_result *);
static void lookup(struct fx *, const char *, struct got *);
static void lookup_wait(struct fx *, const char *, struct got *);
static bool has_host(const struct got *, const char *);
static void fake_start(struct fx *);
static void on_fake_alloc(uv_handle_t *, size_t, uv_buf_t *);
static void on_fake_recv(uv_udp_t *, ssize_t, const uv_buf_t *,
    const struct sockaddr *, unsigned);

/* free_port - a port free for both UDP and TCP on 127.0.0.1 right now */
static int
free_port(void)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof sin;
	int u, t, port;

	for (;;) {
		memset(&sin, 0, sizeof sin);
		sin.sin_family = AF_INET;
		sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		ASSERT((u = socket(AF_INET, SOCK_DGRAM, 0)) >= 0);
		ASSERT(bind(u, (struct sockaddr *)&sin, sizeof sin) == 0);
		ASSERT(getsockname(u, (struct sockaddr *)&sin, &len) == 0);
		port = ntohs(sin.sin_port);
		ASSERT((t = socket(AF_INET, SOCK_STREAM, 0)) >= 0);
		if (bind(t, (struct sockaddr *)&sin, sizeof sin) == 0) {
			close(t);
			close(u);
			return port;
		}
		close(t);
		close(u);
	}
}

/* fx_init - fresh loop; dns options aimed at a port nobody listens on */
static void
fx_init(struct fx *fx)
{
	memset(fx, 0, sizeof *fx);
	g_fx = fx;
	log_init("test_dns", false, getenv("TEST_DNS_TRACE") ? TRACE_DNS : 0);
	ASSERT_EQ(uv_loop_init(&fx->loop), 0);
	fx->port = free_port();
	/* dnsmasq's default of 0 would defeat the cache. */
	fx->local_ttl = 60;
	snprintf(fx->server, sizeof fx->server, "127.0.0.1:%d", fx->port);
	fx->servers[0] = fx->server;
	fx->opt.servers = fx->servers;
	fx->opt.nservers = 1;
	fx->opt.timeout_ms = 500;
	fx->opt.tries = 1;
	fx->opt.ipv6 = false;
	fx->opt.max_mx_ttl_s = 3600;
	fx->opt.negative_ttl_s = 300;
	fx->opt.cache_size = 100;
}

/*
 * fx_dnsmasq - start dnsmasq on fx->port with the zone plus extra options
 * and wait until it accepts TCP connections (it listens on both).
 */
static void
fx_dnsmasq(struct fx *fx, const char *const *extra)
{
	const char *argv[64];
	char port[32], ttl[32];
	struct sockaddr_in sin;
	size_t n = 0, i;
	int s, tries, st;

	snprintf(port, sizeof port, "--port=%d", fx->port);
	snprintf(ttl, sizeof ttl, "--local-ttl=%d", fx->local_ttl);
	argv[n++] = DNSMASQ;
	argv[n++] = "--no-resolv";
	argv[n++] = "--no-hosts";
	argv[n++] = "--no-daemon";
	argv[n++] = "--conf-file=/dev/null";
	argv[n++] = "--pid-file=";
	argv[n++] = "--listen-address=127.0.0.1";
	argv[n++] = "--bind-interfaces";
	argv[n++] = "--local=/test/";	/* unknown names: NXDOMAIN */
	argv[n++] = ttl;
	argv[n++] = port;
	for (i = 0; zone[i] != NULL; i++)
		argv[n++] = zone[i];
	for (i = 0; extra != NULL && extra[i] != NULL; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	ASSERT(n < ARRAY_SIZE(argv));

	fflush(NULL);
	ASSERT((fx->dnsmasq = fork()) >= 0);
	if (fx->dnsmasq == 0) {
		int null = open("/dev/null", O_RDWR);

		/* Never outlive the test, even when it aborts. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (!getenv("TEST_DNS_TRACE")) {
			dup2(null, 1);
			dup2(null, 2);
		}
		execv(DNSMASQ, (char *const *)(void *)argv);
		_exit(127);
	}
	memset(&sin, 0, sizeof sin);
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons((uint16_t)fx->port);
	for (tries = 0; tries < 300; tries++) {
		ASSERT((s = socket(AF_INET, SOCK_STREAM, 0)) >= 0);
		if (connect(s, (struct sockaddr *)&sin, sizeof sin) == 0) {
			close(s);
			return;
		}
		close(s);
		ASSERT_EQ(waitpid(fx->dnsmasq, &st, WNOHANG), 0);
		usleep(10 * 1000);
	}
	ASSERT(!"dnsmasq did not start");
}

/* fx_dnsmasq_stop - SIGTERM and reap; the port is free afterwards */
static void
fx_dnsmasq_stop(struct fx *fx)
{
	int st;

	if (fx->dnsmasq <= 0)
		return;
	ASSERT_EQ(kill(fx->dnsmasq, SIGTERM), 0);
	ASSERT_EQ(waitpid(fx->dnsmasq, &st, 0), fx->dnsmasq);
	fx->dnsmasq = 0;
}

/* fx_dns - create the resolver from fx->opt */
static void
fx_dns(struct fx *fx)
{
	char err[256];

	ASSERT_EQ(dns_new(&fx->loop, &fx->opt, &fx->dns, err, sizeof err), 0);
	ASSERT(fx->dns != NULL);
}

/* on_fake_closed - nothing to free: the handle is inside the fixture */
static void
on_fake_closed(uv_handle_t *h)
{
}

/* fx_done - free everything, stop dnsmasq, the loop must close cleanly */
static void
fx_done(struct fx *fx)
{
	dns_free(fx->dns);
	fx->dns = NULL;
	if (fx->fake_on)
		uv_close((uv_handle_t *)&fx->fake, on_fake_closed);
	fx_dnsmasq_stop(fx);
	ASSERT_EQ(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(uv_loop_close(&fx->loop), 0);
}

/* on_guard - the wait's deadline */
static void
on_guard(uv_timer_t *t)
{
	g_fx->timed_out = true;
	uv_stop(t->loop);
}

/* on_guard_closed - the guard timer lives on the caller's stack */
static void
on_guard_closed(uv_handle_t *h)
{
}

/* run_until - run the loop until *counter >= want; abort after ms */
static void
run_until(struct fx *fx, const int *counter, int want, int ms)
{
	uv_timer_t guard;

	fx->timed_out = false;
	ASSERT_EQ(uv_timer_init(&fx->loop, &guard), 0);
	ASSERT_EQ(uv_timer_start(&guard, on_guard, (uint64_t)ms, 0), 0);
	while (*counter < want && !fx->timed_out)
		uv_run(&fx->loop, UV_RUN_ONCE);
	uv_close((uv_handle_t *)&guard, on_guard_closed);
	uv_run(&fx->loop, UV_RUN_NOWAIT);
	ASSERT(*counter >= want);
}

/* run_ms - just run the loop for ms */
static void
run_ms(struct fx *fx, int ms)
{
	uv_timer_t guard;

	fx->timed_out = false;
	ASSERT_EQ(uv_timer_init(&fx->loop, &guard), 0);
	ASSERT_EQ(uv_timer_start(&guard, on_guard, (uint64_t)ms, 0), 0);
	while (!fx->timed_out)
		uv_run(&fx->loop, UV_RUN_ONCE);
	uv_close((uv_handle_t *)&guard, on_guard_closed);
	uv_run(&fx->loop, UV_RUN_NOWAIT);
}

/* on_mx - copy the result into the struct got passed as arg */
static void
on_mx(void *arg, const struct dns_mx_result *res)
{
	struct got *g = arg;
	size_t i, j;

	g->calls++;
	g->was_inline = g->inline_flag != NULL && *g->inline_flag;
	g->status = res->status;
	g->implicit = res->implicit;
	g->literal = res->literal;
	g->cached = res->cached;
	str_copy(g->why, res->why ? res->why : "", sizeof g->why);
	str_copy(g->domain, res->domain, sizeof g->domain);
	g->nhosts = res->nhosts;
	ASSERT(res->status == 0 ? res->nhosts > 0 && res->why == NULL :
	    res->nhosts == 0 && res->why != NULL);
	g->ttl_ms = res->expires_ms - uv_now(&g_fx->loop);
	for (i = 0; i < res->nhosts && i < MAXH; i++) {
		const struct dns_mx_host *h = &res->hosts[i];

		str_copy(g->name[i], h->name, sizeof g->name[i]);
		g->pref[i] = h->pref;
		g->naddrs[i] = h->naddrs;
		ASSERT(h->naddrs > 0);
		/* Preference order holds whatever the shuffle did. */
		ASSERT(i == 0 || res->hosts[i - 1].pref <= h->pref);
		for (j = 0; j < h->naddrs && j < 2; j++) {
			const struct sockaddr *sa = (const void *)&h->addrs[j];

			if (sa->sa_family == AF_INET)
				inet_ntop(AF_INET, &((const struct sockaddr_in *)
				    (const void *)sa)->sin_addr, g->addr[i][j],
				    sizeof g->addr[i][j]);
			else
				inet_ntop(AF_INET6, &((const struct
				    sockaddr_in6 *)(const void *)sa)->sin6_addr,
				    g->addr[i][j], sizeof g->addr[i][j]);
			ASSERT_EQ(((const struct sockaddr_in *)(const void *)
			    sa)->sin_port, 0);
		}
	}
}

/* lookup - start a lookup and check that it did not call back inline */
static void
lookup(struct fx *fx, const char *domain, struct got *g)
{
	int before = g->calls;

	g->inline_flag = &g_asking;
	g_asking = true;
	ASSERT(dns_mx_lookup(fx->dns, domain, on_mx, g) != NULL);
	ASSERT_EQ(g->calls, before);
	g_asking = false;
}

/* lookup_wait - lookup() and run the loop until its callback ran */
static void
lookup_wait(struct fx *fx, const char *domain, struct got *g)
{
	memset(g, 0, sizeof *g);
	lookup(fx, domain, g);
	run_until(fx, &g->calls, 1, 5000);
	ASSERT_EQ(g->calls, 1);
	ASSERT(!g->was_inline);
	g->inline_flag = NULL;
}

/* has_host - is name among the hosts? */
static bool
has_host(const struct got *g, const char *name)
{
	size_t i;

	for (i = 0; i < g->nhosts && i < MAXH; i++)
		if (strcmp(g->name[i], name) == 0)
			return true;
	return false;
}

/*
 * The fake server: answers by question name. "servfail." SERVFAIL,
 * "refused." REFUSED, "malformed." a NOERROR reply whose answer record
 * is cut short, "trunc." TC set (c-ares retries over TCP, where nobody
 * listens), "mx." one MX "10 127.0.0.1" with TTL 5, "nullmix." that
 * plus a "0 ." (a null MX that is not alone), anything else NXDOMAIN.
 * It counts queries.
 */
static void
fake_start(struct fx *fx)
{
	struct sockaddr_in sin;

	ASSERT_EQ(uv_ip4_addr("127.0.0.1", fx->port, &sin), 0);
	ASSERT_EQ(uv_udp_init(&fx->loop, &fx->fake), 0);
	ASSERT_EQ(uv_udp_bind(&fx->fake, (const struct sockaddr *)&sin, 0),
	    0);
	ASSERT_EQ(uv_udp_recv_start(&fx->fake, on_fake_alloc, on_fake_recv),
	    0);
	fx->fake_on = true;
}

/* on_fake_alloc - one static buffer: the fake server is synchronous */
static void
on_fake_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	static char mem[4096];

	buf->base = mem;
	buf->len = sizeof mem;
}

/* on_fake_recv - build the scripted reply from the query */
static void
on_fake_recv(uv_udp_t *u, ssize_t n, const uv_buf_t *buf,
    const struct sockaddr *from, unsigned flags)
{
	unsigned char out[600], *q = (unsigned char *)buf->base;
	char first[64];
	size_t qlen = 12, len;
	uv_buf_t reply;

	if (n <= 12 || from == NULL)
		return;
	g_fx->fake_queries++;
	/* Question: labels, root, type, class. */
	while (qlen < (size_t)n && q[qlen] != 0)
		qlen += (size_t)q[qlen] + 1;
	qlen += 5;
	ASSERT(qlen <= (size_t)n && qlen < sizeof out - 16);
	len = q[12] < sizeof first ? q[12] : sizeof first - 1;
	memcpy(first, q + 13, len);
	first[len] = '\0';
	memcpy(out, q, qlen);
	out[2] = 0x81;			/* QR, RD */
	out[3] = 0x80;			/* RA, rcode 0 */
	memset(out + 6, 0, 6);		/* no answer/authority/additional */
	len = qlen;
	if (strcmp(first, "servfail") == 0)
		out[3] |= 2;
	else if (strcmp(first, "refused") == 0)
		out[3] |= 5;
	else if (strcmp(first, "trunc") == 0)
		out[2] |= 0x02;
	else if (strcmp(first, "malformed") == 0) {
		/* One MX record whose rdata stops after the preference. */
		static const unsigned char rr[] = { 0xc0, 0x0c, 0, 15, 0, 1,
		    0, 0, 0, 60, 0, 8, 0, 10, 3 };

		out[7] = 1;
		memcpy(out + len, rr, sizeof rr);
		len += sizeof rr;
	} else if (strcmp(first, "mx") == 0 || strcmp(first, "nullmix") == 0) {
		/* Owner: pointer to the question; exchange: "127.0.0.1". */
		static const unsigned char rr[] = { 0xc0, 0x0c, 0, 15, 0, 1,
		    0, 0, 0, 5, 0, 13, 0, 10, 3, '1', '2', '7', 1, '0', 1, '0',
		    1, '1', 0 };
		static const unsigned char null[] = { 0xc0, 0x0c, 0, 15, 0, 1,
		    0, 0, 0, 60, 0, 3, 0, 0, 0 };

		out[7] = 1;
		memcpy(out + len, rr, sizeof rr);
		len += sizeof rr;
		if (first[0] == 'n') {
			out[7] = 2;
			memcpy(out + len, null, sizeof null);
			len += sizeof null;
		}
	} else
		out[3] |= 3;
	reply = uv_buf_init((char *)out, (unsigned)len);
	ASSERT(uv_udp_try_send(u, &reply, 1, from) == (int)len);
}

TEST(mx_by_preference)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(!g.implicit && !g.literal && !g.cached);
	ASSERT_STR_EQ(g.domain, "two.test");
	ASSERT_EQ(g.nhosts, 2);
	ASSERT_STR_EQ(g.name[0], "mx1.two.test");
	ASSERT_EQ(g.pref[0], 10);
	ASSERT_EQ(g.naddrs[0], 1);
	ASSERT_STR_EQ(g.addr[0][0], "127.0.0.11");
	ASSERT_STR_EQ(g.name[1], "mx2.two.test");
	ASSERT_EQ(g.pref[1], 20);
	/* ipv6 = false: the AAAA of mx2 is neither asked nor returned. */
	ASSERT_EQ(g.naddrs[1], 1);
	ASSERT_STR_EQ(g.addr[1][0], "127.0.0.12");
	/* dnsmasq's --local-ttl=60 is the smallest TTL. */
	ASSERT(g.ttl_ms > 55000 && g.ttl_ms <= 60000);

	/* Case and a final dot do not matter. */
	lookup_wait(&fx, "TWO.Test.", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(g.cached);
	ASSERT_STR_EQ(g.domain, "two.test");
	fx_done(&fx);
}

TEST(mx_ipv6)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx.opt.ipv6 = true;
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT_EQ(g.nhosts, 2);
	ASSERT_EQ(g.naddrs[1], 2);
	ASSERT((strcmp(g.addr[1][0], "::12") == 0 &&
	    strcmp(g.addr[1][1], "127.0.0.12") == 0) ||
	    (strcmp(g.addr[1][1], "::12") == 0 &&
	    strcmp(g.addr[1][0], "127.0.0.12") == 0));
	lookup_wait(&fx, "v6only.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(g.implicit);
	ASSERT_STR_EQ(g.addr[0][0], "::61");
	fx_done(&fx);
}

TEST(equal_preference_shuffled)
{
	struct fx fx;
	struct got g;
	char firsts[4][64];
	int i, distinct = 0, k;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	/* 30 deliveries (cache hits after the first) reshuffle each time. */
	for (i = 0; i < 30; i++) {
		lookup_wait(&fx, "eq.test", &g);
		ASSERT_EQ(g.status, 0);
		ASSERT_EQ(g.nhosts, 4);
		ASSERT(has_host(&g, "a.eq.test"));
		ASSERT(has_host(&g, "b.eq.test"));
		ASSERT(has_host(&g, "c.eq.test"));
		ASSERT_STR_EQ(g.name[3], "d.eq.test");
		ASSERT_EQ(g.pref[0], 10);
		ASSERT_EQ(g.pref[3], 30);
		for (k = 0; k < distinct; k++)
			if (strcmp(firsts[k], g.name[0]) == 0)
				break;
		if (k == distinct)
			str_copy(firsts[distinct++], g.name[0], 64);
	}
	/* P(fewer than 2 distinct first hosts) = 3 * (1/3)^30. */
	ASSERT(distinct >= 2);
	fx_done(&fx);
}

TEST(implicit_mx)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "nomx.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(g.implicit);
	ASSERT_EQ(g.nhosts, 1);
	ASSERT_STR_EQ(g.name[0], "nomx.test");
	ASSERT_EQ(g.pref[0], 0);
	ASSERT_STR_EQ(g.addr[0][0], "127.0.0.9");

	/* The domain exists but has no MX and no A: unusable. */
	lookup_wait(&fx, "txtonly.test", &g);
	ASSERT_EQ(g.status, DNS_ENOHOST);
	ASSERT(g.implicit);
	ASSERT(dns_status_permanent(g.status));
	/* IPv4 only: an AAAA-only domain has no usable address. */
	lookup_wait(&fx, "v6only.test", &g);
	ASSERT_EQ(g.status, DNS_ENOHOST);
	fx_done(&fx);
}

TEST(null_mx)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "nullmx.test", &g);
	ASSERT_EQ(g.status, DNS_ENULLMX);
	ASSERT(strstr(g.why, "null MX") != NULL);
	ASSERT(dns_status_permanent(g.status));
	/* Any preference: "10 ." is a null MX too. */
	lookup_wait(&fx, "nullmx2.test", &g);
	ASSERT_EQ(g.status, DNS_ENULLMX);
	fx_done(&fx);
}

TEST(nxdomain)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "nx.test", &g);
	ASSERT_EQ(g.status, DNS_ENXDOMAIN);
	ASSERT(strstr(g.why, "does not exist") != NULL);
	ASSERT(dns_status_permanent(g.status));
	ASSERT_STR_EQ(dns_strerror(g.status), "domain does not exist");
	fx_done(&fx);
}

TEST(mx_host_without_address_dropped)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "partial.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT_EQ(g.nhosts, 1);
	ASSERT_STR_EQ(g.name[0], "good.partial.test");
	ASSERT_EQ(g.pref[0], 10);
	ASSERT_STR_EQ(g.addr[0][0], "127.0.0.31");
	fx_done(&fx);
}

TEST(no_mx_host_has_address)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "dead.test", &g);
	ASSERT_EQ(g.status, DNS_ENOHOST);
	ASSERT(!g.implicit);
	ASSERT(strstr(g.why, "no MX host of dead.test") != NULL);
	fx_done(&fx);
}

TEST(mx_to_address_and_to_itself)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "lit.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT_EQ(g.nhosts, 1);
	ASSERT_STR_EQ(g.name[0], "127.0.0.41");
	ASSERT_STR_EQ(g.addr[0][0], "127.0.0.41");
	lookup_wait(&fx, "self.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(!g.implicit);
	ASSERT_STR_EQ(g.name[0], "self.test");
	ASSERT_STR_EQ(g.addr[0][0], "127.0.0.51");
	fx_done(&fx);
}

TEST(address_literals)
{
	struct fx fx;
	struct got g;

	/* Nothing listens on fx.port: literals must not need DNS. */
	fx_init(&fx);
	fx_dns(&fx);
	lookup_wait(&fx, "[127.0.0.1]", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(g.literal && !g.implicit);
	ASSERT_EQ(g.nhosts, 1);
	ASSERT_STR_EQ(g.name[0], "127.0.0.1");
	ASSERT_STR_EQ(g.addr[0][0], "127.0.0.1");
	ASSERT_EQ(g.pref[0], 0);
	lookup_wait(&fx, "[IPv6:2001:db8::1]", &g);
	ASSERT_EQ(g.status, DNS_ENOHOST);	/* ipv6 = false */
	lookup_wait(&fx, "[300.1.2.3]", &g);
	ASSERT_EQ(g.status, DNS_EBADNAME);
	lookup_wait(&fx, "[127.0.0.1", &g);
	ASSERT_EQ(g.status, DNS_EBADNAME);
	lookup_wait(&fx, "[2001:db8::1]", &g);	/* the tag is required */
	ASSERT_EQ(g.status, DNS_EBADNAME);
	dns_free(fx.dns);

	fx.opt.ipv6 = true;
	fx_dns(&fx);
	lookup_wait(&fx, "[ipv6:2001:DB8:0::1]", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT_STR_EQ(g.name[0], "2001:db8::1");
	ASSERT_STR_EQ(g.addr[0][0], "2001:db8::1");
	fx_done(&fx);
}

TEST(bad_names)
{
	static const char *const bad[] = {
		"", ".", "a..b", "exa mple.test", "a.test\r\nX", "tést.test",
		"a/b.test",
	};
	char big[300];
	struct fx fx;
	struct got g;
	size_t i;

	fx_init(&fx);
	fx_dns(&fx);
	for (i = 0; i < ARRAY_SIZE(bad); i++) {
		lookup_wait(&fx, bad[i], &g);
		ASSERT_EQ(g.status, DNS_EBADNAME);
		ASSERT(dns_status_permanent(g.status));
	}
	memset(big, 'a', sizeof big - 1);
	big[sizeof big - 1] = '\0';
	lookup_wait(&fx, big, &g);
	ASSERT_EQ(g.status, DNS_EBADNAME);
	fx_done(&fx);
}

TEST(cache_hit_without_network)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(!g.cached);
	ASSERT_EQ(dns_cache_count(fx.dns), 1);
	fx_dnsmasq_stop(&fx);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(g.cached);
	ASSERT_EQ(g.nhosts, 2);
	ASSERT_STR_EQ(g.name[0], "mx1.two.test");
	ASSERT_STR_EQ(g.addr[1][0], "127.0.0.12");
	/* Something not cached now fails: the server really is gone. */
	lookup_wait(&fx, "nomx.test", &g);
	ASSERT_EQ(g.status, DNS_ETEMP);
	fx_done(&fx);
}

TEST(negative_cache)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "nx.test", &g);
	ASSERT_EQ(g.status, DNS_ENXDOMAIN);
	lookup_wait(&fx, "nullmx.test", &g);
	ASSERT_EQ(g.status, DNS_ENULLMX);
	lookup_wait(&fx, "dead.test", &g);
	ASSERT_EQ(g.status, DNS_ENOHOST);
	ASSERT(g.ttl_ms > 295000 && g.ttl_ms <= 300000);
	fx_dnsmasq_stop(&fx);
	lookup_wait(&fx, "nx.test", &g);
	ASSERT_EQ(g.status, DNS_ENXDOMAIN);
	ASSERT(g.cached);
	lookup_wait(&fx, "nullmx.test", &g);
	ASSERT_EQ(g.status, DNS_ENULLMX);
	ASSERT(g.cached);
	lookup_wait(&fx, "dead.test", &g);
	ASSERT_EQ(g.status, DNS_ENOHOST);
	ASSERT(g.cached);
	fx_done(&fx);
}

TEST(temporary_failure_not_cached)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dns(&fx);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, DNS_ETEMP);
	ASSERT(!dns_status_permanent(g.status));
	ASSERT_EQ(dns_cache_count(fx.dns), 0);
	/* The server comes up on the same port: the next try works. */
	fx_dnsmasq(&fx, NULL);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(!g.cached);
	fx_done(&fx);
}

TEST(ttl_expiry_and_cap)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx.local_ttl = 1;
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(g.ttl_ms <= 1000);
	fx_dnsmasq_stop(&fx);
	run_ms(&fx, 1100);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, DNS_ETEMP);	/* expired: asked again, no server */
	dns_free(fx.dns);

	/* TTL 60 in DNS, capped at 2 s by max_mx_ttl. */
	fx.opt.max_mx_ttl_s = 2;
	fx.local_ttl = 60;
	fx_dns(&fx);
	fx_dnsmasq(&fx, NULL);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT(g.ttl_ms > 1500 && g.ttl_ms <= 2000);
	fx_done(&fx);
}

TEST(cache_lru_bound)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx.opt.cache_size = 2;
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	lookup_wait(&fx, "two.test", &g);
	lookup_wait(&fx, "nomx.test", &g);
	lookup_wait(&fx, "two.test", &g);	/* now the most recent */
	ASSERT(g.cached);
	lookup_wait(&fx, "lit.test", &g);	/* evicts nomx.test */
	ASSERT_EQ(dns_cache_count(fx.dns), 2);
	fx_dnsmasq_stop(&fx);
	lookup_wait(&fx, "two.test", &g);
	ASSERT(g.cached && g.status == 0);
	lookup_wait(&fx, "lit.test", &g);
	ASSERT(g.cached && g.status == 0);
	lookup_wait(&fx, "nomx.test", &g);
	ASSERT_EQ(g.status, DNS_ETEMP);
	dns_free(fx.dns);

	/* cache_size 0: nothing is kept. */
	fx.opt.cache_size = 0;
	fx_dns(&fx);
	fx_dnsmasq(&fx, NULL);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT_EQ(dns_cache_count(fx.dns), 0);
	fx_done(&fx);
}

TEST(connection_refused_is_temporary)
{
	struct fx fx;
	struct got g;
	uint64_t t0;

	fx_init(&fx);
	fx.opt.timeout_ms = 200;
	fx_dns(&fx);
	t0 = uv_now(&fx.loop);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, DNS_ETEMP);
	ASSERT(strstr(g.why, "MX lookup for two.test failed") != NULL);
	ASSERT(uv_now(&fx.loop) - t0 < 2000);
	fx_done(&fx);
}

TEST(timeout_is_temporary)
{
	struct sockaddr_in sin;
	struct fx fx;
	struct got g;
	uint64_t t0;
	int s;

	/* A bound UDP socket that never answers. */
	fx_init(&fx);
	ASSERT((s = socket(AF_INET, SOCK_DGRAM, 0)) >= 0);
	ASSERT_EQ(uv_ip4_addr("127.0.0.1", fx.port, &sin), 0);
	ASSERT_EQ(bind(s, (struct sockaddr *)&sin, sizeof sin), 0);
	fx.opt.timeout_ms = 200;
	fx_dns(&fx);
	t0 = uv_now(&fx.loop);
	lookup_wait(&fx, "two.test", &g);
	ASSERT_EQ(g.status, DNS_ETEMP);
	ASSERT(strstr(g.why, "imeout") != NULL);
	ASSERT(uv_now(&fx.loop) - t0 >= 150);
	ASSERT(uv_now(&fx.loop) - t0 < 2000);
	close(s);
	fx_done(&fx);
}

TEST(bad_answers_are_temporary)
{
	static const char *const names[] = {
		"servfail.x.test", "refused.x.test", "malformed.x.test",
		"trunc.x.test",
	};
	struct fx fx;
	struct got g;
	size_t i;

	fx_init(&fx);
	fake_start(&fx);
	fx_dns(&fx);
	for (i = 0; i < ARRAY_SIZE(names); i++) {
		lookup_wait(&fx, names[i], &g);
		ASSERT_EQ(g.status, DNS_ETEMP);
		ASSERT(g.why[0] != '\0');
	}
	ASSERT_EQ(dns_cache_count(fx.dns), 0);
	/* The fake answers the rest with NXDOMAIN. */
	lookup_wait(&fx, "other.x.test", &g);
	ASSERT_EQ(g.status, DNS_ENXDOMAIN);
	fx_done(&fx);
}

TEST(mx_ttl_and_mixed_null_mx)
{
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fake_start(&fx);
	fx_dns(&fx);
	/* The MX record's own TTL (5 s) bounds the cache lifetime. */
	lookup_wait(&fx, "mx.x.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT_EQ(g.nhosts, 1);
	ASSERT_STR_EQ(g.name[0], "127.0.0.1");
	ASSERT_EQ(g.pref[0], 10);
	ASSERT(g.ttl_ms > 4000 && g.ttl_ms <= 5000);
	/* "0 ." beside a real MX is not a null MX: it is ignored. */
	lookup_wait(&fx, "nullmix.x.test", &g);
	ASSERT_EQ(g.status, 0);
	ASSERT_EQ(g.nhosts, 1);
	ASSERT_STR_EQ(g.addr[0][0], "127.0.0.1");
	ASSERT_EQ(fx.fake_queries, 2);	/* no A query for an address */
	fx_done(&fx);
}

TEST(identical_lookups_coalesce)
{
	struct got g[3];
	struct fx fx;
	int i, total = 0;

	fx_init(&fx);
	fake_start(&fx);
	fx_dns(&fx);
	memset(g, 0, sizeof g);
	lookup(&fx, "nx.x.test", &g[0]);
	lookup(&fx, "NX.x.test", &g[1]);
	lookup(&fx, "nx.x.test.", &g[2]);
	for (i = 0; i < 3; i++) {
		run_until(&fx, &g[i].calls, 1, 5000);
		total += g[i].calls;
	}
	ASSERT_EQ(total, 3);
	for (i = 0; i < 3; i++) {
		ASSERT_EQ(g[i].status, DNS_ENXDOMAIN);
		ASSERT(!g[i].was_inline);
	}
	ASSERT_EQ(fx.fake_queries, 1);
	fx_done(&fx);
}

TEST(cancel)
{
	struct got a, b, c;
	struct dns_req *r;
	struct fx fx;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	memset(&a, 0, sizeof a);
	memset(&b, 0, sizeof b);
	/* Two waiters on one lookup; cancel one before any answer. */
	r = dns_mx_lookup(fx.dns, "two.test", on_mx, &a);
	lookup(&fx, "two.test", &b);
	dns_req_cancel(r);
	run_until(&fx, &b.calls, 1, 5000);
	run_ms(&fx, 50);
	ASSERT_EQ(a.calls, 0);
	ASSERT_EQ(b.calls, 1);
	ASSERT_EQ(b.status, 0);

	/* Cancelling the only waiter: the answer still fills the cache. */
	memset(&a, 0, sizeof a);
	dns_req_cancel(dns_mx_lookup(fx.dns, "nomx.test", on_mx, &a));
	run_ms(&fx, 300);
	ASSERT_EQ(a.calls, 0);
	ASSERT_EQ(dns_cache_count(fx.dns), 2);

	/* A cache hit or a literal is ready at once: cancel still holds. */
	memset(&c, 0, sizeof c);
	dns_req_cancel(dns_mx_lookup(fx.dns, "two.test", on_mx, &c));
	dns_req_cancel(dns_mx_lookup(fx.dns, "[127.0.0.1]", on_mx, &c));
	run_ms(&fx, 50);
	ASSERT_EQ(c.calls, 0);
	fx_done(&fx);
}

/* Lookup chained from inside a callback: must not run inside it either. */
struct chain {
	struct fx *fx;			/* for the second lookup */
	struct got first, second;	/* results */
	bool in_first;			/* inside the first callback */
};

/* on_chain_first - record, then ask again (a cache hit) from here */
static void
on_chain_first(void *arg, const struct dns_mx_result *res)
{
	struct chain *ch = arg;

	on_mx(&ch->first, res);
	ch->in_first = true;
	ch->second.inline_flag = &ch->in_first;
	ASSERT(dns_mx_lookup(ch->fx->dns, "two.test", on_mx, &ch->second) !=
	    NULL);
	ASSERT_EQ(ch->second.calls, 0);
	ch->in_first = false;
}

TEST(never_inline)
{
	struct chain ch;
	struct fx fx;
	struct got g;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	/* lookup() itself asserts no inline call for each kind. */
	lookup_wait(&fx, "two.test", &g);	/* network */
	lookup_wait(&fx, "two.test", &g);	/* cache */
	ASSERT(g.cached);
	lookup_wait(&fx, "[127.0.0.1]", &g);	/* literal */
	lookup_wait(&fx, "bad name", &g);	/* error */
	memset(&ch, 0, sizeof ch);
	ch.fx = &fx;
	ASSERT(dns_mx_lookup(fx.dns, "two.test", on_chain_first, &ch) != NULL);
	run_until(&fx, &ch.second.calls, 1, 5000);
	ASSERT_EQ(ch.first.calls, 1);
	ASSERT(!ch.second.was_inline);
	ASSERT_EQ(ch.second.status, 0);
	fx_done(&fx);
}

TEST(free_with_requests_pending)
{
	struct got a, b, c, d;
	struct fx fx;

	fx_init(&fx);
	fx_dnsmasq(&fx, NULL);
	fx_dns(&fx);
	memset(&a, 0, sizeof a);
	memset(&b, 0, sizeof b);
	memset(&c, 0, sizeof c);
	memset(&d, 0, sizeof d);
	lookup_wait(&fx, "eq.test", &d);	/* an answer in the cache */
	lookup(&fx, "two.test", &a);		/* MX query in flight */
	lookup(&fx, "two.test", &b);		/* coalesced waiter */
	lookup(&fx, "[127.0.0.1]", &c);	/* on the ready list */
	memset(&d, 0, sizeof d);
	lookup(&fx, "eq.test", &d);		/* a cache hit, ready */
	fx_done(&fx);
	ASSERT_EQ(a.calls + b.calls + c.calls + d.calls, 0);
}

TEST(free_during_address_lookups)
{
	struct fx fx;
	struct got a;
	int i, k;

	/*
	 * dns_free() at successive points of a lookup's life (MX query out,
	 * MX answered and A queries out, some answered): the callbacks of
	 * c-ares's ARES_EDESTRUCTION must not touch freed state, nothing
	 * leaks (ASan), and the loop still closes.
	 */
	for (i = 1; i <= 6; i++) {
		fx_init(&fx);
		fx_dnsmasq(&fx, NULL);
		fx_dns(&fx);
		memset(&a, 0, sizeof a);
		lookup(&fx, "eq.test", &a);
		for (k = 0; k < i; k++)
			uv_run(&fx.loop, UV_RUN_NOWAIT);
		usleep(2000);
		uv_run(&fx.loop, UV_RUN_NOWAIT);
		fx_done(&fx);
		ASSERT(a.calls <= 1);
	}
}

TEST(bad_options)
{
	struct dns_options o;
	struct dns *d = (void *)1;
	const char *bad[] = { "not-an-address" };
	char err[256];
	uv_loop_t loop;

	ASSERT_EQ(uv_loop_init(&loop), 0);
	memset(&o, 0, sizeof o);
	o.timeout_ms = 0;
	o.tries = 1;
	ASSERT_EQ(dns_new(&loop, &o, &d, err, sizeof err), -EINVAL);
	ASSERT(d == NULL);
	o.timeout_ms = 100;
	o.servers = bad;
	o.nservers = 1;
	ASSERT_EQ(dns_new(&loop, &o, &d, err, sizeof err), RELAY_ECONFIG);
	ASSERT(strstr(err, "not-an-address") != NULL);
	ASSERT(d == NULL);
	ASSERT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(uv_loop_close(&loop), 0);
	ASSERT_STR_EQ(dns_strerror(DNS_ENULLMX),
	    "domain accepts no mail (null MX)");
	ASSERT(!dns_status_permanent(DNS_ETEMP));
}

TEST_MAIN("dns",
    TEST_ENTRY(mx_by_preference),
    TEST_ENTRY(mx_ipv6),
    TEST_ENTRY(equal_preference_shuffled),
    TEST_ENTRY(implicit_mx),
    TEST_ENTRY(null_mx),
    TEST_ENTRY(nxdomain),
    TEST_ENTRY(mx_host_without_address_dropped),
    TEST_ENTRY(no_mx_host_has_address),
    TEST_ENTRY(mx_to_address_and_to_itself),
    TEST_ENTRY(address_literals),
    TEST_ENTRY(bad_names),
    TEST_ENTRY(cache_hit_without_network),
    TEST_ENTRY(negative_cache),
    TEST_ENTRY(temporary_failure_not_cached),
    TEST_ENTRY(ttl_expiry_and_cap),
    TEST_ENTRY(cache_lru_bound),
    TEST_ENTRY(connection_refused_is_temporary),
    TEST_ENTRY(timeout_is_temporary),
    TEST_ENTRY(bad_answers_are_temporary),
    TEST_ENTRY(mx_ttl_and_mixed_null_mx),
    TEST_ENTRY(identical_lookups_coalesce),
    TEST_ENTRY(cancel),
    TEST_ENTRY(never_inline),
    TEST_ENTRY(free_with_requests_pending),
    TEST_ENTRY(free_during_address_lookups),
    TEST_ENTRY(bad_options))
