#!/usr/bin/env bash
# Makes a Docker engine available for the tests of the CARLA server manager, where that can be done.
#
# - An engine that answers `docker info` is left as it is.
# - Otherwise, as root with apt: install docker.io (if missing) and start dockerd in the background
#   (systemd's unit where systemd runs, else dockerd itself with the flags that work in a container:
#   no iptables, no bridge, vfs storage; its log goes to /tmp/dockerd.log), then wait up to 60 s.
# - Either way, as root with apt, install what the tests use beside the engine when it is missing:
#   busybox-static (the stand-in CARLA image is a static busybox) and docker-compose (its compose-spec
#   schema and `docker-compose config` check the compose files).
#
# Exits 0 when an engine answers, 1 when none could be started; callers carry on either way
# (the docker tests then skip, saying why).
set -u
log() { echo "docker-engine: $*"; }

can_install=false
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    can_install=true
fi

missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

apt_install() {
    local missing
    missing=$(missing_packages "$@")
    [ -z "$missing" ] && return 0
    log "installing $(echo $missing)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq $missing; } >/tmp/docker-engine-apt.log 2>&1; then
        log "apt-get install failed (see /tmp/docker-engine-apt.log)"
        return 1
    fi
}

engine_up() { docker info >/dev/null 2>&1; }

if $can_install; then
    apt_install busybox-static docker-compose || true
fi

if engine_up; then
    log "engine already running"
    exit 0
fi

if ! $can_install; then
    log "no engine running, and installing one needs root and apt; start Docker yourself (sudo systemctl start docker)"
    exit 1
fi

apt_install docker.io || exit 1

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    log "starting docker through systemd"
    systemctl start docker >/dev/null 2>&1 || log "systemctl start docker failed; trying dockerd directly"
fi

if ! engine_up && ! pgrep -x dockerd >/dev/null 2>&1; then
    # A pid file left by a dockerd that died stops the next one from starting.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid 2>/dev/null)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    log "starting dockerd (log: /tmp/dockerd.log)"
    nohup dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
        >/tmp/dockerd.log 2>&1 </dev/null &
fi

for _ in $(seq 1 60); do
    if engine_up; then
        log "engine up ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
        exit 0
    fi
    sleep 1
done
log "dockerd did not answer within 60 s; last lines of /tmp/dockerd.log:"
tail -n 20 /tmp/dockerd.log 2>/dev/null | sed 's/^/    /'
exit 1
