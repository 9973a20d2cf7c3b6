"""Wheel build hook: ship the repository's `export/` folder as the package `cxrbatch_export`.

Only in a regular wheel. An editable install gets no copy of it: `cxrbatch.extras` imports the
checkout's `export/` itself, so a developer never runs a stale snapshot of the code they edit.
"""

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "standard":
            build_data["force_include"]["export"] = "cxrbatch_export"
