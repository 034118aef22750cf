/*
 * test_config.c - unit tests for config/config.c: defaults, the schema's
 * type/range/unknown-key errors with their line numbers, relay networks,
 * users, delivery TLS policies, reply rules, shaping (built-in providers,
 * merge by name, MX suffix lookup, inheritance), reference counting, the
 * example file and the built-in default.
 *
 * Tests run from the repository root (config/relay.conf.example is read
 * by relative path).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/log.h"
#include "config/util.h"
#include "config/config.h"
#include "tests/unit/test.h"

/* The smallest valid file: one listener. */
#define MINIMAL \
	"listeners = ( { address = \"127.0.0.1\"; port = 2525; } );\n"

static struct relay_config *load_ok(const char *);
static void load_fail(const char *, const char *);
static bool match4(const struct relay_config *, const char *);
static bool match6(const struct relay_config *, const char *);

static char errbuf[512];

/* A double equal to b within rounding. */
#define ASSERT_NEAR(a, b) ASSERT((a) > (b) - 1e-9 && (a) < (b) + 1e-9)

/* load_ok - load text named "t.conf", abort with the message on failure */
static struct relay_config *
load_ok(const char *text)
{
	struct relay_config *cfg = NULL;
	int rc;

	errbuf[0] = '\0';
	rc = config_load_string(text, "t.conf", &cfg, errbuf, sizeof errbuf);
	if (rc != 0)
		fprintf(stderr, "unexpected error: %s\n", errbuf);
	ASSERT_EQ(rc, 0);
	ASSERT(cfg != NULL);
	ASSERT_EQ(cfg->refs, 1);
	return cfg;
}

/* load_fail - expect RELAY_ECONFIG and want as a substring of the message */
static void
load_fail(const char *text, const char *want)
{
	struct relay_config *cfg = (void *)1;
	int rc;

	errbuf[0] = '\0';
	rc = config_load_string(text, "t.conf", &cfg, errbuf, sizeof errbuf);
	if (strstr(errbuf, want) == NULL)
		fprintf(stderr, "message \"%s\" lacks \"%s\"\n", errbuf, want);
	ASSERT_EQ(rc, RELAY_ECONFIG);
	ASSERT(cfg == NULL);
	ASSERT(strstr(errbuf, want) != NULL);
}

/* match4 - config_net_match for a dotted-quad sockaddr_in */
static bool
match4(const struct relay_config *cfg, const char *a)
{
	struct sockaddr_in sin;

	memset(&sin, 0, sizeof sin);
	sin.sin_family = AF_INET;
	ASSERT_EQ(inet_pton(AF_INET, a, &sin.sin_addr), 1);
	return config_net_match(cfg, (const struct sockaddr *)&sin);
}

/* match6 - config_net_match for an IPv6 (or v4-mapped) sockaddr_in6 */
static bool
match6(const struct relay_config *cfg, const char *a)
{
	struct sockaddr_in6 sin6;

	memset(&sin6, 0, sizeof sin6);
	sin6.sin6_family = AF_INET6;
	ASSERT_EQ(inet_pton(AF_INET6, a, &sin6.sin6_addr), 1);
	return config_net_match(cfg, (const struct sockaddr *)&sin6);
}

TEST(defaults)
{
	struct relay_config *cfg = load_ok(MINIMAL);
	const struct cfg_listener *l = &cfg->listeners[0];

	ASSERT_STR_EQ(cfg->path, "t.conf");
	ASSERT(cfg->hostname != NULL && cfg->hostname[0] != '\0');
	ASSERT_STR_EQ(cfg->spool_dir, "/var/spool/relay");
	ASSERT_STR_EQ(cfg->control_socket, "/run/relay/relayd.sock");
	ASSERT_EQ(cfg->control_mode, 0600);
	ASSERT_STR_EQ(cfg->tls_cert, "/etc/relay/cert.pem");
	ASSERT_STR_EQ(cfg->tls_key, "/etc/relay/key.pem");
	ASSERT(!cfg->tls_generate);
	ASSERT_EQ(cfg->nlisteners, 1);
	ASSERT_STR_EQ(l->name, "127.0.0.1:2525");
	ASSERT_EQ(l->tls, CFG_TLS_STARTTLS);
	ASSERT(l->auth_required);
	ASSERT_EQ(cfg->nusers, 0);
	ASSERT_EQ(cfg->nrelay_nets, 0);
	ASSERT_EQ(cfg->limits.max_message_size, 52428800);
	ASSERT_EQ(cfg->limits.max_recipients, 1000);
	ASSERT_EQ(cfg->limits.max_connections, 1000);
	ASSERT_EQ(cfg->limits.max_connections_per_ip, 50);
	ASSERT_EQ(cfg->limits.max_line_length, 2048);
	ASSERT_EQ(cfg->limits.max_errors, 10);
	ASSERT_EQ(cfg->timeouts.command_ms, 300000);
	ASSERT_EQ(cfg->timeouts.data_ms, 180000);
	ASSERT_EQ(cfg->timeouts.tls_handshake_ms, 30000);
	ASSERT_EQ(cfg->timeouts.shutdown_ms, 10000);
	ASSERT_EQ(cfg->auth.failure_delay_ms, 1000);
	ASSERT_EQ(cfg->auth.max_failures, 5);
	ASSERT_EQ(cfg->auth.failure_window_s, 300);
	ASSERT(!cfg->log.syslog);
	ASSERT_EQ(cfg->log.trace, 0);
	ASSERT_EQ(cfg->dns.nservers, 0);
	ASSERT_EQ(cfg->dns.timeout_ms, 5000);
	ASSERT_EQ(cfg->dns.tries, 2);
	ASSERT(!cfg->dns.ipv6);
	ASSERT_EQ(cfg->dns.max_mx_ttl_s, 3600);
	ASSERT_EQ(cfg->dns.negative_ttl_s, 300);
	ASSERT_EQ(cfg->dns.cache_size, 10000);
	ASSERT(!match4(cfg, "127.0.0.1"));
	config_unref(cfg);
}

TEST(all_keys_set)
{
	struct relay_config *cfg = load_ok(
	    "hostname = \"mx-1.Example.org\";\n"
	    "spool_dir = \"/srv/spool\";\n"
	    "control = { socket = \"/tmp/r.sock\"; mode = \"0660\"; };\n"
	    "tls = { certificate = \"c.pem\"; key = \"k.pem\";\n"
	    "  generate = true; };\n"
	    "listeners = ( { name = \"a\"; address = \"::1\"; port = 465;\n"
	    "    tls = \"implicit\"; auth_required = false; },\n"
	    "  { address = \"0.0.0.0\"; port = 25; tls = \"none\"; } );\n"
	    "limits = { max_message_size = 1024; max_recipients = 7;\n"
	    "  max_connections = 9; max_connections_per_ip = 3;\n"
	    "  max_line_length = 512; max_errors = 1; };\n"
	    "auth = { failure_delay = 0; max_failures = 2;\n"
	    "  failure_window = 60; };\n"
	    "log = { syslog = true;\n"
	    "  trace = [ \"smtp\", \"dns\", \"state\" ]; };\n");

	ASSERT_STR_EQ(cfg->hostname, "mx-1.Example.org");
	ASSERT_STR_EQ(cfg->spool_dir, "/srv/spool");
	ASSERT_STR_EQ(cfg->control_socket, "/tmp/r.sock");
	ASSERT_EQ(cfg->control_mode, 0660);
	ASSERT_STR_EQ(cfg->tls_cert, "c.pem");
	ASSERT_STR_EQ(cfg->tls_key, "k.pem");
	ASSERT(cfg->tls_generate);
	ASSERT_EQ(cfg->nlisteners, 2);
	ASSERT_STR_EQ(cfg->listeners[0].name, "a");
	ASSERT_STR_EQ(cfg->listeners[0].address, "::1");
	ASSERT_EQ(cfg->listeners[0].port, 465);
	ASSERT_EQ(cfg->listeners[0].tls, CFG_TLS_IMPLICIT);
	ASSERT(!cfg->listeners[0].auth_required);
	ASSERT_STR_EQ(cfg->listeners[1].name, "0.0.0.0:25");
	ASSERT_EQ(cfg->listeners[1].tls, CFG_TLS_NONE);
	ASSERT_EQ(cfg->limits.max_message_size, 1024);
	ASSERT_EQ(cfg->limits.max_recipients, 7);
	ASSERT_EQ(cfg->limits.max_connections, 9);
	ASSERT_EQ(cfg->limits.max_connections_per_ip, 3);
	ASSERT_EQ(cfg->limits.max_line_length, 512);
	ASSERT_EQ(cfg->limits.max_errors, 1);
	ASSERT_EQ(cfg->auth.failure_delay_ms, 0);
	ASSERT_EQ(cfg->auth.max_failures, 2);
	ASSERT_EQ(cfg->auth.failure_window_s, 60);
	ASSERT(cfg->log.syslog);
	ASSERT_EQ(cfg->log.trace, TRACE_SMTP | TRACE_DNS | TRACE_STATE);
	config_unref(cfg);
}

TEST(per_ip_default_follows_max_connections)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "limits = { max_connections = 10; };\n");

	ASSERT_EQ(cfg->limits.max_connections_per_ip, 10);
	config_unref(cfg);
	load_fail(MINIMAL "limits = { max_connections = 10;\n"
	    "  max_connections_per_ip = 11; };\n",
	    "t.conf:3: 'max_connections_per_ip' (11) must not exceed "
	    "max_connections (10)");
}

TEST(durations_int_and_float)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "timeouts = { command = 60; data = 2.5; tls_handshake = 0.25;\n"
	    "  shutdown = 86400; };\n"
	    "auth = { failure_delay = 0.5; failure_window = 90.4; };\n");

	ASSERT_EQ(cfg->timeouts.command_ms, 60000);
	ASSERT_EQ(cfg->timeouts.data_ms, 2500);
	ASSERT_EQ(cfg->timeouts.tls_handshake_ms, 250);
	ASSERT_EQ(cfg->timeouts.shutdown_ms, 86400000);
	ASSERT_EQ(cfg->auth.failure_delay_ms, 500);
	ASSERT_EQ(cfg->auth.failure_window_s, 90);
	config_unref(cfg);
}

TEST(duration_ranges)
{
	load_fail(MINIMAL "timeouts = { command = 0; };",
	    "t.conf:2: 'command' must be between 0.001 and 86400 seconds");
	load_fail(MINIMAL "timeouts = { data = -1.5; };",
	    "'data' must be between");
	load_fail(MINIMAL "timeouts = { shutdown = 86401; };",
	    "'shutdown' must be between");
	load_fail(MINIMAL "auth = { failure_delay = 61; };",
	    "'failure_delay' must be between 0 and 60 seconds");
	load_fail(MINIMAL "timeouts = { command = \"5\"; };",
	    "t.conf:2: 'command' must be a number of seconds");
}

TEST(int64_size)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "limits = { max_message_size = 10737418240L; };\n");

	ASSERT(cfg->limits.max_message_size == 10737418240ULL);
	config_unref(cfg);
	cfg = load_ok(MINIMAL
	    "limits = { max_message_size = 1099511627776L; };");
	ASSERT(cfg->limits.max_message_size == 1ULL << 40);
	config_unref(cfg);
	load_fail(MINIMAL "limits = { max_message_size = 1099511627777L; };",
	    "'max_message_size' must be between 1024 and 1099511627776");
	load_fail(MINIMAL "limits = { max_message_size = 1023; };",
	    "'max_message_size' must be between");
	load_fail(MINIMAL "limits = { max_message_size = 1.5; };",
	    "'max_message_size' must be an integer");
}

TEST(type_errors)
{
	load_fail("hostname = 5;\n" MINIMAL,
	    "t.conf:1: 'hostname' must be a string");
	load_fail(MINIMAL "spool_dir = \"\";",
	    "t.conf:2: 'spool_dir' must not be empty");
	load_fail(MINIMAL "control = { mode = 600; };",
	    "'mode' must be an octal string");
	load_fail(MINIMAL "control = \"x\";",
	    "t.conf:2: 'control' must be a group");
	load_fail(MINIMAL "tls = { generate = \"yes\"; };",
	    "'generate' must be a boolean");
	load_fail("listeners = ( { address = \"::1\"; port = \"25\"; } );",
	    "t.conf:1: 'port' must be an integer");
	load_fail("listeners = ( { address = \"::1\"; port = 25.0; } );",
	    "'port' must be an integer");
	load_fail(MINIMAL "limits = { max_recipients = true; };",
	    "'max_recipients' must be an integer");
	load_fail(MINIMAL "log = { syslog = 1; };",
	    "'syslog' must be a boolean");
	load_fail(MINIMAL "log = { trace = \"smtp\"; };",
	    "'trace' must be a list");
	load_fail(MINIMAL "log = { trace = [ 1 ]; };",
	    "'trace' entries must be strings");
	load_fail(MINIMAL "relay_networks = \"10.0.0.0/8\";",
	    "'relay_networks' must be a list");
	load_fail(MINIMAL "relay_networks = [ 10 ];",
	    "'relay_networks' entries must be strings");
	load_fail("listeners = { address = \"::1\"; port = 25; };",
	    "'listeners' must be a list");
	load_fail("listeners = ( \"x\" );",
	    "'listeners' entries must be groups");
	load_fail(MINIMAL "users = ( 1 );", "'users' entries must be groups");
}

TEST(range_errors)
{
	load_fail(MINIMAL "limits = { max_recipients = 0; };",
	    "'max_recipients' must be between 1 and 100000");
	load_fail(MINIMAL "limits = { max_line_length = 511; };",
	    "'max_line_length' must be between 512 and 65536");
	load_fail(MINIMAL "limits = { max_errors = 1001; };",
	    "'max_errors' must be between 1 and 1000");
	load_fail(MINIMAL "limits = { max_connections = 1000001; };",
	    "'max_connections' must be between 1 and 1000000");
	load_fail(MINIMAL "auth = { max_failures = 0; };",
	    "'max_failures' must be between 1 and 1000");
	load_fail(MINIMAL "auth = { failure_window = 0.2; };",
	    "'failure_window' must be between 1 and 86400 seconds");
	load_fail(MINIMAL "control = { mode = \"0800\"; };",
	    "'mode' must be an octal string");
	load_fail(MINIMAL "control = { mode = \"1777\"; };",
	    "'mode' must be an octal string");
	load_fail(MINIMAL "hostname = \"bad_name.example\";",
	    "t.conf:2: hostname 'bad_name.example' is not a valid domain name");
	load_fail(MINIMAL "hostname = \"-a.example\";", "not a valid domain");
	load_fail(MINIMAL "hostname = \"a..example\";", "not a valid domain");
	load_fail(MINIMAL "hostname = \"example.com.\";", "not a valid domain");
}

TEST(unknown_key_top_level)
{
	load_fail(MINIMAL "\nfoo = 1;\n", "t.conf:3: unknown setting 'foo'");
}

TEST(unknown_key_nested)
{
	load_fail(MINIMAL
	    "limits = {\n"
	    "  max_errors = 3;\n"
	    "  max_erorrs = 4;\n"
	    "};\n",
	    "t.conf:4: unknown setting 'max_erorrs' in 'limits'");
	load_fail("listeners = (\n"
	    "  { address = \"::1\"; port = 25;\n"
	    "    auth = true; }\n"
	    ");\n",
	    "t.conf:3: unknown setting 'auth' in 'listeners'");
	load_fail(MINIMAL "users = ( { name = \"a\"; password = \"x\"; } );",
	    "t.conf:2: unknown setting 'password' in 'users'");
	load_fail(MINIMAL "log = {\n trace = [ ];\n level = 3; };",
	    "t.conf:4: unknown setting 'level' in 'log'");
}

TEST(missing_listeners)
{
	load_fail("spool_dir = \"/x\";\n", "t.conf: 'listeners' is required");
	load_fail("listeners = ( );\n", "t.conf:1: 'listeners' must hold at "
	    "least one");
	load_fail("listeners = ( { port = 25; } );",
	    "t.conf:1: listener is missing 'address'");
	load_fail("listeners = ( { address = \"::\"; } );",
	    "t.conf:1: listener is missing 'port'");
}

TEST(listener_errors)
{
	load_fail("listeners = ( { address = \"::1\"; port = 25;\n"
	    "  tls = \"ssl\"; } );",
	    "t.conf:2: 'tls' must be one of \"none\", \"starttls\" or "
	    "\"implicit\"");
	load_fail("listeners = ( { address = \"::1\"; port = 0; } );",
	    "'port' must be between 1 and 65535");
	load_fail("listeners = ( { address = \"::1\"; port = 65536; } );",
	    "'port' must be between 1 and 65535");
	load_fail("listeners = ( { address = \"localhost\"; port = 25; } );",
	    "'address' must be a numeric IPv4 or IPv6 address, not "
	    "'localhost'");
}

TEST(duplicate_listener)
{
	load_fail("listeners = (\n"
	    "  { name = \"a\"; address = \"::1\"; port = 25; },\n"
	    "  { name = \"b\"; address = \"0:0::1\"; port = 25; } );",
	    "t.conf:3: listener 'b' uses the same address and port as 'a'");
	load_fail("listeners = (\n"
	    "  { name = \"a\"; address = \"::1\"; port = 25; },\n"
	    "  { name = \"a\"; address = \"::1\"; port = 26; } );",
	    "t.conf:3: listener name 'a' is used twice");

	/* Same port on different addresses is fine. */
	struct relay_config *cfg = load_ok("listeners = (\n"
	    "  { address = \"127.0.0.1\"; port = 25; },\n"
	    "  { address = \"::1\"; port = 25; } );");
	ASSERT_EQ(cfg->nlisteners, 2);
	config_unref(cfg);
}

TEST(relay_networks_v4)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "relay_networks = [ \"10.0.0.0/8\", \"192.0.2.7\", "
	    "\"198.51.100.128/25\", \"0.0.0.0/0\" ];\n");

	ASSERT_EQ(cfg->nrelay_nets, 4);
	ASSERT_EQ(cfg->relay_nets[1].prefix, 32);
	config_unref(cfg);

	cfg = load_ok(MINIMAL "relay_networks = ( \"10.0.0.0/8\", "
	    "\"192.0.2.7\", \"198.51.100.128/25\" );\n");
	ASSERT(match4(cfg, "10.255.1.2"));
	ASSERT(!match4(cfg, "11.0.0.1"));
	ASSERT(match4(cfg, "192.0.2.7"));
	ASSERT(!match4(cfg, "192.0.2.8"));
	ASSERT(match4(cfg, "198.51.100.200"));
	ASSERT(!match4(cfg, "198.51.100.127"));
	ASSERT(!match6(cfg, "::1"));
	ASSERT(!config_net_match(cfg, NULL));
	config_unref(cfg);
}

TEST(relay_networks_v6_and_mapped)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "relay_networks = [ \"2001:db8::/32\", \"::1/128\",\n"
	    "  \"127.0.0.0/8\", \"::ffff:192.0.2.0/120\", \"fe80::/10\" ];\n");

	ASSERT(match6(cfg, "2001:db8:ffff::1"));
	ASSERT(!match6(cfg, "2001:db9::1"));
	ASSERT(match6(cfg, "::1"));
	ASSERT(!match6(cfg, "::2"));
	ASSERT(match6(cfg, "febf::1"));
	ASSERT(!match6(cfg, "fec0::1"));
	/* A dual-stack socket's view of IPv4 clients. */
	ASSERT(match6(cfg, "::ffff:127.0.0.1"));
	ASSERT(!match6(cfg, "::ffff:128.0.0.1"));
	/* A v4-mapped network in the file is an IPv4 network. */
	ASSERT_EQ(cfg->relay_nets[3].family, AF_INET);
	ASSERT_EQ(cfg->relay_nets[3].prefix, 24);
	ASSERT(match4(cfg, "192.0.2.99"));
	ASSERT(match6(cfg, "::ffff:192.0.2.99"));
	config_unref(cfg);
}

TEST(relay_networks_errors)
{
	load_fail(MINIMAL "relay_networks = [\n \"10.0.0.1/8\" ];",
	    "t.conf:3: relay network '10.0.0.1/8' has host bits set; "
	    "did you mean '10.0.0.0/8'?");
	load_fail(MINIMAL "relay_networks = [ \"2001:db8::1/32\" ];",
	    "did you mean '2001:db8::/32'?");
	load_fail(MINIMAL "relay_networks = [ \"10.0.0.0/33\" ];",
	    "relay network '10.0.0.0/33' is not an address or CIDR");
	load_fail(MINIMAL "relay_networks = [ \"::/129\" ];", "not an address");
	load_fail(MINIMAL "relay_networks = [ \"10.0.0.0/\" ];",
	    "not an address");
	load_fail(MINIMAL "relay_networks = [ \"10.0.0.0/+8\" ];",
	    "not an address");
	load_fail(MINIMAL "relay_networks = [ \"10.0.0/8\" ];",
	    "not an address");
	load_fail(MINIMAL "relay_networks = [ \"example.com\" ];",
	    "relay network 'example.com' is not an address");
}

TEST(users)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "users = ( { name = \"Alice\"; password_hash = "
	    "\"$y$j9T$abcdefgh$ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\"; },\n"
	    "  { name = \"bob\"; password_hash = \"$2b$12$"
	    "abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234\"; } );");

	ASSERT_EQ(cfg->nusers, 2);
	ASSERT(config_user_find(cfg, "Alice") == &cfg->users[0]);
	ASSERT(config_user_find(cfg, "alice") == NULL);
	ASSERT(config_user_find(cfg, "bob") == &cfg->users[1]);
	ASSERT(config_user_find(cfg, "bo") == NULL);
	ASSERT(config_user_find(cfg, NULL) == NULL);
	ASSERT_STR_EQ(config_user_find(cfg, "bob")->hash, "$2b$12$"
	    "abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234");
	config_unref(cfg);
}

TEST(plaintext_password_rejected)
{
	static const char msg[] = "password_hash must be a crypt(3) hash "
	    "such as $6$... or $y$...; generate one with: openssl passwd -6";

	load_fail(MINIMAL "users = (\n { name = \"a\";\n"
	    "   password_hash = \"hunter2\"; } );", msg);
	load_fail(MINIMAL "users = (\n { name = \"a\";\n"
	    "   password_hash = \"hunter2\"; } );", "t.conf:4: ");
	load_fail(MINIMAL "users = ( { name = \"a\"; "
	    "password_hash = \"$6$\"; } );", msg);
	load_fail(MINIMAL "users = ( { name = \"a\"; "
	    "password_hash = \"$6$salt$\"; } );", msg);
	load_fail(MINIMAL "users = ( { name = \"a\"; "
	    "password_hash = \"$9$salt$hash\"; } );", msg);
	load_fail(MINIMAL "users = ( { name = \"a\"; "
	    "password_hash = \"$6$sa lt$hash\"; } );", msg);
	load_fail(MINIMAL "users = ( { name = \"a\"; } );",
	    "user 'a' is missing 'password_hash'");
	load_fail(MINIMAL "users = ( { password_hash = \"$1$s$h\"; } );",
	    "user is missing 'name'");
	load_fail(MINIMAL "users = ( { name = \"a b\"; "
	    "password_hash = \"$1$s$h\"; } );", "must not contain spaces");
}

TEST(duplicate_user)
{
	load_fail(MINIMAL "users = (\n"
	    " { name = \"a\"; password_hash = \"$1$s$h\"; },\n"
	    " { name = \"a\"; password_hash = \"$5$s$h\"; } );",
	    "t.conf:4: user 'a' is defined twice");
}

TEST(trace_names)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "log = { trace = ( \"io\", \"spool\", \"dlv\" ); };");

	ASSERT_EQ(cfg->log.trace, TRACE_IO | TRACE_SPOOL | TRACE_DLV);
	config_unref(cfg);
	cfg = load_ok(MINIMAL "log = { trace = [ \"all\" ]; };");
	ASSERT_EQ(cfg->log.trace, TRACE_SMTP | TRACE_IO | TRACE_SPOOL |
	    TRACE_DNS | TRACE_DLV | TRACE_STATE);
	config_unref(cfg);
	load_fail(MINIMAL "log = {\n trace = [ \"smtp\", \"tls\" ]; };",
	    "t.conf:3: unknown trace flag 'tls'");
}

TEST(dns_group)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "dns = { servers = [ \"192.0.2.53\", \"127.0.0.1:5353\",\n"
	    "    \"[2001:DB8::1]:53\", \"::1\", \"[::2]\" ];\n"
	    "  timeout = 0.2; tries = 1; ipv6 = true; max_mx_ttl = 60.4;\n"
	    "  negative_ttl = 0; cache_size = 0; };\n");

	ASSERT_EQ(cfg->dns.nservers, 5);
	/* Normalised for ares_set_servers_ports_csv(): port always given. */
	ASSERT_STR_EQ(cfg->dns.servers[0], "192.0.2.53:53");
	ASSERT_STR_EQ(cfg->dns.servers[1], "127.0.0.1:5353");
	ASSERT_STR_EQ(cfg->dns.servers[2], "[2001:db8::1]:53");
	ASSERT_STR_EQ(cfg->dns.servers[3], "[::1]:53");
	ASSERT_STR_EQ(cfg->dns.servers[4], "[::2]:53");
	ASSERT_EQ(cfg->dns.timeout_ms, 200);
	ASSERT_EQ(cfg->dns.tries, 1);
	ASSERT(cfg->dns.ipv6);
	ASSERT_EQ(cfg->dns.max_mx_ttl_s, 60);
	ASSERT_EQ(cfg->dns.negative_ttl_s, 0);
	ASSERT_EQ(cfg->dns.cache_size, 0);
	config_unref(cfg);

	/* An empty list means /etc/resolv.conf, like an absent one. */
	cfg = load_ok(MINIMAL "dns = { servers = [ ]; };");
	ASSERT_EQ(cfg->dns.nservers, 0);
	config_unref(cfg);
}

TEST(dns_server_syntax)
{
	static const char *const bad[] = {
		"dns.example.com", "127.0.0.1:", "127.0.0.1:0",
		"127.0.0.1:65536", "127.0.0.1:+53", "127.0.0.1: 53",
		"127.0.0.1:53x", "[127.0.0.1]:53", "[::1", "[::1]53",
		"[::1]:", "::1:53x", "", "1.2.3", "[]:53",
	};
	char text[256], want[128];
	size_t i;

	for (i = 0; i < ARRAY_SIZE(bad); i++) {
		snprintf(text, sizeof text, MINIMAL "dns = {\n"
		    "  servers = [ \"127.0.0.1\",\n \"%s\" ]; };", bad[i]);
		snprintf(want, sizeof want, "t.conf:4: DNS server '%s' must "
		    "be a numeric address, address:port or [IPv6]:port",
		    bad[i]);
		load_fail(text, want);
	}
	load_fail(MINIMAL "dns = { servers = [ 53 ]; };",
	    "t.conf:2: 'servers' entries must be strings");
	load_fail(MINIMAL "dns = { servers = \"127.0.0.1\"; };",
	    "'servers' must be a list");
}

TEST(dns_ranges)
{
	load_fail(MINIMAL "dns = { timeout = 0; };",
	    "t.conf:2: 'timeout' must be between 0.001 and 300 seconds");
	load_fail(MINIMAL "dns = { tries = 0; };",
	    "'tries' must be between 1 and 20");
	load_fail(MINIMAL "dns = { max_mx_ttl = 604801; };",
	    "'max_mx_ttl' must be between 0 and 604800 seconds");
	load_fail(MINIMAL "dns = { negative_ttl = -1; };",
	    "'negative_ttl' must be between 0 and 86400 seconds");
	load_fail(MINIMAL "dns = { cache_size = -1; };",
	    "'cache_size' must be between 0 and 10000000");
	load_fail(MINIMAL "dns = { ipv6 = 1; };",
	    "'ipv6' must be a boolean");
	load_fail(MINIMAL "dns = {\n  server = [ ]; };",
	    "t.conf:3: unknown setting 'server' in 'dns'");
}

TEST(delivery_defaults)
{
	struct relay_config *cfg = load_ok(MINIMAL);
	static const int sched[] = { 300, 600, 1200, 2400, 4000 };
	static const uint64_t tmo[CFG_PHASE_LAST] = {
		[CFG_PHASE_CONNECT] = 30000, [CFG_PHASE_BANNER] = 300000,
		[CFG_PHASE_EHLO] = 300000, [CFG_PHASE_STARTTLS] = 120000,
		[CFG_PHASE_MAIL] = 300000, [CFG_PHASE_RCPT] = 300000,
		[CFG_PHASE_DATA] = 120000, [CFG_PHASE_DOT] = 600000,
		[CFG_PHASE_RSET] = 60000, [CFG_PHASE_QUIT] = 60000,
	};
	size_t i;

	ASSERT(cfg->delivery.enabled);
	ASSERT_EQ(cfg->delivery.port, 25);
	ASSERT(!cfg->delivery.has_source);
	ASSERT(cfg->delivery.helo == NULL);
	ASSERT_EQ(cfg->delivery.tls, CFG_DLV_TLS_OPPORTUNISTIC);
	ASSERT_STR_EQ(cfg->delivery.ca_file,
	    "/etc/ssl/certs/ca-certificates.crt");
	ASSERT_EQ(cfg->delivery.ntls_policies, 0);
	ASSERT_EQ(config_tls_policy(cfg, "example.com"),
	    CFG_DLV_TLS_OPPORTUNISTIC);
	ASSERT_EQ(config_tls_policy(cfg, NULL), CFG_DLV_TLS_OPPORTUNISTIC);
	ASSERT_EQ(cfg->delivery.max_connections, 200);
	ASSERT_EQ(cfg->delivery.max_connections_per_domain, 20);
	ASSERT_EQ(cfg->delivery.max_connections_per_host, 10);
	ASSERT_EQ(cfg->delivery.max_messages_per_connection, 100);
	ASSERT_EQ(cfg->delivery.max_recipients_per_transaction, 100);
	ASSERT_EQ(cfg->delivery.nretry, ARRAY_SIZE(sched));
	for (i = 0; i < ARRAY_SIZE(sched); i++)
		ASSERT_EQ(cfg->delivery.retry_schedule_s[i], sched[i]);
	ASSERT(cfg->delivery.retry_jitter == 0.1);
	ASSERT_EQ(cfg->delivery.min_retry_s, 60);
	ASSERT_EQ(cfg->delivery.max_queue_lifetime_s, 432000);
	ASSERT_EQ(cfg->delivery.delay_warning_s, 0);
	for (i = 0; i < CFG_PHASE_LAST; i++)
		ASSERT_EQ(cfg->delivery.timeout_ms[i], tmo[i]);
	config_unref(cfg);

	/* Defaults follow smaller or larger bounds instead of failing. */
	cfg = load_ok(MINIMAL "delivery = { max_connections = 5;\n"
	    "  min_retry = 1000; };");
	ASSERT_EQ(cfg->delivery.max_connections_per_domain, 5);
	ASSERT_EQ(cfg->delivery.max_connections_per_host, 10);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[0], 1000);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[2], 1200);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[4], 4000);
	config_unref(cfg);
}

TEST(delivery_group)
{
	struct relay_config *cfg = load_ok(MINIMAL
	    "delivery = { enabled = false; port = 2526;\n"
	    "  source_address = \"2001:DB8::25\"; helo = \"out.Example.net\";\n"
	    "  tls = \"required\"; max_connections = 50;\n"
	    "  max_connections_per_domain = 50; max_connections_per_host = 3;\n"
	    "  max_messages_per_connection = 1;\n"
	    "  max_recipients_per_transaction = 100000;\n"
	    "  retry_schedule = ( 120, 120.4, 3600 ); retry_jitter = 0;\n"
	    "  min_retry = 120; max_queue_lifetime = 60;\n"
	    "  delay_warning = 59.4;\n"
	    "  timeouts = { connect = 0.5; banner = 1; ehlo = 2; starttls = 3;\n"
	    "    mail = 4; rcpt = 5; data = 6; dot = 3600; rset = 0.001;\n"
	    "    quit = 7; }; };\n"
	    "timeouts = { data = 9; };\n");
	const struct sockaddr_in6 *sin6 = (const void *)&cfg->delivery.source;
	struct in6_addr want;

	ASSERT(!cfg->delivery.enabled);
	ASSERT_EQ(cfg->delivery.port, 2526);
	ASSERT(cfg->delivery.has_source);
	ASSERT_EQ(sin6->sin6_family, AF_INET6);
	ASSERT_EQ(sin6->sin6_port, 0);
	ASSERT_EQ(inet_pton(AF_INET6, "2001:db8::25", &want), 1);
	ASSERT(memcmp(&sin6->sin6_addr, &want, sizeof want) == 0);
	ASSERT_STR_EQ(cfg->delivery.helo, "out.Example.net");
	ASSERT_EQ(cfg->delivery.tls, CFG_DLV_TLS_REQUIRED);
	ASSERT_EQ(cfg->delivery.max_connections, 50);
	ASSERT_EQ(cfg->delivery.max_connections_per_domain, 50);
	ASSERT_EQ(cfg->delivery.max_connections_per_host, 3);
	ASSERT_EQ(cfg->delivery.max_messages_per_connection, 1);
	ASSERT_EQ(cfg->delivery.max_recipients_per_transaction, 100000);
	ASSERT_EQ(cfg->delivery.nretry, 3);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[0], 120);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[1], 120);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[2], 3600);
	ASSERT(cfg->delivery.retry_jitter == 0.0);
	ASSERT_EQ(cfg->delivery.min_retry_s, 120);
	ASSERT_EQ(cfg->delivery.max_queue_lifetime_s, 60);
	ASSERT_EQ(cfg->delivery.delay_warning_s, 59);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_CONNECT], 500);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_BANNER], 1000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_EHLO], 2000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_STARTTLS], 3000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_MAIL], 4000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_RCPT], 5000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_DATA], 6000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_DOT], 3600000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_RSET], 1);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_QUIT], 7000);
	/* The top-level timeouts group is a different one. */
	ASSERT_EQ(cfg->timeouts.data_ms, 9000);
	config_unref(cfg);

	/* IPv4 source; helo and source_address "" mean the defaults. */
	cfg = load_ok(MINIMAL "delivery = { source_address = \"192.0.2.25\";\n"
	    "  retry_jitter = 0.5; tls = \"none\"; };");
	const struct sockaddr_in *sin = (const void *)&cfg->delivery.source;
	ASSERT(cfg->delivery.has_source);
	ASSERT_EQ(sin->sin_family, AF_INET);
	ASSERT_EQ(sin->sin_port, 0);
	ASSERT_EQ(ntohl(sin->sin_addr.s_addr), 0xc0000219);
	ASSERT(cfg->delivery.retry_jitter == 0.5);
	ASSERT_EQ(cfg->delivery.tls, CFG_DLV_TLS_NONE);
	config_unref(cfg);
	cfg = load_ok(MINIMAL "delivery = { source_address = \"\"; "
	    "helo = \"\"; tls = \"opportunistic\"; };");
	ASSERT(!cfg->delivery.has_source);
	ASSERT(cfg->delivery.helo == NULL);
	ASSERT_EQ(cfg->delivery.tls, CFG_DLV_TLS_OPPORTUNISTIC);
	config_unref(cfg);
}

TEST(delivery_errors)
{
	load_fail(MINIMAL "delivery = {\n  tls = \"starttls\"; };",
	    "t.conf:3: 'tls' must be one of \"none\", \"opportunistic\", "
	    "\"required\" or \"verify\"");
	load_fail(MINIMAL "delivery = { tls = \"Verify\"; };",
	    "'tls' must be one of");
	load_fail(MINIMAL "delivery = { tls = 1; };", "'tls' must be one of");
	load_fail(MINIMAL "delivery = {\n\n"
	    "  source_address = \"mx.example\"; };",
	    "t.conf:4: 'source_address' must be a numeric IPv4 or IPv6 "
	    "address or \"\", not 'mx.example'");
	load_fail(MINIMAL "delivery = { source_address = \"10.0.0.0/8\"; };",
	    "not '10.0.0.0/8'");
	load_fail(MINIMAL "delivery = { source_address = \"fe80::1%eth0\"; };",
	    "'source_address' must be a numeric");
	load_fail(MINIMAL "delivery = {\n  source_address = 0; };",
	    "t.conf:3: 'source_address' must be a string");
	load_fail(MINIMAL "delivery = {\n  helo = \"[192.0.2.1]\"; };",
	    "t.conf:3: helo '[192.0.2.1]' is not a valid domain name");
	load_fail(MINIMAL "delivery = { enabled = 1; };",
	    "'enabled' must be a boolean");
	load_fail(MINIMAL "delivery = { port = 0; };",
	    "'port' must be between 1 and 65535");
	load_fail(MINIMAL "delivery = { max_connections = 100001; };",
	    "'max_connections' must be between 1 and 100000");
	load_fail(MINIMAL "delivery = { max_connections_per_host = 10001; };",
	    "'max_connections_per_host' must be between 1 and 10000");
	load_fail(MINIMAL "delivery = { max_messages_per_connection = 0; };",
	    "'max_messages_per_connection' must be between 1 and 100000");
	load_fail(MINIMAL "delivery = { max_connections = 10;\n"
	    "  max_connections_per_domain = 11; };",
	    "t.conf:3: 'max_connections_per_domain' (11) must not exceed "
	    "max_connections (10)");
	load_fail(MINIMAL "delivery = { retry_jitter = 0.51; };",
	    "'retry_jitter' must be between 0 and 0.5");
	load_fail(MINIMAL "delivery = { retry_jitter = -0.1; };",
	    "'retry_jitter' must be between 0 and 0.5");
	load_fail(MINIMAL "delivery = { retry_jitter = \"0.1\"; };",
	    "'retry_jitter' must be a number");
	load_fail(MINIMAL "delivery = { min_retry = 0.4; };",
	    "'min_retry' must be between 1 and 86400 seconds");
	load_fail(MINIMAL "delivery = { max_queue_lifetime = 59; };",
	    "'max_queue_lifetime' must be between 60 and 2592000 seconds");
	load_fail(MINIMAL "delivery = { max_queue_lifetime = 3600;\n"
	    "  delay_warning = 3600; };",
	    "t.conf:3: 'delay_warning' (3600) must be less than "
	    "max_queue_lifetime (3600), or 0");
	load_fail(MINIMAL "delivery = {\n  retries = 3; };",
	    "t.conf:3: unknown setting 'retries' in 'delivery'");
	load_fail(MINIMAL "delivery = 1;", "'delivery' must be a group");
}

/* A readable stand-in for a CA bundle: config only checks it opens. */
static char ca_path[] = "/tmp/test_config_ca.XXXXXX";

static void ca_make(void);
static void ca_remove(void);

/* ca_make - create ca_path */
static void
ca_make(void)
{
	int fd = mkstemp(ca_path);

	ASSERT(fd >= 0);
	ASSERT_EQ(write(fd, "-----BEGIN CERTIFICATE-----\n", 28), 28);
	close(fd);
}

/* ca_remove - delete ca_path */
static void
ca_remove(void)
{
	ASSERT_EQ(unlink(ca_path), 0);
}

TEST(delivery_tls_policies)
{
	char text[1024];
	struct relay_config *cfg;
	const struct cfg_tls_policy *tp;

	ca_make();
	snprintf(text, sizeof text, MINIMAL "delivery = {\n"
	    "  tls = \"none\"; ca_file = \"%s\";\n"
	    "  tls_policies = (\n"
	    "    { domain = \"Example.COM\"; tls = \"verify\"; },\n"
	    "    { domain = \".example.com\"; tls = \"required\"; },\n"
	    "    { tls = \"opportunistic\"; domain = \".mail.example.com\"; },\n"
	    "    { domain = \".org\"; tls = \"none\"; },\n"
	    "    { domain = \".example.org\"; tls = \"verify\"; },\n"
	    "    { domain = \"a.example.org\"; tls = \"required\"; }\n"
	    "  ); };\n", ca_path);
	cfg = load_ok(text);
	ASSERT_EQ(cfg->delivery.tls, CFG_DLV_TLS_NONE);
	ASSERT_STR_EQ(cfg->delivery.ca_file, ca_path);
	ASSERT_EQ(cfg->delivery.ntls_policies, 6);
	tp = cfg->delivery.tls_policies;
	/* File order, lower-cased, the leading dot turned into the flag. */
	ASSERT_STR_EQ(tp[0].domain, "example.com");
	ASSERT(!tp[0].subdomains);
	ASSERT_EQ(tp[0].tls, CFG_DLV_TLS_VERIFY);
	ASSERT_STR_EQ(tp[1].domain, "example.com");
	ASSERT(tp[1].subdomains);
	ASSERT_EQ(tp[1].tls, CFG_DLV_TLS_REQUIRED);
	ASSERT_STR_EQ(tp[2].domain, "mail.example.com");
	ASSERT(tp[2].subdomains);
	ASSERT_EQ(tp[2].tls, CFG_DLV_TLS_OPPORTUNISTIC);
	ASSERT_STR_EQ(tp[3].domain, "org");
	ASSERT_EQ(tp[5].tls, CFG_DLV_TLS_REQUIRED);

	/* Exact: the domain itself, in any case, but not its parent. */
	ASSERT_EQ(config_tls_policy(cfg, "example.com"), CFG_DLV_TLS_VERIFY);
	ASSERT_EQ(config_tls_policy(cfg, "EXAMPLE.com"), CFG_DLV_TLS_VERIFY);
	/* Subdomain: strictly below, at any depth. */
	ASSERT_EQ(config_tls_policy(cfg, "mx.example.com"),
	    CFG_DLV_TLS_REQUIRED);
	ASSERT_EQ(config_tls_policy(cfg, "a.b.Example.Com"),
	    CFG_DLV_TLS_REQUIRED);
	/* Longest subdomain entry wins, whatever the file order. */
	ASSERT_EQ(config_tls_policy(cfg, "x.mail.example.com"),
	    CFG_DLV_TLS_OPPORTUNISTIC);
	ASSERT_EQ(config_tls_policy(cfg, "mail.example.com"),
	    CFG_DLV_TLS_REQUIRED);
	ASSERT_EQ(config_tls_policy(cfg, "b.example.org"), CFG_DLV_TLS_VERIFY);
	ASSERT_EQ(config_tls_policy(cfg, "example.org"), CFG_DLV_TLS_NONE);
	/* Exact beats a longer-matching subdomain entry. */
	ASSERT_EQ(config_tls_policy(cfg, "a.example.org"),
	    CFG_DLV_TLS_REQUIRED);
	ASSERT_EQ(config_tls_policy(cfg, "x.a.example.org"),
	    CFG_DLV_TLS_VERIFY);
	/* Label boundaries: "badexample.com" is not below "example.com". */
	ASSERT_EQ(config_tls_policy(cfg, "badexample.com"), CFG_DLV_TLS_NONE);
	ASSERT_EQ(config_tls_policy(cfg, "example.net"), CFG_DLV_TLS_NONE);
	ASSERT_EQ(config_tls_policy(cfg, "com"), CFG_DLV_TLS_NONE);
	ASSERT_EQ(config_tls_policy(cfg, ""), CFG_DLV_TLS_NONE);
	ASSERT_EQ(config_tls_policy(cfg, NULL), CFG_DLV_TLS_NONE);
	config_unref(cfg);

	/* No match falls back to delivery.tls, whatever it is. */
	snprintf(text, sizeof text, MINIMAL "delivery = { tls = \"verify\";\n"
	    "  ca_file = \"%s\";\n"
	    "  tls_policies = ( { domain = \"lab.example\"; tls = \"none\"; } );"
	    " };\n", ca_path);
	cfg = load_ok(text);
	ASSERT_EQ(cfg->delivery.tls, CFG_DLV_TLS_VERIFY);
	ASSERT_EQ(config_tls_policy(cfg, "lab.example"), CFG_DLV_TLS_NONE);
	ASSERT_EQ(config_tls_policy(cfg, "mx.lab.example"),
	    CFG_DLV_TLS_VERIFY);
	config_unref(cfg);

	/* An empty list and an array [ ] are fine. */
	cfg = load_ok(MINIMAL "delivery = { tls_policies = ( ); };");
	ASSERT_EQ(cfg->delivery.ntls_policies, 0);
	ASSERT_EQ(config_tls_policy(cfg, "example.com"),
	    CFG_DLV_TLS_OPPORTUNISTIC);
	config_unref(cfg);
	cfg = load_ok(MINIMAL "delivery = { tls_policies = [ ]; };");
	ASSERT_EQ(cfg->delivery.ntls_policies, 0);
	config_unref(cfg);
	ca_remove();
}

TEST(delivery_tls_policy_errors)
{
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"example.com\";\n    tls = \"strict\"; } ); };",
	    "t.conf:4: 'tls' must be one of \"none\", \"opportunistic\", "
	    "\"required\" or \"verify\"");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"example.com\"; tls = 2; } ); };",
	    "t.conf:3: 'tls' must be one of");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"example.com\";\n    tls = \"none\";\n"
	    "    port = 25; } ); };",
	    "t.conf:5: unknown setting 'port' in 'delivery.tls_policies'");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"example.com\"; tls = \"none\"; },\n"
	    "  { domain = \"example.org\"; tls = \"none\"; },\n"
	    "  { domain = \"Example.Com\"; tls = \"required\"; } ); };",
	    "t.conf:5: tls policy for 'example.com' is defined twice");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \".example.com\"; tls = \"none\"; },\n"
	    "  { domain = \".EXAMPLE.com\"; tls = \"none\"; } ); };",
	    "t.conf:4: tls policy for '.example.com' is defined twice");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { tls = \"none\"; } ); };",
	    "t.conf:3: tls policy is missing 'domain'");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \".example.com\"; } ); };",
	    "t.conf:3: tls policy for '.example.com' is missing 'tls'");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"\"; tls = \"none\"; } ); };",
	    "t.conf:3: 'domain' must not be empty");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { tls = \"none\";\n    domain = \".\"; } ); };",
	    "t.conf:4: tls policy domain '.' is not a domain name or .domain");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"..example.com\"; tls = \"none\"; } ); };",
	    "tls policy domain '..example.com' is not a domain name");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"example.com.\"; tls = \"none\"; } ); };",
	    "tls policy domain 'example.com.' is not a domain name");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = \"*.example.com\"; tls = \"none\"; } ); };",
	    "tls policy domain '*.example.com' is not a domain name");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  { domain = 1; tls = \"none\"; } ); };",
	    "t.conf:3: 'domain' must be a string");
	load_fail(MINIMAL "delivery = { tls_policies = (\n"
	    "  \"example.com\" ); };",
	    "t.conf:3: 'tls_policies' entries must be groups { ... }");
	load_fail(MINIMAL "delivery = {\n  tls_policies = \"example.com\"; };",
	    "t.conf:3: 'tls_policies' must be a list");
	/* Policies are per delivery, not a top-level or listener key. */
	load_fail(MINIMAL "tls_policies = ( );",
	    "unknown setting 'tls_policies'");
	load_fail(MINIMAL "delivery = {\n  ca_file = \"\"; };",
	    "t.conf:3: 'ca_file' must not be empty");
	load_fail(MINIMAL "delivery = { ca_file = 0; };",
	    "'ca_file' must be a string");
}

TEST(delivery_tls_policies_limit)
{
	struct relay_config *cfg;
	struct buf b;
	int i;

	/* 10000 entries load (and the duplicate check stays quick)... */
	buf_init(&b);
	buf_puts(&b, MINIMAL "delivery = { tls_policies = (\n");
	for (i = 0; i < 10000; i++)
		buf_printf(&b, "%s{ domain = \"d%d.example\"; tls = \"%s\"; }\n",
		    i == 0 ? "" : ",", i, i % 2 ? "none" : "required");
	buf_puts(&b, "); };\n");
	cfg = load_ok(b.data);
	ASSERT_EQ(cfg->delivery.ntls_policies, 10000);
	ASSERT_EQ(config_tls_policy(cfg, "d9999.example"), CFG_DLV_TLS_NONE);
	ASSERT_EQ(config_tls_policy(cfg, "d0.example"), CFG_DLV_TLS_REQUIRED);
	config_unref(cfg);

	/* ... 10001 do not; the error names the list's line. */
	b.len -= strlen("); };\n");
	buf_puts(&b, ",{ domain = \"one.more\"; tls = \"none\"; }); };\n");
	load_fail(b.data, "t.conf:2: 'tls_policies' may hold at most 10000 "
	    "entries");
	buf_free(&b);
}

TEST(delivery_ca_file)
{
	char text[1024];
	struct relay_config *cfg;

	/* Not needed without "verify": a missing file is no error. */
	cfg = load_ok(MINIMAL "delivery = { ca_file = \"/nonexistent/ca.pem\";"
	    "\n  tls = \"required\";\n"
	    "  tls_policies = ( { domain = \"a.example\"; tls = \"none\"; } );"
	    " };");
	ASSERT_STR_EQ(cfg->delivery.ca_file, "/nonexistent/ca.pem");
	config_unref(cfg);

	/* A verify policy with a missing file names ca_file's line... */
	load_fail(MINIMAL "delivery = {\n"
	    "  ca_file = \"/nonexistent/ca.pem\";\n"
	    "  tls_policies = (\n"
	    "    { domain = \"a.example\"; tls = \"none\"; },\n"
	    "    { domain = \"b.example\"; tls = \"verify\"; } ); };",
	    "t.conf:3: ca_file '/nonexistent/ca.pem' cannot be read (No such "
	    "file or directory); tls \"verify\" needs a CA bundle");
	/* ... wherever it stands, and so does delivery.tls = "verify". */
	load_fail(MINIMAL "delivery = {\n  tls = \"verify\";\n\n"
	    "  ca_file = \"/nonexistent/ca.pem\"; };",
	    "t.conf:5: ca_file '/nonexistent/ca.pem' cannot be read (No such "
	    "file or directory)");
	load_fail(MINIMAL "delivery = { tls = \"verify\";\n"
	    "  ca_file = \"config\"; };",
	    "t.conf:3: ca_file 'config' cannot be read (not a regular file)");

	ca_make();
	snprintf(text, sizeof text, MINIMAL "delivery = {\n"
	    "  tls_policies = ( { domain = \"b.example\"; tls = \"verify\"; }"
	    " );\n  ca_file = \"%s\"; };", ca_path);
	cfg = load_ok(text);
	ASSERT_EQ(config_tls_policy(cfg, "b.example"), CFG_DLV_TLS_VERIFY);
	config_unref(cfg);
	ca_remove();
}

TEST(delivery_retry_schedule)
{
	load_fail(MINIMAL "delivery = { retry_schedule = [\n"
	    "  300,\n  600,\n  500,\n  900 ]; };",
	    "t.conf:5: retry_schedule entry 3 (500) is shorter than the one "
	    "before it (600); the delays must not decrease");
	/* min_retry may come after the list and still applies. */
	load_fail(MINIMAL "delivery = {\n  retry_schedule = [ 60,\n 30 ];\n"
	    "  min_retry = 45; };",
	    "t.conf:4: retry_schedule entry 2 (30) is shorter than min_retry "
	    "(45)");
	load_fail(MINIMAL "delivery = {\n  retry_schedule = [ 59 ]; };",
	    "t.conf:3: retry_schedule entry 1 (59) is shorter than min_retry "
	    "(60)");
	load_fail(MINIMAL "delivery = {\n  retry_schedule = [ ]; };",
	    "t.conf:3: 'retry_schedule' must hold 1 to 32 delays");
	load_fail(MINIMAL "delivery = { retry_schedule = [ 60, 60, 60, 60, "
	    "60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, "
	    "60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60 ]; };",
	    "'retry_schedule' must hold 1 to 32 delays");
	load_fail(MINIMAL "delivery = { retry_schedule = ( 60, \"120\" ); };",
	    "'retry_schedule' entries must be numbers of seconds");
	load_fail(MINIMAL "delivery = { retry_schedule = [ 2592001 ]; };",
	    "'retry_schedule' entries must be between 1 and 2592000 seconds");
	load_fail(MINIMAL "delivery = { retry_schedule = 300; };",
	    "'retry_schedule' must be a list");

	struct relay_config *cfg = load_ok(MINIMAL
	    "delivery = { min_retry = 1; retry_schedule = [ 1.4 ]; };");
	ASSERT_EQ(cfg->delivery.nretry, 1);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[0], 1);
	config_unref(cfg);
	cfg = load_ok(MINIMAL "delivery = { retry_schedule = [ 60, 60, 60, 60, "
	    "60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, "
	    "60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 86400 ]; };");
	ASSERT_EQ(cfg->delivery.nretry, 32);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[31], 86400);
	config_unref(cfg);
}

TEST(delivery_timeouts)
{
	load_fail(MINIMAL "delivery = { timeouts = {\n  connect = 0; }; };",
	    "t.conf:3: 'connect' must be between 0.001 and 3600 seconds");
	load_fail(MINIMAL "delivery = { timeouts = { dot = 3600.5; }; };",
	    "'dot' must be between 0.001 and 3600 seconds");
	load_fail(MINIMAL "delivery = { timeouts = { quit = -1; }; };",
	    "'quit' must be between");
	load_fail(MINIMAL "delivery = { timeouts = { rset = \"60\"; }; };",
	    "'rset' must be a number of seconds");
	load_fail(MINIMAL "delivery = { timeouts = {\n  command = 60; }; };",
	    "t.conf:3: unknown setting 'command' in 'delivery.timeouts'");
	load_fail(MINIMAL "timeouts = { connect = 60; };",
	    "unknown setting 'connect' in 'timeouts'");
	load_fail(MINIMAL "delivery = { timeouts = 30; };",
	    "'timeouts' must be a group");
}

TEST(syntax_error_line)
{
	load_fail("spool_dir = \"/x\";\n\nlimits = { max_errors = ; };\n",
	    "t.conf:3: syntax error");
	load_fail("a = 1;\na = 2;\n", "t.conf:2: duplicate setting name");
}

TEST(file_errors)
{
	struct relay_config *cfg = (void *)1;
	char err[256];
	int rc;

	rc = config_load("/nonexistent/relay.conf", &cfg, err, sizeof err);
	ASSERT_EQ(rc, -ENOENT);
	ASSERT(cfg == NULL);
	ASSERT_STR_EQ(err, "/nonexistent/relay.conf: No such file or "
	    "directory");
	rc = config_load("config", &cfg, err, sizeof err);
	ASSERT_EQ(rc, -EISDIR);
	/* A NULL error buffer is allowed. */
	ASSERT_EQ(config_load_string("x = ;", "n", &cfg, NULL, 0),
	    RELAY_ECONFIG);
}

TEST(file_line_numbers_and_include)
{
	char dir[] = "/tmp/test_config.XXXXXX", path[256], inc[256], err[256];
	struct relay_config *cfg = NULL;
	FILE *f;

	ASSERT(mkdtemp(dir) != NULL);
	snprintf(path, sizeof path, "%s/main.conf", dir);
	snprintf(inc, sizeof inc, "%s/limits.conf", dir);
	ASSERT((f = fopen(inc, "w")) != NULL);
	fputs("limits = {\n  max_errors = 3;\n};\n", f);
	fclose(f);
	ASSERT((f = fopen(path, "w")) != NULL);
	fputs(MINIMAL "@include \"limits.conf\"\n", f);
	fclose(f);
	ASSERT_EQ(config_load(path, &cfg, err, sizeof err), 0);
	ASSERT_STR_EQ(cfg->path, path);
	ASSERT_EQ(cfg->limits.max_errors, 3);
	config_unref(cfg);

	/* An error inside the included file names that file. */
	ASSERT((f = fopen(inc, "w")) != NULL);
	fputs("limits = {\n  max_errors = 0;\n};\n", f);
	fclose(f);
	ASSERT_EQ(config_load(path, &cfg, err, sizeof err), RELAY_ECONFIG);
	ASSERT(strstr(err, "limits.conf:2: 'max_errors' must be between") !=
	    NULL);

	/* An error in the main file names it with its line. */
	ASSERT((f = fopen(path, "w")) != NULL);
	fputs(MINIMAL "\nbogus = 1;\n", f);
	fclose(f);
	ASSERT_EQ(config_load(path, &cfg, err, sizeof err), RELAY_ECONFIG);
	ASSERT(strncmp(err, path, strlen(path)) == 0);
	ASSERT_STR_EQ(err + strlen(path), ":3: unknown setting 'bogus'");
	unlink(path);
	snprintf(inc, sizeof inc, "%s/limits.conf", dir);
	unlink(inc);
	rmdir(dir);
}

TEST(ref_unref)
{
	struct relay_config *cfg = load_ok(MINIMAL);

	ASSERT(config_ref(cfg) == cfg);
	ASSERT_EQ(cfg->refs, 2);
	config_unref(cfg);
	ASSERT_EQ(cfg->refs, 1);
	config_unref(cfg);	/* frees; ASan/valgrind catch leaks or reuse */
	config_unref(NULL);
	ASSERT(config_ref(NULL) == NULL);
}

TEST(example_file_loads)
{
	struct relay_config *cfg = NULL;
	char err[512] = "";
	int rc;

	rc = config_load("config/relay.conf.example", &cfg, err, sizeof err);
	if (rc != 0)
		fprintf(stderr, "%s\n", err);
	ASSERT_EQ(rc, 0);
	ASSERT_STR_EQ(cfg->hostname, "relay.example.com");
	ASSERT_STR_EQ(cfg->spool_dir, "/var/spool/relay");
	ASSERT_EQ(cfg->nlisteners, 2);
	ASSERT_STR_EQ(cfg->listeners[0].address, "0.0.0.0");
	ASSERT_EQ(cfg->listeners[0].port, 587);
	ASSERT_EQ(cfg->listeners[1].port, 465);
	ASSERT_EQ(cfg->listeners[1].tls, CFG_TLS_IMPLICIT);
	ASSERT_EQ(cfg->nusers, 1);
	ASSERT(match4(cfg, "127.0.0.1"));
	ASSERT(match6(cfg, "::1"));
	ASSERT(!match4(cfg, "192.0.2.1"));
	ASSERT_EQ(cfg->dns.nservers, 2);
	ASSERT_STR_EQ(cfg->dns.servers[0], "127.0.0.1:53");
	ASSERT_STR_EQ(cfg->dns.servers[1], "[::1]:53");
	ASSERT_EQ(cfg->dns.timeout_ms, 5000);
	ASSERT_EQ(cfg->dns.max_mx_ttl_s, 3600);
	ASSERT(cfg->delivery.enabled);
	ASSERT_EQ(cfg->delivery.port, 25);
	ASSERT(!cfg->delivery.has_source);
	ASSERT(cfg->delivery.helo == NULL);
	ASSERT_EQ(cfg->delivery.tls, CFG_DLV_TLS_OPPORTUNISTIC);
	ASSERT_STR_EQ(cfg->delivery.ca_file,
	    "/etc/ssl/certs/ca-certificates.crt");
	ASSERT_EQ(cfg->delivery.ntls_policies, 2);
	ASSERT_EQ(config_tls_policy(cfg, "example.com"), CFG_DLV_TLS_REQUIRED);
	ASSERT_EQ(config_tls_policy(cfg, "mx.example.org"), CFG_DLV_TLS_NONE);
	ASSERT_EQ(config_tls_policy(cfg, "example.org"),
	    CFG_DLV_TLS_OPPORTUNISTIC);
	ASSERT_EQ(cfg->delivery.max_connections_per_domain, 20);
	ASSERT_EQ(cfg->delivery.nretry, 5);
	ASSERT_EQ(cfg->delivery.retry_schedule_s[4], 4000);
	ASSERT_EQ(cfg->delivery.max_queue_lifetime_s, 432000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_DOT], 600000);
	ASSERT_EQ(cfg->delivery.timeout_ms[CFG_PHASE_QUIT], 60000);
	ASSERT_EQ(cfg->reply_rules.n, 2);
	ASSERT_STR_EQ(cfg->reply_rules.v[0].name, "gmail-rate-suspend");
	ASSERT_EQ(cfg->reply_rules.v[0].suspend_s, 7200);
	ASSERT_EQ(cfg->reply_rules.v[1].phases, 1u << CFG_PHASE_RCPT);
	ASSERT_STR_EQ(cfg->reply_rules.v[1].text,
	    "sending rate exceeded|\\bRL\\d{3}\\b");
	ASSERT(cfg->reply_rules.v[1].re != NULL);
	ASSERT_EQ(cfg->shaping.dflt.max_conn, 20);
	ASSERT_NEAR(cfg->shaping.dflt.conn_rate, 100.0 / 60);
	ASSERT_EQ(cfg->shaping.nproviders, 7);
	ASSERT_STR_EQ(cfg->shaping.providers[1].name, "yahoo");
	ASSERT_NEAR(cfg->shaping.providers[1].shape.rate, 10.0);
	ASSERT_EQ(cfg->shaping.providers[1].shape.max_msgs_per_conn, 20);
	ASSERT_STR_EQ(cfg->shaping.providers[6].name, "example-hosting");
	ASSERT_EQ(cfg->shaping.ndomains, 1);
	ASSERT(!cfg->shaping.domains[0].rollup);
	config_unref(cfg);
}

TEST(builtin_default_loads)
{
	struct relay_config *cfg = NULL;
	const struct cfg_user *u;
	char err[512] = "";
	int rc;

	rc = config_load_string(config_default_text(), "(built-in)", &cfg,
	    err, sizeof err);
	if (rc != 0)
		fprintf(stderr, "%s\n", err);
	ASSERT_EQ(rc, 0);
	ASSERT_STR_EQ(cfg->path, "(built-in)");
	ASSERT_STR_EQ(cfg->spool_dir, "var/spool");
	ASSERT_STR_EQ(cfg->control_socket, "var/relayd.sock");
	ASSERT_EQ(cfg->control_mode, 0600);
	ASSERT_STR_EQ(cfg->tls_cert, "var/tls/cert.pem");
	ASSERT_STR_EQ(cfg->tls_key, "var/tls/key.pem");
	ASSERT(cfg->tls_generate);
	ASSERT_EQ(cfg->nlisteners, 2);
	ASSERT_STR_EQ(cfg->listeners[0].address, "127.0.0.1");
	ASSERT_EQ(cfg->listeners[0].port, 587);
	ASSERT_EQ(cfg->listeners[0].tls, CFG_TLS_STARTTLS);
	ASSERT(cfg->listeners[0].auth_required);
	ASSERT_STR_EQ(cfg->listeners[1].address, "127.0.0.1");
	ASSERT_EQ(cfg->listeners[1].port, 465);
	ASSERT_EQ(cfg->listeners[1].tls, CFG_TLS_IMPLICIT);
	ASSERT(cfg->listeners[1].auth_required);
	ASSERT_EQ(cfg->nrelay_nets, 0);
	ASSERT((u = config_user_find(cfg, "demo")) != NULL);
	ASSERT_STR_EQ(u->hash, "$6$relaydemo0123456$fAodBwV8Ah.Ty58qWnt8Xdkh"
	    "ZAtYSEZExmjaOnNYaIDuSx6lIqXP6bxP//vqNGxJL.YrrzFShRkHcaoFr/pvh.");
	ASSERT_EQ(cfg->shaping.nproviders, 6);
	config_unref(cfg);
}

TEST(reply_rules)
{
	struct relay_config *cfg;
	const struct cfg_reply_rule *r;

	cfg = load_ok(MINIMAL);
	ASSERT_EQ(cfg->reply_rules.n, 0);
	config_unref(cfg);

	cfg = load_ok(MINIMAL "reply_rules = (\n"
	    "  { name = \"gmail-rate\"; code = \"421\"; enhanced = \"4.7.28\";\n"
	    "    phase = \"any\"; text = \"unusual\\\\s+rate\";\n"
	    "    class = \"suspend\"; suspend = 3600; },\n"
	    "  { code = \"45X\"; phase = [ \"rcpt\", \"dot\" ];\n"
	    "    class = \"greylist\"; },\n"
	    "  { enhanced = \"4.7.\"; phase = \"banner\"; "
	    "class = \"throttle\"; },\n"
	    "  { text = \"\\\\[TS03\\\\]\"; class = \"conn-fail\"; }\n"
	    ");");
	ASSERT_EQ(cfg->reply_rules.n, 4);
	r = &cfg->reply_rules.v[0];
	ASSERT_STR_EQ(r->name, "gmail-rate");
	ASSERT_STR_EQ(r->code, "421");
	ASSERT_STR_EQ(r->enh, "4.7.28");
	ASSERT_EQ(r->phases, CFG_PHASE_ANY);
	ASSERT_STR_EQ(r->text, "unusual\\s+rate");
	ASSERT(r->re != NULL);
	ASSERT_EQ(r->cls, CFG_CLASS_SUSPEND);
	ASSERT_EQ(r->suspend_s, 3600);
	r = &cfg->reply_rules.v[1];
	/* Default names follow the position; "X" is stored lower-case. */
	ASSERT_STR_EQ(r->name, "rule-2");
	ASSERT_STR_EQ(r->code, "45x");
	ASSERT(r->enh == NULL);
	ASSERT(r->text == NULL && r->re == NULL);
	ASSERT_EQ(r->phases, (1u << CFG_PHASE_RCPT) | (1u << CFG_PHASE_DOT));
	ASSERT_EQ(r->cls, CFG_CLASS_GREYLIST);
	ASSERT_EQ(r->suspend_s, 0);
	r = &cfg->reply_rules.v[2];
	ASSERT_STR_EQ(r->enh, "4.7.");
	ASSERT_EQ(r->phases, 1u << CFG_PHASE_BANNER);
	ASSERT_EQ(r->cls, CFG_CLASS_THROTTLE);
	r = &cfg->reply_rules.v[3];
	ASSERT_STR_EQ(r->text, "\\[TS03\\]");
	ASSERT_EQ(r->cls, CFG_CLASS_CONN_FAIL);
	config_unref(cfg);
}

TEST(reply_rule_errors)
{
	/* A bad regex names the text's line with PCRE2's words and offset. */
	load_fail(MINIMAL "reply_rules = (\n  { name = \"bad\";\n"
	    "    text = \"unusual (rate\";\n    class = \"throttle\"; } );",
	    "t.conf:4: reply rule 'bad': 'text' is not a valid regex: "
	    "missing closing parenthesis at offset 13");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\"; "
	    "class = \"ok\"; } );",
	    "t.conf:3: 'class' must be one of \"throttle\", \"suspend\"");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\"; "
	    "class = \"slow\"; } );",
	    "t.conf:3: 'class' must be one of");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\"; } );",
	    "t.conf:3: reply rule 'rule-1' is missing 'class'");
	load_fail(MINIMAL "reply_rules = (\n  { name = \"all\"; phase = \"rcpt\";\n"
	    "    class = \"throttle\"; } );",
	    "t.conf:3: reply rule 'all' would match every failure");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"4x1\"; "
	    "class = \"throttle\"; } );",
	    "t.conf:3: reply rule 'rule-1': 'code' must be a 4xx or 5xx reply "
	    "code such as \"421\", or a pattern such as \"45x\" or \"4xx\", not "
	    "'4x1'");
	load_fail(MINIMAL "reply_rules = ( { code = \"6xx\"; "
	    "class = \"throttle\"; } );",
	    "'code' must be a 4xx or 5xx");
	load_fail(MINIMAL "reply_rules = ( { code = \"42\"; "
	    "class = \"throttle\"; } );",
	    "'code' must be a 4xx or 5xx");
	load_fail(MINIMAL "reply_rules = ( { code = \"421 \"; "
	    "class = \"throttle\"; } );",
	    "'code' must be a 4xx or 5xx");
	load_fail(MINIMAL "reply_rules = ( { code = 421; "
	    "class = \"throttle\"; } );",
	    "'code' must be a string");
	load_fail(MINIMAL "reply_rules = (\n  { enhanced = \"4.7\"; "
	    "class = \"throttle\"; } );",
	    "t.conf:3: reply rule 'rule-1': 'enhanced' must be a 4.x.x or "
	    "5.x.x status such as \"4.7.28\", or a prefix ending in a dot such "
	    "as \"4.7.\", not '4.7'");
	load_fail(MINIMAL "reply_rules = ( { enhanced = \"4.7.28.1\"; "
	    "class = \"throttle\"; } );",
	    "'enhanced' must be");
	load_fail(MINIMAL "reply_rules = ( { enhanced = \"4..1\"; "
	    "class = \"throttle\"; } );",
	    "'enhanced' must be");
	load_fail(MINIMAL "reply_rules = ( { enhanced = \"2.0.0\"; "
	    "class = \"throttle\"; } );",
	    "'enhanced' must be");
	load_fail(MINIMAL "reply_rules = ( { enhanced = \"4.1234.1\"; "
	    "class = \"throttle\"; } );",
	    "'enhanced' must be");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\";\n"
	    "    enhanced = \"5.7.1\"; class = \"throttle\"; } );",
	    "t.conf:4: reply rule 'rule-1' can never match: code 421 with "
	    "enhanced status 5.7.1");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\"; "
	    "class = \"throttle\";\n"
	    "    suspend = 600; } );",
	    "t.conf:4: reply rule 'rule-1': 'suspend' is only for class "
	    "\"suspend\"");
	load_fail(MINIMAL "reply_rules = ( { code = \"421\"; class = \"suspend\";\n"
	    "    suspend = 0; } );",
	    "t.conf:3: 'suspend' must be between 1 and 86400 seconds");
	load_fail(MINIMAL "reply_rules = ( { code = \"421\"; class = \"suspend\";\n"
	    "    suspend = 86401; } );",
	    "t.conf:3: 'suspend' must be between 1 and 86400 seconds");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\"; "
	    "class = \"throttle\";\n"
	    "    phase = \"helo\"; } );",
	    "t.conf:4: 'phase' must be \"any\" or one of \"connect\"");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\"; "
	    "class = \"throttle\";\n"
	    "    phase = [ \"rcpt\",\n      \"dots\" ]; } );",
	    "t.conf:5: 'phase' must be \"any\" or one of");
	load_fail(MINIMAL "reply_rules = ( { code = \"421\"; "
	    "class = \"throttle\";\n"
	    "    phase = [ ]; } );",
	    "t.conf:3: 'phase' must be a phase name or a non-empty array");
	load_fail(MINIMAL "reply_rules = ( { code = \"421\"; "
	    "class = \"throttle\";\n"
	    "    phase = 3; } );",
	    "t.conf:3: 'phase' must be a phase name or a non-empty array");
	load_fail(MINIMAL "reply_rules = (\n  { code = \"421\"; "
	    "class = \"throttle\";\n"
	    "    action = \"bounce\"; } );",
	    "t.conf:4: unknown setting 'action' in 'reply_rules'");
	load_fail(MINIMAL "reply_rules = (\n  { name = \"a\"; code = \"421\"; "
	    "class = \"throttle\"; },\n"
	    "  { name = \"a\"; code = \"451\"; class = \"throttle\"; } );",
	    "t.conf:4: reply rule name 'a' is used twice");
	load_fail(MINIMAL "reply_rules = (\n  { name = \"my rule\"; code = \"421\";"
	    " class = \"throttle\"; } );",
	    "t.conf:3: reply rule name 'my rule' must not contain spaces");
	load_fail(MINIMAL "reply_rules = (\n  \"421\" );",
	    "t.conf:3: 'reply_rules' entries must be groups { ... }");
	load_fail(MINIMAL "reply_rules = {\n  code = \"421\"; };",
	    "t.conf:2: 'reply_rules' must be a list");
	load_fail(MINIMAL "reply_rules = ( { text = \"\"; "
	    "class = \"throttle\"; } );",
	    "'text' must not be empty");
	/* A pattern must be valid UTF-8, and \C is refused. */
	load_fail(MINIMAL "reply_rules = ( { text = \"a\\xff\"; "
	    "class = \"throttle\"; } );",
	    "'text' is not a valid regex: UTF-8 error");
	load_fail(MINIMAL "reply_rules = ( { text = \"a\\\\C\"; "
	    "class = \"throttle\"; } );",
	    "'text' is not a valid regex");
	/* Rules are a top-level list, not part of delivery. */
	load_fail(MINIMAL "delivery = { reply_rules = ( ); };",
	    "unknown setting 'reply_rules' in 'delivery'");
}

TEST(reply_rules_limit)
{
	struct buf b;
	int i;

	buf_init(&b);
	buf_puts(&b, MINIMAL "reply_rules = (\n");
	for (i = 0; i < 10001; i++)
		buf_printf(&b, "%s{ code = \"421\"; class = \"throttle\"; }\n",
		    i == 0 ? "" : ",");
	buf_puts(&b, ");\n");
	load_fail(b.data, "t.conf:2: 'reply_rules' may hold at most 10000 "
	    "rules");
	buf_free(&b);
}

TEST(shaping_defaults)
{
	struct relay_config *cfg = load_ok(MINIMAL);
	const struct cfg_shape *df = &cfg->shaping.dflt;
	const struct cfg_provider *pv;
	const char *site = "x";
	struct cfg_shape sh;
	bool rollup = false;

	/* shaping.default: delivery's limits and the built-in rates. */
	ASSERT_EQ(df->max_conn, 20);
	ASSERT_EQ(df->min_conn, 1);
	ASSERT_EQ(df->max_msgs_per_conn, 100);
	ASSERT_EQ(df->max_rcpts_per_txn, 100);
	ASSERT_NEAR(df->rate, 100.0);
	ASSERT_NEAR(df->min_rate, 1.0 / 60);
	ASSERT_NEAR(df->conn_rate, 100.0 / 60);
	ASSERT_EQ(df->tls, -1);
	ASSERT_EQ(df->set, CFG_SHAPE_ALL & ~CFG_SHAPE_TLS);
	ASSERT(cfg->shaping.builtin_providers);
	ASSERT_EQ(cfg->shaping.ndomains, 0);

	/* The built-in providers, in order. */
	ASSERT_EQ(cfg->shaping.nproviders, 6);
	ASSERT_STR_EQ(cfg->shaping.providers[0].name, "google");
	ASSERT_STR_EQ(cfg->shaping.providers[1].name, "yahoo");
	ASSERT_STR_EQ(cfg->shaping.providers[2].name, "microsoft");
	ASSERT_STR_EQ(cfg->shaping.providers[3].name, "comcast");
	ASSERT_STR_EQ(cfg->shaping.providers[4].name, "apple");
	ASSERT_STR_EQ(cfg->shaping.providers[5].name, "orange");
	pv = &cfg->shaping.providers[0];
	ASSERT_EQ(pv->nsuffixes, 3);
	ASSERT_STR_EQ(pv->suffixes[0], ".google.com");
	ASSERT_STR_EQ(pv->suffixes[1], ".googlemail.com");
	ASSERT_EQ(pv->shape.set, CFG_SHAPE_MAX_CONN | CFG_SHAPE_MSGS |
	    CFG_SHAPE_TLS);
	ASSERT_EQ(pv->shape.max_conn, 5);
	ASSERT_EQ(pv->shape.max_msgs_per_conn, 50);
	ASSERT_EQ(pv->shape.tls, CFG_DLV_TLS_REQUIRED);
	ASSERT_EQ(cfg->shaping.providers[1].shape.set, CFG_SHAPE_MSGS);
	ASSERT_EQ(cfg->shaping.providers[1].shape.max_msgs_per_conn, 20);
	ASSERT_EQ(cfg->shaping.providers[1].shape.tls, -1);
	ASSERT_EQ(cfg->shaping.providers[3].shape.max_conn, 25);
	ASSERT_EQ(cfg->shaping.providers[3].shape.max_msgs_per_conn, 1000);
	ASSERT_EQ(cfg->shaping.providers[4].shape.max_msgs_per_conn, 5);
	ASSERT_EQ(cfg->shaping.providers[5].shape.max_conn, 2);
	ASSERT_EQ(cfg->shaping.providers[5].shape.tls, CFG_DLV_TLS_REQUIRED);

	/* Gmail: the provider's fields over the default's. */
	config_shape_for(cfg, "gmail.com",
	    "alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com",
	    &sh, &rollup, &site);
	ASSERT_STR_EQ(site, "google");
	ASSERT(rollup);
	ASSERT_EQ(sh.set, CFG_SHAPE_ALL);
	ASSERT_EQ(sh.max_conn, 5);
	ASSERT_EQ(sh.min_conn, 1);
	ASSERT_EQ(sh.max_msgs_per_conn, 50);
	ASSERT_EQ(sh.max_rcpts_per_txn, 100);
	ASSERT_NEAR(sh.rate, 100.0);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_REQUIRED);
	/* Yahoo sets no tls: delivery.tls. */
	config_shape_for(cfg, "yahoo.com", "mta5.am0.yahoodns.net", &sh, NULL,
	    &site);
	ASSERT_STR_EQ(site, "yahoo");
	ASSERT_EQ(sh.max_conn, 20);
	ASSERT_EQ(sh.max_msgs_per_conn, 20);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_OPPORTUNISTIC);
	/* Nobody's: the default, no site name. */
	config_shape_for(cfg, "example.org", "mx.example.org", &sh, &rollup,
	    &site);
	ASSERT(site == NULL);
	ASSERT(rollup);
	ASSERT_EQ(sh.max_conn, 20);
	ASSERT_EQ(sh.max_msgs_per_conn, 100);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_OPPORTUNISTIC);
	config_shape_for(cfg, NULL, NULL, &sh, NULL, NULL);
	ASSERT_EQ(sh.max_conn, 20);
	config_unref(cfg);

	/* Unset default fields follow delivery; a default floor follows a
	   lower ceiling down. */
	cfg = load_ok(MINIMAL "delivery = { max_connections_per_domain = 7;\n"
	    "  max_messages_per_connection = 9;\n"
	    "  max_recipients_per_transaction = 11; tls = \"required\"; };\n"
	    "shaping = { default = { rate = \"30/h\"; }; };\n");
	ASSERT_EQ(cfg->shaping.dflt.max_conn, 7);
	ASSERT_EQ(cfg->shaping.dflt.max_msgs_per_conn, 9);
	ASSERT_EQ(cfg->shaping.dflt.max_rcpts_per_txn, 11);
	ASSERT_NEAR(cfg->shaping.dflt.rate, 30.0 / 3600);
	ASSERT_NEAR(cfg->shaping.dflt.min_rate, 30.0 / 3600);
	config_shape_for(cfg, "example.org", "mx.example.org", &sh, NULL,
	    NULL);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_REQUIRED);
	config_unref(cfg);

	/* The default's own keys win over delivery's. */
	cfg = load_ok(MINIMAL "shaping = { default = { max_connections = 3;\n"
	    "  min_connections = 2; max_messages_per_connection = 4;\n"
	    "  max_recipients_per_transaction = 5; rate = \"0.5/s\";\n"
	    "  min_rate = \"6/min\"; connection_rate = \"12/h\";\n"
	    "  tls = \"none\"; }; };\n");
	df = &cfg->shaping.dflt;
	ASSERT_EQ(df->max_conn, 3);
	ASSERT_EQ(df->min_conn, 2);
	ASSERT_EQ(df->max_msgs_per_conn, 4);
	ASSERT_EQ(df->max_rcpts_per_txn, 5);
	ASSERT_NEAR(df->rate, 0.5);
	ASSERT_NEAR(df->min_rate, 0.1);
	ASSERT_NEAR(df->conn_rate, 12.0 / 3600);
	ASSERT_EQ(df->tls, CFG_DLV_TLS_NONE);
	ASSERT_EQ(df->set, CFG_SHAPE_ALL);
	/* Orange's 2 connections are below the default floor of 2: fine. */
	config_shape_for(cfg, "orange.fr", "smtp-in.orange.fr", &sh, NULL,
	    NULL);
	ASSERT_EQ(sh.max_conn, 2);
	ASSERT_EQ(sh.min_conn, 2);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_REQUIRED);
	config_shape_for(cfg, "example.org", NULL, &sh, NULL, NULL);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_NONE);
	config_unref(cfg);
}

TEST(shaping_provider_merge)
{
	struct relay_config *cfg;
	const struct cfg_provider *pv;
	struct cfg_shape sh;
	const char *site;

	cfg = load_ok(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"google\"; max_connections = 8; rate = \"2/s\"; },\n"
	    "  { name = \"yahoo\"; mx_suffixes = [ \".YahooDNS.net\",\n"
	    "      \"mx.aol.example\" ]; tls = \"required\"; },\n"
	    "  { name = \"apple\"; mx_suffixes = [ ]; },\n"
	    "  { name = \"acme\"; mx_suffixes = [ \".mx.acme.example\" ];\n"
	    "    min_connections = 2; max_connections = 4; }\n"
	    "); };\n");
	ASSERT_EQ(cfg->shaping.nproviders, 7);
	/* google: two fields replaced, the rest built in. */
	pv = &cfg->shaping.providers[0];
	ASSERT_STR_EQ(pv->name, "google");
	ASSERT_EQ(pv->nsuffixes, 3);
	ASSERT_EQ(pv->shape.max_conn, 8);
	ASSERT_NEAR(pv->shape.rate, 2.0);
	ASSERT_EQ(pv->shape.max_msgs_per_conn, 50);
	ASSERT_EQ(pv->shape.tls, CFG_DLV_TLS_REQUIRED);
	ASSERT_EQ(pv->shape.set, CFG_SHAPE_MAX_CONN | CFG_SHAPE_MSGS |
	    CFG_SHAPE_TLS | CFG_SHAPE_RATE);
	/* yahoo: suffixes replaced (lower-cased), the built-in 20 kept. */
	pv = &cfg->shaping.providers[1];
	ASSERT_EQ(pv->nsuffixes, 2);
	ASSERT_STR_EQ(pv->suffixes[0], ".yahoodns.net");
	ASSERT_STR_EQ(pv->suffixes[1], "mx.aol.example");
	ASSERT_EQ(pv->shape.max_msgs_per_conn, 20);
	ASSERT_EQ(pv->shape.tls, CFG_DLV_TLS_REQUIRED);
	/* apple: disabled by an empty suffix list. */
	ASSERT_EQ(cfg->shaping.providers[4].nsuffixes, 0);
	ASSERT(config_shape_provider(cfg, "mx01.mail.icloud.com") == NULL);
	/* acme: added after the built-ins. */
	pv = &cfg->shaping.providers[6];
	ASSERT_STR_EQ(pv->name, "acme");
	ASSERT_EQ(pv->shape.set, CFG_SHAPE_MIN_CONN | CFG_SHAPE_MAX_CONN);
	ASSERT_EQ(pv->shape.tls, -1);

	config_shape_for(cfg, "gmail.com", "aspmx.l.google.com", &sh, NULL,
	    &site);
	ASSERT_STR_EQ(site, "google");
	ASSERT_EQ(sh.max_conn, 8);
	ASSERT_EQ(sh.max_msgs_per_conn, 50);
	ASSERT_NEAR(sh.rate, 2.0);
	config_shape_for(cfg, "acme.example", "b.mx.acme.example", &sh, NULL,
	    &site);
	ASSERT_STR_EQ(site, "acme");
	ASSERT_EQ(sh.max_conn, 4);
	ASSERT_EQ(sh.min_conn, 2);
	ASSERT_EQ(sh.max_msgs_per_conn, 100);
	config_unref(cfg);

	/* builtin_providers = false: only the file's. */
	cfg = load_ok(MINIMAL "shaping = { builtin_providers = false;\n"
	    "  providers = ( { name = \"google\";\n"
	    "    mx_suffixes = [ \".google.com\" ]; } ); };\n");
	ASSERT(!cfg->shaping.builtin_providers);
	ASSERT_EQ(cfg->shaping.nproviders, 1);
	ASSERT_EQ(cfg->shaping.providers[0].shape.set, 0);
	config_shape_for(cfg, "gmail.com", "aspmx.l.google.com", &sh, NULL,
	    &site);
	ASSERT_STR_EQ(site, "google");
	ASSERT_EQ(sh.max_conn, 20);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_OPPORTUNISTIC);
	config_unref(cfg);
	cfg = load_ok(MINIMAL "shaping = { builtin_providers = false; };\n");
	ASSERT_EQ(cfg->shaping.nproviders, 0);
	ASSERT(config_shape_provider(cfg, "aspmx.l.google.com") == NULL);
	config_unref(cfg);
}

TEST(shaping_provider_lookup)
{
	struct relay_config *cfg;
	const struct cfg_provider *pv;

	cfg = load_ok(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"gsuite-alt\";\n"
	    "    mx_suffixes = [ \"alt1.aspmx.l.google.com\" ]; },\n"
	    "  { name = \"exact\"; mx_suffixes = [ \"mx.example.net\" ]; }\n"
	    "); };\n");
	ASSERT((pv = config_shape_provider(cfg, "aspmx.l.google.com")) != NULL);
	ASSERT_STR_EQ(pv->name, "google");
	/* The longest suffix wins, whichever host of the list it matched. */
	ASSERT((pv = config_shape_provider(cfg,
	    "alt1.aspmx.l.google.com")) != NULL);
	ASSERT_STR_EQ(pv->name, "gsuite-alt");
	ASSERT((pv = config_shape_provider(cfg,
	    "aspmx.l.google.com,alt1.aspmx.l.google.com")) != NULL);
	ASSERT_STR_EQ(pv->name, "gsuite-alt");
	/* Below alt1... is still its host; case and a final dot do not
	   matter. */
	ASSERT((pv = config_shape_provider(cfg,
	    "X.ALT1.aspmx.L.google.com.")) != NULL);
	ASSERT_STR_EQ(pv->name, "gsuite-alt");
	ASSERT((pv = config_shape_provider(cfg,
	    "mx.example.org,hotmail-com.olc.protection.outlook.com")) != NULL);
	ASSERT_STR_EQ(pv->name, "microsoft");
	ASSERT((pv = config_shape_provider(cfg, "mx01.mail.icloud.com")) !=
	    NULL);
	ASSERT_STR_EQ(pv->name, "apple");
	ASSERT((pv = config_shape_provider(cfg, "mx.example.net")) != NULL);
	ASSERT_STR_EQ(pv->name, "exact");
	ASSERT((pv = config_shape_provider(cfg, "a.mx.example.net")) != NULL);
	ASSERT_STR_EQ(pv->name, "exact");
	/* No match: a leading-dot suffix is strictly below; labels count. */
	ASSERT(config_shape_provider(cfg, "google.com") == NULL);
	ASSERT(config_shape_provider(cfg, "notgoogle.com") == NULL);
	ASSERT(config_shape_provider(cfg, "xmx.example.net") == NULL);
	ASSERT(config_shape_provider(cfg, "mx.example.org") == NULL);
	ASSERT(config_shape_provider(cfg, "") == NULL);
	ASSERT(config_shape_provider(cfg, ",") == NULL);
	ASSERT(config_shape_provider(cfg, NULL) == NULL);
	ASSERT(config_shape_provider(NULL, "aspmx.l.google.com") == NULL);
	config_unref(cfg);
}

TEST(shaping_domains)
{
	struct relay_config *cfg;
	const struct cfg_domain_shape *dm;
	struct cfg_shape sh;
	const char *site;
	bool rollup;

	cfg = load_ok(MINIMAL
	    "delivery = { tls_policies = (\n"
	    "  { domain = \"gmail.com\"; tls = \"verify\"; },\n"
	    "  { domain = \".example.org\"; tls = \"none\"; } );\n"
	    "  ca_file = \"config/relay.conf.example\"; };\n"
	    "shaping = { domains = (\n"
	    "  { domain = \"GoogleMail.com\"; rollup = false;\n"
	    "    max_connections = 2; min_connections = 2;\n"
	    "    min_rate = \"1/s\"; },\n"
	    "  { domain = \"gmail.com\"; max_messages_per_connection = 7; },\n"
	    "  { domain = \"a.example.org\"; tls = \"required\";\n"
	    "    rate = \"1/min\"; }\n"
	    "); };\n");
	ASSERT_EQ(cfg->shaping.ndomains, 3);
	dm = &cfg->shaping.domains[0];
	ASSERT_STR_EQ(dm->domain, "googlemail.com");
	ASSERT(!dm->rollup);
	ASSERT_EQ(dm->shape.set, CFG_SHAPE_MAX_CONN | CFG_SHAPE_MIN_CONN |
	    CFG_SHAPE_MIN_RATE);
	ASSERT(cfg->shaping.domains[1].rollup);

	/* Domain over provider over default, field by field. */
	config_shape_for(cfg, "googlemail.COM", "aspmx.l.google.com", &sh,
	    &rollup, &site);
	ASSERT(!rollup);
	ASSERT_STR_EQ(site, "google");
	ASSERT_EQ(sh.max_conn, 2);
	ASSERT_EQ(sh.min_conn, 2);
	ASSERT_EQ(sh.max_msgs_per_conn, 50);
	ASSERT_EQ(sh.max_rcpts_per_txn, 100);
	ASSERT_NEAR(sh.min_rate, 1.0);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_REQUIRED);
	/* gmail.com: its tls_policies entry beats the provider's tls. */
	config_shape_for(cfg, "gmail.com", "aspmx.l.google.com", &sh, &rollup,
	    &site);
	ASSERT(rollup);
	ASSERT_EQ(sh.max_conn, 5);
	ASSERT_EQ(sh.max_msgs_per_conn, 7);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_VERIFY);
	/* The domain entry's tls beats tls_policies; a floor above an
	   inherited ceiling comes down to it. */
	config_shape_for(cfg, "a.example.org", "mx.example.org", &sh, &rollup,
	    &site);
	ASSERT(site == NULL);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_REQUIRED);
	ASSERT_NEAR(sh.rate, 1.0 / 60);
	ASSERT_NEAR(sh.min_rate, 1.0 / 60);
	config_shape_for(cfg, "b.example.org", "mx.example.org", &sh, NULL,
	    NULL);
	ASSERT_EQ(sh.tls, CFG_DLV_TLS_NONE);
	/* Exact domains only. */
	config_shape_for(cfg, "x.gmail.com", NULL, &sh, &rollup, NULL);
	ASSERT(rollup);
	ASSERT_EQ(sh.max_msgs_per_conn, 100);
	config_unref(cfg);
}

TEST(shaping_errors)
{
	/* Rates. */
	load_fail(MINIMAL "shaping = {\n  default = {\n"
	    "    rate = \"100/sec\"; }; };",
	    "t.conf:4: 'rate' must be a rate \"N/s\", \"N/min\" or \"N/h\" "
	    "with N a positive number, such as \"100/s\" or \"20/min\"");
	load_fail(MINIMAL "shaping = { default = {\n    rate = 100; }; };",
	    "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n    rate = \"0/s\"; }; };",
	    "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    min_rate = \"-1/s\"; }; };",
	    "t.conf:3: 'min_rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    rate = \" 1/s\"; }; };", "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    rate = \"1e3/s\"; }; };", "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    rate = \".5/s\"; }; };", "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    rate = \"5./s\"; }; };", "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    rate = \"5/\"; }; };", "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    rate = \"/s\"; }; };", "t.conf:3: 'rate' must be a rate");
	load_fail(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"x\"; mx_suffixes = [ \".x.example\" ];\n"
	    "    connection_rate = \"5/day\"; } ); };",
	    "t.conf:4: 'connection_rate' must be a rate");
	load_fail(MINIMAL "shaping = { domains = (\n"
	    "  { domain = \"x.example\";\n    rate = \"0.5/h\"; } ); };",
	    "t.conf:4: 'rate' must be between 1/h and 1000000/s");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    rate = \"1000001/s\"; }; };",
	    "t.conf:3: 'rate' must be between 1/h and 1000000/s");

	/* Ranges and floors. */
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    max_connections = 10001; }; };",
	    "t.conf:3: 'max_connections' must be between 1 and 10000");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"google\";\n"
	    "    max_messages_per_connection = 0; } ); };",
	    "t.conf:3: 'max_messages_per_connection' must be between 1 and "
	    "100000");
	load_fail(MINIMAL "shaping = { domains = ( { domain = \"x.example\";\n"
	    "    max_recipients_per_transaction = 100001; } ); };",
	    "t.conf:3: 'max_recipients_per_transaction' must be between 1 and "
	    "100000");
	load_fail(MINIMAL "shaping = { default = { max_connections = 3;\n"
	    "    min_connections = 4; }; };",
	    "t.conf:3: 'min_connections' (4) must not exceed max_connections "
	    "(3)");
	load_fail(MINIMAL "delivery = { max_connections_per_domain = 3; };\n"
	    "shaping = { default = {\n    min_connections = 4; }; };",
	    "t.conf:4: 'min_connections' (4) must not exceed max_connections "
	    "(3)");
	/* Orange's built-in 2 connections are this entry's ceiling. */
	load_fail(MINIMAL "shaping = { providers = ( { name = \"orange\";\n"
	    "    min_connections = 3; } ); };",
	    "t.conf:3: 'min_connections' (3) must not exceed max_connections "
	    "(2)");
	load_fail(MINIMAL "shaping = { domains = ( { domain = \"x.example\";\n"
	    "    rate = \"1/s\";\n    min_rate = \"2/s\"; } ); };",
	    "t.conf:4: 'min_rate' (2/s) must not exceed rate (1/s)");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    tls = \"maybe\"; }; };",
	    "t.conf:3: 'tls' must be one of \"none\"");

	/* Unknown keys, in every scope. */
	load_fail(MINIMAL "shaping = {\n  max_connections = 3; };",
	    "t.conf:3: unknown setting 'max_connections' in 'shaping'");
	load_fail(MINIMAL "shaping = { default = {\n    max_conns = 3; }; };",
	    "t.conf:3: unknown setting 'max_conns' in 'shaping.default'");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"x\";\n"
	    "    mx_suffix = [ \".x.example\" ]; } ); };",
	    "t.conf:3: unknown setting 'mx_suffix' in 'shaping.providers'");
	load_fail(MINIMAL "shaping = { domains = ( { domain = \"x.example\";\n"
	    "    rollup = false;\n    mx_suffixes = [ ]; } ); };",
	    "t.conf:4: unknown setting 'mx_suffixes' in 'shaping.domains'");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"x\";\n"
	    "    mx_suffixes = [ \".x.example\" ];\n"
	    "    rollup = false; } ); };",
	    "t.conf:4: unknown setting 'rollup' in 'shaping.providers'");

	/* Providers. */
	load_fail(MINIMAL "shaping = { providers = (\n"
	    "  { max_connections = 3; } ); };",
	    "t.conf:3: provider is missing 'name'");
	load_fail(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"Google\"; } ); };",
	    "t.conf:3: provider name 'Google' may only hold lower-case");
	load_fail(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"acme\"; max_connections = 3; } ); };",
	    "t.conf:3: provider 'acme' is missing 'mx_suffixes'");
	load_fail(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"google\"; max_connections = 3; },\n"
	    "  { name = \"google\"; rate = \"1/s\"; } ); };",
	    "t.conf:4: provider 'google' is defined twice");
	load_fail(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"a\"; mx_suffixes = [ \".a.example\" ]; },\n"
	    "  { name = \"a\"; mx_suffixes = [ \".b.example\" ]; } ); };",
	    "t.conf:4: provider 'a' is defined twice");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"a\";\n"
	    "    mx_suffixes = [ \".a.example\",\n      \"*.b.example\" ]; "
	    "} ); };",
	    "t.conf:4: provider 'a': mx suffix '*.b.example' is not a host "
	    "name or .domain");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"a\";\n"
	    "    mx_suffixes = [ \"..a.example\" ]; } ); };",
	    "t.conf:3: provider 'a': mx suffix '..a.example' is not");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"a\";\n"
	    "    mx_suffixes = [ 3 ]; } ); };",
	    "t.conf:3: 'mx_suffixes' entries must be strings");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"a\";\n"
	    "    mx_suffixes = \".a.example\"; } ); };",
	    "t.conf:3: 'mx_suffixes' must be a list");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"a\";\n"
	    "    mx_suffixes = [ \".a.example\",\n"
	    "      \".A.example\" ]; } ); };",
	    "t.conf:4: provider 'a' lists mx suffix '.a.example' twice");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"gsuite\";\n"
	    "    mx_suffixes = [ \".x.example\",\n"
	    "      \".google.com\" ]; } ); };",
	    "t.conf:4: mx suffix '.google.com' is claimed by providers "
	    "'google' and 'gsuite'");
	/* Taken from google, then given back: fine. */
	config_unref(load_ok(MINIMAL "shaping = { providers = (\n"
	    "  { name = \"google\"; mx_suffixes = [ \".google.com\" ]; },\n"
	    "  { name = \"gmail\"; mx_suffixes = [ \".googlemail.com\" ]; }\n"
	    "); };\n"));
	load_fail(MINIMAL "shaping = { providers = (\n  \"google\" ); };",
	    "t.conf:3: 'providers' entries must be groups { ... }");
	load_fail(MINIMAL "shaping = {\n  providers = { name = \"a\"; }; };",
	    "t.conf:3: 'providers' must be a list");

	/* Domains. */
	load_fail(MINIMAL "shaping = { domains = (\n"
	    "  { rollup = false; } ); };",
	    "t.conf:3: shaping domain entry is missing 'domain'");
	load_fail(MINIMAL "shaping = { domains = ( { domain =\n"
	    "    \".example.com\"; } ); };",
	    "shaping domain '.example.com' is not a domain name");
	load_fail(MINIMAL "shaping = { domains = (\n"
	    "  { domain = \"example.com\"; rollup = \"no\"; } ); };",
	    "t.conf:3: 'rollup' must be a boolean");
	load_fail(MINIMAL "shaping = { domains = (\n"
	    "  { domain = \"example.com\"; },\n"
	    "  { domain = \"Example.COM\"; } ); };",
	    "t.conf:4: shaping for domain 'example.com' is defined twice");
	load_fail(MINIMAL "shaping = { domains = (\n  [ 1 ] ); };",
	    "t.conf:3: 'domains' entries must be groups { ... }");
	load_fail(MINIMAL "shaping = (\n  1 );",
	    "t.conf:2: 'shaping' must be a group { ... }");

	/* tls "verify" here needs the CA bundle too. */
	load_fail(MINIMAL "delivery = { ca_file = \"/nonexistent/ca.pem\"; };\n"
	    "shaping = { domains = ( { domain = \"x.example\";\n"
	    "    tls = \"verify\"; } ); };",
	    "t.conf:2: ca_file '/nonexistent/ca.pem' cannot be read");
	load_fail(MINIMAL "shaping = { providers = ( { name = \"google\";\n"
	    "    tls = \"verify\"; } ); };\n"
	    "delivery = { ca_file = \"/nonexistent/ca.pem\"; };\n",
	    "t.conf:4: ca_file '/nonexistent/ca.pem' cannot be read");
	load_fail(MINIMAL "shaping = { default = {\n"
	    "    tls = \"verify\"; }; };\n"
	    "delivery = { ca_file = \"/nonexistent/ca.pem\"; };\n",
	    "cannot be read");
}

TEST(shaping_limits)
{
	struct buf b;
	int i;

	buf_init(&b);
	buf_puts(&b, MINIMAL "shaping = { providers = (\n");
	for (i = 0; i < 251; i++)
		buf_printf(&b, "%s{ name = \"p%d\"; mx_suffixes = "
		    "[ \".p%d.example\" ]; }\n", i == 0 ? "" : ",", i, i);
	buf_puts(&b, "); };\n");
	/* 6 built-ins + 250 = 256: the 251st is one too many. */
	load_fail(b.data, "t.conf:253: more than 256 providers, built-in "
	    "ones included");
	buf_reset(&b);
	buf_puts(&b, MINIMAL "shaping = { providers = ( { name = \"a\";\n"
	    "  mx_suffixes = [\n");
	for (i = 0; i < 33; i++)
		buf_printf(&b, "%s\".s%d.example\"\n", i == 0 ? "" : ",", i);
	buf_puts(&b, "] } ); };\n");
	load_fail(b.data, "t.conf:3: provider 'a': 'mx_suffixes' may hold at "
	    "most 32 suffixes");
	buf_free(&b);
}

TEST_MAIN("config",
    TEST_ENTRY(defaults),
    TEST_ENTRY(all_keys_set),
    TEST_ENTRY(per_ip_default_follows_max_connections),
    TEST_ENTRY(durations_int_and_float),
    TEST_ENTRY(duration_ranges),
    TEST_ENTRY(int64_size),
    TEST_ENTRY(type_errors),
    TEST_ENTRY(range_errors),
    TEST_ENTRY(unknown_key_top_level),
    TEST_ENTRY(unknown_key_nested),
    TEST_ENTRY(missing_listeners),
    TEST_ENTRY(listener_errors),
    TEST_ENTRY(duplicate_listener),
    TEST_ENTRY(relay_networks_v4),
    TEST_ENTRY(relay_networks_v6_and_mapped),
    TEST_ENTRY(relay_networks_errors),
    TEST_ENTRY(users),
    TEST_ENTRY(plaintext_password_rejected),
    TEST_ENTRY(duplicate_user),
    TEST_ENTRY(trace_names),
    TEST_ENTRY(dns_group),
    TEST_ENTRY(dns_server_syntax),
    TEST_ENTRY(dns_ranges),
    TEST_ENTRY(delivery_defaults),
    TEST_ENTRY(delivery_group),
    TEST_ENTRY(delivery_errors),
    TEST_ENTRY(delivery_tls_policies),
    TEST_ENTRY(delivery_tls_policy_errors),
    TEST_ENTRY(delivery_tls_policies_limit),
    TEST_ENTRY(delivery_ca_file),
    TEST_ENTRY(delivery_retry_schedule),
    TEST_ENTRY(delivery_timeouts),
    TEST_ENTRY(reply_rules),
    TEST_ENTRY(reply_rule_errors),
    TEST_ENTRY(reply_rules_limit),
    TEST_ENTRY(shaping_defaults),
    TEST_ENTRY(shaping_provider_merge),
    TEST_ENTRY(shaping_provider_lookup),
    TEST_ENTRY(shaping_domains),
    TEST_ENTRY(shaping_errors),
    TEST_ENTRY(shaping_limits),
    TEST_ENTRY(syntax_error_line),
    TEST_ENTRY(file_errors),
    TEST_ENTRY(file_line_numbers_and_include),
    TEST_ENTRY(ref_unref),
    TEST_ENTRY(example_file_loads),
    TEST_ENTRY(builtin_default_loads))
