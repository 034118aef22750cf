/*
 * dns.h - MX resolution for delivery: c-ares driven by the libuv loop.
 *
 * dns_mx_lookup() turns a recipient domain into the ordered list of hosts
 * to try, each with its addresses, following RFC 5321 5.1 and RFC 7505:
 *
 *   MX records          hosts by preference, equal preferences shuffled
 *                       afresh for every caller (also on cache hits)
 *   no MX (NODATA)      implicit MX: the domain itself, preference 0
 *   NXDOMAIN            DNS_ENXDOMAIN (permanent)
 *   null MX "0 ."       DNS_ENULLMX (permanent; no address lookups)
 *   no host resolves    DNS_ENOHOST (permanent) when every address lookup
 *                       said "no such name/no data"; DNS_ETEMP if any
 *                       failed temporarily
 *   SERVFAIL, timeout,  DNS_ETEMP (retry later); also a truncated or
 *   refused, malformed  malformed answer
 *   "[192.0.2.1]",      one host with that address, no DNS
 *   "[IPv6:2001:db8::1]"
 *
 * Answers are cached by lower-cased domain until the smallest TTL of the
 * MX and address records used (capped by max_mx_ttl_s); permanent failures
 * for negative_ttl_s; temporary failures never. Identical lookups in
 * flight share one query. Whether an MX host is one of our own addresses
 * is the delivery layer's question: the addresses are all here.
 */
#ifndef RELAY_DNS_H
#define RELAY_DNS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <uv.h>

/* Statuses, below errno's range and apart from RELAY_E* (-5001...). */
#define DNS_ENXDOMAIN	(-5101)	/* the domain does not exist: permanent */
#define DNS_ENULLMX	(-5102)	/* null MX, RFC 7505: accepts no mail */
#define DNS_ENOHOST	(-5103)	/* no MX host has an address: permanent */
#define DNS_ETEMP	(-5104)	/* lookup failed; try again later */
#define DNS_EBADNAME	(-5105)	/* not a domain or address literal we use */

struct dns;
struct dns_req;

/* dns_options - what dns_new() needs; config's dns group maps onto it */
struct dns_options {
	const char *const *servers;	/* "addr", "addr:port", "[v6]:port" */
	size_t nservers;		/* 0 = nameservers of resolv.conf */
	int timeout_ms;			/* per attempt, > 0 */
	int tries;			/* attempts per server, > 0 */
	bool ipv6;			/* also AAAA; else IPv4 only */
	int max_mx_ttl_s;		/* cache cap for answers; 0 = none */
	int negative_ttl_s;		/* cache time of permanent failures */
	size_t cache_size;		/* domains cached; 0 = no cache */
};

/* One host to try, with every usable address it has (port left 0). */
struct dns_mx_host {
	const char *name;		/* exchange, lower case, no final dot */
	int pref;			/* MX preference (0 when implicit) */
	const struct sockaddr_storage *addrs;	/* AF_INET / AF_INET6 */
	size_t naddrs;			/* at least 1 */
};

/* What a lookup found; valid only during the callback. */
struct dns_mx_result {
	int status;			/* 0 or a DNS_E* code */
	const char *why;		/* for humans: NULL when status is 0 */
	const char *domain;		/* the domain asked: lower case without
					   a final dot, or the literal as given */
	bool implicit;			/* no MX: the domain's own address */
	bool literal;			/* an address literal, no DNS used */
	bool cached;			/* answered from the cache */
	const struct dns_mx_host *hosts;	/* in the order to try them */
	size_t nhosts;			/* 0 unless status is 0 */
	uint64_t expires_ms;		/* uv_now() time it goes stale */
};

/*
 * dns_mx_cb - the answer to one dns_mx_lookup(). It runs from the loop,
 * never inside the call that asked. res and everything it points to are
 * valid only until the callback returns; copy what you keep. The request
 * handle is gone once the callback starts (do not cancel it then).
 */
typedef void (*dns_mx_cb)(void *arg, const struct dns_mx_result *res);

/*
 * dns_new - a resolver on loop. Calls ares_library_init() the first time.
 * Returns 0, -EINVAL for bad options, RELAY_ECONFIG for a server string
 * c-ares rejects, -ENOMEM, or -EIO if c-ares cannot start; err says why.
 * Search domains, ndots and /etc/hosts are not used: every name is taken
 * as fully qualified and resolved through the servers only.
 */
int dns_new(uv_loop_t *loop, const struct dns_options *o, struct dns **out,
    char *err, size_t errlen);

/*
 * dns_free - destroy the resolver. Requests still pending are dropped:
 * their callbacks never run and their handles become invalid (owners
 * cancel theirs in their own destructors first). The handles are closed
 * and the memory released from their close callbacks, so run the loop
 * afterwards. Must not be called from inside a dns_mx_cb. NULL is fine.
 */
void dns_free(struct dns *d);

/*
 * dns_mx_lookup - resolve a recipient domain (or an address literal).
 * Never fails and never calls back inline: errors, cache hits and literals
 * are all delivered through cb from the loop. Returns the handle to pass
 * to dns_req_cancel() until cb has started.
 */
struct dns_req *dns_mx_lookup(struct dns *d, const char *domain, dns_mx_cb cb,
    void *arg);

/*
 * dns_req_cancel - the callback will not run; frees the handle. The query
 * itself completes (c-ares 1.18 cannot cancel one query) and fills the
 * cache. Not allowed once the callback has started.
 */
void dns_req_cancel(struct dns_req *r);

/* dns_strerror - text for a DNS_E* status, or relay_strerror() for others */
const char *dns_strerror(int status);

/* dns_status_permanent - would retrying the same lookup be pointless? */
bool dns_status_permanent(int status);

/* dns_cache_count - domains in the cache (tests and metrics) */
size_t dns_cache_count(const struct dns *d);

#endif
