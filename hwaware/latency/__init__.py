"""Per-device latency tables: device profiles, the measurement protocol, backends, and the table itself.

Names load lazily, so `hwaware profile` can reject a bad device before torch is imported.
"""

import importlib

_EXPORTS = {
    "devices": ["DeviceProfile", "MeasureSettings", "find_present", "list_profiles", "load_device_profile",
                "present_devices"],
    "protocol": ["Stats", "measure_latency", "time_runner", "time_interleaved"],
    "table": ["Calibration", "LatencyTable", "find_table", "table_name", "validation_metrics"],
    "backends": ["Backend", "get_backend", "write_piece_onnx"],
    "profile": ["profile_device"],
    "recalibrate": ["recalibrate_table", "validate_table", "warn_if_other_host"],
    "estimate": ["estimate_table"],
    "transfer": ["transfer_table"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'hwaware.latency' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hwaware.latency.{_WHERE[name]}"), name)


def __dir__():
    return __all__
