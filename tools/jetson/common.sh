# shellcheck shell=bash
# Helpers shared by the Jetson scripts (setup, deploy, monitor). Sourced, never run.
#
# Every script takes --dry-run. Each command that would change something goes through
# `run`, which prints it as "+ command" and, in a dry run, stops there: a user can read
# what a script would do to a board before letting it, and the tests check the scripts
# on a machine that is no board at all. Read-only probes (reading a release file,
# `nvcc --version`) still run in a dry run, since the plan depends on what they find.

DRY_RUN=0
SCRIPT_NAME="$(basename "$0")"

die() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

warn() {
  printf '%s: warning: %s\n' "$SCRIPT_NAME" "$*" >&2
}

note() {
  printf '== %s\n' "$*"
}

# The script's own header comment (from line 2 to the first line that is not a
# comment) is its --help, so the two cannot drift apart.
usage() {
  sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "$1"
}

# Check that option $1 got a value ($2); callers pass "$@".
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

# One argument written so that a shell reads it back unchanged: plain words stay as
# they are, anything else goes in single quotes. POSIX quoting, so the text is also
# safe to hand to a remote login shell through ssh.
quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A whole command line, quoted word by word.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Print a command, then run it unless this is a dry run.
run() {
  printf '+ %s\n' "$(quote_cmd "$@")"
  if ((DRY_RUN)); then
    return 0
  fi
  "$@"
}

# Write text ($2) to a file ($1): shown in full in a dry run, since a unit file or
# similar is as much a part of the plan as a command.
write_file() {
  printf '+ write %s:\n' "$(quote "$1")"
  printf '%s\n' "$2" | sed 's/^/    /'
  if ((DRY_RUN)); then
    return 0
  fi
  printf '%s\n' "$2" >"$1"
}

# A system path under $JETSON_ROOT (default /), so that tests can stand up a fake
# board (release file, device tree, CUDA folder) in a temporary folder.
root_path() {
  local root="${JETSON_ROOT:-/}"
  printf '%s%s' "${root%/}" "$1"
}

# True when version $1 >= version $2 (dotted numbers, as sort -V orders them).
version_ge() {
  [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" == "$2" ]]
}
