"""Modbus RTU/TCP meters: register maps as data, a driver, a transport."""

from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import (
    BUILTIN_PROFILES,
    Profile,
    ProfileError,
    parse_profile,
    parse_profiles,
)
from firmware_bridge.modbus.transport import MbapTransport, ModbusTransport, PymodbusTransport

__all__ = [
    "BUILTIN_PROFILES",
    "MbapTransport",
    "ModbusDriver",
    "ModbusTransport",
    "Profile",
    "ProfileError",
    "PymodbusTransport",
    "parse_profile",
    "parse_profiles",
]
