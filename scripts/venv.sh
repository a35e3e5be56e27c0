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
    # setuptools says "Editable installation" (a warning of ten lines) for every editable
    # install whose import package is not its directory's name (threadgate is app/): it is
    # information about that layout, not a problem, and would be the only output here.
    PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
      .venv/bin/python -m pip install --quiet -e ".${extra}"
    touch "$stamp"
  fi
}
