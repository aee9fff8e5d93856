#!/usr/bin/env bash
# Install the Debian packages the project uses, when missing: mricron-data (atlases, Colin27),
# chromium + chromium-driver (end-to-end dashboard test), postgresql (PostgreSQL store test).
# Needs root and apt-get; elsewhere it says what is missing and carries on (those tests then skip).
set -u
need=()
[ -d /usr/share/mricron/templates ] || need+=(mricron-data)
command -v chromium >/dev/null 2>&1 || need+=(chromium chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "warning: apt-get could not install ${need[*]}; tests that need them will be skipped"
else
  echo "note: not installing ${need[*]} (needs root and apt-get); tests that need them will be skipped"
fi
exit 0
