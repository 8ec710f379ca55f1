#!/bin/sh
# Creates the stack's two secret files, once: random passwords, readable by their owner
# only, in compose/secrets/ (or $PGENTRY_SECRETS_DIR, which docker-compose.yml reads
# too). Existing files are kept, so running it again changes nothing; to rotate a
# password, replace its file and restart the stack.
#
#   compose/make-secrets.sh
set -eu
dir="${PGENTRY_SECRETS_DIR:-$(dirname "$0")/secrets}"
umask 077
mkdir -p "$dir"
for name in postgres_password replication_password; do
    file="$dir/$name"
    if [ -s "$file" ]; then
        echo "make-secrets: keeping $file"
        continue
    fi
    # 32 random bytes as base64 without padding: 43 characters, nothing to escape.
    head -c 32 /dev/urandom | base64 | tr -d '=\n' >"$file.tmp"
    mv "$file.tmp" "$file"
    echo "make-secrets: wrote $file"
done
