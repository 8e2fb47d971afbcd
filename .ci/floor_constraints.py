"""Print a pip/uv constraints file that pins every direct dependency in pyproject.toml to its floor.

`make test-lowest` installs with these pins, so each declared ``>=`` floor is proved installable together with
the others and the tests run on exactly those versions (uv's ``--resolution lowest-direct`` alone may lift a
floor to dodge a conflict, which would leave a floor that no longer tells the truth). Dependencies named with
``--installed`` are pinned to the version already in this environment instead (torch: the CPU wheel installed
first, so the resolver never pulls a CUDA build). Every direct dependency must declare a ``>=`` floor.

    python .ci/floor_constraints.py --installed torch > constraints.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

# name [extras] >= floor, up to the next comma / semicolon / space (PEP 508 as pyproject.toml writes it here)
_FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*[^;]*?>=\s*([^,;\s]+)")


def floors(pyproject: Path) -> dict[str, str]:
    """``{name: floor}`` for the project's dependencies and every optional-dependency group."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        requirements += group
    out: dict[str, str] = {}
    for req in requirements:
        match = _FLOOR.match(req)
        if match is None:
            raise ValueError(f"{pyproject}: dependency {req!r} has no '>=' floor; every direct dependency needs one")
        name, floor = match.group(1).lower(), match.group(2)
        if out.get(name, floor) != floor:
            raise ValueError(f"{pyproject}: {name} has two floors ({out[name]} and {floor}); keep them equal")
        out[name] = floor
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--installed", nargs="*", default=[], help="pin these to the installed version instead")
    args = parser.parse_args(argv)
    pins = floors(args.pyproject)
    for name in args.installed:
        # "2.13.0+cpu" -> "2.13.0": a local version label is not on the index; the installed wheel satisfies it
        pins[name.lower()] = version(name).split("+")[0]
    sys.stdout.write("".join(f"{name}=={v}\n" for name, v in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
