#!/usr/bin/env bash
# Make this machine able to build and test rbr: install the Debian packages
# that are missing (as root), then build and install the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev libjson-c-dev
          libipc-run-perl nodejs make gcc curl openssl postgresql-15-cron chromium libxml2-utils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "rbr setup: missing packages: ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "rbr setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

pgc=${RBR_PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
echo "rbr setup: building"
make -s PG_CONFIG="$pgc" >/dev/null
if [ "$(id -u)" = 0 ] || [ -w "$("$pgc" --pkglibdir)" ]; then
    make -s install PG_CONFIG="$pgc" >/dev/null
else
    sudo -n make -s install PG_CONFIG="$pgc" >/dev/null
fi
echo "rbr setup: installed into $("$pgc" --pkglibdir)"
