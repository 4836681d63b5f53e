"""Third-party strategy plugins: entry-point loading, broken plugins, the plugin listing, doc meta-tests.

Fake plugin distributions are real ones as far as :mod:`importlib.metadata` can tell: a module and a
``*.dist-info`` folder (``METADATA`` + ``entry_points.txt``) in a temporary site folder, so
:meth:`StrategyRegistry.load_entry_points` reads them through exactly the code path installed plugins
take.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import itertools
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ppframework import hookspecs
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.plugin_listing import format_plugins, plugin_rows
from ppframework.registry import (
    BUILTIN_SOURCE,
    ENTRY_POINT_GROUP,
    LOAD_PLUGINS_ENV,
    STRATEGY_NAME_PATTERN,
    PluginReport,
    StrategyRegistry,
    default_registry,
)
from ppframework.types import AllocationContext, BlockContext, BlockMask, ChannelScores, Probe

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DOC = REPO / "docs" / "plugins.md"
EXAMPLE_DIST = "ppf-example-strategies"

_module_ids = itertools.count()

GOOD_PLUGIN = '''
import torch

from ppframework.hookspecs import hookimpl
from ppframework.types import Probe


class FirstTokensProbe:
    """Probe the first two positions of the first row (a test plugin)."""

    stage = "select_probe"
    name = "{name}"

    @hookimpl
    def select_probe(self, ctx, residual, normed, attention_mask):
        rows = torch.tensor([0])
        tokens = torch.tensor([0, 1])
        return Probe(batch_index=rows, token_index=tokens, valid=attention_mask.bool()[rows][:, tokens])


@hookimpl
def ppf_register_strategies(register):
    register(FirstTokensProbe)
'''

BROKEN_PLUGINS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    # case: (module source, entry-point attribute or None for the module, expected error fragments)
    "import-error": (
        'raise RuntimeError("boom: the plugin needs a missing library")\n',
        None,
        ("RuntimeError", "boom"),
    ),
    "missing-attribute": ("X = 1\n", "no_such_plugin", ("AttributeError", "no_such_plugin")),
    "duplicate-name": (
        """
        from ppframework.hookspecs import hookimpl


        class Fine:
            stage = "select_probe"
            name = "fine-but-shipped-with-a-duplicate"

            @hookimpl
            def select_probe(self, ctx, residual, normed, attention_mask):
                return None


        class Residual:
            stage = "select_probe"
            name = "residual"

            @hookimpl
            def select_probe(self, ctx, residual, normed, attention_mask):
                return None


        @hookimpl
        def ppf_register_strategies(register):
            register(Fine)
            register(Residual)
        """,
        None,
        ("duplicate", "residual", BUILTIN_SOURCE),
    ),
    "bad-plugin-hook-signature": (
        """
        from ppframework.hookspecs import hookimpl


        class Plugin:
            stage = "select_probe"
            name = "nonsense-probe"

            @hookimpl
            def select_probe(self, nonsense):
                return None

            @hookimpl
            def ppf_register_strategies(self, register):
                register(Plugin)


        PLUGIN = Plugin()
        """,
        "PLUGIN",
        ("PluginValidationError", "nonsense"),
    ),
    "bad-strategy-hook-signature": (
        """
        from ppframework.hookspecs import hookimpl


        class Nonsense:
            stage = "select_probe"
            name = "nonsense-probe"

            @hookimpl
            def select_probe(self, nonsense):
                return None


        @hookimpl
        def ppf_register_strategies(register):
            register(Nonsense)
        """,
        None,
        ("PluginValidationError", "nonsense"),
    ),
    "stage-method-without-hookimpl": (
        """
        from ppframework.hookspecs import hookimpl


        class Unmarked:
            stage = "select_probe"
            name = "unmarked"

            def select_probe(self, ctx, residual, normed, attention_mask):
                return None


        @hookimpl
        def ppf_register_strategies(register):
            register(Unmarked)
        """,
        None,
        ("ValueError", "select_probe", "@hookimpl"),
    ),
    "unknown-hook": (
        """
        from ppframework.hookspecs import hookimpl


        @hookimpl
        def select_probes(ctx):
            return None
        """,
        None,
        ("select_probes",),
    ),
    "bad-stage": (
        """
        from ppframework.hookspecs import hookimpl


        class Misspelt:
            stage = "select_prob"
            name = "misspelt"

            def select_prob(self, ctx):
                return None


        @hookimpl
        def ppf_register_strategies(register):
            register(Misspelt)
        """,
        None,
        ("ValueError", "select_prob", "stage"),
    ),
    "name-with-newline": (
        """
        from ppframework.hookspecs import hookimpl


        class TwoLines:
            stage = "select_probe"
            name = "two\\nlines"

            @hookimpl
            def select_probe(self, ctx):
                return None


        @hookimpl
        def ppf_register_strategies(register):
            register(TwoLines)
        """,
        None,
        ("ValueError", "'two\\nlines'", "strategy name must match"),
    ),
    "name-with-slash": (
        """
        from ppframework.hookspecs import hookimpl


        class Slashed:
            stage = "apply_mask"
            name = "top/k"

            @hookimpl
            def apply_mask(self, ctx, scores, ratio):
                return None


        @hookimpl
        def ppf_register_strategies(register):
            register(Slashed)
        """,
        None,
        ("ValueError", "'top/k'", "strategy name must match"),
    ),
    "stage-method-missing": (
        """
        from ppframework.hookspecs import hookimpl


        class NoMethod:
            stage = "apply_mask"
            name = "no-method"


        @hookimpl
        def ppf_register_strategies(register):
            register(NoMethod)
        """,
        None,
        ("ValueError", "apply_mask", "no method"),
    ),
}


class FakeSite:
    """A temporary site folder on ``sys.path`` holding plugin modules and their ``.dist-info``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add(
        self, dist: str, source: str, attr: str | None = None, version: str = "1.0"
    ) -> importlib.metadata.EntryPoint:
        """Write plugin distribution ``dist`` whose entry point loads ``source``; return the entry point."""
        module = f"_ppf_test_plugin_{next(_module_ids)}"
        (self.root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        value = module if attr is None else f"{module}:{attr}"
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nplugin = {value}\n")
        self.modules.append(module)
        (ep,) = importlib.metadata.Distribution.at(info).entry_points.select(group=ENTRY_POINT_GROUP)
        return ep


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    """A :class:`FakeSite` on ``sys.path``; its modules are dropped from ``sys.modules`` afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    fake = FakeSite(root)
    yield fake
    for module in fake.modules:
        sys.modules.pop(module, None)


@pytest.fixture
def restore_default_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Yield ``monkeypatch``; afterwards undo it and rebuild the process-wide registry from the real env."""
    yield monkeypatch
    monkeypatch.undo()
    default_registry(refresh=True)


def fresh_registry(entry_points: list[importlib.metadata.EntryPoint] | None = None) -> StrategyRegistry:
    """Built-ins plus ``entry_points`` (default: the installed ones), loaded as ``default_registry`` does."""
    registry = StrategyRegistry()
    registry.load_builtins()
    registry.load_entry_points(entry_points)
    return registry


def assert_builtins_work(registry: StrategyRegistry) -> None:
    """The built-in plugin loaded cleanly and the ``pp`` preset still builds."""
    assert registry.plugins[0].name == BUILTIN_SOURCE and registry.plugins[0].error is None
    built = registry.build_method(MethodConfig(preset="pp"))
    assert set(built) == set(hookspecs.STAGES)


def report_for(registry: StrategyRegistry, dist: str) -> PluginReport:
    """The one :class:`PluginReport` of ``dist``."""
    (report,) = [r for r in registry.plugins if r.name == dist]
    return report


# -- (a) entry-point loading --------------------------------------------------------------------


def test_entry_point_plugin_registers_its_strategy_with_its_distribution_as_source(site: FakeSite) -> None:
    ep = site.add("ppf-first-tokens", GOOD_PLUGIN.format(name="first-tokens"), version="0.3.1")
    registry = fresh_registry([ep])
    report = report_for(registry, "ppf-first-tokens")
    assert report.error is None
    assert report.version == "0.3.1"
    assert report.strategies == [("select_probe", "first-tokens")]
    info = registry.get("select_probe", "first-tokens")
    assert info.source == "ppf-first-tokens"
    assert info.description.startswith("Probe the first two positions")
    mask = torch.ones(2, 4, dtype=torch.long)
    probe = info.build().select_probe(ctx=None, residual=None, normed=None, attention_mask=mask)
    assert probe.token_index.tolist() == [0, 1]
    assert_builtins_work(registry)


def test_ppf_register_strategies_of_builtins_and_plugins_share_one_namespace(site: FakeSite) -> None:
    ep_a = site.add("ppf-a", GOOD_PLUGIN.format(name="first-tokens"))
    ep_b = site.add("ppf-b", GOOD_PLUGIN.format(name="first-tokens"))
    registry = fresh_registry([ep_a, ep_b])
    assert report_for(registry, "ppf-a").error is None
    error = report_for(registry, "ppf-b").error
    assert error is not None and "duplicate" in error and "ppf-a" in error
    assert registry.get("select_probe", "first-tokens").source == "ppf-a"


@pytest.mark.parametrize("case", sorted(BROKEN_PLUGINS))
def test_broken_plugin_is_reported_and_skipped(site: FakeSite, case: str) -> None:
    source, attr, fragments = BROKEN_PLUGINS[case]
    broken = site.add(f"ppf-broken-{case}", source, attr=attr, version="2.5")
    good = site.add("ppf-good", GOOD_PLUGIN.format(name="first-tokens"))
    registry = fresh_registry([broken, good])

    report = report_for(registry, f"ppf-broken-{case}")
    assert report.version == "2.5"
    assert report.strategies == []
    assert report.error is not None
    for fragment in fragments:
        assert fragment in report.error, f"{fragment!r} missing from {report.error!r}"
    # nothing of the broken plugin is registered, built-ins and later plugins still load
    assert not any(info.source == report.name for info in registry.all())
    assert registry.get("select_probe", "residual").source == BUILTIN_SOURCE
    assert report_for(registry, "ppf-good").error is None
    assert_builtins_work(registry)
    listed = format_plugins(registry).splitlines()
    at = next(i for i, line in enumerate(listed) if line.startswith(report.name))
    error_lines = report.error.splitlines()
    assert [line.strip() for line in listed[at + 1 : at + 1 + len(error_lines)]] == [
        f"error: {error_lines[0]}",
        *(line.strip() for line in error_lines[1:]),
    ]


def test_load_plugins_env_loads_only_the_named_distributions(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    eps = [site.add(dist, GOOD_PLUGIN.format(name=dist)) for dist in ("ppf-a", "ppf-b", "ppf-c")]
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "ppf-a, ppf-c")
    registry = fresh_registry(eps)
    assert [r.name for r in registry.plugins] == [BUILTIN_SOURCE, "ppf-a", "ppf-c"]
    assert registry.names("select_probe").count("ppf-b") == 0
    assert f"{LOAD_PLUGINS_ENV}=ppf-a,ppf-c" in format_plugins(registry)


def test_empty_load_plugins_env_loads_no_plugin(site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [site.add(dist, GOOD_PLUGIN.format(name=dist)) for dist in ("ppf-a", "ppf-b")]
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "")
    registry = fresh_registry(eps)
    assert [r.name for r in registry.plugins] == [BUILTIN_SOURCE]
    assert_builtins_work(registry)
    assert f"{LOAD_PLUGINS_ENV} is empty" in format_plugins(registry)


def test_installed_entry_points_are_discovered_from_sys_path(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.add("ppf-on-path", GOOD_PLUGIN.format(name="on-path"))
    site.add("ppf-filtered-out", GOOD_PLUGIN.format(name="filtered-out"))
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "ppf-on-path")
    registry = fresh_registry(None)  # importlib.metadata.entry_points(group="ppframework")
    assert [r.name for r in registry.plugins] == [BUILTIN_SOURCE, "ppf-on-path"]
    assert registry.get("select_probe", "on-path").source == "ppf-on-path"


@pytest.mark.parametrize(
    "name", ["UPPER", "-leading-dash", "with space", "tab\tname", "x" * 65, "dots/../up"]
)
def test_unsafe_strategy_names_are_refused_as_plugin_errors(site: FakeSite, name: str) -> None:
    ep = site.add("ppf-unsafe", GOOD_PLUGIN.replace('"{name}"', repr(name)))
    registry = fresh_registry([ep])
    report = report_for(registry, "ppf-unsafe")
    assert report.error is not None and "strategy name must match" in report.error
    assert repr(name) in report.error and report.strategies == []
    assert_builtins_work(registry)


def test_builtin_and_example_strategy_names_are_safe() -> None:
    names = [info.name for info in default_registry().all()]
    assert "residual" in names
    assert all(STRATEGY_NAME_PATTERN.fullmatch(name) for name in names), names


def test_unknown_strategy_hints_at_the_plugin_filter(site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    ep = site.add("ppf-example-thing", GOOD_PLUGIN.format(name="first-tokens"))
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "ppf-exmple-thing")  # misspelt
    registry = fresh_registry([ep])
    with pytest.raises(ConfigError) as raised:
        registry.get("select_probe", "first-tokens")
    assert str(raised.value).endswith(
        f"({LOAD_PLUGINS_ENV}=ppf-exmple-thing is set; distributions it hid: ppf-example-thing; "
        "no installed plugin distribution is named ppf-exmple-thing)"
    )
    assert "(hidden: ppf-example-thing)" in format_plugins(registry)

    monkeypatch.setenv(LOAD_PLUGINS_ENV, "")
    with pytest.raises(ConfigError, match=f"{LOAD_PLUGINS_ENV} is set and empty; distributions it hid"):
        fresh_registry([ep]).get("select_probe", "first-tokens")

    monkeypatch.delenv(LOAD_PLUGINS_ENV)
    registry = fresh_registry([ep])
    assert registry.get("select_probe", "first-tokens").source == "ppf-example-thing"
    with pytest.raises(ConfigError) as raised:
        registry.get("select_probe", "no-such-probe")
    assert LOAD_PLUGINS_ENV not in str(raised.value)


# -- plugin listing -----------------------------------------------------------------------------


def test_plugin_rows_put_builtins_first_and_group_strategies_by_stage(site: FakeSite) -> None:
    good = site.add("ppf-good", GOOD_PLUGIN.format(name="first-tokens"), version="1.2")
    broken = site.add("ppf-broken", "raise ImportError('no torch_extras')\n")
    registry = StrategyRegistry()
    registry.load_entry_points([good])
    registry.load_builtins()
    registry.load_entry_points([broken])
    rows = plugin_rows(registry)
    assert [row["distribution"] for row in rows] == [BUILTIN_SOURCE, "ppf-good", "ppf-broken"]
    builtin, plugin, failed = rows
    assert list(builtin["stages"]) == list(hookspecs.STAGES)
    assert "residual" in builtin["stages"]["select_probe"] and builtin["error"] is None
    assert plugin == {
        "distribution": "ppf-good",
        "version": "1.2",
        "builtin": False,
        "stages": {"select_probe": ["first-tokens"]},
        "strategies": "select_probe: first-tokens",
        "error": None,
    }
    assert failed["strategies"] == "-" and failed["error"] == "ImportError: no torch_extras"
    text = format_plugins(registry)
    lines = text.splitlines()
    assert lines[0].split() == ["distribution", "version", "strategies"]
    assert lines[1].startswith(BUILTIN_SOURCE)
    assert any(line.startswith("ppf-good") and "select_probe: first-tokens" in line for line in lines)
    assert lines[-1].strip() == "error: ImportError: no torch_extras"
    assert LOAD_PLUGINS_ENV not in text


# -- (b) the installed example plugin -----------------------------------------------------------


def test_example_plugin_is_listed_by_the_default_registry(
    restore_default_registry: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip(
        "ppf_example_strategies",
        reason="example plugin not installed: pip install -e plugins/ppf-example-strategies",
    )
    restore_default_registry.delenv(LOAD_PLUGINS_ENV, raising=False)
    registry = default_registry(refresh=True)
    report = report_for(registry, EXAMPLE_DIST)
    assert report.error is None and report.version
    assert report.strategies == [("select_probe", "variance"), ("score_channels", "ppsp-l1")]
    assert registry.get("select_probe", "variance").source == EXAMPLE_DIST
    assert registry.get("score_channels", "ppsp-l1").source == EXAMPLE_DIST
    text = format_plugins(registry)
    assert EXAMPLE_DIST in text and "select_probe: variance; score_channels: ppsp-l1" in text


def test_example_plugin_is_not_loaded_when_not_named_in_the_filter(
    restore_default_registry: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip(
        "ppf_example_strategies",
        reason="example plugin not installed: pip install -e plugins/ppf-example-strategies",
    )
    restore_default_registry.setenv(LOAD_PLUGINS_ENV, "")
    registry = default_registry(refresh=True)
    assert "variance" not in registry.names("select_probe")
    restore_default_registry.setenv(LOAD_PLUGINS_ENV, EXAMPLE_DIST)
    assert "variance" in default_registry(refresh=True).names("select_probe")


# -- (c) meta-tests: every hook documented and tested, every field documented ---------------------

HOOKS: tuple[str, ...] = ("ppf_register_strategies", *hookspecs.STAGES)


def signature_line(hook: str) -> str:
    """``def hook(arg: Type, ...) -> Ret:`` as written in hookspecs.py (annotations are strings there)."""
    sig = inspect.signature(getattr(hookspecs, hook))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {hook}({params}) -> {sig.return_annotation}:"


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).replace(",)", ")")


def python_blocks(markdown: str) -> str:
    """The concatenated ```python code blocks of a markdown text."""
    return "\n".join(re.findall(r"```python\n(.*?)```", markdown, flags=re.S))


@pytest.fixture(scope="module")
def plugin_doc() -> str:
    """The plugin author kit, docs/plugins.md."""
    return PLUGIN_DOC.read_text(encoding="utf-8")


def test_hookspecs_are_exactly_the_stages_and_registration() -> None:
    specs = {name for name, fn in vars(hookspecs).items() if hasattr(fn, "ppframework_spec")}
    assert specs == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_signature_is_documented_verbatim(plugin_doc: str, hook: str) -> None:
    expected = signature_line(hook)
    assert _squash(expected) in _squash(python_blocks(plugin_doc)), (
        f"docs/plugins.md needs a python code block with:\n    {expected}"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    pattern = re.compile(rf"\b{hook}\b")
    referencing = [
        p.name for p in sorted((REPO / "tests").glob("test_*.py")) if pattern.search(p.read_text())
    ]
    assert referencing, f"no test under tests/ references the hook {hook}"


@pytest.mark.parametrize(
    "cls", [ChannelScores, BlockMask, Probe, BlockContext, AllocationContext], ids=lambda c: c.__name__
)
def test_dataclass_fields_are_documented(plugin_doc: str, cls: type) -> None:
    missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in plugin_doc]
    assert cls.__name__ in plugin_doc
    assert not missing, f"docs/plugins.md does not mention {cls.__name__} fields {missing}"


def test_plugin_guide_covers_probe_sizes_the_fusion_contract_and_the_output_checks(plugin_doc: str) -> None:
    from ppframework.strategies.probe import probe_sizes
    from ppframework.validation import StrategyOutputError

    sig = inspect.signature(probe_sizes)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    assert _squash(f"def probe_sizes({params}) -> {sig.return_annotation}:") in _squash(
        python_blocks(plugin_doc)
    )
    fusion = plugin_doc.split("### `fuse_history`", 1)[1].split("### `apply_mask`", 1)[0]
    for fragment in (
        "scores.positions",
        "position_valid",
        "channel_mean",
        "`variance`",
        "history.mean",
        "ValueError",
    ):
        assert fragment in fusion, f"the fuse_history contract does not mention {fragment}"
    checks = plugin_doc.split("## Output checks", 1)[1].split("\n## ", 1)[0]
    assert StrategyOutputError.__name__ in checks and "validate_outputs" in checks
    for stage in hookspecs.STAGES:
        assert f"| `{stage}` |" in checks, f"the output checks table has no row for {stage}"
    assert "^[a-z0-9][a-z0-9._-]*$" in plugin_doc and "distributions it hid" in plugin_doc
