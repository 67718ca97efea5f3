//! The bash scripts job containers run (`bash -c SCRIPT KIND ARGS...`). Passwords are read
//! from mounted files inside the container; nothing secret is an argument.

/// `MODE ARGS...`: creates the stanza when the repository has none (MODE `online` or
/// `offline`), then runs `pgbackrest ARGS...` (nothing when ARGS is empty).
pub const PGBACKREST: &str = r#"set -euo pipefail
mode=$1; shift
export PGPASSWORD="$(head -n1 /run/secrets/pgs-password)"
online=(); [ "$mode" = offline ] && online=(--no-online)
if [ ! -e "/var/lib/pgbackrest/backup/$PGBACKREST_STANZA/backup.info" ]; then
    pgbackrest "${online[@]}" stanza-create
fi
[ $# -eq 0 ] || exec pgbackrest "$@"
"#;

/// Switches the live server to a new WAL segment and waits (30 s at most) until the segment
/// it closed is archived, so the repository holds every commit made so far.
pub const SWITCH_WAL: &str = r#"set -euo pipefail
export PGPASSWORD="$(head -n1 /run/secrets/pgs-password)"
q() { psql -X -Atq -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$PGBACKREST_PG1_USER" -d "$PGBACKREST_PG1_DATABASE" -c "$1"; }
seg=$(q "SELECT pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 300); do
    last=$(q "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    if [[ "$last" == "$seg" || "$last" > "$seg" ]]; then echo "archived through $seg"; exit 0; fi
    sleep 0.1
done
echo "WAL segment $seg was not archived within 30 s: $(q "SELECT 'failed ' || failed_count || ' times, last ' || coalesce(last_failed_wal, '-') FROM pg_stat_archiver")" >&2
exit 1
"#;

/// `MODE ROLE NEWROLE RESTORE-ARGS...`: restores into the (empty) volume at PGDATA, then runs
/// the server privately (no network, a socket only this container sees) until recovery has
/// promoted it, and leaves a clean, stopped cluster.
/// MODE `inplace`: WAL of the new timeline is archived into the same repository.
/// MODE `copy`: archiving off; the role and database ROLE become NEWROLE with the password in
///   /run/secrets/pgs-new-password (a new tenant made from the copy).
/// MODE `check`: archiving off; amcheck's bt_index_check on every btree index of every
///   database and pg_dumpall to /dev/null (a restore test; the volume is thrown away after).
/// When the target time lies after the last commit in the archive, recovery to that time
/// cannot end (PostgreSQL waits for a commit after it); the state at that time is then the
/// end of the archive, which is where the second attempt stops.
pub const RESTORE: &str = r#"set -euo pipefail
mode=$1; role=$2; newrole=$3; shift 3
export PGPASSWORD="$(head -n1 /run/secrets/pgs-password)"
pgbackrest restore "$@"
sock=/tmp/pgs-restore
mkdir -p -m 0700 "$sock"
opts=(-c listen_addresses= -c "unix_socket_directories=$sock" -c port=5432)
if [ "$mode" = inplace ]; then
    opts+=(-c archive_mode=on -c "archive_command=pgbackrest archive-push %p")
else
    opts+=(-c archive_mode=off)
fi
startpg() { postgres -D "$PGDATA" "${opts[@]}" >>"$sock/log" 2>&1 & pid=$!; }
q() { local db=$1; shift; psql -X -Atq -v ON_ERROR_STOP=1 -h "$sock" -d "$db" "$@"; }
startpg
retried=
while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
        if [ -z "$retried" ] && grep -q 'recovery ended before configured recovery target was reached' "$sock/log"; then
            retried=1
            echo "no commit after the target time in the archive: replaying to its end"
            sed -i '/^recovery_target/d' "$PGDATA/postgresql.auto.conf"
            startpg
            continue
        fi
        tail -n 20 "$sock/log" >&2
        echo "recovery failed" >&2
        exit 1
    fi
    [ "$(q postgres -U "$role" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ] && break
    sleep 0.2
done
grep -E 'recovery stopping|redo done|last completed transaction|selected new timeline' "$sock/log" || true
for s in restore_command recovery_target recovery_target_time recovery_target_action recovery_target_timeline recovery_target_lsn recovery_target_xid recovery_target_name archive_mode; do
    q postgres -U "$role" -c "ALTER SYSTEM RESET $s"
done
case "$mode" in
copy)
    if [ "$newrole" != "$role" ]; then
        # The password travels in SQL text here: keep the statements out of the server's log.
        q postgres -U "$role" <<'SQL'
SET log_statement = 'none';
SET log_min_error_statement = 'panic';
\set pw `head -n1 /run/secrets/pgs-new-password`
CREATE ROLE pgs_restore_tmp SUPERUSER LOGIN PASSWORD :'pw';
SQL
        PGPASSWORD="$(head -n1 /run/secrets/pgs-new-password)" q postgres -U pgs_restore_tmp -v old="$role" -v new="$newrole" <<'SQL'
SET log_statement = 'none';
SET log_min_error_statement = 'panic';
\set pw `head -n1 /run/secrets/pgs-new-password`
ALTER ROLE :"old" RENAME TO :"new";
ALTER ROLE :"new" PASSWORD :'pw';
SELECT true AS rename WHERE EXISTS (SELECT FROM pg_database WHERE datname = :'old') \gset
\if :{?rename}
ALTER DATABASE :"old" RENAME TO :"new";
\endif
SQL
        PGPASSWORD="$(head -n1 /run/secrets/pgs-new-password)" q postgres -U "$newrole" -c 'DROP ROLE pgs_restore_tmp'
        echo "role and database $role are now $newrole"
    fi ;;
check)
    total=0
    for db in $(q postgres -U "$role" -c "SELECT datname FROM pg_database WHERE datallowconn"); do
        q "$db" -U "$role" -c 'CREATE EXTENSION IF NOT EXISTS amcheck' >/dev/null
        n=$(q "$db" -U "$role" -c "SELECT count(bt_index_check(c.oid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready")
        total=$((total + n))
    done
    pg_dumpall -h "$sock" -U "$role" >/dev/null
    echo "checked $total btree indexes; pg_dumpall read every database" ;;
esac
kill -INT "$pid"
wait "$pid" || true
echo "restored"
"#;
