/*
 * auth.h - SMTP AUTH credential checks and the per-client failure limiter.
 *
 * Password hashes are crypt(3) strings; verifying one costs milliseconds
 * ($6$) to tens of milliseconds ($y$), so it runs on the libuv thread pool,
 * never on the loop. The limiter counts failures per client address within
 * a window so a password guesser is cut off.
 */
#ifndef RELAY_AUTH_H
#define RELAY_AUTH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include <uv.h>

#include "config/config.h"

struct auth_req;

/* auth_verify_cb - ok is true only for a known user with a matching password */
typedef void (*auth_verify_cb)(void *arg, bool ok);

/*
 * auth_verify - check user/password against cfg on the thread pool. cb runs
 * later on the loop. The request holds a config reference. Returns the
 * request so the caller can auth_cancel() it from its destructor.
 */
struct auth_req *auth_verify(uv_loop_t *loop, struct relay_config *cfg,
    const char *user, const char *password, auth_verify_cb cb, void *arg);

/* auth_cancel - the callback will not run; the request frees itself */
void auth_cancel(struct auth_req *req);

/* auth_sasl_plain - split a decoded PLAIN response; false if malformed */
bool auth_sasl_plain(const char *resp, size_t len, const char **authzid,
    const char **user, const char **pass);

struct auth_limiter;

struct auth_limiter *auth_limiter_new(void);
void auth_limiter_free(struct auth_limiter *lim);
/* auth_limiter_blocked - has sa used up its failures within the window? */
bool auth_limiter_blocked(struct auth_limiter *lim, const struct sockaddr *sa,
    int max_failures, int window_s, int64_t now);
/* auth_limiter_fail - record one failure for sa */
void auth_limiter_fail(struct auth_limiter *lim, const struct sockaddr *sa,
    int window_s, int64_t now);

#endif
