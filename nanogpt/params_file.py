"""Reading params.yaml: a YAML mapping, with every way the file itself can be wrong named in one line."""

from pathlib import Path
from typing import Any

import yaml

from nanogpt.errors import UserError


class _DuplicateKey(yaml.YAMLError):
    """A mapping of params.yaml names one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML forbids it, and DVC
    rejects the file) rather than the last value silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges keys: not a duplicate
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise _DuplicateKey(f"key {key!r} appears twice, on lines {first} and {line}")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_params(path: Path) -> dict[str, Any]:
    """The mapping of sections in the YAML file at `path`, not yet validated; a UserError if the file is missing,
    not UTF-8, not YAML, names a key twice, or holds something other than a mapping."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root or pass --params") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory: pass the params file, e.g. --params params.yaml") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): give a YAML params file") from None
    except _DuplicateKey as exc:
        raise UserError(f"{path}: {exc}: keep one (DVC rejects the file too)") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of sections (data, encode, model, train, sample)")
    return raw
