"""The Jinja environment mappings compile in: Jinja's immutable sandbox, within relay.bounds.

Every filter, call, bounded operator, literal, ``~`` and block of output goes through the
bounds; compiled templates look at the clock at each loop step and at the start of each
macro, call block and block; constants are folded at load within the bounds.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jinja2 import filters as jf
from jinja2 import nodes, pass_context, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.environment import Environment
from jinja2.runtime import Context
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

from relay.bounds import (
    BOUNDED_BINOPS,
    MAX_COUNT,
    MAX_DIGITS,
    MAX_TEXT,
    TooLarge,
    binop,
    check_count,
    check_printf,
    check_width,
    made,
    printed_size,
    tick,
    too_large,
)

_SPEC_NUMBER = re.compile(r"\d+")


class _Formatter(SandboxedFormatter):
    """``str.format`` in templates: widths bounded, and the whole result as it is built."""

    _size = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        for digits in _SPEC_NUMBER.findall(format_spec):
            check_width("format", digits)
        text = super().format_field(value, format_spec)
        self._size += len(text)
        if self._size > MAX_TEXT:
            raise too_large("format", self._size)
        return text


class _EscapeFormatter(_Formatter, SandboxedEscapeFormatter):
    pass


# -- filters, calls and globals --------------------------------------------------------------


def _center(value: Any, width: int = 80) -> str:
    check_count("center: a width", width)
    return jf.do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    pad = len(width) if isinstance(width, str) else width
    check_count("indent: a width", pad)
    text = str(s)
    if isinstance(pad, int) and pad > 0 and (text.count("\n") + 1) * pad > MAX_TEXT:
        raise too_large("indent", (text.count("\n") + 1) * pad + len(text))
    return jf.do_indent(s, width, first, blank)


def _replaced_size(text: Any, old: Any, new: Any, count: Any) -> int:
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and 0 <= count < found:
        found = count
    return len(text) + found * (len(new) - len(old))


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> str:
    size = _replaced_size(str(s), str(old), str(new), count)
    if size > MAX_TEXT:
        raise too_large("replace", size)
    return jf.do_replace(eval_ctx, s, old, new, count)


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> str:
    items = list(value)
    if len(items) > 1 and len(str(d)) * (len(items) - 1) > MAX_TEXT:
        raise too_large("join", len(str(d)) * (len(items) - 1))
    return jf.sync_do_join(eval_ctx, items, d, attribute)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    check_printf("format", str(value), kwargs or args)
    return jf.do_format(value, *args, **kwargs)


@pass_environment
def _wordwrap(
    environment: Environment,
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    text = str(s)
    wrap = environment.newline_sequence if wrapstring is None else str(wrapstring)
    if isinstance(width, int) and width > 0:
        size = len(text) + (len(text) // width + 1) * len(wrap)
        if size > MAX_TEXT:
            raise too_large("wordwrap", size)
    return jf.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


@pass_eval_context
def _urlize(
    eval_ctx: Any,
    value: Any,
    trim_url_limit: int | None = None,
    nofollow: bool = False,
    target: str | None = None,
    rel: str | None = None,
    extra_schemes: Iterable[str] | None = None,
) -> str:
    extra = len(str(target or "")) + len(str(rel or ""))
    if extra and len(str(value).split()) * extra > MAX_TEXT:
        raise too_large("urlize")
    return jf.do_urlize(eval_ctx, value, trim_url_limit, nofollow, target, rel, extra_schemes)


def _fill(what: str, n: Any, fill_with: Any) -> None:
    check_count(f"{what}: a count", n, MAX_COUNT)
    if fill_with is not None and isinstance(n, int) and n * printed_size(fill_with) > MAX_TEXT:
        raise too_large(what)


def _batch(value: Any, linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    _fill("batch", linecount, fill_with)
    return jf.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    _fill("slice", slices, fill_with)
    return jf.sync_do_slice(value, slices, fill_with)


@pass_environment
def _sum(environment: Environment, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    if not isinstance(start, int | float):
        # Adding up lists or tuples copies each partial sum: quadratic, in one C call.
        raise TooLarge(f"sum adds numbers, not {type(start).__name__}")
    return jf.sync_do_sum(environment, iterable, attribute, start)


def _round(value: Any, precision: int = 0, method: Any = "common") -> float:
    check_count("round: a precision", precision, MAX_DIGITS)
    return jf.do_round(value, precision, method)


@pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: int | None = None) -> Markup:
    check_count("tojson: an indent", len(indent) if isinstance(indent, str) else indent, 16)
    return jf.do_tojson(eval_ctx, value, indent)


def _stream(items: Iterable[Any], what: str) -> Iterator[Any]:
    """New values one at a time (map through a filter): bounded together, as they come."""
    total = 0
    for item in items:
        total += printed_size(item, what)
        if total > MAX_TEXT:
            raise too_large(what)
        yield item


@pass_context
def _map(context: Context, value: Any, *args: Any, **kwargs: Any) -> Iterable[Any]:
    items = jf.sync_do_map(context, value, *args, **kwargs)
    return items if "attribute" in kwargs or not args else _stream(items, "map")


_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center,
    "indent": _indent,
    "replace": _replace,
    "join": _join,
    "format": _format,
    "wordwrap": _wordwrap,
    "urlize": _urlize,
    "batch": _batch,
    "slice": _slice,
    "sum": _sum,
    "round": _round,
    "tojson": _tojson,
    "map": _map,
}


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    what = f"filter {name}"

    @functools.wraps(f)  # keeps Jinja's pass_context/pass_eval_context marks
    def run(*args: Any, **kwargs: Any) -> Any:
        tick()
        value = f(*args, **kwargs)
        if type(value) is str and len(value) <= MAX_TEXT:
            return value
        return made(value, what)

    return run


@pass_context
def _tick_filter(context: Context, value: Any) -> None:
    tick()


@pass_context
def _steps(context: Context, iterable: Any) -> Iterator[Any]:
    for item in iterable:
        tick()
        yield item


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if isinstance(n, int) and isinstance(max, int) and n * max > MAX_COUNT:
        raise TooLarge(
            f"lipsum of {n} x {max} words is more than the {MAX_COUNT} a mapping may use"
        )
    return generate_lorem_ipsum(n, html, min, max)


class BoundedNamespace(Namespace):
    """``namespace()`` whose attributes, as set in a loop, stay within the bounds."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        printed_size(self, "namespace")


_TEXT_TYPES = str | bytes | bytearray
_PADDING = frozenset({"center", "ljust", "rjust", "zfill"})


def _check_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The arguments of a call of a built-in method, refused where the result would be large
    before it is built (padding, separators, replacements); returns them, an iterable given to
    ``join`` read into a list."""
    owner = getattr(obj, "__self__", None)
    name = obj.__name__
    if isinstance(owner, int) and name == "to_bytes":
        check_count("to_bytes: a length", args[0] if args else kwargs.get("length"))
    if not isinstance(owner, _TEXT_TYPES):
        return args
    if name in _PADDING:
        check_count(f"{name}: a width", args[0] if args else kwargs.get("width"))
    if name == "join" and args:
        items = list(args[0])
        if len(items) > 1 and len(owner) * (len(items) - 1) > MAX_TEXT:
            raise too_large("join", len(owner) * (len(items) - 1))
        return (items, *args[1:])
    if name == "replace" and len(args) >= 2 and all(type(a) is type(owner) for a in args[:2]):
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        size = _replaced_size(owner, args[0], args[1], count)
        if size > MAX_TEXT:
            raise too_large("replace", size)
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        if isinstance(tabsize, int) and tabs * tabsize > MAX_TEXT:
            raise too_large("expandtabs", tabs * tabsize)
    elif name == "translate" and args and isinstance(owner, str) and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        if len(owner) * longest > MAX_TEXT:
            raise too_large("translate", len(owner) * longest)
    return args


class _Output(list[str]):
    """The output of a macro, a {% set %} or {% filter %} block, or a call block, bounded as
    it grows (it is joined only at the block's end)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def append(self, part: str, /) -> None:
        self.size += len(part)
        if self.size > MAX_TEXT:
            raise too_large("a block's output", self.size)
        super().append(part)

    def extend(self, parts: Iterable[str], /) -> None:
        for part in parts:
            self.append(part)


class _CodeGenerator(CodeGenerator):
    """Jinja's code, with the values that literals, ``~`` and blocks make bounded."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.made_literal(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.made_literal(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment target: `{% for k, v in ... %}`
            super().visit_Tuple(node, frame)
            return
        self.write("environment.made_literal(")
        super().visit_Tuple(node, frame)
        self.write(")")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.join_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, within the bounds of this module."""

    code_generator_class = _CodeGenerator
    intercepted_binops = BOUNDED_BINOPS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["namespace"] = BoundedNamespace
        self.globals["lipsum"] = _lipsum

    def bound_filters(self) -> None:
        """Wrap every filter (call it once the filters are all added)."""
        self.filters.update(_FILTERS)
        for name, f in list(self.filters.items()):
            self.filters[name] = _bounded_filter(name, f)
        self.filters["_relay_tick"] = _tick_filter
        self.filters["_relay_steps"] = _steps

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        return binop(operator, left, right)

    def call(
        __self,  # Jinja's names: they cannot clash with the call's keywords
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        tick()
        if isinstance(__obj, types.BuiltinMethodType):
            args = _check_method(__obj, args, kwargs)
        return made(super().call(__context, __obj, *args, **kwargs), "a call")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Jinja's own, with formatters that bound the widths and the result.
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        f_self: Any = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type: type[str] = type(f_self)
        is_format_map = value.__name__ == "format_map"
        formatter: _Formatter
        if isinstance(f_self, Markup):
            formatter = _EscapeFormatter(self, escape=f_self.escape)
        else:
            formatter = _Formatter(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            return str_type(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    # Called by the code of _CodeGenerator.

    def output_buffer(self) -> list[str]:
        return _Output()

    def made_literal(self, value: Any) -> Any:
        return made(value, "a literal")

    def join_values(self, values: tuple[Any, ...]) -> str:
        parts = [str(v) for v in values]
        size = sum(map(len, parts))
        if size > MAX_TEXT:
            raise too_large("'~'", size)
        return "".join(parts)


# -- at load ---------------------------------------------------------------------------------


def instrument(tree: nodes.Template) -> bool:
    """Make the template look at the clock at every loop step and at the start of every
    macro, call block and block (recursion). True when it has any of them."""
    found: list[nodes.For | nodes.Macro | nodes.CallBlock | nodes.Block] = list(
        tree.find_all((nodes.For, nodes.Macro, nodes.CallBlock, nodes.Block))
    )
    for node in found:
        line = node.lineno
        look = nodes.Filter(nodes.Const(None), "_relay_tick", [], [], None, None, lineno=line)
        node.body.insert(0, nodes.ExprStmt(look, lineno=line))
        if isinstance(node, nodes.For) and node.test is not None:
            # `for x in items if test` skips items without running the body: count them too.
            node.iter = nodes.Filter(node.iter, "_relay_steps", [], [], None, None, lineno=line)
    return bool(found)


def check_constants(tree: nodes.Template, env: Environment) -> None:
    """Evaluate, within the bounds, what the template computes from constants alone: Jinja
    folds none of the bounded operators, and hides why a filter could not be folded. Raises
    TooLarge for ``{{ 10 ** 5000 }}`` or ``{{ 'a' * 10 ** 8 }}``, at once."""
    ctx = nodes.EvalContext(env)
    for node in tree.find_all((nodes.BinExpr, nodes.Filter)):
        try:
            _fold(node, ctx)
        except nodes.Impossible as e:
            if isinstance(e.__cause__, TooLarge):
                raise e.__cause__ from None
        except TooLarge:
            raise
        except Exception:  # it fails at render, as any rule can
            continue


def _fold(node: nodes.Expr, ctx: nodes.EvalContext) -> Any:
    if isinstance(node, nodes.BinExpr) and node.operator in BOUNDED_BINOPS:
        return binop(node.operator, _fold(node.left, ctx), _fold(node.right, ctx))
    return node.as_const(ctx)
