#!/usr/bin/env bash
# Smoke test of the real image: build the Dockerfile, run the container on 127.0.0.1, wait for /readyz,
# classify one image, check non-root + healthcheck + metrics + graceful SIGTERM, then remove everything
# this script started (container, network, images, a dockerd it launched) by name/ID/PID.
#
# Heavy (torch is several GB): not part of the default CI run. Run it by hand:
#   sudo docker/smoke.sh                       # engine: docker if its daemon answers, else podman
#   SMOKE_ENGINE=podman docker/smoke.sh
# Settings (environment):
#   SMOKE_ENGINE        docker | podman (default: auto)
#   SMOKE_VARIANT       cpu | cuda (default cpu)
#   SMOKE_PORT          host port on 127.0.0.1 (default 18080)
#   SMOKE_NETWORK       bridge (own network, port published on 127.0.0.1) | host (default bridge,
#                       falls back to host when the engine cannot make a bridge here)
#   SMOKE_STANDIN       auto | never: when the base image cannot be pulled (no registry), build a
#                       stand-in with debootstrap and import it under the base image's name (default auto)
#   SMOKE_LOCAL_INDEXES space-separated local PyPI mirrors (dirs with simple/) mounted into the build
#                       (podman only; default: /opt/pypi /opt/pypi-more when present)
#   SMOKE_CA_BUNDLE     CA bundle handed to pip as a build secret (default: $PIP_CERT or the system one)
#   SMOKE_KEEP_IMAGES=1 keep the built image and the base stand-in (faster re-runs)
#   SMOKE_CACHE         where the debootstrap rootfs tarball is kept between runs (default /var/tmp/evit-smoke)
#   SMOKE_BUILD_TIMEOUT_S (default 3600), SMOKE_READY_TIMEOUT_S (default 300)
#   SMOKE_WEIGHTS       a .safetensors for vit_tiny_patch16_224 (default: ../shared/assets/...; if
#                       absent the container runs random weights)
#   SMOKE_SAMPLES       a folder with labels.tsv + JPEGs (default ../shared/assets/imagenet-sample; if
#                       absent a generated image is sent and only the answer's shape is checked)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

variant=${SMOKE_VARIANT:-cpu}
port=${SMOKE_PORT:-18080}
tag="evit-serve:smoke-$variant"
name="evit-smoke-$$"
net="evit-smoke-$$"
work=$(mktemp -d /tmp/evit-smoke.XXXXXX)
cache=${SMOKE_CACHE:-/var/tmp/evit-smoke}
weights=${SMOKE_WEIGHTS:-$root/../shared/assets/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors}
sample_dir=${SMOKE_SAMPLES:-$root/../shared/assets/imagenet-sample}
t_start=$(date +%s)
dockerd_pid=""
made_network=""
made_standin=""
container_started=""

log() { printf '[smoke %4ss] %s\n' "$(($(date +%s) - t_start))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

# ---------------------------------------------------------------- engine
engine=${SMOKE_ENGINE:-auto}
if [ "$engine" = auto ]; then
    if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then engine=docker
    elif command -v podman >/dev/null; then engine=podman
    elif command -v dockerd >/dev/null; then engine=docker
    else die "no container engine: install podman (apt-get install podman runc) or docker.io"; fi
fi

cleanup() {
    local rc=$?
    set +e
    if [ -n "$container_started" ]; then
        $engine logs "$name" >"$work/container.log" 2>&1
        $engine rm -f -t 5 "$name" >/dev/null 2>&1 || $engine rm -f "$name" >/dev/null 2>&1
    fi
    [ -n "$made_network" ] && $engine network rm "$net" >/dev/null 2>&1
    if [ "${SMOKE_KEEP_IMAGES:-0}" != 1 ]; then
        $engine rmi -f "$tag" >/dev/null 2>&1
        [ -n "$made_standin" ] && $engine rmi -f "$made_standin" >/dev/null 2>&1
    fi
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$dockerd_pid" 2>/dev/null
    fi
    [ -s "$work/container.log" ] && { log "container log (last 15 lines):"; tail -15 "$work/container.log"; }
    rm -rf "$work"
    log "cleaned up; exit $rc; total $(($(date +%s) - t_start)) s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$engine" = podman ]; then
    # Seen needed in this VM: runc, cgroupfs, and explicit ulimits: open files no higher than this
    # shell's (podman's default 1048576 is refused) and processes no higher than 32768 (conmon's cap
    # here; SMOKE_NPROC). A private containers.conf via CONTAINERS_CONF; the system one is left alone.
    cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Sn):$(ulimit -Hn)", "nproc=${SMOKE_NPROC:-32768}:${SMOKE_NPROC:-32768}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF="$work/containers.conf"
elif ! timeout 10 docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || die "docker daemon not running and no dockerd to start"
    sock="$work/docker.sock"
    log "starting dockerd by hand (socket $sock)"
    dockerd --host "unix://$sock" --data-root "$cache/docker" --exec-root "$work/docker-exec" \
        --pidfile "$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    export DOCKER_HOST="unix://$sock"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log"; die "dockerd did not start"; }
fi
log "engine: $engine ($($engine --version 2>/dev/null | head -1))"

# ---------------------------------------------------------------- base image
base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
[ "$variant" = cuda ] && base=$(sed -n 's/^ARG CUDA_IMAGE=//p' Dockerfile)
full_base="docker.io/library/$base"
[[ "$base" == */* ]] && full_base="docker.io/$base"
pull_args=()
if $engine image inspect "$full_base" >/dev/null 2>&1 || $engine image inspect "$base" >/dev/null 2>&1; then
    log "base image $base present"
elif timeout 120 $engine pull -q "$base" >"$work/pull.log" 2>&1; then
    log "pulled $base"
else
    log "cannot pull $base ($(tail -1 "$work/pull.log" | cut -c1-120))"
    [ "${SMOKE_STANDIN:-auto}" = never ] && die "no base image and SMOKE_STANDIN=never"
    [ "$variant" = cpu ] || die "a debootstrap stand-in exists for the cpu variant (Debian python3) only"
    command -v debootstrap >/dev/null || die "no registry and no debootstrap (apt-get install debootstrap)"
    suite=$(sed -E 's/.*-(bookworm|bullseye|trixie)$/\1/' <<<"$base")
    tarball="$cache/standin-$suite.tar"
    mkdir -p "$cache"
    if [ ! -s "$tarball" ]; then
        log "debootstrap $suite stand-in for $base (python3 from Debian $suite)"
        rootfs="$work/rootfs"
        nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$suite" "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
            || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    $engine import -q --change 'CMD ["python3"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$tarball" "$full_base" >/dev/null
    made_standin="$full_base"
    log "imported stand-in as $full_base ($(du -h "$tarball" | cut -f1) rootfs)"
fi
[ "$engine" = podman ] && pull_args=(--pull=never)

# ---------------------------------------------------------------- build
build_args=(--build-arg "VARIANT=$variant" -t "$tag" -f Dockerfile)
if ! timeout 15 curl -fsS -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    log "torch's CPU wheel index unreachable: torch comes from PyPI (the several-GB CUDA build)"
    build_args+=(--build-arg TORCH_INDEX_URL=)
fi
ca=${SMOKE_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
[ -s "$ca" ] && build_args+=(--secret "id=pip_ca,src=$ca")
if [ "$engine" = podman ]; then
    # docker format keeps HEALTHCHECK; without kept images no layer cache either (nothing left behind)
    build_args+=(--format docker --network host "${pull_args[@]}")
    [ "${SMOKE_KEEP_IMAGES:-0}" = 1 ] || build_args+=(--layers=false)
    extra=""
    for d in ${SMOKE_LOCAL_INDEXES-/opt/pypi /opt/pypi-more}; do
        [ -d "$d/simple" ] || continue
        build_args+=(-v "$d:$d:ro")
        extra="$extra file://$d/simple"
    done
    [ -n "$extra" ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra# }") && log "local wheel mirrors:$extra"
else
    export DOCKER_BUILDKIT=1
    build_args+=(--network host)
fi
log "building $tag ($engine build ${build_args[*]} .)"
t_build=$(date +%s)
nice -n 10 timeout "${SMOKE_BUILD_TIMEOUT_S:-3600}" $engine build "${build_args[@]}" . >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; die "build failed"; }
build_s=$(($(date +%s) - t_build))
size=$($engine image inspect "$tag" --format '{{.Size}}')
log "built in ${build_s}s, image size $((size / 1024 / 1024)) MiB"

# ---------------------------------------------------------------- run
run_args=(-d --name "$name" -e EVIT_LOG_LEVEL=info)
if [ "$engine" = podman ]; then
    # podman schedules healthchecks with systemd timers; without systemd, run it by hand below.
    [ -d /run/systemd/system ] || run_args+=(--health-interval disable)
fi
if [ -s "$weights" ]; then
    run_args+=(-v "$(cd "$(dirname "$weights")" && pwd):/models:ro"
               -e EVIT_MODEL=vit_tiny_patch16_224 -e "EVIT_CHECKPOINT=/models/$(basename "$weights")")
    log "model: vit_tiny_patch16_224 with $(basename "$weights")"
else
    run_args+=(-e EVIT_MODEL=vit_tiny_patch16_224 -e EVIT_RANDOM_WEIGHTS=true)
    log "model: vit_tiny_patch16_224 with random weights (no $weights)"
fi
mode=${SMOKE_NETWORK:-bridge}
if [ "$mode" = bridge ]; then
    if $engine network create "$net" >/dev/null 2>&1; then
        made_network=1
        if $engine run "${run_args[@]}" --network "$net" -p "127.0.0.1:$port:8000" "$tag" >/dev/null 2>"$work/run.err"; then
            container_started=1
        else
            log "bridge run failed ($(tail -1 "$work/run.err" | cut -c1-160)); falling back to host network"
            $engine rm -f "$name" >/dev/null 2>&1 || true
            mode=host
        fi
    else
        log "cannot create a network here; using the host network"
        mode=host
    fi
fi
if [ "$mode" = host ]; then
    $engine run "${run_args[@]}" --network host -e EVIT_HOST=127.0.0.1 -e "EVIT_PORT=$port" "$tag" >/dev/null \
        || die "container did not start"
    container_started=1
fi
url="http://127.0.0.1:$port"
log "container $name started ($mode network), waiting for $url/readyz"
t_ready=$(date +%s)
ready=""
for _ in $(seq "${SMOKE_READY_TIMEOUT_S:-300}"); do
    if curl -fsS -m 2 "$url/readyz" >/dev/null 2>&1; then ready=1; break; fi
    [ "$($engine inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || die "container exited"
    sleep 1
done
[ -n "$ready" ] || die "/readyz not ready within ${SMOKE_READY_TIMEOUT_S:-300}s"
log "ready after $(($(date +%s) - t_ready))s"

# ---------------------------------------------------------------- checks
uid=$($engine exec "$name" id -u)
[ "$uid" != 0 ] || die "container runs as root"
log "runs as uid $uid"
$engine healthcheck run "$name" >/dev/null 2>&1 || [ "$engine" = docker ] || die "HEALTHCHECK failed"
[ "$engine" = podman ] && log "HEALTHCHECK passes"

image="$work/sample.jpg"; expect=""
if [ -s "$sample_dir/labels.tsv" ]; then
    line=$(sed -n 2p "$sample_dir/labels.tsv")
    cp "$sample_dir/$(cut -f1 <<<"$line")" "$image"
    expect=$(cut -f2 <<<"$line")
else
    py=python3; [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
    "$py" -c 'import sys; from PIL import Image; Image.new("RGB", (96, 80), (200, 40, 30)).save(sys.argv[1], "JPEG")' \
        "$image" || die "no sample image (needs Pillow)"
fi
resp=$(curl -fsS -m 60 -H 'Content-Type: image/jpeg' --data-binary "@$image" "$url/classify?keep_rate=0.5&top_k=5") \
    || die "classify failed"
python3 - "$resp" "$expect" <<'EOF' || die "bad classify answer: $resp"
import json, sys
r = json.loads(sys.argv[1])
assert r["keep_rate"] == 0.5 and len(r["predictions"]) == 5 and r["tokens"] > 0, r
top5 = [p["class_index"] for p in r["predictions"]]
if sys.argv[2]:
    print(f"  expected class {sys.argv[2]}, top-5 {top5}, top-1 {r['predictions'][0]['label']!r}")
    assert int(sys.argv[2]) in top5, "expected class not in the top 5"
print(f"  classify: tokens {r['tokens']}, timings {r['timings']}")
EOF
metrics=$(curl -fsS -m 10 "$url/metrics") || die "/metrics failed"
grep -Eq '^evit_requests_total\{.*code="200".*\} 1\.0$' <<<"$metrics" || die "/metrics did not count the request"
log "classify + /metrics OK"

t_stop=$(date +%s)
$engine stop -t 60 "$name" >/dev/null
code=$($engine inspect -f '{{.State.ExitCode}}' "$name")
log "SIGTERM: exited $code after $(($(date +%s) - t_stop))s"
[ "$code" = 0 ] || die "non-zero exit after SIGTERM"
log "PASS (build ${build_s}s)"
