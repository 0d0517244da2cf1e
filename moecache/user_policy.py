"""A user's policy file named on the command line: ``--policy path/to/my_policy.py:MyPolicy``.

The file is run as a fresh module each time it is loaded; the named class must be a
:class:`moecache.PythonPolicy` subclass. Parameters follow as for registered policies:
``my_policy.py:MyPolicy:alpha=2``. Every failure is one :class:`MoecacheError` line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MoecacheError
from .python_policy import PythonPolicy


def is_policy_file(spec: str) -> bool:
    """Whether a ``--policy`` spec names a Python file rather than a registered policy."""
    return spec.partition(":")[0].strip().endswith(".py")


def load_policy(spec: str) -> tuple[PythonPolicy, str]:
    """(an instance of the class, the parameter text after a second ``:`` or "") of
    ``FILE.py:CLASS[:ARGS]``."""
    path_text, _, rest = (part.strip() for part in spec.partition(":"))
    name, _, args = (part.strip() for part in rest.partition(":"))
    path = Path(path_text)
    if not name:
        raise MoecacheError(f"policy file {path}: name the class, as {path}:ClassName")
    if not path.is_file():
        raise MoecacheError(f"policy file {path} does not exist")
    loader = importlib.util.spec_from_file_location(f"moecache_user_policy_{path.stem}", path)
    if loader is None or loader.loader is None:
        raise MoecacheError(f"policy file {path}: not a Python source file")
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)
    except Exception as err:  # the user's code: any failure is bad input
        raise MoecacheError(f"policy file {path} failed to load: {one_line(err)}") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise MoecacheError(f"policy file {path} defines no {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, PythonPolicy)):
        raise MoecacheError(f"policy file {path}: {name} is not a moecache.PythonPolicy subclass")
    try:
        return cls(), args
    except Exception as err:
        raise MoecacheError(f"policy file {path}: {name}() failed: {one_line(err)}") from None


def one_line(err: Exception) -> str:
    """``Type: first line of the message``."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
