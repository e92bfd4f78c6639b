#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the multi-worker tests; print its URL.
# Needs Debian's postgresql package and root (it runs the server as the postgres user).
set -euo pipefail
# A free loopback port, so that a server left running elsewhere does not get in the way.
port=${PGPORT_TEST:-$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
password=${PGPASSWORD_TEST:-merge-search-test-pw}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
data=$(mktemp -d /tmp/merge-search-pg.XXXXXX)
chown postgres "$data"
pwfile=$(mktemp); echo "$password" > "$pwfile"; chmod 644 "$pwfile"
su postgres -c "$bin/initdb -D $data -U postgres --auth-local=trust --auth-host=scram-sha-256 --pwfile=$pwfile" >/dev/null
rm -f "$pwfile"
su postgres -c "$bin/pg_ctl -D $data -o '-h 127.0.0.1 -p $port -k /tmp -c max_connections=200' -l $data/server.log -w start" >/dev/null
su postgres -c "$bin/createdb -h /tmp -p $port merge_search"
echo "postgresql+psycopg2://postgres:$password@127.0.0.1:$port/merge_search"
