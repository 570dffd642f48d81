"""Where fakeroot would record something other than what the kernel does in a user namespace.

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
import stat
from pathlib import Path

from nsbuild.sandbox import tree

# First in PATH, then the real tool: a chown to the file's own current (faked) ids records them.
RECORD_SHIM = r"""#!/bin/sh
for a in "$@"; do
  if [ -f "$a" ] || [ -d "$a" ]; then chown --reference="$a" -- "$a" 2>/dev/null; fi
done
PATH=${PATH#*:} exec @TOOL@ "$@"
"""
TOOLS = ("setfattr", "setcap")


class Unrecordable(Exception):
    """The backend cannot tell what the script did to a file (see the module's text)."""


def install(shim_dir: Path) -> str:
    """Write the shims into shim_dir (created); returns it for the front of PATH."""
    shim_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        p = shim_dir / tool
        p.write_text(RECORD_SHIM.replace("@TOOL@", tool))
        p.chmod(0o755)
    return str(shim_dir)


def refuse_ambiguous_caller_ids(root: Path, uid: int, gid: int) -> None:
    """Under plain fakeroot: an entry showing exactly the caller's uid and gid together with extended
    attributes may be fakeroot's record of its real owner, or the script's chown: refuse (Unrecordable).
    Any other entry showing the caller's ids was chowned there by the script and keeps them, as in a
    user namespace."""
    for rel in ["", *tree.paths_of(root)]:
        p = root / rel if rel else root
        st = os.lstat(p)
        if st.st_uid != uid or st.st_gid != gid or stat.S_ISLNK(st.st_mode):
            continue
        if tree._xattrs(p):
            raise Unrecordable(
                f"/{rel}: the fakeroot backend cannot tell whether the script gave it owner {uid}:{gid} "
                "(the caller's own ids) or set extended attributes on a new file with a program fakeroot "
                "records wrongly; use a user namespace backend (--isolation userns-fakeroot or userns)"
            )
