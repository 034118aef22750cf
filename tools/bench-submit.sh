#!/bin/bash
# bench-submit.sh - the submission benchmark behind `make bench`.
#
# Starts a private relayd (plain-text listener on 127.0.0.1, no AUTH, spool
# in var/bench-XXXXXX on the repository's filesystem so fsync costs what it
# costs on a real disk), drives it with $BUILD/bench-submit through a few
# scenarios, prints a table, then checks the bench itself: the queue must
# hold exactly the messages that were answered 250, both while relayd runs
# and after a SIGTERM and a restart (recovery). The spool is removed at the
# end (BENCH_KEEP=1 keeps it).
#
# It builds nothing: `make bench` has built relayd, relayctl and
# bench-submit. Environment:
#   BUILD            build directory (build)
#   BENCH_SCENARIOS  "conns:msgs:size[:per_conn] ..." to replace the set
#   BENCH_KEEP=1     keep the temporary spool and relayd's log
#
# Exit: 0 when every message was accepted and the queue counts match,
# 1 otherwise (a missed throughput target is reported, not an error).
set -u

BUILD=${BUILD:-build}
TARGET_RATE=2000	# msgs/s for the first scenario (2 KB x 50 connections)
# conns:msgs:size[:per_conn]; the first one is the target scenario.
SCENARIOS=${BENCH_SCENARIOS:-"50:20000:2048 50:5000:10240 10:200:1048576"}
BENCH_TIMEOUT=900	# seconds, per scenario (bench-submit -t)
START_WAIT=100		# x 0.1 s for relayd to answer on its control socket
STOP_WAIT=300		# x 0.1 s for relayd to exit after SIGTERM

cd "$(dirname "$0")/.." || exit 1
for bin in relayd relayctl bench-submit; do
	if [ ! -x "$BUILD/$bin" ]; then
		echo "bench-submit.sh: $BUILD/$bin missing; run 'make bench'" >&2
		exit 1
	fi
done

tmp=
pid=
status=0

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null
		wait_exit "$pid" || kill -KILL "$pid" 2>/dev/null
	fi
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

# wait_exit PID - bounded wait for a child to exit; 1 if it did not
wait_exit() {
	local i
	for ((i = 0; i < STOP_WAIT; i++)); do
		kill -0 "$1" 2>/dev/null || { wait "$1" 2>/dev/null; return 0; }
		sleep 0.1
	done
	return 1
}

# free_port - a TCP port nobody listens on (checked in /proc/net/tcp*)
free_port() {
	local i p used
	used=$(awk '$4 == "0A" { split($2, a, ":"); print a[2] }' \
	    /proc/net/tcp /proc/net/tcp6 2>/dev/null)
	for ((i = 0; i < 100; i++)); do
		p=$((20000 + RANDOM % 40000))
		if ! printf '%s\n' "$used" | grep -qix "$(printf %04X "$p")"; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

# start_relayd - start relayd in the background, wait until it answers
start_relayd() {
	local i
	"$BUILD/relayd" -f -c "$tmp/relay.conf" 2>>"$tmp/relayd.log" &
	pid=$!
	for ((i = 0; i < START_WAIT; i++)); do
		if ! kill -0 "$pid" 2>/dev/null; then
			echo "bench-submit.sh: relayd exited; its log:" >&2
			tail -n 20 "$tmp/relayd.log" >&2
			pid=
			return 1
		fi
		"$BUILD/relayctl" -s "$tmp/relayd.sock" status >/dev/null \
		    2>&1 && return 0
		sleep 0.1
	done
	echo "bench-submit.sh: relayd did not answer within" \
	    "$((START_WAIT / 10)) s" >&2
	return 1
}

# stop_relayd - SIGTERM and a bounded wait
stop_relayd() {
	kill -TERM "$pid" 2>/dev/null
	if ! wait_exit "$pid"; then
		echo "bench-submit.sh: relayd ignored SIGTERM; killing it" >&2
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
		status=1
	fi
	pid=
}

# queue_count - the "count" of `relayctl queue --json`, or empty
queue_count() {
	"$BUILD/relayctl" -s "$tmp/relayd.sock" queue --json 2>/dev/null |
	    tail -c 200 | sed -n 's/.*"count": *\([0-9]*\).*/\1/p'
}

# jget JSON KEY - the scalar after "KEY": in one flat JSON line
jget() {
	printf '%s\n' "$1" | sed -n "s/.*\"$2\": *\([^,}]*\).*/\1/p"
}

mkdir -p var || exit 1
tmp=$(mktemp -d "$PWD/var/bench-XXXXXX") || exit 1
# df -T names ext4 where stat -f only knows the "ext2/ext3" magic.
fstype=$(df -PT "$tmp" | awk 'NR == 2 { print $2 }')
fsdev=$(df -PT "$tmp" | awk 'NR == 2 { print $1 " on " $7 }')
fsopts=$(findmnt -no OPTIONS -T "$tmp" 2>/dev/null || echo '?')
port=$(free_port) || { echo "bench-submit.sh: no free port" >&2; exit 1; }

echo "== machine"
echo "cpus      $(nproc) ($(awk -F': ' '/^model name/ { print $2; exit }' \
    /proc/cpuinfo))"
echo "memory    $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' \
    /proc/meminfo)"
echo "kernel    $(uname -sr)"
echo "spool     $tmp"
echo "          filesystem $fstype, $fsdev ($fsopts)"
if [ "$fstype" = tmpfs ] || [ "$fstype" = ramfs ]; then
	echo "WARNING: the spool is on $fstype: fsync costs nothing there," \
	    "the figures are not representative" >&2
fi
echo "load      $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, before the run)"
echo "libuv     $(pkg-config --modversion libuv 2>/dev/null || echo '?')"
echo "source    $(git describe --always --dirty 2>/dev/null || echo '?')"

cat >"$tmp/relay.conf" <<EOF
# Written by tools/bench-submit.sh; removed after the run.
hostname = "bench.relay.test";
spool_dir = "$tmp/spool";
control = { socket = "$tmp/relayd.sock"; mode = "0600"; };
listeners = (
  { name = "bench"; address = "127.0.0.1"; port = $port;
    tls = "none"; auth_required = false; }
);
relay_networks = [ "127.0.0.0/8" ];
limits = {
  max_connections = 2000;
  max_connections_per_ip = 1000;
};
# Submission only: nothing leaves the machine, and the queue count check
# below needs the messages to stay queued.
delivery = { enabled = false; };
dns = { servers = [ "127.0.0.1:9" ]; };
EOF

"$BUILD/relayd" -t -c "$tmp/relay.conf" >/dev/null || exit 1
start_relayd || exit 1
echo "relayd    pid $pid, listener 127.0.0.1:$port, fsync before every 250"
echo

printf '== scenarios\n'
printf '%-6s %-7s %-8s %-6s %7s %6s %8s %9s %8s %8s %8s %8s %9s %8s %8s\n' \
    conns msgs size per_c ok failed elapsed msgs/s p50_ms p90_ms p99_ms \
    max_ms peakRSS_kB rd_cpu cl_cpu
accepted=0
first=1
for sc in $SCENARIOS; do
	IFS=: read -r c n s m <<<"$sc"
	m=${m:-0}
	out=$("$BUILD/bench-submit" -H 127.0.0.1 -p "$port" -c "$c" -n "$n" \
	    -s "$s" -m "$m" -t "$BENCH_TIMEOUT" -P "$pid" -j)
	rc=$?
	if [ -z "$out" ]; then
		echo "bench-submit.sh: bench-submit failed (exit $rc)" >&2
		status=1
		break
	fi
	ok=$(jget "$out" ok)
	accepted=$((accepted + ok))
	printf '%-6s %-7s %-8s %-6s %7s %6s %8s %9s %8s %8s %8s %8s %9s %8s %8s\n' \
	    "$c" "$n" "$s" "$m" "$ok" "$(jget "$out" failed)" \
	    "$(jget "$out" elapsed_s)" "$(jget "$out" msgs_per_s)" \
	    "$(jget "$out" p50_ms)" "$(jget "$out" p90_ms)" \
	    "$(jget "$out" p99_ms)" "$(jget "$out" max_ms)" \
	    "$(jget "$out" relayd_peak_rss_kb)" "$(jget "$out" relayd_cpu_s)" \
	    "$(jget "$out" client_cpu_s)"
	if [ "$rc" -ne 0 ]; then
		echo "  failures: $(printf '%s\n' "$out" |
		    sed -n 's/.*"failures": \({[^}]*}\).*/\1/p')" \
		    "error: $(jget "$out" error)"
		status=1
	fi
	if [ $first = 1 ]; then
		rate=$(jget "$out" msgs_per_s)
		if awk -v r="$rate" -v t=$TARGET_RATE 'BEGIN { exit !(r >= t) }'
		then
			target="met ($rate >= $TARGET_RATE msgs/s)"
		else
			target="NOT met ($rate < $TARGET_RATE msgs/s)"
		fi
		first=0
	fi
done
echo "(peakRSS_kB: relayd VmHWM during that scenario; rd_cpu/cl_cpu:" \
    "CPU seconds of relayd and of the client)"
echo "target    ${target:-not run}"
echo

echo "== checks"
count=$(queue_count)
if [ "$count" = "$accepted" ]; then
	echo "queue     $count messages queued = $accepted accepted: ok"
else
	echo "queue     ${count:-?} messages queued, $accepted accepted: MISMATCH"
	status=1
fi
du_spool=$(du -sk "$tmp/spool" | awk '{ print $1 }')
echo "spool     $du_spool kB on disk"
stop_relayd
start_relayd || exit 1
count=$(queue_count)
if [ "$count" = "$accepted" ]; then
	echo "restart   $count messages recovered after SIGTERM: ok"
else
	echo "restart   ${count:-?} messages recovered, $accepted accepted:" \
	    "MISMATCH"
	status=1
fi
stop_relayd
exit $status
