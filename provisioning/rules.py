"""What provisioning needs to know about the configuration it installs.

Provisioning moves a configuration tree onto a gateway atomically; what makes
that configuration acceptable (its schema, the gateway it names, the files it
points to) is the application's knowledge, not this package's. The
application hands it in as :class:`ConfigRules` (the gateway's are
``gateway.release_check.RULES``): :func:`provisioning.apply.apply_bundle`
receives the release check, the ``edgegw provision`` commands and the USB
flow receive all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Protocol

from provisioning.bundle import DeviceIdentity, Target

CONFIG_FILE = "gateway.toml"


@dataclass
class ReleaseCheck:
    """What a release check found: ``problems`` refuse the release; ``notes`` are
    for the technician (files a bundle relies on the installed release for)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ReleaseChecker(Protocol):
    """Every reason the configuration tree ``files_dir`` (which holds
    :data:`CONFIG_FILE`) cannot be put in force on ``identity`` (None: not
    known, not checked) for a bundle aimed at ``target``.

    With ``carried_over_unknown`` (making or verifying a bundle away from the
    gateway) a file the configuration names but the tree lacks is only a
    note: apply finds it if the installed release has it.
    """

    def __call__(
        self,
        files_dir: Path,
        target: Target,
        identity: DeviceIdentity | None,
        *,
        now: datetime,
        carried_over_unknown: bool = False,
    ) -> ReleaseCheck: ...


class ConfigIdentity(NamedTuple):
    """The gateway and site a configuration file names (either may be absent)."""

    gateway_id: str | None
    site_id: str | None


@dataclass(frozen=True)
class ConfigRules:
    """The application's rules for the configuration file provisioning installs."""

    check_release: ReleaseChecker
    # The identity written in a configuration file, whatever else is wrong with it.
    declared_identity: Callable[[Path], ConfigIdentity]
    # The identity of a configuration that loads; None when it does not.
    installed_identity: Callable[[Path], ConfigIdentity | None]
