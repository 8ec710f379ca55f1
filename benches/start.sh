#!/usr/bin/env bash
# Start-up benchmark: pgentry against the shell baseline (../shared/baseline), side by
# side on the same primary, in one run. Measurements, not tests: nothing here fails on
# timing. Needs root (servers run as the postgres user), PostgreSQL 15, hyperfine.
#
#   benches/start.sh            # RUNS=5 by default; writes benches/RESULTS-start.md
#
# (a) primary up: from start to "started streaming WAL" in the replica's log
# (b) primary started 1 s after the replica: from the primary's "ready to accept
#     connections" to the replica's "started streaming WAL"
# (c) restart with a valid PGDATA: start until postgres is exec'd; postgres is
#     replaced by /bin/true so that hyperfine times exactly the entrypoint's work
# (d) primary restart, nothing changed / replication password rotated, same method
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
PG_BIN=/usr/lib/postgresql/15/bin
BASELINE=$(cd ../shared/baseline && pwd)
OUT=${OUT:-benches/RESULTS-start.md}

[ "$(id -u)" = 0 ] || { echo "run as root: servers run as the postgres user" >&2; exit 1; }
command -v hyperfine >/dev/null || { echo "install hyperfine (apt-get install hyperfine)" >&2; exit 1; }
cargo build --release -q
PGENTRY=$PWD/target/x86_64-unknown-linux-gnu/release/pgentry

work=$(mktemp -d /tmp/pgentry-bench.XXXXXX)
chmod 755 "$work"; chown postgres "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  sleep 1
  for d in "$work"/pgentry "$work"/baseline "$work"/primary; do $AS_PG "$PG_BIN/pg_ctl" -D "$d" -m immediate stop; done >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
# setpriv, not runuser: no PAM session, no signal relaying, no start-up cost of its own.
AS_PG="setpriv --reuid=postgres --regid=postgres --init-groups"
as_pg() { $AS_PG "$@"; }
now_ns() { date +%s%N; }
# Nanoseconds of a server log line's timestamp ("2026-11-26 18:21:00.212 UTC ...").
log_ns() { date -d "$(echo "$1" | cut -d' ' -f1-3)" +%s%N; }
wait_log() { # file pattern -> the first matching line, waiting up to 120 s
  for _ in $(seq 2400); do
    line=$(grep -m1 "$2" "$1" 2>/dev/null || true)
    [ -n "$line" ] && { echo "$line"; return; }
    sleep 0.05
  done
  echo "timed out waiting for '$2' in $1" >&2; exit 1
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ms() { awk -v ns="$1" 'BEGIN {printf "%.0f", ns/1e6}'; }

PPORT=$(( 20000 + RANDOM % 20000 ))
PSOCK=$work/psock
# The baseline breaks on a password with a space or quote (a known defect), so a plain one.
PW="benchpw"
install -d -o postgres -m 755 "$PSOCK"
install -d -o postgres -m 700 "$work/primary"
printf '%s' "$PW" > "$work/pw"; chmod 600 "$work/pw"; chown postgres "$work/pw"
as_pg "$PG_BIN/initdb" -D "$work/primary" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
cat >> "$work/primary/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
log_line_prefix = '%m [%p] '
log_timezone = 'UTC'
CONF
echo "host replication replicator 127.0.0.1/32 scram-sha-256" >> "$work/primary/pg_hba.conf"
start_primary() { as_pg "$PG_BIN/pg_ctl" -D "$work/primary" -o "-p $PPORT -k $PSOCK" -l "$work/primary.log" -w start >/dev/null; }
stop_primary() { as_pg "$PG_BIN/pg_ctl" -D "$work/primary" -m fast -w stop >/dev/null; }
psql_p() { "$PG_BIN/psql" -XAtq -h "$PSOCK" -p "$PPORT" -U postgres -d postgres -c "$1"; }
start_primary
psql_p "CREATE ROLE replicator LOGIN REPLICATION PASSWORD '$PW'" 
psql_p "SELECT pg_create_physical_replication_slot('replica_slot')" >/dev/null
psql_p "CREATE TABLE filler AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g" 
size=$(psql_p "SELECT pg_size_pretty(pg_database_size('postgres'))")

# One replica start. $1 = pgentry|baseline, $2 = PGDATA; logs to $2.log.
launch() {
  local kind=$1 data=$2 port=$(( PPORT + 1 + RANDOM % 1000 ))
  rm -rf "$data" "$data.log"
  if [ "$kind" = pgentry ]; then
    env -i PATH="$PATH" PGDATA="$data" PGPORT="$port" PGENTRY_SOCKET_DIR="$work/rsock" \
      PGENTRY_PG_BIN="$PG_BIN" PGENTRY_PRIMARY_HOST=127.0.0.1 PGENTRY_PRIMARY_PORT="$PPORT" \
      PGENTRY_SLOT=bench_pgentry PGENTRY_REPLICATION_PASSWORD_FILE="$work/pw" \
      "$PGENTRY" run -- -k "$work/rsock" >"$data.log" 2>&1 &
  else
    install -d -o postgres -m 700 "$data"
    env -i PATH="$PG_BIN:$PATH" PGDATA="$data" PGPORT="$port" PRIMARY_HOST=127.0.0.1 PRIMARY_PORT="$PPORT" \
      REPLICATION_PASSWORD_FILE="$work/pw" $AS_PG sh "$BASELINE/init-replica.sh" \
      -k "$work/rsock" >"$data.log" 2>&1 &
  fi
  pids+=($!)
}
stop_last() { # $1 = PGDATA of the replica
  as_pg "$PG_BIN/pg_ctl" -D "$1" -m fast -w stop >/dev/null 2>&1 || kill -INT "${pids[-1]}" 2>/dev/null
  wait "${pids[-1]}" 2>/dev/null || true
  unset 'pids[-1]'
}
install -d -o postgres -m 755 "$work/rsock"

declare -A A B
for run in $(seq "$RUNS"); do
  for kind in pgentry baseline; do
    t0=$(now_ns); launch "$kind" "$work/$kind"
    line=$(wait_log "$work/$kind.log" "started streaming WAL")
    A[$kind]+="$(( $(log_ns "$line") - t0 )) "
    stop_last "$work/$kind"
    psql_p "SELECT pg_drop_replication_slot('bench_pgentry') WHERE EXISTS (SELECT FROM pg_replication_slots WHERE slot_name='bench_pgentry')" >/dev/null
  done
  # pg_basebackup alone, the floor of (a).
  t0=$(now_ns)
  PGPASSWORD="$PW" "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PPORT" -U replicator -D "$work/bb" -X stream -c fast 2>/dev/null
  A[pg_basebackup]+="$(( $(now_ns) - t0 )) "
  rm -rf "$work/bb"
done

for run in $(seq "$RUNS"); do
  for kind in pgentry baseline; do
    stop_primary
    launch "$kind" "$work/$kind"
    sleep 1
    : > "$work/primary.log"
    start_primary
    ready=$(wait_log "$work/primary.log" "ready to accept connections")
    line=$(wait_log "$work/$kind.log" "started streaming WAL")
    B[$kind]+="$(( $(log_ns "$line") - $(log_ns "$ready") )) "
    stop_last "$work/$kind"
    psql_p "SELECT pg_drop_replication_slot('bench_pgentry') WHERE EXISTS (SELECT FROM pg_replication_slots WHERE slot_name='bench_pgentry')" >/dev/null
  done
done

# (c): valid standbys of both kinds exist from the last run; postgres becomes true.
install -d -o postgres "$work/fakebin"
ln -sf /bin/true "$work/fakebin/postgres"
chown -R postgres "$work/pw"
hyperfine -N --warmup 5 --runs 200 --export-markdown "$work/c.md" \
  -n "pgentry restart, primary up" \
  "$AS_PG env -i PGDATA=$work/pgentry PGPORT=1 PGENTRY_SOCKET_DIR=$work/rsock PGENTRY_PG_BIN=$work/fakebin PGENTRY_PRIMARY_HOST=127.0.0.1 PGENTRY_PRIMARY_PORT=$PPORT PGENTRY_SLOT=bench_pgentry PGENTRY_REPLICATION_PASSWORD_FILE=$work/pw $PGENTRY run" \
  -n "pgentry restart, primary down" \
  "$AS_PG env -i PGDATA=$work/pgentry PGPORT=1 PGENTRY_SOCKET_DIR=$work/rsock PGENTRY_PG_BIN=$work/fakebin PGENTRY_PRIMARY_HOST=127.0.0.1 PGENTRY_PRIMARY_PORT=1 PGENTRY_SLOT=bench_pgentry PGENTRY_REPLICATION_PASSWORD_FILE=$work/pw $PGENTRY run" \
  -n "baseline init-replica.sh restart" \
  "$AS_PG env -i PATH=$work/fakebin:$PG_BIN:/usr/bin:/bin PGDATA=$work/baseline PGPORT=1 PRIMARY_HOST=127.0.0.1 PRIMARY_PORT=$PPORT REPLICATION_PASSWORD_FILE=$work/pw sh $BASELINE/init-replica.sh" \
  -n "exec of postgres alone (/bin/true)" \
  "$AS_PG env -i $work/fakebin/postgres" >/dev/null

# (d): a primary made by pgentry, restarted with nothing changed, and with the
# replication password rotated before every run (temporary server, real postgres).
stop_primary
install -d -o postgres -m 755 "$work/psock2"
penv=(PGENTRY_ROLE=primary PGDATA="$work/pprimary" PGPORT=$((PPORT + 2000)) PGENTRY_SOCKET_DIR="$work/psock2"
      POSTGRES_PASSWORD_FILE="$work/pw" PGENTRY_REPLICATION_PASSWORD_FILE="$work/rpw" PGENTRY_INITDB_DIR=/nonexistent)
printf 'one' > "$work/rpw"; chown postgres "$work/rpw"
# The temporary setup server (listen_addresses empty) is real; the final exec is not.
cat > "$work/fakebin/postgres-setup" <<SH
#!/bin/sh
for a in "\$@"; do [ "\$a" = "listen_addresses=" ] && exec $PG_BIN/postgres "\$@"; done
exit 0
SH
chmod 755 "$work/fakebin/postgres-setup"
install -d -o postgres "$work/setupbin"
cp "$work/fakebin/postgres-setup" "$work/setupbin/postgres"
ln -sf "$PG_BIN/initdb" "$work/setupbin/initdb"
$AS_PG env -i "${penv[@]}" PGENTRY_PG_BIN="$work/setupbin" "$PGENTRY" run >/dev/null 2>&1
hyperfine -N --warmup 3 --runs 100 --export-markdown "$work/d1.md" \
  -n "pgentry primary restart, unchanged" \
  "$AS_PG env -i ${penv[*]} PGENTRY_PG_BIN=$work/fakebin $PGENTRY run" >/dev/null
hyperfine --warmup 1 --runs 10 --export-markdown "$work/d2.md" \
  --prepare "sh -c 'head -c 12 /dev/urandom | base64 > $work/rpw'" \
  -n "pgentry primary restart, password rotated" \
  "$AS_PG env -i ${penv[*]} PGENTRY_PG_BIN=$work/setupbin $PGENTRY run" >/dev/null

row() { # name, list of ns
  local med; med=$(echo "$2" | tr ' ' '\n' | grep . | median)
  printf '| %s | %s | %s |\n' "$1" "$(ms "$med")" "$(for v in $2; do printf '%s ' "$(ms "$v")"; done)"
}
{
  echo "# Start-up benchmark"
  echo
  echo "\`benches/start.sh\` on $(nproc) cores, $(date -u +%F), primary database $size, $RUNS runs each (medians, ms)."
  echo
  echo "## (a) primary up: start → streaming"
  echo
  echo "| | median ms | runs ms |"
  echo "|---|---|---|"
  row "pgentry" "${A[pgentry]}"
  row "baseline init-replica.sh" "${A[baseline]}"
  row "pg_basebackup alone" "${A[pg_basebackup]}"
  echo
  echo "## (b) primary starts 1 s after the replica: primary ready → streaming"
  echo
  echo "| | median ms | runs ms |"
  echo "|---|---|---|"
  row "pgentry" "${B[pgentry]}"
  row "baseline init-replica.sh" "${B[baseline]}"
  echo
  echo "## (c) replica restart with a valid PGDATA: start → exec of postgres"
  echo
  cat "$work/c.md"
  echo
  echo "## (d) primary restart: start → exec of postgres"
  echo
  cat "$work/d1.md"
  echo
  cat "$work/d2.md"
} > "$OUT"
cat "$OUT"
