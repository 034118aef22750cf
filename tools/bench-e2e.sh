#!/bin/bash
# bench-e2e.sh - the end-to-end benchmark behind `make bench-e2e`.
#
# For each message size and each MTA (relayd, then a private Postfix):
# starts a fresh fake-mx sink on 127.0.0.2 and a fresh MTA with an empty
# spool, submits BENCH_N messages over BENCH_CONNS connections with
# $BUILD/bench-submit, waits until the sink has recorded every message and
# the MTA's queue is empty, and prints submission msgs/s, the end-to-end
# drain time (start of the submission -> last message recorded by the
# sink), end-to-end msgs/s, deliveries/s at the sink, the MTA's CPU seconds
# and its peak memory. Then the relayd/Postfix ratio per size.
#
# relayd resolves the recipients' domain (example.net: bench-submit's
# fixed recipients) through a private dnsmasq on 127.0.0.1, whose MX
# answer is mx1.example.net = 127.0.0.2. Postfix relays the same domain
# to relayhost [127.0.0.2]:SINKPORT with DNS disabled, so it never asks
# the system resolver. Both fsync every message before their 250.
#
# Postfix (Debian package) is installed on demand with the debconf answer
# "No configuration", so no system instance is configured or started.
# Each Postfix run is a private instance: its own config_directory,
# queue_directory and data_directory under the bench directory, smtpd on
# 127.0.0.1:PORT, no chroot. No Postfix process survives the script.
#
# Only 127.0.0.x addresses are used. Every wait is bounded.
#
# Environment:
#   BUILD                build directory (build); its relayd, relayctl,
#                        bench-submit and fake-mx are copied at the start
#   BENCH_N              messages per scenario (20000)
#   BENCH_CONNS          client connections (20)
#   BENCH_SIZES          message sizes in octets ("1024 10240")
#   BENCH_MTAS           which MTAs, in order ("relayd postfix")
#   BENCH_DRAIN_TIMEOUT  seconds to wait for a drain (600)
#   BENCH_TMPDIR         where the spools go (/var/tmp); must be reachable
#                        by the postfix user, so not a 0700 directory
#   BENCH_KEEP=1         keep the bench directory (spools, logs, records)
#   BENCH_SIGTRACE=1     record the signals the sink gets (strace), to find
#                        who sends a stray SIGTERM
#
# A scenario whose sink or MTA is killed by somebody else (this happened
# on the shared bench machine: an unrelated root process sent SIGTERM to
# fake-mx) is reported and run once more; its directory is kept.
#
# Exit: 0 when every message was accepted and delivered exactly once,
# 1 otherwise (a missed ratio target is reported, not an error).
set -u

BUILD=${BUILD:-build}
N=${BENCH_N:-20000}
CONNS=${BENCH_CONNS:-20}
SIZES=${BENCH_SIZES:-"1024 10240"}
MTAS=${BENCH_MTAS:-"relayd postfix"}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-600}
BASE=${BENCH_TMPDIR:-/var/tmp}
TARGET_RATIO=3		# relayd end-to-end msgs/s over Postfix's
CONCURRENCY=20		# outbound connections, both MTAs
SUBMIT_TIMEOUT=900	# bench-submit -t, seconds
POLL=1			# drain poll interval, seconds (the drain time
			# comes from the sink's record, not from the poll)
SAMPLE=1		# memory sampling interval, seconds
START_WAIT=100		# x 0.1 s for a daemon to come up
STOP_WAIT=200		# x 0.1 s for a daemon to exit
LOSS_WAIT=10		# polls with an empty queue and missing messages
MX_IP=127.0.0.2
DNSMASQ=/usr/sbin/dnsmasq
PF_SBIN=/usr/sbin/postfix

cd "$(dirname "$0")/.." || exit 1
for bin in relayd relayctl bench-submit fake-mx; do
	if [ ! -x "$BUILD/$bin" ]; then
		echo "bench-e2e.sh: $BUILD/$bin missing; run 'make bench-e2e'" >&2
		exit 1
	fi
done
if [ ! -x "$DNSMASQ" ]; then
	echo "bench-e2e.sh: $DNSMASQ missing (tools/install-deps)" >&2
	exit 1
fi
for v in N CONNS DRAIN_TIMEOUT; do
	if ! [[ ${!v} =~ ^[1-9][0-9]{0,7}$ ]]; then
		echo "bench-e2e.sh: bad $v: ${!v}" >&2
		exit 1
	fi
done
HZ=$(getconf CLK_TCK)

tmp=
dns_pid=
sink_pid=
relayd_pid=
pf_etc=
pf_master=
samp_pid=
noshaping_said=
status=0
declare -A res	# "$mta:$size:field" -> value

# ---------------------------------------------------------------- helpers


# shared helpers: alive, wait_gone, stop_pid, free_port, listening, jget
. "$(dirname "$0")/bench-lib.sh"

# nap SECONDS - sleep without forking (read times out on a private pipe)
nap() {
	read -rt "$1" -u "$NAPFD" _ 2>/dev/null
	return 0
}






# cpu_ticks PID... - utime+stime+cutime+cstime summed over the processes,
# in clock ticks; one awk, which skips processes that are already gone
cpu_ticks() {
	local p files=()
	for p in "$@"; do
		files+=("/proc/$p/stat")
	done
	awk 'BEGIN { for (i = 1; i < ARGC; i++) {
		if ((getline l < ARGV[i]) > 0) {
			sub(/^.*\) /, "", l); split(l, a, " ")
			t += a[12] + a[13] + a[14] + a[15]
		}
		close(ARGV[i])
	     }
	     printf "%d\n", t; exit }' "${files[@]}"
}

# mta_pids MTA - the processes of the running MTA: relayd, or Postfix's
# master and its children (every Postfix daemon is a child of master)
mta_pids() {
	local kids=
	if [ "$1" = relayd ]; then
		echo "$relayd_pid"
	else
		read -r kids 2>/dev/null \
		    <"/proc/$pf_master/task/$pf_master/children"
		echo "$pf_master $kids"
	fi
}

# sampler MTA OUT - every $SAMPLE s append "rss_kB pss_kB nprocs", summed
# over the MTA's processes (smaps_rollup), to OUT. One awk per sample; a
# process that exits meanwhile is skipped. Bounded in count; the caller
# kills it.
sampler() {
	local i p files max
	max=$(( (DRAIN_TIMEOUT + SUBMIT_TIMEOUT + 60) / SAMPLE ))
	for ((i = 0; i < max; i++)); do
		files=()
		for p in $(mta_pids "$1"); do
			files+=("/proc/$p/smaps_rollup")
		done
		awk 'BEGIN { for (i = 1; i < ARGC; i++) {
			n = 0
			while ((getline l < ARGV[i]) > 0) {
				split(l, a, " ")
				if (a[1] == "Rss:") r += a[2]
				else if (a[1] == "Pss:") s += a[2]
				n = 1
			}
			close(ARGV[i]); np += n
		     }
		     print r + 0, s + 0, np + 0; exit }' "${files[@]}" >>"$2"
		nap "$SAMPLE"
	done
}

# ------------------------------------------------------------ dnsmasq, sink

start_dns() {
	local i
	dns_port=$(free_port) || { echo "bench-e2e.sh: no free port" >&2; return 1; }
	"$DNSMASQ" --no-resolv --no-hosts --no-daemon --conf-file=/dev/null \
	    --port="$dns_port" --listen-address=127.0.0.1 --bind-interfaces \
	    --local=/example.net/ --local-ttl=300 \
	    --mx-host=example.net,mx1.example.net,10 \
	    --host-record=mx1.example.net,$MX_IP \
	    >"$tmp/dnsmasq.log" 2>&1 &
	dns_pid=$!
	for ((i = 0; i < START_WAIT; i++)); do
		if ! alive "$dns_pid"; then
			echo "bench-e2e.sh: dnsmasq exited:" >&2
			cat "$tmp/dnsmasq.log" >&2
			dns_pid=
			return 1
		fi
		listening "$dns_port" && return 0
		sleep 0.1
	done
	echo "bench-e2e.sh: dnsmasq did not listen" >&2
	return 1
}

# start_sink DIR - fake-mx on $MX_IP, any port; sets sink_pid, sink_port
start_sink() {
	local i line life fmx
	life=$((DRAIN_TIMEOUT + SUBMIT_TIMEOUT + 120))
	fmx=$BIN/fake-mx
	# In its own directory with core dumps on: a crash leaves evidence.
	(cd "$1" && ulimit -c unlimited 2>/dev/null
	 exec "$fmx" -l "mx=$MX_IP:0" -r "$1/sink.json" --events message \
	    --no-flush -S -T 120 -t "$life" >"$1/sink.out" 2>"$1/sink.err") &
	sink_pid=$!
	for ((i = 0; i < START_WAIT; i++)); do
		line=$(head -n 1 "$1/sink.out" 2>/dev/null)
		if [[ $line == ready* ]]; then
			sink_port=${line##*:}
			# Who signals the sink (si_pid), for stray kills.
			if [ "${BENCH_SIGTRACE:-0}" = 1 ] &&
			    command -v strace >/dev/null; then
				strace -qq -e trace=none -e signal=all -p "$sink_pid" \
				    -o "$1/sink.signals" 2>/dev/null &
			fi
			return 0
		fi
		alive "$sink_pid" || break
		sleep 0.1
	done
	echo "bench-e2e.sh: fake-mx did not start:" >&2
	cat "$1/sink.err" >&2
	return 1
}

# stop_sink - SIGTERM; fake-mx must exit 0
stop_sink() {
	local rc
	[ -n "$sink_pid" ] || return 0
	kill -TERM "$sink_pid" 2>/dev/null
	wait_gone "$sink_pid" || kill -KILL "$sink_pid" 2>/dev/null
	wait "$sink_pid" 2>/dev/null
	rc=$?
	sink_pid=
	return $rc
}

# ------------------------------------------------------------------ relayd

# relayd_start DIR - sets relayd_pid, smtp_port
relayd_start() {
	local i
	smtp_port=$(free_port) || return 1
	cat >"$1/relay.conf" <<EOF
# Written by tools/bench-e2e.sh.
hostname = "bench-relayd.test";
spool_dir = "$1/spool";
control = { socket = "$1/relayd.sock"; mode = "0600"; };
listeners = (
  { name = "bench"; address = "127.0.0.1"; port = $smtp_port;
    tls = "none"; auth_required = false; }
);
relay_networks = [ "127.0.0.0/8" ];
limits = { max_connections = 2000; max_connections_per_ip = 1000; };
dns = { servers = [ "127.0.0.1:$dns_port" ]; };
delivery = {
  enabled = true;
  port = $sink_port;
  tls = "none";
  max_connections = 200;
  max_connections_per_domain = $CONCURRENCY;
  max_connections_per_host = $CONCURRENCY;
};
EOF
	# Postfix has no per-destination rate limit by default
	# (default_destination_rate_delay = 0s); relayd's shaping defaults
	# (100 msgs/s and 100 connections/min per site) would make this a
	# bench of the policy, so they are lifted to the largest values.
	# A relayd without the shaping group (before it existed) runs
	# without it.
	cp "$1/relay.conf" "$1/relay.conf.base"
	cat >>"$1/relay.conf" <<EOF
shaping = {
  default = { rate = "1000000/s"; connection_rate = "1000000/s"; };
};
EOF
	if ! "$BIN/relayd" -t -c "$1/relay.conf" >/dev/null 2>&1; then
		mv "$1/relay.conf.base" "$1/relay.conf"
		[ -n "$noshaping_said" ] ||
		    echo "(this relayd has no shaping group: none set)" >&2
		noshaping_said=1
	fi
	"$BIN/relayd" -t -c "$1/relay.conf" >/dev/null || return 1
	"$BIN/relayd" -f -c "$1/relay.conf" 2>>"$1/relayd.log" &
	relayd_pid=$!
	for ((i = 0; i < START_WAIT; i++)); do
		if ! alive "$relayd_pid"; then
			echo "bench-e2e.sh: relayd exited; its log:" >&2
			tail -n 20 "$1/relayd.log" >&2
			relayd_pid=
			return 1
		fi
		"$BIN/relayctl" -s "$1/relayd.sock" status >/dev/null 2>&1 &&
		    return 0
		sleep 0.1
	done
	echo "bench-e2e.sh: relayd did not answer" >&2
	return 1
}

# relayd_queued DIR - messages in relayd's queue, or empty on error
relayd_queued() {
	jget "$("$BIN/relayctl" -s "$1/relayd.sock" status 2>/dev/null)" queued
}

relayd_stop() {
	stop_pid "$relayd_pid" || status=1
	relayd_pid=
}

# ----------------------------------------------------------------- Postfix

# pf_install - install the Debian package without configuring a system
# instance; 1 (with the reason printed) if that cannot be done
pf_install() {
	local sudo=
	[ -x "$PF_SBIN" ] && return 0
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	if ! command -v apt-get >/dev/null; then
		echo "bench-e2e.sh: postfix missing and no apt-get" >&2
		return 1
	fi
	echo "installing the postfix package (debconf: No configuration)"
	echo "postfix postfix/main_mailer_type select No configuration" |
	    $sudo debconf-set-selections || return 1
	$sudo apt-get update -qq >/dev/null 2>&1
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postfix \
	    >"$tmp/postfix-install.log" 2>&1 || {
		echo "bench-e2e.sh: apt-get install postfix failed:" >&2
		tail -n 20 "$tmp/postfix-install.log" >&2
		return 1
	}
	[ -x "$PF_SBIN" ]
}

# pf_procs ETC - every process whose environment names this instance
pf_procs() {
	grep -lzx "MAIL_CONFIG=$1" /proc/[0-9]*/environ 2>/dev/null |
	    sed 's,^/proc/\([0-9]*\)/environ$,\1,' | sort -n | tr '\n' ' '
}

# pf_start DIR - a private instance; sets pf_etc, pf_master, smtp_port
pf_start() {
	local d=$1 i
	smtp_port=$(free_port) || return 1
	mkdir -p "$d/etc" "$d/queue" "$d/data" || return 1
	chown postfix "$d/data" || return 1
	pf_etc=$d/etc
	cat >"$d/etc/main.cf" <<EOF
# Written by tools/bench-e2e.sh: a private instance relaying example.net to
# the bench sink. Everything not set here is Postfix's default (fsync of
# every queue file before 250 included).
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench-postfix.test
mydomain = bench-postfix.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.net
# No MX lookup (brackets), no DNS at all: nothing reaches the system
# resolver. relayd resolves through the bench's dnsmasq instead.
relayhost = [$MX_IP]:$sink_port
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtp_tls_security_level = none
# $CONCURRENCY is also Postfix's default; stated for the record.
default_destination_concurrency_limit = $CONCURRENCY
maillog_file = $d/maillog
EOF
	# Debian's master.cf services, without chroot, smtpd on our port.
	cat >"$d/etc/master.cf" <<EOF
127.0.0.1:$smtp_port inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
EOF
	if ! "$PF_SBIN" -c "$pf_etc" check >>"$d/postfix.log" 2>&1 ||
	    ! "$PF_SBIN" -c "$pf_etc" start >>"$d/postfix.log" 2>&1; then
		echo "bench-e2e.sh: postfix did not start:" >&2
		cat "$d/postfix.log" >&2
		return 1
	fi
	pf_master=$(tr -dc 0-9 <"$d/queue/pid/master.pid" 2>/dev/null)
	for ((i = 0; i < START_WAIT; i++)); do
		[ -n "$pf_master" ] && alive "$pf_master" &&
		    listening "$smtp_port" && return 0
		sleep 0.1
	done
	echo "bench-e2e.sh: postfix master not listening on $smtp_port" >&2
	return 1
}

# pf_queued DIR - queue files not yet delivered
pf_queued() {
	find "$1/queue/maildrop" "$1/queue/incoming" "$1/queue/active" \
	    "$1/queue/deferred" "$1/queue/hold" -type f 2>/dev/null | wc -l
}

# pf_stop - "postfix stop", bounded; then make sure nothing is left
pf_stop() {
	local i left
	[ -n "$pf_etc" ] || return 0
	"$PF_SBIN" -c "$pf_etc" stop >/dev/null 2>&1
	for ((i = 0; i < STOP_WAIT; i++)); do
		left=$(pf_procs "$pf_etc")
		[ -z "$left" ] && break
		sleep 0.1
	done
	if [ -n "$left" ]; then
		echo "bench-e2e.sh: postfix processes left ($left); aborting" >&2
		"$PF_SBIN" -c "$pf_etc" abort >/dev/null 2>&1
		sleep 0.5
		left=$(pf_procs "$pf_etc")
		# shellcheck disable=SC2086  # a list of pids
		[ -n "$left" ] && kill -KILL $left 2>/dev/null
		status=1
	fi
	pf_etc=
	pf_master=
}

# ---------------------------------------------------------------- cleanup

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
	[ -n "$samp_pid" ] && kill "$samp_pid" 2>/dev/null
	relayd_stop 2>/dev/null
	pf_stop
	stop_sink
	[ -n "$dns_pid" ] && stop_pid "$dns_pid"
	if [ -n "$tmp" ] && [ -d "$tmp" ]; then
		if [ "${BENCH_KEEP:-0}" = 1 ]; then
			echo "kept $tmp"
		else
			rm -rf "$tmp"
		fi
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------- scenario

# run_one MTA SIZE [TAG] - one scenario; prints one row, fills res[].
# Returns 1 when something could not be set up, and 3 when the sink or
# the MTA was killed by somebody else (seen on shared machines: a stray
# SIGTERM from an unrelated process); the caller then runs it once more.
run_one() {
	local mta=$1 size=$2 d out rc t0 i n q lossy=0 ticks0 ticks1 hwm=
	local cnt distinct first last drain e2e dlv cpu peak rss pss np sub
	local gone=
	d=$tmp/$mta-$size${3:+-$3}
	mkdir -p "$d" || return 1
	chmod 755 "$d"
	start_sink "$d" || return 1
	if [ "$mta" = relayd ]; then
		relayd_start "$d" || return 1
	else
		pf_start "$d" || return 1
	fi
	: >"$d/samples"
	sampler "$mta" "$d/samples" &
	samp_pid=$!
	# shellcheck disable=SC2046  # a list of pids
	ticks0=$(cpu_ticks $(mta_pids "$mta"))

	t0=$EPOCHREALTIME
	out=$("$BIN/bench-submit" -H 127.0.0.1 -p "$smtp_port" -c "$CONNS" \
	    -n "$N" -s "$size" -t "$SUBMIT_TIMEOUT" -j)
	rc=$?

	# Drain: every accepted message at the sink and nothing queued.
	# Bounded by DRAIN_TIMEOUT; also stops once the queue has stayed
	# empty for LOSS_WAIT polls while messages are missing.
	for ((i = 0; i < DRAIN_TIMEOUT; i++)); do
		n=$(wc -l <"$d/sink.json")
		if ! alive "$sink_pid"; then
			wait "$sink_pid" 2>/dev/null
			gone="the sink (fake-mx, exit status $?, $(grep -o \
			    'stopping: [A-Z]*' "$d/sink.err" | head -n 1)) after $n records"
			sink_pid=
			break
		fi
		if [ "$mta" = relayd ]; then
			alive "$relayd_pid" || { gone="relayd"; break; }
			q=$(relayd_queued "$d")
		else
			alive "$pf_master" || { gone="Postfix's master"; break; }
			q=$(pf_queued "$d")
		fi
		if [ "${q:-1}" = 0 ]; then
			[ "$n" -ge "$N" ] && break
			lossy=$((lossy + 1))
			[ "$lossy" -ge "$LOSS_WAIT" ] && break
		else
			lossy=0
		fi
		nap "$POLL"
	done
	if [ -n "$gone" ]; then
		kill "$samp_pid" 2>/dev/null
		wait "$samp_pid" 2>/dev/null
		samp_pid=
		if [ "$mta" = relayd ]; then
			relayd_stop
		else
			pf_stop
		fi
		stop_sink
		echo "$mta $size: $gone died during the run (not killed by this" \
		    "script); logs in $d" >&2
		BENCH_KEEP=1
		return 3
	fi
	if [ -z "$out" ]; then
		echo "bench-e2e.sh: bench-submit failed (exit $rc)" >&2
		status=1
	elif [ "$rc" -ne 0 ]; then
		echo "bench-e2e.sh: $mta $size: $(jget "$out" failed) failed:" \
		    "$(printf '%s\n' "$out" |
		    sed -n 's/.*"failures": \({[^}]*}\).*/\1/p')" >&2
		status=1
	fi
	# shellcheck disable=SC2046  # a list of pids
	ticks1=$(cpu_ticks $(mta_pids "$mta"))
	[ "$mta" = relayd ] && hwm=$(awk '/^VmHWM:/ { print $2 }' \
	    "/proc/$relayd_pid/status" 2>/dev/null)
	kill "$samp_pid" 2>/dev/null
	wait "$samp_pid" 2>/dev/null
	samp_pid=
	if [ "$mta" = relayd ]; then
		relayd_stop
	else
		pf_stop
	fi
	# --no-flush: the last records reach the file at exit.
	if ! stop_sink; then
		echo "bench-e2e.sh: fake-mx did not exit cleanly" >&2
		status=1
	fi

	read -r cnt first last < <(awk -F'"t":' '{ split($2, a, ","); t = a[1] + 0
	    if (NR == 1 || t < lo) lo = t; if (t > hi) hi = t }
	    END { printf "%d %.3f %.3f\n", NR, lo, hi }' "$d/sink.json")
	distinct=$(sed -n 's/.*"sha256":"\([0-9a-f]*\)".*/\1/p' "$d/sink.json" |
	    sort -u | wc -l)
	read -r drain e2e dlv cpu < <(awk -v t0="$t0" -v lo="$first" \
	    -v hi="$last" -v c="$cnt" -v a="$ticks0" -v b="$ticks1" -v hz="$HZ" \
	    'BEGIN { d = hi - t0; w = hi - lo
	     printf "%.3f %.1f %.1f %.2f\n", d, (d > 0 ? c / d : 0),
	         (w > 0 ? c / w : 0), (b - a) / hz }')
	read -r rss pss np < <(awk '$1 > r { r = $1 } $2 > p { p = $2 }
	    $3 > n { n = $3 } END { print r + 0, p + 0, n + 0 }' "$d/samples")
	peak=${hwm:-$rss}
	sub=$(jget "$out" msgs_per_s)
	printf '%-7s %6s %6s %6s %9s %8s %8s %9s %9s %7s %7s %9s %8s %4s %6s\n' \
	    "$mta" "$size" "$N" "$(jget "$out" ok)" "$sub" \
	    "$(jget "$out" elapsed_s)" "$drain" "$e2e" "$dlv" "$cpu" \
	    "$(awk -v c="$cpu" -v n="$N" 'BEGIN { printf "%.3f", c * 1000 / n }')" \
	    "$peak" "$pss" "$np" "$cnt/$distinct"
	if [ "$cnt" != "$N" ] || [ "$distinct" != "$N" ]; then
		echo "  sink: $cnt messages, $distinct distinct, expected $N:" \
		    "NOT exactly once; the row is not valid" >&2
		status=1
	elif [ "$(jget "$out" ok)" = "$N" ]; then
		res[$mta:$size:valid]=1
	fi
	res[$mta:$size:e2e]=$e2e
	res[$mta:$size:cpu]=$cpu
	res[$mta:$size:sub]=$sub
	if [ "${BENCH_KEEP:-0}" != 1 ]; then
		rm -rf "$d/spool" "$d/queue"
	fi
	# Write back what the removal dirtied before the next scenario.
	sync
	return 0
}

# ------------------------------------------------------------------- main

for m in $MTAS; do
	case $m in
	relayd|postfix) ;;
	*) echo "bench-e2e.sh: unknown MTA $m" >&2; exit 1 ;;
	esac
done
exec {NAPFD}<> <(:)
tmp=$(mktemp -d "$BASE/relay-bench-e2e.XXXXXX") || exit 1
chmod 755 "$tmp"	# the postfix user must reach its queue below it
# Private copies: a rebuild of $BUILD during the run changes nothing here.
BIN=$tmp/bin
mkdir "$BIN" || exit 1
for bin in relayd relayctl bench-submit fake-mx; do
	cp "$BUILD/$bin" "$BIN/" || exit 1
done

if [[ " $MTAS " == *" postfix "* ]]; then
	if ! pf_install; then
		echo "bench-e2e.sh: Postfix is not available; relayd only" >&2
		MTAS=${MTAS//postfix/}
		status=1
	elif [ "$(id -u)" -ne 0 ]; then
		echo "bench-e2e.sh: a private Postfix needs root; relayd only" >&2
		MTAS=${MTAS//postfix/}
		status=1
	fi
fi

fstype=$(df -PT "$tmp" | awk 'NR == 2 { print $2 }')
fsdev=$(df -PT "$tmp" | awk 'NR == 2 { print $1 " on " $7 }')
fsopts=$(findmnt -no OPTIONS -T "$tmp" 2>/dev/null || echo '?')
echo "== machine"
echo "cpus      $(nproc) ($(awk -F': ' '/^model name/ { print $2; exit }' \
    /proc/cpuinfo))"
echo "memory    $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' \
    /proc/meminfo)"
echo "kernel    $(uname -sr)"
echo "spools    $tmp"
echo "          filesystem $fstype, $fsdev ($fsopts)"
if [ "$fstype" = tmpfs ] || [ "$fstype" = ramfs ]; then
	echo "WARNING: the spools are on $fstype: fsync costs nothing there," \
	    "the figures are not representative" >&2
fi
echo "load      $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, before the run)"
echo "source    $(git describe --always --dirty 2>/dev/null || echo '?')" \
    "(the working tree; the binaries may be from elsewhere:)"
echo "relayd    $BUILD/relayd, built $(date -r "$BUILD/relayd" '+%F %T'),"\
    "sha256 $(sha256sum "$BIN/relayd" | cut -c1-16)"
[ -x "$PF_SBIN" ] &&
    echo "postfix   $(postconf -d -h mail_version 2>/dev/null || echo '?')"
echo "bench     $N messages per scenario, $CONNS client connections," \
    "$CONCURRENCY outbound connections per MTA, fsync before every 250"
echo

start_dns || exit 1

echo "== scenarios"
printf '%-7s %6s %6s %6s %9s %8s %8s %9s %9s %7s %7s %9s %8s %4s %6s\n' \
    mta size msgs ok sub/s sub_s drain_s e2e/s dlv/s cpu_s ms/msg \
    peak_kB pss_kB proc sink
for size in $SIZES; do
	for m in $MTAS; do
		run_one "$m" "$size"
		rc=$?
		if [ "$rc" = 3 ]; then
			echo "$m $size: running it once more" >&2
			run_one "$m" "$size" rerun
			rc=$?
		fi
		if [ "$rc" != 0 ]; then
			status=1
			break 2
		fi
	done
done
cat <<'EOF'
(sub/s, sub_s: submission msgs/s and seconds (bench-submit); drain_s: start
 of the submission -> last message recorded by the sink; e2e/s = msgs /
 drain_s; dlv/s = messages / (last - first sink record); cpu_s: CPU seconds
 of the MTA's processes (Postfix: master + every daemon, reaped ones
 included); peak_kB: relayd VmHWM, Postfix peak of the sampled sum of VmRSS;
 pss_kB: peak of the sampled sum of Pss; proc: processes at that peak;
 sink: messages recorded / distinct bodies)
EOF

if [[ " $MTAS " == *" relayd "* && " $MTAS " == *" postfix "* ]]; then
	echo
	echo "== relayd / Postfix"
	for size in $SIZES; do
		r=${res[relayd:$size:e2e]:-}
		p=${res[postfix:$size:e2e]:-}
		if [ -z "$r" ] || [ -z "$p" ]; then
			continue
		fi
		if [ -z "${res[relayd:$size:valid]:-}" ] ||
		    [ -z "${res[postfix:$size:valid]:-}" ]; then
			printf '%6d B  no ratio: a scenario was not valid\n' "$size"
			continue
		fi
		awk -v r="$r" -v p="$p" -v s="$size" -v t="$TARGET_RATIO" \
		    -v rc="${res[relayd:$size:cpu]}" -v pc="${res[postfix:$size:cpu]}" \
		    -v rs="${res[relayd:$size:sub]}" -v ps="${res[postfix:$size:sub]}" \
		    'BEGIN { x = p > 0 ? r / p : 0
		     printf "%6d B  end to end %.1f / %.1f msgs/s = %.2fx (target %dx: %s)\n",
		         s, r, p, x, t, (x >= t ? "met" : "NOT met")
		     printf "          submission %.1f / %.1f msgs/s = %.2fx;",
		         rs, ps, (ps > 0 ? rs / ps : 0)
		     printf " CPU %.2f / %.2f s = %.2fx\n", rc, pc, (pc > 0 ? rc / pc : 0) }'
	done
fi
exit $status
