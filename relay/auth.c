/*
 * auth.c - AUTH credential verification off the loop, SASL PLAIN parsing,
 * and the per-address failure limiter.
 *
 * Verification always runs crypt_r, even for an unknown user (against a
 * configured hash of the same cost), and compares in constant time, so
 * response timing does not reveal which logins exist. The limiter is an addrmap keyed by client
 * address (count = failures, stamp = window start); entries expire lazily.
 */
#include <crypt.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>

#include <openssl/crypto.h>
#include <uv.h>

#include "config/config.h"
#include "config/log.h"
#include "config/util.h"
#include "relay/addrmap.h"
#include "relay/auth.h"

#define AUTH_LIMITER_PRUNE 4096	/* entries before expired ones go */

struct auth_req {
	uv_work_t work;			/* thread-pool job; work.data = req */
	struct relay_config *cfg;	/* reference held for the job */
	char *user;			/* login to check */
	char *password;			/* secret, wiped before free */
	bool ok;			/* result, written by the worker */
	auth_verify_cb cb;		/* NULL once cancelled */
	void *arg;			/* for cb */
};

static void auth_on_work(uv_work_t *w);
static void auth_on_done(uv_work_t *w, int status);

/* Only the salt of a $6$ hash matters to crypt: the cost of a check. */
static const char auth_dummy_hash[] = "$6$relaydummysalt$x";

struct auth_req *
auth_verify(uv_loop_t *loop, struct relay_config *cfg, const char *user,
    const char *password, auth_verify_cb cb, void *arg)
{
	struct auth_req *r = xcalloc(1, sizeof *r);

	r->cfg = config_ref(cfg);
	r->user = xstrdup(user);
	r->password = xstrdup(password);
	r->cb = cb;
	r->arg = arg;
	r->work.data = r;
	if (uv_queue_work(loop, &r->work, auth_on_work, auth_on_done) < 0)
		relay_panic("uv_queue_work failed for auth");
	return r;
}

void
auth_cancel(struct auth_req *req)
{
	req->cb = NULL;
}

/* auth_on_work - runs on a pool thread: only reads the immutable config */
static void
auth_on_work(uv_work_t *w)
{
	struct auth_req *r = w->data;
	const struct cfg_user *u = config_user_find(r->cfg, r->user);
	/*
	 * An unknown login still pays for a hash of the same algorithm and
	 * cost as a real one, so timing does not tell which logins exist.
	 */
	const char *hash = u ? u->hash :
	    r->cfg->nusers ? r->cfg->users[0].hash : auth_dummy_hash;
	struct crypt_data *cd = xcalloc(1, sizeof *cd);
	const char *out = crypt_r(r->password, hash, cd);

	r->ok = u != NULL && out != NULL && out[0] != '*' &&
	    strlen(out) == strlen(hash) &&
	    CRYPTO_memcmp(out, hash, strlen(hash)) == 0;
	OPENSSL_cleanse(cd, sizeof *cd);
	free(cd);
}

static void
auth_on_done(uv_work_t *w, int status)
{
	struct auth_req *r = w->data;

	if (r->cb)
		r->cb(r->arg, status == 0 && r->ok);
	OPENSSL_cleanse(r->password, strlen(r->password));
	free(r->password);
	free(r->user);
	config_unref(r->cfg);
	free(r);
}

bool
auth_sasl_plain(const char *resp, size_t len, const char **authzid,
    const char **user, const char **pass)
{
	const char *n1, *n2;

	/* authzid NUL authcid NUL passwd, RFC 4616 */
	if ((n1 = memchr(resp, '\0', len)) == NULL)
		return false;
	n2 = memchr(n1 + 1, '\0', len - (size_t)(n1 + 1 - resp));
	if (n2 == NULL || memchr(n2 + 1, '\0', len - (size_t)(n2 + 1 - resp)))
		return false;
	if (n2 == n1 + 1 || (size_t)(n2 + 1 - resp) == len)
		return false;	/* empty login or empty password */
	*authzid = resp;
	*user = n1 + 1;
	*pass = n2 + 1;
	return true;
}

struct auth_limiter *
auth_limiter_new(void)
{
	return (struct auth_limiter *)addrmap_new();
}

void
auth_limiter_free(struct auth_limiter *lim)
{
	addrmap_free((struct addrmap *)lim);
}

/* limiter_expired - prune callback: the window of e is over */
static bool
limiter_expired(const struct addrmap_entry *e, void *arg)
{
	const int64_t *cut = arg;

	return e->stamp < *cut;
}

bool
auth_limiter_blocked(struct auth_limiter *lim, const struct sockaddr *sa,
    int max_failures, int window_s, int64_t now)
{
	struct addrmap_entry *e;

	e = addrmap_get((struct addrmap *)lim, sa, false);
	if (e == NULL)
		return false;
	if (now - e->stamp >= window_s) {
		addrmap_del((struct addrmap *)lim, e);
		return false;
	}
	return e->count >= max_failures;
}

void
auth_limiter_fail(struct auth_limiter *lim, const struct sockaddr *sa,
    int window_s, int64_t now)
{
	struct addrmap *m = (struct addrmap *)lim;
	struct addrmap_entry *e;

	/* Keep the table bounded under a distributed guessing run. */
	if (addrmap_size(m) >= AUTH_LIMITER_PRUNE) {
		int64_t cut = now - window_s;
		addrmap_prune(m, limiter_expired, &cut);
	}
	e = addrmap_get(m, sa, true);
	if (e->count == 0 || now - e->stamp >= window_s) {
		e->count = 0;
		e->stamp = now;
	}
	e->count++;
}
