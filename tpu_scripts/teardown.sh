#!/usr/bin/env bash
# Thin wrapper: `tpu_scripts/teardown.sh [flags]` = `python3 tpu_scripts/tpu.py teardown [flags]`.
# Parameters come from flags or environment variables; --dry-run prints the commands.
# See tpu_scripts/README.md and `tpu_scripts/tpu.py teardown --help`.
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/tpu.py" teardown "$@"
