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
#   STACK_CARGO_PROFILE=release   the images' cargo profile (CARGO_PROFILE): release (thin
#                             LTO, as released) or fast (no LTO, rebuilds in minutes)
#   STACK_WARM_BUILD=0        skip the warm-build measurement (one more release link of the
#                             processor, minutes on 2 cores) when the images are up to date
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
      save_logs
      log "failure: last logs of the stack (all of them in $LOGS)"
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
    # shellcheck source=/dev/null
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

############################ the project's copy and Compose ############################

SRC="$WORK/src"
COMPOSE_FILES=(-f docker-compose.yml)
VENDOR_IMAGES=()

# The repository's files as they are (tracked and untracked, minus what git ignores), in a
# scratch directory: the scenario's `cp .env.example .env` and the warm-build edit happen
# there, never in the working tree, and a user's own .env is left alone.
snapshot() {
  mkdir -p "$SRC"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    xargs -0 -I{} sh -c '[ -e "{}" ] && printf "%s\0" "{}"' |
    tar -c --null -T - ) | tar -x -C "$SRC"
}

compose() { (cd "$SRC" && docker compose -p "$STACK_PROJECT" "${COMPOSE_FILES[@]}" "$@"); }

# Vendor images: the real ones when they can be had, stand-ins (tests/stack/compose.standins.yml)
# otherwise.
choose_images() {
  mapfile -t VENDOR_IMAGES < <(awk '$1 == "image:" && $2 !~ /^(ticket-pipeline|\$\{IMAGE_REGISTRY)/ {print $2}' "$ROOT/docker-compose.yml")
  local missing=() img
  for img in "${VENDOR_IMAGES[@]}"; do
    pull_if_missing "$img" || missing+=("$img")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    COMPOSE_FILES+=(-f tests/stack/compose.standins.yml)
    result "vendor images: stand-ins (cannot be pulled: ${missing[*]})"
  else
    result "vendor images: the real ones (${VENDOR_IMAGES[*]})"
  fi
}

# Host ports for this run's stack, away from the defaults a user's stack may hold.
write_env() {
  cp "$SRC/.env.example" "$SRC/.env"
  local base=${STACK_HOST_PORT_BASE:-29000}
  cat >> "$SRC/.env" <<EOF

# tests/stack/run.sh: host ports of its own, so that it runs beside a user's stack.
REDPANDA_KAFKA_PORT=$((base + 92))
REDPANDA_SCHEMA_REGISTRY_PORT=$((base + 81))
REDPANDA_ADMIN_PORT=$((base + 44))
CONSOLE_PORT=$((base + 80))
MINIO_API_PORT=$((base + 0))
MINIO_CONSOLE_PORT=$((base + 1))
# The report page within seconds of the tickets, not a minute.
REPORT_EVERY_SECS=10
# Images of this run's own, always built here from the snapshot (never a pulled release).
IMAGE_REGISTRY=ticket-pipeline-stacktest
PIPELINE_VERSION=local
CARGO_PROFILE=${STACK_CARGO_PROFILE:-release}
EOF
  S3_HOST_ENDPOINT="http://127.0.0.1:$base"
  # What the scenario reads S3 with: the processor's own credentials from .env.
  set -a
  # shellcheck source=/dev/null
  . "$SRC/.env"
  set +a
}

############################ images ############################

# Builds with Compose, timed; the log goes to $WORK/build-NAME.log.
timed_build() {
  local name=$1; shift
  local start=$SECONDS
  if ! compose --progress plain build "$@" >"$WORK/build-$name.log" 2>&1; then
    tail -40 "$WORK/build-$name.log" >&2
    die "docker compose build ($name) failed"
  fi
  echo $((SECONDS - start))
}

# The crates cargo compiled in a build log, other than the workspace's own.
dependency_compiles() {
  grep -oE 'Compiling [A-Za-z0-9_-]+ v' "$1" | awk '{print $2}' |
    grep -vE '^ticket-' | sort -u || true
}

# cargo's own "Finished ... in T" times in a build log, in order (dependency layer first).
cargo_times() {
  # shellcheck disable=SC2016 # backquotes are literal here
  grep -oE 'Finished `[a-z0-9_-]+` profile [^ ]+ target\(s\) in [0-9hms. ]+' "$1" |
    sed -E 's/.* in //' | paste -sd, - || true
}

image_mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.1f", $1/1e6}'; }

build_images() {
  if [ ${#COMPOSE_FILES[@]} -gt 2 ]; then
    local s; s=$(timed_build standins redpanda minio)
    result "build stand-ins (Tansu, s3s-fs): ${s}s"
  fi
  local first deps
  first=$(timed_build first ticket-producer ticket-processor)
  deps=$(dependency_compiles "$WORK/build-first.log" | wc -l)
  if [ "$deps" -gt 0 ]; then
    result "build images, cold ($deps dependency crates compiled): ${first}s (cargo: $(cargo_times "$WORK/build-first.log"))"
  elif grep -q 'Compiling ticket-' "$WORK/build-first.log"; then
    # Sources changed since the cached build: this was a warm build already.
    result "build images, warm (sources changed since the last build; no dependency recompiled): ${first}s (cargo: $(cargo_times "$WORK/build-first.log"))"
  else
    result "build images: every layer from the cache: ${first}s"
  fi
  if [ "${STACK_WARM_BUILD:-1}" = 0 ]; then
    result "build images, warm: not measured (STACK_WARM_BUILD=0)"
  elif [ "$deps" -gt 0 ] || ! grep -q 'Compiling ticket-' "$WORK/build-first.log"; then
    # Warm: one line edited on the streaming path (in the scratch copy). The dependency layer
    # must be reused, the edited crate recompiled, and the reading side's crates left alone.
    printf '\n// edited by tests/stack/run.sh to time a warm build\n' >>"$SRC/crates/ticket-stream/src/stream/mod.rs"
    local warm rebuilt
    warm=$(timed_build warm ticket-producer ticket-processor)
    rebuilt=$(dependency_compiles "$WORK/build-warm.log")
    [ -z "$rebuilt" ] || die "a warm build recompiled dependencies: $(echo "$rebuilt" | tr "\n" " " | head -c 300)"
    grep -q 'Compiling ticket-stream' "$WORK/build-warm.log" ||
      die "the warm build did not recompile the edited crate"
    ! grep -qE 'Compiling ticket-(lake|engine|s3|core) ' "$WORK/build-warm.log" ||
      die "an edit on the streaming side recompiled a crate it does not touch: $(grep -oE 'Compiling ticket-[a-z0-9-]+' "$WORK/build-warm.log" | tr '\n' ' ')"
    result "build images, warm (one line edited in ticket-stream; no dependency, no reading-side crate recompiled): ${warm}s (cargo: $(cargo_times "$WORK/build-warm.log"))"
  fi
  local p q
  p=$(image_mb ticket-pipeline-stacktest/ticket-processor:local)
  q=$(image_mb ticket-pipeline-stacktest/ticket-producer:local)
  result "image sizes: ticket-processor ${p} MB (goal <= 120), ticket-producer ${q} MB (goal <= 100)"
  awk -v p="$p" -v q="$q" 'BEGIN { exit !(p <= 120 && q <= 100) }' ||
    log "WARNING: an image is above its size goal"
}

############################ the scenario ############################

ids() { compose ps -a -q "$1"; }
state() { docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$1"; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1"; }
cname() { docker inspect -f '{{.Name}}' "$1" | sed 's|^/||'; }

exited_ok() { [ "$(state "$1")" = "exited 0" ]; }
is_exited() { case "$(state "$1")" in exited*) return 0 ;; *) return 1 ;; esac; }
all_healthy() {
  local n=$1 id count=0
  for id in $(ids ticket-processor); do
    [ "$(health "$id")" = healthy ] && count=$((count + 1))
  done
  [ "$count" -eq "$n" ]
}

# Every container's log, kept after the run (target/ is git-ignored).
LOGS="$ROOT/target/stack-logs"
save_logs() {
  mkdir -p "$LOGS"
  local id
  for id in $(compose ps -a -q); do
    docker logs -t "$id" >"$LOGS/$(cname "$id").log" 2>&1 || true
  done
}

# (SSL_CERT_FILE: the CA to trust when the TLS phase serves S3 over HTTPS.)
S3_HOST_CA=""
s3_state() {
  if [ -n "$S3_HOST_CA" ]; then
    SSL_CERT_FILE="$S3_HOST_CA" python3 "$HERE/s3check.py" "$S3_HOST_ENDPOINT" "$S3_BUCKET_NAME" "${S3_PREFIX:-}"
  else
    python3 "$HERE/s3check.py" "$S3_HOST_ENDPOINT" "$S3_BUCKET_NAME" "${S3_PREFIX:-}"
  fi
}
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, d))' "$1"; }

# Every produced ticket is in S3 exactly once, with its team, and latest.jsonl agrees.
S3_LAST=""
s3_has() {
  local want=$1
  S3_LAST=$(s3_state 2>/dev/null) || return 1
  [ "$(json 'tickets' <<<"$S3_LAST")" -ge "$want" ] &&
    [ "$(json 'counts_total' <<<"$S3_LAST")" -ge "$want" ]
}
# True once the ticket-report service's page shows $1 tickets.
report_shows() {
  S3_LAST=$(s3_state 2>/dev/null) || return 1
  [ "$(json 'report_tickets' <<<"$S3_LAST")" = "$1" ]
}
s3_objects() {
  S3_LAST=$(s3_state 2>/dev/null) || return 1
  [ "$(json 'objects' <<<"$S3_LAST")" -ge 1 ]
}
# True once CONTAINER is no longer the running one it was (RestartCount was $2).
killed() { [ "$(docker inspect -f '{{.State.Running}} {{.RestartCount}}' "$1")" != "true $2" ]; }
assert_exactly_once() {
  local want=$1 runs=$2 s
  s=$(s3_state)
  S3_LAST=$s
  [ "$(json 'tickets' <<<"$s")" -eq "$want" ] || die "S3 has $(json 'tickets' <<<"$s") tickets, expected $want: $s"
  [ "$(json 'unique' <<<"$s")" -eq "$want" ] || die "duplicates in S3: $s"
  [ "$(json 'wrong_team' <<<"$s")" -eq 0 ] || die "tickets with a wrong support_team: $s"
  [ "$(json 'counts_ok' <<<"$s")" = True ] || die "latest.jsonl does not match the tickets: $s"
  # Each producer run complete: count == highest sequence number, from 1.
  [ "$(json "sorted(c for c, lo, hi in runs.values() if lo == 1 and hi == c)" <<<"$s")" = "$runs" ] ||
    die "a producer run is incomplete in S3 (expected runs of $runs): $s"
}

# Prometheus gauge NAME of a processor container, read from the host at the container's
# address on the compose network (the image has no shell or curl to run inside it).
metric() {
  local ip
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" | awk '{print $1}')
  [ -n "$ip" ] || { echo 0; return; }
  timeout 5 bash -c "exec 3<>/dev/tcp/$ip/9090 && printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3 && cat <&3" 2>/dev/null |
    awk -v m="$2" '$1 == m {print int($2); found=1} END {if (!found) print 0}'
}
sharing() {
  local id total=0 v
  for id in $(ids ticket-processor); do
    v=$(metric "$id" ticket_processor_assigned_partitions)
    [ "$v" -ge 1 ] || return 1
    total=$((total + v))
  done
  [ "$total" -eq "$TOPIC_PARTITIONS" ]
}

scenario() {
  log "scenario: docker compose up -d --build"
  local t0=$SECONDS
  compose up -d --build >"$WORK/up.log" 2>&1 || { tail -30 "$WORK/up.log" >&2; die "up -d --build failed"; }
  local topics producer
  topics=$(ids topics); producer=$(ids ticket-producer)
  wait_for 60 "topics job exited" is_exited "$topics"
  exited_ok "$topics" || die "topics job: $(state "$topics")"
  result "up: topics job exited 0"
  wait_for 120 "producer exited" is_exited "$producer"
  exited_ok "$producer" || die "producer: $(state "$producer")"
  docker logs "$producer" 2>&1 | grep -q "delivered $NB_TICKETS of $NB_TICKETS tickets" ||
    die "producer did not report $NB_TICKETS delivered: $(docker logs "$producer" 2>&1 | tail -3)"
  result "up: producer exited 0, delivered $NB_TICKETS of $NB_TICKETS"
  wait_for 120 "processor healthy (its HEALTHCHECK)" all_healthy 1
  result "up: processor healthy by its own HEALTHCHECK after $((SECONDS - t0))s"
  wait_for 120 "a first object in S3" s3_objects
  result "time from up to the first object in S3: $((SECONDS - t0))s (images already built; BATCH_MAX_AGE_MS=$BATCH_MAX_AGE_MS)"
  wait_for 120 "$NB_TICKETS tickets in S3" s3_has "$NB_TICKETS"
  assert_exactly_once "$NB_TICKETS" "[$NB_TICKETS]"
  result "up: $NB_TICKETS tickets in S3 exactly once, right teams, counts match ($(json 'objects' <<<"$S3_LAST") objects)"
  [ "$(json 'len(hours)' <<<"$S3_LAST")" -ge 1 ] || die "no date=/hour= folders: $S3_LAST"
  result "layout: ticket objects under $(json 'hours' <<<"$S3_LAST")"

  log "scenario: the reading side (query in a container, the ticket-report service's page)"
  local q
  q=$(compose run --rm -T ticket-processor query --format csv "SELECT count(*) AS n FROM tickets WHERE date IS NOT NULL" 2>>"$WORK/up.log") ||
    die "docker compose run ticket-processor query failed (see $WORK/up.log)"
  [ "$(tail -1 <<<"$q")" = "$NB_TICKETS" ] || die "query counted '$(tail -1 <<<"$q")', expected $NB_TICKETS"
  result "query: docker compose run --rm ticket-processor query counts $NB_TICKETS tickets"
  wait_for 180 "reports/index.html showing $NB_TICKETS tickets" report_shows "$NB_TICKETS"
  result "report: the ticket-report service keeps reports/index.html current ($NB_TICKETS tickets on the page)"

  log "scenario: 20,000 more tickets, scale to 3, SIGKILL one mid-stream"
  # `docker compose run ticket-producer --count 20000`, detached and at a rate so that the
  # kill below lands while tickets still arrive; without --rm, to read its exit code (removed
  # below).
  local more="$STACK_PROJECT-producer-20k"
  compose run -d --name "$more" ticket-producer --count 20000 --rate 250 >/dev/null
  compose up -d --no-deps --scale ticket-processor=3 ticket-processor >>"$WORK/up.log" 2>&1 ||
    die "scale to 3 failed"
  [ "$(ids ticket-processor | wc -l)" -eq 3 ] || die "not 3 processors: $(ids ticket-processor)"
  wait_for 120 "three processors healthy" all_healthy 3
  wait_for 120 "the three processors sharing the $TOPIC_PARTITIONS partitions" sharing
  result "scale: 3 processors healthy, each with >= 1 of the $TOPIC_PARTITIONS partitions"
  local victim; victim=$(ids ticket-processor | sed -n 2p)
  [ "$(state "$more" 2>/dev/null)" = "running 0" ] || die "the producer ended before the kill: not mid-stream"
  local before restarts
  before=$(s3_state | json 'tickets')
  restarts=$(docker inspect -f '{{.RestartCount}}' "$victim")
  docker kill -s KILL "$victim" >/dev/null
  wait_for 30 "killed processor down" killed "$victim" "$restarts"
  result "kill: SIGKILL $(cname "$victim") mid-stream ($before tickets in S3, producer still sending)"
  # (Its restart policy may have started it already; then this is a no-op.)
  docker start "$victim" >/dev/null
  wait_for 120 "killed processor healthy again" all_healthy 3
  result "kill: $(cname "$victim") started again and healthy"
  wait_for 300 "the 20,000-ticket producer exited" is_exited "$more"
  exited_ok "$more" || die "the 20,000-ticket producer: $(state "$more")"
  docker logs "$more" 2>&1 | grep -q "delivered 20000 of 20000 tickets" ||
    die "the producer did not report 20000 delivered: $(docker logs "$more" 2>&1 | tail -3)"
  docker rm "$more" >/dev/null
  result "run ticket-producer --count 20000: exited 0, delivered 20000 of 20000"
  local total=$((NB_TICKETS + 20000))
  wait_for 300 "catch-up: $total tickets in S3" s3_has "$total"
  assert_exactly_once "$total" "[$NB_TICKETS, 20000]"
  result "catch-up: all $total tickets exactly once, right teams, counts match ($(json 'objects' <<<"$S3_LAST") objects)"
  wait_for 120 "reports/index.html showing $total tickets" report_shows "$total"
  result "report: the page followed the new tickets ($total on it)"

  log "scenario: the same topic into a Delta table"
  # A user switching to the table: OUTPUT_FORMAT=delta with a prefix and a consumer group of its
  # own, as a --drain beside the running processors; then query, compact, and a reader we did
  # not write.
  compose run --rm -T -e OUTPUT_FORMAT=delta -e S3_PREFIX=delta/ -e CONSUMER_GROUP=stack-delta \
    ticket-processor --drain >>"$WORK/delta.log" 2>&1 ||
    die "the --drain into the Delta table failed (see $WORK/delta.log)"
  local dq
  dq=$(compose run --rm -T -e S3_PREFIX=delta/ ticket-processor query --format csv \
    "SELECT count(*) AS n, count(DISTINCT ticket_id) AS ids FROM tickets" 2>>"$WORK/delta.log") ||
    die "query over the Delta table failed (see $WORK/delta.log)"
  [ "$(tail -1 <<<"$dq")" = "$total,$total" ] || die "query over the Delta table: $dq (expected $total,$total)"
  local dc
  dc=$(compose run --rm -T -e S3_PREFIX=delta/ ticket-processor compact --older-than-hours 0 --no-vacuum 2>>"$WORK/delta.log") ||
    die "compact failed (see $WORK/delta.log)"
  result "delta: --drain into delta/tables/tickets_with_team/, query counts $total tickets once; compact: $(head -1 <<<"$dc")"
  if python3 -c 'import deltalake' 2>/dev/null; then
    local rows
    rows=$(python3 -c 'import os, sys; from deltalake import DeltaTable
t = DeltaTable(sys.argv[1], storage_options={"AWS_ENDPOINT_URL": sys.argv[2], "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
ids = t.to_pyarrow_table(columns=["ticket_id"]).column("ticket_id").to_pylist()
print(len(ids), len(set(ids)), flush=True); os._exit(0)' "s3://$S3_BUCKET_NAME/delta/tables/tickets_with_team/" "$S3_HOST_ENDPOINT") ||
      die "the deltalake package could not read the table"
    [ "$rows" = "$total $total" ] || die "deltalake read $rows (rows, distinct), expected $total"
    result "delta: the deltalake package (delta-rs) reads $total rows, each ticket once"
  else
    result "NOTE delta: the deltalake Python package is not installed; the table was not read by another engine"
  fi

  log "scenario: docker compose stop"
  local procs; procs=$(ids ticket-processor)
  local ts=$SECONDS
  compose stop >>"$WORK/up.log" 2>&1 || die "compose stop failed"
  local took=$((SECONDS - ts)) id unlogged=""
  save_logs
  for id in $procs; do
    # 0, not 137: it ended by itself within stop_grace_period, after its graceful stop.
    exited_ok "$id" || die "$(cname "$id") did not exit 0 on stop: $(state "$id")"
    if docker logs "$id" 2>&1 | grep -q "Stopped before"; then
      die "$(cname "$id") stopped with unwritten batches"
    fi
    # Its last run (after its last start) logged the signal.
    docker logs "$id" 2>&1 | awk '/Serving \/health/ {s = 0} /Stopping: signal received/ {s = 1} END {exit !s}' ||
      unlogged="$unlogged $(cname "$id")"
  done
  result "stop: 3 processors exited 0 within their grace period (compose stop took ${took}s), none left a batch unwritten"
  [ -z "$unlogged" ] || result "NOTE stop: 'Stopping: signal received' not logged by:$unlogged (logs in $LOGS)"

  log "scenario: docker compose down -v"
  compose down -v --remove-orphans >>"$WORK/up.log" 2>&1 || die "down -v failed"
  STACK_UP=""
  local label="label=com.docker.compose.project=$STACK_PROJECT"
  [ -z "$(docker ps -aq --filter "$label")" ] || die "containers left after down -v"
  [ -z "$(docker network ls -q --filter "$label")" ] || die "networks left after down -v"
  [ -z "$(docker volume ls -q --filter "$label")" ] || die "volumes left after down -v"
  result "down -v: no container, network or volume left"
}

# The stack again under docker-compose.tls.yml, as its header says to run it: certificates made
# with the openssl commands it gives, Kafka over TLS and S3 over HTTPS for every client (the
# stand-ins behind stunnel when the vendor images cannot be had).
tls_scenario() {
  log "scenario: docker-compose.tls.yml (TLS on Kafka and S3, a CA made here)"
  local dir="$SRC/tls"
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -keyout ca.key -out ca.pem -subj /CN=ticket-pipeline-stack-ca
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout server.key -out server.csr -subj /CN=redpanda
    printf 'subjectAltName=DNS:redpanda,DNS:minio,DNS:localhost,IP:127.0.0.1\n' >san.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile san.cnf -out server.pem
    chmod 644 server.key
  ) >"$WORK/tls-certs.log" 2>&1 || { cat "$WORK/tls-certs.log" >&2; die "making the certificates failed"; }
  local standins=""
  [ ${#COMPOSE_FILES[@]} -gt 2 ] && standins=1
  COMPOSE_FILES=(-f docker-compose.yml -f docker-compose.tls.yml)
  [ -z "$standins" ] || COMPOSE_FILES+=(-f tests/stack/compose.standins.yml -f tests/stack/compose.standins.tls.yml)
  S3_HOST_ENDPOINT="https://127.0.0.1:${STACK_HOST_PORT_BASE:-29000}"
  S3_HOST_CA="$dir/ca.pem"
  STACK_UP=1
  compose up -d >"$WORK/tls-up.log" 2>&1 || { tail -30 "$WORK/tls-up.log" >&2; die "up -d with docker-compose.tls.yml failed"; }
  local topics producer
  topics=$(ids topics); producer=$(ids ticket-producer)
  wait_for 90 "topics job exited (TLS)" is_exited "$topics"
  exited_ok "$topics" || die "topics job over TLS: $(state "$topics"): $(docker logs "$topics" 2>&1 | tail -3)"
  wait_for 120 "producer exited (TLS)" is_exited "$producer"
  exited_ok "$producer" || die "producer over TLS: $(state "$producer"): $(docker logs "$producer" 2>&1 | tail -3)"
  docker logs "$producer" 2>&1 | grep -q "delivered $NB_TICKETS of $NB_TICKETS tickets" ||
    die "producer over TLS did not report $NB_TICKETS delivered"
  result "tls: topics job and producer exited 0 over TLS (delivered $NB_TICKETS of $NB_TICKETS)"
  wait_for 120 "processor healthy (TLS)" all_healthy 1
  wait_for 120 "$NB_TICKETS tickets in S3 (HTTPS)" s3_has "$NB_TICKETS"
  assert_exactly_once "$NB_TICKETS" "[$NB_TICKETS]"
  result "tls: the processor consumed over TLS and wrote over HTTPS: $NB_TICKETS tickets exactly once (read back over HTTPS trusting only the CA)"
  local q
  q=$(compose run --rm -T ticket-processor query --format csv "SELECT count(*) AS n FROM tickets" 2>>"$WORK/tls-up.log") ||
    die "query over HTTPS failed (see $WORK/tls-up.log)"
  [ "$(tail -1 <<<"$q")" = "$NB_TICKETS" ] || die "query over HTTPS counted '$(tail -1 <<<"$q")'"
  wait_for 120 "reports/index.html showing $NB_TICKETS tickets (HTTPS)" report_shows "$NB_TICKETS"
  result "tls: query and the ticket-report service read the results over HTTPS"
  # The same containers without the CA: refused at start, saying why.
  local out
  if out=$(compose run --rm -T -e KAFKA_SSL_CA_LOCATION= ticket-producer --count 1 2>&1); then
    die "the producer without the CA connected anyway: $out"
  fi
  grep -q "SSL handshake failed" <<<"$out" && grep -q "KAFKA_SSL_CA_LOCATION" <<<"$out" ||
    die "the producer without the CA did not say why: $(tail -3 <<<"$out")"
  if out=$(compose run --rm -T -e AWS_CA_BUNDLE= ticket-processor query "SELECT count(*) FROM tickets" 2>&1); then
    die "query without the CA read S3 anyway: $out"
  fi
  grep -q "AWS_CA_BUNDLE" <<<"$out" || die "query without the CA did not say why: $(tail -3 <<<"$out")"
  result "tls: without the CA, the producer and query stop at once naming KAFKA_SSL_CA_LOCATION / AWS_CA_BUNDLE"
  save_logs
  compose down -v --remove-orphans >>"$WORK/tls-up.log" 2>&1 || die "down -v (TLS) failed"
  STACK_UP=""
  result "tls: down -v"
}

# A run stopped from outside (a timeout's SIGKILL) leaves its compose project behind, and the
# next `up` then trips over containers whose network is gone ("No such object"). This
# project's own containers, networks and volumes are removed first; nothing else is touched.
clear_leftovers() {
  local label="label=com.docker.compose.project=$STACK_PROJECT" left
  left=$(docker ps -aq --filter "$label")
  [ -n "$left$(docker network ls -q --filter "$label")$(docker volume ls -q --filter "$label")" ] || return 0
  log "removing what an earlier run of project $STACK_PROJECT left behind"
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  left=$(docker ps -aq --filter "$label")
  [ -z "$left" ] || docker rm -f -v $left >/dev/null 2>&1 || true
  left=$(docker network ls -q --filter "$label")
  [ -z "$left" ] || docker network rm $left >/dev/null 2>&1 || true
  left=$(docker volume ls -q --filter "$label")
  [ -z "$left" ] || docker volume rm -f $left >/dev/null 2>&1 || true
  [ -z "$(docker ps -aq --filter "$label")$(docker network ls -q --filter "$label")$(docker volume ls -q --filter "$label")" ] ||
    die "cannot remove what an earlier run of project $STACK_PROJECT left behind"
  result "leftovers of an earlier run removed"
}

############################ main ############################

ensure_engine
ensure_daemon
base_images
[ "$MODE" = base ] && exit 0
snapshot
choose_images
write_env
clear_leftovers
build_images
[ "$MODE" = build ] && exit 0
STACK_UP=1
scenario
tls_scenario
log "all steps passed"
