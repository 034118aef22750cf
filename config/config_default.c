/*
 * NAME
 *	config_default.c - the built-in configuration used by "relayd -d"
 * SUMMARY
 *	config_default_text()
 * DESCRIPTION
 *	A development configuration that works unedited from the repository
 *	root (make run): every path is relative and under var/, the TLS pair
 *	is generated on first start, and one demo user can log in. It is kept
 *	as libconfig text, not as a filled struct, so it goes through the same
 *	validator as a real file and cannot drift from the schema; the unit
 *	tests load it.
 *
 *	Delivery is off: "make run" queues what it is given and sends
 *	nothing to the internet until a real configuration says so.
 *
 *	The demo password is "demo-password". Its hash was made with
 *	crypt("demo-password", "$6$relaydemo0123456$"); it is public, so this
 *	configuration must never face a network: both listeners bind
 *	127.0.0.1.
 */
#include "config/config.h"

static const char config_default[] =
	"# relayd built-in default (relayd -d): a development setup run\n"
	"# from the repository root. Not for production: the demo user's\n"
	"# password is public. See config/relay.conf.example.\n"
	"\n"
	"spool_dir = \"var/spool\";\n"
	"\n"
	"control = {\n"
	"  socket = \"var/relayd.sock\";\n"
	"  mode = \"0600\";\n"
	"};\n"
	"\n"
	"# Self-signed pair created on first start if missing.\n"
	"tls = {\n"
	"  certificate = \"var/tls/cert.pem\";\n"
	"  key = \"var/tls/key.pem\";\n"
	"  generate = true;\n"
	"};\n"
	"\n"
	"listeners = (\n"
	"  { name = \"submission\"; address = \"127.0.0.1\"; port = 587;\n"
	"    tls = \"starttls\"; auth_required = true; },\n"
	"  { name = \"submissions\"; address = \"127.0.0.1\"; port = 465;\n"
	"    tls = \"implicit\"; auth_required = true; }\n"
	");\n"
	"\n"
	"# demo / demo-password\n"
	"users = (\n"
	"  { name = \"demo\";\n"
	"    password_hash = \"$6$relaydemo0123456$fAodBwV8Ah.Ty58qWnt8Xdkh"
	"ZAtYSEZExmjaOnNYaIDuSx6lIqXP6bxP//vqNGxJL.YrrzFShRkHcaoFr/pvh.\"; }\n"
	");\n"
	"\n"
	"# Nobody relays without AUTH.\n"
	"relay_networks = [ ];\n"
	"\n"
	"# A development box should not send mail to the world by surprise:\n"
	"# the built-in setup only queues. A real configuration enables\n"
	"# delivery (the default there) and may name its DNS servers.\n"
	"delivery = { enabled = false; };\n";

/* config_default_text - the built-in text; static, never freed */
const char *
config_default_text(void)
{
	return config_default;
}
