"""Every TensorRT and cuda-python name hwaware uses exists in the releases its code paths run on.

The names are collected from hwaware's own source (an AST walk), so a new call is covered without
editing this file: attribute chains on the `tensorrt` module (`trt.BuilderFlag.FP16`), and attributes
of the objects it hands out (`builder.create_builder_config()`, `engine.create_engine_inspector()`,
`self.context.execute_async_v3(...)`). A name under a version gate (`if int(trt.__version__...)[0]) < 10`)
is checked against the releases that gate lets through only; a name the code asks about with
`hasattr`/`getattr(..., default)` may be absent (but must exist in some release). Calls are checked
against the documented arguments where a release's docstrings give them.

TensorRT: against the real bindings wheels of 8.6.1, 10.4.0, 10.13 and 11.4 (scripts/tensorrt_bindings.py;
fetched by scripts/setup.sh, never installed). cuda-python: against the installed `cuda.bindings.runtime`.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import operator
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import hwaware
from hwaware.errors import HwawareError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(hwaware.__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tensorrt_bindings", ROOT / "scripts" / "tensorrt_bindings.py")
bindings_script = sys.modules.setdefault("tensorrt_bindings", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bindings_script)

MAJORS = frozenset(pin.major for pin in bindings_script.PINS)
TRT_ROOTS = {"trt", "tensorrt"}
# Names that hold TensorRT objects however they were obtained (a helper's return value, a parameter).
TRT_OBJECTS = {"builder", "network", "config", "parser", "engine", "context", "inspector", "runtime", "logger"}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}


@dataclass(frozen=True)
class Use:
    """One name hwaware uses: where, on what, on which TensorRT majors, and how it is called."""

    where: str
    name: str
    owner: str
    majors: frozenset[int]
    guarded: bool
    positional: int | None = None  # None: not a call, or *args
    keywords: tuple[str, ...] = ()


def _is_version(node: ast.AST, version_names: set[str]) -> bool:
    return any((isinstance(n, ast.Attribute) and n.attr == "__version__") or
               (isinstance(n, ast.Name) and n.id in version_names) for n in ast.walk(node))


def _gate(test: ast.AST, version_names: set[str]):
    """The majors predicate of `if <major> OP N`, or None if `test` is no version gate."""
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _COMPARE
            and isinstance(test.comparators[0], ast.Constant) and isinstance(test.comparators[0].value, int)
            and _is_version(test.left, version_names)):
        op, bound = _COMPARE[type(test.ops[0])], test.comparators[0].value
        return lambda major: op(major, bound)
    return None


class _Collector:
    """TensorRT uses in one module's source."""

    def __init__(self, source: str, filename: str):
        self.tree = ast.parse(source)
        self.filename = filename
        self.uses: list[Use] = []
        self.self_objects: set[str] = set()

    def collect(self) -> list[Use]:
        for cls in [n for n in ast.walk(self.tree) if isinstance(n, ast.ClassDef)]:  # self.X = <trt object>
            for node in ast.walk(cls):
                if isinstance(node, ast.Assign) and self._is_trt(node.value, set()):
                    self.self_objects |= {t.attr for t in node.targets
                                          if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                          and t.value.id == "self"}
        functions = [n for n in ast.walk(self.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for function in functions:
            self._function(function)
        return self.uses

    def _is_trt(self, node: ast.AST, objects: set[str]) -> bool:
        if isinstance(node, ast.Name):
            return node.id in TRT_ROOTS or node.id in TRT_OBJECTS or node.id in objects
        if isinstance(node, ast.Attribute):
            if node.attr == "__version__":
                return False  # a str
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return node.attr in TRT_OBJECTS or node.attr == "trt" or node.attr in self.self_objects
            return self._is_trt(node.value, objects)
        if isinstance(node, ast.Call):
            return self._is_trt(node.func, objects)
        if isinstance(node, ast.Subscript):
            return self._is_trt(node.value, objects)
        return False

    def _function(self, function) -> None:
        objects: set[str] = set()
        version_names: set[str] = set()
        guarded: set[str] = set()
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
                literal = node.args[1] if len(node.args) > 1 else None
                if isinstance(literal, ast.Constant) and isinstance(literal.value, str):
                    if node.func.id == "hasattr" or len(node.args) > 2:
                        guarded.add(literal.value)
        for _ in range(3):  # names bound to TensorRT objects (or to the version), to a fixed point
            for node in ast.walk(function):
                if isinstance(node, ast.Assign):
                    names = {t.id for t in node.targets if isinstance(t, ast.Name)}
                    if self._is_trt(node.value, objects):
                        objects |= names
                    if _is_version(node.value, version_names):
                        version_names |= names
        self._block(function.body, MAJORS, objects, version_names, guarded, function.name)

    def _block(self, statements, majors, objects, version_names, guarded, scope) -> None:
        for statement in statements:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue  # visited on its own
            if isinstance(statement, ast.If) and (gate := _gate(statement.test, version_names)):
                inside = frozenset(m for m in majors if gate(m))
                self._block(statement.body, inside, objects, version_names, guarded, scope)
                self._block(statement.orelse, majors - inside, objects, version_names, guarded, scope)
                continue
            nested = [getattr(statement, k) for k in ("body", "orelse", "finalbody", "handlers")
                      if isinstance(getattr(statement, k, None), list)]
            for node in self._own_nodes(statement):
                self._record(node, majors, objects, guarded, scope)
            for block in nested:
                self._block(block, majors, objects, version_names, guarded, scope)

    @staticmethod
    def _own_nodes(statement):
        """The nodes of `statement` outside its nested statement blocks (those are visited with their gates)."""
        skip = {id(s) for k in ("body", "orelse", "finalbody", "handlers")
                for s in (getattr(statement, k, None) or []) if isinstance(getattr(statement, k, None), list)}
        stack = [statement]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(c for c in ast.iter_child_nodes(node) if id(c) not in skip
                         and not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef)))

    def _record(self, node, majors, objects, guarded, scope) -> None:
        if not isinstance(node, ast.Attribute) or not self._is_trt(node.value, objects):
            return
        if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in ("trt", *TRT_OBJECTS):
            return  # `self.trt`, `self.context`: hwaware's own attribute names
        if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in self.self_objects:
            return
        self.uses.append(Use(f"{self.filename}:{node.lineno} ({scope})", node.attr, ast.unparse(node.value),
                             frozenset(majors), node.attr in guarded))

    def calls(self) -> list[Use]:
        """Uses that are method calls, with their argument shapes (for the documented-arguments check)."""
        by_position = {(u.where.split(" ")[0], u.name): u for u in self.uses}
        found = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                use = by_position.get((f"{self.filename}:{node.func.lineno}", node.func.attr))
                if use is not None and not any(isinstance(a, ast.Starred) for a in node.args):
                    found.append(Use(use.where, use.name, use.owner, use.majors, use.guarded, len(node.args),
                                     tuple(k.arg for k in node.keywords if k.arg)))
        return found


def collect_uses(source: str, filename: str) -> tuple[list[Use], list[Use]]:
    collector = _Collector(source, filename)
    return collector.collect(), collector.calls()


def hwaware_uses() -> tuple[list[Use], list[Use]]:
    uses, calls = [], []
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        if "import tensorrt" in text:  # the modules that drive TensorRT (others call them, never TensorRT itself)
            found, called = collect_uses(text, str(path.relative_to(ROOT)))
            uses += found
            calls += called
    return uses, calls


def problems(uses: list[Use], calls: list[Use], releases: dict) -> list[str]:
    """Every use a release its gate sends it to lacks, and every call with more or other arguments than documented."""
    found = []
    for use in uses:
        present = [r for r in releases.values() if r.has(use.name)]
        if use.guarded:
            if not present:
                found.append(f"{use.where}: {use.owner}.{use.name} is in no supported TensorRT release")
            continue
        for release in releases.values():
            if release.major in use.majors and not release.has(use.name):
                found.append(f"{use.where}: {use.owner}.{use.name} is missing from TensorRT {release.release}")
    for call in calls:
        for release in releases.values():
            if release.major not in call.majors or not release.has(call.name):
                continue
            documented = [args for (_, member), args in release.arguments.items() if member == call.name and args]
            fits = any(call.positional <= len(args) and set(call.keywords) <= set(args) for args in documented)
            if documented and not fits:
                found.append(f"{call.where}: {call.owner}.{call.name} called with {call.positional} positional "
                             f"{list(call.keywords)} keyword arguments; TensorRT {release.release} documents "
                             f"{documented}")
    return found


@pytest.fixture(scope="module")
def releases():
    try:
        loaded = bindings_script.load_all()
    except bindings_script.BindingsCacheError as exc:
        pytest.fail(str(exc))
    missing = [pin.release for pin in bindings_script.PINS if pin.release not in loaded]
    if missing:
        pytest.skip(f"TensorRT bindings {', '.join(missing)} not in {bindings_script.DEFAULT_CACHE}; run "
                    "scripts/setup.sh where the package index is reachable")
    return loaded


def test_every_tensorrt_name_hwaware_uses_exists_where_its_gate_sends_it(releases):
    uses, calls = hwaware_uses()
    assert problems(uses, calls, releases) == []
    # the collector sees the builder, the runner and the audit (a collector that finds nothing passes nothing)
    assert {"set_memory_pool_limit", "execute_async_v3", "create_engine_inspector", "EXPLICIT_BATCH",
            "STRONGLY_TYPED", "set_input_shape", "get_engine_information"} <= {u.name for u in uses}


def test_the_checker_fails_on_a_misspelling_a_version_gate_and_a_bad_call(releases):
    source = textwrap.dedent('''
        def build(trt, builder):
            config = builder.create_builder_config()
            config.set_memory_pool_limt(trt.MemoryPoolType.WORKSPACE, 1)
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            if int(trt.__version__.split(".")[0]) < 10:
                flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            if hasattr(trt.BuilderFlag, "FP16"):
                config.set_flag(trt.BuilderFlag.FP16)
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1, 2)
            return flags
    ''')
    found = problems(*collect_uses(source, "x.py"), releases)
    assert any("config.set_memory_pool_limt is missing from TensorRT 8.6.1" in p for p in found)
    explicit = [p for p in found if "EXPLICIT_BATCH" in p]
    assert explicit == ["x.py:5 (build): trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH is missing from "
                        "TensorRT 11.4.0.106"]  # the gated use on line 7 is checked against 8.6 only
    assert not any("FP16" in p for p in found)  # hasattr-guarded: may be absent (it is, in 11.4)
    assert any("set_memory_pool_limit called with 3 positional" in p for p in found)


def test_the_bindings_tell_the_releases_apart(releases):
    assert not releases["11.4.0.106"].has("EXPLICIT_BATCH") and releases["10.13.0.35"].has("EXPLICIT_BATCH")
    assert not releases["11.4.0.106"].has("FP16") and releases["10.4.0"].has("FP16")
    assert not releases["8.6.1"].has("STRONGLY_TYPED") and releases["10.4.0"].has("STRONGLY_TYPED")
    assert releases["10.4.0"].arguments[("IBuilderConfig", "set_memory_pool_limit")] == ["pool", "pool_size"]


def test_a_corrupt_or_foreign_wheel_in_the_cache_is_one_line_and_exit_2(tmp_path, capsys):
    pin = bindings_script.PINS[0]
    (tmp_path / pin.file).write_bytes(b"not the wheel")
    assert bindings_script.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt (its SHA-256 is not the pinned one)" in err
    (tmp_path / pin.file).unlink()
    (tmp_path / "tensorrt-99.0-py3-none-any.whl").write_bytes(b"PK")
    assert bindings_script.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a foreign wheel" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensorrt-99.0-py3-none-any.whl"]  # nothing written


# ---- cuda-python ---------------------------------------------------------------------------------------


def cuda_calls() -> list[tuple[str, list[str], int, tuple[str, ...]]]:
    """(where, attribute chain, positional args or -1 for no call, keywords) of every `cuda.bindings.runtime`
    use in hwaware: chains on `self.rt`, on `_cudart()` and on the imported `runtime` module."""
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        called = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            root = (isinstance(base, ast.Name) and base.id == "self" and chain[:1] == ["rt"]) or \
                (isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "_cudart")
            if not root:
                continue
            chain = chain[1:] if chain[:1] == ["rt"] else chain
            if not chain:
                continue
            call = called.get(id(node))
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            found.append((where, chain, len(call.args) if call else -1,
                          tuple(k.arg for k in call.keywords) if call else ()))
    return found


def test_every_cuda_python_call_exists_with_the_arguments_hwaware_passes():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed")
    uses = cuda_calls()
    assert {"cudaMalloc", "cudaMemcpy", "cudaEventElapsedTime", "cudaStreamBeginCapture", "cudaGraphLaunch"} <= \
        {chain[0] for _, chain, _, _ in uses}
    wrong = []
    for where, chain, positional, keywords in uses:
        target = runtime
        for name in chain:
            if not hasattr(target, name):
                wrong.append(f"{where}: cuda.bindings.runtime.{'.'.join(chain)} does not exist")
                break
            target = getattr(target, name)
        else:
            if positional >= 0 and callable(target) and not isinstance(target, type):
                try:
                    inspect.signature(target).bind(*[None] * positional, **{k: None for k in keywords})
                except TypeError as exc:
                    wrong.append(f"{where}: {'.'.join(chain)}{inspect.signature(target)} cannot take "
                                 f"{positional} positional arguments {list(keywords)}: {exc}")
    assert wrong == []


def test_cuda_python_without_a_gpu_is_one_line():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed")
    error, count = runtime.cudaGetDeviceCount()
    if int(error) == 0 and count > 0:
        pytest.skip("a GPU is visible here")
    from hwaware.latency.cuda_runtime import DeviceArray, EventTimer

    for make in (lambda: DeviceArray(nbytes=16), EventTimer):
        with pytest.raises(HwawareError) as caught:
            make()
        message = str(caught.value)
        assert "\n" not in message and message.startswith("cuda: cudaError") and "no usable NVIDIA GPU" in message
