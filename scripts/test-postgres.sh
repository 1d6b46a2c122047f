#!/usr/bin/env bash
# A PostgreSQL (15 or later) for the test suite: the shared library's store
# (`roe-library-pg`) is tested against a real server, and no test skips for want of one.
# Sourced by scripts/test.sh; when it returns, ROE_TEST_DATABASE_URL is exported and a server
# answers there whose role may CREATE DATABASE (each test makes a database of its own).
#
#   1. ROE_TEST_DATABASE_URL set: that server (it must answer, or this fails).
#   2. A server on 127.0.0.1:5432 (the CI machines' and the dev machines', trust auth): as
#      the role `postgres`, else as the current user, whichever may create databases.
#   3. Otherwise a private cluster from PostgreSQL's own binaries (initdb, pg_ctl: found on
#      PATH, in /usr/lib/postgresql/*/bin newest first, /usr/local/pgsql/bin, /usr/local/bin,
#      Homebrew's postgresql@*), installed with the distribution's package when apt-get may
#      (root, or sudo without a password), else this says what to install and fails. The
#      cluster lives in a temporary directory, trust auth, on 127.0.0.1 and a free port, with
#      fsync off (nothing in it outlives the run); as root it runs as an unprivileged user
#      (`postgres`, else `nobody`, else a `roe-pg` user it creates), since PostgreSQL refuses
#      root. `roe_pg_stop` stops it and removes the directory: it is registered on EXIT
#      (before whatever EXIT trap was set); a caller that sets an EXIT trap of its own later
#      must call `roe_pg_stop` from it.
#
# ROE_TEST_PG_PRIVATE=1 skips 1 and 2 (to test the private cluster where a server runs).
#
#   source scripts/test-postgres.sh                  # from a script (scripts/test.sh)
#   scripts/test-postgres.sh [command args...]       # runs the command with the database
set -euo pipefail

roe_pg_say() { echo "test-postgres: $*" >&2; }

# A URL fit for messages: its password, if any, hidden.
roe_pg_redact() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"; }

# Runs psql (PATH's, else the private cluster's binaries') on a URL: no password prompt,
# no psqlrc, a bounded connect.
roe_pg_psql() {
  local url=$1
  shift
  local psql
  psql="$(command -v psql || true)"
  if [[ -z "$psql" && -n "${ROE_PG_BINDIR:-}" && -x "$ROE_PG_BINDIR/psql" ]]; then
    psql="$ROE_PG_BINDIR/psql"
  fi
  [[ -n "$psql" ]] || return 127
  PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-5}" "$psql" -X -w -v ON_ERROR_STOP=1 -Atq -d "$url" "$@"
}

roe_pg_have_psql() {
  command -v psql >/dev/null 2>&1 || [[ -n "${ROE_PG_BINDIR:-}" && -x "$ROE_PG_BINDIR/psql" ]]
}

# Whether the server at the URL answers (accepting connections).
roe_pg_answers() {
  local url=$1
  if roe_pg_have_psql; then
    roe_pg_psql "$url" -c 'select 1' >/dev/null 2>&1
  elif command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -t 5 -d "$url"
  else
    return 127
  fi
}

# Whether the URL's server is 15 or later and its role may create databases ("" when that
# holds, else what is wrong).
roe_pg_unfit() {
  local url=$1 out
  if ! out="$(roe_pg_psql "$url" -F ' ' -c \
    "select current_setting('server_version_num')::int, (select rolcreatedb or rolsuper from pg_roles where rolname = current_user)" 2>&1)"; then
    echo "cannot connect: ${out//$'\n'/ }"
    return
  fi
  local version createdb
  read -r version createdb <<<"$out"
  if ((version < 150000)); then
    echo "PostgreSQL $((version / 10000)) is too old (15 or later needed)"
  elif [[ "$createdb" != "t" ]]; then
    echo "its role may not CREATE DATABASE"
  fi
}

# Bin directories that may hold initdb and pg_ctl, in the order they are tried.
roe_pg_candidate_bindirs() {
  local p
  for p in initdb pg_ctl; do
    if command -v "$p" >/dev/null 2>&1; then
      dirname "$(readlink -f "$(command -v "$p")")"
      dirname "$(command -v "$p")"
    fi
  done
  # /usr/lib/postgresql/<major>/bin (Debian), newest major first.
  for p in /usr/lib/postgresql/*/bin; do
    if [[ -d "$p" ]]; then echo "$p"; fi
  done | sort -t/ -k5,5nr
  echo /usr/local/pgsql/bin
  echo /usr/local/bin
  # Homebrew's keg-only postgresql@<major>, then PGDG's /usr/pgsql-<major> (RHEL).
  for p in /opt/homebrew/opt/postgresql@*/bin /usr/local/opt/postgresql@*/bin; do
    if [[ -d "$p" ]]; then echo "$p"; fi
  done | sort -t@ -k2,2nr
  for p in /usr/pgsql-*/bin; do
    if [[ -d "$p" ]]; then echo "$p"; fi
  done | sort -t- -k2,2nr
  return 0
}

# Sets ROE_PG_BINDIR to the first directory holding initdb and pg_ctl of PostgreSQL 15 or
# later; fails when there is none.
roe_pg_find_bindir() {
  local d major
  ROE_PG_OLD=""
  while read -r d; do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] || continue
    major="$("$d/pg_ctl" --version 2>/dev/null | sed -nE 's/^[^0-9]*([0-9]+).*/\1/p' | head -1)"
    if [[ -n "$major" ]] && ((major >= 15)); then
      ROE_PG_BINDIR="$d"
      return 0
    fi
    ROE_PG_OLD="${ROE_PG_OLD:+$ROE_PG_OLD, }$d (PostgreSQL ${major:-unknown})"
  done < <(roe_pg_candidate_bindirs | awk '!seen[$0]++')
  return 1
}

# Installs the distribution's PostgreSQL server where apt-get may run (root, or sudo without
# a password); fails otherwise.
roe_pg_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
    sudo=(sudo -n)
  fi
  roe_pg_say "no PostgreSQL server binaries found; installing the distribution's (apt-get install postgresql)"
  local install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql)
  if ! "${install[@]}" >&2; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
    "${install[@]}" >&2 || return 1
  fi
}

roe_pg_what_to_install() {
  roe_pg_say "the tests need a PostgreSQL 15 or later server, and none was found:"
  roe_pg_say "  ROE_TEST_DATABASE_URL is not set, no usable server answers at 127.0.0.1:5432,"
  if [[ -n "${ROE_PG_OLD:-}" ]]; then
    roe_pg_say "  and the server binaries found are too old: $ROE_PG_OLD."
  else
    roe_pg_say "  and no initdb/pg_ctl was found to start a private cluster with."
  fi
  roe_pg_say "Install PostgreSQL's server (15 or later), then run this again:"
  roe_pg_say "  Debian/Ubuntu:  sudo apt-get install postgresql   (older releases: postgresql-15 from apt.postgresql.org)"
  roe_pg_say "  Fedora/RHEL:    sudo dnf install postgresql-server"
  roe_pg_say "  macOS:          brew install postgresql@15"
  roe_pg_say "or point the tests at a server whose role may CREATE DATABASE:"
  roe_pg_say "  export ROE_TEST_DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/postgres"
}

# Runs a command as the cluster's owner (the current user unless root).
roe_pg_as_owner() {
  if [[ -z "${ROE_PG_OWNER:-}" ]]; then
    (cd / && "$@")
  elif command -v runuser >/dev/null 2>&1; then
    (cd / && runuser -u "$ROE_PG_OWNER" -- "$@")
  else
    (cd / && su -s /bin/sh "$ROE_PG_OWNER" -c "$(printf '%q ' "$@")")
  fi
}

# As root: the unprivileged user the cluster runs as.
roe_pg_pick_owner() {
  local u
  for u in postgres nobody; do
    if id -u "$u" >/dev/null 2>&1; then
      ROE_PG_OWNER=$u
      return 0
    fi
  done
  useradd --system --no-create-home --shell /usr/sbin/nologin roe-pg >&2 ||
    adduser --system --no-create-home roe-pg >&2
  ROE_PG_OWNER=roe-pg
}

# A TCP port nothing listens on, on 127.0.0.1.
roe_pg_free_port() {
  local py
  py="$(command -v python3 || command -v python || true)"
  if [[ -n "$py" ]]; then
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local port
  for ((port = 55432; port < 56432; port++)); do
    if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  return 1
}

# Starts the private cluster and exports its URL.
roe_pg_start_private() {
  if ! roe_pg_find_bindir; then
    roe_pg_install || true
    roe_pg_find_bindir || {
      roe_pg_what_to_install
      return 1
    }
  fi
  ROE_PG_OWNER=""
  if ((EUID == 0)); then
    roe_pg_pick_owner
    # Root's TMPDIR may be out of the owner's reach: /tmp is not.
    ROE_PG_DIR="$(mktemp -d /tmp/roe-pg.XXXXXX)"
    chown "$ROE_PG_OWNER" "$ROE_PG_DIR"
  else
    ROE_PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/roe-pg.XXXXXX")"
  fi
  local data="$ROE_PG_DIR/data" log="$ROE_PG_DIR/log"
  roe_pg_say "starting a private PostgreSQL cluster ($("$ROE_PG_BINDIR/pg_ctl" --version | sed -E 's/^[^0-9]*([0-9][^ ]*).*/\1/')) in $ROE_PG_DIR${ROE_PG_OWNER:+, as $ROE_PG_OWNER}"
  if ! roe_pg_as_owner "$ROE_PG_BINDIR/initdb" -D "$data" --auth=trust -U postgres --no-sync \
    -E UTF8 --locale=C >"$ROE_PG_DIR/initdb.log" 2>&1; then
    cat "$ROE_PG_DIR/initdb.log" >&2
    roe_pg_say "initdb failed"
    roe_pg_stop
    return 1
  fi
  local try port=""
  for try in 1 2 3; do
    port="$(roe_pg_free_port)"
    if roe_pg_as_owner "$ROE_PG_BINDIR/pg_ctl" -D "$data" -l "$log" -w -t 60 \
      -o "-p $port -k '$ROE_PG_DIR' -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
      start >/dev/null; then
      ROE_PG_PORT=$port
      break
    fi
    port=""
    roe_pg_say "the cluster did not start on port $port (try $try of 3):"
    tail -n 20 "$log" >&2 || true
  done
  if [[ -z "$port" ]]; then
    roe_pg_stop
    return 1
  fi
  export ROE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

# Stops the private cluster, if one was started, and removes its directory. Idempotent,
# never fails (it runs from EXIT traps).
roe_pg_stop() {
  if [[ -n "${ROE_PG_DIR:-}" && -d "$ROE_PG_DIR" ]]; then
    if [[ -f "$ROE_PG_DIR/data/postmaster.pid" ]]; then
      roe_pg_as_owner "$ROE_PG_BINDIR/pg_ctl" -D "$ROE_PG_DIR/data" -m fast -w stop >/dev/null 2>&1 ||
        roe_pg_say "could not stop the private cluster in $ROE_PG_DIR (see $ROE_PG_DIR/log)"
    fi
    rm -rf "$ROE_PG_DIR" || true
  fi
  ROE_PG_DIR=""
  return 0
}

# Registers roe_pg_stop on EXIT, before the EXIT trap already set, and makes INT and TERM
# exit (so that EXIT runs) unless they are trapped already.
roe_pg_register_stop() {
  local existing=""
  if [[ -n "$(trap -p EXIT)" ]]; then
    eval "set -- $(trap -p EXIT)"
    existing=$3
  fi
  # shellcheck disable=SC2064
  trap "roe_pg_stop${existing:+; $existing}" EXIT
  [[ -n "$(trap -p INT)" ]] || trap 'exit 130' INT
  [[ -n "$(trap -p TERM)" ]] || trap 'exit 143' TERM
}

roe_pg_ensure() {
  if [[ "${ROE_TEST_PG_PRIVATE:-0}" != "1" ]]; then
    if [[ -n "${ROE_TEST_DATABASE_URL:-}" ]]; then
      local shown
      shown="$(roe_pg_redact "$ROE_TEST_DATABASE_URL")"
      if ! roe_pg_answers "$ROE_TEST_DATABASE_URL"; then
        roe_pg_say "ROE_TEST_DATABASE_URL=$shown does not answer (is the server up, the URL right?)"
        return 1
      fi
      if roe_pg_have_psql; then
        local why
        why="$(roe_pg_unfit "$ROE_TEST_DATABASE_URL")"
        if [[ -n "$why" ]]; then
          roe_pg_say "ROE_TEST_DATABASE_URL=$shown: $why"
          return 1
        fi
      fi
      export ROE_TEST_DATABASE_URL
      roe_pg_say "using ROE_TEST_DATABASE_URL=$shown"
      return 0
    fi
    if { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -t 3 -h 127.0.0.1 -p 5432; } ||
      roe_pg_answers "postgres://postgres@127.0.0.1:5432/postgres"; then
      if ! roe_pg_have_psql; then
        # Cannot look closer: the conventional role it is.
        export ROE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
        roe_pg_say "using the server at 127.0.0.1:5432 as postgres (no psql to check the role with)"
        return 0
      fi
      local user url why reasons=""
      for user in postgres "$(id -un)"; do
        url="postgres://$user@127.0.0.1:5432/postgres"
        why="$(roe_pg_unfit "$url")"
        if [[ -z "$why" ]]; then
          export ROE_TEST_DATABASE_URL="$url"
          roe_pg_say "using the server at 127.0.0.1:5432 as $user"
          return 0
        fi
        reasons="$reasons; as $user: $why"
      done
      roe_pg_say "the server at 127.0.0.1:5432 will not do${reasons}; starting a private cluster instead"
    fi
  fi
  roe_pg_register_stop
  roe_pg_start_private
}

roe_pg_ensure

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  # Run, not sourced: run the command given with the database, or just say where it is.
  if (($# > 0)); then
    "$@"
  else
    echo "ROE_TEST_DATABASE_URL=$ROE_TEST_DATABASE_URL"
  fi
fi
