#!/usr/bin/env bash
# Re-render the plain manifests in k8s/ from the Helm chart (tools/render_k8s.py says what goes where).
# Needs helm: `make system-deps` installs it into .tools/ (or set HELM=/path/to/helm).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" tools/render_k8s.py "$@"
