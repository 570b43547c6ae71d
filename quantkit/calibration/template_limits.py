"""A jinja2 sandbox with resource limits for model chat templates (code from the model's files).

jinja2's sandbox stops attribute escapes but not amplification: `'A' * 3000000000`, doubling a string with
`~` in a loop, `range(10**8)` nested, or a filter asked for a huge width. Here every string/list a template
builds, and the rendered output, is capped in size; ranges draw from one iteration budget per render;
and a render that runs past its time budget stops (checked on every call, attribute and item access).
"""

from __future__ import annotations

import functools
import re
import time

from jinja2.compiler import CodeGenerator
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 16 << 20  # any string/list a template builds, and its whole output
MAX_RANGE_STEPS = 1_000_000  # all range() iterations of one render together
MAX_SECONDS = 30.0


class TemplateLimit(TemplateError):
    pass


_WIDE_FORMAT = re.compile(r"[%:{][^%:{}]*?\d{8,}")  # '%3000000000s', '{:3000000000}'


def _check_args(args, what) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and a > MAX_CHARS:
            raise TemplateLimit(f"chat template passes {a} to {what}")
        if isinstance(a, str) and _WIDE_FORMAT.search(a):
            raise TemplateLimit(f"chat template asks {what} for a field wider than {MAX_CHARS}")


def _guard_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
    def g(*args, **kwargs):
        _check_args((*args, *kwargs.values()), f"filter {f.__name__}")
        return f(*args, **kwargs)
    return g


def _size(x) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


class _Gen(CodeGenerator):
    def visit_Concat(self, node, frame):  # `a ~ b` through a size check
        self.write("environment.limited_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _Gen
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, *a, **kw):
        super().__init__(*a, optimized=False, **kw)  # the optimizer would run filters/ops at compile time
        self.globals["range"] = self._range
        self.filters = {k: _guard_filter(f) for k, f in self.filters.items()}
        self.start()

    def start(self) -> None:
        """Reset the budgets (once per render)."""
        self._steps = MAX_RANGE_STEPS
        self._deadline = time.monotonic() + MAX_SECONDS

    def _tick(self) -> None:
        if time.monotonic() > self._deadline:
            raise TemplateLimit(f"chat template ran longer than {MAX_SECONDS:.0f} s")

    def _check(self, n) -> None:
        if n is not None and n > MAX_CHARS:
            raise TemplateLimit(f"chat template builds a value of {n} items (limit {MAX_CHARS})")

    def _range(self, *args):
        r = range(*args)
        self._steps -= len(r)
        if self._steps < 0:
            raise TemplateLimit(f"chat template loops more than {MAX_RANGE_STEPS} times")
        return r

    def limited_concat(self, parts) -> str:
        self._tick()
        self._check(sum(len(str(p)) if isinstance(p, str) else 64 for p in parts))
        return "".join(str(p) for p in parts)

    def call_binop(self, context, operator, left, right):
        self._tick()
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(k, int):
                    self._check(len(seq) * k)
        elif operator == "+":
            if _size(left) is not None and _size(right) is not None:
                self._check(len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _check_args((left,), "'%'")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024 and \
                isinstance(left, (int, float)) and abs(left) > 1:
            raise TemplateLimit(f"chat template computes {left} ** {right}")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        __self._tick()  # ljust(10**9), '{:9999999999}'.format(...)
        _check_args((*args, *kwargs.values(), getattr(__obj, "__self__", None)), getattr(__obj, "__name__", "a call"))
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self._tick()
        if isinstance(obj, str) and attribute in ("format", "format_map"):  # the sandbox wraps these
            _check_args((obj,), "str.format")
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._tick()
        return super().getitem(obj, argument)


def render_limited(template, **variables) -> str:
    """Render, stopping when the output passes MAX_CHARS."""
    template.environment.start()
    out, n = [], 0
    for chunk in template.generate(**variables):
        n += len(chunk)
        if n > MAX_CHARS:
            raise TemplateLimit(f"chat template output passes {MAX_CHARS} characters")
        out.append(chunk)
    return "".join(out)
