/*
 * addrmap.c - chained hash keyed by 16-byte addresses (IPv4 stored as
 * v4-mapped IPv6, so both families share one key space and a v4 client
 * arriving on a dual-stack socket counts once). FNV-1a hash; the table
 * grows by doubling so lookups stay O(1) under a connection flood.
 */
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>

#include "config/util.h"
#include "relay/addrmap.h"

struct addrmap {
	struct addrmap_entry **b;	/* buckets */
	size_t nb;			/* bucket count, power of two */
	size_t n;			/* entries */
};

static void addr_to_key(const struct sockaddr *sa, uint8_t key[16]);
static size_t addrmap_hash(const uint8_t key[16], size_t nb);
static void addrmap_grow(struct addrmap *m);

struct addrmap *
addrmap_new(void)
{
	struct addrmap *m = xcalloc(1, sizeof *m);

	m->nb = 256;
	m->b = xcalloc(m->nb, sizeof *m->b);
	return m;
}

void
addrmap_free(struct addrmap *m)
{
	if (m == NULL)
		return;
	for (size_t i = 0; i < m->nb; i++) {
		struct addrmap_entry *e = m->b[i], *n;
		for (; e; e = n) {
			n = e->next;
			free(e);
		}
	}
	free(m->b);
	free(m);
}

/* addr_to_key - IPv6 as is, IPv4 as ::ffff:a.b.c.d */
static void
addr_to_key(const struct sockaddr *sa, uint8_t key[16])
{
	memset(key, 0, 16);
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const void *)sa;
		memcpy(key, &s6->sin6_addr, 16);
	} else if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *s4 = (const void *)sa;
		key[10] = key[11] = 0xff;
		memcpy(key + 12, &s4->sin_addr, 4);
	}
}

static size_t
addrmap_hash(const uint8_t key[16], size_t nb)
{
	uint32_t h = 2166136261u;

	for (int i = 0; i < 16; i++)
		h = (h ^ key[i]) * 16777619u;
	return h & (nb - 1);
}

/* addrmap_grow - double the buckets when the load passes 1 */
static void
addrmap_grow(struct addrmap *m)
{
	size_t nb = m->nb * 2;
	struct addrmap_entry **b = xcalloc(nb, sizeof *b);

	for (size_t i = 0; i < m->nb; i++) {
		struct addrmap_entry *e = m->b[i], *n;
		for (; e; e = n) {
			size_t h = addrmap_hash(e->key, nb);
			n = e->next;
			e->next = b[h];
			b[h] = e;
		}
	}
	free(m->b);
	m->b = b;
	m->nb = nb;
}

struct addrmap_entry *
addrmap_get(struct addrmap *m, const struct sockaddr *sa, bool create)
{
	uint8_t key[16];
	struct addrmap_entry *e;
	size_t h;

	addr_to_key(sa, key);
	h = addrmap_hash(key, m->nb);
	for (e = m->b[h]; e; e = e->next)
		if (memcmp(e->key, key, 16) == 0)
			return e;
	if (!create)
		return NULL;
	if (m->n >= m->nb) {
		addrmap_grow(m);
		h = addrmap_hash(key, m->nb);
	}
	e = xcalloc(1, sizeof *e);
	memcpy(e->key, key, 16);
	e->next = m->b[h];
	m->b[h] = e;
	m->n++;
	return e;
}

void
addrmap_del(struct addrmap *m, struct addrmap_entry *e)
{
	size_t h = addrmap_hash(e->key, m->nb);

	for (struct addrmap_entry **pp = &m->b[h]; *pp; pp = &(*pp)->next) {
		if (*pp == e) {
			*pp = e->next;
			free(e);
			m->n--;
			return;
		}
	}
}

size_t
addrmap_size(const struct addrmap *m)
{
	return m->n;
}

void
addrmap_prune(struct addrmap *m,
    bool (*fn)(const struct addrmap_entry *e, void *arg), void *arg)
{
	for (size_t i = 0; i < m->nb; i++) {
		struct addrmap_entry **pp = &m->b[i];
		while (*pp) {
			struct addrmap_entry *e = *pp;
			if (fn(e, arg)) {
				*pp = e->next;
				free(e);
				m->n--;
			} else {
				pp = &e->next;
			}
		}
	}
}
