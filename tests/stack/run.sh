#!/usr/bin/env bash
# The compose stack, run for real: builds the images from the real Dockerfiles, starts
# docker-compose.yml, scales, kills and stops it, and asserts each step's outcome.
#
#   tests/stack/run.sh            # everything: prepare, build, scenario, figures
#   tests/stack/run.sh build      # prepare and build the images only
#
# Not part of .ci/run: a cold build of the images takes tens of minutes on 2 cores.
#
# On a Debian machine with no Docker (run as root, or with sudo), it first installs what is
# missing, with apt:
#   - Docker Engine: Debian's docker.io;
#   - Compose v2 and buildx: Debian's docker-compose 2.x / docker-buildx, from the next Debian
#     release (trixie) on bookworm, with an apt pin that takes only those two packages from it;
#   - debootstrap, if a base image has to be made.
# If no Docker daemon answers it starts one (`nice -n $STACK_NICE dockerd`, 19 by default, so
# image builds yield the CPU to other work) and stops it at the end; a daemon that was already
# running is left alone, and so is everything this script did not start.
#
# When an image cannot be pulled (no registry reachable), it is made locally under its real
# tag, so the Dockerfiles stay the ones users build:
#   - debian:bookworm-slim: `debootstrap --variant=minbase bookworm`, slimmed like the official
#     image (no docs, man pages or locales; apt lists removed), then `docker import`;
#   - rust:<version>-bookworm (the Dockerfiles' builder): that Debian image plus this machine's
#     Rust toolchain (its `rustc` must be that version) and this machine's CA bundle, so that
#     cargo and pip inside a build can reach the package registries. The image stays local.
# Vendor images that cannot be had (Redpanda, Console, MinIO, mc) are replaced by stand-ins,
# tests/stack/compose.standins.yml: Tansu for Redpanda, s3s-fs for MinIO, no Console.
#
# Settings (environment):
#   STACK_NICE=19             niceness of a dockerd started here
#   STACK_PROJECT=ticket-pipeline-stacktest   compose project name (volumes and network
#                             are this project's own, never a user's ticket-pipeline data)
#   STACK_KEEP=1              leave the stack running at the end (for a look around)
#   STACK_HOST_PORT_BASE      first of the host ports given to the stack (default 29000)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/tests/stack"
MODE=${1:-all}
STACK_NICE=${STACK_NICE:-19}
STACK_PROJECT=${STACK_PROJECT:-ticket-pipeline-stacktest}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ticket-stack.XXXXXX")
DOCKERD_PID=""
STACK_UP=""
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

log() { printf '\n[stack %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '\n[stack] FAILED: %s\n' "$*" >&2; exit 1; }

# Figures and step results, printed at the end (and on failure, what was reached).
RESULTS=()
result() { RESULTS+=("$*"); log "RESULT $*"; }
print_results() {
  printf '\n==== tests/stack/run.sh results ====\n'
  local r
  for r in "${RESULTS[@]}"; do printf '%s\n' "$r"; done
}

cleanup() {
  local rc=$?
  set +e
  if [ -n "$STACK_UP" ] && [ -z "${STACK_KEEP:-}" ]; then
    if [ "$rc" != 0 ]; then
      log "failure: last logs of the stack"
      compose ps -a >&2
      compose logs --no-color --tail 40 >&2
    fi
    compose down -v --remove-orphans >/dev/null 2>&1
  fi
  if [ -n "$DOCKERD_PID" ] && [ -z "${STACK_KEEP:-}" ]; then
    log "stopping the dockerd started here (pid $DOCKERD_PID)"
    $SUDO kill "$DOCKERD_PID" 2>/dev/null
    local deadline=$((SECONDS + 30))
    while kill -0 "$DOCKERD_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  fi
  print_results
  [ "$rc" = 0 ] || printf '[stack] exit %s\n' "$rc"
  rm -rf "$WORK" 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls COMMAND... every second until it succeeds, or fails after SECONDS with WHAT.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || die "$what: not reached within ${secs}s"
    sleep 1
  done
}

############################ the engine and Compose v2 ############################

apt_install() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_engine() {
  local updated=""
  if ! command -v dockerd >/dev/null; then
    log "installing Docker Engine (Debian's docker.io)"
    $SUDO apt-get update -qq; updated=1
    apt_install docker.io iptables
  fi
  if ! docker compose version >/dev/null 2>&1 || ! docker buildx version >/dev/null 2>&1; then
    log "installing Compose v2 and buildx (Debian's docker-compose 2.x and docker-buildx)"
    . /etc/os-release
    if [ "${VERSION_CODENAME:-}" = bookworm ]; then
      # Taken from the next release, trixie, pinned so that nothing else comes from it.
      $SUDO tee /etc/apt/sources.list.d/ticket-pipeline-trixie.sources >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
      $SUDO tee /etc/apt/preferences.d/ticket-pipeline-trixie >/dev/null <<'EOF'
# tests/stack/run.sh: only Compose v2 and buildx come from trixie.
Package: *
Pin: release n=trixie
Pin-Priority: 1

Package: docker-compose docker-buildx
Pin: release n=trixie
Pin-Priority: 500
EOF
      updated=""
    fi
    [ -n "$updated" ] || $SUDO apt-get update -qq
    apt_install docker-compose docker-buildx
  fi
  docker compose version >/dev/null 2>&1 || die "docker compose (v2) is not available"
}

ensure_daemon() {
  if docker info >/dev/null 2>&1; then
    log "using the Docker daemon already running"
    return
  fi
  log "starting dockerd (nice -n $STACK_NICE), log in $WORK/dockerd.log"
  $SUDO sh -c "nice -n $STACK_NICE dockerd >'$WORK/dockerd.log' 2>&1 & echo \$! >'$WORK/dockerd.pid'"
  DOCKERD_PID=$(cat "$WORK/dockerd.pid")
  local deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      tail -20 "$WORK/dockerd.log" >&2
      die "dockerd did not start"
    fi
    sleep 1
  done
}

############################ base images ############################

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# Pulls IMAGE unless present; returns 1 if it cannot be had (no registry reachable).
pull_if_missing() {
  have_image "$1" && return 0
  timeout 120 docker pull -q "$1" >/dev/null 2>&1
}

# debian:bookworm-slim from Debian's mirror, as the official image is made: minbase, then the
# documentation, man pages and locales removed and kept out of later installs.
make_debian_image() {
  local tag=$1 rootfs="$WORK/rootfs"
  command -v debootstrap >/dev/null || { $SUDO apt-get update -qq; apt_install debootstrap; }
  log "making $tag with debootstrap (no registry reachable)"
  $SUDO debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  $SUDO sh -c "
    set -e
    cd '$rootfs'
    rm -f etc/apt/sources.list
    cat > etc/apt/sources.list.d/debian.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat > etc/dpkg/dpkg.cfg.d/docker <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat > etc/apt/apt.conf.d/docker-clean <<'EOF'
DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };
APT::Update::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };
Dir::Cache::pkgcache \"\";
Dir::Cache::srcpkgcache \"\";
EOF
    echo 'Acquire::Languages \"none\";' > etc/apt/apt.conf.d/docker-no-languages
    echo 'Acquire::GzipIndexes \"true\";' > etc/apt/apt.conf.d/docker-gzip-indexes
    find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find usr/share/doc -mindepth 1 -type d -empty -delete
    rm -rf usr/share/man/* usr/share/groff/* usr/share/info/* usr/share/lintian/* usr/share/linda/*
    find usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb var/log/* tmp/*
  "
  $SUDO tar -C "$rootfs" -c . | docker import \
    -c 'CMD ["bash"]' -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$tag" >/dev/null
  $SUDO rm -rf "$rootfs"
}

# rust:X-bookworm (the Dockerfiles' builder) from this machine's toolchain, laid out like the
# official image (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo on PATH), with
# the C toolchain the -sys crates need and this machine's CA bundle added to the trusted ones.
make_rust_image() {
  local tag=$1 want=${1#rust:}; want=${want%-bookworm}
  command -v rustc >/dev/null || die "$tag cannot be pulled and there is no rustc here to make it"
  local have sysroot
  have=$(rustc --version | awk '{print $2}')
  case "$have" in
    "$want"|"$want".*) ;;
    *) die "$tag cannot be pulled and this machine's rustc is $have, not $want" ;;
  esac
  sysroot=$(rustc --print sysroot)
  log "making $tag from this machine's Rust $have ($sysroot)"
  local ctx="$WORK/rust-image"
  mkdir -p "$ctx/toolchain"
  cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
  [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$ctx/toolchain/"
  [ -d "$sysroot/etc" ] && cp -a "$sysroot/etc" "$ctx/toolchain/"
  local ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  [ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
  cp "$ca" "$ctx/host-ca-bundle.crt"
  cat > "$ctx/Dockerfile" <<EOF
FROM debian:bookworm-slim
RUN apt-get update \\
 && apt-get install -y --no-install-recommends ca-certificates curl git gcc g++ libc6-dev make \\
      patch perl xz-utils bzip2 unzip file pkg-config \\
 && rm -rf /var/lib/apt/lists/*
COPY host-ca-bundle.crt /usr/local/share/ca-certificates/host-ca-bundle.crt
RUN update-ca-certificates >/dev/null
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$have
COPY toolchain/ /usr/local/rustup/toolchains/$have-x86_64-unknown-linux-gnu/
RUN mkdir -p /usr/local/cargo/bin \\
 && for b in /usr/local/rustup/toolchains/$have-x86_64-unknown-linux-gnu/bin/*; do ln -s "\$b" /usr/local/cargo/bin/; done \\
 && cargo --version && rustc --version
EOF
  DOCKER_BUILDKIT=1 docker build -q -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
}

base_images() {
  local debian=debian:bookworm-slim rust
  rust=$(awk '$1 == "FROM" && $2 ~ /^rust:/ {print $2; exit}' "$ROOT/Dockerfile.processor")
  [ -n "$rust" ] || die "no rust: builder image in Dockerfile.processor"
  pull_if_missing "$debian" || make_debian_image "$debian"
  pull_if_missing "$rust" || make_rust_image "$rust"
  result "base images: $debian $(docker image inspect -f '{{.Size}}' "$debian" | awk '{printf "%.0f MB", $1/1e6}'), $rust $(docker image inspect -f '{{.Size}}' "$rust" | awk '{printf "%.0f MB", $1/1e6}')"
}

############################ main ############################

ensure_engine
ensure_daemon
base_images
[ "$MODE" = base ] && exit 0
