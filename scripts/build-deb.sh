#!/usr/bin/env bash
# Builds the Debian package pgs-agent_<version>_amd64.deb from a staged tree with dpkg-deb (no
# debhelper or cargo-deb needed): the binary in /usr/bin, pgs-agent.service for systemd, the
# HAProxy drop-in and the Lua router under /usr/share/pgs, the docs; maintainer scripts from
# packaging/deb/. The version is Cargo.toml's.
#
#   scripts/build-deb.sh [--binary PATH] [--out DIR]
#
# --binary  package this pgs-agent instead of building one (`cargo build --release`)
# --out     where the .deb goes (default target/deb); its path is the last line printed
#
# Needs dpkg-dev (dpkg-shlibdeps, strip); `scripts/install-deps.sh --tests` installs it.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
out=target/deb
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
if [ -z "$binary" ]; then
    cargo build --release --locked
    binary=target/release/pgs-agent
fi
[ -x "$binary" ] || { echo "build-deb: $binary is not an executable" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
         "$root/usr/share/pgs/lua" "$root/usr/share/pgs/haproxy.service.d" \
         "$root/usr/share/pgs/monitoring/tests" \
         "$root/usr/share/doc/pgs-agent/examples"

install -m 0755 "$binary" "$root/usr/bin/pgs-agent"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/pgs-agent"

# The units and the drop-in as haproxy/ has them, with the package's paths: the layout in
# /var/lib/pgs, its settings in /etc/pgs.
sed -e 's|/usr/local/bin/pgs-agent|/usr/bin/pgs-agent|g' \
    -e 's|^Environment=PGS_CONFIG=.*|Environment=PGS_CONFIG=/etc/pgs/pgs.toml|' \
    -e 's|^ReadOnlyPaths=.*|ReadOnlyPaths=/etc/pgs|' \
    -e 's|/srv/pgs|/var/lib/pgs|g' \
    haproxy/pgs-agent.service > "$root/lib/systemd/system/pgs-agent.service"
sed -e 's|/srv/pgs/pgs.toml|/etc/pgs/pgs.toml|g' -e 's|/srv/pgs|/var/lib/pgs|g' \
    haproxy/haproxy.service.d/pgs.conf > "$root/usr/share/pgs/haproxy.service.d/pgs.conf"
sed -e 's|^PGS_CONFIG=.*|PGS_CONFIG=/etc/pgs/pgs.toml|' \
    haproxy/pgs-sync.cron > "$root/usr/share/doc/pgs-agent/examples/pgs-sync.cron"
chmod 0644 "$root/lib/systemd/system/pgs-agent.service" \
    "$root/usr/share/pgs/haproxy.service.d/pgs.conf" \
    "$root/usr/share/doc/pgs-agent/examples/pgs-sync.cron"
# The binary carries its own copy of the router and installs it on `render`; this one is for
# reading and for HAProxy setups that load it themselves.
install -m 0644 lua/pg-route.lua lua/pgs_wire.lua "$root/usr/share/pgs/lua/"
install -m 0644 monitoring/pgs-alerts.yml monitoring/grafana-dashboard.json "$root/usr/share/pgs/monitoring/"
install -m 0644 monitoring/tests/pgs-alerts.test.yml "$root/usr/share/pgs/monitoring/tests/"

doc=$root/usr/share/doc/pgs-agent
install -m 0644 packaging/deb/copyright "$doc/copyright"
install -m 0644 README.md "$doc/README.md"
gzip -9n -c BENCHMARKS.md > "$doc/BENCHMARKS.md.gz"
date=$(git log -1 --format=%cD 2>/dev/null || date -R)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
printf 'pgs-agent (%s) unstable; urgency=medium\n\n  * Built from commit %s.\n\n -- pgs maintainers <maintainers@pgs.invalid>  %s\n' \
    "$version" "$commit" "$date" | gzip -9n > "$doc/changelog.gz"

install -m 0755 packaging/deb/postinst packaging/deb/postrm "$root/DEBIAN/"

# libc (and anything else dynamically linked) as dpkg-shlibdeps computes it.
mkdir -p "$stage/shlibs/debian"
printf 'Source: pgs-agent\n\nPackage: pgs-agent\nArchitecture: any\n' > "$stage/shlibs/debian/control"
shlibs=$(cd "$stage/shlibs" && dpkg-shlibdeps -O "$root/usr/bin/pgs-agent" 2>/dev/null \
         | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: pgs-agent
Version: $version
Architecture: $arch
Maintainer: pgs maintainers <maintainers@pgs.invalid>
Installed-Size: $size
Depends: $shlibs, haproxy (>= 2.6), docker.io | docker-ce
Recommends: postgresql-client
Section: database
Priority: optional
Description: PostgreSQL server per tenant, behind one HAProxy port
 pgs-agent is the control plane of pgs: it runs one PostgreSQL server per
 tenant (a Docker container and a data volume each) and keeps HAProxy, which
 routes every client to its tenant's server by the user name of its startup
 packet, in line with a declarative tenants file. Access flips take effect in
 HAProxy's memory in milliseconds, without a reload.
 .
 The package creates a layout in /var/lib/pgs with its settings in
 /etc/pgs/pgs.toml on first install and starts nothing: see
 /usr/share/doc/pgs-agent/README.md, "Install the package".
CONTROL
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb=$out/pgs-agent_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "build-deb: $(du -h "$deb" | cut -f1) $(dpkg-deb --field "$deb" Depends)"
echo "$deb"
