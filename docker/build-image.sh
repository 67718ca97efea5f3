#!/usr/bin/env bash
# Build pgs/postgres:VERSION from Debian's packages, without any registry.
#
#   docker/build-image.sh [--force] [VERSION]      (VERSION default 15)
#
# How: a private apt root (own APT_CONFIG, lists, cache and an empty dpkg
# status file; same Debian sources as the host) downloads postgresql-VERSION
# and its dependencies; each .deb is unpacked with dpkg-deb into a rootfs
# (no maintainer scripts), that rootfs is `docker import`ed as
# pgs/postgres:VERSION-rootfs, and docker/Dockerfile adds the metadata
# (USER 999, ENTRYPOINT, CMD, ENV, STOPSIGNAL SIGINT, VOLUME) and the
# initialized template cluster in /usr/share/pgs/template that a tenant's
# first start copies instead of running initdb (docker/entrypoint.sh).
#
# Idempotent: if pgs/postgres:VERSION exists and was built from the same
# inputs (this script, entrypoint.sh, Dockerfile, VERSION, options), exit 0.
# --force rebuilds (and picks up new Debian package versions).
#
# Env:
#   PGS_IMAGE_CACHE     apt lists + .deb cache   (default /var/cache/pgs-image)
#   PGS_IMAGE_REPO      image repository         (default pgs/postgres)
#   PGS_IMAGE_WITH_JIT  1 = keep LLVM JIT (+~120 MB); default 0
#   PGS_IMAGE_KEEP_WORK 1 = keep the temporary rootfs (debugging)
#   PGS_IMAGE_SOURCES   apt sources file(s) to use instead of the host's
#                       (space-separated; .list or deb822 .sources)
# Needs: root, a running docker engine (scripts/start-dockerd.sh), apt-get,
# dpkg-deb, tar, flock, sha256sum.
set -euo pipefail

FORCE=0
VERSION=
for a in "$@"; do
    case "$a" in
        -f|--force) FORCE=1 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        [0-9]*) [ -z "$VERSION" ] || { echo "build-image: only one VERSION" >&2; exit 2; }
                VERSION=$a ;;
        *) echo "build-image: unknown argument: $a (usage: $0 [--force] [VERSION])" >&2; exit 2 ;;
    esac
done
VERSION=${VERSION:-15}
[[ "$VERSION" =~ ^[0-9]+$ ]] || { echo "build-image: VERSION must be a PostgreSQL major version like 15" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${PGS_IMAGE_REPO:-pgs/postgres}
IMAGE=$REPO:$VERSION
BASE=$REPO:$VERSION-rootfs
CACHE=${PGS_IMAGE_CACHE:-/var/cache/pgs-image}
WITH_JIT=${PGS_IMAGE_WITH_JIT:-0}
T0=$(date +%s.%N)

step() { printf 'build-image [%5.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{print a-b}')" "$*"; }
die()  { printf 'build-image: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (the rootfs needs root-owned files and uid 999 dirs)"
for t in apt-get apt-cache dpkg-deb tar flock sha256sum docker; do
    command -v "$t" >/dev/null 2>&1 || die "missing host tool: $t"
done
docker info >/dev/null 2>&1 || die "docker engine not answering; run scripts/start-dockerd.sh first"

# ---- inputs / up-to-date check ------------------------------------------------
# Packages in the image: postgres + what the entrypoint uses + pgBackRest (continuous
# archiving and backups run inside the tenant's image, beside the server they read).
PACKAGES=(postgresql-"$VERSION" bash dash coreutils grep sed findutils gzip mawk libc-bin tzdata netbase pgbackrest)
# Pulled in by dependencies but useless without maintainer scripts / in this
# image: perl & postgresql-common wrappers, debconf, locales (C.UTF-8 comes
# from libc-bin), dpkg, PAM modules, ssl-cert ... (an ELF check below proves
# nothing needed is missing).
EXCLUDE='^(perl|perl-base|perl-modules-.*|libperl.*|lib.*-perl|postgresql-common|postgresql-client-common|debconf|adduser|passwd|usrmerge|init-system-helpers|sysvinit-utils|lsb-base|locales|locales-all|libc-l10n|dpkg|tar|ssl-cert|openssl|ucf|sensible-utils|debianutils|libpam-modules|libpam-modules-bin|libsemanage.*|libsepol.*|readline-common|libdb5\.3|libgdbm.*)$'
if [ "$WITH_JIT" != 1 ]; then
    EXCLUDE="${EXCLUDE%)\$}|libllvm[0-9]+|libz3-[0-9]+)\$"
fi

INPUTS=$( {
    echo "version=$VERSION jit=$WITH_JIT repo=$REPO"
    echo "packages=${PACKAGES[*]}"
    echo "exclude=$EXCLUDE"
    cat "$HERE/build-image.sh" "$HERE/entrypoint.sh" "$HERE/Dockerfile"
} | sha256sum | cut -c1-16)

old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if [ -n "$old_id" ] && [ "$FORCE" = 0 ]; then
    have=$(docker image inspect -f '{{ index .Config.Labels "org.pgs.inputs" }}' "$IMAGE" 2>/dev/null || true)
    if [ "$have" = "$INPUTS" ]; then
        pkgv=$(docker image inspect -f '{{ index .Config.Labels "org.pgs.postgres-package" }}' "$IMAGE")
        step "$IMAGE is up to date (inputs $INPUTS, $pkgv, id ${old_id:7:12}); use --force to rebuild"
        exit 0
    fi
    step "$IMAGE exists but inputs changed (${have:-none} -> $INPUTS); rebuilding"
fi
old_base_id=$(docker image inspect -f '{{.Id}}' "$BASE" 2>/dev/null || true)

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -w 600 9 || die "another build holds $CACHE/lock"

# ---- private apt root ------------------------------------------------------------
APTROOT=$CACHE/apt
mkdir -p "$APTROOT/etc/sources.list.d" "$APTROOT/etc/preferences.d" \
         "$APTROOT/state/lists/partial" "$APTROOT/cache/archives/partial"
[ -f "$APTROOT/status" ] && [ ! -s "$APTROOT/status" ] || : >"$APTROOT/status"
rm -f "$APTROOT/etc/sources.list.d/"*
if [ -n "${PGS_IMAGE_SOURCES:-}" ]; then
    for s in $PGS_IMAGE_SOURCES; do cp "$s" "$APTROOT/etc/sources.list.d/"; done
else
    [ -s /etc/apt/sources.list ] && cp /etc/apt/sources.list "$APTROOT/etc/sources.list.d/host.list"
    for s in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$s" ] && cp "$s" "$APTROOT/etc/sources.list.d/"
    done
fi
compgen -G "$APTROOT/etc/sources.list.d/*" >/dev/null || die "no apt sources found (set PGS_IMAGE_SOURCES)"
cat >"$APTROOT/apt.conf" <<EOF
Dir::State "$APTROOT/state";
Dir::State::status "$APTROOT/status";
Dir::Cache "$APTROOT/cache";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$APTROOT/etc/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$APTROOT/etc/preferences.d";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Get::Assume-Yes "true";
Acquire::Languages "none";
EOF
export APT_CONFIG=$APTROOT/apt.conf DEBIAN_FRONTEND=noninteractive
# The host's apt.conf.d is read after APT_CONFIG (keeps its proxy settings),
# so anything it must not override goes on the command line; Debian's
# docker-clean snippet disables the binary package cache (+1 s per call).
APTO=(-o "Dir::State::status=$APTROOT/status" -o Dir::Cache::pkgcache=pkgcache.bin -o Dir::Cache::srcpkgcache=srcpkgcache.bin)

step "apt-get update (private apt root $APTROOT)"
apt-get "${APTO[@]}" -qq update >"$CACHE/apt-update.log" 2>&1 || { cat "$CACHE/apt-update.log" >&2; die "apt-get update failed"; }

cand=$(apt-cache "${APTO[@]}" policy "postgresql-$VERSION" 2>/dev/null | awk '/Candidate:/ {print $2}')
if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
    avail=$(apt-cache "${APTO[@]}" pkgnames postgresql- 2>/dev/null | grep -E '^postgresql-[0-9]+$' | sed 's/postgresql-//' | sort -n | tr '\n' ' ')
    die "postgresql-$VERSION is not available from the configured Debian repositories ($(. /etc/os-release; echo "$PRETTY_NAME")); available major versions: ${avail:-none}"
fi

step "downloading postgresql-$VERSION $cand and dependencies (cache $APTROOT/cache/archives)"
apt-get "${APTO[@]}" -q install --download-only "${PACKAGES[@]}" >"$CACHE/apt-download.log" 2>&1 \
    || { tail -20 "$CACHE/apt-download.log" >&2; die "apt-get install --download-only failed"; }
# Exact package set (the cache may also hold older versions).
SIM=$(apt-get "${APTO[@]}" -s install "${PACKAGES[@]}" 2>/dev/null | grep '^Inst ' || true)
mapfile -t INST < <(sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) [^[]*\[\([^]]*\)\]).*$/\1 \2 \3/p' <<<"$SIM")
[ "${#INST[@]}" -gt 0 ] && [ "${#INST[@]}" = "$(grep -c . <<<"$SIM")" ] \
    || die "could not parse the package set from apt-get -s install"
step "package set: ${#INST[@]} packages"

# ---- rootfs --------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgs-image.XXXXXX")
if [ "${PGS_IMAGE_KEEP_WORK:-0}" = 1 ]; then trap 'echo "build-image: kept $WORK" >&2' EXIT
else trap 'rm -rf "$WORK"' EXIT; fi
ROOT=$WORK/rootfs
mkdir -p "$ROOT"/usr/{bin,sbin,lib,lib64}
# merged /usr like Debian 12; tar keeps these links (--keep-directory-symlink)
ln -s usr/bin "$ROOT/bin"; ln -s usr/sbin "$ROOT/sbin"
ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"

unpacked=()
skipped=()
for line in "${INST[@]}"; do
    read -r pkg ver arch <<<"$line"
    if [[ "$pkg" =~ $EXCLUDE ]]; then skipped+=("$pkg"); continue; fi
    deb="$APTROOT/cache/archives/${pkg}_${ver//:/%3a}_${arch}.deb"
    [ -f "$deb" ] || die "missing downloaded package $deb"
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$ROOT"
    unpacked+=("$pkg=$ver")
done
step "unpacked ${#unpacked[@]} packages (skipped ${#skipped[@]}: ${skipped[*]})"

# var/run: Debian makes it an absolute symlink to /run at install time; here
# /run/postgresql is a real dir and var/run a relative link, so nothing on
# the host is ever written through it.
if [ -d "$ROOT/var/run" ] && [ ! -L "$ROOT/var/run" ]; then
    mkdir -p "$ROOT/run"
    cp -a "$ROOT/var/run/." "$ROOT/run/"
    rm -rf "$ROOT/var/run"
fi
rm -f "$ROOT/var/run"
mkdir -p "$ROOT/run" "$ROOT/var/lock"
ln -s ../run "$ROOT/var/run"
install -d -o 999 -g 999 -m 2775 "$ROOT/run/postgresql"
install -d -o 999 -g 999 -m 0755 "$ROOT/var/lib/postgresql"
install -d -o 999 -g 999 -m 0700 "$ROOT/var/lib/postgresql/data"
install -d -o 999 -g 999 -m 0755 "$ROOT/usr/share/pgs"   # the template cluster (Dockerfile)
install -d -o 0 -g 0 -m 0755 "$ROOT/docker-entrypoint-initdb.d" "$ROOT/usr/local/bin" "$ROOT/etc" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
install -d -m 1777 "$ROOT/tmp" "$ROOT/var/tmp"
install -o 0 -g 0 -m 0755 "$HERE/entrypoint.sh" "$ROOT/usr/local/bin/docker-entrypoint.sh"
[ -e "$ROOT/bin/sh" ] || ln -s dash "$ROOT/usr/bin/sh"

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/bash
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
postgres:x:999:
EOF
printf 'root:*:19000:0:99999:7:::\npostgres:*:19000:0:99999:7:::\n' >"$ROOT/etc/shadow"
chmod 0640 "$ROOT/etc/shadow"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' >"$ROOT/etc/nsswitch.conf"
ln -sf /usr/share/zoneinfo/Etc/UTC "$ROOT/etc/localtime"
echo Etc/UTC >"$ROOT/etc/timezone"
install -d -m 0700 "$ROOT/root"

# Trim: docs, man pages, message catalogs, and (without JIT) LLVM bitcode.
rm -rf "$ROOT"/usr/share/{doc,man,info,lintian,locale,bug,bash-completion} "$ROOT"/usr/share/zoneinfo/right
PGLIB=$ROOT/usr/lib/postgresql/$VERSION/lib
if [ "$WITH_JIT" != 1 ]; then
    rm -rf "$PGLIB"/llvmjit* "$PGLIB/bitcode"
fi
[ -x "$ROOT/usr/lib/postgresql/$VERSION/bin/postgres" ] || die "postgres binary missing in rootfs"
[ -x "$ROOT/usr/bin/pgbackrest" ] || die "pgbackrest binary missing in rootfs"
[ -f "$PGLIB/amcheck.so" ] || die "amcheck (postgresql-$VERSION contrib) missing in rootfs"

# Every ELF object postgres may load must resolve inside the rootfs.
missing=$(
    find "$ROOT/usr/lib/postgresql/$VERSION" "$ROOT/usr/bin" -type f \( -perm -u+x -o -name '*.so' \) -print0 |
    while IFS= read -r -d '' f; do
        head -c4 "$f" | grep -q 'ELF' || continue
        rel=${f#"$ROOT"}
        if ! out=$(chroot "$ROOT" /lib64/ld-linux-x86-64.so.2 --list "$rel" 2>&1); then
            printf '%s: %s\n' "$rel" "$out"
        fi
        grep 'not found' <<<"$out" | sed "s|^|$rel: |" || true
    done | sort -u
)
[ -z "$missing" ] || die "unresolved shared libraries in rootfs:"$'\n'"$missing"
pgver=$(chroot "$ROOT" "/usr/lib/postgresql/$VERSION/bin/postgres" --version)
brver=$(chroot "$ROOT" /usr/bin/pgbackrest version)
step "rootfs ready: $pgver, $brver, $(du -sh "$ROOT" | cut -f1)"

# ---- import + metadata ------------------------------------------------------------
step "docker import -> $BASE"
tar --numeric-owner -C "$ROOT" -c . |
    docker import --message "pgs postgres $VERSION rootfs ($cand)" - "$BASE" >/dev/null
step "docker build (metadata) -> $IMAGE"
CTX=$WORK/ctx
mkdir -p "$CTX"
cp "$HERE/Dockerfile" "$CTX/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q --network none -t "$IMAGE" \
    --build-arg PG_MAJOR="$VERSION" \
    --build-arg BASE="$BASE" \
    --label org.pgs.inputs="$INPUTS" \
    --label org.pgs.postgres-package="postgresql-$VERSION=$cand" \
    --label org.pgs.jit="$WITH_JIT" \
    --label org.pgs.built="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "$CTX" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; die "docker build failed"; }

# Drop the previous build's images if nothing else uses them (best effort).
new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker rmi "$old_id" >/dev/null 2>&1 || true
fi
new_base_id=$(docker image inspect -f '{{.Id}}' "$BASE")
if [ -n "$old_base_id" ] && [ "$old_base_id" != "$new_base_id" ]; then
    docker rmi "$old_base_id" >/dev/null 2>&1 || true
fi

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
step "built $IMAGE (id ${new_id:7:12}, $((size / 1024 / 1024)) MB, postgresql-$VERSION $cand, inputs $INPUTS)"
