/*
 * listener.h - the listening sockets and the per-address connection count.
 */
#ifndef RELAY_LISTENER_H
#define RELAY_LISTENER_H

#include <stdbool.h>
#include <sys/socket.h>

#include "config/config.h"

struct relay;
struct ipcount;

/*
 * listeners_sync - make the bound listeners match cfg: bind the new ones
 * first, and only if all of them bind, close the ones cfg dropped and
 * update the options of the ones it kept (same address and port keep
 * their socket, so a reload never refuses a connection). On failure
 * nothing changes and err says which address failed and why.
 */
int listeners_sync(struct relay *r, const struct relay_config *cfg,
    char *err, size_t errlen);

/* listeners_close_all - stop accepting (graceful stop) */
void listeners_close_all(struct relay *r);

struct ipcount *ipcount_new(void);
void ipcount_free(struct ipcount *ic);
/* ipcount_acquire - take a slot for sa unless it already has max */
bool ipcount_acquire(struct ipcount *ic, const struct sockaddr *sa, int max);
void ipcount_release(struct ipcount *ic, const struct sockaddr *sa);

#endif
