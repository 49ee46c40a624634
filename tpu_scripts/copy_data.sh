#!/usr/bin/env bash
# Thin wrapper: `tpu_scripts/copy_data.sh [flags]` = `python3 tpu_scripts/tpu.py copy-data [flags]`.
# Parameters come from flags or environment variables; --dry-run prints the commands.
# See tpu_scripts/README.md and `tpu_scripts/tpu.py copy-data --help`.
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/tpu.py" copy-data "$@"
