"""Run ``deepmetric`` command lines each in a fresh process without paying PyTorch's start-up each time.

A helper process imports the slow third-party libraries once (PyTorch, torchvision, scikit-learn: about
5 s of every ``deepmetric`` start on 2 cores) and nothing of deepmetric; each command line is then run
in a process forked from it, as the ``deepmetric`` console script runs it: ``sys.argv`` and
``sys.path[0]`` as the script sets them, ``sys.exit(main())``, its own working directory, environment,
standard input (empty), output and error streams, and exit code; at exit, threads are joined, ``atexit``
functions run and the streams flushed, as when the interpreter exits. What a command imports of
deepmetric, and every state it builds, is its own.

Used by tests/test_docs.py for the documentation's commands (one helper per page).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PRELOAD = ("torch", "torchvision", "sklearn.metrics")

_SERVER = r'''
import json, os, sys, traceback
script = sys.argv[1]
sys.path[0] = os.path.dirname(script)  # as the console script's (not the current folder, as for -c)
for name in sys.argv[2:]:
    __import__(name)
del name


def command(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(os.devnull)
    sys.argv = [script, *req["args"]]
    import numpy.random
    numpy.random.seed()  # a new process's unseeded global state, not this helper's
    try:
        from deepmetric.cli import main
        code = main()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit, threading
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code & 0xFF


for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = command(req)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class ForkedCLI:
    """``with ForkedCLI(env, cwd) as cli: code, out, err = cli.run(["train", ...], cwd, timeout)``."""

    def __init__(self, env: Dict[str, str], cwd: Path, preload=PRELOAD) -> None:
        script = shutil.which("deepmetric", path=env.get("PATH"))
        if script is None:
            raise FileNotFoundError("the deepmetric console script is not on PATH")
        self.env = dict(env)
        self.tmp = Path(tempfile.mkdtemp(prefix="forked_cli_"))
        self._log = open(self.tmp / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, script, *preload], cwd=cwd, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._n = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            raise RuntimeError(f"the forking helper stopped: {(self.tmp / 'server.log').read_text()[-3000:]}")
        return json.loads(line)

    def run(self, args: List[str], cwd: Path, timeout: float = 600) -> Tuple[int, str, str]:
        """``deepmetric ARGS`` in ``cwd``: (exit code, standard output, standard error)."""
        self._n += 1
        out, err = self.tmp / f"{self._n}.out", self.tmp / f"{self._n}.err"
        req = {"args": list(args), "cwd": str(cwd), "env": self.env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        pid = self._next(300)["pid"]  # the first waits for the helper's imports
        try:
            code = self._next(timeout)["code"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._next(60)
            raise TimeoutError(f"deepmetric {' '.join(args)}: still running after {timeout} s") from None
        return code, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ForkedCLI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
