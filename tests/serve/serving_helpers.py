"""What the serving tests share besides fixtures: a real ``deepmetric serve`` process, and images."""
from __future__ import annotations

import io
import os
import re
import selectors
import subprocess
import sys

import numpy as np
from PIL import Image

KEY = "s3cret-key"
AUTH = {"X-API-Key": KEY}


def png(seed: int, size: int = 40) -> bytes:
    """A noise image unlike the gallery's (so its own embedding is its nearest neighbour)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class ServerProcess:
    """``python -m deepmetric serve ... --port 0`` in a subprocess (its stderr in ``log``): ``url`` once
    it printed its address; :meth:`stop` sends a signal and waits."""

    def __init__(self, model, index, *args: str, key: str = KEY, log=None, timeout: float = 90) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "deepmetric", "serve", "--model", str(model), "--index", str(index),
               "--port", "0", "--log-level", "warning", *args]
        env = {**os.environ, "DEEPMETRIC_API_KEY": key}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "ab") if log else subprocess.DEVNULL,
                                     text=True, env=env)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.proc.stdout.readline() if sel.select(timeout) else ""
        sel.close()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not found:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the server did not start: {line!r}; {open(log).read()[-2000:] if log else ''}")
        self.url = f"http://127.0.0.1:{found.group(1)}"

    def stop(self, sig: int, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
