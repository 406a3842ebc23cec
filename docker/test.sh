#!/usr/bin/env bash
# `make docker-test`: build ./Dockerfile for real and run a user's whole workflow in the container.
#
# There is no Docker engine or registry on the project's machines (dev and CI), so this uses rootful
# podman from Debian's packages and a local stand-in of the CUDA PyTorch base image, tagged with the
# upstream name the Dockerfile names and used with --pull=never: the Dockerfile itself is built
# unchanged. Inside the container, as the image's non-root user and with host folders mounted as a
# user would (-v HOST:/data -v HOST:/runs), it runs
#   seg --help; seg synth; seg fit (one short epoch); seg predict (a folder)
# and checks on the host that the dataset, the checkpoint and the predictions are there.
#
# What it cannot prove here: the CUDA base itself and GPU access (--gpus all); that is for a GPU node.
#
# Needs root (apt-get, debootstrap, rootful podman). Everything it keeps lives under /tmp:
#   SEG_PODMAN_ROOT (default /tmp/podman)     podman storage; the stand-in base is cached there
#   SEG_DOCKER_WORK (default /tmp/seg-docker) the host folders mounted as /data and /runs, conf files
# Extra `seg fit` overrides can be given in SEG_DOCKER_FIT_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."

PODMAN_ROOT=${SEG_PODMAN_ROOT:-/tmp/podman}
WORK=${SEG_DOCKER_WORK:-/tmp/seg-docker}
IMAGE=${SEG_DOCKER_IMAGE:-localhost/seg:test}
DEBIAN_BASE=localhost/seg-debian-base:bookworm
TORCH_WHEEL_DIR=${SEG_TORCH_WHEELS:-/opt/wheels}
# Overrides that keep the demo model tiny and the run short on a 2-core CPU machine.
FIT_ARGS=(--trainer.max_epochs 1 --trainer.accelerator cpu --trainer.devices 1)
# shellcheck disable=SC2206
FIT_ARGS+=(${SEG_DOCKER_FIT_ARGS:-})

T0=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf '\ndocker-test: FAILED: %s\n' "$*" >&2; exit 1; }

# ---- 1. tools: podman (with runc) and debootstrap, from Debian ------------------------------------
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || die "needs root to install ${missing[*]} (apt-get)"
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
[ "$(id -u)" = 0 ] || die "needs root (rootful podman, debootstrap)"

mkdir -p "$WORK" "$PODMAN_ROOT"
# crun (podman's default runtime) refuses this host's cgroup layout and the default ulimits cannot be
# raised here: use runc and explicit limits.
cat > "$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$WORK/containers.conf
P=(podman --root "$PODMAN_ROOT/storage" --runroot "$PODMAN_ROOT/run")

# pip inside RUN steps goes through a proxy whose CA only the host trusts: hand the host's bundle to
# pip at build time only (neither the Dockerfile nor the image's CA bundle changes).
printf '[global]\ncert = /run/ci-ca.crt\n' > "$WORK/pip-ci.conf"
BUILD_MOUNTS=(-v /etc/ssl/certs/ca-certificates.crt:/run/ci-ca.crt:ro
              -v "$WORK/pip-ci.conf:/etc/xdg/pip/pip.conf:ro")

# ---- 2. the stand-in base image, cached by the inputs that make it --------------------------------
BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n1)
[ -n "$BASE" ] || die "no 'ARG BASE_IMAGE=' default in Dockerfile"
case "$BASE" in */*/*) BASE_REF=$BASE ;; */*) BASE_REF=docker.io/$BASE ;; *) BASE_REF=docker.io/library/$BASE ;; esac
key=$( { cat docker/standin.Dockerfile; ls "$TORCH_WHEEL_DIR"/torch-2.13.0*.whl 2>/dev/null; } | sha256sum | cut -c1-12)
STANDIN=localhost/seg-torch-standin:$key

if "${P[@]}" image exists "$STANDIN"; then
    step "stand-in base cached: $STANDIN"
else
    ls "$TORCH_WHEEL_DIR"/torch-2.13.0*.whl >/dev/null 2>&1 \
        || die "no torch-2.13.0 wheel in $TORCH_WHEEL_DIR for the stand-in base"
    if ! "${P[@]}" image exists "$DEBIAN_BASE"; then
        step "debootstrapping Debian bookworm (minbase + python3) for the stand-in"
        MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        MIRROR=${MIRROR:-http://deb.debian.org/debian}
        rootfs=$(mktemp -d /tmp/seg-rootfs.XXXXXX)
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -n 30 "$WORK/debootstrap.log"; rm -rf "$rootfs"; die "debootstrap"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | "${P[@]}" import - "$DEBIAN_BASE" >/dev/null
        rm -rf "$rootfs"
    fi
    step "building the stand-in base (torch==2.13.0 CPU from $TORCH_WHEEL_DIR)"
    "${P[@]}" build --pull=never "${BUILD_MOUNTS[@]}" -v "$TORCH_WHEEL_DIR:/opt/wheels:ro" \
        --build-arg DEBIAN_BASE="$DEBIAN_BASE" -f docker/standin.Dockerfile -t "$STANDIN" docker
fi
"${P[@]}" tag "$STANDIN" "$BASE_REF"

# ---- 3. the project's Dockerfile, unchanged ---------------------------------------------------------
step "building ./Dockerfile (FROM $BASE, --pull=never) as $IMAGE"
"${P[@]}" build --pull=never "${BUILD_MOUNTS[@]}" -t "$IMAGE" -f Dockerfile .
"${P[@]}" image prune -f >/dev/null || true   # drop the previous build's untagged layers

# ---- 4. the user's workflow in the container --------------------------------------------------------
user=$("${P[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
uid=${user%%:*}
gid=${user#*:}; [ "$gid" != "$user" ] || gid=$uid
[[ "$uid" =~ ^[0-9]+$ && "$uid" != 0 ]] || die "image USER is '$user', expected a numeric non-root uid"

# Host folders as a user would mount them. The container runs as the image's uid (rootful podman, no
# user namespace), so the host folders are handed to that uid, as the README tells users to do.
rm -rf "$WORK/data" "$WORK/runs"
mkdir -p "$WORK/data" "$WORK/runs"
chown "$uid:$gid" "$WORK/data" "$WORK/runs"
RUN=("${P[@]}" run --rm --shm-size=1g -v "$WORK/data:/data" -v "$WORK/runs:/runs" -e WANDB_MODE=offline)

step "seg --help (as uid $uid)"
"${RUN[@]}" "$IMAGE" --help | tee "$WORK/help.txt"
grep -q "usage: seg" "$WORK/help.txt" || die "seg --help printed no usage"
[ "$("${RUN[@]}" --entrypoint id "$IMAGE" -u)" = "$uid" ] || die "container does not run as uid $uid"
# Anything the build left in /tmp (e.g. a root-owned MPLCONFIGDIR) would break the non-root user.
left=$("${RUN[@]}" --entrypoint find "$IMAGE" /tmp -mindepth 1 -maxdepth 1)
[ -z "$left" ] || die "the image ships files in /tmp: $left"

step "the image's torch is the base's torch"
base_torch=$("${P[@]}" run --rm --entrypoint python "$STANDIN" -c 'import torch; print(torch.__version__)')
image_torch=$("${RUN[@]}" --entrypoint python "$IMAGE" -c 'import torch; print(torch.__version__)')
echo "base: $base_torch  image: $image_torch"
[ "$base_torch" = "$image_torch" ] || die "pip replaced the base's torch ($base_torch -> $image_torch)"

step "seg synth"
"${RUN[@]}" "$IMAGE" synth --output /data/synth --cases 4 --test-cases 2 --size 32 32 24
n_test=$(find "$WORK/data/synth/imagesTs" -name '*.nii*' | wc -l)
[ "$n_test" -eq 2 ] || die "expected 2 test scans in $WORK/data/synth/imagesTs on the host, found $n_test"
[ "$(stat -c %u "$WORK/data/synth")" = "$uid" ] || die "synth output is not owned by uid $uid"

step "seg fit (one short epoch): ${FIT_ARGS[*]}"
"${RUN[@]}" "$IMAGE" fit --config configs/demo.yaml --data.root /data/synth \
    --trainer.default_root_dir /runs/demo "${FIT_ARGS[@]}"
[ -s "$WORK/runs/demo/checkpoints/last.ckpt" ] || die "no checkpoint at $WORK/runs/demo/checkpoints/last.ckpt"

step "seg predict (a folder)"
"${RUN[@]}" "$IMAGE" predict --checkpoint /runs/demo/checkpoints/last.ckpt \
    --input /data/synth/imagesTs --output /runs/pred
# One prediction per input scan, named after its case, on the host.
for scan in "$WORK"/data/synth/imagesTs/*.nii*; do
    case_id=$(basename "$scan"); case_id=${case_id%%.nii*}; case_id=${case_id%_0000}
    compgen -G "$WORK/runs/pred/$case_id*.nii*" >/dev/null \
        || die "no prediction for $case_id in $WORK/runs/pred on the host"
done
ls -l "$WORK/runs/pred"

# `docker run --user "$(id -u):$(id -g)"`, as the README offers: the image must work for any uid.
step "seg predict as an arbitrary uid (--user 4321:4321)"
rm -rf "$WORK/runs-as-user" && mkdir -p "$WORK/runs-as-user" && chown 4321:4321 "$WORK/runs-as-user"
# seg synth leaves its dataset folder private to its writer (0700): open it for reading, as a user's
# dataset folder would be.
chmod -R a+rX "$WORK/data"
"${P[@]}" run --rm --shm-size=1g --user 4321:4321 -e WANDB_MODE=offline -v "$WORK/data:/data:ro" \
    -v "$WORK/runs:/ckpt:ro" -v "$WORK/runs-as-user:/runs" "$IMAGE" \
    predict --checkpoint /ckpt/demo/checkpoints/last.ckpt --input /data/synth/imagesTs --output /runs/pred
n_user=$(find "$WORK/runs-as-user/pred" -user 4321 -name '*.nii*' | wc -l)
[ "$n_user" -eq "$n_test" ] || die "expected $n_test predictions owned by uid 4321, found $n_user"

step "docker-test passed in $(($(date +%s) - T0)) s (outputs in $WORK)"
