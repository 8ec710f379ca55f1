#!/bin/sh
# Deploys compose/docker-compose.yml to Docker Swarm:
#
#   compose/stack-deploy.sh [docker stack deploy options] STACK
#
# `docker stack deploy` refuses the long form of depends_on (condition:
# service_healthy), which docker-compose needs, so the lines between the
# ">>> compose only" and "<<< compose only" markers are dropped; nothing else changes.
# Swarm has no start order anyway: the replica's pgentry waits for the primary.
# Two defaults differ from docker-compose, each overridable from the environment:
# - PGENTRY_REPLICA_HOSTNAME={{.Node.Hostname}}: each replica's host name, and so its
#   slot, is its node's, matching the node-local volume it runs on;
# - PGENTRY_HEALTHCHECK_MODE=--liveness: Swarm replaces unhealthy tasks, and a replica
#   that is catching up or whose primary is away must not be killed for it.
set -eu
cd "$(dirname "$0")"
[ -n "${PGENTRY_REPLICA_HOSTNAME:-}" ] || PGENTRY_REPLICA_HOSTNAME='{{.Node.Hostname}}'
[ -n "${PGENTRY_HEALTHCHECK_MODE:-}" ] || PGENTRY_HEALTHCHECK_MODE=--liveness
export PGENTRY_REPLICA_HOSTNAME PGENTRY_HEALTHCHECK_MODE
sed '/# >>> compose only/,/# <<< compose only/d' docker-compose.yml |
    docker stack deploy --compose-file - "$@"
