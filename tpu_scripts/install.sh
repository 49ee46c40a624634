#!/usr/bin/env bash
# Thin wrapper: `tpu_scripts/install.sh [flags]` = `python3 tpu_scripts/tpu.py install [flags]`.
# Parameters come from flags or environment variables; --dry-run prints the commands.
# See tpu_scripts/README.md and `tpu_scripts/tpu.py install --help`.
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/tpu.py" install "$@"
