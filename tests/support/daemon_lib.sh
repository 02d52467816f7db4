# SPDX-License-Identifier: MIT
# daemon_lib.sh — sourced by tests/support/demo.sh and tests/install/install_check.sh: wait for a
# qinsd started in the background, and stop it.

# wait_daemon QINSCTL SOCKET PID LOG: returns 0 once qinsd answers ping (polled every 10 ms, 10 s
# at most); 1, with its log on stderr, if it exits or does not answer in time.
wait_daemon() {
  _i=0
  until "$1" --socket "$2" ping > /dev/null 2>&1; do
    _i=$((_i + 1))
    if ! kill -0 "$3" 2> /dev/null || [ $_i -ge 1000 ]; then
      echo "qinsd did not start:" >&2
      cat "$4" >&2
      return 1
    fi
    sleep 0.01
  done
}

# stop_daemon PID: SIGTERM, up to 10 s to exit, then SIGKILL (nothing if PID is empty or gone).
stop_daemon() {
  if [ -n "$1" ] && kill -0 "$1" 2> /dev/null; then
    kill -TERM "$1" 2> /dev/null || true
    _i=0
    while kill -0 "$1" 2> /dev/null && [ $_i -lt 100 ]; do sleep 0.1; _i=$((_i + 1)); done
    kill -KILL "$1" 2> /dev/null || true
  fi
}
