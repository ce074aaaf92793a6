"""argparse flags built from the config dataclasses: field name -> --flag, field docstring -> help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            docs[prev.target.id] = " ".join(str(node.value.value).split())
    return docs


def _scalar(tp: object) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp  # type: ignore[return-value]


def _metavar(name: str, tp: type) -> str:
    if tp is int:
        return "N"
    if tp is float:
        return "X"
    words = [w for w in name.upper().split("_") if w != "DRAFT"]
    return words[-1] if words else "NAME"


_EXPLICIT = "_explicit_options"
"""Namespace attribute holding the dests of the options given on the command line."""


def _mark(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, _EXPLICIT, getattr(namespace, _EXPLICIT, frozenset()) | {dest})


class _Store(argparse.Action):
    """store, remembering that the option was given (see explicit())."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class _StoreTuple(argparse.Action):
    """store a list of values as a tuple, remembering that the option was given."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, tuple(values))
        _mark(namespace, self.dest)


class _Bool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        super().__call__(parser, namespace, values, option_string)
        _mark(namespace, self.dest)


def explicit(ns: argparse.Namespace) -> frozenset[str]:
    """The dataclass fields whose flags were given on the command line (not left at their defaults):
    per-model defaults apply to the others."""
    return getattr(ns, _EXPLICIT, frozenset())


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                defaults: dict[str, object] | None = None) -> None:
    """Add one flag per dataclass field, in a group named after the class; `defaults`: this command's own defaults
    for some fields, instead of the dataclass's."""
    group = parser.add_argument_group(cls.__doc__.strip().rstrip(".") if cls.__doc__ else cls.__name__)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _scalar(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        help_ = docs.get(f.name, "") + (f" (default: {default})" if default not in (None, "", ()) else "")
        help_ = help_.replace("%", "%%")  # argparse %-formats help strings
        if typing.get_origin(hints[f.name]) is tuple:  # tuple[str, ...]: one or more values
            group.add_argument(flag, action=_StoreTuple, nargs="+", type=tp, default=default, help=help_,
                               metavar=f.metadata.get("metavar", _metavar(f.name, tp)))
        elif tp is bool:
            group.add_argument(flag, action=_Bool, default=default, help=help_)
        else:
            group.add_argument(flag, action=_Store, type=tp, default=default, help=help_,
                               metavar=_metavar(f.name, tp))


def build(cls: type, ns: argparse.Namespace):
    """The dataclass instance from parsed arguments."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})
