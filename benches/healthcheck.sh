#!/usr/bin/env bash
# Healthcheck benchmark: `pgentry healthcheck` against the shell scripts it replaces
# (../shared/baseline/healthcheck-{primary,replica}.sh: pg_isready + psql, PostgreSQL
# 15's own client binaries first on PATH), on the same primary and replica, paired in
# one hyperfine run, with pg_isready alone as the reference; then the peak RSS of each
# (median of RSS_RUNS runs of /usr/bin/time). Measurements, not tests: nothing here
# fails on timing.
#
#   benches/healthcheck.sh     # as root; writes benches/RESULTS-healthcheck.md
#
# Needs PostgreSQL 15 in /usr/lib/postgresql/15/bin, hyperfine and GNU time (both
# installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-300}
RSS_RUNS=${RSS_RUNS:-15}
PG_BIN=/usr/lib/postgresql/15/bin
BASELINE=$(cd ../shared/baseline && pwd)
OUT=${OUT:-benches/RESULTS-healthcheck.md}

[ "$(id -u)" = 0 ] || { echo "run as root: the servers run as the postgres user" >&2; exit 1; }
[ -x "$PG_BIN/postgres" ] || { echo "PostgreSQL 15 is missing: apt-get install postgresql-15" >&2; exit 1; }
missing=()
command -v hyperfine >/dev/null || missing+=(hyperfine)
[ -x /usr/bin/time ] || missing+=(time)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
cargo build --release -q
PGENTRY=$PWD/target/x86_64-unknown-linux-gnu/release/pgentry

work=$(mktemp -d /tmp/pgentry-bench-health.XXXXXX)
chmod 755 "$work"; chown postgres "$work"
replica_pid=
cleanup() {
  [ -z "$replica_pid" ] || { kill -INT "$replica_pid" 2>/dev/null || true; wait "$replica_pid" 2>/dev/null || true; }
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/primary" -m fast -w stop >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
as_pg() { runuser -u postgres -- "$@"; }

# The primary: plain initdb, as the image would have it (local trust, host SCRAM).
PPORT=$(( 20000 + RANDOM % 20000 ))
RPORT=$(( PPORT + 1 ))
PSOCK=$work/psock
RSOCK=$work/rsock
install -d -o postgres -m 755 "$PSOCK" "$RSOCK"
install -d -o postgres -m 700 "$work/primary"
as_pg "$PG_BIN/initdb" -D "$work/primary" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
echo "listen_addresses = '127.0.0.1'" >> "$work/primary/postgresql.conf"
echo "host replication replicator 127.0.0.1/32 scram-sha-256" >> "$work/primary/pg_hba.conf"
as_pg "$PG_BIN/pg_ctl" -D "$work/primary" -o "-p $PPORT -k $PSOCK" -l "$work/primary.log" -w start >/dev/null
psql_at() { "$PG_BIN/psql" -XAtq -h "$1" -p "$2" -U postgres -d postgres -c "$3"; }
psql_at "$PSOCK" "$PPORT" "CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'bench-pw'"

# The replica: a real pgentry replica of it.
printf 'bench-pw' > "$work/pw"
chmod 600 "$work/pw"
replica_env=(PGENTRY_CONFIG= PGENTRY_ROLE=replica PGDATA="$work/replica" PGPORT="$RPORT"
  PGENTRY_SOCKET_DIR="$RSOCK" PGENTRY_PG_BIN="$PG_BIN" PGENTRY_PRIMARY_HOST=127.0.0.1
  PGENTRY_PRIMARY_PORT="$PPORT" PGENTRY_SLOT=bench PGENTRY_REPLICATION_PASSWORD_FILE="$work/pw")
env -i PATH="$PATH" "${replica_env[@]}" "$PGENTRY" run >"$work/replica.log" 2>&1 &
replica_pid=$!
for _ in $(seq 1200); do
  [ "$(psql_at "$RSOCK" "$RPORT" "SELECT status FROM pg_stat_wal_receiver" 2>/dev/null)" = streaming ] && break
  sleep 0.1
done
[ "$(psql_at "$RSOCK" "$RPORT" "SELECT status FROM pg_stat_wal_receiver")" = streaming ] \
  || { echo "the replica does not stream; see $work/replica.log (KEEP=1 keeps it)" >&2; exit 1; }

# The commands, each with its own environment as a container would give it: the
# baseline reads libpq's variables, pgentry its own configuration.
pg_primary="PATH=$PG_BIN:/usr/bin:/bin PGHOST=$PSOCK PGPORT=$PPORT PGUSER=postgres PGDATABASE=postgres"
pg_replica="PATH=$PG_BIN:/usr/bin:/bin PGHOST=$RSOCK PGPORT=$RPORT PGUSER=postgres PGDATABASE=postgres"
names=(
  "pgentry healthcheck, primary"
  "healthcheck-primary.sh"
  "pgentry healthcheck, replica"
  "healthcheck-replica.sh"
  "pg_isready alone, primary"
)
envs=(
  "PGENTRY_CONFIG= PGENTRY_ROLE=primary PGPORT=$PPORT PGENTRY_SOCKET_DIR=$PSOCK"
  "$pg_primary"
  "${replica_env[*]}"
  "$pg_replica"
  "$pg_primary"
)
programs=(
  "$PGENTRY healthcheck"
  "sh $BASELINE/healthcheck-primary.sh"
  "$PGENTRY healthcheck"
  "sh $BASELINE/healthcheck-replica.sh"
  "pg_isready -q"
)
# Every check must pass before it is timed: a failing check is not a benchmark.
for i in "${!names[@]}"; do
  env -i ${envs[$i]} ${programs[$i]} >/dev/null \
    || { echo "failed: ${names[$i]}: ${envs[$i]} ${programs[$i]}" >&2; exit 1; }
done

# One hyperfine run, all five interleaved in one session. Its shell (sh -c, whose
# start-up hyperfine measures and subtracts) sets each command's environment.
args=()
for i in "${!names[@]}"; do args+=(-n "${names[$i]}" "${envs[$i]} ${programs[$i]}"); done
env -i PATH=/usr/bin:/bin hyperfine --warmup 20 --runs "$RUNS" --shell=sh \
  --export-markdown "$work/hyperfine.md" --export-json "$work/hyperfine.json" "${args[@]}" >/dev/null

# Medians from the JSON (one "median" per command, in order), in ms.
mapfile -t medians < <(awk -F'[:,]' '/"median"/ {printf "%.2f\n", $2 * 1000}' "$work/hyperfine.json")
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# Peak RSS in KiB, median of RSS_RUNS. GNU time reports what wait4 says of its
# child: the largest of the process and every child it waited for, so a script's
# peak is its largest process (psql), not a sum.
rss() {
  for _ in $(seq "$RSS_RUNS"); do
    env -i ${envs[$1]} /usr/bin/time -f %M -o "$work/rss" ${programs[$1]} >/dev/null 2>&1 || true
    cat "$work/rss"
  done | median
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f×", a / b}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.2f", k / 1024}'; }

{
  echo "# Healthcheck benchmark"
  echo
  echo "\`benches/healthcheck.sh\`, $(date -u +%F), $(nproc) cores, $(uname -r), hyperfine $(hyperfine --version | cut -d' ' -f2),"
  echo "PostgreSQL $("$PG_BIN/postgres" -V | awk '{print $3}'), release binary $(stat -c %s "$PGENTRY") bytes; $RUNS runs each,"
  echo "one primary and one pgentry replica (streaming), unix sockets, the check run as root."
  echo
  echo "| check | median ms | vs pgentry | peak RSS MiB (median of $RSS_RUNS) |"
  echo "|---|---|---|---|"
  for i in "${!names[@]}"; do
    case $i in
      0|2) vs="1.0×" ;;
      1) vs=$(ratio "${medians[1]}" "${medians[0]}") ;;
      3) vs=$(ratio "${medians[3]}" "${medians[2]}") ;;
      4) vs=$(ratio "${medians[4]}" "${medians[0]}") ;;
    esac
    echo "| ${names[$i]} | ${medians[$i]} | $vs | $(mib "$(rss "$i")") |"
  done
  echo
  echo "\"vs pgentry\": the row's median over pgentry's on the same server (the scripts"
  echo "against pgentry on their own role, pg_isready against the primary check)."
  echo
  echo "hyperfine's own table (mean ± σ):"
  echo
  cat "$work/hyperfine.md"
} > "$OUT"
cat "$OUT"
