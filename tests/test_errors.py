"""Every exception of the product derives from the one root and says its kind."""

from __future__ import annotations

import inspect

import pytest

from firmware_bridge.driver import MeterTimeout
from firmware_bridge.errors import EdgeGwError, ErrorKind, ProblemsError
from gateway.billing.tariff import NoTariffInForce
from gateway.config import ConfigError
from store_forward.tls import TLSFileError
from tests.harness.product import PACKAGES, product_modules


def product_exceptions() -> list[type[BaseException]]:
    """The exception classes of the product and of its test bench."""
    found: dict[str, type[BaseException]] = {}
    for module in product_modules((*PACKAGES, "testbed")):
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__.split(".")[0] in (*PACKAGES, "testbed")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def test_every_product_exception_derives_from_the_root_and_has_a_kind() -> None:
    classes = product_exceptions()
    assert len(classes) > 40  # the walk found the product, not an empty package
    strays = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, EdgeGwError)]
    assert not strays, f"exceptions outside EdgeGwError: {strays}"
    assert all(isinstance(getattr(c, "kind", None), ErrorKind) for c in classes)


def test_built_in_bases_are_kept_beside_the_root() -> None:
    assert issubclass(TLSFileError, OSError) and TLSFileError(2, "gone").errno == 2
    assert issubclass(NoTariffInForce, LookupError)
    with pytest.raises(EdgeGwError) as caught:
        raise MeterTimeout("m-1", "no answer in 0.5 s")
    assert caught.value.kind == "timeout" and caught.value.kind is ErrorKind.TIMEOUT


def test_problem_lists_keep_every_problem() -> None:
    err = ConfigError(["site.toml:3: gateway.id: missing", "site.toml:9: meter[m-1].bus: unknown"])
    assert isinstance(err, ProblemsError) and err.kind is ErrorKind.INVALID
    assert err.problems == ["site.toml:3: gateway.id: missing", "site.toml:9: meter[m-1].bus: unknown"]
    assert str(err) == "\n".join(err.problems)
