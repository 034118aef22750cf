/*
 * addrmap.h - a small hash map from a client IP address to two counters.
 * Used for connections per address and AUTH failures per address.
 */
#ifndef RELAY_ADDRMAP_H
#define RELAY_ADDRMAP_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

struct addrmap_entry {
	uint8_t key[16];		/* IPv6 or v4-mapped address */
	int64_t count;			/* user counter */
	int64_t stamp;			/* user timestamp */
	struct addrmap_entry *next;	/* bucket chain */
};

struct addrmap;

struct addrmap *addrmap_new(void);
void addrmap_free(struct addrmap *m);
/* addrmap_get - the entry for sa; created zeroed if create, else NULL */
struct addrmap_entry *addrmap_get(struct addrmap *m,
    const struct sockaddr *sa, bool create);
/* addrmap_del - remove and free an entry returned by addrmap_get */
void addrmap_del(struct addrmap *m, struct addrmap_entry *e);
/* addrmap_size - number of entries */
size_t addrmap_size(const struct addrmap *m);
/* addrmap_prune - delete entries for which fn returns true */
void addrmap_prune(struct addrmap *m,
    bool (*fn)(const struct addrmap_entry *e, void *arg), void *arg);

#endif
