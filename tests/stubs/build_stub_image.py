"""Builds the CARLA stand-in image locally, with no registry: `docker import` of a tar holding a
static busybox and two shell scripts.

The image answers the manager's exact command line — ``/bin/bash ./CarlaUE4.sh -RenderOffScreen
-nosound -carla-rpc-port=N ...`` in ``/home/carla`` — like ``carlasim/carla`` does:

- ``CarlaUE4.sh`` prints CARLA-like log lines, sleeps ``-stub-delay=S`` seconds (as CARLA loads its
  map), then runs ``busybox nc -ll -p N -e rpc-responder.sh``: a persistent TCP server that starts the
  responder for each connection;
- ``rpc-responder.sh`` reads each msgpack-rpc request of the real client (``[0, msgid, "version",
  [[False]]]``, 14 bytes while msgid < 128) with ``dd`` and answers ``[1, msgid, nil, [[1, "<version>"]]]``
  with ``printf`` — the bytes `carla_stub_server.version_reply` gives.

``-stub-mode=`` picks a misbehaviour for the tests: ``serve`` (default), ``never`` (the port never
opens), ``silent`` (the port opens, no answer ever comes), ``crash`` (exits 139 after the delay).
Arguments a real CARLA server would ignore keep the stand-in on the manager's normal path
(`CarlaServerConfig.extra_args`).

busybox comes from the host: Debian's ``busybox-static`` package (``/bin/busybox``), installed by
``scripts/docker-engine.sh``; ``DRIVEVLA_BUSYBOX`` points elsewhere. This module installs nothing.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Any

STUB_REPOSITORY = "drivevla-test/carla-stub"
STUB_LABEL = "drivevla.test"  # on the image only; containers get the manager's labels

LAUNCHER = r"""#!/bin/sh
# Stand-in for CARLA's launcher (tests only): opens the rpc port after a delay and answers `version`.
port=2000 delay=0 mode=serve STUB_VERSION=@VERSION@
for arg in "$@"; do
  case "$arg" in
    -carla-rpc-port=*) port=${arg#*=} ;;
    -stub-delay=*) delay=${arg#*=} ;;
    -stub-mode=*) mode=${arg#*=} ;;
    -stub-version=*) STUB_VERSION=${arg#*=} ;;
  esac
done
export STUB_VERSION
echo "CarlaUE4 stand-in $STUB_VERSION, pid $$, arguments: $*"
echo "LogCarla: Display: Loading the map (stand-in: ${delay} s, mode $mode)"
sleep "$delay"
case "$mode" in
  crash) echo "Signal 11 caught. (stand-in crash)"; exit 139 ;;
  never) echo "LogCarla: still loading..."; exec sleep 1000000 ;;
  silent) echo "LogCarla: rpc port $port open, not answering"; exec nc -ll -p "$port" -e /home/carla/rpc-silent.sh ;;
esac
echo "LogCarla: Display: Listening on rpc port $port"
exec nc -ll -p "$port" -e /home/carla/rpc-responder.sh
"""

RESPONDER = r"""#!/bin/sh
# One connection of the stand-in's rpc port: answer every `version` request until the client hangs up.
# Request [0, msgid, "version", [[False]]]: bytes 1-3 are 0x94 0x00 msgid, 11 more follow.
v=${STUB_VERSION:-0.9.16}
while :; do
  set -- $(dd bs=1 count=3 2>/dev/null | od -An -tu1)
  [ "$#" -eq 3 ] || exit 0
  dd bs=1 count=11 of=/dev/null 2>/dev/null
  # Response [1, msgid, nil, [[1, v]]]: 0x94 0x01 msgid 0xc0 0x91 0x92 0x01 (0xa0+len) v
  printf "\\224\\001\\$(printf %03o "$3")\\300\\221\\222\\001\\$(printf %03o $((160 + ${#v})))%s" "$v"
done
"""

SILENT = """#!/bin/sh
# The stand-in's `silent` mode: hold the connection, never answer.
exec sleep 1000000
"""

BASH = """#!/bin/sh
# The manager runs `/bin/bash ./CarlaUE4.sh`; busybox has no bash applet, its sh does the job.
exec /bin/sh "$@"
"""


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP), i.e. statically linked."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    endian = "<" if data[5] == 1 else ">"
    phoff, = struct.unpack_from(endian + "Q", data, 0x20)
    phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    return all(struct.unpack_from(endian + "I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def find_busybox() -> Path | None:
    """A static busybox on this machine, or None."""
    candidates = [os.environ.get("DRIVEVLA_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
            return Path(candidate)
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o755,
         link: str | None = None, directory: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.mode = mode
    if directory:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = link
        tar.addfile(info)
    else:
        assert data is not None
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def stub_rootfs(busybox: Path, version: str) -> bytes:
    """The image's root filesystem as a tar: busybox, its applet links, the launcher and responder."""
    applets = subprocess.run([str(busybox), "--list"], check=True, capture_output=True, text=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for directory in ("bin", "tmp", "home", "home/carla"):
            _add(tar, directory, directory=True, mode=0o1777 if directory == "tmp" else 0o755)
        _add(tar, "bin/busybox", busybox.read_bytes())
        for applet in applets:
            if applet not in ("busybox", "bash") and "/" not in applet:
                _add(tar, f"bin/{applet}", link="busybox")
        _add(tar, "bin/bash", BASH.encode())
        _add(tar, "home/carla/CarlaUE4.sh", LAUNCHER.replace("@VERSION@", version).encode())
        _add(tar, "home/carla/rpc-responder.sh", RESPONDER.encode())
        _add(tar, "home/carla/rpc-silent.sh", SILENT.encode())
    return buf.getvalue()


def build_stub_image(client: Any, version: str = "0.9.16", busybox: Path | None = None) -> str:
    """Import the stand-in as ``drivevla-test/carla-stub:<version>`` unless an identical one exists;
    return its reference. Raises FileNotFoundError without a static busybox."""
    busybox = busybox or find_busybox()
    if busybox is None:
        raise FileNotFoundError("no static busybox found: `apt-get install busybox-static` "
                                "(scripts/docker-engine.sh does) or set DRIVEVLA_BUSYBOX")
    rootfs = stub_rootfs(busybox, version)
    digest = hashlib.sha256(rootfs).hexdigest()[:16]
    ref = f"{STUB_REPOSITORY}:{version}"
    try:
        if client.images.get(ref).labels.get(STUB_LABEL) == digest:
            return ref
    except Exception:
        pass
    client.api.import_image_from_data(
        rootfs, repository=STUB_REPOSITORY, tag=version,
        changes=["WORKDIR /home/carla", "ENV PATH=/bin", f"LABEL {STUB_LABEL}={digest}",
                 'CMD ["/bin/bash", "./CarlaUE4.sh"]'])
    return ref


if __name__ == "__main__":
    import docker

    print(build_stub_image(docker.from_env()))
