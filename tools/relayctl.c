/*
 * relayctl - the operator's command line for relayd.
 *
 *   relayctl [-s socket | -c config | -d] queue [--json]
 *   relayctl [-s socket | -c config | -d] queue show ID
 *   relayctl [-s socket | -c config | -d] sites [--json]
 *   relayctl [-s socket | -c config | -d] status
 *
 * It speaks only the control protocol (relay/control.h): one request line
 * over the unix socket, the answer is everything until the daemon closes.
 * The socket path comes from -s, or from the control.socket of the
 * configuration named by -c (or the built-in one with -d), or the default.
 * Exit codes: 0 ok, 64 usage, 69 daemon not reachable, 78 bad config.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "config/config.h"
#include "config/util.h"

#define DEFAULT_SOCKET "/run/relay/relayd.sock"
#define EX_USAGE_ 64
#define EX_UNAVAILABLE_ 69
#define EX_CONFIG_ 78

static void
usage(void)
{
	fprintf(stderr,
	    "usage: relayctl [-s socket | -c config | -d] command\n"
	    "commands:\n"
	    "  queue [--json]   list queued messages and their recipients\n"
	    "  queue show ID    why each pending recipient of ID waits\n"
	    "  sites [--json]   delivery sites: adaptive limits, mode, last throttle\n"
	    "  status           daemon counters (JSON)\n");
	exit(EX_USAGE_);
}

/* ctl_request - send req, copy the whole answer to stdout */
static int
ctl_request(const char *path, const char *req)
{
	struct sockaddr_un sun;
	char buf[65536];
	ssize_t n;
	int fd, err;
	bool error_reply = false, first = true;

	memset(&sun, 0, sizeof sun);
	sun.sun_family = AF_UNIX;
	if (str_copy(sun.sun_path, path, sizeof sun.sun_path) >=
	    sizeof sun.sun_path) {
		fprintf(stderr, "relayctl: socket path too long: %s\n", path);
		return EX_USAGE_;
	}
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
	    connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
		err = errno;
		fprintf(stderr, "relayctl: cannot reach relayd at %s: %s\n"
		    "relayctl: is relayd running? (start it with 'make run' or "
		    "'relayd -c FILE'; pick the socket with -s, -c or -d)\n",
		    path, strerror(err));
		if (fd >= 0)
			close(fd);
		return EX_UNAVAILABLE_;
	}
	if (fd_write_all(fd, req, strlen(req)) < 0 ||
	    fd_write_all(fd, "\n", 1) < 0) {
		fprintf(stderr, "relayctl: write to %s: %s\n", path,
		    strerror(errno));
		close(fd);
		return EX_UNAVAILABLE_;
	}
	while ((n = read(fd, buf, sizeof buf)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "relayctl: read: %s\n", strerror(errno));
			close(fd);
			return EX_UNAVAILABLE_;
		}
		if (first && n >= 6 && memcmp(buf, "error:", 6) == 0)
			error_reply = true;
		first = false;
		fwrite(buf, 1, (size_t)n, error_reply ? stderr : stdout);
	}
	close(fd);
	return error_reply ? 1 : 0;
}

int
main(int argc, char **argv)
{
	const char *sock = NULL, *cfgpath = NULL;
	struct relay_config *cfg = NULL;
	bool builtin = false, json = false;
	char err[1024], *path;
	int ch, rc;

	while ((ch = getopt(argc, argv, "+s:c:dh")) != -1) {
		switch (ch) {
		case 's':
			sock = optarg;
			break;
		case 'c':
			cfgpath = optarg;
			break;
		case 'd':
			builtin = true;
			break;
		default:
			usage();
		}
	}
	argc -= optind;
	argv += optind;
	if (argc < 1)
		usage();
	if (sock == NULL && (cfgpath || builtin)) {
		rc = builtin ? config_load_string(config_default_text(),
		    "(built-in)", &cfg, err, sizeof err) :
		    config_load(cfgpath, &cfg, err, sizeof err);
		if (rc < 0) {
			fprintf(stderr, "relayctl: %s\n", err);
			return EX_CONFIG_;
		}
		sock = cfg->control_socket;
	}
	if (sock == NULL)
		sock = DEFAULT_SOCKET;
	path = xstrdup(sock);
	config_unref(cfg);

	if (strcmp(argv[0], "queue") == 0 && argc == 3 &&
	    strcmp(argv[1], "show") == 0) {
		char req[128];

		if (strlen(argv[2]) > 64 || strchr(argv[2], '\n'))
			usage();
		snprintf(req, sizeof req, "queue show %s", argv[2]);
		rc = ctl_request(path, req);
	} else if (strcmp(argv[0], "queue") == 0) {
		for (int i = 1; i < argc; i++) {
			if (strcmp(argv[i], "--json") == 0)
				json = true;
			else
				usage();
		}
		rc = ctl_request(path, json ? "queue json" : "queue");
	} else if (strcmp(argv[0], "sites") == 0) {
		for (int i = 1; i < argc; i++) {
			if (strcmp(argv[i], "--json") == 0)
				json = true;
			else
				usage();
		}
		rc = ctl_request(path, json ? "sites json" : "sites");
	} else if (strcmp(argv[0], "status") == 0 && argc == 1) {
		rc = ctl_request(path, "status json");
	} else {
		usage();
	}
	free(path);
	return rc;
}
