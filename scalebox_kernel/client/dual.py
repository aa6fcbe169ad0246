"""`class_or_instance`: one method name with two forms, as the seed SDK has them: `Sandbox.kill(sandbox_id)` on
the class and `sandbox.kill()` on a sandbox."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

S = TypeVar("S")
R_cls = TypeVar("R_cls")
R_obj = TypeVar("R_obj")
P_cls = ParamSpec("P_cls")
P_obj = ParamSpec("P_obj")


class class_or_instance(Generic[S, P_cls, R_cls, P_obj, R_obj]):
    """A descriptor: read on the class it is `on_class` (a plain function, e.g. taking a sandbox id), read on an
    instance it is `on_instance` bound to it. Type checkers and IDEs see each form's own signature.
    `Class.method(instance, ...)` is the instance form too, as it is for any Python method."""

    def __init__(self, on_class: Callable[P_cls, R_cls], on_instance: Callable[Concatenate[S, P_obj], R_obj]) -> None:
        self.on_class = on_class
        self.on_instance = on_instance
        self.__doc__ = on_instance.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Callable[P_cls, R_cls]: ...

    @overload
    def __get__(self, obj: S, owner: type[Any] | None = None) -> Callable[P_obj, R_obj]: ...

    def __get__(self, obj: Any, owner: type[Any] | None = None) -> Callable[..., Any]:
        if obj is not None:
            return types.MethodType(self.on_instance, obj)
        on_class, on_instance = self.on_class, self.on_instance

        @functools.wraps(on_class)
        def call(*args: Any, **kwargs: Any) -> Any:
            if args and owner is not None and isinstance(args[0], owner):
                return on_instance(*args, **kwargs)
            return on_class(*args, **kwargs)

        return call
