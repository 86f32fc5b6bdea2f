"""A persistent worker subprocess that runs measurement functions, one request at a time.

``python -m edgec.targets.ort_worker`` is started once and fed JSON lines; a model
that crashes or hangs the runtime kills only the worker, which is restarted for the
next request. Unlike multiprocessing's spawn, it never re-imports the caller's
``__main__``, so it works the same from the CLI, pytest and user scripts.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import sys
import time


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit


class WorkerCrashed(RuntimeError):
    """The worker process died while handling a request."""


class WorkerTimeout(RuntimeError):
    """The worker did not answer in time (it was killed)."""


class WorkerFailed(RuntimeError):
    """The function raised inside the worker; the message is its one-line error."""


class Worker:
    def __init__(self, module: str) -> None:
        self.module = module
        self._proc: subprocess.Popen | None = None

    def call(self, fn: str, timeout_s: float, **kwargs) -> dict:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        proc = self._proc
        try:
            proc.stdin.write(json.dumps({"fn": fn, "kwargs": kwargs}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            raise WorkerCrashed("worker died before the request") from None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise WorkerTimeout(f"no answer within {timeout_s:.0f} s")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                break
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            self._proc = None
            raise WorkerCrashed(f"worker exited with code {code}")
        reply = json.loads(line)
        if reply.get("errno") in DISK_FULL_ERRNOS:  # the machine's problem, not the model's: raised as the
            raise OSError(reply["errno"], os.strerror(reply["errno"]), reply.get("filename"))  # OSError it is
        if "error" in reply:
            raise WorkerFailed(reply["error"])
        return reply["ok"]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def call_for_target(worker: Worker, target: str, model_name: str, fn: str, timeout_s: float, **kwargs) -> dict:
    """``worker.call`` with its failures turned into one-line :class:`TargetError` s naming the model."""
    from edgec.errors import TargetError

    try:
        return worker.call(fn, timeout_s, **kwargs)
    except WorkerCrashed as e:
        raise TargetError(f"{model_name} crashed the runtime of {target}", str(e),
                          "the model is valid ONNX but the runtime dies on it; try another opset or report it "
                          "to the runtime's maintainers") from None
    except WorkerTimeout as e:
        raise TargetError(f"{model_name} timed out on {target}", str(e),
                          "check the model's size and input shape") from None
    except WorkerFailed as e:
        raise TargetError(f"{model_name} failed on {target}", str(e),
                          f"check that its inputs, ops and opset are ones {target} supports") from None
