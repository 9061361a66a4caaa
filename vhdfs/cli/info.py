"""``vhd info``: what an image is, as a report model rendered as text or JSON.

The JSON form is for scripts and keeps raw numbers (bytes, seconds); the text form is for
people. When a parent cannot be found the report still describes every layer that opened and
says what went wrong with the next one.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from vhdfs.errors import ChainError, VhdfsError
from vhdfs.format.layout import VHD_EPOCH, DiskType
from vhdfs.image.chain import ParentLink
from vhdfs.image.vhd import VhdImage
from vhdfs.text import printable
from vhdfs.units import format_size

_TYPE_NAMES = {
    DiskType.FIXED: "fixed",
    DiskType.DYNAMIC: "dynamic",
    DiskType.DIFFERENCING: "differencing",
}


def layer_report(image: VhdImage, link: ParentLink | None) -> dict[str, Any]:
    """Everything ``vhd info`` shows about one image of a chain."""
    footer = image.footer
    report: dict[str, Any] = {
        "path": image.path,
        "type": _TYPE_NAMES[image.kind],
        "virtual_size": image.virtual_size,
        "geometry": {
            "cylinders": footer.geometry.cylinders,
            "heads": footer.geometry.heads,
            "sectors_per_track": footer.geometry.sectors_per_track,
            "size": footer.geometry.size,
        },
        "original_size": footer.original_size,
        "creator": {
            "application": footer.creator,
            "version": footer.creator_version_text,
            "host_os": footer.creator_os.decode("latin-1"),
        },
        "timestamp": footer.timestamp + VHD_EPOCH,
        "unique_id": footer.unique_id.hex(),
        "saved_state": bool(footer.saved_state),
        "file_size": image.file.size,
        "warnings": [{"code": w.code, "message": w.message} for w in image.warnings],
    }
    if image.header is not None:
        report["block_size"] = image.block_size
        report["blocks"] = image.bat_entries
        report["allocated_blocks"] = image.allocated_blocks
    if link is not None:
        report["found_by"] = link.found_by
    if image.kind == DiskType.DIFFERENCING:
        assert image.header is not None
        report["parent"] = {
            "name": image.header.parent_name,
            "unique_id": image.header.parent_unique_id.hex(),
            "timestamp": image.header.parent_timestamp + VHD_EPOCH,
            "locators": [loc.platform_name for loc in image.header.locators if not loc.is_empty],
        }
    return report


def chain_report(
    layers: list[tuple[VhdImage, ParentLink | None]], error: ChainError | None
) -> dict[str, Any]:
    """The report of a whole chain; ``error`` says why it stops early, if it does."""
    reports = [layer_report(image, link) for image, link in layers]
    for child, (_, link) in zip(reports, layers[1:], strict=False):
        if link is not None:
            child["parent"]["path"] = link.path
            child["parent"]["id_matches"] = True
    return {
        "image": reports[0]["path"],
        "virtual_size": reports[0]["virtual_size"],
        "depth": len(reports),
        "complete": error is None,
        "error": None if error is None else error_report(error),
        "exit_code": 0 if error is None else int(error.exit_code),
        "layers": reports,
    }


def error_report(error: VhdfsError) -> dict[str, Any]:
    """An error as JSON: its stable code, the file, and the one-line message."""
    return {"code": error.code, "path": error.path, "message": str(error)}


def failed_report(path: str, error: VhdfsError) -> dict[str, Any]:
    """The ``vhd info`` report of an image that does not open at all."""
    return {
        "image": path,
        "complete": False,
        "error": error_report(error),
        "exit_code": int(error.exit_code),
        "layers": [],
    }


#: Version of the ``--json`` documents of ``vhd``: raised when a field changes meaning.
JSON_VERSION = 1


def render_json(report: dict[str, Any]) -> str:
    """A report as an indented JSON document, with the format's version first."""
    return json.dumps({"version": JSON_VERSION, **report}, indent=2)


def _time(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_text(report: dict[str, Any]) -> str:
    """The report for people, one aligned block per layer."""
    blocks = [_layer_rows(layer) for layer in report["layers"]]
    width = max(len(key) for rows in blocks for key, _ in rows)
    lines = []
    for depth, (layer, rows) in enumerate(zip(report["layers"], blocks, strict=True)):
        title = "image" if depth == 0 else f"parent {depth}"
        lines.append(f"{title}: {layer['path']}")
        lines.extend(f"  {key:<{width}}  {value}" for key, value in rows)
    if report["error"]:
        lines.append(f"chain incomplete: {report['error']['message']}")
    return "\n".join(printable(line) for line in lines)


def _layer_rows(layer: dict[str, Any]) -> list[tuple[str, str]]:
    geometry = layer["geometry"]
    size = layer["virtual_size"]
    rows = [
        ("type", layer["type"]),
        ("virtual size", f"{format_size(size)} ({size} bytes)"),
        (
            "geometry",
            f"{geometry['cylinders']}/{geometry['heads']}/{geometry['sectors_per_track']} "
            f"(C/H/S, {geometry['size']} bytes)",
        ),
        (
            "creator",
            f"{layer['creator']['application']!r} {layer['creator']['version']} "
            f"on {layer['creator']['host_os']!r}",
        ),
        ("created", _time(layer["timestamp"])),
        ("unique id", layer["unique_id"]),
        ("file size", f"{format_size(layer['file_size'])} ({layer['file_size']} bytes)"),
    ]
    if "block_size" in layer:
        allocated = layer["allocated_blocks"]
        rows.append(("block size", format_size(layer["block_size"])))
        rows.append(
            (
                "allocated",
                f"{allocated} of {layer['blocks']} blocks "
                f"({format_size(allocated * layer['block_size'])})",
            )
        )
    if layer["original_size"] != size:
        rows.append(("original size", f"{layer['original_size']} bytes (differs)"))
    if layer["saved_state"]:
        rows.append(("saved state", "yes (a Virtual PC VM was saved with this disk)"))
    if "found_by" in layer:
        rows.append(("found by", layer["found_by"]))
    parent = layer.get("parent")
    if parent:
        rows.append(("parent name", repr(parent["name"])))
        rows.append(("parent id", parent["unique_id"]))
        rows.append(("locators", ", ".join(parent["locators"]) or "none"))
        if "path" in parent:
            rows.append(("parent", f"{parent['path']} (unique id matches)"))
    rows.extend(("warning", warning["message"]) for warning in layer["warnings"])
    return rows
