# qinsctl.bash — bash completion for qinsctl (make install puts it in
# PREFIX/share/bash-completion/completions/qinsctl; or `source` it).
#
# Commands and each command's options come from qinsctl itself (`qinsctl help`, `qinsctl help
# CMD`), so they follow its command table. Model names come from `qinsctl ls` and tensor names
# (after MODEL/) from `qinsctl ls MODEL`, on the store the line names (--store) or $QINS_STORE;
# --arch values from `qinsctl synth --list`. Needs no bash-completion helpers.

_qinsctl() {
  local cur=${COMP_WORDS[COMP_CWORD]} prev=""
  [ "$COMP_CWORD" -gt 0 ] && prev=${COMP_WORDS[COMP_CWORD-1]}
  local ctl=${COMP_WORDS[0]} store="" cmd="" i w
  # The shared options may appear anywhere: find --store and the command word.
  for ((i = 1; i < COMP_CWORD; i++)); do
    w=${COMP_WORDS[i]}
    case $w in
      --store | --socket) [ "$w" = --store ] && store=${COMP_WORDS[i+1]}; i=$((i + 1)) ;;
      --store=*) store=${w#--store=} ;;
      -*) ;;
      *) [ -z "$cmd" ] && cmd=$w ;;
    esac
  done
  local sopt=()
  [ -n "$store" ] && sopt=(--store "$store")

  case $prev in
    --store) COMPREPLY=($(compgen -d -- "$cur")); return ;;
    --socket | -o | --cacert) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    --codec) COMPREPLY=($(compgen -W "f32 f16 bf16 qins8 qins16 seed-log seed-rational qinsx" -- "$cur")); return ;;
    --dtype) COMPREPLY=($(compgen -W "f32 f16 bf16" -- "$cur")); return ;;
    --effort) COMPREPLY=($(compgen -W "max" -- "$cur")); return ;;
    --arch) COMPREPLY=($(compgen -W "$("$ctl" synth --list 2>/dev/null | awk '{print $1}')" -- "$cur")); return ;;
    --model | --seed | --slice | --max | --codec-for) return ;;
  esac

  if [ -z "$cmd" ]; then
    if [[ $cur == -* ]]; then
      COMPREPLY=($(compgen -W "--store --socket --json --help --version" -- "$cur"))
    else
      COMPREPLY=($(compgen -W "$("$ctl" help 2>/dev/null | awk '/^  [a-z]/ {print $1}')" -- "$cur"))
    fi
    return
  fi
  if [[ $cur == -* ]]; then
    local opts
    opts=$({ "$ctl" help "$cmd" 2>/dev/null; echo "--store --socket --json --help"; } |
      grep -o -- '--[a-z][a-z-]*' | sort -u)
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    return
  fi
  # The first positional argument after the command word.
  local npos=0
  for ((i = 1; i < COMP_CWORD; i++)); do
    w=${COMP_WORDS[i]}
    case $w in
      --store | --socket | --model | --codec | --codec-for | --seed | --arch | --dtype | --slice | --max | \
        --effort | -o) i=$((i + 1)) ;;
      -*) ;;
      *) npos=$((npos + 1)) ;;
    esac
  done
  case $cmd in
    import) COMPREPLY=($(compgen -f -- "$cur")) ;;
    help) [ "$npos" -eq 1 ] && COMPREPLY=($(compgen -W "$("$ctl" help 2>/dev/null | awk '/^  [a-z]/ {print $1}')" -- "$cur")) ;;
    export) if [ "$npos" -eq 1 ]; then
        COMPREPLY=($(compgen -W "$("$ctl" "${sopt[@]}" ls 2>/dev/null | awk 'NR > 1 {print $1}')" -- "$cur"))
      else
        COMPREPLY=($(compgen -f -- "$cur"))
      fi ;;
    backup) COMPREPLY=($(compgen -d -- "$cur")) ;;
    ls | rm | verify | audit | info | get)
      [ "$npos" -eq 1 ] || return
      if [[ $cur == */* ]] && [[ $cmd == info || $cmd == get ]]; then
        local m=${cur%%/*}
        COMPREPLY=($(compgen -P "$m/" -W "$("$ctl" "${sopt[@]}" ls "$m" 2>/dev/null | awk 'NR > 1 {print $1}')" -- "${cur#*/}"))
      else
        COMPREPLY=($(compgen -W "$("$ctl" "${sopt[@]}" ls 2>/dev/null | awk 'NR > 1 {print $1}')" -- "$cur"))
      fi ;;
  esac
}
complete -F _qinsctl qinsctl
