#!/usr/bin/env bash
# Builds a local base image holding PostgreSQL 15 from Debian's packages, for machines
# that can reach Debian's package archive but no container registry (no `docker pull`).
#
#   docker/build-base-image.sh [TAG]        # default tag: pgentry-base:pg15-bookworm
#
# The image stands in for postgres:15-alpine: the PostgreSQL 15 binaries on PATH, a
# `postgres` user, /var/run/postgresql, PGDATA=/var/lib/postgresql/data. It is made by
# mmdebstrap from this machine's own apt sources (no mirror is named here) and
# `docker import`ed. An existing image with the tag is kept: it is built once per machine
# (set PGENTRY_BASE_REBUILD=1 to build it again).
#
# Runs unattended (CI=true, no stdin). Needs root to install mmdebstrap when it is
# missing, and to build the root filesystem.
set -euo pipefail

TAG="${1:-${PGENTRY_BASE_IMAGE:-pgentry-base:pg15-bookworm}}"
PG_MAJOR=15
PG_BIN="/usr/lib/postgresql/${PG_MAJOR}/bin"

say() { printf 'build-base-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker daemon answers (docker info failed)"

if [ "${PGENTRY_BASE_REBUILD:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG exists; keeping it (PGENTRY_BASE_REBUILD=1 builds it again)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v mmdebstrap >/dev/null; then
    [ "$(id -u)" = 0 ] || die "mmdebstrap is missing; install it (apt-get install mmdebstrap) or run as root"
    say "installing mmdebstrap"
    apt-get update -q </dev/null >/dev/null
    apt-get install -y -q --no-install-recommends mmdebstrap </dev/null >/dev/null
fi

# The suite: this machine's own release, which must carry postgresql-15 (Debian 12,
# bookworm). The package lists come from this machine's apt sources, passed to
# mmdebstrap as files, so whatever mirror or proxy the machine uses is used here too.
. /etc/os-release
SUITE="${PGENTRY_BASE_SUITE:-${VERSION_CODENAME:-}}"
[ -n "$SUITE" ] || die "cannot tell this machine's Debian release from /etc/os-release; set PGENTRY_BASE_SUITE"
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && [ -s "$f" ] && grep -q '^[^#]' "$f" && sources+=("$f")
done
[ "${#sources[@]}" -gt 0 ] || die "no apt sources found under /etc/apt"

# Options of the machine's apt that decide how it reaches the archive (a proxy, a
# repository with an old Release file), carried over as they are.
aptopts=()
while IFS= read -r line; do
    aptopts+=(--aptopt="$line")
done < <(apt-config dump | grep -E '^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date) ' || true)

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

# Hooks run on this machine with the root filesystem as $1.
# Before the PostgreSQL packages: no default cluster (pgentry makes its own PGDATA).
cat >"$workdir/no-cluster.sh" <<'EOF'
set -e
mkdir -p "$1/etc/postgresql-common/createcluster.d"
echo "create_main_cluster = false" >"$1/etc/postgresql-common/createcluster.d/pgentry.conf"
EOF
# After: the socket directory, and nothing that names a mirror or only takes space.
# LLVM (for JIT, 130 MB with z3) goes too: without llvmjit.so PostgreSQL runs with
# JIT unavailable, which changes plans of some very large queries and nothing else.
cat >"$workdir/finish.sh" <<'EOF'
set -e
root="$1"
chroot "$root" id postgres >/dev/null
chroot "$root" dpkg --purge --force-depends libllvm14 libz3-4 >/dev/null 2>&1
rm -rf "$root/usr/lib/postgresql/15/lib/llvmjit"* "$root/usr/lib/postgresql/15/lib/bitcode"
# /run is emptied here rather than by mmdebstrap, which would take /run/postgresql too.
find "$root/run" -mindepth 1 -maxdepth 1 ! -name lock -exec rm -rf {} +
mkdir -p "$root/run/postgresql" "$root/var/lib/postgresql"
chroot "$root" chown postgres:postgres /run/postgresql /var/lib/postgresql
chmod 3775 "$root/run/postgresql"
rm -rf "$root/etc/apt/sources.list" "$root/etc/apt/sources.list.d/"* \
       "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin \
       "$root/usr/share/doc/"* "$root/usr/share/man/"* "$root/usr/share/info/"*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
test -x "$root/usr/lib/postgresql/15/bin/postgres"
EOF

say "building $TAG from Debian $SUITE with postgresql-$PG_MAJOR (sources: ${sources[*]})"
started=$SECONDS
# minbase: Essential and Priority: required only, plus the packages PostgreSQL needs;
# no recommends. The tarball goes straight into `docker import`.
mmdebstrap \
    --quiet \
    --variant=minbase \
    --skip=cleanup/run \
    --mode=root \
    --format=tar \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='APT::Install-Suggests "false"' \
    "${aptopts[@]}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --essential-hook="sh $workdir/no-cluster.sh \"\$1\"" \
    --include="postgresql-$PG_MAJOR,postgresql-client-$PG_MAJOR,ca-certificates" \
    --customize-hook="sh $workdir/finish.sh \"\$1\"" \
    "$SUITE" "$workdir/rootfs.tar" "${sources[@]}" </dev/null

docker import \
    --change "ENV PATH=$PG_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV PG_MAJOR=$PG_MAJOR" \
    --change "ENV PGDATA=/var/lib/postgresql/data" \
    --change "ENV LANG=C.UTF-8" \
    --change 'VOLUME /var/lib/postgresql/data' \
    --change 'EXPOSE 5432' \
    --change 'CMD ["postgres"]' \
    --message "PostgreSQL $PG_MAJOR from Debian $SUITE packages, built by docker/build-base-image.sh" \
    "$workdir/rootfs.tar" "$TAG" >/dev/null

docker run --rm --network none "$TAG" postgres --version >&2
say "built $TAG in $((SECONDS - started)) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
