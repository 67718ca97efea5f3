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

# --- a copy's own identity -----------------------------------------------------------------
# Every copy of the template would share its system identifier and mock-auth nonce (both in
# global/pg_control). new_identity gives a copy fresh ones, as initdb would: the identifier
# in pg_control and in the long header of each WAL segment (offset 24; PostgreSQL refuses a
# WAL file from "a different database system"), the nonce, and pg_control's CRC-32C, whose
# offset is found by checking each 4-byte position of the stored file (PostgreSQL checks it
# at every start, so a mistake here fails loudly, never silently).
# CRC-32C (Castagnoli, reflected 0x82F63B78), one entry per byte value.
CRC32C_TABLE=(
    0x00000000 0xf26b8303 0xe13b70f7 0x1350f3f4 0xc79a971f 0x35f1141c 0x26a1e7e8 0xd4ca64eb
    0x8ad958cf 0x78b2dbcc 0x6be22838 0x9989ab3b 0x4d43cfd0 0xbf284cd3 0xac78bf27 0x5e133c24
    0x105ec76f 0xe235446c 0xf165b798 0x030e349b 0xd7c45070 0x25afd373 0x36ff2087 0xc494a384
    0x9a879fa0 0x68ec1ca3 0x7bbcef57 0x89d76c54 0x5d1d08bf 0xaf768bbc 0xbc267848 0x4e4dfb4b
    0x20bd8ede 0xd2d60ddd 0xc186fe29 0x33ed7d2a 0xe72719c1 0x154c9ac2 0x061c6936 0xf477ea35
    0xaa64d611 0x580f5512 0x4b5fa6e6 0xb93425e5 0x6dfe410e 0x9f95c20d 0x8cc531f9 0x7eaeb2fa
    0x30e349b1 0xc288cab2 0xd1d83946 0x23b3ba45 0xf779deae 0x05125dad 0x1642ae59 0xe4292d5a
    0xba3a117e 0x4851927d 0x5b016189 0xa96ae28a 0x7da08661 0x8fcb0562 0x9c9bf696 0x6ef07595
    0x417b1dbc 0xb3109ebf 0xa0406d4b 0x522bee48 0x86e18aa3 0x748a09a0 0x67dafa54 0x95b17957
    0xcba24573 0x39c9c670 0x2a993584 0xd8f2b687 0x0c38d26c 0xfe53516f 0xed03a29b 0x1f682198
    0x5125dad3 0xa34e59d0 0xb01eaa24 0x42752927 0x96bf4dcc 0x64d4cecf 0x77843d3b 0x85efbe38
    0xdbfc821c 0x2997011f 0x3ac7f2eb 0xc8ac71e8 0x1c661503 0xee0d9600 0xfd5d65f4 0x0f36e6f7
    0x61c69362 0x93ad1061 0x80fde395 0x72966096 0xa65c047d 0x5437877e 0x4767748a 0xb50cf789
    0xeb1fcbad 0x197448ae 0x0a24bb5a 0xf84f3859 0x2c855cb2 0xdeeedfb1 0xcdbe2c45 0x3fd5af46
    0x7198540d 0x83f3d70e 0x90a324fa 0x62c8a7f9 0xb602c312 0x44694011 0x5739b3e5 0xa55230e6
    0xfb410cc2 0x092a8fc1 0x1a7a7c35 0xe811ff36 0x3cdb9bdd 0xceb018de 0xdde0eb2a 0x2f8b6829
    0x82f63b78 0x709db87b 0x63cd4b8f 0x91a6c88c 0x456cac67 0xb7072f64 0xa457dc90 0x563c5f93
    0x082f63b7 0xfa44e0b4 0xe9141340 0x1b7f9043 0xcfb5f4a8 0x3dde77ab 0x2e8e845f 0xdce5075c
    0x92a8fc17 0x60c37f14 0x73938ce0 0x81f80fe3 0x55326b08 0xa759e80b 0xb4091bff 0x466298fc
    0x1871a4d8 0xea1a27db 0xf94ad42f 0x0b21572c 0xdfeb33c7 0x2d80b0c4 0x3ed04330 0xccbbc033
    0xa24bb5a6 0x502036a5 0x4370c551 0xb11b4652 0x65d122b9 0x97baa1ba 0x84ea524e 0x7681d14d
    0x2892ed69 0xdaf96e6a 0xc9a99d9e 0x3bc21e9d 0xef087a76 0x1d63f975 0x0e330a81 0xfc588982
    0xb21572c9 0x407ef1ca 0x532e023e 0xa145813d 0x758fe5d6 0x87e466d5 0x94b49521 0x66df1622
    0x38cc2a06 0xcaa7a905 0xd9f75af1 0x2b9cd9f2 0xff56bd19 0x0d3d3e1a 0x1e6dcdee 0xec064eed
    0xc38d26c4 0x31e6a5c7 0x22b65633 0xd0ddd530 0x0417b1db 0xf67c32d8 0xe52cc12c 0x1747422f
    0x49547e0b 0xbb3ffd08 0xa86f0efc 0x5a048dff 0x8ecee914 0x7ca56a17 0x6ff599e3 0x9d9e1ae0
    0xd3d3e1ab 0x21b862a8 0x32e8915c 0xc083125f 0x144976b4 0xe622f5b7 0xf5720643 0x07198540
    0x590ab964 0xab613a67 0xb831c993 0x4a5a4a90 0x9e902e7b 0x6cfbad78 0x7fab5e8c 0x8dc0dd8f
    0xe330a81a 0x115b2b19 0x020bd8ed 0xf0605bee 0x24aa3f05 0xd6c1bc06 0xc5914ff2 0x37faccf1
    0x69e9f0d5 0x9b8273d6 0x88d28022 0x7ab90321 0xae7367ca 0x5c18e4c9 0x4f48173d 0xbd23943e
    0xf36e6f75 0x0105ec76 0x12551f82 0xe03e9c81 0x34f4f86a 0xc69f7b69 0xd5cf889d 0x27a40b9e
    0x79b737ba 0x8bdcb4b9 0x988c474d 0x6ae7c44e 0xbe2da0a5 0x4c4623a6 0x5f16d052 0xad7d5351
)
# le VALUE N → printf escapes of VALUE's N low bytes, little-endian
le() {
    local v=$1 n=$2 i o s=
    for ((i = 0; i < n; i++)); do
        printf -v o '\\x%02x' $(((v >> (8 * i)) & 0xFF))
        s+=$o
    done
    printf '%s' "$s"
}
# put FILE OFFSET ESCAPES → writes the bytes in place
put() { printf '%b' "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }
# u64 BYTE... (8 numbers, little-endian) → the value
u64() {
    local v=0 i
    for ((i = 7; i >= 0; i--)); do v=$(((v << 8) | ${@:i+1:1})); done
    echo "$v"
}
new_identity() {
    local dir=$1 ctl=$1/global/pg_control
    local -a b
    read -r -a b <<<"$(od -An -v -tu1 -N 512 "$ctl" | tr -s ' \n' '  ')"
    [ "${#b[@]}" = 512 ] || { log "cannot read $ctl"; return 1; }
    local c=0xFFFFFFFF i off=
    for ((i = 0; i < 512; i++)); do
        if ((i % 4 == 0 && i >= 16)) &&
            (((c ^ 0xFFFFFFFF) == (b[i] | b[i+1] << 8 | b[i+2] << 16 | b[i+3] << 24))); then
            off=$i
            break
        fi
        c=$((CRC32C_TABLE[(c ^ b[i]) & 0xFF] ^ (c >> 8)))
    done
    [ -n "$off" ] && ((off >= 40)) || { log "no CRC-32C found in $ctl"; return 1; }
    local old new sec usec
    old=$(u64 "${b[@]:0:8}")
    sec=${EPOCHREALTIME%[.,]*}
    usec=${EPOCHREALTIME#*[.,]}
    new=$(((sec << 32) | (10#$usec << 12) | (SRANDOM & 0xFFF)))
    local -a nonce
    read -r -a nonce <<<"$(head -c 32 /dev/urandom | od -An -v -tu1 | tr -s ' \n' '  ')"
    [ "${#nonce[@]}" = 32 ] || { log "cannot read /dev/urandom"; return 1; }
    # The new bytes, then the CRC over them.
    local -a nb=("${b[@]:0:off}")
    for ((i = 0; i < 8; i++)); do nb[i]=$(((new >> (8 * i)) & 0xFF)); done
    for ((i = 0; i < 32; i++)); do nb[off - 32 + i]=${nonce[i]}; done
    c=0xFFFFFFFF
    for ((i = 0; i < off; i++)); do c=$((CRC32C_TABLE[(c ^ nb[i]) & 0xFF] ^ (c >> 8))); done
    local seg wal=0 esc= o
    for seg in "$dir"/pg_wal/[0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F]; do
        read -r -a b <<<"$(od -An -v -tu1 -j 24 -N 8 "$seg" | tr -s ' \n' '  ')"
        [ "${#b[@]}" = 8 ] && [ "$(u64 "${b[@]}")" = "$old" ] \
            || { log "$seg does not carry the system identifier of $ctl"; return 1; }
        put "$seg" 24 "$(le "$new" 8)"
        wal=$((wal + 1))
    done
    ((wal > 0)) || { log "no WAL segment in $dir/pg_wal"; return 1; }
    for ((i = 0; i < 32; i++)); do printf -v o '\\x%02x' "${nonce[i]}"; esc+=$o; done
    put "$ctl" $((off - 32)) "$esc"
    put "$ctl" "$off" "$(le $((c ^ 0xFFFFFFFF)) 4)"
    put "$ctl" 0 "$(le "$new" 8)"
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
    # A first init gives each copy its own identity: prove here, once, that this server's
    # pg_control and WAL are laid out as new_identity expects, and that the result starts.
    check=$(mktemp -d /tmp/pgcheck.XXXXXX)
    cp -a "$TEMPLATE_DIR/." "$check/"
    new_identity "$check" || die "new_identity does not work with this PostgreSQL"
    postgres --single -D "$check" -c exit_on_error=on postgres <<<"SELECT 1;" >/tmp/template.log 2>&1 \
        || { cat /tmp/template.log >&2; die "a copy with a new system identifier does not start"; }
    rm -rf "$check" /tmp/template.log
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
    # mounts and any volume driver. Measured on the 2-core reference host (quiet): cp -a of
    # the ~46 MB template 0.09-0.18 s, new_identity 0.05 s, syncfs 0.06 s, the single-user
    # fix-up 0.05 s, against 0.8 s for initdb alone plus ~0.3 s for the temporary server
    # that then made the database (BENCHMARKS.md §2 has the whole `tenant create`).
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
        new_identity "$PGDATA" || die "cannot give $PGDATA its own system identifier"
        # The copy is not on disk yet, and the fix-up's checkpoint flushes only what it wrote:
        # without this, a host crash soon after could leave a control file that says "shut
        # down cleanly" over empty catalog files. One syncfs (what PostgreSQL's
        # recovery_init_sync_method=syncfs does) instead of an fsync per file (0.3 s here).
        sync -f "$PGDATA" || die "cannot flush $PGDATA to disk"

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
stopping=
# The server gets SIGINT (fast shutdown) once; its exit is then a stop, not a crash.
stop_pg() {
    if [ -n "$pg" ] && [ -z "$stopping" ]; then
        stopping=1
        kill -INT "$pg" 2>/dev/null || true
    fi
}
# Each trap also acts on the wait it may have raced: a signal that lands just before a
# `wait` would otherwise be noticed only when that wait ends.
on_start() {
    [ "$want" = exit ] || want=up
    [ -z "$idle" ] || kill "$idle" 2>/dev/null || true
}
on_stop() {
    [ "$want" = exit ] || want=down
    stop_pg
}
on_exit() {
    want=exit
    stop_pg
    [ -z "$idle" ] || kill "$idle" 2>/dev/null || true
}
trap on_start USR1
trap on_stop USR2
trap on_exit INT TERM
while :; do
    if [ -n "$pg" ]; then
        [ "$want" = up ] || stop_pg
        # Returns when the server exits, or when a signal arrives (the server may still run).
        wait "$pg" || true
        if kill -0 "$pg" 2>/dev/null; then
            continue
        fi
        rc=0
        wait "$pg" || rc=$?
        pg=
        if [ -n "$stopping" ]; then
            stopping=
            log "postgres stopped (asleep; SIGUSR1 starts it)"
        elif [ "$want" = up ]; then
            log "postgres exited with status $rc"
            exit "$rc"
        fi
        continue
    fi
    [ "$want" != exit ] || exit 0
    if [ "$want" = up ]; then
        "$@" &
        pg=$!
        continue
    fi
    sleep 60 &
    idle=$!
    # A USR1 between starting `sleep` and noting its pid killed nothing: look again.
    if [ "$want" = down ]; then
        wait "$idle" || true
    fi
    kill "$idle" 2>/dev/null || true
    wait "$idle" 2>/dev/null || true
    idle=
done
