"""The TOML config file: the lowest layer of settings (flags, then environment, then this file).

    # ~/.config/archup/config.toml
    bucket = "my-archive"            # top-level keys apply to every command that has the option
    endpoint_url = "https://..."
    [upload]                         # a table applies to one command and wins over top-level keys
    parallel = 16

It becomes click's ``default_map``, which click consults after the command line
and the environment variables: exactly the documented precedence.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "archup" / "config.toml"


def load(path: Path | None, group: Any) -> dict[str, dict[str, Any]]:
    """Read the config file (if there is one) into a per-command default_map."""
    explicit = path is not None
    path = path or (Path(os.environ["ARCHUP_CONFIG"]) if os.environ.get("ARCHUP_CONFIG") else default_config_path())
    if not path.exists():
        if explicit:
            raise UsageError(f"config file {path} does not exist")
        return {}
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"config file {path}: {error}") from None

    commands = {name: group.commands[name] for name in group.commands}
    # Duck-typed: typer ships its own copy of click, so isinstance checks against click fail.
    options = {name: {p.name for p in command.params if getattr(p, "param_type_name", "") == "option" and p.name}
               for name, command in commands.items()}
    shared = {key.replace("-", "_"): value for key, value in document.items() if not isinstance(value, dict)}
    known = set().union(*options.values())
    unknown = sorted(set(shared) - known) + sorted(
        f"[{name}]" for name, value in document.items() if isinstance(value, dict) and name not in commands)
    default_map: dict[str, dict[str, Any]] = {}
    for name in commands:
        values = {key: value for key, value in shared.items() if key in options[name]}
        table = document.get(name, {})
        if isinstance(table, dict):
            for key, value in table.items():
                key = key.replace("-", "_")
                if key not in options[name]:
                    unknown.append(f"{name}.{key}")
                values[key] = value
        if values:
            default_map[name] = values
    if unknown:
        raise UsageError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return default_map
