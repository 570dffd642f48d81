"""Where fakeroot would record something other than what the kernel does in a user namespace.

Both fakeroot backends: a chown or chgrp command clears setuid/setgid bits and file capabilities as
the kernel does (CHOWN_SHIM). A program calling chown(2) itself after setting those bits is not seen.

The backends must agree byte for byte (the userns backend is the reference): a backend that cannot
record an operation fails the build instead of writing another owner (issue 11).

Plain fakeroot (no namespace) sees the caller's real ids on disk. A file nobody chowned shows as root,
but setting an extended attribute first (setfattr, setcap) makes fakeroot record the file's *real*
owner, the caller. A script may also chown a file to the caller's uid on purpose. The two look the
same afterwards; the shims below remove the first case for the setfattr and setcap commands (they
give each operand a record of its current owner first), and what remains ambiguous (a program calling
setxattr(2) itself on a new file) fails the build.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

from nsbuild.sandbox import tree

# First in PATH, then the real tool: a chown to the file's own current (faked) ids records them.
# (The real chown, not the chown shim: giving a record must not clear setuid bits.)
RECORD_SHIM = r"""#!/bin/sh
set -f; p=; IFS=:
for d in $PATH; do [ "$d" = @DIR@ ] || p="${p:+$p:}$d"; done
unset IFS; set +f
for a in "$@"; do
  if [ -f "$a" ] || [ -d "$a" ]; then PATH=$p chown --reference="$a" -- "$a" 2>/dev/null; fi
done
PATH=$p exec @TOOL@ "$@"
"""
TOOLS = ("setfattr", "setcap")

# The kernel clears setuid (and setgid with group exec) and file capabilities of a regular file that is
# chowned, whoever does it; fakeroot only records the new ids. This runs the real chown/chgrp, then does
# to each file it changed what the kernel would have done.
CHOWN_SHIM = r"""#!@PYTHON@ -IS
import os, shutil, stat, subprocess, sys
tool = os.path.basename(sys.argv[0])
args = sys.argv[1:]
rest = ":".join(d for d in os.environ.get("PATH", "").split(":") if d != @DIR@)
real = shutil.which(tool, path=rest)
if real is None:
    sys.exit(f"{tool}: not found")
code = subprocess.call([real, *args], env=dict(os.environ, PATH=rest))
opts, operands, ended = [], [], False
for a in args:
    if not ended and a == "--":
        ended = True
    elif not ended and a.startswith("-") and a != "-" and not operands:
        opts.append(a)
    else:
        operands.append(a)
short = "".join(o[1:] for o in opts if not o.startswith("--"))
recursive = "R" in short or "--recursive" in opts
nofollow = "h" in short or "--no-dereference" in opts
if code != 0 or any(o.startswith("--from") for o in opts):
    sys.exit(code)
files = operands if any(o.startswith("--reference") for o in opts) else operands[1:]

chowned = []

def kill_privileges(path, follow):
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return
    chowned.append(f"{st.st_dev} {st.st_ino}\n")
    if not stat.S_ISREG(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    new = mode & ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        new &= ~stat.S_ISGID
    if new != mode:
        os.chmod(path, new)
    try:
        os.removexattr(path, "security.capability")
    except OSError:
        pass

for f in files:
    if recursive and os.path.isdir(f) and not os.path.islink(f):
        kill_privileges(f, False)
        for d, dirs, names in os.walk(f):
            for n in dirs + names:
                kill_privileges(os.path.join(d, n), False)
    else:
        kill_privileges(f, not nofollow)
with open(@REGISTRY@, "a") as reg:
    reg.writelines(chowned)
"""


class Unrecordable(Exception):
    """The backend cannot tell what the script did to a file (see the module's text)."""


def install(shim_dir: Path) -> str:
    """Write the shims into shim_dir (created); returns it for the front of PATH. The chown shim
    notes the inode of every file it changed in shim_dir/chowned (see refuse_ambiguous_caller_ids)."""
    shim_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        p = shim_dir / tool
        p.write_text(RECORD_SHIM.replace("@TOOL@", tool).replace("@DIR@", shlex.quote(str(shim_dir))))
        p.chmod(0o755)
    for tool in ("chown", "chgrp"):
        p = shim_dir / tool
        p.write_text(
            CHOWN_SHIM.replace("@PYTHON@", sys.executable)
            .replace("@REGISTRY@", repr(str(shim_dir / "chowned")))
            .replace("@DIR@", repr(str(shim_dir)))
        )
        p.chmod(0o755)
    return str(shim_dir)


def chowned_inodes(shim_dir: Path) -> set[tuple[int, int]]:
    try:
        lines = (shim_dir / "chowned").read_text().split()
    except FileNotFoundError:
        return set()
    return {(int(a), int(b)) for a, b in zip(lines[::2], lines[1::2], strict=False)}


def refuse_ambiguous_caller_ids(root: Path, uid: int, gid: int, shim_dir: Path) -> None:
    """Under plain fakeroot: an entry showing exactly the caller's uid and gid together with extended
    attributes may be fakeroot's record of its real owner or the script's chown. The chown shim's notes
    settle it (a file chowned through it had a record before any attribute was set); otherwise the build
    fails (Unrecordable). Other entries showing the caller's ids were chowned there by the script and keep
    them, as in a user namespace."""
    chowned = chowned_inodes(shim_dir)
    for rel in ["", *sorted(tree.paths_of(root))]:
        p = root / rel if rel else root
        st = os.lstat(p)
        if st.st_uid != uid or st.st_gid != gid or stat.S_ISLNK(st.st_mode):
            continue
        if tree._xattrs(p) and (st.st_dev, st.st_ino) not in chowned:
            raise Unrecordable(
                f"/{rel}: the fakeroot backend cannot tell whether the script gave it owner {uid}:{gid} "
                "(the caller's own ids) or set extended attributes on a new file with a program fakeroot "
                "records wrongly; use a user namespace backend (--isolation userns-fakeroot or userns)"
            )
