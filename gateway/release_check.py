"""The gateway's rules for a configuration tree that provisioning puts in force.

Provisioning (the layer below) installs releases and asks these rules whether
a release's ``gateway.toml`` may be put in force, and which gateway and site a
configuration names: :data:`RULES` is what ``edgegw provision``, the USB flow
and every other caller of :func:`provisioning.apply.apply_bundle` hand in.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from gateway.config import check_config
from gateway.preflight import content_problems
from provisioning.bundle import DeviceIdentity, Target
from provisioning.rules import CONFIG_FILE, ConfigIdentity, ConfigRules, ReleaseCheck


def check_release(
    files_dir: Path,
    target: Target,
    identity: DeviceIdentity | None,
    *,
    now: datetime,
    carried_over_unknown: bool = False,
) -> ReleaseCheck:
    """Every reason the configuration tree ``files_dir`` cannot be put in force
    on ``identity`` (None: not known, not checked) for a bundle aimed at ``target``.

    The configuration is checked by the real loader (every problem, with its
    line); then ``gateway.id`` must be this gateway, ``gateway.site`` a site
    target's, ``storage.path`` absolute and outside the release, every file the
    configuration names relative to itself inside the release, and those files
    sound (broker CA, certificate and key parse and match, trust file loads).
    With ``carried_over_unknown`` (making or verifying a bundle away from the
    gateway) a named file missing from the tree is only a note: apply finds it
    if the installed release has it.
    """
    out = ReleaseCheck()
    report = check_config(files_dir / CONFIG_FILE)
    out.problems += report.problems
    values = report.values
    gateway = values.get("gateway", {})
    if identity is not None and "id" in gateway and gateway["id"] != identity.gateway_id:
        out.problems.append(
            f"{CONFIG_FILE}: gateway.id is {gateway['id']!r} but this gateway is {identity.gateway_id!r}"
        )
    if target.kind == "site" and "site" in gateway and gateway["site"] != target.id:
        out.problems.append(
            f"{CONFIG_FILE}: gateway.site is {gateway['site']!r} but the bundle targets "
            f"site {target.id!r}"
        )
    # The loader resolves relative paths against the configuration's directory,
    # i.e. into this release. Such files must be part of the release, and the
    # database must not live there (a new release would leave it behind).
    storage_path = values.get("storage", {}).get("path")
    if storage_path is not None and _inside(storage_path, files_dir) is not None:
        out.problems.append(
            f"{CONFIG_FILE}: storage.path must be an absolute path outside the configuration "
            "(a relative path would put the database inside the release)"
        )
    named = [("storage.key_file", values.get("storage", {}).get("key_file"))]
    named += [(f"broker.{k}", values.get("broker", {}).get(k)) for k in ("ca_file", "cert_file", "key_file")]
    named += [("security.trust_file", values.get("security", {}).get("trust_file"))]
    for key, value in named:
        if value is None:
            continue
        rel = _inside(value, files_dir)
        if rel is None:
            continue  # an absolute path on the gateway, not the bundle's business
        if rel == ".." or rel.startswith("../"):
            out.problems.append(f"{CONFIG_FILE}: {key} = {rel!r} points outside the release")
        elif not (files_dir / rel).is_file():
            text = (
                f"{CONFIG_FILE}: {key} = {rel!r} is not in the bundle "
                "(relative paths are resolved against the configuration's directory)"
            )
            if carried_over_unknown:
                out.notes.append(text + "; apply accepts it only where the installed release has it")
            else:
                out.problems.append(text)

    def inside(p: Path) -> bool:
        rel = _inside(p, files_dir)
        return rel is not None and not (rel == ".." or rel.startswith("../"))

    found = content_problems(report, inside, now)
    out.problems += found.problems
    out.notes += found.warnings
    return out


def _inside(value: Path, base: Path) -> str | None:
    """``value`` relative to ``base`` (normalised) if it was written relative, else None."""
    try:
        rel = value.relative_to(base)
    except ValueError:
        return None
    return os.path.normpath(rel.as_posix())


def declared_identity(config_file: Path) -> ConfigIdentity:
    """``gateway.id`` and ``gateway.site`` as written, whatever else is wrong with the file."""
    gateway = check_config(config_file).values.get("gateway", {})
    return ConfigIdentity(gateway.get("id"), gateway.get("site"))


def installed_identity(config_file: Path) -> ConfigIdentity | None:
    """``gateway.id`` and ``gateway.site`` of a configuration that loads; None otherwise."""
    config = check_config(config_file).config
    return None if config is None else ConfigIdentity(config.gateway.id, config.gateway.site)


RULES = ConfigRules(
    check_release=check_release,
    declared_identity=declared_identity,
    installed_identity=installed_identity,
)
