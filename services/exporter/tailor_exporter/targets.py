"""Named hardware targets for export: what a user deploys to, mapped to the export formats that run there.

The targets are the hardware-target catalogue's (`tailor_runtime.targets`, which the roofline reads too);
this module resolves a request against it. An ExportRequest may name a `target` instead of (or besides) a
`format`: the target picks its default format and that format's settings for the hardware; the request's
own config overrides them. A format the target cannot run is INVALID_ARGUMENT naming the ones it can; a
target name the catalogue does not know is INVALID_ARGUMENT naming the known ones. A name kept from an
earlier version (`raspberry-pi`) resolves to its target.
"""

from __future__ import annotations

from typing import Any

from tailor_runtime import targets as catalogue
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.targets import Target

# Every name (aliases included) -> the target, for the targets that have export formats.
TARGETS: dict[str, Target] = {name: catalogue.NAMES[name] for name in catalogue.names(exports=True)}


def get_target(name: str) -> Target:
    return catalogue.get_target(name, exports=True, what="export target")


def resolve(format_name: str, target_name: str, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(format, config) of a request: a target fills in its default format and that format's settings
    for the hardware; what the request says itself wins."""
    if not target_name:
        if not format_name:
            raise InvalidArgument(
                "an export needs a format or a target", choices=catalogue.names(exports=True)
            )
        return format_name, config
    target = get_target(target_name)
    chosen = format_name or target.default_format
    if chosen not in target.formats:
        raise InvalidArgument(
            f"format {chosen!r} does not run on target {target_name!r}; it runs "
            + ", ".join(target.formats)
            + f" (default {target.default_format}). Leave the format out to get the default"
        )
    return chosen, {**target.settings.get(chosen, {}), **config}
