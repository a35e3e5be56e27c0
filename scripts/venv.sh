# Sourced by scripts/dev and scripts/test: a .venv with the project installed in it.
ensure_venv() {
  local extra="$1"
  local py="${PYTHON:-python3}"
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "threadgate needs Python 3.11 or newer (found: $("$py" --version 2>&1))" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
  fi
  # pip is quick when everything is already installed; the stamp skips it when nothing changed.
  local stamp=".venv/.installed${extra}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing threadgate${extra} and its dependencies into .venv (the first time: a minute or two) ..." >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".${extra}"
    touch "$stamp"
  fi
}
