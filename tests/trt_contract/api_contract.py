"""Holding the fakes to the REAL TensorRT binding's API.

Every fake GPU-side object (fake_gpu.py) names the real binding class it stands in for
(`_real_ = trt.Builder`, ...). `Faked` then makes each public attribute access behave as the
real class would:

- a name the real class lacks raises AttributeError, as the real binding does (polygraphy
  probes features with try/except AttributeError, so its fallbacks run as they would on a GPU)
  and the access is recorded;
- a method call is checked against the real method's signature, read from the binding's
  pybind11 docstring (every overload): too many positional arguments, unknown keywords,
  missing required arguments or an argument of the wrong enum type raise TypeError, as
  pybind11 would, and are recorded;
- assigning a read-only property raises AttributeError; assigning a name the real class lacks
  is recorded (pybind11 objects take no new attributes).

A public name the real class has but the fake does not implement raises NotFaked: a gap of
the suite, reported as such, never silently passing.
"""
from __future__ import annotations

import inspect
import re

VIOLATIONS: list[str] = []  # every contract breach seen in this process


class NotFaked(AttributeError):
    """The real class has this attribute but the suite's fake does not implement it."""


def _split_params(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def pybind_signatures(method, name: str) -> list[list[tuple[str, str, bool]]]:
    """[(param, annotation, has_default), ...] per overload, `self` dropped; [] when unknown."""
    doc = getattr(method, "__doc__", None) or ""
    sigs = []
    for match in re.finditer(rf"(?:^|\n)\s*(?:\d+\.\s*)?{re.escape(name)}\((.*?)\)\s*->", doc):
        params = []
        for part in _split_params(match.group(1)):
            if part in ("*args", "**kwargs"):
                params = None
                break
            head, _, default = part.partition("=")
            pname, _, annotation = head.partition(":")
            params.append((pname.strip(), annotation.strip(), bool(default.strip())))
        if params is None:
            continue
        if params and params[0][0] == "self":
            params = params[1:]
        sigs.append(params)
    return sigs


def _enum_class(annotation: str, module):
    last = annotation.rsplit(".", 1)[-1]
    cls = getattr(module, last, None)
    return cls if isinstance(cls, type) and hasattr(cls, "__members__") else None


def _binds(params, args, kwargs, module) -> str | None:
    """Why (args, kwargs) do not fit this overload; None when they do."""
    if len(args) > len(params):
        return f"{len(args)} positional arguments, at most {len(params)} accepted"
    names = [p[0] for p in params]
    for k in kwargs:
        if k not in names:
            return f"no parameter named {k!r} (parameters: {', '.join(names)})"
    given = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in given:
            return f"{k!r} given twice"
        given[k] = v
    for pname, annotation, has_default in params:
        if pname not in given:
            if not has_default:
                return f"missing {pname!r}"
            continue
        enum = _enum_class(annotation, module)
        if enum is not None and not isinstance(given[pname], enum):
            return f"{pname!r} must be {enum.__name__}, got {type(given[pname]).__name__}"
        value = given[pname]
        if annotation in ("int", "typing.SupportsInt") and not (isinstance(value, int) or hasattr(value, "__index__")):
            return f"{pname!r} must be an int, got {type(value).__name__}"
        if annotation == "str" and not isinstance(value, str):
            return f"{pname!r} must be a str, got {type(value).__name__}"
    return None


def check_call(real_cls, name: str, args, kwargs, module) -> None:
    method = getattr(real_cls, name)
    sigs = pybind_signatures(method, name)
    if not sigs:
        return  # not a pybind11 method with a readable signature (e.g. added in Python)
    reasons = [_binds(params, args, kwargs, module) for params in sigs]
    if all(r is not None for r in reasons):
        msg = f"{real_cls.__name__}.{name}: incompatible arguments ({'; '.join(reasons)})"
        VIOLATIONS.append(msg)
        raise TypeError(msg)


class Faked:
    """Base of the fakes: attribute access and calls held to `_real_` (see the module doc)."""

    _real_: type = object
    _module_ = None  # the tensorrt module (enum types for argument checks)

    def __getattribute__(self, name):
        if name.startswith("_"):
            return object.__getattribute__(self, name)
        real = object.__getattribute__(self, "_real_instance")()
        if not hasattr(real, name):
            raise AttributeError(f"'{real.__module__}.{real.__name__}' object has no attribute '{name}'")
        try:
            value = object.__getattribute__(self, name)
        except AttributeError:
            raise NotFaked(f"the contract suite's fake of {real.__name__} does not implement {name}") from None
        real_attr = inspect.getattr_static(real, name, None)
        if callable(value) and not isinstance(real_attr, property) and not isinstance(value, type):
            module = type(self)._module_

            def checked(*args, **kwargs):
                check_call(real, name, args, kwargs, module)
                return value(*args, **kwargs)

            return checked
        return value

    def __setattr__(self, name, value):
        if name.startswith("_"):
            return object.__setattr__(self, name, value)
        real = object.__getattribute__(self, "_real_instance")()
        attr = inspect.getattr_static(real, name, None)
        if attr is None:
            VIOLATIONS.append(f"set {real.__name__}.{name}, which TensorRT does not have")
            raise AttributeError(f"'{real.__name__}' object has no attribute '{name}'")
        if isinstance(attr, property) and attr.fset is None:
            raise AttributeError(f"can't set attribute '{name}' of {real.__name__} (read-only)")
        object.__setattr__(self, name, value)

    def _real_instance(self):
        """The real class this object stands for (a layer after polygraphy's downcast)."""
        return type(self)._real_
