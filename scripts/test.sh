#!/usr/bin/env bash
# Run the tests (creates .venv with Python 3.12 and installs the package on first use).
#
#   ./scripts/test.sh                  everything: the main suite on the newest supported
#                                      megatron-core, then each older release in its own
#                                      environment (tests/test_releases.py and the release checks),
#                                      then Megatron-Bridge's loop in its own (tests/test_bridge*.py)
#   ./scripts/test.sh -m "not e2e"     the unit tests only, no torchrun launch (about 3 minutes)
#   ./scripts/test.sh ARGS...          pytest ARGS over tests/, main environment only
#
# MEGATRON_RELEASES lists the other releases to run (default: every tested release other than the
# main environment's, from megatron_channel.megatron_internals.releases; empty: none).
# MEGATRON_BRIDGE=0 leaves out the Megatron-Bridge environment and its tests.
source "$(dirname "$0")/_env.sh"
if [ $# -gt 0 ]; then
    exec python -m pytest tests "$@"
fi
status=0
python -m pytest tests || status=$?
releases="${MEGATRON_RELEASES-$(python -m megatron_channel.megatron_internals.releases others 2>/dev/null)}"
for version in $releases; do
    release_python="$(megatron_release_env "$version")"
    echo "== megatron-core $version, in its own environment ($(dirname "$(dirname "$release_python")"))"
    MEGATRON_RELEASE="$version" "$release_python" -m pytest -p no:cacheprovider \
        tests/test_releases.py tests/test_megatron_internals.py tests/test_hybrid_model.py || status=$?
done
if [ "${MEGATRON_BRIDGE:-1}" != 0 ]; then
    bridge_python="$(bridge_env)" || exit 1
    echo "== Megatron-Bridge $BRIDGE_VERSION, in its own environment ($(dirname "$(dirname "$bridge_python")"))"
    "$bridge_python" -m pytest -p no:cacheprovider tests/test_bridge_units.py tests/test_bridge.py || status=$?
fi
exit $status
