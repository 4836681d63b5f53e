"""Strategy registry: built-ins and entry-point plugins register by name through one hook.

The discovery plugin manager lives inside a :class:`StrategyRegistry` (never module-global);
each :class:`~ppframework.pipeline.Pipeline` builds its own manager holding only the strategy
instances its config selects.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from ppframework import hookspecs
from ppframework.config import MethodConfig, format_location
from ppframework.errors import ConfigError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ppframework"
LOAD_PLUGINS_ENV = "PPF_LOAD_PLUGINS"
BUILTIN_SOURCE = "ppframework (built-in)"
#: What a strategy name may look like: it is typed in configs and printed in tables.
STRATEGY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
STRATEGY_NAME_MAX = 64


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy: its stage, name, class and where it came from."""

    stage: str
    name: str
    cls: type
    source: str

    @property
    def description(self) -> str:
        """First line of the class docstring."""
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def build(
        self,
        params: dict[str, Any] | None = None,
        field_path: str = "params",
        registry: StrategyRegistry | None = None,
    ) -> Any:
        """Instantiate the strategy with validated parameters.

        A composite strategy (one whose class has ``build_with(params, build_child, field_path)``, e.g.
        ``per-block``) gets its children built through ``registry`` (the default registry if None).
        """
        params_model: type[BaseModel] | None = getattr(self.cls, "Params", None)
        params = params or {}
        if params_model is None:
            if params:
                raise ConfigError(
                    f"{field_path}: strategy {self.name!r} takes no parameters, got {sorted(params)}"
                )
            return self.cls()
        try:
            validated = params_model.model_validate(params)
        except ValidationError as exc:
            lines = [
                f"{field_path}.{format_location(tuple(e['loc']))}: {e['msg']}"
                if e["loc"]
                else f"{field_path}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            ]
            raise ConfigError("\n".join(lines)) from None
        build_with = getattr(self.cls, "build_with", None)
        if build_with is not None:
            source = registry or default_registry()

            def build_child(stage: str, spec: Any, path: str) -> Any:
                info = source.get(stage, spec.name, f"{path}.name")
                return info.build(spec.params, f"{path}.params", source)

            return build_with(validated, build_child, field_path)
        return self.cls(validated)


@dataclass
class PluginReport:
    """What loading one plugin distribution did."""

    name: str
    version: str = ""
    strategies: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


def normalise_distribution(name: str) -> str:
    """PEP 503 form of a distribution name: ``PPF_Example.strategies`` -> ``ppf-example-strategies``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def plugin_filter() -> set[str] | None:
    """Distributions allowed by ``PPF_LOAD_PLUGINS`` (None = all; empty string = none).

    Names are compared in PEP 503 normal form, so ``ppf_example_strategies`` matches
    ``ppf-example-strategies``.
    """
    raw = os.environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return {normalise_distribution(name) for name in raw.split(",") if name.strip()}


class StrategyRegistry:
    """Maps ``(stage, name)`` to strategy classes, filled through ``ppf_register_strategies``."""

    def __init__(self) -> None:
        self._strategies: dict[tuple[str, str], StrategyInfo] = {}
        self.plugins: list[PluginReport] = []
        #: ``PPF_LOAD_PLUGINS`` as read when entry points were loaded (None = unset or not loaded).
        self.plugin_filter: set[str] | None = None
        #: Plugin distributions installed but not loaded because the filter left them out.
        self.hidden_plugins: list[str] = []
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)

    # -- filling -------------------------------------------------------------------------------
    def register_plugin(self, plugin: Any, source: str) -> PluginReport:
        """Register a plugin object/module and collect the strategies it registers."""
        report = PluginReport(name=source)
        try:
            self._pm.register(plugin, name=f"{source}:{id(plugin)}")
            self._pm.check_pending()
        except Exception as exc:  # a bad hook signature, an unknown hook
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            report.error = f"{type(exc).__name__}: {exc}"
            logger.warning("plugin %s skipped: %s", source, report.error)
            return report
        impl = getattr(plugin, "ppf_register_strategies", None)
        if impl is None:
            return report
        staged: list[StrategyInfo] = []

        def register(cls: type) -> None:
            staged.append(self._validate(cls, source))

        try:
            impl(register=register)
            names = [(info.stage, info.name) for info in staged]
            clashes = [key for key in names if key in self._strategies or names.count(key) > 1]
            if clashes:
                owners = {key: self._strategies[key].source for key in clashes if key in self._strategies}
                raise ValueError(f"duplicate strategy names {sorted(set(clashes))} (already from {owners})")
        except Exception as exc:
            self._pm.unregister(plugin)
            report.error = f"{type(exc).__name__}: {exc}"
            logger.warning("plugin %s skipped: %s", source, report.error)
            return report
        for info in staged:
            self._strategies[(info.stage, info.name)] = info
            report.strategies.append((info.stage, info.name))
        return report

    @staticmethod
    def _validate(cls: Any, source: str) -> StrategyInfo:
        stage = getattr(cls, "stage", None)
        name = getattr(cls, "name", None)
        if stage not in hookspecs.STAGES:
            raise ValueError(f"{cls!r} has stage {stage!r}; expected one of {hookspecs.STAGES}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{cls!r} needs a non-empty string `name`")
        if not STRATEGY_NAME_PATTERN.fullmatch(name) or len(name) > STRATEGY_NAME_MAX:
            raise ValueError(
                f"{cls!r} has name {name!r}; a strategy name must match "
                f"{STRATEGY_NAME_PATTERN.pattern!r} (lower-case letters, digits, '.', '_', '-'; "
                f"starting with a letter or digit; at most {STRATEGY_NAME_MAX} characters)"
            )
        method = getattr(cls, stage, None)
        if not callable(method):
            raise ValueError(f"{cls!r} declares stage {stage!r} but has no method of that name")
        if not hasattr(method, f"{hookspecs.PROJECT_NAME}_impl"):
            raise ValueError(f"{cls!r}.{stage} is not decorated with @hookimpl")
        # check the class's hook signatures now (a pipeline registers its instances later)
        check = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        check.add_hookspecs(hookspecs)
        check.register(cls)
        check.check_pending()
        return StrategyInfo(stage=stage, name=name, cls=cls, source=source)

    def load_builtins(self) -> None:
        """Register the built-in strategies (through the same hook as plugins)."""
        from ppframework.strategies import builtin

        self.plugins.append(self.register_plugin(builtin, BUILTIN_SOURCE))

    def load_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        """Load third-party plugins from the ``ppframework`` entry-point group; report failures."""
        allowed = plugin_filter()
        self.plugin_filter = allowed
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in entry_points:
            dist = ep.dist.name if ep.dist is not None else ep.value
            if allowed is not None and normalise_distribution(dist) not in allowed:
                logger.info("plugin %s not loaded (%s=%s)", dist, LOAD_PLUGINS_ENV, ",".join(sorted(allowed)))
                if dist not in self.hidden_plugins:
                    self.hidden_plugins.append(dist)
                continue
            version = ep.dist.version if ep.dist is not None else ""
            try:
                plugin = ep.load()
            except Exception as exc:
                report = PluginReport(name=dist, version=version, error=f"{type(exc).__name__}: {exc}")
                logger.warning("plugin %s failed to import and was skipped: %s", dist, report.error)
            else:
                report = self.register_plugin(plugin, dist)
                report.version = version
            self.plugins.append(report)

    # -- lookup ---------------------------------------------------------------------------------
    def names(self, stage: str) -> list[str]:
        """Registered strategy names of one stage, sorted."""
        return sorted(name for (s, name) in self._strategies if s == stage)

    def all(self) -> list[StrategyInfo]:
        """Every registered strategy, by stage then name."""
        order = {s: i for i, s in enumerate(hookspecs.STAGES)}
        return sorted(self._strategies.values(), key=lambda i: (order[i.stage], i.name))

    def get(self, stage: str, name: str, field_path: str | None = None) -> StrategyInfo:
        """The strategy ``name`` of ``stage``; a clear error listing the choices if unknown."""
        info = self._strategies.get((stage, name))
        if info is None:
            where = field_path or f"strategies.{stage}.name"
            raise ConfigError(
                f"{where}: unknown {stage} strategy {name!r}; registered: {', '.join(self.names(stage))}"
                + self.filter_hint()
            )
        return info

    def filter_hint(self) -> str:
        """`` (PPF_LOAD_PLUGINS=... is set; ...)`` when the plugin filter was active, else ``""``.

        Names the installed distributions the filter hid and the filter's names that match no
        installed distribution (a misspelling), so an unknown strategy can be traced to the filter.
        """
        allowed = self.plugin_filter
        if allowed is None:
            return ""
        loaded = {normalise_distribution(r.name) for r in self.plugins if r.name != BUILTIN_SOURCE}
        hidden = {normalise_distribution(d) for d in self.hidden_plugins}
        unmatched = sorted(allowed - loaded - hidden)
        names = ",".join(sorted(allowed))
        parts = [f"{LOAD_PLUGINS_ENV}={names} is set" if allowed else f"{LOAD_PLUGINS_ENV} is set and empty"]
        parts.append(
            f"distributions it hid: {', '.join(self.hidden_plugins)}"
            if self.hidden_plugins
            else "it hid no installed distribution"
        )
        if unmatched:
            parts.append(f"no installed plugin distribution is named {', '.join(unmatched)}")
        return f" ({'; '.join(parts)})"

    def build_method(self, method: MethodConfig, field_prefix: str = "method") -> dict[str, Any]:
        """Validate and instantiate the six strategies of ``method`` (stage -> instance)."""
        built = {}
        for stage in hookspecs.STAGES:
            stage_cfg = getattr(method.strategies, stage)
            path = f"{field_prefix}.strategies.{stage}"
            info = self.get(stage, stage_cfg.name, f"{path}.name")
            built[stage] = info.build(stage_cfg.params, f"{path}.params", self)
        return built


_DEFAULT: StrategyRegistry | None = None


def default_registry(refresh: bool = False) -> StrategyRegistry:
    """The process-wide registry of built-ins and entry-point plugins, loaded lazily once."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        registry = StrategyRegistry()
        registry.load_builtins()
        registry.load_entry_points()
        _DEFAULT = registry
    return _DEFAULT
