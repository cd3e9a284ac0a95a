# Sourced by test.sh and demo.sh: make .venv with Python 3.12 and install the package once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python312() {
    local candidates=("${PYTHON:-}" python3.12 python3)
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
    fi
    candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12)
    for py in "${candidates[@]}"; do
        [ -n "$py" ] || continue
        # A pyenv shim exists but refuses to run unless 3.12 is selected: run it to be sure.
        if "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; then
            command -v "$py" 2>/dev/null || echo "$py"
            return 0
        fi
    done
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    PY="$(find_python312)" || {
        echo "error: no working Python 3.12 found (megatron-core 0.17 on needs it)." >&2
        echo "Install Python 3.12 or point PYTHON=/path/to/python3.12 at one." >&2
        exit 1
    }
    echo "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
    echo "installing megatron_channel and its dependencies into $VENV (log: $VENV/install.log)"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
           "$VENV/bin/python" -m pip install -e "$ROOT[test]"; } >"$VENV/install.log" 2>&1; then
        tail -n 30 "$VENV/install.log" >&2
        echo "error: installation failed; see $VENV/install.log" >&2
        exit 1
    fi
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

# layered_venv DIR: a virtual environment at DIR that sees the main one's packages after its own
# (through a .pth file), so torch and the rest are not installed twice.
layered_venv() {
    local dir="$1" site
    python -m venv "$dir" &&
    site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" &&
    echo "import site; site.addsitedir($(python -c 'import sysconfig; print(repr(sysconfig.get_paths()["purelib"]))'))" \
        >"$site/_main_environment.pth"
}

# made_once DIR WHAT LOG COMMAND...: unless DIR was made before, make it with COMMAND (its output
# in LOG); prints DIR's python.
made_once() {
    local dir="$1" what="$2" log="$3"
    shift 3
    if [ ! -f "$dir/.installed" ]; then
        rm -rf "$dir"
        echo "making $dir: $what over $VENV (log: $log)" >&2
        if ! "$@" >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            echo "error: could not make $dir ($what); see $log" >&2
            return 1
        fi
        touch "$dir/.installed"
    fi
    echo "$dir/bin/python"
}

# megatron_release_env VERSION: a virtual environment of its own for megatron-core==VERSION,
# layered on the main one, with what that release needs beside it
# (``MegatronRelease.test_requirements``). Made once; prints its python.
megatron_release_env() {
    made_once "$ROOT/.venv-megatron/$1" "megatron-core==$1" "$VENV/install-megatron-$1.log" install_release "$1"
}
install_release() {
    local version="$1" dir="$ROOT/.venv-megatron/$1"
    python -m megatron_channel.megatron_internals.releases requirements "$version" >"$VENV/requirements-$version.txt" &&
    layered_venv "$dir" &&
    "$dir/bin/python" -m pip install -r "$VENV/requirements-$version.txt"
}

# bridge_env: a virtual environment for Megatron-Bridge, layered on the main one like
# megatron_release_env, for the Bridge tests and demo on a machine without a GPU. Made once;
# prints its python. On a GPU machine install Bridge the usual way instead (README, docs/bridge.md):
# the two workarounds below are for this CPU environment only.
#  * Bridge's declared dependencies do not install without CUDA (fast-hadamard-transform builds
#    CUDA code; nvidia-resiliency-ext 0.6.0, pinned by megatron-core[dev], has only a glibc 2.39
#    wheel), so Bridge goes in with --no-deps plus the modules its training code imports.
#  * nvidia-resiliency-ext 0.6.0 is pure Python where Bridge and megatron-core use it (its one
#    compiled module is the straggler detector's), so its wheel is unpacked as it is.
# Bridge also imports transformer_engine unconditionally: megatron_channel.cpu.bridge_on_cpu
# stands in for it at run time.
BRIDGE_VERSION="0.6.2"
BRIDGE_REQUIREMENTS=(
    "transformers>=5.8,<=5.12.1" "kernels>=0.12,<0.13" omegaconf "hydra-core>=1.3.4,<1.4" einops datasets peft
    accelerate sentencepiece tiktoken megatron-energon "nvidia-modelopt[torch]"
    grpcio-tools httpx nvidia-ml-py defusedxml   # what nvidia-resiliency-ext imports
)
bridge_env() {
    made_once "$ROOT/.venv-bridge" "megatron-bridge==$BRIDGE_VERSION" "$VENV/install-bridge.log" install_bridge
}
install_bridge() {
    local dir="$ROOT/.venv-bridge" site
    layered_venv "$dir" &&
    site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" &&
    "$dir/bin/python" -m pip install --no-deps "megatron-bridge==$BRIDGE_VERSION" &&
    "$dir/bin/python" -m pip install "${BRIDGE_REQUIREMENTS[@]}" &&
    "$dir/bin/python" -m pip install --no-deps --target "$site" --platform manylinux_2_39_x86_64 \
        --only-binary :all: "nvidia-resiliency-ext==0.6.0"
}
