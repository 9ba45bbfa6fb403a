"""Where simvirt keeps its sockets, and how it protects them.

Every vhost-user socket is a door into a process that maps a guest's RAM,
and every control socket can resize a guest; neither may be reachable by
other users.  So listening sockets are made owner-only right after bind()
(a socket's mode, not the umask, decides who may connect), and sockets
simvirt names itself live in a private runtime directory:
``$SIMVIRT_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/simvirt``, else
``<tmp>/simvirt-<uid>`` — created 0700 and refused if another user owns it
or others can enter it (a world-writable /tmp invites squatting).
Guest-RAM segments are POSIX shm objects created 0600 (Python's default)
and machine work directories come from ``mkdtemp`` (0700).
"""
from __future__ import annotations

import os
import socket
import stat
import tempfile

OWNER_ONLY = 0o600


class RuntimeDirError(RuntimeError):
    pass


def runtime_dir() -> str:
    """The private directory for simvirt's own sockets (created if missing)."""
    path = os.environ.get("SIMVIRT_RUNTIME_DIR")
    if not path:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        path = os.path.join(xdg, "simvirt") if xdg else os.path.join(tempfile.gettempdir(), f"simvirt-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def check_private_dir(path: str) -> None:
    """Refuse a directory that is not ours alone (or is a symlink planted for us)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is not a directory")
    if st.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime directory {path} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
    if st.st_mode & 0o077:
        raise RuntimeDirError(f"runtime directory {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                              "others must not be able to enter it (chmod 700)")


def bind_unix(path: str, *, backlog: int = 1) -> socket.socket:
    """A listening unix socket at ``path`` that only our user can connect to."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, OWNER_ONLY)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s
