#!/bin/bash
# pgs PostgreSQL entrypoint: a small work-alike of the official postgres
# image's docker-entrypoint.sh, for an image that runs as uid 999 from the
# start (no gosu/su, no root phase).
#
# Environment (same names as the official image):
#   PGDATA                   data directory (default /var/lib/postgresql/data)
#   POSTGRES_USER            superuser created by initdb (default postgres)
#   POSTGRES_PASSWORD_FILE   file whose first line is the superuser password
#                            (preferred; POSTGRES_PASSWORD is accepted as a
#                            fallback but then shows up in `docker inspect`)
#   POSTGRES_DB              database created at first init (default = user)
#   POSTGRES_INITDB_ARGS     extra initdb arguments (word-split; when set, the
#                            first init runs initdb instead of copying the
#                            image's template cluster, see below)
#   PGS_INIT_TEMPLATE        0 = always run initdb at first init (default 1)
# First-init scripts: /docker-entrypoint-initdb.d/*.sh|*.sql|*.sql.gz, in
# lexical order, run against a temporary server on a private socket dir
# (no TCP), so a socket in /var/run/postgresql only ever means "the final
# server". The password is never printed nor put in any process' argv.
set -Eeuo pipefail
shopt -s nullglob

log() { printf '%s [entrypoint] %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SOCKET_DIR=/var/run/postgresql
INIT_SOCKET_DIR=/tmp/pginit

# The cluster the image carries (made at image build by `pgs-make-template`).
TEMPLATE_DIR=/usr/share/pgs/template
# Its bootstrap superuser and the placeholder database a first init renames.
TEMPLATE_USER=postgres
TEMPLATE_DB=pgs_template

# initdb with the image's options, then the image defaults appended to postgresql.conf;
# the template and the initdb first init share it, so both make the same cluster.
#   init_cluster DIR USER PWFILE [EXTRA INITDB ARGS...]
init_cluster() {
    local dir=$1 user=$2 pwfile=$3
    shift 3
    if ! PGPASSFILE=/dev/null initdb -D "$dir" --username="$user" --pwfile="$pwfile" \
            --auth-local=scram-sha-256 --auth-host=scram-sha-256 \
            --encoding=UTF8 --locale=C.UTF-8 \
            "$@" >/tmp/initdb.log 2>&1; then
        cat /tmp/initdb.log >&2
        return 1
    fi
    rm -f /tmp/initdb.log
    # Image defaults; anything passed as `postgres -c k=v` overrides these.
    cat >>"$dir/postgresql.conf" <<EOF

# --- added by the pgs image entrypoint at first init ---
listen_addresses = ''
unix_socket_directories = '$SOCKET_DIR'
password_encryption = 'scram-sha-256'
EOF
}

# Image build only (docker/Dockerfile): the initialized cluster new data directories start
# from. Same initdb options and defaults as a first init, superuser $TEMPLATE_USER with a
# throwaway random password, and an empty database $TEMPLATE_DB that a first init renames to
# POSTGRES_DB (a rename is instant; CREATE DATABASE copies template1 and checkpoints).
if [ "${1:-}" = pgs-make-template ]; then
    [ ! -e "$TEMPLATE_DIR" ] || die "$TEMPLATE_DIR exists"
    tpw=$(mktemp /tmp/pgpw.XXXXXX)
    head -c 32 /dev/urandom | base64 -w0 >"$tpw"
    init_cluster "$TEMPLATE_DIR" "$TEMPLATE_USER" "$tpw" || die "initdb failed"
    rm -f "$tpw"
    postgres --single -D "$TEMPLATE_DIR" -c exit_on_error=on postgres \
        <<<"CREATE DATABASE $TEMPLATE_DB;" >/tmp/template.log 2>&1 \
        || { cat /tmp/template.log >&2; die "creating $TEMPLATE_DB failed"; }
    rm -f /tmp/template.log
    log "template cluster ready in $TEMPLATE_DIR"
    exit 0
fi

# `docker run img -c foo=bar` → `postgres -c foo=bar`
if [ "$#" -eq 0 ] || [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

# Anything other than the server (psql, bash, ...) runs as is.
if [ "$1" != postgres ] && [ "$1" != postmaster ]; then
    exec "$@"
fi

export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"

uid=$(id -u)
if [ "$uid" = 0 ]; then
    die "this image runs PostgreSQL as uid 999 (user postgres) and has no root phase; do not use --user 0/root"
fi
if ! id -un >/dev/null 2>&1; then
    die "uid $uid has no /etc/passwd entry (initdb needs one); run the container as uid 999 (the image default)"
fi

# --- data directory checks -------------------------------------------------
if [ ! -d "$PGDATA" ]; then
    mkdir -p "$PGDATA" 2>/dev/null && chmod 0700 "$PGDATA" \
        || die "PGDATA $PGDATA does not exist and cannot be created by uid $uid (parent not writable)"
fi
if [ ! -w "$PGDATA" ] || [ ! -x "$PGDATA" ]; then
    die "PGDATA $PGDATA is not writable by uid $uid (owner: $(stat -c '%u:%g mode %a' "$PGDATA")); chown it to 999:999"
fi
# postgres insists on 0700/0750; fixable only by the owner.
chmod 0700 "$PGDATA" 2>/dev/null || true

if [ -d "$SOCKET_DIR" ] && [ ! -w "$SOCKET_DIR" ]; then
    die "socket dir $SOCKET_DIR is not writable by uid $uid (owner: $(stat -c '%u:%g mode %a' "$SOCKET_DIR")); chown the bind-mounted directory to 999 or make it group/world-writable"
fi

# --- first init --------------------------------------------------------------
if [ -e "$PGDATA/.pgs-init-incomplete" ]; then
    die "PGDATA $PGDATA holds an interrupted first initialization (.pgs-init-incomplete); empty the directory to re-initialize"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=
    cleanup_pw=
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        [ -z "${POSTGRES_PASSWORD:-}" ] || die "both POSTGRES_PASSWORD and POSTGRES_PASSWORD_FILE are set; use only POSTGRES_PASSWORD_FILE"
        [ -e "$POSTGRES_PASSWORD_FILE" ] || die "POSTGRES_PASSWORD_FILE=$POSTGRES_PASSWORD_FILE does not exist (is the secret mounted?)"
        [ -r "$POSTGRES_PASSWORD_FILE" ] || die "POSTGRES_PASSWORD_FILE=$POSTGRES_PASSWORD_FILE is not readable by uid $uid"
        [ -s "$POSTGRES_PASSWORD_FILE" ] || die "POSTGRES_PASSWORD_FILE=$POSTGRES_PASSWORD_FILE is empty"
        pwfile=$POSTGRES_PASSWORD_FILE
    elif [ -n "${POSTGRES_PASSWORD:-}" ]; then
        pwfile=$(mktemp /tmp/pgpw.XXXXXX)   # mode 0600
        cleanup_pw=$pwfile
        printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    else
        die "no superuser password: set POSTGRES_PASSWORD_FILE to a file (mounted read-only, readable by uid 999) containing the password"
    fi
    unset POSTGRES_PASSWORD

    if [ -n "$(ls -A "$PGDATA" 2>/dev/null)" ]; then
        die "PGDATA $PGDATA is not empty but has no PG_VERSION (contents: $(ls -A "$PGDATA" | head -5 | tr '\n' ' ')); use an empty directory (e.g. a subdirectory of a mount point)"
    fi

    # bash as PID 1 ignores SIGINT/SIGTERM unless trapped: make `docker stop`
    # during first init quick; the half-initialized PGDATA is marked and then
    # rejected on the next start instead of being served half-done.
    trap 'log "interrupted during first init"
          [ -z "$(ls -A "$PGDATA" 2>/dev/null)" ] || touch "$PGDATA/.pgs-init-incomplete"
          pg_ctl -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1; exit 130' INT TERM

    # How the first init makes the cluster. This script copies the image's template rather
    # than letting Docker do it (Docker copies image content found at a VOLUME path into a
    # new, empty named volume): the same image runs pgBackRest restore jobs on new, empty
    # volumes mounted at PGDATA, which must stay empty; and a copy here also serves bind
    # mounts and any volume driver. Measured on the 2-core reference host: cp -a of the
    # ~46 MB template 0.09-0.18 s, syncfs 0.07 s, the single-user fix-up 0.05 s, against
    # 0.8 s for initdb alone, plus ~0.3 s for the temporary server that made the database.
    how=template
    if [ "${PGS_INIT_TEMPLATE:-1}" = 0 ]; then
        how="initdb (PGS_INIT_TEMPLATE=0)"
    elif [ -n "${POSTGRES_INITDB_ARGS:-}" ]; then
        how="initdb (POSTGRES_INITDB_ARGS is set)"
    elif [ ! -s "$TEMPLATE_DIR/PG_VERSION" ]; then
        how="initdb (this image has no template in $TEMPLATE_DIR)"
    fi

    if [ "$how" = template ]; then
        # The password's first line, without a trailing CR (as initdb --pwfile reads it).
        pw=
        IFS= read -r pw <"$pwfile" || true
        pw=${pw%$'\r'}
        [ -z "$cleanup_pw" ] || rm -f "$cleanup_pw"
        [ -n "$pw" ] || die "the superuser password (first line of the password file) is empty"
        case "$POSTGRES_USER" in
            pg_*) die "POSTGRES_USER=$POSTGRES_USER is not allowed: role names cannot begin with pg_" ;;
        esac
        [[ "$POSTGRES_USER$POSTGRES_DB" != *$'\n'* ]] || die "POSTGRES_USER and POSTGRES_DB must not contain a newline"

        log "initializing database cluster in $PGDATA from the image's template (superuser $POSTGRES_USER)"
        touch "$PGDATA/.pgs-init-incomplete"   # removed once the init is done
        cp -a "$TEMPLATE_DIR/." "$PGDATA/" || die "copying $TEMPLATE_DIR into $PGDATA failed"
        # The copy is not on disk yet, and the fix-up's checkpoint flushes only what it wrote:
        # without this, a host crash soon after could leave a control file that says "shut
        # down cleanly" over empty catalog files. One syncfs (what PostgreSQL's
        # recovery_init_sync_method=syncfs does) instead of an fsync per file (0.3 s here).
        sync -f "$PGDATA" || die "cannot flush $PGDATA to disk"

        # Every copy shares the template's system identifier (pg_control); docs/DESIGN.md
        # ("Tenant image") says what that means and why it is safe in pgs.
        # The fix-up runs in single-user mode (no socket: nobody can log in meanwhile), fed on
        # stdin: the bootstrap superuser (OID 10) takes POSTGRES_USER's name (a catalog update:
        # ALTER ROLE cannot rename the session user) and the password, and the placeholder
        # database becomes POSTGRES_DB. The password is never in argv; no statement is logged
        # (log_min_error_statement=panic); the output shows only on failure, password masked.
        user_lit=${POSTGRES_USER//\'/\'\'}
        db_ident=${POSTGRES_DB//\"/\"\"}
        case "$POSTGRES_DB" in
            postgres|template0|template1) db_sql="DROP DATABASE $TEMPLATE_DB;" ;;
            "$TEMPLATE_DB") db_sql= ;;
            *) db_sql="ALTER DATABASE $TEMPLATE_DB RENAME TO \"$db_ident\";" ;;
        esac
        fixup_log=$(umask 077; mktemp /tmp/pgfixup.XXXXXX)
        if ! postgres --single -D "$PGDATA" -c exit_on_error=on -c log_min_error_statement=panic \
                -c log_statement=none postgres >"$fixup_log" 2>&1 <<EOF
UPDATE pg_catalog.pg_authid SET rolname = '$user_lit' WHERE oid = 10;
ALTER ROLE CURRENT_USER PASSWORD '${pw//\'/\'\'}';
$db_sql
EOF
        then
            out=$(<"$fixup_log")
            rm -f "$fixup_log"
            printf '%s\n' "${out//"$pw"/[password]}" >&2
            die "setting the superuser and database up in single-user mode failed"
        fi
        rm -f "$fixup_log"
        unset pw
    else
        log "initializing database cluster in $PGDATA with $how (superuser $POSTGRES_USER)"
        # shellcheck disable=SC2086
        if ! init_cluster "$PGDATA" "$POSTGRES_USER" "$pwfile" ${POSTGRES_INITDB_ARGS:-}; then
            [ -z "$cleanup_pw" ] || rm -f "$cleanup_pw"
            die "initdb failed"
        fi
        [ -z "$cleanup_pw" ] || rm -f "$cleanup_pw"
        touch "$PGDATA/.pgs-init-incomplete"   # removed once init scripts are done
    fi

    # The temporary server: for init scripts, and to create the database after initdb.
    scripts=(/docker-entrypoint-initdb.d/*)
    if [ "$how" = template ] && [ "${#scripts[@]}" = 0 ]; then
        rm -f "$PGDATA/.pgs-init-incomplete"
        trap - INT TERM
        log "init complete"
    else
        # Temporary server: private socket dir, no TCP, trust auth via a
        # temporary hba file (the dir is 0700, only this container can reach it).
        rm -rf "$INIT_SOCKET_DIR"
        mkdir -m 0700 "$INIT_SOCKET_DIR"
        printf 'local all all trust\n' >"$INIT_SOCKET_DIR/pg_hba.conf"
        log "starting temporary server on $INIT_SOCKET_DIR"
        pg_ctl -D "$PGDATA" -w -t 60 -l "$INIT_SOCKET_DIR/server.log" \
            -o "-c listen_addresses='' -c unix_socket_directories=$INIT_SOCKET_DIR -c hba_file=$INIT_SOCKET_DIR/pg_hba.conf" \
            start >/dev/null \
            || { cat "$INIT_SOCKET_DIR/server.log" >&2; die "temporary server did not start"; }

        export PGHOST=$INIT_SOCKET_DIR PGUSER=$POSTGRES_USER
        psql=(psql -X -q -v ON_ERROR_STOP=1 --no-password --username "$POSTGRES_USER")

        if [ "$POSTGRES_DB" != postgres ]; then
            exists=$("${psql[@]}" --dbname postgres -tA --set db="$POSTGRES_DB" \
                <<<"SELECT 1 FROM pg_database WHERE datname = :'db';")
            if [ -z "$exists" ]; then
                log "creating database $POSTGRES_DB"
                "${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
            fi
        fi
        psql+=(--dbname "$POSTGRES_DB")
        export PGDATABASE=$POSTGRES_DB

        for f in /docker-entrypoint-initdb.d/*; do
            case "$f" in
                *.sh)
                    if [ -x "$f" ]; then
                        log "running $f"; "$f"
                    else
                        log "sourcing $f"
                        # shellcheck disable=SC1090
                        . "$f"
                    fi ;;
                *.sql)    log "running $f"; "${psql[@]}" -f "$f" ;;
                *.sql.gz) log "running $f"; gzip -dc "$f" | "${psql[@]}" ;;
                *.sql.xz) log "running $f"; xz -dc "$f" | "${psql[@]}" ;;
                *.sql.zst) log "running $f"; zstd -dc "$f" | "${psql[@]}" ;;
                *)        log "ignoring $f" ;;
            esac
        done

        log "stopping temporary server"
        pg_ctl -D "$PGDATA" -m fast -w -t 60 stop >/dev/null \
            || { cat "$INIT_SOCKET_DIR/server.log" >&2; die "temporary server did not stop"; }
        rm -rf "$INIT_SOCKET_DIR"
        unset PGHOST PGUSER PGDATABASE
        rm -f "$PGDATA/.pgs-init-incomplete"
        trap - INT TERM
        log "init complete"
    fi
fi

log "starting postgres (socket dir $SOCKET_DIR)"
if [ "${PGS_SUPERVISE:-0}" != 1 ]; then
    exec "$@"
fi

# --- the server under a small supervisor (PGS_SUPERVISE=1, set by pgs-agent) -----------------
# pgs puts an idle tenant to sleep by stopping PostgreSQL inside a container that stays up, and
# wakes it by starting PostgreSQL again: ~0.15 s, where a container start takes ~0.5 s.
#   SIGUSR1          start the server (nothing if it runs)
#   SIGUSR2          stop it (fast shutdown, a clean checkpoint); the container stays up
#   SIGINT/SIGTERM   stop it and end the container (docker stop)
# The server exiting by itself (a crash, a FATAL at start) ends the container with its status.
want=up
pg=
idle=
trap 'want=up' USR1
trap 'want=down' USR2
trap 'want=exit' INT TERM
while :; do
    if [ "$want" = up ] && [ -z "$pg" ]; then
        "$@" &
        pg=$!
    elif [ "$want" != up ] && [ -n "$pg" ]; then
        kill -INT "$pg" 2>/dev/null || true
        wait "$pg" 2>/dev/null || true
        pg=
        log "postgres stopped (asleep; SIGUSR1 starts it)"
    fi
    [ "$want" != exit ] || exit 0
    if [ -n "$pg" ]; then
        # Returns when the server exits or a signal arrives (then the server still runs).
        wait "$pg" || true
        if ! kill -0 "$pg" 2>/dev/null; then
            rc=0
            wait "$pg" || rc=$?
            pg=
            if [ "$want" = up ]; then
                log "postgres exited with status $rc"
                exit "$rc"
            fi
        fi
    else
        sleep 60 &
        idle=$!
        wait "$idle" || true
        kill "$idle" 2>/dev/null || true
        wait "$idle" 2>/dev/null || true
    fi
done
