# Shared by the scripts: find_python VERSION prints a python of that minor version
# (pyenv's, then the PATH's), or nothing.
find_python() {
  local want=$1 candidate
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/"$want".*/bin/python; do
      [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
  fi
  for candidate in "python$want" python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$want" ]; then
      command -v "$candidate"; return
    fi
  done
}
