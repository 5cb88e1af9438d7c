"""Device profiles, one YAML per device; shipped with hwaware as the package `hwaware.profiles`."""
