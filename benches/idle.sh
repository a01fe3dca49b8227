#!/usr/bin/env bash
# What an idle daemon costs: starts the bundled simulators (`sync-daemon sim`) and a daemon
# polling every 15 minutes, lets the start-up backfill finish, then samples the daemon's RSS, CPU
# time and wake-ups from /proc over a period and prints RSS, CPU seconds per hour and wake-ups
# per hour (voluntary context switches, summed over the daemon's threads, with the threads that
# woke named), extrapolated. Targets (issue 14): RSS <= 20 MiB, <= 1 CPU-second an hour, no
# wake-ups from the worker while nothing is queued or due.
#
#   benches/idle.sh                      # 60 s sample, 1000 clients + 300 patients synced first
#   IDLE_SECS=600 benches/idle.sh        # a longer sample
#
# Environment:
#   IDLE_SECS         sampling period in seconds (default 60)
#   IDLE_CLIENTS      Wodify clients seeded (default 1000)
#   IDLE_PATIENTS     PracticeHub patients seeded (default 300)
#   IDLE_TRACE        set to print RSS and CPU every 10 s while sampling
#   IDLE_OUT          also write the summary to this file
#   SYNC_DAEMON_BIN   the binary (default: target/release/sync-daemon under CARGO_TARGET_DIR or
#                     ./target, built with `cargo build --release` when missing)
#
# Linux only (reads /proc). Needs curl.
set -euo pipefail

IDLE_SECS=${IDLE_SECS:-60}
IDLE_CLIENTS=${IDLE_CLIENTS:-1000}
IDLE_PATIENTS=${IDLE_PATIENTS:-300}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${SYNC_DAEMON_BIN:-$TARGET/release/sync-daemon}

if [[ ! -x $BIN ]]; then
  echo "building $BIN ..." >&2
  (cd "$ROOT" && cargo build --release --quiet)
fi

WORK=$(mktemp -d -t sync-daemon-idle.XXXXXX)
SIM_PID=
DAEMON_PID=
cleanup() {
  [[ -n $DAEMON_PID ]] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  [[ -n $SIM_PID ]] && kill -TERM "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A loopback port nothing listens on.
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

wait_for() { # description, timeout secs, command...
  local what=$1 timeout=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "timed out waiting for $what" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# Simulators.
RK=$(free_port) WO=$(free_port) PH=$(free_port) LISTEN=$(free_port)
"$BIN" sim --revkeen-port "$RK" --wodify-port "$WO" --practicehub-port "$PH" \
  --clients "$IDLE_CLIENTS" --patients "$IDLE_PATIENTS" >"$WORK/sim.out" 2>"$WORK/sim.err" &
SIM_PID=$!
wait_for "the simulators" 20 grep -q '^\[\[sources\]\]' "$WORK/sim.out"

# Their config, with our state file, listen address and a 15-minute schedule for every source,
# its quarter hours placed so that no poll falls in the sample (start-up, the backfill and the
# sample fit before the first one when IDLE_SECS is at most 12 minutes; a longer sample
# includes polls, as a real idle hour does).
minute=$((10#$(date -u +%M)))
first=$(((minute + 2 + (IDLE_SECS + 59) / 60) % 15))
quarters="$first,$((first + 15)),$((first + 30)),$((first + 45))"
sed -n '/^\[daemon\]/,$p' "$WORK/sim.out" |
  sed -e "s#^state_path = .*#state_path = \"$WORK/state.db\"\nlisten = \"127.0.0.1:$LISTEN\"#" \
    -e "s#^schedule = .*#schedule = \"0 $quarters * * * *\"#" >"$WORK/config.toml"

# The daemon.
"$BIN" --config "$WORK/config.toml" 2>"$WORK/daemon.err" &
DAEMON_PID=$!
wait_for "/healthz" 20 curl -fsS "http://127.0.0.1:$LISTEN/healthz"

# The start-up backfill: both sources' first poll finished ok (`status --json` has one
# `"outcome": "ok"` per source) and the outbox is empty.
backfilled() {
  local status
  status=$("$BIN" --config "$WORK/config.toml" status --json) || return 1
  [[ $(grep -c '"outcome": "ok"' <<<"$status") -eq 2 ]] && grep -q '"outbox_depth": 0,' <<<"$status"
}
wait_for "the start-up backfill" 300 backfilled
# Let the last acknowledgements and log lines settle, and the daemon hand memory back (10 s
# after its worker parks, with no poll running).
sleep 15

TICK=$(getconf CLK_TCK)
cpu_ticks() { # utime + stime, fields 14 and 15 of /proc/PID/stat (after the ")" of comm)
  sed 's/^.*) //' "/proc/$DAEMON_PID/stat" | awk '{ print $12 + $13 }'
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$DAEMON_PID/status"; }
rss_parts() { awk '/^Rss(Anon|File):/ { printf "%s %.1f MiB  ", $1, $2 / 1024 }' "/proc/$DAEMON_PID/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON_PID/status"; }
# One line per live thread: tid, voluntary and involuntary context switches, name.
threads() {
  local task tid comm
  for task in "/proc/$DAEMON_PID/task/"*; do
    tid=${task##*/}
    comm=$(tr ' ' '_' <"$task/comm" 2>/dev/null) || continue
    awk -v tid="$tid" -v comm="$comm" '
      /^voluntary_ctxt_switches:/ { v = $2 }
      /^nonvoluntary_ctxt_switches:/ { n = $2 }
      END { if (v != "") print tid, v, n, comm }' "$task/status" 2>/dev/null || true
  done
}

threads >"$WORK/threads.start"
start_ticks=$(cpu_ticks)
start_rss=$(rss_kib)
peak_rss=$start_rss
echo "sampling the idle daemon (pid $DAEMON_PID) for ${IDLE_SECS} s ..." >&2
end=$((SECONDS + IDLE_SECS))
while ((SECONDS < end)); do
  sleep 1
  kill -0 "$DAEMON_PID" 2>/dev/null || { echo "the daemon exited" >&2; cat "$WORK/daemon.err" >&2; exit 1; }
  rss=$(rss_kib)
  ((rss > peak_rss)) && peak_rss=$rss
  if [[ -n ${IDLE_TRACE:-} ]] && ((SECONDS % 10 == 0)); then
    echo "  t=$((IDLE_SECS - end + SECONDS)) s  RSS $((rss / 1024)) MiB  $(rss_parts) CPU ticks $(($(cpu_ticks) - start_ticks))" >&2
  fi
done
parts=$(rss_parts)
threads >"$WORK/threads.end"
end_ticks=$(cpu_ticks)
end_rss=$(rss_kib)
hwm=$(hwm_kib)

# Wake-ups: per thread, the end count less the start count (a thread born while sampling
# counts from 0; one that ended while sampling is lost, and counted as such).
wakeups=$(awk -v secs="$IDLE_SECS" '
  NR == FNR { v0[$1] = $2; n0[$1] = $3; next }
  { dv = $2 - v0[$1]; dn = $3 - n0[$1]; seen[$1] = 1
    tv += dv; tn += dn
    if (dv > 0) by = by sprintf("%s%s %d", (by == "" ? "" : ", "), $4, dv) }
  END {
    for (t in v0) if (!(t in seen)) gone++
    printf "%d %d %d %s\n", tv, tn, gone, (by == "" ? "none" : by)
  }' "$WORK/threads.start" "$WORK/threads.end")
read -r vol invol gone woke <<<"$wakeups"

summary=$(awk -v secs="$IDLE_SECS" -v t0="$start_ticks" -v t1="$end_ticks" -v tick="$TICK" \
  -v r0="$start_rss" -v r1="$end_rss" -v rp="$peak_rss" -v hwm="$hwm" \
  -v parts="$parts" -v clients="$IDLE_CLIENTS" -v patients="$IDLE_PATIENTS" \
  -v vol="$vol" -v invol="$invol" -v gone="$gone" -v woke="$woke" -v load="$(cut -d' ' -f1-3 /proc/loadavg)" 'BEGIN {
  cpu = (t1 - t0) / tick
  printf "idle daemon after syncing %d clients + %d patients, sampled %d s (load average %s)\n", clients, patients, secs, load
  printf "  RSS idle:             %.1f MiB at start, %.1f MiB at end, %.1f MiB peak (target <= 20 MiB)\n", r0/1024, r1/1024, rp/1024
  printf "  RSS high-water mark:  %.1f MiB (includes the start-up backfill)\n", hwm/1024
  printf "  RSS at end by kind:   %s\n", parts
  printf "  CPU while idle:       %.2f s in %d s = %.1f CPU-seconds per hour (resolution %.1f s/h; target <= 1)\n", cpu, secs, cpu * 3600 / secs, 3600 / secs / tick
  printf "  wake-ups while idle:  %d voluntary context switches in %d s = %.0f per hour (%d involuntary)\n", vol, secs, vol * 3600 / secs, invol
  printf "  threads that woke:    %s%s\n", woke, (gone > 0 ? sprintf(" (%d thread(s) ended while sampling, not counted)", gone) : "")
}')
echo "$summary"
if [[ -n ${IDLE_OUT:-} ]]; then
  echo "$summary" >"$IDLE_OUT"
fi
