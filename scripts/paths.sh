# bccp's per-user folders for the scripts, the same rules as src/paths.rs (source this file):
#   bccp_home          BCCP_HOME; else ${XDG_DATA_HOME:-~/.local/share}/bccp
#                      (macOS: ~/Library/Application Support/bccp)
#   bccp_assets_dir    BCCP_ASSETS; else "$(bccp_home)/assets"
# Empty variables count as unset; a relative XDG_DATA_HOME is ignored. Without HOME: ./.bccp.
# Each prints the folder (it need not exist).

bccp_home() {
  if [ -n "${BCCP_HOME:-}" ]; then
    printf '%s\n' "$BCCP_HOME"
  elif [ "$(uname -s)" = Darwin ] && [ -n "${HOME:-}" ]; then
    printf '%s\n' "$HOME/Library/Application Support/bccp"
  elif [ -n "${XDG_DATA_HOME:-}" ] && [ "${XDG_DATA_HOME#/}" != "$XDG_DATA_HOME" ]; then
    printf '%s\n' "$XDG_DATA_HOME/bccp"
  elif [ -n "${HOME:-}" ]; then
    printf '%s\n' "$HOME/.local/share/bccp"
  else
    printf '%s\n' ".bccp"
  fi
}

bccp_assets_dir() {
  if [ -n "${BCCP_ASSETS:-}" ]; then
    printf '%s\n' "$BCCP_ASSETS"
  else
    printf '%s/assets\n' "$(bccp_home)"
  fi
}
