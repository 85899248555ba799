#!/usr/bin/env bash
# Trains jaxlm on a Cloud TPU VM pod slice: creates the slice (or reuses it), puts this code on
# every worker, installs it, and runs the same `python -m jaxlm.main` on all workers at once.
# Each worker is one JAX process; jaxlm.parallel.distributed.initialize finds the others by itself.
#
#   launch/tpu_vm.sh --workdir=gs://my-bucket/runs/llama_1b --config=configs/llama_1b.py \
#       --accelerator-type=v5litepod-16 --zone=us-west4-a -- --config.train.steps=2000
#   launch/tpu_vm.sh --dry-run --workdir=gs://my-bucket/runs/x   # print the commands only
#   launch/tpu_vm.sh --delete                                    # delete the slice
#
# Options, each also settable by the environment variable beside it (an option wins):
#   --name=NAME               TPU_NAME          TPU VM name            (default jaxlm-$USER)
#   --zone=ZONE               ZONE              zone                   (default us-central2-b)
#   --project=PROJECT         PROJECT           GCP project            (default: gcloud's)
#   --accelerator-type=TYPE   ACCELERATOR_TYPE  slice type             (default v4-16: 2 hosts)
#   --version=VERSION         TPU_VERSION       TPU VM software image  (default tpu-ubuntu2204-base)
#   --config=PATH[:ARG]       CONFIG            run config             (default configs/tiny.py)
#   --workdir=DIR             WORKDIR           run directory; required (a gs:// path or a
#                                               directory local to each worker)
#   --repo-url=URL            REPO_URL          git clone URL instead of copying this checkout
#   --ref=REF                 REF               branch/tag/commit for --repo-url (default main)
#   --python=VERSION          PYTHON_VERSION    Python of the workers' venv (default 3.11)
#   --spot                    SPOT=1            create a Spot slice
#   --skip-setup              SKIP_SETUP=1      keep the code and venv already on the workers
#   --dry-run                 DRY_RUN=1         print the commands instead of running them
#   --delete                                    delete the slice and exit
# Arguments after `--` are passed to jaxlm.main on every worker.
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxlm-${USER:-user}}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-16}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/tiny.py}
WORKDIR=${WORKDIR:-}
REPO_URL=${REPO_URL:-}
REF=${REF:-main}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
SPOT=${SPOT:-0}
SKIP_SETUP=${SKIP_SETUP:-0}
DRY_RUN=${DRY_RUN:-0}
DELETE=0
main_args=()

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --accelerator-type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --version=*) TPU_VERSION=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --repo-url=*) REPO_URL=${1#*=} ;;
    --ref=*) REF=${1#*=} ;;
    --python=*) PYTHON_VERSION=${1#*=} ;;
    --spot) SPOT=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --delete) DELETE=1 ;;
    --) shift; main_args=("$@"); break ;;
    *) die "unknown option $1 (options take --key=value; jaxlm.main arguments go after --)" ;;
  esac
  shift
done

# Words as one line that a shell reads back as the same words (quoted only where needed).
quote_words() {
  local word out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$word"); else out+=("${word@Q}"); fi
  done
  echo "${out[*]}"
}
# Runs a command, or with --dry-run prints it (quoted, so it can be pasted).
run() {
  if (( DRY_RUN )); then quote_words "$@"; else "$@"; fi
}
tpu_vm() {
  local verb=$1
  shift
  run gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" --zone="$ZONE" \
    ${PROJECT:+--project="$PROJECT"} "$@"
}

if (( DELETE )); then
  tpu_vm delete --quiet
  exit 0
fi
[[ -n $WORKDIR ]] || die "--workdir (or WORKDIR) is required, e.g. --workdir=gs://my-bucket/runs/x"
cd "$(dirname "$0")/.."  # the repository root

# 1. The slice: reuse one of this name, else create it.
create=(create --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION")
if (( SPOT )); then create+=(--spot); fi
if (( DRY_RUN )); then
  echo "# create the slice unless 'describe' finds it"
  tpu_vm describe --format='value(state)'
  tpu_vm "${create[@]}"
elif state=$(tpu_vm describe --format='value(state)' 2>/dev/null); then
  echo "tpu_vm.sh: reusing TPU VM $TPU_NAME (state ${state})" >&2
else
  tpu_vm "${create[@]}"
fi

# 2. The code on every worker (~/jaxlm) and a venv with it installed (~/jaxlm-venv).
# Single quotes: $HOME is expanded by the workers' shells.
remote_dir='$HOME/jaxlm'
venv='$HOME/jaxlm-venv'
if (( ! SKIP_SETUP )); then
  if [[ -n $REPO_URL ]]; then
    fetch="rm -rf $remote_dir && git clone --quiet $(quote_words "$REPO_URL") $remote_dir && \
git -C $remote_dir checkout --quiet $(quote_words "$REF")"
  else
    # This checkout as it is: tracked and untracked files, without what .gitignore ignores.
    tarball="${TMPDIR:-/tmp}/jaxlm-code-$$.tar.gz"
    if (( DRY_RUN )); then
      echo "git ls-files -z --cached --others --exclude-standard | tar --null -czf $tarball -T -"
    else
      trap 'rm -f "$tarball"' EXIT
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
        tar --null -czf "$tarball" -T -
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxlm.tar.gz" --worker=all \
      --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
    fetch="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf \$HOME/jaxlm.tar.gz -C $remote_dir"
  fi
  # TPU VM images ship an older Python than jaxlm needs; uv fetches the one asked for.
  install="python3 -m pip install --user --quiet --upgrade uv && \
\$HOME/.local/bin/uv venv --quiet --allow-existing --python $PYTHON_VERSION $venv && \
\$HOME/.local/bin/uv pip install --quiet --python $venv/bin/python -e \"$remote_dir[tpu]\""
  tpu_vm ssh --worker=all --command="set -euo pipefail; $fetch && $install"
fi

# 3. The run: the same command on every worker at once; process 0 writes the metrics.
train=$(quote_words -m jaxlm.main --config="$CONFIG" --workdir="$WORKDIR" \
  ${main_args[@]+"${main_args[@]}"})
tpu_vm ssh --worker=all --command="cd $remote_dir && $venv/bin/python $train"
