"""Modbus RTU/TCP meters: register maps as data, a driver, a transport."""

from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import (
    BUILTIN_PROFILES,
    Profile,
    ProfileError,
    parse_profile,
    parse_profiles,
)
from firmware_bridge.modbus.transport import ModbusTransport

__all__ = [
    "BUILTIN_PROFILES",
    "ModbusDriver",
    "ModbusTransport",
    "Profile",
    "ProfileError",
    "parse_profile",
    "parse_profiles",
]
