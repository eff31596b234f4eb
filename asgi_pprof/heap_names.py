"""Names for tracemalloc's frames, which carry only a file and a line.

A frame gets the CPU profile's name (``module.co_qualname``, ``co_firstlineno``) from
the live code objects of its file's module: what the module's namespace, its classes
and their nested code objects reach. Per file they are kept sorted by first line with
the last line each one covers, so a line's innermost code is a short walk back from a
bisection; lines no function covers are ``module.<module>``. No source is read or
compiled (that holds the GIL, and a cold server imports hundreds of files).

Everything here is built to allocate little: while tracemalloc runs, every object we
allocate is traced with its full traceback (2-5 µs each at 16 frames, measured), and
the caches themselves would otherwise be a large share of the heap they describe. The
caches are bounded (:data:`MAX_FRAMES`, :data:`MAX_FILES`) and their sizes are reported
by :func:`cache_facts`. :meth:`Names.is_ours` tells the traces asgi_pprof allocated.
"""

from __future__ import annotations

import bisect
import os
import sys
import threading
import types
from typing import TypeAlias

from . import native, symbols
from .model import Frame
from .native import untracked

__all__ = ["MAX_FILES", "MAX_FRAMES", "Names", "Traceback", "cache_facts", "module_of", "names"]

MAX_FRAMES = 100_000
"""Most ``(file, line)`` frames kept named; past it the name caches start over."""

MAX_FILES = 5_000
"""Most files whose code objects are kept indexed; past it the index starts over."""

Traceback: TypeAlias = tuple[tuple[str, int], ...]
"""tracemalloc's frames of one traceback, leaf first: ``((filename, line), ...)``."""

Cells: TypeAlias = tuple[str, str, str, str]
"""A frame's ``" 0x<return pc>"`` header word, then its ``#`` line's pc, function and place."""


def _probe() -> None:  # pragma: no cover - never called; its code names this package's files
    pass


PACKAGE_DIR = os.path.dirname(_probe.__code__.co_filename) + os.sep
"""Where asgi_pprof's files are, spelled as tracemalloc spells filenames."""


_traces = native.traces


def last_line(code: types.CodeType) -> int:
    """Return the last line any instruction of ``code`` starts on (``co_lines``' maximum).

    Read from ``co_linetable`` (the 3.11+ location table) byte by byte: iterating bytes
    yields cached small ints, where ``co_lines()`` allocates a tuple and ints per entry.
    (In C when ``_traces`` is loaded: a cold heap reads ~10 000 tables.)
    """
    if _traces is not None:
        last: int = _traces.last_line(code.co_linetable, code.co_firstlineno)
        return last
    # Lines relative to the first one: they stay small ints, which are cached (absolute
    # line numbers past 256 would be a new, traced int at every step).
    line = best = 0
    it = iter(code.co_linetable)
    for b in it:
        kind = (b >> 3) & 15
        if kind == 15:  # no location
            continue
        if kind < 10:  # short form: same line, one byte of columns
            next(it)
            continue
        if kind < 13:  # one-line form: delta 0-2, two bytes of columns
            line += kind - 10
            next(it)
            next(it)
        else:  # 13: no columns, 14: long form; both start with a signed varint delta
            v = next(it)
            val = v & 63
            shift = 6
            while v & 64:
                v = next(it)
                val |= (v & 63) << shift
                shift += 6
            line += -(val >> 1) if val & 1 else val >> 1
            if kind == 14:  # end line, start and end columns: skip three varints
                for _ in (0, 1, 2):
                    while next(it) & 64:
                        pass
        if line > best:
            best = line
    return code.co_firstlineno + best


class _FileCodes:
    """The code objects of one file, by first line, with the span each one covers."""

    __slots__ = ("codes", "firsts", "lasts", "reach")

    def __init__(self, codes: list[types.CodeType]) -> None:
        codes.sort(key=_first_line)
        self.codes = codes
        self.firsts = [c.co_firstlineno for c in codes]
        self.lasts = [last_line(c) for c in codes]
        # reach[i]: the furthest line any of codes[0..i] covers, so a walk back from a
        # line stops as soon as no earlier code can cover it.
        reach: list[int] = []
        far = 0
        for last in self.lasts:
            if last > far:
                far = last
            reach.append(far)
        self.reach = reach

    def owners(self, line: int, depth: int) -> types.CodeType | None:
        """Return the code ``depth`` levels out from the innermost one covering ``line``.

        Past the outermost covering code, that one; None when no code covers the line.
        """
        i = bisect.bisect_right(self.firsts, line) - 1
        found: types.CodeType | None = None
        level = 0
        lasts, reach, codes = self.lasts, self.reach, self.codes
        while i >= 0 and reach[i] >= line:
            if lasts[i] >= line:
                found = codes[i]
                if level == depth:
                    break
                level += 1
            i -= 1
        return found


def _first_line(code: types.CodeType) -> int:
    return code.co_firstlineno


# A tuple, not ``staticmethod | classmethod | ...``: that builds a new union per call.
_METHOD_WRAPPERS = (staticmethod, classmethod, types.MethodType)


def _codes_of(filename: str, module: str | None) -> list[types.CodeType]:
    """Return the live code objects of ``filename`` that its module's namespace reaches."""
    mod = sys.modules.get(module) if module else None
    if mod is None:
        return []
    out: list[types.CodeType] = []
    # Functions and classes mark what was seen by identity (their hash is their address;
    # a code object's hash walks its constants). Codes are deduplicated at the end.
    seen: set[object] = set()

    def add_code(code: types.CodeType) -> None:
        if code.co_filename != filename:
            return
        out.append(code)
        for const in code.co_consts:
            if type(const) is types.CodeType:
                add_code(const)

    def add(obj: object, depth: int) -> None:
        # Only known types, read statically: a getattr on an arbitrary object runs its
        # __getattr__ (pytest's mark generator, lazy proxies), and a profiler must not.
        if depth > 8:
            return
        if isinstance(obj, type):
            attrs = obj.__dict__
            if attrs.get("__module__") != module or obj in seen:
                return
            seen.add(obj)
            for v in list(attrs.values()):
                add(v, depth + 1)
        elif isinstance(obj, types.FunctionType):
            if obj in seen:
                return
            seen.add(obj)
            add_code(obj.__code__)
            wrapped = obj.__dict__.get("__wrapped__")
            if wrapped is not None:
                add(wrapped, depth + 1)
        elif isinstance(obj, _METHOD_WRAPPERS):
            add(obj.__func__, depth + 1)
        elif isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                if f is not None:
                    add(f, depth + 1)
        elif callable(obj) and type(obj).__dictoffset__:
            # A callable wrapper with a __dict__ (functools.lru_cache, update_wrapper).
            wrapped = object.__getattribute__(obj, "__dict__").get("__wrapped__")
            if wrapped is not None:
                add(wrapped, depth + 1)

    for v in list(vars(mod).values()):
        add(v, 0)
    if len(out) > 1:
        unique = {id(c): c for c in out}  # a factory's functions share one code
        if len(unique) < len(out):
            out = list(unique.values())
    return out


class Names:
    """Caches ``(filename, line) -> Frame`` and Go-text cells; bounded; thread-safe."""

    def __init__(self) -> None:
        self.frames: dict[tuple[str, int], Frame] = {}
        self.cells: dict[tuple[str, int], Cells] = {}
        self.files: dict[str, _FileCodes] = {}
        self.ours: dict[str, bool] = {}
        # Frames whose line more than one code covers: where two neighbouring frames of a
        # traceback can be one line (a comprehension and its caller) and depth matters.
        self.multi: set[tuple[str, int]] = set()
        self.deeper: dict[tuple[str, int], list[Frame]] = {}  # depth 1, 2, ... of multi frames
        # Bound once: a bound method made per call would be a traced allocation per call.
        self._frame_of = self.frames.__getitem__
        self._cells_of = self.cells.__getitem__
        self._simple = self.multi.isdisjoint
        self.modules: dict[str, str] = {}
        self._modules_scanned = -1
        self.restarts = 0
        self.lock = threading.RLock()

    # --- which frames are ours -------------------------------------------------------

    def is_ours(self, tb: Traceback) -> bool:
        """Return True when any frame of ``tb`` is asgi_pprof's own code."""
        ours = self.ours
        for fr in tb:
            o = ours.get(fr[0])
            if o is None:
                o = ours[fr[0]] = fr[0].startswith(PACKAGE_DIR)
            if o:
                return True
        return False

    # --- modules ---------------------------------------------------------------------

    def module_of(self, filename: str) -> str | None:
        """Return the name of the module loaded from ``filename``, or None."""
        if filename.startswith("<frozen ") and filename.endswith(">"):
            return filename[8:-1]
        name = self.modules.get(filename)
        if name is None:
            with self.lock:
                # Rescan only when modules were imported since: unknown files are common
                # ("<string>" from exec), and each scan walks every module.
                if len(sys.modules) != self._modules_scanned:
                    self._modules_scanned = len(sys.modules)
                    for mod_name, mod in list(sys.modules.items()):
                        f = getattr(mod, "__file__", None)
                        if isinstance(f, str):
                            self.modules.setdefault(f, mod_name)
                name = self.modules.get(filename)
                if name is None:
                    if len(self.modules) > 2 * MAX_FILES + len(sys.modules):
                        self.modules.clear()
                        self._modules_scanned = -1
                    name = self.modules[filename] = ""
        return name or None

    # --- frames ----------------------------------------------------------------------

    def frame(self, fr: tuple[str, int], depth: int = 0) -> Frame:
        """Return the :class:`Frame` of tracemalloc's ``(filename, line)``.

        A line can belong to several nested codes (``[f(x) for x in y]``): ``depth`` 0
        is the innermost, 1 the one around it, and so on. Depth 0 is cached.
        """
        if depth == 0:
            got = self.frames.get(fr)
        else:
            outer = self.deeper.get(fr)
            got = outer[depth - 1] if outer is not None and len(outer) >= depth else None
        if got is not None:
            return got
        filename, line = fr
        with self.lock:
            if len(self.frames) >= MAX_FRAMES:
                self._restart()
            module = self.module_of(filename)
            codes = self.files.get(filename)
            if codes is None:
                if len(self.files) >= MAX_FILES:
                    self._restart()
                codes = self.files[filename] = _FileCodes(_codes_of(filename, module))
            code = codes.owners(line, depth)
            prefix = module or os.path.splitext(os.path.basename(filename))[0] or filename
            if code is None:
                got = Frame(f"{prefix}.<module>", filename, 1, line)
            else:
                qual = getattr(code, "co_qualname", code.co_name)
                got = Frame(f"{prefix}.{qual}", filename, code.co_firstlineno, line)
            got = untracked(got)  # a cache entry no collection needs to scan
            if depth == 0:
                self.frames[untracked(fr)] = got
                if code is not None and codes.owners(line, 1) is not code:
                    self.multi.add(fr)
            else:
                outer = self.deeper.setdefault(fr, [])
                if len(outer) == depth - 1:
                    outer.append(got)
        return got

    def _restart(self) -> None:
        self.frames.clear()
        self.cells.clear()
        self.files.clear()
        self.multi.clear()
        self.deeper.clear()
        self.restarts += 1

    def stack(self, tb: Traceback) -> tuple[Frame, ...]:
        """Return the leaf-first stack of tracemalloc's traceback ``tb``.

        The common case is one C-level map over the cache: two allocations per stack.
        """
        if self._simple(tb):
            try:
                return tuple(map(self._frame_of, tb))
            except KeyError:
                pass  # new frames: name them one by one (the cache may restart meanwhile)
        return tuple(self._nested(tb))

    def _nested(self, tb: Traceback) -> list[Frame]:
        # Neighbours on one line are codes nested in each other: depth 0, 1, ...
        out: list[Frame] = []
        prev: tuple[str, int] | None = None
        depth = 0
        frame = self.frame
        for fr in tb:
            if fr == prev:
                depth += 1
                out.append(frame(fr, depth))
            else:
                depth = 0
                out.append(frame(fr))
            prev = fr
        return out

    def cells_of(self, tb: Traceback) -> list[Cells]:
        """Return the Go-text cells of every frame of ``tb``, leaf first."""
        if self._simple(tb):
            try:
                return list(map(self._cells_of, tb))
            except KeyError:
                pass
        return [self.text_cells(fr, d) for fr, d in zip(tb, depths(tb), strict=True)]

    def text_cells(self, fr: tuple[str, int], depth: int = 0) -> Cells:
        """Return one frame's Go-text cells (depth 0 is cached)."""
        c = self.cells.get(fr) if depth == 0 else None
        if c is None:
            f = self.frame(fr, depth)
            pc = symbols.address_of(f)
            c = (
                f" {pc + 1:#x}",
                f"{pc:#x}",
                f"{f.function}+{pc - symbols.entry_of(f):#x}",
                f"{f.filename}:{f.line}\n",
            )
            if depth == 0:
                self.cells[fr] = c
        return c


def depths(frames: Traceback) -> list[int]:
    """Return, per frame, how many frames just below it (leafward) are on the same line.

    A caller on the very line of its callee is the code around it (a comprehension's
    function, a lambda's definer): that is how a line shared by nested codes is split.
    """
    out = []
    prev: tuple[str, int] | None = None
    depth = 0
    for fr in frames:
        depth = depth + 1 if fr == prev else 0
        prev = fr
        out.append(depth)
    return out


names = Names()
"""The process's one name cache (frames are the same for every app)."""


def module_of(filename: str) -> str | None:
    """Return the name of the module loaded from ``filename``, or None."""
    return names.module_of(filename)


def cache_facts() -> list[tuple[str, str]]:
    """Return the name caches' sizes and bounds for the text trailer."""
    n = names
    return [
        ("asgi_pprof.names.frames", f"{len(n.frames)} (max {MAX_FRAMES})"),
        ("asgi_pprof.names.files", f"{len(n.files)} (max {MAX_FILES})"),
        ("asgi_pprof.names.cells", str(len(n.cells))),
        ("asgi_pprof.names.restarts", str(n.restarts)),
    ]
