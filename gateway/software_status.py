"""What `edgegw status` says about software: the release running, the update in
progress or the last one, and the bundles on their way (read-only).

Two places hold it:

* the releases root (``/opt/edgegw``, :mod:`gateway.update`): the ``current`` and
  ``committed`` links and ``update-state.json`` (phase, version floor, the last
  update's outcome);
* the update spool beside the database (``updates/``,
  :mod:`gateway.update_transfer`): offers being downloaded (``offers/`` and their
  ``incoming/*.part``), bundles ready for the updater (``ready/``) and bundles
  held below the version floor (``held/``).

Nothing here writes, locks or repairs: a file that cannot be read is reported
as such (the spool is the service user's, mode 0700).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.update import STATE_FILE
from provisioning.software_bundle import SUFFIX


def _link(root: Path, name: str) -> str | None:
    try:
        return Path(str((root / name).readlink())).name
    except OSError:
        return None


def releases_status(root: Path) -> dict[str, Any]:
    """The releases root's links and update state; ``present`` False where there is
    no releases root (a development install)."""
    if not root.is_dir():
        return {"root": str(root), "present": False}
    out: dict[str, Any] = {
        "root": str(root),
        "present": True,
        "current": _link(root, "current"),
        "committed": _link(root, "committed"),
    }
    try:
        doc = json.loads((root / STATE_FILE).read_bytes())
    except FileNotFoundError:
        doc = {"phase": "idle"}
    except (OSError, ValueError) as exc:
        return {**out, "phase": "unknown", "problem": f"{root / STATE_FILE}: {exc}"}
    if not isinstance(doc, dict):
        return {**out, "phase": "unknown", "problem": f"{root / STATE_FILE}: not an update state"}
    out["phase"] = str(doc.get("phase", "unknown"))
    out["floor"] = doc.get("floor")
    for key in ("trial", "last"):
        value = doc.get(key)
        if isinstance(value, dict):
            out[key] = {k: value.get(k) for k in ("outcome", "from", "to", "source", "downgrade") if k in value}
    failed = doc.get("failed")
    out["failed"] = len(failed) if isinstance(failed, list) else 0
    return out


def spool_status(spool: Path) -> dict[str, Any]:
    """Offers being downloaded (how far the part file reaches against the offer's
    size: chunks land at their offsets, so a resumed transfer may still lack some
    below that), bundles ready to install and bundles held below the floor."""
    out: dict[str, Any] = {"path": str(spool), "downloads": [], "ready": 0, "held": 0}
    if not spool.is_dir():
        return out
    try:
        offers = sorted((spool / "offers").glob("*.json")) if (spool / "offers").is_dir() else []
        for p in offers:
            try:
                doc = json.loads(p.read_bytes())
                size = int(doc["size"])
                version = str(doc["version"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                out["downloads"].append({"offer": p.name, "problem": f"unreadable offer: {exc}"})
                continue
            try:
                have = min(size, (spool / "incoming" / f"{p.stem}.part").stat().st_size)
            except FileNotFoundError:
                have = 0
            out["downloads"].append({"version": version, "sha256": p.stem, "size": size, "bytes_on_disk": have})
        for sub in ("ready", "held"):
            d = spool / sub
            out[sub] = len(list(d.glob(f"*{SUFFIX}"))) if d.is_dir() else 0
    except PermissionError as exc:
        out["problem"] = f"{exc.filename}: not readable by this user (the spool is the service user's)"
    return out


def releases_root_of(prefix: Path) -> Path | None:
    """The releases root a process runs from, given its ``sys.prefix``: the virtual
    environment of a release is ``<root>/releases/<version>``; None for any other
    installation (a development checkout)."""
    return prefix.parent.parent if prefix.parent.name == "releases" else None


def software_status(root: Path, spool: Path, running: str | None) -> dict[str, Any]:
    """The whole software section of `edgegw status --json` (``running``: the
    version the daemon's heartbeat names, None when it does not run)."""
    return {"running": running, "releases": releases_status(root), "spool": spool_status(spool)}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def software_lines(sw: dict[str, Any]) -> list[str]:
    """The human-readable lines of :func:`software_status`."""
    rel = sw["releases"]
    running = sw["running"] or "not running"
    if not rel["present"]:
        lines = [f"software: {running} (no releases root at {rel['root']}: not installed by install.sh)"]
    else:
        floor = rel.get("floor") or "-"
        phase = rel["phase"]
        lines = [
            f"software: {running}; current {rel['current'] or '-'}, committed {rel['committed'] or '-'},"
            f" floor {floor}, update {phase if phase == 'idle' else phase.upper()}"
        ]
        if rel.get("problem"):
            lines.append(f"          {rel['problem']}")
        trial = rel.get("trial")
        if phase != "idle" and trial:
            lines.append(f"          in progress: {trial.get('from')} -> {trial.get('to')} ({trial.get('source')})")
        last = rel.get("last")
        if last:
            lines.append(f"          last update: {last.get('outcome')} {last.get('from')} -> {last.get('to')}")
        if rel.get("failed"):
            lines.append(f"          {rel['failed']} bundle(s) failed their trial (not tried again)")
    sp = sw["spool"]
    for d in sp["downloads"]:
        if "problem" in d:
            lines.append(f"          offer {d['offer']}: {d['problem']}")
        else:
            lines.append(
                f"          downloading {d['version']} ({d['sha256'][:12]}…):"
                f" part file at {_mb(d['bytes_on_disk'])} of {_mb(d['size'])}"
            )
    if sp["ready"] or sp["held"]:
        lines.append(f"          bundles: {sp['ready']} ready to install, {sp['held']} held below the floor")
    if sp.get("problem"):
        lines.append(f"          spool: {sp['problem']}")
    return lines
