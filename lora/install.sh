#!/usr/bin/env bash
# The user's plan installs from inside lora/ (cd .../lora && bash install.sh): this is the installer at the
# repository root, run with the same options (--dev, --ui, --extras, --check, --help).
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/install.sh" "$@"
