"""The TOML config file: the lowest layer of settings (flags, then environment, then this file).

    # ~/.config/archup/config.toml
    bucket = "my-archive"            # top-level keys apply to every command that has the option
    endpoint_url = "https://..."
    [upload]                         # a table applies to one command and wins over top-level keys
    parallel = 16

It becomes click's ``default_map``, which click consults after the command line
and the options' ``envvar``. Two settings are read from the environment by archup
itself, after click (the endpoint URL and the journal): their file values are left
out while their environment variable is set, or the file would beat it.

A key is the option's parameter name or its long flag (``journal_path`` or ``journal``).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Options whose environment variables archup reads itself, after click has applied the
# default_map (resolve_endpoint, default_journal_path), not through click's envvar=.
READ_FROM_ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "endpoint_url": ("ARCHUP_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "journal_path": ("ARCHUP_JOURNAL",),
}


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
        document = tomllib.loads(_read(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"config file {path}: {getattr(error, 'strerror', None) or error}") from None

    commands = {name: group.commands[name] for name in group.commands}
    # Duck-typed: typer ships its own copy of click, so isinstance checks against click fail.
    options = {name: _option_keys(command) for name, command in commands.items()}
    params = {name: {param.name: param for param in command.params} for name, command in commands.items()}
    shared = {key.replace("-", "_"): value for key, value in document.items() if not isinstance(value, dict)}
    known = set().union(*options.values())
    unknown = sorted(set(shared) - known) + sorted(
        f"[{name}]" for name, value in document.items() if isinstance(value, dict) and name not in commands)
    default_map: dict[str, dict[str, Any]] = {}
    for name in commands:
        values = {options[name][key]: value for key, value in shared.items() if key in options[name]}
        table = document.get(name, {})
        if isinstance(table, dict):
            for key, value in table.items():
                key = key.replace("-", "_")
                if key not in options[name]:
                    unknown.append(f"{name}.{key}")
                    continue
                values[options[name][key]] = value
        for key, value in values.items():
            _check_type(path, name, params[name][key], value)
        values = {key: value for key, value in values.items()
                  if not any(os.environ.get(variable) for variable in READ_FROM_ENVIRONMENT.get(key, ()))}
        if values:
            default_map[name] = values
    if unknown:
        raise UsageError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return default_map


# A config file is a few lines: a bigger one is not one (--config /dev/zero would fill memory).
MAX_CONFIG_BYTES = 1 << 20


def _read(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_CONFIG_BYTES. Opened without
    blocking: a FIFO given as the config would otherwise wait for a writer for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"config file {path} is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise UsageError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes: not a config file")
        return b"".join(chunks)
    finally:
        os.close(fd)


# click's name of an option's type -> the TOML types a value of it may have.
_TOML_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "text": (str,), "path": (str,), "choice": (str,),
    "int": (int,), "integer": (int,), "float": (int, float), "boolean": (bool,),
}


def _check_type(path: Path, command: str, param: Any, value: Any) -> None:
    """A value of the option's type: 'journal = true' must not become a journal named ./True."""
    accepted = _TOML_TYPES.get(getattr(param.type, "name", ""))
    if accepted is None:
        return
    values = value if getattr(param, "multiple", False) and isinstance(value, list) else [value]
    for item in values:
        if not isinstance(item, accepted) or (isinstance(item, bool) and bool not in accepted):
            wanted = "a string" if str in accepted else "a number" if int in accepted else "true or false"
            key = next((flag[2:] for flag in param.opts if flag.startswith("--")), param.name)
            raise UsageError(f"config file {path}: {key} = {json.dumps(value, default=str)} "
                             f"(for archup {command}): expected {wanted}")


def _option_keys(command: Any) -> dict[str, str]:
    """Each key the file may use for one of this command's options -> the option's parameter name."""
    keys: dict[str, str] = {}
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option" or not param.name:
            continue
        keys[param.name] = param.name
        for flag in param.opts:  # not secondary_opts: "no_prehash = true" must not mean prehash
            if flag.startswith("--"):
                keys.setdefault(flag[2:].replace("-", "_"), param.name)
    return keys
