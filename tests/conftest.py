"""Suite-wide set-up: the same offline, quiet environment the CLI uses."""

from cmoe.env import apply_defaults

apply_defaults()
